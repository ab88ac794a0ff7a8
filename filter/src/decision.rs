//! The host shim's decisions, pure: from what the shim read from the host, what it must do —
//! which metrics to update, which headers to set, which local reply to send. The shim
//! (`host.rs` and `host/**`) only reads and applies these effects, so every choice between
//! them is tested natively.
//!
//! This module sits above the plan, the pure logic and the metrics catalog (it names metric
//! positions), and below the shim.

pub mod beacon;
pub mod response;
pub mod shadow;

/// One metric update, by position in [`crate::metrics::Catalog::specs`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricUpdate {
    /// Add one to a counter.
    Increment(usize),
    /// Record a value in a histogram (or set a gauge).
    Record(usize, u64),
}

/// A response header to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderOp<'a> {
    /// Replace every value of the header (the upstream's included).
    Set(&'a str, String),
    /// Add one more value.
    Add(&'a str, String),
}

/// A reply the filter sends itself instead of forwarding the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalReply {
    pub status: u32,
    pub headers: Vec<(&'static str, &'static str)>,
    pub body: Option<String>,
}

#[cfg(test)]
mod tests;
