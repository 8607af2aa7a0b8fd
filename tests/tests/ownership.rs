//! Which process may apply a log, from which store: real stages on loopback, their stores lost,
//! replaced and copied the way volumes are.
//!
//! - A stage whose store was lost does not start empty: its upstream refuses it (STORE_BEHIND), it
//!   answers NOT_SERVING and applies nothing again; with its volume restored it carries on.
//! - A stage whose upstream's store was replaced does not read the new log as if it were the old one
//!   (LOG_REPLACED).
//! - Two processes reading as one consumer (a second replica, a copied volume): the second one waits
//!   (HELD, NOT_SERVING) while the first one reads; when the first one is frozen long enough for its
//!   connections to close, the second one takes over, and the first one, back, is fenced for good;
//!   restarted, it is refused too, since its store is behind what the second one acknowledged.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{path::PathBuf, time::Duration};

use orderflow_e2e::{Pipeline, PipelineOptions, Stage, catalog, line, place_all, stock_levels};
use orderflow_proto::v1::stock_checker_client::StockCheckerClient;
use tonic_health::pb::health_check_response::ServingStatus;

/// Units of A each test starts with.
const STOCK: u64 = 100;
const WITHIN: Duration = Duration::from_secs(30);

async fn pipeline(with_notifier: bool) -> Pipeline {
    Pipeline::start(PipelineOptions {
        catalog: catalog(&[("A", 500, STOCK)]),
        with_notifier,
        ..Default::default()
    })
    .await
    .unwrap()
}

/// Places `count` orders of one unit of A; returns their ids.
async fn place(pipeline: &Pipeline, count: usize) -> Vec<String> {
    place_all(
        pipeline.receiver().await,
        "alice",
        vec![vec![line("A", 1)]; count],
        8,
    )
    .await
    .into_iter()
    .map(|placed| placed.result.unwrap())
    .collect()
}

/// Units of A a stock stage has available.
async fn available(stock: &Stage) -> u64 {
    let client = StockCheckerClient::new(stock.channel().await);
    stock_levels(client).await.unwrap()["A"].available
}

