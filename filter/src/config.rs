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
use crate::check::{check_name, invalid, is_false, percent_to_buckets};
use crate::shadow::{self, ShadowConfig};

pub mod breaker;

pub(crate) use crate::check::whole;
pub use crate::check::ConfigError;
pub use crate::plan::{
    BeaconConfig, BeaconLimit, EchoConfig, Experiment, KeySource, MissingKey, OutcomesConfig,
    OverrideConfig, Plan, PredictionConfig, Revision, Secret, Unit, MAX_SECRET, MIN_SECRET,
};
pub use breaker::BreakerConfig;

use whole::whole;

/// The only wire-format version this filter understands.
pub const CONFIG_VERSION: u32 = 1;

/// Default request header that carries the chosen variant to Envoy's router.
pub const DEFAULT_VARIANT_HEADER: &str = "x-sluice-variant";

/// Longest `revision` accepted.
pub const MAX_REVISION: usize = 128;

/// Most experiments in one configuration: each sets a routing header on every request it
/// applies to, and Envoy refuses requests with more than 100 headers (431) by default.
pub const MAX_EXPERIMENTS: usize = 32;
/// Most variants of an experiment.
pub const MAX_VARIANTS: usize = 16;
/// Most outcome names of an experiment.
pub const MAX_OUTCOMES: usize = 32;
/// Most user key sources of an experiment.
pub const MAX_KEYS: usize = 8;
/// Longest salt, in bytes: it is hashed on every request.
pub const MAX_SALT: usize = 256;
/// Longest header, cookie or query parameter name.
pub const MAX_FIELD_NAME: usize = 128;
/// Longest path (`match.path_prefix`, `beacon.path`).
pub const MAX_PATH: usize = 1024;
/// Longest QA override token.
pub const MAX_OVERRIDE_TOKEN: usize = 256;
/// Most metrics one configuration may define. Envoy never deletes a stat once defined, so
/// every configuration's metrics stay until Envoy restarts.
pub const MAX_METRICS: usize = 4096;

/// Request headers the routing header must never replace: the request's framing, identity
/// and what Envoy or the filter itself rely on.
const RESERVED_REQUEST_HEADERS: [&str; 20] = [
    "host",
    "content-length",
    "content-type",
    "content-encoding",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
    "expect",
    "cookie",
    "authorization",
    "proxy-authorization",
    "x-request-id",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    crate::shadow::SHADOW_HEADER,
];

/// Response headers the filter must never overwrite with a variant name or token.
const RESERVED_RESPONSE_HEADERS: [&str; 24] = [
    "content-length",
    "content-type",
    "content-encoding",
    "content-range",
    "content-location",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
    "set-cookie",
    "location",
    "date",
    "server",
    "www-authenticate",
    "proxy-authenticate",
    "cache-control",
    "vary",
    "etag",
    "last-modified",
    "expires",
    "retry-after",
];

/// Root of the filter's JSON configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterConfig {
    /// Wire-format version; must equal [`CONFIG_VERSION`].
    #[serde(deserialize_with = "whole")]
    pub version: u32,
    /// Free-form label of this configuration (the controller writes its push version and
    /// attempt), logged when the filter takes it. Two pushes with different revisions are never
    /// byte-identical, so the proxy evaluates each one afresh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// Key material for the values the filter issues and must later trust again (exposure
    /// tokens of event beacons, the shadow copy's marker). Every proxy that must accept
    /// another's tokens needs the same secret. See [`crate::mac`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
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
    /// Data-plane circuit breaker for the treatments (see `breaker`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub breaker: Option<BreakerConfig>,
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
    Switchback {
        #[serde(deserialize_with = "whole")]
        slot_seconds: u64,
    },
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

/// Restricts an experiment to some requests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatchConfig {
    /// Only requests whose path starts with this prefix take part.
    pub path_prefix: String,
}

