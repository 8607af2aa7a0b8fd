//! The shared machinery of every orderflow stage: the crash-safe store with its outbox log, the
//! `EventLog` service that streams it downstream with end-to-end flow control, the subscription loop
//! that consumes an upstream log exactly once, and the server plumbing (health, reflection, drain).
//!
//! It knows nothing about orders: stages plug their business logic in through [`Apply`] and their own
//! tonic service through [`StageServer::serve`].
//!
//! # Layout
//! - [`store`]: `Store` and `Txn` — one redb transaction per batch: state, outbox appends, offsets.
//! - [`eventlog`]: `Subscribe`/`Ack`/`Head` over the outbox, and retention.
//! - [`subscription`]: a downstream stage's loop over its upstream's log.
//! - [`server`]: `StageServer` — bind, serve with health and reflection, drain on shutdown.
//! - [`config`]: flags and env vars every stage shares, with errors that name both.
//! - [`status`]: gRPC statuses for store errors and field violations; paging.
//! - [`shutdown`], [`telemetry`]: signals and logging.

pub mod config;
pub mod eventlog;
pub mod server;
pub mod shutdown;
pub mod status;
pub mod store;
pub mod subscription;
pub mod telemetry;

pub use config::{ServerArgs, UpstreamArgs, UpstreamUrl, parse_args};
pub use server::{ServeError, StageServer, run_main};
pub use shutdown::shutdown_on_signal;
pub use status::{FieldViolations, NumericPage, PageFill};
pub use store::{Store, StoreError, Txn, decode_record};
pub use subscription::{Apply, Subscription};

/// The event a stage emits about the order `upstream` is about: same order, customer, placement time
/// and trace context, stamped now, with the stage's own payload.
pub fn follow_up(
    upstream: &orderflow_proto::v1::Event,
    kind: orderflow_proto::v1::event::Kind,
) -> orderflow_proto::v1::Event {
    orderflow_proto::v1::Event {
        order_id: upstream.order_id.clone(),
        customer_id: upstream.customer_id.clone(),
        at: Some(now_timestamp()),
        placed_at: upstream.placed_at,
        trace_context: upstream.trace_context.clone(),
        kind: Some(kind),
    }
}

/// The current time as a protobuf timestamp.
pub fn now_timestamp() -> prost_types::Timestamp {
    prost_types::Timestamp::from(std::time::SystemTime::now())
}
