"""Writing up a run: results.md, results.json, and bench/results/LATEST.md.

Every figure is the median over the rounds of one cell; errors and timeouts are summed over
the rounds. Ratios compare medians of the same run only (never across runs or machines), and
the project's targets are stated with what was measured, met or not.
"""
import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .configs import CONFIGS
from .runner import Cell, Outcome, Settings
from .workloads import WORKLOADS

# (ours, theirs, label): "ours / theirs" in req/s and in p99.
COMPARISONS: List[Tuple[str, str, str]] = [
    ("rl-reuseport-node", "cluster-rr-node", "reuseport vs Node cluster SCHED_RR"),
    ("rl-reuseport-node", "cluster-none-node", "reuseport vs Node cluster SCHED_NONE"),
    ("rl-reuseport-node", "pm2-node", "reuseport vs PM2 cluster"),
    ("rl-reuseport-node", "rl-rr-node", "reuseport vs launcher round-robin (node)"),
    ("rl-reuseport-node", "rl-shared-node", "reuseport vs launcher shared (node)"),
    ("rl-reuseport-node", "nginx-node", "reuseport vs nginx upstream"),
    ("rl-reuseport-node", "single-node", "reuseport vs single node process"),
    ("rl-reuseport-c", "bare-reuseport-c", "reuseport vs bare self-bound (C)"),
    ("rl-reuseport-c", "rl-rr-c", "reuseport vs launcher round-robin (C)"),
    ("rl-reuseport-c", "rl-shared-c", "reuseport vs launcher shared (C)"),
    ("rl-self-c", "bare-reuseport-c", "launcher self mode vs bare self-bound (C)"),
    ("rl-ll-node", "rl-reuseport-node", "least-loaded vs hash (node)"),
    ("rl-ll-node", "rl-shared-node", "least-loaded vs launcher shared (node)"),
    ("rl-ll-node", "cluster-rr-node", "least-loaded vs Node cluster SCHED_RR"),
    ("rl-rr-node", "cluster-rr-node", "launcher round-robin vs Node cluster SCHED_RR"),
    ("rl-rr-c", "cluster-rr-node", "launcher round-robin (C) vs Node cluster SCHED_RR"),
]


@dataclass
class Summary:
    """The medians of one cell."""
    cell: Cell
    rps: float
    rps_min: float
    rps_max: float
    p50: float
    p99: float
    p999: float
    errors: Dict[str, int]
    overhead_pct: Optional[float]
    distinct: int
    busiest: float
    hung: Optional[str]  # "median hung / sent", only with a stopped worker


def summarize(cell: Cell) -> Optional[Summary]:
    if not cell.runs:
        return None
    rps = [r.wrk.rps for r in cell.runs]
    errors = {k: sum(r.wrk.errors[k] for r in cell.runs) for k in ("connect", "read", "write", "status", "timeout")}
    hung_runs = [r.hangs for r in cell.runs if r.hangs is not None]
    hung = f"{cell.median(lambda r: r.hangs and r.hangs.hung):g}/{hung_runs[0].sent}" if hung_runs else None
    return Summary(cell, cell.median(lambda r: r.wrk.rps), min(rps), max(rps), cell.median(lambda r: r.wrk.p50_ms),
                   cell.median(lambda r: r.wrk.p99_ms), cell.median(lambda r: r.wrk.p999_ms), errors,
                   cell.median(lambda r: r.overhead_pct), min(r.spread.distinct for r in cell.runs),
                   cell.median(lambda r: r.spread.busiest_share), hung)


def summaries(outcome: Outcome) -> Dict[Tuple[str, str], Summary]:
    found = {}
    for cell in outcome.cells:
        s = summarize(cell)
        if s is not None:
            found[cell.key] = s
    return found


# ---------- formatting ----------

def ms(value: Optional[float]) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if value < 10 else f"{value:.1f}" if value < 100 else f"{value:.0f}"


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def times(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}x"


