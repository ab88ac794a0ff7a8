//! A source's reading as the judge's [`Snapshot`]: [`from_reading`] maps the filter's series
//! (named in `sluice_filter::metrics`) onto one experiment's per-variant counters. Everything
//! else about snapshots (their checks, intervals, the JSON-lines format) is the judge's,
//! re-exported here from [`sluice_judge::snapshot`].

use std::collections::BTreeMap;

use sluice_filter::metrics;

use crate::source::Reading;
pub use sluice_judge::snapshot::*;

/// A snapshot from a source's summed counters. `weights` are the ones in force.
pub fn from_reading(
    reading: &Reading,
    experiment: &str,
    control: &str,
    canary: &str,
    weights: BTreeMap<String, f64>,
    at: f64,
) -> Snapshot {
    let mut variants: BTreeMap<String, Counters> = BTreeMap::new();
    for v in weights.keys().map(String::as_str).chain([control, canary]) {
        variants.entry(v.to_string()).or_default();
    }
    for (key, value) in &reading.series {
        if key.label("experiment") != Some(experiment) {
            continue;
        }
        let Some(variant) = key.label("variant") else {
            continue;
        };
        let c = variants.entry(variant.to_string()).or_default();
        // Summed counters are integral; rounding only removes float noise. The cast
        // saturates; the clamp keeps sums over series far from overflowing.
        let n = (value.max(0.0).round() as u64).min(MAX_COUNT);
        let label = |l: &str| key.label(l).unwrap_or("").to_string();
        let name = key.name.as_str();
        match name {
            metrics::REQUESTS => c.requests += n,
            metrics::RESPONSES => *c.responses.entry(label("class")).or_default() += n,
            metrics::LOCAL_REPLIES => c.local_replies += n,
            metrics::UPSTREAM_RESETS => c.upstream_resets += n,
            metrics::MISSING_KEY => c.missing_key += n,
            metrics::OUTCOMES => *c.outcomes.entry(label("outcome")).or_default() += n,
            metrics::BREAKER_TRIPS => *c.breaker_trips.entry(label("reason")).or_default() += n,
            metrics::REPLICATE_REQUESTS => {
                // The filter numbers its 32 groups from 0; a label beyond the cap is not ours.
                if let Some(r) = key
                    .label("replicate")
                    .and_then(|r| r.parse::<usize>().ok())
                    .filter(|&r| r < MAX_REPLICATES)
                {
                    if c.replicates.len() <= r {
                        c.replicates.resize(r + 1, 0);
                    }
                    c.replicates[r] += n;
                }
            }
            _ if SHADOW_SERIES.contains(&name)
                || SHADOW_HISTOGRAMS
                    .iter()
                    .any(|&h| histogram_part(name, h).is_some()) =>
            {
                // Any shadow series the filter exports marks the variant as shadowed.
                let s = c.shadow.get_or_insert_with(ShadowCounters::default);
                match name {
                    metrics::SHADOW_REQUESTS => s.requests += n,
                    metrics::SHADOW_COMPARED => s.compared += n,
                    metrics::SHADOW_AGREE => *s.agree.entry(label("field")).or_default() += n,
                    metrics::SHADOW_DISAGREE => *s.disagree.entry(label("field")).or_default() += n,
                    metrics::SHADOW_ERRORS => s.errors += n,
                    metrics::SHADOW_TIMEOUTS => s.timeouts += n,
                    _ => {
                        if let Some(h) = histogram_part(name, metrics::SHADOW_LATENCY) {
                            add_series(&mut s.latency, h, key.label("le"), *value);
                        } else if let Some(h) = histogram_part(name, metrics::SHADOW_DELTA) {
                            add_series(
                                s.deltas.entry(label("field")).or_default(),
                                h,
                                key.label("le"),
                                *value,
                            );
                        }
                    }
                }
            }
            _ => {
                if let Some(h) = histogram_part(name, metrics::LATENCY) {
                    add_series(&mut c.latency, h, key.label("le"), *value);
                } else if let Some(h) = histogram_part(name, metrics::PREDICTION) {
                    add_series(&mut c.prediction, h, key.label("le"), *value);
                }
            }
        }
    }
    Snapshot {
        at,
        experiment: experiment.to_string(),
        control: control.to_string(),
        canary: Some(canary.to_string()),
        weights,
        variants,
        health: Health::Ok,
        stage_started_at: None,
    }
}

/// The filter's per-variant shadow counters and gauges (see `sluice_filter::metrics`).
const SHADOW_SERIES: [&str; 10] = [
    metrics::SHADOW_REQUESTS,
    metrics::SHADOW_SKIPPED,
    metrics::SHADOW_COMPARED,
    metrics::SHADOW_AGREE,
    metrics::SHADOW_DISAGREE,
    metrics::SHADOW_MISSING,
    metrics::SHADOW_ERRORS,
    metrics::SHADOW_5XX,
    metrics::SHADOW_TIMEOUTS,
    metrics::SHADOW_BYTES_IN_FLIGHT,
];

/// The filter's per-variant shadow histograms.
const SHADOW_HISTOGRAMS: [&str; 2] = [metrics::SHADOW_LATENCY, metrics::SHADOW_DELTA];

/// Which part of histogram `base` a series name is.
fn histogram_part<'a>(name: &'a str, base: &str) -> Option<&'a str> {
    name.strip_prefix(base)
        .filter(|rest| matches!(*rest, "_bucket" | "_sum" | "_count"))
}

/// Adds one series of a histogram (`part` from [`histogram_part`], `le` its bucket label).
fn add_series(h: &mut Histogram, part: &str, le: Option<&str>, value: f64) {
    let n = (value.max(0.0).round() as u64).min(MAX_COUNT);
    match (part, le) {
        ("_sum", _) => h.sum += value,
        ("_count", _) => h.count += n,
        ("_bucket", Some(le)) => match le.parse::<f64>() {
            Ok(b) if b.is_finite() => match h.buckets.binary_search_by(|x| x.le.total_cmp(&b)) {
                Ok(i) => h.buckets[i].count += n,
                Err(i) => h.buckets.insert(i, Bucket { le: b, count: n }),
            },
            // The +Inf bucket repeats `_count`.
            _ => {}
        },
        _ => {}
    }
}

#[cfg(test)]
mod tests;
