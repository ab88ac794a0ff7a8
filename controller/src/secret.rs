//! The filter's `secret` as the controller keeps it: read from `spec.secretFile`, or
//! generated once into the state directory and reused on every restart (a secret that changed
//! at each restart would void every exposure token the proxies had issued).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// Bytes of a generated secret (hex-encoded into twice as many characters).
const GENERATED_BYTES: usize = 32;

/// Where `sluice run` keeps the generated secret of rollout `name`.
pub fn state_path(state_dir: &Path, name: &str) -> PathBuf {
    state_dir.join(format!("{name}.secret"))
}

/// Why a secret could not be read or generated.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// Reading, writing or creating the directory of `path`.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The secret at `path` is not one the filter accepts.
    #[error("{}: {source}", path.display())]
    Invalid {
        path: PathBuf,
        source: sluice_filter::config::ConfigError,
    },
    #[error("reading /dev/urandom: {0}")]
    Random(std::io::Error),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SecretError + '_ {
    move |source| SecretError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A secret file's content, surrounding whitespace removed, checked as the filter checks it.
pub fn read(path: &Path) -> Result<String, SecretError> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    let secret = text.trim().to_string();
    sluice_filter::config::Secret::new("secret", &secret).map_err(|source| {
        SecretError::Invalid {
            path: path.to_path_buf(),
            source,
        }
    })?;
    Ok(secret)
}

/// The secret kept at `path`, generated there (mode 0600) if there is none yet.
pub fn read_or_generate(path: &Path) -> Result<String, SecretError> {
    if !path.exists() {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io(dir))?;
        }
        let mut bytes = [0u8; GENERATED_BYTES];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut bytes))
            .map_err(SecretError::Random)?;
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        match write_private(path, &hex) {
            Ok(()) => {}
            // Another process created it first: use theirs.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io(path)(e)),
        }
    }
    read(path)
}

/// Creates `path` readable by its owner only, never replacing an existing file.
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut f = options.open(path)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{Checked, Rollout, SECRET_PLACEHOLDER};

    fn spec(extra: &str) -> String {
        format!(
            r#"apiVersion: sluice.dev/v1alpha1
kind: Rollout
metadata: {{name: r}}
spec:
  experiment:
    name: r
    unit: {{type: user, keys: [{{header: x-user-id}}]}}
    variants: [{{name: stable, control: true}}, {{name: canary, weight: 0}}]
    outcomes: {{names: [click]}}
    beacon: {{path: /sluice/event}}
  sources: [{{envoyAdmin: {{endpoints: ["http://127.0.0.1:9901"]}}}}]
  sinks: [{{ecdsFile: {{path: /tmp/x.yaml, wasm: {{filename: f.wasm}}, proxies: ["http://127.0.0.1:9901"]}}}}]
{extra}"#
        )
    }

    /// A fresh empty directory (no tempfile crate in this package's dev-dependencies).
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            let p = std::env::temp_dir().join(format!(
                "sluice-secret-{tag}-{}-{nanos}",
                std::process::id()
            ));
            std::fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }

        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn parse(text: &str) -> Checked {
        Rollout::parse(text).unwrap()
    }

    #[test]
    fn generated_once_private_and_reused() {
        let dir = TempDir::new("gen");
        let mut c = parse(&spec(""));
        // Before `run` resolves it, renders carry the placeholder (and still validate).
        let shown = c.render(5.0).unwrap();
        assert_eq!(shown.secret.as_deref(), Some(SECRET_PLACEHOLDER));
        c.use_state_secret(dir.path()).unwrap();
        let first = c.secret.clone().unwrap_or_default();
        assert_eq!(first.len(), 2 * GENERATED_BYTES);
        let path = state_path(dir.path(), "r");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path)
                .map(|m| m.permissions().mode())
                .unwrap_or(0);
            assert_eq!(mode & 0o777, 0o600);
        }
        let pushed = c.render(5.0).unwrap();
        assert_eq!(pushed.secret.as_deref(), Some(first.as_str()));
        // A restart reads the same secret back.
        let mut again = parse(&spec(""));
        again.use_state_secret(dir.path()).unwrap();
        assert_eq!(again.secret.as_deref(), Some(first.as_str()));
        // Another state dir, another secret.
        let other = TempDir::new("other");
        let mut third = parse(&spec(""));
        third.use_state_secret(other.path()).unwrap();
        assert_ne!(third.secret.as_deref(), Some(first.as_str()));
    }

    #[test]
    fn a_secret_file_is_read_trimmed_and_checked() {
        let dir = TempDir::new("file");
        let file = dir.path().join("s");
        std::fs::write(&file, "0123456789abcdef0123\n").unwrap();
        let text = spec(&format!("  secretFile: {}\n", file.display()));
        let mut c = parse(&text);
        assert_eq!(c.secret.as_deref(), Some("0123456789abcdef0123"));
        c.use_state_secret(dir.path()).unwrap();
        assert_eq!(c.secret.as_deref(), Some("0123456789abcdef0123"));
        assert!(!state_path(dir.path(), "r").exists(), "nothing generated");

        std::fs::write(&file, "short").unwrap();
        let err = Rollout::parse(&text)
            .err()
            .map(|e| e.problems.join("; "))
            .unwrap_or_default();
        assert!(err.starts_with("spec.secretFile: "), "{err}");
        assert!(err.contains("secret: must be 16 to 256 bytes"), "{err}");
        let missing = spec("  secretFile: /nonexistent/secret\n");
        let err = Rollout::parse(&missing)
            .err()
            .map(|e| e.problems.join("; "))
            .unwrap_or_default();
        assert!(
            err.starts_with("spec.secretFile: /nonexistent/secret: "),
            "{err}"
        );
    }
}
