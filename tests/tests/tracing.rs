//! One trace per order across the four real binaries, exported over OTLP to a receiver started in
//! this test (the collector's own `TraceService`): for 50 orders including rejections and payment
//! retries, every order is exactly one trace with spans from all four services, a single root and no
//! dangling parent, failed attempts are errors, and different orders are different traces. An
//! incoming `traceparent` is honoured, and health checks are not traced.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use orderflow_e2e::{
    Pipeline, PipelineOptions, catalog, line, otlp::OtlpReceiver, otlp::verify_order_traces,
    place_all, place_streamed,
};
use orderflow_proto::v1::PlaceOrderRequest;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

const ORDERS: usize = 50;

/// The stages' environment for exporting to `collector` every 200 ms, plus `extra`.
fn exporting_to(collector: &OtlpReceiver, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env = vec![
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT".to_owned(),
            collector.endpoint(),
        ),
        ("OTEL_BSP_SCHEDULE_DELAY".to_owned(), "200".to_owned()),
    ];
    env.extend(
        extra
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    env
}

#[tokio::test(flavor = "multi_thread")]
async fn every_order_is_one_trace_across_the_four_services() {
    let collector = OtlpReceiver::start().await.unwrap();
    let env = exporting_to(&collector, &[]);
    let mut pipeline = Pipeline::start(PipelineOptions {
        catalog: catalog(&[("A", 1000, 10_000), ("B", 2500, 10_000), ("SOLD", 100, 0)]),
        tax_rate_bps: 2000,
        with_notifier: true,
        invoice_args: [
            "--gateway-transient-failure-rate",
            "0.4",
            "--payment-max-attempts",
            "12",
            "--payment-backoff-min",
            "5ms",
            "--payment-backoff-max",
            "40ms",
        ]
        .map(String::from)
        .to_vec(),
        env,
        ..Default::default()
    })
    .await
    .unwrap();

    // Every fifth order asks for the sold-out item and is rejected.
    let orders = (0..ORDERS)
        .map(|i| {
            if i % 5 == 0 {
                vec![line("A", 1), line("SOLD", 1)]
            } else {
                vec![line("A", 1), line("B", 2)]
            }
        })
        .collect();
    let placed = place_all(pipeline.receiver().await, "tracer", orders, 8).await;
    let order_ids: Vec<String> = placed
        .into_iter()
        .map(|p| p.result.expect("order accepted"))
        .collect();

    // One more, placed by a caller that is itself traced.
    let caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let mut request = tonic::Request::new(PlaceOrderRequest {
        customer_id: "traced-caller".into(),
        lines: vec![line("A", 1)],
        idempotency_key: String::new(),
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{caller_trace}-{caller_span}-01")
            .parse()
            .unwrap(),
    );
    let traced_order = pipeline
        .receiver()
        .await
        .place_order(request)
        .await
        .unwrap()
        .into_inner()
        .order_id;

    pipeline
        .wait_for_notifications(ORDERS + 1, Duration::from_secs(120))
        .await
        .unwrap();
    // Health checks are plumbing: never traced.
    HealthClient::new(pipeline.stage("receiver").channel().await)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
    // Stopping flushes every exporter.
    for stage in &mut pipeline.stages {
        assert!(
            stage.terminate().await.unwrap(),
            "{} exited badly",
            stage.name
        );
    }
    let spans = collector.spans();
    eprintln!("received {} spans", spans.len());

    let traces = verify_order_traces(&spans, &order_ids).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(traces.len(), ORDERS);

    // Payment retries are visible: each attempt its own span, failed ones marked as errors.
    let attempts: Vec<_> = spans
        .iter()
        .filter(|s| s.name == "payment attempt")
        .collect();
    let failed: Vec<_> = attempts
        .iter()
        .filter(|s| s.attribute("outcome") == Some("transient failure"))
        .collect();
    assert!(
        !failed.is_empty(),
        "no payment attempt failed at a 40 % failure rate"
    );
    assert!(
        failed
            .iter()
            .all(|s| s.error && !s.status_message.is_empty())
    );
    assert!(
        attempts
            .iter()
            .filter(|s| s.attribute("outcome") == Some("done"))
            .all(|s| !s.error)
    );
    assert!(attempts.iter().any(|s| s.attribute("attempt") == Some("2")));
    // Rejections are errors with their reason; invoices carry their number.
    let rejected: Vec<_> = spans
        .iter()
        .filter(|s| s.name == "reserve stock" && s.attribute("outcome") == Some("rejected"))
        .collect();
    assert_eq!(rejected.len(), ORDERS / 5);
    assert!(
        rejected
            .iter()
            .all(|s| s.error && s.status_message.contains("SOLD"))
    );
    let invoiced = spans
        .iter()
        .filter(|s| s.name == "create invoice" && s.attribute("invoice.number").is_some())
        .count();
    assert_eq!(invoiced, ORDERS - ORDERS / 5 + 1);
    // Every order span names its stage and customer.
    for span in spans.iter().filter(|s| s.attribute("order.id").is_some()) {
        assert!(span.attribute("orderflow.stage").is_some(), "{span:?}");
        assert!(span.attribute("customer.id").is_some(), "{span:?}");
    }

    // The traced caller's order joined the caller's trace, under the caller's span.
    let joined: Vec<_> = spans
        .iter()
        .filter(|s| s.attribute("order.id") == Some(traced_order.as_str()))
        .collect();
    assert!(joined.iter().all(|s| s.trace_id == caller_trace));
    let rpc = joined
        .iter()
        .find(|s| s.name == "orderflow.v1.OrderReceiver/PlaceOrder")
        .expect("the PlaceOrder span");
    assert_eq!(rpc.parent_span_id, caller_span);

    assert!(
        !spans.iter().any(|s| s.name.contains("grpc.health")),
        "health checks were traced"
    );
}

/// With a ratio sampler, an order is exported whole or not at all, whether it came by `PlaceOrder`
/// or on a `PlaceOrders` stream: the stages skip the spans of an unsampled order but pass its
/// context on, so no later stage starts a trace of its own for it.
#[tokio::test(flavor = "multi_thread")]
async fn sampled_orders_are_whole_traces_and_unsampled_ones_export_nothing() {
    let collector = OtlpReceiver::start().await.unwrap();
    let env = exporting_to(
        &collector,
        &[
            ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "0.5"),
        ],
    );
    let mut pipeline = Pipeline::start(PipelineOptions {
        catalog: catalog(&[("A", 1000, 10_000)]),
        with_notifier: true,
        // Retries in every trace, but never so many failures in a row that an order's payment
        // fails: with 5 attempts (the default) that happened to ~0.24 % of orders, and then the
        // trace has no "create invoice". 0.3^30 does not happen.
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
        env,
        ..Default::default()
    })
    .await
    .unwrap();
    let single = place_all(
        pipeline.receiver().await,
        "sampled",
        (0..40).map(|_| vec![line("A", 1)]).collect(),
        8,
    )
    .await;
    let mut order_ids: Vec<String> = single
        .into_iter()
        .map(|p| p.result.expect("order accepted"))
        .collect();
    let requests = (0..40)
        .map(|i| PlaceOrderRequest {
            customer_id: format!("streamed-{i}"),
            lines: vec![line("A", 1)],
            idempotency_key: String::new(),
        })
        .collect();
    let answers = place_streamed(pipeline.receiver().await, requests)
        .await
        .unwrap();
    for answer in answers {
        match answer.result {
            Some(orderflow_proto::v1::place_orders_response::Result::Accepted(accepted)) => {
                order_ids.push(accepted.order_id)
            }
            other => panic!("refused: {other:?}"),
        }
    }
    pipeline
        .wait_for_notifications(80, Duration::from_secs(120))
        .await
        .unwrap();
    for stage in &mut pipeline.stages {
        assert!(
            stage.terminate().await.unwrap(),
            "{} exited badly",
            stage.name
        );
    }
    let spans = collector.spans();
    let sampled: Vec<String> = order_ids
        .iter()
        .filter(|id| {
            spans
                .iter()
                .any(|s| s.attribute("order.id") == Some(id.as_str()))
        })
        .cloned()
        .collect();
    eprintln!(
        "{} of 80 orders sampled, {} spans",
        sampled.len(),
        spans.len()
    );
    // At 50 %, 80 orders all or none sampled is a 1-in-10^24 event.
    assert!(
        !sampled.is_empty() && sampled.len() < 80,
        "{}",
        sampled.len()
    );
    // Each sampled order is one whole trace: all four services, one root, no dangling parent.
    let traces = verify_order_traces(&spans, &sampled).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(traces.len(), sampled.len());
    for id in &sampled {
        let names: Vec<&str> = spans
            .iter()
            .filter(|s| s.attribute("order.id") == Some(id.as_str()))
            .map(|s| s.name.as_str())
            .collect();
        for expected in [
            "reserve stock",
            "price order",
            "payment attempt",
            "create invoice",
            "notify customer",
            "delivery attempt",
            "customer notified",
        ] {
            assert!(
                names.contains(&expected),
                "order {id}: no {expected:?} in {names:?}"
            );
        }
    }
    // Nothing else was exported: no span of an unsampled order.
    let traced: std::collections::HashSet<&str> = traces.values().map(String::as_str).collect();
    let strays: Vec<_> = spans
        .iter()
        // Calls that are not about one order (the stream itself, the test's own queries) are
        // traces of their own, sampled on their own.
        .filter(|s| s.attribute("order.id").is_some() && !traced.contains(s.trace_id.as_str()))
        .map(|s| format!("{}:{} {:?}", s.service, s.name, s.attribute("order.id")))
        .collect();
    assert!(
        strays.is_empty(),
        "spans outside the sampled orders' traces: {strays:?}"
    );
}
