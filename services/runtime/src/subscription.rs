//! The downstream half of the hand-off: a stage consuming its upstream's `EventLog`.
//!
//! A [`Subscription`] reads the upstream offset its stage has committed, subscribes under its
//! consumer name from there (or from its last acknowledgement upstream, if that is older: upstream
//! lets a consumer acknowledge only what it was sent since, and after an upstream restart it has
//! forgotten what it sent; the entries read again are skipped), and for every batch that arrives (plus whatever further batches are already waiting, up to
//! [`MAX_ENTRIES_PER_COMMIT`]) runs the stage's [`Apply`] inside ONE store transaction that also records
//! the new upstream offset. Only after that commit does it acknowledge upstream (finalize late), and the
//! acknowledgement is coalesced by a side task so it never slows the hot path.
//!
//! The transaction runs on a blocking thread. When the batch was full (more is waiting: the stage is
//! catching up), the loop reads, decodes and prepares the next one meanwhile, so a catching-up stage
//! keeps two cores busy; otherwise it waits for the commit, so that what arrives meanwhile makes one
//! larger batch rather than several small ones. At most one batch is in flight, and the
//! next one's transaction starts only once it has committed: transactions stay serial, in offset
//! order, each checking that it starts at the consumed offset the store holds.
//!
//! Any failure — upstream down, stream broken, a gap in offsets — drops the stream and reconnects with
//! exponential backoff and jitter, resuming from the committed offset. A batch is applied entirely or
//! not at all, so a crash or reconnect at any point neither loses nor repeats an effect.
//!
//! A stage that reads little of a log asks upstream to leave the rest out ([`Apply::filter`]):
//! offsets then have gaps, and each batch says how far upstream read for it, which is the offset
//! recorded with it.
//!
//! A stage whose own work queue is full (payments waiting for the gateway, say) gives its
//! subscription an [`Admission`]: the loop reads the next batch only while there is room, so the
//! stream stalls, HTTP/2 flow control stops the upstream producer, and the backlog waits on the
//! upstream's disk rather than in this stage's memory.

use std::{
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};

use futures::FutureExt;
use orderflow_proto::{
    stored::{StoredEventBatch, StoredLogEntry, event_log_client::EventLogClient},
    v1::{AckRequest, HeadRequest, Owner, SubscribeRequest},
};
use rand::Rng;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::{
    service::interceptor::InterceptedService,
    transport::{Channel, Endpoint},
};

use crate::{
    auth::LinkAuth,
    config::Link,
    fencing::Refusal,
    filter::EventFilter,
    metrics as names,
    store::{Commit, Store, StoreError, Txn, blocking, task_failed},
};

/// Entries applied in one transaction at most when several batches are waiting. A stage's peak memory
/// during catch-up follows the batch (each entry's effects and the transaction's dirty pages); 512
/// keeps the fsync per entry negligible while the notifier stays well under its RSS ceiling, where
/// 2048 pushed it over (BENCHMARKS.md, "2026-11-28, late").
pub const MAX_ENTRIES_PER_COMMIT: usize = 512;
/// First and largest pause between reconnection attempts.
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// At most one acknowledgement upstream per this interval.
const ACK_INTERVAL: Duration = Duration::from_millis(200);
/// How long the offset past a run of batches the stage ignores ([`Apply::ignores`]) may stay
/// unrecorded: until then upstream keeps those entries, and a restart reads them again.
pub const IGNORED_COMMIT_INTERVAL: Duration = ACK_INTERVAL;
/// How long a lazily committed subscription ([`Subscription::lazy`]) waits for more entries to
/// join a batch smaller than [`MAX_ENTRIES_PER_COMMIT`]: a view derived from upstream may lag by
/// this much, and at a light load it commits once per this interval rather than once per upstream
/// commit (BENCHMARKS.md, "2026-12-04, late night").
pub const LAZY_LINGER: Duration = Duration::from_millis(5);

/// One upstream log entry as a stage reads it: its offset and the stage's view of its event.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry<E> {
    pub offset: u64,
    pub event: E,
}

/// How a stage decodes an upstream event from the bytes its log holds. Any prost message decodes
/// itself: the whole `Event`, or a lean view with the same field numbers that leaves out what the
/// stage never reads (protobuf skips a field it does not know without allocating anything).
pub trait Decode: Sized + Send + Sync + 'static {
    fn decode_event(bytes: &[u8]) -> Result<Self, prost::DecodeError>;
}

impl<M: prost::Message + Default + Send + Sync + 'static> Decode for M {
    fn decode_event(bytes: &[u8]) -> Result<Self, prost::DecodeError> {
        M::decode(bytes)
    }
}

/// A field of a view whose content the stage does not read: the wire still says the field is
/// there (an event's kind, say), and protobuf skips what is inside it without allocating.
#[derive(Clone, Copy, PartialEq, Eq, prost::Message)]
pub struct Skipped {}

/// A stage's reaction to a batch of upstream events: an optional step outside the transaction, then
/// each event inside it.
pub trait Apply: Send + Sync + 'static {
    /// What the stage reads of each upstream event (see [`Decode`]).
    type Event: Decode;
    /// What [`Apply::prepare`] hands to [`Apply::apply`] for one batch.
    type Prepared: Default + Send + 'static;

    /// Runs before the batch's transaction, outside it: the place for outside calls whose results
    /// the transaction records (a payment's first attempt, say). The batch may not commit and then
    /// comes again, so whatever this does must be safe to do again (idempotent outside calls). It
    /// may run while the previous batch's transaction is still under way, so it must not depend on
    /// that batch's effects.
    fn prepare(
        &self,
        _entries: &[Entry<Self::Event>],
    ) -> impl Future<Output = Self::Prepared> + Send {
        std::future::ready(Self::Prepared::default())
    }

    /// Applies `entry` to the stage's tables and appends the resulting events through `txn`. Must be
    /// deterministic in the store's state and `prepared`, and must fail only on storage errors: a
    /// malformed event is the stage's to handle (skip, reject), never a reason to stop the pipeline.
    fn apply(
        &self,
        txn: &mut Txn,
        entry: &Entry<Self::Event>,
        prepared: &mut Self::Prepared,
    ) -> Result<(), StoreError>;

    /// Whether `event` is one this stage has nothing to do with: [`Apply::apply`] would leave the
    /// store as it is (a payment that went through, to the stock's releases). A batch of such
    /// events alone is not committed at once: its offset is recorded with the next batch that is
    /// (or after [`IGNORED_COMMIT_INTERVAL`] at most), which spares a commit, and with it an fsync,
    /// per batch the stage ignores. A crash in between reads those events again and ignores them
    /// again.
    fn ignores(&self, _event: &Self::Event) -> bool {
        false
    }

    /// The entries upstream need not send at all (`SubscribeRequest.filter`): a stage that ignores
    /// most of a log names what it does not, and upstream leaves the rest out before sending. Only
    /// a saving: what comes through still goes through [`Apply::ignores`]. `None`: every entry.
    fn filter(&self) -> Option<EventFilter> {
        None
    }

    /// Applies a whole batch, in offset order, in one transaction: [`Apply::apply`] for each entry
    /// unless the stage does it at once (opening its tables once per batch, say).
    fn apply_batch(
        &self,
        txn: &mut Txn,
        entries: &[Entry<Self::Event>],
        prepared: &mut Self::Prepared,
    ) -> Result<(), StoreError> {
        for entry in entries {
            self.apply(txn, entry, prepared)?;
        }
        Ok(())
    }
}

