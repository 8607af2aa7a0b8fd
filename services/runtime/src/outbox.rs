//! The log half of a stage's store: its **outbox** of events, in dense offsets, and the consumers
//! it is kept for.
//!
//! Tables owned by this module (in the stage's one redb file, next to the stage's own tables):
//!
//! | table       | key                  | value                   | meaning                                   |
//! |-------------|----------------------|-------------------------|-------------------------------------------|
//! | `outbox`    | `u64` offset         | encoded [`Event`]       | the stage's output log, dense offsets      |
//! | `consumers` | `&str` consumer name | `u64` acked offset      | downstream positions, for retention        |
//!
//! plus, in the store's `meta` table, `outbox.first` (the first offset retention kept) and
//! `outbox.log_id`: a random id drawn when the store is created (or first opened by a version that
//! knew ids), which `Head` reports so that a consumer can tell this log from one that replaced it at
//! the same address.
//!
//! Appends happen inside a store transaction ([`Txn::append`](crate::Txn::append)): an event is in
//! the outbox exactly when the state change that produced it is in the stage's tables. Everything
//! else about the log — reading it for `Subscribe`, acknowledgements, the consumers it is kept for,
//! trimming — is [`Outbox`]'s, reached with [`Store::outbox`].
//!
//! # Invariants
//! 1. **Dense offsets.** The log holds exactly `[first_offset, next_offset)`. Appends take the offsets
//!    that follow the last committed one; the store serialises writers until the new head is
//!    published, so two writers can never pick the same offset.
//! 2. **Publish after commit.** Subscribers are woken through a `watch` channel only after the commit
//!    returned, so nothing that could still be rolled back is ever streamed.
//! 3. **Retention only moves `first_offset` forward** ([`Outbox::trim`]), in the same transaction
//!    that deletes the entries; a reader asking for an offset below it gets
//!    [`StoreError::Truncated`].
//! 4. **Only what was sent can be acknowledged**, and only by a consumer the log is kept for, so no
//!    caller can make retention delete what a consumer has not received.
//!
//! The newest committed entries (up to 8,192, about 4 MiB) are also kept in memory, so that a
//! subscriber keeping up is served without a read transaction ([`Outbox::scan_recent`]): filled
//! after each commit and before the new head is published, cut by retention, emptied when the
//! database is opened again.
//!
//! `next_offset` is recomputed on open from the last key of `outbox` (or `outbox.first` when
//! retention emptied the log), so no in-memory state needs to survive a crash.
//!
//! [`Event`]: orderflow_proto::v1::Event

