//! Sluice's proxy-wasm HTTP filter.
//!
//! Parts, each plain Rust that also compiles natively (the controller and the tests use the
//! very same types and functions), except the last:
//! - [`config`]: the JSON wire format and its validation into a checked [`plan::Plan`];
//! - [`plan`]: the checked plan and the sections the pure logic reads;
//! - [`assignment`]: salted FNV-1a hashing into buckets and the monotone bucket layout;
//! - [`request`]: which experiments apply, the user key, QA overrides, the variant chosen;
//! - [`beacon`]: exposure tokens, why a beacon is refused, the per-user event limit;
//! - [`response`]: status classes, outcomes, predictions, Envoy's response details;
//! - [`shadow`]: shadow sampling, the copy's headers, comparison of the two answers;
//! - [`breaker`]: failure classification, the sliding window, the trip rule, shared state;
//! - [`mac`]: keyed MACs (SipHash-2-4-128) over values the filter issues and trusts again;
//! - [`metrics`]: every metric name, and the catalog of metrics a plan defines;
//! - [`decision`]: the shim's decisions as effects (metric updates, headers, local replies);
//! - [`header_map`]: header maps as the host serialises them, read in place;
//! - `host` (wasm32-wasip1 only): the proxy-wasm shim, the one module that calls the host.
//!
//! The data plane never panics: unwrap/expect/panic are denied by lint, host errors are
//! values, and an internal error serves the control variant and is counted.

pub mod assignment;
pub mod beacon;
pub mod breaker;
mod check;
pub mod config;
pub mod decision;
pub mod header_map;
pub mod mac;
pub mod metrics;
pub mod plan;
pub mod request;
pub mod response;
pub mod shadow;

#[cfg(all(target_arch = "wasm32", target_os = "wasi"))]
mod host;
