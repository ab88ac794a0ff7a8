use super::*;
use crate::source::{Reading, SeriesKey};
use std::sync::Arc;

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
        // Not a series of the filter's (it counts no exposures): not read.
        (key("sluice_exposures_total", &[]), 9.0),
        (key(metrics::REQUESTS, &[]), 10.0),
        (key(metrics::RESPONSES, &[("class", "5xx")]), 2.0),
        (
            key(&format!("{}_bucket", metrics::LATENCY), &[("le", "5")]),
            3.0,
        ),
        (
            key(&format!("{}_bucket", metrics::LATENCY), &[("le", "1")]),
            1.0,
        ),
        (
            key(&format!("{}_bucket", metrics::LATENCY), &[("le", "+Inf")]),
            10.0,
        ),
        (key(&format!("{}_count", metrics::LATENCY), &[]), 10.0),
        (key(&format!("{}_sum", metrics::LATENCY), &[]), 40.0),
        (key(metrics::OUTCOMES, &[("outcome", "click")]), 4.0),
        (key(metrics::SHADOW_AGREE, &[("field", "status")]), 7.0),
        (key(metrics::BREAKER_TRIPS, &[("reason", "reset")]), 1.0),
    ]);
    let reading = Reading {
        unidentified: 0,
        unknown: 0,
        at: None,
        series,
        restarts: 0,
    };
    let weights = BTreeMap::from([("control".into(), 95.0), ("canary".into(), 5.0)]);
    let s = from_reading(&reading, "e", "control", "canary", weights, 100.0);
    let c = &s.variants["canary"];
    assert_eq!(c.requests, 10);
    assert_eq!(c.errors(), 2);
    assert_eq!(
        c.latency.buckets.iter().map(|b| b.le).collect::<Vec<_>>(),
        vec![1.0, 5.0]
    );
    assert_eq!((c.latency.count, c.latency.sum), (10, 40.0));
    assert_eq!(c.outcomes["click"], 4);
    assert_eq!(c.exposures, None);
    assert_eq!(c.shadow.as_ref().map(|s| s.agree["status"]), Some(7));
    assert_eq!(c.breaker_trips, BTreeMap::from([("reset".to_string(), 1)]));
    assert_eq!(s.variants["control"], Counters::default());
    assert!(s.check().is_ok());
}

#[test]
fn replicate_counts_are_read_from_the_filter_series() {
    let key = |variant: &str, replicate: &str| {
        let mut labels: Vec<(String, String)> = [
            ("experiment", "e"),
            ("variant", variant),
            ("replicate", replicate),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        labels.sort();
        Arc::new(SeriesKey {
            name: metrics::REPLICATE_REQUESTS.into(),
            labels,
        })
    };
    let series = BTreeMap::from([
        (key("canary", "0"), 3.0),
        (key("canary", "2"), 5.0),
        (key("control", "1"), 7.0),
        // Not a group the filter makes: ignored.
        (key("control", "x"), 9.0),
        (key("control", "100000"), 9.0),
    ]);
    let reading = Reading {
        at: None,
        series,
        restarts: 0,
        unidentified: 0,
        unknown: 0,
    };
    let weights = BTreeMap::from([("control".into(), 50.0), ("canary".into(), 50.0)]);
    let s = from_reading(&reading, "e", "control", "canary", weights, 1.0);
    assert_eq!(s.variants["canary"].replicates, vec![3, 0, 5]);
    assert_eq!(s.variants["control"].replicates, vec![0, 7]);
    // And through the JSON-lines format.
    let line = serde_json::to_string(&s).unwrap_or_default();
    assert!(line.contains(r#""replicates":[3,0,5]"#), "{line}");
    let back = read_lines(&line).unwrap_or_default();
    assert_eq!(back.first(), Some(&s));
}
