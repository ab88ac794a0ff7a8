use super::*;

#[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
use wasm_bindgen_test::wasm_bindgen_test as test;

pub(crate) fn params() -> Params {
    Params {
        window_ms: 10_000,
        min_requests: 50,
        max_error_rate: 0.05,
        max_ratio_to_control: 3.0,
        significance: 1e-4,
    }
}

const EPOCH: Epoch = Epoch {
    version: 7,
    digest: 0,
};

fn scope(p: &Params) -> Scope<'_> {
    Scope {
        experiment: "ranker",
        epoch: EPOCH,
        params: p,
        variants: 3,
        control: 0,
    }
}

fn facts(status: Option<u16>, details: &'static [u8], flags: u64) -> Option<FailureKind> {
    classify(&Facts {
        status,
        code_details: details,
        flags,
    })
}

#[test]
fn classify_successes_and_client_errors() {
    assert_eq!(facts(Some(200), b"via_upstream", 0), None);
    assert_eq!(facts(Some(204), b"", 0), None);
    assert_eq!(facts(Some(404), b"via_upstream", 0), None);
    assert_eq!(facts(Some(499), b"via_upstream", 0), None);
    // Envoy's own 4xx: the request's fault.
    assert_eq!(facts(Some(429), b"request_rate_limited", 0), None);
    assert_eq!(facts(Some(413), b"request_payload_too_large", 0), None);
    // Nothing known at all.
    assert_eq!(facts(None, b"", 0), None);
}

#[test]
fn classify_upstream_5xx() {
    for s in [500, 502, 503, 504, 599] {
        assert_eq!(
            facts(Some(s), b"via_upstream", 0),
            Some(FailureKind::Status5xx),
            "{s}"
        );
    }
    // No details read (e.g. the host skipped the property): the status alone decides.
    assert_eq!(facts(Some(500), b"", 0), Some(FailureKind::Status5xx));
}

#[test]
fn classify_resets() {
    let early = b"upstream_reset_before_response_started{remote_reset}";
    assert_eq!(
        facts(Some(503), early, flags::UPSTREAM_REMOTE_RESET),
        Some(FailureKind::Reset)
    );
    // Details alone, flags alone.
    assert_eq!(facts(Some(503), early, 0), Some(FailureKind::Reset));
    assert_eq!(
        facts(Some(503), b"", flags::UPSTREAM_CONNECTION_FAILURE),
        Some(FailureKind::Reset)
    );
    // Connection refused (upstream down): Envoy's 503 with UF.
    assert_eq!(
        facts(
            Some(503),
            b"upstream_reset_before_response_started{connection_failure}",
            flags::UPSTREAM_CONNECTION_FAILURE
        ),
        Some(FailureKind::Reset)
    );
    // A 200 whose body was cut: the user got a broken answer.
    assert_eq!(
        facts(
            Some(200),
            b"upstream_reset_after_response_started{remote_reset}",
            flags::UPSTREAM_REMOTE_RESET
        ),
        Some(FailureKind::Reset)
    );
    assert_eq!(
        facts(Some(502), b"via_upstream", flags::UPSTREAM_PROTOCOL_ERROR),
        Some(FailureKind::Reset)
    );
}

#[test]
fn classify_timeouts() {
    assert_eq!(
        facts(
            Some(504),
            b"response_timeout",
            flags::UPSTREAM_REQUEST_TIMEOUT
        ),
        Some(FailureKind::Timeout)
    );
    assert_eq!(
        facts(Some(504), b"upstream_per_try_timeout", 0),
        Some(FailureKind::Timeout)
    );
    assert_eq!(
        facts(None, b"", flags::UPSTREAM_MAX_STREAM_DURATION_REACHED),
        Some(FailureKind::Timeout)
    );
    // Idle timeout: 504 when the upstream is silent, 408 when the client is.
    assert_eq!(
        facts(
            Some(504),
            b"stream_idle_timeout",
            flags::STREAM_IDLE_TIMEOUT
        ),
        Some(FailureKind::Timeout)
    );
    assert_eq!(
        facts(
            Some(408),
            b"stream_idle_timeout",
            flags::STREAM_IDLE_TIMEOUT
        ),
        None
    );
    // A timeout wins over the reset that ends the timed-out stream.
    assert_eq!(
        facts(
            Some(504),
            b"response_timeout",
            flags::UPSTREAM_REQUEST_TIMEOUT | flags::LOCAL_RESET
        ),
        Some(FailureKind::Timeout)
    );
}

