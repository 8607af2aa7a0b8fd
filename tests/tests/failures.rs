//! Bad days, each deliberate and visible, losing nothing: a flaky webhook (every notification arrives,
//! each idempotency key accepted once), a refusing webhook (dead letters, replayed once it is fixed),
//! a payment gateway that never answers (every order PaymentFailed, stock given back, captures
//! voided), idempotency keys, a full backlog, the admin token, TLS everywhere, and requests that are
//! too large or malformed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{collections::HashMap, time::Duration};

use bytes::{Buf, BufMut};
use orderflow_e2e::{
    Pipeline, PipelineOptions, TlsFiles, binary, catalog, line, place_all,
    webhook::{Mode, Webhook},
};
use orderflow_proto::v1::{
    DeadLetterState, GetFaultsRequest, GetStockRequest, ListCapturesRequest,
    ListDeadLettersRequest, NotificationKind, OrderStatus, PlaceOrderRequest,
    ReplayDeadLettersRequest, SetFaultsRequest, SetStockRequest,
    replay_dead_letters_request::Target,
};
use tonic::{
    Code, Request, Status,
    codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
};
use tonic_types::StatusExt;

fn args(flags: &[&str]) -> Vec<String> {
    flags.iter().map(|s| (*s).to_owned()).collect()
}

/// A pipeline whose notifier delivers to `webhook` (short backoff, up to 40 attempts), and the ids
/// of `orders` one-line orders placed by `customer`.
async fn webhook_pipeline(
    webhook: &Webhook,
    customer: &str,
    orders: usize,
) -> (Pipeline, Vec<String>) {
    let mut notifier_args = args(&[
        "--sink",
        "webhook",
        "--delivery-backoff-min",
        "5ms",
        "--delivery-backoff-max",
        "50ms",
        "--delivery-max-attempts",
        "40",
        "--webhook-url",
    ]);
    notifier_args.push(webhook.url());
    let pipeline = Pipeline::start(PipelineOptions {
        catalog: catalog(&[("A", 100, 1000)]),
        with_notifier: true,
        notifier_args,
        ..Default::default()
    })
    .await
    .unwrap();
    let placed = place_all(
        pipeline.receiver().await,
        customer,
        (0..orders).map(|_| vec![line("A", 1)]).collect(),
        8,
    )
    .await;
    let ids = placed.into_iter().map(|p| p.result.unwrap()).collect();
    (pipeline, ids)
}

