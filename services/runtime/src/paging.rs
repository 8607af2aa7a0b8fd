//! Paged list RPCs: validating `page_size` and `page_token`, filling a page by rows and bytes,
//! reading one page of a table keyed by a numeric id, and gathering one page from every partition
//! of a stage ([`PartitionedPage`], [`gather`]).
//!
//! A list over partitions walks them in order: partition 0's rows by id, then partition 1's, and
//! so on. Its page token names where the next page starts, `<partition>.<id>` (with one
//! partition, the plain id every earlier release handed out), so a page never skips a row
//! whichever replica answers it.

use orderflow_proto::v1::{
    DeadLetter, Invoice, ListDeadLettersRequest, ListDeadLettersResponse, ListInvoicesRequest,
    ListInvoicesResponse, ListNotificationsRequest, ListNotificationsResponse, Notification,
};
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

/// A validated page request over a stage's partitions: how many rows, and the partition and id the
/// page starts at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionedPage {
    pub size: usize,
    pub partition: u32,
    pub start: u64,
}

impl PartitionedPage {
    /// Parses `page_size` like [`NumericPage::parse`] and `page_token` as this stage hands it out
    /// with `count` partitions ([`partitioned_token`]).
    pub fn parse(page_size: u32, page_token: &str, count: u32) -> Result<Self, Status> {
        if count <= 1 {
            let page = NumericPage::parse(page_size, page_token)?;
            return Ok(PartitionedPage {
                size: page.size,
                partition: 0,
                start: page.start,
            });
        }
        let mut violations = FieldViolations::new();
        let size = page_size_or_default(page_size, &mut violations);
        let (partition, start) = if page_token.is_empty() {
            (0, 0)
        } else {
            let parsed = page_token
                .split_once('.')
                .and_then(|(p, s)| Some((p.parse::<u32>().ok()?, s.parse::<u64>().ok()?)))
                .filter(|(p, _)| *p < count);
            parsed.unwrap_or_else(|| {
                violations.add("page_token", "not a token returned by this server");
                (0, 0)
            })
        };
        violations.check()?;
        Ok(PartitionedPage {
            size,
            partition,
            start,
        })
    }

    /// The same page within its partition alone, `size` rows at most.
    pub fn within(self, size: usize) -> NumericPage {
        NumericPage {
            size,
            start: self.start,
        }
    }
}

/// The token of a page that starts at `start` in `partition` of `count`.
pub fn partitioned_token(count: u32, partition: u32, start: u64) -> String {
    if count <= 1 {
        start.to_string()
    } else {
        format!("{partition}.{start}")
    }
}

/// Fills `page` from partition `page.partition` up to (not including) `end`, asking `read` for
/// each partition's rows in turn: `read(partition, page within it)` answers rows and the id the
/// partition's next page starts at (`None` once it has no more). Answers the rows and the next
/// page's token (empty after the last partition's last row). A page stops early, at a partition's
/// start, once its rows' encoded bytes reach [`MAX_PAGE_BYTES`].
pub async fn gather<T: prost::Message, F>(
    page: PartitionedPage,
    count: u32,
    end: u32,
    mut read: impl FnMut(u32, NumericPage) -> F,
) -> Result<(Vec<T>, String), Status>
where
    F: std::future::Future<Output = Result<(Vec<T>, Option<u64>), Status>>,
{
    let mut rows: Vec<T> = Vec::new();
    let mut bytes = 0usize;
    let mut partition = page.partition;
    let mut start = page.start;
    while partition < end.min(count.max(1)) {
        if rows.len() >= page.size || bytes >= MAX_PAGE_BYTES {
            return Ok((rows, partitioned_token(count, partition, start)));
        }
        let wanted = page.size - rows.len();
        let (mut found, next) = read(
            partition,
            NumericPage {
                size: wanted,
                start,
            },
        )
        .await?;
        found.truncate(wanted);
        bytes = found
            .iter()
            .fold(bytes, |sum, row| sum.saturating_add(row.encoded_len()));
        rows.append(&mut found);
        match next {
            Some(next) => return Ok((rows, partitioned_token(count, partition, next))),
            None => {
                partition += 1;
                start = 0;
            }
        }
    }
    Ok((rows, String::new()))
}

