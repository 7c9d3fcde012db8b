//! `--flash file:PATH`, and an image copied into a slot: the write, and
//! the read-back from the medium beside it.

use super::super::verify::{hex_digest, read_back_differs, IO_BUF};
use super::{ab, flash_failure};
use crate::{crash, fsutil};
use fwagent_state::{result_no, Failure, Firmware};
use md5::{Digest, Md5};
use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// What `--flash file:PATH` may name: it must exist (the agent creates
/// nothing there: a typo'd `/dev/mmcblk0p3` must not become a file in RAM).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileTarget {
    /// A regular file: cut to the image's length.
    Regular,
    /// A block device of this many bytes: keeps its size.
    BlockDevice { size: u64 },
}

/// Why `--flash file:PATH` cannot be flashed.
#[derive(Debug, thiserror::Error)]
pub enum FileTargetError {
    #[error("{0} does not exist: the flash target must be an existing regular file or block device (the agent creates none)")]
    Missing(PathBuf),
    #[error("cannot stat {0}: {1}")]
    Stat(PathBuf, #[source] std::io::Error),
    #[error("cannot read the size of {0}: {1}")]
    Size(PathBuf, #[source] std::io::Error),
    #[error("{0} is neither a regular file nor a block device")]
    NotFileOrDevice(PathBuf),
}

/// Check `--flash file:PATH`'s target (symbolic links followed): `run`
/// refuses to start without one, and every flash checks it again.
pub fn file_target(path: &Path) -> Result<FileTarget, FileTargetError> {
    use std::os::unix::fs::FileTypeExt;
    let shown = || path.to_path_buf();
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => FileTargetError::Missing(shown()),
        _ => FileTargetError::Stat(shown(), e),
    })?;
    let kind = meta.file_type();
    if kind.is_file() {
        Ok(FileTarget::Regular)
    } else if kind.is_block_device() {
        let size = ab::device_size(path).map_err(|e| FileTargetError::Size(shown(), e))?;
        Ok(FileTarget::BlockDevice { size })
    } else {
        Err(FileTargetError::NotFileOrDevice(shown()))
    }
}

/// Write `image` to the existing file or block device `target` (never
/// created), fsync, read it back from the medium and compare its md5 with
/// `firmware.md5`.
pub fn write_file(image: &Path, target: &Path, firmware: &Firmware) -> Result<(), Failure> {
    let refused = |why: String| Failure::new(result_no::FLASH_FAILED, why, false);
    let checked = file_target(target).map_err(|e| refused(e.to_string()))?;
    if let FileTarget::BlockDevice { size } = checked {
        if size < firmware.size {
            return Err(refused(format!(
                "the block device {} has {size} bytes, fewer than the image's {}",
                target.display(),
                firmware.size
            )));
        }
    }
    // No O_CREAT: a target that vanished since the check above is an error.
    let dst = OpenOptions::new()
        .read(true)
        .write(true)
        .open(target)
        .map_err(|e| flash_failure("cannot open the flash target", target, e))?;
    write_and_read_back(image, dst, target, firmware)
}

/// Write `image` into the slot file or device `path`, creating a missing
/// slot file (its directory fsynced, so the new entry is durable), then
/// fsync, read back from the medium and compare.
pub(super) fn write_slot(image: &Path, path: &Path, firmware: &Firmware) -> Result<(), Failure> {
    let open = |create_new| {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(create_new)
            .open(path)
    };
    let dst = match open(false) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let f = open(true).map_err(|e| flash_failure("cannot create", path, e))?;
            sync_parent(path)?;
            f
        }
        Err(e) => return Err(flash_failure("cannot open", path, e)),
    };
    write_and_read_back(image, dst, path, firmware)
}

/// fsync the directory that holds `path`, so its entry is durable.
pub(super) fn sync_parent(path: &Path) -> Result<(), Failure> {
    let dir = fsutil::parent_dir(path);
    fsutil::sync_dir(dir).map_err(|e| flash_failure("cannot fsync the directory", dir, e))
}

