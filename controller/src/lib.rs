//! Sluice controller library: sources read the filter's counters, [`snapshot`] models them,
//! the [`judge`] decides, [`rollout`] and [`daemon`] walk the ramp, sinks push weights;
//! [`simulate`] and [`plan`] back the judge's promises with numbers.
//!
//! The modules form layers, each using only those below it (`tests/module_graph.rs` fails on
//! a cycle), top down:
//! - commands: [`cli`] (with `sluice judge`), [`api`];
//! - the daemon: [`daemon`], [`assess`] (the judge behind the daemon's `Assess`), [`store`],
//!   [`notify`];
//! - the rollout: [`rollout`] (state machine), [`spec`] (the checked rollout spec, its
//!   guardrails read once into the judge's type), [`plan`], [`simulate`];
//! - pushes: [`sink`];
//! - the judge: [`judge`] over [`snapshot`]; it knows neither the daemon nor the command line
//!   (a snapshot is made from a source's reading);
//! - reads: [`source`] (Envoy admin client, expositions, interned series);
//! - plain helpers: [`secret`], [`wasm_module`], [`duration`], [`yaml`], [`durable`].
pub mod api;
pub mod assess;
pub mod cli;
pub mod daemon;
pub mod durable;
pub mod duration;
pub mod judge;
pub mod notify;
pub mod plan;
pub mod rollout;
pub mod secret;
pub mod simulate;
pub mod sink;
pub mod snapshot;
pub mod source;
pub mod spec;
pub mod store;
pub mod wasm_module;
pub mod yaml;
