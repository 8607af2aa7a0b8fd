//! Storage faults, with real filesystem limits: each stage in turn keeps its store on a small tmpfs
//! that the test fills with orders. While the volume is full the stage says so truthfully —
//! `UNAVAILABLE` with a `google.rpc.RetryInfo` (503 with `Retry-After` at the HTTP door), health
//! NOT_SERVING, `orderflow_store_healthy` 0 — and loses nothing; once the volume is grown
//! (`mount -o remount,size=…`) it recovers by itself, without a restart, and every accepted order
//! reaches its end exactly once. A second test shows the receiver's free-space floor turning new
//! orders away (`RESOURCE_EXHAUSTED`, 507) before the volume is full, while the pipeline drains.
//!
//! Mounting needs root. Without it the tests say so and pass, unless `ORDERFLOW_REQUIRE_MOUNT=1`
//! (which `.ci/run` sets).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{collections::HashSet, path::PathBuf, process::Command, time::Duration};

use futures::{StreamExt, stream};
use orderflow_e2e::{Pipeline, PipelineOptions, Stage, catalog, line};
use orderflow_proto::v1::PlaceOrderRequest;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_types::StatusExt;

/// Units of A in stock: far more than any test orders.
const STOCK: u64 = 10_000_000;
/// Orders placed per round while filling a volume.
const ROUND: usize = 400;

/// A tmpfs mounted for one test, unmounted when dropped.
struct Volume {
    dir: tempfile::TempDir,
}

impl Volume {
    /// A tmpfs of `size` (`mount -o size=…`), or `None` (with the reason printed) where this
    /// process may not mount, unless mounting is required.
    fn mount(size: &str) -> Option<Volume> {
        let dir = tempfile::Builder::new()
            .prefix("orderflow-volume-")
            .tempdir()
            .unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output();
        match mounted {
            Ok(output) if output.status.success() => Some(Volume { dir }),
            other => {
                let why = match other {
                    Ok(output) => String::from_utf8_lossy(&output.stderr).trim().to_owned(),
                    Err(e) => e.to_string(),
                };
                assert!(
                    std::env::var("ORDERFLOW_REQUIRE_MOUNT").as_deref() != Ok("1"),
                    "ORDERFLOW_REQUIRE_MOUNT=1 but a tmpfs cannot be mounted: {why}"
                );
                eprintln!("skipped: mounting a tmpfs needs root ({why})");
                None
            }
        }
    }

    fn path(&self) -> PathBuf {
        self.dir.path().to_owned()
    }

    /// Grows (or shrinks) the volume in place.
    fn resize(&self, size: &str) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(self.dir.path())
            .status()
            .unwrap();
        assert!(status.success(), "remounting the tmpfs failed");
    }
}

