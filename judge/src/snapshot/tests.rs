use super::*;

fn counters(requests: u64, errors: u64) -> Counters {
    Counters {
        requests,
        responses: BTreeMap::from([("2xx".into(), requests - errors), ("5xx".into(), errors)]),
        latency: Histogram {
            buckets: vec![
                Bucket {
                    le: 10.0,
                    count: requests / 2,
                },
                Bucket {
                    le: 100.0,
                    count: requests,
                },
            ],
            sum: 20.0 * requests as f64,
            count: requests,
        },
        ..Counters::default()
    }
}

fn snap(at: f64, control: Counters, canary: Counters) -> Snapshot {
    Snapshot {
        at,
        experiment: "e".into(),
        control: "control".into(),
        canary: None,
        weights: BTreeMap::from([("control".into(), 90.0), ("canary".into(), 10.0)]),
        variants: BTreeMap::from([("control".into(), control), ("canary".into(), canary)]),
        health: Health::Ok,
        stage_started_at: None,
    }
}

#[test]
fn an_interval_is_the_difference_of_counters() {
    let a = snap(0.0, counters(100, 1), counters(10, 0));
    let b = snap(10.0, counters(250, 4), counters(30, 2));
    let iv = interval(&a, &b, ResetPolicy::SinceRestart);
    assert!(iv.resets.is_empty());
    let c = &iv.variants["control"];
    assert_eq!((c.requests, c.errors(), c.latency.count), (150, 3, 150));
    assert_eq!(c.latency.buckets[0].count, 125 - 50);
    assert_eq!(iv.variants["canary"].requests, 20);
}

#[test]
fn a_counter_reset_counts_the_later_values_as_new_traffic() {
    let a = snap(0.0, counters(1000, 10), counters(100, 1));
    // The control's counters went down: a restart.
    let b = snap(10.0, counters(40, 1), counters(130, 1));
    let iv = interval(&a, &b, ResetPolicy::SinceRestart);
    assert_eq!(iv.resets, vec!["control".to_string()]);
    assert_eq!(iv.variants["control"].requests, 40);
    assert_eq!(iv.variants["canary"].requests, 30);
    // Discard drops the whole interval for every variant.
    let iv = interval(&a, &b, ResetPolicy::Discard);
    assert!(iv.variants.values().all(|c| c.requests == 0));
}

#[test]
fn a_decrease_in_any_counter_is_a_reset() {
    let a = snap(0.0, counters(1000, 10), counters(100, 1));
    let mut later = counters(1100, 10);
    later.latency.sum = 1.0;
    let b = snap(10.0, later, counters(130, 1));
    assert_eq!(
        interval(&a, &b, ResetPolicy::SinceRestart).resets,
        vec!["control".to_string()]
    );
}

#[test]
fn the_json_lines_format_round_trips_and_names_bad_fields() {
    let s = snap(1.5, counters(10, 1), counters(5, 0));
    let line = serde_json::to_string(&s).unwrap_or_default();
    let text = format!("# comment\n\n{line}\n{line}\n");
    let read = read_lines(&text).unwrap_or_default();
    assert_eq!(read, vec![s.clone(), s]);
    let bad = line.replace("\"requests\"", "\"reqs\"");
    let err = read_lines(&bad)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.starts_with("line 1: variants.canary"), "{err}");
    let two_canaries = line.replace("\"canary\":{", "\"b\":{\"requests\":1},\"canary\":{");
    let err = read_lines(&two_canaries)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("canary"), "{err}");
}

