//! The recorder: once a second during a run, reads Envoy's `/stats/prometheus` (parsed with
//! the controller's own exposition parser) and the controller's `GET /status`, and appends a
//! [`Point`] to the run's [`Series`] — the raw material of the report.
//!
//! Points hold *cumulative* counters and histograms exactly as Envoy reports them; rates,
//! error ratios and quantiles over a window are differences of two points, computed by the
//! report. Keeping raw counters makes the series easy to check against Envoy and lets the
//! report choose its windows afterwards. A source that does not answer leaves a gap (the
//! point records that), never a zero.

use sluice_filter::metrics;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};
use sluice_controller::source::exposition::{self, Sample};
use tokio::sync::watch;

/// A cumulative histogram: counts of observations `<= le[i]` (the last bound is `+Inf`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    /// JSON has no infinity: `+Inf` is written as `null` and read back.
    #[serde(with = "bounds")]
    pub le: Vec<f64>,
    pub cumulative: Vec<f64>,
    pub sum: f64,
    pub count: f64,
}

impl Histogram {
    /// Observations between `earlier` and `self` (same buckets; missing buckets count as 0).
    pub fn since(&self, earlier: &Histogram) -> Histogram {
        let before = |le: f64| {
            earlier
                .le
                .iter()
                .position(|x| *x == le)
                .and_then(|i| earlier.cumulative.get(i))
                .copied()
                .unwrap_or(0.0)
        };
        Histogram {
            le: self.le.clone(),
            cumulative: self
                .le
                .iter()
                .zip(&self.cumulative)
                .map(|(le, c)| (c - before(*le)).max(0.0))
                .collect(),
            sum: (self.sum - earlier.sum).max(0.0),
            count: (self.count - earlier.count).max(0.0),
        }
    }

    /// The `q` quantile, interpolating linearly inside the bucket that holds it (as
    /// Prometheus' `histogram_quantile` does); `None` without observations. A quantile in the
    /// `+Inf` bucket is reported as the largest finite bound.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        use sluice_controller::judge::guardrail::{histogram_quantile, BucketQuantile};
        let total = *self.cumulative.last()?;
        let pairs = self.le.iter().copied().zip(self.cumulative.iter().copied());
        match histogram_quantile(pairs, total, q)? {
            BucketQuantile::Within(x) | BucketQuantile::Beyond(x) => Some(x),
        }
    }

    /// Per-bucket counts (not cumulative), paired with each bucket's upper bound.
    pub fn buckets(&self) -> Vec<(f64, f64)> {
        let mut prev = 0.0;
        self.le
            .iter()
            .zip(&self.cumulative)
            .map(|(le, c)| {
                let n = (c - prev).max(0.0);
                prev = *c;
                (*le, n)
            })
            .collect()
    }
}

/// Bucket bounds with `+Inf` as `null`, so a recorded series reads back (`sluice-demo report`).
mod bounds {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(le: &[f64], s: S) -> Result<S::Ok, S::Error> {
        le.iter()
            .map(|b| b.is_finite().then_some(*b))
            .collect::<Vec<Option<f64>>>()
            .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f64>, D::Error> {
        Ok(Vec::<Option<f64>>::deserialize(d)?
            .into_iter()
            .map(|b| b.unwrap_or(f64::INFINITY))
            .collect())
    }
}

/// Shadow comparison counters of one variant.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ShadowCounters {
    pub requests: f64,
    pub compared: f64,
    pub errors: f64,
    pub timeouts: f64,
    /// Per compared field (`status`, `body`, configured fields).
    pub agree: BTreeMap<String, f64>,
    pub disagree: BTreeMap<String, f64>,
}

