//! The demo's infrastructure: the run directory (copies of `envoy/demo-rollout.yaml` and its
//! ECDS directory with paths and ports rewritten), the Envoy process, and the rollout spec the
//! controller runs.
//!
//! The repository's files are never written: everything the run changes (the ECDS file the
//! controller replaces, the controller's state and audit log, Envoy's log, the report) lives in
//! the run directory, `.work/demo/` by default.
//!
//! ```text
//! <run>/envoy.yaml        Envoy's config, pointing at <run>/ecds/
//! <run>/ecds/sluice.yaml  the filter config Envoy watches; the controller's sink
//! <run>/rollout.yaml      the rollout spec (compressed schedule)
//! <run>/state/            the controller's state and audit log (wiped at each run)
//! <run>/envoy.log
//! ```

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::recorder::{get_text, http_client};

/// The shipped Envoy config and its ECDS directory, relative to the repository root.
pub const ENVOY_YAML: &str = "envoy/demo-rollout.yaml";
pub const ECDS_DIR: &str = "envoy/demo-rollout";
/// The wasm path as the shipped files write it.
const WASM_IN_YAML: &str = "target/wasm32-wasip1/release/sluice_filter.wasm";
/// The canary's weight as the shipped ECDS file writes it.
const CANARY_IN_YAML: &str = r#"{"name": "canary", "weight": 0}"#;

/// The experiment the demo rolls out, and its variants.
pub const EXPERIMENT: &str = "demo";
pub const CONTROL: &str = "stable";
pub const TREATMENT: &str = "canary";

/// Loopback ports of the demo.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ports {
    pub listener: u16,
    pub admin: u16,
    pub stable: u16,
    pub canary: u16,
    pub shadow: u16,
    /// The controller's HTTP endpoint (`/status`).
    pub controller: u16,
}

impl Default for Ports {
    fn default() -> Self {
        Ports {
            listener: 10000,
            admin: 9901,
            stable: 10001,
            canary: 10002,
            shadow: 10003,
            controller: 9400,
        }
    }
}

/// Why `--ports` was not understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortsError {
    #[error("{text:?}: {source}")]
    NotPort {
        text: String,
        source: std::num::ParseIntError,
    },
    #[error("give six ports (listener,admin,stable,canary,shadow,controller), got {0}")]
    Count(usize),
}

impl Ports {
    /// Every port moved by `offset`, to run beside another demo or the examples.
    pub fn offset(self, offset: u16) -> Ports {
        let o = |p: u16| p.saturating_add(offset);
        Ports {
            listener: o(self.listener),
            admin: o(self.admin),
            stable: o(self.stable),
            canary: o(self.canary),
            shadow: o(self.shadow),
            controller: o(self.controller),
        }
    }

    /// Six ports in the order listener, admin, stable, canary, shadow, controller, separated
    /// by commas (as `--ports` takes them).
    pub fn parse(text: &str) -> Result<Ports, PortsError> {
        let ports: Vec<u16> = text
            .split(',')
            .map(|p| {
                p.trim()
                    .parse::<u16>()
                    .map_err(|source| PortsError::NotPort {
                        text: p.to_string(),
                        source,
                    })
            })
            .collect::<Result<_, _>>()?;
        let [listener, admin, stable, canary, shadow, controller] = ports[..] else {
            return Err(PortsError::Count(ports.len()));
        };
        Ok(Ports {
            listener,
            admin,
            stable,
            canary,
            shadow,
            controller,
        })
    }

    pub fn listener_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.listener)
    }

    pub fn admin_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.admin)
    }

    pub fn controller_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.controller)
    }

    /// Fails naming the first port something else already listens on.
    pub fn check_free(&self) -> Result<(), StackError> {
        for (what, port) in [
            ("listener", self.listener),
            ("admin", self.admin),
            ("stable model", self.stable),
            ("canary model", self.canary),
            ("shadow model", self.shadow),
            ("controller", self.controller),
        ] {
            if TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port))).is_err() {
                return Err(StackError::PortBusy { what, port });
            }
        }
        Ok(())
    }
}