async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn order(
    customer: &str,
    lines: Vec<orderflow_proto::v1::OrderLine>,
    key: &str,
) -> PlaceOrderRequest {
    PlaceOrderRequest {
        customer_id: customer.into(),
        lines,
        idempotency_key: key.into(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flaky_webhook_gets_every_notification_exactly_once() {
    const ORDERS: usize = 30;
    const FAILURES: usize = 45;
    let webhook = Webhook::start(Mode::FailFirst(FAILURES)).await.unwrap();
    let (pipeline, ids) = webhook_pipeline(&webhook, "hooked", ORDERS).await;
    assert_eq!(ids.len(), ORDERS);
    let notifications = pipeline
        .wait_for_notifications(ORDERS, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(notifications.len(), ORDERS);
    let accepted = webhook.accepted_per_key();
    assert_eq!(accepted.len(), ORDERS, "every notification arrived");
    assert!(
        accepted.values().all(|&n| n == 1),
        "a key was accepted twice: {accepted:?}"
    );
    for n in &notifications {
        assert_eq!(n.sink, "webhook");
        assert_eq!(accepted.get(&n.idempotency_key), Some(&1));
    }
    // Every failed call was an attempt that was retried.
    let attempts: u32 = notifications.iter().map(|n| n.attempts).sum();
    assert_eq!(attempts as usize, ORDERS + FAILURES);
    assert_eq!(webhook.calls().len(), ORDERS + FAILURES);
}

#[tokio::test(flavor = "multi_thread")]
async fn dead_letters_are_replayed_once_the_webhook_is_fixed() {
    const ORDERS: usize = 10;
    let webhook = Webhook::start(Mode::Refuse).await.unwrap();
    let (pipeline, ids) = webhook_pipeline(&webhook, "refused", ORDERS).await;
    let done = pipeline
        .wait_for_terminal(&ids, Duration::from_secs(60))
        .await
        .unwrap();
    assert!(
        done.iter()
            .all(|o| o.status() == OrderStatus::DeadLettered && o.terminal)
    );
    assert!(
        done.iter().all(|o| o.failure_reason.contains("HTTP 400")),
        "{:?}",
        done[0].failure_reason
    );

    let mut notifier = pipeline.notifier().await;
    let letters = |mut notifier: orderflow_proto::v1::notifier_client::NotifierClient<_>| async move {
        notifier
            .list_dead_letters(ListDeadLettersRequest {
                page_size: 100,
                page_token: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .dead_letters
    };
    let dead = letters(notifier.clone()).await;
    assert_eq!(dead.len(), ORDERS);
    for letter in &dead {
        assert_eq!(letter.stage, "notifier");
        assert_eq!(letter.reason, "refused by the sink");
        assert_eq!(letter.attempts, 1, "a 400 is final at once");
        assert!(letter.last_error.contains("HTTP 400"));
        assert_eq!(letter.state(), DeadLetterState::Dead);
        assert!(letter.dead_lettered_at.is_some());
    }
    assert!(pipeline.notifications().await.unwrap().is_empty());

    // Fixed: replaying every dead letter delivers each exactly once.
    webhook.set_mode(Mode::Accept);
    let replayed = notifier
        .replay_dead_letters(ReplayDeadLettersRequest {
            target: Some(Target::All(true)),
            partition: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(replayed.replayed.len(), ORDERS);
    let done = pipeline
        .wait_for_notifications(ORDERS * 2, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(done.len(), ORDERS);
    let accepted = webhook.accepted_per_key();
    assert_eq!(accepted.len(), ORDERS);
    assert!(accepted.values().all(|&n| n == 1));
    let resolved = letters(notifier.clone()).await;
    assert!(
        resolved
            .iter()
            .all(|l| l.state() == DeadLetterState::Delivered
                && l.replays == 1
                && l.resolution == "delivered by replay 1")
    );
    let orders = pipeline
        .wait_for_terminal(&ids, Duration::from_secs(30))
        .await
        .unwrap();
    assert!(orders.iter().all(|o| o.status() == OrderStatus::Notified));

    // Replaying what was delivered does nothing.
    let again = notifier
        .replay_dead_letters(ReplayDeadLettersRequest {
            target: Some(Target::All(true)),
            partition: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(again.replayed.is_empty());
    let one = notifier
        .replay_dead_letters(ReplayDeadLettersRequest {
            target: Some(Target::Id(dead[0].id)),
            partition: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (one.replayed.len(), one.skipped.as_slice()),
        (0, [dead[0].id].as_slice())
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(webhook.accepted_per_key().values().sum::<usize>(), ORDERS);
    assert_eq!(pipeline.notifications().await.unwrap().len(), ORDERS);

    for (target, code) in [
        (Some(Target::Id(999)), Code::NotFound),
        (Some(Target::All(false)), Code::InvalidArgument),
        (None, Code::InvalidArgument),
    ] {
        let status = notifier
            .replay_dead_letters(ReplayDeadLettersRequest {
                target,
                partition: 0,
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), code);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn payments_that_always_fail_give_everything_back() {
    const ORDERS: usize = 20;
    let pipeline = Pipeline::start(PipelineOptions {
        catalog: catalog(&[("A", 1000, 100), ("B", 250, 50)]),
        tax_rate_bps: 2000,
        with_notifier: true,
        invoice_args: args(&[
            "--gateway-transient-failure-rate",
            "1.0",
            "--payment-max-attempts",
            "3",
            "--payment-backoff-min",
            "5ms",
            "--payment-backoff-max",
            "20ms",
        ]),
        ..Default::default()
    })
    .await
    .unwrap();
    let placed = place_all(
        pipeline.receiver().await,
        "unlucky",
        (0..ORDERS)
            .map(|_| vec![line("A", 2), line("B", 1)])
            .collect(),
        4,
    )
    .await;
    let ids: Vec<String> = placed.into_iter().map(|p| p.result.unwrap()).collect();
    let notifications = pipeline
        .wait_for_notifications(ORDERS, Duration::from_secs(60))
        .await
        .unwrap();
    assert!(
        notifications
            .iter()
            .all(|n| n.kind() == NotificationKind::PaymentFailed)
    );
    assert!(notifications.iter().all(|n| n.message.contains("refunded")));
    assert!(
        pipeline.invoices().await.unwrap().is_empty(),
        "no invoice number was used"
    );

    let mut invoice = pipeline.invoice().await;
    let dead = invoice
        .list_dead_letters(ListDeadLettersRequest {
            page_size: 100,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .dead_letters;
    assert_eq!(dead.len(), ORDERS);
    assert!(
        dead.iter()
            .all(|l| l.stage == "invoice" && l.reason == "retries exhausted" && l.attempts == 3)
    );
    let mut dead_orders: Vec<_> = dead.iter().map(|l| l.order_id.clone()).collect();
    dead_orders.sort();
    let mut sorted_ids = ids.clone();
    sorted_ids.sort();
    assert_eq!(dead_orders, sorted_ids, "the dead letters list every order");

    // Every reservation was given back.
    wait_until("stock to be released", Duration::from_secs(30), || async {
        let stock = pipeline.stock_levels().await.unwrap();
        (
            stock["A"].available,
            stock["A"].reserved,
            stock["B"].available,
            stock["B"].reserved,
        ) == (100, 0, 50, 0)
    })
    .await;
    let orders = pipeline
        .wait_for_terminal(&ids, Duration::from_secs(30))
        .await
        .unwrap();
    for order in &orders {
        let path: Vec<_> = order.transitions.iter().map(|t| t.status()).collect();
        assert_eq!(
            path,
            [
                OrderStatus::Accepted,
                OrderStatus::Reserved,
                OrderStatus::PaymentFailed,
                OrderStatus::Notified
            ]
        );
        assert!(
            order.failure_reason.contains("3 attempts"),
            "{}",
            order.failure_reason
        );
    }
    wait_until(
        "the receiver to learn of the releases",
        Duration::from_secs(30),
        || async {
            let mut released = 0;
            for id in &ids {
                released += usize::from(
                    pipeline
                        .order(id)
                        .await
                        .unwrap()
                        .stock_released_at
                        .is_some(),
                );
            }
            released == ORDERS
        },
    )
    .await;

    // Half the failures charged the card and lost the answer: once the gateway answers again, every
    // such capture is voided, and no order was ever charged twice.
    let faults = invoice
        .get_faults(GetFaultsRequest {})
        .await
        .unwrap()
        .into_inner();
    let stats = faults.stats.unwrap();
    assert_eq!(faults.transient_failure_rate, 1.0);
    assert!(stats.requests >= (ORDERS * 3) as u64);
    invoice
        .set_faults(SetFaultsRequest {
            transient_failure_rate: Some(0.0),
            ..Default::default()
        })
        .await
        .unwrap();
    wait_until("refunds to finish", Duration::from_secs(90), || {
        let mut invoice = invoice.clone();
        async move {
            invoice
                .list_dead_letters(ListDeadLettersRequest {
                    page_size: 100,
                    page_token: String::new(),
                })
                .await
                .unwrap()
                .into_inner()
                .dead_letters
                .iter()
                .all(|l| l.resolved_at.is_some())
        }
    })
    .await;
    let captures = invoice
        .list_captures(ListCapturesRequest {
            page_size: 1000,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .captures;
    let mut per_order: HashMap<&str, usize> = HashMap::new();
    for capture in &captures {
        *per_order.entry(capture.order_id.as_str()).or_default() += 1;
        assert!(
            capture.voided_at.is_some(),
            "capture {} was not voided",
            capture.capture_id
        );
    }
    assert!(per_order.values().all(|&n| n == 1));
    let letters = invoice
        .list_dead_letters(ListDeadLettersRequest {
            page_size: 100,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .dead_letters;
    let voided = letters
        .iter()
        .filter(|l| l.resolution.ends_with("voided"))
        .count();
    assert_eq!(voided, captures.len());
    assert!(
        letters
            .iter()
            .all(|l| l.resolution.ends_with("voided") || l.resolution == "nothing was captured")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn idempotency_keys_make_retries_safe() {
    let pipeline = Pipeline::start(PipelineOptions {
        catalog: catalog(&[("A", 100, 1000)]),
        with_notifier: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let mut receiver = pipeline.receiver().await;
    let first = receiver
        .place_order(order("kim", vec![line("A", 2)], "checkout-1"))
        .await
        .unwrap()
        .into_inner();
    assert!(!first.replayed);
    for _ in 0..3 {
        let retry = receiver
            .place_order(order(" kim ", vec![line("A", 2)], "checkout-1"))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (retry.order_id.as_str(), retry.offset, retry.replayed),
            (first.order_id.as_str(), first.offset, true)
        );
    }
    let conflict = receiver
        .place_order(order("kim", vec![line("A", 3)], "checkout-1"))
        .await
        .unwrap_err();
    assert_eq!(conflict.code(), Code::AlreadyExists);
    assert!(
        conflict.message().contains(&first.order_id),
        "{}",
        conflict.message()
    );
    // Keys belong to one customer.
    let other = receiver
        .place_order(order("lee", vec![line("A", 2)], "checkout-1"))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(other.order_id, first.order_id);
    let bad = receiver
        .place_order(order("kim", vec![line("A", 2)], "has spaces"))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert_eq!(
        bad.get_details_bad_request().unwrap().field_violations[0].field,
        "idempotency_key"
    );
    // Two orders created, no more.
    assert_eq!(pipeline.stage("receiver").head().await.unwrap(), 2);
    pipeline
        .wait_for_notifications(2, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(pipeline.stock_levels().await.unwrap()["A"].reserved, 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_backlog_turns_orders_away_and_loses_none() {
    const LIMIT: usize = 30;
    let pipeline = Pipeline::start(PipelineOptions {
        catalog: catalog(&[("A", 100, 1000)]),
        with_notifier: true,
        receiver_args: args(&["--max-backlog", "30"]),
        ..Default::default()
    })
    .await
    .unwrap();
    pipeline.stage("stock").pause();
    let placed = place_all(
        pipeline.receiver().await,
        "rush",
        (0..LIMIT).map(|_| vec![line("A", 1)]).collect(),
        4,
    )
    .await;
    assert!(placed.iter().all(|p| p.result.is_ok()));
    let mut receiver = pipeline.receiver().await;
    let refused = receiver
        .place_order(order("late", vec![line("A", 1)], ""))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(
        refused
            .get_details_retry_info()
            .and_then(|r| r.retry_delay)
            .is_some()
    );
    let http = reqwest::Client::new()
        .post(format!(
            "{}/v1/orders",
            pipeline.stage("receiver").http_url().unwrap()
        ))
        .json(&serde_json::json!({"customer_id": "late", "lines": [{"sku": "A", "quantity": 1}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(http.status(), 429);
    assert!(http.headers().contains_key("retry-after"));

    // Once the stock stage catches up, orders are accepted again; everything accepted arrives.
    pipeline.stage("stock").resume();
    wait_until("the backlog to drain", Duration::from_secs(30), || {
        let mut receiver = receiver.clone();
        async move {
            receiver
                .place_order(order("later", vec![line("A", 1)], ""))
                .await
                .is_ok()
        }
    })
    .await;
    pipeline
        .wait_for_notifications(LIMIT + 1, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(
        pipeline.stage("receiver").head().await.unwrap() as usize,
        LIMIT + 1
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_rpcs_need_the_token_and_order_rpcs_do_not() {
    const TOKEN: &str = "s3cret-admin-token";
    let token_args = args(&["--admin-token", TOKEN]);
    let pipeline = Pipeline::start(PipelineOptions {
        catalog: catalog(&[("A", 100, 10)]),
        with_notifier: true,
        stock_args: token_args.clone(),
        invoice_args: token_args.clone(),
        notifier_args: token_args,
        ..Default::default()
    })
    .await
    .unwrap();
    fn with_token<T>(message: T, token: Option<&str>) -> Request<T> {
        let mut request = Request::new(message);
        if let Some(token) = token {
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        request
    }
    let set_stock = || SetStockRequest {
        sku: "A".into(),
        available: Some(50),
        ..Default::default()
    };
    let mut stock = pipeline.stock().await;
    let mut invoice = pipeline.invoice().await;
    let mut notifier = pipeline.notifier().await;
    for token in [None, Some("wrong-token-value")] {
        let denied = [
            stock
                .set_stock(with_token(set_stock(), token))
                .await
                .map(|_| ())
                .unwrap_err(),
            invoice
                .set_faults(with_token(
                    SetFaultsRequest {
                        decline_rate: Some(1.0),
                        ..Default::default()
                    },
                    token,
                ))
                .await
                .map(|_| ())
                .unwrap_err(),
            notifier
                .replay_dead_letters(with_token(
                    ReplayDeadLettersRequest {
                        target: Some(Target::All(true)),
                        partition: 0,
                    },
                    token,
                ))
                .await
                .map(|_| ())
                .unwrap_err(),
        ];
        for status in denied {
            assert_eq!(
                status.code(),
                Code::Unauthenticated,
                "{token:?}: {status:?}"
            );
        }
    }
    // Nothing changed.
    assert_eq!(pipeline.stock_levels().await.unwrap()["A"].available, 10);
    assert_eq!(
        invoice
            .get_faults(GetFaultsRequest {})
            .await
            .unwrap()
            .into_inner()
            .decline_rate,
        0.0
    );
    // With the token, admin RPCs work.
    let item = stock
        .set_stock(with_token(set_stock(), Some(TOKEN)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(item.available, 50);
    invoice
        .set_faults(with_token(
            SetFaultsRequest {
                latency: Some(prost_types::Duration {
                    seconds: 0,
                    nanos: 1_000_000,
                }),
                ..Default::default()
            },
            Some(TOKEN),
        ))
        .await
        .unwrap();
    notifier
        .replay_dead_letters(with_token(
            ReplayDeadLettersRequest {
                target: Some(Target::All(true)),
                partition: 0,
            },
            Some(TOKEN),
        ))
        .await
        .unwrap();
    // Order and query RPCs need no token.
    pipeline
        .receiver()
        .await
        .place_order(order("open", vec![line("A", 1)], ""))
        .await
        .unwrap();
    stock
        .get_stock(GetStockRequest { sku: "A".into() })
        .await
        .unwrap();
    pipeline
        .wait_for_notifications(1, Duration::from_secs(30))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_on_every_server_and_every_link() {
    let certs = tempfile::tempdir().unwrap();
    let tls = TlsFiles::generate(certs.path()).unwrap();
    let pipeline = Pipeline::start(PipelineOptions {
        catalog: catalog(&[("A", 100, 10)]),
        with_notifier: true,
        tls: Some(tls.clone()),
        ..Default::default()
    })
    .await
    .unwrap();
    // gRPC over TLS, through all four stages (their links are https:// too).
    let id = pipeline
        .receiver()
        .await
        .place_order(order("secure", vec![line("A", 1)], ""))
        .await
        .unwrap()
        .into_inner()
        .order_id;
    let done = pipeline
        .wait_for_terminal(std::slice::from_ref(&id), Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(done[0].status(), OrderStatus::Notified);

    // A plaintext client gets nowhere.
    let addr = pipeline.stage("receiver").addr;
    let plain = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy();
    let refused = orderflow_proto::v1::order_receiver_client::OrderReceiverClient::new(plain)
        .place_order(order("plain", vec![line("A", 1)], ""))
        .await
        .unwrap_err();
    assert_ne!(refused.code(), Code::Ok);

    // The HTTP door serves TLS with the same certificate.
    let ca = reqwest::Certificate::from_pem(&std::fs::read(&tls.ca).unwrap()).unwrap();
    let https = reqwest::Client::builder()
        .add_root_certificate(ca)
        .build()
        .unwrap();
    let door = pipeline.stage("receiver").http_url().unwrap().to_owned();
    assert!(door.starts_with("https://"), "{door}");
    let created = https
        .post(format!("{door}/v1/orders"))
        .json(&serde_json::json!({"customer_id": "web", "lines": [{"sku": "A", "quantity": 1}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);

    // The container health check speaks TLS to its own stage.
    let health = std::process::Command::new(binary("orderflow-receiver"))
        .arg("health")
        .env("ORDERFLOW_LISTEN", addr.to_string())
        .env("ORDERFLOW_TLS_CERT", &tls.cert)
        .env("ORDERFLOW_TLS_KEY", &tls.key)
        .env("ORDERFLOW_TLS_CA", &tls.ca)
        .output()
        .unwrap();
    assert!(
        health.status.success(),
        "{}",
        String::from_utf8_lossy(&health.stdout)
    );
    assert!(String::from_utf8_lossy(&health.stdout).contains("SERVING"));

    // So does the CLI.
    let placed = std::process::Command::new(binary("orderflow"))
        .args(["place", "--customer", "cli", "--line", "A=1", "--receiver"])
        .arg(pipeline.stage("receiver").url())
        .arg("--tls-ca")
        .arg(&tls.ca)
        .output()
        .unwrap();
    assert!(
        placed.status.success(),
        "{}",
        String::from_utf8_lossy(&placed.stderr)
    );
}

/// Sends raw bytes as a request, to see what the server makes of a malformed message.
#[derive(Clone, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.put_slice(&item);
        Ok(())
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        Ok(Some(buf.copy_to_bytes(buf.remaining()).to_vec()))
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_and_malformed_requests_get_precise_statuses() {
    let pipeline = Pipeline::start(PipelineOptions {
        catalog: catalog(&[("A", 100, 10)]),
        with_notifier: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let oversized = pipeline
        .receiver()
        .await
        .place_order(order(&"x".repeat(2 * 1024 * 1024), vec![line("A", 1)], ""))
        .await
        .unwrap_err();
    assert_eq!(oversized.code(), Code::OutOfRange, "{oversized:?}");
    assert!(
        oversized.message().contains("too large"),
        "{}",
        oversized.message()
    );

    let mut grpc = tonic::client::Grpc::new(pipeline.stage("receiver").channel().await);
    grpc.ready().await.unwrap();
    // Field 1 (customer_id) claims 100 bytes and carries 2.
    let malformed = grpc
        .unary::<Vec<u8>, Vec<u8>, _>(
            Request::new(vec![0x0a, 100, b'h', b'i']),
            "/orderflow.v1.OrderReceiver/PlaceOrder".parse().unwrap(),
            RawCodec,
        )
        .await
        .unwrap_err();
    assert_eq!(malformed.code(), Code::InvalidArgument, "{malformed:?}");
    assert!(
        malformed.message().contains("malformed"),
        "{}",
        malformed.message()
    );
    assert_eq!(
        pipeline.stage("receiver").head().await.unwrap(),
        0,
        "nothing was accepted"
    );

    // README's limit is 1 MiB: just under it the order is decoded (and refused for its long
    // customer id), just over it the message is OUT_OF_RANGE.
    const MIB: usize = 1024 * 1024;
    let under = pipeline
        .receiver()
        .await
        .place_order(order(&"x".repeat(MIB - 64), vec![line("A", 1)], ""))
        .await
        .unwrap_err();
    assert_eq!(under.code(), Code::InvalidArgument, "{under:?}");
    let over = pipeline
        .receiver()
        .await
        .place_order(order(&"x".repeat(MIB + 64), vec![line("A", 1)], ""))
        .await
        .unwrap_err();
    assert_eq!(over.code(), Code::OutOfRange, "{over:?}");

    // Every service of every stage decodes strictly, health and the log included.
    let methods = [
        "/grpc.health.v1.Health/Check",
        "/orderflow.v1.EventLog/Ack",
        "/orderflow.v1.EventLog/Head",
    ];
    for stage in orderflow_e2e::STAGES {
        let mut grpc = tonic::client::Grpc::new(pipeline.stage(stage).channel().await);
        for method in methods {
            grpc.ready().await.unwrap();
            let malformed = grpc
                .unary::<Vec<u8>, Vec<u8>, _>(
                    Request::new(vec![0x0a, 100, b'h', b'i']),
                    method.parse().unwrap(),
                    RawCodec,
                )
                .await
                .unwrap_err();
            assert_eq!(
                malformed.code(),
                Code::InvalidArgument,
                "{stage} {method}: {malformed:?}"
            );
        }
    }
}