/// Longest accepted `beacon.max_age_seconds`: 30 days.
pub const MAX_TOKEN_AGE: u64 = 30 * 86_400;
/// Most events per user per window.
pub const MAX_EVENTS_PER_USER: u32 = 10_000;
/// Longest per-user window: one day.
pub const MAX_LIMIT_WINDOW: u64 = 86_400;
/// Most user keys tracked per worker and experiment (24 bytes each: 1.5 MiB).
pub const MAX_LIMIT_USERS: usize = 65_536;

/// A JSON error as the user needs it: a value of the wrong type by its field path in plain
/// words (`experiments[0].variants[1].weight: expected a number, found string "x"`); text that
/// is not JSON at all, where no field can be named, by its line and column.
fn json_error(path: &str, e: &serde_json::Error) -> ConfigError {
    let message = e.to_string();
    let position = format!(" at line {} column {}", e.line(), e.column());
    let message = plain_type_error(message.strip_suffix(&position).unwrap_or(&message));
    if e.is_data() && path != "." {
        invalid(path, message)
    } else {
        ConfigError::Json(format!(
            "{message} (line {}, column {})",
            e.line(),
            e.column()
        ))
    }
}

/// serde's "invalid type: string \"x\", expected f64" in words a user knows: "expected a
/// number, found string \"x\"". Other messages are returned as they are.
pub fn plain_type_error(message: &str) -> String {
    let rest = message
        .strip_prefix("invalid type: ")
        .or_else(|| message.strip_prefix("invalid value: "));
    let Some((found, expected)) = rest.and_then(|r| r.rsplit_once(", expected ")) else {
        return message.to_string();
    };
    let expected = match expected {
        "f64" | "f32" => "a number",
        "u8" | "u16" | "u32" | "u64" | "u128" | "usize" => "a whole number, at least 0",
        "i8" | "i16" | "i32" | "i64" | "i128" | "isize" => "a whole number",
        "a boolean" => "true or false",
        other => other,
    };
    format!("expected {expected}, found {found}")
}

impl Plan {
    /// Parses and validates a configuration.
    pub fn from_json(bytes: &[u8]) -> Result<Plan, ConfigError> {
        let mut de = serde_json::Deserializer::from_slice(bytes);
        let config: FilterConfig = serde_path_to_error::deserialize(&mut de)
            .map_err(|e| json_error(&e.path().to_string(), e.inner()))?;
        de.end().map_err(|e| json_error(".", &e))?;
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
        let secret = match &config.secret {
            Some(s) => Some(Secret::new("secret", s)?),
            None => None,
        };
        // Without the key, a filter cannot tell its copies from user requests, and a shadow
        // cluster that leads back into a Sluice filter multiplies traffic without end.
        if secret.is_none() {
            if let Some(i) = config.experiments.iter().position(|e| e.shadow.is_some()) {
                return Err(invalid(
                    format!("experiments[{i}].shadow"),
                    "needs the top-level `secret`: shadow copies carry a marker signed with it",
                ));
            }
        }
        if config.experiments.is_empty() {
            return Err(invalid(
                "experiments",
                "at least one experiment is required",
            ));
        }
        if config.experiments.len() > MAX_EXPERIMENTS {
            return Err(invalid(
                "experiments",
                format!(
                    "{} experiments, more than {MAX_EXPERIMENTS} (each sets a request header)",
                    config.experiments.len()
                ),
            ));
        }
        let mut experiments = Vec::with_capacity(config.experiments.len());
        for (i, e) in config.experiments.iter().enumerate() {
            let exp = check_experiment(e, &format!("experiments[{i}]"))?;
            if exp.beacon.is_some() && secret.is_none() {
                return Err(invalid(
                    format!("experiments[{i}].beacon"),
                    "needs the top-level `secret`: events count only with an exposure token the filter signs with it",
                ));
            }
            experiments.push(exp);
        }
        check_cross_experiment(&experiments)?;
        let plan = Plan {
            revision: config.revision.clone(),
            secret,
            experiments,
        };
        let metrics = crate::metrics::Catalog::for_plan(&plan).specs.len();
        if metrics > MAX_METRICS {
            return Err(invalid(
                "experiments",
                format!(
                    "would define {metrics} metrics, more than {MAX_METRICS} (Envoy keeps every stat until it restarts): use fewer experiments, variants, outcomes or shadow fields"
                ),
            ));
        }
        Ok(plan)
    }
}

