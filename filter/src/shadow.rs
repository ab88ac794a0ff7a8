//! Shadow traffic, pure: its configuration, which requests are copied, how the copy's headers
//! are built, and how the shadow's answer is compared with the primary's.
//!
//! The host shim queues sampled copies and sends them from the root context (so a shadow
//! call outlives the primary stream and the primary never waits on it); the primary's status
//! and body are captured as they stream past, and [`compare`] runs once both answers are in.
//!
//! Every copy carries a [`marker`] in [`SHADOW_HEADER`]: a MAC, keyed by the configuration's
//! `secret`, over the copy's send time, a random nonce, its method and its path. A Sluice
//! filter that receives a request with a marker it can [`verify`](check_marker) (same secret,
//! time within [`MARKER_WINDOW_MS`] of its own clock) knows it is a copy: it forwards it, but
//! neither counts it as a user request nor copies it again, so a shadow cluster that leads
//! back into a Sluice filter cannot multiply traffic. Any other value of the header — a
//! client's `1`, a forgery, an expired or replayed-elsewhere marker — is removed before the
//! request goes anywhere.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::assignment::BUCKETS;
use crate::check::ConfigError;
use crate::header_map::Pairs;
use crate::mac::{self, Key};

pub mod table;

/// Header added to every shadow request (with a [`marker`]) so the shadow service can skip
/// side effects and a Sluice filter in front of it can tell a copy from a user request.
pub const SHADOW_HEADER: &str = "x-sluice-shadow";

/// How far a marker's time may be from the receiving proxy's clock, either way: copies are
/// sent within milliseconds of their request, so this only has to cover clock skew between
/// proxies and a queue in front of the shadow.
pub const MARKER_WINDOW_MS: u64 = 10_000;

/// Version of the marker's layout, its first field.
const MARKER_VERSION: &str = "v1";

/// Methods shadowed unless configured otherwise: the safe ones. A mirrored write would repeat
/// its side effect, and even idempotent writes (PUT, DELETE) repeat it once more.
const DEFAULT_METHODS: [&str; 3] = ["GET", "HEAD", "OPTIONS"];

/// Longest value shown in a disagreement log line.
pub const LOG_VALUE_CHARS: usize = 64;

/// Shadow traffic for one experiment (wire format).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShadowConfig {
    /// Envoy cluster the copies go to.
    pub cluster: String,
    /// `:authority` of the copies; default: the original request's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
    /// Percent of eligible requests copied, in steps of 0.01.
    pub sample_percent: f64,
    /// `request`: an independent draw per request; `user`: by the user's hash, so a user's
    /// requests are all shadowed or none (needs a `user` unit).
    #[serde(default)]
    pub sample_by: SampleBy,
    /// Variants whose traffic is shadowed; default: all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variants: Option<Vec<String>>,
    /// Shadow call timeout.
    #[serde(
        default = "default_timeout_ms",
        deserialize_with = "crate::check::whole::whole"
    )]
    pub timeout_ms: u64,
    /// Most request or response body bytes buffered; a request body over it is not shadowed,
    /// a primary response body over it is compared by status only.
    #[serde(
        default = "default_max_body_bytes",
        deserialize_with = "crate::check::whole::whole"
    )]
    pub max_body_bytes: usize,
    /// Most shadow calls outstanding per Envoy worker; beyond it copies are skipped, never queued.
    #[serde(
        default = "default_max_in_flight",
        deserialize_with = "crate::check::whole::whole"
    )]
    pub max_in_flight: u32,
    /// Most bytes of copies (headers, request bodies, both answers' bodies) the filter holds
    /// per Envoy worker; a copy that would go over it is skipped.
    #[serde(
        default = "default_max_bytes_in_flight",
        deserialize_with = "crate::check::whole::whole"
    )]
    pub max_bytes_in_flight: usize,
    /// Methods that are shadowed (upper case); default: GET, HEAD, OPTIONS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub methods: Option<Vec<String>>,
    /// What is compared besides the status.
    #[serde(default)]
    pub compare: CompareConfig,
    /// Most disagreement log lines per minute per worker; 0 disables the log.
    #[serde(
        default = "default_log_per_minute",
        deserialize_with = "crate::check::whole::whole"
    )]
    pub log_per_minute: u32,
}

