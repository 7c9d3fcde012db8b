//! The Flash actor and its backends: where a verified image goes, and, for
//! A/B slots, the reboot and the check of what booted.
//!
//! - `--flash file:PATH` (`file`) writes the image to an existing file or
//!   block device (never created: a missing `/dev/mmcblk0p3` must not become
//!   a file in RAM) and, on a second thread one 16 MiB range behind the
//!   writes, drops the written pages and reads them back from the medium;
//!   the md5 of what was read must be the verified one.
//! - `--flash ab:DIR`: the download has already streamed the image into the
//!   inactive one of two slots ([`staging`]) and verification hashed it
//!   as read back from the medium; this fsyncs it (and its directory) and
//!   points the boot-control record's next-boot at it (an image left in
//!   `downloads/` by another `--flash` is copied in first, as for `file:`)
//!   ([`ab`], and docs/AB-SLOTS.md); the upgrade waits in `awaiting_reboot`.
//!   After the reboot [`CheckBoot`] finds out which slot runs, runs the
//!   health check and commits, or reports the roll-back.
//! - `--flash command:CMD` (`command`) runs an installer
//!   (`rauc install {image}`) with a deadline; exit 0 is success
//!   ([`crate::exec`]). It and `--commit-command` run under the installer
//!   lock: a start of the agent, and every run, first ends what an earlier
//!   run left behind ([`crate::exec::GroupLock`]). With `--commit-command`
//!   the upgrade waits in `awaiting_reboot` too; the first start on another
//!   boot (the boot id differs from the one the installer ran on) runs the
//!   commit command (`rauc status mark-good`): exit 0 completes it, anything
//!   else is 51.
//!
//! Flashing is repeatable: after a crash the image is written (`file:`), the
//! switch made (`ab:`) or the installer run again. The actor runs on its own
//! thread, so long writes and commands never stall messaging.
//!
//! Crash points of this module (see `crate::crash`): `mid-flash`,
//! `after-slot-write`, `before-switch-rename`, `after-flash`, `mid-install`,
//! `before-reboot`, `before-commit-rename`, `after-boot-commit`.

pub mod ab;
mod command;
mod file;
pub mod staging;

pub use command::install;
pub use file::{file_target, write_file, FileTarget, FileTargetError};
use file::{sync_parent, write_slot};

use super::JobEvent;
use crate::crash;
use crate::exec::{run_shell, run_shell_exclusive, GroupLock};
use ab::{BootControl, Slot, Slots, Trial, Verdict};
use actix::prelude::*;
use fwagent_state::{result_no, Event, Failure, Firmware, JobId};
use staging::Staging;
use std::fmt;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// `--reboot-command` on a real gateway.
pub const DEFAULT_REBOOT_COMMAND: &str = "reboot";
/// `--install-timeout`: the installer, the health check and the reboot command.
pub const DEFAULT_INSTALL_TIMEOUT: Duration = Duration::from_secs(1800);
/// `--boot-tries`: trial boots of a new slot before the bootloader falls back.
pub const DEFAULT_BOOT_TRIES: u32 = 3;

/// Where verified images go, as given by `--flash`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FlashSpec {
    /// A file or block device, written in place.
    File(PathBuf),
    /// Two slots and a boot-control record in this directory.
    Ab(PathBuf),
    /// An installer command line; `{image}` is replaced by the image's path.
    Command(String),
}

impl FlashSpec {
    /// Whether a restart of the machine during flashing is a power cut the
    /// agent suffered (`file:`, `ab:`: the agent does the writing), so it
    /// does not count as an attempt (`Policy::flash_outlives_restarts`). An
    /// installer (`command:`) may restart the machine itself; every start
    /// of it counts, so one that does so on every run cannot loop.
    pub fn outlives_restarts(&self) -> bool {
        !matches!(self, FlashSpec::Command(_))
    }
}

