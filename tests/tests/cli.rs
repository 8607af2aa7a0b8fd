//! The `orderflow` command as a user runs it: the demo (the main job) completes with a consistent
//! report, `place` accepts a good order and explains a bad one, the operator commands work, and
//! `load` counts what the pipeline really did.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{process::Command, time::Duration};

use orderflow_e2e::{Pipeline, PipelineOptions, binary, catalog};
use orderflow_proto::v1::GetOrderRequest;

/// The number printed after `label` in the demo's report.
fn report_number(report: &str, label: &str) -> u64 {
    report
        .lines()
        .find(|l| l.starts_with(label))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no {label:?} in the report:\n{report}"))
}

#[test]
fn demo_runs_every_order_to_a_terminal_state() {
    let data = tempfile::tempdir().unwrap();
    let output = Command::new(binary("orderflow"))
        .args([
            "demo",
            "--orders",
            "40",
            "--rate",
            "200",
            "--customers",
            "8",
        ])
        .arg("--data-dir")
        .arg(data.path())
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let accepted = report_number(&stdout, "orders accepted");
    let confirmed = report_number(&stdout, "confirmed");
    let rejected = report_number(&stdout, "rejected");
    // The demo's gateway declines a few payments: those orders end told that payment failed.
    let unpaid = report_number(&stdout, "payment failed");
    assert_eq!(accepted, 40);
    assert_eq!(confirmed + rejected + unpaid, 40, "{stdout}");
    for step in ["received", "reserved", "invoiced", "notified"] {
        assert!(stdout.contains(step), "no {step} line:\n{stdout}");
    }
    assert!(
        stdout.contains("GPU-06"),
        "the stock table is missing:\n{stdout}"
    );
    // Each order's first and last step are shown exactly once before the report.
    assert_eq!(stdout.matches("  received  ").count(), 40, "{stdout}");
    assert_eq!(stdout.matches("  notified  ").count(), 40, "{stdout}");
}

