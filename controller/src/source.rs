//! Sources of per-variant counters: where the controller reads what the filter counted.
//!
//! A source returns series values per origin (one Envoy, or one Prometheus target), the series
//! named by [`SeriesId`]s (see [`series`]). The [`Accumulator`] turns those into counters that
//! never go down: when any counter of an origin decreases, that origin restarted, so
//! everything it had counted before is carried forward instead of being read as negative
//! traffic. The sum over origins is a [`Reading`]: what the judge works on. A source that
//! cannot answer, or whose data is stale, returns an error; the rollout then sees "no data"
//! and holds.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

pub mod envoy_admin;
pub mod exposition;
pub mod prometheus;
pub mod series;

pub use exposition::Sample;
pub use series::{SeriesId, SeriesKey};

/// The series values of one origin at one scrape.
#[derive(Debug, Clone, PartialEq)]
pub struct OriginScrape {
    /// Stable name of the origin (admin URL, or Prometheus `job/instance`).
    pub origin: Arc<str>,
    /// The series of `values`, position by position. Shared: origins that wrote the same
    /// series in the same order hand over one list, so the accumulator maps it to its own
    /// indexes once, not once per origin.
    pub ids: Arc<[SeriesId]>,
    /// Shared: one Envoy answer serves every rollout reading it.
    pub values: Arc<Vec<f64>>,
}

impl OriginScrape {
    /// An origin's scrape from parsed samples (interning their series).
    pub fn from_samples(origin: &str, samples: Vec<Sample>) -> OriginScrape {
        OriginScrape {
            origin: Arc::from(origin),
            ids: samples
                .iter()
                .map(|s| series::intern(SeriesKey::of(s)))
                .collect(),
            values: Arc::new(samples.iter().map(|s| s.value).collect()),
        }
    }
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
    pub series: BTreeMap<Arc<SeriesKey>, f64>,
    /// Origin restarts detected so far, all origins together.
    pub restarts: u64,
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

/// One origin's counters, by local series index (see [`Accumulator`]); a series the origin
/// has not reported counts as 0.
#[derive(Debug, Default)]
struct OriginState {
    last: Vec<f64>,
    carried: Vec<f64>,
    restarts: u64,
}

/// Restart-proof accumulation of counters per origin.
///
/// The series this accumulator has seen get local indexes 0, 1, …; per-origin state is a
/// vector of values by local index, so a tick sums origins without map lookups.
#[derive(Debug, Default)]
pub struct Accumulator {
    /// Local index by series id (`u32::MAX`: not seen).
    local: Vec<u32>,
    keys: Vec<Arc<SeriesKey>>,
    origin_index: HashMap<Arc<str>, usize>,
    origins: Vec<OriginState>,
    current: Vec<f64>,
    /// The local indexes of the last id list seen (`NOT_LOCAL` for an unknown id).
    locals: (Arc<[SeriesId]>, Vec<usize>),
}

/// In [`Accumulator::locals`]: a series id this process never gave out.
const NOT_LOCAL: usize = usize::MAX;

impl Accumulator {
    /// The local index of series `id`, given one if new.
    fn local(&mut self, id: SeriesId) -> Option<usize> {
        let i = id as usize;
        if let Some(&l) = self.local.get(i) {
            if l != u32::MAX {
                return Some(l as usize);
            }
        }
        let key = series::key(id)?;
        if self.local.len() <= i {
            self.local.resize(i + 1, u32::MAX);
        }
        let l = self.keys.len();
        self.local[i] = u32::try_from(l).ok()?;
        self.keys.push(key);
        Some(l)
    }

