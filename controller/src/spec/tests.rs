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
    let c = Rollout::parse(GOOD).unwrap();
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
    let rendered = c.render(10.0).unwrap();
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
fn guardrails_are_read_once_into_the_judge_config() {
    let with = GOOD.replace(
        "  sources:",
        "  guardrails: {consecutive: 5, errorRate: {ceiling: 0.02}}\n  sources:",
    );
    let c = Rollout::parse(&with).unwrap();
    let g = &c.rollout.spec.guardrails;
    assert_eq!(g.consecutive, 5);
    assert_eq!(g.error_rate.ceiling, Some(0.02));
    // Fields not written keep the judge's defaults; absent and `null` mean all defaults.
    assert_eq!(g.alpha, GuardrailConfig::default().alpha);
    for text in [
        GOOD.to_string(),
        GOOD.replace("  sources:", "  guardrails: null\n  sources:"),
    ] {
        let c = Rollout::parse(&text).unwrap();
        assert_eq!(c.rollout.spec.guardrails, GuardrailConfig::default());
    }
}

#[test]
fn a_per_exposure_metric_is_refused_in_a_rollout() {
    let text = GOOD.replace(
        "  sources:",
        "  guardrails: {business: [{outcome: click}, {outcome: buy, per: exposure}]}\n  sources:",
    );
    let got = problems(&text);
    assert!(
        got.contains("spec.guardrails.business[1].per: the filter does not count exposures"),
        "{got}"
    );
    assert!(!got.contains("business[0]"), "{got}");
}

#[test]
fn the_documented_example_is_a_valid_spec() {
    let doc = include_str!("../../../docs/rollout.md");
    let start = doc
        .find("```yaml\n")
        .map(|i| i + "```yaml\n".len())
        .expect("docs/rollout.md has no yaml block");
    let len = doc[start..].find("```").expect("unterminated yaml block");
    match Rollout::parse(&doc[start..start + len]) {
        Ok(c) => assert_eq!(c.stages.len(), 6),
        Err(e) => unreachable!("docs/rollout.md example: {e}"),
    }
}

#[test]
fn huge_durations_are_errors_with_their_field_path() {
    let cases = [
        (
            GOOD.replace("bake: 2m", "bake: 1e300"),
            "spec.schedule.bake: 1e300 is longer",
        ),
        (
            GOOD.replace("bake: 2m", "bake: \"100000000000000000000s\""),
            "spec.schedule.bake: \"100000000000000000000s\" is longer",
        ),
        (
            GOOD.replace("warmup: 10s", "warmup: 1e30"),
            "spec.schedule.warmup: 1e30 is longer",
        ),
        (
            GOOD.replace("warmup: 10s", "warmup: 9000000h"),
            "spec.schedule.warmup: \"9000000h\" is longer",
        ),
        (
            GOOD.replace(
                "{weight: 10, bake: 30s}",
                "{weight: 10, bake: 18446744073709551615}",
            ),
            "spec.schedule.stages[1].bake: 18446744073709551615 is longer",
        ),
        (
            GOOD.replace(
                r#"endpoints: ["http://127.0.0.1:9901"]"#,
                r#"endpoints: ["http://127.0.0.1:9901"], timeout: 1e300"#,
            ),
            "spec.sources[0].envoyAdmin.timeout: 1e300 is longer",
        ),
        (
            GOOD.replace("  sources:", "  shadow: {duration: -5}\n  sources:"),
            "spec.shadow.duration: -5 is not a valid duration",
        ),
        (
            GOOD.replace("  sources:", "  guardrails: {warmup: 1e300}\n  sources:"),
            "spec.guardrails.warmup: 1e300 is longer",
        ),
    ];
    for (text, want) in cases {
        let got = problems(&text);
        assert!(got.starts_with(want), "got {got:?}, want {want:?}");
    }
    // The longest accepted duration is a year.
    assert!(problems(&GOOD.replace("bake: 2m", "bake: 8760h")) == "ok");
    assert!(problems(&GOOD.replace("bake: 2m", "bake: 8761h")).contains("longer"));
}