/// Header names per RFC 9110 token rules, lower case (Envoy stores them lower-cased).
fn check_header_name(field: &str, name: &str) -> Result<String, ConfigError> {
    if name.is_empty() {
        return Err(invalid(field, "header name must not be empty"));
    }
    if name.len() > MAX_FIELD_NAME {
        return Err(invalid(
            field,
            format!("header name longer than {MAX_FIELD_NAME} characters"),
        ));
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

/// A cookie or query parameter name: non-empty, bounded, no control characters.
fn check_param_name(field: &str, name: &str) -> Result<(), ConfigError> {
    if name.is_empty() {
        return Err(invalid(field, "name must not be empty"));
    }
    if name.len() > MAX_FIELD_NAME || name.chars().any(char::is_control) {
        return Err(invalid(
            field,
            format!("must be at most {MAX_FIELD_NAME} printable characters"),
        ));
    }
    Ok(())
}

fn check_path(field: &str, p: &str) -> Result<(), ConfigError> {
    if !p.starts_with('/') || p.contains('?') || p.contains('#') {
        return Err(invalid(field, "must start with '/' and contain no query"));
    }
    if p.len() > MAX_PATH || p.chars().any(|c| c.is_control() || c == ' ' || c == ';') {
        return Err(invalid(
            field,
            format!(
                "must be at most {MAX_PATH} characters without spaces, ';' or control characters"
            ),
        ));
    }
    Ok(())
}

fn check_not_reserved(field: &str, header: &str, reserved: &[&str]) -> Result<(), ConfigError> {
    if reserved.contains(&header) || header.starts_with("x-envoy-") {
        return Err(invalid(
            field,
            format!("{header:?} is reserved: the filter must not overwrite it"),
        ));
    }
    Ok(())
}

fn check_experiment(e: &ExperimentConfig, path: &str) -> Result<Experiment, ConfigError> {
    check_name(&format!("{path}.name"), &e.name)?;
    let salt = e.salt.clone().unwrap_or_else(|| e.name.clone());
    if salt.is_empty() {
        return Err(invalid(format!("{path}.salt"), "must not be empty"));
    }
    if salt.len() > MAX_SALT {
        return Err(invalid(
            format!("{path}.salt"),
            format!(
                "{} bytes, longer than {MAX_SALT} (it is hashed on every request)",
                salt.len()
            ),
        ));
    }

    let unit = match &e.unit {
        UnitConfig::User { keys, missing } => {
            if keys.is_empty() {
                return Err(invalid(
                    format!("{path}.unit.keys"),
                    "a user unit needs at least one key source",
                ));
            }
            if keys.len() > MAX_KEYS {
                return Err(invalid(
                    format!("{path}.unit.keys"),
                    format!("more than {MAX_KEYS} key sources"),
                ));
            }
            let mut checked = Vec::with_capacity(keys.len());
            for (k, key) in keys.iter().enumerate() {
                let field = format!("{path}.unit.keys[{k}]");
                checked.push(match key {
                    KeySource::Header(h) => KeySource::Header(check_header_name(&field, h)?),
                    KeySource::Cookie(c) | KeySource::Query(c) => {
                        check_param_name(&field, c)?;
                        key.clone()
                    }
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
        Some(m) if m.path_prefix.len() > MAX_PATH => {
            return Err(invalid(
                format!("{path}.match.path_prefix"),
                format!("longer than {MAX_PATH} characters"),
            ));
        }
        Some(m) => Some(m.path_prefix.clone()),
        None => None,
    };

    let header = check_header_name(&format!("{path}.header"), &e.header)?;
    check_not_reserved(
        &format!("{path}.header"),
        &header,
        &RESERVED_REQUEST_HEADERS,
    )?;

    let qa_override = match &e.qa_override {
        Some(o) => {
            let field = format!("{path}.override");
            if o.token.len() < 16 {
                return Err(invalid(
                    format!("{field}.token"),
                    "must be at least 16 characters (it is the only thing keeping users out of variants they were not assigned)",
                ));
            }
            if o.token.len() > MAX_OVERRIDE_TOKEN || o.token.chars().any(char::is_control) {
                return Err(invalid(
                    format!("{field}.token"),
                    format!("must be at most {MAX_OVERRIDE_TOKEN} printable characters"),
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
                Some(h) => {
                    let h = check_header_name(&format!("{field}.header"), h)?;
                    check_not_reserved(&format!("{field}.header"), &h, &RESERVED_RESPONSE_HEADERS)?;
                    Some(h)
                }
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
            if o.names.len() > MAX_OUTCOMES {
                return Err(invalid(
                    format!("{field}.names"),
                    format!("more than {MAX_OUTCOMES} outcome names"),
                ));
            }
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

    let beacon = match &e.beacon {
        Some(b) => Some(check_beacon(b, &format!("{path}.beacon"))?),
        None => None,
    };
    if let Some(b) = &e.beacon {
        let field = format!("{path}.beacon");
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
        if let Unit::User { keys, .. } = &unit {
            if let Some(k) = keys.iter().position(
                |k| matches!(k, KeySource::Query(q) if *q == b.param || *q == b.token_param),
            ) {
                return Err(invalid(
                    format!("{path}.unit.keys[{k}]"),
                    "is also a query parameter of the beacon (`param` or `token_param`)",
                ));
            }
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

    let breaker = match &e.breaker {
        Some(b) => Some(breaker::check(b, &format!("{path}.breaker"))?),
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
        beacon,
        prediction: e.prediction.as_ref().map(|p| PredictionConfig {
            header: p.header.to_ascii_lowercase(),
            ..p.clone()
        }),
        shadow,
        breaker,
    })
}

fn check_beacon(b: &BeaconConfig, field: &str) -> Result<BeaconConfig, ConfigError> {
    check_path(&format!("{field}.path"), &b.path)?;
    check_param_name(&format!("{field}.param"), &b.param)?;
    check_param_name(&format!("{field}.token_param"), &b.token_param)?;
    if b.token_param == b.param {
        return Err(invalid(
            format!("{field}.token_param"),
            "must differ from `param`",
        ));
    }
    let token_header = check_header_name(&format!("{field}.token_header"), &b.token_header)?;
    check_not_reserved(
        &format!("{field}.token_header"),
        &token_header,
        &RESERVED_RESPONSE_HEADERS,
    )?;
    check_not_reserved(
        &format!("{field}.token_header"),
        &token_header,
        &RESERVED_REQUEST_HEADERS,
    )?;
    if let Some(c) = &b.token_cookie {
        check_name(&format!("{field}.token_cookie"), c)?;
    }
    if !(1..=MAX_TOKEN_AGE).contains(&b.max_age_seconds) {
        return Err(invalid(
            format!("{field}.max_age_seconds"),
            format!("must be 1 to {MAX_TOKEN_AGE} (30 days)"),
        ));
    }
    let l = &b.limit;
    if !(1..=MAX_EVENTS_PER_USER).contains(&l.events_per_user) {
        return Err(invalid(
            format!("{field}.limit.events_per_user"),
            format!("must be 1 to {MAX_EVENTS_PER_USER}"),
        ));
    }
    if !(1..=MAX_LIMIT_WINDOW).contains(&l.window_seconds) {
        return Err(invalid(
            format!("{field}.limit.window_seconds"),
            format!("must be 1 to {MAX_LIMIT_WINDOW}"),
        ));
    }
    if !(1..=MAX_LIMIT_USERS).contains(&l.users) {
        return Err(invalid(
            format!("{field}.limit.users"),
            format!("must be 1 to {MAX_LIMIT_USERS}"),
        ));
    }
    Ok(BeaconConfig {
        token_header,
        ..b.clone()
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
    if variants.len() > MAX_VARIANTS {
        return Err(invalid(field, format!("more than {MAX_VARIANTS} variants")));
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

/// Request headers an experiment reads (user keys, the override's two headers).
fn headers_read(e: &Experiment) -> Vec<&str> {
    let mut read = Vec::new();
    if let Unit::User { keys, .. } = &e.unit {
        for k in keys {
            if let KeySource::Header(h) = k {
                read.push(h.as_str());
            }
        }
    }
    if let Some(o) = &e.qa_override {
        read.push(o.header.as_str());
        read.push(o.token_header.as_str());
    }
    read
}

/// Response headers an experiment reads (outcomes, prediction) or writes besides the echo.
fn response_headers_used(e: &Experiment) -> Vec<&str> {
    let mut used = Vec::new();
    if let Some(h) = e.outcomes.as_ref().and_then(|o| o.header.as_deref()) {
        used.push(h);
    }
    if let Some(p) = &e.prediction {
        used.push(p.header.as_str());
    }
    if let Some(b) = &e.beacon {
        used.push(b.token_header.as_str());
    }
    used
}

/// Experiments that apply to the same request must not fight over headers, cookies, paths or
/// names; one experiment's routing header must not overwrite what any experiment reads.
fn check_cross_experiment(experiments: &[Experiment]) -> Result<(), ConfigError> {
    for (i, e) in experiments.iter().enumerate() {
        for (j, other) in experiments.iter().enumerate() {
            let which = if i == j {
                "this experiment".to_string()
            } else {
                format!("experiments[{j}]")
            };
            if headers_read(other).contains(&e.header.as_str()) {
                return Err(invalid(
                    format!("experiments[{i}].header"),
                    format!(
                        "routing header {:?} is a header {which} reads (user key or override): setting it would overwrite the client's value",
                        e.header
                    ),
                ));
            }
            let echo = e.echo.as_ref().and_then(|c| c.header.as_deref());
            if let Some(h) = echo.filter(|h| response_headers_used(other).contains(h)) {
                return Err(invalid(
                    format!("experiments[{i}].echo.header"),
                    format!("{h:?} is a response header {which} reads or sets (outcomes, prediction or exposure token)"),
                ));
            }
            if let (Some(b), Some(prefix)) = (&e.beacon, &other.path_prefix) {
                if b.path.starts_with(prefix.as_str()) {
                    return Err(invalid(
                        format!("experiments[{i}].beacon.path"),
                        format!(
                            "{:?} is inside {which}'s match.path_prefix {prefix:?}: the filter would answer that traffic as beacons",
                            b.path
                        ),
                    ));
                }
            }
            let token_cookie = e.beacon.as_ref().and_then(|b| b.token_cookie.as_deref());
            let other_cookie = other.echo.as_ref().and_then(|c| c.cookie.as_deref());
            if token_cookie.is_some() && token_cookie == other_cookie {
                return Err(invalid(
                    format!("experiments[{i}].beacon.token_cookie"),
                    format!("is also the echo cookie of {which}"),
                ));
            }
            if i != j {
                let other_token_cookie = other
                    .beacon
                    .as_ref()
                    .and_then(|b| b.token_cookie.as_deref());
                if j < i && token_cookie.is_some() && token_cookie == other_token_cookie {
                    return Err(invalid(
                        format!("experiments[{i}].beacon.token_cookie"),
                        format!("already set by {which}"),
                    ));
                }
            }
        }
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
pub(crate) mod tests;