impl Drop for Volume {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// What a round of orders came to.
#[derive(Default)]
struct Placed {
    accepted: Vec<String>,
    /// Each refusal with the request it refused, to be retried with the same idempotency key.
    refused: Vec<(tonic::Status, PlaceOrderRequest)>,
}

impl Placed {
    fn statuses(&self) -> impl Iterator<Item = &tonic::Status> {
        self.refused.iter().map(|(status, _)| status)
    }
}

/// Places a round of `ROUND` orders of one unit of A, each with its own idempotency key, as a
/// careful client does.
async fn place_round(pipeline: &Pipeline, round: usize) -> Placed {
    let requests = (0..ROUND).map(|i| PlaceOrderRequest {
        customer_id: format!("round-{round}"),
        lines: vec![line("A", 1)],
        idempotency_key: format!("order-{i}"),
    });
    let client = pipeline.receiver().await;
    let answers: Vec<_> = stream::iter(requests)
        .map(|request| {
            let mut client = client.clone();
            async move {
                let answer = client.place_order(request.clone()).await;
                (answer.map(|r| r.into_inner().order_id), request)
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    let mut placed = Placed::default();
    for (answer, request) in answers {
        match answer {
            Ok(id) => placed.accepted.push(id),
            Err(status) => placed.refused.push((status, request)),
        }
    }
    placed
}

/// The `google.rpc.ErrorInfo` reason of a refusal.
fn reason(status: &tonic::Status) -> Option<String> {
    status.get_details_error_info().map(|info| info.reason)
}

/// POST /v1/orders at the receiver's HTTP door: status, `Retry-After` and the error's reason.
async fn http_place(pipeline: &Pipeline) -> (u16, Option<String>, Option<String>) {
    let door = pipeline.stage("receiver").http_url().unwrap().to_owned();
    let response = reqwest::Client::new()
        .post(format!("{door}/v1/orders"))
        .json(&serde_json::json!({"customer_id": "web", "lines": [{"sku": "A", "quantity": 1}]}))
        .send()
        .await
        .unwrap();
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let code = response.status().as_u16();
    let body: serde_json::Value = response.json().await.unwrap();
    let reason = body["error"]["reason"].as_str().map(str::to_owned);
    (code, retry_after, reason)
}

/// Every accepted order reaches its end exactly once, the stock and the invoice numbers add up,
/// and every stage is SERVING. (Payments may fail where the simulated gateway's ledger shares the
/// full volume: those orders end told so, with their stock given back.)
async fn everything_accounted_for(pipeline: &Pipeline, accepted: &[String]) {
    use orderflow_proto::v1::{NotificationKind, OrderStatus};
    let done = pipeline
        .wait_for_terminal(accepted, Duration::from_secs(180))
        .await
        .unwrap();
    assert!(
        done.iter().all(|o| o.status() == OrderStatus::Notified),
        "not every order ended notified"
    );
    let notifications = pipeline
        .wait_for_notifications(accepted.len(), Duration::from_secs(60))
        .await
        .unwrap();
    let notified: HashSet<&str> = notifications.iter().map(|n| n.order_id.as_str()).collect();
    let accepted_ids: HashSet<&str> = accepted.iter().map(String::as_str).collect();
    let mut twice: Vec<&str> = notifications
        .iter()
        .map(|n| n.order_id.as_str())
        .filter(|id| notifications.iter().filter(|n| n.order_id == *id).count() > 1)
        .collect();
    twice.dedup();
    assert_eq!(
        notifications.len(),
        accepted.len(),
        "notified once each; notified twice: {twice:?}; notified but not accepted: {:?}",
        notified.difference(&accepted_ids).collect::<Vec<_>>()
    );
    assert_eq!(
        notified,
        accepted.iter().map(String::as_str).collect::<HashSet<_>>()
    );
    let confirmed = notifications
        .iter()
        .filter(|n| n.kind() == NotificationKind::Confirmed)
        .count();
    let unpaid = notifications
        .iter()
        .filter(|n| n.kind() == NotificationKind::PaymentFailed)
        .count();
    assert_eq!(confirmed + unpaid, accepted.len(), "no order rejected");
    let mut numbers: Vec<u64> = pipeline
        .invoices()
        .await
        .unwrap()
        .iter()
        .map(|i| i.number)
        .collect();
    numbers.sort_unstable();
    let gap_free = numbers.iter().copied().eq(1..=confirmed as u64);
    assert!(
        gap_free,
        "{} invoices for {confirmed} confirmed orders, from {:?} to {:?}",
        numbers.len(),
        numbers.first(),
        numbers.last()
    );
    // Released stock was given back; confirmed stock stays reserved.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let stock = pipeline.stock_levels().await.unwrap();
        let a = &stock["A"];
        if a.available == STOCK - confirmed as u64 && a.reserved == confirmed as u64 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "stock of A: {} available, {} reserved; {confirmed} confirmed, {unpaid} unpaid",
            a.available,
            a.reserved
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for stage in &pipeline.stages {
        assert_eq!(
            stage.health().await,
            ServingStatus::Serving,
            "{}",
            stage.name
        );
    }
}

/// `stage` keeps its store on a tmpfs of `size`: fill it, check what everyone is told, grow it,
/// and check that the stage recovered by itself and nothing was lost or doubled. With `stalled`,
/// that stage is frozen meanwhile (SIGSTOP), so that the log of the stage under test, which
/// retention would otherwise trim, keeps growing.
async fn fill_and_recover(stage: &'static str, size: &str, stalled: Option<&'static str>) {
    let Some(volume) = Volume::mount(size) else {
        return;
    };
    let pipeline = Pipeline::start(PipelineOptions {
        catalog: catalog(&[("A", 100, STOCK)]),
        tax_rate_bps: 2_000,
        with_notifier: true,
        store_dirs: vec![(stage, volume.path())],
        // The volume is the only limit under test.
        env: vec![("ORDERFLOW_MIN_FREE_SPACE".into(), "0".into())],
        ..Default::default()
    })
    .await
    .unwrap();
    let starts_before = pipeline.stage(stage).logs().matches("listening").count();
    if let Some(stalled) = stalled {
        pipeline.stage(stalled).pause();
    }

    let mut accepted = Vec::new();
    let mut refused = Vec::new();
    let mut full = false;
    for round in 0..200 {
        let placed = place_round(&pipeline, round).await;
        accepted.extend(placed.accepted);
        refused.extend(placed.refused);
        if pipeline.stage(stage).health().await == ServingStatus::NotServing {
            full = true;
            break;
        }
    }
    assert!(full, "{stage} never filled its {size} volume");
    // Unready, not dead: the liveness name (Kubernetes' liveness probe) stays SERVING.
    assert_eq!(
        pipeline.stage(stage).health_of("liveness").await,
        ServingStatus::Serving
    );
    eprintln!("{stage}: full after {} accepted orders", accepted.len());
    let metrics = pipeline.stage(stage).scrape().await.unwrap();
    assert_eq!(
        metrics.value("orderflow_store_healthy", &[("stage", stage)]),
        Some(0.0)
    );
    assert!(
        metrics
            .value(
                "orderflow_store_faults_total",
                &[("stage", stage), ("kind", "disk_full"), ("partition", "0")]
            )
            .is_some_and(|n| n >= 1.0),
        "{}",
        metrics.0
    );

    if stage == "receiver" {
        // Callers are told precisely: retry; and whether anything of theirs may have been stored.
        let placed = place_round(&pipeline, 1000).await;
        accepted.extend(placed.accepted);
        assert!(!placed.refused.is_empty());
        for (status, _) in &placed.refused {
            assert_eq!(status.code(), Code::Unavailable, "{status:?}");
            assert!(status.message().contains("data volume full"), "{status:?}");
            assert!(status.get_details_retry_info().is_some(), "{status:?}");
            // The store was refusing writes already: none of these reached it.
            assert_eq!(reason(status).as_deref(), Some("NOT_STORED"), "{status:?}");
        }
        refused.extend(placed.refused);
        for status in refused.iter().map(|(status, _)| status) {
            assert_eq!(status.code(), Code::Unavailable, "{status:?}");
            assert!(
                matches!(
                    reason(status).as_deref(),
                    Some("NOT_STORED" | "MAYBE_STORED")
                ),
                "{status:?}"
            );
        }
        let (code, retry_after, reason) = http_place(&pipeline).await;
        assert_eq!(code, 503);
        assert!(retry_after.is_some());
        assert_eq!(reason.as_deref(), Some("NOT_STORED"));
    } else {
        let statuses: Vec<_> = refused.iter().map(|(status, _)| status).collect();
        assert!(statuses.is_empty(), "the receiver refused: {statuses:?}");
    }

    volume.resize("256m");
    if let Some(stalled) = stalled {
        pipeline.stage(stalled).resume();
    }
    pipeline
        .stage(stage)
        .wait_for_health(ServingStatus::Serving, Duration::from_secs(30))
        .await;
    // Every refused order retried with its idempotency key: one the receiver said it had not
    // stored is new now; one whose commit failed is either new or answered as the stored one.
    let mut client = pipeline.receiver().await;
    let mut maybe_stored = (0, 0);
    for (status, request) in refused {
        let retried = client.place_order(request).await.unwrap().into_inner();
        if reason(&status).as_deref() == Some("NOT_STORED") {
            assert!(
                !retried.replayed,
                "{} was stored: {status:?}",
                retried.order_id
            );
        } else {
            maybe_stored.0 += 1;
            maybe_stored.1 += usize::from(retried.replayed);
        }
        accepted.push(retried.order_id);
    }
    eprintln!(
        "{stage}: {} of {} orders whose commit failed had been stored",
        maybe_stored.1, maybe_stored.0
    );
    // Orders are welcome again.
    let placed = place_round(&pipeline, 2000).await;
    assert!(
        placed.refused.is_empty(),
        "{:?}",
        placed.statuses().collect::<Vec<_>>()
    );
    accepted.extend(placed.accepted);
    eprintln!("{stage}: {} orders accepted in all", accepted.len());
    everything_accounted_for(&pipeline, &accepted).await;
    assert_eq!(
        pipeline.stage(stage).logs().matches("listening").count(),
        starts_before,
        "recovered without a restart"
    );
    assert!(pipeline.stage(stage).logs().contains("recovered"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_receiver_volume_is_reported_and_survived() {
    fill_and_recover("receiver", "3m", None).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_stock_volume_is_reported_and_survived() {
    // Stock keeps little but its log: with the invoice stage frozen, the log keeps growing.
    fill_and_recover("stock", "3m", Some("invoice")).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_invoice_volume_is_reported_and_survived() {
    fill_and_recover("invoice", "3m", None).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_notifier_volume_is_reported_and_survived() {
    fill_and_recover("notifier", "3m", None).await;
}

/// Below `--min-free-space` the receiver turns new orders away before its volume is full, stays
/// SERVING, and the stages after it drain everything it accepted.
#[tokio::test(flavor = "multi_thread")]
async fn the_free_space_floor_refuses_orders_before_the_volume_fills() {
    let Some(volume) = Volume::mount("24m") else {
        return;
    };
    let pipeline = Pipeline::start(PipelineOptions {
        catalog: catalog(&[("A", 100, STOCK)]),
        with_notifier: true,
        store_dirs: vec![("receiver", volume.path())],
        receiver_args: vec!["--min-free-space".into(), "18MiB".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let mut accepted = Vec::new();
    let mut refused = Vec::new();
    for round in 0..200 {
        let placed = place_round(&pipeline, round).await;
        accepted.extend(placed.accepted);
        if !placed.refused.is_empty() {
            refused = placed.refused;
            break;
        }
    }
    assert!(!refused.is_empty(), "the floor never refused an order");
    for (status, _) in &refused {
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert!(status.message().contains("--min-free-space"), "{status:?}");
        assert!(status.get_details_retry_info().is_some(), "{status:?}");
        assert_eq!(
            status.get_details_error_info().map(|i| i.reason),
            Some("DATA_VOLUME_LOW".to_owned())
        );
    }
    let (code, retry_after, reason) = http_place(&pipeline).await;
    assert_eq!(code, 507);
    assert!(retry_after.is_some());
    assert_eq!(reason.as_deref(), Some("DATA_VOLUME_LOW"));
    // The volume never filled: the receiver is healthy and everything it accepted drains.
    assert_eq!(
        pipeline.stage("receiver").health().await,
        ServingStatus::Serving
    );
    let metrics = pipeline.stage("receiver").scrape().await.unwrap();
    assert_eq!(
        metrics.value("orderflow_store_healthy", &[("stage", "receiver")]),
        Some(1.0)
    );
    assert!(
        metrics
            .value("orderflow_data_free_bytes", &[("stage", "receiver")])
            .is_some_and(|free| free < (18 << 20) as f64)
    );
    everything_accounted_for(&pipeline, &accepted).await;

    // Room again: orders are accepted within a measurement or two.
    volume.resize("256m");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let placed = place_round(&pipeline, 1000).await;
    assert!(
        placed.refused.is_empty(),
        "{:?}",
        placed.statuses().collect::<Vec<_>>()
    );
    accepted.extend(placed.accepted);
    everything_accounted_for(&pipeline, &accepted).await;
}

/// The `meta` table every store keeps (`services/runtime/src/store.rs`).
const META: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("meta");

/// The partition count a store records, or `None`.
fn recorded_partitions(store: &std::path::Path) -> Option<u64> {
    let db = redb::Database::create(store).unwrap();
    let read = redb::ReadableDatabase::begin_read(&db).unwrap();
    let meta = read.open_table(META).unwrap();
    meta.get("partition.count").unwrap().map(|v| v.value())
}

/// A store keeps the partition count it was created with. A stage started on a store made for
/// another count (here 4, as a store of a partitioned pipeline records it) refuses to start,
/// names the flag and leaves the store as it was, rather than consuming, numbering or retaining
/// the wrong entries.
#[tokio::test(flavor = "multi_thread")]
async fn a_store_made_for_another_partition_count_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut invoice = Stage::start(
        "invoice",
        "127.0.0.1:0",
        dir.path(),
        vec!["--upstream".into(), "http://127.0.0.1:9".into()],
    )
    .await
    .unwrap();
    assert!(invoice.terminate().await.unwrap());
    let store = dir.path().join("invoice.redb");
    assert_eq!(recorded_partitions(&store), Some(1));

    {
        let db = redb::Database::create(&store).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(META)
            .unwrap()
            .insert("partition.count", 4)
            .unwrap();
        txn.commit().unwrap();
    }
    let refused = Command::new(orderflow_e2e::binary("orderflow-invoice"))
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "none"])
        .args(["--upstream", "http://127.0.0.1:9", "--data-dir"])
        .arg(dir.path())
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{said}");
    assert!(
        said.contains("holds partition 0 of 4, not partition 0 of 1")
            && said.contains("ORDERFLOW_PARTITIONS"),
        "{said}"
    );
    assert!(
        !String::from_utf8_lossy(&refused.stdout).contains("listening on"),
        "it served"
    );
    assert_eq!(
        recorded_partitions(&store),
        Some(4),
        "the refusal changed the store"
    );
}