/// A paged list RPC's request, as [`crate::Partitions::gather`] asks each partition's replica for
/// its part of a page, and the response it answers.
pub trait PagedList: Clone + Send + Sync + 'static {
    type Row: prost::Message + Send + 'static;
    type Response: Send + 'static;
    fn page_size(&self) -> u32;
    fn page_token(&self) -> &str;
    /// The same request for `page_size` rows from `page_token`.
    fn at(&self, page_size: u32, page_token: String) -> Self;
    /// A response's rows and next page token.
    fn rows(response: Self::Response) -> (Vec<Self::Row>, String);
    fn response(rows: Vec<Self::Row>, next_page_token: String) -> Self::Response;
}

/// [`PagedList`] for a request with `page_size` and `page_token` whose response has the rows in
/// the field `$rows` and a `next_page_token`.
macro_rules! paged_list {
    ($request:ident, $response:ident, $row:ident, $rows:ident) => {
        impl PagedList for $request {
            type Row = $row;
            type Response = $response;
            fn page_size(&self) -> u32 {
                self.page_size
            }
            fn page_token(&self) -> &str {
                &self.page_token
            }
            fn at(&self, page_size: u32, page_token: String) -> Self {
                let mut request = self.clone();
                request.page_size = page_size;
                request.page_token = page_token;
                request
            }
            fn rows(response: $response) -> (Vec<$row>, String) {
                (response.$rows, response.next_page_token)
            }
            fn response(rows: Vec<$row>, next_page_token: String) -> $response {
                $response {
                    $rows: rows,
                    next_page_token,
                }
            }
        }
    };
}

paged_list!(ListInvoicesRequest, ListInvoicesResponse, Invoice, invoices);
paged_list!(
    ListDeadLettersRequest,
    ListDeadLettersResponse,
    DeadLetter,
    dead_letters
);
paged_list!(
    ListNotificationsRequest,
    ListNotificationsResponse,
    Notification,
    notifications
);

/// The id a page token from [`read_numeric_page`] names: `None` for the empty one (no more rows).
pub fn next_start(token: &str) -> Result<Option<u64>, Status> {
    if token.is_empty() {
        return Ok(None);
    }
    token
        .parse()
        .map(Some)
        .map_err(|_| Status::internal(format!("a page token {token:?} that is not an id")))
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
    fn partitioned_pages_parse_their_own_tokens_only() {
        let page = PartitionedPage::parse(0, "42", 1).unwrap();
        assert_eq!((page.partition, page.start, page.size), (0, 42, 100));
        let page = PartitionedPage::parse(7, "3.42", 4).unwrap();
        assert_eq!((page.partition, page.start, page.size), (3, 42, 7));
        assert_eq!(partitioned_token(4, 3, 42), "3.42");
        assert_eq!(partitioned_token(1, 0, 42), "42");
        for token in ["42", "4.1", "x.1", "1.x", "1."] {
            let status = PartitionedPage::parse(0, token, 4).unwrap_err();
            assert_eq!(status.code(), Code::InvalidArgument, "{token}");
        }
    }

    /// Partition p holds ids 1..=rows[p], each row its own (partition, id).
    async fn gathered(rows: &[u64], size: u32, token: &str) -> (Vec<(u32, u64)>, String) {
        let count = rows.len() as u32;
        let page = PartitionedPage::parse(size, token, count).unwrap();
        let (found, next) = gather(page, count, count, |p, page: NumericPage| {
            let last = rows[p as usize];
            let ids: Vec<u64> = (page.start.max(1)..=last).take(page.size).collect();
            let next = ids.last().map(|id| id + 1).filter(|id| *id <= last);
            let found = ids.into_iter().map(|id| u64::from(p) << 32 | id).collect();
            std::future::ready(Ok((found, next)))
        })
        .await
        .unwrap();
        let found = found
            .into_iter()
            .map(|v: u64| ((v >> 32) as u32, v & 0xffff_ffff))
            .collect();
        (found, next)
    }

    #[tokio::test]
    async fn a_gathered_list_walks_every_partition_in_order_without_a_gap() {
        for size in [1, 2, 3, 5, 100] {
            let rows = [3, 0, 2, 4];
            let mut all = Vec::new();
            let mut token = String::new();
            loop {
                let (page, next) = gathered(&rows, size, &token).await;
                assert!(page.len() <= size as usize);
                all.extend(page);
                if next.is_empty() {
                    break;
                }
                token = next;
            }
            let expected: Vec<(u32, u64)> = rows
                .iter()
                .enumerate()
                .flat_map(|(p, n)| (1..=*n).map(move |id| (p as u32, id)))
                .collect();
            assert_eq!(all, expected, "page size {size}");
        }
        let (page, next) = gathered(&[2], 5, "").await;
        assert_eq!((page.len(), next.as_str()), (2, ""));
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
