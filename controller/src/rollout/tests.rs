use super::*;
use std::time::Duration;

fn plan(shadow: Option<f64>) -> Plan {
    Plan {
        stages: [1.0, 10.0, 100.0]
            .iter()
            .map(|&weight| Stage {
                weight,
                bake: Duration::from_secs(60),
            })
            .collect(),
        shadow_secs: shadow,
        warmup_secs: 10.0,
        interval_secs: 5.0,
    }
}

/// Confirms whatever push is pending.
fn confirm(s: &mut State, p: &Plan, now: f64) -> Vec<Effect> {
    let v = s.pending.as_ref().map(|p| p.version).unwrap_or(0);
    step(s, p, Input::PushConfirmed { version: v }, now)
}

fn pass(s: &mut State, p: &Plan, now: f64) -> Vec<Effect> {
    step(
        s,
        p,
        Input::Judged {
            judgement: Judgement::Pass,
            data_at: now,
        },
        now,
    )
}

fn pushes(fx: &[Effect]) -> Vec<f64> {
    fx.iter()
        .filter_map(|e| match e {
            Effect::Push { weight, .. } => Some(*weight),
            _ => None,
        })
        .collect()
}

#[test]
fn a_passing_rollout_walks_every_stage_after_its_bake() {
    let p = plan(None);
    let mut s = State::new("r", 0.0);
    let fx = step(&mut s, &p, Input::Tick, 0.0);
    assert_eq!(pushes(&fx), vec![1.0]);
    confirm(&mut s, &p, 1.0);
    assert_eq!(s.weight, 1.0);
    // Passing judgements during warm-up and bake do not advance.
    for t in [5.0, 20.0, 60.0] {
        assert!(pushes(&pass(&mut s, &p, t)).is_empty(), "advanced at {t}");
    }
    // Baked: since 1 + warm-up 10 + bake 60 = 71.
    assert_eq!(pushes(&pass(&mut s, &p, 71.0)), vec![10.0]);
    assert_eq!(s.phase, Phase::Canary { index: 1 });
    confirm(&mut s, &p, 72.0);
    assert_eq!(pushes(&pass(&mut s, &p, 142.0)), vec![100.0]);
    confirm(&mut s, &p, 143.0);
    let fx = pass(&mut s, &p, 213.0);
    assert_eq!(s.phase, Phase::Promoted);
    assert!(fx.iter().any(|e| matches!(
        e,
        Effect::Event {
            kind: EventKind::Promoted,
            ..
        }
    )));
    // Final: nothing moves any more.
    assert!(step(&mut s, &p, Input::Command(Command::Abort), 300.0).is_empty());
}

#[test]
fn stale_or_early_evidence_never_raises_a_weight() {
    let p = plan(None);
    let mut s = State::new("r", 0.0);
    step(&mut s, &p, Input::Tick, 0.0);
    confirm(&mut s, &p, 0.0);
    // Data from before the warm-up ended.
    let early = Input::Judged {
        judgement: Judgement::Pass,
        data_at: 5.0,
    };
    assert!(pushes(&step(&mut s, &p, early, 100.0)).is_empty());
    // Data older than two intervals.
    let old = Input::Judged {
        judgement: Judgement::Pass,
        data_at: 80.0,
    };
    assert!(pushes(&step(&mut s, &p, old, 100.0)).is_empty());
    assert_eq!(pushes(&pass(&mut s, &p, 100.0)), vec![10.0]);
}

#[test]
fn a_failing_judgement_rolls_back_at_once_even_when_paused_or_pushing() {
    let p = plan(None);
    let mut s = State::new("r", 0.0);
    step(&mut s, &p, Input::Tick, 0.0);
    confirm(&mut s, &p, 0.0);
    step(&mut s, &p, Input::Command(Command::Pause), 1.0);
    pass(&mut s, &p, 71.0); // paused: no advance
    assert_eq!(s.phase, Phase::Canary { index: 0 });
    let fx = step(
        &mut s,
        &p,
        Input::Judged {
            judgement: Judgement::Fail {
                reason: "error rate".into(),
            },
            data_at: 72.0,
        },
        72.0,
    );
    assert_eq!(pushes(&fx), vec![0.0]);
    assert_eq!(
        s.phase,
        Phase::RolledBack {
            reason: "error rate".into()
        }
    );
}