#[test]
fn histograms_are_checked() {
    let h = Histogram {
        buckets: vec![Bucket { le: 5.0, count: 3 }, Bucket { le: 1.0, count: 4 }],
        sum: 0.0,
        count: 4,
    };
    assert!(h.check().is_err());
    let h = Histogram {
        buckets: vec![Bucket { le: 1.0, count: 3 }, Bucket { le: 5.0, count: 2 }],
        sum: 0.0,
        count: 4,
    };
    assert!(h.check().is_err());
    assert_eq!(h.check(), Err(InvalidHistogram::NotCumulative { le: 5.0 }));
    let inf = Histogram {
        buckets: vec![Bucket {
            le: f64::INFINITY,
            count: 1,
        }],
        sum: 0.0,
        count: 1,
    };
    assert_eq!(inf.check(), Err(InvalidHistogram::InfiniteBound));
    let over = Histogram {
        buckets: vec![Bucket { le: 1.0, count: 5 }],
        sum: 0.0,
        count: 4,
    };
    assert_eq!(over.check(), Err(InvalidHistogram::OverCount));
    let h = Histogram {
        buckets: vec![Bucket { le: 1.0, count: 3 }, Bucket { le: 5.0, count: 4 }],
        sum: 0.0,
        count: 6,
    };
    assert_eq!(h.per_bucket(), vec![3, 1, 2]);
}

/// Each problem is its own variant, and its message still names the field it is about.
#[test]
fn snapshot_problems_are_typed_and_name_the_field() {
    let good = snap(1.0, counters(10, 1), counters(5, 0));
    assert_eq!(good.check(), Ok(()));
    let check = |edit: &dyn Fn(&mut Snapshot)| {
        let mut s = good.clone();
        edit(&mut s);
        let e = s.check().err();
        let text = e.as_ref().map(ToString::to_string).unwrap_or_default();
        (e, text)
    };
    let (e, text) = check(&|s| s.at = f64::NAN);
    assert_eq!(e, Some(InvalidSnapshot::At));
    assert!(text.contains("`at`"), "{text}");
    let (e, text) = check(&|s| s.control = "contrl".into());
    assert_eq!(e, Some(InvalidSnapshot::UnknownControl("contrl".into())));
    assert_eq!(text, "control \"contrl\" is not among the variants");
    let (e, _) = check(&|s| {
        s.variants.insert("b".into(), Counters::default());
    });
    assert_eq!(e, Some(InvalidSnapshot::CanaryRequired));
    let (e, text) = check(&|s| s.canary = Some("canry".into()));
    assert_eq!(e, Some(InvalidSnapshot::UnknownCanary("canry".into())));
    assert_eq!(text, "canary \"canry\" is not among the variants");
    let (e, text) = check(&|s| {
        s.weights.insert("canary".into(), 110.0);
    });
    assert!(
        matches!(e, Some(InvalidSnapshot::NotAPercentage { ref variant, .. }) if variant == "canary")
    );
    assert_eq!(text, "weights.canary: 110 is not a percentage");
    let (e, text) = check(&|s| {
        s.weights.insert("canary".into(), 90.0);
    });
    assert_eq!(e, Some(InvalidSnapshot::WeightsTotal(180.0)));
    assert_eq!(text, "weights add up to 180, not 100");
    let (e, text) = check(&|s| {
        if let Some(c) = s.variants.get_mut("canary") {
            c.replicates = vec![1; MAX_REPLICATES + 1];
        }
    });
    assert_eq!(e, Some(InvalidSnapshot::TooManyReplicates("canary".into())));
    assert!(text.starts_with("variants.canary.replicates: "), "{text}");
    let (e, text) = check(&|s| {
        if let Some(c) = s.variants.get_mut("control") {
            c.outcomes.insert("click".into(), MAX_COUNT + 1);
        }
    });
    assert_eq!(
        e,
        Some(InvalidSnapshot::CountTooLarge {
            variant: "control".into(),
            field: "outcomes.click".into()
        })
    );
    assert!(
        text.starts_with("variants.control.outcomes.click: more than "),
        "{text}"
    );
    let (e, text) = check(&|s| {
        if let Some(c) = s.variants.get_mut("canary") {
            c.prediction.buckets = vec![Bucket { le: 5.0, count: 0 }, Bucket { le: 1.0, count: 0 }];
        }
    });
    assert_eq!(
        e,
        Some(InvalidSnapshot::Histogram {
            variant: "canary".into(),
            histogram: "prediction",
            source: InvalidHistogram::BoundsNotIncreasing {
                previous: 5.0,
                le: 1.0
            },
        })
    );
    assert_eq!(
        text,
        "variants.canary.prediction: bucket bounds must increase (1 after 5)"
    );
    // Through the JSON-lines reader: the line, then the same message.
    let line = serde_json::to_string(&snap(1.0, counters(10, 1), counters(5, 0)))
        .unwrap_or_default()
        .replace("\"canary\":10.0", "\"canary\":90.0");
    let err = read_lines(&line).err();
    assert!(
        matches!(
            err,
            Some(SnapshotError::Invalid {
                line: 1,
                source: InvalidSnapshot::WeightsTotal(_)
            })
        ),
        "{err:?}"
    );
    assert_eq!(
        err.map(|e| e.to_string()).unwrap_or_default(),
        "line 1: weights add up to 180, not 100"
    );
}

