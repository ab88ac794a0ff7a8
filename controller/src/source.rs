//! Sources of per-variant counters: where the controller reads what the filter counted.
//!
//! A source returns series values per origin (one Envoy, or one Prometheus target), the series
//! named by [`SeriesId`]s (see [`series`]), with the proxy's identity when it tells it (its
//! uptime and hot-restart epoch, see [`Identity`]). The [`Accumulator`] turns those into
//! counters that never go down: when an origin's process restarted, everything it had counted
//! before is carried forward instead of being read as negative traffic. A restart is told by
//! the identity (uptime back to a small value, a process that started after the last one was
//! last seen); only an origin without one falls back to "a counter went down". A series
//! missing from one scrape is not a restart: its last value stands. An endpoint whose answers
//! come from different proxies in turn is an error, never a string of restarts. The sum over
//! origins is a [`Reading`]: what the judge works on. A source that cannot answer, whose data
//! is stale, or whose answer is not what a proxy writes, returns an error; the rollout then
//! sees "no data" and holds.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

pub mod admin;
pub mod envoy_admin;
pub mod exposition;
pub mod prometheus;
pub mod revision;
pub mod series;

pub use exposition::Sample;
pub use series::{SeriesId, SeriesKey};

/// Bounds on what one scrape may make the controller read and hold (a source's `limits`):
/// past one the scrape fails, naming it, and the rollout holds. The defaults are far above
/// what the filter writes (a few hundred series per experiment, lines of about 200 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", try_from = "RawLimits")]
pub struct Limits {
    /// Longest line of a text exposition (a protobuf metric family may take the larger of
    /// this and 4 MiB).
    pub max_line_bytes: usize,
    /// Largest answer: one Envoy's, or one Prometheus query's.
    pub max_body_bytes: u64,
    /// Most `sluice_` series in one answer, kept or not.
    pub max_series: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_line_bytes: 8 << 10,
            max_body_bytes: 32 << 20,
            max_series: 20_000,
        }
    }
}

/// [`Limits`] as written, before its ranges are checked.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
struct RawLimits {
    max_line_bytes: usize,
    max_body_bytes: u64,
    max_series: usize,
}

impl Default for RawLimits {
    fn default() -> RawLimits {
        let d = Limits::default();
        RawLimits {
            max_line_bytes: d.max_line_bytes,
            max_body_bytes: d.max_body_bytes,
            max_series: d.max_series,
        }
    }
}

/// A limit outside its range, named by its field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {value} is outside {lo}..={hi}")]
pub struct LimitError {
    pub field: &'static str,
    pub value: u64,
    pub lo: u64,
    pub hi: u64,
}

impl TryFrom<RawLimits> for Limits {
    type Error = LimitError;

    fn try_from(r: RawLimits) -> Result<Limits, LimitError> {
        let check = |field: &'static str, value: u64, lo: u64, hi: u64| {
            if (lo..=hi).contains(&value) {
                Ok(())
            } else {
                Err(LimitError {
                    field,
                    value,
                    lo,
                    hi,
                })
            }
        };
        check("maxLineBytes", r.max_line_bytes as u64, 256, 16 << 20)?;
        check("maxBodyBytes", r.max_body_bytes, 64 << 10, 1 << 30)?;
        check(
            "maxSeries",
            r.max_series as u64,
            100,
            series::MAX_INTERNED as u64,
        )?;
        Ok(Limits {
            max_line_bytes: r.max_line_bytes,
            max_body_bytes: r.max_body_bytes,
            max_series: r.max_series,
        })
    }
}

impl Limits {
    /// The readers' form.
    pub fn caps(&self) -> exposition::Caps {
        exposition::Caps {
            line_bytes: self.max_line_bytes,
            body_bytes: self.max_body_bytes,
            series: self.max_series,
        }
    }
}

/// What an origin's proxy says about itself: which process answered.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Identity {
    /// Seconds the process has been up (Envoy's `server.uptime`; refreshed at each stats
    /// flush, so it may lag by up to the flush interval).
    pub uptime: f64,
    /// Envoy's `server.hot_restart_epoch`: goes up by one at each hot restart.
    pub hot_restart_epoch: f64,
    /// When the answer was asked for.
    pub at: SystemTime,
}

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
    /// The proxy's identity, if the answer told it.
    pub identity: Option<Identity>,
    /// Series of the answer not kept (other experiments' or variants the experiment does not
    /// have).
    pub unknown: usize,
}

