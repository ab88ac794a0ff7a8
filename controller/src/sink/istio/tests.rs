//! The sink against kube's mocked API server (a `tower-test` service pair): the exact requests
//! it sends, conflicts, refusals, and confirmation from a scripted source whose proxies take
//! a configuration only once the API server accepted it.

use std::sync::{Arc, Mutex};

use hyper::{Request, Response};
use kube::client::Body;
use serde_json::{json, Value};

use super::*;
use crate::source::{OriginScrape, Sample, SourceError};
use sluice_filter::metrics;
use sluice_filter::metrics::CONFIG_REVISION;

/// One request the API server saw.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    /// The query string (kube writes `?` and nothing for a plain write).
    query: String,
    body: Value,
}

/// What the mocked API server answers: status and JSON body, given the request.
type Answer = Box<dyn FnMut(&Seen) -> (u16, Value) + Send>;

/// Serves the client's requests with `answer` until the client is dropped; the requests
/// seen, in order.
fn api_server(mut answer: Answer) -> (kube::Client, Arc<Mutex<Vec<Seen>>>) {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        while let Some((request, respond)) = handle.next_request().await {
            let method = request.method().to_string();
            let path = request.uri().path().to_string();
            let query = request.uri().query().unwrap_or_default().to_string();
            let bytes = request
                .into_body()
                .collect_bytes()
                .await
                .unwrap_or_default();
            let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            let s = Seen {
                method,
                path,
                query,
                body,
            };
            let (status, reply) = answer(&s);
            log.lock().unwrap_or_else(|e| e.into_inner()).push(s);
            let response = Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .body(Body::from(serde_json::to_vec(&reply).unwrap_or_default()))
                .unwrap_or_else(|e| panic!("response: {e}"));
            respond.send_response(response);
        }
    });
    (kube::Client::new(service, "default"), seen)
}

fn seen(log: &Arc<Mutex<Vec<Seen>>>) -> Vec<Seen> {
    log.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// A Kubernetes `Status` answer.
fn status(code: u16, reason: &str, message: &str) -> (u16, Value) {
    (
        code,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": message, "reason": reason, "code": code}),
    )
}

/// Proxies as a scripted source reports them: origin → revision of experiment `e`, or an
/// error.
#[derive(Debug, Clone)]
struct Proxies(Arc<Mutex<Reported>>);

/// Each proxy and the revision it reports, or why the source cannot answer.
type Reported = Result<Vec<(String, f64)>, String>;

impl Default for Proxies {
    fn default() -> Proxies {
        Proxies(Arc::new(Mutex::new(Ok(Vec::new()))))
    }
}

impl Proxies {
    fn set(&self, proxies: &[(&str, f64)]) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) =
            Ok(proxies.iter().map(|(o, v)| (o.to_string(), *v)).collect());
    }

    fn fail(&self, reason: &str) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Err(reason.into());
    }

    /// Every proxy now reports `version`.
    fn take(&self, version: f64) {
        if let Ok(p) = &mut *self.0.lock().unwrap_or_else(|e| e.into_inner()) {
            p.iter_mut().for_each(|(_, v)| *v = version);
        }
    }
}

impl Source for Proxies {
    async fn scrape(&self, experiment: &str) -> Result<Vec<OriginScrape>, SourceError> {
        let now = self.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let proxies = now.map_err(|reason| SourceError::Unreachable {
            origin: "scripted".into(),
            reason,
        })?;
        Ok(proxies
            .into_iter()
            .map(|(origin, v)| {
                let requests = Sample {
                    name: metrics::REQUESTS.into(),
                    labels: [
                        ("experiment".to_string(), experiment.to_string()),
                        ("variant".to_string(), "canary".to_string()),
                    ]
                    .into(),
                    value: 10.0,
                };
                let revision = Sample {
                    name: CONFIG_REVISION.into(),
                    labels: [("experiment".to_string(), experiment.to_string())].into(),
                    value: v,
                };
                OriginScrape::from_samples(&origin, vec![requests, revision])
            })
            .collect())
    }
}

