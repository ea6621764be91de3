#!/usr/bin/env bash
# bench/run.sh - kengine vs OpenSSH ControlMaster vs the libssh floor, on a
# loopback sshd (tests/support/sshd.sh; login user kengine-test, shell /bin/sh).
#
#   bench/run.sh                      # N in 1 10 100, M in 1 20, 5 repeats
#   NS="1 10" MS="20" REPEATS=3 bench/run.sh
#
# For every N (sessions at once) and M (commands per session, one after
# another), each tool connects N sessions and runs `true` M times on each:
#   floor    bench/floor.c, blocking libssh, one thread per session
#   kengine  bench/kengine_bench.lua, one process, one task per session
#   openssh  bench/openssh.sh, one ControlMaster per session, `ssh -S` per command
# plus one reference row: openssh without multiplexing (a new `ssh` per command),
# and, unless EXTRAS=0, experiments (not used for the goals):
#   floor+quickack, kengine+quickack   N=1: TCP_QUICKACK before every poll()
#                                      (LD_PRELOAD bench/quickack.c; see there)
#   floor, kengine, kengine+gc100      N=100, M=100: does RSS grow with the
#                                      number of commands? (+gc100: Lua GC pause 100)
# Each run goes through GNU time (wall, user+sys CPU, peak RSS); the CPU the
# loopback sshd spent on the run is read from the listener's /proc stat
# (cutime+cstime: its per-connection children are reaped by it).
#
# Writes bench/out/raw.txt (one line per run), bench/out/results.md (the
# table and the goals), and prints results.md.  Needs root only to create the
# test user (sshd.sh) and, when GNU time is missing, to install Debian package
# `time` (apt-get install time).  Talks only to 127.0.0.1; every loop and run
# is bounded (RUN_TIMEOUT seconds per run, default 600).
set -euo pipefail

cd "$(dirname "$0")/.."
NS=${NS:-"1 10 100"}
MS=${MS:-"1 20"}
REPEATS=${REPEATS:-5}
EXTRAS=${EXTRAS:-1}
RUN_TIMEOUT=${RUN_TIMEOUT:-600}
OUT=bench/out
TIME=/usr/bin/time

die() { echo "bench/run.sh: $*" >&2; exit 1; }

for v in $NS; do [[ $v =~ ^[0-9]+$ && $v -ge 1 && $v -le 1000 ]] || die "bad N '$v' (1..1000)"; done
for v in $MS; do [[ $v =~ ^[0-9]+$ && $v -ge 1 && $v -le 10000 ]] || die "bad M '$v' (1..10000)"; done
[[ $REPEATS =~ ^[0-9]+$ && $REPEATS -ge 1 && $REPEATS -le 100 ]] || die "bad REPEATS (1..100)"

# GNU time: bash's `time` keyword cannot report peak RSS.
if [[ ! -x $TIME ]]; then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
        echo "bench/run.sh: installing Debian package 'time' (GNU time, for peak RSS)" >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends time >&2
    fi
    [[ -x $TIME ]] || die "GNU time missing: apt-get install time"
fi

mkdir -p "$OUT"
make -s kengine >&2
# shellcheck disable=SC2046 # pkg-config output is meant to split
cc -O2 -Wall bench/floor.c -o "$OUT/floor" $(pkg-config --cflags --libs libssh)
cc -O2 -Wall -shared -fPIC bench/quickack.c -o "$OUT/quickack.so" -ldl

SSHD_DIR=$(mktemp -d /tmp/kgb-sshd.XXXXXX)
cleanup() {
    tests/support/sshd.sh stop "$SSHD_DIR" || true
    rm -rf "$SSHD_DIR"
}
trap cleanup EXIT
tests/support/sshd.sh start "$SSHD_DIR" >&2
sshd_pid=$(cat "$SSHD_DIR/sshd.pid")
port=$(cat "$SSHD_DIR/port")
user=$(cat "$SSHD_DIR/user")

# N sessions connect at once: sshd must not drop unauthenticated connections.
max_n=1
for v in $NS; do ((v > max_n)) && max_n=$v; done
startups=$(awk '$1 == "MaxStartups" {print $2}' "$SSHD_DIR/sshd_config")
[[ -n $startups && ${startups%%:*} -ge $max_n ]] ||
    die "sshd MaxStartups (${startups:-10 default}) is below N=$max_n; raise it in tests/support/sshd.sh"
[[ $(getent passwd "$user" | cut -d: -f7) == /bin/sh ]] ||
    echo "bench/run.sh: warning: $user's shell is not /bin/sh; shell startup files will dominate" >&2

