#!/usr/bin/env python3
"""The idle launcher's cost per number of workers (issue 18).

For each worker count (default 2, 64, 512, 1024) it starts

    reuse-launch -n N --ready auto -b 127.0.0.1:PORT -- bench/workers/hello.c (built)

and prints: how long after the launcher's start every worker was ready (the launcher's
`all N workers ready` line, timed from just before the launcher was started), the CPU of the
launcher and of its sentinel while nothing happens (every thread's run time from
/proc/PID/task/TID/schedstat, in ns, over --window seconds, after --settle seconds of rest),
in % of one core, and their resident memory (VmRSS of /proc/PID/status) at the end of the
window. The containment the launcher reports (`status --json`, field `containment`) is shown
too, so a run says whether the cgroup or the sentinel's scan was in use.

    bench/idle.py                                 # 2, 64, 512, 1024 workers, 10 s windows
    bench/idle.py --counts 2,64 --window 2        # a smoke run
    bench/idle.py --containment sentinel          # the fallback, as on a host without cgroup v2
    bench/idle.py --perf 512                      # also `perf record` the idle launcher at 512
    bench/idle.py --extra "--max-memory 1G"       # launcher flags added to every run

Targets (issue 18): at most 0.5% of a core at 512 workers and 1% at 1024 (launcher and
sentinel together), all 1024 ready within 1.0 s, launcher RSS at most 8 MiB at 1024. The
exit status is 1 if a launcher failed to start or its workers never became ready; missing a
target is printed, not an error (a shared machine misses them for reasons of its own).

Needs python3 (stdlib), gcc; builds target/release/reuse-launch unless --bin is given. As
root for 1024 workers the launcher raises its own fd limit; each worker needs about 3 fds of
the launcher (its socket, two log pipes).
"""

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {512: 0.5, 1024: 1.0}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ns(pid):
    """Sum of every thread's time on a CPU, in ns (None if the process is gone)."""
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for tid in tids:
        try:
            total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total


def rss_kib(pid):
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def sentinel_of(pid):
    """The launcher's sentinel: its child running `reuse-launch __sentinel`."""
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids = (task / "children").read_text().split()
        except OSError:
            continue
        for kid in kids:
            try:
                if b"__sentinel" in Path(f"/proc/{kid}/cmdline").read_bytes():
                    return int(kid)
            except OSError:
                pass
    return None


def build(args):
    if not args.bin:
        subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
        args.bin = str(ROOT / "target/release/reuse-launch")
    out = Path(args.tmp) / "hello-c"
    subprocess.run(["gcc", "-O2", "-Wall", "-o", str(out), str(ROOT / "bench/workers/hello.c")], check=True)
    return str(out)


class Launcher:
    """One launcher with N hello-c workers; its stderr read (and timed) by a thread."""

    def __init__(self, args, hello, n):
        self.n = n
        self.port = free_port()
        self.control = os.path.join(args.tmp, f"ctl-{n}.sock")
        cmd = [args.bin, "-n", str(n), "--ready", "auto", "-b", f"127.0.0.1:{self.port}",
               "--control", self.control, "--ready-timeout", "60s"]
        if args.containment:
            cmd += ["--containment", args.containment]
        cmd += args.extra.split() + ["--", hello]
        self.ready_after = None
        self.lines = []
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, start_new_session=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        want = f"all {self.n} workers ready".encode()
        for line in self.proc.stderr:
            if self.ready_after is None and want in line:
                self.ready_after = time.monotonic() - self.t0
            if b"] ready pid=" not in line:
                self.lines.append(line.decode(errors="replace").rstrip())

    def wait_ready(self, timeout):
        end = time.monotonic() + timeout
        while time.monotonic() < end and self.ready_after is None and self.proc.poll() is None:
            time.sleep(0.01)
        return self.ready_after

    def status(self):
        try:
            out = subprocess.run([ARGS.bin, "status", "--json", "--control", self.control],
                                 capture_output=True, timeout=10)
            return json.loads(out.stdout)
        except (subprocess.TimeoutExpired, ValueError):
            return {}

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def perf_record(args, pid, seconds):
    data = os.path.join(args.tmp, "perf.data")
    rec = subprocess.run(["perf", "record", "-F", "9999", "-g", "-p", str(pid), "-o", data, "--", "sleep",
                          str(seconds)], capture_output=True, text=True)
    if rec.returncode != 0:
        print(f"perf record failed: {rec.stderr.strip()[-300:]}")
        return
    rep = subprocess.run(["perf", "report", "-i", data, "--no-children", "--stdio", "--sort", "sym",
                          "--percent-limit", "2", "-g", "none"], capture_output=True, text=True)
    lines = [l for l in rep.stdout.splitlines() if l.strip() and not l.startswith("#")]
    samples = [l for l in rep.stdout.splitlines() if l.startswith("# Samples")]
    print(f"perf, launcher pid {pid} (every thread), {seconds:g} s at 9,999 Hz, "
          f"{samples[0][2:] if samples else '? samples'} (top entries, self time):")
    for l in lines[:15]:
        print("   ", l.strip())