fn default_timeout_ms() -> u64 {
    1000
}

fn default_max_body_bytes() -> usize {
    64 * 1024
}

fn default_max_in_flight() -> u32 {
    64
}

fn default_max_bytes_in_flight() -> usize {
    8 * 1024 * 1024
}

/// Largest `max_bytes_in_flight` accepted.
pub const MAX_BYTES_IN_FLIGHT: usize = 1024 * 1024 * 1024;

fn default_log_per_minute() -> u32 {
    10
}

/// How shadowed requests are sampled.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SampleBy {
    #[default]
    Request,
    User,
}

/// What of the two answers is compared (the status always is).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompareConfig {
    /// Compare whole bodies by hash.
    #[serde(default = "default_true")]
    pub body: bool,
    /// JSON fields compared one by one.
    #[serde(default)]
    pub fields: Vec<FieldConfig>,
}

impl Default for CompareConfig {
    fn default() -> Self {
        CompareConfig {
            body: true,
            fields: Vec::new(),
        }
    }
}

fn default_true() -> bool {
    true
}

/// One JSON field compared between the answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldConfig {
    /// Metric label for the field (`[A-Za-z0-9_-]`).
    pub name: String,
    /// RFC 6901 JSON pointer, e.g. `/predictions/0/score`.
    pub pointer: String,
    /// `number`: compared with tolerances, deltas recorded; `string`: exact equality of the
    /// JSON values (any type).
    #[serde(default, rename = "type")]
    pub kind: FieldKind,
    /// Numbers agree when `|shadow - primary| <= abs_tolerance` ...
    #[serde(default)]
    pub abs_tolerance: f64,
    /// ... or `|shadow - primary| <= rel_tolerance * |primary|`.
    #[serde(default)]
    pub rel_tolerance: f64,
    /// Deltas are recorded as `round(|delta| * scale)` in histograms split by sign.
    #[serde(default = "default_delta_scale")]
    pub scale: f64,
}