#[test]
fn holds_on_bad_data_and_resumes_when_it_is_good() {
    let p = plan(None);
    let mut s = State::new("r", 0.0);
    step(&mut s, &p, Input::Tick, 0.0);
    confirm(&mut s, &p, 0.0);
    let held = step(
        &mut s,
        &p,
        Input::Judged {
            judgement: Judgement::Hold {
                reason: "source unreachable".into(),
            },
            data_at: 70.0,
        },
        80.0,
    );
    assert!(held.iter().any(|e| matches!(
        e,
        Effect::Event {
            kind: EventKind::Held,
            ..
        }
    )));
    assert_eq!(s.hold.as_deref(), Some("source unreachable"));
    assert_eq!(pushes(&pass(&mut s, &p, 90.0)), vec![10.0]);
    assert_eq!(s.hold, None);
}

#[test]
fn a_hold_is_announced_once_per_cause() {
    let p = plan(None);
    let mut s = State::new("r", 0.0);
    step(&mut s, &p, Input::Tick, 0.0);
    confirm(&mut s, &p, 0.0);
    let mut held_events = 0;
    let reasons = [
        "no data: newest data is 6.2s old",
        "no data: newest data is 6.7s old",
        "no data: source unreachable",
        "SRM: canary share 12 % of 10 % expected",
        "SRM: canary share 13 % of 10 % expected",
    ];
    for (i, reason) in reasons.iter().enumerate() {
        let fx = step(
            &mut s,
            &p,
            Input::Judged {
                judgement: Judgement::Hold {
                    reason: reason.to_string(),
                },
                data_at: 70.0 + i as f64,
            },
            80.0 + i as f64,
        );
        held_events += fx
            .iter()
            .filter(|e| {
                matches!(
                    e,
                    Effect::Event {
                        kind: EventKind::Held,
                        ..
                    }
                )
            })
            .count();
        assert_eq!(
            s.hold.as_deref(),
            Some(*reason),
            "the status shows the latest reason"
        );
    }
    assert_eq!(held_events, 2, "one for no data, one for SRM");
}

#[test]
fn a_failed_push_holds_and_keeps_the_target() {
    let p = plan(None);
    let mut s = State::new("r", 0.0);
    step(&mut s, &p, Input::Tick, 0.0);
    let fx = step(
        &mut s,
        &p,
        Input::PushFailed {
            version: 1,
            error: "rejected".into(),
        },
        1.0,
    );
    assert!(fx.iter().any(|e| matches!(
        e,
        Effect::Event {
            kind: EventKind::PushFailed,
            ..
        }
    )));
    assert_eq!(s.pending.as_ref().map(|p| p.weight), Some(1.0));
    assert_eq!(s.weight, 0.0);
    confirm(&mut s, &p, 2.0);
    assert_eq!((s.weight, s.hold.clone()), (1.0, None));
}

#[test]
fn a_restart_never_replays_an_unconfirmed_raise_and_re_pushes_the_confirmed_weight() {
    let p = plan(None);
    let mut s = State::new("r", 0.0);
    step(&mut s, &p, Input::Tick, 0.0);
    confirm(&mut s, &p, 0.0);
    pass(&mut s, &p, 71.0); // decides 10 %, crash before confirmation
    assert_eq!(s.pending.as_ref().map(|p| p.weight), Some(10.0));
    let mut restored: State =
        serde_json::from_str(&serde_json::to_string(&s).unwrap_or_default()).unwrap();
    assert_eq!(restored.check(&p, "r"), Ok(()));
    let fx = step(&mut restored, &p, Input::Restarted, 100.0);
    // The 10 % may have reached the proxies: the confirmed 1 % goes out again, as a new version.
    assert_eq!(pushes(&fx), vec![1.0]);
    assert_eq!(restored.pending.as_ref().map(|p| p.version), Some(3));
    assert_eq!(restored.phase, Phase::Canary { index: 0 });
    assert_eq!(restored.weight, 1.0);
    assert!(restored
        .hold
        .as_deref()
        .is_some_and(|h| h.contains("unconfirmed raise to 10 %") && h.contains("1 %")));
    assert_eq!(restored.check(&p, "r"), Ok(()));
    // Nothing moves until the proxies confirm, whatever the judge says.
    assert!(pushes(&pass(&mut restored, &p, 101.0)).is_empty());
    confirm(&mut restored, &p, 102.0);
    assert_eq!(restored.pending, None);
    // Pre-restart evidence does not count; warm-up and bake start over from the confirmation.
    let stale = Input::Judged {
        judgement: Judgement::Pass,
        data_at: 99.0,
    };
    assert!(pushes(&step(&mut restored, &p, stale, 103.0)).is_empty());
    assert!(pushes(&pass(&mut restored, &p, 171.0)).is_empty());
    assert_eq!(restored.hold, None, "fresh evidence ends the hold");
    assert_eq!(pushes(&pass(&mut restored, &p, 173.0)), vec![10.0]);
}

