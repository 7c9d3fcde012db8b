#!/usr/bin/env python3
"""Power-cut harness: the agent runs in a QEMU VM and a power cut is the host SIGKILLing qemu.

docs/POWERCUT.md describes the method and every check. scripts/powercut.sh installs what is
missing, fetches the Debian kernel, builds the release binaries and then runs this driver:

    powercut.py run --cuts N [--seed S] [--accel auto|kvm|tcg] [--f2fs-share 0.3]
    powercut.py boot [--fs ext4]      one uncut boot by hand, logs in target/powercut/manual/

Python 3 standard library only.
"""

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WORK = ROOT / "target" / "powercut"
KDIR = WORK / "kernel"
HERE = Path(__file__).resolve().parent

MIB = 1 << 20
# sled's default cache capacity is 1 GiB; with less RAM it logs an ERROR at every open
# ("cache capacity is limited to the cgroup memory limit"), so the VM gets a bit more.
VM_MIB = 1280
CHECKPOINT = 1 * MIB  # --checkpoint-bytes in init.sh
LOG_EVERY = 128 * 1024  # the file server's --log-every in init.sh
KEEP_REFETCH = 3 * MIB  # a passing round whose cut re-fetched more keeps its logs
FW_NAME = "gw-powercut.bin"
# Modules the guest loads (the dependency closure is added from each module's depends=).
MODULE_ROOTS = [
    "virtio_pci", "virtio_blk", "crc32c_generic", "crc32c-intel", "crc32_generic",
    "libcrc32c", "ext4", "f2fs", "vfat", "nls_cp437", "nls_iso8859-1", "nls_ascii",
]

# Agent log lines that are explained by a power cut and are therefore allowed. Everything else
# at WARN or ERROR fails the round. Keep this list short and say why for each entry.
ALLOWED_WARNINGS = {
    "*": [],
    # FAT has no sockets: the control socket cannot be bound (the agent goes on without it).
    "vfat": ["cannot serve the control socket"],
}
SLED_CONF_WARNING = "empty/corrupt configuration file found"

ANSI = re.compile(r"\x1b\[[0-9;]*m")
PHASES = ["accepted", "mid-download", "checkpoint", "verifying", "flashing", "completed", "random"]
# With --flash ab: the download goes into the slot and "flashing" is the switch; then a reboot.
AB_PHASES = ["accepted", "mid-download", "checkpoint", "verifying", "ab-switch",
             "awaiting-reboot", "boot-check", "ab-commit", "completed", "random"]
AB_MARKERS = {
    "ab-switch": ("next boot switched to it", "after the switch to the new slot"),
    "awaiting-reboot": ("phase=awaiting_reboot", "after phase=awaiting_reboot"),
    "boot-check": ("boot checked", "after 'boot checked'"),
    "ab-commit": ("new slot committed", "after 'new slot committed'"),
}


def log(msg):
    print(msg, flush=True)


# ---------------------------------------------------------------------------------------------
# Building the initramfs


def kernel_paths():
    """The kernel to boot and its modules' directory.

    QEMU boots an uncompressed vmlinux through its PVH entry point (the Debian kernel has
    CONFIG_PVH): under TCG that skips SeaBIOS's real-mode loader and the in-guest xz
    decompression, about 7 s of every boot. The bzImage is the fallback."""
    vmlinuz = sorted(KDIR.glob("boot/vmlinuz-*"))
    if not vmlinuz:
        sys.exit(f"powercut: no kernel under {KDIR} (scripts/powercut.sh fetches it)")
    version = vmlinuz[-1].name[len("vmlinuz-"):]
    moddir = KDIR / "lib" / "modules" / version
    elf = WORK / f"vmlinux-{version}"
    if not elf.exists():
        try:
            import lzma
            data = vmlinuz[-1].read_bytes()
            at = data.find(b"\xfd7zXZ\x00")
            raw = lzma.LZMADecompressor().decompress(data[at:]) if at >= 0 else b""
            if raw[:4] == b"\x7fELF":
                tmp = elf.with_suffix(".tmp")
                tmp.write_bytes(raw)
                tmp.rename(elf)
        except (OSError, lzma.LZMAError):
            pass
    return (elf if elf.exists() else vmlinuz[-1]), moddir


def module_info(path):
    data = path.read_bytes()
    deps = []
    m = re.search(rb"\x00depends=([^\x00]*)\x00", data)
    if m and m.group(1):
        deps += m.group(1).decode().split(",")
    for sm in re.finditer(rb"\x00softdep=pre: ([^\x00]*)\x00", data):
        deps += [d for d in sm.group(1).decode().split() if d]
    return deps


def module_order(moddir):
    """The modules to insmod, dependencies first."""
    index = {}
    for ko in moddir.rglob("*.ko"):
        index[ko.stem.replace("-", "_")] = ko
    aliases = {"crypto_crc32c": "crc32c_generic", "crc32c": "crc32c_generic",
               "crypto_crc32": "crc32_generic", "crc32": "crc32_generic"}
    order, seen = [], set()

    def visit(name, optional):
        key = name.replace("-", "_")
        key = aliases.get(key, key)
        if key in seen:
            return
        seen.add(key)
        ko = index.get(key)
        if ko is None:
            if (moddir / "modules.builtin").exists() and key in (
                    moddir / "modules.builtin").read_text().replace("-", "_"):
                return
            if not optional:
                sys.exit(f"powercut: module {name} not found under {moddir}")
            return
        for dep in module_info(ko):
            visit(dep, True)
        order.append(ko)

    for root in MODULE_ROOTS:
        visit(root, root in ("crc32c-intel",))
    return order


