//! `sluice`: the controller's command-line entry point. Each subcommand's code lives in its
//! module; this file only parses arguments and reports errors.

use std::io::Write;

use clap::{Parser, Subcommand};
use sluice_controller::{judge, plan, simulate};

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
    /// Print the filter JSON for a file of experiments after validating it.
    Check {
        /// Path to a filter configuration (JSON).
        #[arg(short, long)]
        file: std::path::PathBuf,
    },
    /// Replay counter snapshots (JSON lines) through the judge and print every evaluation.
    Judge(judge::command::JudgeArgs),
    /// Run synthetic rollouts through the judge: false-rollback rate, power, time to detect.
    Simulate(simulate::SimulateArgs),
    /// Samples and bake time each stage needs for the judge's sequential tests.
    Plan(plan::PlanArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match cli.command {
        Command::Check { file } => {
            let text = std::fs::read_to_string(&file)?;
            let plan = sluice_filter::config::Plan::from_json(text.as_bytes())
                .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            writeln!(out, "ok: {} experiment(s)", plan.experiments.len())?;
        }
        Command::Judge(args) => {
            judge::command::run(&args, &mut out)?;
        }
        Command::Simulate(args) => simulate::run(&args, &mut out)?,
        Command::Plan(args) => plan::run(&args, &mut out)?,
    }
    out.flush()?;
    Ok(())
}
