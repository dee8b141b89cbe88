#!/usr/bin/env python3
"""What --intercept-bind costs (issue 15), measured side by side in one run.

1. Every other system call: a worker (bench/workers/syscalls.c) times 1,000,000 raw getppid()
   calls under reuse-launch with --intercept-bind on (the bind/listen seccomp filter installed)
   and off (no filter), alternating, R rounds; the figure is the median over rounds of each
   run's best-of-5 ns per call, and the ratio on/off (target: at most 1.02). A third run has
   --intercept-bind off and the worker installs a one-instruction allow-everything filter
   itself: what any seccomp filter costs on this kernel, whatever it checks.
2. Serving: node hello.js under `reuse-launch -n 2 --mode reuseport --steer hash`, once on the
   inherited fd 3 with --intercept-bind off (no filter at all) and once binding PORT itself
   (HELLO_BIND=1, --intercept-bind on: its bind() is taken over), with
   `wrk -t1 -c50 -H "Connection: close"` (every request a new connection), alternating which
   goes first, R rounds; medians of req/s and the ratio bind/fd 3 (target: at least 0.98).

    bench/intercept.py                     # 5 rounds, 10 s wrk runs
    bench/intercept.py --rounds 9 --duration 10
    bench/intercept.py --smoke             # 1 round, 1 s: proves it runs (CI-sized)

Run it on a quiet machine: the ratios are what counts, and both sides of each pair run within
seconds of each other. Needs python3 (stdlib), gcc, node, wrk (installed with apt-get when
missing); builds target/release/reuse-launch unless --bin is given. Prints a table and writes
nothing else; every process it starts is stopped by its process group.
"""

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, "bench", ".tools", "build")
SYSCALLS = re.compile(r"syscalls: (\d+) calls, ([\d.]+) ns each")
RPS = re.compile(r"Requests/sec:\s+([\d.]+)")


def build(args):
    if args.bin:
        return args.bin
    subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    return os.path.join(ROOT, "target", "release", "reuse-launch")


def build_syscalls():
    os.makedirs(TOOLS, exist_ok=True)
    src = os.path.join(ROOT, "bench", "workers", "syscalls.c")
    out = os.path.join(TOOLS, "syscalls")
    if not os.path.exists(out) or os.path.getmtime(out) < os.path.getmtime(src):
        subprocess.run(["gcc", "-O2", "-o", out, src], check=True)
    return out


def ensure_wrk():
    if shutil.which("wrk"):
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=True, env=env, stdout=subprocess.DEVNULL)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Launcher:
    """One reuse-launch in a process group of its own, its output collected from a pipe."""

    def __init__(self, argv, env=None):
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                     process_group=0)
        self.lines = []

    def wait_for(self, pattern, timeout=30.0):
        """Read output until a line matches `pattern`; the match, or an error with the output."""
        end = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        os.set_blocking(fd, False)
        buf = ""
        while time.monotonic() < end:
            try:
                chunk = os.read(fd, 65536).decode(errors="replace")
            except BlockingIOError:
                chunk = None
            if chunk:
                buf += chunk
                *done, buf = buf.split("\n")
                self.lines += done
                for line in done:
                    m = pattern.search(line)
                    if m:
                        return m
            elif self.proc.poll() is not None:
                break
            else:
                time.sleep(0.02)
        raise RuntimeError("not seen: %s\n%s" % (pattern.pattern, "\n".join(self.lines[-10:])))

    def stop(self):
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()


def syscall_cost(launcher, worker, mode, calls):
    """`off`, `on`, or `allow-all` (off, and the worker installs an allow-everything filter itself)."""
    extra = ["allow-all"] if mode == "allow-all" else []
    setting = "on" if mode == "on" else "off"
    argv = [launcher, "-n", "1", "-b", "127.0.0.1:0", "--ready-delay", "100ms", "--intercept-bind", setting,
            "--", worker, str(calls), "5", *extra]
    l = Launcher(argv)
    try:
        return float(l.wait_for(SYSCALLS, timeout=120).group(2))
    finally:
        l.stop()


