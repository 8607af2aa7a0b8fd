//! What operators and callers see of a running pipeline: Prometheus metrics that move on every stage,
//! log lines (text or JSON) carrying the trace ids of the order they are about when spans are built
//! (a sampler set) and none when nothing asks for spans, each order's
//! progress through the stages (`GetOrder`, and `WatchOrder` pushing each transition live), and the
//! receiver's HTTP/JSON door exercised with a real HTTP client.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use orderflow_e2e::{Pipeline, PipelineOptions, catalog, line, place_all};
use orderflow_proto::v1::{GetOrderRequest, OrderStatus, RejectionReason, WatchOrderRequest};
use serde_json::{Value, json};
use tonic::Code;

#[tokio::test(flavor = "multi_thread")]
async fn metrics_move_on_every_stage_and_logs_carry_trace_ids() {
    let pipeline = Pipeline::start(PipelineOptions {
        catalog: catalog(&[("A", 1000, 10_000)]),
        with_notifier: true,
        // Retries, but never so many failures in a row that a payment fails: with the default 5
        // attempts that happened to 0.3^5 = 0.24 % of orders (~5 % of runs of 20 orders), and the
        // counts below were one short. 0.3^30 does not happen.
        invoice_args: [
            "--gateway-transient-failure-rate",
            "0.3",
            "--payment-backoff-min",
            "5ms",
            "--payment-max-attempts",
            "30",
        ]
        .map(String::from)
        .to_vec(),
        notifier_args: vec!["--log-format".into(), "json".into()],
        // No OTLP endpoint: a sampler asked for keeps the spans, and so the log lines' ids.
        env: vec![(
            "OTEL_TRACES_SAMPLER".to_owned(),
            "parentbased_always_on".to_owned(),
        )],
        ..Default::default()
    })
    .await
    .unwrap();
    let before: Vec<_> = {
        let mut scraped = Vec::new();
        for stage in &pipeline.stages {
            scraped.push(stage.scrape().await.unwrap());
        }
        scraped
    };
    let processed = |m: &orderflow_e2e::Metrics, stage: &str, outcome: &str| {
        m.value(
            "orderflow_events_processed_total",
            &[("stage", stage), ("outcome", outcome)],
        )
        .unwrap_or(0.0)
    };
    assert_eq!(processed(&before[0], "receiver", "accepted"), 0.0);

    const N: usize = 20;
    let placed = place_all(
        pipeline.receiver().await,
        "metered",
        (0..N).map(|_| vec![line("A", 1)]).collect(),
        4,
    )
    .await;
    assert!(placed.iter().all(|p| p.result.is_ok()));
    pipeline
        .wait_for_notifications(N, Duration::from_secs(60))
        .await
        .unwrap();
    // Gauges are refreshed every second.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let receiver = pipeline.stage("receiver").scrape().await.unwrap();
    let stock = pipeline.stage("stock").scrape().await.unwrap();
    let invoice = pipeline.stage("invoice").scrape().await.unwrap();
    let notifier = pipeline.stage("notifier").scrape().await.unwrap();
    let n = N as f64;
    assert_eq!(processed(&receiver, "receiver", "accepted"), n);
    assert_eq!(
        receiver.value(
            "orderflow_place_order_seconds_count",
            &[("stage", "receiver")]
        ),
        Some(n)
    );
    assert_eq!(
        receiver.value("orderflow_outbox_next_offset", &[("stage", "receiver")]),
        Some(n)
    );
    assert_eq!(processed(&stock, "stock", "reserved"), n);
    assert!(
        stock.value(
            "orderflow_batch_commit_seconds_count",
            &[("stage", "stock")]
        ) > Some(0.0)
    );
    assert!(stock.value("orderflow_hop_seconds_count", &[("stage", "stock")]) >= Some(n));
    assert_eq!(
        stock.value(
            "orderflow_consumer_lag",
            &[("stage", "stock"), ("upstream", "receiver")]
        ),
        Some(0.0)
    );
    assert_eq!(processed(&invoice, "invoice", "invoiced"), n);
    let payments = |outcome| {
        invoice
            .value(
                "orderflow_attempts_total",
                &[("work", "payment"), ("outcome", outcome)],
            )
            .unwrap_or(0.0)
    };
    assert_eq!(payments("done"), n);
    assert!(
        payments("transient failure") > 0.0,
        "no payment retried at a 30 % failure rate"
    );
    assert_eq!(
        invoice.value("orderflow_retries_total", &[("work", "payment")]),
        Some(payments("transient failure"))
    );
    assert_eq!(
        invoice.value("orderflow_pending_work", &[("work", "payment")]),
        Some(0.0)
    );
    assert_eq!(processed(&notifier, "notifier", "delivered"), n);
    assert_eq!(
        notifier.value("orderflow_placed_to_notified_seconds_count", &[]),
        Some(n)
    );
    assert!(
        notifier
            .value("orderflow_outbox_entries", &[("stage", "notifier")])
            .is_some()
    );

    // JSON logs: each delivery's line is one JSON object carrying the order's trace and span ids
    // (with a sampler set; `order_progress_is_reported_and_watched_live` runs without);
    // text logs carry them too.
    let logs = pipeline.stage("notifier").logs();
    let delivered: Vec<Value> = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["message"] == "customer notified")
        .collect();
    assert_eq!(delivered.len(), N, "{logs}");
    for line in &delivered {
        assert!(
            line["text"]
                .as_str()
                .is_some_and(|t| t.starts_with("Your order")),
            "{line}"
        );
        let ids = &line["openTelemetry"];
        assert_eq!(ids["traceId"].as_str().map(str::len), Some(32), "{line}");
        assert_eq!(ids["spanId"].as_str().map(str::len), Some(16), "{line}");
    }
    assert!(
        pipeline
            .stage("stock")
            .logs()
            .lines()
            .all(|l| !l.starts_with('{')),
        "the stock stage logs text"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn order_progress_is_reported_and_watched_live() {
    let pipeline = Pipeline::start(PipelineOptions {
        catalog: catalog(&[("A", 1000, 10), ("B", 250, 0)]),
        tax_rate_bps: 2000,
        with_notifier: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let mut receiver = pipeline.receiver().await;
    let place = |lines| {
        let mut receiver = receiver.clone();
        async move {
            receiver
                .place_order(orderflow_proto::v1::PlaceOrderRequest {
                    customer_id: "ana".into(),
                    lines,
                    idempotency_key: String::new(),
                })
                .await
                .unwrap()
                .into_inner()
                .order_id
        }
    };
    let confirmed = place(vec![line("A", 2)]).await;
    let rejected = place(vec![line("A", 1), line("B", 1)]).await;
    let done = pipeline
        .wait_for_terminal(
            &[confirmed.clone(), rejected.clone()],
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    let path = |o: &orderflow_proto::v1::Order| -> Vec<OrderStatus> {
        o.transitions.iter().map(|t| t.status()).collect()
    };
    assert_eq!(
        path(&done[0]),
        [
            OrderStatus::Accepted,
            OrderStatus::Reserved,
            OrderStatus::Invoiced,
            OrderStatus::Notified
        ]
    );
    assert_eq!(done[0].status(), OrderStatus::Notified);
    let invoice = done[0].invoice.as_ref().expect("invoice summary");
    assert_eq!(invoice.number, 1);
    assert_eq!(invoice.total.as_ref().map(|m| m.amount_minor), Some(2400));
    assert_eq!(invoice.payment_attempts, 1);
    assert!(done[0].transitions.iter().all(|t| t.at.is_some()));
    assert_eq!(
        path(&done[1]),
        [
            OrderStatus::Accepted,
            OrderStatus::Rejected,
            OrderStatus::Notified
        ]
    );
    assert_eq!(done[1].rejections.len(), 1);
    assert_eq!(done[1].rejections[0].reason(), RejectionReason::OutOfStock);
    assert_eq!(done[1].rejections[0].sku, "B");

    // Watch an order while the notifier is frozen: every transition arrives as it happens, and the
    // stream ends at the terminal state.
    pipeline.stage("notifier").pause();
    let watched = place(vec![line("A", 1)]).await;
    let mut stream = receiver
        .watch_order(WatchOrderRequest {
            order_id: watched.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    loop {
        let update = tokio::time::timeout(Duration::from_secs(30), stream.message())
            .await
            .expect("an update within 30 s")
            .unwrap()
            .expect("the stream ends only when terminal");
        seen.push(update.status());
        if update.status() == OrderStatus::Invoiced {
            break;
        }
        assert!(!update.terminal);
    }
    pipeline.stage("notifier").resume();
    let last = tokio::time::timeout(Duration::from_secs(30), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(last.status(), OrderStatus::Notified);
    assert!(last.terminal);
    assert!(
        stream.message().await.unwrap().is_none(),
        "the stream ended"
    );
    assert_eq!(seen.first(), Some(&OrderStatus::Accepted));
    assert_eq!(last.transitions.len(), 4);

    // No OTLP endpoint and no sampler: no order span was built, so the notifier's lines about
    // the orders carry no trace ids.
    let logs = pipeline.stage("notifier").logs();
    let notified: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("customer notified"))
        .collect();
    assert_eq!(notified.len(), 3, "{logs}");
    assert!(notified.iter().all(|l| !l.contains("trace_id=")), "{logs}");

    // Unknown orders are NOT_FOUND for both.
    let missing = receiver
        .get_order(GetOrderRequest {
            order_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    let missing = receiver
        .watch_order(WatchOrderRequest {
            order_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_http_door_speaks_json_with_precise_statuses() {
    let pipeline = Pipeline::start(PipelineOptions {
        catalog: catalog(&[("A", 1000, 100)]),
        with_notifier: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let base = pipeline.stage("receiver").http_url().unwrap().to_owned();
    let http = reqwest::Client::new();
    let post = |body: Value, key: Option<&str>| {
        let mut request = http.post(format!("{base}/v1/orders")).json(&body);
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        request.send()
    };

    let created = post(
        json!({"customer_id": "web", "lines": [{"sku": "A", "quantity": 2}]}),
        None,
    )
    .await
    .unwrap();
    assert_eq!(created.status(), 201);
    let location = created.headers()["location"].to_str().unwrap().to_owned();
    let body: Value = created.json().await.unwrap();
    let order_id = body["order_id"].as_str().unwrap().to_owned();
    assert_eq!(body["status"], "ACCEPTED");
    assert_eq!(location, format!("/v1/orders/{order_id}"));

    pipeline
        .wait_for_terminal(std::slice::from_ref(&order_id), Duration::from_secs(60))
        .await
        .unwrap();
    let got = http.get(format!("{base}{location}")).send().await.unwrap();
    assert_eq!(got.status(), 200);
    let order: Value = got.json().await.unwrap();
    assert_eq!(order["status"], "NOTIFIED");
    assert_eq!(order["terminal"], true);
    assert_eq!(order["lines"][0]["quantity"], 2);
    assert_eq!(order["invoice"]["total"]["amount_minor"], 2000);
    assert_eq!(order["transitions"].as_array().map(Vec::len), Some(4));

    // The same idempotency key: the first order again (200), or a conflict for another request.
    let first = post(
        json!({"customer_id": "web", "lines": [{"sku": "A", "quantity": 1}]}),
        Some("k-1"),
    )
    .await
    .unwrap();
    assert_eq!(first.status(), 201);
    let first: Value = first.json().await.unwrap();
    let again = post(
        json!({"customer_id": "web", "lines": [{"sku": "A", "quantity": 1}]}),
        Some("k-1"),
    )
    .await
    .unwrap();
    assert_eq!(again.status(), 200);
    let again: Value = again.json().await.unwrap();
    assert_eq!(again["order_id"], first["order_id"]);
    assert_eq!(again["replayed"], true);
    let conflict = post(
        json!({"customer_id": "web", "lines": [{"sku": "A", "quantity": 9}]}),
        Some("k-1"),
    )
    .await
    .unwrap();
    assert_eq!(conflict.status(), 409);
    let conflict: Value = conflict.json().await.unwrap();
    assert_eq!(conflict["error"]["code"], "ALREADY_EXISTS");

    // Bad input: 400 naming each field; malformed JSON: 400 too; unknown order: 404.
    let bad = post(
        json!({"customer_id": "", "lines": [{"sku": "A", "quantity": 0}]}),
        None,
    )
    .await
    .unwrap();
    assert_eq!(bad.status(), 400);
    let bad: Value = bad.json().await.unwrap();
    assert_eq!(bad["error"]["code"], "INVALID_ARGUMENT");
    let fields: Vec<_> = bad["error"]["field_violations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["field"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(fields, ["customer_id", "lines[0].quantity"]);
    let malformed = http
        .post(format!("{base}/v1/orders"))
        .header("content-type", "application/json")
        .body("{\"customer_id\": \"web\", \"lines\": [{\"sku\": \"A\", \"quantity\": -1}]}")
        .send()
        .await
        .unwrap();
    assert_eq!(malformed.status(), 400);
    let malformed: Value = malformed.json().await.unwrap();
    assert_eq!(malformed["error"]["code"], "INVALID_ARGUMENT");
    let unknown = http
        .get(format!("{base}/v1/orders/nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    let unknown: Value = unknown.json().await.unwrap();
    assert_eq!(unknown["error"]["code"], "NOT_FOUND");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_file_sink_appends_one_json_line_per_notification() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("notifications.jsonl");
    let pipeline = Pipeline::start(PipelineOptions {
        catalog: catalog(&[("A", 100, 1), ("B", 100, 10)]),
        with_notifier: true,
        notifier_args: vec![
            "--sink".into(),
            "file".into(),
            "--sink-file".into(),
            file.display().to_string(),
        ],
        ..Default::default()
    })
    .await
    .unwrap();
    let placed = place_all(
        pipeline.receiver().await,
        "filed",
        vec![vec![line("A", 1)], vec![line("A", 1)], vec![line("B", 2)]],
        1,
    )
    .await;
    assert!(placed.iter().all(|p| p.result.is_ok()));
    let notifications = pipeline
        .wait_for_notifications(3, Duration::from_secs(60))
        .await
        .unwrap();
    let lines: Vec<Value> = std::fs::read_to_string(&file)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    for n in &notifications {
        assert_eq!(n.sink, "file");
        let line = lines
            .iter()
            .find(|l| l["order_id"] == n.order_id.as_str())
            .expect("a line per notification");
        assert_eq!(line["idempotency_key"], n.idempotency_key.as_str());
        assert_eq!(line["message"], n.message.as_str());
    }
    let kinds: Vec<_> = lines.iter().map(|l| l["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds.iter().filter(|k| **k == "CONFIRMED").count(), 2);
    assert_eq!(kinds.iter().filter(|k| **k == "REJECTED").count(), 1);
}
