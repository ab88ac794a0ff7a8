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

pub(super) fn config(weight: f64) -> FilterConfig {
    let mut c: FilterConfig = serde_json::from_str(
        r#"{"version": 1, "experiments": [{"name": "e", "unit": {"type": "request"},
            "variants": [{"name": "control"}, {"name": "canary", "weight": 0}]}]}"#,
    )
    .unwrap();
    c.experiments[0].variants[1].weight = Some(weight);
    c
}

pub(super) fn code() -> WasmCode {
    serde_json::from_value(serde_json::json!({"filename": "/x/sluice_filter.wasm"})).unwrap()
}

/// A server on a free loopback port; dropping the guard stops it.
struct Server {
    hub: Arc<Hub>,
    addr: SocketAddr,
    _stop: watch::Sender<bool>,
}

async fn server(limits: Limits) -> Server {
    let listener = service::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hub = Hub::new(limits);
    let (stop, stop_rx) = watch::channel(false);
    tokio::spawn(service::serve(listener, hub.clone(), stop_rx, None));
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
            tls: false,
        }
    }
}

/// One xDS stream as a proxy holds it.
pub(super) struct Proxy {
    send: mpsc::Sender<DiscoveryRequest>,
    recv: tonic::Streaming<DiscoveryResponse>,
    node: Node,
    names: Vec<String>,
}

async fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

