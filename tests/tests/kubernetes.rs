//! The shipped Kubernetes manifests (`deploy/kubernetes/`): the base and the example overlay,
//! rendered by the real `kubectl kustomize`, validated strictly against the Kubernetes 1.32 schemas
//! (PyPI `kubernetes-validate`, offline), and checked for what the schemas cannot see: each stage a
//! StatefulSet behind its headless Service, probes on the stage's own gRPC port (readiness on the
//! whole server, liveness and start-up on the `liveness` name), its volume mounted where the stage
//! keeps its store, a PodDisruptionBudget, the image's user, every variable one the stage binary
//! takes, and every link naming a pod and port the manifests define. No cluster can run here;
//! `tests/tests/containers.rs` runs the rendered pods on Docker and `tests/tests/prometheus.rs`
//! runs the Kubernetes scrape config's relabelling on a real Prometheus.
//!
//! Needs `kubectl` (with its built-in kustomize). Without it the tests say so and pass, unless `CI`
//! is set.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::{HashMap, HashSet},
    io::{BufRead, BufReader},
    process::{Command, Stdio},
};

use orderflow_e2e::{
    STAGES, binary,
    kubernetes::{
        container_env, documents, kubectl_available, kustomization, render, resource, validate,
    },
};
use serde_json::Value;

/// The shipped kustomizations: the base and every overlay.
const KUSTOMIZATIONS: [&str; 3] = ["base", "overlays/example", "overlays/scaled"];

/// Variables every stage takes that are not its own flags (OpenTelemetry's and `tracing`'s).
const STANDARD_VARIABLES: [&str; 3] = [
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_TRACES_SAMPLER",
    "RUST_LOG",
];

/// Each stage's gRPC port and metrics port, as its binary defaults them.
fn default_ports(stage: &str) -> (u16, u16) {
    match stage {
        "receiver" => (50051, 9451),
        "stock" => (50052, 9452),
        "invoice" => (50053, 9453),
        _ => (50054, 9454),
    }
}

/// The variables `orderflow-<stage> --help` lists (`[env: NAME=…]`).
fn variables_taken(stage: &str) -> HashSet<String> {
    let output = Command::new(binary(&format!("orderflow-{stage}")))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&output.stdout);
    help.split("[env: ")
        .skip(1)
        .filter_map(|rest| rest.split(['=', ']']).next())
        .map(str::to_owned)
        .collect()
}

