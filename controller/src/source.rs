//! Sources of per-variant counters: where the controller reads what the filter counted.
//!
//! A source returns raw series (name + labels → value) per origin (one Envoy, or one
//! Prometheus target). The [`Accumulator`] turns those into counters that never go down: when
//! any counter of an origin decreases, that origin restarted, so everything it had counted
//! before is carried forward instead of being read as negative traffic. The sum over origins is
//! a [`Reading`]: what the judge works on. A source that cannot answer, or whose data is stale,
//! returns an error; the rollout then sees "no data" and holds.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, SystemTime};

pub mod envoy_admin;
pub mod exposition;
pub mod prometheus;

pub use exposition::Sample;

/// Labels that identify where a series came from rather than what it counts; dropped when
/// series from different origins are summed.
const ORIGIN_LABELS: [&str; 4] = ["instance", "job", "pod", "envoy"];

/// One series' identity after origin labels are dropped: name and sorted labels.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SeriesKey {
    pub name: String,
    pub labels: Vec<(String, String)>,
}

impl SeriesKey {
    pub fn of(sample: &Sample) -> SeriesKey {
        SeriesKey {
            name: sample.name.clone(),
            labels: sample
                .labels
                .iter()
                .filter(|(k, _)| !ORIGIN_LABELS.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }
    }

    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The series of one origin at one scrape.
#[derive(Debug, Clone, PartialEq)]
pub struct OriginScrape {
    /// Stable name of the origin (admin URL, or Prometheus `instance`).
    pub origin: String,
    pub samples: Vec<Sample>,
}

/// Why a source has no usable data.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{origin} is unreachable: {reason}")]
    Unreachable { origin: String, reason: String },
    #[error("{origin}: newest data is {age:?} old (allowed: {allowed:?})")]
    Stale {
        origin: String,
        age: Duration,
        allowed: Duration,
    },
    #[error("{origin}: {reason}")]
    Invalid { origin: String, reason: String },
    #[error("{healthy} of {total} origins answered; at least {needed} are required")]
    TooFewOrigins {
        healthy: usize,
        total: usize,
        needed: usize,
    },
}

/// Something that can be asked for the current series of one experiment.
pub trait Source {
    /// Current series of `experiment`, one entry per origin that answered, or an error if
    /// the data cannot be trusted.
    fn scrape(
        &self,
        experiment: &str,
    ) -> impl Future<Output = Result<Vec<OriginScrape>, SourceError>> + Send;
}

/// Monotone counters summed over origins, as of `at`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Reading {
    pub at: Option<SystemTime>,
    pub series: BTreeMap<SeriesKey, f64>,
    /// Restarts detected so far, per origin.
    pub restarts: BTreeMap<String, u64>,
}

impl Reading {
    /// Sum of the series named `name` whose labels include all of `filter`.
    pub fn sum(&self, name: &str, filter: &[(&str, &str)]) -> f64 {
        self.series
            .iter()
            .filter(|(k, _)| k.name == name && filter.iter().all(|(l, v)| k.label(l) == Some(*v)))
            .map(|(_, v)| *v)
            .sum()
    }
}

#[derive(Debug, Default)]
struct OriginState {
    last: BTreeMap<SeriesKey, f64>,
    carried: BTreeMap<SeriesKey, f64>,
    restarts: u64,
}

/// Restart-proof accumulation of counters per origin.
#[derive(Debug, Default)]
pub struct Accumulator {
    origins: BTreeMap<String, OriginState>,
}

impl Accumulator {
    /// Folds in one scrape and returns the summed, monotone reading. Origins absent from
    /// `scrapes` keep contributing their last values (the source decides whether too many
    /// are missing).
    pub fn add(&mut self, at: SystemTime, scrapes: &[OriginScrape]) -> Reading {
        for scrape in scrapes {
            let state = self.origins.entry(scrape.origin.clone()).or_default();
            let mut current: BTreeMap<SeriesKey, f64> = BTreeMap::new();
            for s in &scrape.samples {
                if s.value.is_finite() {
                    *current.entry(SeriesKey::of(s)).or_default() += s.value;
                }
            }
            let restarted = state
                .last
                .iter()
                .any(|(k, old)| current.get(k).copied().unwrap_or(0.0) < *old);
            if restarted {
                state.restarts += 1;
                for (k, old) in std::mem::take(&mut state.last) {
                    *state.carried.entry(k).or_default() += old;
                }
            }
            state.last = current;
        }
        let mut reading = Reading {
            at: Some(at),
            ..Reading::default()
        };
        for (origin, state) in &self.origins {
            for (k, v) in state.last.iter().chain(&state.carried) {
                *reading.series.entry(k.clone()).or_default() += v;
            }
            reading.restarts.insert(origin.clone(), state.restarts);
        }
        reading
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(name: &str, variant: &str, value: f64) -> Sample {
        Sample {
            name: name.into(),
            labels: [("experiment", "e"), ("variant", variant), ("instance", "x")]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            value,
        }
    }

    fn scrape(origin: &str, requests: f64, errors: f64) -> OriginScrape {
        OriginScrape {
            origin: origin.into(),
            samples: vec![
                sample("sluice_requests_total", "canary", requests),
                sample("sluice_errors_total", "canary", errors),
            ],
        }
    }

    #[test]
    fn origins_are_summed_and_origin_labels_dropped() {
        let mut acc = Accumulator::default();
        let r = acc.add(
            SystemTime::UNIX_EPOCH,
            &[scrape("a", 10.0, 1.0), scrape("b", 5.0, 0.0)],
        );
        assert_eq!(
            r.sum("sluice_requests_total", &[("variant", "canary")]),
            15.0
        );
        assert_eq!(r.series.len(), 2);
    }

    #[test]
    fn a_restart_carries_counts_forward() {
        let mut acc = Accumulator::default();
        acc.add(
            SystemTime::UNIX_EPOCH,
            &[scrape("a", 100.0, 7.0), scrape("b", 50.0, 0.0)],
        );
        // `a` restarted: its counters start again from small values.
        let r = acc.add(
            SystemTime::UNIX_EPOCH,
            &[scrape("a", 3.0, 7.0), scrape("b", 60.0, 0.0)],
        );
        assert_eq!(r.sum("sluice_requests_total", &[]), 100.0 + 3.0 + 60.0);
        // Even a counter that happened to be equal is carried once, not twice.
        assert_eq!(r.sum("sluice_errors_total", &[]), 7.0 + 7.0);
        assert_eq!(r.restarts.get("a"), Some(&1));
        assert_eq!(r.restarts.get("b"), Some(&0));
        let r = acc.add(SystemTime::UNIX_EPOCH, &[scrape("a", 10.0, 8.0)]);
        assert_eq!(r.sum("sluice_requests_total", &[]), 100.0 + 10.0 + 60.0);
    }

    #[test]
    fn readings_never_decrease_across_restarts() {
        let mut acc = Accumulator::default();
        let mut last = 0.0;
        let mut value = 0.0;
        for step in 0..200u32 {
            value = if step.is_multiple_of(37) {
                f64::from(step % 5)
            } else {
                value + f64::from(step % 7)
            };
            let r = acc.add(SystemTime::UNIX_EPOCH, &[scrape("a", value, 0.0)]);
            let total = r.sum("sluice_requests_total", &[]);
            assert!(total >= last, "step {step}: {total} < {last}");
            last = total;
        }
    }
}
