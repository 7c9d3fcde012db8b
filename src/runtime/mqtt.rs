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
//! - **An outbox entry is delivered only on its PUBACK.** [`Transport::send`]
//!   publishes with QoS 1 and completes when the broker's PUBACK for that
//!   packet id arrives. One publish is in flight at a time, so order is kept.
//!   After a reconnect rumqttc sends its unacknowledged publish again when the
//!   broker kept the session; when the broker lost it (rumqttc then drops its
//!   pending publishes), the in-flight message is published again here. A
//!   message may thus reach the cloud twice, with the same messageId, never
//!   zero times, and never out of order.
//! - **Reconnects with backoff** (250 ms doubling to 30 s) while upgrades go
//!   on; replies wait in the store's outbox meanwhile.
//! - **Status.** `online` (retained, QoS 1) after every connect; `offline`
//!   (retained, QoS 1) as the last will. The agent never sends DISCONNECT, so
//!   the broker publishes the will whenever the agent goes away, on a crash and
//!   on a clean stop alike.
//!
//! Payloads on the request topic go to the parser as they are (cut at
//! [`protocol::MAX_REQUEST_BYTES`] + 1 bytes, so a larger one is refused as
//! too large): a malformed one gets the ack PROTOCOL.md gives it. A payload of
//! only white space (an empty one clears a retained message) is ignored, as a
//! blank line is on stdin. Packets larger than [`MAX_INCOMING_PACKET`] break
//! the connection (rumqttc cannot skip them); cap the broker's
//! `message_size_limit` below that.
//!
//! Credentials from the URL never reach a log or an error message: the URL's
//! `Display` and `Debug` leave the user info out.
//!
//! Concurrency: the connection task (which polls rumqttc's event loop) and
//! [`Transport::send`] share one small state under a mutex and run on the same
//! arbiter thread (the Messaging actor's), so a reconnect's cleanup inside
//! rumqttc and the bookkeeping here never interleave with a submission.

use super::download::BoxFuture;
use super::{IncomingRequest, InputClosed};
use crate::protocol;
use crate::runtime::messaging::Transport;
use crate::tls::{self, ClientCert, TlsError};
use actix::Recipient;
use fwagent_state::{Ack, OutboxEntry, Secret};
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, LastWill, MqttOptions, NetworkOptions,
    Outgoing, Packet, Publish, QoS, SubscribeReasonCode, TlsConfiguration,
};
use std::collections::VecDeque;
use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Default topics; `{deviceId}` is replaced by the device id (in configured
/// topics too).
pub const DEFAULT_REQUEST_TOPIC: &str = "devices/{deviceId}/request";
pub const DEFAULT_RESPONSE_TOPIC: &str = "devices/{deviceId}/response";
pub const DEFAULT_STATUS_TOPIC: &str = "devices/{deviceId}/status";

/// The retained status payloads.
pub const STATUS_ONLINE: &str = "online";
pub const STATUS_OFFLINE: &str = "offline";

/// The largest packet the agent reads; a larger one breaks the connection.
pub const MAX_INCOMING_PACKET: usize = 1 << 20;
/// The largest packet the agent writes (reports are a few hundred bytes).
const MAX_OUTGOING_PACKET: usize = 1 << 20;
const KEEP_ALIVE: Duration = Duration::from_secs(30);
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Requests queued towards rumqttc's event loop: one publish, a subscribe,
/// and the manual acks (the broker keeps at most its inflight window unacked).
const REQUEST_CHANNEL: usize = 256;

/// What can be wrong with the MQTT settings. No variant carries the URL.
#[derive(Debug, thiserror::Error)]
pub enum MqttConfigError {
    #[error("--mqtt-url is required with --transport mqtt")]
    MissingUrl,
    #[error("--mqtt-url is not a URL ({0}); expected mqtt://[user:pass@]host:port or mqtts://...")]
    Url(url::ParseError),
    #[error("--mqtt-url scheme `{0}` is not supported; use mqtt:// or mqtts://")]
    Scheme(String),
    #[error("--mqtt-url has no host")]
    NoHost,
    #[error("--mqtt-url must name only the broker: no path, query or fragment")]
    Extra,
    #[error("--mqtt-url has a password but no user name")]
    PasswordWithoutUser,
    #[error("--mqtt-url: the {0} is not valid percent-encoded UTF-8")]
    UserInfo(&'static str),
    #[error("--mqtt-ca, --mqtt-cert and --mqtt-key need an mqtts:// URL")]
    TlsOptionsWithoutTls,
    #[error("--mqtt-cert and --mqtt-key go together")]
    HalfClientCert,
    /// The CA file, the client certificate or its key (the message names the file).
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("{which} topic `{topic}` is invalid: {why}")]
    Topic {
        which: &'static str,
        topic: String,
        why: &'static str,
    },
    #[error("device id `{0}` cannot be an MQTT client id: it must be non-empty, without `/`, `+`, `#` or control characters")]
    DeviceId(String),
}

/// `mqtt://[user:pass@]host:port` or `mqtts://...`, parsed. Shown without
/// its user info.
#[derive(Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    pub user: Option<Secret>,
    pub password: Option<Secret>,
}

