#[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
use wasm_bindgen_test::wasm_bindgen_test as test;

use super::*;
use crate::header_map::{find_pair, serialise};
use crate::metrics::ExperimentMetrics;

const PLAN: &str = r#"{"version": 1, "experiments": [
    {"name": "a", "unit": {"type": "user", "keys": [{"header": "x-user-id"}]},
     "variants": [{"name": "stable", "control": true, "weight": 90}, {"name": "canary", "weight": 10}],
     "outcomes": {"header": "x-sluice-outcome", "names": ["click", "purchase"]},
     "prediction": {"header": "x-model-score", "scale": 1000}},
    {"name": "b", "unit": {"type": "request"}, "header": "x-b-variant",
     "variants": [{"name": "old", "control": true}, {"name": "new", "weight": 50}],
     "outcomes": {"header": "x-sluice-outcome", "names": ["click"]}}
]}"#;

fn plan() -> (Plan, Catalog) {
    let Ok(plan) = Plan::from_json(PLAN.as_bytes()) else {
        unreachable!("valid config")
    };
    let catalog = Catalog::for_plan(&plan);
    (plan, catalog)
}

fn experiment(c: &Catalog, i: usize) -> &ExperimentMetrics {
    let Some(em) = c.experiments.get(i) else {
        unreachable!("experiment {i}")
    };
    em
}

fn served(experiment: usize, variant: usize, counted: bool) -> Served {
    Served {
        experiment,
        variant,
        counted,
    }
}

#[test]
fn all_pairs_are_read_only_when_more_than_the_status_is_wanted() {
    let (plan, _) = plan();
    assert!(reads_more_than_status(&plan, [served(0, 1, true)]));
    assert!(reads_more_than_status(
        &plan,
        [served(0, 1, false), served(1, 0, true)]
    ));
    assert!(!reads_more_than_status(&plan, [served(0, 1, false)]));
    let Ok(bare) = Plan::from_json(
        br#"{"version": 1, "experiments": [{"name": "c", "unit": {"type": "request"},
            "variants": [{"name": "s", "control": true}, {"name": "n", "weight": 5}],
            "outcomes": {"names": ["click"]}}]}"#,
    ) else {
        unreachable!("valid config")
    };
    // Outcomes by beacon only: no header to read.
    assert!(!reads_more_than_status(&bare, [served(0, 1, true)]));
}

#[test]
fn details_are_read_for_non_2xx_answers_only() {
    assert!(!details_needed(Some(b"200")));
    assert!(!details_needed(Some(b"204")));
    assert!(details_needed(Some(b"404")));
    assert!(details_needed(Some(b"503")));
    assert!(details_needed(None));
    assert!(details_needed(Some(b"bogus")));
}

#[test]
fn a_counted_answer_counts_its_class_latency_outcomes_and_prediction() {
    let (plan, c) = plan();
    let em = experiment(&c, 0);
    let vm = &em.variants[1];
    let map = serialise(&[
        (":status", "200"),
        ("x-sluice-outcome", " click, bogus ,purchase"),
        ("x-model-score", "0.7346"),
    ]);
    let answer = Answer {
        status: find_pair(&map, b":status"),
        details: None,
        elapsed_ms: Some(12),
    };
    let mut out = Vec::new();
    count_response(
        &plan,
        &c,
        [served(0, 1, true)],
        &answer,
        |n| find_pair(&map, n.as_bytes()),
        &mut out,
    );
    let Some(unknown) = em.outcomes_unknown else {
        unreachable!("outcomes configured")
    };
    let Some(prediction) = vm.prediction else {
        unreachable!("prediction configured")
    };
    assert_eq!(
        out,
        vec![
            MetricUpdate::Increment(vm.responses[1]),
            MetricUpdate::Record(vm.latency, 12),
            MetricUpdate::Increment(vm.outcomes[0]),
            MetricUpdate::Increment(unknown),
            MetricUpdate::Increment(vm.outcomes[1]),
            MetricUpdate::Record(prediction, 735),
        ]
    );
}

#[test]
fn envoys_own_replies_and_resets_are_counted_apart() {
    let (plan, c) = plan();
    let vm = &experiment(&c, 0).variants[0];
    let answer = Answer {
        status: Some(b"503"),
        details: Some(b"upstream_reset_before_response_started{connection_failure}"),
        elapsed_ms: None,
    };
    let mut out = Vec::new();
    count_response(&plan, &c, [served(0, 0, true)], &answer, |_| None, &mut out);
    assert_eq!(
        out,
        vec![
            MetricUpdate::Increment(vm.responses[4]),
            MetricUpdate::Increment(vm.local_replies),
            MetricUpdate::Increment(vm.upstream_resets),
        ]
    );
    // The upstream's own 404: a class, no local reply.
    let answer = Answer {
        status: Some(b"404"),
        details: Some(b"via_upstream"),
        elapsed_ms: None,
    };
    out.clear();
    count_response(&plan, &c, [served(0, 0, true)], &answer, |_| None, &mut out);
    assert_eq!(out, vec![MetricUpdate::Increment(vm.responses[3])]);
}

#[test]
fn an_invalid_prediction_is_counted_as_such() {
    let (plan, c) = plan();
    let em = experiment(&c, 0);
    let Some(invalid) = em.prediction_invalid else {
        unreachable!("prediction configured")
    };
    let answer = Answer {
        status: Some(b"200"),
        ..Answer::default()
    };
    let mut out = Vec::new();
    let header = |n: &str| (n == "x-model-score").then_some(&b"-3"[..]);
    count_response(&plan, &c, [served(0, 1, true)], &answer, header, &mut out);
    assert_eq!(
        out,
        vec![
            MetricUpdate::Increment(em.variants[1].responses[1]),
            MetricUpdate::Increment(invalid),
        ]
    );
}

#[test]
fn overrides_count_nothing_and_an_unknown_variant_is_an_error() {
    let (plan, c) = plan();
    let answer = Answer {
        status: Some(b"200"),
        elapsed_ms: Some(3),
        ..Answer::default()
    };
    let mut out = Vec::new();
    let header = |n: &str| (n == "x-sluice-outcome").then_some(&b"click"[..]);
    count_response(&plan, &c, [served(0, 1, false)], &answer, header, &mut out);
    assert_eq!(out, vec![]);
    count_response(&plan, &c, [served(1, 7, true)], &answer, header, &mut out);
    assert_eq!(out, vec![MetricUpdate::Increment(experiment(&c, 1).errors)]);
    // Both experiments of one request: each counts into its own metrics.
    out.clear();
    count_response(
        &plan,
        &c,
        [served(0, 0, true), served(1, 1, true)],
        &answer,
        header,
        &mut out,
    );
    let (a, b) = (
        &experiment(&c, 0).variants[0],
        &experiment(&c, 1).variants[1],
    );
    assert_eq!(
        out,
        vec![
            MetricUpdate::Increment(a.responses[1]),
            MetricUpdate::Record(a.latency, 3),
            MetricUpdate::Increment(a.outcomes[0]),
            MetricUpdate::Increment(b.responses[1]),
            MetricUpdate::Record(b.latency, 3),
            MetricUpdate::Increment(b.outcomes[0]),
        ]
    );
}
