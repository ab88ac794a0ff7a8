//! A fleet of real Envoys (`envoy/fleet/envoy.yaml`), each with its own node id and ports, taking
//! the Sluice filter's configuration from the controller's ECDS gRPC server, in front of real
//! upstreams: the shipped files are valid and agree with each other; an Envoy without a
//! controller serves the control; rollouts promote and roll back on every proxy; proxies that
//! restart or join get the current weight; a NACK holds the rollout naming the proxy (and a
//! rejected rollback is pushed again) until that proxy leaves; duplicate node ids count once;
//! and the controller can die and come back without the fleet noticing. Simulated proxies
//! (`sluice_tests::xds`) join the real Envoys where a test needs one that misbehaves on cue.

use sluice_filter::metrics;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use sluice_filter::config::Plan;
use sluice_tests::xds::{accept_decodable, Received, Verdict};
use sluice_tests::{
    filter_wasm, free_port, sluice_bin, validate, wait_for, wait_until, Envoy, Identity, Load,
    Reply, Request, SluiceRun, Traffic, Upstream, XdsClient,
};

use sluice_tests::fleet::{ADMIN, BOOTSTRAP, LISTENER};

/// A model answering 200 with its name.
fn model(name: &'static str) -> impl Fn(&Request) -> Reply + Send + Sync {
    move |_req: &Request| {
        Reply::json(serde_json::json!({"model": name, "score": 0.5})).header("x-model-score", "0.5")
    }
}

/// One Envoy of the fleet: node `id`, the controller at `127.0.0.1:<xds>`.
async fn fleet_envoy(
    id: &str,
    xds: u16,
    stable: &Upstream,
    canary: &Upstream,
) -> anyhow::Result<Envoy> {
    fleet_envoy_with(id, xds, stable, canary, false).await
}

/// The bootstrap's setting that lets Envoy serve with the default config before the
/// controller answered.
const WITHOUT_WARMING: &str = "apply_default_config_without_warming: true";

/// [`fleet_envoy`], with `warming`: the shipped bootstrap with `WITHOUT_WARMING` turned off,
/// so Envoy waits for the controller's first answer (or `initial_fetch_timeout`) before
/// serving.
async fn fleet_envoy_with(
    id: &str,
    xds: u16,
    stable: &Upstream,
    canary: &Upstream,
    warming: bool,
) -> anyhow::Result<Envoy> {
    let mut config = sluice_tests::fleet::envoy(id, xds, stable, canary);
    if warming {
        config = config.replace(
            WITHOUT_WARMING,
            "apply_default_config_without_warming: false",
        );
    }
    Ok(config.start().await?)
}

/// Sends one request from each of `users` fresh users through `envoy`; returns how many were
/// answered by (stable, canary), checked three ways: the variant header, the body, and that
/// every request was answered 200.
async fn split(envoy: &Envoy, tag: &str, users: usize) -> anyhow::Result<(usize, usize)> {
    let tag = tag.to_string();
    let responses = Load::new(envoy.url(LISTENER, "/predict"))
        .users(move |i| format!("{tag}-{i}"))
        .requests(users)
        .run()
        .await?;
    let mut counts = (0, 0);
    for r in &responses {
        anyhow::ensure!(
            r.status == 200,
            "status {} from {:?}",
            r.status,
            envoy.node_id()
        );
        let body = r.json()?;
        match (r.header("x-sluice-variant"), body["model"].as_str()) {
            (Some("stable"), Some("stable")) => counts.0 += 1,
            (Some("canary"), Some("canary")) => counts.1 += 1,
            other => anyhow::bail!("variant header and model disagree: {other:?}"),
        }
    }
    Ok(counts)
}

#[test]
fn the_fleet_files_are_valid_envoy_configs() -> anyhow::Result<()> {
    validate(BOOTSTRAP)?;
    validate("envoy/fleet/models.yaml")?;
    Ok(())
}

/// The text of a shipped file.
fn shipped(path: &str) -> anyhow::Result<String> {
    Ok(std::fs::read_to_string(
        sluice_tests::repo_root().join(path),
    )?)
}

