//! The rollout commands of the `sluice` binary: `validate`, `render`, `run`, `status` and the
//! operator commands; [`judge`] is `sluice judge` (a replay through the judge). `main.rs` only
//! parses arguments and calls these.

pub mod judge;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};

use crate::daemon::{AnySink, AnySource, Assess, Status, SystemClock, Task};
use crate::notify::Notifier;
use crate::rollout::{Command, Judgement, Phase};
use crate::spec::{Checked, Rollout};
use crate::store::Store;

/// Default address of the daemon's HTTP endpoint.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9400";

/// The file in the state directory holding the endpoint's token when none is given.
pub const TOKEN_FILE: &str = "api-token";
/// The environment variable that gives the token (to the daemon and to the CLI).
pub const TOKEN_ENV: &str = "SLUICE_TOKEN";
/// Shortest token accepted from a file or the environment.
const MIN_TOKEN_LEN: usize = 16;

/// Reads a token file: its content, trimmed; refused if others may read it or it is short.
fn read_token(path: &Path, check_mode: bool) -> anyhow::Result<String> {
    use std::os::unix::fs::PermissionsExt as _;
    let meta = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if check_mode && mode & 0o077 != 0 {
        bail!(
            "{}: mode {mode:03o} lets other users read the token; `chmod 600 {}`",
            path.display(),
            path.display()
        );
    }
    let token = std::fs::read_to_string(path)
        .with_context(|| format!("reading {}", path.display()))?
        .trim()
        .to_string();
    check_token(&token).with_context(|| path.display().to_string())?;
    Ok(token)
}

fn check_token(token: &str) -> anyhow::Result<()> {
    if token.len() < MIN_TOKEN_LEN || token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        bail!("a token needs at least {MIN_TOKEN_LEN} characters, none of them blank");
    }
    Ok(())
}

/// 32 random bytes from the kernel, as hex.
fn new_token() -> anyhow::Result<String> {
    use std::io::Read as _;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("reading /dev/urandom for a token")?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Where the daemon's token comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenSource {
    /// `--token-file`.
    File(PathBuf),
    /// `SLUICE_TOKEN`.
    Env(String),
    /// `<state dir>/api-token`, created at first start.
    StateDir,
}

/// The token operator commands need: given (file or environment) or kept in the state
/// directory, where it is generated at first start (mode 0600). A `listen` address other than
/// loopback needs a given token: the generated one is meant for clients on this machine.
pub fn daemon_token(
    source: &TokenSource,
    state_dir: &Path,
    listen: SocketAddr,
) -> anyhow::Result<String> {
    match source {
        TokenSource::File(p) => read_token(p, true),
        TokenSource::Env(t) => {
            check_token(t).context(TOKEN_ENV)?;
            Ok(t.clone())
        }
        TokenSource::StateDir if !listen.ip().is_loopback() => bail!(
            "--listen {listen} is reachable from other machines: give the operator token with --token-file FILE or {TOKEN_ENV} (the token in the state directory is for loopback only)"
        ),
        TokenSource::StateDir => {
            use std::io::Write as _;
            use std::os::unix::fs::OpenOptionsExt as _;
            let path = state_dir.join(TOKEN_FILE);
            if path.exists() {
                return read_token(&path, true);
            }
            std::fs::create_dir_all(state_dir)
                .with_context(|| format!("creating {}", state_dir.display()))?;
            let token = new_token()?;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .with_context(|| format!("creating {}", path.display()))?;
            f.write_all(format!("{token}\n").as_bytes())
                .and_then(|()| f.sync_all())
                .with_context(|| format!("writing {}", path.display()))?;
            tracing::info!(path = %path.display(), "generated the operator token");
            Ok(token)
        }
    }
}

/// The token the CLI sends: `--token-file`, else `SLUICE_TOKEN`, else the state directory's
/// file if there is one.
pub fn client_token(token_file: Option<&Path>, state_dir: &Path) -> anyhow::Result<Option<String>> {
    if let Some(p) = token_file {
        return read_token(p, false).map(Some);
    }
    if let Ok(t) = std::env::var(TOKEN_ENV) {
        return Ok(Some(t.trim().to_string()));
    }
    let path = state_dir.join(TOKEN_FILE);
    if path.exists() {
        return read_token(&path, false).map(Some);
    }
    Ok(None)
}

