//! The Istio sink (`istioWasmPlugin`): the filter configuration goes into `pluginConfig` of
//! an Istio `WasmPlugin` (`spec.pluginConfig`) or `TrafficExtension` (`spec.wasm.pluginConfig`,
//! Istio 1.30 and later) through the Kubernetes API; istiod hands it to the sidecars and
//! gateways the object selects.
//!
//! A push reads the object, replaces `pluginConfig` in what it read, and writes the whole
//! object back (`PUT`) with the `resourceVersion` it read: if another writer changed the
//! object in between, the API server answers 409 Conflict and nothing is written; the push
//! then reads again and retries, up to `maxConflicts` times. Every other field of the object
//! is written back as read.
//!
//! istiod does not report delivery, so a push is confirmed by the data plane only: the
//! rollout's source reads the gauge `sluice_config_revision` of the experiment from every
//! proxy (see [`crate::source::revision`]), and the push is confirmed once every proxy that
//! reports it runs the pushed version and at least `minProxies` do, within `confirmWithin`.
//! A proxy that rejects the configuration keeps its old one: the push then stays unconfirmed
//! and fails when `confirmWithin` runs out (the proxy's log says why; istiod does not).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use kube::api::{Api, ApiResource, DynamicObject, PostParams};
use serde::{Deserialize, Serialize};
use sluice_filter::config::FilterConfig;
use tokio::time::Instant;

use super::{Receipt, Sink, SinkError};
use crate::source::revision::Revisions;
use crate::source::Source;

/// The kind of object the sink writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum ObjectKind {
    /// `extensions.istio.io/v1alpha1` `WasmPlugin`: `spec.pluginConfig`.
    #[default]
    WasmPlugin,
    /// `extensions.istio.io/v1alpha1` `TrafficExtension` (Istio 1.30+, supersedes
    /// `WasmPlugin`): `spec.wasm.pluginConfig`.
    TrafficExtension,
}

impl ObjectKind {
    pub fn api_resource(self) -> ApiResource {
        let (kind, plural) = match self {
            ObjectKind::WasmPlugin => ("WasmPlugin", "wasmplugins"),
            ObjectKind::TrafficExtension => ("TrafficExtension", "trafficextensions"),
        };
        ApiResource {
            group: "extensions.istio.io".into(),
            version: "v1alpha1".into(),
            api_version: "extensions.istio.io/v1alpha1".into(),
            kind: kind.into(),
            plural: plural.into(),
        }
    }

    /// Where `pluginConfig` sits in the object.
    pub fn config_path(self) -> &'static [&'static str] {
        match self {
            ObjectKind::WasmPlugin => &["spec", "pluginConfig"],
            ObjectKind::TrafficExtension => &["spec", "wasm", "pluginConfig"],
        }
    }
}

/// Why the Istio sink could not push or confirm.
#[derive(Debug, thiserror::Error)]
pub enum IstioError {
    #[error("kubernetes client: {0}")]
    Client(String),
    #[error("{object}: {reason}")]
    Api { object: String, reason: String },
    #[error("{object}: changed by another writer at each of {attempts} attempts (resourceVersion conflicts); this push gives up and is retried")]
    Conflicts { object: String, attempts: u32 },
    #[error("{object}: {path} is missing or not an object (a {kind:?} the filter cannot be configured through)")]
    NotWasm {
        object: String,
        path: String,
        kind: ObjectKind,
    },
    #[error(
        "{object}: the data plane did not confirm version {version} within {waited:?}: {seen}"
    )]
    Unconfirmed {
        object: String,
        version: u64,
        waited: Duration,
        seen: String,
    },
    #[error("{object}: the sink has no source to read the proxies' revisions from")]
    NoSource { object: String },
    #[error("{object}: cannot read the proxies' revisions: {reason}")]
    Source { object: String, reason: String },
}

/// A Kubernetes client, made on first use: from the kubeconfig (`KUBECONFIG` or
/// `~/.kube/config`, with `context` if given) or, without one, the pod's service account.
#[derive(Clone, Default)]
pub struct Kube {
    context: Option<String>,
    client: Arc<tokio::sync::OnceCell<kube::Client>>,
}

