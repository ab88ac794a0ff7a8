use super::*;
use crate::source::{Reading, SeriesKey};
use std::sync::Arc;

fn counters(requests: u64, errors: u64) -> Counters {
    Counters {
        requests,
        responses: BTreeMap::from([("2xx".into(), requests - errors), ("5xx".into(), errors)]),
        latency: Histogram {
            buckets: vec![
                Bucket {
                    le: 10.0,
                    count: requests / 2,
                },
                Bucket {
                    le: 100.0,
                    count: requests,
                },
            ],
            sum: 20.0 * requests as f64,
            count: requests,
        },
        ..Counters::default()
    }
}

fn snap(at: f64, control: Counters, canary: Counters) -> Snapshot {
    Snapshot {
        at,
        experiment: "e".into(),
        control: "control".into(),
        canary: None,
        weights: BTreeMap::from([("control".into(), 90.0), ("canary".into(), 10.0)]),
        variants: BTreeMap::from([("control".into(), control), ("canary".into(), canary)]),
        health: Health::Ok,
        stage_started_at: None,
    }
}

#[test]
fn an_interval_is_the_difference_of_counters() {
    let a = snap(0.0, counters(100, 1), counters(10, 0));
    let b = snap(10.0, counters(250, 4), counters(30, 2));
    let iv = interval(&a, &b, ResetPolicy::SinceRestart);
    assert!(iv.resets.is_empty());
    let c = &iv.variants["control"];
    assert_eq!((c.requests, c.errors(), c.latency.count), (150, 3, 150));
    assert_eq!(c.latency.buckets[0].count, 125 - 50);
    assert_eq!(iv.variants["canary"].requests, 20);
}

#[test]
fn a_counter_reset_counts_the_later_values_as_new_traffic() {
    let a = snap(0.0, counters(1000, 10), counters(100, 1));
    // The control's counters went down: a restart.
    let b = snap(10.0, counters(40, 1), counters(130, 1));
    let iv = interval(&a, &b, ResetPolicy::SinceRestart);
    assert_eq!(iv.resets, vec!["control".to_string()]);
    assert_eq!(iv.variants["control"].requests, 40);
    assert_eq!(iv.variants["canary"].requests, 30);
    // Discard drops the whole interval for every variant.
    let iv = interval(&a, &b, ResetPolicy::Discard);
    assert!(iv.variants.values().all(|c| c.requests == 0));
}

#[test]
fn a_decrease_in_any_counter_is_a_reset() {
    let a = snap(0.0, counters(1000, 10), counters(100, 1));
    let mut later = counters(1100, 10);
    later.latency.sum = 1.0;
    let b = snap(10.0, later, counters(130, 1));
    assert_eq!(
        interval(&a, &b, ResetPolicy::SinceRestart).resets,
        vec!["control".to_string()]
    );
}

#[test]
fn the_json_lines_format_round_trips_and_names_bad_fields() {
    let s = snap(1.5, counters(10, 1), counters(5, 0));
    let line = serde_json::to_string(&s).unwrap_or_default();
    let text = format!("# comment\n\n{line}\n{line}\n");
    let read = read_lines(&text).unwrap_or_default();
    assert_eq!(read, vec![s.clone(), s]);
    let bad = line.replace("\"requests\"", "\"reqs\"");
    let err = read_lines(&bad)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.starts_with("line 1: variants.canary"), "{err}");
    let two_canaries = line.replace("\"canary\":{", "\"b\":{\"requests\":1},\"canary\":{");
    let err = read_lines(&two_canaries)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("canary"), "{err}");
}

#[test]
fn histograms_are_checked() {
    let h = Histogram {
        buckets: vec![Bucket { le: 5.0, count: 3 }, Bucket { le: 1.0, count: 4 }],
        sum: 0.0,
        count: 4,
    };
    assert!(h.check().is_err());
    let h = Histogram {
        buckets: vec![Bucket { le: 1.0, count: 3 }, Bucket { le: 5.0, count: 2 }],
        sum: 0.0,
        count: 4,
    };
    assert!(h.check().is_err());
    let h = Histogram {
        buckets: vec![Bucket { le: 1.0, count: 3 }, Bucket { le: 5.0, count: 4 }],
        sum: 0.0,
        count: 6,
    };
    assert_eq!(h.per_bucket(), vec![3, 1, 2]);
}

#[test]
fn a_reading_becomes_a_snapshot() {
    let key = |name: &str, extra: &[(&str, &str)]| {
        let mut labels: Vec<(String, String)> = [("experiment", "e"), ("variant", "canary")]
            .iter()
            .chain(extra)
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        labels.sort();
        Arc::new(SeriesKey {
            name: name.into(),
            labels,
        })
    };
    let series = BTreeMap::from([
        (key("sluice_requests_total", &[]), 10.0),
        (key("sluice_responses_total", &[("class", "5xx")]), 2.0),
        (key("sluice_latency_ms_bucket", &[("le", "5")]), 3.0),
        (key("sluice_latency_ms_bucket", &[("le", "1")]), 1.0),
        (key("sluice_latency_ms_bucket", &[("le", "+Inf")]), 10.0),
        (key("sluice_latency_ms_count", &[]), 10.0),
        (key("sluice_latency_ms_sum", &[]), 40.0),
        (key("sluice_outcomes_total", &[("outcome", "click")]), 4.0),
        (
            key("sluice_shadow_agree_total", &[("field", "status")]),
            7.0,
        ),
    ]);
    let reading = Reading {
        unidentified: Vec::new(),
        unknown: 0,
        at: None,
        series,
        restarts: 0,
    };
    let weights = BTreeMap::from([("control".into(), 95.0), ("canary".into(), 5.0)]);
    let s = Snapshot::from_reading(&reading, "e", "control", "canary", weights, 100.0);
    let c = &s.variants["canary"];
    assert_eq!(c.requests, 10);
    assert_eq!(c.errors(), 2);
    assert_eq!(
        c.latency.buckets.iter().map(|b| b.le).collect::<Vec<_>>(),
        vec![1.0, 5.0]
    );
    assert_eq!((c.latency.count, c.latency.sum), (10, 40.0));
    assert_eq!(c.outcomes["click"], 4);
    assert_eq!(c.shadow.as_ref().map(|s| s.agree["status"]), Some(7));
    assert_eq!(s.variants["control"], Counters::default());
    assert!(s.check().is_ok());
}
