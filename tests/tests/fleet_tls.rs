//! A real Envoy taking the Sluice filter from the controller's ecdsGrpc server over mutual TLS:
//! the fleet bootstrap (`envoy/fleet/envoy.yaml`) with an `UpstreamTlsContext` on cluster
//! `sluice` presenting a client certificate; `sluice run` with the sink's `tls` block. With the
//! certificate the push is confirmed and Envoy serves it; without one Envoy never gets the
//! configuration (nor its secret) and the push is not confirmed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};
use serde_json::{json, Value};
use sluice_tests::{
    filter_wasm, free_port, wait_until, Envoy, Load, Reply, Request, SluiceRun, Upstream,
};

use sluice_tests::fleet::{ADMIN, LISTENER};
/// The name the server's certificate carries and Envoy checks.
const SERVER_NAME: &str = "sluice.sluice-system.svc";

/// The lines of cluster `sluice` the TLS transport socket goes after.
const CLUSTER: &str = "    - name: sluice\n      type: STATIC\n      connect_timeout: 1s\n";

/// A CA and the PEM files made from it in `dir`.
struct Pki {
    dir: tempfile::TempDir,
    ca: Issuer<'static, KeyPair>,
    ca_pem: String,
}

impl Pki {
    fn new() -> anyhow::Result<Pki> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "sluice fleet CA");
        let cert = params.self_signed(&key)?;
        let pki = Pki {
            dir: tempfile::tempdir()?,
            ca: Issuer::new(params, key),
            ca_pem: cert.pem(),
        };
        std::fs::write(pki.path("ca.pem"), &pki.ca_pem)?;
        Ok(pki)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `<name>.pem` and `<name>-key.pem`: a certificate for `san` signed by the CA.
    fn leaf(&self, name: &str, san: &str, usage: ExtendedKeyUsagePurpose) -> anyhow::Result<()> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![san.to_string()])?;
        params.distinguished_name.push(DnType::CommonName, san);
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &self.ca)?;
        std::fs::write(self.path(&format!("{name}.pem")), cert.pem())?;
        std::fs::write(self.path(&format!("{name}-key.pem")), key.serialize_pem())?;
        Ok(())
    }
}

fn show(p: &Path) -> String {
    p.display().to_string()
}

/// Cluster `sluice` speaking TLS: Envoy checks the server's certificate against the CA and
/// its name, and (with `client_cert`) presents its own.
fn transport_socket(pki: &Pki, client_cert: bool) -> String {
    let identity = if client_cert {
        format!(
            "            tls_certificates:\n              - certificate_chain: {{ filename: {} }}\n                private_key: {{ filename: {} }}\n",
            show(&pki.path("envoy.pem")),
            show(&pki.path("envoy-key.pem"))
        )
    } else {
        String::new()
    };
    format!(
        "{CLUSTER}      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
          sni: {SERVER_NAME}
          common_tls_context:
            alpn_protocols: [h2]
{identity}            validation_context:
              trusted_ca: {{ filename: {} }}
              match_typed_subject_alt_names:
                - san_type: DNS
                  matcher: {{ exact: {SERVER_NAME} }}
",
        show(&pki.path("ca.pem"))
    )
}

fn model(name: &'static str) -> impl Fn(&Request) -> Reply + Send + Sync {
    move |_req: &Request| Reply::json(json!({"model": name})).header("x-model-score", "0.5")
}

/// `sluice run` with one stage at 50 % and the ecdsGrpc sink over TLS, started.
fn controller(pki: &Pki, xds: u16, admin: &str) -> anyhow::Result<SluiceRun> {
    let spec = json!({
        "apiVersion": "sluice.dev/v1alpha1",
        "kind": "Rollout",
        "metadata": {"name": "fleet"},
        "spec": {
            "experiment": {
                "name": "fleet",
                "unit": {"type": "user", "keys": [{"header": "x-user-id"}]},
                "variants": [{"name": "stable", "control": true}, {"name": "canary", "weight": 0}],
                "echo": {"header": "x-sluice-variant"},
            },
            "schedule": {"stages": [50], "bake": "10m", "warmup": "1s", "interval": "500ms"},
            "guardrails": {"promotion": "noBreach", "minRequests": 100},
            "sources": [{"envoyAdmin": {"endpoints": [admin]}}],
            "sinks": [{"ecdsGrpc": {
                "listen": format!("127.0.0.1:{xds}"),
                "resource": "sluice",
                "wasm": {"filename": show(&filter_wasm()?)},
                "minProxies": 1,
                "confirmWithin": "5s",
                "tls": {
                    "certFile": show(&pki.path("server.pem")),
                    "keyFile": show(&pki.path("server-key.pem")),
                    "clientCaFile": show(&pki.path("ca.pem")),
                },
            }}],
        }
    });
    let mut run = SluiceRun::new(&spec)?;
    run.start(&[])?;
    Ok(run)
}