fn default_delta_scale() -> f64 {
    1000.0
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FieldKind {
    #[default]
    Number,
    String,
}

/// A checked shadow configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Shadow {
    pub cluster: String,
    pub authority: Option<String>,
    /// Sample threshold in buckets (`0..=BUCKETS`).
    pub sample: u32,
    pub sample_by: SampleBy,
    /// Per variant index: whether its traffic is shadowed.
    pub variants: Vec<bool>,
    pub timeout_ms: u64,
    pub max_body_bytes: usize,
    pub max_in_flight: u32,
    pub max_bytes_in_flight: usize,
    pub methods: Vec<String>,
    pub compare_body: bool,
    pub fields: Vec<FieldConfig>,
    pub log_per_minute: u32,
    /// Salt for per-user sampling, distinct from the assignment salt so that being shadowed
    /// is independent of the variant.
    pub salt: String,
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Validates a shadow section. `path` is the field path of the section, `variants` the
/// experiment's variant names, `user_unit` whether the experiment hashes users.
pub fn check(
    c: &ShadowConfig,
    path: &str,
    variants: &[String],
    salt: &str,
    user_unit: bool,
) -> Result<Shadow, ConfigError> {
    if c.cluster.is_empty() {
        return Err(invalid(format!("{path}.cluster"), "must not be empty"));
    }
    let sample =
        crate::check::percent_to_buckets(&format!("{path}.sample_percent"), c.sample_percent)?;
    if c.sample_by == SampleBy::User && !user_unit {
        return Err(invalid(
            format!("{path}.sample_by"),
            "`user` sampling needs unit type `user`",
        ));
    }
    let shadowed = match &c.variants {
        None => vec![true; variants.len()],
        Some(list) => {
            let mut v = vec![false; variants.len()];
            for (i, name) in list.iter().enumerate() {
                match variants.iter().position(|n| n == name) {
                    Some(k) => v[k] = true,
                    None => {
                        return Err(invalid(
                            format!("{path}.variants[{i}]"),
                            format!("no variant named {name:?}"),
                        ));
                    }
                }
            }
            v
        }
    };
    if c.timeout_ms == 0 || c.timeout_ms > 60_000 {
        return Err(invalid(
            format!("{path}.timeout_ms"),
            "must be between 1 and 60000",
        ));
    }
    if c.max_in_flight == 0 {
        return Err(invalid(
            format!("{path}.max_in_flight"),
            "must be at least 1",
        ));
    }
    if c.max_body_bytes > 16 * 1024 * 1024 {
        return Err(invalid(
            format!("{path}.max_body_bytes"),
            "must be at most 16 MiB (bodies are buffered in the proxy)",
        ));
    }
    if c.max_bytes_in_flight < c.max_body_bytes || c.max_bytes_in_flight > MAX_BYTES_IN_FLIGHT {
        return Err(invalid(
            format!("{path}.max_bytes_in_flight"),
            format!(
                "must be between max_body_bytes ({}) and {MAX_BYTES_IN_FLIGHT}",
                c.max_body_bytes
            ),
        ));
    }
    let methods = match &c.methods {
        None => DEFAULT_METHODS.iter().map(|m| m.to_string()).collect(),
        Some(list) => {
            for (i, m) in list.iter().enumerate() {
                if m.is_empty() || !m.chars().all(|c| c.is_ascii_uppercase()) {
                    return Err(invalid(
                        format!("{path}.methods[{i}]"),
                        format!("{m:?} is not an upper-case HTTP method"),
                    ));
                }
            }
            list.clone()
        }
    };
    for (i, f) in c.compare.fields.iter().enumerate() {
        let field = format!("{path}.compare.fields[{i}]");
        crate::check::check_name(&format!("{field}.name"), &f.name)?;
        if ["status", "body"].contains(&f.name.as_str()) {
            return Err(invalid(
                format!("{field}.name"),
                "`status` and `body` are reserved",
            ));
        }
        if c.compare.fields[..i].iter().any(|g| g.name == f.name) {
            return Err(invalid(format!("{field}.name"), "duplicate field name"));
        }
        if !(f.pointer.is_empty() || f.pointer.starts_with('/')) {
            return Err(invalid(
                format!("{field}.pointer"),
                format!(
                    "{:?} is not a JSON pointer: it must be empty or start with '/'",
                    f.pointer
                ),
            ));
        }
        if !pointer_escapes_valid(&f.pointer) {
            return Err(invalid(
                format!("{field}.pointer"),
                "'~' must be followed by '0' or '1'",
            ));
        }
        for (name, v) in [
            ("abs_tolerance", f.abs_tolerance),
            ("rel_tolerance", f.rel_tolerance),
        ] {
            if !v.is_finite() || v < 0.0 {
                return Err(invalid(format!("{field}.{name}"), "must be a number >= 0"));
            }
        }
        if !f.scale.is_finite() || f.scale <= 0.0 {
            return Err(invalid(
                format!("{field}.scale"),
                "must be a positive number",
            ));
        }
    }
    Ok(Shadow {
        cluster: c.cluster.clone(),
        authority: c.authority.clone(),
        sample,
        sample_by: c.sample_by,
        variants: shadowed,
        timeout_ms: c.timeout_ms,
        max_body_bytes: c.max_body_bytes,
        max_in_flight: c.max_in_flight,
        max_bytes_in_flight: c.max_bytes_in_flight,
        methods,
        compare_body: c.compare.body,
        fields: c.compare.fields.clone(),
        log_per_minute: c.log_per_minute,
        salt: format!("{salt}/shadow"),
    })
}

fn pointer_escapes_valid(p: &str) -> bool {
    let b = p.as_bytes();
    b.iter()
        .enumerate()
        .all(|(i, &c)| c != b'~' || matches!(b.get(i + 1), Some(b'0') | Some(b'1')))
}

impl Shadow {
    /// Whether the comparison needs the primary's response body.
    pub fn needs_body(&self) -> bool {
        self.compare_body || !self.fields.is_empty()
    }

    /// Whether a request with this method, in this variant, is eligible before sampling.
    pub fn eligible(&self, method: &[u8], variant: usize) -> bool {
        self.variants.get(variant).copied().unwrap_or(false)
            && self.methods.iter().any(|m| m.as_bytes() == method)
    }

    /// Whether every eligible request of `variant` is sampled (`sample_percent` 100), so that
    /// all of its request's headers will be read for the copy anyway: then the shim reads
    /// them once, before sampling, rather than `:method` alone first.
    pub fn copies_all(&self, variant: usize) -> bool {
        self.sample >= BUCKETS && self.variants.get(variant).copied().unwrap_or(false)
    }
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) and ones Envoy recomputes; never copied.
const DROPPED_HEADERS: [&str; 10] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
];

