//! The Upgrade actor: the only writer of the store.
//!
//! Every handler does the same three things, in this order (ARCHITECTURE.md,
//! "Durability rules"): apply the event with the pure state machine, commit
//! the result in one sled transaction (flushed), and only then send the
//! outbox and start the commands. (A transition that only moves the
//! figures is committed without the flush: `Transition::figures_only`,
//! `Store::commit_lazily`.) After a restart it re-sends the pending outbox
//! and restarts the active upgrade's current phase. How it stops is
//! `stop`; what the control socket asks of it is `control`.

use super::download::{AbortDownload, Drain, FetchJob, StartDownload};
use super::flash::staging::{EndJob, RemoveStale};
use super::flash::{CheckBoot, FlashImage, Rebooting, RequestReboot};
use super::messaging::{Listen, Outbound};
use super::verify::VerifyMsg;
use super::{Delivered, JobEvent, Request, Transfer, UNCOMMITTED};
use crate::crash;
use actix::prelude::*;
use fwagent_state::{
    on_request, transition, Ack, Command, Event, Incoming, Job, JobId, OutboxEntry, Outgoing,
    Policy, Protocol, RequestView, Store, StoreError, Transition,
};
use std::collections::HashSet;
use std::time::Duration;
use time::OffsetDateTime;

mod control;
mod stop;

pub use control::{CancelError, CancelRequest, ReadStore};
use stop::Stopping;
pub use stop::{STOP_DELIVERY_WAIT, STOP_FLASH_WAIT};

/// The upgrade's peers, handed over once every actor runs.
#[derive(Message, Clone)]
#[rtype(result = "()")]
pub struct Wire {
    pub messaging: Recipient<Outbound>,
    pub listen: Recipient<Listen>,
    pub download: Recipient<StartDownload>,
    pub abort: Recipient<AbortDownload>,
    pub drain: Recipient<Drain>,
    pub verify: Recipient<VerifyMsg>,
    pub flash: Recipient<FlashImage>,
    pub reboot: Recipient<RequestReboot>,
    pub check_boot: Recipient<CheckBoot>,
    pub end: Recipient<EndJob>,
    pub remove_stale: Recipient<RemoveStale>,
}

pub struct Upgrade {
    store: Store,
    policy: Policy,
    transfer: Transfer,
    protocols: HashSet<Protocol>,
    peers: Option<Wire>,
    input_closed: bool,
    /// Reboot requests, boot checks and clean-ups the Flash actor has not
    /// answered yet: the agent does not exit before they are done.
    flash_calls: u32,
    /// This process has asked for the reboot or checked the boot: an upgrade
    /// in `awaiting_reboot` has nothing more to do here. (Until then, with
    /// stdin at EOF, the agent would exit before the resumed check ran.)
    boot_settled: bool,
    /// A commit or flush failed after it was applied (`StoreError::is_fatal`):
    /// the agent is stopping with exit 3 and this actor touches the store,
    /// sends and starts nothing more.
    halted: bool,
    /// The job whose flash the Flash actor is carrying out (sent, no
    /// answer yet): a stop waits for it.
    flashing: Option<JobId>,
    stopping: Option<Stopping>,
    /// The machine's boot id, so the state machine tells a start after a
    /// restart of the machine from one after a restart of the agent.
    boot: Option<String>,
    /// A retry of a failed reboot command, waiting out its backoff: the
    /// agent does not exit on its own before it ran; a stop cancels it.
    reboot_retry: Option<SpawnHandle>,
}

impl Upgrade {
    pub fn new(
        store: Store,
        policy: Policy,
        transfer: Transfer,
        protocols: HashSet<Protocol>,
        boot: Option<String>,
    ) -> Self {
        Upgrade {
            boot,
            store,
            policy,
            transfer,
            protocols,
            peers: None,
            input_closed: false,
            flash_calls: 0,
            boot_settled: false,
            halted: false,
            flashing: None,
            stopping: None,
            reboot_retry: None,
        }
    }

    /// Wait for the Flash actor's answer to `call` (the agent does not exit
    /// before `then` has run on it).
    fn flash_call<M>(
        &mut self,
        call: actix::dev::RecipientRequest<M>,
        ctx: &mut Context<Self>,
        then: impl FnOnce(&mut Self, &mut Context<Self>, Result<M::Result, MailboxError>) + 'static,
    ) where
        M: actix::Message + Send + 'static,
        M::Result: Send,
    {
        self.flash_calls += 1;
        ctx.spawn(call.into_actor(self).map(move |answer, act, ctx| {
            if let Err(e) = &answer {
                tracing::error!(error = %e, "the flash actor did not answer");
            }
            then(act, ctx, answer);
            act.flash_calls -= 1;
            act.maybe_exit();
        }));
    }

