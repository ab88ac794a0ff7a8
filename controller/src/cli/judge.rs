//! `sluice judge`: replays a JSON-lines file of snapshots through the judge and prints every
//! evaluation (a table, or one JSON object per line with `--json`).

use std::io::Write;
use std::path::PathBuf;

use crate::judge::config::{ConfigError, GuardrailConfig};
use crate::judge::{Evaluation, Judge, Label};
use crate::snapshot::{self, SnapshotError};

/// Arguments of `sluice judge`.
#[derive(Debug, Clone, clap::Args)]
pub struct JudgeArgs {
    /// Guardrail configuration, YAML or JSON: a rollout spec (its `spec.guardrails` is read)
    /// or the guardrails alone.
    #[arg(short, long)]
    pub config: PathBuf,
    /// Snapshots, one JSON object per line (format: docs/statistics.md).
    #[arg(short, long)]
    pub snapshots: PathBuf,
    /// One JSON object per evaluation instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Why a replay could not run.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("{path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Config {
        path: String,
        #[source]
        source: ConfigError,
    },
    #[error("{path}: {source}")]
    Snapshots {
        path: String,
        #[source]
        source: SnapshotError,
    },
    #[error("writing output: {0}")]
    Output(#[from] std::io::Error),
    #[error("encoding output: {0}")]
    Encode(#[from] serde_json::Error),
}

fn read(path: &PathBuf) -> Result<String, ReplayError> {
    std::fs::read_to_string(path).map_err(|source| ReplayError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// Runs the replay, writing to `out`; returns the evaluations.
pub fn run(args: &JudgeArgs, out: &mut impl Write) -> Result<Vec<Evaluation>, ReplayError> {
    let config =
        GuardrailConfig::from_text(&read(&args.config)?).map_err(|source| ReplayError::Config {
            path: args.config.display().to_string(),
            source,
        })?;
    let snaps =
        snapshot::read_lines(&read(&args.snapshots)?).map_err(|source| ReplayError::Snapshots {
            path: args.snapshots.display().to_string(),
            source,
        })?;
    let mut judge = Judge::new(config);
    let mut all = Vec::with_capacity(snaps.len());
    let start = snaps.first().map_or(0.0, |s| s.at);
    for s in &snaps {
        let e = judge.observe(s);
        if args.json {
            serde_json::to_writer(&mut *out, &e)?;
            writeln!(out)?;
        } else {
            table(&e, start, out)?;
        }
        all.push(e);
    }
    Ok(all)
}

fn num(x: Option<f64>) -> String {
    match x {
        None => "-".into(),
        Some(0.0) => "0".into(),
        Some(v) if v.abs() >= 1e4 || v.abs() < 1e-3 => format!("{v:.2e}"),
        Some(v) => format!("{v:.4}"),
    }
}

fn table(e: &Evaluation, start: f64, out: &mut impl Write) -> std::io::Result<()> {
    let weights: Vec<String> = e.weights.iter().map(|(k, v)| format!("{k} {v}%")).collect();
    let score = match (e.score, e.score_class) {
        (Some(s), Some(c)) => format!("{s:.0} ({c:?})").to_lowercase(),
        _ => "-".into(),
    };
    writeln!(
        out,
        "t+{:.0}s  [{}]  stage requests: canary {} / control {}  score {score}  → {:?}: {}",
        e.at - start,
        weights.join(", "),
        e.stage_requests.canary,
        e.stage_requests.control,
        e.decision,
        e.reason
    )?;
    writeln!(
        out,
        "  {:<26} {:<12} {:>10} {:>23} {:>9} {:>9} {:>3}  reason",
        "guardrail", "verdict", "estimate", "interval", "p", "e", "k"
    )?;
    for v in &e.verdicts {
        let label = match v.label {
            Label::Pass => "pass",
            Label::Fail => "FAIL",
            Label::Inconclusive => "inconclusive",
        };
        let interval = v.interval.map_or("-".into(), |[a, b]| {
            format!("[{}, {}]", num(Some(a)), num(Some(b)))
        });
        writeln!(
            out,
            "  {:<26} {:<12} {:>10} {:>23} {:>9} {:>9} {:>3}  {}",
            format!("{}{}", v.guardrail, if v.critical { "*" } else { "" }),
            label,
            num(v.estimate),
            interval,
            num(v.p_value),
            num(v.e_value),
            v.streak,
            v.reason
        )?;
    }
    writeln!(out)
}
