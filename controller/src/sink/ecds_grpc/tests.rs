//! In-process tests: a real server on a loopback port, driven by the client envoy-types
//! generates, speaking the protocol the way Envoy does (and the ways it must not).

use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{
    async_data_source, data_source, Node, TypedExtensionConfig,
};
use envoy_types::pb::envoy::extensions::filters::http::wasm::v3::Wasm;
use envoy_types::pb::envoy::extensions::wasm::v3::plugin_config;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::envoy::service::extension::v3::extension_config_discovery_service_client::ExtensionConfigDiscoveryServiceClient;
use envoy_types::pb::google::protobuf::StringValue;
use envoy_types::pb::google::rpc::Status as RpcStatus;
use prost::Message;
use sluice_filter::config::FilterConfig;
use tokio::sync::{mpsc, watch};
use tonic::transport::Channel;

use super::hub::TYPE_URL;
use super::*;
use crate::sink::ecds_file::WasmCode;

fn config(weight: f64) -> FilterConfig {
    let mut c: FilterConfig = serde_json::from_str(
        r#"{"version": 1, "experiments": [{"name": "e", "unit": {"type": "request"},
            "variants": [{"name": "control"}, {"name": "canary", "weight": 0}]}]}"#,
    )
    .unwrap_or_else(|e| unreachable!("{e}"));
    c.experiments[0].variants[1].weight = Some(weight);
    c
}

fn code() -> WasmCode {
    serde_json::from_value(serde_json::json!({"filename": "/x/sluice_filter.wasm"}))
        .unwrap_or_else(|e| unreachable!("{e}"))
}

/// A server on a free loopback port; dropping the guard stops it.
struct Server {
    hub: Arc<Hub>,
    addr: SocketAddr,
    _stop: watch::Sender<bool>,
}

async fn server(limits: Limits) -> Server {
    let listener = service::bind(
        "127.0.0.1:0"
            .parse()
            .unwrap_or_else(|e| unreachable!("{e}")),
    )
    .await
    .unwrap_or_else(|e| unreachable!("{e}"));
    let addr = listener
        .local_addr()
        .unwrap_or_else(|e| unreachable!("{e}"));
    let hub = Hub::new(limits);
    let (stop, stop_rx) = watch::channel(false);
    tokio::spawn(service::serve(listener, hub.clone(), stop_rx));
    Server {
        hub,
        addr,
        _stop: stop,
    }
}

impl Server {
    fn sink(&self, resource: &str, min_proxies: usize, confirm_within: Duration) -> EcdsGrpc {
        EcdsGrpc {
            hub: self.hub.clone(),
            listen: self.addr,
            resource: resource.into(),
            code: code(),
            min_proxies,
            confirm_within,
        }
    }
}

/// One xDS stream as a proxy holds it.
struct Proxy {
    send: mpsc::Sender<DiscoveryRequest>,
    recv: tonic::Streaming<DiscoveryResponse>,
    node: Node,
    names: Vec<String>,
}

async fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap_or_else(|e| unreachable!("{e}"))
        .connect()
        .await
        .unwrap_or_else(|e| unreachable!("{e}"))
}

fn node(id: &str) -> Node {
    Node {
        id: id.into(),
        cluster: "fleet".into(),
        ..Default::default()
    }
}

impl Proxy {
    /// Opens a stream and sends the first request (node, names, no nonce).
    async fn open(addr: SocketAddr, id: &str, names: &[&str]) -> Proxy {
        Proxy::open_on(channel(addr).await, node(id), names, TYPE_URL).await
    }

    async fn open_on(channel: Channel, node: Node, names: &[&str], type_url: &str) -> Proxy {
        let (send, rx) = mpsc::channel(16);
        let mut client = ExtensionConfigDiscoveryServiceClient::new(channel);
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let first = DiscoveryRequest {
            node: Some(node.clone()),
            resource_names: names.clone(),
            type_url: type_url.into(),
            ..Default::default()
        };
        let _ = send.send(first).await;
        let stream = tokio_stream_from(rx);
        let recv = client
            .stream_extension_configs(stream)
            .await
            .unwrap_or_else(|e| unreachable!("{e}"))
            .into_inner();
        Proxy {
            send,
            recv,
            node,
            names,
        }
    }