/// Failure to set up or run the demo's infrastructure.
#[derive(Debug, thiserror::Error)]
pub enum StackError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} does not contain {what:?}; was it edited?")]
    Template { path: String, what: String },
    #[error("the filter is not built: {0} is missing (run `cargo build -p sluice-filter --target wasm32-wasip1 --release`)")]
    WasmMissing(String),
    #[error("Envoy not found at {0} (run scripts/setup.sh, or set ENVOY_BIN)")]
    EnvoyMissing(String),
    #[error(
        "127.0.0.1:{port} ({what}) is in use; stop whatever listens there or pass --port-offset"
    )]
    PortBusy { what: &'static str, port: u16 },
    #[error("Envoy exited ({status}); last lines of {log}:\n{tail}")]
    EnvoyExited {
        status: String,
        log: String,
        tail: String,
    },
    #[error("Envoy was not ready after {0:?}; see its log")]
    EnvoyNotReady(Duration),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StackError + '_ {
    move |source| StackError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// The repository root this binary was built from.
pub fn repo_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// `$ENVOY_BIN`, else `<repo>/.venv/bin/envoy` (installed by `scripts/setup.sh`).
pub fn envoy_bin(repo: &Path) -> Result<PathBuf, StackError> {
    let path = std::env::var_os("ENVOY_BIN")
        .filter(|p| !p.is_empty())
        .map_or_else(|| repo.join(".venv/bin/envoy"), PathBuf::from);
    if path.is_file() {
        Ok(path)
    } else {
        Err(StackError::EnvoyMissing(path.display().to_string()))
    }
}

/// The release build of the filter: under `$CARGO_TARGET_DIR` if set and built there, else
/// under `<repo>/target`.
pub fn filter_wasm(repo: &Path) -> Result<PathBuf, StackError> {
    let rel = Path::new("wasm32-wasip1/release/sluice_filter.wasm");
    let mut candidates = Vec::new();
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR").filter(|d| !d.is_empty()) {
        let dir = PathBuf::from(dir);
        candidates.push(
            if dir.is_absolute() {
                dir
            } else {
                repo.join(dir)
            }
            .join(rel),
        );
    }
    candidates.push(repo.join("target").join(rel));
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| {
            StackError::WasmMissing(candidates[candidates.len() - 1].display().to_string())
        })
}

/// The prepared run directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunDir {
    pub root: PathBuf,
    pub envoy_yaml: PathBuf,
    pub ecds_dir: PathBuf,
    /// The file Envoy watches and the controller replaces.
    pub ecds_file: PathBuf,
    pub wasm: PathBuf,
    pub state_dir: PathBuf,
    pub envoy_log: PathBuf,
    pub ports: Ports,
}

impl RunDir {
    /// The controller's audit log for the demo's rollout.
    pub fn audit_log(&self) -> PathBuf {
        self.state_dir.join(format!("{EXPERIMENT}.audit.jsonl"))
    }

    pub fn rollout_spec(&self) -> PathBuf {
        self.root.join("rollout.yaml")
    }
}

fn replace_checked(text: &str, from: &str, to: &str, path: &Path) -> Result<String, StackError> {
    if !text.contains(from) {
        return Err(StackError::Template {
            path: path.display().to_string(),
            what: from.to_string(),
        });
    }
    Ok(text.replace(from, to))
}

/// Replaces the number after every `port_value:` found in `map`; the rest is kept as is.
pub fn rewrite_ports(yaml: &str, map: &[(u16, u16)]) -> String {
    let key = "port_value:";
    let mut out = String::with_capacity(yaml.len());
    let mut rest = yaml;
    while let Some(i) = rest.find(key) {
        let (head, tail) = rest.split_at(i + key.len());
        out.push_str(head);
        let spaces = tail.len() - tail.trim_start_matches(' ').len();
        out.push_str(&tail[..spaces]);
        let digits = tail[spaces..]
            .chars()
            .take_while(char::is_ascii_digit)
            .count();
        let number = &tail[spaces..spaces + digits];
        match number
            .parse::<u16>()
            .ok()
            .and_then(|p| map.iter().find(|(from, _)| *from == p))
        {
            Some((_, to)) => out.push_str(&to.to_string()),
            None => out.push_str(number),
        }
        rest = &tail[spaces + digits..];
    }
    out.push_str(rest);
    out
}

