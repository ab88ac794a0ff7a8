//! The filter module the daemon serves to proxies (`sluice run --serve-wasm FILE`), for
//! meshes where the proxies fetch the `.wasm` over HTTP: Istio's WasmPlugin / TrafficExtension
//! `url` (checked against its `sha256` by the pod's agent) or an Envoy `remote` code source.
//!
//! | route | |
//! |---|---|
//! | `GET /wasm/sluice_filter.wasm` | the module; `ETag` and `X-Sluice-Sha256` carry its digest |
//! | `GET /wasm/sluice_filter.wasm.sha256` | the digest, lower-case hex and a newline |
//!
//! The file is read once, at start, and served from memory: replacing it on disk while the
//! daemon runs changes nothing, so the digest always matches the bytes, and a proxy that
//! fetches mid-upgrade never gets a half-written module.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use sha2::{Digest, Sha256};

/// The name the module is served under (the manifests in `deploy/istio/` use it).
pub const FILE_NAME: &str = "sluice_filter.wasm";

/// What every WebAssembly binary starts with: magic `\0asm`, version 1.
const WASM_HEADER: [u8; 8] = [0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00];

/// Largest module accepted: the filter is well under a megabyte; a larger file is a mistake.
pub const MAX_BYTES: usize = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    #[error("--serve-wasm {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--serve-wasm {path}: not a WebAssembly module (no `\\0asm` version 1 header)")]
    NotWasm { path: PathBuf },
    #[error(
        "--serve-wasm {path}: {len} bytes, more than the {MAX_BYTES} a filter module may have"
    )]
    TooLarge { path: PathBuf, len: u64 },
}

/// A module held in memory with its SHA-256.
#[derive(Debug, Clone)]
pub struct WasmModule {
    bytes: Bytes,
    sha256: String,
}

impl WasmModule {
    /// Reads and checks the module at `path`.
    pub fn load(path: &Path) -> Result<WasmModule, ModuleError> {
        let read = |source| ModuleError::Read {
            path: path.to_path_buf(),
            source,
        };
        let len = std::fs::metadata(path).map_err(read)?.len();
        if len > MAX_BYTES as u64 {
            return Err(ModuleError::TooLarge {
                path: path.to_path_buf(),
                len,
            });
        }
        let bytes = std::fs::read(path).map_err(read)?;
        WasmModule::from_bytes(bytes).ok_or_else(|| ModuleError::NotWasm {
            path: path.to_path_buf(),
        })
    }

    /// The module, if `bytes` is one.
    pub fn from_bytes(bytes: Vec<u8>) -> Option<WasmModule> {
        if !bytes.starts_with(&WASM_HEADER) || bytes.len() > MAX_BYTES {
            return None;
        }
        let sha256 = hex(&Sha256::digest(&bytes));
        Some(WasmModule {
            bytes: Bytes::from(bytes),
            sha256,
        })
    }

    /// The SHA-256 of the bytes, lower-case hex (the form WasmPlugin's `sha256` and Envoy's
    /// `remote.sha256` take).
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

/// The answer to `GET /wasm/<file>`, or `None` for a file not served.
pub fn reply(
    module: &WasmModule,
    file: &str,
) -> Option<hyper::Response<http_body_util::Full<Bytes>>> {
    let (body, content_type) = match file.strip_prefix(FILE_NAME)? {
        "" => (module.bytes.clone(), "application/wasm"),
        ".sha256" => (Bytes::from(format!("{}\n", module.sha256)), "text/plain"),
        _ => return None,
    };
    let mut r = hyper::Response::new(http_body_util::Full::new(body));
    let headers = r.headers_mut();
    for (name, value) in [
        ("content-type", content_type.to_string()),
        ("etag", format!("\"{}\"", module.sha256)),
        ("x-sluice-sha256", module.sha256.clone()),
    ] {
        if let Ok(v) = value.parse() {
            headers.insert(name, v);
        }
    }
    Some(r)
}

fn hex(digest: &[u8]) -> String {
    digest.iter().fold(String::with_capacity(64), |mut s, b| {
        use std::fmt::Write as _;
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_is_sha256_of_the_bytes() {
        let mut bytes = WASM_HEADER.to_vec();
        let m = WasmModule::from_bytes(bytes.clone()).unwrap();
        // sha256 of the 8-byte empty module, computed independently (`printf ... | sha256sum`).
        assert_eq!(
            m.sha256(),
            "93a44bbb96c751218e4c00d479e4c14358122a389acca16205b1e4d0dc5f9476"
        );
        bytes.push(0);
        let other = WasmModule::from_bytes(bytes).unwrap();
        assert_ne!(other.sha256(), m.sha256());
        assert_eq!(other.len(), 9);
    }

    #[test]
    fn serves_the_module_and_its_digest_only() {
        let m = WasmModule::from_bytes(WASM_HEADER.to_vec()).unwrap();
        let r = reply(&m, FILE_NAME).unwrap();
        assert_eq!(r.headers()["content-type"], "application/wasm");
        assert_eq!(r.headers()["x-sluice-sha256"], m.sha256());
        assert_eq!(r.headers()["etag"], format!("\"{}\"", m.sha256()));
        let r = reply(&m, &format!("{FILE_NAME}.sha256")).unwrap();
        assert_eq!(r.headers()["content-type"], "text/plain");
        for other in [
            "",
            "sluice_filter",
            "sluice_filter.wasm.md5",
            "x.wasm",
            "sluice_filter.wasmx",
        ] {
            assert!(reply(&m, other).is_none(), "{other}");
        }
    }

    #[test]
    fn refuses_what_is_not_a_module() {
        assert!(WasmModule::from_bytes(b"<html>".to_vec()).is_none());
        assert!(WasmModule::from_bytes(Vec::new()).is_none());
        // Version 2 of the binary format is not something Envoy loads.
        assert!(WasmModule::from_bytes(vec![0, 0x61, 0x73, 0x6d, 2, 0, 0, 0]).is_none());
        let dir = std::env::temp_dir().join(format!("sluice-wasm-module-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("x.wasm");
        std::fs::write(&p, b"not wasm").unwrap();
        let e = WasmModule::load(&p).map(|_| ()).unwrap_err();
        assert!(e.to_string().contains("not a WebAssembly module"), "{e}");
        let e = WasmModule::load(&dir.join("missing.wasm"))
            .map(|_| ())
            .unwrap_err();
        assert!(e.to_string().starts_with("--serve-wasm "), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
