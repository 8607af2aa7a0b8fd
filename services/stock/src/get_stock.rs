//! `GetStock` and `ListStock`: read the catalog.

use std::ops::Bound;

use orderflow_proto::v1::{GetStockRequest, ListStockRequest, ListStockResponse, StockItem};
use orderflow_runtime::{FieldViolations, PageFill, Store, StoreError, decode_record, paging};
use prost::Message;
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

/// One page of every shard's items, in sku order, from `pages` (each shard's, or each replica's,
/// page after the same token). A page that stopped early ends at its token: nothing after the
/// lowest such token is known yet, so the merged page ends there at the latest.
pub(crate) fn merge_pages(pages: Vec<ListStockResponse>, size: usize) -> ListStockResponse {
    let known_up_to = pages
        .iter()
        .filter(|page| !page.next_page_token.is_empty())
        .map(|page| page.next_page_token.clone())
        .min();
    let mut items: Vec<StockItem> = pages
        .into_iter()
        .flat_map(|page| page.items)
        .filter(|item| known_up_to.as_ref().is_none_or(|last| item.sku <= *last))
        .collect();
    items.sort_by(|a, b| a.sku.cmp(&b.sku));
    let mut more = known_up_to.is_some();
    let mut fill = PageFill::new(size);
    let mut page = Vec::with_capacity(items.len().min(size));
    for item in items {
        if !fill.admit(item.encoded_len()) {
            more = true;
            break;
        }
        page.push(item);
    }
    let next_page_token = match (more, page.last()) {
        (true, Some(last)) => last.sku.clone(),
        _ => String::new(),
    };
    ListStockResponse {
        items: page,
        next_page_token,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn page(skus: &[&str], more: bool) -> ListStockResponse {
        ListStockResponse {
            items: skus
                .iter()
                .map(|sku| StockItem {
                    sku: (*sku).into(),
                    ..Default::default()
                })
                .collect(),
            next_page_token: if more {
                skus.last().unwrap().to_string()
            } else {
                String::new()
            },
        }
    }

    fn skus(page: &ListStockResponse) -> Vec<&str> {
        page.items.iter().map(|i| i.sku.as_str()).collect()
    }

    /// Shards' pages merge in sku order; a shard that has more bounds the page, so the next
    /// page misses nothing of it.
    #[test]
    fn pages_of_every_shard_merge_without_skipping_any_item() {
        let merged = merge_pages(vec![page(&["A", "D"], false), page(&["B", "C"], false)], 10);
        assert_eq!(skus(&merged), ["A", "B", "C", "D"]);
        assert!(merged.next_page_token.is_empty());

        let merged = merge_pages(vec![page(&["A", "E"], true), page(&["B", "F"], false)], 10);
        assert_eq!(skus(&merged), ["A", "B", "E"]);
        assert_eq!(merged.next_page_token, "E");

        let merged = merge_pages(vec![page(&["A", "D"], false), page(&["B", "C"], false)], 3);
        assert_eq!(skus(&merged), ["A", "B", "C"]);
        assert_eq!(merged.next_page_token, "C");
    }
}
