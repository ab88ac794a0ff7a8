//! Synthetic users: an open-loop load of `GET /predict?item=…` requests through Envoy from a
//! population of users `u-0` … `u-<N-1>`, each request carrying `x-user-id`.
//!
//! After an answer the user "looks" at it: with probability equal to the answer's `relevance`
//! (the served model's quality) it sends the click beacon `POST /sluice/event?name=click` with
//! the same user id and the exposure token the answer carried (`x-sluice-exposure`), and after
//! a click, less often, `name=purchase`. The filter answers beacons itself, checks the token
//! and attributes the event to the variant that served the answer, so conversion per variant
//! is measured the way a real product would measure it.
//!
//! The SRM fault: a buggy client that drops `x-user-id` on a share of the requests of users in
//! the treatment. Whether a user is in the treatment is decided by
//! [`sluice_filter::request::variant_of_key`] on the experiment's checked plan at the current
//! weight — the filter's own code — so exactly those users' requests fall to the control.
//!
//! Everything random is drawn from (seed, request number); the load is bounded by a duration
//! and a request count and stops by itself. [`Tallies`] keep what the users saw per variant.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Method;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};
use sluice_filter::config::Experiment;
use sluice_filter::request::variant_of_key;

use crate::rng::Draws;

/// Random streams, so request choices and beacon choices never share draws.
const STREAM_REQUEST: u64 = 1;

/// Tally key of answers that did not say which variant served them.
pub const UNKNOWN_VARIANT: &str = "unknown";

/// How the users behave.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoadConfig {
    /// Envoy's listener, e.g. `http://127.0.0.1:10000`.
    pub base_url: String,
    /// Population size: ids `u-0` … `u-<users-1>`.
    pub users: u64,
    /// Requests per second, started on schedule whether or not earlier ones finished.
    pub rate: f64,
    /// Stop starting requests after this long.
    pub duration: Duration,
    /// … or after this many scheduled requests (sent or skipped).
    pub max_requests: u64,
    /// Requests outstanding at most; beyond that a scheduled request is skipped (and counted),
    /// never queued, so a slow server cannot make the load bunch up.
    pub max_in_flight: usize,
    pub seed: u64,
    /// The filter's beacon path.
    pub beacon_path: String,
    /// The header carrying the exposure token from the answer to the beacon.
    pub token_header: String,
    /// Probability of a purchase after a click.
    pub purchase_given_click: f64,
    /// Per-request timeout.
    pub timeout: Duration,
}

impl Default for LoadConfig {
    fn default() -> Self {
        LoadConfig {
            base_url: "http://127.0.0.1:10000".into(),
            users: 5000,
            rate: 300.0,
            duration: Duration::from_secs(180),
            max_requests: u64::MAX,
            max_in_flight: 512,
            seed: 1,
            beacon_path: "/sluice/event".into(),
            token_header: "x-sluice-exposure".into(),
            purchase_given_click: 0.25,
            timeout: Duration::from_secs(5),
        }
    }
}

/// The SRM fault: drop the user id on `drop_share` of the requests of users whom `experiment`
/// assigns to the variant with index `treatment`.
#[derive(Debug, Clone, PartialEq)]
pub struct Srm {
    pub experiment: Experiment,
    pub treatment: usize,
    pub drop_share: f64,
}

impl Srm {
    /// Whether this request of user `key` goes out without its id; `draw` is uniform in [0, 1).
    pub fn drops(&self, key: &str, draw: f64) -> bool {
        variant_of_key(&self.experiment, key.as_bytes()) == self.treatment && draw < self.drop_share
    }
}

/// What the users saw of one variant (by the `x-sluice-variant` echo).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VariantTally {
    pub requests: u64,
    /// Answers by HTTP status.
    pub statuses: BTreeMap<u16, u64>,
    /// Requests that got no HTTP answer at all (connection refused, timeout).
    pub transport_errors: u64,
    pub clicks: u64,
    pub purchases: u64,
    /// Beacons not answered `204`.
    pub beacons_failed: u64,
    /// Latency of answered requests, milliseconds (kept for quantiles; not serialized).
    #[serde(skip)]
    pub latencies_ms: Vec<f32>,
    pub latency_p50_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
    /// Mean of the `x-model-score` values seen.
    pub mean_score: Option<f64>,
    #[serde(skip)]
    score_sum: f64,
    #[serde(skip)]
    scored: u64,
}

impl VariantTally {
    /// Share of answers that were 5xx or no answer.
    pub fn error_rate(&self) -> f64 {
        let bad: u64 = self
            .statuses
            .iter()
            .filter(|(s, _)| **s >= 500)
            .map(|(_, n)| n)
            .sum::<u64>()
            + self.transport_errors;
        ratio(bad, self.requests)
    }

    /// Clicks per request.
    pub fn click_rate(&self) -> f64 {
        ratio(self.clicks, self.requests)
    }

