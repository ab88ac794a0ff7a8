//! The run's report: a self-contained HTML page (inline SVG, no scripts, no external assets)
//! and a machine-readable JSON summary beside it, both from the recorded [`Series`], the
//! controller's audit log and the users' tallies.
//!
//! Plots over time (every decision drawn as a vertical marker): the treatment's weight (the
//! confirmed one, the target, and the share of requests Envoy actually saw — the last is what
//! exposes an SRM), per-variant 5xx rate, p99 latency, and conversion (clicks per request) with
//! 95 % Wilson intervals; shadow agreement if a shadow ran. Then the prediction distributions of
//! the control and the treatment, and a table of every decision and push with its reason.
//!
//! Rates are computed over a sliding window of [`WINDOW_SECS`] from the cumulative counters, so
//! a single second's noise does not dominate and a change still shows within seconds.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::recorder::{Histogram, Point, Series, VariantPoint};
use crate::users::Tallies;

/// Width of the sliding window for rates and quantiles.
pub const WINDOW_SECS: f64 = 10.0;

/// z for a two-sided 95 % interval.
const Z95: f64 = 1.959_963_984_540_054;

/// One line of the controller's audit log that the report shows: a decision or a confirmed push.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Unix seconds.
    pub at: f64,
    /// `decision` or `push`.
    pub record: String,
    /// For decisions: `started`, `stage_changed`, `held`, `rolled_back`, `promoted`, …
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub weight: Option<f64>,
    /// For pushes.
    #[serde(default)]
    pub version: Option<u64>,
    #[serde(default)]
    pub decision_to_confirmation_secs: Option<f64>,
    /// For a rollback: `breaker` (the filter's breaker tripped first), `judge`, `operator`.
    #[serde(default)]
    pub cause: Option<String>,
}

/// Failure to read inputs or write the report.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: line {line}: {reason}")]
    Audit {
        path: String,
        line: usize,
        reason: String,
    },
    #[error("encoding the summary: {0}")]
    Json(#[from] serde_json::Error),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ReportError + '_ {
    move |source| ReportError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// The `decision` and `push` records of an audit log (`<name>.audit.jsonl`); evaluations are
/// left out (they are per interval and carry the judge's full detail). A missing file is an
/// empty log: a run without a controller has none.
pub fn read_audit(path: &Path) -> Result<Vec<AuditRecord>, ReportError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(path)(e)),
    };
    parse_audit(&text).map_err(|(line, reason)| ReportError::Audit {
        path: path.display().to_string(),
        line,
        reason,
    })
}

/// [`read_audit`] on text.
pub fn parse_audit(text: &str) -> Result<Vec<AuditRecord>, (usize, String)> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| (i + 1, e.to_string()))?;
        if matches!(v["record"].as_str(), Some("decision" | "push")) {
            out.push(serde_json::from_value(v).map_err(|e| (i + 1, e.to_string()))?);
        }
    }
    Ok(out)
}

/// Everything a report is made from.
#[derive(Debug, Clone, Default)]
pub struct ReportInput {
    pub series: Series,
    pub audit: Vec<AuditRecord>,
    pub users: Option<Tallies>,
    /// What a correct controller does in this scenario, in words.
    pub expected: Option<String>,
    /// The same, checkable.
    pub expectation: Option<Expectation>,
}

/// The end a scenario must reach, checked against the summary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Expectation {
    /// The rollout's final phase: `promoted`, `rolled_back`, or `canary` for a halted stage.
    pub phase: String,
    /// The final weight, when it matters (100 for a promotion, 0 after a rollback).
    pub weight: Option<f64>,
    /// The final reason must name one of these (guardrail names); empty: any reason.
    pub reason_mentions: Vec<String>,
}

impl Expectation {
    /// Whether the summary's final state meets the expectation.
    pub fn met_by(&self, s: &Summary) -> bool {
        let reason = s.final_reason.as_deref().unwrap_or("");
        s.final_phase == self.phase
            && self.weight.is_none_or(|w| s.final_weight == Some(w))
            && (self.reason_mentions.is_empty()
                || self
                    .reason_mentions
                    .iter()
                    .any(|m| reason.contains(m.as_str())))
    }
}

/// Where the time from fault to "no more users on the treatment" went. Unix seconds for
/// moments, seconds for spans.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RollbackTiming {
    pub fault_at: f64,
    /// The controller's rollback decision (audit log).
    pub decided_at: Option<f64>,
    /// The controller saw Envoy's ECDS counter confirm weight 0 (audit log).
    pub confirmed_at: Option<f64>,
    /// Envoy's counter of requests to the treatment's cluster was last seen growing (polled
    /// every `probe_every_secs`): Envoy stopped routing users to the treatment.
    pub envoy_last_routed_at: Option<f64>,
    pub probe_every_secs: Option<f64>,
    /// The treatment's upstream received its last request (cross-check of the above).
    pub upstream_last_request_at: Option<f64>,
    /// Fault → decision: detection (evidence, the evaluation interval, sustained breach).
    pub detection_secs: Option<f64>,
    /// Decision → Envoy's last request to the treatment: render, file write, Envoy's reload.
    pub decision_to_envoy_secs: Option<f64>,
    /// Decision → the controller's confirmation (it polls Envoy's ECDS counters).
    pub decision_to_confirmation_secs: Option<f64>,
    /// Fault → Envoy's last request to the treatment: the time to rollback.
    pub fault_to_zero_traffic_secs: Option<f64>,
    /// What caused the rollback (the decision's `cause` in the audit log): `breaker` when the
    /// filter took the treatment out before the controller's judge.
    #[serde(default)]
    pub cause: Option<String>,
    /// The first recorder point (one a second) whose Envoy counters showed a new breaker trip
    /// of the treatment after the fault: the filter had tripped by then.
    #[serde(default)]
    pub breaker_seen_at: Option<f64>,
}

/// Per-variant figures over the whole run (from Envoy's counters).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VariantSummary {
    pub requests: f64,
    pub error_rate: Option<f64>,
    pub p99_latency_ms: Option<f64>,
    /// Clicks per request, with its 95 % Wilson interval.
    pub conversion: Option<f64>,
    pub conversion_interval: Option<(f64, f64)>,
    pub purchases: f64,
    /// Mean prediction (score, after dividing out the filter's scale of 1000).
    pub mean_prediction: Option<f64>,
    /// Shadow agreement on `status`, if copies of this variant's traffic were compared.
    pub shadow_agreement: Option<f64>,
}

/// A decision or push, for the summary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecisionSummary {
    pub at: f64,
    /// Seconds since the run started.
    pub t: f64,
    pub record: String,
    pub kind: Option<String>,
    pub message: Option<String>,
    pub weight: Option<f64>,
    pub decision_to_confirmation_secs: Option<f64>,
}