pub(super) fn node(id: &str) -> Node {
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

    pub(super) async fn open_on(
        channel: Channel,
        node: Node,
        names: &[&str],
        type_url: &str,
    ) -> Proxy {
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
            .unwrap()
            .into_inner();
        Proxy {
            send,
            recv,
            node,
            names,
        }
    }

    pub(super) async fn next(&mut self) -> Result<DiscoveryResponse, tonic::Status> {
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

    pub(super) async fn ack(&self, r: &DiscoveryResponse) {
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

pub(super) fn tokio_stream_from(
    mut rx: mpsc::Receiver<DiscoveryRequest>,
) -> impl futures_util::Stream<Item = DiscoveryRequest> + Send + 'static {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// The filter configuration a response carries for its only resource.
pub(super) fn carried(r: &DiscoveryResponse) -> (String, FilterConfig, String) {
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

pub(super) fn weight(c: &FilterConfig) -> Option<f64> {
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

#[tokio::test]
async fn a_slow_reader_is_sent_the_newest_config_not_every_one_it_missed() {
    let s = server(Limits::default()).await;
    // A proxy with a small window that does not read for a while.
    let ch = Channel::from_shared(format!("http://{}", s.addr))
        .unwrap()
        .initial_stream_window_size(Some(65_535))
        .initial_connection_window_size(Some(65_535))
        .connect()
        .await
        .unwrap();
    let mut p = Proxy::open_on(ch, node("slow"), &["sluice"], TYPE_URL).await;
    let mut big = code();
    big.filename = format!("/x/{}.wasm", "a".repeat(8 * 1024));
    let sets = 300;
    for v in 1..=sets {
        let mut c = config(1.0);
        c.revision = Some(format!("{v}@0"));
        let any = render("sluice", &big, &c).unwrap_or_else(|e| panic!("{e}"));
        s.hub.set("sluice", v, config(1.0), any);
        // Let the writer run between sets, as pushes spaced in time would.
        for _ in 0..4 {
            tokio::task::yield_now().await;
        }
    }
    let mut received = 0;
    let mut last = String::new();
    while last != sets.to_string() {
        let r = p.next().await.unwrap_or_else(|e| panic!("{e}"));
        received += 1;
        last = r.version_info;
    }
    // 300 responses of 8 KiB would be 2.4 MB: the window holds a few, the rest are skipped.
    assert!(
        received < sets / 4,
        "{received} responses for {sets} versions"
    );
}

#[tokio::test]
async fn protocol_violations_end_only_the_offending_stream() {
    let s = server(Limits::default()).await;
    let sink = s.sink("sluice", 1, Duration::from_secs(10));
    let mut good = Proxy::open(s.addr, "envoy-good", &["sluice"]).await;

    let mut wrong_type = Proxy::open_on(
        channel(s.addr).await,
        node("t"),
        &["sluice"],
        "type.googleapis.com/envoy.config.cluster.v3.Cluster",
    )
    .await;
    let e = wrong_type
        .next()
        .await
        .err()
        .unwrap_or_else(|| panic!("served a wrong type"));
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    assert!(e.message().contains("type_url"), "{e}");

    let mut nameless = Proxy::open_on(
        channel(s.addr).await,
        Node::default(),
        &["sluice"],
        TYPE_URL,
    )
    .await;
    let e = nameless
        .next()
        .await
        .err()
        .unwrap_or_else(|| panic!("served a proxy without a node"));
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    assert!(e.message().contains("node"), "{e}");

    let many: Vec<String> = (0..1000).map(|i| format!("r{i}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    let mut greedy = Proxy::open_on(channel(s.addr).await, node("g"), &many, TYPE_URL).await;
    let e = greedy
        .next()
        .await
        .err()
        .unwrap_or_else(|| panic!("took 1000 names"));
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");

    let long = "n".repeat(1000);
    let mut long_name =
        Proxy::open_on(channel(s.addr).await, node(&long), &["sluice"], TYPE_URL).await;
    let e = long_name
        .next()
        .await
        .err()
        .unwrap_or_else(|| panic!("took a 1 kB node id"));
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");

    let huge = "n".repeat(100_000);
    let mut huge_name =
        Proxy::open_on(channel(s.addr).await, node(&huge), &["sluice"], TYPE_URL).await;
    let e = huge_name
        .next()
        .await
        .err()
        .unwrap_or_else(|| panic!("took a 100 kB request"));
    assert_eq!(e.code(), tonic::Code::OutOfRange, "{e}");
    assert!(e.message().contains("too large"), "{e}");

    // Bytes that are no DiscoveryRequest (a version_info that is not UTF-8).
    #[derive(Clone, PartialEq, prost::Message)]
    struct Garbage {
        #[prost(bytes = "vec", tag = "1")]
        junk: Vec<u8>,
    }
    let mut raw = tonic::client::Grpc::new(channel(s.addr).await);
    raw.ready().await.unwrap_or_else(|e| panic!("{e}"));
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(
        "/envoy.service.extension.v3.ExtensionConfigDiscoveryService/StreamExtensionConfigs",
    );
    let junk = futures_util::stream::iter(vec![Garbage {
        junk: vec![0xff, 0xfe, 0x00],
    }]);
    let answer = raw
        .streaming(
            tonic::Request::new(junk),
            path,
            tonic_prost::ProstCodec::<Garbage, DiscoveryResponse>::default(),
        )
        .await;
    let ended = match answer {
        Err(_) => true,
        Ok(r) => {
            let mut r = r.into_inner();
            matches!(
                tokio::time::timeout(Duration::from_secs(10), r.message()).await,
                Ok(Err(_) | Ok(None))
            )
        }
    };
    assert!(ended, "garbage was answered");

    // None of it counts as a proxy, and the good one is served and confirms.
    let push = tokio::spawn(async move { sink.push(&config(5.0), 1).await });
    let r = good.next().await.unwrap_or_else(|e| panic!("{e}"));
    good.ack(&r).await;
    assert!(push.await.unwrap_or_else(|e| panic!("{e}")).is_ok());
    let mut ids: Vec<String> = s.hub.proxies().into_iter().map(|p| p.id).collect();
    ids.dedup();
    assert_eq!(ids, ["envoy-good"]);
}

#[tokio::test]
async fn every_stream_of_a_shared_node_id_must_ack() {
    let s = server(Limits::default()).await;
    // Two proxies with one bootstrap's id (or one proxy's old and new connection).
    let mut old = Proxy::open(s.addr, "envoy-1", &["sluice"]).await;
    let mut new = Proxy::open(s.addr, "envoy-1", &["sluice"]).await;
    let sink = s.sink("sluice", 1, Duration::from_millis(500));
    let pushing = sink.clone();
    let push = tokio::spawn(async move { pushing.push(&config(1.0), 1).await });
    let r = new.next().await.unwrap_or_else(|e| panic!("{e}"));
    new.ack(&r).await;
    let r_old = old.next().await.unwrap_or_else(|e| panic!("{e}"));
    // The other one never answers: the push is not confirmed.
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
    // Once it ACKs too, the check in force passes; once it is gone, a push needs only the other.
    old.ack(&r_old).await;
    let mut found = Some(String::new());
    for _ in 0..200 {
        found = sink
            .in_force(&config(1.0), 1)
            .await
            .unwrap_or(Some("err".into()));
        if found.is_none() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(found, None);
    drop(old);
    while s.hub.proxies().len() > 1 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let pushing = sink.clone();
    let push = tokio::spawn(async move { pushing.push(&config(5.0), 2).await });
    let r = new.next().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.version_info, "2");
    new.ack(&r).await;
    let done = push.await.unwrap_or_else(|e| panic!("{e}"));
    assert!(done.is_ok(), "{done:?}");
}

#[tokio::test]
async fn fewer_connected_proxies_than_min_proxies_is_unconfirmed() {
    let s = server(Limits::default()).await;
    let mut p = Proxy::open(s.addr, "envoy-1", &["sluice"]).await;
    let sink = s.sink("sluice", 2, Duration::from_millis(500));
    let push = tokio::spawn(async move { sink.push(&config(5.0), 1).await });
    let r = p.next().await.unwrap_or_else(|e| panic!("{e}"));
    p.ack(&r).await;
    let err = push
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.contains("1 proxies connected") && err.contains("minProxies 2"),
        "{err}"
    );
    // The same proxy twice (two streams) still counts once.
    let mut again = Proxy::open(s.addr, "envoy-1", &["sluice"]).await;
    let r = again.next().await.unwrap_or_else(|e| panic!("{e}"));
    again.ack(&r).await;
    let sink = s.sink("sluice", 2, Duration::from_millis(500));
    assert!(sink.push(&config(5.0), 2).await.is_err());
}

#[tokio::test]
async fn one_stream_may_subscribe_to_several_rollouts_resources() {
    let s = server(Limits::default()).await;
    let a = s.sink("a", 1, Duration::from_secs(10));
    let b = s.sink("b", 1, Duration::from_secs(10));
    let mut p = Proxy::open(s.addr, "envoy-1", &["a", "b"]).await;
    let pushing = a.clone();
    let push = tokio::spawn(async move { pushing.push(&config(1.0), 3).await });
    let r = p.next().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.version_info, "3");
    p.ack(&r).await;
    assert!(push.await.unwrap_or_else(|e| panic!("{e}")).is_ok());
    let push = tokio::spawn(async move { b.push(&config(2.0), 8).await });
    let r = p.next().await.unwrap_or_else(|e| panic!("{e}"));
    // State of the world for the subscribed names: both resources, each at its version.
    assert_eq!(r.version_info, "a=3,b=8");
    let names: Vec<String> = r
        .resources
        .iter()
        .map(|a| {
            TypedExtensionConfig::decode(a.value.as_slice())
                .unwrap_or_default()
                .name
        })
        .collect();
    assert_eq!(names, ["a", "b"]);
    p.ack(&r).await;
    assert!(push.await.unwrap_or_else(|e| panic!("{e}")).is_ok());
}

#[tokio::test]
async fn a_thousand_streams_are_served_and_confirm_one_push() {
    let s = server(Limits::default()).await;
    let mut proxies = Vec::new();
    // Four connections of 250 streams each.
    for c in 0..4 {
        let ch = channel(s.addr).await;
        for i in 0..250 {
            proxies.push(
                Proxy::open_on(
                    ch.clone(),
                    node(&format!("p{c}-{i}")),
                    &["sluice"],
                    TYPE_URL,
                )
                .await,
            );
        }
    }
    let sink = s.sink("sluice", 1000, Duration::from_secs(60));
    let push = tokio::spawn(async move { sink.push(&config(5.0), 1).await });
    let acks = proxies.into_iter().map(|mut p| {
        tokio::spawn(async move {
            let r = p.next().await?;
            p.ack(&r).await;
            Ok::<_, tonic::Status>(p)
        })
    });
    let acked = futures_util::future::join_all(acks).await;
    assert!(acked.iter().all(|a| matches!(a, Ok(Ok(_)))));
    let done = push.await.unwrap_or_else(|e| panic!("{e}"));
    assert!(done.is_ok(), "{done:?}");
    assert_eq!(s.hub.proxies().len(), 1000);
}

#[tokio::test]
async fn stopping_the_server_ends_the_streams() {
    let mut s = server(Limits::default()).await;
    let mut p = Proxy::open(s.addr, "envoy-1", &["sluice"]).await;
    let push = s.sink("sluice", 1, Duration::from_secs(10));
    let pushing = tokio::spawn(async move { push.push(&config(1.0), 1).await });
    let r = p.next().await.unwrap_or_else(|e| panic!("{e}"));
    p.ack(&r).await;
    assert!(pushing.await.unwrap_or_else(|e| panic!("{e}")).is_ok());
    let (stop, _) = watch::channel(false);
    let old = std::mem::replace(&mut s._stop, stop);
    let _ = old.send(true);
    let e = p.next().await.err().map(|e| e.code());
    assert!(
        matches!(
            e,
            Some(tonic::Code::Cancelled | tonic::Code::Unavailable | tonic::Code::Unknown)
        ),
        "{e:?}"
    );
}

#[tokio::test]
async fn rollouts_on_one_listen_share_a_server_and_a_taken_port_is_a_clear_error() {
    let (_stop, stop_rx) = watch::channel(false);
    let servers = Servers::new(stop_rx, Limits::default());
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let err = servers
        .hub(addr)
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.contains(&addr.to_string()) && err.contains("ecdsGrpc"),
        "{err}"
    );
    drop(taken);
    let one = servers.hub(addr).await.unwrap_or_else(|e| panic!("{e}"));
    let two = servers.hub(addr).await.unwrap_or_else(|e| panic!("{e}"));
    assert!(Arc::ptr_eq(&one, &two));
    assert_eq!(servers.proxies().len(), 1);
}

#[test]
fn remote_code_is_rendered_as_an_http_fetch_pinned_by_sha256() {
    let mut code = code();
    code.filename.clear();
    code.remote = Some(crate::sink::ecds_file::RemoteCode {
        uri: "http://sluice.sluice-system:8080/sluice_filter.wasm".into(),
        cluster: "outbound|8080||sluice.sluice-system.svc.cluster.local".into(),
        sha256: "ab".repeat(32),
        timeout_secs: 30,
    });
    let any = render("sluice", &code, &config(1.0)).unwrap_or_else(|e| panic!("{e}"));
    let tec = TypedExtensionConfig::decode(any.value.as_slice()).unwrap_or_default();
    let wasm =
        Wasm::decode(tec.typed_config.unwrap_or_default().value.as_slice()).unwrap_or_default();
    let Some(plugin_config::Vm::VmConfig(vm)) = wasm.config.unwrap_or_default().vm else {
        panic!("no vm_config")
    };
    let Some(async_data_source::Specifier::Remote(remote)) = vm.code.and_then(|c| c.specifier)
    else {
        panic!("not remote")
    };
    assert_eq!(remote.sha256, "ab".repeat(32));
    let uri = remote.http_uri.unwrap_or_default();
    assert_eq!(
        uri.uri,
        "http://sluice.sluice-system:8080/sluice_filter.wasm"
    );
    assert_eq!(uri.timeout.map(|t| t.seconds), Some(30));
    assert_eq!(
        uri.http_upstream_type,
        Some(
            envoy_types::pb::envoy::config::core::v3::http_uri::HttpUpstreamType::Cluster(
                "outbound|8080||sluice.sluice-system.svc.cluster.local".into()
            )
        )
    );
    // The file sink renders the same source in Envoy's JSON form.
    let text = crate::sink::ecds_file::render("sluice", &code, &config(1.0), 1).unwrap_or_default();
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    let source = &doc["resources"][0]["typed_config"]["config"]["vm_config"]["code"]["remote"];
    assert_eq!(source["sha256"], "ab".repeat(32));
    assert_eq!(source["http_uri"]["timeout"], "30s");
    assert_eq!(
        source["http_uri"]["cluster"],
        "outbound|8080||sluice.sluice-system.svc.cluster.local"
    );
}

#[tokio::test]
async fn status_lists_each_proxy_with_its_acked_version_and_last_nack() {
    let s = server(Limits::default()).await;
    let mut good = Proxy::open(s.addr, "envoy-good", &["sluice"]).await;
    let mut bad = Proxy::open(s.addr, "envoy-bad", &["sluice"]).await;
    let sink = s.sink("sluice", 2, Duration::from_secs(10));
    let pushing = sink.clone();
    let push = tokio::spawn(async move { pushing.push(&config(1.0), 1).await });
    let (r, r2) = (good.next().await, bad.next().await);
    let (r, r2) = (
        r.unwrap_or_else(|e| panic!("{e}")),
        r2.unwrap_or_else(|e| panic!("{e}")),
    );
    good.ack(&r).await;
    bad.ack(&r2).await;
    assert!(push.await.unwrap_or_else(|e| panic!("{e}")).is_ok());
    let pushing = sink.clone();
    let push = tokio::spawn(async move { pushing.push(&config(5.0), 2).await });
    let (r, r2) = (good.next().await, bad.next().await);
    let (r, r2) = (
        r.unwrap_or_else(|e| panic!("{e}")),
        r2.unwrap_or_else(|e| panic!("{e}")),
    );
    good.ack(&r).await;
    bad.nack("1", &r2, "wasm: bad weights").await;
    assert!(push.await.unwrap_or_else(|e| panic!("{e}")).is_err());
    let status = serde_json::json!({ "proxies": [sink.proxies()] });
    let lines = crate::cli::proxy_lines(&status);
    assert_eq!(
        lines[0],
        format!(
            "ecdsGrpc {} \"sluice\": serving version 2, 2 proxies connected, 1 ACKed it",
            s.addr
        )
    );
    assert!(
        lines.contains(
            &"  envoy-bad (fleet): ACKed version 1; last NACK (version 2): wasm: bad weights"
                .to_string()
        ),
        "{lines:?}"
    );
    assert!(
        lines.contains(&"  envoy-good (fleet): ACKed version 2".to_string()),
        "{lines:?}"
    );
    let since = &status["proxies"][0]["proxies"][0]["connected_since"];
    assert!(
        since.as_u64().is_some_and(|ms| ms > 1_700_000_000_000),
        "{since}"
    );
    let mut st = crate::daemon::Status::stopped("r", vec![1.0], "x".into());
    st.proxies = vec![sink.proxies()];
    let text = crate::api::metrics(&[st]);
    let labels = format!("rollout=\"r\",resource=\"sluice\",listen=\"{}\"", s.addr);
    assert!(
        text.contains(&format!("sluice_rollout_ecds_proxies{{{labels}}} 2\n")),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "sluice_rollout_ecds_proxies_current{{{labels}}} 1\n"
        )),
        "{text}"
    );
}

/// A TCP relay to `to` that forwards until frozen, then holds both connections open and
/// silent: a peer that vanished without closing its connection.
async fn relay(to: SocketAddr) -> (SocketAddr, Arc<std::sync::atomic::AtomicBool>) {
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let frozen = Arc::new(AtomicBool::new(false));
    let f = frozen.clone();
    tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            let Ok(outbound) = tokio::net::TcpStream::connect(to).await else {
                return;
            };
            let (ri, wi) = inbound.into_split();
            let (ro, wo) = outbound.into_split();
            for (mut r, mut w, f) in [
                (
                    Box::new(ri) as Box<dyn tokio::io::AsyncRead + Send + Unpin>,
                    Box::new(wo) as Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
                    f.clone(),
                ),
                (
                    Box::new(ro) as Box<dyn tokio::io::AsyncRead + Send + Unpin>,
                    Box::new(wi) as Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
                    f.clone(),
                ),
            ] {
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        let n = match r.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        if f.load(Ordering::SeqCst) {
                            // Keep both ends open, answer nothing.
                            std::future::pending::<()>().await;
                        }
                        if w.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        }
    });
    (addr, frozen)
}

