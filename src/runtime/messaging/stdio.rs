//! The stdio transport: requests as JSON lines on stdin, messages as JSON
//! lines on stdout (flushed at once), logs on stderr.
//!
//! A thread of its own reads stdin, parses each line (a credentials decoder
//! may block it, nothing else) and hands the typed request on; at EOF it
//! says [`InputClosed`] after the last request, so the Upgrade actor sees the
//! end of input only once every request before it is in its mailbox.

use super::{Inbox, Transport, TransportError};
use crate::runtime::{BoxFuture, InputClosed};
use actix::prelude::*;
use fwagent_state::OutboxEntry;
use std::io::{BufRead, Write};

/// Requests as JSON lines on stdin, messages as JSON lines on stdout.
pub struct Stdio;

/// Read one line of at most `max` bytes. A longer line is consumed whole and
/// returned cut at `max + 1` bytes, so the parser rejects it as too large.
pub fn read_line_bounded(input: &mut impl BufRead, max: usize) -> std::io::Result<Option<Vec<u8>>> {
    let mut line = Vec::new();
    let mut seen_any = false;
    loop {
        let buf = input.fill_buf()?;
        if buf.is_empty() {
            return Ok(seen_any.then_some(line));
        }
        seen_any = true;
        let (take, end) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        let room = (max + 1).saturating_sub(line.len());
        line.extend_from_slice(&buf[..take.min(room)]);
        input.consume(take);
        if end {
            if line.last() == Some(&b'\n') {
                line.pop();
            }
            return Ok(Some(line));
        }
    }
}

/// Read, parse and hand on every request line until EOF (or the Upgrade
/// actor is gone).
fn read_requests(input: &mut impl BufRead, inbox: &Inbox) {
    let max = inbox.max_request_bytes();
    loop {
        match read_line_bounded(input, max) {
            Ok(Some(line)) if line.iter().all(u8::is_ascii_whitespace) => {}
            Ok(Some(line)) => {
                if !inbox.hand_on_blocking(inbox.parse_blocking(&line)) {
                    return;
                }
            }
            Ok(None) => return,
            Err(e) => {
                tracing::error!(error = %e, "cannot read stdin");
                return;
            }
        }
    }
}

impl Transport for Stdio {
    fn start(&mut self, inbox: Inbox, closed: Recipient<InputClosed>) {
        std::thread::Builder::new()
            .name("stdin".into())
            .spawn(move || {
                read_requests(&mut std::io::stdin().lock(), &inbox);
                tracing::info!("stdin closed; finishing the work under way");
                closed.do_send(InputClosed);
            })
            .expect("spawning the stdin reader thread");
    }

    fn send<'a>(
        &'a mut self,
        _entry: &'a OutboxEntry,
        json: String,
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        Box::pin(async move {
            let mut out = std::io::stdout().lock();
            let written = out
                .write_all(json.as_bytes())
                .and_then(|_| out.write_all(b"\n"))
                .and_then(|_| out.flush());
            if let Err(e) = &written {
                stop_on_write_error(e);
            }
            written.map_err(TransportError::Stdout)
        })
    }
}

/// A stdout that cannot take our replies stops the agent with exit 3 rather
/// than have it retry for ever: a closed pipe (nobody reads them any more),
/// a full disk or an I/O error on the file it points at. The outbox stays in
/// the store and goes out on the next start. Only a write that would block
/// (a non-blocking stdout that is full for now) is retried.
fn stop_on_write_error(e: &std::io::Error) {
    match e.kind() {
        std::io::ErrorKind::WouldBlock => {}
        std::io::ErrorKind::BrokenPipe => {
            tracing::error!("stdout is closed; stopping (the outbox is kept)");
            System::current().stop_with_code(3);
        }
        _ => {
            tracing::error!(error = %e, "cannot write stdout; stopping (the outbox is kept)");
            System::current().stop_with_code(3);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_lines() {
        let mut input = std::io::Cursor::new(b"abc\n\nlong-line-here\nlast".to_vec());
        assert_eq!(read_line_bounded(&mut input, 8).unwrap().unwrap(), b"abc");
        assert_eq!(read_line_bounded(&mut input, 8).unwrap().unwrap(), b"");
        assert_eq!(
            read_line_bounded(&mut input, 8).unwrap().unwrap(),
            b"long-line"
        );
        assert_eq!(read_line_bounded(&mut input, 8).unwrap().unwrap(), b"last");
        assert_eq!(read_line_bounded(&mut input, 8).unwrap(), None);
    }
}
