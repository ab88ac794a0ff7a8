//! The filter's configuration parser under hostile input: whatever bytes arrive, `Plan::from_json`
//! answers with a plan or an error naming a field, never a panic (a panic in `on_configure`
//! takes the whole VM down). Property tests mutate a complete valid configuration (every
//! section present) so the mutations reach the checks behind the syntax, and throw raw bytes
//! at the JSON reader. Plus: validation stays linear in the size of the lists it checks.
#![cfg(not(target_arch = "wasm32"))]

use proptest::prelude::*;
use serde_json::{json, Map, Value};
use sluice_filter::config::Plan;

/// A configuration using every section of the format.
fn full() -> Value {
    json!({
        "version": 1,
        "revision": "r1",
        "secret": "fuzz-secret-0123456789",
        "experiments": [{
            "name": "ranker",
            "salt": "s1",
            "unit": {"type": "user", "keys": [{"header": "x-user-id"}, {"cookie": "uid"}, {"query": "u"}], "missing": "control"},
            "variants": [
                {"name": "stable", "control": true},
                {"name": "canary", "weight": 5.25, "max_weight": 50},
                {"name": "other", "weight": 1}
            ],
            "match": {"path_prefix": "/predict"},
            "header": "x-sluice-variant",
            "override": {"token": "0123456789abcdef", "header": "x-o", "token_header": "x-ot"},
            "echo": {"header": "x-served-by", "cookie": "sluice_ranker", "cookie_max_age_seconds": 60},
            "outcomes": {"header": "x-sluice-outcome", "names": ["click", "purchase"]},
            "beacon": {
                "path": "/sluice/event",
                "param": "name",
                "token_cookie": "sluice_exposure",
                "max_age_seconds": 3600,
                "limit": {"events_per_user": 10, "window_seconds": 60, "users": 1024}
            },
            "prediction": {"header": "x-model-score", "scale": 1000, "offset": 0},
            "shadow": {
                "cluster": "ranker-shadow",
                "authority": "shadow.local",
                "sample_percent": 10,
                "sample_by": "request",
                "variants": ["stable"],
                "timeout_ms": 1000,
                "max_body_bytes": 65536,
                "max_in_flight": 64,
                "max_bytes_in_flight": 1048576,
                "methods": ["POST"],
                "compare": {
                    "body": true,
                    "fields": [
                        {"name": "score", "pointer": "/score", "type": "number", "abs_tolerance": 0.01, "rel_tolerance": 0.02, "scale": 1000},
                        {"name": "label", "pointer": "/label", "type": "string"}
                    ]
                },
                "log_per_minute": 10
            }
        }, {
            "name": "switch",
            "unit": {"type": "switchback", "slot_seconds": 60},
            "header": "x-sluice-switch",
            "variants": [{"name": "a"}, {"name": "b", "weight": 50}]
        }]
    })
}

/// Every key the format knows, so inserted keys often pass `deny_unknown_fields`.
const KEYS: &[&str] = &[
    "version",
    "revision",
    "secret",
    "experiments",
    "name",
    "salt",
    "unit",
    "type",
    "keys",
    "missing",
    "slot_seconds",
    "header",
    "cookie",
    "query",
    "variants",
    "weight",
    "control",
    "max_weight",
    "match",
    "path_prefix",
    "override",
    "token",
    "token_header",
    "echo",
    "cookie_max_age_seconds",
    "outcomes",
    "names",
    "beacon",
    "path",
    "param",
    "prediction",
    "scale",
    "offset",
    "shadow",
    "cluster",
    "authority",
    "sample_percent",
    "sample_by",
    "timeout_ms",
    "max_body_bytes",
    "max_in_flight",
    "methods",
    "compare",
    "body",
    "fields",
    "pointer",
    "abs_tolerance",
    "rel_tolerance",
    "log_per_minute",
    "max_bytes_in_flight",
    "token_param",
    "token_cookie",
    "max_age_seconds",
    "allow_get",
    "limit",
    "events_per_user",
    "window_seconds",
    "users",
    "user",
    "request",
    "switchback",
];

