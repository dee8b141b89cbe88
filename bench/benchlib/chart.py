"""results.svg: a hand-written SVG chart of one run, no packages needed.

One block per workload; in each block one row per configuration, with two bar panels side by
side: median req/s (longer is better) and median p99 latency (shorter is better). Timeouts are
written next to the p99 bar, since wrk's percentiles leave timed-out requests out. Colours
group the configurations: blues for reuse-launch, the darkest being reuseport. The two
CPU-heavy blocks share one scale, so N=1 and N=2 bars compare directly.
"""
from collections import Counter
from html import escape
from typing import Dict, List, Tuple

from .report import Summary, ms
from .runner import Outcome
from .workloads import WORKLOADS

LABEL_W = 230
PANEL_W = 330
GAP = 50
ROW_H = 18
BAR_H = 13
BLOCK_HEAD = 44
TITLE_H = 56
WIDTH = LABEL_W + 2 * PANEL_W + GAP + 30

COLOURS = {
    "rl-reuseport": "#08519c", "rl-shared": "#4292c6", "rl-rr": "#9ecae1", "rl-self": "#6baed6",
    "cluster-rr": "#e6550d", "cluster-none": "#fdae6b", "pm2": "#a50f15", "nginx": "#31a354",
    "single": "#969696", "bare": "#756bb1",
}


def colour(config_name: str) -> str:
    for prefix, value in COLOURS.items():
        if config_name.startswith(prefix):
            return value
    return "#636363"


def text(x: float, y: float, body: str, size: int = 11, anchor: str = "start", weight: str = "normal",
         fill: str = "#222") -> str:
    return (f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" font-weight="{weight}" '
            f'fill="{fill}">{escape(body)}</text>')


def bar(x: float, y: float, value: float, top: float, fill: str, label: str) -> List[str]:
    room = PANEL_W - 120  # space left for the value written after the bar
    length = max(1.0, room * value / top) if top > 0 else 1.0
    return [f'<rect x="{x:.1f}" y="{y:.1f}" width="{length:.1f}" height="{BAR_H}" fill="{fill}" rx="2"/>',
            text(x + length + 4, y + BAR_H - 2, label, size=10)]


def trouble(s: Summary) -> str:
    """Timeouts and hung connections, written after the p99 figure they are missing from."""
    timeouts = s.errors["timeout"]
    parts = [f"{timeouts} timeout{'' if timeouts == 1 else 's'}"] if timeouts else []
    if s.hung is not None:
        parts.append(f"{s.hung} hung")
    return f"  ({', '.join(parts)})" if parts else ""


def scale_group(workload_name: str) -> str:
    return "cpu" if workload_name.startswith("cpu-") else workload_name


def scale_tops(found: Dict[Tuple[str, str], Summary]) -> Dict[str, Tuple[float, float]]:
    """The largest req/s and p99 of each scale group: the full length of its bars."""
    tops: Dict[str, Tuple[float, float]] = {}
    for (workload, _), s in found.items():
        group = scale_group(workload)
        rps, p99 = tops.get(group, (0.0, 0.0))
        tops[group] = (max(rps, s.rps), max(p99, s.p99))
    return tops


def block(workload_name: str, rows: List[Tuple[str, str, object]], tops: Tuple[float, float],
          y: float) -> Tuple[List[str], float]:
    """One workload: heading, panel titles, one row per (config name, title, Summary or None)."""
    title = next(w.title for w in WORKLOADS if w.name == workload_name)
    out = [text(10, y + 18, f"{title} ({workload_name})", size=14, weight="bold")]
    left, right = LABEL_W, LABEL_W + PANEL_W + GAP
    out += [text(left, y + 36, "req/s, median (longer is better)", size=10, fill="#555"),
            text(right, y + 36, "p99 ms, median (shorter is better)", size=10, fill="#555")]
    top_rps, top_p99 = tops
    y += BLOCK_HEAD
    for name, label, s in rows:
        out.append(text(LABEL_W - 8, y + BAR_H - 2, label, anchor="end",
                        weight="bold" if name.startswith("rl-reuseport") else "normal"))
        if s is None:
            out.append(text(left, y + BAR_H - 2, "skipped / failed", size=10, fill="#999"))
        else:
            out += bar(left, y, s.rps, top_rps, colour(name), f"{s.rps:,.0f}")
            out += bar(right, y, s.p99, top_p99, colour(name), ms(s.p99) + trouble(s))
        y += ROW_H
    return out, y + 10


