//! Every manifest under `deploy/` checked the way a cluster and its proxies would check it,
//! without a cluster:
//!
//! - Istio objects against the `openAPIV3Schema` of their CRD, from the reference copies of
//!   istio/api's generated CRDs in `../shared/ref/istio/` (beside the repository, as CI has it;
//!   `SLUICE_SHARED_DIR` overrides). Fields a schema does not name are errors here (Kubernetes
//!   would prune them silently: a typo would be a setting that is never applied).
//! - Core objects with `kubernetes-validate` (pinned by `scripts/setup.sh` into `.venv`) in
//!   strict mode against Kubernetes 1.33's schemas.
//! - The EnvoyFilters' patches applied, the way istiod applies them, to a sidecar-shaped and a
//!   gateway-shaped Envoy configuration, which must then pass `envoy --mode validate`; and the
//!   sidecar one run for real: with the controller's ECDS server down it serves the control.
//! - The filter configurations inside the manifests parse with the filter's own parser and
//!   route everyone to the control; the rollout specs parse with the controller's; the module's
//!   path, the metric labels and the names agree across the files.
//! - The module the controller serves (`--serve-wasm`) is the built one, with its sha256.
//!
//! The WasmPlugin and TrafficExtension hold the placeholder `SLUICE_WASM_SHA256` where the
//! module's digest goes; the tests put in the digest the controller serves for the built
//! module, as docs/istio.md tells a user to.
//!
//! Needs `scripts/setup.sh` (Envoy, kubernetes-validate) and the filter built for wasm32.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use sluice_controller::wasm_module::WasmModule;
use sluice_tests::{filter_wasm, repo_root, wait_for, EnvoyConfig, HttpClient, Upstream};

const PLACEHOLDER: &str = "SLUICE_WASM_SHA256";
/// The Kubernetes version the core objects are checked against (k8s-openapi's feature too).
const KUBERNETES_VERSION: &str = "1.33.0";
/// The controller's Service name, as the manifests write it.
const CONTROLLER_HOST: &str = "sluice-controller.sluice-system.svc.cluster.local";

// ---------------------------------------------------------------------------------------------
// Reading the manifests

/// One YAML document of a file under `deploy/`.
#[derive(Debug, Clone)]
struct Manifest {
    file: PathBuf,
    index: usize,
    doc: Value,
}

impl Manifest {
    fn at(&self) -> String {
        format!(
            "{}#{} ({} {})",
            self.file
                .strip_prefix(repo_root())
                .unwrap_or(&self.file)
                .display(),
            self.index,
            self.doc["kind"].as_str().unwrap_or("?"),
            self.doc["metadata"]["name"].as_str().unwrap_or("?"),
        )
    }

    fn group(&self) -> &str {
        let api = self.doc["apiVersion"].as_str().unwrap_or_default();
        api.rsplit_once('/').map_or("", |(g, _)| g)
    }

    fn is_istio(&self) -> bool {
        self.group().ends_with(".istio.io")
    }
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.unwrap_or_else(|e| panic!("{e}")).path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            yaml_files(&p, out);
        } else if matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) {
            out.push(p);
        }
    }
}

/// Every document under `deploy/`, with the module digest put in.
fn manifests(sha256: &str) -> Vec<Manifest> {
    let mut files = Vec::new();
    yaml_files(&repo_root().join("deploy"), &mut files);
    assert!(!files.is_empty(), "no manifests under deploy/");
    let mut out = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()))
            .replace(PLACEHOLDER, sha256);
        let docs: Vec<Value> =
            serde_saphyr::from_multiple_with_options(&text, sluice_controller::yaml::options())
                .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        for (index, doc) in docs.into_iter().enumerate() {
            if doc.is_null() {
                continue;
            }
            out.push(Manifest {
                file: file.clone(),
                index,
                doc,
            });
        }
    }
    out
}

fn find<'a>(all: &'a [Manifest], kind: &str, name: &str, file_part: &str) -> &'a Manifest {
    all.iter()
        .find(|m| {
            m.doc["kind"] == kind
                && m.doc["metadata"]["name"] == name
                && m.file.to_string_lossy().contains(file_part)
        })
        .unwrap_or_else(|| panic!("no {kind} {name} in a file matching {file_part}"))
}

/// The filter module the tests serve, and its digest as the controller computes it.
fn module() -> WasmModule {
    let path = filter_wasm().unwrap_or_else(|e| panic!("{e}"));
    WasmModule::load(&path).unwrap_or_else(|e| panic!("{e}"))
}

// ---------------------------------------------------------------------------------------------
// Istio objects against their CRDs

fn shared_dir() -> PathBuf {
    match std::env::var_os("SLUICE_SHARED_DIR") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => repo_root().join("../shared"),
    }
}

/// The CRDs in `../shared/ref/istio/`.
fn crds() -> Vec<Value> {
    let dir = shared_dir().join("ref/istio");
    let mut files = Vec::new();
    yaml_files(&dir, &mut files);
    assert!(
        !files.is_empty(),
        "no CRDs in {} (the shared/ folder beside the repository; SLUICE_SHARED_DIR overrides)",
        dir.display()
    );
    files
        .iter()
        .map(|f| {
            let text = std::fs::read_to_string(f).unwrap_or_else(|e| panic!("{e}"));
            let v: Value =
                serde_saphyr::from_str_with_options(&text, sluice_controller::yaml::options())
                    .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            v
        })
        .filter(|v| v["kind"] == "CustomResourceDefinition")
        .collect()
}

/// An OpenAPI v3 schema of a CRD as plain JSON Schema (draft 4), made strict: an object
/// schema that names its properties and does not keep unknown fields allows no others.
fn strict_schema(s: &Value) -> Value {
    match s {
        Value::Object(map) => {
            let mut out: serde_json::Map<String, Value> = map
                .iter()
                .map(|(k, v)| {
                    let v = match k.as_str() {
                        // Maps of names to schemas: convert each schema, not the map.
                        "properties" | "patternProperties" | "definitions" => Value::Object(
                            v.as_object()
                                .map(|m| {
                                    m.iter()
                                        .map(|(k, v)| (k.clone(), strict_schema(v)))
                                        .collect()
                                })
                                .unwrap_or_default(),
                        ),
                        // Enum values and required names are data, not schemas.
                        "enum" | "required" | "x-kubernetes-list-map-keys" => v.clone(),
                        _ => strict_schema(v),
                    };
                    (k.clone(), v)
                })
                .collect();
            if out.get("nullable") == Some(&Value::Bool(true)) {
                if let Some(Value::String(t)) = out.get("type").cloned() {
                    out.insert("type".into(), json!([t, "null"]));
                }
            }
            if out.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true)) {
                out.remove("type");
                out.insert("type".into(), json!(["integer", "string"]));
            }
            let keeps_unknown =
                out.get("x-kubernetes-preserve-unknown-fields") == Some(&json!(true));
            if out.contains_key("properties")
                && !out.contains_key("additionalProperties")
                && !keeps_unknown
            {
                out.insert("additionalProperties".into(), Value::Bool(false));
            }
            Value::Object(out)
        }
        Value::Array(items) => Value::Array(items.iter().map(strict_schema).collect()),
        other => other.clone(),
    }
}

