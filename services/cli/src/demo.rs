//! `orderflow demo`: the whole pipeline in this process, simulated customers ordering from the demo
//! catalog, one line per step as it happens, and a report at the end.
//!
//! The lines come from the stages' own `EventLog` streams (the demo subscribes like any downstream
//! would), so what you see is what the pipeline committed, not what the customers sent.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use console::{Style, style};
use hdrhistogram::Histogram;
use orderflow_proto::v1::{
    AckRequest, Event, HeadRequest, NotificationKind, OrderLine, PlaceOrderRequest, StockItem,
    SubscribeRequest, event::Kind, event_log_client::EventLogClient,
    order_receiver_client::OrderReceiverClient, stock_checker_client::StockCheckerClient,
};
use rand::{Rng, seq::IndexedRandom};
use tokio::sync::mpsc;
use tonic::transport::Channel;

use crate::pipeline::{Pipeline, PipelineConfig};

/// Knobs of the demo.
#[derive(Debug, Clone)]
pub struct DemoConfig {
    pub pipeline: PipelineConfig,
    pub customers: usize,
    pub orders: Option<u64>,
    pub duration: Duration,
    pub rate: f64,
}

const CUSTOMERS: &[&str] = &[
    "alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy", "mallory",
    "niaj", "olivia", "peggy", "rupert", "sybil", "trent", "victor", "walter", "yolanda",
];

/// What the customers do: (sku, weight) — the sold-out GPU and the scarce lamp are ordered now and
/// then, so rejections show up.
const SHOPPING: &[(&str, u32)] = &[
    ("KB-01", 20),
    ("MOUSE-02", 25),
    ("HEAD-03", 15),
    ("CABLE-04", 30),
    ("LAMP-05", 8),
    ("GPU-06", 3),
];

pub async fn run(config: DemoConfig) -> anyhow::Result<()> {
    let pipeline = Pipeline::start(config.pipeline.clone()).await?;
    println!(
        "{} receiver {}  stock {}  invoice {}  notifier {}  data {}",
        style("orderflow demo").bold(),
        pipeline.receiver,
        pipeline.stock,
        pipeline.invoice,
        pipeline.notifier,
        config.pipeline.data_dir.display()
    );
    let result = drive(&config, &pipeline).await;
    pipeline.stop().await?;
    result
}

/// One committed step of one order, from one stage's log.
struct Step {
    stage: &'static str,
    event: Event,
}

