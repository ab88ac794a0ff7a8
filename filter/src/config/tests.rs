use super::*;

#[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
use wasm_bindgen_test::wasm_bindgen_test as test;

const VALID: &str = r#"{
  "version": 1,
  "secret": "0123456789abcdef-valid",
  "experiments": [{
    "name": "ranker",
    "unit": {"type": "user", "keys": [{"header": "X-User-Id"}, {"cookie": "uid"}]},
    "variants": [
      {"name": "stable", "control": true},
      {"name": "canary", "weight": 5.25}
    ],
    "match": {"path_prefix": "/predict"},
    "override": {"token": "0123456789abcdef"},
    "echo": {"header": "x-sluice-variant", "cookie": "sluice_ranker"},
    "outcomes": {"header": "x-sluice-outcome", "names": ["click", "purchase"]},
    "beacon": {"path": "/sluice/event"},
    "prediction": {"header": "x-model-score"}
  }]
}"#;

fn error_of(json: &str) -> String {
    match Plan::from_json(json.as_bytes()) {
        Ok(_) => String::from("accepted"),
        Err(e) => e.to_string(),
    }
}

/// VALID with one substring replaced.
fn variant_of_valid(from: &str, to: &str) -> String {
    assert!(VALID.contains(from), "{from}");
    VALID.replacen(from, to, 1)
}

#[test]
fn valid_config_becomes_a_plan() {
    let plan = Plan::from_json(VALID.as_bytes()).map_err(|e| e.to_string());
    let plan = plan.unwrap();
    let e = &plan.experiments[0];
    assert_eq!(e.salt, "ranker");
    assert_eq!(e.control, 0);
    assert_eq!(e.layout.weights(2), vec![9475, 525]);
    assert_eq!(
        e.unit,
        Unit::User {
            keys: vec![
                KeySource::Header("x-user-id".into()),
                KeySource::Cookie("uid".into())
            ],
            missing: MissingKey::Control
        }
    );
    assert_eq!(e.header, DEFAULT_VARIANT_HEADER);
    assert_eq!(e.prediction.as_ref().map(|p| p.scale), Some(1000.0));
}

#[test]
fn wire_format_round_trips() {
    let parsed: FilterConfig = serde_json::from_str(VALID).unwrap();
    let text = serde_json::to_string(&parsed).unwrap_or_default();
    let again: FilterConfig = serde_json::from_str(&text).unwrap();
    assert_eq!(parsed, again);
}

#[test]
fn errors_name_the_field() {
    let cases = [
        (
            r#""version": 1"#,
            r#""version": 2"#,
            "version: unsupported version 2",
        ),
        (
            r#""name": "ranker""#,
            r#""name": "rank.er""#,
            "experiments[0].name:",
        ),
        (
            r#""weight": 5.25"#,
            r#""weight": 5.255"#,
            "experiments[0].variants[1].weight: 5.255 is finer",
        ),
        (
            r#""weight": 5.25"#,
            r#""weight": 101"#,
            "experiments[0].variants[1].weight: 101 is not a percentage",
        ),
        (
            r#"{"name": "canary", "weight": 5.25}"#,
            r#"{"name": "stable", "weight": 5.25}"#,
            "experiments[0].variants[1].name: duplicate",
        ),
        (
            r#""control": true"#,
            r#""control": true, "weight": 50"#,
            "experiments[0].variants: weights add up to 55.25, not 100",
        ),
        (
            r#""weight": 5.25}"#,
            r#""weight": 5.25, "control": true}"#,
            "experiments[0].variants[1].control: only one",
        ),
        (
            r#""path_prefix": "/predict""#,
            r#""path_prefix": "predict""#,
            "experiments[0].match.path_prefix",
        ),
        (
            r#""token": "0123456789abcdef""#,
            r#""token": "short""#,
            "experiments[0].override.token",
        ),
        (
            r#""names": ["click", "purchase"]"#,
            r#""names": ["click", "click"]"#,
            "experiments[0].outcomes.names[1]: duplicate",
        ),
        (
            r#""beacon": {"path": "/sluice/event"}"#,
            r#""beacon": {"path": "sluice"}"#,
            "experiments[0].beacon.path",
        ),
        (
            r#"{"header": "X-User-Id"}"#,
            r#"{"header": "bad header"}"#,
            "experiments[0].unit.keys[0]",
        ),
        (
            r#""prediction": {"header": "x-model-score"}"#,
            r#""prediction": {"header": "x-model-score", "scale": 0}"#,
            "experiments[0].prediction.scale",
        ),
        (
            r#""echo": {"header": "x-sluice-variant", "cookie": "sluice_ranker"}"#,
            r#""echo": {}"#,
            "experiments[0].echo",
        ),
        (
            r#""type": "user","#,
            r#""type": "switchback", "slot_seconds": 60, "x": 1,"#,
            "experiments[0].unit: unknown field `x`",
        ),
    ];
    for (from, to, want) in cases {
        let got = error_of(&variant_of_valid(from, to));
        assert!(
            got.starts_with(want),
            "replacing {from} with {to}: got {got:?}, want {want:?}"
        );
    }
}

