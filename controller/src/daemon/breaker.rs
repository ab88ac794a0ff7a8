//! The filter's breaker as the controller sees it.
//!
//! The filter takes a failing treatment out of traffic by itself, within a second, and says so
//! with two series (`sluice_filter::metrics`): the gauge `sluice_breaker_tripped{experiment,
//! variant}` (1 while the treatment is tripped, per proxy; a new push version clears it) and the
//! counter `sluice_breaker_trips_total{experiment, variant, reason}`, which survives that push.
//! The daemon reads both at every evaluation and treats either for the rollout's treatment as a
//! rollback already made by the data plane: it rolls the state back with cause `breaker`, pushes
//! weight 0, and does not raise again (a rolled-back rollout is final).
//!
//! - The counter is read from the [`Reading`] (summed over proxies, across their restarts) as
//!   an increase over its value at the first reading of this process, so trips of an earlier
//!   rollout of the same experiment do not count.
//! - The gauge is read per proxy, before the sum (a gauge going from 1 to 0 at the clearing
//!   push is not a counter reset), and only from proxies that report running one of this
//!   rollout's push versions: a proxy still serving an older run's configuration may still
//!   show that run's trip. The gauge covers a trip the counter cannot show as an increase: one
//!   made while no controller ran, already in the first reading after a restart.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sluice_filter::metrics::{BREAKER_TRIPPED, BREAKER_TRIPS};

use crate::source::revision::Revisions;
use crate::source::{series, OriginScrape, Reading, SeriesId};

/// The proxies whose breaker gauge says `treatment` of `experiment` is tripped, among those
/// reporting one of `versions` as their configuration revision.
pub fn tripped_proxies(
    scrapes: &[OriginScrape],
    experiment: &str,
    treatment: &str,
    versions: &[u64],
) -> Vec<Arc<str>> {
    let revisions = Revisions::of(scrapes, experiment);
    let is_gauge = |id: SeriesId| {
        series::key(id).is_some_and(|k| {
            k.name == BREAKER_TRIPPED
                && k.label("experiment") == Some(experiment)
                && k.label("variant") == Some(treatment)
        })
    };
    let mut out = Vec::new();
    for s in scrapes {
        let current = revisions
            .by_origin
            .get(&s.origin)
            .is_some_and(|v| versions.contains(v));
        if !current {
            continue;
        }
        let tripped = s
            .ids
            .iter()
            .zip(s.values.iter())
            .any(|(&id, &v)| v >= 0.5 && is_gauge(id));
        if tripped {
            out.push(s.origin.clone());
        }
    }
    out
}

/// Trips of `treatment` by reason, as summed in `reading`.
fn trips_of(reading: &Reading, experiment: &str, treatment: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for (k, v) in &reading.series {
        if k.name == BREAKER_TRIPS
            && k.label("experiment") == Some(experiment)
            && k.label("variant") == Some(treatment)
        {
            let reason = k.label("reason").unwrap_or("").to_string();
            *out.entry(reason).or_insert(0) += v.max(0.0).round() as u64;
        }
    }
    out
}

/// Trip counts at the first reading of this process, against which new trips are counted.
#[derive(Debug, Clone, Default)]
pub struct Watch {
    baseline: Option<BTreeMap<String, u64>>,
}

impl Watch {
    /// Trips of `treatment` by reason since the first reading this watch saw (none at that
    /// first reading: what was counted before is another rollout's or an earlier process's).
    pub fn new_trips(
        &mut self,
        reading: &Reading,
        experiment: &str,
        treatment: &str,
    ) -> BTreeMap<String, u64> {
        let now = trips_of(reading, experiment, treatment);
        let base = self.baseline.get_or_insert_with(|| now.clone());
        now.into_iter()
            .filter_map(|(reason, n)| {
                let new = n.saturating_sub(base.get(&reason).copied().unwrap_or(0));
                (new > 0).then_some((reason, new))
            })
            .collect()
    }
}

/// A trip of the rollout's treatment, as the controller saw it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trip {
    pub variant: String,
    /// The failure kind that tripped it (`5xx`, `reset`, `local_reply`, `timeout`): the one
    /// most new trips name; `None` when only gauges show it.
    pub reason: Option<String>,
    /// New trips by reason, summed over proxies.
    pub trips: BTreeMap<String, u64>,
    /// The proxies whose gauge showed it tripped.
    pub tripped_on: Vec<String>,
    /// When the controller saw it (Unix seconds).
    pub seen_at: f64,
}

impl Trip {
    /// A trip, if `trips` or `tripped_on` show one.
    pub fn of(
        variant: &str,
        trips: BTreeMap<String, u64>,
        tripped_on: Vec<Arc<str>>,
        seen_at: f64,
    ) -> Option<Trip> {
        if trips.is_empty() && tripped_on.is_empty() {
            return None;
        }
        // Most trips first; ties go to the first reason in name order (deterministic).
        let reason = trips
            .iter()
            .fold(None::<(&String, u64)>, |best, (r, &n)| match best {
                Some((_, m)) if m >= n => best,
                _ => Some((r, n)),
            })
            .map(|(r, _)| r.clone());
        Some(Trip {
            variant: variant.to_string(),
            reason,
            trips,
            tripped_on: tripped_on.iter().map(|o| o.to_string()).collect(),
            seen_at,
        })
    }

