//! The Messaging actor: carries requests in and the outbox out.
//!
//! A [`Transport`] ([`stdio::Stdio`], [`mqtt::Mqtt`]) hands each request's
//! bytes to its [`Inbox`], which parses them at the edge
//! ([`crate::protocol::parse_request`]) and passes the typed [`Request`] on
//! to the Upgrade actor: a valid request, or the ack that refuses it. The
//! Upgrade actor never sees wire bytes. The Messaging actor sends what the
//! Upgrade actor committed to the outbox, one message at a time and in
//! order. Only when the transport confirms a message (a flushed stdout line,
//! an MQTT PUBACK) is it reported [`Delivered`]; until then it stays in the
//! store's outbox and goes out again after a restart.
//!
//! Requests are taken with back-pressure: at most [`REQUESTS_WAITING`] wait
//! between a transport and the Upgrade actor's decision, and a transport
//! with more to give waits rather than reads. MQTT then stops reading its
//! socket (the broker keeps the rest, unacknowledged); stdin is not read
//! while the Upgrade actor's mailbox is full.

pub mod mqtt;
pub mod stdio;

use super::flash::staging::Staging;
use super::{BoxFuture, Delivered, InputClosed, Request, UNCOMMITTED};
use crate::crash;
use crate::protocol::{self, ParseOptions};
use actix::dev::SendError;
use actix::prelude::*;
use fwagent_state::{Ack, Incoming, OutboxEntry};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Why a transport could not send a message. The message stays queued and
/// is sent again.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot write stdout: {0}")]
    Stdout(#[source] std::io::Error),
    #[error("the MQTT connection task has stopped")]
    ConnectionStopped,
}

/// Where requests come from and replies go.
pub trait Transport: Send + 'static {
    /// Begin receiving: every request to `inbox`; the end of input (if the
    /// transport has one) to `closed`.
    fn start(&mut self, inbox: Inbox, closed: Recipient<InputClosed>);

    /// Send one rendered message; `Ok` once the peer has it.
    fn send<'a>(
        &'a mut self,
        entry: &'a OutboxEntry,
        json: String,
    ) -> BoxFuture<'a, Result<(), TransportError>>;
}

/// Where a transport (or the control socket's `submit`) hands request bytes:
/// parsed here, then passed on typed to the Upgrade actor.
#[derive(Clone)]
pub struct Inbox {
    parse: Arc<ParseOptions>,
    upgrade: Recipient<Request>,
    /// Measures the room for a request's image before it is decided, so
    /// the Upgrade actor does no file I/O.
    staging: Staging,
}

impl Inbox {
    pub fn new(parse: ParseOptions, upgrade: Recipient<Request>, staging: Staging) -> Inbox {
        Inbox {
            parse: Arc::new(parse),
            upgrade,
            staging,
        }
    }

    /// A parsed request as the Upgrade actor takes it: a valid one with the
    /// room there is for its image.
    fn request(&self, incoming: Incoming, reply: Option<oneshot::Sender<Ack>>) -> Request {
        let free_bytes = match &incoming {
            Incoming::Valid(_) => self.staging.room(),
            Incoming::Invalid(_) => None,
        };
        Request {
            incoming,
            free_bytes,
            reply,
        }
    }

    /// Requests are read up to this many bytes (+ 1, so a longer one is
    /// refused as too large).
    pub fn max_request_bytes(&self) -> usize {
        self.parse.max_request_bytes()
    }

    /// Parse on this thread: it may block while a credentials decoder runs
    /// (at most [`protocol::DECODER_TIMEOUT`] per credential).
    pub fn parse_blocking(&self, bytes: &[u8]) -> Incoming {
        protocol::parse_request(bytes, &self.parse)
    }

    /// Parse without blocking the arbiter: on a blocking thread when a
    /// credentials decoder may run, else right here. `None` when the parser
    /// itself failed (a panic): the request is dropped, as if never sent.
    pub async fn parse(&self, bytes: Vec<u8>) -> Option<Incoming> {
        if self.parse.credentials_decoder.is_none() {
            return Some(self.parse_blocking(&bytes));
        }
        let parse = self.parse.clone();
        match tokio::task::spawn_blocking(move || protocol::parse_request(&bytes, &parse)).await {
            Ok(incoming) => Some(incoming),
            Err(e) => {
                tracing::error!(error = %e, "the request parser failed; request dropped");
                None
            }
        }
    }

