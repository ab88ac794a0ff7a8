//! `sluice run` with the filter's breaker, end to end against a real Envoy with two workers: a
//! canary that fails hard is taken out by the filter itself, and the controller records that as
//! a rollback caused by the data plane (audit, events, `sluice status`, `/metrics`), pushes
//! weight 0 and never raises again; a good canary with a breaker configured is promoted
//! without a trip.

use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use sluice_filter::metrics::{BREAKER_TRIPPED, BREAKER_TRIPS};
use sluice_tests::{
    filter_wasm, sluice_bin, wait_until, Envoy, EnvoyConfig, HttpClient, Reply, Request, SluiceRun,
    Traffic, Upstream,
};

const LISTENER: u16 = 10000;
const ADMIN: u16 = 9901;

/// Answers 200 with a score, or 500 to every `error_every`-th user (0: never).
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

async fn stack(canary_error_every: u64) -> anyhow::Result<(Upstream, Upstream, Envoy)> {
    let stable = Upstream::start("stable", model(0)).await?;
    let canary = Upstream::start("canary", model(canary_error_every)).await?;
    let envoy = EnvoyConfig::new("tests/envoy/rollout.yaml")
        .port_to(10001, stable.port())
        .port_to(10002, canary.port())
        .ecds("tests/envoy/rollout")
        .concurrency(2)
        .start()
        .await?;
    Ok((stable, canary, envoy))
}

/// A rollout of experiment `r` with `breaker` in its experiment, evaluated every `interval`:
/// long enough that the filter acts well before the judge could.
fn rollout(envoy: &Envoy, stages: Value, interval: &str, breaker: Value) -> anyhow::Result<Value> {
    let ecds = envoy.ecds_file("sluice.yaml")?;
    let admin = format!("http://{}", envoy.addr(ADMIN));
    Ok(json!({
        "apiVersion": "sluice.dev/v1alpha1",
        "kind": "Rollout",
        "metadata": {"name": "r"},
        "spec": {
            "experiment": {
                "name": "r",
                "unit": {"type": "user", "keys": [{"header": "x-user-id"}]},
                "variants": [{"name": "stable", "control": true}, {"name": "canary", "weight": 0}],
                "prediction": {"header": "x-model-score"},
                "breaker": breaker,
            },
            "schedule": {"stages": stages, "bake": "4s", "warmup": "1s", "interval": interval},
            "guardrails": {
                "promotion": "noBreach",
                "minRequests": 100,
                "latency": {"quantiles": [{
                    "quantile": 0.99,
                    "margin": {"relative": 0.9, "absolute": 0.2},
                    "tolerance": {"relative": 0.9, "absolute": 0.2},
                    "sloMs": 1000,
                }]},
            },
            "sources": [{"envoyAdmin": {"endpoints": [admin]}}],
            "sinks": [{"ecdsFile": {
                "path": ecds.display().to_string(),
                "wasm": {"filename": filter_wasm()?.display().to_string()},
                "proxies": [admin],
                "confirmWithin": "5s",
            }}],
        }
    }))
}

/// `sluice run --exit-when-done` ends with this code when the rollout is promoted.
const PROMOTED: i32 = 0;

/// The breaker series of the canary in Envoy's admin: (trips, tripped gauge).
async fn breaker_series(envoy: &Envoy) -> anyhow::Result<(f64, Option<f64>)> {
    let samples = envoy.admin().prometheus().await?;
    let canary = [("experiment", "r"), ("variant", "canary")];
    let trips = samples.find(BREAKER_TRIPS, &canary).map(|s| s.value).sum();
    let tripped = samples
        .find(BREAKER_TRIPPED, &canary)
        .map(|s| s.value)
        .next();
    Ok((trips, tripped))
}

