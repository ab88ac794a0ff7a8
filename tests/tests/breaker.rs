//! The data-plane breaker against a real Envoy with two workers (`tests/envoy/rollout.yaml`,
//! its listener balancing connections exactly over the workers): a canary answering 20 % 5xx is
//! taken out of traffic, process-wide, within a second of its first failing answer; an A/A run
//! at the control's natural error rate does not trip it; a trip made on one worker holds on the
//! other; a new revision clears it; connection failures (canary down), timeouts and bodies cut
//! off after a 200 count.
//!
//! Timing is measured, not slept: the canary upstream records when it sent its first failing
//! answer and when it received every request; the bound asserted (1 s) is the one the breaker
//! promises (issue 17), and the test's own work per request is a vector push.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use sluice_controller::sink::ecds_file::{render, WasmCode};
use sluice_filter::config::FilterConfig;
use sluice_filter::metrics;
use sluice_tests::{
    filter_wasm, wait_until, Envoy, EnvoyConfig, HttpClient, Reply, Request, Upstream,
};
use tokio::net::TcpStream;

const LISTENER: u16 = 10000;
const EXPERIMENT: &str = "r";

/// The breaker of these tests: a low `min_requests` so that a canary at half the traffic can
/// be judged a few hundred milliseconds into a fault; the default significance.
fn breaker() -> Value {
    json!({"window_seconds": 10, "min_requests": 20, "max_error_rate": 0.05,
           "max_ratio_to_control": 3.0})
}

/// The breaker of the 1 s test: as [`breaker`] with a 1 % ceiling. Against 5 % a 20 % failure
/// rate needs 14–27 failures to be told apart at the default significance, which at this
/// traffic is 0.6–0.9 s of the second (measured): the test would check the statistics' margin
/// more than the filter. Against 1 % it is evident within a few hundred milliseconds, so the
/// bound checks what the filter adds: the tick, the shared data and every worker following.
fn sensitive_breaker() -> Value {
    json!({"window_seconds": 10, "min_requests": 20, "max_error_rate": 0.01,
           "max_ratio_to_control": 3.0})
}

/// Experiment `r` with the canary at `weight` %, the given breaker, under push `version`.
fn config(weight: f64, breaker: Option<Value>, version: u64) -> anyhow::Result<FilterConfig> {
    let mut experiment = json!({
        "name": EXPERIMENT,
        "unit": {"type": "user", "keys": [{"header": "x-user-id"}]},
        "variants": [{"name": "stable", "control": true}, {"name": "canary", "weight": weight}],
        "echo": {"header": "x-sluice-variant"},
    });
    if let Some(b) = breaker {
        experiment["breaker"] = b;
    }
    Ok(serde_json::from_value(json!({
        "version": 1,
        "revision": format!("{version}@{version}000"),
        "experiments": [experiment],
    }))?)
}

fn code() -> anyhow::Result<WasmCode> {
    Ok(WasmCode {
        filename: filter_wasm()?.display().to_string(),
        remote: None,
        vm_id: "sluice".into(),
        root_id: "sluice".into(),
        runtime: "envoy.wasm.runtime.v8".into(),
    })
}

/// An Envoy with two workers; new connections go to the worker with the fewest (exact
/// balance), so two connections opened one after the other land on different workers.
async fn envoy(stable: u16, canary: u16) -> anyhow::Result<Envoy> {
    Ok(EnvoyConfig::new("tests/envoy/rollout.yaml")
        .port_to(10001, stable)
        .port_to(10002, canary)
        .ecds("tests/envoy/rollout")
        .replace(
            "      filter_chains:\n",
            "      connection_balance_config: { exact_balance: {} }\n      filter_chains:\n",
        )
        .concurrency(2)
        .start()
        .await?)
}

/// Writes the configuration and waits until the revision gauge shows it.
async fn push(envoy: &Envoy, config: &FilterConfig, version: u64) -> anyhow::Result<()> {
    envoy.write_ecds("sluice.yaml", &render("sluice", &code()?, config, version)?)?;
    wait_until(Duration::from_secs(30), "the pushed revision", || async {
        gauge(envoy, metrics::CONFIG_REVISION, &[]).await == Some(version as f64)
    })
    .await?;
    Ok(())
}

