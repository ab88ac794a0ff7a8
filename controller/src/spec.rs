//! The rollout spec: a YAML document shaped like a Kubernetes resource (so it can become a
//! CRD), parsed and validated once; every error names its field path.
//!
//! ```yaml
//! apiVersion: sluice.dev/v1alpha1
//! kind: Rollout
//! metadata: {name: ranker-v2}
//! spec:
//!   experiment: {...}          # the filter's experiment config, verbatim (snake_case)
//!   treatment: canary
//!   schedule: {stages: [1, 5, 10, 25, 50, 100], bake: 10m, warmup: 1m, interval: 10s}
//!   shadow: {duration: 10m}
//!   guardrails: {...}          # the judge's config
//!   sources: [{envoyAdmin: {endpoints: [http://127.0.0.1:9901]}}]
//!   sinks: [{ecdsFile: {path: /etc/envoy/ecds/sluice.yaml, wasm: {filename: /etc/envoy/sluice_filter.wasm}, proxies: [http://127.0.0.1:9901]}}]
//!   # or: [{ecdsGrpc: {listen: "0.0.0.0:18000", resource: sluice, wasm: {...}, minProxies: 1, confirmWithin: 10s,
//!   #              tls: {certFile: ..., keyFile: ..., clientCaFile: ...}}}]
//!   notifications: [{webhook: {url: http://127.0.0.1:8080/hook, format: json}}]
//! ```
//!
//! Field reference: `docs/rollout.md`.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};
use sluice_filter::config::{ExperimentConfig, FilterConfig, Plan, CONFIG_VERSION};

use crate::judge::GuardrailConfig;
use crate::sink::ecds_file::WasmCode;

pub const API_VERSION: &str = "sluice.dev/v1alpha1";
pub const KIND: &str = "Rollout";

/// Default ramp, in percent of users.
pub const DEFAULT_STAGES: [f64; 6] = [1.0, 5.0, 10.0, 25.0, 50.0, 100.0];

/// A rollout document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Rollout {
    pub api_version: String,
    pub kind: String,
    pub metadata: Metadata,
    pub spec: RolloutSpec,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RolloutSpec {
    /// The filter's experiment configuration. Treatment weights in it are ignored: the
    /// schedule drives them (a rollout starts at 0 %).
    pub experiment: ExperimentConfig,
    /// The variant being rolled out; default: the only treatment.
    #[serde(default)]
    pub treatment: Option<String>,
    #[serde(default)]
    pub schedule: Schedule,
    /// A shadow stage before any user traffic moves (needs `experiment.shadow`).
    #[serde(default)]
    pub shadow: Option<ShadowStage>,
    /// The judge's configuration (see `docs/statistics.md`), read once into its checked type
    /// (`Rollout::parse` validates it); absent or `null` means every default.
    #[serde(default, deserialize_with = "null_is_default")]
    pub guardrails: GuardrailConfig,
    pub sources: Vec<SourceSpec>,
    pub sinks: Vec<SinkSpec>,
    #[serde(default)]
    pub notifications: Vec<NotificationSpec>,
    /// File holding the filter's `secret` (surrounding whitespace ignored); without it, `sluice
    /// run` generates one into the state directory once and reuses it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<String>,
}

/// Stages and their timing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Schedule {
    /// Treatment weights in percent, each a number or `{weight, bake}`.
    #[serde(default = "default_stages")]
    pub stages: Vec<StageSpec>,
    /// Default bake time of a stage: how long it runs (after warm-up) before promotion.
    #[serde(default = "default_bake", with = "duration")]
    pub bake: Duration,
    /// Data ignored after each weight change, while caches and connection pools settle.
    #[serde(default = "default_warmup", with = "duration")]
    pub warmup: Duration,
    /// How often the judge looks.
    #[serde(default = "default_interval", with = "duration")]
    pub interval: Duration,
}

impl Default for Schedule {
    fn default() -> Self {
        Schedule {
            stages: default_stages(),
            bake: default_bake(),
            warmup: default_warmup(),
            interval: default_interval(),
        }
    }
}

