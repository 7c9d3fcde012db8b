//! The publish and acknowledgement bookkeeping of the MQTT session: one
//! publication in flight at a time, delivered only on its own PUBACK, handed
//! over again when the broker lost the session, overdue once its PUBACK has
//! not come for the timeout; requests acknowledged only on the connection
//! they came on. The connection task and
//! [`Transport::send`](super::super::Transport::send) share it under a mutex.

use super::STATUS_ONLINE;
use rumqttc::{AsyncClient, Publish, QoS};
use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::time::Instant;

/// A message to publish (QoS 1), and who waits for its PUBACK.
pub(super) struct Publication {
    pub(super) topic: String,
    pub(super) payload: Vec<u8>,
    pub(super) retain: bool,
    /// `None` for the status message.
    pub(super) done: Option<oneshot::Sender<()>>,
    /// For the logs: the outbox seq, or `None` for the status message.
    pub(super) seq: Option<u64>,
}

/// The publication handed to rumqttc and not yet acknowledged.
pub(super) struct InFlight {
    publication: Publication,
    /// Its packet id, once rumqttc has written it.
    pkid: Option<u16>,
    /// When rumqttc last wrote it on the live connection (`None` before, and
    /// after the connection was lost, until it is written again).
    written_at: Option<Instant>,
    /// [`Shared::cleans`] when it was handed over: if rumqttc has cleaned up
    /// since, the publish sits in rumqttc's pending list, which it drops when
    /// the broker has lost the session.
    cleans_at_submit: u64,
}

/// The bookkeeping the connection task and `send` share.
pub(super) struct Shared {
    pub(super) client: AsyncClient,
    /// Waiting, in order; the head goes out when nothing is in flight.
    pub(super) queue: VecDeque<Publication>,
    pub(super) in_flight: Option<InFlight>,
    pub(super) connected: bool,
    /// Connections made so far (a CONNACK each).
    pub(super) connections: u64,
    /// Times rumqttc moved its unacknowledged state to its pending list (each
    /// loss of an established connection).
    pub(super) cleans: u64,
}

impl Shared {
    pub(super) fn new(client: AsyncClient) -> Shared {
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
    pub(super) fn pump(&mut self) {
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
                    written_at: None,
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
    pub(super) fn connected(&mut self, session_present: bool) {
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
    pub(super) fn lost(&mut self) -> bool {
        let was = self.connected;
        if was {
            self.connected = false;
            self.cleans += 1;
        }
        if let Some(f) = self.in_flight.as_mut() {
            f.written_at = None;
        }
        was
    }

    /// rumqttc wrote a QoS 1 publish with this packet id at `now`. Only one
    /// is ever with rumqttc, so it is the one in flight (sent for the first
    /// time, or again after a reconnect).
    pub(super) fn written(&mut self, pkid: u16, now: Instant) {
        if let Some(f) = self.in_flight.as_mut() {
            f.pkid = Some(pkid);
            f.written_at = Some(now);
        }
    }

    /// When the publish in flight is overdue: `timeout` after it was written
    /// on the live connection, if its PUBACK has not come by then.
    pub(super) fn puback_deadline(&self, timeout: Duration) -> Option<Instant> {
        let f = self.in_flight.as_ref().filter(|_| self.connected)?;
        Some(f.written_at? + timeout)
    }

    /// The outbox seq and packet id of the publish in flight, for the logs.
    pub(super) fn in_flight_ids(&self) -> (Option<u64>, Option<u16>) {
        self.in_flight
            .as_ref()
            .map_or((None, None), |f| (f.publication.seq, f.pkid))
    }

    /// A PUBACK: the publication in flight is delivered if the packet id is
    /// its own; the next one goes out.
    pub(super) fn acknowledged(&mut self, pkid: u16) {
        if let Some(f) = self.in_flight.take_if(|f| f.pkid == Some(pkid)) {
            tracing::debug!(seq = ?f.publication.seq, pkid, "delivered");
            if let Some(done) = f.publication.done {
                let _ = done.send(());
            }
        }
        self.pump();
    }

    /// Queue the retained `online` status first in line (once).
    pub(super) fn queue_status(&mut self, topic: &str) {
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
    pub(super) fn ack(&self, publish: &Publish, connection: u64) -> bool {
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

pub(super) fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::{EventLoop, MqttOptions};

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
        s.written(7, Instant::now());
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
        s.written(3, Instant::now());
        assert!(s.lost());
        assert!(!s.lost(), "a failed connect is no loss");
        s.connected(true);
        assert_eq!(
            in_flight(&s),
            (Some(1), Some(3), 0),
            "rumqttc sends it again itself"
        );
        assert!(s.queue.is_empty());
        s.written(3, Instant::now());
        s.acknowledged(3);
        assert!(first.try_recv().is_ok());
    }

    #[test]
    fn reconnect_to_a_broker_that_lost_the_session_publishes_again() {
        let (mut s, mut events) = shared();
        s.connected(false);
        let mut first = entry(&mut s, 1);
        s.written(3, Instant::now());
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
        s.written(1, Instant::now());
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
    fn a_publish_without_its_puback_is_overdue_after_the_timeout() {
        const T: Duration = Duration::from_secs(30);
        let (mut s, _events) = shared();
        s.connected(true);
        let mut first = entry(&mut s, 1);
        assert_eq!(s.puback_deadline(T), None, "not written yet");
        let t0 = Instant::now();
        s.written(5, t0);
        assert_eq!(s.puback_deadline(T), Some(t0 + T));
        s.acknowledged(4);
        assert_eq!(
            s.puback_deadline(T),
            Some(t0 + T),
            "another PUBACK is not its own"
        );
        // The timeout dropped the connection: no deadline until it is written again.
        assert!(s.lost());
        assert_eq!(s.puback_deadline(T), None);
        s.connected(true);
        assert_eq!(s.puback_deadline(T), None, "rumqttc has not resent it yet");
        let t1 = t0 + Duration::from_secs(31);
        s.written(5, t1);
        assert_eq!(
            s.puback_deadline(T),
            Some(t1 + T),
            "a new deadline for the resend"
        );
        assert!(first.try_recv().is_err(), "still not delivered");
        s.acknowledged(5);
        assert!(first.try_recv().is_ok());
        assert_eq!(s.puback_deadline(T), None, "nothing in flight");
        // The status, sent next, has a deadline too.
        s.queue_status("st");
        s.pump();
        s.written(6, t1);
        assert_eq!(s.puback_deadline(T), Some(t1 + T));
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
}
