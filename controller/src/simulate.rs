//! `sluice simulate`: many synthetic rollouts through the real [`Judge`], to measure what it
//! promises: the false-rollback rate when nothing changed (A/A), the power and time to detect
//! regressions in error rate, latency, conversion and predictions, and the sample-ratio gate;
//! beside it, a naive fixed-α test repeated every interval on the same data.
//!
//! Counts per interval are drawn, not requests: the split by a binomial, errors and
//! conversions by binomials, histograms by multinomials (exact samplers in [`rng`]), so a
//! rollout of millions of requests costs a few hundred draws per interval. Every run has its
//! own stream seeded by (seed, scenario, run): results do not depend on the thread count.

use std::collections::BTreeMap;
use std::io::Write;

use crate::judge::config::{BusinessConfig, GuardrailConfig};
use crate::judge::guardrail::count_above;
use crate::judge::sequential::{chi_square, normal_cdf, normal_quantile, wilson};
use crate::judge::{Decision, Judge, Kind, Label};
use crate::plan;
use crate::snapshot::{Bucket, Counters, Histogram, Snapshot};

pub mod breaker;
pub mod rng;

use rng::Rng;

/// Latency bucket bounds (ms), as an Envoy would be configured.
pub const LATENCY_BOUNDS: [f64; 23] = [
    0.5, 1.0, 2.0, 3.0, 5.0, 7.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 75.0, 100.0, 150.0, 200.0,
    300.0, 500.0, 750.0, 1000.0, 2000.0, 5000.0, 10000.0,
];

/// Arguments of `sluice simulate`.
#[derive(Debug, Clone, clap::Args)]
pub struct SimulateArgs {
    /// Rollouts per scenario.
    #[arg(long, default_value_t = 2000)]
    pub runs: usize,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Scenarios to run (default: all): see `SCENARIOS`.
    #[arg(long, value_delimiter = ',')]
    pub scenario: Vec<String>,
    /// Replicate groups the snapshots carry in the scenarios that have them (0: none, as
    /// from a filter without `sluice_replicate_requests_total`: the split test then takes
    /// requests as independent).
    #[arg(long)]
    pub replicates: Option<usize>,
    /// Requests per second reaching the experiment.
    #[arg(long, default_value_t = 200.0)]
    pub rps: f64,
    /// Worker threads (default: available cores).
    #[arg(long)]
    pub threads: Option<usize>,
    #[arg(long)]
    pub json: bool,
    #[command(subcommand)]
    pub what: Option<SimulateWhat>,
}

/// What `sluice simulate` simulates instead of the judge's rollouts.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum SimulateWhat {
    /// The filter's data-plane breaker: false trips at A/A, time to trip under faults.
    Breaker(breaker::BreakerArgs),
}

