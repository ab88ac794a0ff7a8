//! The filter's configuration: the JSON wire format ([`FilterConfig`]) and the checked
//! [`Plan`] it becomes.
//!
//! The wire types are what users write and what the controller renders; they round-trip
//! through serde unchanged. [`Plan::from_json`] parses and validates once (in `on_configure`)
//! and every later step trusts the plan: weights are exact bucket counts, names are unique
//! and safe to embed in metric names, references resolve. Every error names the field path.
//! Field-by-field documentation lives in `filter/README.md`.

use serde::{Deserialize, Serialize};

use crate::assignment::{Layout, BUCKETS};
use crate::shadow::{self, Shadow, ShadowConfig};

/// The only wire-format version this filter understands.
pub const CONFIG_VERSION: u32 = 1;

/// Default request header that carries the chosen variant to Envoy's router.
pub const DEFAULT_VARIANT_HEADER: &str = "x-sluice-variant";

/// Longest experiment, variant or outcome name: they become parts of metric names.
const MAX_NAME_LEN: usize = 64;

/// Longest `revision` accepted.
pub const MAX_REVISION: usize = 128;

/// Root of the filter's JSON configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterConfig {
    /// Wire-format version; must equal [`CONFIG_VERSION`].
    pub version: u32,
    /// Free-form label of this configuration (the controller writes its push version and
    /// attempt), logged when the filter takes it. Two pushes with different revisions are never
    /// byte-identical, so the proxy evaluates each one afresh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// Experiments applied to each request, independently of one another.
    pub experiments: Vec<ExperimentConfig>,
}

/// One experiment: who is assigned how, where the variant goes, what is counted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentConfig {
    pub name: String,
    /// Hash salt; defaults to `name`. Experiments with different salts assign independently.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub salt: Option<String>,
    pub unit: UnitConfig,
    pub variants: Vec<VariantConfig>,
    /// Which requests take part; default: all.
    #[serde(default, rename = "match", skip_serializing_if = "Option::is_none")]
    pub matcher: Option<MatchConfig>,
    /// Request header set to the variant name for Envoy's route match.
    #[serde(default = "default_variant_header")]
    pub header: String,
    #[serde(default, rename = "override", skip_serializing_if = "Option::is_none")]
    pub qa_override: Option<OverrideConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub echo: Option<EchoConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcomes: Option<OutcomesConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beacon: Option<BeaconConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prediction: Option<PredictionConfig>,
    /// Shadow traffic with response comparison (see `shadow`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<ShadowConfig>,
}

fn default_variant_header() -> String {
    DEFAULT_VARIANT_HEADER.to_string()
}

/// The unit of assignment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum UnitConfig {
    /// Sticky per user: the key is read from the first source that is present.
    User {
        keys: Vec<KeySource>,
        #[serde(default)]
        missing: MissingKey,
    },
    /// Independent random draw per request.
    Request,
    /// Everyone in the same variant for a fixed-length time slot.
    Switchback { slot_seconds: u64 },
}

/// Where a user key is read from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum KeySource {
    Header(String),
    Cookie(String),
    Query(String),
}

/// What happens to a request of a `user` experiment that carries no key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MissingKey {
    /// Serve the control variant (the safe default: keyless traffic never sees a canary).
    #[default]
    Control,
    /// Draw a variant at random per request with the configured weights.
    Random,
}

/// One variant of an experiment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VariantConfig {
    pub name: String,
    /// Share of traffic in percent, in steps of 0.01. The control's weight may be omitted:
    /// it is then whatever the treatments leave.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<f64>,
    /// Exactly one variant is the control; if none is marked, the first one is.
    #[serde(default, skip_serializing_if = "is_false")]
    pub control: bool,
    /// Treatments only: the largest weight this treatment may ever reach, which reserves its
    /// slice of the bucket space (see `assignment`). Default: 100 with one treatment, an
    /// even share of what explicit reservations leave with several.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_weight: Option<f64>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// Restricts an experiment to some requests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatchConfig {
    /// Only requests whose path starts with this prefix take part.
    pub path_prefix: String,
}

/// QA override: lets a tester pick a variant, only with the secret token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OverrideConfig {
    /// Request header naming the wanted variant.
    #[serde(default = "default_override_header")]
    pub header: String,
    /// Request header that must carry `token`.
    #[serde(default = "default_override_token_header")]
    pub token_header: String,
    pub token: String,
}

fn default_override_header() -> String {
    "x-sluice-override".to_string()
}

fn default_override_token_header() -> String {
    "x-sluice-override-token".to_string()
}