/// The user id the Dockerfile's images run as.
fn image_uid() -> u64 {
    let dockerfile =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../Dockerfile")).unwrap();
    dockerfile
        .split("--uid ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|uid| uid.parse().ok())
        .expect("the Dockerfile creates its user with --uid")
}

fn port_named(ports: &Value, name: &str) -> Option<u64> {
    ports
        .as_array()?
        .iter()
        .find(|p| p["name"] == name)
        .and_then(|p| p["containerPort"].as_u64().or(p["port"].as_u64()))
}

#[test]
fn manifests_render_validate_and_hold_together() {
    if !kubectl_available() {
        return;
    }
    let uid = image_uid();
    let mut partition_counts: HashMap<&str, u64> = HashMap::new();
    for dir in KUSTOMIZATIONS {
        let yaml = render(&kustomization(dir));
        if let Err(report) = validate(&yaml) {
            panic!("{dir} does not validate against Kubernetes:\n{report}");
        }
        let docs = documents(&yaml);
        let services: HashMap<&str, &Value> = docs
            .iter()
            .filter(|d| d["kind"] == "Service")
            .map(|d| (d["metadata"]["name"].as_str().unwrap(), d))
            .collect();
        let sets: HashMap<&str, &Value> = docs
            .iter()
            .filter(|d| d["kind"] == "StatefulSet")
            .map(|d| (d["metadata"]["name"].as_str().unwrap(), d))
            .collect();
        assert_eq!(
            sets.keys().copied().collect::<HashSet<_>>(),
            HashSet::from(STAGES),
            "{dir}: one StatefulSet per stage"
        );
        if dir == "overlays/scaled" {
            let replicas: Vec<u64> = STAGES
                .iter()
                .map(|stage| sets[stage]["spec"]["replicas"].as_u64().unwrap())
                .collect();
            assert!(replicas.iter().all(|n| *n > 1), "{dir}: {replicas:?}");
        }
        for stage in STAGES {
            let set = sets[stage];
            let spec = &set["spec"];
            let labels = spec["template"]["metadata"]["labels"].as_object().unwrap();
            let selects = |selector: &Value| {
                selector
                    .as_object()
                    .unwrap()
                    .iter()
                    .all(|(k, v)| labels.get(k) == Some(v))
            };
            assert!(selects(&spec["selector"]["matchLabels"]), "{dir} {stage}");

            // The governing Service: headless, listing unready pods (a full stage's log must stay
            // reachable for the pipeline to drain), selecting exactly this stage's pods.
            let governing = services[spec["serviceName"].as_str().unwrap()];
            assert_eq!(governing["spec"]["clusterIP"], "None", "{dir} {stage}");
            assert_eq!(governing["spec"]["publishNotReadyAddresses"], true);
            assert!(selects(&governing["spec"]["selector"]), "{dir} {stage}");
            for other in STAGES.iter().filter(|s| **s != stage) {
                let other_labels = &sets[other]["spec"]["template"]["metadata"]["labels"];
                let matches_other = governing["spec"]["selector"]
                    .as_object()
                    .unwrap()
                    .iter()
                    .all(|(k, v)| other_labels.get(k) == Some(v));
                assert!(!matches_other, "{dir}: {stage}'s Service selects {other}");
            }

            let pod = &spec["template"]["spec"];
            let containers = pod["containers"].as_array().unwrap();
            assert_eq!(containers.len(), 1, "{dir} {stage}");
            let container = &containers[0];
            let env: HashMap<String, String> =
                container_env(&docs, container, &format!("{stage}-0"))
                    .into_iter()
                    .collect();
            assert_eq!(env["ORDERFLOW_REPLICA"], format!("{stage}-0"), "{dir}");

            // Replicas: as many pods as the stage is told it has, at most one per partition, the
            // same partition count everywhere, and with several, the stage's own pods as peers.
            let replicas: u64 = env["ORDERFLOW_REPLICAS"].parse().unwrap();
            assert_eq!(spec["replicas"], replicas, "{dir} {stage}");
            let partitions: u64 = env["ORDERFLOW_PARTITIONS"].parse().unwrap();
            assert!(
                replicas <= partitions,
                "{dir} {stage}: more replicas than partitions"
            );
            assert_eq!(
                *partition_counts.entry(dir).or_insert(partitions),
                partitions,
                "{dir}: {stage} runs another partition count"
            );
            if replicas > 1 {
                let peers = env
                    .get("ORDERFLOW_PEERS")
                    .unwrap_or_else(|| panic!("{dir} {stage}: replicas but no ORDERFLOW_PEERS"));
                assert!(
                    peers.starts_with(&format!("http://{stage}-{{replica}}.")),
                    "{dir} {stage}: ORDERFLOW_PEERS={peers} names another stage's pods"
                );
            }

            // Ports: the ones the stage listens on, named for the Services and Prometheus.
            let (grpc, metrics) = default_ports(stage);
            let listen = env["ORDERFLOW_LISTEN"].clone();
            assert_eq!(listen, format!("0.0.0.0:{grpc}"), "{dir} {stage}");
            assert_eq!(
                env["ORDERFLOW_METRICS_LISTEN"],
                format!("0.0.0.0:{metrics}")
            );
            assert_eq!(port_named(&container["ports"], "grpc"), Some(grpc.into()));
            assert_eq!(
                port_named(&container["ports"], "metrics"),
                Some(metrics.into())
            );
            for port in governing["spec"]["ports"].as_array().unwrap() {
                let target = port["targetPort"].as_str().unwrap();
                assert!(
                    port_named(&container["ports"], target).is_some(),
                    "{dir} {stage}: Service port {target} is not a container port"
                );
            }

            // Probes on grpc.health.v1 at the stage's own port: readiness asks for the whole
            // server (the store can commit), liveness and start-up for the `liveness` name.
            let probe = |name: &str| &container[name]["grpc"];
            assert_eq!(probe("readinessProbe")["port"], grpc, "{dir} {stage}");
            assert!(probe("readinessProbe").get("service").is_none());
            for name in ["livenessProbe", "startupProbe"] {
                assert_eq!(probe(name)["port"], grpc, "{dir} {stage} {name}");
                assert_eq!(probe(name)["service"], "liveness", "{dir} {stage} {name}");
            }

            // The store lives on the claim template's volume, where ORDERFLOW_DATA_DIR points.
            let claims: Vec<&str> = spec["volumeClaimTemplates"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["metadata"]["name"].as_str().unwrap())
                .collect();
            let data_dir = env["ORDERFLOW_DATA_DIR"].as_str();
            let mount = container["volumeMounts"]
                .as_array()
                .unwrap()
                .iter()
                .find(|m| m["mountPath"] == data_dir)
                .unwrap_or_else(|| panic!("{dir} {stage}: nothing mounted at {data_dir}"));
            assert!(claims.contains(&mount["name"].as_str().unwrap()));

            // The image's own user, so the volume (fsGroup) is writable and nothing runs as root.
            let security = &pod["securityContext"];
            assert_eq!(security["runAsUser"], uid, "{dir} {stage}");
            assert_eq!(security["fsGroup"], uid, "{dir} {stage}");
            assert_eq!(security["runAsNonRoot"], true);
            assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);

            // SIGTERM: calls get the shutdown grace, background tasks as long again.
            let grace = env
                .get("ORDERFLOW_SHUTDOWN_GRACE")
                .map_or(10, |g| g.trim_end_matches('s').parse::<u64>().unwrap());
            assert!(
                pod["terminationGracePeriodSeconds"].as_u64().unwrap() > 2 * grace,
                "{dir} {stage}"
            );

            // Every variable is one the binary takes.
            let taken = variables_taken(stage);
            for name in env.keys() {
                assert!(
                    taken.contains(name) || STANDARD_VARIABLES.contains(&name.as_str()),
                    "{dir} {stage}: orderflow-{stage} does not take {name}"
                );
            }

            // Every link names the pods of a StatefulSet through its governing Service, `{replica}`
            // standing for their ordinal, and a port that Service has.
            for (name, value) in &env {
                let Some(rest) = value.strip_prefix("http://") else {
                    continue;
                };
                if name.starts_with("OTEL_") {
                    continue;
                }
                let (host, port) = rest.split_once(':').unwrap();
                let port: u64 = port.trim_end_matches('/').parse().unwrap();
                let (pod_name, service) = host.split_once('.').unwrap_or_else(|| {
                    panic!("{dir} {stage}: {name}={value} names no pod (<pod>.<service>)")
                });
                let target = services
                    .get(service)
                    .unwrap_or_else(|| panic!("{dir} {stage}: {name}: no Service {service}"));
                let (set_name, ordinal) = pod_name.rsplit_once('-').unwrap();
                let target_set = sets[set_name];
                assert_eq!(target_set["spec"]["serviceName"], service, "{name}");
                assert_eq!(ordinal, "{replica}", "{dir} {stage}: {name}={value}");
                let has_port = target["spec"]["ports"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|p| p["port"] == port);
                assert!(
                    has_port,
                    "{dir} {stage}: {name}: {service} has no port {port}"
                );
            }

            // At most one pod of the stage away at a time.
            let budget = docs
                .iter()
                .find(|d| {
                    d["kind"] == "PodDisruptionBudget"
                        && selects(&d["spec"]["selector"]["matchLabels"])
                })
                .unwrap_or_else(|| panic!("{dir} {stage}: no PodDisruptionBudget"));
            assert_eq!(budget["spec"]["maxUnavailable"], 1);
        }

        // Clients reach ready receivers on gRPC and HTTP.
        let api = services["receiver-api"];
        assert!(api["spec"].get("clusterIP").is_none());
        let receiver = &sets["receiver"]["spec"]["template"]["spec"]["containers"][0];
        for port in ["grpc", "http"] {
            assert!(port_named(&api["spec"]["ports"], port).is_some());
            assert!(port_named(&receiver["ports"], port).is_some());
        }
    }
}

