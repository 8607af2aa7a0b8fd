//! Stages over several partitions, with replicas: the receiver alone, the stock stage's shards,
//! and the whole pipeline. Real binaries on loopback.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use orderflow_e2e::{Stage, free_ports, temp_dir};
use orderflow_proto::v1::{
    Event, GetOrderRequest, GetStockRequest, HeadRequest, ListStockRequest, OrderLine,
    PlaceOrderRequest, SetStockRequest, SubscribeRequest, WatchOrderRequest, event::Kind,
    order_receiver_client::OrderReceiverClient, stock_checker_client::StockCheckerClient,
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
    orderflow_e2e::partition_of(order_id).unwrap()
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
        for event in log_of(owner, partition).await {
            assert_eq!(partition_of(&event.order_id), partition, "{event:?}");
            assert_eq!(placed.get(&event.order_id), Some(&event.customer_id));
            assert!(
                logged.insert(event.order_id.clone(), partition).is_none(),
                "{} logged twice",
                event.order_id
            );
            used.insert(partition);
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

/// Orders placed at one receiver replica while the other, which owns half of them, is killed -9
/// and started again: every order forwarded over the stream to the owner ends placed exactly
/// once. An order answered `NOT_STORED` was not placed (its retry with the same key creates it);
/// one answered `MAYBE_STORED` may have been (its retry answers what was placed); no other
/// refusal comes.
#[tokio::test(flavor = "multi_thread")]
async fn orders_forwarded_while_their_owner_is_killed_are_each_placed_once() {
    use futures::StreamExt;
    use std::sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    };
    use tonic_types::StatusExt;

    const ORDERS: usize = 400;
    let dir = temp_dir().unwrap();
    let ports = free_ports::<2>();
    let mut replicas = [
        receiver(dir.path(), ports, 0).await,
        receiver(dir.path(), ports, 1).await,
    ];
    let door = OrderReceiverClient::new(replicas[0].channel().await);
    let key = |n: usize| (format!("customer-{}", n % 90), format!("key-{n}"));
    let answered = Arc::new(AtomicUsize::new(0));
    let placing = {
        let (door, answered) = (door.clone(), answered.clone());
        tokio::spawn(async move {
            futures::stream::iter(0..ORDERS)
                .map(|n| {
                    let (mut door, answered) = (door.clone(), answered.clone());
                    let (customer, key) = key(n);
                    async move {
                        let answer = door.place_order(order(&customer, &key)).await;
                        answered.fetch_add(1, Ordering::Relaxed);
                        (n, answer.map(tonic::Response::into_inner))
                    }
                })
                .buffer_unordered(32)
                .collect::<Vec<_>>()
                .await
        })
    };
    while answered.load(Ordering::Relaxed) < ORDERS / 3 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    replicas[1].kill9().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    replicas[1].restart().await.unwrap();
    let answers = placing.await.unwrap();

    // What each order became: placed, or refused saying whether it may have been.
    let mut placed: BTreeMap<String, usize> = BTreeMap::new();
    let (mut not_stored, mut maybe_stored) = (Vec::new(), Vec::new());
    for (n, answer) in answers {
        match answer {
            Ok(accepted) => {
                assert!(!accepted.replayed);
                assert!(placed.insert(accepted.order_id, n).is_none());
            }
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                match status
                    .get_details_error_info()
                    .map(|info| info.reason)
                    .as_deref()
                {
                    Some("NOT_STORED") => not_stored.push(n),
                    Some("MAYBE_STORED") => maybe_stored.push(n),
                    _ => panic!("an answer that says nothing of the order: {status:?}"),
                }
            }
        }
    }
    eprintln!(
        "{} placed, {} NOT_STORED, {} MAYBE_STORED while the owner died",
        placed.len(),
        not_stored.len(),
        maybe_stored.len()
    );
    // Each refused order again, with its key, until the owner answers.
    for (n, was_maybe) in not_stored
        .iter()
        .map(|n| (*n, false))
        .chain(maybe_stored.iter().map(|n| (*n, true)))
    {
        let (customer, key) = key(n);
        let mut door = door.clone();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let accepted = loop {
            match door.place_order(order(&customer, &key)).await {
                Ok(accepted) => break accepted.into_inner(),
                Err(status)
                    if status.code() == Code::Unavailable
                        && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(status) => panic!("{status:?}"),
            }
        };
        assert!(
            was_maybe || !accepted.replayed,
            "order {n} was said NOT_STORED, yet its retry found it placed"
        );
        assert!(placed.insert(accepted.order_id, n).is_none());
    }
    assert_eq!(placed.len(), ORDERS);

    // The logs hold each order once, and nothing else.
    let mut logged = BTreeSet::new();
    for partition in 0..PARTITIONS {
        for event in log_of(&replicas[(partition % 2) as usize], partition).await {
            assert!(placed.contains_key(&event.order_id), "{event:?}");
            assert!(logged.insert(event.order_id), "an order logged twice");
        }
    }
    assert_eq!(logged.len(), ORDERS);
}

/// Replicas of the receiver, invoice or notifier without `--peers` say so and exit 1 before
/// serving, with no data dir made.
#[tokio::test]
async fn replicas_without_their_peers_refuse_to_start() {
    let dir = temp_dir().unwrap();
    // What `binary` with `args` says as it exits 1 without serving.
    let refusal = |binary: &'static str, args: Vec<String>| {
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
    // Every stage with replicas needs to know them: it forwards and gathers through them.
    for (binary, own) in [
        ("orderflow-receiver", ["--http-listen", "none"]),
        ("orderflow-invoice", ["--upstream", "http://127.0.0.1:9"]),
        ("orderflow-notifier", ["--upstream", "http://127.0.0.1:9"]),
    ] {
        let args = ["--partitions", "4", "--replicas", "2"]
            .into_iter()
            .chain(own)
            .map(String::from)
            .collect();
        let said = refusal(binary, args).await;
        assert!(said.contains("ORDERFLOW_PEERS"), "{binary}: {said}");
        assert!(
            !dir.path().join(binary).exists(),
            "{binary} made its data dir"
        );
    }
}

/// Every sku of the stock test's catalog, with what it starts with: twelve plain ones and a hot
/// one with little stock.
fn stock_catalog() -> Vec<(String, u64)> {
    let mut items: Vec<(String, u64)> = (0..12).map(|n| (format!("SKU-{n:02}"), 40)).collect();
    items.push(("HOT".into(), 6));
    items
}

