#!/usr/bin/env bash
# Push fan-out benchmark: from the controller's decision (Sink::push called) until every proxy
# has ACKed the new configuration — the ECDS file sink on one real Envoy, the ecdsGrpc sink with
# 1 and 3 real Envoys (envoy/fleet/envoy.yaml) and with 1000 simulated xDS clients (one child
# process, one stream and connection each, ACKing like Envoy) — and the controller's memory per
# connected proxy. Not a timed test: run it by hand and copy the table into docs/benchmarks.md.
#
#   scripts/bench-fanout.sh                                  # all cases, 100 pushes each
#   scripts/bench-fanout.sh --cases sim --clients 5000 --pushes 30
#
# Arguments go to `sluice-bench fanout` (see `--help`). Output is also saved under target/bench/.
source "$(dirname "${BASH_SOURCE[0]}")/lib/bench.sh"

bench_build sluice-filter -- sluice-tests sluice-bench

# One connection per simulated proxy, on both ends.
ulimit -n "$(ulimit -Hn)"

bench_out fanout
section "run (results also in $OUT)"
bench_header "sluice-bench fanout $*" "Envoy $(envoy_version), open files limit $(ulimit -n)"
"$BIN" fanout "$@" | tee -a "$OUT"