    fn finish(&mut self) {
        let mut xs = self.latencies_ms.clone();
        xs.sort_by(f32::total_cmp);
        let q = |q: f64| -> Option<f64> {
            let last = xs.len().checked_sub(1)?;
            xs.get((last as f64 * q).round() as usize)
                .map(|v| f64::from(*v))
        };
        self.latency_p50_ms = q(0.5);
        self.latency_p99_ms = q(0.99);
        self.mean_score = (self.scored > 0).then(|| self.score_sum / self.scored as f64);
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

/// Everything the users saw.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Tallies {
    pub variants: BTreeMap<String, VariantTally>,
    /// Requests started.
    pub sent: u64,
    /// Scheduled requests not started because `max_in_flight` were outstanding.
    pub skipped: u64,
    /// Requests sent without a user id because of the SRM fault.
    pub ids_dropped: u64,
    pub elapsed_secs: f64,
}

/// Failure to run the load at all (individual request failures are tallied instead).
#[derive(Debug, thiserror::Error)]
pub enum UsersError {
    #[error("invalid load config: {0}")]
    Config(String),
}

#[derive(Default)]
struct Control {
    srm: RwLock<Option<Srm>>,
    stop: AtomicBool,
}

/// Steers a running load from elsewhere (the demo's fault injector, ctrl-c).
#[derive(Clone, Default)]
pub struct LoadHandle {
    control: Arc<Control>,
}

impl LoadHandle {
    /// Turns the SRM fault on (or off with `None`), or updates its plan after a weight change.
    pub fn set_srm(&self, srm: Option<Srm>) {
        match self.control.srm.write() {
            Ok(mut s) => *s = srm,
            Err(p) => *p.into_inner() = srm,
        }
    }

