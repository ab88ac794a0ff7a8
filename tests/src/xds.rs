//! Simulated Envoys on the xDS side: clients of an `ExtensionConfigDiscoveryService` that
//! subscribe to one filter resource and answer every response the way Envoy does.
//!
//! Envoy's state-of-the-world protocol, as these clients follow it: the first request carries
//! the node, the resource name and the type URL, an empty `version_info` and no nonce. Every
//! response is answered by exactly one request carrying the response's nonce: an ACK repeats the
//! response's `version_info`; a NACK repeats the last version accepted (empty if none) and sets
//! `error_detail`. Whether a response is accepted is decided by a [`Verdict`] over what it
//! carries (by default: accept whatever decodes to a Wasm filter config).
//!
//! A client records what it received and answered ([`XdsClient::state`]), and can be awaited
//! until it has ACKed a given version ([`XdsClient::acked`]). [`XdsClient::connect`] opens its
//! own HTTP/2 connection, as every Envoy does; [`XdsClient::on_channel`] shares one (the
//! benchmark's thousand clients).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::core::v3::{Node, TypedExtensionConfig};
use envoy_types::pb::envoy::extensions::filters::http::wasm::v3::Wasm;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::envoy::service::extension::v3::extension_config_discovery_service_client::ExtensionConfigDiscoveryServiceClient;
use envoy_types::pb::google::protobuf::{Any, StringValue, Struct};
use envoy_types::pb::google::rpc::Status;
use prost::Message;
use tokio::sync::{mpsc, watch};
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use crate::error::{Error, Result};

/// The resource type of ECDS responses.
pub const TYPED_EXTENSION_CONFIG: &str =
    "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig";
/// The type of the filter config inside.
pub const WASM: &str = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";

/// What one response carried, as a client decoded it.
#[derive(Debug, Clone, PartialEq)]
pub struct Received {
    pub version: String,
    pub nonce: String,
    /// Names of the resources in the response.
    pub resources: Vec<String>,
    /// The Sluice filter's JSON configuration of the subscribed resource, if the response
    /// carried it as a Wasm filter with a `StringValue` configuration.
    pub config: Option<String>,
    /// Why the response could not be decoded as that, if it could not.
    pub undecodable: Option<String>,
    pub at: Instant,
}

/// Decides whether a client accepts a response: `None` ACKs, `Some(reason)` NACKs with it.
pub type Verdict = Arc<dyn Fn(&Received) -> Option<String> + Send + Sync>;

/// Accept what decodes to the subscribed Wasm filter, NACK anything else (as Envoy would).
pub fn accept_decodable() -> Verdict {
    Arc::new(|r: &Received| r.undecodable.clone())
}

/// Everything a client has seen and said so far.
#[derive(Debug, Clone, Default)]
pub struct ClientState {
    /// Every response, in order.
    pub received: Vec<Received>,
    /// The version last ACKed, and when.
    pub acked: Option<(String, Instant)>,
    /// The config of the version last ACKed.
    pub config: Option<String>,
    /// NACKs sent: (nonce, reason).
    pub nacks: Vec<(String, String)>,
    /// Set when the stream ended (the server closed it or the connection failed).
    pub ended: Option<String>,
}

/// Who a client says it is.
#[derive(Debug, Clone)]
pub struct Identity {
    pub id: String,
    pub cluster: String,
    /// `node.metadata` (a flat string map is enough for tests).
    pub metadata: Vec<(String, String)>,
}

impl Identity {
    pub fn new(id: impl Into<String>) -> Identity {
        Identity {
            id: id.into(),
            cluster: "sluice-sim".into(),
            metadata: Vec::new(),
        }
    }

    fn node(&self) -> Node {
        let fields = self
            .metadata
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    envoy_types::pb::google::protobuf::Value {
                        kind: Some(envoy_types::pb::google::protobuf::value::Kind::StringValue(
                            v.clone(),
                        )),
                    },
                )
            })
            .collect();
        Node {
            id: self.id.clone(),
            cluster: self.cluster.clone(),
            metadata: (!self.metadata.is_empty()).then_some(Struct { fields }),
            user_agent_name: "sluice-sim".into(),
            ..Node::default()
        }
    }
}