/// The machine-readable summary (`summary.json`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub experiment: String,
    pub scenario: Option<String>,
    pub expected: Option<String>,
    /// `promoted`, `rolled_back`, `canary`, … or `no controller`.
    pub final_phase: String,
    pub final_weight: Option<f64>,
    /// The reason of the final decision (rollback reason, last judgement).
    pub final_reason: Option<String>,
    pub started_at: f64,
    pub duration_secs: f64,
    pub fault_injected_at: Option<f64>,
    /// Fault switched on → controller decides to roll back.
    pub time_to_rollback_decision_secs: Option<f64>,
    /// Fault switched on → Envoy confirms weight 0.
    pub time_to_rollback_secs: Option<f64>,
    /// Fault switched on → Envoy's last request to the treatment, from the proxy's counters.
    #[serde(default)]
    pub time_to_zero_traffic_secs: Option<f64>,
    /// The parts of the time to rollback, when the run was rolled back after a fault.
    #[serde(default)]
    pub rollback: Option<RollbackTiming>,
    /// Whether the run ended as the scenario expects; `None` without an expectation.
    #[serde(default)]
    pub as_expected: Option<bool>,
    pub decisions: Vec<DecisionSummary>,
    pub variants: BTreeMap<String, VariantSummary>,
    pub users: Option<Tallies>,
}

/// Wilson score interval for `successes` out of `n` at 95 %.
pub fn wilson(successes: f64, n: f64) -> Option<(f64, f64)> {
    (n > 0.0).then(|| sluice_controller::judge::sequential::wilson(successes.clamp(0.0, n), n, Z95))
}

fn points_with_envoy(series: &Series) -> Vec<(&Point, &BTreeMap<String, VariantPoint>)> {
    series
        .points
        .iter()
        .filter_map(|p| p.variants.as_ref().map(|v| (p, v)))
        .collect()
}

/// Builds the summary.
pub fn summarize(input: &ReportInput) -> Summary {
    let s = &input.series;
    let envoy = points_with_envoy(s);
    let last_rollout = s.points.iter().rev().find_map(|p| p.rollout.as_ref());
    let last_decision = input.audit.iter().rev().find(|a| a.record == "decision");
    // A promotion or rollback is final, and the controller may exit before the recorder
    // reads its status again: the audit log has the last word then.
    let final_decision = input.audit.iter().rev().find(|a| {
        a.record == "decision" && matches!(a.kind.as_deref(), Some("promoted" | "rolled_back"))
    });
    let (final_phase, final_weight, final_reason) = match (final_decision, last_rollout) {
        (Some(d), r)
            if r.is_none_or(|r| !matches!(r.phase.as_str(), "promoted" | "rolled_back")) =>
        {
            // The weight Envoy confirmed last (the daemon records a push when Envoy confirms
            // it, which for a rollback is before the decision's own record), else the one at
            // the decision.
            let confirmed = input
                .audit
                .iter()
                .rev()
                .find(|a| a.record == "push")
                .and_then(|p| p.weight);
            let message = d.message.clone().map(|m| {
                m.strip_prefix("rolled back: ")
                    .map(str::to_string)
                    .unwrap_or(m)
            });
            (
                d.kind.clone().unwrap_or_default(),
                confirmed.or(d.weight),
                message,
            )
        }
        (_, Some(r)) => (
            r.phase.clone(),
            Some(r.weight),
            r.rolled_back_reason
                .clone()
                .or_else(|| r.held.clone())
                .or_else(|| last_decision.and_then(|d| d.message.clone()))
                .or_else(|| r.reason.clone()),
        ),
        (_, None) => match last_decision {
            Some(d) => (
                d.kind.clone().unwrap_or_default(),
                d.weight,
                d.message.clone(),
            ),
            None => ("no controller".into(), None, None),
        },
    };

    let rollback_push = s.fault_injected_at.and_then(|f| {
        input
            .audit
            .iter()
            .find(|a| a.record == "push" && a.at >= f && a.weight == Some(0.0))
    });
    let rollback_decision = s.fault_injected_at.and_then(|f| {
        input.audit.iter().find(|a| {
            a.record == "decision" && a.at >= f && a.kind.as_deref() == Some("rolled_back")
        })
    });

    // The daemon writes a push record when Envoy confirms it, with the time since the decision,
    // and the decision's own record after the push: the decision moment is the push's.
    let decided_at = rollback_decision.map(|d| {
        rollback_push
            .and_then(|p| Some(p.at - p.decision_to_confirmation_secs?))
            .map_or(d.at, |at| at.min(d.at))
    });
    let rollback = s
        .fault_injected_at
        .zip(decided_at)
        .map(|(fault_at, decided)| {
            let routing = s.treatment_routing.as_ref();
            let envoy_last = routing.and_then(|r| r.last_increase_seen_at);
            let confirmed_at = rollback_push.map(|p| p.at);
            RollbackTiming {
                fault_at,
                decided_at: Some(decided),
                confirmed_at,
                envoy_last_routed_at: envoy_last,
                probe_every_secs: routing.map(|r| r.every_secs),
                upstream_last_request_at: s.treatment_last_arrival_at,
                detection_secs: Some(decided - fault_at),
                decision_to_envoy_secs: envoy_last.map(|e| e - decided),
                decision_to_confirmation_secs: rollback_push
                    .and_then(|p| p.decision_to_confirmation_secs),
                fault_to_zero_traffic_secs: envoy_last.map(|e| e - fault_at),
                cause: rollback_decision.and_then(|d| d.cause.clone()),
                breaker_seen_at: breaker_seen_after(s, fault_at),
            }
        });

    let mut variants = BTreeMap::new();
    if let Some((_, last)) = envoy.last() {
        for (name, v) in last.iter() {
            let responses: f64 = v.responses.values().sum();
            let clicks = v.outcomes.get("click").copied().unwrap_or(0.0);
            let compared = v.shadow.agree.get("status").copied().unwrap_or(0.0)
                + v.shadow.disagree.get("status").copied().unwrap_or(0.0);
            variants.insert(
                name.clone(),
                VariantSummary {
                    requests: v.requests,
                    error_rate: (responses > 0.0).then(|| v.server_errors() / responses),
                    p99_latency_ms: v.latency_ms.quantile(0.99),
                    conversion: (v.requests > 0.0).then(|| clicks / v.requests),
                    conversion_interval: wilson(clicks, v.requests),
                    purchases: v.outcomes.get("purchase").copied().unwrap_or(0.0),
                    mean_prediction: (v.prediction.count > 0.0)
                        .then(|| v.prediction.sum / v.prediction.count / 1000.0),
                    shadow_agreement: (compared > 0.0)
                        .then(|| v.shadow.agree.get("status").copied().unwrap_or(0.0) / compared),
                },
            );
        }
    }

    let mut summary = Summary {
        experiment: s.experiment.clone(),
        scenario: s.scenario.clone(),
        expected: input.expected.clone(),
        final_phase,
        final_weight,
        final_reason,
        started_at: s.started_at,
        duration_secs: s.points.last().map_or(0.0, |p| p.t),
        fault_injected_at: s.fault_injected_at,
        time_to_rollback_decision_secs: decided_at.zip(s.fault_injected_at).map(|(d, f)| d - f),
        time_to_rollback_secs: rollback_push
            .zip(s.fault_injected_at)
            .map(|(p, f)| p.at - f),
        time_to_zero_traffic_secs: rollback.as_ref().and_then(|r| r.fault_to_zero_traffic_secs),
        rollback,
        as_expected: None,
        decisions: input
            .audit
            .iter()
            .map(|a| DecisionSummary {
                at: a.at,
                t: a.at - s.started_at,
                record: a.record.clone(),
                kind: a.kind.clone(),
                message: a.message.clone(),
                weight: a.weight,
                decision_to_confirmation_secs: a.decision_to_confirmation_secs,
            })
            .collect(),
        variants,
        users: input.users.clone(),
    };
    summary.as_expected = input.expectation.as_ref().map(|e| e.met_by(&summary));
    summary
}