async fn drive(config: &DemoConfig, pipeline: &Pipeline) -> anyhow::Result<()> {
    let started = Instant::now();
    let (steps_tx, mut steps) = mpsc::channel::<Step>(4096);
    for (stage, addr) in [
        ("receiver", pipeline.receiver),
        ("stock", pipeline.stock),
        ("invoice", pipeline.invoice),
        ("notifier", pipeline.notifier),
    ] {
        // Show only what happens from now on, so a reused --data-dir does not replay earlier runs;
        // but read from where "demo" last acknowledged, since a log lets a consumer acknowledge
        // only what it was sent.
        let channel = Channel::from_shared(format!("http://{addr}"))?.connect_lazy();
        let mut client = EventLogClient::new(channel);
        let head = client
            .head(HeadRequest::default())
            .await
            .with_context(|| format!("reading the {stage} log's head"))?
            .into_inner();
        let from = head
            .consumers
            .iter()
            .find(|c| c.consumer == DEMO_CONSUMER)
            .map_or(head.next_offset, |c| {
                c.acked_offset.clamp(head.first_offset, head.next_offset)
            });
        tokio::spawn(watch(
            stage,
            client,
            from,
            head.next_offset,
            steps_tx.clone(),
        ));
    }
    drop(steps_tx);

    let receiver = Channel::from_shared(format!("http://{}", pipeline.receiver))?
        .connect()
        .await
        .context("connecting to the receiver")?;
    let accepted = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let budget = Arc::new(AtomicU64::new(config.orders.unwrap_or(u64::MAX)));
    let deadline = match config.orders {
        Some(_) => None,
        None => Some(started + config.duration),
    };
    let per_customer = Duration::from_secs_f64(config.customers as f64 / config.rate.max(0.001));
    let customers: Vec<_> = (0..config.customers)
        .map(|i| {
            let client = OrderReceiverClient::new(receiver.clone());
            let name = CUSTOMERS[i % CUSTOMERS.len()].to_owned();
            let (accepted, failed, budget) = (accepted.clone(), failed.clone(), budget.clone());
            tokio::spawn(customer(
                client,
                name,
                per_customer,
                i as f64 / config.customers as f64,
                deadline,
                budget,
                accepted,
                failed,
            ))
        })
        .collect();
    let placing = async {
        for c in customers {
            let _ = c.await;
        }
    };
    tokio::pin!(placing);

    let mut report = Report::new()?;
    let mut placing_done = false;
    let mut drain_deadline = None;
    loop {
        if placing_done && report.all_shown(accepted.load(Ordering::Relaxed)) {
            break;
        }
        let wait = async {
            match drain_deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = &mut placing, if !placing_done => {
                placing_done = true;
                drain_deadline = Some(tokio::time::Instant::now() + Duration::from_secs(30));
            }
            step = steps.recv() => match step {
                Some(step) => report.record(started, step),
                None => break,
            },
            () = wait => {
                println!("{}", style("gave up waiting for the last orders after 30 s").red());
                break;
            }
        }
    }
    let elapsed = started.elapsed();
    let stock = list_stock(pipeline).await?;
    report.print(
        elapsed,
        accepted.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
        &stock,
    );
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn customer(
    mut client: OrderReceiverClient<Channel>,
    name: String,
    every: Duration,
    phase: f64,
    deadline: Option<Instant>,
    budget: Arc<AtomicU64>,
    accepted: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
) {
    let start = tokio::time::Instant::now() + every.mul_f64(phase);
    let mut tick = tokio::time::interval_at(start, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return;
        }
        let took = budget.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
            left.checked_sub(1)
        });
        if took.is_err() {
            return;
        }
        let request = PlaceOrderRequest {
            customer_id: name.clone(),
            lines: basket(),
            idempotency_key: String::new(),
        };
        match client.place_order(request).await {
            Ok(_) => accepted.fetch_add(1, Ordering::Relaxed),
            Err(status) => {
                eprintln!(
                    "{} {}: {}",
                    style("place failed").red(),
                    name,
                    status.message()
                );
                failed.fetch_add(1, Ordering::Relaxed)
            }
        };
    }
}

/// One to three distinct items, one to three units each.
fn basket() -> Vec<OrderLine> {
    let mut rng = rand::rng();
    let count = rng.random_range(1..=3);
    let mut lines: Vec<OrderLine> = Vec::with_capacity(count);
    while lines.len() < count {
        let Ok((sku, _)) = SHOPPING.choose_weighted(&mut rng, |(_, w)| *w) else {
            break;
        };
        if lines.iter().any(|l| l.sku == *sku) {
            continue;
        }
        lines.push(OrderLine {
            sku: (*sku).to_owned(),
            quantity: rng.random_range(1..=3),
        });
    }
    lines
}

/// The consumer name under which the demo reads every stage's log.
pub const DEMO_CONSUMER: &str = "demo";

/// Streams one stage's log from `from_offset` into `steps`, skipping entries below `show_from`, and
/// acknowledges as "demo" so retention keeps what it has not shown yet.
async fn watch(
    stage: &'static str,
    mut client: EventLogClient<Channel>,
    from_offset: u64,
    show_from: u64,
    steps: mpsc::Sender<Step>,
) {
    let Ok(stream) = client
        .subscribe(SubscribeRequest {
            from_offset,
            max_batch: 0,
            consumer: DEMO_CONSUMER.into(),
            stop_at_head: false,
            from_first: false,
            // The demo's own pipeline runs one partition.
            partition: 0,
            // The demo keeps nothing of its own: it takes no part in fencing.
            owner: None,
            filter: None,
        })
        .await
    else {
        return;
    };
    let mut stream = stream.into_inner();
    while let Ok(Some(batch)) = stream.message().await {
        let next = batch.entries.last().map(|e| e.offset + 1);
        for entry in batch.entries {
            if entry.offset < show_from {
                continue;
            }
            if let Some(event) = entry.event
                && steps.send(Step { stage, event }).await.is_err()
            {
                return;
            }
        }
        if let Some(offset) = next {
            let _ = client
                .ack(AckRequest {
                    consumer: DEMO_CONSUMER.into(),
                    offset,
                    partition: 0,
                    incarnation: 0,
                })
                .await;
        }
    }
}

