//! A stage's embedded, crash-safe store: its own state tables plus its **outbox log**
//! ([`Outbox`](crate::Outbox), in `outbox.rs`).
//!
//! # Design
//! Every stage owns one redb file (`<data-dir>/<stage>.redb`). redb gives serialisable write
//! transactions and copy-on-write pages with a checksummed commit, so a commit is either entirely on
//! disk or not at all, whatever the moment of a crash (`kill -9`, power loss).
//!
//! Tables owned by this module (the outbox's own, `outbox` and `consumers`, are described there):
//!
//! | table       | key                  | value                   | meaning                                   |
//! |-------------|----------------------|-------------------------|-------------------------------------------|
//! | `meta`      | `&str`               | `u64`                   | `outbox.first`, `upstream.<name>` offsets  |
//!
//! Stages add their own tables (orders, stock items, invoices, notifications) and open them from the
//! same [`Txn`], so state, output and input position always move together.
//!
//! # Invariants
//! 1. **One transaction per batch.** [`Store::write`] hands a [`Txn`] to the stage; the stage applies a
//!    batch of upstream events to its tables, appends its output events with [`Txn::append`] and
//!    records the upstream offset it has consumed with [`Txn::set_consumed`]. All of it commits with
//!    one fsync or none of it does. After a crash the stage resumes from the recorded offset: an event
//!    is never lost and never takes effect twice.
//! 2. **One writer at a time.** Writers are serialised by a mutex that is held until the outbox's
//!    new head is published, so two writers can never pick the same offset; the log's own
//!    invariants (dense offsets, publish after commit, retention) are the outbox module's.
//!
//! # On crash
//! redb recovers to the last committed transaction on open (repairing its allocator state if the
//! process died mid-commit), and the outbox reloads its bounds and positions from disk, so no
//! in-memory state needs to survive.
//!
//! # On a full or failing disk
//! A failed write never half-applies (the transaction is gone), but redb then refuses every further
//! operation until the database is closed and opened again. So the first storage I/O error turns
//! the store's [`Condition`] to failing (its kind: the data volume is full, or another I/O error);
//! from then on writes fail fast ([`StoreError::Unavailable`]) and [`Store::recover`] — run by the
//! stage for as long as it serves — closes the database once no operation holds it, opens it again
//! (redb recovers to the last commit, exactly as after a crash), reloads the log's bounds and
//! consumer positions, and proves that writing works again — at least 4 MiB free on the volume and
//! a probe commit of 64 KiB — before the store is healthy. While the volume stays full it keeps trying, with backoff; if the database
//! cannot be opened again for any other reason a few times in a row, it gives up and the stage
//! exits, for its supervisor to restart it.

use std::{
    collections::{BTreeMap, HashSet},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard, RwLock},
    time::Duration,
};

use orderflow_proto::v1::Event;
use prost::Message;
use redb::{
    Database, Durability, ReadTransaction, ReadableDatabase, ReadableTable, TableDefinition,
    WriteTransaction,
};
use tokio::sync::watch;

use crate::{
    outbox::{self, LogState},
    partition::{self, Partition},
};

/// Upstream offsets consumed (`upstream.<name>`) and the ids of the logs consumed
/// (`upstream.<name>.log_id`), the outbox's first offset and id, and the partition the store holds
/// (`partition.index`, `partition.count`).
pub(crate) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Written and deleted again to prove that the store can commit after a fault.
const PROBE: TableDefinition<&str, &[u8]> = TableDefinition::new("probe");
const PROBE_BYTES: usize = 64 * 1024;

/// redb's page cache per store. Hot data (the log's tail, stage state) fits; a long backlog is read
/// from disk instead of growing memory. 8 MiB rather than 32: no stage got slower, catch-up got
/// faster and peak RSS fell by up to 30 MiB per stage (BENCHMARKS.md, "2026-11-28, late").
pub const CACHE_BYTES: usize = 8 * 1024 * 1024;

/// Everything that can go wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage failure: {0}")]
    Storage(#[from] redb::Error),
    #[error("offset {requested} was truncated by retention; the log starts at {first}")]
    Truncated { requested: u64, first: u64 },
    #[error("offset {requested} lies beyond the log's head {head}")]
    BeyondHead { requested: u64, head: u64 },
    #[error("record {key} of table {table} cannot be decoded: {source}")]
    Record {
        table: &'static str,
        key: String,
        source: prost::DecodeError,
    },
    #[error("a previous writer panicked; the store is closed")]
    Poisoned,
    #[error(
        "this log is not kept for consumer {consumer:?}; it is kept for {known} (--retain-for)"
    )]
    UnknownConsumer { consumer: String, known: String },
    #[error(
        "consumer {consumer:?} cannot acknowledge offset {offset}: its subscriptions were sent the entries below {sent} only"
    )]
    NotSent {
        consumer: String,
        offset: u64,
        sent: u64,
    },
    #[error("{0}; writes resume by themselves once the store can commit again")]
    Unavailable(Fault),
    /// A commit that failed with a storage error. Whether it reached the disk is known only once
    /// the store is opened again: a failed write or fsync may have left all of it in place, as with
    /// any database whose commit errs.
    #[error("the commit failed: {0}")]
    CommitFailed(redb::Error),
    #[error("a blocking store task failed: {0}")]
    TaskFailed(String),
    #[error(
        "the store holds {held}, not {wanted}: a store keeps the partition count it was created \
         with (--partitions, ORDERFLOW_PARTITIONS); start it with the partition count it was \
         created with, or give the stage an empty data directory"
    )]
    ForeignPartition { held: Partition, wanted: Partition },
    #[error("the stage is shutting down")]
    ShuttingDown,
}

