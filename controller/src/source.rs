//! Sources of per-variant counters: where the controller reads what the filter counted.

pub mod exposition;