/// What went wrong with one connection to upstream (the loop logs it and reconnects).
#[derive(Debug, thiserror::Error)]
enum SubscriptionError {
    #[error("cannot connect: {}", crate::error_chain(.0))]
    Connect(#[from] tonic::transport::Error),
    #[error("{0}")]
    Link(String),
    #[error("upstream answered {}: {}", .0.code(), .0.message())]
    Status(tonic::Status),
    #[error("{message}")]
    Refused { refusal: Refusal, message: String },
    #[error("upstream ended the stream")]
    Ended,
    #[error("expected offset {expected}, upstream sent {got}")]
    Gap { expected: u64, got: u64 },
    #[error("the event at offset {offset} cannot be decoded: {error}")]
    Malformed {
        offset: u64,
        error: prost::DecodeError,
    },
    #[error("cannot commit: {0}")]
    Store(#[from] StoreError),
    #[error(
        "the store holds offset {found} as consumed, not {expected} (it was opened again after a fault); resuming from it"
    )]
    Moved { expected: u64, found: u64 },
    #[error(
        "upstream's log has {upstream} partitions and this stage's store {ours}: every stage of a \
         pipeline needs the same --partitions (ORDERFLOW_PARTITIONS)"
    )]
    Partitions { upstream: u32, ours: u32 },
}

/// Why one batch's transaction did not commit.
enum BatchError {
    Store(StoreError),
    /// The committed offset is not where this connection left it.
    Moved {
        found: u64,
    },
}

impl From<StoreError> for BatchError {
    fn from(e: StoreError) -> Self {
        BatchError::Store(e)
    }
}

impl From<tonic::Status> for SubscriptionError {
    fn from(status: tonic::Status) -> Self {
        match Refusal::of(&status) {
            Some(refusal) => SubscriptionError::Refused {
                refusal,
                message: status.message().to_owned(),
            },
            None => SubscriptionError::Status(status),
        }
    }
}

impl SubscriptionError {
    /// Upstream's retention deleted entries this stage has not consumed.
    fn is_truncated(&self) -> bool {
        matches!(self, SubscriptionError::Status(s) if s.code() == tonic::Code::OutOfRange)
    }
}

/// How much work a stage holds that its subscription has handed it, against a limit: the
/// subscription takes the next batch only while the count is under it. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Admission {
    pending: Arc<watch::Sender<usize>>,
    limit: usize,
}

impl Admission {
    pub fn new(limit: usize) -> Self {
        Admission {
            pending: Arc::new(watch::Sender::new(0)),
            limit: limit.max(1),
        }
    }

    /// `n` more units of work are held.
    pub fn add(&self, n: usize) {
        self.pending.send_modify(|p| *p += n);
    }

    /// `n` units of work are done.
    pub fn remove(&self, n: usize) {
        self.pending.send_modify(|p| *p = p.saturating_sub(n));
    }

    pub fn pending(&self) -> usize {
        *self.pending.borrow()
    }

    /// Waits until the work held is under the limit.
    pub async fn room(&self) {
        let mut rx = self.pending.subscribe();
        let _ = rx.wait_for(|p| *p < self.limit).await;
    }
}

/// One stage's subscription to its upstream's log.
pub struct Subscription<A> {
    /// Name under which this stage records its offset and acknowledges upstream (e.g. "stock").
    consumer: String,
    /// The stage, for the metrics: the consumer name unless [`Subscription::reading`] says another.
    stage: String,
    /// Key of the consumed offset in the store's meta table (e.g. "receiver").
    upstream_name: String,
    /// The upstream's replicas; the one that owns this store's partition is read.
    upstream: Link,
    /// The endpoint of that replica, once known, for the acknowledgements.
    owner: watch::Sender<Option<Endpoint>>,
    store: Store,
    applier: Arc<A>,
    commit: Commit,
    admission: Option<Admission>,
    /// Who this process is to the upstream log ([`crate::fencing`]): random, new at every start.
    incarnation: u64,
    /// The upstream partition read: the store's own unless [`Subscription::reading`] says another.
    partition: u32,
}

impl<A: Apply> Subscription<A> {
    /// `consumer` reads the log at the other end of `upstream` (recording its offset under
    /// `upstream_name`) and applies it to `store` with `applier`, durably.
    pub fn new(
        consumer: impl Into<String>,
        upstream_name: impl Into<String>,
        upstream: Link,
        store: Store,
        applier: Arc<A>,
    ) -> Self {
        let store_partition = store.partition().index;
        let consumer = consumer.into();
        Subscription {
            stage: consumer.clone(),
            consumer,
            upstream_name: upstream_name.into(),
            upstream,
            owner: watch::channel(None).0,
            store,
            applier,
            commit: Commit::Durable,
            admission: None,
            incarnation: rand::random::<u64>().max(1),
            partition: store_partition,
        }
    }

