//! FTP downloads with async-ftp 6, plain FTP only (`ftps` stays unsupported:
//! the agent answers errorNo 5 for it).
//!
//! One attempt: connect, log in (an empty user name is `anonymous`), `TYPE I`,
//! `SIZE` checked against the declared size before any byte is fetched, `MDTM`
//! where the server has it, `REST` from the durable offset, `PASV` + `RETR`
//! streamed through the [`Sink`] chunk by chunk, then the final `226` read and
//! checked. `SIZE` and `MDTM` are the file's validator (`size=N;mdtm=...`): if
//! either differs on resume, the partial file is dropped and the download
//! starts again from zero, so a changed file is never spliced. async-ftp has
//! no timeouts of its own: the connect and greeting are bounded by
//! `connect_timeout`, every later reply and every data read by
//! `idle_timeout`. Replies map to PROTOCOL.md: no connection → 20, 530 → 21,
//! 550 → 22, a `SIZE` other than the declared size → 30, anything else
//! (other replies, timeouts, a dropped data connection) → retryable 23.
//! The data connection goes to the control connection's own address: of the
//! `PASV` reply only the port is used (as curl does by default), so a server
//! cannot send the agent to another host. async-ftp panics on some malformed
//! replies (an impossible `MDTM` date): a panic is caught and reported as a
//! retryable 23, so a broken server cannot leave an upgrade hanging.

use super::download::{no_data, size_mismatch, BoxFuture, FetchJob, Fetcher, Sink};
use async_ftp::types::FileType;
use async_ftp::{FtpError, FtpStream};
use bytes::BytesMut;
use fwagent_state::{result_no, Failure};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::time::timeout;

/// Bytes asked of the data connection per read (one chunk for the sink).
const CHUNK: usize = 128 << 10;
/// The password sent for an anonymous login, as browsers and curl do.
const ANONYMOUS_PASSWORD: &str = "anonymous@";
/// How long `QUIT` may take; its answer changes nothing.
const QUIT_WAIT: Duration = Duration::from_secs(2);

/// Fetches `ftp://` URLs. Holds no state: every attempt opens its own
/// control connection, with the limits of the job's `Transfer`.
#[derive(Clone, Copy, Debug, Default)]
pub struct FtpFetcher;

impl FtpFetcher {
    pub fn new() -> Self {
        FtpFetcher
    }
}

impl Fetcher for FtpFetcher {
    fn fetch<'a>(
        &'a self,
        job: &'a FetchJob,
        sink: &'a mut Sink,
    ) -> BoxFuture<'a, Result<(), Failure>> {
        Box::pin(CatchPanic(Box::pin(fetch(job, sink))))
    }

    fn fetch_small<'a>(
        &'a self,
        job: &'a FetchJob,
        url: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, Failure>> {
        Box::pin(CatchPanic(Box::pin(fetch_small(job, url, limit))))
    }
}

/// Why one FTP step failed, before it becomes a PROTOCOL.md result.
#[derive(Debug)]
enum StepError {
    /// No answer within the step's limit.
    Timeout(Duration),
    /// The control or data connection failed.
    Io(std::io::Error),
    /// The server answered with an unexpected reply.
    Reply { code: u32, text: String },
    /// Something that is not an FTP reply at all.
    Protocol(String),
}

impl From<FtpError> for StepError {
    fn from(e: FtpError) -> Self {
        match e {
            FtpError::ConnectionError(io) => StepError::Io(io),
            FtpError::InvalidResponse(text) => match reply_of(&text) {
                Some((code, text)) => StepError::Reply { code, text },
                None => StepError::Protocol(text),
            },
            FtpError::SecureError(text) => StepError::Protocol(text),
            FtpError::InvalidAddress(e) => {
                StepError::Protocol(format!("bad address in a reply: {e}"))
            }
        }
    }
}