def render_svg(outcome: Outcome, found: Dict[Tuple[str, str], Summary], heading: str) -> str:
    workloads = list(dict.fromkeys(c.workload.name for c in outcome.cells))
    body = [text(10, 24, "reuse-launch benchmark", size=17, weight="bold"), text(10, 42, heading, size=11, fill="#555")]
    y = float(TITLE_H)
    tops = scale_tops(found)
    for name in workloads:
        cells = [c for c in outcome.cells if c.workload.name == name]
        usual = Counter(c.workers for c in cells).most_common(1)[0][0]
        rows = [(c.config.name, c.config.title + (f" (n={c.workers})" if c.workers != usual else ""),
                 found.get(c.key)) for c in cells]
        part, y = block(name, rows, tops.get(scale_group(name), (0.0, 0.0)), y)
        body += part
    height = int(y + 10)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
            f'viewBox="0 0 {WIDTH} {height}" font-family="Helvetica, Arial, sans-serif">\n'
            f'<rect width="100%" height="100%" fill="white"/>\n' + "\n".join(body) + "\n</svg>\n")


# ---------- bench/autoscale.py: the step-load cell, over time ----------

STEP_COLOURS = {"auto": "#08519c", "fixed-1": "#969696", "fixed-n": "#e6550d"}
STEP_W, STEP_PANEL_H, STEP_LEFT, STEP_TOP = 860, 170, 70, 64


def _polyline(points: List[Tuple[float, float]], fill: str, step: bool) -> str:
    if not points:
        return ""
    coords: List[str] = []
    for i, (x, y) in enumerate(points):
        if step and i > 0:
            coords.append(f"{x:.1f},{points[i - 1][1]:.1f}")
        coords.append(f"{x:.1f},{y:.1f}")
    return f'<polyline points="{" ".join(coords)}" fill="none" stroke="{fill}" stroke-width="2"/>'


def render_steps_svg(series: Dict[str, List[Tuple[float, float, float]]], titles: Dict[str, str],
                     heavy: List[Tuple[float, float]], total: float, heading: str) -> str:
    """Two panels over time: worker processes (top) and p99 latency per bucket (bottom), one line
    per configuration; the heavy phases shaded. `series[name]` is [(t, p99 ms, workers)]."""
    x_of = lambda t: STEP_LEFT + (STEP_W - STEP_LEFT - 20) * t / total  # noqa: E731
    top_w = max([w for s in series.values() for (_, _, w) in s if w == w] + [1.0])
    top_p = max([p for s in series.values() for (_, p, _) in s if p == p] + [1.0])
    body = [text(10, 24, "reuse-launch: -n 1..N against fixed -n 1 and -n N, a step of load", size=16,
                 weight="bold"), text(10, 42, heading, size=11, fill="#555")]
    panels = [("worker processes", top_w, 2, True), ("p99 latency, ms (per bucket)", top_p, 1, False)]
    for k, (label, top, idx, step) in enumerate(panels):
        y0 = STEP_TOP + k * (STEP_PANEL_H + 40)
        y_of = lambda v: y0 + STEP_PANEL_H - STEP_PANEL_H * v / top  # noqa: E731
        for a, b in heavy:
            body.append(f'<rect x="{x_of(a):.1f}" y="{y0}" width="{x_of(b) - x_of(a):.1f}" '
                        f'height="{STEP_PANEL_H}" fill="#fdd0a2" opacity="0.35"/>')
        body.append(f'<rect x="{STEP_LEFT}" y="{y0}" width="{STEP_W - STEP_LEFT - 20}" height="{STEP_PANEL_H}" '
                    f'fill="none" stroke="#bbb"/>')
        body.append(text(STEP_LEFT, y0 - 6, label, size=11, weight="bold"))
        for frac in (0.0, 0.5, 1.0):
            v = top * frac
            body.append(text(STEP_LEFT - 6, y_of(v) + 4, f"{v:.0f}" if top >= 10 else f"{v:.1f}", size=9,
                             anchor="end", fill="#555"))
        for name, points in series.items():
            pts = [(x_of(t + (0 if step else 0.5)), y_of(vals[idx - 1]))
                   for (t, *vals) in points if vals[idx - 1] == vals[idx - 1]]
            body.append(_polyline(pts, STEP_COLOURS.get(name, "#636363"), step))
    bottom = STEP_TOP + 2 * STEP_PANEL_H + 40
    for t in range(0, int(total) + 1, max(10, int(total / 10) // 10 * 10 or 10)):
        body.append(text(x_of(t), bottom + 14, f"{t}s", size=9, anchor="middle", fill="#555"))
    for i, name in enumerate(series):
        x = STEP_LEFT + i * 260
        body.append(f'<rect x="{x}" y="{bottom + 26}" width="14" height="4" fill="{STEP_COLOURS.get(name, "#636363")}"/>')
        body.append(text(x + 20, bottom + 32, titles.get(name, name), size=11))
    body.append(text(STEP_LEFT, bottom + 52, "shaded: the heavy phase", size=10, fill="#555"))
    height = bottom + 64
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{STEP_W}" height="{height}" '
            f'viewBox="0 0 {STEP_W} {height}" font-family="Helvetica, Arial, sans-serif">\n'
            f'<rect width="100%" height="100%" fill="white"/>\n' + "\n".join(body) + "\n</svg>\n")
