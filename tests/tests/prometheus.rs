//! The shipped Prometheus configuration and alerting rules (`deploy/prometheus/`) and Grafana
//! provisioning and dashboard (`deploy/grafana/`), checked with the real `promtool` and run by a
//! real Prometheus scraping four real stages under load: every rule evaluates without error, every
//! query of every dashboard panel returns data and reads only metrics a real scrape has, and dead
//! letters really fire `OrderflowDeadLetters`. Grafana itself cannot be installed here: its files
//! are checked for structure (datasources by uid, every panel with a query, variables defined,
//! the compose mounts where the provisioning expects them).
//!
//! Needs Debian's `prometheus` package (`prometheus` and `promtool` on PATH). Without it the tests
//! say so and pass, unless `ORDERFLOW_REQUIRE_PROMETHEUS=1` (set by `.ci/run`) makes that a failure.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use orderflow_e2e::{Pipeline, PipelineOptions, catalog, free_ports, line, place_all, yaml_file};
use orderflow_proto::v1::PlaceOrderRequest;
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn deploy() -> PathBuf {
    repo().join("deploy/prometheus")
}

fn dashboard() -> Value {
    let path = repo().join("deploy/grafana/dashboards/orderflow.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// Every panel of `dashboard` that shows data (rows left out, panels inside collapsed rows kept).
fn panels(dashboard: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        if panel["type"] == "row" {
            out.extend(panel["panels"].as_array().into_iter().flatten());
        } else {
            out.push(panel);
        }
    }
    out
}

/// Grafana's own variables the dashboard may use, and what the test puts in their place.
const GRAFANA_VARIABLES: [(&str, &str); 3] = [
    ("$__rate_interval", "1m"),
    ("$__range", "10m"),
    ("$__interval", "15s"),
];

/// The Prometheus queries of the dashboard as (panel title, PromQL), with its variables set as a
/// user sees them with every stage selected.
fn dashboard_queries(dashboard: &Value) -> Vec<(String, String)> {
    let mut queries = Vec::new();
    for panel in panels(dashboard) {
        for target in panel["targets"].as_array().unwrap() {
            if target["datasource"]["type"] != "prometheus" {
                continue;
            }
            let mut expr = target["expr"].as_str().unwrap().to_owned();
            for (variable, value) in GRAFANA_VARIABLES {
                expr = expr.replace(variable, value);
            }
            expr = expr.replace("$stage", ".*");
            assert!(!expr.contains('$'), "unknown variable in {expr}");
            queries.push((panel["title"].as_str().unwrap().to_owned(), expr));
        }
    }
    queries
}

/// The `orderflow_*` metric names `query` reads, without histogram suffixes.
fn metric_names(query: &str) -> Vec<&str> {
    query
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("orderflow_"))
        .map(|w| {
            w.trim_end_matches("_bucket")
                .trim_end_matches("_sum")
                .trim_end_matches("_count")
        })
        .collect()
}

