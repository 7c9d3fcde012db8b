//! The Flash actor and its backends: where a verified image goes.
//!
//! `--flash file:PATH` writes the image to a file or block device, fsyncs it,
//! reads it back and compares the md5. Flashing is repeatable: after a crash
//! the whole image is written again. The actor runs on its own thread, so
//! long writes never stall messaging.

use super::verify::{hash_prefix, hex_digest};
use super::JobEvent;
use crate::crash;
use actix::prelude::*;
use fwagent_state::{result_no, Event, Failure, Firmware, JobId};
use std::fmt;
use std::fs::OpenOptions;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

/// Where verified images go, as given by `--flash`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FlashSpec {
    /// A file or block device, written in place.
    File(PathBuf),
}

impl std::str::FromStr for FlashSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once(':') {
            Some(("file", path)) if !path.is_empty() => Ok(FlashSpec::File(PathBuf::from(path))),
            Some(("ab", _)) | Some(("command", _)) => Err(format!(
                "flash backend `{s}` is not built yet; use file:PATH (see README, \"Not built yet\")"
            )),
            _ => Err(format!("`{s}` is not a flash target: use file:PATH")),
        }
    }
}

impl fmt::Display for FlashSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FlashSpec::File(p) => write!(f, "file:{}", p.display()),
        }
    }
}

/// Install a verified image.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct FlashImage {
    pub job: JobId,
    pub image: PathBuf,
    pub firmware: Firmware,
}

pub struct Flash {
    spec: FlashSpec,
    events: Recipient<JobEvent>,
}

impl Flash {
    pub fn new(spec: FlashSpec, events: Recipient<JobEvent>) -> Self {
        Flash { spec, events }
    }
}

impl Actor for Flash {
    type Context = Context<Self>;
}

fn flash_failure(what: &str, path: &Path, e: io::Error) -> Failure {
    Failure::new(
        result_no::FLASH_FAILED,
        format!("{what} {}: {e}", path.display()),
        false,
    )
}

/// Write `image` to `target`, fsync, read back and compare with `firmware.md5`.
pub fn write_file(image: &Path, target: &Path, firmware: &Firmware) -> Result<(), Failure> {
    let mut src = std::fs::File::open(image).map_err(|e| flash_failure("cannot open the image", image, e))?;
    let mut dst = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(target)
        .map_err(|e| flash_failure("cannot open", target, e))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut written = 0u64;
    let mut crossed_half = false;
    loop {
        let n = src.read(&mut buf).map_err(|e| flash_failure("cannot read the image", image, e))?;
        if n == 0 {
            break;
        }
        dst.write_all(&buf[..n]).map_err(|e| flash_failure("cannot write", target, e))?;
        written += n as u64;
        if !crossed_half && written * 2 >= firmware.size {
            crossed_half = true;
            crash::point("mid-flash");
        }
    }
    if written != firmware.size {
        return Err(Failure::new(
            result_no::FLASH_FAILED,
            format!("the image has {written} bytes, expected {}", firmware.size),
            false,
        ));
    }
    // A regular file is cut to the image; a block device keeps its size.
    let is_file = dst.metadata().map(|m| m.is_file()).unwrap_or(false);
    if is_file {
        dst.set_len(written).map_err(|e| flash_failure("cannot truncate", target, e))?;
    }
    dst.sync_all().map_err(|e| flash_failure("cannot fsync", target, e))?;
    drop(dst);
    let (md5, read) = hash_prefix(target, written).map_err(|e| flash_failure("cannot read back", target, e))?;
    let digest = hex_digest(md5);
    if read != written || digest != firmware.md5 {
        return Err(Failure::new(
            result_no::FLASH_FAILED,
            format!("read-back of {} does not match: md5 {digest}", target.display()),
            false,
        ));
    }
    Ok(())
}

impl Handler<FlashImage> for Flash {
    type Result = ();

    fn handle(&mut self, msg: FlashImage, _ctx: &mut Context<Self>) {
        tracing::info!(upgrade = msg.job, target = %self.spec, "flashing");
        let event = match &self.spec {
            FlashSpec::File(target) => match write_file(&msg.image, target, &msg.firmware) {
                Ok(()) => {
                    crash::point("after-flash");
                    Event::Flashed { reboot: false }
                }
                Err(failure) => Event::FlashFailed { failure },
            },
        };
        self.events.do_send(JobEvent { job: msg.job, event });
    }
}