/// The reply code and text in async-ftp's "Expected code [..], got response:
/// NNN text" error.
fn reply_of(error: &str) -> Option<(u32, String)> {
    let (_, reply) = error.split_once("got response: ")?;
    let digits = reply.get(..3)?;
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let code = digits.parse().ok()?;
    Some((code, shown(reply.get(3..).unwrap_or_default())))
}

/// A server's text as it may appear in a description: one line of printable
/// characters, at most 160 of them.
fn shown(text: &str) -> String {
    let text: String = text
        .trim()
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(160)
        .collect();
    text
}

impl std::fmt::Display for StepError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StepError::Timeout(limit) => write!(f, "no answer within {limit:?}"),
            StepError::Io(e) => write!(f, "{e}"),
            StepError::Reply { code, text } if text.is_empty() => {
                write!(f, "the server answered {code}")
            }
            StepError::Reply { code, text } => write!(f, "the server answered {code} {text}"),
            StepError::Protocol(text) => write!(f, "{}", shown(text)),
        }
    }
}

/// One async-ftp call, bounded by `limit`.
async fn bounded<T>(
    limit: Duration,
    call: impl Future<Output = Result<T, FtpError>>,
) -> Result<T, StepError> {
    match timeout(limit, call).await {
        Err(_) => Err(StepError::Timeout(limit)),
        Ok(Err(e)) => Err(e.into()),
        Ok(Ok(v)) => Ok(v),
    }
}

/// What was being done when a step failed: decides the result number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    Connect,
    Login,
    Other,
}

/// A failed step as PROTOCOL.md's result: during the connect everything is
/// 20; 530 (and 430) → 21, 550 → 22; the rest is a retryable 23. `what`
/// names the step and never carries a credential.
fn failure(step: Step, what: &str, e: StepError) -> Failure {
    let description = format!("{what}: {e}");
    match (step, &e) {
        (Step::Connect, _) => Failure::new(result_no::CONNECT, description, true),
        (
            _,
            StepError::Reply {
                code: 530 | 430, ..
            },
        ) => Failure::new(result_no::AUTH, description, false),
        (_, StepError::Reply { code: 550, .. }) => {
            Failure::new(result_no::NOT_FOUND, description, false)
        }
        (Step::Login | Step::Other, _) => Failure::new(result_no::TRANSFER, description, true),
    }
}

