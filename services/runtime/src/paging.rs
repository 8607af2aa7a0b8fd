//! Paged list RPCs: validating `page_size` and `page_token`, filling a page by rows and bytes, and
//! reading one page of a table keyed by a numeric id.

use tonic::Status;

use crate::{status::FieldViolations, store::StoreError};

/// Default and upper bound of `page_size` in every paged list RPC.
pub const DEFAULT_PAGE_SIZE: u32 = 100;
pub const MAX_PAGE_SIZE: u32 = 1000;

/// Encoded bytes of one page at most (a single larger row still goes alone): far below gRPC's
/// default 4 MiB message limit, so any client can read any page.
pub const MAX_PAGE_BYTES: usize = 1024 * 1024;

/// Decides, row by row, whether a page being filled has room: at most `max_rows` rows and
/// [`MAX_PAGE_BYTES`] encoded bytes, but always at least one row.
#[derive(Debug)]
pub struct PageFill {
    max_rows: usize,
    rows: usize,
    bytes: usize,
}

impl PageFill {
    pub fn new(max_rows: usize) -> Self {
        PageFill {
            max_rows,
            rows: 0,
            bytes: 0,
        }
    }

    /// Whether a row of `bytes` encoded bytes still fits; counts it if so.
    pub fn admit(&mut self, bytes: usize) -> bool {
        let full = self.rows == self.max_rows
            || (self.rows > 0 && self.bytes.saturating_add(bytes) > MAX_PAGE_BYTES);
        if full {
            return false;
        }
        self.rows += 1;
        self.bytes = self.bytes.saturating_add(bytes);
        true
    }
}

/// A validated page request over a numeric key: how many rows and the first key to return.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NumericPage {
    pub size: usize,
    pub start: u64,
}

impl NumericPage {
    /// Parses `page_size` (0 = default; above the maximum = INVALID_ARGUMENT) and `page_token` (empty or
    /// a token this server handed out).
    pub fn parse(page_size: u32, page_token: &str) -> Result<Self, Status> {
        let mut violations = FieldViolations::new();
        let size = page_size_or_default(page_size, &mut violations);
        let start = if page_token.is_empty() {
            0
        } else {
            match page_token.parse::<u64>() {
                Ok(start) => start,
                Err(_) => {
                    violations.add("page_token", "not a token returned by this server");
                    0
                }
            }
        };
        violations.check()?;
        Ok(NumericPage { size, start })
    }
}

/// One page of a table keyed by a `u64` id holding encoded `M`s: rows from `page.start`, as many as
/// fit ([`PageFill`]), and the token of the next page (empty after the last).
pub fn read_numeric_page<M: prost::Message + Default>(
    read: &redb::ReadTransaction,
    table: redb::TableDefinition<u64, &[u8]>,
    name: &'static str,
    page: NumericPage,
) -> Result<(Vec<M>, String), StoreError> {
    let table = read.open_table(table)?;
    let mut rows = Vec::with_capacity(page.size.min(1024));
    let mut fill = PageFill::new(page.size);
    for row in redb::ReadableTable::range(&table, page.start..)? {
        let (id, bytes) = row?;
        if !fill.admit(bytes.value().len()) {
            return Ok((rows, id.value().to_string()));
        }
        rows.push(crate::store::decode_record(
            name,
            id.value(),
            bytes.value(),
        )?);
    }
    Ok((rows, String::new()))
}

/// `page_size` as a row count, recording a violation when it is over [`MAX_PAGE_SIZE`].
pub fn page_size_or_default(page_size: u32, violations: &mut FieldViolations) -> usize {
    match page_size {
        0 => DEFAULT_PAGE_SIZE as usize,
        n if n > MAX_PAGE_SIZE => {
            violations.add("page_size", format!("must be at most {MAX_PAGE_SIZE}"));
            0
        }
        n => n as usize,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use tonic::Code;

    use super::*;

    #[test]
    fn pages_fill_by_rows_and_bytes() {
        let mut fill = PageFill::new(3);
        assert!(fill.admit(10) && fill.admit(10) && fill.admit(10));
        assert!(!fill.admit(10));
        let mut fill = PageFill::new(100);
        assert!(fill.admit(MAX_PAGE_BYTES * 2), "a first row always fits");
        assert!(!fill.admit(1));
        let mut fill = PageFill::new(100);
        assert!(fill.admit(MAX_PAGE_BYTES - 10));
        assert!(!fill.admit(11));
        assert!(fill.admit(10));
    }

    #[test]
    fn pages_parse_or_name_the_field() {
        assert_eq!(
            NumericPage::parse(0, "").unwrap(),
            NumericPage {
                size: 100,
                start: 0
            }
        );
        assert_eq!(NumericPage::parse(5, "42").unwrap().start, 42);
        for (size, token) in [(1001, ""), (1, "x")] {
            let status = NumericPage::parse(size, token).unwrap_err();
            assert_eq!(status.code(), Code::InvalidArgument);
        }
    }
}
