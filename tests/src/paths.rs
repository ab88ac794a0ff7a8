//! Locations of the things tests need, and free loopback ports.

use std::collections::HashSet;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::error::{io, Error, Result};

/// The repository root (the workspace directory holding `Cargo.lock`).
pub fn repo_root() -> PathBuf {
    // This crate lives in <root>/tests; the path is fixed at compile time, which is what we want:
    // tests run with their package directory as cwd, the bench binary from anywhere.
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// The Envoy binary: `$ENVOY_BIN`, else `<root>/.venv/bin/envoy` as installed by
/// `scripts/setup.sh`.
pub fn envoy_bin() -> Result<PathBuf> {
    let path = match std::env::var_os("ENVOY_BIN") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => repo_root().join(".venv/bin/envoy"),
    };
    if path.is_file() {
        Ok(path)
    } else {
        Err(Error::EnvoyMissing(path))
    }
}

/// Cargo's target directory as the build scripts use it (`$CARGO_TARGET_DIR` or `<root>/target`).
fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(p) if !p.is_empty() => {
            let p = PathBuf::from(p);
            if p.is_absolute() {
                p
            } else {
                repo_root().join(p)
            }
        }
        _ => repo_root().join("target"),
    }
}

fn built_wasm(file: &str, package: &str) -> Result<PathBuf> {
    let rel = Path::new("wasm32-wasip1/release").join(file);
    // Prefer the configured target dir, but fall back to ./target: scripts build there even when a
    // developer's shell exports another CARGO_TARGET_DIR.
    let candidates = [
        target_dir().join(&rel),
        repo_root().join("target").join(&rel),
    ];
    match candidates.iter().find(|p| p.is_file()) {
        Some(p) => Ok(p.clone()),
        None => Err(Error::WasmMissing {
            path: candidates[0].clone(),
            build: format!("cargo build -p {package} --target wasm32-wasip1 --release"),
        }),
    }
}

/// The release build of the Sluice filter, `target/wasm32-wasip1/release/sluice_filter.wasm`.
pub fn filter_wasm() -> Result<PathBuf> {
    built_wasm("sluice_filter.wasm", "sluice-filter")
}

/// The release build of the no-op filter the benchmark compares against.
pub fn noop_filter_wasm() -> Result<PathBuf> {
    built_wasm("sluice_noop_filter.wasm", "sluice-noop-filter")
}

/// The controller binary: `$SLUICE_BIN`, else the debug build `target/debug/sluice`
/// (`scripts/test.sh` builds it before the tests run).
pub fn sluice_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("SLUICE_BIN").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let candidates = [
        target_dir().join("debug/sluice"),
        repo_root().join("target/debug/sluice"),
    ];
    match candidates.iter().find(|p| p.is_file()) {
        Some(p) => Ok(p.clone()),
        None => Err(Error::BinaryMissing {
            path: candidates[0].clone(),
            build: "cargo build -p sluice-controller".into(),
        }),
    }
}

/// A loopback TCP port that was free a moment ago and that this process has not handed out
/// before.
///
/// The OS may give the same ephemeral port to two quick successive binds once the first socket
/// is closed; remembering what we handed out keeps parallel tests in one binary from colliding.
pub fn free_port() -> Result<u16> {
    static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    for _ in 0..100 {
        let listener =
            TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(io("binding 127.0.0.1:0"))?;
        let port = listener.local_addr().map_err(io("local_addr"))?.port();
        let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
        if given.get_or_insert_with(HashSet::new).insert(port) {
            return Ok(port);
        }
    }
    Err(Error::Io {
        context: "finding a free port".into(),
        source: std::io::Error::other("100 attempts returned ports already handed out"),
    })
}
