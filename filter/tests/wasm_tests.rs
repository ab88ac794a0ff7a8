//! Every unit-test module of the filter also runs on wasm32 under wasm-bindgen-test
//! (`cargo test -p sluice-filter --target wasm32-unknown-unknown`, a step of
//! `scripts/test.sh`). There a plain `#[test]` is compiled but never run, silently: a test
//! module runs only if it imports `wasm_bindgen_test` as `test` for that target. This check
//! finds a source file with tests but without that import.

#![cfg(not(target_arch = "wasm32"))]

use std::path::{Path, PathBuf};

const ALIAS: &str = "use wasm_bindgen_test::wasm_bindgen_test as test;";

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn every_test_module_runs_on_wasm32() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut with_tests = 0;
    let mut missing = Vec::new();
    for path in files {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        if !text.contains("#[test]") {
            continue;
        }
        with_tests += 1;
        if !text.contains(ALIAS) {
            missing.push(path.display().to_string());
        }
    }
    assert!(with_tests >= 10, "found only {with_tests} files with tests");
    assert!(
        missing.is_empty(),
        "test modules that would not run on wasm32 (add `#[cfg(all(target_arch = \"wasm32\", \
         target_os = \"unknown\"))] {ALIAS}`): {missing:?}"
    );
}
