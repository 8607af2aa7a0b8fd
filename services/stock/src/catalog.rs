//! Initial catalogs: a TOML or JSON file, or the built-in demo catalog, and seeding the store from one.
//!
//! ```toml
//! [[items]]
//! sku = "KB-01"
//! name = "Mechanical keyboard"
//! unit_price_minor = 8900
//! currency = "EUR"
//! available = 500
//! ```
//! The JSON form is `{"items": [{"sku": …, …}]}` with the same fields.

use std::path::Path;

use orderflow_proto::v1::{Money, StockItem};
use orderflow_runtime::{FieldViolations, Store, StoreError};
use serde::Deserialize;

use crate::{CatalogSource, items};

/// One catalog item as a file describes it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogEntry {
    pub sku: String,
    pub name: String,
    pub unit_price_minor: i64,
    pub currency: String,
    pub available: u64,
}

impl CatalogEntry {
    pub(crate) fn to_item(&self) -> StockItem {
        StockItem {
            sku: self.sku.clone(),
            name: self.name.clone(),
            unit_price: Some(Money::new(self.unit_price_minor, self.currency.clone())),
            available: self.available,
            reserved: 0,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CatalogFile {
    items: Vec<CatalogEntry>,
}

/// The demo catalog: everyday items, one that runs out after a few orders (`LAMP-05`) and one that is
/// out of stock from the start (`GPU-06`).
pub fn demo_catalog() -> Vec<CatalogEntry> {
    let entry = |sku: &str, name: &str, price: i64, available: u64| CatalogEntry {
        sku: sku.into(),
        name: name.into(),
        unit_price_minor: price,
        currency: "EUR".into(),
        available,
    };
    vec![
        // Plentiful, so that `orderflow load` against the demo catalog measures the whole path
        // rather than out-of-stock rejections.
        entry("KB-01", "Mechanical keyboard", 8900, 1_000_000),
        entry("MOUSE-02", "Wireless mouse", 2450, 1_000_000),
        entry("HEAD-03", "Studio headphones", 12900, 1_000_000),
        entry("CABLE-04", "USB-C cable", 990, 1_000_000),
        entry("LAMP-05", "Limited-edition desk lamp", 5900, 12),
        entry("GPU-06", "Graphics card", 69900, 0),
    ]
}

/// The entries of `source`, validated. The error names the flag, the env var and every bad field.
pub(crate) fn load(source: &CatalogSource) -> Result<Vec<CatalogEntry>, String> {
    let entries = match source {
        CatalogSource::Demo => demo_catalog(),
        CatalogSource::None => Vec::new(),
        CatalogSource::File(path) => read_file(path).map_err(|e| {
            format!(
                "cannot load --catalog / ORDERFLOW_CATALOG {}: {e}",
                path.display()
            )
        })?,
    };
    let mut violations = FieldViolations::new();
    let mut problems = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (i, entry) in entries.iter().enumerate() {
        let prefix = format!("items[{i}].");
        items::check_sku(&entry.sku, &format!("{prefix}sku"), &mut violations);
        if !seen.insert(entry.sku.as_str()) {
            problems.push(format!("{prefix}sku: {} appears twice", entry.sku));
        }
        if entry.name.trim().is_empty() {
            problems.push(format!("{prefix}name: required"));
        }
        items::check_item_fields(
            &prefix,
            &entry.name,
            Some((entry.unit_price_minor, &entry.currency)),
            Some(entry.available),
            &mut violations,
        );
    }
    if let Err(status) = violations.check() {
        problems.push(
            status
                .message()
                .trim_start_matches("invalid request: ")
                .to_owned(),
        );
    }
    if problems.is_empty() {
        Ok(entries)
    } else {
        Err(format!(
            "invalid catalog (--catalog / ORDERFLOW_CATALOG): {}",
            problems.join("; ")
        ))
    }
}

fn read_file(path: &Path) -> Result<Vec<CatalogEntry>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let is_json = path
        .extension()
        .is_some_and(|ext| ext.eq_ignore_ascii_case("json"));
    let file: CatalogFile = if is_json {
        serde_json::from_str(&text).map_err(|e| e.to_string())?
    } else {
        toml::from_str(&text).map_err(|e| e.to_string())?
    };
    Ok(file.items)
}

/// Adds every catalog entry whose sku is not in the store yet; existing items keep their state.
/// Returns how many were added.
pub(crate) fn seed(store: &Store, entries: &[CatalogEntry]) -> Result<usize, StoreError> {
    store.write(|txn| {
        let mut items = txn.redb().open_table(items::ITEMS)?;
        let mut added = 0;
        for entry in entries {
            if items::get(&items, &entry.sku)?.is_none() {
                items::put(&mut items, &entry.to_item())?;
                added += 1;
            }
        }
        Ok(added)
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn reads_toml_and_json_alike() {
        let dir = tempfile::tempdir().unwrap();
        let toml_path = dir.path().join("c.toml");
        std::fs::write(
            &toml_path,
            "[[items]]\nsku = \"A\"\nname = \"Apple\"\nunit_price_minor = 120\ncurrency = \"EUR\"\navailable = 5\n",
        )
        .unwrap();
        let json_path = dir.path().join("c.json");
        std::fs::write(
            &json_path,
            r#"{"items":[{"sku":"A","name":"Apple","unit_price_minor":120,"currency":"EUR","available":5}]}"#,
        )
        .unwrap();
        let a = load(&CatalogSource::File(toml_path)).unwrap();
        let b = load(&CatalogSource::File(json_path)).unwrap();
        assert_eq!(a, b);
        assert_eq!(a[0].available, 5);
    }

    #[test]
    fn bad_catalogs_name_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "[[items]]\nsku = \"A\"\nname = \"\"\nunit_price_minor = -1\ncurrency = \"eur\"\navailable = 5\n",
        )
        .unwrap();
        let err = load(&CatalogSource::File(path)).unwrap_err();
        for needle in [
            "ORDERFLOW_CATALOG",
            "items[0].name",
            "items[0].unit_price.amount_minor",
            "items[0].unit_price.currency",
        ] {
            assert!(err.contains(needle), "{err} lacks {needle}");
        }
        let missing = load(&CatalogSource::File(dir.path().join("nope.toml"))).unwrap_err();
        assert!(missing.contains("--catalog"), "{missing}");
    }

    #[test]
    fn demo_catalog_is_valid_and_has_a_sold_out_item() {
        let items = load(&CatalogSource::Demo).unwrap();
        assert!(items.iter().any(|i| i.available == 0));
    }
}