/// Simulation failure.
#[derive(Debug, thiserror::Error)]
pub enum SimulateError {
    #[error("unknown scenario {0:?} (known: {known})", known = SCENARIOS.join(", "))]
    Scenario(String),
    #[error("--runs must be at least 1")]
    Runs,
    #[error("writing output: {0}")]
    Output(#[from] std::io::Error),
    #[error("encoding output: {0}")]
    Encode(#[from] serde_json::Error),
    #[error(transparent)]
    Breaker(#[from] breaker::BreakerSimError),
}

/// Every scenario, in the order `sluice simulate` runs them.
pub const SCENARIOS: [&str; 12] = [
    "aa",
    "error",
    "latency",
    "conversion",
    "drift",
    "srm",
    "aa_drift",
    "margin",
    "users_aa",
    "users_aa_heavy",
    "users_srm",
    "users_srm_heavy",
];

/// Replicate groups the filter exports per variant (`sluice_filter::metrics::REPLICATES`).
pub const REPLICATES: usize = 32;

/// Per-user traffic: every user keeps the variant their key hashes to, and users differ in
/// activity (requests per second log-normal with this σ on the log scale, mean fixed).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Users {
    pub count: usize,
    pub sigma: f64,
}

/// One rollout's users: activity, bucket (0..10 000, as the filter hashes) and replicate.
struct Population {
    activity: Vec<f64>,
    bucket: Vec<u32>,
    replicate: Vec<usize>,
    total: f64,
}

impl Population {
    fn draw(u: Users, groups: usize, rng: &mut Rng) -> Population {
        let mut p = Population {
            activity: Vec::with_capacity(u.count),
            bucket: Vec::with_capacity(u.count),
            replicate: Vec::with_capacity(u.count),
            total: 0.0,
        };
        for _ in 0..u.count {
            let a = (u.sigma * rng.normal() - 0.5 * u.sigma * u.sigma).exp();
            p.activity.push(a);
            p.total += a;
            p.bucket.push(rng.below(10_000) as u32);
            p.replicate.push(rng.below(groups as u64) as usize);
        }
        p
    }

    /// Shares of all traffic per replicate group, (canary, control), when the canary holds
    /// the buckets below `canary_buckets`.
    fn shares(&self, canary_buckets: u32, groups: usize) -> (Vec<f64>, Vec<f64>) {
        let (mut t, mut c) = (vec![0.0; groups], vec![0.0; groups]);
        for i in 0..self.activity.len() {
            let side = if self.bucket[i] < canary_buckets {
                &mut t
            } else {
                &mut c
            };
            side[self.replicate[i]] += self.activity[i] / self.total;
        }
        (t, c)
    }
}

/// How one variant's traffic behaves.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Traffic {
    /// Share of responses that are 5xx.
    pub error: f64,
    /// Latency is log-normal: median (ms) and σ of its log.
    pub latency_median: f64,
    pub latency_sigma: f64,
    /// Conversions per request.
    pub conversion: f64,
    /// Predictions are normal (clipped to [0, 1]): mean and sd.
    pub prediction_mean: f64,
    pub prediction_sd: f64,
}

impl Default for Traffic {
    fn default() -> Self {
        Traffic {
            error: 0.01,
            latency_median: 40.0,
            latency_sigma: 0.6,
            conversion: 0.05,
            prediction_mean: 0.3,
            prediction_sd: 0.15,
        }
    }
}

/// One synthetic rollout design.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub name: String,
    pub description: String,
    /// (canary weight %, seconds) per stage; each stage includes the judge's warm-up.
    pub stages: Vec<(f64, f64)>,
    pub interval: f64,
    pub rps: f64,
    pub control: Traffic,
    pub canary: Traffic,
    /// Percentage points of traffic the canary really gets beyond its weight (SRM).
    pub skew: f64,
    pub config: GuardrailConfig,
    /// Stop once this many requests were seen (after warm-ups).
    pub max_requests: Option<u64>,
    /// Whether the canary truly differs (a rollback is then a detection, not an error).
    pub regression: bool,
    /// Users keep their variant and differ in activity; `None`: independent requests.
    pub users: Option<Users>,
    /// Replicate groups in the snapshots (0: none).
    pub replicates: usize,
    /// Every stage is judged as a rollout of its own (a fresh judge): per-stage rates that no
    /// earlier stage's evidence affects.
    pub independent_stages: bool,
}

/// What happened in one rollout.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Outcome {
    /// Seconds from the start of the rollout to the judge's rollback.
    pub rolled_back: Option<f64>,
    pub halted: Option<f64>,
    /// The last stage ended with a promote decision.
    pub promoted: bool,
    /// Seconds to the first alarm of the naive fixed-α test.
    pub naive: Option<f64>,
    /// Seconds to the first naive halt: χ² at `srm.alpha` every look.
    pub naive_halt: Option<f64>,
    /// Bit i: stage i reached "promote" at some look.
    pub stage_promoted: u32,
    /// The error-rate interval excluded the true difference at some look.
    pub interval_missed_error: bool,
    /// Some statistical interval whose true difference is known excluded it at some look.
    pub interval_missed_any: bool,
    /// The drift guardrail failed at some look.
    pub drift_failed: bool,
}

/// Prometheus-style cumulative buckets for per-bucket probabilities of `bounds`.
fn bucket_probs(bounds: &[f64], cdf: impl Fn(f64) -> f64) -> Vec<f64> {
    let mut probs = Vec::with_capacity(bounds.len() + 1);
    let mut below = 0.0;
    for &b in bounds {
        let c = cdf(b);
        probs.push((c - below).max(0.0));
        below = c;
    }
    probs.push((1.0 - below).max(0.0));
    probs
}

/// Per-variant sampling tables.
struct Model {
    traffic: Traffic,
    latency: Vec<f64>,
    latency_mid: Vec<f64>,
    prediction: Vec<f64>,
    prediction_mid: Vec<f64>,
}

const PREDICTION_SCALE: f64 = 1000.0;