    /// Reads partition `partition` of the upstream log, as `consumer`, rather than the store's own
    /// partition under the stage's name: for a stage whose partitions read each other's logs
    /// (stock's shards), each one a consumer of its own. The store keeps the offset under
    /// `upstream_name` as always, so each partition read needs a name of its own there too.
    pub fn reading(mut self, partition: u32, consumer: impl Into<String>) -> Self {
        self.partition = partition;
        self.consumer = consumer.into();
        self
    }

    /// Commits batches lazily ([`Commit::Lazy`]): for views derived from upstream that a crash may
    /// roll back together with their offset, to be derived again.
    pub fn lazy(mut self) -> Self {
        self.commit = Commit::Lazy;
        self
    }

    /// Reads the next batch only while `admission` has room.
    pub fn with_admission(mut self, admission: Admission) -> Self {
        self.admission = Some(admission);
        self
    }

    /// Consumes upstream until `shutdown`, reconnecting forever. Returns after finishing the batch in
    /// hand.
    pub async fn run(self, shutdown: CancellationToken) {
        let partition = self.store.partition().index;
        let committed = match self.committed_offset().await {
            Ok(offset) => offset,
            Err(e) => {
                tracing::error!(partition, error = %e, "cannot read the consumed offset; subscription not started");
                return;
            }
        };
        let (acked_tx, acked_rx) = watch::channel(committed);
        let acker = tokio::spawn(acknowledge(
            AckTarget {
                owner: self.owner.subscribe(),
                auth: self.upstream.auth.clone(),
                consumed_by: partition,
            },
            self.consumer.clone(),
            // Lazy commits are durable only once a durable commit follows: make one before telling
            // upstream it may delete what they hold.
            (self.commit == Commit::Lazy).then(|| (self.store.clone(), self.upstream_name.clone())),
            self.partition,
            self.incarnation,
            acked_rx,
            shutdown.clone(),
        ));
        // The recorder is installed on first use: make sure it exists before the first value is set.
        let _ = names::handle();
        let refused = metrics::gauge!(
            names::UPSTREAM_REFUSED,
            "stage" => self.stage.clone(),
            "upstream" => self.upstream_name.clone(),
            "partition" => partition.to_string()
        );
        refused.set(0.0);
        let mut backoff = Backoff::new();
        let mut last_refusal = None;
        while !shutdown.is_cancelled() {
            let result = self.run_once(&acked_tx, &mut backoff, &shutdown).await;
            if !matches!(result, Err(SubscriptionError::Refused { .. })) {
                last_refusal = None;
                refused.set(0.0);
            }
            match result {
                Ok(()) => break,
                Err(SubscriptionError::Refused { refusal, message }) => {
                    // Loud once per reason; the health check says it for as long as it lasts.
                    if last_refusal != Some(refusal) {
                        tracing::error!(
                            partition,
                            upstream = %self.upstream.url,
                            upstream_partition = self.partition,
                            reason = refusal.as_str(),
                            error = %message,
                            "upstream refuses this stage's store; not serving"
                        );
                        last_refusal = Some(refusal);
                    }
                    self.store.refuse(&self.upstream_name, message);
                    refused.set(1.0);
                    if refusal == Refusal::Fenced {
                        // Never read again: another process applies this log now.
                        shutdown.cancelled().await;
                        break;
                    }
                    // The other process stops, an operator restores a volume: the next attempt
                    // finds out.
                    tokio::select! {
                        () = tokio::time::sleep(backoff.next_pause()) => {}
                        () = shutdown.cancelled() => break,
                    }
                }
                Err(e) => {
                    let pause = backoff.next_pause();
                    if e.is_truncated() {
                        // Retrying cannot help until an operator intervenes; say so loudly.
                        tracing::error!(
                            partition,
                            upstream = %self.upstream.url,
                            upstream_partition = self.partition,
                            error = %e,
                            "upstream no longer has the entries this stage needs"
                        );
                    } else if matches!(e, SubscriptionError::Partitions { .. }) {
                        tracing::error!(
                            partition,
                            upstream = %self.upstream.url,
                            upstream_partition = self.partition,
                            error = %e,
                            "not consuming a log partitioned differently"
                        );
                    } else {
                        tracing::warn!(
                            partition,
                            upstream = %self.upstream.url,
                            upstream_partition = self.partition,
                            error = %e,
                            retry_in_ms = pause.as_millis() as u64,
                            "upstream subscription interrupted"
                        );
                    }
                    tokio::select! {
                        () = tokio::time::sleep(pause) => {}
                        () = shutdown.cancelled() => break,
                    }
                }
            }
        }
        let _ = acker.await;
    }

    /// The endpoint of the upstream replica that owns the partition p read: replica p mod N,
    /// where N is how many replicas the link lists or, for a `{replica}` URL, how many replica 0
    /// (which owns partition 0, so exists whatever N is) says its stage runs.
    async fn owner_endpoint(&self) -> Result<Endpoint, SubscriptionError> {
        let partition = self.partition;
        let replicas = match self.upstream.url.listed() {
            Some(listed) => listed,
            None if partition == 0 => 1,
            None => {
                let first = self.upstream.endpoint(0).map_err(SubscriptionError::Link)?;
                let mut client = EventLogClient::with_interceptor(
                    first.connect().await?,
                    self.upstream.auth.clone(),
                );
                let head = client
                    .head(HeadRequest { partition: 0 })
                    .await?
                    .into_inner();
                // A server that predates replicas answers 0: it runs exactly one.
                head.replicas.max(1)
            }
        };
        self.upstream
            .endpoint(partition % replicas.max(1))
            .map_err(SubscriptionError::Link)
    }

    async fn committed_offset(&self) -> Result<u64, StoreError> {
        let store = self.store.clone();
        let key = self.upstream_name.clone();
        blocking(move || store.consumed_offset(&key)).await?
    }

