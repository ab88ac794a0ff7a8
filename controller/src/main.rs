//! `sluice`: the controller's command-line entry point.

use clap::{Parser, Subcommand};

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
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { file } => {
            let text = std::fs::read_to_string(&file)?;
            let plan = sluice_filter::config::Plan::from_json(text.as_bytes())
                .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            println!("ok: {} experiment(s)", plan.experiments.len());
        }
    }
    Ok(())
}
