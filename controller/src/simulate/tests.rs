use super::*;

/// A short ramp that runs in seconds in a debug build.
fn short(canary: Traffic, regression: bool) -> Scenario {
    Scenario {
        name: "test".into(),
        description: String::new(),
        stages: vec![(10.0, 300.0), (50.0, 300.0)],
        interval: 10.0,
        rps: 200.0,
        control: Traffic::default(),
        canary,
        skew: 0.0,
        config: config(),
        max_requests: None,
        regression,
        users: None,
        replicates: REPLICATES,
        independent_stages: false,
    }
}

#[test]
fn a_a_rollouts_rarely_roll_back_while_the_naive_test_often_does() {
    let s = short(Traffic::default(), false);
    let sum = run_scenario(&s, 0, 250, 42, 2);
    // α = 1 %: allow sampling noise, never a systematic excess.
    assert!(sum.rollback_rate <= 0.03, "{sum:?}");
    assert!(sum.halt_rate <= 0.02, "{sum:?}");
    assert!(
        sum.naive_rate > 3.0 * sum.rollback_rate.max(0.01),
        "{sum:?}"
    );
}

#[test]
fn an_obvious_regression_is_caught() {
    let s = short(
        Traffic {
            error: 0.04,
            ..Traffic::default()
        },
        true,
    );
    let sum = run_scenario(&s, 1, 40, 42, 2);
    assert!(sum.rollback_rate >= 0.95, "{sum:?}");
    let slow = short(
        Traffic {
            latency_median: 60.0,
            ..Traffic::default()
        },
        true,
    );
    let sum = run_scenario(&slow, 2, 40, 42, 2);
    assert!(sum.rollback_rate >= 0.95, "{sum:?}");
}

#[test]
fn results_do_not_depend_on_threads() {
    let s = short(
        Traffic {
            error: 0.02,
            ..Traffic::default()
        },
        true,
    );
    let a = run_scenario(&s, 3, 12, 7, 1);
    let b = run_scenario(&s, 3, 12, 7, 2);
    assert_eq!(a.rollbacks, b.rollbacks);
    assert_eq!(a.median_detect_seconds, b.median_detect_seconds);
}

#[test]
fn every_scenario_is_known() {
    for name in SCENARIOS {
        assert!(scenario(name, 200.0).is_ok(), "{name}");
    }
    assert!(scenario("nope", 200.0).is_err());
}

#[test]
fn users_that_keep_their_variant_do_not_halt_a_healthy_rollout() {
    // 20,000 users with heavy-tailed activity (σ = 1): taken request by request their counts
    // look skewed in many rollouts; the replicate groups see the users' own noise.
    let mut s = short(Traffic::default(), false);
    s.users = Some(Users {
        count: 20_000,
        sigma: 1.0,
    });
    let sum = run_scenario(&s, 4, 60, 42, 2);
    assert!(sum.halt_rate <= 0.02, "{sum:?}");
    s.replicates = 0;
    let requests = run_scenario(&s, 4, 60, 42, 2);
    assert!(requests.halt_rate >= 0.2, "{requests:?}");
    // A skew of the users themselves, far beyond their noise, is still found.
    s.replicates = REPLICATES;
    s.skew = 5.0;
    let skewed = run_scenario(&s, 5, 20, 42, 2);
    assert!(skewed.halt_rate >= 0.9, "{skewed:?}");
}
