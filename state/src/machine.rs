//! The upgrade state machine: pure functions from (state, event, now) to a
//! [`Transition`] the store commits and the runtime then carries out.
//!
//! Two entry points:
//! - [`on_request`] decides what a request gets (accept, duplicate,
//!   unsupported protocol, busy, no storage, rejection) from a
//!   [`RequestView`] of the store and the agent;
//! - [`transition`] moves one upgrade along when an [`Event`] arrives.
//!
//! Neither reads a clock, a file or a socket: time and free space are
//! arguments. Every `match` on a phase is exhaustive, so a new phase cannot be
//! forgotten.

use crate::model::{
    ack_no, result_no, Ack, Job, JobId, Joined, LogEntry, Outcome, Outgoing, Phase, PhaseName,
    Pieces, ProgressMark, Protocol, UpgradeRequest, OP_UPGRADE,
};
use crate::secret::Redactor;
use std::collections::HashSet;
use std::time::Duration;
use time::OffsetDateTime;

/// The knobs of the state machine. `Default` gives the documented defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Starts of the download allowed (retries and restarts both count)
    /// without durable progress: a checkpoint beyond the highest durable
    /// offset the upgrade ever reached resets the count, so many power cuts
    /// during a long download never fail it, while a server or image that
    /// crashes the agent at once, or a download that restarts from zero
    /// every time, still does.
    pub download_attempts: u32,
    /// Durable bytes one upgrade may fetch, as a multiple of the image's
    /// size (restarts from zero make it fetch the same bytes again): past
    /// `fetch_budget × size` it fails with 23. Bytes received after the
    /// last checkpoint of an attempt are not counted; they are at most one
    /// checkpoint per attempt.
    pub fetch_budget: u64,
    /// Starts of verification allowed (only restarts repeat it).
    pub verify_attempts: u32,
    /// Starts of flashing allowed (only restarts repeat it).
    pub flash_attempts: u32,
    /// Starts of one phase's work allowed after the machine itself
    /// restarted (a power cut, a watchdog reset, a kernel panic: the boot id
    /// differs from the one at the phase's last start). They are counted
    /// apart from the attempts above, which count the agent's own restarts
    /// within one boot: a crash loop the agent may cause, bounded tightly.
    /// A restart of the machine is not the agent's doing, so it gets this
    /// larger bound; bounded still, so a step that panics the kernel every
    /// time ends failed rather than looping. Durable download progress
    /// resets it like the attempts. Not for `awaiting_reboot`, whose boots
    /// are the point ([`Policy::boot_checks`]).
    pub machine_restarts: u32,
    /// Whether a start of flashing after a restart of the machine counts
    /// as one of [`Policy::machine_restarts`] (`file:`, `ab:`: the agent does
    /// the writing) or as an attempt (`command:`: an installer may restart
    /// the machine itself, and must not loop).
    pub flash_outlives_restarts: bool,
    /// Trial boots the bootloader gives a new slot (`--boot-tries`); the
    /// boot checks allowed follow from it ([`Policy::boot_checks`]).
    pub boot_tries: u32,
    /// Runs of the reboot command one upgrade may see fail: each failure
    /// is retried after [`Policy::backoff`], and the last one ends the
    /// upgrade (51) with the boot switch taken back.
    pub reboot_attempts: u32,
    /// First retry delay; doubled on each retry up to `backoff_max`.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// A progress report needs this many more percent than the last one...
    pub progress_step: u8,
    /// ...and at least this much time since it.
    pub progress_interval: Duration,
    /// Progress and result reports are sent (acks always are).
    pub reports: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            download_attempts: 6,
            fetch_budget: 3,
            verify_attempts: 3,
            flash_attempts: 3,
            machine_restarts: 10,
            flash_outlives_restarts: true,
            boot_tries: 1,
            reboot_attempts: 5,
            backoff_base: Duration::from_millis(1000),
            backoff_max: Duration::from_secs(30),
            progress_step: 5,
            progress_interval: Duration::from_secs(2),
            reports: true,
        }
    }
}

impl Policy {
    /// The delay before retry number `retry` (1 = the first retry).
    pub fn backoff(&self, retry: u32) -> Duration {
        let factor = 1u32
            .checked_shl(retry.saturating_sub(1))
            .unwrap_or(u32::MAX);
        self.backoff_base
            .checked_mul(factor)
            .unwrap_or(self.backoff_max)
            .min(self.backoff_max)
    }

