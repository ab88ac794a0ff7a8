//! Where a rollout's state and audit trail live: `<dir>/<name>.state.json` (replaced
//! atomically whenever it changes) and `<dir>/<name>.audit.jsonl` (one JSON object
//! per evaluation and per decision, appended and synced).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::Serialize;

use crate::durable::{off_thread, write_atomically};
use crate::rollout::State;

/// Failure reading or writing a rollout's files.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a rollout state file: {reason}")]
    Corrupt { path: String, reason: String },
}

/// One rollout's files.
#[derive(Debug, Clone)]
pub struct Store {
    state: PathBuf,
    audit: PathBuf,
    /// The state this store last wrote: an unchanged state is neither serialized nor written
    /// again (a rollout saves at every tick).
    saved: Arc<Mutex<Option<State>>>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.display().to_string(),
        source,
    }
}

impl Store {
    pub fn new(dir: &Path, name: &str) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        Ok(Store {
            state: dir.join(format!("{name}.state.json")),
            audit: dir.join(format!("{name}.audit.jsonl")),
            saved: Arc::default(),
        })
    }

    pub fn state_path(&self) -> &Path {
        &self.state
    }

    pub fn audit_path(&self) -> &Path {
        &self.audit
    }

    /// The saved state, or `None` for a rollout that never ran.
    pub fn load(&self) -> Result<Option<State>, StoreError> {
        match std::fs::read_to_string(&self.state) {
            Ok(text) => serde_json::from_str(&text)
                .map(Some)
                .map_err(|e| StoreError::Corrupt {
                    path: self.state.display().to_string(),
                    reason: e.to_string(),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&self.state)(e)),
        }
    }

    pub async fn save(&self, state: &State) -> Result<(), StoreError> {
        if self
            .saved
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            == Some(state)
        {
            return Ok(());
        }
        let text = serde_json::to_vec_pretty(state).map_err(|e| StoreError::Corrupt {
            path: self.state.display().to_string(),
            reason: e.to_string(),
        })?;
        let path = self.state.clone();
        off_thread(move || write_atomically(&path, &text))
            .await
            .map_err(io(&self.state))?;
        *self.saved.lock().unwrap_or_else(|p| p.into_inner()) = Some(state.clone());
        Ok(())
    }

    /// Appends one audit record and syncs it to disk.
    pub async fn audit(&self, record: &impl Serialize) -> Result<(), StoreError> {
        let mut line = serde_json::to_vec(record).map_err(|e| StoreError::Corrupt {
            path: self.audit.display().to_string(),
            reason: e.to_string(),
        })?;
        line.push(b'\n');
        let path = self.audit.clone();
        off_thread(move || {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)?;
            f.write_all(&line)?;
            f.sync_data()
        })
        .await
        .map_err(io(&self.audit))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn state_round_trips_and_audit_appends() {
        let dir = std::env::temp_dir().join(format!("sluice-store-{}", std::process::id()));
        let store = Store::new(&dir, "r").unwrap();
        assert!(matches!(store.load(), Ok(None)));
        let state = State::new("r", 5.0);
        assert!(store.save(&state).await.is_ok());
        assert_eq!(store.load().ok().flatten(), Some(state));
        for i in 0..3 {
            assert!(store.audit(&serde_json::json!({ "i": i })).await.is_ok());
        }
        let lines = std::fs::read_to_string(store.audit_path()).unwrap_or_default();
        assert_eq!(lines.lines().count(), 3);
        std::fs::write(dir.join("r.state.json"), "{").ok();
        assert!(matches!(store.load(), Err(StoreError::Corrupt { .. })));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
