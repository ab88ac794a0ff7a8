//! Sources of per-variant counters: where the controller reads what the filter counted.
//!
//! A source returns raw series (name + labels → value) per origin (one Envoy, or one
//! Prometheus target). The [`Accumulator`] turns those into counters that never go down: when
//! any counter of an origin decreases, that origin restarted, so everything it had counted
//! before is carried forward instead of being read as negative traffic. The sum over origins is
//! a [`Reading`]: what the judge works on. A source that cannot answer, or whose data is stale,
//! returns an error; the rollout then sees "no data" and holds.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::hash::{Hash, Hasher};
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

/// One origin's counters, indexed by series id (see [`Accumulator`]); a series the origin has
/// not reported counts as 0.
#[derive(Debug, Default)]
struct OriginState {
    last: Vec<f64>,
    carried: Vec<f64>,
    restarts: u64,
}

/// Restart-proof accumulation of counters per origin.
///
/// Series keys are interned: each distinct series gets an id once, and per-origin state is a
/// vector of values by id, so a tick with many origins clones each series key once, not once
/// per origin, and sums origins without map lookups.
#[derive(Debug, Default)]
pub struct Accumulator {
    /// Series ids by a hash of the series' identity (collisions resolved by comparing).
    index: HashMap<u64, Vec<usize>>,
    keys: Vec<SeriesKey>,
    origins: BTreeMap<String, OriginState>,
}

/// Hash of a sample's series identity (name and non-origin labels), without allocating.
fn identity_hash(s: &Sample) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    s.name.hash(&mut h);
    for (k, v) in identity_labels(s) {
        k.hash(&mut h);
        v.hash(&mut h);
    }
    h.finish()
}

fn identity_labels(s: &Sample) -> impl Iterator<Item = (&str, &str)> {
    s.labels
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .filter(|(k, _)| !ORIGIN_LABELS.contains(k))
}

impl SeriesKey {
    /// Whether `s` belongs to this series.
    fn matches(&self, s: &Sample) -> bool {
        self.name == s.name
            && self
                .labels
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .eq(identity_labels(s))
    }
}

impl Accumulator {
    /// Folds in one scrape and returns the summed, monotone reading. Origins absent from
    /// `scrapes` keep contributing their last values (the source decides whether too many
    /// are missing).
    pub fn add(&mut self, at: SystemTime, scrapes: &[OriginScrape]) -> Reading {
        let mut current: Vec<f64> = Vec::new();
        for scrape in scrapes {
            current.clear();
            current.resize(self.keys.len(), 0.0);
            for s in &scrape.samples {
                if !s.value.is_finite() {
                    continue;
                }
                let bucket = self.index.entry(identity_hash(s)).or_default();
                let id = match bucket.iter().find(|&&id| self.keys[id].matches(s)) {
                    Some(&id) => id,
                    None => {
                        let id = self.keys.len();
                        bucket.push(id);
                        self.keys.push(SeriesKey::of(s));
                        current.push(0.0);
                        id
                    }
                };
                current[id] += s.value;
            }
            let state = self.origins.entry(scrape.origin.clone()).or_default();
            // A series that went down, or vanished, means the origin restarted.
            let restarted = state
                .last
                .iter()
                .enumerate()
                .any(|(id, old)| current.get(id).copied().unwrap_or(0.0) < *old);
            if restarted {
                state.restarts += 1;
                state
                    .carried
                    .resize(current.len().max(state.carried.len()), 0.0);
                for (c, old) in state.carried.iter_mut().zip(&state.last) {
                    *c += old;
                }
            }
            state.last.clone_from(&current);
        }
        let mut totals = vec![0.0; self.keys.len()];
        let mut reading = Reading {
            at: Some(at),
            ..Reading::default()
        };
        for (origin, state) in &self.origins {
            for (t, v) in totals.iter_mut().zip(&state.last) {
                *t += v;
            }
            for (t, v) in totals.iter_mut().zip(&state.carried) {
                *t += v;
            }
            reading.restarts.insert(origin.clone(), state.restarts);
        }
        reading.series = self.keys.iter().cloned().zip(totals).collect();
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
