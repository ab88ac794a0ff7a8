#!/usr/bin/env bash
# Decoding one Prometheus protobuf answer: the controller's hand-written reader against a
# prost baseline, in one process, in alternating rounds (controller/examples/decode.rs). Not a
# timed test: run it by hand and copy the table into docs/benchmarks.md ("Decoding the
# protobuf exposition").
#
#   scripts/bench-decode.sh                          # 10 experiments, 31 rounds of 100 answers each
#   scripts/bench-decode.sh --experiments 1 --rounds 31
#
# Arguments go to the example (--experiments, --rounds, --iterations). Output is also saved
# under target/bench/.
source "$(dirname "${BASH_SOURCE[0]}")/lib/bench.sh"

section "build the decode benchmark (release, without LTO)"
CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 \
  cargo build --release -p sluice-controller --example decode

bench_out decode
section "run (results also in $OUT)"
bench_header "decode $*"
"$TARGET/release/examples/decode" "$@" | tee -a "$OUT"
