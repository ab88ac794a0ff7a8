#!/usr/bin/env bash
# Controller benchmark: CPU per tick and peak RSS of the controller with many simulated Envoy
# admin endpoints (one process serving a real Envoy+Sluice exposition on many paths) and many
# rollouts, each a real daemon task (Envoy admin source, accumulator, judge, state machine,
# state and audit files). Not a timed test: run it by hand and copy the table into
# docs/benchmarks.md.
#
#   scripts/bench-controller.sh                          # 1000 endpoints x 10 rollouts
#   scripts/bench-controller.sh --endpoints 100 --rollouts 2 --ticks 5
#
# Arguments go to `sluice-bench controller` (see `--help`). Output is also saved under
# target/bench/.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

section() { printf '\n==> %s\n' "$*" >&2; }

section "setup"
scripts/setup.sh

section "build the Sluice filter (release; the template exposition comes from a real Envoy)"
cargo build -p sluice-filter --target wasm32-wasip1 --release

section "build the driver (release, without LTO)"
CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 \
  cargo build --release -p sluice-tests --bin sluice-bench
BIN="${CARGO_TARGET_DIR:-target}/release/sluice-bench"

# Every rollout keeps one connection per endpoint, and the simulated endpoints one per
# rollout and endpoint: 10,000 each at the defaults.
ulimit -n "$(ulimit -Hn)"

out_dir="${CARGO_TARGET_DIR:-target}/bench"
mkdir -p "$out_dir"
out="$out_dir/controller-$(date -u +%Y%m%dT%H%M%SZ).md"
section "run (results also in $out)"
{
  echo "# sluice-bench controller $*"
  echo "# $(date -u +%FT%TZ) on $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg), open files limit $(ulimit -n)"
} | tee "$out"
"$BIN" controller "$@" | tee -a "$out"