    async fn next(&mut self) -> Result<DiscoveryResponse, tonic::Status> {
        match tokio::time::timeout(Duration::from_secs(10), self.recv.message()).await {
            Ok(Ok(Some(r))) => Ok(r),
            Ok(Ok(None)) => Err(tonic::Status::cancelled("stream ended")),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(tonic::Status::deadline_exceeded("no response within 10 s")),
        }
    }

    /// Whether a response arrives within `wait`.
    async fn silent_for(&mut self, wait: Duration) -> bool {
        tokio::time::timeout(wait, self.recv.message())
            .await
            .is_err()
    }

    async fn ack(&self, r: &DiscoveryResponse) {
        self.reply(&r.version_info, &r.nonce, None).await;
    }

    async fn nack(&self, previous: &str, r: &DiscoveryResponse, why: &str) {
        self.reply(previous, &r.nonce, Some(why)).await;
    }

    async fn reply(&self, version: &str, nonce: &str, error: Option<&str>) {
        let req = DiscoveryRequest {
            version_info: version.into(),
            node: Some(self.node.clone()),
            resource_names: self.names.clone(),
            type_url: TYPE_URL.into(),
            response_nonce: nonce.into(),
            error_detail: error.map(|m| RpcStatus {
                code: 3,
                message: m.into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let _ = self.send.send(req).await;
    }
}

fn tokio_stream_from(
    mut rx: mpsc::Receiver<DiscoveryRequest>,
) -> impl futures_util::Stream<Item = DiscoveryRequest> + Send + 'static {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// The filter configuration a response carries for its only resource.
fn carried(r: &DiscoveryResponse) -> (String, FilterConfig, String) {
    assert_eq!(r.type_url, TYPE_URL);
    assert_eq!(r.resources.len(), 1, "{r:?}");
    let any = &r.resources[0];
    assert_eq!(any.type_url, TYPE_URL);
    let tec = TypedExtensionConfig::decode(any.value.as_slice()).unwrap_or_default();
    let wasm_any = tec.typed_config.unwrap_or_default();
    assert_eq!(
        wasm_any.type_url,
        "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"
    );
    let wasm = Wasm::decode(wasm_any.value.as_slice()).unwrap_or_default();
    let plugin = wasm.config.unwrap_or_default();
    let Some(plugin_config::Vm::VmConfig(vm)) = plugin.vm else {
        panic!("no vm_config in {plugin:?}")
    };
    let file = match vm.code.and_then(|c| c.specifier) {
        Some(async_data_source::Specifier::Local(d)) => match d.specifier {
            Some(data_source::Specifier::Filename(f)) => f,
            other => panic!("code {other:?}"),
        },
        other => panic!("code {other:?}"),
    };
    let configuration = plugin.configuration.unwrap_or_default();
    assert_eq!(
        configuration.type_url,
        "type.googleapis.com/google.protobuf.StringValue"
    );
    let json = StringValue::decode(configuration.value.as_slice())
        .unwrap_or_default()
        .value;
    let config: FilterConfig =
        serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {json}"));
    (tec.name, config, file)
}

fn weight(c: &FilterConfig) -> Option<f64> {
    c.experiments[0].variants[1].weight
}

#[tokio::test]
async fn a_push_is_confirmed_when_the_proxy_acks_it() {
    let s = server(Limits::default()).await;
    let mut p = Proxy::open(s.addr, "envoy-1", &["sluice"]).await;
    let sink = s.sink("sluice", 1, Duration::from_secs(10));
    let push = tokio::spawn(async move { sink.push(&config(5.0), 3).await });
    let r = p.next().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.version_info, "3");
    assert!(!r.nonce.is_empty());
    let (name, got, file) = carried(&r);
    assert_eq!(name, "sluice");
    assert_eq!(file, "/x/sluice_filter.wasm");
    assert_eq!(weight(&got), Some(5.0));
    assert!(
        got.revision.as_deref().is_some_and(|v| v.starts_with("3@")),
        "{:?}",
        got.revision
    );
    assert!(!push.is_finished(), "confirmed before the ACK");
    p.ack(&r).await;
    let receipt = push.await.unwrap_or_else(|e| panic!("{e}"));
    assert!(receipt.is_ok(), "{receipt:?}");
    let listed = s.hub.proxies();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, "envoy-1");
    assert_eq!(listed[0].cluster, "fleet");
    assert_eq!(listed[0].acked.get("sluice"), Some(&3));
}

#[tokio::test]
async fn a_nack_fails_the_push_with_the_proxys_message() {
    let s = server(Limits::default()).await;
    let mut good = Proxy::open(s.addr, "envoy-good", &["sluice"]).await;
    let mut bad = Proxy::open(s.addr, "envoy-bad", &["sluice"]).await;
    let sink = s.sink("sluice", 2, Duration::from_secs(10));
    let push = tokio::spawn(async move { sink.push(&config(5.0), 4).await });
    let r = good.next().await.unwrap_or_else(|e| panic!("{e}"));
    good.ack(&r).await;
    let r = bad.next().await.unwrap_or_else(|e| panic!("{e}"));
    bad.nack("", &r, "Unable to create Wasm HTTP filter sluice")
        .await;
    let err = push
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("envoy-bad"), "{err}");
    assert!(
        err.contains("Unable to create Wasm HTTP filter sluice"),
        "{err}"
    );
    assert!(err.contains("version 4"), "{err}");
    let listed = s.hub.proxies();
    let bad = listed.iter().find(|p| p.id == "envoy-bad");
    let nack = bad.and_then(|p| p.last_nack.clone());
    assert_eq!(
        nack.map(|n| n.versions.get("sluice").copied()),
        Some(Some(4))
    );
}

