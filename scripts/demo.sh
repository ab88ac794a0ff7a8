#!/usr/bin/env bash
# The demo: build the Sluice filter, start Envoy with envoy/demo.yaml (the filter in front of two
# "model" upstreams inside the same Envoy), send one request from each of 1000 distinct users, and
# show how the traffic split between the variants — as the clients saw it (the echoed
# x-sluice-variant response header) and as Envoy counted it (sluice_requests_total in admin
# /stats/prometheus). Envoy is stopped on exit.
#
#   scripts/demo.sh            # 1000 users
#   USERS=5000 scripts/demo.sh
#
# Ports (fixed by envoy/demo.yaml, loopback only): 10000 ingress, 9901 admin, 10001/10002 models.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
USERS="${USERS:-1000}"
TARGET="${CARGO_TARGET_DIR:-target}"
ADMIN=http://127.0.0.1:9901
INGRESS=http://127.0.0.1:10000

section() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

section "setup"
scripts/setup.sh

section "build the filter (wasm32-wasip1, release) and the traffic generator"
cargo build -p sluice-filter --target wasm32-wasip1 --release
cargo build -p sluice-tests --bin sluice-bench
WASM="$TARGET/wasm32-wasip1/release/sluice_filter.wasm"
ls -l "$WASM"

# envoy/demo.yaml names the filter relative to the repository root, at ./target; a developer who
# builds elsewhere gets a copy of the config pointing at their build.
CONFIG=envoy/demo.yaml
WORK="$(mktemp -d -t sluice-demo.XXXXXX)"
if [[ "$(realpath "$WASM")" != "$(realpath -m target/wasm32-wasip1/release/sluice_filter.wasm)" ]]; then
  sed "s|target/wasm32-wasip1/release/sluice_filter.wasm|$(realpath "$WASM")|" envoy/demo.yaml >"$WORK/demo.yaml"
  CONFIG="$WORK/demo.yaml"
fi

for port in 10000 9901 10001 10002; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "port $port on 127.0.0.1 is in use (another Envoy still running?); stop it and retry" >&2
    exit 1
  fi
done

section "start Envoy with $CONFIG"
.venv/bin/envoy -c "$CONFIG" --concurrency 1 -l warning --disable-hot-restart >"$WORK/envoy.log" 2>&1 &
ENVOY_PID=$!
cleanup() {
  kill "$ENVOY_PID" 2>/dev/null || true
  wait "$ENVOY_PID" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
for _ in $(seq 1 300); do
  if [[ "$(curl -s "$ADMIN/ready" 2>/dev/null)" == LIVE ]]; then break; fi
  if ! kill -0 "$ENVOY_PID" 2>/dev/null; then
    echo "Envoy exited; its log:" >&2
    tail -n 30 "$WORK/envoy.log" >&2
    exit 1
  fi
  sleep 0.1
done
[[ "$(curl -s "$ADMIN/ready")" == LIVE ]] || { echo "Envoy not ready after 30 s" >&2; tail -n 30 "$WORK/envoy.log" >&2; exit 1; }
echo "Envoy pid $ENVOY_PID: ingress $INGRESS, admin $ADMIN"

section "one request from user alice"
echo "\$ curl -si -H 'x-user-id: alice' $INGRESS/predict"
curl -si -H 'x-user-id: alice' "$INGRESS/predict" | tr -d '\r' | grep -iE '^(HTTP/|x-sluice-variant|x-model-score)|^\{'

section "a burst: one request from each of $USERS distinct users"
"$TARGET/debug/sluice-bench" burst --url "$INGRESS/predict" --users "$USERS" --concurrency 32 \
  --user-prefix demo-user- --split-by x-sluice-variant --body-field model

section "what Envoy counted (admin /stats/prometheus)"
curl -s "$ADMIN/stats/prometheus" | grep -E '^sluice_requests_total' | sed 's/^/  /'

section "stop Envoy"
cleanup
trap - EXIT
echo "done"
