use super::*;
use crate::config::Plan;
use crate::header_map::serialise;
use crate::mac::{self, Key};

#[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
use wasm_bindgen_test::wasm_bindgen_test as test;

fn plan(shadow: &str) -> Result<Plan, ConfigError> {
    let json = format!(
        r#"{{"version": 1, "secret": "0123456789abcdef-test", "experiments": [{{"name": "e",
            "unit": {{"type": "user", "keys": [{{"header": "x-user-id"}}]}},
            "variants": [{{"name": "stable"}}, {{"name": "canary", "weight": 10}}],
            "shadow": {shadow}}}]}}"#
    );
    Plan::from_json(json.as_bytes())
}

fn checked(shadow: &str) -> Shadow {
    match plan(shadow) {
        Ok(mut p) => p.experiments.remove(0).shadow.unwrap(),
        Err(e) => unreachable!("{e}"),
    }
}

fn error(shadow: &str) -> String {
    plan(shadow)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default()
}

const FIELDS: &str = r#"{"cluster": "shadow", "sample_percent": 100, "methods": ["POST"],
    "compare": {"fields": [
        {"name": "score", "pointer": "/score", "abs_tolerance": 0.01, "rel_tolerance": 0.0},
        {"name": "label", "pointer": "/label", "type": "string"}]}}"#;

#[test]
fn defaults() {
    let s = checked(r#"{"cluster": "shadow", "sample_percent": 12.5}"#);
    assert_eq!(s.sample, 1250);
    assert_eq!(s.methods, vec!["GET", "HEAD", "OPTIONS"]);
    assert_eq!(s.variants, vec![true, true]);
    assert_eq!(
        (s.timeout_ms, s.max_body_bytes, s.max_in_flight),
        (1000, 65536, 64)
    );
    assert!(s.compare_body && s.fields.is_empty());
    assert!(s.eligible(b"GET", 1));
    assert!(
        !s.eligible(b"POST", 1),
        "writes are not shadowed by default"
    );
}

#[test]
fn every_eligible_request_is_copied_only_at_100_percent_of_a_shadowed_variant() {
    let all = checked(r#"{"cluster": "shadow", "sample_percent": 100, "variants": ["canary"]}"#);
    assert!(all.copies_all(1));
    assert!(!all.copies_all(0), "stable is not shadowed");
    assert!(!all.copies_all(2), "no such variant");
    let most = checked(r#"{"cluster": "shadow", "sample_percent": 99.99}"#);
    assert!(!most.copies_all(0) && !most.copies_all(1));
}

#[test]
fn errors_name_the_field() {
    let cases = [
        (
            r#"{"cluster": "", "sample_percent": 1}"#,
            "experiments[0].shadow.cluster",
        ),
        (
            r#"{"cluster": "s", "sample_percent": 100.5}"#,
            "experiments[0].shadow.sample_percent",
        ),
        (
            r#"{"cluster": "s", "sample_percent": 1, "variants": ["nope"]}"#,
            "experiments[0].shadow.variants[0]: no variant named \"nope\"",
        ),
        (
            r#"{"cluster": "s", "sample_percent": 1, "timeout_ms": 0}"#,
            "experiments[0].shadow.timeout_ms",
        ),
        (
            r#"{"cluster": "s", "sample_percent": 1, "max_in_flight": 0}"#,
            "experiments[0].shadow.max_in_flight",
        ),
        (
            r#"{"cluster": "s", "sample_percent": 1, "methods": ["post"]}"#,
            "experiments[0].shadow.methods[0]",
        ),
        (
            r#"{"cluster": "s", "sample_percent": 1, "compare": {"fields": [{"name": "a", "pointer": "score"}]}}"#,
            "experiments[0].shadow.compare.fields[0].pointer: \"score\" is not a JSON pointer",
        ),
        (
            r#"{"cluster": "s", "sample_percent": 1, "compare": {"fields": [{"name": "a", "pointer": "/a~2"}]}}"#,
            "experiments[0].shadow.compare.fields[0].pointer",
        ),
        (
            r#"{"cluster": "s", "sample_percent": 1, "compare": {"fields": [{"name": "status", "pointer": "/a"}]}}"#,
            "experiments[0].shadow.compare.fields[0].name",
        ),
        (
            r#"{"cluster": "s", "sample_percent": 1, "compare": {"fields": [{"name": "a", "pointer": "/a", "abs_tolerance": -1}]}}"#,
            "experiments[0].shadow.compare.fields[0].abs_tolerance",
        ),
        (
            r#"{"cluster": "s", "sample_percent": 1, "bogus": 1}"#,
            "experiments[0].shadow.bogus: unknown field `bogus`",
        ),
    ];
    for (shadow, want) in cases {
        let got = error(shadow);
        assert!(
            got.starts_with(want),
            "{shadow}: got {got:?}, want {want:?}"
        );
    }
}

#[test]
fn user_sampling_needs_user_unit() {
    let json = r#"{"version": 1, "secret": "0123456789abcdef-test", "experiments": [{"name": "e", "unit": {"type": "request"},
        "variants": [{"name": "a"}, {"name": "b", "weight": 1}],
        "shadow": {"cluster": "s", "sample_percent": 1, "sample_by": "user"}}]}"#;
    let got = Plan::from_json(json.as_bytes())
        .err()
        .map(|e| e.to_string());
    assert_eq!(
        got.as_deref(),
        Some("experiments[0].shadow.sample_by: `user` sampling needs unit type `user`")
    );
}