    /// The (re)start of a job's current phase, on this boot.
    fn start_event(&self) -> Event {
        Event::Start {
            boot: self.boot.clone(),
        }
    }

    /// The store failed after applying a change (or cannot be trusted any
    /// more): stop with exit 3 before anything of it is sent or started.
    /// The next start recovers from what is durable (ARCHITECTURE.md,
    /// durability rule 7).
    fn halt(&mut self, what: &str, error: &StoreError) {
        tracing::error!(%error, "{what}: the store could not be made durable; stopping (exit 3) so the next start recovers from what is on disk");
        self.halted = true;
        System::current().stop_with_code(3);
    }

    /// Commit `t`, then send its outbox and start its commands.
    fn commit_and_dispatch(
        &mut self,
        t: Transition,
        ctx: &mut Context<Self>,
    ) -> Result<Vec<OutboxEntry>, StoreError> {
        let entries = self.store.commit(&t).inspect_err(|e| {
            if e.is_fatal() {
                self.halt("commit", e);
            }
        })?;
        if let Some(job) = &t.job {
            if let Some(log) = &t.log {
                tracing::info!(upgrade = %job.request.message_id, phase = %job.phase.name(), event = %log.event, error = log.error.as_deref().unwrap_or(""), "transition");
            }
        }
        self.dispatch(&entries, &t, ctx);
        Ok(entries)
    }

    fn dispatch(&mut self, entries: &[OutboxEntry], t: &Transition, ctx: &mut Context<Self>) {
        let Some(peers) = self.peers.clone() else {
            tracing::error!("upgrade actor not wired; dropping commands");
            return;
        };
        for entry in entries {
            peers.messaging.do_send(Outbound(entry.clone()));
        }
        for command in &t.commands {
            // While stopping, no new work starts: every phase's work is
            // started again by the next start. An ended upgrade has no next
            // start: its clean-up, and the reboot out of a rejected slot
            // (`Stranded`), run now.
            let ended = t.job.as_ref().is_some_and(|j| j.phase.is_terminal());
            let starts_work = match command {
                Command::Abort { .. } | Command::Cleanup { .. } | Command::LeaveRejected { .. } => {
                    false
                }
                Command::Reboot { .. } => !ended,
                _ => true,
            };
            if self.stopping.is_some() && starts_work {
                tracing::info!(?command, "stopping; left for the next start");
                continue;
            }
            self.run_command(command, t.job.as_ref(), &peers, ctx);
        }
        self.maybe_exit();
    }

    fn run_command(
        &mut self,
        command: &Command,
        job: Option<&Job>,
        peers: &Wire,
        ctx: &mut Context<Self>,
    ) {
        let Some(job) = job else {
            tracing::error!(?command, "command without its job; ignored");
            return;
        };
        match command {
            Command::Begin { job: id } => ctx.notify(JobEvent {
                job: *id,
                event: self.start_event(),
            }),
            Command::Download {
                job: id,
                offset,
                validator,
                delay,
            } => peers.download.do_send(StartDownload {
                fetch: FetchJob {
                    job: *id,
                    source: job.request.source.clone(),
                    firmware: job.request.firmware.clone(),
                    transfer: self.transfer.clone(),
                },
                offset: *offset,
                validator: validator.clone(),
                delay: *delay,
            }),
            Command::Verify { job: id } => peers.verify.do_send(VerifyMsg::Finish {
                job: *id,
                firmware: job.request.firmware.clone(),
            }),
            Command::Flash { job: id } => {
                self.flashing = Some(*id);
                peers.flash.do_send(FlashImage {
                    job: *id,
                    firmware: job.request.firmware.clone(),
                })
            }
            Command::Reboot { job: id, delay } => {
                let md5 = job.request.firmware.md5.clone();
                self.request_reboot(*id, md5, *delay, false, peers, ctx)
            }
            Command::LeaveRejected { job: id } => {
                let md5 = job.request.firmware.md5.clone();
                self.request_reboot(*id, md5, Duration::ZERO, true, peers, ctx)
            }
            Command::CheckBoot { job: id } => self.check_boot(*id, job, peers, ctx),
            Command::Abort { job: id } => peers.abort.do_send(AbortDownload {
                job: *id,
                discard: false,
            }),
            // Discarded by the Flash actor before the agent may exit, and
            // again once any transfer of the job is stopped, so a task waking
            // from its backoff cannot leave anything behind.
            Command::Cleanup { job: id } => {
                let end = peers.end.send(EndJob {
                    job: *id,
                    firmware: job.request.firmware.clone(),
                });
                self.flash_call(end, ctx, |_, _, _| {});
                peers.abort.do_send(AbortDownload {
                    job: *id,
                    discard: true,
                });
            }
        }
    }

