//! The MQTT transport (rumqttc, MQTT 3.1.1): requests in on the request
//! topic, acks and reports out on the response topic, a retained status topic.
//!
//! The guarantees, each with the mechanism behind it:
//!
//! - **Persistent session.** The client id is the device id and the session
//!   is not clean, so the broker keeps the subscription and queues requests
//!   (QoS 1) while the gateway is down or rebooting.
//! - **A request is acknowledged to the broker only after its decision is
//!   committed.** Acks are manual: each request goes to the Upgrade actor with
//!   a `reply` channel that fires after the commit, and only then is the
//!   PUBACK sent (in the order the requests came). A crash before the commit
//!   leaves the PUBLISH unacknowledged, so the broker delivers it again and the
//!   messageId dedupe keeps it to one upgrade. An ack is never sent on a later
//!   connection than the one the request came on: after a reconnect the broker
//!   redelivers it, and the (deduplicated) redelivery is acknowledged instead.
//! - **Requests are taken with back-pressure.** The connection task hands a
//!   request to the [`Inbox`]'s parser, and its pending PUBACK to the task
//!   that sends it, over channels of [`REQUESTS_WAITING`] each, and waits
//!   while they are full. While it waits it does not poll rumqttc's event
//!   loop, so the socket is not read: a broker that floods the agent keeps
//!   what is not yet taken (unacknowledged, in its queue and the TCP
//!   window). The agent holds at most [`REQUESTS_WAITING`] + 2 undecided
//!   requests (each cut at `--max-request-bytes` + 1): those queued for
//!   their PUBACK, the one whose decision [`acknowledge`] awaits, and the
//!   one the connection task holds while it waits for room. The waits are
//!   short (a decision is one commit), so keep-alive pings still go out.
//! - **An outbox entry is delivered only on its PUBACK.** [`Transport::send`]
//!   publishes with QoS 1 and completes when the broker's PUBACK for that
//!   packet id arrives. One publish is in flight at a time, so order is kept.
//!   After a reconnect rumqttc sends its unacknowledged publish again when the
//!   broker kept the session; when the broker lost it (rumqttc then drops its
//!   pending publishes), the in-flight message is published again here. A
//!   message may thus reach the cloud twice, with the same messageId, never
//!   zero times, and never out of order.
//! - **A PUBACK that never comes is waited for only so long.** MQTT 3.1.1
//!   resends an unacknowledged publish only on a new connection, so when the
//!   in-flight publish has no PUBACK within `--mqtt-puback-timeout`
//!   ([`PUBACK_TIMEOUT`], 30 s) of being written, the connection task drops
//!   the connection (no DISCONNECT, so the broker publishes the `offline`
//!   will) and connects again at once: rumqttc resends the publish with its
//!   packet id when the broker kept the session, and it is published again
//!   here when the broker lost it, as after any reconnect. Its outbox entry
//!   stays until a PUBACK comes; the same messageId may reach the cloud twice.
//! - **Reconnects with backoff and full jitter**: the bound starts at 250 ms
//!   and doubles to 30 s, and each wait is drawn uniformly below it, so a
//!   fleet that lost its broker at one moment does not come back at one
//!   moment (docs/BENCH.md, "Fleet"). Upgrades go on meanwhile; replies wait
//!   in the store's outbox.
//! - **Status.** `online` (retained, QoS 1) after every connect; `offline`
//!   (retained, QoS 1) as the last will. The agent never sends DISCONNECT, so
//!   the broker publishes the will whenever the agent goes away, on a crash and
//!   on a clean stop alike.
//!
//! Payloads on the request topic go to the [`Inbox`]'s parser as they are,
//! in the order they came (cut at `--max-request-bytes` + 1 bytes, so a
//! larger one is refused as too large): a malformed one gets the ack
//! PROTOCOL.md gives it. A payload of
//! only white space (an empty one clears a retained message) is ignored, as a
//! blank line is on stdin. Packets larger than [`MAX_INCOMING_PACKET`] break
//! the connection (rumqttc cannot skip them); cap the broker's
//! `message_size_limit` below that.
//!
//! Credentials from the URL never reach a log or an error message: the URL's
//! `Display` and `Debug` leave the user info out.
//!
//! Concurrency: the connection task (which polls rumqttc's event loop, here)
//! and [`Transport::send`] share one small state under a mutex
//! ([`session`]) and run on the same arbiter thread (the Messaging actor's),
//! so a reconnect's cleanup inside rumqttc and the bookkeeping never
//! interleave with a submission. The settings are checked in [`config`].

