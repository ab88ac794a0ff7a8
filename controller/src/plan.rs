//! `sluice plan`: how many requests, and how long, each stage needs before the judge can
//! find a regression of a given size or prove its absence, for the sequential tests the judge
//! actually runs (not a fixed-horizon formula, which promises too little time).
//!
//! Method: at information I = 1/V the judge's estimate is N(δ, V); its rejection boundary is
//! the estimate at which the normal-mixture e-value (with the judge's own mixture tuning)
//! reaches the level. The stage needs the smallest duration at which the estimate clears that
//! boundary with the requested probability at the last look alone. Crossing at an earlier look
//! can only add power, so the figure is slightly conservative; `sluice simulate` measures the
//! real power at that duration. Consecutive-breach confirmation adds (K − 1) intervals.

use std::io::Write;

use crate::judge::config::GuardrailConfig;
use crate::judge::sequential::{ln_e_value, normal_cdf, normal_quantile, tuned_precision};

/// Arguments of `sluice plan`.
#[derive(Debug, Clone, clap::Args)]
pub struct PlanArgs {
    /// Control's rate of the metric (e.g. conversions per request).
    #[arg(long)]
    pub baseline_rate: f64,
    /// Smallest change worth finding, relative to the baseline (0.02 = 2 %).
    #[arg(long)]
    pub mde: f64,
    /// Read --mde as an absolute difference of rates.
    #[arg(long)]
    pub absolute: bool,
    /// The metric is bad when it rises (error rate); default: bad when it falls (conversion).
    #[arg(long)]
    pub lower_is_better: bool,
    /// False-rollback rate over the rollout (the judge's `alpha`).
    #[arg(long, default_value_t = 0.01)]
    pub alpha: f64,
    /// False-promotion rate per stage (the judge's `beta`).
    #[arg(long, default_value_t = 0.05)]
    pub beta: f64,
    #[arg(long, default_value_t = 0.8)]
    pub power: f64,
    /// Requests per second reaching the experiment (all variants).
    #[arg(long)]
    pub rps: f64,
    /// Plan one stage at this canary weight (percent) instead of the schedule.
    #[arg(long)]
    pub weight: Option<f64>,
    /// Stages of the schedule (canary percent).
    #[arg(long, value_delimiter = ',', default_values_t = vec![1.0, 5.0, 10.0, 25.0, 50.0])]
    pub stages: Vec<f64>,
    /// Statistical guardrails under Holm's correction (default: the default guardrails plus
    /// this metric).
    #[arg(long)]
    pub metrics: Option<usize>,
    /// Evaluation interval, seconds.
    #[arg(long, default_value_t = 10.0)]
    pub interval: f64,
    /// Consecutive breaching evaluations before a rollback (the judge's `consecutive`).
    #[arg(long, default_value_t = 3)]
    pub consecutive: u32,
    #[arg(long)]
    pub json: bool,
}

/// Invalid plan arguments.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("--{0}: {1}")]
    Argument(&'static str, String),
    #[error("writing output: {0}")]
    Output(#[from] std::io::Error),
    #[error("encoding output: {0}")]
    Encode(#[from] serde_json::Error),
}

/// The rates compared and the test's level.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Question {
    /// Control's rate.
    pub baseline: f64,
    /// Absolute difference to resolve (the margin, and the effect sought).
    pub delta: f64,
    /// Bad when the rate rises.
    pub lower_is_better: bool,
    pub level: f64,
    pub power: f64,
    /// Level the mixture is tuned with (the judge tunes with `alpha`).
    pub tuning_alpha: f64,
}

/// Requests and time one stage needs.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Need {
    pub seconds: f64,
    pub canary: f64,
    pub control: f64,
    /// What a single fixed-horizon test at the same level would need.
    pub fixed_seconds: f64,
}

impl Need {
    pub fn inflation(&self) -> f64 {
        self.seconds / self.fixed_seconds
    }
}

/// Variance of the difference of rates after `seconds` at canary weight `w` percent.
fn variance(q: &Question, rps: f64, w: f64, seconds: f64) -> f64 {
    let pc = q.baseline;
    let pt = if q.lower_is_better {
        pc + q.delta
    } else {
        pc - q.delta
    };
    let nt = rps * w / 100.0 * seconds;
    let nc = rps * (1.0 - w / 100.0) * seconds;
    pt * (1.0 - pt) / nt + pc * (1.0 - pc) / nc
}