/// The headers of a shadow copy: the `original` ones (a serialised header map, see
/// [`crate::header_map`]) minus hop-by-hop headers (including any the `connection` header
/// names), minus `skip` (routing and override token headers), minus any [`SHADOW_HEADER`] a
/// client sent, with the authority replaced if configured, plus [`SHADOW_HEADER`] set to
/// `marker`. Names or values that are not UTF-8 are dropped: the host API takes text.
pub fn copy_headers(
    shadow: &Shadow,
    original: &[u8],
    skip: &[&str],
    marker: &str,
) -> Vec<(String, String)> {
    let named_by_connection: Vec<String> = Pairs::new(original)
        .filter(|(k, _)| *k == b"connection")
        .flat_map(|(_, v)| {
            String::from_utf8_lossy(v)
                .split(',')
                .map(|s| s.trim().to_ascii_lowercase())
                .collect::<Vec<_>>()
        })
        .collect();
    let mut out: Vec<(String, String)> = Pairs::new(original)
        .filter_map(|(k, v)| Some((std::str::from_utf8(k).ok()?, std::str::from_utf8(v).ok()?)))
        .filter(|(k, _)| {
            !DROPPED_HEADERS.contains(k)
                && !named_by_connection.iter().any(|n| n == k)
                && !skip.contains(k)
                && *k != SHADOW_HEADER
        })
        .map(|(k, v)| match (&shadow.authority, k) {
            (Some(a), ":authority") => (k.to_string(), a.clone()),
            _ => (k.to_string(), v.to_string()),
        })
        .collect();
    out.push((SHADOW_HEADER.to_string(), marker.to_string()));
    out
}

/// The marker of a copy sent at `now_ms` (Unix milliseconds) with `method` and `path`:
/// `v1.<ms>.<nonce, 16 hex>.<tag, 32 hex>`. The nonce makes two copies of identical requests
/// in the same millisecond carry different markers.
pub fn marker(key: &Key, now_ms: u64, nonce: u64, method: &[u8], path: &[u8]) -> String {
    let time = now_ms.to_string();
    let nonce = format!("{nonce:016x}");
    let tag = key.tag(&[time.as_bytes(), nonce.as_bytes(), method, path]);
    format!("{MARKER_VERSION}.{time}.{nonce}.{}", mac::to_hex(&tag))
}

/// Whether `value` is a marker this key made for a request with this method and path, at a
/// time within [`MARKER_WINDOW_MS`] of `now_ms`.
pub fn check_marker(key: &Key, value: &[u8], now_ms: u64, method: &[u8], path: &[u8]) -> bool {
    let mut parts = value.split(|&b| b == b'.');
    let (Some(version), Some(time), Some(nonce), Some(tag), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return false;
    };
    if version != MARKER_VERSION.as_bytes()
        || nonce.len() != 16
        || !nonce.iter().all(u8::is_ascii_hexdigit)
        || time.is_empty()
        || time.len() > 20
        || !time.iter().all(u8::is_ascii_digit)
    {
        return false;
    }
    let Some(sent) = std::str::from_utf8(time)
        .ok()
        .and_then(|t| t.parse::<u64>().ok())
    else {
        return false;
    };
    if sent.abs_diff(now_ms) > MARKER_WINDOW_MS {
        return false;
    }
    let Some(tag) = mac::from_hex(tag) else {
        return false;
    };
    key.verify(&[time, nonce, method, path], &tag)
}

