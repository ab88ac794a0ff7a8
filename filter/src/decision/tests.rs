use std::cell::RefCell;
use std::collections::HashMap;

use super::beacon::{answer, echo_headers, token_headers};
use super::shadow::{answered, compared, copy_headers, ended, sampled, skipped, Disagreement};
use super::{HeaderOp, MetricUpdate};
use crate::beacon::{check_event, exposure_token, issue, Checker, Refusal, Rejection, UserLimit};
use crate::config::Plan;
use crate::header_map::serialise;
use crate::mac::{self, Key};
use crate::metrics::{Catalog, ExperimentMetrics, ShadowMetrics};
use crate::request::{variant_of_key, Assignment, Basis, HostFault, RequestView};
use crate::shadow::{Answer, Fate, Sampling, Skip};

#[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
use wasm_bindgen_test::wasm_bindgen_test as test;

const SECRET: &str = "0123456789abcdef0123456789abcdef";
const NOW: u64 = 1_800_000_000;

/// One experiment with an echo, a beacon (two outcomes, a limit of 2 events) and a shadow
/// comparing a numeric and a string field.
fn plan() -> Plan {
    let json = format!(
        r#"{{"version": 1, "secret": "{SECRET}", "experiments": [{{
            "name": "ranker",
            "unit": {{"type": "user", "keys": [{{"header": "x-user-id"}}]}},
            "variants": [{{"name": "stable", "control": true}}, {{"name": "canary", "weight": 50}}],
            "outcomes": {{"names": ["click", "buy"]}},
            "echo": {{"header": "x-echo", "cookie": "sluice_ranker"}},
            "beacon": {{"path": "/sluice/event", "max_age_seconds": 600,
                        "token_cookie": "sluice_exposure",
                        "limit": {{"events_per_user": 2, "window_seconds": 3600, "users": 64}}}},
            "shadow": {{"cluster": "shadow", "sample_percent": 100, "methods": ["POST"],
                "compare": {{"fields": [
                    {{"name": "score", "pointer": "/score", "abs_tolerance": 0.01, "rel_tolerance": 0.0}},
                    {{"name": "label", "pointer": "/label", "type": "string"}}]}}}}
        }}]}}"#
    );
    Plan::from_json(json.as_bytes()).unwrap_or_else(|e| unreachable!("{e}"))
}

fn metrics(plan: &Plan) -> ExperimentMetrics {
    Catalog::for_plan(plan).experiments.remove(0)
}

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

fn user_in(plan: &Plan, variant: usize) -> String {
    (0..)
        .map(|i| format!("user-{i}"))
        .find(|u| variant_of_key(&plan.experiments[0], u.as_bytes()) == variant)
        .unwrap_or_default()
}

fn key(plan: &Plan, purpose: &str) -> Key {
    plan.secret
        .as_ref()
        .map(|s| s.key(purpose))
        .unwrap_or_else(|| unreachable!("no secret"))
}

#[test]
fn an_accepted_beacon_counts_its_outcome_and_event_and_gets_204() {
    let plan = plan();
    let em = metrics(&plan);
    let vm = &em.variants[1];
    let a = answer([(&em, Ok((1, 1)))]);
    assert_eq!(
        a.updates,
        vec![
            MetricUpdate::Increment(vm.outcomes[1]),
            MetricUpdate::Increment(vm.events.unwrap_or_else(|| unreachable!()))
        ]
    );
    assert_eq!(a.reply.status, 204);
    assert_eq!(a.reply.body, None);
    assert!(a.reply.headers.is_empty());
}

#[test]
fn a_refused_beacon_gets_the_first_rejection_and_counts_every_reason() {
    let plan = plan();
    let em = metrics(&plan);
    let rejected = em.events_rejected.clone().unwrap_or_default();
    let a = answer([
        (&em, Err(Refusal::Rejected(Rejection::Method))),
        (&em, Err(Refusal::Rejected(Rejection::OverLimit))),
        (&em, Err(Refusal::Fault)),
    ]);
    assert_eq!(
        a.updates,
        vec![
            MetricUpdate::Increment(rejected[Rejection::Method.index()]),
            MetricUpdate::Increment(rejected[Rejection::OverLimit.index()]),
            MetricUpdate::Increment(em.errors),
        ]
    );
    // Chosen by the rejection itself, not by its message.
    assert_eq!(a.reply.status, 405);
    assert_eq!(a.reply.headers, vec![("content-type", "text/plain")]);
    assert_eq!(
        a.reply.body.as_deref(),
        Some("sluice: method not allowed: use POST\n")
    );
    let over = answer([(&em, Err(Refusal::Rejected(Rejection::OverLimit)))]);
    assert_eq!(over.reply.status, 429);
}