clk=$(getconf CLK_TCK)
# CPU (ticks) of the sshd listener and of every child it has reaped.
sshd_ticks() {
    local stat f
    stat=$(cat "/proc/$sshd_pid/stat") || die "sshd (pid $sshd_pid) is gone"
    read -r -a f <<<"${stat##*) }"
    echo $((f[11] + f[12] + f[13] + f[14]))
}
# Wait (at most 10 s) until sshd has no connection left, so the next reading
# includes every child of the run just finished.
sshd_idle() {
    local i
    for ((i = 0; i < 200; i++)); do
        pgrep -P "$sshd_pid" >/dev/null || return 0
        sleep 0.05
    done
    echo "bench/run.sh: warning: sshd still has connections after 10 s" >&2
}

raw=$OUT/raw.txt
: >"$raw"
meta="$(uname -srm); $(nproc) CPUs; $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
{
    echo "# $(date -u +%FT%TZ) $meta"
    echo "# $(./kengine --version | tr '\n' ' ')| client $(ssh -V 2>&1)"
    echo "# commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD -- engine bindings lib 2>/dev/null || echo ' + uncommitted engine changes')"
} >>"$raw"

# run TOOL N M REP
run() {
    local tool=$1 n=$2 m=$3 rep=$4 cmd rc=0 s0 s1 result timing
    local log=$OUT/$tool-n$n-m$m-r$rep
    local floor=("$OUT/floor" -H 127.0.0.1 -p "$port" -u "$user" -i "$SSHD_DIR/id_ed25519"
        -k "$SSHD_DIR/known_hosts" -n "$n" -m "$m")
    local kengine=(./kengine run bench/kengine_bench.lua "$SSHD_DIR" "$n" "$m")
    case $tool in
    floor) cmd=("${floor[@]}") ;;
    kengine) cmd=("${kengine[@]}") ;;
    floor+quickack) cmd=(env LD_PRELOAD="$PWD/$OUT/quickack.so" "${floor[@]}") ;;
    kengine+quickack) cmd=(env LD_PRELOAD="$PWD/$OUT/quickack.so" "${kengine[@]}") ;;
    kengine+gc100) cmd=(env KENGINE_BENCH_GCPAUSE=100 "${kengine[@]}") ;;
    openssh) cmd=(env OPENSSH_MUX=yes bench/openssh.sh "$SSHD_DIR" "$n" "$m") ;;
    openssh-nomux) cmd=(env OPENSSH_MUX=no bench/openssh.sh "$SSHD_DIR" "$n" "$m") ;;
    *) die "unknown tool $tool" ;;
    esac
    sshd_idle
    s0=$(sshd_ticks)
    "$TIME" -f "TIME time_wall_s=%e user_s=%U sys_s=%S maxrss_kb=%M" -o "$log.time" \
        timeout "$RUN_TIMEOUT" "${cmd[@]}" >"$log.out" 2>"$log.err" || rc=$?
    sshd_idle
    s1=$(sshd_ticks)
    result=$(grep '^RESULT ' "$log.out" | tail -1 | cut -d' ' -f2- || true)
    timing=$(grep '^TIME ' "$log.time" | tail -1 | cut -d' ' -f2- || true)
    [[ -n $result ]] || result="n=$n m=$m errors=$n"
    result="tool=$tool ${result#tool=* }" # the variant's name, not the program's
    echo "$result $timing rep=$rep rc=$rc sshd_cpu_s=$(awk -v t=$((s1 - s0)) -v c="$clk" 'BEGIN{printf "%.2f", t/c}')" >>"$raw"
    if ((rc != 0)); then
        echo "bench/run.sh: $tool N=$n M=$m rep $rep exited $rc:" >&2
        head -5 "$log.err" >&2
    fi
    printf '  %-14s N=%-4s M=%-3s rep %s: %s\n' "$tool" "$n" "$m" "$rep" \
        "$(grep -E '^  (connect|exec|wall)' "$log.out" | tr -s ' ' | tr '\n' ';')" >&2
}

echo "bench/run.sh: sshd on 127.0.0.1:$port as $user; N in {$NS}, M in {$MS}, $REPEATS repeats" >&2
for ((rep = 1; rep <= REPEATS; rep++)); do
    for n in $NS; do
        for m in $MS; do
            # Interleaved, so drift in the machine's load hits every tool alike.
            for tool in floor kengine openssh; do run "$tool" "$n" "$m" "$rep"; done
        done
    done
    # Reference: no multiplexing, a new connection per command.
    mmax=$(tr ' ' '\n' <<<"$MS" | sort -n | tail -1)
    run openssh-nomux 1 "$mmax" "$rep"
    if [[ $EXTRAS == 1 ]]; then
        for tool in floor+quickack kengine+quickack; do run "$tool" 1 "$mmax" "$rep"; done
        for tool in floor kengine kengine+gc100; do run "$tool" 100 100 "$rep"; done
    fi
done

python3 bench/report.py "$raw" >"$OUT/results.md"
cat "$OUT/results.md"
