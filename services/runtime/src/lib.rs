//! The shared machinery of every orderflow stage: the crash-safe store with its outbox log, the
//! `EventLog` service that streams it downstream with end-to-end flow control, the subscription loop
//! that consumes an upstream log exactly once, and the server plumbing (health, reflection, drain).
//!
//! It knows nothing about orders: stages plug their business logic in through [`Apply`] and their own
//! tonic service through [`StageServer::serve`].
//!
//! # Layout
//! Private modules, whose surface is re-exported below:
//! - `store`: [`Store`] and [`Txn`] — one redb transaction per batch: state, outbox appends,
//!   offsets; storage faults ([`Fault`], [`Condition`]), and reopening the store to recover.
//! - `outbox`: [`Outbox`] — the log half of the store: reading it, the consumers it is kept for,
//!   their acknowledgements, trimming.
//! - `partition`: [`Partition`] — which partition of the pipeline a store holds, fixed when the
//!   store is created; the partition a key belongs to ([`home_partition`]) and the one an order id
//!   names ([`order_id`], [`order_partition`]).
//! - `peers`: [`Peers`] — the other replicas of a stage (`--peers`), and forwarding a call to the
//!   one that owns a partition ([`forward_to`], [`FORWARDED`]); [`Partitions`] — which partitions
//!   a replica answers for itself and where the others are ([`Owner`]).
//! - `disk`: the data volume's [`FreeSpace`] against `--min-free-space` ([`MinFreeSpace`]).
//! - `eventlog`: [`EventLogService`] — `Subscribe`/`Ack`/`Head` over the outbox.
//! - `filter`: [`EventFilter`] — which entries a subscription is sent (its event kinds, and the
//!   stock shards' holds only to the shard they are addressed to).
//! - `fencing`: which process may apply a log as a consumer, from which store ([`Refusal`]).
//! - `retention`: deleting what every consumer has acknowledged, and the outbox's metrics.
//! - `subscription`: [`Subscription`] — a downstream stage's loop over its upstream's log, applying
//!   each batch through the stage's [`Apply`]; [`Admission`] for backpressure.
//! - `group_commit`: [`GroupCommit`] — many callers' writes in one fsync'd transaction.
//! - `retry`: [`RetryQueue`] — durable outside calls with backoff; the stage's side is
//!   [`RetryWork`].
//! - `server`: [`StageServer`] — bind, serve with health and reflection, drain on shutdown;
//!   [`run_main`], [`respond`].
//! - `health`: `grpc.health.v1` with strict decoding.
//! - `config`: flags and env vars every stage shares ([`ServerArgs`], [`UpstreamArgs`]), with errors
//!   that name both.
//! - `auth`: the admin token ([`AdminGuard`]) and the link credential ([`LinkGuard`], [`LinkAuth`]).
//! - `shutdown`: [`shutdown_on_signal`].
//!
//! Public modules, used by name (`telemetry::inject`, `metrics::EVENTS_PROCESSED`, …):
//! - [`telemetry`]: logging, tracing and trace-context propagation.
//! - [`metrics`]: the names of every metric the stages export, and [`metrics::count`] /
//!   [`metrics::observe`] for what is updated per event (handles looked up once per thread).
//! - [`status`]: the RPC edge: gRPC statuses for store errors and field violations, and
//!   [`Store::call`], which runs store work for an RPC handler.
//! - [`paging`]: page sizes and tokens, pages filled by rows and bytes, numeric-keyed pages.
//! - [`dead_letters`]: the dead-letter table every stage with outside calls keeps.
//! - [`tls`]: server identities, client configs and endpoints.

mod auth;
mod config;
pub mod dead_letters;
mod disk;
mod eventlog;
mod fencing;
mod filter;
mod group_commit;
mod health;
pub mod metrics;
mod outbox;
pub mod paging;
mod partition;
mod peers;
mod retention;
mod retry;
mod server;
mod shutdown;
pub mod status;
mod store;
mod subscription;
pub mod telemetry;
pub mod tls;

