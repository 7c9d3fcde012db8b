//! Parsing one `setCloudUpgradeConfig` request: [`parse_request`] reads the
//! envelope (operator, ids), then every field of `info` in a fixed order, and
//! answers with the validated request or the first [`Rejection`], as the ack
//! the request gets. Fields are named by their JSON path in every
//! description; the credentials come last, since decoding them may run the
//! external decoder ([`super::credentials`]).

use super::credentials::credential_field;
use super::url::{build_url, check_file_name, normalize_host, path_segments, UrlError};
use super::{
    shown, ParseOptions, DECODER_TIMEOUT, MAX_OPERATOR_BYTES, MAX_PASS_PORT_BYTES, UNKNOWN_OPERATOR,
};
use fwagent_state::{
    ack_no, Ack, Firmware, Incoming, Outcome, Protocol, Secret, Source, UpgradeRequest, OP_UPGRADE,
};
use serde_json::{Map, Value};
use std::time::Duration;

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
    /// errorNo 3: a required field that has two names (PROTOCOL.md's
    /// aliases) is missing under both; the description names both paths.
    #[error("missing required field {0} or {1}")]
    MissingBoth(&'static str, &'static str),
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
            Rejection::Missing(_) | Rejection::MissingBoth(..) => ack_no::MISSING_FIELD,
            Rejection::Invalid { .. } => ack_no::INVALID_FIELD,
            Rejection::UnsupportedProtocol(_) => ack_no::UNSUPPORTED_PROTOCOL,
        }
    }
}

pub(super) fn invalid(path: &'static str, why: impl std::fmt::Display) -> Rejection {
    Rejection::Invalid {
        path,
        why: why.to_string(),
    }
}

/// Parse one `setCloudUpgradeConfig` request. Never panics: anything that is
/// not a valid request comes back as `Incoming::Invalid` with the ack it gets.
/// May run [`ParseOptions::credentials_decoder`] (at most twice, each at most
/// [`DECODER_TIMEOUT`]); does no other I/O.
pub fn parse_request(bytes: &[u8], opts: &ParseOptions) -> Incoming {
    parse_request_within(bytes, opts, DECODER_TIMEOUT)
}

/// [`parse_request`] with a decoder timeout of the caller's choosing.
pub(super) fn parse_request_within(
    bytes: &[u8],
    opts: &ParseOptions,
    timeout: Duration,
) -> Incoming {
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
    let top = envelope(bytes, opts, echo)?;
    let max_id = opts.max_id_bytes();
    let session_id = id_field(&top, "sessionId", max_id)?;
    let message_id = id_field(&top, "messageId", max_id)?;

    let info = object_field(&top, "info", "info")?;
    let server = object_field(info, "serverConfig", "info.serverConfig")?;
    let file = object_field(info, "fileInfo", "info.fileInfo")?;

    let place = server_fields(server)?;
    let firmware = file_fields(file, opts.max_image_size())?;
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

    let url = request_url(&place, &firmware.name)?;
    Ok(UpgradeRequest {
        message_id: message_id.to_string(),
        session_id: session_id.to_string(),
        source: Source {
            protocol: place.protocol,
            host: place.host,
            port: place.port,
            path: place.path.to_string(),
            url,
            user,
            password,
        },
        firmware,
        pass_port,
    })
}

/// The request's size, its JSON, and its operator; echoes the ids and the
/// operator as far as they can be read, before judging anything else.
fn envelope(
    bytes: &[u8],
    opts: &ParseOptions,
    echo: &mut Echo,
) -> Result<Map<String, Value>, Rejection> {
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
    Ok(top)
}

/// Where the firmware is: `info.serverConfig` but for the credentials.
struct Place<'a> {
    protocol: Protocol,
    host: String,
    port: u16,
    path: &'a str,
}

fn server_fields(server: &Map<String, Value>) -> Result<Place<'_>, Rejection> {
    let protocol = parse_protocol(string_field(
        server,
        "protocol",
        "info.serverConfig.protocol",
    )?)?;
    let host = host_field(server)?;
    let port = port_field(server)?;
    let path = string_field(server, "path", "info.serverConfig.path")?;
    path_segments(path).map_err(|why| invalid("info.serverConfig.path", why))?;
    Ok(Place {
        protocol,
        host,
        port,
        path,
    })
}

/// `info.fileInfo` but for the `passPort`.
fn file_fields(file: &Map<String, Value>, max_size: u64) -> Result<Firmware, Rejection> {
    let name = string_field(file, "firmwareName", "info.fileInfo.firmwareName")?.trim();
    check_file_name(name).map_err(|why| invalid("info.fileInfo.firmwareName", why))?;
    let md5 = md5_field(file)?;
    let size = size_field(file, max_size)?;
    let signature = signature_field(file)?;
    Ok(Firmware {
        name: name.to_string(),
        md5,
        size,
        signature,
    })
}

/// `signature` (optional): the `.sig` file in base64, kept as the
/// signature's canonical base64. An empty string is no signature.
fn signature_field(file: &Map<String, Value>) -> Result<Option<String>, Rejection> {
    const PATH: &str = "info.fileInfo.signature";
    match get(file, "signature") {
        None => Ok(None),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
        Some(Value::String(s)) => crate::signature::parse_field(s)
            .map(|sig| Some(crate::signature::encode_sig(&sig)))
            .map_err(|why| invalid(PATH, why)),
        Some(other) => Err(expected(PATH, "a string", other)),
    }
}

