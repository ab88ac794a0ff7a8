//! A fleet of real Envoys (`envoy/fleet/envoy.yaml`), each with its own node id and ports, taking
//! the Sluice filter's configuration from the controller's ECDS gRPC server, in front of real
//! upstreams: the shipped files are valid, an Envoy without a controller serves the control,
//! rollouts promote and roll back on every proxy, proxies that restart or join get the current
//! weight at once, a NACK holds the rollout naming the proxy, and the controller can die and
//! come back without the fleet noticing.

use sluice_tests::{free_port, validate, Envoy, EnvoyConfig, Load, Reply, Request, Upstream};

const BOOTSTRAP: &str = "envoy/fleet/envoy.yaml";
const LISTENER: u16 = 10000;
/// The controller's address in the bootstrap (cluster `sluice`).
const XDS: u16 = 18000;

/// A model answering 200 with its name.
fn model(name: &'static str) -> impl Fn(&Request) -> Reply + Send + Sync {
    move |_req: &Request| {
        Reply::json(serde_json::json!({"model": name, "score": 0.5})).header("x-model-score", "0.5")
    }
}

/// One Envoy of the fleet: node `id`, the controller at `127.0.0.1:<xds>`.
async fn fleet_envoy(
    id: &str,
    xds: u16,
    stable: &Upstream,
    canary: &Upstream,
) -> anyhow::Result<Envoy> {
    Ok(EnvoyConfig::new(BOOTSTRAP)
        .port_to(XDS, xds)
        .port_to(10001, stable.port())
        .port_to(10002, canary.port())
        .node(id, "fleet")
        .start()
        .await?)
}

/// Sends one request from each of `users` fresh users through `envoy`; returns how many were
/// answered by (stable, canary), checked three ways: the variant header, the body, and that
/// every request was answered 200.
async fn split(envoy: &Envoy, tag: &str, users: usize) -> anyhow::Result<(usize, usize)> {
    let tag = tag.to_string();
    let responses = Load::new(envoy.url(LISTENER, "/predict"))
        .users(move |i| format!("{tag}-{i}"))
        .requests(users)
        .run()
        .await?;
    let mut counts = (0, 0);
    for r in &responses {
        anyhow::ensure!(
            r.status == 200,
            "status {} from {:?}",
            r.status,
            envoy.node_id()
        );
        let body = r.json()?;
        match (r.header("x-sluice-variant"), body["model"].as_str()) {
            (Some("stable"), Some("stable")) => counts.0 += 1,
            (Some("canary"), Some("canary")) => counts.1 += 1,
            other => anyhow::bail!("variant header and model disagree: {other:?}"),
        }
    }
    Ok(counts)
}

#[test]
fn the_fleet_files_are_valid_envoy_configs() -> anyhow::Result<()> {
    validate(BOOTSTRAP)?;
    validate("envoy/fleet/models.yaml")?;
    Ok(())
}

#[tokio::test]
async fn an_envoy_started_while_the_controller_is_down_serves_the_control() -> anyhow::Result<()> {
    let stable = Upstream::start("stable", model("stable")).await?;
    let canary = Upstream::start("canary", model("canary")).await?;
    // Nothing listens on the controller's port.
    let envoy = fleet_envoy("edge-1", free_port()?, &stable, &canary).await?;
    assert_eq!(split(&envoy, "down", 300).await?, (300, 0));
    assert_eq!(canary.count(), 0);
    // It is the default config doing this (the filter counted the requests under the
    // experiment), not a filter left out: and no config was ever received.
    let prom = envoy.admin().prometheus().await?;
    let counted = prom.sum("sluice_requests_total", &[("experiment", "fleet")]);
    assert!(counted >= 300.0, "the filter counted {counted} requests");
    let stats = envoy.admin().stats().await?;
    assert_eq!(
        stats.get("extension_config_discovery.http_filter.sluice.update_success"),
        Some(0),
        "{}",
        envoy.log_tail(20)
    );
    Ok(())
}
