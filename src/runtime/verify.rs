//! The Verify actor: md5 and size over the image, streamed.
//!
//! The downloader hands every chunk here as it writes it, so the image is
//! hashed while it arrives, on this actor's own thread. After a restart the
//! downloader first asks for the durable prefix to be re-hashed ([`VerifyMsg::Prime`]).
//! When the upgrade enters `verifying`, [`VerifyMsg::Finish`] compares size
//! and digest (re-hashing the whole file if the streamed state does not cover
//! it) and reports `Verified` or `VerifyFailed`.

use super::JobEvent;
use crate::crash;
use actix::prelude::*;
use bytes::Bytes;
use fwagent_state::{result_no, Event, Failure, Firmware, JobId};
use md5::{Digest, Md5};
use std::collections::HashMap;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

/// Hash state of one download in progress.
struct Hashing {
    md5: Md5,
    len: u64,
}

#[derive(Message)]
#[rtype(result = "()")]
pub enum VerifyMsg {
    /// Start a job's hash over the first `len` bytes of `path`.
    Prime { job: JobId, path: PathBuf, len: u64 },
    /// The next bytes of the image, in order.
    Chunk { job: JobId, data: Bytes },
    /// The image is complete at `path`: check it against `firmware`.
    Finish {
        job: JobId,
        path: PathBuf,
        firmware: Firmware,
    },
    /// Drop a job's state (cancelled).
    Forget { job: JobId },
}

pub struct Verify {
    jobs: HashMap<JobId, Hashing>,
    events: Recipient<JobEvent>,
}

impl Verify {
    pub fn new(events: Recipient<JobEvent>) -> Self {
        Verify {
            jobs: HashMap::new(),
            events,
        }
    }
}

impl Actor for Verify {
    type Context = Context<Self>;
}

/// The read buffer for hashing and flashing: big enough for sequential I/O,
/// small enough for a gateway's RAM (make bench measures peak RSS).
pub const IO_BUF: usize = 256 << 10;

/// md5 of the first `len` bytes of `path` (fewer if the file is shorter).
pub fn hash_prefix(path: &Path, len: u64) -> io::Result<(Md5, u64)> {
    let mut md5 = Md5::new();
    let mut file = std::fs::File::open(path)?.take(len);
    let mut buf = vec![0u8; IO_BUF];
    let mut done = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        md5.update(&buf[..n]);
        done += n as u64;
    }
    Ok((md5, done))
}

/// Lowercase hex of a finished digest.
pub fn hex_digest(md5: Md5) -> String {
    hex::encode(md5.finalize())
}

fn check(path: &Path, firmware: &Firmware, streamed: Option<Hashing>) -> Event {
    let failed = |error_no, description: String, retryable| Event::VerifyFailed {
        failure: Failure::new(error_no, description, retryable),
    };
    let unreadable = |e: io::Error| {
        if e.kind() == io::ErrorKind::NotFound {
            // Downloaded, then lost (its directory entry was not durable,
            // or someone removed it): fetch it again.
            return Event::ImageMissing {
                detail: format!("the image {} is gone: {e}", path.display()),
            };
        }
        failed(
            result_no::TRANSFER,
            format!("cannot read the image {}: {e}", path.display()),
            false,
        )
    };
    let mismatch = |size: u64| {
        failed(
            result_no::SIZE_MISMATCH,
            format!("size mismatch: {size} bytes, expected {}", firmware.size),
            false,
        )
    };
    // A file must be the image's size; a block device (a slot) holds the
    // image in its first `size` bytes.
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() && m.len() != firmware.size => return mismatch(m.len()),
        Ok(_) => {}
        Err(e) => return unreadable(e),
    }
    let md5 = match streamed.filter(|h| h.len == firmware.size) {
        Some(h) => h.md5,
        None => match hash_prefix(path, firmware.size) {
            Ok((md5, len)) if len == firmware.size => md5,
            Ok((_, len)) => return mismatch(len),
            Err(e) => return unreadable(e),
        },
    };
    let digest = hex_digest(md5);
    if digest != firmware.md5 {
        return failed(
            result_no::MD5_MISMATCH,
            format!("md5 mismatch: got {digest}, expected {}", firmware.md5),
            false,
        );
    }
    Event::Verified
}

impl Handler<VerifyMsg> for Verify {
    type Result = ();

    fn handle(&mut self, msg: VerifyMsg, _ctx: &mut Context<Self>) {
        match msg {
            VerifyMsg::Prime { job, path, len } => {
                let hashing = match hash_prefix(&path, len) {
                    Ok((md5, len)) => Hashing { md5, len },
                    Err(e) if e.kind() == io::ErrorKind::NotFound && len == 0 => Hashing {
                        md5: Md5::new(),
                        len: 0,
                    },
                    Err(e) => {
                        // Finish will re-hash the whole file; nothing is lost.
                        tracing::warn!(upgrade = job, error = %e, path = %path.display(), "cannot re-hash the durable prefix");
                        self.jobs.remove(&job);
                        return;
                    }
                };
                self.jobs.insert(job, hashing);
            }
            VerifyMsg::Chunk { job, data } => {
                if let Some(h) = self.jobs.get_mut(&job) {
                    h.md5.update(&data);
                    h.len += data.len() as u64;
                }
            }
            VerifyMsg::Finish {
                job,
                path,
                firmware,
            } => {
                crash::point("mid-verify");
                let event = check(&path, &firmware, self.jobs.remove(&job));
                tracing::info!(
                    upgrade = job,
                    ok = matches!(event, Event::Verified),
                    "verification finished"
                );
                self.events.do_send(JobEvent { job, event });
            }
            VerifyMsg::Forget { job } => {
                self.jobs.remove(&job);
            }
        }
    }
}
