#!/usr/bin/env python3
"""Automatic scaling against fixed worker counts, under a step of load (issue 17).

Three configurations of reuse-launch over tests/workers/pyworker.py --serial (one request at a
time, --delay seconds each: a sync worker), side by side, in alternating order per round:

- auto:    -n 1..N (the policy's defaults, or --scale-down-after)
- fixed-1: -n 1
- fixed-n: -n N

each under the same load: --light closed-loop clients for the first phase, --heavy for the
second, --light again for the third (new connection per request). Every request is timed and
the worker processes are counted every 0.25 s. Reported per configuration: requests, failures,
p50/p99 overall and per phase, the mean worker count over the whole run, the launcher's CPU,
the automatic decisions; and the goal: auto's p99 within 1.2x of fixed-n's with a lower mean
worker count. Written to bench/results/autoscale-<date>-<commit>/ (results.md, results.json,
timeline.svg: workers and p99 over time; raw/ launcher logs).

    bench/autoscale.py                   # the full cell: 20 s light, 60 s heavy, 150 s light, 2 rounds
    bench/autoscale.py --quick           # 10/30/90 s, 1 round, --scale-down-after 10s
    bench/autoscale.py --smoke           # 4/10/16 s, 1 round, --scale-down-after 3s (proves it runs)
    bench/autoscale.py --policy-table    # what the policy's window shows at fixed loads (policy.md)

Needs python3 (standard library only) and cargo; builds target/release/reuse-launch unless
--bin is given. Everything it starts is stopped by pid at the end, also on Ctrl-C.
"""
import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import chart, steps  # noqa: E402
from benchlib.procs import Registry  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SIZES = {  # light, heavy, light seconds; rounds; --scale-down-after (None: the default)
    "full": ((20, 60, 150), 2, None),
    "quick": ((10, 30, 90), 1, "10s"),
    "smoke": ((4, 10, 16), 1, "3s"),
}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true")
    size.add_argument("--smoke", action="store_true")
    p.add_argument("--workers", type=int, default=3, help="N: the most slots (default 3)")
    p.add_argument("--light", type=int, default=1, help="clients in the light phases (default 1)")
    p.add_argument("--heavy", type=int, default=6, help="clients in the heavy phase (default 6)")
    p.add_argument("--delay", type=float, default=0.05, help="seconds per request (default 0.05)")
    p.add_argument("--mode", default="reuseport", help="the launcher's --mode (default reuseport)")
    p.add_argument("--phases", help="seconds of light,heavy,light (default: by size)")
    p.add_argument("--rounds", type=int, help="rounds (default: by size)")
    p.add_argument("--scale-down-after", help="--scale-down-after of the auto configuration")
    p.add_argument("--bin", help="a reuse-launch binary (default: cargo build --release)")
    p.add_argument("--out", type=Path, help="where to write the results")
    p.add_argument("--policy-table", action="store_true",
                   help="instead: the policy's figures for fixed slots and loads (-n N..N), 10 s each")
    a = p.parse_args(argv)
    a.size = "quick" if a.quick else "smoke" if a.smoke else "full"
    seconds, rounds, calm = SIZES[a.size]
    a.seconds = tuple(float(x) for x in a.phases.split(",")) if a.phases else seconds
    a.rounds = a.rounds or rounds
    a.scale_down_after = a.scale_down_after or calm
    if len(a.seconds) != 3 or a.workers < 2 or a.rounds < 1:
        p.error("--phases takes 3 durations, --workers at least 2, --rounds at least 1")
    return a


def build(args) -> str:
    if args.bin:
        return args.bin
    subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    return str(ROOT / "target" / "release" / "reuse-launch")


def commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return done.stdout.strip() or "nogit"


