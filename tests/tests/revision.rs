//! Confirmation from the data plane, against real Envoys: the filter's gauge
//! `sluice_config_revision` follows every ECDS push on every worker, as the controller's
//! sources read it (Envoy admin and Prometheus); and `sluice run` cross-checks its sink's
//! confirmation with it: a proxy the sink does not reach, serving another revision, holds the
//! rollout until it runs the confirmed version.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sluice_controller::admin::Admin as ControllerAdmin;
use sluice_controller::sink::ecds_file::{EcdsFile, WasmCode};
use sluice_controller::sink::Sink;
use sluice_controller::source::envoy_admin::EnvoyAdmin;
use sluice_controller::source::prometheus::Prometheus as PrometheusSource;
use sluice_controller::source::revision::Revisions;
use sluice_controller::source::Source;
use sluice_filter::config::FilterConfig;
use sluice_tests::{
    filter_wasm, free_port, sluice_bin, wait_for, Envoy, EnvoyConfig, HttpClient, Prometheus,
    Reply, Upstream,
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

/// Steady traffic of 2,000 users to `url` until stopped.
struct Traffic {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Traffic {
    fn start(url: String) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let client = HttpClient::new();
            let mut i: u64 = 0;
            while !flag.load(Ordering::Relaxed) {
                let mut batch = tokio::task::JoinSet::new();
                for _ in 0..20 {
                    let (client, url) = (client.clone(), url.clone());
                    let user = format!("u-{}", i % 2000);
                    i += 1;
                    batch.spawn(async move {
                        let _ = client
                            .send(
                                hyper::Method::GET,
                                &url,
                                &[("x-user-id", &user)],
                                Vec::<u8>::new(),
                            )
                            .await;
                    });
                }
                while batch.join_next().await.is_some() {}
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        Traffic { stop, task }
    }

    async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
    }
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
    let traffic = Traffic::start(a.url(LISTENER, "/"));
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
