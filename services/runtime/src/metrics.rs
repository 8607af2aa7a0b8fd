//! Prometheus metrics of every stage, served as text exposition on `GET /metrics`
//! (`--metrics-listen`).
//!
//! One recorder per process: a process running several stages (`orderflow up`) serves them all on
//! one port, told apart by the `stage` label that every metric carries. The names are listed here
//! and in README so dashboards have one place to look. Whatever is updated per event goes through
//! [`count`] and [`observe`], which keep each thread's handles instead of asking the recorder for
//! one every time.

use std::{cell::RefCell, net::SocketAddr, sync::OnceLock, time::Duration};

use axum::{Router, routing::get};
use metrics::{Counter, Histogram, Label};
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
/// 1 while the upstream log refuses this stage's store (`STORE_BEHIND`, `LOG_REPLACED`, `HELD`,
/// `FENCED`), else 0, per `upstream` (gauge).
pub const UPSTREAM_REFUSED: &str = "orderflow_upstream_refused";
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

/// Labels of a metric the stages update per event: every one is a `&'static str` pair (stage,
/// work, outcome, …), so a label set can be compared without building a metrics `Key`.
pub type Labels<const N: usize> = [(&'static str, &'static str); N];

/// Handles looked up in the recorder once per thread and label set: asking the recorder builds,
/// allocates and hashes a key and takes a lock, which per event was ~7 % of the notifier's CPU
/// while it caught up. The few label sets a thread uses are kept in a list.
struct HandleCache<H> {
    handles: Vec<Cached<H>>,
}

/// A handle with the metric name and labels it was taken for.
struct Cached<H> {
    name: &'static str,
    labels: Vec<(&'static str, &'static str)>,
    handle: H,
}

impl<H: Clone> HandleCache<H> {
    const fn new() -> Self {
        HandleCache {
            handles: Vec::new(),
        }
    }

    fn get(
        &mut self,
        name: &'static str,
        labels: &[(&'static str, &'static str)],
        register: impl FnOnce(Vec<Label>) -> H,
    ) -> H {
        let same = |a: &str, b: &str| std::ptr::eq(a, b) || a == b;
        let found = self.handles.iter().find(|cached| {
            same(cached.name, name)
                && cached.labels.len() == labels.len()
                && cached
                    .labels
                    .iter()
                    .zip(labels)
                    .all(|((k, v), (k2, v2))| same(k, k2) && same(v, v2))
        });
        if let Some(cached) = found {
            return cached.handle.clone();
        }
        // Installed before the first handle is taken: one taken without a recorder would stay a
        // no-op for good.
        let _ = handle();
        let handle = register(labels.iter().map(|&(k, v)| Label::new(k, v)).collect());
        self.handles.push(Cached {
            name,
            labels: labels.to_vec(),
            handle: handle.clone(),
        });
        handle
    }
}

thread_local! {
    static COUNTERS: RefCell<HandleCache<Counter>> = const { RefCell::new(HandleCache::new()) };
    static HISTOGRAMS: RefCell<HandleCache<Histogram>> = const { RefCell::new(HandleCache::new()) };
}

/// Adds `by` to the counter `name` with `labels`, for code that counts per event.
pub fn count<const N: usize>(name: &'static str, labels: Labels<N>, by: u64) {
    COUNTERS.with_borrow_mut(|cache| {
        cache
            .get(name, &labels, |labels| metrics::counter!(name, labels))
            .increment(by);
    });
}

/// Records `value` in the histogram `name` with `labels`, for code that records per event.
pub fn observe<const N: usize>(name: &'static str, labels: Labels<N>, value: f64) {
    HISTOGRAMS.with_borrow_mut(|cache| {
        cache
            .get(name, &labels, |labels| metrics::histogram!(name, labels))
            .record(value);
    });
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

/// How often histogram samples are folded into their buckets. A catching-up notifier records
/// ≈ 300,000 samples a second; folded every second they held ≈ 6 MiB at its peak, every 100 ms
/// the peak is ≈ 5 MiB lower, for ≈ 0.4 ms of CPU a second in an idle stage (BENCHMARKS.md,
/// "2026-12-04, midnight").
const UPKEEP_INTERVAL: Duration = Duration::from_millis(100);

/// Binds the metrics listener, with an error naming the flag and the variable.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, String> {
    TcpListener::bind(addr).await.map_err(|e| {
        format!("cannot listen on {addr} (--metrics-listen, ORDERFLOW_METRICS_LISTEN): {e}")
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// The line of `series` in the exposition, if any.
    fn line(series: &str) -> Option<String> {
        let text = handle().unwrap().render();
        text.lines()
            .find(|l| l.starts_with(series))
            .map(str::to_owned)
    }

    #[test]
    fn cached_handles_count_into_the_series_of_their_labels() {
        const NAME: &str = "orderflow_cache_test_total";
        // The same label values at another address find the same series.
        let stage: &'static str = String::from("stock").leak();
        count(NAME, [("stage", "stock"), ("outcome", "reserved")], 1);
        count(NAME, [("stage", stage), ("outcome", "reserved")], 2);
        count(NAME, [("stage", "stock"), ("outcome", "rejected")], 5);
        // A set with fewer labels is a series of its own.
        count(NAME, [("stage", "stock")], 7);
        assert_eq!(
            line(r#"orderflow_cache_test_total{stage="stock",outcome="reserved"}"#).unwrap(),
            r#"orderflow_cache_test_total{stage="stock",outcome="reserved"} 3"#
        );
        assert_eq!(
            line(r#"orderflow_cache_test_total{stage="stock",outcome="rejected"}"#).unwrap(),
            r#"orderflow_cache_test_total{stage="stock",outcome="rejected"} 5"#
        );
        assert_eq!(
            line(r#"orderflow_cache_test_total{stage="stock"}"#).unwrap(),
            r#"orderflow_cache_test_total{stage="stock"} 7"#
        );
        // On another thread the handles are looked up again, into the same series.
        std::thread::spawn(|| count(NAME, [("stage", "stock"), ("outcome", "rejected")], 1))
            .join()
            .unwrap();
        assert!(
            line(r#"orderflow_cache_test_total{stage="stock",outcome="rejected"} 6"#).is_some()
        );
    }

    #[test]
    fn cached_histograms_record_into_their_series() {
        const NAME: &str = "orderflow_cache_test_seconds";
        observe(NAME, [("stage", "invoice")], 0.002);
        observe(NAME, [("stage", "invoice")], 0.02);
        handle().unwrap().run_upkeep();
        assert_eq!(
            line(r#"orderflow_cache_test_seconds_count{stage="invoice"}"#).unwrap(),
            r#"orderflow_cache_test_seconds_count{stage="invoice"} 2"#
        );
    }
}
