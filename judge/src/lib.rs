//! The judge: compares the canary with the concurrent control and decides, every interval,
//! whether to continue, promote, hold, halt or roll back, keeping its promised error rates
//! however often it looks.
//!
//! A pipeline of pure functions over counter snapshots (Kayenta's judge shape):
//! - [`ledger`] — clean: snapshots → deltas (counter resets survived) → evidence of the whole
//!   rollout and of the current stage, warm-ups dropped;
//! - [`guardrail`] — one [`Verdict`] per guardrail {label, reason, estimate, interval,
//!   p-value or e-value, critical}, using the always-valid tests of [`sequential`];
//! - [`label_statistical`] — Holm's correction across the statistical guardrails;
//! - [`score`] — weighted score with pass / marginal thresholds;
//! - [`decide`] — the decision, with sustained breaches counted over consecutive evaluations.
//!
//! [`Judge`] folds snapshots through that pipeline one at a time (the state it keeps: the
//! ledger, the mixture parameters fixed at first use, breach streaks); [`replay`] is the same
//! over a slice. [`config`] holds [`GuardrailConfig`]; [`snapshot`] the counters it reads and
//! their JSON-lines format. Methods and references: `docs/statistics.md`.
//!
//! The crate is pure: no I/O, no clock, no async runtime, and nothing of the controller (which
//! depends on it, so Cargo keeps it that way). The controller turns a source's reading into a
//! [`snapshot::Snapshot`] (`sluice_controller::snapshot::from_reading`), plugs the judge into
//! its daemon (`sluice_controller::assess`) and replays files with `sluice judge`.
//!
//! Its modules, each using only those listed after it: the pipeline ([`guardrail`],
//! [`ledger`], [`sequential`]); [`config`]; [`snapshot`]; and two readers of what users write,
//! shared with the controller's spec: [`duration`] and [`yaml`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub mod config;
pub mod duration;
pub mod guardrail;
pub mod ledger;
pub mod sequential;
pub mod snapshot;
pub mod yaml;

pub use config::{GuardrailConfig, Promotion};
use guardrail::{Arms, Draft, Frozen};
use ledger::{Ledger, Step};

use crate::snapshot::Snapshot;

/// A guardrail's verdict at one evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Label {
    Pass,
    Fail,
    Inconclusive,
}

/// How a guardrail decides, which sets how a failure acts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Canary against control by an always-valid test; Holm-corrected; acts when sustained.
    Statistical,
    /// A hard limit on the canary alone (error ceiling, latency SLO); acts at once.
    Gate,
    /// An effect-size threshold (prediction drift); acts when sustained.
    Threshold,
    /// Whether the data can be trusted: a sample-ratio mismatch halts; impossible counts (the
    /// `data` verdict failing) hold.
    Integrity,
}

/// One guardrail's verdict.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    pub guardrail: String,
    pub kind: Kind,
    pub label: Label,
    pub reason: String,
    /// Statistical: canary − control difference of rates (whole rollout); gates: the
    /// canary's value; drift: PSI; SRM: the canary's share of requests.
    pub estimate: Option<f64>,
    /// Statistical: always-valid confidence sequence of the difference at level `alpha`;
    /// gates: Wilson interval.
    pub interval: Option<[f64; 2]>,
    /// Statistical: always-valid p-value against "no harm", Holm-adjusted; SRM: with
    /// replicate groups the always-valid p-value (Bonferroni over the variants tested),
    /// without them the χ² p-value of a single look (for reference; the decision uses the
    /// e-value).
    pub p_value: Option<f64>,
    /// Statistical: e-value against "worse than the margin" this stage (≥ 1/beta passes);
    /// SRM: e-value against the expected split (≥ 1/srm.alpha halts).
    pub e_value: Option<f64>,
    pub critical: bool,
    pub weight: f64,
    /// Consecutive evaluations (this one included) in which this guardrail failed.
    pub streak: u32,
}

impl Verdict {
    fn new(name: &str, kind: Kind, weight: f64, critical: bool) -> Verdict {
        Verdict {
            guardrail: name.to_string(),
            kind,
            label: Label::Inconclusive,
            reason: String::new(),
            estimate: None,
            interval: None,
            p_value: None,
            e_value: None,
            critical,
            weight,
            streak: 0,
        }
    }
}

