//! The shipped `Dockerfile` and `docker-compose.yml` on this machine's Docker engine.
//!
//! No image can be pulled here, so the test builds a Debian base image itself (debootstrap minbase,
//! `docker import`, kept between runs under [`BASE_IMAGE`] but rebuilt whenever it is missing),
//! builds each stage image from the Dockerfile's `prebuilt` target (the shipped runtime layout: user,
//! paths, entrypoint, health check) with the host-built binary, and brings the compose project up
//! with an override that swaps the build sections for these images and Jaeger for an OTLP receiver
//! writing spans to a file. Then: 500 orders through the published receiver port, the invoice
//! container stopped mid-stream and started again, the stock container cut off the network for
//! 10 s. Every order must reach exactly one terminal state, stock arithmetic must be exact, every
//! container healthy, and traces must arrive from all four containers. `down -v` runs even on
//! failure.
//!
//! Without a Docker engine the test says so and passes, unless `ORDERFLOW_REQUIRE_DOCKER=1` (which
//! `.ci/run` sets).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use orderflow_e2e::{
    Placed, STAGES, binary, free_ports, line, notifications, otlp, place_all, stock_levels,
};
use orderflow_proto::v1::{
    GetOrderRequest, NotificationKind, OrderLine, notifier_client::NotifierClient,
    order_receiver_client::OrderReceiverClient, stock_checker_client::StockCheckerClient,
};
use tonic::transport::Channel;

/// The locally made Debian base image; bump the tag when its recipe changes.
const BASE_IMAGE: &str = "orderflow-e2e/debian-bookworm-minbase:1";

/// Runs `program args…`; its stdout, or an error with its stderr.
fn run(program: &str, args: &[&str], env: &[(String, String)]) -> anyhow::Result<String> {
    let output = Command::new(program)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {program}"))?;
    if !output.status.success() {
        bail!(
            "{program} {} failed ({}):\n{}{}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

fn docker(args: &[&str]) -> anyhow::Result<String> {
    run("docker", args, &[])
}

/// What this machine lacks to run the test, if anything: a Docker engine, compose, and (unless the
/// base image is already there) debootstrap run as root.
fn missing_prerequisite() -> Option<String> {
    if docker(&["info", "--format", "{{.ServerVersion}}"]).is_err() {
        return Some("no Docker engine answers `docker info`".into());
    }
    if run("docker", &["compose", "version"], &[]).is_err()
        && run("docker-compose", &["version"], &[]).is_err()
    {
        return Some("neither `docker compose` nor `docker-compose` is installed".into());
    }
    if host_prometheus().is_none() {
        return Some(
            "the Prometheus image is made from Debian's package, which is missing (apt-get install prometheus)"
                .into(),
        );
    }
    if docker(&["image", "inspect", BASE_IMAGE]).is_err() {
        if run("debootstrap", &["--version"], &[]).is_err() {
            return Some(format!(
                "{BASE_IMAGE} must be built and debootstrap is missing (apt-get install debootstrap)"
            ));
        }
        if run("id", &["-u"], &[]).as_deref().ok() != Some("0") {
            return Some(format!(
                "{BASE_IMAGE} must be built and debootstrap needs root"
            ));
        }
    }
    None
}

/// The Prometheus binary of Debian's `prometheus` package, if it is installed.
fn host_prometheus() -> Option<PathBuf> {
    let path = run("sh", &["-c", "command -v prometheus"], &[]).ok()?;
    (!path.is_empty()).then(|| PathBuf::from(path))
}

/// Whether the test can run here; `ORDERFLOW_REQUIRE_DOCKER=1` turns "no" into a failure.
fn docker_available() -> bool {
    let Some(missing) = missing_prerequisite() else {
        return true;
    };
    if std::env::var("ORDERFLOW_REQUIRE_DOCKER").as_deref() == Ok("1") {
        panic!("ORDERFLOW_REQUIRE_DOCKER=1 but {missing}");
    }
    eprintln!("skipped: {missing} (ORDERFLOW_REQUIRE_DOCKER=1 makes this a failure)");
    false
}

/// The Debian mirror apt uses here, for debootstrap.
fn debian_mirror() -> String {
    let mut texts: Vec<String> = std::fs::read_dir("/etc/apt/sources.list.d")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| std::fs::read_to_string(entry.path()).ok())
        .collect();
    texts.extend(std::fs::read_to_string("/etc/apt/sources.list").ok());
    for text in texts {
        for line in text.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            let uri = match words.as_slice() {
                ["URIs:", uri, ..] => *uri,
                ["deb", uri, ..] if !uri.starts_with('[') => *uri,
                _ => continue,
            };
            // Debian's own archive, not security updates or a third party's repository.
            let debian = uri.trim_end_matches('/').ends_with("/debian");
            if uri.starts_with("http") && debian && !uri.contains("security") {
                return uri.to_owned();
            }
        }
    }
    "http://deb.debian.org/debian".into()
}

/// [`BASE_IMAGE`], made with debootstrap if this engine does not have it yet.
fn base_image() -> anyhow::Result<&'static str> {
    if docker(&["image", "inspect", BASE_IMAGE]).is_ok() {
        return Ok(BASE_IMAGE);
    }
    let root = tempfile::tempdir()?;
    let mirror = debian_mirror();
    eprintln!("building {BASE_IMAGE} with debootstrap from {mirror}");
    let rootfs = root.path().to_str().context("temp path")?;
    run(
        "debootstrap",
        &[
            "--variant=minbase",
            "--include=passwd",
            "bookworm",
            rootfs,
            &mirror,
        ],
        &[],
    )
    .context("debootstrap")?;
    let tar = Command::new("tar")
        .args(["-C", rootfs, "-c", "."])
        .stdout(Stdio::piped())
        .spawn()?;
    let import = Command::new("docker")
        .args(["import", "-", BASE_IMAGE])
        .stdin(tar.stdout.context("tar stdout")?)
        .output()?;
    if !import.status.success() {
        bail!(
            "docker import failed: {}",
            String::from_utf8_lossy(&import.stderr)
        );
    }
    Ok(BASE_IMAGE)
}

