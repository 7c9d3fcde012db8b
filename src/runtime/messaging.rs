//! The Messaging actor: carries requests in and the outbox out.
//!
//! A [`Transport`] (stdio, MQTT) delivers each request to the Upgrade actor
//! and sends what the Upgrade actor committed to the outbox, one message at a
//! time and in order. Only when the transport confirms a message (a flushed
//! stdout line, an MQTT PUBACK) is it reported [`Delivered`]; until then it
//! stays in the store's outbox and goes out again after a restart.

use super::download::BoxFuture;
use super::upgrade::UNCOMMITTED;
use super::{Delivered, IncomingRequest, InputClosed};
use crate::{crash, protocol};
use actix::dev::SendError;
use actix::prelude::*;
use fwagent_state::OutboxEntry;
use std::io::{BufRead, Write};
use std::time::Duration;
use tokio::sync::mpsc;

/// Where requests come from and replies go.
pub trait Transport: Send + 'static {
    /// Begin receiving: every request to `inbox`; the end of input (if the
    /// transport has one) to `closed`.
    fn start(&mut self, inbox: Recipient<IncomingRequest>, closed: Recipient<InputClosed>);

    /// Send one rendered message; `Ok` once the peer has it.
    fn send<'a>(
        &'a mut self,
        entry: &'a OutboxEntry,
        json: String,
    ) -> BoxFuture<'a, Result<(), String>>;
}

/// Send this committed outbox entry.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Outbound(pub OutboxEntry);

/// Start receiving requests (sent by the Upgrade actor once it has resumed).
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Listen;

pub struct Messaging {
    transport: Option<Box<dyn Transport>>,
    inbox: Recipient<IncomingRequest>,
    closed: Recipient<InputClosed>,
    delivered: Recipient<Delivered>,
    queue: mpsc::UnboundedSender<OutboxEntry>,
    queued: Option<mpsc::UnboundedReceiver<OutboxEntry>>,
}

impl Messaging {
    pub fn new(
        transport: Box<dyn Transport>,
        inbox: Recipient<IncomingRequest>,
        closed: Recipient<InputClosed>,
        delivered: Recipient<Delivered>,
    ) -> Self {
        let (queue, queued) = mpsc::unbounded_channel();
        Messaging {
            transport: Some(transport),
            inbox,
            closed,
            delivered,
            queue,
            queued: Some(queued),
        }
    }
}

impl Actor for Messaging {
    type Context = Context<Self>;
}

impl Handler<Listen> for Messaging {
    type Result = ();

    /// Start the transport, and the sender that drains the queue in order.
    fn handle(&mut self, _msg: Listen, _ctx: &mut Context<Self>) {
        let (Some(mut transport), Some(mut rx)) = (self.transport.take(), self.queued.take())
        else {
            return;
        };
        transport.start(self.inbox.clone(), self.closed.clone());
        let delivered = self.delivered.clone();
        actix_rt::spawn(async move {
            while let Some(entry) = rx.recv().await {
                let json = protocol::render(&entry);
                let mut backoff = Duration::from_millis(200);
                loop {
                    match transport.send(&entry, json.clone()).await {
                        Ok(()) => break,
                        Err(e) => {
                            tracing::warn!(seq = entry.seq, error = %e, "sending failed; will retry");
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_secs(10));
                        }
                    }
                }
                if entry.seq != UNCOMMITTED {
                    crash::point("before-delivered");
                }
                delivered.do_send(Delivered { seq: entry.seq });
            }
        });
    }
}

impl Handler<Outbound> for Messaging {
    type Result = ();

    fn handle(&mut self, msg: Outbound, _ctx: &mut Context<Self>) {
        let _ = self.queue.send(msg.0);
    }
}

/// Requests as JSON lines on stdin, messages as JSON lines on stdout.
pub struct Stdio {
    /// Lines are read up to this many bytes (+ 1, so a longer one is refused).
    pub max_request_bytes: usize,
}

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

impl Transport for Stdio {
    fn start(&mut self, inbox: Recipient<IncomingRequest>, closed: Recipient<InputClosed>) {
        let max_request_bytes = self.max_request_bytes;
        std::thread::Builder::new()
            .name("stdin".into())
            .spawn(move || {
                let stdin = std::io::stdin();
                let mut input = stdin.lock();
                loop {
                    match read_line_bounded(&mut input, max_request_bytes) {
                        Ok(Some(line)) => {
                            if line.iter().all(u8::is_ascii_whitespace) {
                                continue;
                            }
                            // Back-pressure: wait while the Upgrade actor's
                            // mailbox is full instead of queueing without bound.
                            let mut request = IncomingRequest {
                                bytes: line,
                                reply: None,
                            };
                            loop {
                                match inbox.try_send(request) {
                                    Ok(()) => break,
                                    Err(SendError::Full(back)) => {
                                        request = back;
                                        std::thread::sleep(std::time::Duration::from_millis(2));
                                    }
                                    Err(SendError::Closed(_)) => return,
                                }
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            tracing::error!(error = %e, "cannot read stdin");
                            break;
                        }
                    }
                }
                tracing::info!("stdin closed; finishing the work under way");
                closed.do_send(InputClosed);
            })
            .expect("spawning the stdin reader thread");
    }

    fn send<'a>(
        &'a mut self,
        _entry: &'a OutboxEntry,
        json: String,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let mut out = std::io::stdout().lock();
            let written = out
                .write_all(json.as_bytes())
                .and_then(|_| out.write_all(b"\n"))
                .and_then(|_| out.flush());
            if let Err(e) = &written {
                if e.kind() == std::io::ErrorKind::BrokenPipe {
                    // Nobody reads our replies any more: stop rather than
                    // retry forever. The outbox stays in the store and goes
                    // out on the next start.
                    tracing::error!("stdout is closed; stopping (the outbox is kept)");
                    System::current().stop_with_code(3);
                }
            }
            written.map_err(|e| format!("cannot write stdout: {e}"))
        })
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