fn prediction_bounds() -> Vec<f64> {
    (1..20).map(|i| f64::from(i) * 50.0).collect()
}

fn mids(bounds: &[f64]) -> Vec<f64> {
    let mut out = Vec::with_capacity(bounds.len() + 1);
    let mut lower = 0.0;
    for &b in bounds {
        out.push(0.5 * (lower + b));
        lower = b;
    }
    out.push(lower * 1.5);
    out
}

impl Model {
    fn new(t: Traffic) -> Model {
        let mu = t.latency_median.ln();
        let latency = bucket_probs(&LATENCY_BOUNDS, |x| {
            normal_cdf((x.ln() - mu) / t.latency_sigma)
        });
        let pb = prediction_bounds();
        let prediction = bucket_probs(&pb, |x| {
            normal_cdf((x / PREDICTION_SCALE - t.prediction_mean) / t.prediction_sd)
        });
        Model {
            traffic: t,
            latency,
            latency_mid: mids(&LATENCY_BOUNDS),
            prediction,
            prediction_mid: mids(&pb),
        }
    }

    /// Adds one interval of `n` requests to the cumulative counters `c`.
    fn draw(&self, rng: &mut Rng, n: u64, c: &mut Counters, scratch: &mut Vec<u64>) {
        let t = &self.traffic;
        c.requests += n;
        let errors = rng.binomial(n, t.error);
        *c.responses.entry("5xx".into()).or_default() += errors;
        *c.responses.entry("2xx".into()).or_default() += n - errors;
        *c.outcomes.entry("click".into()).or_default() += rng.binomial(n, t.conversion);
        rng.multinomial(n, &self.latency, scratch);
        add_counts(&mut c.latency, &LATENCY_BOUNDS, scratch, &self.latency_mid);
        rng.multinomial(n, &self.prediction, scratch);
        add_counts(
            &mut c.prediction,
            &prediction_bounds(),
            scratch,
            &self.prediction_mid,
        );
    }
}

fn add_counts(h: &mut Histogram, bounds: &[f64], counts: &[u64], mid: &[f64]) {
    if h.buckets.is_empty() {
        h.buckets = bounds.iter().map(|&le| Bucket { le, count: 0 }).collect();
    }
    let mut running = 0;
    for (i, b) in h.buckets.iter_mut().enumerate() {
        running += counts[i];
        b.count += running;
    }
    let n: u64 = counts.iter().sum();
    h.count += n;
    h.sum += counts
        .iter()
        .zip(mid)
        .map(|(&k, &m)| k as f64 * m)
        .sum::<f64>();
}

/// One-sided p-value of a two-proportion z-test (pooled variance) that the canary is worse.
fn naive_p(xt: f64, nt: f64, xc: f64, nc: f64, worse_when_higher: bool) -> f64 {
    if nt <= 0.0 || nc <= 0.0 {
        return 1.0;
    }
    let p = (xt + xc) / (nt + nc);
    let se = (p * (1.0 - p) * (1.0 / nt + 1.0 / nc)).sqrt();
    if se <= 0.0 {
        return 1.0;
    }
    let z = (xt / nt - xc / nc) / se;
    let z = if worse_when_higher { z } else { -z };
    1.0 - normal_cdf(z)
}

/// Whether the naive test alarms: each statistical metric tested at `alpha` on the pooled
/// post-warm-up evidence, no correction, no sequential boundary.
fn naive_alarm(judge: &Judge, alpha: f64) -> bool {
    let ev = &judge.ledger().rollout;
    let (Some(t), Some(c)) = (ev.variants.get("canary"), ev.variants.get("control")) else {
        return false;
    };
    let min = judge.config().min_requests;
    if t.requests < min || c.requests < min {
        return false;
    }
    let f = |x: u64| x as f64;
    let mut ps = vec![naive_p(
        f(t.errors()),
        f(t.responses_total()),
        f(c.errors()),
        f(c.responses_total()),
        true,
    )];
    for b in &judge.config().business {
        let get = |c: &Counters| f(c.outcomes.get(&b.outcome).copied().unwrap_or(0));
        ps.push(naive_p(get(t), f(t.requests), get(c), f(c.requests), false));
    }
    if judge.config().latency.enabled {
        for q in &judge.config().latency.quantiles {
            // The bound under the control's quantile, recomputed at every look.
            let rank = q.quantile * c.latency.count as f64;
            if let Some(b) = c.latency.buckets.iter().find(|b| b.count as f64 >= rank) {
                ps.push(naive_p(
                    count_above(&t.latency, b.le),
                    f(t.latency.count),
                    count_above(&c.latency, b.le),
                    f(c.latency.count),
                    true,
                ));
            }
        }
    }
    ps.iter().any(|&p| p < alpha)
}

