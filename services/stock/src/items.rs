//! The `items` table — sku → encoded `StockItem` — and what makes an item valid.

use orderflow_proto::{
    money::is_currency_code,
    v1::{ReservedLine, StockItem},
};
use orderflow_runtime::{FieldViolations, StoreError, decode_record};
use prost::Message;
use redb::{ReadableTable, Table, TableDefinition};

pub(crate) const ITEMS: TableDefinition<&str, &[u8]> = TableDefinition::new("items");
pub(crate) const ITEMS_NAME: &str = "items";

/// Highest unit price in minor units (10^12: ten billion in a two-decimal currency). With at most
/// 100 lines of 10,000 units, any order total stays far inside `i64`.
pub const MAX_UNIT_PRICE_MINOR: i64 = 1_000_000_000_000;
/// Highest quantity on hand of one item.
pub const MAX_AVAILABLE: u64 = 1_000_000_000_000;
/// Longest item name, in characters.
pub const MAX_NAME_CHARS: usize = 200;
/// Longest sku, in characters (the receiver accepts no longer).
pub const MAX_SKU_CHARS: usize = 64;

/// Reads the item `sku` from `items`.
pub(crate) fn get(
    items: &impl ReadableTable<&'static str, &'static [u8]>,
    sku: &str,
) -> Result<Option<StockItem>, StoreError> {
    match items.get(sku)? {
        None => Ok(None),
        Some(bytes) => decode_record(ITEMS_NAME, sku, bytes.value()).map(Some),
    }
}

/// Writes `item` under its sku.
pub(crate) fn put(
    items: &mut Table<&'static str, &'static [u8]>,
    item: &StockItem,
) -> Result<(), StoreError> {
    items.insert(item.sku.as_str(), item.encode_to_vec().as_slice())?;
    Ok(())
}

/// Gives `lines` back: each line's quantity returns from `reserved` to `available`. A line whose
/// item is gone from the catalog is skipped with a warning.
pub(crate) fn give_back(
    items: &mut Table<&'static str, &'static [u8]>,
    order_id: &str,
    lines: &[ReservedLine],
) -> Result<(), StoreError> {
    for line in lines {
        let Some(mut item) = get(items, &line.sku)? else {
            tracing::warn!(order_id = %order_id, sku = %line.sku, "released line has no catalog item; skipped");
            continue;
        };
        let quantity = u64::from(line.quantity);
        item.available = item.available.saturating_add(quantity);
        item.reserved = item.reserved.saturating_sub(quantity);
        put(items, &item)?;
    }
    Ok(())
}

/// Checks a sku, recording violations under `field`.
pub(crate) fn check_sku(sku: &str, field: &str, violations: &mut FieldViolations) {
    violations.check_identifier(field, sku, MAX_SKU_CHARS);
}

/// Checks the parts of an item a caller supplies, under field names prefixed with `prefix`.
pub(crate) fn check_item_fields(
    prefix: &str,
    name: &str,
    price: Option<(i64, &str)>,
    available: Option<u64>,
    violations: &mut FieldViolations,
) {
    if name.chars().count() > MAX_NAME_CHARS {
        violations.add(
            format!("{prefix}name"),
            format!("must be at most {MAX_NAME_CHARS} characters"),
        );
    } else if name.chars().any(char::is_control) {
        violations.add(
            format!("{prefix}name"),
            "must not contain control characters",
        );
    }
    if let Some((amount, currency)) = price {
        if !(0..=MAX_UNIT_PRICE_MINOR).contains(&amount) {
            violations.add(
                format!("{prefix}unit_price.amount_minor"),
                format!("must be 0 to {MAX_UNIT_PRICE_MINOR}"),
            );
        }
        if !is_currency_code(currency) {
            violations.add(
                format!("{prefix}unit_price.currency"),
                "must be an ISO 4217 code such as EUR",
            );
        }
    }
    if available.is_some_and(|a| a > MAX_AVAILABLE) {
        violations.add(
            format!("{prefix}available"),
            format!("must be at most {MAX_AVAILABLE}"),
        );
    }
}
