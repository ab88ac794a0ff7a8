#!/usr/bin/env bash
# The demo rollout: a real Envoy with the Sluice filter in front of three synthetic model
# servers (stable, canary, shadow), synthetic users sending ~300 requests per second and
# click/purchase beacons, and the Sluice controller walking the canary 1 → 5 → 10 → 25 → 50 →
# 100 % on a compressed schedule (about two minutes), judging guardrails every 2 s and pushing
# weights through Envoy's ECDS file. It ends promoted, rolled back or halted, prints a
# one-screen summary and writes an HTML report and a JSON summary into .work/demo/.
#
#   scripts/demo.sh                              # scenario "good": promoted to 100 %
#   scripts/demo.sh --scenario error-spike       # rolled back by the error guardrails
#   scripts/demo.sh --scenario latency           # rolled back by the latency guardrails
#   scripts/demo.sh --scenario conversion-drop   # rolled back by the click-through guardrail
#   scripts/demo.sh --scenario drift             # rolled back by the prediction-drift guardrail
#   scripts/demo.sh --scenario srm               # halted: sample-ratio mismatch
#   scripts/demo.sh --help                       # every option of `sluice-demo run`
#
# Arguments go to `sluice-demo run`. Ports (loopback only): 10000 listener, 9901 Envoy admin,
# 10001-10003 models, 9400 controller; `--port-offset N` moves them all. Exit status 0 when the
# run ended as its scenario expects, 3 when it did not.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
TARGET="${CARGO_TARGET_DIR:-target}"

section() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

section "setup"
scripts/setup.sh

section "build the filter (wasm32-wasip1, release) and sluice-demo"
cargo build -p sluice-filter --target wasm32-wasip1 --release
cargo build -p sluice-demo
ls -l "$TARGET/wasm32-wasip1/release/sluice_filter.wasm"

section "the rollout"
exec "$TARGET/debug/sluice-demo" run "$@"