/// Whether a χ² test of this stage's split at `alpha`, repeated every look, halts.
fn naive_srm(judge: &Judge, alpha: f64) -> bool {
    let l = judge.ledger();
    let w_canary = l.weights.get("canary").copied().unwrap_or(0.0) / 100.0;
    if w_canary <= 0.0 || w_canary >= 1.0 {
        return false;
    }
    let count = |v: &str| l.stage.variants.get(v).map_or(0, |c| c.requests);
    let (_, p) = chi_square(
        &[count("canary"), count("control")],
        &[w_canary, 1.0 - w_canary],
    );
    p < alpha
}

/// Adds `n` requests spread evenly over `groups` replicate groups (independent requests).
fn spread_replicates(
    rng: &mut Rng,
    n: u64,
    groups: usize,
    c: &mut Counters,
    scratch: &mut Vec<u64>,
) {
    if groups == 0 {
        return;
    }
    let probs = vec![1.0 / groups as f64; groups];
    rng.multinomial(n, &probs, scratch);
    add_replicates(c, scratch);
}

fn add_replicates(c: &mut Counters, counts: &[u64]) {
    if c.replicates.len() < counts.len() {
        c.replicates.resize(counts.len(), 0);
    }
    for (a, b) in c.replicates.iter_mut().zip(counts) {
        *a += b;
    }
}

/// Runs one synthetic rollout.
pub fn rollout(s: &Scenario, rng: &mut Rng) -> Outcome {
    let control = Model::new(s.control);
    let canary = Model::new(s.canary);
    let mut judge = Judge::new(s.config.clone());
    let groups = s.replicates.max(1);
    let population = s.users.map(|u| Population::draw(u, groups, rng));
    let same = s.canary == s.control;
    let mut counters: BTreeMap<String, Counters> = BTreeMap::new();
    counters.insert("control".into(), Counters::default());
    counters.insert("canary".into(), Counters::default());
    let mut out = Outcome::default();
    let mut scratch = Vec::new();
    let per_interval = (s.rps * s.interval).round() as u64;
    let mut t = 0.0;
    let mut seen = 0u64;
    let last_stage = s.stages.len().saturating_sub(1);
    for (i, &(weight, seconds)) in s.stages.iter().enumerate() {
        let weights = BTreeMap::from([
            ("control".to_string(), 100.0 - weight),
            ("canary".to_string(), weight),
        ]);
        let share = ((weight + s.skew) / 100.0).clamp(0.0, 1.0);
        let steps = (seconds / s.interval).round() as usize;
        if s.independent_stages && i > 0 {
            judge = Judge::new(s.config.clone());
        }
        // Per-user traffic: each replicate group's expected requests per interval.
        let user_rates = population.as_ref().map(|p| {
            let (t, c) = p.shares((share * 10_000.0).round() as u32, groups);
            let per = s.rps * s.interval;
            (
                t.iter().map(|x| x * per).collect::<Vec<f64>>(),
                c.iter().map(|x| x * per).collect::<Vec<f64>>(),
            )
        });
        for step in 0..=steps {
            // The snapshot at the stage's first instant carries the new weights; traffic
            // after it follows them.
            if step > 0 {
                let (a, b) = match &user_rates {
                    Some((rt, rc)) => {
                        let mut draw = |rates: &[f64], name: &str| {
                            let counts: Vec<u64> = rates.iter().map(|&m| rng.poisson(m)).collect();
                            if s.replicates > 0 {
                                if let Some(c) = counters.get_mut(name) {
                                    add_replicates(c, &counts);
                                }
                            }
                            counts.iter().sum::<u64>()
                        };
                        (draw(rt, "canary"), draw(rc, "control"))
                    }
                    None => {
                        let n_canary = rng.binomial(per_interval, share);
                        (n_canary, per_interval - n_canary)
                    }
                };
                if let Some(c) = counters.get_mut("canary") {
                    if user_rates.is_none() {
                        spread_replicates(rng, a, s.replicates, c, &mut scratch);
                    }
                    canary.draw(rng, a, c, &mut scratch);
                }
                if let Some(c) = counters.get_mut("control") {
                    if user_rates.is_none() {
                        spread_replicates(rng, b, s.replicates, c, &mut scratch);
                    }
                    control.draw(rng, b, c, &mut scratch);
                }
                t += s.interval;
            }
            let snap = Snapshot {
                at: t,
                experiment: s.name.clone(),
                control: "control".into(),
                canary: Some("canary".into()),
                weights: weights.clone(),
                variants: counters.clone(),
                health: Default::default(),
                stage_started_at: None,
            };
            let e = judge.observe(&snap);
            if out.naive.is_none() && naive_alarm(&judge, s.config.alpha) {
                out.naive = Some(t);
            }
            if out.naive_halt.is_none() && naive_srm(&judge, s.config.srm.alpha) {
                out.naive_halt = Some(t);
            }
            match e.decision {
                Decision::RollBack if out.rolled_back.is_none() => out.rolled_back = Some(t),
                Decision::Halt if out.halted.is_none() => out.halted = Some(t),
                Decision::Promote => out.stage_promoted |= 1 << i.min(31),
                _ => {}
            }
            for v in &e.verdicts {
                if v.guardrail == "prediction_drift" && v.label == Label::Fail {
                    out.drift_failed = true;
                }
                let (Kind::Statistical, Some([lo, hi])) = (v.kind, v.interval) else {
                    continue;
                };
                let truth = if v.guardrail == "error_rate" {
                    Some(s.canary.error - s.control.error)
                } else if same {
                    Some(0.0)
                } else {
                    None
                };
                if let Some(x) = truth {
                    if x < lo || x > hi {
                        out.interval_missed_any = true;
                        if v.guardrail == "error_rate" {
                            out.interval_missed_error = true;
                        }
                    }
                }
            }
            if i == last_stage && step == steps {
                out.promoted = e.decision == Decision::Promote;
            }
            seen = e.rollout_requests.canary + e.rollout_requests.control;
            let done_judge = out.rolled_back.is_some() || out.halted.is_some();
            if !s.independent_stages
                && done_judge
                && out.naive.is_some()
                && out.naive_halt.is_some()
            {
                return out;
            }
            if s.max_requests.is_some_and(|m| seen >= m) {
                return out;
            }
        }
    }
    let _ = seen;
    out
}

