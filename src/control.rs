//! The control socket: how `fwagent status|history|show|watch|submit|cancel`
//! talk to a running agent (sled lets one process open the store, and the
//! agent holds it).
//!
//! A Unix stream socket at `<state-dir>/control.sock`, mode 0600, served on
//! the agent's system arbiter. One JSON request per line, one JSON response
//! per line, as many as the client likes on one connection; docs/CONTROL.md
//! is the reference. Queries run as [`ReadStore`] closures inside the Upgrade
//! actor (the store's only owner) and answer with the views of
//! [`crate::views`], which never carry a credential or a `passPort`;
//! `submit` hands the request to the [`Inbox`] exactly as a transport does
//! (parsed there, then passed on typed) and answers with the ack as the
//! transport would send it; `cancel` is a [`CancelRequest`]. [`Client`] is
//! the blocking client the CLI uses.
//!
//! The socket is bound only after the agent has opened (and so locked) the
//! store, so a socket file left behind by a dead agent is stale by
//! definition and is replaced; when the agent stops, the file is removed if
//! it is still the one this agent bound.

use crate::protocol;
use crate::runtime::messaging::Inbox;
use crate::runtime::upgrade::{CancelRequest, ReadStore, Upgrade};
use crate::views;
use actix::prelude::*;
use base64::Engine as _;
use fwagent_state::StoreError;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read as _, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The version of this protocol, in `hello`'s answer. Additions keep it.
pub const PROTOCOL_VERSION: u32 = 1;

/// The socket's file mode.
pub const SOCKET_MODE: u32 = 0o600;

/// At most this many clients are served at once; one more is told so (an
/// `unavailable` line) and closed.
pub const MAX_CLIENTS: usize = 8;

/// A client that sends no request line for this long is dropped (its
/// connection closed). `watch` asks every 250 ms; a `submit` waiting for its
/// ack is not idle.
pub const CLIENT_IDLE: Duration = Duration::from_secs(60);

/// The longest request line accepted: a `submit` of the largest request any
/// `--max-request-bytes` allows, with every byte escaped, and then some.
pub const MAX_LINE: usize = 6 * protocol::MAX_REQUEST_BYTES_CEILING + 4096;

/// One request line. `cmd` names the command; the other fields are its
/// arguments, camelCase.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "camelCase", deny_unknown_fields)]
pub enum Request {
    /// Who is there: `{"ok":true,"agent":"fwagent","version":..,"protocol":1,"pid":..}`.
    Hello {},
    /// The active upgrade, else the most recent (`{"job":<view>|null}`); with
    /// `messageId`, that upgrade.
    Status {
        #[serde(default, rename = "messageId", skip_serializing_if = "Option::is_none")]
        message_id: Option<String>,
    },
    /// `{"jobs":[<view>...]}`, newest first.
    History {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<usize>,
    },
    /// `{"job":<detail view>}`.
    Show {
        #[serde(rename = "messageId")]
        message_id: String,
    },
    /// A request as the cloud would send it: `request` (text) or
    /// `requestBase64` (bytes that are not UTF-8). `{"ack":"<ack line>","errorNo":n}`.
    Submit {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        request: Option<String>,
        #[serde(
            default,
            rename = "requestBase64",
            skip_serializing_if = "Option::is_none"
        )]
        request_base64: Option<String>,
    },
    /// Cancel the upgrade (the active one without `messageId`): `{"job":<view>}`.
    Cancel {
        #[serde(default, rename = "messageId", skip_serializing_if = "Option::is_none")]
        message_id: Option<String>,
    },
}

/// Why a request failed: the `code` of an `{"ok":false}` response.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Not JSON, not a known command, a missing argument, a line too long.
    BadRequest,
    /// No upgrade with that messageId.
    NotFound,
    /// `cancel` refused (flashing has begun, nothing active, already ended).
    Refused,
    /// The store failed to answer.
    Store,
    /// The agent is shutting down, or gave no answer.
    Unavailable,
}

