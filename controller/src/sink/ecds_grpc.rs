//! The ecdsGrpc sink: the controller itself is the Envoys' `ExtensionConfigDiscoveryService`
//! (xDS v3, state of the world), so any number of proxies take the filter's configuration
//! from it over gRPC.
//!
//! - [`hub`]: what one `listen` address serves and what each connected proxy ACKed/NACKed.
//! - [`service`]: the gRPC service and server over a hub.
//! - [`tls`]: the optional (mutual) TLS that keeps the configuration's secret from eavesdroppers.
//! - [`Servers`]: one server per `listen` address, shared by the rollouts naming it.
//!
//! A push replaces the rollout's resource on the hub; every subscribed stream is sent it at
//! once with a fresh nonce, and the push is confirmed when every connected proxy subscribed
//! to the resource ACKed it and at least `minProxies` distinct proxies are connected. A NACK
//! fails the push with the proxy's `error_detail`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::core::v3::{
    async_data_source, data_source, http_uri, AsyncDataSource, DataSource, HttpUri,
    RemoteDataSource, TypedExtensionConfig,
};
use envoy_types::pb::envoy::extensions::filters::http::wasm::v3::Wasm;
use envoy_types::pb::envoy::extensions::wasm::v3::{plugin_config, PluginConfig, VmConfig};
use envoy_types::pb::google::protobuf::{Any, Duration as ProtoDuration, StringValue};
use envoy_types::util::pack_any;
use sluice_filter::config::FilterConfig;
use tokio::sync::watch;

use super::ecds_file::WasmCode;
use super::{Receipt, Sink, SinkError};

pub mod hub;
pub mod service;
pub mod tls;

pub use hub::{Confirmation, Hub, Limits, ProxyStatus};

/// The `TypedExtensionConfig` for `resource`: the Wasm HTTP filter running `code` with
/// `config` (JSON, as a `StringValue`) as its configuration.
pub fn render(resource: &str, code: &WasmCode, config: &FilterConfig) -> Result<Any, SinkError> {
    let plugin = serde_json::to_string(config).map_err(|e| SinkError::Render(e.to_string()))?;
    let wasm = Wasm {
        config: Some(PluginConfig {
            name: resource.to_string(),
            root_id: code.root_id.clone(),
            vm: Some(plugin_config::Vm::VmConfig(VmConfig {
                vm_id: code.vm_id.clone(),
                runtime: code.runtime.clone(),
                code: Some(code_source(code)),
                ..Default::default()
            })),
            configuration: Some(pack_any(StringValue { value: plugin })),
            ..Default::default()
        }),
    };
    Ok(pack_any(TypedExtensionConfig {
        name: resource.to_string(),
        typed_config: Some(pack_any(wasm)),
    }))
}

fn code_source(code: &WasmCode) -> AsyncDataSource {
    let specifier = match &code.remote {
        Some(r) => async_data_source::Specifier::Remote(RemoteDataSource {
            http_uri: Some(HttpUri {
                uri: r.uri.clone(),
                timeout: Some(ProtoDuration {
                    seconds: i64::try_from(r.timeout_secs).unwrap_or(i64::MAX),
                    nanos: 0,
                }),
                http_upstream_type: Some(http_uri::HttpUpstreamType::Cluster(r.cluster.clone())),
            }),
            sha256: r.sha256.clone(),
            ..Default::default()
        }),
        None => async_data_source::Specifier::Local(DataSource {
            specifier: Some(data_source::Specifier::Filename(code.filename.clone())),
            ..Default::default()
        }),
    };
    AsyncDataSource {
        specifier: Some(specifier),
    }
}

/// One rollout's resource on a shared server.
#[derive(Debug, Clone)]
pub struct EcdsGrpc {
    pub hub: Arc<Hub>,
    pub listen: SocketAddr,
    pub resource: String,
    pub code: WasmCode,
    pub min_proxies: usize,
    pub confirm_within: Duration,
    /// Whether the server speaks TLS (shown in `/status`).
    pub tls: bool,
}

impl Sink for EcdsGrpc {
    async fn push(&self, config: &FilterConfig, version: u64) -> Result<Receipt, SinkError> {
        let started = Instant::now();
        let mut stamped = config.clone();
        // A fresh revision per push: a retried push is a new resource the proxy evaluates
        // afresh (and the data plane's gauge tells pushes apart).
        stamped.revision = Some(super::ecds_file::revision(version));
        let any = render(&self.resource, &self.code, &stamped)?;
        let mut plain = config.clone();
        plain.revision = None;
        let mut events = self.hub.events();
        let serial = self.hub.set(&self.resource, version, plain, any);
        loop {
            events.borrow_and_update();
            let found = self.hub.confirmation(&self.resource, serial);
            match &found {
                Confirmation::Nacked { proxy, detail } => {
                    return Err(SinkError::Nacked {
                        proxy: proxy.clone(),
                        version,
                        detail: detail.clone(),
                    })
                }
                Confirmation::Acked { proxies } if *proxies >= self.min_proxies => {
                    return Ok(Receipt {
                        confirmed_after: started.elapsed(),
                    })
                }
                _ => {}
            }
            let left = self.confirm_within.saturating_sub(started.elapsed());
            let woke = tokio::time::timeout(left, events.changed()).await;
            if woke.is_err() || left.is_zero() {
                return Err(match found {
                    Confirmation::Waiting {
                        pending: (proxy, acked),
                    } => SinkError::Unconfirmed {
                        proxy,
                        version,
                        waited: started.elapsed(),
                        in_force: acked.map_or("none".into(), |v| v.to_string()),
                    },
                    Confirmation::Acked { proxies } => SinkError::TooFewProxies {
                        listen: self.listen.to_string(),
                        resource: self.resource.clone(),
                        version,
                        connected: proxies,
                        min: self.min_proxies,
                        waited: started.elapsed(),
                    },
                    Confirmation::Nacked { proxy, detail } => SinkError::Nacked {
                        proxy,
                        version,
                        detail,
                    },
                });
            }
        }
    }