/// Rates over many rollouts.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Summary {
    pub scenario: String,
    pub description: String,
    pub runs: usize,
    /// Whether the canary truly differs: rollbacks are then power, else false rollbacks.
    pub regression: bool,
    pub rollbacks: usize,
    pub rollback_rate: f64,
    /// 95 % Wilson interval of the rollback rate.
    pub rollback_ci: [f64; 2],
    pub halts: usize,
    pub halt_rate: f64,
    pub halt_ci: [f64; 2],
    /// Rollouts whose last stage ended with "promote".
    pub promotions: usize,
    /// Median seconds from the start to the rollback, over rollouts rolled back.
    pub median_detect_seconds: Option<f64>,
    pub naive_rollbacks: usize,
    pub naive_rate: f64,
    pub naive_ci: [f64; 2],
    pub naive_median_detect_seconds: Option<f64>,
    pub naive_halts: usize,
    pub naive_halt_rate: f64,
    pub naive_halt_ci: [f64; 2],
    /// Seconds the rollout lasts when nothing fires.
    pub duration_seconds: f64,
    /// Per stage: (canary weight, rollouts in which it reached "promote" at some look, rate,
    /// 95 % interval).
    pub stage_promotions: Vec<(f64, usize, f64, [f64; 2])>,
    /// Rollouts in which the error-rate interval excluded the true difference at some look.
    pub interval_missed_error: usize,
    pub interval_missed_error_rate: f64,
    pub interval_missed_error_ci: [f64; 2],
    /// The same for any statistical interval whose true difference is known.
    pub interval_missed_any: usize,
    pub interval_missed_any_rate: f64,
    pub interval_missed_any_ci: [f64; 2],
    /// Rollouts in which the drift guardrail failed at some look.
    pub drift_failed: usize,
    pub drift_failed_rate: f64,
    pub drift_failed_ci: [f64; 2],
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[m]
    } else {
        0.5 * (v[m - 1] + v[m])
    })
}

