//! The judge's configuration, [`GuardrailConfig`]: a standalone serde type (embedded as
//! `spec.guardrails` of a rollout spec), with defaults for every field and validation that
//! names the field path. Field reference: `docs/statistics.md`.

use serde::{Deserialize, Deserializer, Serialize};

use crate::snapshot::ResetPolicy;

/// Every knob of the judge.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct GuardrailConfig {
    /// False-rollback rate over the whole rollout, shared by the statistical guardrails (Holm).
    pub alpha: f64,
    /// False-promotion rate of one stage, per guardrail (an intersection-union test needs no
    /// correction: every guardrail must pass).
    pub beta: f64,
    /// Power the mixtures are tuned for (the effect each guardrail's margin describes).
    pub power: f64,
    /// A statistical breach must hold for this many consecutive evaluations.
    pub consecutive: u32,
    /// Data ignored after each stage starts.
    #[serde(with = "seconds")]
    pub warmup: f64,
    /// Requests each of control and canary needs in the evidence before anything is judged.
    pub min_requests: u64,
    /// What "this stage passes" requires.
    pub promotion: Promotion,
    pub score: ScoreConfig,
    pub counter_reset: ResetPolicy,
    pub error_rate: ErrorRateConfig,
    pub latency: LatencyConfig,
    /// Outcome metrics, e.g. `[{outcome: click}]`.
    pub business: Vec<BusinessConfig>,
    pub drift: DriftConfig,
    pub shadow: ShadowConfig,
    pub srm: SrmConfig,
}

/// What a stage needs to pass.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Promotion {
    /// Every guardrail proven non-inferior within its margin (sequentially, at `beta`).
    #[default]
    NonInferiority,
    /// Enough data and no breach: a smoke test, for early stages too small to prove anything.
    NoBreach,
}

/// Kayenta-style score thresholds (percent of guardrail weight that passes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScoreConfig {
    pub pass: f64,
    pub marginal: f64,
}

impl Default for ScoreConfig {
    fn default() -> Self {
        ScoreConfig {
            pass: 95.0,
            marginal: 60.0,
        }
    }
}

/// An allowance: `relative` × the control's value + `absolute`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Margin {
    pub relative: f64,
    pub absolute: f64,
}

impl Margin {
    pub const fn new(relative: f64, absolute: f64) -> Margin {
        Margin { relative, absolute }
    }
}

/// 5xx share of responses, canary against control.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct ErrorRateConfig {
    pub enabled: bool,
    /// How much worse the canary may be and still pass (non-inferiority margin).
    pub margin: Margin,
    /// How much worse the canary must be before it is a breach (0: any proven harm).
    pub tolerance: Margin,
    /// Hard gate: the canary's error rate must stay below this (absolute share).
    pub ceiling: Option<f64>,
    pub weight: f64,
    pub critical: bool,
}

impl Default for ErrorRateConfig {
    fn default() -> Self {
        ErrorRateConfig {
            enabled: true,
            margin: Margin::new(0.25, 0.001),
            tolerance: Margin::default(),
            ceiling: Some(0.05),
            weight: 3.0,
            critical: true,
        }
    }
}

/// Latency quantiles, from the `sluice_latency_ms` histogram.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct LatencyConfig {
    pub enabled: bool,
    pub quantiles: Vec<QuantileConfig>,
}

impl Default for LatencyConfig {
    fn default() -> Self {
        LatencyConfig {
            enabled: true,
            quantiles: [0.5, 0.95, 0.99]
                .iter()
                .map(|&q| QuantileConfig {
                    quantile: q,
                    ..QuantileConfig::default()
                })
                .collect(),
        }
    }
}

/// One latency quantile. The statistical test compares the shares of requests slower than the
/// bound where this quantile falls (see `docs/statistics.md`); margins are on that share.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct QuantileConfig {
    pub quantile: f64,
    pub margin: Margin,
    pub tolerance: Margin,
    /// Hard gate: the canary's quantile must stay below this many milliseconds.
    pub slo_ms: Option<f64>,
    pub weight: f64,
    pub critical: bool,
}

