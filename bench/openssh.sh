#!/usr/bin/env bash
# openssh.sh - OpenSSH's side of bench/run.sh.
#
#   bench/openssh.sh DIR [N [M [CMD]]]
#
# DIR is a tests/support/sshd.sh directory (port, user, id_ed25519,
# known_hosts).  N "hosts" at once (background jobs), each: one ControlMaster
# connection (`ssh -f -N -M -S SOCKET`; the time until it forks after
# authentication is its connect + auth time), then CMD (default `true`) M
# times, one after another, as `ssh -S SOCKET host CMD` over that master.
#
# With OPENSSH_MUX=no, no master: every command is a new `ssh host CMD`
# connection (connect_* then reports nothing; exec_* is the whole command).
#
# The masters run detached (-f), so the CPU and memory of this script's
# process tree (what /usr/bin/time sees) exclude them; they are read from
# /proc just before each master is told to exit and reported separately
# (masters_cpu_s, masters_rss_kb = the sum of their peak RSS).
#
# Prints a summary and, last, one machine-readable line like bench/floor.c:
#   RESULT tool=openssh|openssh-nomux n=N m=M wall_s=... connect_mean_ms=... ... errors=...
#          masters_cpu_s=... masters_rss_kb=...
# Talks only to 127.0.0.1.  Every loop is bounded.
set -euo pipefail

MAX_N=1000
MAX_M=100000

die() { echo "openssh.sh: $*" >&2; exit 2; }

dir=${1:-}
n=${2:-1}
m=${3:-1}
cmd=${4:-true}
mux=${OPENSSH_MUX:-yes}
[[ -n $dir && -f $dir/port ]] || die "usage: $0 DIR [N [M [CMD]]]  (DIR from tests/support/sshd.sh start)"
[[ $n =~ ^[0-9]+$ && $n -ge 1 && $n -le $MAX_N ]] || die "N must be 1..$MAX_N"
[[ $m =~ ^[0-9]+$ && $m -ge 1 && $m -le $MAX_M ]] || die "M must be 1..$MAX_M"

port=$(cat "$dir/port")
user=$(cat "$dir/user")
ssh_opts=(-F /dev/null -i "$dir/id_ed25519" -o IdentitiesOnly=yes -o BatchMode=yes
    -o UserKnownHostsFile="$dir/known_hosts" -o GlobalKnownHostsFile=/dev/null
    -o StrictHostKeyChecking=yes -o LogLevel=ERROR -o ConnectTimeout=30
    -p "$port" -l "$user")
host=127.0.0.1

# Short path: a unix socket path must fit in 108 bytes.
work=$(mktemp -d /tmp/kgb-ssh.XXXXXX)

stop_masters() {
    local i
    for ((i = 1; i <= n; i++)); do
        if [[ -S $work/c$i ]]; then
            ssh "${ssh_opts[@]}" -S "$work/c$i" -O exit "$host" >/dev/null 2>&1 || true
        fi
    done
}
cleanup() {
    stop_masters
    rm -rf "$work"
}
trap cleanup EXIT

