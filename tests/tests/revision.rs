//! Confirmation from the data plane, against real Envoys: the filter's gauge
//! `sluice_config_revision` follows every ECDS push on every worker, as the controller's
//! sources read it (Envoy admin and Prometheus); and `sluice run` cross-checks its sink's
//! confirmation with it: a proxy the sink does not reach, serving another revision, holds the
//! rollout until it runs the confirmed version.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sluice_controller::sink::ecds_file::{EcdsFile, WasmCode};
use sluice_controller::sink::Sink;
use sluice_controller::source::admin::Admin as ControllerAdmin;
use sluice_controller::source::envoy_admin::EnvoyAdmin;
use sluice_controller::source::prometheus::Prometheus as PrometheusSource;
use sluice_controller::source::revision::Revisions;
use sluice_controller::source::Source;
use sluice_filter::config::FilterConfig;
use sluice_tests::{
    filter_wasm, free_port, sluice_bin, wait_for, Envoy, EnvoyConfig, HttpClient, Prometheus,
    Reply, Traffic, Upstream,
};

const ADMIN: u16 = 9901;
const LISTENER: u16 = 10000;

/// An Envoy of `tests/envoy/rollout.yaml` with `workers` workers, its clusters on `stable`
/// and `canary`.
async fn envoy(stable: &Upstream, canary: &Upstream, workers: u32) -> anyhow::Result<Envoy> {
    Ok(EnvoyConfig::new("tests/envoy/rollout.yaml")
        .port_to(10001, stable.port())
        .port_to(10002, canary.port())
        .ecds("tests/envoy/rollout")
        .concurrency(workers)
        .start()
        .await?)
}

fn admin_url(envoy: &Envoy) -> String {
    format!("http://{}", envoy.addr(ADMIN))
}

/// Experiment `r` of `tests/envoy/rollout/sluice.yaml` with the canary at `weight`.
fn config(weight: f64) -> anyhow::Result<FilterConfig> {
    Ok(serde_json::from_value(json!({
        "version": 1,
        "experiments": [{
            "name": "r",
            "unit": {"type": "user", "keys": [{"header": "x-user-id"}]},
            "variants": [{"name": "stable", "control": true}, {"name": "canary", "weight": weight}],
            "echo": {"header": "x-sluice-variant"},
        }],
    }))?)
}

fn ecds_sink(envoy: &Envoy) -> anyhow::Result<EcdsFile> {
    Ok(EcdsFile {
        path: envoy.ecds_file("sluice.yaml")?,
        resource: "sluice".into(),
        code: WasmCode {
            filename: filter_wasm()?.display().to_string(),
            remote: None,
            vm_id: "sluice".into(),
            root_id: "sluice".into(),
            runtime: "envoy.wasm.runtime.v8".into(),
        },
        proxies: vec![ControllerAdmin::new(
            &admin_url(envoy),
            Duration::from_secs(2),
        )],
        confirm_within: Duration::from_secs(20),
    })
}

/// The revisions of experiment `r` that `source` reads, by origin.
async fn revisions(source: &impl Source) -> anyhow::Result<Vec<(String, u64)>> {
    let scraped = source
        .scrape("r")
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(Revisions::of(&scraped, "r")
        .by_origin
        .into_iter()
        .map(|(o, v)| (o.to_string(), v))
        .collect())
}