/// Copies the shipped Envoy config and ECDS directory into `root` with paths and ports
/// rewritten, the canary at `canary_weight` (0 for a rollout, which starts there), and a fresh
/// state directory.
pub fn prepare(
    repo: &Path,
    root: &Path,
    wasm: &Path,
    ports: Ports,
    canary_weight: f64,
) -> Result<RunDir, StackError> {
    let root = if root.is_absolute() {
        root.to_path_buf()
    } else {
        std::env::current_dir().map_err(io(root))?.join(root)
    };
    let ecds_dir = root.join("ecds");
    let state_dir = root.join("state");
    for dir in [&ecds_dir, &state_dir] {
        // A previous run's state would make the controller resume instead of starting over.
        if dir.exists() {
            std::fs::remove_dir_all(dir).map_err(io(dir))?;
        }
        std::fs::create_dir_all(dir).map_err(io(dir))?;
    }
    let wasm_abs = wasm.display().to_string();

    let yaml_src = repo.join(ENVOY_YAML);
    let yaml = std::fs::read_to_string(&yaml_src).map_err(io(&yaml_src))?;
    let yaml = replace_checked(&yaml, ECDS_DIR, &ecds_dir.display().to_string(), &yaml_src)?;
    let defaults = Ports::default();
    let yaml = rewrite_ports(
        &yaml,
        &[
            (defaults.listener, ports.listener),
            (defaults.admin, ports.admin),
            (defaults.stable, ports.stable),
            (defaults.canary, ports.canary),
            (defaults.shadow, ports.shadow),
        ],
    );
    let envoy_yaml = root.join("envoy.yaml");
    std::fs::write(&envoy_yaml, yaml).map_err(io(&envoy_yaml))?;

    let ecds_src = repo.join(ECDS_DIR).join("sluice.yaml");
    let ecds = std::fs::read_to_string(&ecds_src).map_err(io(&ecds_src))?;
    let ecds = replace_checked(&ecds, WASM_IN_YAML, &wasm_abs, &ecds_src)?;
    let ecds = replace_checked(
        &ecds,
        CANARY_IN_YAML,
        &format!(r#"{{"name": "canary", "weight": {canary_weight}}}"#),
        &ecds_src,
    )?;
    let ecds_file = ecds_dir.join("sluice.yaml");
    std::fs::write(&ecds_file, ecds).map_err(io(&ecds_file))?;

    Ok(RunDir {
        envoy_yaml,
        ecds_file,
        ecds_dir,
        wasm: wasm.to_path_buf(),
        envoy_log: root.join("envoy.log"),
        state_dir,
        root,
        ports,
    })
}

/// The demo's compressed schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    pub stages: Vec<f64>,
    pub bake: Duration,
    pub warmup: Duration,
    pub interval: Duration,
    /// A shadow stage of this length first, with copies to the shadow model.
    pub shadow: Option<Duration>,
    /// The experiment's `breaker` section (see `filter/README.md`); `None`: no breaker.
    #[serde(default)]
    pub breaker: Option<serde_json::Value>,
}

impl Default for Schedule {
    /// About two minutes end to end at the default load: six stages of ≈ 15 s.
    fn default() -> Self {
        Schedule {
            stages: vec![1.0, 5.0, 10.0, 25.0, 50.0, 100.0],
            bake: Duration::from_secs(12),
            warmup: Duration::from_secs(3),
            interval: Duration::from_secs(2),
            shadow: None,
            breaker: Some(breaker_json(
                DEMO_BREAKER_MIN_REQUESTS,
                DEMO_BREAKER_MAX_ERROR_RATE,
            )),
        }
    }
}

/// The demo's breaker: fewest canary requests in the window before it can trip.
pub const DEMO_BREAKER_MIN_REQUESTS: u64 = 50;

/// The demo's breaker: the canary's failure rate must exceed this (and 3 × stable's). Below
/// the filter's default of 5 %, so the error spike's 20 % of 500s trips it within a few
/// seconds at the 10 % stage (≈ 30 canary requests per second), before the judge, which
/// first needs post-warm-up evidence, fails it (the scenario test checks the order).
pub const DEMO_BREAKER_MAX_ERROR_RATE: f64 = 0.03;

/// A `breaker` section: a 10 s window, the control ratio 3 and the default significance.
pub fn breaker_json(min_requests: u64, max_error_rate: f64) -> serde_json::Value {
    serde_json::json!({
        "window_seconds": 10,
        "min_requests": min_requests,
        "max_error_rate": max_error_rate,
        "max_ratio_to_control": 3.0,
    })
}

/// The experiment as in the shipped ECDS file, plus a shadow section when `shadow` is set.
pub fn experiment_json(shadow: bool) -> serde_json::Value {
    let mut e = serde_json::json!({
        "name": EXPERIMENT,
        "unit": {"type": "user", "keys": [{"header": "x-user-id"}]},
        "variants": [{"name": CONTROL, "control": true}, {"name": TREATMENT, "weight": 0}],
        "match": {"path_prefix": "/predict"},
        "echo": {"header": "x-sluice-variant"},
        "outcomes": {"names": ["click", "purchase"]},
        "beacon": {"path": "/sluice/event"},
        "prediction": {"header": "x-model-score"},
    });
    if shadow {
        e["shadow"] = serde_json::json!({
            "cluster": "shadow",
            "sample_percent": 50,
            "variants": [CONTROL],
            "timeout_ms": 1000,
            "methods": ["GET", "POST"],
            "compare": {
                "body": false,
                "fields": [
                    {"name": "score", "pointer": "/score", "type": "number", "abs_tolerance": 0.05},
                    {"name": "label", "pointer": "/label", "type": "string"}
                ]
            }
        });
    }
    e
}

