//! `fwagent status|history|show|watch|submit|cancel`: inspecting and steering
//! the agent without stopping it.
//!
//! Each command first tries the agent's control socket
//! (`<state-dir>/control.sock`, see [`crate::control`]). When nothing answers
//! there (no socket, or a stale file a dead agent left), `status`, `history`
//! and `show` open the store themselves and say so; `watch` prints one status
//! line; `submit` and `cancel` need the agent and exit 3. A store that is
//! locked while its socket does not answer is an agent we cannot reach: exit 3.
//!
//! Output: `--json` prints the shapes of spec/INTERFACE.md (one JSON value, on
//! one line; `watch --json` one view per change); otherwise the renderings of
//! [`super::view`]. Nothing printed ever carries a credential or a `passPort`:
//! only views go out, never a stored job.
//!
//! Exit codes: 0 done; 1 `submit` got an ack with errorNo ≠ 0, `cancel` was
//! refused, `show` found no such upgrade, or the upgrade `watch` followed did
//! not complete; 2 usage (clap), or `submit` could not read its file; 3 no
//! state directory, the store cannot be opened, or the agent cannot be reached.

use super::view::{self, Paint};
use super::{exit, CancelArgs, HistoryArgs, ShowArgs, StateArgs, SubmitArgs};
use crate::control::{Client, ClientError, ErrorCode, Refusal, Request};
use crate::runtime::Paths;
use crate::views::{self, DetailView, JobView};
use base64::Engine as _;
use fwagent_state::{PhaseName, Store};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use serde_json::Value;
use std::collections::VecDeque;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};
use time::OffsetDateTime;

mod watch;

pub use watch::watch;

/// Why a command stops: its exit code and what to say on stderr.
#[derive(Debug)]
struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    fn unreachable(message: impl Into<String>) -> Failure {
        Failure {
            code: exit::UNREACHABLE,
            message: message.into(),
        }
    }

    fn rejected(message: impl Into<String>) -> Failure {
        Failure {
            code: exit::REJECTED,
            message: message.into(),
        }
    }
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        Failure::unreachable(e.to_string())
    }
}