#[test]
fn one_acceptance_wins_the_reply_and_faults_alone_get_500() {
    let plan = plan();
    let em = metrics(&plan);
    let mixed = answer([
        (&em, Err(Refusal::Rejected(Rejection::NoToken))),
        (&em, Ok((0, 0))),
    ]);
    assert_eq!(mixed.reply.status, 204);
    assert_eq!(mixed.updates.len(), 3);
    let fault = answer([(&em, Err(Refusal::Fault))]);
    assert_eq!(fault.updates, vec![MetricUpdate::Increment(em.errors)]);
    assert_eq!(fault.reply.status, 500);
    assert_eq!(
        fault.reply.body.as_deref(),
        Some("sluice: internal error\n")
    );
    // A variant the catalog does not have counts nothing and accepts nothing.
    let unknown = answer([(&em, Ok((7, 0)))]);
    assert!(unknown.updates.is_empty());
    assert_eq!(unknown.reply.status, 500);
}

#[test]
fn echo_and_token_headers() {
    let plan = plan();
    let exp = &plan.experiments[0];
    let [header, cookie] = echo_headers(exp, "canary");
    assert_eq!(header, Some(HeaderOp::Set("x-echo", "canary".to_string())));
    assert!(
        matches!(&cookie, Some(HeaderOp::Add("set-cookie", c)) if c.starts_with("sluice_ranker=canary;")),
        "{cookie:?}"
    );
    let mut set = Vec::new();
    let [first, cookie] = token_headers(exp, "1.ranker.x", &mut set);
    assert_eq!(
        first,
        Some(HeaderOp::Set("x-sluice-exposure", "1.ranker.x".to_string()))
    );
    assert!(
        matches!(&cookie, Some(HeaderOp::Add("set-cookie", c)) if c.starts_with("sluice_exposure=1.ranker.x;")),
        "{cookie:?}"
    );
    // A second token under the same header name is another value, not a replacement.
    let [second, _] = token_headers(exp, "1.other.y", &mut set);
    assert_eq!(
        second,
        Some(HeaderOp::Add("x-sluice-exposure", "1.other.y".to_string()))
    );
    let mut bare = plan.experiments[0].clone();
    bare.echo = None;
    bare.beacon = None;
    assert_eq!(echo_headers(&bare, "canary"), [None, None]);
    assert_eq!(token_headers(&bare, "t", &mut set), [None, None]);
}

#[test]
fn beacons_are_checked_in_order() {
    let plan = plan();
    let exp = &plan.experiments[0];
    let exposure = key(&plan, mac::PURPOSE_EXPOSURE);
    let table = key(&plan, mac::PURPOSE_USER_TABLE);
    let limit = RefCell::new(UserLimit::new(64, 2, 3600));
    let checker = Checker {
        exposure_key: Some(&exposure),
        table_key: Some(&table),
        limit: Some(&limit),
    };
    let user = user_in(&plan, 1);
    let token = issue(&exposure, "ranker", user.as_bytes(), "canary", NOW);
    let with_token = [("x-user-id", user.as_str()), ("x-sluice-exposure", &token)];
    let check = |view: &mut Fake, path: &str, method: &str| {
        check_event(exp, checker, view, path.as_bytes(), method.as_bytes(), NOW)
    };
    let rejected = |r: Rejection| Err(Refusal::Rejected(r));
    let path = "/sluice/event?name=buy";
    assert_eq!(
        check(&mut Fake::new(&with_token), path, "GET"),
        rejected(Rejection::Method)
    );
    assert_eq!(
        check(&mut Fake::new(&with_token), "/sluice/event", "POST"),
        rejected(Rejection::NoName)
    );
    assert_eq!(
        check(
            &mut Fake::new(&with_token),
            "/sluice/event?name=nap",
            "POST"
        ),
        rejected(Rejection::UnknownName)
    );
    assert_eq!(
        check(&mut Fake::new(&[]), path, "POST"),
        rejected(Rejection::NoKey)
    );
    assert_eq!(
        check(&mut Fake::new(&[("x-user-id", &user)]), path, "POST"),
        rejected(Rejection::NoToken)
    );
    assert_eq!(
        check(
            &mut Fake::new(&[("x-user-id", &user), ("x-sluice-exposure", "junk")]),
            path,
            "POST"
        ),
        rejected(Rejection::Malformed)
    );
    // The token from the cookie, then the limit of two events per user.
    let cookie = format!("a=b; sluice_exposure={token}");
    let by_cookie = [("x-user-id", user.as_str()), ("cookie", cookie.as_str())];
    assert_eq!(check(&mut Fake::new(&by_cookie), path, "POST"), Ok((1, 1)));
    assert_eq!(check(&mut Fake::new(&with_token), path, "POST"), Ok((1, 1)));
    assert_eq!(
        check(&mut Fake::new(&with_token), path, "POST"),
        rejected(Rejection::OverLimit)
    );
    // Host faults and a plan without its keys are faults, not rejections.
    assert_eq!(
        check_event(exp, checker, &mut Broken, path.as_bytes(), b"POST", NOW),
        Err(Refusal::Fault)
    );
    let keyless = Checker {
        exposure_key: None,
        ..checker
    };
    let mut view = Fake::new(&with_token);
    assert_eq!(
        check_event(exp, keyless, &mut view, path.as_bytes(), b"POST", NOW),
        Err(Refusal::Fault)
    );
}

