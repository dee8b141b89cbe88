#!/usr/bin/env python3
"""The cost of idle connections on the --metrics port (issue 19).

Runs `reuse-launch -n 2 --metrics 127.0.0.1:0 -- sleep` (workers that do nothing, so that
what is measured is the launcher) and measures its CPU (utime+stime of the whole process,
every thread, from /proc/PID/stat) over a window, as % of one core:

- with no client on the metrics port;
- with --connections (default 1,000) idle connections held open: each sends nothing; when
  the launcher closes one (its idle timeout, 10 s: a 408), it is opened again at once, so that
  --connections stay open all along; reconnections per second are reported;
- the same number, --slowloris (default 50) of them sending one byte a second, reconnecting
  when cut off (the request deadline, 2 s from the first byte);
- 100 more idle connections than the launcher's cap (1,024): each new one makes the launcher
  close the oldest idle one (a 503), which reconnects at once: the cost of a flood of
  connections, not of holding them.

In each window it also sends one /healthz a second and reports the slowest answer, and the
connections the launcher held (its fd count less the count without clients) at the end.

    bench/metrics_idle.py                   # 30 s windows
    bench/metrics_idle.py --quick           # 3 s windows (a smoke run)
    bench/metrics_idle.py --connections 1000 --duration 60 --bin target/release/reuse-launch

Needs python3 (standard library only); builds target/release/reuse-launch unless --bin is
given. All traffic goes to 127.0.0.1. The launcher is stopped (TERM, then KILL) on exit.
"""

import argparse
import os
import resource
import selectors
import signal
import socket
import subprocess
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TICK = os.sysconf("SC_CLK_TCK")
SLOW_REQUEST = b"GET /healthz HTTP/1.1\r\nHost: slowloris\r\nX-Padding: aaaaaaaaaaaaaaaa\r\n\r\n"


