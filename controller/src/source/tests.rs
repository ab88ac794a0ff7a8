use super::*;
use sluice_filter::metrics;

fn sample(name: &str, variant: &str, value: f64) -> Sample {
    Sample {
        name: name.into(),
        labels: [("experiment", "e"), ("variant", variant), ("instance", "x")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        value,
    }
}

fn scrape(origin: &str, requests: f64, errors: f64) -> OriginScrape {
    OriginScrape::from_samples(
        origin,
        vec![
            sample(metrics::REQUESTS, "canary", requests),
            sample(metrics::ERRORS, "canary", errors),
        ],
    )
}

/// `scrape` as a proxy up `uptime` seconds (epoch 0) tells it at `at` seconds.
fn told(mut s: OriginScrape, uptime: f64, at: f64) -> OriginScrape {
    s.identity = Some(Identity {
        uptime,
        hot_restart_epoch: 0.0,
        at: time(at),
    });
    s
}

fn time(at: f64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs_f64(1.7e9 + at)
}

fn add(acc: &mut Accumulator, scrapes: &[OriginScrape]) -> Reading {
    match acc.add(SystemTime::UNIX_EPOCH, scrapes) {
        Ok(r) => r,
        Err(e) => panic!("unexpected source error: {e}"),
    }
}

#[test]
fn origins_are_summed_and_origin_labels_dropped() {
    let mut acc = Accumulator::default();
    let r = add(&mut acc, &[scrape("a", 10.0, 1.0), scrape("b", 5.0, 0.0)]);
    assert_eq!(r.sum(metrics::REQUESTS, &[("variant", "canary")]), 15.0);
    assert_eq!(r.series.len(), 2);
}

#[test]
fn without_identity_a_restart_is_told_by_counters_going_down_and_said_so() {
    let mut acc = Accumulator::default();
    add(&mut acc, &[scrape("a", 100.0, 7.0), scrape("b", 50.0, 0.0)]);
    // `a` restarted: its counters start again from small values.
    let r = add(&mut acc, &[scrape("a", 3.0, 7.0), scrape("b", 60.0, 0.0)]);
    assert_eq!(r.sum(metrics::REQUESTS, &[]), 100.0 + 3.0 + 60.0);
    // Even a counter that happened to be equal is carried once, not twice.
    assert_eq!(r.sum(metrics::ERRORS, &[]), 7.0 + 7.0);
    assert_eq!(acc.restarts_of("a"), 1);
    assert_eq!(acc.restarts_of("b"), 0);
    assert_eq!(r.restarts, 1);
    assert_eq!(r.unidentified, 2);
    let r = add(&mut acc, &[scrape("a", 10.0, 8.0)]);
    assert_eq!(r.sum(metrics::REQUESTS, &[]), 100.0 + 10.0 + 60.0);
}

#[test]
fn a_series_missing_from_one_scrape_keeps_its_last_value_and_is_no_restart() {
    for identified in [false, true] {
        let mut acc = Accumulator::default();
        let id = |s: OriginScrape, t: f64| if identified { told(s, 100.0 + t, t) } else { s };
        let both = |stable: f64, canary: f64| {
            OriginScrape::from_samples(
                "a",
                vec![
                    sample(metrics::REQUESTS, "stable", stable),
                    sample(metrics::REQUESTS, "canary", canary),
                ],
            )
        };
        add(&mut acc, &[id(both(1000.0, 1000.0), 0.0)]);
        add(&mut acc, &[id(both(2000.0, 2000.0), 10.0)]);
        // One scrape without the canary series.
        let only_stable =
            OriginScrape::from_samples("a", vec![sample(metrics::REQUESTS, "stable", 2500.0)]);
        let r = add(&mut acc, &[id(only_stable, 20.0)]);
        assert_eq!(r.sum(metrics::REQUESTS, &[("variant", "canary")]), 2000.0);
        let r = add(&mut acc, &[id(both(3000.0, 4000.0), 30.0)]);
        assert_eq!(r.sum(metrics::REQUESTS, &[("variant", "stable")]), 3000.0);
        assert_eq!(r.sum(metrics::REQUESTS, &[("variant", "canary")]), 4000.0);
        assert_eq!(r.restarts, 0, "identified: {identified}");
    }
}

#[test]
fn a_restart_is_told_by_uptime_even_when_counters_did_not_go_down() {
    let mut acc = Accumulator::default();
    add(&mut acc, &[told(scrape("a", 100.0, 1.0), 50.0, 0.0)]);
    // 10 s later the proxy is up 5 s: a new process, which already counted 150.
    let r = add(&mut acc, &[told(scrape("a", 150.0, 2.0), 5.0, 10.0)]);
    assert_eq!(r.restarts, 1);
    assert_eq!(r.sum(metrics::REQUESTS, &[]), 250.0);
    assert_eq!(r.unidentified, 0);
    // A hot restart: the epoch went up, uptime did not go down.
    let mut hot = told(scrape("a", 20.0, 0.0), 30.0, 40.0);
    if let Some(id) = hot.identity.as_mut() {
        id.hot_restart_epoch = 1.0;
    }
    let r = add(&mut acc, &[hot]);
    assert_eq!((r.restarts, r.sum(metrics::REQUESTS, &[])), (2, 270.0));
}

#[test]
fn an_endpoint_alternating_between_proxies_is_an_error_for_good_and_inflates_nothing() {
    // Proxy A up since t = -1000, proxy B since t = -400: answers alternate.
    let mut acc = Accumulator::default();
    let a = |t: f64, n: f64| told(scrape("lb", n, 0.0), 1000.0 + t, t);
    let b = |t: f64, n: f64| told(scrape("lb", n, 0.0), 400.0 + t, t);
    let first = add(&mut acc, &[a(0.0, 5000.0)]);
    assert_eq!(first.sum(metrics::REQUESTS, &[]), 5000.0);
    let err = acc.add(SystemTime::UNIX_EPOCH, &[b(10.0, 2000.0)]).err();
    let err = err.map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("endpoint alternates between proxies"), "{err}");
    for step in 2..10 {
        let t = f64::from(step) * 10.0;
        let s = if step % 2 == 0 {
            a(t, 5000.0 + t)
        } else {
            b(t, 2000.0 + t)
        };
        assert!(
            acc.add(SystemTime::UNIX_EPOCH, &[s]).is_err(),
            "step {step}"
        );
    }
    assert_eq!(acc.restarts_of("lb"), 0);

    // A proxy whose uptime runs ahead of the clock is another one too.
    let mut acc = Accumulator::default();
    add(&mut acc, &[b(0.0, 2000.0)]);
    assert!(acc.add(SystemTime::UNIX_EPOCH, &[a(10.0, 5000.0)]).is_err());

    // Two proxies started together, told apart by their counters only.
    let mut acc = Accumulator::default();
    let c = |t: f64, n: f64| told(scrape("lb", n, 0.0), 1000.0 + t, t);
    add(&mut acc, &[c(0.0, 5000.0)]);
    assert!(acc.add(SystemTime::UNIX_EPOCH, &[c(10.0, 4000.0)]).is_err());
}

