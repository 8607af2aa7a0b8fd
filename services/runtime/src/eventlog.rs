//! `orderflow.v1.EventLog`, served by every stage over its own outbox.
//!
//! Entries go out as the outbox stores them: each event's encoded bytes, never decoded and encoded
//! again on the way ([`orderflow_proto::stored`]; the same bytes on the wire as `EventBatch`).
//!
//! `Subscribe` runs one producer task per subscriber: it reads a batch from the store, sends it into a
//! bounded channel of [`SUBSCRIBE_CHANNEL_DEPTH`] batches and reads the next one only when the channel
//! has room again. The channel drains only as fast as tonic can write to the HTTP/2 stream, and that
//! only as fast as the peer's flow-control window opens, so a slow reader slows its own producer: the
//! backlog stays on disk and memory per subscriber is bounded by `depth` batches of at most
//! [`MAX_BATCH_BYTES`]. When the producer has caught up it waits on the store's head watch for the
//! next commit (live tail), or ends the stream if the subscriber asked to stop at the head. A
//! subscriber that keeps up is served the newest entries from the outbox's in-memory tail
//! ([`Outbox::scan_recent`]), without a read on a blocking thread per batch. A failed
//! send means the subscriber left, and the producer stops.
//!
//! A subscriber may ask for a filter ([`EventFilter`]): the producer then reads as before but sends
//! only the entries the filter keeps, and each batch's `next_offset` says how far it read. A
//! stretch it keeps nothing of is reported by an empty batch once it is [`FILTERED_REPORT_AFTER`]
//! old, so that a consumer's position, its acknowledgements and retention move past it.
//!
//! `Ack` can make retention delete entries, so it is guarded twice: the caller must carry the link
//! credential when one is configured ([`LinkGuard`]), and a consumer may only acknowledge what its
//! own subscriptions (those that name it in `consumer`) were sent, without a gap from its last
//! acknowledgement ([`Outbox::note_sent`]). A consumer the log is not kept for (`--retain-for`) can
//! neither subscribe under its name nor acknowledge.
//!
//! A stage reading as a consumer into a store of its own names itself an owner in `Subscribe`: the
//! log refuses a store that cannot resume from it, and lets one process at a time read as one
//! consumer ([`crate::fencing`]).
//!
//! Every request names a partition of the log. This service serves the partitions this replica
//! owns, each from its own store; one the pipeline does not have is `INVALID_ARGUMENT`, another one
//! it has is `FAILED_PRECONDITION` (its owner serves it). Fencing is per partition: one process at
//! a time reads partition p as a consumer.

use std::{pin::Pin, sync::Arc};

use futures::Stream;
use orderflow_proto::{
    stored::{StoredEventBatch, event_log_server::EventLog},
    v1::{AckRequest, AckResponse, ConsumerPosition, HeadRequest, HeadResponse, SubscribeRequest},
};
use tokio::{sync::mpsc, time::Instant};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::{
    auth::LinkGuard,
    fencing::{self, Owners},
    filter::EventFilter,
    outbox::{Outbox, Scan},
    status::{FieldViolations, check_name},
    store::blocking,
};

/// Entries per batch when the subscriber does not say.
pub const DEFAULT_MAX_BATCH: u32 = 256;
/// Upper bound on entries per batch, whatever the subscriber asks for.
pub const MAX_MAX_BATCH: u32 = 1000;
/// Encoded bytes per batch at most (one larger entry still goes alone). Keeps every batch far below
/// gRPC's default 4 MiB message limit whatever the orders look like: a maximal order is ~10 KiB.
pub const MAX_BATCH_BYTES: usize = 1024 * 1024;
/// Largest message a subscriber accepts; above [`MAX_BATCH_BYTES`] plus one maximal entry.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
/// Batches buffered between a subscriber's producer task and its HTTP/2 stream.
pub const SUBSCRIBE_CHANNEL_DEPTH: usize = 2;
/// How long a filtered subscription may have read past entries it left out before it reports how
/// far it read (an empty batch), when nothing kept has reported it since.
pub const FILTERED_REPORT_AFTER: std::time::Duration = std::time::Duration::from_millis(100);
/// The EventLog service over the outboxes of the partitions a replica owns.
#[derive(Clone)]
pub struct EventLogService {
    /// Ascending by partition index, all of one partition count; never empty.
    served: Arc<[Served]>,
    /// How many replicas the stage runs, for `Head`.
    replicas: u32,
    /// Cancelled when the stage drains: every producer ends its stream.
    streams: CancellationToken,
    guard: LinkGuard,
}

/// One partition of the log this service serves: its outbox and who reads it as which consumer.
struct Served {
    outbox: Outbox,
    owners: Owners,
}

impl EventLogService {
    /// Serves `outbox`, the one partition a replica owns.
    pub fn new(outbox: Outbox, streams: CancellationToken, guard: LinkGuard) -> Self {
        Self::partitions(vec![outbox], 1, streams, guard)
    }