#[tokio::test]
async fn a_proxy_that_vanished_without_closing_is_dropped_by_keepalive() {
    let limits = Limits {
        keepalive: Duration::from_millis(500),
        ..Limits::default()
    };
    let s = server(limits).await;
    let (via, frozen) = relay(s.addr).await;
    let mut gone = Proxy::open(via, "envoy-gone", &["sluice"]).await;
    let mut live = Proxy::open(s.addr, "envoy-live", &["sluice"]).await;
    let sink = s.sink("sluice", 1, Duration::from_secs(30));
    let pushing = sink.clone();
    let push = tokio::spawn(async move { pushing.push(&config(1.0), 1).await });
    for p in [&mut gone, &mut live] {
        let r = p.next().await.unwrap_or_else(|e| panic!("{e}"));
        p.ack(&r).await;
    }
    assert!(push.await.unwrap_or_else(|e| panic!("{e}")).is_ok());
    frozen.store(true, std::sync::atomic::Ordering::SeqCst);
    let pushing = sink.clone();
    let push = tokio::spawn(async move { pushing.push(&config(5.0), 2).await });
    let r = live.next().await.unwrap_or_else(|e| panic!("{e}"));
    live.ack(&r).await;
    // Confirmed once the silent connection is dropped (well before confirmWithin).
    let done = push.await.unwrap_or_else(|e| panic!("{e}"));
    assert!(done.is_ok(), "{done:?}");
    let ids: Vec<String> = s.hub.proxies().into_iter().map(|p| p.id).collect();
    assert_eq!(ids, ["envoy-live"]);
}

