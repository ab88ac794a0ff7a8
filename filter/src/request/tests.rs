use super::*;
use crate::config::Plan;
use std::collections::HashMap;

#[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
use wasm_bindgen_test::wasm_bindgen_test as test;

struct Fake(HashMap<String, Vec<u8>>);

impl Fake {
    fn new(headers: &[(&str, &str)]) -> Fake {
        Fake(
            headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
                .collect(),
        )
    }
}

impl RequestView for Fake {
    fn header(&mut self, name: &str) -> Result<Option<Vec<u8>>, HostFault> {
        Ok(self.0.get(name).cloned())
    }
}

struct Broken;

impl RequestView for Broken {
    fn header(&mut self, _name: &str) -> Result<Option<Vec<u8>>, HostFault> {
        Err(HostFault)
    }
}

fn experiment(json: &str) -> Experiment {
    let config = format!(r#"{{"version": 1, "experiments": [{json}]}}"#);
    match Plan::from_json(config.as_bytes()) {
        Ok(mut p) => p.experiments.remove(0),
        Err(e) => unreachable!("test config invalid: {e}"),
    }
}

fn user_experiment(extra: &str) -> Experiment {
    experiment(&format!(
        r#"{{"name": "e", "unit": {{"type": "user", "keys": [{{"header": "x-user-id"}}, {{"cookie": "uid"}}, {{"query": "user"}}]{extra}}},
            "variants": [{{"name": "control"}}, {{"name": "treat", "weight": 50}}],
            "override": {{"token": "0123456789abcdef"}}}}"#
    ))
}

#[test]
fn key_sources_are_tried_in_order() {
    let keys = match &user_experiment("").unit {
        Unit::User { keys, .. } => keys.clone(),
        _ => unreachable!(),
    };
    let mut v = Fake::new(&[
        ("x-user-id", " alice "),
        ("cookie", "uid=bob"),
        (":path", "/?user=carol"),
    ]);
    assert_eq!(user_key(&keys, &mut v), Ok(Some(b"alice".to_vec())));
    let mut v = Fake::new(&[
        ("x-user-id", ""),
        ("cookie", "a=1; uid=bob"),
        (":path", "/"),
    ]);
    assert_eq!(user_key(&keys, &mut v), Ok(Some(b"bob".to_vec())));
    let mut v = Fake::new(&[(":path", "/p?x=1&user=car%20ol&y")]);
    assert_eq!(user_key(&keys, &mut v), Ok(Some(b"car ol".to_vec())));
    let mut v = Fake::new(&[(":path", "/p")]);
    assert_eq!(user_key(&keys, &mut v), Ok(None));
}

#[test]
fn cookie_and_query_parsing_edge_cases() {
    assert_eq!(cookie_value(b"uid=\"q\"", "uid"), Some(&b"q"[..]));
    assert_eq!(cookie_value(b"xuid=1; uid = 2", "uid"), Some(&b"2"[..]));
    assert_eq!(cookie_value(b"uid", "uid"), None);
    assert_eq!(query_value(b"/?a=%4", "a"), Some(b"%4".to_vec()));
    assert_eq!(query_value(b"/?a=1#frag", "a"), Some(b"1".to_vec()));
    assert_eq!(query_value(b"/?a", "a"), Some(Vec::new()));
    assert_eq!(query_value(b"/", "a"), None);
}

#[test]
fn the_same_user_always_gets_the_same_variant() {
    let e = user_experiment("");
    let mut rng = Rng::new(1);
    for i in 0..100 {
        let id = format!("u{i}");
        let first = assign(&e, &mut Fake::new(&[("x-user-id", &id)]), 0, &mut rng);
        for _ in 0..3 {
            assert_eq!(
                assign(&e, &mut Fake::new(&[("x-user-id", &id)]), 0, &mut rng),
                first
            );
        }
    }
}