    /// Boot checks allowed in `awaiting_reboot` before giving up (51):
    /// every trial boot may start the agent once, and the boot of the old
    /// slot after the last try once more, with one start to spare for an
    /// agent restart before the reboot. A start that finds the reboot still
    /// to come, when the agent does not ask for it, is none
    /// ([`Event::RebootPending`]).
    pub fn boot_checks(&self) -> u32 {
        self.boot_tries.saturating_add(2)
    }

    /// Whether a start of `phase` after a restart of the machine counts
    /// against [`Policy::machine_restarts`] rather than the attempts.
    fn outlives_restarts(&self, phase: Phase) -> bool {
        match phase {
            Phase::Downloading { .. } | Phase::Verifying => true,
            Phase::Flashing => self.flash_outlives_restarts,
            Phase::Accepted
            | Phase::AwaitingReboot
            | Phase::Completed
            | Phase::Failed
            | Phase::Cancelled
            | Phase::RolledBack => false,
        }
    }

    fn max_attempts(&self, phase: Phase) -> u32 {
        match phase {
            Phase::Accepted | Phase::Downloading { .. } => self.download_attempts,
            Phase::Verifying => self.verify_attempts,
            Phase::Flashing => self.flash_attempts,
            Phase::AwaitingReboot => self.boot_checks(),
            Phase::Completed | Phase::Failed | Phase::Cancelled | Phase::RolledBack => 0,
        }
    }
}

/// Why a step of the work failed, in the result numbers of PROTOCOL.md.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    pub error_no: u32,
    pub description: String,
    /// Worth trying again (a timeout, a dropped connection), or final (404).
    pub retryable: bool,
}

impl Failure {
    pub fn new(error_no: u32, description: impl Into<String>, retryable: bool) -> Self {
        Failure {
            error_no,
            description: description.into(),
            retryable,
        }
    }
}

/// What happened to an upgrade. Each comes from the runtime's actors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The runtime (re)starts the current phase's work: right after the
    /// accept, and after every restart of the agent. Counts as an attempt,
    /// or as a restart of the machine when `boot` (the machine's boot id,
    /// `None` where it cannot be read) differs from the one at the last
    /// start ([`Policy::machine_restarts`]).
    Start {
        boot: Option<String>,
    },
    /// Bytes fetched so far (not yet durable).
    Progress {
        bytes_done: u64,
    },
    /// The partial file is fsynced up to `offset`.
    Checkpoint {
        offset: u64,
        validator: Option<String>,
    },
    /// The server's file is not the one the partial file came from; the
    /// download starts again from zero.
    SourceChanged {
        validator: Option<String>,
    },
    /// Every byte is in the partial file, fsynced.
    Downloaded,
    /// The transfer failed; the partial file is durable up to `durable_offset`.
    DownloadFailed {
        failure: Failure,
        durable_offset: u64,
    },
    /// The downloaded image is gone (verifying or flashing found no partial
    /// file: a power cut took its directory entry, someone removed it). The
    /// download starts again from zero; the fetch budget bounds how often.
    ImageMissing {
        detail: String,
    },
    /// Size and md5 match.
    Verified,
    VerifyFailed {
        failure: Failure,
    },
    /// The image is written and read back; `reboot` when the backend needs
    /// a reboot into the new image before it counts.
    Flashed {
        reboot: bool,
    },
    FlashFailed {
        failure: Failure,
    },
    /// After a reboot: did the new image boot and pass its health check?
    Booted {
        ok: bool,
        detail: String,
    },
    /// The new image was rejected (as `Booted { ok: false }`), and the
    /// device runs a slot its bootloader will not boot again: it is rolled
    /// back and rebooted into the old one.
    Stranded {
        detail: String,
    },
    /// The reboot into the new image has not happened, and the agent does
    /// not ask for it (someone else reboots): this start was no boot check
    /// and does not count towards the bound.
    RebootPending {
        detail: String,
    },
    /// The reboot into the new image has not happened, and the agent asks
    /// for it (again): the check counted.
    NotRebooted {
        detail: String,
    },
    /// The reboot command failed (or could not run): asked again after a
    /// backoff, up to [`Policy::reboot_attempts`].
    RebootFailed {
        detail: String,
    },
    /// After the reboot, the commit step of an installer (`command:` with
    /// `--commit-command`) failed: the new image is not confirmed (51). The
    /// agent cannot undo what the installer did, so this is `failed`, not
    /// `rolled_back`.
    NotCommitted {
        detail: String,
    },
    /// An operator or the cloud asked to stop.
    Cancel,
}

impl Event {
    /// A start whose boot is not known: always an attempt.
    pub const START: Event = Event::Start { boot: None };