/// The strict schema of `spec` for an object of `apiVersion` and `kind`, or why there is none.
fn spec_schema(crds: &[Value], api_version: &str, kind: &str) -> Result<Value, String> {
    let (group, version) = api_version
        .rsplit_once('/')
        .ok_or_else(|| format!("apiVersion {api_version:?} has no group"))?;
    let crd = crds
        .iter()
        .find(|c| c["spec"]["group"] == group && c["spec"]["names"]["kind"] == kind)
        .ok_or_else(|| format!("no CRD for {kind} in group {group}"))?;
    let v = crd["spec"]["versions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|v| v["name"] == version)
        .ok_or_else(|| format!("{kind}: the CRD has no version {version}"))?;
    if v["served"] != true {
        return Err(format!("{kind}: version {version} is not served"));
    }
    let spec = &v["schema"]["openAPIV3Schema"]["properties"]["spec"];
    if spec.is_null() {
        return Err(format!("{kind} {version}: no spec schema"));
    }
    Ok(strict_schema(spec))
}

/// Every schema violation of an Istio object, each naming its path.
fn istio_problems(crds: &[Value], m: &Manifest) -> Vec<String> {
    let mut problems = Vec::new();
    let obj = m.doc.as_object().cloned().unwrap_or_default();
    for k in obj.keys() {
        if !["apiVersion", "kind", "metadata", "spec"].contains(&k.as_str()) {
            problems.push(format!("/{k}: not a field of a custom resource"));
        }
    }
    for field in ["name", "namespace"] {
        if !m.doc["metadata"][field].is_string() {
            problems.push(format!("/metadata/{field}: missing"));
        }
    }
    let schema = match spec_schema(
        crds,
        m.doc["apiVersion"].as_str().unwrap_or_default(),
        m.doc["kind"].as_str().unwrap_or_default(),
    ) {
        Ok(s) => s,
        Err(e) => {
            problems.push(e);
            return problems;
        }
    };
    let validator = jsonschema::options()
        .with_draft(jsonschema::Draft::Draft4)
        .build(&schema)
        .unwrap_or_else(|e| panic!("{}: the CRD schema does not compile: {e}", m.at()));
    for e in validator.iter_errors(&m.doc["spec"]) {
        problems.push(format!("/spec{}: {e}", e.instance_path()));
    }
    problems
}

#[test]
fn istio_objects_match_their_crds() {
    let crds = crds();
    let all = manifests(&"0".repeat(64));
    let istio: Vec<&Manifest> = all.iter().filter(|m| m.is_istio()).collect();
    let kinds: std::collections::BTreeSet<&str> = istio
        .iter()
        .filter_map(|m| m.doc["kind"].as_str())
        .collect();
    for kind in [
        "EnvoyFilter",
        "WasmPlugin",
        "TrafficExtension",
        "VirtualService",
        "DestinationRule",
    ] {
        assert!(kinds.contains(kind), "deploy/ has no {kind}: {kinds:?}");
    }
    let mut failures = Vec::new();
    for m in &istio {
        for p in istio_problems(&crds, m) {
            failures.push(format!("{}: {p}", m.at()));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The schema check finds what a reviewer would: misspelt fields, wrong enum values and types,
/// a digest that is not one, deep inside the spec too.
#[test]
fn schema_check_rejects_broken_istio_objects() {
    let crds = crds();
    let all = manifests(&"0".repeat(64));
    let plugin = find(&all, "WasmPlugin", "sluice", "wasmplugin.yaml");
    let extension = find(&all, "TrafficExtension", "sluice", "trafficextension.yaml");
    let filter = find(&all, "EnvoyFilter", "sluice", "envoyfilter-sidecar.yaml");
    let vs = find(&all, "VirtualService", "ranker", "routing.yaml");
    let cases: Vec<(&Manifest, &str, Value, &str)> = vec![
        (
            plugin,
            "/spec/failStratgy",
            json!("FAIL_OPEN"),
            "failStratgy",
        ),
        (plugin, "/spec/failStrategy", json!("OPEN"), "OPEN"),
        (plugin, "/spec/sha256", json!(PLACEHOLDER), "sha256"),
        (plugin, "/spec/match/0/mode", json!("OUTBOUND"), "mode"),
        (
            plugin,
            "/spec/match/0/ports/0/number",
            json!("8080"),
            "number",
        ),
        (plugin, "/spec/phase", json!("ROUTER"), "phase"),
        (extension, "/spec/wasm/sha256", json!("ABC"), "sha256"),
        (extension, "/spec/url", json!("http://x"), "url"),
        (
            filter,
            "/spec/configPatches/0/applyTo",
            json!("CLUSTERS"),
            "applyTo",
        ),
        (
            filter,
            "/spec/configPatches/1/match/listener/portNumber",
            json!("http"),
            "portNumber",
        ),
        (
            filter,
            "/spec/workloadSelector/label",
            json!({"a": "b"}),
            "label",
        ),
        (
            vs,
            "/spec/http/0/match/0/headers/x-sluice-variant/exactly",
            json!("canary"),
            "exactly",
        ),
        (vs, "/spec/http/1/route/0/weight", json!(1.5), "weight"),
    ];
    for (m, pointer, value, mention) in cases {
        let mut broken = m.clone();
        set(&mut broken.doc, pointer, value.clone());
        let problems = istio_problems(&crds, &broken);
        assert!(
            problems.iter().any(|p| p.contains(mention)),
            "{} with {pointer} = {value}: expected a problem naming {mention:?}, got {problems:?}",
            m.at()
        );
    }
    // And the unbroken ones pass, so the failures above are the edits' doing.
    for m in [plugin, extension, filter, vs] {
        assert!(istio_problems(&crds, m).is_empty(), "{}", m.at());
    }
}

/// Sets the value at a JSON pointer, creating the last key if it is missing.
fn set(doc: &mut Value, pointer: &str, value: Value) {
    let (parent, key) = pointer.rsplit_once('/').unwrap_or(("", pointer));
    let target = doc
        .pointer_mut(parent)
        .unwrap_or_else(|| panic!("no {parent} in the document"));
    match target {
        Value::Object(map) => {
            map.insert(key.to_string(), value);
        }
        Value::Array(items) => {
            let i: usize = key.parse().unwrap_or_else(|e| panic!("{pointer}: {e}"));
            items[i] = value;
        }
        other => panic!("{parent} is {other}, not a container"),
    }
}

// ---------------------------------------------------------------------------------------------
// Core objects with kubernetes-validate

fn kubernetes_validate() -> PathBuf {
    let path = match std::env::var_os("KUBERNETES_VALIDATE") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => repo_root().join(".venv/bin/kubernetes-validate"),
    };
    assert!(
        path.is_file(),
        "{} is missing: run scripts/setup.sh",
        path.display()
    );
    path
}

/// Runs the validator over `docs`, each in its own file; the validator's output if it refuses.
fn validate_core(docs: &[&Manifest]) -> Result<(), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let mut files = Vec::new();
    for (i, m) in docs.iter().enumerate() {
        let p = dir.path().join(format!("{i}.yaml"));
        let text = serde_saphyr::to_string(&m.doc).map_err(|e| e.to_string())?;
        std::fs::write(&p, text).map_err(|e| e.to_string())?;
        files.push(p);
    }
    let out = Command::new(kubernetes_validate())
        .args(["--strict", "--quiet", "-k", KUBERNETES_VERSION])
        .args(&files)
        .output()
        .map_err(|e| format!("running kubernetes-validate: {e}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() && !text.contains("ERROR") {
        Ok(())
    } else {
        let names: Vec<String> = docs.iter().map(|m| m.at()).collect();
        Err(format!("{}\n(files 0..: {})", text, names.join(", ")))
    }
}

#[test]
fn core_objects_match_kubernetes_schemas() {
    let all = manifests(&"0".repeat(64));
    let core: Vec<&Manifest> = all.iter().filter(|m| !m.is_istio()).collect();
    let kinds: std::collections::BTreeSet<&str> =
        core.iter().filter_map(|m| m.doc["kind"].as_str()).collect();
    for kind in [
        "Deployment",
        "Service",
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "ConfigMap",
    ] {
        assert!(kinds.contains(kind), "deploy/ has no {kind}: {kinds:?}");
    }
    if let Err(e) = validate_core(&core) {
        panic!("{e}");
    }
}

#[test]
fn core_validation_rejects_broken_objects() {
    let all = manifests(&"0".repeat(64));
    let deployment = find(&all, "Deployment", "sluice-controller", "controller.yaml");
    let service = find(&all, "Service", "sluice-controller", "controller.yaml");
    let role = find(&all, "Role", "sluice-controller", "rbac.yaml");
    for (m, pointer, value) in [
        (
            deployment,
            "/spec/template/spec/containers/0/imagePullPolice",
            json!("Always"),
        ),
        (deployment, "/spec/replicas", json!("one")),
        (service, "/spec/ports/0/port", json!("http")),
        (role, "/rules/0/verb", json!(["get"])),
    ] {
        let mut broken = m.clone();
        set(&mut broken.doc, pointer, value.clone());
        assert!(
            validate_core(&[&broken]).is_err(),
            "{} with {pointer} = {value} passed",
            m.at()
        );
    }
    assert_eq!(validate_core(&[deployment, service, role]), Ok(()));
}

// ---------------------------------------------------------------------------------------------
// What the manifests say, beyond their schemas

/// The RBAC lets the istioWasmPlugin sink read and patch both kinds it writes, and nothing else.
#[test]
fn rbac_covers_what_the_wasmplugin_sink_does() {
    let all = manifests(&"0".repeat(64));
    let role = find(&all, "Role", "sluice-controller", "rbac.yaml");
    let binding = find(&all, "RoleBinding", "sluice-controller", "rbac.yaml");
    let plugin = find(&all, "WasmPlugin", "sluice", "wasmplugin.yaml");
    let deployment = find(&all, "Deployment", "sluice-controller", "controller.yaml");
    assert_eq!(
        role.doc["metadata"]["namespace"],
        plugin.doc["metadata"]["namespace"]
    );
    let rules = role.doc["rules"].as_array().cloned().unwrap_or_default();
    assert_eq!(rules.len(), 1, "{rules:?}");
    assert_eq!(rules[0]["apiGroups"], json!(["extensions.istio.io"]));
    assert_eq!(
        rules[0]["resources"],
        json!(["wasmplugins", "trafficextensions"])
    );
    assert_eq!(rules[0]["verbs"], json!(["get", "update"]));
    let sa = &binding.doc["subjects"][0];
    assert_eq!(
        sa["name"],
        deployment.doc["spec"]["template"]["spec"]["serviceAccountName"]
    );
    assert_eq!(sa["namespace"], deployment.doc["metadata"]["namespace"]);
}

/// Each filter configuration in the manifests is one the filter accepts and that sends every
/// user to the control (the default until the controller's first push).
#[test]
fn shipped_filter_configs_are_control_only() {
    let all = manifests(&"0".repeat(64));
    // (where, config, whether it reaches the filter through protobuf Struct)
    let mut configs: Vec<(String, Value, bool)> = Vec::new();
    for m in &all {
        match m.doc["kind"].as_str() {
            Some("WasmPlugin") => {
                configs.push((m.at(), m.doc["spec"]["pluginConfig"].clone(), true));
            }
            Some("TrafficExtension") => {
                configs.push((m.at(), m.doc["spec"]["wasm"]["pluginConfig"].clone(), true));
            }
            Some("EnvoyFilter") => {
                for p in m.doc["spec"]["configPatches"]
                    .as_array()
                    .into_iter()
                    .flatten()
                {
                    let c = &p["patch"]["value"]["config_discovery"]["default_config"]["config"]
                        ["configuration"]["value"];
                    if let Some(text) = c.as_str() {
                        let v: Value = serde_json::from_str(text)
                            .unwrap_or_else(|e| panic!("{}: default config: {e}", m.at()));
                        configs.push((m.at(), v, false));
                    }
                }
            }
            _ => {}
        }
    }
    assert_eq!(configs.len(), 4, "{configs:?}");
    for (at, config, via_struct) in configs {
        // As istiod hands pluginConfig over: through protobuf Struct, numbers as floats.
        let floats = floats_everywhere(&config);
        let forms = if via_struct {
            vec![&config, &floats]
        } else {
            vec![&config]
        };
        for c in forms {
            let bytes = serde_json::to_vec(c).unwrap_or_default();
            let plan = sluice_filter::config::Plan::from_json(&bytes)
                .unwrap_or_else(|e| panic!("{at}: the filter refuses {c}: {e}"));
            let experiments = &c["experiments"];
            assert!(
                experiments.as_array().is_some_and(|a| !a.is_empty()),
                "{at}"
            );
            for e in experiments.as_array().into_iter().flatten() {
                for v in e["variants"].as_array().into_iter().flatten() {
                    let weight = v["weight"].as_f64().unwrap_or(0.0);
                    assert!(
                        v["control"] == true || weight == 0.0,
                        "{at}: {} gets {weight} %",
                        v["name"]
                    );
                }
            }
            drop(plan);
        }
    }
}

fn floats_everywhere(v: &Value) -> Value {
    match v {
        Value::Number(n) => n
            .as_f64()
            .and_then(serde_json::Number::from_f64)
            .map_or(Value::Null, Value::Number),
        Value::Array(a) => Value::Array(a.iter().map(floats_everywhere).collect()),
        Value::Object(o) => Value::Object(
            o.iter()
                .map(|(k, v)| (k.clone(), floats_everywhere(v)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// The VirtualService routes each variant the filter can name to the DestinationRule subset
/// of that name, on the header the filter sets.
#[test]
fn routing_matches_the_filter_header_and_subsets() {
    let all = manifests(&"0".repeat(64));
    let vs = find(&all, "VirtualService", "ranker", "routing.yaml");
    let dr = find(&all, "DestinationRule", "ranker", "routing.yaml");
    let subsets: Vec<&str> = dr.doc["spec"]["subsets"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["name"].as_str())
        .collect();
    let plugin = find(&all, "WasmPlugin", "sluice", "wasmplugin.yaml");
    let experiment = &plugin.doc["spec"]["pluginConfig"]["experiments"][0];
    let header = experiment["header"].as_str().unwrap_or("x-sluice-variant");
    let mut routed = BTreeMap::new();
    for route in vs.doc["spec"]["http"].as_array().into_iter().flatten() {
        let dest = &route["route"][0]["destination"];
        assert_eq!(dest["host"], dr.doc["spec"]["host"]);
        let subset = dest["subset"].as_str().unwrap_or_default();
        assert!(subsets.contains(&subset), "{subset} not in {subsets:?}");
        let variant = route["match"][0]["headers"][header]["exact"]
            .as_str()
            .unwrap_or("<default>");
        routed.insert(variant.to_string(), subset.to_string());
    }
    let control = experiment["variants"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|v| v["control"] == true)
        .and_then(|v| v["name"].as_str())
        .unwrap_or_default();
    for v in experiment["variants"].as_array().into_iter().flatten() {
        let name = v["name"].as_str().unwrap_or_default();
        if name != control {
            assert_eq!(
                routed.get(name).map(String::as_str),
                Some(name),
                "{routed:?}"
            );
        }
    }
    assert_eq!(
        routed.get("<default>").map(String::as_str),
        Some(control),
        "{routed:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// EnvoyFilter patches, applied as istiod applies them

/// Where an Envoy stands: what an EnvoyFilter's `workloadSelector` and `match.context` see.
struct Proxy {
    /// `sidecar` or `gateway`.
    kind: &'static str,
    labels: BTreeMap<String, String>,
    /// Listener name → the patch context its traffic belongs to.
    contexts: BTreeMap<String, &'static str>,
}

/// Applies `filter`'s patches to `config` (an Envoy bootstrap with static resources). Only the
/// operations the manifests use are known; anything else is an error, as is a patch that
/// matches nothing (istiod would skip it silently, leaving a mesh without the filter).
/// Returns the number of places each patch applied to.
fn apply_envoy_filter(
    config: &mut Value,
    proxy: &Proxy,
    filter: &Value,
) -> Result<Vec<usize>, String> {
    let spec = &filter["spec"];
    if let Some(want) = spec["workloadSelector"]["labels"].as_object() {
        let selected = want
            .iter()
            .all(|(k, v)| proxy.labels.get(k).map(String::as_str) == v.as_str());
        if !selected {
            return Ok(Vec::new());
        }
    }
    let mut applied = Vec::new();
    for (i, p) in spec["configPatches"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        let context = p["match"]["context"].as_str().unwrap_or("ANY");
        let op = p["patch"]["operation"].as_str().unwrap_or_default();
        let value = p["patch"]["value"].clone();
        let n = match (p["applyTo"].as_str(), op) {
            (Some("CLUSTER"), "ADD") => {
                let fits = matches!(
                    (context, proxy.kind),
                    ("ANY", _)
                        | ("GATEWAY", "gateway")
                        | ("SIDECAR_OUTBOUND" | "SIDECAR_INBOUND", "sidecar")
                );
                if fits {
                    let clusters = config["static_resources"]["clusters"]
                        .as_array_mut()
                        .ok_or("the configuration has no clusters")?;
                    clusters.push(value);
                    1
                } else {
                    0
                }
            }
            (Some("HTTP_FILTER"), "INSERT_BEFORE") => {
                insert_http_filter(config, proxy, context, &p["match"]["listener"], value)?
            }
            (to, op) => return Err(format!("configPatches[{i}]: {to:?} {op} is not known here")),
        };
        if n == 0 {
            return Err(format!("configPatches[{i}] matched nothing"));
        }
        applied.push(n);
    }
    Ok(applied)
}

fn insert_http_filter(
    config: &mut Value,
    proxy: &Proxy,
    context: &str,
    m: &Value,
    value: Value,
) -> Result<usize, String> {
    let network = m["filterChain"]["filter"]["name"]
        .as_str()
        .unwrap_or_default();
    let before = m["filterChain"]["filter"]["subFilter"]["name"]
        .as_str()
        .ok_or("INSERT_BEFORE needs subFilter.name")?;
    let mut n = 0;
    let listeners = config["static_resources"]["listeners"]
        .as_array_mut()
        .ok_or("the configuration has no listeners")?;
    for l in listeners {
        let name = l["name"].as_str().unwrap_or_default().to_string();
        let here = proxy.contexts.get(&name).copied().unwrap_or("NONE");
        if context != "ANY" && context != here {
            continue;
        }
        if let Some(port) = m["portNumber"].as_u64() {
            if l["address"]["socket_address"]["port_value"].as_u64() != Some(port) {
                continue;
            }
        }
        if let Some(want) = m["name"].as_str() {
            if want != name {
                continue;
            }
        }
        for chain in l["filter_chains"].as_array_mut().into_iter().flatten() {
            for f in chain["filters"].as_array_mut().into_iter().flatten() {
                if f["name"] != network {
                    continue;
                }
                let Some(filters) = f["typed_config"]["http_filters"].as_array_mut() else {
                    continue;
                };
                if let Some(at) = filters.iter().position(|h| h["name"] == before) {
                    filters.insert(at, value.clone());
                    n += 1;
                }
            }
        }
    }
    Ok(n)
}

/// A sidecar-shaped Envoy: Istio's listener and cluster names and the node metadata istiod
/// selects on, an outbound HTTP listener on the model's port whose routes are what the
/// VirtualService in deploy/istio/routing.yaml makes of it, an inbound listener, the admin on
/// 15000. Static resources stand in for what istiod would send over ADS.
fn sidecar_config(labels: &BTreeMap<String, String>) -> Value {
    let host = "ranker.models.svc.cluster.local";
    let cluster = |subset: &str, port: u16| {
        let name = format!("outbound|8080|{subset}|{host}");
        json!({
            "name": name,
            "type": "STATIC",
            "connect_timeout": "1s",
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}
            ]}]}
        })
    };
    let router = json!({
        "name": "envoy.filters.http.router",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}
    });
    let hcm = |stat: &str, routes: Value, filters: Value| {
        json!({
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": stat,
                "route_config": {"name": "8080", "virtual_hosts": [{"name": format!("{host}:8080"), "domains": ["*"], "routes": routes}]},
                "http_filters": filters
            }
        })
    };
    let outbound_routes = json!([
        {"name": "canary", "match": {"prefix": "/", "headers": [{"name": "x-sluice-variant", "string_match": {"exact": "canary"}}]},
         "route": {"cluster": format!("outbound|8080|canary|{host}")}},
        {"name": "control", "match": {"prefix": "/"}, "route": {"cluster": format!("outbound|8080|stable|{host}")}}
    ]);
    let fault = json!({
        "name": "envoy.filters.http.fault",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"}
    });
    let cors = json!({
        "name": "envoy.filters.http.cors",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors"}
    });
    json!({
        "node": {
            "id": "sidecar~10.1.2.3~frontend-7d9c.models~models.svc.cluster.local",
            "cluster": "frontend.models",
            "metadata": {"LABELS": labels, "NAMESPACE": "models", "CLUSTER_ID": "Kubernetes"}
        },
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 15000}}},
        // What istiod's bootstrap makes of ProxyConfig extraStatTags (the list in frontend.yaml).
        "stats_config": {
            "use_all_default_tags": false,
            "stats_tags": sluice_filter::metrics::LABELS.iter().map(|t| json!({
                "tag_name": t,
                "regex": format!("({t}=\\.=(.*?);\\.;)"),
            })).collect::<Vec<_>>(),
        },
        "static_resources": {
            "listeners": [
                {
                    "name": "0.0.0.0_8080",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": 8080}},
                    "traffic_direction": "OUTBOUND",
                    "filter_chains": [{"filters": [hcm("outbound_0.0.0.0_8080", outbound_routes, json!([fault, cors, router]))]}]
                },
                {
                    "name": "virtualInbound",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": 15006}},
                    "traffic_direction": "INBOUND",
                    "filter_chains": [{"filters": [hcm("inbound_0.0.0.0_8080",
                        json!([{"match": {"prefix": "/"}, "route": {"cluster": "inbound|8080||"}}]),
                        json!([fault, router]))]}]
                }
            ],
            "clusters": [
                cluster("stable", 18081),
                cluster("canary", 18082),
                {
                    "name": "inbound|8080||",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "load_assignment": {"cluster_name": "inbound|8080||", "endpoints": [{"lb_endpoints": [
                        {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 18083}}}}
                    ]}]}
                }
            ]
        }
    })
}