    /// Hand a parsed request on, waiting while the Upgrade actor's mailbox
    /// is full (back-pressure for a blocking reader such as stdin). `false`
    /// when the Upgrade actor is gone.
    pub fn hand_on_blocking(&self, incoming: Incoming) -> bool {
        let mut request = self.request(incoming, None);
        loop {
            match self.upgrade.try_send(request) {
                Ok(()) => return true,
                Err(SendError::Full(back)) => {
                    request = back;
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(SendError::Closed(_)) => return false,
            }
        }
    }

    /// Hand a parsed request on; `reply` is told the ack once its decision is
    /// committed. Resolves once the Upgrade actor has taken it.
    pub async fn hand_on(
        &self,
        incoming: Incoming,
        reply: oneshot::Sender<Ack>,
    ) -> Result<(), MailboxError> {
        self.upgrade.send(self.request(incoming, Some(reply))).await
    }

    /// A parser that keeps the order requests came in: each is parsed (off
    /// the arbiter when a decoder may run) and handed on, and decided, before
    /// the next is taken. At most [`REQUESTS_WAITING`] wait in the returned
    /// sender; a full one makes the sender wait (back-pressure). Dropping it
    /// ends the parser.
    pub fn in_order(self) -> mpsc::Sender<Raw> {
        let (tx, mut rx) = mpsc::channel::<Raw>(REQUESTS_WAITING);
        actix_rt::spawn(async move {
            while let Some(Raw { bytes, reply }) = rx.recv().await {
                // A parser failure drops `reply`: no decision, no ack.
                let Some(incoming) = self.parse(bytes).await else {
                    continue;
                };
                // `send`, not `do_send`: it waits while the Upgrade actor's
                // mailbox is full, and resolves once the request is decided.
                if let Err(e) = self.upgrade.send(self.request(incoming, Some(reply))).await {
                    tracing::warn!(error = %e, "the upgrade actor did not take a request; left unacknowledged");
                }
            }
        });
        tx
    }
}

/// A request's bytes as they came off the wire, and who waits for its ack.
pub struct Raw {
    pub bytes: Vec<u8>,
    pub reply: oneshot::Sender<Ack>,
}

/// Send this committed outbox entry.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Outbound(pub OutboxEntry);

/// Start receiving requests (sent by the Upgrade actor once it has resumed).
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Listen;

/// Requests read from a transport and not yet handed to the Upgrade actor,
/// at most (the capacity of [`Inbox::in_order`]'s channel, and of the MQTT
/// transport's queue of requests awaiting their PUBACK). A transport with
/// more waits until there is room: the MQTT connection stops reading its
/// socket, so a flooding broker keeps what is not yet taken.
pub const REQUESTS_WAITING: usize = 16;

/// Retries of a send that failed: from this, doubling, up to [`RETRY_MAX`].
const RETRY_MIN: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(10);

pub struct Messaging {
    transport: Option<Box<dyn Transport>>,
    inbox: Inbox,
    closed: Recipient<InputClosed>,
    delivered: Recipient<Delivered>,
    queue: mpsc::UnboundedSender<OutboxEntry>,
    queued: Option<mpsc::UnboundedReceiver<OutboxEntry>>,
}

impl Messaging {
    pub fn new(
        transport: Box<dyn Transport>,
        inbox: Inbox,
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
        let (Some(mut transport), Some(rx)) = (self.transport.take(), self.queued.take()) else {
            return;
        };
        transport.start(self.inbox.clone(), self.closed.clone());
        actix_rt::spawn(deliver(transport, rx, self.delivered.clone()));
    }
}

impl Handler<Outbound> for Messaging {
    type Result = ();

    fn handle(&mut self, msg: Outbound, _ctx: &mut Context<Self>) {
        let _ = self.queue.send(msg.0);
    }
}

/// Send every queued entry in order, each until the transport confirms it,
/// and report it delivered.
async fn deliver(
    mut transport: Box<dyn Transport>,
    mut rx: mpsc::UnboundedReceiver<OutboxEntry>,
    delivered: Recipient<Delivered>,
) {
    while let Some(entry) = rx.recv().await {
        let json = protocol::render(&entry);
        let mut backoff = RETRY_MIN;
        while let Err(e) = transport.send(&entry, json.clone()).await {
            tracing::warn!(job = ?entry.job, seq = entry.seq, message_id = %entry.message_id, error = %e, "sending failed; will retry");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(RETRY_MAX);
        }
        if entry.seq != UNCOMMITTED {
            crash::point("before-delivered");
        }
        delivered.do_send(Delivered { seq: entry.seq });
    }
}

#[cfg(test)]
mod tests {
    //! The actor with stand-ins for the transport and the Upgrade actor, in
    //! paused time (a retry's backoff passes at once), each bounded.
    use super::*;
    use fwagent_state::{ack_no, Outcome, Outgoing};

