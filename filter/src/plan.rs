//! The checked plan the data plane runs on ([`Plan`], [`Experiment`]) and the configuration
//! sections it keeps as they were written once checked (echo, outcomes, beacon, prediction,
//! QA override, key sources). [`crate::config`] parses and checks the wire format into these
//! types; the pure logic and the metrics catalog read them without depending on the parser.

use serde::{Deserialize, Serialize};

use crate::assignment::Layout;
use crate::check::whole::{optional_whole, whole};
use crate::check::{invalid, is_false, ConfigError};
use crate::shadow::Shadow;

/// Shortest `secret` accepted, in bytes: 128 bits if it is random bytes, as the MAC key is.
pub const MIN_SECRET: usize = 16;
/// Longest `secret` accepted, in bytes (a generated secret is 32 to 64 characters).
pub const MAX_SECRET: usize = 256;

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
    #[serde(
        default,
        deserialize_with = "optional_whole",
        skip_serializing_if = "Option::is_none"
    )]
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

/// Event beacon answered by the filter itself. An event counts only with the exposure token
/// the filter issued on the user's exposed response (see `beacon`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BeaconConfig {
    /// Exact request path (query excluded) of the beacon, e.g. `/sluice/event`.
    pub path: String,
    /// Query parameter holding the event (outcome) name.
    #[serde(default = "default_beacon_param")]
    pub param: String,
    /// Response header carrying the exposure token on exposed responses, and request header
    /// carrying it back on beacons.
    #[serde(default = "default_token_header")]
    pub token_header: String,
    /// Query parameter of the beacon that may carry the token instead (e.g. from
    /// `navigator.sendBeacon`, which cannot set headers).
    #[serde(default = "default_token_param")]
    pub token_param: String,
    /// Cookie also carrying the token (scoped to the beacon path, `HttpOnly`,
    /// `SameSite=Strict`); absent: no cookie.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_cookie: Option<String>,
    /// How long after the exposure an event still counts.
    #[serde(default = "default_token_max_age", deserialize_with = "whole")]
    pub max_age_seconds: u64,
    /// Also accept `GET` beacons (an `<img>` can send those cross-site; POST only by default).
    #[serde(default, skip_serializing_if = "is_false")]
    pub allow_get: bool,
    /// Per-user event limit, per Envoy worker.
    #[serde(default)]
    pub limit: BeaconLimit,
}

/// At most `events_per_user` events per user key per `window_seconds`, tracked for about
/// `users` user keys per worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BeaconLimit {
    #[serde(default = "default_limit_events", deserialize_with = "whole")]
    pub events_per_user: u32,
    #[serde(default = "default_limit_window", deserialize_with = "whole")]
    pub window_seconds: u64,
    #[serde(default = "default_limit_users", deserialize_with = "whole")]
    pub users: usize,
}

impl Default for BeaconLimit {
    fn default() -> Self {
        BeaconLimit {
            events_per_user: default_limit_events(),
            window_seconds: default_limit_window(),
            users: default_limit_users(),
        }
    }
}

fn default_beacon_param() -> String {
    "name".to_string()
}

fn default_token_header() -> String {
    "x-sluice-exposure".to_string()
}

fn default_token_param() -> String {
    "exposure".to_string()
}

fn default_token_max_age() -> u64 {
    86_400
}

fn default_limit_events() -> u32 {
    30
}

fn default_limit_window() -> u64 {
    3600
}

fn default_limit_users() -> usize {
    4096
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

/// A `revision` as the controller writes it: `<push version>@<write time, Unix ms>`. Every
/// sink writes this form, and the filter exports the version as the gauge
/// `sluice_config_revision`, so a push can be confirmed from the data plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Revision {
    /// The controller's push version (also ECDS `version_info`).
    pub version: u64,
    /// When the controller wrote this push, in Unix milliseconds: two pushes of one version
    /// (a retry) differ in it, so a proxy evaluates each afresh.
    pub written_ms: u64,
}

impl Revision {
    /// `None` unless `s` is two unsigned decimal numbers joined by `@` (no sign, no spaces);
    /// a free-form revision a user wrote has no version.
    pub fn parse(s: &str) -> Option<Revision> {
        let (version, written) = s.split_once('@')?;
        let number = |t: &str| {
            (!t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()))
                .then(|| t.parse::<u64>().ok())
                .flatten()
        };
        Some(Revision {
            version: number(version)?,
            written_ms: number(written)?,
        })
    }
}

impl std::fmt::Display for Revision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.version, self.written_ms)
    }
}

/// The checked configuration the data plane runs on.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub revision: Option<String>,
    /// The configured `secret`, checked.
    pub secret: Option<Secret>,
    pub experiments: Vec<Experiment>,
}

/// A checked secret. Its `Debug` output never shows it, so a logged plan does not leak it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    /// Checks a configured secret; `field` names it in the error.
    pub fn new(field: &str, secret: &str) -> Result<Secret, ConfigError> {
        if secret.len() < MIN_SECRET || secret.len() > MAX_SECRET {
            return Err(invalid(
                field,
                format!(
                    "must be {MIN_SECRET} to {MAX_SECRET} bytes, not {} (generate one with `openssl rand -hex 32`)",
                    secret.len()
                ),
            ));
        }
        if secret.chars().any(char::is_control) {
            return Err(invalid(
                field,
                "must not contain control characters (a trailing newline from a file?)",
            ));
        }
        Ok(Secret(secret.as_bytes().to_vec()))
    }

    /// The MAC key for one purpose (see [`crate::mac`]).
    pub fn key(&self, purpose: &str) -> crate::mac::Key {
        crate::mac::Key::derive(&self.0, purpose)
    }
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
    /// Checked `breaker` section: the treatments' trip rule.
    pub breaker: Option<crate::breaker::Params>,
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
    /// The push version this plan was rendered for: [`Revision::version`] of its `revision`,
    /// 0 without one (a bootstrap's default config) or with one not in the controller's form.
    pub fn push_version(&self) -> u64 {
        self.revision
            .as_deref()
            .and_then(Revision::parse)
            .map_or(0, |r| r.version)
    }

    /// The [`crate::breaker::Epoch`] of this plan: trips hold while it stays the same. The
    /// push version of a controller revision (a retry of the same version keeps trips);
    /// otherwise a digest of the free-form revision, so a hand-edited config with a new
    /// revision clears them too.
    pub fn breaker_epoch(&self) -> crate::breaker::Epoch {
        let version = self.push_version();
        let digest = match (&self.revision, version) {
            (Some(r), 0) => crate::assignment::hash("sluice-breaker-epoch", r.as_bytes()) | 1,
            _ => 0,
        };
        crate::breaker::Epoch { version, digest }
    }
}