/// One side's answer as far as the comparison needs it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
    /// The body exceeded the limit and was cut: it cannot be compared.
    pub truncated: bool,
}

impl Answer {
    /// Appends a body chunk, keeping at most `limit` bytes.
    pub fn push_body(&mut self, chunk: &[u8], limit: usize) {
        if self.room_for(chunk.len(), limit) {
            self.body.extend_from_slice(chunk);
        }
    }

    /// Whether `n` more body bytes fit under `limit`. If they do not, the answer becomes
    /// truncated and its body is dropped. Asked before a chunk is read from the host, so a
    /// chunk that cannot be used is never copied into the VM.
    pub fn room_for(&mut self, n: usize, limit: usize) -> bool {
        if self.truncated {
            return false;
        }
        if self.body.len().saturating_add(n) > limit {
            self.truncated = true;
            self.body = Vec::new();
            return false;
        }
        true
    }
}

/// Whether to read a shadow answer's body of `size` bytes: only if the comparison reads
/// bodies, there is one and the copy was not `given_up` already, and only if it fits
/// `max_body_bytes`; a body over it is not read, and marks `answer` truncated (compared by
/// status only).
pub fn wants_body(cfg: &Shadow, answer: &mut Answer, size: usize, given_up: bool) -> bool {
    cfg.needs_body() && size > 0 && !given_up && answer.room_for(size, cfg.max_body_bytes)
}

/// What capturing the primary's answer needs, for the copies of one request: the largest
/// body limit and bytes cap of their experiments, and whether any of them compares bodies.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrimaryNeeds {
    pub limit: usize,
    pub cap: usize,
    pub needs_body: bool,
}

impl PrimaryNeeds {
    pub fn of<'a>(configs: impl IntoIterator<Item = &'a Shadow>) -> PrimaryNeeds {
        configs
            .into_iter()
            .fold(PrimaryNeeds::default(), |n, cfg| PrimaryNeeds {
                limit: n.limit.max(cfg.max_body_bytes),
                cap: n.cap.max(cfg.max_bytes_in_flight),
                needs_body: n.needs_body || cfg.needs_body(),
            })
    }
}

/// Bytes held by copies against a cap (`max_bytes_in_flight`). The host keeps one per worker.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Budget {
    pub held: usize,
}

impl Budget {
    /// Takes `n` bytes if that keeps the total at or under `cap`.
    pub fn take(&mut self, n: usize, cap: usize) -> bool {
        match self.held.checked_add(n) {
            Some(total) if total <= cap => {
                self.held = total;
                true
            }
            _ => false,
        }
    }

    /// Returns `n` bytes taken earlier.
    pub fn give_back(&mut self, n: usize) {
        self.held = self.held.saturating_sub(n);
    }
}

/// A size estimate that follows a new maximum at once and otherwise decays by 1/16 per
/// observation, so one unusually large answer does not hold the budget down for long.
pub fn decayed_max(estimate: usize, observed: usize) -> usize {
    observed.max(estimate - estimate / 16)
}

/// What a shadow call came back with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// An answer (possibly Envoy's own, e.g. 503 for a refused connection): compared.
    Answer(Answer),
    /// No answer within `timeout_ms`.
    Timeout,
    /// No answer at all: reset, connection failure without a reply, an answer over Envoy's
    /// buffer limit, or the answer could not be read.
    Failed,
}

/// Classifies a shadow call's result from what the host reports. `status` is 0 when the
/// call came back without headers. Envoy answers a timed-out call with its own 504 (or with
/// no headers at all); the clock tells a timeout from a shadow that really answered 504. The
/// margin is wide because Envoy arms the timer from its event loop's cached time, which can
/// lag the clock read here by a few milliseconds under load.
pub fn classify(status: u16, elapsed_ms: u64, timeout_ms: u64) -> Option<Reply> {
    if (status == 0 || status == 504) && elapsed_ms.saturating_mul(10) >= timeout_ms * 9 {
        return Some(Reply::Timeout);
    }
    if status == 0 {
        return Some(Reply::Failed);
    }
    None
}

