#!/usr/bin/env python3
"""Request -> durable ack latency over stdio, and the agent's idle RSS.

Starts `fwagent run --transport stdio` with a fresh state dir and a pipe on
its stdin, waits until it is up (its control socket exists) and idle, reads
its RSS from /proc, then writes one request line at a time and waits for the
ack line before writing the next, COUNT times (after WARMUP unmeasured ones).

Every request is valid JSON with a fresh messageId and the protocol "sftp":
the agent parses it, decides "errorNo 5, unsupported protocol", commits that
decision and its ack to the store (sled flush + fdatasync) and only then
writes the ack. So each measured round trip holds exactly one durable commit,
and no upgrade starts (a valid request would start a download and the rest
would be answered "busy" while it runs).

Prints one JSON object on stdout. Used by scripts/bench_run.py; runs alone:

    scripts/bench_ack.py --bin target/release/fwagent --state-dir /tmp/s --count 1000
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time


def rss_kib(pid):
    """VmRSS and VmHWM of a process, in KiB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0])
    return out


def switches(pid):
    """Context switches of all of a process's threads so far (each is a wake-up)."""
    n = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches"):
                    n += int(value)
    return n, len(os.listdir(f"/proc/{pid}/task"))


def percentile(sorted_values, p):
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return None
    k = max(1, -(-len(sorted_values) * p // 100))  # ceil(n * p / 100)
    return sorted_values[int(k) - 1]


def request_line(i):
    return json.dumps({
        "operator": "setCloudUpgradeConfig",
        "sessionId": f"SID:bench-{i:06d}",
        "messageId": f"MID:bench-ack-{os.getpid()}-{i:06d}",
        "info": {
            "serverConfig": {
                "port": 22, "host": "127.0.0.1", "userName": "", "password": "",
                "protocol": "sftp", "path": "/firmware/",
            },
            "fileInfo": {
                "firmwareName": "bench.bin",
                "md5sum": "9e107d9d372bb6826bd81d3542a419d6",
                "upgradeFileSize": 1048576,
            },
        },
    }, separators=(",", ":")) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bin", required=True)
    ap.add_argument("--state-dir", required=True)
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--idle-wait", type=float, default=2.0, help="seconds idle before reading RSS")
    ap.add_argument("--idle-window", type=float, default=10.0, help="seconds over which idle wake-ups are counted")
    a = ap.parse_args()

    shutil.rmtree(a.state_dir, ignore_errors=True)
    os.makedirs(a.state_dir)
    stderr = open(os.path.join(os.path.dirname(a.state_dir.rstrip("/")) or ".",
                               os.path.basename(a.state_dir.rstrip("/")) + ".agent.log"), "w")
    target = os.path.join(a.state_dir, "never-written.bin")
    open(target, "wb").close()  # file: flashes only an existing file or block device
    p = subprocess.Popen(
        [a.bin, "run", "--transport", "stdio", "--state-dir", a.state_dir,
         "--flash", "file:" + target, "--device-id", "bench"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, bufsize=0)
    out = p.stdout
    sock = os.path.join(a.state_dir, "control.sock")
    deadline = time.monotonic() + 20
    while not os.path.exists(sock):
        if p.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"bench_ack: the agent did not come up (exit {p.poll()})")
        time.sleep(0.01)
    time.sleep(a.idle_wait)
    idle = rss_kib(p.pid)
    before, _ = switches(p.pid)
    time.sleep(a.idle_window)
    after_idle, threads = switches(p.pid)

    def one(i):
        line = request_line(i).encode()
        t0 = time.perf_counter()
        os.write(p.stdin.fileno(), line)
        ack = out.readline()
        t1 = time.perf_counter()
        if not ack:
            sys.exit(f"bench_ack: the agent closed stdout after {i} requests (exit {p.poll()})")
        msg = json.loads(ack)
        want = json.loads(line)["messageId"]
        if msg.get("messageId") != want or msg.get("operator") != "setCloudUpgradeConfig-Ack":
            sys.exit(f"bench_ack: expected the ack of {want}, got {ack!r}")
        return t1 - t0, msg["result"]["errorNo"]

    for i in range(a.warmup):
        one(i)
    lat, codes = [], {}
    t_all = time.perf_counter()
    for i in range(a.warmup, a.warmup + a.count):
        dt, no = one(i)
        lat.append(dt * 1000.0)
        codes[no] = codes.get(no, 0) + 1
    t_all = time.perf_counter() - t_all
    after = rss_kib(p.pid)
    p.stdin.close()
    rc = p.wait(timeout=30)
    stderr.close()
    s = sorted(lat)
    print(json.dumps({
        "count": a.count,
        "warmup": a.warmup,
        "error_nos": codes,
        "p50_ms": percentile(s, 50),
        "p90_ms": percentile(s, 90),
        "p99_ms": percentile(s, 99),
        "max_ms": s[-1],
        "mean_ms": sum(s) / len(s),
        "total_s": t_all,
        "idle_rss_kib": idle["VmRSS"],
        "idle_wakeups_per_s": (after_idle - before) / a.idle_window,
        "idle_threads": threads,
        "idle_hwm_kib": idle["VmHWM"],
        "idle_anon_kib": idle.get("RssAnon"),
        "idle_file_kib": idle.get("RssFile"),
        "rss_after_kib": after["VmRSS"],
        "hwm_after_kib": after["VmHWM"],
        "exit": rc,
    }))


if __name__ == "__main__":
    main()
