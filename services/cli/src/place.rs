//! `orderflow place`: one order, for people without grpcurl.

use anyhow::bail;
use orderflow_proto::v1::{
    OrderLine, PlaceOrderRequest, order_receiver_client::OrderReceiverClient,
};

use crate::client::{Connect, Stage, refused};

/// A `sku=qty` command-line value.
pub fn parse_line(s: &str) -> Result<OrderLine, String> {
    let (sku, quantity) = s
        .split_once('=')
        .ok_or_else(|| format!("expected SKU=QTY, got {s:?}"))?;
    let quantity = quantity
        .trim()
        .parse::<u32>()
        .map_err(|_| format!("quantity in {s:?} is not a whole number"))?;
    Ok(OrderLine {
        sku: sku.trim().to_owned(),
        quantity,
    })
}

pub async fn place(
    connect: &Connect,
    customer: String,
    lines: Vec<OrderLine>,
    idempotency_key: Option<String>,
) -> anyhow::Result<()> {
    let mut client = OrderReceiverClient::new(connect.channel(Stage::Receiver).await?);
    let response = client
        .place_order(PlaceOrderRequest {
            customer_id: customer,
            lines,
            idempotency_key: idempotency_key.unwrap_or_default(),
        })
        .await;
    match response {
        Ok(response) => {
            let response = response.into_inner();
            println!("{}", response.order_id);
            if response.replayed {
                eprintln!(
                    "already placed with this idempotency key (offset {})",
                    response.offset
                );
            } else {
                eprintln!("accepted at offset {}", response.offset);
            }
            Ok(())
        }
        Err(status) => {
            eprintln!("{:#}", refused("placing the order", status));
            bail!("the order was not accepted")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_parse() {
        let line = parse_line("KB-01=3").ok();
        assert_eq!(line.map(|l| (l.sku, l.quantity)), Some(("KB-01".into(), 3)));
        assert!(parse_line("KB-01").is_err());
        assert!(parse_line("KB-01=x").is_err());
        assert!(parse_line("KB-01=-1").is_err());
    }
}