    fn srm(&self) -> Option<Srm> {
        match self.control.srm.read() {
            Ok(s) => s.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Stops starting new requests; the run returns once outstanding ones finish.
    pub fn stop(&self) {
        self.control.stop.store(true, Ordering::Relaxed);
    }

    fn stopped(&self) -> bool {
        self.control.stop.load(Ordering::Relaxed)
    }
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// Runs the load until its duration or request count is reached, or [`LoadHandle::stop`].
pub async fn run(config: LoadConfig, handle: LoadHandle) -> Result<Tallies, UsersError> {
    if !(config.rate > 0.0 && config.rate.is_finite()) {
        return Err(UsersError::Config(format!(
            "rate must be positive, got {}",
            config.rate
        )));
    }
    if config.users == 0 {
        return Err(UsersError::Config("users must be at least 1".into()));
    }
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: HttpClient = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(connector);
    let config = Arc::new(config);
    let tallies = Arc::new(Mutex::new(Tallies::default()));
    let in_flight = Arc::new(tokio::sync::Semaphore::new(config.max_in_flight.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    let start = Instant::now();
    let mut sent: u64 = 0;
    let mut skipped: u64 = 0;
    // A 5 ms tick is fine-grained enough for a few hundred requests per second.
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
        while tasks.try_join_next().is_some() {}
        let elapsed = start.elapsed();
        if handle.stopped() || elapsed >= config.duration || sent >= config.max_requests {
            break;
        }
        let due = ((elapsed.as_secs_f64() * config.rate) as u64).min(config.max_requests);
        while sent + skipped < due {
            let n = sent + skipped;
            match in_flight.clone().try_acquire_owned() {
                Ok(permit) => {
                    let (client, config, tallies, srm) = (
                        client.clone(),
                        config.clone(),
                        tallies.clone(),
                        handle.srm(),
                    );
                    tasks.spawn(async move {
                        one_user_request(&client, &config, n, srm.as_ref(), &tallies).await;
                        drop(permit);
                    });
                    sent += 1;
                }
                Err(_) => skipped += 1,
            }
        }
    }
    while tasks.join_next().await.is_some() {}
    let mut out = match tallies.lock() {
        Ok(t) => t.clone(),
        Err(p) => p.into_inner().clone(),
    };
    out.sent = sent;
    out.skipped = skipped;
    out.elapsed_secs = start.elapsed().as_secs_f64();
    for v in out.variants.values_mut() {
        v.finish();
    }
    Ok(out)
}

/// What one answer said, as far as the user cares.
struct Seen {
    status: u16,
    variant: String,
    score: Option<f64>,
    relevance: Option<f64>,
    /// The exposure token the answer carried.
    exposure: Option<String>,
    latency: Duration,
}

async fn one_user_request(
    client: &HttpClient,
    config: &LoadConfig,
    n: u64,
    srm: Option<&Srm>,
    tallies: &Mutex<Tallies>,
) {
    let mut draws = Draws::new(config.seed, STREAM_REQUEST, n);
    let user = format!("u-{}", draws.below(config.users));
    let item = draws.below(1000);
    let drop_draw = draws.uniform();
    let dropped = srm.is_some_and(|s| s.drops(&user, drop_draw));
    let url = format!("{}/predict?item={item}", config.base_url);
    let headers: &[(&str, &str)] = if dropped {
        &[]
    } else {
        &[("x-user-id", user.as_str())]
    };
    let seen = send(client, config.timeout, Method::GET, &url, headers).await;

    let mut clicked = false;
    let mut purchased = false;
    let mut beacons_failed = 0;
    if let Some(relevance) = seen.as_ref().ok().and_then(|s| s.relevance) {
        // Users react to what they were shown, even if their id got lost on the way in; the
        // beacon comes from another part of the app and still carries the id, and whatever
        // exposure token the answer carried (none when the id was lost: such a beacon is
        // refused, as the filter cannot tell it from a forged one).
        let exposure = seen.as_ref().ok().and_then(|s| s.exposure.as_deref());
        if draws.chance(relevance) {
            clicked = true;
            beacons_failed += u64::from(!beacon(client, config, &user, "click", exposure).await);
            if draws.chance(config.purchase_given_click) {
                purchased = true;
                beacons_failed +=
                    u64::from(!beacon(client, config, &user, "purchase", exposure).await);
            }
        }
    }

    let mut t = match tallies.lock() {
        Ok(t) => t,
        Err(p) => p.into_inner(),
    };
    t.ids_dropped += u64::from(dropped);
    match seen {
        Ok(seen) => {
            let v = t.variants.entry(seen.variant).or_default();
            v.requests += 1;
            *v.statuses.entry(seen.status).or_default() += 1;
            v.latencies_ms
                .push((seen.latency.as_secs_f64() * 1000.0) as f32);
            if let Some(s) = seen.score {
                v.score_sum += s;
                v.scored += 1;
            }
            v.clicks += u64::from(clicked);
            v.purchases += u64::from(purchased);
            v.beacons_failed += beacons_failed;
        }
        Err(()) => {
            let v = t.variants.entry(UNKNOWN_VARIANT.into()).or_default();
            v.requests += 1;
            v.transport_errors += 1;
        }
    }
}

async fn beacon(
    client: &HttpClient,
    config: &LoadConfig,
    user: &str,
    name: &str,
    exposure: Option<&str>,
) -> bool {
    let url = format!("{}{}?name={name}", config.base_url, config.beacon_path);
    let mut headers = vec![("x-user-id", user)];
    if let Some(token) = exposure {
        headers.push((config.token_header.as_str(), token));
    }
    matches!(
        send(client, config.timeout, Method::POST, &url, &headers).await,
        Ok(Seen { status: 204, .. })
    )
}

async fn send(
    client: &HttpClient,
    timeout: Duration,
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
) -> Result<Seen, ()> {
    let mut builder = hyper::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    let req = builder.body(Full::new(Bytes::new())).map_err(|_| ())?;
    let started = Instant::now();
    let work = async {
        let resp = client.request(req).await.map_err(|_| ())?;
        let status = resp.status().as_u16();
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let variant = header("x-sluice-variant").unwrap_or_else(|| UNKNOWN_VARIANT.into());
        let score = header("x-model-score").and_then(|s| s.parse().ok());
        let exposure = header("x-sluice-exposure");
        let body = resp.into_body().collect().await.map_err(|_| ())?.to_bytes();
        let relevance = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|j| j.get("relevance").and_then(serde_json::Value::as_f64));
        Ok(Seen {
            status,
            variant,
            score,
            relevance,
            exposure,
            latency: started.elapsed(),
        })
    };
    tokio::time::timeout(timeout, work).await.map_err(|_| ())?
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_filter::config::Plan;

    pub(crate) fn experiment(canary_weight: f64) -> Experiment {
        let json = serde_json::json!({
            "version": 1,
            "experiments": [{
                "name": "demo",
                "unit": {"type": "user", "keys": [{"header": "x-user-id"}]},
                "variants": [{"name": "stable", "control": true}, {"name": "canary", "weight": canary_weight}]
            }]
        });
        match Plan::from_json(json.to_string().as_bytes()) {
            Ok(mut p) => p.experiments.remove(0),
            Err(e) => unreachable!("{e}"),
        }
    }

    #[test]
    fn srm_drops_only_treatment_users_ids_at_the_given_share() {
        let exp = experiment(25.0);
        let srm = Srm {
            experiment: exp.clone(),
            treatment: 1,
            drop_share: 0.4,
        };
        let mut draws = Draws::new(3, 0, 0);
        let (mut canary, mut dropped) = (0u32, 0u32);
        for i in 0..20_000 {
            let key = format!("u-{i}");
            let drop = srm.drops(&key, draws.uniform());
            let in_canary = variant_of_key(&exp, key.as_bytes()) == 1;
            assert!(!drop || in_canary, "{key} is not a canary user");
            canary += u32::from(in_canary);
            dropped += u32::from(drop);
        }
        let share = f64::from(dropped) / f64::from(canary);
        assert!((share - 0.4).abs() < 0.03, "dropped share {share}");
        assert!((f64::from(canary) / 20_000.0 - 0.25).abs() < 0.02);
    }
}
