//! Shadow traffic in a real Envoy: copies reach the shadow, answers are compared, and nothing
//! the shadow does — differ, fail, reset, hang, or be too many — changes what clients see.

use std::time::Duration;

use serde_json::{json, Value};
use sluice_tests::{
    free_port, wait_until, Envoy, EnvoyConfig, Load, Reply, Request, Samples, Upstream,
};

const LISTENER: u16 = 10000;
const FIXTURE: &str = "tests/envoy/upstreams.yaml";

fn fixture_config() -> anyhow::Result<String> {
    let text = std::fs::read_to_string(sluice_tests::repo_root().join(FIXTURE))?;
    text.lines()
        .find_map(|l| l.trim().strip_prefix("value: '"))
        .and_then(|l| l.strip_suffix('\''))
        .map(str::to_string)
        .ok_or_else(|| anyhow::anyhow!("{FIXTURE}: no one-line filter config"))
}

/// One experiment, everyone on the control (`stable`), with the given shadow section.
fn config(shadow: Value) -> Value {
    json!({"version": 1, "experiments": [{
        "name": "s",
        "unit": {"type": "user", "keys": [{"header": "x-user-id"}]},
        "variants": [{"name": "stable", "control": true}, {"name": "canary", "weight": 0}],
        "shadow": shadow,
    }]})
}

async fn start(config: &Value, primary: &Upstream, shadow_port: u16) -> anyhow::Result<Envoy> {
    // Info level: the disagreement log is part of what is tested.
    Ok(EnvoyConfig::new(FIXTURE)
        .log_level("info")
        .port_to(10001, primary.port())
        .port_to(10002, primary.port())
        .port_to(10003, shadow_port)
        .replace(&fixture_config()?, &config.to_string())
        .start()
        .await?)
}