/// The ledger's rollout totals of `snaps` (warm-up none), per variant: requests and 5xx.
fn ledger_totals(snaps: &[Snapshot], policy: ResetPolicy) -> BTreeMap<String, (u64, u64)> {
    let ledger = crate::ledger::clean(snaps, 0.0, policy);
    ledger
        .rollout
        .variants
        .iter()
        .map(|(k, c)| (k.clone(), (c.requests, c.errors())))
        .collect()
}

#[test]
fn a_variant_missing_from_one_snapshot_is_unknown_not_counted_twice() {
    // 1000 requests per variant per interval; the third snapshot lacks the canary.
    let mut snaps: Vec<Snapshot> = (0..5)
        .map(|i| {
            let n = 1000 * (i + 1);
            snap(f64::from(i as u32) * 10.0, counters(n, 0), counters(n, 0))
        })
        .collect();
    snaps[2].variants.remove("canary");
    for policy in [ResetPolicy::SinceRestart, ResetPolicy::Discard] {
        let totals = ledger_totals(&snaps, policy);
        assert_eq!(totals["control"].0, 4000, "{policy:?}");
        assert_eq!(totals["canary"].0, 4000, "{policy:?}");
    }
    let iv = interval(&snaps[1], &snaps[2], ResetPolicy::SinceRestart);
    assert_eq!(
        (iv.resets.len(), iv.unknown),
        (0, vec!["canary".to_string()])
    );

    // Zeroed rather than missing: the same.
    let mut zeroed = snaps.clone();
    zeroed[2]
        .variants
        .insert("canary".into(), Counters::default());
    assert_eq!(
        ledger_totals(&zeroed, ResetPolicy::SinceRestart)["canary"].0,
        4000
    );
    // One counter of a variant missing: that counter only is unknown this time.
    let mut partial = snaps.clone();
    partial[1] = snap(10.0, counters(2000, 0), counters(2000, 0));
    partial[3] = snap(30.0, counters(4000, 10), counters(4000, 10));
    partial[2] = snap(20.0, counters(3000, 5), counters(3000, 5));
    if let Some(c) = partial[2].variants.get_mut("canary") {
        c.responses.remove("5xx");
        c.latency = Histogram::default();
    }
    let totals = ledger_totals(&partial[..4], ResetPolicy::SinceRestart);
    assert_eq!(totals["canary"], (3000, 10));
    assert_eq!(totals["control"], (3000, 10));
}

#[test]
fn the_good_fixture_with_one_canary_entry_removed_is_judged_the_same() {
    let text = include_str!("../../../controller/tests/data/good.jsonl");
    let config = include_str!("../../../controller/tests/data/guardrails.yaml");
    let Ok(config) = crate::config::GuardrailConfig::from_text(config) else {
        panic!("the fixture config does not load");
    };
    let full = read_lines(text).unwrap_or_default();
    assert!(full.len() > 20);
    let decisions = |snaps: &[Snapshot]| {
        crate::replay(&config, snaps)
            .iter()
            .map(|e| format!("{:?}", e.decision))
            .collect::<Vec<_>>()
    };
    let want = decisions(&full);
    assert!(
        want.last().is_some_and(|d| d.contains("Promote")),
        "{want:?}"
    );
    // Remove the canary from each healthy snapshot in turn (not the first: the baseline).
    for i in 1..full.len() {
        if full[i].health != Health::Ok || full[i].weights != full[i - 1].weights {
            continue;
        }
        let mut cut = full.clone();
        cut[i].variants.remove("canary");
        let got = decisions(&cut);
        assert!(
            !got.iter()
                .any(|d| d.contains("Halt") || d.contains("RollBack")),
            "canary removed from line {i}: {got:?}"
        );
        // That snapshot holds (its counts are unknown); the rollout goes on as before.
        assert_eq!(got[i], "Hold", "canary removed from line {i}");
        if i + 1 < full.len() {
            assert_eq!(got.last(), want.last(), "canary removed from line {i}");
        }
    }
}