/// Whether `prometheus` and `promtool` can run here; panics when CI requires them and they cannot.
fn prometheus_available() -> bool {
    let found = ["prometheus", "promtool"].iter().all(|tool| {
        Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    if !found {
        assert!(
            std::env::var("ORDERFLOW_REQUIRE_PROMETHEUS").as_deref() != Ok("1"),
            "ORDERFLOW_REQUIRE_PROMETHEUS=1 but prometheus/promtool are missing (apt-get install prometheus)"
        );
        eprintln!(
            "skipped: prometheus and promtool are not installed (apt-get install prometheus)"
        );
    }
    found
}

fn promtool(args: &[&str]) -> String {
    let output = Command::new("promtool").args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "promtool {args:?}: {text}");
    text
}

#[test]
fn promtool_accepts_the_shipped_config_and_rules() {
    if !prometheus_available() {
        return;
    }
    let rules = deploy().join("alerts.yml");
    let checked = promtool(&["check", "rules", rules.to_str().unwrap()]);
    assert!(checked.contains("8 rules found"), "{checked}");
    let config = deploy().join("prometheus.yml");
    promtool(&["check", "config", config.to_str().unwrap()]);
}

/// A real Prometheus in a temp dir, killed on drop.
struct Prometheus {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// Starts Prometheus scraping `targets` every second, with the shipped rules.
    async fn start(targets: &[String]) -> Prometheus {
        // The shipped file with the compose service names swapped for the test's loopback ports.
        let shipped = std::fs::read_to_string(deploy().join("prometheus.yml")).unwrap();
        let compose_targets = r#"["receiver:9451", "stock:9452", "invoice:9453", "notifier:9454"]"#;
        assert!(shipped.contains(compose_targets), "{shipped}");
        let config = shipped.replace(compose_targets, &serde_json::to_string(targets).unwrap());
        Prometheus::start_with(&config, tempfile::tempdir().unwrap()).await
    }

    /// Starts Prometheus on `config` (made to scrape and evaluate every second) in `dir`, next to
    /// the shipped rules.
    async fn start_with(config: &str, dir: tempfile::TempDir) -> Prometheus {
        std::fs::copy(deploy().join("alerts.yml"), dir.path().join("alerts.yml")).unwrap();
        let config = config
            .replace("scrape_interval: 5s", "scrape_interval: 1s")
            .replace("evaluation_interval: 15s", "evaluation_interval: 1s");
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).unwrap();
        promtool(&["check", "config", config_path.to_str().unwrap()]);
        let [port] = free_ports::<1>();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let prometheus = Prometheus {
            child,
            url: format!("http://127.0.0.1:{port}"),
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = reqwest::get(format!("{}/-/ready", prometheus.url)).await;
            if ready.is_ok_and(|r| r.status().is_success()) {
                return prometheus;
            }
            assert!(Instant::now() < deadline, "prometheus did not become ready");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn api(&self, path: &str, query: &[(&str, &str)]) -> Value {
        let response: Value = reqwest::Client::new()
            .get(format!("{}/api/v1/{path}", self.url))
            .query(query)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(
            response["status"], "success",
            "{path} {query:?}: {response}"
        );
        response["data"].clone()
    }

    /// The result vector of an instant query.
    async fn query(&self, expr: &str) -> Vec<Value> {
        let data = self.api("query", &[("query", expr)]).await;
        data["result"].as_array().cloned().unwrap_or_default()
    }

    /// Waits until `expr` returns at least one series whose every value passes `ok`, with a series
    /// labelled `stage` for each of `stages`.
    async fn wait_for(&self, expr: &str, stages: &[&str], ok: impl Fn(f64) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let result = self.query(expr).await;
            let values: Vec<f64> = result
                .iter()
                .filter_map(|s| s["value"][1].as_str()?.parse().ok())
                .collect();
            let every_stage = stages
                .iter()
                .all(|stage| result.iter().any(|s| s["metric"]["stage"] == *stage));
            if !values.is_empty() && values.iter().all(|v| ok(*v)) && every_stage {
                return result;
            }
            assert!(
                Instant::now() < deadline,
                "{expr} never returned what was expected; last: {result:?}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn prometheus_scrapes_the_stages_runs_every_rule_and_fires_on_dead_letters() {
    if !prometheus_available() {
        return;
    }
    // Half the payments declined: dead letters at the invoice stage, and every order still ends
    // (confirmed or told it was not paid), so placed→notified has data too. Some captures fail
    // transiently and are retried, and one order is refused at the door: every panel of the
    // dashboard has something to show.
    let pipeline = Pipeline::start(PipelineOptions {
        catalog: catalog(&[("A", 1000, 1_000_000)]),
        with_notifier: true,
        invoice_args: [
            "--gateway-decline-rate",
            "0.5",
            "--gateway-transient-failure-rate",
            "0.2",
        ]
        .map(String::from)
        .to_vec(),
        ..Default::default()
    })
    .await
    .unwrap();
    let targets: Vec<String> = pipeline
        .stages
        .iter()
        .map(|s| {
            s.metrics_url()
                .expect("the harness serves metrics")
                .trim_start_matches("http://")
                .trim_end_matches("/metrics")
                .to_owned()
        })
        .collect();
    assert_eq!(targets.len(), 4);
    let prometheus = Prometheus::start(&targets).await;
    // Prometheus starts scraping a few seconds after it is ready: wait for a first sample of every
    // stage, so that the load below moves counters it has already seen.
    prometheus
        .wait_for(r#"count(up{job="orderflow"} == 1) == 4"#, &[], |v| v == 4.0)
        .await;

    let refused = pipeline
        .receiver()
        .await
        .place_order(PlaceOrderRequest::default())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);

    // Load in waves over several scrapes, so rates and increases have something to measure.
    let mut placed = 0;
    for wave in 0..8 {
        let orders = place_all(
            pipeline.receiver().await,
            &format!("wave-{wave}"),
            (0..25).map(|_| vec![line("A", 1)]).collect(),
            8,
        )
        .await;
        assert!(orders.iter().all(|o| o.result.is_ok()));
        placed += orders.len();
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    pipeline
        .wait_for_notifications(placed, Duration::from_secs(60))
        .await
        .unwrap();

    // The dashboard's key expressions return data: orders/s by stage and outcome, lag, p99.
    let every_stage = ["receiver", "stock", "invoice", "notifier"];
    prometheus
        .wait_for(
            "sum by (stage, outcome) (rate(orderflow_events_processed_total[10m]))",
            &every_stage,
            |v| v >= 0.0,
        )
        .await;
    prometheus
        .wait_for(
            "orderflow_consumer_lag",
            &["stock", "invoice", "notifier"],
            |v| v >= 0.0,
        )
        .await;
    prometheus
        .wait_for(
            "histogram_quantile(0.99, sum by (le) (rate(orderflow_placed_to_notified_seconds_bucket[10m])))",
            &[],
            |v| v.is_finite() && v > 0.0,
        )
        .await;
    prometheus
        .wait_for("orderflow_max_backlog", &["receiver"], |v| v == 1_000_000.0)
        .await;
    // The backlog alert compares each partition's backlog with the receiver's one --max-backlog:
    // with the threshold at 0 its expression holds, so its series match (labelled by partition).
    let near_limit = prometheus
        .wait_for(
            "orderflow_backlog{stage=\"receiver\"} >= ignoring(partition) group_left 0 * orderflow_max_backlog",
            &["receiver"],
            |v| v >= 0.0,
        )
        .await;
    assert!(
        near_limit.iter().all(|s| s["metric"]["partition"] == "0"),
        "{near_limit:?}"
    );
    prometheus
        .wait_for("orderflow_store_healthy", &every_stage, |v| v == 1.0)
        .await;

    // Every query of every dashboard panel returns data, and reads only metrics the stages export.
    let scraped: String = {
        let mut text = String::new();
        for stage in &pipeline.stages {
            text.push_str(&stage.scrape().await.unwrap().0);
        }
        text
    };
    let queries = dashboard_queries(&dashboard());
    assert!(queries.len() >= 20, "{queries:#?}");
    for (panel, query) in &queries {
        for name in metric_names(query) {
            assert!(
                scraped.contains(name),
                "panel {panel:?} reads {name}, which no stage exports"
            );
        }
        prometheus.wait_for(query, &[], |_| true).await;
    }

    // Every rule loaded and evaluates without error.
    let deadline = Instant::now() + Duration::from_secs(30);
    let rules = loop {
        let groups = prometheus.api("rules", &[]).await["groups"].clone();
        let rules: Vec<Value> = groups
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        if rules.len() == 8 && rules.iter().all(|r| r["health"] == "ok") {
            break rules;
        }
        assert!(
            Instant::now() < deadline,
            "rules not all healthy: {rules:#?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    // Each metric a rule reads is one the stages export (a typo would evaluate to nothing, forever).
    for rule in &rules {
        let query = rule["query"].as_str().unwrap();
        for name in metric_names(query) {
            assert!(
                scraped.contains(name),
                "rule {} reads {name}, which no stage exports",
                rule["name"]
            );
        }
    }

    // Dead letters really fire their alert.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let alerts = prometheus.api("alerts", &[]).await["alerts"].clone();
        let firing = alerts.as_array().unwrap().iter().any(|a| {
            a["labels"]["alertname"] == "OrderflowDeadLetters"
                && a["labels"]["stage"] == "invoice"
                && a["state"] == "firing"
        });
        if firing {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "OrderflowDeadLetters never fired: {alerts:#?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // And a healthy pipeline fires nothing else (a rule with a `for:` may be pending on a few
    // seconds of data, such as the free-space trend while other tests write to the same disk).
    let alerts = prometheus.api("alerts", &[]).await["alerts"].clone();
    let others: Vec<&Value> = alerts
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["labels"]["alertname"] != "OrderflowDeadLetters" && a["state"] == "firing")
        .collect();
    assert!(others.is_empty(), "{others:#?}");
}

/// The Grafana side as far as it can be checked without Grafana: provisioning, compose mounts and
/// the dashboard's structure. That its queries return data is the test above.
#[test]
fn grafana_provisioning_compose_and_dashboard_hold_together() {
    let grafana = repo().join("deploy/grafana");
    let compose = yaml_file(&repo().join("docker-compose.yml"));
    let services = &compose["services"];

    // Datasources by uid, at the compose services' addresses.
    let datasources = yaml_file(&grafana.join("provisioning/datasources/orderflow.yml"));
    let mut uids = std::collections::HashMap::new();
    for source in datasources["datasources"].as_array().unwrap() {
        uids.insert(
            source["uid"].as_str().unwrap().to_owned(),
            source["type"].as_str().unwrap().to_owned(),
        );
        let url = source["url"].as_str().unwrap();
        let host = url.trim_start_matches("http://").split(':').next().unwrap();
        assert!(
            services[host].is_object(),
            "datasource {url}: no compose service {host}"
        );
    }
    assert_eq!(uids["prometheus"], "prometheus");
    assert_eq!(uids["jaeger"], "jaeger");
    let prometheus_args = services["prometheus"]["command"].to_string();
    assert!(
        prometheus_args.contains("0.0.0.0:9090"),
        "{prometheus_args}"
    );
    assert!(
        services["prometheus"]["volumes"]
            .as_array()
            .unwrap()
            .contains(&Value::from("./deploy/prometheus:/etc/prometheus:ro"))
    );

    // The dashboards provider reads where compose mounts the dashboards, and the home dashboard
    // is one of them.
    let providers = yaml_file(&grafana.join("provisioning/dashboards/orderflow.yml"));
    let path = providers["providers"][0]["options"]["path"]
        .as_str()
        .unwrap();
    let grafana_service = &services["grafana"];
    let volumes: Vec<&str> = grafana_service["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(volumes.contains(&"./deploy/grafana/provisioning:/etc/grafana/provisioning:ro"));
    assert!(volumes.contains(&format!("./deploy/grafana/dashboards:{path}:ro").as_str()));
    let home = grafana_service["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
        .as_str()
        .unwrap();
    let home_file = home.strip_prefix(path).unwrap().trim_start_matches('/');
    assert!(
        grafana.join("dashboards").join(home_file).is_file(),
        "{home}"
    );

    // The load profile runs the tools image, a target the Dockerfile has.
    let load = &services["load"];
    assert_eq!(load["profiles"], serde_json::json!(["load"]));
    assert_eq!(load["build"]["target"], "tools");
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    assert!(dockerfile.contains(" AS tools\n"));

    // The dashboard: every panel placed, on a provisioned datasource, with a query.
    let dashboard = dashboard();
    assert_eq!(dashboard["uid"], "orderflow");
    let variables: Vec<String> = dashboard["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| format!("${}", v["name"].as_str().unwrap()))
        .collect();
    let known = |text: &str| {
        let mut rest = text.replace("${", "$").replace('}', "");
        for name in variables
            .iter()
            .map(String::as_str)
            .chain(GRAFANA_VARIABLES.iter().map(|(name, _)| *name))
        {
            rest = rest.replace(name, "");
        }
        assert!(!rest.contains('$'), "undefined variable in {text}");
    };
    let panels = panels(&dashboard);
    assert!(panels.len() >= 15, "{} panels", panels.len());
    let mut ids = std::collections::HashSet::new();
    for panel in &panels {
        let title = panel["title"].as_str().unwrap();
        assert!(!title.is_empty());
        assert!(ids.insert(panel["id"].as_u64().unwrap()), "{title}: id");
        let grid = &panel["gridPos"];
        let (x, w) = (grid["x"].as_u64().unwrap(), grid["w"].as_u64().unwrap());
        assert!(
            x + w <= 24 && grid["h"].as_u64().unwrap() > 0,
            "{title}: {grid}"
        );
        let uid = panel["datasource"]["uid"].as_str().unwrap();
        assert_eq!(
            uids.get(uid).map(String::as_str),
            panel["datasource"]["type"].as_str(),
            "{title}: datasource {uid}"
        );
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{title}: no query");
        for target in targets {
            assert_eq!(target["datasource"], panel["datasource"], "{title}");
            assert!(target["refId"].is_string(), "{title}");
            if uid == "prometheus" {
                let expr = target["expr"].as_str().unwrap();
                assert!(
                    expr.contains("orderflow_") || expr.contains("up{"),
                    "{title}: {expr}"
                );
                known(expr);
            } else {
                assert_eq!(target["queryType"], "search", "{title}");
                assert!(
                    target["service"]
                        .as_str()
                        .unwrap()
                        .starts_with("orderflow-")
                );
            }
        }
        for link in panel["links"].as_array().into_iter().flatten() {
            known(link["url"].as_str().unwrap());
        }
    }
    for link in dashboard["links"].as_array().unwrap() {
        known(link["url"].as_str().unwrap());
    }

    // What the operator asked to see, each on some panel.
    let queries: String = dashboard_queries(&dashboard)
        .into_iter()
        .map(|(_, q)| q)
        .collect();
    for metric in [
        "orderflow_events_processed_total",
        "orderflow_placed_to_notified_seconds_bucket",
        "orderflow_consumer_lag",
        "orderflow_backlog",
        "orderflow_retries_total",
        "orderflow_dead_letters_total",
        "orderflow_attempt_seconds_bucket",
        "orderflow_batch_commit_seconds_bucket",
        "orderflow_group_commit_entries_sum",
    ] {
        assert!(queries.contains(metric), "no panel shows {metric}");
    }
}

/// `deploy/prometheus/kubernetes.yml` on a real Prometheus. Kubernetes service discovery cannot run
/// here (no cluster, and Debian's Prometheus is built without it), so the test hands Prometheus,
/// through file discovery, the very targets pod discovery makes of the rendered manifests — one
/// per container port of each pod, with the `__meta_kubernetes_*` labels Kubernetes gives them,
/// addressed at real stages on loopback — plus a pod that is not orderflow's. The shipped
/// relabelling must keep exactly each stage's metrics port, under the job the rules and dashboard
/// read, with `namespace` and `pod` labels.
#[tokio::test(flavor = "multi_thread")]
async fn the_kubernetes_scrape_config_keeps_each_stage_s_metrics_port() {
    use orderflow_e2e::kubernetes::{documents, kubectl_available, kustomization, render};
    if !prometheus_available() || !kubectl_available() {
        return;
    }
    let docs = documents(&render(&kustomization("overlays/example")));
    let pipeline = Pipeline::start(PipelineOptions {
        catalog: catalog(&[("A", 1000, 100)]),
        with_notifier: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let address = |url: &str| {
        url.trim_start_matches("http://")
            .trim_end_matches("/metrics")
            .trim_end_matches('/')
            .to_owned()
    };
    let meta = |s: &str| {
        s.chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect::<String>()
    };
    let mut groups = Vec::new();
    for set in docs.iter().filter(|d| d["kind"] == "StatefulSet") {
        let name = set["metadata"]["name"].as_str().unwrap();
        let stage = pipeline.stage(name);
        let pod_name = format!("{name}-0");
        let template = &set["spec"]["template"];
        let container = &template["spec"]["containers"][0];
        for port in container["ports"].as_array().unwrap() {
            let port_name = port["name"].as_str().unwrap();
            let target = match port_name {
                "grpc" => address(&stage.url()),
                "metrics" => address(stage.metrics_url().unwrap()),
                "http" => address(stage.http_url().unwrap()),
                other => panic!("{name}: unexpected port {other}"),
            };
            let mut labels = serde_json::Map::new();
            for (key, value) in template["metadata"]["labels"].as_object().unwrap() {
                labels.insert(
                    format!("__meta_kubernetes_pod_label_{}", meta(key)),
                    value.clone(),
                );
                labels.insert(
                    format!("__meta_kubernetes_pod_labelpresent_{}", meta(key)),
                    "true".into(),
                );
            }
            for (key, value) in [
                ("namespace", set["metadata"]["namespace"].as_str().unwrap()),
                ("pod_name", &pod_name),
                ("pod_container_name", container["name"].as_str().unwrap()),
                ("pod_container_port_name", port_name),
                (
                    "pod_container_port_number",
                    &port["containerPort"].to_string(),
                ),
                ("pod_container_port_protocol", "TCP"),
                ("pod_ready", "true"),
                ("pod_phase", "Running"),
            ] {
                labels.insert(format!("__meta_kubernetes_{key}"), value.into());
            }
            groups.push(serde_json::json!({ "targets": [target], "labels": labels }));
        }
    }
    // Someone else's pod with a port named metrics: not scraped.
    let receiver_metrics = address(pipeline.stage("receiver").metrics_url().unwrap());
    groups.push(serde_json::json!({
        "targets": [receiver_metrics],
        "labels": {
            "__meta_kubernetes_namespace": "default",
            "__meta_kubernetes_pod_name": "unrelated-0",
            "__meta_kubernetes_pod_label_app_kubernetes_io_part_of": "other",
            "__meta_kubernetes_pod_container_port_name": "metrics",
        },
    }));

    let dir = tempfile::tempdir().unwrap();
    let targets_file = dir.path().join("pods.json");
    std::fs::write(&targets_file, serde_json::to_string(&groups).unwrap()).unwrap();
    let shipped = std::fs::read_to_string(deploy().join("kubernetes.yml")).unwrap();
    let discovery = "    kubernetes_sd_configs:\n      - role: pod\n";
    assert!(shipped.contains(discovery), "{shipped}");
    let config = shipped.replace(
        discovery,
        &format!(
            "    file_sd_configs:\n      - files: [{:?}]\n",
            targets_file.display().to_string()
        ),
    );
    let prometheus = Prometheus::start_with(&config, dir).await;

    let up = prometheus
        .wait_for(r#"count(up{job="orderflow"} == 1) == 4"#, &[], |v| v == 4.0)
        .await;
    assert_eq!(up.len(), 1);
    let series = prometheus.query(r#"up{job="orderflow"}"#).await;
    let pods: std::collections::HashSet<&str> = series
        .iter()
        .map(|s| s["metric"]["pod"].as_str().unwrap())
        .collect();
    assert_eq!(
        pods,
        ["receiver-0", "stock-0", "invoice-0", "notifier-0"].into(),
        "{series:?}"
    );
    for s in &series {
        assert_eq!(s["metric"]["namespace"], "orderflow", "{s}");
        let stage = s["metric"]["pod"].as_str().unwrap().trim_end_matches("-0");
        let metrics = address(pipeline.stage(stage).metrics_url().unwrap());
        assert_eq!(s["metric"]["instance"], metrics.as_str(), "{s}");
    }
    // The stages' own labels survive next to the pod's: rules and dashboard read `stage`.
    prometheus
        .wait_for(
            r#"orderflow_store_healthy{job="orderflow", pod=~".+-0"}"#,
            &orderflow_e2e::STAGES,
            |v| v == 1.0,
        )
        .await;
}