impl BrokerUrl {
    pub fn parse(text: &str) -> Result<BrokerUrl, MqttConfigError> {
        let url = url::Url::parse(text.trim()).map_err(MqttConfigError::Url)?;
        let (tls, default_port) = match url.scheme() {
            "mqtt" => (false, 1883),
            "mqtts" => (true, 8883),
            other => return Err(MqttConfigError::Scheme(other.to_string())),
        };
        let host = match url.host() {
            Some(url::Host::Domain(d)) if !d.is_empty() => d.to_string(),
            Some(url::Host::Ipv4(a)) => a.to_string(),
            Some(url::Host::Ipv6(a)) => format!("[{a}]"),
            _ => return Err(MqttConfigError::NoHost),
        };
        if !matches!(url.path(), "" | "/") || url.query().is_some() || url.fragment().is_some() {
            return Err(MqttConfigError::Extra);
        }
        let decode = |s: &str, what| percent_decode(s).ok_or(MqttConfigError::UserInfo(what));
        let user = (!url.username().is_empty())
            .then(|| decode(url.username(), "user name"))
            .transpose()?;
        let password = url.password().map(|p| decode(p, "password")).transpose()?;
        if user.is_none() && password.is_some() {
            return Err(MqttConfigError::PasswordWithoutUser);
        }
        Ok(BrokerUrl {
            tls,
            host,
            port: url.port().unwrap_or(default_port),
            user: user.map(Secret::new),
            password: password.map(Secret::new),
        })
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

impl fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        let creds = if self.user.is_some() {
            "<redacted>@"
        } else {
            ""
        };
        write!(f, "{scheme}://{creds}{}:{}", self.host, self.port)
    }
}

impl fmt::Debug for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Everything the transport needs, validated (files read) up front.
#[derive(Clone)]
pub struct MqttSettings {
    pub url: BrokerUrl,
    /// The MQTT client id: the device id.
    pub client_id: String,
    pub request_topic: String,
    pub response_topic: String,
    pub status_topic: String,
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub connect_timeout: Duration,
    /// Payloads are cut after this many bytes + 1, so a larger request is
    /// refused as too large without being kept whole.
    pub max_request_bytes: usize,
}

impl fmt::Debug for MqttSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MqttSettings")
            .field("url", &self.url)
            .field("client_id", &self.client_id)
            .field("request_topic", &self.request_topic)
            .field("response_topic", &self.response_topic)
            .field("status_topic", &self.status_topic)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

/// The raw MQTT options of `fwagent run`.
#[derive(Clone, Debug, Default)]
pub struct MqttArgs<'a> {
    pub url: Option<&'a Secret>,
    pub device_id: &'a str,
    pub request_topic: Option<&'a str>,
    pub response_topic: Option<&'a str>,
    pub status_topic: Option<&'a str>,
    pub ca: Option<&'a Path>,
    pub cert: Option<&'a Path>,
    pub key: Option<&'a Path>,
    pub connect_timeout: Duration,
}

