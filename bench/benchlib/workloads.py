"""The load shapes every configuration is measured under.

Each workload is one wrk invocation shape (`wrk -t1 -cC -dDs --timeout 2s --latency`), plus
how many workers the configuration runs for it and whether one worker is SIGSTOPped for the
whole measurement.
"""
from dataclasses import dataclass
from typing import Optional

WRK_TIMEOUT = "2s"
CLOSE_HEADER = "Connection: close"  # with the space: wrk silently ignores "Connection:close"


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    path: str
    connections: int
    close: bool
    workers: Optional[int]  # None: the --workers count
    stop_one: bool
    about: str

    def worker_count(self, default: int) -> int:
        return self.workers if self.workers is not None else default


WORKLOADS = [
    Workload("keepalive", "Keep-alive hello", "/", 50, False, None, False,
             "`wrk -t1 -c50`, GET /, persistent connections: the per-request path, no accept()."),
    Workload("close", "New connection per request", "/", 50, True, None, False,
             f'`wrk -t1 -c50 -H "{CLOSE_HEADER}"`, GET /: every request is a new TCP connection, '
             "so every request goes through accept() and the connection-spreading machinery."),
    Workload("cpu-n1", "CPU-heavy, 1 worker", "/cpu", 16, False, 1, False,
             "`wrk -t1 -c16`, GET /cpu (a 1e7-iteration busy loop per request), 1 worker."),
    Workload("cpu-n2", "CPU-heavy, 2 workers", "/cpu", 16, False, 2, False,
             "`wrk -t1 -c16`, GET /cpu, 2 workers: how close to 2x the 1-worker figure it gets."),
    Workload("stopped", "One worker SIGSTOPped", "/", 50, True, None, True,
             f'`wrk -t1 -c50 -H "{CLOSE_HEADER}" --timeout {WRK_TIMEOUT}`, one worker SIGSTOPped for the whole '
             "run (SIGCONT after): a hung worker. Read **hung** first: right after wrk, still stopped, 50 new "
             "connections are opened at once and each given 2 s; hung = how many got no answer. wrk itself "
             "never gives up on a connection: one that lands on the stopped worker stays stuck until the run "
             "ends (its timeout counter adds, every 2 s, the connections waiting longer than 2 s), so stuck "
             "connections show as collapsing req/s, and p99 covers only the requests that completed."),
]

BY_NAME = {w.name: w for w in WORKLOADS}
