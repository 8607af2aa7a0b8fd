//! Flow control: with the notifier stopped and a subscriber that stops reading, 20,000 orders go
//! through receiver → stock → invoice while every stage's memory stays bounded (the backlog waits on
//! disk); then the notifier starts and everything drains, each order notified once, and retention
//! deletes what every consumer has acknowledged.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{collections::HashSet, time::Duration};

use orderflow_e2e::{Pipeline, PipelineOptions, catalog, line, named_catalog, place_all};
use orderflow_proto::v1::{HeadRequest, SubscribeRequest, event_log_client::EventLogClient};

const ORDERS: usize = 20_000;
/// Ceiling on any stage's peak RSS (measured on 2026-12-02 with jemalloc, 512 entries per commit and
/// an 8 MiB page cache: receiver 40, stock 29, invoice 62, notifier after catching up 60 MiB; see
/// BENCHMARKS.md). redb's cache is capped at 8 MiB per store and a subscriber buffers at most two
/// batches, so only a leak or unbounded buffering breaks it; the figures are printed for the record.
const MAX_PEAK_RSS_MIB: u64 = 96;

#[tokio::test(flavor = "multi_thread")]
async fn backlog_waits_on_disk_and_drains() {
    let mut pipeline = Pipeline::start(PipelineOptions {
        catalog: catalog(&[("A", 100, 10_000_000), ("B", 250, 10_000_000)]),
        tax_rate_bps: 2_000,
        with_notifier: false,
        ..Default::default()
    })
    .await
    .unwrap();

    // A subscriber that reads one batch and then never again: its producer must block on the
    // HTTP/2 window, not buffer the invoice log in memory.
    let mut stalled = EventLogClient::new(pipeline.stage("invoice").channel().await)
        .subscribe(SubscribeRequest {
            from_offset: 0,
            max_batch: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();

    let orders = (0..ORDERS)
        .map(|i| {
            if i % 2 == 0 {
                vec![line("A", 1), line("B", 2)]
            } else {
                vec![line("B", 1)]
            }
        })
        .collect();
    let placed = place_all(pipeline.receiver().await, "flood", orders, 128).await;
    let accepted: HashSet<String> = placed
        .into_iter()
        .map(|p| p.result.expect("every order accepted"))
        .collect();
    assert_eq!(accepted.len(), ORDERS);
    let first = stalled.message().await.unwrap().unwrap();
    assert!(!first.entries.is_empty());

    // The invoice stage processes everything although nobody drains its log.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    while pipeline.stage("invoice").head().await.unwrap() < ORDERS as u64 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "invoice stage stalled"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for stage in ["receiver", "stock", "invoice"] {
        let peak_mib = pipeline.stage(stage).peak_rss_kib().unwrap() / 1024;
        eprintln!("peak RSS of {stage} with a {ORDERS}-order backlog: {peak_mib} MiB");
        assert!(
            peak_mib <= MAX_PEAK_RSS_MIB,
            "{stage} peaked at {peak_mib} MiB with the notifier stopped"
        );
    }

    // The notifier comes up, catches up from offset 0, and every order is notified once.
    pipeline.start_notifier().await.unwrap();
    let notifications = pipeline
        .wait_for_notifications(ORDERS, Duration::from_secs(300))
        .await
        .unwrap();
    let notified: HashSet<_> = notifications.iter().map(|n| n.order_id.clone()).collect();
    assert_eq!(notifications.len(), ORDERS);
    assert_eq!(notified, accepted);
    let peak_mib = pipeline.stage("notifier").peak_rss_kib().unwrap() / 1024;
    eprintln!("peak RSS of notifier after catching up: {peak_mib} MiB");
    assert!(peak_mib <= MAX_PEAK_RSS_MIB);
    drop(stalled);

    // Retention: once stock has acknowledged everything, the receiver deletes it, and asking for a
    // deleted offset is OUT_OF_RANGE rather than silence.
    let mut receiver_log = EventLogClient::new(pipeline.stage("receiver").channel().await);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let head = receiver_log
            .head(HeadRequest::default())
            .await
            .unwrap()
            .into_inner();
        if head.first_offset == ORDERS as u64 {
            assert_eq!(head.next_offset, ORDERS as u64);
            assert!(head.consumers.iter().any(|c| c.consumer == "stock"));
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "receiver log never trimmed: {head:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let truncated = receiver_log
        .subscribe(SubscribeRequest {
            from_offset: 0,
            max_batch: 0,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(truncated.code(), tonic::Code::OutOfRange);
}

/// The largest valid orders (100 lines, 64-character skus, 200-character names) piled up as a
/// backlog: batches must stay under the gRPC message limit, or the stage behind would reconnect
/// forever instead of catching up.
#[tokio::test(flavor = "multi_thread")]
async fn largest_orders_drain_from_a_backlog() {
    const BIG_ORDERS: usize = 600;
    let skus: Vec<String> = (0..100).map(|i| format!("{i:0>64}")).collect();
    let items: Vec<_> = skus
        .iter()
        .map(|sku| {
            (
                sku.as_str(),
                "n".repeat(200),
                1_000_000_000_000,
                100_000_000,
            )
        })
        .collect();
    let pipeline = Pipeline::start(PipelineOptions {
        catalog: named_catalog(&items),
        tax_rate_bps: 2_000,
        with_notifier: true,
        ..Default::default()
    })
    .await
    .unwrap();
    pipeline.stage("stock").pause();
    let orders = (0..BIG_ORDERS)
        .map(|_| skus.iter().map(|sku| line(sku, 10_000)).collect())
        .collect();
    let placed = place_all(pipeline.receiver().await, "bulk-buyer", orders, 16).await;
    assert!(placed.iter().all(|p| p.result.is_ok()));
    pipeline.stage("stock").resume();
    let notifications = pipeline
        .wait_for_notifications(BIG_ORDERS, Duration::from_secs(300))
        .await
        .unwrap();
    assert_eq!(notifications.len(), BIG_ORDERS);
    // The largest possible invoice: 100 lines × 10,000 units × 10^12 minor units, plus 20 % tax.
    let invoices = pipeline.invoices().await.unwrap();
    assert_eq!(invoices.len(), BIG_ORDERS);
    assert!(
        invoices
            .iter()
            .all(|i| i.total.as_ref().map(|t| t.amount_minor) == Some(1_200_000_000_000_000_000))
    );
}