#[tokio::test]
async fn a_nack_counts_even_if_the_proxy_disconnects_right_after() {
    let s = server(Limits::default()).await;
    let mut good = Proxy::open(s.addr, "envoy-good", &["sluice"]).await;
    let mut bad = Proxy::open(s.addr, "envoy-bad", &["sluice"]).await;
    // Both served before the push: the NACK and the disconnect come before the good ACK.
    while s.hub.proxies().len() < 2 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let sink = s.sink("sluice", 1, Duration::from_secs(10));
    let push = tokio::spawn(async move { sink.push(&config(5.0), 9).await });
    let r = bad.next().await.unwrap_or_else(|e| panic!("{e}"));
    bad.nack("", &r, "no such cluster: shadow").await;
    // Dropped once the server has the NACK (dropping first could cancel it in flight).
    while !s.hub.proxies().iter().any(|p| p.last_nack.is_some()) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    drop(bad);
    while s.hub.proxies().len() > 1 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let r = good.next().await.unwrap_or_else(|e| panic!("{e}"));
    good.ack(&r).await;
    let err = push
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.contains("envoy-bad") && err.contains("no such cluster: shadow"),
        "{err}"
    );
}

fn request(node_id: &str, names: &[&str], version: &str, nonce: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        version_info: version.into(),
        node: Some(node(node_id)),
        resource_names: names.iter().map(|n| n.to_string()).collect(),
        type_url: TYPE_URL.into(),
        response_nonce: nonce.into(),
        ..Default::default()
    }
}

