//! The wire protocol of spec/PROTOCOL.md: JSON text in, typed values out, and
//! back.
//!
//! [`parse_request`] turns one request's bytes into an [`Incoming`]: a
//! validated [`UpgradeRequest`], or the rejection [`Ack`] it gets (errorNo 1–5).
//! [`render`] and [`render_ack`] turn what the agent says into one JSON line.
//! [`build_url`] makes the firmware's URL from the request's parts, and
//! [`explain`] shows a parsed request with its credentials redacted. Rules that
//! PROTOCOL.md leaves open (length limits, where `passPort` may sit, the
//! credentials decoder's contract) are written down in docs/PROTOCOL-NOTES.md.
//! Nothing here logs, and no error description ever carries a decoded
//! credential or a `passPort`.

use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::{DecodePaddingMode, Engine as _};
use fwagent_state::{
    ack_no, Ack, Firmware, Incoming, OutboxEntry, Outcome, Outgoing, PhaseName, Protocol,
    ReportSubject, Secret, Source, UpgradeRequest, OP_PROGRESS, OP_RESULT, OP_UPGRADE,
};
use serde::Serialize;
use serde_json::{json, Map, Value};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use url::Url;

/// Requests larger than this are refused with errorNo 1 without being parsed.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// The largest `--max-request-bytes` accepted (well inside the 1 MiB MQTT
/// packet limit of the transport).
pub const MAX_REQUEST_BYTES_CEILING: usize = 512 << 10;
/// The largest image accepted when [`ParseOptions::max_image_size`] is `None`:
/// 1 GiB, far above any gateway firmware and low enough that a typo in the
/// cloud (an extra digit) is refused before it fills the disk.
pub const DEFAULT_MAX_IMAGE_SIZE: u64 = 1 << 30;
/// The longest `sessionId` or `messageId` accepted, in bytes (errorNo 4 beyond).
pub const MAX_ID_BYTES: usize = 256;
/// The longest operator echoed in an ack; a longer one is answered as `unknown-Ack`.
pub const MAX_OPERATOR_BYTES: usize = 256;
/// The longest `firmwareName`, in bytes after trimming (a file name limit).
pub const MAX_FIRMWARE_NAME_BYTES: usize = 255;
/// The longest `path`, in bytes.
pub const MAX_PATH_BYTES: usize = 4096;
/// The longest `userName` or `password`, in bytes of base64 text.
pub const MAX_CREDENTIAL_BYTES: usize = 1024;
/// The longest `passPort`, in bytes.
pub const MAX_PASS_PORT_BYTES: usize = 1024;
/// How long the credentials decoder may run before it is killed (errorNo 4).
pub const DECODER_TIMEOUT: Duration = Duration::from_secs(5);
/// The most the credentials decoder may print, in bytes (errorNo 4 beyond).
pub const MAX_DECODER_OUTPUT_BYTES: usize = 4096;
/// The environment variable that tells the decoder which field it decodes
/// (`userName` or `password`).
pub const DECODER_FIELD_ENV: &str = "FWAGENT_CREDENTIAL_FIELD";
/// What [`explain`] shows instead of a credential or a `passPort`.
pub const REDACTED: &str = "<redacted>";
/// The ack's operator (before `-Ack`) when the request's cannot be read.
pub const UNKNOWN_OPERATOR: &str = "unknown";

/// How [`parse_request`] treats the parts that depend on the device.
#[derive(Clone, Debug, Default)]
pub struct ParseOptions {
    /// Larger images are refused with errorNo 4; `None` means
    /// [`DEFAULT_MAX_IMAGE_SIZE`].
    pub max_image_size: Option<u64>,
    /// A shell command (`sh -c CMD`) that turns a credential whose base64
    /// does not decode to text into the plain credential; see
    /// docs/PROTOCOL-NOTES.md for its contract.
    pub credentials_decoder: Option<String>,
    /// Larger requests are refused as malformed (errorNo 1); `None` means
    /// [`MAX_REQUEST_BYTES`]. Capped at [`MAX_REQUEST_BYTES_CEILING`].
    pub max_request_bytes: Option<usize>,
    /// Longer `sessionId`/`messageId` are refused (errorNo 4); `None` means
    /// [`MAX_ID_BYTES`].
    pub max_id_bytes: Option<usize>,
}

impl ParseOptions {
    /// The effective maximum image size in bytes.
    pub fn max_image_size(&self) -> u64 {
        self.max_image_size.unwrap_or(DEFAULT_MAX_IMAGE_SIZE)
    }

    /// The effective maximum request size in bytes.
    pub fn max_request_bytes(&self) -> usize {
        self.max_request_bytes
            .unwrap_or(MAX_REQUEST_BYTES)
            .min(MAX_REQUEST_BYTES_CEILING)
    }

    /// The effective maximum id length in bytes.
    pub fn max_id_bytes(&self) -> usize {
        self.max_id_bytes.unwrap_or(MAX_ID_BYTES)
    }
}

/// Why a request is refused. `Display` is the ack's description; it names the
/// field by its JSON path and never shows a credential or a `passPort`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// errorNo 1: not JSON, not an object, or too large.
    #[error("malformed request: {0}")]
    Malformed(String),
    /// errorNo 2: the operator is not `setCloudUpgradeConfig`. Holds the
    /// operator, already quoted and shortened for display.
    #[error("unsupported operator {0}")]
    UnsupportedOperator(String),
    /// errorNo 3: a required field is missing (absent or `null`).
    #[error("missing required field {0}")]
    Missing(&'static str),
    /// errorNo 4: a field is there but invalid.
    #[error("invalid field {path}: {why}")]
    Invalid { path: &'static str, why: String },
    /// errorNo 5: the protocol is none of http, ftp, https, ftps. Holds the
    /// protocol, already quoted and shortened for display.
    #[error("unsupported protocol {0} (supported: http, ftp, https, ftps)")]
    UnsupportedProtocol(String),
}

impl Rejection {
    /// The ack number of PROTOCOL.md.
    pub fn error_no(&self) -> u32 {
        match self {
            Rejection::Malformed(_) => ack_no::MALFORMED,
            Rejection::UnsupportedOperator(_) => ack_no::UNSUPPORTED_OPERATOR,
            Rejection::Missing(_) => ack_no::MISSING_FIELD,
            Rejection::Invalid { .. } => ack_no::INVALID_FIELD,
            Rejection::UnsupportedProtocol(_) => ack_no::UNSUPPORTED_PROTOCOL,
        }
    }
}

fn invalid(path: &'static str, why: impl Into<String>) -> Rejection {
    Rejection::Invalid {
        path,
        why: why.into(),
    }
}

/// Why [`build_url`] cannot make a URL from its parts.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error("host: {0}")]
    Host(String),
    #[error("port 0 is not a valid port")]
    Port,
    #[error("path: {0}")]
    Path(String),
    #[error("firmware name: {0}")]
    FirmwareName(String),
    #[error("cannot build the URL: {0}")]
    Url(#[from] url::ParseError),
}

/// Why the credentials decoder gave no credential. Never holds its output.
#[derive(Debug, thiserror::Error)]
pub enum DecoderError {
    #[error("the credentials decoder could not be started: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("the credentials decoder failed ({0})")]
    Failed(ExitStatus),
    #[error("the credentials decoder did not finish within {} s", .0.as_secs_f32())]
    Timeout(Duration),
    #[error("the credentials decoder printed more than {MAX_DECODER_OUTPUT_BYTES} bytes")]
    TooLong,
    #[error("the credentials decoder printed something that is not one line of text")]
    NotText,
}

// ---------------------------------------------------------------------------
// Parsing
// ---------------------------------------------------------------------------

/// Parse one `setCloudUpgradeConfig` request. Never panics: anything that is
/// not a valid request comes back as `Incoming::Invalid` with the ack it gets.
/// May run [`ParseOptions::credentials_decoder`] (at most twice, each at most
/// [`DECODER_TIMEOUT`]); does no other I/O.
pub fn parse_request(bytes: &[u8], opts: &ParseOptions) -> Incoming {
    parse_request_within(bytes, opts, DECODER_TIMEOUT)
}

/// [`parse_request`] with a decoder timeout of the caller's choosing.
fn parse_request_within(bytes: &[u8], opts: &ParseOptions, timeout: Duration) -> Incoming {
    let mut echo = Echo {
        operator: UNKNOWN_OPERATOR.to_string(),
        session_id: String::new(),
        message_id: String::new(),
    };
    match parse_inner(bytes, opts, timeout, &mut echo) {
        Ok(req) => Incoming::Valid(Box::new(req)),
        Err(rejection) => Incoming::Invalid(Ack {
            operator: echo.operator,
            session_id: echo.session_id,
            message_id: echo.message_id,
            result: Outcome::new(rejection.error_no(), rejection.to_string()),
        }),
    }
}

/// What a rejection ack echoes: filled in as far as the request can be read.
struct Echo {
    operator: String,
    session_id: String,
    message_id: String,
}

fn parse_inner(
    bytes: &[u8],
    opts: &ParseOptions,
    timeout: Duration,
    echo: &mut Echo,
) -> Result<UpgradeRequest, Rejection> {
    let max_request = opts.max_request_bytes();
    if bytes.len() > max_request {
        return Err(Rejection::Malformed(format!(
            "the request is larger than {max_request} bytes"
        )));
    }
    let max_id = opts.max_id_bytes();
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| Rejection::Malformed(format!("not JSON: {e}")))?;
    let Value::Object(top) = value else {
        return Err(Rejection::Malformed(format!(
            "not a JSON object (got {})",
            kind(&value)
        )));
    };

    // Echo what can be read before judging anything.
    for (key, slot) in [
        ("sessionId", &mut echo.session_id),
        ("messageId", &mut echo.message_id),
    ] {
        if let Some(Value::String(s)) = top.get(key) {
            if check_id(s, max_id).is_ok() {
                slot.clone_from(s);
            }
        }
    }

    let operator = match get(&top, "operator") {
        None => return Err(Rejection::Missing("operator")),
        Some(Value::String(s)) => s,
        Some(other) => return Err(expected("operator", "a string", other)),
    };
    if !operator.is_empty()
        && operator.len() <= MAX_OPERATOR_BYTES
        && !operator.chars().any(char::is_control)
    {
        echo.operator.clone_from(operator);
    }
    if operator != OP_UPGRADE {
        return Err(Rejection::UnsupportedOperator(shown(operator)));
    }

    let session_id = id_field(&top, "sessionId", max_id)?;
    let message_id = id_field(&top, "messageId", max_id)?;

    let info = object_field(&top, "info", "info")?;
    let server = object_field(info, "serverConfig", "info.serverConfig")?;
    let file = object_field(info, "fileInfo", "info.fileInfo")?;

    let protocol = parse_protocol(string_field(
        server,
        "protocol",
        "info.serverConfig.protocol",
    )?)?;
    let host = host_field(server)?;
    let port = port_field(server)?;
    let path = string_field(server, "path", "info.serverConfig.path")?;
    path_segments(path).map_err(|why| invalid("info.serverConfig.path", why))?;

    let name = string_field(file, "firmwareName", "info.fileInfo.firmwareName")?.trim();
    check_file_name(name).map_err(|why| invalid("info.fileInfo.firmwareName", why))?;
    let md5 = md5_field(file)?;
    let size = size_field(file, opts.max_image_size())?;
    let pass_port = pass_port_field(info, file)?;

    // Last: decoding may run the external decoder.
    let user = credential_field(
        server,
        "userName",
        "info.serverConfig.userName",
        opts,
        timeout,
    )?;
    let password = credential_field(
        server,
        "password",
        "info.serverConfig.password",
        opts,
        timeout,
    )?;

    let url = build_url(protocol, &host, port, path, name).map_err(|e| match e {
        UrlError::Host(why) => invalid("info.serverConfig.host", why),
        UrlError::Port => invalid("info.serverConfig.port", "must be 1..=65535"),
        UrlError::Path(why) => invalid("info.serverConfig.path", why),
        UrlError::FirmwareName(why) => invalid("info.fileInfo.firmwareName", why),
        UrlError::Url(e) => invalid("info.serverConfig", format!("cannot build the URL: {e}")),
    })?;

    Ok(UpgradeRequest {
        message_id: message_id.to_string(),
        session_id: session_id.to_string(),
        source: Source {
            protocol,
            host,
            port,
            path: path.to_string(),
            url,
            user,
            password,
        },
        firmware: Firmware {
            name: name.to_string(),
            md5,
            size,
        },
        pass_port,
    })
}