mod config;
mod session;

pub use config::{
    BrokerUrl, MqttArgs, MqttConfigError, MqttSettings, DEFAULT_REQUEST_TOPIC,
    DEFAULT_RESPONSE_TOPIC, DEFAULT_STATUS_TOPIC, MAX_INCOMING_PACKET, PUBACK_TIMEOUT,
};

use super::{Inbox, Raw, Transport, TransportError, REQUESTS_WAITING};
use crate::runtime::{BoxFuture, InputClosed};
use actix::Recipient;
use config::REQUEST_CHANNEL;
use fwagent_state::{Ack, OutboxEntry};
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, NetworkOptions, Outgoing, Packet, Publish, QoS,
    SubscribeReasonCode,
};
use session::{lock, Publication, Shared};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// The retained status payloads.
pub const STATUS_ONLINE: &str = "online";
pub const STATUS_OFFLINE: &str = "offline";

const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// A wait drawn uniformly from `[0, bound]` ("full jitter"): thousands of
/// gateways that lost one broker at one moment reconnect spread over the
/// bound, not all at its end.
fn jittered(bound: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    // Each `RandomState` has keys of its own, from the OS's random source.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0);
    let unit = (h.finish() >> 11) as f64 / (1u64 << 53) as f64;
    bound.mul_f64(unit)
}

// ------------------------------------------------------------------ transport

/// The MQTT transport. Build it with [`Mqtt::new`]; the Messaging actor calls
/// [`Transport::start`] once and then [`Transport::send`] for each entry.
pub struct Mqtt {
    settings: Arc<MqttSettings>,
    shared: Arc<Mutex<Shared>>,
    events: Option<EventLoop>,
}

impl Mqtt {
    pub fn new(settings: MqttSettings) -> Mqtt {
        let (client, mut events) = AsyncClient::new(settings.options(), REQUEST_CHANNEL);
        let mut net = NetworkOptions::new();
        net.set_tcp_nodelay(true);
        net.set_connection_timeout(settings.connect_timeout.as_secs().max(1));
        events.set_network_options(net);
        Mqtt {
            settings: Arc::new(settings),
            shared: Arc::new(Mutex::new(Shared::new(client))),
            events: Some(events),
        }
    }
}

/// A request handed to the Upgrade actor, waiting for its committed decision.
struct PendingAck {
    /// Without its payload (the parser has its own copy): what the PUBACK needs.
    publish: Publish,
    connection: u64,
    reply: oneshot::Receiver<Ack>,
}

/// What the connection task does after an event.
enum Next {
    Poll,
    Wait(Duration),
    /// A request to hand on, waiting for room if need be.
    Take(Raw, PendingAck),
}

/// The connection task's own state.
struct Connection {
    settings: Arc<MqttSettings>,
    shared: Arc<Mutex<Shared>>,
    /// Raw requests, in order, to the [`Inbox`]'s parser.
    requests: mpsc::Sender<Raw>,
    /// The cut for a request's payload (`--max-request-bytes`).
    max_request_bytes: usize,
    /// The requests' PUBACKs, in the same order, to [`acknowledge`].
    acks: mpsc::Sender<PendingAck>,
    backoff: Duration,
    failures: u32,
}