impl MqttSettings {
    pub fn new(a: MqttArgs<'_>) -> Result<MqttSettings, MqttConfigError> {
        let url = BrokerUrl::parse(a.url.ok_or(MqttConfigError::MissingUrl)?.expose())?;
        let id = a.device_id;
        if id.is_empty()
            || id
                .chars()
                .any(|c| c.is_control() || matches!(c, '/' | '+' | '#'))
        {
            return Err(MqttConfigError::DeviceId(id.to_string()));
        }
        let topic = |which, given: Option<&str>, default: &str| {
            let topic = given.unwrap_or(default).replace("{deviceId}", id);
            check_topic(which, &topic)?;
            Ok::<_, MqttConfigError>(topic)
        };
        let request_topic = topic("request", a.request_topic, DEFAULT_REQUEST_TOPIC)?;
        let response_topic = topic("response", a.response_topic, DEFAULT_RESPONSE_TOPIC)?;
        let status_topic = topic("status", a.status_topic, DEFAULT_STATUS_TOPIC)?;
        if !url.tls && (a.ca.is_some() || a.cert.is_some() || a.key.is_some()) {
            return Err(MqttConfigError::TlsOptionsWithoutTls);
        }
        let tls = if url.tls {
            Some(Arc::new(tls_config(a.ca, a.cert, a.key)?))
        } else {
            None
        };
        Ok(MqttSettings {
            url,
            client_id: id.to_string(),
            request_topic,
            response_topic,
            status_topic,
            tls,
            connect_timeout: a.connect_timeout,
            max_request_bytes: protocol::MAX_REQUEST_BYTES,
        })
    }

    fn options(&self) -> MqttOptions {
        let mut o = MqttOptions::new(self.client_id.clone(), self.url.host.clone(), self.url.port);
        o.set_keep_alive(KEEP_ALIVE)
            .set_clean_session(false)
            .set_manual_acks(true)
            .set_max_packet_size(MAX_INCOMING_PACKET, MAX_OUTGOING_PACKET)
            .set_request_channel_capacity(REQUEST_CHANNEL)
            .set_last_will(LastWill::new(
                self.status_topic.clone(),
                STATUS_OFFLINE,
                QoS::AtLeastOnce,
                true,
            ));
        if let Some(user) = &self.url.user {
            let password = self.url.password.as_ref().map(Secret::expose).unwrap_or("");
            o.set_credentials(user.expose(), password);
        }
        if let Some(tls) = &self.tls {
            o.set_transport(rumqttc::Transport::tls_with_config(
                TlsConfiguration::Rustls(tls.clone()),
            ));
        }
        o
    }
}

fn check_topic(which: &'static str, topic: &str) -> Result<(), MqttConfigError> {
    let why = if topic.is_empty() {
        "it is empty"
    } else if topic.contains(['+', '#']) {
        "wildcards (`+`, `#`) are not allowed"
    } else if topic.contains('\0') {
        "it contains NUL"
    } else if topic.len() > 65535 {
        "it is longer than 65535 bytes"
    } else {
        return Ok(());
    };
    Err(MqttConfigError::Topic {
        which,
        topic: topic.to_string(),
        why,
    })
}

