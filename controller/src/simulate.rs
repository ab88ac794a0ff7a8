//! `sluice simulate`: synthetic rollouts through the real judge.

use std::io::Write;

/// Arguments of `sluice simulate`.
#[derive(Debug, Clone, clap::Args)]
pub struct SimulateArgs {
    #[arg(long, default_value_t = 2000)]
    pub runs: usize,
}

/// Simulation failure.
#[derive(Debug, thiserror::Error)]
pub enum SimulateError {
    #[error("writing output: {0}")]
    Output(#[from] std::io::Error),
}

pub fn run(_args: &SimulateArgs, _out: &mut impl Write) -> Result<(), SimulateError> {
    Ok(())
}