#[test]
fn a_proxy_is_a_straggler_only_once_it_had_time_to_ack() {
    let hub = Hub::new(Limits::default());
    let any = render("sluice", &code(), &config(1.0)).unwrap_or_else(|e| panic!("{e}"));
    hub.set("sluice", 4, config(1.0), any);
    let (conn, _) = hub.connect();
    assert!(hub.receive(conn, request("p", &["sluice"], "", "")).is_ok());
    // Just identified, not yet sent anything: not a straggler within the grace.
    assert_eq!(
        hub.stragglers("sluice", Duration::from_secs(60)),
        Vec::<String>::new()
    );
    let found = hub.stragglers("sluice", Duration::ZERO);
    assert_eq!(
        found,
        ["proxy \"p\" (cluster \"fleet\") serves version none, not the confirmed 4"]
    );
    let sent = hub.next_response(conn).ok().flatten().unwrap_or_default();
    assert_eq!(sent.version_info, "4");
    assert_eq!(hub.next_response(conn).ok().flatten(), None, "sent twice");
    assert_eq!(
        hub.stragglers("sluice", Duration::from_secs(60)),
        Vec::<String>::new()
    );
    assert_eq!(hub.stragglers("sluice", Duration::ZERO).len(), 1);
    assert!(hub
        .receive(conn, request("p", &["sluice"], "4", &sent.nonce))
        .is_ok());
    assert_eq!(
        hub.stragglers("sluice", Duration::ZERO),
        Vec::<String>::new()
    );
    // A NACK of the next one is reported at once, grace or not.
    let any = render("sluice", &code(), &config(5.0)).unwrap_or_else(|e| panic!("{e}"));
    hub.set("sluice", 5, config(5.0), any);
    let sent = hub.next_response(conn).ok().flatten().unwrap_or_default();
    let mut nack = request("p", &["sluice"], "4", &sent.nonce);
    nack.error_detail = Some(RpcStatus {
        code: 3,
        message: "bad".into(),
        ..Default::default()
    });
    assert!(hub.receive(conn, nack).is_ok());
    assert_eq!(
        hub.stragglers("sluice", Duration::from_secs(60)),
        ["proxy \"p\" (cluster \"fleet\") rejected version 5: bad"]
    );
}

