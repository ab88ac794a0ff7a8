//! Running a real Envoy from one of the repository's YAML files.
//!
//! The shipped examples use fixed ports (`10000`, `9901`, ...), a wasm path relative to the
//! repository root and, for ECDS, a watched directory inside the repository. Tests run in
//! parallel from another working directory, so [`EnvoyConfig`] rewrites a copy of the file:
//!
//! - every `port_value: N` (N ≠ 0) becomes a fresh free port, the same one everywhere N appears
//!   (so a cluster pointing at a listener of the same Envoy still does), unless
//!   [`EnvoyConfig::port_to`] maps N to a given port (e.g. one of our [`crate::Upstream`]s);
//! - every relative `filename: ….wasm` becomes absolute under the repository root (or the file
//!   given to [`EnvoyConfig::wasm`]), and must exist;
//! - with [`EnvoyConfig::ecds`], the watched directory is copied to the temp dir (with the same
//!   wasm rewriting) and the YAML's references to it point there;
//! - then any literal replacements given with [`EnvoyConfig::replace`].
//!
//! The result goes to a fresh temp dir together with Envoy's log (stdout and stderr), and Envoy
//! runs with `--concurrency 1` (configurable), `-l warning`, hot restart disabled and a unique
//! `--base-id`. [`EnvoyConfig::start`] returns once admin `/ready` says `LIVE`; [`Envoy`] kills
//! the process on drop and, if the test is panicking, prints the log's tail first.

use std::collections::BTreeMap;
use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::admin::Admin;
use crate::error::{io, Error, Result};
use crate::paths::{envoy_bin, free_port, repo_root};

/// How to start (or validate) an Envoy from a YAML file. See the module docs for the rewriting.
#[derive(Debug, Clone)]
pub struct EnvoyConfig {
    source: PathBuf,
    ports: BTreeMap<u16, u16>,
    wasm: Option<PathBuf>,
    ecds: Option<String>,
    replacements: Vec<(String, String)>,
    concurrency: u32,
    log_level: String,
    ready_timeout: Duration,
    args: Vec<String>,
    node: Option<String>,
    cwd: Option<PathBuf>,
}

impl EnvoyConfig {
    /// A config from `yaml`, a path absolute or relative to the repository root
    /// (e.g. `"envoy/demo.yaml"`).
    pub fn new(yaml: impl AsRef<Path>) -> Self {
        let yaml = yaml.as_ref();
        Self {
            source: if yaml.is_absolute() {
                yaml.to_path_buf()
            } else {
                repo_root().join(yaml)
            },
            ports: BTreeMap::new(),
            wasm: None,
            ecds: None,
            replacements: Vec::new(),
            concurrency: 1,
            log_level: "warning".into(),
            ready_timeout: Duration::from_secs(30),
            args: Vec::new(),
            node: None,
            cwd: None,
        }
    }

    /// Runs Envoy as node `id` of cluster `cluster` (`--service-node`, `--service-cluster`,
    /// which override the bootstrap's `node`): several Envoys started from one fleet bootstrap
    /// are told apart by an xDS server this way.
    pub fn node(mut self, id: &str, cluster: &str) -> Self {
        self.node = Some(id.into());
        self.args.extend([
            "--service-node".into(),
            id.into(),
            "--service-cluster".into(),
            cluster.into(),
        ]);
        self
    }

    /// Maps `port_value: original` to `to` instead of a fresh port — typically to point a
    /// cluster at an [`crate::Upstream`] (`.port_to(10001, stable.port())`).
    pub fn port_to(mut self, original: u16, to: u16) -> Self {
        self.ports.insert(original, to);
        self
    }

    /// Loads this wasm file wherever the YAML names a `.wasm` file (e.g. the no-op filter).
    pub fn wasm(mut self, path: impl Into<PathBuf>) -> Self {
        self.wasm = Some(path.into());
        self
    }

    /// Copies the ECDS watched directory `dir` (as written in the YAML, relative to the
    /// repository root, e.g. `"envoy/ecds"`) to the temp dir and points the YAML there, so a test
    /// can push new filter configs with [`Envoy::write_ecds`] without touching the repository.
    pub fn ecds(mut self, dir: &str) -> Self {
        self.ecds = Some(dir.trim_end_matches('/').to_string());
        self
    }

    /// Replaces a literal string in the YAML (after the other rewriting), e.g. a filter config.
    pub fn replace(mut self, from: &str, to: &str) -> Self {
        self.replacements.push((from.into(), to.into()));
        self
    }