fn sidecar(labels: &[(&str, &str)]) -> (Value, Proxy) {
    let labels: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let config = sidecar_config(&labels);
    let proxy = Proxy {
        kind: "sidecar",
        labels,
        contexts: [
            ("0.0.0.0_8080".to_string(), "SIDECAR_OUTBOUND"),
            ("virtualInbound".to_string(), "SIDECAR_INBOUND"),
        ]
        .into_iter()
        .collect(),
    };
    (config, proxy)
}

/// A gateway-shaped Envoy: the same outbound routes on the gateway's HTTP listener.
fn gateway() -> (Value, Proxy) {
    let labels: BTreeMap<String, String> =
        [("istio", "ingressgateway"), ("app", "istio-ingressgateway")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
    let mut config = sidecar_config(&labels);
    config["node"]["id"] = json!(
        "router~10.1.2.9~istio-ingressgateway-5f4.istio-system~istio-system.svc.cluster.local"
    );
    config["static_resources"]["listeners"][0]["name"] = json!("0.0.0.0_8080");
    let proxy = Proxy {
        kind: "gateway",
        labels,
        contexts: [
            ("0.0.0.0_8080".to_string(), "GATEWAY"),
            ("virtualInbound".to_string(), "GATEWAY"),
        ]
        .into_iter()
        .collect(),
    };
    (config, proxy)
}

fn write_config(config: &Value) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let path = dir.path().join("envoy.yaml");
    let text = serde_saphyr::to_string(config).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("{e}"));
    (dir, path)
}