/// Runs `runs` rollouts of `s` on `threads` threads.
pub fn run_scenario(s: &Scenario, index: u64, runs: usize, seed: u64, threads: usize) -> Summary {
    let threads = threads.clamp(1, runs.max(1));
    let mut outcomes = vec![Outcome::default(); runs];
    let chunk = runs.div_ceil(threads);
    std::thread::scope(|scope| {
        for (c, slot) in outcomes.chunks_mut(chunk).enumerate() {
            scope.spawn(move || {
                for (j, o) in slot.iter_mut().enumerate() {
                    let run = (c * chunk + j) as u64;
                    let mut rng = Rng::new(&[seed, index, run]);
                    *o = rollout(s, &mut rng);
                }
            });
        }
    });
    let n = runs as f64;
    let z = normal_quantile(0.975);
    let rate = |k: usize| {
        let (lo, hi) = wilson(k as f64, n, z);
        (k as f64 / n, [lo, hi])
    };
    let rollbacks = outcomes.iter().filter(|o| o.rolled_back.is_some()).count();
    let halts = outcomes.iter().filter(|o| o.halted.is_some()).count();
    let naive = outcomes.iter().filter(|o| o.naive.is_some()).count();
    let (rollback_rate, rollback_ci) = rate(rollbacks);
    let (halt_rate, halt_ci) = rate(halts);
    let (naive_rate, naive_ci) = rate(naive);
    let naive_halts = outcomes.iter().filter(|o| o.naive_halt.is_some()).count();
    let (naive_halt_rate, naive_halt_ci) = rate(naive_halts);
    let count = |f: &dyn Fn(&Outcome) -> bool| outcomes.iter().filter(|o| f(o)).count();
    let stage_promotions = s
        .stages
        .iter()
        .enumerate()
        .map(|(i, &(w, _))| {
            let k = count(&|o: &Outcome| o.stage_promoted & (1 << i.min(31)) != 0);
            let (r, ci) = rate(k);
            (w, k, r, ci)
        })
        .collect();
    let missed_error = count(&|o: &Outcome| o.interval_missed_error);
    let missed_any = count(&|o: &Outcome| o.interval_missed_any);
    let drift_failed = count(&|o: &Outcome| o.drift_failed);
    let (interval_missed_error_rate, interval_missed_error_ci) = rate(missed_error);
    let (interval_missed_any_rate, interval_missed_any_ci) = rate(missed_any);
    let (drift_failed_rate, drift_failed_ci) = rate(drift_failed);
    Summary {
        stage_promotions,
        interval_missed_error: missed_error,
        interval_missed_error_rate,
        interval_missed_error_ci,
        interval_missed_any: missed_any,
        interval_missed_any_rate,
        interval_missed_any_ci,
        drift_failed,
        drift_failed_rate,
        drift_failed_ci,
        scenario: s.name.clone(),
        description: s.description.clone(),
        runs,
        regression: s.regression,
        rollbacks,
        rollback_rate,
        rollback_ci,
        halts,
        halt_rate,
        halt_ci,
        promotions: outcomes.iter().filter(|o| o.promoted).count(),
        median_detect_seconds: median(outcomes.iter().filter_map(|o| o.rolled_back).collect()),
        naive_rollbacks: naive,
        naive_rate,
        naive_ci,
        naive_median_detect_seconds: median(outcomes.iter().filter_map(|o| o.naive).collect()),
        naive_halts,
        naive_halt_rate,
        naive_halt_ci,
        duration_seconds: s.stages.iter().map(|s| s.1).sum(),
    }
}

/// The guardrails the scenarios judge with: the defaults plus a conversion metric (`click`).
pub fn config() -> GuardrailConfig {
    GuardrailConfig {
        business: vec![BusinessConfig {
            outcome: "click".into(),
            ..BusinessConfig::default()
        }],
        ..GuardrailConfig::default()
    }
}

/// [`config`] with the conversion margin at the 2 % the conversion scenario looks for.
pub fn conversion_config() -> GuardrailConfig {
    let mut c = config();
    for b in &mut c.business {
        b.margin = crate::judge::config::Margin::new(0.02, 0.0);
    }
    c
}

/// The default ramp: 1, 5, 10, 25, 50 %, each 1 minute of warm-up and 10 minutes of bake.
fn ramp() -> Vec<(f64, f64)> {
    [1.0, 5.0, 10.0, 25.0, 50.0]
        .iter()
        .map(|&w| (w, 660.0))
        .collect()
}