/// `sluice validate`: every problem with its field path; `Err` (exit 1) if any.
pub fn validate(files: &[PathBuf]) -> anyhow::Result<()> {
    let mut failed = false;
    for f in files {
        match Rollout::load(f) {
            Ok(c) => println!(
                "{}: ok — rollout {:?}, treatment {:?}, stages {}",
                f.display(),
                c.name(),
                c.treatment,
                c.stages
                    .iter()
                    .map(|s| format!("{}%", s.weight))
                    .collect::<Vec<_>>()
                    .join(" → ")
            ),
            Err(e) => {
                failed = true;
                for p in &e.problems {
                    eprintln!("{}: {p}", f.display());
                }
            }
        }
    }
    if failed {
        bail!("invalid rollout spec");
    }
    Ok(())
}

/// `sluice render`: the filter JSON pushed at a stage (counted from 1, as progress lines show
/// it) or at a weight. The daemon adds a `revision` to every push and wraps the JSON in the
/// ECDS file; a note on stderr says so.
pub fn render(file: &Path, stage: Option<usize>, weight: Option<f64>) -> anyhow::Result<()> {
    let c = load(file)?;
    let w = match (stage, weight) {
        (Some(_), Some(_)) => bail!("give --stage or --weight, not both"),
        (Some(n), None) => {
            n.checked_sub(1)
                .and_then(|i| c.stages.get(i))
                .with_context(|| {
                    format!(
                        "--stage {n}: the schedule has stages 1..={}",
                        c.stages.len()
                    )
                })?
                .weight
        }
        (None, Some(w)) => w,
        (None, None) => bail!(
            "give --stage N (1 to {}) or --weight PERCENT: which configuration to render",
            c.stages.len()
        ),
    };
    let config = c.render(w).map_err(|e| anyhow::anyhow!("{e}"))?;
    println!("{}", serde_json::to_string_pretty(&config)?);
    let into = match c.rollout.spec.sinks.first() {
        Some(crate::spec::SinkSpec::IstioWasmPlugin(w)) => format!(
            "into {} of {:?} {}/{}",
            w.kind.config_path().join("."),
            w.kind,
            w.namespace,
            w.name
        ),
        Some(crate::spec::SinkSpec::EcdsFile(e)) => format!(
            "into the sink's ECDS file as the `configuration` of resource {:?}, version_info <version>",
            e.resource
        ),
        Some(crate::spec::SinkSpec::EcdsGrpc(g)) => format!(
            "out from the ecdsGrpc server on {} as resource {:?}, version_info <version>",
            g.listen, g.resource
        ),
        None => "to the sinks".into(),
    };
    eprintln!(
        "note: each push of this configuration also sets \"revision\": \"<version>@<write time, Unix ms>\" (so Envoy evaluates every write afresh) and goes {into}; the shadow section is pushed only in the shadow stage"
    );
    Ok(())
}

fn load(file: &Path) -> anyhow::Result<Checked> {
    Rollout::load(file)
        .map_err(|e| anyhow::anyhow!("{}:\n  {}", file.display(), e.problems.join("\n  ")))
}

/// Options of `sluice run`.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub files: Vec<PathBuf>,
    pub state_dir: PathBuf,
    pub listen: SocketAddr,
    pub exit_when_done: bool,
    /// Print progress lines (stage, weight, bake left, judgement).
    pub progress: bool,
    /// Where the operator token comes from.
    pub token: TokenSource,
    /// Host names accepted in requests besides addresses and `localhost`.
    pub allowed_hosts: Vec<String>,
    /// A filter module to serve on the endpoint (`GET /wasm/sluice_filter.wasm`).
    pub serve_wasm: Option<PathBuf>,
}

