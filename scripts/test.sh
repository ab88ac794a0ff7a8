#!/usr/bin/env bash
# Every test of the project, from a fresh clone on a fresh machine: set-up, formatting, lints
# (native and wasm32), the wasm builds, both test tiers — the fast tier (unit, property, judge,
# state machine: `cargo test` at the root, no Envoy) and the real-Envoy tier (crate
# sluice-tests and the demo's end-to-end scenarios) — and the filter's pure tests on wasm32
# under Node. Exits non-zero on
# the first failure. Builds into the default ./target so the integration tests find the wasm.
#
#   scripts/test.sh          everything
#   scripts/test.sh --fast   the fast tier only: needs nothing but Rust (no set-up, no Envoy)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

FAST=0
case "${1:-}" in
    "") ;;
    --fast) FAST=1 ;;
    *) echo "usage: scripts/test.sh [--fast]" >&2; exit 2 ;;
esac

START=$SECONDS
section() { printf '\n\033[1m==> %s\033[0m  (t+%ds)\n' "$*" "$((SECONDS - START))"; }
trap 'rc=$?; if [[ $rc -ne 0 ]]; then printf "\n\033[1;31mFAILED\033[0m in section above (exit %d) after %ds\n" "$rc" "$((SECONDS - START))"; fi' EXIT

# The fast tier is the workspace's default members (root Cargo.toml): every crate but
# sluice-tests, and the demo without its `real-envoy` scenarios.
if [[ $FAST -eq 1 ]]; then
    section "fast tier: cargo test (unit, property, judge, state machine; no Envoy)"
    cargo test
    section "fast tier passed in $((SECONDS - START))s"
    exit 0
fi

section "setup (rust targets, envoy, wasm-bindgen-cli, prometheus)"
scripts/setup.sh

# Cargo's progress bars are noise in CI logs.
if [[ -n "${CI:-}" ]]; then export CARGO_TERM_PROGRESS_WHEN=never; fi

section "cargo fmt --check"
cargo fmt --all -- --check

section "clippy (native, all targets)"
cargo clippy --workspace --all-targets -- -D warnings

section "clippy (sluice-filter, wasm32-wasip1)"
cargo clippy -p sluice-filter --target wasm32-wasip1 -- -D warnings

section "build wasm filters (release, wasm32-wasip1)"
cargo build -p sluice-filter -p sluice-noop-filter --target wasm32-wasip1 --release
WASM_DIR="${CARGO_TARGET_DIR:-target}/wasm32-wasip1/release"
ls -l "$WASM_DIR/sluice_filter.wasm" "$WASM_DIR/sluice_noop_filter.wasm"

section "build the sluice binary (the rollout tests run it as a process)"
cargo build -p sluice-controller --bin sluice

# Both tiers in one cargo run: the whole workspace resolves its dependencies' features once,
# where a run per tier (default members, then -p sluice-tests, then -p sluice-demo) would build
# the shared dependencies once per resolution.
section "fast tier + real-Envoy tier: cargo test --workspace --features sluice-demo/real-envoy"
cargo test --workspace --features sluice-demo/real-envoy

section "sluice-filter pure tests on wasm32 (wasm-bindgen-test under node)"
cargo test -p sluice-filter --target wasm32-unknown-unknown

section "all tests passed in $((SECONDS - START))s"
