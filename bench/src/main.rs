//! The benchmark: `cargo run --release -p orderflow-bench` (BENCHMARKS.md has the results).
//!
//! In one run on one machine, with every server a separate release process:
//! 1. the baseline: a bare tonic unary echo server answering `PlaceOrder` with no work, loaded by
//!    the same `orderflow load` client at the same concurrency and message size;
//! 2. `PlaceOrder` acceptance throughput of a receiver alone (durable: fsync'd group commits);
//! 3. end-to-end sustained orders/s, accepted → notified, four stages, fsync on at every stage,
//!    traces sampled at 1 % and exported to a live OTLP receiver;
//! 4. accept and placed→notified latency percentiles at fixed rates (open loop; 1,000 and
//!    5,000 orders/s unless `--rate` says otherwise);
//! 5. each stage's peak RSS with the notifier stopped and a backlog of events waiting for it (the
//!    peak is reset when this phase starts; the peak under the earlier full load is reported too);
//! 6. the notifier's catch-up rate (events/s) when it comes back;
//! 7. end to end again with the pipeline scaled out: `--scaled-partitions` partitions (4) with
//!    `--scaled-replicas` replicas (2) of every stage, each its own process, the load entering at
//!    one receiver replica (which forwards what the other owns), closed loop and at the fixed
//!    rates, against phases 3 and 4 on one partition; and the stock stage's CPU per order for
//!    orders of one customer with one line, its sku in the customer's home shard against in
//!    another shard: what an order across shards costs against one within a shard.
//!
//! Next to each throughput figure it measures CPU time per order ((utime + stime) from
//! `/proc/<pid>/stat` of each server process, and the load client's own rusage, divided by the
//! orders): far steadier than req/s on a shared machine, and it says where the cost is.
//!
//! It prints a table with each figure and its ratio to the baseline, and writes the figures as JSON.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    pin::Pin,
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use orderflow_e2e::otlp;
use orderflow_proto::v1::{
    GetOrderRequest, GetOrderResponse, HeadRequest, OrderStatus, PlaceOrderRequest,
    PlaceOrderResponse, PlaceOrdersResponse, WatchOrderRequest,
    event_log_client::EventLogClient,
    order_receiver_server::{OrderReceiver, OrderReceiverServer},
    place_orders_response,
};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    net::TcpListener,
    process::{Child, Command},
};
use tokio_stream::{Stream, StreamExt, wrappers::TcpListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

#[derive(Parser, Debug)]
#[command(about = "orderflow measured against a bare tonic echo server, in one run")]
struct Args {
    /// Calls in flight for the throughput figures (echo, PlaceOrder and end to end alike)
    #[arg(long, default_value_t = 128)]
    concurrency: u64,
    /// How long each throughput and latency measurement runs
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Orders per second for the latency figures (open loop), one measurement per rate; the
    /// targets are placed→notified p99 ≤ 10 ms at 1,000/s and ≤ 25 ms at 5,000/s
    #[arg(long, value_delimiter = ',', default_values_t = [1000.0, 5000.0], value_name = "R[,R…]")]
    rate: Vec<f64>,
    /// Events left waiting for the stopped notifier
    #[arg(long, default_value_t = 1_000_000)]
    backlog: u64,
    /// A smoke run: 3 s measurements and a 20,000-event backlog (not figures for the record)
    #[arg(long)]
    quick: bool,
    /// Send the receiver's orders over one PlaceOrders stream (`orderflow load --bulk`) instead of
    /// one call each; the echo baseline stays one call per order
    #[arg(long)]
    bulk: bool,
    /// Partitions of the scaled-out pipeline (phase 7)
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    scaled_partitions: u32,
    /// Replicas of every stage in the scaled-out pipeline (phase 7), at most its partitions
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=8))]
    scaled_replicas: u32,
    /// Where the JSON results go
    #[arg(long, default_value = "target/bench/results.json")]
    out: PathBuf,
    #[command(subcommand)]
    command: Option<Internal>,
}

#[derive(Subcommand, Debug)]
enum Internal {
    /// The baseline server (started by the benchmark itself)
    EchoServer {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
    },
}

/// `PlaceOrder` answered at once: tonic, prost and HTTP/2 with no work behind them.
struct Echo;

#[tonic::async_trait]
impl OrderReceiver for Echo {
    async fn place_order(
        &self,
        request: Request<PlaceOrderRequest>,
    ) -> Result<Response<PlaceOrderResponse>, Status> {
        let request = request.into_inner();
        Ok(Response::new(PlaceOrderResponse {
            order_id: format!("{:032x}", request.lines.len()),
            status: OrderStatus::Accepted.into(),
            offset: 0,
            replayed: false,
        }))
    }

    async fn get_order(
        &self,
        _: Request<GetOrderRequest>,
    ) -> Result<Response<GetOrderResponse>, Status> {
        Err(Status::unimplemented("echo server"))
    }

    type PlaceOrdersStream =
        Pin<Box<dyn Stream<Item = Result<PlaceOrdersResponse, Status>> + Send>>;