fn http_filter_names(config: &Value, listener: usize) -> Vec<String> {
    config["static_resources"]["listeners"][listener]["filter_chains"][0]["filters"][0]
        ["typed_config"]["http_filters"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|f| f["name"].as_str().map(String::from))
        .collect()
}

#[test]
fn envoyfilter_patches_give_a_valid_sidecar_and_gateway() {
    let module = module();
    let all = manifests(module.sha256());
    for (file, (mut config, proxy)) in [
        (
            "envoyfilter-sidecar.yaml",
            sidecar(&[("app", "frontend"), ("sluice.dev/filter", "enabled")]),
        ),
        ("envoyfilter-gateway.yaml", gateway()),
    ] {
        let filter = all
            .iter()
            .find(|m| m.doc["kind"] == "EnvoyFilter" && m.file.ends_with(file))
            .unwrap_or_else(|| panic!("no EnvoyFilter in {file}"));
        let applied = apply_envoy_filter(&mut config, &proxy, &filter.doc)
            .unwrap_or_else(|e| panic!("{}: {e}", filter.at()));
        assert_eq!(applied, vec![1, 1], "{}", filter.at());
        // Before the router of the model's listener, after the filters that were there.
        assert_eq!(
            http_filter_names(&config, 0),
            [
                "envoy.filters.http.fault",
                "envoy.filters.http.cors",
                "sluice",
                "envoy.filters.http.router"
            ],
            "{}",
            filter.at()
        );
        let (_dir, path) = write_config(&config);
        EnvoyConfig::new(&path)
            .wasm(filter_wasm().unwrap_or_else(|e| panic!("{e}")))
            .validate()
            .unwrap_or_else(|e| panic!("{}: {e}", filter.at()));
    }
}