/// `sluice run`: one task per rollout, the HTTP endpoint, live progress; SIGTERM/ctrl-c
/// finishes the current step, persists and exits 0. `judge` builds each rollout's judge.
///
/// A rollout whose state is refused, or that stops on an error (a file it cannot write),
/// stops alone: the others run on, and the returned statuses carry its `error`.
pub async fn run<A, F>(opts: RunOptions, judge: F) -> anyhow::Result<Vec<Status>>
where
    A: Assess + 'static,
    F: Fn(&Checked) -> anyhow::Result<A>,
{
    if opts.files.is_empty() {
        bail!("give at least one rollout spec with -f");
    }
    let token = daemon_token(&opts.token, &opts.state_dir, opts.listen)?;
    // Read before any rollout starts: a proxy told to fetch the module must find it.
    let module = match &opts.serve_wasm {
        Some(path) => {
            let m = crate::wasm_module::WasmModule::load(path)?;
            tracing::info!(path = %path.display(), bytes = m.len(), sha256 = m.sha256(), "serving the filter module");
            Some(Arc::new(m))
        }
        None => None,
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut handles = BTreeMap::new();
    let mut joins = Vec::new();
    // Each rollout owns its filter instance: two rollouts writing one ECDS file would
    // overwrite each other's experiments.
    let mut sink_paths: BTreeMap<String, String> = BTreeMap::new();
    // Rollouts reading the same Envoys share their scrapes.
    let hub = crate::source::envoy_admin::AdminHub::new();
    // ecdsGrpc servers, one per listen address, shared by the rollouts naming it.
    let servers = Arc::new(crate::sink::ecds_grpc::Servers::new(
        stop_rx.clone(),
        crate::sink::ecds_grpc::Limits::default(),
    ));
    for f in &opts.files {
        let mut checked = load(f)?;
        checked
            .use_state_secret(&opts.state_dir)
            .map_err(|e| anyhow::anyhow!("{}: spec.secretFile: {e}", f.display()))?;
        let name = checked.name().to_string();
        if handles.contains_key(&name) {
            bail!("{}: a rollout named {name:?} is already given", f.display());
        }
        for sink in &checked.rollout.spec.sinks {
            let key = match sink {
                crate::spec::SinkSpec::EcdsFile(e) => e.path.clone(),
                // Resource names are per server: two rollouts on one server need two names.
                crate::spec::SinkSpec::EcdsGrpc(g) => format!(
                    "resource {:?} on the ecdsGrpc server {}",
                    g.resource,
                    g.listen
                        .parse::<SocketAddr>()
                        .map_or(g.listen.clone(), |a| a.to_string())
                ),
                crate::spec::SinkSpec::IstioWasmPlugin(w) => {
                    format!("{:?} {}/{}", w.kind, w.namespace, w.name)
                }
            };
            if let Some(other) = sink_paths.insert(key.clone(), name.clone()) {
                bail!(
                    "{}: spec.sinks: {key} is already the sink of rollout {other:?}; give each rollout its own filter (ECDS resource and file, or Istio object)",
                    f.display(),
                );
            }
        }
        let spec = &checked.rollout.spec;
        let source = match spec.sources.as_slice() {
            [one] => AnySource::from_spec(one, &hub, spec.schedule.interval).variants(
                &spec
                    .experiment
                    .variants
                    .iter()
                    .map(|v| v.name.clone())
                    .collect::<Vec<_>>(),
            ),
            _ => bail!(
                "{}: spec.sources: exactly one source is supported for now",
                f.display()
            ),
        };
        let stages: Vec<f64> = checked.stages.iter().map(|s| s.weight).collect();
        let mut sinks = Vec::with_capacity(spec.sinks.len());
        for (i, sink) in spec.sinks.iter().enumerate() {
            sinks.push(
                AnySink::from_spec(sink, &servers, &name)
                    .await
                    .with_context(|| format!("{}: spec.sinks[{i}]", f.display()))?
                    .reading(&source),
            );
        }
        let ecds_grpc: Vec<crate::sink::ecds_grpc::EcdsGrpc> = sinks
            .iter()
            .filter_map(|s| match s {
                AnySink::EcdsGrpc(g) => Some(g.clone()),
                _ => None,
            })
            .collect();
        let task = Task {
            source,
            sinks,
            judge: judge(&checked)?,
            store: Store::new(&opts.state_dir, &name)?,
            notifier: Notifier::new(&spec.notifications),
            clock: SystemClock,
            checked,
        };
        let mut stop = stop_rx.clone();
        let shutdown = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        match task.spawn(shutdown, opts.exit_when_done) {
            Ok((mut handle, join)) => {
                handle.ecds_grpc = ecds_grpc;
                if let Some(line) = finished_line(&handle.status.borrow(), &opts.state_dir) {
                    println!("{line}");
                }
                handles.insert(name.clone(), handle);
                joins.push((name, join));
            }
            Err(e) => {
                // One rollout's bad state must not stop the others.
                tracing::error!(rollout = %name, error = %e, "rollout not started");
                let status = Status::stopped(&name, stages, e.to_string());
                handles.insert(name, crate::daemon::Handle::stopped(status));
            }
        }
    }
    let registry: crate::daemon::Registry = Arc::new(handles);
    let listener = crate::api::bind(opts.listen)
        .await
        .with_context(|| format!("listening on {}", opts.listen))?;
    tracing::info!(listen = %opts.listen, rollouts = registry.len(), "sluice daemon running");
    let mut api_stop = stop_rx.clone();
    let access = crate::api::Access {
        token,
        allowed_hosts: opts.allowed_hosts.clone(),
    };
    let api = tokio::spawn(crate::api::serve(
        listener,
        registry.clone(),
        access,
        module,
        async move {
            let _ = api_stop.wait_for(|s| *s).await;
        },
    ));
    let progress = opts
        .progress
        .then(|| tokio::spawn(print_progress(registry.clone())));

    let signals = tokio::spawn(async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
    });
    let mut panicked: Vec<String> = Vec::new();
    let all_done = async {
        for (name, j) in &mut joins {
            // A task's own errors are logged where they happen and kept in its status.
            if let Err(e) = j.await {
                tracing::error!(rollout = %name, error = %e, "rollout task ended abnormally");
                panicked.push(format!("{name}: {e}"));
            }
        }
    };
    tokio::pin!(all_done);
    let finished = tokio::select! {
        _ = signals => {
            tracing::info!("signal received: finishing the current step");
            false
        }
        () = &mut all_done => true,
    };
    let _ = stop_tx.send(true);
    if !finished {
        all_done.await;
    }
    let _ = api.await;
    if let Some(p) = progress {
        p.abort();
    }
    let mut finals: Vec<Status> = registry
        .values()
        .map(|h| h.status.borrow().clone())
        .collect();
    for s in &mut finals {
        if let Some(p) = panicked
            .iter()
            .find(|p| p.starts_with(&format!("{}: ", s.name)))
        {
            s.error.get_or_insert_with(|| p.clone());
        }
        println!("{}", progress_line(s));
    }
    Ok(finals)
}