async fn list_stock(pipeline: &Pipeline) -> anyhow::Result<Vec<StockItem>> {
    let client = StockCheckerClient::connect(format!("http://{}", pipeline.stock)).await?;
    crate::stock::list_all(&client).await
}

/// Counts and latencies, printed as the final report.
struct Report {
    confirmed: u64,
    rejected: u64,
    payment_failed: u64,
    dead_lettered: u64,
    /// Orders each stage's log has shown so far (receiver, stock, invoice, notifier): the four
    /// streams are independent, so the demo ends only when all of them have caught up.
    shown: [u64; 4],
    /// Payment failures the invoice log showed, and releases of their stock the stock log showed.
    failed_payments_shown: u64,
    releases_shown: u64,
    latency_us: Histogram<u64>,
}

impl Report {
    fn new() -> anyhow::Result<Self> {
        Ok(Report {
            confirmed: 0,
            rejected: 0,
            payment_failed: 0,
            dead_lettered: 0,
            shown: [0; 4],
            failed_payments_shown: 0,
            releases_shown: 0,
            // 1 µs to 10 min at 3 significant digits.
            latency_us: Histogram::new_with_bounds(1, 600_000_000, 3)?,
        })
    }

    fn finished(&self) -> u64 {
        self.confirmed + self.rejected + self.payment_failed + self.dead_lettered
    }

    /// Whether every stage has shown its step for `orders` orders, and every failed payment's stock
    /// release.
    fn all_shown(&self, orders: u64) -> bool {
        self.shown.iter().all(|&n| n >= orders) && self.releases_shown >= self.failed_payments_shown
    }

    fn record(&mut self, started: Instant, step: Step) {
        let event = &step.event;
        let stage = ["receiver", "stock", "invoice", "notifier"]
            .iter()
            .position(|s| *s == step.stage);
        // The stock shards' traffic among themselves is no step: the decision that follows is.
        if matches!(
            event.kind,
            Some(Kind::HoldRequested(_) | Kind::HoldAnswered(_) | Kind::HoldReleased(_))
        ) {
            return;
        }
        let first_step = !matches!(event.kind, Some(Kind::StockReleased(_)) | None);
        if let (Some(i), true) = (stage, first_step) {
            self.shown[i] += 1;
        }
        let short = short_id(&event.order_id);
        let at = format!("{:>7.3}s", started.elapsed().as_secs_f64());
        let (label, color, detail) = match &event.kind {
            Some(Kind::OrderPlaced(placed)) => {
                let lines: Vec<_> = placed
                    .lines
                    .iter()
                    .map(|l| format!("{}×{}", l.sku, l.quantity))
                    .collect();
                (
                    "received",
                    Style::new().cyan(),
                    format!("{:<8} {}", event.customer_id, lines.join(", ")),
                )
            }
            Some(Kind::StockReserved(reserved)) => (
                "reserved",
                Style::new().blue(),
                format!("{} line(s)", reserved.lines.len()),
            ),
            // The invoice stage passes rejections on; the stock stage's line already said it.
            Some(Kind::OrderRejected(_)) if step.stage != "stock" => return,
            Some(Kind::OrderRejected(rejected)) => {
                let reasons: Vec<_> = rejected
                    .lines
                    .iter()
                    .map(orderflow_notifier::describe_rejection)
                    .collect();
                ("rejected", Style::new().red(), reasons.join("; "))
            }
            Some(Kind::InvoiceCreated(created)) => {
                let Some(invoice) = &created.invoice else {
                    return;
                };
                let total = invoice
                    .total
                    .as_ref()
                    .map_or_else(String::new, ToString::to_string);
                let attempts = invoice.payment.as_ref().map_or(1, |p| p.attempts);
                let retried = if attempts > 1 {
                    format!(", paid on attempt {attempts}")
                } else {
                    String::new()
                };
                (
                    "invoiced",
                    Style::new().magenta(),
                    format!("#{:<5} total {total}{retried}", invoice.number),
                )
            }
            Some(Kind::PaymentFailed(failed)) => {
                self.failed_payments_shown += 1;
                (
                    "unpaid",
                    Style::new().red(),
                    format!(
                        "payment failed after {} attempt(s): {}",
                        failed.attempts, failed.last_error
                    ),
                )
            }
            Some(Kind::StockReleased(released)) => {
                self.releases_shown += 1;
                (
                    "released",
                    Style::new().blue(),
                    format!("{} line(s) back in stock", released.lines.len()),
                )
            }
            Some(Kind::NotificationDeadLettered(dead)) => {
                self.dead_lettered += 1;
                let reason = dead
                    .dead_letter
                    .as_ref()
                    .map_or_else(String::new, |d| d.reason.clone());
                (
                    "undelivered",
                    Style::new().red(),
                    format!("dead-lettered: {reason}"),
                )
            }
            Some(Kind::CustomerNotified(notified)) => {
                let Some(notification) = &notified.notification else {
                    return;
                };
                let kind = notification.kind();
                match kind {
                    NotificationKind::Confirmed => self.confirmed += 1,
                    NotificationKind::PaymentFailed => self.payment_failed += 1,
                    _ => self.rejected += 1,
                }
                if let (Some(placed), Some(at)) = (event.placed_at, event.at) {
                    let micros = (at.seconds - placed.seconds) * 1_000_000
                        + i64::from(at.nanos - placed.nanos) / 1000;
                    let _ = self.latency_us.record(micros.max(1) as u64);
                }
                (
                    "notified",
                    Style::new().green(),
                    match kind {
                        NotificationKind::Confirmed => "confirmed".into(),
                        NotificationKind::PaymentFailed => "told payment failed".into(),
                        _ => "told it was rejected".into(),
                    },
                )
            }
            Some(Kind::HoldRequested(_) | Kind::HoldAnswered(_) | Kind::HoldReleased(_)) | None => {
                return;
            }
        };
        println!(
            "{}  {}  {}  {}",
            style(at).dim(),
            style(short).yellow(),
            color.apply_to(format!("{label:<11}")),
            detail
        );
    }