fn config(weight: f64) -> FilterConfig {
    serde_json::from_value(json!({"version": 1, "experiments": [{"name": "istio-e",
        "unit": {"type": "request"},
        "variants": [{"name": "stable"}, {"name": "canary", "weight": weight}]}]}))
    .unwrap_or_else(|e| panic!("config: {e}"))
}

fn sink(client: kube::Client, kind: ObjectKind, proxies: &Proxies) -> IstioWasmPlugin<Proxies> {
    IstioWasmPlugin {
        target: Target {
            kind,
            namespace: "shop".into(),
            name: "sluice".into(),
        },
        kube: Kube::with_client(client),
        source: Some(proxies.clone()),
        min_proxies: 1,
        confirm_within: Duration::from_secs(30),
        max_conflicts: 3,
        poll: Duration::from_millis(100),
    }
}

/// A WasmPlugin as the API server holds it, at `rv`, with an older `pluginConfig`.
fn wasm_plugin(rv: &str, plugin_config: Value) -> Value {
    json!({
        "apiVersion": "extensions.istio.io/v1alpha1",
        "kind": "WasmPlugin",
        "metadata": {"name": "sluice", "namespace": "shop", "resourceVersion": rv,
                     "labels": {"team": "ml"}},
        "spec": {
            "url": "http://sluice.sluice-system:8080/sluice_filter.wasm",
            "sha256": "ab".repeat(32),
            "failStrategy": "FAIL_OPEN",
            "phase": "AUTHN",
            "match": [{"mode": "CLIENT"}],
            "pluginConfig": plugin_config,
        }
    })
}

/// The push version in a written object's `pluginConfig.revision`.
fn written_version(body: &Value, path: &[&str]) -> Option<f64> {
    let config = path.iter().try_fold(body, |at, p| at.get(*p))?;
    let revision = config.get("revision")?.as_str()?;
    revision.split_once('@')?.0.parse().ok()
}

const WASM_PLUGINS: &str = "/apis/extensions.istio.io/v1alpha1/namespaces/shop/wasmplugins/sluice";

#[tokio::test]
async fn a_push_replaces_plugin_config_with_the_resource_version_it_read() {
    let proxies = Proxies::default();
    proxies.set(&[("pod-a", 6.0), ("pod-b", 6.0)]);
    let taken = proxies.clone();
    // An older configuration with a shadow section the new one drops.
    let stored = wasm_plugin(
        "4711",
        json!({"version": 1, "revision": "6@1", "experiments": [], "shadow_left_over": {"x": 1}}),
    );
    let (client, log) = api_server(Box::new(move |s: &Seen| match s.method.as_str() {
        "GET" => (200, stored.clone()),
        "PUT" => {
            // istiod hands the object to the proxies, whose filters take it.
            if let Some(v) = written_version(&s.body, &["spec", "pluginConfig"]) {
                taken.take(v);
            }
            (200, s.body.clone())
        }
        _ => status(405, "MethodNotAllowed", "unexpected"),
    }));
    let sink = sink(client, ObjectKind::WasmPlugin, &proxies);
    let pushed = config(5.0);
    let receipt = sink.push(&pushed, 7).await;
    assert!(receipt.is_ok(), "{receipt:?}");
    let seen = seen(&log);
    let methods: Vec<(&str, &str)> = seen
        .iter()
        .map(|s| (s.method.as_str(), s.path.as_str()))
        .collect();
    assert_eq!(methods, vec![("GET", WASM_PLUGINS), ("PUT", WASM_PLUGINS)]);
    // A plain write: no dry run, no field manager, no forcing.
    assert!(seen.iter().all(|s| s.query.is_empty()), "{seen:?}");
    let put = &seen[1].body;
    assert_eq!(put["apiVersion"], "extensions.istio.io/v1alpha1");
    assert_eq!(put["kind"], "WasmPlugin");
    assert_eq!(put["metadata"]["resourceVersion"], "4711");
    assert_eq!(put["metadata"]["labels"]["team"], "ml");
    // Every other field is written back as read.
    for field in ["url", "sha256", "failStrategy", "phase", "match"] {
        assert_eq!(
            put["spec"][field],
            wasm_plugin("", Value::Null)["spec"][field]
        );
    }
    let written = &put["spec"]["pluginConfig"];
    assert!(written.get("shadow_left_over").is_none(), "{written}");
    let revision = written["revision"].as_str().unwrap_or_default();
    assert!(revision.starts_with("7@"), "{revision}");
    let mut back: FilterConfig = serde_json::from_value(written.clone())
        .unwrap_or_else(|e| panic!("the written pluginConfig is a filter config: {e}"));
    back.revision = None;
    assert_eq!(back, pushed);
}

