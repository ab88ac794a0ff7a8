#[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
use wasm_bindgen_test::wasm_bindgen_test as test;

use super::*;

#[test]
fn pairs_are_found_in_place_first_value_first() {
    let map = serialise(&[
        (":status", "200"),
        ("x-sluice-outcome", "click"),
        ("set-cookie", "a=1"),
        ("x-sluice-outcome", "purchase"),
        ("empty", ""),
    ]);
    assert_eq!(find_pair(&map, b":status"), Some(&b"200"[..]));
    assert_eq!(find_pair(&map, b"x-sluice-outcome"), Some(&b"click"[..]));
    assert_eq!(find_pair(&map, b"empty"), Some(&b""[..]));
    assert_eq!(find_pair(&map, b"x-model-score"), None);
    assert_eq!(Pairs::new(&map).count(), 5);
    assert_eq!(Pairs::new(&serialise::<&str, &str>(&[])).count(), 0);
    assert_eq!(Pairs::new(&[]).count(), 0);
}

#[test]
fn malformed_maps_end_the_pairs_without_panicking() {
    let map = serialise(&[(":status", "200"), ("x-model-score", "0.5")]);
    // Cut anywhere: only the pairs wholly inside are read, never out of bounds.
    for cut in 0..map.len() {
        let got: Vec<_> = Pairs::new(&map[..cut]).collect();
        assert!(got.len() <= 2, "cut at {cut}");
        if cut < map.len() - 1 {
            assert_eq!(
                find_pair(&map[..cut], b"x-model-score"),
                None,
                "cut at {cut}"
            );
        }
    }
    // A count larger than the buffer could hold, and lengths that overflow.
    let mut huge = map.clone();
    huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
    assert_eq!(Pairs::new(&huge).count(), 0);
    let mut long = map;
    long[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
    assert_eq!(Pairs::new(&long).count(), 0);
}