usec() { local t=${EPOCHREALTIME/./}; echo $((10#$t)); }

# CMD is a remote command line on purpose, hence no escaping.
# shellcheck disable=SC2029
# One host: master, then M commands; timings (us) to files, errors to err.$i.
host_job() {
    local i=$1 j t0 t1 sock
    sock=$work/c$i
    if [[ $mux == yes ]]; then
        t0=$(usec)
        if ! ssh "${ssh_opts[@]}" -f -N -M -S "$sock" -o ControlPersist=no "$host" \
            </dev/null >/dev/null 2>>"$work/err.$i"; then
            echo "session $i: master failed" >>"$work/err.$i"
            return 0
        fi
        t1=$(usec)
        echo $((t1 - t0)) >"$work/conn.$i"
        for ((j = 1; j <= m; j++)); do
            t0=$(usec)
            if ! ssh "${ssh_opts[@]}" -S "$sock" "$host" "$cmd" </dev/null >/dev/null 2>>"$work/err.$i"; then
                echo "session $i: exec $j failed" >>"$work/err.$i"
                return 0
            fi
            t1=$(usec)
            echo "$j $((t1 - t0))" >>"$work/exec.$i"
        done
    else
        for ((j = 1; j <= m; j++)); do
            t0=$(usec)
            if ! ssh "${ssh_opts[@]}" "$host" "$cmd" </dev/null >/dev/null 2>>"$work/err.$i"; then
                echo "session $i: exec $j failed" >>"$work/err.$i"
                return 0
            fi
            t1=$(usec)
            echo "$j $((t1 - t0))" >>"$work/exec.$i"
        done
    fi
}

t_start=$(usec)
pids=()
for ((i = 1; i <= n; i++)); do
    host_job "$i" &
    pids+=($!)
done
wait "${pids[@]}" || true

# Before the masters exit: their CPU time (clock ticks) and peak RSS.
masters_ticks=0
masters_rss=0
if [[ $mux == yes ]]; then
    for ((i = 1; i <= n; i++)); do
        [[ -S $work/c$i ]] || continue
        out=$(ssh "${ssh_opts[@]}" -S "$work/c$i" -O check "$host" 2>&1 || true)
        [[ $out =~ pid=([0-9]+) ]] || continue
        pid=${BASH_REMATCH[1]}
        stat=$(cat "/proc/$pid/stat" 2>/dev/null) || continue
        # fields after "(comm)": state is 3rd; utime 14th, stime 15th overall
        read -r -a f <<<"${stat##*) }"
        masters_ticks=$((masters_ticks + f[11] + f[12]))
        hwm=$(awk '/^VmHWM:/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
        masters_rss=$((masters_rss + ${hwm:-0}))
    done
fi
stop_masters
t_end=$(usec)

errors=0
for ((i = 1; i <= n; i++)); do
    if [[ -s $work/err.$i ]]; then
        errors=$((errors + 1))
        ((errors <= 5)) && sed "s/^/openssh.sh: /" "$work/err.$i" >&2
    fi
done

clk=$(getconf CLK_TCK)
# Statistics in awk: conn.* hold one value (us), exec.* "j us" per line.
cat "$work"/conn.* 2>/dev/null >"$work/all.conn" || true
cat "$work"/exec.* 2>/dev/null >"$work/all.exec" || true
tool=openssh
[[ $mux == yes ]] || tool=openssh-nomux
awk -v tool="$tool" -v n="$n" -v m="$m" -v cmd="$cmd" -v mux="$mux" -v errors="$errors" \
    -v wall_us=$((t_end - t_start)) -v ticks="$masters_ticks" -v clk="$clk" -v rss="$masters_rss" \
    -v connf="$work/all.conn" -v execf="$work/all.exec" '
function median(a, k,   i, j, t) {
    for (i = 2; i <= k; i++) { t = a[i]; for (j = i - 1; j >= 1 && a[j] > t; j--) a[j + 1] = a[j]; a[j + 1] = t }
    if (k == 0) return 0
    return k % 2 ? a[(k + 1) / 2] : (a[k / 2] + a[k / 2 + 1]) / 2
}
BEGIN {
    nc = 0; cs = 0
    while ((getline line < connf) > 0) { c[++nc] = line / 1000; cs += line / 1000 }
    ne = 0; es = 0; nf = 0; fs = 0; nr = 0; rs = 0
    while ((getline line < execf) > 0) {
        split(line, p, " "); v = p[2] / 1000
        e[++ne] = v; es += v
        if (p[1] == 1) { nf++; fs += v } else { nr++; rs += v }
    }
    cm = nc ? cs / nc : 0; em = ne ? es / ne : 0
    cmed = median(c, nc); emed = median(e, ne)
    printf "openssh (mux=%s), %d session(s) x %d x \x27%s\x27\n", mux, n, m, cmd
    printf "  connect+auth ms: mean %.2f median %.2f (%d masters)\n", cm, cmed, nc
    printf "  exec ms:         mean %.2f median %.2f (%d commands); first %.2f, rest mean %.2f\n", \
        em, emed, ne, nf ? fs / nf : 0, nr ? rs / nr : 0
    printf "  wall s:          %.3f, errors %d; masters: cpu %.2f s, peak RSS sum %d kB\n", \
        wall_us / 1e6, errors, ticks / clk, rss
    printf "RESULT tool=%s n=%d m=%d wall_s=%.4f connect_mean_ms=%.3f connect_median_ms=%.3f " \
        "exec_mean_ms=%.3f exec_median_ms=%.3f exec_first_ms=%.3f exec_rest_mean_ms=%.3f commands=%d " \
        "errors=%d masters_cpu_s=%.2f masters_rss_kb=%d\n", \
        tool, n, m, wall_us / 1e6, cm, cmed, em, emed, nf ? fs / nf : 0, nr ? rs / nr : 0, ne, errors, \
        ticks / clk, rss
}'
((errors == 0))
