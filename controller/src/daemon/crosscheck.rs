//! The data plane's word against the sinks': at each evaluation the revision every proxy
//! reports (`sluice_config_revision`, read from the same scrape as the counters) is compared
//! with the version the sinks confirmed. A sink can be wrong about what the proxies run: an
//! Envoy it does not know of (not among an ECDS file sink's `proxies`, a proxy that never
//! subscribed to the ECDS server), one that went back to its bootstrap's default. When a
//! proxy reports another version, the disagreement is written to the audit log and the
//! rollout holds until every reporting proxy runs the confirmed version.
//!
//! Right after a confirmation a proxy may still report the version before: its report can be
//! older than the confirmation (a Prometheus source serves data up to `maxAge` old, an
//! Envoy's workers take the new configuration one after another). An older version is
//! therefore tolerated for a grace period after the confirmation; a newer or unknown one,
//! or an older one after the grace, is a disagreement. Proxies that report no revision (a
//! filter too old to write the gauge) are not checked; with none reporting, there is
//! nothing to cross-check.

use std::collections::BTreeMap;

use super::{Assess, Clock, Runner, TaskError};
use crate::rollout::{Judgement, Phase, State};
use crate::sink::Sink;
use crate::source::revision::Revisions;
use crate::source::{OriginScrape, Source};
use crate::spec::{Checked, SourceSpec};

/// The cross-check's state in a rollout task.
#[derive(Debug, Default)]
pub(super) struct CrossCheck {
    /// The disagreement last seen, if any.
    pub(super) disagreement: Option<String>,
}

/// How long after a confirmation a proxy may still report an older version: two evaluation
/// intervals (at least 5 s) plus how old the source's data may be.
pub(super) fn grace(checked: &Checked) -> f64 {
    let spec = &checked.rollout.spec;
    let delay = spec
        .sources
        .iter()
        .map(|s| match s {
            SourceSpec::Prometheus(p) => p.max_age.as_secs_f64(),
            SourceSpec::EnvoyAdmin(_) => 0.0,
        })
        .fold(0.0, f64::max);
    (2.0 * spec.schedule.interval.as_secs_f64()).max(5.0) + delay
}

/// Whether `revisions` disagree with `state`'s confirmed version at `now`; `None` when they
/// agree or there is nothing to check (a push in flight, nothing pushed yet).
pub(super) fn disagreement(
    revisions: &Revisions,
    state: &State,
    now: f64,
    grace: f64,
) -> Option<String> {
    if state.pending.is_some() || state.phase == Phase::Pending || state.version == 0 {
        return None;
    }
    let version = state.version;
    let settling = now - state.since < grace;
    let mut wrong: Vec<(&str, u64)> = revisions
        .other_than(version)
        .into_iter()
        .filter(|(_, v)| !(settling && *v < version))
        .collect();
    if wrong.is_empty() {
        return None;
    }
    wrong.sort_by_key(|(o, v)| (*v, *o));
    let mut by: BTreeMap<u64, Vec<&str>> = BTreeMap::new();
    for (o, v) in &wrong {
        by.entry(*v).or_default().push(o);
    }
    const NAMED: usize = 3;
    let parts: Vec<String> = by
        .iter()
        .map(|(v, origins)| {
            let mut named = origins[..origins.len().min(NAMED)].join(", ");
            if origins.len() > NAMED {
                named.push_str(&format!(" and {} more", origins.len() - NAMED));
            }
            format!("{named} at {v}")
        })
        .collect();
    Some(format!(
        "{} of {} proxies reporting run another version than the confirmed {version}: {}",
        wrong.len(),
        revisions.by_origin.len(),
        parts.join("; ")
    ))
}