pub use auth::{AdminGuard, AdminToken, LinkAuth, LinkGuard, LinkToken};
pub use config::{
    ConsumerNames, Link, OptionalAddr, ServerArgs, StageCommand, UpstreamArgs, UpstreamUrl,
    parse_args,
};
pub use disk::{FreeSpace, MinFreeSpace};
pub use eventlog::EventLogService;
pub use fencing::Refusal;
pub use filter::EventFilter;
pub use group_commit::{GroupCommit, WriterName};
pub use outbox::{Outbox, Scan};
pub use paging::{NumericPage, PageFill, PagedList, PartitionedPage};
pub use partition::{MAX_PARTITIONS, Partition, home_partition, order_id, order_partition};
pub use peers::{FORWARDED, Owner, Partitions, Peers, forward_to, forwarded_by};
pub use retry::{
    Attempt, FIRST_ATTEMPTS_BUDGET, Failure, FirstAttempt, FirstAttempts, NewTask, Outcome,
    RetryPolicy, RetryQueue, RetryWork, Settling,
};
pub use server::{
    MAX_REQUEST_BYTES, MAX_RESPONSE_BYTES, ServeError, StageServer, raise_open_files_limit,
    respond, run_main, store_path,
};
pub use shutdown::shutdown_on_signal;
pub use status::FieldViolations;
pub use store::{
    Appends, Commit, Condition, Fault, FaultKind, Store, StoreError, Txn, decode_record,
};
pub use subscription::{Admission, Apply, Decode, Entry, Skipped, Subscription};
pub use tls::ServerIdentity;

/// The event a stage emits about the order `upstream` is about: same order, customer and placement
/// time, stamped now, with the stage's own payload and `trace_context` — that of the stage's span for
/// this order ([`telemetry::inject`]), so the next stage's span becomes its child.
pub fn follow_up(
    upstream: &orderflow_proto::v1::Event,
    trace_context: std::collections::HashMap<String, String>,
    kind: orderflow_proto::v1::event::Kind,
) -> orderflow_proto::v1::Event {
    orderflow_proto::v1::Event {
        order_id: upstream.order_id.clone(),
        customer_id: upstream.customer_id.clone(),
        at: Some(now_timestamp()),
        placed_at: upstream.placed_at,
        trace_context,
        kind: Some(kind),
    }
}

/// Counts an event processed by `stage` with `outcome`, and the time since `upstream` was committed.
pub fn record_processed(
    stage: &'static str,
    outcome: &'static str,
    upstream: &orderflow_proto::v1::Event,
) {
    record_processed_since(stage, outcome, upstream.at);
}

/// [`record_processed`] for a stage that reads only part of its upstream events: `at` is when the
/// upstream event was committed.
pub fn record_processed_since(
    stage: &'static str,
    outcome: &'static str,
    at: Option<prost_types::Timestamp>,
) {
    metrics::count(
        metrics::EVENTS_PROCESSED,
        [("stage", stage), ("outcome", outcome)],
        1,
    );
    if let Some(elapsed) = seconds_since(at) {
        metrics::observe(metrics::HOP_SECONDS, [("stage", stage)], elapsed);
    }
}

/// Seconds from `at` to now; `None` without a time, or for one that lies ahead (a clock moved back).
pub fn seconds_since(at: Option<prost_types::Timestamp>) -> Option<f64> {
    let at = std::time::SystemTime::try_from(at?).ok()?;
    let elapsed = std::time::SystemTime::now().duration_since(at).ok()?;
    Some(elapsed.as_secs_f64())
}

/// Milliseconds since the Unix epoch, now.
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `error: cause: cause…` — the whole source chain in one line, since many transport errors say
/// little more than "transport error" on their own.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The current time as a protobuf timestamp.
pub fn now_timestamp() -> prost_types::Timestamp {
    prost_types::Timestamp::from(std::time::SystemTime::now())
}
