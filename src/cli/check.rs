//! `fwagent check` (being written)
use super::CheckArgs;
use std::process::ExitCode;
pub fn main(_args: CheckArgs) -> ExitCode {
    ExitCode::from(super::exit::USAGE)
}