def table(header: List[str], rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# ---------- sections ----------

def machine_section(info: Dict[str, str], settings: Settings, mode: str) -> str:
    rows = [[k, f"`{v}`" if k in ("command", "git commit") else v] for k, v in info.items()]
    rows += [["mode", mode], ["workers (N)", str(settings.workers)],
             ["duration / warm-up", f"{settings.duration}s / {settings.warmup}s per run"],
             ["rounds (R)", f"{settings.rounds} (figures are medians over rounds)"]]
    return "## Machine and run\n\n" + table(["item", "value"], rows)


def busy_note(info: Dict[str, str]) -> Optional[str]:
    """A warning when the machine was already loaded before the run started."""
    try:
        load, cpus = float(info["load average at start"].split()[0]), int(info["nproc"])
    except (KeyError, ValueError, IndexError):
        return None
    if load <= cpus / 2:
        return None
    return (f"The machine was already busy when the run started (1-minute load average {load:g} on {cpus} CPUs): "
            "expect more noise than usual, even in the ratios.")


def notes_section(outcome: Outcome, build_note: Optional[str], info: Dict[str, str]) -> str:
    notes = [n for n in [busy_note(info)] if n]
    if build_note:
        notes.append(build_note)
    for name, why in outcome.skipped.items():
        notes.append(f"**{name} skipped**: {why}")
    for cell in outcome.cells:
        notes += [f"{cell.workload.name}/{cell.config.name}: {n}" for n in cell.notes]
    body = "\n".join(f"- {n}" for n in notes) if notes else "- none: every selected cell ran."
    return "## Notes\n\n" + body


def workload_section(workload_name: str, found: Dict[Tuple[str, str], Summary], outcome: Outcome) -> str:
    workload = next(w for w in WORKLOADS if w.name == workload_name)
    hung_column = workload.stop_one
    rows = []
    for cell in (c for c in outcome.cells if c.workload.name == workload_name):
        s = found.get(cell.key)
        if s is None:
            why = "skipped" if cell.config.name in outcome.skipped else "no successful run"
            rows.append([cell.config.title, str(cell.workers), why] + ["-"] * (9 if hung_column else 8))
            continue
        e = s.errors
        cpu = "-" if s.overhead_pct is None else f"{cell.config.overhead_label} {s.overhead_pct:.0f}%"
        rows.append([cell.config.title, str(cell.workers), f"**{s.rps:,.0f}**", f"{s.rps_min:,.0f}–{s.rps_max:,.0f}",
                     ms(s.p50), ms(s.p99), ms(s.p999), f"{e['connect']}/{e['read']}/{e['write']}/{e['status']}",
                     str(e["timeout"])] + ([f"**{s.hung}**"] if hung_column else [])
                    + [cpu, f"{s.distinct} pids, busiest {s.busiest:.0%}"])
    header = ["configuration", "n", "req/s", "min–max", "p50 ms", "p99 ms", "p99.9 ms", "errors c/r/w/non-2xx",
              "timeouts"] + (["hung"] if hung_column else []) + ["CPU in between", "spread"]
    return f"### {workload.title} (`{workload.name}`)\n\n{workload.about}\n\n" + table(header, rows)


def comparison_rows(found: Dict[Tuple[str, str], Summary]) -> List[List[str]]:
    workloads = [w.name for w in WORKLOADS]
    rows = []
    for ours, theirs, label in COMPARISONS:
        cells = []
        for w in workloads:
            a, b = found.get((w, ours)), found.get((w, theirs))
            cells.append("-" if not (a and b) else f"{times(ratio(a.rps, b.rps))} (p99 {times(ratio(a.p99, b.p99))})")
        if any(c != "-" for c in cells):
            rows.append([label] + cells)
    return rows


def scaling_rows(found: Dict[Tuple[str, str], Summary]) -> List[List[str]]:
    rows = []
    for config in CONFIGS:
        one, two = found.get(("cpu-n1", config.name)), found.get(("cpu-n2", config.name))
        if one and two:
            rows.append([config.title, f"{one.rps:,.0f}", f"{two.rps:,.0f}", times(ratio(two.rps, one.rps))])
    return rows


def ratios_section(found: Dict[Tuple[str, str], Summary]) -> str:
    parts = ["## Ratios\n\nreq/s of the first over the second (higher is better for the first), and in brackets "
             "p99 of the first over the second (lower is better for the first). Medians of this run only."]
    rows = comparison_rows(found)
    if rows:
        parts.append(table(["comparison"] + [w.name for w in WORKLOADS], rows))
    scale = scaling_rows(found)
    if scale:
        header = ["configuration", "N=1 req/s", "N=2 req/s", "N=2/N=1"]
        parts.append("CPU-heavy scaling, `/cpu` req/s with 2 workers over 1 worker (ideal 2.00x on 2 idle cores; "
                     "wrk shares the cores):\n\n" + table(header, scale))
    return "\n\n".join(parts)


def _target(found, workload: str, ours: str, theirs: str, min_rps: float, max_p99: Optional[float] = None,
            base: Optional[str] = None) -> Tuple[str, str]:
    """(measured, verdict) for "ours >= min_rps x theirs [and p99 <= max_p99 x theirs]" in `workload`
    (theirs measured in `base` instead, when given)."""
    a, b = found.get((workload, ours)), found.get((base or workload, theirs))
    if not (a and b):
        return "not measured in this run", "-"
    r, p = ratio(a.rps, b.rps), ratio(a.p99, b.p99)
    measured = f"{times(r)} req/s" + (f", p99 {times(p)}" if max_p99 is not None else "")
    met = r >= min_rps and (max_p99 is None or (p is not None and p <= max_p99))
    return measured, "met" if met else "NOT met"


def targets_section(found: Dict[Tuple[str, str], Summary]) -> str:
    specs = [
        ("reuseport (C) within 2% of bare self-bound, keep-alive", "keepalive", "rl-reuseport-c", "bare-reuseport-c",
         0.98, None, ">= 0.98x"),
        ("reuseport (C) within 2% of bare self-bound, new connections", "close", "rl-reuseport-c",
         "bare-reuseport-c", 0.98, None, ">= 0.98x"),
        ("reuseport >= 1.4x Node cluster SCHED_RR, new connections, p99 <= 0.6x", "close", "rl-reuseport-node",
         "cluster-rr-node", 1.4, 0.6, ">= 1.40x, p99 <= 0.60x"),
        ("reuseport >= 1.4x PM2 cluster, new connections, p99 <= 0.6x", "close", "rl-reuseport-node", "pm2-node",
         1.4, 0.6, ">= 1.40x, p99 <= 0.60x"),
        ("reuseport >= 1.2x launcher round-robin (node), new connections", "close", "rl-reuseport-node",
         "rl-rr-node", 1.2, None, ">= 1.20x"),
        ("reuseport >= 1.2x launcher round-robin (C), new connections", "close", "rl-reuseport-c", "rl-rr-c",
         1.2, None, ">= 1.20x"),
    ]
    rows = []
    for label, workload, ours, theirs, min_rps, max_p99, goal in specs:
        measured, verdict = _target(found, workload, ours, theirs, min_rps, max_p99)
        rows.append([label, goal, measured, verdict])
    measured, verdict = _target(found, "cpu-n2", "rl-reuseport-node", "rl-reuseport-node", 1.9, base="cpu-n1")
    rows.append(["CPU-heavy N=2 >= 1.9x N=1 (reuseport, node)", ">= 1.90x", measured, verdict])
    rows += stopped_targets(found) + least_loaded_targets(found)
    caveat = ("Each verdict compares medians of this run; with one round (`--quick`) or on a busy machine it is a "
              "hint, not a measurement.")
    return "## Targets\n\n" + caveat + "\n\n" + table(["target", "goal", "measured", "verdict"], rows)


def stopped_targets(found: Dict[Tuple[str, str], Summary]) -> List[List[str]]:
    """Issue 8: a worker stopped under load costs reuseport no more than 10% of shared's req/s and no
    timeout; the launcher's round-robin keeps 90% of Node cluster SCHED_RR's req/s."""
    rows = []
    for ours, theirs in (("rl-reuseport-node", "rl-shared-node"), ("rl-ll-node", "rl-shared-node"),
                         ("rl-reuseport-c", "rl-shared-c")):
        a = found.get(("stopped", ours))
        measured, verdict = _target(found, "stopped", ours, theirs, 0.9)
        if a is not None and verdict != "-":
            measured += f", {a.errors['timeout']} timeouts"
            verdict = "met" if verdict == "met" and a.errors["timeout"] == 0 else "NOT met"
        rows.append([f"stopped worker: {ours} >= 0.9x {theirs}, 0 timeouts", ">= 0.90x, 0 timeouts", measured,
                     verdict])
    for ours in ("rl-rr-node", "rl-rr-c"):
        measured, verdict = _target(found, "stopped", ours, "cluster-rr-node", 0.9)
        rows.append([f"stopped worker: {ours} >= 0.9x cluster-rr-node", ">= 0.90x", measured, verdict])
    return rows


LL_CPU_MAX_PCT = 2.0


def least_loaded_targets(found: Dict[Tuple[str, str], Summary]) -> List[List[str]]:
    """Issue 8: least-loaded's p99 <= shared mode's and <= 0.8x hash's, req/s >= 0.98x hash's,
    launcher CPU <= 2% of a core, on the CPU-heavy and mixed cells."""
    rows = []
    for workload in ("cpu-close", "mixed"):
        ll, hash_, shared = (found.get((workload, c)) for c in ("rl-ll-node", "rl-reuseport-node", "rl-shared-node"))
        if not (ll and hash_ and shared):
            rows.append([f"{workload}: least-loaded vs hash and shared", "-", "not measured in this run", "-"])
            continue
        checks = [
            ("p99 <= 1.0x shared", ratio(ll.p99, shared.p99), 1.0, "max"),
            ("p99 <= 0.8x hash", ratio(ll.p99, hash_.p99), 0.8, "max"),
            ("req/s >= 0.98x hash", ratio(ll.rps, hash_.rps), 0.98, "min"),
        ]
        for label, value, bound, kind in checks:
            ok = value is not None and (value <= bound if kind == "max" else value >= bound)
            rows.append([f"{workload}: least-loaded {label}", f"{'<=' if kind == 'max' else '>='} {bound:.2f}x",
                         times(value), "met" if ok else "NOT met"])
        cpu = ll.overhead_pct
        ok = cpu is not None and cpu <= LL_CPU_MAX_PCT
        rows.append([f"{workload}: least-loaded launcher CPU <= {LL_CPU_MAX_PCT:g}%", f"<= {LL_CPU_MAX_PCT:g}%",
                     "-" if cpu is None else f"{cpu:.1f}%", "met" if ok else "NOT met"])
    return rows


def reading_section(outcome: Outcome, settings: Settings) -> str:
    names = list(dict.fromkeys(c.config.name for c in outcome.cells))
    configs = "\n".join(f"- **{c.title}** (`{c.name}`): {c.about}" for c in CONFIGS if c.name in names)
    return f"""## How to read this

- **req/s**: median over rounds of wrk's completed requests per second; **min–max** shows the
  noise across rounds. **p50/p99/p99.9**: median over rounds of wrk's latency percentiles, over
  *completed* requests only: a request that timed out is not in them, so read **timeouts** with p99.
- **errors c/r/w/non-2xx** and **timeouts**: summed over all rounds (wrk's connect/read/write
  socket errors, non-2xx/3xx responses, requests without a response within 2 s).
- **CPU in between**: utime+stime of the launcher / cluster primary / PM2 daemon / nginx (master
  and workers) during the measured run, in % of one core (median). `-`: nothing sits in between.
- **spread**: after each run, {settings.spread_sample} sequential requests on new connections,
  counted by the `X-Pid` header: the fewest distinct worker pids seen, and the median share of
  the busiest worker (50% is even for 2 workers).
- Raw wrk output of every measured run is in `raw/` (`r<round>-<workload>-<config>.txt`).

Configurations:

{configs}"""


def render(outcome: Outcome, settings: Settings, info: Dict[str, str], mode: str,
           build_note: Optional[str]) -> str:
    found = summaries(outcome)
    workloads = list(dict.fromkeys(c.workload.name for c in outcome.cells))
    parts = [f"# reuse-launch benchmark, {info['date']}, commit {info['git commit']}",
             "Compare figures within this run only; the machine is shared and noisy, which is why configurations "
             "alternate round by round and every figure is a median.",
             machine_section(info, settings, mode), notes_section(outcome, build_note, info), targets_section(found),
             "## Results per workload\n\n" + "\n\n".join(workload_section(w, found, outcome) for w in workloads),
             ratios_section(found), "![req/s and p99 per configuration and workload](results.svg)",
             reading_section(outcome, settings)]
    return "\n\n".join(parts) + "\n"


def to_json(outcome: Outcome, settings: Settings, info: Dict[str, str]) -> str:
    cells = []
    for cell in outcome.cells:
        cells.append({
            "workload": cell.workload.name, "config": cell.config.name, "workers": cell.workers, "notes": cell.notes,
            "runs": [{"round": r.round + 1, "rps": r.wrk.rps, "requests": r.wrk.requests,
                      "p50_ms": r.wrk.p50_ms, "p75_ms": r.wrk.p75_ms, "p90_ms": r.wrk.p90_ms, "p99_ms": r.wrk.p99_ms,
                      "p999_ms": r.wrk.p999_ms, "max_ms": r.wrk.max_ms, "errors": r.wrk.errors,
                      "overhead_cpu_s": r.overhead_cpu_s, "spread": dict(r.spread.counts),
                      "spread_failures": r.spread.failures, "raw": f"raw/{r.raw.name}",
                      "hangs": r.hangs.__dict__ if r.hangs else None} for r in cell.runs],
        })
    data = {"machine": info, "settings": settings.__dict__, "skipped": outcome.skipped, "problems": outcome.problems,
            "cells": cells}
    return json.dumps(data, indent=1) + "\n"


def write_latest(results_root: Path, run_dir: Path, info: Dict[str, str], outcome: Outcome, mode: str) -> None:
    found = summaries(outcome)
    rel = run_dir.name
    text = (f"# Latest benchmark run\n\n[{rel}]({rel}/results.md): {mode} run of {info['date']}, commit "
            f"`{info['git commit']}`, {info['nproc']} CPUs, kernel {info['kernel']}.\n\n"
            f"![chart]({rel}/results.svg)\n\n{targets_section(found)}\n")
    (results_root / "LATEST.md").write_text(text)


def machine_info(git_commit: str, versions: Dict[str, str], started: str, command: str) -> Dict[str, str]:
    info = {"date": started, "git commit": git_commit, "command": command, "nproc": str(os.cpu_count()),
            "kernel": platform.release(), "cpu": _cpu_model(), "load average at start": load_average()}
    info.update(versions)
    return info


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