#[tokio::test]
async fn a_conflict_reads_the_object_again_and_writes_with_the_new_version() {
    let proxies = Proxies::default();
    proxies.set(&[("pod-a", 1.0)]);
    let taken = proxies.clone();
    let mut rv = 100;
    let (client, log) = api_server(Box::new(move |s: &Seen| match s.method.as_str() {
        "GET" => (200, wasm_plugin(&rv.to_string(), json!({}))),
        "PUT" if s.body["metadata"]["resourceVersion"] == "100" => {
            // Another writer changed the object between our read and write.
            rv = 101;
            status(
                409,
                "Conflict",
                "Operation cannot be fulfilled on wasmplugins.extensions.istio.io \"sluice\": the object has been modified; please apply your changes to the latest version and try again",
            )
        }
        "PUT" => {
            if let Some(v) = written_version(&s.body, &["spec", "pluginConfig"]) {
                taken.take(v);
            }
            (200, s.body.clone())
        }
        _ => status(405, "MethodNotAllowed", "unexpected"),
    }));
    let sink = sink(client, ObjectKind::WasmPlugin, &proxies);
    let receipt = sink.push(&config(10.0), 2).await;
    assert!(receipt.is_ok(), "{receipt:?}");
    let seen = seen(&log);
    let shape: Vec<(&str, String)> = seen
        .iter()
        .map(|s| {
            (
                s.method.as_str(),
                s.body["metadata"]["resourceVersion"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        })
        .collect();
    assert_eq!(
        shape,
        vec![
            ("GET", String::new()),
            ("PUT", "100".into()),
            ("GET", String::new()),
            ("PUT", "101".into())
        ]
    );
    assert_eq!(
        seen[3].body["spec"]["pluginConfig"]["experiments"][0]["variants"][1]["weight"],
        10.0
    );
}

#[tokio::test]
async fn conflicts_are_retried_a_bounded_number_of_times() {
    let proxies = Proxies::default();
    let mut rv = 0;
    let (client, log) = api_server(Box::new(move |s: &Seen| match s.method.as_str() {
        "GET" => {
            rv += 1;
            (200, wasm_plugin(&rv.to_string(), json!({})))
        }
        _ => status(409, "Conflict", "the object has been modified"),
    }));
    let sink = sink(client, ObjectKind::WasmPlugin, &proxies);
    let err = sink
        .push(&config(1.0), 3)
        .await
        .err()
        .map(|e| e.to_string());
    let err = err.unwrap_or_default();
    assert!(
        err.contains("WasmPlugin shop/sluice") && err.contains("4 attempts"),
        "{err}"
    );
    let puts = seen(&log).iter().filter(|s| s.method == "PUT").count();
    assert_eq!(puts, 4, "max_conflicts 3: the first write and 3 retries");
}

#[tokio::test]
async fn a_traffic_extension_takes_the_config_under_spec_wasm() {
    let proxies = Proxies::default();
    proxies.set(&[("pod-a", 0.0)]);
    let taken = proxies.clone();
    let (client, log) = api_server(Box::new(move |s: &Seen| match s.method.as_str() {
        "GET" if s.path.ends_with("/lua") => (
            200,
            json!({"apiVersion": "extensions.istio.io/v1alpha1", "kind": "TrafficExtension",
                   "metadata": {"name": "lua", "namespace": "shop", "resourceVersion": "9"},
                   "spec": {"lua": {"inlineCode": "function envoy_on_request(h) end"}}}),
        ),
        "GET" => (
            200,
            json!({"apiVersion": "extensions.istio.io/v1alpha1", "kind": "TrafficExtension",
                   "metadata": {"name": "sluice", "namespace": "shop", "resourceVersion": "12"},
                   "spec": {"phase": "AUTHN", "wasm": {"url": "oci://registry/sluice:1", "failStrategy": "FAIL_OPEN"}}}),
        ),
        "PUT" => {
            if let Some(v) = written_version(&s.body, &["spec", "wasm", "pluginConfig"]) {
                taken.take(v);
            }
            (200, s.body.clone())
        }
        _ => status(405, "MethodNotAllowed", "unexpected"),
    }));
    let mut sink = sink(client, ObjectKind::TrafficExtension, &proxies);
    let receipt = sink.push(&config(25.0), 4).await;
    assert!(receipt.is_ok(), "{receipt:?}");
    let seen_now = seen(&log);
    let put = &seen_now[1];
    assert_eq!(
        put.path,
        "/apis/extensions.istio.io/v1alpha1/namespaces/shop/trafficextensions/sluice"
    );
    assert_eq!(put.body["metadata"]["resourceVersion"], "12");
    assert_eq!(put.body["spec"]["wasm"]["url"], "oci://registry/sluice:1");
    assert!(put.body["spec"].get("pluginConfig").is_none());
    assert_eq!(
        put.body["spec"]["wasm"]["pluginConfig"]["experiments"][0]["name"],
        "istio-e"
    );
    // A Lua TrafficExtension cannot run the filter: nothing is written.
    sink.target.name = "lua".into();
    let err = sink
        .push(&config(25.0), 5)
        .await
        .err()
        .map(|e| e.to_string());
    assert!(
        err.as_deref()
            .unwrap_or_default()
            .contains("spec.wasm is missing"),
        "{err:?}"
    );
    assert_eq!(seen(&log).len(), 3, "a GET, no PUT");
}

#[tokio::test]
async fn refusals_name_the_object_and_what_to_do() {
    let proxies = Proxies::default();
    for (code, reason, expected) in [
        (403, "Forbidden", "needs get and update on wasmplugins"),
        (404, "NotFound", "create it first"),
        (500, "InternalError", "500 InternalError: boom"),
    ] {
        let (client, log) = api_server(Box::new(move |_: &Seen| status(code, reason, "boom")));
        let sink = sink(client, ObjectKind::WasmPlugin, &proxies);
        let err = sink
            .push(&config(1.0), 1)
            .await
            .err()
            .map(|e| e.to_string());
        let err = err.unwrap_or_default();
        assert!(
            err.contains("WasmPlugin shop/sluice") && err.contains(expected),
            "{err}"
        );
        assert_eq!(seen(&log).len(), 1, "no retry after a refusal");
    }
}

#[tokio::test(start_paused = true)]
async fn a_push_is_confirmed_only_when_every_reporting_proxy_runs_it() {
    let proxies = Proxies::default();
    proxies.set(&[("pod-a", 6.0), ("pod-b", 6.0)]);
    let (client, _log) = api_server(Box::new(move |s: &Seen| match s.method.as_str() {
        "GET" => (200, wasm_plugin("1", json!({}))),
        _ => (200, s.body.clone()),
    }));
    let sink = sink(client, ObjectKind::WasmPlugin, &proxies);
    // Half the proxies take it; the other keeps the old version: unconfirmed, naming it.
    let late = proxies.clone();
    let half = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(1)).await;
        late.set(&[("pod-a", 7.0), ("pod-b", 6.0)]);
    });
    let err = sink
        .push(&config(5.0), 7)
        .await
        .err()
        .map(|e| e.to_string());
    let _ = half.await;
    let err = err.unwrap_or_default();
    assert!(
        err.contains("did not confirm version 7 within") && err.contains("1 at 6 (pod-b)"),
        "{err}"
    );
    // The straggler takes it 20 s into the next push's wait: confirmed then, not before.
    proxies.set(&[("pod-a", 6.0), ("pod-b", 6.0)]);
    let late = proxies.clone();
    let started = Instant::now();
    let join = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(20)).await;
        late.take(8.0);
    });
    let receipt = sink.push(&config(5.0), 8).await;
    let _ = join.await;
    let Ok(receipt) = receipt else {
        panic!("{receipt:?}")
    };
    assert!(receipt.confirmed_after >= Duration::from_secs(20));
    assert!(started.elapsed() < Duration::from_secs(21));
}

