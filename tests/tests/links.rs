//! Stage links: no caller can make a stage delete entries its consumers have not received.
//!
//! The reproduction of the data loss the issue reported: stop the stock stage, place 30 orders, and
//! acknowledge the receiver's whole log as "stock" (and under made-up names) without credentials.
//! Every forged acknowledgement is refused, nothing is deleted, and once stock is back every order
//! reaches its end exactly once. The same with a link token and with mutual TLS, where calls
//! without the credential do not get that far.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use orderflow_e2e::{Bearer, Pipeline, PipelineOptions, TlsFiles, catalog, line, place_all};
use orderflow_proto::v1::{
    AckRequest, HeadRequest, HeadResponse, OrderStatus, SubscribeRequest,
    event_log_client::EventLogClient,
};
use tonic::{Code, service::interceptor::InterceptedService, transport::Channel};

const LINK_TOKEN: &str = "link-secret-token";
const ADMIN_TOKEN: &str = "admin-secret-token";

type Client = EventLogClient<InterceptedService<Channel, Bearer>>;

/// Someone on the network calling the receiver's `EventLog` with `token` (or none).
async fn outsider(pipeline: &Pipeline, channel: Option<Channel>, token: Option<&str>) -> Client {
    let channel = match channel {
        Some(channel) => channel,
        None => pipeline.stage("receiver").channel().await,
    };
    EventLogClient::with_interceptor(channel, Bearer::new(token))
}

async fn head(pipeline: &Pipeline) -> HeadResponse {
    pipeline
        .stage("receiver")
        .event_log()
        .await
        .head(HeadRequest::default())
        .await
        .unwrap()
        .into_inner()
}

fn ack(consumer: &str, offset: u64) -> AckRequest {
    AckRequest {
        consumer: consumer.into(),
        offset,
        partition: 0,
        incarnation: 0,
    }
}

/// Places `count` orders of one unit of A each; returns their ids.
async fn place(pipeline: &Pipeline, customer: &str, count: usize) -> Vec<String> {
    place_all(
        pipeline.receiver().await,
        customer,
        (0..count).map(|_| vec![line("A", 1)]).collect(),
        8,
    )
    .await
    .into_iter()
    .map(|p| p.result.expect("accepted"))
    .collect()
}

/// What the outsider's forged calls must get, when the link needs a credential it lacks.
enum Guard {
    /// No credential configured: calls reach the log, which refuses what it must.
    Open,
    /// A credential is configured: every `EventLog` call without it is UNAUTHENTICATED.
    Closed,
}