impl Default for QuantileConfig {
    fn default() -> Self {
        QuantileConfig {
            quantile: 0.99,
            margin: Margin::new(0.25, 0.0),
            tolerance: Margin::default(),
            slo_ms: None,
            weight: 1.0,
            critical: true,
        }
    }
}

/// Denominator of a business metric.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Per {
    #[default]
    Request,
    Exposure,
}

/// Which direction is good.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Direction {
    #[default]
    HigherIsBetter,
    LowerIsBetter,
}

/// Variance model of an outcome count.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum CountModel {
    /// At most one outcome per request (conversion).
    #[default]
    Binomial,
    /// Any number per request (clicks, items): variance = mean.
    Poisson,
}

/// An outcome count per request or exposure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct BusinessConfig {
    /// The `outcome` label.
    pub outcome: String,
    pub per: Per,
    pub direction: Direction,
    pub model: CountModel,
    pub margin: Margin,
    pub tolerance: Margin,
    pub weight: f64,
    pub critical: bool,
}

impl Default for BusinessConfig {
    fn default() -> Self {
        BusinessConfig {
            outcome: String::new(),
            per: Per::Request,
            direction: Direction::HigherIsBetter,
            model: CountModel::Binomial,
            margin: Margin::new(0.05, 0.0),
            tolerance: Margin::default(),
            weight: 2.0,
            critical: true,
        }
    }
}

/// Prediction drift between the canary's and the control's prediction histograms. Applies only
/// when the snapshots carry prediction histograms.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct DriftConfig {
    pub enabled: bool,
    /// Population stability index above which the prediction distribution has drifted.
    pub max_psi: Option<f64>,
    /// Kolmogorov–Smirnov distance (beyond its sampling noise) above which it has drifted.
    pub max_ks: Option<f64>,
    /// Relative shift of the mean prediction allowed (0.05 = 5 %).
    pub max_mean_shift: Option<f64>,
    /// Predictions each variant needs before drift is judged.
    pub min_count: u64,
    pub weight: f64,
    pub critical: bool,
}

impl Default for DriftConfig {
    fn default() -> Self {
        DriftConfig {
            enabled: true,
            max_psi: Some(0.2),
            max_ks: Some(0.1),
            max_mean_shift: Some(0.05),
            min_count: 500,
            weight: 1.0,
            critical: false,
        }
    }
}

/// Shadow agreement: applies only when the snapshots carry shadow counters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct ShadowConfig {
    pub enabled: bool,
    /// Share of compared shadow answers that must agree, per field.
    pub min_agreement: f64,
    /// Fields judged (default `status`).
    pub fields: Vec<String>,
    pub weight: f64,
    pub critical: bool,
}

impl Default for ShadowConfig {
    fn default() -> Self {
        ShadowConfig {
            enabled: true,
            min_agreement: 0.99,
            fields: vec!["status".into()],
            weight: 1.0,
            critical: false,
        }
    }
}

/// Sample-ratio mismatch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct SrmConfig {
    pub enabled: bool,
    /// False-halt rate per stage.
    pub alpha: f64,
}

impl Default for SrmConfig {
    fn default() -> Self {
        SrmConfig {
            enabled: true,
            alpha: 0.001,
        }
    }
}

impl Default for GuardrailConfig {
    fn default() -> Self {
        GuardrailConfig {
            alpha: 0.01,
            beta: 0.05,
            power: 0.8,
            consecutive: 3,
            warmup: 60.0,
            min_requests: 500,
            promotion: Promotion::NonInferiority,
            score: ScoreConfig::default(),
            counter_reset: ResetPolicy::SinceRestart,
            error_rate: ErrorRateConfig::default(),
            latency: LatencyConfig::default(),
            business: Vec::new(),
            drift: DriftConfig::default(),
            shadow: ShadowConfig::default(),
            srm: SrmConfig::default(),
        }
    }
}