#[test]
fn intervals_and_waits_have_sane_bounds() {
    for (from, to, want) in [
        (
            "interval: 1s",
            "interval: 0.000001ms",
            "spec.schedule.interval: 1ns is outside 100ms to 1h",
        ),
        (
            "interval: 1s",
            "interval: 0",
            "spec.schedule.interval: 0ns is outside",
        ),
        (
            "interval: 1s",
            "interval: 99ms",
            "spec.schedule.interval: 99ms is outside",
        ),
        (
            "interval: 1s",
            "interval: 2h",
            "spec.schedule.interval: 7200s is outside",
        ),
        (
            r#"endpoints: ["http://127.0.0.1:9901"]"#,
            r#"endpoints: ["http://127.0.0.1:9901"], timeout: 0s"#,
            "spec.sources[0].envoyAdmin.timeout: 0ns must be positive",
        ),
        (
            "proxies: [\"http://127.0.0.1:9901\"]",
            "proxies: [\"http://127.0.0.1:9901\"]\n        confirmWithin: 2h",
            "spec.sinks[0].ecdsFile.confirmWithin: 7200s must be positive and at most 1h",
        ),
    ] {
        let got = problems(&GOOD.replace(from, to));
        assert!(got.starts_with(want), "got {got:?}, want {want:?}");
    }
    assert_eq!(
        problems(&GOOD.replace("interval: 1s", "interval: 100ms")),
        "ok"
    );
}

#[test]
fn type_errors_name_the_field_path_in_plain_words() {
    let cases = [
        (
            GOOD.replace("{name: canary, weight: 0}", "{name: canary, weight: \"x\"}"),
            "spec.experiment.variants[1].weight: expected a number, found string \"x\"",
        ),
        (
            GOOD.replace("stages: [1, {weight: 10, bake: 30s}, 100]", "stages: [1, \"x\"]"),
            "spec.schedule.stages[1]: expected a weight in percent, or {weight, bake}, found string \"x\"",
        ),
        (
            GOOD.replace("{weight: 10, bake: 30s}", "{weight: 10, bake: [1]}"),
            "spec.schedule.stages[1].bake: expected a duration like 30s, 10m, 500ms, or a number of seconds, found sequence",
        ),
        (
            GOOD.replace("{weight: 10, bake: 30s}", "{weight: ten}"),
            "spec.schedule.stages[1].weight: expected a number, found string \"ten\"",
        ),
        (
            GOOD.replace("  sources:", "  guardrails: {minRequests: -1}\n  sources:"),
            "spec.guardrails.minRequests: expected a whole number, at least 0, found integer `-1`",
        ),
    ];
    for (text, want) in cases {
        let got = problems(&text);
        assert!(got.starts_with(want), "got {got:?}, want {want:?}");
        assert!(!got.contains("column"), "{got}");
    }
}

#[test]
fn a_byte_order_mark_is_read_and_an_empty_file_refused() {
    assert_eq!(problems(&format!("\u{feff}{GOOD}")), "ok");
    assert_eq!(problems(""), "(document): the document is empty");
    assert_eq!(problems("# nothing\n"), "(document): the document is empty");
}

#[test]
fn one_hundred_thousand_business_outcomes_validate() {
    let business: Vec<String> = (0..100_000).map(|i| format!("{{outcome: o{i}}}")).collect();
    let text = GOOD.replace(
        "  sources:",
        &format!(
            "  guardrails:\n    business: [{}]\n  sources:",
            business.join(", ")
        ),
    );
    // Checking each entry against every earlier one would take minutes here in a debug build;
    // the time is measured in docs/benchmarks.md, not asserted here.
    assert_eq!(problems(&text), "ok");
}

mod fuzz {
    //! `Rollout::parse` under hostile input: an answer (a checked spec or problems with their
    //! paths) for anything, never a panic; an accepted spec renders at every stage.
    use super::*;
    use proptest::prelude::*;
    use serde_json::{Map, Value};

    const KEYS: &[&str] = &[
        "apiVersion",
        "kind",
        "metadata",
        "name",
        "spec",
        "experiment",
        "treatment",
        "schedule",
        "stages",
        "weight",
        "bake",
        "warmup",
        "interval",
        "shadow",
        "duration",
        "guardrails",
        "sources",
        "envoyAdmin",
        "endpoints",
        "minHealthy",
        "timeout",
        "prometheus",
        "url",
        "maxAge",
        "sinks",
        "ecdsFile",
        "ecdsGrpc",
        "listen",
        "minProxies",
        "remote",
        "uri",
        "cluster",
        "sha256",
        "path",
        "resource",
        "wasm",
        "filename",
        "proxies",
        "confirmWithin",
        "notifications",
        "webhook",
        "format",
        "caFile",
        "variants",
        "control",
        "alpha",
        "business",
        "outcome",
        "errorRate",
        "margin",
        "relative",
        "ceiling",
    ];