#[test]
fn copies_drop_hop_by_hop_and_routing_headers() {
    let s = checked(r#"{"cluster": "shadow", "sample_percent": 1, "authority": "shadow.local"}"#);
    let h = |k: &str, v: &[u8]| (k.to_string(), v.to_vec());
    let original = vec![
        h(":method", b"GET"),
        h(":authority", b"api.example"),
        h(":path", b"/predict"),
        h("connection", b"keep-alive, x-secret-hop"),
        h("x-secret-hop", b"1"),
        h("transfer-encoding", b"chunked"),
        h("x-sluice-variant", b"canary"),
        h("x-sluice-shadow", b"0"),
        h("x-bin", &[0xff, 0xfe]),
        h("x-request-id", b"abc"),
    ];
    let got = copy_headers(&s, &serialise(&original), &["x-sluice-variant"], "1");
    let want: Vec<(String, String)> = [
        (":method", "GET"),
        (":authority", "shadow.local"),
        (":path", "/predict"),
        ("x-request-id", "abc"),
        ("x-sluice-shadow", "1"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(got, want);
}

fn answer(status: u16, body: &str) -> Answer {
    Answer {
        status,
        body: body.as_bytes().to_vec(),
        truncated: false,
    }
}

#[test]
fn identical_answers_agree_everywhere() {
    let s = checked(FIELDS);
    let a = answer(200, r#"{"score": 0.5, "label": "cat"}"#);
    let c = compare(&s, &a, &a.clone());
    assert!(c.status_agree);
    assert_eq!(c.body_agree, Some(true));
    assert_eq!(
        c.fields,
        vec![
            FieldResult::Agree { delta: Some(0.0) },
            FieldResult::Agree { delta: None }
        ]
    );
}

#[test]
fn numbers_compare_within_tolerance() {
    let s = checked(FIELDS);
    let p = answer(200, r#"{"score": 0.50, "label": "cat"}"#);
    let close = compare(&s, &p, &answer(200, r#"{"score": 0.505, "label": "cat"}"#));
    assert!(
        matches!(close.fields[0], FieldResult::Agree { delta: Some(d) } if (d - 0.005).abs() < 1e-12)
    );
    assert_eq!(close.body_agree, Some(false));
    let far = compare(&s, &p, &answer(200, r#"{"score": 0.4, "label": "dog"}"#));
    match &far.fields[0] {
        FieldResult::Disagree {
            delta: Some(d),
            primary,
            shadow,
        } => {
            assert!((d + 0.1).abs() < 1e-12);
            assert_eq!((primary.as_str(), shadow.as_str()), ("0.5", "0.4"));
        }
        other => unreachable!("{other:?}"),
    }
    assert!(matches!(
        &far.fields[1],
        FieldResult::Disagree { delta: None, .. }
    ));
    // Relative tolerance.
    let mut rel = s.clone();
    rel.fields[0].abs_tolerance = 0.0;
    rel.fields[0].rel_tolerance = 0.25;
    assert!(matches!(
        compare(&rel, &p, &answer(200, r#"{"score": 0.6}"#)).fields[0],
        FieldResult::Agree { .. }
    ));
}

#[test]
fn missing_or_unusable_fields_are_not_verdicts() {
    let s = checked(FIELDS);
    let p = answer(200, r#"{"score": 0.5}"#);
    let c = compare(&s, &p, &answer(500, "oops"));
    assert!(!c.status_agree);
    assert_eq!(c.fields, vec![FieldResult::Missing, FieldResult::Missing]);
    let c = compare(&s, &p, &answer(200, r#"{"score": "high"}"#));
    assert_eq!(c.fields[0], FieldResult::Missing);
    let mut big = answer(200, "");
    big.push_body(&[b'x'; 10], 4);
    assert!(big.truncated && big.body.is_empty());
    assert_eq!(compare(&s, &p, &big).body_agree, None);
}

#[test]
fn log_budget_resets_each_minute() {
    let mut b = LogBudget::default();
    assert!(b.take(60, 2) && b.take(61, 2));
    assert!(!b.take(119, 2));
    assert!(b.take(120, 2));
}

#[test]
fn log_lines_are_json_with_truncated_values() {
    let long = "x".repeat(200);
    let line = disagreement_line("e", "canary", "rid", "score", &truncate(&long), "1");
    let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
    assert_eq!(v["field"], "score");
    assert_eq!(
        v["primary"].as_str().map(|s| s.chars().count()),
        Some(LOG_VALUE_CHARS + 1)
    );
}

#[test]
fn deltas_are_scaled_by_sign() {
    let s = checked(FIELDS);
    assert_eq!(scaled_delta(&s.fields[0], -0.0125), Some((true, 13)));
    assert_eq!(scaled_delta(&s.fields[0], 0.2), Some((false, 200)));
    assert_eq!(scaled_delta(&s.fields[0], f64::NAN), None);
}

#[test]
fn bytes_in_flight_default_and_bounds() {
    assert_eq!(
        checked(r#"{"cluster": "s", "sample_percent": 1}"#).max_bytes_in_flight,
        8 * 1024 * 1024
    );
    let low = error(
        r#"{"cluster": "s", "sample_percent": 1, "max_body_bytes": 1000, "max_bytes_in_flight": 999}"#,
    );
    assert!(
        low.starts_with(
            "experiments[0].shadow.max_bytes_in_flight: must be between max_body_bytes (1000)"
        ),
        "{low}"
    );
    let high = error(r#"{"cluster": "s", "sample_percent": 1, "max_bytes_in_flight": 2000000000}"#);
    assert!(
        high.starts_with("experiments[0].shadow.max_bytes_in_flight"),
        "{high}"
    );
}

#[test]
fn the_budget_never_goes_over_its_cap() {
    let mut b = Budget::default();
    assert!(b.take(600, 1000));
    assert!(!b.take(401, 1000), "over the cap");
    assert_eq!(b.held, 600, "a refused take takes nothing");
    assert!(b.take(400, 1000));
    assert!(!b.take(usize::MAX, usize::MAX), "no overflow");
    b.give_back(1000);
    assert_eq!(b.held, 0);
    b.give_back(5);
    assert_eq!(b.held, 0);
}

#[test]
fn a_chunk_over_the_limit_is_refused_before_it_is_read() {
    let mut a = answer(200, "abc");
    assert!(a.room_for(7, 10));
    assert!(!a.room_for(8, 10));
    assert!(a.truncated && a.body.is_empty());
    assert!(!a.room_for(0, 10), "once truncated, nothing more is taken");
}

#[test]
fn timeouts_and_failures_are_told_from_answers() {
    assert_eq!(classify(0, 950, 1000), Some(Reply::Timeout));
    assert_eq!(classify(504, 900, 1000), Some(Reply::Timeout));
    assert_eq!(classify(504, 100, 1000), None, "a real 504 is an answer");
    assert_eq!(classify(0, 100, 1000), Some(Reply::Failed));
    assert_eq!(classify(503, 999, 1000), None);
}

#[test]
fn every_copy_has_exactly_one_fate() {
    let ok = Reply::Answer(answer(200, ""));
    assert_eq!(fate(&ok, true, None), Fate::Compared);
    assert_eq!(fate(&ok, false, None), Fate::Skipped(Skip::NoPrimary));
    assert_eq!(
        fate(&ok, true, Some(Skip::BytesInFlight)),
        Fate::Skipped(Skip::BytesInFlight)
    );
    for primary in [true, false] {
        for dropped in [None, Some(Skip::BytesInFlight)] {
            assert_eq!(fate(&Reply::Timeout, primary, dropped), Fate::Timeout);
            assert_eq!(fate(&Reply::Failed, primary, dropped), Fate::Error);
        }
    }
}

#[test]
fn the_answer_size_estimate_follows_peaks_and_decays() {
    assert_eq!(decayed_max(0, 5000), 5000);
    assert_eq!(decayed_max(1600, 0), 1500);
    let mut e = 1 << 20;
    for _ in 0..200 {
        e = decayed_max(e, 100);
    }
    assert_eq!(e, 100);
}

#[test]
fn a_shadow_needs_the_secret() {
    let json = r#"{"version": 1, "experiments": [{"name": "e",
        "unit": {"type": "user", "keys": [{"header": "x-user-id"}]},
        "variants": [{"name": "stable"}, {"name": "canary", "weight": 10}],
        "shadow": {"cluster": "s", "sample_percent": 1}}]}"#;
    let got = Plan::from_json(json.as_bytes())
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        got.starts_with("experiments[0].shadow: needs the top-level `secret`"),
        "{got}"
    );
}

fn marker_key() -> Key {
    Key::derive(b"0123456789abcdef-test", mac::PURPOSE_SHADOW)
}

#[test]
fn markers_verify_only_for_their_request_within_the_window() {
    let k = marker_key();
    let t = 1_700_000_000_000;
    let m = marker(&k, t, 42, b"GET", b"/predict?x=1");
    assert!(m.starts_with("v1.1700000000000.000000000000002a."), "{m}");
    let ok =
        |v: &[u8], now: u64, method: &[u8], path: &[u8]| check_marker(&k, v, now, method, path);
    assert!(ok(m.as_bytes(), t, b"GET", b"/predict?x=1"));
    assert!(ok(
        m.as_bytes(),
        t + MARKER_WINDOW_MS,
        b"GET",
        b"/predict?x=1"
    ));
    assert!(ok(
        m.as_bytes(),
        t - MARKER_WINDOW_MS,
        b"GET",
        b"/predict?x=1"
    ));
    // Too old, too far ahead.
    assert!(!ok(
        m.as_bytes(),
        t + MARKER_WINDOW_MS + 1,
        b"GET",
        b"/predict?x=1"
    ));
    assert!(!ok(
        m.as_bytes(),
        t - MARKER_WINDOW_MS - 1,
        b"GET",
        b"/predict?x=1"
    ));
    // Bound to the request: another method or path does not verify.
    assert!(!ok(m.as_bytes(), t, b"POST", b"/predict?x=1"));
    assert!(!ok(m.as_bytes(), t, b"GET", b"/predict?x=2"));
    // Another secret does not verify, nor the exposure key of the same secret.
    let other = Key::derive(b"0123456789abcdef-TEST", mac::PURPOSE_SHADOW);
    assert!(!check_marker(
        &other,
        m.as_bytes(),
        t,
        b"GET",
        b"/predict?x=1"
    ));
    let exposure = Key::derive(b"0123456789abcdef-test", mac::PURPOSE_EXPOSURE);
    assert!(!check_marker(
        &exposure,
        m.as_bytes(),
        t,
        b"GET",
        b"/predict?x=1"
    ));
    // A changed time, nonce or tag does not verify.
    let later = m.replacen("1700000000000", "1700000000001", 1);
    assert!(!ok(later.as_bytes(), t, b"GET", b"/predict?x=1"));
    let nonce = m.replacen("002a.", "002b.", 1);
    assert!(!ok(nonce.as_bytes(), t, b"GET", b"/predict?x=1"));
    let mut tag = m.clone().into_bytes();
    let last = tag.len() - 1;
    tag[last] = if tag[last] == b'0' { b'1' } else { b'0' };
    assert!(!ok(&tag, t, b"GET", b"/predict?x=1"));
}

#[test]
fn client_values_are_not_markers() {
    let k = marker_key();
    let t = 1_700_000_000_000;
    for v in [
        &b"1"[..],
        b"",
        b"true",
        b"v1",
        b"v1.1700000000000.000000000000002a",
        b"v1.1700000000000.000000000000002a.00000000000000000000000000000000",
        b"v1.1700000000000.000000000000002a.zz",
        b"v1.-5.000000000000002a.00000000000000000000000000000000",
        b"v1.99999999999999999999999.000000000000002a.00000000000000000000000000000000",
        b"v2.1700000000000.000000000000002a.00000000000000000000000000000000",
    ] {
        assert!(
            !check_marker(&k, v, t, b"GET", b"/"),
            "{:?}",
            String::from_utf8_lossy(v)
        );
    }
    // Two copies of one request in the same millisecond carry different markers.
    assert_ne!(
        marker(&k, t, 1, b"GET", b"/"),
        marker(&k, t, 2, b"GET", b"/")
    );
}

#[test]
fn sampling_checks_eligibility_sample_then_the_in_flight_cap() {
    // POST only, canary only (variant 1), 50 % of buckets, at most 2 copies in flight.
    let s = checked(
        r#"{"cluster": "shadow", "sample_percent": 50, "methods": ["POST"],
            "variants": ["canary"], "max_in_flight": 2}"#,
    );
    let half = BUCKETS / 2;
    let never = || unreachable!("drew a bucket for a request that cannot be sampled");
    assert_eq!(sample(&s, 1, b"GET", None, never, 0), Sampling::NotSampled);
    assert_eq!(sample(&s, 0, b"POST", None, never, 0), Sampling::NotSampled);
    assert_eq!(
        sample(&s, 1, b"POST", None, || half, 0),
        Sampling::NotSampled
    );
    assert_eq!(
        sample(&s, 1, b"POST", None, || half - 1, 1),
        Sampling::Taken
    );
    assert_eq!(
        sample(&s, 1, b"POST", None, || 0, 2),
        Sampling::Skipped(Skip::InFlight)
    );
    // By user: the user's bucket decides, and a request without a key is not sampled.
    let mut by_user = s.clone();
    by_user.sample_by = SampleBy::User;
    assert_eq!(
        sample(&by_user, 1, b"POST", Some(0), never, 0),
        Sampling::Taken
    );
    assert_eq!(
        sample(&by_user, 1, b"POST", Some(half), never, 0),
        Sampling::NotSampled
    );
    assert_eq!(
        sample(&by_user, 1, b"POST", None, never, 0),
        Sampling::NotSampled
    );
}

#[test]
fn a_shadow_body_is_read_only_when_compared_present_and_within_the_limit() {
    let mut s = checked(FIELDS);
    s.max_body_bytes = 100;
    let fresh = || Answer {
        status: 200,
        ..Answer::default()
    };
    let mut a = fresh();
    assert!(wants_body(&s, &mut a, 100, false));
    assert!(!a.truncated);
    // Over the limit: not read, compared by status only.
    let mut a = fresh();
    assert!(!wants_body(&s, &mut a, 101, false));
    assert!(a.truncated);
    // No body, or a copy already given up: nothing to read, and not truncated.
    for (size, given_up) in [(0, false), (10, true)] {
        let mut a = fresh();
        assert!(!wants_body(&s, &mut a, size, given_up));
        assert!(!a.truncated);
    }
    // A comparison of status only reads no body.
    let mut status_only = s.clone();
    status_only.fields.clear();
    status_only.compare_body = false;
    assert!(!wants_body(&status_only, &mut fresh(), 10, false));
}

#[test]
fn the_primary_is_captured_for_the_most_demanding_copy() {
    let mut a = checked(FIELDS);
    a.max_body_bytes = 1_000;
    a.max_bytes_in_flight = 50_000;
    let mut b = a.clone();
    b.fields.clear();
    b.compare_body = false;
    b.max_body_bytes = 5_000;
    b.max_bytes_in_flight = 20_000;
    assert_eq!(
        PrimaryNeeds::of([&a, &b]),
        PrimaryNeeds {
            limit: 5_000,
            cap: 50_000,
            needs_body: true
        }
    );
    assert!(!PrimaryNeeds::of([&b]).needs_body);
    assert_eq!(PrimaryNeeds::of([]), PrimaryNeeds::default());
}