/// Why a copy was taken but not compared: the `reason` label of
/// `sluice_shadow_skipped_total`, a bounded set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// The experiment already had `max_in_flight` copies outstanding.
    InFlight,
    /// The request body was over `max_body_bytes`.
    BodyLimit,
    /// The copy could not be made or sent (a host call failed, no such cluster).
    DispatchFailed,
    /// The primary ended without a complete answer to compare with.
    NoPrimary,
    /// Holding this copy's bodies would take the worker over `max_bytes_in_flight`.
    BytesInFlight,
}

/// The labels of [`Skip`], in the order of [`Skip::index`].
pub const SKIP_REASONS: [&str; 5] = [
    "in_flight",
    "body_limit",
    "dispatch_failed",
    "no_primary",
    "bytes_in_flight",
];

impl Skip {
    /// Every reason, in the order of the metric positions.
    pub const ALL: [Skip; 5] = [
        Skip::InFlight,
        Skip::BodyLimit,
        Skip::DispatchFailed,
        Skip::NoPrimary,
        Skip::BytesInFlight,
    ];

    /// Position in [`Skip::ALL`] and [`SKIP_REASONS`].
    pub fn index(self) -> usize {
        self as usize
    }
}

/// How a copy ends. Every copy taken ends in exactly one fate, which is what makes
/// `requests = compared + skipped + timeouts + errors` hold in the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    Compared,
    Skipped(Skip),
    Timeout,
    Error,
}

/// The fate of a copy whose shadow reply is in and whose primary is done (`primary`: it
/// completed; otherwise it ended early). `dropped` is a reason the copy was given up
/// after it was sent (e.g. its bodies would exceed the bytes cap). A failed shadow call is
/// reported as such whatever else happened: it is what the shadow did.
pub fn fate(reply: &Reply, primary: bool, dropped: Option<Skip>) -> Fate {
    match (reply, dropped) {
        (Reply::Timeout, _) => Fate::Timeout,
        (Reply::Failed, _) => Fate::Error,
        (Reply::Answer(_), Some(reason)) => Fate::Skipped(reason),
        (Reply::Answer(_), None) if !primary => Fate::Skipped(Skip::NoPrimary),
        (Reply::Answer(_), None) => Fate::Compared,
    }
}

/// Result of one field's comparison.
#[derive(Debug, Clone, PartialEq)]
pub enum FieldResult {
    Agree {
        delta: Option<f64>,
    },
    Disagree {
        delta: Option<f64>,
        primary: String,
        shadow: String,
    },
    /// Not comparable: a body was not JSON or was truncated, or a side lacked the field.
    Missing,
}

/// The comparison of one shadowed request.
#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    pub status_agree: bool,
    /// `None` when body comparison is off or a body was truncated.
    pub body_agree: Option<bool>,
    /// Parallel to the configured fields.
    pub fields: Vec<FieldResult>,
}

fn body_hash(b: &[u8]) -> u64 {
    crate::assignment::hash("body", b)
}

/// Compares the shadow's answer with the primary's.
pub fn compare(shadow: &Shadow, primary: &Answer, copy: &Answer) -> Comparison {
    let body_agree = (shadow.compare_body && !primary.truncated && !copy.truncated)
        .then(|| body_hash(&primary.body) == body_hash(&copy.body));
    let parse = |a: &Answer| -> Option<Value> {
        if a.truncated || shadow.fields.is_empty() {
            return None;
        }
        serde_json::from_slice(&a.body).ok()
    };
    let (p, s) = (parse(primary), parse(copy));
    let fields = shadow
        .fields
        .iter()
        .map(|f| match (&p, &s) {
            (Some(p), Some(s)) => compare_field(f, p.pointer(&f.pointer), s.pointer(&f.pointer)),
            _ => FieldResult::Missing,
        })
        .collect();
    Comparison {
        status_agree: primary.status == copy.status,
        body_agree,
        fields,
    }
}