/// What to do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// No breach; not enough evidence to pass yet.
    Continue,
    /// This stage's evidence is sufficient and passing (the bake time is the rollout's).
    Promote,
    /// Do not advance: data missing or stale, or a marginal score.
    Hold,
    /// The data cannot be trusted (sample-ratio mismatch): stop and page someone.
    Halt,
    /// A breach: back to 0 %.
    RollBack,
}

/// Where the score falls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScoreClass {
    Pass,
    Marginal,
    Fail,
}

/// Requests in the evidence.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Amount {
    pub control: u64,
    pub canary: u64,
}

/// The judge's output for one snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    pub at: f64,
    pub experiment: String,
    pub control: String,
    pub canary: String,
    pub weights: BTreeMap<String, f64>,
    pub stage_started_at: f64,
    /// Requests in this stage's evidence and in the whole rollout's.
    pub stage_requests: Amount,
    pub rollout_requests: Amount,
    /// Seconds of evidence this stage (after warm-up).
    pub stage_seconds: f64,
    pub verdicts: Vec<Verdict>,
    /// Weighted share of passing guardrails among the conclusive ones, in percent.
    pub score: Option<f64>,
    pub score_class: Option<ScoreClass>,
    /// This stage has enough evidence, all passing, to be promoted.
    pub sufficient: bool,
    pub decision: Decision,
    pub reason: String,
}

/// Sets the labels of statistical drafts: Holm across their harm p-values at `alpha` (a
/// rejection is a failure), then non-inferiority (e-value ≥ 1/beta) for a pass.
pub fn label_statistical(drafts: Vec<Draft>, alpha: f64, beta: f64) -> Vec<Verdict> {
    let p: Vec<f64> = drafts
        .iter()
        .map(|d| sequential::p_from_ln_e(d.ln_e_harm))
        .collect();
    let reject = sequential::holm(&p, alpha);
    let adjusted = sequential::holm_adjusted(&p);
    let pass_at = (1.0 / beta).ln();
    drafts
        .into_iter()
        .enumerate()
        .map(|(i, d)| {
            let mut v = d.verdict;
            let testable = v.estimate.is_some();
            if testable {
                v.p_value = Some(adjusted[i]);
                if reject[i] {
                    v.label = Label::Fail;
                    v.reason = format!("worse than control: {}", v.reason);
                } else if d.ln_e_pass >= pass_at {
                    v.label = Label::Pass;
                    v.reason = format!("non-inferior: {}", v.reason);
                } else {
                    v.label = Label::Inconclusive;
                    v.reason = format!("gathering evidence: {}", v.reason);
                }
            }
            v
        })
        .collect()
}

/// Kayenta-style score: the weighted share of passing guardrails among those that reached a
/// conclusion (inconclusive ones, like Kayenta's "no data", are left out).
pub fn score(verdicts: &[Verdict], cfg: &config::ScoreConfig) -> Option<(f64, ScoreClass)> {
    let (mut pass, mut all) = (0.0, 0.0);
    for v in verdicts.iter().filter(|v| v.kind != Kind::Integrity) {
        match v.label {
            Label::Pass => {
                pass += v.weight;
                all += v.weight;
            }
            Label::Fail => all += v.weight,
            Label::Inconclusive => {}
        }
    }
    if all <= 0.0 {
        return None;
    }
    let s = 100.0 * pass / all;
    let class = if s >= cfg.pass {
        ScoreClass::Pass
    } else if s >= cfg.marginal {
        ScoreClass::Marginal
    } else {
        ScoreClass::Fail
    };
    Some((s, class))
}

/// Inputs of [`decide`] besides the verdicts.
#[derive(Debug, Clone, Copy)]
pub struct Situation<'a> {
    pub cfg: &'a GuardrailConfig,
    /// Why the data cannot be used now, if it cannot.
    pub unusable: Option<&'a str>,
    /// Both variants have the minimum sample in this stage.
    pub enough: bool,
    pub score: Option<(f64, ScoreClass)>,
    /// Consecutive evaluations with a failing score (this one included).
    pub score_streak: u32,
    /// The control gets no traffic in this stage (the treatment at 100 %): nothing can be
    /// proven against it, so the stage is promoted on enough canary data and no breach.
    pub no_control: bool,
}

