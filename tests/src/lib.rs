//! Test harness for orderflow's end-to-end tests: starts the real stage binaries on `127.0.0.1:0`
//! with temporary data directories, talks gRPC to them, and kills or restarts them.
//!
//! The binaries are built on first use with the same cargo and profile as the tests, so
//! `cargo nextest run --workspace` (or `cargo test`) needs no separate build step.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    sync::OnceLock,
    time::Duration,
};

use anyhow::{Context, bail};
use futures::{StreamExt, stream};
use nix::{sys::signal, unistd::Pid};
use orderflow_proto::v1::{
    GetOrderRequest, HeadRequest, Invoice, ListInvoicesRequest, ListNotificationsRequest,
    ListStockRequest, Notification, OrderLine, PlaceOrderRequest, StockItem,
    event_log_client::EventLogClient, invoice_creator_client::InvoiceCreatorClient,
    notifier_client::NotifierClient, order_receiver_client::OrderReceiverClient,
    stock_checker_client::StockCheckerClient,
};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};
use tonic::transport::Channel;

/// The four stages, upstream first.
pub const STAGES: [&str; 4] = ["receiver", "stock", "invoice", "notifier"];

/// Directory holding the workspace's binaries for the profile these tests were built with.
fn bin_dir() -> PathBuf {
    // target/<profile>/deps/<test-binary>
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent()
        .and_then(Path::parent)
        .expect("test executable lives in target/<profile>/deps")
        .to_owned()
}

/// Path of a workspace binary (`orderflow`, `orderflow-receiver`, …), built on first use.
pub fn binary(name: &str) -> PathBuf {
    ensure_built().join(name)
}

/// Builds the stage binaries and the CLI once per test process.
fn ensure_built() -> &'static PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let dir = bin_dir();
        let profile = dir.file_name().and_then(|n| n.to_str()).unwrap_or("debug");
        let profile = if profile == "debug" { "dev" } else { profile };
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let status = std::process::Command::new(cargo)
            .current_dir(workspace)
            .args(["build", "--quiet", "--bins", "--profile", profile])
            .args(
                STAGES
                    .iter()
                    .flat_map(|s| ["-p".to_owned(), format!("orderflow-{s}")]),
            )
            .args(["-p", "orderflow-cli"])
            .env("CARGO_TARGET_DIR", dir.parent().unwrap())
            .status()
            .expect("running cargo build for the stage binaries");
        assert!(status.success(), "building the stage binaries failed");
        dir
    })
}

/// One running (or stopped) stage process.
pub struct Stage {
    pub name: &'static str,
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    extra_args: Vec<String>,
    child: Option<Child>,
    starts: u32,
}

impl Stage {
    /// Starts `orderflow-<name>` on `listen` with `data_dir` and `extra_args`, and waits until it
    /// prints the address it listens on.
    pub async fn start(
        name: &'static str,
        listen: &str,
        data_dir: &Path,
        extra_args: Vec<String>,
    ) -> anyhow::Result<Stage> {
        let mut stage = Stage {
            name,
            addr: "127.0.0.1:0".parse()?,
            data_dir: data_dir.to_owned(),
            extra_args,
            child: None,
            starts: 0,
        };
        stage.spawn(listen).await?;
        Ok(stage)
    }

    async fn spawn(&mut self, listen: &str) -> anyhow::Result<()> {
        let binary = binary(&format!("orderflow-{}", self.name));
        std::fs::create_dir_all(&self.data_dir)?;
        self.starts += 1;
        let log = std::fs::File::create(
            self.data_dir
                .join(format!("{}-{}.log", self.name, self.starts)),
        )?;
        let mut child = Command::new(&binary)
            .arg("--listen")
            .arg(listen)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(&self.extra_args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
            .await
            .with_context(|| format!("{} did not start in time", self.name))??
            .with_context(|| {
                format!(
                    "{} exited before listening; see its log in {}",
                    self.name,
                    self.data_dir.display()
                )
            })?;
        let addr = line
            .rsplit(' ')
            .next()
            .and_then(|a| a.parse().ok())
            .with_context(|| format!("unexpected first line from {}: {line}", self.name))?;
        self.addr = addr;
        self.child = Some(child);
        Ok(())
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn pid(&self) -> Option<Pid> {
        self.child
            .as_ref()
            .and_then(Child::id)
            .map(|id| Pid::from_raw(id as i32))
    }

    fn signal(&self, sig: signal::Signal) {
        if let Some(pid) = self.pid() {
            signal::kill(pid, sig).expect("sending a signal");
        }
    }

    /// SIGSTOP: the process freezes where it is.
    pub fn pause(&self) {
        self.signal(signal::Signal::SIGSTOP);
    }

    /// SIGCONT after [`Stage::pause`].
    pub fn resume(&self) {
        self.signal(signal::Signal::SIGCONT);
    }

    /// `kill -9` and reap.
    pub async fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
    }

    /// SIGTERM and wait for the exit; returns whether it exited successfully.
    pub async fn terminate(&mut self) -> anyhow::Result<bool> {
        self.signal(signal::Signal::SIGTERM);
        let Some(mut child) = self.child.take() else {
            bail!("{} is not running", self.name);
        };
        let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
            .await
            .with_context(|| format!("{} did not stop within 30 s of SIGTERM", self.name))??;
        Ok(status.success())
    }

    /// Starts the stage again on the same address and data directory.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        let listen = self.addr.to_string();
        // The port was just freed by the dead process; retry briefly should the kernel lag.
        for attempt in 0.. {
            match self.spawn(&listen).await {
                Ok(()) => return Ok(()),
                Err(e) if attempt < 20 => {
                    eprintln!("restart of {} failed ({e:#}); retrying", self.name);
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => return Err(e),
            }
        }
        unreachable!()
    }

    /// Peak resident memory of the process (VmHWM), in KiB.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        let pid = self.pid()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.url())
            .unwrap()
            .connect_timeout(Duration::from_secs(5))
            .connect_lazy()
    }