def ldd_libs(binary):
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=True).stdout
    libs = []
    for line in out.splitlines():
        m = re.search(r"(/\S+) \(0x", line)
        if m:
            libs.append(Path(m.group(1)))
    return libs


def build_initramfs(image, request_template, dest):
    """A newc cpio: busybox, modules, the agent, the file server, the image and the request."""
    busybox = shutil.which("busybox") or "/bin/busybox"
    agent = ROOT / "target" / "release" / "fwagent"
    server = ROOT / "target" / "release" / "examples" / "fileserver"
    for b in (agent, server):
        if not b.exists():
            sys.exit(f"powercut: {b} missing (cargo build --release --bin fwagent --example fileserver)")
    _, moddir = kernel_paths()
    stage = Path(tempfile.mkdtemp(prefix="initramfs-", dir=WORK))
    try:
        for d in ("bin", "sbin", "proc", "sys", "dev", "mnt", "tmp", "lib/modules",
                  "lib64", "srv/www/fw", "etc"):
            (stage / d).mkdir(parents=True, exist_ok=True)
        shutil.copy2(busybox, stage / "bin" / "busybox")
        applets = subprocess.run([busybox, "--list"], capture_output=True, text=True,
                                 check=True).stdout.split()
        for a in applets:
            link = stage / "bin" / a
            if not link.exists():
                link.symlink_to("busybox")
        for name in ("fwagent", "fileserver"):
            src = agent if name == "fwagent" else server
            shutil.copy2(src, stage / "bin" / name)
        for lib in set(ldd_libs(agent)) | set(ldd_libs(server)):
            target = stage / str(lib).lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(lib.resolve(), target)
        names = []
        for ko in module_order(moddir):
            shutil.copy2(ko, stage / "lib" / "modules" / ko.name)
            names.append(ko.name)
        (stage / "lib" / "modules" / "modules.list").write_text("\n".join(names) + "\n")
        shutil.copy2(HERE / "init.sh", stage / "init")
        os.chmod(stage / "init", 0o755)
        (stage / "srv" / "www" / "fw" / FW_NAME).write_bytes(image)
        (stage / "srv" / "request.json.in").write_text(request_template)
        (stage / "etc" / "passwd").write_text("root:x:0:0:root:/:/bin/sh\n")
        files = subprocess.run(["find", ".", "-mindepth", "1"], cwd=stage, capture_output=True,
                               text=True, check=True).stdout
        with open(dest, "wb") as out:
            subprocess.run(["cpio", "--quiet", "-o", "-H", "newc"], cwd=stage, input=files.encode(),
                           stdout=out, check=True)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return names


def request_template(md5, size):
    return json.dumps({
        "operator": "setCloudUpgradeConfig",
        "sessionId": "SID:powercut-@ROUND@",
        "messageId": "MID:cloud-powercut-@ROUND@",
        "info": {
            "serverConfig": {"port": "@PORT@", "hostIp": "127.0.0.1", "userName": "",
                             "password": "", "protocol": "http", "path": "/fw/"},
            "fileInfo": {"firmwareName": FW_NAME, "md5sum": md5, "totalSize": size},
        },
    }) + "\n"


# ---------------------------------------------------------------------------------------------
# Disks