/// The file's path on the server: the URL's path, percent-decoded. Refuses
/// what could split an FTP command (CR, LF, NUL).
fn remote_path(url: &str) -> Result<String, Failure> {
    let bad = |why: String| Failure::new(result_no::TRANSFER, why, false);
    let parsed = url::Url::parse(url).map_err(|e| bad(format!("bad URL: {e}")))?;
    let raw = parsed.path().as_bytes();
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let hex = raw
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (raw[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    let path = String::from_utf8(out).map_err(|_| bad("the file's path is not UTF-8".into()))?;
    if path.chars().any(char::is_control) {
        return Err(bad("the file's path contains control characters".into()));
    }
    if path.is_empty() || path.ends_with('/') {
        return Err(bad(format!("the URL names no file: {url}")));
    }
    Ok(path)
}

/// `size=N`, plus `;mdtm=YYYYMMDDhhmmss` (UTC) where the server has MDTM.
fn validator_of(size: u64, mdtm: Option<&str>) -> String {
    match mdtm {
        Some(m) => format!("size={size};mdtm={m}"),
        None => format!("size={size}"),
    }
}

/// A Unix time as MDTM writes it.
fn mdtm_text(unix: i64) -> Option<String> {
    let t = time::OffsetDateTime::from_unix_timestamp(unix).ok()?;
    t.format(time::macros::format_description!(
        "[year][month][day][hour][minute][second]"
    ))
    .ok()
}

/// One attempt, start to end.
async fn fetch(job: &FetchJob, sink: &mut Sink) -> Result<(), Failure> {
    let path = remote_path(&job.source.url)?;
    let mut ftp = open(job).await?;
    let fetched = download(&mut ftp, job, &path, sink).await;
    // Be polite, briefly: the answer to QUIT changes nothing.
    let _ = timeout(QUIT_WAIT, ftp.quit()).await;
    fetched
}

/// The small file at `url` (beside the image) into memory, over a control
/// connection of its own with the image's login; `None` on a 550.
async fn fetch_small(job: &FetchJob, url: &str, limit: usize) -> Result<Option<Vec<u8>>, Failure> {
    let path = remote_path(url)?;
    let mut ftp = open(job).await?;
    let fetched = retr_small(&mut ftp, job, &path, limit).await;
    let _ = timeout(QUIT_WAIT, ftp.quit()).await;
    match fetched {
        Err(f) if f.error_no == result_no::NOT_FOUND => Ok(None),
        other => other.map(Some),
    }
}

/// RETR `path`, at most `limit` bytes, then the final reply.
async fn retr_small(
    ftp: &mut FtpStream,
    job: &FetchJob,
    path: &str,
    limit: usize,
) -> Result<Vec<u8>, Failure> {
    let idle = job.transfer.idle_timeout;
    let mut data = retr(ftp, path, idle)
        .await
        .map_err(|e| failure(Step::Other, &format!("RETR {path}"), e))?;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = match timeout(idle, data.read(&mut buf)).await {
            Err(_) => return Err(no_data(idle, out.len() as u64)),
            Ok(Err(e)) => {
                return Err(Failure::new(
                    result_no::TRANSFER,
                    format!("the data connection broke at byte {}: {e}", out.len()),
                    true,
                ))
            }
            Ok(Ok(0)) => break,
            Ok(Ok(n)) => n,
        };
        if out.len() + n > limit {
            return Err(Failure::new(
                result_no::TRANSFER,
                format!("RETR {path}: larger than {limit} bytes, not a signature file"),
                false,
            ));
        }
        out.extend_from_slice(&buf[..n]);
    }
    drop(data);
    bounded(idle, ftp.read_response_in(&[226, 250]))
        .await
        .map_err(|e| failure(Step::Other, &format!("RETR {path}"), e))?;
    Ok(out)
}

/// Connect, log in, binary type.
async fn open(job: &FetchJob) -> Result<FtpStream, Failure> {
    let t = &job.transfer;
    let source = &job.source;
    let at = format!("cannot connect to {}:{}", source.host, source.port);
    let mut ftp = bounded(
        t.connect_timeout,
        FtpStream::connect((source.host.as_str(), source.port)),
    )
    .await
    .map_err(|e| failure(Step::Connect, &at, e))?;
    let (user, password) = if source.user.is_empty() {
        let password = if source.password.is_empty() {
            ANONYMOUS_PASSWORD
        } else {
            source.password.expose()
        };
        ("anonymous", password)
    } else {
        (source.user.expose(), source.password.expose())
    };
    bounded(t.idle_timeout, ftp.login(user, password))
        .await
        .map_err(|e| match e {
            // The login's reply text is left out: a server may echo the name.
            StepError::Reply { code, .. } => StepError::Reply {
                code,
                text: String::new(),
            },
            e => e,
        })
        .map_err(|e| failure(Step::Login, "the server refused the login", e))?;
    bounded(t.idle_timeout, ftp.transfer_type(FileType::Binary))
        .await
        .map_err(|e| failure(Step::Other, "TYPE I", e))?;
    Ok(ftp)
}

/// SIZE, MDTM, REST, RETR, the data, the final reply.
async fn download(
    ftp: &mut FtpStream,
    job: &FetchJob,
    path: &str,
    sink: &mut Sink,
) -> Result<(), Failure> {
    let idle = job.transfer.idle_timeout;
    identify(ftp, job, path, sink).await?;
    resume(ftp, job, sink).await?;
    let offset = sink.offset();
    let mut data = retr(ftp, path, idle)
        .await
        .map_err(|e| failure(Step::Other, &format!("RETR {path}"), e))?;
    stream(&mut data, idle, sink).await?;
    drop(data);
    // 226 (or 250): the server says the whole file was sent.
    bounded(idle, ftp.read_response_in(&[226, 250]))
        .await
        .map_err(|e| {
            failure(
                Step::Other,
                &format!(
                    "RETR {path} from byte {offset}, after byte {}",
                    sink.offset()
                ),
                e,
            )
        })?;
    Ok(())
}

/// SIZE and MDTM: is the server's file the image, and the one the partial
/// file came from? If not, the partial file starts again from zero.
async fn identify(
    ftp: &mut FtpStream,
    job: &FetchJob,
    path: &str,
    sink: &mut Sink,
) -> Result<(), Failure> {
    let idle = job.transfer.idle_timeout;
    let size = bounded(idle, ftp.size(path))
        .await
        .map_err(|e| failure(Step::Other, &format!("SIZE {path}"), e))?
        .ok_or_else(|| {
            Failure::new(
                result_no::TRANSFER,
                format!("SIZE {path}: no size in the reply"),
                true,
            )
        })? as u64;
    if size != job.firmware.size {
        return Err(size_mismatch(size, job.firmware.size));
    }
    // MDTM is optional (RFC 3659): a refusal only means no date in the validator.
    let mdtm = match bounded(idle, ftp.mdtm(path)).await {
        Ok(date) => date.and_then(|d| mdtm_text(d.timestamp())),
        Err(StepError::Reply { .. }) => None,
        Err(e) => return Err(failure(Step::Other, &format!("MDTM {path}"), e)),
    };
    let validator = validator_of(size, mdtm.as_deref());
    if sink.offset() > 0 && sink.validator() != Some(validator.as_str()) {
        sink.restart(Some(validator)).await
    } else {
        sink.set_validator(Some(validator));
        Ok(())
    }
}

/// REST to the partial file's offset; a server without REST sends the
/// whole file again (the same file), so the partial file restarts.
async fn resume(ftp: &mut FtpStream, job: &FetchJob, sink: &mut Sink) -> Result<(), Failure> {
    let offset = sink.offset();
    if offset == 0 {
        return Ok(());
    }
    match bounded(job.transfer.idle_timeout, ftp.restart_from(offset)).await {
        Ok(()) => Ok(()),
        Err(StepError::Reply { code, .. }) if (500..=504).contains(&code) => {
            tracing::info!(
                job = job.job,
                offset,
                code,
                "the server refused REST; starting from zero"
            );
            let validator = sink.validator().map(str::to_string);
            sink.restart(validator).await
        }
        Err(e) => Err(failure(Step::Other, &format!("REST {offset}"), e)),
    }
}

/// The data connection into the sink, each read within `idle` of the last.
async fn stream(data: &mut TcpStream, idle: Duration, sink: &mut Sink) -> Result<(), Failure> {
    let mut buf = BytesMut::with_capacity(CHUNK);
    loop {
        buf.reserve(CHUNK);
        let n = match timeout(idle, data.read_buf(&mut buf)).await {
            Err(_) => return Err(no_data(idle, sink.offset())),
            Ok(Err(e)) => {
                return Err(Failure::new(
                    result_no::TRANSFER,
                    format!("the data connection broke at byte {}: {e}", sink.offset()),
                    true,
                ))
            }
            Ok(Ok(n)) => n,
        };
        if n == 0 {
            return Ok(());
        }
        sink.write(buf.split().freeze()).await?;
    }
}

/// `PASV`, then `RETR path` over a data connection to the control
/// connection's peer address and the port the `PASV` reply names (its address
/// is ignored). Each step is bounded by `limit`. async-ftp's own `get` would
/// connect wherever the reply points; its command writer is private, so the
/// two commands go straight to the control socket (async-ftp buffers only
/// what it reads, so nothing is reordered).
async fn retr(ftp: &mut FtpStream, path: &str, limit: Duration) -> Result<TcpStream, StepError> {
    let peer = ftp.get_ref().peer_addr().map_err(StepError::Io)?;
    send(ftp, "PASV\r\n", limit).await?;
    let reply = bounded(limit, ftp.read_response(227)).await?;
    let port = pasv_port(&reply.1)
        .ok_or_else(|| StepError::Protocol(format!("a PASV reply without a port: {}", reply.1)))?;
    send(ftp, &format!("RETR {path}\r\n"), limit).await?;
    let data = match timeout(limit, TcpStream::connect((peer.ip(), port))).await {
        Err(_) => return Err(StepError::Timeout(limit)),
        Ok(Err(e)) => return Err(StepError::Io(e)),
        Ok(Ok(stream)) => stream,
    };
    bounded(limit, ftp.read_response_in(&[150, 125])).await?;
    Ok(data)
}

/// Write one command to the control connection, within `limit`.
async fn send(ftp: &FtpStream, command: &str, limit: Duration) -> Result<(), StepError> {
    let stream = ftp.get_ref();
    let mut rest = command.as_bytes();
    let deadline = tokio::time::Instant::now() + limit;
    while !rest.is_empty() {
        match tokio::time::timeout_at(deadline, stream.writable()).await {
            Err(_) => return Err(StepError::Timeout(limit)),
            Ok(Err(e)) => return Err(StepError::Io(e)),
            Ok(Ok(())) => {}
        }
        match stream.try_write(rest) {
            Ok(n) => rest = &rest[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(StepError::Io(e)),
        }
    }
    Ok(())
}

/// The port of a `227` reply: the first six comma-separated numbers
/// (`h1,h2,h3,h4,p1,p2`, each at most 255) give `p1 * 256 + p2`. The address
/// part is checked for form only; port 0 is no port.
fn pasv_port(reply: &str) -> Option<u16> {
    let text = reply.get(3..)?;
    text.split(|c: char| !(c.is_ascii_digit() || c == ','))
        .find_map(|run| {
            let numbers: Vec<u8> = run
                .split(',')
                .map(|n| n.parse().ok())
                .collect::<Option<_>>()?;
            match numbers[..] {
                [_, _, _, _, p1, p2] => Some(u16::from(p1) << 8 | u16::from(p2)),
                _ => None,
            }
        })
        .filter(|port| *port != 0)
}

/// A future whose panic becomes a retryable transfer failure: async-ftp
/// unwraps some values from the server's replies.
struct CatchPanic<'a, T>(BoxFuture<'a, Result<T, Failure>>);

impl<T> Future for CatchPanic<'_, T> {
    type Output = Result<T, Failure>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = &mut self.0;
        match std::panic::catch_unwind(AssertUnwindSafe(|| inner.as_mut().poll(cx))) {
            Ok(poll) => poll,
            Err(_) => Poll::Ready(Err(Failure::new(
                result_no::TRANSFER,
                "the FTP client could not read the server's reply (async-ftp panicked)",
                true,
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_codes_come_out_of_async_ftp_errors() {
        let e = "Expected code [230], got response: 530 Login incorrect.\r\n";
        assert_eq!(reply_of(e), Some((530, "Login incorrect.".into())));
        assert_eq!(
            reply_of("Expected code [150, 125], got response: 550"),
            Some((550, String::new()))
        );
        assert_eq!(reply_of("error: could not read reply code"), None);
        assert_eq!(reply_of("Expected code [213], got response: 5é"), None);
    }

    #[test]
    fn replies_map_to_result_numbers() {
        let reply = |code| StepError::Reply {
            code,
            text: "x".into(),
        };
        let no = |step, e| {
            let f = failure(step, "step", e);
            (f.error_no, f.retryable)
        };
        assert_eq!(no(Step::Connect, reply(421)), (20, true));
        assert_eq!(
            no(
                Step::Connect,
                StepError::Io(std::io::ErrorKind::ConnectionRefused.into())
            ),
            (20, true)
        );
        assert_eq!(
            no(Step::Connect, StepError::Timeout(Duration::from_secs(1))),
            (20, true)
        );
        assert_eq!(no(Step::Login, reply(530)), (21, false));
        assert_eq!(no(Step::Other, reply(530)), (21, false));
        assert_eq!(no(Step::Other, reply(550)), (22, false));
        assert_eq!(no(Step::Other, reply(451)), (23, true));
        assert_eq!(no(Step::Other, reply(500)), (23, true));
        assert_eq!(no(Step::Login, reply(421)), (23, true));
        assert_eq!(
            no(Step::Other, StepError::Timeout(Duration::from_secs(1))),
            (23, true)
        );
        assert_eq!(no(Step::Other, StepError::Protocol("?".into())), (23, true));
    }

    #[test]
    fn the_remote_path_is_the_decoded_url_path() {
        assert_eq!(
            remote_path("ftp://127.0.0.1:2121/a/b%20c/fw.bin").unwrap(),
            "/a/b c/fw.bin"
        );
        assert_eq!(remote_path("ftp://h/fw%25.bin").unwrap(), "/fw%.bin");
        assert_eq!(remote_path("ftp://h/%E2%82%AC.bin").unwrap(), "/€.bin");
        assert!(remote_path("ftp://h/a%0D%0ADELE%20x").is_err());
        assert!(remote_path("ftp://h/dir/").is_err());
        assert!(remote_path("ftp://h/%FF.bin").is_err());
    }

    #[test]
    fn only_the_port_of_a_pasv_reply_counts() {
        let port = |r| pasv_port(r);
        assert_eq!(
            port("227 Entering Passive Mode (10,0,0,9,4,1)\r\n"),
            Some(1025)
        );
        assert_eq!(port("227 Entering Passive Mode 127,0,0,2,0,21"), Some(21));
        assert_eq!(port("227 =1,2,3,4,255,255"), Some(65535));
        assert_eq!(port("227 Entering Passive Mode (999,0,0,1,4,1)"), None);
        assert_eq!(port("227 Entering Passive Mode (1,2,3,4,5)"), None);
        assert_eq!(port("227 Entering Passive Mode (1,2,3,4,0,0)"), None);
        assert_eq!(port("227 ok"), None);
    }

    #[test]
    fn validators_carry_size_and_date() {
        assert_eq!(validator_of(66143, None), "size=66143");
        let date = mdtm_text(1_593_648_000).unwrap();
        assert_eq!(date, "20200702000000");
        assert_eq!(validator_of(1, Some(&date)), "size=1;mdtm=20200702000000");
    }

    #[test]
    fn server_text_is_one_short_line() {
        assert_eq!(shown("  a\r\nb\t "), "a  b");
        assert_eq!(shown(&"x".repeat(500)).len(), 160);
    }

    /// A fake server whose PASV reply makes async-ftp panic (an octet above
    /// 255): the attempt fails with a retryable 23 instead.
    #[test]
    fn a_panic_in_async_ftp_is_a_retryable_failure() {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        rt.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let port = listener.local_addr().expect("port").port();
            tokio::spawn(async move {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (r, mut w) = stream.into_split();
                let mut lines = BufReader::new(r).lines();
                let _ = w.write_all(b"220 fake\r\n").await;
                while let Ok(Some(line)) = lines.next_line().await {
                    let reply: &[u8] = if line.starts_with("PASV") {
                        b"227 Entering Passive Mode (999,0,0,1,4,1)\r\n"
                    } else {
                        b"200 ok\r\n"
                    };
                    let _ = w.write_all(reply).await;
                }
            });
            let session = async {
                let mut ftp = FtpStream::connect(("127.0.0.1", port))
                    .await
                    .map_err(|e| Failure::new(result_no::CONNECT, e.to_string(), true))?;
                let _ = ftp.get("/fw.bin").await;
                Ok(())
            };
            // The panic's message is printed; the test passes all the same.
            let got = CatchPanic(Box::pin(session)).await;
            let failure = got.expect_err("the panic is caught");
            assert_eq!(
                (failure.error_no, failure.retryable),
                (result_no::TRANSFER, true)
            );
        });
    }
}