    async fn in_force(
        &self,
        config: &FilterConfig,
        version: u64,
    ) -> Result<Option<String>, SinkError> {
        let Some(current) = self.hub.resource(&self.resource) else {
            return Ok(Some(format!(
                "the ecdsGrpc server on {} serves no resource {:?} (controller restarted?)",
                self.listen, self.resource
            )));
        };
        if current.version != version {
            return Ok(Some(format!(
                "the ecdsGrpc server on {} serves version {} of {:?}, not the confirmed {version}",
                self.listen, current.version, self.resource
            )));
        }
        let mut want = config.clone();
        want.revision = None;
        if current.config != want {
            return Ok(Some(format!(
                "the ecdsGrpc server on {} serves version {version} of {:?} with another configuration than the one confirmed",
                self.listen, self.resource
            )));
        }
        // A proxy that just (re)connected is given a moment to ACK what it was sent.
        if let Some(first) = self
            .hub
            .stragglers(&self.resource, self.confirm_within)
            .into_iter()
            .next()
        {
            return Ok(Some(first));
        }
        Ok(None)
    }
}

/// An ecdsGrpc sink's proxies, as `/status` lists them.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SinkProxies {
    pub listen: String,
    pub resource: String,
    /// The push version the server serves for the resource (`None` before the first push).
    pub serving: Option<u64>,
    /// Whether the server speaks TLS; `false` means the configuration, secret included,
    /// travels in clear.
    pub tls: bool,
    /// Every proxy connected and subscribed to the resource.
    pub proxies: Vec<ProxyStatus>,
}

impl EcdsGrpc {
    pub fn proxies(&self) -> SinkProxies {
        SinkProxies {
            listen: self.listen.to_string(),
            resource: self.resource.clone(),
            serving: self.hub.resource(&self.resource).map(|r| r.version),
            tls: self.tls,
            proxies: self
                .hub
                .proxies()
                .into_iter()
                .filter(|p| p.subscribed.contains(&self.resource))
                .collect(),
        }
    }
}

/// A running server: its hub, its tls block and the rollout that started it.
#[derive(Debug)]
struct Running {
    hub: Arc<Hub>,
    tls: Option<tls::TlsSpec>,
    by: String,
}

/// The ecdsGrpc servers of one controller process, by `listen` address.
#[derive(Debug)]
pub struct Servers {
    hubs: Mutex<BTreeMap<SocketAddr, Running>>,
    stop: watch::Receiver<bool>,
    limits: Limits,
}

impl Servers {
    /// Servers that end when `stop` turns true.
    pub fn new(stop: watch::Receiver<bool>, limits: Limits) -> Servers {
        Servers {
            hubs: Mutex::new(BTreeMap::new()),
            stop,
            limits,
        }
    }

    /// The hub serving `addr` in plain text, binding and starting its server on first use.
    pub async fn hub(&self, addr: SocketAddr) -> Result<Arc<Hub>, std::io::Error> {
        self.join(addr, None, "").await
    }

    /// The hub serving `addr` for `rollout`, binding and starting its server (with `tls`)
    /// on first use. Every rollout on one address must give the same `tls` block; files
    /// that cannot be read or parsed are errors naming the field and the file.
    pub async fn join(
        &self,
        addr: SocketAddr,
        tls: Option<&tls::TlsSpec>,
        rollout: &str,
    ) -> Result<Arc<Hub>, std::io::Error> {
        let invalid = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, m);
        if let Some(r) = self.lock().get(&addr) {
            if r.tls.as_ref() != tls {
                let show = |t: Option<&tls::TlsSpec>| t.map_or("none".into(), |t| t.to_string());
                return Err(invalid(format!(
                    "ecdsGrpc.tls: rollouts sharing the ecdsGrpc server on {addr} must give the same tls block: rollout {:?} gives {}, rollout {rollout:?} gives {}",
                    r.by,
                    show(r.tls.as_ref()),
                    show(tls)
                )));
            }
            return Ok(r.hub.clone());
        }
        let config = tls
            .map(|t| t.load().map_err(|e| invalid(format!("ecdsGrpc.{e}"))))
            .transpose()?;
        if let Some(warning) = tls::in_clear(addr, tls) {
            tracing::warn!(listen = %addr, "{warning}");
        }
        let listener = service::bind(addr).await?;
        let hub = Hub::new(self.limits);
        self.lock().insert(
            addr,
            Running {
                hub: hub.clone(),
                tls: tls.cloned(),
                by: rollout.to_string(),
            },
        );
        let (h, stop) = (hub.clone(), self.stop.clone());
        tokio::spawn(async move {
            tracing::info!(listen = %addr, tls = config.is_some(), "ecdsGrpc server running");
            if let Err(e) = service::serve(listener, h, stop, config).await {
                tracing::error!(listen = %addr, error = %e, "ecdsGrpc server stopped");
            }
        });
        Ok(hub)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<SocketAddr, Running>> {
        self.hubs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every server's connected proxies, for `/status`.
    pub fn proxies(&self) -> BTreeMap<SocketAddr, Vec<ProxyStatus>> {
        self.lock()
            .iter()
            .map(|(a, r)| (*a, r.hub.proxies()))
            .collect()
    }
}

#[cfg(test)]
mod tests;