    /// Folds in one scrape and returns the summed, monotone reading. Origins absent from
    /// `scrapes` keep contributing their last values (the source decides whether too many
    /// are missing).
    pub fn add(&mut self, at: SystemTime, scrapes: &[OriginScrape]) -> Reading {
        for scrape in scrapes {
            let (mut ids, mut locals) = std::mem::take(&mut self.locals);
            if !Arc::ptr_eq(&ids, &scrape.ids) {
                ids = scrape.ids.clone();
                locals.clear();
                for &id in ids.iter() {
                    locals.push(self.local(id).unwrap_or(NOT_LOCAL));
                }
            }
            let mut current = std::mem::take(&mut self.current);
            current.clear();
            current.resize(self.keys.len(), 0.0);
            for (&l, &value) in locals.iter().zip(scrape.values.iter()) {
                if l != NOT_LOCAL && value.is_finite() {
                    current[l] += value;
                }
            }
            self.locals = (ids, locals);
            let o = match self.origin_index.get(&scrape.origin) {
                Some(&o) => o,
                None => {
                    self.origins.push(OriginState::default());
                    self.origin_index
                        .insert(scrape.origin.clone(), self.origins.len() - 1);
                    self.origins.len() - 1
                }
            };
            let state = &mut self.origins[o];
            // A series that went down, or vanished, means the origin restarted.
            let restarted = state
                .last
                .iter()
                .enumerate()
                .any(|(l, old)| current.get(l).copied().unwrap_or(0.0) < *old);
            if restarted {
                state.restarts += 1;
                state
                    .carried
                    .resize(current.len().max(state.carried.len()), 0.0);
                for (c, old) in state.carried.iter_mut().zip(&state.last) {
                    *c += old;
                }
            }
            std::mem::swap(&mut state.last, &mut current);
            self.current = current;
        }
        let mut totals = vec![0.0; self.keys.len()];
        let mut restarts = 0;
        for state in &self.origins {
            for (t, v) in totals.iter_mut().zip(&state.last) {
                *t += v;
            }
            for (t, v) in totals.iter_mut().zip(&state.carried) {
                *t += v;
            }
            restarts += state.restarts;
        }
        Reading {
            at: Some(at),
            series: self.keys.iter().cloned().zip(totals).collect(),
            restarts,
        }
    }

    /// Restarts detected so far of origin `origin`.
    pub fn restarts_of(&self, origin: &str) -> u64 {
        self.origin_index
            .get(origin)
            .map_or(0, |&o| self.origins[o].restarts)
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
        OriginScrape::from_samples(
            origin,
            vec![
                sample("sluice_requests_total", "canary", requests),
                sample("sluice_errors_total", "canary", errors),
            ],
        )
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
        assert_eq!(acc.restarts_of("a"), 1);
        assert_eq!(acc.restarts_of("b"), 0);
        assert_eq!(r.restarts, 1);
        let r = acc.add(SystemTime::UNIX_EPOCH, &[scrape("a", 10.0, 8.0)]);
        assert_eq!(r.sum("sluice_requests_total", &[]), 100.0 + 10.0 + 60.0);
    }

    #[test]
    fn origins_sharing_an_id_list_add_up_as_origins_with_lists_of_their_own() {
        let a = scrape("a", 10.0, 1.0);
        let shared = OriginScrape {
            origin: Arc::from("b"),
            ids: a.ids.clone(),
            values: Arc::new(vec![5.0, 2.0]),
        };
        // The same series in the other order, in a list of its own.
        let reversed = OriginScrape {
            origin: Arc::from("c"),
            ids: a.ids.iter().rev().copied().collect(),
            values: Arc::new(vec![3.0, 20.0]),
        };
        let own = |o: &OriginScrape| OriginScrape {
            ids: o.ids.iter().copied().collect(),
            ..o.clone()
        };
        let scrapes = [a, shared, reversed.clone(), reversed];
        let mut acc = Accumulator::default();
        let r = acc.add(SystemTime::UNIX_EPOCH, &scrapes);
        let mut separate = Accumulator::default();
        let own: Vec<OriginScrape> = scrapes.iter().map(own).collect();
        assert_eq!(r, separate.add(SystemTime::UNIX_EPOCH, &own));
        assert_eq!(r.sum("sluice_requests_total", &[]), 10.0 + 5.0 + 20.0);
        assert_eq!(r.sum("sluice_errors_total", &[]), 1.0 + 2.0 + 3.0);
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