/// Exposure echo: tells the client which variant served it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EchoConfig {
    /// Response header set to the variant name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    /// Cookie set to the variant name (`Path=/; SameSite=Lax`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie: Option<String>,
    /// Cookie lifetime; absent means a session cookie.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie_max_age_seconds: Option<u64>,
}

/// Business outcomes counted per variant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutcomesConfig {
    /// Response header whose value names the outcome(s), comma-separated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    /// The outcome names counted; anything else is counted as unknown.
    pub names: Vec<String>,
}

/// Event beacon answered by the filter itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BeaconConfig {
    /// Exact request path (query excluded) of the beacon, e.g. `/sluice/event`.
    pub path: String,
    /// Query parameter holding the event (outcome) name.
    #[serde(default = "default_beacon_param")]
    pub param: String,
}

fn default_beacon_param() -> String {
    "name".to_string()
}

/// A numeric prediction read from a response header and recorded as a histogram.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PredictionConfig {
    pub header: String,
    /// Envoy histograms hold integers: the recorded value is `(value + offset) * scale`.
    #[serde(default = "default_prediction_scale")]
    pub scale: f64,
    #[serde(default)]
    pub offset: f64,
}

fn default_prediction_scale() -> f64 {
    1000.0
}

/// Why a configuration was rejected. `field` is a path such as `experiments[0].variants[1].weight`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid JSON: {0}")]
    Json(String),
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// The checked configuration the data plane runs on.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub revision: Option<String>,
    pub experiments: Vec<Experiment>,
}

/// A checked experiment.
#[derive(Debug, Clone, PartialEq)]
pub struct Experiment {
    pub name: String,
    pub salt: String,
    pub unit: Unit,
    /// Variant names; `control` indexes into it.
    pub variants: Vec<String>,
    pub control: usize,
    pub layout: Layout,
    pub path_prefix: Option<String>,
    /// Lower-cased routing header.
    pub header: String,
    pub qa_override: Option<OverrideConfig>,
    pub echo: Option<EchoConfig>,
    pub outcomes: Option<OutcomesConfig>,
    pub beacon: Option<BeaconConfig>,
    pub prediction: Option<PredictionConfig>,
    pub shadow: Option<Shadow>,
}

/// A checked unit of assignment.
#[derive(Debug, Clone, PartialEq)]
pub enum Unit {
    User {
        keys: Vec<KeySource>,
        missing: MissingKey,
    },
    Request,
    Switchback {
        slot_seconds: u64,
    },
}

impl Experiment {
    /// Index of the variant called `name`.
    pub fn variant_index(&self, name: &str) -> Option<usize> {
        self.variants.iter().position(|v| v == name)
    }
}

impl Plan {
    /// Parses and validates a configuration.
    pub fn from_json(bytes: &[u8]) -> Result<Plan, ConfigError> {
        let config: FilterConfig =
            serde_json::from_slice(bytes).map_err(|e| ConfigError::Json(e.to_string()))?;
        Plan::from_config(&config)
    }

    /// Validates an already-parsed configuration.
    pub fn from_config(config: &FilterConfig) -> Result<Plan, ConfigError> {
        if config.version != CONFIG_VERSION {
            return Err(invalid(
                "version",
                format!(
                    "unsupported version {}, expected {CONFIG_VERSION}",
                    config.version
                ),
            ));
        }
        if let Some(r) = &config.revision {
            if r.is_empty() || r.len() > MAX_REVISION || r.chars().any(|c| c.is_control()) {
                return Err(invalid(
                    "revision",
                    format!("must be 1 to {MAX_REVISION} printable characters"),
                ));
            }
        }
        if config.experiments.is_empty() {
            return Err(invalid(
                "experiments",
                "at least one experiment is required",
            ));
        }
        let mut experiments = Vec::with_capacity(config.experiments.len());
        for (i, e) in config.experiments.iter().enumerate() {
            experiments.push(check_experiment(e, &format!("experiments[{i}]"))?);
        }
        check_cross_experiment(&experiments)?;
        Ok(Plan {
            revision: config.revision.clone(),
            experiments,
        })
    }
}

/// Names end up inside Envoy stat names, where `.` and `;` delimit tags.
pub(crate) fn check_name(field: &str, name: &str) -> Result<(), ConfigError> {
    if name.is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(invalid(
            field,
            format!("longer than {MAX_NAME_LEN} characters"),
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
    {
        return Err(invalid(
            field,
            format!("{name:?} contains {c:?}; only ASCII letters, digits, '_' and '-' are allowed"),
        ));
    }
    Ok(())
}

/// Header names per RFC 9110 token rules, lower case (Envoy stores them lower-cased).
fn check_header_name(field: &str, name: &str) -> Result<String, ConfigError> {
    if name.is_empty() {
        return Err(invalid(field, "header name must not be empty"));
    }
    let valid = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c));
    if !valid {
        return Err(invalid(
            field,
            format!("{name:?} is not a valid header name"),
        ));
    }
    Ok(name.to_ascii_lowercase())
}