impl std::str::FromStr for FlashSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once(':') {
            Some(("file", path)) if !path.is_empty() => Ok(FlashSpec::File(PathBuf::from(path))),
            Some(("ab", dir)) if !dir.is_empty() => Ok(FlashSpec::Ab(PathBuf::from(dir))),
            Some(("command", cmd)) if !cmd.trim().is_empty() => {
                Ok(FlashSpec::Command(cmd.to_string()))
            }
            _ => Err(format!(
                "`{s}` is not a flash target: use file:PATH, ab:DIR or command:CMD"
            )),
        }
    }
}

impl fmt::Display for FlashSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FlashSpec::File(p) => write!(f, "file:{}", p.display()),
            FlashSpec::Ab(p) => write!(f, "ab:{}", p.display()),
            FlashSpec::Command(c) => write!(f, "command:{c}"),
        }
    }
}

/// The knobs of the backends that reboot or run commands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlashOptions {
    /// Run to reboot into the new slot; `None`: wait for someone else to.
    pub reboot_command: Option<String>,
    /// Run after a trial boot of the new slot; exit 0 = healthy.
    pub health_command: Option<String>,
    /// `command:`: run on the first start after the reboot that follows the
    /// installer; exit 0 = the new image is confirmed. `None`: the
    /// installer's exit status is the result, no reboot.
    pub commit_command: Option<String>,
    /// Deadline of every command the backends run.
    pub command_timeout: Duration,
    /// Trial boots of a new slot (the record's `tries`).
    pub boot_tries: u32,
}

impl Default for FlashOptions {
    fn default() -> Self {
        FlashOptions {
            reboot_command: Some(DEFAULT_REBOOT_COMMAND.to_string()),
            health_command: None,
            commit_command: None,
            command_timeout: DEFAULT_INSTALL_TIMEOUT,
            boot_tries: DEFAULT_BOOT_TRIES,
        }
    }
}

/// Install `job`'s verified image (from where [`Staging::image`] finds it).
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct FlashImage {
    pub job: JobId,
    pub firmware: Firmware,
}

/// Reboot into the new image `md5` (answered once the reboot command has
/// run). Answers [`Rebooting::AlreadyRuns`], without rebooting, when the
/// device already runs it (power was lost between the switch and its
/// commit, and the bootloader took the trial): check the boot now instead.
/// With `leave_rejected`, the upgrade has ended: reboot only if the device
/// runs a slot its bootloader will not boot again.
#[derive(Message, Debug)]
#[rtype(result = "Rebooting")]
pub struct RequestReboot {
    pub job: JobId,
    pub md5: String,
    pub leave_rejected: bool,
}

/// The answer to [`RequestReboot`].
#[derive(Debug, PartialEq, Eq)]
pub enum Rebooting {
    /// The reboot command ran (the reboot is on its way), or there is
    /// nothing to ask (no command, no rejected slot to leave): wait.
    Asked,
    /// The device already runs the new image: check the boot now.
    AlreadyRuns,
    /// The reboot command failed or could not run (how, for the log).
    Failed(String),
}

/// After a (possible) reboot: which image runs? Answered with what
/// happened (`Booted`, `Stranded`, `NotRebooted`, `RebootPending`,
/// `NotCommitted`), not sent as a [`JobEvent`], so the Upgrade actor knows
/// when the check is over.
#[derive(Message, Debug)]
#[rtype(result = "Event")]
pub struct CheckBoot {
    pub job: JobId,
    pub firmware: Firmware,
    /// Whether the machine booted since the image was installed, by the
    /// boot id (`None`: not known). What `command:` goes by; `ab:` reads
    /// its boot-control record instead.
    pub rebooted: Option<bool>,
}

/// The owner of the flash target: staging, the writes, every write of the
/// boot-control record, the reboot and the boot check.
pub struct Flash {
    spec: FlashSpec,
    options: FlashOptions,
    staging: Staging,
    events: Recipient<JobEvent>,
}