/// The estimate at which the judge's e-value reaches 1/level, at variance `var`.
fn boundary(var: f64, rho: f64, level: f64) -> f64 {
    let target = (1.0 / level).ln();
    let (mut lo, mut hi) = (0.0, 1.0);
    while ln_e_value(hi * var.sqrt(), var, rho) < target && hi < 1e6 {
        hi *= 2.0;
    }
    for _ in 0..100 {
        let mid = 0.5 * (lo + hi);
        if ln_e_value(mid * var.sqrt(), var, rho) < target {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    hi * var.sqrt()
}

/// The smallest `seconds` with `f(seconds)` true, for `f` monotone.
fn smallest(f: impl Fn(f64) -> bool) -> f64 {
    let mut hi = 1.0;
    while !f(hi) && hi < 1e12 {
        hi *= 2.0;
    }
    let mut lo = hi / 2.0;
    for _ in 0..60 {
        let mid = 0.5 * (lo + hi);
        if f(mid) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    hi
}

/// What one stage at canary weight `w` percent needs for `q` at `rps`.
pub fn need(q: &Question, rps: f64, w: f64) -> Need {
    let rho = tuned_precision(q.delta, q.tuning_alpha, q.power);
    let z_power = normal_quantile(q.power);
    let seconds = smallest(|s| {
        let var = variance(q, rps, w, s);
        normal_cdf((q.delta - boundary(var, rho, q.level)) / var.sqrt()) >= q.power
    });
    let z = normal_quantile(1.0 - q.level) + z_power;
    let fixed_seconds = smallest(|s| q.delta / variance(q, rps, w, s).sqrt() >= z);
    Need {
        seconds,
        canary: rps * w / 100.0 * seconds,
        control: rps * (1.0 - w / 100.0) * seconds,
        fixed_seconds,
    }
}

fn duration(s: f64) -> String {
    if s < 120.0 {
        format!("{s:.0}s")
    } else if s < 7200.0 {
        format!("{:.1}m", s / 60.0)
    } else if s < 172_800.0 {
        format!("{:.1}h", s / 3600.0)
    } else {
        format!("{:.1}d", s / 86400.0)
    }
}

/// One row of the plan.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Row {
    pub weight: f64,
    /// To roll back a regression of the MDE with the requested power.
    pub detect: Need,
    /// Evidence time plus (K − 1) confirming intervals.
    pub detect_bake_seconds: f64,
    /// To prove non-inferiority within the MDE when there is no difference.
    pub promote: Need,
}

/// Runs `sluice plan`.
pub fn run(args: &PlanArgs, out: &mut impl Write) -> Result<(), PlanError> {
    let bad = |flag: &'static str, why: &str| Err(PlanError::Argument(flag, why.into()));
    if !(args.baseline_rate > 0.0 && args.baseline_rate < 1.0) {
        return bad("baseline-rate", "must be in (0, 1)");
    }
    let delta = if args.absolute {
        args.mde
    } else {
        args.mde * args.baseline_rate
    };
    // The change goes the bad way: up for a rate that is better lower (errors), down for one
    // that is better higher (conversion). Only that direction must keep the rate in (0, 1).
    let changed = if args.lower_is_better {
        args.baseline_rate + delta
    } else {
        args.baseline_rate - delta
    };
    if !(delta > 0.0 && changed > 0.0 && changed < 1.0) {
        let which = if args.lower_is_better {
            "below 1 (the rate rises by it)"
        } else {
            "above 0 (the rate falls by it)"
        };
        return bad(
            "mde",
            &format!("must be a positive change that keeps the rate {which}"),
        );
    }
    for (flag, v) in [("alpha", args.alpha), ("beta", args.beta)] {
        if !(v > 0.0 && v <= 0.5) {
            return bad(flag, "must be in (0, 0.5]");
        }
    }
    if !(args.power >= 0.5 && args.power < 1.0) {
        return bad("power", "must be in [0.5, 1)");
    }
    if args.rps.is_nan() || args.rps <= 0.0 {
        return bad("rps", "must be positive");
    }
    // The bounds a rollout spec's `schedule.interval` has (docs/rollout.md).
    let (low, high) = (crate::spec::MIN_INTERVAL, crate::spec::MAX_WAIT);
    if !(args.interval >= low.as_secs_f64() && args.interval <= high.as_secs_f64()) {
        return bad(
            "interval",
            "must be 0.1 to 3600 seconds, as in a rollout spec",
        );
    }
    let weights = match args.weight {
        Some(w) => vec![w],
        None => args.stages.clone(),
    };
    if weights.iter().any(|w| !(*w > 0.0 && *w < 100.0)) {
        return bad("weight", "canary weights must be in (0, 100)");
    }
    let metrics = args
        .metrics
        .unwrap_or(GuardrailConfig::default().statistical_count() + 1)
        .max(1);
    let detect_q = Question {
        baseline: args.baseline_rate,
        delta,
        lower_is_better: args.lower_is_better,
        // Holm's first step: the smallest p-value is compared with α/m.
        level: args.alpha / metrics as f64,
        power: args.power,
        tuning_alpha: args.alpha,
    };
    let promote_q = Question {
        level: args.beta,
        ..detect_q
    };
    let rows: Vec<Row> = weights
        .iter()
        .map(|&w| {
            let detect = need(&detect_q, args.rps, w);
            Row {
                weight: w,
                detect,
                detect_bake_seconds: detect.seconds
                    + f64::from(args.consecutive.saturating_sub(1)) * args.interval,
                promote: need(&promote_q, args.rps, w),
            }
        })
        .collect();
    if args.json {
        serde_json::to_writer(
            &mut *out,
            &serde_json::json!({
                "baseline_rate": args.baseline_rate, "delta": delta, "alpha": args.alpha,
                "beta": args.beta, "power": args.power, "rps": args.rps, "metrics": metrics,
                "holm_level": detect_q.level, "stages": rows,
            }),
        )?;
        writeln!(out)?;
        return Ok(());
    }
    writeln!(
        out,
        "baseline {:.4}, change to resolve {:.5} ({:.1} % relative), {} rps",
        args.baseline_rate,
        delta,
        100.0 * delta / args.baseline_rate,
        args.rps
    )?;
    writeln!(
        out,
        "rollback test: level α/m = {}/{metrics} (Holm's first step), power {}; promotion test: level β = {}, power {}",
        args.alpha, args.power, args.beta, args.power
    )?;
    writeln!(
        out,
        "sequential = the judge's normal-mixture test (final-look bound, conservative); fixed = one z-test at the same level"
    )?;
    writeln!(
        out,
        "assumes the guardrail's margin equals the MDE (the judge tunes its mixture to the margin)\n"
    )?;
    writeln!(
        out,
        "{:>7}  {:>12} {:>12} {:>10} {:>10} {:>6}   {:>12} {:>12} {:>10}",
        "canary",
        "detect: can.",
        "control",
        "bake",
        "fixed",
        "×",
        "promote: can.",
        "control",
        "bake"
    )?;
    for r in &rows {
        writeln!(
            out,
            "{:>6}%  {:>12.0} {:>12.0} {:>10} {:>10} {:>6.2}   {:>12.0} {:>12.0} {:>10}",
            r.weight,
            r.detect.canary,
            r.detect.control,
            duration(r.detect_bake_seconds),
            duration(r.detect.fixed_seconds),
            r.detect.inflation(),
            r.promote.canary,
            r.promote.control,
            duration(r.promote.seconds),
        )?;
    }
    writeln!(
        out,
        "\nEach row is one stage on its own evidence. The rollback test also pools earlier stages, so later stages need less; add the warm-up to each bake."
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sequential_test_needs_more_than_a_fixed_one() {
        let q = Question {
            baseline: 0.05,
            delta: 0.001,
            lower_is_better: false,
            level: 0.01,
            power: 0.8,
            tuning_alpha: 0.01,
        };
        let n = need(&q, 200.0, 50.0);
        assert!(
            n.inflation() > 1.1 && n.inflation() < 2.5,
            "{}",
            n.inflation()
        );
        // The textbook two-proportion size: (z_.99 + z_.8)² · 2pq / δ² per arm.
        let textbook = (2.326f64 + 0.842).powi(2) * 2.0 * 0.05 * 0.95 / 1e-6;
        assert!((n.fixed_seconds * 100.0 / textbook - 1.0).abs() < 0.03);
        // A smaller canary share needs longer.
        assert!(need(&q, 200.0, 10.0).seconds > n.seconds);
    }

    fn args(baseline: f64, mde: f64, absolute: bool, lower_is_better: bool) -> PlanArgs {
        PlanArgs {
            baseline_rate: baseline,
            mde,
            absolute,
            lower_is_better,
            alpha: 0.01,
            beta: 0.05,
            power: 0.8,
            rps: 200.0,
            weight: Some(50.0),
            stages: vec![],
            metrics: None,
            interval: 10.0,
            consecutive: 3,
            json: true,
        }
    }

    #[test]
    fn a_doubled_error_rate_can_be_planned() {
        // 0.5 % → 1 %: a relative MDE of 100 % and the same as an absolute 0.005.
        for a in [
            args(0.005, 1.0, false, true),
            args(0.005, 0.005, true, true),
        ] {
            let mut out = Vec::new();
            run(&a, &mut out).unwrap();
            let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
            assert!(
                (v["delta"].as_f64().unwrap_or(0.0) - 0.005).abs() < 1e-12,
                "{v}"
            );
            assert!(v["stages"][0]["detect"]["seconds"].as_f64().unwrap_or(0.0) > 0.0);
        }
        // Changes that leave (0, 1) in the bad direction are still refused.
        for a in [
            args(0.005, 1.0, false, false),
            args(0.6, 0.5, true, true),
            args(0.005, 0.0, true, true),
        ] {
            let mut out = Vec::new();
            assert!(matches!(
                run(&a, &mut out),
                Err(PlanError::Argument("mde", _))
            ));
        }
    }
}
