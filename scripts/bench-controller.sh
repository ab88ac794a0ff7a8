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
source "$(dirname "${BASH_SOURCE[0]}")/lib/bench.sh"

# The filter is built because the template exposition comes from a real Envoy running it.
bench_build sluice-filter -- sluice-tests sluice-bench

# Every rollout keeps one connection per endpoint, and the simulated endpoints one per
# rollout and endpoint: 10,000 each at the defaults.
ulimit -n "$(ulimit -Hn)"

bench_out controller
section "run (results also in $OUT)"
bench_header "sluice-bench controller $*" "open files limit $(ulimit -n)"
"$BIN" controller "$@" | tee -a "$OUT"
