#!/usr/bin/env bash
# Filter benchmark: Envoy CPU per request and latency percentiles at a fixed request rate for
# (a) no filter, (b) the no-op proxy-wasm filter, (c) the Sluice filter, (d) the same assignment
# in a Lua filter, (e) Envoy's weighted_clusters 90/10, alternated over several rounds in one
# run; medians and ratios against (a). Not a timed test: run it by hand on an
# otherwise idle machine and copy the table into docs/benchmarks.md.
#
#   scripts/bench-filter.sh                       # 5 rounds x 10 s at 1000 req/s per case
#   scripts/bench-filter.sh --rounds 3 --rate 500 --duration 5 --cases none,noop
#
# Arguments go to `sluice-bench filter` (see `--help`). Output is also saved under target/bench/.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

section() { printf '\n==> %s\n' "$*" >&2; }

section "setup"
scripts/setup.sh

section "build the wasm filters (release)"
cargo build -p sluice-filter -p sluice-noop-filter --target wasm32-wasip1 --release

section "build the load generator (release, without LTO: it only has to be fast, not small)"
CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 \
  cargo build --release -p sluice-tests --bin sluice-bench
BIN="${CARGO_TARGET_DIR:-target}/release/sluice-bench"

out_dir="${CARGO_TARGET_DIR:-target}/bench"
mkdir -p "$out_dir"
out="$out_dir/filter-$(date -u +%Y%m%dT%H%M%SZ).md"
section "run (results also in $out)"
{
  echo "# sluice-bench filter $*"
  echo "# $(date -u +%FT%TZ) on $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg), envoy $(.venv/bin/envoy --version 2>/dev/null | sed -n "s/.*version: [0-9a-f]*\/\([0-9.]*\)\/.*/\1/p")"
} | tee "$out"
"$BIN" filter "$@" | tee -a "$out"
