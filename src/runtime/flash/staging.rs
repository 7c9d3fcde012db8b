//! Where an upgrade's image is downloaded to: the partial file in the state
//! directory, or, with `--flash ab:DIR`, straight into the inactive slot.
//!
//! A slot is never booted unverified, so it can take the bytes as they
//! arrive: that saves the second durable write of the whole image and the
//! room for it in `downloads/`. Before the first byte the slot is staged
//! ([`ab::stage`]: every reference to it is cleared and the upgrade noted as
//! `writing`, atomically); a restart resumes the slot at the durable offset
//! only if that note is still this upgrade's. Verification hashes each
//! fsynced range as read back from the slot's medium, so the md5 it checks
//! is the slot's content (docs/AB-SLOTS.md).
//!
//! The Flash actor owns all of it, so the boot-control record has one
//! writer on one thread: the Download actor asks it to [`Stage`] before a
//! transfer writes and to [`Discard`] what a stopped transfer wrote; the
//! Upgrade actor tells it an upgrade ended ([`EndJob`]) and, at start-up,
//! to [`RemoveStale`]. Reading is shared: Verify and Flash find the image
//! with [`Staging::image`], the inbox measures [`Staging::room`] for a
//! request before the Upgrade actor decides it.

use super::{ab, Flash, FlashSpec};
use crate::fsutil;
use crate::runtime::Paths;
use actix::prelude::*;
use fwagent_state::{result_no, Failure, Firmware, Job, JobId, Phase};
use std::io;
use std::path::{Path, PathBuf};

/// Where images go before they are flashed.
#[derive(Clone, Debug)]
pub struct Staging {
    paths: Paths,
    /// `ab:DIR`: images stream into the inactive slot of DIR.
    slots: Option<PathBuf>,
}

/// Where a transfer writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Staged {
    pub path: PathBuf,
    /// The bytes there are this upgrade's: its durable prefix may be resumed.
    pub resumable: bool,
    /// The image goes into a slot: verify it as read back from the medium.
    pub read_back: bool,
    /// Bytes of the same upgrade elsewhere (a partial file left by another
    /// `--flash`), removed once the restart from zero is committed.
    pub stale: Option<PathBuf>,
}

impl Staging {
    pub fn new(paths: Paths, flash: &FlashSpec) -> Self {
        let slots = match flash {
            FlashSpec::Ab(dir) => Some(dir.clone()),
            FlashSpec::File(_) | FlashSpec::Command(_) => None,
        };
        Staging { paths, slots }
    }

    /// The lock of the `command:` backend's commands, in the state directory.
    pub fn installer_lock(&self) -> PathBuf {
        self.paths.installer_lock()
    }

    /// The partial file of `job` in the state directory.
    pub fn part(&self, job: JobId) -> PathBuf {
        self.paths.part(job)
    }

    /// The `.sig` fetched from beside `job`'s image, if any.
    pub fn sig(&self, job: JobId) -> PathBuf {
        self.paths.sig(job)
    }

    /// Where `job`'s image is, or is being written (reads, never writes).
    pub fn image(&self, job: JobId, firmware: &Firmware) -> PathBuf {
        self.slots
            .as_deref()
            .and_then(|dir| ab::staged(dir, job, &firmware.md5))
            .unwrap_or_else(|| self.part(job))
    }

    /// Before a transfer of `job` starts writing.
    pub fn open(&self, job: JobId, firmware: &Firmware) -> Result<Staged, Failure> {
        let Some(dir) = &self.slots else {
            return Ok(Staged {
                path: self.part(job),
                resumable: true,
                read_back: false,
                stale: None,
            });
        };
        // A partial file means the durable offset may be its, not the
        // slot's (the upgrade ran under another `--flash` meanwhile).
        let part = self.part(job);
        let elsewhere = part.exists();
        let (path, resumable) = ab::stage(dir, job, &firmware.md5, firmware.size, elsewhere)
            .map_err(|e| Failure::new(result_no::FLASH_FAILED, e.to_string(), false))?;
        Ok(Staged {
            path,
            resumable,
            read_back: true,
            stale: elsewhere.then_some(part),
        })
    }

    /// `job` is over: remove its partial file, its `.sig` and its note on a slot.
    pub fn discard(&self, job: JobId) {
        remove_partial(job, &self.part(job));
        remove_partial(job, &self.sig(job));
        if let Some(dir) = &self.slots {
            if let Err(e) = ab::unstage(dir, Some(job)) {
                tracing::warn!(job = job, error = %e, "cannot clear the slot's writing note");
            }
        }
    }

