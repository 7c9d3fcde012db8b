#!/usr/bin/env bash
# `make demo`: one real upgrade, end to end, on this machine.
#
# 1. builds fwagent and makes a random firmware image;
# 2. serves it on 127.0.0.1 (HTTP: examples/fileserver.rs; PROTOCOL=ftp: pyftpdlib
#    with the seed's own user name and password);
# 3. takes the seed's first message (examples/requests/seed-1-ftp.json), points it at
#    that server (host 127.0.0.1, our port, the image's md5 and size) and feeds it to
#    `fwagent run --transport stdio`, which prints the ack and the reports;
# 4. shows `fwagent status` and `fwagent history`, and checks the flashed file's md5.
#
# FLASH=ab: the image streams into the inactive slot of two slot files instead
# (docs/AB-SLOTS.md); the "reboot" the agent asks for is a script that only notes
# it, examples/ab-bootloader.py plays the bootloader's power-on, and a second
# start of the agent checks the new slot and commits it.
#
# Nothing here contacts a host off this machine. Everything lives in a temp dir
# (kept with KEEP=1).
set -euo pipefail
cd "$(dirname "$0")/.."

PROTOCOL=${PROTOCOL:-http}
FLASH=${FLASH:-file}
SIZE=${SIZE:-66143}
CARGO=${CARGO:-cargo}
case "$PROTOCOL" in http|ftp) ;; *) echo "PROTOCOL must be http or ftp" >&2; exit 2;; esac
case "$FLASH" in file|ab) ;; *) echo "FLASH must be file or ab" >&2; exit 2;; esac

work=$(mktemp -d "${TMPDIR:-/tmp}/fwagent-demo.XXXXXX")
pids=()
cleanup() {
    for p in "${pids[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
    if [ "${KEEP:-0}" = 1 ]; then echo "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "building fwagent"
$CARGO build --quiet --bin fwagent --example fileserver
bin=target/debug/fwagent

# The seed's directory and file name, so the request changes as little as possible.
seed=examples/requests/seed-1-ftp.json
read -r dir name < <(python3 -c '
import json,sys
r=json.load(open(sys.argv[1]))
print(r["info"]["serverConfig"]["path"], r["info"]["fileInfo"]["firmwareName"].strip())' "$seed")
root="$work/www"
mkdir -p "$root$dir"
image="$root$dir$name"
head -c "$SIZE" /dev/urandom > "$image"
md5=$(md5sum "$image" | cut -d' ' -f1)
step "firmware: $name, $SIZE bytes, md5 $md5"

if [ "$PROTOCOL" = http ]; then
    target/debug/examples/fileserver --root "$root" --port 0 --port-file "$work/port" >"$work/server.log" 2>&1 &
    pids+=($!)
else
    if ! python3 -c 'import pyftpdlib' 2>/dev/null; then
        step "installing pyftpdlib (pip)"
        pip install --quiet pyftpdlib
    fi
    user=$(python3 -c 'import json,sys,base64;print(base64.b64decode(json.load(open(sys.argv[1]))["info"]["serverConfig"]["userName"]).decode())' "$seed")
    pass=$(python3 -c 'import json,sys,base64;print(base64.b64decode(json.load(open(sys.argv[1]))["info"]["serverConfig"]["password"]).decode())' "$seed")
    port=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
    python3 -m pyftpdlib -i 127.0.0.1 -p "$port" -u "$user" -P "$pass" -d "$root" >"$work/server.log" 2>&1 &
    pids+=($!)
    echo "$port" > "$work/port"
fi
for _ in $(seq 100); do [ -s "$work/port" ] && break; sleep 0.1; done
port=$(cat "$work/port")
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/"$port") 2>/dev/null && break; sleep 0.1; done
step "serving it over $PROTOCOL on 127.0.0.1:$port"

python3 - "$seed" "$PROTOCOL" "$port" "$md5" "$SIZE" > "$work/request.json" <<'EOF'
import json, sys
seed, protocol, port, md5, size = sys.argv[1:]
r = json.load(open(seed))
sc = r["info"]["serverConfig"]
assert sc["host"] == "127.0.0.1", "the examples never name an outside host"
sc["protocol"], sc["port"] = protocol, int(port)
r["info"]["fileInfo"]["md5sum"], r["info"]["fileInfo"]["upgradeFileSize"] = md5, int(size)
print(json.dumps(r))
EOF
step "the request (the seed's message, pointed at 127.0.0.1:$port)"
python3 -m json.tool "$work/request.json"

state="$work/state"
if [ "$FLASH" = ab ]; then
    slots="$work/slots"
    mkdir -p "$slots"
    printf 'the firmware this gateway runs today\n' > "$slots/slot-a"
    reboot="$work/reboot.sh"
    printf '#!/bin/sh\necho "(the agent asked for a reboot)" >&2\n' > "$reboot"
    chmod +x "$reboot"
    step "fwagent run --flash ab:$slots  (stdout: the ack, then the reports)"
    "$bin" run --transport stdio --state-dir "$state" --flash "ab:$slots" --device-id demo-gw \
        --reboot-command "$reboot" < "$work/request.json" 2> "$work/agent.log"
    grep -h "asked for a reboot" "$work/agent.log" || true
    step "bootctl.json: slot b written and verified, next boot switched to it"
    cat "$slots/bootctl.json"
    step "fwagent status --state-dir $state"
    "$bin" status --state-dir "$state"
    step "power-on (examples/ab-bootloader.py): the bootloader boots slot $(python3 examples/ab-bootloader.py "$slots") on a trial"
    step "fwagent run again, as init would after the reboot (stdout: the result)"
    "$bin" run --transport stdio --state-dir "$state" --flash "ab:$slots" --device-id demo-gw \
        --reboot-command "$reboot" --health-command 'echo "health check: ok" >&2' \
        < /dev/null 2>> "$work/agent.log"
    grep -h "health check: ok" "$work/agent.log" || true
    step "bootctl.json: slot b committed"
    cat "$slots/bootctl.json"
    step "fwagent history --state-dir $state"
    "$bin" history --state-dir "$state"
    got=$(md5sum "$slots/slot-b" | cut -d' ' -f1)
    active=$(python3 -c 'import json,sys;print(json.load(open(sys.argv[1]))["active"])' "$slots/bootctl.json")
    if [ "$got" = "$md5" ] && [ "$active" = b ]; then
        step "slot b holds md5 $got and is the active slot: the upgrade is complete"
        exit 0
    fi
    echo "slot b md5 $got (expected $md5), active slot $active (expected b)" >&2
    exit 1
fi

step "fwagent run --transport stdio  (stdout: the ack, then the reports)"
flash="$work/flashed.bin"
: > "$flash"   # the partition: file: flashes only an existing file or block device
"$bin" run --transport stdio --state-dir "$state" --flash "file:$flash" --device-id demo-gw \
    < "$work/request.json" 2> "$work/agent.log"
echo "(agent log: $work/agent.log)"

step "fwagent status --state-dir $state"
"$bin" status --state-dir "$state"
step "fwagent history --state-dir $state"
"$bin" history --state-dir "$state"

got=$(md5sum "$flash" | cut -d' ' -f1)
if [ "$got" = "$md5" ]; then
    step "flashed image md5 $got matches: the upgrade is complete"
else
    echo "flashed image md5 $got, expected $md5" >&2
    exit 1
fi