/// The CA file's certificates as the only roots when given, else the web
/// PKI roots; a client certificate when both halves are given.
fn tls_config(
    ca: Option<&Path>,
    cert: Option<&Path>,
    key: Option<&Path>,
) -> Result<rustls::ClientConfig, MqttConfigError> {
    let client = match (cert, key) {
        (None, None) => None,
        (Some(cert), Some(key)) => Some(ClientCert { cert, key }),
        _ => return Err(MqttConfigError::HalfClientCert),
    };
    Ok(tls::client_config(ca, client)?)
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

/// A message to publish (QoS 1), and who waits for its PUBACK.
struct Publication {
    topic: String,
    payload: Vec<u8>,
    retain: bool,
    /// `None` for the status message.
    done: Option<oneshot::Sender<()>>,
    /// For the logs: the outbox seq, or `None` for the status message.
    seq: Option<u64>,
}

/// The publication handed to rumqttc and not yet acknowledged.
struct InFlight {
    publication: Publication,
    /// Its packet id, once rumqttc has written it.
    pkid: Option<u16>,
    /// [`Shared::cleans`] when it was handed over: if rumqttc has cleaned up
    /// since, the publish sits in rumqttc's pending list, which it drops when
    /// the broker has lost the session.
    cleans_at_submit: u64,
}

/// The bookkeeping the connection task and `send` share.
struct Shared {
    client: AsyncClient,
    /// Waiting, in order; the head goes out when nothing is in flight.
    queue: VecDeque<Publication>,
    in_flight: Option<InFlight>,
    connected: bool,
    /// Connections made so far (a CONNACK each).
    connections: u64,
    /// Times rumqttc moved its unacknowledged state to its pending list (each
    /// loss of an established connection).
    cleans: u64,
}

impl Shared {
    fn new(client: AsyncClient) -> Shared {
        Shared {
            client,
            queue: VecDeque::new(),
            in_flight: None,
            connected: false,
            connections: 0,
            cleans: 0,
        }
    }

    /// Hand the head of the queue to rumqttc if nothing is in flight. A full
    /// request channel leaves it queued; the next event tries again.
    fn pump(&mut self) {
        if self.in_flight.is_some() {
            return;
        }
        let Some(p) = self.queue.pop_front() else {
            return;
        };
        match self.client.try_publish(
            p.topic.clone(),
            QoS::AtLeastOnce,
            p.retain,
            p.payload.clone(),
        ) {
            Ok(()) => {
                tracing::debug!(seq = ?p.seq, topic = %p.topic, "publishing");
                self.in_flight = Some(InFlight {
                    publication: p,
                    pkid: None,
                    cleans_at_submit: self.cleans,
                });
            }
            Err(e) => {
                tracing::debug!(error = %e, "request channel full; publishing later");
                self.queue.push_front(p);
            }
        }
    }

    /// A CONNACK. When the broker has no session for us, rumqttc drops what
    /// it had pending: a publish handed over before the last clean-up is
    /// gone, so it goes out again. One handed over since is still in the
    /// request channel and goes out anyway.
    fn connected(&mut self, session_present: bool) {
        self.connected = true;
        self.connections += 1;
        let cleans = self.cleans;
        if !session_present {
            if let Some(f) = self.in_flight.take_if(|f| f.cleans_at_submit < cleans) {
                tracing::info!(seq = ?f.publication.seq, "the broker lost the session; publishing the unacknowledged message again");
                self.queue.push_front(f.publication);
            }
        }
    }

    /// rumqttc returned an error. If a connection was up, rumqttc has just
    /// moved its unacknowledged publishes (and its request channel) to its
    /// pending list: count that clean-up. True when a connection was lost.
    fn lost(&mut self) -> bool {
        let was = self.connected;
        if was {
            self.connected = false;
            self.cleans += 1;
        }
        was
    }

    /// rumqttc wrote a QoS 1 publish with this packet id. Only one is ever
    /// with rumqttc, so it is the one in flight (sent for the first time, or
    /// again after a reconnect).
    fn written(&mut self, pkid: u16) {
        if let Some(f) = self.in_flight.as_mut() {
            f.pkid = Some(pkid);
        }
    }

    /// A PUBACK: the publication in flight is delivered if the packet id is
    /// its own; the next one goes out.
    fn acknowledged(&mut self, pkid: u16) {
        if let Some(f) = self.in_flight.take_if(|f| f.pkid == Some(pkid)) {
            tracing::debug!(seq = ?f.publication.seq, pkid, "delivered");
            if let Some(done) = f.publication.done {
                let _ = done.send(());
            }
        }
        self.pump();
    }

    /// Queue the retained `online` status first in line (once).
    fn queue_status(&mut self, topic: &str) {
        let is_status = |p: &Publication| p.done.is_none();
        let in_flight = self
            .in_flight
            .as_ref()
            .is_some_and(|f| is_status(&f.publication));
        if !in_flight && !self.queue.iter().any(is_status) {
            self.queue.push_front(Publication {
                topic: topic.to_string(),
                payload: STATUS_ONLINE.as_bytes().to_vec(),
                retain: true,
                done: None,
                seq: None,
            });
        }
    }

    /// PUBACK a request received on connection `connection`, if that is still
    /// the live one. Otherwise the broker delivers it again (persistent
    /// session) and that delivery is acknowledged; an ack sent on a new
    /// connection could hit another message that reuses the packet id.
    /// True when the ack was handed to rumqttc.
    fn ack(&self, publish: &Publish, connection: u64) -> bool {
        if !(self.connected && self.connections == connection) {
            tracing::debug!(
                pkid = publish.pkid,
                "connection changed; the broker will deliver the request again"
            );
            return false;
        }
        match self.client.try_ack(publish) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(pkid = publish.pkid, error = %e, "cannot queue the ack; the broker will deliver the request again");
                false
            }
        }
    }
}

fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

/// A request handed to the Upgrade actor, waiting for its committed decision.
struct PendingAck {
    publish: Publish,
    connection: u64,
    reply: oneshot::Receiver<Ack>,
}

/// What the connection task does after an event.
enum Next {
    Poll,
    Wait(Duration),
}

/// The connection task's own state.
struct Connection {
    settings: Arc<MqttSettings>,
    shared: Arc<Mutex<Shared>>,
    inbox: Recipient<IncomingRequest>,
    acks: mpsc::UnboundedSender<PendingAck>,
    backoff: Duration,
    failures: u32,
}

impl Connection {
    async fn run(mut self, mut events: EventLoop) {
        tracing::info!(broker = %self.settings.url, client_id = %self.settings.client_id, request_topic = %self.settings.request_topic, "connecting to the MQTT broker");
        loop {
            let event = events.poll().await;
            match self.on_event(event) {
                Next::Poll => {}
                Next::Wait(d) => tokio::time::sleep(d).await,
            }
        }
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
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) if pkid != 0 => s.written(pkid),
            Ok(Event::Incoming(Packet::PubAck(ack))) => s.acknowledged(ack.pkid),
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let connection = s.connections;
                self.on_request(&s, p, connection);
                s.pump();
            }
            Ok(_) => s.pump(),
            Err(e) => {
                if s.lost() {
                    tracing::warn!(broker = %self.settings.url, error = %e, "lost the MQTT connection; reconnecting");
                } else {
                    self.failures += 1;
                    let level_warn = self.failures == 1 || self.failures.is_power_of_two();
                    if level_warn {
                        tracing::warn!(broker = %self.settings.url, error = %e, failures = self.failures, retry_in_ms = self.backoff.as_millis() as u64, "cannot connect to the MQTT broker");
                    } else {
                        tracing::debug!(broker = %self.settings.url, error = %e, failures = self.failures, "cannot connect to the MQTT broker");
                    }
                }
                let wait = self.backoff;
                self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
                return Next::Wait(wait);
            }
        }
        Next::Poll
    }

    /// A PUBLISH from the broker: a request to decide, or something to
    /// acknowledge and drop.
    fn on_request(&self, s: &Shared, p: Publish, connection: u64) {
        if p.topic != self.settings.request_topic {
            tracing::warn!(topic = %p.topic, "message on an unexpected topic; ignored");
            let _ = s.ack(&p, connection);
            return;
        }
        if p.payload.iter().all(u8::is_ascii_whitespace) {
            tracing::debug!(pkid = p.pkid, "empty request payload; ignored");
            let _ = s.ack(&p, connection);
            return;
        }
        let keep = p.payload.len().min(self.settings.max_request_bytes + 1);
        let bytes = p.payload[..keep].to_vec();
        tracing::debug!(
            pkid = p.pkid,
            dup = p.dup,
            bytes = p.payload.len(),
            "request received"
        );
        let (reply, rx) = oneshot::channel();
        self.inbox.do_send(IncomingRequest {
            bytes,
            reply: Some(reply),
        });
        let _ = self.acks.send(PendingAck {
            publish: p,
            connection,
            reply: rx,
        });
    }
}

