//! Golden assignment vectors: (salt, key, layout) → bucket and variant. The same file is
//! checked natively and on wasm32 (wasm-bindgen-test), so the controller (native) and the
//! filter (wasm) provably agree on who is in which variant. Regenerate only on purpose: a
//! changed vector means every user moves.

use serde::Deserialize;
use sluice_filter::assignment::{bucket, Layout};

#[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
use wasm_bindgen_test::wasm_bindgen_test as test;

#[derive(Deserialize)]
struct Vector {
    salt: String,
    key: String,
    /// Treatments as `[cap, weight]` in buckets, laid out in order after control 0.
    treatments: Vec<(u32, u32)>,
    bucket: u32,
    variant: usize,
}

fn layout(treatments: &[(u32, u32)]) -> Layout {
    let t: Vec<(usize, u32, u32)> = treatments
        .iter()
        .enumerate()
        .map(|(i, &(cap, w))| (i + 1, cap, w))
        .collect();
    Layout::new(0, &t)
}

#[test]
fn golden_vectors() {
    let vectors: Vec<Vector> =
        serde_json::from_str(include_str!("golden.json")).expect("golden.json");
    assert!(vectors.len() >= 25, "the golden file lost vectors");
    for v in &vectors {
        let b = bucket(&v.salt, v.key.as_bytes());
        assert_eq!(b, v.bucket, "bucket of ({:?}, {:?})", v.salt, v.key);
        assert_eq!(
            layout(&v.treatments).variant_for(b),
            v.variant,
            "variant of ({:?}, {:?}) under {:?}",
            v.salt,
            v.key,
            v.treatments
        );
    }
}

/// Prints fresh vectors: `cargo test -p sluice-filter --test golden -- --ignored --nocapture`.
#[cfg(not(target_arch = "wasm32"))]
#[test]
#[ignore]
fn print_vectors() {
    let layouts: [&[(u32, u32)]; 4] = [
        &[(10_000, 100)],
        &[(10_000, 2_500)],
        &[(5_000, 1_000), (5_000, 4_999)],
        &[(2_000, 1), (3_000, 3_000), (1_000, 500)],
    ];
    let keys = [
        "alice",
        "bob",
        "user-1",
        "user-2",
        "",
        "ünïcödé",
        "550e8400-e29b-41d4-a716-446655440000",
        "42",
        "a b",
        "x;y=z",
    ];
    let mut out = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        for (j, salt) in ["ranker-v2", "checkout"].iter().enumerate() {
            let treatments = layouts[(i + j) % layouts.len()];
            let b = bucket(salt, key.as_bytes());
            out.push(serde_json::json!({
                "salt": salt, "key": key, "treatments": treatments,
                "bucket": b, "variant": layout(treatments).variant_for(b),
            }));
        }
    }
    for (i, b) in [0u32, 1, 99, 100, 2_499, 2_500, 6_000, 9_999]
        .iter()
        .enumerate()
    {
        // Keys found to land on chosen buckets exercise the layout's edges.
        let key = (0..)
            .map(|n| format!("edge-{n}"))
            .find(|k| bucket("edges", k.as_bytes()) == *b)
            .unwrap_or_default();
        let treatments = layouts[i % layouts.len()];
        out.push(serde_json::json!({
            "salt": "edges", "key": key, "treatments": treatments,
            "bucket": b, "variant": layout(treatments).variant_for(*b),
        }));
    }
    println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
}
