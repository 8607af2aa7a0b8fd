//! `GetStock` and `ListStock`: read the catalog.

use std::ops::Bound;

use orderflow_proto::v1::{GetStockRequest, ListStockRequest, ListStockResponse, StockItem};
use orderflow_runtime::{FieldViolations, PageFill, Store, StoreError, decode_record, paging};
use tonic::Status;

use crate::items::{self, ITEMS, ITEMS_NAME};

pub(crate) async fn get_stock(
    store: &Store,
    request: GetStockRequest,
) -> Result<StockItem, Status> {
    let mut violations = FieldViolations::new();
    items::check_sku(&request.sku, "sku", &mut violations);
    violations.check()?;
    let sku = request.sku.clone();
    let item = store
        .call(move |store| store.read(|read| items::get(&read.open_table(ITEMS)?, &sku)))
        .await?;
    item.ok_or_else(|| Status::not_found(format!("no catalog item with sku {}", request.sku)))
}

pub(crate) async fn list_stock(
    store: &Store,
    request: ListStockRequest,
) -> Result<ListStockResponse, Status> {
    let mut violations = FieldViolations::new();
    let size = paging::page_size_or_default(request.page_size, &mut violations);
    violations.check()?;
    // The token is the last sku of the previous page; the next page starts after it.
    let after = request.page_token;
    store
        .call(move |store| {
            store.read(|read| {
                let table = read.open_table(ITEMS)?;
                let start = if after.is_empty() {
                    Bound::Unbounded
                } else {
                    Bound::Excluded(after.as_str())
                };
                let mut items: Vec<StockItem> = Vec::with_capacity(size);
                let mut more = false;
                let mut fill = PageFill::new(size);
                for row in table.range::<&str>((start, Bound::Unbounded))? {
                    let (sku, bytes) = row?;
                    if !fill.admit(bytes.value().len()) {
                        more = true;
                        break;
                    }
                    items.push(decode_record(ITEMS_NAME, sku.value(), bytes.value())?);
                }
                let next_page_token = match (more, items.last()) {
                    (true, Some(last)) => last.sku.clone(),
                    _ => String::new(),
                };
                Ok::<_, StoreError>(ListStockResponse {
                    items,
                    next_page_token,
                })
            })
        })
        .await
}