/// For a rollout whose loaded state is final: a line saying that there is nothing to do.
fn finished_line(s: &Status, state_dir: &Path) -> Option<String> {
    if !s.state.phase.is_final() || s.state.pending.is_some() {
        return None;
    }
    let how = match &s.state.phase {
        Phase::RolledBack { reason } => format!("rolled back ({reason})"),
        _ => format!("promoted at {} %", s.state.weight),
    };
    Some(format!(
        "{}: already {how}: the state in {} is final, there is nothing to do (remove {}.state.json there to run this rollout again)",
        s.name,
        state_dir.display(),
        s.name
    ))
}

async fn print_progress(registry: crate::daemon::Registry) {
    let mut last: BTreeMap<String, String> = BTreeMap::new();
    let mut every = tokio::time::interval(Duration::from_secs(1));
    loop {
        every.tick().await;
        for h in registry.values() {
            let line = progress_line(&h.status.borrow());
            if last.get(&h.name) != Some(&line) {
                println!("{line}");
                last.insert(h.name.clone(), line);
            }
        }
    }
}

fn phase_text(s: &Status) -> String {
    match &s.state.phase {
        Phase::Pending => "pending".into(),
        Phase::Shadow => "shadow".into(),
        Phase::Canary { index } => format!("stage {}/{}", index + 1, s.stages.len()),
        Phase::Promoted => "PROMOTED".into(),
        Phase::RolledBack { reason } => format!("ROLLED BACK ({reason})"),
    }
}