/// A field's value; `null` counts as absent.
fn get<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    obj.get(key).filter(|v| !v.is_null())
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn expected(path: &'static str, what: &str, got: &Value) -> Rejection {
    invalid(path, format!("expected {what}, got {}", kind(got)))
}

/// `s` quoted for a description, cut to 64 characters.
fn shown(s: &str) -> String {
    const MAX: usize = 64;
    if s.chars().count() <= MAX {
        format!("{s:?}")
    } else {
        let cut: String = s.chars().take(MAX).collect();
        format!("{cut:?}...")
    }
}

fn string_field<'a>(
    obj: &'a Map<String, Value>,
    key: &str,
    path: &'static str,
) -> Result<&'a str, Rejection> {
    match get(obj, key) {
        None => Err(Rejection::Missing(path)),
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(expected(path, "a string", other)),
    }
}

fn object_field<'a>(
    obj: &'a Map<String, Value>,
    key: &str,
    path: &'static str,
) -> Result<&'a Map<String, Value>, Rejection> {
    match get(obj, key) {
        None => Err(Rejection::Missing(path)),
        Some(Value::Object(m)) => Ok(m),
        Some(other) => Err(expected(path, "an object", other)),
    }
}

fn check_id(s: &str, max: usize) -> Result<(), String> {
    if s.is_empty() {
        Err("must not be empty".into())
    } else if s.len() > max {
        Err(format!("longer than {max} bytes"))
    } else if s.chars().any(char::is_control) {
        Err("contains control characters".into())
    } else {
        Ok(())
    }
}

fn id_field<'a>(
    obj: &'a Map<String, Value>,
    key: &'static str,
    max: usize,
) -> Result<&'a str, Rejection> {
    let s = string_field(obj, key, key)?;
    check_id(s, max).map_err(|why| invalid(key, why))?;
    Ok(s)
}

fn parse_protocol(raw: &str) -> Result<Protocol, Rejection> {
    match raw.trim().to_ascii_lowercase().as_str() {
        "http" => Ok(Protocol::Http),
        "https" => Ok(Protocol::Https),
        "ftp" => Ok(Protocol::Ftp),
        "ftps" => Ok(Protocol::Ftps),
        _ => Err(Rejection::UnsupportedProtocol(shown(raw))),
    }
}

/// `host` or `hostIp`, normalised (see [`normalize_host`]).
fn host_field(server: &Map<String, Value>) -> Result<String, Rejection> {
    const HOST: &str = "info.serverConfig.host";
    const HOST_IP: &str = "info.serverConfig.hostIp";
    let one = |key: &str, path: &'static str| -> Result<Option<String>, Rejection> {
        match get(server, key) {
            None => Ok(None),
            Some(Value::String(s)) => normalize_host(s)
                .map(Some)
                .map_err(|why| invalid(path, why)),
            Some(other) => Err(expected(path, "a string", other)),
        }
    };
    match (one("host", HOST)?, one("hostIp", HOST_IP)?) {
        (None, None) => Err(Rejection::Missing(HOST)),
        (Some(h), None) | (None, Some(h)) => Ok(h),
        (Some(h), Some(ip)) if h == ip => Ok(h),
        (Some(_), Some(_)) => Err(invalid(HOST_IP, format!("differs from {HOST}"))),
    }
}

fn port_field(server: &Map<String, Value>) -> Result<u16, Rejection> {
    const PATH: &str = "info.serverConfig.port";
    let out_of_range =
        |n: &dyn std::fmt::Display| invalid(PATH, format!("{n} is not in 1..=65535"));
    let n: u64 = match get(server, "port") {
        None => return Err(Rejection::Missing(PATH)),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(n) => n,
            None => return Err(out_of_range(n)),
        },
        Some(Value::String(s)) => {
            if s.is_empty() || s.len() > 10 || !s.bytes().all(|b| b.is_ascii_digit()) {
                return Err(invalid(
                    PATH,
                    format!("{} is not a decimal port number", shown(s)),
                ));
            }
            match s.parse() {
                Ok(n) => n,
                Err(_) => return Err(out_of_range(s)),
            }
        }
        Some(other) => return Err(expected(PATH, "an integer or a decimal string", other)),
    };
    match u16::try_from(n) {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(out_of_range(&n)),
    }
}

fn md5_field(file: &Map<String, Value>) -> Result<String, Rejection> {
    const PATH: &str = "info.fileInfo.md5sum";
    let s = string_field(file, "md5sum", PATH)?.trim();
    if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(invalid(
            PATH,
            format!("{} is not 32 hexadecimal digits", shown(s)),
        ));
    }
    Ok(s.to_ascii_lowercase())
}

/// `upgradeFileSize` or `totalSize`.
fn size_field(file: &Map<String, Value>, max: u64) -> Result<u64, Rejection> {
    const SIZE: &str = "info.fileInfo.upgradeFileSize";
    const TOTAL: &str = "info.fileInfo.totalSize";
    let one = |key: &str, path: &'static str| -> Result<Option<u64>, Rejection> {
        let n = match get(file, key) {
            None => return Ok(None),
            Some(Value::Number(n)) => n,
            Some(other) => return Err(expected(path, "an integer", other)),
        };
        match n.as_u64() {
            Some(0) => Err(invalid(path, "must be greater than 0")),
            Some(n) if n > max => Err(invalid(
                path,
                format!("{n} bytes is more than the maximum image size of {max} bytes"),
            )),
            Some(n) => Ok(Some(n)),
            None => Err(invalid(path, format!("{n} is not a positive integer"))),
        }
    };
    match (one("upgradeFileSize", SIZE)?, one("totalSize", TOTAL)?) {
        (None, None) => Err(Rejection::Missing(SIZE)),
        (Some(n), None) | (None, Some(n)) => Ok(n),
        (Some(a), Some(b)) if a == b => Ok(a),
        (Some(_), Some(_)) => Err(invalid(TOTAL, format!("differs from {SIZE}"))),
    }
}

/// `passPort` in `info.fileInfo` (the page's table) or in `info`.
fn pass_port_field(
    info: &Map<String, Value>,
    file: &Map<String, Value>,
) -> Result<Option<Secret>, Rejection> {
    const IN_FILE: &str = "info.fileInfo.passPort";
    const IN_INFO: &str = "info.passPort";
    let one = |obj: &Map<String, Value>, path: &'static str| -> Result<Option<String>, Rejection> {
        match get(obj, "passPort") {
            None => Ok(None),
            Some(Value::String(s)) if s.len() > MAX_PASS_PORT_BYTES => Err(invalid(
                path,
                format!("longer than {MAX_PASS_PORT_BYTES} bytes"),
            )),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(expected(path, "a string", other)),
        }
    };
    match (one(file, IN_FILE)?, one(info, IN_INFO)?) {
        (None, None) => Ok(None),
        (Some(p), None) | (None, Some(p)) => Ok(Some(Secret::new(p))),
        (Some(a), Some(b)) if a == b => Ok(Some(Secret::new(a))),
        (Some(_), Some(_)) => Err(invalid(IN_INFO, format!("differs from {IN_FILE}"))),
    }
}