/// When the recorder first saw the treatment's breaker trip count above its value at `fault_at`.
fn breaker_seen_after(s: &Series, fault_at: f64) -> Option<f64> {
    let trips = |p: &Point| -> Option<f64> {
        Some(
            p.variants
                .as_ref()?
                .get(&s.treatment)?
                .breaker_trips
                .values()
                .sum(),
        )
    };
    let before = s
        .points
        .iter()
        .rev()
        .filter(|p| p.at <= fault_at)
        .find_map(trips)
        .unwrap_or(0.0);
    s.points
        .iter()
        .filter(|p| p.at > fault_at)
        .find(|p| trips(p).is_some_and(|n| n > before))
        .map(|p| p.at)
}

/// The one-screen text summary printed at the end of a run.
pub fn summary_text(s: &Summary) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "── Sluice demo: {} ({}) ──",
        s.experiment,
        s.scenario.as_deref().unwrap_or("-")
    );
    let _ = writeln!(
        out,
        "result:   {}{}{}",
        s.final_phase,
        s.final_weight
            .map(|w| format!(" at {w:.2} %"))
            .unwrap_or_default(),
        s.final_reason
            .as_ref()
            .map(|r| format!(" — {r}"))
            .unwrap_or_default()
    );
    if let Some(e) = &s.expected {
        let check = match s.as_expected {
            Some(true) => "  ✔ as expected",
            Some(false) => "  ✘ NOT as expected",
            None => "",
        };
        let _ = writeln!(out, "expected: {e}{check}");
    }
    if let Some(r) = s
        .rollback
        .as_ref()
        .filter(|r| r.envoy_last_routed_at.is_some())
    {
        let secs = |x: Option<f64>| x.map_or("?".to_string(), |x| format!("{x:.2} s"));
        let _ = writeln!(
            out,
            "time to rollback (fault → Envoy's last request to the canary): {}",
            secs(r.fault_to_zero_traffic_secs)
        );
        if r.cause.as_deref() == Some("breaker") {
            // The filter took the canary out before the controller decided: the decision
            // follows the traffic stop, so "detection + decision → Envoy" does not apply.
            let _ = writeln!(
                out,
                "  = the filter's breaker, in the data plane (its trip seen in Envoy's counters {} after the fault, read once a second); \
                 the controller recorded the rollback, cause breaker, {} after the fault and saw weight 0 confirmed {} after deciding",
                secs(r.breaker_seen_at.map(|b| b - r.fault_at)),
                secs(r.detection_secs),
                secs(r.decision_to_confirmation_secs),
            );
        } else {
            let _ = writeln!(
                out,
                "  = detection {} (fault → rollback decision) + {} (decision → Envoy stops routing); \
                 controller saw the push confirmed {} after deciding",
                secs(r.detection_secs),
                secs(r.decision_to_envoy_secs),
                secs(r.decision_to_confirmation_secs),
            );
        }
    } else if let Some(t) = s.time_to_rollback_secs {
        let _ = writeln!(
            out,
            "time from fault to weight 0 confirmed by Envoy: {t:.1} s{}",
            s.time_to_rollback_decision_secs
                .map(|d| format!(" (decision after {d:.1} s)"))
                .unwrap_or_default()
        );
    }
    if srm_halt(s) {
        let _ = writeln!(out, "note: {SRM_NOTE}");
    }
    let _ = writeln!(
        out,
        "{:<10} {:>9} {:>8} {:>9} {:>18} {:>9}",
        "variant", "requests", "5xx", "p99 ms", "clicks/req (95%)", "score"
    );
    for (name, v) in &s.variants {
        let _ = writeln!(
            out,
            "{:<10} {:>9.0} {:>8} {:>9} {:>18} {:>9}",
            name,
            v.requests,
            v.error_rate
                .map_or("-".into(), |e| format!("{:.2}%", e * 100.0)),
            v.p99_latency_ms.map_or("-".into(), |l| format!("{l:.0}")),
            match (v.conversion, v.conversion_interval) {
                (Some(c), Some((lo, hi))) =>
                    format!("{:.1}% [{:.1},{:.1}]", c * 100.0, lo * 100.0, hi * 100.0),
                _ => "-".into(),
            },
            v.mean_prediction.map_or("-".into(), |m| format!("{m:.3}")),
        );
    }
    let decisions: Vec<&DecisionSummary> = s
        .decisions
        .iter()
        .filter(|d| d.record == "decision")
        .collect();
    if !decisions.is_empty() {
        let _ = writeln!(out, "decisions:");
        // A hold whose reason carries live numbers is re-announced at every evaluation; one
        // line per run of the same hold keeps the summary on one screen.
        let mut i = 0;
        while i < decisions.len() {
            let d = decisions[i];
            let same = decisions[i + 1..]
                .iter()
                .take_while(|e| e.kind == d.kind && hold_key(e) == hold_key(d))
                .count();
            let _ = writeln!(
                out,
                "  {:>6.1}s  {:<14} {}",
                d.t,
                d.kind.as_deref().unwrap_or("-"),
                d.message.as_deref().unwrap_or("")
            );
            if same > 0 && hold_key(d).is_some() {
                let last = decisions[i + same];
                let _ = writeln!(
                    out,
                    "  {:>6.1}s  {:<14} … the same hold {same} more time(s), numbers updated",
                    last.t, "held"
                );
                i += same;
            }
            i += 1;
        }
    }
    out
}

/// Why the per-variant figures of a run halted on SRM must not be read as a comparison.
const SRM_NOTE: &str = "The split does not match the weights, so the per-variant figures \
below are biased (in the demo, requests that lost their user id were counted for the control, \
and their users' clicks, carrying no exposure token, are not counted at all); that bias is why \
the rollout halts";

fn srm_halt(s: &Summary) -> bool {
    s.final_reason
        .as_deref()
        .is_some_and(|r| r.contains("sample-ratio mismatch"))
}

/// For a `held` decision, the guardrail it names (`holding: srm: …` → `srm`).
fn hold_key(d: &DecisionSummary) -> Option<&str> {
    if d.kind.as_deref() != Some("held") {
        return None;
    }
    let rest = d.message.as_deref()?.strip_prefix("holding: ")?;
    rest.split(':').next()
}

/// Where [`write`] put things.
#[derive(Debug, Clone)]
pub struct Written {
    pub html: PathBuf,
    pub json: PathBuf,
    pub summary: Summary,
}

