//! Sinks: where the controller pushes the filter configuration with new weights, and how it
//! learns that every proxy accepted it. A push that is not confirmed is an error, never a
//! success: the rollout holds instead of assuming traffic moved.
//!
//! - [`ecds_file`]: an ECDS file that Envoys on this host watch, confirmed through their admin.
//! - [`ecds_grpc`]: the controller as the Envoys' ECDS gRPC server, confirmed by their ACKs.

use std::future::Future;
use std::time::Duration;

use sluice_filter::config::FilterConfig;

pub mod ecds_file;
pub mod ecds_grpc;
pub mod istio;

/// Proof that a push took effect.
#[derive(Debug, Clone, PartialEq)]
pub struct Receipt {
    /// From the start of the push until the last proxy confirmed it.
    pub confirmed_after: Duration,
}

/// Why a push failed.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("writing {path}: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("rendering the filter configuration: {0}")]
    Render(String),
    #[error("{proxy} rejected configuration version {version} (see its log for the reason)")]
    Rejected { proxy: String, version: u64 },
    #[error("{proxy} rejected configuration version {version}: {detail}")]
    Nacked {
        proxy: String,
        version: u64,
        detail: String,
    },
    #[error("{resource:?} on {listen}: {connected} proxies connected and subscribed, fewer than minProxies {min}, after {waited:?} (version {version} not confirmed)")]
    TooFewProxies {
        listen: String,
        resource: String,
        version: u64,
        connected: usize,
        min: usize,
        waited: Duration,
    },
    #[error("{proxy} did not confirm configuration version {version} within {waited:?} (version in force: {in_force})")]
    Unconfirmed {
        proxy: String,
        version: u64,
        waited: Duration,
        in_force: String,
    },
    #[error("{field}: {proxy} has no cluster {cluster:?}")]
    UnknownCluster {
        proxy: String,
        field: String,
        cluster: String,
    },
    #[error(transparent)]
    Admin(#[from] crate::source::admin::AdminError),
    #[error(transparent)]
    Istio(#[from] istio::IstioError),
}

/// Pushes filter configurations to proxies.
pub trait Sink {
    /// Pushes `config` as version `version` and waits until every proxy accepted it.
    fn push(
        &self,
        config: &FilterConfig,
        version: u64,
    ) -> impl Future<Output = Result<Receipt, SinkError>> + Send;

    /// Checks that `config`, pushed and confirmed as `version`, is still what the proxies
    /// serve: `Ok(None)` if so, `Ok(Some(how it differs))` if not, `Err` if it cannot tell.
    fn in_force(
        &self,
        config: &FilterConfig,
        version: u64,
    ) -> impl Future<Output = Result<Option<String>, SinkError>> + Send;
}