    fn name(&self) -> &'static str {
        match self {
            Event::Start { .. } => "start",
            Event::Progress { .. } => "progress",
            Event::Checkpoint { .. } => "checkpoint",
            Event::SourceChanged { .. } => "source changed",
            Event::Downloaded => "downloaded",
            Event::DownloadFailed { .. } => "download failed",
            Event::ImageMissing { .. } => "image missing",
            Event::Verified => "verified",
            Event::VerifyFailed { .. } => "verify failed",
            Event::Flashed { .. } => "flashed",
            Event::FlashFailed { .. } => "flash failed",
            Event::Booted { .. } => "booted",
            Event::Stranded { .. } => "stranded",
            Event::RebootPending { .. } => "reboot pending",
            Event::NotRebooted { .. } => "not rebooted",
            Event::RebootFailed { .. } => "reboot failed",
            Event::NotCommitted { .. } => "not committed",
            Event::Cancel => "cancel",
        }
    }
}

/// Work the runtime must start once the transition is committed. Every
/// command is idempotent: after a crash the same command is issued again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Send [`Event::Start`] for this job (the upgrade was just accepted).
    Begin { job: JobId },
    /// Fetch from `offset` (the partial file is cut back to it first), after
    /// waiting `delay`.
    Download {
        job: JobId,
        offset: u64,
        validator: Option<String>,
        delay: Duration,
    },
    /// Check size and md5 of the complete partial file.
    Verify { job: JobId },
    /// Write the verified image to the flash target.
    Flash { job: JobId },
    /// Ask for the reboot into the new image, after waiting `delay` (a
    /// retry of a failed reboot command).
    Reboot { job: JobId, delay: Duration },
    /// The upgrade ended in `awaiting_reboot` without a verdict on its image
    /// (the boot checks ran out): if the device runs a slot its bootloader
    /// will not boot again, the rejected image, reboot into the good one, so
    /// that "rolled back" is true and a later upgrade starts from the good
    /// slot. Comes after the job's [`Command::Cleanup`].
    LeaveRejected { job: JobId },
    /// Find out which image booted, and commit or roll back.
    CheckBoot { job: JobId },
    /// Stop any work under way for this job.
    Abort { job: JobId },
    /// The job has ended: remove what it staged (its partial file, a slot's
    /// `writing` note) and take back a trial boot still pending for it.
    Cleanup { job: JobId },
}

/// The outcome of applying an event: what to commit, then what to do.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Transition {
    /// The job's new record (absent when a request created no job).
    pub job: Option<Job>,
    pub log: Option<LogEntry>,
    /// Messages to queue, in order.
    pub outbox: Vec<Outgoing>,
    /// Work to start after the commit.
    pub commands: Vec<Command>,
    /// An ack to remember under its messageId, so a repeat gets it again.
    pub record_ack: Option<Ack>,
}

impl Transition {
    /// `t` only moves the figures of `from` (`bytes_done` between two
    /// checkpoints, and when), and queues, logs and starts nothing: a crash
    /// may lose it without harm, so it needs no flush
    /// ([`crate::Store::commit_lazily`]).
    pub fn figures_only(&self, from: &Job) -> bool {
        let quiet = self.log.is_none()
            && self.outbox.is_empty()
            && self.commands.is_empty()
            && self.record_ack.is_none();
        quiet
            && self.job.as_ref().is_some_and(|new| {
                Job {
                    bytes_done: new.bytes_done,
                    updated_at: new.updated_at,
                    last_progress: new.last_progress,
                    ..from.clone()
                } == *new
            })
    }
}

/// Why an event does not apply to a job.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("the upgrade has already ended ({0})")]
    Ended(PhaseName),
    #[error("flashing has begun ({0}); an upgrade can be cancelled only before flashing")]
    FlashingBegun(PhaseName),
    #[error("event `{event}` does not apply in phase {phase}")]
    WrongPhase {
        event: &'static str,
        phase: PhaseName,
    },
}

/// A request as the protocol module hands it over: valid, or already
/// answered with a rejection ack.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Incoming {
    Valid(Box<UpgradeRequest>),
    Invalid(Ack),
}

impl Incoming {
    pub fn message_id(&self) -> &str {
        match self {
            Incoming::Valid(r) => &r.message_id,
            Incoming::Invalid(a) => &a.message_id,
        }
    }
}

/// What [`on_request`] needs to know of the store.
#[derive(Clone, Debug, Default)]
pub struct RequestView {
    /// The ack already given to this messageId, if any.
    pub previous: Option<Ack>,
    /// The upgrade under way, if any.
    pub active: Option<Job>,
    /// The number the next job gets.
    pub next_id: JobId,
    /// Free bytes where the image will be stored; `None` if unknown.
    pub free_bytes: Option<u64>,
    /// The protocols this agent can fetch with; `None`: every one.
    pub supported: Option<HashSet<Protocol>>,
}