/// Writes `report.html` and `summary.json` into `dir`.
pub fn write(dir: &Path, input: &ReportInput) -> Result<Written, ReportError> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let summary = summarize(input);
    let html = dir.join("report.html");
    let json = dir.join("summary.json");
    std::fs::write(&html, render_html(input, &summary)).map_err(io_err(&html))?;
    std::fs::write(&json, serde_json::to_vec_pretty(&summary)?).map_err(io_err(&json))?;
    Ok(Written {
        html,
        json,
        summary,
    })
}

// ───────────────────────────── time series for the plots ─────────────────────────────

/// A plotted line; `NaN` values are gaps.
struct Line {
    name: String,
    color: &'static str,
    dashed: bool,
    points: Vec<(f64, f64)>,
    /// Optional shaded band (t, low, high).
    band: Vec<(f64, f64, f64)>,
}

fn color_of(variant: &str, series: &Series) -> &'static str {
    if variant == series.control {
        "#1f77b4"
    } else if variant == series.treatment {
        "#d62728"
    } else {
        "#2ca02c"
    }
}

/// Envoy's counters of every variant at one point.
type Counters = BTreeMap<String, VariantPoint>;

/// (t, counters now, counters at least one window earlier) for every point with Envoy data.
fn windows(series: &Series) -> Vec<(f64, &Counters, &Counters)> {
    let envoy = points_with_envoy(series);
    let mut out = Vec::new();
    for (i, (p, now)) in envoy.iter().enumerate() {
        // A full window once there is one; before that the run so far, if at least a few
        // seconds long, so the first seconds of the run are not blank.
        let earlier = envoy[..i]
            .iter()
            .rev()
            .find(|(q, _)| q.t <= p.t - WINDOW_SECS + 0.5)
            .or_else(|| envoy.first().filter(|(q, _)| p.t - q.t >= 3.0));
        if let Some((_, before)) = earlier {
            out.push((p.t, *now, *before));
        }
    }
    out
}

fn variant_names(series: &Series) -> Vec<String> {
    let mut names: Vec<String> = vec![series.control.clone(), series.treatment.clone()];
    for (_, v) in points_with_envoy(series) {
        for k in v.keys() {
            if !names.contains(k) {
                names.push(k.clone());
            }
        }
    }
    names
}

/// Per-variant line of `f(now, before)` over the windows.
fn per_variant(
    series: &Series,
    f: impl Fn(&VariantPoint, &VariantPoint) -> Option<f64>,
) -> Vec<Line> {
    let empty = VariantPoint::default();
    let ws = windows(series);
    variant_names(series)
        .into_iter()
        .map(|name| Line {
            color: color_of(&name, series),
            points: ws
                .iter()
                .map(|(t, now, before)| {
                    let v = now
                        .get(&name)
                        .and_then(|n| f(n, before.get(&name).unwrap_or(&empty)));
                    (*t, v.unwrap_or(f64::NAN))
                })
                .collect(),
            name,
            dashed: false,
            band: Vec::new(),
        })
        .collect()
}

fn weight_lines(series: &Series) -> Vec<Line> {
    let mut lines = Vec::new();
    let status: Vec<&Point> = series
        .points
        .iter()
        .filter(|p| p.rollout.is_some())
        .collect();
    if !status.is_empty() {
        let pick = |f: fn(&crate::recorder::RolloutPoint) -> f64| {
            series
                .points
                .iter()
                .map(|p| (p.t, p.rollout.as_ref().map_or(f64::NAN, f)))
                .collect()
        };
        lines.push(Line {
            name: "confirmed weight".into(),
            color: "#d62728",
            dashed: false,
            points: pick(|r| r.weight),
            band: Vec::new(),
        });
        lines.push(Line {
            name: "target weight".into(),
            color: "#ff9896",
            dashed: true,
            points: pick(|r| r.target_weight),
            band: Vec::new(),
        });
    }
    let treatment = series.treatment.clone();
    lines.push(Line {
        name: "observed share of requests".into(),
        color: "#555555",
        dashed: false,
        points: windows(series)
            .iter()
            .map(|(t, now, before)| {
                let d = |v: &BTreeMap<String, VariantPoint>, n: &str| {
                    v.get(n).map_or(0.0, |x| x.requests)
                };
                let total: f64 = now.keys().map(|k| d(now, k) - d(before, k)).sum();
                let ours = d(now, &treatment) - d(before, &treatment);
                (
                    *t,
                    if total > 0.0 {
                        100.0 * ours / total
                    } else {
                        f64::NAN
                    },
                )
            })
            .collect(),
        band: Vec::new(),
    });
    lines
}

fn error_lines(series: &Series) -> Vec<Line> {
    per_variant(series, |now, before| {
        let n: f64 = now.responses.values().sum::<f64>() - before.responses.values().sum::<f64>();
        (n > 0.0).then(|| 100.0 * (now.server_errors() - before.server_errors()) / n)
    })
}

fn p99_lines(series: &Series) -> Vec<Line> {
    per_variant(series, |now, before| {
        now.latency_ms.since(&before.latency_ms).quantile(0.99)
    })
}

fn conversion_lines(series: &Series) -> Vec<Line> {
    let click = |v: &VariantPoint| v.outcomes.get("click").copied().unwrap_or(0.0);
    let mut lines = per_variant(series, |now, before| {
        let n = now.requests - before.requests;
        (n > 0.0).then(|| 100.0 * (click(now) - click(before)) / n)
    });
    let ws = windows(series);
    let empty = VariantPoint::default();
    for line in &mut lines {
        line.band = ws
            .iter()
            .filter_map(|(t, now, before)| {
                let now = now.get(&line.name)?;
                let before = before.get(&line.name).unwrap_or(&empty);
                let (lo, hi) = wilson(click(now) - click(before), now.requests - before.requests)?;
                Some((*t, 100.0 * lo, 100.0 * hi))
            })
            .collect();
    }
    lines
}

fn shadow_lines(series: &Series) -> Vec<Line> {
    let ws = windows(series);
    let mut fields: Vec<String> = Vec::new();
    for (_, now, _) in &ws {
        for v in now.values() {
            for f in v.shadow.agree.keys().chain(v.shadow.disagree.keys()) {
                if !fields.contains(f) {
                    fields.push(f.clone());
                }
            }
        }
    }
    const COLORS: [&str; 4] = ["#9467bd", "#8c564b", "#e377c2", "#17becf"];
    fields
        .iter()
        .enumerate()
        .map(|(i, field)| Line {
            name: format!("agreement on {field}"),
            color: COLORS[i % COLORS.len()],
            dashed: false,
            points: ws
                .iter()
                .map(|(t, now, before)| {
                    let sum = |m: &BTreeMap<String, VariantPoint>, agree: bool| -> f64 {
                        m.values()
                            .map(|v| {
                                let c = if agree {
                                    &v.shadow.agree
                                } else {
                                    &v.shadow.disagree
                                };
                                c.get(field).copied().unwrap_or(0.0)
                            })
                            .sum()
                    };
                    let a = sum(now, true) - sum(before, true);
                    let d = sum(now, false) - sum(before, false);
                    (
                        *t,
                        if a + d > 0.0 {
                            100.0 * a / (a + d)
                        } else {
                            f64::NAN
                        },
                    )
                })
                .collect(),
            band: Vec::new(),
        })
        .collect()
}

