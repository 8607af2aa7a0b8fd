//! `orderflow stock list|get|set`: the catalog and its inventory.

use anyhow::anyhow;
use clap::Subcommand;
use orderflow_proto::{
    money::{is_currency_code, minor_unit_exponent},
    v1::{
        GetStockRequest, ListStockRequest, Money, SetStockRequest, StockItem,
        stock_checker_client::StockCheckerClient,
    },
};

use tonic::transport::Channel;

use crate::client::{Connect, Stage, all_pages, refused};

#[derive(Subcommand, Debug)]
pub enum StockCommand {
    /// Every item with what is available and reserved
    List,
    /// One item
    Get { sku: String },
    /// Create or update an item (admin): a new item needs --name and --price
    Set {
        sku: String,
        /// Display name
        #[arg(long)]
        name: Option<String>,
        /// Unit price in major units, e.g. 12.99 (exact: no more decimals than the currency has)
        #[arg(long, requires = "currency")]
        price: Option<String>,
        /// ISO 4217 code of --price, e.g. EUR
        #[arg(long, requires = "price")]
        currency: Option<String>,
        /// Units available (reserved units are never touched)
        #[arg(long)]
        available: Option<u64>,
    },
}

pub async fn run(connect: &Connect, command: StockCommand) -> anyhow::Result<()> {
    let mut client = StockCheckerClient::new(connect.channel(Stage::Stock).await?);
    match command {
        StockCommand::List => print_items(&list_all(&client).await?),
        StockCommand::Get { sku } => {
            let item = client
                .get_stock(GetStockRequest { sku })
                .await
                .map_err(|s| refused("GetStock", s))?
                .into_inner();
            print_items(&[item]);
        }
        StockCommand::Set {
            sku,
            name,
            price,
            currency,
            available,
        } => {
            let unit_price = match (price, currency) {
                (Some(price), Some(currency)) => {
                    Some(parse_money(&price, &currency).map_err(|e| anyhow!(e))?)
                }
                _ => None,
            };
            let request = connect.admin(SetStockRequest {
                sku,
                name: name.unwrap_or_default(),
                unit_price,
                available,
            })?;
            let item = client
                .set_stock(request)
                .await
                .map_err(|s| refused("SetStock", s))?
                .into_inner();
            print_items(&[item]);
        }
    }
    Ok(())
}

/// The whole catalog, page by page.
pub async fn list_all(client: &StockCheckerClient<Channel>) -> anyhow::Result<Vec<StockItem>> {
    all_pages("ListStock", |page_token| {
        let mut client = client.clone();
        async move {
            let page = client
                .list_stock(ListStockRequest {
                    page_size: 1000,
                    page_token,
                })
                .await?
                .into_inner();
            Ok((page.items, page.next_page_token))
        }
    })
    .await
}

/// `12.99` + `EUR` → 1299 minor units, exactly; more decimals than the currency has is an error.
pub fn parse_money(amount: &str, currency: &str) -> Result<Money, String> {
    let currency = currency.trim().to_ascii_uppercase();
    if !is_currency_code(&currency) {
        return Err(format!("{currency:?} is not an ISO 4217 currency code"));
    }
    let exponent = minor_unit_exponent(&currency) as usize;
    let amount = amount.trim();
    let (whole, fraction) = amount.split_once('.').unwrap_or((amount, ""));
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(whole) || !(fraction.is_empty() || digits(fraction)) {
        return Err(format!("{amount:?} is not an amount such as 12.99"));
    }
    if fraction.len() > exponent {
        return Err(format!(
            "{currency} has {exponent} decimal places; {amount:?} has more"
        ));
    }
    let minor = format!("{whole}{fraction:0<exponent$}");
    let value = minor
        .parse::<i64>()
        .map_err(|_| format!("{amount:?} is too large"))?;
    Ok(Money::new(value, currency))
}

fn print_items(items: &[StockItem]) {
    println!(
        "{:<16} {:<28} {:>10} {:>9} {:>16}",
        "SKU", "NAME", "AVAILABLE", "RESERVED", "UNIT PRICE"
    );
    for item in items {
        let price = item
            .unit_price
            .as_ref()
            .map_or_else(String::new, ToString::to_string);
        println!(
            "{:<16} {:<28} {:>10} {:>9} {:>16}",
            item.sku, item.name, item.available, item.reserved, price
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prices_parse_exactly() {
        let cases = [
            ("12.99", "EUR", Ok(1299)),
            ("12.9", "eur", Ok(1290)),
            ("12", "EUR", Ok(1200)),
            ("1500", "JPY", Ok(1500)),
        ];
        for (amount, currency, want) in cases {
            assert_eq!(
                parse_money(amount, currency).map(|m| m.amount_minor),
                want,
                "{amount} {currency}"
            );
        }
        for (amount, currency) in [
            ("12.999", "EUR"),
            ("1.5", "JPY"),
            ("-1", "EUR"),
            ("1e3", "EUR"),
            ("", "EUR"),
            ("1", "EURO"),
        ] {
            assert!(
                parse_money(amount, currency).is_err(),
                "{amount} {currency}"
            );
        }
    }
}