/// Converts a percentage to buckets, requiring a multiple of 0.01 %.
pub(crate) fn percent_to_buckets(field: &str, percent: f64) -> Result<u32, ConfigError> {
    if !percent.is_finite() || !(0.0..=100.0).contains(&percent) {
        return Err(invalid(
            field,
            format!("{percent} is not a percentage between 0 and 100"),
        ));
    }
    let scaled = percent * f64::from(BUCKETS) / 100.0;
    let rounded = scaled.round();
    if (scaled - rounded).abs() > 1e-6 {
        return Err(invalid(
            field,
            format!("{percent} is finer than the 0.01 % resolution"),
        ));
    }
    // In range by the check above, so the cast is exact.
    Ok(rounded as u32)
}

fn check_experiment(e: &ExperimentConfig, path: &str) -> Result<Experiment, ConfigError> {
    check_name(&format!("{path}.name"), &e.name)?;
    let salt = e.salt.clone().unwrap_or_else(|| e.name.clone());
    if salt.is_empty() {
        return Err(invalid(format!("{path}.salt"), "must not be empty"));
    }

    let unit = match &e.unit {
        UnitConfig::User { keys, missing } => {
            if keys.is_empty() {
                return Err(invalid(
                    format!("{path}.unit.keys"),
                    "a user unit needs at least one key source",
                ));
            }
            let mut checked = Vec::with_capacity(keys.len());
            for (k, key) in keys.iter().enumerate() {
                let field = format!("{path}.unit.keys[{k}]");
                checked.push(match key {
                    KeySource::Header(h) => KeySource::Header(check_header_name(&field, h)?),
                    KeySource::Cookie(c) | KeySource::Query(c) if c.is_empty() => {
                        return Err(invalid(field, "name must not be empty"));
                    }
                    other => other.clone(),
                });
            }
            Unit::User {
                keys: checked,
                missing: *missing,
            }
        }
        UnitConfig::Request => Unit::Request,
        UnitConfig::Switchback { slot_seconds } => {
            if *slot_seconds == 0 {
                return Err(invalid(
                    format!("{path}.unit.slot_seconds"),
                    "must be at least 1",
                ));
            }
            Unit::Switchback {
                slot_seconds: *slot_seconds,
            }
        }
    };

    let (variants, control, layout) = check_variants(&e.variants, path)?;

    let path_prefix = match &e.matcher {
        Some(m) if !m.path_prefix.starts_with('/') => {
            return Err(invalid(
                format!("{path}.match.path_prefix"),
                "must start with '/'",
            ));
        }
        Some(m) => Some(m.path_prefix.clone()),
        None => None,
    };

    let header = check_header_name(&format!("{path}.header"), &e.header)?;

    let qa_override = match &e.qa_override {
        Some(o) => {
            let field = format!("{path}.override");
            if o.token.len() < 16 {
                return Err(invalid(
                    format!("{field}.token"),
                    "must be at least 16 characters (it is the only thing keeping users out of variants they were not assigned)",
                ));
            }
            Some(OverrideConfig {
                header: check_header_name(&format!("{field}.header"), &o.header)?,
                token_header: check_header_name(&format!("{field}.token_header"), &o.token_header)?,
                token: o.token.clone(),
            })
        }
        None => None,
    };

    let echo = match &e.echo {
        Some(echo) => {
            let field = format!("{path}.echo");
            if echo.header.is_none() && echo.cookie.is_none() {
                return Err(invalid(field, "set `header`, `cookie` or both"));
            }
            let header = match &echo.header {
                Some(h) => Some(check_header_name(&format!("{field}.header"), h)?),
                None => None,
            };
            if let Some(c) = &echo.cookie {
                check_name(&format!("{field}.cookie"), c)?;
            }
            Some(EchoConfig {
                header,
                ..echo.clone()
            })
        }
        None => None,
    };

    let outcomes = match &e.outcomes {
        Some(o) => {
            let field = format!("{path}.outcomes");
            let header = match &o.header {
                Some(h) => Some(check_header_name(&format!("{field}.header"), h)?),
                None => None,
            };
            // A set, not a scan of the earlier names, so a long list is not quadratic; ordered,
            // not hashed: std's hasher would ask the host for randomness.
            let mut seen = std::collections::BTreeSet::new();
            for (n, name) in o.names.iter().enumerate() {
                check_name(&format!("{field}.names[{n}]"), name)?;
                if !seen.insert(name) {
                    return Err(invalid(
                        format!("{field}.names[{n}]"),
                        format!("duplicate outcome {name:?}"),
                    ));
                }
            }
            if o.names.is_empty() {
                return Err(invalid(
                    format!("{field}.names"),
                    "at least one outcome name is required",
                ));
            }
            Some(OutcomesConfig {
                header,
                names: o.names.clone(),
            })
        }
        None => None,
    };

    if let Some(b) = &e.beacon {
        let field = format!("{path}.beacon");
        if !b.path.starts_with('/') || b.path.contains('?') {
            return Err(invalid(
                format!("{field}.path"),
                "must start with '/' and contain no query",
            ));
        }
        if b.param.is_empty() {
            return Err(invalid(format!("{field}.param"), "must not be empty"));
        }
        if outcomes.is_none() {
            return Err(invalid(
                field,
                "needs `outcomes.names`: beacon events are counted as outcomes",
            ));
        }
        if !matches!(unit, Unit::User { .. }) {
            return Err(invalid(
                field,
                "needs unit type `user`: events are attributed by re-hashing the user key",
            ));
        }
    }

    if let Some(p) = &e.prediction {
        let field = format!("{path}.prediction");
        check_header_name(&format!("{field}.header"), &p.header)?;
        if !p.scale.is_finite() || p.scale <= 0.0 {
            return Err(invalid(
                format!("{field}.scale"),
                "must be a positive number",
            ));
        }
        if !p.offset.is_finite() {
            return Err(invalid(
                format!("{field}.offset"),
                "must be a finite number",
            ));
        }
    }

    let shadow = match &e.shadow {
        Some(c) => Some(shadow::check(
            c,
            &format!("{path}.shadow"),
            &variants,
            &salt,
            matches!(unit, Unit::User { .. }),
        )?),
        None => None,
    };

    Ok(Experiment {
        name: e.name.clone(),
        salt,
        unit,
        variants,
        control,
        layout,
        path_prefix,
        header,
        qa_override,
        echo,
        outcomes,
        beacon: e.beacon.clone(),
        prediction: e.prediction.as_ref().map(|p| PredictionConfig {
            header: p.header.to_ascii_lowercase(),
            ..p.clone()
        }),
        shadow,
    })
}

