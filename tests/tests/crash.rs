//! Crash safety: for each stage in turn, `kill -9` it while thousands of orders are in flight,
//! restart it on the same data directory, and check that nothing was lost or doubled:
//! every accepted order is notified exactly once, invoice numbers are 1..=n with no gap and no
//! duplicate, and stock equals the initial quantity minus what confirmed orders took.
//!
//! How "in flight" is guaranteed: the stage that must fall behind (the victim, or the stock stage
//! when the victim is the receiver) is frozen with SIGSTOP while 8,000 orders are accepted; it is
//! then thawed and killed right after its first group commit (at most ~3,000 events), so it dies in
//! the middle of its backlog, with more orders still arriving.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use orderflow_e2e::{Pipeline, PipelineOptions, Placed, catalog, line, place_all};
use orderflow_proto::v1::{NotificationKind, OrderLine};
use rand::{Rng, SeedableRng, rngs::StdRng};

const BACKLOG_ORDERS: usize = 8_000;
const ORDERS_DURING_CRASH: usize = 1_000;
/// Produced events after which the victim is killed (well inside its backlog).
const KILL_AFTER_EVENTS: u64 = 150;

const SKUS: [&str; 8] = ["S0", "S1", "S2", "S3", "S4", "S5", "S6", "S7"];
/// A scarce item: it runs out during the run, so rejections and the no-oversell rule are exercised.
const SCARCE: &str = "RARE";
const SCARCE_UNITS: u64 = 400;
const PLENTY: u64 = 1_000_000;

fn orders(n: usize, seed: u64) -> Vec<Vec<OrderLine>> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let mut lines = Vec::new();
            let first = rng.random_range(0..SKUS.len());
            lines.push(line(SKUS[first], rng.random_range(1..=5)));
            if rng.random_bool(0.5) {
                lines.push(line(
                    SKUS[(first + 1) % SKUS.len()],
                    rng.random_range(1..=5),
                ));
            }
            if rng.random_bool(0.2) {
                lines.push(line(SCARCE, rng.random_range(1..=3)));
            }
            lines
        })
        .collect()
}

async fn crash_and_recover(victim: &'static str) {
    let mut items: Vec<(&str, i64, u64)> = SKUS.iter().map(|s| (*s, 199, PLENTY)).collect();
    items.push((SCARCE, 4_999, SCARCE_UNITS));
    let mut pipeline = Pipeline::start(PipelineOptions {
        catalog: catalog(&items),
        tax_rate_bps: 1_900,
        with_notifier: true,
    })
    .await
    .unwrap();

    // 1. Freeze the stage that must fall behind and build a backlog in front of it.
    let laggard = if victim == "receiver" {
        "stock"
    } else {
        victim
    };
    pipeline.stage(laggard).pause();
    let receiver = pipeline.receiver().await;
    let mut placed = place_all(receiver.clone(), "backlog", orders(BACKLOG_ORDERS, 1), 64).await;
    assert!(
        placed.iter().all(|p| p.result.is_ok()),
        "orders were refused before any crash"
    );

    // 2. Keep ordering while the victim works through its backlog and dies.
    let more = tokio::spawn(place_all(
        receiver.clone(),
        "during-crash",
        orders(ORDERS_DURING_CRASH, 2),
        32,
    ));
    pipeline.stage(laggard).resume();
    let progress_of = if victim == "receiver" {
        "stock"
    } else {
        victim
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let produced = loop {
        let head = pipeline.stage(progress_of).head().await.unwrap_or(0);
        if head >= KILL_AFTER_EVENTS {
            break head;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{progress_of} made no progress"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    pipeline.stage_mut(victim).kill9().await;
    let in_flight = BACKLOG_ORDERS as u64 - produced.min(BACKLOG_ORDERS as u64);
    eprintln!("killed {victim} with {in_flight} backlog orders still to go through {progress_of}");
    assert!(
        in_flight >= 2_000,
        "only {in_flight} orders were in flight at the kill"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    pipeline.stage_mut(victim).restart().await.unwrap();
    placed.extend(more.await.unwrap());

    // 3. Everything the receiver made durable drains to exactly one notification.
    let accepted: HashMap<String, &Placed> = placed
        .iter()
        .filter_map(|p| p.result.as_ref().ok().map(|id| (id.clone(), p)))
        .collect();
    let refused = placed.len() - accepted.len();
    eprintln!(
        "{} accepted, {refused} refused while the {victim} was down",
        accepted.len()
    );
    let durable = pipeline.stage("receiver").head().await.unwrap() as usize;
    assert!(
        durable >= accepted.len(),
        "the receiver lost accepted orders"
    );
    let notifications = pipeline
        .wait_for_notifications(durable, Duration::from_secs(180))
        .await
        .unwrap();
    assert_eq!(
        notifications.len(),
        durable,
        "notifications != durable orders"
    );
    let mut notified = HashSet::new();
    for n in &notifications {
        assert!(
            notified.insert(n.order_id.clone()),
            "order {} notified twice",
            n.order_id
        );
    }
    for id in accepted.keys() {
        assert!(
            notified.contains(id),
            "accepted order {id} was never notified"
        );
    }

    // 4. Invoices: exactly the confirmed orders, numbered 1..=n.
    let invoices = pipeline.invoices().await.unwrap();
    let numbers: Vec<u64> = invoices.iter().map(|i| i.number).collect();
    let expected: Vec<u64> = (1..=invoices.len() as u64).collect();
    assert_eq!(
        numbers, expected,
        "invoice numbers have a gap or a duplicate"
    );
    let confirmed: Vec<_> = notifications
        .iter()
        .filter(|n| n.kind() == NotificationKind::Confirmed)
        .collect();
    assert_eq!(confirmed.len(), invoices.len());
    let invoiced: HashSet<_> = invoices.iter().map(|i| i.order_id.clone()).collect();
    assert_eq!(
        invoiced.len(),
        invoices.len(),
        "an order was invoiced twice"
    );
    assert!(confirmed.iter().all(|n| invoiced.contains(&n.order_id)));

    // 5. Stock: initial − confirmed quantities, per sku, reserved = confirmed.
    let mut taken: HashMap<String, u64> = HashMap::new();
    for n in &confirmed {
        let lines = match accepted.get(&n.order_id) {
            Some(p) => p.lines.clone(),
            // Made durable, but the answer was lost in the crash: ask the receiver.
            None => pipeline.order_lines(&n.order_id).await.unwrap(),
        };
        for l in lines {
            *taken.entry(l.sku).or_default() += u64::from(l.quantity);
        }
    }
    let stock = pipeline.stock_levels().await.unwrap();
    for (sku, _, initial) in &items {
        let took = taken.get(*sku).copied().unwrap_or(0);
        let item = &stock[*sku];
        assert_eq!(item.available, initial - took, "available of {sku}");
        assert_eq!(item.reserved, took, "reserved of {sku}");
    }
    assert!(
        notifications
            .iter()
            .any(|n| n.kind() == NotificationKind::Rejected),
        "the scarce item never ran out; the run did not exercise rejections"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_receiver_mid_stream() {
    crash_and_recover("receiver").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_stock_mid_stream() {
    crash_and_recover("stock").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_invoice_mid_stream() {
    crash_and_recover("invoice").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_notifier_mid_stream() {
    crash_and_recover("notifier").await;
}