fn compare_field(f: &FieldConfig, p: Option<&Value>, s: Option<&Value>) -> FieldResult {
    let (Some(p), Some(s)) = (p, s) else {
        return FieldResult::Missing;
    };
    match f.kind {
        FieldKind::Number => {
            let (Some(a), Some(b)) = (p.as_f64(), s.as_f64()) else {
                return FieldResult::Missing;
            };
            let delta = b - a;
            let ok = delta.abs() <= f.abs_tolerance || delta.abs() <= f.rel_tolerance * a.abs();
            if ok {
                FieldResult::Agree { delta: Some(delta) }
            } else {
                FieldResult::Disagree {
                    delta: Some(delta),
                    primary: truncate(&p.to_string()),
                    shadow: truncate(&s.to_string()),
                }
            }
        }
        FieldKind::String => {
            if p == s {
                FieldResult::Agree { delta: None }
            } else {
                FieldResult::Disagree {
                    delta: None,
                    primary: truncate(&p.to_string()),
                    shadow: truncate(&s.to_string()),
                }
            }
        }
    }
}

/// Shortens a value for the log, on a character boundary.
pub fn truncate(s: &str) -> String {
    match s.char_indices().nth(LOG_VALUE_CHARS) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// A delta as recorded: `(is_negative, round(|delta| * scale))`.
pub fn scaled_delta(f: &FieldConfig, delta: f64) -> Option<(bool, u64)> {
    let v = (delta.abs() * f.scale).round();
    (v.is_finite() && v < u64::MAX as f64).then_some((delta < 0.0, v as u64))
}

/// One structured disagreement log line (JSON).
pub fn disagreement_line(
    experiment: &str,
    variant: &str,
    request_id: &str,
    field: &str,
    primary: &str,
    shadow: &str,
) -> String {
    serde_json::json!({
        "sluice": "shadow_disagreement",
        "experiment": experiment,
        "variant": variant,
        "request_id": truncate(request_id),
        "field": field,
        "primary": primary,
        "shadow": shadow,
    })
    .to_string()
}

/// A per-minute budget of log lines.
#[derive(Debug, Clone, Copy, Default)]
pub struct LogBudget {
    minute: u64,
    used: u32,
}

impl LogBudget {
    /// Takes one line from the budget of the minute containing `now_secs`.
    pub fn take(&mut self, now_secs: u64, per_minute: u32) -> bool {
        let minute = now_secs / 60;
        if minute != self.minute {
            self.minute = minute;
            self.used = 0;
        }
        if self.used < per_minute {
            self.used += 1;
            true
        } else {
            false
        }
    }
}

/// Whether a sample threshold takes a bucket.
pub fn sampled(sample: u32, bucket: u32) -> bool {
    sample >= BUCKETS || bucket < sample
}

/// Whether a request is copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sampling {
    /// Not eligible or not sampled: nothing is counted.
    NotSampled,
    /// Sampled but skipped at once (counted as taken, then skipped).
    Skipped(Skip),
    /// Taken: from here on the copy ends in exactly one [`Fate`].
    Taken,
}

/// The sampling decision for a request in `variant` sent with `method`: eligible, then in
/// the sample by its user's bucket (`user_bucket`, for `sample_by: user`; a request without a
/// user key is not sampled) or by a random bucket (`draw`, called only when needed), then
/// within the experiment's `max_in_flight` given the copies outstanding now.
pub fn sample(
    cfg: &Shadow,
    variant: usize,
    method: &[u8],
    user_bucket: Option<u32>,
    draw: impl FnOnce() -> u32,
    in_flight: u32,
) -> Sampling {
    if !cfg.eligible(method, variant) {
        return Sampling::NotSampled;
    }
    let bucket = match (cfg.sample_by, user_bucket) {
        (SampleBy::User, Some(b)) => b,
        (SampleBy::User, None) => return Sampling::NotSampled,
        (SampleBy::Request, _) => draw(),
    };
    if !sampled(cfg.sample, bucket) {
        return Sampling::NotSampled;
    }
    if in_flight >= cfg.max_in_flight {
        return Sampling::Skipped(Skip::InFlight);
    }
    Sampling::Taken
}

#[cfg(test)]
mod tests;