/// A build context holding `bin/<name>` for each binary, stripped of debug info.
fn context_with(binaries: &[&str]) -> anyhow::Result<tempfile::TempDir> {
    let named: Vec<(&str, &str)> = binaries.iter().map(|name| (*name, *name)).collect();
    context_with_as(&named)
}

/// A build context holding `bin/<as>` for each `(binary, as)`, stripped of debug info.
fn context_with_as(binaries: &[(&str, &str)]) -> anyhow::Result<tempfile::TempDir> {
    let context = tempfile::tempdir()?;
    std::fs::create_dir(context.path().join("bin"))?;
    for (name, as_name) in binaries {
        let from = binary(name);
        let to = context.path().join("bin").join(as_name);
        let stripped = Command::new("strip")
            .arg("-o")
            .arg(&to)
            .arg(&from)
            .status()
            .is_ok_and(|s| s.success());
        if !stripped {
            std::fs::copy(&from, &to)?;
        }
    }
    Ok(context)
}

/// `docker-compose` 1.29 (Debian's) or `docker compose` v2, whichever is here.
fn compose_command() -> Vec<String> {
    if run("docker", &["compose", "version"], &[]).is_ok() {
        vec!["docker".into(), "compose".into()]
    } else {
        vec!["docker-compose".into()]
    }
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// One compose project: the shipped file plus the test's override. Dropping it runs `down -v` and
/// removes the images it built.
struct Project {
    command: Vec<String>,
    name: String,
    override_file: PathBuf,
    env: Vec<(String, String)>,
    images: Vec<String>,
    ports: HashMap<&'static str, u16>,
    spans_dir: PathBuf,
    _dir: tempfile::TempDir,
}

impl Project {
    fn compose(&self, args: &[&str]) -> anyhow::Result<String> {
        self.compose_with(&[], args)
    }

    /// `compose <global…> --project-name … -f … <args…>`, e.g. with `--profile load`.
    fn compose_with(&self, global: &[&str], args: &[&str]) -> anyhow::Result<String> {
        let root = repo_root().join("docker-compose.yml");
        let mut full: Vec<&str> = self.command[1..].iter().map(String::as_str).collect();
        full.extend(global);
        full.extend([
            "--project-name",
            &self.name,
            "-f",
            root.to_str().unwrap(),
            "-f",
            self.override_file.to_str().unwrap(),
        ]);
        full.extend(args);
        run(&self.command[0], &full, &self.env)
    }

    fn container(&self, service: &str) -> anyhow::Result<String> {
        let id = self.compose(&["ps", "-q", service])?;
        if id.is_empty() {
            bail!("no container for {service}");
        }
        Ok(id)
    }

    fn health(&self, service: &str) -> anyhow::Result<String> {
        let id = self.container(service)?;
        docker(&["inspect", "--format", "{{.State.Health.Status}}", &id])
    }

    /// Waits until every one of `services` reports healthy.
    fn wait_healthy(&self, services: &[&str], timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut waiting = Vec::new();
            for service in services {
                let status = self.health(service).unwrap_or_else(|e| e.to_string());
                if status == "unhealthy" {
                    bail!("{service} is unhealthy:\n{}", self.logs(service));
                }
                if status != "healthy" {
                    waiting.push(format!("{service}: {status}"));
                }
            }
            if waiting.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("not healthy after {timeout:?}: {}", waiting.join(", "));
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    fn logs(&self, service: &str) -> String {
        self.compose(&["logs", "--no-color", "--tail", "60", service])
            .unwrap_or_else(|e| e.to_string())
    }

    fn channel(&self, port_name: &str) -> Channel {
        Channel::from_shared(format!("http://127.0.0.1:{}", self.ports[port_name]))
            .unwrap()
            .connect_timeout(Duration::from_secs(5))
            .connect_lazy()
    }

    /// The network the compose project put `service` on.
    fn network_of(&self, service: &str) -> anyhow::Result<String> {
        let id = self.container(service)?;
        let networks = docker(&[
            "inspect",
            "--format",
            "{{range $name, $_ := .NetworkSettings.Networks}}{{$name}} {{end}}",
            &id,
        ])?;
        networks
            .split_whitespace()
            .next()
            .map(str::to_owned)
            .context("container on no network")
    }

    fn spans(&self) -> Vec<otlp::ReceivedSpan> {
        std::fs::read_to_string(self.spans_dir.join("spans.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for service in STAGES {
                eprintln!("--- {service} logs\n{}", self.logs(service));
            }
        }
        let down = ["down", "-v", "--remove-orphans", "--timeout", "10"];
        if let Err(e) = self.compose_with(&["--profile", "load"], &down) {
            eprintln!("compose down failed: {e}");
        }
        for image in &self.images {
            let _ = docker(&["rmi", "-f", image]);
        }
        prune_intermediate_images();
    }
}

/// Removes the untagged images the classic builder leaves of the Dockerfile's tools-prebuilt stage.
fn prune_intermediate_images() {
    let pruned = docker(&[
        "image",
        "prune",
        "--force",
        "--filter",
        "label=org.orderflow.stage=tools-prebuilt",
    ]);
    if let Err(e) = pruned {
        eprintln!("could not remove intermediate images: {e}");
    }
}

/// Builds the images, writes the override and brings the project up.
fn start_project() -> anyhow::Result<Project> {
    let base = base_image()?;
    let run_id = std::process::id();
    let dir = tempfile::tempdir()?;
    let spans_dir = dir.path().join("spans");
    std::fs::create_dir(&spans_dir)?;
    let shipped = repo_root().join("Dockerfile");
    let mut images = Vec::new();
    let mut build = |context: &Path, tag: String, args: &[String]| -> anyhow::Result<String> {
        let mut full: Vec<&str> = vec!["build", "--quiet", "--tag", &tag];
        full.extend(args.iter().map(String::as_str));
        full.push(context.to_str().context("temp path")?);
        run("docker", &full, &[("DOCKER_BUILDKIT".into(), "0".into())])?;
        images.push(tag.clone());
        Ok(tag)
    };
    // The shipped Dockerfile's prebuilt targets, with host-built binaries.
    let shipped_target = |target: &str| {
        vec![
            "--file".to_owned(),
            shipped.display().to_string(),
            "--target".into(),
            target.into(),
            "--build-arg".into(),
            format!("RUNTIME_IMAGE={base}"),
        ]
    };
    for stage in STAGES {
        let context = context_with_as(&[(&format!("orderflow-{stage}"), "orderflow-stage")])?;
        let args = shipped_target("prebuilt");
        build(
            context.path(),
            format!("orderflow-e2e/{stage}:{run_id}"),
            &args,
        )?;
    }
    // The classic builder ran the tools-prebuilt stage for each of those and left it untagged.
    prune_intermediate_images();
    // The tools image (the `orderflow` command) from its prebuilt target, like the stages.
    let tools_context = context_with(&["orderflow"])?;
    let args = shipped_target("tools-prebuilt");
    let tools_image = build(
        tools_context.path(),
        format!("orderflow-e2e/tools:{run_id}"),
        &args,
    )?;

    // Prometheus from Debian's package on the same base (no image can be pulled here), laid out
    // like the official image: /bin/prometheus as nobody, its data in /prometheus.
    let prometheus_context = tempfile::tempdir()?;
    std::fs::create_dir(prometheus_context.path().join("bin"))?;
    let host_binary = host_prometheus().context("prometheus is not installed")?;
    std::fs::copy(
        &host_binary,
        prometheus_context.path().join("bin/prometheus"),
    )?;
    std::fs::write(
        prometheus_context.path().join("Dockerfile"),
        format!(
            "FROM {base}\nCOPY bin/prometheus /bin/prometheus\n\
             RUN mkdir -p /prometheus && chown 65534:65534 /prometheus\n\
             USER 65534\nENTRYPOINT [\"/bin/prometheus\"]\n"
        ),
    )?;
    let prometheus_image = build(
        prometheus_context.path(),
        format!("orderflow-e2e/prometheus:{run_id}"),
        &[],
    )?;

    let sink_context = context_with(&["orderflow-otlp-sink"])?;
    std::fs::write(
        sink_context.path().join("Dockerfile"),
        format!(
            "FROM {base}\nCOPY bin/orderflow-otlp-sink /usr/local/bin/orderflow-otlp-sink\n\
             ENTRYPOINT [\"/usr/local/bin/orderflow-otlp-sink\"]\n"
        ),
    )?;
    let sink_image = build(
        sink_context.path(),
        format!("orderflow-e2e/otlp-sink:{run_id}"),
        &[],
    )?;

    let mut override_yaml = format!(
        "services:\n  jaeger:\n    image: {sink_image}\n    command: [\"0.0.0.0:4317\", \"/spans/spans.jsonl\"]\n\
         \x20   volumes: [\"{}:/spans\"]\n    healthcheck:\n      test: [\"CMD\", \"/usr/local/bin/orderflow-otlp-sink\", \"health\"]\n\
         \x20     interval: 1s\n      retries: 30\n",
        spans_dir.display()
    );
    override_yaml.push_str(&format!(
        "  prometheus:\n    image: {prometheus_image}\n  load:\n    image: {tools_image}\n"
    ));
    for stage in STAGES {
        override_yaml.push_str(&format!(
            "  {stage}:\n    image: orderflow-e2e/{stage}:{run_id}\n    environment:\n      OTEL_BSP_SCHEDULE_DELAY: \"200\"\n"
        ));
    }
    let override_file = dir.path().join("docker-compose.test.yml");
    std::fs::write(&override_file, override_yaml)?;

    let names = [
        "RECEIVER_PORT",
        "RECEIVER_HTTP_PORT",
        "RECEIVER_METRICS_PORT",
        "STOCK_PORT",
        "STOCK_METRICS_PORT",
        "INVOICE_PORT",
        "INVOICE_METRICS_PORT",
        "NOTIFIER_PORT",
        "NOTIFIER_METRICS_PORT",
        "JAEGER_UI_PORT",
        "JAEGER_OTLP_PORT",
        "PROMETHEUS_PORT",
        "GRAFANA_PORT",
    ];
    let free = free_ports::<13>();
    let ports: HashMap<&'static str, u16> = names.into_iter().zip(free).collect();
    let mut env: Vec<(String, String)> = ports
        .iter()
        .map(|(name, port)| ((*name).to_owned(), port.to_string()))
        .collect();
    env.push(("ORDERFLOW_PUBLISH_ADDR".into(), "127.0.0.1".into()));
    env.push(("ORDERFLOW_TAX_RATE_BPS".into(), "2000".into()));
    // The load profile's shipped command, made short.
    env.push(("ORDERFLOW_LOAD_RATE".into(), "20".into()));
    env.push(("ORDERFLOW_LOAD_DURATION".into(), "5s".into()));
    let project = Project {
        command: compose_command(),
        name: format!("orderflow-e2e-{run_id}"),
        override_file,
        env,
        images,
        ports,
        spans_dir,
        _dir: dir,
    };
    // Everything but Grafana, which cannot be installed here (tests/tests/prometheus.rs checks its
    // provisioning and dashboard against a real Prometheus instead).
    project.compose(&[
        "up",
        "-d",
        "--no-build",
        "jaeger",
        "receiver",
        "stock",
        "invoice",
        "notifier",
        "prometheus",
    ])?;
    Ok(project)
}

/// Order `i` of the run: mostly available items, now and then the sold-out GPU (rejected) or the
/// scarce lamp (rejected once it runs out).
fn order_lines(i: usize) -> Vec<OrderLine> {
    match i % 10 {
        0 => vec![line("GPU-06", 1)],
        1 => vec![line("LAMP-05", 1), line("CABLE-04", 2)],
        2..=4 => vec![line("KB-01", 1), line("MOUSE-02", 1)],
        5 | 6 => vec![line("HEAD-03", 1)],
        _ => vec![line("CABLE-04", 1 + (i % 3) as u32)],
    }
}

async fn place(
    client: &OrderReceiverClient<Channel>,
    range: std::ops::Range<usize>,
) -> anyhow::Result<Vec<Placed>> {
    let placed = place_all(
        client.clone(),
        "docker",
        range.map(order_lines).collect(),
        16,
    )
    .await;
    if let Some(failed) = placed.iter().find(|p| p.result.is_err()) {
        bail!("an order was refused: {:?}", failed.result);
    }
    Ok(placed)
}

#[tokio::test(flavor = "multi_thread")]
async fn compose_pipeline_survives_a_stopped_stage_and_a_partition() {
    if !docker_available() {
        return;
    }
    let project = tokio::task::spawn_blocking(start_project)
        .await
        .unwrap()
        .unwrap();
    let all = ["jaeger", "receiver", "stock", "invoice", "notifier"];
    project
        .wait_healthy(&all, Duration::from_secs(120))
        .unwrap();

    let receiver = OrderReceiverClient::new(project.channel("RECEIVER_PORT"));
    let stock = StockCheckerClient::new(project.channel("STOCK_PORT"));
    let notifier = NotifierClient::new(project.channel("NOTIFIER_PORT"));
    let initial = stock_levels(stock.clone()).await.unwrap();
    let mut placed = place(&receiver, 0..200).await.unwrap();

    // The invoice container goes away mid-stream; orders keep coming.
    project.compose(&["stop", "invoice"]).unwrap();
    placed.extend(place(&receiver, 200..350).await.unwrap());
    project.compose(&["start", "invoice"]).unwrap();
    project
        .wait_healthy(&["invoice"], Duration::from_secs(60))
        .unwrap();
    placed.extend(place(&receiver, 350..425).await.unwrap());

    // The stock container is cut off the network for 10 s, with orders coming in meanwhile.
    let network = project.network_of("stock").unwrap();
    let stock_container = project.container("stock").unwrap();
    docker(&["network", "disconnect", &network, &stock_container]).unwrap();
    let cut = Instant::now();
    placed.extend(place(&receiver, 425..500).await.unwrap());
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(cut.elapsed())).await;
    docker(&[
        "network",
        "connect",
        "--alias",
        "stock",
        &network,
        &stock_container,
    ])
    .unwrap();

    // Every order is notified exactly once.
    let ids: HashSet<String> = placed.iter().map(|p| p.result.clone().unwrap()).collect();
    assert_eq!(ids.len(), 500);
    let deadline = Instant::now() + Duration::from_secs(180);
    let notified = loop {
        let notified = notifications(notifier.clone()).await.unwrap_or_default();
        if notified.len() >= 500 || Instant::now() > deadline {
            break notified;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let mut per_order: HashMap<&str, Vec<NotificationKind>> = HashMap::new();
    for n in &notified {
        per_order.entry(&n.order_id).or_default().push(n.kind());
    }
    assert_eq!(notified.len(), 500, "notifications: {}", notified.len());
    for id in &ids {
        let kinds = per_order.get(id.as_str()).map(Vec::as_slice);
        assert!(
            matches!(
                kinds,
                Some([NotificationKind::Confirmed | NotificationKind::Rejected])
            ),
            "order {id}: {kinds:?}"
        );
    }

    // The receiver, which learns progress from the other stages' logs, agrees.
    let mut receiver_client = receiver.clone();
    for id in &ids {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let order = receiver_client
                .get_order(GetOrderRequest {
                    order_id: id.clone(),
                })
                .await
                .unwrap()
                .into_inner()
                .order
                .unwrap();
            if order.terminal {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "order {id} is still {:?}",
                order.status()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    // Stock arithmetic: what left `available` is exactly what the confirmed orders hold.
    let confirmed: HashSet<&str> = notified
        .iter()
        .filter(|n| n.kind() == NotificationKind::Confirmed)
        .map(|n| n.order_id.as_str())
        .collect();
    let mut held: HashMap<&str, u64> = HashMap::new();
    for p in &placed {
        if confirmed.contains(p.result.as_ref().unwrap().as_str()) {
            for l in &p.lines {
                *held.entry(l.sku.as_str()).or_default() += u64::from(l.quantity);
            }
        }
    }
    let after = stock_levels(stock.clone()).await.unwrap();
    for (sku, before) in &initial {
        let now = &after[sku];
        let taken = held.get(sku.as_str()).copied().unwrap_or(0);
        assert_eq!(before.available - now.available, taken, "{sku} available");
        assert_eq!(now.reserved - before.reserved, taken, "{sku} reserved");
    }
    assert!(confirmed.len() > 300 && confirmed.len() < 500);

    // Every container is healthy after all that.
    project.wait_healthy(&all, Duration::from_secs(60)).unwrap();

    // Traces from all four containers; the orders placed before any trouble are whole traces.
    let first: Vec<String> = placed[..100]
        .iter()
        .map(|p| p.result.clone().unwrap())
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let spans = project.spans();
        let services: HashSet<&str> = spans.iter().map(|s| s.service.as_str()).collect();
        let complete = otlp::SERVICES.iter().all(|s| services.contains(s));
        if complete {
            if let Err(e) = otlp::verify_order_traces(&spans, &first) {
                assert!(Instant::now() < deadline, "{e}");
            } else {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "spans only from {services:?} ({} spans)",
            spans.len()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Prometheus, from the shipped config on the compose network, scrapes every stage.
    let prometheus = format!("http://127.0.0.1:{}", project.ports["PROMETHEUS_PORT"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let up: Option<serde_json::Value> = match reqwest::Client::new()
            .get(format!("{prometheus}/api/v1/query"))
            .query(&[("query", r#"up{job="orderflow"}"#)])
            .send()
            .await
        {
            Ok(response) => response.json().await.ok(),
            Err(_) => None,
        };
        let series = up
            .as_ref()
            .and_then(|up| up["data"]["result"].as_array().cloned())
            .unwrap_or_default();
        let instances: HashSet<&str> = series
            .iter()
            .filter(|s| s["value"][1] == "1")
            .filter_map(|s| s["metric"]["instance"].as_str())
            .collect();
        let expected = HashSet::from([
            "receiver:9451",
            "stock:9452",
            "invoice:9453",
            "notifier:9454",
        ]);
        if instances == expected {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus does not see every stage up: {up:?}\n{}",
            project.logs("prometheus")
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // The load profile's shipped command (made short by ORDERFLOW_LOAD_DURATION) drives the stack
    // from the tools image, and every order it placed is notified.
    let before = notifications(notifier.clone()).await.unwrap().len();
    let summary = project
        .compose_with(&["--profile", "load"], &["run", "-T", "--rm", "load"])
        .unwrap();
    let count = |label: &str| -> usize {
        summary
            .lines()
            .find_map(|l| l.strip_prefix(label))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {label:?} in the load summary:\n{summary}"))
    };
    let accepted = count("accepted");
    assert!(accepted >= 50, "{summary}");
    assert_eq!(count("notified"), accepted, "{summary}");
    let after = notifications(notifier.clone()).await.unwrap().len();
    assert_eq!(after - before, accepted);
    // Any subcommand runs the same way.
    let levels = project
        .compose_with(
            &["--profile", "load"],
            &["run", "-T", "--rm", "load", "stock", "list"],
        )
        .unwrap();
    assert!(levels.contains("KB-01"), "{levels}");
}
