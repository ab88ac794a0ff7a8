//! The server over TLS with certificates made here: who gets the configuration (and its
//! secret), who is refused, and what `sluice validate` says about bad files.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use envoy_types::pb::envoy::service::extension::v3::extension_config_discovery_service_client::ExtensionConfigDiscoveryServiceClient;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use super::super::hub::TYPE_URL;
use super::super::tests::{carried, code, config, node, tokio_stream_from, weight, Proxy};
use super::super::{EcdsGrpc, Limits, Servers};
use super::*;
use crate::sink::Sink;

const SECRET: &str = "tls-test-secret-0123456789abcdef";

struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

fn new_ca(name: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let cert = params.self_signed(&key).unwrap();
    Ca {
        issuer: Issuer::new(params, key),
        pem: cert.pem(),
    }
}

/// A certificate and its key (PEM) for `names`, signed by `ca`, for a server or a client.
fn leaf(ca: &Ca, names: &[&str], server: bool) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let mut params =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    params.extended_key_usages = vec![if server {
        ExtendedKeyUsagePurpose::ServerAuth
    } else {
        ExtendedKeyUsagePurpose::ClientAuth
    }];
    let cert = params.signed_by(&key, &ca.issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// A directory of PEM files, removed on drop.
struct Files(PathBuf);

impl Files {
    fn new(tag: &str) -> Files {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("sluice-tls-{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Files(dir)
    }

    fn put(&self, name: &str, content: &str) -> String {
        let path = self.0.join(name);
        std::fs::write(&path, content).unwrap();
        path.display().to_string()
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The CA proxies' certificates come from, one no proxy should use, and the server's files.
struct Pki {
    ca: Ca,
    other: Ca,
    files: Files,
    spec: TlsSpec,
}

fn pki(tag: &str, mutual: bool) -> Pki {
    let ca = new_ca("sluice test CA");
    let other = new_ca("another CA");
    let files = Files::new(tag);
    let (cert, key) = leaf(&ca, &["localhost", "127.0.0.1"], true);
    let spec = TlsSpec {
        cert_file: files.put("server.pem", &cert),
        key_file: files.put("server-key.pem", &key),
        client_ca_file: mutual.then(|| files.put("ca.pem", &ca.pem)),
    };
    Pki {
        ca,
        other,
        files,
        spec,
    }
}

fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// A server started the way `sluice run` starts it, serving version 7 with the secret.
struct Running {
    servers: Servers,
    sink: EcdsGrpc,
    _stop: watch::Sender<bool>,
}

async fn running(spec: &TlsSpec) -> Running {
    let (stop, stop_rx) = watch::channel(false);
    let servers = Servers::new(stop_rx, Limits::default());
    let addr = free_addr();
    let hub = servers
        .join(addr, Some(spec), "r")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let sink = EcdsGrpc {
        hub,
        listen: addr,
        resource: "sluice".into(),
        code: code(),
        min_proxies: 1,
        confirm_within: Duration::from_secs(10),
        tls: true,
    };
    Running {
        servers,
        sink,
        _stop: stop,
    }
}

fn secret_config(w: f64) -> sluice_filter::config::FilterConfig {
    let mut c = config(w);
    c.secret = Some(SECRET.into());
    c
}

fn client_tls(ca_pem: &str, identity: Option<&(String, String)>) -> ClientTlsConfig {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name("localhost");
    match identity {
        Some((cert, key)) => tls.identity(Identity::from_pem(cert, key)),
        None => tls,
    }
}

/// Connects over TLS, opens a stream, subscribes and waits for the first response; every
/// step bounded, any failure returned.
async fn first_response(addr: SocketAddr, tls: ClientTlsConfig) -> Result<String, String> {
    let attempt = async {
        let channel = Channel::from_shared(format!("https://localhost:{}", addr.port()))
            .map_err(|e| e.to_string())?
            .tls_config(tls)
            .map_err(|e| e.to_string())?
            .connect()
            .await
            .map_err(|e| format!("connect: {e:?}"))?;
        subscribe(channel).await
    };
    tokio::time::timeout(Duration::from_secs(10), attempt)
        .await
        .unwrap_or_else(|_| Err("nothing within 10 s".into()))
}

async fn subscribe(channel: Channel) -> Result<String, String> {
    let (send, rx) = mpsc::channel(4);
    let _ = send
        .send(DiscoveryRequest {
            node: Some(node("intruder")),
            resource_names: vec!["sluice".into()],
            type_url: TYPE_URL.into(),
            ..Default::default()
        })
        .await;
    let mut responses = ExtensionConfigDiscoveryServiceClient::new(channel)
        .stream_extension_configs(tokio_stream_from(rx))
        .await
        .map_err(|e| format!("stream: {e:?}"))?
        .into_inner();
    match responses.message().await {
        Ok(Some(r)) => Ok(format!("{r:?}")),
        Ok(None) => Err("stream ended".into()),
        Err(e) => Err(format!("message: {e:?}")),
    }
}

#[tokio::test]
async fn a_proxy_with_a_certificate_from_the_client_ca_confirms_a_push() {
    let pki = pki("good", true);
    let s = running(&pki.spec).await;
    let client = leaf(&pki.ca, &["envoy-1"], false);
    let channel = Channel::from_shared(format!("https://localhost:{}", s.sink.listen.port()))
        .unwrap()
        .tls_config(client_tls(&pki.ca.pem, Some(&client)))
        .unwrap_or_else(|e| panic!("{e}"))
        .connect()
        .await
        .unwrap_or_else(|e| panic!("{e:?}"));
    let mut p = Proxy::open_on(channel, node("envoy-1"), &["sluice"], TYPE_URL).await;
    let sink = s.sink.clone();
    let push = tokio::spawn(async move { sink.push(&secret_config(5.0), 7).await });
    let r = p.next().await.unwrap_or_else(|e| panic!("{e}"));
    let (_, got, _) = carried(&r);
    assert_eq!(
        (weight(&got), got.secret.as_deref()),
        (Some(5.0), Some(SECRET))
    );
    p.ack(&r).await;
    let receipt = push.await.unwrap_or_else(|e| panic!("{e}"));
    assert!(receipt.is_ok(), "{receipt:?}");
    assert!(s.sink.proxies().tls);
    assert_eq!(s.servers.proxies().values().map(Vec::len).sum::<usize>(), 1);
}

/// Serves version 7 (with the secret) and checks no one connected got it.
async fn refused(s: &Running, tls: ClientTlsConfig) {
    let _ = s.sink.hub.set(
        "sluice",
        7,
        secret_config(5.0),
        super::super::render("sluice", &code(), &secret_config(5.0))
            .unwrap_or_else(|e| panic!("{e}")),
    );
    let got = first_response(s.sink.listen, tls).await;
    let Err(why) = got else {
        panic!("a response reached a client that should be refused: {got:?}")
    };
    assert!(!why.contains(SECRET), "{why}");
    assert!(
        s.sink.hub.proxies().is_empty(),
        "{:?}",
        s.sink.hub.proxies()
    );
}

#[tokio::test]
async fn a_proxy_without_a_client_certificate_is_refused() {
    let pki = pki("nocert", true);
    let s = running(&pki.spec).await;
    refused(&s, client_tls(&pki.ca.pem, None)).await;
}

#[tokio::test]
async fn a_proxy_with_a_certificate_from_another_ca_is_refused() {
    let pki = pki("otherca", true);
    let s = running(&pki.spec).await;
    let stranger = leaf(&pki.other, &["envoy-1"], false);
    refused(&s, client_tls(&pki.ca.pem, Some(&stranger))).await;
}

#[tokio::test]
async fn a_plain_text_client_gets_nothing_from_a_tls_listener() {
    let pki = pki("plain", true);
    let s = running(&pki.spec).await;
    let _ = s.sink.hub.set(
        "sluice",
        7,
        secret_config(5.0),
        super::super::render("sluice", &code(), &secret_config(5.0))
            .unwrap_or_else(|e| panic!("{e}")),
    );
    let plain = async {
        let channel = Channel::from_shared(format!("http://{}", s.sink.listen))
            .map_err(|e| e.to_string())?
            .connect()
            .await
            .map_err(|e| format!("connect: {e:?}"))?;
        subscribe(channel).await
    };
    let got = tokio::time::timeout(Duration::from_secs(10), plain)
        .await
        .unwrap_or_else(|_| Err("nothing within 10 s".into()));
    assert!(got.is_err(), "a plain-text client got {got:?}");
    // And raw: an HTTP/2 preface and bytes; whatever comes back carries no secret.
    let mut tcp = tokio::net::TcpStream::connect(s.sink.listen)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let _ = tcp
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await;
    let mut back = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut back)).await;
    assert!(
        !String::from_utf8_lossy(&back).contains(SECRET),
        "the secret went out in clear"
    );
    assert!(s.sink.hub.proxies().is_empty());
}

#[tokio::test]
async fn without_client_ca_any_tls_client_is_served_and_plain_text_still_is_not() {
    let pki = pki("serveronly", false);
    let s = running(&pki.spec).await;
    let _ = s.sink.hub.set(
        "sluice",
        7,
        secret_config(5.0),
        super::super::render("sluice", &code(), &secret_config(5.0))
            .unwrap_or_else(|e| panic!("{e}")),
    );
    let got = first_response(s.sink.listen, client_tls(&pki.ca.pem, None)).await;
    assert!(
        got.as_ref()
            .is_ok_and(|r| r.contains("version_info: \"7\"")),
        "{got:?}"
    );
    // A client that does not trust the server's CA does not talk to it.
    let got = first_response(s.sink.listen, client_tls(&pki.other.pem, None)).await;
    assert!(got.is_err(), "{got:?}");
}

#[tokio::test]
async fn rollouts_sharing_a_listen_must_agree_on_tls() {
    let pki = pki("share", true);
    let (_stop, stop_rx) = watch::channel(false);
    let servers = Servers::new(stop_rx, Limits::default());
    let addr = free_addr();
    let one = servers
        .join(addr, Some(&pki.spec), "first")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let same = servers
        .join(addr, Some(&pki.spec.clone()), "second")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(Arc::ptr_eq(&one, &same));
    let plain = servers
        .join(addr, None, "third")
        .await
        .err()
        .map(|e| e.to_string());
    let plain = plain.unwrap_or_default();
    for want in [
        "\"first\"",
        "\"third\"",
        &addr.to_string(),
        &pki.spec.cert_file,
        "none",
    ] {
        assert!(plain.contains(want), "missing {want:?} in {plain}");
    }
    let mut other = pki.spec.clone();
    other.client_ca_file = None;
    let err = servers
        .join(addr, Some(&other), "fourth")
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.contains("\"fourth\"") && err.contains("clientCaFile"),
        "{err}"
    );
}

#[tokio::test]
async fn unusable_files_are_errors_naming_the_field_and_the_file_and_nothing_listens() {
    let pki = pki("bad", true);
    let f = &pki.files;
    let not_pem = f.put("junk.pem", "hello");
    let (_, other_key) = leaf(&pki.ca, &["x"], true);
    let other_key = f.put("other-key.pem", &other_key);
    let missing = f.0.join("missing.pem").display().to_string();
    let cases = [
        (
            TlsSpec {
                cert_file: missing.clone(),
                ..pki.spec.clone()
            },
            "tls.certFile",
            missing.clone(),
        ),
        (
            TlsSpec {
                cert_file: not_pem.clone(),
                ..pki.spec.clone()
            },
            "tls.certFile",
            not_pem.clone(),
        ),
        (
            TlsSpec {
                key_file: not_pem.clone(),
                ..pki.spec.clone()
            },
            "tls.keyFile",
            not_pem.clone(),
        ),
        (
            TlsSpec {
                key_file: pki.spec.cert_file.clone(),
                ..pki.spec.clone()
            },
            "tls.keyFile",
            pki.spec.cert_file.clone(),
        ),
        (
            TlsSpec {
                client_ca_file: Some(missing.clone()),
                ..pki.spec.clone()
            },
            "tls.clientCaFile",
            missing.clone(),
        ),
        (
            TlsSpec {
                client_ca_file: Some(not_pem.clone()),
                ..pki.spec.clone()
            },
            "tls.clientCaFile",
            not_pem.clone(),
        ),
        // A key that is not the certificate's.
        (
            TlsSpec {
                key_file: other_key.clone(),
                ..pki.spec.clone()
            },
            "tls: ",
            other_key.clone(),
        ),
    ];
    let (_stop, stop_rx) = watch::channel(false);
    let servers = Servers::new(stop_rx, Limits::default());
    for (spec, field, file) in cases {
        let e = spec.load().err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.starts_with(field) && e.contains(&file), "{field}: {e}");
        let addr = free_addr();
        let e = servers
            .join(addr, Some(&spec), "r")
            .await
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains(&format!("ecdsGrpc.{field}")) && e.contains(&file),
            "{e}"
        );
        assert!(
            std::net::TcpStream::connect(addr).is_err(),
            "{addr} listens after a failed start"
        );
    }
    assert!(pki.spec.load().is_ok());
}

