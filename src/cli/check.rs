//! `fwagent check [FILE|-]`: validate one request without running it.
//!
//! Reads the request from FILE, or from stdin when FILE is `-` or absent,
//! parses it exactly as the agent would ([`crate::protocol::parse_request`])
//! and prints the ack the agent would send as the first stdout line. With
//! `--explain`, a valid request is then shown as pretty JSON with its
//! credentials and `passPort` redacted. No network, no state store: the only
//! thing it may run is the configured credentials decoder.
//!
//! Exit codes: 0 the request would be accepted (errorNo 0); 1 it would be
//! rejected; 2 the request could not be read (or stdout could not be written).

use super::{exit, CheckArgs};
use crate::protocol::{self, MAX_REQUEST_BYTES_CEILING};
use fwagent_state::Incoming;
use std::io::{self, Read, Write};
use std::path::Path;
use std::process::ExitCode;

pub fn main(args: CheckArgs) -> ExitCode {
    let opts = match super::parse_options(
        args.max_image_size,
        args.credentials_decoder,
        args.max_request_bytes,
        args.max_id_bytes,
    ) {
        Ok(opts) => opts,
        Err(e) => {
            eprintln!("fwagent check: {e}");
            return ExitCode::from(exit::USAGE);
        }
    };
    let bytes = match read_request(args.file.as_deref()) {
        Ok(bytes) => bytes,
        Err(e) => {
            let from = match args.file.as_deref() {
                Some(p) if p != Path::new("-") => p.display().to_string(),
                _ => "stdin".to_string(),
            };
            eprintln!("fwagent check: cannot read {from}: {e}");
            return ExitCode::from(exit::USAGE);
        }
    };
    let incoming = protocol::parse_request(&bytes, &opts);
    let (ack_line, explained, accepted) = match &incoming {
        Incoming::Valid(req) => {
            let ack = fwagent_state::Ack {
                operator: fwagent_state::OP_UPGRADE.to_string(),
                session_id: req.session_id.clone(),
                message_id: req.message_id.clone(),
                result: fwagent_state::Outcome::ok(),
            };
            let explained = args.explain.then(|| protocol::explain(req));
            (protocol::render_ack(&ack), explained, true)
        }
        Incoming::Invalid(ack) => (protocol::render_ack(ack), None, false),
    };
    if let Err(e) = print(&ack_line, explained.as_ref()) {
        eprintln!("fwagent check: cannot write to stdout: {e}");
        return ExitCode::from(exit::USAGE);
    }
    if accepted {
        ExitCode::from(exit::OK)
    } else {
        ExitCode::from(exit::REJECTED)
    }
}

/// A request file's bytes (`None` or `-`: stdin), at most one byte more
/// than any configurable limit, so an oversized request is still reported as
/// such (by whoever parses it) without reading it all.
pub fn read_request(file: Option<&Path>) -> io::Result<Vec<u8>> {
    let limit = MAX_REQUEST_BYTES_CEILING as u64 + 1;
    let mut bytes = Vec::new();
    match file {
        Some(path) if path != Path::new("-") => {
            std::fs::File::open(path)?
                .take(limit)
                .read_to_end(&mut bytes)?;
        }
        _ => {
            io::stdin().lock().take(limit).read_to_end(&mut bytes)?;
        }
    }
    Ok(bytes)
}

fn print(ack_line: &str, explained: Option<&serde_json::Value>) -> io::Result<()> {
    let mut out = io::stdout().lock();
    writeln!(out, "{ack_line}")?;
    if let Some(v) = explained {
        let pretty = serde_json::to_string_pretty(v).map_err(io::Error::other)?;
        writeln!(out, "{pretty}")?;
    }
    out.flush()
}
