//! Crash safety: for each stage in turn, `kill -9` it while thousands of orders are in flight,
//! restart it on the same data directory, and check that nothing was lost or doubled:
//! every accepted order is notified exactly once, invoice numbers are 1..=n with no gap and no
//! duplicate, and stock equals the initial quantity minus what confirmed orders took.
//!
//! How "in flight" is guaranteed: the stage that must fall behind (the victim, or the stock stage
//! when the victim is the receiver) is frozen with SIGSTOP while 8,000 orders are accepted; it is
//! then thawed and killed right after its first group commit (at most ~3,000 events), so it dies in
//! the middle of its backlog, with more orders still arriving.
//!
//! One run adds payment faults (30 % transient, 5 % declines) and kills the invoice stage while
//! captures are being retried: every order still reaches exactly one terminal state, the gateway
//! charged each order at most once (the retries and the restart reuse the order's idempotency key),
//! each invoice matches its capture, and every capture of an order that was not invoiced is voided.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use orderflow_e2e::{Pipeline, PipelineOptions, Placed, catalog, line, place_all};
use orderflow_proto::v1::{
    ListCapturesRequest, ListDeadLettersRequest, NotificationKind, OrderLine, SetFaultsRequest,
};
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

/// Payment faults for the run with a flaky gateway.
const PAYMENT_FAULTS: &[&str] = &[
    "--gateway-transient-failure-rate",
    "0.3",
    "--gateway-decline-rate",
    "0.05",
    "--payment-backoff-min",
    "5ms",
    "--payment-backoff-max",
    "50ms",
];

async fn crash_and_recover(victim: &'static str, invoice_args: &[&str]) {
    let mut items: Vec<(&str, i64, u64)> = SKUS.iter().map(|s| (*s, 199, PLENTY)).collect();
    items.push((SCARCE, 4_999, SCARCE_UNITS));
    let mut pipeline = Pipeline::start(PipelineOptions {
        catalog: catalog(&items),
        tax_rate_bps: 1_900,
        with_notifier: true,
        invoice_args: invoice_args.iter().map(|a| (*a).to_owned()).collect(),
        ..Default::default()
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
    // The `log` sink writes its lines in batches: every notification recorded as delivered has its
    // line, over both of the notifier's lives.
    let logs = pipeline.stage("notifier").logs();
    let log_lines: HashSet<&str> = logs
        .lines()
        .filter(|l| l.contains("customer notified"))
        .filter_map(|l| l.split("order_id=").nth(1))
        .filter_map(|rest| rest.split_whitespace().next())
        .collect();
    for n in &notifications {
        assert!(
            log_lines.contains(n.order_id.as_str()),
            "order {} was recorded as notified, but the log sink never wrote its line",
            n.order_id
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
    if !invoice_args.is_empty() {
        check_payments(&pipeline, &notifications, &invoices).await;
    }
}

/// The gateway charged every order at most once; each invoice is its order's capture; every
/// capture of an order that failed payment is voided once the gateway answers reliably.
async fn check_payments(
    pipeline: &Pipeline,
    notifications: &[orderflow_proto::v1::Notification],
    invoices: &[orderflow_proto::v1::Invoice],
) {
    let failed: HashSet<&str> = notifications
        .iter()
        .filter(|n| n.kind() == NotificationKind::PaymentFailed)
        .map(|n| n.order_id.as_str())
        .collect();
    assert!(!failed.is_empty(), "no payment failed at 5 % declines");
    let mut invoice = pipeline.invoice().await;
    invoice
        .set_faults(SetFaultsRequest {
            transient_failure_rate: Some(0.0),
            ..Default::default()
        })
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let letters = loop {
        let mut letters = Vec::new();
        let mut page_token = String::new();
        loop {
            let page = invoice
                .list_dead_letters(ListDeadLettersRequest {
                    page_size: 1000,
                    page_token,
                })
                .await
                .unwrap()
                .into_inner();
            letters.extend(page.dead_letters);
            if page.next_page_token.is_empty() {
                break;
            }
            page_token = page.next_page_token;
        }
        if letters.iter().all(|l| l.resolved_at.is_some()) {
            break letters;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "refunds never finished"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let dead: HashSet<&str> = letters.iter().map(|l| l.order_id.as_str()).collect();
    assert_eq!(
        dead, failed,
        "the dead letters are exactly the failed payments"
    );

    let mut captures = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = invoice
            .list_captures(ListCapturesRequest {
                page_size: 1000,
                page_token,
            })
            .await
            .unwrap()
            .into_inner();
        captures.extend(page.captures);
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    let mut per_order: HashMap<&str, &orderflow_proto::v1::Capture> = HashMap::new();
    for capture in &captures {
        assert!(
            per_order
                .insert(capture.order_id.as_str(), capture)
                .is_none(),
            "order {} was charged twice",
            capture.order_id
        );
    }
    for invoice in invoices {
        let capture = per_order
            .get(invoice.order_id.as_str())
            .unwrap_or_else(|| panic!("invoice {} has no capture", invoice.number));
        assert_eq!(
            invoice.payment.as_ref().map(|p| p.capture_id.as_str()),
            Some(capture.capture_id.as_str())
        );
        assert_eq!(capture.amount, invoice.total);
        assert!(capture.voided_at.is_none());
    }
    let invoiced: HashSet<&str> = invoices.iter().map(|i| i.order_id.as_str()).collect();
    for capture in captures
        .iter()
        .filter(|c| !invoiced.contains(c.order_id.as_str()))
    {
        assert!(
            capture.voided_at.is_some(),
            "capture {} of failed order {} was not voided",
            capture.capture_id,
            capture.order_id
        );
    }
    eprintln!(
        "{} captures for {} invoices; {} payments failed, {} of them had been captured and were voided",
        captures.len(),
        invoices.len(),
        failed.len(),
        captures.len() - invoices.len()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_receiver_mid_stream() {
    crash_and_recover("receiver", &[]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_stock_mid_stream() {
    crash_and_recover("stock", &[]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_invoice_mid_stream() {
    crash_and_recover("invoice", &[]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_notifier_mid_stream() {
    crash_and_recover("notifier", &[]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_invoice_while_payments_fail_and_retry() {
    crash_and_recover("invoice", PAYMENT_FAULTS).await;
}