/// Runs blocking store work `f` off the async threads. A task that panicked or was cancelled is
/// [`StoreError::TaskFailed`] (and logged here).
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f).await.map_err(task_failed)
}

/// A blocking store task that panicked or was cancelled, as [`StoreError::TaskFailed`] (logged).
pub(crate) fn task_failed(e: tokio::task::JoinError) -> StoreError {
    tracing::error!(error = %e, "blocking store task failed");
    StoreError::TaskFailed(e.to_string())
}

/// Why a store cannot commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    pub kind: FaultKind,
    /// The storage error that turned the store to failing.
    pub error: String,
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.kind {
            FaultKind::DiskFull => write!(f, "data volume full ({})", self.error),
            FaultKind::Io => write!(f, "storage I/O error ({})", self.error),
        }
    }
}

/// The kinds of storage fault, as metrics and logs name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// No space (or quota) left on the data volume.
    DiskFull,
    /// Any other I/O error, including redb refusing work after an earlier one.
    Io,
}

impl FaultKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FaultKind::DiskFull => "disk_full",
            FaultKind::Io => "io",
        }
    }
}

/// Whether a store can commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Condition {
    Healthy,
    Failing(Fault),
}

impl StoreError {
    /// The storage fault this error is, if it is one: an I/O error of the data volume, which
    /// leaves the database unusable until it is opened again.
    pub fn fault(&self) -> Option<Fault> {
        let e = match self {
            StoreError::Storage(e) | StoreError::CommitFailed(e) => e,
            StoreError::Unavailable(fault) => return Some(fault.clone()),
            _ => return None,
        };
        let kind = match e {
            redb::Error::Io(io) => io_kind(io),
            redb::Error::PreviousIo => FaultKind::Io,
            _ => return None,
        };
        Some(Fault {
            kind,
            error: e.to_string(),
        })
    }
}

/// ENOSPC and EDQUOT are a full volume; everything else is an I/O error.
fn io_kind(e: &std::io::Error) -> FaultKind {
    const ENOSPC: i32 = 28;
    const EDQUOT: i32 = 122;
    if e.kind() == std::io::ErrorKind::StorageFull
        || matches!(e.raw_os_error(), Some(ENOSPC | EDQUOT))
    {
        FaultKind::DiskFull
    } else {
        FaultKind::Io
    }
}

/// Decodes a protobuf record read from a stage table, naming it if it is corrupt.
pub fn decode_record<M: Message + Default>(
    table: &'static str,
    key: impl std::fmt::Display,
    bytes: &[u8],
) -> Result<M, StoreError> {
    M::decode(bytes).map_err(|source| StoreError::Record {
        table,
        key: key.to_string(),
        source,
    })
}

macro_rules! from_redb {
    ($($ty:ty),*) => {$(
        impl From<$ty> for StoreError {
            fn from(e: $ty) -> Self {
                StoreError::Storage(e.into())
            }
        }
    )*};
}
from_redb!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// A stage's store: shared, cheap to clone. Blocking: call it from `spawn_blocking`.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    cache_bytes: usize,
    /// The partition this store holds, checked whenever the database is opened.
    partition: Partition,
    /// The open database; `None` while it is being opened again after a fault.
    db: RwLock<Option<Arc<Database>>>,
    /// Whether the store can commit; watched for health.
    condition: watch::Sender<Condition>,
    /// The upstream logs that refuse this store, with why; watched for health.
    refusals: watch::Sender<BTreeMap<String, String>>,
    /// Held by the single writer from `begin_write` until the new head is published.
    write_lock: Mutex<()>,
    /// Durable commits since the store was opened.
    commits: std::sync::atomic::AtomicU64,
    /// What the outbox keeps in memory.
    log: LogState,
}

/// How hard a write transaction commits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Commit {
    /// fsynced before `write` returns: survives a crash or power loss.
    Durable,
    /// Atomic but not fsynced: a crash loses it (and everything committed lazily after the last
    /// durable commit) as a whole. Only for state that can be rebuilt from what stays durable, such as
    /// a view derived from other stages' logs together with the offsets it was derived up to.
    Lazy,
}

