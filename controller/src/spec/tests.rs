use super::*;

const GOOD: &str = r#"
apiVersion: sluice.dev/v1alpha1
kind: Rollout
metadata: {name: ranker}
spec:
  experiment:
    name: ranker
    unit: {type: user, keys: [{header: x-user-id}]}
    variants: [{name: stable, control: true}, {name: canary, weight: 0}]
  schedule:
    stages: [1, {weight: 10, bake: 30s}, 100]
    bake: 2m
    warmup: 10s
    interval: 1s
  sources: [{envoyAdmin: {endpoints: ["http://127.0.0.1:9901"]}}]
  sinks:
    - ecdsFile:
        path: /tmp/ecds/sluice.yaml
        wasm: {filename: /tmp/sluice_filter.wasm}
        proxies: ["http://127.0.0.1:9901"]
"#;

fn problems(text: &str) -> String {
    match Rollout::parse(text) {
        Ok(_) => "ok".into(),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_good_spec_is_checked_with_defaults() {
    let c = Rollout::parse(GOOD).unwrap_or_else(|e| unreachable!("{e}"));
    assert_eq!(c.treatment, "canary");
    assert_eq!(
        c.stages,
        vec![
            Stage {
                weight: 1.0,
                bake: Duration::from_secs(120)
            },
            Stage {
                weight: 10.0,
                bake: Duration::from_secs(30)
            },
            Stage {
                weight: 100.0,
                bake: Duration::from_secs(120)
            },
        ]
    );
    assert_eq!(c.rollout.spec.schedule.interval, Duration::from_secs(1));
    let rendered = c.render(10.0).unwrap_or_else(|e| unreachable!("{e}"));
    assert_eq!(rendered.experiments[0].variants[1].weight, Some(10.0));
    assert_eq!(rendered.experiments[0].variants[0].weight, None);
}

#[test]
fn syntax_errors_name_the_field_path() {
    let cases = [
        (
            GOOD.replace("interval: 1s", "interval: 1 parsec"),
            "spec.schedule.interval: unknown unit",
        ),
        (
            GOOD.replace("bake: 2m", "bakee: 2m"),
            "spec.schedule.bakee: unknown field `bakee`",
        ),
        (
            GOOD.replace("{header: x-user-id}", "{hedder: x-user-id}"),
            "spec.experiment.unit",
        ),
        (
            GOOD.replace("envoyAdmin", "envoy"),
            "spec.sources[0]: unknown variant `envoy`",
        ),
    ];
    for (text, want) in cases {
        let got = problems(&text);
        assert!(got.starts_with(want), "got {got:?}, want {want:?}");
    }
}

#[test]
fn semantic_errors_are_all_reported_with_paths() {
    let text = GOOD
        .replace("kind: Rollout", "kind: Deployment")
        .replace(
            "stages: [1, {weight: 10, bake: 30s}, 100]",
            "stages: [5, 1, 120]",
        )
        .replace(
            r#"endpoints: ["http://127.0.0.1:9901"]"#,
            r#"endpoints: ["127.0.0.1:9901"]"#,
        );
    let got = problems(&text);
    for want in [
        "kind: must be \"Rollout\"",
        "spec.schedule.stages[1]: weight 1 must be above the previous stage's (5)",
        "spec.schedule.stages[2]: weight 120",
        "spec.sources[0].envoyAdmin.endpoints[0]: \"127.0.0.1:9901\" must be an http:// URL",
    ] {
        assert!(got.contains(want), "missing {want:?} in:\n{got}");
    }
}

#[test]
fn every_pushed_weight_must_be_acceptable_to_the_filter() {
    // Two treatments share the space 50/50 by default, so a 100 % stage cannot be served.
    let text = GOOD
        .replace(
            "variants: [{name: stable, control: true}, {name: canary, weight: 0}]",
            "variants: [{name: stable, control: true}, {name: canary, weight: 0}, {name: other, weight: 0}]",
        )
        .replace("metadata: {name: ranker}", "metadata: {name: ranker}\n")
        .replace("  schedule:", "  treatment: canary\n  schedule:");
    let got = problems(&text);
    assert!(
        got.starts_with(
            "spec.experiment: at weight 100: experiments[0].variants[1].weight: 100 exceeds"
        ),
        "{got}"
    );
}

#[test]
fn durations() {
    assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
    assert_eq!(parse_duration("1.5m"), Ok(Duration::from_secs(90)));
    assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
    assert!(parse_duration("-1s").is_err());
    assert!(parse_duration("1d").is_err());
    for d in ["250ms", "3s", "10m", "2h"] {
        assert_eq!(parse_duration(d).map(format_duration).as_deref(), Ok(d));
    }
}

#[test]
fn guardrail_errors_are_reported_with_their_field_path() {
    let bad = GOOD.replace(
        "  sources:",
        "  guardrails: {errorRate: {ceiling: 2}, latency: {quantiles: [{quantile: 0.99, margin: {relative: 3}}]}}\n  sources:",
    );
    let text = problems(&bad);
    assert!(
        text.contains("spec.guardrails.latency.quantiles[0].margin.relative"),
        "{text}"
    );
    let typo = GOOD.replace("  sources:", "  guardrails: {minRequest: 10}\n  sources:");
    let text = problems(&typo);
    assert!(text.contains("spec.guardrails"), "{text}");
    assert!(text.contains("minRequest"), "{text}");
}

#[test]
fn the_documented_example_is_a_valid_spec() {
    let doc = include_str!("../../../docs/rollout.md");
    let start = doc
        .find("```yaml\n")
        .map(|i| i + "```yaml\n".len())
        .unwrap_or_else(|| unreachable!("docs/rollout.md has no yaml block"));
    let len = doc[start..]
        .find("```")
        .unwrap_or_else(|| unreachable!("unterminated yaml block"));
    match Rollout::parse(&doc[start..start + len]) {
        Ok(c) => assert_eq!(c.stages.len(), 6),
        Err(e) => unreachable!("docs/rollout.md example: {e}"),
    }
}