use std::{
    collections::{BTreeMap, VecDeque},
    sync::{
        Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
};

use orderflow_proto::{stored::StoredLogEntry, v1::Event};
use redb::{
    Durability, ReadTransaction, ReadableTable, ReadableTableMetadata, TableDefinition,
    WriteTransaction,
};
use tokio::sync::watch;

use crate::{
    filter::EventFilter,
    store::{META, Store, StoreError, decode_record},
};

const OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");
const CONSUMERS: TableDefinition<&str, u64> = TableDefinition::new("consumers");
/// The `meta` key holding the first offset retention kept.
const FIRST_OFFSET_KEY: &str = "outbox.first";
/// The `meta` key holding the log's id.
pub(crate) const LOG_ID_KEY: &str = "outbox.log_id";

/// The outbox of one store: cheap to clone. Blocking: call it from `spawn_blocking`, except where a
/// method says it is cheap.
#[derive(Clone)]
pub struct Outbox {
    store: Store,
}

/// What the store keeps in memory about its log, refreshed whenever the database is opened.
pub(crate) struct LogState {
    /// `next_offset` of the outbox, published after every commit that appended.
    head: watch::Sender<u64>,
    /// Lowest offset any registered consumer has acknowledged; `u64::MAX` while none has.
    acked_floor: AtomicU64,
    /// The log's id (never 0).
    log_id: AtomicU64,
    /// Every consumer the log is kept for, with how far it has acknowledged and how far its
    /// subscriptions have been sent the log without a gap.
    consumers: Mutex<BTreeMap<String, Reach>>,
    /// The newest committed entries, as stored: a subscriber that keeps up is served from here
    /// without a read transaction on a blocking thread.
    recent: Mutex<Recent>,
}

/// The log's newest committed entries, contiguous in offset order, at most [`RECENT_MAX_ENTRIES`]
/// and about [`RECENT_MAX_BYTES`]. Filled by the writer after each commit that appended, before the
/// new head is published; cut by retention and emptied when the database is opened again, so it
/// never holds an entry the outbox table does not.
#[derive(Default)]
struct Recent {
    entries: VecDeque<StoredLogEntry>,
    bytes: usize,
}

/// Entries the tail of the log keeps in memory at most: 16 commits of 512, a tenth of a second of
/// a notifier catching up at 80,000 events/s. With 2,048 a subscriber on a busy machine fell
/// behind it and read the store (BENCHMARKS.md, "2026-12-03, night").
const RECENT_MAX_ENTRIES: usize = 8192;
/// Encoded bytes the tail of the log keeps in memory, about (the newest entry is always kept).
const RECENT_MAX_BYTES: usize = 4 << 20;

impl Recent {
    /// Adds what one commit appended (offsets dense, following the tail), then drops the oldest
    /// entries beyond the bounds.
    fn extend(&mut self, appended: Vec<(u64, Vec<u8>)>) {
        for (offset, event) in appended {
            if self
                .entries
                .back()
                .is_some_and(|last| last.offset + 1 != offset)
            {
                // Not contiguous (cannot happen while writers are serial): start again from here.
                self.clear();
            }
            self.bytes += event.len();
            self.entries.push_back(StoredLogEntry { offset, event });
        }
        while self.entries.len() > RECENT_MAX_ENTRIES
            || (self.bytes > RECENT_MAX_BYTES && self.entries.len() > 1)
        {
            self.pop_front();
        }
    }

    fn pop_front(&mut self) {
        if let Some(entry) = self.entries.pop_front() {
            self.bytes -= entry.event.len();
        }
    }

    /// Drops the entries below `first`: retention deleted them.
    fn cut(&mut self, first: u64) {
        while self.entries.front().is_some_and(|e| e.offset < first) {
            self.pop_front();
        }
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }

    /// Entries from `from` as [`Outbox::scan_log`] gives them, if the tail holds `from` and
    /// entries after it.
    fn scan(
        &self,
        from: u64,
        max: usize,
        max_bytes: usize,
        filter: Option<&EventFilter>,
    ) -> Option<Scan> {
        let first = self.entries.front()?.offset;
        let skip = usize::try_from(from.checked_sub(first)?).ok()?;
        if skip >= self.entries.len() || max == 0 {
            return None;
        }
        let mut scan = Scan::new(from, filter, max.min(self.entries.len() - skip));
        for entry in self.entries.range(skip..).take(max) {
            if !scan.add(entry.offset, &entry.event, max_bytes, filter) {
                break;
            }
        }
        Some(scan)
    }
}

/// What one read of the log found: the entries its filter kept, and where the next read starts.
#[derive(Debug, PartialEq)]
pub struct Scan {
    pub entries: Vec<StoredLogEntry>,
    /// One past the last entry read, kept or not.
    pub end: u64,
    size: usize,
}

impl Scan {
    fn new(from: u64, filter: Option<&EventFilter>, max: usize) -> Self {
        // Unfiltered, every entry read is kept.
        let capacity = if filter.is_none() { max } else { 0 };
        Scan {
            entries: Vec::with_capacity(capacity),
            end: from,
            size: 0,
        }
    }

    /// Reads the entry at `offset`: keeps it if `filter` does, unless its bytes would take the
    /// kept ones past `max_bytes` (the first one kept is always kept). Whether to read on.
    fn add(
        &mut self,
        offset: u64,
        event: &[u8],
        max_bytes: usize,
        filter: Option<&EventFilter>,
    ) -> bool {
        if filter.is_none_or(|filter| filter.keeps(event)) {
            self.size = self.size.saturating_add(event.len());
            if self.size > max_bytes && !self.entries.is_empty() {
                return false;
            }
            self.entries.push(StoredLogEntry {
                offset,
                event: event.to_vec(),
            });
        }
        self.end = offset + 1;
        true
    }
}

/// One consumer's position: acknowledged (durable) and sent (in memory; starts at acknowledged).
#[derive(Debug, Clone, Copy)]
struct Reach {
    acked: u64,
    sent: u64,
}

/// The log as read from a database just opened.
pub(crate) struct Loaded {
    pub(crate) first: u64,
    pub(crate) next: u64,
    log_id: u64,
    acked_floor: u64,
    consumers: BTreeMap<String, Reach>,
}

/// Whether the outbox holds no entry and never held one: a store just created.
pub(crate) fn is_empty(txn: &WriteTransaction) -> Result<bool, StoreError> {
    Ok(txn.open_table(OUTBOX)?.is_empty()?)
}

/// Creates the log's tables in a new database (a no-op for an existing one).
pub(crate) fn create_tables(txn: &WriteTransaction) -> Result<(), StoreError> {
    txn.open_table(OUTBOX)?;
    txn.open_table(CONSUMERS)?;
    Ok(())
}

/// Draws the log's id if it has none yet: a new store, or one made before logs had ids.
pub(crate) fn claim_id(txn: &WriteTransaction) -> Result<(), StoreError> {
    let mut meta = txn.open_table(META)?;
    if meta.get(LOG_ID_KEY)?.is_none() {
        meta.insert(LOG_ID_KEY, rand::random::<u64>().max(1))?;
    }
    Ok(())
}

/// Reads what [`LogState`] keeps from a database just opened.
pub(crate) fn load(read: &ReadTransaction) -> Result<Loaded, StoreError> {
    let (first, next) = log_bounds(read)?;
    let log_id = read
        .open_table(META)?
        .get(LOG_ID_KEY)?
        .map_or(0, |v| v.value());
    let table = read.open_table(CONSUMERS)?;
    let acked_floor = acked_floor(&table)?;
    let mut consumers = BTreeMap::new();
    for row in table.iter()? {
        let (name, acked) = row?;
        let acked = acked.value();
        consumers.insert(name.value().to_owned(), Reach { acked, sent: acked });
    }
    Ok(Loaded {
        first,
        next,
        log_id,
        acked_floor,
        consumers,
    })
}

/// Writes a transaction's appended entries, in offset order, into the outbox.
pub(crate) fn write_appended(
    txn: &WriteTransaction,
    appended: &[(u64, Vec<u8>)],
) -> Result<(), StoreError> {
    let mut outbox = txn.open_table(OUTBOX)?;
    for (offset, bytes) in appended {
        outbox.insert(*offset, bytes.as_slice())?;
    }
    Ok(())
}

impl LogState {
    pub(crate) fn new(loaded: Loaded) -> Self {
        LogState {
            head: watch::Sender::new(loaded.next),
            acked_floor: AtomicU64::new(loaded.acked_floor),
            log_id: AtomicU64::new(loaded.log_id),
            consumers: Mutex::new(loaded.consumers),
            recent: Mutex::new(Recent::default()),
        }
    }

    /// Keeps what a commit appended for the subscribers to be served from memory. Called by the
    /// writer after the commit and before [`LogState::publish`].
    pub(crate) fn remember(&self, appended: Vec<(u64, Vec<u8>)>) {
        if let Ok(mut recent) = self.recent.lock() {
            recent.extend(appended);
        }
    }

    /// Takes the positions of a database opened again: acknowledgements as stored, and what each
    /// consumer was sent as far as this process knows (never behind what it acknowledged).
    pub(crate) fn reload(&self, loaded: Loaded) {
        if let Ok(mut consumers) = self.consumers.lock() {
            for (name, reach) in loaded.consumers {
                let sent = consumers
                    .get(&name)
                    .map_or(reach.sent, |r| r.sent.max(reach.acked));
                consumers.insert(
                    name,
                    Reach {
                        acked: reach.acked,
                        sent,
                    },
                );
            }
        }
        self.acked_floor
            .store(loaded.acked_floor, Ordering::Relaxed);
        self.log_id.store(loaded.log_id, Ordering::Relaxed);
        // What the database holds now is the truth: nothing is served from before it was opened.
        if let Ok(mut recent) = self.recent.lock() {
            recent.clear();
        }
        self.publish(loaded.next);
    }

    /// The offset the next appended entry gets.
    pub(crate) fn next_offset(&self) -> u64 {
        *self.head.borrow()
    }

    /// Wakes subscribers: every entry below `next` is committed.
    pub(crate) fn publish(&self, next: u64) {
        self.head.send_if_modified(|head| {
            let changed = *head != next;
            *head = next;
            changed
        });
    }
}

impl Store {
    /// This store's outbox.
    pub fn outbox(&self) -> Outbox {
        Outbox {
            store: self.clone(),
        }
    }
}

impl Outbox {
    fn state(&self) -> &LogState {
        self.store.log_state()
    }

    /// The partition of the log this outbox is. Cheap.
    pub fn partition(&self) -> crate::partition::Partition {
        self.store.partition()
    }

    /// The offset the next appended entry gets. Cheap.
    pub fn next_offset(&self) -> u64 {
        self.state().next_offset()
    }

    /// The log's id, drawn when its store was created. Cheap.
    pub fn log_id(&self) -> u64 {
        self.state().log_id.load(Ordering::Relaxed)
    }

    /// How far `consumer` has acknowledged, if the log is kept for it. Cheap.
    pub fn acked(&self, consumer: &str) -> Result<Option<u64>, StoreError> {
        Ok(self.consumers()?.get(consumer).map(|reach| reach.acked))
    }

    /// `(first_offset, next_offset)` as committed.
    pub fn bounds(&self) -> Result<(u64, u64), StoreError> {
        self.store.observe(self.store.read(log_bounds))
    }

    /// A receiver that sees `next_offset` change after every committed append.
    pub fn watch_head(&self) -> watch::Receiver<u64> {
        self.state().head.subscribe()
    }

    /// Entries from `from` in offset order, each event as stored (encoded, for `Subscribe` to send
    /// as it is): at most `max` of them, and no more once their encoded size reaches `max_bytes` (but
    /// always at least one, whatever its size). `from == next_offset` gives an empty batch.
    pub fn read_log(
        &self,
        from: u64,
        max: usize,
        max_bytes: usize,
    ) -> Result<Vec<StoredLogEntry>, StoreError> {
        Ok(self.scan_log(from, max, max_bytes, None)?.entries)
    }

    /// [`Outbox::read_log`] through `filter`: reads at most `max` entries and keeps those the
    /// filter keeps, within `max_bytes`.
    pub fn scan_log(
        &self,
        from: u64,
        max: usize,
        max_bytes: usize,
        filter: Option<&EventFilter>,
    ) -> Result<Scan, StoreError> {
        self.store.read(|read| {
            let (first, next) = log_bounds(read)?;
            if from < first {
                return Err(StoreError::Truncated {
                    requested: from,
                    first,
                });
            }
            if from > next {
                return Err(StoreError::BeyondHead {
                    requested: from,
                    head: next,
                });
            }
            let outbox = read.open_table(OUTBOX)?;
            let mut scan = Scan::new(from, filter, max.min((next - from) as usize));
            for row in outbox.range(from..)?.take(max) {
                let (offset, bytes) = row?;
                if !scan.add(offset.value(), bytes.value(), max_bytes, filter) {
                    break;
                }
            }
            Ok(scan)
        })
    }

    /// [`Outbox::scan_log`] from memory, when `from` is among the newest committed entries (a
    /// subscriber keeping up); `None` otherwise, and then `scan_log` answers. Cheap.
    pub fn scan_recent(
        &self,
        from: u64,
        max: usize,
        max_bytes: usize,
        filter: Option<&EventFilter>,
    ) -> Option<Scan> {
        self.state()
            .recent
            .lock()
            .ok()?
            .scan(from, max, max_bytes, filter)
    }

    /// Up to `max` events from `from` on, decoded: what the stage has announced, for tools and
    /// tests that read it (the `EventLog` serves entries as stored, see [`Outbox::read_log`]).
    pub fn events(&self, from: u64, max: usize) -> Result<Vec<Event>, StoreError> {
        self.read_log(from, max, usize::MAX)?
            .into_iter()
            .map(|entry| decode_record("outbox", entry.offset, &entry.event))
            .collect()
    }

    /// Records that `consumer` has processed every entry below `offset`. Positions never move back.
    /// Refused when the log is not kept for `consumer` ([`StoreError::UnknownConsumer`]) or when its
    /// subscriptions were not sent every entry below `offset` ([`StoreError::NotSent`]): only what a
    /// consumer really received can be deleted for it. Not fsynced on its own: losing an ack in a
    /// crash only makes retention keep more.
    pub fn ack(&self, consumer: &str, offset: u64) -> Result<(), StoreError> {
        {
            let consumers = self.consumers()?;
            let Some(reach) = consumers.get(consumer) else {
                return Err(unknown_consumer(consumer, &consumers));
            };
            if offset <= reach.acked {
                return Ok(());
            }
            if offset > reach.sent {
                return Err(StoreError::NotSent {
                    consumer: consumer.to_owned(),
                    offset,
                    sent: reach.sent,
                });
            }
        }
        let floor = self.store.write_with(Durability::None, |txn| {
            let mut consumers = txn.redb().open_table(CONSUMERS)?;
            let current = consumers.get(consumer)?.map(|v| v.value());
            if current.is_some_and(|current| offset > current) {
                consumers.insert(consumer, offset)?;
            }
            acked_floor(&consumers)
        })?;
        if let Some(reach) = self.consumers()?.get_mut(consumer) {
            reach.acked = reach.acked.max(offset);
            reach.sent = reach.sent.max(reach.acked);
        }
        self.state().acked_floor.store(floor, Ordering::Relaxed);
        Ok(())
    }

    /// Whether the log is kept for `consumer`; the error says for whom it is. Cheap.
    pub fn check_consumer(&self, consumer: &str) -> Result<(), StoreError> {
        let consumers = self.consumers()?;
        if consumers.contains_key(consumer) {
            Ok(())
        } else {
            Err(unknown_consumer(consumer, &consumers))
        }
    }

    /// Notes that a subscription of `consumer` that started at `from` has been sent every entry
    /// below `to`. It extends what the consumer may acknowledge only when it joins what the
    /// consumer's subscriptions were already sent, so the sent range never has a gap. Cheap.
    pub fn note_sent(&self, consumer: &str, from: u64, to: u64) {
        if let Ok(mut consumers) = self.consumers()
            && let Some(reach) = consumers.get_mut(consumer)
            && from <= reach.sent.max(reach.acked)
        {
            reach.sent = reach.sent.max(to);
        }
    }

    fn consumers(&self) -> Result<MutexGuard<'_, BTreeMap<String, Reach>>, StoreError> {
        self.state()
            .consumers
            .lock()
            .map_err(|_| StoreError::Poisoned)
    }

    /// Entries no registered consumer has acknowledged yet, from the slowest consumer's point of
    /// view: `next_offset − lowest acknowledged offset`, or the whole log while no consumer has
    /// acknowledged anything. Cheap (no I/O): for per-request checks.
    pub fn unconsumed(&self) -> u64 {
        let floor = self.state().acked_floor.load(Ordering::Relaxed);
        let next = self.next_offset();
        if floor == u64::MAX {
            // Nobody has acknowledged: everything retention still holds is unconsumed. The first
            // offset is only known from disk; the log starts at 0 unless retention trimmed it, which
            // needs an acknowledgement or the size bound, so `next` is the right count here.
            next
        } else {
            next.saturating_sub(floor)
        }
    }

    /// Makes `consumers` exactly the consumers the log is kept for: each new one starts at the log's
    /// first offset (so retention keeps everything for it from now on, even before it connects),
    /// each known one keeps its position, and any other name is forgotten, so that it no longer
    /// holds retention back.
    pub fn retain_for(&self, consumers: &[String]) -> Result<(), StoreError> {
        let floor = self.store.write_with(Durability::Immediate, |txn| {
            let first = txn
                .redb()
                .open_table(META)?
                .get(FIRST_OFFSET_KEY)?
                .map_or(0, |v| v.value());
            let mut table = txn.redb().open_table(CONSUMERS)?;
            let mut forgotten = Vec::new();
            for row in table.iter()? {
                let name = row?.0.value().to_owned();
                if !consumers.contains(&name) {
                    forgotten.push(name);
                }
            }
            for name in &forgotten {
                tracing::info!(
                    consumer = %name,
                    partition = self.partition().index,
                    "no longer keeping the log for this consumer"
                );
                table.remove(name.as_str())?;
            }
            for consumer in consumers {
                if table.get(consumer.as_str())?.is_none() {
                    table.insert(consumer.as_str(), first)?;
                }
            }
            acked_floor(&table)
        })?;
        let stored = self.positions()?;
        let mut reaches = self.consumers()?;
        reaches.retain(|name, _| consumers.contains(name));
        for (name, acked) in stored {
            reaches
                .entry(name)
                .and_modify(|r| r.acked = r.acked.max(acked))
                .or_insert(Reach { acked, sent: acked });
        }
        self.state().acked_floor.store(floor, Ordering::Relaxed);
        Ok(())
    }

    /// Every consumer the log is kept for, with its acknowledged position.
    pub fn positions(&self) -> Result<Vec<(String, u64)>, StoreError> {
        self.store.read(|read| {
            let consumers = read.open_table(CONSUMERS)?;
            let mut out = Vec::new();
            for row in consumers.iter()? {
                let (name, offset) = row?;
                out.push((name.value().to_owned(), offset.value()));
            }
            Ok(out)
        })
    }

    /// Deletes entries below `cutoff`, at most `max_entries` of them in this call, and moves
    /// `first_offset` accordingly. Returns how many were deleted.
    pub fn trim(&self, cutoff: u64, max_entries: u64) -> Result<u64, StoreError> {
        let (first, cutoff) = self.store.write_with(Durability::None, |txn| {
            let mut meta = txn.redb().open_table(META)?;
            let first = meta.get(FIRST_OFFSET_KEY)?.map_or(0, |v| v.value());
            let cutoff = cutoff
                .min(txn.next_offset())
                .min(first.saturating_add(max_entries));
            if cutoff <= first {
                return Ok((first, first));
            }
            let mut outbox = txn.redb().open_table(OUTBOX)?;
            outbox.retain_in(first..cutoff, |_, _| false)?;
            meta.insert(FIRST_OFFSET_KEY, cutoff)?;
            Ok::<_, StoreError>((first, cutoff))
        })?;
        if let Ok(mut recent) = self.state().recent.lock() {
            recent.cut(cutoff);
        }
        Ok(cutoff - first)
    }
}

