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
source "$(dirname "${BASH_SOURCE[0]}")/lib/bench.sh"

bench_build sluice-filter -- sluice-tests sluice-bench
bench_out shadow
section "run (results also in $OUT)"
bench_header "sluice-bench shadow $*" "envoy $(envoy_version)"
"$BIN" shadow "$@" | tee -a "$OUT"