/// How many filter configurations `envoy` accepted from the controller.
async fn updates(envoy: &Envoy) -> u64 {
    match envoy.admin().stats().await {
        Ok(stats) => stats
            .get("extension_config_discovery.http_filter.sluice.update_success")
            .unwrap_or(0),
        Err(_) => 0,
    }
}

/// Users (of 400) `envoy` sends to the canary.
async fn to_canary(envoy: &Envoy, tag: &str) -> anyhow::Result<usize> {
    let tag = tag.to_string();
    let responses = Load::new(envoy.url(LISTENER, "/predict"))
        .users(move |i| format!("{tag}-{i}"))
        .requests(400)
        .run()
        .await?;
    let mut canary = 0;
    for r in &responses {
        anyhow::ensure!(r.status == 200, "status {}", r.status);
        if r.header("x-sluice-variant") == Some("canary") {
            canary += 1;
        }
    }
    Ok(canary)
}

/// The CA, the controller's server certificate and Envoy's client certificate; an Envoy of
/// the fleet (with or without its certificate) and the controller over it.
async fn setup(client_cert: bool) -> anyhow::Result<(Pki, Upstream, Upstream, Envoy, SluiceRun)> {
    let pki = Pki::new()?;
    pki.leaf("server", SERVER_NAME, ExtendedKeyUsagePurpose::ServerAuth)?;
    pki.leaf("envoy", "edge-tls", ExtendedKeyUsagePurpose::ClientAuth)?;
    let stable = Upstream::start("stable", model("stable")).await?;
    let canary = Upstream::start("canary", model("canary")).await?;
    let xds = free_port()?;
    let envoy = sluice_tests::fleet::envoy("edge-tls", xds, &stable, &canary)
        .replace(CLUSTER, &transport_socket(&pki, client_cert))
        .start()
        .await?;
    let controller = controller(&pki, xds, &format!("http://{}", envoy.addr(ADMIN)))?;
    Ok((pki, stable, canary, envoy, controller))
}

#[tokio::test]
async fn an_envoy_with_a_client_certificate_takes_the_filter_over_mutual_tls() -> anyhow::Result<()>
{
    let (_pki, _stable, _canary, envoy, controller) = setup(true).await?;
    wait_until(Duration::from_secs(60), "weight 50 confirmed", || async {
        controller.state()["weight"] == 50.0
    })
    .await
    .map_err(|e| {
        anyhow::anyhow!(
            "{e}\nstate: {}\n{}\n{}",
            controller.state(),
            controller.log(),
            envoy.log_tail(30)
        )
    })?;
    assert!(updates(&envoy).await >= 1);
    // Envoy runs the pushed weight: about half of the users go to the canary.
    let canary = to_canary(&envoy, "tls").await?;
    assert!(
        (120..=280).contains(&canary),
        "{canary} of 400 to the canary"
    );
    let status = controller.status().await.unwrap_or(Value::Null);
    let sink = &status[0]["proxies"][0];
    assert_eq!(sink["tls"], true, "{status}");
    let listed = sink["proxies"].as_array().cloned().unwrap_or_default();
    assert_eq!(listed.len(), 1, "{sink}");
    assert_eq!(listed[0]["id"], "edge-tls");
    assert_eq!(listed[0]["acked"]["sluice"], sink["serving"], "{sink}");
    Ok(())
}

#[tokio::test]
async fn an_envoy_without_a_client_certificate_gets_nothing_and_the_push_is_unconfirmed(
) -> anyhow::Result<()> {
    let (_pki, _stable, _canary, envoy, controller) = setup(false).await?;
    // The controller pushes (and retries); none of it is ever confirmed.
    wait_until(Duration::from_secs(60), "two pushes failed", || async {
        controller.status().await.unwrap_or(Value::Null)[0]["push_errors"]
            .as_u64()
            .is_some_and(|n| n >= 2)
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", controller.log()))?;
    assert!(
        controller.log().contains("push failed"),
        "{}",
        controller.log()
    );
    assert_ne!(controller.state()["weight"], 50.0, "{}", controller.state());
    assert_eq!(updates(&envoy).await, 0, "{}", envoy.log_tail(30));
    // Envoy counts the refused attempts as failed updates.
    let stats = envoy.admin().stats().await?;
    let failures = stats
        .get("extension_config_discovery.http_filter.sluice.update_failure")
        .unwrap_or(0);
    assert!(failures >= 1, "update_failure {failures}");
    // Envoy serves its default config: everyone to the control.
    assert_eq!(to_canary(&envoy, "plain").await?, 0);
    let status = controller.status().await.unwrap_or(Value::Null);
    let sink = &status[0]["proxies"][0];
    assert_eq!(sink["tls"], true, "{status}");
    assert_eq!(sink["proxies"], json!([]), "{sink}");
    Ok(())
}
