//! The receiver over several partitions, with replicas: the first stage of scale-out. Real
//! binaries on loopback.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use orderflow_e2e::{Stage, free_ports, temp_dir};
use orderflow_proto::v1::{
    GetOrderRequest, HeadRequest, OrderLine, PlaceOrderRequest, SubscribeRequest,
    WatchOrderRequest, order_receiver_client::OrderReceiverClient,
};
use tokio::process::Command;
use tonic::Code;

const PARTITIONS: u32 = 4;

/// Replica `replica` of two receivers over four partitions at `ports`, following no later stage.
async fn receiver(dir: &std::path::Path, ports: [u16; 2], replica: u32) -> Stage {
    let peers = ports
        .map(|port| format!("http://127.0.0.1:{port}"))
        .join(",");
    Stage::start(
        "receiver",
        &format!("127.0.0.1:{}", ports[replica as usize]),
        &dir.join(format!("receiver-{replica}")),
        [
            "--partitions",
            &PARTITIONS.to_string(),
            "--replicas",
            "2",
            "--replica",
            &replica.to_string(),
            "--peers",
            &peers,
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
    )
    .await
    .unwrap()
}

fn order(customer: &str, key: &str) -> PlaceOrderRequest {
    PlaceOrderRequest {
        customer_id: customer.into(),
        lines: vec![OrderLine {
            sku: "LAMP-05".into(),
            quantity: 1,
        }],
        idempotency_key: key.into(),
    }
}

/// The partition an order id names (`<uuid>-p<index>`).
fn partition_of(order_id: &str) -> u32 {
    let (_, index) = order_id.rsplit_once("-p").unwrap();
    index.parse().unwrap()
}

/// Any replica accepts any order, over gRPC and HTTP, and keeps it in its customer's home
/// partition at the replica that owns it (replica p mod 2): once, under an id that names the
/// partition. A customer's idempotency key holds across replicas, and either replica answers
/// `GetOrder` and `WatchOrder` for every order.
#[tokio::test(flavor = "multi_thread")]
async fn any_receiver_replica_keeps_an_order_in_its_home_partition() {
    let dir = temp_dir().unwrap();
    let ports = free_ports::<2>();
    let replicas = [
        receiver(dir.path(), ports, 0).await,
        receiver(dir.path(), ports, 1).await,
    ];
    let mut clients = Vec::new();
    for replica in &replicas {
        clients.push(OrderReceiverClient::new(replica.channel().await));
    }

    // 40 customers, each placing one order at one replica or the other.
    let mut placed: BTreeMap<String, String> = BTreeMap::new();
    for n in 0..40 {
        let customer = format!("customer-{n}");
        let answer = clients[n % 2]
            .place_order(order(&customer, &format!("key-{n}")))
            .await
            .unwrap()
            .into_inner();
        assert!(!answer.replayed);
        placed.insert(answer.order_id, customer);
    }
    // Over HTTP, at each replica.
    let http = reqwest::Client::new();
    for (n, replica) in replicas.iter().enumerate() {
        let customer = format!("web-{n}");
        let created: serde_json::Value = http
            .post(format!("{}/v1/orders", replica.http_url().unwrap()))
            .json(&serde_json::json!({
                "customer_id": customer,
                "lines": [{"sku": "LAMP-05", "quantity": 1}],
            }))
            .send()
            .await
            .unwrap()
            .error_for_status()
            .unwrap()
            .json()
            .await
            .unwrap();
        placed.insert(created["order_id"].as_str().unwrap().to_owned(), customer);
    }

    // Each partition's log, read at the replica that owns it, holds exactly its orders; all of a
    // customer's orders share one partition.
    let mut logged: BTreeMap<String, u32> = BTreeMap::new();
    let mut used = BTreeSet::new();
    for partition in 0..PARTITIONS {
        let owner = &replicas[(partition % 2) as usize];
        let mut log = owner.event_log().await;
        let head = log
            .head(HeadRequest { partition })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (head.partition, head.partitions, head.replicas),
            (partition, PARTITIONS, 2)
        );
        let mut stream = log
            .subscribe(SubscribeRequest {
                partition,
                from_first: true,
                stop_at_head: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        while let Some(batch) = stream.message().await.unwrap() {
            for entry in batch.entries {
                let event = entry.event.unwrap();
                assert_eq!(partition_of(&event.order_id), partition, "{event:?}");
                assert_eq!(placed.get(&event.order_id), Some(&event.customer_id));
                assert!(
                    logged.insert(event.order_id.clone(), partition).is_none(),
                    "{} logged twice",
                    event.order_id
                );
                used.insert(partition);
            }
        }
        // The other replica does not serve it.
        let elsewhere = replicas[((partition + 1) % 2) as usize]
            .event_log()
            .await
            .head(HeadRequest { partition })
            .await
            .unwrap_err();
        assert_eq!(elsewhere.code(), Code::FailedPrecondition);
    }
    assert_eq!(
        logged.keys().collect::<Vec<_>>(),
        placed.keys().collect::<Vec<_>>()
    );
    assert_eq!(
        used.len(),
        PARTITIONS as usize,
        "40 customers in fewer partitions"
    );
    // Each replica reports each of its partitions' outbox on its own series.
    for partition in 0..PARTITIONS {
        let owner = &replicas[(partition % 2) as usize];
        let expected = logged.values().filter(|p| **p == partition).count() as f64;
        let label = partition.to_string();
        let labels = [("stage", "receiver"), ("partition", label.as_str())];
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let metrics = owner.scrape().await.unwrap();
            if metrics.value("orderflow_outbox_next_offset", &labels) == Some(expected) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "partition {partition}: {:?}",
                metrics.value("orderflow_outbox_next_offset", &labels)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    // A retry with the same key at the other replica finds the first order.
    for n in [0usize, 1, 2, 3] {
        let first = placed
            .iter()
            .find(|(_, customer)| **customer == format!("customer-{n}"))
            .map(|(id, _)| id.clone())
            .unwrap();
        let again = clients[(n + 1) % 2]
            .place_order(order(&format!("customer-{n}"), &format!("key-{n}")))
            .await
            .unwrap()
            .into_inner();
        assert_eq!((again.order_id, again.replayed), (first, true));
    }

    // Either replica answers for every order, over gRPC and HTTP.
    for (id, customer) in &placed {
        for (client, replica) in clients.iter_mut().zip(&replicas) {
            let got = client
                .get_order(GetOrderRequest {
                    order_id: id.clone(),
                })
                .await
                .unwrap()
                .into_inner()
                .order
                .unwrap();
            assert_eq!(&got.customer_id, customer);
            let web: serde_json::Value = http
                .get(format!("{}/v1/orders/{id}", replica.http_url().unwrap()))
                .send()
                .await
                .unwrap()
                .error_for_status()
                .unwrap()
                .json()
                .await
                .unwrap();
            assert_eq!(web["order_id"], id.as_str());
        }
    }
    // A watch at the replica that does not own the order streams it from the one that does.
    let (id, _) = placed
        .iter()
        .find(|(id, _)| partition_of(id) % 2 == 1)
        .unwrap();
    let mut watch = clients[0]
        .watch_order(WatchOrderRequest {
            order_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(&first.order_id, id);

    // An id that names no partition of the pipeline names no order.
    let unknown = format!("{}-p{PARTITIONS}", id.rsplit_once("-p").unwrap().0);
    for client in &mut clients {
        let missing = client
            .get_order(GetOrderRequest {
                order_id: unknown.clone(),
            })
            .await
            .unwrap_err();
        assert_eq!(missing.code(), Code::NotFound, "{}", missing.message());
    }
}

/// What cannot run yet, or cannot run as configured, says so and exits 1 before serving: a
/// later stage over several partitions, and receiver replicas without `--peers`.
#[tokio::test]
async fn what_cannot_run_over_partitions_refuses_to_start() {
    let dir = temp_dir().unwrap();
    // What `binary` with `args` says as it exits 1 without serving.
    let refusal = |binary: &'static str, args: &'static [&'static str]| {
        let data = dir.path().join(binary);
        async move {
            let output = Command::new(orderflow_e2e::binary(binary))
                .args(["--listen", "127.0.0.1:0", "--metrics-listen", "none"])
                .arg("--data-dir")
                .arg(&data)
                .args(args)
                .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
                .output()
                .await
                .unwrap();
            let said = String::from_utf8_lossy(&output.stderr).into_owned();
            assert_eq!(output.status.code(), Some(1), "{binary}: {said}");
            said
        }
    };
    let said = refusal(
        "orderflow-stock",
        &[
            "--partitions",
            "4",
            "--upstream",
            "http://127.0.0.1:9",
            "--invoice-url",
            "http://127.0.0.1:9",
        ],
    )
    .await;
    assert!(
        said.contains("the stock stage runs only with 1 partition"),
        "{said}"
    );
    assert!(
        !dir.path()
            .join("orderflow-stock")
            .join("stock-0.redb")
            .exists()
    );
    let said = refusal(
        "orderflow-receiver",
        &[
            "--partitions",
            "4",
            "--replicas",
            "2",
            "--http-listen",
            "none",
        ],
    )
    .await;
    assert!(said.contains("ORDERFLOW_PEERS"), "{said}");
}
