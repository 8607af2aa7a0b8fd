//! `orderflow load`: a load generator for any receiver.
//!
//! Open loop (`--rate`): order *i* is due at `start + i / rate`, and its latency counts from that
//! due time, not from when a free slot let it go, so a stall shows up in the percentiles instead
//! of silently slowing the sender (coordinated omission). Closed loop (`--concurrency`): that many
//! calls in flight, each sent as soon as the previous one returns.
//!
//! With `--bulk` the orders go over one `PlaceOrders` stream instead of one call each: the same
//! modes, with `--concurrency` (or `--max-in-flight`) orders unanswered at most, and each answer's
//! latency counted the same way.
//!
//! Placed→notified latency comes from following the notifier's own log (`EventLog/Subscribe` from
//! its head, every partition at the replica that owns it): the time from an order's due time to
//! the moment its `CustomerNotified` (or `NotificationDeadLettered`) entry reaches this process.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    io::IsTerminal,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::anyhow;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use orderflow_proto::v1::{
    HeadRequest, NotificationKind, OrderLine, PlaceOrderRequest, SubscribeRequest, event::Kind,
    order_receiver_client::OrderReceiverClient, place_orders_response,
};
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde::Serialize;
use tokio::{
    sync::{Semaphore, mpsc},
    task::JoinHandle,
    time::Instant,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::client::{Connect, Stage};

/// How often a load whose stderr is not a terminal logs its progress.
const LOG_PROGRESS_EVERY: Duration = Duration::from_secs(10);

/// SKU that no catalog has: orders meant to be rejected ask for it.
pub const UNKNOWN_SKU: &str = "LOAD-NO-SUCH-SKU";

/// Flags of `orderflow load`.
#[derive(clap::Args, Debug, Clone)]
pub struct LoadArgs {
    /// Orders per second, open loop (latency counts from each order's due time)
    #[arg(long, value_parser = parse_orders_per_second, conflicts_with = "concurrency")]
    pub rate: Option<f64>,
    /// Calls in flight, closed loop (default 64 when --rate is not given)
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub concurrency: Option<u64>,
    /// How long to send orders
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Stop after this many orders (whichever of --orders and --duration comes first)
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub orders: Option<u64>,
    /// Lines per order
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub lines: u32,
    /// Units per line
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub quantity: u32,
    /// SKUs the lines are drawn from, evenly
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "KB-01,MOUSE-02,HEAD-03,CABLE-04"
    )]
    pub skus: Vec<String>,
    /// A hot SKU that takes --hot-share of all lines (contention on one item)
    #[arg(long)]
    pub hot_sku: Option<String>,
    /// Share of lines that go to --hot-sku, 0.0 to 1.0
    #[arg(long, default_value_t = 0.2, value_parser = share)]
    pub hot_share: f64,
    /// Share of orders that will be rejected (they ask for an unknown SKU), 0.0 to 1.0
    #[arg(long, default_value_t = 0.0, value_parser = share)]
    pub reject_share: f64,
    /// Distinct customer ids
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    pub customers: u64,
    /// With --rate: calls in flight at most; beyond it orders wait, and the wait counts
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_in_flight: u64,
    /// Send the orders over one PlaceOrders stream instead of one PlaceOrder call each
    #[arg(long)]
    pub bulk: bool,
    /// Do not follow the notifier's log (no placed→notified figures)
    #[arg(long)]
    pub no_notified: bool,
    /// After the last order, how long to wait for the rest to be notified
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
    /// Print the summary as one JSON object (no progress bar)
    #[arg(long)]
    pub json: bool,
}

/// Flag value of a rate of orders: a positive number per second.
pub(crate) fn parse_orders_per_second(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(rate) if rate > 0.0 && rate.is_finite() => Ok(rate),
        _ => Err("expected a positive number of orders per second".into()),
    }
}

fn share(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err("expected a number from 0.0 to 1.0".into()),
    }
}

/// Percentiles of one latency histogram, in microseconds.
#[derive(Debug, Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

