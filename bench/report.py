#!/usr/bin/env python3
"""report.py - turn bench/out/raw.txt (bench/run.sh) into a markdown report.

    python3 bench/report.py bench/out/raw.txt > bench/out/results.md

raw.txt holds one line per run of key=value pairs: the RESULT line a tool
printed (floor.c, kengine_bench.lua, openssh.sh), GNU time's figures
(time_wall_s, user_s, sys_s, maxrss_kb), rep, rc and sshd_cpu_s.  Every figure
in the table is the median over the repeats of that (tool, N, M); errors are
summed.  Lines starting with # are copied as notes.
"""
import statistics
import sys

TOOLS = ["floor", "kengine", "openssh", "openssh-nomux", "floor+quickack", "kengine+quickack", "kengine+gc100"]
LABEL = {
    "floor": "libssh floor (C, thread/session)",
    "kengine": "kengine",
    "openssh": "OpenSSH ControlMaster",
    "openssh-nomux": "OpenSSH, new connection per command",
    "floor+quickack": "*exp.* floor + TCP_QUICKACK shim",
    "kengine+quickack": "*exp.* kengine + TCP_QUICKACK shim",
    "kengine+gc100": "*exp.* kengine, Lua GC pause 100",
}
GOAL_RATIO = 1.5
GOAL_RSS_MB = 100
GOAL_N = 100


def parse(path):
    runs, notes = [], []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            if line.startswith("#"):
                notes.append(line[1:].strip())
                continue
            r = {}
            for kv in line.split():
                k, _, v = kv.partition("=")
                try:
                    r[k] = float(v)
                except ValueError:
                    r[k] = v
            runs.append(r)
    return runs, notes


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v, digits=1):
    return "–" if v is None else f"{v:.{digits}f}"


def group(runs):
    g = {}
    for r in runs:
        g.setdefault((r.get("tool"), int(r.get("n", 0)), int(r.get("m", 0))), []).append(r)
    return g


def metric(rs, key, ok_only=True):
    return med([r.get(key) for r in rs if not ok_only or (r.get("errors", 1) == 0 and r.get("rc", 1) == 0)])


def client_cpu(r):
    if "user_s" not in r:
        return None
    return r["user_s"] + r["sys_s"] + r.get("masters_cpu_s", 0.0)


