"""summary.md, chaos.json and timeline.svg of one chaos run (hand-written SVG, no packages)."""
import json
import platform
import re
import subprocess
from collections import Counter
from html import escape
from pathlib import Path
from typing import Dict, List

from . import procs

CAUSES = ["holder-killed", "in-flight-at-kill", "launcher-killed", "hung-killed", "unexplained"]
KIND_COLOURS = {
    "kill": "#d62728", "stop": "#9467bd", "roll": "#1f77b4", "roll-burst": "#17becf", "bad-roll": "#8c564b",
    "scale-up": "#2ca02c", "scale-down": "#98df8a", "memory": "#ff7f0e", "reexec": "#e377c2",
    "launcher-kill": "#000000", "hang": "#bcbd22",
}
LOG_TALLIES = {
    "rolls done": r"roll gen \d+ done",
    "rolls abandoned": r"roll gen \d+ abandoned",
    "replacements (--max-memory, --hung-timeout)": r"took over slot",
    "hung workers replaced": r"has been stalled for .*; replacing it",
    "slots retired (scale down)": r"retires \(scaling down",
    "workers killed by SIGKILL (seen by the launcher)": r"killed by SIGKILL",
    "launcher errors": r"reuse-launch: error",
}


def seg_totals(seg) -> Dict:
    causes = Counter(v.cause for v in seg.verdicts)
    ok = sum(seg.stats.ok.values()) if seg.stats else 0
    failed = len(seg.verdicts)
    kinds = Counter(e["kind"] for e in seg.log if "skipped" not in e)
    from .account import per_kill
    return {"requests": ok + failed, "ok": ok, "failed": failed,
            "expected": failed - causes.get("unexplained", 0), "unexplained": causes.get("unexplained", 0),
            "causes": dict(causes), "errors": dict(Counter(v.failure.error for v in seg.verdicts)),
            "faults": dict(kinds), "per_kill": per_kill(seg.verdicts, seg.kills),
            "stale_keepalive_replaced": seg.stats.stale if seg.stats else 0,
            "workers_answering": len(seg.stats.pids) if seg.stats else 0,
            "leaks": len(seg.leaks), "exit_codes": seg.exit_codes,
            "launcher_log": {k: len(re.findall(p, seg.launcher_log)) for k, p in LOG_TALLIES.items()}}


def write(out: Path, args, feats, segs, errors, load_start, load_end, started, t_origin) -> Dict:
    per = {s.name: seg_totals(s) for s in segs}
    counted = [s for s in segs if s.counts]
    totals = {
        "R": sum(per[s.name]["requests"] for s in counted),
        "F": sum(per[s.name]["failed"] for s in counted),
        "E": sum(per[s.name]["expected"] for s in counted),
        "U": sum(per[s.name]["unexplained"] for s in counted),
        "L": sum(per[s.name]["leaks"] for s in counted),
        "faults": dict(sum((Counter(per[s.name]["faults"]) for s in counted), Counter())),
    }
    data = {"seed": args.seed, "duration": args.duration, "workers": args.workers, "rate": args.rate,
            "smoke": args.smoke, "started": started, "t_origin": t_origin, "features": vars(feats), "errors": errors,
            "load_average": {"start": load_start, "end": load_end}, "totals": totals, "segments": {}}
    for s in segs:
        data["segments"][s.name] = {
            "server": s.server, "command": s.command, "port": s.port, "duration": s.duration,
            "t0": s.t0, "t_end": s.t_end, "totals": per[s.name], "notes": s.notes, "leaks": s.leaks,
            "faults": s.log, "ok_per_second": s.stats.ok if s.stats else {},
            "failures": [dict(vars(v.failure), cause=v.cause, kill_pid=v.kill.pid if v.kill else None)
                         for v in s.verdicts],
            "watch": [procs.summary(w) for w in s.watches],
            "samples": [[dict(vars(x)) for x in w.samples] for w in s.watches],
        }
    (out / "chaos.json").write_text(json.dumps(data, indent=1, default=str))
    (out / "summary.md").write_text(markdown(data, segs, per, totals))
    (out / "timeline.svg").write_text(svg(data))
    return totals