/// Envoy's cumulative counters for one variant at one moment.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VariantPoint {
    pub requests: f64,
    /// Responses by class (`2xx`, `5xx`, …).
    pub responses: BTreeMap<String, f64>,
    pub local_replies: f64,
    pub upstream_resets: f64,
    pub missing_key: f64,
    pub events: f64,
    /// Outcomes by name (`click`, `purchase`).
    pub outcomes: BTreeMap<String, f64>,
    pub latency_ms: Histogram,
    /// Prediction values × the filter's scale (1000 in the demo).
    pub prediction: Histogram,
    pub shadow: ShadowCounters,
    /// `sluice_breaker_tripped`: 1 while the filter's breaker keeps this variant out.
    #[serde(default)]
    pub breaker_tripped: f64,
    /// `sluice_breaker_trips_total` by `reason`.
    #[serde(default)]
    pub breaker_trips: BTreeMap<String, f64>,
}

impl VariantPoint {
    pub fn server_errors(&self) -> f64 {
        self.responses.get("5xx").copied().unwrap_or(0.0)
    }
}

/// The controller's view at one moment (from `GET /status`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RolloutPoint {
    /// `pending`, `shadow`, `canary`, `promoted`, `rolled_back`.
    pub phase: String,
    /// 0-based stage index while in `canary`.
    pub stage: Option<u64>,
    /// The weight the proxies confirmed last.
    pub weight: f64,
    pub target_weight: f64,
    /// Last judgement kind (`pass`, `continue`, `hold`, `halt`, `fail`) and its reason.
    pub judgement: Option<String>,
    pub reason: Option<String>,
    pub held: Option<String>,
    pub paused: bool,
    /// Why the rollout was rolled back, once it was.
    pub rolled_back_reason: Option<String>,
}

/// One sample of the run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Point {
    /// Seconds since the run started.
    pub t: f64,
    /// Unix seconds.
    pub at: f64,
    /// Envoy's counters per variant; `None` if Envoy did not answer.
    pub variants: Option<BTreeMap<String, VariantPoint>>,
    /// Accepted / rejected ECDS updates of the filter so far.
    pub ecds_updates: Option<f64>,
    pub ecds_rejected: Option<f64>,
    /// `None` if there is no controller or it did not answer.
    pub rollout: Option<RolloutPoint>,
}

/// A whole run, as recorded.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Series {
    pub experiment: String,
    pub control: String,
    pub treatment: String,
    pub scenario: Option<String>,
    /// Unix seconds of `t = 0`.
    pub started_at: f64,
    /// Unix seconds when the scenario's fault was switched on.
    pub fault_injected_at: Option<f64>,
    /// The experiment's `breaker` section, if it had one.
    #[serde(default)]
    pub breaker: Option<serde_json::Value>,
    pub points: Vec<Point>,
    /// Envoy's requests to the treatment's cluster, polled every few tens of milliseconds:
    /// when Envoy last routed a user there, from the proxy's side.
    #[serde(default)]
    pub treatment_routing: Option<Routing>,
    /// Unix seconds when the treatment's upstream last received a request (the same moment
    /// seen from the upstream; a cross-check).
    #[serde(default)]
    pub treatment_last_arrival_at: Option<f64>,
}

/// What a [`RoutingProbe`] saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Routing {
    /// Poll period, seconds.
    pub every_secs: f64,
    /// The counter's last value.
    pub requests: f64,
    /// Unix seconds of the first poll that saw the counter's final value, i.e. within one
    /// poll period after Envoy sent the cluster its last request; `None` if it never grew.
    pub last_increase_seen_at: Option<f64>,
    /// The poll before that one: the last request was sent after this.
    pub previous_poll_at: Option<f64>,
    pub polls: u64,
    pub failed_polls: u64,
}