    /// One connection: subscribe from the committed offset and apply batches until something breaks.
    async fn run_once(
        &self,
        acked: &watch::Sender<u64>,
        backoff: &mut Backoff,
        shutdown: &CancellationToken,
    ) -> Result<(), SubscriptionError> {
        let mut next = self.committed_offset().await?;
        let connected = async {
            let owner = self.owner_endpoint().await?;
            let channel = owner.connect().await?;
            self.owner.send_replace(Some(owner));
            Ok::<_, SubscriptionError>(channel)
        };
        let channel = tokio::select! {
            channel = connected => channel?,
            () = shutdown.cancelled() => return Ok(()),
        };
        let mut client = EventLogClient::with_interceptor(channel, self.upstream.auth.clone())
            .max_decoding_message_size(crate::eventlog::MAX_MESSAGE_BYTES);
        let partition = self.store.partition();
        let head = client
            .head(HeadRequest {
                partition: self.partition,
            })
            .await?
            .into_inner();
        // A server that predates partitions answers 0: it has exactly one.
        let upstream_partitions = head.partitions.max(1);
        if upstream_partitions != partition.count {
            return Err(SubscriptionError::Partitions {
                upstream: upstream_partitions,
                ours: partition.count,
            });
        }
        let upstream_name = self.upstream_name.clone();
        let store = self.store.clone();
        let recorded_log_id = blocking(move || store.upstream_log_id(&upstream_name)).await??;
        let upstream_acked = head
            .consumers
            .iter()
            .find(|c| c.consumer == self.consumer)
            .map(|c| c.acked_offset);
        // From the older of the committed and the acknowledged offset, so that upstream sees this
        // consumer sent everything it may then acknowledge; what was applied already is skipped.
        let from = match upstream_acked {
            Some(acked) if next >= head.first_offset => acked.min(next).max(head.first_offset),
            _ => next,
        };
        let filter = self.applier.filter();
        let mut stream = client
            .subscribe(SubscribeRequest {
                from_offset: from,
                max_batch: crate::eventlog::MAX_MAX_BATCH,
                consumer: self.consumer.clone(),
                stop_at_head: false,
                from_first: false,
                partition: self.partition,
                owner: Some(Owner {
                    incarnation: self.incarnation,
                    consumed_offset: next,
                    log_id: recorded_log_id.unwrap_or(0),
                }),
                filter: filter.map(EventFilter::to_request),
            })
            .await?
            .into_inner();
        // The log took this store: from now on it consumes no other one there.
        if recorded_log_id.is_none() && head.log_id != 0 {
            let (store, upstream_name) = (self.store.clone(), self.upstream_name.clone());
            let log_id = head.log_id;
            blocking(move || store.record_upstream_log_id(&upstream_name, log_id)).await??;
        }
        self.store.lift_refusal(&self.upstream_name);
        tracing::info!(
            partition = partition.index,
            upstream = %self.upstream.url,
            upstream_partition = self.partition,
            from_offset = next,
            "subscribed upstream"
        );
        // The batch whose transaction runs on a blocking thread while the next one is read,
        // decoded and prepared here: at most one, and they commit in offset order.
        let mut in_flight: Option<InFlight> = None;
        // The consumed offset the store holds once the batch in flight has committed: behind
        // `next` while the batches read since were all ignored, which is recorded only later.
        let mut recorded = next;
        // When the first ignored batch not yet recorded was read.
        let mut ignored_since: Option<Instant> = None;
        loop {
            if let Some(admission) = &self.admission {
                tokio::select! {
                    () = admission.room() => {}
                    done = self.drain(&mut in_flight, acked, backoff), if in_flight.is_some() => {
                        done?;
                        continue;
                    }
                    () = shutdown.cancelled() => return self.drain(&mut in_flight, acked, backoff).await,
                }
            }
            let record_ignored = async {
                match ignored_since {
                    Some(since) => {
                        tokio::time::sleep_until((since + IGNORED_COMMIT_INTERVAL).into()).await
                    }
                    None => std::future::pending().await,
                }
            };
            let batch = tokio::select! {
                batch = stream.message() => batch,
                done = self.drain(&mut in_flight, acked, backoff), if in_flight.is_some() => {
                    done?;
                    continue;
                }
                () = record_ignored, if in_flight.is_none() => {
                    // Nothing more came: record how far the ignored batches reach.
                    in_flight = Some(self.start_commit(recorded, next, Vec::new(), A::Prepared::default(), Instant::now()));
                    (recorded, ignored_since) = (next, None);
                    continue;
                }
                () = shutdown.cancelled() => return self.drain(&mut in_flight, acked, backoff).await,
            };
            let batch = match batch {
                Ok(Some(batch)) => batch,
                Ok(None) => {
                    return self
                        .fail(&mut in_flight, SubscriptionError::Ended, acked, backoff)
                        .await;
                }
                Err(status) => {
                    return self
                        .fail(&mut in_flight, status.into(), acked, backoff)
                        .await;
                }
            };
            let mut head = batch.head;
            // How far upstream read for these entries (past those a filter left out).
            let mut end = batch_end(&batch, next).max(next);
            let mut entries = batch.entries;
            // Whatever is already waiting joins this commit: one fsync for all of it. A lazy view
            // also waits a little for more, unless catching up fills the batch anyway.
            let mut deferred_error = None;
            let linger =
                (self.commit == Commit::Lazy).then(|| tokio::time::Instant::now() + LAZY_LINGER);
            while entries.len() < MAX_ENTRIES_PER_COMMIT {
                let more = match linger {
                    None => stream.message().now_or_never(),
                    Some(until) => tokio::time::timeout_at(until, stream.message()).await.ok(),
                };
                match more {
                    Some(Ok(Some(more))) => {
                        head = head.max(more.head);
                        end = end.max(batch_end(&more, next));
                        entries.extend(more.entries);
                    }
                    Some(Ok(None)) => {
                        deferred_error = Some(SubscriptionError::Ended);
                        break;
                    }
                    Some(Err(status)) => {
                        deferred_error = Some(status.into());
                        break;
                    }
                    None => break,
                }
            }
            entries.retain(|e| e.offset >= next);
            // The encoded entries share the stream's receive buffer; they go as soon as decoded.
            let dense = filter.is_none();
            let entries = match decode_batch::<A::Event>(entries, next, end, dense) {
                Ok(entries) => entries,
                Err(e) => return self.fail(&mut in_flight, e, acked, backoff).await,
            };
            // A batch the stage ignores waits to be recorded, unless the run it ends has waited
            // long enough.
            let wait = entries.iter().all(|e| self.applier.ignores(&e.event))
                && ignored_since.is_none_or(|since| since.elapsed() < IGNORED_COMMIT_INTERVAL);
            if end == next {
                // Only a batch that took effect (or needed none) shows the link is healthy again: a
                // stage that cannot commit backs off like one that cannot connect.
                if in_flight.is_none() {
                    backoff.reset();
                }
            } else if wait {
                next = end;
                ignored_since.get_or_insert_with(Instant::now);
            } else {
                let started = Instant::now();
                let prepared = self.applier.prepare(&entries).await;
                // Transactions stay serial and in offset order: this batch's starts once the one
                // before it has committed.
                self.drain(&mut in_flight, acked, backoff).await?;
                let count = entries.len();
                next = end;
                in_flight = Some(self.start_commit(recorded, next, entries, prepared, started));
                (recorded, ignored_since) = (next, None);
                // Only a full batch says more is waiting. Otherwise what arrives during this
                // commit joins the next batch, as large as it can be, rather than a small one
                // prepared at once: under a steady load, smaller batches would cost more per event.
                if count < MAX_ENTRIES_PER_COMMIT {
                    self.drain(&mut in_flight, acked, backoff).await?;
                }
            }
            metrics::gauge!(
                names::CONSUMER_LAG,
                "stage" => self.stage.clone(),
                "upstream" => self.upstream_name.clone(),
                "partition" => self.store.partition().index.to_string()
            )
            .set(head.saturating_sub(next) as f64);
            if let Some(e) = deferred_error {
                return self.fail(&mut in_flight, e, acked, backoff).await;
            }
        }
    }