// ───────────────────────────────────── SVG ─────────────────────────────────────

const W: f64 = 820.0;
const H: f64 = 230.0;
const LEFT: f64 = 60.0;
const RIGHT: f64 = 170.0;
const TOP: f64 = 28.0;
const BOTTOM: f64 = 32.0;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A "nice" step (1, 2 or 5 × 10ⁿ) giving about `n` ticks over `span`.
fn nice_step(span: f64, n: f64) -> f64 {
    if span <= 0.0 || !span.is_finite() {
        return 1.0;
    }
    let raw = span / n;
    let mag = 10f64.powf(raw.log10().floor());
    let r = raw / mag;
    let m = if r <= 1.0 {
        1.0
    } else if r <= 2.0 {
        2.0
    } else if r <= 5.0 {
        5.0
    } else {
        10.0
    };
    m * mag
}

/// A vertical marker at a decision.
struct Marker {
    t: f64,
    color: &'static str,
    label: String,
}

fn markers(input: &ReportInput) -> Vec<Marker> {
    let mut out: Vec<Marker> = input
        .audit
        .iter()
        .filter(|a| a.record == "decision")
        .map(|a| Marker {
            t: a.at - input.series.started_at,
            color: match a.kind.as_deref() {
                Some("rolled_back") => "#d62728",
                Some("promoted") => "#2ca02c",
                Some("held") => "#ff7f0e",
                _ => "#7f7f7f",
            },
            label: a.kind.clone().unwrap_or_default(),
        })
        .collect();
    if let Some(f) = input.series.fault_injected_at {
        out.push(Marker {
            t: f - input.series.started_at,
            color: "#000000",
            label: "fault injected".into(),
        });
        if let Some(b) = breaker_seen_after(&input.series, f) {
            out.push(Marker {
                t: b - input.series.started_at,
                color: "#9467bd",
                label: "breaker tripped".into(),
            });
        }
    }
    out
}

fn time_chart(
    title: &str,
    unit: &str,
    lines: &[Line],
    marks: &[Marker],
    t_max: f64,
    y_floor_max: f64,
) -> String {
    let y_max_data = lines
        .iter()
        .flat_map(|l| {
            l.points
                .iter()
                .map(|p| p.1)
                .chain(l.band.iter().map(|b| b.2))
        })
        .filter(|y| y.is_finite())
        .fold(0.0f64, f64::max);
    let step = nice_step(y_max_data.max(y_floor_max), 4.0);
    let y_max = ((y_max_data.max(y_floor_max) / step).ceil() * step).max(step);
    let t_max = t_max.max(1.0);
    let pw = W - LEFT - RIGHT;
    let ph = H - TOP - BOTTOM;
    let x = |t: f64| LEFT + pw * (t / t_max).clamp(0.0, 1.0);
    let y = |v: f64| TOP + ph * (1.0 - (v / y_max).clamp(0.0, 1.0));

    let mut svg = String::new();
    let _ = write!(
        svg,
        r##"<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" role="img" aria-label="{t}">"##,
        t = esc(title)
    );
    let _ = write!(
        svg,
        r##"<text x="{LEFT}" y="16" class="title">{}</text>"##,
        esc(title)
    );
    // Grid and axes.
    let mut v = 0.0;
    while v <= y_max + step * 0.01 {
        let yy = y(v);
        let _ = write!(
            svg,
            r##"<line x1="{LEFT}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#e6e6e6" class="grid"/><text x="{:.1}" y="{:.1}" class="tick" text-anchor="end">{}</text>"##,
            LEFT + pw,
            LEFT - 6.0,
            yy + 4.0,
            fmt_num(v)
        );
        v += step;
    }
    let tstep = nice_step(t_max, 8.0);
    let mut t = 0.0;
    while t <= t_max + 1e-9 {
        let xx = x(t);
        let _ = write!(
            svg,
            r##"<text x="{xx:.1}" y="{:.1}" class="tick" text-anchor="middle">{}s</text>"##,
            H - BOTTOM + 16.0,
            fmt_num(t)
        );
        t += tstep;
    }
    let _ = write!(
        svg,
        r##"<text x="14" y="{:.1}" class="tick" transform="rotate(-90 14 {:.1})" text-anchor="middle">{}</text>"##,
        TOP + ph / 2.0,
        TOP + ph / 2.0,
        esc(unit)
    );
    // Bands first so lines sit on top.
    for l in lines.iter().filter(|l| l.band.len() >= 2) {
        let mut d = String::new();
        for (i, (t, lo, _)) in l.band.iter().enumerate() {
            let _ = write!(
                d,
                "{}{:.1},{:.1} ",
                if i == 0 { "M" } else { "L" },
                x(*t),
                y(*lo)
            );
        }
        for (t, _, hi) in l.band.iter().rev() {
            let _ = write!(d, "L{:.1},{:.1} ", x(*t), y(*hi));
        }
        let _ = write!(
            svg,
            r##"<path d="{}Z" fill="{}" fill-opacity="0.15" stroke="none" class="band"/>"##,
            d, l.color
        );
    }
    for l in lines {
        let mut d = String::new();
        let mut pen_down = false;
        for (t, v) in &l.points {
            if v.is_finite() {
                let _ = write!(
                    d,
                    "{}{:.1},{:.1} ",
                    if pen_down { "L" } else { "M" },
                    x(*t),
                    y(*v)
                );
                pen_down = true;
            } else {
                pen_down = false;
            }
        }
        if !d.is_empty() {
            let _ = write!(
                svg,
                r##"<path d="{}" fill="none" stroke="{}" stroke-width="1.8"{} class="line"><title>{}</title></path>"##,
                d.trim_end(),
                l.color,
                if l.dashed {
                    r#" stroke-dasharray="5 4""#
                } else {
                    ""
                },
                esc(&l.name)
            );
        }
    }
    for (i, m) in marks.iter().enumerate() {
        let xx = x(m.t);
        let _ = write!(
            svg,
            r##"<line x1="{xx:.1}" y1="{TOP}" x2="{xx:.1}" y2="{:.1}" stroke="{}" stroke-width="1" stroke-dasharray="2 3" class="marker"><title>{:.1}s {}</title></line>"##,
            TOP + ph,
            m.color,
            m.t,
            esc(&m.label)
        );
        let _ = i;
    }
    // Legend on the right.
    for (i, l) in lines.iter().enumerate() {
        let ly = TOP + 8.0 + 16.0 * i as f64;
        let _ = write!(
            svg,
            r##"<line x1="{:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{}" stroke-width="2.5"{}/><text x="{:.1}" y="{:.1}" class="legend">{}</text>"##,
            W - RIGHT + 12.0,
            W - RIGHT + 32.0,
            l.color,
            if l.dashed {
                r#" stroke-dasharray="5 4""#
            } else {
                ""
            },
            W - RIGHT + 38.0,
            ly + 4.0,
            esc(&l.name)
        );
    }
    svg.push_str("</svg>");
    svg
}