impl Connection {
    async fn run(mut self, mut events: EventLoop) {
        tracing::info!(broker = %self.settings.url, client_id = %self.settings.client_id, request_topic = %self.settings.request_topic, "connecting to the MQTT broker");
        loop {
            let overdue = lock(&self.shared).puback_deadline(self.settings.puback_timeout);
            let event = match overdue {
                None => Some(events.poll().await),
                Some(at) => tokio::select! {
                    event = events.poll() => Some(event),
                    () = tokio::time::sleep_until(at) => None,
                },
            };
            let Some(event) = event else {
                // The poll just dropped may have been part-way through a
                // packet: the connection goes with it.
                self.puback_timed_out(&mut events);
                continue;
            };
            match self.on_event(event) {
                Next::Poll => {}
                Next::Wait(d) => tokio::time::sleep(d).await,
                Next::Take(raw, ack) => self.take(raw, ack).await,
            }
        }
    }

    /// Hand a request on, waiting while the channels are full. The event
    /// loop is not polled meanwhile: that is the back-pressure.
    async fn take(&self, raw: Raw, ack: PendingAck) {
        if self.requests.send(raw).await.is_err() {
            tracing::error!("the request parser has stopped; request left unacknowledged");
            return;
        }
        if self.acks.send(ack).await.is_err() {
            tracing::error!("the acknowledging task has stopped; request left unacknowledged");
        }
    }

    /// The publish in flight has had no PUBACK for the timeout: drop the
    /// connection, so that the next one sends it again.
    fn puback_timed_out(&self, events: &mut EventLoop) {
        let mut s = lock(&self.shared);
        let (seq, pkid) = s.in_flight_ids();
        tracing::warn!(broker = %self.settings.url, ?seq, ?pkid, timeout_s = self.settings.puback_timeout.as_secs(), "no PUBACK within the timeout; reconnecting to publish again");
        events.clean();
        s.lost();
    }

    fn on_event(&mut self, event: Result<Event, ConnectionError>) -> Next {
        let mut s = lock(&self.shared);
        match event {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                self.backoff = BACKOFF_MIN;
                self.failures = 0;
                tracing::info!(broker = %self.settings.url, session_present = ack.session_present, "connected to the MQTT broker");
                s.connected(ack.session_present);
                // The subscription goes before the status, so a client that
                // sees `online` knows requests are being listened to.
                if let Err(e) = s
                    .client
                    .try_subscribe(self.settings.request_topic.clone(), QoS::AtLeastOnce)
                {
                    tracing::error!(error = %e, "cannot queue the subscription");
                }
                s.queue_status(&self.settings.status_topic);
                s.pump();
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                if ack
                    .return_codes
                    .iter()
                    .any(|c| matches!(c, SubscribeReasonCode::Failure))
                {
                    tracing::error!(topic = %self.settings.request_topic, "the broker refused the subscription to the request topic");
                } else {
                    tracing::debug!(topic = %self.settings.request_topic, "subscribed");
                }
            }
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) if pkid != 0 => {
                s.written(pkid, tokio::time::Instant::now());
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => s.acknowledged(ack.pkid),
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let connection = s.connections;
                let take = self.on_request(&s, p, connection);
                s.pump();
                if let Some((raw, ack)) = take {
                    return Next::Take(raw, ack);
                }
            }
            Ok(_) => s.pump(),
            Err(e) => {
                let wait = jittered(self.backoff);
                if s.lost() {
                    tracing::warn!(broker = %self.settings.url, error = %e, "lost the MQTT connection; reconnecting");
                } else {
                    self.failures += 1;
                    let level_warn = self.failures == 1 || self.failures.is_power_of_two();
                    if level_warn {
                        tracing::warn!(broker = %self.settings.url, error = %e, failures = self.failures, retry_in_ms = wait.as_millis() as u64, "cannot connect to the MQTT broker");
                    } else {
                        tracing::debug!(broker = %self.settings.url, error = %e, failures = self.failures, "cannot connect to the MQTT broker");
                    }
                }
                self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
                return Next::Wait(wait);
            }
        }
        Next::Poll
    }

    /// A PUBLISH from the broker: a request to hand on, or something to
    /// acknowledge and drop.
    fn on_request(&self, s: &Shared, mut p: Publish, connection: u64) -> Option<(Raw, PendingAck)> {
        if p.topic != self.settings.request_topic {
            tracing::warn!(topic = %p.topic, "message on an unexpected topic; ignored");
            let _ = s.ack(&p, connection);
            return None;
        }
        if p.payload.iter().all(u8::is_ascii_whitespace) {
            tracing::debug!(pkid = p.pkid, "empty request payload; ignored");
            let _ = s.ack(&p, connection);
            return None;
        }
        let keep = p.payload.len().min(self.max_request_bytes + 1);
        let bytes = p.payload[..keep].to_vec();
        tracing::debug!(
            pkid = p.pkid,
            dup = p.dup,
            bytes = p.payload.len(),
            "request received"
        );
        let (reply, rx) = oneshot::channel();
        p.payload = Default::default();
        Some((
            Raw { bytes, reply },
            PendingAck {
                publish: p,
                connection,
                reply: rx,
            },
        ))
    }
}