    /// Envoy worker threads (default 1).
    pub fn concurrency(mut self, n: u32) -> Self {
        self.concurrency = n;
        self
    }

    /// Envoy log level (default `warning`).
    pub fn log_level(mut self, level: &str) -> Self {
        self.log_level = level.into();
        self
    }

    /// How long [`EnvoyConfig::start`] waits for `/ready` (default 30 s: a loaded 2-core box
    /// compiling a wasm module with V8 can be slow).
    pub fn ready_timeout(mut self, timeout: Duration) -> Self {
        self.ready_timeout = timeout;
        self
    }

    /// An extra Envoy command-line argument.
    pub fn arg(mut self, arg: &str) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Runs Envoy in `dir` instead of the repository root: relative paths in configurations
    /// pushed to it later (e.g. a wasm `filename`) are resolved there, so Envoys of one fleet
    /// can be given different files under the same name.
    pub fn cwd(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cwd = Some(dir.into());
        self
    }

    /// Writes the rewritten config (and ECDS copy) into `dir`; returns the config's path and the
    /// final port map.
    fn render_into(&self, dir: &Path) -> Result<(PathBuf, BTreeMap<u16, u16>, Option<PathBuf>)> {
        let cfg_err = |reason: String| Error::Config {
            path: self.source.clone(),
            reason,
        };
        let yaml = fs::read_to_string(&self.source)
            .map_err(io(format!("reading {}", self.source.display())))?;

        let mut ports = self.ports.clone();
        for p in port_values(&yaml) {
            if p != 0 && !ports.contains_key(&p) {
                ports.insert(p, free_port()?);
            }
        }
        let mut yaml = rewrite_ports(&yaml, &ports);
        yaml = self.rewrite_wasm(&yaml)?;

        let ecds_dir = match &self.ecds {
            None => None,
            Some(rel) => {
                let from = repo_root().join(rel);
                let to = dir.join("ecds");
                fs::create_dir_all(&to).map_err(io(format!("creating {}", to.display())))?;
                let entries =
                    fs::read_dir(&from).map_err(io(format!("reading {}", from.display())))?;
                for entry in entries {
                    let entry = entry.map_err(io(format!("reading {}", from.display())))?;
                    if !entry.path().is_file() {
                        continue;
                    }
                    let text = fs::read_to_string(entry.path())
                        .map_err(io(format!("reading {}", entry.path().display())))?;
                    let text = self.rewrite_wasm(&text)?;
                    let dest = to.join(entry.file_name());
                    fs::write(&dest, text).map_err(io(format!("writing {}", dest.display())))?;
                }
                if !yaml.contains(rel.as_str()) {
                    return Err(cfg_err(format!(
                        "does not mention the ECDS directory {rel}"
                    )));
                }
                yaml = yaml.replace(rel.as_str(), &to.to_string_lossy());
                Some(to)
            }
        };

        for (from, to) in &self.replacements {
            if !yaml.contains(from.as_str()) {
                // A replacement that silently does nothing is a test that tests something else.
                return Err(cfg_err(format!("replacement target {from:?} not found")));
            }
            yaml = yaml.replace(from.as_str(), to);
        }
        let path = dir.join("envoy.yaml");
        fs::write(&path, yaml).map_err(io(format!("writing {}", path.display())))?;
        Ok((path, ports, ecds_dir))
    }

    fn rewrite_wasm(&self, yaml: &str) -> Result<String> {
        rewrite_wasm_paths(yaml, &repo_root(), self.wasm.as_deref())
    }

