#!/usr/bin/env bash
# Make sure a Docker daemon answers on /var/run/docker.sock, for the lab
# tests and CI (these machines have no systemd).
#
#   tests/support/dockerd.sh          start dockerd unless one already answers
#
# When /_ping already answers, nothing happens. Otherwise dockerd runs in the
# background (storage driver overlay2, logs in /var/log/kengine-dockerd.log,
# pid in /var/run/kengine-dockerd.pid) and the script waits up to 60s for
# /_ping. Safe to run any number of times; needs root.
set -euo pipefail

SOCK=/var/run/docker.sock
LOG=/var/log/kengine-dockerd.log
PIDFILE=/var/run/kengine-dockerd.pid
WAIT=60 # seconds

die() { echo "dockerd.sh: $*" >&2; exit 1; }

ping() {
    [[ -S $SOCK ]] || return 1
    [[ $(curl -s --max-time 5 --unix-socket "$SOCK" http://localhost/_ping 2>/dev/null) == OK ]]
}

if ping; then
    echo "dockerd already answers on $SOCK"
    exit 0
fi

DOCKERD=$(command -v dockerd || true)
[[ -n $DOCKERD ]] || DOCKERD=/usr/sbin/dockerd
[[ -x $DOCKERD ]] || die "Docker is not installed (no dockerd): apt-get install docker.io"
[[ $(id -u) -eq 0 ]] || die "must run as root to start dockerd"
command -v curl >/dev/null || die "curl is needed to check the daemon"

# A dockerd we started before may still be coming up: wait for it instead of
# starting a second one (which would fail on its pid file anyway).
pid=$(cat "$PIDFILE" 2>/dev/null || true)
if ! [[ $pid =~ ^[0-9]+$ ]] || ! kill -0 "$pid" 2>/dev/null ||
    ! tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q dockerd; then
    # A daemon that died uncleanly leaves its pid file and socket behind.
    rm -f /var/run/docker.pid "$SOCK"
    # setsid + no inherited fds: the daemon outlives this script and does not
    # keep a caller's pipe ($(...), CI log capture) open.
    setsid "$DOCKERD" --storage-driver=overlay2 </dev/null >>"$LOG" 2>&1 &
    pid=$!
    echo "$pid" >"$PIDFILE"
    echo "started dockerd (pid $pid, log $LOG)"
fi

for ((i = 0; i < WAIT * 4; i++)); do
    ping && { echo "dockerd answers on $SOCK"; exit 0; }
    kill -0 "$pid" 2>/dev/null || { tail -n 20 "$LOG" >&2; die "dockerd exited; see $LOG"; }
    sleep 0.25
done
tail -n 20 "$LOG" >&2
die "dockerd did not answer on $SOCK within ${WAIT}s; see $LOG"