/// The reproduction: stock stopped, 30 orders placed, the whole log acknowledged by an outsider;
/// then stock comes back and every order ends exactly once.
/// `insiders` carry the credential: their acknowledgement beyond what stock received is refused all
/// the same.
async fn forged_acks_lose_nothing(
    mut pipeline: Pipeline,
    outsiders: Vec<Client>,
    insiders: Vec<Client>,
    guard: Guard,
) {
    let before = place(&pipeline, "early", 5).await;
    pipeline
        .wait_for_terminal(&before, Duration::from_secs(60))
        .await
        .unwrap();
    pipeline.stage_mut("stock").kill9().await;
    let waiting = place(&pipeline, "waiting", 30).await;
    let log_head = head(&pipeline).await;
    assert_eq!(log_head.next_offset, 35);

    for mut insider in insiders {
        let refused = insider
            .ack(ack("stock", log_head.next_offset))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    }
    for mut outsider in outsiders {
        let attempts = [
            outsider
                .ack(ack("stock", log_head.next_offset))
                .await
                .map(|_| ()),
            outsider.ack(ack("intruder", 0)).await.map(|_| ()),
            outsider.ack(ack("\u{0}", 35)).await.map(|_| ()),
            outsider
                .subscribe(SubscribeRequest {
                    from_offset: 0,
                    consumer: "intruder".into(),
                    ..Default::default()
                })
                .await
                .map(|_| ()),
        ];
        let codes: Vec<Code> = attempts
            .iter()
            .map(|a| a.as_ref().unwrap_err().code())
            .collect();
        match guard {
            Guard::Open => assert_eq!(
                codes,
                vec![
                    Code::FailedPrecondition,
                    Code::FailedPrecondition,
                    Code::InvalidArgument,
                    Code::FailedPrecondition
                ],
                "{attempts:?}"
            ),
            Guard::Closed => {
                assert!(
                    codes.iter().all(|c| *c == Code::Unauthenticated),
                    "{attempts:?}"
                );
                let head = outsider.head(HeadRequest::default()).await.unwrap_err();
                assert_eq!(head.code(), Code::Unauthenticated);
            }
        }
    }

    // Retention runs every second: give it a few turns. Nothing stock has not received may go, and
    // no made-up name holds the log.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let after = head(&pipeline).await;
    let consumers: Vec<&str> = after
        .consumers
        .iter()
        .map(|c| c.consumer.as_str())
        .collect();
    assert_eq!(consumers, vec!["stock"], "{after:?}");
    let stock_acked = after.consumers[0].acked_offset;
    assert!(stock_acked <= 5, "{after:?}");
    assert!(after.first_offset <= stock_acked, "{after:?}");

    pipeline.stage_mut("stock").restart().await.unwrap();
    let done = pipeline
        .wait_for_terminal(&waiting, Duration::from_secs(90))
        .await
        .unwrap();
    assert!(
        done.iter().all(|o| o.status() == OrderStatus::Notified),
        "{done:?}"
    );
    let notifications = pipeline
        .wait_for_notifications(35, Duration::from_secs(60))
        .await
        .unwrap();
    let mut notified: Vec<&str> = notifications.iter().map(|n| n.order_id.as_str()).collect();
    notified.sort_unstable();
    notified.dedup();
    assert_eq!(notified.len(), 35, "each order notified once");
    assert_eq!(notifications.len(), 35, "each order notified once");

    // Once stock has caught up and acknowledged, the log is trimmed as usual.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let now = head(&pipeline).await;
        if now.first_offset == now.next_offset {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never trimmed: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn forged_acks_lose_nothing_without_credentials() {
    let pipeline = Pipeline::start(PipelineOptions {
        catalog: catalog(&[("A", 100, 1000)]),
        with_notifier: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let outsiders = vec![outsider(&pipeline, None, None).await];
    forged_acks_lose_nothing(pipeline, outsiders, Vec::new(), Guard::Open).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_link_token_keeps_outsiders_off_the_links() {
    let pipeline = Pipeline::start(PipelineOptions {
        catalog: catalog(&[("A", 100, 1000)]),
        with_notifier: true,
        env: vec![
            ("ORDERFLOW_LINK_TOKEN".into(), LINK_TOKEN.into()),
            ("ORDERFLOW_ADMIN_TOKEN".into(), ADMIN_TOKEN.into()),
        ],
        ..Default::default()
    })
    .await
    .unwrap();
    // The stages pass the token on their own links (the orders flow); a caller without it, with a
    // wrong one or with the admin token gets nowhere.
    let outsiders = vec![
        outsider(&pipeline, None, None).await,
        outsider(&pipeline, None, Some("not-the-link-token")).await,
        outsider(&pipeline, None, Some(ADMIN_TOKEN)).await,
    ];
    // Even with the token, an acknowledgement beyond what stock was sent is refused.
    let insiders = vec![outsider(&pipeline, None, Some(LINK_TOKEN)).await];
    forged_acks_lose_nothing(pipeline, outsiders, insiders, Guard::Closed).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn mutual_tls_keeps_outsiders_off_the_links() {
    let certs = tempfile::tempdir().unwrap();
    let tls = TlsFiles::generate(certs.path()).unwrap();
    let client_ca = vec!["--tls-client-ca".into(), tls.ca.display().to_string()];
    let pipeline = Pipeline::start(PipelineOptions {
        catalog: catalog(&[("A", 100, 1000)]),
        with_notifier: true,
        tls: Some(tls.clone()),
        receiver_args: client_ca.clone(),
        stock_args: client_ca.clone(),
        invoice_args: client_ca.clone(),
        notifier_args: client_ca,
        ..Default::default()
    })
    .await
    .unwrap();
    // A TLS client without a certificate: the order RPCs are open to it, the links are not.
    let addr = pipeline.stage("receiver").addr;
    let anonymous = Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(
                    std::fs::read(&tls.ca).unwrap(),
                ))
                .domain_name("localhost"),
        )
        .unwrap()
        .connect_lazy();
    let order = pipeline
        .receiver()
        .await
        .get_order(orderflow_proto::v1::GetOrderRequest {
            order_id: "no-such-order".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(order.code(), Code::NotFound);
    let open =
        orderflow_proto::v1::order_receiver_client::OrderReceiverClient::new(anonymous.clone())
            .get_order(orderflow_proto::v1::GetOrderRequest {
                order_id: "no-such-order".into(),
            })
            .await
            .unwrap_err();
    assert_eq!(open.code(), Code::NotFound, "{open:?}");
    let outsiders = vec![outsider(&pipeline, Some(anonymous), Some(LINK_TOKEN)).await];
    let insiders = vec![pipeline.stage("receiver").event_log().await];
    forged_acks_lose_nothing(pipeline, outsiders, insiders, Guard::Closed).await;
}