#[test]
fn only_a_keyed_assignment_gets_an_exposure_token() {
    let plan = plan();
    let exp = &plan.experiments[0];
    let k = key(&plan, mac::PURPOSE_EXPOSURE);
    let user = user_in(&plan, 1);
    let keyed = Assignment {
        variant: 1,
        basis: Basis::Key,
        override_denied: false,
    };
    let mut view = Fake::new(&[("x-user-id", user.as_str())]);
    let token = exposure_token(exp, Some(&k), &keyed, &mut view, NOW);
    assert_eq!(
        token,
        Ok(Some(issue(&k, "ranker", user.as_bytes(), "canary", NOW)))
    );
    let overridden = Assignment {
        basis: Basis::Override,
        ..keyed
    };
    assert_eq!(
        exposure_token(exp, Some(&k), &overridden, &mut view, NOW),
        Ok(None)
    );
    assert_eq!(
        exposure_token(exp, Some(&k), &keyed, &mut view, 0),
        Ok(None)
    );
    assert_eq!(exposure_token(exp, None, &keyed, &mut view, NOW), Ok(None));
    assert_eq!(
        exposure_token(exp, Some(&k), &keyed, &mut Fake::new(&[]), NOW),
        Ok(None)
    );
    assert_eq!(
        exposure_token(exp, Some(&k), &keyed, &mut Broken, NOW),
        Err(HostFault)
    );
}

fn shadow_metrics(plan: &Plan) -> ShadowMetrics {
    metrics(plan).variants[1]
        .shadow
        .clone()
        .unwrap_or_else(|| unreachable!("no shadow metrics"))
}

fn answer_of(status: u16, body: &str) -> Answer {
    Answer {
        status,
        body: body.as_bytes().to_vec(),
        truncated: false,
    }
}

#[test]
fn sampling_and_fates_count_once_each() {
    let plan = plan();
    let m = shadow_metrics(&plan);
    assert!(sampled(&m, Sampling::NotSampled).is_empty());
    assert_eq!(
        sampled(&m, Sampling::Taken),
        vec![MetricUpdate::Increment(m.requests)]
    );
    assert_eq!(
        sampled(&m, Sampling::Skipped(Skip::InFlight)),
        vec![
            MetricUpdate::Increment(m.requests),
            MetricUpdate::Increment(m.skipped[Skip::InFlight.index()])
        ]
    );
    for reason in Skip::ALL {
        assert_eq!(
            ended(&m, Fate::Skipped(reason)),
            Some(MetricUpdate::Increment(m.skipped[reason.index()]))
        );
        assert_eq!(
            skipped(&m, reason),
            Some(MetricUpdate::Increment(m.skipped[reason.index()]))
        );
    }
    assert_eq!(
        ended(&m, Fate::Timeout),
        Some(MetricUpdate::Increment(m.timeouts))
    );
    assert_eq!(
        ended(&m, Fate::Error),
        Some(MetricUpdate::Increment(m.errors))
    );
    assert_eq!(ended(&m, Fate::Compared), None);
    assert_eq!(answered(&m, 42), MetricUpdate::Record(m.latency, 42));
}

