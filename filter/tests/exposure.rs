//! Pinned exposure tokens, checked natively and on wasm32 (wasm-bindgen-test): a token issued
//! by one proxy (or computed by a test natively) verifies on every other, whatever its build.
//! A changed vector means every token already issued stops counting.

use sluice_filter::beacon::issue;
use sluice_filter::mac::{Key, PURPOSE_EXPOSURE, PURPOSE_SHADOW};

#[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
use wasm_bindgen_test::wasm_bindgen_test as test;

const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

#[test]
fn tokens_are_the_same_on_every_build() {
    let k = Key::derive(SECRET, PURPOSE_EXPOSURE);
    assert_eq!(
        issue(&k, "ranker", b"alice", "canary", 1_800_000_000),
        "1.ranker.canary.1800000000.b0deca477b0fb421754a206d1d99a098"
    );
    assert_eq!(
        issue(&k, "ranker", "ünïcödé".as_bytes(), "stable", 0),
        "1.ranker.stable.0.8887a710ea4d1ab764d34b69a78dadbe"
    );
    let shadow = Key::derive(SECRET, PURPOSE_SHADOW);
    assert_eq!(
        sluice_filter::mac::to_hex(&shadow.tag(&[b"x"])),
        "4b4bef5e0f9699d6eb991bb528c7ff8e"
    );
}