def main():
    runs, notes = parse(sys.argv[1])
    g = group(runs)
    out = []
    w = out.append
    w("# kengine benchmark results")
    w("")
    for n in notes:
        w(f"- {n}")
    w("")
    w("Each tool: N sessions at once, each runs `true` M times one after another over its one session. "
      "Figures are medians over the repeats (count in *runs*); times in ms are per operation, "
      "medians within a run.")
    w("")
    w("| tool | N | M | runs | wall s | client CPU s | sshd CPU s | peak RSS MiB | connect+auth ms "
      "| exec ms (median) | 1st exec ms | later execs ms (mean) | errors |")
    w("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    keys = sorted(g, key=lambda k: (k[1], k[2], TOOLS.index(k[0]) if k[0] in TOOLS else 99))
    for key in keys:
        tool, n, m = key
        rs = g[key]
        ok = [r for r in rs if r.get("errors", 1) == 0 and r.get("rc", 1) == 0]
        errors = int(sum(r.get("errors", 0) for r in rs))
        failed = len(rs) - len(ok)
        rss = med([r.get("maxrss_kb") for r in ok])
        rss_s = fmt(rss / 1024 if rss is not None else None)
        if tool == "openssh":
            ms = med([r.get("masters_rss_kb") for r in ok])
            rss_s = f"{fmt(ms / 1024 if ms is not None else None)} Σ masters + {rss_s}"
        connect = metric(rs, "connect_median_ms")
        w("| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
            LABEL.get(tool, tool), n, m, len(rs),
            fmt(metric(rs, "time_wall_s"), 2),
            fmt(med([client_cpu(r) for r in ok]), 2),
            fmt(metric(rs, "sshd_cpu_s"), 2),
            rss_s,
            "–" if tool == "openssh-nomux" else fmt(connect),
            fmt(metric(rs, "exec_median_ms"), 2),
            fmt(metric(rs, "exec_first_ms")),
            fmt(metric(rs, "exec_rest_mean_ms"), 2) if m > 1 else "–",
            f"{errors}" + (f" ({failed} runs failed)" if failed else "")))
    w("")
    w("*wall s*: the whole process (GNU time `%e`), start-up included. *client CPU s*: user+sys of the "
      "tool's process tree (GNU time), plus, for OpenSSH, the detached masters' CPU read from /proc. "
      "*sshd CPU s*: the loopback server's CPU for the run (its children's reaped user+sys). "
      "*peak RSS*: GNU time `%M` in MiB (2²⁰ B), the largest single process; for OpenSSH the sum of the masters' VmHWM "
      "is shown first (each master is its own process). *connect+auth*: TCP connect, key exchange, host key "
      "check, public-key auth (OpenSSH: `ssh -f -N -M` until it forks after auth). *1st exec*: the "
      "first command on a fresh session; *later execs*: commands 2..M.")
    w("")

    # ---- goals
    w("## Goals")
    w("")
    w("| goal | kengine | floor | ratio | target | met |")
    w("|---|---:|---:|---:|---:|---|")

    def pooled(tool, key, m=None):
        vals = []
        for (t, n, mm), rs in g.items():
            if t == tool and n == 1 and (m is None or mm == m):
                vals += [r.get(key) for r in rs if r.get("errors", 1) == 0 and r.get("rc", 1) == 0]
        return med(vals)

    mmax = max([k[2] for k in g if k[0] == "kengine" and k[1] == 1] or [0])
    lines = [
        ("connect + auth, ms (N=1, all M)", pooled("kengine", "connect_median_ms"),
         pooled("floor", "connect_median_ms")),
        (f"one exec over an open session, ms (N=1, M={mmax}, median)",
         pooled("kengine", "exec_median_ms", mmax), pooled("floor", "exec_median_ms", mmax)),
        (f"later execs (2..{mmax}), ms, mean", pooled("kengine", "exec_rest_mean_ms", mmax),
         pooled("floor", "exec_rest_mean_ms", mmax)),
        ("first exec on a fresh session, ms", pooled("kengine", "exec_first_ms"),
         pooled("floor", "exec_first_ms")),
    ]
    for i, (name, kv, fv) in enumerate(lines):
        ratio = kv / fv if kv is not None and fv else None
        met = "–" if ratio is None else ("yes" if ratio <= GOAL_RATIO else f"**no** ({ratio / GOAL_RATIO:.2f}× over)")
        target = f"≤ {GOAL_RATIO}×" if i < 2 else "(info)"
        if i >= 2:
            met = "–"
        w(f"| {name} | {fmt(kv, 2)} | {fmt(fv, 2)} | {fmt(ratio, 2)}× | {target} | {met} |")
    ms100 = sorted(m for (t, n, m) in g if t == "kengine" and n == GOAL_N)
    for m in ms100:
        krss = [r["maxrss_kb"] for r in g[("kengine", GOAL_N, m)] if "maxrss_kb" in r]
        frss = [r["maxrss_kb"] for r in g.get(("floor", GOAL_N, m), []) if "maxrss_kb" in r]
        worst = max(krss) / 1024
        fworst = max(frss) / 1024 if frss else None
        worst_mb = max(krss) * 1024 / 1e6  # GNU time's kB are KiB
        if worst_mb < GOAL_RSS_MB:
            met = "yes"
        elif worst < GOAL_RSS_MB:
            met = f"**borderline**: under 100 MiB, but {worst_mb:.1f} MB (10⁶ B) is {worst_mb / GOAL_RSS_MB:.3f}× 100 MB"
        else:
            met = f"**no** ({worst / GOAL_RSS_MB:.2f}× the limit)"
        w(f"| {GOAL_N} concurrent sessions × {m} commands, peak RSS MiB (worst of {len(krss)} runs) | "
          f"{worst:.1f} | {fmt(fworst)} | – | < {GOAL_RSS_MB} MB | {met} |")
    if not ms100:
        w(f"| {GOAL_N} concurrent sessions, peak RSS | not measured (N={GOAL_N} not in NS) | | | | – |")
    oe = pooled("openssh", "exec_median_ms", mmax)
    oc = pooled("openssh", "connect_median_ms")
    fe = pooled("floor", "exec_median_ms", mmax)
    fc = pooled("floor", "connect_median_ms")
    w("")
    w(f"For reference, OpenSSH ControlMaster at N=1: exec {fmt(oe, 2)} ms "
      f"({fmt(oe / fe if oe and fe else None, 2)}× the floor), master connect + auth {fmt(oc)} ms "
      f"({fmt(oc / fc if oc and fc else None, 2)}× the floor).")
    print("\n".join(out))


if __name__ == "__main__":
    main()