#[test]
fn what_is_kept_per_proxy_is_bounded() {
    use envoy_types::pb::google::protobuf::{value::Kind, ListValue, Struct, Value};
    let limits = Limits::default();
    let hub = Hub::new(limits);
    let (conn, _) = hub.connect();
    // Metadata of 1,000 long fields, nested deep: kept as at most metadata_bytes.
    let mut deep = Value {
        kind: Some(Kind::StringValue("x".repeat(10_000))),
    };
    for _ in 0..100 {
        deep = Value {
            kind: Some(Kind::ListValue(ListValue { values: vec![deep] })),
        };
    }
    let fields = (0..1_000)
        .map(|i| (format!("key-{i}"), deep.clone()))
        .collect();
    let mut req = request("p", &["sluice"], "", "");
    if let Some(n) = req.node.as_mut() {
        n.metadata = Some(Struct { fields });
    }
    assert!(hub.receive(conn, req).is_ok());
    let any = render("sluice", &code(), &config(1.0)).unwrap_or_else(|e| panic!("{e}"));
    hub.set("sluice", 1, config(1.0), any);
    let sent = hub.next_response(conn).ok().flatten().unwrap_or_default();
    let mut nack = request("p", &["sluice"], "", &sent.nonce);
    nack.error_detail = Some(RpcStatus {
        code: 3,
        message: "e".repeat(1_000_000),
        ..Default::default()
    });
    assert!(hub.receive(conn, nack).is_ok());
    let listed = hub.proxies();
    assert!(
        listed[0].metadata.len() <= limits.metadata_bytes + 4,
        "{}",
        listed[0].metadata.len()
    );
    assert!(
        listed[0].metadata.starts_with("{\"key-"),
        "{}",
        &listed[0].metadata[..20]
    );
    let detail = listed[0].last_nack.as_ref().map_or(0, |n| n.detail.len());
    assert!(detail <= limits.detail_bytes + 4, "{detail}");
}

