//! `sluice simulate breaker`: the filter's breaker rule ([`sluice_filter::breaker`], the very
//! code the proxy runs) on synthetic traffic, for the user's parameters and request rate.
//!
//! Measures the false-trip rate when the treatment fails exactly as often as the control (A/A),
//! the same with the treatment right at the ceiling the rule tests against (where α alone
//! holds trips back), and the time from a fault to the trip at multiples of the control's
//! failure rate and at absolute failure rates.
//!
//! Requests arrive as Poisson processes per variant; failures are binomial. Counts are added
//! in steps no longer than a time bucket and judged at every tick, as the host does on the
//! merged process-wide counts. Propagation from the tick that trips to the other workers
//! (one more tick at most) is the host's and is not included.

use std::io::Write;

use rand::SeedableRng;
use rand_distr::{Binomial, Distribution, Poisson};
use rand_xoshiro::Xoshiro256PlusPlus;
use serde::Serialize;

use sluice_filter::breaker::binomial::upper_tail;
use sluice_filter::breaker::{judge, Counts, FailureKind, Params, Verdict, Window, BUCKETS};
use sluice_filter::config::breaker as defaults;

use crate::judge::sequential::{normal_quantile, wilson};

/// Arguments of `sluice simulate breaker`.
#[derive(Debug, Clone, clap::Args)]
pub struct BreakerArgs {
    /// Runs per scenario.
    #[arg(long, default_value_t = 400)]
    pub runs: usize,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Requests per second reaching the experiment (all variants).
    #[arg(long, default_value_t = 300.0)]
    pub rps: f64,
    /// The treatment's weight, percent.
    #[arg(long, default_value_t = 10.0)]
    pub weight: f64,
    /// The control's failure rate (and the treatment's in the A/A scenario).
    #[arg(long, default_value_t = 0.005)]
    pub control_error_rate: f64,
    #[arg(long, default_value_t = defaults::DEFAULT_WINDOW_SECONDS)]
    pub window_seconds: u64,
    #[arg(long, default_value_t = defaults::DEFAULT_MIN_REQUESTS)]
    pub min_requests: u64,
    #[arg(long, default_value_t = defaults::DEFAULT_MAX_ERROR_RATE)]
    pub max_error_rate: f64,
    #[arg(long, default_value_t = defaults::DEFAULT_MAX_RATIO_TO_CONTROL)]
    pub max_ratio_to_control: f64,
    #[arg(long, default_value_t = defaults::DEFAULT_SIGNIFICANCE)]
    pub significance: f64,
    /// How often the rule is evaluated, milliseconds (the filter's breaker tick).
    #[arg(long, default_value_t = 200)]
    pub tick_ms: u64,
    /// Simulated hours per A/A run.
    #[arg(long, default_value_t = 1.0)]
    pub hours: f64,
    /// Treatment failure rates to detect, as multiples of the control's.
    #[arg(long, value_delimiter = ',', default_value = "2,5,20")]
    pub multipliers: Vec<f64>,
    /// Treatment failure rates to detect, absolute.
    #[arg(long, value_delimiter = ',', default_value = "0.2,1")]
    pub fault_rates: Vec<f64>,
    /// Longest wait for a trip after the fault starts, seconds.
    #[arg(long, default_value_t = 60.0)]
    pub cap_seconds: f64,
    /// Worker threads (default: available cores).
    #[arg(long)]
    pub threads: Option<usize>,
    #[arg(long)]
    pub json: bool,
}

