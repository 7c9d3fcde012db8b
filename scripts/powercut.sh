#!/usr/bin/env bash
# `make powercut`: real power cuts. The agent runs in a QEMU VM (Debian kernel, a busybox
# initramfs, a raw virtio disk with cache=writeback); a cut is the host SIGKILLing qemu, so the
# guest loses everything it had not written to its disk. docs/POWERCUT.md says what is checked.
#
#   CUTS=N                 power cuts in the series (default 10)
#   SEED=S                 replay a series (the seed is printed at the start)
#   POWERCUT_ACCEL         auto (default: KVM if a probe boot works, else TCG) | kvm | tcg
#   POWERCUT_RATE          the in-guest server's rate, bytes/s (default 8 MiB/s)
#   POWERCUT_F2FS_SHARE    share of rounds on f2fs instead of ext4 (default 0.3)
#   POWERCUT_TOLERATE      known issues not to fail on, comma-separated: sled-conf
#
# Installs what is missing with apt-get (qemu-system-x86, busybox-static, e2fsprogs,
# f2fs-tools, dosfstools, mtools, cpio), fetches the Debian kernel package with `apt-get download`
# and unpacks it under target/powercut/kernel (the host's kernel and /boot are not touched).
# Never contacts any host but the package registries; the VM has no network device.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
CARGO="${CARGO:-cargo}"
WORK=target/powercut
mkdir -p "$WORK"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
# (grep without -q: with pipefail an early exit would SIGPIPE busybox and fail the test)
[ -x /bin/busybox ] && /bin/busybox --list 2>/dev/null | grep -x insmod >/dev/null || need+=(busybox-static)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
command -v sload.f2fs >/dev/null || need+=(f2fs-tools)
command -v mkfs.vfat >/dev/null || need+=(dosfstools)
command -v mcopy >/dev/null || need+=(mtools)
command -v cpio >/dev/null || need+=(cpio)
command -v ldd >/dev/null || need+=(libc-bin)
if [ "${#need[@]}" -gt 0 ]; then
    echo "powercut: installing ${need[*]}" >&2
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

# The kernel: the concrete package linux-image-amd64 depends on, unpacked, no postinst.
if ! ls "$WORK"/kernel/boot/vmlinuz-* >/dev/null 2>&1; then
    pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | sed -n 's/^ *Depends: \(linux-image-[0-9].*-amd64\)$/\1/p' | head -n1)
    if [ -z "$pkg" ]; then
        as_root apt-get update -qq
        pkg=$(apt-cache depends linux-image-amd64 | sed -n 's/^ *Depends: \(linux-image-[0-9].*-amd64\)$/\1/p' | head -n1)
    fi
    [ -n "$pkg" ] || { echo "powercut: cannot tell which linux-image-*-amd64 to fetch" >&2; exit 1; }
    echo "powercut: fetching $pkg" >&2
    rm -rf "$WORK/kernel" "$WORK"/linux-image-*.deb
    mkdir -p "$WORK/kernel"
    # apt-get download writes to the current directory; _apt may not write there (a warning).
    (cd "$WORK" && apt-get download -q "$pkg" 2>&1 | grep -v '^W: Download is performed unsandboxed' >&2 || true)
    deb=$(ls "$WORK"/linux-image-*.deb | head -n1)
    dpkg-deb -x "$deb" "$WORK/kernel"
    rm -f "$deb"
fi

# Only what the VM needs; cargo waits on the lock if someone else builds.
"$CARGO" build --release --quiet --bin fwagent --example fileserver

exec python3 scripts/powercut/powercut.py run "$@"