/// Decide what a request gets.
pub fn on_request(view: &RequestView, incoming: Incoming, now: OffsetDateTime) -> Transition {
    if !incoming.message_id().is_empty() {
        if let Some(previous) = &view.previous {
            return Transition {
                outbox: vec![Outgoing::Ack(previous.clone())],
                ..Transition::default()
            };
        }
    }
    let req = match incoming {
        Incoming::Invalid(ack) => return answer(ack),
        Incoming::Valid(req) => *req,
    };
    let ack = |result: Outcome| Ack {
        operator: OP_UPGRADE.to_string(),
        session_id: req.session_id.clone(),
        message_id: req.message_id.clone(),
        result,
    };
    let protocol = req.source.protocol;
    if view
        .supported
        .as_ref()
        .is_some_and(|s| !s.contains(&protocol))
    {
        return answer(ack(Outcome::new(
            ack_no::UNSUPPORTED_PROTOCOL,
            format!("unsupported protocol: {protocol} is not built into this agent"),
        )));
    }
    if let Some(active) = &view.active {
        let same_image = active.request.firmware.md5 == req.firmware.md5
            && active.request.firmware.size == req.firmware.size;
        if same_image && active.joined.len() < Job::MAX_JOINED {
            return join(active, req, now);
        }
        return answer(ack(Outcome::new(
            ack_no::BUSY,
            format!("busy: upgrade {} is active", active.request.message_id),
        )));
    }
    if let Some(free) = view.free_bytes {
        if free < req.firmware.size {
            return answer(ack(Outcome::new(
                ack_no::NO_STORAGE,
                format!(
                    "not enough storage: {} bytes needed, {} free",
                    req.firmware.size, free
                ),
            )));
        }
    }
    let accepted = ack(Outcome::ok());
    let job = Job {
        id: view.next_id,
        request: req,
        phase: Phase::Accepted,
        attempts: 0,
        bytes_done: 0,
        high_water: 0,
        fetched: 0,
        validator: None,
        result: None,
        last_error: None,
        last_progress: None,
        boot: None,
        machine_restarts: 0,
        joined: Vec::new(),
        installed_on_boot: None,
        reboot_failures: 0,
        pieces: Pieces::One,
        created_at: now,
        updated_at: now,
    };
    Transition {
        log: Some(LogEntry {
            at: now,
            from: None,
            to: PhaseName::Accepted,
            event: "request accepted".into(),
            error: None,
        }),
        outbox: vec![Outgoing::Ack(accepted.clone())],
        commands: vec![Command::Begin { job: job.id }],
        record_ack: Some(accepted),
        job: Some(job),
    }
}

/// `req` asks for the image of `active` under another messageId: it joins
/// that upgrade (ack 0) and gets its reports from now on. The ack names the
/// upgrade, so a replay after it ended claims nothing about the present.
fn join(active: &Job, req: UpgradeRequest, now: OffsetDateTime) -> Transition {
    let outcome = Outcome::new(
        ack_no::OK,
        format!("ok: joined upgrade {}", active.request.message_id),
    );
    let ack = Ack {
        operator: OP_UPGRADE.to_string(),
        session_id: req.session_id.clone(),
        message_id: req.message_id.clone(),
        result: outcome,
    };
    let mut job = active.clone();
    job.joined.push(Joined {
        message_id: req.message_id.clone(),
        session_id: req.session_id,
        firmware_name: req.firmware.name,
        pass_port: req.pass_port,
    });
    job.updated_at = now;
    let phase = job.phase.name();
    Transition {
        log: Some(LogEntry {
            at: now,
            from: Some(phase),
            to: phase,
            event: format!("request {} joined", req.message_id),
            error: None,
        }),
        outbox: vec![Outgoing::Ack(ack.clone())],
        commands: Vec::new(),
        record_ack: Some(ack),
        job: Some(job),
    }
}

/// The answer to `incoming` when the store cannot record a decision:
/// errorNo 8, sent as it is (there is no outbox to put it in) and recorded
/// nowhere.
pub fn store_failed(incoming: &Incoming, error: &str) -> Ack {
    let (operator, session_id, message_id) = match incoming {
        Incoming::Valid(r) => (OP_UPGRADE.to_string(), &r.session_id, &r.message_id),
        Incoming::Invalid(a) => (a.operator.clone(), &a.session_id, &a.message_id),
    };
    Ack {
        operator,
        session_id: session_id.clone(),
        message_id: message_id.clone(),
        result: Outcome::new(
            ack_no::STORE_FAILED,
            format!("the state store failed: {error}"),
        ),
    }
}

