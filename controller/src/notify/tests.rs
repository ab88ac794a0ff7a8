//! Delivery to an https:// webhook: a local TLS server with a certificate from a test CA.

use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_rustls::rustls;

use super::*;
use crate::spec::WebhookSpec;

/// A CA (its PEM) and a server certificate for 127.0.0.1 and localhost signed by it.
struct Pki {
    ca_pem: String,
    server: rustls::ServerConfig,
}

fn pki() -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "sluice test CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, &ca_key);
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
        .and_then(|p| p.signed_by(&key, &issuer))
        .unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| {
            b.with_no_client_auth().with_single_cert(
                vec![leaf.der().clone(), ca_cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
        })
        .unwrap();
    Pki {
        ca_pem: ca_cert.pem(),
        server,
    }
}

/// An HTTPS server on 127.0.0.1 that answers 200 to every request and hands over each body.
async fn https_server(config: rustls::ServerConfig) -> (u16, mpsc::UnboundedReceiver<String>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                // A client that does not trust the certificate gives up here.
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                let body = loop {
                    let Ok(n) = tls.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    request.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&request).into_owned();
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let length = head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                            })
                            .unwrap_or(0);
                        if body.len() >= length {
                            break body.to_string();
                        }
                    }
                };
                // Handed over before answering: once the client has its answer, the body is here.
                let _ = tx.send(body);
                let _ = tls
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                    .await;
                let _ = tls.shutdown().await;
            });
        }
    });
    (port, rx)
}

fn notice() -> Notice {
    Notice {
        rollout: "ranker".into(),
        kind: EventKind::Promoted,
        message: "promoted".into(),
        at: 1.0,
        weight: 100.0,
        cause: None,
    }
}

fn webhook(url: String, ca_file: Option<String>) -> NotificationSpec {
    NotificationSpec::Webhook(WebhookSpec {
        url,
        format: WebhookFormat::Slack,
        ca_file,
    })
}

#[tokio::test]
async fn an_https_webhook_is_delivered_and_its_certificate_verified() {
    let pki = pki();
    let (port, mut bodies) = https_server(pki.server).await;
    let dir = std::env::temp_dir().join(format!("sluice-notify-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, &pki.ca_pem).unwrap();
    let ca_file = Some(ca_file.display().to_string());

    // Trusting the test CA (as a webhook behind a private CA would be configured): delivered,
    // by name and by address.
    for host in ["127.0.0.1", "localhost"] {
        let n = Notifier::new(&[webhook(
            format!("https://{host}:{port}/hook"),
            ca_file.clone(),
        )]);
        n.send(notice());
        n.flush().await;
        let body = bodies
            .try_recv()
            .unwrap_or_else(|e| panic!("{host}: not delivered: {e}"));
        let json: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        assert_eq!(json["text"], notice().text(), "{body}");
    }

    // Without it the certificate is not trusted (the system's roots do not know the test CA):
    // nothing reaches the server. So the delivery above went through real verification.
    let n = Notifier::new(&[webhook(format!("https://127.0.0.1:{port}/hook"), None)]);
    n.send(notice());
    n.flush().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        bodies.try_recv().is_err(),
        "an untrusted certificate was accepted"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
