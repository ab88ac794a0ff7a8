use super::*;
use crate::config::Plan;
use crate::mac::PURPOSE_EXPOSURE;
use crate::request::variant_of_key;

#[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
use wasm_bindgen_test::wasm_bindgen_test as test;

const SECRET: &str = "0123456789abcdef0123456789abcdef";

fn plan() -> Plan {
    let json = format!(
        r#"{{"version": 1, "secret": "{SECRET}", "experiments": [{{
            "name": "ranker",
            "unit": {{"type": "user", "keys": [{{"header": "x-user-id"}}]}},
            "variants": [{{"name": "stable", "control": true}}, {{"name": "canary", "weight": 50}}],
            "outcomes": {{"names": ["click"]}},
            "beacon": {{"path": "/sluice/event", "max_age_seconds": 600}}
        }}]}}"#
    );
    Plan::from_json(json.as_bytes()).unwrap()
}

fn key(plan: &Plan) -> Key {
    plan.secret
        .as_ref()
        .map(|s| s.key(PURPOSE_EXPOSURE))
        .expect("no secret")
}

/// A user in `variant`, found by the assignment itself.
fn user_in(plan: &Plan, variant: usize) -> String {
    (0..)
        .map(|i| format!("user-{i}"))
        .find(|u| variant_of_key(&plan.experiments[0], u.as_bytes()) == variant)
        .unwrap_or_default()
}

const NOW: u64 = 1_800_000_000;

#[test]
fn an_issued_token_verifies_for_its_user_and_variant() {
    let plan = plan();
    let exp = &plan.experiments[0];
    let k = key(&plan);
    let user = user_in(&plan, 1);
    let t = issue(&k, "ranker", user.as_bytes(), "canary", NOW);
    assert!(t.starts_with("1.ranker.canary.1800000000."), "{t}");
    assert_eq!(token_experiment(t.as_bytes()), Some(&b"ranker"[..]));
    let check = |token: &[u8], user: &str, current: usize, now: u64| {
        verify(&k, exp, 600, token, user.as_bytes(), current, now)
    };
    assert_eq!(check(t.as_bytes(), &user, 1, NOW + 10), Ok(1));
    // Another user, even one in the same variant.
    let other = (0..)
        .map(|i| format!("other-{i}"))
        .find(|u| variant_of_key(exp, u.as_bytes()) == 1)
        .unwrap_or_default();
    assert_eq!(check(t.as_bytes(), &other, 1, NOW), Err(Rejection::BadMac));
    // The variant, the time or the experiment edited in clear.
    let edited = t.replace(".canary.", ".stable.");
    assert_eq!(
        check(edited.as_bytes(), &user, 0, NOW),
        Err(Rejection::BadMac)
    );
    let edited = t.replace(".1800000000.", ".1800000500.");
    assert_eq!(
        check(edited.as_bytes(), &user, 1, NOW),
        Err(Rejection::BadMac)
    );
    let edited = t.replace(".1800000000.", ".01800000000.");
    assert_eq!(
        check(edited.as_bytes(), &user, 1, NOW),
        Err(Rejection::Malformed)
    );
    let foreign = issue(&k, "other", user.as_bytes(), "canary", NOW);
    assert_eq!(
        check(foreign.as_bytes(), &user, 1, NOW),
        Err(Rejection::NoToken)
    );
    let forged = foreign.replacen("other", "ranker", 1);
    assert_eq!(
        check(forged.as_bytes(), &user, 1, NOW),
        Err(Rejection::BadMac)
    );
    // Another secret.
    let k2 = Key::derive(b"another secret of 32 characters!", PURPOSE_EXPOSURE);
    let t2 = issue(&k2, "ranker", user.as_bytes(), "canary", NOW);
    assert_eq!(check(t2.as_bytes(), &user, 1, NOW), Err(Rejection::BadMac));
    // A flipped tag digit.
    let mut bad = t.clone().into_bytes();
    let last = bad.len() - 1;
    bad[last] = if bad[last] == b'0' { b'1' } else { b'0' };
    assert_eq!(check(&bad, &user, 1, NOW), Err(Rejection::BadMac));
}

#[test]
fn age_and_reassignment_are_checked() {
    let plan = plan();
    let exp = &plan.experiments[0];
    let k = key(&plan);
    let user = user_in(&plan, 1);
    let t = issue(&k, "ranker", user.as_bytes(), "canary", NOW);
    let check = |current: usize, now: u64| {
        verify(&k, exp, 600, t.as_bytes(), user.as_bytes(), current, now)
    };
    assert_eq!(check(1, NOW + 600), Ok(1));
    assert_eq!(check(1, NOW + 601), Err(Rejection::Expired));
    assert_eq!(check(1, NOW - CLOCK_SKEW_SECS), Ok(1));
    assert_eq!(check(1, NOW - CLOCK_SKEW_SECS - 1), Err(Rejection::Expired));
    // Valid, but the user is in the control now (the canary was rolled back).
    assert_eq!(check(0, NOW), Err(Rejection::Reassigned));
}