    /// Runs `envoy --mode validate` on the rewritten config.
    pub fn validate(&self) -> Result<()> {
        let dir = tempfile::tempdir().map_err(io("creating temp dir"))?;
        let (path, _, _) = self.render_into(dir.path())?;
        let output = Command::new(envoy_bin()?)
            .args([
                "--mode",
                "validate",
                "-l",
                "error",
                "--disable-hot-restart",
                "-c",
            ])
            .arg(&path)
            .output()
            .map_err(io("running envoy --mode validate"))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(Error::Invalid {
                path: self.source.clone(),
                output: format!(
                    "{}{}",
                    String::from_utf8_lossy(&output.stdout),
                    String::from_utf8_lossy(&output.stderr)
                ),
            })
        }
    }

    /// Starts Envoy and waits until it is ready.
    pub async fn start(self) -> Result<Envoy> {
        let dir = tempfile::Builder::new()
            .prefix("sluice-envoy-")
            .tempdir()
            .map_err(io("creating temp dir"))?;
        let (config, ports, ecds_dir) = self.render_into(dir.path())?;
        let log_path = dir.path().join("envoy.log");
        let child = self.spawn(&config, dir.path(), &log_path)?;
        let mut envoy = Envoy {
            child,
            dir,
            log_path,
            config,
            ports,
            ecds_dir,
            admin: None,
            launch: self,
        };
        envoy.wait_ready().await?;
        Ok(envoy)
    }

    /// Spawns Envoy on the rendered `config`; its log is appended to `log_path`.
    fn spawn(&self, config: &Path, dir: &Path, log_path: &Path) -> Result<Child> {
        let envoy = envoy_bin()?;
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)
            .map_err(io("opening envoy.log"))?;
        let log2 = log.try_clone().map_err(io("cloning log handle"))?;
        let _ = fs::remove_file(dir.join(ADMIN_ADDRESS_FILE));
        Command::new(&envoy)
            .arg("-c")
            .arg(config)
            .args(["--concurrency", &self.concurrency.to_string()])
            .args(["-l", &self.log_level])
            .arg("--disable-hot-restart")
            .args(["--base-id", &unique_base_id().to_string()])
            .arg("--admin-address-path")
            .arg(dir.join(ADMIN_ADDRESS_FILE))
            .args(&self.args)
            .current_dir(self.cwd.clone().unwrap_or_else(repo_root))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(io(format!("starting {}", envoy.display())))
    }
}

/// Where Envoy writes its admin address once the admin listener is bound.
const ADMIN_ADDRESS_FILE: &str = "admin-address";

/// Validates a YAML file (path relative to the repository root) with the standard rewriting.
pub fn validate(yaml: impl AsRef<Path>) -> Result<()> {
    EnvoyConfig::new(yaml).validate()
}

/// A running Envoy. Killed when dropped.
pub struct Envoy {
    child: Child,
    dir: tempfile::TempDir,
    log_path: PathBuf,
    config: PathBuf,
    ports: BTreeMap<u16, u16>,
    ecds_dir: Option<PathBuf>,
    admin: Option<Admin>,
    /// How it was started, for [`Envoy::restart`].
    launch: EnvoyConfig,
}

impl Envoy {
    /// Kills Envoy (SIGKILL) if it runs and starts it again with the same config, ports and
    /// ECDS directory — whatever was last pushed there is what the new process loads. All of its
    /// counters start from zero.
    pub async fn restart(&mut self) -> Result<()> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.admin = None;
        self.child = self
            .launch
            .spawn(&self.config, self.dir.path(), &self.log_path)?;
        self.wait_ready().await
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let admin_path = self.dir.path().join(ADMIN_ADDRESS_FILE);
        let timeout = self.launch.ready_timeout;
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().map_err(io("polling envoy"))? {
                return Err(Error::EnvoyExited {
                    status: status.to_string(),
                    log_tail: self.log_tail(40),
                });
            }
            if self.admin.is_none() {
                // Envoy writes the file once its admin listener is bound.
                if let Ok(text) = fs::read_to_string(&admin_path) {
                    if let Ok(addr) = text.trim().parse::<SocketAddr>() {
                        self.admin = Some(Admin::new(addr));
                    }
                }
            }
            if let Some(admin) = &self.admin {
                if admin.ready().await {
                    return Ok(());
                }
            }
            if start.elapsed() >= timeout {
                return Err(Error::EnvoyNotReady {
                    waited: start.elapsed(),
                    log_tail: self.log_tail(40),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The admin client.
    pub fn admin(&self) -> &Admin {
        self.admin
            .as_ref()
            .expect("`start` returns only once the admin address is known")
    }

    /// The port that replaced `original` in the config. Panics if the config had no such port,
    /// which is a mistake in the test.
    pub fn port(&self, original: u16) -> u16 {
        match self.ports.get(&original) {
            Some(p) => *p,
            None => panic!(
                "port {original} is not in {} (ports: {:?})",
                self.config.display(),
                self.ports
            ),
        }
    }

    /// `127.0.0.1:<port(original)>`.
    pub fn addr(&self, original: u16) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port(original)))
    }

    /// `http://127.0.0.1:<port(original)><path>`.
    pub fn url(&self, original: u16, path: &str) -> String {
        format!("http://{}{}", self.addr(original), path)
    }

    /// The node id given with [`EnvoyConfig::node`].
    pub fn node_id(&self) -> Option<&str> {
        self.launch.node.as_deref()
    }