impl std::fmt::Debug for Kube {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kube")
            .field("context", &self.context)
            .field("connected", &self.client.initialized())
            .finish()
    }
}

impl Kube {
    pub fn new(context: Option<String>) -> Kube {
        Kube {
            context,
            client: Arc::default(),
        }
    }

    /// A given client (tests: kube's mocked service).
    pub fn with_client(client: kube::Client) -> Kube {
        Kube {
            context: None,
            client: Arc::new(tokio::sync::OnceCell::new_with(Some(client))),
        }
    }

    async fn client(&self) -> Result<kube::Client, IstioError> {
        let context = self.context.clone();
        self.client
            .get_or_try_init(|| async move {
                let config = match context {
                    Some(context) => {
                        kube::Config::from_kubeconfig(&kube::config::KubeConfigOptions {
                            context: Some(context.clone()),
                            ..Default::default()
                        })
                        .await
                        .map_err(|e| format!("kubeconfig context {context:?}: {e}"))?
                    }
                    None => kube::Config::infer().await.map_err(|e| {
                        format!("no kubeconfig and not in a pod with a service account: {e}")
                    })?,
                };
                kube::Client::try_from(config).map_err(|e| e.to_string())
            })
            .await
            .cloned()
            .map_err(IstioError::Client)
    }
}

/// The object a sink writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub kind: ObjectKind,
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?} {}/{}", self.kind, self.namespace, self.name)
    }
}

/// The `istioWasmPlugin` sink; `S` is the rollout's source, read for confirmation.
#[derive(Debug, Clone)]
pub struct IstioWasmPlugin<S> {
    pub target: Target,
    pub kube: Kube,
    pub source: Option<S>,
    /// Fewest proxies that must report the pushed version.
    pub min_proxies: usize,
    pub confirm_within: Duration,
    /// Conflicting writes retried in one push before it fails.
    pub max_conflicts: u32,
    /// How often the source is read while a push waits for confirmation.
    pub poll: Duration,
}

/// How often a push reads the source while it waits (the admin source shares answers for up
/// to a second anyway).
pub const POLL: Duration = Duration::from_millis(250);

/// The pushed `pluginConfig`: the filter configuration as JSON, without null fields (the API
/// server may drop them, and the filter reads a missing field as a null one).
pub fn plugin_config(config: &FilterConfig) -> Result<serde_json::Value, SinkError> {
    let mut v = serde_json::to_value(config).map_err(|e| SinkError::Render(e.to_string()))?;
    strip_nulls(&mut v);
    Ok(v)
}

fn strip_nulls(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(m) => {
            m.retain(|_, x| !x.is_null());
            m.values_mut().for_each(strip_nulls);
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(strip_nulls),
        _ => {}
    }
}

/// Whether two JSON values are equal, numbers compared by value: `pluginConfig` travels
/// through `google.protobuf.Struct` and YAML tools, which may write `5` as `5.0`.
pub fn same_json(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    use serde_json::Value as V;
    match (a, b) {
        (V::Number(x), V::Number(y)) => x == y || x.as_f64() == y.as_f64(),
        (V::Array(x), V::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same_json(x, y))
        }
        (V::Object(x), V::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| same_json(v, w)))
        }
        _ => a == b,
    }
}

/// The object `got` with `pluginConfig` set to `config`; `Err` names the missing part.
pub fn with_config(
    mut got: DynamicObject,
    kind: ObjectKind,
    config: serde_json::Value,
) -> Result<DynamicObject, MissingPath> {
    let path = kind.config_path();
    let (last, parents) = path
        .split_last()
        .ok_or_else(|| MissingPath("empty path".into()))?;
    let mut at = &mut got.data;
    for (i, p) in parents.iter().enumerate() {
        at = match at.get_mut(*p) {
            Some(next) if next.is_object() => next,
            _ => return Err(MissingPath(parents[..=i].join("."))),
        };
    }
    let Some(obj) = at.as_object_mut() else {
        return Err(MissingPath(parents.join(".")));
    };
    obj.insert((*last).to_string(), config);
    Ok(got)
}

/// The part of an object's path to `pluginConfig` that is missing or not an object.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct MissingPath(pub String);