fn ok(mut payload: Value) -> Value {
    if let Some(map) = payload.as_object_mut() {
        map.insert("ok".into(), Value::Bool(true));
    }
    payload
}

fn fail(code: ErrorCode, error: impl Into<String>) -> Value {
    json!({"ok": false, "code": code, "error": error.into()})
}

/// Why a read on the store gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum AnswerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot encode the answer: {0}")]
    Encode(#[from] serde_json::Error),
}

/// A read on the store, run inside the Upgrade actor: the answer's payload,
/// or why there is none.
pub type Answer = Result<Value, AnswerError>;

/// The agent's actors the socket talks to.
#[derive(Clone)]
pub struct Peers {
    pub read: Recipient<ReadStore<Answer>>,
    /// `submit`: parsed as a transport's requests are, then to the Upgrade actor.
    pub submit: Inbox,
    pub cancel: Recipient<CancelRequest>,
}

impl Peers {
    pub fn new(upgrade: Addr<Upgrade>, submit: Inbox) -> Peers {
        Peers {
            read: upgrade.clone().recipient(),
            submit,
            cancel: upgrade.recipient(),
        }
    }
}

/// Bind the control socket at `path` and serve it on the current arbiter.
/// A failure is logged, not fatal: the agent's work goes on without it.
pub fn serve(path: PathBuf, peers: Peers) {
    match bind(&path) {
        Ok((listener, guard)) => {
            tracing::info!(socket = %path.display(), "control socket listening");
            actix_rt::spawn(accept_loop(listener, guard, peers));
        }
        Err(e) => {
            tracing::error!(socket = %path.display(), error = %e, "cannot serve the control socket; `fwagent status` and friends will not reach this agent");
        }
    }
}