impl Store {
    /// Opens (or creates) the store at `path` of a pipeline with one partition, recovering from any
    /// crash.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_partition(path, Partition::ONLY, CACHE_BYTES)
    }

    /// [`Store::open`] with a page cache of `cache_bytes` instead of `CACHE_BYTES` (8 MiB).
    pub fn open_with_cache(path: &Path, cache_bytes: usize) -> Result<Self, StoreError> {
        Self::open_partition(path, Partition::ONLY, cache_bytes)
    }

    /// Opens (or creates) the store of `partition` at `path` with a page cache of `cache_bytes`. A
    /// new store records `partition`; an existing one that holds another partition, or was made for
    /// another partition count, is refused with [`StoreError::ForeignPartition`] and left as it is.
    pub fn open_partition(
        path: &Path,
        partition: Partition,
        cache_bytes: usize,
    ) -> Result<Self, StoreError> {
        let (db, loaded) = open_database(path, cache_bytes, partition)?;
        tracing::debug!(path = %path.display(), %partition, first = loaded.first, next = loaded.next, "store opened");
        Ok(Store {
            inner: Arc::new(Inner {
                path: path.to_owned(),
                cache_bytes,
                partition,
                db: RwLock::new(Some(Arc::new(db))),
                condition: watch::Sender::new(Condition::Healthy),
                refusals: watch::Sender::new(BTreeMap::new()),
                write_lock: Mutex::new(()),
                commits: std::sync::atomic::AtomicU64::new(0),
                log: LogState::new(loaded),
            }),
        })
    }

    /// The open database, for one operation; [`StoreError::Unavailable`] while it is being opened
    /// again.
    fn db(&self) -> Result<Arc<Database>, StoreError> {
        let slot = self.inner.db.read().map_err(|_| StoreError::Poisoned)?;
        slot.clone()
            .ok_or_else(|| StoreError::Unavailable(self.fault().unwrap_or_else(reopening)))
    }

    /// The partition this store holds.
    pub fn partition(&self) -> Partition {
        self.inner.partition
    }

    /// Whether the store can commit now, and a receiver that sees every change.
    pub fn condition(&self) -> watch::Receiver<Condition> {
        self.inner.condition.subscribe()
    }

    /// Records that the log this store consumes as `upstream` refuses it (a
    /// [`Refusal`](crate::Refusal)), and why: the stage answers NOT_SERVING until every refusal is
    /// lifted.
    pub fn refuse(&self, upstream: &str, why: String) {
        self.inner.refusals.send_if_modified(|refusals| {
            refusals.insert(upstream.to_owned(), why.clone()).as_ref() != Some(&why)
        });
    }

    /// The log this store consumes as `upstream` takes it again.
    pub fn lift_refusal(&self, upstream: &str) {
        self.inner
            .refusals
            .send_if_modified(|refusals| refusals.remove(upstream).is_some());
    }

    /// The upstream logs refusing this store (name → why), and a receiver that sees every change.
    pub fn refusals(&self) -> watch::Receiver<BTreeMap<String, String>> {
        self.inner.refusals.subscribe()
    }

    /// The fault the store is failing with, if it is.
    pub fn fault(&self) -> Option<Fault> {
        match &*self.inner.condition.borrow() {
            Condition::Healthy => None,
            Condition::Failing(fault) => Some(fault.clone()),
        }
    }

    /// Passes `result` through, turning the store to failing if it is a storage fault.
    pub(crate) fn observe<T>(&self, result: Result<T, StoreError>) -> Result<T, StoreError> {
        if let Err(e) = &result
            && let Some(fault) = e.fault()
            && !matches!(e, StoreError::Unavailable(_))
        {
            self.inner.condition.send_if_modified(|condition| {
                if matches!(condition, Condition::Failing(f) if f.kind == fault.kind) {
                    return false;
                }
                tracing::error!(error = %fault, "the store cannot commit; recovering");
                *condition = Condition::Failing(fault.clone());
                true
            });
        }
        result
    }

    /// Closes the database and opens it again until a probe commit succeeds, each time the store
    /// turns to failing, until `shutdown`. While the volume is full it keeps trying, backing off to
    /// `RECOVERY_BACKOFF_MAX`; after `REOPEN_ATTEMPTS` failures in a row to open the database
    /// for any other reason it gives up and returns the last error (the stage then exits).
    pub async fn recover(
        &self,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Result<(), StoreError> {
        let mut condition = self.condition();
        loop {
            tokio::select! {
                failing = condition.wait_for(|c| matches!(c, Condition::Failing(_))) => {
                    if failing.is_err() { return Ok(()) }
                }
                () = shutdown.cancelled() => return Ok(()),
            }
            let mut pause = RECOVERY_BACKOFF_MIN;
            let mut failures = 0;
            loop {
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    () = shutdown.cancelled() => return Ok(()),
                }
                pause = (pause * 2).min(RECOVERY_BACKOFF_MAX);
                let store = self.clone();
                let attempt = tokio::task::spawn_blocking(move || store.reopen_and_probe())
                    .await
                    .map_err(|_| StoreError::Poisoned)?;
                match attempt {
                    Ok(()) => {
                        self.inner.condition.send_replace(Condition::Healthy);
                        tracing::info!("the store commits again; recovered");
                        break;
                    }
                    Err(Reopen::Probe(e)) => {
                        failures = 0;
                        tracing::warn!(error = %e, retry_in_ms = pause.as_millis() as u64, "the store still cannot commit");
                        self.observe::<()>(Err(e)).ok();
                    }
                    Err(Reopen::Open(e))
                        if e.fault().is_some_and(|f| f.kind == FaultKind::DiskFull) =>
                    {
                        failures = 0;
                        tracing::warn!(error = %e, retry_in_ms = pause.as_millis() as u64, "the store cannot be opened while the data volume is full");
                    }
                    Err(Reopen::Open(e)) => {
                        failures += 1;
                        tracing::error!(error = %e, attempt = failures, "the store cannot be opened again");
                        if failures >= REOPEN_ATTEMPTS {
                            return Err(e);
                        }
                    }
                }
            }
        }
    }

    /// Closes the database once no operation holds it, opens it again and proves it can commit.
    fn reopen_and_probe(&self) -> Result<(), Reopen> {
        {
            // No writer is inside a transaction while the database changes under it.
            let _writer = self.lock().map_err(Reopen::Open)?;
            let old = self
                .inner
                .db
                .write()
                .map_err(|_| Reopen::Open(StoreError::Poisoned))?
                .take();
            if let Some(old) = old {
                // Readers hold it for one operation at most.
                let deadline = std::time::Instant::now() + Duration::from_secs(10);
                while Arc::strong_count(&old) > 1 && std::time::Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(5));
                }
                drop(old);
            }
            let (db, loaded) = open_database(
                &self.inner.path,
                self.inner.cache_bytes,
                self.inner.partition,
            )
            .map_err(Reopen::Open)?;
            self.inner.log.reload(loaded);
            *self
                .inner
                .db
                .write()
                .map_err(|_| Reopen::Open(StoreError::Poisoned))? = Some(Arc::new(db));
        }
        // A commit can succeed in pages the file already has while the volume is still full: make
        // sure there is room to grow before calling the store healthy.
        let dir = self.inner.path.parent().unwrap_or(Path::new("."));
        if crate::disk::available_bytes(dir).is_some_and(|free| free < RECOVERY_MIN_FREE_BYTES) {
            return Err(Reopen::Probe(StoreError::Storage(redb::Error::Io(
                std::io::Error::from(std::io::ErrorKind::StorageFull),
            ))));
        }
        self.probe_commit(Some(&vec![0u8; PROBE_BYTES]))
            .map_err(Reopen::Probe)?;
        self.probe_commit(None).map_err(Reopen::Probe)?;
        Ok(())
    }

    /// Commits one write to the probe table: `bytes` stored, or the probe removed with `None`.
    fn probe_commit(&self, bytes: Option<&[u8]>) -> Result<(), StoreError> {
        let db = self.db()?;
        let txn = db.begin_write()?;
        {
            let mut table = txn.open_table(PROBE)?;
            match bytes {
                Some(bytes) => table.insert("probe", bytes).map(|_| ())?,
                None => table.remove("probe").map(|_| ())?,
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Durable (fsynced) commits since the store was opened.
    pub fn commits(&self) -> u64 {
        self.inner
            .commits
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Runs `f` in one durable write transaction: everything it does commits together or not at all.
    /// If `f` fails, nothing is written.
    pub fn write<T, E>(&self, f: impl FnOnce(&mut Txn) -> Result<T, E>) -> Result<T, E>
    where
        E: From<StoreError>,
    {
        self.write_with(Durability::Immediate, f)
    }

    /// [`Store::write`] with the given [`Commit`] strength.
    pub fn write_as<T, E>(
        &self,
        commit: Commit,
        f: impl FnOnce(&mut Txn) -> Result<T, E>,
    ) -> Result<T, E>
    where
        E: From<StoreError>,
    {
        let durability = match commit {
            Commit::Durable => Durability::Immediate,
            Commit::Lazy => Durability::None,
        };
        self.write_with(durability, f)
    }

    pub(crate) fn write_with<T, E>(
        &self,
        durability: Durability,
        f: impl FnOnce(&mut Txn) -> Result<T, E>,
    ) -> Result<T, E>
    where
        E: From<StoreError>,
    {
        let _guard = self.lock()?;
        // After a fault, nothing is written until recovery has proved that commits work again.
        if let Some(fault) = self.fault() {
            return Err(StoreError::Unavailable(fault).into());
        }
        let db = self.db()?;
        let mut inner = self.observe(db.begin_write().map_err(StoreError::from))?;
        inner
            .set_durability(durability)
            .map_err(|e| StoreError::Storage(redb::Error::from(e)))?;
        let mut txn = Txn {
            inner,
            log: Appends {
                next: self.inner.log.next_offset(),
                pending: Vec::new(),
            },
            after_commit: Vec::new(),
        };
        let value = f(&mut txn)?;
        let Txn {
            inner,
            log: Appends { next, pending },
            after_commit,
        } = txn;
        if !pending.is_empty() {
            self.observe(outbox::write_appended(&inner, &pending))?;
        }
        self.observe(
            inner
                .commit()
                .map_err(|e| StoreError::CommitFailed(e.into())),
        )?;
        if matches!(durability, Durability::Immediate) {
            self.inner
                .commits
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        if !pending.is_empty() {
            self.inner.log.remember(pending);
            self.inner.log.publish(next);
        }
        for hook in after_commit {
            hook();
        }
        Ok(value)
    }

    /// Runs `f` on a consistent snapshot.
    pub fn read<T, E>(&self, f: impl FnOnce(&ReadTransaction) -> Result<T, E>) -> Result<T, E>
    where
        E: From<StoreError>,
    {
        let read = self.observe(self.db()?.begin_read().map_err(StoreError::from))?;
        f(&read)
    }

    /// The next upstream offset to consume for `upstream` (0 when never recorded).
    pub fn consumed_offset(&self, upstream: &str) -> Result<u64, StoreError> {
        let read = self.observe(self.db()?.begin_read().map_err(StoreError::from))?;
        let meta = read.open_table(META)?;
        Ok(meta
            .get(upstream_key(upstream).as_str())?
            .map_or(0, |v| v.value()))
    }

    /// The id of the log this store consumes as `upstream` (its `Head` `log_id`), if recorded.
    pub fn upstream_log_id(&self, upstream: &str) -> Result<Option<u64>, StoreError> {
        let read = self.observe(self.db()?.begin_read().map_err(StoreError::from))?;
        let meta = read.open_table(META)?;
        Ok(meta
            .get(upstream_log_key(upstream).as_str())?
            .map(|v| v.value()))
    }

    /// Records that `upstream` is the log with id `log_id`: from now on this store consumes no
    /// other one there.
    pub fn record_upstream_log_id(&self, upstream: &str, log_id: u64) -> Result<(), StoreError> {
        self.write(|txn| {
            txn.redb()
                .open_table(META)?
                .insert(upstream_log_key(upstream).as_str(), log_id)?;
            Ok(())
        })
    }

    /// What the outbox keeps in memory, for [`crate::Outbox`].
    pub(crate) fn log_state(&self) -> &LogState {
        &self.inner.log
    }

    fn lock(&self) -> Result<MutexGuard<'_, ()>, StoreError> {
        self.inner
            .write_lock
            .lock()
            .map_err(|_| StoreError::Poisoned)
    }
}

/// One write transaction of a stage: its own tables (through [`Txn::redb`]), its outbox appends and
/// its consumed upstream offsets, committed together by [`Store::write`].
pub struct Txn {
    inner: WriteTransaction,
    log: Appends,
    after_commit: Vec<Box<dyn FnOnce() + Send>>,
}

/// The outbox entries a transaction appends, with the offset the next one gets.
pub struct Appends {
    next: u64,
    pending: Vec<(u64, Vec<u8>)>,
}

impl Appends {
    /// Appends `event` to the outbox and returns its offset (valid once the transaction commits).
    pub fn append(&mut self, event: &Event) -> u64 {
        let offset = self.next;
        self.pending.push((offset, event.encode_to_vec()));
        self.next += 1;
        offset
    }

    /// The offset the next [`Appends::append`] will return.
    pub fn next_offset(&self) -> u64 {
        self.next
    }
}

impl Txn {
    /// The underlying redb transaction, for the stage's own tables.
    pub fn redb(&self) -> &WriteTransaction {
        &self.inner
    }

    /// The redb transaction and the outbox appends apart: tables opened once for a whole batch
    /// stay open while it appends.
    pub fn split(&mut self) -> (&WriteTransaction, &mut Appends) {
        (&self.inner, &mut self.log)
    }

    /// Whether any of `tables` has a row for `key`: how a stage recognises an order it has
    /// already settled one way or the other.
    pub fn has_key_in_any<V: redb::Value + 'static>(
        &self,
        tables: &[TableDefinition<'_, &'static str, V>],
        key: &str,
    ) -> Result<bool, StoreError> {
        for table in tables {
            if self.redb().open_table(*table)?.get(key)?.is_some() {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Which of `keys` have a row in any of `tables`, each table opened once: the batch form of
    /// [`Txn::has_key_in_any`].
    pub fn keys_in_any<'k, V: redb::Value + 'static>(
        &self,
        tables: &[TableDefinition<'_, &'static str, V>],
        keys: impl IntoIterator<Item = &'k str>,
    ) -> Result<HashSet<&'k str>, StoreError> {
        let opened = tables
            .iter()
            .map(|table| self.inner.open_table(*table))
            .collect::<Result<Vec<_>, _>>()?;
        let mut found = HashSet::new();
        for key in keys {
            for table in &opened {
                if table.get(key)?.is_some() {
                    found.insert(key);
                    break;
                }
            }
        }
        Ok(found)
    }

    /// Appends `event` to the outbox and returns its offset (valid once the transaction commits).
    pub fn append(&mut self, event: &Event) -> u64 {
        self.log.append(event)
    }

    /// The offset the next [`Txn::append`] will return.
    pub fn next_offset(&self) -> u64 {
        self.log.next_offset()
    }

    /// Runs `hook` once this transaction has committed (never if it fails): the place to tell
    /// in-memory schedules and watchers about what is now on disk.
    pub fn after_commit(&mut self, hook: impl FnOnce() + Send + 'static) {
        self.after_commit.push(Box::new(hook));
    }

    /// The next offset of `upstream` to consume, as this transaction sees it.
    pub fn consumed(&self, upstream: &str) -> Result<u64, StoreError> {
        let meta = self.inner.open_table(META)?;
        Ok(meta
            .get(upstream_key(upstream).as_str())?
            .map_or(0, |v| v.value()))
    }

    /// Records that every entry of `upstream` below `offset` has taken effect.
    pub fn set_consumed(&mut self, upstream: &str, offset: u64) -> Result<(), StoreError> {
        let mut meta = self.inner.open_table(META)?;
        meta.insert(upstream_key(upstream).as_str(), offset)?;
        Ok(())
    }
}

/// First and largest pause between recovery attempts.
pub const RECOVERY_BACKOFF_MIN: Duration = Duration::from_millis(100);
pub const RECOVERY_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Free bytes the data volume must have before a store that failed is called healthy again.
pub const RECOVERY_MIN_FREE_BYTES: u64 = 4 << 20;
/// Failures in a row to open the database again (for a reason other than a full volume) before
/// recovery gives up and the stage exits.
pub const REOPEN_ATTEMPTS: u32 = 5;

/// Why one recovery attempt failed: the database did not open, or it opened but cannot commit.
enum Reopen {
    Open(StoreError),
    Probe(StoreError),
}

fn reopening() -> Fault {
    Fault {
        kind: FaultKind::Io,
        error: "the store is being opened again".into(),
    }
}

/// Opens (or creates) the database of `partition` at `path` with its tables, and reads what the store
/// keeps in memory.
fn open_database(
    path: &Path,
    cache_bytes: usize,
    partition: Partition,
) -> Result<(Database, outbox::Loaded), StoreError> {
    let db = Database::builder()
        .set_cache_size(cache_bytes)
        .create(path)?;
    let txn = db.begin_write()?;
    let empty = partition::meta_is_empty(&txn)? && outbox::is_empty(&txn)?;
    outbox::create_tables(&txn)?;
    // Refused: the transaction is dropped, and the store stays exactly as it was.
    partition::claim(&txn, partition, empty)?;
    outbox::claim_id(&txn)?;
    txn.commit()?;
    let loaded = outbox::load(&db.begin_read()?)?;
    Ok((db, loaded))
}

fn upstream_key(upstream: &str) -> String {
    format!("upstream.{upstream}")
}

fn upstream_log_key(upstream: &str) -> String {
    format!("upstream.{upstream}.log_id")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn event(order: &str) -> Event {
        Event {
            order_id: order.to_owned(),
            ..Default::default()
        }
    }

    fn open(dir: &tempfile::TempDir) -> Store {
        Store::open(&dir.path().join("test.redb")).unwrap()
    }

    /// Appends orders "0" to "9" in one transaction: offsets 0..10.
    fn append_ten(store: &Store) {
        store
            .write(|txn| {
                for i in 0..10 {
                    txn.append(&event(&i.to_string()));
                }
                Ok::<_, StoreError>(())
            })
            .unwrap();
    }

    #[test]
    fn appends_get_dense_offsets_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let offsets = store
            .write(|txn| {
                let a = txn.append(&event("a"));
                let b = txn.append(&event("b"));
                txn.set_consumed("up", 7)?;
                Ok::<_, StoreError>((a, b))
            })
            .unwrap();
        assert_eq!(offsets, (0, 1));
        assert_eq!(store.outbox().next_offset(), 2);
        drop(store);

        let store = open(&dir);
        assert_eq!(store.outbox().next_offset(), 2);
        assert_eq!(store.consumed_offset("up").unwrap(), 7);
        let entries = store.outbox().read_log(0, 10, usize::MAX).unwrap();
        let ids: Vec<_> = entries
            .iter()
            .map(|e| (e.offset, e.decode_event().unwrap().order_id))
            .collect();
        assert_eq!(ids, vec![(0, "a".to_owned()), (1, "b".to_owned())]);
    }

    #[test]
    fn hooks_run_only_after_a_commit() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let ran = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let hook = |ran: &std::sync::Arc<std::sync::atomic::AtomicU32>| {
            let ran = ran.clone();
            move || {
                ran.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        };
        store
            .write(|txn| {
                txn.after_commit(hook(&ran));
                Ok::<_, StoreError>(())
            })
            .unwrap();
        let failed = store.write(|txn| {
            txn.after_commit(hook(&ran));
            Err::<(), _>(StoreError::Poisoned)
        });
        assert!(failed.is_err());
        assert_eq!(ran.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    /// Keeps the log for `names` and pretends every entry was sent to each of them.
    fn consumers_caught_up(store: &Store, names: &[&str]) {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        store.outbox().retain_for(&names).unwrap();
        for name in &names {
            store
                .outbox()
                .note_sent(name, 0, store.outbox().next_offset());
        }
    }

    #[test]
    fn unconsumed_follows_the_slowest_consumer() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        append_ten(&store);
        assert_eq!(store.outbox().unconsumed(), 10);
        consumers_caught_up(&store, &["stock"]);
        store.outbox().ack("stock", 7).unwrap();
        assert_eq!(store.outbox().unconsumed(), 3);
        consumers_caught_up(&store, &["stock", "demo"]);
        store.outbox().ack("demo", 2).unwrap();
        assert_eq!(store.outbox().unconsumed(), 8);
        drop(store);
        assert_eq!(
            open(&dir).outbox().unconsumed(),
            8,
            "the floor is rebuilt on open"
        );
    }

    #[test]
    fn failed_transaction_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let result = store.write(|txn| {
            txn.append(&event("lost"));
            txn.set_consumed("up", 3)?;
            Err::<(), _>(StoreError::Poisoned)
        });
        assert!(result.is_err());
        assert_eq!(store.outbox().next_offset(), 0);
        assert_eq!(store.consumed_offset("up").unwrap(), 0);
        assert!(
            store
                .outbox()
                .read_log(0, 10, usize::MAX)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn trim_moves_first_offset_and_reports_truncation() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        append_ten(&store);
        assert_eq!(store.outbox().trim(4, 100).unwrap(), 4);
        assert_eq!(store.outbox().bounds().unwrap(), (4, 10));
        assert!(matches!(
            store.outbox().read_log(3, 1, usize::MAX),
            Err(StoreError::Truncated {
                requested: 3,
                first: 4
            })
        ));
        assert!(matches!(
            store.outbox().read_log(11, 1, usize::MAX),
            Err(StoreError::BeyondHead { .. })
        ));
        assert_eq!(
            store.outbox().read_log(4, 100, usize::MAX).unwrap().len(),
            6
        );
        // Trimming everything keeps the head where it was, across a reopen too.
        assert_eq!(store.outbox().trim(100, 100).unwrap(), 6);
        drop(store);
        let store = open(&dir);
        assert_eq!(store.outbox().bounds().unwrap(), (10, 10));
        let next = store
            .write(|txn| Ok::<_, StoreError>(txn.append(&event("x"))))
            .unwrap();
        assert_eq!(next, 10);
    }

    #[test]
    fn batches_stop_at_the_byte_limit_but_never_starve() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let big = "x".repeat(1000);
        store
            .write(|txn| {
                for _ in 0..10 {
                    txn.append(&event(&big));
                }
                Ok::<_, StoreError>(())
            })
            .unwrap();
        // Each entry encodes to a little over 1000 bytes.
        assert_eq!(store.outbox().read_log(0, 100, 3500).unwrap().len(), 3);
        assert_eq!(store.outbox().read_log(0, 100, 10).unwrap().len(), 1);
        assert_eq!(store.outbox().read_log(0, 2, usize::MAX).unwrap().len(), 2);
    }

    #[test]
    fn registered_consumers_hold_the_log_until_they_ack() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        append_ten(&store);
        consumers_caught_up(&store, &["notifier", "stock"]);
        store.outbox().ack("stock", 10).unwrap();
        assert_eq!(
            store.outbox().unconsumed(),
            10,
            "the notifier has not consumed anything"
        );
        // Keeping the log for them again does not move a position.
        store.outbox().ack("notifier", 4).unwrap();
        store
            .outbox()
            .retain_for(&["notifier".into(), "stock".into()])
            .unwrap();
        assert_eq!(store.outbox().unconsumed(), 6);
        // A consumer no longer kept for stops holding the log back.
        store.outbox().retain_for(&["stock".into()]).unwrap();
        assert_eq!(store.outbox().unconsumed(), 0);
        assert_eq!(
            store.outbox().positions().unwrap(),
            vec![("stock".to_owned(), 10)]
        );
    }

    #[test]
    fn acks_never_move_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        append_ten(&store);
        consumers_caught_up(&store, &["demo", "stock"]);
        store.outbox().ack("stock", 5).unwrap();
        store.outbox().ack("stock", 3).unwrap();
        store.outbox().ack("demo", 1).unwrap();
        assert_eq!(
            store.outbox().positions().unwrap(),
            vec![("demo".to_owned(), 1), ("stock".to_owned(), 5)]
        );
    }

    #[test]
    fn storage_faults_are_told_apart() {
        let io = |e: std::io::Error| StoreError::Storage(redb::Error::Io(e));
        let kind = |e: StoreError| e.fault().map(|f| f.kind);
        assert_eq!(
            kind(io(std::io::Error::from_raw_os_error(28))),
            Some(FaultKind::DiskFull)
        );
        assert_eq!(
            kind(io(std::io::Error::from(std::io::ErrorKind::StorageFull))),
            Some(FaultKind::DiskFull)
        );
        assert_eq!(
            kind(io(std::io::Error::from_raw_os_error(5))),
            Some(FaultKind::Io)
        );
        assert_eq!(
            kind(StoreError::Storage(redb::Error::PreviousIo)),
            Some(FaultKind::Io)
        );
        assert_eq!(
            kind(StoreError::Storage(redb::Error::Corrupted("x".into()))),
            None
        );
        assert_eq!(kind(StoreError::Poisoned), None);
        let status = tonic::Status::from(io(std::io::Error::from_raw_os_error(28)));
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert!(
            status.message().starts_with("data volume full"),
            "{}",
            status.message()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_store_refuses_writes_then_reopens_and_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        append_ten(&store);
        store.outbox().retain_for(&["stock".into()]).unwrap();
        store.outbox().note_sent("stock", 0, 10);
        store.outbox().ack("stock", 4).unwrap();
        // As the first failed commit on a full volume does.
        let full = StoreError::Storage(redb::Error::Io(std::io::Error::from_raw_os_error(28)));
        assert!(store.observe::<()>(Err(full)).is_err());
        assert!(matches!(
            &*store.condition().borrow(),
            Condition::Failing(Fault {
                kind: FaultKind::DiskFull,
                ..
            })
        ));
        let refused = store.write(|txn| Ok::<_, StoreError>(txn.append(&event("x"))));
        assert!(matches!(refused, Err(StoreError::Unavailable(_))));

        let shutdown = tokio_util::sync::CancellationToken::new();
        let recovery = tokio::spawn({
            let store = store.clone();
            let shutdown = shutdown.clone();
            async move { store.recover(shutdown).await }
        });
        let mut condition = store.condition();
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            condition.wait_for(|c| *c == Condition::Healthy),
        )
        .await
        .unwrap()
        .unwrap();
        // Reopened as after a crash: the log, its head and the consumer's position are intact,
        // and what the consumer was sent still counts.
        assert_eq!(store.outbox().next_offset(), 10);
        assert_eq!(
            store.outbox().read_log(0, 100, usize::MAX).unwrap().len(),
            10
        );
        store.outbox().ack("stock", 10).unwrap();
        let next = store
            .write(|txn| Ok::<_, StoreError>(txn.append(&event("y"))))
            .unwrap();
        assert_eq!(next, 10);
        shutdown.cancel();
        assert!(recovery.await.unwrap().is_ok());
    }

    #[tokio::test]
    async fn a_healthy_store_stays_healthy_and_recovery_ends_on_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        assert_eq!(*store.condition().borrow(), Condition::Healthy);
        let shutdown = tokio_util::sync::CancellationToken::new();
        let recovery = tokio::spawn({
            let store = store.clone();
            let shutdown = shutdown.clone();
            async move { store.recover(shutdown).await }
        });
        append_ten(&store);
        shutdown.cancel();
        assert!(recovery.await.unwrap().is_ok());
        assert_eq!(store.outbox().next_offset(), 10);
    }

    #[test]
    fn only_what_a_consumer_was_sent_can_be_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        append_ten(&store);
        store.outbox().retain_for(&["stock".into()]).unwrap();
        // Nothing sent yet: nothing to acknowledge but what is already acknowledged.
        assert!(matches!(
            store.outbox().ack("stock", 10),
            Err(StoreError::NotSent { sent: 0, .. })
        ));
        store.outbox().ack("stock", 0).unwrap();
        // A subscription from 4 does not cover 0..4: its entries cannot be acknowledged.
        store.outbox().note_sent("stock", 4, 10);
        assert!(matches!(
            store.outbox().ack("stock", 10),
            Err(StoreError::NotSent { .. })
        ));
        // One from 0 that got to 6 makes 0..6 acknowledgeable, and then the other one's 4..10 joins.
        store.outbox().note_sent("stock", 0, 6);
        store.outbox().ack("stock", 6).unwrap();
        store.outbox().note_sent("stock", 4, 10);
        store.outbox().ack("stock", 10).unwrap();
        // Names the log is not kept for can neither acknowledge nor hold it back.
        for stranger in ["demo", "\u{0}"] {
            store.outbox().note_sent(stranger, 0, 10);
            assert!(matches!(
                store.outbox().ack(stranger, 1),
                Err(StoreError::UnknownConsumer { .. })
            ));
        }
        assert_eq!(store.outbox().unconsumed(), 0);
        // After a restart, what was sent is forgotten: only re-sent entries count again.
        drop(store);
        let store = open(&dir);
        store.outbox().ack("stock", 10).unwrap();
        store
            .write(|txn| Ok::<_, StoreError>(txn.append(&event("x"))))
            .unwrap();
        assert!(store.outbox().ack("stock", 11).is_err());
        store.outbox().note_sent("stock", 10, 11);
        store.outbox().ack("stock", 11).unwrap();
    }
}
