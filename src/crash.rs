//! Named crash points for the crash tests.
//!
//! `FWAGENT_CRASH_AT=<point>` kills the process with SIGKILL (as a power cut
//! would: no destructors, no flush) the first time execution reaches that
//! point. Unset, every point is one environment lookup, cached. The points:
//!
//! | point | where |
//! |---|---|
//! | `before-request-commit` | a request was read; nothing is committed yet |
//! | `after-accept` | the accept is committed; the ack is not sent yet |
//! | `mid-download` | half the image is written to the partial file (`ab:` the slot), not checkpointed |
//! | `after-checkpoint-fsync` | the partial file (`ab:` the slot) is fsynced; the offset is not committed |
//! | `after-checkpoint` | a checkpoint's offset is committed |
//! | `after-download` | every byte is fsynced; `downloaded` is not committed |
//! | `mid-verify` | verification is under way |
//! | `mid-flash` | half the image is written to the flash target (`ab:` only when copied from `downloads/`) |
//! | `after-flash` | the image is installed and read back; `flashed` is not committed |
//! | `before-delivered` | an outgoing message is sent; its delivery is not recorded |
//! | `after-slot-write` | `ab:` the slot holds the verified image; next-boot not switched |
//! | `before-switch-rename` | `ab:` the switched boot record is written, not renamed |
//! | `before-reboot` | `awaiting_reboot` is committed; the reboot command has not run |
//! | `mid-health` | the health check runs |
//! | `before-reject-rename` | the health check failed; the cleared record is not renamed |
//! | `before-commit-rename` | the committed boot record is written, not renamed |
//! | `after-boot-commit` | the boot record is committed; `completed` is not |
//! | `mid-install` | `command:` the installer runs |
//! | `mid-commit` | `command:` the commit command runs (after the reboot) |

use std::sync::OnceLock;

pub const ENV: &str = "FWAGENT_CRASH_AT";

/// Die here if `FWAGENT_CRASH_AT` names this point.
pub fn point(name: &str) {
    static WANTED: OnceLock<Option<String>> = OnceLock::new();
    let wanted = WANTED.get_or_init(|| std::env::var(ENV).ok().filter(|s| !s.is_empty()));
    if wanted.as_deref() == Some(name) {
        tracing::warn!(point = name, "crash point reached; killing the process");
        // SAFETY: kill(2) on our own pid with a constant signal has no
        // memory-safety preconditions.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
        std::process::abort();
    }
}