#[test]
fn missing_key_goes_to_control_or_random() {
    let mut rng = Rng::new(7);
    let e = user_experiment("");
    let a = assign(&e, &mut Fake::new(&[]), 0, &mut rng);
    assert_eq!(
        a,
        Ok(Assignment {
            variant: 0,
            basis: Basis::MissingKey,
            override_denied: false
        })
    );
    let e = user_experiment(r#", "missing": "random""#);
    let treated = (0..10_000)
        .filter(|_| assign(&e, &mut Fake::new(&[]), 0, &mut rng).map(|a| a.variant) == Ok(1))
        .count();
    assert!((4_700..5_300).contains(&treated), "{treated}");
}

#[test]
fn override_needs_the_token_and_a_known_variant() {
    let e = user_experiment("");
    let mut rng = Rng::new(1);
    // Find a user hashed to the control, then ask for the treatment.
    let user = (0..)
        .map(|i| format!("u{i}"))
        .find(|u| variant_of_key(&e, u.as_bytes()) == 0)
        .unwrap_or_default();
    let ok = Fake::new(&[
        ("x-user-id", &user),
        ("x-sluice-override", "treat"),
        ("x-sluice-override-token", "0123456789abcdef"),
    ]);
    let a = assign(&e, &mut { ok }, 0, &mut rng);
    assert_eq!(a.map(|a| (a.variant, a.basis)), Ok((1, Basis::Override)));
    assert_eq!(a.map(|a| a.counted()), Ok(false));
    for token in ["wrong-token-0000", ""] {
        let mut bad = Fake::new(&[
            ("x-user-id", &user),
            ("x-sluice-override", "treat"),
            ("x-sluice-override-token", token),
        ]);
        let a = assign(&e, &mut bad, 0, &mut rng);
        assert_eq!(
            a,
            Ok(Assignment {
                variant: 0,
                basis: Basis::Key,
                override_denied: true
            })
        );
    }
    let mut unknown = Fake::new(&[
        ("x-user-id", &user),
        ("x-sluice-override", "nope"),
        ("x-sluice-override-token", "0123456789abcdef"),
    ]);
    assert_eq!(
        assign(&e, &mut unknown, 0, &mut rng).map(|a| a.override_denied),
        Ok(true)
    );
}

#[test]
fn switchback_puts_everyone_in_the_slot_variant() {
    let e = experiment(
        r#"{"name": "sb", "unit": {"type": "switchback", "slot_seconds": 60},
            "variants": [{"name": "a"}, {"name": "b", "weight": 50}]}"#,
    );
    let mut rng = Rng::new(3);
    let mut seen = [0; 2];
    for slot in 0..200u64 {
        let t = slot * 60;
        let first = assign(&e, &mut Fake::new(&[]), t, &mut rng).map(|a| a.variant);
        for offset in [1, 30, 59] {
            let again = assign(&e, &mut Fake::new(&[]), t + offset, &mut rng).map(|a| a.variant);
            assert_eq!(again, first);
        }
        if let Ok(v) = first {
            seen[v] += 1;
        }
    }
    assert!(seen[0] > 60 && seen[1] > 60, "{seen:?}");
}

#[test]
fn path_prefix_limits_the_experiment() {
    let e = experiment(
        r#"{"name": "p", "unit": {"type": "request"}, "match": {"path_prefix": "/predict"},
            "variants": [{"name": "a"}, {"name": "b", "weight": 50}]}"#,
    );
    assert_eq!(
        applies(&e, &mut Fake::new(&[(":path", "/predict/v1?x=1")])),
        Ok(true)
    );
    assert_eq!(
        applies(&e, &mut Fake::new(&[(":path", "/health?/predict")])),
        Ok(false)
    );
}

#[test]
fn host_faults_are_reported_not_hidden() {
    let e = user_experiment("");
    assert_eq!(assign(&e, &mut Broken, 0, &mut Rng::new(1)), Err(HostFault));
}
