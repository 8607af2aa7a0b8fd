//! Reflection and health, checked with a gRPC client that is not ours: Python grpcio with
//! grpcio-reflection and grpcio-health-checking, pinned in `tests/python/requirements.txt` and
//! installed by this test into `target/e2e-python` on first use (pip from PyPI). Every binary lists
//! exactly the services it serves over reflection v1 and v1alpha, their methods resolve from the
//! reflected descriptors, and health is SERVING.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use orderflow_e2e::{Pipeline, PipelineOptions, catalog, python, python_packages};
use serde_json::Value;

fn reflect(addr: &str) -> Value {
    run_script("reflect.py", addr)
}

/// Runs `tests/python/<script> <addr>` with the pinned packages; its JSON answer.
fn run_script(script: &str, addr: &str) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("python")
        .join(script);
    let output = std::process::Command::new(python())
        .env("PYTHONPATH", python_packages())
        .arg(&script)
        .arg(addr)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python()));
    assert!(
        output.status.success(),
        "{} failed:\n{}",
        script.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_binary_serves_reflection_and_health() {
    let pipeline = Pipeline::start(PipelineOptions {
        catalog: catalog(&[("A", 100, 1)]),
        tax_rate_bps: 0,
        with_notifier: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let expected: [(&str, &str, &[&str]); 4] = [
        (
            "receiver",
            "orderflow.v1.OrderReceiver",
            &["GetOrder", "PlaceOrder", "PlaceOrders", "WatchOrder"],
        ),
        (
            "stock",
            "orderflow.v1.StockChecker",
            &["GetStock", "ListStock", "SetStock"],
        ),
        (
            "invoice",
            "orderflow.v1.InvoiceCreator",
            &[
                "GetFaults",
                "GetInvoice",
                "ListCaptures",
                "ListDeadLetters",
                "ListInvoices",
                "SetFaults",
            ],
        ),
        (
            "notifier",
            "orderflow.v1.Notifier",
            &["ListDeadLetters", "ListNotifications", "ReplayDeadLetters"],
        ),
    ];
    for (stage, service, methods) in expected {
        let addr = pipeline.stage(stage).addr.to_string();
        let report = tokio::task::spawn_blocking(move || reflect(&addr))
            .await
            .unwrap();
        let mut want = vec![
            "grpc.health.v1.Health".to_owned(),
            "grpc.reflection.v1.ServerReflection".to_owned(),
            "grpc.reflection.v1alpha.ServerReflection".to_owned(),
            "orderflow.v1.EventLog".to_owned(),
            service.to_owned(),
        ];
        want.sort();
        assert_eq!(strings(&report["v1"]), want, "{stage}: reflection v1");
        assert_eq!(
            strings(&report["v1alpha"]),
            want,
            "{stage}: reflection v1alpha"
        );
        assert_eq!(strings(&report["methods"][service]), methods, "{stage}");
        assert_eq!(
            strings(&report["methods"]["orderflow.v1.EventLog"]),
            ["Ack", "Head", "Subscribe"],
            "{stage}"
        );
        for name in ["", service, "orderflow.v1.EventLog"] {
            assert_eq!(
                report["health"][name], "SERVING",
                "{stage}: health of {name:?}"
            );
        }
    }
}

/// A request with hundreds of bad fields is still INVALID_ARGUMENT for a standard client: the
/// violations travel in response headers, which grpcio (C-core) caps at 8–16 KiB, so the server
/// lists the first ones and counts the rest instead of answering with an unbounded list.
#[tokio::test(flavor = "multi_thread")]
async fn a_very_bad_order_is_invalid_argument_for_grpcio() {
    let pipeline = Pipeline::start(PipelineOptions {
        catalog: catalog(&[("A", 100, 1)]),
        tax_rate_bps: 0,
        with_notifier: false,
        ..Default::default()
    })
    .await
    .unwrap();
    let addr = pipeline.stage("receiver").addr.to_string();
    let answer = tokio::task::spawn_blocking(move || run_script("bad_order.py", &addr))
        .await
        .unwrap();
    assert_eq!(answer["code"], "INVALID_ARGUMENT", "{answer}");
    let message = answer["message"].as_str().unwrap();
    assert!(message.contains("customer_id: required"), "{message}");
    // 1 + 1 + 100 × 2 violations: 20 listed, the rest counted.
    assert!(message.ends_with("; and 181 more"), "{message}");
    assert!(answer["details_bytes"].as_u64().unwrap() > 0, "{answer}");
}
