//! The shipped Kubernetes manifests (`deploy/kubernetes/`), rendered by the real `kubectl
//! kustomize` and read by PyYAML, and checked against the Kubernetes schemas by PyPI's
//! `kubernetes-validate` (offline). No cluster can run here.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use serde_json::Value;

use crate::{python, python_packages};

/// The Kubernetes version the manifests are validated against.
pub const KUBERNETES_VERSION: &str = "1.32.0";

/// `deploy/kubernetes/<dir>` in the repository.
pub fn kustomization(dir: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/kubernetes")
        .join(dir)
}

/// Whether `kubectl` (with its built-in kustomize) runs here; panics when CI requires it
/// (`CI=true`) and it does not.
pub fn kubectl_available() -> bool {
    let found = Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var("CI").is_err(),
            "kubectl is missing: the Kubernetes tests are mandatory in CI"
        );
        eprintln!("skipped: kubectl is not installed");
    }
    found
}

/// What `kubectl kustomize <dir>` prints: the rendered manifests as one multi-document YAML text.
pub fn render(dir: &Path) -> String {
    let output = Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .expect("running kubectl");
    assert!(
        output.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("kubectl prints UTF-8")
}

/// Every document of a multi-document YAML text, as JSON (PyYAML's `safe_load_all`).
pub fn documents(yaml: &str) -> Vec<Value> {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), yaml).unwrap();
    let output = Command::new(python())
        .env("PYTHONPATH", python_packages())
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps([d for d in yaml.safe_load_all(open(sys.argv[1])) if d]))",
        ])
        .arg(file.path())
        .output()
        .expect("running python3");
    assert!(
        output.status.success(),
        "not valid YAML: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// Validates rendered manifests against the Kubernetes [`KUBERNETES_VERSION`] schemas, strictly
/// (unknown fields are errors); the validator's report on failure.
pub fn validate(yaml: &str) -> Result<(), String> {
    let file = tempfile::Builder::new().suffix(".yaml").tempfile().unwrap();
    std::fs::write(file.path(), yaml).unwrap();
    let output = Command::new(python())
        .env("PYTHONPATH", python_packages())
        .args(["-m", "kubernetes_validate", "--strict", "--quiet", "-k"])
        .arg(KUBERNETES_VERSION)
        .arg(file.path())
        .output()
        .expect("running python3");
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

/// The one resource of `kind` named `name`.
pub fn resource<'a>(documents: &'a [Value], kind: &str, name: &str) -> &'a Value {
    documents
        .iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

/// The environment a stage's container gets in pod `pod_name`, in Kubernetes' order: every key of
/// the ConfigMaps it takes with `envFrom` (Secrets are left out: none is shipped), then its own
/// `env`, which wins (plain values, and the pod's name through `fieldRef`).
pub fn container_env(
    documents: &[Value],
    container: &Value,
    pod_name: &str,
) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = Vec::new();
    let mut set = |name: &str, value: &str| {
        env.retain(|(n, _)| n != name);
        env.push((name.to_owned(), value.to_owned()));
    };
    for source in container["envFrom"].as_array().into_iter().flatten() {
        if let Some(name) = source["configMapRef"]["name"].as_str() {
            let map = resource(documents, "ConfigMap", name);
            for (key, value) in map["data"].as_object().into_iter().flatten() {
                set(key, value.as_str().unwrap_or_default());
            }
        }
    }
    for var in container["env"].as_array().into_iter().flatten() {
        let value = match var["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            Some("metadata.name") => pod_name,
            _ => var["value"]
                .as_str()
                .unwrap_or_else(|| panic!("{var}: only plain values and the pod name are used")),
        };
        set(var["name"].as_str().unwrap(), value);
    }
    env
}
