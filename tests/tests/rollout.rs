//! `sluice run` end to end against a real Envoy: a good treatment is promoted through a
//! compressed schedule, a bad one is rolled back and Envoy stops routing to it, a rejected
//! push holds, and `kill -9` mid-rollout followed by a restart resumes without raising a
//! weight on old evidence.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sluice_tests::{
    filter_wasm, free_port, sluice_bin, wait_until, Envoy, EnvoyConfig, HttpClient, Reply, Request,
    Upstream,
};

const LISTENER: u16 = 10000;
const ADMIN: u16 = 9901;

/// A model that answers 200 with a score, or 500 for a share of users.
fn model(error_every: u64) -> impl Fn(&Request) -> Reply + Send + Sync {
    move |req: &Request| {
        let i: u64 = req
            .user()
            .and_then(|u| u.strip_prefix("u-"))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        if error_every > 0 && i.is_multiple_of(error_every) {
            return Reply::status(500);
        }
        Reply::json(json!({"score": 0.5})).header("x-model-score", "0.5")
    }
}

/// A stable model, a canary model failing every `canary_error_every`-th user (0: never), and
/// Envoy in front of them.
async fn stack(canary_error_every: u64) -> anyhow::Result<(Upstream, Upstream, Envoy)> {
    let stable = Upstream::start("stable", model(0)).await?;
    let canary = Upstream::start("canary", model(canary_error_every)).await?;
    let envoy = envoy(&stable, &canary).await?;
    Ok((stable, canary, envoy))
}

async fn envoy(stable: &Upstream, canary: &Upstream) -> anyhow::Result<Envoy> {
    Ok(EnvoyConfig::new("tests/envoy/rollout.yaml")
        .port_to(10001, stable.port())
        .port_to(10002, canary.port())
        .ecds("tests/envoy/rollout")
        .start()
        .await?)
}

/// Steady traffic from 4,000 users until dropped.
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
                    let user = format!("u-{}", i % 4000);
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

/// The guardrails used by these tests: a few hundred canary requests per 4 s stage prove
/// nothing at the default margins (see `sluice plan`), so stages promote when enough data shows
/// no breach; a 25 % error rate is still a breach within seconds. Latency is judged only against
/// a loose SLO and wide margins: with tests running side by side on a 2-core machine, the p99 of
/// two identical loopback upstreams was seen to differ by 2x for seconds at a time, which the
/// default margins rightly flag, and which is not what these tests are about.
fn guardrails() -> Value {
    json!({
        "promotion": "noBreach",
        "minRequests": 100,
        "latency": {"quantiles": [{
            "quantile": 0.99,
            "margin": {"relative": 0.9, "absolute": 0.2},
            "tolerance": {"relative": 0.9, "absolute": 0.2},
            "sloMs": 1000,
        }]},
    })
}

struct Run {
    dir: tempfile::TempDir,
    /// `metadata.name` of the first spec.
    name: String,
    /// The first spec, as written.
    base: Value,
    /// Every spec file given to `sluice run`.
    specs: Vec<PathBuf>,
    listen: u16,
}

impl Run {
    fn new(envoy: &Envoy, stages: Value, wasm: &str) -> anyhow::Result<Run> {
        Run::with(envoy, stages, wasm, |_| Ok(()))
    }

