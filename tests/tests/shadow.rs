//! Shadow traffic in a real Envoy: copies reach the shadow, answers are compared, and nothing
//! the shadow does — differ, fail, reset, hang, or be too many — changes what clients see.

use sluice_filter::metrics;
use std::time::Duration;

use serde_json::{json, Value};
use sluice_tests::{
    free_port, wait_until, Envoy, EnvoyConfig, Load, Reply, Request, Samples, Upstream,
};

const LISTENER: u16 = 10000;
const FIXTURE: &str = "tests/envoy/upstreams.yaml";

/// The filter's secret in these tests: it keys the copies' marker.
const SECRET: &str = "shadow-test-secret-0123456789abcdef";

/// One experiment, everyone on the control (`stable`), with the given shadow section.
fn config(shadow: Value) -> Value {
    json!({"version": 1, "secret": SECRET, "experiments": [{
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
        .replace(
            &sluice_tests::inline_filter_config(FIXTURE)?,
            &config.to_string(),
        )
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
            shadow_counter(&stats, metrics::SHADOW_COMPARED, &[]) >= compared
        },
    )
    .await;
    let stats = admin.prometheus().await?;
    if let Err(e) = done {
        let count = |name| shadow_counter(&stats, name, &[]);
        anyhow::bail!(
            "{e}: {compared} expected; sent {}, compared {}, skipped {} (in flight {}, dispatch failed {}, no primary {}), errors {}, timeouts {}",
            count(metrics::SHADOW_REQUESTS),
            count(metrics::SHADOW_COMPARED),
            count(metrics::SHADOW_SKIPPED),
            shadow_counter(&stats, metrics::SHADOW_SKIPPED, &[("reason", "in_flight")]),
            shadow_counter(&stats, metrics::SHADOW_SKIPPED, &[("reason", "dispatch_failed")]),
            shadow_counter(&stats, metrics::SHADOW_SKIPPED, &[("reason", "no_primary")]),
            count(metrics::SHADOW_ERRORS),
            count(metrics::SHADOW_TIMEOUTS),
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
            shadow_counter(&stats, metrics::SHADOW_AGREE, &[("field", field)]),
            n as f64,
            "{field}"
        );
        assert_eq!(
            shadow_counter(&stats, metrics::SHADOW_DISAGREE, &[("field", field)]),
            0.0
        );
    }
    assert_eq!(
        shadow_counter(&stats, metrics::SHADOW_REQUESTS, &[]),
        n as f64
    );
    // The copy: same method, path and user; marked; no routing or hop-by-hop headers.
    let copies = shadow.requests();
    assert_eq!(copies.len(), n);
    for c in &copies {
        assert_eq!(c.method, "GET");
        assert_eq!(c.path, "/predict?x=1");
        assert!(
            c.header("x-sluice-shadow")
                .is_some_and(|m| m.starts_with("v1.")),
            "copy without a marker: {:?}",
            c.header("x-sluice-shadow")
        );
        assert_eq!(c.variant(), None, "routing header leaked to the shadow");
        assert!(c.user().is_some());
    }
    Ok(())
}

#[tokio::test]
async fn a_sampled_share_gets_the_same_clean_copies() -> anyhow::Result<()> {
    // Below 100 % the filter reads `:method` alone to sample, and the request's other headers
    // only for a copy it takes: the copies must be as clean as when every request is copied.
    let primary = Upstream::start("primary", model).await?;
    let shadow = Upstream::start("shadow", model).await?;
    let envoy = start(
        &config(json!({"cluster": "shadow", "sample_percent": 50, "max_in_flight": 1000})),
        &primary,
        shadow.port(),
    )
    .await?;
    let n = 400;
    let responses = Load::new(envoy.url(LISTENER, "/predict?x=2"))
        .requests(n)
        .run()
        .await?;
    assert!(responses.iter().all(|r| r.status == 200));
    // Copies are taken as their requests pass, so all of them are counted by now.
    let taken = shadow_counter(
        &envoy.admin().prometheus().await?,
        metrics::SHADOW_REQUESTS,
        &[],
    );
    // Half of 400: outside 140..=260 has a chance of about 1e-9 for fair draws.
    assert!((140.0..=260.0).contains(&taken), "{taken} of {n} copied");
    let stats = settled(&envoy, taken).await?;
    assert_eq!(
        shadow_counter(&stats, metrics::SHADOW_AGREE, &[("field", "status")]),
        taken
    );
    let copies = shadow.requests();
    assert_eq!(copies.len() as f64, taken);
    for c in &copies {
        assert_eq!(c.method, "GET");
        assert_eq!(c.path, "/predict?x=2");
        assert!(c
            .header("x-sluice-shadow")
            .is_some_and(|m| m.starts_with("v1.")));
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
        shadow_counter(&stats, metrics::SHADOW_DISAGREE, &[("field", "score")]),
        differing
    );
    assert_eq!(
        shadow_counter(&stats, metrics::SHADOW_AGREE, &[("field", "score")]),
        n as f64 - differing
    );
    assert_eq!(
        shadow_counter(&stats, metrics::SHADOW_DISAGREE, &[("field", "body")]),
        differing
    );
    assert_eq!(
        shadow_counter(&stats, metrics::SHADOW_AGREE, &[("field", "label")]),
        n as f64
    );
    assert_eq!(
        shadow_counter(&stats, metrics::SHADOW_AGREE, &[("field", "status")]),
        n as f64
    );

    let admin = envoy.admin();
    wait_until(
        Duration::from_secs(10),
        "delta histograms flushed",
        || async {
            let s = admin.prometheus().await.unwrap_or_default();
            s.histogram(
                metrics::SHADOW_DELTA,
                &[L[0], L[1], ("field", "score"), ("sign", "pos")],
            )
            .is_some_and(|h| h.count == n as f64)
        },
    )
    .await?;
    let stats = admin.prometheus().await?;
    let pos = stats
        .histogram(
            metrics::SHADOW_DELTA,
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
/// primary's answers, none of them held for the shadow (each answered before the shadow's
/// timeout could have passed).
#[tokio::test]
async fn failing_and_slow_shadows_do_not_touch_the_primary() -> anyhow::Result<()> {
    let primary = Upstream::start("primary", model).await?;
    let shadow = Upstream::start("shadow", |_req: &Request| Reply::status(500)).await?;
    let envoy = start(
        &config(json!({"cluster": "shadow", "sample_percent": 100, "timeout_ms": 1000, "max_in_flight": 1000})),
        &primary,
        shadow.port(),
    )
    .await?;
    let url = envoy.url(LISTENER, "/");
    let n = 200;
    let failing = Load::new(&url).requests(n).run().await?;
    assert!(failing.iter().all(|r| r.status == 200 && r.json().is_ok()));
    let stats = settled(&envoy, n as f64).await?;
    // Answered 500: compared (a status disagreement) and counted as a compared 5xx, not as a
    // failed call.
    assert_eq!(shadow_counter(&stats, metrics::SHADOW_5XX, &[]), n as f64);
    assert_eq!(shadow_counter(&stats, metrics::SHADOW_ERRORS, &[]), 0.0);
    assert_eq!(
        shadow_counter(&stats, metrics::SHADOW_DISAGREE, &[("field", "status")]),
        n as f64
    );

    shadow.set_behaviour(|_req: &Request| Reply::ok().delay(Duration::from_millis(3000)));
    let slow = Load::new(&url).requests(n).concurrency(16).run().await?;
    assert!(slow.iter().all(|r| r.status == 200));
    let mut latencies: Vec<Duration> = slow.iter().map(|r| r.latency).collect();
    latencies.sort();
    let p99 = latencies[latencies.len() * 99 / 100];
    // The shadow takes 3 s and times out at 1 s: an answer held for the shadow would take at
    // least the timeout, however idle the machine, while one that is not is far below it
    // however loaded.
    assert!(
        p99 < Duration::from_millis(1000),
        "primary p99 {p99:?} with a hanging shadow"
    );
    let admin = envoy.admin();
    wait_until(Duration::from_secs(10), "timeouts counted", || async {
        let s = admin.prometheus().await.unwrap_or_default();
        shadow_counter(&s, metrics::SHADOW_TIMEOUTS, &[]) == n as f64
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
            shadow_counter(&s, metrics::SHADOW_5XX, &[]) == n as f64
        },
    )
    .await?;
    let s = admin.prometheus().await?;
    assert_eq!(shadow_counter(&s, metrics::SHADOW_TIMEOUTS, &[]), 0.0);
    assert_eq!(shadow_counter(&s, metrics::SHADOW_ERRORS, &[]), 0.0);
    // Envoy answers for the unreachable shadow with a 503: what a user of it would have got.
    assert_eq!(
        shadow_counter(&s, metrics::SHADOW_DISAGREE, &[("field", "status")]),
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
        shadow_counter(&stats, metrics::SHADOW_SKIPPED, &[("reason", "body_limit")]),
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
    // Every copy taken is compared or skipped once the shadow has answered.
    let stats = all_copies_ended(&envoy, Duration::from_secs(10)).await?;
    let skipped = shadow_counter(&stats, metrics::SHADOW_SKIPPED, &[("reason", "in_flight")]);
    let compared = shadow_counter(&stats, metrics::SHADOW_COMPARED, &[]);
    assert_eq!(
        shadow_counter(&stats, metrics::SHADOW_REQUESTS, &[]),
        n as f64
    );
    assert_eq!(compared + skipped, n as f64);
    let sent = shadow.count() as f64;
    assert_eq!(sent, compared);
    assert!(
        sent <= 3.0 + 3.0,
        "{sent} copies sent under a cap of 3 within one second"
    );
    assert!(skipped >= (n - 6) as f64);
    Ok(())
}

/// Envoy's resident set (`VmRSS` in `/proc/<pid>/status`), in MiB.
fn rss_mib(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmRSS for pid {pid}"))?;
    Ok(kib / 1024.0)
}

/// Envoy's heap in use (`allocated` of admin `/memory`), in MiB.
async fn heap_mib(envoy: &Envoy) -> anyhow::Result<f64> {
    let v: Value = serde_json::from_str(&envoy.admin().get("/memory").await?)?;
    let bytes: f64 = v["allocated"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no allocated in /memory: {v}"))?;
    Ok(bytes / (1024.0 * 1024.0))
}

/// Peak RSS and heap of Envoy while `load` runs, sampled every 20 ms.
async fn peak_memory(
    envoy: &Envoy,
    load: impl std::future::Future<Output = anyhow::Result<Vec<sluice_tests::Response>>>,
) -> anyhow::Result<(Vec<sluice_tests::Response>, f64, f64)> {
    let pid = envoy.pid();
    let (mut rss, mut heap) = (0.0f64, 0.0f64);
    tokio::pin!(load);
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    loop {
        tokio::select! {
            r = &mut load => {
                rss = rss.max(rss_mib(pid)?);
                heap = heap.max(heap_mib(envoy).await?);
                return Ok((r?, rss, heap));
            }
            _ = tick.tick() => {
                rss = rss.max(rss_mib(pid)?);
                heap = heap.max(heap_mib(envoy).await.unwrap_or(0.0));
            }
        }
    }
}

/// The sum of every fate a copy can end in.
fn fates(stats: &Samples) -> f64 {
    [
        metrics::SHADOW_COMPARED,
        metrics::SHADOW_SKIPPED,
        metrics::SHADOW_TIMEOUTS,
        metrics::SHADOW_ERRORS,
    ]
    .iter()
    .map(|n| shadow_counter(stats, n, &[]))
    .sum()
}

/// Waits until every copy taken has ended in exactly one fate; returns the stats.
async fn all_copies_ended(envoy: &Envoy, within: Duration) -> anyhow::Result<Samples> {
    let admin = envoy.admin();
    let ended = wait_until(within, "every copy taken ended in one fate", || async {
        let s = admin.prometheus().await.unwrap_or_default();
        let taken = shadow_counter(&s, metrics::SHADOW_REQUESTS, &[]);
        taken > 0.0 && taken == fates(&s)
    })
    .await;
    let s = admin.prometheus().await?;
    if let Err(e) = ended {
        anyhow::bail!(
            "{e}: taken {}, compared {}, skipped {:?}, timeouts {}, errors {}",
            shadow_counter(&s, metrics::SHADOW_REQUESTS, &[]),
            shadow_counter(&s, metrics::SHADOW_COMPARED, &[]),
            s.by_label(metrics::SHADOW_SKIPPED, "reason", &L),
            shadow_counter(&s, metrics::SHADOW_TIMEOUTS, &[]),
            shadow_counter(&s, metrics::SHADOW_ERRORS, &[]),
        );
    }
    Ok(s)
}

/// 5 MB answers from both sides at 8 at a time. Before, the filter read every shadow answer
/// whole into the VM (and let Envoy buffer as many as were in flight); now it reads neither
/// answer (both are over `max_body_bytes`: the comparison is by status), and the answers
/// Envoy buffers for it count against `max_bytes_in_flight` (default 8 MiB), so copies over
/// it are skipped and Envoy's memory stays near its idle size.
#[tokio::test]
async fn big_answers_are_not_read_and_memory_stays_bounded() -> anyhow::Result<()> {
    const SIZE: usize = 5 * 1024 * 1024;
    let big = bytes::Bytes::from(vec![b'x'; SIZE]);
    let b2 = big.clone();
    let primary = Upstream::start("primary", move |_req: &Request| {
        Reply::ok().body(big.clone())
    })
    .await?;
    let shadow =
        Upstream::start("shadow", move |_req: &Request| Reply::ok().body(b2.clone())).await?;
    let envoy = start(
        &config(json!({"cluster": "shadow", "sample_percent": 100, "max_in_flight": 1000, "timeout_ms": 10000})),
        &primary,
        shadow.port(),
    )
    .await?;
    let url = envoy.url(LISTENER, "/");
    Load::new(&url).requests(4).concurrency(1).run().await?;
    let (rss0, heap0) = (rss_mib(envoy.pid())?, heap_mib(&envoy).await?);
    let n = 400;
    let (responses, rss, heap) = peak_memory(&envoy, async {
        Ok(Load::new(&url).requests(n).concurrency(8).run().await?)
    })
    .await?;
    assert!(responses
        .iter()
        .all(|r| r.status == 200 && r.body.len() == SIZE));
    let stats = all_copies_ended(&envoy, Duration::from_secs(30)).await?;
    let rss_after = rss_mib(envoy.pid())?;
    let compared = shadow_counter(&stats, metrics::SHADOW_COMPARED, &[]);
    let over = shadow_counter(
        &stats,
        metrics::SHADOW_SKIPPED,
        &[("reason", "bytes_in_flight")],
    );
    eprintln!(
        "[memory] 5 MB answers, {n} requests at 8 at a time: RSS {rss0:.1} MiB idle, peak {rss:.1} MiB, \
         after {rss_after:.1} MiB; heap {heap0:.1} MiB idle, peak {heap:.1} MiB; \
         {compared} compared, {over} skipped over the bytes cap"
    );
    assert_eq!(
        shadow_counter(&stats, metrics::SHADOW_REQUESTS, &[]),
        (n + 4) as f64
    );
    assert!(compared >= 4.0, "{compared} compared");
    assert!(over > 0.0, "no copy skipped over the bytes cap");
    assert_eq!(compared + over, (n + 4) as f64);
    // Compared by status only: neither body was read.
    assert_eq!(
        shadow_counter(&stats, metrics::SHADOW_AGREE, &[("field", "status")]),
        compared
    );
    assert_eq!(
        shadow_counter(&stats, metrics::SHADOW_AGREE, &[("field", "body")])
            + shadow_counter(&stats, metrics::SHADOW_DISAGREE, &[("field", "body")]),
        0.0
    );
    // Reading each 5 MB answer into the VM and letting Envoy buffer 8 of them grew RSS by
    // 31-39 MiB and the heap by 41-44 MiB here; now 0-9 and 12. The bounds leave room for
    // the primary's own streaming buffers, the budget and one answer over it.
    assert!(
        rss - rss0 < 20.0,
        "RSS grew {:.1} MiB under 5 MB shadow answers",
        rss - rss0
    );
    assert!(
        heap - heap0 < 26.0,
        "heap grew {:.1} MiB under 5 MB shadow answers",
        heap - heap0
    );
    Ok(())
}

/// Answers the comparison reads (600 KB, under `max_body_bytes`) with `max_bytes_in_flight`
/// at 4 MiB: what the filter holds never exceeds the cap, copies over it are skipped with
/// their reason, and everything taken ends in one fate.
#[tokio::test]
async fn bytes_in_flight_stay_under_the_cap() -> anyhow::Result<()> {
    const SIZE: usize = 600 * 1024;
    const CAP: f64 = 4.0 * 1024.0 * 1024.0;
    let body = bytes::Bytes::from(vec![b'y'; SIZE]);
    let b2 = body.clone();
    let primary = Upstream::start("primary", move |_req: &Request| {
        Reply::ok()
            .body(body.clone())
            .delay(Duration::from_millis(5))
    })
    .await?;
    let shadow = Upstream::start("shadow", move |_req: &Request| {
        Reply::ok()
            .body(b2.clone())
            .delay(Duration::from_millis(20))
    })
    .await?;
    let envoy = start(
        &config(
            json!({"cluster": "shadow", "sample_percent": 100, "max_in_flight": 1000,
                       "max_body_bytes": 1048576, "max_bytes_in_flight": 4194304}),
        ),
        &primary,
        shadow.port(),
    )
    .await?;
    let admin = envoy.admin();
    let gauge = || async {
        admin
            .prometheus()
            .await
            .ok()
            .and_then(|s| s.get(metrics::SHADOW_BYTES_IN_FLIGHT, &[]))
    };
    let n = 300;
    let url = envoy.url(LISTENER, "/");
    let load = Load::new(&url).requests(n).concurrency(12);
    let run = load.run();
    tokio::pin!(run);
    let (mut peak, mut seen) = (0.0f64, 0);
    let responses = loop {
        tokio::select! {
            r = &mut run => break r?,
            _ = tokio::time::sleep(Duration::from_millis(10)) => {
                if let Some(v) = gauge().await {
                    peak = peak.max(v);
                    seen += 1;
                }
            }
        }
    };
    assert!(responses.iter().all(|r| r.status == 200));
    let stats = all_copies_ended(&envoy, Duration::from_secs(20)).await?;
    let compared = shadow_counter(&stats, metrics::SHADOW_COMPARED, &[]);
    let over = shadow_counter(
        &stats,
        metrics::SHADOW_SKIPPED,
        &[("reason", "bytes_in_flight")],
    );
    eprintln!("[bytes] peak {peak} bytes in flight over {seen} samples; {compared} compared, {over} skipped over the cap");
    assert!(seen > 0, "no sluice_shadow_bytes_in_flight gauge");
    assert!(
        peak > 0.0 && peak <= CAP,
        "peak {peak} bytes in flight, cap {CAP}"
    );
    assert!(over > 0.0, "no copy skipped over the bytes cap");
    assert!(compared > 0.0);
    assert_eq!(compared + over, n as f64);
    // What was compared was read whole: bodies agree.
    assert_eq!(
        shadow_counter(&stats, metrics::SHADOW_AGREE, &[("field", "body")]),
        compared
    );
    // Every byte is given back.
    wait_until(
        Duration::from_secs(5),
        "bytes in flight back to 0",
        || async { gauge().await == Some(0.0) },
    )
    .await?;
    Ok(())
}

/// Errors are split: a compared 5xx answer counts in `sluice_shadow_5xx_total` (and as a
/// status disagreement), a call with no answer to compare — here an answer over Envoy's
/// buffer limit for such calls — in `sluice_shadow_errors_total`, and the fates add up.
#[tokio::test]
async fn compared_5xx_and_failed_calls_are_counted_apart() -> anyhow::Result<()> {
    let primary = Upstream::start("primary", model).await?;
    let over_limit = bytes::Bytes::from(vec![b'z'; 256 * 1024]);
    let shadow = Upstream::start("shadow", move |req: &Request| match user_number(req) % 3 {
        0 => Reply::status(500),
        1 => Reply::ok().body(over_limit.clone()),
        _ => model(req),
    })
    .await?;
    let config = config(json!({"cluster": "shadow", "sample_percent": 100, "max_in_flight": 1000}));
    let envoy = EnvoyConfig::new(FIXTURE)
        .port_to(10001, primary.port())
        .port_to(10002, primary.port())
        .port_to(10003, shadow.port())
        .replace(&sluice_tests::inline_filter_config(FIXTURE)?, &config.to_string())
        // Envoy's limit on an answer it buffers for the filter (default 32 MiB).
        .replace(
            "static_resources:",
            "layered_runtime:\n  layers:\n    - name: static\n      static_layer:\n        http.async_response_buffer_limit: 65536\nstatic_resources:",
        )
        .start()
        .await?;
    let n = 300;
    let r = Load::new(envoy.url(LISTENER, "/"))
        .requests(n)
        .run()
        .await?;
    assert!(r.iter().all(|r| r.status == 200));
    let s = all_copies_ended(&envoy, Duration::from_secs(15)).await?;
    let third = (n / 3) as f64;
    assert_eq!(shadow_counter(&s, metrics::SHADOW_REQUESTS, &[]), n as f64);
    assert_eq!(shadow_counter(&s, metrics::SHADOW_ERRORS, &[]), third);
    assert_eq!(shadow_counter(&s, metrics::SHADOW_5XX, &[]), third);
    assert_eq!(
        shadow_counter(&s, metrics::SHADOW_COMPARED, &[]),
        2.0 * third
    );
    assert_eq!(
        shadow_counter(&s, metrics::SHADOW_DISAGREE, &[("field", "status")]),
        third
    );
    assert_eq!(shadow_counter(&s, metrics::SHADOW_TIMEOUTS, &[]), 0.0);
    Ok(())
}

/// The filter config as the ECDS resource tests/envoy/rollout.yaml watches.
fn ecds_resource(config: &Value) -> String {
    format!(
        r#"version_info: "1"
resources:
  - "@type": type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig
    name: sluice
    typed_config:
      "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
      config:
        name: sluice
        root_id: sluice
        vm_config:
          vm_id: sluice
          runtime: envoy.wasm.runtime.v8
          code:
            local: {{ filename: target/wasm32-wasip1/release/sluice_filter.wasm }}
        configuration:
          "@type": type.googleapis.com/google.protobuf.StringValue
          value: '{config}'
"#
    )
}

const ECDS_UPDATES: &str = "extension_config_discovery.http_filter.sluice.update_success";

/// Pushes `config` through the watched directory and waits until Envoy took it.
async fn push(envoy: &Envoy, config: &Value) -> anyhow::Result<()> {
    let admin = envoy.admin();
    let before = admin.stat(ECDS_UPDATES).await?.unwrap_or(0);
    envoy.write_ecds("sluice.yaml", &ecds_resource(config))?;
    wait_until(Duration::from_secs(10), "config push taken", || async {
        admin.stat(ECDS_UPDATES).await.ok().flatten().unwrap_or(0) > before
    })
    .await?;
    Ok(())
}

/// A 250 ms shadow at about 100 requests a second while the config is pushed five times (as
/// every stage change does): the copies in flight at each push are still compared, under the
/// config they started with, and every copy taken ends in exactly one fate. Before, each push
/// lost the copies in flight: counted as taken, never as anything else.
#[tokio::test]
async fn config_pushes_lose_no_copies_in_flight() -> anyhow::Result<()> {
    let primary = Upstream::start("primary", |req: &Request| {
        model(req).delay(Duration::from_millis(30))
    })
    .await?;
    let shadow = Upstream::start("shadow", |req: &Request| {
        model(req).delay(Duration::from_millis(250))
    })
    .await?;
    let envoy = EnvoyConfig::new("tests/envoy/rollout.yaml")
        .ecds("tests/envoy/rollout")
        .port_to(10001, primary.port())
        .port_to(10002, primary.port())
        .port_to(10003, shadow.port())
        .start()
        .await?;
    let field: Value = serde_json::from_str(SCORE_FIELD)?;
    let with_revision = |r: u32| {
        let mut c = config(
            json!({"cluster": "shadow", "sample_percent": 100, "max_in_flight": 1000,
                                  "timeout_ms": 5000, "compare": {"fields": [field.clone()]}}),
        );
        c["revision"] = json!(format!("push-{r}"));
        c
    };
    push(&envoy, &with_revision(0)).await?;
    let n = 600;
    let url = envoy.url(LISTENER, "/");
    let load = Load::new(&url).requests(n).concurrency(4);
    let run = load.run();
    tokio::pin!(run);
    let mut pushes = 0;
    let responses = loop {
        tokio::select! {
            r = &mut run => break r?,
            _ = tokio::time::sleep(Duration::from_millis(600)), if pushes < 5 => {
                pushes += 1;
                push(&envoy, &with_revision(pushes)).await?;
            }
        }
    };
    assert!(responses.iter().all(|r| r.status == 200));
    assert!(pushes >= 3, "only {pushes} pushes during the load");
    let s = all_copies_ended(&envoy, Duration::from_secs(15)).await?;
    assert_eq!(shadow_counter(&s, metrics::SHADOW_REQUESTS, &[]), n as f64);
    // Nothing was skipped either: every copy was compared, and agreed.
    assert_eq!(shadow_counter(&s, metrics::SHADOW_COMPARED, &[]), n as f64);
    assert_eq!(
        shadow_counter(&s, metrics::SHADOW_AGREE, &[("field", "score")]),
        n as f64
    );
    assert!(
        !envoy.log().contains("replaced configuration"),
        "a replaced config's root context could not finish"
    );
    Ok(())
}

/// A proxy whose shadow cluster leads back into a listener running the Sluice filter with the
/// same configuration, as the shadow service's own sidecar does in a mesh: `ingress`
/// (port 10000) serves users from `stable` (10001) and copies to the cluster `shadow`, which
/// is the listener `sidecar` (10004) of the same Envoy; `sidecar` runs the same filter config
/// (so it would copy again, to itself) and forwards to the shadow service (10003).
const LOOP_YAML: &str = r#"
node: { id: sluice-loop-test, cluster: sluice-loop-test }
admin:
  address:
    socket_address: { address: 127.0.0.1, port_value: 9901 }
stats_flush_interval: 1s
stats_config:
  stats_tags:
    - { tag_name: experiment, regex: '(experiment=\.=(.*?);\.;)' }
    - { tag_name: variant, regex: '(variant=\.=(.*?);\.;)' }
    - { tag_name: class, regex: '(class=\.=(.*?);\.;)' }
    - { tag_name: field, regex: '(field=\.=(.*?);\.;)' }
    - { tag_name: reason, regex: '(reason=\.=(.*?);\.;)' }
static_resources:
  listeners:
    - name: ingress
      address: { socket_address: { address: 127.0.0.1, port_value: 10000 } }
      filter_chains:
        - filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                stat_prefix: ingress
                route_config:
                  virtual_hosts:
                    - { name: all, domains: ["*"], routes: [{ match: { prefix: / }, route: { cluster: stable } }] }
                http_filters:
                  - name: sluice
                    typed_config: &sluice
                      "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
                      config:
                        name: sluice
                        root_id: sluice
                        vm_config:
                          vm_id: sluice
                          runtime: envoy.wasm.runtime.v8
                          code: { local: { filename: target/wasm32-wasip1/release/sluice_filter.wasm } }
                        configuration:
                          "@type": type.googleapis.com/google.protobuf.StringValue
                          value: 'FILTER_CONFIG'
                  - name: envoy.filters.http.router
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
    - name: sidecar
      address: { socket_address: { address: 127.0.0.1, port_value: 10004 } }
      filter_chains:
        - filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                stat_prefix: sidecar
                route_config:
                  virtual_hosts:
                    - { name: all, domains: ["*"], routes: [{ match: { prefix: / }, route: { cluster: shadow_app } }] }
                http_filters:
                  - name: sluice
                    typed_config: *sluice
                  - name: envoy.filters.http.router
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
    - name: stable
      type: STATIC
      load_assignment:
        cluster_name: stable
        endpoints: [{ lb_endpoints: [{ endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: 10001 } } } }] }]
    - name: shadow
      type: STATIC
      load_assignment:
        cluster_name: shadow
        endpoints: [{ lb_endpoints: [{ endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: 10004 } } } }] }]
    - name: shadow_app
      type: STATIC
      load_assignment:
        cluster_name: shadow_app
        endpoints: [{ lb_endpoints: [{ endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: 10003 } } } }] }]