fn user_number(req: &Request) -> u64 {
    req.user()
        .and_then(|u| u.strip_prefix("user-"))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// The model: a score that depends on the user.
fn score(i: u64) -> f64 {
    (i % 50) as f64 / 100.0
}

fn model(req: &Request) -> Reply {
    let i = user_number(req);
    Reply::json(json!({"user": i, "score": score(i), "label": "cat"}))
}

const L: [(&str, &str); 2] = [("experiment", "s"), ("variant", "stable")];

fn shadow_counter(stats: &Samples, name: &str, extra: &[(&str, &str)]) -> f64 {
    let mut filter = L.to_vec();
    filter.extend_from_slice(extra);
    stats.sum(name, &filter)
}

/// Waits until every sent copy has been compared (or otherwise settled) and returns the stats.
/// Tests that expect every request compared raise `max_in_flight` above their request count:
/// on a loaded machine the default cap (64 per worker) is reached, and skipping is then right
/// (the cap has its own test).
async fn settled(envoy: &Envoy, compared: f64) -> anyhow::Result<Samples> {
    let admin = envoy.admin();
    let done = wait_until(
        Duration::from_secs(10),
        "shadow comparisons settled",
        || async {
            let stats = admin.prometheus().await.unwrap_or_default();
            shadow_counter(&stats, "sluice_shadow_compared_total", &[]) >= compared
        },
    )
    .await;
    let stats = admin.prometheus().await?;
    if let Err(e) = done {
        let count = |name| shadow_counter(&stats, name, &[]);
        anyhow::bail!(
            "{e}: {compared} expected; sent {}, compared {}, skipped {} (in flight {}, dispatch failed {}, no primary {}), errors {}, timeouts {}",
            count("sluice_shadow_requests_total"),
            count("sluice_shadow_compared_total"),
            count("sluice_shadow_skipped_total"),
            shadow_counter(&stats, "sluice_shadow_skipped_total", &[("reason", "in_flight")]),
            shadow_counter(&stats, "sluice_shadow_skipped_total", &[("reason", "dispatch_failed")]),
            shadow_counter(&stats, "sluice_shadow_skipped_total", &[("reason", "no_primary")]),
            count("sluice_shadow_errors_total"),
            count("sluice_shadow_timeouts_total"),
        );
    }
    Ok(stats)
}

const SCORE_FIELD: &str = r#"{"name": "score", "pointer": "/score", "abs_tolerance": 0.001}"#;

#[tokio::test]
async fn identical_shadow_agrees_fully_and_gets_a_clean_copy() -> anyhow::Result<()> {
    let primary = Upstream::start("primary", model).await?;
    let shadow = Upstream::start("shadow", model).await?;
    let field: Value = serde_json::from_str(SCORE_FIELD)?;
    let envoy = start(
        &config(
            json!({"cluster": "shadow", "sample_percent": 100, "max_in_flight": 1000, "compare": {"fields": [field]}}),
        ),
        &primary,
        shadow.port(),
    )
    .await?;
    let n = 500;
    let responses = Load::new(envoy.url(LISTENER, "/predict?x=1"))
        .requests(n)
        .run()
        .await?;
    assert!(responses.iter().all(|r| r.status == 200));
    let stats = settled(&envoy, n as f64).await?;
    for field in ["status", "body", "score"] {
        assert_eq!(
            shadow_counter(&stats, "sluice_shadow_agree_total", &[("field", field)]),
            n as f64,
            "{field}"
        );
        assert_eq!(
            shadow_counter(&stats, "sluice_shadow_disagree_total", &[("field", field)]),
            0.0
        );
    }
    assert_eq!(
        shadow_counter(&stats, "sluice_shadow_requests_total", &[]),
        n as f64
    );
    // The copy: same method, path and user; marked; no routing or hop-by-hop headers.
    let copies = shadow.requests();
    assert_eq!(copies.len(), n);
    for c in &copies {
        assert_eq!(c.method, "GET");
        assert_eq!(c.path, "/predict?x=1");
        assert_eq!(c.header("x-sluice-shadow"), Some("1"));
        assert_eq!(c.variant(), None, "routing header leaked to the shadow");
        assert!(c.user().is_some());
    }
    Ok(())
}

#[tokio::test]
async fn a_known_share_of_disagreement_is_counted_with_deltas() -> anyhow::Result<()> {
    // Both services answer after a delay that varies by user, so that with 32 requests at a
    // time the answers come back in another order than the copies went out, and sometimes the
    // shadow's before the primary's: each shadow answer must still meet its own request's
    // primary answer (scores differ between users, so a mix-up would show as disagreement).
    let primary = Upstream::start("primary", |req: &Request| {
        model(req).delay(Duration::from_millis(user_number(req) * 3 % 7))
    })
    .await?;
    // Every fourth user gets a score 0.1 higher from the shadow.
    let shadow = Upstream::start("shadow", |req: &Request| {
        let i = user_number(req);
        let s = score(i) + if i.is_multiple_of(4) { 0.1 } else { 0.0 };
        Reply::json(json!({"user": i, "score": s, "label": "cat"}))
            .delay(Duration::from_millis(i * 7 % 11))
    })
    .await?;
    let field: Value = serde_json::from_str(SCORE_FIELD)?;
    let envoy = start(
        &config(json!({"cluster": "shadow", "sample_percent": 100, "log_per_minute": 3, "max_in_flight": 1000,
                       "compare": {"fields": [field, {"name": "label", "pointer": "/label", "type": "string"}]}})),
        &primary,
        shadow.port(),
    )
    .await?;
    let n = 800;
    Load::new(envoy.url(LISTENER, "/"))
        .requests(n)
        .run()
        .await?;
    let stats = settled(&envoy, n as f64).await?;
    let differing = (n / 4) as f64;
    assert_eq!(
        shadow_counter(
            &stats,
            "sluice_shadow_disagree_total",
            &[("field", "score")]
        ),
        differing
    );
    assert_eq!(
        shadow_counter(&stats, "sluice_shadow_agree_total", &[("field", "score")]),
        n as f64 - differing
    );
    assert_eq!(
        shadow_counter(&stats, "sluice_shadow_disagree_total", &[("field", "body")]),
        differing
    );
    assert_eq!(
        shadow_counter(&stats, "sluice_shadow_agree_total", &[("field", "label")]),
        n as f64
    );
    assert_eq!(
        shadow_counter(&stats, "sluice_shadow_agree_total", &[("field", "status")]),
        n as f64
    );

    let admin = envoy.admin();
    wait_until(
        Duration::from_secs(10),
        "delta histograms flushed",
        || async {
            let s = admin.prometheus().await.unwrap_or_default();
            s.histogram(
                "sluice_shadow_delta",
                &[L[0], L[1], ("field", "score"), ("sign", "pos")],
            )
            .is_some_and(|h| h.count == n as f64)
        },
    )
    .await?;
    let stats = admin.prometheus().await?;
    let pos = stats
        .histogram(
            "sluice_shadow_delta",
            &[L[0], L[1], ("field", "score"), ("sign", "pos")],
        )
        .ok_or_else(|| anyhow::anyhow!("no delta histogram"))?;
    // 600 deltas of 0 and 200 of 0.1 × 1000 = 100.
    assert!(
        (pos.sum - differing * 100.0).abs() <= 0.05 * differing * 100.0,
        "delta sum {}",
        pos.sum
    );
    assert_eq!(pos.count_le(0.5), n as f64 - differing);
    // Disagreements are logged, within the per-minute budget, with both values.
    let log = envoy.log();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("shadow_disagreement"))
        .collect();
    assert_eq!(lines.len(), 3, "log budget of 3 per minute: {lines:?}");
    assert!(lines.iter().all(|l| l.contains("\"field\"")));
    Ok(())
}