    /// Starts the transaction that applies `entries` with what [`Apply::prepare`] made of them and
    /// records `new_next` as consumed, once it has found the store at `recorded` (the entries in
    /// between, if any, were all ignored); it runs on a blocking thread whether or not the result
    /// is awaited.
    fn start_commit(
        &self,
        recorded: u64,
        new_next: u64,
        entries: Vec<Entry<A::Event>>,
        mut prepared: A::Prepared,
        started: Instant,
    ) -> InFlight {
        let count = entries.len();
        let next = recorded;
        let store = self.store.clone();
        let applier = self.applier.clone();
        let key = self.upstream_name.clone();
        let commit = self.commit;
        let task = tokio::task::spawn_blocking(move || {
            store.write_as(commit, |txn| {
                // The batch must start where the store says this stage is: a store opened again
                // after a fault is back at its last durable commit, which may be older than what
                // this connection applied lazily before.
                let found = txn.consumed(&key)?;
                if found != next {
                    return Err(BatchError::Moved { found });
                }
                applier.apply_batch(txn, &entries, &mut prepared)?;
                txn.set_consumed(&key, new_next)?;
                Ok(())
            })
        });
        InFlight {
            task,
            next,
            end: new_next,
            count,
            started,
        }
    }

    /// Ends this connection with `error`, once the batch in flight has committed (or failed): a
    /// new connection then starts from what the store holds, not from under a commit still running.
    async fn fail(
        &self,
        in_flight: &mut Option<InFlight>,
        error: SubscriptionError,
        acked: &watch::Sender<u64>,
        backoff: &mut Backoff,
    ) -> Result<(), SubscriptionError> {
        self.drain(in_flight, acked, backoff).await?;
        Err(error)
    }

    /// Waits for the batch in flight, if any, and once it has committed acknowledges it upstream
    /// and in the metrics.
    async fn drain(
        &self,
        in_flight: &mut Option<InFlight>,
        acked: &watch::Sender<u64>,
        backoff: &mut Backoff,
    ) -> Result<(), SubscriptionError> {
        let Some(done) = finish(in_flight).await? else {
            return Ok(());
        };
        acked.send_replace(done.next);
        backoff.reset();
        let labels = [
            ("stage", self.stage.clone()),
            ("partition", self.store.partition().index.to_string()),
        ];
        // A commit that only records how far the ignored batches reach applied no batch.
        if done.count > 0 {
            metrics::histogram!(names::BATCH_COMMIT_SECONDS, &labels)
                .record(done.took.as_secs_f64());
            metrics::histogram!(names::BATCH_ENTRIES, &labels).record(done.count as f64);
        }
        Ok(())
    }
}

/// A batch's transaction under way on a blocking thread.
struct InFlight {
    task: tokio::task::JoinHandle<Result<(), BatchError>>,
    /// The consumed offset the store must hold when it starts.
    next: u64,
    /// The consumed offset it records.
    end: u64,
    /// Entries it applies.
    count: usize,
    /// When its preparation started.
    started: Instant,
}

/// What a committed batch leaves to record.
struct Committed {
    /// The next offset to consume.
    next: u64,
    count: usize,
    took: Duration,
}

/// Waits for the batch in flight, if any, and clears it.
async fn finish(in_flight: &mut Option<InFlight>) -> Result<Option<Committed>, SubscriptionError> {
    let Some(batch) = in_flight.as_mut() else {
        return Ok(None);
    };
    let joined = (&mut batch.task).await;
    let InFlight {
        next,
        end,
        count,
        started,
        ..
    } = *batch;
    *in_flight = None;
    let committed = joined.map_err(task_failed)?;
    match committed {
        Ok(()) => Ok(Some(Committed {
            next: end,
            count,
            took: started.elapsed(),
        })),
        Err(BatchError::Store(e)) => Err(e.into()),
        Err(BatchError::Moved { found }) => Err(SubscriptionError::Moved {
            expected: next,
            found,
        }),
    }
}

/// Where the entries of `batch` end: its `next_offset`, or, from a server that predates filters,
/// one past its last entry; `next` for an empty one.
fn batch_end(batch: &StoredEventBatch, next: u64) -> u64 {
    match (batch.next_offset, batch.entries.last()) {
        (0, Some(last)) => last.offset + 1,
        (0, None) => next,
        (end, _) => end,
    }
}