/// The part of a bootstrap from `stats_config:` up to `static_resources:`.
fn stats_config(yaml: &str) -> Option<&str> {
    let start = yaml.find("\nstats_config:")?;
    let end = yaml[start..].find("\nstatic_resources:")?;
    Some(&yaml[start..start + end])
}

#[test]
fn the_fleet_bootstrap_tags_and_buckets_stats_like_the_other_examples() -> anyhow::Result<()> {
    let fleet = shipped(BOOTSTRAP)?;
    let single = shipped("envoy/ecds.yaml")?;
    assert!(stats_config(&fleet).is_some());
    assert_eq!(stats_config(&fleet), stats_config(&single));
    Ok(())
}

#[test]
fn the_default_config_is_the_rollouts_experiment_at_zero() -> anyhow::Result<()> {
    let spec = sluice_tests::repo_root().join("envoy/fleet/rollout.yaml");
    let validate = Command::new(sluice_bin()?)
        .arg("validate")
        .arg("-f")
        .arg(&spec)
        .output()?;
    assert!(
        validate.status.success(),
        "{}",
        String::from_utf8_lossy(&validate.stderr)
    );
    let render = Command::new(sluice_bin()?)
        .args(["render", "--weight", "0", "-f"])
        .arg(&spec)
        .output()?;
    assert!(
        render.status.success(),
        "{}",
        String::from_utf8_lossy(&render.stderr)
    );
    // Compared as the filter sees them (defaults filled in, checked), except for the secret the
    // daemon adds to every push (for beacon tokens and shadow markers, which the control-only
    // default config has no use for).
    let rendered = Plan::from_json(&render.stdout)?;
    let default = Plan::from_json(sluice_tests::inline_filter_config(BOOTSTRAP)?.as_bytes())?;
    assert!(rendered.secret.is_some());
    assert_eq!(default.secret, None);
    assert_eq!(default.revision, None);
    assert_eq!(default.experiments, rendered.experiments);
    Ok(())
}

