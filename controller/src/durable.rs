//! Durable files: state and pushed configs are replaced atomically, so a reader (Envoy, or
//! the controller after a crash) sees the old content or the new, never a torn write.
//!
//! Writing them waits for the disk (`fsync`). The daemon runs every rollout on one thread, so
//! its writes go through [`off_thread`]: a slow disk delays the rollout that writes, never
//! the others' scrapes.

use std::path::Path;

/// Replaces `path` with `content` atomically (temp file in the same directory + rename).
pub fn write_atomically(path: &Path, content: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // A dot-name Envoy ignores until the rename makes it the watched file.
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(content)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    // Make the rename itself durable.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Runs file work that waits for the disk on tokio's blocking threads, and waits for it.
pub async fn off_thread<T: Send + 'static>(
    work: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_the_file() {
        let dir = std::env::temp_dir().join(format!("sluice-sink-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("sluice.yaml");
        for content in ["one", "two"] {
            assert!(write_atomically(&path, content.as_bytes()).is_ok());
            assert_eq!(
                std::fs::read_to_string(&path).ok().as_deref(),
                Some(content)
            );
        }
        let leftovers = std::fs::read_dir(&dir).map(|d| d.count()).unwrap_or(0);
        assert_eq!(leftovers, 1, "no temporary files left behind");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