/// Send `ack` and remember it under its messageId (when it has one).
fn answer(ack: Ack) -> Transition {
    Transition {
        outbox: vec![Outgoing::Ack(ack.clone())],
        record_ack: (!ack.message_id.is_empty()).then_some(ack),
        ..Transition::default()
    }
}

/// Move `job` along on `event`.
pub fn transition(
    job: &Job,
    event: Event,
    now: OffsetDateTime,
    policy: &Policy,
) -> Result<Transition, Refused> {
    let phase = job.phase;
    let name = event.name();
    let wrong = || Refused::WrongPhase {
        event: name,
        phase: phase.name(),
    };
    if phase.is_terminal() {
        return Err(Refused::Ended(phase.name()));
    }
    let mut step = Step::new(job, now, policy);
    match event {
        Event::Start { boot } => {
            let rebooted = matches!((&job.boot, &boot), (Some(was), Some(now)) if was != now);
            if boot.is_some() {
                step.job.boot = boot;
            }
            let (attempts, restarts) = if rebooted && policy.outlives_restarts(phase) {
                (job.attempts, job.machine_restarts + 1)
            } else {
                (job.attempts + 1, job.machine_restarts)
            };
            let exhausted = if attempts > policy.max_attempts(phase) {
                Some(format!("{} attempts", job.attempts))
            } else if restarts > policy.machine_restarts {
                Some(format!("{} restarts of the machine", job.machine_restarts))
            } else {
                None
            };
            if let Some(count) = exhausted {
                let why = format!(
                    "gave up after {count} at {}{}",
                    phase.name(),
                    job.last_error
                        .as_deref()
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default()
                );
                let error_no = match phase {
                    Phase::Accepted | Phase::Downloading { .. } | Phase::Verifying => {
                        result_no::TRANSFER
                    }
                    Phase::Flashing => result_no::FLASH_FAILED,
                    Phase::AwaitingReboot => result_no::ROLLED_BACK,
                    Phase::Completed | Phase::Failed | Phase::Cancelled | Phase::RolledBack => {
                        return Err(wrong())
                    }
                };
                let mut t = step.finish(
                    Phase::Failed,
                    Outcome::new(error_no, why),
                    "attempts exhausted",
                );
                if phase == Phase::AwaitingReboot {
                    t.commands.push(Command::LeaveRejected { job: job.id });
                }
                return Ok(t);
            }
            step.job.machine_restarts = restarts;
            let after = if restarts > job.machine_restarts {
                format!(
                    "after a restart of the machine ({restarts} of {}; still attempt {attempts})",
                    policy.machine_restarts
                )
            } else {
                format!("(attempt {attempts})")
            };
            step.job.attempts = attempts;
            let id = job.id;
            match phase {
                Phase::Accepted => {
                    step.enter(Phase::Downloading { offset: 0 }, "download started");
                    step.job.attempts = 1;
                    step.download(0, Duration::ZERO);
                }
                Phase::Downloading { offset } => {
                    step.log(format!("download resumed at byte {offset} {after}"), None);
                    step.download(offset, Duration::ZERO);
                }
                Phase::Verifying => {
                    step.log(format!("verification restarted {after}"), None);
                    step.command(Command::Verify { job: id });
                }
                Phase::Flashing => {
                    step.log(format!("flashing restarted {after}"), None);
                    step.command(Command::Flash { job: id });
                }
                Phase::AwaitingReboot => {
                    step.log(
                        format!("checking the booted image (check {attempts})"),
                        None,
                    );
                    step.command(Command::CheckBoot { job: id });
                }
                Phase::Completed | Phase::Failed | Phase::Cancelled | Phase::RolledBack => {
                    return Err(wrong())
                }
            }
            Ok(step.done())
        }
        Event::Progress { bytes_done } => {
            let Phase::Downloading { .. } = phase else {
                return Err(wrong());
            };
            step.job.bytes_done = bytes_done.min(job.request.firmware.size);
            step.maybe_progress();
            Ok(step.done())
        }
        Event::Checkpoint { offset, validator } => {
            let Phase::Downloading { offset: before } = phase else {
                return Err(wrong());
            };
            let offset = offset.min(job.request.firmware.size);
            step.durable(before, offset);
            step.job.phase = Phase::Downloading { offset };
            step.job.bytes_done = job.bytes_done.max(offset);
            if validator.is_some() {
                step.job.validator = validator;
            }
            if let Some(failure) = step.over_budget() {
                return Ok(step.fail(failure));
            }
            if offset > job.high_water {
                step.progressed(job.high_water);
            }
            step.maybe_progress();
            Ok(step.done())
        }
        Event::SourceChanged { validator } => {
            let Phase::Downloading { .. } = phase else {
                return Err(wrong());
            };
            step.job.phase = Phase::Downloading { offset: 0 };
            step.job.bytes_done = 0;
            step.job.validator = validator;
            // The transfer starts again from byte 0: one piece again.
            if step.job.pieces == Pieces::Resumed {
                step.job.pieces = Pieces::One;
            }
            step.log(
                "the file on the server changed; starting again from byte 0".into(),
                None,
            );
            // Progress went back. Say so if the 2 s interval allows (this is
            // no phase change), and move the throttle's mark back to 0 % in
            // any case, or nothing would be reported until the old percent
            // is passed again.
            match job.last_progress {
                Some(mark) if now - mark.at < policy.progress_interval => {
                    step.job.last_progress = Some(ProgressMark { percent: 0, ..mark });
                }
                Some(_) | None => step.progress_report(),
            }
            Ok(step.done())
        }
        Event::Downloaded => {
            let Phase::Downloading { .. } = phase else {
                return Err(wrong());
            };
            step.job.bytes_done = job.request.firmware.size;
            step.enter(Phase::Verifying, "download complete");
            step.command(Command::Verify { job: job.id });
            Ok(step.done())
        }
        Event::DownloadFailed {
            failure,
            durable_offset,
        } => {
            let Phase::Downloading { offset: before } = phase else {
                return Err(wrong());
            };
            let offset = before.max(durable_offset).min(job.request.firmware.size);
            step.set_last_error(&failure.description);
            step.durable(before, offset);
            if let Some(over) = step.over_budget() {
                return Ok(step.fail(over));
            }
            if failure.retryable && job.attempts < policy.download_attempts {
                let retry = job.attempts;
                step.job.attempts += 1;
                step.job.phase = Phase::Downloading { offset };
                step.log(
                    format!("retry {retry} from byte {offset} (attempt {})", retry + 1),
                    Some(failure.description.clone()),
                );
                step.download(offset, policy.backoff(retry));
                return Ok(step.done());
            }
            Ok(step.fail(failure))
        }
        Event::ImageMissing { detail } => {
            let (Phase::Verifying | Phase::Flashing) = phase else {
                return Err(wrong());
            };
            step.set_last_error(&detail);
            step.download_again("the downloaded image is gone; downloading it again from byte 0");
            Ok(step.done())
        }
        Event::Verified => {
            if phase != Phase::Verifying {
                return Err(wrong());
            }
            step.enter(Phase::Flashing, "size and md5 verified");
            step.command(Command::Flash { job: job.id });
            Ok(step.done())
        }
        Event::VerifyFailed { failure } => {
            if phase != Phase::Verifying {
                return Err(wrong());
            }
            if failure.error_no == result_no::MD5_MISMATCH && job.pieces == Pieces::Resumed {
                // Maybe a bad splice, not a bad image: fetch it once more,
                // whole, with a budget of its own; a wrong md5 now is final.
                step.set_last_error(&failure.description);
                step.job.pieces = Pieces::Refetched;
                step.job.high_water = 0;
                step.job.fetched = 0;
                step.download_again(
                    "md5 mismatch of an image joined from resumed transfers; downloading it once more from byte 0",
                );
                return Ok(step.done());
            }
            Ok(step.fail(failure))
        }
        Event::Flashed { reboot } => {
            if phase != Phase::Flashing {
                return Err(wrong());
            }
            if reboot {
                step.enter(Phase::AwaitingReboot, "image installed; reboot requested");
                step.job.attempts = 0;
                step.job.installed_on_boot = job.boot.clone();
                step.command(reboot_now(job.id));
                return Ok(step.done());
            }
            Ok(step.finish(Phase::Completed, Outcome::ok(), "image installed"))
        }
        Event::FlashFailed { failure } => {
            if phase != Phase::Flashing {
                return Err(wrong());
            }
            Ok(step.fail(Failure {
                error_no: result_no::FLASH_FAILED,
                ..failure
            }))
        }
        Event::Booted { ok, detail } => {
            if phase != Phase::AwaitingReboot {
                return Err(wrong());
            }
            if ok {
                return Ok(step.finish(
                    Phase::Completed,
                    Outcome::ok(),
                    "new image booted and committed",
                ));
            }
            Ok(step.roll_back(detail))
        }
        Event::Stranded { detail } => {
            if phase != Phase::AwaitingReboot {
                return Err(wrong());
            }
            let mut t = step.roll_back(detail);
            t.commands.push(reboot_now(job.id));
            Ok(t)
        }
        Event::NotRebooted { detail } => {
            if phase != Phase::AwaitingReboot {
                return Err(wrong());
            }
            step.log(format!("not rebooted yet: {detail}; asking again"), None);
            step.command(reboot_now(job.id));
            Ok(step.done())
        }
        Event::RebootFailed { detail } => {
            if phase != Phase::AwaitingReboot {
                return Err(wrong());
            }
            let failures = job.reboot_failures.saturating_add(1);
            step.job.reboot_failures = failures;
            let of = policy.reboot_attempts;
            if failures >= of {
                let why =
                    format!("the reboot into the new image failed {failures} times: {detail}");
                return Ok(step.finish(
                    Phase::Failed,
                    Outcome::new(result_no::ROLLED_BACK, why),
                    "reboot failed; boot switch taken back",
                ));
            }
            let delay = policy.backoff(failures);
            step.log(
                format!(
                    "the reboot command failed ({failures} of {of}); asking again in {} s",
                    delay.as_secs_f64()
                ),
                Some(detail),
            );
            step.command(Command::Reboot { job: job.id, delay });
            Ok(step.done())
        }
        Event::NotCommitted { detail } => {
            if phase != Phase::AwaitingReboot {
                return Err(wrong());
            }
            Ok(step.finish(
                Phase::Failed,
                Outcome::new(result_no::ROLLED_BACK, detail),
                "new image not confirmed",
            ))
        }
        Event::RebootPending { detail } => {
            if phase != Phase::AwaitingReboot {
                return Err(wrong());
            }
            step.job.attempts = job.attempts.saturating_sub(1);
            step.log(
                format!(
                    "still waiting for the reboot: {detail}; that start was no boot check \
                     (check {})",
                    step.job.attempts
                ),
                None,
            );
            Ok(step.done())
        }
        Event::Cancel => match phase {
            Phase::Accepted | Phase::Downloading { .. } | Phase::Verifying => {
                step.command(Command::Abort { job: job.id });
                Ok(step.finish(
                    Phase::Cancelled,
                    Outcome::new(result_no::CANCELLED, "cancelled"),
                    "cancel requested",
                ))
            }
            Phase::Flashing | Phase::AwaitingReboot => Err(Refused::FlashingBegun(phase.name())),
            Phase::Completed | Phase::Failed | Phase::Cancelled | Phase::RolledBack => {
                Err(Refused::Ended(phase.name()))
            }
        },
    }
}

