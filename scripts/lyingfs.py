#!/usr/bin/env python3
"""A FUSE file system that lies: a worn or fake-capacity card, for the tests.

    lyingfs.py BACKING MOUNTPOINT [--drop START:END] [--fail-fsync-while FILE]
               [--log FILE] [--ready FILE]

Every file under MOUNTPOINT is the file of the same name under BACKING, except
that a write is acknowledged in full but its bytes at offsets START..END (of
every file; END exclusive) never reach BACKING: what was there stays. The
mount keeps written pages in the kernel's page cache (`kernel_cache`) and
reports a fixed mtime, so nothing but an explicit eviction (or O_DIRECT) makes
the kernel ask for those bytes again: a read-back through the page cache sees
what was written, a read from the medium sees what the card kept.

--fail-fsync-while FILE: while FILE exists (a path outside the mount, made
and removed by the test), every fsync and fsyncdir fails with EIO after
passing the data on: a card whose flush fails.

--log FILE gets one line per operation that changes the tree or makes it
durable (create, mkdir, rename, unlink, truncate, fsync, fsyncdir, and
`drop PATH OFFSET` for the first write that lost bytes since the file's last
fsync), flushed at once. --ready FILE is created
once the file system is mounted. Runs in the foreground until unmounted
(`umount MOUNTPOINT`) or killed.

Needs fusepy: Debian's python3-fusepy (module `fusepy`, for /usr/bin/python3)
or PyPI's fusepy (module `fuse`); scripts/test-servers.sh installs the former.
"""

import argparse
import errno
import os
import sys

try:
    import fusepy as fuse
except ImportError:  # PyPI's fusepy
    import fuse

# A fixed mtime: the kernel drops cached pages of a file whose mtime changed
# behind its back (auto_inval_data); this card never says so.
FIXED_TIME = 1_700_000_000


class LyingFs(fuse.Operations):
    use_ns = True

    def __init__(self, backing, drop, log, ready, fail_fsync_while=None):
        self.backing = os.path.realpath(backing)
        self.drop = drop
        self.fail_fsync_while = fail_fsync_while
        self.log_file = open(log, "a", buffering=1) if log else None
        self.ready = ready
        # Files that lost bytes since their last fsync (logged once).
        self.dropping = set()

    # ------------------------------------------------------------ helpers

    def _path(self, path):
        return os.path.join(self.backing, path.lstrip("/"))

    def _log(self, *words):
        if self.log_file:
            self.log_file.write(" ".join(str(w) for w in words) + "\n")
            self.log_file.flush()

    def init(self, path):
        if self.ready:
            with open(self.ready, "w") as f:
                f.write(f"{os.getpid()}\n")

    # ------------------------------------------------------------ metadata

    def getattr(self, path, fh=None):
        st = os.lstat(self._path(path))
        attrs = {
            key: getattr(st, key)
            for key in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_ino")
        }
        for key in ("st_atime", "st_mtime", "st_ctime"):
            attrs[key] = FIXED_TIME * 10**9
        return attrs

    def statfs(self, path):
        sv = os.statvfs(self._path(path))
        return {
            key: getattr(sv, key)
            for key in (
                "f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail",
                "f_ffree", "f_files", "f_flag", "f_frsize", "f_namemax",
            )
        }

    def readdir(self, path, fh):
        return [".", ".."] + os.listdir(self._path(path))

    def access(self, path, amode):
        if not os.access(self._path(path), amode):
            raise fuse.FuseOSError(errno.EACCES)

    def chmod(self, path, mode):
        os.chmod(self._path(path), mode)

    def chown(self, path, uid, gid):
        os.chown(self._path(path), uid, gid)

    def utimens(self, path, times=None):
        return 0

    # ------------------------------------------------------------ tree

    def mkdir(self, path, mode):
        os.mkdir(self._path(path), mode)
        self._log("mkdir", path)

    def rmdir(self, path):
        os.rmdir(self._path(path))
        self._log("rmdir", path)

    def unlink(self, path):
        os.unlink(self._path(path))
        self._log("unlink", path)

    def rename(self, old, new):
        os.rename(self._path(old), self._path(new))
        self._log("rename", old, new)

    def create(self, path, mode, fi=None):
        fd = os.open(self._path(path), os.O_RDWR | os.O_CREAT | os.O_TRUNC, mode)
        self._log("create", path)
        return fd

    def open(self, path, flags):
        # Never O_DIRECT or O_APPEND on the backing file: offsets come from the kernel.
        keep = flags & os.O_ACCMODE
        return os.open(self._path(path), keep)

    def truncate(self, path, length, fh=None):
        if fh is not None:
            os.ftruncate(fh, length)
        else:
            os.truncate(self._path(path), length)
        self._log("truncate", path, length)

    # ------------------------------------------------------------ data

    def read(self, path, size, offset, fh):
        return os.pread(fh, size, offset)

    def write(self, path, data, offset, fh):
        start, end = self.drop
        lo, hi = max(offset, start), min(offset + len(data), end)
        if lo >= hi:
            os.pwrite(fh, data, offset)
        else:
            # Keep the bytes outside the range; the card loses the rest, but
            # its size grows as if all were written (or the kernel would see
            # a size it did not expect and drop its cache).
            if offset < lo:
                os.pwrite(fh, data[: lo - offset], offset)
            if hi < offset + len(data):
                os.pwrite(fh, data[hi - offset :], hi)
            if os.fstat(fh).st_size < offset + len(data):
                os.ftruncate(fh, offset + len(data))
            if path not in self.dropping:
                self.dropping.add(path)
                self._log("drop", path, lo)
        return len(data)

    def flush(self, path, fh):
        return 0

    def release(self, path, fh):
        os.close(fh)
        return 0

    def _fsync_fails(self, what, path):
        if self.fail_fsync_while and os.path.exists(self.fail_fsync_while):
            self._log(what, path, "EIO")
            raise fuse.FuseOSError(errno.EIO)

    def fsync(self, path, datasync, fh):
        os.fsync(fh)
        self._fsync_fails("fsync", path)
        self.dropping.discard(path)
        self._log("fsync", path)
        return 0

    def fsyncdir(self, path, datasync, fh):
        fd = os.open(self._path(path), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self._fsync_fails("fsyncdir", path)
        self._log("fsyncdir", path)
        return 0

    def opendir(self, path):
        return 0

    def releasedir(self, path, fh):
        return 0


def byte_range(text):
    start, _, end = text.partition(":")
    start, end = int(start), int(end)
    if not 0 <= start < end:
        raise argparse.ArgumentTypeError(f"{text}: want START:END with START < END")
    return start, end


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("backing")
    p.add_argument("mountpoint")
    p.add_argument("--drop", type=byte_range, metavar="START:END",
                   help="bytes every write loses (default: none)")
    p.add_argument("--fail-fsync-while", metavar="FILE")
    p.add_argument("--log")
    p.add_argument("--ready")
    a = p.parse_args()
    fuse.FUSE(
        LyingFs(a.backing, a.drop or (1 << 62, (1 << 62) + 1), a.log, a.ready,
                a.fail_fsync_while),
        a.mountpoint,
        foreground=True,
        nothreads=True,
        kernel_cache=True,
        big_writes=True,
        default_permissions=True,
        fsname="lyingfs",
    )


if __name__ == "__main__":
    sys.exit(main())