#[tokio::test]
async fn a_proxy_gone_between_response_and_ack_neither_blocks_nor_counts() {
    let s = server(Limits::default()).await;
    let mut stays = Proxy::open(s.addr, "envoy-stays", &["sluice"]).await;
    let mut goes = Proxy::open(s.addr, "envoy-goes", &["sluice"]).await;
    while s.hub.proxies().len() < 2 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let two = s.sink("sluice", 2, Duration::from_millis(800));
    let push = tokio::spawn(async move { two.push(&config(5.0), 1).await });
    let r = goes.next().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.version_info, "1");
    drop(goes);
    let r = stays.next().await.unwrap_or_else(|e| panic!("{e}"));
    stays.ack(&r).await;
    // minProxies 2: one left is too few; minProxies 1: the one left confirms.
    let err = push
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.contains("1 proxies connected") && err.contains("minProxies 2"),
        "{err}"
    );
    let one = s.sink("sluice", 1, Duration::from_secs(10));
    let pushing = one.clone();
    let push = tokio::spawn(async move { pushing.push(&config(5.0), 2).await });
    let r = stays.next().await.unwrap_or_else(|e| panic!("{e}"));
    stays.ack(&r).await;
    assert!(push.await.unwrap_or_else(|e| panic!("{e}")).is_ok());
    // Back, it is sent the current version at once.
    let mut back = Proxy::open(s.addr, "envoy-goes", &["sluice"]).await;
    let r = back.next().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.version_info, "2");
}