/// Ask for the reboot now.
fn reboot_now(job: JobId) -> Command {
    Command::Reboot {
        job,
        delay: Duration::ZERO,
    }
}

/// A transition being built from one job.
struct Step<'a> {
    from: PhaseName,
    /// Over every text the step stores or reports (what servers and commands
    /// said, text reused from the record), so no credential reaches a log
    /// entry, a stored error or a report; built before the credentials may
    /// be forgotten.
    redactor: Redactor,
    job: Job,
    now: OffsetDateTime,
    policy: &'a Policy,
    out: Transition,
}

impl<'a> Step<'a> {
    fn new(job: &Job, now: OffsetDateTime, policy: &'a Policy) -> Self {
        let mut job = job.clone();
        job.updated_at = now;
        Step {
            from: job.phase.name(),
            redactor: job.redactor(),
            job,
            now,
            policy,
            out: Transition::default(),
        }
    }

    /// Remember what went wrong (redacted, as every text the step stores).
    /// Fetch from `offset` after `delay`, and note whether the partial file
    /// now joins more than one transfer ([`Pieces`]).
    fn download(&mut self, offset: u64, delay: Duration) {
        self.job.pieces = match (self.job.pieces, offset) {
            (Pieces::One, 1..) => Pieces::Resumed,
            (Pieces::Resumed, 0) => Pieces::One,
            (pieces, _) => pieces,
        };
        self.command(Command::Download {
            job: self.job.id,
            offset,
            validator: self.job.validator.clone(),
            delay,
        });
    }