    /// `next_offset` of the stage's outbox.
    pub async fn head(&self) -> anyhow::Result<u64> {
        let mut client = EventLogClient::new(self.channel().await);
        Ok(client.head(HeadRequest {}).await?.into_inner().next_offset)
    }
}

/// Options for a test pipeline.
pub struct PipelineOptions {
    /// TOML catalog for the stock stage.
    pub catalog: String,
    pub tax_rate_bps: u32,
    /// Start the notifier too.
    pub with_notifier: bool,
}

/// The four stages as separate processes, in one temporary directory.
pub struct Pipeline {
    pub stages: Vec<Stage>,
    pub dir: tempfile::TempDir,
    upstream_of_notifier: String,
}

impl Pipeline {
    pub async fn start(options: PipelineOptions) -> anyhow::Result<Pipeline> {
        let dir = tempfile::tempdir()?;
        let catalog = dir.path().join("catalog.toml");
        std::fs::write(&catalog, &options.catalog)?;
        let any = "127.0.0.1:0";
        let receiver = Stage::start("receiver", any, &dir.path().join("receiver"), vec![]).await?;
        let stock = Stage::start(
            "stock",
            any,
            &dir.path().join("stock"),
            vec![
                "--upstream".into(),
                receiver.url(),
                "--catalog".into(),
                catalog.display().to_string(),
            ],
        )
        .await?;
        let invoice = Stage::start(
            "invoice",
            any,
            &dir.path().join("invoice"),
            vec![
                "--upstream".into(),
                stock.url(),
                "--tax-rate-bps".into(),
                options.tax_rate_bps.to_string(),
            ],
        )
        .await?;
        let upstream_of_notifier = invoice.url();
        let mut pipeline = Pipeline {
            stages: vec![receiver, stock, invoice],
            dir,
            upstream_of_notifier,
        };
        if options.with_notifier {
            pipeline.start_notifier().await?;
        }
        Ok(pipeline)
    }

    /// Starts the notifier (when the pipeline was started without it).
    pub async fn start_notifier(&mut self) -> anyhow::Result<()> {
        let notifier = Stage::start(
            "notifier",
            "127.0.0.1:0",
            &self.dir.path().join("notifier"),
            vec!["--upstream".into(), self.upstream_of_notifier.clone()],
        )
        .await?;
        self.stages.push(notifier);
        Ok(())
    }

    pub fn stage(&self, name: &str) -> &Stage {
        self.stages
            .iter()
            .find(|s| s.name == name)
            .expect("no such stage")
    }

    pub fn stage_mut(&mut self, name: &str) -> &mut Stage {
        self.stages
            .iter_mut()
            .find(|s| s.name == name)
            .expect("no such stage")
    }

    pub async fn receiver(&self) -> OrderReceiverClient<Channel> {
        OrderReceiverClient::new(self.stage("receiver").channel().await)
    }

    pub async fn stock(&self) -> StockCheckerClient<Channel> {
        StockCheckerClient::new(self.stage("stock").channel().await)
    }

    pub async fn invoice(&self) -> InvoiceCreatorClient<Channel> {
        InvoiceCreatorClient::new(self.stage("invoice").channel().await)
    }

    pub async fn notifier(&self) -> NotifierClient<Channel> {
        NotifierClient::new(self.stage("notifier").channel().await)
    }