/// Acknowledge requests to the broker in the order they came, each once its
/// decision is committed.
async fn acknowledge(shared: Arc<Mutex<Shared>>, mut pending: mpsc::UnboundedReceiver<PendingAck>) {
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
    fn start(&mut self, inbox: Recipient<IncomingRequest>, _closed: Recipient<InputClosed>) {
        let Some(events) = self.events.take() else {
            tracing::error!("the MQTT transport was started twice; ignored");
            return;
        };
        let (acks, pending) = mpsc::unbounded_channel();
        actix_rt::spawn(acknowledge(self.shared.clone(), pending));
        let connection = Connection {
            settings: self.settings.clone(),
            shared: self.shared.clone(),
            inbox,
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
    ) -> BoxFuture<'a, Result<(), String>> {
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
                .map_err(|_| "the MQTT connection task has stopped".to_string())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(s: &str) -> Secret {
        Secret::new(s)
    }

    fn args(url: &Secret) -> MqttArgs<'_> {
        MqttArgs {
            url: Some(url),
            device_id: "gw-1",
            connect_timeout: Duration::from_secs(10),
            ..MqttArgs::default()
        }
    }

    #[test]
    fn urls_parse_and_never_show_credentials() {
        let u = BrokerUrl::parse("mqtt://al%40ice:s3cr%3At@broker.local:1884").unwrap();
        assert!(!u.tls);
        assert_eq!((u.host.as_str(), u.port), ("broker.local", 1884));
        assert_eq!(u.user.as_ref().unwrap().expose(), "al@ice");
        assert_eq!(u.password.as_ref().unwrap().expose(), "s3cr:t");
        for shown in [u.to_string(), format!("{u:?}")] {
            assert_eq!(shown, "mqtt://<redacted>@broker.local:1884");
        }
        let u = BrokerUrl::parse("mqtts://127.0.0.1").unwrap();
        assert_eq!((u.tls, u.port, u.user.is_none()), (true, 8883, true));
        assert_eq!(BrokerUrl::parse("mqtt://h").unwrap().port, 1883);
        assert_eq!(BrokerUrl::parse("mqtt://[::1]:1").unwrap().host, "[::1]");
    }

    #[test]
    fn bad_urls_are_refused_without_echoing_them() {
        for bad in [
            "http://u:hunter2@h:1",
            "mqtt://u:hunter2@h:1/path",
            "mqtt://u:hunter2@h:1?x=1",
            "mqtt://:hunter2@h:1",
            "mqtt://u:hunter2@:1",
            "mqtt://u:%ff%fehunter2@h:1",
            "hunter2",
        ] {
            let e = BrokerUrl::parse(bad).expect_err(bad);
            assert!(!e.to_string().contains("hunter2"), "{bad}: {e}");
        }
    }

    #[test]
    fn topics_default_from_the_device_id_and_take_placeholders() {
        let url = secret("mqtt://127.0.0.1:1883");
        let s = MqttSettings::new(args(&url)).unwrap();
        assert_eq!(s.client_id, "gw-1");
        assert_eq!(s.request_topic, "devices/gw-1/request");
        assert_eq!(s.response_topic, "devices/gw-1/response");
        assert_eq!(s.status_topic, "devices/gw-1/status");
        let s = MqttSettings::new(MqttArgs {
            request_topic: Some("fw/{deviceId}/in"),
            response_topic: Some("fw/out"),
            status_topic: Some("fw/{deviceId}"),
            ..args(&url)
        })
        .unwrap();
        assert_eq!(
            (
                s.request_topic.as_str(),
                s.response_topic.as_str(),
                s.status_topic.as_str()
            ),
            ("fw/gw-1/in", "fw/out", "fw/gw-1")
        );
        let options = s.options();
        assert!(!options.clean_session());
        assert!(options.manual_acks());
        assert_eq!(options.client_id(), "gw-1");
        let will = options.last_will().unwrap();
        assert_eq!(
            (will.topic.as_str(), &will.message[..], will.retain),
            ("fw/gw-1", &b"offline"[..], true)
        );
    }

    #[test]
    fn bad_settings_are_refused() {
        let url = secret("mqtt://127.0.0.1:1883");
        assert!(matches!(
            MqttSettings::new(MqttArgs {
                request_topic: Some("a/+/b"),
                ..args(&url)
            }),
            Err(MqttConfigError::Topic {
                which: "request",
                ..
            })
        ));
        assert!(matches!(
            MqttSettings::new(MqttArgs {
                response_topic: Some(""),
                ..args(&url)
            }),
            Err(MqttConfigError::Topic {
                which: "response",
                ..
            })
        ));
        assert!(matches!(
            MqttSettings::new(MqttArgs {
                device_id: "a/b",
                ..args(&url)
            }),
            Err(MqttConfigError::DeviceId(_))
        ));
        assert!(matches!(
            MqttSettings::new(MqttArgs {
                ca: Some(Path::new("/nonexistent")),
                ..args(&url)
            }),
            Err(MqttConfigError::TlsOptionsWithoutTls)
        ));
        assert!(matches!(
            MqttSettings::new(MqttArgs {
                url: None,
                ..args(&url)
            }),
            Err(MqttConfigError::MissingUrl)
        ));
        let tls = secret("mqtts://127.0.0.1:8883");
        assert!(matches!(
            MqttSettings::new(MqttArgs {
                ca: Some(Path::new("/nonexistent/ca.pem")),
                ..args(&tls)
            }),
            Err(MqttConfigError::Tls(TlsError::Pem {
                what: "CA file",
                ..
            }))
        ));
        assert!(matches!(
            MqttSettings::new(MqttArgs {
                cert: Some(Path::new("/nonexistent/c.pem")),
                ..args(&tls)
            }),
            Err(MqttConfigError::HalfClientCert)
        ));
        // Web PKI roots when no CA file is given.
        assert!(MqttSettings::new(args(&tls)).unwrap().tls.is_some());
    }

    /// A `Shared` over a client whose event loop is never polled: what is
    /// handed to rumqttc just sits in its request channel.
    fn shared() -> (Shared, EventLoop) {
        let (client, events) = AsyncClient::new(MqttOptions::new("t", "127.0.0.1", 1), 16);
        (Shared::new(client), events)
    }

    fn entry(s: &mut Shared, seq: u64) -> oneshot::Receiver<()> {
        let (done, delivered) = oneshot::channel();
        s.queue.push_back(Publication {
            topic: "r".into(),
            payload: seq.to_string().into_bytes(),
            retain: false,
            done: Some(done),
            seq: Some(seq),
        });
        s.pump();
        delivered
    }

    /// The payloads of the publishes handed to rumqttc so far (drained).
    fn handed_over(events: &mut EventLoop) -> Vec<String> {
        events.clean();
        let out = events
            .pending
            .iter()
            .filter_map(|r| match r {
                rumqttc::Request::Publish(p) => {
                    Some(String::from_utf8_lossy(&p.payload).into_owned())
                }
                _ => None,
            })
            .collect();
        events.pending.clear();
        out
    }

    fn in_flight(s: &Shared) -> (Option<u64>, Option<u16>, u64) {
        let f = s.in_flight.as_ref().expect("something in flight");
        (f.publication.seq, f.pkid, f.cleans_at_submit)
    }

    #[test]
    fn one_publish_in_flight_delivered_only_on_its_own_puback() {
        let (mut s, _events) = shared();
        s.connected(false);
        let mut first = entry(&mut s, 1);
        let mut second = entry(&mut s, 2);
        assert_eq!(in_flight(&s), (Some(1), None, 0));
        assert_eq!(s.queue.len(), 1, "the second waits");
        s.written(7);
        s.acknowledged(8);
        assert!(
            first.try_recv().is_err(),
            "another packet id's PUBACK delivers nothing"
        );
        s.acknowledged(7);
        assert!(first.try_recv().is_ok());
        assert_eq!(in_flight(&s), (Some(2), None, 0), "the next one went out");
        assert!(second.try_recv().is_err());
    }

    #[test]
    fn reconnect_with_the_session_kept_leaves_the_resend_to_rumqttc() {
        let (mut s, _events) = shared();
        s.connected(false);
        let mut first = entry(&mut s, 1);
        s.written(3);
        assert!(s.lost());
        assert!(!s.lost(), "a failed connect is no loss");
        s.connected(true);
        assert_eq!(
            in_flight(&s),
            (Some(1), Some(3), 0),
            "rumqttc sends it again itself"
        );
        assert!(s.queue.is_empty());
        s.written(3);
        s.acknowledged(3);
        assert!(first.try_recv().is_ok());
    }

    #[test]
    fn reconnect_to_a_broker_that_lost_the_session_publishes_again() {
        let (mut s, mut events) = shared();
        s.connected(false);
        let mut first = entry(&mut s, 1);
        s.written(3);
        assert!(s.lost());
        s.connected(false);
        s.pump();
        assert_eq!(
            in_flight(&s),
            (Some(1), None, 1),
            "handed over again, new packet id to come"
        );
        assert_eq!(
            handed_over(&mut events),
            ["1", "1"],
            "handed over twice: the first copy went with the lost session"
        );
        s.written(1);
        s.acknowledged(1);
        assert!(first.try_recv().is_ok());
    }

    #[test]
    fn a_publish_handed_over_while_disconnected_is_not_doubled() {
        let (mut s, mut events) = shared();
        s.connected(false);
        assert!(s.lost());
        let _first = entry(&mut s, 1);
        assert_eq!(in_flight(&s), (Some(1), None, 1));
        // Still in rumqttc's request channel, which a new session keeps.
        s.connected(false);
        s.pump();
        assert_eq!(in_flight(&s), (Some(1), None, 1));
        assert!(s.queue.is_empty(), "not queued a second time");
        assert_eq!(handed_over(&mut events), ["1"], "handed to rumqttc once");
        // Lost again before it was written: now it is in the pending list.
        assert!(s.lost());
        s.connected(false);
        assert!(s.in_flight.is_none() && s.queue.len() == 1, "queued again");
    }

    #[test]
    fn the_first_connect_without_a_session_keeps_what_is_in_the_channel() {
        let (mut s, _events) = shared();
        let _first = entry(&mut s, 1);
        s.connected(false);
        assert_eq!(in_flight(&s), (Some(1), None, 0));
        assert!(s.queue.is_empty());
    }

    #[test]
    fn the_status_is_queued_once_and_first() {
        let (mut s, _events) = shared();
        s.connected(false);
        let _first = entry(&mut s, 1);
        let _second = entry(&mut s, 2);
        s.queue_status("st");
        s.queue_status("st");
        let waiting: Vec<Option<u64>> = s.queue.iter().map(|p| p.seq).collect();
        assert_eq!(waiting, [None, Some(2)]);
    }

    #[test]
    fn requests_are_acked_only_on_the_connection_they_came_on() {
        let (mut s, events) = shared();
        let mut p = Publish::new("q", QoS::AtLeastOnce, "x");
        p.pkid = 4;
        assert!(!s.ack(&p, 0), "not connected");
        s.connected(true);
        let on = s.connections;
        assert!(s.ack(&p, on));
        assert!(s.lost());
        assert!(!s.ack(&p, on), "disconnected");
        s.connected(true);
        assert!(
            !s.ack(&p, on),
            "a later connection: the broker delivers it again"
        );
        drop(events);
        assert!(!s.ack(&p, s.connections), "rumqttc is gone");
    }

    #[test]
    fn a_credentials_url_leaves_no_trace_in_debug() {
        let url = secret("mqtt://user:hunter2@127.0.0.1:1883");
        let s = MqttSettings::new(args(&url)).unwrap();
        let shown = format!("{s:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("user:"),
            "{shown}"
        );
    }
}