    /// Extremes (huge, tiny, negative numbers; durations past any bound) weighted up: they
    /// are what reaches the checks behind the syntax.
    fn leaf() -> impl Strategy<Value = Value> {
        prop_oneof![
            1 => Just(Value::Null),
            1 => any::<bool>().prop_map(Value::Bool),
            1 => any::<i64>().prop_map(Value::from),
            1 => any::<u64>().prop_map(Value::from),
            4 => prop::sample::select(vec![
                -1.0, 0.0, 1e-9, 0.5, 99.99, 100.0, 1e15, 1.8e19, 1e300, f64::MAX,
            ])
            .prop_map(Value::from),
            3 => prop::sample::select(vec![
                "", "1e300s", "100000000000000000000s", "0.000001ms", "1.5m", "99999999h",
                "10x", "-1s", ".", "5", "https://x", "http://127.0.0.1:1", "canary", "stable",
                "slack", "json",
            ])
            .prop_map(|s| Value::String(s.into())),
            1 => "\\PC{0,12}".prop_map(Value::String),
        ]
    }

    fn any_json() -> impl Strategy<Value = Value> {
        leaf().prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::vec((prop::sample::select(KEYS), inner), 0..4).prop_map(|kv| {
                    Value::Object(
                        kv.into_iter()
                            .map(|(k, v)| (k.to_string(), v))
                            .collect::<Map<_, _>>(),
                    )
                }),
            ]
        })
    }

    fn pointers(v: &Value, at: String, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => m
                .iter()
                .for_each(|(k, c)| pointers(c, format!("{at}/{k}"), out)),
            Value::Array(a) => a
                .iter()
                .enumerate()
                .for_each(|(i, c)| pointers(c, format!("{at}/{i}"), out)),
            _ => {}
        }
        out.push(at);
    }

    fn good() -> Value {
        crate::yaml::to_value(GOOD).unwrap()
    }

    /// Parses, and for an accepted spec renders every stage and prints every duration.
    fn exercise(text: &str) {
        if let Ok(c) = Rollout::parse(text) {
            for s in &c.stages {
                assert!(c.render(s.weight).is_ok());
                let _ = format_duration(s.bake);
            }
            let _ = serde_json::to_string(&c.rollout);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 600, ..ProptestConfig::default() })]

        #[test]
        fn a_mutated_spec_never_panics(
            edits in prop::collection::vec((any::<prop::sample::Index>(), any::<bool>(), prop::sample::select(KEYS), any_json()), 1..4)
        ) {
            let mut doc = good();
            for (pick, insert, key, value) in edits {
                let mut all = Vec::new();
                pointers(&doc, String::new(), &mut all);
                let at = pick.get(&all).clone();
                match doc.pointer_mut(&at) {
                    Some(Value::Object(m)) if insert => { m.insert(key.to_string(), value); }
                    Some(n) => *n = value,
                    None => {}
                }
            }
            exercise(&serde_json::to_string(&doc).unwrap_or_default());
        }

        #[test]
        fn any_duration_is_an_answer(
            path in prop::sample::select(vec![
                "/spec/schedule/bake",
                "/spec/schedule/warmup",
                "/spec/schedule/interval",
                "/spec/schedule/stages/1/bake",
                "/spec/sources/0/envoyAdmin/timeout",
                "/spec/sinks/0/ecdsFile/confirmWithin",
                "/spec/guardrails/warmup",
            ]),
            value in prop_oneof![
                any::<f64>().prop_map(Value::from),
                any::<u64>().prop_map(Value::from),
                any::<i64>().prop_map(Value::from),
                (any::<f64>(), prop::sample::select(vec!["ms", "s", "m", "h", ""]))
                    .prop_map(|(n, unit)| Value::String(format!("{}{unit}", n.abs()))),
                (any::<u64>(), prop::sample::select(vec!["ms", "s", "m", "h", ""]))
                    .prop_map(|(n, unit)| Value::String(format!("{n}{unit}"))),
            ]
        ) {
            let mut doc = good();
            doc["spec"]["sources"][0]["envoyAdmin"]["timeout"] = Value::from("2s");
            doc["spec"]["sinks"][0]["ecdsFile"]["confirmWithin"] = Value::from("10s");
            doc["spec"]["guardrails"] = serde_json::json!({"warmup": "1m"});
            if let Some(n) = doc.pointer_mut(path) {
                *n = value;
            }
            exercise(&serde_json::to_string(&doc).unwrap_or_default());
        }

        #[test]
        fn cut_or_spliced_yaml_never_panics(cut in 0usize..700, splice in "[\\[\\]{}:,\\-#&*!|>'\" \n\\PC]{0,6}") {
            let cut = (0..=cut.min(GOOD.len())).rev().find(|&i| GOOD.is_char_boundary(i)).unwrap_or(0);
            exercise(&format!("{}{splice}{}", &GOOD[..cut], &GOOD[cut..]));
            exercise(&GOOD[..cut]);
        }
    }
}

