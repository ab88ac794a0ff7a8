//! `sluice run` end to end against a real Envoy: a good treatment is promoted through a
//! compressed schedule, a bad one is rolled back and Envoy stops routing to it, a rejected
//! push holds, and `kill -9` mid-rollout followed by a restart resumes without raising a
//! weight on old evidence; a crash between a raise and its confirmation, or a file edited
//! behind the daemon's back, ends with Envoy serving the state's weight again; a rollout that
//! stops on an error, or whose state is refused, makes `sluice run` exit non-zero; operator
//! commands need the token.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sluice_tests::{
    filter_wasm, free_port, sluice_bin, wait_until, Envoy, EnvoyConfig, HttpClient, Reply, Request,
    Traffic, Upstream,
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
        self.start_with(None)
    }

    /// `sluice run`, with at most `max_files` file descriptors if given.
    fn start_with(&self, max_files: Option<u32>) -> anyhow::Result<Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("sluice.log"))?;
        let mut command = match max_files {
            Some(n) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg(format!("ulimit -n {n} && exec \"$0\" \"$@\""))
                    .arg(sluice_bin()?);
                c
            }
            None => Command::new(sluice_bin()?),
        };
        Ok(command
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

    fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// Runs `sluice <args> --endpoint <this daemon>` and returns its stdout. Operator commands
    /// are given the daemon's state directory, where they find its token.
    fn cli(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut command = Command::new(sluice_bin()?);
        command
            .args(args)
            .arg("--endpoint")
            .arg(format!("http://127.0.0.1:{}", self.listen));
        if args
            .first()
            .is_some_and(|a| ["pause", "resume", "promote", "abort"].contains(a))
        {
            command.arg("--state-dir").arg(self.state_dir());
        }
        let out = command.output()?;
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
    // No request reaches the canary any more: not one of the next 500 answered.
    let before = canary.count();
    let sent = traffic.answered();
    wait_until(
        Duration::from_secs(60),
        "500 more requests answered",
        || async { traffic.answered() >= sent + 500 },
    )
    .await?;
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
    wait_until(
        Duration::from_secs(30),
        "the restarted daemon answers",
        || async { run.status().await.is_some() },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", run.log()))?;
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
    wait_until(
        Duration::from_secs(60),
        "1,000 requests through the restarted Envoy",
        || async { upstreams() >= total_before + 1000 },
    )
    .await?;
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
    // Held past the bake's end (1 s warm-up and 4 s bake from the stage's start, then one more
    // 500 ms look): no advance without fresh evidence.
    let since = run.state()["since"]
        .as_f64()
        .ok_or_else(|| anyhow::anyhow!("no stage start in the state\n{}", run.log()))?;
    wait_until(
        Duration::from_secs(30),
        "an evaluation past the bake's end",
        || async {
            run.status().await.is_some_and(|s| {
                s[0]["last_evaluated_at"]
                    .as_f64()
                    .is_some_and(|t| t >= since + 5.5)
            })
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", run.log()))?;
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

/// A TCP relay to Envoy's admin endpoint that, once given a text, stalls every answer holding
/// it (e.g. `version_text: "2"`): the connection stays open, nothing more comes back. So
/// Envoy loads a pushed version, and its admin stops answering just when it would say so.
struct Gate {
    port: u16,
    stall: tokio::sync::watch::Sender<Option<String>>,
    task: tokio::task::JoinHandle<()>,
}

impl Gate {
    async fn to(target: std::net::SocketAddr) -> anyhow::Result<Gate> {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let (stall, watch) = tokio::sync::watch::channel(None::<String>);
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let stalling = watch.clone();
                tokio::spawn(async move {
                    let Ok(outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    let (mut from_client, mut to_client) = inbound.into_split();
                    let (mut from_envoy, mut to_envoy) = outbound.into_split();
                    let forth = tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut from_client, &mut to_envoy).await;
                    });
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match from_envoy.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let needle = stalling.borrow().clone();
                        if let Some(needle) = needle {
                            let needle = needle.as_bytes();
                            if buf[..n].windows(needle.len()).any(|w| w == needle) {
                                std::future::pending::<()>().await;
                            }
                        }
                        if to_client.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    forth.abort();
                });
            }
        });
        Ok(Gate { port, stall, task })
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn stall(&self, text: Option<String>) {
        self.stall.send_replace(text);
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The filter configuration version Envoy has in force (ECDS `version_text`).
async fn in_force(envoy: &Envoy) -> Option<String> {
    let url = format!(
        "http://{}/stats?filter=http_filter%5C.sluice%5C.version_text",
        envoy.addr(ADMIN)
    );
    let text = HttpClient::new().get(&url).await.ok()?.text();
    text.lines().find_map(|l| {
        let (name, v) = l.rsplit_once(": ")?;
        name.ends_with("http_filter.sluice.version_text")
            .then(|| v.trim().trim_matches('"').to_string())
    })
}

/// The share of 400 new users Envoy sends to the canary now.
async fn canary_share(envoy: &Envoy, tag: &str) -> anyhow::Result<f64> {
    let tag = tag.to_string();
    let responses = sluice_tests::Load::new(envoy.url(LISTENER, "/predict"))
        .users(move |i| format!("probe-{tag}-{i}"))
        .requests(400)
        .run()
        .await?;
    let canary = responses
        .iter()
        .filter(|r| r.header("x-sluice-variant") == Some("canary"))
        .count();
    Ok(canary as f64 / responses.len().max(1) as f64)
}

#[tokio::test]
async fn a_crash_between_a_raise_and_its_confirmation_is_converged_on_restart() -> anyhow::Result<()>
{
    let (_stable, _canary, envoy) = stack(0).await?;
    let gate = Gate::to(envoy.addr(ADMIN)).await?;
    let run = Run::with(&envoy, json!([25, 50, 100]), &wasm()?, |spec| {
        let sink = &mut spec["spec"]["sinks"][0]["ecdsFile"];
        sink["proxies"] = json!([gate.url()]);
        sink["confirmWithin"] = json!("30s");
        Ok(())
    })?;
    let traffic = Traffic::start(envoy.url(LISTENER, "/predict"));
    let mut child = run.start()?;
    let with_log = |e: sluice_tests::Error| anyhow::anyhow!("{e}\n{}", run.log());
    wait_until(Duration::from_secs(60), "25 % confirmed", || async {
        let s = run.state();
        s["weight"] == 25.0 && s["pending"].is_null()
    })
    .await
    .map_err(with_log)?;
    // From now on the next version cannot be confirmed: the raise to 50 % is decided and
    // written, Envoy loads it, and its admin stops answering when asked which version it runs.
    let next = run.state()["version"].as_u64().unwrap_or(0) + 1;
    gate.stall(Some(format!("version_text: \"{next}\"")));
    wait_until(
        Duration::from_secs(60),
        "Envoy serves the unconfirmed raise",
        || async {
            let s = run.state();
            let pending = s["pending"]["version"].as_u64().map(|v| v.to_string());
            s["pending"]["weight"] == 50.0 && pending.is_some() && in_force(&envoy).await == pending
        },
    )
    .await
    .map_err(with_log)?;
    child.kill()?; // SIGKILL between the write and its confirmation
    let _ = child.wait();
    gate.stall(None);
    assert_eq!(run.state()["weight"], 25.0);
    let share = canary_share(&envoy, "crashed").await?;
    assert!(share > 0.4, "Envoy should serve 50 % now: {share}");

    let restarted = unix_now();
    let mut child = run.start()?;
    wait_until(
        Duration::from_secs(30),
        "Envoy serves the state's confirmed version",
        || async {
            let s = run.state();
            let version = s["version"].as_u64().map(|v| v.to_string());
            s["weight"] == 25.0 && s["pending"].is_null() && in_force(&envoy).await == version
        },
    )
    .await
    .map_err(with_log)?;
    let share = canary_share(&envoy, "converged").await?;
    assert!(
        (0.15..0.35).contains(&share),
        "the state says 25 %, Envoy sends {share} to the canary"
    );
    let table = run.cli(&["status"])?;
    assert!(table.contains("25.00%"), "{table}");
    // The rollout goes on by itself: no sample-ratio halt, nobody has to step in.
    exited(&mut child, PROMOTED, Duration::from_secs(120), &run).await?;
    traffic.stop().await;
    assert_eq!(pushed_weights(&run), vec![25.0, 25.0, 50.0, 100.0]);
    let halted = run.audit().into_iter().find(|r| {
        r["record"] == "evaluation"
            && r["at"].as_f64() >= Some(restarted)
            && r["judgement"]["kind"] == "halt"
    });
    assert!(halted.is_none(), "{halted:?}");
    // No evaluation of the restarted process dates its stage from before it started.
    let early = run.audit().into_iter().find(|r| {
        r["record"] == "evaluation"
            && r["at"].as_f64() >= Some(restarted)
            && r["detail"]["stage_started_at"].as_f64() < Some(restarted)
    });
    assert!(early.is_none(), "{early:?}");
    // Run again on the finished state: it says so and exits at once.
    let mut again = run.start()?;
    exited(&mut again, PROMOTED, Duration::from_secs(20), &run).await?;
    assert!(
        run.log().contains("r: already promoted at 100 %"),
        "{}",
        run.log()
    );
    Ok(())
}

#[tokio::test]
async fn an_ecds_file_edited_behind_the_daemon_is_pushed_again() -> anyhow::Result<()> {
    let (_stable, _canary, envoy) = stack(0).await?;
    // A bake long enough for the rollout to stay at 25 % throughout.
    let run = Run::with(&envoy, json!([25, 100]), &wasm()?, |spec| {
        spec["spec"]["schedule"]["bake"] = json!("120s");
        Ok(())
    })?;
    let traffic = Traffic::start(envoy.url(LISTENER, "/predict"));
    let mut child = run.start()?;
    let with_log = |e: sluice_tests::Error| anyhow::anyhow!("{e}\n{}", run.log());
    wait_until(Duration::from_secs(60), "25 % confirmed", || async {
        let s = run.state();
        s["weight"] == 25.0 && s["pending"].is_null()
    })
    .await
    .map_err(with_log)?;
    let version = run.state()["version"].as_u64().unwrap_or(0);
    // Someone writes the watched file by hand: everyone to the canary, as version 999.
    let path = envoy.ecds_file("sluice.yaml")?;
    let mut doc: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    let value = &mut doc["resources"][0]["typed_config"]["config"]["configuration"]["value"];
    let mut config: Value = serde_json::from_str(value.as_str().unwrap_or("{}"))?;
    config["experiments"][0]["variants"][1]["weight"] = json!(100.0);
    *value = json!(config.to_string());
    doc["version_info"] = json!("999");
    let tmp = path.with_file_name(".edited.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(&doc)?)?;
    std::fs::rename(&tmp, &path)?;
    wait_until(
        Duration::from_secs(30),
        "the state's weight pushed again",
        || async {
            let s = run.state();
            let now = s["version"].as_u64().unwrap_or(0);
            now > version
                && s["pending"].is_null()
                && in_force(&envoy).await == Some(now.to_string())
        },
    )
    .await
    .map_err(with_log)?;
    let share = canary_share(&envoy, "re-pushed").await?;
    assert!((0.15..0.35).contains(&share), "canary share {share}");
    let diverged = run
        .audit()
        .into_iter()
        .find(|r| r["record"] == "decision" && r["kind"] == "diverged");
    assert!(
        diverged
            .as_ref()
            .is_some_and(|d| d["message"].as_str().is_some_and(|m| m.contains("999"))),
        "{diverged:?}\n{}",
        run.log()
    );
    assert_eq!(run.state()["weight"], 25.0);
    let _ = child.kill();
    let _ = child.wait();
    traffic.stop().await;
    Ok(())
}

/// `sluice run --exit-when-done` exit status when a rollout stopped on an error.
const STOPPED_ON_ERROR: i32 = 1;

#[tokio::test]
async fn a_rollout_that_cannot_write_its_audit_log_makes_run_exit_non_zero() -> anyhow::Result<()> {
    let (_stable, _canary, envoy) = stack(0).await?;
    let run = Run::new(&envoy, json!([25, 100]), &wasm()?)?;
    let traffic = Traffic::start(envoy.url(LISTENER, "/predict"));
    let mut child = run.start()?;
    wait_until(Duration::from_secs(60), "25 % confirmed", || async {
        run.state()["weight"] == 25.0
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", run.log()))?;
    // The daemon appends at every evaluation and creates the file if it is gone: retry until
    // the directory takes its place.
    let audit = run.state_dir().join("r.audit.jsonl");
    for _ in 0..100 {
        let _ = std::fs::remove_file(&audit);
        if std::fs::create_dir(&audit).is_ok() {
            break;
        }
    }
    anyhow::ensure!(
        audit.is_dir(),
        "could not replace the audit log by a directory"
    );
    exited(&mut child, STOPPED_ON_ERROR, Duration::from_secs(30), &run).await?;
    traffic.stop().await;
    let log = run.log();
    let stopped = log
        .lines()
        .find(|l| l.contains("ERROR") && l.contains("rollout stopped"))
        .unwrap_or_default();
    assert!(
        stopped.contains("r.audit.jsonl: Is a directory"),
        "no cause logged when the rollout stopped:\n{log}"
    );
    assert!(
        log.contains("error: rollout r: ") && log.contains("r.audit.jsonl: Is a directory"),
        "no cause at exit:\n{log}"
    );
    // What was persisted is a state the next run accepts.
    assert_eq!(run.state()["phase"]["phase"], "canary", "{log}");
    assert_eq!(run.state()["weight"], 25.0, "{log}");
    Ok(())
}

/// Open file descriptors of process `pid`.
fn descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

#[tokio::test]
async fn idle_connections_cannot_exhaust_the_daemons_descriptors() -> anyhow::Result<()> {
    let (_stable, _canary, envoy) = stack(0).await?;
    let run = Run::new(&envoy, json!([25, 100]), &wasm()?)?;
    let traffic = Traffic::start(envoy.url(LISTENER, "/predict"));
    // 128 descriptors: a few hundred idle connections would use them all up.
    const LIMIT: usize = 128;
    let mut child = run.start_with(Some(LIMIT as u32))?;
    let pid = child.id();
    wait_until(Duration::from_secs(30), "the endpoint", || async {
        run.status().await.is_some()
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", run.log()))?;
    let mut idle = Vec::new();
    for _ in 0..300 {
        if let Ok(s) = std::net::TcpStream::connect(("127.0.0.1", run.listen)) {
            idle.push(s);
        }
    }
    let mut most = 0;
    let start = Instant::now();
    let answered = loop {
        most = most.max(descriptors(pid));
        if run.status().await.is_some() {
            break Some(start.elapsed());
        }
        if start.elapsed() > Duration::from_secs(20) {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        answered.is_some(),
        "/status did not answer with {} idle connections open\n{}",
        idle.len(),
        run.log()
    );
    exited(&mut child, PROMOTED, Duration::from_secs(120), &run).await?;
    drop(idle);
    traffic.stop().await;
    eprintln!(
        "{} idle connections: at most {most} descriptors open, /status answered after {answered:?}",
        300
    );
    assert!(most < LIMIT, "{most} descriptors open");
    assert_eq!(run.state()["phase"]["phase"], "promoted");
    Ok(())
}

#[tokio::test]
async fn a_corrupt_state_is_refused_with_its_field_while_the_other_rollout_runs(
) -> anyhow::Result<()> {
    let stable = Upstream::start("stable", model(0)).await?;
    let canary = Upstream::start("canary", model(0)).await?;
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
        sink["path"] = json!(envoy
            .ecds_file(&format!("sluice-{x}.yaml"))?
            .display()
            .to_string());
        sink["resource"] = json!(format!("sluice-{x}"));
        Ok(())
    };
    let mut run = Run::with(&envoy, json!([20, 100]), &wasm()?, |s| rollout("a", s))?;
    let mut b = run.base.clone();
    rollout("b", &mut b)?;
    run.also(&b)?;
    // b's state: valid JSON, impossible values.
    let state = |phase: Value, weight: f64| {
        json!({"name": "b", "phase": phase, "weight": weight, "pending": null, "version": 1,
               "since": 1.0, "paused": false, "hold": null, "restarted_at": null})
    };
    std::fs::create_dir_all(run.state_dir())?;
    let b_state = run.state_dir().join("b.state.json");
    std::fs::write(
        &b_state,
        state(json!({"phase": "canary", "index": 0}), 100.0).to_string(),
    )?;
    let traffic = Traffic::start(envoy.url(LISTENER, "/a/predict"));
    let mut child = run.start()?;
    wait_until(
        Duration::from_secs(30),
        "b's refusal in /status",
        || async {
            run.status().await.is_some_and(|s| {
                s.as_array().is_some_and(|all| {
                    all.iter().any(|r| {
                        r["name"] == "b"
                            && r["error"].as_str().is_some_and(|e| {
                                e.contains("b.state.json: weight: 100 % at stage 1")
                            })
                    })
                })
            })
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", run.log()))?;
    exited(&mut child, STOPPED_ON_ERROR, Duration::from_secs(120), &run).await?;
    traffic.stop().await;
    assert_eq!(
        run.state_of("a")["phase"]["phase"],
        "promoted",
        "{}",
        run.log()
    );
    // The refused file is left as it was, for a human to look at.
    assert_eq!(run.state_of("b")["weight"], 100.0);
    // Other impossible states, each refused naming its field.
    for (bad, field) in [
        (
            state(json!({"phase": "canary", "index": 98}), 20.0),
            "phase.index: stage 99 does not exist",
        ),
        (
            state(json!({"phase": "canary", "index": 0}), -50.0),
            "weight: -50 is not a weight",
        ),
    ] {
        std::fs::write(&b_state, bad.to_string())?;
        let mut child = run.start()?;
        exited(&mut child, STOPPED_ON_ERROR, Duration::from_secs(30), &run).await?;
        assert!(run.log().contains(field), "{field}\n{}", run.log());
    }
    Ok(())
}

/// Sends `POST /rollouts/r/<action>` with `headers`; the status code.
async fn post(run: &Run, action: &str, headers: &[(&str, &str)]) -> anyhow::Result<u16> {
    let url = format!("http://127.0.0.1:{}/rollouts/r/{action}", run.listen);
    let r = HttpClient::new()
        .send(hyper::Method::POST, &url, headers, Vec::<u8>::new())
        .await?;
    Ok(r.status)
}

#[tokio::test]
async fn operator_commands_need_the_token_and_web_pages_cannot_send_them() -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let (_stable, _canary, envoy) = stack(0).await?;
    let run = Run::new(&envoy, json!([25, 100]), &wasm()?)?;
    let mut child = run.start()?;
    wait_until(Duration::from_secs(30), "the endpoint", || async {
        run.status().await.is_some()
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", run.log()))?;
    let token_file = run.state_dir().join("api-token");
    let mode = std::fs::metadata(&token_file)?.permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "token file mode {mode:o}");
    let token = std::fs::read_to_string(&token_file)?.trim().to_string();
    let bearer = format!("Bearer {token}");
    let auth = ("authorization", bearer.as_str());
    // No token, a wrong one, a cross-site form post, a rebound host name: all refused.
    assert_eq!(post(&run, "abort", &[]).await?, 401);
    assert_eq!(
        post(
            &run,
            "abort",
            &[("authorization", "Bearer 0123456789abcdef0123")]
        )
        .await?,
        401
    );
    assert_eq!(
        post(&run, "pause", &[("origin", "http://evil.example"), auth]).await?,
        403
    );
    assert_eq!(
        post(&run, "pause", &[("host", "evil.example"), auth]).await?,
        403
    );
    let s = run.status().await.unwrap_or_default();
    assert_eq!(s[0]["state"]["paused"], false);
    assert_ne!(s[0]["state"]["phase"]["phase"], "rolled_back");
    // The CLI finds the token in the state directory.
    let said = run.cli(&["pause", "r"])?;
    assert!(said.contains("pause: applied"), "{said}");
    run.cli(&["promote", "r"])?;
    let promoted = run
        .audit()
        .into_iter()
        .any(|r| r["record"] == "decision" && r["kind"] == "bake_ended");
    assert!(promoted, "promote is not in the audit log");
    let _ = child.kill();
    let _ = child.wait();

    // Listening beyond loopback needs a token given on purpose.
    let port = free_port()?;
    let listen = format!("0.0.0.0:{port}");
    let daemon = |token: Option<&str>| -> anyhow::Result<Command> {
        let mut c = Command::new(sluice_bin()?);
        c.args(["run", "--quiet", "--listen", &listen, "--state-dir"])
            .arg(run.state_dir())
            .arg("-f")
            .arg(&run.specs[0])
            .env_remove("SLUICE_TOKEN")
            .stdin(Stdio::null());
        if let Some(t) = token {
            c.env("SLUICE_TOKEN", t);
        }
        Ok(c)
    };
    let refused = daemon(None)?.output()?;
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    assert!(stderr.contains("reachable from other machines"), "{stderr}");
    let given = "a-token-given-on-purpose-1234";
    let mut child = daemon(Some(given))?
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let url = format!("http://127.0.0.1:{port}");
    let answered = wait_until(Duration::from_secs(30), "the endpoint", || async {
        HttpClient::new()
            .get(&format!("{url}/status"))
            .await
            .is_ok()
    })
    .await;
    let out = Command::new(sluice_bin()?)
        .args(["resume", "r", "--endpoint", &url])
        .env("SLUICE_TOKEN", given)
        .output()?;
    let _ = child.kill();
    let _ = child.wait();
    answered?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[test]
fn render_needs_a_stage_or_a_weight_and_says_what_the_push_adds() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let spec = dir.path().join("r.yaml");
    std::fs::write(
        &spec,
        r#"
apiVersion: sluice.dev/v1alpha1
kind: Rollout
metadata: {name: r}
spec:
  experiment:
    name: r
    unit: {type: user, keys: [{header: x-user-id}]}
    variants: [{name: stable, control: true}, {name: canary, weight: 0}]
  schedule: {stages: [10, 100]}
  sources: [{envoyAdmin: {endpoints: ["http://127.0.0.1:9901"]}}]
  sinks: [{ecdsFile: {path: /tmp/x/sluice.yaml, wasm: {filename: x.wasm}, proxies: ["http://127.0.0.1:9901"]}}]
"#,
    )?;
    let bin = sluice_bin()?;
    let render = |args: &[&str]| {
        Command::new(&bin)
            .arg("render")
            .arg("-f")
            .arg(&spec)
            .args(args)
            .output()
    };
    let none = render(&[])?;
    assert!(!none.status.success());
    let err = String::from_utf8_lossy(&none.stderr);
    assert!(err.contains("give --stage N (1 to 2) or --weight"), "{err}");
    let stage = render(&["--stage", "1"])?;
    assert!(stage.status.success());
    let config: Value = serde_json::from_slice(&stage.stdout)?;
    assert_eq!(config["experiments"][0]["variants"][1]["weight"], 10.0);
    let note = String::from_utf8_lossy(&stage.stderr);
    assert!(note.contains("\"revision\""), "{note}");
    Ok(())
}