/// Checks names, weights and reservations, and lays treatments out in bucket space.
fn check_variants(
    variants: &[VariantConfig],
    path: &str,
) -> Result<(Vec<String>, usize, Layout), ConfigError> {
    let field = format!("{path}.variants");
    if variants.len() < 2 {
        return Err(invalid(
            field,
            "at least two variants (a control and a treatment) are required",
        ));
    }
    let mut names = Vec::with_capacity(variants.len());
    let mut seen = std::collections::BTreeSet::new();
    for (i, v) in variants.iter().enumerate() {
        check_name(&format!("{field}[{i}].name"), &v.name)?;
        if !seen.insert(v.name.as_str()) {
            return Err(invalid(
                format!("{field}[{i}].name"),
                format!("duplicate variant {:?}", v.name),
            ));
        }
        names.push(v.name.clone());
    }
    let marked: Vec<usize> = (0..variants.len())
        .filter(|&i| variants[i].control)
        .collect();
    let control = match marked.as_slice() {
        [] => 0,
        [one] => *one,
        [_, second, ..] => {
            return Err(invalid(
                format!("{field}[{second}].control"),
                "only one variant may be the control",
            ));
        }
    };
    if variants[control].max_weight.is_some() {
        return Err(invalid(
            format!("{field}[{control}].max_weight"),
            "applies to treatments only; the control takes what they leave",
        ));
    }

    // Treatment weights and explicit reservations, in buckets.
    let mut weights = Vec::new();
    let mut reserved = Vec::new();
    for (i, v) in variants.iter().enumerate() {
        if i == control {
            continue;
        }
        let w = match v.weight {
            Some(w) => percent_to_buckets(&format!("{field}[{i}].weight"), w)?,
            None => {
                return Err(invalid(
                    format!("{field}[{i}].weight"),
                    "is required for treatments",
                ));
            }
        };
        let m = match v.max_weight {
            Some(m) => Some(percent_to_buckets(&format!("{field}[{i}].max_weight"), m)?),
            None => None,
        };
        weights.push((i, w));
        reserved.push((i, m));
    }

    // Summed wide: enough treatments reserving 100 % each would overflow a u32.
    let explicit: u64 = reserved.iter().filter_map(|(_, m)| *m).map(u64::from).sum();
    if explicit > u64::from(BUCKETS) {
        return Err(invalid(
            field,
            "the treatments' max_weight values add up to more than 100",
        ));
    }
    // At most BUCKETS by the check above, so the cast is exact.
    let explicit = explicit as u32;
    let implicit_count = reserved.iter().filter(|(_, m)| m.is_none()).count() as u32;
    let share = (BUCKETS - explicit)
        .checked_div(implicit_count)
        .unwrap_or(0);
    let caps: Vec<u32> = reserved.iter().map(|(_, m)| m.unwrap_or(share)).collect();

    for ((i, w), cap) in weights.iter().zip(&caps) {
        if w > cap {
            return Err(invalid(
                format!("{field}[{i}].weight"),
                format!(
                    "{} exceeds this treatment's max_weight {} (its reserved share of users; set max_weight to allow more)",
                    f64::from(*w) * 100.0 / f64::from(BUCKETS),
                    f64::from(*cap) * 100.0 / f64::from(BUCKETS)
                ),
            ));
        }
    }
    let treatment_total: u32 = weights.iter().map(|(_, w)| w).sum();
    if treatment_total > BUCKETS {
        return Err(invalid(field, "treatment weights add up to more than 100"));
    }
    if let Some(cw) = variants[control].weight {
        let cw = percent_to_buckets(&format!("{field}[{control}].weight"), cw)?;
        if cw + treatment_total != BUCKETS {
            return Err(invalid(
                field,
                format!(
                    "weights add up to {}, not 100 (omit the control's weight to let it take the rest)",
                    f64::from(cw + treatment_total) * 100.0 / f64::from(BUCKETS)
                ),
            ));
        }
    }

    let slots: Vec<(usize, u32, u32)> = weights
        .iter()
        .zip(&caps)
        .map(|((i, w), cap)| (*i, *cap, *w))
        .collect();
    Ok((names, control, Layout::new(control, &slots)))
}

