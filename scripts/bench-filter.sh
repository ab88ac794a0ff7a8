#!/usr/bin/env bash
# Filter benchmark: Envoy CPU per request and latency percentiles at a fixed request rate for
# (a) no filter, (b) the no-op proxy-wasm filter, (c) the Sluice filter, (c') the same with a
# data-plane breaker (only when asked for: --cases ...,breaker), (d) the same assignment in a
# Lua filter, (e) Envoy's weighted_clusters 90/10, alternated over several rounds in one run;
# medians and ratios against (a). Not a timed test: run it by hand on an
# otherwise idle machine and copy the table into docs/benchmarks.md.
#
#   scripts/bench-filter.sh                       # 5 rounds x 10 s at 1000 req/s per case
#   scripts/bench-filter.sh --rounds 3 --rate 500 --duration 5 --cases none,noop
#   scripts/bench-filter.sh --cases none,sluice,breaker   # the breaker's cost, (c') − (c)
#
# Arguments go to `sluice-bench filter` (see `--help`). Output is also saved under target/bench/.
source "$(dirname "${BASH_SOURCE[0]}")/lib/bench.sh"

bench_build sluice-filter sluice-noop-filter -- sluice-tests sluice-bench
bench_out filter
section "run (results also in $OUT)"
bench_header "sluice-bench filter $*" "envoy $(envoy_version)"
"$BIN" filter "$@" | tee -a "$OUT"
