//! `sluice-tests`: the harness for integration tests that run Sluice inside a real Envoy, with
//! real upstream servers, all on loopback.
//!
//! Parts:
//! - [`paths`]: where things are — the repository root, the Envoy binary, the built filters,
//!   free loopback ports.
//! - [`controller`]: `sluice run` as a process on a spec in a temp dir ([`SluiceRun`]), with
//!   readers for its state, audit log, log and `/status`.
//! - [`fleet`]: an Envoy of the fleet example (`envoy/fleet/envoy.yaml`, filter config over
//!   ECDS gRPC from the controller) with its ports rewritten.
//! - [`envoy`]: start an Envoy from one of the shipped YAML files with its fixed ports, relative
//!   wasm paths and ECDS directory rewritten ([`EnvoyConfig`] → [`Envoy`], killed on drop), or
//!   just validate such a file.
//! - [`admin`]: read Envoy's admin endpoints — `/stats/prometheus` parsed into labelled
//!   [`Samples`] (with histogram helpers), plain `/stats` into [`Stats`].
//! - [`upstream`]: programmable HTTP servers standing in for model servers: per-request
//!   behaviour chosen by a closure, every received request recorded.
//! - [`client`]: one request, or thousands from distinct users with bounded concurrency.
//! - [`prometheus`]: a real Prometheus on loopback scraping given Envoys.
//! - [`traffic`]: steady background traffic from many users while a rollout runs.
//! - [`wait`]: poll a condition until it holds or a deadline passes.
//! - [`xds`]: simulated Envoys on the xDS side: ECDS clients that ACK (or NACK) like Envoy.
//!
//! A typical test:
//!
//! ```no_run
//! use std::time::Duration;
//! use sluice_tests::{EnvoyConfig, Load, Reply, Upstream, wait_until};
//!
//! # async fn example() -> anyhow::Result<()> {
//! let model = Upstream::start("model", |_req: &sluice_tests::Request| {
//!     Reply::json(serde_json::json!({"score": 0.7})).header("x-model-score", "0.7")
//! })
//! .await?;
//! let envoy = EnvoyConfig::new("bench/envoy/proxy-none.yaml")
//!     .port_to(18000, model.port()) // the YAML's upstream cluster → our server
//!     .start()
//!     .await?;
//! let responses = Load::new(envoy.url(10000, "/predict")).requests(1000).run().await?;
//! assert!(responses.iter().all(|r| r.status == 200));
//! wait_until(Duration::from_secs(5), "upstream saw every request", || async {
//!     model.count() == 1000
//! })
//! .await?;
//! let prom = envoy.admin().prometheus().await?;
//! assert!(prom.sum("envoy_cluster_upstream_rq_total", &[("envoy_cluster_name", "stable")]) >= 1000.0);
//! # Ok(()) }
//! ```

pub mod admin;
pub mod client;
pub mod controller;
pub mod envoy;
pub mod error;
pub mod fleet;
pub mod paths;
pub mod prometheus;
pub mod traffic;
pub mod upstream;
pub mod wait;
pub mod xds;

pub use admin::{Admin, Histogram, Sample, Samples, Stats};
pub use client::{HttpClient, Load, Response};
pub use controller::SluiceRun;
pub use envoy::{inline_filter_config, validate, Envoy, EnvoyConfig};
pub use error::{Error, Result};
pub use paths::{envoy_bin, filter_wasm, free_port, noop_filter_wasm, repo_root, sluice_bin};
pub use prometheus::Prometheus;
pub use traffic::Traffic;
pub use upstream::{Reply, Request, Upstream};
pub use wait::{wait_for, wait_until};
pub use xds::{Identity, XdsClient};
