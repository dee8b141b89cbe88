"""Putting load on a configuration and reading what came back.

- `run_wrk`: one wrk run (`--latency` plus bench/wrk/stats.lua for p99.9 and the error
  counters); the raw output is saved, the figures parsed into a `WrkResult`;
- `http_get`: one plain HTTP/1.1 request on a new connection (readiness probes, spread);
- `sample_spread`: N sequential new-connection requests, counted by the `X-Pid` header;
- `probe_hangs`: N new connections at once, each given 2 s: how many get no answer (the
  `stopped` workload, where wrk's own timeout counter says little: see workloads.py).

All traffic goes to 127.0.0.1.
"""
import re
import socket
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .procs import Registry
from .workloads import CLOSE_HEADER, Workload

HOST = "127.0.0.1"
BENCH_LINE = re.compile(r"^BENCH (.*)$", re.M)


class LoadError(Exception):
    """wrk failed or printed nothing the bench can read."""


@dataclass
class WrkResult:
    requests: int
    duration_s: float
    p50_ms: float
    p75_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    errors: Dict[str, int]  # connect, read, write, status (non-2xx/3xx), timeout

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def socket_errors(self) -> int:
        return sum(self.errors[k] for k in ("connect", "read", "write"))


def wrk_argv(workload: Workload, port: int, seconds: int, lua: Path) -> List[str]:
    argv = ["wrk", "-t1", f"-c{workload.connections}", f"-d{seconds}s", "--timeout", workload.timeout, "--latency",
            "-s", str(lua)]
    if workload.close:
        argv += ["-H", CLOSE_HEADER]
    return argv + [f"http://{HOST}:{port}{workload.path}"]


def run_wrk(registry: Registry, workload: Workload, port: int, seconds: int, lua: Path,
            raw_out: Optional[Path]) -> WrkResult:
    """Run wrk for `seconds` (killed if it overruns by 30 s) and parse its summary."""
    argv = wrk_argv(workload, port, seconds, lua)
    done = registry.run(argv, timeout=seconds + 30)
    text = f"$ {' '.join(argv)}\n{done.stdout}{done.stderr}"
    if raw_out is not None:
        raw_out.parent.mkdir(parents=True, exist_ok=True)
        raw_out.write_text(text)
    if done.returncode != 0:
        raise LoadError(f"wrk exited with status {done.returncode}: {done.stderr.strip()[-300:]}")
    return parse_wrk(text)


def parse_wrk(text: str) -> WrkResult:
    values: Dict[str, float] = {}
    for line in BENCH_LINE.findall(text):
        for pair in line.split():
            key, _, value = pair.partition("=")
            values[key] = float(value)
    try:
        ms = {k: values[f"{k}_us"] / 1000.0 for k in ("p50", "p75", "p90", "p99", "p999", "max")}
        errors = {k: int(values[k]) for k in ("connect", "read", "write", "status", "timeout")}
        return WrkResult(int(values["requests"]), values["duration_us"] / 1e6, ms["p50"], ms["p75"], ms["p90"],
                         ms["p99"], ms["p999"], ms["max"], errors)
    except KeyError as e:
        raise LoadError(f"no {e} in the wrk output (stats.lua not run?)") from None


def http_get(port: int, path: str = "/", timeout: float = 2.0) -> Tuple[int, Optional[str]]:
    """One GET on a new connection. Returns (status, X-Pid); raises OSError on failure."""
    request = f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nConnection: close\r\n\r\n".encode()
    with socket.create_connection((HOST, port), timeout=timeout) as s:
        s.sendall(request)
        data = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    lines = head.split("\r\n")
    if not lines or not lines[0].startswith("HTTP/"):
        raise OSError(f"not an HTTP response: {data[:80]!r}")
    status = int(lines[0].split()[1])
    pid = next((line.split(":", 1)[1].strip() for line in lines[1:] if line.lower().startswith("x-pid:")), None)
    return status, pid


def http_ok(port: int) -> bool:
    try:
        return http_get(port, timeout=1.0)[0] == 200
    except OSError:
        return False


@dataclass
class Spread:
    """How `sample` sequential new-connection requests spread over worker pids."""
    sample: int
    counts: Counter = field(default_factory=Counter)
    failures: int = 0

    @property
    def distinct(self) -> int:
        return len(self.counts)

    @property
    def busiest_share(self) -> float:
        answered = sum(self.counts.values())
        return max(self.counts.values()) / answered if answered else 0.0


def sample_spread(port: int, sample: int = 200, timeout: float = 2.0) -> Spread:
    spread = Spread(sample)
    for _ in range(sample):
        try:
            status, pid = http_get(port, timeout=timeout)
        except OSError:
            spread.failures += 1
            continue
        if status == 200 and pid:
            spread.counts[pid] += 1
        else:
            spread.failures += 1
    return spread


@dataclass
class Hangs:
    """Of `sent` simultaneous new-connection requests, how many got no answer in time."""
    sent: int
    hung: int
    failed: int  # refused, reset or a non-200 answer


def probe_hangs(port: int, count: int = 50, timeout: float = 2.0) -> Hangs:
    def one(_: int) -> str:
        try:
            return "ok" if http_get(port, timeout=timeout)[0] == 200 else "failed"
        except socket.timeout:
            return "hung"
        except OSError:
            return "failed"

    with ThreadPoolExecutor(max_workers=count) as pool:
        outcomes = list(pool.map(one, range(count)))
    return Hangs(count, outcomes.count("hung"), outcomes.count("failed"))