fn default_stages() -> Vec<StageSpec> {
    DEFAULT_STAGES
        .iter()
        .map(|&w| StageSpec::Weight(w))
        .collect()
}

fn default_bake() -> Duration {
    Duration::from_secs(600)
}

fn default_warmup() -> Duration {
    Duration::from_secs(60)
}

fn default_interval() -> Duration {
    Duration::from_secs(10)
}

/// One stage: a bare weight, or a weight with its own bake time.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum StageSpec {
    Weight(f64),
    Detailed(DetailedStage),
}

// By hand rather than `untagged`: an untagged enum answers every mistake with "did not match
// any variant" and loses the path of a mistake inside `{weight, bake}`.
impl<'de> Deserialize<'de> for StageSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<StageSpec, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = StageSpec;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a weight in percent, or {weight, bake}")
            }

            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<StageSpec, E> {
                Ok(StageSpec::Weight(v))
            }

            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<StageSpec, E> {
                Ok(StageSpec::Weight(v as f64))
            }

            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<StageSpec, E> {
                Ok(StageSpec::Weight(v as f64))
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<StageSpec, A::Error> {
                DetailedStage::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(StageSpec::Detailed)
            }
        }
        d.deserialize_any(Visitor)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetailedStage {
    pub weight: f64,
    #[serde(
        default,
        with = "opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub bake: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShadowStage {
    #[serde(with = "duration")]
    pub duration: Duration,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub enum SourceSpec {
    EnvoyAdmin(EnvoyAdminSpec),
    Prometheus(PrometheusSpec),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EnvoyAdminSpec {
    pub endpoints: Vec<String>,
    /// Fewest endpoints that must answer; default all.
    #[serde(default)]
    pub min_healthy: Option<usize>,
    #[serde(default = "default_timeout", with = "duration")]
    pub timeout: Duration,
    /// Caps on what one scrape may read (docs/rollout.md, "Sources").
    #[serde(default)]
    pub limits: crate::source::Limits,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PrometheusSpec {
    pub url: String,
    /// Data older than this is stale and holds the rollout.
    #[serde(default = "default_max_age", with = "duration")]
    pub max_age: Duration,
    #[serde(default = "default_timeout", with = "duration")]
    pub timeout: Duration,
    /// Caps on what one scrape may read (docs/rollout.md, "Sources").
    #[serde(default)]
    pub limits: crate::source::Limits,
}

fn default_timeout() -> Duration {
    Duration::from_secs(2)
}

fn default_max_age() -> Duration {
    Duration::from_secs(30)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub enum SinkSpec {
    EcdsFile(EcdsFileSpec),
    IstioWasmPlugin(IstioWasmPluginSpec),
    EcdsGrpc(EcdsGrpcSpec),
}

impl SinkSpec {
    /// The ECDS resource (filter name) the sink serves.
    pub fn resource(&self) -> &str {
        match self {
            SinkSpec::EcdsFile(f) => &f.resource,
            SinkSpec::EcdsGrpc(g) => &g.resource,
            // istiod names the filter after the object (`<namespace>.<name>`).
            SinkSpec::IstioWasmPlugin(w) => &w.name,
        }
    }
}

/// The controller serves the filter's config over gRPC (Envoy's ExtensionConfigDiscoveryService).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EcdsGrpcSpec {
    /// Address the server listens on (`host:port`); rollouts naming the same one share it.
    pub listen: String,
    /// `TypedExtensionConfig` name the proxies subscribe to; default `sluice`.
    #[serde(default = "default_resource")]
    pub resource: String,
    pub wasm: WasmCode,
    /// Distinct proxies (node ids) that must be connected for a push to count as confirmed.
    #[serde(default = "default_min_proxies")]
    pub min_proxies: usize,
    #[serde(default = "default_confirm", with = "duration")]
    pub confirm_within: Duration,
    /// TLS (mutual with `clientCaFile`); without it the server speaks plain gRPC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<crate::sink::ecds_grpc::tls::TlsSpec>,
}

/// The `istioWasmPlugin` sink: the filter configuration goes into an Istio object's
/// `pluginConfig`; confirmed by `sluice_config_revision` from the rollout's source.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct IstioWasmPluginSpec {
    /// The object's name and namespace.
    pub name: String,
    pub namespace: String,
    /// `WasmPlugin` (default) or `TrafficExtension` (Istio 1.30+).
    #[serde(default)]
    pub kind: crate::sink::istio::ObjectKind,
    /// Kubeconfig context; default: the kubeconfig's current one, or the pod's service
    /// account when there is no kubeconfig.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<String>,
    /// Fewest proxies that must report the pushed version for a push to be confirmed.
    #[serde(default = "default_min_proxies")]
    pub min_proxies: usize,
    /// istiod's push, and a source like Prometheus that scrapes every so often, take time.
    #[serde(default = "default_istio_confirm", with = "duration")]
    pub confirm_within: Duration,
    /// Conflicting writes (another writer changed the object meanwhile) retried in one push.
    #[serde(default = "default_max_conflicts")]
    pub max_conflicts: u32,
}

fn default_min_proxies() -> usize {
    1
}

fn default_istio_confirm() -> Duration {
    Duration::from_secs(60)
}

fn default_max_conflicts() -> u32 {
    5
}

/// Whether `s` is a DNS-1123 label (a namespace) or, with `dots`, subdomain (an object name).
fn dns_name(s: &str, dots: bool) -> bool {
    let max = if dots { 253 } else { 63 };
    !s.is_empty()
        && s.len() <= max
        && (dots || !s.contains('.'))
        && s.split('.').all(|part| {
            !part.is_empty()
                && part.len() <= 63
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !part.starts_with('-')
                && !part.ends_with('-')
        })
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EcdsFileSpec {
    /// The watched file Envoy loads the filter config from.
    pub path: String,
    /// `TypedExtensionConfig` name (the filter's name in the listener); default `sluice`.
    #[serde(default = "default_resource")]
    pub resource: String,
    pub wasm: WasmCode,
    /// Admin endpoints of the Envoys watching `path`, which must confirm each push.
    pub proxies: Vec<String>,
    #[serde(default = "default_confirm", with = "duration")]
    pub confirm_within: Duration,
}

fn default_resource() -> String {
    "sluice".to_string()
}

fn default_confirm() -> Duration {
    Duration::from_secs(10)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub enum NotificationSpec {
    Webhook(WebhookSpec),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WebhookSpec {
    pub url: String,
    /// `json` (the event object) or `slack` (`{"text": ...}`).
    #[serde(default)]
    pub format: WebhookFormat,
    /// PEM file with the certificate authority (or authorities) that signed an https://
    /// webhook's certificate, trusted in addition to the system's roots (a webhook behind a
    /// private CA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
}

impl WebhookSpec {
    /// The certificates of `ca_file` (none without one).
    pub fn ca_certificates(&self) -> Result<Vec<reqwest::Certificate>, CaFileError> {
        let Some(path) = &self.ca_file else {
            return Ok(Vec::new());
        };
        let pem = std::fs::read(path).map_err(|source| CaFileError::Read {
            path: path.clone(),
            source,
        })?;
        match reqwest::Certificate::from_pem_bundle(&pem) {
            Ok(certs) if !certs.is_empty() => Ok(certs),
            Ok(_) => Err(CaFileError::Empty { path: path.clone() }),
            Err(source) => Err(CaFileError::Pem {
                path: path.clone(),
                source,
            }),
        }
    }
}

/// Why a webhook's `caFile` gives no certificate; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum CaFileError {
    #[error("{path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: no PEM certificate in it")]
    Empty { path: String },
    #[error("{path}: {source}")]
    Pem {
        path: String,
        source: reqwest::Error,
    },
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WebhookFormat {
    #[default]
    Json,
    Slack,
}

/// A stage after defaults are applied.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stage {
    pub weight: f64,
    pub bake: Duration,
}

/// Everything wrong with a spec, each with its field path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .problems.join("\n"))]
pub struct SpecError {
    pub problems: Vec<String>,
}

impl SpecError {
    fn one(path: &str, reason: impl std::fmt::Display) -> SpecError {
        SpecError {
            problems: vec![format!("{path}: {reason}")],
        }
    }
}

/// A validated rollout.
#[derive(Debug, Clone, PartialEq)]
pub struct Checked {
    pub rollout: Rollout,
    pub treatment: String,
    pub stages: Vec<Stage>,
    /// The filter's `secret`: from `spec.secretFile`, or from [`Checked::use_state_secret`].
    pub secret: Option<String>,
}

/// A field whose `null` means its default, as leaving it out does.
fn null_is_default<'de, D: Deserializer<'de>, T: Default + Deserialize<'de>>(
    d: D,
) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// Stands in for a secret not known yet (generated by `sluice run`), so that validation and
/// `sluice render` check and show everything else.
pub const SECRET_PLACEHOLDER: &str = "<generated by sluice run into the state directory>";

impl Checked {
    /// Without `spec.secretFile`: the secret kept in `<state_dir>/<name>.secret`, generated
    /// on the first run. With it: nothing to do (the file was read at load).
    pub fn use_state_secret(&mut self, state_dir: &Path) -> Result<(), crate::secret::SecretError> {
        if self.secret.is_none() {
            self.secret = Some(crate::secret::read_or_generate(
                &crate::secret::state_path(state_dir, self.name()),
            )?);
        }
        Ok(())
    }
}

impl Rollout {
    /// Reads and validates a spec file.
    pub fn load(path: &Path) -> Result<Checked, SpecError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| SpecError::one(&path.display().to_string(), e))?;
        Rollout::parse(&text)
    }

    /// Parses and validates YAML (or JSON) text.
    pub fn parse(text: &str) -> Result<Checked, SpecError> {
        // Through a JSON value: the filter's config types use serde's usual one-key maps for
        // enums (`{header: x-user-id}`), which YAML deserializers read as tags instead.
        let value = crate::yaml::to_value(text).map_err(|e| SpecError::one("(document)", e))?;
        let rollout: Rollout = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            let path = if path == "." {
                "(document)".to_string()
            } else {
                path
            };
            SpecError::one(
                &path,
                sluice_filter::config::plain_type_error(&e.into_inner().to_string()),
            )
        })?;
        rollout.check()
    }

    fn check(self) -> Result<Checked, SpecError> {
        let mut problems = Vec::new();
        let mut problem = |path: &str, reason: String| problems.push(format!("{path}: {reason}"));
        if self.api_version != API_VERSION {
            problem("apiVersion", format!("must be {API_VERSION:?}"));
        }
        if self.kind != KIND {
            problem("kind", format!("must be {KIND:?}"));
        }
        let s = &self.spec;
        if self.metadata.name != s.experiment.name {
            // The experiment name is what metrics are labelled with; one name avoids confusion.
            problem(
                "spec.experiment.name",
                format!("must equal metadata.name ({:?})", self.metadata.name),
            );
        }
        // The experiment must be a valid filter experiment at every weight of the schedule.
        let treatments: Vec<&str> = s
            .experiment
            .variants
            .iter()
            .filter(|v| !v.control)
            .map(|v| v.name.as_str())
            .collect();
        let control_marked = s.experiment.variants.iter().any(|v| v.control);
        let treatments: Vec<&str> = if control_marked {
            treatments
        } else {
            s.experiment
                .variants
                .iter()
                .skip(1)
                .map(|v| v.name.as_str())
                .collect()
        };
        let treatment = match (&s.treatment, treatments.as_slice()) {
            (Some(t), _) if treatments.contains(&t.as_str()) => t.clone(),
            (Some(t), _) => {
                problem(
                    "spec.treatment",
                    format!("{t:?} is not a treatment of spec.experiment.variants"),
                );
                t.clone()
            }
            (None, [one]) => one.to_string(),
            (None, _) => {
                problem(
                    "spec.treatment",
                    "required when the experiment has several treatments".into(),
                );
                String::new()
            }
        };
        let mut stages = Vec::new();
        let mut last = 0.0;
        if s.schedule.stages.is_empty() {
            problem(
                "spec.schedule.stages",
                "at least one stage is required".into(),
            );
        }
        for (i, st) in s.schedule.stages.iter().enumerate() {
            let (weight, bake) = match st {
                StageSpec::Weight(w) => (*w, s.schedule.bake),
                StageSpec::Detailed(d) => (d.weight, d.bake.unwrap_or(s.schedule.bake)),
            };
            if !(weight > last && weight <= 100.0) {
                problem(
                    &format!("spec.schedule.stages[{i}]"),
                    format!("weight {weight} must be above the previous stage's ({last}) and at most 100"),
                );
            }
            last = weight;
            stages.push(Stage { weight, bake });
        }
        let within = |d: Duration, low: Duration| d >= low && d <= MAX_WAIT;
        if !within(s.schedule.interval, MIN_INTERVAL) {
            problem(
                "spec.schedule.interval",
                format!(
                    "{:?} is outside {} to {}",
                    s.schedule.interval,
                    format_duration(MIN_INTERVAL),
                    format_duration(MAX_WAIT)
                ),
            );
        }
        // A zero wait can never succeed; a longer one than an hour stalls the rollout.
        let mut wait = |path: String, d: Duration| {
            if !within(d, Duration::from_millis(1)) {
                problem(
                    &path,
                    format!(
                        "{d:?} must be positive and at most {}",
                        format_duration(MAX_WAIT)
                    ),
                );
            }
        };
        for (i, src) in s.sources.iter().enumerate() {
            match src {
                SourceSpec::EnvoyAdmin(a) => {
                    wait(format!("spec.sources[{i}].envoyAdmin.timeout"), a.timeout)
                }
                SourceSpec::Prometheus(p) => {
                    wait(format!("spec.sources[{i}].prometheus.timeout"), p.timeout);
                    if p.max_age.is_zero() {
                        wait(format!("spec.sources[{i}].prometheus.maxAge"), p.max_age);
                    }
                }
            }
        }
        for (i, sink) in s.sinks.iter().enumerate() {
            match sink {
                SinkSpec::EcdsFile(f) => wait(
                    format!("spec.sinks[{i}].ecdsFile.confirmWithin"),
                    f.confirm_within,
                ),
                SinkSpec::IstioWasmPlugin(w) => wait(
                    format!("spec.sinks[{i}].istioWasmPlugin.confirmWithin"),
                    w.confirm_within,
                ),
                SinkSpec::EcdsGrpc(g) => wait(
                    format!("spec.sinks[{i}].ecdsGrpc.confirmWithin"),
                    g.confirm_within,
                ),
            }
        }
        if s.shadow.is_some() && s.experiment.shadow.is_none() {
            problem(
                "spec.shadow",
                "a shadow stage needs spec.experiment.shadow (where to send copies)".into(),
            );
        }
        if s.sources.is_empty() {
            problem("spec.sources", "at least one source is required".into());
        }
        for (i, src) in s.sources.iter().enumerate() {
            match src {
                SourceSpec::EnvoyAdmin(a) => {
                    if a.endpoints.is_empty() {
                        problem(
                            &format!("spec.sources[{i}].envoyAdmin.endpoints"),
                            "must not be empty".into(),
                        );
                    }
                    for (j, e) in a.endpoints.iter().enumerate() {
                        if !e.starts_with("http://") {
                            problem(
                                &format!("spec.sources[{i}].envoyAdmin.endpoints[{j}]"),
                                format!("{e:?} must be an http:// URL"),
                            );
                        }
                    }
                    if a.min_healthy
                        .is_some_and(|m| m == 0 || m > a.endpoints.len())
                    {
                        problem(
                            &format!("spec.sources[{i}].envoyAdmin.minHealthy"),
                            "must be between 1 and the number of endpoints".into(),
                        );
                    }
                }
                SourceSpec::Prometheus(p) => {
                    if !p.url.starts_with("http://") {
                        problem(
                            &format!("spec.sources[{i}].prometheus.url"),
                            format!("{:?} must be an http:// URL", p.url),
                        );
                    }
                }
            }
        }
        if s.sinks.is_empty() {
            problem("spec.sinks", "at least one sink is required".into());
        }
        for (i, sink) in s.sinks.iter().enumerate() {
            let code = match sink {
                SinkSpec::EcdsFile(f) => Some(("ecdsFile", &f.wasm)),
                SinkSpec::EcdsGrpc(g) => Some(("ecdsGrpc", &g.wasm)),
                // The Istio object says where the code comes from.
                SinkSpec::IstioWasmPlugin(_) => None,
            };
            if let Some((kind, code)) = code {
                for (field, why) in code.problems() {
                    problem(&format!("spec.sinks[{i}].{kind}.wasm.{field}"), why);
                }
            }
            match sink {
                SinkSpec::EcdsFile(f) => {
                    if f.proxies.is_empty() {
                        problem(
                            &format!("spec.sinks[{i}].ecdsFile.proxies"),
                            "list the admin endpoints that must confirm each push".into(),
                        );
                    }
                    if f.path.is_empty() {
                        problem(
                            &format!("spec.sinks[{i}].ecdsFile.path"),
                            "must not be empty".into(),
                        );
                    }
                }
                SinkSpec::IstioWasmPlugin(w) => {
                    let at = |field: &str| format!("spec.sinks[{i}].istioWasmPlugin.{field}");
                    if !dns_name(&w.name, true) {
                        problem(
                            &at("name"),
                            format!("{:?} is not a Kubernetes object name (lower-case letters, digits, '-' and '.')", w.name),
                        );
                    }
                    if !dns_name(&w.namespace, false) {
                        problem(
                            &at("namespace"),
                            format!("{:?} is not a Kubernetes namespace (lower-case letters, digits and '-', at most 63)", w.namespace),
                        );
                    }
                    if w.min_proxies == 0 {
                        problem(
                            &at("minProxies"),
                            "must be at least 1: a push nobody reports is not confirmed".into(),
                        );
                    }
                    if w.max_conflicts > 100 {
                        problem(
                            &at("maxConflicts"),
                            format!("{} is above 100", w.max_conflicts),
                        );
                    }
                }
                SinkSpec::EcdsGrpc(g) => {
                    if g.listen.parse::<std::net::SocketAddr>().is_err() {
                        problem(
                            &format!("spec.sinks[{i}].ecdsGrpc.listen"),
                            format!(
                                "{:?} is not an address and port (e.g. 0.0.0.0:18000)",
                                g.listen
                            ),
                        );
                    }
                    if g.min_proxies == 0 {
                        problem(
                            &format!("spec.sinks[{i}].ecdsGrpc.minProxies"),
                            "must be at least 1 (a push nobody received is not confirmed)".into(),
                        );
                    }
                    if g.resource.is_empty() {
                        problem(
                            &format!("spec.sinks[{i}].ecdsGrpc.resource"),
                            "must not be empty".into(),
                        );
                    }
                    if let Some(Err(e)) = g.tls.as_ref().map(|t| t.load()) {
                        let field = if e.field.is_empty() {
                            String::new()
                        } else {
                            format!(".{}", e.field)
                        };
                        problem(&format!("spec.sinks[{i}].ecdsGrpc.tls{field}"), e.why);
                    }
                }
            }
        }
        for (i, n) in s.notifications.iter().enumerate() {
            let NotificationSpec::Webhook(w) = n;
            if !(w.url.starts_with("http://") || w.url.starts_with("https://")) {
                problem(
                    &format!("spec.notifications[{i}].webhook.url"),
                    format!("{:?} is not an http(s) URL", w.url),
                );
            }
            if w.ca_file.is_some() {
                let path = format!("spec.notifications[{i}].webhook.caFile");
                if !w.url.starts_with("https://") {
                    problem(&path, "applies to https:// URLs only".into());
                } else if let Err(e) = w.ca_certificates() {
                    problem(&path, e.to_string());
                }
            }
        }
        // The judge's configuration: checked here so `sluice validate` reports it too.
        if let Err(e) = self.spec.guardrails.check("spec.guardrails") {
            problems.extend(e.problems);
        }
        // The filter counts requests, not exposures: a per-exposure metric would never have a
        // denominator in a rollout (replayed snapshots may carry one: `sluice judge`).
        for (i, b) in self.spec.guardrails.business.iter().enumerate() {
            if b.per == crate::judge::config::Per::Exposure {
                problems.push(format!(
                    "spec.guardrails.business[{i}].per: the filter does not count exposures; use request"
                ));
            }
        }
        let secret = match &self.spec.secret_file {
            Some(f) => match crate::secret::read(Path::new(f)) {
                Ok(s) => Some(s),
                Err(e) => {
                    problems.push(format!("spec.secretFile: {e}"));
                    None
                }
            },
            None => None,
        };
        let checked = Checked {
            treatment,
            stages,
            rollout: self,
            secret,
        };
        // Render every weight the rollout can push (0, each stage): the filter must accept all.
        if problems.is_empty() {
            for w in std::iter::once(0.0).chain(checked.stages.iter().map(|s| s.weight)) {
                if let Err(e) = checked.render(w) {
                    problems.push(format!("spec.experiment: at weight {w}: {e}"));
                    break;
                }
            }
        }
        if problems.is_empty() {
            Ok(checked)
        } else {
            Err(SpecError { problems })
        }
    }
}

