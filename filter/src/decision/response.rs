//! Response side decisions, pure: which response headers counting needs, and which metric
//! updates a response makes. The host shim reads the headers, hands them over, and applies
//! the returned [`MetricUpdate`]s.

use super::MetricUpdate;
use crate::metrics::Catalog;
use crate::plan::Plan;
use crate::response::{self, Outcome};

/// A request's variant in one experiment, as the response sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Served {
    pub experiment: usize,
    pub variant: usize,
    /// Counted in the experiment's metrics (not a QA override).
    pub counted: bool,
}

/// What the host read of a counted response: the raw `:status`, Envoy's response code
/// details (read only for a non-2xx answer, see [`details_needed`]), and the time since the
/// request's headers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Answer<'a> {
    pub status: Option<&'a [u8]>,
    pub details: Option<&'a [u8]>,
    pub elapsed_ms: Option<u64>,
}

/// Whether the response code details are worth a property read: only a non-2xx answer can
/// be Envoy's own reply or an upstream reset.
pub fn details_needed(status: Option<&[u8]>) -> bool {
    status.and_then(response::status_class) != Some(1)
}

/// Whether counting reads more response headers than `:status`: an outcome or prediction
/// header of an experiment that counts this request. Then the shim fetches all of the
/// response's headers in one call rather than one call per header: a host call that returns a
/// value costs mostly its copy into the module, so one serialised map of a few headers beats
/// two or more single reads (docs/benchmarks.md, *Where the filter's time goes*).
pub fn reads_more_than_status(plan: &Plan, served: impl IntoIterator<Item = Served>) -> bool {
    served.into_iter().filter(|s| s.counted).any(|s| {
        plan.experiments.get(s.experiment).is_some_and(|e| {
            e.prediction.is_some() || e.outcomes.as_ref().is_some_and(|o| o.header.is_some())
        })
    })
}

/// The metric updates a response makes, appended to `out`: per experiment that served the
/// request, an error if its variant has no metrics; for a counted request its status class,
/// Envoy's local reply and upstream reset, its latency, its outcomes (unknown names counted
/// apart) and its prediction (or the prediction's being invalid). `header` finds a response
/// header's first value by its lower-case name.
pub fn count_response<'h>(
    plan: &Plan,
    catalog: &Catalog,
    served: impl IntoIterator<Item = Served>,
    answer: &Answer<'_>,
    header: impl Fn(&str) -> Option<&'h [u8]>,
    out: &mut Vec<MetricUpdate>,
) {
    let class = answer.status.and_then(response::status_class);
    for s in served {
        let (Some(exp), Some(em)) = (
            plan.experiments.get(s.experiment),
            catalog.experiments.get(s.experiment),
        ) else {
            continue;
        };
        let Some(vm) = em.variants.get(s.variant) else {
            out.push(MetricUpdate::Increment(em.errors));
            continue;
        };
        if !s.counted {
            continue;
        }
        if let Some(&c) = class.and_then(|c| vm.responses.get(c)) {
            out.push(MetricUpdate::Increment(c));
        }
        if let Some(d) = answer.details {
            if response::is_local_reply(d) {
                out.push(MetricUpdate::Increment(vm.local_replies));
            }
            if response::is_upstream_reset(d) {
                out.push(MetricUpdate::Increment(vm.upstream_resets));
            }
        }
        if let Some(ms) = answer.elapsed_ms {
            out.push(MetricUpdate::Record(vm.latency, ms));
        }
        if let Some((o, name)) = exp
            .outcomes
            .as_ref()
            .and_then(|o| Some((o, o.header.as_deref()?)))
        {
            if let Some(v) = header(name) {
                for outcome in response::outcomes(o, v) {
                    let pos = match outcome {
                        Outcome::Known(k) => vm.outcomes.get(k).copied(),
                        Outcome::Unknown => em.outcomes_unknown,
                    };
                    if let Some(pos) = pos {
                        out.push(MetricUpdate::Increment(pos));
                    }
                }
            }
        }
        if let (Some(p), Some(pos)) = (&exp.prediction, vm.prediction) {
            if let Some(v) = header(&p.header) {
                match response::prediction(p, v) {
                    Some(x) => out.push(MetricUpdate::Record(pos, x)),
                    None => {
                        if let Some(bad) = em.prediction_invalid {
                            out.push(MetricUpdate::Increment(bad));
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