#[test]
fn a_restart_mid_stage_pushes_the_state_again_and_the_stage_starts_over() {
    let p = plan(None);
    let mut s = State::new("r", 0.0);
    step(&mut s, &p, Input::Tick, 0.0);
    confirm(&mut s, &p, 0.0);
    assert_eq!(pushes(&step(&mut s, &p, Input::Restarted, 50.0)), vec![1.0]);
    assert_eq!(s.hold, None, "nothing to hold for: the push blocks raises");
    // Until the push is confirmed, the stage's evidence starts after the restart's warm-up:
    // never at a time before this process existed.
    assert_eq!(s.evidence_from(&p), 60.0);
    confirm(&mut s, &p, 51.0);
    assert_eq!(s.since, 51.0);
    assert!(pushes(&pass(&mut s, &p, 120.0)).is_empty());
    assert_eq!(pushes(&pass(&mut s, &p, 122.0)), vec![10.0]);
    // Nothing to push before the first stage, nor after the end.
    let mut fresh = State::new("r", 0.0);
    assert!(pushes(&step(&mut fresh, &p, Input::Restarted, 1.0)).is_empty());
    step(&mut s, &p, Input::Command(Command::Abort), 130.0);
    confirm(&mut s, &p, 131.0);
    assert!(pushes(&step(&mut s, &p, Input::Restarted, 140.0)).is_empty());
}

#[test]
fn proxies_found_serving_something_else_get_the_state_again() {
    let p = plan(None);
    let mut s = State::new("r", 0.0);
    step(&mut s, &p, Input::Tick, 0.0);
    confirm(&mut s, &p, 0.0);
    let drift = |why: &str| Input::Drifted {
        reason: why.to_string(),
    };
    let fx = step(&mut s, &p, drift("file edited"), 30.0);
    assert_eq!(pushes(&fx), vec![1.0]);
    assert!(fx.iter().any(|e| matches!(
        e,
        Effect::Event { kind: EventKind::Diverged, message } if message.contains("file edited")
    )));
    assert!(s.hold.as_deref().is_some_and(|h| h.contains("file edited")));
    // While that push is under way, more reports change nothing.
    assert!(step(&mut s, &p, drift("again"), 31.0).is_empty());
    confirm(&mut s, &p, 32.0);
    // The stage starts over from the confirmation: data from the diverged time is not its.
    assert!(pushes(&pass(&mut s, &p, 100.0)).is_empty());
    assert_eq!(pushes(&pass(&mut s, &p, 103.0)), vec![10.0]);
    // A finished rollout is set right too, without a hold.
    step(&mut s, &p, Input::Command(Command::Abort), 110.0);
    confirm(&mut s, &p, 111.0);
    assert_eq!(pushes(&step(&mut s, &p, drift("edited"), 120.0)), vec![0.0]);
    assert_eq!(s.hold, None);
}

#[test]
fn promote_is_an_event() {
    let p = plan(None);
    let mut s = State::new("r", 0.0);
    step(&mut s, &p, Input::Tick, 0.0);
    confirm(&mut s, &p, 0.0);
    let fx = step(&mut s, &p, Input::Command(Command::Promote), 5.0);
    assert!(fx.iter().any(|e| matches!(
        e,
        Effect::Event {
            kind: EventKind::BakeEnded,
            ..
        }
    )));
}