/// Base64 with the standard alphabet; padding optional.
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Text a credential may be: UTF-8 without control characters (a newline in
/// a user name would let it smuggle an FTP command).
fn as_text(bytes: Vec<u8>) -> Option<String> {
    let s = String::from_utf8(bytes).ok()?;
    (!s.chars().any(char::is_control)).then_some(s)
}

fn credential_field(
    server: &Map<String, Value>,
    key: &'static str,
    path: &'static str,
    opts: &ParseOptions,
    timeout: Duration,
) -> Result<Secret, Rejection> {
    let text = string_field(server, key, path)?.trim();
    if text.is_empty() {
        return Ok(Secret::default());
    }
    if text.len() > MAX_CREDENTIAL_BYTES {
        return Err(invalid(
            path,
            format!("longer than {MAX_CREDENTIAL_BYTES} bytes"),
        ));
    }
    let bytes = BASE64
        .decode(text)
        .map_err(|_| invalid(path, "not valid base64 (standard alphabet)"))?;
    if let Some(plain) = as_text(bytes) {
        return Ok(Secret::new(plain));
    }
    match &opts.credentials_decoder {
        Some(cmd) => run_decoder(cmd, key, text, timeout)
            .map(Secret::new)
            .map_err(|e| invalid(path, e.to_string())),
        None => Err(invalid(
            path,
            "the base64 does not decode to UTF-8 text (if the cloud enciphers \
             credentials, configure a credentials decoder)",
        )),
    }
}

/// Run the credentials decoder: `sh -c CMD` in its own process group, the
/// base64 text and a newline on stdin, [`DECODER_FIELD_ENV`] set to `field`,
/// stderr discarded. Its stdout, less one trailing newline, is the credential.
fn run_decoder(
    cmd: &str,
    field: &str,
    base64_text: &str,
    timeout: Duration,
) -> Result<String, DecoderError> {
    use std::os::unix::process::CommandExt as _;

    let deadline = Instant::now() + timeout;
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .env(DECODER_FIELD_ENV, field)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(DecoderError::Spawn)?;

    // The input (at most MAX_CREDENTIAL_BYTES + 1) fits in an empty pipe, so
    // this write cannot block; a decoder that exits without reading is fine.
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(format!("{base64_text}\n").as_bytes());
    }

    let (tx, rx) = mpsc::channel();
    if let Some(stdout) = child.stdout.take() {
        std::thread::spawn(move || {
            let mut kept = Vec::new();
            let mut limited = stdout.take(MAX_DECODER_OUTPUT_BYTES as u64 + 1);
            let read = limited.read_to_end(&mut kept);
            // Drain the rest so the decoder never blocks on a full pipe.
            let _ = std::io::copy(&mut limited.into_inner(), &mut std::io::sink());
            let _ = tx.send(read.map(|_| kept));
        });
    }

    let finished = wait_until(&mut child, &rx, deadline);
    let (output, status) = match finished {
        Some(done) => done,
        None => {
            kill_group(&child);
            let _ = child.wait();
            return Err(DecoderError::Timeout(timeout));
        }
    };
    if !status.success() {
        return Err(DecoderError::Failed(status));
    }
    let mut output = output.map_err(|_| DecoderError::NotText)?;
    if output.len() > MAX_DECODER_OUTPUT_BYTES {
        return Err(DecoderError::TooLong);
    }
    if output.last() == Some(&b'\n') {
        output.pop();
        if output.last() == Some(&b'\r') {
            output.pop();
        }
    }
    as_text(output).ok_or(DecoderError::NotText)
}

type DecoderOutput = std::io::Result<Vec<u8>>;

/// Wait for the decoder's stdout to close and the decoder to exit, both by
/// `deadline`. `None` on timeout (the child is then still unreaped).
fn wait_until(
    child: &mut std::process::Child,
    rx: &mpsc::Receiver<DecoderOutput>,
    deadline: Instant,
) -> Option<(DecoderOutput, ExitStatus)> {
    let output = rx
        .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        .ok()?;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some((output, status)),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Ok(None) | Err(_) => return None,
        }
    }
}

/// Kill the decoder and everything it started (it leads its own group).
/// Called only before the child is reaped, so its pid cannot have been reused.
fn kill_group(child: &std::process::Child) {
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
    }
}

// ---------------------------------------------------------------------------
// Hosts, paths, names, URLs
// ---------------------------------------------------------------------------

/// A host as the request gives it, normalised: an IPv4 literal as dotted
/// quad, an IPv6 literal without brackets (`[::1]` and `::1` both give `::1`),
/// a domain name lowercased and in its ASCII (punycode) form, without a
/// trailing dot. Domain labels are 1..=63 letters, digits, `-` (not first or
/// last) and `_`; the name is at most 253 bytes and its last label is not all
/// digits (`1.2.3` is neither an address nor a name). Anything else (a port, a
/// user, a scheme, white space inside) is refused.
pub fn normalize_host(raw: &str) -> Result<String, String> {
    const NOT_A_HOST: &str = "not a valid domain name or IP address";
    let s = raw.trim();
    if s.is_empty() {
        return Err("empty".into());
    }
    if s.len() > 255 {
        return Err("longer than 255 bytes".into());
    }
    if let Some(inner) = s.strip_prefix('[') {
        return match inner.strip_suffix(']').map(str::parse::<Ipv6Addr>) {
            Some(Ok(ip)) => Ok(ip.to_string()),
            _ => Err(format!("{}: not a valid IPv6 address", shown(s))),
        };
    }
    if let Ok(ip) = s.parse::<Ipv6Addr>() {
        return Ok(ip.to_string());
    }
    if let Ok(ip) = s.parse::<Ipv4Addr>() {
        return Ok(ip.to_string());
    }
    let domain = if s.is_ascii() {
        s.to_ascii_lowercase()
    } else if s.contains('%') {
        return Err(format!("{}: {NOT_A_HOST}", shown(s)));
    } else {
        match url::Host::parse(s) {
            Ok(url::Host::Domain(d)) => d,
            _ => return Err(format!("{}: {NOT_A_HOST}", shown(s))),
        }
    };
    let domain = domain.strip_suffix('.').unwrap_or(&domain);
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    let last_numeric = domain
        .rsplit('.')
        .next()
        .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()));
    if domain.len() > 253 || !domain.split('.').all(label_ok) || last_numeric {
        return Err(format!("{}: {NOT_A_HOST}", shown(s)));
    }
    Ok(domain.to_string())
}

/// The directory's segments: empty segments (doubled, leading or trailing
/// `/`) dropped. Refuses control characters and `.`/`..` segments.
fn path_segments(path: &str) -> Result<Vec<&str>, String> {
    let path = path.trim();
    if path.len() > MAX_PATH_BYTES {
        return Err(format!("longer than {MAX_PATH_BYTES} bytes"));
    }
    if path.chars().any(char::is_control) {
        return Err("contains control characters".into());
    }
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    if segments.iter().any(|s| *s == "." || *s == "..") {
        return Err("contains a `.` or `..` segment".into());
    }
    Ok(segments)
}

/// A plain file name: not empty, at most 255 bytes, no `/`, `\`, NUL or other
/// control characters, not `.` or `..`. The caller trims.
fn check_file_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        Err("empty".into())
    } else if name.len() > MAX_FIRMWARE_NAME_BYTES {
        Err(format!("longer than {MAX_FIRMWARE_NAME_BYTES} bytes"))
    } else if name == "." || name == ".." {
        Err(format!("{name:?} is not a file name"))
    } else if name.contains(['/', '\\']) {
        Err(format!(
            "{}: a plain file name has no `/` or `\\`",
            shown(name)
        ))
    } else if name.chars().any(char::is_control) {
        Err("contains control characters".into())
    } else {
        Ok(())
    }
}

/// The firmware's URL: `protocol://host:port` + `path` + `/` + the file name,
/// with exactly one `/` between segments. If the path's last non-empty segment
/// already is the file name, the path names the file itself. Every path
/// character is literal: what a URL path cannot carry (space, `#`, `?`, `%`,
/// non-ASCII...) is percent-encoded. An IPv6 host is bracketed; a default port
/// (80 for http, 443 for https, 21 for ftp) is left out, as the `url` crate
/// normalises it. The URL never has user info: credentials travel apart.
pub fn build_url(
    protocol: Protocol,
    host: &str,
    port: u16,
    path: &str,
    firmware_name: &str,
) -> Result<String, UrlError> {
    let host = normalize_host(host).map_err(UrlError::Host)?;
    if port == 0 {
        return Err(UrlError::Port);
    }
    let segments = path_segments(path).map_err(UrlError::Path)?;
    let name = firmware_name.trim();
    check_file_name(name).map_err(UrlError::FirmwareName)?;
    let authority = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let mut url = Url::parse(&format!("{protocol}://{authority}/"))?;
    {
        let mut out = url
            .path_segments_mut()
            .map_err(|()| UrlError::Url(url::ParseError::RelativeUrlWithCannotBeABaseBase))?;
        out.clear();
        out.extend(&segments);
        if segments.last() != Some(&name) {
            out.push(name);
        }
    }
    Ok(url.into())
}

// ---------------------------------------------------------------------------
// Rendering
// ---------------------------------------------------------------------------

/// One outgoing message on the wire (field order as in PROTOCOL.md).
#[derive(Serialize)]
struct Wire<'a, I: Serialize> {
    operator: &'a str,
    #[serde(rename = "sessionId")]
    session_id: &'a str,
    #[serde(rename = "messageId")]
    message_id: &'a str,
    info: I,
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<&'a Outcome>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ReportInfo<'a> {
    request_message_id: &'a str,
    firmware_name: &'a str,
    md5sum: &'a str,
    phase: PhaseName,
    #[serde(skip_serializing_if = "Option::is_none")]
    bytes_done: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    total_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    percent: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pass_port: Option<&'a str>,
}

impl<'a> ReportInfo<'a> {
    fn new(subject: &'a ReportSubject, phase: PhaseName) -> Self {
        ReportInfo {
            request_message_id: &subject.request_message_id,
            firmware_name: &subject.firmware_name,
            md5sum: &subject.md5,
            phase,
            bytes_done: None,
            total_bytes: None,
            percent: None,
            // The one place a passPort leaves the agent: back to the cloud.
            pass_port: subject.pass_port.as_ref().map(Secret::expose),
        }
    }
}