    /// Back to `downloading` from byte 0, trusting no validator.
    fn download_again(&mut self, why: &str) {
        self.job.bytes_done = 0;
        self.job.validator = None;
        self.enter(Phase::Downloading { offset: 0 }, why);
        self.download(0, Duration::ZERO);
    }

    fn set_last_error(&mut self, text: &str) {
        self.job.last_error = Some(self.redactor.text(text));
    }

    fn log(&mut self, event: String, error: Option<String>) {
        self.out.log = Some(LogEntry {
            at: self.now,
            from: Some(self.from),
            to: self.job.phase.name(),
            event: self.redactor.text(&event),
            error: error.map(|e| self.redactor.text(&e)),
        });
    }

    /// The durable offset moved from `before` to `offset`: count the new
    /// durable bytes and raise the high-water mark.
    fn durable(&mut self, before: u64, offset: u64) {
        self.job.fetched = self
            .job
            .fetched
            .saturating_add(offset.saturating_sub(before));
        self.job.high_water = self.job.high_water.max(offset);
    }

    /// Durable progress past `high_water`, the furthest offset before: the
    /// attempts so far were not a loop. Only starts without progress count
    /// towards the bound (a restart from zero that reaches the old offsets
    /// again makes none), so the count starts again, and the log says so
    /// when it had moved: `attempts` is always the count the log names last.
    fn progressed(&mut self, high_water: u64) {
        let moved = self.job.attempts != 1 || self.job.machine_restarts != 0;
        self.job.attempts = 1;
        self.job.machine_restarts = 0;
        if moved {
            self.log(
                format!(
                    "durable progress past byte {high_water}, the furthest before: \
                     counted from here (attempt 1)"
                ),
                None,
            );
        }
    }