/// The catalog file of [`stock_catalog`] in `dir`, written once.
fn write_catalog(dir: &std::path::Path) -> std::path::PathBuf {
    let catalog = dir.join("catalog.json");
    if !catalog.exists() {
        let items: Vec<serde_json::Value> = stock_catalog()
            .into_iter()
            .map(|(sku, available)| {
                serde_json::json!({
                    "sku": sku, "name": sku.to_lowercase(), "unit_price_minor": 250,
                    "currency": "EUR", "available": available,
                })
            })
            .collect();
        std::fs::write(&catalog, serde_json::json!({ "items": items }).to_string()).unwrap();
    }
    catalog
}

/// Replica `replica` of three stock replicas over four partitions at `ports`, reading the two
/// receivers at `receivers`.
async fn stock(dir: &std::path::Path, ports: [u16; 3], receivers: [u16; 2], replica: u32) -> Stage {
    let catalog = write_catalog(dir);
    let [nowhere] = free_ports::<1>();
    Stage::start(
        "stock",
        &format!("127.0.0.1:{}", ports[replica as usize]),
        &dir.join(format!("stock-{replica}")),
        [
            "--partitions",
            &PARTITIONS.to_string(),
            "--replicas",
            "3",
            "--replica",
            &replica.to_string(),
            "--peers",
            &urls(&ports),
            "--upstream",
            &urls(&receivers),
            // No invoice stage runs here: nothing to give back.
            "--invoice-url",
            &format!("http://127.0.0.1:{nowhere}"),
            "--catalog",
            catalog.to_str().unwrap(),
        ]
        .map(String::from)
        .to_vec(),
    )
    .await
    .unwrap()
}