#[test]
fn unknown_fields_are_rejected() {
    let got = error_of(&variant_of_valid(
        r#""version": 1,"#,
        r#""version": 1, "experimentz": [],"#,
    ));
    assert!(got.contains("unknown field `experimentz`"), "{got}");
}

#[test]
fn beacon_needs_outcomes_and_a_user_unit() {
    let no_outcomes = variant_of_valid(
        r#""outcomes": {"header": "x-sluice-outcome", "names": ["click", "purchase"]},"#,
        "",
    );
    assert!(error_of(&no_outcomes).starts_with("experiments[0].beacon: needs `outcomes.names`"));
    let request_unit = variant_of_valid(
        r#"{"type": "user", "keys": [{"header": "X-User-Id"}, {"cookie": "uid"}]}"#,
        r#"{"type": "request"}"#,
    );
    assert!(error_of(&request_unit).starts_with("experiments[0].beacon: needs unit type `user`"));
}

#[test]
fn treatments_share_the_space_unless_reserved() {
    let three = |a: &str, b: &str| {
        format!(
            r#"{{"version": 1, "experiments": [{{"name": "e", "unit": {{"type": "request"}},
              "variants": [{{"name": "c"}}, {{"name": "t1", {a}}}, {{"name": "t2", {b}}}]}}]}}"#
        )
    };
    // Two treatments without reservations get 50 % each.
    assert_eq!(
        error_of(&three(r#""weight": 50"#, r#""weight": 50"#)),
        "accepted"
    );
    assert!(
        error_of(&three(r#""weight": 60"#, r#""weight": 10"#)).starts_with(
            "experiments[0].variants[1].weight: 60 exceeds this treatment's max_weight 50"
        )
    );
    // An explicit reservation leaves the rest to the other.
    assert_eq!(
        error_of(&three(
            r#""weight": 80, "max_weight": 90"#,
            r#""weight": 10"#
        )),
        "accepted"
    );
    assert!(error_of(&three(
        r#""weight": 1, "max_weight": 90"#,
        r#""weight": 1, "max_weight": 20"#
    ))
    .starts_with(
        "experiments[0].variants: the treatments' max_weight values add up to more than 100"
    ));
}

#[test]
fn experiments_must_not_collide() {
    let two = r#"{"version": 1, "experiments": [
        {"name": "a", "unit": {"type": "request"}, "variants": [{"name": "c"}, {"name": "t", "weight": 1}]},
        {"name": "b", "unit": {"type": "request"}, "variants": [{"name": "c"}, {"name": "t", "weight": 1}]}]}"#;
    assert!(error_of(two).starts_with("experiments[1].header: routing header \"x-sluice-variant\""));
    let fixed = two.replacen(r#""name": "b","#, r#""name": "b", "header": "x-other","#, 1);
    assert_eq!(error_of(&fixed), "accepted");
}

#[test]
fn with_weights_renders_a_valid_config() {
    let parsed: FilterConfig = serde_json::from_str(VALID).unwrap();
    let out = parsed.with_weights("ranker", &[("canary".into(), 25.0)]);
    let out = out.unwrap();
    let plan = Plan::from_config(&out).unwrap();
    assert_eq!(plan.experiments[0].layout.weights(2), vec![7500, 2500]);
    assert!(parsed
        .with_weights("ranker", &[("stable".into(), 25.0)])
        .is_err());
    assert!(parsed.with_weights("nope", &[]).is_err());
    assert!(parsed
        .with_weights("ranker", &[("canary".into(), 100.5)])
        .is_err());
}

#[test]
fn revision_is_optional_bounded_and_kept() {
    let with = |r: &str| {
        variant_of_valid(
            r#""version": 1,"#,
            &format!(r#""version": 1, "revision": {r},"#),
        )
    };
    match Plan::from_json(with(r#""7@1795450000000""#).as_bytes()) {
        Ok(p) => assert_eq!(p.revision.as_deref(), Some("7@1795450000000")),
        Err(e) => unreachable!("{e}"),
    }
    assert!(error_of(&with(r#""""#)).contains("revision"));
    assert!(error_of(&with(&format!("{:?}", "x".repeat(MAX_REVISION + 1)))).contains("revision"));
    assert!(error_of(&with(r#""a\nb""#)).contains("revision"));
    match Plan::from_json(VALID.as_bytes()) {
        Ok(p) => assert_eq!(p.revision, None),
        Err(e) => unreachable!("{e}"),
    }
}

#[test]
fn secret_is_optional_bounded_printable_and_never_shown() {
    let with = |s: &str| {
        variant_of_valid(
            r#""secret": "0123456789abcdef-valid","#,
            &format!(r#""secret": {s},"#),
        )
    };
    let good = "0123456789abcdef0123456789abcdef";
    match Plan::from_json(with(&format!("{good:?}")).as_bytes()) {
        Ok(p) => {
            let s = p.secret.expect("secret dropped");
            assert_eq!(format!("{s:?}"), "Secret(..)");
            // The plan carries the secret itself: its keys are the ones the secret derives.
            assert_eq!(
                s.key(crate::mac::PURPOSE_EXPOSURE),
                crate::mac::Key::derive(good.as_bytes(), crate::mac::PURPOSE_EXPOSURE)
            );
        }
        Err(e) => unreachable!("{e}"),
    }
    assert_eq!(
        error_of(&with(&format!("{:?}", "x".repeat(MIN_SECRET)))),
        "accepted"
    );
    assert!(
        error_of(&with(&format!("{:?}", "x".repeat(MIN_SECRET - 1))))
            .starts_with("secret: must be 16 to 256 bytes")
    );
    assert_eq!(
        error_of(&with(&format!("{:?}", "x".repeat(MAX_SECRET)))),
        "accepted"
    );
    assert!(
        error_of(&with(&format!("{:?}", "x".repeat(MAX_SECRET + 1))))
            .starts_with("secret: must be")
    );
    assert!(error_of(&with(&format!("{:?}", format!("{good}\n"))))
        .starts_with("secret: must not contain control characters"));
    assert!(error_of(&with(r#""0123456789abcdef\u0000""#))
        .starts_with("secret: must not contain control"));
    // Optional without beacons; a beacon needs it.
    let without = variant_of_valid(r#""secret": "0123456789abcdef-valid","#, "");
    assert!(error_of(&without).starts_with("experiments[0].beacon: needs the top-level `secret`"));
    let neither = without.replace(r#""beacon": {"path": "/sluice/event"},"#, "");
    match Plan::from_json(neither.as_bytes()) {
        Ok(p) => assert_eq!(p.secret, None),
        Err(e) => unreachable!("{e}"),
    }
}

/// Configurations that hurt traffic are refused, naming the field.
#[test]
fn configs_that_hurt_traffic_are_refused() {
    let cases = [
        // The upstream got `x-user-id: stable`.
        (r#""name": "ranker","#, r#""name": "ranker", "header": "X-User-Id","#, "experiments[0].header: routing header \"x-user-id\" is a header this experiment reads"),
        (r#""name": "ranker","#, r#""name": "ranker", "header": "x-sluice-override-token","#, "experiments[0].header: routing header \"x-sluice-override-token\""),
        (r#""name": "ranker","#, r#""name": "ranker", "header": "host","#, "experiments[0].header: \"host\" is reserved"),
        (r#""name": "ranker","#, r#""name": "ranker", "header": "x-envoy-original-path","#, "experiments[0].header: \"x-envoy-original-path\" is reserved"),
        // Responses with `content-length: canary`.
        (r#""echo": {"header": "x-sluice-variant","#, r#""echo": {"header": "Content-Length","#, "experiments[0].echo.header: \"content-length\" is reserved"),
        (r#""echo": {"header": "x-sluice-variant","#, r#""echo": {"header": "x-model-score","#, "experiments[0].echo.header: \"x-model-score\" is a response header this experiment reads"),
        (r#""echo": {"header": "x-sluice-variant","#, r#""echo": {"header": "x-sluice-exposure","#, "experiments[0].echo.header: \"x-sluice-exposure\""),
        // Every `/predict` answered 400.
        (r#""beacon": {"path": "/sluice/event"}"#, r#""beacon": {"path": "/predict"}"#, "experiments[0].beacon.path: \"/predict\" is inside this experiment's match.path_prefix"),
        (r#""beacon": {"path": "/sluice/event"}"#, r#""beacon": {"path": "/predict/event"}"#, "experiments[0].beacon.path"),
        (r#""beacon": {"path": "/sluice/event"}"#, r#""beacon": {"path": "/sluice/event", "token_header": "set-cookie"}"#, "experiments[0].beacon.token_header: \"set-cookie\" is reserved"),
        (r#""beacon": {"path": "/sluice/event"}"#, r#""beacon": {"path": "/sluice/event", "token_param": "name"}"#, "experiments[0].beacon.token_param: must differ"),
        (r#""beacon": {"path": "/sluice/event"}"#, r#""beacon": {"path": "/sluice/event", "token_cookie": "sluice_ranker"}"#, "experiments[0].beacon.token_cookie: is also the echo cookie"),
        (r#""beacon": {"path": "/sluice/event"}"#, r#""beacon": {"path": "/sluice/event", "max_age_seconds": 0}"#, "experiments[0].beacon.max_age_seconds"),
        (r#""beacon": {"path": "/sluice/event"}"#, r#""beacon": {"path": "/sluice/event", "limit": {"users": 1000000}}"#, "experiments[0].beacon.limit.users: must be 1 to 65536"),
        (r#""beacon": {"path": "/sluice/event"}"#, r#""beacon": {"path": "/sluice/event", "limit": {"events_per_user": 0}}"#, "experiments[0].beacon.limit.events_per_user"),
        (r#""beacon": {"path": "/sluice/event"}"#, r#""beacon": {"path": "/sluice event"}"#, "experiments[0].beacon.path"),
        (r#"{"cookie": "uid"}"#, r#"{"query": "exposure"}"#, "experiments[0].unit.keys[1]: is also a query parameter of the beacon"),
    ];
    for (from, to, want) in cases {
        let got = error_of(&variant_of_valid(from, to));
        assert!(
            got.starts_with(want),
            "replacing {from} with {to}: got {got:?}, want {want:?}"
        );
    }
}

#[test]
fn sizes_and_counts_are_capped() {
    // A 10 MB salt made requests 45-110x slower.
    let salt = variant_of_valid(
        r#""name": "ranker","#,
        &format!(r#""name": "ranker", "salt": "{}","#, "s".repeat(10 << 20)),
    );
    assert!(error_of(&salt).starts_with("experiments[0].salt: 10485760 bytes, longer than 256"));
    let salt = variant_of_valid(
        r#""name": "ranker","#,
        &format!(r#""name": "ranker", "salt": "{}","#, "s".repeat(MAX_SALT)),
    );
    assert_eq!(error_of(&salt), "accepted");
    let long = |n: usize| "x".repeat(n);
    assert!(
        error_of(&variant_of_valid("X-User-Id", &long(MAX_FIELD_NAME + 1)))
            .starts_with("experiments[0].unit.keys[0]: header name longer than 128")
    );
    assert!(error_of(&variant_of_valid(
        r#""cookie": "uid""#,
        &format!(r#""cookie": "{}""#, long(MAX_FIELD_NAME + 1))
    ))
    .starts_with("experiments[0].unit.keys[1]"));
    assert!(error_of(&variant_of_valid(
        r#""path_prefix": "/predict""#,
        &format!(r#""path_prefix": "/{}""#, long(MAX_PATH))
    ))
    .starts_with("experiments[0].match.path_prefix: longer than 1024"));
    assert!(error_of(&variant_of_valid(
        r#""token": "0123456789abcdef""#,
        &format!(r#""token": "{}""#, long(MAX_OVERRIDE_TOKEN + 1))
    ))
    .starts_with("experiments[0].override.token"));

    // 500 and 2,000 experiments: every request 431 upstream, 70k stats left behind.
    let experiments = |n: usize, variants: usize, outcomes: usize| {
        let names: Vec<String> = (0..outcomes).map(|o| format!("\"o{o}\"")).collect();
        let exps: Vec<String> = (0..n)
            .map(|i| {
                let vs: Vec<String> = (0..variants)
                    .map(|v| if v == 0 { r#"{"name": "c"}"#.to_string() } else { format!(r#"{{"name": "t{v}", "weight": 0}}"#) })
                    .collect();
                format!(
                    r#"{{"name": "e{i}", "header": "x-v{i}", "unit": {{"type": "request"}}, "variants": [{}], "outcomes": {{"names": [{}]}}}}"#,
                    vs.join(","),
                    names.join(",")
                )
            })
            .collect();
        format!(r#"{{"version": 1, "experiments": [{}]}}"#, exps.join(","))
    };
    assert_eq!(error_of(&experiments(MAX_EXPERIMENTS, 2, 1)), "accepted");
    for n in [MAX_EXPERIMENTS + 1, 500, 2000] {
        let got = error_of(&experiments(n, 2, 1));
        assert!(
            got.starts_with(&format!("experiments: {n} experiments, more than 32")),
            "{got}"
        );
    }
    assert!(error_of(&experiments(1, MAX_VARIANTS + 1, 1))
        .starts_with("experiments[0].variants: more than 16 variants"));
    assert!(error_of(&experiments(1, 2, MAX_OUTCOMES + 1))
        .starts_with("experiments[0].outcomes.names: more than 32"));
    // Within every per-item cap, but too many metrics in all.
    let got = error_of(&experiments(MAX_EXPERIMENTS, MAX_VARIANTS, MAX_OUTCOMES));
    assert!(got.starts_with("experiments: would define"), "{got}");
}

#[test]
fn one_experiment_must_not_overwrite_what_another_reads() {
    let two = r#"{"version": 1, "experiments": [
        {"name": "a", "unit": {"type": "user", "keys": [{"header": "x-user-id"}]}, "variants": [{"name": "c"}, {"name": "t", "weight": 1}]},
        {"name": "b", "header": "x-user-id", "unit": {"type": "request"}, "variants": [{"name": "c"}, {"name": "t", "weight": 1}]}]}"#;
    assert!(error_of(two).starts_with(
        "experiments[1].header: routing header \"x-user-id\" is a header experiments[0] reads"
    ));
    let fixed = two.replacen(
        r#""header": "x-user-id", "unit""#,
        r#""header": "x-b", "unit""#,
        1,
    );
    assert_eq!(error_of(&fixed), "accepted");
}

/// The full example in `filter/README.md` is a valid configuration.
#[test]
fn the_readme_example_is_valid() {
    let example = readme_example();
    assert!(example.contains("\"beacon\""), "{example}");
    assert_eq!(error_of(example), "accepted");
}

/// The full configuration example of `filter/README.md`.
pub(crate) fn readme_example() -> &'static str {
    include_str!("../../README.md")
        .split("```json\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .unwrap_or_default()
}

#[test]
fn type_errors_name_the_field_path() {
    let text = r#"{"version": 1, "experiments": [{"name": "e", "unit": {"type": "request"},
        "variants": [{"name": "a"}, {"name": "b", "weight": "x"}]}]}"#;
    assert_eq!(
        error_of(text),
        r#"experiments[0].variants[1].weight: expected a number, found string "x""#
    );
    // Text that is not JSON has no field to name: its line and column.
    let broken = error_of("{\"version\": 1,\n  oops}");
    assert!(
        broken.starts_with("invalid JSON: ") && broken.contains("(line 2, column 3)"),
        "{broken}"
    );
    // Trailing text after the document is refused too.
    assert!(error_of(&format!("{VALID} x")).starts_with("invalid JSON: "));
}

#[test]
fn revision_parses_the_controllers_form_only() {
    assert_eq!(
        Revision::parse("7@1795450000000"),
        Some(Revision {
            version: 7,
            written_ms: 1_795_450_000_000
        })
    );
    let r = Revision {
        version: u64::MAX,
        written_ms: 0,
    };
    assert_eq!(Revision::parse(&r.to_string()), Some(r));
    for bad in [
        "",
        "7",
        "@",
        "7@",
        "@1",
        "+7@1",
        "7@+1",
        "-7@1",
        " 7@1",
        "7@1 ",
        "7@1@2",
        "v7@1",
        "7.0@1",
        "18446744073709551616@1",
        "٧@1",
    ] {
        assert_eq!(Revision::parse(bad), None, "{bad}");
    }
    let plan = |r: &str| {
        let json = variant_of_valid(r#""version": 1,"#, &format!(r#""version": 1, {r}"#));
        match Plan::from_json(json.as_bytes()) {
            Ok(p) => p.push_version(),
            Err(e) => unreachable!("{e}"),
        }
    };
    assert_eq!(plan(r#""revision": "42@1795450000000","#), 42);
    assert_eq!(plan(r#""revision": "hand-made","#), 0);
    assert_eq!(plan(""), 0);
}

/// Istio passes `pluginConfig` through `google.protobuf.Struct`, whose numbers are doubles.
#[test]
fn whole_numbers_may_be_written_as_integral_floats() {
    let json = r#"{
      "version": 1.0,
      "secret": "0123456789abcdef-valid",
      "experiments": [{
        "name": "sb",
        "unit": {"type": "switchback", "slot_seconds": 6e1},
        "variants": [{"name": "a"}, {"name": "b", "weight": 50.0}],
        "header": "x-sb",
        "echo": {"cookie": "sb", "cookie_max_age_seconds": 3600.0}
      }, {
        "name": "u",
        "unit": {"type": "user", "keys": [{"header": "x-user-id"}]},
        "variants": [{"name": "a"}, {"name": "b", "weight": 50.0}],
        "outcomes": {"names": ["click"]},
        "beacon": {"path": "/e", "max_age_seconds": 86400.0,
                   "limit": {"events_per_user": 30.0, "window_seconds": 3600.0, "users": 4096.0}},
        "shadow": {"cluster": "s", "sample_percent": 10.0, "timeout_ms": 500.0,
                   "max_body_bytes": 1024.0, "max_in_flight": 8.0, "max_bytes_in_flight": 1e6,
                   "log_per_minute": 0.0}
      }]
    }"#;
    let config: FilterConfig = serde_json::from_str(json).unwrap();
    assert_eq!(config.version, 1);
    let e = &config.experiments[0];
    assert_eq!(e.unit, UnitConfig::Switchback { slot_seconds: 60 });
    assert_eq!(
        e.echo.as_ref().and_then(|x| x.cookie_max_age_seconds),
        Some(3600)
    );
    let e = &config.experiments[1];
    let Some(b) = &e.beacon else { unreachable!() };
    assert_eq!(
        (
            b.max_age_seconds,
            b.limit.events_per_user,
            b.limit.window_seconds,
            b.limit.users
        ),
        (86_400, 30, 3600, 4096)
    );
    let Some(s) = &e.shadow else { unreachable!() };
    assert_eq!(
        (
            s.timeout_ms,
            s.max_body_bytes,
            s.max_in_flight,
            s.max_bytes_in_flight,
            s.log_per_minute
        ),
        (500, 1024, 8, 1_000_000, 0)
    );
    // What the controller renders back is integers again, and the same plan.
    let rendered = serde_json::to_string(&config).unwrap();
    for field in [
        r#""version":1,"#,
        r#""slot_seconds":60}"#,
        r#""timeout_ms":500,"#,
        r#""users":4096}"#,
    ] {
        assert!(rendered.contains(field), "{field} in {rendered}");
    }
    if let Err(e) = Plan::from_json(json.as_bytes()) {
        unreachable!("{e}")
    }
}

#[test]
fn whole_numbers_refuse_fractions_negatives_and_overflow_naming_the_field() {
    let with = |field: &str, value: &str| {
        error_of(&variant_of_valid(
            r#""beacon": {"path": "/sluice/event"}"#,
            &format!(r#""beacon": {{"path": "/sluice/event", {field}: {value}}}"#),
        ))
    };
    for (value, found) in [
        ("86400.5", "floating point `86400.5`"),
        ("-1", "integer `-1`"),
        ("-1.0", "floating point `-1.0`"),
        ("1e300", "floating point `1e+300`"),
        (
            "18446744073709551616",
            "floating point `1.8446744073709552e+19`",
        ),
        ("\"60\"", "string \"60\""),
        ("true", "boolean `true`"),
    ] {
        let e = with(r#""max_age_seconds""#, value);
        assert_eq!(
            e,
            format!(
                "experiments[0].beacon.max_age_seconds: expected a whole number, at least 0, found {found}"
            ),
            "{value}"
        );
    }
    // A u32 field names its range.
    let e = with(r#""limit""#, r#"{"events_per_user": 4294967296.0}"#);
    assert_eq!(
        e,
        "experiments[0].beacon.limit.events_per_user: expected a whole number from 0 to 4294967295, found floating point `4294967296.0`"
    );
    assert!(
        error_of(&VALID.replacen(r#""version": 1,"#, r#""version": 1.5,"#, 1))
            .starts_with("version: expected a whole number from 0 to 4294967295")
    );
    // Integral but still wrong where the value is checked: an unsupported version.
    assert!(
        error_of(&VALID.replacen(r#""version": 1,"#, r#""version": 2.0,"#, 1))
            .contains("unsupported version 2")
    );
}

/// VALID with a `breaker` section (given as JSON) added to the experiment.
fn with_breaker(section: &str) -> String {
    variant_of_valid(
        r#""prediction": {"header": "x-model-score"}"#,
        &format!(r#""prediction": {{"header": "x-model-score"}}, "breaker": {section}"#),
    )
}

fn breaker_of(json: &str) -> Option<crate::breaker::Params> {
    match Plan::from_json(json.as_bytes()) {
        Ok(p) => p.experiments[0].breaker,
        Err(e) => unreachable!("{e}"),
    }
}

#[test]
fn breaker_defaults_and_values() {
    assert_eq!(breaker_of(VALID), None);
    let d = breaker_of(&with_breaker("{}"));
    assert_eq!(
        d,
        Some(crate::breaker::Params {
            window_ms: 10_000,
            min_requests: 50,
            max_error_rate: 0.05,
            max_ratio_to_control: 3.0,
            significance: breaker::DEFAULT_SIGNIFICANCE,
        })
    );
    // The example of the docs, whole numbers written as floats (as through Istio's Struct).
    let p = breaker_of(&with_breaker(
        r#"{"window_seconds": 5.0, "min_requests": 2e1, "max_error_rate": 0.1, "max_ratio_to_control": 2, "significance": 0.001}"#,
    ));
    assert_eq!(
        p,
        Some(crate::breaker::Params {
            window_ms: 5_000,
            min_requests: 20,
            max_error_rate: 0.1,
            max_ratio_to_control: 2.0,
            significance: 0.001,
        })
    );
}

#[test]
fn breaker_errors_name_the_field() {
    let f = "experiments[0].breaker";
    for (section, want) in [
        (r#"{"window_seconds": 0}"#, format!("{f}.window_seconds: must be 1 to 3600")),
        (r#"{"window_seconds": 3601}"#, format!("{f}.window_seconds: must be 1 to 3600")),
        (
            r#"{"window_seconds": 1.5}"#,
            format!("{f}.window_seconds: expected a whole number, at least 0, found floating point `1.5`"),
        ),
        (r#"{"min_requests": 0}"#, format!("{f}.min_requests: must be 1 to 1000000")),
        (
            r#"{"max_error_rate": 0}"#,
            format!("{f}.max_error_rate: must be a fraction above 0 and below 1 (0.05 is 5 %)"),
        ),
        (
            r#"{"max_error_rate": 5}"#,
            format!("{f}.max_error_rate: must be a fraction above 0 and below 1 (0.05 is 5 %)"),
        ),
        (
            r#"{"max_error_rate": "5%"}"#,
            format!("{f}.max_error_rate: expected a number, found string \"5%\""),
        ),
        (r#"{"max_ratio_to_control": 0.5}"#, format!("{f}.max_ratio_to_control: must be 1 to 1000")),
        (r#"{"max_ratio_to_control": 1e9}"#, format!("{f}.max_ratio_to_control: must be 1 to 1000")),
        (r#"{"significance": 0}"#, format!("{f}.significance: must be above 0 and at most 0.1")),
        (r#"{"significance": 0.5}"#, format!("{f}.significance: must be above 0 and at most 0.1")),
        (r#"{"significance": -1e-4}"#, format!("{f}.significance: must be above 0 and at most 0.1")),
    ] {
        assert_eq!(error_of(&with_breaker(section)), want, "{section}");
    }
    let e = error_of(&with_breaker(r#"{"max_errors": 3}"#));
    assert!(
        e.starts_with(&format!("{f}.max_errors: unknown field `max_errors`")),
        "{e}"
    );
    let e = error_of(&with_breaker("true"));
    assert!(e.starts_with(f), "{e}");
}

#[test]
fn breaker_round_trips_through_the_wire_format() {
    let json = with_breaker(r#"{"window_seconds": 30, "max_error_rate": 0.02}"#);
    let parsed: FilterConfig = serde_json::from_str(&json).unwrap();
    let again: FilterConfig = match serde_json::to_string(&parsed).map(|s| serde_json::from_str(&s))
    {
        Ok(Ok(c)) => c,
        _ => unreachable!("round trip"),
    };
    assert_eq!(parsed, again);
    let b = parsed.experiments[0].breaker.clone();
    assert_eq!(b.as_ref().map(|b| b.window_seconds), Some(30));
    assert_eq!(b.as_ref().map(|b| b.min_requests), Some(50));
    // The controller's re-weighting keeps the section.
    let moved = parsed.with_weights("ranker", &[("canary".to_string(), 10.0)]);
    assert_eq!(moved.map(|c| c.experiments[0].breaker.clone()), Ok(b));
}

#[test]
fn breaker_epoch_follows_the_push_version() {
    let epoch = |revision: Option<&str>| {
        let json = match revision {
            Some(r) => VALID.replacen(
                r#""version": 1,"#,
                &format!(r#""version": 1, "revision": "{r}","#),
                1,
            ),
            None => VALID.to_string(),
        };
        match Plan::from_json(json.as_bytes()) {
            Ok(p) => p.breaker_epoch(),
            Err(e) => unreachable!("{e}"),
        }
    };
    assert_eq!(
        epoch(None),
        crate::breaker::Epoch {
            version: 0,
            digest: 0
        }
    );
    // A retry of push 12 keeps its trips; push 13 clears them.
    assert_eq!(epoch(Some("12@1000")), epoch(Some("12@2000")));
    assert_eq!(epoch(Some("12@1000")).version, 12);
    assert_eq!(epoch(Some("12@1000")).digest, 0);
    assert_ne!(epoch(Some("12@1000")), epoch(Some("13@1000")));
    // Free-form revisions: each its own epoch, never equal to "no revision".
    let a = epoch(Some("hand-edit-1"));
    assert_eq!(a.version, 0);
    assert_ne!(a.digest, 0);
    assert_ne!(a, epoch(Some("hand-edit-2")));
    assert_eq!(a, epoch(Some("hand-edit-1")));
}