fn to_line(value: &impl Serialize) -> String {
    // Only strings, integers and enums of unit variants go in: cannot fail.
    serde_json::to_string(value).expect("serialising plain strings and integers cannot fail")
}

/// An ack as one JSON line (no trailing newline).
pub fn render_ack(ack: &Ack) -> String {
    let operator = format!("{}-Ack", ack.operator);
    to_line(&Wire {
        operator: &operator,
        session_id: &ack.session_id,
        message_id: &ack.message_id,
        info: "none",
        result: Some(&ack.result),
    })
}

/// An outbox entry as one JSON line (no trailing newline). An ack keeps the
/// request's messageId; a report's messageId is `entry.message_id`.
pub fn render(entry: &OutboxEntry) -> String {
    match &entry.message {
        Outgoing::Ack(ack) => render_ack(ack),
        Outgoing::Progress {
            subject,
            phase,
            bytes_done,
            total_bytes,
            percent,
        } => to_line(&Wire {
            operator: OP_PROGRESS,
            session_id: &subject.session_id,
            message_id: &entry.message_id,
            info: ReportInfo {
                bytes_done: Some(*bytes_done),
                total_bytes: Some(*total_bytes),
                percent: Some(*percent),
                ..ReportInfo::new(subject, *phase)
            },
            result: None,
        }),
        Outgoing::Result {
            subject,
            phase,
            result,
        } => to_line(&Wire {
            operator: OP_RESULT,
            session_id: &subject.session_id,
            message_id: &entry.message_id,
            info: ReportInfo::new(subject, *phase),
            result: Some(result),
        }),
    }
}

