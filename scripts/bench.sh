#!/usr/bin/env bash
# `make bench`: fwagent against curl, md5sum and dd on this machine (docs/BENCH.md).
#
# 1. builds the release binary (`cargo build --release`: lto thin, stripped);
# 2. starts nginx and vsftpd (and the rest) on 127.0.0.1 with scripts/test-servers.sh, in a run
#    directory of its own (target/bench/servers), so a `make test` in this tree is not disturbed;
#    stops them on exit;
# 3. makes a random image (512 MiB) in their roots;
# 4. runs scripts/bench_run.py: alternating rounds (baseline, agent, ...), at least 5 pairs,
#    and prints the table with the machine's description. Also in target/bench/table.md.
#
#   PAIRS=5          rounds per comparison (at least 5 are used)
#   SIZE_MIB=512     image size
#   ACKS=1000        requests for the ack latency
#   BENCH_ONLY=http,ftp,sig,crash,ack,rate   a subset, for debugging (the table then has gaps)
#
# Exit 0 once the table is printed, whether or not the targets are met; non-zero when the
# bench itself could not run (build, servers, an upgrade that did not complete).
# Nothing here contacts a host off this machine.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
CARGO=${CARGO:-cargo}
PAIRS=${PAIRS:-5}
[ "$PAIRS" -ge 5 ] || PAIRS=5
SIZE_MIB=${SIZE_MIB:-512}
ACKS=${ACKS:-1000}
OUT=${FWAGENT_BENCH_DIR:-$ROOT/target/bench}
export FWAGENT_TEST_SERVERS_DIR="$OUT/servers"
SERVERS=scripts/test-servers.sh
BIN=target/release/fwagent

step() { printf '\n==> %s\n' "$*" >&2; }

mkdir -p "$OUT"
# One bench at a time in this tree (they would fight over the servers and the CPU).
exec 9>"$OUT.lock"
if ! flock -n 9; then
    step "another make bench is running here; waiting for it"
    flock 9
fi

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo -n "$@"; fi; }
if [ ! -x /usr/bin/time ]; then
    step "installing GNU time (for peak RSS)"
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -q time >"$OUT/apt.log" 2>&1 ||
        { DEBIAN_FRONTEND=noninteractive as_root apt-get update -q >>"$OUT/apt.log" 2>&1 &&
            DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -q time >>"$OUT/apt.log" 2>&1; } ||
        { tail -n 20 "$OUT/apt.log" >&2; echo "bench: cannot install /usr/bin/time" >&2; exit 1; }
fi

if ! command -v strace >/dev/null; then
    step "installing strace (fdatasyncs counted at gateway rates)"
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -q strace >>"$OUT/apt.log" 2>&1 ||
        { DEBIAN_FRONTEND=noninteractive as_root apt-get update -q >>"$OUT/apt.log" 2>&1 &&
            DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -q strace >>"$OUT/apt.log" 2>&1; } ||
        step "no strace: the fdatasync counts are left out"
fi

step "cargo build --release --bin fwagent"
"$CARGO" build --release --bin fwagent 9>&-

finish() {
    local rc=$?
    trap - EXIT INT TERM
    step "stopping the bench servers"
    "$SERVERS" stop 9>&- || true
    rm -rf "${FWAGENT_TEST_SERVERS_DIR:?}/nginx/root/bench" "$FWAGENT_TEST_SERVERS_DIR/vsftpd/root/bench" \
        "$OUT/work"
    exit "$rc"
}
trap finish EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

step "starting nginx and vsftpd on 127.0.0.1 (scripts/test-servers.sh, run dir $FWAGENT_TEST_SERVERS_DIR)"
"$SERVERS" start 9>&-
set -a
# shellcheck disable=SC1091
. "$FWAGENT_TEST_SERVERS_DIR/env"
set +a

step "making a ${SIZE_MIB} MiB random image"
mkdir -p "$FWAGENT_TEST_NGINX_ROOT/bench" "$FWAGENT_TEST_VSFTPD_ROOT/bench"
chmod 755 "$FWAGENT_TEST_NGINX_ROOT/bench" "$FWAGENT_TEST_VSFTPD_ROOT/bench"
image="$FWAGENT_TEST_NGINX_ROOT/bench/fw.bin"
head -c "$((SIZE_MIB << 20))" /dev/urandom >"$image"
chmod 644 "$image"
# The same file under other names: vsftpd's root, and a URI of its own for the kill -9 test.
ln -f "$image" "$FWAGENT_TEST_VSFTPD_ROOT/bench/fw.bin"
ln -f "$image" "$FWAGENT_TEST_NGINX_ROOT/bench/crash.bin"
md5=$(md5sum "$image" | cut -d' ' -f1) # also puts it in the page cache, as for every run after
echo "md5 $md5" >&2

step "measuring ($PAIRS pairs per comparison; a few minutes)"
python3 scripts/bench_run.py --bin "$BIN" --env-file "$FWAGENT_TEST_SERVERS_DIR/env" \
    --image "$image" --md5 "$md5" --out "$OUT" --pairs "$PAIRS" --acks "$ACKS" \
    --only "${BENCH_ONLY:-}" 9>&-