/// Waits until `done` says so, at most [`WITHIN`]; then panics with what `never` says.
async fn eventually<F: Future<Output = bool>>(
    mut done: impl FnMut() -> F,
    never: impl Fn() -> String,
) {
    let deadline = tokio::time::Instant::now() + WITHIN;
    while !done().await {
        assert!(tokio::time::Instant::now() < deadline, "{}", never());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `stock` has `want` units of A available.
async fn wait_for_available(stock: &Stage, want: u64) {
    eventually(
        || async move { available(stock).await == want },
        || format!("{} never reached {want} units of A", stock.name),
    )
    .await;
}

/// Waits until `consumer` has acknowledged `stage`'s log up to `offset`.
async fn wait_for_ack(stage: &Stage, consumer: &str, offset: u64) {
    eventually(
        || async move { stage.acked(consumer).await.unwrap() >= offset },
        || {
            format!(
                "{consumer} never acknowledged {}'s log up to {offset}",
                stage.name
            )
        },
    )
    .await;
}

/// Waits until `stage`'s log, over all its starts, says `what` at least `times` times.
async fn wait_for_log_times(stage: &Stage, what: &str, times: usize) {
    eventually(
        || async move { stage.logs().matches(what).count() >= times },
        || {
            format!(
                "{} never logged {what:?} {times} times; its log:\n{}",
                stage.name,
                orderflow_e2e::tail(&stage.logs())
            )
        },
    )
    .await;
}

/// Waits until `stage`'s log says `what`.
async fn wait_for_log(stage: &Stage, what: &str) {
    wait_for_log_times(stage, what, 1).await;
}

/// The store file of `stage`.
fn store_file(stage: &Stage) -> PathBuf {
    stage.data_dir.join(format!("{}.redb", stage.name))
}

/// Stops `stage`, moves its store aside and returns where to.
async fn lose_store(stage: &mut Stage) -> PathBuf {
    assert!(stage.terminate().await.unwrap());
    let saved = stage.data_dir.join("saved.redb");
    std::fs::rename(store_file(stage), &saved).unwrap();
    saved
}

/// Stops `stage`, puts `saved` back as its store and starts it again.
async fn restore_store(stage: &mut Stage, saved: &PathBuf) {
    assert!(stage.terminate().await.unwrap());
    std::fs::rename(saved, store_file(stage)).unwrap();
    stage.restart().await.unwrap();
}

#[tokio::test]
async fn a_stage_whose_store_was_lost_does_not_start_empty() {
    let mut pipeline = pipeline(true).await;
    let first = place(&pipeline, 5).await;
    pipeline.wait_for_terminal(&first, WITHIN).await.unwrap();
    wait_for_ack(pipeline.stage("receiver"), "stock", 5).await;

    let saved = lose_store(pipeline.stage_mut("stock")).await;
    pipeline.stage_mut("stock").restart().await.unwrap();
    let stock = pipeline.stage("stock");
    stock
        .wait_for_health(ServingStatus::NotServing, WITHIN)
        .await;
    wait_for_log(stock, "STORE_BEHIND").await;
    assert!(
        stock
            .logs()
            .contains("acknowledged partition 0 up to offset 5")
    );
    let metrics = stock.scrape().await.unwrap();
    assert_eq!(
        metrics.value(
            "orderflow_upstream_refused",
            &[("stage", "stock"), ("upstream", "receiver")]
        ),
        Some(1.0)
    );
    // Another order is accepted and waits: the empty store applies nothing, old or new.
    let second = place(&pipeline, 1).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(available(pipeline.stage("stock")).await, STOCK);
    assert_eq!(pipeline.invoices().await.unwrap().len(), 5);
    assert_eq!(pipeline.stage("receiver").acked("stock").await.unwrap(), 5);

    // The volume restored, the stage carries on where it was.
    restore_store(pipeline.stage_mut("stock"), &saved).await;
    pipeline
        .stage("stock")
        .wait_for_health(ServingStatus::Serving, WITHIN)
        .await;
    pipeline.wait_for_terminal(&second, WITHIN).await.unwrap();
    assert_eq!(available(pipeline.stage("stock")).await, STOCK - 6);
    let metrics = pipeline.stage("stock").scrape().await.unwrap();
    assert_eq!(
        metrics.value(
            "orderflow_upstream_refused",
            &[("stage", "stock"), ("upstream", "receiver")]
        ),
        Some(0.0)
    );
    let invoices = pipeline.invoices().await.unwrap();
    assert_eq!(invoices.len(), 6, "every order invoiced once");
}

#[tokio::test]
async fn a_stage_does_not_read_a_replaced_log_as_the_one_it_consumed() {
    let mut pipeline = pipeline(false).await;
    place(&pipeline, 3).await;
    wait_for_available(pipeline.stage("stock"), STOCK - 3).await;
    wait_for_ack(pipeline.stage("receiver"), "stock", 3).await;
    wait_for_ack(pipeline.stage("stock"), "receiver", 3).await;

    // The receiver's store replaced by an empty one: its offsets mean other orders now.
    let saved = lose_store(pipeline.stage_mut("receiver")).await;
    pipeline.stage_mut("receiver").restart().await.unwrap();
    let stock = pipeline.stage("stock");
    stock
        .wait_for_health(ServingStatus::NotServing, WITHIN)
        .await;
    wait_for_log(stock, "LOG_REPLACED").await;
    // The receiver's own view of the stages after it was lost with its store: refused as well.
    pipeline
        .stage("receiver")
        .wait_for_health(ServingStatus::NotServing, WITHIN)
        .await;
    place(&pipeline, 2).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(available(pipeline.stage("stock")).await, STOCK - 3);

    // The receiver's volume restored: stock takes its log again by itself.
    restore_store(pipeline.stage_mut("receiver"), &saved).await;
    pipeline
        .stage("stock")
        .wait_for_health(ServingStatus::Serving, WITHIN)
        .await;
    pipeline
        .stage("receiver")
        .wait_for_health(ServingStatus::Serving, WITHIN)
        .await;
    let third = place(&pipeline, 1).await;
    wait_for_available(pipeline.stage("stock"), STOCK - 4).await;
    assert_eq!(third.len(), 1);
}

#[tokio::test]
async fn one_process_at_a_time_reads_as_a_consumer() {
    let mut pipeline = pipeline(false).await;
    place(&pipeline, 2).await;
    wait_for_available(pipeline.stage("stock"), STOCK - 2).await;
    wait_for_ack(pipeline.stage("receiver"), "stock", 2).await;
    // Both of stock's logs consumed: a copy behind the invoice log's acknowledgement would be
    // refused there for good (STORE_BEHIND) rather than wait its turn.
    wait_for_ack(pipeline.stage("invoice"), "stock", 2).await;

    // A copy of stock's volume, as a second replica or a copied volume would have it.
    assert!(pipeline.stage_mut("stock").terminate().await.unwrap());
    let copy = pipeline.dir.path().join("stock-copy");
    std::fs::create_dir_all(&copy).unwrap();
    std::fs::copy(store_file(pipeline.stage("stock")), copy.join("stock.redb")).unwrap();
    pipeline.stage_mut("stock").restart().await.unwrap();
    let first = pipeline.stage("stock");
    first.wait_for_health(ServingStatus::Serving, WITHIN).await;
    // Both of its subscriptions (orders, compensations), in both of its starts, hold their logs.
    wait_for_log_times(first, "subscribed upstream", 4).await;

    // The second one waits while the first one reads.
    let second = Stage::start(
        "stock",
        "127.0.0.1:0",
        &copy,
        vec![
            "--upstream".into(),
            pipeline.stage("receiver").url(),
            "--invoice-url".into(),
            pipeline.stage("invoice").url(),
            "--catalog".into(),
            pipeline
                .dir
                .path()
                .join("catalog.toml")
                .display()
                .to_string(),
        ],
    )
    .await
    .unwrap();
    wait_for_log(&second, "HELD").await;
    second
        .wait_for_health(ServingStatus::NotServing, WITHIN)
        .await;
    assert_eq!(first.health().await, ServingStatus::Serving);

    // The first one frozen (its node cut off, say): once the logs' HTTP/2 keepalive has closed its
    // connections, the second one takes over, and applies what comes next.
    first.pause();
    second
        .wait_for_health(ServingStatus::Serving, Duration::from_secs(90))
        .await;
    place(&pipeline, 3).await;
    wait_for_available(&second, STOCK - 5).await;
    wait_for_ack(pipeline.stage("receiver"), "stock", 5).await;

    // Back, the first one finds its place taken: fenced for good, it applies nothing more.
    first.resume();
    first
        .wait_for_health(ServingStatus::NotServing, WITHIN)
        .await;
    wait_for_log(first, "FENCED").await;
    place(&pipeline, 1).await;
    wait_for_available(&second, STOCK - 6).await;
    assert_eq!(available(first).await, STOCK - 2);

    // Started again, it is refused all the same: its store is behind what the second one
    // acknowledged, and the second one holds the other log.
    let first = pipeline.stage_mut("stock");
    assert!(first.terminate().await.unwrap());
    first.restart().await.unwrap();
    let first = pipeline.stage("stock");
    wait_for_log(first, "STORE_BEHIND").await;
    first
        .wait_for_health(ServingStatus::NotServing, WITHIN)
        .await;
    assert_eq!(second.health().await, ServingStatus::Serving);
    place(&pipeline, 1).await;
    wait_for_available(&second, STOCK - 7).await;
    assert_eq!(available(pipeline.stage("stock")).await, STOCK - 2);
}