    /// Kills Envoy (SIGKILL) and leaves it stopped until [`Envoy::restart`].
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.admin = None;
    }

    /// Envoy's process id (for CPU accounting from `/proc`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The temp dir holding the rewritten config, the log and the ECDS copy.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The rewritten config Envoy runs with.
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// The copied ECDS watched directory, if [`EnvoyConfig::ecds`] was used.
    pub fn ecds_dir(&self) -> Option<&Path> {
        self.ecds_dir.as_deref()
    }

    /// Replaces `name` in the ECDS directory atomically (write a temp file, rename over) — the
    /// way Envoy's watched-directory reload expects. Relative `.wasm` paths are made absolute.
    pub fn write_ecds(&self, name: &str, contents: &str) -> Result<()> {
        let path = self.ecds_file(name)?;
        let contents = rewrite_wasm_paths(contents, &repo_root(), None)?;
        let tmp = path.with_file_name(format!(".{name}.tmp"));
        fs::write(&tmp, contents).map_err(io(format!("writing {}", tmp.display())))?;
        fs::rename(&tmp, &path).map_err(io(format!("renaming onto {name}")))
    }

    /// The path of `name` in the copied ECDS directory; an error without [`EnvoyConfig::ecds`].
    pub fn ecds_file(&self, name: &str) -> Result<PathBuf> {
        match &self.ecds_dir {
            Some(dir) => Ok(dir.join(name)),
            None => Err(Error::Config {
                path: self.config.clone(),
                reason: "no ECDS directory: start it with EnvoyConfig::ecds".into(),
            }),
        }
    }

    /// Envoy's whole log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The last `lines` lines of Envoy's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- envoy log tail ({}) ---\n{}\n--- end of envoy log ---",
                self.config.display(),
                self.log_tail(40)
            );
        }
    }
}

/// A base id no other Envoy started by this process, or (very likely) by another test process,
/// uses. Hot restart is disabled anyway, so this is belt and braces for shared-memory names.
fn unique_base_id() -> u32 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    (std::process::id() % 100_000) * 100 + NEXT.fetch_add(1, Ordering::Relaxed) % 100
}

/// Every number following `port_value:` in `yaml`.
fn port_values(yaml: &str) -> Vec<u16> {
    let mut out = Vec::new();
    let mut rest = yaml;
    while let Some(i) = rest.find("port_value:") {
        rest = &rest[i + "port_value:".len()..];
        let digits: String = rest
            .trim_start()
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        if let Ok(p) = digits.parse() {
            out.push(p);
        }
    }
    out
}

/// Replaces the numbers after `port_value:` according to `map`; other text is kept byte for byte.
fn rewrite_ports(yaml: &str, map: &BTreeMap<u16, u16>) -> String {
    let mut out = String::with_capacity(yaml.len());
    let mut rest = yaml;
    while let Some(i) = rest.find("port_value:") {
        let head_end = i + "port_value:".len();
        out.push_str(&rest[..head_end]);
        rest = &rest[head_end..];
        let spaces = rest.len() - rest.trim_start_matches([' ', '\t']).len();
        out.push_str(&rest[..spaces]);
        rest = &rest[spaces..];
        let n = rest.chars().take_while(char::is_ascii_digit).count();
        match rest[..n].parse::<u16>().ok().and_then(|p| map.get(&p)) {
            Some(new) => out.push_str(&new.to_string()),
            None => out.push_str(&rest[..n]),
        }
        rest = &rest[n..];
    }
    out.push_str(rest);
    out
}

/// Makes the path after every `filename:` that ends in `.wasm` absolute (under `root`), or
/// replaces it by `replacement`; fails if a resulting file does not exist.
fn rewrite_wasm_paths(yaml: &str, root: &Path, replacement: Option<&Path>) -> Result<String> {
    let mut out = String::with_capacity(yaml.len());
    let mut rest = yaml;
    while let Some(i) = rest.find("filename:") {
        let head_end = i + "filename:".len();
        out.push_str(&rest[..head_end]);
        rest = &rest[head_end..];
        let spaces = rest.len() - rest.trim_start_matches([' ', '\t']).len();
        out.push_str(&rest[..spaces]);
        rest = &rest[spaces..];
        let quote = rest.chars().next().filter(|c| *c == '"' || *c == '\'');
        let body = &rest[quote.map_or(0, |_| 1)..];
        let len = body
            .find(|c: char| match quote {
                Some(q) => c == q,
                None => c.is_whitespace() || c == ',' || c == '}',
            })
            .unwrap_or(body.len());
        let value = &body[..len];
        let token_len = len + quote.map_or(0, |_| 2);
        if value.ends_with(".wasm") {
            let path = match replacement {
                Some(r) => r.to_path_buf(),
                None if Path::new(value).is_absolute() => PathBuf::from(value),
                None => resolve_relative_wasm(root, value),
            };
            if !path.is_file() {
                let package = match path.file_stem().and_then(|s| s.to_str()) {
                    Some(stem) => stem.replace('_', "-"),
                    None => "<package>".into(),
                };
                return Err(Error::WasmMissing {
                    path,
                    build: format!("cargo build -p {package} --target wasm32-wasip1 --release"),
                });
            }
            out.push('"');
            out.push_str(&path.to_string_lossy());
            out.push('"');
        } else {
            out.push_str(&rest[..token_len.min(rest.len())]);
        }
        rest = &rest[token_len.min(rest.len())..];
    }
    out.push_str(rest);
    Ok(out)
}

