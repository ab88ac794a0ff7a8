#!/usr/bin/env bash
# Decoding one Prometheus protobuf answer: the controller's hand-written reader against a
# prost baseline, in one process, in alternating rounds (`sluice-bench decode`,
# tests/src/bin/sluice-bench/decode.rs). Not a timed test: run it by hand and copy the table into
# docs/benchmarks.md ("Decoding the protobuf exposition").
#
#   scripts/bench-decode.sh                          # 10 experiments, 31 rounds of 100 answers each
#   scripts/bench-decode.sh --experiments 1 --rounds 31
#
# Arguments go to `sluice-bench decode` (--experiments, --rounds, --iterations; see `--help`).
# Output is also saved under target/bench/.
source "$(dirname "${BASH_SOURCE[0]}")/lib/bench.sh"

# No wasm filter: the benchmark only decodes in memory.
bench_build -- sluice-tests sluice-bench
bench_out decode
section "run (results also in $OUT)"
bench_header "sluice-bench decode $*"
"$BIN" decode "$@" | tee -a "$OUT"