/// A shadow that fails, then hangs past the timeout: counted, while clients see only the
/// primary's answers at the primary's speed.
#[tokio::test]
async fn failing_and_slow_shadows_do_not_touch_the_primary() -> anyhow::Result<()> {
    let primary = Upstream::start("primary", model).await?;
    let shadow = Upstream::start("shadow", |_req: &Request| Reply::status(500)).await?;
    let envoy = start(
        &config(json!({"cluster": "shadow", "sample_percent": 100, "timeout_ms": 200, "max_in_flight": 1000})),
        &primary,
        shadow.port(),
    )
    .await?;
    let url = envoy.url(LISTENER, "/");
    let n = 200;
    let failing = Load::new(&url).requests(n).run().await?;
    assert!(failing.iter().all(|r| r.status == 200 && r.json().is_ok()));
    let stats = settled(&envoy, n as f64).await?;
    assert_eq!(
        shadow_counter(&stats, "sluice_shadow_errors_total", &[]),
        n as f64
    );
    assert_eq!(
        shadow_counter(
            &stats,
            "sluice_shadow_disagree_total",
            &[("field", "status")]
        ),
        n as f64
    );

    shadow.set_behaviour(|_req: &Request| Reply::ok().delay(Duration::from_millis(1500)));
    let slow = Load::new(&url).requests(n).concurrency(16).run().await?;
    assert!(slow.iter().all(|r| r.status == 200));
    let mut latencies: Vec<Duration> = slow.iter().map(|r| r.latency).collect();
    latencies.sort();
    let p99 = latencies[latencies.len() * 99 / 100];
    // The shadow takes 1.5 s and times out at 200 ms; the primary answers at once.
    assert!(
        p99 < Duration::from_millis(150),
        "primary p99 {p99:?} with a hanging shadow"
    );
    let admin = envoy.admin();
    wait_until(Duration::from_secs(10), "timeouts counted", || async {
        let s = admin.prometheus().await.unwrap_or_default();
        shadow_counter(&s, "sluice_shadow_timeouts_total", &[]) == n as f64
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn an_unreachable_shadow_counts_errors_and_status_disagreement() -> anyhow::Result<()> {
    let primary = Upstream::start("primary", model).await?;
    let envoy = start(
        &config(json!({"cluster": "shadow", "sample_percent": 100, "timeout_ms": 2000, "max_in_flight": 1000})),
        &primary,
        free_port()?,
    )
    .await?;
    let n = 100;
    let r = Load::new(envoy.url(LISTENER, "/"))
        .requests(n)
        .run()
        .await?;
    assert!(r.iter().all(|r| r.status == 200));
    let admin = envoy.admin();
    wait_until(
        Duration::from_secs(10),
        "connection failures counted",
        || async {
            let s = admin.prometheus().await.unwrap_or_default();
            shadow_counter(&s, "sluice_shadow_errors_total", &[]) == n as f64
        },
    )
    .await?;
    let s = admin.prometheus().await?;
    assert_eq!(shadow_counter(&s, "sluice_shadow_timeouts_total", &[]), 0.0);
    // Envoy answers for the unreachable shadow with a 503: what a user of it would have got.
    assert_eq!(
        shadow_counter(&s, "sluice_shadow_disagree_total", &[("field", "status")]),
        n as f64
    );
    Ok(())
}

#[tokio::test]
async fn writes_are_not_shadowed_by_default_and_big_bodies_are_skipped() -> anyhow::Result<()> {
    let primary = Upstream::start("primary", model).await?;
    let shadow = Upstream::start("shadow", model).await?;
    // Default methods: a POST is not copied.
    let envoy = start(
        &config(json!({"cluster": "shadow", "sample_percent": 100})),
        &primary,
        shadow.port(),
    )
    .await?;
    let posts = Load::new(envoy.url(LISTENER, "/"))
        .requests(50)
        .method(hyper::Method::POST)
        .body("{}")
        .run()
        .await?;
    assert!(posts.iter().all(|r| r.status == 200));
    drop(envoy);
    assert_eq!(shadow.count(), 0, "a POST was shadowed by default");

    // POST allowed, 100-byte limit: small bodies are copied whole, big ones skipped.
    let envoy = start(
        &config(json!({"cluster": "shadow", "sample_percent": 100, "methods": ["POST"], "max_body_bytes": 100})),
        &primary,
        shadow.port(),
    )
    .await?;
    let url = envoy.url(LISTENER, "/");
    let small = r#"{"features": [1, 2, 3]}"#;
    Load::new(&url)
        .requests(20)
        .method(hyper::Method::POST)
        .body(small)
        .run()
        .await?;
    let big = "x".repeat(5000);
    let answered = Load::new(&url)
        .requests(20)
        .method(hyper::Method::POST)
        .body(big.clone())
        .run()
        .await?;
    assert!(answered.iter().all(|r| r.status == 200));
    let stats = settled(&envoy, 20.0).await?;
    assert_eq!(
        shadow_counter(
            &stats,
            "sluice_shadow_skipped_total",
            &[("reason", "body_limit")]
        ),
        20.0
    );
    let copies = shadow.requests();
    assert_eq!(copies.len(), 20);
    assert!(copies.iter().all(|c| c.body == small.as_bytes()));
    // The primary got every body whole.
    let bodies = primary.requests();
    assert_eq!(
        bodies.iter().filter(|r| r.body.len() == big.len()).count(),
        20
    );
    Ok(())
}

#[tokio::test]
async fn the_in_flight_cap_skips_instead_of_queueing() -> anyhow::Result<()> {
    let primary = Upstream::start("primary", model).await?;
    let shadow = Upstream::start("shadow", |_req: &Request| {
        Reply::ok().delay(Duration::from_millis(1000))
    })
    .await?;
    let envoy = start(
        &config(json!({"cluster": "shadow", "sample_percent": 100, "max_in_flight": 3, "timeout_ms": 5000})),
        &primary,
        shadow.port(),
    )
    .await?;
    let n = 40;
    let r = Load::new(envoy.url(LISTENER, "/"))
        .requests(n)
        .concurrency(4)
        .run()
        .await?;
    assert!(r.iter().all(|r| r.status == 200));
    let admin = envoy.admin();
    // Copies still queued for the next tick are sent within milliseconds.
    wait_until(
        Duration::from_secs(5),
        "every copy sent or skipped",
        || async {
            let s = admin.prometheus().await.unwrap_or_default();
            shadow_counter(&s, "sluice_shadow_requests_total", &[])
                + shadow_counter(
                    &s,
                    "sluice_shadow_skipped_total",
                    &[("reason", "in_flight")],
                )
                == n as f64
        },
    )
    .await?;
    let stats = admin.prometheus().await?;
    let skipped = shadow_counter(
        &stats,
        "sluice_shadow_skipped_total",
        &[("reason", "in_flight")],
    );
    let sent = shadow_counter(&stats, "sluice_shadow_requests_total", &[]);
    assert!(
        sent + skipped == n as f64,
        "sent {sent} + skipped {skipped} != {n}"
    );
    assert!(
        sent <= 3.0 + 3.0,
        "{sent} copies sent under a cap of 3 within one second"
    );
    assert!(skipped >= (n - 6) as f64);
    Ok(())
}