impl Flash {
    pub fn new(
        spec: FlashSpec,
        options: FlashOptions,
        staging: Staging,
        events: Recipient<JobEvent>,
    ) -> Self {
        Flash {
            spec,
            options,
            staging,
            events,
        }
    }
}

impl Actor for Flash {
    type Context = Context<Self>;

    /// An installer that outlived an agent that died (kill -9, a crash)
    /// is ended before anything else happens: whether its upgrade goes on
    /// or not, it must not write beside the next one.
    fn started(&mut self, _ctx: &mut Context<Self>) {
        if let FlashSpec::Command(_) = self.spec {
            if let Err(e) = GroupLock::take(&self.staging.installer_lock()) {
                tracing::error!(error = %e, "cannot take the installer lock");
            }
        }
    }
}

pub(super) fn flash_failure(what: &str, path: &Path, e: impl fmt::Display) -> Failure {
    Failure::new(
        result_no::FLASH_FAILED,
        format!("{what} {}: {e}", path.display()),
        false,
    )
}

fn ab_failure(e: ab::AbError) -> Failure {
    Failure::new(result_no::FLASH_FAILED, e.to_string(), false)
}

/// Put `image` into the inactive slot of `dir`, then switch next-boot to it
/// with `tries` trial boots. Returns the slot.
///
/// An image the download streamed into that slot (docs/AB-SLOTS.md) is
/// already written, fsynced and read back; it is fsynced once more and the
/// switch follows. Any other image (in the state directory) is copied in
/// first, with every reference to the slot cleared while it is written.
pub fn flash_ab(
    dir: &Path,
    image: &Path,
    firmware: &Firmware,
    tries: u32,
) -> Result<Slot, Failure> {
    let slots = Slots::load(dir).map_err(ab_failure)?;
    let mut record = BootControl::load_or_create(dir).map_err(ab_failure)?;
    if let Some(trial) = record.trial.as_ref().filter(|t| t.md5 == firmware.md5) {
        if record.booted == trial.slot && record.active != trial.slot {
            // Power was lost after the switch, before it was recorded, and the
            // bootloader has taken the trial: the switch stands.
            tracing::info!(slot = %trial.slot, "the device already runs the new slot on a trial boot");
            return Ok(trial.slot);
        }
    }
    let target = record.inactive().map_err(ab_failure)?;
    let path = slots.path(target);
    if image == path {
        if !record.holds(target, &firmware.md5, None) {
            return Err(Failure::new(
                result_no::FLASH_FAILED,
                format!("slot {target} no longer holds the verified image: its boot-control record changed during the upgrade"),
                false,
            ));
        }
        // Verification hashed the slot as read back from the medium, range
        // by range after each fsync (super::verify): what it verified is
        // what the medium holds. A slot file the download created gets its
        // directory entry made durable before anything points at it.
        let slot = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| flash_failure("cannot open", path, e))?;
        slot.sync_all()
            .map_err(|e| flash_failure("cannot fsync", path, e))?;
        if slot.metadata().is_ok_and(|m| m.is_file()) {
            sync_parent(path)?;
        }
        tracing::info!(slot = %target, path = %path.display(), "the slot holds the verified image (verified as read back from the medium)");
    } else {
        if record.forget(target) {
            record.store(dir, "").map_err(ab_failure)?;
        }
        tracing::info!(slot = %target, path = %path.display(), "writing the inactive slot");
        write_slot(image, path, firmware)?;
    }
    crash::point("after-slot-write");
    record.md5.set(target, Some(firmware.md5.clone()));
    record.next = Some(target);
    record.tries = tries;
    record.trial = Some(Trial {
        slot: target,
        md5: firmware.md5.clone(),
    });
    record.writing = None;
    record
        .store(dir, "before-switch-rename")
        .map_err(ab_failure)?;
    tracing::info!(slot = %target, tries, "slot written and read back; next boot switched to it");
    Ok(target)
}

/// The boot check's answer when the new slot did not make it.
fn rejected(detail: String) -> Event {
    Event::Booted { ok: false, detail }
}