fn number() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter_map("finite", |f| serde_json::Number::from_f64(f)
            .map(Value::Number)),
        prop::sample::select(vec![
            0.0,
            -0.0,
            -1.0,
            0.005,
            0.01,
            1.0,
            49.99,
            50.0,
            99.99,
            100.0,
            100.01,
            1e-300,
            5e-324,
            1e15,
            1.8e19,
            4.3e9,
            1e300,
            f64::MAX,
            f64::MIN_POSITIVE,
        ])
        .prop_filter_map("finite", |f| serde_json::Number::from_f64(f)
            .map(Value::Number)),
        prop::sample::select(vec![
            u64::MAX,
            u64::from(u32::MAX),
            u64::from(u32::MAX) + 1,
            65_536,
            16 * 1024 * 1024 + 1
        ])
        .prop_map(Value::from),
    ]
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(KEYS).prop_map(String::from),
        "\\PC{0,24}",
        "[a-z0-9_-]{0,70}",
        prop::sample::select(vec![
            String::new(),
            "/".into(),
            "x".repeat(10_000),
            "a;b.c=d".into(),
            "stable".into(),
            "canary".into(),
            "x-user-id".into(),
            "content-length".into(),
            "/predict".into(),
            "/sluice/event?x".into(),
            "\u{0}".into(),
            "é".into(),
        ]),
    ]
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        number(),
        text().prop_map(Value::String),
    ]
}

