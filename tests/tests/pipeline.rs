//! End to end through the four real binaries: confirmed and rejected orders, exact inventory and
//! invoice arithmetic, precise statuses for bad input, and a clean drain on SIGTERM.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use orderflow_e2e::{Pipeline, PipelineOptions, catalog, line, place_streamed};
use orderflow_proto::v1::{
    AckRequest, GetInvoiceRequest, GetOrderRequest, GetStockRequest, HeadRequest,
    ListNotificationsRequest, Money, NotificationKind, OrderLine, OrderStatus, Owner,
    PlaceOrderRequest, SetStockRequest, SubscribeRequest, event_log_client::EventLogClient,
};
use tonic::Code;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tonic_types::StatusExt;

async fn place(pipeline: &Pipeline, customer: &str, lines: Vec<OrderLine>) -> String {
    let response = pipeline
        .receiver()
        .await
        .place_order(PlaceOrderRequest {
            customer_id: customer.into(),
            lines,
            idempotency_key: String::new(),
        })
        .await
        .expect("order accepted")
        .into_inner();
    assert_eq!(response.status(), OrderStatus::Accepted);
    response.order_id
}

#[tokio::test(flavor = "multi_thread")]
async fn orders_flow_through_all_four_stages_with_exact_arithmetic() {
    let mut pipeline = Pipeline::start(PipelineOptions {
        catalog: catalog(&[("A", 1000, 10), ("B", 2550, 5), ("C", 999, 0)]),
        tax_rate_bps: 2000,
        with_notifier: true,
        ..Default::default()
    })
    .await
    .unwrap();

    let confirmed_1 = place(&pipeline, "alice", vec![line("A", 3), line("B", 2)]).await;
    let sold_out = place(&pipeline, "bob", vec![line("C", 1)]).await;
    let too_many = place(&pipeline, "carol", vec![line("A", 8), line("B", 1)]).await;
    let unknown = place(&pipeline, "dave", vec![line("Z", 1)]).await;
    let confirmed_2 = place(&pipeline, "erin", vec![line("A", 7)]).await;

    let notifications = pipeline
        .wait_for_notifications(5, Duration::from_secs(60))
        .await
        .unwrap();
    let kind_of = |order: &str| {
        let matching: Vec<_> = notifications
            .iter()
            .filter(|n| n.order_id == order)
            .collect();
        assert_eq!(
            matching.len(),
            1,
            "order {order} notified {} times",
            matching.len()
        );
        (
            matching[0].kind(),
            matching[0].invoice_number,
            matching[0].message.clone(),
        )
    };
    assert_eq!(kind_of(&confirmed_1).0, NotificationKind::Confirmed);
    assert_eq!(kind_of(&confirmed_2).0, NotificationKind::Confirmed);
    // Numbers are given at capture, and payments run concurrently: gap-free, in capture order.
    let mut numbers = [kind_of(&confirmed_1).1, kind_of(&confirmed_2).1];
    numbers.sort_unstable();
    assert_eq!(numbers, [1, 2]);
    for (order, needle) in [
        (&sold_out, "C: out of stock"),
        (&too_many, "A: only 7 left (you asked for 8)"),
        (&unknown, "Z: no such item"),
    ] {
        let (kind, number, message) = kind_of(order);
        assert_eq!(kind, NotificationKind::Rejected);
        assert_eq!(number, 0);
        assert!(message.contains(needle), "{message:?} lacks {needle:?}");
    }

    // Invoice arithmetic: 3 × 10.00 + 2 × 25.50 = 81.00, 20 % tax = 16.20, total 97.20.
    let invoice = pipeline
        .invoice()
        .await
        .get_invoice(GetInvoiceRequest {
            order_id: confirmed_1.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(invoice.number, kind_of(&confirmed_1).1);
    assert_eq!(invoice.customer_id, "alice");
    assert_eq!(invoice.subtotal, Some(Money::new(8100, "EUR")));
    assert_eq!(invoice.tax, Some(Money::new(1620, "EUR")));
    assert_eq!(invoice.total, Some(Money::new(9720, "EUR")));
    assert_eq!(invoice.tax_rate_bps, 2000);
    let line_totals: Vec<_> = invoice
        .lines
        .iter()
        .map(|l| (l.sku.as_str(), l.line_total.as_ref().unwrap().amount_minor))
        .collect();
    assert_eq!(line_totals, vec![("A", 3000), ("B", 5100)]);
    let invoices = pipeline.invoices().await.unwrap();
    let numbers: Vec<_> = invoices.iter().map(|i| i.number).collect();
    assert_eq!(numbers, vec![1, 2]);
    let second = invoices.iter().find(|i| i.order_id == confirmed_2).unwrap();
    assert_eq!(second.total, Some(Money::new(8400, "EUR")));

    // Inventory: A 10 − 3 − 7 = 0, B 5 − 2 = 3; rejected orders reserved nothing.
    let stock = pipeline.stock_levels().await.unwrap();
    let level = |sku: &str| (stock[sku].available, stock[sku].reserved);
    assert_eq!(level("A"), (0, 10));
    assert_eq!(level("B"), (3, 2));
    assert_eq!(level("C"), (0, 0));

    // What the receiver stored, and the filter by order.
    let order = pipeline
        .receiver()
        .await
        .get_order(GetOrderRequest {
            order_id: confirmed_1.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .order
        .unwrap();
    assert_eq!(order.customer_id, "alice");
    assert_eq!(order.lines, vec![line("A", 3), line("B", 2)]);
    let filtered = pipeline
        .notifier()
        .await
        .list_notifications(ListNotificationsRequest {
            order_id: unknown.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .notifications;
    assert_eq!(filtered.len(), 1);
    assert_eq!(filtered[0].order_id, unknown);

    // Restocking through the admin RPC makes the next order succeed.
    let item = pipeline
        .stock()
        .await
        .set_stock(SetStockRequest {
            sku: "C".into(),
            available: Some(4),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((item.available, item.name.as_str()), (4, "Item C"));
    let restocked = place(&pipeline, "bob", vec![line("C", 4)]).await;
    let notifications = pipeline
        .wait_for_notifications(6, Duration::from_secs(60))
        .await
        .unwrap();
    assert!(notifications.iter().any(|n| n.order_id == restocked
        && n.kind() == NotificationKind::Confirmed
        && n.invoice_number == 3));

    // Draining is visible on health: a watcher sees NOT_SERVING once SIGTERM arrives.
    let mut health = HealthClient::new(pipeline.stage("receiver").channel().await);
    let mut watch = health
        .watch(HealthCheckRequest {
            service: "orderflow.v1.OrderReceiver".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.status(), ServingStatus::Serving);
    let receiver_pid = pipeline.stage("receiver").pid().unwrap();
    nix::sys::signal::kill(receiver_pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let draining = watch.message().await.unwrap().unwrap();
    assert_eq!(draining.status(), ServingStatus::NotServing);
    drop(watch);

    // SIGTERM drains every stage and exits 0.
    for name in ["notifier", "invoice", "stock", "receiver"] {
        assert!(
            pipeline.stage_mut(name).terminate().await.unwrap(),
            "{name} did not exit cleanly on SIGTERM"
        );
    }
}

/// One bad `PlaceOrder` request and the fields its rejection must name.
struct BadOrder {
    what: &'static str,
    request: PlaceOrderRequest,
    fields: &'static [&'static str],
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_get_precise_statuses_and_change_nothing() {
    let pipeline = Pipeline::start(PipelineOptions {
        catalog: catalog(&[("A", 1000, 10)]),
        tax_rate_bps: 0,
        with_notifier: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let ok = || PlaceOrderRequest {
        customer_id: "alice".into(),
        lines: vec![line("A", 1)],
        idempotency_key: String::new(),
    };
    let cases = vec![
        BadOrder {
            what: "missing customer",
            request: PlaceOrderRequest {
                customer_id: String::new(),
                ..ok()
            },
            fields: &["customer_id"],
        },
        BadOrder {
            what: "customer id too long",
            request: PlaceOrderRequest {
                customer_id: "x".repeat(129),
                ..ok()
            },
            fields: &["customer_id"],
        },
        BadOrder {
            what: "a newline in the customer id (would forge a log line)",
            request: PlaceOrderRequest {
                customer_id: "alice\nINFO orderflow::notification: customer notified".into(),
                ..ok()
            },
            fields: &["customer_id"],
        },
        BadOrder {
            what: "NUL and an escape sequence in skus",
            request: PlaceOrderRequest {
                lines: vec![line("A\u{0}", 1), line("\u{1b}[2J", 1)],
                ..ok()
            },
            fields: &["lines[0].sku", "lines[1].sku"],
        },
        BadOrder {
            what: "no lines",
            request: PlaceOrderRequest {
                lines: vec![],
                ..ok()
            },
            fields: &["lines"],
        },
        BadOrder {
            what: "101 lines",
            request: PlaceOrderRequest {
                lines: (0..101).map(|i| line(&format!("S{i}"), 1)).collect(),
                ..ok()
            },
            fields: &["lines"],
        },
        BadOrder {
            what: "zero quantity",
            request: PlaceOrderRequest {
                lines: vec![line("A", 0)],
                ..ok()
            },
            fields: &["lines[0].quantity"],
        },
        BadOrder {
            what: "quantity over 10000",
            request: PlaceOrderRequest {
                lines: vec![line("A", 10_001)],
                ..ok()
            },
            fields: &["lines[0].quantity"],
        },
        BadOrder {
            what: "empty sku",
            request: PlaceOrderRequest {
                lines: vec![line("A", 1), line("", 1)],
                ..ok()
            },
            fields: &["lines[1].sku"],
        },
        BadOrder {
            what: "sku over 64 characters",
            request: PlaceOrderRequest {
                lines: vec![line(&"s".repeat(65), 1)],
                ..ok()
            },
            fields: &["lines[0].sku"],
        },
        BadOrder {
            what: "repeated sku",
            request: PlaceOrderRequest {
                lines: vec![line("A", 1), line("A", 2)],
                ..ok()
            },
            fields: &["lines[1].sku"],
        },
        BadOrder {
            what: "everything wrong at once",
            request: PlaceOrderRequest {
                customer_id: String::new(),
                lines: vec![line("", 0)],
                idempotency_key: String::new(),
            },
            fields: &["customer_id", "lines[0].sku", "lines[0].quantity"],
        },
    ];
    let mut receiver = pipeline.receiver().await;
    for case in cases {
        let status = receiver
            .place_order(case.request)
            .await
            .expect_err(case.what);
        assert_eq!(status.code(), Code::InvalidArgument, "{}", case.what);
        assert_eq!(violated_fields(&status), case.fields, "{}", case.what);
    }
    // Nothing was appended by any of them.
    assert_eq!(pipeline.stage("receiver").head().await.unwrap(), 0);

    // Lookups of things that do not exist.
    let not_found = receiver
        .get_order(GetOrderRequest {
            order_id: "no-such-order".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(not_found.code(), Code::NotFound);
    let not_found = pipeline
        .stock()
        .await
        .get_stock(GetStockRequest { sku: "Q".into() })
        .await
        .unwrap_err();
    assert_eq!(not_found.code(), Code::NotFound);
    let not_found = pipeline
        .invoice()
        .await
        .get_invoice(GetInvoiceRequest {
            order_id: "no-such-order".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(not_found.code(), Code::NotFound);

    // Ids with control characters are the caller's mistake, named, on every stage.
    let forged = "o1\nINFO forged";
    let bad_ids = [
        receiver
            .get_order(GetOrderRequest {
                order_id: forged.into(),
            })
            .await
            .map(|_| ())
            .unwrap_err(),
        pipeline
            .stock()
            .await
            .get_stock(GetStockRequest { sku: forged.into() })
            .await
            .map(|_| ())
            .unwrap_err(),
        pipeline
            .invoice()
            .await
            .get_invoice(GetInvoiceRequest {
                order_id: forged.into(),
            })
            .await
            .map(|_| ())
            .unwrap_err(),
    ];
    for status in bad_ids {
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        let fields = status.get_details_bad_request().unwrap().field_violations;
        assert!(
            fields[0].description.contains("control characters"),
            "{fields:?}"
        );
    }

    // Admin input is checked as strictly, and a bad call changes nothing.
    let bad_stock = pipeline
        .stock()
        .await
        .set_stock(SetStockRequest {
            sku: "NEW".into(),
            name: String::new(),
            unit_price: Some(Money::new(-5, "euro")),
            available: Some(1),
        })
        .await
        .unwrap_err();
    assert_eq!(bad_stock.code(), Code::InvalidArgument);
    assert_eq!(
        violated_fields(&bad_stock),
        vec!["unit_price.amount_minor", "unit_price.currency"]
    );
    let missing_name = pipeline
        .stock()
        .await
        .set_stock(SetStockRequest {
            sku: "NEW".into(),
            name: String::new(),
            unit_price: Some(Money::new(5, "EUR")),
            available: Some(1),
        })
        .await
        .unwrap_err();
    assert_eq!(missing_name.code(), Code::InvalidArgument);
    assert!(!pipeline.stock_levels().await.unwrap().contains_key("NEW"));

    // A subscription beyond the head is OUT_OF_RANGE, not silence.
    let mut log = EventLogClient::new(pipeline.stage("receiver").channel().await);
    let out_of_range = log
        .subscribe(SubscribeRequest {
            from_offset: 1_000,
            max_batch: 0,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(out_of_range.code(), Code::OutOfRange);

    // A partition the pipeline does not have: INVALID_ARGUMENT naming `partition`, on every call
    // of every stage's log.
    let bounds = log.head(HeadRequest::default()).await.unwrap().into_inner();
    assert_eq!((bounds.partition, bounds.partitions), (0, 1));
    for stage in ["receiver", "stock", "invoice", "notifier"] {
        let mut log = EventLogClient::new(pipeline.stage(stage).channel().await);
        let refusals = [
            log.head(HeadRequest { partition: 1 })
                .await
                .map(|_| ())
                .unwrap_err(),
            log.subscribe(SubscribeRequest {
                partition: 7,
                ..Default::default()
            })
            .await
            .map(|_| ())
            .unwrap_err(),
            log.ack(AckRequest {
                consumer: "stock".into(),
                offset: 0,
                partition: 1,
                incarnation: 0,
            })
            .await
            .map(|_| ())
            .unwrap_err(),
        ];
        for status in refusals {
            assert_eq!(status.code(), Code::InvalidArgument, "{stage}: {status:?}");
            let fields = status.get_details_bad_request().unwrap().field_violations;
            assert_eq!(fields[0].field, "partition", "{stage}: {fields:?}");
            assert!(
                fields[0].description.contains("has 1 partition"),
                "{stage}: {fields:?}"
            );
        }
    }

    // The lists and the replay of a stage over partitions take only what that stage has: with one
    // partition, a page token is a plain id, and a dead letter's partition is 0.
    {
        use orderflow_proto::v1::{
            ListInvoicesRequest, ListNotificationsRequest, ReplayDeadLettersRequest,
            invoice_creator_client::InvoiceCreatorClient, notifier_client::NotifierClient,
            replay_dead_letters_request::Target,
        };
        let mut invoice = InvoiceCreatorClient::new(pipeline.stage("invoice").channel().await);
        let mut notifier = NotifierClient::new(pipeline.stage("notifier").channel().await);
        let refusals = [
            invoice
                .list_invoices(ListInvoicesRequest {
                    page_size: 10,
                    page_token: "1.5".into(),
                })
                .await
                .map(|_| ())
                .unwrap_err(),
            notifier
                .list_notifications(ListNotificationsRequest {
                    page_size: 10,
                    page_token: "x".into(),
                    order_id: String::new(),
                })
                .await
                .map(|_| ())
                .unwrap_err(),
            notifier
                .replay_dead_letters(ReplayDeadLettersRequest {
                    target: Some(Target::Id(1)),
                    partition: 1,
                })
                .await
                .map(|_| ())
                .unwrap_err(),
        ];
        let fields: Vec<Vec<String>> = refusals
            .iter()
            .map(|status| {
                assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
                violated_fields(status)
            })
            .collect();
        assert_eq!(fields, [["page_token"], ["page_token"], ["partition"]]);
    }

    // An owner must name its consumer and a real incarnation: INVALID_ARGUMENT naming both, and
    // nothing claimed (stock, which holds the log as "stock", keeps reading it).
    let bad_owner = log
        .subscribe(SubscribeRequest {
            owner: Some(Owner {
                incarnation: 0,
                consumed_offset: 0,
                log_id: 0,
            }),
            ..Default::default()
        })
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(bad_owner.code(), Code::InvalidArgument, "{bad_owner:?}");
    assert_eq!(violated_fields(&bad_owner), ["owner", "owner.incarnation"]);
    let before = pipeline.stock_levels().await.unwrap()["A"].available;
    let placed = place(&pipeline, "carol", vec![line("A", 1)]).await;
    pipeline
        .wait_for_terminal(&[placed], Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(
        pipeline.stock_levels().await.unwrap()["A"].available,
        before - 1
    );
}

/// A client that keeps a stream open (here a health watch) must not keep a stage from exiting:
/// the drain is bounded by `--shutdown-grace`.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_with_an_open_stream_still_exits() {
    let dir = tempfile::tempdir().unwrap();
    let mut receiver = orderflow_e2e::Stage::start(
        "receiver",
        "127.0.0.1:0",
        dir.path(),
        vec!["--shutdown-grace".into(), "1s".into()],
    )
    .await
    .unwrap();
    let mut watch = HealthClient::new(receiver.channel().await)
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        watch.message().await.unwrap().unwrap().status(),
        ServingStatus::Serving
    );
    let exited = tokio::spawn(async move { receiver.terminate().await });
    assert_eq!(
        watch.message().await.unwrap().unwrap().status(),
        ServingStatus::NotServing
    );
    // The watch stays open on purpose; the stage must still exit, and cleanly.
    assert!(exited.await.unwrap().unwrap(), "receiver did not exit 0");
    drop(watch);
}

#[tokio::test(flavor = "multi_thread")]
async fn place_orders_answers_every_order_of_a_stream_in_turn() {
    use orderflow_proto::v1::place_orders_response::Result as Answer;

    let pipeline = Pipeline::start(PipelineOptions {
        catalog: catalog(&[("A", 1000, 10_000)]),
        with_notifier: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let request = |customer: &str, key: &str, quantity| PlaceOrderRequest {
        customer_id: customer.into(),
        lines: vec![line("A", quantity)],
        idempotency_key: key.into(),
    };
    let mut requests: Vec<_> = (0..300)
        .map(|i| request(&format!("bulk-{i}"), "", 1))
        .collect();
    requests[5].customer_id = String::new();
    requests[10] = request("kim", "k-1", 2);
    // The same key and request: the same order. The same key, another request: refused.
    requests[11] = request("kim", "k-1", 2);
    requests[12] = request("kim", "k-1", 3);
    let answers = place_streamed(pipeline.receiver().await, requests)
        .await
        .unwrap();
    assert_eq!(answers.len(), 300);
    let mut placed = std::collections::HashSet::new();
    for (i, answer) in answers.iter().enumerate() {
        assert_eq!(answer.index, i as u64, "answers out of order");
        match (i, answer.result.as_ref().unwrap()) {
            (5, Answer::Refused(refused)) => {
                assert_eq!(refused.code, Code::InvalidArgument as i32);
                assert_eq!(refused.code_name, "INVALID_ARGUMENT");
                assert_eq!(refused.field_violations[0].field, "customer_id");
            }
            (12, Answer::Refused(refused)) => {
                assert_eq!(refused.code_name, "ALREADY_EXISTS", "{refused:?}");
            }
            (11, Answer::Accepted(again)) => {
                assert!(again.replayed);
                assert!(
                    placed.contains(&again.order_id),
                    "a replay made a new order"
                );
            }
            (_, Answer::Accepted(accepted)) => {
                assert!(!accepted.replayed);
                assert_eq!(accepted.status(), OrderStatus::Accepted);
                assert!(placed.insert(accepted.order_id.clone()));
            }
            (i, other) => panic!("order {i}: {other:?}"),
        }
    }
    // Every order placed went all the way, once: 297 orders, 298 units.
    assert_eq!(placed.len(), 297);
    let notifications = pipeline
        .wait_for_notifications(297, Duration::from_secs(60))
        .await
        .unwrap();
    let notified: std::collections::HashSet<_> =
        notifications.iter().map(|n| n.order_id.clone()).collect();
    assert_eq!(notified, placed);
    assert!(
        notifications
            .iter()
            .all(|n| n.kind() == NotificationKind::Confirmed)
    );
    assert_eq!(
        pipeline.stock_levels().await.unwrap()["A"].available,
        10_000 - 298
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_ends_a_place_orders_stream_after_answering_what_it_read() {
    let dir = tempfile::tempdir().unwrap();
    let mut receiver = orderflow_e2e::Stage::start(
        "receiver",
        "127.0.0.1:0",
        dir.path(),
        vec!["--shutdown-grace".into(), "5s".into()],
    )
    .await
    .unwrap();
    let (requests, rx) = tokio::sync::mpsc::channel(8);
    let mut answers = orderflow_proto::v1::order_receiver_client::OrderReceiverClient::new(
        receiver.channel().await,
    )
    .place_orders(tokio_stream::wrappers::ReceiverStream::new(rx))
    .await
    .unwrap()
    .into_inner();
    requests
        .send(PlaceOrderRequest {
            customer_id: "early".into(),
            lines: vec![line("A", 1)],
            idempotency_key: String::new(),
        })
        .await
        .unwrap();
    let first = answers.message().await.unwrap().unwrap();
    assert!(matches!(
        first.result,
        Some(orderflow_proto::v1::place_orders_response::Result::Accepted(_))
    ));
    // The client keeps its side open; the stage must still end the stream and exit cleanly.
    let exited = tokio::spawn(async move { receiver.terminate().await });
    let ending = answers.message().await.unwrap_err();
    assert_eq!(ending.code(), Code::Unavailable, "{ending:?}");
    assert!(
        ending.message().contains("send the rest again"),
        "{ending:?}"
    );
    assert_eq!(
        ending.get_details_error_info().map(|info| info.reason),
        Some("NOT_STORED".to_owned()),
        "{ending:?}"
    );
    assert!(ending.get_details_retry_info().is_some(), "{ending:?}");
    assert!(exited.await.unwrap().unwrap(), "receiver did not exit 0");
    drop(requests);
}

/// The fields an `INVALID_ARGUMENT` names in its `BadRequest` details, in order.
fn violated_fields(status: &tonic::Status) -> Vec<String> {
    status
        .get_details_bad_request()
        .unwrap_or_else(|| panic!("no BadRequest details: {status:?}"))
        .field_violations
        .into_iter()
        .map(|v| v.field)
        .collect()
}