fn unknown_consumer(consumer: &str, consumers: &BTreeMap<String, Reach>) -> StoreError {
    let known = if consumers.is_empty() {
        "no consumer".to_owned()
    } else {
        consumers.keys().cloned().collect::<Vec<_>>().join(", ")
    };
    StoreError::UnknownConsumer {
        consumer: consumer.to_owned(),
        known,
    }
}

fn acked_floor(consumers: &impl ReadableTable<&'static str, u64>) -> Result<u64, StoreError> {
    let mut floor = u64::MAX;
    for row in consumers.iter()? {
        floor = floor.min(row?.1.value());
    }
    Ok(floor)
}

fn log_bounds(read: &ReadTransaction) -> Result<(u64, u64), StoreError> {
    let meta = read.open_table(META)?;
    let first = meta.get(FIRST_OFFSET_KEY)?.map_or(0, |v| v.value());
    let outbox = read.open_table(OUTBOX)?;
    let next = outbox.last()?.map_or(first, |(k, _)| k.value() + 1);
    Ok((first, next.max(first)))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use orderflow_proto::v1::Event;

    use super::*;

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("log.redb")).unwrap();
        (dir, store)
    }

    fn append(store: &Store, n: usize, size: usize) {
        store
            .write(|txn| {
                for _ in 0..n {
                    txn.append(&Event {
                        order_id: "o".repeat(size),
                        ..Default::default()
                    });
                }
                Ok::<_, StoreError>(())
            })
            .unwrap();
    }

    /// What the tail serves unfiltered.
    fn recent(
        outbox: &Outbox,
        from: u64,
        max: usize,
        max_bytes: usize,
    ) -> Option<Vec<StoredLogEntry>> {
        outbox
            .scan_recent(from, max, max_bytes, None)
            .map(|scan| scan.entries)
    }

    #[test]
    fn the_tail_serves_what_the_store_holds() {
        let (_dir, store) = store();
        let outbox = store.outbox();
        assert_eq!(recent(&outbox, 0, 10, usize::MAX), None);
        append(&store, 3, 10);
        append(&store, 4, 10);
        for from in 0..7 {
            for max in [1, 2, 10] {
                assert_eq!(
                    recent(&outbox, from, max, usize::MAX),
                    Some(outbox.read_log(from, max, usize::MAX).unwrap())
                );
            }
        }
        // The byte bound as `read_log` has it: at least one entry, then no more than fits.
        let one = recent(&outbox, 0, 10, 1).unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(
            recent(&outbox, 2, 10, 1),
            Some(outbox.read_log(2, 10, 1).unwrap())
        );
        // Through a filter that keeps none of them: nothing, and how far it read.
        let none = EventFilter::kinds(&["order_placed"]);
        for from in 0..7 {
            for max in [1, 2, 10] {
                let recent = outbox.scan_recent(from, max, usize::MAX, Some(&none));
                let stored = outbox.scan_log(from, max, usize::MAX, Some(&none)).unwrap();
                assert!(stored.entries.is_empty());
                assert_eq!(stored.end, (from + max as u64).min(7));
                assert_eq!(recent, Some(stored));
            }
        }
        // At the head and beyond it, the store answers.
        assert_eq!(recent(&outbox, 7, 10, usize::MAX), None);
        assert_eq!(recent(&outbox, 8, 10, usize::MAX), None);
    }

    #[test]
    fn the_tail_keeps_only_the_newest_entries_and_nothing_retention_deleted() {
        let (_dir, store) = store();
        let outbox = store.outbox();
        append(&store, RECENT_MAX_ENTRIES + 10, 1);
        assert_eq!(recent(&outbox, 9, 1, usize::MAX), None);
        let oldest = recent(&outbox, 10, 1, usize::MAX).unwrap();
        assert_eq!(oldest[0].offset, 10);

        assert_eq!(outbox.trim(20, u64::MAX).unwrap(), 20);
        assert_eq!(recent(&outbox, 19, 1, usize::MAX), None);
        assert!(matches!(
            outbox.read_log(19, 1, usize::MAX),
            Err(StoreError::Truncated { first: 20, .. })
        ));
        assert_eq!(
            recent(&outbox, 20, 5, usize::MAX),
            Some(outbox.read_log(20, 5, usize::MAX).unwrap())
        );

        // Large entries: about RECENT_MAX_BYTES are kept, and always the newest one.
        // Five of a quarter each (plus a few bytes of encoding): the newest three are kept.
        append(&store, 5, RECENT_MAX_BYTES / 4);
        let next = outbox.next_offset();
        assert!(recent(&outbox, next - 4, 1, usize::MAX).is_none());
        assert!(recent(&outbox, next - 3, 1, usize::MAX).is_some());
        append(&store, 1, RECENT_MAX_BYTES * 2);
        assert!(recent(&outbox, next, 1, usize::MAX).is_some());
        assert!(recent(&outbox, next - 1, 1, usize::MAX).is_none());
    }
}