/// A sample of the experiment's metrics, with extra label filters.
async fn gauge(envoy: &Envoy, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let prom = envoy.admin().prometheus().await.ok()?;
    let mut filter = vec![("experiment", EXPERIMENT)];
    filter.extend_from_slice(labels);
    prom.get(name, &filter)
}

async fn tripped(envoy: &Envoy) -> Option<f64> {
    gauge(envoy, metrics::BREAKER_TRIPPED, &[("variant", "canary")]).await
}

async fn trips(envoy: &Envoy) -> f64 {
    match envoy.admin().prometheus().await {
        Ok(p) => p.sum(
            metrics::BREAKER_TRIPS,
            &[("experiment", EXPERIMENT), ("variant", "canary")],
        ),
        Err(_) => f64::NAN,
    }
}

/// Envoy's log time (`[YYYY-MM-DD HH:MM:SS.mmm]`, UTC on the test machines) of a log line, as
/// a wall-clock time on today's date.
fn log_time(line: &str) -> Option<SystemTime> {
    let clock = line.get(12..24)?;
    let mut parts = clock.split(':');
    let h: u64 = parts.next()?.parse().ok()?;
    let m: u64 = parts.next()?.parse().ok()?;
    let s: f64 = parts.next()?.parse().ok()?;
    let today = SystemTime::now().duration_since(UNIX_EPOCH).ok()?.as_secs() / 86_400;
    Some(
        UNIX_EPOCH
            + Duration::from_secs(today * 86_400 + h * 3600 + m * 60)
            + Duration::from_secs_f64(s),
    )
}

/// The wall-clock time of an `Instant` in the past.
fn wall_of(t: Instant) -> SystemTime {
    SystemTime::now() - t.elapsed()
}

/// A canary that fails every `every`-th request with `status` and remembers when it first did.
struct Faulty {
    first_failure: Arc<Mutex<Option<Instant>>>,
    failing: Arc<AtomicBool>,
}

impl Faulty {
    fn new() -> Faulty {
        Faulty {
            first_failure: Arc::new(Mutex::new(None)),
            failing: Arc::new(AtomicBool::new(false)),
        }
    }

    fn behaviour(&self, every: u64, status: u16) -> impl Fn(&Request) -> Reply + Send + Sync {
        let n = AtomicU64::new(0);
        let first = self.first_failure.clone();
        let failing = self.failing.clone();
        move |_: &Request| {
            let i = n.fetch_add(1, Ordering::Relaxed);
            if failing.load(Ordering::Relaxed) && i.is_multiple_of(every) {
                let mut f = first.lock().unwrap_or_else(|p| p.into_inner());
                f.get_or_insert_with(Instant::now);
                return Reply::status(status).header("x-upstream", "canary");
            }
            Reply::ok().header("x-upstream", "canary")
        }
    }

    fn first(&self) -> Option<Instant> {
        *self.first_failure.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Open-loop traffic of distinct users at `rate` requests/s (cycling over `users` ids) until
/// stopped; answers are not awaited before the next request is sent.
struct Traffic {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Traffic {
    fn start(url: String, rate: u32, users: u64, headers: Vec<(String, String)>) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let (flag, count) = (stop.clone(), sent.clone());
        let task = tokio::spawn(async move {
            let client = HttpClient::new().with_timeout(Duration::from_secs(5));
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut i: u64 = 0;
            let mut tasks = tokio::task::JoinSet::new();
            while !flag.load(Ordering::Relaxed) {
                tick.tick().await;
                let (client, url) = (client.clone(), url.clone());
                let user = format!("u-{}", i % users);
                let headers = headers.clone();
                i += 1;
                count.fetch_add(1, Ordering::Relaxed);
                tasks.spawn(async move {
                    let mut h: Vec<(&str, &str)> = vec![("x-user-id", user.as_str())];
                    h.extend(headers.iter().map(|(k, v)| (k.as_str(), v.as_str())));
                    let _ = client
                        .send(hyper::Method::GET, &url, &h, Vec::<u8>::new())
                        .await;
                });
                while tasks.try_join_next().is_some() {}
            }
            while tasks.join_next().await.is_some() {}
        });
        Traffic { stop, sent, task }
    }

    async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        self.sent.load(Ordering::Relaxed)
    }
}

/// The user ids of `u-0..u-<n>` the canary (at its weight) gets, by asking the filter's own
/// assignment (`sluice_filter::request::variant_of_key`) through the parsed plan.
fn canary_users(config: &FilterConfig, n: u64) -> anyhow::Result<Vec<String>> {
    let plan = sluice_filter::config::Plan::from_config(config)?;
    let exp = plan
        .experiments
        .first()
        .ok_or_else(|| anyhow::anyhow!("no experiment"))?;
    let canary = exp
        .variant_index("canary")
        .ok_or_else(|| anyhow::anyhow!("no canary"))?;
    Ok((0..n)
        .map(|i| format!("u-{i}"))
        .filter(|u| sluice_filter::request::variant_of_key(exp, u.as_bytes()) == canary)
        .collect())
}

/// One HTTP/1.1 connection, kept open: Envoy serves all its requests on the one worker that
/// accepted it.
struct Connection {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    authority: String,
}

impl Connection {
    async fn open(envoy: &Envoy) -> anyhow::Result<Connection> {
        let addr = envoy.addr(LISTENER);
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        Ok(Connection {
            sender,
            authority: addr.to_string(),
        })
    }

