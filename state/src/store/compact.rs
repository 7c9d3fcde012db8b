//! Compaction on open: sled 0.34 reuses the space of old record versions
//! only in part, so a store that prunes (see `prune`) still grows on disk,
//! slowly. When sled's data file has grown past
//! [`Limits::compact_above`], the store is copied record by record into
//! `db.new` (sled's export and import, checked by sled's checksum), made
//! durable, and swapped with `db` in one `renameat2(RENAME_EXCHANGE)`; the
//! old copy is then removed. A cut at any point leaves `db` whole (the old
//! store before the swap, the copy after it); what is left in `db.new` is
//! removed by the next open. docs/DURABILITY.md, "What the store keeps".

use super::*;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;

/// Compact `state_dir/db` if its data file is larger than `above` bytes.
/// Returns whether it did. A copy that fails leaves the store as it was.
pub(super) fn compact_if_large(state_dir: &Path, above: u64) -> Result<bool, StoreError> {
    let path = state_dir.join("db");
    let fresh = state_dir.join("db.new");
    let len = std::fs::metadata(path.join("db"))
        .map(|m| m.len())
        .unwrap_or(0);
    if len <= above {
        return Ok(false);
    }
    if let Err(e) = copy(&path, &fresh) {
        remove_leftover(&fresh)?;
        return Err(e);
    }
    sync_tree(&fresh)?;
    exchange(&fresh, &path)?;
    sync_dir(state_dir)?;
    remove_leftover(&fresh)?;
    Ok(true)
}

/// Copy every tree of `from` into a new store at `to`, and check it.
fn copy(from: &Path, to: &Path) -> Result<(), StoreError> {
    let old = open_sled(from, LOCK_WAIT)?;
    // Under the store's lock: no other process is compacting it.
    remove_leftover(to)?;
    let new = open_sled(to, LOCK_WAIT)?;
    // sled's import panics where it cannot write; the old store is untouched.
    let imported = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        new.import(old.export());
    }));
    if imported.is_err() {
        return Err(StoreError::Conflict {
            why: "the copy of the store failed".into(),
        });
    }
    new.flush()?;
    if old.checksum()? != new.checksum()? {
        return Err(StoreError::Conflict {
            why: "the copy of the store differs from it".into(),
        });
    }
    Ok(())
}

pub(super) fn remove_leftover(dir: &Path) -> Result<(), StoreError> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(StoreError::Io {
            path: dir.to_path_buf(),
            source,
        }),
    }
}

/// Swap the directories `a` and `b` atomically.
fn exchange(a: &Path, b: &Path) -> Result<(), StoreError> {
    let c = |p: &Path| CString::new(p.as_os_str().as_bytes()).expect("a path without NUL");
    let (ca, cb) = (c(a), c(b));
    // SAFETY: two NUL-terminated paths that outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc != 0 {
        return Err(StoreError::Io {
            path: b.to_path_buf(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}