    /// The rollback reason: what tripped, where, and that the data plane already acted.
    pub fn describe(&self) -> String {
        let n: u64 = self.trips.values().sum();
        let why = self
            .reason
            .as_deref()
            .map(|r| format!(" on {r} failures"))
            .unwrap_or_default();
        let mut where_ = Vec::new();
        if n > 0 {
            where_.push(format!("{n} trip{}", if n == 1 { "" } else { "s" }));
        }
        if !self.tripped_on.is_empty() {
            where_.push(format!(
                "tripped on {} prox{}",
                self.tripped_on.len(),
                if self.tripped_on.len() == 1 {
                    "y"
                } else {
                    "ies"
                }
            ));
        }
        format!(
            "breaker: the data plane took {}{why} out of traffic ({})",
            self.variant,
            where_.join(", ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::{Accumulator, Sample};
    use sluice_filter::metrics::CONFIG_REVISION;
    use std::time::SystemTime;

    fn sample(name: &str, labels: &[(&str, &str)], value: f64) -> Sample {
        Sample {
            name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            value,
        }
    }

    fn gauge(e: &str, variant: &str, v: f64) -> Sample {
        sample(
            BREAKER_TRIPPED,
            &[("experiment", e), ("variant", variant)],
            v,
        )
    }

    fn revision(e: &str, v: f64) -> Sample {
        sample(CONFIG_REVISION, &[("experiment", e)], v)
    }

    fn trips(e: &str, variant: &str, reason: &str, v: f64) -> Sample {
        sample(
            BREAKER_TRIPS,
            &[("experiment", e), ("variant", variant), ("reason", reason)],
            v,
        )
    }

    fn scrape(origin: &str, samples: Vec<Sample>) -> OriginScrape {
        OriginScrape::from_samples(origin, samples)
    }

    #[test]
    fn a_gauge_counts_only_for_the_treatment_on_a_proxy_running_this_rollouts_version() {
        let e = "brk-g";
        let scrapes = [
            scrape("a", vec![revision(e, 4.0), gauge(e, "canary", 1.0)]),
            scrape("b", vec![revision(e, 4.0), gauge(e, "canary", 0.0)]),
            // An older run's configuration, still showing its trip.
            scrape("c", vec![revision(e, 9.0), gauge(e, "canary", 1.0)]),
            // No revision: cannot tell whose trip it is.
            scrape("d", vec![gauge(e, "canary", 1.0)]),
            // Another variant, another experiment.
            scrape("e", vec![revision(e, 4.0), gauge(e, "other", 1.0)]),
            scrape(
                "f",
                vec![
                    revision(e, 4.0),
                    revision("x", 4.0),
                    gauge("x", "canary", 1.0),
                ],
            ),
            // The pending version counts too.
            scrape("g", vec![revision(e, 5.0), gauge(e, "canary", 1.0)]),
        ];
        let got = tripped_proxies(&scrapes, e, "canary", &[4, 5]);
        let got: Vec<&str> = got.iter().map(|o| &**o).collect();
        assert_eq!(got, vec!["a", "g"]);
        assert!(tripped_proxies(&scrapes, e, "canary", &[7]).is_empty());
    }

    fn reading(acc: &mut Accumulator, samples: Vec<Sample>) -> Reading {
        acc.add(SystemTime::now(), &[scrape("p", samples)])
            .expect("a reading")
    }

    #[test]
    fn trips_counted_before_the_first_reading_are_not_new() {
        let e = "brk-c";
        let mut acc = Accumulator::default();
        let mut w = Watch::default();
        let first = reading(&mut acc, vec![trips(e, "canary", "5xx", 3.0)]);
        assert!(w.new_trips(&first, e, "canary").is_empty());
        let same = reading(&mut acc, vec![trips(e, "canary", "5xx", 3.0)]);
        assert!(w.new_trips(&same, e, "canary").is_empty());
        let more = reading(
            &mut acc,
            vec![
                trips(e, "canary", "5xx", 4.0),
                trips(e, "canary", "reset", 2.0),
                trips(e, "stable", "5xx", 9.0),
            ],
        );
        let got = w.new_trips(&more, e, "canary");
        assert_eq!(
            got,
            BTreeMap::from([("5xx".to_string(), 1), ("reset".to_string(), 2)])
        );
        let trip = Trip::of("canary", got, Vec::new(), 1.0).expect("a trip");
        assert_eq!(trip.reason.as_deref(), Some("reset"));
        assert_eq!(
            trip.describe(),
            "breaker: the data plane took canary on reset failures out of traffic (3 trips)"
        );
    }

    #[test]
    fn a_gauge_going_back_to_zero_does_not_break_the_reading() {
        // The clearing push sets the gauge from 1 to 0 while the proxy keeps running: summed as
        // a counter, that would read as a counter reset of a live proxy and fail the source.
        let e = "brk-z";
        let mut acc = Accumulator::default();
        let ids = |v: f64, uptime: f64| {
            let mut s = scrape(
                "p",
                vec![
                    gauge(e, "canary", v),
                    sample("sluice_requests_total", &[("experiment", e)], 10.0),
                ],
            );
            s.identity = Some(crate::source::Identity {
                uptime,
                hot_restart_epoch: 0.0,
                at: SystemTime::now(),
            });
            s
        };
        acc.add(SystemTime::now(), &[ids(1.0, 100.0)])
            .expect("first");
        let r = acc.add(SystemTime::now(), &[ids(0.0, 100.5)]);
        assert!(r.is_ok(), "{r:?}");
        assert_eq!(r.expect("second").restarts, 0);
    }

    #[test]
    fn no_trip_without_trips_or_gauges_and_gauges_alone_trip() {
        assert_eq!(Trip::of("c", BTreeMap::new(), Vec::new(), 0.0), None);
        let t = Trip::of("c", BTreeMap::new(), vec![Arc::from("http://a")], 2.0).expect("trip");
        assert_eq!(t.reason, None);
        assert_eq!(
            t.describe(),
            "breaker: the data plane took c out of traffic (tripped on 1 proxy)"
        );
    }
}