def measure(args, hello, n):
    la = Launcher(args, hello, n)
    try:
        ready = la.wait_ready(args.ready_timeout)
        if ready is None:
            print(f"{n:>6}  the workers were not all ready within {args.ready_timeout} s")
            for l in la.lines[-10:]:
                print("       ", l)
            la.stop()
            return None
        time.sleep(args.settle)
        sentinel = sentinel_of(la.proc.pid)
        pids = [la.proc.pid] + ([sentinel] if sentinel else [])
        before = [run_ns(p) for p in pids]
        t = time.monotonic()
        time.sleep(args.window)
        after = [run_ns(p) for p in pids]
        dt = time.monotonic() - t
        pct = [None if a is None or b is None else (b - a) / 1e9 / dt * 100 for a, b in zip(before, after)]
        rss = [rss_kib(p) for p in pids]
        containment = la.status().get("containment", "?")
        return {"n": n, "ready_s": ready, "launcher_pct": pct[0], "sentinel_pct": pct[1] if sentinel else None,
                "launcher_rss_kib": rss[0], "sentinel_rss_kib": rss[1] if sentinel else None,
                "containment": containment, "launcher": la}
    except BaseException:
        la.stop()
        raise


def fmt(v, spec, unit=""):
    return "-" if v is None else f"{v:{spec}}{unit}"


ARGS = None


def main():
    global ARGS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--counts", default="2,64,512,1024")
    ap.add_argument("--window", type=float, default=10.0, help="seconds of idle measured")
    ap.add_argument("--settle", type=float, default=2.0, help="seconds of rest after all are ready")
    ap.add_argument("--ready-timeout", type=float, default=60.0)
    ap.add_argument("--bin")
    ap.add_argument("--containment", choices=["auto", "cgroup", "sentinel"])
    ap.add_argument("--perf", type=int, help="perf record the launcher at this worker count")
    ap.add_argument("--perf-seconds", type=float, default=20.0, help="how long perf records")
    ap.add_argument("--extra", default="", help="more launcher flags, e.g. '--steer least-loaded'")
    ap.add_argument("--json", action="store_true", help="also print the results as JSON")
    args = ap.parse_args()
    ARGS = args
    with tempfile.TemporaryDirectory(prefix="rl-idle-") as tmp:
        args.tmp = tmp
        hello = build(args)
        load = os.getloadavg()
        print(f"reuse-launch idle cost: {args.window:g} s windows, load average {load[0]:.2f} {load[1]:.2f} at start")
        print(f"{'workers':>7}  {'ready after':>11}  {'launcher':>8}  {'sentinel':>8}  {'together':>8}  "
              f"{'launcher RSS':>12}  {'sentinel RSS':>12}  containment")
        results, failed = [], False
        for n in [int(c) for c in args.counts.split(",")]:
            r = measure(args, hello, n)
            if r is None:
                failed = True
                continue
            la = r.pop("launcher")
            both = None if r["launcher_pct"] is None else r["launcher_pct"] + (r["sentinel_pct"] or 0)
            r["together_pct"] = both
            print(f"{n:>7}  {fmt(r['ready_s'], '.2f', ' s'):>11}  {fmt(r['launcher_pct'], '.2f', '%'):>8}  "
                  f"{fmt(r['sentinel_pct'], '.2f', '%'):>8}  {fmt(both, '.2f', '%'):>8}  "
                  f"{fmt(r['launcher_rss_kib'] and r['launcher_rss_kib'] / 1024, '.1f', ' MiB'):>12}  "
                  f"{fmt(r['sentinel_rss_kib'] and r['sentinel_rss_kib'] / 1024, '.1f', ' MiB'):>12}  "
                  f"{r['containment']}", flush=True)
            try:
                if args.perf == n:
                    perf_record(args, la.proc.pid, args.perf_seconds)
            finally:
                la.stop()
            results.append(r)
        load = os.getloadavg()
        print(f"load average {load[0]:.2f} {load[1]:.2f} at the end")
        for r in results:
            target = TARGETS.get(r["n"])
            if target is not None and r["together_pct"] is not None and r["together_pct"] > target:
                print(f"over target: {r['n']} workers use {r['together_pct']:.2f}% (target {target}%)")
            if r["n"] == 1024 and r["ready_s"] > 1.0:
                print(f"over target: 1024 workers ready after {r['ready_s']:.2f} s (target 1.0 s)")
            if r["n"] == 1024 and (r["launcher_rss_kib"] or 0) > 8 * 1024:
                print(f"over target: launcher RSS {r['launcher_rss_kib'] / 1024:.1f} MiB at 1024 (target 8 MiB)")
        if args.json:
            print(json.dumps(results))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