/// A parsed request for people: wire names, the URL it will fetch, and
/// `"<redacted>"` for every credential and the `passPort` (an empty
/// credential shows as `""`: there is none; an absent `passPort` as `null`).
pub fn explain(req: &UpgradeRequest) -> Value {
    let redact = |s: &Secret| if s.is_empty() { "" } else { REDACTED };
    json!({
        "operator": OP_UPGRADE,
        "sessionId": req.session_id,
        "messageId": req.message_id,
        "url": req.source.url,
        "serverConfig": {
            "protocol": req.source.protocol.as_str(),
            "host": req.source.host,
            "port": req.source.port,
            "path": req.source.path,
            "userName": redact(&req.source.user),
            "password": redact(&req.source.password),
        },
        "fileInfo": {
            "firmwareName": req.firmware.name,
            "md5sum": req.firmware.md5,
            "upgradeFileSize": req.firmware.size,
            "passPort": req.pass_port.as_ref().map(|_| REDACTED),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use fwagent_state::ack_no::*;
    use proptest::prelude::*;

    /// The seed's first example, host rewritten to 127.0.0.1.
    fn seed1() -> Value {
        json!({
            "operator": "setCloudUpgradeConfig",
            "sessionId": "SID:1234567890-000001",
            "messageId": "MID:localhost-122334455667-12232323232323-000001",
            "info": {
                "serverConfig": {
                    "port": 21,
                    "host": "127.0.0.1",
                    "userName": "dWZ0cA==",
                    "password": "ZWNobzEyMw==",
                    "protocol": "ftp",
                    "path": "/download/DAP-2020SSA_3200_6200/C007V001/"
                },
                "fileInfo": {
                    "firmwareName": "DAP-2020SSA_V1.3.2_20200702.bin ",
                    "md5sum": "434092e44c45b65ba66ea086f697fc02",
                    "upgradeFileSize": 66143
                }
            }
        })
    }

    /// The seed's second example (enciphered credentials), host rewritten.
    fn seed2() -> Value {
        json!({
            "operator": "setCloudUpgradeConfig",
            "sessionId": "SID:1234567890-000001",
            "messageId": "MID:localhost-122334455667-12232323232323-000001",
            "info": {
                "serverConfig": {
                    "port": 21,
                    "host": "127.0.0.1",
                    "userName": "jwNebvyvn4jIteczpAhJUyih75dyFe4l",
                    "password": "AZI5Wg0mg13O4Wx82AB4Km8XMt9oWmB8",
                    "protocol": "ftp",
                    "path": "/download/IPG-5950PCS-AI_20F1_50FA/C00AV001/"
                },
                "fileInfo": {
                    "firmwareName": "UPDATE_T5AI_IPG-5950PCS-AI_V1.4.0_20240129_MQTT.bin",
                    "md5sum": "8b8eabc41188601bf6cc28e395197b46",
                    "totalSize": 41522432
                }
            }
        })
    }

    fn parse_with(v: &Value, opts: &ParseOptions) -> Incoming {
        parse_request(v.to_string().as_bytes(), opts)
    }

    fn parse(v: &Value) -> Incoming {
        parse_with(v, &ParseOptions::default())
    }

    #[track_caller]
    fn valid(incoming: Incoming) -> UpgradeRequest {
        match incoming {
            Incoming::Valid(r) => *r,
            Incoming::Invalid(ack) => panic!("expected a valid request, got {ack:?}"),
        }
    }

    #[track_caller]
    fn rejected(incoming: Incoming) -> Ack {
        match incoming {
            Incoming::Invalid(ack) => ack,
            Incoming::Valid(r) => panic!("expected a rejection, got {r:?}"),
        }
    }

    /// `v` with the JSON pointer `ptr` set to `new` (or removed when `None`).
    fn with(mut v: Value, ptr: &str, new: Option<Value>) -> Value {
        let (parent, key) = ptr.rsplit_once('/').expect("a pointer with a parent");
        let obj = v
            .pointer_mut(parent)
            .and_then(Value::as_object_mut)
            .expect("the parent is an object");
        match new {
            Some(n) => {
                obj.insert(key.to_string(), n);
            }
            None => {
                obj.remove(key);
            }
        }
        v
    }

    fn set(v: Value, ptr: &str, new: Value) -> Value {
        with(v, ptr, Some(new))
    }

    fn remove(v: Value, ptr: &str) -> Value {
        with(v, ptr, None)
    }

    #[track_caller]
    fn assert_rejects(v: &Value, error_no: u32, needle: &str) -> Ack {
        let ack = rejected(parse(v));
        assert_eq!(ack.result.error_no, error_no, "{ack:?}");
        assert!(
            ack.result.description.contains(needle),
            "description {:?} should mention {needle:?}",
            ack.result.description
        );
        ack
    }

    // --- the seed's examples -------------------------------------------------

    #[test]
    fn seed_one_is_accepted_with_every_field_read() {
        let r = valid(parse(&seed1()));
        assert_eq!(r.session_id, "SID:1234567890-000001");
        assert_eq!(
            r.message_id,
            "MID:localhost-122334455667-12232323232323-000001"
        );
        assert_eq!(r.source.protocol, Protocol::Ftp);
        assert_eq!(r.source.host, "127.0.0.1");
        assert_eq!(r.source.port, 21);
        assert_eq!(r.source.path, "/download/DAP-2020SSA_3200_6200/C007V001/");
        assert_eq!(
            r.source.url,
            "ftp://127.0.0.1/download/DAP-2020SSA_3200_6200/C007V001/DAP-2020SSA_V1.3.2_20200702.bin"
        );
        assert_eq!(r.source.user.expose(), "uftp");
        assert_eq!(r.source.password.expose(), "echo123");
        assert_eq!(r.firmware.name, "DAP-2020SSA_V1.3.2_20200702.bin");
        assert_eq!(r.firmware.md5, "434092e44c45b65ba66ea086f697fc02");
        assert_eq!(r.firmware.size, 66143);
        assert_eq!(r.pass_port, None);
    }

    #[test]
    fn seed_two_is_refused_without_a_decoder() {
        let ack = rejected(parse(&seed2()));
        assert_eq!(ack.result.error_no, INVALID_FIELD);
        assert!(ack
            .result
            .description
            .contains("info.serverConfig.userName"));
        assert_eq!(ack.operator, OP_UPGRADE);
        assert_eq!(ack.session_id, "SID:1234567890-000001");
        assert!(!ack.message_id.is_empty());
    }

    #[test]
    fn seed_two_is_accepted_with_a_decoder() {
        let opts = ParseOptions {
            credentials_decoder: Some(
                "cat >/dev/null; echo plain-$FWAGENT_CREDENTIAL_FIELD".into(),
            ),
            ..ParseOptions::default()
        };
        let r = valid(parse_with(&seed2(), &opts));
        assert_eq!(r.source.user.expose(), "plain-userName");
        assert_eq!(r.source.password.expose(), "plain-password");
        assert_eq!(r.firmware.size, 41522432);
    }

    // --- errorNo 1 ------------------------------------------------------------

    #[test]
    fn not_json_is_malformed() {
        for bytes in [
            &b""[..],
            b"{",
            b"nonsense",
            b"{\"a\":}",
            b"\xff\xfe",
            b"{\"operator\":\"\xff\"}",
        ] {
            let ack = rejected(parse_request(bytes, &ParseOptions::default()));
            assert_eq!(ack.result.error_no, MALFORMED, "{bytes:?}");
            assert!(ack.result.description.contains("not JSON"));
            assert_eq!(ack.operator, UNKNOWN_OPERATOR);
            assert_eq!((ack.session_id.as_str(), ack.message_id.as_str()), ("", ""));
        }
    }

    #[test]
    fn json_that_is_not_an_object_is_malformed() {
        for (v, what) in [
            (json!([seed1()]), "an array"),
            (json!("setCloudUpgradeConfig"), "a string"),
            (json!(42), "a number"),
            (json!(null), "null"),
            (json!(true), "a boolean"),
        ] {
            let ack = assert_rejects(&v, MALFORMED, "not a JSON object");
            assert!(ack.result.description.contains(what));
            assert_eq!(ack.operator, UNKNOWN_OPERATOR);
        }
    }

    #[test]
    fn the_size_limit_is_64_kib_inclusive() {
        let text = seed1().to_string();
        let mut at_limit = text.clone().into_bytes();
        at_limit.resize(MAX_REQUEST_BYTES, b' ');
        valid(parse_request(&at_limit, &ParseOptions::default()));
        let mut over = at_limit.clone();
        over.push(b' ');
        let ack = rejected(parse_request(&over, &ParseOptions::default()));
        assert_eq!(ack.result.error_no, MALFORMED);
        assert!(ack.result.description.contains("65536"));
        // Not parsed at all: nothing echoed.
        assert_eq!(ack.message_id, "");
        assert_eq!(ack.operator, UNKNOWN_OPERATOR);
    }

    // --- errorNo 2 and the envelope ------------------------------------------------

    #[test]
    fn an_unsupported_operator_is_named_and_echoed() {
        let ack = assert_rejects(
            &set(seed1(), "/operator", json!("getDeviceInfo")),
            UNSUPPORTED_OPERATOR,
            "getDeviceInfo",
        );
        assert_eq!(ack.operator, "getDeviceInfo");
        assert!(render_ack(&ack).contains("\"getDeviceInfo-Ack\""));
        assert_eq!(ack.session_id, "SID:1234567890-000001");
        assert_eq!(
            ack.message_id,
            "MID:localhost-122334455667-12232323232323-000001"
        );
        // The match is exact: case matters.
        assert_rejects(
            &set(seed1(), "/operator", json!("setcloudupgradeconfig")),
            UNSUPPORTED_OPERATOR,
            "setcloudupgradeconfig",
        );
    }

    #[test]
    fn an_unreadable_operator_is_answered_as_unknown() {
        let long = "x".repeat(MAX_OPERATOR_BYTES + 1);
        for (op, no) in [
            (json!(long), UNSUPPORTED_OPERATOR),
            (json!(""), UNSUPPORTED_OPERATOR),
            (json!("a\nb"), UNSUPPORTED_OPERATOR),
            (json!(7), INVALID_FIELD),
            (json!({"name": "x"}), INVALID_FIELD),
        ] {
            let ack = rejected(parse(&set(seed1(), "/operator", op.clone())));
            assert_eq!(ack.operator, UNKNOWN_OPERATOR, "{op}");
            assert_eq!(ack.result.error_no, no, "{op}");
            assert!(ack.result.description.len() < 200, "shortened: {ack:?}");
        }
        let ok_len = "x".repeat(MAX_OPERATOR_BYTES);
        let ack = rejected(parse(&set(seed1(), "/operator", json!(ok_len))));
        assert_eq!(ack.operator, ok_len);
        let ack = assert_rejects(&remove(seed1(), "/operator"), MISSING_FIELD, "operator");
        assert_eq!(ack.operator, UNKNOWN_OPERATOR);
        assert_eq!(ack.session_id, "SID:1234567890-000001");
    }

    #[test]
    fn ids_are_checked_and_unreadable_ones_echoed_empty() {
        for key in ["sessionId", "messageId"] {
            let ptr = format!("/{key}");
            let ack = assert_rejects(&remove(seed1(), &ptr), MISSING_FIELD, key);
            assert_eq!(ack.operator, OP_UPGRADE);
            let ack = assert_rejects(&set(seed1(), &ptr, json!(null)), MISSING_FIELD, key);
            assert_eq!(
                ack.result.description,
                format!("missing required field {key}")
            );
            for bad in [
                json!(12),
                json!(""),
                json!("x".repeat(MAX_ID_BYTES + 1)),
                json!("MID:\u{1}"),
            ] {
                let ack = assert_rejects(&set(seed1(), &ptr, bad.clone()), INVALID_FIELD, key);
                let echoed = if key == "sessionId" {
                    &ack.session_id
                } else {
                    &ack.message_id
                };
                assert_eq!(echoed, "", "{bad}");
            }
            let longest = "x".repeat(MAX_ID_BYTES);
            let r = valid(parse(&set(seed1(), &ptr, json!(longest))));
            assert!(r.session_id == longest || r.message_id == longest);
        }
    }

    #[test]
    fn ids_are_echoed_even_when_another_field_is_wrong() {
        let ack = rejected(parse(&remove(seed1(), "/info/fileInfo/md5sum")));
        assert_eq!(ack.session_id, "SID:1234567890-000001");
        assert_eq!(
            ack.message_id,
            "MID:localhost-122334455667-12232323232323-000001"
        );
        assert_eq!(ack.operator, OP_UPGRADE);
    }

    // --- errorNo 3 ------------------------------------------------------------

    #[test]
    fn each_missing_required_field_is_named_by_its_path() {
        for (ptr, path) in [
            ("/info", "info"),
            ("/info/serverConfig", "info.serverConfig"),
            ("/info/fileInfo", "info.fileInfo"),
            ("/info/serverConfig/port", "info.serverConfig.port"),
            ("/info/serverConfig/host", "info.serverConfig.host"),
            ("/info/serverConfig/userName", "info.serverConfig.userName"),
            ("/info/serverConfig/password", "info.serverConfig.password"),
            ("/info/serverConfig/protocol", "info.serverConfig.protocol"),
            ("/info/serverConfig/path", "info.serverConfig.path"),
            ("/info/fileInfo/firmwareName", "info.fileInfo.firmwareName"),
            ("/info/fileInfo/md5sum", "info.fileInfo.md5sum"),
            (
                "/info/fileInfo/upgradeFileSize",
                "info.fileInfo.upgradeFileSize",
            ),
        ] {
            let ack = assert_rejects(&remove(seed1(), ptr), MISSING_FIELD, path);
            assert_eq!(
                ack.result.description,
                format!("missing required field {path}")
            );
            // null is the same as absent
            assert_rejects(&set(seed1(), ptr, Value::Null), MISSING_FIELD, path);
        }
    }

    // --- errorNo 4 ------------------------------------------------------------

    #[test]
    fn containers_of_the_wrong_type_are_invalid() {
        for (ptr, path) in [
            ("/info", "info"),
            ("/info/serverConfig", "info.serverConfig"),
            ("/info/fileInfo", "info.fileInfo"),
        ] {
            for bad in [json!("none"), json!([1]), json!(3)] {
                assert_rejects(&set(seed1(), ptr, bad), INVALID_FIELD, path);
            }
        }
    }

    #[test]
    fn ports_are_integers_or_decimal_strings_in_range() {
        for (port, want) in [
            (json!(1), 1),
            (json!(65535), 65535),
            (json!("21"), 21),
            (json!("08080"), 8080),
        ] {
            let r = valid(parse(&set(seed1(), "/info/serverConfig/port", port)));
            assert_eq!(r.source.port, want);
        }
        for bad in [
            json!(0),
            json!(65536),
            json!(-1),
            json!(21.5),
            json!(1e3),
            json!("0"),
            json!("65536"),
            json!("99999999999999999999"),
            json!(""),
            json!(" 21"),
            json!("+21"),
            json!("0x15"),
            json!("ftp"),
            json!(true),
            json!([21]),
        ] {
            assert_rejects(
                &set(seed1(), "/info/serverConfig/port", bad),
                INVALID_FIELD,
                "info.serverConfig.port",
            );
        }
    }

    #[test]
    fn host_and_host_ip_are_aliases() {
        let by_ip = set(
            remove(seed1(), "/info/serverConfig/host"),
            "/info/serverConfig/hostIp",
            json!("127.0.0.1"),
        );
        assert_eq!(valid(parse(&by_ip)).source.host, "127.0.0.1");
        let both_same = set(seed1(), "/info/serverConfig/hostIp", json!(" 127.0.0.1 "));
        assert_eq!(valid(parse(&both_same)).source.host, "127.0.0.1");
        let same_name = set(
            set(seed1(), "/info/serverConfig/host", json!("LocalHost")),
            "/info/serverConfig/hostIp",
            json!("localhost"),
        );
        assert_eq!(valid(parse(&same_name)).source.host, "localhost");
        let differ = set(seed1(), "/info/serverConfig/hostIp", json!("127.0.0.2"));
        assert_rejects(&differ, INVALID_FIELD, "info.serverConfig.hostIp");
        let bad_ip = set(seed1(), "/info/serverConfig/hostIp", json!("not a host"));
        assert_rejects(&bad_ip, INVALID_FIELD, "info.serverConfig.hostIp");
        let null_host = set(by_ip, "/info/serverConfig/host", Value::Null);
        valid(parse(&null_host));
    }

    #[test]
    fn hosts_must_be_names_or_addresses() {
        for (host, want) in [
            ("localhost", "localhost"),
            ("Firmware.Example.COM", "firmware.example.com"),
            ("fw.example.com.", "fw.example.com"),
            ("my_server", "my_server"),
            ("a-b.c0", "a-b.c0"),
            ("::1", "::1"),
            ("[::1]", "::1"),
            ("[0:0:0:0:0:0:0:1]", "::1"),
            ("10.0.0.1", "10.0.0.1"),
            ("bücher.example", "xn--bcher-kva.example"),
        ] {
            let r = valid(parse(&set(seed1(), "/info/serverConfig/host", json!(host))));
            assert_eq!(r.source.host, want, "{host}");
        }
        let label64 = format!("{}.com", "a".repeat(64));
        let long_name = vec!["abcdefghi"; 26].join(".");
        for bad in [
            "",
            "  ",
            "bad host",
            "a/b",
            "127.0.0.1:21",
            "ftp://127.0.0.1",
            "user@127.0.0.1",
            "1.2.3",
            "256.1.1.1",
            "123",
            "0x7f.1",
            "-a.com",
            "a-.com",
            "a..com",
            ".com",
            "[::1",
            "[127.0.0.1]",
            "fe80::1%eth0",
            "ex%61mple.com",
            "bü%61.example",
            "a\u{0}b",
            label64.as_str(),
            long_name.as_str(),
        ] {
            assert_rejects(
                &set(seed1(), "/info/serverConfig/host", json!(bad)),
                INVALID_FIELD,
                "info.serverConfig.host",
            );
        }
        assert_rejects(
            &set(seed1(), "/info/serverConfig/host", json!(["127.0.0.1"])),
            INVALID_FIELD,
            "info.serverConfig.host",
        );
    }

    #[test]
    fn paths_refuse_dot_segments_and_control_characters() {
        for bad in [
            json!("/download/../etc/"),
            json!("/download/./x"),
            json!(".."),
            json!("/a\u{7}b/"),
            json!("/a\nb/"),
            json!("/".repeat(MAX_PATH_BYTES + 1)),
            json!(5),
        ] {
            assert_rejects(
                &set(seed1(), "/info/serverConfig/path", bad),
                INVALID_FIELD,
                "info.serverConfig.path",
            );
        }
        for ok in ["", "/", "download", "/a/.../b/", "/..a/b../"] {
            valid(parse(&set(seed1(), "/info/serverConfig/path", json!(ok))));
        }
    }

    #[test]
    fn firmware_names_are_trimmed_plain_file_names() {
        let r = valid(parse(&set(
            seed1(),
            "/info/fileInfo/firmwareName",
            json!("\t fw 1.bin \n"),
        )));
        assert_eq!(r.firmware.name, "fw 1.bin");
        let longest = "n".repeat(MAX_FIRMWARE_NAME_BYTES);
        valid(parse(&set(
            seed1(),
            "/info/fileInfo/firmwareName",
            json!(longest),
        )));
        for bad in [
            json!(""),
            json!("   "),
            json!("."),
            json!(".."),
            json!(" .. "),
            json!("dir/fw.bin"),
            json!("/fw.bin"),
            json!("dir\\fw.bin"),
            json!("fw\u{0}.bin"),
            json!("fw\u{1b}.bin"),
            json!("n".repeat(MAX_FIRMWARE_NAME_BYTES + 1)),
            json!(12),
        ] {
            assert_rejects(
                &set(seed1(), "/info/fileInfo/firmwareName", bad),
                INVALID_FIELD,
                "info.fileInfo.firmwareName",
            );
        }
    }

    #[test]
    fn md5_is_32_hex_digits_stored_lowercase() {
        let r = valid(parse(&set(
            seed1(),
            "/info/fileInfo/md5sum",
            json!("434092E44C45B65BA66EA086F697FC02"),
        )));
        assert_eq!(r.firmware.md5, "434092e44c45b65ba66ea086f697fc02");
        for bad in [
            json!("434092e44c45b65ba66ea086f697fc0"),
            json!("434092e44c45b65ba66ea086f697fc021"),
            json!("434092e44c45b65ba66ea086f697fc0g"),
            json!(""),
            json!(434092),
        ] {
            assert_rejects(
                &set(seed1(), "/info/fileInfo/md5sum", bad),
                INVALID_FIELD,
                "info.fileInfo.md5sum",
            );
        }
    }

    #[test]
    fn sizes_are_positive_integers_up_to_the_maximum() {
        const P: &str = "/info/fileInfo/upgradeFileSize";
        const PATH: &str = "info.fileInfo.upgradeFileSize";
        let r = valid(parse(&set(seed1(), P, json!(DEFAULT_MAX_IMAGE_SIZE))));
        assert_eq!(r.firmware.size, 1 << 30);
        assert_rejects(
            &set(seed1(), P, json!(DEFAULT_MAX_IMAGE_SIZE + 1)),
            INVALID_FIELD,
            PATH,
        );
        for bad in [
            json!(0),
            json!(-1),
            json!(1.5),
            json!(1e3),
            json!("66143"),
            json!(u64::MAX),
        ] {
            assert_rejects(&set(seed1(), P, bad), INVALID_FIELD, PATH);
        }
        let small = ParseOptions {
            max_image_size: Some(66143),
            ..ParseOptions::default()
        };
        valid(parse_with(&seed1(), &small));
        let smaller = ParseOptions {
            max_image_size: Some(66142),
            ..ParseOptions::default()
        };
        let ack = rejected(parse_with(&seed1(), &smaller));
        assert_eq!(ack.result.error_no, INVALID_FIELD);
        assert!(ack.result.description.contains("66142"));
        assert!(ack.result.description.contains(PATH));
    }

    #[test]
    fn request_size_and_id_length_limits_are_configurable() {
        let text = seed1().to_string();
        let tight = ParseOptions {
            max_request_bytes: Some(text.len() - 1),
            ..ParseOptions::default()
        };
        let ack = rejected(parse_request(text.as_bytes(), &tight));
        assert_eq!(ack.result.error_no, MALFORMED);
        assert!(ack
            .result
            .description
            .contains(&(text.len() - 1).to_string()));
        let exact = ParseOptions {
            max_request_bytes: Some(text.len()),
            ..ParseOptions::default()
        };
        valid(parse_request(text.as_bytes(), &exact));
        // The seed's messageId is 48 bytes long.
        let short_ids = ParseOptions {
            max_id_bytes: Some(47),
            ..ParseOptions::default()
        };
        let ack = rejected(parse_with(&seed1(), &short_ids));
        assert_eq!(ack.result.error_no, INVALID_FIELD);
        assert!(ack.result.description.contains("messageId"));
        assert!(ack.result.description.contains("47"));
    }

    #[test]
    fn upgrade_file_size_and_total_size_are_aliases() {
        let total = set(
            remove(seed1(), "/info/fileInfo/upgradeFileSize"),
            "/info/fileInfo/totalSize",
            json!(10),
        );
        assert_eq!(valid(parse(&total)).firmware.size, 10);
        let both = set(seed1(), "/info/fileInfo/totalSize", json!(66143));
        assert_eq!(valid(parse(&both)).firmware.size, 66143);
        let differ = set(seed1(), "/info/fileInfo/totalSize", json!(66144));
        assert_rejects(&differ, INVALID_FIELD, "info.fileInfo.totalSize");
        let bad_total = set(total, "/info/fileInfo/totalSize", json!(0));
        assert_rejects(&bad_total, INVALID_FIELD, "info.fileInfo.totalSize");
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let v = set(seed1(), "/info/serverConfig/timeout", json!(30));
        let v = set(v, "/info/fileInfo/signature", json!({"alg": "none"}));
        let v = set(v, "/info/extra", json!([1, 2]));
        let v = set(v, "/version", json!("2.0"));
        assert_eq!(valid(parse(&v)), valid(parse(&seed1())));
    }

    // --- errorNo 5 ------------------------------------------------------------

    #[test]
    fn protocols_are_case_insensitive_and_others_unsupported() {
        for (p, want) in [
            ("ftp", Protocol::Ftp),
            ("FTP", Protocol::Ftp),
            ("Http", Protocol::Http),
            ("HTTPS", Protocol::Https),
            ("ftps", Protocol::Ftps),
            (" http ", Protocol::Http),
        ] {
            let r = valid(parse(&set(
                seed1(),
                "/info/serverConfig/protocol",
                json!(p),
            )));
            assert_eq!(r.source.protocol, want);
        }
        for bad in ["sftp", "tftp", "file", "", "http2"] {
            let ack = assert_rejects(
                &set(seed1(), "/info/serverConfig/protocol", json!(bad)),
                UNSUPPORTED_PROTOCOL,
                &format!("{bad:?}"),
            );
            assert_eq!(ack.operator, OP_UPGRADE);
        }
        assert_rejects(
            &set(seed1(), "/info/serverConfig/protocol", json!(21)),
            INVALID_FIELD,
            "info.serverConfig.protocol",
        );
    }

    // --- credentials ----------------------------------------------------------------

    #[test]
    fn credentials_are_base64_with_optional_padding() {
        let v = set(seed1(), "/info/serverConfig/userName", json!("dWZ0cA"));
        let v = set(v, "/info/serverConfig/password", json!(" ZWNobzEyMw "));
        let r = valid(parse(&v));
        assert_eq!(r.source.user.expose(), "uftp");
        assert_eq!(r.source.password.expose(), "echo123");
    }

    #[test]
    fn empty_credentials_mean_none() {
        let v = set(seed1(), "/info/serverConfig/userName", json!(""));
        let v = set(v, "/info/serverConfig/password", json!(""));
        let r = valid(parse(&v));
        assert!(r.source.user.is_empty());
        assert!(r.source.password.is_empty());
    }

    #[test]
    fn credentials_that_are_not_text_are_invalid_without_naming_them() {
        // "user\nPASS x" and "\u{0}" decode to valid UTF-8 with control characters.
        for (key, value) in [
            ("userName", "dXNlcgpQQVNTIHg="),
            ("password", "AA=="),
            ("userName", "!!!!"),
            ("password", "dWZ0cA=x"),
            ("password", "AZI5Wg0mg13O4Wx82AB4Km8XMt9oWmB8"),
        ] {
            let path = format!("info.serverConfig.{key}");
            let ack = assert_rejects(
                &set(seed1(), &format!("/info/serverConfig/{key}"), json!(value)),
                INVALID_FIELD,
                &path,
            );
            assert!(!ack.result.description.contains(value));
            assert!(!ack.result.description.contains("PASS"));
        }
        let long = "QUFB".repeat(MAX_CREDENTIAL_BYTES / 4 + 1);
        assert_rejects(
            &set(seed1(), "/info/serverConfig/userName", json!(long)),
            INVALID_FIELD,
            "info.serverConfig.userName",
        );
        assert_rejects(
            &set(seed1(), "/info/serverConfig/password", json!(123)),
            INVALID_FIELD,
            "info.serverConfig.password",
        );
    }

    fn decoder(cmd: &str) -> ParseOptions {
        ParseOptions {
            credentials_decoder: Some(cmd.into()),
            ..ParseOptions::default()
        }
    }

    #[test]
    fn the_decoder_gets_the_base64_text_and_its_field() {
        // `cat` echoes its input back: the credential is the base64 text itself.
        let r = valid(parse_with(&seed2(), &decoder("cat")));
        assert_eq!(r.source.user.expose(), "jwNebvyvn4jIteczpAhJUyih75dyFe4l");
        assert_eq!(
            r.source.password.expose(),
            "AZI5Wg0mg13O4Wx82AB4Km8XMt9oWmB8"
        );
        // CRLF is trimmed as well; the decoder is not asked about text credentials.
        let v = set(
            seed2(),
            "/info/serverConfig/password",
            json!("ZWNobzEyMw=="),
        );
        let r = valid(parse_with(
            &v,
            &decoder("printf '%s\\r\\n' \"$FWAGENT_CREDENTIAL_FIELD\""),
        ));
        assert_eq!(r.source.user.expose(), "userName");
        assert_eq!(r.source.password.expose(), "echo123");
    }

    #[test]
    fn decoder_failures_are_invalid_fields_without_the_credential() {
        for cmd in [
            "echo s3cret; exit 3",
            "printf 's3cret\\001'",
            "printf 's3cret\\nmore\\n'",
            "printf '\\377s3cret'",
            "head -c 5000 /dev/zero | tr '\\0' s; echo s3cret",
            "exec /nonexistent/decoder",
        ] {
            let ack = rejected(parse_with(&seed2(), &decoder(cmd)));
            assert_eq!(ack.result.error_no, INVALID_FIELD, "{cmd}");
            assert!(
                ack.result
                    .description
                    .contains("info.serverConfig.userName"),
                "{cmd}: {ack:?}"
            );
            assert!(!ack.result.description.contains("s3cret"), "{cmd}");
            assert!(!ack.result.description.contains("jwNebvyvn4"), "{cmd}");
        }
    }

    #[test]
    fn a_slow_decoder_is_killed_at_the_timeout() {
        let opts = decoder("sleep 30");
        let started = Instant::now();
        let ack = rejected(parse_request_within(
            seed2().to_string().as_bytes(),
            &opts,
            Duration::from_millis(300),
        ));
        assert_eq!(ack.result.error_no, INVALID_FIELD);
        assert!(ack.result.description.contains("did not finish"), "{ack:?}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn a_decoder_leaving_a_child_behind_does_not_hang() {
        // The shell exits at once, but its background child holds stdout open.
        let opts = decoder("sleep 30 & echo s3cret");
        let started = Instant::now();
        let ack = rejected(parse_request_within(
            seed2().to_string().as_bytes(),
            &opts,
            Duration::from_millis(300),
        ));
        assert!(ack.result.description.contains("did not finish"), "{ack:?}");
        assert!(!ack.result.description.contains("s3cret"));
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn the_default_decoder_timeout_is_five_seconds() {
        assert_eq!(DECODER_TIMEOUT, Duration::from_secs(5));
        let e = DecoderError::Timeout(DECODER_TIMEOUT);
        assert_eq!(
            e.to_string(),
            "the credentials decoder did not finish within 5 s"
        );
    }

    // --- passPort -------------------------------------------------------------------

    #[test]
    fn pass_port_is_optional_and_accepted_in_file_info_or_info() {
        assert_eq!(valid(parse(&seed1())).pass_port, None);
        let in_file = set(seed1(), "/info/fileInfo/passPort", json!("pp-123"));
        let r = valid(parse(&in_file));
        assert_eq!(r.pass_port.as_ref().map(Secret::expose), Some("pp-123"));
        let in_info = set(seed1(), "/info/passPort", json!("pp-123"));
        assert_eq!(valid(parse(&in_info)), r);
        let both = set(in_file.clone(), "/info/passPort", json!("pp-123"));
        assert_eq!(valid(parse(&both)), r);
        let differ = set(in_file.clone(), "/info/passPort", json!("pp-456"));
        let ack = assert_rejects(&differ, INVALID_FIELD, "info.passPort");
        assert!(!ack.result.description.contains("pp-"));
        let ack = assert_rejects(
            &set(seed1(), "/info/fileInfo/passPort", json!(123456)),
            INVALID_FIELD,
            "info.fileInfo.passPort",
        );
        assert!(!ack.result.description.contains("123456"));
        let long = "p".repeat(MAX_PASS_PORT_BYTES + 1);
        let ack = assert_rejects(
            &set(seed1(), "/info/fileInfo/passPort", json!(long)),
            INVALID_FIELD,
            "info.fileInfo.passPort",
        );
        assert!(!ack.result.description.contains("ppp"));
    }

    // --- URLs -----------------------------------------------------------------------

    #[test]
    fn urls_join_path_and_name_with_one_slash() {
        let u = |path: &str| build_url(Protocol::Http, "127.0.0.1", 8080, path, "fw.bin");
        for path in ["/dl/", "/dl", "dl", "dl/", "//dl//", "/dl/ "] {
            assert_eq!(
                u(path).as_deref(),
                Ok("http://127.0.0.1:8080/dl/fw.bin"),
                "{path:?}"
            );
        }
        for path in ["", "/", "//"] {
            assert_eq!(
                u(path).as_deref(),
                Ok("http://127.0.0.1:8080/fw.bin"),
                "{path:?}"
            );
        }
        assert_eq!(
            u("/a//b/c/").as_deref(),
            Ok("http://127.0.0.1:8080/a/b/c/fw.bin")
        );
    }

    #[test]
    fn a_path_ending_in_the_name_is_the_file_itself() {
        let u = |path: &str| build_url(Protocol::Ftp, "localhost", 2121, path, " fw.bin ");
        assert_eq!(
            u("/dl/fw.bin").as_deref(),
            Ok("ftp://localhost:2121/dl/fw.bin")
        );
        assert_eq!(
            u("/dl/fw.bin/").as_deref(),
            Ok("ftp://localhost:2121/dl/fw.bin")
        );
        assert_eq!(
            u("/fw.bin/dl").as_deref(),
            Ok("ftp://localhost:2121/fw.bin/dl/fw.bin")
        );
        let v = set(
            seed1(),
            "/info/serverConfig/path",
            json!("/download/DAP-2020SSA_V1.3.2_20200702.bin"),
        );
        assert_eq!(
            valid(parse(&v)).source.url,
            "ftp://127.0.0.1/download/DAP-2020SSA_V1.3.2_20200702.bin"
        );
    }

    #[test]
    fn urls_bracket_ipv6_hosts() {
        for host in ["::1", "[::1]", " ::1 "] {
            assert_eq!(
                build_url(Protocol::Http, host, 8080, "/x/", "fw.bin").as_deref(),
                Ok("http://[::1]:8080/x/fw.bin")
            );
        }
        assert_eq!(
            build_url(Protocol::Ftps, "fe80::1:2", 990, "/x", "fw.bin").as_deref(),
            Ok("ftps://[fe80::1:2]:990/x/fw.bin")
        );
        let v = set(seed1(), "/info/serverConfig/host", json!("::1"));
        let r = valid(parse(&set(v, "/info/serverConfig/port", json!(2121))));
        assert_eq!(r.source.host, "::1");
        assert!(r.source.url.starts_with("ftp://[::1]:2121/download/"));
    }

    #[test]
    fn urls_percent_encode_what_they_must() {
        let url = build_url(
            Protocol::Http,
            "localhost",
            8000,
            "/my dir/ü/100%/a?b#c/",
            "fw #1?v=2%.bin",
        )
        .expect("a valid URL");
        assert_eq!(
            url,
            "http://localhost:8000/my%20dir/%C3%BC/100%25/a%3Fb%23c/fw%20%231%3Fv=2%25.bin"
        );
        let parsed = Url::parse(&url).expect("parses back");
        assert_eq!(parsed.query(), None);
        assert_eq!(parsed.fragment(), None);
        assert_eq!(parsed.path_segments().map(|s| s.count()), Some(5));
        // A backslash is a separator in http URLs: it must be encoded too.
        assert_eq!(
            build_url(Protocol::Http, "localhost", 8000, "/a\\b/", "fw.bin").as_deref(),
            Ok("http://localhost:8000/a%5Cb/fw.bin")
        );
    }

    #[test]
    fn urls_drop_default_ports_and_keep_others() {
        let u = |p, port| build_url(p, "127.0.0.1", port, "/", "f");
        assert_eq!(u(Protocol::Http, 80).as_deref(), Ok("http://127.0.0.1/f"));
        assert_eq!(
            u(Protocol::Https, 443).as_deref(),
            Ok("https://127.0.0.1/f")
        );
        assert_eq!(u(Protocol::Ftp, 21).as_deref(), Ok("ftp://127.0.0.1/f"));
        assert_eq!(
            u(Protocol::Ftp, 2121).as_deref(),
            Ok("ftp://127.0.0.1:2121/f")
        );
        assert_eq!(
            u(Protocol::Https, 8443).as_deref(),
            Ok("https://127.0.0.1:8443/f")
        );
        assert_eq!(
            u(Protocol::Ftps, 990).as_deref(),
            Ok("ftps://127.0.0.1:990/f")
        );
    }

    #[test]
    fn build_url_refuses_bad_parts_and_never_carries_user_info() {
        assert!(matches!(
            build_url(Protocol::Http, "user:pw@127.0.0.1", 80, "/", "f"),
            Err(UrlError::Host(_))
        ));
        assert!(matches!(
            build_url(Protocol::Http, "127.0.0.1", 0, "/", "f"),
            Err(UrlError::Port)
        ));
        assert!(matches!(
            build_url(Protocol::Http, "127.0.0.1", 80, "/../", "f"),
            Err(UrlError::Path(_))
        ));
        assert!(matches!(
            build_url(Protocol::Http, "127.0.0.1", 80, "/", "a/f"),
            Err(UrlError::FirmwareName(_))
        ));
        let r = valid(parse(&seed1()));
        let url = Url::parse(&r.source.url).expect("a URL");
        assert_eq!(url.username(), "");
        assert_eq!(url.password(), None);
        assert!(!r.source.url.contains("uftp"));
    }

    // --- rendering ------------------------------------------------------------------

    fn subject(pass_port: Option<&str>) -> ReportSubject {
        ReportSubject {
            session_id: "SID:1".into(),
            request_message_id: "MID:req".into(),
            firmware_name: "fw.bin".into(),
            md5: "434092e44c45b65ba66ea086f697fc02".into(),
            pass_port: pass_port.map(Secret::new),
        }
    }

    fn entry(message: Outgoing) -> OutboxEntry {
        OutboxEntry {
            seq: 7,
            message_id: "MID:gw-1-7".into(),
            job: Some(1),
            message,
        }
    }

    #[test]
    fn acks_render_in_the_wire_shape() {
        let ack = Ack {
            operator: OP_UPGRADE.into(),
            session_id: "SID:1".into(),
            message_id: "MID:1".into(),
            result: Outcome::ok(),
        };
        let want = r#"{"operator":"setCloudUpgradeConfig-Ack","sessionId":"SID:1","messageId":"MID:1","info":"none","result":{"errorNo":0,"description":"ok"}}"#;
        assert_eq!(render_ack(&ack), want);
        assert_eq!(render(&entry(Outgoing::Ack(ack))), want);
        let odd = Ack {
            operator: UNKNOWN_OPERATOR.into(),
            session_id: String::new(),
            message_id: String::new(),
            result: Outcome::new(1, "malformed request: \"quoted\"\n"),
        };
        let line = render_ack(&odd);
        assert!(!line.contains('\n'));
        let back: Value = serde_json::from_str(&line).expect("JSON");
        assert_eq!(back["operator"], "unknown-Ack");
        assert_eq!(
            back["result"]["description"],
            "malformed request: \"quoted\"\n"
        );
    }

    #[test]
    fn progress_reports_render_in_the_wire_shape() {
        let e = entry(Outgoing::Progress {
            subject: subject(None),
            phase: PhaseName::Downloading,
            bytes_done: 123,
            total_bytes: 456,
            percent: 26,
        });
        assert_eq!(
            render(&e),
            r#"{"operator":"reportCloudUpgradeProgress","sessionId":"SID:1","messageId":"MID:gw-1-7","info":{"requestMessageId":"MID:req","firmwareName":"fw.bin","md5sum":"434092e44c45b65ba66ea086f697fc02","phase":"downloading","bytesDone":123,"totalBytes":456,"percent":26}}"#
        );
    }

    #[test]
    fn result_reports_render_in_the_wire_shape() {
        let e = entry(Outgoing::Result {
            subject: subject(None),
            phase: PhaseName::RolledBack,
            result: Outcome::new(51, "rolled back"),
        });
        assert_eq!(
            render(&e),
            r#"{"operator":"reportCloudUpgradeResult","sessionId":"SID:1","messageId":"MID:gw-1-7","info":{"requestMessageId":"MID:req","firmwareName":"fw.bin","md5sum":"434092e44c45b65ba66ea086f697fc02","phase":"rolled_back"},"result":{"errorNo":51,"description":"rolled back"}}"#
        );
    }

    #[test]
    fn reports_carry_pass_port_only_when_the_upgrade_has_one() {
        for message in [
            Outgoing::Progress {
                subject: subject(Some("pp-9")),
                phase: PhaseName::Verifying,
                bytes_done: 1,
                total_bytes: 1,
                percent: 100,
            },
            Outgoing::Result {
                subject: subject(Some("pp-9")),
                phase: PhaseName::Completed,
                result: Outcome::ok(),
            },
        ] {
            let v: Value = serde_json::from_str(&render(&entry(message))).expect("JSON");
            assert_eq!(v["info"]["passPort"], "pp-9");
        }
        let v: Value = serde_json::from_str(&render(&entry(Outgoing::Result {
            subject: subject(None),
            phase: PhaseName::Completed,
            result: Outcome::ok(),
        })))
        .expect("JSON");
        assert!(v["info"].get("passPort").is_none());
    }

    // --- redaction ------------------------------------------------------------------

    fn with_secrets() -> UpgradeRequest {
        let v = set(seed1(), "/info/fileInfo/passPort", json!("pp-secret"));
        valid(parse(&v))
    }

    #[test]
    fn explain_redacts_credentials_and_pass_port() {
        let r = with_secrets();
        let v = explain(&r);
        let text = v.to_string();
        for secret in ["uftp", "echo123", "dWZ0cA", "ZWNobzEyMw", "pp-secret"] {
            assert!(!text.contains(secret), "{secret} leaked: {text}");
        }
        assert_eq!(v["serverConfig"]["userName"], REDACTED);
        assert_eq!(v["serverConfig"]["password"], REDACTED);
        assert_eq!(v["fileInfo"]["passPort"], REDACTED);
        assert_eq!(
            v["fileInfo"]["firmwareName"],
            "DAP-2020SSA_V1.3.2_20200702.bin"
        );
        assert_eq!(v["fileInfo"]["upgradeFileSize"], 66143);
        assert_eq!(v["serverConfig"]["host"], "127.0.0.1");
        assert_eq!(v["serverConfig"]["port"], 21);
        assert_eq!(v["url"], r.source.url.as_str());
        assert_eq!(v["messageId"], r.message_id.as_str());

        let anonymous = set(seed1(), "/info/serverConfig/userName", json!(""));
        let anonymous = set(anonymous, "/info/serverConfig/password", json!(""));
        let v = explain(&valid(parse(&anonymous)));
        assert_eq!(v["serverConfig"]["userName"], "");
        assert_eq!(v["serverConfig"]["password"], "");
        assert_eq!(v["fileInfo"]["passPort"], Value::Null);
    }

    #[test]
    fn debug_redacts_credentials_and_pass_port() {
        let r = with_secrets();
        let text = format!("{r:?} {:?}", Incoming::Valid(Box::new(r.clone())));
        for secret in ["uftp", "echo123", "pp-secret"] {
            assert!(!text.contains(secret), "{secret} leaked: {text}");
        }
        assert!(text.contains(REDACTED));
    }

    // --- properties -----------------------------------------------------------------

    fn any_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            any::<u64>().prop_map(|n| json!(n)),
            any::<f64>().prop_map(|f| json!(f)),
            ".{0,20}".prop_map(Value::String),
            prop::sample::select(vec![
                "setCloudUpgradeConfig",
                "ftp",
                "HTTP",
                "::1",
                "127.0.0.1",
                "21",
                "",
                "..",
                "dWZ0cA==",
                "434092e44c45b65ba66ea086f697fc02",
            ])
            .prop_map(|s| json!(s)),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            let keys = prop::sample::select(vec![
                "operator",
                "sessionId",
                "messageId",
                "info",
                "serverConfig",
                "fileInfo",
                "port",
                "host",
                "hostIp",
                "userName",
                "password",
                "protocol",
                "path",
                "firmwareName",
                "md5sum",
                "upgradeFileSize",
                "totalSize",
                "passPort",
                "x",
            ]);
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map(keys, inner, 0..8).prop_map(|m| Value::Object(
                    m.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
                )),
            ]
        })
    }

    /// What every answer must satisfy, whatever came in.
    fn check_answer(incoming: &Incoming) -> Result<(), TestCaseError> {
        match incoming {
            Incoming::Valid(r) => {
                prop_assert!(!r.message_id.is_empty());
                prop_assert!(r.firmware.size > 0);
                prop_assert!(Url::parse(&r.source.url).is_ok());
            }
            Incoming::Invalid(ack) => {
                prop_assert!((1..=5).contains(&ack.result.error_no));
                prop_assert!(ack.message_id.len() <= MAX_ID_BYTES);
                let line = render_ack(ack);
                prop_assert!(serde_json::from_str::<Value>(&line).is_ok());
            }
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn any_bytes_yield_an_answer(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            check_answer(&parse_request(&bytes, &ParseOptions::default()))?;
        }

        #[test]
        fn any_json_yields_an_answer(v in any_json()) {
            check_answer(&parse(&v))?;
        }

        #[test]
        fn any_json_in_the_request_shape_yields_an_answer(
            ptr in prop::sample::select(vec![
                "/operator", "/sessionId", "/messageId", "/info", "/info/serverConfig",
                "/info/fileInfo", "/info/passPort", "/info/serverConfig/port",
                "/info/serverConfig/host", "/info/serverConfig/hostIp",
                "/info/serverConfig/userName", "/info/serverConfig/password",
                "/info/serverConfig/protocol", "/info/serverConfig/path",
                "/info/fileInfo/firmwareName", "/info/fileInfo/md5sum",
                "/info/fileInfo/upgradeFileSize", "/info/fileInfo/totalSize",
                "/info/fileInfo/passPort",
            ]),
            v in any_json(),
        ) {
            check_answer(&parse(&set(seed1(), ptr, v)))?;
        }

        #[test]
        fn any_plain_path_and_name_give_a_url_ending_in_the_name(
            path in "[ -~]{0,40}",
            name in "[^/\\\\\\p{Cc}]{1,40}",
            port in 1u16..,
        ) {
            prop_assume!(!matches!(name.trim(), "" | "." | ".."));
            prop_assume!(path.trim().split('/').all(|s| s != "." && s != ".."));
            let url = build_url(Protocol::Https, "fw.example", port, &path, &name)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            let parsed = Url::parse(&url).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let origin = if port == 443 {
                "https://fw.example/".to_string()
            } else {
                format!("https://fw.example:{port}/")
            };
            prop_assert!(url.starts_with(&origin), "{} does not start with {}", url, origin);
            prop_assert_eq!(parsed.query(), None);
            prop_assert_eq!(parsed.fragment(), None);
            prop_assert!(!parsed.path().contains("//"));
            let last = parsed.path_segments().and_then(|mut s| s.next_back()).unwrap_or_default();
            let decoded = percent_decode(last);
            prop_assert_eq!(decoded, name.trim());
        }
    }

    /// `%XX` sequences back to bytes (a test's own inverse of the encoding).
    fn percent_decode(s: &str) -> String {
        let b = s.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok());
            match hex
                .filter(|_| b[i] == b'%')
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                Some(byte) => {
                    out.push(byte);
                    i += 3;
                }
                None => {
                    out.push(b[i]);
                    i += 1;
                }
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}
