//! Prometheus metrics of every stage, served as text exposition on `GET /metrics`
//! (`--metrics-listen`).
//!
//! One recorder per process: a process running several stages (`orderflow up`) serves them all on
//! one port, told apart by the `stage` label that every metric carries. The names are listed here
//! and in README so dashboards have one place to look.

use std::{net::SocketAddr, sync::OnceLock, time::Duration};

use axum::{Router, routing::get};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Events a stage processed, by `outcome` (counter).
pub const EVENTS_PROCESSED: &str = "orderflow_events_processed_total";
/// Seconds one batch transaction took, apply and commit (histogram).
pub const BATCH_COMMIT_SECONDS: &str = "orderflow_batch_commit_seconds";
/// Entries applied per batch transaction (histogram).
pub const BATCH_ENTRIES: &str = "orderflow_batch_entries";
/// Items one group commit wrote in one transaction, by `writer` (histogram): how many callers
/// shared each fsync.
pub const GROUP_COMMIT_ENTRIES: &str = "orderflow_group_commit_entries";
/// Seconds from the upstream stage committing an event to this stage committing its effect
/// (histogram).
pub const HOP_SECONDS: &str = "orderflow_hop_seconds";
/// Upstream head minus this stage's committed offset, per `upstream` (gauge).
pub const CONSUMER_LAG: &str = "orderflow_consumer_lag";
/// Outbox entries kept (gauge).
pub const OUTBOX_ENTRIES: &str = "orderflow_outbox_entries";
/// Offset the next outbox entry gets (gauge).
pub const OUTBOX_NEXT_OFFSET: &str = "orderflow_outbox_next_offset";
/// Outbox entries the slowest registered consumer has not acknowledged (gauge).
pub const BACKLOG: &str = "orderflow_backlog";
/// Outside calls (payment captures, deliveries) by `work` and `outcome` (counter).
pub const ATTEMPTS: &str = "orderflow_attempts_total";
/// Attempts scheduled again after a transient failure, by `work` (counter).
pub const RETRIES: &str = "orderflow_retries_total";
/// Work given up on and dead-lettered, by `work` (counter).
pub const DEAD_LETTERS: &str = "orderflow_dead_letters_total";
/// Work waiting for an outside call, by `work` (gauge).
pub const PENDING_WORK: &str = "orderflow_pending_work";
/// Seconds one outside call took, by `work` (histogram).
pub const ATTEMPT_SECONDS: &str = "orderflow_attempt_seconds";
/// Seconds `PlaceOrder` took to make an order durable (histogram).
pub const PLACE_ORDER_SECONDS: &str = "orderflow_place_order_seconds";
/// Orders refused at the door, by gRPC `code` (counter).
pub const ORDERS_REFUSED: &str = "orderflow_orders_refused_total";
/// 1 while the stage's store can commit, 0 while it is failing and recovering (gauge).
pub const STORE_HEALTHY: &str = "orderflow_store_healthy";
/// Times the store started failing, by `kind` (`disk_full`, `io`) (counter).
pub const STORE_FAULTS: &str = "orderflow_store_faults_total";
/// Bytes free on the stage's data volume (gauge).
pub const DATA_FREE_BYTES: &str = "orderflow_data_free_bytes";
/// The receiver's `--max-backlog`: the backlog at which it refuses new orders (gauge).
pub const MAX_BACKLOG: &str = "orderflow_max_backlog";
/// Seconds from acceptance to the customer being notified (histogram).
pub const PLACED_TO_NOTIFIED_SECONDS: &str = "orderflow_placed_to_notified_seconds";

/// Bucket bounds of every latency histogram: 100 µs to 60 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0,
];
const SIZE_BUCKETS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2048.0,
];

/// The process's recorder, installed on first use. `None` if another recorder was installed first.
pub fn handle() -> Option<&'static PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let installed = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(BATCH_ENTRIES.into()), SIZE_BUCKETS))
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full(GROUP_COMMIT_ENTRIES.into()), SIZE_BUCKETS)
                })
                .and_then(|b| b.install_recorder());
            match installed {
                Ok(handle) => Some(handle),
                Err(e) => {
                    tracing::warn!(error = %e, "metrics recorder not installed; /metrics will be empty");
                    None
                }
            }
        })
        .as_ref()
}

/// Serves `GET /metrics` on `listener` (if any) until `shutdown`, and keeps the histograms' recent
/// samples folded into their buckets meanwhile: unfolded, they pile up in memory with every order
/// (`--metrics-listen none` included, where nothing ever renders them).
pub async fn serve(listener: Option<TcpListener>, shutdown: CancellationToken) {
    let Some(handle) = handle() else {
        return;
    };
    let upkeep = {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(UPKEEP_INTERVAL);
            loop {
                tokio::select! {
                    _ = tick.tick() => handle.run_upkeep(),
                    () = shutdown.cancelled() => return,
                }
            }
        })
    };
    if let Some(listener) = listener {
        let app = Router::new()
            .route("/metrics", get(move || async move { handle.render() }))
            .route("/", get(|| async { "orderflow metrics: GET /metrics\n" }));
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
        if let Err(e) = served {
            tracing::warn!(error = %e, "metrics server failed");
        }
    }
    let _ = upkeep.await;
}

/// How often histogram samples are folded into their buckets.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Binds the metrics listener, with an error naming the flag and the variable.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, String> {
    TcpListener::bind(addr).await.map_err(|e| {
        format!("cannot listen on {addr} (--metrics-listen, ORDERFLOW_METRICS_LISTEN): {e}")
    })
}