    /// Ask the Flash actor which image booted. The answer comes back here
    /// rather than as a JobEvent, so the agent cannot exit between the
    /// check and its commit (and the reboot the transition may ask for).
    fn check_boot(&mut self, id: JobId, job: &Job, peers: &Wire, ctx: &mut Context<Self>) {
        let rebooted = job
            .installed_on_boot
            .as_ref()
            .zip(self.boot.as_ref())
            .map(|(installed, now)| installed != now);
        let check = peers.check_boot.send(CheckBoot {
            job: id,
            firmware: job.request.firmware.clone(),
            rebooted,
        });
        self.flash_call(check, ctx, move |act, ctx, answer| {
            if let Ok(event) = answer {
                <Self as Handler<JobEvent>>::handle(act, JobEvent { job: id, event }, ctx);
            }
            act.boot_settled = true;
        });
    }

    /// Ask the Flash actor for the reboot (after `delay`: a retry of a
    /// failed reboot command, which a stop cancels, the next start asking
    /// again). The agent stays up until it is made, or has failed: that is
    /// an event, and the state machine retries it with a backoff. If the
    /// device already runs the new image, its boot is checked at once
    /// instead (a start of `awaiting_reboot`). `leave_rejected`: the
    /// reboot out of a rejected slot, made only if the device runs one.
    fn request_reboot(
        &mut self,
        id: JobId,
        md5: String,
        delay: Duration,
        leave_rejected: bool,
        peers: &Wire,
        ctx: &mut Context<Self>,
    ) {
        let request = RequestReboot {
            job: id,
            md5,
            leave_rejected,
        };
        if delay.is_zero() {
            return self.send_reboot(request, peers, ctx);
        }
        let peers = peers.clone();
        let retry = ctx.run_later(delay, move |act, ctx| {
            act.reboot_retry = None;
            act.send_reboot(request, &peers, ctx);
        });
        if let Some(earlier) = self.reboot_retry.replace(retry) {
            ctx.cancel_future(earlier);
        }
    }

    fn send_reboot(&mut self, request: RequestReboot, peers: &Wire, ctx: &mut Context<Self>) {
        let id = request.job;
        let asked = peers.reboot.send(request);
        self.flash_call(asked, ctx, move |act, ctx, answer| {
            let answer = answer.unwrap_or_else(|e| {
                Rebooting::Failed(format!("the flash actor did not answer: {e}"))
            });
            let event = match answer {
                Rebooting::Asked => None,
                Rebooting::AlreadyRuns => Some(act.start_event()),
                Rebooting::Failed(detail) => Some(Event::RebootFailed { detail }),
            };
            if let Some(event) = event {
                <Self as Handler<JobEvent>>::handle(act, JobEvent { job: id, event }, ctx);
            }
            act.boot_settled = true;
        });
    }

    /// The answer when the store cannot record a decision: errorNo 8, sent
    /// directly (there is no outbox to put it in).
    fn store_failed(
        &self,
        incoming: &Incoming,
        error: String,
        reply: Option<tokio::sync::oneshot::Sender<Ack>>,
    ) {
        tracing::error!(%error, "the state store failed; request not accepted");
        let ack = fwagent_state::store_failed(incoming, &error);
        let message_id = ack.message_id.clone();
        if let Some(peers) = &self.peers {
            peers.messaging.do_send(Outbound(OutboxEntry {
                seq: UNCOMMITTED,
                message_id,
                job: None,
                message: Outgoing::Ack(ack.clone()),
            }));
        }
        if let Some(reply) = reply {
            let _ = reply.send(ack);
        }
    }
}

impl Actor for Upgrade {
    type Context = Context<Self>;
}

impl Handler<Wire> for Upgrade {
    type Result = ();

