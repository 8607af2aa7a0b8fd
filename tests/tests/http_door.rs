//! The HTTP door faces the internet: clients that open connections and never finish a request
//! must not take the receiver down. With the process limited to 1,024 open files, ~1,100
//! half-open HTTP requests leave gRPC `PlaceOrder` answering, and once they give up, the door serves
//! again.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use orderflow_e2e::{Stage, line, temp_dir};
use orderflow_proto::v1::{PlaceOrderRequest, order_receiver_client::OrderReceiverClient};
use tokio::{io::AsyncWriteExt, net::TcpStream};

const HALF_OPEN: usize = 1_100;
const OPEN_FILES: u64 = 1_024;

/// Lets this test process hold the half-open connections (its own limit, not the receiver's).
fn raise_own_open_files_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    }
    hard
}

/// A connection that sends the start of a request and then nothing.
async fn half_open(addr: std::net::SocketAddr) -> Option<TcpStream> {
    let mut stream = tokio::time::timeout(Duration::from_secs(3), TcpStream::connect(addr))
        .await
        .ok()?
        .ok()?;
    stream
        .write_all(
            b"POST /v1/orders HTTP/1.1\r\nHost: orderflow\r\nContent-Type: application/json\r\n",
        )
        .await
        .ok()?;
    Some(stream)
}

#[tokio::test(flavor = "multi_thread")]
async fn half_open_http_requests_leave_grpc_answering() {
    let own_limit = raise_own_open_files_limit();
    assert!(
        own_limit > (HALF_OPEN as u64) + 200,
        "this test needs more than {HALF_OPEN} open files of its own; the hard limit is {own_limit}"
    );
    let dir = temp_dir().unwrap();
    let receiver = Stage::start_with_open_files_limit(
        "receiver",
        "127.0.0.1:0",
        dir.path(),
        [
            "--http-listen",
            "127.0.0.1:0",
            "--stock-url",
            "none",
            "--invoice-url",
            "none",
            "--notifier-url",
            "none",
        ]
        .map(String::from)
        .to_vec(),
        OPEN_FILES,
    )
    .await
    .unwrap();
    let door: std::net::SocketAddr = receiver
        .http_url()
        .unwrap()
        .trim_start_matches("http://")
        .parse()
        .unwrap();

    let attempts = futures::future::join_all((0..HALF_OPEN).map(|_| half_open(door))).await;
    let held: Vec<TcpStream> = attempts.into_iter().flatten().collect();
    assert!(
        held.len() > OPEN_FILES as usize / 2,
        "only {} connections were opened",
        held.len()
    );

    // gRPC keeps answering while the door is full of clients that never finish.
    let mut grpc = OrderReceiverClient::new(receiver.channel().await);
    for i in 0..20 {
        let mut request = tonic::Request::new(PlaceOrderRequest {
            customer_id: format!("grpc-{i}"),
            lines: vec![line("A", 1)],
            idempotency_key: String::new(),
        });
        request.set_timeout(Duration::from_secs(5));
        let placed = grpc.place_order(request).await;
        assert!(
            placed.is_ok(),
            "PlaceOrder {i} while the door is held: {placed:?}"
        );
    }

    // The clients give up; the door serves again.
    drop(held);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let created = client
            .post(format!("http://{door}/v1/orders"))
            .json(
                &serde_json::json!({"customer_id": "web", "lines": [{"sku": "A", "quantity": 1}]}),
            )
            .send()
            .await;
        match created {
            Ok(response) if response.status() == 201 => break,
            other => assert!(
                tokio::time::Instant::now() < deadline,
                "the door never recovered: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