#[test]
fn classify_local_replies() {
    assert_eq!(
        facts(
            Some(503),
            b"no_healthy_upstream",
            flags::NO_HEALTHY_UPSTREAM
        ),
        Some(FailureKind::LocalReply)
    );
    assert_eq!(
        facts(Some(503), b"", flags::UPSTREAM_OVERFLOW),
        Some(FailureKind::LocalReply)
    );
    assert_eq!(
        facts(Some(503), b"cluster_not_found", 0),
        Some(FailureKind::LocalReply)
    );
    // The variant's route missing: a 404, but Envoy's and the variant's.
    assert_eq!(
        facts(Some(404), b"route_not_found", flags::NO_ROUTE_FOUND),
        Some(FailureKind::LocalReply)
    );
    // Any other Envoy reply with a 5xx, e.g. a fault-injected abort.
    assert_eq!(
        facts(Some(503), b"fault_filter_abort", 1 << 10),
        Some(FailureKind::LocalReply)
    );
    assert_eq!(
        facts(None, b"upstream_gone", 0),
        Some(FailureKind::LocalReply)
    );
}

#[test]
fn classify_ignores_the_client_and_proxy_overload() {
    // The client went away while the upstream was fine or slow: not the variant's failure.
    assert_eq!(
        facts(
            Some(503),
            b"downstream_remote_disconnect",
            flags::DOWNSTREAM_CONNECTION_TERMINATION | flags::LOCAL_RESET
        ),
        None
    );
    assert_eq!(
        facts(
            None,
            b"",
            flags::DOWNSTREAM_REMOTE_RESET | flags::UPSTREAM_REMOTE_RESET
        ),
        None
    );
    assert_eq!(facts(Some(503), b"overload", flags::OVERLOAD_MANAGER), None);
}

#[test]
fn flags_property() {
    assert_eq!(flags_from_property(&20u64.to_le_bytes()), 20);
    assert_eq!(flags_from_property(b""), 0);
    assert_eq!(flags_from_property(b"123"), 0);
    assert_eq!(flags_from_property(&[0; 9]), 0);
}

#[test]
fn reasons_match_kinds() {
    for k in FailureKind::ALL {
        assert_eq!(REASONS[k.index()], k.label());
        assert_eq!(FailureKind::from_index(k.index()), Some(k));
    }
    assert_eq!(FailureKind::from_index(KINDS), None);
}

#[test]
fn window_records_and_slides() {
    let p = params();
    assert_eq!(p.bucket_ms(), 1000);
    let mut w = Window::new(&p, 2);
    assert!(w.is_empty());
    w.record(5_000, 1, None);
    w.record(5_999, 1, Some(FailureKind::Reset));
    w.record(6_000, 0, Some(FailureKind::Status5xx));
    w.record(6_000, 9, None); // no such variant
    assert!(!w.is_empty());
    let t = w.totals(6_500);
    assert_eq!(t[1].requests, 2);
    assert_eq!(t[1].failures, [0, 1, 0, 0]);
    assert_eq!(t[0].failed(), 1);
    // The last bucket only holds 6 000..6 999.
    assert_eq!(w.suffix(6_500, 1)[1].requests, 0);
    assert_eq!(w.suffix(6_500, 2)[1].requests, 2);
    // Ten buckets later, bucket 5 is out of the window; bucket 6 is the oldest one in it.
    assert_eq!(w.totals(15_000)[1].requests, 0);
    assert_eq!(w.totals(15_000)[0].requests, 1);
    // Recording there reuses bucket 5's slot.
    w.record(15_000, 1, None);
    assert_eq!(w.totals(15_000)[1].requests, 1);
    // A request stamped a whole window late is dropped, not added to the new bucket.
    w.record(5_000, 1, None);
    assert_eq!(w.totals(15_000)[1].requests, 1);
    w.clear();
    assert!(w.is_empty());
}