    const SEED_1: &[u8] = include_bytes!("../../../examples/requests/seed-1-ftp.json");

    /// What the stand-in Upgrade actor was told.
    #[derive(Debug)]
    enum Seen {
        Request {
            incoming: Incoming,
            free_bytes: Option<u64>,
            reply: bool,
        },
        Delivered(u64),
    }

    struct StandInUpgrade(mpsc::UnboundedSender<Seen>);

    impl Actor for StandInUpgrade {
        type Context = Context<Self>;
    }

    impl Handler<Request> for StandInUpgrade {
        type Result = ();
        fn handle(&mut self, msg: Request, _ctx: &mut Context<Self>) {
            let reply = msg.reply.is_some();
            let _ = self.0.send(Seen::Request {
                incoming: msg.incoming,
                free_bytes: msg.free_bytes,
                reply,
            });
        }
    }

    impl Handler<Delivered> for StandInUpgrade {
        type Result = ();
        fn handle(&mut self, msg: Delivered, _ctx: &mut Context<Self>) {
            let _ = self.0.send(Seen::Delivered(msg.seq));
        }
    }

    impl Handler<InputClosed> for StandInUpgrade {
        type Result = ();
        fn handle(&mut self, _msg: InputClosed, _ctx: &mut Context<Self>) {}
    }

    /// Hands `requests` to the inbox on start; fails the first `fails` sends.
    struct StandInTransport {
        requests: Vec<Vec<u8>>,
        fails: u32,
        sent: mpsc::UnboundedSender<(u64, String)>,
    }

    impl Transport for StandInTransport {
        fn start(&mut self, inbox: Inbox, _closed: Recipient<InputClosed>) {
            let requests = inbox.in_order();
            for bytes in self.requests.drain(..) {
                let (reply, _) = oneshot::channel();
                requests
                    .try_send(Raw { bytes, reply })
                    .expect("room for the test's few requests");
            }
        }