impl Percentiles {
    fn of(h: &Histogram<u64>) -> Self {
        Percentiles {
            count: h.len(),
            p50: h.value_at_quantile(0.5),
            p90: h.value_at_quantile(0.9),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }
}

/// What one run measured.
#[derive(Debug, Serialize)]
pub struct Summary {
    pub mode: String,
    pub sent: u64,
    pub accepted: u64,
    /// Refused calls by gRPC code.
    pub errors: BTreeMap<String, u64>,
    /// Seconds spent sending.
    pub send_seconds: f64,
    /// Accepted orders per second while sending.
    pub accepted_per_second: f64,
    pub accept_latency_us: Percentiles,
    /// Open loop: how long after its due time each order went out, the client's own share of the
    /// latencies (its timer, and a wait for a free slot once `--max-in-flight` are unanswered).
    pub send_lateness_us: Option<Percentiles>,
    /// Accepted orders whose notification was seen.
    pub notified: Option<u64>,
    /// How those orders ended, from the notifier's events.
    pub outcomes: Option<Outcomes>,
    /// Notified orders per second, from the first send to the last notification.
    pub notified_per_second: Option<f64>,
    pub placed_to_notified_us: Option<Percentiles>,
    /// What makes the figures mean less than they seem (most orders rejected, say).
    pub warnings: Vec<String>,
}

/// How the notified orders ended.
#[derive(Debug, Default, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct Outcomes {
    /// Reserved, paid, invoiced and confirmed to the customer.
    pub confirmed: u64,
    /// Rejected by the stock stage (out of stock, unknown SKU, mixed currency).
    pub rejected: u64,
    /// Reserved, but the payment was declined or never went through (stock given back).
    pub payment_failed: u64,
    /// The notification could not be delivered and waits as a dead letter.
    pub dead_lettered: u64,
}

/// How an order ended, as the notifier's log says.
#[derive(Debug, Clone, Copy)]
enum Outcome {
    Confirmed,
    Rejected,
    PaymentFailed,
    DeadLettered,
}

impl Outcomes {
    fn count(&mut self, outcome: Outcome) {
        match outcome {
            Outcome::Confirmed => self.confirmed += 1,
            Outcome::Rejected => self.rejected += 1,
            Outcome::PaymentFailed => self.payment_failed += 1,
            Outcome::DeadLettered => self.dead_lettered += 1,
        }
    }

    /// Rejections are most of what was measured: a benchmark of the shortest path only.
    fn rejections_dominate(&self) -> bool {
        let total = self.confirmed + self.rejected + self.payment_failed + self.dead_lettered;
        total > 0 && self.rejected * 2 > total
    }
}

/// Shared between the senders, the log follower and the progress bar.
struct State {
    accept_us: Mutex<Histogram<u64>>,
    /// Open loop: from each order's due time to the moment it went out.
    late_us: Mutex<Histogram<u64>>,
    notified_us: Mutex<Histogram<u64>>,
    /// Accepted orders not yet seen notified: id → due time.
    waiting: Mutex<HashMap<String, Instant>>,
    /// Notifications seen before their order's answer came back: id → when, and how it ended.
    early: Mutex<HashMap<String, (Instant, Outcome)>>,
    outcomes: Mutex<Outcomes>,
    errors: Mutex<BTreeMap<String, u64>>,
    sent: AtomicU64,
    accepted: AtomicU64,
    failed: AtomicU64,
    notified: AtomicU64,
    in_flight: AtomicU64,
    last_notified: Mutex<Option<Instant>>,
}

