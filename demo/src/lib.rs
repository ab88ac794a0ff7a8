//! `sluice-demo`: the parts of the one-command demo rollout, usable on their own.
//!
//! - [`models`]: synthetic model servers (stable, canary, shadow) with runtime-switchable
//!   behaviour: error rate, latency, prediction drift, answer quality.
//! - [`users`]: synthetic users sending open-loop traffic through Envoy and click/purchase
//!   beacons driven by the answers' quality; the SRM fault (a client dropping user ids).
//! - [`scenario`]: what goes wrong in each scenario, when, and the end the rollout must reach
//!   ([`report::Expectation`]).
//! - [`stack`]: the run directory (rewritten copies of `envoy/demo-rollout.yaml` and its ECDS
//!   directory), the Envoy process, and the rollout spec for the controller.
//! - [`recorder`]: per-second samples of Envoy's counters and the controller's `/status`.
//! - [`report`]: the HTML report (inline SVG) and the JSON summary.
//! - [`rng`]: counter-based deterministic randomness.
//!
//! The binary (`src/main.rs`) runs them together with the controller, in-process
//! (`sluice_controller::cli::run` on a runtime of its own, in `run_rollout`); `scripts/demo.sh`
//! builds and runs it. `tests/scenarios.rs` runs every scenario end to end.

pub mod models;
pub mod recorder;
pub mod report;
pub mod rng;
pub mod scenario;
pub mod stack;
pub mod users;