    /// The variant a user gets on this connection (the echoed routing header) and the status.
    async fn variant_of(&mut self, user: &str) -> anyhow::Result<(String, u16)> {
        self.sender.ready().await?;
        let req = hyper::Request::get("/predict")
            .header("host", &self.authority)
            .header("x-user-id", user)
            .body(Full::new(Bytes::new()))?;
        let resp = self.sender.send_request(req).await?;
        let status = resp.status().as_u16();
        let variant = resp
            .headers()
            .get("x-sluice-variant")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("<none>")
            .to_string();
        let _ = resp.into_body().collect().await?;
        Ok((variant, status))
    }
}

/// Envoy's per-worker count of active connections on the listener, by worker index.
async fn connections_per_worker(envoy: &Envoy) -> anyhow::Result<Vec<u64>> {
    let stats = envoy.admin().stats().await?;
    Ok((0..2)
        .map(|w| {
            stats
                .0
                .iter()
                .filter(|(k, _)| {
                    k.starts_with("listener.127.0.0.1_")
                        && k.ends_with(&format!(".worker_{w}.downstream_cx_active"))
                })
                .map(|(_, v)| *v)
                .sum()
        })
        .collect())
}

#[tokio::test]
async fn a_canary_answering_20_percent_5xx_is_out_of_traffic_within_a_second() -> anyhow::Result<()>
{
    let stable = Upstream::start("stable", |_: &Request| {
        Reply::ok().header("x-upstream", "stable")
    })
    .await?;
    let faulty = Faulty::new();
    let canary = Upstream::start("canary", faulty.behaviour(5, 503)).await?;
    let envoy = envoy(stable.port(), canary.port()).await?;
    let cfg = config(50.0, Some(sensitive_breaker()), 7)?;
    push(&envoy, &cfg, 7).await?;
    assert_eq!(tripped(&envoy).await, Some(0.0), "not tripped at the start");
    // Healthy traffic first: both variants serve, the breaker counts without tripping.
    let url = envoy.url(LISTENER, "/predict");
    let traffic = Traffic::start(url.clone(), 400, 100_000, vec![]);
    wait_until(Duration::from_secs(30), "canary traffic", || async {
        canary.count() >= 50
    })
    .await?;
    // The fault: every 5th canary answer is a 503 from now on.
    faulty.failing.store(true, Ordering::Relaxed);
    wait_until(Duration::from_secs(30), "the breaker trips", || async {
        tripped(&envoy).await == Some(1.0)
    })
    .await?;
    // Traffic goes on for a while after the trip: the canary must stay out of it.
    let tripped_seen = Instant::now();
    wait_until(
        Duration::from_secs(30),
        "stable traffic after the trip",
        || async {
            stable
                .requests()
                .iter()
                .filter(|r| r.received_at > tripped_seen)
                .count()
                >= 200
        },
    )
    .await?;
    traffic.stop().await;
    let first = faulty
        .first()
        .ok_or_else(|| anyhow::anyhow!("the canary never failed"))?;
    let last = canary
        .requests()
        .iter()
        .map(|r| r.received_at)
        .max()
        .ok_or_else(|| anyhow::anyhow!("no canary request"))?;
    let out_after = last.saturating_duration_since(first);
    eprintln!(
        "first failing answer → the canary's last request: {:.0} ms",
        out_after.as_secs_f64() * 1e3
    );
    assert!(
        out_after <= Duration::from_secs(1),
        "the canary got requests {out_after:?} after its first failing answer"
    );
    assert_eq!(
        envoy.admin().prometheus().await?.sum(
            metrics::BREAKER_TRIPS,
            &[
                ("experiment", EXPERIMENT),
                ("variant", "canary"),
                ("reason", "5xx")
            ]
        ),
        1.0,
        "one trip, reason 5xx"
    );
    // The users the canary had now get the control; the log says why, with the numbers.
    let mut conn = Connection::open(&envoy).await?;
    for user in canary_users(&cfg, 200)?.iter().take(20) {
        assert_eq!(conn.variant_of(user).await?.0, "stable", "user {user}");
    }
    let log = envoy.log();
    let line = log
        .lines()
        .find(|l| l.contains("breaker tripped"))
        .ok_or_else(|| anyhow::anyhow!("no breaker log line in:\n{}", envoy.log_tail(30)))?;
    eprintln!("{line}");
    // The trip's own log time against the canary's last request: the propagation to every
    // worker plus the requests already on their way.
    if let Some(at) = log_time(line) {
        let last_wall = wall_of(last);
        let ms = match last_wall.duration_since(at) {
            Ok(d) => d.as_secs_f64() * 1e3,
            Err(e) => -e.duration().as_secs_f64() * 1e3,
        };
        eprintln!("trip logged → the canary's last request: {ms:.0} ms");
    }
    for part in [
        "experiment r",
        "variant canary",
        "control",
        "p-value",
        "revision 7",
    ] {
        assert!(line.contains(part), "{part:?} missing from {line:?}");
    }
    Ok(())
}

#[tokio::test]
async fn a_trip_on_one_worker_holds_on_the_other_until_a_new_revision() -> anyhow::Result<()> {
    let stable = Upstream::start("stable", |_: &Request| {
        Reply::ok().header("x-upstream", "stable")
    })
    .await?;
    let faulty = Faulty::new();
    let canary = Upstream::start("canary", faulty.behaviour(2, 500)).await?;
    let envoy = envoy(stable.port(), canary.port()).await?;
    let cfg = config(50.0, Some(breaker()), 3)?;
    push(&envoy, &cfg, 3).await?;
    let users = canary_users(&cfg, 400)?;
    anyhow::ensure!(users.len() >= 100, "only {} canary users", users.len());
    // Two connections, one per worker (exact balance: the second goes to the idle worker).
    let mut a = Connection::open(&envoy).await?;
    a.variant_of("u-0").await?;
    let mut b = Connection::open(&envoy).await?;
    b.variant_of("u-0").await?;
    let per_worker = connections_per_worker(&envoy).await?;
    assert_eq!(per_worker, vec![1, 1], "one connection per worker");
    // Before: worker B sends the canary's users to the canary.
    for user in users.iter().take(5) {
        assert_eq!(b.variant_of(user).await?.0, "canary", "user {user} on B");
    }
    // Only worker A sees the failing canary (every 2nd answer a 500), until it trips.
    faulty.failing.store(true, Ordering::Relaxed);
    let mut sent = 0;
    for user in users.iter().cycle().take(2000) {
        sent += 1;
        if a.variant_of(user).await?.0 == "stable" {
            break;
        }
    }
    assert!(sent < 2000, "worker A never took the canary out");
    // Worker B, which saw no failure, follows the trip made on A: asked back to back, the
    // time until it answers with the control is the propagation between workers (≤ one tick
    // of B, 100 ms, plus the request's own time).
    let on_a = Instant::now();
    let first = users.first().cloned().unwrap_or_default();
    let mut propagated = None;
    while on_a.elapsed() < Duration::from_secs(5) {
        if b.variant_of(&first).await?.0 == "stable" {
            propagated = Some(on_a.elapsed());
            break;
        }
    }
    let propagated = propagated.ok_or_else(|| anyhow::anyhow!("worker B never followed"))?;
    eprintln!(
        "trip seen on worker A → worker B routes to the control: {:.0} ms",
        propagated.as_secs_f64() * 1e3
    );
    for user in users.iter().take(50) {
        assert_eq!(b.variant_of(user).await?.0, "stable", "{user} on B");
    }
    assert_eq!(tripped(&envoy).await, Some(1.0));
    assert_eq!(trips(&envoy).await, 1.0, "tripped once, by one worker");
    // A new revision (same weights, the canary healthy again) clears the trip everywhere.
    faulty.failing.store(false, Ordering::Relaxed);
    push(&envoy, &config(50.0, Some(breaker()), 4)?, 4).await?;
    wait_until(Duration::from_secs(30), "the gauge cleared", || async {
        tripped(&envoy).await == Some(0.0)
    })
    .await?;
    // Both workers serve the canary again (each connection stays on its worker; its new
    // streams take the new configuration).
    for user in users.iter().take(20) {
        assert_eq!(
            a.variant_of(user).await?.0,
            "canary",
            "{user} on A after the new revision"
        );
        assert_eq!(
            b.variant_of(user).await?.0,
            "canary",
            "{user} on B after the new revision"
        );
    }
    // The counter keeps the trip for the controller.
    assert_eq!(trips(&envoy).await, 1.0);
    Ok(())
}

#[tokio::test]
async fn an_a_a_run_at_half_a_percent_errors_does_not_trip() -> anyhow::Result<()> {
    // Both variants fail 0.5 % of requests, independently at random (seeded per upstream).
    let natural = |seed: u64| {
        let state = AtomicU64::new(seed);
        move |_: &Request| {
            // xorshift64*: a private stream per upstream.
            let mut x = state.load(Ordering::Relaxed);
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            state.store(x, Ordering::Relaxed);
            let u = (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64;
            if u < 0.005 {
                Reply::status(503)
            } else {
                Reply::ok()
            }
        }
    };
    let stable = Upstream::start("stable", natural(0x9e37_79b9_7f4a_7c15)).await?;
    let canary = Upstream::start("canary", natural(0xd1b5_4a32_d192_ed03)).await?;
    let envoy = envoy(stable.port(), canary.port()).await?;
    let cfg = config(50.0, Some(breaker()), 5)?;
    push(&envoy, &cfg, 5).await?;
    let traffic = Traffic::start(envoy.url(LISTENER, "/predict"), 250, 100_000, vec![]);
    // 6,000 requests (about 24 s at the offered rate), checked as they go.
    let failed = Arc::new(AtomicU64::new(0));
    wait_until(Duration::from_secs(180), "6,000 A/A requests", || {
        let failed = failed.clone();
        let envoy = &envoy;
        let (stable, canary) = (&stable, &canary);
        async move {
            if tripped(envoy).await == Some(1.0) {
                failed.store(1, Ordering::Relaxed);
                return true;
            }
            stable.count() + canary.count() >= 6000
        }
    })
    .await?;
    traffic.stop().await;
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "the breaker tripped at A/A"
    );
    assert_eq!(tripped(&envoy).await, Some(0.0));
    assert_eq!(trips(&envoy).await, 0.0);
    let prom = envoy.admin().prometheus().await?;
    let errors = prom.sum(
        metrics::RESPONSES,
        &[("experiment", EXPERIMENT), ("class", "5xx")],
    );
    assert!(errors >= 10.0, "the run had errors to count ({errors})");
    // The same set-up does trip once the canary fails for real, so the breaker was live.
    canary.set_behaviour(|_: &Request| Reply::status(503));
    let traffic = Traffic::start(envoy.url(LISTENER, "/predict"), 250, 100_000, vec![]);
    wait_until(Duration::from_secs(30), "a real fault trips it", || async {
        tripped(&envoy).await == Some(1.0)
    })
    .await?;
    traffic.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_canary_that_is_down_or_times_out_trips_with_its_reason() -> anyhow::Result<()> {
    let stable = Upstream::start("stable", |_: &Request| Reply::ok()).await?;
    // Down: the canary's port has nothing listening (connection refused → Envoy's local reply).
    let down = sluice_tests::free_port()?;
    let envoy = envoy(stable.port(), down).await?;
    push(&envoy, &config(50.0, Some(breaker()), 9)?, 9).await?;
    let traffic = Traffic::start(envoy.url(LISTENER, "/predict"), 200, 100_000, vec![]);
    wait_until(Duration::from_secs(30), "the breaker trips", || async {
        tripped(&envoy).await == Some(1.0)
    })
    .await?;
    traffic.stop().await;
    let prom = envoy.admin().prometheus().await?;
    let by_reason = prom.by_label(
        metrics::BREAKER_TRIPS,
        "reason",
        &[("experiment", EXPERIMENT), ("variant", "canary")],
    );
    let total: f64 = by_reason.values().sum();
    assert_eq!(total, 1.0, "{by_reason:?}");
    let reason = by_reason
        .iter()
        .find(|(_, v)| **v == 1.0)
        .map(|(k, _)| k.clone())
        .unwrap_or_default();
    assert!(
        reason == "reset" || reason == "local_reply",
        "an unreachable canary trips for reset or local_reply, got {by_reason:?}"
    );
    drop(envoy);
    // Timeouts: the canary answers after its route's timeout (100 ms).
    let slow = Upstream::start("canary", |_: &Request| {
        Reply::ok().delay(Duration::from_millis(400))
    })
    .await?;
    let envoy = EnvoyConfig::new("tests/envoy/rollout.yaml")
        .port_to(10001, stable.port())
        .port_to(10002, slow.port())
        .ecds("tests/envoy/rollout")
        .replace(
            "route: { cluster: canary }",
            "route: { cluster: canary, timeout: 0.1s }",
        )
        .concurrency(2)
        .start()
        .await?;
    push(&envoy, &config(50.0, Some(breaker()), 10)?, 10).await?;
    let traffic = Traffic::start(envoy.url(LISTENER, "/predict"), 200, 100_000, vec![]);
    wait_until(
        Duration::from_secs(30),
        "the breaker trips on timeouts",
        || async { tripped(&envoy).await == Some(1.0) },
    )
    .await?;
    traffic.stop().await;
    let prom = envoy.admin().prometheus().await?;
    assert_eq!(
        prom.sum(
            metrics::BREAKER_TRIPS,
            &[
                ("experiment", EXPERIMENT),
                ("variant", "canary"),
                ("reason", "timeout")
            ]
        ),
        1.0,
        "{:?}",
        prom.by_label(metrics::BREAKER_TRIPS, "reason", &[])
    );
    Ok(())
}

#[tokio::test]
async fn without_a_breaker_nothing_trips() -> anyhow::Result<()> {
    let stable = Upstream::start("stable", |_: &Request| Reply::ok()).await?;
    let canary = Upstream::start("canary", |_: &Request| Reply::status(503)).await?;
    let envoy = envoy(stable.port(), canary.port()).await?;
    push(&envoy, &config(50.0, None, 2)?, 2).await?;
    let responses = sluice_tests::Load::new(envoy.url(LISTENER, "/predict"))
        .requests(400)
        .concurrency(8)
        .users(|i| format!("u-{i}"))
        .run()
        .await?;
    let to_canary = responses.iter().filter(|r| r.status == 503).count();
    assert!(to_canary > 100, "the canary kept serving: {to_canary}");
    assert_eq!(
        tripped(&envoy).await,
        None,
        "no breaker metrics without a breaker"
    );
    Ok(())
}

/// A canary whose answers start as 200 and are cut off mid-body: the response headers alone
/// say success, so the breaker must read the stream's flags at its end (the response never
/// ended) to count the reset.
#[tokio::test]
async fn a_canary_cutting_its_bodies_after_a_200_trips_for_reset() -> anyhow::Result<()> {
    let stable = Upstream::start("stable", |_: &Request| Reply::ok()).await?;
    let cutter = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let cut_port = cutter.local_addr()?.port();
    let serving = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut socket, _)) = cutter.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                // One request per connection: headers, then half the promised body, then close.
                if socket.read(&mut buf).await.unwrap_or(0) > 0 {
                    let _ = socket
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{\"half\":")
                        .await;
                    let _ = socket.flush().await;
                }
            });
        }
    });
    let envoy = envoy(stable.port(), cut_port).await?;
    push(&envoy, &config(50.0, Some(breaker()), 11)?, 11).await?;
    let traffic = Traffic::start(envoy.url(LISTENER, "/predict"), 200, 100_000, vec![]);
    wait_until(
        Duration::from_secs(30),
        "the breaker trips on cut bodies",
        || async { tripped(&envoy).await == Some(1.0) },
    )
    .await?;
    traffic.stop().await;
    serving.abort();
    let prom = envoy.admin().prometheus().await?;
    assert_eq!(
        prom.sum(
            metrics::BREAKER_TRIPS,
            &[
                ("experiment", EXPERIMENT),
                ("variant", "canary"),
                ("reason", "reset")
            ]
        ),
        1.0,
        "{:?}",
        prom.by_label(metrics::BREAKER_TRIPS, "reason", &[])
    );
    Ok(())
}
