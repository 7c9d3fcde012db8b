#!/usr/bin/env python3
"""The measurements of `make bench` (scripts/bench.sh sets the stage and calls this).

Expects the test servers up (their env file), the release binary and a random image
already in nginx's and vsftpd's roots. Runs every comparison as alternating rounds
(baseline, agent, baseline, agent, ...), so slow drift of a shared machine hits both
sides alike, and prints the table (markdown) with the machine's description. The
method is docs/BENCH.md.

Writes OUT/table.md (the table as printed) and OUT/results.json (every sample).
"""
import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time

MIB = 1 << 20
TIME = "/usr/bin/time"


def log(msg):
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def sh(cmd, **kw):
    return subprocess.run(cmd, shell=isinstance(cmd, str), capture_output=True, text=True, **kw)


def first_line(cmd):
    try:
        r = sh(cmd)
        return ((r.stdout or "") + (r.stderr or "")).strip().splitlines()[0]
    except Exception:  # noqa: BLE001 -- a description, never a failure
        return "?"


def read_env(path):
    env = {}
    for line in open(path):
        m = re.match(r"export (\w+)=(.*)$", line.strip())
        if m:
            # values are %q-quoted by bash; ours never need unquoting beyond this
            env[m.group(1)] = m.group(2).strip("'")
    return env


def time_v(path):
    """Fields of a `/usr/bin/time -v -o path` report."""
    out = {}
    try:
        for line in open(path):
            k, _, v = line.strip().rpartition(": ")
            out[k] = v
    except FileNotFoundError:
        pass
    return out


def max_rss_kib(path):
    v = time_v(path).get("Maximum resident set size (kbytes)")
    return int(v) if v else None


def parse_at(s):
    return dt.datetime.fromisoformat(s.replace("Z", "+00:00"))


def cpu_s(path):
    """User + system seconds of a /usr/bin/time -v run (children included)."""
    t = time_v(path)
    return float(t["User time (seconds)"]) + float(t["System time (seconds)"])


def median(xs):
    return statistics.median(xs) if xs else None