def make_disk(path, fs):
    """A raw image with an empty target file (the agent refuses a missing one)."""
    stage = Path(tempfile.mkdtemp(prefix="disk-", dir=WORK))
    try:
        (stage / "target.img").write_bytes(b"")
        (stage / "ab").mkdir()  # for ab: rounds; the agent creates the slots and the record
        if path.exists():
            path.unlink()
        with open(path, "wb") as f:
            f.truncate(256 * MIB)
        q = dict(capture_output=True, check=True)
        if fs == "ext4":
            subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(stage), str(path)], **q)
        elif fs == "f2fs":
            subprocess.run(["mkfs.f2fs", "-q", "-f", str(path)], **q)
            subprocess.run(["sload.f2fs", "-f", str(stage), str(path)], **q)
        elif fs == "vfat":
            subprocess.run(["mkfs.vfat", str(path)], **q)
            subprocess.run(["mcopy", "-i", str(path), str(stage / "target.img"), "::target.img"], **q)
            subprocess.run(["mmd", "-i", str(path), "::ab"], **q)
        else:
            sys.exit(f"powercut: unknown fs {fs}")
    finally:
        shutil.rmtree(stage, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Booting


def qemu_cmd(accel, disk, initrd, logs, params):
    vmlinuz, _ = kernel_paths()
    if accel == "kvm":
        accel_args = ["-accel", "kvm", "-cpu", "host"]
    else:
        accel_args = ["-accel", "tcg,thread=multi", "-cpu", "max"]
    cmd = ["qemu-system-x86_64", "-nodefaults", "-no-user-config", "-display", "none",
           "-nic", "none", "-no-reboot", "-m", str(VM_MIB), "-smp", "2", *accel_args,
           "-kernel", str(vmlinuz), "-initrd", str(initrd),
           "-append", "console=ttyS0 panic=-1 loglevel=6 " + " ".join(
               f"pc.{k}={v}" for k, v in params.items())]
    for name in ("console", "stdout", "stderr", "result"):
        cmd += ["-serial", f"file:{logs[name]}"]
    if disk is not None:
        cmd += ["-drive", f"file={disk},format=raw,if=virtio,cache=writeback"]
    return cmd


class Tail:
    """Reads the lines a growing file gained since the last call."""

    def __init__(self, path):
        self.path, self.pos, self.rest = path, 0, b""

    def lines(self):
        try:
            with open(self.path, "rb") as f:
                f.seek(self.pos)
                data = f.read()
        except FileNotFoundError:
            return []
        self.pos += len(data)
        data = self.rest + data
        parts = data.split(b"\n")
        self.rest = parts.pop()
        return [ANSI.sub("", p.decode("utf-8", "replace")).rstrip("\r") for p in parts]


def read_lines(path):
    """A log's lines, without CR and colour codes (the agent's stderr is a tty: ttyS2)."""
    try:
        text = path.read_bytes().decode("utf-8", "replace")
        return ANSI.sub("", text).replace("\r", "").split("\n")
    except FileNotFoundError:
        return []


SENDING = re.compile(r"^sending GET (\S+) start=(\d+) sent=(\d+)")
SERVED = re.compile(r"^GET (\S+) (\d+|aborted after) (\d+) bytes range=\"([^\"]*)\" start=(\d+)")


class Trigger:
    """When to cut: a phase marker in the agent's log, then a delay."""

    def __init__(self, kind, rng, size, rate):
        self.kind, self.size = kind, size
        self.fire_at = None  # monotonic time of the cut, once armed
        self.started = None
        self.offset = None  # absolute server offset to wait for (mid-download, checkpoint)
        if kind == "mid-download":
            self.frac = rng.uniform(0.05, 0.95)
        self.delay = {
            "accepted": rng.uniform(0, 0.05),
            "mid-download": 0.0,
            "checkpoint": rng.uniform(0, 0.05),
            "verifying": rng.uniform(0, 0.05),
            "flashing": rng.uniform(0, 0.8),
            "completed": rng.uniform(0, 0.05),
            "random": rng.uniform(0, 3.0 + size / rate),
            "ab-switch": rng.uniform(0, 0.05),
            "awaiting-reboot": rng.uniform(0, 0.05),
            "boot-check": rng.uniform(0, 0.05),
            "ab-commit": rng.uniform(0, 0.02),
        }[kind]
        self.rng = rng
        self.note = ""

    def feed(self, line, now):
        """Sees one agent/server log line; arms the cut when its marker shows."""
        if self.fire_at is not None:
            return
        k = self.kind
        if k == "random":
            if "agent starting" in line:
                self.arm(now, f"{self.delay:.2f}s after the agent started")
            return
        if k in AB_MARKERS:
            marker, why = AB_MARKERS[k]
            if marker in line:
                self.arm(now, why)
            return
        if k == "accepted" and "request accepted" in line:
            self.arm(now, "after 'request accepted'")
        elif k == "verifying" and " transition " in line and "phase=verifying" in line:
            self.arm(now, "after phase=verifying")
        elif k == "flashing" and " transition " in line and "phase=flashing" in line:
            self.arm(now, "after phase=flashing")
        elif k == "completed" and " transition " in line and "phase=completed" in line:
            self.arm(now, "after phase=completed")
        elif k in ("mid-download", "checkpoint"):
            m = SENDING.match(line)
            if not m:
                return
            pos = int(m.group(2)) + int(m.group(3))
            if self.offset is None:
                if k == "mid-download":
                    self.offset = max(pos, int(self.size * self.frac))
                else:
                    # Just past a checkpoint boundary (the agent fsyncs and commits there).
                    nxt = (pos // CHECKPOINT + 1 + self.rng.randrange(0, 4)) * CHECKPOINT
                    self.offset = min(nxt, (self.size // CHECKPOINT) * CHECKPOINT) + LOG_EVERY
                if self.offset >= self.size:
                    self.offset = self.size - 1
            if pos >= self.offset:
                if k == "checkpoint":
                    # Measured: the agent commits a checkpoint some 0.1-0.3 s after the server
                    # sent its last byte (socket buffers, the fsync, the commit).
                    self.arm(now, f"server at byte {pos}, past a checkpoint boundary",
                             self.rng.uniform(0.2, 0.4))
                else:
                    self.arm(now, f"server at byte {pos}")

    def feed_stdout(self, line, now):
        """A progress report whose bytesDone sits on a checkpoint boundary came from a committed
        checkpoint (bare progress figures are not aligned): the best "just after" marker."""
        if self.fire_at is not None or self.kind != "checkpoint":
            return
        try:
            m = json.loads(line)
        except ValueError:
            return
        info = m.get("info") if isinstance(m, dict) else None
        if not isinstance(info, dict) or info.get("phase") != "downloading":
            return
        done = info.get("bytesDone") or 0
        if 0 < done < self.size and done % CHECKPOINT == 0:
            self.arm(now, f"progress report of the checkpoint at byte {done}")

    def arm(self, now, why, delay=None):
        if delay is not None:
            self.delay = delay
        self.fire_at = now + self.delay
        self.note = f"{why} (+{self.delay:.3f}s)"


INIT_TIMEOUT = 60  # a boot that has not reached /init by then is stuck (seen once in 173 boots)


def boot_vm(accel, disk, initrd, bootdir, params, trigger=None, timeout=240):
    """One power-on. Returns a dict: cut (bool), done (bool), reboot (bool), hang (bool: no
    /init within INIT_TIMEOUT; nothing touched the disk yet), seconds, note."""
    bootdir.mkdir(parents=True, exist_ok=True)
    logs = {n: bootdir / f"{n}.log" for n in ("console", "stdout", "stderr", "result")}
    for p in logs.values():
        if p.exists():
            p.unlink()
    cmd = qemu_cmd(accel, disk, initrd, logs, params)
    (bootdir / "qemu.cmd").write_text(" ".join(cmd) + "\n")
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=open(bootdir / "qemu.out", "wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    err_tail, res_tail = Tail(logs["stderr"]), Tail(logs["result"])
    out_tail = Tail(logs["stdout"])
    cut = done = reboot = hang = False
    con_tail = Tail(logs["console"])
    init_seen = False
    note = ""
    try:
        while True:
            now = time.monotonic()
            for line in err_tail.lines():
                if trigger is not None:
                    trigger.feed(line, now)
            for line in out_tail.lines():
                if trigger is not None:
                    trigger.feed_stdout(line, now)
            for line in res_tail.lines():
                if line.strip() == "DONE":
                    done = True
                if line.strip() == "REBOOT":
                    reboot = True
            if trigger is not None and trigger.fire_at is not None and now >= trigger.fire_at \
                    and proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)  # the power cut
                proc.wait()
                cut = True
                note = trigger.note
                break
            if not init_seen:
                init_seen = any("pc: " in l and "init started" in l for l in con_tail.lines())
                if not init_seen and now - t0 > INIT_TIMEOUT and proc.poll() is None:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait()
                    hang = True
                    note = f"no /init within {INIT_TIMEOUT}s"
                    break
            if proc.poll() is not None:
                break
            if now - t0 > timeout:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                note = f"timeout after {timeout}s"
                break
            time.sleep(0.01)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    # Whatever the file chardevs got before the kill is in the files now.
    for line in res_tail.lines():
        if line.strip() == "DONE":
            done = True
        if line.strip() == "REBOOT":
            reboot = True
    if cut and (done or reboot):
        cut = False  # the boot finished before the cut fired
    return {"cut": cut, "done": done, "reboot": reboot, "hang": hang,
            "seconds": time.monotonic() - t0,
            "note": note, "rc": proc.returncode}


def probe_accel(initrd, where, wanted):
    """kvm if a quick boot under it reaches /init, else tcg."""
    if wanted in ("kvm", "tcg"):
        return wanted
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        log("powercut: /dev/kvm not usable; TCG")
        return "tcg"
    d = where / "probe-kvm"
    d.mkdir(parents=True, exist_ok=True)
    logs = {n: d / f"{n}.log" for n in ("console", "stdout", "stderr", "result")}
    cmd = qemu_cmd("kvm", None, initrd, logs, {"probe": 1})
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=open(d / "qemu.out", "wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    ok = False
    while time.monotonic() - t0 < 20 and proc.poll() is None:
        if "pc: init started" in logs["console"].read_text(errors="replace") if logs[
                "console"].exists() else False:
            ok = True
            break
        time.sleep(0.1)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    if ok:
        log("powercut: KVM probe booted; using KVM")
        return "kvm"
    why = (d / "qemu.out").read_text(errors="replace").strip().splitlines()
    log(f"powercut: KVM probe failed ({why[-1][:160] if why else 'no output within 20 s'}); TCG")
    return "tcg"


# ---------------------------------------------------------------------------------------------
# Checks


def parse_boot(bootdir):
    """What one boot left on the host: stdout JSON, agent log lines, server byte counts."""
    out = {"json": [], "partial": None, "agent": [], "server_sent": 0, "first_start": None,
           "responses": [], "result": read_lines(bootdir / "result.log"), "exit": None,
           "started": False}
    stdout = read_lines(bootdir / "stdout.log")
    for i, line in enumerate(stdout):
        if not line.strip():
            continue
        try:
            out["json"].append(json.loads(line))
        except ValueError:
            if i == len(stdout) - 1:
                out["partial"] = line  # cut while the line was on its way out
            else:
                out["json"].append({"__bad__": line})
    inflight = {}
    for line in read_lines(bootdir / "stderr.log"):
        m = SENDING.match(line)
        if m:
            inflight[(m.group(1), int(m.group(2)))] = int(m.group(3))
            continue
        m = SERVED.match(line)
        if m:
            start, n = int(m.group(5)), int(m.group(3))
            inflight.pop((m.group(1), start), None)
            out["responses"].append((start, n))
            continue
        if line.startswith("pc: ") and "agent starting" in line:
            out["started"] = True
        elif line.startswith("pc: agent exited"):
            out["exit"] = int(line.split()[-1])
        elif line.startswith("listening on"):
            pass
        elif line.strip():
            out["agent"].append(line)
    for (target, start), n in inflight.items():
        out["responses"].append((start, n))  # the response the cut interrupted
    out["server_sent"] = sum(n for _, n in out["responses"])
    starts = [s for s, n in out["responses"]]
    out["first_start"] = min(starts) if starts else None
    return out


def section(lines, begin, end):
    try:
        i = lines.index(begin)
    except ValueError:
        return None
    body = []
    for line in lines[i + 1:]:
        if line.startswith(end):
            return "\n".join(body)
        body.append(line)
    return None


def check_round(rdir, boots, mid, md5, size, rate, tolerate, fs, flash="file"):
    """Every check of docs/POWERCUT.md over one round's boots. Returns (failures, figures)."""
    fails, figures = [], {"refetch": [], "sled_conf": 0, "partial_lines": 0, "cuts": []}
    parsed = [parse_boot(rdir / f"boot-{i}") for i in range(len(boots))]
    last = parsed[-1]

    # 1. The cloud side: acks, reports, in order, one outcome.
    stream = []
    for i, p in enumerate(parsed):
        if p["partial"] is not None:
            figures["partial_lines"] += 1
        for msg in p["json"]:
            stream.append((i, msg))
    acks = [(i, m) for i, m in stream if m.get("operator", "").endswith("-Ack")]
    reports = [(i, m) for i, m in stream if isinstance(m.get("info"), dict)
               and m["info"].get("requestMessageId") == mid]
    bad = [m for _, m in stream if "__bad__" in m]
    if bad:
        fails.append(f"stdout carried non-JSON lines: {bad[:3]}")
    mine = [m for _, m in acks if m.get("messageId") == mid]
    if not mine:
        fails.append("no ack for the request on stdout")
    outcomes = {json.dumps(m.get("result"), sort_keys=True) for m in mine}
    if len(outcomes) > 1:
        fails.append(f"acks with different outcomes: {sorted(outcomes)}")
    if mine and mine[0].get("result", {}).get("errorNo") != 0:
        fails.append(f"the ack is not errorNo 0: {mine[0]}")
    first_ack = next((k for k, (_, m) in enumerate(stream)
                      if m.get("operator", "").endswith("-Ack") and m.get("messageId") == mid), None)
    first_report = next((k for k, (_, m) in enumerate(stream)
                         if isinstance(m.get("info"), dict)
                         and m["info"].get("requestMessageId") == mid), None)
    if first_report is not None and (first_ack is None or first_report < first_ack):
        fails.append("a report left before the request's ack")
    results = [m for _, m in reports if m.get("operator") == "reportCloudUpgradeResult"]
    if not results:
        fails.append("no result report on stdout")
    result_ids = {m.get("messageId") for m in results}
    if len(result_ids) > 1:
        fails.append(f"more than one result report (messageIds {sorted(result_ids)})")
    for m in results:
        if m.get("result", {}).get("errorNo") != 0 or m["info"].get("phase") != "completed":
            fails.append(f"result report is not completed/0: {m}")
    # Report messageIds must not be reused for different content.
    by_id = {}
    for _, m in reports:
        key = json.dumps(m, sort_keys=True)
        if by_id.setdefault(m.get("messageId"), key) != key:
            fails.append(f"report messageId {m.get('messageId')} sent with different content")

    # 2. The agent's own view after the DONE boot.
    res = last["result"]
    if last["exit"] != 0:
        fails.append(f"the last boot's agent exited {last['exit']}")
    show = section(res, "SHOW-BEGIN", "SHOW-END")
    try:
        view = json.loads(show) if show else None
    except ValueError:
        view = None
    if not isinstance(view, dict):
        fails.append(f"fwagent show --json gave no upgrade: {show!r:.300}")
    else:
        if view.get("phase") != "completed" or (view.get("result") or {}).get("errorNo") != 0:
            fails.append(f"the store says phase={view.get('phase')} result={view.get('result')}")
    hist = section(res, "HISTORY-BEGIN", "HISTORY-END")
    try:
        jobs = json.loads(hist) if hist else None
    except ValueError:
        jobs = None
    if not isinstance(jobs, list):
        fails.append(f"fwagent history --json gave no list: {hist!r:.300}")
    else:
        n = sum(1 for j in jobs if j.get("messageId") == mid)
        if n != 1:
            fails.append(f"{n} upgrades for {mid} in the store (history)")
    if flash == "ab":
        # The new slot must have been trial-booted by the bootloader before it was committed:
        # after a reboot the agent asked for, or after a cut that came after the switch (a
        # power cut is a reboot too; the agent then sees the trial boot and asks for none).
        if not any("bootloader: booted=b next=b" in l
                   for i in range(len(boots)) for l in read_lines(rdir / f"boot-{i}" / "console.log")):
            fails.append("ab: slot b was never trial-booted before it was committed")
        bl = next((l for l in res if l.startswith("BOOTCTL ")), None)
        try:
            rec = json.loads(bl[len("BOOTCTL "):]) if bl else None
        except ValueError:
            rec = None
        if not isinstance(rec, dict):
            fails.append(f"ab: no boot-control record: {bl!r}")
        else:
            act = rec.get("active")
            if act != "b" or rec.get("booted") != act or rec.get("next") is not None \
                    or rec.get("trial") is not None or rec.get("writing") is not None \
                    or (rec.get("md5") or {}).get(act) != md5:
                fails.append(f"ab: the record is not 'slot b committed with the image': {rec}")
    md5line = next((l for l in res if l.startswith("MD5 ")), None)
    if md5line is None or md5line.split()[1:3] != [md5, str(size)]:
        fails.append(f"target is not the image: {md5line!r} (want {md5} {size})")

    # 3. Every boot: the agent started and the store opened; no unexplained WARN/ERROR.
    accepted = 0
    for i, p in enumerate(parsed):
        if not p["started"] and not boots[i]["cut"]:
            fails.append(f"boot {i}: the agent never started")
        if p["exit"] not in (None, 0):
            fails.append(f"boot {i}: the agent exited {p['exit']}")
        for line in p["agent"]:
            if "request accepted" in line:
                accepted += 1
            if " WARN " not in line and " ERROR " not in line and "panicked" not in line:
                continue
            if SLED_CONF_WARNING in line:
                figures["sled_conf"] += 1
                if "sled-conf" in tolerate:
                    continue
            if any(a in line for a in ALLOWED_WARNINGS["*"] + ALLOWED_WARNINGS.get(fs, [])):
                continue
            fails.append(f"boot {i}: {line.strip()[:300]}")
        if p["started"] and not any(("request accepted" in l or "request answered" in l
                                     or "resuming" in l) for l in p["agent"]) \
                and not boots[i]["cut"]:
            fails.append(f"boot {i}: the agent never answered the request (store did not open?)")
    # A cut after the accept was committed but before its line reached the console loses
    # the line, not the accept: the next boot then resumes the upgrade in `accepted`.
    resumed_accept = any(boots[i - 1]["cut"] and any("resuming" in l and "phase=accepted" in l
                                                     for l in parsed[i]["agent"])
                         for i in range(1, len(parsed)))
    if accepted != 1 and not (accepted == 0 and resumed_accept):
        fails.append(f"'request accepted' logged {accepted} times across the boots (want 1)")

    # 4. Re-fetched bytes per cut: what the server sent in a cut boot that the next download
    # did not build on. Boot b covers [start_b, ...); the next boot that downloads resumes at
    # start_n; without one, everything up to the end was kept.
    dl = [(i, p) for i, p in enumerate(parsed) if p["first_start"] is not None]
    total = sum(p["server_sent"] for _, p in dl)
    for k, (i, p) in enumerate(dl):
        nxt = dl[k + 1][1]["first_start"] if k + 1 < len(dl) else size
        kept = nxt - p["first_start"]
        refetch = p["server_sent"] - kept
        if boots[i]["cut"]:
            figures["refetch"].append(refetch)
            # Where the server was at the cut, and the last bytesDone the agent reported.
            reported = [m["info"].get("bytesDone") for m in p["json"]
                        if isinstance(m.get("info"), dict) and m["info"].get("bytesDone")]
            figures["cuts"].append({
                "boot": i, "phase": boots[i].get("phase"), "note": boots[i].get("note"),
                "from": p["first_start"], "server_sent": p["server_sent"],
                "server_at": max(s0 + n for s0, n in p["responses"]),
                "last_reported": max(reported) if reported else None,
                "next_resume": nxt, "refetch": refetch})
            bound = CHECKPOINT + rate
            if refetch > bound:
                fails.append(f"boot {i}: {refetch} bytes re-fetched after the cut "
                             f"(bound {bound} = checkpoint + rate x 1 s)")
        elif refetch != 0:
            fails.append(f"boot {i} was not cut but {refetch} of its bytes were fetched again")
    figures["total_sent"] = total
    return fails, figures


# ---------------------------------------------------------------------------------------------
# The series


def run(args):
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 2**31)
    rng = random.Random(seed)
    size = rng.randrange(24 * MIB, 48 * MIB + 1)
    rate = args.rate
    log(f"powercut: seed {seed} (replay: CUTS={args.cuts} SEED={seed} make powercut); "
        f"image {size} bytes, rate {rate} B/s")
    image = random.Random(seed ^ 0x5EED).randbytes(size)
    md5 = hashlib.md5(image).hexdigest()
    runs = WORK / "runs"
    rundir = runs / f"seed-{seed}"
    if rundir.exists():
        shutil.rmtree(rundir)
    rundir.mkdir(parents=True)
    head = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                          capture_output=True, text=True).stdout.strip()
    agent_md5 = hashlib.md5((ROOT / "target" / "release" / "fwagent").read_bytes()).hexdigest()
    log(f"powercut: agent {agent_md5[:12]} built from {head or '?'} (the work tree at build time)")
    initrd = rundir / "initramfs.cpio"  # per series: two series may run side by side
    mods = build_initramfs(image, request_template(md5, size), initrd)
    log(f"powercut: initramfs {initrd.stat().st_size // MIB} MiB, {len(mods)} modules")
    del image
    accel = probe_accel(initrd, rundir, args.accel)

    cuts = rounds = completed = 0
    failures = []
    cycle_secs = []
    refetch = []
    cut_details = []
    hangs = 0
    sled_conf = 0
    sled_by_fs = {}
    boots_after_cut = {}
    partial = 0
    by_phase = {}
    t_start = time.monotonic()
    while cuts < args.cuts:
        rounds += 1
        x = rng.random()
        fs = "f2fs" if x < args.f2fs_share else (
            "vfat" if x < args.f2fs_share + args.vfat_share else "ext4")
        rdir = rundir / f"round-{rounds}"
        rdir.mkdir()
        disk = rdir / "disk.img"
        make_disk(disk, fs)
        mid = f"MID:cloud-powercut-{rounds}"
        flash = "ab" if rng.random() < args.ab_share else "file"
        phases = AB_PHASES if flash == "ab" else PHASES
        max_cuts = min(rng.randint(1, 4), args.cuts - cuts)
        boots = []
        hang_retries = 0
        seen = set()  # phases this round has passed
        while True:
            b = len(boots)
            want_cut = sum(1 for x in boots if x["cut"]) < max_cuts
            trig = None
            if want_cut:
                choices = [p for p in phases if not (p == "accepted" and "accepted" in seen)]
                trig = Trigger(rng.choice(choices), rng, size, rate)
            params = {"fs": fs, "round": rounds, "boot": b, "rate": rate, "flash": flash}
            r = boot_vm(accel, disk, initrd, rdir / f"boot-{b}", params, trig)
            if r["hang"] and hang_retries < 3:
                # The guest got stuck before /init (it never reached the disk): keep its
                # console, power it on again as the same boot.
                hang_retries += 1
                hangs += 1
                keep = rundir / f"hang-{hangs}-round-{rounds}-boot-{b}"
                shutil.copytree(rdir / f"boot-{b}", keep)
                log(f"powercut: round {rounds} boot {b}: stuck before /init ({r['seconds']:.0f}s); "
                    f"console kept in {keep}; booting again")
                continue
            r["phase"] = trig.kind if trig else "-"
            boots.append(r)
            seen.add("accepted")
            cycle_secs.append(r["seconds"])
            if r["cut"]:
                cuts += 1
                by_phase[r["phase"]] = by_phase.get(r["phase"], 0) + 1
            what = f"cut {r['phase']}: {r['note']}" if r["cut"] else (
                "DONE" if r["done"] else "reboot asked for" if r["reboot"] else
                f"no DONE ({r['note'] or 'qemu exited ' + str(r['rc'])})")
            log(f"powercut: round {rounds} ({fs}, {flash}:) boot {b}: {what} [{r['seconds']:.1f}s]")
            if r["done"]:
                break
            if r["reboot"]:
                continue
            if not r["cut"]:
                failures.append((rounds, [f"boot {b} ended without DONE and without a cut: "
                                          f"{r['note'] or 'qemu exited ' + str(r['rc'])}"]))
                break
            if b > 12:
                failures.append((rounds, ["more than 12 boots without finishing"]))
                break
        (rdir / "boots.json").write_text(json.dumps(boots, indent=1) + "\n")
        if boots[-1]["done"]:
            fails, fig = check_round(rdir, boots, mid, md5, size, rate, args.tolerate, fs, flash)
            refetch += fig["refetch"]
            cut_details += [dict(c, round=rounds, fs=fs, flash=flash) for c in fig["cuts"]]
            sled_conf += fig["sled_conf"]
            sled_by_fs[fs] = sled_by_fs.get(fs, 0) + fig["sled_conf"]
            boots_after_cut[fs] = boots_after_cut.get(fs, 0) + sum(
                1 for k in range(1, len(boots)) if boots[k - 1]["cut"])
            partial += fig["partial_lines"]
            if fails:
                failures.append((rounds, fails))
            else:
                completed += 1
        if failures and failures[-1][0] == rounds:
            (rdir / "FAILED").write_text("\n".join(failures[-1][1]) + "\n")
            for f in failures[-1][1]:
                log(f"powercut: FAIL round {rounds}: {f}")
            log(f"powercut: logs kept in {rdir}")
            disk.unlink(missing_ok=True)  # the logs matter; 256 MiB of disk does not
        elif any(c["refetch"] > KEEP_REFETCH for c in cut_details if c["round"] == rounds):
            # Passed, but a cut cost more than a few checkpoints: keep the logs to look at.
            disk.unlink(missing_ok=True)
            (rdir / "KEPT").write_text(f"a cut re-fetched more than {KEEP_REFETCH} bytes\n")
            log(f"powercut: round {rounds} passed; a cut re-fetched > {KEEP_REFETCH // MIB} MiB, "
                f"logs kept in {rdir}")
        else:
            shutil.rmtree(rdir)

    elapsed = time.monotonic() - t_start
    # A cycle is one power-on: boot, run, and the cut (or DONE and the power-off).
    per_cycle = sum(cycle_secs) / len(cycle_secs) if cycle_secs else 0.0
    sled_only = [r for r, fl in failures if all(SLED_CONF_WARNING in f for f in fl)]
    mib = [x / MIB for x in refetch]
    summary = {
        "seed": seed, "git": head, "agent_md5": agent_md5, "cuts": cuts, "rounds": rounds, "completed": completed,
        "failures": len(failures), "accel": accel, "seconds_per_cycle": round(per_cycle, 1),
        "elapsed_s": round(elapsed, 1), "image_bytes": size, "rate": rate,
        "refetch_mib_per_cut": {
            "mean": round(sum(mib) / len(mib), 2) if mib else None,
            "max": round(max(mib), 2) if mib else None,
            "bound": round((CHECKPOINT + rate) / MIB, 2)},
        "cuts_by_phase": by_phase, "sled_conf_warnings": sled_conf,
        "sled_conf_warnings_by_fs": sled_by_fs, "boots_after_a_cut_by_fs": boots_after_cut,
        "partial_stdout_lines": partial,
        "failed_rounds": [r for r, _ in failures],
        "rounds_failed_only_on_the_sled_warning": sled_only, "boots": len(cycle_secs),
        "boots_stuck_before_init": hangs,
        "refetch_per_download_cut": sorted(cut_details, key=lambda c: -c["refetch"]),
    }
    (rundir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (WORK / "last-summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    initrd.unlink(missing_ok=True)
    if not failures:
        shutil.rmtree(rundir / "probe-kvm", ignore_errors=True)
    log(f"powercut: cuts by phase {by_phase}; re-fetched per cut: mean "
        f"{summary['refetch_mib_per_cut']['mean']} MiB, max {summary['refetch_mib_per_cut']['max']}"
        f" MiB (bound {summary['refetch_mib_per_cut']['bound']} MiB); sled configuration warning "
        f"seen {sled_conf} times (by fs {sled_by_fs}, boots after a cut {boots_after_cut}); "
        f"{elapsed:.0f} s in all, {len(cycle_secs)} boots; rounds failed only on the sled "
        f"warning: {len(sled_only)} of {len(failures)}; boots stuck before /init and repeated: "
        f"{hangs}")
    log(f"powercut: {cuts} cuts, {completed} rounds completed, {len(failures)} failures, "
        f"{per_cycle:.1f} s per cycle ({accel})")
    return 1 if failures else 0


def manual(args):
    """One uncut boot, to see the VM work."""
    seed = args.seed or 1
    size = 8 * MIB
    image = random.Random(seed).randbytes(size)
    md5 = hashlib.md5(image).hexdigest()
    d = WORK / "manual"
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    initrd = WORK / "initramfs-manual.cpio"
    build_initramfs(image, request_template(md5, size), initrd)
    accel = probe_accel(initrd, d, args.accel)
    make_disk(d / "disk.img", args.fs)
    boots = []
    while not boots or (boots[-1]["reboot"] and len(boots) < 4):
        r = boot_vm(accel, d / "disk.img", initrd, d / f"boot-{len(boots)}",
                    {"fs": args.fs, "round": 0, "boot": len(boots), "rate": args.rate,
                     "flash": args.flash})
        log(f"powercut: manual boot {len(boots)} ({accel}): {r}; logs in {d}")
        boots.append(r)
    fails, fig = check_round(d, boots, "MID:cloud-powercut-0", md5, size, args.rate,
                             args.tolerate, args.fs, args.flash)
    for f in fails:
        log(f"powercut: FAIL {f}")
    return 1 if fails or not boots[-1]["done"] else 0


def recheck(args):
    """The checks again over the rounds a series kept (after a change to a check)."""
    rundir = WORK / "runs" / f"seed-{args.seed}"
    rng = random.Random(args.seed)
    size = rng.randrange(24 * MIB, 48 * MIB + 1)
    md5 = hashlib.md5(random.Random(args.seed ^ 0x5EED).randbytes(size)).hexdigest()
    bad = 0
    for rdir in sorted(rundir.glob("round-*"), key=lambda d: int(d.name.split("-")[1])):
        n = len(list(rdir.glob("boot-*")))
        if (rdir / "boots.json").exists():
            boots = json.loads((rdir / "boots.json").read_text())
        else:  # older series: a boot that ended in neither DONE nor REBOOT was cut
            boots = []
            for i in range(n):
                res = [l.strip() for l in read_lines(rdir / f"boot-{i}" / "result.log")]
                boots.append({"done": "DONE" in res, "reboot": "REBOOT" in res,
                              "cut": "DONE" not in res and "REBOOT" not in res and i < n - 1})
        console = "\n".join(read_lines(rdir / "boot-0" / "console.log"))
        m = re.search(r"mounted (\w+) round=(\d+) boot=\d+(?: flash=(\w+))?", console)
        fs, rnd, flash = m.group(1), int(m.group(2)), m.group(3) or "file"
        fails, _ = check_round(rdir, boots, f"MID:cloud-powercut-{rnd}", md5, size, args.rate,
                               args.tolerate, fs, flash)
        bad += bool(fails)
        log(f"powercut: recheck {rdir.name} ({fs}, {flash}:, {n} boots): "
            + ("; ".join(fails) if fails else "all checks pass"))
    return 1 if bad else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("mode", choices=["run", "boot", "recheck"])
    ap.add_argument("--cuts", type=int, default=int(os.environ.get("CUTS", "10")))
    ap.add_argument("--seed", type=int, default=int(os.environ["SEED"]) if os.environ.get("SEED") else None)
    ap.add_argument("--accel", default=os.environ.get("POWERCUT_ACCEL", "auto"),
                    choices=["auto", "kvm", "tcg"])
    ap.add_argument("--rate", type=int, default=int(os.environ.get("POWERCUT_RATE", str(8 * MIB))))
    ap.add_argument("--f2fs-share", type=float,
                    default=float(os.environ.get("POWERCUT_F2FS_SHARE", "0.3")))
    ap.add_argument("--vfat-share", type=float,
                    default=float(os.environ.get("POWERCUT_VFAT_SHARE", "0")))
    ap.add_argument("--ab-share", type=float,
                    default=float(os.environ.get("POWERCUT_AB_SHARE", "0.3")),
                    help="share of rounds that flash ab:/mnt/ab (reboot, bootloader stand-in)")
    ap.add_argument("--fs", default="ext4", choices=["ext4", "f2fs", "vfat"])
    ap.add_argument("--flash", default="file", choices=["file", "ab"])
    ap.add_argument("--tolerate", default=os.environ.get("POWERCUT_TOLERATE", ""),
                    help="comma-separated known issues not to fail on: sled-conf")
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    sys.exit({"run": run, "boot": manual, "recheck": recheck}[args.mode](args))


if __name__ == "__main__":
    main()
