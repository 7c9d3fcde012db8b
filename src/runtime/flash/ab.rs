//! `--flash ab:DIR`: two slots and the boot-control record that stands in
//! for the bootloader's environment (docs/AB-SLOTS.md has the format).
//!
//! The agent writes only the slot that is neither active nor booted, reads
//! it back from the medium (its cached pages dropped first), and only then
//! points next-boot at it with a number of tries.
//! After the reboot, [`decide`] reads the record and says what happened: the
//! new slot booted (health check, then commit), the bootloader fell back, or
//! the reboot has not happened yet. Every change of the record is atomic:
//! temporary file, fsync, rename, fsync of the directory.

use crate::{crash, fsutil};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// The record's file name in DIR.
pub const RECORD: &str = "bootctl.json";
/// Its temporary name while it is rewritten.
const RECORD_TMP: &str = ".bootctl.json.tmp";
/// Optional: the slots' paths (block devices), instead of DIR/slot-a and DIR/slot-b.
pub const SLOTS_CONFIG: &str = "slots.toml";
/// The record's format version.
pub const VERSION: u32 = 1;

/// Why the slots or the record could not be used.
#[derive(Debug, thiserror::Error)]
pub enum AbError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{path}: {reason}")]
    Format { path: PathBuf, reason: String },
    /// The record forbids the write (both slots in use, or the slot no
    /// longer holds what the upgrade wrote).
    #[error("{0}")]
    Refused(String),
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> AbError + 'a {
    move |source| AbError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Slot {
    A,
    B,
}

impl Slot {
    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Slot::A => "a",
            Slot::B => "b",
        })
    }
}

/// What the agent wrote into each slot (lowercase hex md5), `null` when
/// unknown or while the slot is being written.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotImages {
    #[serde(default)]
    pub a: Option<String>,
    #[serde(default)]
    pub b: Option<String>,
}

impl SlotImages {
    pub fn get(&self, slot: Slot) -> Option<&str> {
        match slot {
            Slot::A => self.a.as_deref(),
            Slot::B => self.b.as_deref(),
        }
    }

    pub fn set(&mut self, slot: Slot, md5: Option<String>) {
        match slot {
            Slot::A => self.a = md5,
            Slot::B => self.b = md5,
        }
    }
}

/// The trial boot the agent asked for: which slot, holding which image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trial {
    pub slot: Slot,
    pub md5: String,
}

/// The upgrade whose download is streaming into a slot: noted before the
/// first byte goes in, so a restart knows the bytes there are that upgrade's
/// and resumes them; cleared when next-boot is switched to the slot or the
/// upgrade ends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Writing {
    pub slot: Slot,
    /// The agent's upgrade number (`job` in `fwagent status --json`).
    pub job: u64,
    pub md5: String,
    pub size: u64,
}

/// `DIR/bootctl.json`. `active`, `next`, `tries` and `booted` are the
/// bootloader's environment; `md5`, `trial` and `writing` are the agent's
/// own notes.
/// Keys it does not know are kept as they are.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootControl {
    pub version: u32,
    /// The committed slot: booted whenever no trial is pending.
    pub active: Slot,
    /// The slot to try on the next boots, while `tries` > 0.
    pub next: Option<Slot>,
    /// Trial boots left; the bootloader takes one per boot of `next`.
    pub tries: u32,
    /// The slot the running system was booted from (set by the bootloader).
    pub booted: Slot,
    #[serde(default)]
    pub md5: SlotImages,
    #[serde(default)]
    pub trial: Option<Trial>,
    #[serde(default)]
    pub writing: Option<Writing>,
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

impl BootControl {
    /// A device that runs slot `a` and has never been upgraded.
    pub fn fresh() -> Self {
        BootControl {
            version: VERSION,
            active: Slot::A,
            next: None,
            tries: 0,
            booted: Slot::A,
            md5: SlotImages::default(),
            trial: None,
            writing: None,
            other: serde_json::Map::new(),
        }
    }