/// `root/value`, except that a path under `target/` is looked up in `$CARGO_TARGET_DIR` first:
/// developers who build elsewhere still get the module they just built.
fn resolve_relative_wasm(root: &Path, value: &str) -> PathBuf {
    let in_root = root.join(value);
    let custom = std::env::var_os("CARGO_TARGET_DIR").filter(|d| !d.is_empty());
    match (value.strip_prefix("target/"), custom) {
        (Some(rest), Some(dir)) => {
            let dir = PathBuf::from(dir);
            let dir = if dir.is_absolute() {
                dir
            } else {
                root.join(dir)
            };
            let candidate = dir.join(rest);
            if candidate.is_file() {
                candidate
            } else {
                in_root
            }
        }
        _ => in_root,
    }
}

/// The filter configuration a shipped YAML carries inline on one line (`value: '{...}'`), for
/// tests that start that YAML with a configuration of their own in its place.
pub fn inline_filter_config(yaml: &str) -> Result<String> {
    let path = repo_root().join(yaml);
    let text = fs::read_to_string(&path).map_err(io(path.display().to_string()))?;
    text.lines()
        .find_map(|l| l.trim().strip_prefix("value: '"))
        .and_then(|l| l.strip_suffix('\''))
        .map(str::to_string)
        .ok_or_else(|| Error::Config {
            path,
            reason: "no one-line `value: '...'` filter configuration".into(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_rewritten_consistently_in_both_yaml_styles() {
        let yaml = "a: { port_value: 10000 }\nb:\n  port_value: 10001\nc: {port_value: 10000}\nd: port_value: 0\n";
        assert_eq!(port_values(yaml), vec![10000, 10001, 10000, 0]);
        let map = BTreeMap::from([(10000, 40000), (10001, 40001)]);
        assert_eq!(
            rewrite_ports(yaml, &map),
            "a: { port_value: 40000 }\nb:\n  port_value: 40001\nc: {port_value: 40000}\nd: port_value: 0\n"
        );
        // A port that is a prefix of another is not touched by mistake.
        let map = BTreeMap::from([(1000, 1)]);
        assert_eq!(
            rewrite_ports("port_value: 10000", &map),
            "port_value: 10000"
        );
    }

    #[test]
    fn wasm_paths_become_absolute_and_must_exist() {
        let root = tempfile::tempdir().unwrap();
        fs::create_dir_all(root.path().join("t")).unwrap();
        fs::write(root.path().join("t/f.wasm"), b"\0asm").unwrap();
        let abs = root.path().join("t/f.wasm").to_string_lossy().into_owned();

        let yaml = "code:\n  local: { filename: t/f.wasm }\nother: { filename: x.txt }\n";
        let out = rewrite_wasm_paths(yaml, root.path(), None).unwrap();
        assert_eq!(
            out,
            format!("code:\n  local: {{ filename: \"{abs}\" }}\nother: {{ filename: x.txt }}\n")
        );
        let quoted = rewrite_wasm_paths("filename: \"t/f.wasm\"\n", root.path(), None).unwrap();
        assert_eq!(quoted, format!("filename: \"{abs}\"\n"));

        let missing = rewrite_wasm_paths("filename: t/sluice_x.wasm", root.path(), None);
        match missing {
            Err(Error::WasmMissing { build, .. }) => assert!(build.contains("-p sluice-x ")),
            other => panic!("expected WasmMissing, got {other:?}"),
        }

        let replaced =
            rewrite_wasm_paths("filename: nope.wasm", root.path(), Some(Path::new(&abs))).unwrap();
        assert_eq!(replaced, format!("filename: \"{abs}\""));
    }
}
