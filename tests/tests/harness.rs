//! Smoke tests of the harness itself, with no Sluice filter involved: a plain Envoy router in front
//! of our programmable upstreams (bench/envoy/proxy-none.yaml), the no-op wasm filter, admin
//! parsing against a live Envoy, and validation of every benchmark config.
//! Needs `scripts/setup.sh` (Envoy) and, for the no-op test, the no-op filter built for wasm32.

use std::time::Duration;

use sluice_tests::client::count_by_header;
use sluice_tests::{
    noop_filter_wasm, validate, wait_for, wait_until, EnvoyConfig, HttpClient, Load, Reply,
    Upstream,
};

const PROXY: &str = "bench/envoy/proxy-none.yaml";
/// The listener and upstream ports as written in the bench configs.
const LISTENER: u16 = 10000;
const UPSTREAM: u16 = 18000;

#[tokio::test]
async fn envoy_routes_many_users_to_a_programmable_upstream() -> anyhow::Result<()> {
    let model = Upstream::start("model", |req| {
        let user = req.user().unwrap_or("-").to_string();
        Reply::json(serde_json::json!({ "user": user, "score": 0.7 }))
            .score(0.7)
            .outcome(if user.ends_with('7') { "click" } else { "none" })
    })
    .await?;
    let envoy = EnvoyConfig::new(PROXY)
        .port_to(UPSTREAM, model.port())
        .start()
        .await?;
    assert_ne!(envoy.port(LISTENER), LISTENER, "listener port is rewritten");

    let responses = Load::new(envoy.url(LISTENER, "/predict"))
        .requests(2000)
        .concurrency(32)
        .run()
        .await?;
    assert_eq!(responses.len(), 2000);
    assert!(responses.iter().all(|r| r.status == 200));
    // Responses come back in request order, with the upstream's answer for that very user.
    for (i, r) in responses.iter().enumerate() {
        assert_eq!(r.user, format!("user-{i}"));
        assert_eq!(r.json()?["user"], r.user.as_str());
        assert_eq!(r.header("x-model-score"), Some("0.7"));
    }
    assert_eq!(
        count_by_header(&responses, "x-sluice-outcome").get("click"),
        Some(&200)
    );

    // The upstream recorded every request with its headers.
    assert_eq!(model.count(), 2000);
    let seen = model.requests();
    assert!(seen
        .iter()
        .all(|r| r.method == "GET" && r.path == "/predict"));
    assert!(
        seen.iter().all(|r| r.variant().is_none()),
        "no filter, no routing header"
    );

    // Counters are live in both admin formats.
    let prom = envoy.admin().prometheus().await?;
    let by_cluster = |c: &str| {
        prom.sum(
            "envoy_cluster_upstream_rq_completed",
            &[("envoy_cluster_name", c)],
        )
    };
    assert_eq!(by_cluster("stable"), 2000.0);
    assert_eq!(by_cluster("canary"), 0.0);
    let stats = envoy.admin().stats().await?;
    assert_eq!(
        stats.get("cluster.stable.upstream_rq_completed"),
        Some(2000)
    );
    assert_eq!(stats.get("http.ingress.downstream_rq_2xx"), Some(2000));
    Ok(())
}

