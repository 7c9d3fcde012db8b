//! How the agent stops: on SIGTERM or SIGINT ([`Shutdown`]) every transfer
//! checkpoints, a flash under way reaches its durable end, the outbox is
//! delivered (each within a bound), then the store is flushed and the agent
//! exits 0; with stdin closed ([`InputClosed`]) it exits once nothing is
//! under way and the outbox is empty (docs/DURABILITY.md, "SIGTERM and
//! SIGINT").

use super::super::download::Drain;
use super::super::{InputClosed, Shutdown};
use super::Upgrade;
use actix::prelude::*;
use fwagent_state::Phase;
use std::time::{Duration, Instant};

/// On SIGTERM: how long a flash under way (file:, ab:) may take to reach
/// its durable end before the agent exits anyway (flashing is repeatable:
/// the next start does it again).
pub const STOP_FLASH_WAIT: Duration = Duration::from_secs(60);
/// On SIGTERM: how long the outbox gets to be delivered.
pub const STOP_DELIVERY_WAIT: Duration = Duration::from_secs(5);
const STOP_POLL: Duration = Duration::from_millis(20);

/// Where a stop (SIGTERM, SIGINT) has got to.
#[derive(Debug)]
pub(super) struct Stopping {
    started: Instant,
    /// The transfers have not all checkpointed yet.
    draining: bool,
    /// When delivering the outbox began.
    delivering: Option<Instant>,
}

impl Upgrade {
    /// One step of a stop: wait for the transfers' checkpoints and for a
    /// flash, clean-up, boot check or reboot request under way (at most
    /// [`STOP_FLASH_WAIT`]), then for the outbox
    /// (at most [`STOP_DELIVERY_WAIT`]), then flush and exit 0.
    pub(super) fn continue_stop(&mut self, ctx: &mut Context<Self>) {
        if self.halted {
            return;
        }
        let Some(stop) = &mut self.stopping else {
            return;
        };
        let now = Instant::now();
        let flash_busy = (self.flashing.is_some() || self.flash_calls > 0)
            && now < stop.started + STOP_FLASH_WAIT;
        let pending = || {
            self.store
                .pending_outbox()
                .map(|p| !p.is_empty())
                .unwrap_or(false)
        };
        let waiting = if stop.draining || flash_busy {
            true
        } else {
            let since = *stop.delivering.get_or_insert(now);
            now < since + STOP_DELIVERY_WAIT && pending()
        };
        if waiting {
            ctx.run_later(STOP_POLL, |act, ctx| act.continue_stop(ctx));
            return;
        }
        if self.flashing.is_some() || self.flash_calls > 0 {
            tracing::warn!("the flash actor did not answer in time; the next start does it again");
        }
        if let Err(e) = self.store.flush() {
            return self.halt("flushing before the stop", &e);
        }
        tracing::info!(
            undelivered = self.store.pending_outbox().map(|p| p.len()).unwrap_or(0),
            "stopped: every step so far is durable; the next start resumes from it"
        );
        System::current().stop();
    }

    /// With stdin closed: stop once nothing is under way and the outbox is empty.
    pub(super) fn maybe_exit(&mut self) {
        if self.halted || !self.input_closed || self.flash_calls > 0 || self.reboot_retry.is_some()
        {
            return;
        }
        let idle = match self.store.active() {
            Ok(None) => true,
            Ok(Some(job)) => job.phase == Phase::AwaitingReboot && self.boot_settled,
            Err(_) => true,
        };
        let flushed = self
            .store
            .pending_outbox()
            .map(|p| p.is_empty())
            .unwrap_or(true);
        if idle && flushed {
            tracing::info!("input closed and nothing under way; exiting");
            if let Err(e) = self.store.flush() {
                // The delivery marks may be lost: those messages will be
                // sent again, with their messageIds.
                return self.halt("flushing the delivery marks", &e);
            }
            System::current().stop();
        }
    }
}

impl Handler<Shutdown> for Upgrade {
    type Result = ();

    fn handle(&mut self, _msg: Shutdown, ctx: &mut Context<Self>) {
        if self.halted || self.stopping.is_some() {
            return;
        }
        tracing::info!("signal received; checkpointing, then delivering the outbox, then stopping");
        if let Some(retry) = self.reboot_retry.take() {
            // The next start asks for the reboot again.
            ctx.cancel_future(retry);
        }
        self.stopping = Some(Stopping {
            started: Instant::now(),
            draining: true,
            delivering: None,
        });
        let Some(peers) = self.peers.clone() else {
            System::current().stop();
            return;
        };
        let drained = peers.drain.send(Drain);
        ctx.spawn(drained.into_actor(self).map(|_, act, ctx| {
            if let Some(stop) = &mut act.stopping {
                stop.draining = false;
            }
            act.continue_stop(ctx);
        }));
    }
}

impl Handler<InputClosed> for Upgrade {
    type Result = ();

    fn handle(&mut self, _msg: InputClosed, _ctx: &mut Context<Self>) {
        self.input_closed = true;
        self.maybe_exit();
    }
}