    /// A rollout spec with the admin source and ECDS sink of `envoy`, changed by `tweak`.
    fn with(
        envoy: &Envoy,
        stages: Value,
        wasm: &str,
        tweak: impl FnOnce(&mut Value) -> anyhow::Result<()>,
    ) -> anyhow::Result<Run> {
        let dir = tempfile::tempdir()?;
        let ecds = envoy.ecds_file("sluice.yaml")?;
        let admin = format!("http://{}", envoy.addr(ADMIN));
        let mut spec = json!({
            "apiVersion": "sluice.dev/v1alpha1",
            "kind": "Rollout",
            "metadata": {"name": "r"},
            "spec": {
                "experiment": {
                    "name": "r",
                    "unit": {"type": "user", "keys": [{"header": "x-user-id"}]},
                    "variants": [{"name": "stable", "control": true}, {"name": "canary", "weight": 0}],
                    "echo": {"header": "x-sluice-variant"},
                    "outcomes": {"header": "x-sluice-outcome", "names": ["click"]},
                    "prediction": {"header": "x-model-score"},
                },
                "schedule": {"stages": stages, "bake": "4s", "warmup": "1s", "interval": "500ms"},
                "guardrails": guardrails(),
                "sources": [{"envoyAdmin": {"endpoints": [admin]}}],
                "sinks": [{"ecdsFile": {
                    "path": ecds.display().to_string(),
                    "wasm": {"filename": wasm},
                    "proxies": [admin],
                    "confirmWithin": "5s",
                }}],
            }
        });
        tweak(&mut spec)?;
        let path = dir.path().join("rollout.yaml");
        std::fs::write(&path, serde_json::to_string_pretty(&spec)?)?;
        Ok(Run {
            name: spec["metadata"]["name"].as_str().unwrap_or("r").to_string(),
            base: spec,
            specs: vec![path],
            listen: free_port()?,
            dir,
        })
    }

    /// Adds another rollout to the same daemon.
    fn also(&mut self, spec: &Value) -> anyhow::Result<()> {
        let name = spec["metadata"]["name"].as_str().unwrap_or("other");
        let path = self.dir.path().join(format!("{name}.yaml"));
        std::fs::write(&path, serde_json::to_string_pretty(spec)?)?;
        self.specs.push(path);
        Ok(())
    }

    fn start(&self) -> anyhow::Result<Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("sluice.log"))?;
        Ok(Command::new(sluice_bin()?)
            .args(["run", "--exit-when-done", "--state-dir"])
            .arg(self.dir.path().join("state"))
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.listen))
            .args(
                self.specs
                    .iter()
                    .flat_map(|f| [PathBuf::from("-f"), f.clone()]),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?)
    }

    fn state(&self) -> Value {
        self.state_of(&self.name)
    }

    fn state_of(&self, name: &str) -> Value {
        std::fs::read_to_string(self.dir.path().join(format!("state/{name}.state.json")))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(Value::Null)
    }

    fn audit(&self) -> Vec<Value> {
        std::fs::read_to_string(
            self.dir
                .path()
                .join(format!("state/{}.audit.jsonl", self.name)),
        )
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sluice.log")).unwrap_or_default()
    }

    /// Runs `sluice <args> --endpoint <this daemon>` and returns its stdout.
    fn cli(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(sluice_bin()?)
            .args(args)
            .arg("--endpoint")
            .arg(format!("http://127.0.0.1:{}", self.listen))
            .output()?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        anyhow::ensure!(
            out.status.success(),
            "sluice {args:?}: {}\n{stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(stdout)
    }

    /// Requests the daemon has seen counted, all variants, and proxy restarts it noticed.
    async fn observed(&self) -> Option<(u64, u64)> {
        let s = self.status().await?;
        let total = s[0]["observed_requests"]
            .as_object()?
            .values()
            .filter_map(Value::as_u64)
            .sum();
        Some((total, s[0]["proxy_restarts"].as_u64()?))
    }

    async fn status(&self) -> Option<Value> {
        let url = format!("http://127.0.0.1:{}/status", self.listen);
        let r = HttpClient::new().get(&url).await.ok()?;
        r.json().ok()
    }
}

/// `sluice run --exit-when-done`: all promoted.
const PROMOTED: i32 = 0;
/// `sluice run`: stopped by SIGTERM.
const STOPPED: i32 = 0;
/// `sluice run --exit-when-done`: a rollout was rolled back.
const ROLLED_BACK: i32 = 3;

