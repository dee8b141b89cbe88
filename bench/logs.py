#!/usr/bin/env python3
"""Worker log throughput through reuse-launch (issue 9, part 4).

Measures, with --log-prefix slot-pid (lines through the launcher) and none (workers write to
the launcher's stdout directly):

- throughput: N workers (bench/workers/lines.c) print short lines as fast as they can; the
  launcher's stdout is a pipe read here; lines/s counted over --duration after --warmup;
- the same at a paced --rate (default 500,000 lines/s in all, the issue's target), for the
  launcher's CPU at that rate;
- the launcher's CPU (utime+stime of the whole process, all threads, from /proc/PID/stat) over
  the same window, as % of one core, and while idle (N workers that print nothing);
- mixing (--mix): 2 workers write 2,000 lines of 5,000 characters each at full speed (Python,
  8 KiB block-buffered writes); how many lines come out mixed or broken.

    bench/logs.py                      # everything, 2 workers, 5 s windows
    bench/logs.py --duration 10 --workers 4
    bench/logs.py --quick              # 2 s windows (CI-sized)

Needs python3 (stdlib), gcc; builds target/release/reuse-launch unless --bin is given.
"""

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, "bench", ".tools", "build")
TICK = os.sysconf("SC_CLK_TCK")


def cpu_ticks(pid):
    """utime+stime of process pid (all its threads), in clock ticks."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def build(args):
    if args.bin:
        return args.bin
    subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    return os.path.join(ROOT, "target", "release", "reuse-launch")


def build_lines():
    os.makedirs(TOOLS, exist_ok=True)
    src = os.path.join(ROOT, "bench", "workers", "lines.c")
    out = os.path.join(TOOLS, "lines")
    if not os.path.exists(out) or os.path.getmtime(out) < os.path.getmtime(src):
        subprocess.run(["gcc", "-O2", "-o", out, src], check=True)
    return out


class Reader(threading.Thread):
    """Reads the launcher's stdout to EOF, counting newlines (and keeping it, if asked)."""

    def __init__(self, pipe, keep=False):
        super().__init__(daemon=True)
        self.pipe, self.keep = pipe, keep
        self.lines = 0
        self.data = []

    def run(self):
        fd = self.pipe.fileno()
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                return
            self.lines += chunk.count(b"\n")
            if self.keep:
                self.data.append(chunk)


def launch(binary, workers, prefix, command, ready_delay="200ms"):
    argv = [binary, "-n", str(workers), "-b", "127.0.0.1:0", "--ready-delay", ready_delay,
            "--grace", "2s", "--log-prefix", prefix, "--", *command]
    env = dict(os.environ, RUST_LOG="warn")
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)


def stop(proc, reader):
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    reader.join(timeout=10)


def throughput(binary, lines_bin, workers, prefix, warmup, duration, rate=None):
    """Lines/s out of the launcher and its CPU; `rate`: the workers' total lines/s (paced)."""
    command = [lines_bin] if rate is None else [lines_bin, str(rate / workers)]
    proc = launch(binary, workers, prefix, command)
    reader = Reader(proc.stdout)
    reader.start()
    time.sleep(warmup)
    l0, c0, t0 = reader.lines, cpu_ticks(proc.pid), time.monotonic()
    time.sleep(duration)
    l1, c1, t1 = reader.lines, cpu_ticks(proc.pid), time.monotonic()
    stop(proc, reader)
    span = t1 - t0
    return (l1 - l0) / span, 100.0 * (c1 - c0) / TICK / span


def idle(binary, workers, prefix, warmup, duration):
    proc = launch(binary, workers, prefix, ["sleep", "1000"])
    reader = Reader(proc.stdout)
    reader.start()
    time.sleep(warmup)
    c0, t0 = cpu_ticks(proc.pid), time.monotonic()
    time.sleep(duration)
    c1, t1 = cpu_ticks(proc.pid), time.monotonic()
    stop(proc, reader)
    return 100.0 * (c1 - c0) / TICK / (t1 - t0)


MIX_WORKER = """
import os, sys, time
slot = os.environ['REUSE_LAUNCH_SLOT']
fill = chr(ord('a') + int(slot))
for i in range(2000):
    head = f'{slot}-{i:05d}-'
    sys.stdout.write(head + fill * (5000 - len(head)) + '\\n')
sys.stdout.flush()
time.sleep(1000)
"""


def mix(binary, prefix, timeout=60):
    """2 workers x 2,000 lines of 5,000 characters: (lines intact, lines in all)."""
    proc = launch(binary, 2, prefix, [sys.executable, "-c", MIX_WORKER])
    reader = Reader(proc.stdout, keep=True)
    reader.start()
    end = time.monotonic() + timeout
    while reader.lines < 4000 and time.monotonic() < end:
        time.sleep(0.05)
    stop(proc, reader)
    lines = b"".join(reader.data).decode(errors="replace").split("\n")[:-1]
    ok = re.compile(r"^(\[(\d) \d+\] )?(\d)-\d{5}-([a-z])\4*$")
    intact = 0
    for line in lines:
        m = ok.match(line)
        body = line[len(m.group(1) or ""):] if m else ""
        if m and len(body) == 5000 and m.group(3) == chr(ord(m.group(4)) - ord("a") + ord("0")):
            if m.group(2) is None or m.group(2) == m.group(3):
                intact += 1
    return intact, len(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--quick", action="store_true", help="2 s windows, 0.5 s warm-up")
    p.add_argument("--bin", help="the reuse-launch binary (default: cargo build --release)")
    p.add_argument("--rate", type=float, default=500_000, help="the paced run's lines/s (all workers)")
    p.add_argument("--no-mix", action="store_true", help="skip the mixing check")
    args = p.parse_args()
    if args.quick:
        args.duration, args.warmup = 2.0, 0.5
    if not shutil.which("gcc"):
        sys.exit("bench/logs.py needs gcc (for bench/workers/lines.c)")
    binary = build(args)
    lines_bin = build_lines()
    rows = []
    for prefix in ["slot-pid", "none"]:
        rate, cpu = throughput(binary, lines_bin, args.workers, prefix, args.warmup, args.duration)
        paced, paced_cpu = throughput(binary, lines_bin, args.workers, prefix, args.warmup, args.duration, args.rate)
        idle_cpu = idle(binary, args.workers, prefix, args.warmup, args.duration)
        mixed = None if args.no_mix else mix(binary, prefix)
        rows.append((prefix, rate, cpu, paced, paced_cpu, idle_cpu, mixed))
    cores = os.cpu_count()
    print(f"\n{args.workers} workers (bench/workers/lines.c), {args.duration:g} s windows, "
          f"{cores} CPUs; launcher CPU = utime+stime of the whole process, % of one core\n")
    print("| --log-prefix | lines/s, workers at full speed | launcher CPU | lines/s, paced "
          f"at {args.rate:,.0f} | launcher CPU | launcher CPU idle | 2 x 2,000 lines of 5,000 chars: intact / out |")
    print("|---|---|---|---|---|---|---|")
    for prefix, rate, cpu, paced, paced_cpu, idle_cpu, mixed in rows:
        m = "-" if mixed is None else f"{mixed[0]:,} / {mixed[1]:,}"
        print(f"| `{prefix}` | {rate:,.0f} | {cpu:.0f}% | {paced:,.0f} | {paced_cpu:.0f}% | {idle_cpu:.1f}% | {m} |")


if __name__ == "__main__":
    main()
