use super::*;
#[cfg(not(target_arch = "wasm32"))]
use proptest::prelude::*;
use std::hash::Hasher;

#[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
use wasm_bindgen_test::wasm_bindgen_test as test;

#[test]
fn fnv1a_matches_published_vectors() {
    // Published FNV-1a 64-bit test values: the hash underneath must be plain FNV-1a.
    for (input, want) in [
        (&b""[..], 0xcbf2_9ce4_8422_2325_u64),
        (b"a", 0xaf63_dc4c_8601_ec8c),
        (b"foobar", 0x8594_4171_f739_67e8),
    ] {
        let mut h = fnv::FnvHasher::default();
        h.write(input);
        assert_eq!(h.finish(), want, "input {input:?}");
    }
}

#[test]
fn buckets_cover_the_space_evenly() {
    // 200,000 sequential ids over 20 equal ranges: chi-square with 19 degrees of freedom.
    let n = 200_000u32;
    let mut counts = [0u32; 20];
    for i in 0..n {
        let b = bucket("salt", format!("user-{i}").as_bytes());
        assert!(b < BUCKETS);
        counts[(b / (BUCKETS / 20)) as usize] += 1;
    }
    let expected = f64::from(n) / 20.0;
    let chi2: f64 = counts
        .iter()
        .map(|&c| (f64::from(c) - expected).powi(2) / expected)
        .sum();
    // 99.9th percentile of chi-square(19) is 43.8.
    assert!(chi2 < 43.8, "chi2 = {chi2}, counts = {counts:?}");
}

#[test]
fn different_salts_assign_independently() {
    // Cross-tab of two 50/50 experiments over the same users: chi-square with 1 degree of
    // freedom against independence.
    let n = 100_000;
    let mut table = [[0f64; 2]; 2];
    for i in 0..n {
        let key = format!("user-{i}");
        let a = usize::from(bucket("exp-a", key.as_bytes()) < BUCKETS / 2);
        let b = usize::from(bucket("exp-b", key.as_bytes()) < BUCKETS / 2);
        table[a][b] += 1.0;
    }
    let total = f64::from(n);
    let mut chi2 = 0.0;
    for (a, row) in table.iter().enumerate() {
        for (b, &observed) in row.iter().enumerate() {
            let row_sum = table[a][0] + table[a][1];
            let col_sum = table[0][b] + table[1][b];
            let expected = row_sum * col_sum / total;
            chi2 += (observed - expected).powi(2) / expected;
        }
    }
    // 99.9th percentile of chi-square(1) is 10.83.
    assert!(chi2 < 10.83, "chi2 = {chi2}, table = {table:?}");
}

#[test]
fn layout_serves_each_treatment_from_its_reserved_slice() {
    let l = Layout::new(0, &[(1, 3000, 100), (2, 3000, 3000)]);
    assert_eq!(l.variant_for(0), 1);
    assert_eq!(l.variant_for(99), 1);
    assert_eq!(l.variant_for(100), 0);
    assert_eq!(l.variant_for(3000), 2);
    assert_eq!(l.variant_for(5999), 2);
    assert_eq!(l.variant_for(6000), 0);
    assert_eq!(l.weights(3), vec![6900, 100, 3000]);
}

/// A random experiment shape: caps for up to four treatments, and a sequence of weight
/// vectors within those caps.
#[cfg(not(target_arch = "wasm32"))]
fn ramp() -> impl Strategy<Value = (Vec<u32>, Vec<Vec<u32>>)> {
    (1usize..=4)
        .prop_flat_map(|n| prop::collection::vec(1u32..=BUCKETS, n))
        .prop_map(|mut caps| {
            // Scale caps down so they fit in the bucket space together.
            let total: u32 = caps.iter().sum();
            if total > BUCKETS {
                for c in &mut caps {
                    *c = (u64::from(*c) * u64::from(BUCKETS) / u64::from(total)) as u32;
                }
            }
            caps
        })
        .prop_flat_map(|caps| {
            let steps = caps.iter().map(|&c| 0..=c).collect::<Vec<_>>();
            (Just(caps), prop::collection::vec(steps, 2..8))
        })
}

#[cfg(not(target_arch = "wasm32"))]
proptest! {
    /// Between any two weight vectors, a bucket that changes variant moves only between the
    /// control and a treatment whose weight moved in that direction, and never between two
    /// treatments.
    #[test]
    fn ramps_are_monotone((caps, sequence) in ramp()) {
        let layout = |weights: &[u32]| {
            let t: Vec<(usize, u32, u32)> = caps
                .iter()
                .zip(weights)
                .enumerate()
                .map(|(i, (&cap, &w))| (i + 1, cap, w))
                .collect();
            Layout::new(0, &t)
        };
        for pair in sequence.windows(2) {
            let (before, after) = (layout(&pair[0]), layout(&pair[1]));
            for b in (0..BUCKETS).step_by(7) {
                let (x, y) = (before.variant_for(b), after.variant_for(b));
                if x == y {
                    continue;
                }
                prop_assert!(x == 0 || y == 0, "bucket {b} moved between treatments {x} -> {y}");
                if x == 0 {
                    prop_assert!(pair[1][y - 1] > pair[0][y - 1], "entered {y} whose weight did not grow");
                } else {
                    prop_assert!(pair[1][x - 1] < pair[0][x - 1], "left {x} whose weight did not shrink");
                }
            }
            // And the shares are exactly the weights.
            let mut share = vec![0u32; caps.len() + 1];
            for b in 0..BUCKETS {
                share[after.variant_for(b)] += 1;
            }
            prop_assert_eq!(&share[1..], &pair[1][..]);
        }
    }
}

#[test]
fn replicate_groups_are_independent_of_the_bucket() {
    // Users of a 5 % canary (buckets below 500) spread evenly over 16 groups, as do the rest.
    let mut canary = [0u32; 16];
    let mut control = [0u32; 16];
    for i in 0..200_000u32 {
        let h = hash("salt", format!("user-{i}").as_bytes());
        let r = replicate_of(h, 16);
        if bucket_of(h) < 500 {
            canary[r] += 1;
        } else {
            control[r] += 1;
        }
    }
    let chi2 = |counts: &[u32; 16]| {
        let n: u32 = counts.iter().sum();
        let e = f64::from(n) / 16.0;
        counts
            .iter()
            .map(|&c| (f64::from(c) - e).powi(2) / e)
            .sum::<f64>()
    };
    // χ² with 15 degrees of freedom: 37.7 is its 0.1 % upper point.
    assert!(chi2(&canary) < 37.7, "{canary:?}");
    assert!(chi2(&control) < 37.7, "{control:?}");
    assert_eq!(replicate_of(u64::MAX, 0), 0);
}