#[test]
fn a_webhook_ca_file_is_checked_when_the_spec_is() {
    let dir = std::env::temp_dir().join(format!("sluice-spec-ca-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let not_pem = dir.join("not.pem");
    let _ = std::fs::write(&not_pem, "hello\n");
    let hook = |url: &str, ca: &str| {
        GOOD.replace(
            "  sources:",
            &format!("  notifications: [{{webhook: {{url: \"{url}\", format: slack, caFile: \"{ca}\"}}}}]\n  sources:"),
        )
    };
    let missing = dir.join("missing.pem").display().to_string();
    for (text, want) in [
        (
            hook("http://127.0.0.1:1/h", &missing),
            "spec.notifications[0].webhook.caFile: applies to https:// URLs only",
        ),
        (
            hook("https://127.0.0.1:1/h", &missing),
            "spec.notifications[0].webhook.caFile: ",
        ),
        (
            hook("https://127.0.0.1:1/h", &not_pem.display().to_string()),
            "spec.notifications[0].webhook.caFile: ",
        ),
    ] {
        let got = problems(&text);
        assert!(got.starts_with(want), "got {got:?}, want {want:?}");
    }
    assert!(problems(&hook("https://127.0.0.1:1/h", &missing)).contains("No such file"));
    assert!(problems(&hook(
        "https://127.0.0.1:1/h",
        &not_pem.display().to_string()
    ))
    .contains("no PEM certificate"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The problems of the good spec with its sink replaced by `ecdsGrpc: <sink>`.
pub(crate) fn problems_with_grpc_sink(sink: &str) -> String {
    problems(&GOOD.replace(
        r#"    - ecdsFile:
        path: /tmp/ecds/sluice.yaml
        wasm: {filename: /tmp/sluice_filter.wasm}
        proxies: ["http://127.0.0.1:9901"]"#,
        &format!("    - ecdsGrpc: {sink}"),
    ))
}

#[test]
fn an_ecds_grpc_sink_is_checked() {
    let grpc = |sink: &str| {
        GOOD.replace(
            r#"    - ecdsFile:
        path: /tmp/ecds/sluice.yaml
        wasm: {filename: /tmp/sluice_filter.wasm}
        proxies: ["http://127.0.0.1:9901"]"#,
            &format!("    - ecdsGrpc: {sink}"),
        )
    };
    let c = Rollout::parse(&grpc(
        r#"{listen: "0.0.0.0:18000", wasm: {filename: /w.wasm}}"#,
    ))
    .unwrap();
    let SinkSpec::EcdsGrpc(g) = &c.rollout.spec.sinks[0] else {
        unreachable!("not ecdsGrpc")
    };
    assert_eq!(
        (g.resource.as_str(), g.min_proxies, g.confirm_within),
        ("sluice", 1, Duration::from_secs(10))
    );
    let got = problems(&grpc(
        r#"{listen: "localhost", resource: "", minProxies: 0, confirmWithin: 0s, wasm: {}}"#,
    ));
    for want in [
        "spec.sinks[0].ecdsGrpc.listen: \"localhost\" is not an address and port",
        "spec.sinks[0].ecdsGrpc.minProxies: must be at least 1",
        "spec.sinks[0].ecdsGrpc.resource: must not be empty",
        "spec.sinks[0].ecdsGrpc.confirmWithin",
        "spec.sinks[0].ecdsGrpc.wasm.filename: give filename",
    ] {
        assert!(got.contains(want), "missing {want:?} in:\n{got}");
    }
    let got = problems(&grpc(
        r#"{listen: "127.0.0.1:18000", wasm: {filename: /w.wasm, remote: {uri: "ftp://x", cluster: "", sha256: "abc"}}}"#,
    ));
    for want in [
        "spec.sinks[0].ecdsGrpc.wasm.remote: give filename or remote, not both",
        "spec.sinks[0].ecdsGrpc.wasm.remote.uri: \"ftp://x\" is not an http(s) URL",
        "spec.sinks[0].ecdsGrpc.wasm.remote.cluster: must name",
        "spec.sinks[0].ecdsGrpc.wasm.remote.sha256: must be 64 hex digits",
    ] {
        assert!(got.contains(want), "missing {want:?} in:\n{got}");
    }
    let sha = "0".repeat(64);
    let ok = problems(&grpc(&format!(
        r#"{{listen: "127.0.0.1:18000", wasm: {{remote: {{uri: "http://sluice:8080/sluice_filter.wasm", cluster: sluice-http, sha256: "{sha}"}}}}}}"#
    )));
    assert_eq!(ok, "ok");
}

#[test]
fn the_istio_sink_is_read_with_defaults_and_checked() {
    let istio = |sink: &str| {
        GOOD.replace(
            r#"    - ecdsFile:
        path: /tmp/ecds/sluice.yaml
        wasm: {filename: /tmp/sluice_filter.wasm}
        proxies: ["http://127.0.0.1:9901"]"#,
            &format!("    - istioWasmPlugin: {sink}"),
        )
    };
    let c = Rollout::parse(&istio("{name: sluice, namespace: shop}")).unwrap();
    let [SinkSpec::IstioWasmPlugin(w)] = c.rollout.spec.sinks.as_slice() else {
        unreachable!("one istio sink")
    };
    assert_eq!(w.kind, crate::sink::istio::ObjectKind::WasmPlugin);
    assert_eq!(
        (
            w.min_proxies,
            w.confirm_within,
            w.max_conflicts,
            w.context.as_deref()
        ),
        (1, Duration::from_secs(60), 5, None)
    );
    let c = Rollout::parse(&istio(
        "{name: sluice.v2, namespace: shop, kind: TrafficExtension, context: prod, minProxies: 3, confirmWithin: 2m, maxConflicts: 0}",
    ))
    .unwrap();
    let [SinkSpec::IstioWasmPlugin(w)] = c.rollout.spec.sinks.as_slice() else {
        unreachable!("one istio sink")
    };
    assert_eq!(w.kind, crate::sink::istio::ObjectKind::TrafficExtension);
    assert_eq!(w.confirm_within, Duration::from_secs(120));
    let bad = problems(&istio(
        "{name: Sluice_1, namespace: a.b, minProxies: 0, confirmWithin: 0s, maxConflicts: 1000}",
    ));
    for expected in [
        "spec.sinks[0].istioWasmPlugin.name: \"Sluice_1\" is not a Kubernetes object name",
        "spec.sinks[0].istioWasmPlugin.namespace: \"a.b\" is not a Kubernetes namespace",
        "spec.sinks[0].istioWasmPlugin.minProxies: must be at least 1",
        "spec.sinks[0].istioWasmPlugin.confirmWithin:",
        "spec.sinks[0].istioWasmPlugin.maxConflicts: 1000 is above 100",
    ] {
        assert!(bad.contains(expected), "{expected} not in {bad}");
    }
    let unknown = problems(&istio("{name: s, namespace: n, kind: EnvoyFilter}"));
    assert!(
        unknown.contains("spec.sinks[0].istioWasmPlugin.kind") && unknown.contains("WasmPlugin"),
        "{unknown}"
    );
    let unknown = problems(&istio("{name: s, namespace: n, plugin: x}"));
    assert!(unknown.contains("plugin"), "{unknown}");
}