/// Removes the socket file when the server goes, if it is still ours.
struct SocketGuard {
    path: PathBuf,
    dev_ino: (u64, u64),
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        if let Ok(m) = std::fs::symlink_metadata(&self.path) {
            if (m.dev(), m.ino()) == self.dev_ino {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

fn bind(path: &Path) -> std::io::Result<(tokio::net::UnixListener, SocketGuard)> {
    let annotate = |what: &str, e: std::io::Error| {
        std::io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
    };
    // The agent holds the store's lock, so no other agent serves this
    // directory: a socket here is stale. Anything else is left alone.
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            std::fs::remove_file(path)
                .map_err(|e| annotate("cannot remove the stale socket", e))?;
        }
        Ok(_) => {
            return Err(annotate(
                "refusing to replace",
                std::io::Error::new(std::io::ErrorKind::AlreadyExists, "not a socket"),
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(annotate("cannot inspect", e)),
    }
    let listener =
        std::os::unix::net::UnixListener::bind(path).map_err(|e| annotate("cannot bind", e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))
        .map_err(|e| annotate("cannot set the mode of", e))?;
    let m = std::fs::symlink_metadata(path).map_err(|e| annotate("cannot inspect", e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| annotate("cannot configure", e))?;
    let listener =
        tokio::net::UnixListener::from_std(listener).map_err(|e| annotate("cannot register", e))?;
    Ok((
        listener,
        SocketGuard {
            path: path.to_path_buf(),
            dev_ino: (m.dev(), m.ino()),
        },
    ))
}

async fn accept_loop(listener: tokio::net::UnixListener, guard: SocketGuard, peers: Peers) {
    let _guard = guard;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    let clients = Arc::new(Semaphore::new(MAX_CLIENTS));
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                // The mode already keeps others out; this also holds if the
                // directory's or socket's mode is ever loosened.
                match stream.peer_cred() {
                    Ok(cred) if cred.uid() == me || cred.uid() == 0 => {}
                    Ok(cred) => {
                        tracing::warn!(
                            uid = cred.uid(),
                            "control connection from another user refused"
                        );
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot identify a control connection's peer; refused");
                        continue;
                    }
                }
                match clients.clone().try_acquire_owned() {
                    Ok(permit) => {
                        actix_rt::spawn(connection(stream, peers.clone(), permit));
                    }
                    Err(_) => {
                        actix_rt::spawn(turn_away(stream));
                    }
                }
            }
            Err(e) => {
                // Out of file descriptors and the like: wait, then go on.
                tracing::warn!(error = %e, "control socket accept failed");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Tell a client beyond [`MAX_CLIENTS`] why it is not served, and close it.
async fn turn_away(mut stream: tokio::net::UnixStream) {
    tracing::warn!(
        max = MAX_CLIENTS,
        "too many control clients; one more refused"
    );
    let response = fail(
        ErrorCode::Unavailable,
        format!("too many control clients (at most {MAX_CLIENTS} at once); try again"),
    );
    let mut out = response.to_string().into_bytes();
    out.push(b'\n');
    let _ = stream.write_all(&out).await;
}

/// Serve one client until it closes; `_permit` is its place among the
/// [`MAX_CLIENTS`].
async fn connection(stream: tokio::net::UnixStream, peers: Peers, _permit: OwnedSemaphorePermit) {
    let (read, mut write) = stream.into_split();
    let mut read = tokio::io::BufReader::new(read);
    let mut line = Vec::new();
    loop {
        line.clear();
        let mut limited = (&mut read).take(MAX_LINE as u64 + 1);
        let next = limited.read_until(b'\n', &mut line);
        match tokio::time::timeout(CLIENT_IDLE, next).await {
            Ok(Ok(0)) => return,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "control connection read failed");
                return;
            }
            Err(_) => {
                tracing::debug!(
                    idle_secs = CLIENT_IDLE.as_secs(),
                    "control client idle; dropped"
                );
                return;
            }
        }
        let too_long = line.len() > MAX_LINE;
        let text = line.trim_ascii();
        if text.is_empty() && !too_long {
            continue;
        }
        let response = if too_long {
            fail(
                ErrorCode::BadRequest,
                format!("request line longer than {MAX_LINE} bytes"),
            )
        } else {
            answer(text, &peers).await
        };
        let mut out = response.to_string().into_bytes();
        out.push(b'\n');
        if let Err(e) = write.write_all(&out).await {
            tracing::debug!(error = %e, "control connection write failed");
            return;
        }
        if too_long {
            return;
        }
    }
}

/// Run `f` on the store inside the Upgrade actor.
async fn read<F>(peers: &Peers, f: F) -> Value
where
    F: FnOnce(&fwagent_state::Store) -> Answer + Send + 'static,
{
    match peers.read.send(ReadStore(Box::new(f))).await {
        Ok(Ok(payload)) => ok(payload),
        Ok(Err(e)) => fail(ErrorCode::Store, format!("the state store failed: {e}")),
        Err(e) => fail(
            ErrorCode::Unavailable,
            format!("the agent is not answering: {e}"),
        ),
    }
}

fn to_value<T: Serialize>(key: &str, value: T) -> Answer {
    Ok(json!({ key: serde_json::to_value(value)? }))
}

/// The response to one request line.
pub async fn answer(line: &[u8], peers: &Peers) -> Value {
    let request: Request = match serde_json::from_slice(line) {
        Ok(r) => r,
        Err(e) => return fail(ErrorCode::BadRequest, format!("not a control request: {e}")),
    };
    match request {
        Request::Hello {} => ok(json!({
            "agent": "fwagent",
            "version": env!("CARGO_PKG_VERSION"),
            "protocol": PROTOCOL_VERSION,
            "pid": std::process::id(),
        })),
        Request::Status { message_id: None } => {
            read(peers, |s| to_value("job", views::latest(s)?)).await
        }
        Request::Status {
            message_id: Some(mid),
        } => {
            let missing = mid.clone();
            let r = read(peers, move |s| {
                to_value("job", views::by_message_id(s, &mid)?)
            })
            .await;
            not_found_if_null(r, &missing)
        }
        Request::History { limit } => {
            read(peers, move |s| to_value("jobs", views::history(s, limit)?)).await
        }
        Request::Show { message_id } => {
            let missing = message_id.clone();
            let r = read(peers, move |s| {
                to_value("job", views::detail(s, &message_id)?)
            })
            .await;
            not_found_if_null(r, &missing)
        }
        Request::Submit {
            request,
            request_base64,
        } => match submitted_bytes(request, request_base64) {
            Ok(bytes) => submit(bytes, peers).await,
            Err(why) => fail(ErrorCode::BadRequest, why),
        },
        Request::Cancel { message_id } => {
            match peers.cancel.send(CancelRequest { message_id }).await {
                Ok(Ok(job)) => match to_value("job", views::JobView::of(&job)) {
                    Ok(v) => ok(v),
                    Err(e) => fail(ErrorCode::Unavailable, e.to_string()),
                },
                Ok(Err(why)) => fail(ErrorCode::Refused, why.to_string()),
                Err(e) => fail(
                    ErrorCode::Unavailable,
                    format!("the agent is not answering: {e}"),
                ),
            }
        }
    }
}

fn not_found_if_null(response: Value, message_id: &str) -> Value {
    if response["ok"] == Value::Bool(true) && response["job"].is_null() {
        return fail(
            ErrorCode::NotFound,
            format!("no upgrade with messageId {message_id}"),
        );
    }
    response
}

/// The request bytes of a `submit`: its text, or its base64 decoded.
fn submitted_bytes(
    request: Option<String>,
    request_base64: Option<String>,
) -> Result<Vec<u8>, String> {
    match (request, request_base64) {
        (Some(text), None) => Ok(text.into_bytes()),
        (None, Some(b64)) => base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .map_err(|e| format!("requestBase64 is not base64: {e}")),
        (None, None) | (Some(_), Some(_)) => {
            Err("submit needs exactly one of request and requestBase64".into())
        }
    }
}

async fn submit(bytes: Vec<u8>, peers: &Peers) -> Value {
    let Some(incoming) = peers.submit.parse(bytes).await else {
        return fail(
            ErrorCode::Unavailable,
            "the agent gave no ack for the request",
        );
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    if let Err(e) = peers.submit.hand_on(incoming, tx).await {
        return fail(
            ErrorCode::Unavailable,
            format!("the agent is not answering: {e}"),
        );
    }
    match rx.await {
        Ok(ack) => ok(json!({
            "ack": protocol::render_ack(&ack),
            "errorNo": ack.result.error_no,
        })),
        Err(_) => fail(
            ErrorCode::Unavailable,
            "the agent gave no ack for the request",
        ),
    }
}

// ---- the client ------------------------------------------------------------------

/// What can go wrong talking to the agent.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to the agent's control socket {path}: {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the agent at {path} did not answer: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the agent at {path} closed the connection (stopping?)")]
    Closed { path: PathBuf },
    #[error("the agent at {path} answered something that is not a control response: {why}")]
    Malformed { path: PathBuf, why: String },
}

/// A failed request, as the agent explained it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub code: Option<ErrorCode>,
    pub error: String,
}

/// A blocking connection to a running agent.
pub struct Client {
    path: PathBuf,
    reader: BufReader<std::os::unix::net::UnixStream>,
    writer: std::os::unix::net::UnixStream,
}

impl Client {
    /// How long one answer may take (a `submit` includes a flushed commit).
    pub const TIMEOUT: Duration = Duration::from_secs(30);

    /// Connect. An error means no agent serves this socket: absent, or a
    /// stale file a dead agent left behind.
    pub fn connect(path: &Path) -> Result<Client, ClientError> {
        let connect = |source| ClientError::Connect {
            path: path.to_path_buf(),
            source,
        };
        let stream = std::os::unix::net::UnixStream::connect(path).map_err(connect)?;
        stream
            .set_read_timeout(Some(Self::TIMEOUT))
            .map_err(connect)?;
        stream
            .set_write_timeout(Some(Self::TIMEOUT))
            .map_err(connect)?;
        let writer = stream.try_clone().map_err(connect)?;
        Ok(Client {
            path: path.to_path_buf(),
            reader: BufReader::new(stream),
            writer,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Send one request; the response's payload, or the agent's refusal.
    pub fn call(&mut self, request: &Request) -> Result<Result<Value, Refusal>, ClientError> {
        let io = |source| ClientError::Io {
            path: self.path.clone(),
            source,
        };
        let mut line = serde_json::to_vec(request).map_err(|e| ClientError::Malformed {
            path: self.path.clone(),
            why: format!("cannot encode the request: {e}"),
        })?;
        line.push(b'\n');
        self.writer.write_all(&line).map_err(io)?;
        self.writer.flush().map_err(io)?;
        let mut answer = Vec::new();
        let n = (&mut self.reader)
            .take(64 << 20)
            .read_until(b'\n', &mut answer)
            .map_err(io)?;
        if n == 0 {
            return Err(ClientError::Closed {
                path: self.path.clone(),
            });
        }
        let value: Value = serde_json::from_slice(&answer).map_err(|e| ClientError::Malformed {
            path: self.path.clone(),
            why: e.to_string(),
        })?;
        match value.get("ok") {
            Some(Value::Bool(true)) => Ok(Ok(value)),
            Some(Value::Bool(false)) => Ok(Err(Refusal {
                code: value
                    .get("code")
                    .and_then(|c| serde_json::from_value(c.clone()).ok()),
                error: value
                    .get("error")
                    .and_then(Value::as_str)
                    .unwrap_or("no reason given")
                    .to_string(),
            })),
            _ => Err(ClientError::Malformed {
                path: self.path.clone(),
                why: "no \"ok\" field".into(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_their_documented_spelling() {
        let cases = [
            (Request::Hello {}, r#"{"cmd":"hello"}"#),
            (Request::Status { message_id: None }, r#"{"cmd":"status"}"#),
            (
                Request::Status {
                    message_id: Some("MID:1".into()),
                },
                r#"{"cmd":"status","messageId":"MID:1"}"#,
            ),
            (
                Request::History { limit: Some(3) },
                r#"{"cmd":"history","limit":3}"#,
            ),
            (
                Request::Show {
                    message_id: "MID:1".into(),
                },
                r#"{"cmd":"show","messageId":"MID:1"}"#,
            ),
            (
                Request::Submit {
                    request: Some("{}".into()),
                    request_base64: None,
                },
                r#"{"cmd":"submit","request":"{}"}"#,
            ),
            (Request::Cancel { message_id: None }, r#"{"cmd":"cancel"}"#),
        ];
        for (request, text) in cases {
            assert_eq!(serde_json::to_string(&request).unwrap(), text);
            assert_eq!(serde_json::from_str::<Request>(text).unwrap(), request);
        }
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"reboot"}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"show"}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"status","messageID":"x"}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"hello","extra":1}"#).is_err());
    }

    #[test]
    fn responses_carry_ok_and_codes() {
        assert_eq!(ok(json!({"job": null})), json!({"ok": true, "job": null}));
        assert_eq!(
            fail(ErrorCode::NotFound, "no upgrade with messageId X"),
            json!({"ok": false, "code": "not_found", "error": "no upgrade with messageId X"})
        );
        assert_eq!(
            not_found_if_null(ok(json!({"job": null})), "X")["code"],
            json!("not_found")
        );
    }

    #[test]
    fn a_stale_socket_is_replaced_and_removed_on_drop_but_a_file_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(
            Client::connect(&path).is_err(),
            "a stale socket does not answer"
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (listener, guard) = bind(&path).unwrap();
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, SOCKET_MODE);
            let accept = tokio::spawn(async move { listener.accept().await.map(|_| ()) });
            let path2 = path.clone();
            tokio::task::spawn_blocking(move || Client::connect(&path2).map(|_| ()))
                .await
                .unwrap()
                .unwrap();
            accept.await.unwrap().unwrap();
            drop(guard);
        });
        assert!(!path.exists(), "the server's socket goes with it");
        std::fs::write(&path, b"not a socket").unwrap();
        let e = rt.block_on(async { bind(&path).map(|_| ()) }).unwrap_err();
        assert!(e.to_string().contains("refusing to replace"), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), b"not a socket");
    }
}