#[tokio::test(start_paused = true)]
async fn too_few_reporting_proxies_or_no_source_data_is_no_confirmation() {
    let proxies = Proxies::default();
    let (client, _log) = api_server(Box::new(move |s: &Seen| match s.method.as_str() {
        "GET" => (200, wasm_plugin("1", json!({}))),
        _ => (200, s.body.clone()),
    }));
    let mut sink = sink(client, ObjectKind::WasmPlugin, &proxies);
    // Nobody reports the experiment (no proxy selected, or no gauge): never confirmed.
    proxies.set(&[]);
    let err = sink
        .push(&config(5.0), 1)
        .await
        .err()
        .map(|e| e.to_string());
    assert!(
        err.as_deref()
            .unwrap_or_default()
            .contains("0 proxies report"),
        "{err:?}"
    );
    // Two proxies at the version, three required.
    proxies.set(&[("pod-a", 2.0), ("pod-b", 2.0)]);
    sink.min_proxies = 3;
    let err = sink
        .push(&config(5.0), 2)
        .await
        .err()
        .map(|e| e.to_string());
    assert!(
        err.as_deref()
            .unwrap_or_default()
            .contains("minProxies is 3"),
        "{err:?}"
    );
    sink.min_proxies = 1;
    proxies.fail("connection refused");
    let err = sink
        .push(&config(5.0), 3)
        .await
        .err()
        .map(|e| e.to_string());
    assert!(
        err.as_deref()
            .unwrap_or_default()
            .contains("source: scripted is unreachable: connection refused"),
        "{err:?}"
    );
    // A sink without a source refuses before writing anything.
    sink.source = None;
    let err = sink
        .push(&config(5.0), 4)
        .await
        .err()
        .map(|e| e.to_string());
    assert!(
        err.as_deref().unwrap_or_default().contains("no source"),
        "{err:?}"
    );
}