/// One simulated Envoy subscribed to one resource. The stream closes when dropped.
pub struct XdsClient {
    identity: Identity,
    state: Arc<Mutex<ClientState>>,
    /// Bumped on every change of `state`.
    changed: watch::Receiver<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl XdsClient {
    /// Connects on a connection of its own to `addr` (`host:port`) and subscribes to `resource`.
    pub async fn connect(
        addr: &str,
        identity: Identity,
        resource: &str,
        verdict: Verdict,
    ) -> Result<XdsClient> {
        let channel = channel(addr).await?;
        Ok(Self::on_channel(channel, identity, resource, verdict))
    }

    /// Subscribes over an existing channel (several clients may share one HTTP/2 connection).
    pub fn on_channel(
        channel: Channel,
        identity: Identity,
        resource: &str,
        verdict: Verdict,
    ) -> XdsClient {
        let state = Arc::new(Mutex::new(ClientState::default()));
        let (tick, changed) = watch::channel(0u64);
        let task = tokio::spawn(run(
            channel,
            identity.clone(),
            resource.to_string(),
            verdict,
            state.clone(),
            tick,
        ));
        XdsClient {
            identity,
            state,
            changed,
            task,
        }
    }

    pub fn id(&self) -> &str {
        &self.identity.id
    }

    /// A copy of everything seen so far.
    pub fn state(&self) -> ClientState {
        lock(&self.state).clone()
    }

    /// Waits until `test` holds for the state, or `within` passes.
    pub async fn wait(
        &self,
        within: Duration,
        what: &str,
        test: impl Fn(&ClientState) -> bool,
    ) -> Result<ClientState> {
        let start = Instant::now();
        let mut changed = self.changed.clone();
        loop {
            {
                let state = lock(&self.state);
                if test(&state) {
                    return Ok(state.clone());
                }
            }
            let left = within.saturating_sub(start.elapsed());
            if left.is_zero() {
                return Err(Error::Timeout {
                    what: format!("{}: {what}", self.identity.id),
                    waited: start.elapsed(),
                    last: Some(format!("{:?}", self.state())),
                });
            }
            // A closed sender means the task ended; the state is final then.
            if tokio::time::timeout(left, changed.changed())
                .await
                .is_ok_and(|r| r.is_err())
            {
                let state = lock(&self.state).clone();
                if test(&state) {
                    return Ok(state);
                }
                return Err(Error::Timeout {
                    what: format!("{}: {what}", self.identity.id),
                    waited: start.elapsed(),
                    last: Some(format!("the stream ended: {:?}", state.ended)),
                });
            }
        }
    }

    /// Waits until the client has ACKed a version for which `test` holds; returns it and when it
    /// was ACKed.
    pub async fn acked(
        &self,
        within: Duration,
        test: impl Fn(&str) -> bool,
    ) -> Result<(String, Instant)> {
        let state = self
            .wait(within, "ACK of the expected version", |s| {
                s.acked.as_ref().is_some_and(|(v, _)| test(v))
            })
            .await?;
        state
            .acked
            .ok_or_else(|| unreachable_state(&self.identity.id))
    }
}

fn unreachable_state(id: &str) -> Error {
    Error::Timeout {
        what: format!("{id}: ACK vanished"),
        waited: Duration::ZERO,
        last: None,
    }
}

impl Drop for XdsClient {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An HTTP/2 channel to `addr` (`host:port`).
pub async fn channel(addr: &str) -> Result<Channel> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}")).map_err(|e| Error::Xds {
        what: format!("endpoint {addr}"),
        reason: e.to_string(),
    })?;
    endpoint
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| Error::Xds {
            what: format!("connecting to {addr}"),
            reason: e.to_string(),
        })
}

fn lock(state: &Mutex<ClientState>) -> std::sync::MutexGuard<'_, ClientState> {
    state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn run(
    channel: Channel,
    identity: Identity,
    resource: String,
    verdict: Verdict,
    state: Arc<Mutex<ClientState>>,
    tick: watch::Sender<u64>,
) {
    let bump = |tick: &watch::Sender<u64>| tick.send_modify(|n| *n += 1);
    let end = |reason: String| {
        lock(&state).ended = Some(reason);
        bump(&tick);
    };
    let (tx, rx) = mpsc::channel::<DiscoveryRequest>(4);
    let request = |version: String, nonce: String, error: Option<Status>| DiscoveryRequest {
        version_info: version,
        node: Some(identity.node()),
        resource_names: vec![resource.clone()],
        type_url: TYPED_EXTENSION_CONFIG.into(),
        response_nonce: nonce,
        error_detail: error,
        ..DiscoveryRequest::default()
    };
    if tx
        .send(request(String::new(), String::new(), None))
        .await
        .is_err()
    {
        return end("request stream closed before the first request".into());
    }
    let mut client = ExtensionConfigDiscoveryServiceClient::new(channel);
    let mut responses = match client
        .stream_extension_configs(ReceiverStream::new(rx))
        .await
    {
        Ok(r) => r.into_inner(),
        Err(e) => return end(format!("stream refused: {e}")),
    };
    let mut accepted = String::new();
    loop {
        let response = match responses.message().await {
            Ok(Some(r)) => r,
            Ok(None) => return end("the server closed the stream".into()),
            Err(e) => return end(format!("stream error: {e}")),
        };
        let received = decode(&response, &resource);
        let nack = verdict(&received);
        let reply = match &nack {
            None => {
                accepted = received.version.clone();
                request(accepted.clone(), received.nonce.clone(), None)
            }
            Some(reason) => request(
                accepted.clone(),
                received.nonce.clone(),
                Some(Status {
                    code: tonic::Code::InvalidArgument as i32,
                    message: reason.clone(),
                    details: Vec::new(),
                }),
            ),
        };
        // Record before answering: whoever waits on the ACK must find it recorded once the
        // server has it.
        {
            let mut s = lock(&state);
            match &nack {
                None => {
                    s.acked = Some((received.version.clone(), Instant::now()));
                    s.config = received.config.clone();
                }
                Some(reason) => s.nacks.push((received.nonce.clone(), reason.clone())),
            }
            s.received.push(received);
        }
        bump(&tick);
        if tx.send(reply).await.is_err() {
            return end("request stream closed".into());
        }
    }
}