    /// The record, or a fresh one (stored) when there is none.
    pub(super) fn load_or_create(dir: &Path) -> Result<Self, AbError> {
        if let Some(record) = Self::load(dir)? {
            return Ok(record);
        }
        tracing::info!(dir = %dir.display(), "no boot-control record; creating one with slot a active");
        let fresh = BootControl::fresh();
        fresh.store(dir, "")?;
        Ok(fresh)
    }

    /// Whether `slot` holds (or is receiving) image `md5` for an upgrade
    /// (`job`, when given): the upgrade is `writing` it, or a trial of the
    /// image in it is pending.
    pub fn holds(&self, slot: Slot, md5: &str, job: Option<u64>) -> bool {
        let writing = self
            .writing
            .as_ref()
            .is_some_and(|w| w.slot == slot && w.md5 == md5 && job.map_or(true, |j| j == w.job));
        let trial = self
            .trial
            .as_ref()
            .is_some_and(|t| t.slot == slot && t.md5 == md5 && slot != self.active);
        writing || trial
    }

    /// The slot an upgrade may write: neither the active nor the booted one.
    pub fn inactive(&self) -> Result<Slot, AbError> {
        if self.booted != self.active {
            return Err(AbError::Refused(format!(
                "slot {} runs but slot {} is active: both are in use; reboot into slot {} first",
                self.booted, self.active, self.active
            )));
        }
        Ok(self.active.other())
    }

    /// Forget everything about `slot` before it is overwritten, so nothing
    /// boots it, nor takes it for a known image, while it is written.
    /// Returns whether anything changed.
    pub fn forget(&mut self, slot: Slot) -> bool {
        let knows = self.md5.get(slot).is_some()
            || self.next.is_some()
            || self.trial.is_some()
            || self.writing.is_some();
        self.md5.set(slot, None);
        self.next = None;
        self.tries = 0;
        self.trial = None;
        self.writing = None;
        knows
    }

    /// Read `DIR/bootctl.json`; `None` when there is none.
    pub fn load(dir: &Path) -> Result<Option<Self>, AbError> {
        let path = dir.join(RECORD);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("cannot read", &path)(e)),
        };
        let record: BootControl = serde_json::from_slice(&bytes).map_err(|e| AbError::Format {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        if record.version != VERSION {
            return Err(AbError::Format {
                path,
                reason: format!("version {} is not {VERSION}", record.version),
            });
        }
        Ok(Some(record))
    }

    /// Replace `DIR/bootctl.json` atomically. `crash_at` names the crash
    /// point between the fsynced temporary file and the rename.
    ///
    /// Only the `flash` module writes the record (the visibility says so),
    /// and only on the Flash actor's thread: staging, clean-up, the switch
    /// and the commit are all its messages.
    pub(super) fn store(&self, dir: &Path, crash_at: &str) -> Result<(), AbError> {
        let path = dir.join(RECORD);
        let tmp = dir.join(RECORD_TMP);
        let mut text = serde_json::to_vec(self).map_err(|e| AbError::Format {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        text.push(b'\n');
        let mut file = std::fs::File::create(&tmp).map_err(io_err("cannot create", &tmp))?;
        file.write_all(&text)
            .map_err(io_err("cannot write", &tmp))?;
        file.sync_all().map_err(io_err("cannot fsync", &tmp))?;
        drop(file);
        crash::point(crash_at);
        std::fs::rename(&tmp, &path).map_err(io_err("cannot rename into place", &path))?;
        fsutil::sync_dir(dir).map_err(io_err("cannot fsync the directory", dir))?;
        Ok(())
    }
}

/// `DIR/slots.toml`: `a = "/dev/mmcblk0p2"`, `b = "/dev/mmcblk0p3"`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SlotsConfig {
    a: PathBuf,
    b: PathBuf,
}

/// Where the two slots are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Slots {
    pub a: PathBuf,
    pub b: PathBuf,
}

