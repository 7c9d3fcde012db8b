//! Stand-ins for actor tests: a peer that records what it is sent.

use super::JobEvent;
use actix::prelude::*;
use std::time::Duration;
use tokio::sync::mpsc;

/// A stand-in for the Upgrade actor: every event it gets, in order.
struct Events(mpsc::UnboundedSender<JobEvent>);

impl Actor for Events {
    type Context = Context<Self>;
}

impl Handler<JobEvent> for Events {
    type Result = ();

    fn handle(&mut self, msg: JobEvent, _ctx: &mut Context<Self>) {
        let _ = self.0.send(msg);
    }
}

/// Where an actor under test sends its events, and what they were.
pub fn events() -> (Recipient<JobEvent>, mpsc::UnboundedReceiver<JobEvent>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (Events(tx).start().recipient(), rx)
}

/// The next event, within 10 s (a test never hangs).
pub async fn next_event(rx: &mut mpsc::UnboundedReceiver<JobEvent>) -> JobEvent {
    let event = tokio::time::timeout(Duration::from_secs(10), rx.recv());
    event.await.expect("an event in time").expect("an event")
}
