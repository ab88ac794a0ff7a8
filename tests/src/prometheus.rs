//! A real Prometheus (Debian's package, installed by `scripts/setup.sh`) on loopback, scraping
//! Envoys' `/stats/prometheus` every second. Killed on drop.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::error::{io, Error, Result};
use crate::paths::free_port;
use crate::wait::wait_until;

/// A running Prometheus.
pub struct Prometheus {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

/// The Prometheus binary: `$PROMETHEUS_BIN`, else `prometheus` on `PATH`.
pub fn prometheus_bin() -> PathBuf {
    std::env::var_os("PROMETHEUS_BIN")
        .filter(|p| !p.is_empty())
        .map_or_else(|| PathBuf::from("prometheus"), PathBuf::from)
}

impl Prometheus {
    /// Starts Prometheus scraping the Envoy admin endpoints `targets` (`127.0.0.1:<port>`),
    /// and waits until it is ready.
    pub async fn start(targets: &[SocketAddr]) -> Result<Prometheus> {
        let dir = tempfile::tempdir().map_err(io("creating a temp dir for prometheus"))?;
        let port = free_port()?;
        let list = targets
            .iter()
            .map(|t| format!("'{t}'"))
            .collect::<Vec<_>>()
            .join(", ");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: envoy\n    metrics_path: /stats/prometheus\n    static_configs:\n      - targets: [{list}]\n"
        );
        std::fs::write(dir.path().join("prometheus.yml"), config)
            .map_err(io("writing prometheus.yml"))?;
        let child = spawn(dir.path(), port)?;
        let mut p = Prometheus { child, port, dir };
        p.wait_ready().await?;
        Ok(p)
    }

    /// Kills Prometheus (SIGKILL): its HTTP API is gone until [`Prometheus::resume`].
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts Prometheus again after [`Prometheus::kill`], on the same port and data.
    pub async fn resume(&mut self) -> Result<()> {
        self.kill();
        self.child = spawn(self.dir.path(), self.port)?;
        self.wait_ready().await
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let url = format!("{}/-/ready", self.url());
        wait_until(Duration::from_secs(30), "prometheus ready", || {
            let url = url.clone();
            async move {
                crate::client::HttpClient::new()
                    .get(&url)
                    .await
                    .is_ok_and(|r| r.status == 200)
            }
        })
        .await
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Prometheus's own log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }
}

/// Starts Prometheus on `dir`'s `prometheus.yml`, keeping its data and log in `dir`.
fn spawn(dir: &std::path::Path, port: u16) -> Result<Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("prometheus.log"))
        .map_err(io("opening prometheus.log"))?;
    let log_err = log.try_clone().map_err(io("cloning the log handle"))?;
    Command::new(prometheus_bin())
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .spawn()
        .map_err(|e| Error::Io {
            context: format!(
                "starting {} (install it with scripts/setup.sh)",
                prometheus_bin().display()
            ),
            source: e,
        })
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- prometheus log ---\n{}\n--- end ---", self.log());
        }
    }
}