def version(cmd: List[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "?"


def markdown(data, segs, per, totals) -> str:
    L = [f"# Chaos run {data['started']}, seed {data['seed']}", ""]
    L.append(f"`scripts/chaos --seed {data['seed']} --duration {data['duration']:.0f}"
             f"{' --smoke' if data['smoke'] else ''}`: {data['workers']} workers, {data['rate']:.0f} req/s offered "
             f"(half new connections, half keep-alive). Machine: {platform.node()}, "
             f"kernel {platform.release()}, load average {data['load_average']['start'][0]:.1f} at start, "
             f"{data['load_average']['end'][0]:.1f} at end; node {version(['node', '--version'])}, "
             f"{version(['python3', '--version'])}. Features: control socket "
             f"{'yes' if data['features']['control'] else 'no'}, reexec {'yes' if data['features']['reexec'] else 'no'}.")
    L.append("")
    L.append(f"**chaos: {totals['R']} requests, {totals['F']} failed, {totals['E']} expected, "
             f"{totals['U']} unexplained, {totals['L']} leaks** (reuse-launch segments: py, node, cmp-rl)")
    L.append("")
    if data["errors"]:
        L += ["Errors: " + "; ".join(data["errors"]), ""]
    L += ["## Requests and failures by cause", "",
          "| segment | server | requests | failed | holder killed | in flight at a kill | launcher killed "
          "| hung worker killed | unexplained | kills | expected per kill (mean / max / kills losing 0) | leaks |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in segs:
        p = per[s.name]
        c = p["causes"]
        k = p["per_kill"]
        L.append(f"| {s.name} | {s.server} | {p['requests']} | {p['failed']} | {c.get('holder-killed', 0)} | "
                 f"{c.get('in-flight-at-kill', 0)} | {c.get('launcher-killed', 0)} | {c.get('hung-killed', 0)} | "
                 f"{c.get('unexplained', 0)} | "
                 f"{k['kills']} | {k['mean']:.2f} / {k['max']} / {k['zero']} | {p['leaks']} |")
    L += ["", "Errors as the clients saw them: " + "; ".join(
        f"{s.name}: {per[s.name]['errors'] or 'none'}" for s in segs), ""]
    a, b = per.get("cmp-rl"), per.get("cmp-cluster")
    if a and b:
        L += ["## SIGKILLs: reuse-launch vs Node cluster round-robin", "",
              "Same seeded SIGKILL schedule, same worker (bench/workers/hello.js), same load:", "",
              "| server | requests | kills | expected losses | per kill (mean) | max | kills losing 0 "
              "| other failures | all failures per kill |",
              "|---|---|---|---|---|---|---|---|---|"]
        for name, p in (("reuse-launch (cmp-rl)", a), ("Node cluster rr (cmp-cluster)", b)):
            k = p["per_kill"]
            every = p["failed"] / k["kills"] if k["kills"] else 0.0
            L.append(f"| {name} | {p['requests']} | {k['kills']} | {k['losses']} | {k['mean']:.2f} | {k['max']} | "
                     f"{k['zero']} | {p['unexplained']} ({p['errors']}) | {every:.2f} |")
        L += ["", "SIGKILLs are the only fault in these two segments, so every failure there follows a kill; "
              "\"other failures\" are those the rules do not attribute (timeouts, refusals).", ""]
    L += ["## Faults injected", "", "| kind | " + " | ".join(s.name for s in segs) + " |",
          "|---|" + "---|" * len(segs)]
    kinds = sorted({k for s in segs for k in per[s.name]["faults"]})
    for kind in kinds:
        L.append(f"| {kind} | " + " | ".join(str(per[s.name]["faults"].get(kind, 0)) for s in segs) + " |")
    L += ["", "What the launchers logged: " + "; ".join(
        f"{s.name}: " + ", ".join(f"{k} {v}" for k, v in per[s.name]["launcher_log"].items() if v)
        for s in segs if s.server == "rl"), ""]
    bad = [e for s in segs for e in s.log if e["kind"] == "bad-roll"]
    if bad:
        L += [f"Bad rolls: {Counter(e.get('outcome', '?') for e in bad)}", ""]
    hangs = [e for s in segs for e in s.log if e["kind"] == "hang"]
    if hangs:
        L += [f"Hangs: {Counter(e.get('outcome', '?') for e in hangs)}", ""]
    L += ["## Leak watch (launcher: first / last / max after 5 s warm-up)", "",
          "| instance | samples | judged | fds | threads | RSS KiB | max zombies |", "|---|---|---|---|---|---|---|"]
    for s in segs:
        for w in s.watches:
            m = procs.summary(w)
            if not m["samples"]:
                continue
            L.append(f"| {m['instance']} | {m['samples']} | {'yes' if m['judged'] else 'too short'} | "
                     f"{'/'.join(map(str, m['fds']))} | {'/'.join(map(str, m['threads']))} | "
                     f"{'/'.join(map(str, m['rss_kib']))} | {m['max_zombies']} |")
    leaks = [x for s in segs for x in s.leaks]
    L += ["", f"Leaks: {len(leaks)}" + ("" if not leaks else ""), ""]
    for x in leaks:
        L.append(f"- {x['instance']}: {x['metric']}: {x['detail']}")
    unexplained = [(s.name, v) for s in segs for v in s.verdicts if v.cause == "unexplained"]
    if unexplained:
        L += ["", "## Unexplained failures (first 40)", ""]
        for name, v in unexplained[:40]:
            f = v.failure
            L.append(f"- {name} t={f.t1 - data['t_origin']:.2f}s {f.kind} {f.error} reused={f.reused} holder={f.holder} "
                     f"took {f.t1 - f.t0:.2f}s: {f.detail}")
    notes = [f"{s.name}: {n}" for s in segs for n in s.notes]
    if notes:
        L += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    L += ["", "Timeline: `timeline.svg`; every fault, failure and sample: `chaos.json`; server logs: `raw/`.", ""]
    return "\n".join(L)


def table(totals, segs) -> str:
    rows = [f"{'segment':<12} {'requests':>9} {'failed':>7} {'expected':>9} {'unexpl.':>8} {'kills':>6} "
            f"{'per kill':>9} {'leaks':>6}"]
    for s in segs:
        p = seg_totals(s)
        rows.append(f"{s.name:<12} {p['requests']:>9} {p['failed']:>7} {p['expected']:>9} {p['unexplained']:>8} "
                    f"{p['per_kill']['kills']:>6} {p['per_kill']['mean']:>9.2f} {p['leaks']:>6}")
    rows.append("faults: " + ", ".join(f"{k} {v}" for k, v in sorted(totals["faults"].items())))
    return "\n".join(rows)


# ---------- timeline.svg ----------

W, LEFT, RIGHT = 1100, 60, 20
PANELS = [("req/s answered", 150), ("failed requests per second", 90), ("worker processes", 80)]


def svg(data) -> str:
    """The timeline, from chaos.json's data alone (so it can be drawn again from a saved run)."""
    run_origin = data["t_origin"]
    t_max = max((s["t_end"] for s in data["segments"].values() if s["t_end"]), default=run_origin + 1.0) + 1
    # The axis starts with the first segment (not with the build before it): 0 s is its start.
    origin = min((s["t0"] for s in data["segments"].values() if s["t0"]), default=run_origin) - 1
    shift = origin - run_origin  # per-second bins, samples and fault times count from run_origin
    span = max(1.0, t_max - origin)
    plot_w = W - LEFT - RIGHT
    x = lambda t: LEFT + plot_w * max(0.0, min(1.0, t / span))  # noqa: E731  (t from origin)
    out = []
    y = 70
    H = 70 + sum(h + 30 for _, h in PANELS) + 40 + 60
    out.append(f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif">')
    out.append(f'<rect width="{W}" height="{H}" fill="white"/>')
    out.append(f'<text x="{LEFT}" y="24" font-size="15" font-weight="bold">chaos run {escape(data["started"])}, '
               f'seed {data["seed"]}: {data["totals"]["R"]} requests, {data["totals"]["F"]} failed, '
               f'{data["totals"]["E"]} expected, {data["totals"]["U"]} unexplained, {data["totals"]["L"]} leaks</text>')
    out.append(f'<text x="{LEFT}" y="42" font-size="11" fill="#555">segments: py = reuse-launch + pyworker, '
               f'node = reuse-launch + node-fd.js, cmp-rl / cmp-cluster = hello.js under reuse-launch / Node cluster '
               f'rr with the same SIGKILLs</text>')
    ok: Dict[int, int] = {}
    for s in data["segments"].values():
        for k, v in s["ok_per_second"].items():
            ok[int(k) - int(shift)] = ok.get(int(k) - int(shift), 0) + v
    fail_c: Dict[int, int] = {}
    fail_e: Dict[int, int] = {}
    fail_u: Dict[int, int] = {}
    for s in data["segments"].values():
        for f in s["failures"]:
            sec = int(f["t1"] - origin)
            d = fail_c if s["server"] == "cluster" else fail_u if f["cause"] == "unexplained" else fail_e
            d[sec] = d.get(sec, 0) + 1
    samples = [(smp["t"] - shift, smp["workers"]) for s in data["segments"].values() for w in s["samples"] for smp in w]
    series = [ok, None, None]
    for i, (title, h) in enumerate(PANELS):
        top = y
        out.append(f'<text x="{LEFT}" y="{top - 6}" font-size="12" font-weight="bold">{escape(title)}</text>')
        out.append(f'<rect x="{LEFT}" y="{top}" width="{plot_w}" height="{h}" fill="#fafafa" stroke="#ccc"/>')
        for name, s in data["segments"].items():
            if s["t0"]:
                x0, x1 = x(s["t0"] - origin), x(s["t_end"] - origin)
                out.append(f'<rect x="{x0:.1f}" y="{top}" width="{max(1, x1 - x0):.1f}" height="{h}" '
                           f'fill="{"#eef3fb" if s["server"] == "rl" else "#fdf0e6"}"/>')
                if i == 0:
                    out.append(f'<text x="{x0 + 3:.1f}" y="{top + 12}" font-size="10" fill="#555">'
                               f'{escape(name)}</text>')
        if i == 0:
            vmax = max(ok.values(), default=1)
            pts = " ".join(f"{x(t + 0.5):.1f},{top + h - h * v / vmax:.1f}" for t, v in sorted(ok.items()))
            out.append(f'<polyline points="{pts}" fill="none" stroke="#08519c" stroke-width="1.2"/>')
        elif i == 1:
            vmax = max(list(fail_e.values()) + list(fail_u.values()) + list(fail_c.values()) + [1])
            bw = max(1.0, plot_w / span)
            for d, colour in ((fail_c, "#969696"), (fail_e, "#fd8d3c"), (fail_u, "#cb181d")):
                for t, v in d.items():
                    bh = h * v / vmax
                    out.append(f'<rect x="{x(t):.1f}" y="{top + h - bh:.1f}" width="{bw:.1f}" height="{bh:.1f}" '
                               f'fill="{colour}"/>')
            out.append(f'<text x="{LEFT + plot_w}" y="{top - 6}" font-size="11" text-anchor="end">'
                       f'<tspan fill="#fd8d3c">■ expected (SIGKILL)</tspan>  <tspan fill="#cb181d">■ unexplained</tspan>'
                       f'  <tspan fill="#969696">■ Node cluster (not counted)</tspan></text>')
        else:
            vmax = max([v for _, v in samples] + [1])
            pts = " ".join(f"{x(t):.1f},{top + h - h * v / vmax:.1f}" for t, v in sorted(samples))
            out.append(f'<polyline points="{pts}" fill="none" stroke="#31a354" stroke-width="1.2"/>')
        out.append(f'<text x="{LEFT - 4}" y="{top + 10}" font-size="10" text-anchor="end">{vmax}</text>')
        out.append(f'<text x="{LEFT - 4}" y="{top + h}" font-size="10" text-anchor="end">0</text>')
        y += h + 30
    # Faults as marks.
    out.append(f'<text x="{LEFT}" y="{y - 6}" font-size="12" font-weight="bold">faults</text>')
    out.append(f'<rect x="{LEFT}" y="{y}" width="{plot_w}" height="24" fill="#fafafa" stroke="#ccc"/>')
    for s in data["segments"].values():
        for e in s["faults"]:
            colour = KIND_COLOURS.get(e["kind"], "#444")
            xx = x(e["t"] - shift)
            out.append(f'<line x1="{xx:.1f}" y1="{y + 2}" x2="{xx:.1f}" y2="{y + 22}" stroke="{colour}" '
                       f'stroke-width="1.5"><title>{escape(e["kind"])} at {e["t"]:.1f}s</title></line>')
    y += 40
    lx = LEFT
    for kind, colour in KIND_COLOURS.items():
        out.append(f'<rect x="{lx}" y="{y}" width="10" height="10" fill="{colour}"/>')
        out.append(f'<text x="{lx + 13}" y="{y + 9}" font-size="10">{kind}</text>')
        lx += 13 + 7 * len(kind) + 14
    # Time axis.
    step = 10 if span <= 200 else 60
    for t in range(0, int(span) + 1, step):
        out.append(f'<text x="{x(t):.1f}" y="{y + 28}" font-size="9" text-anchor="middle">{t}s</text>')
    out.append("</svg>")
    return "\n".join(out)
