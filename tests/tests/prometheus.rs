//! The shipped Prometheus configuration and alerting rules (`deploy/prometheus/`), checked with the
//! real `promtool` and run by a real Prometheus scraping four real stages under load: every rule
//! evaluates without error, the dashboard's key expressions (orders/s, lag, p99) return data, and
//! dead letters really fire `OrderflowDeadLetters`.
//!
//! Needs Debian's `prometheus` package (`prometheus` and `promtool` on PATH). Without it the tests
//! say so and pass, unless `ORDERFLOW_REQUIRE_PROMETHEUS=1` (set by `.ci/run`) makes that a failure.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use orderflow_e2e::{Pipeline, PipelineOptions, catalog, free_ports, line, place_all};
use serde_json::Value;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus")
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
    assert!(checked.contains("7 rules found"), "{checked}");
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
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(deploy().join("alerts.yml"), dir.path().join("alerts.yml")).unwrap();
        // The shipped file with the compose service names swapped for the test's loopback ports.
        let shipped = std::fs::read_to_string(deploy().join("prometheus.yml")).unwrap();
        let compose_targets = r#"["receiver:9451", "stock:9452", "invoice:9453", "notifier:9454"]"#;
        assert!(shipped.contains(compose_targets), "{shipped}");
        let config = shipped
            .replace(compose_targets, &serde_json::to_string(targets).unwrap())
            .replace("scrape_interval: 5s", "scrape_interval: 1s")
            .replace("evaluation_interval: 15s", "evaluation_interval: 1s");
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).unwrap();
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
    // (confirmed or told it was not paid), so placed→notified has data too.
    let pipeline = Pipeline::start(PipelineOptions {
        catalog: catalog(&[("A", 1000, 1_000_000)]),
        with_notifier: true,
        invoice_args: ["--gateway-decline-rate", "0.5"].map(String::from).to_vec(),
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
    prometheus
        .wait_for("orderflow_store_healthy", &every_stage, |v| v == 1.0)
        .await;

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
        if rules.len() == 7 && rules.iter().all(|r| r["health"] == "ok") {
            break rules;
        }
        assert!(
            Instant::now() < deadline,
            "rules not all healthy: {rules:#?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    // Each metric a rule reads is one the stages export (a typo would evaluate to nothing, forever).
    let scraped: String = {
        let mut text = String::new();
        for stage in &pipeline.stages {
            text.push_str(&stage.scrape().await.unwrap().0);
        }
        text
    };
    for rule in &rules {
        let query = rule["query"].as_str().unwrap();
        for name in query
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("orderflow_"))
        {
            let series = name.trim_end_matches("_bucket");
            assert!(
                scraped.contains(series),
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