/// Why the simulation cannot run.
#[derive(Debug, thiserror::Error)]
pub enum BreakerSimError {
    #[error("--runs must be at least 1")]
    Runs,
    #[error("invalid breaker parameters: {0}")]
    Params(#[from] sluice_filter::config::ConfigError),
    #[error("{0} must be a fraction from 0 to 1")]
    Rate(&'static str),
    #[error(
        "--rps, --weight, --hours, --cap-seconds and --tick-ms must be positive (weight below 100)"
    )]
    Traffic,
    #[error("writing output: {0}")]
    Output(#[from] std::io::Error),
    #[error("encoding output: {0}")]
    Encode(#[from] serde_json::Error),
}

/// One scenario's result.
#[derive(Debug, Clone, Serialize)]
pub struct BreakerSummary {
    pub scenario: String,
    /// The treatment's true failure rate.
    pub treatment_rate: f64,
    pub runs: usize,
    /// A/A scenarios: trips per simulated hour (the window restarts after each trip, as
    /// after the controller's push), with the runs' hours as exposure.
    pub trips_per_hour: Option<f64>,
    /// A/A scenarios: share of runs (each `hours` long) with at least one trip, and its 95 %
    /// Wilson interval.
    pub runs_tripped: Option<f64>,
    pub runs_tripped_ci: Option<[f64; 2]>,
    /// Fault scenarios: share of runs tripped within the cap.
    pub detected: Option<f64>,
    /// Fault scenarios: seconds from the fault to the trip (median, 95th percentile, max over
    /// the runs that tripped).
    pub seconds_median: Option<f64>,
    pub seconds_p95: Option<f64>,
    pub seconds_max: Option<f64>,
    /// Fault scenarios: the treatment's failed requests before the trip, median.
    pub failures_median: Option<f64>,
    /// The ratio-only rule ([`ratio_only`]) on the same traffic: trips per hour (A/A), or
    /// share detected and median seconds to trip (faults).
    pub ratio_only_trips_per_hour: Option<f64>,
    pub ratio_only_detected: Option<f64>,
    pub ratio_only_seconds_median: Option<f64>,
}

struct Run {
    /// Trips (A/A) or the first trip's time in seconds after the fault.
    trips: u64,
    tripped_at: Option<f64>,
    failures: u64,
    /// The same for the ratio-only rule (see [`ratio_only`]).
    alt_trips: u64,
    alt_tripped_at: Option<f64>,
}

/// The rule the breaker does not use, for comparison: the treatment's observed rate above
/// `max_error_rate` and above `max_ratio_to_control` × the control's, and the exact test
/// against `max_ratio_to_control` × the control's rate only (the control's rate floored at
/// 1 / its requests, so a control without failures does not make every failure
/// significant), on the same suffixes at the same level.
pub fn ratio_only(p: &Params, window: &Window, now_ms: u64) -> bool {
    let alpha = p.significance / BUCKETS as f64;
    (1..=BUCKETS).any(|b| {
        let c = window.suffix(now_ms, b);
        let (Some(ctl), Some(t)) = (c.first(), c.get(1)) else {
            return false;
        };
        let (n, k) = (t.requests, t.failed());
        if n < p.min_requests || n == 0 {
            return false;
        }
        let rate = k as f64 / n as f64;
        let floor = 1.0 / ctl.requests.max(1) as f64;
        let null = (p.max_ratio_to_control * ctl.rate().max(floor)).min(1.0);
        rate > p.max_error_rate && rate > null && upper_tail(n, k, null) <= alpha
    })
}

/// Traffic of one scenario.
#[derive(Debug, Clone, Copy)]
struct Traffic {
    control_rps: f64,
    treatment_rps: f64,
    control_rate: f64,
    /// The treatment's rate before the fault (the control's) and after it.
    healthy_rate: f64,
    fault_rate: f64,
    /// Seconds of healthy traffic before the fault (a full window), then seconds to run.
    warmup_s: f64,
    run_s: f64,
    /// A/A: keep going after a trip with a fresh window; fault: stop at the first trip.
    count_all: bool,
}

const START_MS: u64 = 1_700_000_000_000;

fn simulate(p: &Params, tick_ms: u64, t: Traffic, rng: &mut Xoshiro256PlusPlus) -> Run {
    let step_ms = tick_ms.min(p.bucket_ms()).max(1);
    let dt = step_ms as f64 / 1000.0;
    let total_ms = ((t.warmup_s + t.run_s) * 1000.0) as u64;
    let fault_ms = (t.warmup_s * 1000.0) as u64;
    let mut window = Window::new(p, 2);
    let mut alt = Window::new(p, 2);
    let mut run = Run {
        trips: 0,
        tripped_at: None,
        failures: 0,
        alt_trips: 0,
        alt_tripped_at: None,
    };
    let mut done = false;
    let mut alt_done = false;
    let draw = |rng: &mut Xoshiro256PlusPlus, rps: f64, rate: f64| -> Counts {
        let n = Poisson::new(rps * dt).map_or(0.0, |d| d.sample(rng)) as u64;
        let k = if n == 0 || rate <= 0.0 {
            0
        } else {
            Binomial::new(n, rate.min(1.0)).map_or(0, |d| d.sample(rng))
        };
        let mut c = Counts {
            requests: n,
            ..Counts::default()
        };
        c.failures[FailureKind::Status5xx.index()] = k;
        c
    };
    let mut elapsed = 0;
    let mut next_tick = tick_ms;
    while elapsed < total_ms {
        let now = START_MS + elapsed;
        let rate = if elapsed >= fault_ms {
            t.fault_rate
        } else {
            t.healthy_rate
        };
        let c = draw(rng, t.control_rps, t.control_rate);
        window.add(now, 0, &c);
        alt.add(now, 0, &c);
        let tr = draw(rng, t.treatment_rps, rate);
        if elapsed >= fault_ms && !done {
            run.failures += tr.failed();
        }
        window.add(now, 1, &tr);
        alt.add(now, 1, &tr);
        elapsed += step_ms;
        if elapsed >= next_tick {
            next_tick += tick_ms;
            let at = (elapsed.saturating_sub(fault_ms)) as f64 / 1000.0;
            // Judged at the end of the step: the counts up to this moment.
            let end = START_MS + elapsed - 1;
            if !done {
                if let Verdict::Trip(_) = judge(p, &window, 1, 0, end) {
                    run.trips += 1;
                    run.tripped_at.get_or_insert(at);
                    done = !t.count_all;
                    window = Window::new(p, 2);
                }
            }
            if !alt_done && ratio_only(p, &alt, end) {
                run.alt_trips += 1;
                run.alt_tripped_at.get_or_insert(at);
                alt_done = !t.count_all;
                alt = Window::new(p, 2);
            }
            if done && alt_done {
                break;
            }
        }
    }
    run
}

fn quantile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted.get(i.min(sorted.len() - 1)).copied()
}

#[allow(clippy::too_many_arguments)]
fn scenario(
    name: String,
    p: &Params,
    args: &BreakerArgs,
    t: Traffic,
    index: u64,
    threads: usize,
) -> BreakerSummary {
    let runs = args.runs;
    let threads = threads.clamp(1, runs);
    let chunk = runs.div_ceil(threads);
    let mut results: Vec<Option<Run>> = (0..runs).map(|_| None).collect();
    std::thread::scope(|s| {
        for (c, slot) in results.chunks_mut(chunk).enumerate() {
            s.spawn(move || {
                for (j, r) in slot.iter_mut().enumerate() {
                    let run = (c * chunk + j) as u64;
                    let seed = args
                        .seed
                        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                        .wrapping_add(index << 32)
                        .wrapping_add(run);
                    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
                    *r = Some(simulate(p, args.tick_ms, t, &mut rng));
                }
            });
        }
    });
    let results: Vec<Run> = results.into_iter().flatten().collect();
    let n = results.len() as f64;
    let mut summary = BreakerSummary {
        scenario: name,
        treatment_rate: t.fault_rate,
        runs,
        trips_per_hour: None,
        runs_tripped: None,
        runs_tripped_ci: None,
        detected: None,
        seconds_median: None,
        seconds_p95: None,
        seconds_max: None,
        failures_median: None,
        ratio_only_trips_per_hour: None,
        ratio_only_detected: None,
        ratio_only_seconds_median: None,
    };
    if t.count_all {
        let trips: u64 = results.iter().map(|r| r.trips).sum();
        let tripped = results.iter().filter(|r| r.trips > 0).count() as f64;
        summary.trips_per_hour = Some(trips as f64 / (n * t.run_s / 3600.0));
        summary.runs_tripped = Some(tripped / n);
        let (lo, hi) = wilson(tripped, n, normal_quantile(0.975));
        summary.runs_tripped_ci = Some([lo, hi]);
        let alt: u64 = results.iter().map(|r| r.alt_trips).sum();
        summary.ratio_only_trips_per_hour = Some(alt as f64 / (n * t.run_s / 3600.0));
    } else {
        let mut secs: Vec<f64> = results.iter().filter_map(|r| r.tripped_at).collect();
        secs.sort_by(f64::total_cmp);
        let mut fails: Vec<f64> = results
            .iter()
            .filter(|r| r.tripped_at.is_some())
            .map(|r| r.failures as f64)
            .collect();
        fails.sort_by(f64::total_cmp);
        summary.detected = Some(secs.len() as f64 / n);
        summary.seconds_median = quantile(&secs, 0.5);
        summary.seconds_p95 = quantile(&secs, 0.95);
        summary.seconds_max = secs.last().copied();
        summary.failures_median = quantile(&fails, 0.5);
        let mut alt: Vec<f64> = results.iter().filter_map(|r| r.alt_tripped_at).collect();
        alt.sort_by(f64::total_cmp);
        summary.ratio_only_detected = Some(alt.len() as f64 / n);
        summary.ratio_only_seconds_median = quantile(&alt, 0.5);
    }
    summary
}

/// The breaker parameters the arguments give, checked as the filter checks its config.
pub fn params(args: &BreakerArgs) -> Result<Params, BreakerSimError> {
    let c = sluice_filter::config::BreakerConfig {
        window_seconds: args.window_seconds,
        min_requests: args.min_requests,
        max_error_rate: args.max_error_rate,
        max_ratio_to_control: args.max_ratio_to_control,
        significance: args.significance,
    };
    Ok(defaults::check(&c, "breaker")?)
}

/// Runs every scenario; returns the summaries in order.
pub fn summaries(args: &BreakerArgs) -> Result<Vec<BreakerSummary>, BreakerSimError> {
    if args.runs == 0 {
        return Err(BreakerSimError::Runs);
    }
    let p = params(args)?;
    let rate_ok = |r: f64| (0.0..=1.0).contains(&r);
    if !rate_ok(args.control_error_rate) {
        return Err(BreakerSimError::Rate("--control-error-rate"));
    }
    if !args.fault_rates.iter().all(|&r| rate_ok(r)) {
        return Err(BreakerSimError::Rate("--fault-rates"));
    }
    let positive = |x: f64| x.is_finite() && x > 0.0;
    if !(positive(args.rps)
        && positive(args.weight)
        && args.weight < 100.0
        && positive(args.hours)
        && positive(args.cap_seconds)
        && args.tick_ms > 0
        && args.multipliers.iter().all(|&m| positive(m)))
    {
        return Err(BreakerSimError::Traffic);
    }
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let w = args.weight / 100.0;
    let pc = args.control_error_rate;
    let base = Traffic {
        control_rps: args.rps * (1.0 - w),
        treatment_rps: args.rps * w,
        control_rate: pc,
        healthy_rate: pc,
        fault_rate: pc,
        warmup_s: 0.0,
        run_s: args.hours * 3600.0,
        count_all: true,
    };
    let ceiling = p.max_error_rate.max(p.max_ratio_to_control * pc).min(1.0);
    let mut out = vec![
        scenario("aa".into(), &p, args, base, 0, threads),
        scenario(
            "at_ceiling".into(),
            &p,
            args,
            Traffic {
                healthy_rate: ceiling,
                fault_rate: ceiling,
                ..base
            },
            1,
            threads,
        ),
    ];
    // Acceptable by the user's absolute ceiling, yet more than `max_ratio_to_control` × the
    // control: where the two rules differ.
    let below = 0.8 * p.max_error_rate;
    if below > ceiling.min(p.max_ratio_to_control * pc) {
        out.push(scenario(
            "below_ceiling".into(),
            &p,
            args,
            Traffic {
                healthy_rate: below,
                fault_rate: below,
                ..base
            },
            50,
            threads,
        ));
    }
    let fault = Traffic {
        warmup_s: args.window_seconds as f64,
        run_s: args.cap_seconds,
        count_all: false,
        ..base
    };
    for (i, m) in args.multipliers.iter().enumerate() {
        out.push(scenario(
            format!("{m}x"),
            &p,
            args,
            Traffic {
                fault_rate: (m * pc).min(1.0),
                ..fault
            },
            2 + i as u64,
            threads,
        ));
    }
    for (i, r) in args.fault_rates.iter().enumerate() {
        out.push(scenario(
            format!("rate_{r}"),
            &p,
            args,
            Traffic {
                fault_rate: *r,
                ..fault
            },
            100 + i as u64,
            threads,
        ));
    }
    Ok(out)
}

/// Runs `sluice simulate breaker`.
pub fn run(args: &BreakerArgs, out: &mut impl Write) -> Result<(), BreakerSimError> {
    let p = params(args)?;
    if !args.json {
        writeln!(
            out,
            "breaker: window {} s, min {} requests, max error rate {}, max ratio to control {}, significance {}; tick {} ms",
            args.window_seconds,
            p.min_requests,
            p.max_error_rate,
            p.max_ratio_to_control,
            p.significance,
            args.tick_ms
        )?;
        writeln!(
            out,
            "traffic: {} req/s, treatment {} %, control failure rate {}; {} runs per scenario\n",
            args.rps, args.weight, args.control_error_rate, args.runs
        )?;
    }
    for s in summaries(args)? {
        if args.json {
            serde_json::to_writer(&mut *out, &s)?;
            writeln!(out)?;
            continue;
        }
        let pct = |x: f64| format!("{:.2} %", 100.0 * x);
        let secs = |x: Option<f64>| x.map_or("-".into(), |s| format!("{s:.1} s"));
        match (s.trips_per_hour, s.runs_tripped, s.runs_tripped_ci) {
            (Some(per_hour), Some(share), Some([lo, hi])) => writeln!(
                out,
                "{:<12} treatment rate {:<8} trips {per_hour:.4} per hour; runs of {} h with a trip {} [{}, {}] | ratio-only rule: {:.4} per hour",
                s.scenario,
                format!("{:.4}", s.treatment_rate),
                args.hours,
                pct(share),
                pct(lo),
                pct(hi),
                s.ratio_only_trips_per_hour.unwrap_or(0.0)
            )?,
            _ => writeln!(
                out,
                "{:<12} treatment rate {:<8} tripped within {} s: {}; time to trip median {}, p95 {}, max {}; failures served before it (median) {} | ratio-only rule: {}, median {}",
                s.scenario,
                format!("{:.4}", s.treatment_rate),
                args.cap_seconds,
                pct(s.detected.unwrap_or(0.0)),
                secs(s.seconds_median),
                secs(s.seconds_p95),
                secs(s.seconds_max),
                s.failures_median.map_or("-".into(), |f| format!("{f:.0}")),
                pct(s.ratio_only_detected.unwrap_or(0.0)),
                secs(s.ratio_only_seconds_median)
            )?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> BreakerArgs {
        BreakerArgs {
            runs: 40,
            seed: 3,
            rps: 300.0,
            weight: 10.0,
            control_error_rate: 0.005,
            window_seconds: 10,
            min_requests: 50,
            max_error_rate: 0.05,
            max_ratio_to_control: 3.0,
            significance: defaults::DEFAULT_SIGNIFICANCE,
            tick_ms: 200,
            hours: 0.05,
            multipliers: vec![2.0, 20.0],
            fault_rates: vec![1.0],
            cap_seconds: 30.0,
            threads: Some(2),
            json: false,
        }
    }

    fn by_name<'a>(s: &'a [BreakerSummary], name: &str) -> &'a BreakerSummary {
        match s.iter().find(|s| s.scenario == name) {
            Some(x) => x,
            None => unreachable!("no scenario {name}"),
        }
    }

    #[test]
    fn detects_hard_faults_and_not_noise() {
        let s = summaries(&args()).unwrap();
        // A/A at 0.5 % against a 5 % ceiling: no trip in 40 × 3 min.
        assert_eq!(by_name(&s, "aa").trips_per_hour, Some(0.0));
        // 2× (1 %) is below both ceilings: never trips.
        assert_eq!(by_name(&s, "2x").detected, Some(0.0));
        // 20× (10 %) is twice the ceiling: most runs trip within 30 s (98 % within 60 s in
        // the documented 200-run simulation, 80 % within 30 s here).
        let moderate = by_name(&s, "20x").detected.unwrap_or(0.0);
        assert!(moderate >= 0.5, "{moderate}");
        // Every request failing: the healthy requests of the window's last buckets make up
        // `min_requests`, so it trips after some 15 failures (0.5 s at 30 req/s), never
        // waiting for 50 failed requests (1.7 s).
        let hard = by_name(&s, "rate_1");
        assert_eq!(hard.detected, Some(1.0));
        let median = hard.seconds_median.unwrap_or(f64::MAX);
        assert!(median < 1.0, "{median}");
        assert!(hard.seconds_max.unwrap_or(f64::MAX) < 1.7, "{hard:?}");
    }

    #[test]
    fn a_lower_min_requests_trips_a_total_failure_within_a_second() {
        let mut a = args();
        a.min_requests = 10;
        a.multipliers = vec![];
        a.hours = 0.01;
        let s = summaries(&a).unwrap();
        let hard = by_name(&s, "rate_1");
        assert!(hard.seconds_max.unwrap_or(f64::MAX) <= 1.0, "{hard:?}");
    }

    #[test]
    fn arguments_are_checked() {
        let mut a = args();
        a.max_error_rate = 2.0;
        assert!(matches!(summaries(&a), Err(BreakerSimError::Params(_))));
        let mut a = args();
        a.runs = 0;
        assert!(matches!(summaries(&a), Err(BreakerSimError::Runs)));
        let mut a = args();
        a.weight = 100.0;
        assert!(matches!(summaries(&a), Err(BreakerSimError::Traffic)));
        let mut a = args();
        a.fault_rates = vec![1.5];
        assert!(matches!(summaries(&a), Err(BreakerSimError::Rate(_))));
    }
}