#[test]
fn window_merge_adds_by_bucket() {
    let p = params();
    let mut a = Window::new(&p, 2);
    let mut b = Window::new(&p, 2);
    a.record(1_000, 1, None);
    b.record(1_200, 1, Some(FailureKind::Timeout));
    b.record(2_000, 0, None);
    a.merge(&b);
    assert_eq!(a.suffix(2_000, 2)[1].requests, 2);
    assert_eq!(a.suffix(2_000, 2)[1].failures[3], 1);
    assert_eq!(a.suffix(2_000, 1)[0].requests, 1);
    // A window far ahead replaces old buckets, and old buckets do not overwrite new ones.
    let mut late = Window::new(&p, 2);
    late.record(11_000, 1, None);
    a.merge(&late);
    assert_eq!(a.totals(11_000)[1].requests, 1);
    let mut stale = Window::new(&p, 2);
    stale.record(1_000, 1, None);
    a.merge(&stale);
    assert_eq!(a.totals(11_000)[1].requests, 1);
    // Windows of another shape are not mixed in.
    let mut other = Window::new(&p, 3);
    other.record(11_000, 1, None);
    a.merge(&other);
    assert_eq!(a.totals(11_000)[1].requests, 1);
}

#[test]
fn counts_top_kind_and_rate() {
    let c = Counts {
        requests: 10,
        failures: [2, 3, 3, 0],
    };
    assert_eq!(c.failed(), 8);
    assert_eq!(c.top_kind(), Some(FailureKind::Reset));
    assert!((c.rate() - 0.8).abs() < 1e-12);
    assert_eq!(Counts::default().top_kind(), None);
    assert_eq!(Counts::default().rate(), 0.0);
}

/// A window with `n` requests and `k` failures (5xx) per variant, all in one bucket.
fn window_with(p: &Params, at_ms: u64, per_variant: &[(u64, u64)]) -> Window {
    let mut w = Window::new(p, per_variant.len());
    for (v, &(n, k)) in per_variant.iter().enumerate() {
        for i in 0..n {
            w.record(at_ms, v, (i < k).then_some(FailureKind::Status5xx));
        }
    }
    w
}

#[test]
fn judge_trips_a_clearly_failing_treatment() {
    let p = params();
    let w = window_with(&p, 20_000, &[(900, 4), (100, 20)]);
    match judge(&p, &w, 1, 0, 20_100) {
        Verdict::Trip(t) => {
            assert_eq!(t.variant, 1);
            assert_eq!(t.reason, FailureKind::Status5xx);
            assert_eq!(t.treatment.requests, 100);
            assert_eq!(t.treatment.failed(), 20);
            assert_eq!(t.control.failed(), 4);
            assert!((t.ceiling - 0.05).abs() < 1e-12);
            assert!(t.p_value <= p.significance / BUCKETS as f64);
            assert_eq!(t.at_ms, 20_100);
        }
        Verdict::Hold => unreachable!("20 % failures against a 5 % ceiling must trip"),
    }
    // Never the control, never an unknown variant.
    assert_eq!(judge(&p, &w, 0, 0, 20_100), Verdict::Hold);
    assert_eq!(judge(&p, &w, 5, 0, 20_100), Verdict::Hold);
}

#[test]
fn judge_needs_min_requests() {
    let p = params();
    // 49 requests, all failed: still below min_requests.
    let w = window_with(&p, 20_000, &[(900, 0), (49, 49)]);
    assert_eq!(judge(&p, &w, 1, 0, 20_000), Verdict::Hold);
    let w = window_with(&p, 20_000, &[(900, 0), (50, 50)]);
    assert!(matches!(judge(&p, &w, 1, 0, 20_000), Verdict::Trip(_)));
}

#[test]
fn judge_needs_significance_not_just_a_rate_above_the_ceiling() {
    let p = params();
    // 6 of 60 (10 %) is above 5 % but P(Bin(60, 0.05) ≥ 6) ≈ 0.08: noise.
    let w = window_with(&p, 20_000, &[(900, 0), (60, 6)]);
    assert_eq!(judge(&p, &w, 1, 0, 20_000), Verdict::Hold);
}