def serve_rps(launcher, bind, seconds):
    port = free_port()
    env = dict(os.environ, HOST="127.0.0.1")
    env.pop("HELLO_BIND", None)
    if bind:
        env["HELLO_BIND"] = "1"
    argv = [launcher, "-n", "2", "-b", f"127.0.0.1:{port}", "--mode", "reuseport", "--steer", "hash",
            "--ready-delay", "300ms", "--intercept-bind", "on" if bind else "off", "--", "node",
            os.path.join(ROOT, "bench", "workers", "hello.js")]
    l = Launcher(argv, env)
    try:
        l.wait_for(re.compile(r"all 2 workers ready"))
        taken = sum("got the slot's socket" in line for line in l.lines)
        if bind and taken < 2:
            l.wait_for(re.compile(r"got the slot's socket"))
        wrk = ["wrk", "-t1", "-c50", f"-d{seconds}s", "-H", "Connection: close", f"http://127.0.0.1:{port}/"]
        subprocess.run(wrk[:3] + ["-d1s"] + wrk[4:], capture_output=True, timeout=60)  # warm-up
        out = subprocess.run(wrk, capture_output=True, text=True, timeout=seconds + 60).stdout
        m = RPS.search(out)
        if not m:
            raise RuntimeError(f"no Requests/sec in wrk's output:\n{out}")
        return float(m.group(1))
    finally:
        l.stop()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--duration", type=int, default=10, help="seconds of each wrk run")
    p.add_argument("--calls", type=int, default=1_000_000)
    p.add_argument("--smoke", action="store_true", help="1 round, 1 s, 100,000 calls")
    p.add_argument("--bin", help="the reuse-launch binary (default: build target/release)")
    args = p.parse_args()
    if args.smoke:
        args.rounds, args.duration, args.calls = 1, 1, 100_000
    launcher = build(args)
    worker = build_syscalls()
    ensure_wrk()
    with open("/proc/loadavg") as f:
        load_start = f.read().split()[0]
    cost = {"on": [], "off": [], "allow-all": []}
    rps = {"fd3": [], "bind": []}
    for r in range(args.rounds):
        for mode in (["off", "on", "allow-all"] if r % 2 == 0 else ["allow-all", "on", "off"]):
            cost[mode].append(syscall_cost(launcher, worker, mode, args.calls))
        for bind in ([False, True] if r % 2 == 0 else [True, False]):
            rps["bind" if bind else "fd3"].append(serve_rps(launcher, bind, args.duration))
        print(f"round {r + 1}: getppid off {cost['off'][-1]:.1f} ns, on {cost['on'][-1]:.1f} ns, "
              f"any filter {cost['allow-all'][-1]:.1f} ns; "
              f"node fd 3 {rps['fd3'][-1]:.0f} req/s, bind {rps['bind'][-1]:.0f} req/s", flush=True)
    with open("/proc/loadavg") as f:
        load_end = f.read().split()[0]
    med = {k: statistics.median(v) for k, v in {**cost, **rps}.items()}
    print()
    print(f"{args.rounds} rounds, {args.calls} calls, {args.duration} s wrk runs; load average {load_start} -> {load_end}")
    print("| figure | without | with | ratio | target |")
    print("|---|---|---|---|---|")
    print(f"| raw getppid(), ns per call (median of rounds; filter off / on) | {med['off']:.1f} | {med['on']:.1f} "
          f"| {med['on'] / med['off']:.3f} | <= 1.02 |")
    print(f"| the same with an allow-everything filter instead (the kernel's seccomp path alone) | {med['off']:.1f} "
          f"| {med['allow-all']:.1f} | {med['allow-all'] / med['off']:.3f} | - |")
    print(f"| node hello.js, new connections, req/s (fd 3 / own bind) | {med['fd3']:.0f} | {med['bind']:.0f} "
          f"| {med['bind'] / med['fd3']:.3f} | >= 0.98 |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