#[tokio::test]
async fn routing_header_from_the_client_picks_the_cluster_and_behaviour_can_change(
) -> anyhow::Result<()> {
    let model = Upstream::named("model").await?;
    let envoy = EnvoyConfig::new(PROXY)
        .port_to(UPSTREAM, model.port())
        .start()
        .await?;
    let client = HttpClient::new();
    let url = envoy.url(LISTENER, "/predict");

    let r = client
        .send(
            hyper::Method::GET,
            &url,
            &[("x-sluice-variant", "canary")],
            "",
        )
        .await?;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-upstream"), Some("model"));
    assert_eq!(model.requests()[0].variant(), Some("canary"));

    // Swap behaviour mid-test: the canary now fails slowly.
    model.set_behaviour(|req| match req.variant() {
        Some("canary") => Reply::status(503).delay(Duration::from_millis(30)),
        _ => Reply::ok(),
    });
    let r = client
        .send(
            hyper::Method::GET,
            &url,
            &[("x-sluice-variant", "canary")],
            "",
        )
        .await?;
    assert_eq!(r.status, 503);
    assert!(r.latency >= Duration::from_millis(30));
    assert_eq!(client.get(&url).await?.status, 200);
    assert_eq!(model.count(), 3);

    // Histograms reach the admin output at the stats flush (1 s in this config).
    let admin = envoy.admin().clone();
    let hist = wait_for(
        Duration::from_secs(10),
        "upstream_rq_time histogram",
        || {
            let admin = admin.clone();
            async move {
                let prom = admin.prometheus().await?;
                let h = prom.histogram(
                    "envoy_cluster_upstream_rq_time",
                    &[("envoy_cluster_name", "canary")],
                );
                Ok::<_, sluice_tests::Error>(h.filter(|h| h.count >= 2.0))
            }
        },
    )
    .await?;
    assert_eq!(hist.count, 2.0);
    assert!(hist.sum >= 30.0, "one canary request took 30 ms: {hist:?}");

    model.clear();
    assert_eq!(model.count(), 0);
    Ok(())
}

#[tokio::test]
async fn the_noop_wasm_filter_loads_and_passes_traffic_through() -> anyhow::Result<()> {
    let model = Upstream::named("model").await?;
    let envoy = EnvoyConfig::new("bench/envoy/proxy-noop.yaml")
        .port_to(UPSTREAM, model.port())
        .start()
        .await?;
    let responses = Load::new(envoy.url(LISTENER, "/"))
        .requests(200)
        .run()
        .await?;
    assert!(responses.iter().all(|r| r.status == 200));
    let stats = envoy.admin().stats().await?;
    // The wasm VM really is in the path: Envoy counts one active VM for the filter.
    assert!(
        stats.sum_prefix("wasm.envoy.wasm.runtime.v8.active") >= 1,
        "no active v8 VM: {:?}",
        stats
            .0
            .keys()
            .filter(|k| k.starts_with("wasm"))
            .collect::<Vec<_>>()
    );
    assert!(noop_filter_wasm()?.is_file());
    Ok(())
}

#[tokio::test]
async fn envoy_that_cannot_start_reports_its_log() -> anyhow::Result<()> {
    let err = EnvoyConfig::new(PROXY)
        .replace("type: STATIC", "type: NOT_A_TYPE")
        .start()
        .await
        .err()
        .ok_or_else(|| anyhow::anyhow!("a broken config started"))?;
    let text = err.to_string();
    assert!(text.contains("exited"), "{text}");
    assert!(
        text.contains("NOT_A_TYPE"),
        "log tail names the problem: {text}"
    );

    // A replacement that matches nothing is a mistake in the test, not a silent no-op.
    let err = EnvoyConfig::new(PROXY)
        .replace("no such text", "x")
        .validate();
    assert!(matches!(err, Err(sluice_tests::Error::Config { .. })));
    Ok(())
}

#[tokio::test]
async fn wait_until_times_out_with_the_condition_named() {
    let err = wait_until(Duration::from_millis(120), "the impossible", || async {
        false
    })
    .await
    .err()
    .map(|e| e.to_string())
    .unwrap_or_default();
    assert!(err.contains("the impossible"), "{err}");
}

#[test]
fn every_benchmark_config_is_valid() -> anyhow::Result<()> {
    let dir = sluice_tests::repo_root().join("bench/envoy");
    let mut yamls: Vec<_> = std::fs::read_dir(&dir)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    yamls.retain(|p| p.extension().is_some_and(|x| x == "yaml"));
    assert!(yamls.len() >= 4, "{yamls:?}");
    for yaml in yamls {
        validate(&yaml)?;
    }
    Ok(())
}