/// The `pluginConfig` of `got`, if it has one.
pub fn config_of(got: &DynamicObject, kind: ObjectKind) -> Option<&serde_json::Value> {
    kind.config_path()
        .iter()
        .try_fold(&got.data, |at, p| at.get(*p))
}

/// Whether `revisions` confirm `version`: `Ok(proxies)` when every proxy reporting one runs
/// `version` and at least `min_proxies` do; otherwise why not.
pub fn confirmation(
    revisions: &Revisions,
    version: u64,
    min_proxies: usize,
) -> Result<usize, NotConfirmed> {
    let n = revisions.by_origin.len();
    if !revisions.other_than(version).is_empty() {
        return Err(NotConfirmed::Revisions(revisions.describe()));
    }
    if n < min_proxies {
        return Err(NotConfirmed::TooFew { n, min_proxies });
    }
    Ok(n)
}

/// Why the proxies do not confirm a version yet.
#[derive(Debug, thiserror::Error)]
pub enum NotConfirmed {
    /// Some proxy runs another revision: all of them, described by revision.
    #[error("proxies by revision: {0}")]
    Revisions(String),
    #[error("{n} proxies report the experiment's revision, minProxies is {min_proxies}")]
    TooFew { n: usize, min_proxies: usize },
    /// The proxies' revisions could not be read.
    #[error("source: {0}")]
    Source(String),
    #[error(transparent)]
    Other(Box<IstioError>),
    #[error("experiment {experiment}: {why}")]
    Experiment {
        experiment: String,
        why: Box<NotConfirmed>,
    },
}

impl<S: Source + Sync> IstioWasmPlugin<S> {
    fn api(&self, client: kube::Client) -> Api<DynamicObject> {
        Api::namespaced_with(
            client,
            &self.target.namespace,
            &self.target.kind.api_resource(),
        )
    }

    fn api_error(&self, e: kube::Error) -> IstioError {
        let reason = match &e {
            kube::Error::Api(s) if s.code == 403 => format!(
                "forbidden ({}); the controller's service account needs get and update on {}",
                s.message,
                self.target.kind.api_resource().plural
            ),
            kube::Error::Api(s) if s.code == 404 => format!(
                "not found ({}); create it first (see deploy/istio/)",
                s.message
            ),
            kube::Error::Api(s) => format!("{} {}: {}", s.code, s.reason, s.message),
            other => other.to_string(),
        };
        IstioError::Api {
            object: self.target.to_string(),
            reason,
        }
    }

    fn silent(&self) -> IstioError {
        IstioError::Api {
            object: self.target.to_string(),
            reason: format!(
                "the Kubernetes API server did not answer within {:?} (confirmWithin)",
                self.confirm_within
            ),
        }
    }

    /// Writes `config` into the object, re-reading it after each conflict.
    async fn write(&self, config: serde_json::Value) -> Result<(), IstioError> {
        let api = self.api(self.kube.client().await?);
        let name = &self.target.name;
        for _ in 0..=self.max_conflicts {
            let got = api.get(name).await.map_err(|e| self.api_error(e))?;
            let updated = with_config(got, self.target.kind, config.clone()).map_err(
                |MissingPath(path)| IstioError::NotWasm {
                    object: self.target.to_string(),
                    path,
                    kind: self.target.kind,
                },
            )?;
            match api.replace(name, &PostParams::default(), &updated).await {
                Ok(_) => return Ok(()),
                Err(kube::Error::Api(s)) if s.code == 409 => {
                    tracing::info!(object = %self.target, message = %s.message, "conflicting write; reading the object again");
                }
                Err(e) => return Err(self.api_error(e)),
            }
        }
        Err(IstioError::Conflicts {
            object: self.target.to_string(),
            attempts: self.max_conflicts + 1,
        })
    }

    /// The revisions of every experiment of `config`.
    async fn revisions(
        &self,
        config: &FilterConfig,
    ) -> Result<BTreeMap<String, Revisions>, IstioError> {
        let Some(source) = &self.source else {
            return Err(IstioError::NoSource {
                object: self.target.to_string(),
            });
        };
        let mut out = BTreeMap::new();
        for e in &config.experiments {
            let scraped = source
                .scrape(&e.name)
                .await
                .map_err(|err| IstioError::Source {
                    object: self.target.to_string(),
                    reason: err.to_string(),
                })?;
            out.insert(e.name.clone(), Revisions::of(&scraped, &e.name));
        }
        Ok(out)
    }

