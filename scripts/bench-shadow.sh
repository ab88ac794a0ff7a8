#!/usr/bin/env bash
# Shadow benchmark: what copying every request to a shadow costs Envoy, with the Sluice filter's
# own shadow against Envoy's native request_mirror_policies (CPU per request, saturation
# throughput of one worker), and the primary's latency when the shadow is 10x slower (2 ms
# primary, 20 ms shadow). Cases alternate over several rounds in one run; medians and ratios.
# Not a timed test: run it by hand and copy the tables into docs/benchmarks.md.
#
#   scripts/bench-shadow.sh                          # 5 rounds per part (~10 min)
#   scripts/bench-shadow.sh --rounds 3 --parts cost --saturate 0
#
# Arguments go to `sluice-bench shadow` (see `--help`). Output is also saved under target/bench/.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

section() { printf '\n==> %s\n' "$*" >&2; }

section "setup"
scripts/setup.sh

section "build the Sluice filter (release)"
cargo build -p sluice-filter --target wasm32-wasip1 --release

section "build the load generator (release, without LTO: it only has to be fast, not small)"
CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 \
  cargo build --release -p sluice-tests --bin sluice-bench
BIN="${CARGO_TARGET_DIR:-target}/release/sluice-bench"

out_dir="${CARGO_TARGET_DIR:-target}/bench"
mkdir -p "$out_dir"
out="$out_dir/shadow-$(date -u +%Y%m%dT%H%M%SZ).md"
section "run (results also in $out)"
{
  echo "# sluice-bench shadow $*"
  echo "# $(date -u +%FT%TZ) on $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg), envoy $(.venv/bin/envoy --version 2>/dev/null | sed -n "s/.*version: [0-9a-f]*\/\([0-9.]*\)\/.*/\1/p")"
} | tee "$out"
"$BIN" shadow "$@" | tee -a "$out"