#[test]
fn validate_reports_tls_problems_with_their_field_paths() {
    let pki = pki("validate", true);
    let missing = pki.files.0.join("nope.pem").display().to_string();
    let yaml = format!(
        r#"{{listen: "0.0.0.0:18000", wasm: {{filename: /w.wasm}}, tls: {{certFile: "{}", keyFile: "{missing}", clientCaFile: "{}"}}}}"#,
        pki.spec.cert_file,
        pki.spec.client_ca_file.clone().unwrap_or_default()
    );
    let got = crate::spec::tests::problems_with_grpc_sink(&yaml);
    assert!(
        got.contains(&format!(
            "spec.sinks[0].ecdsGrpc.tls.keyFile: cannot read {missing}"
        )),
        "{got}"
    );
    let good = format!(
        r#"{{listen: "0.0.0.0:18000", wasm: {{filename: /w.wasm}}, tls: {{certFile: "{}", keyFile: "{}"}}}}"#,
        pki.spec.cert_file, pki.spec.key_file
    );
    assert_eq!(crate::spec::tests::problems_with_grpc_sink(&good), "ok");
    let unknown = r#"{listen: "0.0.0.0:18000", wasm: {filename: /w.wasm}, tls: {certFile: a, keyFile: b, caFile: c}}"#;
    let got = crate::spec::tests::problems_with_grpc_sink(unknown);
    assert!(got.contains("caFile"), "{got}");
}