#[test]
fn judge_compares_with_the_control() {
    let p = params();
    // 15 % failures is far above 5 %, but the control fails 10 %: ceiling 30 %.
    let w = window_with(&p, 20_000, &[(1000, 100), (400, 60)]);
    assert_eq!(judge(&p, &w, 1, 0, 20_000), Verdict::Hold);
    // At 50 % it is above 3 × 10 % too.
    let w = window_with(&p, 20_000, &[(1000, 100), (400, 200)]);
    match judge(&p, &w, 1, 0, 20_000) {
        Verdict::Trip(t) => assert!((t.ceiling - 0.3).abs() < 1e-9),
        Verdict::Hold => unreachable!("50 % against a 30 % ceiling at n = 400 must trip"),
    }
}

#[test]
fn judge_sees_a_recent_burst_in_a_long_healthy_window() {
    let p = params();
    let mut w = Window::new(&p, 2);
    // Nine seconds of healthy traffic, 30 canary requests a second...
    for s in 0..9u64 {
        for i in 0..30 {
            w.record(s * 1000 + i, 1, None);
            w.record(s * 1000 + i, 0, None);
        }
    }
    // ...then one second of 60 % failures: 18 of 300 over the window (6 %) is not
    // significant, 18 of 30 in the last bucket is.
    for i in 0..30 {
        w.record(9_000 + i, 1, (i % 5 < 3).then_some(FailureKind::Reset));
    }
    let whole = test(
        &p,
        p.significance / BUCKETS as f64,
        &w.totals(9_500)[1],
        &w.totals(9_500)[0],
    );
    assert!(whole.is_none());
    let mut short = p;
    short.min_requests = 30;
    match judge(&short, &w, 1, 0, 9_500) {
        Verdict::Trip(t) => {
            assert_eq!(t.treatment.requests, 30);
            assert_eq!(t.reason, FailureKind::Reset);
        }
        Verdict::Hold => unreachable!("the last second alone is significant"),
    }
}

#[test]
fn binomial_tail_edges() {
    use binomial::upper_tail;
    assert_eq!(upper_tail(10, 0, 0.3), 1.0);
    assert_eq!(upper_tail(10, 11, 0.3), 0.0);
    assert_eq!(upper_tail(10, 1, 0.0), 0.0);
    assert_eq!(upper_tail(10, 1, 1.0), 1.0);
    assert_eq!(upper_tail(10, 1, f64::NAN), 0.0);
    // P(X ≥ n) = p^n.
    assert!((upper_tail(10, 10, 0.5) - 0.5f64.powi(10)).abs() < 1e-15);
    // P(X ≥ 1) = 1 − (1 − p)^n.
    assert!((upper_tail(20, 1, 0.1) - (1.0 - 0.9f64.powi(20))).abs() < 1e-12);
}

/// The hand-written tail against statrs, over small, large and extreme arguments.
#[cfg(not(target_arch = "wasm32"))]
#[test]
fn binomial_tail_matches_statrs() {
    use statrs::distribution::{Binomial, DiscreteCDF};
    let mut worst: f64 = 0.0;
    for &n in &[1u64, 2, 7, 50, 51, 100, 333, 1000, 10_000, 250_000] {
        for &p in &[1e-6, 0.001, 0.005, 0.05, 0.15, 0.3, 0.5, 0.9, 0.999] {
            let b = Binomial::new(p, n).expect("valid parameters");
            let mean = n as f64 * p;
            let sd = (mean * (1.0 - p)).sqrt();
            let mut ks: Vec<u64> = vec![1, 2, n / 2, n.saturating_sub(1), n];
            for z in [-3.0, -1.0, 0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 20.0] {
                let k = (mean + z * sd).round();
                if k >= 1.0 && k <= n as f64 {
                    ks.push(k as u64);
                }
            }
            for k in ks.into_iter().filter(|&k| k >= 1 && k <= n) {
                let ours = binomial::upper_tail(n, k, p);
                let reference = b.sf(k - 1);
                // statrs evaluates the regularized incomplete beta to about 6 significant
                // digits at large n (n = 250 000, k = 125 000, p = 0.5: off by 2.8e-6 from a
                // 30-digit sum, ours by 8e-10; see `binomial_tail_matches_a_direct_sum`),
                // so agreement is asked to 1e-5, relative; larger n only against those sums.
                let err = if reference > 1e-290 {
                    ((ours - reference) / reference).abs()
                } else {
                    ours
                };
                assert!(
                    err < 1e-5,
                    "n={n} k={k} p={p}: ours {ours:e}, statrs {reference:e}"
                );
                worst = worst.max(err);
            }
        }
    }
    assert!(worst < 1e-5);
}