impl<S, K, A, C> Runner<S, K, A, C>
where
    S: Source + Send + Sync,
    K: Sink + Send + Sync,
    A: Assess,
    C: Clock,
{
    /// Compares the revisions in `scraped` with the confirmed version, auditing each change
    /// of the verdict; the reason to hold, if any.
    pub(super) async fn cross_check(
        &mut self,
        scraped: &[OriginScrape],
        now: f64,
    ) -> Result<Option<String>, TaskError> {
        let experiment = &self.task.checked.rollout.spec.experiment.name;
        let revisions = Revisions::of(scraped, experiment);
        let mut by_version = BTreeMap::new();
        for v in revisions.by_origin.values() {
            *by_version.entry(*v).or_insert(0usize) += 1;
        }
        self.status.proxies_by_revision = by_version;
        let found = disagreement(&revisions, &self.state, now, self.cross_grace);
        if found != self.cross.disagreement {
            let record = match &found {
                Some(reason) => {
                    tracing::warn!(rollout = %self.status.name, %reason, "the data plane disagrees with the sinks");
                    serde_json::json!({
                        "at": now, "rollout": self.status.name, "record": "crosscheck",
                        "agrees": false, "version": self.state.version, "reason": reason,
                        "proxies": revisions.by_origin,
                    })
                }
                None => serde_json::json!({
                    "at": now, "rollout": self.status.name, "record": "crosscheck",
                    "agrees": true, "version": self.state.version,
                    "proxies": revisions.by_origin.len(),
                }),
            };
            self.task.store.audit(&record).await?;
            self.cross.disagreement = found.clone();
        }
        Ok(found)
    }
}

/// The judgement an evaluation gives when the data plane disagrees: a hold, unless the judge
/// found harm (a rollback acts whatever the proxies run).
pub(super) fn hold_on(judgement: Judgement, reason: &str) -> Judgement {
    match judgement {
        Judgement::Fail { .. } => judgement,
        _ => Judgement::Hold {
            reason: format!("the data plane disagrees with the sinks' confirmation: {reason}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::PendingPush;
    use std::sync::Arc;

    fn revisions(of: &[(&str, u64)]) -> Revisions {
        Revisions {
            by_origin: of.iter().map(|(o, v)| (Arc::from(*o), *v)).collect(),
        }
    }

    fn state(version: u64, since: f64) -> State {
        State {
            version,
            since,
            phase: Phase::Canary { index: 0 },
            ..State::new("r", 0.0)
        }
    }

    #[test]
    fn an_older_version_is_tolerated_only_while_the_confirmation_settles() {
        let r = revisions(&[("a", 7), ("b", 6)]);
        let s = state(7, 100.0);
        assert_eq!(disagreement(&r, &s, 104.0, 5.0), None);
        let found = disagreement(&r, &s, 105.0, 5.0).unwrap_or_default();
        assert_eq!(
            found,
            "1 of 2 proxies reporting run another version than the confirmed 7: b at 6"
        );
    }

    #[test]
    fn a_newer_or_default_version_disagrees_at_once_unless_a_push_is_in_flight() {
        let s = state(7, 100.0);
        let found = disagreement(&revisions(&[("a", 7), ("b", 8)]), &s, 100.5, 5.0);
        assert!(found.is_some_and(|f| f.contains("b at 8")));
        // A default config (revision 0) is older: tolerated while settling, not after.
        let zero = revisions(&[("a", 7), ("b", 0), ("c", 0), ("d", 0), ("e", 0), ("f", 3)]);
        let found = disagreement(&zero, &s, 200.0, 5.0).unwrap_or_default();
        assert_eq!(
            found,
            "5 of 6 proxies reporting run another version than the confirmed 7: b, c, d and 1 more at 0; f at 3"
        );
        let mut pushing = s.clone();
        pushing.pending = Some(PendingPush {
            version: 8,
            weight: 10.0,
            decided_at: 150.0,
        });
        assert_eq!(disagreement(&zero, &pushing, 200.0, 5.0), None);
        let mut before = s;
        before.phase = Phase::Pending;
        assert_eq!(disagreement(&zero, &before, 200.0, 5.0), None);
    }

    #[test]
    fn nothing_reported_is_nothing_to_disagree_with() {
        assert_eq!(
            disagreement(&Revisions::default(), &state(7, 0.0), 1e9, 5.0),
            None
        );
    }
}
