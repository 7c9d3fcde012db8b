//! Small file-system helpers: free space, directory fsync, private dirs,
//! reading a file back from its medium rather than from the page cache.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, FileTypeExt, PermissionsExt};
use std::path::Path;

/// Bytes available to an unprivileged writer on the file system of `path`.
pub fn free_bytes(path: &Path) -> io::Result<u64> {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a valid out-pointer.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

/// fsync a directory, so a rename or a new file in it is durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// The directory that holds `path` (`.` for a bare file name).
pub fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// Create `dir` (and parents) and make it readable by its owner alone.
pub fn private_dir(dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// The block size of [`read_from_medium`]: large reads, so the second pass
/// over the image costs what the medium's bandwidth does.
pub const MEDIUM_READ_BUF: usize = 256 << 10;

/// `ioctl(BLKFLSBUF)`: write out and drop a block device's buffer cache
/// (`_IO(0x12, 97)`; not in the libc crate).
const BLKFLSBUF: u64 = 0x1261;

/// Drop the page cache of `file` (fsync it first: only clean pages are
/// dropped), so the next read comes from the medium, not from the pages that
/// were just written. A block device also gets `BLKFLSBUF` when allowed (it
/// needs CAP_SYS_ADMIN; `posix_fadvise` alone drops its pages otherwise).
pub fn evict(file: &File) -> io::Result<()> {
    let fd = file.as_raw_fd();
    if file.metadata()?.file_type().is_block_device() {
        // SAFETY: BLKFLSBUF takes no argument; `fd` is open.
        let rc = unsafe { libc::ioctl(fd, BLKFLSBUF as _, 0) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            tracing::debug!(error = %e, "BLKFLSBUF refused; dropping the device's pages with posix_fadvise only");
        }
    }
    // Length 0: to the end, so a last page partly covered goes too.
    // SAFETY: plain system call on an open descriptor.
    match unsafe { libc::posix_fadvise(fd, 0, 0, libc::POSIX_FADV_DONTNEED) } {
        0 => Ok(()),
        errno => Err(io::Error::from_raw_os_error(errno)),
    }
}

/// Drop the cached pages that hold bytes `from..to` of `file` (the whole
/// pages around the range), so reading them again comes from the medium.
/// Only clean pages go: write the range out first ([`write_out`] or an
/// fsync).
pub fn evict_range(file: &File, from: u64, to: u64) -> io::Result<()> {
    const PAGE: u64 = 4096;
    let start = from / PAGE * PAGE;
    let len = to.div_ceil(PAGE) * PAGE - start;
    // SAFETY: plain system call on an open descriptor.
    match unsafe {
        libc::posix_fadvise(
            file.as_raw_fd(),
            start as libc::off_t,
            len as libc::off_t,
            libc::POSIX_FADV_DONTNEED,
        )
    } {
        0 => Ok(()),
        errno => Err(io::Error::from_raw_os_error(errno)),
    }
}

/// Write bytes `from..to` of `file` out to the device and wait, so their
/// pages are clean and [`evict_range`] can drop them. Not an fsync: neither
/// the device's cache nor the metadata is flushed (the final fsync does
/// that). Where `sync_file_range` is refused, an fdatasync does it.
pub fn write_out(file: &File, from: u64, to: u64) -> io::Result<()> {
    let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
        | libc::SYNC_FILE_RANGE_WRITE
        | libc::SYNC_FILE_RANGE_WAIT_AFTER;
    // SAFETY: plain system call on an open descriptor.
    let rc = unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            from as libc::off64_t,
            (to - from) as libc::off64_t,
            flags,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    tracing::debug!(error = %io::Error::last_os_error(), "sync_file_range refused; fdatasync instead");
    file.sync_data()
}

/// Start writing bytes `from..to` of `file` out to the device without
/// waiting (`sync_file_range(SYNC_FILE_RANGE_WRITE)`): early writeback, so
/// a later fsync has little left to do. Advice only; a refusal is ignored.
pub fn start_write_out(file: &File, from: u64, to: u64) {
    // SAFETY: plain system call on an open descriptor.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            from as libc::off64_t,
            (to - from) as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        )
    };
}

/// Read bytes `from..to` of `file` (fewer at its end) into `buf`, a block
/// at a time, each handed to `each` in order; returns the bytes read. The
/// caller evicts the range first for a read from the medium.
pub fn read_range(
    file: &File,
    from: u64,
    to: u64,
    buf: &mut [u8],
    mut each: impl FnMut(&[u8]),
) -> io::Result<u64> {
    let mut at = from;
    while at < to {
        let want = (to - at).min(buf.len() as u64) as usize;
        let n = match file.read_at(&mut buf[..want], at) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        each(&buf[..n]);
        at += n as u64;
    }
    Ok(at - from)
}

/// Read the first `len` bytes of `file` (fewer at its end) from the medium:
/// its cached pages are evicted first ([`evict`]; fsync it before), then it
/// is read in [`MEDIUM_READ_BUF`] blocks, each handed to `each` in order,
/// and its pages are dropped again (the image is no use in the cache).
/// Returns the bytes read. (The kernel's sequential read-ahead fetches the
/// next blocks while `each` hashes this one: a reader thread of our own
/// measured no faster.)
pub fn read_from_medium(file: &File, len: u64, each: impl FnMut(&[u8])) -> io::Result<u64> {
    evict(file)?;
    // SAFETY: plain system call on an open descriptor; advice only.
    unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL) };
    let mut buf = vec![0u8; MEDIUM_READ_BUF];
    let done = read_range(file, 0, len, &mut buf, each)?;
    let _ = evict(file);
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_from_medium_hands_over_every_byte_in_order() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("f");
        let bytes: Vec<u8> = (0..(2 * MEDIUM_READ_BUF + 12345))
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        std::fs::write(&path, &bytes).expect("write");
        let file = File::open(&path).expect("open");
        for len in [
            0,
            1,
            4096,
            MEDIUM_READ_BUF as u64,
            bytes.len() as u64,
            u64::MAX,
        ] {
            let mut got = Vec::new();
            let n = read_from_medium(&file, len, |b| got.extend_from_slice(b)).expect("read");
            let want = len.min(bytes.len() as u64) as usize;
            assert_eq!(n, want as u64, "len {len}");
            assert!(got == bytes[..want], "len {len}");
        }
    }
}
