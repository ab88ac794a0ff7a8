# Shared by the scripts/bench-*.sh drivers (sourced, not run): set-up, release builds, and the
# results file under target/bench/ with a header saying when, where and on what it ran.

set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
TARGET="${CARGO_TARGET_DIR:-target}"

section() { printf '\n==> %s\n' "$*" >&2; }

# bench_build [WASM_PACKAGES...] -- BIN_PACKAGE BIN
# Runs setup, builds the given wasm filters (release; none given, none built) and the driver
# binary (release, without LTO: it only has to be fast, not small); sets BIN to the driver's path.
bench_build() {
  local wasm=()
  while [[ $# -gt 0 && "$1" != "--" ]]; do wasm+=(-p "$1"); shift; done
  shift
  local package="$1" bin="$2"
  section "setup"
  scripts/setup.sh
  if [[ ${#wasm[@]} -gt 0 ]]; then
    section "build the wasm filters (release): ${wasm[*]}"
    cargo build "${wasm[@]}" --target wasm32-wasip1 --release
  fi
  section "build $bin (release, without LTO)"
  CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 \
    cargo build --release -p "$package" --bin "$bin"
  BIN="$TARGET/release/$bin"
}

# bench_out NAME: creates target/bench/ and sets OUT to NAME-<UTC timestamp>.md in it.
bench_out() {
  mkdir -p "$TARGET/bench"
  STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
  OUT="$TARGET/bench/$1-$STAMP.md"
}

# bench_header TITLE [EXTRA]: the results file's first two lines (also printed).
bench_header() {
  {
    echo "# $1"
    echo "# $(date -u +%FT%TZ) on $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)${2:+, $2}"
  } | tee "$OUT"
}

envoy_version() {
  .venv/bin/envoy --version 2>/dev/null | sed -n "s/.*version: [0-9a-f]*\/\([0-9.]*\)\/.*/\1/p"
}
