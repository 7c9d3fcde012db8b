//! The credentials of a request: `userName` and `password` are base64 of
//! the plain text, and when that is not text (the cloud enciphers them) the
//! operator's credentials decoder (`--credentials-decoder CMD`) is asked, by
//! the contract of docs/PROTOCOL-NOTES.md. The decoder runs through the one
//! runner of external commands ([`crate::exec::capture_shell`]): its own
//! process group, a deadline of [`DECODER_TIMEOUT`](super::DECODER_TIMEOUT), its output capped at
//! [`MAX_DECODER_OUTPUT_BYTES`], its stderr discarded, nothing logged.
//! [`DecoderError`] says what went wrong and never holds what it printed.

use super::parse::{invalid, string_field, Rejection};
use super::{ParseOptions, DECODER_FIELD_ENV, MAX_CREDENTIAL_BYTES, MAX_DECODER_OUTPUT_BYTES};
use crate::exec::{capture_shell, Captured};
use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::{DecodePaddingMode, Engine as _};
use fwagent_state::Secret;
use serde_json::{Map, Value};
use std::process::ExitStatus;
use std::time::Duration;

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

pub(super) fn credential_field(
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

/// Run the credentials decoder: `/bin/sh -c CMD` in its own process group,
/// the base64 text and a newline on stdin, [`DECODER_FIELD_ENV`] set to
/// `field`, stderr discarded. Its stdout, less one trailing newline, is the
/// credential.
fn run_decoder(
    cmd: &str,
    field: &str,
    base64_text: &str,
    timeout: Duration,
) -> Result<String, DecoderError> {
    let envs = [(DECODER_FIELD_ENV, field.to_string())];
    let input = format!("{base64_text}\n");
    let ran = capture_shell(
        cmd,
        &envs,
        input.as_bytes(),
        MAX_DECODER_OUTPUT_BYTES,
        timeout,
    )
    .map_err(DecoderError::Spawn)?;
    let (status, output) = match ran {
        Captured::Exited { status, stdout } => (status, stdout),
        Captured::TimedOut => return Err(DecoderError::Timeout(timeout)),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::fixtures::*;
    use crate::protocol::parse::parse_request_within;
    use crate::protocol::DECODER_TIMEOUT;
    use fwagent_state::ack_no::*;
    use serde_json::json;
    use std::time::Instant;

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
}
