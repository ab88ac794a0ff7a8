//! The shadow shim's decisions: which counters a copy updates when it is taken, skipped or
//! ends, and how a comparison becomes counters, histogram values and disagreement lines.

use super::MetricUpdate;
use crate::metrics::ShadowMetrics;
use crate::plan::Plan;
use crate::shadow::{self, Answer, Fate, FieldResult, Sampling, Shadow, Skip};

/// The counters of a sampling decision: a copy taken counts in the requests, and a copy
/// taken but skipped at once also in its skip reason.
pub fn sampled(m: &ShadowMetrics, sampling: Sampling) -> Vec<MetricUpdate> {
    match sampling {
        Sampling::NotSampled => Vec::new(),
        Sampling::Taken => vec![MetricUpdate::Increment(m.requests)],
        Sampling::Skipped(reason) => [
            Some(MetricUpdate::Increment(m.requests)),
            skipped(m, reason),
        ]
        .into_iter()
        .flatten()
        .collect(),
    }
}

/// The headers of a copy of a request of `plan` (see [`shadow::copy_headers`]): neither the
/// `routing` headers set for it nor any experiment's override token header are copied, so the
/// shadow routes the copy itself and never sees a token; `marker` marks it as a copy.
pub fn copy_headers(
    plan: &Plan,
    cfg: &Shadow,
    original: &[u8],
    routing: &[&str],
    marker: &str,
) -> Vec<(String, String)> {
    let mut skip: Vec<&str> = routing.to_vec();
    skip.extend(
        plan.experiments
            .iter()
            .filter_map(|e| Some(e.qa_override.as_ref()?.token_header.as_str())),
    );
    shadow::copy_headers(cfg, original, &skip, marker)
}

/// The latency of a copy whose shadow answered, in `elapsed_ms` since it was sent.
pub fn answered(m: &ShadowMetrics, elapsed_ms: u64) -> MetricUpdate {
    MetricUpdate::Record(m.latency, elapsed_ms)
}

/// The counter of a copy skipped for `reason`.
pub fn skipped(m: &ShadowMetrics, reason: Skip) -> Option<MetricUpdate> {
    m.skipped
        .get(reason.index())
        .map(|&pos| MetricUpdate::Increment(pos))
}

/// The counter of a copy's end, for every fate but [`Fate::Compared`] (whose counters come
/// from [`compared`]).
pub fn ended(m: &ShadowMetrics, fate: Fate) -> Option<MetricUpdate> {
    match fate {
        Fate::Timeout => Some(MetricUpdate::Increment(m.timeouts)),
        Fate::Error => Some(MetricUpdate::Increment(m.errors)),
        Fate::Skipped(reason) => skipped(m, reason),
        Fate::Compared => None,
    }
}

/// One line of a disagreement log: the field and both sides' values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disagreement {
    pub field: String,
    pub primary: String,
    pub shadow: String,
}

/// A compared copy's effects.
#[derive(Debug, Clone, PartialEq)]
pub struct Compared {
    pub updates: Vec<MetricUpdate>,
    /// What disagreed, in order: status, body, then the configured fields.
    pub disagreements: Vec<Disagreement>,
}

/// Compares the shadow's answer with the primary's and turns the result into effects: the
/// copy is compared; a 5xx from the shadow is counted; status, body (if compared) and each
/// configured field agree or disagree (a field a side lacks is missing); a numeric field's
/// difference goes to its positive or negative delta histogram.
pub fn compared(cfg: &Shadow, m: &ShadowMetrics, primary: &Answer, copy: &Answer) -> Compared {
    let c = shadow::compare(cfg, primary, copy);
    let mut updates = vec![MetricUpdate::Increment(m.compared)];
    if (500..600).contains(&copy.status) {
        updates.push(MetricUpdate::Increment(m.five_xx));
    }
    let verdict = |updates: &mut Vec<MetricUpdate>, i: usize, agree: bool| {
        let list = if agree { &m.agree } else { &m.disagree };
        if let Some(&pos) = list.get(i) {
            updates.push(MetricUpdate::Increment(pos));
        }
    };
    let mut disagreements = Vec::new();
    let mut line = |field: &str, primary: String, shadow: String| {
        disagreements.push(Disagreement {
            field: field.to_string(),
            primary,
            shadow,
        });
    };
    verdict(&mut updates, 0, c.status_agree);
    if !c.status_agree {
        line(
            "status",
            primary.status.to_string(),
            copy.status.to_string(),
        );
    }
    if let Some(agree) = c.body_agree {
        verdict(&mut updates, 1, agree);
        if !agree {
            line("body", "(hash)".to_string(), "(hash)".to_string());
        }
    }
    for (k, (field, result)) in cfg.fields.iter().zip(&c.fields).enumerate() {
        let delta = match result {
            FieldResult::Agree { delta } => {
                verdict(&mut updates, k + 2, true);
                *delta
            }
            FieldResult::Disagree {
                delta,
                primary,
                shadow,
            } => {
                verdict(&mut updates, k + 2, false);
                line(&field.name, primary.clone(), shadow.clone());
                *delta
            }
            FieldResult::Missing => {
                if let Some(&pos) = m.missing.get(k) {
                    updates.push(MetricUpdate::Increment(pos));
                }
                None
            }
        };
        if let (Some(d), Some(Some(hist))) = (delta, m.deltas.get(k)) {
            if let Some((negative, v)) = shadow::scaled_delta(field, d) {
                updates.push(MetricUpdate::Record(hist[usize::from(negative)], v));
            }
        }
    }
    Compared {
        updates,
        disagreements,
    }
}