impl State {
    fn new() -> anyhow::Result<Self> {
        let histogram = || Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3);
        Ok(State {
            accept_us: Mutex::new(histogram()?),
            late_us: Mutex::new(histogram()?),
            notified_us: Mutex::new(histogram()?),
            waiting: Mutex::new(HashMap::new()),
            early: Mutex::new(HashMap::new()),
            outcomes: Mutex::new(Outcomes::default()),
            errors: Mutex::new(BTreeMap::new()),
            sent: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            notified: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            last_notified: Mutex::new(None),
        })
    }

    /// Records that an order due at `due` goes out now.
    fn going_out(&self, due: Instant) {
        if let Ok(mut h) = self.late_us.lock() {
            h.saturating_record(micros(due.elapsed()));
        }
    }

    fn record_notified(&self, due: Instant, at: Instant, outcome: Outcome) {
        if let Ok(mut h) = self.notified_us.lock() {
            h.saturating_record(micros(at.saturating_duration_since(due)));
        }
        if let Ok(mut outcomes) = self.outcomes.lock() {
            outcomes.count(outcome);
        }
        self.notified.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut last) = self.last_notified.lock() {
            *last = Some(last.map_or(at, |l| l.max(at)));
        }
    }

    /// Records the answer to an order due at `due`: its id, or the code it was refused with.
    fn answered(&self, due: Instant, result: Result<String, tonic::Code>, follow: bool) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        if let Ok(mut h) = self.accept_us.lock() {
            h.saturating_record(micros(due.elapsed()));
        }
        match result {
            Ok(order_id) => self.accepted(order_id, due, follow),
            Err(code) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut errors) = self.errors.lock() {
                    *errors.entry(format!("{code:?}")).or_default() += 1;
                }
            }
        }
    }

    fn accepted(&self, order_id: String, due: Instant, follow: bool) {
        self.accepted.fetch_add(1, Ordering::Relaxed);
        if !follow {
            return;
        }
        let early = self.early.lock().ok().and_then(|mut e| e.remove(&order_id));
        match early {
            Some((at, outcome)) => self.record_notified(due, at, outcome),
            None => {
                if let Ok(mut waiting) = self.waiting.lock() {
                    waiting.insert(order_id, due);
                }
            }
        }
    }

    fn notified(&self, order_id: &str, at: Instant, outcome: Outcome) {
        let due = self
            .waiting
            .lock()
            .ok()
            .and_then(|mut w| w.remove(order_id));
        match due {
            Some(due) => self.record_notified(due, at, outcome),
            None => {
                if let Ok(mut early) = self.early.lock() {
                    early.insert(order_id.to_owned(), (at, outcome));
                }
            }
        }
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

/// Makes the orders: lines drawn from the SKU mix, some meant to be rejected.
struct Shape {
    args: LoadArgs,
    rng: StdRng,
}

impl Shape {
    fn order(&mut self) -> PlaceOrderRequest {
        let args = &self.args;
        let customer = self.rng.random_range(0..args.customers);
        let reject = self.rng.random_bool(args.reject_share);
        let mut lines = Vec::with_capacity(args.lines as usize);
        for i in 0..args.lines {
            let sku = if reject && i == 0 {
                UNKNOWN_SKU.to_owned()
            } else {
                match &args.hot_sku {
                    Some(hot) if self.rng.random_bool(args.hot_share) => hot.clone(),
                    _ => args.skus[self.rng.random_range(0..args.skus.len())].clone(),
                }
            };
            match lines.iter_mut().find(|l: &&mut OrderLine| l.sku == sku) {
                Some(line) => line.quantity += args.quantity,
                None => lines.push(OrderLine {
                    sku,
                    quantity: args.quantity,
                }),
            }
        }
        PlaceOrderRequest {
            customer_id: format!("load-{customer}"),
            lines,
            idempotency_key: String::new(),
        }
    }
}

/// One call: records its latency from `due` and its outcome.
async fn send(
    mut client: OrderReceiverClient<Channel>,
    request: PlaceOrderRequest,
    due: Instant,
    state: &State,
    follow: bool,
) {
    state.in_flight.fetch_add(1, Ordering::Relaxed);
    let result = client.place_order(request).await;
    state.answered(
        due,
        result
            .map(|r| r.into_inner().order_id)
            .map_err(|s| s.code()),
        follow,
    );
}

/// Orders going over one `PlaceOrders` stream (`--bulk`), `window` unanswered at most.
struct BulkStream {
    requests: mpsc::Sender<PlaceOrderRequest>,
    /// Due times of the orders sent and not answered yet, in the order sent (answers come in
    /// that order).
    due: Arc<Mutex<VecDeque<Instant>>>,
    slots: Arc<Semaphore>,
    reader: JoinHandle<()>,
}

impl BulkStream {
    fn open(
        mut client: OrderReceiverClient<Channel>,
        state: Arc<State>,
        follow: bool,
        window: usize,
    ) -> Self {
        let (requests, rx) = mpsc::channel(window);
        let due: Arc<Mutex<VecDeque<Instant>>> = Arc::default();
        let slots = Arc::new(Semaphore::new(window));
        let reader = tokio::spawn({
            let (due, slots) = (due.clone(), slots.clone());
            async move {
                let ended = read_answers(&mut client, rx, &due, &slots, &state, follow).await;
                // No answer comes any more: the sender must not wait for a slot, and what is still
                // unanswered counts as refused with the code the stream ended with.
                slots.close();
                refuse_unanswered(&due, &state, ended, follow);
            }
        });
        BulkStream {
            requests,
            due,
            slots,
            reader,
        }
    }

    /// Sends `request` once fewer than `window` orders are unanswered, counting it as sent; its
    /// latency counts from `due`, or (closed loop) from when it could go. `false` once the stream
    /// is broken.
    async fn send(&self, request: PlaceOrderRequest, due: Option<Instant>, state: &State) -> bool {
        let Ok(slot) = self.slots.acquire().await else {
            return false;
        };
        slot.forget();
        state.sent.fetch_add(1, Ordering::Relaxed);
        if let Some(due) = due {
            state.going_out(due);
        }
        let due = due.unwrap_or_else(Instant::now);
        if let Ok(mut d) = self.due.lock() {
            d.push_back(due);
        }
        state.in_flight.fetch_add(1, Ordering::Relaxed);
        self.requests.send(request).await.is_ok()
    }

    /// Ends the request stream and waits for every answer; an order sent after the stream broke
    /// counts as refused (UNAVAILABLE).
    async fn finish(self, state: &State, follow: bool) {
        drop(self.requests);
        let _ = self.reader.await;
        refuse_unanswered(&self.due, state, tonic::Code::Unavailable, follow);
    }
}

/// Reads a `PlaceOrders` stream's answers, matching each to the oldest unanswered due time, until
/// the stream ends; returns the code it ended with (`Unknown` if it ended early without one).
async fn read_answers(
    client: &mut OrderReceiverClient<Channel>,
    requests: mpsc::Receiver<PlaceOrderRequest>,
    due: &Mutex<VecDeque<Instant>>,
    slots: &Semaphore,
    state: &State,
    follow: bool,
) -> tonic::Code {
    let mut answers = match client.place_orders(ReceiverStream::new(requests)).await {
        Ok(answers) => answers.into_inner(),
        Err(status) => return status.code(),
    };
    loop {
        let result = match answers.message().await {
            Ok(Some(answer)) => match answer.result {
                Some(place_orders_response::Result::Accepted(accepted)) => Ok(accepted.order_id),
                Some(place_orders_response::Result::Refused(refused)) => {
                    Err(tonic::Code::from(refused.code))
                }
                None => Err(tonic::Code::Unknown),
            },
            // Every order sent was answered, or the receiver broke its promise to answer each.
            Ok(None) => return tonic::Code::Unknown,
            Err(status) => return status.code(),
        };
        if let Some(at) = due.lock().ok().and_then(|mut d| d.pop_front()) {
            state.answered(at, result, follow);
        }
        slots.add_permits(1);
    }
}

/// Counts every order still waiting for an answer as refused with `code`.
fn refuse_unanswered(
    due: &Mutex<VecDeque<Instant>>,
    state: &State,
    code: tonic::Code,
    follow: bool,
) {
    let unanswered: Vec<Instant> = due
        .lock()
        .map(|mut d| d.drain(..).collect())
        .unwrap_or_default();
    for at in unanswered {
        state.answered(at, Err(code), follow);
    }
}

/// Subscribes to the notifier's log from its head in every partition, each at the replica that
/// owns it (partition p at replica p mod replicas, as `Head` says), before any order is sent; the
/// task it returns reports every terminal notification until one stream ends.
async fn follow_notifier(
    connect: &Connect,
    state: Arc<State>,
) -> anyhow::Result<tokio::task::JoinHandle<anyhow::Result<()>>> {
    let refused = |what: &str, status| {
        crate::client::refused(
            &format!("EventLog/{what} of the notifier (--notifier)"),
            status,
        )
    };
    const NAME_THEM_ALL: &str = "give --notifier every replica's URL in replica order \
        (comma-separated, or one URL with {replica} or {slot}), or pass --no-notified";
    let mut first = connect.log(Stage::Notifier, 0).await?;
    let layout = match first.head(HeadRequest::default()).await {
        Ok(head) => head.into_inner(),
        // Another replica than the first, which serves partition 0.
        Err(status) if status.code() == tonic::Code::FailedPrecondition => {
            return Err(anyhow!(
                "--notifier names first a notifier replica that is not replica 0 ({}): to \
                 follow every partition's log, {NAME_THEM_ALL}",
                status.message()
            ));
        }
        Err(status) => return Err(refused("Head", status)),
    };
    // 0 from a notifier that predates replicas and partitions: it runs one of each.
    let (partitions, replicas) = (layout.partitions.max(1), layout.replicas.max(1));
    if connect
        .replicas(Stage::Notifier)?
        .listed()
        .is_some_and(|listed| listed < replicas)
    {
        return Err(anyhow!(
            "the notifier runs {replicas} replicas and --notifier names fewer: to follow every \
             partition's log, {NAME_THEM_ALL}"
        ));
    }
    let mut streams = Vec::new();
    for partition in 0..partitions {
        let replica = partition % replicas;
        let mut log = match replica {
            0 => first.clone(),
            _ => connect.log(Stage::Notifier, replica).await?,
        };
        let head = log
            .head(HeadRequest { partition })
            .await
            .map_err(|s| refused("Head", s))?
            .into_inner()
            .next_offset;
        let stream = log
            .subscribe(SubscribeRequest {
                from_offset: head,
                max_batch: 1000,
                consumer: String::new(),
                stop_at_head: false,
                from_first: false,
                partition,
                // A reader that keeps nothing takes no part in fencing.
                owner: None,
                filter: None,
            })
            .await
            .map_err(|s| refused("Subscribe", s))?
            .into_inner();
        streams.push(stream);
    }
    Ok(tokio::spawn(async move {
        let readers = streams
            .into_iter()
            .map(|stream| read_notifications(stream, state.clone()));
        futures::future::try_join_all(readers).await.map(|_| ())
    }))
}

/// Reports every terminal notification of one partition's log until the stream ends.
async fn read_notifications(
    mut stream: tonic::Streaming<orderflow_proto::v1::EventBatch>,
    state: Arc<State>,
) -> anyhow::Result<()> {
    while let Some(batch) = stream.message().await? {
        let at = Instant::now();
        for entry in batch.entries {
            let Some(event) = entry.event else { continue };
            let outcome = match &event.kind {
                Some(Kind::CustomerNotified(notified)) => {
                    match notified.notification.as_ref().map(|n| n.kind()) {
                        Some(NotificationKind::Rejected) => Outcome::Rejected,
                        Some(NotificationKind::PaymentFailed) => Outcome::PaymentFailed,
                        _ => Outcome::Confirmed,
                    }
                }
                Some(Kind::NotificationDeadLettered(_)) => Outcome::DeadLettered,
                _ => continue,
            };
            state.notified(&event.order_id, at, outcome);
        }
    }
    Ok(())
}

/// Runs the load and returns what it measured. With `progress`: a live bar on a terminal, otherwise
/// a progress line on stderr every 10 s.
pub async fn measure(connect: &Connect, args: LoadArgs, progress: bool) -> anyhow::Result<Summary> {
    if args.skus.is_empty() || args.skus.iter().any(String::is_empty) {
        return Err(anyhow!("--skus: give at least one SKU, none empty"));
    }
    let follow = !args.no_notified;
    let receiver = OrderReceiverClient::new(connect.channel(Stage::Receiver).await?)
        .max_decoding_message_size(16 * 1024 * 1024);
    let state = Arc::new(State::new()?);
    let follower = if follow {
        Some(follow_notifier(connect, state.clone()).await?)
    } else {
        None
    };
    // On a terminal a live bar; otherwise (a container's log, a CI job) a line every 10 s.
    let terminal = std::io::stderr().is_terminal();
    let bar = if progress && terminal {
        let bar = ProgressBar::new_spinner();
        bar.set_style(
            ProgressStyle::with_template("{spinner} {elapsed_precise} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        bar.enable_steady_tick(Duration::from_millis(200));
        Some(bar)
    } else {
        None
    };
    let ticker = progress.then(|| {
        let (state, bar) = (state.clone(), bar.clone());
        let every = if bar.is_some() {
            Duration::from_millis(500)
        } else {
            LOG_PROGRESS_EVERY
        };
        tokio::spawn(async move {
            let started = Instant::now();
            let mut last = (started, 0u64);
            loop {
                tokio::time::sleep(every).await;
                let sent = state.sent.load(Ordering::Relaxed);
                let now = Instant::now();
                let rate = (sent - last.1) as f64 / now.duration_since(last.0).as_secs_f64();
                last = (now, sent);
                let line = format!(
                    "sent {sent}  {rate:.0}/s  accepted {}  errors {}  in flight {}  notified {}",
                    state.accepted.load(Ordering::Relaxed),
                    state.failed.load(Ordering::Relaxed),
                    state.in_flight.load(Ordering::Relaxed),
                    state.notified.load(Ordering::Relaxed),
                );
                match &bar {
                    Some(bar) => bar.set_message(line),
                    None => eprintln!(
                        "load: {:.0} s  {line}",
                        now.duration_since(started).as_secs_f64()
                    ),
                }
            }
        })
    });

    let limit = args.orders.unwrap_or(u64::MAX);
    let mut shape = Shape {
        args: args.clone(),
        rng: StdRng::from_os_rng(),
    };
    let start = Instant::now();
    let deadline = start + args.duration;
    let mode;
    let over = if args.bulk {
        ", over one PlaceOrders stream"
    } else {
        ""
    };
    match (args.rate, args.bulk) {
        (Some(rate), false) => {
            mode = format!("open loop, {rate} orders/s");
            let slots = Arc::new(Semaphore::new(args.max_in_flight as usize));
            let mut tasks = tokio::task::JoinSet::new();
            for i in 0..limit {
                let due = start + Duration::from_secs_f64(i as f64 / rate);
                if due >= deadline {
                    break;
                }
                tokio::time::sleep_until(due).await;
                let permit = slots.clone().acquire_owned().await?;
                state.going_out(due);
                let (client, request, state) = (receiver.clone(), shape.order(), state.clone());
                state.sent.fetch_add(1, Ordering::Relaxed);
                tasks.spawn(async move {
                    send(client, request, due, &state, follow).await;
                    drop(permit);
                });
                while tasks.try_join_next().is_some() {}
            }
            while tasks.join_next().await.is_some() {}
        }
        (Some(rate), true) => {
            mode = format!("open loop, {rate} orders/s{over}");
            let stream = BulkStream::open(
                receiver.clone(),
                state.clone(),
                follow,
                args.max_in_flight as usize,
            );
            for i in 0..limit {
                let due = start + Duration::from_secs_f64(i as f64 / rate);
                if due >= deadline {
                    break;
                }
                tokio::time::sleep_until(due).await;
                if !stream.send(shape.order(), Some(due), &state).await {
                    break;
                }
            }
            stream.finish(&state, follow).await;
        }
        (None, false) => {
            let concurrency = args.concurrency.unwrap_or(64);
            mode = format!("closed loop, {concurrency} in flight");
            let shape = Arc::new(Mutex::new(shape));
            let mut workers = tokio::task::JoinSet::new();
            for _ in 0..concurrency {
                let (client, state, shape) = (receiver.clone(), state.clone(), shape.clone());
                workers.spawn(async move {
                    while Instant::now() < deadline
                        && state.sent.fetch_add(1, Ordering::Relaxed) < limit
                    {
                        let Some(request) = shape.lock().ok().map(|mut s| s.order()) else {
                            break;
                        };
                        send(client.clone(), request, Instant::now(), &state, follow).await;
                    }
                });
            }
            while workers.join_next().await.is_some() {}
            // Workers counted one send too many each when they stopped on the limit.
            let sent =
                state.accepted.load(Ordering::Relaxed) + state.failed.load(Ordering::Relaxed);
            state.sent.store(sent, Ordering::Relaxed);
        }
        (None, true) => {
            let concurrency = args.concurrency.unwrap_or(64);
            mode = format!("closed loop, {concurrency} in flight{over}");
            let stream = BulkStream::open(
                receiver.clone(),
                state.clone(),
                follow,
                concurrency as usize,
            );
            while Instant::now() < deadline && state.sent.load(Ordering::Relaxed) < limit {
                if !stream.send(shape.order(), None, &state).await {
                    break;
                }
            }
            stream.finish(&state, follow).await;
        }
    }
    let send_seconds = start.elapsed().as_secs_f64();

    // Wait for the rest of the accepted orders to be notified.
    if follow {
        let drain = Instant::now() + args.drain_timeout;
        loop {
            let waiting = state.waiting.lock().map(|w| w.len()).unwrap_or(0);
            let follower_done = follower.as_ref().is_some_and(|f| f.is_finished());
            if waiting == 0 || follower_done || Instant::now() >= drain {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    if let Some(ticker) = ticker {
        ticker.abort();
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    if let Some(follower) = follower {
        follower.abort();
        if let Ok(Ok(Err(e))) = tokio::time::timeout(Duration::from_millis(10), follower).await {
            tracing::warn!(error = %e, "following the notifier's log failed");
        }
    }

    let accepted = state.accepted.load(Ordering::Relaxed);
    let accept_latency_us =
        Percentiles::of(&*state.accept_us.lock().map_err(|_| anyhow!("poisoned"))?);
    let send_lateness_us = match args.rate {
        Some(_) => Some(Percentiles::of(
            &*state.late_us.lock().map_err(|_| anyhow!("poisoned"))?,
        )),
        None => None,
    };
    let outcomes = follow
        .then(|| state.outcomes.lock().map(|o| *o).ok())
        .flatten();
    let mut warnings = Vec::new();
    if outcomes.is_some_and(|o| o.rejections_dominate()) {
        warnings.push(
            "most orders were rejected (out of stock or unknown SKUs): these figures measure rejections, not the whole path; restock with `orderflow stock set` or draw from other --skus"
                .to_owned(),
        );
    }
    let (notified, notified_per_second, placed_to_notified_us) = if follow {
        let notified = state.notified.load(Ordering::Relaxed);
        let last = state.last_notified.lock().ok().and_then(|l| *l);
        let rate = last.map(|last| notified as f64 / last.duration_since(start).as_secs_f64());
        let percentiles =
            Percentiles::of(&*state.notified_us.lock().map_err(|_| anyhow!("poisoned"))?);
        (Some(notified), rate, Some(percentiles))
    } else {
        (None, None, None)
    };
    let errors = state.errors.lock().map(|e| e.clone()).unwrap_or_default();
    Ok(Summary {
        mode,
        sent: state.sent.load(Ordering::Relaxed),
        accepted,
        errors,
        send_seconds,
        accepted_per_second: accepted as f64 / send_seconds.max(1e-9),
        accept_latency_us,
        send_lateness_us,
        notified,
        outcomes,
        notified_per_second,
        placed_to_notified_us,
        warnings,
    })
}

/// `orderflow load`: runs it and prints the summary.
pub async fn run(connect: &Connect, args: LoadArgs) -> anyhow::Result<()> {
    let json = args.json;
    let summary = measure(connect, args, !json).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
        return Ok(());
    }
    print!("{}", render(&summary));
    Ok(())
}

fn ms(us: u64) -> String {
    format!("{:.2} ms", us as f64 / 1000.0)
}

fn latency_line(label: &str, p: &Percentiles) -> String {
    format!(
        "{label:<18} p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  (n={})\n",
        ms(p.p50),
        ms(p.p90),
        ms(p.p99),
        ms(p.p999),
        ms(p.max),
        p.count
    )
}

/// The human summary.
pub fn render(s: &Summary) -> String {
    let mut out = format!(
        "load: {}\n{:<18} {}\n{:<18} {}  ({:.0} orders/s over {:.1} s)\n",
        s.mode, "sent", s.sent, "accepted", s.accepted, s.accepted_per_second, s.send_seconds
    );
    for (code, count) in &s.errors {
        out.push_str(&format!("{:<18} {count}\n", format!("refused {code}")));
    }
    out.push_str(&latency_line("accept latency", &s.accept_latency_us));
    if let Some(late) = &s.send_lateness_us {
        out.push_str(&latency_line("sent late by", late));
    }
    if let (Some(notified), Some(p)) = (s.notified, &s.placed_to_notified_us) {
        let rate = s
            .notified_per_second
            .map_or(String::new(), |r| format!("  ({r:.0} orders/s end to end)"));
        out.push_str(&format!("{:<18} {notified}{rate}\n", "notified"));
        if let Some(o) = &s.outcomes {
            out.push_str(&format!(
                "{:<18} confirmed {}  rejected {}  payment failed {}  dead-lettered {}\n",
                "  of which", o.confirmed, o.rejected, o.payment_failed, o.dead_lettered
            ));
        }
        out.push_str(&latency_line("placed→notified", p));
        if notified < s.accepted {
            out.push_str(&format!(
                "{} accepted orders were not seen notified within --drain-timeout\n",
                s.accepted - notified
            ));
        }
    }
    for warning in &s.warnings {
        out.push_str(&format!("warning: {warning}\n"));
    }
    out
}
