//! The rollout commands of the `sluice` binary: `validate`, `render`, `run`, `status` and the
//! operator commands. `main.rs` only parses arguments and calls these.

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

/// `sluice render`: the exact filter JSON pushed at a stage (counted from 1, as progress
/// lines show it) or at a weight; neither gives the 0 % configuration.
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
        (None, None) => 0.0,
    };
    let config = c.render(w).map_err(|e| anyhow::anyhow!("{e}"))?;
    println!("{}", serde_json::to_string_pretty(&config)?);
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
}

/// `sluice run`: one task per rollout, the HTTP endpoint, live progress; SIGTERM/ctrl-c
/// finishes the current step, persists and exits 0. `judge` builds each rollout's judge.
pub async fn run<A, F>(opts: RunOptions, judge: F) -> anyhow::Result<Vec<Status>>
where
    A: Assess + 'static,
    F: Fn(&Checked) -> anyhow::Result<A>,
{
    if opts.files.is_empty() {
        bail!("give at least one rollout spec with -f");
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut handles = BTreeMap::new();
    let mut joins = Vec::new();
    // Each rollout owns its filter instance: two rollouts writing one ECDS file would
    // overwrite each other's experiments.
    let mut sink_paths: BTreeMap<String, String> = BTreeMap::new();
    // Rollouts reading the same Envoys share their scrapes.
    let hub = crate::source::envoy_admin::AdminHub::new();
    for f in &opts.files {
        let mut checked = load(f)?;
        checked
            .use_state_secret(&opts.state_dir)
            .map_err(|e| anyhow::anyhow!("{}: spec.secretFile: {e}", f.display()))?;
        let name = checked.name().to_string();
        if handles.contains_key(&name) {
            bail!("{}: a rollout named {name:?} is already given", f.display());
        }
        for crate::spec::SinkSpec::EcdsFile(e) in &checked.rollout.spec.sinks {
            if let Some(other) = sink_paths.insert(e.path.clone(), name.clone()) {
                bail!(
                    "{}: spec.sinks: {:?} is already the sink of rollout {other:?}; give each rollout its own filter (ECDS resource and file)",
                    f.display(),
                    e.path
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
        let task = Task {
            source,
            sinks: spec.sinks.iter().map(AnySink::from_spec).collect(),
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
        let (handle, join) = task.spawn(shutdown, opts.exit_when_done)?;
        handles.insert(name, handle);
        joins.push(join);
    }
    let registry: crate::daemon::Registry = Arc::new(handles);
    let listener = crate::api::bind(opts.listen)
        .await
        .with_context(|| format!("listening on {}", opts.listen))?;
    tracing::info!(listen = %opts.listen, rollouts = registry.len(), "sluice daemon running");
    let mut api_stop = stop_rx.clone();
    let api = tokio::spawn(crate::api::serve(listener, registry.clone(), async move {
        let _ = api_stop.wait_for(|s| *s).await;
    }));
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
    let all_done = async {
        for j in &mut joins {
            let _ = j.await;
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
    let finals: Vec<Status> = registry
        .values()
        .map(|h| h.status.borrow().clone())
        .collect();
    for s in &finals {
        println!("{}", progress_line(s));
    }
    Ok(finals)
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
    line.push_str(&format!("  judge: {}", judgement_text(&s.last_judgement)));
    line
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
        let state = if let Some(h) = s["state"]["hold"].as_str() {
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
    }
    Ok(())
}

/// `sluice pause|resume|promote|abort NAME`.
pub async fn control(endpoint: &str, name: &str, command: Command) -> anyhow::Result<()> {
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
    let resp = reqwest::Client::new()
        .post(&url)
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
