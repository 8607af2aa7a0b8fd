//! `SetStock`: create or update one catalog item, atomically.

use orderflow_proto::v1::{SetStockRequest, StockItem};
use orderflow_runtime::{FieldViolations, Store, StoreError};
use tonic::Status;

use crate::items::{self, ITEMS};

pub(crate) async fn set_stock(
    store: &Store,
    request: SetStockRequest,
) -> Result<StockItem, Status> {
    let mut violations = FieldViolations::new();
    items::check_sku(&request.sku, "sku", &mut violations);
    let price = request
        .unit_price
        .as_ref()
        .map(|p| (p.amount_minor, p.currency.as_str()));
    items::check_item_fields("", &request.name, price, request.available, &mut violations);
    violations.check()?;

    store
        .call(move |store| {
            store.write(|txn| {
                let mut table = txn.redb().open_table(ITEMS).map_err(StoreError::from)?;
                let item = match items::get(&table, &request.sku)? {
                    Some(mut item) => {
                        if !request.name.trim().is_empty() {
                            item.name = request.name.trim().to_owned();
                        }
                        if let Some(price) = request.unit_price {
                            item.unit_price = Some(price);
                        }
                        if let Some(available) = request.available {
                            item.available = available;
                        }
                        item
                    }
                    None => {
                        let mut violations = FieldViolations::new();
                        if request.name.trim().is_empty() {
                            violations.add("name", "required for a new item");
                        }
                        if request.unit_price.is_none() {
                            violations.add("unit_price", "required for a new item");
                        }
                        violations.check()?;
                        StockItem {
                            sku: request.sku.clone(),
                            name: request.name.trim().to_owned(),
                            unit_price: request.unit_price,
                            available: request.available.unwrap_or(0),
                            reserved: 0,
                        }
                    }
                };
                items::put(&mut table, &item)?;
                tracing::info!(sku = %item.sku, available = item.available, "stock set");
                Ok::<_, Status>(item)
            })
        })
        .await
}