    fn handle(&mut self, wire: Wire, ctx: &mut Context<Self>) {
        self.peers = Some(wire.clone());
        match self.store.pending_outbox() {
            Ok(pending) => {
                if !pending.is_empty() {
                    tracing::info!(count = pending.len(), "re-sending the pending outbox");
                }
                for entry in pending {
                    wire.messaging.do_send(Outbound(entry));
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot read the outbox"),
        }
        match self.store.active() {
            Ok(active) => {
                // What ended upgrades left behind goes first; then the
                // active one resumes.
                let resume = active.as_ref().map(|job| {
                    tracing::info!(upgrade = %job.request.message_id, phase = %job.phase.name(), "resuming");
                    job.id
                });
                let removed = wire.remove_stale.send(RemoveStale { active });
                self.flash_call(removed, ctx, move |act, ctx, _| {
                    if let Some(job) = resume {
                        let event = act.start_event();
                        <Self as Handler<JobEvent>>::handle(act, JobEvent { job, event }, ctx);
                    }
                });
            }
            Err(e) => tracing::error!(error = %e, "cannot read the active upgrade"),
        }
        wire.listen.do_send(Listen);
    }
}

impl Handler<Request> for Upgrade {
    type Result = ();

    /// A request, parsed by Messaging (or the control socket's `submit`).
    fn handle(&mut self, msg: Request, ctx: &mut Context<Self>) {
        if self.halted {
            return;
        }
        if self.stopping.is_some() {
            // Not answered: the cloud (or the broker, which gets no PUBACK)
            // sends it again to the next start.
            tracing::info!("stopping; a request was not taken");
            return;
        }
        crash::point("before-request-commit");
        self.decide(msg.incoming, msg.free_bytes, msg.reply, ctx);
    }
}

impl Upgrade {
    /// Decide a parsed request: the view of the store, the pure decision,
    /// the commit, then the ack to `reply` and the dispatch.
    fn decide(
        &mut self,
        incoming: Incoming,
        free_bytes: Option<u64>,
        reply: Option<tokio::sync::oneshot::Sender<Ack>>,
        ctx: &mut Context<Self>,
    ) {
        let view = match self.store.request_view(incoming.message_id(), free_bytes) {
            Ok(view) => RequestView {
                supported: Some(self.protocols.clone()),
                ..view
            },
            Err(e) => return self.store_failed(&incoming, e.to_string(), reply),
        };
        let t = on_request(&view, incoming.clone(), OffsetDateTime::now_utc());
        let accepted = t.job.is_some();
        let ack = t.outbox.iter().find_map(|o| match o {
            Outgoing::Ack(a) => Some(a.clone()),
            Outgoing::Progress { .. } | Outgoing::Result { .. } => None,
        });
        let entries = match self.store.commit(&t) {
            Ok(entries) => entries,
            // Applied, maybe durable: no answer now; the next start sends
            // what the store kept, or the request is asked again.
            Err(e) if e.is_fatal() => return self.halt("recording a request", &e),
            Err(e) => return self.store_failed(&incoming, e.to_string(), reply),
        };
        if let (Some(ack), Some(job)) = (&ack, &t.job) {
            tracing::info!(upgrade = %ack.message_id, job = job.id, "request accepted");
        } else if let Some(ack) = &ack {
            tracing::info!(upgrade = %ack.message_id, error_no = ack.result.error_no, description = %ack.result.description, "request answered");
        }
        if accepted {
            crash::point("after-accept");
        }
        if let (Some(reply), Some(ack)) = (reply, ack) {
            let _ = reply.send(ack);
        }
        self.dispatch(&entries, &t, ctx);
    }
}

impl Handler<JobEvent> for Upgrade {
    type Result = ();

    fn handle(&mut self, msg: JobEvent, ctx: &mut Context<Self>) {
        if self.halted {
            return;
        }
        let job = match self.store.job(msg.job) {
            Ok(Some(job)) => job,
            Ok(None) => {
                tracing::warn!(job = msg.job, "event for an unknown upgrade; ignored");
                return;
            }
            Err(e) => {
                tracing::error!(job = msg.job, error = %e, "cannot read the upgrade");
                return;
            }
        };
        if matches!(
            msg.event,
            Event::Flashed { .. } | Event::FlashFailed { .. } | Event::ImageMissing { .. }
        ) {
            // The Flash actor answered (ImageMissing may come from Verify
            // too; no flash runs then either).
            self.flashing = None;
        }
        let is_checkpoint = matches!(msg.event, Event::Checkpoint { offset, .. } if offset > 0);
        let t = match transition(&job, msg.event, OffsetDateTime::now_utc(), &self.policy) {
            Ok(t) => t,
            Err(refused) => {
                tracing::debug!(upgrade = %job.request.message_id, %refused, "event ignored");
                return;
            }
        };
        // A progress figure with no report due is worth no fdatasync: a
        // crash loses only the figure, which the next checkpoint restores.
        let committed = if t.figures_only(&job) {
            self.store.commit_lazily(&job, &t)
        } else {
            self.commit_and_dispatch(t, ctx).map(|_| ())
        };
        if let Err(e) = committed {
            // Nothing was sent or started: the last durable state stands,
            // and a restart resumes from it.
            tracing::error!(upgrade = %job.request.message_id, error = %e, "cannot commit; stopping so a restart resumes from the store");
            self.halted = true;
            System::current().stop_with_code(3);
            return;
        }
        if is_checkpoint {
            crash::point("after-checkpoint");
        }
    }
}

impl Handler<Delivered> for Upgrade {
    type Result = ();

    fn handle(&mut self, msg: Delivered, _ctx: &mut Context<Self>) {
        if self.halted {
            return;
        }
        if msg.seq != UNCOMMITTED {
            if let Err(e) = self.store.delivered(msg.seq) {
                tracing::error!(seq = msg.seq, error = %e, "cannot mark a message delivered; it will be sent again");
            }
        }
        self.maybe_exit();
    }
}

#[cfg(test)]
mod tests;