fn fmt_num(v: f64) -> String {
    if (v - v.round()).abs() < 1e-9 {
        format!("{v:.0}")
    } else if v.abs() < 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.1}")
    }
}

/// Side-by-side bars of the control's and the treatment's prediction distributions
/// (each normalised to its own total), from the given histograms.
fn prediction_chart(series: &Series, hists: &[(String, Histogram)]) -> String {
    let dists: Vec<(String, Vec<(f64, f64)>)> = hists
        .iter()
        .filter(|(_, h)| h.cumulative.last().copied().unwrap_or(0.0) > 0.0)
        .map(|(n, h)| {
            let total = h.cumulative.last().copied().unwrap_or(1.0);
            (
                n.clone(),
                h.buckets()
                    .into_iter()
                    .filter(|(le, _)| le.is_finite())
                    .map(|(le, c)| (le / 1000.0, c / total))
                    .collect(),
            )
        })
        .collect();
    let title = "Prediction distribution (share of responses per score bucket)";
    if dists.is_empty() {
        return format!("<p class=\"empty\">{title}: no predictions recorded.</p>");
    }
    let nb = dists.iter().map(|d| d.1.len()).max().unwrap_or(1).max(1);
    let y_max_data = dists
        .iter()
        .flat_map(|d| d.1.iter().map(|b| b.1))
        .fold(0.0f64, f64::max);
    let step = nice_step(y_max_data, 4.0);
    let y_max = ((y_max_data / step).ceil() * step).max(step);
    let pw = W - LEFT - RIGHT;
    let ph = H - TOP - BOTTOM;
    let slot = pw / nb as f64;
    let bar = slot * 0.8 / dists.len() as f64;
    let mut svg = String::new();
    let _ = write!(
        svg,
        r##"<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" role="img" aria-label="{title}"><text x="{LEFT}" y="16" class="title">{title}</text>"##
    );
    let mut v = 0.0;
    while v <= y_max + step * 0.01 {
        let yy = TOP + ph * (1.0 - v / y_max);
        let _ = write!(
            svg,
            r##"<line x1="{LEFT}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#e6e6e6" class="grid"/><text x="{:.1}" y="{:.1}" class="tick" text-anchor="end">{:.0}%</text>"##,
            LEFT + pw,
            LEFT - 6.0,
            yy + 4.0,
            v * 100.0
        );
        v += step;
    }
    for (di, (name, buckets)) in dists.iter().enumerate() {
        let color = color_of(name, series);
        for (bi, (le, share)) in buckets.iter().enumerate() {
            let h = ph * share / y_max;
            let _ = write!(
                svg,
                r##"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{color}" fill-opacity="0.8" class="bar"><title>{} ≤ {:.2}: {:.1}%</title></rect>"##,
                LEFT + slot * bi as f64 + slot * 0.1 + bar * di as f64,
                TOP + ph - h,
                bar,
                h,
                esc(name),
                le,
                share * 100.0
            );
            if di == 0 && bi % 2 == 1 {
                let _ = write!(
                    svg,
                    r##"<text x="{:.1}" y="{:.1}" class="tick" text-anchor="middle">{:.1}</text>"##,
                    LEFT + slot * (bi as f64 + 1.0),
                    H - BOTTOM + 16.0,
                    le
                );
            }
        }
        let ly = TOP + 8.0 + 16.0 * di as f64;
        let _ = write!(
            svg,
            r##"<rect x="{:.1}" y="{:.1}" width="18" height="10" fill="{color}"/><text x="{:.1}" y="{:.1}" class="legend">{}</text>"##,
            W - RIGHT + 12.0,
            ly - 5.0,
            W - RIGHT + 38.0,
            ly + 4.0,
            esc(name)
        );
    }
    svg.push_str("</svg>");
    svg
}