/// Every event of partition `partition`'s log at `owner`.
async fn log_of(owner: &Stage, partition: u32) -> Vec<Event> {
    let mut stream = owner
        .event_log()
        .await
        .subscribe(SubscribeRequest {
            partition,
            from_first: true,
            stop_at_head: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut events = Vec::new();
    while let Some(batch) = stream.message().await.unwrap() {
        events.extend(batch.entries.into_iter().map(|e| e.event.unwrap()));
    }
    events
}

/// Once `expected` orders are decided: every stock decision (`StockReserved` or `OrderRejected`)
/// of the `partitions` partitions by order, with the partition that logged it, each checked to be the only
/// one of its order; and how many holds were asked. Partition p is read from `owners[p mod n]`.
async fn decisions(
    owners: &[&Stage],
    partitions: u32,
    expected: usize,
) -> (BTreeMap<String, (u32, Kind)>, usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let mut decisions: BTreeMap<String, (u32, Kind)> = BTreeMap::new();
        let mut holds = 0;
        for partition in 0..partitions {
            let owner = owners[partition as usize % owners.len()];
            for event in log_of(owner, partition).await {
                match event.kind.unwrap() {
                    kind @ (Kind::StockReserved(_) | Kind::OrderRejected(_)) => {
                        let earlier = decisions.insert(event.order_id.clone(), (partition, kind));
                        assert!(earlier.is_none(), "{} decided twice", event.order_id);
                    }
                    Kind::HoldRequested(_) => holds += 1,
                    _ => {}
                }
            }
        }
        if decisions.len() == expected {
            return (decisions, holds);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} of {expected} orders decided",
            decisions.len()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Order `n` of the stock tests: one to three lines of the twelve plain skus (mostly in several
/// shards), a third of them also wanting one hot unit.
fn mixed_order(n: usize, skus: &[(String, u64)]) -> Vec<OrderLine> {
    let mut lines: Vec<OrderLine> = (0..1 + n % 3)
        .map(|i| OrderLine {
            sku: skus[(n * 7 + i * 5) % 12].0.clone(),
            quantity: 1 + (n % 4) as u32,
        })
        .collect();
    if n.is_multiple_of(3) {
        lines.push(OrderLine {
            sku: "HOT".into(),
            quantity: 1,
        });
    }
    lines
}

/// Places the orders `range` of [`mixed_order`] at once, from 37 customers, at one receiver or the
/// other; returns each order's id and lines.
async fn place_mixed(
    clients: &[OrderReceiverClient<tonic::transport::Channel>; 2],
    range: std::ops::Range<usize>,
    skus: &[(String, u64)],
) -> Vec<(String, Vec<OrderLine>)> {
    let mut tasks = Vec::new();
    for n in range {
        let lines = mixed_order(n, skus);
        let mut client = clients[n % 2].clone();
        tasks.push(tokio::spawn(async move {
            let answer = client
                .place_order(PlaceOrderRequest {
                    customer_id: format!("customer-{}", n % 37),
                    lines: lines.clone(),
                    idempotency_key: format!("key-{n}"),
                })
                .await
                .unwrap()
                .into_inner();
            (answer.order_id, lines)
        }));
    }
    let mut placed = Vec::new();
    for task in tasks {
        placed.push(task.await.unwrap());
    }
    placed
}

/// Checks each decision against the order placed: made in the order's home partition, reserved
/// with every line as asked (in the customer's order) or rejected with reasons. Returns the units
/// the reserved orders took, by sku, and how many rejections named the hot sku.
fn taken_by(
    placed: &BTreeMap<String, Vec<OrderLine>>,
    decisions: &BTreeMap<String, (u32, Kind)>,
) -> (BTreeMap<String, u64>, usize) {
    let mut taken: BTreeMap<String, u64> = BTreeMap::new();
    let mut rejected_hot = 0;
    for (id, (partition, kind)) in decisions {
        assert_eq!(partition_of(id), *partition, "{id} decided elsewhere");
        let lines = &placed[id];
        match kind {
            Kind::StockReserved(reserved) => {
                let got: Vec<(&str, u32)> = reserved
                    .lines
                    .iter()
                    .map(|l| (l.sku.as_str(), l.quantity))
                    .collect();
                let asked: Vec<(&str, u32)> =
                    lines.iter().map(|l| (l.sku.as_str(), l.quantity)).collect();
                assert_eq!(got, asked, "{id}");
                for line in lines {
                    *taken.entry(line.sku.clone()).or_default() += u64::from(line.quantity);
                }
            }
            Kind::OrderRejected(rejected) => {
                assert!(!rejected.lines.is_empty(), "{id}: no reason");
                if rejected.lines.iter().any(|l| l.sku == "HOT") {
                    rejected_hot += 1;
                }
            }
            _ => unreachable!(),
        }
    }
    (taken, rejected_hot)
}

/// Each sku's stock, asked of `stock` (which forwards most of them): the initial stock less what
/// the reserved orders took, all of it reserved, so no hold outlived its order.
async fn check_levels(stock: &Stage, skus: &[(String, u64)], taken: &BTreeMap<String, u64>) {
    let mut client = StockCheckerClient::new(stock.channel().await);
    for (sku, initial) in skus {
        let item = client
            .get_stock(GetStockRequest { sku: sku.clone() })
            .await
            .unwrap()
            .into_inner();
        let took = taken.get(sku).copied().unwrap_or(0);
        assert_eq!(
            (item.available, item.reserved),
            (initial - took, took),
            "{sku}"
        );
    }
}

/// Two receiver replicas and three stock replicas over four partitions, with a client of each
/// receiver.
struct StockLayout {
    _dir: tempfile::TempDir,
    _receivers: [Stage; 2],
    stocks: Vec<Stage>,
    clients: [OrderReceiverClient<tonic::transport::Channel>; 2],
}

impl StockLayout {
    async fn start() -> StockLayout {
        let dir = temp_dir().unwrap();
        let receiver_ports = free_ports::<2>();
        let stock_ports = free_ports::<3>();
        let receivers = [
            receiver(dir.path(), receiver_ports, 0).await,
            receiver(dir.path(), receiver_ports, 1).await,
        ];
        let mut stocks = Vec::new();
        for replica in 0..3 {
            stocks.push(stock(dir.path(), stock_ports, receiver_ports, replica).await);
        }
        let clients = [
            OrderReceiverClient::new(receivers[0].channel().await),
            OrderReceiverClient::new(receivers[1].channel().await),
        ];
        StockLayout {
            _dir: dir,
            _receivers: receivers,
            stocks,
            clients,
        }
    }
}

/// Stock sharded by sku over four partitions and three replicas, fed by two receiver replicas:
/// orders whose lines fall in several shards, and a hot sku with little stock, are reserved all or
/// nothing, each decided exactly once in its home partition, while a stock replica is killed -9
/// and restarted mid-run. When quiet, every sku's stock is its initial stock less what the
/// reserved orders took, and nothing is held for an order that was rejected. Any replica answers
/// `GetStock` and `SetStock` for any sku, and `ListStock` gathers every shard.
#[tokio::test(flavor = "multi_thread")]
async fn stock_shards_reserve_every_order_all_or_nothing_across_replicas() {
    let StockLayout {
        _dir,
        _receivers,
        mut stocks,
        clients,
    } = StockLayout::start().await;
    let skus = stock_catalog();

    // 150 orders from 37 customers at either receiver, most over two or three shards, a third of
    // them wanting the hot sku; replica 0 of the stock (shards 0 and 3) dies a third of the way.
    let mut placed: BTreeMap<String, Vec<OrderLine>> = BTreeMap::new();
    for round in 0..5 {
        if round == 2 {
            stocks[0].kill9().await;
        }
        if round == 3 {
            stocks[0].restart().await.unwrap();
        }
        placed.extend(place_mixed(&clients, round * 30..(round + 1) * 30, &skus).await);
    }

    // Every order is decided exactly once, in its home partition's log.
    let (decisions, holds) =
        decisions(&stocks.iter().collect::<Vec<_>>(), PARTITIONS, placed.len()).await;
    assert!(holds > 50, "only {holds} orders spanned shards");
    let (taken, rejected_hot) = taken_by(&placed, &decisions);
    assert!(rejected_hot > 0, "the hot sku never ran out");
    let hot = taken.get("HOT").copied().unwrap_or(0);
    assert!((1..=6).contains(&hot), "{hot} hot units taken of 6");

    // No order waits for a hold any more, and the holds show in the metrics.
    let mut held = 0.0;
    for partition in 0..PARTITIONS {
        let metrics = stocks[(partition % 3) as usize].scrape().await.unwrap();
        let label = partition.to_string();
        let waiting = metrics.value(
            "orderflow_pending_work",
            &[
                ("stage", "stock"),
                ("work", "holds"),
                ("partition", label.as_str()),
            ],
        );
        assert!(
            matches!(waiting, None | Some(0.0)),
            "partition {partition}: {waiting:?} waiting"
        );
    }
    for replica in &stocks {
        let metrics = replica.scrape().await.unwrap();
        held += metrics
            .value(
                "orderflow_events_processed_total",
                &[("stage", "stock"), ("outcome", "held")],
            )
            .unwrap_or(0.0);
    }
    assert!(held > 0.0, "no hold counted");

    // A replica's log lines say which of its partitions they are about: replica 1 (shard 1)
    // subscribed to partition 1 of the receivers' log and to the other shards' logs, as shard 1.
    let logs = stocks[1].logs();
    let subscribed: Vec<&str> = logs
        .lines()
        .filter(|line| line.contains("subscribed upstream"))
        .collect();
    assert!(
        subscribed.iter().all(|line| line.contains(" partition=1 ")),
        "{subscribed:#?}"
    );
    for upstream in 0..PARTITIONS {
        let read = format!(" upstream_partition={upstream} ");
        assert!(
            subscribed.iter().any(|line| line.contains(&read)),
            "no subscription to partition {upstream}: {subscribed:#?}"
        );
    }

    // Each sku's stock, asked of a replica that mostly does not hold it: the initial stock less
    // what the reserved orders took, all of it reserved; no hold outlived its order.
    check_levels(&stocks[1], &skus, &taken).await;
    // ListStock gathers every shard of every replica, page by page, each sku once.
    let mut listed = Vec::new();
    let mut token = String::new();
    loop {
        let page = StockCheckerClient::new(stocks[2].channel().await)
            .list_stock(ListStockRequest {
                page_size: 4,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        listed.extend(page.items.into_iter().map(|i| i.sku));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let mut expected: Vec<String> = skus.iter().map(|(sku, _)| sku.clone()).collect();
    expected.sort();
    assert_eq!(listed, expected);
    // SetStock at any replica changes the sku in its shard.
    for (n, (sku, _)) in skus.iter().enumerate() {
        let set = StockCheckerClient::new(stocks[n % 3].channel().await)
            .set_stock(SetStockRequest {
                sku: sku.clone(),
                available: Some(1000 + n as u64),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(set.available, 1000 + n as u64);
        let got = StockCheckerClient::new(stocks[1].channel().await)
            .get_stock(GetStockRequest { sku: sku.clone() })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(got.available, 1000 + n as u64, "{sku}");
    }
    let missing = StockCheckerClient::new(stocks[1].channel().await)
        .get_stock(GetStockRequest {
            sku: "NO-SUCH".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
}

/// Contention on one hot sku across shards: 200 orders from 200 customers at both receiver
/// replicas, each wanting one of 30 hot units plus a line of another shard's stock, a quarter of
/// them doomed by an unknown sku (so their hot holds are taken and given back). One stock replica
/// holds all four shards (no `--peers`: it reads its shards' logs through itself). The hot sku is
/// never oversold; what concurrent holds cost is reported: the valid orders rejected for the hot
/// sku beyond those a one-at-a-time reservation would have rejected.
#[tokio::test(flavor = "multi_thread")]
async fn a_hot_sku_is_never_oversold_under_holds_from_every_shard() {
    let dir = temp_dir().unwrap();
    let receiver_ports = free_ports::<2>();
    let receivers = [
        receiver(dir.path(), receiver_ports, 0).await,
        receiver(dir.path(), receiver_ports, 1).await,
    ];
    const HOT_UNITS: u64 = 30;
    let catalog = dir.path().join("hot.json");
    let mut items = vec![serde_json::json!({
        "sku": "HOT", "name": "hot", "unit_price_minor": 100, "currency": "EUR",
        "available": HOT_UNITS,
    })];
    for n in 0..4 {
        items.push(serde_json::json!({
            "sku": format!("FILL-{n}"), "name": "filler", "unit_price_minor": 100,
            "currency": "EUR", "available": 1000,
        }));
    }
    std::fs::write(&catalog, serde_json::json!({ "items": items }).to_string()).unwrap();
    let [nowhere] = free_ports::<1>();
    let upstream = receiver_ports
        .map(|port| format!("http://127.0.0.1:{port}"))
        .join(",");
    let stock = Stage::start(
        "stock",
        "127.0.0.1:0",
        &dir.path().join("stock"),
        [
            "--partitions",
            &PARTITIONS.to_string(),
            "--upstream",
            &upstream,
            "--invoice-url",
            &format!("http://127.0.0.1:{nowhere}"),
            "--catalog",
            catalog.to_str().unwrap(),
        ]
        .map(String::from)
        .to_vec(),
    )
    .await
    .unwrap();

    let mut placed: BTreeMap<String, bool> = BTreeMap::new();
    for wave in 0..5 {
        let mut tasks = Vec::new();
        for n in wave * 40..(wave + 1) * 40 {
            let doomed = n % 4 == 0;
            let mut lines = vec![
                OrderLine {
                    sku: "HOT".into(),
                    quantity: 1,
                },
                OrderLine {
                    sku: format!("FILL-{}", n % 4),
                    quantity: 1,
                },
            ];
            if doomed {
                lines.push(OrderLine {
                    sku: format!("NO-SUCH-{n}"),
                    quantity: 1,
                });
            }
            let mut client = OrderReceiverClient::new(receivers[n % 2].channel().await);
            tasks.push(tokio::spawn(async move {
                let answer = client
                    .place_order(PlaceOrderRequest {
                        customer_id: format!("buyer-{n}"),
                        lines,
                        idempotency_key: String::new(),
                    })
                    .await
                    .unwrap()
                    .into_inner();
                (answer.order_id, doomed)
            }));
        }
        for task in tasks {
            let (id, doomed) = task.await.unwrap();
            placed.insert(id, doomed);
        }
    }

    let (decisions, _) = decisions(&[&stock], PARTITIONS, placed.len()).await;
    let mut sold = 0;
    let mut valid = 0;
    for (id, (_, kind)) in &decisions {
        let doomed = placed[id];
        valid += u64::from(!doomed);
        match kind {
            Kind::StockReserved(_) => {
                assert!(!doomed, "{id}: an order with an unknown sku was reserved");
                sold += 1;
            }
            Kind::OrderRejected(rejected) if doomed => {
                assert!(rejected.lines.iter().any(|l| l.sku.starts_with("NO-SUCH")));
            }
            Kind::OrderRejected(rejected) => {
                let skus: Vec<&str> = rejected.lines.iter().map(|l| l.sku.as_str()).collect();
                assert_eq!(skus, ["HOT"], "{id}");
            }
            _ => unreachable!(),
        }
    }
    let hot = StockCheckerClient::new(stock.channel().await)
        .get_stock(GetStockRequest { sku: "HOT".into() })
        .await
        .unwrap()
        .into_inner();
    assert!(sold <= HOT_UNITS, "{sold} hot units sold of {HOT_UNITS}");
    assert_eq!((hot.available, hot.reserved), (HOT_UNITS - sold, sold));
    // One at a time, the first 30 valid orders would have had the hot units and the rest been
    // rejected: every unit left unsold is an order rejected only because a doomed order's hold
    // had the units when it came.
    eprintln!(
        "contention: {sold} of {HOT_UNITS} hot units sold to {valid} valid orders; {} valid \
         orders ({:.1} %) rejected beyond what one-at-a-time reservation rejects",
        HOT_UNITS - sold,
        (HOT_UNITS - sold) as f64 * 100.0 / valid as f64
    );
}

/// An order whose lines fall in both of two stock shards is still one trace: the home shard's
/// reservation, the other shard's hold as its child, and the decision, all under the receiver's
/// span.
#[tokio::test(flavor = "multi_thread")]
async fn an_order_across_shards_is_one_trace_with_its_hold() {
    let collector = orderflow_e2e::otlp::OtlpReceiver::start().await.unwrap();
    let env = vec![
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT".to_owned(),
            collector.endpoint(),
        ),
        ("OTEL_BSP_SCHEDULE_DELAY".to_owned(), "200".to_owned()),
    ];
    let dir = temp_dir().unwrap();
    let partitions = ["--partitions".to_owned(), "2".to_owned()];
    let receiver = Stage::start_with_env(
        "receiver",
        "127.0.0.1:0",
        &dir.path().join("receiver"),
        [
            "--http-listen",
            "none",
            "--stock-url",
            "none",
            "--invoice-url",
            "none",
            "--notifier-url",
            "none",
        ]
        .map(String::from)
        .into_iter()
        .chain(partitions.clone())
        .collect(),
        env.clone(),
    )
    .await
    .unwrap();
    let [nowhere] = free_ports::<1>();
    let stock = Stage::start_with_env(
        "stock",
        "127.0.0.1:0",
        &dir.path().join("stock"),
        [
            "--upstream".to_owned(),
            receiver.url(),
            "--invoice-url".to_owned(),
            format!("http://127.0.0.1:{nowhere}"),
        ]
        .into_iter()
        .chain(partitions)
        .collect(),
        env,
    )
    .await
    .unwrap();
    // The demo catalog's four plentiful items: two shards hold them.
    let order_id = OrderReceiverClient::new(receiver.channel().await)
        .place_order(PlaceOrderRequest {
            customer_id: "tracer".into(),
            lines: ["KB-01", "MOUSE-02", "HEAD-03", "CABLE-04"]
                .map(|sku| OrderLine {
                    sku: sku.into(),
                    quantity: 1,
                })
                .to_vec(),
            idempotency_key: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .order_id;
    let (decisions, holds) = decisions(&[&stock], 2, 1).await;
    assert!(matches!(decisions[&order_id].1, Kind::StockReserved(_)));
    assert_eq!(holds, 1, "the four items are not in two shards");

    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let spans = loop {
        let spans: Vec<_> = collector
            .spans()
            .into_iter()
            .filter(|s| s.attribute("order.id") == Some(order_id.as_str()))
            .collect();
        let names: BTreeSet<&str> = spans.iter().map(|s| s.name.as_str()).collect();
        if ["reserve stock", "hold stock", "decide reservation"]
            .iter()
            .all(|n| names.contains(n))
        {
            break spans;
        }
        assert!(std::time::Instant::now() < deadline, "spans: {names:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let traces: BTreeSet<&str> = spans.iter().map(|s| s.trace_id.as_str()).collect();
    assert_eq!(traces.len(), 1, "{spans:#?}");
    let span = |name: &str| spans.iter().find(|s| s.name == name).unwrap();
    let reserve = span("reserve stock");
    assert!(
        !reserve.parent_span_id.is_empty(),
        "the receiver's span is its parent"
    );
    assert_eq!(span("hold stock").parent_span_id, reserve.span_id);
    assert_eq!(span("decide reservation").parent_span_id, reserve.span_id);
    assert_eq!(
        span("decide reservation").attribute("outcome"),
        Some("reserved")
    );
}

/// Kill -9 at any moment: while 320 orders flow in from both receivers, one stock replica after
/// another is killed and restarted, six times, wherever it is in its holds, answers and decisions.
/// Every order is still decided exactly once, and every sku's stock is its initial stock less what
/// the reserved orders took.
#[tokio::test(flavor = "multi_thread")]
async fn stock_shards_lose_and_double_nothing_when_replicas_die_mid_traffic() {
    let StockLayout {
        _dir,
        _receivers,
        mut stocks,
        clients,
    } = StockLayout::start().await;
    let skus = stock_catalog();
    let placing = tokio::spawn({
        let skus = skus.clone();
        async move {
            let mut placed: BTreeMap<String, Vec<OrderLine>> = BTreeMap::new();
            for wave in 0..40 {
                placed.extend(place_mixed(&clients, wave * 8..(wave + 1) * 8, &skus).await);
                tokio::time::sleep(Duration::from_millis(60)).await;
            }
            placed
        }
    });
    for round in 0..6u64 {
        tokio::time::sleep(Duration::from_millis(120 + 50 * round)).await;
        let victim = &mut stocks[(round % 3) as usize];
        victim.kill9().await;
        tokio::time::sleep(Duration::from_millis(150)).await;
        victim.restart().await.unwrap();
    }
    let placed = placing.await.unwrap();
    assert_eq!(placed.len(), 320);
    let (decisions, _) =
        decisions(&stocks.iter().collect::<Vec<_>>(), PARTITIONS, placed.len()).await;
    let (taken, _) = taken_by(&placed, &decisions);
    assert!(taken.get("HOT").copied().unwrap_or(0) <= 6);
    check_levels(&stocks[2], &skus, &taken).await;
}

/// `ports` as a `--peers` or upstream list.
fn urls(ports: &[u16]) -> String {
    ports
        .iter()
        .map(|port| format!("http://127.0.0.1:{port}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The ports of a whole pipeline over four partitions: two replicas of each stage, three of stock.
#[derive(Clone, Copy)]
struct PipelinePorts {
    receivers: [u16; 2],
    stocks: [u16; 3],
    invoices: [u16; 2],
    notifiers: [u16; 2],
}

/// Replica `replica` of `stage`, whose replicas are at `ports`, over four partitions, with `args`
/// and `env` (its trace exporter).
async fn replica_of(
    stage: &'static str,
    dir: &std::path::Path,
    ports: &[u16],
    replica: usize,
    args: Vec<String>,
    env: &[(String, String)],
) -> Stage {
    let layout = [
        "--partitions".to_owned(),
        PARTITIONS.to_string(),
        "--replicas".to_owned(),
        ports.len().to_string(),
        "--replica".to_owned(),
        replica.to_string(),
        "--peers".to_owned(),
        urls(ports),
    ];
    Stage::start_with_env(
        stage,
        &format!("127.0.0.1:{}", ports[replica]),
        &dir.join(format!("{stage}-{replica}")),
        layout.into_iter().chain(args).collect(),
        env.to_vec(),
    )
    .await
    .unwrap()
}

/// Every replica of a whole pipeline over four partitions at `ports`. The gateway declines some
/// payments and fails some transiently, so that payments are retried, fail and give stock back.
async fn whole_pipeline(
    dir: &std::path::Path,
    ports: PipelinePorts,
    env: &[(String, String)],
) -> [Vec<Stage>; 4] {
    let catalog = write_catalog(dir);
    let mut receivers = Vec::new();
    for replica in 0..2 {
        let args = [
            "--http-listen",
            "127.0.0.1:0",
            "--stock-url",
            &urls(&ports.stocks),
            "--invoice-url",
            &urls(&ports.invoices),
            "--notifier-url",
            &urls(&ports.notifiers),
        ];
        let args = args.map(String::from).to_vec();
        receivers.push(replica_of("receiver", dir, &ports.receivers, replica, args, env).await);
    }
    let mut stocks = Vec::new();
    for replica in 0..3 {
        let args = [
            "--upstream",
            &urls(&ports.receivers),
            "--invoice-url",
            &urls(&ports.invoices),
            "--catalog",
            catalog.to_str().unwrap(),
        ];
        let args = args.map(String::from).to_vec();
        stocks.push(replica_of("stock", dir, &ports.stocks, replica, args, env).await);
    }
    let mut invoices = Vec::new();
    for replica in 0..2 {
        let args = [
            "--upstream",
            &urls(&ports.stocks),
            "--gateway-decline-rate",
            "0.15",
            "--gateway-transient-failure-rate",
            "0.2",
            "--payment-backoff-min",
            "10ms",
            "--payment-backoff-max",
            "50ms",
            "--payment-max-attempts",
            "3",
        ];
        let args = args.map(String::from).to_vec();
        invoices.push(replica_of("invoice", dir, &ports.invoices, replica, args, env).await);
    }
    let mut notifiers = Vec::new();
    for replica in 0..2 {
        let args = vec!["--upstream".to_owned(), urls(&ports.invoices)];
        notifiers.push(replica_of("notifier", dir, &ports.notifiers, replica, args, env).await);
    }
    [receivers, stocks, invoices, notifiers]
}

/// Every page of `list` (one call per page, given its token) with `page_size` 7, so that pages
/// cross partitions and replicas.
async fn every_page<T, F, Fut>(list: F) -> Vec<T>
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = (Vec<T>, String)>,
{
    let mut all = Vec::new();
    let mut token = String::new();
    loop {
        let (page, next) = list(token).await;
        assert!(page.len() <= 7);
        all.extend(page);
        if next.is_empty() {
            return all;
        }
        token = next;
    }
}

/// The whole pipeline over four partitions: two replicas of the receiver, invoice and notifier,
/// three of stock. A mixed load (most orders over several shards, a third wanting a hot sku with
/// 6 units) with declined and transiently failing payments, while one stock replica and then one
/// invoice replica are killed -9 and restarted. Every order ends exactly once (a notification
/// gathered from every partition); each sku's stock is its initial stock less what confirmed
/// orders took, failed payments having given theirs back; each partition numbers its invoices
/// without a gap; every failed payment is a dead letter in its order's partition; any replica
/// answers `GetInvoice`, `SetFaults` reaches every replica; and each order is one trace across
/// every stage's replicas.
#[tokio::test(flavor = "multi_thread")]
async fn a_whole_pipeline_over_partitions_loses_doubles_and_oversells_nothing() {
    use orderflow_proto::v1::{
        GetFaultsRequest, GetInvoiceRequest, ListCapturesRequest, ListDeadLettersRequest,
        ListInvoicesRequest, ListNotificationsRequest, NotificationKind, SetFaultsRequest,
        invoice_creator_client::InvoiceCreatorClient, notifier_client::NotifierClient,
    };

    let collector = orderflow_e2e::otlp::OtlpReceiver::start().await.unwrap();
    let env = [
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT".to_owned(),
            collector.endpoint(),
        ),
        ("OTEL_BSP_SCHEDULE_DELAY".to_owned(), "200".to_owned()),
    ];
    let dir = temp_dir().unwrap();
    let ports = PipelinePorts {
        receivers: free_ports::<2>(),
        stocks: free_ports::<3>(),
        invoices: free_ports::<2>(),
        notifiers: free_ports::<2>(),
    };
    let [receivers, mut stocks, mut invoices, notifiers] =
        whole_pipeline(dir.path(), ports, &env).await;
    let clients = [
        OrderReceiverClient::new(receivers[0].channel().await),
        OrderReceiverClient::new(receivers[1].channel().await),
    ];
    let skus = stock_catalog();

    // A first wave, with the replica of stock shards 1 killed under it; then a second, with
    // invoice replica 0 (partitions 0 and 2) killed under it.
    let first = tokio::spawn({
        let clients = clients.clone();
        let skus = skus.clone();
        async move { place_mixed(&clients, 0..90, &skus).await }
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    stocks[1].kill9().await;
    stocks[1].restart().await.unwrap();
    let mut placed = first.await.unwrap();
    let second = tokio::spawn({
        let clients = clients.clone();
        let skus = skus.clone();
        async move { place_mixed(&clients, 90..180, &skus).await }
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    invoices[0].kill9().await;
    invoices[0].restart().await.unwrap();
    placed.extend(second.await.unwrap());
    let placed: BTreeMap<String, Vec<OrderLine>> = placed.into_iter().collect();
    assert_eq!(placed.len(), 180, "an order was accepted twice");

    // Every order ends exactly once: its notification, gathered at either notifier replica.
    let notifier = NotifierClient::new(notifiers[1].channel().await);
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    let notifications = loop {
        let notifications = every_page(|page_token| {
            let mut notifier = notifier.clone();
            async move {
                let page = notifier
                    .list_notifications(ListNotificationsRequest {
                        page_size: 7,
                        page_token,
                        order_id: String::new(),
                    })
                    .await
                    .unwrap()
                    .into_inner();
                (page.notifications, page.next_page_token)
            }
        })
        .await;
        if notifications.len() >= placed.len() {
            break notifications;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} of {} orders notified",
            notifications.len(),
            placed.len()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let mut ended = BTreeMap::new();
    for notification in &notifications {
        assert_eq!(
            notification.partition,
            partition_of(&notification.order_id),
            "{} notified outside its partition",
            notification.order_id
        );
        let earlier = ended.insert(notification.order_id.clone(), notification.clone());
        assert!(
            earlier.is_none(),
            "{} notified twice",
            notification.order_id
        );
    }
    assert_eq!(
        ended.keys().collect::<Vec<_>>(),
        placed.keys().collect::<Vec<_>>()
    );
    let kind_of = |id: &str| ended[id].kind();
    let confirmed: Vec<&String> = placed
        .keys()
        .filter(|id| kind_of(id) == NotificationKind::Confirmed)
        .collect();
    let failed: BTreeSet<&String> = placed
        .keys()
        .filter(|id| kind_of(id) == NotificationKind::PaymentFailed)
        .collect();
    assert!(
        !confirmed.is_empty() && !failed.is_empty(),
        "{} confirmed, {} payments failed",
        confirmed.len(),
        failed.len()
    );

    // Stock: the initial less what confirmed orders took; failed payments gave theirs back, and
    // no hold is left.
    let mut taken: BTreeMap<String, u64> = BTreeMap::new();
    for id in &confirmed {
        for line in &placed[*id] {
            *taken.entry(line.sku.clone()).or_default() += u64::from(line.quantity);
        }
    }
    assert!(taken.get("HOT").copied().unwrap_or(0) <= 6, "HOT oversold");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        // Compensation may still be on its way to the shards.
        let mut client = StockCheckerClient::new(stocks[2].channel().await);
        let mut exact = true;
        for (sku, initial) in &skus {
            let item = client
                .get_stock(GetStockRequest { sku: sku.clone() })
                .await
                .unwrap()
                .into_inner();
            exact &= item.available + item.reserved == *initial
                && item.reserved == taken.get(sku).copied().unwrap_or(0);
        }
        if exact {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "stock is not exact");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    check_levels(&stocks[0], &skus, &taken).await;
    for stock in &stocks {
        let metrics = stock.scrape().await.unwrap();
        let holds = metrics.value("orderflow_pending_work", &[("work", "holds")]);
        assert_eq!(holds.unwrap_or(0.0), 0.0, "holds left at {}", stock.url());
    }

    // Invoices: one per confirmed order, in its partition, each partition's series gap-free.
    let invoice = InvoiceCreatorClient::new(invoices[1].channel().await);
    let listed = every_page(|page_token| {
        let mut invoice = invoice.clone();
        async move {
            let page = invoice
                .list_invoices(ListInvoicesRequest {
                    page_size: 7,
                    page_token,
                })
                .await
                .unwrap()
                .into_inner();
            (page.invoices, page.next_page_token)
        }
    })
    .await;
    let mut series: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
    for invoice in &listed {
        assert_eq!(invoice.partition, partition_of(&invoice.order_id));
        assert_eq!(ended[&invoice.order_id].invoice_number, invoice.number);
        series
            .entry(invoice.partition)
            .or_default()
            .push(invoice.number);
    }
    assert_eq!(listed.len(), confirmed.len());
    for (partition, numbers) in &series {
        let expected: Vec<u64> = (1..=numbers.len() as u64).collect();
        assert_eq!(numbers, &expected, "partition {partition}'s series");
    }
    let mut other = InvoiceCreatorClient::new(invoices[0].channel().await);
    for id in confirmed.iter().take(12) {
        let got = other
            .get_invoice(GetInvoiceRequest {
                order_id: (*id).clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(got.order_id, **id);
        assert!(
            ended[*id]
                .message
                .contains(&format!("INV-{}-{}", got.partition, got.number)),
            "{}",
            ended[*id].message
        );
    }

    // Every failed payment is a dead letter in its order's partition.
    let letters = every_page(|page_token| {
        let mut invoice = invoice.clone();
        async move {
            let page = invoice
                .list_dead_letters(ListDeadLettersRequest {
                    page_size: 7,
                    page_token,
                })
                .await
                .unwrap()
                .into_inner();
            (page.dead_letters, page.next_page_token)
        }
    })
    .await;
    let lettered: BTreeSet<&String> = letters.iter().map(|l| &l.order_id).collect();
    assert_eq!(lettered, failed);
    for letter in &letters {
        assert_eq!(letter.partition, partition_of(&letter.order_id));
    }
    // Every capture that stands is a confirmed order's, once, whichever replica's ledger holds it.
    let captures = every_page(|page_token| {
        let mut invoice = invoice.clone();
        async move {
            let page = invoice
                .list_captures(ListCapturesRequest {
                    page_size: 7,
                    page_token,
                })
                .await
                .unwrap()
                .into_inner();
            (page.captures, page.next_page_token)
        }
    })
    .await;
    let standing: Vec<&String> = captures
        .iter()
        .filter(|c| c.voided_at.is_none())
        .map(|c| &c.order_id)
        .collect();
    assert_eq!(standing.len(), confirmed.len());
    assert_eq!(
        standing.iter().collect::<BTreeSet<_>>().len(),
        confirmed.len()
    );
    // A capture id names one charge, whichever replica's ledger numbered it.
    let ids: BTreeSet<&String> = captures.iter().map(|c| &c.capture_id).collect();
    assert_eq!(
        ids.len(),
        captures.len(),
        "capture ids repeat across replicas"
    );
    assert!(ids.iter().any(|id| id.starts_with("cap_r1_")), "{ids:?}");

    // SetFaults at one replica changes every replica's gateway.
    other
        .set_faults(SetFaultsRequest {
            decline_rate: Some(0.0),
            transient_failure_rate: Some(0.0),
            latency: None,
        })
        .await
        .unwrap();
    let faults = invoice
        .clone()
        .get_faults(GetFaultsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (faults.decline_rate, faults.transient_failure_rate),
        (0.0, 0.0)
    );
    // Counters since each replica started, summed (replica 0 restarted, so fewer).
    assert!(faults.stats.unwrap().captures > 0);

    // Each order is one trace, through every stage's replicas. Spans a replica made but had not
    // exported when it was killed -9 are gone with it, so the orders checked are partition 3's:
    // their home shard's stock replica (0 of 3) and invoice replica (1 of 2) were never killed.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    for id in confirmed
        .iter()
        .filter(|id| partition_of(id.as_str()) == 3)
        .take(5)
    {
        loop {
            let spans: Vec<_> = collector
                .spans()
                .into_iter()
                .filter(|s| s.attribute("order.id") == Some(id.as_str()))
                .collect();
            let names: BTreeSet<&str> = spans.iter().map(|s| s.name.as_str()).collect();
            if [
                "reserve stock",
                "price order",
                "create invoice",
                "notify customer",
            ]
            .iter()
            .all(|n| names.contains(n))
            {
                let traces: BTreeSet<&str> = spans.iter().map(|s| s.trace_id.as_str()).collect();
                assert_eq!(traces.len(), 1, "{id}: {names:?}");
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{id}: {names:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    // `orderflow load` at one receiver replica follows the notifier's log in every partition when
    // `--notifier` names both replicas, and sees each order it placed end; with one of them named
    // it says what to give instead of waiting for what it cannot see.
    let load = |notifier: String| {
        let skus: Vec<String> = skus.iter().map(|(sku, _)| sku.clone()).collect();
        Command::new(orderflow_e2e::binary("orderflow"))
            .args(["--receiver", &receivers[1].url(), "--notifier", &notifier])
            .args(["load", "--orders", "120", "--concurrency", "8"])
            .args([
                "--customers",
                "50",
                "--skus",
                &skus[..12].join(","),
                "--json",
            ])
            .output()
    };
    let output = load(urls(&ports.notifiers)).await.unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["accepted"], 120, "{report}");
    assert_eq!(report["notified"], 120, "{report}");
    let ended: u64 = report["outcomes"]
        .as_object()
        .unwrap()
        .values()
        .map(|n| n.as_u64().unwrap())
        .sum();
    assert_eq!(ended, 120, "{report}");
    for (named, why) in [
        (notifiers[0].url(), "the notifier runs 2 replicas"),
        (notifiers[1].url(), "not replica 0"),
    ] {
        let output = load(named).await.unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            !output.status.success()
                && stderr.contains(why)
                && stderr.contains("every replica's URL in replica order"),
            "{stderr}"
        );
    }
    drop((receivers, notifiers));
}

/// README's offline procedure to change the pods of a stage, on the receiver: one replica over
/// four partitions takes orders, stops, and its stores of partitions 1 and 3 move to a second
/// replica's data dir; the two replicas then carry on from them. Orders placed before answer at
/// either replica, a customer's idempotency key still returns its first order, the stock stage
/// reading the moved logs resumes where it was (no order decided twice), and new orders flow.
#[tokio::test(flavor = "multi_thread")]
async fn a_stage_moves_to_more_replicas_with_its_stores() {
    let dir = temp_dir().unwrap();
    let ports = free_ports::<2>();
    let [stock_port] = free_ports::<1>();
    let [nowhere] = free_ports::<1>();
    // The stock stage, reading the receiver's replicas as `--upstream` lists them.
    let stock_over = |receivers: &[u16]| {
        let args = vec![
            "--partitions".to_owned(),
            PARTITIONS.to_string(),
            "--upstream".to_owned(),
            urls(receivers),
            "--invoice-url".to_owned(),
            format!("http://127.0.0.1:{nowhere}"),
        ];
        let data = dir.path().join("stock");
        async move {
            Stage::start("stock", &format!("127.0.0.1:{stock_port}"), &data, args)
                .await
                .unwrap()
        }
    };
    let mut stock = stock_over(&ports[..1]).await;
    let receiver_args = |replicas: usize, replica: usize| {
        let mut args = vec![
            "--partitions".to_owned(),
            PARTITIONS.to_string(),
            "--replicas".to_owned(),
            replicas.to_string(),
            "--replica".to_owned(),
            replica.to_string(),
            "--http-listen".to_owned(),
            "none".to_owned(),
            "--stock-url".to_owned(),
            format!("http://127.0.0.1:{stock_port}"),
            "--invoice-url".to_owned(),
            "none".to_owned(),
            "--notifier-url".to_owned(),
            "none".to_owned(),
        ];
        if replicas > 1 {
            args.extend(["--peers".to_owned(), urls(&ports)]);
        }
        args
    };
    let demo_order = |n: usize| PlaceOrderRequest {
        customer_id: format!("mover-{}", n % 11),
        lines: vec![OrderLine {
            sku: ["KB-01", "MOUSE-02", "HEAD-03", "CABLE-04"][n % 4].into(),
            quantity: 1,
        }],
        idempotency_key: format!("move-{n}"),
    };
    let first_dir = dir.path().join("receiver-0");
    let mut alone = Stage::start(
        "receiver",
        &format!("127.0.0.1:{}", ports[0]),
        &first_dir,
        receiver_args(1, 0),
    )
    .await
    .unwrap();
    let mut client = OrderReceiverClient::new(alone.channel().await);
    let mut before = Vec::new();
    for n in 0..40 {
        let answer = client.place_order(demo_order(n)).await.unwrap();
        before.push(answer.into_inner().order_id);
    }
    decisions(&[&stock], PARTITIONS, 40).await;

    // Scale to 0, move the stores of the partitions replica 1 of 2 owns, start both, and point
    // the stock stage's list of receivers at them.
    alone.kill9().await;
    drop(alone);
    stock.kill9().await;
    drop(stock);
    let second_dir = dir.path().join("receiver-1");
    std::fs::create_dir_all(&second_dir).unwrap();
    for partition in [1, 3] {
        let name = format!("receiver-{partition}.redb");
        std::fs::rename(first_dir.join(&name), second_dir.join(&name)).unwrap();
    }
    let mut replicas = Vec::new();
    for (replica, data) in [&first_dir, &second_dir].into_iter().enumerate() {
        let listen = format!("127.0.0.1:{}", ports[replica]);
        let stage = Stage::start("receiver", &listen, data, receiver_args(2, replica))
            .await
            .unwrap();
        replicas.push(stage);
    }
    let stock = stock_over(&ports).await;
    let clients = [
        OrderReceiverClient::new(replicas[0].channel().await),
        OrderReceiverClient::new(replicas[1].channel().await),
    ];
    for (n, id) in before.iter().enumerate() {
        let mut client = clients[n % 2].clone();
        let order = client
            .get_order(GetOrderRequest {
                order_id: id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(order.order.unwrap().order_id, *id);
        let replayed = client.place_order(demo_order(n)).await.unwrap();
        assert_eq!(replayed.into_inner().order_id, *id, "key of order {n}");
    }
    for n in 40..80 {
        let mut client = clients[n % 2].clone();
        client.place_order(demo_order(n)).await.unwrap();
    }
    let (decided, _) = decisions(&[&stock], PARTITIONS, 80).await;
    assert!(before.iter().all(|id| decided.contains_key(id)));
}