def cpu_ticks(pid):
    """utime+stime of process pid (all its threads), in clock ticks."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def fd_count(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def build(args):
    if args.bin:
        return args.bin
    subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    return os.path.join(ROOT, "target", "release", "reuse-launch")


def raise_fd_limit(need):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    if soft < need:
        raise SystemExit(f"bench/metrics_idle.py needs {need} fds; RLIMIT_NOFILE is {soft}")


def launch(binary):
    argv = [binary, "-n", "2", "-b", "127.0.0.1:0", "--metrics", "127.0.0.1:0", "--ready-delay", "200ms",
            "--grace", "2s", "--", "sleep", "100000"]
    env = dict(os.environ, RUST_LOG="info")
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True,
                            start_new_session=True)
    addr = None
    deadline = time.monotonic() + 30
    for line in proc.stderr:
        if "serving /metrics, /healthz and /readyz on http://" in line:
            host, port = line.rsplit("http://", 1)[1].strip().rsplit(":", 1)
            addr = (host, int(port))
        if addr and "all 2 workers ready" in line:
            break
        if time.monotonic() > deadline:
            break
    if addr is None:
        stop(proc)
        raise SystemExit("the launcher did not start its --metrics endpoint")
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()  # drain its log
    return proc, addr


def stop(proc):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def healthz(addr):
    """Seconds one GET /healthz took (connect to last byte), or None if it was not a 200."""
    t = time.monotonic()
    with socket.create_connection(addr, timeout=10) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: bench\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    return time.monotonic() - t if data.startswith(b"HTTP/1.1 200 ") else None


class Clients(threading.Thread):
    """n connections kept open on addr: idle (pace None) or sending a byte every pace seconds."""

    def __init__(self, addr, n, pace=None):
        super().__init__(daemon=True)
        self.addr, self.n, self.pace = addr, n, pace
        self.sel = selectors.DefaultSelector()
        self.stopping = threading.Event()
        self.reconnects = 0
        self.socks = {}

    def open(self):
        try:
            s = socket.create_connection(self.addr, timeout=5)
        except OSError:
            return
        s.setblocking(False)
        self.socks[s] = [0, time.monotonic() + (self.pace or 0)]
        self.sel.register(s, selectors.EVENT_READ)

    def close(self, s):
        self.sel.unregister(s)
        del self.socks[s]
        s.close()

    def run(self):
        for _ in range(self.n):
            self.open()
        while not self.stopping.is_set():
            for key, _ in self.sel.select(timeout=0.1):
                s = key.fileobj
                try:
                    s.recv(4096)  # data (a 408) or EOF: the launcher closed it
                    gone = True
                except BlockingIOError:
                    gone = False
                except OSError:
                    gone = True
                if gone:
                    self.close(s)
                    self.reconnects += 1
            now = time.monotonic()
            if self.pace:
                for s, state in list(self.socks.items()):
                    if now >= state[1] and state[0] < len(SLOW_REQUEST):
                        try:
                            s.send(SLOW_REQUEST[state[0]:state[0] + 1])
                        except OSError:
                            continue
                        state[0] += 1
                        state[1] = now + self.pace
            while len(self.socks) < self.n and not self.stopping.is_set():
                self.open()
        for s in list(self.socks):
            self.close(s)

    def finish(self):
        self.stopping.set()
        self.join(timeout=30)


def window(proc, addr, duration, quiet_fds, clients, want=None):
    """Launcher CPU % of a core, reconnects/s, slowest /healthz, connections held at the end."""
    for c in clients:
        c.start()
    want = want or sum(c.n for c in clients)
    settle = time.monotonic() + 30
    while fd_count(proc.pid) - quiet_fds < want * 0.95 and time.monotonic() < settle:
        time.sleep(0.05)
    r0 = sum(c.reconnects for c in clients)
    c0, t0 = cpu_ticks(proc.pid), time.monotonic()
    slowest, failed = 0.0, 0
    while time.monotonic() < t0 + duration:
        took = healthz(addr)
        if took is None:
            failed += 1
        else:
            slowest = max(slowest, took)
        time.sleep(max(0.0, 1.0 - (time.monotonic() - t0) % 1.0))
    c1, t1 = cpu_ticks(proc.pid), time.monotonic()
    r1 = sum(c.reconnects for c in clients)
    held = fd_count(proc.pid) - quiet_fds
    for c in clients:
        c.finish()
    span = t1 - t0
    return 100.0 * (c1 - c0) / TICK / span, (r1 - r0) / span, slowest, failed, held


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--connections", type=int, default=1000, help="idle connections held (default 1000)")
    p.add_argument("--slowloris", type=int, default=50, help="of those, one-byte-a-second clients in the third window")
    p.add_argument("--cap", type=int, default=1024, help="the launcher's cap on metrics connections (default 1024)")
    p.add_argument("--duration", type=float, default=30.0, help="seconds per window (default 30)")
    p.add_argument("--quick", action="store_true", help="3 s windows")
    p.add_argument("--bin", help="the reuse-launch binary (default: cargo build --release)")
    args = p.parse_args()
    if args.quick:
        args.duration = 3.0
    raise_fd_limit(max(args.connections, args.cap + 100) + 256)
    binary = build(args)
    proc, addr = launch(binary)
    rows = []
    try:
        time.sleep(1.0)  # the workers' start-up is not the idle launcher's cost
        quiet = fd_count(proc.pid)
        rows.append(("no clients", window(proc, addr, args.duration, quiet, [])))
        rows.append((f"{args.connections:,} idle", window(proc, addr, args.duration, quiet,
                                                          [Clients(addr, args.connections)])))
        idle = args.connections - args.slowloris
        rows.append((f"{idle:,} idle + {args.slowloris} slowloris",
                     window(proc, addr, args.duration, quiet,
                            [Clients(addr, idle), Clients(addr, args.slowloris, pace=1.0)])))
        over = args.cap + 100
        rows.append((f"{over:,} idle (over the cap of {args.cap:,}: each new one closes the oldest)",
                     window(proc, addr, args.duration, quiet, [Clients(addr, over)], want=args.cap)))
    finally:
        stop(proc)
    print(f"\nreuse-launch -n 2 --metrics (workers: sleep), {args.duration:g} s windows, {os.cpu_count()} CPUs, "
          f"load average at the end {os.getloadavg()[0]:.2f}; launcher CPU = utime+stime of the whole process, "
          "% of one core\n")
    print("| clients on the metrics port | launcher CPU | reconnects/s | held at the end | slowest /healthz | "
          "/healthz not 200 |")
    print("|---|---|---|---|---|---|")
    for name, (cpu, reconnects, slowest, failed, held) in rows:
        print(f"| {name} | {cpu:.2f}% | {reconnects:.0f} | {held} | {slowest * 1000:.1f} ms | {failed} |")


if __name__ == "__main__":
    main()