#[tokio::test]
async fn in_force_compares_the_object_and_the_proxies_with_the_confirmed_push() {
    let proxies = Proxies::default();
    proxies.set(&[("pod-a", 7.0), ("pod-b", 7.0)]);
    let stored: Arc<Mutex<Value>> = Arc::new(Mutex::new(Value::Null));
    let held = stored.clone();
    let (client, _log) = api_server(Box::new(move |s: &Seen| match s.method.as_str() {
        "GET" => (200, held.lock().unwrap_or_else(|e| e.into_inner()).clone()),
        _ => status(405, "MethodNotAllowed", "unexpected"),
    }));
    let sink = sink(client, ObjectKind::WasmPlugin, &proxies);
    let pushed = config(5.0);
    let store = |plugin_config: Value| {
        *stored.lock().unwrap_or_else(|e| e.into_inner()) = wasm_plugin("3", plugin_config);
    };
    let as_pushed = |revision: &str| {
        let mut c = pushed.clone();
        c.revision = Some(revision.into());
        plugin_config(&c).unwrap_or_default()
    };
    store(as_pushed("7@1795450000000"));
    assert_eq!(sink.in_force(&pushed, 7).await.ok(), Some(None));
    // Numbers written back as floats (a Struct round trip) are the same configuration.
    let mut floats = as_pushed("7@1795450000000");
    floats["version"] = json!(1.0);
    floats["experiments"][0]["variants"][1]["weight"] = json!(5.0);
    store(floats);
    assert_eq!(sink.in_force(&pushed, 7).await.ok(), Some(None));
    // Someone edited the weight.
    let mut edited = as_pushed("7@1795450000000");
    edited["experiments"][0]["variants"][1]["weight"] = json!(50);
    store(edited);
    let found = sink
        .in_force(&pushed, 7)
        .await
        .ok()
        .flatten()
        .unwrap_or_default();
    assert!(found.contains("changed by another writer"), "{found}");
    // An older push re-applied (another version's revision).
    store(as_pushed("6@1795440000000"));
    let found = sink
        .in_force(&pushed, 7)
        .await
        .ok()
        .flatten()
        .unwrap_or_default();
    assert!(
        found.contains("revision is 6@1795440000000, not version 7"),
        "{found}"
    );
    // The object is right, one proxy runs something else.
    store(as_pushed("7@1795450000000"));
    proxies.set(&[("pod-a", 7.0), ("pod-b", 0.0)]);
    let found = sink
        .in_force(&pushed, 7)
        .await
        .ok()
        .flatten()
        .unwrap_or_default();
    assert!(found.contains("pod-b runs revision 0"), "{found}");
    // Without data from the proxies, it cannot tell.
    proxies.fail("timeout");
    assert!(sink.in_force(&pushed, 7).await.is_err());
    proxies.set(&[]);
    assert!(sink.in_force(&pushed, 7).await.is_err());
}

