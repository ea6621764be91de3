#!/usr/bin/env bash
# Run every busted spec through a kengine binary, against loopback servers
# this script starts: a real OpenSSH sshd and a real HTTPS server, each with
# throwaway keys.  Usage: tests/run.sh [KENGINE_BIN] [busted args...]
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-./kengine}
shift || true
bin=$(readlink -f "$bin")

tmp=$(mktemp -d /tmp/kengine-test.XXXXXX)
chmod 755 "$tmp"   # the loopback sshd user reaches target paths under it
https_pid=
cleanup() {
  # the lab the lab specs brought up (tests/helpers.lua H.lab), if any
  if [ -z "${KG_KEEP_LAB:-}" ]; then
    "$bin" lab down --name "${KG_TEST_LAB:-kgtest}" >/dev/null 2>&1 || true
    "$bin" lab down --name "${KG_TEST_LAB:-kgtest}m" >/dev/null 2>&1 || true   # tests/mission's own
    "$bin" lab down --name "${KG_TEST_LAB:-kgtest}e" >/dev/null 2>&1 || true   # tests/lab/examples_spec's own
  fi
  tests/support/sshd.sh stop "$tmp/sshd" >/dev/null 2>&1 || true
  [ -n "$https_pid" ] && kill "$https_pid" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT

tests/support/sshd.sh start "$tmp/sshd" >/dev/null
python3 tests/support/https_server.py "$tmp/https" >"$tmp/https.log" 2>&1 &
https_pid=$!
for _ in $(seq 100); do [ -f "$tmp/https/ready" ] && break; sleep 0.1; done
[ -f "$tmp/https/ready" ] || { echo "HTTPS test server did not start:"; cat "$tmp/https.log"; exit 1; }

export KENGINE_BIN="$bin" KG_TEST_TMP="$tmp" KG_TEST_SSHD="$tmp/sshd" KG_TEST_HTTPS="$tmp/https"
export HOME_FOR_TESTS="$tmp/home"
mkdir -p "$HOME_FOR_TESTS"
"$bin" run tests/busted.lua "$@"
