//! Sluice controller library: sources read the filter's counters, [`snapshot`] models them,
//! the [`judge`] decides, [`rollout`] and [`daemon`] walk the ramp, sinks push weights;
//! [`simulate`] and [`plan`] back the judge's promises with numbers.
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