#[test]
fn same_json_compares_numbers_by_value_and_everything_else_exactly() {
    assert!(same_json(
        &json!({"a": [1, 2.5]}),
        &json!({"a": [1.0, 2.5]})
    ));
    assert!(!same_json(&json!({"a": 1}), &json!({"a": 1, "b": 2})));
    assert!(!same_json(&json!({"a": "1"}), &json!({"a": 1})));
    assert!(!same_json(&json!([1, 2]), &json!([2, 1])));
}

#[tokio::test(start_paused = true)]
async fn an_api_server_that_never_answers_fails_the_push_within_its_deadline() {
    // The mocked service takes requests and never answers them.
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let held = tokio::spawn(async move {
        let mut pending = Vec::new();
        while let Some(request) = handle.next_request().await {
            pending.push(request);
        }
    });
    let proxies = Proxies::default();
    let mut sink = sink(
        kube::Client::new(service, "default"),
        ObjectKind::WasmPlugin,
        &proxies,
    );
    sink.confirm_within = Duration::from_secs(5);
    let started = Instant::now();
    let pushed = tokio::time::timeout(Duration::from_secs(600), sink.push(&config(5.0), 1)).await;
    let Ok(Err(e)) = pushed else {
        panic!("the push did not fail within its deadline: {pushed:?}")
    };
    assert!(e.to_string().contains("did not answer within 5s"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(6));
    let checked =
        tokio::time::timeout(Duration::from_secs(600), sink.in_force(&config(5.0), 1)).await;
    assert!(matches!(checked, Ok(Err(_))), "{checked:?}");
    held.abort();
}

#[tokio::test]
async fn answers_that_are_not_the_object_fail_before_anything_is_written() {
    let proxies = Proxies::default();
    for answer in [
        json!({"apiVersion": "extensions.istio.io/v1alpha1", "kind": "WasmPlugin",
               "metadata": {"name": "sluice", "resourceVersion": "1"}, "spec": "not an object"}),
        json!({"apiVersion": "extensions.istio.io/v1alpha1", "kind": "WasmPlugin",
               "metadata": {"name": "sluice", "resourceVersion": "1"}}),
        json!(["not", "an", "object"]),
        json!("x".repeat(100_000)),
    ] {
        let reply = answer.clone();
        let (client, log) = api_server(Box::new(move |_: &Seen| (200, reply.clone())));
        let sink = sink(client, ObjectKind::WasmPlugin, &proxies);
        let err = sink
            .push(&config(1.0), 1)
            .await
            .err()
            .map(|e| e.to_string());
        let err = err.unwrap_or_default();
        assert!(err.contains("WasmPlugin shop/sluice"), "{err}");
        assert!(
            seen(&log).iter().all(|s| s.method == "GET"),
            "wrote after {answer}"
        );
    }
}