    /// `job` has ended (any result): besides [`Staging::discard`], take back
    /// a trial boot of its image that is still pending (it failed or gave up
    /// before the new slot was committed).
    pub fn end(&self, job: JobId, firmware: &Firmware) {
        self.discard(job);
        if let Some(dir) = &self.slots {
            if let Err(e) = ab::withdraw_trial(dir, Some(&firmware.md5)) {
                tracing::warn!(job = job, error = %e, "cannot withdraw the trial boot");
            }
        }
    }

    /// At start-up: what upgrades no longer under way left behind (partial
    /// files, a slot's `writing` note, a trial boot: an agent that died
    /// between an upgrade's end and its cleanup). `active` is the one under
    /// way.
    pub fn remove_stale(&self, active: Option<&Job>) {
        let active_id = active.map(|j| j.id);
        if let Ok(dir) = std::fs::read_dir(self.paths.downloads()) {
            let keep = active_id.map(|j| [format!("{j}.part"), format!("{j}.sig")]);
            for entry in dir.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let ours =
                    name.ends_with(".part") || name.ends_with(".sig") || name.ends_with(".sig.tmp");
                if ours && !keep.as_ref().is_some_and(|k| k.contains(&name)) {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        let Some(dir) = &self.slots else {
            return;
        };
        let record = ab::BootControl::load(dir).ok().flatten();
        let stale_note = record
            .as_ref()
            .and_then(|r| r.writing.as_ref())
            .is_some_and(|w| Some(w.job) != active_id);
        if stale_note {
            if let Err(e) = ab::unstage(dir, None) {
                tracing::warn!(error = %e, "cannot clear a stale writing note");
            }
        }
        // A trial belongs to an upgrade that is flashing or awaiting its reboot.
        let switching =
            active.is_some_and(|j| matches!(j.phase, Phase::Flashing | Phase::AwaitingReboot));
        if !switching {
            if let Err(e) = ab::withdraw_trial(dir, None) {
                tracing::warn!(error = %e, "cannot withdraw a stale trial boot");
            }
        }
    }

    /// The largest image there is room for, if known.
    pub fn room(&self) -> Option<u64> {
        match &self.slots {
            Some(dir) => ab::room(dir),
            // downloads/ may be a file system of its own.
            None => fsutil::free_bytes(&self.paths.downloads())
                .or_else(|_| fsutil::free_bytes(&self.paths.state_dir))
                .ok(),
        }
    }
}

/// Remove a job's partial file; a missing one is fine, a failure is logged.
pub fn remove_partial(job: JobId, part: &Path) {
    match std::fs::remove_file(part) {
        Ok(()) => tracing::debug!(job = job, "partial file removed"),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(job = job, path = %part.display(), error = %e, "cannot remove the partial file")
        }
    }
}

/// Before a transfer of `job` writes: where to ([`Staging::open`]).
#[derive(Message, Debug)]
#[rtype(result = "Result<Staged, Failure>")]
pub struct Stage {
    pub job: JobId,
    pub firmware: Firmware,
}

/// A transfer of `job` stopped for good: remove what it wrote
/// ([`Staging::discard`]).
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Discard {
    pub job: JobId,
}

/// `job` has ended ([`Staging::end`]); answered, so the agent does not exit
/// before a pending trial boot is taken back.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct EndJob {
    pub job: JobId,
    pub firmware: Firmware,
}

/// At start-up, before `active` resumes ([`Staging::remove_stale`]).
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct RemoveStale {
    pub active: Option<Job>,
}

/// The Flash actor's staging, as the Download actor reaches it.
#[derive(Clone)]
pub struct StagingPeer {
    pub stage: Recipient<Stage>,
    pub discard: Recipient<Discard>,
}

impl StagingPeer {
    pub fn of(flash: &Addr<Flash>) -> Self {
        StagingPeer {
            stage: flash.clone().recipient(),
            discard: flash.clone().recipient(),
        }
    }
}

impl Handler<Stage> for Flash {
    type Result = Result<Staged, Failure>;

    fn handle(&mut self, msg: Stage, _ctx: &mut Context<Self>) -> Self::Result {
        self.staging.open(msg.job, &msg.firmware)
    }
}

impl Handler<Discard> for Flash {
    type Result = ();

    fn handle(&mut self, msg: Discard, _ctx: &mut Context<Self>) {
        self.staging.discard(msg.job);
    }
}

impl Handler<EndJob> for Flash {
    type Result = ();

    fn handle(&mut self, msg: EndJob, _ctx: &mut Context<Self>) {
        self.staging.end(msg.job, &msg.firmware);
    }
}

impl Handler<RemoveStale> for Flash {
    type Result = ();

    fn handle(&mut self, msg: RemoveStale, _ctx: &mut Context<Self>) {
        self.staging.remove_stale(msg.active.as_ref());
    }
}