/// Does the device run a slot its bootloader will not boot again?
fn stranded(record: &BootControl) -> bool {
    record.booted != record.active && record.next != Some(record.booted)
}

/// The new slot did not make it, as `record` now stands: a device that runs
/// a slot its bootloader will not boot again is stranded (rebooted).
fn rejected_by(record: &BootControl, detail: String) -> Event {
    if stranded(record) {
        Event::Stranded { detail }
    } else {
        rejected(detail)
    }
}

impl Flash {
    fn check_ab(&self, dir: &Path, firmware: &Firmware) -> Event {
        let record = match BootControl::load(dir) {
            Ok(Some(r)) => r,
            Ok(None) => {
                return rejected(format!(
                    "no boot-control record {}",
                    dir.join(ab::RECORD).display()
                ))
            }
            Err(e) => return rejected(e.to_string()),
        };
        let verdict = ab::decide(&record, &firmware.md5);
        tracing::info!(?verdict, active = %record.active, booted = %record.booted, "boot checked");
        match verdict {
            Verdict::NotRebooted { slot } => {
                self.not_rebooted(format!("the device has not rebooted into slot {slot}"))
            }
            Verdict::Committed { slot } => Event::Booted {
                ok: true,
                detail: format!("slot {slot} is active"),
            },
            Verdict::FellBack { detail, .. } | Verdict::Rejected { detail } => {
                rejected_by(&record, detail)
            }
            Verdict::TrialBooted { slot } => self.settle_trial(dir, record, slot, firmware),
        }
    }

    /// No reboot since the new image was put in place: asked for again, or,
    /// when someone else reboots, waited for (no failed check).
    fn not_rebooted(&self, detail: String) -> Event {
        match self.options.reboot_command {
            Some(_) => Event::NotRebooted { detail },
            None => Event::RebootPending {
                detail: format!("{detail}; no reboot command is configured"),
            },
        }
    }

    /// `command:` after the installer: once the machine has booted since,
    /// the commit command confirms the new image (exit 0) or not (51).
    fn check_installed(&self, commit: &str, rebooted: Option<bool>, firmware: &Firmware) -> Event {
        if rebooted == Some(false) {
            return self
                .not_rebooted("the machine has not rebooted since the installer ran".into());
        }
        let envs = command::firmware_env(firmware);
        let timeout = self.options.command_timeout;
        let lock = self.staging.installer_lock();
        match run_shell_exclusive(&lock, "commit", commit, &envs, timeout, "mid-commit") {
            Ok(ran) if ran.success() => Event::Booted {
                ok: true,
                detail: "rebooted; the commit command confirmed the new image".into(),
            },
            Ok(ran) => Event::NotCommitted {
                detail: format!(
                    "rebooted, but the commit command failed: {}",
                    ran.describe(timeout)
                ),
            },
            Err(e) => Event::NotCommitted {
                detail: format!("rebooted, but the commit command cannot run: {e}"),
            },
        }
    }

    /// The new slot runs on a trial boot: run the health check, then commit
    /// the slot, or turn the next boot back to the old one.
    fn settle_trial(
        &self,
        dir: &Path,
        mut record: BootControl,
        slot: Slot,
        firmware: &Firmware,
    ) -> Event {
        if let Some(health) = &self.options.health_command {
            let envs = [
                ("FWAGENT_SLOT", slot.to_string()),
                ("FWAGENT_MD5", firmware.md5.clone()),
            ];
            let timeout = self.options.command_timeout;
            let why = match run_shell("health", health, &envs, timeout, "mid-health") {
                Ok(ran) if ran.success() => None,
                Ok(ran) => Some(ran.describe(timeout)),
                Err(e) => Some(format!("cannot run it: {e}")),
            };
            if let Some(why) = why {
                // Back to the old slot on the next boot.
                record.next = None;
                record.tries = 0;
                let detail = match record.store(dir, "before-reject-rename") {
                    Ok(()) => format!(
                        "slot {slot} booted but its health check failed: {why}; slot {} stays active",
                        record.active
                    ),
                    Err(e) => format!("slot {slot} booted but its health check failed: {why}; and {e}"),
                };
                return rejected_by(&record, detail);
            }
        }
        record.active = slot;
        record.next = None;
        record.tries = 0;
        record.trial = None;
        if let Err(e) = record.store(dir, "before-commit-rename") {
            return rejected(format!("slot {slot} booted but cannot be committed: {e}"));
        }
        crash::point("after-boot-commit");
        tracing::info!(%slot, "new slot committed");
        Event::Booted {
            ok: true,
            detail: format!("slot {slot} booted and committed"),
        }
    }
}