    /// `Ok` once every experiment of `config` is confirmed at `version`, else why not.
    async fn confirmed(&self, config: &FilterConfig, version: u64) -> Result<(), NotConfirmed> {
        let revisions = self.revisions(config).await.map_err(|e| match e {
            IstioError::Source { reason, .. } => NotConfirmed::Source(reason),
            other => NotConfirmed::Other(Box::new(other)),
        })?;
        for (experiment, r) in revisions {
            confirmation(&r, version, self.min_proxies).map_err(|why| {
                NotConfirmed::Experiment {
                    experiment,
                    why: Box::new(why),
                }
            })?;
        }
        Ok(())
    }
}

impl<S: Source + Send + Sync> Sink for IstioWasmPlugin<S> {
    async fn push(&self, config: &FilterConfig, version: u64) -> Result<Receipt, SinkError> {
        let started = Instant::now();
        if self.source.is_none() {
            return Err(IstioError::NoSource {
                object: self.target.to_string(),
            }
            .into());
        }
        let mut config = config.clone();
        config.revision = Some(super::ecds_file::revision(version));
        // An API server that accepts the connection and never answers must not stall the
        // rollout (its rollbacks included) beyond the push's own deadline.
        let config_json = plugin_config(&config)?;
        tokio::time::timeout(self.confirm_within, self.write(config_json))
            .await
            .map_err(|_| self.silent())??;
        loop {
            let why = match self.confirmed(&config, version).await {
                Ok(()) => {
                    return Ok(Receipt {
                        confirmed_after: started.elapsed(),
                    })
                }
                Err(why) => why,
            };
            if started.elapsed() >= self.confirm_within {
                return Err(IstioError::Unconfirmed {
                    object: self.target.to_string(),
                    version,
                    waited: started.elapsed(),
                    seen: why.to_string(),
                }
                .into());
            }
            tokio::time::sleep(self.poll).await;
        }
    }

    async fn in_force(
        &self,
        config: &FilterConfig,
        version: u64,
    ) -> Result<Option<String>, SinkError> {
        let api = self.api(self.kube.client().await?);
        let got = tokio::time::timeout(self.confirm_within, api.get(&self.target.name))
            .await
            .map_err(|_| self.silent())?
            .map_err(|e| self.api_error(e))?;
        let object = &self.target;
        let path = self.target.kind.config_path().join(".");
        let Some(stored) = config_of(&got, self.target.kind) else {
            return Ok(Some(format!("{object} has no {path}")));
        };
        let mut stored = stored.clone();
        let revision = stored
            .as_object_mut()
            .and_then(|m| m.remove("revision"))
            .and_then(|r| r.as_str().map(str::to_string));
        let mut want = config.clone();
        want.revision = None;
        let want = plugin_config(&want)?;
        let mut stored_plain = stored.clone();
        strip_nulls(&mut stored_plain);
        if !same_json(&stored_plain, &want) {
            return Ok(Some(format!(
                "{object}: {path} is not the configuration pushed as version {version} (changed by another writer)"
            )));
        }
        let pushed = revision
            .as_deref()
            .and_then(sluice_filter::config::Revision::parse);
        if pushed.map(|r| r.version) != Some(version) {
            return Ok(Some(format!(
                "{object}: {path}.revision is {}, not version {version}",
                revision.as_deref().unwrap_or("missing")
            )));
        }
        for (experiment, r) in self.revisions(config).await? {
            if let Some((origin, v)) = r.other_than(version).first() {
                return Ok(Some(format!(
                    "{origin} runs revision {v} of experiment {experiment}, not the confirmed {version}"
                )));
            }
            if r.by_origin.len() < self.min_proxies {
                return Err(IstioError::Unconfirmed {
                    object: object.to_string(),
                    version,
                    waited: Duration::ZERO,
                    seen: format!(
                        "experiment {experiment}: {} proxies report its revision, minProxies is {}",
                        r.by_origin.len(),
                        self.min_proxies
                    ),
                }
                .into());
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests;