/// A manifest the schemas refuse is caught: the check is not a formality.
#[test]
fn validation_refuses_a_misspelt_field() {
    if !kubectl_available() {
        return;
    }
    let yaml = render(&kustomization("base")).replacen("failureThreshold", "failureTreshold", 1);
    let report = validate(&yaml).expect_err("a misspelt field passed validation");
    assert!(report.contains("failureTreshold"), "{report}");
}

/// `kubectl scale statefulset stock --replicas 2` makes a pod `stock-1` with the same environment:
/// it must refuse to start (a second consumer of the receiver's log with a store of its own would
/// process every order again) and say why, before touching its volume, while `stock-0` with that
/// environment starts.
#[test]
fn a_pod_beyond_the_replicas_refuses_to_start() {
    if !kubectl_available() {
        return;
    }
    let docs = documents(&render(&kustomization("overlays/example")));
    let set = resource(&docs, "StatefulSet", "stock");
    let container = &set["spec"]["template"]["spec"]["containers"][0];
    let dir = tempfile::tempdir().unwrap();
    let start = |pod: &str| {
        let data = dir.path().join(pod);
        let child = Command::new(binary("orderflow-stock"))
            .env_clear()
            .envs(container_env(&docs, container, pod))
            // Loopback and a temp dir instead of the pod's network and volume; no collector.
            .env("ORDERFLOW_LISTEN", "127.0.0.1:0")
            .env("ORDERFLOW_METRICS_LISTEN", "none")
            .env("ORDERFLOW_DATA_DIR", &data)
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        (child, data)
    };

    let (second, data) = start("stock-1");
    let output = second.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{said}");
    assert!(
        said.contains("replica 1") && said.contains("scale the stage back to 1"),
        "{said}"
    );
    assert!(!data.exists(), "stock-1 touched its data directory");

    let (mut first, data) = start("stock-0");
    let mut lines = BufReader::new(first.stdout.take().unwrap()).lines();
    let listening = lines.any(|l| l.is_ok_and(|l| l.contains("listening on")));
    let _ = first.kill();
    let _ = first.wait();
    assert!(listening, "stock-0 did not start");
    assert!(data.join("stock.redb").exists());
}