fn judgement_text(j: &Option<Judgement>) -> String {
    match j {
        None => "-".into(),
        Some(Judgement::Pass) => "pass".into(),
        Some(Judgement::Continue) => "collecting evidence".into(),
        Some(Judgement::Hold { reason }) => format!("hold: {reason}"),
        Some(Judgement::Halt { reason }) => format!("halt: {reason}"),
        Some(Judgement::Fail { reason }) => format!("FAIL: {reason}"),
    }
}

/// One line per rollout: what a human watching `sluice run` needs.
pub fn progress_line(s: &Status) -> String {
    let mut line = format!(
        "{:<20} {:<24} weight {:>6.2}% (target {:.2}%)",
        s.name,
        phase_text(s),
        s.state.weight,
        s.target_weight
    );
    if let Some(left) = s.bake_left_secs {
        line.push_str(&format!("  bake {:>4.0}s left", left));
    }
    if s.state.paused {
        line.push_str("  PAUSED");
    }
    if let Some(h) = &s.state.hold {
        line.push_str(&format!("  HELD: {h}"));
    }
    if let Some(t) = &s.breaker {
        line.push_str(&format!("  BREAKER: {}", breaker_text(t)));
    }
    line.push_str(&format!("  judge: {}", judgement_text(&s.last_judgement)));
    if let Some(e) = &s.error {
        line.push_str(&format!("  STOPPED: {e}"));
    }
    line
}

/// A breaker trip in a few words: variant, failure kind, trips and proxies.
fn breaker_text(t: &crate::daemon::breaker::Trip) -> String {
    let n: u64 = t.trips.values().sum();
    format!(
        "{} tripped in the data plane{} ({n} trip{}, gauge up on {} prox{})",
        t.variant,
        t.reason
            .as_deref()
            .map(|r| format!(" on {r}"))
            .unwrap_or_default(),
        if n == 1 { "" } else { "s" },
        t.tripped_on.len(),
        if t.tripped_on.len() == 1 { "y" } else { "ies" }
    )
}

/// `sluice status`: a table of every rollout of a running daemon.
pub async fn status(endpoint: &str) -> anyhow::Result<()> {
    let url = format!("{}/status", endpoint.trim_end_matches('/'));
    let body = reqwest::get(&url)
        .await
        .with_context(|| format!("asking {url} (is `sluice run` running?)"))?
        .text()
        .await?;
    let all: Vec<serde_json::Value> =
        serde_json::from_str(&body).with_context(|| format!("{url} answered: {body}"))?;
    println!(
        "{:<20} {:<14} {:>8} {:>8} {:>10}  STATE",
        "ROLLOUT", "PHASE", "WEIGHT", "TARGET", "BAKE LEFT"
    );
    for s in all {
        let phase = s["state"]["phase"]["phase"].as_str().unwrap_or("?");
        let stage = s["state"]["phase"]["index"]
            .as_u64()
            .map(|i| format!(" {}", i + 1))
            .unwrap_or_default();
        let state = if let Some(e) = s["error"].as_str() {
            format!("STOPPED: {e}")
        } else if let Some(h) = s["state"]["hold"].as_str() {
            format!("held: {h}")
        } else if s["state"]["paused"].as_bool() == Some(true) {
            "paused".into()
        } else {
            s["last_judgement"]["kind"]
                .as_str()
                .unwrap_or("-")
                .to_string()
        };
        println!(
            "{:<20} {:<14} {:>7.2}% {:>7.2}% {:>10}  {}",
            s["name"].as_str().unwrap_or("?"),
            format!("{phase}{stage}"),
            s["state"]["weight"].as_f64().unwrap_or(0.0),
            s["target_weight"].as_f64().unwrap_or(0.0),
            s["bake_left_secs"]
                .as_f64()
                .map(|b| format!("{b:.0}s"))
                .unwrap_or_else(|| "-".into()),
            state
        );
        if let Ok(t) = serde_json::from_value(s["breaker"].clone()) {
            println!(
                "  breaker: {}: rolled back, cause breaker",
                breaker_text(&t)
            );
        }
        for line in proxy_lines(&s) {
            println!("  {line}");
        }
    }
    Ok(())
}