/// Waits until every origin in `expected` reports its version through `source`.
async fn until_revisions(
    source: &impl Source,
    expected: &[(String, u64)],
    what: &str,
) -> anyhow::Result<()> {
    let mut expected = expected.to_vec();
    expected.sort();
    let expected = &expected;
    wait_for(Duration::from_secs(30), what, || async {
        let got = revisions(source).await?;
        // Not yet: what was read, for the timeout's message.
        anyhow::ensure!(got == *expected, "read {got:?}");
        Ok::<_, anyhow::Error>(Some(()))
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn the_gauge_follows_every_ecds_push_on_every_worker_through_both_sources(
) -> anyhow::Result<()> {
    let stable = Upstream::start("stable", |_: &sluice_tests::Request| Reply::ok()).await?;
    let canary = Upstream::start("canary", |_: &sluice_tests::Request| Reply::ok()).await?;
    // Two workers: each runs its own copy of the filter, and each sets the gauge.
    let a = envoy(&stable, &canary, 2).await?;
    let b = envoy(&stable, &canary, 1).await?;
    let admin = EnvoyAdmin::new(
        &[admin_url(&a), admin_url(&b)],
        Duration::from_secs(2),
        None,
    );
    let prometheus = Prometheus::start(&[a.addr(ADMIN), b.addr(ADMIN)]).await?;
    let from_prometheus = PrometheusSource::new(
        &prometheus.url(),
        Duration::from_secs(2),
        Duration::from_secs(30),
    );
    let instance = |e: &Envoy| format!("envoy/{}", e.addr(ADMIN));
    // The shipped initial file has no revision: 0.
    let initial = vec![(admin_url(&a), 0), (admin_url(&b), 0)];
    until_revisions(&admin, &initial, "the bootstraps' revision 0 (admin)").await?;
    let (sink_a, sink_b) = (ecds_sink(&a)?, ecds_sink(&b)?);
    let mut before = 0;
    for (version, weight) in [(3, 10.0), (4, 50.0), (11, 0.0)] {
        sink_a
            .push(&config(weight)?, version)
            .await
            .map_err(|e| anyhow::anyhow!("push {version} to a: {e}"))?;
        // Confirmed by the sink; the gauge follows (each worker takes the configuration in
        // turn), and `b`, not pushed to, still reports the version before.
        let expected = vec![(admin_url(&a), version), (admin_url(&b), before)];
        until_revisions(&admin, &expected, "a at the version, b before (admin)").await?;
        sink_b
            .push(&config(weight)?, version)
            .await
            .map_err(|e| anyhow::anyhow!("push {version} to b: {e}"))?;
        let both = vec![(admin_url(&a), version), (admin_url(&b), version)];
        until_revisions(&admin, &both, "both at the version (admin)").await?;
        // Prometheus names origins job/instance.
        let mut by_prometheus = vec![(instance(&a), version), (instance(&b), version)];
        by_prometheus.sort();
        until_revisions(
            &from_prometheus,
            &by_prometheus,
            "both at the version (prometheus)",
        )
        .await?;
        before = version;
    }
    // A configuration without a revision (an operator's hand-written file) reads as 0.
    a.write_ecds(
        "sluice.yaml",
        &sluice_controller::sink::ecds_file::render("sluice", &sink_a.code, &config(0.0)?, 12)?,
    )?;
    let expected = vec![(admin_url(&a), 0), (admin_url(&b), 11)];
    until_revisions(&admin, &expected, "a back at 0 (admin)").await?;
    Ok(())
}

/// `sluice run` on `spec` in `dir`, listening on `listen`; its log in `dir/sluice.log`.
fn sluice_run(dir: &std::path::Path, spec: &Value, listen: u16) -> anyhow::Result<Child> {
    let path = dir.join("rollout.yaml");
    std::fs::write(&path, serde_json::to_string_pretty(spec)?)?;
    let log = std::fs::File::create(dir.join("sluice.log"))?;
    Ok(Command::new(sluice_bin()?)
        .args(["run", "--exit-when-done", "--state-dir"])
        .arg(dir.join("state"))
        .arg("--listen")
        .arg(format!("127.0.0.1:{listen}"))
        .arg("-f")
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?)
}

async fn status(listen: u16) -> Option<Value> {
    let url = format!("http://127.0.0.1:{listen}/status");
    let s: Value = HttpClient::new().get(&url).await.ok()?.json().ok()?;
    Some(s[0].clone())
}

fn audit(dir: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("state/r.audit.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn a_proxy_serving_another_revision_holds_the_rollout_until_it_runs_the_confirmed_one(
) -> anyhow::Result<()> {
    let stable = Upstream::start("stable", |_: &sluice_tests::Request| Reply::ok()).await?;
    let canary = Upstream::start("canary", |_: &sluice_tests::Request| Reply::ok()).await?;
    let a = envoy(&stable, &canary, 1).await?;
    // `b` serves the same experiment, but the sink only writes `a`'s file: `b` keeps its
    // bootstrap configuration (revision 0, everyone on stable).
    let b = envoy(&stable, &canary, 1).await?;
    let dir = tempfile::tempdir()?;
    let listen = free_port()?;
    let spec = json!({
        "apiVersion": "sluice.dev/v1alpha1",
        "kind": "Rollout",
        "metadata": {"name": "r"},
        "spec": {
            "experiment": {
                "name": "r",
                "unit": {"type": "user", "keys": [{"header": "x-user-id"}]},
                "variants": [{"name": "stable", "control": true}, {"name": "canary", "weight": 0}],
                "echo": {"header": "x-sluice-variant"},
            },
            // The bake outlasts the cross-check's grace after a confirmation (5 s here).
            "schedule": {"stages": [50, 100], "bake": "8s", "warmup": "1s", "interval": "500ms"},
            // Promote when no breach shows; latency only against loose bounds (two identical
            // loopback upstreams on a loaded 2-core machine differ by 2x at times).
            "guardrails": {
                "promotion": "noBreach",
                "minRequests": 50,
                "latency": {"quantiles": [{
                    "quantile": 0.99,
                    "margin": {"relative": 0.9, "absolute": 0.2},
                    "tolerance": {"relative": 0.9, "absolute": 0.2},
                    "sloMs": 1000,
                }]},
            },
            "sources": [{"envoyAdmin": {"endpoints": [admin_url(&a), admin_url(&b)]}}],
            "sinks": [{"ecdsFile": {
                "path": a.ecds_file("sluice.yaml")?.display().to_string(),
                "wasm": {"filename": filter_wasm()?.display().to_string()},
                "proxies": [admin_url(&a)],
                "confirmWithin": "10s",
            }}],
        }
    });
    let traffic = Traffic::spread(vec![a.url(LISTENER, "/")], 20, 2000);
    let run = Killed(sluice_run(dir.path(), &spec, listen)?);
    let log = || std::fs::read_to_string(dir.path().join("sluice.log")).unwrap_or_default();
    let b_admin = admin_url(&b);
    let expected_hold = format!(
        "the data plane disagrees with the sinks' confirmation: 1 of 2 proxies reporting run another version than the confirmed 1: {b_admin} at 0"
    );
    let held_since = wait_for(
        Duration::from_secs(60),
        "the cross-check's hold",
        || async {
            let s = status(listen).await;
            let hold = s
                .as_ref()
                .and_then(|s| s["state"]["hold"].as_str().map(str::to_string));
            Ok::<_, anyhow::Error>(
                (hold.as_deref() == Some(expected_hold.as_str())).then(Instant::now),
            )
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", log()))?;
    // It stays at 50 % well past the stage's warm-up and bake (9 s), traffic passing.
    while held_since.elapsed() < Duration::from_secs(10) {
        let s = status(listen).await.unwrap_or(Value::Null);
        assert_eq!(s["state"]["weight"], 50.0, "{s}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let s = status(listen).await.unwrap_or(Value::Null);
    assert_eq!(s["proxies_by_revision"], json!({"0": 1, "1": 1}), "{s}");
    let disagreed = audit(dir.path())
        .into_iter()
        .find(|r| r["record"] == "crosscheck" && r["agrees"] == false);
    let Some(disagreed) = disagreed else {
        anyhow::bail!("no crosscheck record in the audit log");
    };
    assert_eq!(disagreed["proxies"][&b_admin], 0, "{disagreed}");
    assert_eq!(disagreed["proxies"][admin_url(&a)], 1, "{disagreed}");
    // From now on `b` takes what the sink writes for `a` (the same file): the hold ends and
    // the rollout is promoted through its last stage, which is cross-checked too.
    let (from, to) = (a.ecds_file("sluice.yaml")?, b.ecds_file("sluice.yaml")?);
    let mut run = run;
    let exit = wait_for(Duration::from_secs(60), "sluice run to exit", || {
        let pushed = std::fs::read_to_string(&from).unwrap_or_default();
        if std::fs::read_to_string(&to).unwrap_or_default() != pushed {
            let _ = b.write_ecds("sluice.yaml", &pushed);
        }
        let status = run.0.try_wait();
        async move { status.map_err(anyhow::Error::from) }
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", log()))?;
    traffic.stop().await;
    assert!(exit.success(), "{}", log());
    let state: Value = serde_json::from_str(&std::fs::read_to_string(
        dir.path().join("state/r.state.json"),
    )?)?;
    assert_eq!(state["phase"]["phase"], "promoted", "{state}");
    assert!(
        audit(dir.path())
            .iter()
            .any(|r| r["record"] == "crosscheck" && r["agrees"] == true),
        "{}",
        log()
    );
    Ok(())
}

/// A Kubernetes API server holding one WasmPlugin (`shop/sluice`), with istiod's part: each
/// accepted write's `pluginConfig` goes to the Envoys' ECDS files, numbers as floats (the
/// way a `google.protobuf.Struct` carries them). Envoys in `skipped` are not written to, as
/// if istiod never reached them.
struct FakeCluster {
    port: u16,
    object: Arc<std::sync::Mutex<Value>>,
    skipped: Arc<std::sync::Mutex<Vec<PathBuf>>>,
    /// Requests seen: method and path.
    seen: Arc<std::sync::Mutex<Vec<(String, String)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeCluster {
    fn drop(&mut self) {
        self.task.abort();
    }
}

const WASM_PLUGIN_PATH: &str =
    "/apis/extensions.istio.io/v1alpha1/namespaces/shop/wasmplugins/sluice";

/// `value` with every number written as a float.
fn floats(value: &Value) -> Value {
    match value {
        Value::Number(n) => n.as_f64().map_or(Value::Null, |f| {
            serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)
        }),
        Value::Array(a) => Value::Array(a.iter().map(floats).collect()),
        Value::Object(m) => Value::Object(m.iter().map(|(k, v)| (k.clone(), floats(v))).collect()),
        other => other.clone(),
    }
}

impl FakeCluster {
    async fn start(envoys: &[&Envoy], code: WasmCode) -> anyhow::Result<FakeCluster> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let object = Arc::new(std::sync::Mutex::new(json!({
            "apiVersion": "extensions.istio.io/v1alpha1",
            "kind": "WasmPlugin",
            "metadata": {"name": "sluice", "namespace": "shop", "resourceVersion": "1"},
            "spec": {"url": "http://sluice.sluice-system:8080/sluice_filter.wasm",
                     "failStrategy": "FAIL_OPEN", "phase": "AUTHN", "match": [{"mode": "CLIENT"}]},
        })));
        let skipped: Arc<std::sync::Mutex<Vec<PathBuf>>> = Arc::default();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let files: Vec<PathBuf> = envoys
            .iter()
            .map(|e| e.ecds_file("sluice.yaml"))
            .collect::<Result<_, _>>()?;
        let (o, s, l) = (object.clone(), skipped.clone(), seen.clone());
        // The first write meets a conflict: another writer got there first.
        let conflicted = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (o, s, l, files, code, conflicted) = (
                    o.clone(),
                    s.clone(),
                    l.clone(),
                    files.clone(),
                    code.clone(),
                    conflicted.clone(),
                );
                let service = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let (o, s, l, files, code, conflicted) = (
                            o.clone(),
                            s.clone(),
                            l.clone(),
                            files.clone(),
                            code.clone(),
                            conflicted.clone(),
                        );
                        async move {
                            use http_body_util::BodyExt;
                            let method = req.method().to_string();
                            let path = req.uri().path().to_string();
                            let body = req
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            l.lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .push((method.clone(), path.clone()));
                            let reply = |status: u16, v: &Value| {
                                hyper::Response::builder()
                                    .status(status)
                                    .header("content-type", "application/json")
                                    .body(http_body_util::Full::new(bytes::Bytes::from(
                                        v.to_string(),
                                    )))
                            };
                            let status_of = |code: u16, reason: &str| {
                                json!({"kind": "Status", "apiVersion": "v1",
                            "status": "Failure", "reason": reason, "code": code, "message": reason})
                            };
                            if path != WASM_PLUGIN_PATH {
                                return reply(404, &status_of(404, "NotFound"));
                            }
                            let mut object = o.lock().unwrap_or_else(|e| e.into_inner());
                            match method.as_str() {
                                "GET" => reply(200, &object),
                                "PUT" => {
                                    let Ok(mut new) = serde_json::from_slice::<Value>(&body) else {
                                        return reply(400, &status_of(400, "BadRequest"));
                                    };
                                    let rv: u64 = object["metadata"]["resourceVersion"]
                                        .as_str()
                                        .and_then(|r| r.parse().ok())
                                        .unwrap_or(0);
                                    if !conflicted.swap(true, Ordering::Relaxed) {
                                        object["metadata"]["resourceVersion"] =
                                            json!((rv + 1).to_string());
                                        return reply(409, &status_of(409, "Conflict"));
                                    }
                                    if new["metadata"]["resourceVersion"]
                                        != object["metadata"]["resourceVersion"]
                                    {
                                        return reply(409, &status_of(409, "Conflict"));
                                    }
                                    new["metadata"]["resourceVersion"] =
                                        json!((rv + 1).to_string());
                                    *object = new;
                                    // istiod: the plugin's configuration to every proxy it reaches.
                                    let plugin = floats(&object["spec"]["pluginConfig"]);
                                    let Ok(filter) = serde_json::from_value::<FilterConfig>(
                                        object["spec"]["pluginConfig"].clone(),
                                    ) else {
                                        return reply(200, &object);
                                    };
                                    let skip = s.lock().unwrap_or_else(|e| e.into_inner()).clone();
                                    if let Ok(text) = sluice_controller::sink::ecds_file::render(
                                        "sluice",
                                        &code,
                                        &filter,
                                        rv + 1,
                                    ) {
                                        let mut doc: Value =
                                            serde_json::from_str(&text).unwrap_or(Value::Null);
                                        doc["resources"][0]["typed_config"]["config"]
                                            ["configuration"]["value"] = json!(plugin.to_string());
                                        for f in files.iter().filter(|f| !skip.contains(f)) {
                                            let tmp = f.with_file_name(".istiod.tmp");
                                            if std::fs::write(&tmp, doc.to_string()).is_ok() {
                                                let _ = std::fs::rename(&tmp, f);
                                            }
                                        }
                                    }
                                    reply(200, &object)
                                }
                                _ => reply(405, &status_of(405, "MethodNotAllowed")),
                            }
                        }
                    },
                );
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(FakeCluster {
            port,
            object,
            skipped,
            seen,
            task,
        })
    }

    /// A kubeconfig for this cluster, written into `dir`.
    fn kubeconfig(&self, dir: &std::path::Path) -> anyhow::Result<PathBuf> {
        let path = dir.join("kubeconfig");
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: \"http://127.0.0.1:{}\"}}\nusers:\n- name: sluice\n  user: {{token: test-token}}\ncontexts:\n- name: fake\n  context: {{cluster: fake, user: sluice, namespace: shop}}\ncurrent-context: fake\n",
                self.port
            ),
        )?;
        Ok(path)
    }
}

/// A rollout of experiment `r` through the istioWasmPlugin sink, confirmed from `source`.
fn istio_spec(source: Value, confirm_within: &str) -> Value {
    json!({
        "apiVersion": "sluice.dev/v1alpha1",
        "kind": "Rollout",
        "metadata": {"name": "r"},
        "spec": {
            "experiment": {
                "name": "r",
                "unit": {"type": "user", "keys": [{"header": "x-user-id"}]},
                "variants": [{"name": "stable", "control": true}, {"name": "canary", "weight": 0}],
                "echo": {"header": "x-sluice-variant"},
            },
            "schedule": {"stages": [50, 100], "bake": "2s", "warmup": "1s", "interval": "500ms"},
            "guardrails": {
                "promotion": "noBreach",
                "minRequests": 50,
                "latency": {"quantiles": [{
                    "quantile": 0.99,
                    "margin": {"relative": 0.9, "absolute": 0.2},
                    "tolerance": {"relative": 0.9, "absolute": 0.2},
                    "sloMs": 1000,
                }]},
            },
            "sources": [source],
            "sinks": [{"istioWasmPlugin": {
                "name": "sluice", "namespace": "shop", "minProxies": 2, "confirmWithin": confirm_within,
            }}],
        }
    })
}

fn sluice_run_with_kubeconfig(
    dir: &std::path::Path,
    spec: &Value,
    listen: u16,
    kubeconfig: &std::path::Path,
) -> anyhow::Result<Child> {
    let path = dir.join("rollout.yaml");
    std::fs::write(&path, serde_json::to_string_pretty(spec)?)?;
    let log = std::fs::File::create(dir.join("sluice.log"))?;
    Ok(Command::new(sluice_bin()?)
        .env("KUBECONFIG", kubeconfig)
        .args(["run", "--exit-when-done", "--state-dir"])
        .arg(dir.join("state"))
        .arg("--listen")
        .arg(format!("127.0.0.1:{listen}"))
        .arg("-f")
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?)
}

fn wasm_code() -> anyhow::Result<WasmCode> {
    Ok(WasmCode {
        filename: filter_wasm()?.display().to_string(),
        remote: None,
        vm_id: "sluice".into(),
        root_id: "sluice".into(),
        runtime: "envoy.wasm.runtime.v8".into(),
    })
}

#[tokio::test]
async fn the_istio_sink_is_confirmed_by_the_proxies_through_prometheus() -> anyhow::Result<()> {
    let stable = Upstream::start("stable", |_: &sluice_tests::Request| Reply::ok()).await?;
    let canary = Upstream::start("canary", |_: &sluice_tests::Request| Reply::ok()).await?;
    let a = envoy(&stable, &canary, 2).await?;
    let b = envoy(&stable, &canary, 1).await?;
    let prometheus = Prometheus::start(&[a.addr(ADMIN), b.addr(ADMIN)]).await?;
    let cluster = FakeCluster::start(&[&a, &b], wasm_code()?).await?;
    let dir = tempfile::tempdir()?;
    let listen = free_port()?;
    let spec = istio_spec(
        json!({"prometheus": {"url": prometheus.url(), "maxAge": "10s"}}),
        "30s",
    );
    let traffic = Traffic::spread(vec![a.url(LISTENER, "/")], 20, 2000);
    let mut run = Killed(sluice_run_with_kubeconfig(
        dir.path(),
        &spec,
        listen,
        &cluster.kubeconfig(dir.path())?,
    )?);
    let log = || std::fs::read_to_string(dir.path().join("sluice.log")).unwrap_or_default();
    let exit = wait_for(Duration::from_secs(120), "sluice run to exit", || {
        let status = run.0.try_wait();
        async move { status.map_err(anyhow::Error::from) }
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", log()))?;
    traffic.stop().await;
    assert!(exit.success(), "{}", log());
    let state: Value = serde_json::from_str(&std::fs::read_to_string(
        dir.path().join("state/r.state.json"),
    )?)?;
    assert_eq!(state["phase"]["phase"], "promoted", "{state}\n{}", log());
    let object = cluster.object.lock().map(|o| o.clone()).unwrap_or_default();
    let config = &object["spec"]["pluginConfig"];
    assert_eq!(
        config["experiments"][0]["variants"][1]["weight"], 100.0,
        "{object}"
    );
    assert!(
        config["revision"]
            .as_str()
            .is_some_and(|r| r.starts_with("2@")),
        "{object}"
    );
    assert_eq!(object["spec"]["failStrategy"], "FAIL_OPEN", "{object}");
    // The first write met a conflict and was made again on the object read anew.
    let seen = cluster.seen.lock().map(|s| s.clone()).unwrap_or_default();
    let methods: Vec<&str> = seen.iter().take(4).map(|(m, _)| m.as_str()).collect();
    assert_eq!(methods, ["GET", "PUT", "GET", "PUT"], "{seen:?}");
    // Both Envoys run the last push, as their own gauges say (on every worker of `a`).
    let admin = EnvoyAdmin::new(
        &[admin_url(&a), admin_url(&b)],
        Duration::from_secs(2),
        None,
    );
    until_revisions(
        &admin,
        &[(admin_url(&a), 2), (admin_url(&b), 2)],
        "both Envoys at version 2",
    )
    .await?;
    let pushes: Vec<Value> = audit(dir.path())
        .into_iter()
        .filter(|r| r["record"] == "push")
        .collect();
    assert_eq!(pushes.len(), 2, "{pushes:?}");
    eprintln!(
        "decision to confirmation through Prometheus (1 s scrapes): {:?} s",
        pushes
            .iter()
            .map(|p| p["decision_to_confirmation_secs"].as_f64().unwrap_or(-1.0))
            .collect::<Vec<_>>()
    );
    Ok(())
}

#[tokio::test]
async fn a_proxy_istiod_does_not_reach_leaves_the_istio_push_unconfirmed_and_the_rollout_holds(
) -> anyhow::Result<()> {
    let stable = Upstream::start("stable", |_: &sluice_tests::Request| Reply::ok()).await?;
    let canary = Upstream::start("canary", |_: &sluice_tests::Request| Reply::ok()).await?;
    let a = envoy(&stable, &canary, 1).await?;
    let b = envoy(&stable, &canary, 1).await?;
    let cluster = FakeCluster::start(&[&a, &b], wasm_code()?).await?;
    cluster
        .skipped
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .push(b.ecds_file("sluice.yaml")?);
    let dir = tempfile::tempdir()?;
    let listen = free_port()?;
    let spec = istio_spec(
        json!({"envoyAdmin": {"endpoints": [admin_url(&a), admin_url(&b)]}}),
        "3s",
    );
    let _run = Killed(sluice_run_with_kubeconfig(
        dir.path(),
        &spec,
        listen,
        &cluster.kubeconfig(dir.path())?,
    )?);
    let log = || std::fs::read_to_string(dir.path().join("sluice.log")).unwrap_or_default();
    let b_admin = admin_url(&b);
    let hold = wait_for(
        Duration::from_secs(60),
        "the unconfirmed push's hold",
        || async {
            let hold = status(listen)
                .await
                .and_then(|s| s["state"]["hold"].as_str().map(str::to_string));
            Ok::<_, anyhow::Error>(hold.filter(|h| h.starts_with("push failed")))
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", log()))?;
    assert!(
        hold.contains("WasmPlugin shop/sluice: the data plane did not confirm version 1 within")
            && hold.contains(&format!("1 at 0 ({b_admin})")),
        "{hold}"
    );
    let s = status(listen).await.unwrap_or(Value::Null);
    assert_eq!(s["state"]["weight"], 0.0, "{s}");
    // istiod reaches it at last: the retried push is confirmed and the stage starts.
    cluster
        .skipped
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clear();
    wait_for(Duration::from_secs(60), "the stage confirmed", || async {
        let s = status(listen).await;
        Ok::<_, anyhow::Error>(
            s.filter(|s| s["state"]["weight"] == 50.0 && s["state"]["pending"].is_null()),
        )
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", log()))?;
    Ok(())
}