/// An invalid guardrail configuration: every problem, each with its field path.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}", problems.join("; "))]
pub struct ConfigError {
    pub problems: Vec<String>,
}

impl GuardrailConfig {
    /// Reads and validates a configuration from a JSON value; `prefix` is the path of that
    /// value in its document (e.g. `spec.guardrails`), used in error messages.
    pub fn from_value(value: serde_json::Value, prefix: &str) -> Result<Self, ConfigError> {
        let value = if value.is_null() {
            serde_json::Value::Object(Default::default())
        } else {
            value
        };
        let config: GuardrailConfig = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            let path = if path == "." {
                prefix.to_string()
            } else {
                format!("{prefix}.{path}")
            };
            ConfigError {
                problems: vec![format!(
                    "{path}: {}",
                    sluice_filter::config::plain_type_error(&e.into_inner().to_string())
                )],
            }
        })?;
        config.check(prefix)?;
        Ok(config)
    }

    /// Reads YAML or JSON text: the `spec.guardrails` of a rollout spec if the document has
    /// one, else the whole document.
    pub fn from_text(text: &str) -> Result<Self, ConfigError> {
        let value = crate::yaml::to_value(text).map_err(|e| ConfigError {
            problems: vec![format!("(document): {e}")],
        })?;
        match value.get("spec").and_then(|s| s.get("guardrails")) {
            Some(g) => Self::from_value(g.clone(), "spec.guardrails"),
            None if value.get("spec").is_some() => Self::from_value(
                serde_json::Value::Object(Default::default()),
                "spec.guardrails",
            ),
            None => Self::from_value(value, "guardrails"),
        }
    }

    /// Every problem, each named by its path under `prefix`.
    pub fn check(&self, prefix: &str) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        let mut bad = |path: &str, why: &str| problems.push(format!("{prefix}.{path}: {why}"));
        let prob = |x: f64| x > 0.0 && x < 1.0;
        if !(prob(self.alpha) && self.alpha <= 0.5) {
            bad("alpha", "must be in (0, 0.5]");
        }
        if !(prob(self.beta) && self.beta <= 0.5) {
            bad("beta", "must be in (0, 0.5]");
        }
        if !(self.power >= 0.5 && self.power < 1.0) {
            bad("power", "must be in [0.5, 1)");
        }
        if self.consecutive == 0 {
            bad("consecutive", "must be at least 1");
        }
        if !(self.warmup.is_finite() && self.warmup >= 0.0) {
            bad("warmup", "must be a non-negative duration");
        }
        if self.min_requests == 0 {
            bad("minRequests", "must be at least 1");
        }
        let s = &self.score;
        if !(0.0 <= s.marginal && s.marginal <= s.pass && s.pass <= 100.0) {
            bad("score", "need 0 <= marginal <= pass <= 100");
        }
        let mut margin = |path: &str, m: &Margin| {
            if !(m.relative.is_finite() && m.relative >= 0.0 && m.relative < 1.0) {
                problems.push(format!("{prefix}.{path}.relative: must be in [0, 1)"));
            }
            if !(m.absolute.is_finite() && m.absolute >= 0.0) {
                problems.push(format!("{prefix}.{path}.absolute: must be >= 0"));
            }
        };
        let e = &self.error_rate;
        margin("errorRate.margin", &e.margin);
        margin("errorRate.tolerance", &e.tolerance);
        for (i, q) in self.latency.quantiles.iter().enumerate() {
            margin(&format!("latency.quantiles[{i}].margin"), &q.margin);
            margin(&format!("latency.quantiles[{i}].tolerance"), &q.tolerance);
        }
        for (i, b) in self.business.iter().enumerate() {
            margin(&format!("business[{i}].margin"), &b.margin);
            margin(&format!("business[{i}].tolerance"), &b.tolerance);
        }
        let mut bad = |path: String, why: &str| problems.push(format!("{prefix}.{path}: {why}"));
        let weight_ok = |w: f64| w.is_finite() && w >= 0.0;
        if e.ceiling.is_some_and(|c| !prob(c)) {
            bad("errorRate.ceiling".into(), "must be in (0, 1)");
        }
        if !weight_ok(e.weight) {
            bad("errorRate.weight".into(), "must be >= 0");
        }
        if e.tolerance.relative > e.margin.relative || e.tolerance.absolute > e.margin.absolute {
            bad(
                "errorRate.tolerance".into(),
                "must not exceed errorRate.margin (a breach must be worse than a pass)",
            );
        }
        for (i, q) in self.latency.quantiles.iter().enumerate() {
            if !prob(q.quantile) {
                bad(
                    format!("latency.quantiles[{i}].quantile"),
                    "must be in (0, 1)",
                );
            }
            if q.slo_ms.is_some_and(|s| !(s.is_finite() && s > 0.0)) {
                bad(format!("latency.quantiles[{i}].sloMs"), "must be > 0");
            }
            if !weight_ok(q.weight) {
                bad(format!("latency.quantiles[{i}].weight"), "must be >= 0");
            }
        }
        // A set, not a scan of the earlier entries: validation stays linear in the list.
        let mut seen = std::collections::HashSet::with_capacity(self.business.len());
        for (i, b) in self.business.iter().enumerate() {
            if b.outcome.is_empty() {
                bad(format!("business[{i}].outcome"), "must name an outcome");
            }
            if !weight_ok(b.weight) {
                bad(format!("business[{i}].weight"), "must be >= 0");
            }
            if !seen.insert((b.outcome.as_str(), b.per)) {
                bad(format!("business[{i}].outcome"), "is listed twice");
            }
        }
        let d = &self.drift;
        if d.max_psi.is_some_and(|x| !(x.is_finite() && x > 0.0)) {
            bad("drift.maxPsi".into(), "must be > 0");
        }
        if d.max_ks.is_some_and(|x| !(x > 0.0 && x < 1.0)) {
            bad("drift.maxKs".into(), "must be in (0, 1)");
        }
        if d.max_mean_shift
            .is_some_and(|x| !(x.is_finite() && x > 0.0))
        {
            bad("drift.maxMeanShift".into(), "must be > 0");
        }
        if !weight_ok(d.weight) {
            bad("drift.weight".into(), "must be >= 0");
        }
        if !prob(self.shadow.min_agreement) {
            bad("shadow.minAgreement".into(), "must be in (0, 1)");
        }
        if !weight_ok(self.shadow.weight) {
            bad("shadow.weight".into(), "must be >= 0");
        }
        if !(prob(self.srm.alpha) && self.srm.alpha <= 0.1) {
            bad("srm.alpha".into(), "must be in (0, 0.1]");
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError { problems })
        }
    }

    /// Statistical guardrails enabled (the family Holm corrects over), counting one per
    /// latency quantile, business metric and shadow field.
    pub fn statistical_count(&self) -> usize {
        usize::from(self.error_rate.enabled)
            + if self.latency.enabled {
                self.latency.quantiles.len()
            } else {
                0
            }
            + self.business.len()
    }
}

/// Durations as `30s`, `2m`, `500ms` or a number of seconds, read by [`crate::duration`] (as
/// the controller's rollout spec reads them, with the same bounds).
mod seconds {
    use super::*;

    pub fn serialize<S: serde::Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        // A value set in code may be anything: clamp instead of panicking.
        let d = std::time::Duration::try_from_secs_f64(v.max(0.0))
            .unwrap_or(crate::duration::MAX_DURATION);
        s.serialize_str(&crate::duration::format_duration(d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        crate::duration::deserialize(d).map(|d| d.as_secs_f64())
    }
}