impl OriginScrape {
    /// An origin's scrape from parsed samples (interning their series).
    pub fn from_samples(origin: &str, samples: Vec<Sample>) -> OriginScrape {
        OriginScrape {
            origin: Arc::from(origin),
            ids: samples.iter().map(|s| series::intern(s.key())).collect(),
            values: Arc::new(samples.iter().map(|s| s.value).collect()),
            identity: None,
            unknown: 0,
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
    #[error("{healthy} of {total} origins answered; at least {needed} are required (first failure: {first})")]
    TooFewOrigins {
        healthy: usize,
        total: usize,
        needed: usize,
        /// Why the first origin that failed did.
        first: String,
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
    /// Origins that did not tell their identity: their restarts are told by counters going
    /// down, which cannot tell a restart from another proxy answering.
    pub unidentified: usize,
    /// Series read in the last scrape but not kept (unknown variants or experiments).
    pub unknown: usize,
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

/// A process start later than this before the last answer of the previous process is still
/// a restart (uptime is whole seconds, and answer and clock differ by a little).
const START_SLACK: f64 = 2.0;

/// How much faster than the clock one process' uptime may seem to advance: it is refreshed
/// at each stats flush, so a stale reading followed by a fresh one jumps by up to the flush
/// interval.
const FLUSH_SLACK: f64 = 60.0;

/// The process an origin's answers came from lately.
#[derive(Debug, Clone, Copy)]
struct Process {
    uptime: f64,
    epoch: f64,
    /// When it was last seen (Unix seconds).
    seen_at: f64,
}

/// One origin's counters, by local series index (see [`Accumulator`]).
#[derive(Debug, Default)]
struct OriginState {
    /// Last value of each series (`NaN`: never seen since the process started).
    last: Vec<f64>,
    carried: Vec<f64>,
    restarts: u64,
    process: Option<Process>,
    /// Why this origin's answers cannot be counted any more: once answers from two proxies
    /// were mixed, no later answer can be told apart.
    broken: Option<String>,
    /// Whether the lack of an identity was logged.
    warned: bool,
    /// Whether series not kept were logged.
    warned_unknown: bool,
}

/// How an origin's new answer relates to its last one.
enum Step {
    Same,
    Restart,
    Broken(String),
}

const ALTERNATES: &str = "endpoint alternates between proxies";

impl OriginState {
    /// Classifies a scrape with values `current` (`NaN`: absent) and identity `identity`.
    fn step(&self, current: &[f64], identity: Option<&Identity>) -> Step {
        let went_down = self
            .last
            .iter()
            .zip(current)
            .any(|(old, new)| !new.is_nan() && new < old);
        let (Some(id), Some(p)) = (identity, self.process) else {
            return if went_down && identity.is_none() {
                Step::Restart
            } else {
                Step::Same
            };
        };
        let at = unix(id.at);
        if id.hot_restart_epoch > p.epoch {
            return Step::Restart;
        }
        if id.hot_restart_epoch < p.epoch {
            return Step::Broken(format!(
                "{ALTERNATES}: the hot-restart epoch went back from {} to {}",
                p.epoch, id.hot_restart_epoch
            ));
        }
        // A process that started after the last answer came (as far as whole seconds of an
        // uptime refreshed at each stats flush tell) may be a restart; one that started
        // before cannot be: it was running alongside the one that answered.
        let started = at - id.uptime;
        let fresh = started + START_SLACK >= p.seen_at;
        let other = |what: String| {
            Step::Broken(format!(
                "{ALTERNATES}: {what}; point the source at each proxy's own admin address"
            ))
        };
        if id.uptime < p.uptime {
            if fresh {
                return Step::Restart;
            }
            return other(format!(
                "a proxy up {}s answered after one up {}s, {:.0}s earlier (it started before the other was last seen, so it is not a restart)",
                id.uptime,
                p.uptime,
                at - p.seen_at
            ));
        }
        if id.uptime - p.uptime > (at - p.seen_at) + FLUSH_SLACK {
            return other(format!(
                "uptime went from {}s to {}s in {:.0}s",
                p.uptime,
                id.uptime,
                at - p.seen_at
            ));
        }
        if went_down {
            // Uptime did not go down, yet counters did: a restart soon after the last answer
            // (the new process is already older than the old one was), or another proxy.
            if fresh {
                return Step::Restart;
            }
            return other(format!(
                "counters went down while the proxy's uptime kept rising ({}s to {}s; or its counters were reset)",
                p.uptime, id.uptime
            ));
        }
        Step::Same
    }
}

fn unix(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
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
        // Gauges, read per origin (see [`revision`], and the daemon's breaker watch): summed,
        // or read as a counter that went down, they would be wrong.
        if key.name == sluice_filter::metrics::CONFIG_REVISION
            || key.name == sluice_filter::metrics::BREAKER_TRIPPED
        {
            return None;
        }
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
    /// are missing), and so do series absent from an origin's scrape. An error when an
    /// origin's answers came from different proxies (from then on, for good): the other
    /// origins are still folded in.
    pub fn add(
        &mut self,
        at: SystemTime,
        scrapes: &[OriginScrape],
    ) -> Result<Reading, SourceError> {
        let mut failure = None;
        let mut unknown = 0;
        for scrape in scrapes {
            unknown += scrape.unknown;
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
            current.resize(self.keys.len(), f64::NAN);
            for (&l, &value) in locals.iter().zip(scrape.values.iter()) {
                if l != NOT_LOCAL && value.is_finite() {
                    let c = &mut current[l];
                    *c = if c.is_nan() { value } else { *c + value };
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
            state.last.resize(current.len(), f64::NAN);
            state.carried.resize(current.len(), 0.0);
            if state.broken.is_none() {
                match state.step(&current, scrape.identity.as_ref()) {
                    Step::Broken(reason) => state.broken = Some(reason),
                    Step::Restart => {
                        state.restarts += 1;
                        for (c, old) in state.carried.iter_mut().zip(&state.last) {
                            if !old.is_nan() {
                                *c += old;
                            }
                        }
                        // What the new process has not written yet, it has not counted.
                        for (l, c) in state.last.iter_mut().zip(&current) {
                            *l = if c.is_nan() { 0.0 } else { *c };
                        }
                    }
                    Step::Same => {
                        // A series missing this time keeps its last value.
                        for (l, c) in state.last.iter_mut().zip(&current) {
                            if !c.is_nan() {
                                *l = *c;
                            }
                        }
                    }
                }
                if scrape.unknown > 0 && !state.warned_unknown {
                    state.warned_unknown = true;
                    tracing::warn!(origin = %scrape.origin, series = scrape.unknown, "the origin writes series of variants the experiment does not have, or with labels the filter does not write: counted, not kept");
                }
                if scrape.identity.is_none() && !state.warned {
                    state.warned = true;
                    tracing::warn!(origin = %scrape.origin, "the origin does not tell its uptime: a counter going down is taken for a restart, which cannot tell a restart from another proxy answering");
                }
                if state.broken.is_none() {
                    state.process = scrape.identity.map(|id| Process {
                        uptime: id.uptime,
                        epoch: id.hot_restart_epoch,
                        seen_at: unix(id.at),
                    });
                }
            }
            if let Some(reason) = &state.broken {
                failure.get_or_insert_with(|| SourceError::Invalid {
                    origin: scrape.origin.to_string(),
                    reason: reason.clone(),
                });
            }
            self.current = current;
        }
        if let Some(e) = failure {
            return Err(e);
        }
        let mut totals = vec![0.0; self.keys.len()];
        let mut restarts = 0;
        let mut unidentified = 0;
        for state in &self.origins {
            for (t, v) in totals.iter_mut().zip(&state.last) {
                if !v.is_nan() {
                    *t += v;
                }
            }
            for (t, v) in totals.iter_mut().zip(&state.carried) {
                *t += v;
            }
            restarts += state.restarts;
            if state.process.is_none() {
                unidentified += 1;
            }
        }
        Ok(Reading {
            at: Some(at),
            series: self.keys.iter().cloned().zip(totals).collect(),
            restarts,
            unidentified,
            unknown,
        })
    }

    /// Restarts detected so far of origin `origin`.
    pub fn restarts_of(&self, origin: &str) -> u64 {
        self.origin_index
            .get(origin)
            .map_or(0, |&o| self.origins[o].restarts)
    }
}

#[cfg(test)]
pub(crate) mod tests;