impl Slots {
    /// From `DIR/slots.toml` if there is one (relative paths are relative to
    /// DIR), else `DIR/slot-a` and `DIR/slot-b`.
    pub fn load(dir: &Path) -> Result<Self, AbError> {
        let path = dir.join(SLOTS_CONFIG);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Ok(Slots {
                    a: dir.join("slot-a"),
                    b: dir.join("slot-b"),
                })
            }
            Err(e) => return Err(io_err("cannot read", &path)(e)),
        };
        let config: SlotsConfig = toml::from_str(&text).map_err(|e| AbError::Format {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        if config.a == config.b {
            return Err(AbError::Format {
                path,
                reason: "slots a and b are the same path".into(),
            });
        }
        Ok(Slots {
            a: dir.join(config.a),
            b: dir.join(config.b),
        })
    }

    pub fn path(&self, slot: Slot) -> &Path {
        match slot {
            Slot::A => &self.a,
            Slot::B => &self.b,
        }
    }
}

/// Before a download streams the image of upgrade `job` into the inactive
/// slot: the slot's path, and whether the bytes already there are this
/// upgrade's (its durable prefix may be resumed; never with `fresh`). Unless
/// they are, every reference to the slot is cleared and the upgrade noted as
/// `writing` in one atomic write, before the first byte goes in.
pub(super) fn stage(
    dir: &Path,
    job: u64,
    md5: &str,
    size: u64,
    fresh: bool,
) -> Result<(PathBuf, bool), AbError> {
    let slots = Slots::load(dir)?;
    let mut record = BootControl::load_or_create(dir)?;
    let target = record.inactive()?;
    let ours = Writing {
        slot: target,
        job,
        md5: md5.to_string(),
        size,
    };
    let resumable = !fresh && record.writing.as_ref() == Some(&ours) && record.next.is_none();
    if !resumable {
        record.forget(target);
        record.writing = Some(ours);
        record.store(dir, "")?;
        tracing::info!(slot = %target, job, "the download goes straight into the inactive slot");
    }
    Ok((slots.path(target).to_path_buf(), resumable))
}

/// The slot holding (or receiving) upgrade `job`'s image `md5`: the one it
/// is `writing`, or the one next-boot was switched to for it. `None`: the
/// image is not in a slot.
pub fn staged(dir: &Path, job: u64, md5: &str) -> Option<PathBuf> {
    let record = BootControl::load(dir).ok()??;
    let slot = [Slot::A, Slot::B]
        .into_iter()
        .find(|&slot| record.holds(slot, md5, Some(job)))?;
    Some(Slots::load(dir).ok()?.path(slot).to_path_buf())
}

/// Upgrade `job` is over (or no longer under way): drop its `writing` note.
/// The slot keeps its bytes; nothing points at it.
pub(super) fn unstage(dir: &Path, job: Option<u64>) -> Result<(), AbError> {
    let Some(mut record) = BootControl::load(dir)? else {
        return Ok(());
    };
    match &record.writing {
        Some(w) if job.map_or(true, |j| j == w.job) => {
            tracing::info!(slot = %w.slot, job = w.job, "upgrade no longer writing its slot");
            record.writing = None;
            record.store(dir, "")
        }
        Some(_) | None => Ok(()),
    }
}

/// The upgrade of image `md5` is over (`None`: no upgrade is past its
/// download): take back a trial boot still pending for it, so the device
/// never boots an image the cloud was told failed. The slot keeps its bytes
/// and its `md5`; nothing points at it. Returns whether there was one.
pub(super) fn withdraw_trial(dir: &Path, md5: Option<&str>) -> Result<bool, AbError> {
    let Some(mut record) = BootControl::load(dir)? else {
        return Ok(false);
    };
    let pending = match &record.trial {
        Some(t) if md5.map_or(true, |m| m == t.md5) && t.slot != record.active => t.slot,
        Some(_) | None => return Ok(false),
    };
    if record.next == Some(pending) {
        record.next = None;
        record.tries = 0;
    }
    record.trial = None;
    record.store(dir, "")?;
    tracing::info!(slot = %pending, "trial boot withdrawn; slot {} boots next", record.active);
    Ok(true)
}