/// Seconds a 50 % stage needs, per `sluice plan`, to catch a 2 % relative conversion drop
/// from 5 % with 80 % power under `cfg`.
pub fn planned_conversion_seconds(cfg: &GuardrailConfig, rps: f64) -> f64 {
    let m = cfg.statistical_count().max(1) as f64;
    let q = plan::Question {
        baseline: 0.05,
        delta: 0.001,
        lower_is_better: false,
        level: cfg.alpha / m,
        power: 0.8,
        tuning_alpha: cfg.alpha,
    };
    plan::need(&q, rps, 50.0).seconds
}

/// The named scenario.
pub fn scenario(name: &str, rps: f64) -> Result<Scenario, SimulateError> {
    let base = Traffic::default();
    let cfg = config();
    let s = |description: &str, canary: Traffic, regression: bool| Scenario {
        name: name.to_string(),
        description: description.to_string(),
        stages: ramp(),
        interval: 10.0,
        rps,
        control: base,
        canary,
        skew: 0.0,
        config: cfg.clone(),
        max_requests: None,
        regression,
        users: None,
        replicates: REPLICATES,
        independent_stages: false,
    };
    Ok(match name {
        "aa" => s("A/A: canary identical to control; ramp 1-5-10-25-50 %, 11 min per stage, a look every 10 s", base, false),
        "error" => s(
            "5xx share 1 % → 2 % on the canary; same ramp",
            Traffic { error: 0.02, ..base },
            true,
        ),
        "latency" => s(
            "canary latency 25 % slower throughout (log-normal median 40 → 50 ms); same ramp",
            Traffic { latency_median: 50.0, ..base },
            true,
        ),
        "drift" => Scenario {
            config: GuardrailConfig {
                drift: crate::judge::config::DriftConfig {
                    critical: true,
                    ..Default::default()
                },
                ..cfg.clone()
            },
            ..s(
                "canary prediction mean 0.30 → 0.33 (+10 %), drift made critical; same ramp",
                Traffic { prediction_mean: 0.33, ..base },
                true,
            )
        },
        "conversion" => {
            let seconds = planned_conversion_seconds(&conversion_config(), rps);
            let k = f64::from(cfg.consecutive.saturating_sub(1));
            let interval = 60.0;
            let stage = cfg.warmup + seconds + k * interval;
            Scenario {
                stages: vec![(50.0, (stage / interval).ceil() * interval)],
                interval,
                // As `sluice plan` assumes: the margin is the change worth finding, so the
                // judge's mixture is tuned to it.
                config: conversion_config(),
                ..s(
                    &format!(
                        "conversion 5 % → 4.9 % (−2 % relative) at one 50 % stage lasting what `sluice plan` predicts ({:.0} s + warm-up + {} confirming looks), a look every 60 s",
                        seconds, cfg.consecutive.saturating_sub(1)
                    ),
                    Traffic { conversion: 0.049, ..base },
                    true,
                )
            }
        }
        "srm" => Scenario {
            stages: vec![(50.0, 60.0 + 3600.0)],
            skew: 1.0,
            max_requests: Some(100_000),
            ..s(
                "split 51/49 where the weights say 50/50; stops at 100,000 requests after warm-up",
                base,
                true,
            )
        },
        "aa_drift" => Scenario {
            config: GuardrailConfig {
                drift: crate::judge::config::DriftConfig {
                    critical: true,
                    ..Default::default()
                },
                ..cfg.clone()
            },
            ..s(
                "A/A with drift made critical (a drift failure sustained for K looks rolls back); same ramp",
                base,
                false,
            )
        },
        "margin" => {
            let control = Traffic { error: 0.005, ..base };
            // The error rate alone, so that a promotion is its non-inferiority test passing
            // (the β each guardrail promises), not held back by the other guardrails.
            let mut config = GuardrailConfig::default();
            config.latency.enabled = false;
            Scenario {
                control,
                config,
                independent_stages: true,
                ..s(
                    "5xx share 0.5 % → 0.725 %: exactly at the default margin (×1.25 + 0.1 point), so every promotion is false; error-rate guardrail only; each stage of the ramp judged on its own",
                    Traffic { error: 0.00725, ..base },
                    true,
                )
            }
        }
        "users_aa" | "users_aa_heavy" => {
            let (count, sigma) = population(name);
            Scenario {
                users: Some(Users { count, sigma }),
                ..s(
                    &format!("A/A with {count} users who keep their variant, activity log-normal σ = {sigma}; same ramp"),
                    base,
                    false,
                )
            }
        }
        "users_srm" | "users_srm_heavy" => {
            let (count, sigma) = population(name);
            Scenario {
                stages: vec![(50.0, 60.0 + 3600.0)],
                skew: 1.0,
                users: Some(Users { count, sigma }),
                ..s(
                    &format!("51 % of {count} users (activity log-normal σ = {sigma}) on the canary where the weights say 50 %; one hour"),
                    base,
                    true,
                )
            }
        }
        other => return Err(SimulateError::Scenario(other.to_string())),
    })
}