/// `entries`, each decoded into the stage's view of its event: ascending from `next` and below
/// `end`, and `dense` (every offset in turn) unless the subscription is filtered.
fn decode_batch<E: Decode>(
    entries: Vec<StoredLogEntry>,
    next: u64,
    end: u64,
    dense: bool,
) -> Result<Vec<Entry<E>>, SubscriptionError> {
    let mut decoded = Vec::with_capacity(entries.len());
    let mut expected = next;
    for entry in entries {
        let in_order = if dense {
            entry.offset == expected
        } else {
            entry.offset >= expected
        };
        if !in_order || entry.offset >= end {
            return Err(SubscriptionError::Gap {
                expected,
                got: entry.offset,
            });
        }
        let event =
            E::decode_event(&entry.event).map_err(|error| SubscriptionError::Malformed {
                offset: entry.offset,
                error,
            })?;
        decoded.push(Entry {
            offset: entry.offset,
            event,
        });
        expected = entry.offset + 1;
    }
    if dense && end != expected {
        return Err(SubscriptionError::Gap { expected, got: end });
    }
    Ok(decoded)
}

/// The client of an upstream `EventLog`, with the link credential on every call.
type LogClient = EventLogClient<InterceptedService<Channel, LinkAuth>>;

/// Where acknowledgements go: the upstream replica that owns the partition, once the subscription
/// has found it, with the link credential.
struct AckTarget {
    owner: watch::Receiver<Option<Endpoint>>,
    auth: LinkAuth,
    /// The partition of the store that consumes, for the log lines.
    consumed_by: u32,
}