"#;

const QA_TOKEN: &str = "qa-token-0123456789abcdef";

/// A bounded number of user requests through a shadow cluster that loops back into a Sluice
/// filter yields exactly that many copies: the copy's marker is trusted by the next filter
/// (same secret), which forwards it to the shadow service without counting or copying it.
/// Client-sent `x-sluice-shadow` headers — the bare `1` and a forged marker — are removed
/// and do not keep a request from being counted and copied; the override token reaches
/// neither the primary nor the shadow. Before, the 3 requests of the report became 1,813 in
/// 6 s.
#[tokio::test]
async fn copies_that_loop_back_are_neither_counted_nor_copied_again() -> anyhow::Result<()> {
    let primary = Upstream::start("primary", model).await?;
    let shadow = Upstream::start("shadow", model).await?;
    let mut filter =
        config(json!({"cluster": "shadow", "sample_percent": 100, "max_in_flight": 1000}));
    filter["experiments"][0]["override"] = json!({"token": QA_TOKEN});
    let dir = tempfile::tempdir()?;
    let yaml = dir.path().join("loop.yaml");
    std::fs::write(
        &yaml,
        LOOP_YAML.replace("FILTER_CONFIG", &filter.to_string()),
    )?;
    let envoy = EnvoyConfig::new(&yaml)
        .port_to(10001, primary.port())
        .port_to(10003, shadow.port())
        .start()
        .await?;
    let url = envoy.url(LISTENER, "/predict");
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis();
    let forged = format!("v1.{now_ms}.000000000000002a.{}", "0".repeat(32));
    let per_kind = 30;
    let users = |base: usize| move |i: usize| format!("user-{}", base + i);
    // Plain requests, a client's bare marker, a forged marker: all users' requests, all
    // with the override token but no override asked for.
    for (base, marker) in [(0, None), (100, Some("1")), (200, Some(forged.as_str()))] {
        let mut load = Load::new(&url)
            .requests(per_kind)
            .users(users(base))
            .header("x-sluice-override-token", QA_TOKEN);
        if let Some(m) = marker {
            load = load.header("x-sluice-shadow", m);
        }
        let r = load.run().await?;
        assert!(r.iter().all(|r| r.status == 200));
    }
    // QA overrides with the token: routed, not counted, not copied.
    let qa = Load::new(&url)
        .requests(10)
        .users(users(300))
        .header("x-sluice-override", "stable")
        .header("x-sluice-override-token", QA_TOKEN)
        .run()
        .await?;
    assert!(qa.iter().all(|r| r.status == 200));
    let users_counted = 3 * per_kind;

    let s = all_copies_ended(&envoy, Duration::from_secs(15)).await?;
    // No growth: a second later the shadow service has still seen exactly one copy each.
    let admin = envoy.admin();
    let steady = wait_until(Duration::from_secs(1), "more copies arriving", || async {
        shadow.count() > users_counted as u64
    })
    .await;
    assert!(steady.is_err(), "copies kept coming: {}", shadow.count());
    let s2 = admin.prometheus().await?;
    assert_eq!(shadow.count(), users_counted as u64);
    for stats in [&s, &s2] {
        // Counted once each, at the ingress; the copies were not counted at the sidecar.
        assert_eq!(stats.sum(metrics::REQUESTS, &L), users_counted as f64);
        assert_eq!(stats.sum(metrics::OVERRIDES, &L), 10.0);
        assert_eq!(
            shadow_counter(stats, metrics::SHADOW_REQUESTS, &[]),
            users_counted as f64
        );
        assert_eq!(
            shadow_counter(stats, metrics::SHADOW_COMPARED, &[]),
            users_counted as f64
        );
    }
    // The primary saw no marker and no token; the shadow service saw a real marker on every
    // copy, and no token.
    let seen = primary.requests();
    assert_eq!(seen.len(), users_counted + 10);
    for r in &seen {
        assert_eq!(
            r.header("x-sluice-shadow"),
            None,
            "marker reached the primary"
        );
        assert_eq!(
            r.header("x-sluice-override-token"),
            None,
            "token reached the primary"
        );
    }
    for c in shadow.requests() {
        assert_eq!(
            c.header("x-sluice-override-token"),
            None,
            "token reached the shadow"
        );
        let m = c.header("x-sluice-shadow").unwrap_or_default();
        assert!(
            m.starts_with("v1.") && m != forged,
            "copy with marker {m:?}"
        );
    }
    Ok(())
}