#[test]
fn a_server_without_tls_beyond_loopback_is_warned_about() {
    let at = |a: &str| a.parse::<SocketAddr>().unwrap();
    let spec = TlsSpec {
        cert_file: "c".into(),
        key_file: "k".into(),
        client_ca_file: None,
    };
    assert!(in_clear(at("0.0.0.0:18000"), None).is_some_and(|w| w.contains("secret")));
    assert!(in_clear(at("10.1.2.3:18000"), None).is_some());
    assert!(in_clear(at("[::]:18000"), None).is_some());
    assert!(in_clear(at("0.0.0.0:18000"), Some(&spec)).is_none());
    assert!(in_clear(at("127.0.0.1:18000"), None).is_none());
    assert!(in_clear(at("[::1]:18000"), None).is_none());
}

#[tokio::test]
async fn peers_that_never_finish_the_handshake_hold_no_one_up_and_are_dropped() {
    let pki = pki("stall", true);
    let s = running(&pki.spec).await;
    let _ = s.sink.hub.set(
        "sluice",
        7,
        secret_config(5.0),
        super::super::render("sluice", &code(), &secret_config(5.0))
            .unwrap_or_else(|e| panic!("{e}")),
    );
    let mut stalled = Vec::new();
    for _ in 0..50 {
        stalled.push(
            tokio::net::TcpStream::connect(s.sink.listen)
                .await
                .unwrap_or_else(|e| panic!("{e}")),
        );
    }
    let client = leaf(&pki.ca, &["envoy-1"], false);
    let got = first_response(s.sink.listen, client_tls(&pki.ca.pem, Some(&client))).await;
    assert!(
        got.as_ref()
            .is_ok_and(|r| r.contains("version_info: \"7\"")),
        "{got:?}"
    );
    // The server closes a connection whose handshake has not finished (10 s): reading it
    // ends (EOF or reset) instead of waiting forever.
    let mut one = stalled.swap_remove(0);
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(Duration::from_secs(30), one.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "a stalled handshake was kept open: {closed:?}"
    );
}