    async fn place_orders(
        &self,
        request: Request<Streaming<PlaceOrderRequest>>,
    ) -> Result<Response<Self::PlaceOrdersStream>, Status> {
        let mut next = 0u64;
        let answers = request.into_inner().map(move |request| {
            let index = next;
            next += 1;
            request.map(|request| PlaceOrdersResponse {
                index,
                result: Some(place_orders_response::Result::Accepted(
                    PlaceOrderResponse {
                        order_id: format!("{:032x}", request.lines.len()),
                        status: OrderStatus::Accepted.into(),
                        offset: 0,
                        replayed: false,
                    },
                )),
            })
        });
        Ok(Response::new(Box::pin(answers)))
    }

    type WatchOrderStream = tokio_stream::Empty<Result<orderflow_proto::v1::Order, Status>>;

    async fn watch_order(
        &self,
        _: Request<WatchOrderRequest>,
    ) -> Result<Response<Self::WatchOrderStream>, Status> {
        Err(Status::unimplemented("echo server"))
    }
}

async fn echo_server(listen: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    println!("orderflow-bench listening on {}", listener.local_addr()?);
    tonic::transport::Server::builder()
        .add_service(OrderReceiverServer::new(Echo))
        .serve_with_incoming(TcpListenerStream::new(listener))
        .await?;
    Ok(())
}

/// One server process of the run.
struct Proc {
    name: String,
    child: Child,
    addr: SocketAddr,
}

impl Proc {
    /// Starts `binary args…` with its stderr in `log`, and waits for `… listening on <addr>`.
    async fn start(
        name: &str,
        binary: &Path,
        args: &[String],
        env: &[(String, String)],
        log: &Path,
    ) -> anyhow::Result<Proc> {
        let mut child = Command::new(binary)
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped())
            .stderr(Stdio::from(std::fs::File::create(log)?))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
        loop {
            let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
                .await
                .with_context(|| format!("{name} did not start"))??
                .with_context(|| format!("{name} exited; see {}", log.display()))?;
            if let Some((_, addr)) = line.split_once(" listening on ") {
                let addr = addr.parse()?;
                // Keep reading stdout so the process never blocks on a full pipe.
                tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
                return Ok(Proc {
                    name: name.to_owned(),
                    child,
                    addr,
                });
            }
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// CPU time (user + system) the process has used so far.
    fn cpu(&self) -> Option<Duration> {
        let pid = self.child.id()?;
        process_cpu(&format!("/proc/{pid}/stat"))
    }

    /// Peak resident set size so far (VmHWM), in MiB.
    fn peak_rss_mib(&self) -> Option<f64> {
        let pid = self.child.id()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let kib: f64 = status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()?;
        Some(kib / 1024.0)
    }

    /// Resets the process's peak RSS to what it holds now (`5` to `/proc/<pid>/clear_refs`), so
    /// that the next [`Proc::peak_rss_mib`] covers only what follows.
    fn reset_peak_rss(&self) -> anyhow::Result<()> {
        let pid = self.child.id().context("the process has exited")?;
        std::fs::write(format!("/proc/{pid}/clear_refs"), "5")
            .with_context(|| format!("cannot reset the peak RSS of process {pid}"))
    }

    /// SIGTERM, then waits for the exit.
    async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        match tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await {
            Ok(status) => {
                status?;
            }
            Err(_) => {
                eprintln!("{} did not stop in 30 s; killing it", self.name);
                self.child.kill().await?;
            }
        }
        Ok(())
    }
}

/// (utime + stime) of the process whose `/proc/<pid>/stat` is at `path`.
fn process_cpu(path: &str) -> Option<Duration> {
    let stat = std::fs::read_to_string(path).ok()?;
    // The command name may hold spaces and parentheses: fields count from after its last ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // Fields 14 and 15 of proc_pid_stat(5); after the ')' the state is field 3.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|t| *t > 0)? as u64;
    Some(Duration::from_nanos(
        (utime + stime).saturating_mul(1_000_000_000) / ticks,
    ))
}

/// CPU time (user + system) of every child this process has waited for.
fn children_cpu() -> Duration {
    nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN).map_or(
        Duration::ZERO,
        |usage| {
            let tv = |t: nix::sys::time::TimeVal| {
                Duration::from_secs(t.tv_sec().max(0) as u64)
                    + Duration::from_micros(t.tv_usec().max(0) as u64)
            };
            tv(usage.user_time()) + tv(usage.system_time())
        },
    )
}

/// Runs `orderflow load` against `servers` and adds the CPU each of them, and the load client,
/// spent per order (µs) to its summary as `cpu_us_per_order`.
async fn load_measured(
    orderflow: &Path,
    receiver: &str,
    notifier: Option<&str>,
    shape: &[String],
    servers: &[&Proc],
    per: &str,
) -> anyhow::Result<Value> {
    let before: Vec<Option<Duration>> = servers.iter().map(|p| p.cpu()).collect();
    let client_before = children_cpu();
    let mut summary = load(orderflow, receiver, notifier, shape).await?;
    let client = children_cpu().saturating_sub(client_before);
    let orders = get(&summary, &[per]);
    let per_order = |cpu: Duration| cpu.as_secs_f64() * 1e6 / orders;
    let mut cpu = serde_json::Map::new();
    let mut servers_total = 0.0;
    for (proc, before) in servers.iter().zip(before) {
        if let (Some(before), Some(after)) = (before, proc.cpu()) {
            let us = per_order(after.saturating_sub(before));
            servers_total += us;
            cpu.insert(proc.name.clone(), json!(us));
        }
    }
    cpu.insert("servers".into(), json!(servers_total));
    cpu.insert("client".into(), json!(per_order(client)));
    summary["cpu_us_per_order"] = Value::Object(cpu);
    Ok(summary)
}

