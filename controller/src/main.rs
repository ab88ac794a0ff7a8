//! `sluice`: the controller's command-line entry point. Each subcommand's code lives in its
//! module; this file only parses arguments, sets up logging and maps results to exit codes.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use sluice_controller::assess::Assessor;
use sluice_controller::cli::{self, RunOptions, DEFAULT_LISTEN};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use sluice_controller::rollout::{Command as Operator, Phase};
use sluice_controller::{plan, simulate};

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "Progressive delivery of ML models at the Envoy layer"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run rollouts: scrape, judge, ramp, push, until stopped (or until all are done).
    Run {
        /// Rollout specs (YAML); one task per file.
        #[arg(short, long = "file", required = true)]
        files: Vec<PathBuf>,
        /// Where each rollout's state and audit log are kept.
        #[arg(long, default_value = ".sluice")]
        state_dir: PathBuf,
        /// Address of the status / metrics / operator endpoint.
        #[arg(long, default_value = DEFAULT_LISTEN)]
        listen: SocketAddr,
        /// Exit once every rollout is promoted or rolled back (or stopped on an error): 0 if
        /// all were promoted, 3 if any was rolled back, 1 if any stopped on an error.
        #[arg(long)]
        exit_when_done: bool,
        /// File holding the token operator commands need (default: `SLUICE_TOKEN`, else
        /// `<state-dir>/api-token`, generated at first start; a non-loopback --listen needs
        /// this or `SLUICE_TOKEN`).
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// A host name clients may use for the endpoint (`Host` header), besides addresses
        /// and `localhost`; repeatable.
        #[arg(long = "allow-host")]
        allowed_hosts: Vec<String>,
        /// Serve this filter module on the endpoint, `GET /wasm/sluice_filter.wasm` (and its
        /// SHA-256 at `….sha256`), for proxies that fetch it over HTTP (Istio's WasmPlugin).
        #[arg(long, value_name = "FILE")]
        serve_wasm: Option<PathBuf>,
        /// No progress lines on stdout (logs still go to stderr).
        #[arg(long)]
        quiet: bool,
    },
    /// Check rollout specs without running them; every problem names its field.
    Validate {
        #[arg(short, long = "file", required = true)]
        files: Vec<PathBuf>,
    },
    /// Print the filter configuration a rollout pushes (at a stage or a weight).
    Render {
        #[arg(short, long)]
        file: PathBuf,
        /// Stage number, counted from 1.
        #[arg(long, conflicts_with = "weight")]
        stage: Option<usize>,
        /// Canary weight in percent.
        #[arg(long)]
        weight: Option<f64>,
    },
    /// Show every rollout of a running daemon.
    Status {
        #[arg(long, default_value_t = endpoint_default())]
        endpoint: String,
    },
    /// Hold a rollout at its current weight (rollbacks still happen).
    Pause(Target),
    /// Let a paused rollout advance again.
    Resume(Target),
    /// End the current stage's bake early; the next passing judgement advances.
    Promote(Target),
    /// Roll a rollout back to 0 % now.
    Abort(Target),
    /// Validate a filter configuration (JSON) as the filter would.
    Check {
        /// Path to a filter configuration (JSON).
        #[arg(short, long)]
        file: PathBuf,
    },
    /// Replay counter snapshots (JSON lines) through the judge and print every evaluation.
    Judge(cli::judge::JudgeArgs),
    /// Run synthetic rollouts through the judge: false-rollback rate, power, time to detect.
    Simulate(simulate::SimulateArgs),
    /// Samples and bake time each stage needs for the judge's sequential tests.
    Plan(plan::PlanArgs),
}

#[derive(clap::Args)]
struct Target {
    /// Rollout name (`metadata.name`).
    name: String,
    #[arg(long, default_value_t = endpoint_default())]
    endpoint: String,
    /// The daemon's state directory, where its token is (`<state-dir>/api-token`).
    #[arg(long, default_value = ".sluice")]
    state_dir: PathBuf,
    /// File holding the operator token (default: `SLUICE_TOKEN`, else the state directory's).
    #[arg(long)]
    token_file: Option<PathBuf>,
}

fn endpoint_default() -> String {
    format!("http://{DEFAULT_LISTEN}")
}

/// Exit status of `sluice run --exit-when-done` when a rollout was rolled back.
const EXIT_ROLLED_BACK: u8 = 3;
/// Exit status of `sluice run` when a rollout stopped on an error (and of any failed command).
const EXIT_STOPPED: u8 = 1;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match dispatch(Cli::parse().command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", error_text(&e));
            ExitCode::FAILURE
        }
    }
}

/// An error with its causes, each once. Most of the project's errors already name their cause
/// (`{path}: {source}`), so anyhow's `{:#}` would print it twice.
fn error_text(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    sluice_controller::daemon::runtime().context("starting the async runtime")
}

fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    let stdout = std::io::stdout();
    match command {
        Command::Run {
            files,
            state_dir,
            listen,
            exit_when_done,
            quiet,
            token_file,
            allowed_hosts,
            serve_wasm,
        } => {
            let token = match (token_file, std::env::var(cli::TOKEN_ENV)) {
                (Some(f), _) => cli::TokenSource::File(f),
                (None, Ok(t)) => cli::TokenSource::Env(t.trim().to_string()),
                (None, Err(_)) => cli::TokenSource::StateDir,
            };
            let opts = RunOptions {
                files,
                state_dir,
                listen,
                exit_when_done,
                progress: !quiet,
                token,
                allowed_hosts,
                serve_wasm,
            };
            let finals = runtime()?.block_on(cli::run(opts, |c| Ok(Assessor::from_spec(c))))?;
            let stopped: Vec<String> = finals
                .iter()
                .filter_map(|s| Some(format!("{}: {}", s.name, s.error.as_ref()?)))
                .collect();
            if !stopped.is_empty() {
                for s in &stopped {
                    eprintln!("error: rollout {s}");
                }
                return Ok(ExitCode::from(EXIT_STOPPED));
            }
            let rolled_back = finals
                .iter()
                .any(|s| matches!(s.state.phase, Phase::RolledBack { .. }));
            if exit_when_done && rolled_back {
                return Ok(ExitCode::from(EXIT_ROLLED_BACK));
            }
        }
        Command::Validate { files } => cli::validate(&files)?,
        Command::Render {
            file,
            stage,
            weight,
        } => cli::render(&file, stage, weight)?,
        Command::Status { endpoint } => runtime()?.block_on(cli::status(&endpoint))?,
        Command::Pause(t) => operator(t, Operator::Pause)?,
        Command::Resume(t) => operator(t, Operator::Resume)?,
        Command::Promote(t) => operator(t, Operator::Promote)?,
        Command::Abort(t) => operator(t, Operator::Abort)?,
        Command::Check { file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let plan = sluice_controller::spec::check_filter_config(&text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            writeln!(
                stdout.lock(),
                "ok: {} experiment(s)",
                plan.experiments.len()
            )?;
        }
        Command::Judge(args) => {
            cli::judge::run(&args, &mut stdout.lock())?;
        }
        Command::Simulate(args) => simulate::run(&args, &mut stdout.lock())?,
        Command::Plan(args) => plan::run(&args, &mut stdout.lock())?,
    }
    stdout.lock().flush()?;
    Ok(ExitCode::SUCCESS)
}

fn operator(t: Target, command: Operator) -> anyhow::Result<()> {
    let token = cli::client_token(t.token_file.as_deref(), &t.state_dir)?;
    runtime()?.block_on(cli::control(
        &t.endpoint,
        &t.name,
        command,
        token.as_deref(),
    ))
}
