//! Sluice controller library: sources read the filter's counters, [`snapshot`] turns them
//! into the judge's snapshots, the [`judge`] (crate `sluice-judge`) decides, [`rollout`] and
//! [`daemon`] walk the ramp, sinks push weights; [`simulate`] and [`plan`] back the judge's
//! promises with numbers.
//!
//! The modules form layers, each using only those below it (`tests/module_graph.rs` fails on
//! a cycle), top down:
//! - commands: [`cli`] (with `sluice judge`), [`api`];
//! - the daemon: [`daemon`], [`assess`] (the judge behind the daemon's `Assess`), [`store`],
//!   [`notify`];
//! - the rollout: [`rollout`] (state machine), [`spec`] (the checked rollout spec, its
//!   guardrails read once into the judge's type), [`plan`], [`simulate`];
//! - pushes: [`sink`];
//! - [`snapshot`]: a source's reading as the judge's snapshot;
//! - reads: [`source`] (Envoy admin client, expositions, interned series);
//! - plain helpers: [`secret`], [`wasm_module`], [`durable`].
//!
//! Below them all, the judge is a crate of its own, re-exported here as [`judge`] with the
//! readers it shares with the spec, [`duration`] and [`yaml`]: it knows neither the daemon nor
//! the command line, nor any module of this crate.
pub mod api;
pub mod assess;
pub mod cli;
pub mod daemon;
pub mod durable;
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

pub use sluice_judge as judge;
pub use sluice_judge::{duration, yaml};