/// Experiments that apply to the same request must not fight over headers or names.
fn check_cross_experiment(experiments: &[Experiment]) -> Result<(), ConfigError> {
    for (i, e) in experiments.iter().enumerate() {
        for (j, other) in experiments[..i].iter().enumerate() {
            if e.name == other.name {
                return Err(invalid(
                    format!("experiments[{i}].name"),
                    format!("duplicate experiment name (also experiments[{j}])"),
                ));
            }
            if e.header == other.header {
                return Err(invalid(
                    format!("experiments[{i}].header"),
                    format!(
                        "routing header {:?} is already set by experiments[{j}]",
                        e.header
                    ),
                ));
            }
            let echo_header = |x: &Experiment| x.echo.as_ref().and_then(|c| c.header.clone());
            if echo_header(e).is_some() && echo_header(e) == echo_header(other) {
                return Err(invalid(
                    format!("experiments[{i}].echo.header"),
                    format!("already echoed by experiments[{j}]"),
                ));
            }
            let cookie = |x: &Experiment| x.echo.as_ref().and_then(|c| c.cookie.clone());
            if cookie(e).is_some() && cookie(e) == cookie(other) {
                return Err(invalid(
                    format!("experiments[{i}].echo.cookie"),
                    format!("already set by experiments[{j}]"),
                ));
            }
        }
    }
    Ok(())
}

impl FilterConfig {
    /// Returns a copy with the given treatment weights (percent) and the control taking the
    /// rest. The controller uses this to render the config it pushes; the result is validated
    /// exactly as the filter will validate it.
    pub fn with_weights(
        &self,
        experiment: &str,
        weights: &[(String, f64)],
    ) -> Result<FilterConfig, ConfigError> {
        let mut out = self.clone();
        let (i, exp) = out
            .experiments
            .iter_mut()
            .enumerate()
            .find(|(_, e)| e.name == experiment)
            .ok_or_else(|| invalid("experiments", format!("no experiment named {experiment:?}")))?;
        let control = exp.variants.iter().position(|v| v.control).unwrap_or(0);
        for (name, w) in weights {
            let pos = exp
                .variants
                .iter()
                .position(|v| &v.name == name)
                .ok_or_else(|| {
                    invalid(
                        format!("experiments[{i}].variants"),
                        format!("no variant named {name:?}"),
                    )
                })?;
            if pos == control {
                return Err(invalid(
                    format!("experiments[{i}].variants[{pos}].weight"),
                    "the control's weight is what the treatments leave; set treatment weights",
                ));
            }
            exp.variants[pos].weight = Some(*w);
        }
        exp.variants[control].weight = None;
        Plan::from_config(&out)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests;
