//! The command line: one subcommand per verb of spec/INTERFACE.md.
//!
//! Argument structs live here; each verb's behaviour lives in its module.

pub mod check;
pub mod inspect;
pub mod run;
pub mod sign;
pub mod view;

use clap::{Args, Parser, Subcommand};
use std::num::{IntErrorKind, NonZeroU64, ParseIntError};
use std::path::PathBuf;

/// Exit codes of spec/INTERFACE.md.
pub mod exit {
    pub const OK: u8 = 0;
    pub const REJECTED: u8 = 1;
    pub const USAGE: u8 = 2;
    pub const UNREACHABLE: u8 = 3;
}

/// `--version`: the crate's version and the git commit it was built from,
/// `+dirty` when the tree had uncommitted changes (build.rs; `unknown`
/// when built outside a git checkout).
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("FWAGENT_GIT_COMMIT"),
    ")"
);

/// The documented default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/fwagent";

#[derive(Parser, Debug)]
#[command(
    name = "fwagent",
    version = VERSION,
    about = "Firmware-upgrade agent for embedded gateways"
)]
pub struct Cli {
    /// More log output on stderr (-v debug, -vv trace). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Commands,
}

#[derive(Subcommand, Debug)]
pub enum Commands {
    /// Run the agent until stopped.
    Run(Box<run::RunArgs>),
    /// Validate a request without running it; prints the ack.
    Check(CheckArgs),
    /// The active upgrade, else the most recent one.
    Status(StateArgs),
    /// Every upgrade, newest first.
    History(HistoryArgs),
    /// One upgrade with its transition log and outbox.
    Show(ShowArgs),
    /// A live progress bar until the active upgrade ends.
    Watch(StateArgs),
    /// Hand a request to the running agent; prints the ack.
    Submit(SubmitArgs),
    /// Cancel the active upgrade (before flashing).
    Cancel(CancelArgs),
    /// Sign an image: writes IMAGE.sig (docs/SECURITY.md, "Signed images").
    Sign(sign::SignArgs),
    /// Check an image's signature offline: exit 0 valid, 1 not.
    Verify(sign::VerifyArgs),
    /// Print a shell completion script, from these very definitions.
    Completions(CompletionsArgs),
}

#[derive(Args, Debug, Clone)]
pub struct CompletionsArgs {
    /// The shell: bash, zsh or fish (also elvish, powershell).
    pub shell: clap_complete::Shell,
}

/// `fwagent completions SHELL`: the script on stdout.
pub fn completions(args: CompletionsArgs) -> std::process::ExitCode {
    use clap::CommandFactory;
    use std::io::Write;
    let mut script = Vec::new();
    clap_complete::generate(args.shell, &mut Cli::command(), "fwagent", &mut script);
    match std::io::stdout().write_all(&script) {
        // A reader that stopped early (`| head`) wanted no more.
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fwagent completions: cannot write: {e}");
            std::process::ExitCode::from(exit::UNREACHABLE)
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct CheckArgs {
    /// The request file; `-` or nothing reads stdin.
    pub file: Option<PathBuf>,
    /// Print the parsed request after the ack (credentials redacted).
    #[arg(long)]
    pub explain: bool,
    /// Command that turns non-text base64 credentials into text.
    #[arg(long, value_name = "CMD")]
    pub credentials_decoder: Option<String>,
    /// Larger images are refused with errorNo 4.
    #[arg(long, value_name = "BYTES", value_parser = at_least_one::<NonZeroU64>)]
    pub max_image_size: Option<NonZeroU64>,
    /// Larger requests are refused with errorNo 1 (as the agent's flag).
    #[arg(long, value_name = "BYTES")]
    pub max_request_bytes: Option<usize>,
    /// Longer sessionId/messageId are refused with errorNo 4 (as the agent's flag).
    #[arg(long, value_name = "BYTES")]
    pub max_id_bytes: Option<usize>,
}

/// The value parser of a count, size or time in which 0 would mean nothing
/// (no attempt, no byte, no time): a `NonZero` integer, so clap refuses 0 as
/// a usage error naming the flag (`invalid value '0' for '--idle-timeout
/// <SECS>': must be at least 1`), and so does the config file's serde.
/// Flags whose 0 means something ("0 = no minimum") keep their plain type.
pub fn at_least_one<T>(s: &str) -> Result<T, String>
where
    T: std::str::FromStr<Err = ParseIntError>,
{
    s.parse().map_err(|e: ParseIntError| match e.kind() {
        IntErrorKind::Zero => "must be at least 1".to_string(),
        _ => e.to_string(),
    })
}

/// The request parser's options from the flags `run` and `check` both take,
/// refused the same way by both (`check` parses exactly as the agent would).
pub fn parse_options(
    max_image_size: Option<NonZeroU64>,
    credentials_decoder: Option<String>,
    max_request_bytes: Option<usize>,
    max_id_bytes: Option<usize>,
) -> Result<crate::protocol::ParseOptions, String> {
    if let Some(n) = max_request_bytes {
        let ceiling = crate::protocol::MAX_REQUEST_BYTES_CEILING;
        if n == 0 || n > ceiling {
            return Err(format!("--max-request-bytes must be 1..={ceiling}"));
        }
    }
    if max_id_bytes == Some(0) {
        return Err("--max-id-bytes must be at least 1".into());
    }
    Ok(crate::protocol::ParseOptions {
        max_image_size: max_image_size.map(NonZeroU64::get),
        credentials_decoder,
        max_request_bytes,
        max_id_bytes,
    })
}

#[derive(Args, Debug, Clone)]
pub struct StateArgs {
    /// Where the agent keeps its store.
    #[arg(long, env = "FWAGENT_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Machine-readable output (shapes of spec/INTERFACE.md).
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug, Clone)]
pub struct HistoryArgs {
    #[command(flatten)]
    pub state: StateArgs,
    /// At most this many upgrades.
    #[arg(long)]
    pub limit: Option<usize>,
}

#[derive(Args, Debug, Clone)]
pub struct ShowArgs {
    #[command(flatten)]
    pub state: StateArgs,
    pub message_id: String,
}

#[derive(Args, Debug, Clone)]
pub struct SubmitArgs {
    #[command(flatten)]
    pub state: StateArgs,
    /// The request file; `-` reads stdin.
    pub file: PathBuf,
}

#[derive(Args, Debug, Clone)]
pub struct CancelArgs {
    #[command(flatten)]
    pub state: StateArgs,
    /// The upgrade to cancel; the active one when omitted.
    pub message_id: Option<String>,
}