/// The applier and Envoy both catch what would leave a proxy without the filter or refuse it.
#[test]
fn envoyfilter_checks_catch_broken_patches() {
    let module = module();
    let all = manifests(module.sha256());
    let filter = find(&all, "EnvoyFilter", "sluice", "envoyfilter-sidecar.yaml");

    // A workload without the label is not selected: nothing changes.
    let (mut config, proxy) = sidecar(&[("app", "frontend")]);
    let before = config.clone();
    assert_eq!(
        apply_envoy_filter(&mut config, &proxy, &filter.doc),
        Ok(Vec::new())
    );
    assert_eq!(config, before);

    let labels = [("sluice.dev/filter", "enabled")];
    // A router name istiod would not find: the patch matches nothing.
    let mut wrong_router = filter.doc.clone();
    set(
        &mut wrong_router,
        "/spec/configPatches/1/match/listener/filterChain/filter/subFilter/name",
        json!("envoy.router"),
    );
    let (mut config, proxy) = sidecar(&labels);
    let e = apply_envoy_filter(&mut config, &proxy, &wrong_router).unwrap_err();
    assert!(e.contains("configPatches[1] matched nothing"), "{e}");
    // Another port: same.
    let mut other_port = filter.doc.clone();
    set(
        &mut other_port,
        "/spec/configPatches/1/match/listener/portNumber",
        json!(9999),
    );
    let (mut config, proxy) = sidecar(&labels);
    assert!(apply_envoy_filter(&mut config, &proxy, &other_port).is_err());

    // Envoy refuses a filter whose ECDS cluster is not there, and a misspelt field.
    let value = "/spec/configPatches/1/patch/value";
    for (pointer, v) in [
        (
            format!("{value}/config_discovery/config_source/api_config_source/grpc_services/0/envoy_grpc/cluster_name"),
            json!("sluice-missing"),
        ),
        (format!("{value}/config_discovery/apply_default_config_without_warmup"), json!(true)),
        (
            format!("{value}/config_discovery/default_config/config/vm_config/code/local/file_name"),
            json!("x.wasm"),
        ),
    ] {
        let mut broken = filter.doc.clone();
        set(&mut broken, &pointer, v.clone());
        let (mut config, proxy) = sidecar(&labels);
        apply_envoy_filter(&mut config, &proxy, &broken).unwrap_or_else(|e| panic!("{e}"));
        let (_dir, path) = write_config(&config);
        assert!(
            EnvoyConfig::new(&path).wasm(filter_wasm().unwrap_or_else(|e| panic!("{e}"))).validate().is_err(),
            "envoy accepted {pointer} = {v}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The served module, end to end

/// Serves `module` the way `sluice run --serve-wasm` does (the daemon's endpoint, no rollouts),
/// accepting the Service's name as a host.
async fn serve_module(
    module: WasmModule,
) -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let listener = sluice_controller::api::bind(([127, 0, 0, 1], 0).into())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let access = sluice_controller::api::Access {
        token: "test-token-0123456789abcdef".into(),
        allowed_hosts: vec![CONTROLLER_HOST.into()],
    };
    tokio::spawn(sluice_controller::api::serve(
        listener,
        Arc::new(BTreeMap::new()),
        access,
        Some(Arc::new(module)),
        async move {
            let _ = stopped.await;
        },
    ));
    (addr, stop)
}

#[tokio::test]
async fn controller_serves_the_module_with_its_digest() -> anyhow::Result<()> {
    let path = filter_wasm()?;
    let bytes = std::fs::read(&path)?;
    let expected: String = Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let module = WasmModule::load(&path)?;
    let (addr, _stop) = serve_module(module).await;
    let http = HttpClient::new();
    let got = http
        .get(&format!("http://{addr}/wasm/sluice_filter.wasm"))
        .await?;
    assert_eq!(got.status, 200);
    assert_eq!(got.header("content-type"), Some("application/wasm"));
    assert_eq!(got.header("x-sluice-sha256"), Some(expected.as_str()));
    assert!(
        got.body.as_ref() == bytes.as_slice(),
        "served bytes differ from {}",
        path.display()
    );
    let digest = http
        .get(&format!("http://{addr}/wasm/sluice_filter.wasm.sha256"))
        .await?;
    assert_eq!(digest.status, 200);
    assert_eq!(digest.text(), format!("{expected}\n"));
    // Only that one file.
    for other in [
        "/wasm/other.wasm",
        "/wasm/sluice_filter.wasm.md5",
        "/wasm/../api-token",
    ] {
        let r = http.get(&format!("http://{addr}{other}")).await?;
        assert_eq!(r.status, 404, "{other}");
    }
    Ok(())
}

/// The sidecar-shaped Envoy with the EnvoyFilter applied, run with the controller's ECDS
/// server down: the default configuration is in force at once, everyone goes to the control,
/// whatever variant header a client sends.
#[tokio::test]
async fn sidecar_serves_the_control_while_the_controller_is_down() -> anyhow::Result<()> {
    let stable = Upstream::named("stable").await?;
    let canary = Upstream::named("canary").await?;
    let all = manifests(&"0".repeat(64));
    let filter = find(&all, "EnvoyFilter", "sluice", "envoyfilter-sidecar.yaml");
    let (mut config, proxy) = sidecar(&[("sluice.dev/filter", "enabled")]);
    apply_envoy_filter(&mut config, &proxy, &filter.doc).map_err(anyhow::Error::msg)?;
    let (_dir, path) = write_config(&config);
    // Nothing listens on the ECDS port: the controller is down.
    let ecds_down = sluice_tests::free_port()?;
    let envoy = EnvoyConfig::new(&path)
        .wasm(filter_wasm()?)
        .port_to(18081, stable.port())
        .port_to(18082, canary.port())
        .port_to(18000, ecds_down)
        .replace(&format!("address: {CONTROLLER_HOST}"), "address: 127.0.0.1")
        .replace("type: STRICT_DNS", "type: STATIC")
        .start()
        .await?;
    let http = HttpClient::new();
    let url = envoy.url(8080, "/predict");
    for i in 0..200 {
        let user = format!("user-{i}");
        let r = http
            .send(
                hyper::Method::GET,
                &url,
                &[("x-user-id", user.as_str()), ("x-sluice-variant", "canary")],
                bytes::Bytes::new(),
            )
            .await?;
        assert_eq!(r.status, 200, "{}", envoy.log_tail(20));
    }
    assert_eq!(
        canary.count(),
        0,
        "users reached the canary under the control-only default"
    );
    assert_eq!(stable.count(), 200);
    assert!(stable
        .requests()
        .iter()
        .all(|r| r.variant() == Some("stable")));
    // The filter counted them: it is the filter, not the route table, that sent them there.
    let n = wait_for(
        Duration::from_secs(30),
        "the filter's request counter",
        || async {
            let stats = envoy.admin().prometheus().await?;
            let n = stats.sum(
                sluice_filter::metrics::REQUESTS,
                &[("experiment", "ranker"), ("variant", "stable")],
            );
            Ok::<_, sluice_tests::Error>((n >= 200.0).then_some(n))
        },
    )
    .await?;
    assert_eq!(n, 200.0);
    Ok(())
}

/// The module's path, the workload label and the metric labels agree across the EnvoyFilter,
/// the example workload and the rollout the controller pushes with.
#[test]
fn envoyfilter_path_files_agree() {
    let all = manifests(&"0".repeat(64));
    let filter = find(&all, "EnvoyFilter", "sluice", "envoyfilter-sidecar.yaml");
    let frontend = find(&all, "Deployment", "frontend", "frontend.yaml");
    let template = &frontend.doc["spec"]["template"]["metadata"];
    let patch = &filter.doc["spec"]["configPatches"][1]["patch"]["value"];
    let filename = patch["config_discovery"]["default_config"]["config"]["vm_config"]["code"]
        ["local"]["filename"]
        .as_str()
        .unwrap_or_default();
    for (k, v) in filter.doc["spec"]["workloadSelector"]["labels"]
        .as_object()
        .into_iter()
        .flatten()
    {
        assert_eq!(
            &template["labels"][k],
            v,
            "{} lacks the label {k}",
            frontend.at()
        );
    }
    let annotation = |name: &str| -> Value {
        let text = template["annotations"][name].as_str().unwrap_or_default();
        serde_json::from_str(text).unwrap_or_else(|e| panic!("{name}: {e}: {text}"))
    };
    let volumes = annotation("sidecar.istio.io/userVolume");
    let mounts = annotation("sidecar.istio.io/userVolumeMount");
    assert_eq!(volumes[0]["configMap"]["name"], "sluice-wasm");
    assert_eq!(mounts[0]["name"], volumes[0]["name"]);
    let mounted = format!(
        "{}/sluice_filter.wasm",
        mounts[0]["mountPath"].as_str().unwrap_or_default()
    );
    assert_eq!(filename, mounted);
    // The ProxyConfig annotation names every label the filter writes, and only those.
    let proxy_config: Value = serde_saphyr::from_str_with_options(
        template["annotations"]["proxy.istio.io/config"]
            .as_str()
            .unwrap_or_default(),
        sluice_controller::yaml::options(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let tags: Vec<&str> = proxy_config["extraStatTags"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(tags, sluice_filter::metrics::LABELS);
    // Bucket lists for every histogram the filter writes, ascending.
    let buckets = annotation("sidecar.istio.io/statsHistogramBuckets");
    let mut prefixes: Vec<String> = buckets
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| {
            let b: Vec<f64> = v
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_f64)
                .collect();
            assert!(
                b.len() > 10 && b.windows(2).all(|w| w[0] < w[1]),
                "{k}: {v}"
            );
            k.clone()
        })
        .collect();
    prefixes.sort();
    use sluice_filter::metrics::{LATENCY, PREDICTION, SHADOW_LATENCY};
    let mut want: Vec<String> = [LATENCY, PREDICTION, SHADOW_LATENCY]
        .iter()
        .map(|m| format!("wasmcustom.{m}"))
        .collect();
    want.sort();
    assert_eq!(prefixes, want);

    let rollout = rollout_in(find(
        &all,
        "ConfigMap",
        "sluice-rollout",
        "ecds/rollout.yaml",
    ));
    let sink = &rollout["spec"]["sinks"][0]["ecdsGrpc"];
    assert_eq!(sink["wasm"]["filename"].as_str(), Some(filename));
    assert_eq!(sink["resource"], patch["name"]);
    let port = sink["listen"]
        .as_str()
        .and_then(|l| l.rsplit_once(':'))
        .map(|(_, p)| p.to_string());
    let cluster = &filter.doc["spec"]["configPatches"][0]["patch"]["value"];
    assert_eq!(
        port.as_deref(),
        cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
            ["socket_address"]["port_value"]
            .as_u64()
            .map(|p| p.to_string())
            .as_deref()
    );
}

fn rollout_in(configmap: &Manifest) -> Value {
    let text = configmap.doc["data"]["rollout.yaml"]
        .as_str()
        .unwrap_or_else(|| panic!("{}: no data.rollout.yaml", configmap.at()));
    serde_saphyr::from_str_with_options(text, sluice_controller::yaml::options())
        .unwrap_or_else(|e| panic!("{}: {e}", configmap.at()))
}

/// The rollout in each ConfigMap is one the controller accepts.
#[test]
fn rollout_configmaps_are_valid_specs() {
    let all = manifests(&"0".repeat(64));
    let maps: Vec<&Manifest> = all
        .iter()
        .filter(|m| m.doc["kind"] == "ConfigMap" && m.doc["metadata"]["name"] == "sluice-rollout")
        .collect();
    assert_eq!(maps.len(), 2);
    for m in maps {
        let text = m.doc["data"]["rollout.yaml"].as_str().unwrap_or_default();
        if let Err(e) = sluice_controller::spec::Rollout::parse(text) {
            panic!("{}: {}", m.at(), e.problems.join("; "));
        }
    }
}

/// Kills the daemon a test started, however the test ends.
struct Daemon(std::process::Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The Deployment's command line, run: the real `sluice` with the Deployment's arguments (the
/// in-cluster paths and ports pointed at a temporary directory and free loopback ports), the
/// EnvoyFilter path's rollout from its ConfigMap. It starts, answers the probes' path, and
/// serves the built module and its digest to a client that names the controller's Service, as
/// the WasmPlugin's `url` does.
#[tokio::test]
async fn deployment_command_line_serves_the_module() -> anyhow::Result<()> {
    let all = manifests(&"0".repeat(64));
    let deployment = find(&all, "Deployment", "sluice-controller", "controller.yaml");
    let pod = &deployment.doc["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let mount = |volume: &str| -> String {
        container["volumeMounts"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| m["name"] == volume)
            .and_then(|m| m["mountPath"].as_str())
            .unwrap_or_else(|| panic!("no mount of {volume}"))
            .to_string()
    };
    let api_port = container["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == "api")
        .and_then(|p| p["containerPort"].as_u64())
        .unwrap_or_default();
    let dockerfile = std::fs::read_to_string(repo_root().join("deploy/Dockerfile"))?;

    let dir = tempfile::tempdir()?;
    let rollout_path = dir.path().join("rollout.yaml");
    let configmap = find(&all, "ConfigMap", "sluice-rollout", "ecds/rollout.yaml");
    let ecds_port = sluice_tests::free_port()?;
    let rollout = configmap.doc["data"]["rollout.yaml"]
        .as_str()
        .unwrap_or_default()
        .replace("0.0.0.0:18000", &format!("127.0.0.1:{ecds_port}"));
    std::fs::write(&rollout_path, rollout)?;
    let state = dir.path().join("state");
    let port = sluice_tests::free_port()?;
    let wasm = filter_wasm()?;
    let module = WasmModule::load(&wasm)?;

    let mut args = Vec::new();
    for a in container["args"].as_array().into_iter().flatten() {
        let a = a.as_str().unwrap_or_default();
        let arg = match a.split_once('=') {
            Some(("--file", path)) => {
                assert_eq!(path, format!("{}/rollout.yaml", mount("rollout")));
                format!("--file={}", rollout_path.display())
            }
            Some(("--state-dir", path)) => {
                assert_eq!(path, mount("state"));
                format!("--state-dir={}", state.display())
            }
            Some(("--listen", addr)) => {
                assert_eq!(addr, format!("0.0.0.0:{api_port}"));
                format!("--listen=127.0.0.1:{port}")
            }
            Some(("--serve-wasm", path)) => {
                assert!(
                    dockerfile.contains(&format!("sluice_filter.wasm {path}\n")),
                    "deploy/Dockerfile does not put the module at {path}"
                );
                format!("--serve-wasm={}", wasm.display())
            }
            _ => a.to_string(),
        };
        args.push(arg);
    }
    let token_env = container["env"][0]["name"].as_str().unwrap_or_default();
    let _daemon = Daemon(
        Command::new(sluice_tests::sluice_bin()?)
            .args(&args)
            .env(token_env, "deploy-test-token-0123456789")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("sluice.log"))?)
            .spawn()?,
    );
    let http = HttpClient::new();
    let probe = container["readinessProbe"]["httpGet"]["path"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let base = format!("http://127.0.0.1:{port}");
    let log = || std::fs::read_to_string(dir.path().join("sluice.log")).unwrap_or_default();
    wait_for(
        Duration::from_secs(60),
        "the daemon's probe path",
        || async {
            let r = http.get(&format!("{base}{probe}")).await;
            Ok::<_, String>(r.ok().filter(|r| r.status == 200).map(|_| ()))
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", log()))?;

    // As istio-agent asks for the WasmPlugin's url: the Service's name in Host.
    let plugin = find(&all, "WasmPlugin", "sluice", "wasmplugin.yaml");
    let url = plugin.doc["spec"]["url"].as_str().unwrap_or_default();
    let (authority, path) = url
        .strip_prefix("http://")
        .and_then(|u| u.split_once('/'))
        .unwrap_or_else(|| panic!("{url}: not http://host/path"));
    assert_eq!(authority, format!("{CONTROLLER_HOST}:{api_port}"));
    for (suffix, check) in [("", true), (".sha256", false)] {
        let r = http
            .send(
                hyper::Method::GET,
                &format!("{base}/{path}{suffix}"),
                &[("host", authority)],
                bytes::Bytes::new(),
            )
            .await?;
        assert_eq!(r.status, 200, "{}{suffix}: {}\n{}", path, r.text(), log());
        if check {
            let digest: String = Sha256::digest(&r.body)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            assert_eq!(digest, module.sha256());
        } else {
            assert_eq!(r.text().trim(), module.sha256());
        }
    }
    // A name the Deployment does not allow is refused (DNS rebinding).
    let r = http
        .send(
            hyper::Method::GET,
            &format!("{base}/{path}.sha256"),
            &[("host", "evil.example:9090")],
            bytes::Bytes::new(),
        )
        .await?;
    assert_eq!(r.status, 403);
    Ok(())
}

/// The EnvoyFilter path end to end: the sidecar-shaped Envoy with the EnvoyFilter applied and
/// the real `sluice` running the rollout of `deploy/istio/ecds/rollout.yaml` (its source
/// pointed at that Envoy's admin, its server and the module's path moved to this machine).
/// The proxy subscribes through the EnvoyFilter's cluster to the resource the rollout serves,
/// takes the controller's push, and the controller lists it as having ACKed it.
#[tokio::test]
async fn sidecar_takes_the_controllers_pushes_through_the_envoyfilter() -> anyhow::Result<()> {
    let stable = Upstream::named("stable").await?;
    let canary = Upstream::named("canary").await?;
    let all = manifests(&"0".repeat(64));
    let filter = find(&all, "EnvoyFilter", "sluice", "envoyfilter-sidecar.yaml");
    let (mut config, proxy) = sidecar(&[("sluice.dev/filter", "enabled")]);
    apply_envoy_filter(&mut config, &proxy, &filter.doc).map_err(anyhow::Error::msg)?;
    let node = config["node"]["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let (_cfg_dir, path) = write_config(&config);
    let ecds_port = sluice_tests::free_port()?;
    let wasm = filter_wasm()?;
    let envoy = EnvoyConfig::new(&path)
        .wasm(&wasm)
        .port_to(18081, stable.port())
        .port_to(18082, canary.port())
        .port_to(18000, ecds_port)
        .replace(&format!("address: {CONTROLLER_HOST}"), "address: 127.0.0.1")
        .replace("type: STRICT_DNS", "type: STATIC")
        .start()
        .await?;

    let dir = tempfile::tempdir()?;
    let configmap = find(&all, "ConfigMap", "sluice-rollout", "ecds/rollout.yaml");
    let text = configmap.doc["data"]["rollout.yaml"]
        .as_str()
        .unwrap_or_default();
    let mut rollout = text.to_string();
    for (from, to) in [
        ("0.0.0.0:18000".to_string(), format!("127.0.0.1:{ecds_port}")),
        (
            "/var/local/sluice/sluice_filter.wasm".to_string(),
            wasm.display().to_string(),
        ),
        (
            "prometheus: {url: \"http://prometheus.istio-system.svc.cluster.local:9090\", maxAge: 60s}"
                .to_string(),
            format!("envoyAdmin: {{endpoints: [\"{}\"]}}", envoy.admin().base_url()),
        ),
    ] {
        assert!(rollout.contains(&from), "the rollout no longer has {from}");
        rollout = rollout.replace(&from, &to);
    }
    let rollout_path = dir.path().join("rollout.yaml");
    std::fs::write(&rollout_path, rollout)?;
    let port = sluice_tests::free_port()?;
    let log_path = dir.path().join("sluice.log");
    let _daemon = Daemon(
        Command::new(sluice_tests::sluice_bin()?)
            .arg("run")
            .arg(format!("--file={}", rollout_path.display()))
            .arg(format!(
                "--state-dir={}",
                dir.path().join("state").display()
            ))
            .arg(format!("--listen=127.0.0.1:{port}"))
            .arg("--quiet")
            .env("SLUICE_TOKEN", "deploy-test-token-0123456789")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log_path)?)
            .spawn()?,
    );
    let log = || {
        format!(
            "sluice:\n{}\nenvoy:\n{}",
            std::fs::read_to_string(&log_path).unwrap_or_default(),
            envoy.log_tail(30)
        )
    };
    let http = HttpClient::new();
    let status_url = format!("http://127.0.0.1:{port}/status");
    let acked = wait_for(
        Duration::from_secs(90),
        "the sidecar to ACK a push of the controller",
        || async {
            let accepted = envoy
                .admin()
                .stat("extension_config_discovery.http_filter.sluice.update_success")
                .await
                .map_err(|e| e.to_string())?
                .unwrap_or(0);
            let status = http.get(&status_url).await.map_err(|e| e.to_string())?;
            let status: Value = status.json().map_err(|e| e.to_string())?;
            // Per ecdsGrpc sink of the rollout, its proxies.
            let proxy = status[0]["proxies"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|sink| sink["resource"] == "sluice")
                .flat_map(|sink| sink["proxies"].as_array().cloned().unwrap_or_default())
                .find(|p| p["id"] == node.as_str());
            let version = proxy
                .as_ref()
                .and_then(|p| p["acked"]["sluice"].as_u64())
                .unwrap_or(0);
            Ok::<_, String>((accepted >= 1 && version >= 1).then_some(proxy))
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", log()))?;
    let proxy = acked.unwrap_or_default();
    assert_eq!(proxy["last_nack"], Value::Null, "{proxy}");
    assert_eq!(
        envoy
            .admin()
            .stat("extension_config_discovery.http_filter.sluice.update_rejected")
            .await?
            .unwrap_or(0),
        0,
        "{}",
        log()
    );
    // Traffic still flows through the filter the controller configured.
    let r = http
        .send(
            hyper::Method::GET,
            &envoy.url(8080, "/predict"),
            &[("x-user-id", "alice")],
            bytes::Bytes::new(),
        )
        .await?;
    assert_eq!(r.status, 200);
    Ok(())
}

/// The alternative the ecdsGrpc sink offers, `wasm: {remote: {uri, cluster, sha256}}`, on the
/// EnvoyFilter path: the default configuration takes the module from the controller's endpoint
/// (rendered by the sink's own code source, so it is what pushes would name), through a second
/// CLUSTER patch for the controller's HTTP port. The sidecar-shaped Envoy fetches the served
/// module, checks its sha256 and serves the control.
#[tokio::test]
async fn sidecar_fetches_the_served_module_as_remote_code() -> anyhow::Result<()> {
    let module = module();
    let sha = module.sha256().to_string();
    let (addr, _stop) = serve_module(module).await;
    let stable = Upstream::named("stable").await?;
    let canary = Upstream::named("canary").await?;
    let all = manifests(&sha);
    let mut filter = find(&all, "EnvoyFilter", "sluice", "envoyfilter-sidecar.yaml")
        .doc
        .clone();
    let code: sluice_controller::sink::ecds_file::WasmCode = serde_json::from_value(json!({
        "remote": {
            "uri": format!("http://{CONTROLLER_HOST}:9090/wasm/sluice_filter.wasm"),
            "cluster": "sluice-wasm",
            "sha256": sha,
        }
    }))?;
    set(
        &mut filter,
        "/spec/configPatches/1/patch/value/config_discovery/default_config/config/vm_config/code",
        code.source_json(),
    );
    let mut wasm_cluster = filter["spec"]["configPatches"][0].clone();
    let c = &mut wasm_cluster["patch"]["value"];
    c["name"] = json!("sluice-wasm");
    c["load_assignment"]["cluster_name"] = json!("sluice-wasm");
    c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
        ["socket_address"]["port_value"] = json!(9090);
    if let Some(o) = c.as_object_mut() {
        // The module endpoint speaks HTTP/1.1.
        o.remove("typed_extension_protocol_options");
    }
    if let Some(p) = filter["spec"]["configPatches"].as_array_mut() {
        p.insert(1, wasm_cluster);
    }
    let (mut config, proxy) = sidecar(&[("sluice.dev/filter", "enabled")]);
    let applied = apply_envoy_filter(&mut config, &proxy, &filter).map_err(anyhow::Error::msg)?;
    assert_eq!(applied, vec![1, 1, 1]);
    let (_dir, path) = write_config(&config);
    let envoy = EnvoyConfig::new(&path)
        .port_to(18081, stable.port())
        .port_to(18082, canary.port())
        .port_to(9090, addr.port())
        .port_to(18000, sluice_tests::free_port()?)
        .replace(&format!("address: {CONTROLLER_HOST}"), "address: 127.0.0.1")
        .replace("type: STRICT_DNS", "type: STATIC")
        .start()
        .await?;
    let http = HttpClient::new();
    let url = envoy.url(8080, "/predict");
    // The module arrives after the listener is up; until then requests pass unfiltered.
    wait_for(
        Duration::from_secs(60),
        "the fetched filter to strip the client's variant header",
        || async {
            let before = canary.count();
            let r = http
                .send(
                    hyper::Method::GET,
                    &url,
                    &[("x-user-id", "u1"), ("x-sluice-variant", "canary")],
                    bytes::Bytes::new(),
                )
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>((r.status == 200 && canary.count() == before).then_some(()))
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", envoy.log_tail(30)))?;
    let reached = canary.count();
    for i in 0..100 {
        let user = format!("user-{i}");
        let r = http
            .send(
                hyper::Method::GET,
                &url,
                &[("x-user-id", user.as_str()), ("x-sluice-variant", "canary")],
                bytes::Bytes::new(),
            )
            .await?;
        assert_eq!(r.status, 200);
    }
    assert_eq!(
        canary.count(),
        reached,
        "the filter let users reach the canary"
    );
    Ok(())
}