    /// Every notification, through the paged RPC.
    pub async fn notifications(&self) -> anyhow::Result<Vec<Notification>> {
        let client = self.notifier().await;
        all_pages(|page_token| {
            let mut client = client.clone();
            async move {
                let page = client
                    .list_notifications(ListNotificationsRequest {
                        page_size: 1000,
                        page_token,
                        order_id: String::new(),
                    })
                    .await?
                    .into_inner();
                Ok((page.notifications, page.next_page_token))
            }
        })
        .await
    }

    /// Every invoice, through the paged RPC.
    pub async fn invoices(&self) -> anyhow::Result<Vec<Invoice>> {
        let client = self.invoice().await;
        all_pages(|page_token| {
            let mut client = client.clone();
            async move {
                let page = client
                    .list_invoices(ListInvoicesRequest {
                        page_size: 1000,
                        page_token,
                    })
                    .await?
                    .into_inner();
                Ok((page.invoices, page.next_page_token))
            }
        })
        .await
    }

    /// The catalog, by sku.
    pub async fn stock_levels(&self) -> anyhow::Result<HashMap<String, StockItem>> {
        let client = self.stock().await;
        let items = all_pages(|page_token| {
            let mut client = client.clone();
            async move {
                let page = client
                    .list_stock(ListStockRequest {
                        page_size: 1000,
                        page_token,
                    })
                    .await?
                    .into_inner();
                Ok((page.items, page.next_page_token))
            }
        })
        .await?;
        Ok(items.into_iter().map(|i| (i.sku.clone(), i)).collect())
    }

    /// Lines of an order as the receiver stored it.
    pub async fn order_lines(&self, order_id: &str) -> anyhow::Result<Vec<OrderLine>> {
        let order = self
            .receiver()
            .await
            .get_order(GetOrderRequest {
                order_id: order_id.into(),
            })
            .await?
            .into_inner()
            .order
            .context("GetOrder without order")?;
        Ok(order.lines)
    }

    /// Waits until the notifier has recorded `count` notifications (or `timeout` passes).
    pub async fn wait_for_notifications(
        &self,
        count: usize,
        timeout: Duration,
    ) -> anyhow::Result<Vec<Notification>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notifier_head = self.stage("notifier").head().await.unwrap_or(0);
            if notifier_head as usize >= count {
                return self.notifications().await;
            }
            if tokio::time::Instant::now() > deadline {
                bail!("only {notifier_head} of {count} orders notified after {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Follows `next_page_token` from the first page to the last, collecting every row.
async fn all_pages<T, F, Fut>(mut fetch: F) -> anyhow::Result<Vec<T>>
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<(Vec<T>, String)>>,
{
    let mut rows = Vec::new();
    let mut token = String::new();
    loop {
        let (page, next) = fetch(token).await?;
        rows.extend(page);
        if next.is_empty() {
            return Ok(rows);
        }
        token = next;
    }
}

/// The outcome of placing one order.
pub struct Placed {
    pub lines: Vec<OrderLine>,
    /// The order id if the receiver accepted it; the status otherwise.
    pub result: Result<String, tonic::Status>,
}

/// Places `orders` with at most `concurrency` calls in flight; a failed call is recorded, not retried.
pub async fn place_all(
    client: OrderReceiverClient<Channel>,
    customer: &str,
    orders: Vec<Vec<OrderLine>>,
    concurrency: usize,
) -> Vec<Placed> {
    stream::iter(orders)
        .map(|lines| {
            let mut client = client.clone();
            let customer = customer.to_owned();
            async move {
                let result = client
                    .place_order(PlaceOrderRequest {
                        customer_id: customer,
                        lines: lines.clone(),
                    })
                    .await
                    .map(|r| r.into_inner().order_id);
                Placed { lines, result }
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await
}

/// A line of `quantity` units of `sku`.
pub fn line(sku: &str, quantity: u32) -> OrderLine {
    OrderLine {
        sku: sku.into(),
        quantity,
    }
}

/// A TOML catalog of `(sku, unit_price_minor, available)` items priced in EUR, named `Item <sku>`.
pub fn catalog(items: &[(&str, i64, u64)]) -> String {
    named_catalog(
        &items
            .iter()
            .map(|(sku, price, available)| (*sku, format!("Item {sku}"), *price, *available))
            .collect::<Vec<_>>(),
    )
}

/// A TOML catalog of `(sku, name, unit_price_minor, available)` items priced in EUR.
pub fn named_catalog(items: &[(&str, String, i64, u64)]) -> String {
    items
        .iter()
        .map(|(sku, name, price, available)| {
            format!(
                "[[items]]\nsku = \"{sku}\"\nname = \"{name}\"\nunit_price_minor = {price}\ncurrency = \"EUR\"\navailable = {available}\n\n"
            )
        })
        .collect()
}