fn secs(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// The judge's configuration for the demo (`docs/statistics.md`), tuned to its scale: a few
/// hundred requests per second and stages of a dozen seconds, where the defaults (tuned for
/// hours of traffic, see `sluice plan`) could neither promote nor roll back within the run.
///
/// - `promotion: noBreach`: a 10-second stage proves nothing within the default margins, so a
///   stage passes once it has [`MIN_REQUESTS`] per variant and no guardrail is breached. The
///   harm side is unchanged: always-valid tests at α = 1 % over the whole rollout, Holm across
///   the statistical guardrails, a breach sustained over 2 consecutive evaluations (the
///   default is 3; the false-rollback bound holds for any number, more only adds delay).
/// - Margins are the effects the demo's faults are sized for; they tune each test's mixture
///   (a mixture tuned for a tiny effect is slow to flag a large one):
///   errors +1 point, slow shares +20 % (p50) and +1 point (p99), clicks −20 %.
/// - Hard gates that act at once, on this stage's canary alone: 5xx share at most 2 % (ten
///   times the models' normal 0.2 %) and a p99 SLO of 400 ms.
/// - Drift is critical (a drifting model rolls back) and judged on at least [`MIN_REQUESTS`]
///   predictions per variant. PSI is off: it has no allowance for sampling noise, and with 60
///   predictions in 20 buckets its value under no drift is already about 0.3. The KS distance
///   (beyond its DKW noise band) and the mean shift (beyond ±25 %) catch a shifted model.
/// - SRM halts at e ≥ 1000 (`srm.alpha` 0.001), the default.
pub fn guardrails_json() -> serde_json::Value {
    serde_json::json!({
        "alpha": 0.01,
        "consecutive": 2,
        "minRequests": MIN_REQUESTS,
        "promotion": "noBreach",
        "errorRate": {"margin": {"relative": 0.5, "absolute": 0.01}, "ceiling": 0.02},
        "latency": {"quantiles": [
            {"quantile": 0.5, "margin": {"relative": 0.2}},
            {"quantile": 0.99, "margin": {"relative": 0.5, "absolute": 0.005}, "sloMs": 400},
        ]},
        "business": [{"outcome": "click", "margin": {"relative": 0.2}}],
        "drift": {
            "critical": true,
            "minCount": MIN_REQUESTS,
            "maxPsi": null,
            "maxKs": 0.1,
            "maxMeanShift": 0.25,
        },
        "srm": {"alpha": 0.001},
    })
}

/// Requests (and predictions) per variant a stage needs before it can pass. At the default
/// 300 requests per second the 1 % stage gathers them in about 20 s.
pub const MIN_REQUESTS: u64 = 60;

/// The rollout spec for the demo (`docs/rollout.md`), as YAML. The experiment and the
/// guardrails ([`guardrails_json`]) are embedded as JSON, which YAML accepts as flow mappings.
pub fn rollout_spec(run: &RunDir, schedule: &Schedule) -> String {
    let admin = run.ports.admin_url();
    let stages: Vec<String> = schedule.stages.iter().map(|w| format!("{w}")).collect();
    let mut spec = format!(
        "# Written by sluice-demo for this run; see docs/rollout.md.\n\
         apiVersion: sluice.dev/v1alpha1\n\
         kind: Rollout\n\
         metadata:\n  name: {EXPERIMENT}\n\
         spec:\n  experiment: {experiment}\n  treatment: {TREATMENT}\n\
         \x20 schedule:\n    stages: [{stages}]\n    bake: {bake}\n    warmup: {warmup}\n    interval: {interval}\n",
        experiment = {
            let mut e = experiment_json(schedule.shadow.is_some());
            if let Some(b) = &schedule.breaker {
                e["breaker"] = b.clone();
            }
            e
        },
        stages = stages.join(", "),
        bake = secs(schedule.bake),
        warmup = secs(schedule.warmup),
        interval = secs(schedule.interval),
    );
    if let Some(d) = schedule.shadow {
        spec.push_str(&format!("  shadow: {{duration: {}}}\n", secs(d)));
    }
    spec.push_str(&format!(
        "  guardrails: {guardrails}\n\
         \x20 sources:\n    - envoyAdmin: {{endpoints: [\"{admin}\"], timeout: 2s}}\n\
         \x20 sinks:\n    - ecdsFile:\n        path: {path}\n        resource: sluice\n        wasm: {{filename: {wasm}}}\n        proxies: [\"{admin}\"]\n        confirmWithin: 10s\n",
        guardrails = guardrails_json(),
        path = serde_json::Value::String(run.ecds_file.display().to_string()),
        wasm = serde_json::Value::String(run.wasm.display().to_string()),
    ));
    spec
}

/// A running Envoy; killed when dropped.
pub struct EnvoyProcess {
    child: Child,
    log: PathBuf,
}

impl EnvoyProcess {
    /// Starts Envoy on the run directory's config and waits until admin `/ready` says `LIVE`.
    pub async fn start(
        envoy: &Path,
        run: &RunDir,
        timeout: Duration,
    ) -> Result<EnvoyProcess, StackError> {
        let log = std::fs::File::create(&run.envoy_log).map_err(io(&run.envoy_log))?;
        let log2 = log.try_clone().map_err(io(&run.envoy_log))?;
        let child = Command::new(envoy)
            .arg("-c")
            .arg(&run.envoy_yaml)
            .args([
                "--concurrency",
                "2",
                "-l",
                "warning",
                "--disable-hot-restart",
            ])
            // Distinct shared-memory names from any other Envoy on the box.
            .args([
                "--base-id",
                &(std::process::id() % 60_000 + 1000).to_string(),
            ])
            .current_dir(&run.root)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(io(envoy))?;
        let mut process = EnvoyProcess {
            child,
            log: run.envoy_log.clone(),
        };
        let client = http_client();
        let ready = format!("{}/ready", run.ports.admin_url());
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = process.child.try_wait() {
                return Err(StackError::EnvoyExited {
                    status: status.to_string(),
                    log: process.log.display().to_string(),
                    tail: process.log_tail(30),
                });
            }
            if let Some(body) = get_text(&client, &ready, Duration::from_secs(1)).await {
                if body.trim() == "LIVE" {
                    return Ok(process);
                }
            }
            if started.elapsed() > timeout {
                return Err(StackError::EnvoyNotReady(timeout));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for EnvoyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_parse_in_order() {
        let p = Ports::parse("1,2,3,4,5,6").unwrap_or_default();
        assert_eq!((p.listener, p.admin, p.canary, p.controller), (1, 2, 4, 6));
        assert_eq!(Ports::parse("1,2,3"), Err(PortsError::Count(3)));
        let bad = Ports::parse("1,2,3,4,5,x").map_err(|e| e.to_string());
        assert!(
            matches!(&bad, Err(e) if e.starts_with("\"x\": ")),
            "{bad:?}"
        );
    }

    #[test]
    fn ports_are_rewritten_exactly() {
        let yaml = "a: { port_value: 10000 }\nb:\n  port_value: 10001\nc: {port_value: 100001}\n";
        assert_eq!(
            rewrite_ports(yaml, &[(10000, 20000), (10001, 20001)]),
            "a: { port_value: 20000 }\nb:\n  port_value: 20001\nc: {port_value: 100001}\n"
        );
    }

    #[test]
    fn run_dir_is_a_rewritten_copy_and_the_spec_loads() {
        let tmp = tempfile::tempdir().unwrap();
        let wasm = tmp.path().join("f.wasm");
        std::fs::write(&wasm, b"\0asm").ok();
        let ports = Ports::default().offset(1000);
        let run = prepare(&repo_root(), &tmp.path().join("run"), &wasm, ports, 7.5).unwrap();
        let yaml = std::fs::read_to_string(&run.envoy_yaml).unwrap_or_default();
        for p in [11000, 10901, 11001, 11002, 11003] {
            assert!(yaml.contains(&format!("port_value: {p} ")), "{p}");
        }
        assert!(!yaml.contains("port_value: 10001"));
        assert!(yaml.contains(&run.ecds_dir.display().to_string()));
        let ecds = std::fs::read_to_string(&run.ecds_file).unwrap_or_default();
        assert!(ecds.contains(&wasm.display().to_string()));
        assert!(ecds.contains(r#"{"name": "canary", "weight": 7.5}"#));

        // The spec the controller will run is valid, with the shadow stage and without.
        for shadow in [None, Some(Duration::from_secs(15))] {
            let schedule = Schedule {
                shadow,
                ..Schedule::default()
            };
            let text = rollout_spec(&run, &schedule);
            assert!(text.contains(r#""breaker":{"#), "{text}");
            let checked = sluice_controller::spec::Rollout::parse(&text);
            assert!(
                checked.is_ok(),
                "{text}\n{:?}",
                checked.err().map(|e| e.problems)
            );
        }
    }
}