class Bench:
    def __init__(self, a):
        self.a = a
        self.bin = os.path.abspath(a.bin)
        self.out = os.path.abspath(a.out)
        self.work = os.path.join(self.out, "work")
        self.env = read_env(a.env_file)
        self.image = a.image
        self.size = os.path.getsize(a.image)
        self.md5 = a.md5
        self.nginx = self.env["FWAGENT_TEST_NGINX_URL"]
        self.vsftpd_port = int(self.env["FWAGENT_TEST_VSFTPD_PORT"])
        self.results = {"samples": {}}
        self.n = 0
        shutil.rmtree(self.work, ignore_errors=True)
        os.makedirs(self.work)

    # ---------------------------------------------------------------- helpers

    def request(self, protocol, port, path, name, tag, md5=None, size=None):
        self.n += 1
        mid = f"MID:bench-{tag}-{os.getpid()}-{self.n:04d}"
        r = {
            "operator": "setCloudUpgradeConfig",
            "sessionId": f"SID:bench-{self.n:06d}",
            "messageId": mid,
            "info": {
                "serverConfig": {
                    "port": port, "host": "127.0.0.1", "userName": "", "password": "",
                    "protocol": protocol, "path": path,
                },
                "fileInfo": {"firmwareName": name, "md5sum": md5 or self.md5,
                             "upgradeFileSize": size or self.size},
            },
        }
        f = os.path.join(self.work, f"request-{self.n:04d}.json")
        with open(f, "w") as fh:
            fh.write(json.dumps(r) + "\n")
        return mid, f

    def http_request(self, tag, name="fw.bin"):
        port = int(self.env["FWAGENT_TEST_NGINX_PORT"])
        return self.request("http", port, "/bench/", name, tag)

    def ftp_request(self, tag):
        return self.request("ftp", self.vsftpd_port, "/bench/", "fw.bin", tag)

    def fresh(self, name):
        p = os.path.join(self.work, name)
        shutil.rmtree(p, ignore_errors=True)
        if os.path.exists(p):
            os.remove(p)
        return p

    def settle(self):
        """Start each measured run with no dirty pages of the previous one."""
        os.sync()

    def show(self, mid, state):
        r = sh([self.bin, "show", "--json", mid, "--state-dir", state])
        if r.returncode != 0:
            raise RuntimeError(f"fwagent show {mid}: exit {r.returncode}: {r.stderr.strip()}")
        return json.loads(r.stdout)

    def run_agent(self, mid, request, flash, label, env_extra=None, stdin_path=None, expect_ok=True,
                  state=None, extra_args=()):
        """One `fwagent run --transport stdio` under /usr/bin/time -v. Returns a dict."""
        state = state or self.fresh(f"state-{label}")
        tv = os.path.join(self.work, f"time-{label}.txt")
        errlog = os.path.join(self.work, f"agent-{label}.log")
        env = dict(os.environ)
        env.pop("FWAGENT_CRASH_AT", None)
        env.update(env_extra or {})
        cmd = [TIME, "-v", "-o", tv, self.bin, "run", "--transport", "stdio", "--state-dir", state,
               "--flash", flash, "--device-id", "bench", *extra_args]
        self.settle()
        with open(stdin_path or request) as stdin, open(errlog, "a") as err:
            t0 = time.monotonic()
            p = subprocess.run(cmd, stdin=stdin, stdout=subprocess.PIPE, stderr=err, env=env)
            wall = time.monotonic() - t0
        res = {"wall": wall, "rc": p.returncode, "rss_kib": max_rss_kib(tv), "state": state,
               "stdout": p.stdout.decode(errors="replace")}
        if not expect_ok:
            return res
        if p.returncode != 0:
            raise RuntimeError(f"agent ({label}) exited {p.returncode}; see {errlog}")
        d = self.show(mid, state)
        res["detail"] = d
        if d["phase"] not in ("completed", "awaiting_reboot") or (d.get("result") or {}).get("errorNo", 0):
            raise RuntimeError(f"agent ({label}) ended {d['phase']} {d.get('result')} {d.get('lastError')}")
        res["phases"] = self.phase_times(d)
        return res

    @staticmethod
    def phase_times(d):
        """Seconds between the first log entry into each phase and the next phase."""
        first = {}
        for e in d["log"]:
            first.setdefault(e["to"], parse_at(e["at"]))
        t = {}
        if "downloading" in first and "flashing" in first:
            t["download_verify"] = (first["flashing"] - first["downloading"]).total_seconds()
        if "downloading" in first and "verifying" in first:
            t["download"] = (first["verifying"] - first["downloading"]).total_seconds()
        if "verifying" in first and "flashing" in first:
            t["verify_finish"] = (first["flashing"] - first["verifying"]).total_seconds()
        end = first.get("completed") or first.get("awaiting_reboot")
        if "flashing" in first and end:
            t["flash"] = (end - first["flashing"]).total_seconds()
        if "accepted" in first and end:
            t["accept_to_end"] = (end - first["accepted"]).total_seconds()
        return t

    def run_shell(self, script, label):
        """A baseline shell pipeline; wall time from outside. Returns (seconds, stdout)."""
        self.settle()
        t0 = time.monotonic()
        p = subprocess.run(["bash", "-o", "pipefail", "-c", script], capture_output=True, text=True)
        wall = time.monotonic() - t0
        if p.returncode != 0:
            raise RuntimeError(f"baseline {label} failed ({p.returncode}): {p.stderr.strip()}")
        return wall, p.stdout

    def check_md5(self, out, label):
        if self.md5 not in out:
            raise RuntimeError(f"baseline {label}: md5 {out.strip()!r}, expected {self.md5}")

    def ab_status(self):
        """Whether this binary accepts --flash ab:DIR. ('built'|'not built', detail)."""
        # ab: asks for a reboot once the slot is written (`--reboot-command`, default `reboot`):
        # never run it here without the flag that turns that off.
        help_text = sh([self.bin, "run", "--help"]).stdout
        if "--reboot-command" not in help_text:
            return "not built", "this binary has no --reboot-command to keep it from rebooting the machine"
        state = self.fresh("state-ab-probe")
        slots = self.fresh("ab-probe")
        os.makedirs(slots)
        try:
            p = subprocess.run([self.bin, "run", "--transport", "stdio", "--state-dir", state,
                                "--flash", "ab:" + slots, "--device-id", "bench",
                                "--reboot-command", ""],
                               stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
        except subprocess.TimeoutExpired:
            return "not built", "the probe did not exit within 30 s"
        if p.returncode == 0:
            return "built", ""
        return "not built", (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1]

    # ---------------------------------------------------------------- rounds

    def http_rounds(self):
        url = f"{self.nginx}/bench/fw.bin"
        f = os.path.join(self.work, "baseline.bin")
        t = os.path.join(self.work, "baseline-target.bin")
        curl_tv = os.path.join(self.work, "time-curl.txt")
        ab, ab_why = self.ab_status()
        self.results["ab"] = {"status": ab, "detail": ab_why}
        log(f"--flash ab: {ab}{' (' + ab_why + ')' if ab_why else ''}")
        s = {k: [] for k in ("curl_md5", "agent_dv", "agent_file", "agent_rss", "agent_phases",
                             "baseline_full", "curl_rss", "agent_ab", "ab_phases")}
        for i in range(self.a.pairs):
            log(f"HTTP round {i + 1}/{self.a.pairs}")
            # 1. curl | md5sum
            w, out = self.run_shell(f"curl -sS --noproxy '*' {url} | md5sum", "curl|md5sum")
            self.check_md5(out, "curl|md5sum")
            s["curl_md5"].append(w)
            # 2. the agent, full upgrade to file: (its log gives download+verify)
            target = self.fresh("agent-target.bin")
            open(target, "wb").close()  # file: flashes only an existing target
            mid, req = self.http_request("http")
            r = self.run_agent(mid, req, "file:" + target, f"http-{i}")
            if os.path.getsize(target) != self.size:
                raise RuntimeError("the agent's target has the wrong size")
            s["agent_dv"].append(r["phases"]["download_verify"])
            s["agent_file"].append(r["wall"])
            s["agent_rss"].append(r["rss_kib"])
            s["agent_phases"].append(r["phases"])
            shutil.rmtree(r["state"], ignore_errors=True)
            os.remove(target)
            # 3. curl -o F && md5sum F && dd conv=fsync
            for p in (f, t):
                if os.path.exists(p):
                    os.remove(p)
            w, out = self.run_shell(
                f"{TIME} -v -o {curl_tv} curl -sS --noproxy '*' -o {f} {url} && md5sum {f} && "
                f"dd if={f} of={t} bs=1M conv=fsync status=none", "curl -o, md5sum, dd")
            self.check_md5(out, "curl -o, md5sum, dd")
            s["baseline_full"].append(w)
            s["curl_rss"].append(max_rss_kib(curl_tv))
            os.remove(f)
            os.remove(t)
            # 4. the agent, full upgrade to ab: (when built)
            if ab == "built":
                slots = self.fresh("ab-slots")
                os.makedirs(slots)
                mid, req = self.http_request("ab")
                r = self.run_agent(mid, req, "ab:" + slots, f"ab-{i}", extra_args=("--reboot-command", ""))
                s["agent_ab"].append(r["wall"])
                s["ab_phases"].append(r["phases"])
                shutil.rmtree(r["state"], ignore_errors=True)
                shutil.rmtree(slots, ignore_errors=True)
        self.results["samples"].update(s)

    def ftp_rounds(self):
        url = f"ftp://127.0.0.1:{self.vsftpd_port}/bench/fw.bin"
        s = {"curl_ftp_md5": [], "agent_ftp_dv": [], "agent_ftp_wall": [], "agent_ftp_phases": []}
        # Is FTP built? A request for it is refused with errorNo 5 when it is not.
        mid, req = self.ftp_request("ftp-probe")
        r = sh([self.bin, "check", req])
        ack = json.loads(r.stdout.splitlines()[0]) if r.stdout else {}
        if ack.get("result", {}).get("errorNo") == 5:
            self.results["ftp"] = {"status": "not built", "detail": r.stdout.strip()}
            log("FTP download not built")
            return
        for i in range(self.a.pairs):
            log(f"FTP round {i + 1}/{self.a.pairs}")
            w, out = self.run_shell(f"curl -sS --noproxy '*' {url} | md5sum", "curl ftp|md5sum")
            self.check_md5(out, "curl ftp|md5sum")
            s["curl_ftp_md5"].append(w)
            target = self.fresh("agent-target.bin")
            open(target, "wb").close()  # file: flashes only an existing target
            mid, req = self.ftp_request("ftp")
            try:
                r = self.run_agent(mid, req, "file:" + target, f"ftp-{i}")
            except RuntimeError as e:
                # refused as not built into this binary (errorNo 5 in the ack)?
                self.results["ftp"] = {"status": "failed", "detail": str(e)}
                log(f"FTP upgrade failed: {e}")
                s["agent_ftp_dv"] = []
                break
            s["agent_ftp_dv"].append(r["phases"]["download_verify"])
            s["agent_ftp_wall"].append(r["wall"])
            s["agent_ftp_phases"].append(r["phases"])
            shutil.rmtree(r["state"], ignore_errors=True)
            os.remove(target)
        else:
            self.results["ftp"] = {"status": "built"}
        self.results["samples"].update(s)

    def rate_rounds(self):
        """At gateway link speeds (nginx `limit_rate`): CPU per GiB, fdatasyncs, wake-ups.

        A smaller image per rate (the figures are per byte). The agent runs a full
        upgrade to `file:` (download, verify, flash, read back); the baselines are
        `curl | md5sum` and `curl -o; md5sum; dd conv=fsync`, their CPU from
        /usr/bin/time over the whole pipeline. fdatasyncs are counted by one extra
        agent run under `strace -f -c` (not timed)."""
        root = self.env["FWAGENT_TEST_NGINX_ROOT"]
        out = {}
        for rate, mib in (("10m", 64), ("1m", 16)):
            name = f"rate-{mib}.bin"
            data = os.urandom(mib * MIB)
            img = os.path.join(root, "bench", name)
            with open(img, "wb") as f:
                f.write(data)
            md5 = hashlib.md5(data).hexdigest()
            url = f"{self.nginx}/rate/{rate}/bench/{name}"
            port = int(self.env["FWAGENT_TEST_NGINX_PORT"])
            r = {"mib": mib, "agent_cpu": [], "agent_switches": [], "agent_wall": [], "curl_md5_cpu": [],
                 "baseline_full_cpu": [], "agent_dv_cpu": []}
            for i in range(2):
                log(f"rate {rate}: round {i + 1}/2 ({mib} MiB)")
                tv = os.path.join(self.work, f"time-rate-{rate}.txt")
                self.run_shell(f"{TIME} -v -o {tv} bash -o pipefail -c "
                               f"\"curl -sS --noproxy '*' {url} | md5sum\"", f"curl|md5sum at {rate}")
                r["curl_md5_cpu"].append(cpu_s(tv))
                f = self.fresh("rate-baseline.bin")
                t = self.fresh("rate-baseline-target.bin")
                self.run_shell(f"{TIME} -v -o {tv} bash -c \"curl -sS --noproxy '*' -o {f} {url} && "
                               f"md5sum {f} && dd if={f} of={t} bs=1M conv=fsync status=none\"",
                               f"curl -o, md5sum, dd at {rate}")
                r["baseline_full_cpu"].append(cpu_s(tv))
                os.remove(f)
                os.remove(t)
                # download+verify only: the installer is `true`
                mid, req = self.request("http", port, f"/rate/{rate}/bench/", name, f"rate-dv-{rate}",
                                        md5=md5, size=mib * MIB)
                a = self.run_agent(mid, req, "command:true", f"rate-dv-{rate}-{i}")
                r["agent_dv_cpu"].append(cpu_s(os.path.join(self.work, f"time-rate-dv-{rate}-{i}.txt")))
                shutil.rmtree(a["state"], ignore_errors=True)
                target = self.fresh("rate-target.bin")
                open(target, "wb").close()
                mid, req = self.request("http", port, f"/rate/{rate}/bench/", name, f"rate-{rate}",
                                        md5=md5, size=mib * MIB)
                a = self.run_agent(mid, req, "file:" + target, f"rate-{rate}-{i}")
                atv = time_v(os.path.join(self.work, f"time-rate-{rate}-{i}.txt"))
                r["agent_cpu"].append(float(atv["User time (seconds)"]) + float(atv["System time (seconds)"]))
                r["agent_switches"].append(int(atv["Voluntary context switches"])
                                           + int(atv["Involuntary context switches"]))
                r["agent_wall"].append(a["wall"])
                shutil.rmtree(a["state"], ignore_errors=True)
                os.remove(target)
            if shutil.which("strace"):
                target = self.fresh("rate-target.bin")
                open(target, "wb").close()
                mid, req = self.request("http", port, f"/rate/{rate}/bench/", name, f"rate-{rate}-strace",
                                        md5=md5, size=mib * MIB)
                st = os.path.join(self.work, f"strace-rate-{rate}.txt")
                state = self.fresh("state-strace")
                with open(req) as stdin:
                    sh(["strace", "-f", "-c", "-e", "trace=fsync,fdatasync,sync_file_range", "-o", st,
                        self.bin, "run", "--transport", "stdio", "--state-dir", state,
                        "--flash", "file:" + target, "--device-id", "bench"], stdin=stdin)
                calls = {}
                for line in open(st):
                    cols = line.split()
                    if cols and cols[-1] in ("fsync", "fdatasync", "sync_file_range"):
                        calls[cols[-1]] = int(cols[3]) if len(cols) >= 6 else int(cols[2])
                r["syncs"] = calls.get("fsync", 0) + calls.get("fdatasync", 0)
                r["writeback"] = calls.get("sync_file_range", 0)
                shutil.rmtree(state, ignore_errors=True)
                os.remove(target)
            os.remove(img)
            out[rate] = r
        self.results["rate"] = out

    def crash_refetch(self):
        """kill -9 at 50 % (FWAGENT_CRASH_AT=mid-download), restart < /dev/null; what nginx sent."""
        uri = "/bench/crash.bin"
        logf = self.env["FWAGENT_TEST_NGINX_LOG"]
        mid, req = self.http_request("crash", name="crash.bin")
        state = self.fresh("state-crash")
        target = self.fresh("crash-target.bin")
        open(target, "wb").close()  # file: flashes only an existing target
        log("kill -9 at 50 %, then restart")
        r1 = self.run_agent(mid, req, "file:" + target, "crash-1", state=state,
                            env_extra={"FWAGENT_CRASH_AT": "mid-download"}, expect_ok=False)
        # /usr/bin/time reports a child killed by signal 9 as exit 128 + 9
        if r1["rc"] not in (-9, 137):
            raise RuntimeError(f"the crashing run exited {r1['rc']}, expected SIGKILL")
        r2 = self.run_agent(mid, req, "file:" + target, "crash-2", state=state, stdin_path=os.devnull)
        entries = []
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            entries = []
            for line in open(logf):
                try:
                    e = json.loads(line)
                except ValueError:
                    continue
                if e.get("request_uri", "").split("?")[0] == uri:
                    entries.append(e)
            if len(entries) >= 2 and sum(e["body_bytes_sent"] for e in entries) >= self.size:
                break
            time.sleep(0.1)
        sent = sum(e["body_bytes_sent"] for e in entries)
        ranges = [e.get("range", "") for e in entries]
        resumed_at = None
        for rg in ranges:
            m = re.match(r"bytes=(\d+)-", rg or "")
            if m:
                resumed_at = int(m.group(1))
        first = entries[0]["body_bytes_sent"] if entries else None
        self.results["crash"] = {
            "requests": len(entries), "body_bytes_sent": sent, "refetched": sent - self.size,
            "ranges": ranges, "resumed_at": resumed_at, "first_request_sent": first,
            "checkpoint_bytes": 4 * MIB, "crash_offset": self.size // 2,
            "restart_wall": r2["wall"], "restart_phases": r2["phases"],
        }
        shutil.rmtree(state, ignore_errors=True)
        if os.path.exists(target):
            os.remove(target)

    def ack_latency(self):
        log(f"request -> durable ack, {self.a.acks} requests")
        state = self.fresh("state-ack")
        p = sh([sys.executable, os.path.join(os.path.dirname(__file__), "bench_ack.py"), "--bin", self.bin,
                "--state-dir", state, "--count", str(self.a.acks)])
        if p.returncode != 0:
            raise RuntimeError(f"bench_ack.py failed: {p.stderr.strip()}")
        self.results["ack"] = json.loads(p.stdout)
        shutil.rmtree(state, ignore_errors=True)

    # ---------------------------------------------------------------- report

    def machine(self):
        cpu = "?"
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem = 0
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem = int(line.split()[1]) // 1024
        osname = "?"
        try:
            for line in open("/etc/os-release"):
                if line.startswith("PRETTY_NAME="):
                    osname = line.split("=", 1)[1].strip().strip('"')
        except FileNotFoundError:
            pass
        hyper = first_line("lscpu | sed -n 's/^Hypervisor vendor: *//p'")
        container = first_line("systemd-detect-virt -c 2>/dev/null")
        virt = ", ".join(x for x in (f"{hyper} guest" if hyper not in ("?", "") else "",
                                     f"{container} container" if container not in ("?", "", "none") else "") if x)
        fs = first_line(f"df -T {self.work} | awk 'NR==2{{print $2\" on \"$1}}'")
        return {
            "cpu": f"{cpu}, {os.cpu_count()} CPUs" + (f" ({virt})" if virt else ""),
            "memory": f"{mem} MiB",
            "os": f"{osname}, Linux {platform.release()}",
            "disk": fs,
            "load_at_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
            "tools": "; ".join([
                first_line("rustc -V"),
                first_line("curl --version").split(" (")[0],
                first_line("nginx -v"), first_line("vsftpd -v 0>&1"),
            ]),
        }

    def signature_rounds(self):
        """HTTP download+verify with signature checking (--trust-key, --require-signature:
        SHA-256 beside md5, the .sig fetched and checked) against the same without, in
        alternating rounds. The key is made here with openssl, the .sig with `fwagent sign`."""
        key = os.path.join(self.work, "bench-key.pem")
        pub = os.path.join(self.work, "bench-key.pub.pem")
        for cmd in (["openssl", "genpkey", "-algorithm", "ed25519", "-out", key],
                    ["openssl", "pkey", "-in", key, "-pubout", "-out", pub],
                    [self.bin, "sign", "--key", key, self.image]):
            r = sh(cmd)
            if r.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)}: exit {r.returncode}: {r.stderr.strip()}")
        sig = self.image + ".sig"
        s = {"nosig_dv": [], "sig_dv": []}
        try:
            for i in range(self.a.pairs):
                log(f"signature round {i + 1}/{self.a.pairs}")
                for label, extra in (("nosig", ()), ("sig", ("--trust-key", pub, "--require-signature"))):
                    target = self.fresh(f"{label}-target.bin")
                    open(target, "wb").close()
                    mid, req = self.http_request(label)
                    r = self.run_agent(mid, req, "file:" + target, f"{label}-{i}", extra_args=extra)
                    if label == "sig" and "signature verified" not in open(
                            os.path.join(self.work, f"agent-{label}-{i}.log")).read():
                        raise RuntimeError("the signed run did not check the signature")
                    s[f"{label}_dv"].append(r["phases"]["download_verify"])
                    shutil.rmtree(r["state"], ignore_errors=True)
                    os.remove(target)
        finally:
            if os.path.exists(sig):
                os.remove(sig)
            self.results["samples"].update(s)

    def table(self):
        s = self.results["samples"]
        rows = []

        def fmt_s(x):
            return "—" if x is None else f"{x:.2f} s"

        def ratios(a, b):
            return [x / y for x, y in zip(a, b)]

        def ratio_row(figure, agent, base, base_name, target, how):
            if not agent or not base:
                return None
            rs = ratios(agent, base)
            m = median(rs)
            ok = "met" if m <= target else f"**missed** by {(m / target - 1) * 100:.0f} %"
            return (f"| {figure} | {fmt_s(median(agent))} | {base_name}: {fmt_s(median(base))} | "
                    f"{m:.2f}× ({' '.join(f'{r:.2f}' for r in rs)}) | ≤ {target:.2f}× | {ok} |", how)

        hdr = ("| figure | fwagent (median) | compared with (median) | ratio: median (per pair) | target | |\n"
               "|---|---|---|---|---|---|")
        rows.append(ratio_row("HTTP download+verify", s.get("agent_dv"), s.get("curl_md5"),
                              "`curl -s URL \\| md5sum`", 1.10, "log"))
        ftp = self.results.get("ftp", {})
        if ftp.get("status") == "built":
            rows.append(ratio_row("FTP download+verify", s.get("agent_ftp_dv"), s.get("curl_ftp_md5"),
                                  "`curl -s ftp://… \\| md5sum`", 1.10, "log"))
        else:
            rows.append((f"| FTP download+verify | {ftp.get('status', 'not run')} | "
                         f"`curl -s ftp://… \\| md5sum`: {fmt_s(median(s.get('curl_ftp_md5')))} | — | ≤ 1.10× | — |", ""))
        sig_row = ratio_row("HTTP download+verify, signature checked", s.get("sig_dv"), s.get("nosig_dv"),
                            "the same without `--trust-key`", 1.10, "log")
        rows.append(sig_row or ("| HTTP download+verify, signature checked | not run | the same without "
                                "`--trust-key` | — | ≤ 1.10× | — |", ""))
        rows.append(ratio_row("full upgrade to `file:`", s.get("agent_file"), s.get("baseline_full"),
                              "`curl -o F URL && md5sum F && dd … conv=fsync`", 1.0, "wall"))
        ab = self.results.get("ab", {})
        if ab.get("status") == "built" and s.get("agent_ab"):
            rows.append(ratio_row("full upgrade to `ab:`", s.get("agent_ab"), s.get("baseline_full"),
                                  "the same", 0.7, "wall"))
        else:
            rows.append((f"| full upgrade to `ab:` | not built | the same: {fmt_s(median(s.get('baseline_full')))} | — "
                         f"| ≤ 0.70× | — |", ""))
        rss = [x for x in s.get("agent_rss", []) if x]
        crss = [x for x in s.get("curl_rss", []) if x]
        if rss:
            peak = max(rss) / 1024
            rows.append((f"| peak RSS during a {self.size / MIB:.0f} MiB upgrade (`/usr/bin/time -v`; "
                         f"the largest of {len(rss)} runs, median) | "
                         f"{peak:.1f} MiB ({median(rss) / 1024:.1f}) | curl: {max(crss) / 1024:.1f} MiB | — | ≤ 16 MiB | "
                         f"{'met' if peak <= 16 else f'**missed** by {peak - 16:.1f} MiB'} |", ""))
        c = self.results.get("crash")
        if c:
            ref = c["refetched"] / MIB
            cp = c["checkpoint_bytes"]
            ok = "met" if c["refetched"] <= cp else f"**missed** by {(c['refetched'] - cp) / MIB:.1f} MiB"
            split = ""
            if c.get("resumed_at") is not None and c.get("first_request_sent"):
                lost = c["crash_offset"] - c["resumed_at"]
                in_flight = c["first_request_sent"] - c["crash_offset"]
                split = (f" = {lost / MIB:.1f} received but not checkpointed"
                         f" + {in_flight / MIB:.1f} in socket buffers")
                if c["refetched"] > cp and lost <= cp:
                    ok += f"; the agent's own loss, {lost / MIB:.1f} MiB, is within one checkpoint"
            rows.append((f"| bytes re-fetched after one kill -9 at 50 % (nginx `body_bytes_sent` − size) | "
                         f"{ref:.1f} MiB{split} | image: {self.size / MIB:.0f} MiB | "
                         f"{c['refetched'] / self.size * 100:.2f} % of it "
                         f"| ≤ one checkpoint ({cp / MIB:.0f} MiB) | {ok} |", ""))
        k = self.results.get("ack")
        if k:
            ok = "met" if k["p99_ms"] <= 10 else f"**missed** by {k['p99_ms'] - 10:.1f} ms"
            rows.append((f"| request → durable ack over stdio, {k['count']} requests, p50 / p99 | "
                         f"{k['p50_ms']:.2f} / {k['p99_ms']:.2f} ms (max {k['max_ms']:.1f}) | — | — | "
                         f"p99 ≤ 10 ms | {ok} |", ""))
            size = os.path.getsize(self.bin) / MIB
            idle = k["idle_rss_kib"] / 1024
            anon = (k.get("idle_anon_kib") or 0) / 1024
            miss = []
            if size > 6:
                miss.append(f"size by {size - 6:.2f} MiB")
            if idle > 6:
                miss.append(f"idle RSS by {idle - 6:.2f} MiB")
            if anon > 2:
                miss.append(f"anonymous by {anon - 2:.2f} MiB")
            ok = "met" if not miss else "**missed**: " + ", ".join(miss)
            rows.append((f"| stripped release binary, idle RSS (anonymous) | {size:.2f} MiB, {idle:.2f} MiB "
                         f"({anon:.2f}) | — | — | ≤ 6 MiB, ≤ 6 MiB (≤ 2) | {ok} |", ""))
            wake = k.get("idle_wakeups_per_s")
            if wake is not None:
                rows.append((f"| wake-ups per second when idle (context switches of all {k.get('idle_threads')} "
                             f"threads over 10 s) | {wake:.1f} | — | — | 0 | "
                             f"{'met' if wake < 0.5 else '**missed**'} |", ""))
        for rate, r in sorted((self.results.get("rate") or {}).items(), reverse=True):
            per_gib = 1024 / r["mib"]
            dv = median(r["agent_dv_cpu"]) * per_gib
            agent = median(r["agent_cpu"]) * per_gib
            curl = median(r["curl_md5_cpu"]) * per_gib
            full = median(r["baseline_full_cpu"]) * per_gib
            speed = "10 MiB/s" if rate == "10m" else "1 MiB/s"
            target = 1.3 if rate == "10m" else None
            ratio = dv / curl if curl else float("inf")
            ok = ("met" if ratio <= target else f"**missed** by {(ratio / target - 1) * 100:.0f} %") if target else "—"
            rows.append((f"| CPU seconds per GiB at {speed} (user + sys), download+verify (`--flash command:true`) | "
                         f"{dv:.2f} s | `curl \\| md5sum`: {curl:.2f} s | {ratio:.2f}× | "
                         f"{'≤ 1.30×' if target else '—'} | {ok} |", ""))
            rows.append((f"| CPU seconds per GiB at {speed}, full upgrade to `file:` (read back from the medium) | "
                         f"{agent:.2f} s | `curl -o; md5sum; dd conv=fsync`: {full:.2f} s | {agent / full:.2f}× | "
                         f"— | — |", ""))
            wake = median([sw / w for sw, w in zip(r["agent_switches"], r["agent_wall"])])
            syncs = r.get("syncs")
            per_mib = "—" if syncs is None else f"{syncs / r['mib']:.2f} ({r['writeback'] / r['mib']:.1f})"
            note = "(strace not installed)" if syncs is None else ""
            rows.append((f"| at {speed}, full upgrade to `file:`: fsync + fdatasync per MiB (sync_file_range "
                         f"writeback hints), wake-ups per second | {per_mib}, {wake:.0f} | — | — | — | {note} |", ""))
        lines = [hdr] + [r[0] for r in rows if r]
        m = self.results["machine"]
        desc = [
            f"Machine: {m['cpu']}; {m['memory']} RAM; {m['os']}; disk {m['disk']}; "
            f"load average {m['load_at_start']} at start, "
            f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} at the end.",
            f"Tools: {m['tools']}.",
            f"Image: {self.size / MIB:.0f} MiB of /dev/urandom; {self.a.pairs} alternating pairs "
            f"(baseline first in each); servers: nginx and vsftpd on 127.0.0.1 (scripts/test-servers.sh).",
        ]
        return "\n".join(lines), desc

    def phases_text(self):
        s = self.results["samples"]
        out = []
        for key, name in (("agent_phases", "HTTP → file:"), ("agent_ftp_phases", "FTP → file:"),
                          ("ab_phases", "HTTP → ab:")):
            ph = s.get(key) or []
            if not ph:
                continue
            parts = []
            for k in ("download", "verify_finish", "flash", "accept_to_end"):
                vals = [p[k] for p in ph if k in p]
                if vals:
                    parts.append(f"{k.replace('_', ' ')} {median(vals):.2f} s")
            out.append(f"Agent phases, {name} (medians, from `fwagent show --json`): " + ", ".join(parts) + ".")
        c = self.results.get("crash")
        if c:
            out.append(
                f"Kill -9 at 50 %: {c['requests']} requests for the image, ranges {c['ranges']}; the first sent "
                f"{(c['first_request_sent'] or 0) / MIB:.1f} MiB, the agent died at "
                f"{c['crash_offset'] / MIB:.0f} MiB received and resumed from its last checkpoint at "
                f"{(c['resumed_at'] or 0) / MIB:.1f} MiB; the restart took {c['restart_wall']:.2f} s.")
        k = self.results.get("ack")
        if k:
            out.append(
                f"Acks: {k['count']} invalid-but-parsable requests (protocol \"sftp\", fresh messageIds, "
                f"errorNo {', '.join(str(x) for x in k['error_nos'])}), after {k['warmup']} unmeasured; "
                f"each ack follows one committed, fdatasynced decision. mean {k['mean_ms']:.2f} ms, "
                f"p90 {k['p90_ms']:.2f} ms. Idle RSS read from /proc after 2 s idle "
                f"({(k.get('idle_anon_kib') or 0) / 1024:.2f} MiB anonymous, "
                f"{(k.get('idle_file_kib') or 0) / 1024:.2f} MiB file-backed: the binary's and libc's pages); "
                f"after the {k['count']} requests it was {k['rss_after_kib'] / 1024:.1f} MiB.")
        ab = self.results.get("ab", {})
        if ab.get("status") != "built":
            out.append(f"`--flash ab:` not built in this binary: {ab.get('detail', '')}")
        else:
            ph = s.get("ab_phases") or []
            fl = median([p["flash"] for p in ph if "flash" in p])
            dl = median([p["download"] for p in ph if "download" in p])
            if fl is not None and dl is not None:
                out.append(
                    f"`ab:` streams the image into the inactive slot as it arrives, verified as read back from the medium one checkpoint behind; "
                    f"the flash phase only fsyncs the slot and switches next-boot ({fl:.2f} s against "
                    f"{dl:.2f} s of download).")
        ftp = self.results.get("ftp", {})
        if ftp.get("status") not in ("built", None):
            out.append(f"FTP: {ftp.get('status')}: {ftp.get('detail', '')}")
        return out

    def main(self):
        self.results["machine"] = self.machine()
        self.results["started"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        steps = [("http", self.http_rounds), ("ftp", self.ftp_rounds), ("sig", self.signature_rounds),
                 ("crash", self.crash_refetch), ("ack", self.ack_latency), ("rate", self.rate_rounds)]
        errors = []
        for name, fn in steps:
            try:
                fn()
            except Exception as e:  # noqa: BLE001 -- report it in the table, go on
                log(f"{name}: {e}")
                errors.append(f"{name}: {e}")
        self.results["errors"] = errors
        table, desc = self.table()
        date = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
        text = "\n".join(
            [f"fwagent bench, {date}: `make bench` (scripts/bench.sh)", ""] + desc + ["", table, ""]
            + self.phases_text() + ([""] + [f"ERROR {e}" for e in errors] if errors else []))
        print(text)
        with open(os.path.join(self.out, "table.md"), "w") as f:
            f.write(text + "\n")
        with open(os.path.join(self.out, "results.json"), "w") as f:
            json.dump(self.results, f, indent=1, default=str)
        return 1 if errors else 0


def main():
    ap = argparse.ArgumentParser(description="fwagent benchmarks (see docs/BENCH.md)")
    ap.add_argument("--bin", required=True)
    ap.add_argument("--env-file", required=True)
    ap.add_argument("--image", required=True)
    ap.add_argument("--md5", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--acks", type=int, default=1000)
    ap.add_argument("--only", default="", help="comma-separated subset: http,ftp,sig,crash,ack,rate (debugging)")
    a = ap.parse_args()
    b = Bench(a)
    if a.only:
        keep = set(a.only.split(","))
        for name, attr in (("http", "http_rounds"), ("ftp", "ftp_rounds"), ("sig", "signature_rounds"),
                           ("crash", "crash_refetch"), ("ack", "ack_latency"), ("rate", "rate_rounds")):
            if name not in keep:
                setattr(b, attr, lambda: None)
    sys.exit(b.main())


if __name__ == "__main__":
    main()
