//! `fwagent run` (being written)
use std::process::ExitCode;
#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {}
pub fn main(_args: Box<RunArgs>) -> ExitCode { ExitCode::from(super::exit::USAGE) }