/// Many random histories of one experiment's cumulative counters from one proxy, with
/// variants missing from or zeroed in snapshots, single counters missing, and restarts: the
/// ledger's totals equal what can be read (each process' counts up to its last complete
/// snapshot, from the first snapshot on) with `sinceRestart`, and never exceed that with
/// `discard`. Before missing counters were read as unknown, one missing variant counted its
/// whole history again.
#[test]
fn ledger_totals_match_the_truth_over_random_histories() {
    use rand::{RngExt, SeedableRng};
    let names = ["control", "canary"];
    let mut resets_seen = 0;
    let mut incomplete = 0;
    for seed in 0..400 {
        let mut rng = rand_xoshiro::Xoshiro256PlusPlus::seed_from_u64(seed);
        // Per variant (requests, 5xx): the process' counters now, at its last complete
        // snapshot, and where its counting started; the truth readable so far.
        let mut now = [(20_000u64, 200u64); 2];
        let mut complete = now;
        let mut start = now;
        let mut readable = [(0u64, 0u64); 2];
        let mut fresh = true;
        let mut snaps = Vec::new();
        let steps = 50;
        for step in 0..steps {
            if step > 0 {
                if now[0].0 > 5_000 && now[1].0 > 5_000 && rng.random_bool(0.04) {
                    // A restart: counted since the last complete snapshot is lost.
                    for v in 0..2 {
                        readable[v].0 += complete[v].0 - start[v].0;
                        readable[v].1 += complete[v].1 - start[v].1;
                    }
                    now = [(0, 0); 2];
                    complete = now;
                    start = now;
                    fresh = true;
                }
                for c in &mut now {
                    let add = 1 + rng.random_range(0..400);
                    c.0 += add;
                    c.1 += rng.random_range(0..add / 50 + 1);
                }
            }
            let mut s = snap(
                f64::from(step) * 10.0,
                counters(now[0].0, now[0].1),
                counters(now[1].0, now[1].1),
            );
            // The first snapshot of each process and the last one are complete.
            let mut whole = true;
            if !fresh && step + 1 < steps {
                for name in names {
                    if rng.random_bool(0.06) {
                        s.variants.remove(name);
                        whole = false;
                    } else if rng.random_bool(0.04) {
                        s.variants.insert(name.to_string(), Counters::default());
                        whole = false;
                    } else if rng.random_bool(0.06) {
                        if let Some(c) = s.variants.get_mut(name) {
                            c.responses.remove("5xx");
                            whole = whole
                                && now[names.iter().position(|n| *n == name).unwrap_or(0)].1 == 0;
                        }
                    }
                }
            }
            if whole {
                complete = now;
            } else {
                incomplete += 1;
            }
            fresh = false;
            snaps.push(s);
        }
        for v in 0..2 {
            readable[v].0 += complete[v].0 - start[v].0;
            readable[v].1 += complete[v].1 - start[v].1;
        }
        let exact = ledger_totals(&snaps, ResetPolicy::SinceRestart);
        let discard = ledger_totals(&snaps, ResetPolicy::Discard);
        resets_seen += crate::ledger::clean(&snaps, 0.0, ResetPolicy::SinceRestart).resets;
        for (v, name) in names.iter().enumerate() {
            let got = exact.get(*name).copied().unwrap_or_default();
            assert_eq!(got, readable[v], "seed {seed}: {name} (requests, 5xx)");
            let d = discard.get(*name).copied().unwrap_or_default();
            assert!(
                d.0 <= readable[v].0 && d.1 <= readable[v].1,
                "seed {seed}: discard over-counted {name}: {d:?} > {:?}",
                readable[v]
            );
        }
    }
    assert!(
        resets_seen > 100,
        "{resets_seen} resets: the histories must restart"
    );
    assert!(incomplete > 1000, "{incomplete} incomplete snapshots");
}