/// Runs `orderflow load --json` and returns its summary.
async fn load(
    orderflow: &Path,
    receiver: &str,
    notifier: Option<&str>,
    shape: &[String],
) -> anyhow::Result<Value> {
    let mut command = Command::new(orderflow);
    command.args(["--receiver", receiver]);
    if let Some(notifier) = notifier {
        command.args(["--notifier", notifier]);
    }
    command.arg("load").args(shape).arg("--json");
    if notifier.is_none() {
        command.arg("--no-notified");
    }
    let output = command.stdin(Stdio::null()).output().await?;
    if !output.status.success() {
        bail!(
            "orderflow load failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(serde_json::from_slice(&output.stdout)?)
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

/// `(head, acked offset of consumer)` of a stage's log.
async fn log_position(url: &str, consumer: &str) -> anyhow::Result<(u64, u64)> {
    let mut log = EventLogClient::connect(url.to_owned()).await?;
    let head = log.head(HeadRequest::default()).await?.into_inner();
    let acked = head
        .consumers
        .iter()
        .find(|c| c.consumer == consumer)
        .map_or(0, |c| c.acked_offset);
    Ok((head.next_offset, acked))
}

/// Builds the release binaries the run starts.
fn build() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("executable directory")?.to_owned();
    let profile = dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("release");
    if profile != "release" {
        eprintln!("warning: not a release build; run `cargo run --release -p orderflow-bench`");
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace")?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let profile = if profile == "debug" { "dev" } else { profile };
    let status = std::process::Command::new(cargo)
        .current_dir(workspace)
        .args(["build", "--quiet", "--bins", "--profile", profile])
        .args(["-p", "orderflow-receiver", "-p", "orderflow-stock"])
        .args(["-p", "orderflow-invoice", "-p", "orderflow-notifier"])
        .args(["-p", "orderflow-cli"])
        .status()?;
    if !status.success() {
        bail!("building the binaries failed");
    }
    Ok(dir)
}

/// A catalog with stock that never runs out during the run.
fn bench_catalog(path: &Path) -> anyhow::Result<()> {
    let mut toml = String::new();
    for (i, price) in [8900, 2450, 12900, 990, 5900, 1500, 3300, 700]
        .iter()
        .enumerate()
    {
        toml.push_str(&format!(
            "[[items]]\nsku = \"SKU-{i}\"\nname = \"Item {i}\"\nunit_price_minor = {price}\n\
             currency = \"EUR\"\navailable = 1000000000000\n\n"
        ));
    }
    std::fs::write(path, toml)?;
    Ok(())
}

const SKUS: &str = "SKU-0,SKU-1,SKU-2,SKU-3,SKU-4,SKU-5,SKU-6,SKU-7";

/// The customer of every order `orderflow load --customers 1` places.
const ONE_CUSTOMER: &str = "load-0";

/// A sku of the bench catalog in [`ONE_CUSTOMER`]'s home shard of `partitions` (`across` false)
/// or in another shard (`across` true); `None` if there is no such sku (one partition has no
/// other shard).
fn shard_sku(partitions: u32, across: bool) -> Option<String> {
    let home = orderflow_runtime::home_partition(ONE_CUSTOMER, partitions);
    SKUS.split(',')
        .find(|sku| (orderflow_runtime::home_partition(sku, partitions) != home) == across)
        .map(str::to_owned)
}

/// The four stages, started in order, each with its own data dir and fsync'd store.
struct Pipeline {
    receiver: Proc,
    stock: Proc,
    invoice: Proc,
    notifier: Option<Proc>,
    notifier_args: Vec<String>,
    env: Vec<(String, String)>,
    bin: PathBuf,
    dir: PathBuf,
}

impl Pipeline {
    async fn start(bin: &Path, dir: &Path, env: Vec<(String, String)>) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let catalog = dir.join("catalog.toml");
        bench_catalog(&catalog)?;
        let ports = orderflow_e2e::free_ports::<4>();
        let url = |i: usize| format!("http://127.0.0.1:{}", ports[i]);
        let listen = |i: usize| format!("127.0.0.1:{}", ports[i]);
        let common = |name: &str, port: usize| {
            args(&[
                "--listen",
                &listen(port),
                "--data-dir",
                &dir.join(name).to_string_lossy(),
                "--metrics-listen",
                "none",
            ])
        };
        let stage = |name: &str| bin.join(format!("orderflow-{name}"));
        let log = |name: &str| dir.join(format!("{name}.log"));
        let mut receiver_args = common("receiver", 0);
        receiver_args.extend(args(&[
            "--http-listen",
            "none",
            "--max-backlog",
            "100000000",
            "--stock-url",
            &url(1),
            "--invoice-url",
            &url(2),
            "--notifier-url",
            &url(3),
        ]));
        let receiver = Proc::start(
            "receiver",
            &stage("receiver"),
            &receiver_args,
            &env,
            &log("receiver"),
        )
        .await?;
        let mut stock_args = common("stock", 1);
        stock_args.extend(args(&[
            "--upstream",
            &url(0),
            "--invoice-url",
            &url(2),
            "--catalog",
            &catalog.to_string_lossy(),
        ]));
        let stock = Proc::start("stock", &stage("stock"), &stock_args, &env, &log("stock")).await?;
        let mut invoice_args = common("invoice", 2);
        invoice_args.extend(args(&["--upstream", &url(1), "--tax-rate-bps", "2000"]));
        let invoice = Proc::start(
            "invoice",
            &stage("invoice"),
            &invoice_args,
            &env,
            &log("invoice"),
        )
        .await?;
        let mut notifier_args = common("notifier", 3);
        notifier_args.extend(args(&["--upstream", &url(2)]));
        let mut pipeline = Pipeline {
            receiver,
            stock,
            invoice,
            notifier: None,
            notifier_args,
            env,
            bin: bin.to_owned(),
            dir: dir.to_owned(),
        };
        pipeline.start_notifier().await?;
        Ok(pipeline)
    }

    async fn start_notifier(&mut self) -> anyhow::Result<()> {
        let n = std::fs::read_dir(&self.dir)?.count();
        self.notifier = Some(
            Proc::start(
                "notifier",
                &self.bin.join("orderflow-notifier"),
                &self.notifier_args,
                &self.env,
                &self.dir.join(format!("notifier-{n}.log")),
            )
            .await?,
        );
        Ok(())
    }

    fn notifier_url(&self) -> Option<String> {
        self.notifier.as_ref().map(Proc::url)
    }

    async fn stop(self) -> anyhow::Result<()> {
        if let Some(notifier) = self.notifier {
            notifier.stop().await?;
        }
        self.invoice.stop().await?;
        self.stock.stop().await?;
        self.receiver.stop().await
    }
}

/// The four stages scaled out: every stage `replicas` processes over `partitions` partitions, each
/// replica with its own data dir and fsync'd stores, knowing its peers and the other stages'
/// replicas by list.
struct Scaled {
    /// Every process, stage by stage in pipeline order.
    procs: Vec<Proc>,
    /// The notifier replicas' URLs, comma-separated, in replica order.
    notifiers: String,
}

impl Scaled {
    async fn start(
        bin: &Path,
        dir: &Path,
        env: &[(String, String)],
        partitions: u32,
        replicas: u32,
    ) -> anyhow::Result<Self> {
        if replicas > partitions {
            bail!("--scaled-replicas {replicas} exceeds --scaled-partitions {partitions}");
        }
        std::fs::create_dir_all(dir)?;
        let catalog = dir.join("catalog.toml");
        bench_catalog(&catalog)?;
        let ports = orderflow_e2e::free_ports::<32>();
        let n = replicas as usize;
        // Stage s's replica r listens on ports[s * n + r].
        let urls = |stage: usize| {
            ports[stage * n..(stage + 1) * n]
                .iter()
                .map(|port| format!("http://127.0.0.1:{port}"))
                .collect::<Vec<_>>()
                .join(",")
        };
        let stages = ["receiver", "stock", "invoice", "notifier"];
        let mut procs = Vec::new();
        for (s, stage) in stages.iter().enumerate() {
            let links = match *stage {
                "receiver" => args(&[
                    "--http-listen",
                    "none",
                    "--max-backlog",
                    "100000000",
                    "--stock-url",
                    &urls(1),
                    "--invoice-url",
                    &urls(2),
                    "--notifier-url",
                    &urls(3),
                ]),
                "stock" => args(&[
                    "--upstream",
                    &urls(0),
                    "--invoice-url",
                    &urls(2),
                    "--catalog",
                    &catalog.to_string_lossy(),
                ]),
                "invoice" => args(&["--upstream", &urls(1), "--tax-rate-bps", "2000"]),
                _ => args(&["--upstream", &urls(2)]),
            };
            for replica in 0..n {
                let name = format!("{stage}-{replica}");
                let mut stage_args = args(&[
                    "--listen",
                    &format!("127.0.0.1:{}", ports[s * n + replica]),
                    "--data-dir",
                    &dir.join(&name).to_string_lossy(),
                    "--metrics-listen",
                    "none",
                    "--partitions",
                    &partitions.to_string(),
                    "--replicas",
                    &replicas.to_string(),
                    "--replica",
                    &replica.to_string(),
                    "--peers",
                    &urls(s),
                ]);
                stage_args.extend(links.iter().cloned());
                let binary = bin.join(format!("orderflow-{stage}"));
                let log = dir.join(format!("{name}.log"));
                procs.push(Proc::start(&name, &binary, &stage_args, env, &log).await?);
            }
        }
        Ok(Scaled {
            procs,
            notifiers: urls(3),
        })
    }

    async fn stop(self) -> anyhow::Result<()> {
        for proc in self.procs.into_iter().rev() {
            proc.stop().await?;
        }
        Ok(())
    }
}

fn get(v: &Value, path: &[&str]) -> f64 {
    let mut v = v;
    for key in path {
        v = &v[*key];
    }
    v.as_f64().unwrap_or(f64::NAN)
}

async fn run(mut a: Args) -> anyhow::Result<()> {
    if a.quick {
        a.duration = Duration::from_secs(3);
        a.backlog = a.backlog.min(20_000);
    }
    let bin = build()?;
    let orderflow = bin.join("orderflow");
    let work = bin.join("bench-run");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let duration = format!("{}s", a.duration.as_secs().max(1));
    let concurrency = a.concurrency.to_string();
    let closed = args(&[
        "--concurrency",
        &concurrency,
        "--duration",
        &duration,
        "--skus",
        SKUS,
    ]);
    // The receiver's load: the same, over a PlaceOrders stream with --bulk.
    let mut orders = closed.clone();
    if a.bulk {
        orders.push("--bulk".into());
    }
    let mut results = BTreeMap::new();
    let machine = machine();
    eprintln!("machine: {machine}");

    // 1. The baseline.
    eprintln!("1/7 echo baseline ({concurrency} in flight, {duration})");
    let echo = Proc::start(
        "echo",
        &std::env::current_exe()?,
        &args(&["echo-server"]),
        &[],
        &work.join("echo.log"),
    )
    .await?;
    let echo_run =
        load_measured(&orderflow, &echo.url(), None, &closed, &[&echo], "accepted").await?;
    echo.stop().await?;
    let baseline = get(&echo_run, &["accepted_per_second"]);
    results.insert("echo", echo_run);

    // 2. PlaceOrder alone.
    eprintln!("2/7 PlaceOrder throughput, receiver alone");
    let dir = work.join("intake");
    std::fs::create_dir_all(&dir)?;
    let receiver = Proc::start(
        "receiver",
        &bin.join("orderflow-receiver"),
        &args(&[
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            &dir.join("receiver").to_string_lossy(),
            "--metrics-listen",
            "none",
            "--http-listen",
            "none",
            "--max-backlog",
            "1000000000",
            "--stock-url",
            "none",
            "--invoice-url",
            "none",
            "--notifier-url",
            "none",
        ]),
        &[],
        &dir.join("receiver.log"),
    )
    .await?;
    let intake = load_measured(
        &orderflow,
        &receiver.url(),
        None,
        &orders,
        &[&receiver],
        "accepted",
    )
    .await?;
    receiver.stop().await?;
    results.insert("place_order", intake);

    // 3.–6. The pipeline, tracing at 1 % to a live OTLP receiver.
    let spans = Arc::new(AtomicU64::new(0));
    let counted = spans.clone();
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let otlp_addr = listener.local_addr()?;
    let shutdown = CancellationToken::new();
    tokio::spawn(otlp::serve(
        listener,
        Arc::new(move |batch: Vec<otlp::ReceivedSpan>| {
            counted.fetch_add(batch.len() as u64, Ordering::Relaxed);
        }),
        shutdown.clone(),
    ));
    let env = vec![
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT".to_owned(),
            format!("http://{otlp_addr}"),
        ),
        (
            "OTEL_TRACES_SAMPLER".into(),
            "parentbased_traceidratio".into(),
        ),
        ("OTEL_TRACES_SAMPLER_ARG".into(), "0.01".into()),
        ("RUST_LOG".into(), "info".into()),
    ];
    let mut pipeline = Pipeline::start(&bin, &work.join("pipeline"), env.clone()).await?;
    eprintln!("3/7 end to end, accepted → notified ({concurrency} in flight, {duration})");
    let e2e = {
        let p = &pipeline;
        let stages = [&p.receiver, &p.stock, &p.invoice];
        let mut stages = stages.to_vec();
        stages.extend(p.notifier.as_ref());
        load_measured(
            &orderflow,
            &p.receiver.url(),
            p.notifier_url().as_deref(),
            &orders,
            &stages,
            "notified",
        )
        .await?
    };
    results.insert("end_to_end", e2e);

    let rates: Vec<String> = a.rate.iter().map(f64::to_string).collect();
    eprintln!(
        "4/7 latency at {} orders/s (open loop, {duration} each)",
        rates.join(" and ")
    );
    // Open loop at each rate, with CPU per order: at a fixed rate it compares layouts (phase 7)
    // at the same load, where batches are as full in both.
    let at_rate = |rate: &str| {
        args(&["--rate", rate, "--duration", &duration, "--skus", SKUS])
            .into_iter()
            .chain(a.bulk.then(|| "--bulk".to_owned()))
            .collect::<Vec<_>>()
    };
    let mut fixed = serde_json::Map::new();
    for rate in &rates {
        let p = &pipeline;
        let mut stages = vec![&p.receiver, &p.stock, &p.invoice];
        stages.extend(p.notifier.as_ref());
        let measured = load_measured(
            &orderflow,
            &p.receiver.url(),
            p.notifier_url().as_deref(),
            &at_rate(rate),
            &stages,
            "notified",
        )
        .await?;
        fixed.insert(rate.clone(), measured);
    }
    results.insert("fixed_rate", Value::Object(fixed));

    eprintln!(
        "5/7 backlog of {} events with the notifier stopped",
        a.backlog
    );
    let loaded_rss = json!({
        "receiver_mib": pipeline.receiver.peak_rss_mib(),
        "stock_mib": pipeline.stock.peak_rss_mib(),
        "invoice_mib": pipeline.invoice.peak_rss_mib(),
        "notifier_mib": pipeline.notifier.as_ref().and_then(Proc::peak_rss_mib),
    });
    results.insert("loaded_rss", loaded_rss);
    for stage in [&pipeline.receiver, &pipeline.stock, &pipeline.invoice] {
        stage.reset_peak_rss()?;
    }
    // The notifier starts again for the catch-up: its peak is that run's alone.
    if let Some(notifier) = pipeline.notifier.take() {
        notifier.stop().await?;
    }
    let invoice_url = pipeline.invoice.url();
    let (head_before, _) = log_position(&invoice_url, "notifier").await?;
    let backlog_orders = a.backlog.to_string();
    let filled = load(
        &orderflow,
        &pipeline.receiver.url(),
        None,
        &args(&[
            "--concurrency",
            &concurrency,
            "--orders",
            &backlog_orders,
            "--duration",
            "1h",
            "--skus",
            SKUS,
        ]),
    )
    .await?;
    // Wait until the invoice stage has priced and paid for all of them.
    let deadline = Instant::now() + Duration::from_secs(1800);
    let (head, acked) = loop {
        let (head, acked) = log_position(&invoice_url, "notifier").await?;
        if head - head_before >= a.backlog || Instant::now() > deadline {
            break (head, acked);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let backlog = head - acked;
    let rss = json!({
        "receiver_mib": pipeline.receiver.peak_rss_mib(),
        "stock_mib": pipeline.stock.peak_rss_mib(),
        "invoice_mib": pipeline.invoice.peak_rss_mib(),
        "backlog_events": backlog,
        "fill": filled,
    });

    eprintln!("6/7 catch-up of {backlog} events");
    let started = Instant::now();
    let receiver_cpu_before = pipeline.receiver.cpu();
    pipeline.start_notifier().await?;
    loop {
        let (_, acked_now) = log_position(&invoice_url, "notifier").await?;
        if acked_now >= head {
            break;
        }
        if started.elapsed() > Duration::from_secs(1800) {
            bail!("the notifier did not catch up in 30 min");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = started.elapsed().as_secs_f64();
    // CPU per event of the catch-up: the notifier's since it started, and the receiver's, whose
    // progress view follows the notifier's log (nothing else loads it meanwhile). Steadier than
    // the rate on a shared machine.
    let per_event =
        |cpu: Option<Duration>| cpu.map(|cpu| cpu.as_secs_f64() * 1e6 / backlog.max(1) as f64);
    let catch_up_cpu = json!({
        "notifier": per_event(pipeline.notifier.as_ref().and_then(Proc::cpu)),
        "receiver": per_event(
            pipeline
                .receiver
                .cpu()
                .zip(receiver_cpu_before)
                .map(|(after, before)| after.saturating_sub(before))
        ),
    });
    let notifier_rss = pipeline.notifier.as_ref().and_then(Proc::peak_rss_mib);
    let mut rss = rss;
    rss["notifier_mib"] = json!(notifier_rss);
    results.insert("backlog_rss", rss);
    results.insert(
        "catch_up",
        json!({
            "events": backlog,
            "seconds": took,
            "events_per_second": backlog as f64 / took,
            "cpu_us_per_event": catch_up_cpu,
        }),
    );
    pipeline.stop().await?;

    // 7. The same end-to-end load on the pipeline scaled out.
    let (partitions, replicas) = (a.scaled_partitions, a.scaled_replicas);
    eprintln!(
        "7/7 end to end over {partitions} partitions, {replicas} replicas per stage \
         ({concurrency} in flight, {duration})"
    );
    let scaled = Scaled::start(&bin, &work.join("scaled"), &env, partitions, replicas).await?;
    let procs: Vec<&Proc> = scaled.procs.iter().collect();
    let measure = async |shape: &[String]| -> anyhow::Result<Value> {
        let mut run = load_measured(
            &orderflow,
            &scaled.procs[0].url(),
            Some(&scaled.notifiers),
            shape,
            &procs,
            "notified",
        )
        .await?;
        // Each stage's CPU per order, its replicas summed.
        for stage in ["receiver", "stock", "invoice", "notifier"] {
            let cpu = &run["cpu_us_per_order"];
            let sum: f64 = (0..replicas)
                .map(|r| get(cpu, &[&format!("{stage}-{r}")]))
                .sum();
            run["cpu_us_per_order"][stage] = json!(sum);
        }
        Ok(run)
    };
    let mut scaled_run = measure(&orders).await?;
    let mut fixed = serde_json::Map::new();
    for rate in &rates {
        fixed.insert(rate.clone(), measure(&at_rate(rate)).await?);
    }
    scaled_run["fixed_rate"] = Value::Object(fixed);
    // What an order across stock shards costs the stock stage, against one within its customer's
    // home shard: one customer, one line, its sku in that shard or in another, closed loop each.
    let mut shards = serde_json::Map::new();
    for (name, across) in [("home_shard", false), ("other_shard", true)] {
        let Some(sku) = shard_sku(partitions, across) else {
            continue;
        };
        let shape: Vec<String> = args(&[
            "--concurrency",
            &concurrency,
            "--duration",
            &duration,
            "--customers",
            "1",
            "--lines",
            "1",
            "--skus",
            &sku,
        ])
        .into_iter()
        .chain(a.bulk.then(|| "--bulk".to_owned()))
        .collect();
        let run = measure(&shape).await?;
        shards.insert(
            name.into(),
            json!({
                "sku": sku,
                "notified_per_second": get(&run, &["notified_per_second"]),
                "stock_cpu_us_per_order": get(&run, &["cpu_us_per_order", "stock"]),
            }),
        );
    }
    scaled_run["shards"] = Value::Object(shards);
    scaled_run["partitions"] = json!(partitions);
    scaled_run["replicas"] = json!(replicas);
    results.insert("scaled_out", scaled_run);
    scaled.stop().await?;

    tokio::time::sleep(Duration::from_secs(1)).await;
    shutdown.cancel();
    results.insert("spans_exported", json!(spans.load(Ordering::Relaxed)));

    let report = json!({
        "machine": machine,
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "unix_time": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs(),
        "concurrency": a.concurrency,
        "duration_s": a.duration.as_secs(),
        "rate": a.rate,
        "results": results,
    });
    print!("{}", table(&report, baseline));
    if let Some(parent) = a.out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&a.out, serde_json::to_string_pretty(&report)?)?;
    eprintln!("results written to {}", a.out.display());
    Ok(())
}

/// CPU model and count, for the record.
fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown CPU", |(_, m)| m.trim())
        .to_owned();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cores} × {model}")
}

/// The results table: each figure, its ratio to the baseline where that means something, and the
/// target.
fn table(report: &Value, baseline: f64) -> String {
    let r = &report["results"];
    let ms = |us: f64| format!("{:.2} ms", us / 1000.0);
    let ratio = |v: f64| format!("{:.2} ×", v / baseline);
    let mut rows: Vec<[String; 4]> = vec![
        [
            "echo baseline (req/s)".into(),
            format!("{:.0}", baseline),
            "1.00 ×".into(),
            String::new(),
        ],
        [
            "PlaceOrder accepted (orders/s)".into(),
            format!("{:.0}", get(r, &["place_order", "accepted_per_second"])),
            ratio(get(r, &["place_order", "accepted_per_second"])),
            String::new(),
        ],
        [
            "end to end notified (orders/s)".into(),
            format!("{:.0}", get(r, &["end_to_end", "notified_per_second"])),
            ratio(get(r, &["end_to_end", "notified_per_second"])),
            "≥ 0.40 ×".into(),
        ],
    ];
    // One pair of latency rows per fixed rate, in the order they ran.
    let rates = report["rate"].as_array().cloned().unwrap_or_default();
    for rate in rates.iter().filter_map(Value::as_f64) {
        let key = rate.to_string();
        let target = match rate as u64 {
            1000 => "≤ 10 ms",
            5000 => "≤ 25 ms",
            _ => "",
        };
        rows.push([
            format!("PlaceOrder p99 at {key}/s"),
            ms(get(r, &["fixed_rate", &key, "accept_latency_us", "p99"])),
            String::new(),
            "≤ 2 ms".into(),
        ]);
        rows.push([
            format!("placed→notified p99 at {key}/s"),
            ms(get(
                r,
                &["fixed_rate", &key, "placed_to_notified_us", "p99"],
            )),
            String::new(),
            target.into(),
        ]);
        // The load client's own share of both: how late it sent (its timer wakes on whole ms).
        rows.push([
            "  the load client sent late, p99".into(),
            ms(get(r, &["fixed_rate", &key, "send_lateness_us", "p99"])),
            String::new(),
            String::new(),
        ]);
    }
    for stage in ["receiver", "stock", "invoice", "notifier"] {
        rows.push([
            format!("{stage} peak RSS, full load"),
            format!(
                "{:.0} MiB",
                get(r, &["loaded_rss", &format!("{stage}_mib")])
            ),
            String::new(),
            String::new(),
        ]);
        rows.push([
            format!("{stage} peak RSS, backlog"),
            format!(
                "{:.0} MiB",
                get(r, &["backlog_rss", &format!("{stage}_mib")])
            ),
            String::new(),
            "≤ 64 MiB".into(),
        ]);
    }
    // CPU per order, against the echo call's total (server + client) in the same run.
    let echo_call = get(r, &["echo", "cpu_us_per_order", "echo"])
        + get(r, &["echo", "cpu_us_per_order", "client"]);
    let us = |v: f64| format!("{v:.1} µs");
    let of_echo = |v: f64| format!("{:.2} ×", v / echo_call);
    rows.push([
        "echo call CPU (server + client)".into(),
        us(echo_call),
        "1.00 ×".into(),
        String::new(),
    ]);
    for (row, path, target) in [
        ("echo server CPU per call", ["echo", "echo"], ""),
        ("load client CPU per call (echo)", ["echo", "client"], ""),
        (
            "receiver alone CPU per order",
            ["place_order", "receiver"],
            "",
        ),
        (
            "stages CPU per order, end to end",
            ["end_to_end", "servers"],
            "≤ 3.00 ×",
        ),
        ("  receiver", ["end_to_end", "receiver"], "≤ 1.00 ×"),
        ("  stock", ["end_to_end", "stock"], "≤ 1.00 ×"),
        ("  invoice", ["end_to_end", "invoice"], "≤ 1.00 ×"),
        ("  notifier", ["end_to_end", "notifier"], "≤ 1.00 ×"),
        ("load client CPU per order", ["end_to_end", "client"], ""),
    ] {
        let v = get(r, &[path[0], "cpu_us_per_order", path[1]]);
        rows.push([row.into(), us(v), of_echo(v), target.into()]);
    }
    let scaled = &r["scaled_out"];
    let layout = format!(
        "{} partitions × {} replicas",
        get(scaled, &["partitions"]),
        get(scaled, &["replicas"])
    );
    rows.push([
        format!("scaled out, {layout} (orders/s)"),
        format!("{:.0}", get(scaled, &["notified_per_second"])),
        ratio(get(scaled, &["notified_per_second"])),
        String::new(),
    ]);
    for (row, stage) in [
        ("  stages CPU per order, scaled out", "servers"),
        ("  receiver", "receiver"),
        ("  stock", "stock"),
        ("  invoice", "invoice"),
        ("  notifier", "notifier"),
    ] {
        let v = get(scaled, &["cpu_us_per_order", stage]);
        rows.push([row.into(), us(v), of_echo(v), String::new()]);
    }
    for (row, name) in [
        ("  stock per order, sku in home shard", "home_shard"),
        ("  stock per order, sku in other shard", "other_shard"),
    ] {
        if scaled["shards"].get(name).is_some() {
            let v = get(scaled, &["shards", name, "stock_cpu_us_per_order"]);
            rows.push([row.into(), us(v), of_echo(v), String::new()]);
        }
    }
    // CPU per order at each fixed rate, one partition against scaled out: the same load, so
    // batches as full in both.
    for rate in rates.iter().filter_map(Value::as_f64) {
        let key = rate.to_string();
        for (row, run) in [
            (
                format!("stages CPU per order at {key}/s"),
                &r["fixed_rate"][&key],
            ),
            (
                format!("  scaled out, at {key}/s"),
                &scaled["fixed_rate"][&key],
            ),
        ] {
            let v = get(run, &["cpu_us_per_order", "servers"]);
            rows.push([row, us(v), of_echo(v), String::new()]);
        }
    }
    rows.push([
        "catch-up (events/s)".into(),
        format!("{:.0}", get(r, &["catch_up", "events_per_second"])),
        ratio(get(r, &["catch_up", "events_per_second"])),
        "≥ 100000".into(),
    ]);
    for stage in ["notifier", "receiver"] {
        rows.push([
            format!("  {stage} CPU per event, catch-up"),
            us(get(r, &["catch_up", "cpu_us_per_event", stage])),
            String::new(),
            String::new(),
        ]);
    }
    let mut out = format!(
        "\n{:<36} {:>14} {:>10} {:>10}\n",
        "figure", "value", "÷ echo", "target"
    );
    for [a, b, c, d] in rows {
        out.push_str(&format!("{a:<36} {b:>14} {c:>10} {d:>10}\n"));
    }
    out
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let result = match args.command {
        Some(Internal::EchoServer { listen }) => echo_server(listen).await,
        None => run(args).await,
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used)]
    use super::*;

    #[test]
    fn cpu_time_is_read_from_proc_and_grows_with_work() {
        let before = process_cpu("/proc/self/stat").expect("/proc/self/stat parses");
        // Spin until the kernel has counted 30 ms more (ticks are 10 ms), or give up after 10 s.
        let started = Instant::now();
        let mut x = 0u64;
        let mut after = before;
        while after < before + Duration::from_millis(30)
            && started.elapsed() < Duration::from_secs(10)
        {
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
            }
            after = process_cpu("/proc/self/stat").expect("/proc/self/stat parses");
        }
        assert!(
            after >= before + Duration::from_millis(30),
            "{before:?} → {after:?} after {:?} of spinning",
            started.elapsed()
        );
        assert_eq!(process_cpu("/proc/self/no-such-file"), None);
    }

    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        Args::command().debug_assert();
    }

    #[test]
    fn the_shard_skus_lie_in_and_outside_the_customers_home_shard() {
        let home = orderflow_runtime::home_partition(ONE_CUSTOMER, 4);
        let within = shard_sku(4, false).expect("a bench sku in load-0's home shard of 4");
        let across = shard_sku(4, true).expect("a bench sku in another shard of 4");
        assert_eq!(orderflow_runtime::home_partition(&within, 4), home);
        assert_ne!(orderflow_runtime::home_partition(&across, 4), home);
        // One partition has no other shard.
        assert_eq!(shard_sku(1, true), None);
        assert!(shard_sku(1, false).is_some());
    }
}