/// What `response` carries for `resource`.
pub fn decode(response: &DiscoveryResponse, resource: &str) -> Received {
    let mut names = Vec::new();
    let mut config = None;
    let mut undecodable = None;
    if response.type_url != TYPED_EXTENSION_CONFIG {
        undecodable = Some(format!("unexpected type_url {:?}", response.type_url));
    }
    for any in &response.resources {
        match TypedExtensionConfig::decode(any.value.as_slice()) {
            Ok(tec) => {
                names.push(tec.name.clone());
                if tec.name == resource {
                    match filter_config(tec.typed_config.as_ref()) {
                        Ok(c) => config = Some(c),
                        Err(e) => undecodable = Some(e),
                    }
                }
            }
            Err(e) => undecodable = Some(format!("resource is not a TypedExtensionConfig: {e}")),
        }
    }
    if config.is_none() && undecodable.is_none() {
        undecodable = Some(format!("no resource named {resource:?}"));
    }
    Received {
        version: response.version_info.clone(),
        nonce: response.nonce.clone(),
        resources: names,
        config,
        undecodable,
        at: Instant::now(),
    }
}

fn filter_config(any: Option<&Any>) -> std::result::Result<String, String> {
    let any = any.ok_or("no typed_config")?;
    if any.type_url != WASM {
        return Err(format!(
            "typed_config is {:?}, not the Wasm filter",
            any.type_url
        ));
    }
    let wasm = Wasm::decode(any.value.as_slice()).map_err(|e| format!("bad Wasm message: {e}"))?;
    let plugin = wasm.config.ok_or("Wasm filter without config")?;
    let conf = plugin.configuration.ok_or("plugin without configuration")?;
    let value = StringValue::decode(conf.value.as_slice())
        .map_err(|e| format!("configuration is not a StringValue: {e}"))?;
    Ok(value.value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wasm_resource(name: &str, config: &str) -> Any {
        let plugin = envoy_types::pb::envoy::extensions::wasm::v3::PluginConfig {
            name: name.into(),
            configuration: Some(Any {
                type_url: "type.googleapis.com/google.protobuf.StringValue".into(),
                value: StringValue {
                    value: config.into(),
                }
                .encode_to_vec(),
            }),
            ..Default::default()
        };
        let tec = TypedExtensionConfig {
            name: name.into(),
            typed_config: Some(Any {
                type_url: WASM.into(),
                value: Wasm {
                    config: Some(plugin),
                }
                .encode_to_vec(),
            }),
        };
        Any {
            type_url: TYPED_EXTENSION_CONFIG.into(),
            value: tec.encode_to_vec(),
        }
    }

    #[test]
    fn decodes_the_subscribed_filter_and_names_what_it_cannot() {
        let response = DiscoveryResponse {
            version_info: "7".into(),
            nonce: "n1".into(),
            type_url: TYPED_EXTENSION_CONFIG.into(),
            resources: vec![
                wasm_resource("other", "{}"),
                wasm_resource("sluice", "{\"a\":1}"),
            ],
            ..Default::default()
        };
        let r = decode(&response, "sluice");
        assert_eq!(r.config.as_deref(), Some("{\"a\":1}"));
        assert_eq!(r.undecodable, None);
        assert_eq!(r.resources, vec!["other", "sluice"]);

        let r = decode(&response, "missing");
        assert_eq!(
            r.undecodable.as_deref(),
            Some("no resource named \"missing\"")
        );

        let garbage = DiscoveryResponse {
            type_url: TYPED_EXTENSION_CONFIG.into(),
            resources: vec![Any {
                type_url: TYPED_EXTENSION_CONFIG.into(),
                value: vec![0xff, 0xff, 0xff],
            }],
            ..Default::default()
        };
        assert!(decode(&garbage, "sluice")
            .undecodable
            .is_some_and(|e| e.contains("not a TypedExtensionConfig")));
    }
}