/// The largest image the inactive slot takes: a block device's size, or a
/// file's length plus the free space beside it. `None` when unknown.
pub fn room(dir: &Path) -> Option<u64> {
    let slots = Slots::load(dir).ok()?;
    let record = BootControl::load(dir)
        .ok()?
        .unwrap_or_else(BootControl::fresh);
    let path = slots.path(record.inactive().ok()?);
    let held = match std::fs::metadata(path) {
        Ok(m) if !m.is_file() => return device_size(path).ok(),
        Ok(m) => m.len(),
        Err(_) => 0,
    };
    let beside = path.parent().unwrap_or(dir);
    Some(held + fsutil::free_bytes(beside).ok()?)
}

/// A block device's size (its metadata says 0).
pub fn device_size(path: &Path) -> io::Result<u64> {
    use std::io::Seek;
    std::fs::File::open(path)?.seek(io::SeekFrom::End(0))
}

/// What the record says after a (possible) reboot, for the image `md5`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Next-boot still points at the new slot with tries left, but the old
    /// one runs: the reboot has not happened yet.
    NotRebooted { slot: Slot },
    /// The new slot runs on a trial boot: check its health, then commit.
    TrialBooted { slot: Slot },
    /// The new slot is already the active one and runs (a crash after the
    /// commit).
    Committed { slot: Slot },
    /// The bootloader ran out of tries and booted the old slot.
    FellBack { slot: Slot, detail: String },
    /// Anything else: the new image is not running and will not be.
    Rejected { detail: String },
}