/// Tells upstream how far this stage has committed, at most every [`ACK_INTERVAL`]. With `flush`
/// (the store and the upstream's name in it, for lazy commits) it first makes a durable commit and
/// acknowledges no further than the consumed offset that commit holds: a store opened again after a
/// fault is back at its last durable commit, behind what the subscription had applied lazily, and
/// upstream must keep those entries to be applied again. Failures are only logged: an
/// acknowledgement just lets upstream trim its log, and the next one catches up.
async fn acknowledge(
    AckTarget {
        mut owner,
        auth,
        consumed_by,
    }: AckTarget,
    consumer: String,
    flush: Option<(Store, String)>,
    partition: u32,
    incarnation: u64,
    mut committed: watch::Receiver<u64>,
    shutdown: CancellationToken,
) {
    let mut last_acked = None;
    let mut last_refusal = None;
    let mut client: Option<LogClient> = None;
    loop {
        // The replica that owns the partition, once the subscription has found it (again).
        if owner.has_changed().unwrap_or(false) || client.is_none() {
            client = owner.borrow_and_update().as_ref().map(|endpoint| {
                EventLogClient::with_interceptor(endpoint.connect_lazy(), auth.clone())
            });
        }
        let offset = *committed.borrow_and_update();
        if let Some(client) = client.as_mut()
            && last_acked != Some(offset)
        {
            let durable = match &flush {
                Some((store, upstream)) => {
                    let (store, upstream) = (store.clone(), upstream.clone());
                    match blocking(move || store.write(|txn| txn.consumed(&upstream))).await {
                        Ok(Ok(durable)) => Some(durable.min(offset)),
                        _ => None,
                    }
                }
                None => Some(offset),
            };
            if let Some(durable) = durable {
                let request = AckRequest {
                    consumer: consumer.clone(),
                    offset: durable,
                    partition,
                    incarnation,
                };
                match client.ack(request).await {
                    Ok(_) => {
                        last_acked = Some(durable);
                        last_refusal = None;
                    }
                    Err(status)
                        if matches!(
                            status.code(),
                            tonic::Code::Unauthenticated | tonic::Code::FailedPrecondition
                        ) =>
                    {
                        // A configuration problem an operator must see, once per distinct answer.
                        if last_refusal.as_deref() != Some(status.message()) {
                            tracing::warn!(partition = consumed_by, consumer = %consumer, upstream_partition = partition, code = ?status.code(), message = status.message(), "upstream refused the acknowledgement");
                            last_refusal = Some(status.message().to_owned());
                        }
                    }
                    Err(status) => {
                        tracing::debug!(code = ?status.code(), message = status.message(), "ack failed")
                    }
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(ACK_INTERVAL) => {}
            () = shutdown.cancelled() => return,
        }
        // Acknowledged: wait for the next commit. Not yet (refused, failed): try again.
        if last_acked == Some(*committed.borrow()) {
            tokio::select! {
                changed = committed.changed() => if changed.is_err() { return },
                () = shutdown.cancelled() => return,
            }
        }
    }
}

/// Exponential backoff between [`BACKOFF_MIN`] and [`BACKOFF_MAX`], with equal jitter: a random
/// pause in the upper half of the current step.
#[derive(Debug)]
pub struct Backoff {
    ceiling: Duration,
}

impl Backoff {
    pub fn new() -> Self {
        Backoff {
            ceiling: BACKOFF_MIN,
        }
    }

    /// A random pause between half the current ceiling and the ceiling, which then doubles (up to
    /// the maximum).
    pub fn next_pause(&mut self) -> Duration {
        let ceiling = self.ceiling;
        self.ceiling = (ceiling * 2).min(BACKOFF_MAX);
        let millis = ceiling.as_millis() as u64;
        Duration::from_millis(rand::rng().random_range(millis / 2..=millis))
    }

    pub fn reset(&mut self) {
        self.ceiling = BACKOFF_MIN;
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::{net::SocketAddr, path::Path};

    use orderflow_proto::v1::{Event, event::Kind};

    use super::*;
    use crate::{ServerArgs, StageServer, UpstreamUrl, config::Replica};

    /// Appends every event it consumes to its own store's outbox, as a stage passes orders on.
    struct PassOn;

    impl Apply for PassOn {
        type Event = Event;
        type Prepared = ();

        fn apply(&self, txn: &mut Txn, entry: &Entry<Event>, _: &mut ()) -> Result<(), StoreError> {
            txn.append(&entry.event);
            Ok(())
        }
    }

    /// Replica `replica` of `replicas` over `partitions`, listening on `listen`, in `dir`.
    fn layout(
        listen: SocketAddr,
        dir: &Path,
        replica: u32,
        replicas: u32,
        partitions: u32,
    ) -> ServerArgs {
        let mut args = ServerArgs::new(listen, dir);
        (args.replica, args.replicas, args.partitions) = (Replica(replica), replicas, partitions);
        args
    }

    /// Replica `replica` of 2 of the upstream stage over 4 partitions, kept for "down".
    async fn upstream_replica(listen: SocketAddr, dir: &Path, replica: u32) -> StageServer {
        let dir = dir.join(format!("up-{replica}"));
        StageServer::bind_partitions("up", layout(listen, &dir, replica, 2, 4))
            .await
            .unwrap()
            .retain_for(&["down"])
            .await
            .unwrap()
    }

    /// Serves `server` until the returned token is cancelled.
    fn serve(server: StageServer) -> (CancellationToken, tokio::task::JoinHandle<()>) {
        let shutdown = CancellationToken::new();
        let serving = {
            let shutdown = shutdown.clone();
            tokio::spawn(async move { server.serve(shutdown).await.unwrap() })
        };
        (shutdown, serving)
    }

    /// A replica that owns several partitions reads each of them from the upstream replica that
    /// owns it, whether the link lists the upstream's replicas or names them with `{replica}`
    /// (then asking replica 0 how many there are).
    #[tokio::test]
    async fn each_partition_is_read_from_the_upstream_replica_that_owns_it() {
        let dir = tempfile::tempdir().unwrap();
        // Upstream: 2 replicas over 4 partitions, at 127.0.0.1:X and 127.0.1.1:X, so that one URL
        // with `{replica}` in its host names both.
        let first = upstream_replica("127.0.0.1:0".parse().unwrap(), dir.path(), 0).await;
        let port = first.local_addr().port();
        let second =
            upstream_replica(SocketAddr::from(([127, 0, 1, 1], port)), dir.path(), 1).await;
        for store in first.stores().iter().chain(second.stores()) {
            let p = store.partition().index;
            store
                .write(|txn| {
                    for n in 0..3 {
                        txn.append(&Event {
                            order_id: format!("p{p}-{n}"),
                            ..Default::default()
                        });
                    }
                    Ok::<_, StoreError>(())
                })
                .unwrap();
        }
        let listed: UpstreamUrl = format!("http://127.0.0.1:{port},http://127.0.1.1:{port}")
            .parse()
            .unwrap();
        let templated: UpstreamUrl = format!("http://127.0.{{replica}}.1:{port}")
            .parse()
            .unwrap();
        let upstream = [serve(first), serve(second)];

        for (name, url) in [("listed", listed), ("templated", templated)] {
            // Downstream: one replica over the same 4 partitions.
            let args = layout(
                "127.0.0.1:0".parse().unwrap(),
                &dir.path().join(name),
                0,
                1,
                4,
            );
            let link = args.link(&url).unwrap();
            let down = StageServer::bind_partitions("down", args).await.unwrap();
            let shutdown = CancellationToken::new();
            let running: Vec<_> = down
                .stores()
                .iter()
                .map(|store| {
                    let subscription = Subscription::new(
                        "down",
                        "up",
                        link.clone(),
                        store.clone(),
                        Arc::new(PassOn),
                    );
                    tokio::spawn(subscription.run(shutdown.clone()))
                })
                .collect();
            for store in down.stores() {
                let p = store.partition().index;
                until(&format!("{name}: partition {p} not read"), || {
                    store.outbox().next_offset() >= 3
                })
                .await;
                let outbox = store.outbox();
                let orders: Vec<String> = outbox
                    .read_log(0, 10, usize::MAX)
                    .unwrap()
                    .into_iter()
                    .map(|entry| Event::decode_event(&entry.event).unwrap().order_id)
                    .collect();
                assert_eq!(orders, [0, 1, 2].map(|n| format!("p{p}-{n}")), "{name}");
            }
            shutdown.cancel();
            for running in running {
                running.await.unwrap();
            }
        }
        for (shutdown, serving) in upstream {
            shutdown.cancel();
            serving.await.unwrap();
        }
    }

    /// Passes on what [`PassOn`] does, except the events whose order id starts with "skip".
    struct SkipSome;

    impl Apply for SkipSome {
        type Event = Event;
        type Prepared = ();

        fn ignores(&self, event: &Event) -> bool {
            event.order_id.starts_with("skip")
        }

        fn apply(&self, txn: &mut Txn, entry: &Entry<Event>, _: &mut ()) -> Result<(), StoreError> {
            if !self.ignores(&entry.event) {
                txn.append(&entry.event);
            }
            Ok(())
        }
    }

    /// An upstream stage of one partition in `dir`, its log kept for "down", served: its store,
    /// its address and what stops it.
    async fn upstream_for_down(
        dir: &Path,
    ) -> (
        Store,
        String,
        (CancellationToken, tokio::task::JoinHandle<()>),
    ) {
        let up = StageServer::bind(
            "up",
            ServerArgs::new("127.0.0.1:0".parse().unwrap(), dir.join("up")),
        )
        .await
        .unwrap()
        .retain_for(&["down"])
        .await
        .unwrap();
        let store = up.stores()[0].clone();
        let address = format!("http://{}", up.local_addr());
        (store, address, serve(up))
    }

    /// Waits up to 10 s for `done`.
    async fn until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Batches the stage ignores cost no commit each: their offset is recorded once, with what
    /// follows or on its own when nothing does, and only then acknowledged, so upstream keeps them
    /// until it is.
    #[tokio::test]
    async fn ignored_batches_are_recorded_once_and_acknowledged_after() {
        let dir = tempfile::tempdir().unwrap();
        let (upstream, address, serving) = upstream_for_down(dir.path()).await;
        let url: UpstreamUrl = address.parse().unwrap();
        let args = ServerArgs::new("127.0.0.1:0".parse().unwrap(), dir.path().join("down"));
        let link = args.link(&url).unwrap();
        let down = StageServer::bind("down", args).await.unwrap();
        let store = down.stores()[0].clone();
        let shutdown = CancellationToken::new();
        let running = tokio::spawn(
            Subscription::new("down", "up", link, store.clone(), Arc::new(SkipSome))
                .run(shutdown.clone()),
        );
        until("the subscription records the upstream log", || {
            store.upstream_log_id("up").unwrap().is_some()
        })
        .await;
        let append = |order_id: &str| {
            upstream
                .write(|txn| {
                    txn.append(&Event {
                        order_id: order_id.into(),
                        ..Default::default()
                    });
                    Ok::<_, StoreError>(())
                })
                .unwrap();
        };

        // Three ignored entries, each committed upstream on its own, and nothing after them.
        let commits = store.commits();
        for n in 0..3 {
            append(&format!("skip-{n}"));
        }
        until("the ignored entries are recorded as consumed", || {
            store.consumed_offset("up").unwrap() == 3
        })
        .await;
        assert!(
            store.commits() - commits <= 2,
            "{} commits for 3 ignored entries",
            store.commits() - commits
        );
        assert_eq!(store.outbox().next_offset(), 0);
        until("upstream learns they were consumed", || {
            upstream.outbox().acked("down").unwrap() == Some(3)
        })
        .await;

        // Ignored entries followed by one the stage applies: recorded together with it.
        append("skip-3");
        append("order-4");
        until("the order is applied", || store.outbox().next_offset() == 1).await;
        assert_eq!(store.consumed_offset("up").unwrap(), 5);
        let passed = store.outbox().events(0, 10).unwrap();
        assert_eq!(passed[0].order_id, "order-4");

        shutdown.cancel();
        running.await.unwrap();
        serving.0.cancel();
        serving.1.await.unwrap();
    }

    /// Passes on failed payments only, and asks upstream to send nothing else.
    struct FailedPaymentsOnly;

    impl Apply for FailedPaymentsOnly {
        type Event = Event;
        type Prepared = ();

        fn ignores(&self, event: &Event) -> bool {
            !matches!(event.kind, Some(Kind::PaymentFailed(_)))
        }

        fn filter(&self) -> Option<EventFilter> {
            Some(EventFilter::kinds(&["payment_failed"]))
        }

        fn apply(&self, txn: &mut Txn, entry: &Entry<Event>, _: &mut ()) -> Result<(), StoreError> {
            assert!(
                !self.ignores(&entry.event),
                "sent what the filter leaves out"
            );
            txn.append(&entry.event);
            Ok(())
        }
    }

    /// A filtered subscription is sent only what its filter keeps; the batches say how far the log
    /// was read, so the consumer records, and acknowledges, the offsets past the entries left out,
    /// also when a stretch of the log holds nothing it keeps.
    #[tokio::test]
    async fn a_filtered_subscription_is_sent_what_it_keeps_and_moves_past_the_rest() {
        use orderflow_proto::v1::{
            EntryFilter, PaymentFailed, StockReserved, event_log_client::EventLogClient as Client,
        };

        let dir = tempfile::tempdir().unwrap();
        let (upstream, address, serving) = upstream_for_down(dir.path()).await;
        let append = |kinds: &[Kind]| {
            upstream
                .write(|txn| {
                    for kind in kinds {
                        txn.append(&Event {
                            order_id: "p0-o".into(),
                            kind: Some(kind.clone()),
                            ..Default::default()
                        });
                    }
                    Ok::<_, StoreError>(())
                })
                .unwrap();
        };
        let reserved = Kind::StockReserved(StockReserved::default());
        let failed = Kind::PaymentFailed(PaymentFailed::default());
        append(&[reserved.clone(), reserved.clone(), reserved.clone(), failed]);
        append(&[reserved.clone(), reserved.clone()]);

        // What the log sends: the one failed payment, and how far it read.
        let mut client = Client::connect(address.clone()).await.unwrap();
        let request = SubscribeRequest {
            stop_at_head: true,
            filter: Some(EventFilter::kinds(&["payment_failed"]).to_request()),
            ..Default::default()
        };
        let mut stream = client
            .subscribe(request.clone())
            .await
            .unwrap()
            .into_inner();
        let mut batches = Vec::new();
        while let Some(batch) = stream.message().await.unwrap() {
            batches.push(batch);
        }
        let offsets: Vec<u64> = batches
            .iter()
            .flat_map(|b| b.entries.iter().map(|e| e.offset))
            .collect();
        assert_eq!(offsets, [3]);
        assert_eq!(batches.last().unwrap().next_offset, 6);
        // A kind that is not one is refused, and named.
        let bad = SubscribeRequest {
            filter: Some(EntryFilter {
                kinds: vec!["payment_failed".into(), "PaymentFailed".into()],
                addressed_to: None,
            }),
            ..request
        };
        let refused = client.subscribe(bad).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument);
        assert!(refused.message().contains("filter.kinds[1]"), "{refused:?}");

        // A consumer reading through the filter.
        let args = ServerArgs::new("127.0.0.1:0".parse().unwrap(), dir.path().join("down"));
        let link = args.link(&address.parse().unwrap()).unwrap();
        let down = StageServer::bind("down", args).await.unwrap();
        let store = down.stores()[0].clone();
        let shutdown = CancellationToken::new();
        let running = tokio::spawn(
            Subscription::new(
                "down",
                "up",
                link,
                store.clone(),
                Arc::new(FailedPaymentsOnly),
            )
            .run(shutdown.clone()),
        );
        until(
            "the failed payment is applied and the rest read past",
            || store.consumed_offset("up").unwrap() == 6,
        )
        .await;
        assert_eq!(store.outbox().next_offset(), 1);
        until("upstream learns all six were consumed", || {
            upstream.outbox().acked("down").unwrap() == Some(6)
        })
        .await;
        // A stretch with nothing the filter keeps is still read past, and acknowledged.
        append(&[reserved.clone(), reserved.clone(), reserved]);
        until("the stretch left out is recorded as consumed", || {
            store.consumed_offset("up").unwrap() == 9
        })
        .await;
        until("and acknowledged", || {
            upstream.outbox().acked("down").unwrap() == Some(9)
        })
        .await;
        assert_eq!(store.outbox().next_offset(), 1);

        shutdown.cancel();
        running.await.unwrap();
        serving.0.cancel();
        serving.1.await.unwrap();
    }

    #[test]
    fn backoff_grows_to_its_ceiling_and_resets() {
        let mut backoff = Backoff::new();
        let pauses: Vec<_> = (0..10).map(|_| backoff.next_pause()).collect();
        assert!(pauses[0] <= BACKOFF_MIN);
        assert!(pauses.iter().all(|p| *p <= BACKOFF_MAX));
        assert!(pauses[9] >= BACKOFF_MAX / 2);
        backoff.reset();
        assert!(backoff.next_pause() <= BACKOFF_MIN);
    }
}