        fn send<'a>(
            &'a mut self,
            entry: &'a OutboxEntry,
            json: String,
        ) -> BoxFuture<'a, Result<(), TransportError>> {
            Box::pin(async move {
                if self.fails > 0 {
                    self.fails -= 1;
                    return Err(TransportError::ConnectionStopped);
                }
                let _ = self.sent.send((entry.seq, json));
                Ok(())
            })
        }
    }

    fn ack_entry(seq: u64, message_id: &str) -> OutboxEntry {
        OutboxEntry {
            seq,
            message_id: message_id.into(),
            job: None,
            message: Outgoing::Ack(Ack {
                operator: "setCloudUpgradeConfig".into(),
                session_id: "SID:1".into(),
                message_id: message_id.into(),
                result: Outcome::ok(),
            }),
        }
    }

    /// Start a Messaging actor over the stand-ins, listening.
    fn start(transport: StandInTransport) -> (Addr<Messaging>, mpsc::UnboundedReceiver<Seen>) {
        let (seen, rx) = mpsc::unbounded_channel();
        let upgrade = StandInUpgrade(seen).start();
        // file: staging in the temporary directory: the room there is measured.
        let paths = crate::runtime::Paths {
            state_dir: std::env::temp_dir(),
        };
        let staging = Staging::new(paths, &crate::runtime::flash::FlashSpec::File("t".into()));
        let inbox = Inbox::new(
            ParseOptions::default(),
            upgrade.clone().recipient(),
            staging,
        );
        let messaging = Messaging::new(
            Box::new(transport),
            inbox,
            upgrade.clone().recipient(),
            upgrade.recipient(),
        )
        .start();
        messaging.do_send(Listen);
        (messaging, rx)
    }

    async fn bounded<F: std::future::Future>(f: F) -> F::Output {
        tokio::time::timeout(Duration::from_secs(60), f)
            .await
            .expect("the actor test hung")
    }

    #[actix_rt::test]
    async fn requests_reach_the_upgrade_actor_parsed_and_in_order() {
        tokio::time::pause();
        let (sent, _) = mpsc::unbounded_channel();
        let transport = StandInTransport {
            requests: vec![b"not json".to_vec(), SEED_1.to_vec()],
            fails: 0,
            sent,
        };
        let (_messaging, mut seen) = start(transport);
        bounded(async {
            match seen.recv().await {
                Some(Seen::Request {
                    incoming: Incoming::Invalid(ack),
                    free_bytes: None,
                    reply: true,
                }) => assert_eq!(ack.result.error_no, ack_no::MALFORMED, "{ack:?}"),
                other => panic!("the malformed request first: {other:?}"),
            }
            match seen.recv().await {
                Some(Seen::Request {
                    incoming: Incoming::Valid(req),
                    free_bytes: Some(_),
                    reply: true,
                }) => assert_eq!(
                    req.message_id,
                    "MID:localhost-122334455667-12232323232323-000001"
                ),
                other => panic!("the seed's request second: {other:?}"),
            }
        })
        .await;
    }

    /// An Upgrade actor that decides nothing until `gate` opens (or is
    /// dropped): its handler blocks its own arbiter's thread.
    struct StalledUpgrade {
        gate: std::sync::mpsc::Receiver<()>,
        taken: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl Actor for StalledUpgrade {
        type Context = Context<Self>;
    }

    impl Handler<Request> for StalledUpgrade {
        type Result = ();
        fn handle(&mut self, _msg: Request, _ctx: &mut Context<Self>) {
            self.taken.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let _ = self.gate.recv();
        }
    }

    #[actix_rt::test]
    async fn in_order_holds_at_most_requests_waiting_while_nothing_is_decided() {
        use std::sync::atomic::Ordering::SeqCst;
        let (open, gate) = std::sync::mpsc::channel();
        let taken = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let arbiter = Arbiter::new();
        let upgrade = {
            let taken = taken.clone();
            StalledUpgrade::start_in_arbiter(&arbiter.handle(), move |_| StalledUpgrade {
                gate,
                taken,
            })
        };
        let paths = crate::runtime::Paths {
            state_dir: std::env::temp_dir(),
        };
        let staging = Staging::new(paths, &crate::runtime::flash::FlashSpec::File("t".into()));
        let requests = Inbox::new(ParseOptions::default(), upgrade.recipient(), staging).in_order();
        let raw = || Raw {
            bytes: SEED_1.to_vec(),
            reply: oneshot::channel().0,
        };
        bounded(async {
            let mut sent = 0;
            while requests.try_send(raw()).is_ok() {
                sent += 1;
                // Let the parser take what it will.
                tokio::time::sleep(Duration::from_millis(5)).await;
                assert!(sent <= 10 * REQUESTS_WAITING, "never full");
            }
            assert_eq!(
                (sent, taken.load(SeqCst)),
                (REQUESTS_WAITING + 1, 1),
                "one with the Upgrade actor, the rest waiting in the channel"
            );
            drop(open);
            while taken.load(SeqCst) < sent {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            requests.try_send(raw()).expect("room again");
        })
        .await;
        arbiter.stop();
    }

    #[actix_rt::test]
    async fn the_outbox_goes_out_in_order_and_is_delivered_only_once_sent() {
        tokio::time::pause();
        let (sent, mut sent_rx) = mpsc::unbounded_channel();
        let transport = StandInTransport {
            requests: vec![],
            fails: 3,
            sent,
        };
        let (messaging, mut seen) = start(transport);
        messaging.do_send(Outbound(ack_entry(1, "MID:a")));
        messaging.do_send(Outbound(ack_entry(2, "MID:b")));
        messaging.do_send(Outbound(ack_entry(UNCOMMITTED, "MID:c")));
        bounded(async {
            for seq in [1, 2, UNCOMMITTED] {
                let (sent_seq, json) = sent_rx.recv().await.expect("sent");
                assert_eq!(sent_seq, seq);
                assert!(json.contains("setCloudUpgradeConfig-Ack"), "{json}");
                match seen.recv().await {
                    Some(Seen::Delivered(d)) => assert_eq!(d, seq, "delivered after it was sent"),
                    other => panic!("delivered {seq}: {other:?}"),
                }
            }
        })
        .await;
    }
}
