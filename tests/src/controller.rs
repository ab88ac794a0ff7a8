//! The controller as the tests run it: `sluice run` as a process, on a rollout spec written into
//! a temp dir that also holds its state directory and its log, with readers for what it leaves
//! behind (state file, audit log, `/status`). Killed on drop; the log is printed when a test
//! panics while it is alive.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::client::HttpClient;
use crate::error::{io, Error, Result};
use crate::paths::{free_port, sluice_bin};

/// A `sluice run` of one rollout spec (started by [`SluiceRun::start`], restartable).
pub struct SluiceRun {
    dir: tempfile::TempDir,
    /// `metadata.name` of the spec: names its state and audit files.
    name: String,
    spec: PathBuf,
    /// Its HTTP API (`--listen`).
    api: u16,
    child: Option<Child>,
}

impl SluiceRun {
    /// Writes `spec` (a rollout, as JSON, which is YAML) into a fresh temp dir; nothing runs yet.
    pub fn new(spec: &Value) -> Result<SluiceRun> {
        let dir = tempfile::tempdir().map_err(io("creating a temp dir"))?;
        let name = spec["metadata"]["name"]
            .as_str()
            .unwrap_or("rollout")
            .to_string();
        let path = dir.path().join(format!("{name}.yaml"));
        let text = serde_json::to_string_pretty(spec).map_err(|e| Error::Parse {
            what: "the rollout spec".into(),
            reason: e.to_string(),
        })?;
        std::fs::write(&path, text).map_err(io(format!("writing {}", path.display())))?;
        Ok(SluiceRun {
            dir,
            name,
            spec: path,
            api: free_port()?,
            child: None,
        })
    }

    /// Starts `sluice run <args> --state-dir <dir>/state --listen 127.0.0.1:<api> -f <spec>`,
    /// its output appended to `<dir>/sluice.log`.
    pub fn start(&mut self, args: &[&str]) -> Result<()> {
        let log_path = self.dir.path().join("sluice.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io(format!("opening {}", log_path.display())))?;
        let err = log.try_clone().map_err(io("cloning the log handle"))?;
        let child = Command::new(sluice_bin()?)
            .arg("run")
            .args(args)
            .arg("--state-dir")
            .arg(self.dir.path().join("state"))
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.api))
            .arg("-f")
            .arg(&self.spec)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(io("starting sluice run"))?;
        self.child = Some(child);
        Ok(())
    }

    /// The temp dir holding the spec, `state/` and `sluice.log`.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The port of its HTTP API.
    pub fn api(&self) -> u16 {
        self.api
    }

    /// Whether the process was started and has not exited.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGKILL, and reap it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The persisted state of the rollout (`Null` before there is one).
    pub fn state(&self) -> Value {
        std::fs::read_to_string(self.state_file("state.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(Value::Null)
    }

    /// The audit log's records, oldest first.
    pub fn audit(&self) -> Vec<Value> {
        std::fs::read_to_string(self.state_file("audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The weights pushed, in order, from the audit log.
    pub fn pushed_weights(&self) -> Vec<f64> {
        self.audit()
            .iter()
            .filter(|r| r["record"] == "push")
            .filter_map(|r| r["weight"].as_f64())
            .collect()
    }

    /// Everything the process wrote.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sluice.log")).unwrap_or_default()
    }

    /// `GET /status`, or `None` while it does not answer.
    pub async fn status(&self) -> Option<Value> {
        let url = format!("http://127.0.0.1:{}/status", self.api);
        HttpClient::new().get(&url).await.ok()?.json().ok()
    }

    /// Waits until the state file says `weight` is confirmed; the timeout error carries the
    /// state and the log.
    pub async fn at_weight(&self, weight: f64, within: Duration) -> Result<()> {
        crate::wait_until(within, &format!("weight {weight} confirmed"), || async {
            self.state()["weight"] == weight
        })
        .await
        .map_err(|e| Error::Timeout {
            what: format!("{e}\nstate: {}\n{}", self.state(), self.log()),
            waited: within,
            last: None,
        })
    }

    /// Waits for the process to exit by itself with `code` (killing it after `within`).
    pub async fn exited(&mut self, code: i32, within: Duration) -> Result<()> {
        let start = Instant::now();
        let Some(child) = self.child.as_mut() else {
            return Err(Error::Sluice("not running".into()));
        };
        loop {
            if let Some(status) = child.try_wait().map_err(io("waiting for sluice run"))? {
                self.child = None;
                if status.code() == Some(code) {
                    return Ok(());
                }
                return Err(Error::Sluice(format!(
                    "exited with {status}, expected {code}:\n{}",
                    self.log()
                )));
            }
            if start.elapsed() > within {
                self.kill();
                return Err(Error::Timeout {
                    what: format!("sluice run to exit with {code}:\n{}", self.log()),
                    waited: start.elapsed(),
                    last: None,
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn state_file(&self, suffix: &str) -> PathBuf {
        self.dir
            .path()
            .join("state")
            .join(format!("{}.{suffix}", self.name))
    }
}

impl Drop for SluiceRun {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("--- sluice log ---\n{}\n--- end ---", self.log());
        }
    }
}