/// Proxies listed one by one under a rollout in `sluice status`, at most; beyond, only those
/// that are behind or NACKed are listed.
const PROXIES_LISTED: usize = 20;

/// `sluice status` lines for a rollout's ecdsGrpc sinks (its `/status` `proxies`): per sink
/// the version served and how many proxies ACKed it, then the proxies.
pub(crate) fn proxy_lines(status: &serde_json::Value) -> Vec<String> {
    let mut out = Vec::new();
    for sink in status["proxies"].as_array().into_iter().flatten() {
        let resource = sink["resource"].as_str().unwrap_or("?");
        let serving = sink["serving"].as_u64();
        let proxies = sink["proxies"].as_array().cloned().unwrap_or_default();
        let acked = |p: &serde_json::Value| p["acked"][resource].as_u64();
        let current = proxies
            .iter()
            .filter(|p| serving.is_some() && acked(p) == serving)
            .count();
        out.push(format!(
            "ecdsGrpc {} {resource:?}: serving {}, {} proxies connected, {current} ACKed it",
            sink["listen"].as_str().unwrap_or("?"),
            serving.map_or("nothing".into(), |v| format!("version {v}")),
            proxies.len(),
        ));
        let all = proxies.len() <= PROXIES_LISTED;
        for p in &proxies {
            let nack = &p["last_nack"];
            let behind = serving.is_some() && acked(p) != serving;
            if !(all || behind || !nack.is_null()) {
                continue;
            }
            let mut line = format!(
                "  {} ({}): ACKed {}",
                p["id"].as_str().unwrap_or("?"),
                p["cluster"].as_str().unwrap_or(""),
                acked(p).map_or("nothing".into(), |v| format!("version {v}")),
            );
            if !nack.is_null() {
                let versions = nack["versions"]
                    .as_object()
                    .map(|m| {
                        m.values()
                            .map(|v| v.to_string())
                            .collect::<Vec<_>>()
                            .join(",")
                    })
                    .unwrap_or_default();
                line.push_str(&format!(
                    "; last NACK (version {versions}): {}",
                    nack["detail"].as_str().unwrap_or("")
                ));
            }
            out.push(line);
        }
    }
    out
}

/// `sluice pause|resume|promote|abort NAME`, with the operator token if there is one.
pub async fn control(
    endpoint: &str,
    name: &str,
    command: Command,
    token: Option<&str>,
) -> anyhow::Result<()> {
    let action = match command {
        Command::Pause => "pause",
        Command::Resume => "resume",
        Command::Promote => "promote",
        Command::Abort => "abort",
    };
    let url = format!(
        "{}/rollouts/{name}/{action}",
        endpoint.trim_end_matches('/')
    );
    let mut req = reqwest::Client::new().post(&url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req
        .send()
        .await
        .with_context(|| format!("asking {url} (is `sluice run` running?)"))?;
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    if !status.is_success() {
        bail!("{url}: {status}: {}", body.trim());
    }
    println!("{name}: {}", body.trim());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_breaker_trip_shows_in_the_progress_line_and_survives_the_status_json() {
        let trip = crate::daemon::breaker::Trip {
            variant: "canary".into(),
            reason: Some("5xx".into()),
            trips: BTreeMap::from([("5xx".into(), 2), ("reset".into(), 1)]),
            tripped_on: vec!["http://a".into()],
            seen_at: 5.0,
        };
        let mut s = Status::stopped("r", vec![10.0], "x".into());
        s.error = None;
        assert!(!progress_line(&s).contains("BREAKER"));
        s.breaker = Some(trip.clone());
        let line = progress_line(&s);
        assert!(
            line.contains(
                "BREAKER: canary tripped in the data plane on 5xx (3 trips, gauge up on 1 proxy)"
            ),
            "{line}"
        );
        // What `sluice status` reads back from `/status`.
        let json = serde_json::to_value(&s).unwrap_or_default();
        let back: crate::daemon::breaker::Trip =
            serde_json::from_value(json["breaker"].clone()).unwrap();
        assert_eq!(back, trip);
    }
}