#[tokio::test]
async fn a_stream_that_never_sends_a_request_is_closed() {
    let limits = Limits {
        first_request: Duration::from_millis(300),
        ..Limits::default()
    };
    let s = server(limits).await;
    let mut client = ExtensionConfigDiscoveryServiceClient::new(channel(s.addr).await);
    let silent = futures_util::stream::pending::<DiscoveryRequest>();
    let answer = client.stream_extension_configs(silent).await;
    let code = match answer {
        Err(e) => Some(e.code()),
        Ok(r) => {
            let mut r = r.into_inner();
            match tokio::time::timeout(Duration::from_secs(10), r.message()).await {
                Ok(Err(e)) => Some(e.code()),
                _ => None,
            }
        }
    };
    assert_eq!(code, Some(tonic::Code::DeadlineExceeded));
    for _ in 0..500 {
        if s.hub.streams() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(s.hub.streams(), 0, "the silent stream is still held");
}

#[test]
fn requests_that_change_nothing_wake_no_one() {
    let hub = Hub::new(Limits::default());
    let any = render("sluice", &code(), &config(1.0)).unwrap_or_else(|e| panic!("{e}"));
    hub.set("sluice", 1, config(1.0), any);
    let (conn, _) = hub.connect();
    let mut events = hub.events();
    events.borrow_and_update();
    assert!(hub.receive(conn, request("p", &["sluice"], "", "")).is_ok());
    assert!(events.has_changed().unwrap_or(false), "identifying is news");
    events.borrow_and_update();
    let sent = hub.next_response(conn).ok().flatten().unwrap_or_default();
    for _ in 0..1000 {
        assert!(hub
            .receive(conn, request("p", &["sluice"], "1", "stale"))
            .is_ok());
    }
    assert!(
        !events.has_changed().unwrap_or(true),
        "stale nonces woke the pushes"
    );
    assert!(hub
        .receive(conn, request("p", &["sluice"], "1", &sent.nonce))
        .is_ok());
    assert!(events.has_changed().unwrap_or(false), "an ACK is news");
}