#[tokio::test]
async fn a_proxy_that_connects_later_gets_the_current_config_at_once() {
    let s = server(Limits::default()).await;
    let mut first = Proxy::open(s.addr, "envoy-1", &["sluice"]).await;
    let sink = s.sink("sluice", 1, Duration::from_secs(10));
    let pushing = sink.clone();
    let push = tokio::spawn(async move { pushing.push(&config(10.0), 7).await });
    let r = first.next().await.unwrap_or_else(|e| panic!("{e}"));
    first.ack(&r).await;
    assert!(push.await.unwrap_or_else(|e| panic!("{e}")).is_ok());
    drop(first);
    // Reconnecting with the same id, and a new proxy: both served without another push.
    for id in ["envoy-1", "envoy-2"] {
        let mut p = Proxy::open(s.addr, id, &["sluice"]).await;
        let r = p.next().await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.version_info, "7");
        assert_eq!(weight(&carried(&r).1), Some(10.0));
        p.ack(&r).await;
        // The sink checks it in force once the proxy ACKed.
        let mut found = Some(String::new());
        for _ in 0..200 {
            found = sink
                .in_force(&config(10.0), 7)
                .await
                .unwrap_or(Some("err".into()));
            if found.is_none() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(found, None);
    }
}

#[tokio::test]
async fn unknown_resources_get_no_response_and_stale_nonces_confirm_nothing() {
    let s = server(Limits::default()).await;
    let mut other = Proxy::open(s.addr, "envoy-other", &["not-served"]).await;
    let mut p = Proxy::open(s.addr, "envoy-1", &["sluice"]).await;
    let sink = s.sink("sluice", 1, Duration::from_millis(600));
    let pushing = sink.clone();
    let push = tokio::spawn(async move { pushing.push(&config(1.0), 1).await });
    let first = p.next().await.unwrap_or_else(|e| panic!("{e}"));
    p.ack(&first).await;
    assert!(push.await.unwrap_or_else(|e| panic!("{e}")).is_ok());
    assert!(other.silent_for(Duration::from_millis(200)).await);

    let pushing = sink.clone();
    let push = tokio::spawn(async move { pushing.push(&config(5.0), 2).await });
    let second = p.next().await.unwrap_or_else(|e| panic!("{e}"));
    assert_ne!(second.nonce, first.nonce);
    // An ACK of the new version under the old nonce is stale: ignored.
    p.reply(&second.version_info, &first.nonce, None).await;
    let err = push
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.contains("envoy-1") && err.contains("did not confirm"),
        "{err}"
    );
    assert!(err.contains("version in force: 1"), "{err}");
    // The proxy subscribed to another name is neither waited for nor counted.
    assert!(!err.contains("envoy-other"), "{err}");
}
