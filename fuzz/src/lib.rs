//! What must hold for every input to the request parser, whatever the bytes:
//! one function, [`check_answer`], shared by the `parse_request` fuzz target
//! and by `tests/fuzz_corpus.rs` (which includes this file with `#[path]`, so
//! `cargo test` replays the committed corpus against the same invariants).
//!
//! The invariants: `parse_request` answers (never panics) and answers the same
//! way twice; a valid request has well-formed ids, a size within the default
//! maximum, and a URL of its own protocol and host without user info; a
//! rejection is errorNo 1–5 and renders as one JSON line of at most
//! [`MAX_ACK_BYTES`] that echoes only ids the request really carried; and,
//! with the input's credentials and `passPort` replaced by marker values,
//! neither the markers nor their base64 forms appear in what comes back.

use base64::Engine as _;
use fwagent::protocol::{
    explain, parse_request, render_ack, ParseOptions, DEFAULT_MAX_IMAGE_SIZE, MAX_ID_BYTES,
    REDACTED,
};
use fwagent_state::{Incoming, UpgradeRequest};
use serde_json::Value;

/// The longest ack line a request may provoke. The ids and the operator are
/// at most 256 bytes each and carry no control characters, so JSON escaping
/// at most doubles them; descriptions quote at most 64 characters of input.
pub const MAX_ACK_BYTES: usize = 4096;

/// Stand-ins for secrets: a decoded user name, a password and a `passPort`
/// that no other field of an input holds.
const USER_MARKER: &str = "fuzz-user-7f3a9c";
const PASSWORD_MARKER: &str = "fuzz-pass-e41b07";
const PASS_PORT_MARKER: &str = "fuzz-passport-c92d5e";

/// Check every invariant for one input; `Err` says which broke and how.
pub fn check_answer(bytes: &[u8]) -> Result<(), String> {
    let opts = ParseOptions::default();
    let answer = parse_request(bytes, &opts);
    if parse_request(bytes, &opts) != answer {
        return Err("parse_request answered the same bytes differently".into());
    }
    let input: Option<Value> = serde_json::from_slice(bytes).ok();
    match &answer {
        Incoming::Valid(req) => check_valid(req)?,
        Incoming::Invalid(ack) => {
            let no = ack.result.error_no;
            if !(1..=5).contains(&no) {
                return Err(format!("a rejection with errorNo {no}"));
            }
            if ack.result.description.is_empty() {
                return Err("a rejection without a description".into());
            }
            let line = render_ack(ack);
            if line.len() > MAX_ACK_BYTES {
                return Err(format!("an ack of {} bytes", line.len()));
            }
            if line.contains('\n') {
                return Err("an ack that is not one line".into());
            }
            let parsed: Value =
                serde_json::from_str(&line).map_err(|e| format!("an ack that is not JSON: {e}"))?;
            for (key, echoed) in [
                ("messageId", &ack.message_id),
                ("sessionId", &ack.session_id),
            ] {
                if parsed[key] != Value::String(echoed.clone()) {
                    return Err(format!("{key} rendered differently from the ack"));
                }
                let given = input
                    .as_ref()
                    .and_then(|v| v.get(key))
                    .and_then(Value::as_str);
                if !echoed.is_empty() && given != Some(echoed.as_str()) {
                    return Err(format!(
                        "{key} {echoed:?} echoed, but the request had {given:?}"
                    ));
                }
                if echoed.len() > MAX_ID_BYTES {
                    return Err(format!("{key} of {} bytes echoed", echoed.len()));
                }
            }
        }
    }
    if let Some(Value::Object(_)) = &input {
        check_secrets_stay(bytes, input.unwrap_or_default())?;
    }
    Ok(())
}

fn check_valid(req: &UpgradeRequest) -> Result<(), String> {
    for (key, id) in [
        ("messageId", &req.message_id),
        ("sessionId", &req.session_id),
    ] {
        if id.is_empty() || id.len() > MAX_ID_BYTES || id.chars().any(char::is_control) {
            return Err(format!("accepted {key} {id:?}"));
        }
    }
    let fw = &req.firmware;
    if fw.size == 0 || fw.size > DEFAULT_MAX_IMAGE_SIZE {
        return Err(format!("accepted a size of {} bytes", fw.size));
    }
    if fw.md5.len() != 32
        || !fw
            .md5
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(format!("accepted md5 {:?}", fw.md5));
    }
    let name_ok = !fw.name.is_empty()
        && fw.name.len() <= 255
        && fw.name != "."
        && fw.name != ".."
        && !fw.name.contains(['/', '\\'])
        && !fw.name.chars().any(char::is_control);
    if !name_ok {
        return Err(format!("accepted firmwareName {:?}", fw.name));
    }
    let src = &req.source;
    let url = url::Url::parse(&src.url).map_err(|e| format!("accepted a bad URL: {e}"))?;
    if url.scheme() != src.protocol.as_str() {
        return Err(format!("URL {} for protocol {}", src.url, src.protocol));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!("URL {} carries user info", src.url));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!("URL {} has a query or fragment", src.url));
    }
    let host = match url.host() {
        Some(url::Host::Ipv6(ip)) => ip.to_string(),
        Some(h) => h.to_string(),
        None => return Err(format!("URL {} has no host", src.url)),
    };
    if host != src.host {
        return Err(format!("URL host {host} but request host {}", src.host));
    }
    if src.port == 0 || url.port_or_known_default() != Some(src.port) {
        return Err(format!("URL {} for port {}", src.url, src.port));
    }
    let shown = explain(req);
    for key in ["userName", "password"] {
        let v = shown["serverConfig"][key].as_str();
        if v != Some("") && v != Some(REDACTED) {
            return Err(format!("explain shows {key} as {v:?}"));
        }
    }
    Ok(())
}

/// Put marker credentials and a marker `passPort` into a JSON object request
/// (where its shape allows) and check that nothing the parser returns for
/// people (the ack, `explain`) shows them.
fn check_secrets_stay(raw: &[u8], mut v: Value) -> Result<(), String> {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let forms = [
        USER_MARKER.to_string(),
        PASSWORD_MARKER.to_string(),
        PASS_PORT_MARKER.to_string(),
        b64(USER_MARKER),
        b64(PASSWORD_MARKER),
    ];
    let text = String::from_utf8_lossy(raw);
    if forms.iter().any(|f| text.contains(f.as_str())) {
        return Ok(()); // the input itself carries a marker: nothing to learn
    }
    if let Some(Value::Object(server)) = v.pointer_mut("/info/serverConfig") {
        server.insert("userName".into(), b64(USER_MARKER).into());
        server.insert("password".into(), b64(PASSWORD_MARKER).into());
    }
    if let Some(Value::Object(file)) = v.pointer_mut("/info/fileInfo") {
        file.insert("passPort".into(), PASS_PORT_MARKER.into());
    }
    if let Some(Value::Object(info)) = v.pointer_mut("/info") {
        if info.contains_key("passPort") {
            info.insert("passPort".into(), PASS_PORT_MARKER.into());
        }
    }
    let Ok(bytes) = serde_json::to_vec(&v) else {
        return Ok(());
    };
    let out = match parse_request(&bytes, &ParseOptions::default()) {
        Incoming::Valid(req) => explain(&req).to_string(),
        Incoming::Invalid(ack) => render_ack(&ack),
    };
    match forms.iter().find(|f| out.contains(f.as_str())) {
        Some(found) => Err(format!("a secret ({found}) shows in {out}")),
        None => Ok(()),
    }
}
