#!/usr/bin/env bash
# `make test`: start the real servers, check formatting and lints, run every test with the
# servers' env sourced, and stop the servers whatever happens. Exit code is the first failure's.
#
#   FWAGENT_TEST_TIMEOUT   seconds allowed for `cargo test` (build included); default 1800
#   CARGO_TEST_ARGS        extra arguments for `cargo test --workspace` (e.g. "-- --nocapture")
#   POWERCUT_TEST_CUTS     power cuts in the VM step after cargo test (default 10; docs/POWERCUT.md)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
CARGO="${CARGO:-cargo}"
SERVERS=scripts/test-servers.sh
ENV_FILE="${FWAGENT_TEST_SERVERS_DIR:-$PWD/target/test-servers}/env"

step() { printf '\n==> %s\n' "$*" >&2; }

finish() {
    local rc=$?
    trap - EXIT INT TERM
    if [ "$rc" -ne 0 ] && [ "$STAGE" = test ]; then
        step "tests failed (exit $rc); last lines of the servers' logs"
        "$SERVERS" logs || true
    fi
    step "stopping test servers"
    "$SERVERS" stop || true
    exit "$rc"
}
# One `make test` at a time per run directory (people share this work tree): the second
# waits rather than restarting the first one's servers under its tests.
mkdir -p "$(dirname "$ENV_FILE")"
exec 9>"$(dirname "$ENV_FILE").lock"
if ! flock -n 9; then
    step "another make test is using the test servers; waiting for it"
    flock 9
fi

STAGE="start"
trap finish EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

step "starting test servers"
"$SERVERS" start 9>&-

STAGE="lint"
step "cargo fmt --all --check"
"$CARGO" fmt --all --check 9>&-

step "cargo clippy --workspace --all-targets -- -D warnings"
"$CARGO" clippy --workspace --all-targets -- -D warnings 9>&-

STAGE="test"
step "cargo test --workspace"
set -a
# shellcheck disable=SC1090
. "$ENV_FILE"
set +a
# shellcheck disable=SC2086
timeout -k 30 "${FWAGENT_TEST_TIMEOUT:-1800}" "$CARGO" test --workspace --no-fail-fast ${CARGO_TEST_ARGS:-} 9>&-

STAGE="powercut"
step "power cuts in a QEMU VM (scripts/powercut.sh, CUTS=${POWERCUT_TEST_CUTS:-10}; KVM or TCG)"
CUTS="${POWERCUT_TEST_CUTS:-10}" timeout -k 30 "${POWERCUT_TEST_TIMEOUT:-1200}" scripts/powercut.sh 9>&-
