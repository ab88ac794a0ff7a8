//! The configuration each proxy runs, as the filter itself reports it: the gauge
//! `sluice_config_revision{experiment}` holds the push version of the configuration the
//! filter took last (0 for one without a revision, such as a bootstrap's default).
//!
//! It is read per origin from a source's scrape, before the [`super::Accumulator`] sums
//! origins (a gauge summed over proxies means nothing, and one going down is not a restart).
//! The Istio sink is confirmed by it, and the daemon cross-checks every other sink's
//! confirmation with it.

use std::collections::BTreeMap;
use std::sync::Arc;

use sluice_filter::metrics::CONFIG_REVISION;

use super::{series, OriginScrape, SeriesId};

/// The revision each origin reports for one experiment. Origins that do not report the gauge
/// (a filter too old to write it, an origin that does not run the experiment) are absent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Revisions {
    pub by_origin: BTreeMap<Arc<str>, u64>,
}

/// Whether series `id` is the revision gauge of `experiment`.
fn is_revision(id: SeriesId, experiment: &str) -> bool {
    series::key(id)
        .is_some_and(|k| k.name == CONFIG_REVISION && k.label("experiment") == Some(experiment))
}

impl Revisions {
    /// The revisions of `experiment` in `scrapes`.
    pub fn of(scrapes: &[OriginScrape], experiment: &str) -> Revisions {
        // Origins running the same filter share one id list (see `OriginScrape::ids`): the
        // gauge's position is looked up once per list, not once per origin.
        let mut positions: Vec<(Arc<[SeriesId]>, Option<usize>)> = Vec::new();
        let mut by_origin = BTreeMap::new();
        for s in scrapes {
            let at = match positions.iter().find(|(ids, _)| Arc::ptr_eq(ids, &s.ids)) {
                Some((_, at)) => *at,
                None => {
                    let at = s.ids.iter().position(|&id| is_revision(id, experiment));
                    positions.push((s.ids.clone(), at));
                    at
                }
            };
            let Some(value) = at.and_then(|i| s.values.get(i)) else {
                continue;
            };
            if let Some(v) = version_of(*value) {
                by_origin.insert(s.origin.clone(), v);
            }
        }
        Revisions { by_origin }
    }

    /// Origins by the revision they report, lowest first.
    pub fn by_version(&self) -> BTreeMap<u64, Vec<&str>> {
        let mut out: BTreeMap<u64, Vec<&str>> = BTreeMap::new();
        for (origin, v) in &self.by_origin {
            out.entry(*v).or_default().push(origin);
        }
        out
    }

    /// Every origin reporting a revision other than `version`, with the one it reports.
    pub fn other_than(&self, version: u64) -> Vec<(&str, u64)> {
        self.by_origin
            .iter()
            .filter(|(_, v)| **v != version)
            .map(|(o, v)| (&**o, *v))
            .collect()
    }

    /// How the revisions spread, for messages: `2 at 7, 1 at 6 (http://b:9901)`; origins are
    /// named for every version but the most common, a few at most.
    pub fn describe(&self) -> String {
        if self.by_origin.is_empty() {
            return "no proxy reports a revision".into();
        }
        let by = self.by_version();
        let most = by
            .iter()
            .max_by_key(|(_, o)| o.len())
            .map(|(v, _)| *v)
            .unwrap_or_default();
        let mut parts: Vec<String> = Vec::new();
        for (v, origins) in by.iter().rev() {
            let mut part = format!("{} at {v}", origins.len());
            if *v != most {
                const NAMED: usize = 3;
                let mut named = origins[..origins.len().min(NAMED)].join(", ");
                if origins.len() > NAMED {
                    named.push_str(&format!(", {} more", origins.len() - NAMED));
                }
                part.push_str(&format!(" ({named})"));
            }
            parts.push(part);
        }
        parts.join(", ")
    }
}

/// A gauge value as a push version: a finite, non-negative whole number (the filter writes
/// one; anything else is not a version and is ignored).
fn version_of(value: f64) -> Option<u64> {
    (value.is_finite() && value >= 0.0 && value.fract() == 0.0 && value < u64::MAX as f64)
        .then_some(value as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::Sample;
    use sluice_filter::metrics;

    fn sample(name: &str, experiment: &str, value: f64) -> Sample {
        Sample {
            name: name.into(),
            labels: [
                ("experiment".into(), experiment.into()),
                ("instance".into(), "x".into()),
            ]
            .into(),
            value,
        }
    }

    fn scrape(origin: &str, samples: Vec<Sample>) -> OriginScrape {
        OriginScrape::from_samples(origin, samples)
    }

    #[test]
    fn each_origin_reports_its_own_revision_of_the_experiment() {
        let requests = |e: &str| Sample {
            labels: [
                ("experiment".into(), e.into()),
                ("variant".into(), "canary".into()),
            ]
            .into(),
            ..sample(metrics::REQUESTS, e, 40.0)
        };
        let scrapes = [
            scrape(
                "a",
                vec![
                    requests("rev-e"),
                    sample(CONFIG_REVISION, "rev-other", 9.0),
                    sample(CONFIG_REVISION, "rev-e", 7.0),
                ],
            ),
            scrape("b", vec![sample(CONFIG_REVISION, "rev-e", 6.0)]),
            // Counters only (a filter that does not write the gauge): not reporting.
            scrape("c", vec![requests("rev-e")]),
            // Not a version: ignored.
            scrape("d", vec![sample(CONFIG_REVISION, "rev-e", 2.5)]),
            scrape("e", vec![sample(CONFIG_REVISION, "rev-e", f64::NAN)]),
            scrape("f", vec![sample(CONFIG_REVISION, "rev-e", -1.0)]),
        ];
        let r = Revisions::of(&scrapes, "rev-e");
        let got: Vec<(&str, u64)> = r.by_origin.iter().map(|(o, v)| (&**o, *v)).collect();
        assert_eq!(got, vec![("a", 7), ("b", 6)]);
        assert_eq!(r.other_than(7), vec![("b", 6)]);
        assert_eq!(r.describe(), "1 at 7, 1 at 6 (b)");
        assert_eq!(
            Revisions::of(&scrapes, "rev-other").by_origin.len(),
            1,
            "the other experiment's gauge is its own"
        );
        assert!(Revisions::of(&scrapes, "rev-none").by_origin.is_empty());
    }

    #[test]
    fn origins_sharing_an_id_list_each_keep_their_value() {
        let first = scrape("a", vec![sample(CONFIG_REVISION, "rev-shared", 3.0)]);
        let mut second = first.clone();
        second.origin = Arc::from("b");
        second.values = Arc::new(vec![4.0]);
        let r = Revisions::of(&[first, second], "rev-shared");
        assert_eq!(r.by_origin.get("a"), Some(&3));
        assert_eq!(r.by_origin.get("b"), Some(&4));
    }

    #[test]
    fn the_description_names_the_minority() {
        let mut r = Revisions::default();
        for (i, v) in [5, 5, 5, 5, 4, 4, 4, 4, 0].into_iter().enumerate() {
            r.by_origin.insert(Arc::from(format!("p{i}")), v);
        }
        r.by_origin.insert(Arc::from("p9"), 4);
        assert_eq!(
            r.describe(),
            "4 at 5 (p0, p1, p2, 1 more), 5 at 4, 1 at 0 (p8)"
        );
        assert_eq!(
            Revisions::default().describe(),
            "no proxy reports a revision"
        );
    }
}