/// Run a command body; report its failure on stderr as `fwagent <verb>: ...`.
fn finish(verb: &str, result: Result<u8, Failure>) -> ExitCode {
    match result {
        Ok(code) => ExitCode::from(code),
        Err(f) => {
            eprintln!("fwagent {verb}: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

/// Write to stdout; a closed pipe (`| head`) is not an error worth a panic.
fn out(text: &str) {
    let mut stdout = std::io::stdout().lock();
    let _ = stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush());
}

fn json_line<T: Serialize>(value: &T) -> Result<String, Failure> {
    serde_json::to_string(value)
        .map(|mut s| {
            s.push('\n');
            s
        })
        .map_err(|e| Failure::unreachable(format!("cannot encode the output: {e}")))
}

fn socket_of(state: &StateArgs) -> PathBuf {
    Paths {
        state_dir: state.state_dir.clone(),
    }
    .control_socket()
}

fn require_state_dir(state: &StateArgs) -> Result<(), Failure> {
    if state.state_dir.is_dir() {
        return Ok(());
    }
    Err(Failure::unreachable(format!(
        "no state directory at {} (no agent has run with this --state-dir; \
         set --state-dir or FWAGENT_STATE_DIR)",
        state.state_dir.display()
    )))
}

/// Where the answers come from.
enum Source {
    /// The running agent, through its control socket.
    Live { client: Client, pid: Option<u64> },
    /// The store itself (no agent runs); `None` when the directory holds no
    /// store yet.
    Offline { store: Option<Store>, dir: PathBuf },
}

/// Send one request; a transport failure is exit 3.
fn call(client: &mut Client, request: &Request) -> Result<Result<Value, Refusal>, Failure> {
    Ok(client.call(request)?)
}

/// A request whose refusal is the agent's trouble, not the user's: exit 3.
fn call_ok(client: &mut Client, request: &Request) -> Result<Value, Failure> {
    call(client, request)?
        .map_err(|r| Failure::unreachable(format!("the agent could not answer: {}", r.error)))
}

fn field<T: serde::de::DeserializeOwned>(mut payload: Value, key: &str) -> Result<T, Failure> {
    serde_json::from_value(payload[key].take())
        .map_err(|e| Failure::unreachable(format!("the agent's answer has no valid `{key}`: {e}")))
}

/// Connect to the agent, and check it answers. `Ok(Err(_))`: nobody listens
/// (no socket, a stale one, or an agent that closes on us as it stops).
fn connect(state: &StateArgs) -> Result<Result<(Client, Option<u64>), ClientError>, Failure> {
    let mut client = match Client::connect(&socket_of(state)) {
        Ok(c) => c,
        Err(e) => return Ok(Err(e)),
    };
    let hello = match client.call(&Request::Hello {}) {
        Ok(Ok(hello)) => hello,
        Ok(Err(r)) => {
            return Err(Failure::unreachable(format!(
                "the agent could not answer: {}",
                r.error
            )))
        }
        Err(e @ ClientError::Closed { .. }) => return Ok(Err(e)),
        Err(e) => return Err(e.into()),
    };
    let pid = hello["pid"].as_u64();
    Ok(Ok((client, pid)))
}

fn open(state: &StateArgs) -> Result<Source, Failure> {
    require_state_dir(state)?;
    match connect(state)? {
        Ok((client, pid)) => Ok(Source::Live { client, pid }),
        Err(not_live) => open_store(&state.state_dir, &not_live),
    }
}

/// Open the store directly, after `not_live` said no agent answers. An
/// agent that is stopping releases the store a moment after its socket goes:
/// wait that long, no longer.
fn open_store(dir: &Path, not_live: &ClientError) -> Result<Source, Failure> {
    const GRACE: Duration = Duration::from_secs(3);
    if !dir.join("db").exists() {
        return Ok(Source::Offline {
            store: None,
            dir: dir.to_path_buf(),
        });
    }
    let started = Instant::now();
    loop {
        match Store::open(dir, "fwagent-cli") {
            Ok(store) => {
                return Ok(Source::Offline {
                    store: Some(store),
                    dir: dir.to_path_buf(),
                })
            }
            Err(fwagent_state::StoreError::Locked { .. }) if started.elapsed() < GRACE => {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(fwagent_state::StoreError::Locked { .. }) => {
                return Err(Failure::unreachable(format!(
                    "the store in {} is held by another process (an agent?), but no agent \
                     answers on its control socket ({not_live}); if an agent is starting, \
                     try again in a moment",
                    dir.display()
                )))
            }
            Err(e) => return Err(Failure::unreachable(format!("cannot read the store: {e}"))),
        }
    }
}

fn store_failed(e: fwagent_state::StoreError) -> Failure {
    Failure::unreachable(format!("cannot read the store: {e}"))
}

impl Source {
    fn latest(&mut self) -> Result<Option<JobView>, Failure> {
        match self {
            Source::Live { client, .. } => field(
                call_ok(client, &Request::Status { message_id: None })?,
                "job",
            ),
            Source::Offline { store: None, .. } => Ok(None),
            Source::Offline { store: Some(s), .. } => views::latest(s).map_err(store_failed),
        }
    }

    fn history(&mut self, limit: Option<usize>) -> Result<Vec<JobView>, Failure> {
        match self {
            Source::Live { client, .. } => {
                field(call_ok(client, &Request::History { limit })?, "jobs")
            }
            Source::Offline { store: None, .. } => Ok(Vec::new()),
            Source::Offline { store: Some(s), .. } => {
                views::history(s, limit).map_err(store_failed)
            }
        }
    }

    fn detail(&mut self, message_id: &str) -> Result<Option<DetailView>, Failure> {
        match self {
            Source::Live { client, .. } => {
                let request = Request::Show {
                    message_id: message_id.to_string(),
                };
                match call(client, &request)? {
                    Ok(payload) => field(payload, "job"),
                    Err(Refusal {
                        code: Some(ErrorCode::NotFound),
                        ..
                    }) => Ok(None),
                    Err(r) => Err(Failure::unreachable(format!(
                        "the agent could not answer: {}",
                        r.error
                    ))),
                }
            }
            Source::Offline { store: None, .. } => Ok(None),
            Source::Offline { store: Some(s), .. } => {
                views::detail(s, message_id).map_err(store_failed)
            }
        }
    }

    /// Which way the answer came, for people.
    fn describe(&self) -> String {
        match self {
            Source::Live { pid: Some(pid), .. } => {
                format!("live from the running agent, pid {pid}")
            }
            Source::Live { pid: None, .. } => "live from the running agent".to_string(),
            Source::Offline { dir, .. } => {
                format!(
                    "no agent is running: read from the store in {}",
                    dir.display()
                )
            }
        }
    }

    fn is_live(&self) -> bool {
        matches!(self, Source::Live { .. })
    }

    /// Human output ends with where it came from; `--json` output stays
    /// clean, and an offline read is noted on stderr.
    fn footer(&self, verb: &str, json: bool, paint: Paint) -> String {
        if json {
            if !self.is_live() {
                eprintln!("fwagent {verb}: {}", self.describe());
            }
            String::new()
        } else {
            format!("{}\n", paint.dim(&format!("({})", self.describe())))
        }
    }
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

/// A detail view for a job whose log could not be fetched (it vanished
/// between two live calls): the view alone.
fn bare(v: JobView) -> DetailView {
    DetailView {
        job: v,
        url: String::new(),
        last_error: None,
        log: Vec::new(),
        outbox: Vec::new(),
    }
}

// ---- status, history, show ---------------------------------------------------------

pub fn status(a: StateArgs) -> ExitCode {
    finish("status", status_(&a))
}

fn status_(a: &StateArgs) -> Result<u8, Failure> {
    let mut src = open(a)?;
    let latest = src.latest()?;
    let paint = Paint::stdout();
    let text = if a.json {
        json_line(&latest)?
    } else {
        match latest {
            None => "no upgrade recorded yet\n".to_string(),
            Some(v) => {
                let d = src.detail(&v.message_id)?.unwrap_or_else(|| bare(v));
                view::render_status(&d, now(), src.is_live(), paint)
            }
        }
    };
    out(&(text + &src.footer("status", a.json, paint)));
    Ok(exit::OK)
}

pub fn history(a: HistoryArgs) -> ExitCode {
    finish("history", history_(&a))
}

fn history_(a: &HistoryArgs) -> Result<u8, Failure> {
    let mut src = open(&a.state)?;
    let jobs = src.history(a.limit)?;
    let paint = Paint::stdout();
    let text = if a.state.json {
        json_line(&jobs)?
    } else {
        view::render_history(&jobs, now(), paint)
    };
    out(&(text + &src.footer("history", a.state.json, paint)));
    Ok(exit::OK)
}

pub fn show(a: ShowArgs) -> ExitCode {
    finish("show", show_(&a))
}

fn show_(a: &ShowArgs) -> Result<u8, Failure> {
    let mut src = open(&a.state)?;
    let Some(d) = src.detail(&a.message_id)? else {
        return Err(Failure::rejected(format!(
            "no upgrade with messageId {} ({})",
            a.message_id,
            src.describe()
        )));
    };
    let paint = Paint::stdout();
    let text = if a.state.json {
        json_line(&d)?
    } else {
        view::render_show(&d, now(), src.is_live(), paint)
    };
    out(&(text + &src.footer("show", a.state.json, paint)));
    Ok(exit::OK)
}

// ---- submit, cancel -------------------------------------------------------------------

/// Connect for a command that needs the agent.
fn live_only(state: &StateArgs, verb: &str) -> Result<Client, Failure> {
    require_state_dir(state)?;
    match connect(state)? {
        Ok((client, _)) => Ok(client),
        Err(e) => Err(Failure::unreachable(format!(
            "no agent is running ({e}); `{verb}` needs one: start it with `fwagent run --state-dir {}`",
            state.state_dir.display()
        ))),
    }
}

pub fn submit(a: SubmitArgs) -> ExitCode {
    finish("submit", submit_(&a))
}

fn submit_(a: &SubmitArgs) -> Result<u8, Failure> {
    let bytes = super::check::read_request(Some(&a.file)).map_err(|e| Failure {
        code: exit::USAGE,
        message: format!("cannot read {}: {e}", a.file.display()),
    })?;
    let mut client = live_only(&a.state, "submit")?;
    let request = match String::from_utf8(bytes) {
        Ok(text) => Request::Submit {
            request: Some(text),
            request_base64: None,
        },
        Err(e) => Request::Submit {
            request: None,
            request_base64: Some(base64::engine::general_purpose::STANDARD.encode(e.into_bytes())),
        },
    };
    let payload = call_ok(&mut client, &request)?;
    let ack = payload["ack"]
        .as_str()
        .ok_or_else(|| Failure::unreachable("the agent's answer has no ack"))?;
    let error_no = payload["errorNo"].as_u64().unwrap_or(u64::MAX);
    let mut text = format!("{ack}\n");
    if !a.state.json {
        let paint = Paint::stdout();
        if error_no == 0 {
            text.push_str(&paint.dim(&format!(
                "(accepted; follow it with `fwagent watch --state-dir {}`)\n",
                a.state.state_dir.display()
            )));
        } else {
            text.push_str(&paint.dim(&format!("(rejected with errorNo {error_no})\n")));
        }
    }
    out(&text);
    Ok(if error_no == 0 {
        exit::OK
    } else {
        exit::REJECTED
    })
}

pub fn cancel(a: CancelArgs) -> ExitCode {
    finish("cancel", cancel_(&a))
}

fn cancel_(a: &CancelArgs) -> Result<u8, Failure> {
    let mut client = live_only(&a.state, "cancel")?;
    let request = Request::Cancel {
        message_id: a.message_id.clone(),
    };
    match call(&mut client, &request)? {
        Ok(payload) => {
            let v: JobView = field(payload, "job")?;
            let text = if a.state.json {
                json_line(&v)?
            } else {
                let paint = Paint::stdout();
                format!(
                    "{}\n{}\n",
                    view::headline(&v, None, paint),
                    paint.dim(&format!(
                        "({} {}: the result is reported to the cloud and the partial download removed)",
                        v.firmware_name, v.message_id
                    ))
                )
            };
            out(&text);
            Ok(exit::OK)
        }
        Err(Refusal {
            code: Some(ErrorCode::Refused | ErrorCode::NotFound),
            error,
        }) => Err(Failure::rejected(format!("refused: {error}"))),
        Err(r) => Err(Failure::unreachable(format!(
            "the agent could not answer: {}",
            r.error
        ))),
    }
}
