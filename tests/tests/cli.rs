//! The `orderflow` command as a user runs it: the demo (the main job) completes with a consistent
//! report, and `place` accepts a good order and explains a bad one.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

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
    assert_eq!(accepted, 40);
    assert_eq!(confirmed + rejected, 40, "{stdout}");
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