def median(xs):
    xs = sorted(x for x in xs if x == x)
    return xs[len(xs) // 2] if xs else float("nan")


def pooled(rows, key):
    return median([r[key] for r in rows])


def render_md(args, configs, summaries, info) -> str:
    by = {c.name: [s for s in summaries if s["config"] == c.name] for c in configs}
    out = [f"# Automatic scaling under a step of load ({info['date']}, commit {info['commit']})", "",
           f"`{info['command']}`; {os.cpu_count()} CPUs; load average {info['load_start']} at start, "
           f"{info['load_end']} at end. `--mode {args.mode} {' '.join(steps.ready_flags(args.mode))}`; "
           f"workers: `pyworker.py --serial --handle-delay {args.delay}`; "
           f"load: {args.light} client(s) for {args.seconds[0]:.0f} s, {args.heavy} for {args.seconds[1]:.0f} s, "
           f"{args.light} for {args.seconds[2]:.0f} s (closed loop, new connection per request); "
           f"{args.rounds} round(s), medians over rounds.", "",
           "| configuration | requests | failed | p50 ms | p99 ms | heavy phase: requests, mean ms, p99 ms "
           "| mean workers | most | launcher CPU |",
           "|---|---|---|---|---|---|---|---|---|"]
    for c in configs:
        rows = by[c.name]
        heavy = {k: median([list(r["phases"].values())[1][k] for r in rows]) for k in ("requests", "mean_ms", "p99_ms")}
        out.append(f"| {c.title} | {pooled(rows, 'requests'):.0f} | {sum(r['failed'] for r in rows)} | "
                   f"{pooled(rows, 'p50_ms'):.1f} | {pooled(rows, 'p99_ms'):.1f} | "
                   f"{heavy['requests']:.0f}, {heavy['mean_ms']:.1f}, {heavy['p99_ms']:.1f} | "
                   f"{pooled(rows, 'mean_workers'):.2f} | {max(r['most_workers'] for r in rows)} | "
                   f"{pooled(rows, 'launcher_cpu_pct'):.2f}% |")
    auto, fixed = by["auto"], by["fixed-n"]
    ratio = pooled(auto, "p99_ms") / pooled(fixed, "p99_ms")
    fewer = pooled(auto, "mean_workers") < pooled(fixed, "mean_workers")
    met = ratio <= 1.2 and fewer
    out += ["", f"**Goal** (auto's p99 within 1.2x of fixed -n {args.workers}, with fewer workers on average): "
            f"p99 ratio {ratio:.2f}, mean workers {pooled(auto, 'mean_workers'):.2f} against "
            f"{pooled(fixed, 'mean_workers'):.2f}: {'met' if met else 'not met'}.", "",
            "Automatic decisions (round 1):", ""]
    out += [f"- {d}" for d in (auto[0]["decisions"] if auto else [])] or ["- none"]
    out += ["", "![workers and p99 over time](timeline.svg)", ""]
    return "\n".join(out) + "\n"


PROBES = [steps.Probe(1, 1, 0), steps.Probe(1, 2, 0.15), steps.Probe(1, 2, 0), steps.Probe(1, 3, 0),
          steps.Probe(2, 2, 0.15), steps.Probe(2, 2, 0), steps.Probe(2, 3, 0), steps.Probe(2, 4, 0),
          steps.Probe(2, 8, 0), steps.Probe(3, 3, 0), steps.Probe(3, 4, 0), steps.Probe(3, 6, 0), steps.Probe(3, 8, 0)]


def policy_table(args, binary, out, info) -> int:
    registry = Registry()
    rows = []
    try:
        for p in PROBES:
            print(f"autoscale bench: probe -n {p.slots}..{p.slots}, {p.clients} clients, pause {p.pause}s", flush=True)
            rows.append(steps.probe(registry, binary, p, args.delay, 4.0 if args.smoke else 10.0, out / "raw"))
    finally:
        registry.stop_all()
    info["load_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    md = [f"# The policy's window at fixed loads ({info['date']}, commit {info['commit']})", "",
          f"`{info['command']}`; load average {info['load_start']} at start, {info['load_end']} at end. "
          f"`-n N..N` over `pyworker.py --serial --handle-delay {args.delay}`, closed-loop clients on new "
          "connections; `status --json` polled every 0.5 s: `pressed` is the share of the last 2 s of samples "
          "with at least one connection waiting per slot in all (up when >= 0.75), `waiting` the connections "
          "waiting in all (mean), `queued` the largest share of the samples in which one slot had a queue (a "
          "calm needs <= 0.05 over the whole calm).", "",
          "| slots | clients | pause between requests | requests (failed) | windows | pressed min | pressed median | waiting median | queued median | queued max | CPU median |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['slots']} | {r['clients']} | {r['pause']:.2f} s | {r['ok']} ({r['failed']}) | {r['windows']} | "
                  f"{fmt(r['pressed_min'])} | "
                  f"{fmt(r['pressed_median'])} | {fmt(r['waiting_median'])} | {fmt(r['queued_median'])} | "
                  f"{fmt(r['queued_max'])} | {fmt(r['cpu_median'])} |")
    (out / "policy.md").write_text("\n".join(md) + "\n")
    (out / "policy.json").write_text(json.dumps({"info": info, "rows": rows}, indent=1))
    print("\n".join(md), flush=True)
    return 0


def main(argv) -> int:
    args = parse_args(argv)
    n = args.workers
    configs = [steps.Config("auto", f"auto: -n 1..{n}", f"1..{n}", auto=True),
               steps.Config("fixed-1", "fixed -n 1", "1"), steps.Config("fixed-n", f"fixed -n {n}", str(n))]
    phases = [steps.Phase("light", args.seconds[0], args.light), steps.Phase("heavy", args.seconds[1], args.heavy),
              steps.Phase("light", args.seconds[2], args.light)]
    now = datetime.datetime.now()
    info = {"date": f"{now:%Y-%m-%d %H:%M}", "commit": commit(), "command": "bench/autoscale.py " + " ".join(argv),
            "load_start": " ".join(f"{x:.2f}" for x in os.getloadavg())}
    if args.out:
        out = args.out.resolve()
    elif args.size == "smoke":
        out = ROOT / "target" / "bench-smoke" / f"autoscale-{now:%Y-%m-%d-%H%M}"
    else:
        out = ROOT / "bench" / "results" / f"autoscale-{now:%Y-%m-%d-%H%M}-{info['commit']}"
    raw = out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    binary = build(args)
    if args.policy_table:
        return policy_table(args, binary, out, info)
    registry = Registry()
    runs = []

    def stop(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, stop)
    try:
        for r in range(args.rounds):
            order = configs[r % 3:] + configs[:r % 3]
            for c in order:
                print(f"autoscale bench: round {r + 1}, {c.title}", flush=True)
                runs.append(steps.run_config(registry, binary, c, phases, args.delay, args.scale_down_after, raw, r + 1,
                                             args.mode))
    except KeyboardInterrupt:
        print("interrupted: stopping everything the bench started", flush=True)
        return 130
    finally:
        registry.stop_all()
    info["load_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    total = sum(args.seconds)
    summaries = [steps.summary(run, phases) for run in runs]
    series = {}
    for c in configs:
        per_round = [steps.buckets(run, 2.0, total) for run in runs if run.config.name == c.name]
        series[c.name] = [(b[0][0], median([x[i][1] for x in per_round]), median([x[i][2] for x in per_round]))
                          for i, b in enumerate(zip(*per_round))]
    heavy = [(args.seconds[0], args.seconds[0] + args.seconds[1])]
    heading = f"{info['date']}, commit {info['commit']}, {args.size} run, 2 s buckets, medians of {args.rounds} round(s)"
    (out / "timeline.svg").write_text(chart.render_steps_svg(series, {c.name: c.title for c in configs}, heavy,
                                                             total, heading))
    (out / "results.json").write_text(json.dumps({"info": info, "args": {k: str(v) for k, v in vars(args).items()},
                                                  "summaries": summaries, "series": series}, indent=1))
    (out / "results.md").write_text(render_md(args, configs, summaries, info))
    print((out / "results.md").read_text(), flush=True)
    failed = sum(s["failed"] for s in summaries)
    return 1 if failed or not summaries else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