/// The decision, its reason, and whether the stage's evidence suffices to pass.
pub fn decide(verdicts: &[Verdict], s: Situation) -> (Decision, String, bool) {
    if let Some(why) = s.unusable {
        return (Decision::Hold, why.to_string(), false);
    }
    if let Some(v) = verdicts
        .iter()
        .find(|v| v.kind == Kind::Integrity && v.label == Label::Fail)
    {
        return (
            Decision::Halt,
            format!("{}: {}", v.guardrail, v.reason),
            false,
        );
    }
    let k = s.cfg.consecutive;
    let acting = |v: &&Verdict| {
        v.label == Label::Fail && v.critical && (v.kind == Kind::Gate || v.streak >= k)
    };
    if let Some(v) = verdicts.iter().find(acting) {
        let held = if v.kind == Kind::Gate {
            "hard gate".to_string()
        } else {
            format!("{} consecutive evaluations", v.streak)
        };
        return (
            Decision::RollBack,
            format!("{} failed ({held}): {}", v.guardrail, v.reason),
            false,
        );
    }
    if let Some((value, ScoreClass::Fail)) = s.score {
        if s.score_streak >= k {
            return (
                Decision::RollBack,
                format!(
                    "score {value:.0} below {} for {} consecutive evaluations",
                    s.cfg.score.marginal, s.score_streak
                ),
                false,
            );
        }
    }
    let failing: Vec<&str> = verdicts
        .iter()
        .filter(|v| v.label == Label::Fail)
        .map(|v| v.guardrail.as_str())
        .collect();
    if !failing.is_empty() {
        return (
            Decision::Hold,
            format!(
                "breach of {} (not yet sustained or not critical)",
                failing.join(", ")
            ),
            false,
        );
    }
    if let Some((value, ScoreClass::Marginal)) = s.score {
        return (Decision::Hold, format!("marginal score {value:.0}"), false);
    }
    if !s.enough {
        return (
            Decision::Continue,
            format!(
                "insufficient data: fewer than {} requests per variant this stage",
                s.cfg.min_requests
            ),
            false,
        );
    }
    let judged = verdicts.iter().filter(|v| v.kind != Kind::Integrity);
    let promotion = if s.no_control {
        Promotion::NoBreach
    } else {
        s.cfg.promotion
    };
    let waiting: Vec<&str> = match promotion {
        Promotion::NonInferiority => judged
            .filter(|v| v.label != Label::Pass)
            .map(|v| v.guardrail.as_str())
            .collect(),
        // Only a guardrail that lacks data holds a smoke-test promotion back.
        Promotion::NoBreach => judged
            .filter(|v| v.label == Label::Inconclusive && v.estimate.is_none())
            .map(|v| v.guardrail.as_str())
            .collect(),
    };
    let score_ok = s.score.is_none_or(|(_, c)| c == ScoreClass::Pass);
    if waiting.is_empty() && score_ok {
        return (
            Decision::Promote,
            match promotion {
                Promotion::NonInferiority => {
                    "every guardrail non-inferior within its margin".into()
                }
                Promotion::NoBreach if s.no_control => {
                    "enough canary data and no breach (no control traffic this stage)".into()
                }
                Promotion::NoBreach => "enough data and no breach".into(),
            },
            true,
        );
    }
    (
        Decision::Continue,
        format!(
            "gathering evidence: {} not yet conclusive",
            waiting.join(", ")
        ),
        false,
    )
}

/// The stateful fold of the pipeline over snapshots, one evaluation per snapshot.
#[derive(Debug, Clone)]
pub struct Judge {
    config: GuardrailConfig,
    ledger: Ledger,
    frozen: Frozen,
    streaks: BTreeMap<String, u32>,
    score_streak: u32,
}

impl Judge {
    pub fn new(config: GuardrailConfig) -> Judge {
        Judge {
            config,
            ledger: Ledger::default(),
            frozen: Frozen::default(),
            streaks: BTreeMap::new(),
            score_streak: 0,
        }
    }

    pub fn config(&self) -> &GuardrailConfig {
        &self.config
    }