/// Acknowledge requests to the broker in the order they came, each once its
/// decision is committed.
async fn acknowledge(shared: Arc<Mutex<Shared>>, mut pending: mpsc::Receiver<PendingAck>) {
    while let Some(p) = pending.recv().await {
        match p.reply.await {
            Ok(ack) => {
                tracing::debug!(upgrade = %ack.message_id, error_no = ack.result.error_no, pkid = p.publish.pkid, "decision committed; acknowledging the request");
                let _ = lock(&shared).ack(&p.publish, p.connection);
            }
            Err(_) => {
                tracing::warn!(pkid = p.publish.pkid, "request dropped without a decision; left unacknowledged for the broker to deliver again");
            }
        }
    }
}

impl Transport for Mqtt {
    fn start(&mut self, inbox: Inbox, _closed: Recipient<InputClosed>) {
        let Some(events) = self.events.take() else {
            tracing::error!("the MQTT transport was started twice; ignored");
            return;
        };
        let (acks, pending) = mpsc::channel(REQUESTS_WAITING);
        actix_rt::spawn(acknowledge(self.shared.clone(), pending));
        let connection = Connection {
            settings: self.settings.clone(),
            shared: self.shared.clone(),
            max_request_bytes: inbox.max_request_bytes(),
            requests: inbox.in_order(),
            acks,
            backoff: BACKOFF_MIN,
            failures: 0,
        };
        actix_rt::spawn(connection.run(events));
    }

    fn send<'a>(
        &'a mut self,
        entry: &'a OutboxEntry,
        json: String,
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        Box::pin(async move {
            let (done, delivered) = oneshot::channel();
            {
                let mut s = lock(&self.shared);
                s.queue.push_back(Publication {
                    topic: self.settings.response_topic.clone(),
                    payload: json.into_bytes(),
                    retain: false,
                    done: Some(done),
                    seq: Some(entry.seq),
                });
                s.pump();
            }
            delivered
                .await
                .map_err(|_| TransportError::ConnectionStopped)
        })
    }
}

#[cfg(test)]
mod jitter_tests {
    use super::jittered;
    use std::time::Duration;

    #[test]
    fn reconnect_waits_are_spread_over_the_whole_bound() {
        let bound = Duration::from_secs(1);
        let waits: Vec<Duration> = (0..2000).map(|_| jittered(bound)).collect();
        assert!(waits.iter().all(|w| *w <= bound));
        // Spread over the bound: some early, some late, every tenth used.
        let mut tenths = [0usize; 10];
        for w in &waits {
            tenths[((w.as_secs_f64() * 10.0) as usize).min(9)] += 1;
        }
        assert!(tenths.iter().all(|&n| n > 100), "{tenths:?}");
    }
}
