#!/usr/bin/env bash
# Instructions per request of each filter benchmark case: every case's Envoy runs under
# valgrind's callgrind at a low fixed rate, counters zeroed after a warm-up and dumped after a
# fixed number of requests, an idle dump of the same length subtracted, three times per case.
# Counts, unlike CPU seconds on a shared machine, mostly repeat to within a fraction of a per
# cent (a repetition now and then runs a few per cent more), so a change to the filter can be
# judged in one run: compare the two builds in the same run (--wasm-b), by median and minimum. Slow: valgrind runs Envoy some 50x slower (start-up
# alone takes a minute or two per case on a loaded 2-core machine).
#
#   scripts/bench-instructions.sh                                  # none,noop,lua,sluice,shadow-off,mirror,shadow
#   scripts/bench-instructions.sh --cases noop,sluice,sluice-assign,sluice-outcomes
#   scripts/bench-instructions.sh --cases sluice,sluice-b --wasm-b /path/to/other/sluice_filter.wasm
#   scripts/bench-instructions.sh --cases breaker,breaker-b --wasm-b /path/to/other/sluice_filter.wasm
#   scripts/bench-instructions.sh --keep target/bench/callgrind      # keep callgrind's files
#
# Arguments go to `sluice-bench instructions` (see `--help`). Output is also saved under
# target/bench/.
source "$(dirname "${BASH_SOURCE[0]}")/lib/bench.sh"

command -v valgrind >/dev/null && command -v callgrind_control >/dev/null || {
  echo "valgrind (with callgrind_control) is needed: apt-get install valgrind" >&2
  exit 1
}
bench_build sluice-filter sluice-noop-filter -- sluice-tests sluice-bench
bench_out instructions
section "run (results also in $OUT)"
bench_header "sluice-bench instructions $*" "envoy $(envoy_version), $(valgrind --version)"
"$BIN" instructions "$@" | tee -a "$OUT"