#[test]
fn states_that_break_an_invariant_are_refused_with_the_field() {
    let p = plan(Some(30.0));
    let mut good = State::new("r", 0.0);
    assert_eq!(good.check(&p, "r"), Ok(()));
    step(&mut good, &p, Input::Tick, 0.0);
    assert_eq!(good.check(&p, "r"), Ok(()));
    confirm(&mut good, &p, 0.0);
    pass(&mut good, &p, 41.0); // → stage 1, pushing 1 %
    assert_eq!(good.check(&p, "r"), Ok(()));
    confirm(&mut good, &p, 41.0);
    assert_eq!(good.check(&p, "r"), Ok(()));
    let field = |edit: &dyn Fn(&mut State)| {
        let mut s = good.clone();
        edit(&mut s);
        s.check(&p, "r").map_err(|e| e.field)
    };
    // Weight 100 at stage 1, stage 99, weight −50: each names its field.
    assert_eq!(field(&|s| s.weight = 100.0), Err("weight".to_string()));
    assert_eq!(
        field(&|s| s.phase = Phase::Canary { index: 98 }),
        Err("phase.index".to_string())
    );
    assert_eq!(field(&|s| s.weight = -50.0), Err("weight".to_string()));
    assert_eq!(field(&|s| s.weight = f64::NAN), Err("weight".to_string()));
    assert_eq!(field(&|s| s.name = "other".into()), Err("name".to_string()));
    assert_eq!(
        field(&|s| s.since = f64::INFINITY),
        Err("since".to_string())
    );
    let pending = |weight: f64, version: u64| {
        move |s: &mut State| {
            s.pending = Some(PendingPush {
                version,
                weight,
                decided_at: 1.0,
            })
        }
    };
    assert_eq!(field(&pending(1.0, 99)), Err("pending.version".to_string()));
    assert_eq!(field(&pending(50.0, 1)), Err("pending.weight".to_string()));
    assert_eq!(field(&pending(1.0, 1)), Ok(()));
    assert_eq!(
        field(&|s| s.phase = Phase::Promoted),
        Err("weight".to_string())
    );
    assert_eq!(
        field(&|s| { s.phase = Phase::RolledBack { reason: "x".into() } }),
        Err("weight".to_string())
    );
    assert_eq!(
        field(&|s| {
            s.phase = Phase::Shadow;
        }),
        Err("weight".to_string())
    );
    let no_shadow = plan(None);
    let mut shadow = State::new("r", 0.0);
    shadow.phase = Phase::Shadow;
    assert_eq!(
        shadow.check(&no_shadow, "r").map_err(|e| e.field),
        Err("phase".to_string())
    );
}

#[test]
fn a_restart_re_pushes_an_unconfirmed_rollback() {
    let p = plan(None);
    let mut s = State::new("r", 0.0);
    step(&mut s, &p, Input::Tick, 0.0);
    confirm(&mut s, &p, 0.0);
    step(&mut s, &p, Input::Command(Command::Abort), 5.0);
    let fx = step(&mut s, &p, Input::Restarted, 6.0);
    assert_eq!(pushes(&fx), vec![0.0]);
}

#[test]
fn shadow_stage_comes_first_and_pushes_no_user_traffic() {
    let p = plan(Some(30.0));
    let mut s = State::new("r", 0.0);
    let fx = step(&mut s, &p, Input::Tick, 0.0);
    assert_eq!(
        fx.first(),
        Some(&Effect::Push {
            version: 1,
            weight: 0.0,
            shadow: true
        })
    );
    confirm(&mut s, &p, 0.0);
    assert!(pushes(&pass(&mut s, &p, 20.0)).is_empty());
    assert_eq!(pushes(&pass(&mut s, &p, 41.0)), vec![1.0]);
}

#[test]
fn manual_promote_ends_the_bake_but_still_needs_a_pass() {
    let p = plan(None);
    let mut s = State::new("r", 0.0);
    step(&mut s, &p, Input::Tick, 0.0);
    confirm(&mut s, &p, 0.0);
    step(&mut s, &p, Input::Command(Command::Promote), 12.0);
    let cont = Input::Judged {
        judgement: Judgement::Continue,
        data_at: 13.0,
    };
    assert!(pushes(&step(&mut s, &p, cont, 13.0)).is_empty());
    assert_eq!(pushes(&pass(&mut s, &p, 13.0)), vec![10.0]);
}