#[test]
fn an_error_of_one_origin_still_folds_in_the_others() {
    let mut acc = Accumulator::default();
    add(
        &mut acc,
        &[
            told(scrape("lb", 50.0, 0.0), 100.0, 0.0),
            scrape("b", 10.0, 0.0),
        ],
    );
    // 10 s later `lb` answers from a proxy up 50 s: it started before the last answer.
    let older = told(scrape("lb", 10.0, 0.0), 50.0, 10.0);
    assert!(acc
        .add(SystemTime::UNIX_EPOCH, &[older, scrape("b", 20.0, 0.0)])
        .is_err());
    // `b` was folded in regardless; `lb` counts what it had before.
    let r = add(&mut acc, &[scrape("b", 30.0, 0.0)]);
    assert_eq!(r.sum(metrics::REQUESTS, &[]), 80.0);
}

#[test]
fn origins_sharing_an_id_list_add_up_as_origins_with_lists_of_their_own() {
    let a = scrape("a", 10.0, 1.0);
    let shared = OriginScrape {
        origin: Arc::from("b"),
        values: Arc::new(vec![5.0, 2.0]),
        ..a.clone()
    };
    // The same series in the other order, in a list of its own.
    let reversed = OriginScrape {
        origin: Arc::from("c"),
        ids: a.ids.iter().rev().copied().collect(),
        values: Arc::new(vec![3.0, 20.0]),
        ..a.clone()
    };
    let own = |o: &OriginScrape| OriginScrape {
        ids: o.ids.iter().copied().collect(),
        ..o.clone()
    };
    let scrapes = [a, shared, reversed.clone(), reversed];
    let mut acc = Accumulator::default();
    let r = add(&mut acc, &scrapes);
    let mut separate = Accumulator::default();
    let own: Vec<OriginScrape> = scrapes.iter().map(own).collect();
    assert_eq!(r, add(&mut separate, &own));
    assert_eq!(r.sum(metrics::REQUESTS, &[]), 10.0 + 5.0 + 20.0);
    assert_eq!(r.sum(metrics::ERRORS, &[]), 1.0 + 2.0 + 3.0);
}

#[test]
fn readings_never_decrease_across_restarts() {
    let mut acc = Accumulator::default();
    let mut last = 0.0;
    let mut value = 0.0;
    for step in 0..200u32 {
        value = if step.is_multiple_of(37) {
            f64::from(step % 5)
        } else {
            value + f64::from(step % 7)
        };
        let r = add(&mut acc, &[scrape("a", value, 0.0)]);
        let total = r.sum(metrics::REQUESTS, &[]);
        assert!(total >= last, "step {step}: {total} < {last}");
        last = total;
    }
}

/// A seeded generator (xoshiro256++), so failures replay.
pub(crate) struct Rng(rand_xoshiro::Xoshiro256PlusPlus);