#[test]
fn a_comparison_becomes_counters_deltas_and_lines() {
    let plan = plan();
    let cfg = plan.experiments[0]
        .shadow
        .clone()
        .unwrap_or_else(|| unreachable!());
    let m = shadow_metrics(&plan);
    let primary = answer_of(200, r#"{"score": 0.5, "label": "cat"}"#);
    let same = compared(&cfg, &m, &primary, &primary.clone());
    assert!(same.disagreements.is_empty());
    let inc = MetricUpdate::Increment;
    let [pos, _] = m.deltas[0].unwrap_or_else(|| unreachable!("score is numeric"));
    assert_eq!(
        same.updates,
        vec![
            inc(m.compared),
            inc(m.agree[0]),
            inc(m.agree[1]),
            inc(m.agree[2]),
            MetricUpdate::Record(pos, 0),
            inc(m.agree[3]),
        ]
    );
    // The shadow fails with a 5xx and a body without the fields.
    let failed = compared(&cfg, &m, &primary, &answer_of(503, "oops"));
    assert_eq!(
        failed.updates,
        vec![
            inc(m.compared),
            inc(m.five_xx),
            inc(m.disagree[0]),
            inc(m.disagree[1]),
            inc(m.missing[0]),
            inc(m.missing[1]),
        ]
    );
    assert_eq!(
        failed.disagreements,
        vec![
            Disagreement {
                field: "status".into(),
                primary: "200".into(),
                shadow: "503".into()
            },
            Disagreement {
                field: "body".into(),
                primary: "(hash)".into(),
                shadow: "(hash)".into()
            },
        ]
    );
    // A lower score far out of tolerance: a disagreement and a negative delta.
    let lower = compared(
        &cfg,
        &m,
        &primary,
        &answer_of(200, r#"{"score": 0.4, "label": "cat"}"#),
    );
    let [_, neg] = m.deltas[0].unwrap_or_else(|| unreachable!());
    assert!(lower.updates.contains(&inc(m.disagree[2])));
    assert!(lower.updates.contains(&inc(m.agree[3])));
    assert!(lower
        .updates
        .iter()
        .any(|u| matches!(u, MetricUpdate::Record(p, v) if *p == neg && *v > 0)));
    assert_eq!(
        lower.disagreements.last(),
        Some(&Disagreement {
            field: "score".into(),
            primary: "0.5".into(),
            shadow: "0.4".into()
        })
    );
}

#[test]
fn a_copy_carries_neither_routing_nor_override_token_headers() {
    let json = r#"{"version": 1, "secret": "0123456789abcdef0123456789abcdef", "experiments": [
        {"name": "a", "header": "x-variant-a",
         "unit": {"type": "user", "keys": [{"header": "x-user-id"}]},
         "variants": [{"name": "stable"}, {"name": "canary", "weight": 50}],
         "override": {"token": "0123456789abcdef"},
         "shadow": {"cluster": "shadow", "sample_percent": 100}},
        {"name": "b", "header": "x-variant-b",
         "unit": {"type": "user", "keys": [{"header": "x-user-id"}]},
         "variants": [{"name": "stable"}, {"name": "canary", "weight": 50}],
         "override": {"token": "fedcba9876543210", "token_header": "x-b-token"}}]}"#;
    let plan = Plan::from_json(json.as_bytes()).unwrap_or_else(|e| unreachable!("{e}"));
    let Some(cfg) = plan.experiments[0].shadow.as_ref() else {
        unreachable!("experiment a has a shadow")
    };
    let original = serialise(&[
        (":path", "/predict"),
        ("x-user-id", "u-1"),
        ("x-variant-a", "canary"),
        ("x-variant-b", "stable"),
        ("x-sluice-override-token", "0123456789abcdef"),
        ("x-b-token", "fedcba9876543210"),
    ]);
    let copied = copy_headers(&plan, cfg, &original, &["x-variant-a"], "v1.m");
    let names: Vec<&str> = copied.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        names,
        [":path", "x-user-id", "x-variant-b", "x-sluice-shadow"],
        "the routing header set for the copy and both token headers stay out"
    );
    assert_eq!(copied.last().map(|(_, v)| v.as_str()), Some("v1.m"));
}