#[tokio::test]
async fn a_breaker_trip_is_a_data_plane_rollback_that_is_never_re_raised() -> anyhow::Result<()> {
    // Half the canary's users get 500: the filter trips it about a second after it gets
    // traffic, long before the controller's next look (every 5 s).
    let (_stable, canary, envoy) = stack(2).await?;
    let traffic = Traffic::start(envoy.url(LISTENER, "/predict"));
    let mut run = SluiceRun::new(&rollout(
        &envoy,
        json!([10, 50, 100]),
        "5s",
        json!({"window_seconds": 10, "min_requests": 20, "max_error_rate": 0.05, "max_ratio_to_control": 3}),
    )?)?;
    // It stays up after the rollout ends, to be asked and watched.
    run.start(&[])?;
    let rolled_back = wait_until(
        Duration::from_secs(60),
        "the rollout is rolled back and weight 0 confirmed",
        || async {
            run.state()["phase"]["phase"] == "rolled_back" && run.state()["pending"].is_null()
        },
    )
    .await;
    if let Err(e) = rolled_back {
        run.kill();
        anyhow::bail!("{e}\n{}\n{}", run.log(), envoy.log_tail(40));
    }
    let state = run.state();
    let reason = state["phase"]["reason"].as_str().unwrap_or("");
    assert!(reason.starts_with("breaker: "), "{state}\n{}", run.log());
    assert_eq!(state["weight"], 0.0);
    let audit = run.audit();
    let decision = audit
        .iter()
        .find(|r| r["record"] == "decision" && r["kind"] == "rolled_back")
        .ok_or_else(|| anyhow::anyhow!("no rollback decision: {audit:?}"))?;
    assert_eq!(decision["cause"], "breaker", "{decision}");
    assert_eq!(decision["breaker"]["variant"], "canary", "{decision}");
    // Seen by the trip counter (reason 5xx), or by the gauge when the first reading already
    // held the trip.
    assert!(
        decision["breaker"]["trips"]["5xx"].as_u64() >= Some(1)
            || decision["breaker"]["tripped_on"]
                .as_array()
                .is_some_and(|a| !a.is_empty()),
        "{decision}"
    );

    // The clearing push (weight 0, a new version) set the gauge back to 0; the counter stays.
    wait_until(
        Duration::from_secs(10),
        "the gauge is cleared by the new revision",
        || async {
            breaker_series(&envoy)
                .await
                .is_ok_and(|(trips, tripped)| trips >= 1.0 && tripped == Some(0.0))
        },
    )
    .await?;

    // `sluice status` and `/metrics` say so.
    let endpoint = format!("http://127.0.0.1:{}", run.api());
    let out = Command::new(sluice_bin()?)
        .args(["status", "--endpoint", &endpoint])
        .output()?;
    let status = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{status}");
    assert!(
        status.contains("breaker: canary tripped in the data plane"),
        "{status}"
    );
    let metrics = HttpClient::new()
        .get(&format!("{endpoint}/metrics"))
        .await
        .map(|r| r.text())
        .unwrap_or_default();
    assert!(
        metrics.contains("sluice_rollout_breaker_tripped{rollout=\"r\"} 1"),
        "{metrics}"
    );

    // Several more looks (the trip counter is still up): nothing is raised, the canary gets
    // nothing.
    let before = canary.count();
    let looks = |audit: &[Value]| audit.iter().filter(|r| r["record"] == "evaluation").count();
    let evaluations = looks(&run.audit());
    tokio::time::sleep(Duration::from_secs(11)).await;
    traffic.stop().await;
    run.kill();
    assert_eq!(run.pushed_weights(), vec![10.0, 0.0], "{}", run.log());
    assert_eq!(
        canary.count(),
        before,
        "the canary got traffic after the rollback"
    );
    assert_eq!(
        looks(&run.audit()),
        evaluations,
        "a final rollout is not evaluated"
    );
    assert_eq!(run.state()["phase"]["phase"], "rolled_back");
    Ok(())
}

#[tokio::test]
async fn a_good_canary_with_a_breaker_is_promoted_without_a_trip() -> anyhow::Result<()> {
    let (_stable, _canary, envoy) = stack(0).await?;
    let traffic = Traffic::start(envoy.url(LISTENER, "/predict"));
    let mut run = SluiceRun::new(&rollout(
        &envoy,
        json!([10, 50, 100]),
        "500ms",
        json!({"window_seconds": 10, "min_requests": 20, "max_error_rate": 0.05, "max_ratio_to_control": 3}),
    )?)?;
    run.start(&["--exit-when-done"])?;
    let exited = run.exited(PROMOTED, Duration::from_secs(120)).await;
    traffic.stop().await;
    exited?;
    assert_eq!(run.state()["phase"]["phase"], "promoted", "{}", run.log());
    assert_eq!(run.pushed_weights(), vec![10.0, 50.0, 100.0]);
    let (trips, tripped) = breaker_series(&envoy).await?;
    assert_eq!(trips, 0.0);
    assert_ne!(tripped, Some(1.0));
    assert!(!run.log().contains("breaker tripped"), "{}", run.log());
    Ok(())
}