/// Read the record after a (possible) reboot.
pub fn decide(record: &BootControl, md5: &str) -> Verdict {
    match &record.trial {
        Some(trial) if trial.md5 == md5 => {
            let slot = trial.slot;
            if record.booted == slot {
                if record.next == Some(slot) {
                    Verdict::TrialBooted { slot }
                } else if record.active == slot {
                    Verdict::Committed { slot }
                } else {
                    Verdict::Rejected {
                        detail: format!(
                            "slot {slot} booted but next-boot no longer points at it (its health check failed); slot {} stays active",
                            record.active
                        ),
                    }
                }
            } else if record.next == Some(slot) && record.tries > 0 {
                Verdict::NotRebooted { slot }
            } else {
                Verdict::FellBack {
                    slot: record.booted,
                    detail: format!(
                        "slot {slot} did not boot within its tries; the bootloader fell back to slot {}",
                        record.booted
                    ),
                }
            }
        }
        Some(_) | None => {
            if record.booted == record.active && record.md5.get(record.active) == Some(md5) {
                Verdict::Committed {
                    slot: record.active,
                }
            } else {
                Verdict::Rejected {
                    detail: format!(
                        "no trial boot of this image is pending; slot {} runs and slot {} is active",
                        record.booted, record.active
                    ),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NEW: &str = "0123456789abcdef0123456789abcdef";
    const OLD: &str = "fedcba9876543210fedcba9876543210";

    /// Slot b written with NEW and switched to, three tries.
    fn switched() -> BootControl {
        BootControl {
            next: Some(Slot::B),
            tries: 3,
            md5: SlotImages {
                a: Some(OLD.into()),
                b: Some(NEW.into()),
            },
            trial: Some(Trial {
                slot: Slot::B,
                md5: NEW.into(),
            }),
            ..BootControl::fresh()
        }
    }

    /// The bootloader stand-in of docs/AB-SLOTS.md.
    fn boot(r: &mut BootControl) {
        match r.next {
            Some(next) if r.tries > 0 => {
                r.tries -= 1;
                r.booted = next;
            }
            _ => {
                r.next = None;
                r.tries = 0;
                r.booted = r.active;
            }
        }
    }

    #[test]
    fn before_the_reboot_the_reboot_is_asked_for_again() {
        assert_eq!(
            decide(&switched(), NEW),
            Verdict::NotRebooted { slot: Slot::B }
        );
    }

    #[test]
    fn a_trial_boot_of_the_new_slot_is_found() {
        let mut r = switched();
        boot(&mut r);
        assert_eq!(decide(&r, NEW), Verdict::TrialBooted { slot: Slot::B });
        // Even on its last try.
        boot(&mut r);
        boot(&mut r);
        assert_eq!(r.tries, 0);
        assert_eq!(decide(&r, NEW), Verdict::TrialBooted { slot: Slot::B });
    }

    #[test]
    fn tries_run_out_and_the_old_slot_boots() {
        let mut r = switched();
        for _ in 0..4 {
            boot(&mut r);
        }
        assert_eq!(r.booted, Slot::A);
        assert!(matches!(
            decide(&r, NEW),
            Verdict::FellBack { slot: Slot::A, .. }
        ));
    }

    #[test]
    fn after_the_commit_the_new_slot_is_committed() {
        let mut r = switched();
        boot(&mut r);
        r.active = Slot::B;
        r.next = None;
        r.tries = 0;
        r.trial = None;
        assert_eq!(decide(&r, NEW), Verdict::Committed { slot: Slot::B });
        // And stays so over later boots.
        boot(&mut r);
        assert_eq!(decide(&r, NEW), Verdict::Committed { slot: Slot::B });
    }

    #[test]
    fn a_failed_health_check_is_a_rejection() {
        let mut r = switched();
        boot(&mut r);
        r.next = None;
        r.tries = 0;
        assert!(matches!(decide(&r, NEW), Verdict::Rejected { .. }));
        boot(&mut r);
        assert!(matches!(
            decide(&r, NEW),
            Verdict::FellBack { slot: Slot::A, .. }
        ));
    }

    #[test]
    fn another_image_is_never_committed() {
        let mut r = switched();
        boot(&mut r);
        assert!(matches!(decide(&r, OLD), Verdict::Rejected { .. }));
        assert!(matches!(
            decide(&BootControl::fresh(), NEW),
            Verdict::Rejected { .. }
        ));
    }

    #[test]
    fn the_record_round_trips_and_keeps_unknown_keys() {
        let dir = tempfile::tempdir().expect("temp dir");
        let text =
            r#"{"version":1,"active":"a","next":"b","tries":2,"booted":"b","vendor":{"x":1}}"#;
        std::fs::write(dir.path().join(RECORD), text).expect("write");
        let r = BootControl::load(dir.path())
            .expect("loads")
            .expect("exists");
        assert_eq!(
            (r.active, r.next, r.tries, r.booted),
            (Slot::A, Some(Slot::B), 2, Slot::B)
        );
        assert_eq!(r.md5, SlotImages::default());
        r.store(dir.path(), "").expect("stores");
        let again = BootControl::load(dir.path())
            .expect("loads")
            .expect("exists");
        assert_eq!(again, r);
        assert_eq!(again.other["vendor"]["x"], 1);
        assert!(!dir.path().join(RECORD_TMP).exists());
    }

    #[test]
    fn bad_records_are_errors_not_panics() {
        let dir = tempfile::tempdir().expect("temp dir");
        assert!(BootControl::load(dir.path())
            .expect("no record is fine")
            .is_none());
        for text in [
            "",
            "{",
            r#"{"version":2,"active":"a","next":null,"tries":0,"booted":"a"}"#,
            r#"{"version":1,"active":"c","next":null,"tries":0,"booted":"a"}"#,
        ] {
            std::fs::write(dir.path().join(RECORD), text).expect("write");
            assert!(
                matches!(BootControl::load(dir.path()), Err(AbError::Format { .. })),
                "{text}"
            );
        }
    }

    #[test]
    fn staging_clears_the_slot_notes_the_upgrade_and_resumes_only_its_own_bytes() {
        let dir = tempfile::tempdir().expect("temp dir");
        let d = dir.path();
        switched().store(d, "").expect("store");
        // A new upgrade: slot b is forgotten before anything is written.
        let (path, resumable) = stage(d, 7, NEW, 100, false).expect("staged");
        assert_eq!((path, resumable), (d.join("slot-b"), false));
        let r = BootControl::load(d).expect("loads").expect("exists");
        assert_eq!((r.next, r.tries, r.trial.clone()), (None, 0, None));
        assert_eq!(r.md5.get(Slot::B), None);
        assert_eq!(r.md5.get(Slot::A), Some(OLD));
        let note = Writing {
            slot: Slot::B,
            job: 7,
            md5: NEW.into(),
            size: 100,
        };
        assert_eq!(r.writing, Some(note));
        assert_eq!(staged(d, 7, NEW), Some(d.join("slot-b")));
        assert_eq!(staged(d, 8, NEW), None, "another upgrade's bytes");
        // The same upgrade after a restart: resumed, record untouched.
        assert!(stage(d, 7, NEW, 100, false).expect("staged").1);
        assert_eq!(BootControl::load(d).expect("loads"), Some(r.clone()));
        // Another upgrade (or image) starts the slot over.
        assert!(!stage(d, 8, NEW, 100, false).expect("staged").1);
        assert!(!stage(d, 8, OLD, 100, false).expect("staged").1);
        // Bytes elsewhere (another --flash ran meanwhile): never resumed.
        assert!(!stage(d, 8, NEW, 100, true).expect("staged").1);
        // Unstaging someone else's note does nothing; its own clears it.
        unstage(d, Some(7)).expect("unstage");
        assert!(BootControl::load(d)
            .expect("loads")
            .expect("exists")
            .writing
            .is_some());
        unstage(d, Some(8)).expect("unstage");
        assert_eq!(
            BootControl::load(d)
                .expect("loads")
                .expect("exists")
                .writing,
            None
        );
        assert_eq!(staged(d, 8, OLD), None);
    }

    #[test]
    fn a_pending_trial_is_withdrawn_for_its_own_image_only() {
        let dir = tempfile::tempdir().expect("temp dir");
        let d = dir.path();
        switched().store(d, "").expect("store");
        assert!(!withdraw_trial(d, Some(OLD)).expect("withdraw"));
        assert_eq!(BootControl::load(d).expect("loads"), Some(switched()));
        assert!(withdraw_trial(d, Some(NEW)).expect("withdraw"));
        let r = BootControl::load(d).expect("loads").expect("exists");
        assert_eq!(
            (r.active, r.next, r.tries, r.trial),
            (Slot::A, None, 0, None)
        );
        assert_eq!(r.md5.get(Slot::B), Some(NEW), "the slot still holds it");
        // After a commit there is nothing to withdraw.
        let mut committed = switched();
        boot(&mut committed);
        committed.active = Slot::B;
        committed.next = None;
        committed.trial = None;
        committed.store(d, "").expect("store");
        assert!(!withdraw_trial(d, None).expect("withdraw"));
    }

    #[test]
    fn nothing_is_staged_while_both_slots_are_in_use() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut r = switched();
        boot(&mut r);
        r.store(dir.path(), "").expect("store");
        assert!(matches!(
            stage(dir.path(), 1, NEW, 10, false),
            Err(AbError::Refused(_))
        ));
        assert_eq!(BootControl::load(dir.path()).expect("loads"), Some(r));
        assert_eq!(room(dir.path()), None);
    }

    #[test]
    fn room_is_the_slot_file_plus_the_free_space_beside_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        let d = dir.path();
        let free = fsutil::free_bytes(d).expect("statvfs");
        std::fs::write(d.join("slot-b"), vec![0u8; 4096]).expect("write");
        let room = room(d).expect("known");
        // Free space moves a little with everything else on the machine.
        assert!(room.abs_diff(free + 4096) < 64 << 20, "{room} vs {free}");
    }

    #[test]
    fn slots_come_from_the_config_or_default_to_two_files() {
        let dir = tempfile::tempdir().expect("temp dir");
        let d = dir.path();
        assert_eq!(Slots::load(d).expect("default").b, d.join("slot-b"));
        std::fs::write(d.join(SLOTS_CONFIG), "a = \"/dev/mmcblk0p2\"\nb = \"p3\"\n")
            .expect("write");
        let s = Slots::load(d).expect("config");
        assert_eq!(s.a, PathBuf::from("/dev/mmcblk0p2"));
        assert_eq!(s.b, d.join("p3"));
        std::fs::write(d.join(SLOTS_CONFIG), "a = \"x\"\nb = \"x\"\n").expect("write");
        assert!(Slots::load(d).is_err());
    }
}
