//! `fwagent status|history|show|watch|submit|cancel` (being written)
use super::*;
use std::process::ExitCode;
fn todo() -> ExitCode {
    eprintln!("not built yet");
    ExitCode::from(exit::UNREACHABLE)
}
pub fn status(_a: StateArgs) -> ExitCode { todo() }
pub fn history(_a: HistoryArgs) -> ExitCode { todo() }
pub fn show(_a: ShowArgs) -> ExitCode { todo() }
pub fn watch(_a: StateArgs) -> ExitCode { todo() }
pub fn submit(_a: SubmitArgs) -> ExitCode { todo() }
pub fn cancel(_a: CancelArgs) -> ExitCode { todo() }