#[test]
fn malformed_tokens_are_refused_without_panicking() {
    let plan = plan();
    let exp = &plan.experiments[0];
    let k = key(&plan);
    let long = "1.".repeat(200);
    for t in [
        "",
        "1",
        "1.ranker",
        "1.ranker.canary.1800000000",
        "2.ranker.canary.1800000000.00000000000000000000000000000000",
        "1.ranker.canary.1800000000.0000",
        "1.ranker.canary.18x.00000000000000000000000000000000",
        "1.ranker.canary..00000000000000000000000000000000",
        "1.ranker.canary.99999999999999999999999.00000000000000000000000000000000",
        "1.ranker.canary.1800000000.00000000000000000000000000000000.extra",
        long.as_str(),
    ] {
        let got = verify(&k, exp, 600, t.as_bytes(), b"u", 1, NOW);
        assert!(
            matches!(got, Err(Rejection::Malformed) | Err(Rejection::NoToken)),
            "{t:?}: {got:?}"
        );
    }
}

#[test]
fn rejections_have_distinct_labels_statuses_and_positions() {
    for (i, r) in Rejection::ALL.iter().enumerate() {
        assert_eq!(r.index(), i);
        assert!((400..500).contains(&r.status()));
        assert!(!r.message().is_empty());
        assert!(crate::check::check_name("reason", r.label()).is_ok());
    }
    let mut labels: Vec<_> = Rejection::ALL.iter().map(|r| r.label()).collect();
    labels.sort_unstable();
    labels.dedup();
    assert_eq!(labels.len(), Rejection::ALL.len());
    assert_eq!(Rejection::Method.status(), 405);
    assert_eq!(Rejection::OverLimit.status(), 429);
}

#[test]
fn only_post_unless_get_is_allowed() {
    let plan = plan();
    let b = plan.experiments[0].beacon.clone().unwrap();
    assert!(method_allowed(&b, b"POST"));
    assert!(!method_allowed(&b, b"GET"));
    assert!(!method_allowed(&b, b"PUT"));
    let get = BeaconConfig {
        allow_get: true,
        ..b
    };
    assert!(method_allowed(&get, b"GET"));
}

#[test]
fn tokens_are_found_in_lists() {
    let got: Vec<_> = split_tokens(b"1.a.b.1.x, 1.c.d.2.y  1.e.f.3.z").collect();
    assert_eq!(got.len(), 3);
    assert_eq!(token_experiment(got[1]), Some(&b"c"[..]));
}

#[test]
fn cookie_is_scoped_to_the_beacon_and_not_cross_site() {
    let plan = plan();
    let mut b = plan.experiments[0].beacon.clone().unwrap();
    assert_eq!(token_cookie(&b, "t"), None);
    b.token_cookie = Some("sluice_exposure".into());
    assert_eq!(
        token_cookie(&b, "1.x").as_deref(),
        Some("sluice_exposure=1.x; Path=/sluice/event; Max-Age=600; HttpOnly; SameSite=Strict")
    );
}

#[test]
fn the_limit_counts_per_user_and_window() {
    let mut l = UserLimit::new(16, 3, 60);
    for _ in 0..3 {
        assert!(l.admit(42, 600));
    }
    assert!(!l.admit(42, 659));
    assert!(l.admit(43, 659), "another user has their own budget");
    assert!(l.admit(42, 660), "a new window starts over");
    assert_eq!(l.bytes(), 16 * 24);
}

#[test]
fn the_limit_table_is_bounded_and_keeps_heavy_users() {
    // One set of four ways: a heavy user survives a flood of one-event users in its window.
    let mut l = UserLimit::new(4, 5, 3600);
    for _ in 0..5 {
        assert!(l.admit(7, 0));
    }
    for u in 100..10_000u64 {
        assert!(l.admit(u, 10));
    }
    assert!(
        !l.admit(7, 20),
        "the heavy user is still tracked and still over the limit"
    );
    assert_eq!(l.bytes(), 4 * 24);
}

#[cfg(not(target_arch = "wasm32"))]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Whatever a client sends as a token, checking it never panics, and only the issued
        /// token verifies.
        #[test]
        fn arbitrary_tokens_never_verify(token in proptest::collection::vec(any::<u8>(), 0..300),
                                         user in "[a-z0-9-]{1,20}") {
            let plan = plan();
            let exp = &plan.experiments[0];
            let k = key(&plan);
            let got = verify(&k, exp, 600, &token, user.as_bytes(), 1, NOW);
            prop_assert!(got.is_err());
        }

        /// A token edited anywhere, by one byte, no longer verifies.
        #[test]
        fn edited_tokens_never_verify(at in 0usize..200, byte in any::<u8>()) {
            let plan = plan();
            let exp = &plan.experiments[0];
            let k = key(&plan);
            let user = user_in(&plan, 1);
            let t = issue(&k, "ranker", user.as_bytes(), "canary", NOW).into_bytes();
            let mut edited = t.clone();
            let i = at % edited.len();
            prop_assume!(edited[i] != byte);
            // Hex digits compare case-insensitively: a case flip is the same tag.
            prop_assume!(!(edited[i].is_ascii_hexdigit() && edited[i].eq_ignore_ascii_case(&byte)));
            edited[i] = byte;
            prop_assert!(verify(&k, exp, 600, &edited, user.as_bytes(), 1, NOW).is_err());
        }
    }
}