/// The users of a per-user scenario: 100,000 of activity σ = 0.5, or (`*_heavy`) 50,000 of
/// σ = 1.
fn population(name: &str) -> (usize, f64) {
    if name.ends_with("_heavy") {
        (50_000, 1.0)
    } else {
        (100_000, 0.5)
    }
}

/// Runs `sluice simulate`.
pub fn run(args: &SimulateArgs, out: &mut impl Write) -> Result<(), SimulateError> {
    if let Some(SimulateWhat::Breaker(b)) = &args.what {
        return Ok(breaker::run(b, out)?);
    }
    if args.runs == 0 {
        return Err(SimulateError::Runs);
    }
    let names: Vec<String> = if args.scenario.is_empty() {
        SCENARIOS.iter().map(|s| s.to_string()).collect()
    } else {
        args.scenario.clone()
    };
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let mut scenarios = names
        .iter()
        .map(|n| scenario(n, args.rps))
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(r) = args.replicates {
        for s in &mut scenarios {
            s.replicates = r;
        }
    }
    if !args.json {
        let c = &scenarios[0].config;
        writeln!(
            out,
            "judge: alpha {} (false rollback per rollout), beta {}, {} consecutive, warm-up {}s, min {} requests; naive: each metric's z-test at {} every look\n",
            c.alpha, c.beta, c.consecutive, c.warmup, c.min_requests, c.alpha
        )?;
    }
    for (i, s) in scenarios.iter().enumerate() {
        let started = std::time::Instant::now();
        // A scenario's stream depends on its name, not its position in the list.
        let index = SCENARIOS.iter().position(|n| *n == s.name).unwrap_or(i) as u64;
        let sum = run_scenario(s, index, args.runs, args.seed, threads);
        if args.json {
            serde_json::to_writer(&mut *out, &sum)?;
            writeln!(out)?;
            continue;
        }
        let pct = |x: f64| format!("{:.2} %", 100.0 * x);
        let ci = |c: [f64; 2]| format!("[{}, {}]", pct(c[0]), pct(c[1]));
        let mins = |x: Option<f64>| x.map_or("-".into(), |s| format!("{:.1} min", s / 60.0));
        writeln!(out, "{} — {}", s.name, s.description)?;
        let what = if s.regression {
            "power"
        } else {
            "false rollbacks"
        };
        writeln!(
            out,
            "  judge: {what} {} {} ({} of {}), median time to rollback {}; halts {} {}; last stage promoted {}",
            pct(sum.rollback_rate),
            ci(sum.rollback_ci),
            sum.rollbacks,
            sum.runs,
            mins(sum.median_detect_seconds),
            pct(sum.halt_rate),
            ci(sum.halt_ci),
            sum.promotions
        )?;
        writeln!(
            out,
            "  naive: rollbacks {} {}, median time to alarm {}; χ² halts {} {}",
            pct(sum.naive_rate),
            ci(sum.naive_ci),
            mins(sum.naive_median_detect_seconds),
            pct(sum.naive_halt_rate),
            ci(sum.naive_halt_ci),
        )?;
        let stages: Vec<String> = sum
            .stage_promotions
            .iter()
            .map(|(w, _, r, c)| format!("{w} %: {} {}", pct(*r), ci(*c)))
            .collect();
        writeln!(
            out,
            "  promoted at some look, per stage: {}",
            stages.join("; ")
        )?;
        writeln!(
            out,
            "  interval missed the true difference at some look: error rate {} {}, any known {} {}; drift failed at some look {} {}",
            pct(sum.interval_missed_error_rate),
            ci(sum.interval_missed_error_ci),
            pct(sum.interval_missed_any_rate),
            ci(sum.interval_missed_any_ci),
            pct(sum.drift_failed_rate),
            ci(sum.drift_failed_ci),
        )?;
        writeln!(out, "  ({:.1} s)\n", started.elapsed().as_secs_f64())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