fn any_json() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(3, 24, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::vec((text(), inner), 0..5)
                .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// One change to a document.
#[derive(Debug, Clone)]
enum Edit {
    /// Replace the value at the chosen node.
    Replace(Value),
    /// Remove the chosen node from its parent.
    Remove,
    /// Insert a key (object) or an element (array) at the chosen node.
    Insert(String, Value),
    /// Repeat an array element many times.
    Repeat(usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        4 => any_json().prop_map(Edit::Replace),
        2 => Just(Edit::Remove),
        3 => (text(), any_json()).prop_map(|(k, v)| Edit::Insert(k, v)),
        1 => (2usize..300).prop_map(Edit::Repeat),
    ]
}

/// Pointers to every node, in document order.
fn nodes(v: &Value, at: String, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, c) in m {
                nodes(
                    c,
                    format!("{at}/{}", k.replace('~', "~0").replace('/', "~1")),
                    out,
                );
            }
        }
        Value::Array(a) => {
            for (i, c) in a.iter().enumerate() {
                nodes(c, format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
    out.push(at);
}

fn apply(doc: &mut Value, pick: prop::sample::Index, e: &Edit) {
    let mut all = Vec::new();
    nodes(doc, String::new(), &mut all);
    let at = pick.get(&all).clone();
    let (parent, last) = match at.rsplit_once('/') {
        Some((p, l)) => (p.to_string(), l.replace("~1", "/").replace("~0", "~")),
        None => (String::new(), String::new()),
    };
    match e {
        Edit::Replace(v) => {
            if let Some(n) = doc.pointer_mut(&at) {
                *n = v.clone();
            }
        }
        Edit::Remove => match doc.pointer_mut(&parent) {
            Some(Value::Object(m)) => {
                m.remove(&last);
            }
            Some(Value::Array(a)) => {
                if let Ok(i) = last.parse::<usize>() {
                    if i < a.len() {
                        a.remove(i);
                    }
                }
            }
            _ => {}
        },
        Edit::Insert(k, v) => match doc.pointer_mut(&at) {
            Some(Value::Object(m)) => {
                m.insert(k.clone(), v.clone());
            }
            Some(Value::Array(a)) => a.push(v.clone()),
            _ => {}
        },
        Edit::Repeat(n) => {
            if let Some(Value::Array(a)) = doc.pointer_mut(&at) {
                if let Some(first) = a.first().cloned() {
                    a.extend(std::iter::repeat_n(first, *n));
                }
            }
        }
    }
}

/// The parser's answer, which must exist; an accepted config must also survive a round trip.
fn parse_ok_or_field_error(bytes: &[u8]) {
    match Plan::from_json(bytes) {
        Ok(plan) => {
            // What was accepted is accepted again after serialization (the controller
            // renders configs and the filter re-reads them).
            let config: sluice_filter::config::FilterConfig = match serde_json::from_slice(bytes) {
                Ok(c) => c,
                Err(e) => unreachable!("accepted but not a FilterConfig: {e}"),
            };
            let again = serde_json::to_vec(&config).unwrap_or_default();
            assert_eq!(
                Plan::from_json(&again).map(|p| p.experiments.len()),
                Ok(plan.experiments.len())
            );
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn a_mutated_config_never_panics(
        edits in prop::collection::vec((any::<prop::sample::Index>(), edit()), 1..4)
    ) {
        let mut doc = full();
        for (pick, e) in &edits {
            apply(&mut doc, *pick, e);
        }
        let bytes = serde_json::to_vec(&doc).unwrap_or_default();
        parse_ok_or_field_error(&bytes);
    }

    #[test]
    fn raw_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        parse_ok_or_field_error(&bytes);
    }

    #[test]
    fn a_cut_or_spliced_config_never_panics(cut in 0usize..2000, splice in "\\PC{0,8}") {
        let text = serde_json::to_string(&full()).unwrap_or_default();
        let cut = cut.min(text.len());
        let cut = (0..=cut).rev().find(|&i| text.is_char_boundary(i)).unwrap_or(0);
        let spliced = format!("{}{splice}{}", &text[..cut], &text[cut..]);
        parse_ok_or_field_error(spliced.as_bytes());
        parse_ok_or_field_error(&text.as_bytes()[..cut]);
    }
}

#[test]
fn the_full_config_is_valid() {
    // Otherwise the mutations above would only ever test the first error.
    let bytes = serde_json::to_vec(&full()).unwrap_or_default();
    if let Err(e) = Plan::from_json(&bytes) {
        unreachable!("{e}");
    }
}

#[test]
fn deep_nesting_is_an_error() {
    let deep = "[".repeat(100_000);
    assert!(Plan::from_json(deep.as_bytes()).is_err());
    let deep = r#"{"version": 1, "revision": "#.to_string()
        + &"[".repeat(10_000)
        + &"]".repeat(10_000)
        + "}";
    assert!(Plan::from_json(deep.as_bytes()).is_err());
}

/// A config whose lists hold `outcomes` outcome names and `variants` more variants.
fn with_lists(outcomes: usize, variants: usize) -> Vec<u8> {
    let mut doc = full();
    if outcomes > 0 {
        doc["experiments"][0]["outcomes"]["names"] =
            Value::from((0..outcomes).map(|i| format!("o{i}")).collect::<Vec<_>>());
    }
    let vs = &mut doc["experiments"][1]["variants"];
    if let Value::Array(a) = vs {
        a.extend((0..variants).map(|i| json!({"name": format!("v{i}"), "weight": 0})));
    }
    serde_json::to_vec(&doc).unwrap_or_default()
}

/// 100,000 outcome names or variants are refused by the documented caps, naming the list (a
/// check of every entry against every earlier one would take minutes on such lists; the time
/// is in docs/benchmarks.md, not asserted here).
#[test]
fn huge_lists_are_refused_by_their_caps() {
    for (outcomes, variants, field) in [
        (100_000, 0, "experiments[0].outcomes.names"),
        (0, 100_000, "experiments[1].variants"),
    ] {
        match Plan::from_json(&with_lists(outcomes, variants)) {
            Ok(_) => unreachable!("{field}: accepted a list of 100,000"),
            Err(e) => assert!(e.to_string().contains(field), "{field}: {e}"),
        }
    }
}

/// Reservations are summed over all treatments: 430,000 treatments reserving 100 % each add up
/// to more than `u32::MAX` buckets, which must be refused, not wrapped (release) or panic
/// (debug).
#[test]
fn reservations_past_u32_are_refused() {
    let mut doc = full();
    let variants: Vec<Value> = std::iter::once(json!({"name": "a"}))
        .chain(
            (0..430_000).map(|i| json!({"name": format!("v{i}"), "weight": 0, "max_weight": 100})),
        )
        .collect();
    doc["experiments"][1]["variants"] = Value::Array(variants);
    let bytes = serde_json::to_vec(&doc).unwrap_or_default();
    match Plan::from_json(&bytes) {
        Ok(_) => unreachable!("accepted reservations of 43,000,000 %"),
        // Refused by the cap on variants before their reservations are summed.
        Err(e) => assert!(e.to_string().contains("experiments[1].variants"), "{e}"),
    }
}