/// Against the direct sum of exactly computed terms where f64 holds them (small n).
#[test]
fn binomial_tail_matches_a_direct_sum() {
    for n in 1..=60u64 {
        for &p in &[0.01, 0.05, 0.2, 0.5, 0.8] {
            let pmf = |i: u64| {
                let mut c = 1.0;
                for j in 0..i {
                    c = c * (n - j) as f64 / (j + 1) as f64;
                }
                c * f64::powi(p, i as i32) * f64::powi(1.0 - p, (n - i) as i32)
            };
            for k in 1..=n {
                let direct: f64 = (k..=n).map(pmf).sum();
                let ours = binomial::upper_tail(n, k, p);
                let err = ((ours - direct) / direct).abs();
                assert!(err < 1e-10, "n={n} k={k} p={p}: {ours:e} vs {direct:e}");
            }
        }
    }
    // References summed in 40-digit arithmetic, from the mode to the far tail.
    let reference = [
        (250_000, 75_000, 0.3, 0.500_754_487_792_102_7),
        (250_000, 125_000, 0.5, 0.500_797_883_762_918_7),
        (3_000_000, 1_500_000, 0.5, 0.500_230_329_413_786_8),
        (3_000_000, 15_980, 0.005, 1.057_135_934_341_112_2e-15),
        (10_000, 30, 0.001, 2.461_564_429_648_308e-7),
        (100, 40, 0.05, 6.238_625_307_670_572e-26),
        (1000, 80, 0.05, 3.488_644_975_793_47e-5),
    ];
    for (n, k, p, want) in reference {
        let ours = binomial::upper_tail(n, k, p);
        assert!(
            ((ours - want) / want).abs() < 1e-8,
            "n={n} k={k} p={p}: {ours:e}"
        );
    }
}

#[test]
fn ln_gamma_at_whole_numbers() {
    let mut fact: f64 = 1.0;
    for n in 1..=30u32 {
        fact *= f64::from(n);
        let got = binomial::ln_gamma(f64::from(n) + 1.0);
        assert!((got - fact.ln()).abs() < 1e-12 * fact.ln().max(1.0), "{n}");
    }
}

fn trip_state(p: &Params) -> State {
    let mut s = State::new(&scope(p));
    s.window.record(41_000, 1, Some(FailureKind::Timeout));
    s.window.record(42_000, 2, None);
    s.window.record(42_000, 0, Some(FailureKind::LocalReply));
    s.trips[2] = Some(Trip {
        variant: 2,
        reason: FailureKind::Reset,
        at_ms: 42_001,
        treatment: Counts {
            requests: 80,
            failures: [1, 30, 0, 2],
        },
        control: Counts {
            requests: 700,
            failures: [3, 0, 0, 0],
        },
        ceiling: 0.05,
        p_value: 1.5e-12,
    });
    s
}

#[test]
fn state_round_trips() {
    let p = params();
    let s = trip_state(&p);
    let bytes = s.encode();
    assert_eq!(State::decode(&bytes, &scope(&p)), Some(s.clone()));
    assert_eq!(s.tripped(), vec![false, false, true]);
    // 16 variants stay small enough for shared data.
    let mut big = scope(&p);
    big.variants = 16;
    let mut s16 = State::new(&big);
    for v in 0..16 {
        s16.trips[v] = s.trips[2].map(|t| Trip { variant: v, ..t });
    }
    assert!(s16.encode().len() < 4500, "{}", s16.encode().len());
}

#[test]
fn state_of_another_configuration_is_ignored() {
    let p = params();
    let bytes = trip_state(&p).encode();
    let mut other = scope(&p);
    other.experiment = "other";
    assert_eq!(State::decode(&bytes, &other), None);
    let mut other = scope(&p);
    other.epoch.version = 8;
    assert_eq!(State::decode(&bytes, &other), None);
    let mut other = scope(&p);
    other.variants = 2;
    assert_eq!(State::decode(&bytes, &other), None);
    let mut q = p;
    q.window_ms = 20_000;
    assert_eq!(State::decode(&bytes, &scope(&q)), None);
}