/// Prediction histograms of control and treatment since the fault (or over the whole run),
/// so a drift is not diluted by the healthy part of the run.
fn prediction_hists(series: &Series) -> (Vec<(String, Histogram)>, &'static str) {
    let envoy = points_with_envoy(series);
    let Some((_, last)) = envoy.last() else {
        return (Vec::new(), "");
    };
    let from = series
        .fault_injected_at
        .and_then(|f| envoy.iter().rev().find(|(p, _)| p.at <= f).map(|(_, v)| *v));
    let names = [series.control.clone(), series.treatment.clone()];
    let hists = names
        .iter()
        .filter_map(|n| {
            let now = &last.get(n)?.prediction;
            let h = match from.and_then(|f| f.get(n)) {
                Some(before) => now.since(&before.prediction),
                None => now.clone(),
            };
            Some((n.clone(), h))
        })
        .collect();
    (
        hists,
        if from.is_some() {
            "since the fault was injected"
        } else {
            "over the whole run"
        },
    )
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1000px}\
h1{font-size:22px}h2{font-size:17px;margin-top:28px}\
.verdict{font-size:18px;padding:10px 14px;border-radius:6px;background:#f2f2f2;display:inline-block}\
.verdict.promoted{background:#e3f4e3}.verdict.rolled_back{background:#fbe3e3}\
table{border-collapse:collapse;font-size:13px;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}\
td.l,th.l{text-align:left}.chart{display:block;margin:10px 0}\
.chart .title{font-size:13px;font-weight:600}.chart .tick{font-size:10px;fill:#555}\
.chart .legend{font-size:11px}.chart .grid{stroke:#e6e6e6;stroke-width:1}.empty{color:#777}";

/// The whole HTML page.
pub fn render_html(input: &ReportInput, summary: &Summary) -> String {
    let s = &input.series;
    let t_max = s.points.last().map_or(1.0, |p| p.t);
    let marks = markers(input);
    let mut h = String::new();
    let _ = write!(
        h,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Sluice demo: {}</title><style>{STYLE}</style></head><body>",
        esc(&s.experiment)
    );
    let _ = write!(
        h,
        "<h1>Sluice rollout of <code>{}</code> → <code>{}</code>{}</h1>",
        esc(&s.control),
        esc(&s.treatment),
        s.scenario
            .as_ref()
            .map(|sc| format!(" — scenario <code>{}</code>", esc(sc)))
            .unwrap_or_default()
    );
    let _ = write!(
        h,
        "<p class=\"verdict {}\"><b>{}</b>{}{}</p>",
        esc(&summary.final_phase),
        esc(&summary.final_phase),
        summary
            .final_weight
            .map(|w| format!(" at {w:.2} %"))
            .unwrap_or_default(),
        summary
            .final_reason
            .as_ref()
            .map(|r| format!(" — {}", esc(r)))
            .unwrap_or_default()
    );
    if let Some(e) = &summary.expected {
        let _ = write!(h, "<p>Expected: {}.</p>", esc(e));
    }
    if srm_halt(summary) {
        let _ = write!(h, "<p>{}.</p>", esc(SRM_NOTE));
    }
    match summary.as_expected {
        Some(true) => h.push_str(
            "<p class=\"verdict promoted\">✔ The run ended as this scenario expects.</p>",
        ),
        Some(false) => h.push_str(
            "<p class=\"verdict rolled_back\">✘ The run did not end as this scenario expects.</p>",
        ),
        None => {}
    }
    if let Some(r) = summary
        .rollback
        .as_ref()
        .filter(|r| r.envoy_last_routed_at.is_some())
    {
        let secs = |x: Option<f64>| x.map_or("?".to_string(), |x| format!("{x:.2} s"));
        let _ = write!(
            h,
            "<p>Time to rollback, from fault injection to Envoy's last request to the treatment \
             (its <code>upstream_rq_total</code> counter, polled every {}): <b>{}</b> = detection \
             {} (fault → rollback decision) + {} (decision → Envoy stops routing). The controller \
             saw Envoy confirm the push {} after deciding.</p>",
            secs(r.probe_every_secs),
            secs(r.fault_to_zero_traffic_secs),
            secs(r.detection_secs),
            secs(r.decision_to_envoy_secs),
            secs(r.decision_to_confirmation_secs),
        );
    } else if let Some(t) = summary.time_to_rollback_secs {
        let _ = write!(
            h,
            "<p>From fault injection to Envoy confirming weight 0: <b>{t:.1} s</b>{}.</p>",
            summary
                .time_to_rollback_decision_secs
                .map(|d| format!(" (rollback decided after {d:.1} s)"))
                .unwrap_or_default()
        );
    }
    let _ = write!(
        h,
        "<p>Run of {:.0} s, {} samples; rates over a sliding {WINDOW_SECS:.0} s window. Dotted vertical lines are decisions (hover for the kind); black is the fault.</p>",
        summary.duration_secs,
        s.points.len()
    );

    h.push_str(&time_chart(
        "Treatment weight (%)",
        "% of users",
        &weight_lines(s),
        &marks,
        t_max,
        10.0,
    ));
    h.push_str(&time_chart(
        "5xx error rate (%)",
        "% of responses",
        &error_lines(s),
        &marks,
        t_max,
        1.0,
    ));
    h.push_str(&time_chart(
        "p99 latency (ms)",
        "ms",
        &p99_lines(s),
        &marks,
        t_max,
        50.0,
    ));
    h.push_str(&time_chart(
        "Conversion: clicks per request (%), 95 % Wilson interval shaded",
        "% clicks",
        &conversion_lines(s),
        &marks,
        t_max,
        5.0,
    ));
    let shadow = shadow_lines(s);
    if !shadow.is_empty() {
        h.push_str(&time_chart(
            "Shadow agreement (%)",
            "% agree",
            &shadow,
            &marks,
            t_max,
            100.0,
        ));
    }
    let (hists, when) = prediction_hists(s);
    let _ = write!(h, "<h2>Predictions ({when})</h2>");
    h.push_str(&prediction_chart(s, &hists));

    h.push_str("<h2>Per variant (whole run, Envoy's counters)</h2><table><tr><th class=\"l\">variant</th><th>requests</th><th>5xx</th><th>p99 ms</th><th>clicks / request [95 %]</th><th>purchases</th><th>mean score</th><th>shadow agreement</th></tr>");
    for (name, v) in &summary.variants {
        let _ = write!(
            h,
            "<tr><td class=\"l\">{}</td><td>{:.0}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.0}</td><td>{}</td><td>{}</td></tr>",
            esc(name),
            v.requests,
            v.error_rate.map_or("-".into(), |e| format!("{:.2} %", e * 100.0)),
            v.p99_latency_ms.map_or("-".into(), |l| format!("{l:.0}")),
            match (v.conversion, v.conversion_interval) {
                (Some(c), Some((lo, hi))) => format!(
                    "{:.2} % [{:.2}, {:.2}]",
                    c * 100.0,
                    lo * 100.0,
                    hi * 100.0
                ),
                _ => "-".into(),
            },
            v.purchases,
            v.mean_prediction.map_or("-".into(), |m| format!("{m:.3}")),
            v.shadow_agreement
                .map_or("-".into(), |a| format!("{:.1} %", a * 100.0)),
        );
    }
    h.push_str("</table>");

    h.push_str("<h2>Decisions and pushes</h2>");
    if summary.decisions.is_empty() {
        h.push_str("<p class=\"empty\">No decisions recorded (no controller ran).</p>");
    } else {
        h.push_str("<table class=\"decisions\"><tr><th>t (s)</th><th class=\"l\">record</th><th class=\"l\">kind</th><th>weight</th><th class=\"l\">reason / detail</th></tr>");
        for d in &summary.decisions {
            let detail = match (&d.message, d.decision_to_confirmation_secs) {
                (Some(m), _) => esc(m),
                (None, Some(l)) => format!("confirmed {l:.2} s after the decision"),
                (None, None) => String::new(),
            };
            let _ = write!(
                h,
                "<tr><td>{:.1}</td><td class=\"l\">{}</td><td class=\"l\">{}</td><td>{}</td><td class=\"l\">{}</td></tr>",
                d.t,
                esc(&d.record),
                esc(d.kind.as_deref().unwrap_or("")),
                d.weight.map_or("-".into(), |w| format!("{w:.2} %")),
                detail
            );
        }
        h.push_str("</table>");
    }
    if let Some(u) = &summary.users {
        h.push_str("<h2>What the synthetic users saw</h2><table><tr><th class=\"l\">variant</th><th>requests</th><th>5xx + failed</th><th>p50 ms</th><th>p99 ms</th><th>clicks</th><th>purchases</th></tr>");
        for (name, v) in &u.variants {
            let _ = write!(
                h,
                "<tr><td class=\"l\">{}</td><td>{}</td><td>{:.2} %</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(name),
                v.requests,
                v.error_rate() * 100.0,
                v.latency_p50_ms.map_or("-".into(), |l| format!("{l:.0}")),
                v.latency_p99_ms.map_or("-".into(), |l| format!("{l:.0}")),
                v.clicks,
                v.purchases
            );
        }
        let _ = write!(
            h,
            "</table><p>{} requests sent, {} skipped (too many in flight), {} sent without a user id.</p>",
            u.sent, u.skipped, u.ids_dropped
        );
    }
    h.push_str("</body></html>\n");
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recorder::RolloutPoint;

    #[test]
    fn wilson_matches_known_values() {
        // 10 of 100 at 95 %: [0.0552, 0.1744].
        let (lo, hi) = wilson(10.0, 100.0).unwrap_or_default();
        assert!((lo - 0.0552).abs() < 5e-4, "{lo}");
        assert!((hi - 0.1744).abs() < 5e-4, "{hi}");
        assert_eq!(wilson(0.0, 0.0), None);
        let (lo, hi) = wilson(0.0, 50.0).unwrap_or_default();
        assert_eq!(lo, 0.0);
        assert!(hi > 0.05 && hi < 0.1);
    }

    #[test]
    fn audit_keeps_decisions_and_pushes() {
        let text = r#"{"at":1.0,"rollout":"demo","record":"evaluation","judgement":{"kind":"pass"}}
{"at":2.0,"rollout":"demo","record":"decision","kind":"stage_changed","message":"stage 2","phase":{"phase":"canary","index":1},"weight":1.0}
{"at":3.0,"rollout":"demo","record":"push","version":3,"weight":5.0,"shadow":false,"decision_to_confirmation_secs":0.8}

"#;
        let got = parse_audit(text).unwrap_or_default();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].kind.as_deref(), Some("stage_changed"));
        assert_eq!(got[1].decision_to_confirmation_secs, Some(0.8));
        assert_eq!(parse_audit("{").map_err(|e| e.0), Err(1));
    }

    #[test]
    fn nice_steps() {
        assert_eq!(nice_step(100.0, 4.0), 50.0);
        assert_eq!(nice_step(0.9, 4.0), 0.5);
        assert_eq!(nice_step(180.0, 8.0), 50.0);
        assert_eq!(nice_step(0.0, 4.0), 1.0);
    }

    #[test]
    fn rollback_timing_comes_from_the_fault_and_the_zero_push() {
        let series = Series {
            experiment: "demo".into(),
            control: "stable".into(),
            treatment: "canary".into(),
            started_at: 100.0,
            fault_injected_at: Some(130.0),
            breaker: None,
            points: vec![Point {
                t: 40.0,
                at: 140.0,
                rollout: Some(RolloutPoint {
                    phase: "rolled_back".into(),
                    rolled_back_reason: Some("5xx".into()),
                    ..RolloutPoint::default()
                }),
                ..Point::default()
            }],
            treatment_routing: Some(crate::recorder::Routing {
                every_secs: 0.05,
                requests: 500.0,
                last_increase_seen_at: Some(134.6),
                previous_poll_at: Some(134.55),
                polls: 700,
                failed_polls: 0,
            }),
            ..Series::default()
        };
        let audit = vec![
            AuditRecord {
                at: 120.0,
                record: "push".into(),
                kind: None,
                message: None,
                weight: Some(0.0),
                version: Some(1),
                decision_to_confirmation_secs: Some(0.1),
                cause: None,
            },
            AuditRecord {
                at: 134.0,
                record: "decision".into(),
                kind: Some("rolled_back".into()),
                message: Some("5xx".into()),
                weight: Some(10.0),
                version: None,
                decision_to_confirmation_secs: None,
                cause: None,
            },
            AuditRecord {
                at: 135.5,
                record: "push".into(),
                kind: None,
                message: None,
                weight: Some(0.0),
                version: Some(5),
                decision_to_confirmation_secs: Some(1.5),
                cause: None,
            },
        ];
        let expect = |phase: &str, mentions: &[&str]| Expectation {
            phase: phase.into(),
            weight: None,
            reason_mentions: mentions.iter().map(|m| m.to_string()).collect(),
        };
        let s = summarize(&ReportInput {
            series,
            audit,
            users: None,
            expected: None,
            expectation: Some(expect("rolled_back", &["latency", "5xx"])),
        });
        assert_eq!(s.final_phase, "rolled_back");
        assert_eq!(s.final_reason.as_deref(), Some("5xx"));
        assert_eq!(s.time_to_rollback_decision_secs, Some(4.0));
        assert_eq!(s.time_to_rollback_secs, Some(5.5));
        assert_eq!(s.as_expected, Some(true));
        let r = s.rollback.clone().unwrap_or_default();
        assert_eq!(r.detection_secs, Some(4.0));
        let close = |a: Option<f64>, b: f64| a.is_some_and(|a| (a - b).abs() < 1e-9);
        assert!(close(r.decision_to_envoy_secs, 0.6), "{r:?}");
        assert!(close(s.time_to_zero_traffic_secs, 4.6), "{s:?}");
        assert_eq!(r.decision_to_confirmation_secs, Some(1.5));
        assert!(!expect("rolled_back", &["latency"]).met_by(&s));
        assert!(!expect("promoted", &[]).met_by(&s));
        assert!(summary_text(&s).contains("time to rollback"));
    }

    #[test]
    fn a_breaker_rollback_shows_its_cause_and_when_the_trip_was_seen() {
        let point = |at: f64, trips: f64| {
            let canary = VariantPoint {
                breaker_trips: [("5xx".to_string(), trips)].into(),
                breaker_tripped: f64::from(u8::from(trips > 1.0)),
                ..VariantPoint::default()
            };
            Point {
                t: at - 100.0,
                at,
                variants: Some([("canary".to_string(), canary)].into()),
                ..Point::default()
            }
        };
        let series = Series {
            experiment: "demo".into(),
            control: "stable".into(),
            treatment: "canary".into(),
            started_at: 100.0,
            fault_injected_at: Some(130.0),
            breaker: Some(serde_json::json!({"min_requests": 50})),
            // One trip from before the fault (an earlier run's), the new one seen at 132.
            points: vec![point(129.0, 1.0), point(131.0, 1.0), point(132.0, 2.0)],
            treatment_routing: Some(crate::recorder::Routing {
                every_secs: 0.05,
                requests: 500.0,
                last_increase_seen_at: Some(131.4),
                previous_poll_at: Some(131.35),
                polls: 700,
                failed_polls: 0,
            }),
            ..Series::default()
        };
        let audit = vec![
            AuditRecord {
                at: 133.2,
                record: "push".into(),
                kind: None,
                message: None,
                weight: Some(0.0),
                version: Some(4),
                decision_to_confirmation_secs: Some(0.2),
                cause: None,
            },
            AuditRecord {
                at: 133.2,
                record: "decision".into(),
                kind: Some("rolled_back".into()),
                message: Some("rolled back: breaker: the data plane took canary out".into()),
                weight: Some(10.0),
                version: None,
                decision_to_confirmation_secs: None,
                cause: Some("breaker".into()),
            },
        ];
        let input = ReportInput {
            series,
            audit,
            users: None,
            expected: None,
            expectation: Some(crate::scenario::Scenario::ErrorSpike.expectation_with(true)),
        };
        let s = summarize(&input);
        let r = s.rollback.clone().unwrap_or_default();
        assert_eq!(r.cause.as_deref(), Some("breaker"));
        assert_eq!(r.breaker_seen_at, Some(132.0));
        assert!(r
            .fault_to_zero_traffic_secs
            .is_some_and(|t| (t - 1.4).abs() < 1e-9));
        assert_eq!(s.as_expected, Some(true), "{s:?}");
        let text = summary_text(&s);
        assert!(
            text.contains("= the filter's breaker, in the data plane (its trip seen in Envoy's counters 2.00 s after the fault"),
            "{text}"
        );
        assert!(markers(&input)
            .iter()
            .any(|m| m.label == "breaker tripped" && m.t == 32.0));
        // The same run judged without a breaker expects the judge's guardrails instead.
        let without = crate::scenario::Scenario::ErrorSpike.expectation_with(false);
        assert!(!without.met_by(&s));
    }
}