#[tokio::test]
async fn an_envoy_started_while_the_controller_is_down_serves_the_control() -> anyhow::Result<()> {
    let stable = Upstream::start("stable", model("stable")).await?;
    let canary = Upstream::start("canary", model("canary")).await?;
    // Nothing listens on the controller's port. The shipped bootstrap serves at once; with
    // warming, Envoy first waits out `initial_fetch_timeout`, then serves the same way.
    for warming in [false, true] {
        let envoy = fleet_envoy_with("edge-1", free_port()?, &stable, &canary, warming).await?;
        assert_eq!(
            split(&envoy, "down", 300).await?,
            (300, 0),
            "warming: {warming}"
        );
        // It is the default config doing this (the filter counted the requests under the
        // experiment), not a filter left out; and no config was ever received.
        let prom = envoy.admin().prometheus().await?;
        let counted = prom.sum(metrics::REQUESTS, &[("experiment", "fleet")]);
        assert!(counted >= 300.0, "the filter counted {counted} requests");
        assert_eq!(updates(&envoy).await, 0, "{}", envoy.log_tail(20));
    }
    assert_eq!(canary.count(), 0);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// With the controller: `sluice run` serving the filter's configuration over gRPC.

/// Promotion on absence of breaches with little data; a 25 % error rate is still a breach
/// within seconds. Latency only against a loose SLO: the tests share 2 cores with others.
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

/// A model failing every `error_every`-th user (0: never).
fn flaky(name: &'static str, error_every: u64) -> impl Fn(&Request) -> Reply + Send + Sync {
    move |req: &Request| {
        let i: u64 = req
            .user()
            .and_then(|u| u.rsplit('-').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(1);
        if error_every > 0 && i.is_multiple_of(error_every) {
            return Reply::status(500);
        }
        Reply::json(json!({"model": name, "score": 0.5})).header("x-model-score", "0.5")
    }
}

/// The controller (`sluice run --exit-when-done`) of a fleet, with its ECDS server's port.
struct Controller {
    run: SluiceRun,
    /// Its ECDS server.
    xds: u16,
}

impl std::ops::Deref for Controller {
    type Target = SluiceRun;
    fn deref(&self) -> &SluiceRun {
        &self.run
    }
}

impl std::ops::DerefMut for Controller {
    fn deref_mut(&mut self) -> &mut SluiceRun {
        &mut self.run
    }
}

impl Controller {
    /// A rollout over the Envoys whose admin addresses are `admins` (which may not run yet),
    /// with the ecdsGrpc sink on a fresh port, changed by `tweak`.
    fn new(
        admins: &[String],
        xds: u16,
        stages: Value,
        min_proxies: usize,
        tweak: impl FnOnce(&mut Value),
    ) -> anyhow::Result<Controller> {
        let mut spec = json!({
            "apiVersion": "sluice.dev/v1alpha1",
            "kind": "Rollout",
            "metadata": {"name": "fleet"},
            "spec": {
                "experiment": {
                    "name": "fleet",
                    "unit": {"type": "user", "keys": [{"header": "x-user-id"}]},
                    "variants": [{"name": "stable", "control": true}, {"name": "canary", "weight": 0}],
                    "echo": {"header": "x-sluice-variant"},
                },
                "schedule": {"stages": stages, "bake": "4s", "warmup": "1s", "interval": "500ms"},
                "guardrails": guardrails(),
                "sources": [{"envoyAdmin": {"endpoints": admins}}],
                "sinks": [{"ecdsGrpc": {
                    "listen": format!("127.0.0.1:{xds}"),
                    "resource": "sluice",
                    "wasm": {"filename": filter_wasm()?.display().to_string()},
                    "minProxies": min_proxies,
                    "confirmWithin": "5s",
                }}],
            }
        });
        tweak(&mut spec);
        Ok(Controller {
            run: SluiceRun::new(&spec)?,
            xds,
        })
    }

    fn start(&mut self) -> anyhow::Result<()> {
        Ok(self.run.start(&["--exit-when-done"])?)
    }
}

/// A fleet: the two models and `n` Envoys (`edge-0`, `edge-1`, ...) pointed at `xds`.
async fn fleet(
    n: usize,
    xds: u16,
    canary_error_every: u64,
) -> anyhow::Result<(Upstream, Upstream, Vec<Envoy>)> {
    let stable = Upstream::start("stable", flaky("stable", 0)).await?;
    let canary = Upstream::start("canary", flaky("canary", canary_error_every)).await?;
    let mut envoys = Vec::new();
    for i in 0..n {
        envoys.push(fleet_envoy(&format!("edge-{i}"), xds, &stable, &canary).await?);
    }
    Ok((stable, canary, envoys))
}

/// The admin endpoints of `envoys`.
fn admins(envoys: &[Envoy]) -> Vec<String> {
    envoys
        .iter()
        .map(|e| format!("http://{}", e.addr(ADMIN)))
        .collect()
}

fn urls(envoys: &[Envoy]) -> Vec<String> {
    envoys.iter().map(|e| e.url(LISTENER, "/predict")).collect()
}

/// `--exit-when-done`: all promoted.
const PROMOTED: i32 = 0;
/// `--exit-when-done`: rolled back.
const ROLLED_BACK: i32 = 3;

/// A fleet of `n` Envoys and its (not yet started) controller over all of them, which must see
/// `n` proxies connected. The Envoys start first, pointed at the port the controller will
/// listen on: the controller's source needs their admin ports.
async fn fleet_with_controller(
    n: usize,
    canary_error_every: u64,
    stages: Value,
    tweak: impl FnOnce(&mut Value),
) -> anyhow::Result<(Upstream, Upstream, Vec<Envoy>, Controller)> {
    let xds = free_port()?;
    let (stable, canary, envoys) = fleet(n, xds, canary_error_every).await?;
    let controller = Controller::new(&admins(&envoys), xds, stages, n, tweak)?;
    Ok((stable, canary, envoys, controller))
}

#[tokio::test]
async fn a_good_canary_is_promoted_on_all_three_envoys() -> anyhow::Result<()> {
    let (_stable, canary, envoys, mut controller) =
        fleet_with_controller(3, 0, json!([10, 50, 100]), |_| {}).await?;
    let traffic = Traffic::spread(urls(&envoys), 24, 4000);
    controller.start()?;
    controller
        .exited(PROMOTED, Duration::from_secs(150))
        .await?;
    traffic.stop().await;
    assert_eq!(controller.state()["phase"]["phase"], "promoted");
    assert_eq!(controller.pushed_weights(), vec![10.0, 50.0, 100.0]);
    // The data plane agrees: every Envoy's filter runs the last pushed version.
    let audit = controller.audit();
    let last = audit
        .iter()
        .rfind(|r| r["record"] == "push")
        .ok_or_else(|| anyhow::anyhow!("no push in the audit log"))?;
    eprintln!("last push: {last}");
    for envoy in &envoys {
        let prom = envoy.admin().prometheus().await?;
        assert_eq!(
            prom.get(metrics::CONFIG_REVISION, &[("experiment", "fleet")]),
            last["version"].as_f64(),
            "{:?}",
            envoy.node_id()
        );
    }
    // Every Envoy now sends everyone to the canary, and the canary answers.
    for (i, envoy) in envoys.iter().enumerate() {
        let before = canary.count();
        assert_eq!(split(envoy, &format!("after-{i}"), 200).await?, (0, 200));
        assert_eq!(canary.count() - before, 200, "edge-{i}");
    }
    Ok(())
}

#[tokio::test]
async fn a_bad_canary_is_rolled_back_on_all_three_envoys() -> anyhow::Result<()> {
    // 25 % of the canary's users get errors.
    let (_stable, canary, envoys, mut controller) =
        fleet_with_controller(3, 4, json!([10, 50, 100]), |_| {}).await?;
    let traffic = Traffic::spread(urls(&envoys), 24, 4000);
    controller.start()?;
    controller
        .exited(ROLLED_BACK, Duration::from_secs(150))
        .await?;
    traffic.stop().await;
    let state = controller.state();
    assert_eq!(
        state["phase"]["phase"],
        "rolled_back",
        "{}",
        controller.log()
    );
    assert_eq!(controller.pushed_weights().last(), Some(&0.0));
    // No Envoy routes anyone to the canary any more.
    let before = canary.count();
    for (i, envoy) in envoys.iter().enumerate() {
        assert_eq!(
            split(envoy, &format!("after-{i}"), 300).await?,
            (300, 0),
            "edge-{i}"
        );
    }
    assert_eq!(canary.count(), before);
    Ok(())
}

/// Which of `users` fresh users (`<tag>-<i>`) `envoy` sends to the canary, user by user.
async fn assignment(envoy: &Envoy, tag: &str, users: usize) -> anyhow::Result<Vec<bool>> {
    let tag = tag.to_string();
    let responses = Load::new(envoy.url(LISTENER, "/predict"))
        .users(move |i| format!("{tag}-{i}"))
        .requests(users)
        .concurrency(1) // in user order
        .run()
        .await?;
    responses
        .iter()
        .map(|r| match r.header("x-sluice-variant") {
            Some("canary") => Ok(true),
            Some("stable") => Ok(false),
            other => Err(anyhow::anyhow!(
                "{:?} answered {} with variant {other:?}",
                envoy.node_id(),
                r.status
            )),
        })
        .collect()
}

fn share(assigned: &[bool]) -> f64 {
    assigned.iter().filter(|c| **c).count() as f64 / assigned.len().max(1) as f64
}

/// How many filter configurations `envoy` accepted from the controller.
async fn updates(envoy: &Envoy) -> u64 {
    match envoy.admin().stats().await {
        Ok(stats) => stats
            .get("extension_config_discovery.http_filter.sluice.update_success")
            .unwrap_or(0),
        Err(_) => 0,
    }
}

#[tokio::test]
async fn an_envoy_restarted_mid_stage_and_one_joining_serve_the_current_weight(
) -> anyhow::Result<()> {
    // A stage that lasts: the rollout sits at 30 % for the whole test. edge-0 runs the shipped
    // bootstrap (serves at once, with the default config until the controller answers);
    // edge-1 the same with warming (waits for the controller's answer before serving).
    let xds = free_port()?;
    let stable = Upstream::start("stable", model("stable")).await?;
    let canary = Upstream::start("canary", model("canary")).await?;
    let mut envoys = vec![
        fleet_envoy_with("edge-0", xds, &stable, &canary, false).await?,
        fleet_envoy_with("edge-1", xds, &stable, &canary, true).await?,
    ];
    let mut controller = Controller::new(&admins(&envoys), xds, json!([30, 100]), 2, |spec| {
        spec["spec"]["schedule"]["bake"] = json!("10m");
    })?;
    controller.start()?;
    controller.at_weight(30.0, Duration::from_secs(60)).await?;
    let reference = assignment(&envoys[0], "probe", 300).await?;
    let at = share(&reference);
    assert!((0.2..=0.4).contains(&at), "canary share {at} at 30 %");
    assert_eq!(assignment(&envoys[1], "probe", 300).await?, reference);

    // With warming: from its very first request after the restart it serves what the others
    // serve.
    envoys[1].restart().await?;
    assert_eq!(
        assignment(&envoys[1], "probe", 300).await?,
        reference,
        "edge-1 (warming) right after its restart\n{}",
        envoys[1].log_tail(20)
    );
    // The shipped bootstrap: as soon as the controller's answer is in, which it asks for at
    // start-up.
    envoys[0].restart().await?;
    wait_until(Duration::from_secs(10), "edge-0 has the config", || async {
        updates(&envoys[0]).await >= 1
    })
    .await?;
    assert_eq!(assignment(&envoys[0], "probe", 300).await?, reference);

    // Joining: new Envoys, never seen before, likewise.
    let warm = fleet_envoy_with("edge-new-warm", xds, &stable, &canary, true).await?;
    assert_eq!(
        assignment(&warm, "probe", 300).await?,
        reference,
        "edge-new-warm right after it started\n{}",
        warm.log_tail(20)
    );
    let joined = fleet_envoy("edge-new", xds, &stable, &canary).await?;
    wait_until(
        Duration::from_secs(10),
        "edge-new has the config",
        || async { updates(&joined).await >= 1 },
    )
    .await?;
    assert_eq!(assignment(&joined, "probe", 300).await?, reference);

    // The controller lists all four as connected, each with the version it serves ACKed; and
    // each Envoy's filter reports that version as the one it runs.
    let status = controller
        .status()
        .await
        .ok_or_else(|| anyhow::anyhow!("no /status"))?;
    let sink = &status[0]["proxies"][0];
    // No tls block: /status says the configuration travels in clear.
    assert_eq!(sink["tls"], false, "{sink}");
    let serving = sink["serving"]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("no version served: {status}"))?;
    let listed = sink["proxies"].as_array().cloned().unwrap_or_default();
    for id in ["edge-0", "edge-1", "edge-new-warm", "edge-new"] {
        let proxy = listed
            .iter()
            .find(|p| p["id"] == id)
            .ok_or_else(|| anyhow::anyhow!("{id} not in /status: {sink}"))?;
        assert_eq!(proxy["acked"]["sluice"], serving, "{proxy}");
        assert_eq!(proxy["last_nack"], Value::Null, "{proxy}");
    }
    assert_eq!(listed.len(), 4, "{sink}");
    for envoy in envoys.iter().chain([&warm, &joined]) {
        let prom = envoy.admin().prometheus().await?;
        assert_eq!(
            prom.get(metrics::CONFIG_REVISION, &[("experiment", "fleet")]),
            Some(serving as f64),
            "{:?}",
            envoy.node_id()
        );
    }
    assert_eq!(controller.state()["weight"], 30.0);
    Ok(())
}

#[tokio::test]
async fn an_envoy_that_nacks_fails_the_push_with_its_message_and_the_rollout_holds(
) -> anyhow::Result<()> {
    // The pushed config names the module by a relative path. Two Envoys run where that path
    // exists; edge-2 runs in a directory without it, so it cannot load the module and rejects
    // every push.
    let with_module = tempfile::tempdir()?;
    std::fs::copy(
        filter_wasm()?,
        with_module.path().join("sluice_filter.wasm"),
    )?;
    let without = tempfile::tempdir()?;
    let xds = free_port()?;
    let stable = Upstream::start("stable", model("stable")).await?;
    let canary = Upstream::start("canary", model("canary")).await?;
    let mut envoys = Vec::new();
    for (i, cwd) in [with_module.path(), with_module.path(), without.path()]
        .into_iter()
        .enumerate()
    {
        envoys.push(
            sluice_tests::fleet::envoy(&format!("edge-{i}"), xds, &stable, &canary)
                .cwd(cwd)
                .start()
                .await?,
        );
    }
    let mut controller = Controller::new(&admins(&envoys), xds, json!([10, 100]), 3, |spec| {
        spec["spec"]["sinks"][0]["ecdsGrpc"]["wasm"]["filename"] = json!("sluice_filter.wasm");
    })?;
    controller.start()?;
    let hold = wait_for(
        Duration::from_secs(40),
        "the rollout holds on edge-2's NACK",
        || async {
            let s = controller.status().await;
            let hold = s.as_ref().and_then(|s| s[0]["state"]["hold"].as_str());
            Ok::<_, ()>(
                hold.filter(|h| h.starts_with("push failed"))
                    .map(str::to_string),
            )
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", controller.log()))?;
    eprintln!("the rollout holds: {hold}");
    // The hold names the proxy and carries Envoy's own reason.
    assert!(hold.contains("edge-2"), "{hold}");
    assert!(hold.contains("sluice_filter.wasm"), "{hold}");
    assert!(
        !hold.contains("edge-0") && !hold.contains("edge-1"),
        "{hold}"
    );
    // It keeps holding: nothing beyond the first stage is ever pushed, the confirmed weight stays
    // 0, and edge-2 still serves its last good config (the control only).
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(controller.state()["weight"], 0.0, "{}", controller.log());
    assert!(
        controller.pushed_weights().iter().all(|w| *w <= 10.0),
        "{:?}",
        controller.pushed_weights()
    );
    assert_eq!(share(&assignment(&envoys[2], "probe", 200).await?), 0.0);
    let stats = envoys[2].admin().stats().await?;
    assert!(
        stats
            .get("extension_config_discovery.http_filter.sluice.update_rejected")
            .unwrap_or(0)
            >= 1,
        "edge-2 did not reject anything"
    );
    Ok(())
}

#[tokio::test]
async fn the_fleet_outlives_its_controller_and_the_restarted_controller_resumes(
) -> anyhow::Result<()> {
    let (stable, canary, envoys, mut controller) =
        fleet_with_controller(3, 0, json!([20, 100]), |spec| {
            spec["spec"]["schedule"]["bake"] = json!("6s");
        })
        .await?;
    let traffic = Traffic::spread(urls(&envoys), 24, 4000);
    controller.start()?;
    controller.at_weight(20.0, Duration::from_secs(60)).await?;
    let reference = assignment(&envoys[0], "probe", 300).await?;
    let at = share(&reference);
    assert!((0.1..=0.3).contains(&at), "canary share {at} at 20 %");

    // Killed mid-stage: every Envoy keeps serving the 20 % it had.
    controller.kill();
    for envoy in &envoys {
        assert_eq!(assignment(envoy, "probe", 300).await?, reference);
    }
    // An Envoy started now, with no controller to ask, serves the control only.
    let late = fleet_envoy("edge-late", controller.xds, &stable, &canary).await?;
    assert_eq!(share(&assignment(&late, "probe", 300).await?), 0.0);
    // Still so after it tried again and found nobody (a failed connection to cluster `sluice`
    // more than now), and the others are unchanged.
    let failed = |stats: &sluice_tests::Stats| stats.get("cluster.sluice.upstream_cx_connect_fail");
    let before = failed(&late.admin().stats().await?).unwrap_or(0);
    wait_for(
        Duration::from_secs(30),
        "edge-late retries the controller",
        || async {
            let now = failed(&late.admin().stats().await?).unwrap_or(0);
            Ok::<_, sluice_tests::Error>((now > before).then_some(()))
        },
    )
    .await?;
    assert_eq!(share(&assignment(&late, "probe", 300).await?), 0.0);
    assert_eq!(assignment(&envoys[1], "probe", 300).await?, reference);

    // Restarted: the late Envoy gets the current weight once it connects, and the rollout
    // carries on to the end.
    controller.start()?;
    wait_for(
        Duration::from_secs(30),
        "edge-late serves what the others serve",
        || async {
            let a = assignment(&late, "probe", 300)
                .await
                .map_err(|e| e.to_string())?;
            // 20 %, or already 100 % if the rollout moved on meanwhile.
            Ok::<_, String>((a == reference || share(&a) == 1.0).then_some(()))
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", controller.log()))?;
    controller
        .exited(PROMOTED, Duration::from_secs(120))
        .await?;
    traffic.stop().await;
    assert_eq!(controller.state()["phase"]["phase"], "promoted");
    let pushed = controller.pushed_weights();
    assert_eq!(pushed.last(), Some(&100.0), "{pushed:?}");
    assert!(!pushed.contains(&0.0), "{pushed:?}");
    for envoy in envoys.iter().chain([&late]) {
        assert_eq!(
            share(&assignment(envoy, "final", 200).await?),
            1.0,
            "{:?}",
            envoy.node_id()
        );
    }
    Ok(())
}

#[tokio::test]
async fn two_envoys_sharing_a_node_id_count_once_and_the_push_is_not_confirmed(
) -> anyhow::Result<()> {
    // An operator mistake: three Envoys, two of them started with the same node id. The
    // controller must not count them as three proxies.
    let xds = free_port()?;
    let stable = Upstream::start("stable", model("stable")).await?;
    let canary = Upstream::start("canary", model("canary")).await?;
    let mut envoys = Vec::new();
    for id in ["edge-0", "edge-0", "edge-1"] {
        envoys.push(fleet_envoy(id, xds, &stable, &canary).await?);
    }
    let mut controller = Controller::new(&admins(&envoys), xds, json!([10, 100]), 3, |_| {})?;
    controller.start()?;
    let hold = wait_for(
        Duration::from_secs(40),
        "the rollout holds with too few proxies",
        || async {
            let s = controller.status().await;
            let hold = s.as_ref().and_then(|s| s[0]["state"]["hold"].as_str());
            Ok::<_, ()>(
                hold.filter(|h| h.starts_with("push failed"))
                    .map(str::to_string),
            )
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", controller.log()))?;
    eprintln!("the rollout holds: {hold}");
    assert!(hold.contains("2 proxies connected"), "{hold}");
    assert!(hold.contains("minProxies 3"), "{hold}");
    assert_eq!(controller.state()["weight"], 0.0);
    Ok(())
}

#[tokio::test]
async fn a_nacking_proxy_holds_the_rollout_until_it_leaves_the_fleet() -> anyhow::Result<()> {
    // Two real Envoys and, on the same server, simulated proxies: 20 that accept everything,
    // and one that rejects every configuration with a canary weight above 0 (as a proxy with a
    // broken module would). Once that one is taken out of the fleet, the rollout carries on.
    let (_stable, _canary, envoys, mut controller) =
        fleet_with_controller(2, 0, json!([10, 100]), |spec| {
            spec["spec"]["schedule"]["bake"] = json!("1s");
        })
        .await?;
    let traffic = Traffic::spread(urls(&envoys), 24, 4000);
    controller.start()?;
    let xds = format!("127.0.0.1:{}", controller.xds);
    wait_until(
        Duration::from_secs(20),
        "the controller listens",
        || async { tokio::net::TcpStream::connect(&xds).await.is_ok() },
    )
    .await?;
    let mut good = Vec::new();
    for i in 0..20 {
        good.push(
            XdsClient::connect(
                &xds,
                Identity::new(format!("sim-{i}")),
                "sluice",
                accept_decodable(),
            )
            .await?,
        );
    }
    let rejects: Verdict = Arc::new(|r: &Received| {
        let weighted = r
            .config
            .as_deref()
            .is_some_and(|c| c.contains("\"weight\":") && !c.contains("\"weight\":0"));
        weighted.then(|| "module sluice_filter.wasm: cannot be compiled here".to_string())
    });
    let bad = XdsClient::connect(&xds, Identity::new("sim-bad"), "sluice", rejects).await?;
    let hold = wait_for(
        Duration::from_secs(40),
        "the rollout holds on sim-bad's NACK",
        || async {
            let s = controller.status().await;
            let hold = s.as_ref().and_then(|s| s[0]["state"]["hold"].as_str());
            Ok::<_, ()>(hold.filter(|h| h.contains("sim-bad")).map(str::to_string))
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", controller.log()))?;
    assert!(hold.contains("cannot be compiled here"), "{hold}");
    assert!(!bad.state().nacks.is_empty());
    assert_eq!(controller.state()["weight"], 0.0);

    // Taken out: the next attempt is confirmed by everyone left, and the rollout finishes.
    drop(bad);
    controller
        .exited(PROMOTED, Duration::from_secs(120))
        .await?;
    traffic.stop().await;
    // Every simulated proxy that stayed ACKed the final configuration.
    for client in &good {
        let state = client.state();
        assert!(state.nacks.is_empty(), "{}", client.id());
        let config = state.config.unwrap_or_default();
        assert!(
            config.contains("\"weight\":100"),
            "{}: {config}",
            client.id()
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_rollback_a_proxy_rejects_is_pushed_again_until_it_is_confirmed() -> anyhow::Result<()> {
    // A bad canary (25 % errors) on two real Envoys, and a simulated proxy that rejects any
    // configuration with the canary at 0 %: the rollback cannot be confirmed while it is there.
    let (_stable, canary, envoys, mut controller) =
        fleet_with_controller(2, 4, json!([10, 50, 100]), |_| {}).await?;
    let traffic = Traffic::spread(urls(&envoys), 24, 4000);
    controller.start()?;
    let xds = format!("127.0.0.1:{}", controller.xds);
    wait_until(
        Duration::from_secs(20),
        "the controller listens",
        || async { tokio::net::TcpStream::connect(&xds).await.is_ok() },
    )
    .await?;
    let rejects_zero: Verdict = Arc::new(|r: &Received| {
        let zero = r.config.as_deref().is_some_and(|c| {
            c.contains("\"name\":\"canary\",\"weight\":0.0")
                || c.contains("\"name\":\"canary\",\"weight\":0}")
        });
        zero.then(|| "refusing the rollback".to_string())
    });
    let bad = XdsClient::connect(&xds, Identity::new("sim-bad"), "sluice", rejects_zero).await?;
    // The rollback is decided, rejected, and pushed again (a fresh response each time).
    bad.wait(Duration::from_secs(120), "two rejected rollbacks", |s| {
        s.nacks.len() >= 2
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", controller.log()))?;
    // Decided but not confirmed: the confirmed weight is still the canary's, the 0 % push
    // pending, and the daemon has not finished.
    let state = controller.state();
    assert_eq!(state["phase"]["phase"], "rolled_back", "{state}");
    assert_ne!(state["weight"], 0.0, "{state}");
    assert_eq!(state["pending"]["weight"], 0.0, "{state}");
    assert!(controller.running(), "{}", controller.log());
    // The Envoys took the rollback anyway: nobody reaches the canary.
    let before = canary.count();
    for envoy in &envoys {
        assert_eq!(share(&assignment(envoy, "probe", 200).await?), 0.0);
    }
    assert_eq!(canary.count(), before);
    // Gone, the next attempt is confirmed and the rollout ends rolled back.
    drop(bad);
    controller
        .exited(ROLLED_BACK, Duration::from_secs(60))
        .await?;
    traffic.stop().await;
    assert_eq!(controller.state()["phase"]["phase"], "rolled_back");
    assert_eq!(controller.pushed_weights().last(), Some(&0.0));
    Ok(())
}