/// The firmware's URL, each part's error on that part's path.
fn request_url(place: &Place<'_>, name: &str) -> Result<String, Rejection> {
    build_url(place.protocol, &place.host, place.port, place.path, name).map_err(|e| match e {
        UrlError::Host(why) => invalid("info.serverConfig.host", why),
        UrlError::Port => invalid("info.serverConfig.port", "must be 1..=65535"),
        UrlError::Path(why) => invalid("info.serverConfig.path", why),
        UrlError::FirmwareName(why) => invalid("info.fileInfo.firmwareName", why),
        UrlError::Url(e) => invalid("info.serverConfig", format!("cannot build the URL: {e}")),
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

pub(super) fn string_field<'a>(
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

/// Why a `sessionId` or `messageId` is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
enum IdError {
    #[error("must not be empty")]
    Empty,
    #[error("longer than {0} bytes")]
    TooLong(usize),
    #[error("contains control characters")]
    ControlCharacters,
}

fn check_id(s: &str, max: usize) -> Result<(), IdError> {
    if s.is_empty() {
        Err(IdError::Empty)
    } else if s.len() > max {
        Err(IdError::TooLong(max))
    } else if s.chars().any(char::is_control) {
        Err(IdError::ControlCharacters)
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
        (None, None) => Err(Rejection::MissingBoth(HOST, HOST_IP)),
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
        (None, None) => Err(Rejection::MissingBoth(SIZE, TOTAL)),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::fixtures::*;
    use crate::protocol::{render_ack, DEFAULT_MAX_IMAGE_SIZE, MAX_ID_BYTES, MAX_REQUEST_BYTES};
    use fwagent_state::ack_no::*;
    use proptest::prelude::*;
    use serde_json::json;
    use url::Url;

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
    fn id_errors_say_what_they_said() {
        for (bad, why) in [
            (json!(""), "must not be empty"),
            (json!("x".repeat(MAX_ID_BYTES + 1)), "longer than 256 bytes"),
            (json!("MID:\u{1}"), "contains control characters"),
        ] {
            let ack = rejected(parse(&set(seed1(), "/messageId", bad)));
            assert_eq!(
                ack.result.description,
                format!("invalid field messageId: {why}")
            );
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
            ("/info/serverConfig/userName", "info.serverConfig.userName"),
            ("/info/serverConfig/password", "info.serverConfig.password"),
            ("/info/serverConfig/protocol", "info.serverConfig.protocol"),
            ("/info/serverConfig/path", "info.serverConfig.path"),
            ("/info/fileInfo/firmwareName", "info.fileInfo.firmwareName"),
            ("/info/fileInfo/md5sum", "info.fileInfo.md5sum"),
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

    /// Either alias would do, so a request with neither is told of both:
    /// errorNo 3, each by its path.
    #[test]
    fn a_field_with_an_alias_is_missing_under_both_names() {
        for (ptr, other, both) in [
            (
                "/info/serverConfig/host",
                "/info/serverConfig/hostIp",
                "info.serverConfig.host or info.serverConfig.hostIp",
            ),
            (
                "/info/fileInfo/upgradeFileSize",
                "/info/fileInfo/totalSize",
                "info.fileInfo.upgradeFileSize or info.fileInfo.totalSize",
            ),
        ] {
            let neither = set(remove(seed1(), ptr), other, Value::Null);
            let ack = assert_rejects(&neither, MISSING_FIELD, both);
            assert_eq!(
                ack.result.description,
                format!("missing required field {both}")
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
    fn a_signature_field_is_base64_of_64_bytes_or_refused_naming_it() {
        const P: &str = "/info/fileInfo/signature";
        const PATH: &str = "info.fileInfo.signature";
        use base64::Engine;
        let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
        let sig = [9u8; 64];
        let r = valid(parse(&set(seed1(), P, json!(b64(&sig)))));
        assert_eq!(r.firmware.signature, Some(b64(&sig)));
        // Absent, null or empty: none (the .sig beside the image is looked for).
        assert_eq!(valid(parse(&seed1())).firmware.signature, None);
        assert_eq!(
            valid(parse(&set(seed1(), P, json!("")))).firmware.signature,
            None
        );
        assert_eq!(
            valid(parse(&set(seed1(), P, Value::Null)))
                .firmware
                .signature,
            None
        );
        for (bad, why) in [
            (json!("not base64!"), "not base64"),
            (json!(b64(&[1u8; 63])), "63 bytes"),
            (json!(b64(&[1u8; 65])), "65 bytes"),
            (json!(64), "a string"),
        ] {
            let ack = assert_rejects(&set(seed1(), P, bad), INVALID_FIELD, PATH);
            assert!(ack.result.description.contains(why), "{ack:?}");
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
        // (`signature` is known now: PROTOCOL.md, issue 18.)
        let v = set(v, "/info/fileInfo/checksum", json!({"alg": "none"}));
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
    }
}