/// Waits for the process to exit by itself with `code`.
async fn exited(child: &mut Child, code: i32, within: Duration, run: &Run) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            anyhow::ensure!(
                status.code() == Some(code),
                "sluice run exited with {status}, expected {code}:\n{}",
                run.log()
            );
            return Ok(());
        }
        if start.elapsed() > within {
            let _ = child.kill();
            anyhow::bail!("sluice run still running after {within:?}:\n{}", run.log());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn wasm() -> anyhow::Result<String> {
    Ok(filter_wasm()?.display().to_string())
}

fn pushed_weights(run: &Run) -> Vec<f64> {
    run.audit()
        .iter()
        .filter(|r| r["record"] == "push")
        .filter_map(|r| r["weight"].as_f64())
        .collect()
}

#[tokio::test]
async fn a_good_treatment_is_promoted_through_the_schedule() -> anyhow::Result<()> {
    let (_stable, canary, envoy) = stack(0).await?;
    let traffic = Traffic::start(envoy.url(LISTENER, "/predict"));
    let run = Run::new(&envoy, json!([10, 50, 100]), &wasm()?)?;
    let mut child = run.start()?;
    exited(&mut child, PROMOTED, Duration::from_secs(120), &run).await?;
    traffic.stop().await;
    assert_eq!(run.state()["phase"]["phase"], "promoted", "{}", run.log());
    assert_eq!(pushed_weights(&run), vec![10.0, 50.0, 100.0]);
    // Envoy now sends everyone to the canary.
    let before = canary.count();
    let responses = sluice_tests::Load::new(envoy.url(LISTENER, "/"))
        .users(|i| format!("u-{i}"))
        .requests(200)
        .run()
        .await?;
    assert!(responses
        .iter()
        .all(|r| r.header("x-sluice-variant") == Some("canary")));
    assert_eq!(canary.count() - before, 200);
    Ok(())
}

#[tokio::test]
async fn a_bad_treatment_is_rolled_back_and_envoy_stops_routing_to_it() -> anyhow::Result<()> {
    let (_stable, canary, envoy) = stack(4).await?; // 25 % errors
    let traffic = Traffic::start(envoy.url(LISTENER, "/predict"));
    let run = Run::new(&envoy, json!([10, 50, 100]), &wasm()?)?;
    let mut child = run.start()?;
    exited(&mut child, ROLLED_BACK, Duration::from_secs(120), &run).await?;
    let state = run.state();
    assert_eq!(state["phase"]["phase"], "rolled_back", "{}", run.log());
    assert_eq!(state["weight"], 0.0);
    assert_eq!(pushed_weights(&run).last(), Some(&0.0));
    // No request reaches the canary any more.
    let before = canary.count();
    tokio::time::sleep(Duration::from_secs(1)).await;
    traffic.stop().await;
    assert_eq!(
        canary.count(),
        before,
        "the canary still gets traffic after the rollback"
    );
    Ok(())
}

#[tokio::test]
async fn a_rejected_push_holds_the_rollout() -> anyhow::Result<()> {
    let (_stable, canary, envoy) = stack(0).await?;
    // Envoy cannot load this module, so it rejects every push.
    let run = Run::new(&envoy, json!([10, 100]), "/nonexistent/sluice_filter.wasm")?;
    let mut child = run.start()?;
    let result = wait_until(
        Duration::from_secs(30),
        "the rollout holds on a failed push",
        || async {
            run.status().await.is_some_and(|s| {
                s[0]["state"]["hold"]
                    .as_str()
                    .is_some_and(|h| h.starts_with("push failed"))
            })
        },
    )
    .await;
    let _ = child.kill();
    let _ = child.wait();
    result.map_err(|e| anyhow::anyhow!("{e}\n{}", run.log()))?;
    assert_eq!(run.state()["weight"], 0.0);
    assert!(
        canary.count() == 0,
        "the canary got traffic although no push was accepted"
    );
    Ok(())
}

#[tokio::test]
async fn kill_9_mid_rollout_then_restart_resumes_without_raising_on_old_evidence(
) -> anyhow::Result<()> {
    let (_stable, _canary, envoy) = stack(0).await?;
    let traffic = Traffic::start(envoy.url(LISTENER, "/predict"));
    let run = Run::new(&envoy, json!([10, 50, 100]), &wasm()?)?;
    let mut child = run.start()?;
    wait_until(
        Duration::from_secs(60),
        "the second stage is confirmed",
        || async { run.state()["weight"] == 50.0 },
    )
    .await?;
    child.kill()?; // SIGKILL
    let _ = child.wait();

    // Restarted, then stopped by SIGTERM mid-stage: it persists and exits 0, still at 50 %.
    let mut child = run.start()?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let term = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()?;
    anyhow::ensure!(term.success(), "kill -TERM failed");
    exited(&mut child, STOPPED, Duration::from_secs(10), &run).await?;
    assert_eq!(run.state()["weight"], 50.0, "{}", run.log());
    assert_eq!(run.state()["phase"]["phase"], "canary", "{}", run.log());

    let started_last = unix_now();
    let mut child = run.start()?;
    exited(&mut child, PROMOTED, Duration::from_secs(120), &run).await?;
    traffic.stop().await;
    assert_eq!(run.state()["phase"]["phase"], "promoted", "{}", run.log());
    let pushes = pushed_weights(&run);
    assert_eq!(pushes.last(), Some(&100.0));
    assert!(!pushes.contains(&0.0), "{pushes:?}");
    // The 100 % push followed a passing evaluation on evidence the last process gathered
    // itself (its counters start empty): at least `minRequests` canary requests since it
    // started, none from before.
    let audit = run.audit();
    let raised_at = audit
        .iter()
        .filter(|r| r["record"] == "push" && r["weight"] == 100.0)
        .find_map(|r| r["at"].as_f64())
        .ok_or_else(|| anyhow::anyhow!("no 100 % push in the audit log"))?;
    let deciding = audit
        .iter()
        .rfind(|r| r["record"] == "evaluation" && r["at"].as_f64() <= Some(raised_at))
        .ok_or_else(|| anyhow::anyhow!("no evaluation before the 100 % push"))?;
    assert!(deciding["at"].as_f64() >= Some(started_last), "{deciding}");
    assert!(
        deciding["detail"]["stage_requests"]["canary"].as_u64() >= Some(100),
        "{deciding}"
    );
    // The judge counts evidence from `stage_started_at` + warm-up (1 s).
    let evidence_from = deciding["detail"]["stage_started_at"]
        .as_f64()
        .unwrap_or(0.0)
        + 1.0;
    assert!(
        evidence_from >= started_last,
        "the evidence reaches back before the last start at {started_last}: {deciding}"
    );
    Ok(())
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Waits until the daemon's count of requests matches what the upstreams answered (to within
/// a few requests lost to connection races) and it has seen `restarts` proxy restarts.
async fn counts_agree(run: &Run, upstreams: impl Fn() -> u64, restarts: u64) -> anyhow::Result<()> {
    let agrees = |(observed, seen): (u64, u64)| {
        let sent = upstreams();
        seen == restarts && observed.abs_diff(sent) <= 2 + sent / 500
    };
    let start = Instant::now();
    loop {
        let observed = run.observed().await;
        if observed.is_some_and(&agrees) {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(10) {
            anyhow::bail!(
                "the daemon saw (requests, restarts) = {observed:?}; the upstreams answered {} with {restarts} restart(s)\n{}",
                upstreams(),
                run.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn an_envoy_restart_mid_stage_does_not_corrupt_the_counts() -> anyhow::Result<()> {
    let (stable, canary, mut envoy) = stack(0).await?;
    let url = envoy.url(LISTENER, "/predict");
    let run = Run::new(&envoy, json!([10, 50, 100]), &wasm()?)?;
    let mut child = run.start()?;
    let traffic = Traffic::start(url.clone());
    wait_until(Duration::from_secs(60), "the second stage", || async {
        run.state()["weight"] == 50.0
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", run.log()))?;
    // The command returns once the pause is applied and persisted, with where the rollout stands.
    let said = run.cli(&["pause", "r"])?;
    assert!(
        said.contains("pause: applied; canary at 50.00% (stage 2), paused"),
        "sluice pause printed: {said}"
    );
    let table = run.cli(&["status"])?;
    assert!(
        table.contains("r ") && table.contains("paused"),
        "sluice status printed:\n{table}"
    );
    traffic.stop().await;

    // Every request the upstreams answered is in the daemon's count, before and after a
    // restart that sets all of Envoy's counters back to zero.
    let upstreams = || stable.count() + canary.count();
    counts_agree(&run, upstreams, 0).await?;

    envoy.restart().await?;
    let canary_before = canary.count();
    let total_before = upstreams();
    let traffic = Traffic::start(url.clone());
    tokio::time::sleep(Duration::from_secs(2)).await;
    traffic.stop().await;
    counts_agree(&run, upstreams, 1).await?;
    // The restarted Envoy loaded the last pushed configuration: still 50 %.
    let share = (canary.count() - canary_before) as f64 / (upstreams() - total_before) as f64;
    assert!(
        (0.4..0.6).contains(&share),
        "canary share {share} after the restart"
    );

    run.cli(&["resume", "r"])?;
    let traffic = Traffic::start(url);
    exited(&mut child, PROMOTED, Duration::from_secs(120), &run).await?;
    traffic.stop().await;
    assert_eq!(pushed_weights(&run), vec![10.0, 50.0, 100.0]);
    Ok(())
}

/// Read through a real Prometheus that goes away mid-stage: the rollout holds on "no data"
/// without moving the weight, and continues to promotion once Prometheus is back. Every event
/// reaches the JSON and the Slack-form webhooks.
#[tokio::test]
async fn prometheus_down_holds_then_the_rollout_continues_and_webhooks_hear_of_it(
) -> anyhow::Result<()> {
    let stable = Upstream::start("stable", model(0)).await?;
    let canary = Upstream::start("canary", model(0)).await?;
    let hooks = Upstream::start("hooks", |_: &Request| Reply::ok()).await?;
    let envoy = envoy(&stable, &canary).await?;
    let mut prometheus = sluice_tests::Prometheus::start(&[envoy.addr(ADMIN)]).await?;
    let hook = |path: &str| format!("http://{}{path}", hooks.addr());
    let run = Run::with(&envoy, json!([10, 100]), &wasm()?, |spec| {
        spec["spec"]["sources"] =
            json!([{"prometheus": {"url": prometheus.url(), "maxAge": "4s"}}]);
        spec["spec"]["notifications"] = json!([
            {"webhook": {"url": hook("/json")}},
            {"webhook": {"url": hook("/slack"), "format": "slack"}},
        ]);
        Ok(())
    })?;
    let traffic = Traffic::start(envoy.url(LISTENER, "/predict"));
    let mut child = run.start()?;
    wait_until(
        Duration::from_secs(60),
        "the first stage is judged on data",
        || async {
            run.status().await.is_some_and(|s| {
                s[0]["state"]["weight"] == 10.0
                    && s[0]["last_detail"]["stage_requests"]["canary"].as_u64() > Some(0)
            })
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", run.log()))?;

    prometheus.kill();
    wait_until(
        Duration::from_secs(20),
        "a hold on missing data",
        || async {
            run.status().await.is_some_and(|s| {
                s[0]["state"]["hold"]
                    .as_str()
                    .is_some_and(|h| h.contains("no data"))
            })
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", run.log()))?;
    // Held past the bake's end: no advance without fresh evidence.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(run.state()["weight"], 10.0, "{}", run.log());

    prometheus.resume().await?;
    exited(&mut child, PROMOTED, Duration::from_secs(120), &run).await?;
    traffic.stop().await;
    assert_eq!(pushed_weights(&run), vec![10.0, 100.0]);

    // Notifications are sent in the background: give the last ones a moment.
    let bodies = |path: &str, field: &str| -> Vec<String> {
        hooks
            .requests()
            .iter()
            .filter(|r| r.path == path)
            .filter_map(|r| serde_json::from_slice::<Value>(&r.body).ok())
            .filter_map(|v| v[field].as_str().map(str::to_string))
            .collect()
    };
    let (mut kinds, mut texts) = (Vec::new(), Vec::new());
    for _ in 0..50 {
        (kinds, texts) = (bodies("/json", "kind"), bodies("/slack", "text"));
        if kinds.iter().any(|k| k == "promoted") && texts.len() == kinds.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for want in ["started", "held", "stage_changed", "promoted"] {
        assert!(
            kinds.iter().any(|k| k == want),
            "no {want} notice in {kinds:?}"
        );
    }
    assert_eq!(texts.len(), kinds.len(), "{texts:?}");
    assert!(
        texts
            .iter()
            .any(|t| t.contains("rollout r") && t.contains("no data")),
        "{texts:?}"
    );
    Ok(())
}

/// One daemon, two rollouts on one Envoy, each with its own filter (ECDS resource and file in
/// a shared watched directory), experiment, salt and routing header: the good one is promoted,
/// the bad one rolled back, and neither disturbs the other.
#[tokio::test]
async fn one_daemon_runs_two_rollouts_independently() -> anyhow::Result<()> {
    let stable = Upstream::start("stable", model(0)).await?;
    // The canary fails every request of experiment b (paths /b), none of experiment a.
    let canary = Upstream::start("canary", |req: &Request| {
        if req.path.starts_with("/b") {
            Reply::status(500)
        } else {
            Reply::json(json!({"score": 0.5}))
        }
    })
    .await?;
    let envoy = EnvoyConfig::new("tests/envoy/two-rollouts.yaml")
        .port_to(10001, stable.port())
        .port_to(10002, canary.port())
        .ecds("tests/envoy/two-rollouts")
        .start()
        .await?;
    let rollout = |x: &str, spec: &mut Value| -> anyhow::Result<()> {
        spec["metadata"]["name"] = json!(x);
        let e = &mut spec["spec"]["experiment"];
        e["name"] = json!(x);
        e["match"] = json!({"path_prefix": format!("/{x}")});
        e["header"] = json!(format!("x-variant-{x}"));
        e["echo"] = json!({"header": format!("x-variant-{x}")});
        if let Some(o) = e.as_object_mut() {
            o.remove("outcomes");
            o.remove("prediction");
        }
        let sink = &mut spec["spec"]["sinks"][0]["ecdsFile"];
        let file = envoy.ecds_file(&format!("sluice-{x}.yaml"))?;
        sink["path"] = json!(file.display().to_string());
        sink["resource"] = json!(format!("sluice-{x}"));
        Ok(())
    };
    let mut run = Run::with(&envoy, json!([20, 100]), &wasm()?, |s| rollout("a", s))?;
    let mut b = run.base.clone();
    rollout("b", &mut b)?;
    run.also(&b)?;
    let traffic_a = Traffic::start(envoy.url(LISTENER, "/a/predict"));
    let traffic_b = Traffic::start(envoy.url(LISTENER, "/b/predict"));
    let mut child = run.start()?;
    exited(&mut child, ROLLED_BACK, Duration::from_secs(120), &run).await?;
    traffic_a.stop().await;
    traffic_b.stop().await;
    assert_eq!(
        run.state_of("a")["phase"]["phase"],
        "promoted",
        "{}",
        run.log()
    );
    assert_eq!(
        run.state_of("b")["phase"]["phase"],
        "rolled_back",
        "{}",
        run.log()
    );
    // Envoy now sends every /a user to the canary and every /b user to the stable.
    for (path, header, want) in [
        ("/a/x", "x-variant-a", "canary"),
        ("/b/x", "x-variant-b", "stable"),
    ] {
        let responses = sluice_tests::Load::new(envoy.url(LISTENER, path))
            .users(|i| format!("u-{i}"))
            .requests(100)
            .run()
            .await?;
        assert!(
            responses.iter().all(|r| r.header(header) == Some(want)),
            "{path}: not all {want}"
        );
    }
    Ok(())
}

/// A rollout that starts with a shadow stage, against a shadow model 500 ms slow (over 100x the
/// primary): users never wait for it, the copies are compared and judged, and the rollout
/// goes on through its stages.
#[tokio::test]
async fn a_slow_shadow_stage_leaves_users_unaffected_and_the_rollout_continues(
) -> anyhow::Result<()> {
    let stable = Upstream::start("stable", model(0)).await?;
    let canary = Upstream::start("canary", model(0)).await?;
    let shadow = Upstream::start("shadow", |_: &Request| {
        Reply::json(json!({"score": 0.5}))
            .header("x-model-score", "0.5")
            .delay(Duration::from_millis(500))
    })
    .await?;
    let envoy = EnvoyConfig::new("tests/envoy/rollout.yaml")
        .port_to(10001, stable.port())
        .port_to(10002, canary.port())
        .port_to(10003, shadow.port())
        .ecds("tests/envoy/rollout")
        .start()
        .await?;
    let run = Run::with(&envoy, json!([50, 100]), &wasm()?, |spec| {
        spec["spec"]["shadow"] = json!({"duration": "4s"});
        spec["spec"]["experiment"]["shadow"] = json!({
            "cluster": "shadow",
            "sample_percent": 100,
            "timeout_ms": 2000,
            "max_in_flight": 1000,
            "compare": {"fields": [{"name": "score", "pointer": "/score", "type": "number"}]},
        });
        spec["spec"]["guardrails"]["shadow"] =
            json!({"minAgreement": 0.95, "fields": ["status", "score"]});
        Ok(())
    })?;
    let mut child = run.start()?;
    let traffic = Traffic::start(envoy.url(LISTENER, "/predict"));
    wait_until(Duration::from_secs(30), "the shadow stage", || async {
        run.state()["phase"]["phase"] == "shadow"
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", run.log()))?;
    // Requests during the shadow stage: answered by the stable model at its own speed.
    let responses = sluice_tests::Load::new(envoy.url(LISTENER, "/predict"))
        .users(|i| format!("probe-{i}"))
        .requests(200)
        .concurrency(4)
        .run()
        .await?;
    let phase = run.state()["phase"]["phase"].clone();
    let mut latencies: Vec<Duration> = responses.iter().map(|r| r.latency).collect();
    latencies.sort();
    let median = latencies[latencies.len() / 2];
    assert!(
        responses.iter().all(|r| r.status == 200),
        "primary failures during the shadow stage"
    );
    assert!(
        median < Duration::from_millis(100),
        "median {median:?} with a 500 ms shadow (phase now {phase})"
    );
    assert!(shadow.count() > 0, "no copies reached the shadow");
    exited(&mut child, PROMOTED, Duration::from_secs(120), &run).await?;
    traffic.stop().await;
    assert_eq!(
        pushed_weights(&run),
        vec![0.0, 50.0, 100.0],
        "{}",
        run.log()
    );
    // Copies go out only during the shadow stage: the configuration in force has none.
    let in_force = std::fs::read_to_string(envoy.ecds_file("sluice.yaml")?)?;
    assert!(!in_force.contains("shadow"), "{in_force}");
    // The shadow stage was judged on the copies' agreement.
    let judged_shadow = run.audit().iter().any(|r| {
        r["record"] == "evaluation"
            && r["phase"]["phase"] == "shadow"
            && r["detail"]["verdicts"].as_array().is_some_and(|v| {
                v.iter().any(|g| {
                    g["guardrail"]
                        .as_str()
                        .is_some_and(|n| n.starts_with("shadow"))
                        && g["label"] == "pass"
                })
            })
    });
    assert!(
        judged_shadow,
        "no passing shadow verdict in the audit log\n{}",
        run.log()
    );
    Ok(())
}
