//! The `breaker` section of an experiment: wire format and validation into
//! [`crate::breaker::Params`].

use serde::{Deserialize, Serialize};

use super::whole::whole;
use super::{invalid, ConfigError};
use crate::breaker::Params;

/// Default sliding window, seconds.
pub const DEFAULT_WINDOW_SECONDS: u64 = 10;
/// Default fewest treatment requests before a trip can be judged.
pub const DEFAULT_MIN_REQUESTS: u64 = 50;
/// Default absolute failure-rate ceiling.
pub const DEFAULT_MAX_ERROR_RATE: f64 = 0.05;
/// Default ceiling relative to the control's failure rate.
pub const DEFAULT_MAX_RATIO_TO_CONTROL: f64 = 3.0;
/// Default α of one evaluation (see `docs/statistics.md`, "The breaker").
pub const DEFAULT_SIGNIFICANCE: f64 = 1e-4;

/// Longest window: one hour.
pub const MAX_WINDOW_SECONDS: u64 = 3600;
/// Most `min_requests`.
pub const MAX_MIN_REQUESTS: u64 = 1_000_000;
/// Largest `max_ratio_to_control`.
pub const MAX_RATIO: f64 = 1000.0;
/// Largest `significance`.
pub const MAX_SIGNIFICANCE: f64 = 0.1;

/// A circuit breaker in the data plane: trips a treatment whose hard failures (5xx, resets,
/// Envoy's local replies, timeouts) are significantly above both ceilings, and sends its
/// users to the control until the next configuration push.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerConfig {
    /// Length of the sliding window the counts are kept over.
    #[serde(default = "default_window", deserialize_with = "whole")]
    pub window_seconds: u64,
    /// Fewest requests of a treatment, within the window, before it can trip.
    #[serde(default = "default_min_requests", deserialize_with = "whole")]
    pub min_requests: u64,
    /// The treatment's failure rate must exceed this...
    #[serde(default = "default_max_error_rate")]
    pub max_error_rate: f64,
    /// ...and this multiple of the control's failure rate over the same time.
    #[serde(default = "default_max_ratio")]
    pub max_ratio_to_control: f64,
    /// ...significantly: α of one evaluation of one treatment.
    #[serde(default = "default_significance")]
    pub significance: f64,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            window_seconds: DEFAULT_WINDOW_SECONDS,
            min_requests: DEFAULT_MIN_REQUESTS,
            max_error_rate: DEFAULT_MAX_ERROR_RATE,
            max_ratio_to_control: DEFAULT_MAX_RATIO_TO_CONTROL,
            significance: DEFAULT_SIGNIFICANCE,
        }
    }
}

fn default_window() -> u64 {
    DEFAULT_WINDOW_SECONDS
}

fn default_min_requests() -> u64 {
    DEFAULT_MIN_REQUESTS
}

fn default_max_error_rate() -> f64 {
    DEFAULT_MAX_ERROR_RATE
}

fn default_max_ratio() -> f64 {
    DEFAULT_MAX_RATIO_TO_CONTROL
}

fn default_significance() -> f64 {
    DEFAULT_SIGNIFICANCE
}

/// Validates a `breaker` section; `field` is its path (`experiments[0].breaker`).
pub fn check(c: &BreakerConfig, field: &str) -> Result<Params, ConfigError> {
    if !(1..=MAX_WINDOW_SECONDS).contains(&c.window_seconds) {
        return Err(invalid(
            format!("{field}.window_seconds"),
            format!("must be 1 to {MAX_WINDOW_SECONDS}"),
        ));
    }
    if !(1..=MAX_MIN_REQUESTS).contains(&c.min_requests) {
        return Err(invalid(
            format!("{field}.min_requests"),
            format!("must be 1 to {MAX_MIN_REQUESTS}"),
        ));
    }
    if !(c.max_error_rate > 0.0 && c.max_error_rate < 1.0) {
        return Err(invalid(
            format!("{field}.max_error_rate"),
            "must be a fraction above 0 and below 1 (0.05 is 5 %)",
        ));
    }
    if !(1.0..=MAX_RATIO).contains(&c.max_ratio_to_control) {
        return Err(invalid(
            format!("{field}.max_ratio_to_control"),
            format!("must be 1 to {MAX_RATIO}"),
        ));
    }
    if !(c.significance > 0.0 && c.significance <= MAX_SIGNIFICANCE) {
        return Err(invalid(
            format!("{field}.significance"),
            format!("must be above 0 and at most {MAX_SIGNIFICANCE}"),
        ));
    }
    Ok(Params {
        window_ms: c.window_seconds * 1000,
        min_requests: c.min_requests,
        max_error_rate: c.max_error_rate,
        max_ratio_to_control: c.max_ratio_to_control,
        significance: c.significance,
    })
}