impl Checked {
    pub fn name(&self) -> &str {
        &self.rollout.metadata.name
    }

    /// The exact filter configuration pushed with the treatment at `weight` percent (other
    /// treatments at 0, the control taking the rest).
    pub fn render(&self, weight: f64) -> Result<FilterConfig, sluice_filter::config::ConfigError> {
        let mut exp = self.rollout.spec.experiment.clone();
        let control = exp.variants.iter().position(|v| v.control).unwrap_or(0);
        for (i, v) in exp.variants.iter_mut().enumerate() {
            v.weight = if i == control {
                None
            } else if v.name == self.treatment {
                Some(weight)
            } else {
                Some(0.0)
            };
        }
        let config = FilterConfig {
            version: CONFIG_VERSION,
            revision: None,
            secret: Some(
                self.secret
                    .clone()
                    .unwrap_or_else(|| SECRET_PLACEHOLDER.to_string()),
            ),
            experiments: vec![exp],
        };
        Plan::from_config(&config)?;
        Ok(config)
    }
}

/// The shortest evaluation interval: each look scrapes every proxy, so a shorter one only
/// loads the proxies (and Envoy's own stats flush is seconds apart anyway).
pub const MIN_INTERVAL: Duration = Duration::from_millis(100);

/// The longest source timeout and push confirmation wait.
pub const MAX_WAIT: Duration = Duration::from_secs(3600);

/// `sluice check`: a filter configuration (JSON) validated as the filter does (type errors named
/// by field path, `experiments[0].variants[1].weight: expected a number, ...`), after a UTF-8
/// BOM, and an empty file refused.
pub fn check_filter_config(text: &str) -> Result<Plan, CheckError> {
    let text = crate::yaml::strip_bom(text);
    if text.trim().is_empty() {
        return Err(CheckError::Empty(crate::yaml::YamlError::Empty));
    }
    Ok(Plan::from_json(text.as_bytes())?)
}

/// Why `sluice check` refuses a filter configuration.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    Empty(crate::yaml::YamlError),
    #[error(transparent)]
    Config(#[from] sluice_filter::config::ConfigError),
}

use crate::duration::{as_text as duration, opt_as_text as opt_duration};
pub use crate::duration::{
    deserialize as deserialize_duration, format_duration, parse_duration, MAX_DURATION,
};

#[cfg(test)]
pub(crate) mod tests;