impl Handler<FlashImage> for Flash {
    type Result = ();

    fn handle(&mut self, msg: FlashImage, _ctx: &mut Context<Self>) {
        tracing::info!(job = msg.job, target = %self.spec, "flashing");
        let image = self.staging.image(msg.job, &msg.firmware);
        if let Err(e) = std::fs::metadata(&image) {
            if e.kind() == std::io::ErrorKind::NotFound {
                // Verified, then lost (a power cut took its directory entry,
                // someone removed it): fetch it again rather than fail.
                let detail = format!("the image {} is gone: {e}", image.display());
                let event = Event::ImageMissing { detail };
                return self.events.do_send(JobEvent {
                    job: msg.job,
                    event,
                });
            }
        }
        let done = match &self.spec {
            FlashSpec::File(target) => write_file(&image, target, &msg.firmware).map(|()| false),
            FlashSpec::Ab(dir) => {
                flash_ab(dir, &image, &msg.firmware, self.options.boot_tries).map(|_| true)
            }
            FlashSpec::Command(cmd) => {
                let lock = self.staging.installer_lock();
                let timeout = self.options.command_timeout;
                install(cmd, &image, &msg.firmware, timeout, &lock)
                    .map(|()| self.options.commit_command.is_some())
            }
        };
        let event = match done {
            Ok(reboot) => {
                crash::point("after-flash");
                Event::Flashed { reboot }
            }
            Err(failure) => Event::FlashFailed { failure },
        };
        self.events.do_send(JobEvent {
            job: msg.job,
            event,
        });
    }
}

impl Handler<RequestReboot> for Flash {
    type Result = MessageResult<RequestReboot>;

    fn handle(&mut self, msg: RequestReboot, _ctx: &mut Context<Self>) -> Self::Result {
        let record = match &self.spec {
            FlashSpec::Ab(dir) => BootControl::load(dir).ok().flatten(),
            FlashSpec::File(_) | FlashSpec::Command(_) => None,
        };
        if msg.leave_rejected {
            if !record.as_ref().is_some_and(stranded) {
                return MessageResult(Rebooting::Asked);
            }
            tracing::warn!(
                job = msg.job,
                "the device runs the rejected slot; rebooting into the good one"
            );
        } else if let Some(record) = &record {
            if let Verdict::TrialBooted { slot } | Verdict::Committed { slot } =
                ab::decide(record, &msg.md5)
            {
                tracing::info!(job = msg.job, %slot, "the device already runs the new slot; no reboot needed");
                return MessageResult(Rebooting::AlreadyRuns);
            }
        }
        let Some(cmd) = &self.options.reboot_command else {
            tracing::warn!(
                job = msg.job,
                "no reboot command is configured; waiting for the device to be rebooted"
            );
            return MessageResult(Rebooting::Asked);
        };
        crash::point("before-reboot");
        tracing::info!(job = msg.job, command = %cmd, "requesting the reboot");
        let timeout = self.options.command_timeout;
        let failed = match run_shell("reboot", cmd, &[], timeout, "") {
            Ok(ran) if ran.success() => {
                tracing::info!(job = msg.job, "reboot requested");
                return MessageResult(Rebooting::Asked);
            }
            Ok(ran) => format!("the reboot command failed: {}", ran.describe(timeout)),
            Err(e) => format!("cannot run the reboot command: {e}"),
        };
        tracing::error!(job = msg.job, "{failed}");
        MessageResult(Rebooting::Failed(failed))
    }
}