    /// The evidence so far.
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// Folds in the next snapshot and evaluates.
    pub fn observe(&mut self, snap: &Snapshot) -> Evaluation {
        let cfg = &self.config;
        let step = self.ledger.add(snap, cfg.warmup, cfg.counter_reset);
        let canary = snap.canary_name().unwrap_or("").to_string();
        let arms = Arms {
            control: &snap.control,
            canary: &canary,
        };
        // Counts real traffic cannot produce are a data error: nothing judged from them.
        let impossible = guardrail::impossible(cfg, &self.ledger);
        let unusable = match &step {
            Step::Unhealthy { reason } => Some(reason.clone()),
            Step::OutOfOrder => Some("snapshot is not newer than the previous one".into()),
            _ if canary.is_empty() => Some("no canary variant to judge".into()),
            _ if !impossible.is_empty() => Some(format!(
                "impossible counts (a data error, not traffic): {}",
                impossible.join("; ")
            )),
            _ => None,
        };
        let (drafts, others) = guardrail::assess(cfg, &self.ledger, arms, &mut self.frozen);
        let mut verdicts = label_statistical(drafts, cfg.alpha, cfg.beta);
        let shadow_only = self.ledger.weights.get(&canary).copied().unwrap_or(0.0) <= 0.0;
        let no_control = !shadow_only && guardrail::control_idle(&self.ledger, arms);
        if no_control {
            for v in verdicts.iter_mut().filter(|v| v.estimate.is_some()) {
                v.reason.push_str(
                    "; no control traffic this stage: compared on the earlier stages' concurrent evidence",
                );
            }
        }
        verdicts.extend(others);
        verdicts.extend(guardrail::srm(cfg, &self.ledger, arms));
        let requests = |ev: &ledger::Evidence| Amount {
            control: ev.of(arms.control).requests,
            canary: ev.of(arms.canary).requests,
        };
        let stage = requests(&self.ledger.stage);
        let min = cfg.min_requests;
        let enough = if shadow_only {
            // A shadow stage: the shadow's comparisons are the sample.
            let compared: u64 = self
                .ledger
                .stage
                .variants
                .values()
                .filter_map(|c| c.shadow.as_ref())
                .map(|s| s.compared)
                .sum();
            compared >= min
        } else if no_control {
            stage.canary >= min
        } else {
            stage.control >= min && stage.canary >= min
        };
        let mut data = Verdict::new("data", Kind::Integrity, 0.0, false);
        (data.label, data.reason) = match (&unusable, &step) {
            (Some(why), _) if !impossible.is_empty() => (Label::Fail, why.clone()),
            (Some(why), _) => (Label::Inconclusive, why.clone()),
            (None, Step::Baseline) => (Label::Inconclusive, "first snapshot: baseline".into()),
            (None, Step::StageStarted) => (Label::Inconclusive, "stage started: warming up".into()),
            (None, Step::WarmingUp { until }) => {
                (Label::Inconclusive, format!("warming up until {until:.0}"))
            }
            (None, _) if !enough => (
                Label::Inconclusive,
                format!(
                    "{} canary and {} control requests this stage, {min} needed",
                    stage.canary, stage.control
                ),
            ),
            (None, Step::Counted { resets }) if !resets.is_empty() => (
                Label::Pass,
                format!("enough data; counter reset in {}", resets.join(", ")),
            ),
            (None, _) => (Label::Pass, "enough data".into()),
        };
        verdicts.push(data);
        if unusable.is_none() {
            for v in &mut verdicts {
                let streak = self.streaks.entry(v.guardrail.clone()).or_default();
                *streak = if v.label == Label::Fail {
                    *streak + 1
                } else {
                    0
                };
                v.streak = *streak;
            }
        }
        let scored = score(&verdicts, &cfg.score);
        if unusable.is_none() {
            self.score_streak = match scored {
                Some((_, ScoreClass::Fail)) => self.score_streak + 1,
                _ => 0,
            };
        }
        let (decision, reason, sufficient) = decide(
            &verdicts,
            Situation {
                cfg,
                unusable: unusable.as_deref(),
                enough,
                score: scored,
                score_streak: self.score_streak,
                no_control,
            },
        );
        Evaluation {
            at: snap.at,
            experiment: snap.experiment.clone(),
            control: snap.control.clone(),
            canary: canary.clone(),
            weights: snap.weights.clone(),
            stage_started_at: self.ledger.stage_started_at,
            stage_requests: stage,
            rollout_requests: requests(&self.ledger.rollout),
            stage_seconds: self.ledger.stage.seconds,
            verdicts,
            score: scored.map(|s| s.0),
            score_class: scored.map(|s| s.1),
            sufficient,
            decision,
            reason,
        }
    }
}

/// The pure pipeline over a whole sequence: one evaluation per snapshot.
pub fn replay(config: &GuardrailConfig, snapshots: &[Snapshot]) -> Vec<Evaluation> {
    let mut judge = Judge::new(config.clone());
    snapshots.iter().map(|s| judge.observe(s)).collect()
}

#[cfg(test)]
mod tests;