    /// Serves each of `outboxes`, the partitions a replica of a stage with `replicas` replicas owns
    /// (one store each, all made for the same partition count).
    pub fn partitions(
        mut outboxes: Vec<Outbox>,
        replicas: u32,
        streams: CancellationToken,
        guard: LinkGuard,
    ) -> Self {
        outboxes.sort_by_key(|outbox| outbox.partition().index);
        EventLogService {
            served: outboxes
                .into_iter()
                .map(|outbox| Served {
                    owners: Owners::of_partition(outbox.partition().index),
                    outbox,
                })
                .collect(),
            replicas,
            streams,
            guard,
        }
    }

    /// The partition `requested` if this service serves it; else why not.
    fn served(&self, requested: u32) -> Result<&Served, Status> {
        if let Some(served) = self
            .served
            .iter()
            .find(|served| served.outbox.partition().index == requested)
        {
            return Ok(served);
        }
        let count = self
            .served
            .first()
            .map_or(1, |served| served.outbox.partition().count);
        if requested >= count {
            let mut violations = FieldViolations::new();
            let numbered = match count {
                1 => "has 1 partition, number 0".to_owned(),
                n => format!("has {n} partitions, numbered 0 to {}", n - 1),
            };
            violations.add(
                "partition",
                format!("the pipeline {numbered} (--partitions); got {requested}"),
            );
            violations.check()?;
        }
        let held: Vec<String> = self
            .served
            .iter()
            .map(|served| served.outbox.partition().index.to_string())
            .collect();
        Err(Status::failed_precondition(format!(
            "this replica serves partition {} of {count}, not partition {requested}: ask the \
             replica that owns it",
            held.join(", ")
        )))
    }
}

/// Checks a consumer name from a request, under `field`.
fn check_consumer_field(consumer: &str, violations: &mut FieldViolations) {
    if let Err(why) = check_name(consumer) {
        violations.add("consumer", format!("the consumer name {why}"));
    }
}

type BatchStream = Pin<Box<dyn Stream<Item = Result<StoredEventBatch, Status>> + Send>>;

#[tonic::async_trait]
impl EventLog for EventLogService {
    type SubscribeStream = BatchStream;

