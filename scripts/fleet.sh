#!/usr/bin/env bash
# `make fleet N=200`: N real agents on one Mosquitto and one nginx (scripts/fleet.py says what
# is measured). Builds the release binary, starts the test servers in target/fleet/servers (so
# a `make test` in this tree is not disturbed), runs the fleet, stops the servers.
#
#   N=200          agents
#   FLEET_ARGS=""  more flags for scripts/fleet.py (--size-kib, --rate, --timeout)
#
# Each agent is ~9 MiB of RSS, mostly shared binary pages. Nothing here contacts a host off
# this machine.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
CARGO=${CARGO:-cargo}
N=${N:-200}
OUT=target/fleet
export FWAGENT_TEST_SERVERS_DIR="$PWD/$OUT/servers"
mkdir -p "$OUT"
"$CARGO" build --release --bin fwagent
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
finish() {
    local rc=$?
    trap - EXIT INT TERM
    scripts/test-servers.sh stop || true
    exit "$rc"
}
trap finish EXIT INT TERM
scripts/test-servers.sh start
# shellcheck disable=SC2086
python3 scripts/fleet.py --bin target/release/fwagent --env-file "$FWAGENT_TEST_SERVERS_DIR/env" \
    --work "$OUT/run" -n "$N" ${FLEET_ARGS:-}