    /// The upgrade fetched more than its budget allows: the failure to end it with.
    fn over_budget(&self) -> Option<Failure> {
        let size = self.job.request.firmware.size;
        let budget = self.policy.fetch_budget.saturating_mul(size);
        (self.job.fetched > budget).then(|| {
            let why = self
                .job
                .last_error
                .as_deref()
                .map(|e| format!("; last error: {e}"))
                .unwrap_or_default();
            Failure::new(
                result_no::TRANSFER,
                format!(
                    "gave up: fetched {} bytes of a {size}-byte image, more than {} times its size, \
                     without completing it (the download keeps restarting from zero: the server \
                     cannot resume it){why}",
                    self.job.fetched, self.policy.fetch_budget
                ),
                false,
            )
        })
    }

    fn command(&mut self, command: Command) {
        self.out.commands.push(command);
    }

    /// Enter a working phase: logged, and always reported.
    fn enter(&mut self, phase: Phase, why: &str) {
        self.job.phase = phase;
        self.job.attempts = 1;
        self.job.machine_restarts = 0;
        self.log(why.to_string(), None);
        self.progress_report();
    }

    fn progress_report(&mut self) {
        let percent = self.job.percent();
        self.job.last_progress = Some(ProgressMark {
            percent,
            phase: self.job.phase.name(),
            at: self.now,
        });
        if self.policy.reports {
            for subject in self.job.subjects() {
                self.out.outbox.push(Outgoing::Progress {
                    subject,
                    phase: self.job.phase.name(),
                    bytes_done: self.job.bytes_done,
                    total_bytes: self.job.request.firmware.size,
                    percent,
                });
            }
        }
    }

    /// Report progress if it grew by the step and the interval has passed.
    fn maybe_progress(&mut self) {
        let due = match self.job.last_progress {
            None => true,
            Some(mark) => {
                mark.phase != self.job.phase.name()
                    || (self.job.percent()
                        >= mark.percent.saturating_add(self.policy.progress_step)
                        && self.now - mark.at >= self.policy.progress_interval)
            }
        };
        if due {
            self.progress_report();
        }
    }

    fn fail(self, failure: Failure) -> Transition {
        let outcome = Outcome::new(failure.error_no, failure.description);
        self.finish(Phase::Failed, outcome, "upgrade failed")
    }

    /// Enter a terminal phase: result recorded and reported once, what was
    /// staged cleaned up, the request's credentials dropped.
    fn finish(mut self, phase: Phase, result: Outcome, why: &str) -> Transition {
        // Built from stored text too (`gave up …: {last_error}`).
        let result = Outcome::new(result.error_no, self.redactor.text(&result.description));
        self.job.phase = phase;
        let error = (!result.is_ok()).then(|| result.description.clone());
        if error.is_some() {
            self.job.last_error = error.clone();
        }
        self.job.result = Some(result.clone());
        self.log(why.to_string(), error);
        if self.policy.reports {
            for subject in self.job.subjects() {
                self.out.outbox.push(Outgoing::Result {
                    subject,
                    phase: phase.name(),
                    result: result.clone(),
                });
            }
        }
        self.command(Command::Cleanup { job: self.job.id });
        // Nothing needs the credentials any more: the result report above
        // carries its passPort, and no download will run again.
        self.job.forget_secrets();
        self.done()
    }

    /// The new image was rejected: `rolled_back`, 51.
    fn roll_back(mut self, detail: String) -> Transition {
        self.set_last_error(&detail);
        self.finish(
            Phase::RolledBack,
            Outcome::new(result_no::ROLLED_BACK, detail),
            "new image rejected; rolled back",
        )
    }

    fn done(mut self) -> Transition {
        self.out.job = Some(self.job);
        self.out
    }
}