    async fn subscribe(
        &self,
        request: Request<SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        self.guard.check(&request)?;
        let request = request.into_inner();
        let Served { outbox, owners } = self.served(request.partition)?;
        let max_batch = match request.max_batch {
            0 => DEFAULT_MAX_BATCH,
            n => n.min(MAX_MAX_BATCH),
        } as usize;
        let consumer = (!request.consumer.is_empty()).then_some(request.consumer);
        let mut violations = FieldViolations::new();
        if let Some(consumer) = &consumer {
            check_consumer_field(consumer, &mut violations);
        }
        let filter = EventFilter::from_request(
            request.filter.as_ref(),
            "filter",
            outbox.partition().count,
            &mut violations,
        );
        if let Some(owner) = &request.owner {
            if consumer.is_none() {
                violations.add("owner", "an owner reads as a consumer: name it in consumer");
            }
            if owner.incarnation == 0 {
                violations.add(
                    "owner.incarnation",
                    "must not be 0: draw a random one at every start",
                );
            }
        }
        violations.check()?;
        // The store's checks come first: a stale process never holds a consumer, and hears why
        // rather than that the entries it asks for are gone.
        if let (Some(owner), Some(consumer)) = (&request.owner, &consumer) {
            fencing::check_store(outbox, consumer, owner)?;
        }
        let from_first = request.from_first;
        // Refuse an impossible start or a stranger's name now rather than as the stream's first item.
        let reader = outbox.clone();
        let named = consumer.clone();
        let requested = request.from_offset;
        let (from, head) = blocking(move || {
            if let Some(consumer) = &named {
                reader.check_consumer(consumer)?;
            }
            let from = if from_first {
                reader.bounds()?.0
            } else {
                requested
            };
            reader.read_log(from, 0, 0)?;
            Ok::<_, crate::store::StoreError>((from, reader.next_offset()))
        })
        .await??;
        let stop_at = request.stop_at_head.then_some(head);
        let claim = match (&request.owner, &consumer) {
            (Some(owner), Some(consumer)) => Some(owners.claim(consumer, owner.incarnation)?),
            _ => None,
        };

        let (tx, rx) = mpsc::channel(SUBSCRIBE_CHANNEL_DEPTH);
        tokio::spawn(produce(
            outbox.clone(),
            Feed {
                from,
                max_batch,
                consumer,
                stop_at,
                from_first,
                filter,
                _claim: claim,
            },
            tx,
            self.streams.clone(),
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn ack(&self, request: Request<AckRequest>) -> Result<Response<AckResponse>, Status> {
        self.guard.check(&request)?;
        let AckRequest {
            consumer,
            offset,
            partition,
            incarnation,
        } = request.into_inner();
        let mut violations = FieldViolations::new();
        check_consumer_field(&consumer, &mut violations);
        violations.check()?;
        let Served { outbox, owners } = self.served(partition)?;
        if incarnation != 0 {
            owners.check(&consumer, incarnation)?;
        }
        let head = outbox.next_offset();
        if offset > head {
            return Err(Status::out_of_range(format!(
                "offset {offset} lies beyond the log's head {head}"
            )));
        }
        let outbox = outbox.clone();
        blocking(move || outbox.ack(&consumer, offset)).await??;
        Ok(Response::new(AckResponse {}))
    }

    async fn head(&self, request: Request<HeadRequest>) -> Result<Response<HeadResponse>, Status> {
        self.guard.check(&request)?;
        let outbox = self.served(request.get_ref().partition)?.outbox.clone();
        let (partition, log_id) = (outbox.partition(), outbox.log_id());
        let ((first, next), consumers) =
            blocking(move || Ok::<_, Status>((outbox.bounds()?, outbox.positions()?))).await??;
        Ok(Response::new(HeadResponse {
            first_offset: first,
            next_offset: next,
            consumers: consumers
                .into_iter()
                .map(|(consumer, acked_offset)| ConsumerPosition {
                    consumer,
                    acked_offset,
                })
                .collect(),
            partition: partition.index,
            partitions: partition.count,
            log_id,
            replicas: self.replicas,
        }))
    }
}

/// What one subscriber asked for.
struct Feed {
    from: u64,
    max_batch: usize,
    /// The consumer it reads for, whose position may follow what it is sent.
    consumer: Option<String>,
    /// End the stream once every entry below this offset is sent.
    stop_at: Option<u64>,
    /// Follow retention: when it deletes the next entry, go on from the first one kept.
    from_first: bool,
    /// Send only what this keeps.
    filter: Option<EventFilter>,
    /// For an owner: its hold on the consumer, for as long as this stream lives.
    _claim: Option<fencing::Claim>,
}

/// Feeds one subscriber from `feed.from` on, one batch at a time, as fast as it takes them.
async fn produce(
    outbox: Outbox,
    mut feed: Feed,
    tx: mpsc::Sender<Result<StoredEventBatch, Status>>,
    shutdown: CancellationToken,
) {
    let mut head_rx = outbox.watch_head();
    let mut next = feed.from;
    // Filtered: since when the reads have gone past entries left out without a batch that says so
    // (the subscriber was last told a `next_offset` below `next`).
    let mut unreported: Option<Instant> = None;
    loop {
        let head = *head_rx.borrow_and_update();
        let stopped = feed.stop_at.is_some_and(|stop| next >= stop);
        let due = |since: Instant| stopped || since.elapsed() >= FILTERED_REPORT_AFTER;
        let entries = if next < head && !stopped {
            let scan = match read(&outbox, &feed, next, head).await {
                Ok(scan) => scan,
                Err(crate::store::StoreError::Truncated { first, .. }) if feed.from_first => {
                    // Not contiguous with what was sent: a consumer's reach restarts from here.
                    feed.from = first;
                    next = first;
                    unreported = None;
                    continue;
                }
                Err(e) => {
                    let _ = tx.send(Err(e.into())).await;
                    return;
                }
            };
            if scan.end == next {
                // Only possible if retention raced past us; the next read reports it.
                continue;
            }
            next = scan.end;
            if scan.entries.is_empty() {
                // All of it left out: said with the next entry kept, or on its own once due.
                let since = *unreported.get_or_insert_with(Instant::now);
                let stopped = feed.stop_at.is_some_and(|stop| next >= stop);
                if !stopped && since.elapsed() < FILTERED_REPORT_AFTER {
                    continue;
                }
            }
            scan.entries
        } else if unreported.is_some_and(due) {
            Vec::new()
        } else if stopped {
            return;
        } else {
            let report = async {
                match unreported {
                    Some(since) => tokio::time::sleep_until(since + FILTERED_REPORT_AFTER).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                changed = head_rx.changed() => if changed.is_err() { return },
                () = report => {}
                () = tx.closed() => return,
                () = shutdown.cancelled() => return,
            }
            continue;
        };
        unreported = None;
        let batch = StoredEventBatch {
            entries,
            head,
            next_offset: next,
        };
        tokio::select! {
            sent = tx.send(Ok(batch)) => if sent.is_err() { return },
            () = shutdown.cancelled() => return,
        }
        if let Some(consumer) = &feed.consumer {
            outbox.note_sent(consumer, feed.from, next);
        }
    }
}

/// The next batch from `next` for `feed`, below the published `head`: from the in-memory tail for a
/// subscriber that keeps up (the tail may already hold a commit not yet published), from the store
/// on a blocking thread for one behind it.
async fn read(
    outbox: &Outbox,
    feed: &Feed,
    next: u64,
    head: u64,
) -> Result<Scan, crate::store::StoreError> {
    let max_batch = match feed.stop_at {
        Some(stop) => feed.max_batch.min((stop - next) as usize),
        None => feed.max_batch,
    };
    let published = usize::try_from(head - next).unwrap_or(usize::MAX);
    let filter = feed.filter.as_ref();
    if let Some(scan) = outbox.scan_recent(next, max_batch.min(published), MAX_BATCH_BYTES, filter)
    {
        return Ok(scan);
    }
    let (reader, filter) = (outbox.clone(), feed.filter);
    blocking(move || reader.scan_log(next, max_batch, MAX_BATCH_BYTES, filter.as_ref())).await?
}