#[tokio::test(flavor = "multi_thread")]
async fn place_accepts_good_orders_and_explains_bad_ones() {
    let pipeline = Pipeline::start(PipelineOptions {
        catalog: catalog(&[("A", 100, 5)]),
        tax_rate_bps: 0,
        with_notifier: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let receiver = pipeline.stage("receiver").url();
    let place = |lines: &[&str]| {
        let mut command = Command::new(binary("orderflow"));
        command.args(["place", "--receiver", &receiver, "--customer", "alice"]);
        for line in lines {
            command.args(["--line", line]);
        }
        command.output().unwrap()
    };

    let ok = place(&["A=2"]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let order_id = String::from_utf8(ok.stdout).unwrap().trim().to_owned();
    let order = pipeline
        .receiver()
        .await
        .get_order(GetOrderRequest {
            order_id: order_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .order
        .unwrap();
    assert_eq!(
        (order.customer_id.as_str(), order.lines[0].quantity),
        ("alice", 2)
    );

    let bad = place(&["A=0", "=1"]);
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    for needle in ["InvalidArgument", "lines[0].quantity", "lines[1].sku"] {
        assert!(stderr.contains(needle), "{needle} missing from:\n{stderr}");
    }

    let malformed = place(&["A"]);
    assert!(!malformed.status.success());
    assert!(String::from_utf8_lossy(&malformed.stderr).contains("expected SKU=QTY"));
}

/// A stage started with one bad setting, and what its error must mention.
struct BadSetting {
    binary: &'static str,
    args: &'static [&'static str],
    env: &'static [(&'static str, &'static str)],
    mentions: &'static [&'static str],
}

#[test]
fn bad_configuration_names_the_flag_and_the_variable() {
    let data = tempfile::tempdir().unwrap();
    let cases = [
        BadSetting {
            binary: "orderflow-receiver",
            args: &["--listen", "nowhere"],
            env: &[],
            mentions: &["--listen", "ORDERFLOW_LISTEN"],
        },
        BadSetting {
            binary: "orderflow-stock",
            args: &["--upstream", "localhost:50051"],
            env: &[],
            mentions: &["--upstream", "ORDERFLOW_UPSTREAM", "http://"],
        },
        BadSetting {
            binary: "orderflow-invoice",
            args: &[],
            env: &[("ORDERFLOW_TAX_RATE_BPS", "20000")],
            mentions: &["--tax-rate-bps", "ORDERFLOW_TAX_RATE_BPS"],
        },
        BadSetting {
            binary: "orderflow-stock",
            args: &["--catalog", "/no/such/catalog.toml"],
            env: &[],
            mentions: &["--catalog", "ORDERFLOW_CATALOG", "/no/such/catalog.toml"],
        },
        BadSetting {
            binary: "orderflow-notifier",
            args: &["--sink", "webhook"],
            env: &[],
            mentions: &["--webhook-url", "ORDERFLOW_WEBHOOK_URL"],
        },
        BadSetting {
            binary: "orderflow-notifier",
            args: &[],
            env: &[
                ("ORDERFLOW_SINK", "file"),
                ("ORDERFLOW_SINK_FILE", "/no/such/dir/n.jsonl"),
            ],
            mentions: &["--sink-file", "ORDERFLOW_SINK_FILE", "/no/such/dir/n.jsonl"],
        },
        BadSetting {
            binary: "orderflow-invoice",
            args: &["--gateway-decline-rate", "2"],
            env: &[],
            mentions: &[
                "--gateway-decline-rate",
                "ORDERFLOW_GATEWAY_DECLINE_RATE",
                "0.0 to 1.0",
            ],
        },
        BadSetting {
            binary: "orderflow-receiver",
            args: &[],
            env: &[("ORDERFLOW_ADMIN_TOKEN", "short")],
            mentions: &["--admin-token", "ORDERFLOW_ADMIN_TOKEN", "at least 8"],
        },
        BadSetting {
            binary: "orderflow-stock",
            args: &[
                "--tls-cert",
                "/no/such/cert.pem",
                "--tls-key",
                "/no/such/key.pem",
            ],
            env: &[],
            mentions: &["--tls-cert", "ORDERFLOW_TLS_CERT", "/no/such/cert.pem"],
        },
        BadSetting {
            binary: "orderflow-receiver",
            args: &["--metrics-listen", "nowhere"],
            env: &[],
            mentions: &["--metrics-listen", "ORDERFLOW_METRICS_LISTEN"],
        },
    ];
    for case in cases {
        let output = Command::new(binary(case.binary))
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data.path())
            .args(case.args)
            .envs(case.env.iter().copied())
            .output()
            .unwrap();
        let what = format!("{} {:?} {:?}", case.binary, case.args, case.env);
        assert!(!output.status.success(), "{what} started");
        let stderr = String::from_utf8_lossy(&output.stderr);
        for needle in case.mentions {
            assert!(
                stderr.contains(needle),
                "{what}: {needle} missing from\n{stderr}"
            );
        }
    }
}

/// Runs `orderflow` against a pipeline's stages; returns (success, stdout, stderr).
fn orderflow(pipeline: &Pipeline, args: &[&str]) -> (bool, String, String) {
    let output = Command::new(binary("orderflow"))
        .args(args)
        .args(["--receiver", &pipeline.stage("receiver").url()])
        .args(["--stock", &pipeline.stage("stock").url()])
        .args(["--invoice", &pipeline.stage("invoice").url()])
        .args(["--notifier", &pipeline.stage("notifier").url()])
        .env("NO_COLOR", "1")
        .env_remove("ORDERFLOW_ADMIN_TOKEN")
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn operators_manage_stock_faults_dead_letters_and_follow_orders() {
    const TOKEN: &str = "operator-token";
    let webhook = orderflow_e2e::webhook::Webhook::start(orderflow_e2e::webhook::Mode::Refuse)
        .await
        .unwrap();
    let token = vec!["--admin-token".to_owned(), TOKEN.to_owned()];
    let mut notifier_args = token.clone();
    notifier_args.extend([
        "--sink".into(),
        "webhook".into(),
        "--webhook-url".into(),
        webhook.url(),
    ]);
    let pipeline = Pipeline::start(PipelineOptions {
        catalog: catalog(&[("A", 1250, 5)]),
        with_notifier: true,
        stock_args: token.clone(),
        invoice_args: token,
        notifier_args,
        ..Default::default()
    })
    .await
    .unwrap();

    // Stock: list, get, and set (an admin command: refused without the token).
    let (ok, out, _) = orderflow(&pipeline, &["stock", "list"]);
    assert!(
        ok && out.contains("Item A") && out.contains("12.50 EUR"),
        "{out}"
    );
    let set_mug = [
        "stock",
        "set",
        "MUG",
        "--name",
        "Mug",
        "--price",
        "12.99",
        "--currency",
        "EUR",
        "--available",
        "3",
    ];
    let (ok, _, err) = orderflow(&pipeline, &set_mug);
    assert!(
        !ok && err.contains("Unauthenticated") && err.contains("--admin-token"),
        "{err}"
    );
    let (ok, out, err) = orderflow(
        &pipeline,
        &[&set_mug[..], &["--admin-token", TOKEN]].concat(),
    );
    assert!(ok, "{err}");
    assert!(out.contains("MUG") && out.contains("12.99 EUR"), "{out}");
    let (ok, out, _) = orderflow(&pipeline, &["stock", "get", "MUG"]);
    assert!(ok && out.contains("Mug"), "{out}");
    let (ok, _, err) = orderflow(
        &pipeline,
        &[
            "stock",
            "set",
            "MUG",
            "--price",
            "1.999",
            "--currency",
            "EUR",
            "--admin-token",
            TOKEN,
        ],
    );
    assert!(!ok && err.contains("decimal places"), "{err}");

    // Faults: show, set (admin), show again.
    let (ok, out, _) = orderflow(&pipeline, &["faults", "show"]);
    assert!(ok && out.contains("decline rate            0"), "{out}");
    let (ok, out, err) = orderflow(
        &pipeline,
        &["faults", "set", "--latency", "2ms", "--admin-token", TOKEN],
    );
    assert!(
        ok && out.contains("latency                 2ms"),
        "{out}{err}"
    );

    // An order whose notification the webhook refuses: get, watch and the dead letter queue.
    let (ok, order_id, err) =
        orderflow(&pipeline, &["place", "--customer", "ops", "--line", "A=2"]);
    assert!(ok, "{err}");
    let order_id = order_id.trim().to_owned();
    pipeline
        .wait_for_terminal(std::slice::from_ref(&order_id), Duration::from_secs(60))
        .await
        .unwrap();
    let (ok, out, _) = orderflow(&pipeline, &["watch", &order_id]);
    assert!(ok, "{out}");
    for status in ["ACCEPTED", "RESERVED", "INVOICED", "DEAD_LETTERED"] {
        assert!(out.contains(status), "{status} missing from\n{out}");
    }
    let (ok, out, _) = orderflow(&pipeline, &["get", &order_id]);
    assert!(
        ok && out.contains("DEAD_LETTERED (terminal)") && out.contains("invoice   #1"),
        "{out}"
    );
    let (ok, out, _) = orderflow(&pipeline, &["get", &order_id, "--json"]);
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(ok && json["status"] == "DEAD_LETTERED", "{out}");
    let (ok, out, _) = orderflow(&pipeline, &["dlq", "list"]);
    assert!(
        ok && out.contains(&order_id)
            && out.contains("refused by the sink")
            && out.contains("1 dead letter(s)"),
        "{out}"
    );
    webhook.set_mode(orderflow_e2e::webhook::Mode::Accept);
    let (ok, _, err) = orderflow(&pipeline, &["dlq", "replay", "--all"]);
    assert!(!ok && err.contains("Unauthenticated"), "{err}");
    let (ok, out, err) = orderflow(
        &pipeline,
        &["dlq", "replay", "--all", "--admin-token", TOKEN],
    );
    assert!(ok && out.contains("replayed 1"), "{out}{err}");
    // DEAD_LETTERED is terminal until the replayed delivery reaches the receiver: `watch` started
    // before that ends at once, so wait for the replay to land first.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (ok, out, _) = orderflow(&pipeline, &["get", &order_id, "--json"]);
        let json: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
        if ok && json["status"] == "NOTIFIED" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never notified: {out}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (ok, out, _) = orderflow(&pipeline, &["watch", &order_id]);
    assert!(ok && out.contains("NOTIFIED"), "{out}");
    let (ok, _, err) = orderflow(&pipeline, &["get", "no-such-order"]);
    assert!(!ok && err.contains("NotFound"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn load_counts_every_order_and_reports_its_latencies() {
    use orderflow_proto::v1::NotificationKind;

    let pipeline = Pipeline::start(PipelineOptions {
        catalog: catalog(&[("A", 1000, 100_000), ("B", 250, 100_000)]),
        with_notifier: true,
        ..Default::default()
    })
    .await
    .unwrap();

    // Closed loop, a fixed number of orders, a hot SKU and a share that will be rejected.
    let (ok, out, err) = orderflow(
        &pipeline,
        &[
            "load",
            "--concurrency",
            "16",
            "--orders",
            "300",
            "--skus",
            "A,B",
            "--hot-sku",
            "A",
            "--hot-share",
            "0.5",
            "--reject-share",
            "0.2",
            "--json",
        ],
    );
    assert!(ok, "{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["sent"], 300, "{report}");
    assert_eq!(report["accepted"], 300, "{report}");
    assert_eq!(report["errors"], serde_json::json!({}), "{report}");
    assert_eq!(report["notified"], 300, "{report}");
    // Closed loop, an order goes out as soon as a call is free: it has no due time to be late for.
    assert!(report["send_lateness_us"].is_null(), "{report}");
    for histogram in ["accept_latency_us", "placed_to_notified_us"] {
        let h = &report[histogram];
        assert_eq!(h["count"], 300, "{histogram}: {report}");
        let (p50, p99, max) = (
            h["p50"].as_u64().unwrap(),
            h["p99"].as_u64().unwrap(),
            h["max"].as_u64().unwrap(),
        );
        assert!(0 < p50 && p50 <= p99 && p99 <= max, "{histogram}: {report}");
    }

    // What the load generator counted is what the pipeline did: one notification per order, the
    // rejected share rejected (unknown SKU) and the rest confirmed.
    let notifications = pipeline.notifications().await.unwrap();
    assert_eq!(notifications.len(), 300);
    let orders: std::collections::HashSet<_> =
        notifications.iter().map(|n| n.order_id.clone()).collect();
    assert_eq!(orders.len(), 300);
    let rejected = notifications
        .iter()
        .filter(|n| n.kind() == NotificationKind::Rejected)
        .count();
    let confirmed = notifications
        .iter()
        .filter(|n| n.kind() == NotificationKind::Confirmed)
        .count();
    assert!(rejected > 0 && confirmed > 0, "{rejected} / {confirmed}");
    assert_eq!(rejected + confirmed, 300);
    // And the load generator says so, from the notifier's events.
    assert_eq!(
        report["outcomes"],
        serde_json::json!({
            "confirmed": confirmed,
            "rejected": rejected,
            "payment_failed": 0,
            "dead_lettered": 0
        }),
        "{report}"
    );
    assert_eq!(report["warnings"], serde_json::json!([]), "{report}");

    // When most orders are rejected, the figures are about rejections: the report says so.
    let (ok, out, err) = orderflow(
        &pipeline,
        &[
            "load",
            "--concurrency",
            "8",
            "--orders",
            "40",
            "--skus",
            "A",
            "--reject-share",
            "1",
        ],
    );
    assert!(ok, "{err}");
    assert!(out.contains("rejected 40"), "{out}");
    assert!(out.contains("warning: most orders were rejected"), "{out}");

    // Open loop with a count, without following the notifier; bad shapes are refused up front.
    let (ok, out, err) = orderflow(
        &pipeline,
        &[
            "load",
            "--rate",
            "500",
            "--orders",
            "100",
            "--skus",
            "A",
            "--no-notified",
            "--json",
        ],
    );
    assert!(ok, "{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["accepted"], 100, "{report}");
    assert!(report["notified"].is_null(), "{report}");
    // How late the client sent each order is its own figure, beside the latencies it is part of.
    let late = &report["send_lateness_us"];
    assert_eq!(late["count"], 100, "{report}");
    assert!(
        late["p50"].as_u64().unwrap() <= late["max"].as_u64().unwrap(),
        "{report}"
    );
    // Without a terminal (a container's log) progress is a line on stderr every 10 s.
    let (ok, out, err) = orderflow(
        &pipeline,
        &[
            "load",
            "--rate",
            "20",
            "--duration",
            "11s",
            "--skus",
            "A",
            "--no-notified",
        ],
    );
    assert!(ok, "{err}");
    assert!(out.contains("accepted"), "{out}");
    assert!(out.contains("sent late by"), "{out}");
    let progress = err.lines().find(|l| l.starts_with("load: 10 s  sent "));
    assert!(progress.is_some_and(|l| l.contains("accepted")), "{err}");
    let (ok, _, err) = orderflow(&pipeline, &["load", "--rate", "0", "--orders", "1"]);
    assert!(!ok && err.contains("--rate"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn bulk_load_ends_and_accounts_for_every_order_when_the_receiver_dies() {
    let dir = tempfile::tempdir().unwrap();
    let mut receiver = orderflow_e2e::Stage::start("receiver", "127.0.0.1:0", dir.path(), vec![])
        .await
        .unwrap();
    let load = tokio::process::Command::new(binary("orderflow"))
        .args(["--receiver", &receiver.url()])
        .args(["load", "--bulk", "--concurrency", "64", "--duration", "60s"])
        .args(["--no-notified", "--json"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    receiver.kill9().await;
    // The stream breaks with orders unanswered: load must neither hang on them nor lose count.
    let output = tokio::time::timeout(Duration::from_secs(30), load.wait_with_output())
        .await
        .expect("load ended once the receiver was gone")
        .unwrap();
    assert!(output.status.success());
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let refused: u64 = report["errors"]
        .as_object()
        .unwrap()
        .values()
        .map(|n| n.as_u64().unwrap())
        .sum();
    assert!(report["accepted"].as_u64().unwrap() > 0, "{report}");
    assert!(refused > 0, "{report}");
    assert_eq!(
        report["sent"].as_u64().unwrap(),
        report["accepted"].as_u64().unwrap() + refused,
        "{report}"
    );
}