impl Handler<CheckBoot> for Flash {
    type Result = MessageResult<CheckBoot>;

    fn handle(&mut self, msg: CheckBoot, _ctx: &mut Context<Self>) -> Self::Result {
        let check = match (&self.spec, &self.options.commit_command) {
            (FlashSpec::Ab(dir), _) => self.check_ab(dir, &msg.firmware),
            (FlashSpec::Command(_), Some(commit)) => {
                self.check_installed(commit, msg.rebooted, &msg.firmware)
            }
            (FlashSpec::File(_) | FlashSpec::Command(_), _) => rejected(format!(
                "the flash backend {} cannot check which image booted",
                self.spec
            )),
        };
        tracing::info!(job = msg.job, ?check, "boot check done");
        MessageResult(check)
    }
}

#[cfg(test)]
mod tests {
    use super::super::verify::{hash_prefix, hex_digest};
    use super::*;
    use crate::exec::shell_quote;
    use md5::{Digest, Md5};

    #[test]
    fn flash_specs_parse_and_print_back() {
        for s in [
            "file:/dev/mmcblk0p3",
            "ab:/var/lib/fwagent/slots",
            "command:rauc install {image}",
        ] {
            let spec: FlashSpec = s.parse().expect(s);
            assert_eq!(spec.to_string(), s);
        }
        assert_eq!(
            "command:swupdate -i {image} -e a:b".parse::<FlashSpec>(),
            Ok(FlashSpec::Command("swupdate -i {image} -e a:b".into()))
        );
        for bad in ["file:", "ab:", "command: ", "tftp:x", "/dev/sda"] {
            assert!(bad.parse::<FlashSpec>().is_err(), "{bad}");
        }
    }

    fn image(dir: &Path, bytes: &[u8]) -> (PathBuf, Firmware) {
        let path = dir.join("image");
        std::fs::write(&path, bytes).expect("write image");
        let (md5, _) = hash_prefix(&path, bytes.len() as u64).expect("hash");
        let firmware = Firmware {
            name: "image".into(),
            md5: hex_digest(md5),
            size: bytes.len() as u64,
            signature: None,
        };
        (path, firmware)
    }