impl Rng {
    pub(crate) fn new(seed: u64) -> Rng {
        Rng(rand::SeedableRng::seed_from_u64(seed))
    }

    /// True with probability `p`.
    pub(crate) fn chance(&mut self, p: f64) -> bool {
        rand::RngExt::random_bool(&mut self.0, p)
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        rand::RngExt::random_range(&mut self.0, 0..n.max(1))
    }
}

/// Many random histories of two proxies with four series each: scrapes that miss series,
/// restarts (told by uptime), traffic between. What the accumulator reads must equal what
/// the proxies counted, less only what a proxy counted after it was last scraped and before
/// it restarted (no one can read that).
#[test]
fn accumulated_totals_match_the_truth_over_random_histories() {
    let names = ["stable", "canary"];
    let metrics = [metrics::REQUESTS, metrics::ERRORS];
    for seed in 0..300 {
        let mut rng = Rng::new(seed);
        let mut acc = Accumulator::default();
        // Per proxy: start time, counters of the current process, what was read of it last
        // (per series), and the truth readable so far.
        let mut start = [-100.0, -300.0];
        let mut now_counts = [[0.0f64; 4]; 2];
        let mut last_read = [[0.0f64; 4]; 2];
        let mut readable = [[0.0f64; 4]; 2];
        let mut restarts = 0;
        for step in 0..60 {
            let t = f64::from(step) * 10.0;
            let mut scrapes = Vec::new();
            for p in 0..2 {
                if t - start[p] >= 60.0 && rng.chance(0.05) {
                    // Restart: what the old process counted since it was last read is lost.
                    start[p] = t - 1.0 - rng.below(5) as f64;
                    now_counts[p] = [0.0; 4];
                    last_read[p] = [0.0; 4];
                    restarts += 1;
                }
                for (i, c) in now_counts[p].iter_mut().enumerate() {
                    let add = rng.below(50) as f64 * if i % 2 == 0 { 10.0 } else { 1.0 };
                    *c += add;
                }
                if rng.chance(0.1) {
                    continue; // the proxy did not answer this time
                }
                let mut samples = Vec::new();
                for (i, &c) in now_counts[p].iter().enumerate() {
                    if rng.chance(0.15) {
                        continue; // the series is missing from this answer
                    }
                    readable[p][i] += c - last_read[p][i];
                    last_read[p][i] = c;
                    samples.push(sample(metrics[i % 2], names[i / 2], c));
                }
                let origin = ["p0", "p1"][p];
                scrapes.push(told(
                    OriginScrape::from_samples(origin, samples),
                    (t - start[p]).floor(),
                    t,
                ));
            }
            let r = add(&mut acc, &scrapes);
            for (i, (metric, variant)) in [
                (metrics[0], names[0]),
                (metrics[1], names[0]),
                (metrics[0], names[1]),
                (metrics[1], names[1]),
            ]
            .iter()
            .enumerate()
            {
                let want = readable[0][i] + readable[1][i];
                let got = r.sum(metric, &[("variant", variant)]);
                assert_eq!(got, want, "seed {seed} step {step} {metric} {variant}");
            }
        }
        assert!(restarts > 0 || seed > 0);
    }
}

#[test]
fn a_restart_soon_after_the_last_answer_is_a_restart_though_uptime_grew() {
    let mut acc = Accumulator::default();
    // Seen up 2 s at t = 0; restarted at t = 1; seen up 9 s at t = 10, counters lower.
    add(&mut acc, &[told(scrape("a", 100.0, 0.0), 2.0, 0.0)]);
    let r = add(&mut acc, &[told(scrape("a", 30.0, 0.0), 9.0, 10.0)]);
    assert_eq!((r.restarts, r.sum(metrics::REQUESTS, &[])), (1, 130.0));
}

#[test]
fn the_revision_gauge_is_not_accumulated_and_its_drop_is_no_restart() {
    let revision = |v: f64| Sample {
        name: sluice_filter::metrics::CONFIG_REVISION.into(),
        labels: [("experiment".into(), "e".into())].into(),
        value: v,
    };
    let at = |requests: f64, rev: f64| {
        OriginScrape::from_samples(
            "a",
            vec![sample(metrics::REQUESTS, "canary", requests), revision(rev)],
        )
    };
    let mut acc = Accumulator::default();
    add(&mut acc, &[at(100.0, 7.0)]);
    // A proxy without an identity whose filter went back to a configuration without a
    // revision (its bootstrap default): its counters did not go down, so no restart.
    let r = add(&mut acc, &[at(120.0, 0.0)]);
    assert_eq!(acc.restarts_of("a"), 0);
    assert_eq!(r.sum(metrics::REQUESTS, &[]), 120.0);
    assert_eq!(r.sum(sluice_filter::metrics::CONFIG_REVISION, &[]), 0.0);
    assert!(r
        .series
        .keys()
        .all(|k| k.name != sluice_filter::metrics::CONFIG_REVISION));
}