/// Turns one `/stats/prometheus` scrape into per-variant counters of `experiment`.
pub fn variants_of(samples: &[Sample], experiment: &str) -> BTreeMap<String, VariantPoint> {
    let mut out: BTreeMap<String, VariantPoint> = BTreeMap::new();
    // Histogram buckets arrive as separate samples; collect them, then sort by bound.
    let mut buckets: BTreeMap<(String, &'static str), Vec<(f64, f64)>> = BTreeMap::new();
    for s in samples {
        if s.label("experiment") != Some(experiment) {
            continue;
        }
        let Some(variant) = s.label("variant") else {
            continue;
        };
        let v = out.entry(variant.to_string()).or_default();
        let label = |k: &str| s.label(k).unwrap_or("").to_string();
        match s.name.as_str() {
            metrics::REQUESTS => v.requests += s.value,
            metrics::RESPONSES => *v.responses.entry(label("class")).or_default() += s.value,
            metrics::LOCAL_REPLIES => v.local_replies += s.value,
            metrics::UPSTREAM_RESETS => v.upstream_resets += s.value,
            metrics::MISSING_KEY => v.missing_key += s.value,
            metrics::EVENTS => v.events += s.value,
            metrics::OUTCOMES => *v.outcomes.entry(label("outcome")).or_default() += s.value,
            metrics::BREAKER_TRIPPED => v.breaker_tripped += s.value,
            metrics::BREAKER_TRIPS => {
                *v.breaker_trips.entry(label("reason")).or_default() += s.value
            }
            metrics::SHADOW_REQUESTS => v.shadow.requests += s.value,
            metrics::SHADOW_COMPARED => v.shadow.compared += s.value,
            metrics::SHADOW_ERRORS => v.shadow.errors += s.value,
            metrics::SHADOW_TIMEOUTS => v.shadow.timeouts += s.value,
            metrics::SHADOW_AGREE => *v.shadow.agree.entry(label("field")).or_default() += s.value,
            metrics::SHADOW_DISAGREE => {
                *v.shadow.disagree.entry(label("field")).or_default() += s.value
            }
            name => {
                let (which, part) = match (
                    name.strip_prefix(metrics::LATENCY),
                    name.strip_prefix(metrics::PREDICTION),
                ) {
                    (Some(part), _) => ("latency", part),
                    (_, Some(part)) => ("prediction", part),
                    _ => continue,
                };
                let h = if which == "latency" {
                    &mut v.latency_ms
                } else {
                    &mut v.prediction
                };
                match part {
                    "_sum" => h.sum += s.value,
                    "_count" => h.count += s.value,
                    "_bucket" => {
                        if let Some(le) = s.label("le").and_then(parse_le) {
                            buckets
                                .entry((variant.to_string(), which))
                                .or_default()
                                .push((le, s.value));
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    for ((variant, which), mut bs) in buckets {
        bs.sort_by(|a, b| a.0.total_cmp(&b.0));
        if let Some(v) = out.get_mut(&variant) {
            let h = if which == "latency" {
                &mut v.latency_ms
            } else {
                &mut v.prediction
            };
            h.le = bs.iter().map(|b| b.0).collect();
            h.cumulative = bs.iter().map(|b| b.1).collect();
        }
    }
    out
}

fn parse_le(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        _ => s.parse().ok(),
    }
}

/// Sums Envoy's ECDS counters for the filter (`…extension_config_discovery…update_success`).
pub fn ecds_counters(samples: &[Sample]) -> (Option<f64>, Option<f64>) {
    let sum = |suffix: &str| {
        let matching: Vec<f64> = samples
            .iter()
            .filter(|s| s.name.contains("extension_config_discovery") && s.name.ends_with(suffix))
            .map(|s| s.value)
            .collect();
        (!matching.is_empty()).then(|| matching.iter().sum())
    };
    (sum("update_success"), sum("update_rejected"))
}

/// Picks rollout `name` out of a `GET /status` answer (a JSON array of statuses).
pub fn rollout_of(status: &serde_json::Value, name: &str) -> Option<RolloutPoint> {
    let s = status
        .as_array()?
        .iter()
        .find(|s| s["name"].as_str() == Some(name))?;
    let text = |v: &serde_json::Value| v.as_str().map(str::to_string);
    let phase = &s["state"]["phase"];
    Some(RolloutPoint {
        phase: text(&phase["phase"]).unwrap_or_default(),
        stage: phase["index"].as_u64(),
        weight: s["state"]["weight"].as_f64().unwrap_or(0.0),
        target_weight: s["target_weight"].as_f64().unwrap_or(0.0),
        judgement: text(&s["last_judgement"]["kind"]),
        reason: text(&s["last_judgement"]["reason"]),
        held: text(&s["state"]["hold"]),
        paused: s["state"]["paused"].as_bool().unwrap_or(false),
        rolled_back_reason: text(&phase["reason"]),
    })
}

/// What to sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecorderConfig {
    /// Envoy admin, e.g. `http://127.0.0.1:9901`.
    pub admin_url: String,
    /// The controller's endpoint, e.g. `http://127.0.0.1:9400`; `None` without a controller.
    pub status_url: Option<String>,
    pub experiment: String,
    pub control: String,
    pub treatment: String,
    pub scenario: Option<String>,
    pub interval: Duration,
    pub timeout: Duration,
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// A small GET helper; `None` for no answer or a non-2xx one.
pub(crate) async fn get_text(client: &HttpClient, url: &str, timeout: Duration) -> Option<String> {
    let uri: hyper::Uri = url.parse().ok()?;
    let work = async {
        let resp = client.get(uri).await.ok()?;
        let ok = resp.status().is_success();
        let body = resp.into_body().collect().await.ok()?.to_bytes();
        ok.then(|| String::from_utf8_lossy(&body).into_owned())
    };
    tokio::time::timeout(timeout, work).await.ok().flatten()
}

pub(crate) fn http_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

pub(crate) fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// A running recorder.
pub struct Recorder {
    series: Arc<Mutex<Series>>,
    final_rollout: Arc<Mutex<Option<RolloutPoint>>>,
    latest: watch::Receiver<Option<Point>>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Recorder {
    /// Starts sampling now (`t = 0`).
    pub fn start(config: RecorderConfig) -> Recorder {
        let series = Arc::new(Mutex::new(Series {
            experiment: config.experiment.clone(),
            control: config.control.clone(),
            treatment: config.treatment.clone(),
            scenario: config.scenario.clone(),
            started_at: unix_now(),
            fault_injected_at: None,
            breaker: None,
            points: Vec::new(),
            treatment_routing: None,
            treatment_last_arrival_at: None,
        }));
        let (latest_tx, latest) = watch::channel(None);
        let (stop, stop_rx) = watch::channel(false);
        let final_rollout = Arc::new(Mutex::new(None));
        let task = tokio::spawn(sample_loop(
            config,
            series.clone(),
            final_rollout.clone(),
            latest_tx,
            stop_rx,
        ));
        Recorder {
            series,
            final_rollout,
            latest,
            stop,
            task,
        }
    }

    /// The newest point, for live progress and the fault trigger.
    pub fn latest(&self) -> watch::Receiver<Option<Point>> {
        self.latest.clone()
    }

    /// The rollout's final status, once the controller has exited (its endpoint with it):
    /// later points carry it instead of nothing.
    pub fn set_final_rollout(&self, rollout: RolloutPoint) {
        match self.final_rollout.lock() {
            Ok(mut r) => *r = Some(rollout),
            Err(p) => *p.into_inner() = Some(rollout),
        }
    }

    /// Notes the moment the scenario's fault was switched on.
    pub fn mark_fault(&self, at: f64) {
        with_series(&self.series, |s| s.fault_injected_at = Some(at));
    }

    /// Notes what the routing probe and the treatment's upstream saw.
    pub fn set_routing(&self, routing: Option<Routing>, last_arrival_at: Option<f64>) {
        with_series(&self.series, |s| {
            s.treatment_routing = routing;
            s.treatment_last_arrival_at = last_arrival_at;
        });
    }

    /// A copy of what was recorded so far.
    pub fn snapshot(&self) -> Series {
        with_series(&self.series, |s| s.clone())
    }

    /// Takes one last sample, stops, and returns the series.
    pub async fn finish(self) -> Series {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        with_series(&self.series, |s| s.clone())
    }
}

fn with_series<T>(series: &Mutex<Series>, f: impl FnOnce(&mut Series) -> T) -> T {
    match series.lock() {
        Ok(mut s) => f(&mut s),
        Err(p) => f(&mut p.into_inner()),
    }
}

async fn sample_loop(
    config: RecorderConfig,
    series: Arc<Mutex<Series>>,
    final_rollout: Arc<Mutex<Option<RolloutPoint>>>,
    latest: watch::Sender<Option<Point>>,
    mut stop: watch::Receiver<bool>,
) {
    let client = http_client();
    let started = with_series(&series, |s| s.started_at);
    let mut every = tokio::time::interval(config.interval);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let last = tokio::select! {
            _ = every.tick() => false,
            _ = stop.wait_for(|s| *s) => true,
        };
        let mut point = sample(&client, &config, started).await;
        if point.rollout.is_none() {
            point.rollout = match final_rollout.lock() {
                Ok(r) => r.clone(),
                Err(p) => p.into_inner().clone(),
            };
        }
        with_series(&series, |s| s.points.push(point.clone()));
        let _ = latest.send(Some(point));
        if last {
            break;
        }
    }
}

/// One point: both sources asked concurrently.
async fn sample(client: &HttpClient, config: &RecorderConfig, started: f64) -> Point {
    let at = unix_now();
    let stats_url = format!(
        "{}/stats/prometheus",
        config.admin_url.trim_end_matches('/')
    );
    let status_url = config
        .status_url
        .as_ref()
        .map(|u| format!("{}/status", u.trim_end_matches('/')));
    let (stats, status) = tokio::join!(get_text(client, &stats_url, config.timeout), async {
        match &status_url {
            Some(u) => get_text(client, u, config.timeout).await,
            None => None,
        }
    });
    let samples = stats.and_then(|text| exposition::parse(&text, "").ok());
    let (ecds_updates, ecds_rejected) = samples.as_deref().map_or((None, None), ecds_counters);
    Point {
        t: at - started,
        at,
        variants: samples.map(|s| variants_of(&s, &config.experiment)),
        ecds_updates,
        ecds_rejected,
        rollout: status
            .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
            .and_then(|v| rollout_of(&v, &config.experiment)),
    }
}

/// Polls Envoy's counter of requests sent to one cluster (`cluster.<name>.upstream_rq_total`)
/// and remembers when it last grew: the moment Envoy stopped routing users there, measured at
/// the proxy and independent of what the controller believes.
pub struct RoutingProbe {
    seen: Arc<Mutex<Routing>>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl RoutingProbe {
    pub fn start(admin_url: &str, cluster: &str, every: Duration) -> RoutingProbe {
        let stat = format!("cluster.{cluster}.upstream_rq_total");
        let url = format!(
            "{}/stats?filter={}",
            admin_url.trim_end_matches('/'),
            stat.replace('.', "%5C.")
        );
        let seen = Arc::new(Mutex::new(Routing {
            every_secs: every.as_secs_f64(),
            ..Routing::default()
        }));
        let (stop, mut stop_rx) = watch::channel(false);
        let shared = seen.clone();
        let task = tokio::spawn(async move {
            let client = http_client();
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last_poll: Option<f64> = None;
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop_rx.wait_for(|s| *s) => break,
                }
                let at = unix_now();
                let value = get_text(&client, &url, Duration::from_secs(1))
                    .await
                    .and_then(|text| stat_value(&text, &stat));
                let mut r = match shared.lock() {
                    Ok(r) => r,
                    Err(p) => p.into_inner(),
                };
                r.polls += 1;
                match value {
                    Some(v) => {
                        if v > r.requests {
                            r.requests = v;
                            r.last_increase_seen_at = Some(at);
                            r.previous_poll_at = last_poll;
                        }
                        last_poll = Some(at);
                    }
                    None => r.failed_polls += 1,
                }
            }
        });
        RoutingProbe { seen, stop, task }
    }

    pub async fn finish(self) -> Routing {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        match self.seen.lock() {
            Ok(r) => *r,
            Err(p) => *p.into_inner(),
        }
    }
}

/// The value of `name` in admin `/stats` text output (`name: value` lines).
pub fn stat_value(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once(':')?;
        (k.trim() == name).then(|| v.trim().parse().ok()).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCRAPE: &str = r#"# TYPE sluice_requests_total counter
sluice_requests_total{experiment="demo",variant="canary"} 30
sluice_requests_total{experiment="demo",variant="stable"} 270
sluice_requests_total{experiment="other",variant="stable"} 5
sluice_responses_total{experiment="demo",variant="canary",class="5xx"} 3
sluice_responses_total{experiment="demo",variant="canary",class="2xx"} 27
sluice_outcomes_total{experiment="demo",variant="canary",outcome="click"} 4
sluice_latency_ms_bucket{experiment="demo",variant="canary",le="10"} 10
sluice_latency_ms_bucket{experiment="demo",variant="canary",le="+Inf"} 30
sluice_latency_ms_bucket{experiment="demo",variant="canary",le="50"} 30
sluice_latency_ms_sum{experiment="demo",variant="canary"} 700
sluice_latency_ms_count{experiment="demo",variant="canary"} 30
sluice_shadow_agree_total{experiment="demo",variant="stable",field="score"} 8
envoy_extension_config_discovery_http_filter_update_success{envoy_extension_config_name="sluice"} 3
"#;

    #[test]
    fn a_scrape_becomes_per_variant_counters() {
        let samples = exposition::parse(SCRAPE, "").unwrap_or_default();
        let v = variants_of(&samples, "demo");
        assert_eq!(v["stable"].requests, 270.0);
        let c = &v["canary"];
        assert_eq!(c.requests, 30.0);
        assert_eq!(c.server_errors(), 3.0);
        assert_eq!(c.outcomes["click"], 4.0);
        assert_eq!(c.latency_ms.le, vec![10.0, 50.0, f64::INFINITY]);
        assert_eq!(v["stable"].shadow.agree["score"], 8.0);
        // Half the observations are ≤ 10, the rest in (10, 50]: the median is at 10 + ¼·40.
        assert_eq!(c.latency_ms.quantile(0.5), Some(20.0));
        assert_eq!(ecds_counters(&samples), (Some(3.0), None));
    }

    #[test]
    fn admin_stat_lines_are_read_by_exact_name() {
        let text = "cluster.canary.upstream_rq_total: 42\ncluster.canary.upstream_rq_total_x: 7\n";
        assert_eq!(
            stat_value(text, "cluster.canary.upstream_rq_total"),
            Some(42.0)
        );
        assert_eq!(stat_value(text, "cluster.stable.upstream_rq_total"), None);
    }

    #[test]
    fn status_json_becomes_a_rollout_point() {
        let status = serde_json::json!([{
            "name": "demo",
            "state": {"phase": {"phase": "canary", "index": 2}, "weight": 10.0, "hold": null, "paused": false},
            "target_weight": 10.0,
            "last_judgement": {"kind": "fail", "reason": "error rate"},
        }]);
        let r = rollout_of(&status, "demo").unwrap_or_default();
        assert_eq!(r.phase, "canary");
        assert_eq!(r.stage, Some(2));
        assert_eq!(r.weight, 10.0);
        assert_eq!(r.judgement.as_deref(), Some("fail"));
        assert_eq!(r.reason.as_deref(), Some("error rate"));
        assert!(rollout_of(&status, "other").is_none());
    }

    #[test]
    fn histogram_differences_and_quantiles() {
        let later = Histogram {
            le: vec![10.0, 100.0, f64::INFINITY],
            cumulative: vec![50.0, 150.0, 151.0],
            sum: 0.0,
            count: 151.0,
        };
        let earlier = Histogram {
            le: vec![10.0, 100.0, f64::INFINITY],
            cumulative: vec![50.0, 50.0, 50.0],
            sum: 0.0,
            count: 50.0,
        };
        let d = later.since(&earlier);
        assert_eq!(d.cumulative, vec![0.0, 100.0, 101.0]);
        assert_eq!(d.quantile(1.0), Some(100.0));
        assert_eq!(d.buckets()[1], (100.0, 100.0));
        assert_eq!(Histogram::default().quantile(0.5), None);
        // The +Inf bound survives a JSON round trip (a re-rendered report reads it back).
        let json = serde_json::to_string(&later).unwrap_or_default();
        assert!(json.contains("null"), "{json}");
        let back: Histogram = serde_json::from_str(&json).unwrap_or_default();
        assert_eq!(back, later);
    }
}