#[test]
fn state_decode_rejects_every_truncation_and_extension() {
    let p = params();
    let bytes = trip_state(&p).encode();
    for len in 0..bytes.len() {
        assert_eq!(State::decode(&bytes[..len], &scope(&p)), None, "{len}");
    }
    let mut longer = bytes.clone();
    longer.push(0);
    assert_eq!(State::decode(&longer, &scope(&p)), None);
    // A trip flag that is neither 0 nor 1, an unknown reason, a bucket in the wrong slot.
    let mut bad = bytes.clone();
    let last_flag = bytes.len() - 1 - (1 + 1 + 8 + 20 + 20 + 8 + 8);
    bad[last_flag] = 2;
    assert_eq!(State::decode(&bad, &scope(&p)), None);
    let mut bad = bytes.clone();
    bad[last_flag + 1] = 9;
    assert_eq!(State::decode(&bad, &scope(&p)), None);
    let first_slot = 4 + 16 + 1 + "ranker".len() + 8 + 1;
    let mut bad = bytes;
    bad[first_slot..first_slot + 8].copy_from_slice(&3u64.to_le_bytes());
    assert_eq!(State::decode(&bad, &scope(&p)), None);
}

#[cfg(not(target_arch = "wasm32"))]
mod prop {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Hostile bytes never panic and are never taken for another experiment's state.
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let p = params();
            let _ = State::decode(&bytes, &scope(&p));
            let _ = tick(Some(&bytes), &Window::new(&p, 3), &scope(&p), 1_000);
        }

        /// `judge` sums its suffixes incrementally; it must agree with judging each
        /// [`Window::suffix`] on its own.
        #[test]
        fn judge_matches_suffix_by_suffix(
            records in proptest::collection::vec((0u64..14_000, 0usize..3, 0u8..6), 0..400),
            now in 0u64..16_000,
            min_requests in 1u64..40,
        ) {
            let mut p = params();
            p.min_requests = min_requests;
            p.significance = 0.1;
            let mut w = Window::new(&p, 3);
            for (t, v, f) in records {
                w.record(100_000 + t, v, FailureKind::from_index(usize::from(f)));
            }
            let now = 100_000 + now;
            let alpha = p.significance / BUCKETS as f64;
            let naive = (1..=BUCKETS).find_map(|b| {
                let s = w.suffix(now, b);
                test(&p, alpha, &s[1], &s[0])
            });
            match judge(&p, &w, 1, 0, now) {
                Verdict::Trip(t) => prop_assert_eq!(Some(Trip { variant: 0, at_ms: 0, ..t }), naive),
                Verdict::Hold => prop_assert_eq!(None, naive),
            }
        }

        /// Flipping any one byte of a valid state either is rejected or decodes to a state
        /// that encodes back to exactly those bytes.
        #[test]
        fn decode_is_exact(pos in 0usize..4000, value in any::<u8>()) {
            let p = params();
            let mut bytes = trip_state(&p).encode();
            let pos = pos % bytes.len();
            bytes[pos] = value;
            if let Some(s) = encode::decode(&bytes) {
                prop_assert_eq!(s.encode(), bytes);
            }
        }
    }
}

/// Runs ticks of several workers against one shared slot with compare-and-swap semantics.
struct Shared {
    bytes: Option<Vec<u8>>,
    cas: u32,
}

impl Shared {
    /// One worker's tick; retries on a CAS mismatch as the host does, with `interleave`
    /// writing in between the first read and write.
    fn tick(
        &mut self,
        local: &mut Window,
        scope: &Scope<'_>,
        now_ms: u64,
        mut interleave: impl FnMut(&mut Shared),
    ) -> Tick {
        let mut first = true;
        loop {
            let (read, cas) = (self.bytes.clone(), self.cas);
            let t = tick(read.as_deref(), local, scope, now_ms);
            if first {
                interleave(self);
                first = false;
            }
            let Some(bytes) = &t.write else {
                return t;
            };
            if cas == self.cas {
                self.bytes = Some(bytes.clone());
                self.cas += 1;
                local.clear();
                return t;
            }
        }
    }
}