    #[test]
    fn a_file_target_is_written_read_back_and_never_created() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (img, fw) = image(dir.path(), b"new image");
        let target = dir.path().join("mmcblk0p3");
        let failure = write_file(&img, &target, &fw).expect_err("no target");
        assert_eq!(failure.error_no, result_no::FLASH_FAILED);
        assert!(
            failure.description.contains("does not exist"),
            "{}",
            failure.description
        );
        assert!(!target.exists(), "not created");
        assert!(file_target(dir.path()).is_err(), "a directory");
        assert!(
            file_target(Path::new("/dev/null")).is_err(),
            "a character device"
        );
        std::fs::write(&target, b"an older, longer image").expect("write");
        assert!(matches!(file_target(&target), Ok(FileTarget::Regular)));
        write_file(&img, &target, &fw).expect("flashed");
        assert_eq!(std::fs::read(&target).expect("read"), b"new image");
    }

    #[test]
    fn an_image_of_several_read_back_ranges_is_written_whole() {
        let dir = tempfile::tempdir().expect("temp dir");
        let len = (file::READ_BACK_RANGE * 5 / 2) as usize + 12345;
        let bytes: Vec<u8> = (0..len).map(|i| (i * 13 % 251) as u8).collect();
        let (img, fw) = image(dir.path(), &bytes);
        let target = dir.path().join("mmcblk0p3");
        std::fs::write(&target, vec![0xffu8; len + 4096]).expect("an older, longer image");
        write_file(&img, &target, &fw).expect("flashed");
        assert!(std::fs::read(&target).expect("read") == bytes);
        // The image file is not what was verified: the read-back says so.
        let wrong = Firmware {
            md5: "0".repeat(32),
            ..fw
        };
        let failure = write_file(&img, &target, &wrong).expect_err("md5 differs");
        assert_eq!(failure.error_no, result_no::FLASH_FAILED);
        assert!(
            failure.description.contains("read-back")
                && failure.description.contains(&fw_md5(&bytes)),
            "{}",
            failure.description
        );
    }

    fn fw_md5(bytes: &[u8]) -> String {
        hex_digest(Md5::new_with_prefix(bytes))
    }

    #[test]
    fn ab_writes_the_inactive_slot_and_switches_next_boot() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (img, fw) = image(dir.path(), b"new image");
        let slots = dir.path().join("slots");
        std::fs::create_dir(&slots).expect("mkdir");
        std::fs::write(slots.join("slot-a"), b"running image").expect("write a");
        assert_eq!(flash_ab(&slots, &img, &fw, 3), Ok(Slot::B));
        assert_eq!(
            std::fs::read(slots.join("slot-a")).expect("a"),
            b"running image"
        );
        assert_eq!(
            std::fs::read(slots.join("slot-b")).expect("b"),
            b"new image"
        );
        let r = BootControl::load(&slots).expect("loads").expect("exists");
        assert_eq!(
            (r.active, r.next, r.tries, r.booted),
            (Slot::A, Some(Slot::B), 3, Slot::A)
        );
        assert_eq!(r.md5.get(Slot::B), Some(fw.md5.as_str()));
        // Again (a restart of flashing): same slot, same record.
        assert_eq!(flash_ab(&slots, &img, &fw, 3), Ok(Slot::B));
        assert_eq!(BootControl::load(&slots).expect("loads"), Some(r));
    }

    #[test]
    fn ab_switches_to_a_slot_the_download_streamed_into_without_rewriting_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        let d = dir.path();
        let (_, fw) = image(d, b"new image");
        let (slot, resumable) = ab::stage(d, 3, &fw.md5, fw.size, false).expect("staged");
        assert!(!resumable);
        std::fs::write(&slot, b"new image").expect("the download");
        assert_eq!(flash_ab(d, &slot, &fw, 2), Ok(Slot::B));
        let r = BootControl::load(d).expect("loads").expect("exists");
        assert_eq!(
            (r.next, r.tries, r.writing.clone()),
            (Some(Slot::B), 2, None)
        );
        assert_eq!(r.md5.get(Slot::B), Some(fw.md5.as_str()));
        // Flashing again after a crash finds the switch made: same record.
        assert_eq!(ab::staged(d, 3, &fw.md5), Some(slot.clone()));
        assert_eq!(flash_ab(d, &slot, &fw, 2), Ok(Slot::B));
        assert_eq!(BootControl::load(d).expect("loads"), Some(r));
    }

    #[test]
    fn ab_will_not_switch_to_a_streamed_slot_it_no_longer_owns() {
        let dir = tempfile::tempdir().expect("temp dir");
        let d = dir.path();
        let (_, fw) = image(d, b"new image");
        let (slot, _) = ab::stage(d, 3, &fw.md5, fw.size, false).expect("staged");
        std::fs::write(&slot, b"new image").expect("the download");
        ab::unstage(d, None).expect("someone cleared the note");
        let failure = flash_ab(d, &slot, &fw, 2).expect_err("refused");
        assert_eq!(failure.error_no, result_no::FLASH_FAILED);
        let r = BootControl::load(d).expect("loads").expect("exists");
        assert_eq!((r.next, r.trial), (None, None));
    }

    #[test]
    fn ab_refuses_when_both_slots_are_in_use() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (img, fw) = image(dir.path(), b"new image");
        let record = BootControl {
            booted: Slot::B,
            ..BootControl::fresh()
        };
        record.store(dir.path(), "").expect("store");
        let failure = flash_ab(dir.path(), &img, &fw, 3).expect_err("refused");
        assert_eq!(failure.error_no, result_no::FLASH_FAILED);
        assert!(!dir.path().join("slot-a").exists() && !dir.path().join("slot-b").exists());
    }

    /// Start a Flash actor for `spec` on its own arbiter (as the agent
    /// does), with the state directory `state`, have it flash job 9 and
    /// return the event it reports.
    async fn flash_once(spec: FlashSpec, state: &Path, firmware: &Firmware) -> Event {
        let (events, mut rx) = super::super::stand_in::events();
        let options = FlashOptions {
            reboot_command: None,
            ..FlashOptions::default()
        };
        let paths = crate::runtime::Paths {
            state_dir: state.to_path_buf(),
        };
        let staging = Staging::new(paths, &spec);
        let flash = Flash::start_in_arbiter(&Arbiter::new().handle(), move |_| {
            Flash::new(spec, options, staging, events)
        });
        let msg = FlashImage {
            job: 9,
            firmware: firmware.clone(),
        };
        flash.send(msg).await.expect("handled");
        let event = super::super::stand_in::next_event(&mut rx).await;
        assert_eq!(event.job, 9);
        event.event
    }

    #[actix::test]
    async fn the_flash_actor_reports_flashed_failed_or_missing() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (img, fw) = image(dir.path(), b"new image");
        // Job 9's image where the download leaves it.
        let state = dir.path().join("state");
        std::fs::create_dir_all(state.join("downloads")).expect("mkdir");
        std::fs::copy(&img, state.join("downloads/9.part")).expect("the image");
        let target = dir.path().join("mmcblk0p3");
        std::fs::write(&target, b"old").expect("target");
        let file = FlashSpec::File(target.clone());
        assert_eq!(
            flash_once(file.clone(), &state, &fw).await,
            Event::Flashed { reboot: false }
        );
        assert_eq!(std::fs::read(&target).expect("read"), b"new image");

        // An image gone since it was verified: fetch it again, not 50.
        let gone = dir.path().join("gone");
        let event = flash_once(file.clone(), &gone, &fw).await;
        assert!(matches!(event, Event::ImageMissing { .. }), "{event:?}");

        // A target that does not match after the write: 50.
        let wrong = Firmware {
            md5: "0".repeat(32),
            ..fw.clone()
        };
        match flash_once(file, &state, &wrong).await {
            Event::FlashFailed { failure } => {
                assert_eq!(failure.error_no, result_no::FLASH_FAILED)
            }
            other => panic!("not a failed flash: {other:?}"),
        }

        // A/B: the slot written, next-boot switched, a reboot wanted.
        let slots = dir.path().join("slots");
        std::fs::create_dir(&slots).expect("mkdir");
        let ab = FlashSpec::Ab(slots.clone());
        assert_eq!(
            flash_once(ab, &state, &fw).await,
            Event::Flashed { reboot: true }
        );
        assert_eq!(
            std::fs::read(slots.join("slot-b")).expect("slot b"),
            b"new image"
        );
    }

    #[test]
    fn the_installer_gets_the_image_and_its_failure_is_50() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (img, fw) = image(dir.path(), b"payload");
        let out = dir.path().join("installed");
        let cmd = format!("cp {{image}} {}", shell_quote(&out.to_string_lossy()));
        let lock = dir.path().join("installer.lock");
        install(&cmd, &img, &fw, Duration::from_secs(10), &lock).expect("installs");
        assert_eq!(std::fs::read(&out).expect("copied"), b"payload");
        let failure =
            install("false", &img, &fw, Duration::from_secs(10), &lock).expect_err("fails");
        assert_eq!(failure.error_no, result_no::FLASH_FAILED);
        assert!(
            failure.description.contains("exit status 1"),
            "{}",
            failure.description
        );
    }
}