    fn print(&self, elapsed: Duration, accepted: u64, failed: u64, stock: &[StockItem]) {
        let ms = |q: f64| self.latency_us.value_at_quantile(q) as f64 / 1000.0;
        println!();
        println!(
            "{}",
            style("── report ──────────────────────────────────────────").bold()
        );
        println!("orders accepted     {accepted:>8}");
        if failed > 0 {
            println!("orders refused      {:>8}", style(failed).red());
        }
        println!("confirmed           {:>8}", style(self.confirmed).green());
        println!("rejected            {:>8}", style(self.rejected).red());
        println!(
            "payment failed      {:>8}",
            style(self.payment_failed).red()
        );
        if self.dead_lettered > 0 {
            println!("dead-lettered       {:>8}", style(self.dead_lettered).red());
        }
        println!(
            "throughput          {:>8.1} orders/s notified over {:.1} s",
            self.finished() as f64 / elapsed.as_secs_f64().max(0.001),
            elapsed.as_secs_f64()
        );
        if !self.latency_us.is_empty() {
            println!(
                "placed → notified   p50 {:.1} ms   p99 {:.1} ms   max {:.1} ms",
                ms(0.5),
                ms(0.99),
                self.latency_us.max() as f64 / 1000.0
            );
        }
        println!();
        println!(
            "{}",
            style(format!(
                "{:<10} {:<28} {:>10} {:>9} {:>14}",
                "SKU", "NAME", "AVAILABLE", "RESERVED", "UNIT PRICE"
            ))
            .bold()
        );
        for item in stock {
            let price = item
                .unit_price
                .as_ref()
                .map_or_else(String::new, ToString::to_string);
            let available = if item.available == 0 {
                style(item.available.to_string()).red()
            } else {
                style(item.available.to_string())
            };
            println!(
                "{:<10} {:<28} {:>10} {:>9} {:>14}",
                item.sku, item.name, available, item.reserved, price
            );
        }
    }
}

/// The last 8 characters of an order id: the random tail of a UUIDv7.
fn short_id(id: &str) -> &str {
    id.get(id.len().saturating_sub(8)..).unwrap_or(id)
}