#[test]
fn ticks_merge_workers_and_trip_once() {
    let p = params();
    let sc = scope(&p);
    let mut shared = Shared {
        bytes: None,
        cas: 0,
    };
    let mut a = Window::new(&p, 3);
    let mut b = Window::new(&p, 3);
    // Each worker alone sees 30 of 60 canary requests fail: together 60 of 120.
    for i in 0..60 {
        a.record(50_000, 0, None);
        a.record(50_000, 1, (i % 2 == 0).then_some(FailureKind::Status5xx));
        b.record(50_000, 0, None);
        b.record(50_000, 1, (i % 2 == 0).then_some(FailureKind::Status5xx));
    }
    let first = shared.tick(&mut a, &sc, 50_100, |_| {});
    assert_eq!(first.new_trips.len(), 1, "60 failures of 120 trip");
    assert!(a.is_empty());
    // Worker b merges after the trip: it adds its counts, sees the trip, makes none.
    let second = shared.tick(&mut b, &sc, 50_200, |_| {});
    assert!(second.new_trips.is_empty());
    assert_eq!(second.tripped, vec![false, true, false]);
    let s = State::decode(shared.bytes.as_deref().unwrap_or_default(), &sc);
    assert_eq!(s.map(|s| s.window.totals(50_200)[1].requests), Some(120));
}

#[test]
fn a_cas_mismatch_loses_no_counts() {
    let p = params();
    let sc = scope(&p);
    let mut shared = Shared {
        bytes: None,
        cas: 0,
    };
    let mut a = Window::new(&p, 3);
    let mut b = Window::new(&p, 3);
    for _ in 0..10 {
        a.record(70_000, 1, None);
        b.record(70_000, 2, None);
    }
    // b writes between a's read and a's write: a retries on the new bytes.
    let mut b_once = Some(b.clone());
    shared.tick(&mut a, &sc, 70_000, |s| {
        if let Some(mut w) = b_once.take() {
            s.tick(&mut w, &sc, 70_000, |_| {});
        }
    });
    let s = State::decode(shared.bytes.as_deref().unwrap_or_default(), &sc);
    let totals = s.map(|s| s.window.totals(70_000));
    assert_eq!(totals.as_ref().map(|t| t[1].requests), Some(10));
    assert_eq!(totals.as_ref().map(|t| t[2].requests), Some(10));
}

#[test]
fn a_new_epoch_clears_trips_and_an_old_one_leaves_them() {
    let p = params();
    let old = scope(&p);
    let bytes = trip_state(&p).encode();
    // Same epoch: the trip is picked up, nothing to write without counts.
    let t = tick(Some(&bytes), &Window::new(&p, 3), &old, 42_500);
    assert_eq!(t.tripped, vec![false, false, true]);
    assert_eq!(t.write, None);
    // A newer push: the stored state is replaced by a fresh one.
    let mut new = old;
    new.epoch.version = 8;
    let t = tick(Some(&bytes), &Window::new(&p, 3), &new, 42_500);
    assert_eq!(t.tripped, vec![false, false, false]);
    let written = t.write.as_deref().and_then(|b| State::decode(b, &new));
    assert_eq!(
        written.map(|s| s.tripped()),
        Some(vec![false, false, false])
    );
    // A worker still on version 6 leaves version 7's state alone.
    let mut older = old;
    older.epoch.version = 6;
    let mut w = Window::new(&p, 3);
    w.record(42_000, 1, None);
    let t = tick(Some(&bytes), &w, &older, 42_500);
    assert_eq!(t.write, None);
    assert!(t.new_trips.is_empty());
    // Free-form revisions are unordered: a different digest replaces the state.
    let free = |digest| Scope {
        epoch: Epoch { version: 0, digest },
        ..old
    };
    let mut fresh = State::new(&free(11));
    fresh.trips[1] = trip_state(&p).trips[2];
    let t = tick(Some(&fresh.encode()), &w, &free(13), 42_500);
    assert_eq!(t.tripped, vec![false, false, false]);
    assert!(t.write.is_some());
}

#[test]
fn garbage_in_shared_data_is_replaced() {
    let p = params();
    let sc = scope(&p);
    let t = tick(Some(b"not a state"), &Window::new(&p, 3), &sc, 1_000);
    let written = t.write.as_deref().and_then(|b| State::decode(b, &sc));
    assert_eq!(written, Some(State::new(&sc)));
}
