//! Locations of the things tests need, and free loopback ports.

use std::collections::HashSet;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::error::{Error, Result};

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

/// Ports handed out by [`free_port`]: below Linux's default ephemeral range (32768–60999).
const PORT_RANGE: std::ops::Range<u16> = 20_000..32_000;

/// A loopback TCP port that was free a moment ago and that this process has not handed out
/// before.
///
/// Ports come from below the ephemeral range, not from binding port 0: between our check and
/// Envoy's bind, an ephemeral port can be taken by any outgoing connection on the machine (tests
/// open thousands), while a port in this range can only be taken by another listener. The scan
/// starts at a per-process pseudo-random point so concurrent test processes rarely probe the
/// same ports, and remembers what it handed out so parallel tests in one process never collide.
pub fn free_port() -> Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let span = u32::from(PORT_RANGE.end - PORT_RANGE.start);
    if NEXT.load(Ordering::Relaxed) == u32::MAX {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let seed = (std::process::id().wrapping_mul(2_654_435_761) ^ nanos) % span;
        let _ = NEXT.compare_exchange(u32::MAX, seed, Ordering::Relaxed, Ordering::Relaxed);
    }
    for _ in 0..span {
        let offset = NEXT.fetch_add(1, Ordering::Relaxed) % span;
        let port = PORT_RANGE.start + offset as u16;
        let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
        let given = given.get_or_insert_with(HashSet::new);
        if given.contains(&port) {
            continue;
        }
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            given.insert(port);
            return Ok(port);
        }
    }
    Err(Error::Io {
        context: "finding a free port".into(),
        source: std::io::Error::other(format!("no free port in {PORT_RANGE:?}")),
    })
}