/// Bytes written before the range is written out and handed to the
/// read-back: large enough for few waits, small enough that the read-back
/// keeps pace with the writes.
pub(super) const READ_BACK_RANGE: u64 = 16 << 20;

/// Copy `image` into `dst`, and read what was written back from the medium
/// and hash it on a second thread while the rest is written: every
/// [`READ_BACK_RANGE`] bytes the range is written out to the device
/// (`sync_file_range`) and handed over; the reader drops its cached pages
/// and reads it from the medium. The last range follows the final fsync.
/// A card that acknowledged writes it dropped fails here (50).
fn write_and_read_back(
    image: &Path,
    dst: std::fs::File,
    target: &Path,
    firmware: &Firmware,
) -> Result<(), Failure> {
    let src =
        std::fs::File::open(image).map_err(|e| flash_failure("cannot open the image", image, e))?;
    let (written, read_back) = std::thread::scope(|scope| {
        let (ranges, handed) = std::sync::mpsc::sync_channel::<(u64, u64)>(2);
        let dst = &dst;
        let reader = scope.spawn(move || read_back_ranges(dst, handed));
        let written = write_image(src, dst, image, target, firmware, &ranges);
        drop(ranges);
        let read_back = reader
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the read-back thread panicked")));
        (written, read_back)
    });
    written?;
    let (read, md5) = read_back.map_err(|e| flash_failure("cannot read back", target, e))?;
    let digest = hex_digest(md5);
    if read != firmware.size || digest != firmware.md5 {
        return Err(read_back_differs(target, read, &digest, firmware, None));
    }
    Ok(())
}

/// The writer's half of [`write_and_read_back`]: returns the bytes written
/// once all are fsynced and handed to the reader.
fn write_image(
    mut src: std::fs::File,
    mut dst: &std::fs::File,
    image: &Path,
    target: &Path,
    firmware: &Firmware,
    ranges: &std::sync::mpsc::SyncSender<(u64, u64)>,
) -> Result<u64, Failure> {
    let hand_over = |from: u64, to: u64| {
        // A reader that stopped has failed: its error is the one to report.
        let _ = ranges.send((from, to));
    };
    let mut buf = vec![0u8; IO_BUF];
    let (mut written, mut handed) = (0u64, 0u64);
    let mut crossed_half = false;
    loop {
        let n = src
            .read(&mut buf)
            .map_err(|e| flash_failure("cannot read the image", image, e))?;
        if n == 0 {
            break;
        }
        dst.write_all(&buf[..n])
            .map_err(|e| flash_failure("cannot write", target, e))?;
        written += n as u64;
        if written - handed >= READ_BACK_RANGE {
            fsutil::write_out(dst, handed, written)
                .map_err(|e| flash_failure("cannot write out", target, e))?;
            hand_over(handed, written);
            handed = written;
        }
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
    if dst.metadata().is_ok_and(|m| m.is_file()) {
        dst.set_len(written)
            .map_err(|e| flash_failure("cannot truncate", target, e))?;
    }
    dst.sync_all()
        .map_err(|e| flash_failure("cannot fsync", target, e))?;
    hand_over(handed, written);
    Ok(written)
}

/// The reader's half of [`write_and_read_back`]: each range handed over,
/// its pages dropped, read from the medium and hashed, in order.
fn read_back_ranges(
    file: &std::fs::File,
    ranges: std::sync::mpsc::Receiver<(u64, u64)>,
) -> std::io::Result<(u64, Md5)> {
    let mut md5 = Md5::new();
    let mut buf = vec![0u8; fsutil::MEDIUM_READ_BUF];
    let mut read = 0u64;
    for (from, to) in ranges {
        fsutil::evict_range(file, from, to)?;
        read += fsutil::read_range(file, from, to, &mut buf, |b| md5.update(b))?;
    }
    Ok((read, md5))
}
