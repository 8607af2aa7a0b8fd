//! `orderflow place`: one order, for people without grpcurl.

use anyhow::{Context, bail};
use orderflow_proto::v1::{
    OrderLine, PlaceOrderRequest, order_receiver_client::OrderReceiverClient,
};
use tonic_types::StatusExt;

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
    receiver: String,
    customer: String,
    lines: Vec<OrderLine>,
) -> anyhow::Result<()> {
    let mut client = OrderReceiverClient::connect(receiver.clone())
        .await
        .with_context(|| format!("cannot reach the receiver at {receiver} (--receiver)"))?;
    let response = client
        .place_order(PlaceOrderRequest {
            customer_id: customer,
            lines,
        })
        .await;
    match response {
        Ok(response) => {
            let response = response.into_inner();
            println!("{}", response.order_id);
            eprintln!("accepted at offset {}", response.offset);
            Ok(())
        }
        Err(status) => match status.get_details_bad_request() {
            Some(bad) => {
                eprintln!("the receiver refused the order ({:?}):", status.code());
                for violation in bad.field_violations {
                    eprintln!("  {}: {}", violation.field, violation.description);
                }
                bail!("the order was not accepted")
            }
            None => bail!(
                "the order was not accepted ({:?}): {}",
                status.code(),
                status.message()
            ),
        },
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
