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
//! A second test runs the pods of the rendered Kubernetes manifests (`deploy/kubernetes/`, example
//! overlay) on the same engine the way a kubelet would (see [`Pods`]): they pass their probes, and
//! orders survive the stock pod killed and the invoice pod stopped, each ending exactly once.
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
    GetOrderRequest, NotificationKind, OrderLine, StockItem, notifier_client::NotifierClient,
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
        spans_in(&self.spans_dir)
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

/// Waits up to 30 s until `spans` holds spans from all four stages and a whole trace for each of
/// `orders`; fails with what is missing.
async fn await_whole_traces(spans: impl Fn() -> Vec<otlp::ReceivedSpan>, orders: &[String]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let spans = spans();
        let services: HashSet<&str> = spans.iter().map(|s| s.service.as_str()).collect();
        let from_all = otlp::SERVICES.iter().all(|s| services.contains(s));
        match otlp::verify_order_traces(&spans, orders) {
            Ok(_) if from_all => return,
            Ok(_) => assert!(
                Instant::now() < deadline,
                "spans only from {services:?} ({} spans)",
                spans.len()
            ),
            Err(e) => assert!(Instant::now() < deadline, "{e}"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The spans the test's OTLP receiver has written to `dir` so far.
fn spans_in(dir: &Path) -> Vec<otlp::ReceivedSpan> {
    std::fs::read_to_string(dir.join("spans.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
}

/// `docker build` with the classic builder (as docker-compose 1.29 uses it), tagged `tag`.
fn build_image(context: &Path, tag: &str, args: &[String]) -> anyhow::Result<()> {
    let mut full: Vec<&str> = vec!["build", "--quiet", "--tag", tag];
    full.extend(args.iter().map(String::as_str));
    full.push(context.to_str().context("temp path")?);
    run("docker", &full, &[("DOCKER_BUILDKIT".into(), "0".into())])?;
    Ok(())
}

/// Build arguments for one of the shipped Dockerfile's prebuilt targets on `base`.
fn shipped_target(base: &str, target: &str) -> Vec<String> {
    vec![
        "--file".to_owned(),
        repo_root().join("Dockerfile").display().to_string(),
        "--target".into(),
        target.into(),
        "--build-arg".into(),
        format!("RUNTIME_IMAGE={base}"),
    ]
}

/// Builds each stage's image from the shipped `prebuilt` target on `base` (tagged `tag_of(stage)`)
/// and the OTLP receiver's (`sink_image`), noting each in `built` as it is made (for removal);
/// returns `sink_image`.
fn build_stages_and_sink(
    base: &str,
    tag_of: impl Fn(&str) -> String,
    sink_image: &str,
    built: &mut Vec<String>,
) -> anyhow::Result<String> {
    for stage in STAGES {
        let context = context_with_as(&[(&format!("orderflow-{stage}"), "orderflow-stage")])?;
        let tag = tag_of(stage);
        build_image(context.path(), &tag, &shipped_target(base, "prebuilt"))?;
        built.push(tag);
    }
    prune_intermediate_images();
    build_image(sink_context(base)?.path(), sink_image, &[])?;
    built.push(sink_image.to_owned());
    Ok(sink_image.to_owned())
}

/// A build context for the test's OTLP receiver (spans to a JSON-lines file) on `base`, standing in
/// for Jaeger, which cannot be pulled here.
fn sink_context(base: &str) -> anyhow::Result<tempfile::TempDir> {
    let context = context_with(&["orderflow-otlp-sink"])?;
    std::fs::write(
        context.path().join("Dockerfile"),
        format!(
            "FROM {base}\nCOPY bin/orderflow-otlp-sink /usr/local/bin/orderflow-otlp-sink\n\
             ENTRYPOINT [\"/usr/local/bin/orderflow-otlp-sink\"]\n"
        ),
    )?;
    Ok(context)
}

/// Builds the images, writes the override and brings the project up.
fn start_project() -> anyhow::Result<Project> {
    let base = base_image()?;
    let run_id = std::process::id();
    let dir = tempfile::tempdir()?;
    let spans_dir = dir.path().join("spans");
    std::fs::create_dir(&spans_dir)?;
    let mut images = Vec::new();
    let mut build = |context: &Path, tag: String, args: &[String]| -> anyhow::Result<String> {
        build_image(context, &tag, args)?;
        images.push(tag.clone());
        Ok(tag)
    };
    let shipped_target = |target: &str| shipped_target(base, target);
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

    let sink_image = build(
        sink_context(base)?.path(),
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

    let others = [
        "JAEGER_UI_PORT",
        "JAEGER_OTLP_PORT",
        "PROMETHEUS_PORT",
        "GRAFANA_PORT",
    ];
    let free = free_ports::<13>();
    let ports: HashMap<&'static str, u16> =
        STAGE_PORTS.into_iter().chain(others).zip(free).collect();
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

/// Waits until every placed order is notified and terminal at the receiver, and checks that each
/// ended exactly once and that stock moved by exactly what the confirmed orders hold; returns how
/// many were confirmed.
async fn assert_each_order_ended_once(
    receiver: &OrderReceiverClient<Channel>,
    stock: &StockCheckerClient<Channel>,
    notifier: &NotifierClient<Channel>,
    placed: &[Placed],
    initial: &HashMap<String, StockItem>,
) -> usize {
    // Every order is notified exactly once.
    let ids: HashSet<String> = placed.iter().map(|p| p.result.clone().unwrap()).collect();
    assert_eq!(ids.len(), placed.len());
    let deadline = Instant::now() + Duration::from_secs(180);
    let notified = loop {
        let notified = notifications(notifier.clone()).await.unwrap_or_default();
        if notified.len() >= placed.len() || Instant::now() > deadline {
            break notified;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let mut per_order: HashMap<&str, Vec<NotificationKind>> = HashMap::new();
    for n in &notified {
        per_order.entry(&n.order_id).or_default().push(n.kind());
    }
    assert_eq!(
        notified.len(),
        placed.len(),
        "notifications: {}",
        notified.len()
    );
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
    for p in placed {
        if confirmed.contains(p.result.as_ref().unwrap().as_str()) {
            for l in &p.lines {
                *held.entry(l.sku.as_str()).or_default() += u64::from(l.quantity);
            }
        }
    }
    let after = stock_levels(stock.clone()).await.unwrap();
    for (sku, before) in initial {
        let now = &after[sku];
        let taken = held.get(sku.as_str()).copied().unwrap_or(0);
        assert_eq!(before.available - now.available, taken, "{sku} available");
        assert_eq!(now.reserved - before.reserved, taken, "{sku} reserved");
    }
    confirmed.len()
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

    let confirmed =
        assert_each_order_ended_once(&receiver, &stock, &notifier, &placed, &initial).await;
    assert!(confirmed > 300 && confirmed < 500);

    // Every container is healthy after all that.
    project.wait_healthy(&all, Duration::from_secs(60)).unwrap();

    // Traces from all four containers; the orders placed before any trouble are whole traces.
    let first: Vec<String> = placed[..100]
        .iter()
        .map(|p| p.result.clone().unwrap())
        .collect();
    await_whole_traces(|| project.spans(), &first).await;

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

/// The pods of the rendered Kubernetes manifests, run on Docker the way a kubelet runs them: one
/// container per StatefulSet pod (`<set>-0` … `<set>-<replicas - 1>`), named by its governing Service (`<pod>.<service>`,
/// which a pod's DNS search path resolves in its namespace), with the container's environment
/// (ConfigMap first, its own `env` over it), user, read-only root, dropped capabilities, memory
/// limit and claim volume, and an OTLP receiver where the ConfigMap sends traces. Dropping it
/// removes containers, network, volumes and images.
struct Pods {
    network: String,
    containers: HashMap<String, String>,
    volumes: Vec<String>,
    images: Vec<String>,
    spans_dir: PathBuf,
    _dir: tempfile::TempDir,
}

impl Pods {
    fn start(docs: &[serde_json::Value]) -> anyhow::Result<Pods> {
        let base = base_image()?;
        let run_id = format!("k8s-{}", std::process::id());
        let dir = tempfile::tempdir()?;
        let spans_dir = dir.path().join("spans");
        std::fs::create_dir(&spans_dir)?;
        let mut pods = Pods {
            network: format!("orderflow-e2e-{run_id}"),
            containers: HashMap::new(),
            volumes: Vec::new(),
            images: Vec::new(),
            spans_dir,
            _dir: dir,
        };
        let sink_image = build_stages_and_sink(
            base,
            |stage| format!("orderflow-e2e/{stage}:{run_id}"),
            &format!("orderflow-e2e/otlp-sink:{run_id}"),
            &mut pods.images,
        )?;
        docker(&["network", "create", &pods.network])?;

        // Where the ConfigMap sends traces: the test's OTLP receiver under that name.
        let config = orderflow_e2e::kubernetes::resource(docs, "ConfigMap", "orderflow");
        let endpoint = config["data"]["OTEL_EXPORTER_OTLP_ENDPOINT"]
            .as_str()
            .context("no OTLP endpoint in the ConfigMap")?;
        let (collector, collector_port) = endpoint
            .trim_start_matches("http://")
            .split_once(':')
            .context("OTLP endpoint without a port")?;
        let spans = format!("{}:/spans", pods.spans_dir.display());
        let listen = format!("0.0.0.0:{collector_port}");
        let sink = docker(&[
            "run",
            "-d",
            "--network",
            &pods.network,
            "--network-alias",
            collector,
            "-v",
            &spans,
            &sink_image,
            &listen,
            "/spans/spans.jsonl",
        ])?;
        pods.containers.insert("otlp-sink".into(), sink);

        for set in docs.iter().filter(|d| d["kind"] == "StatefulSet") {
            let name = set["metadata"]["name"].as_str().context("name")?;
            for ordinal in 0..set["spec"]["replicas"].as_u64().unwrap_or(1) {
                let pod_name = format!("{name}-{ordinal}");
                pods.start_pod(docs, set, &pod_name, &run_id)?;
            }
        }
        Ok(pods)
    }

    /// Starts pod `pod_name` of the StatefulSet `set` as a container.
    fn start_pod(
        &mut self,
        docs: &[serde_json::Value],
        set: &serde_json::Value,
        pod_name: &str,
        run_id: &str,
    ) -> anyhow::Result<()> {
        let name = set["metadata"]["name"].as_str().context("name")?;
        let service = set["spec"]["serviceName"].as_str().context("serviceName")?;
        let pod = &set["spec"]["template"]["spec"];
        let container = &pod["containers"][0];
        assert!(
            container.get("command").is_none() && container.get("args").is_none(),
            "{name}: the pods run the image's entrypoint as it is"
        );
        let volume = format!("orderflow-e2e-{run_id}-data-{pod_name}");
        docker(&["volume", "create", &volume])?;
        self.volumes.push(volume.clone());
        let user = format!(
            "{}:{}",
            pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]
        );
        let alias = format!("{pod_name}.{service}");
        let mount = format!(
            "{volume}:{}",
            container["volumeMounts"][0]["mountPath"]
                .as_str()
                .context("mountPath")?
        );
        let memory = container["resources"]["limits"]["memory"]
            .as_str()
            .context("memory limit")?
            .replace("Gi", "g")
            .replace("Mi", "m");
        let image = format!("orderflow-e2e/{name}:{run_id}");
        let mut args: Vec<String> = [
            "run",
            "-d",
            "--name",
            &format!("orderflow-e2e-{run_id}-{pod_name}"),
            "--hostname",
            pod_name,
            "--network",
            &self.network,
            "--network-alias",
            &alias,
            "--user",
            &user,
            "--memory",
            &memory,
            "-v",
            &mount,
        ]
        .map(String::from)
        .to_vec();
        if container["securityContext"]["readOnlyRootFilesystem"] == true {
            args.push("--read-only".into());
        }
        if container["securityContext"]["allowPrivilegeEscalation"] == false {
            args.extend(["--security-opt".into(), "no-new-privileges".into()]);
        }
        for capability in container["securityContext"]["capabilities"]["drop"]
            .as_array()
            .into_iter()
            .flatten()
        {
            args.extend([
                "--cap-drop".into(),
                capability.as_str().context("cap")?.into(),
            ]);
        }
        let mut env = orderflow_e2e::kubernetes::container_env(docs, container, pod_name);
        // Spans leave each stage within 200 ms instead of 5 s, for the test's sake.
        env.push(("OTEL_BSP_SCHEDULE_DELAY".into(), "200".into()));
        for (key, value) in env {
            args.extend(["-e".into(), format!("{key}={value}")]);
        }
        for port in container["ports"].as_array().into_iter().flatten() {
            args.extend(["-p".into(), format!("127.0.0.1::{}", port["containerPort"])]);
        }
        args.push(image);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let id = docker(&args)?;
        self.containers.insert(pod_name.to_owned(), id);
        Ok(())
    }

    /// A channel to `pod`'s container port `port`, as published on loopback.
    fn channel(&self, pod: &str, port: u64) -> Channel {
        let published = docker(&["port", &self.containers[pod], &format!("{port}/tcp")]).unwrap();
        let address = published.lines().next().unwrap().to_owned();
        Channel::from_shared(format!("http://{address}"))
            .unwrap()
            .connect_timeout(Duration::from_secs(5))
            .connect_lazy()
    }

    /// Waits until `pod` passes the probes its manifest sets: grpc.health.v1 SERVING for the whole
    /// server (readiness) and for `liveness`.
    async fn wait_ready(&self, pod: &str, grpc_port: u64) {
        use tonic_health::pb::{
            HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
        };
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let mut serving = true;
            for service in ["", "liveness"] {
                let status = HealthClient::new(self.channel(pod, grpc_port))
                    .check(HealthCheckRequest {
                        service: service.into(),
                    })
                    .await
                    .map(|r| r.into_inner().status());
                serving &= matches!(status, Ok(ServingStatus::Serving));
            }
            if serving {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{pod} is not ready:\n{}",
                self.logs(pod)
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    fn logs(&self, pod: &str) -> String {
        run(
            "sh",
            &[
                "-c",
                &format!("docker logs --tail 60 {} 2>&1", self.containers[pod]),
            ],
            &[],
        )
        .unwrap_or_else(|e| e.to_string())
    }

    fn spans(&self) -> Vec<otlp::ReceivedSpan> {
        spans_in(&self.spans_dir)
    }
}

impl Drop for Pods {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for pod in self.containers.keys() {
                eprintln!("--- {pod} logs\n{}", self.logs(pod));
            }
        }
        for id in self.containers.values() {
            let _ = docker(&["rm", "-f", "-v", id]);
        }
        let _ = docker(&["network", "rm", &self.network]);
        for volume in &self.volumes {
            let _ = docker(&["volume", "rm", "-f", volume]);
        }
        for image in &self.images {
            let _ = docker(&["rmi", "-f", image]);
        }
        prune_intermediate_images();
    }
}

/// The rendered manifests of `overlay` and their pods started on Docker; `None` without Docker
/// or `kubectl`.
async fn rendered_pods(overlay: &str) -> Option<(Vec<serde_json::Value>, Pods)> {
    use orderflow_e2e::kubernetes::{documents, kubectl_available, kustomization, render};
    if !docker_available() || !kubectl_available() {
        return None;
    }
    let docs = documents(&render(&kustomization(overlay)));
    let pods = {
        let docs = docs.clone();
        tokio::task::spawn_blocking(move || Pods::start(&docs))
            .await
            .unwrap()
            .unwrap()
    };
    Some((docs, pods))
}

/// The gRPC container port of `stage`'s pods, which their probes ask.
fn grpc_port(docs: &[serde_json::Value], stage: &str) -> u64 {
    let set = orderflow_e2e::kubernetes::resource(docs, "StatefulSet", stage);
    set["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["port"]
        .as_u64()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn kubernetes_pods_run_as_rendered() {
    let Some((docs, pods)) = rendered_pods("overlays/example").await else {
        return;
    };
    let grpc = |stage: &str| grpc_port(&docs, stage);
    for stage in STAGES {
        pods.wait_ready(&format!("{stage}-0"), grpc(stage)).await;
    }
    let receiver = OrderReceiverClient::new(pods.channel("receiver-0", grpc("receiver")));
    let stock = StockCheckerClient::new(pods.channel("stock-0", grpc("stock")));
    let notifier = NotifierClient::new(pods.channel("notifier-0", grpc("notifier")));
    let initial = stock_levels(stock.clone()).await.unwrap();
    let mut placed = place(&receiver, 0..150).await.unwrap();

    // The stock pod's container is killed (the kubelet starts it again on its volume) while
    // orders keep coming; the invoice pod is stopped as Kubernetes stops it (SIGTERM, then its
    // grace period) and started again.
    docker(&["kill", "--signal", "KILL", &pods.containers["stock-0"]]).unwrap();
    placed.extend(place(&receiver, 150..225).await.unwrap());
    docker(&["start", &pods.containers["stock-0"]]).unwrap();
    pods.wait_ready("stock-0", grpc("stock")).await;
    let grace = orderflow_e2e::kubernetes::resource(&docs, "StatefulSet", "invoice")["spec"]
        ["template"]["spec"]["terminationGracePeriodSeconds"]
        .to_string();
    docker(&["stop", "--time", &grace, &pods.containers["invoice-0"]]).unwrap();
    placed.extend(place(&receiver, 225..300).await.unwrap());
    docker(&["start", &pods.containers["invoice-0"]]).unwrap();
    pods.wait_ready("invoice-0", grpc("invoice")).await;

    let stock = StockCheckerClient::new(pods.channel("stock-0", grpc("stock")));
    let confirmed =
        assert_each_order_ended_once(&receiver, &stock, &notifier, &placed, &initial).await;
    assert!(confirmed > 150, "{confirmed} confirmed");

    // The overlay's tax rate reached the invoice stage: a confirmed order's invoice has tax.
    let taxed = futures::future::join_all(placed.iter().take(20).map(|p| {
        let mut client = receiver.clone();
        let id = p.result.clone().unwrap();
        async move {
            client
                .get_order(GetOrderRequest { order_id: id })
                .await
                .unwrap()
                .into_inner()
                .order
                .unwrap()
        }
    }))
    .await;
    assert!(
        taxed
            .iter()
            .filter_map(|o| o.invoice.as_ref())
            .any(|i| i.tax.as_ref().is_some_and(|t| t.amount_minor > 0)),
        "no invoice with tax: {taxed:?}"
    );

    // Traces reach the collector the ConfigMap names, from all four pods: whole traces for the
    // orders placed after the restarts (a killed process takes the spans it had not exported yet).
    let first: Vec<String> = placed[225..]
        .iter()
        .map(|p| p.result.clone().unwrap())
        .collect();
    await_whole_traces(|| pods.spans(), &first).await;
}

/// The scaled overlay (`overlays/scaled`: 4 partitions, 2 pods of the receiver, invoice and
/// notifier, 3 of stock) run as rendered: every pod finds its partitions, its peers and the other
/// stages' pods through the names the manifests give them. Orders from many customers enter at
/// one receiver pod (most go on to the other's partitions), a stock pod's container is killed and
/// started again on its volume while they flow, and every order ends exactly once with stock
/// exact, as asked of other pods (the lists gathered from every pod).
#[tokio::test(flavor = "multi_thread")]
async fn kubernetes_scaled_pods_run_as_rendered() {
    let Some((docs, pods)) = rendered_pods("overlays/scaled").await else {
        return;
    };
    let grpc = |stage: &str| grpc_port(&docs, stage);
    let mut every_pod = Vec::new();
    for stage in STAGES {
        let set = orderflow_e2e::kubernetes::resource(&docs, "StatefulSet", stage);
        let replicas = set["spec"]["replicas"].as_u64().unwrap();
        assert!(replicas > 1, "{stage}: {replicas} replica(s)");
        every_pod.extend((0..replicas).map(|n| (format!("{stage}-{n}"), grpc(stage))));
    }
    for (pod, port) in &every_pod {
        pods.wait_ready(pod, *port).await;
    }
    let receiver = OrderReceiverClient::new(pods.channel("receiver-1", grpc("receiver")));
    let stock = StockCheckerClient::new(pods.channel("stock-2", grpc("stock")));
    let notifier = NotifierClient::new(pods.channel("notifier-0", grpc("notifier")));
    let initial = stock_levels(stock.clone()).await.unwrap();
    let mut placed = place_spread(&receiver, "k8s", 0..105).await;
    docker(&["kill", "--signal", "KILL", &pods.containers["stock-1"]]).unwrap();
    placed.extend(place_spread(&receiver, "k8s", 105..175).await);
    docker(&["start", &pods.containers["stock-1"]]).unwrap();
    pods.wait_ready("stock-1", grpc("stock")).await;
    let partitions = orderflow_e2e::partitions_of(&placed);
    assert_eq!(partitions.len(), 4, "orders fell in {partitions:?}");
    let confirmed =
        assert_each_order_ended_once(&receiver, &stock, &notifier, &placed, &initial).await;
    assert!(confirmed > 90, "{confirmed} confirmed");
}

/// The Swarm stack (`deploy/swarm/orderflow.yml`) deployed on this engine's swarm mode with
/// README's scale-out settings, the test's images and an OTLP receiver standing in for Jaeger.
/// Dropping it removes the stack, leaves the swarm the test joined, and removes the volumes, the
/// `docker_gwbridge` network the swarm made and the images, whatever happened.
struct Stack {
    name: String,
    images: Vec<String>,
    /// How many tasks each stage runs, from `<STAGE>_REPLICAS`.
    replicas: HashMap<&'static str, u32>,
    spans_dir: PathBuf,
    _dir: tempfile::TempDir,
}

/// README's section "Docker Swarm".
fn readme_swarm_section() -> &'static str {
    let readme = include_str!("../../README.md");
    let section = readme
        .split("\n## Docker Swarm\n")
        .nth(1)
        .expect("README has a section \"Docker Swarm\"");
    section.split("\n## ").next().unwrap_or(section)
}

/// README's command that deploys the stack, as words.
fn readme_stack_deploy() -> Vec<String> {
    let line = readme_swarm_section()
        .lines()
        .find(|line| line.starts_with("docker stack deploy "))
        .expect("README's Swarm section deploys the stack");
    let words: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
    assert!(
        words
            .windows(2)
            .any(|w| w == ["-c", "deploy/swarm/orderflow.yml"]),
        "{line}"
    );
    words
}

/// The variables README's scale-out lines export (`export NAME=value …`), in order.
fn readme_swarm_exports() -> Vec<(String, String)> {
    let exports: Vec<(String, String)> = readme_swarm_section()
        .lines()
        .filter_map(|line| line.strip_prefix("export "))
        .flat_map(str::split_whitespace)
        .map(|word| {
            let (name, value) = word
                .split_once('=')
                .unwrap_or_else(|| panic!("README exports {word:?} without a value"));
            (name.to_owned(), value.to_owned())
        })
        .collect();
    assert!(!exports.is_empty(), "README's Swarm section scales nothing");
    exports
}

/// The variables that move the stages' published ports (compose file and Swarm stack alike).
const STAGE_PORTS: [&str; 9] = [
    "RECEIVER_PORT",
    "RECEIVER_HTTP_PORT",
    "RECEIVER_METRICS_PORT",
    "STOCK_PORT",
    "STOCK_METRICS_PORT",
    "INVOICE_PORT",
    "INVOICE_METRICS_PORT",
    "NOTIFIER_PORT",
    "NOTIFIER_METRICS_PORT",
];

/// Each stage's gRPC port inside its container.
fn stage_port(stage: &str) -> u16 {
    match stage {
        "receiver" => 50051,
        "stock" => 50052,
        "invoice" => 50053,
        _ => 50054,
    }
}

impl Stack {
    /// Joins a single-node swarm (refusing an engine that is in one already: the test must be able
    /// to leave it), builds the images and deploys the shipped stack file with an override, set
    /// as README's scale-out lines set it.
    fn deploy() -> anyhow::Result<Stack> {
        let state = docker(&["info", "--format", "{{.Swarm.LocalNodeState}}"])?;
        if state != "inactive" {
            bail!(
                "this engine's swarm mode is {state}; the test needs it inactive, to join and leave"
            );
        }
        let exports = readme_swarm_exports();
        // One node holds every task: README's lines must give the stages' ports to the node.
        for port in STAGE_PORTS {
            assert!(
                exports
                    .iter()
                    .any(|(name, value)| name == port && value == "0"),
                "README's scale-out lines leave {port} fixed, which two tasks on one node share"
            );
        }
        let replicas = STAGES
            .into_iter()
            .map(|stage| {
                let name = format!("{}_REPLICAS", stage.to_uppercase());
                let count = exports
                    .iter()
                    .find(|(n, _)| *n == name)
                    .and_then(|(_, v)| v.parse().ok())
                    .unwrap_or(1);
                (stage, count)
            })
            .collect();
        let base = base_image()?;
        let run_id = std::process::id();
        let dir = tempfile::tempdir()?;
        let spans_dir = dir.path().join("spans");
        std::fs::create_dir(&spans_dir)?;
        let tag = format!("swarm-{run_id}");
        let mut stack = Stack {
            name: format!("orderflow-e2e-{run_id}"),
            images: Vec::new(),
            replicas,
            spans_dir,
            _dir: dir,
        };
        docker(&["swarm", "init", "--advertise-addr", "127.0.0.1"])?;
        let sink_image = build_stages_and_sink(
            base,
            |stage| format!("orderflow-{stage}:{tag}"),
            &format!("orderflow-e2e/otlp-sink:{tag}"),
            &mut stack.images,
        )?;

        let override_file = stack._dir.path().join("stack.test.yml");
        std::fs::write(
            &override_file,
            format!(
                "version: \"3.8\"\nservices:\n  jaeger:\n    image: {sink_image}\n\
                 \x20   command: [\"0.0.0.0:4317\", \"/spans/spans.jsonl\"]\n\
                 \x20   volumes: [\"{}:/spans\"]\n",
                stack.spans_dir.display()
            ),
        )?;
        let [jaeger_ui] = free_ports::<1>();
        let mut env = exports;
        env.push(("JAEGER_UI_PORT".into(), jaeger_ui.to_string()));
        env.push(("ORDERFLOW_TAG".into(), tag));
        env.push(("OTEL_BSP_SCHEDULE_DELAY".into(), "200".into()));
        // README's line, from the repository root, with the override added and this run's name.
        let mut args = readme_stack_deploy();
        let _stack_name = args.pop();
        let root = repo_root();
        let mut words: Vec<String> = Vec::new();
        for (i, word) in args.iter().enumerate().skip(1) {
            let is_file = args[i - 1] == "-c";
            words.push(if is_file {
                root.join(word).display().to_string()
            } else {
                word.clone()
            });
        }
        words.extend(["-c".into(), override_file.display().to_string()]);
        words.push(stack.name.clone());
        let words: Vec<&str> = words.iter().map(String::as_str).collect();
        run("docker", &words, &env)?;
        Ok(stack)
    }

    /// Every task: each stage with each of its slots, counted from 1.
    fn tasks(&self) -> Vec<(&'static str, u32)> {
        STAGES
            .into_iter()
            .flat_map(|stage| (1..=self.replicas[stage]).map(move |slot| (stage, slot)))
            .collect()
    }

    /// The running container of `stage`'s task in `slot`, if there is one.
    fn container(&self, stage: &str, slot: u32) -> Option<String> {
        let id = docker(&[
            "ps",
            "-q",
            "--filter",
            &format!("label=com.docker.swarm.service.name={}_{stage}", self.name),
            "--filter",
            &format!("name={}_{stage}.{slot}.", self.name),
        ])
        .ok()?;
        id.lines().next().map(str::to_owned)
    }

    /// Waits until every task runs and reports healthy.
    fn wait_healthy(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let waiting: Vec<(&str, u32)> = self
                .tasks()
                .into_iter()
                .filter(|(stage, slot)| {
                    let health = self.container(stage, *slot).and_then(|id| {
                        docker(&["inspect", "--format", "{{.State.Health.Status}}", &id]).ok()
                    });
                    health.as_deref() != Some("healthy")
                })
                .collect();
            if waiting.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                let tasks = docker(&["stack", "ps", "--no-trunc", &self.name]).unwrap_or_default();
                bail!("not healthy after {timeout:?}: {waiting:?}\n{tasks}");
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// The node's port that README's `docker ps` line shows for the gRPC port of `stage`'s task in
    /// `slot` (each task has its own, the port variables being 0).
    fn published_port(&self, stage: &str, slot: u32) -> u16 {
        let line = readme_swarm_section()
            .lines()
            .find(|line| line.starts_with("docker ps "))
            .expect("README's Swarm section shows the tasks' ports");
        let words: Vec<String> = line
            .split_whitespace()
            .map(|w| w.trim_matches('\''))
            .map(|w| w.replace("namespace=orderflow", &format!("namespace={}", self.name)))
            .collect();
        let words: Vec<&str> = words.iter().map(String::as_str).collect();
        // `--format '{{.Names}} {{.Ports}}'`, rejoined from its words.
        let format_at = words.iter().position(|w| *w == "--format").unwrap() + 1;
        let mut args: Vec<String> = words[1..format_at]
            .iter()
            .map(|w| (*w).to_owned())
            .collect();
        args.push(words[format_at..].join(" "));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let listing = docker(&args).unwrap();
        let task = format!("{}_{stage}.{slot}.", self.name);
        let target = format!("->{}/tcp", stage_port(stage));
        listing
            .lines()
            .filter(|line| line.starts_with(&task))
            .flat_map(|line| line.split(", "))
            .find_map(|port| {
                let host = port.split_whitespace().last()?.strip_suffix(&target)?;
                host.rsplit_once(':')?.1.parse().ok()
            })
            .unwrap_or_else(|| panic!("no port of {task} for {target} in:\n{listing}"))
    }

    fn channel(&self, stage: &str, slot: u32) -> Channel {
        let port = self.published_port(stage, slot);
        Channel::from_shared(format!("http://127.0.0.1:{port}"))
            .unwrap()
            .connect_timeout(Duration::from_secs(5))
            .connect_lazy()
    }

    /// Waits until every task answers SERVING on its published gRPC port.
    async fn wait_published(&self) {
        use tonic_health::pb::{
            HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        for (stage, slot) in self.tasks() {
            loop {
                let status = HealthClient::new(self.channel(stage, slot))
                    .check(HealthCheckRequest::default())
                    .await
                    .map(|r| r.into_inner().status());
                if matches!(status, Ok(ServingStatus::Serving)) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{stage}.{slot} is not SERVING: {status:?}"
                );
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    }

    fn logs(&self, stage: &str) -> String {
        let service = format!("{}_{stage}", self.name);
        run(
            "docker",
            &["service", "logs", "--raw", "--tail", "40", &service],
            &[],
        )
        .unwrap_or_else(|e| e.to_string())
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for stage in STAGES {
                eprintln!("--- {stage} logs\n{}", self.logs(stage));
            }
        }
        if let Err(e) = docker(&["stack", "rm", &self.name]) {
            eprintln!("docker stack rm: {e}");
        }
        // The stack's containers go away in the background; volumes in use cannot be removed.
        let label = format!("label=com.docker.stack.namespace={}", self.name);
        let deadline = Instant::now() + Duration::from_secs(60);
        while docker(&["ps", "-aq", "--filter", &label]).is_ok_and(|ids| !ids.is_empty())
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(500));
        }
        if let Err(e) = docker(&["swarm", "leave", "--force"]) {
            eprintln!("docker swarm leave: {e}");
        }
        let prefix = format!("{}_", self.name);
        let volumes = docker(&["volume", "ls", "-q"]).unwrap_or_default();
        for volume in volumes.lines().filter(|v| v.starts_with(&prefix)) {
            if let Err(e) = docker(&["volume", "rm", "-f", volume]) {
                eprintln!("docker volume rm {volume}: {e}");
            }
        }
        // Made by `swarm init`; not removed by `swarm leave`.
        let _ = docker(&["network", "rm", "docker_gwbridge"]);
        for image in &self.images {
            let _ = docker(&["rmi", "-f", image]);
        }
    }
}

/// A container cut off every network but its loopback: its network namespace drops whatever
/// comes or goes on another interface (a Swarm task cannot be disconnected from its overlay
/// network). Dropping it joins the container again, whatever happened.
struct Cut {
    pid: String,
}

/// The filter rules that cut a container off: all but loopback, both ways.
const CUT_RULES: [[&str; 5]; 2] = [
    ["INPUT", "!", "-i", "lo", "-j"],
    ["OUTPUT", "!", "-o", "lo", "-j"],
];

impl Cut {
    fn new(container: &str) -> anyhow::Result<Cut> {
        let pid = docker(&["inspect", "--format", "{{.State.Pid}}", container])?;
        let cut = Cut { pid };
        for rule in CUT_RULES {
            cut.iptables("-I", &rule)?;
        }
        Ok(cut)
    }

    fn iptables(&self, action: &str, rule: &[&str]) -> anyhow::Result<String> {
        // Where Debian keeps it, which a PATH without the sbin directories would miss.
        let iptables = ["/usr/sbin/iptables", "/sbin/iptables"]
            .into_iter()
            .find(|path| Path::new(path).exists())
            .unwrap_or("iptables");
        let mut args = vec!["-t", &self.pid, "-n", iptables, action];
        args.extend(rule);
        args.push("DROP");
        run("nsenter", &args, &[])
    }
}

impl Drop for Cut {
    fn drop(&mut self) {
        for rule in CUT_RULES {
            if let Err(e) = self.iptables("-D", &rule) {
                eprintln!("joining the cut container again: {e}");
            }
        }
    }
}

/// Orders `range` (see [`order_lines`]) from seven customers, so that they fall in every one of
/// four partitions, placed at `receiver`; each must be accepted.
async fn place_spread(
    receiver: &OrderReceiverClient<Channel>,
    prefix: &str,
    range: std::ops::Range<usize>,
) -> Vec<Placed> {
    let mut placed = Vec::new();
    for customer in 0..7 {
        let lines = range
            .clone()
            .filter(|n| n % 7 == customer)
            .map(order_lines)
            .collect();
        let name = format!("{prefix}-{customer}");
        placed.extend(place_all(receiver.clone(), &name, lines, 8).await);
    }
    assert!(
        placed.iter().all(|p| p.result.is_ok()),
        "an order was refused"
    );
    placed
}

/// The shipped Swarm stack, scaled as README says (4 partitions; 2 tasks of receiver, invoice and
/// notifier, 3 of stock), on the engine's swarm mode: orders from many customers enter at one
/// receiver task; an invoice task's container is killed and Swarm starts a new one on the same
/// volume (its slot's), and a stock task is cut off the network for 10 s, while they flow. Every
/// order ends exactly once, in every partition, with stock exact as other tasks gather it, and each
/// order placed after the restart is one trace across the four services.
#[tokio::test(flavor = "multi_thread")]
async fn swarm_stack_scales_out_and_restarts_a_killed_task_on_its_volume() {
    if !docker_available() {
        return;
    }
    let stack = tokio::task::spawn_blocking(Stack::deploy)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stack.tasks().len(), 9, "{:?}", stack.replicas);
    stack.wait_healthy(Duration::from_secs(240)).unwrap();
    stack.wait_published().await;

    let receiver = OrderReceiverClient::new(stack.channel("receiver", 2));
    let stock = StockCheckerClient::new(stack.channel("stock", 3));
    let notifier = NotifierClient::new(stack.channel("notifier", 1));
    let initial = stock_levels(stock.clone()).await.unwrap();
    let mut placed = place_spread(&receiver, "swarm", 0..105).await;

    let killed = stack.container("invoice", 2).unwrap();
    docker(&["kill", &killed]).unwrap();
    let cut = Cut::new(&stack.container("stock", 2).unwrap()).unwrap();
    let cut_at = Instant::now();
    // Cut off indeed: not even its own published port answers.
    let unreachable = tokio::time::timeout(
        Duration::from_secs(2),
        tonic_health::pb::health_client::HealthClient::new(stack.channel("stock", 2))
            .check(tonic_health::pb::HealthCheckRequest::default()),
    )
    .await;
    assert!(
        !matches!(unreachable, Ok(Ok(_))),
        "the cut stock task answered"
    );
    placed.extend(place_spread(&receiver, "swarm", 105..175).await);
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(cut_at.elapsed())).await;
    drop(cut);
    stack.wait_healthy(Duration::from_secs(120)).unwrap();
    stack.wait_published().await;
    let restarted = stack.container("invoice", 2).unwrap();
    assert_ne!(restarted, killed, "Swarm did not start a new invoice task");
    let volume = docker(&[
        "inspect",
        "--format",
        "{{range .Mounts}}{{.Name}}{{end}}",
        &restarted,
    ])
    .unwrap();
    assert_eq!(volume, format!("{}_invoice-data-2", stack.name));
    let after_restart = placed.len();
    placed.extend(place_spread(&receiver, "swarm", 175..210).await);

    let partitions = orderflow_e2e::partitions_of(&placed);
    assert_eq!(partitions.len(), 4, "orders fell in {partitions:?}");
    let confirmed =
        assert_each_order_ended_once(&receiver, &stock, &notifier, &placed, &initial).await;
    assert!(confirmed > 0);
    // Spans the killed task had not exported yet died with it: the orders placed after its
    // successor came up must each be one whole trace.
    let orders: Vec<String> = placed[after_restart..]
        .iter()
        .map(|p| p.result.clone().unwrap())
        .collect();
    await_whole_traces(|| spans_in(&stack.spans_dir), &orders).await;
}
