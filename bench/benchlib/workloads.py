"""The load shapes every configuration is measured under.

Each workload is one wrk invocation shape (`wrk -t1 -cC -dDs --timeout 2s --latency`), plus
how many workers the configuration runs for it, whether one worker is SIGSTOPped during the
measurement (and when), and, for the steering cells, which configurations it is run with.
"""
from dataclasses import dataclass
from typing import FrozenSet, Optional

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
    configs: Optional[FrozenSet[str]] = None  # None: every configuration
    timeout: str = WRK_TIMEOUT  # wrk --timeout: slower requests count as timeouts, not in p99
    length: int = 1  # the measured run lasts `length` x --duration (slow cells need more requests)

    def worker_count(self, default: int) -> int:
        return self.workers if self.workers is not None else default

    def stop_at(self, duration: int) -> float:
        """Seconds into the measured run at which one worker is SIGSTOPped (`stop_one`): 1 s, or a
        fifth of a shorter run, so the load runs from before the stop to well after it."""
        return min(1.0, duration / 5.0)


# The steering comparison: the launcher's reuseport mode with the kernel's hash and with
# least-loaded weights, against one shared queue and Node's cluster primary.
STEER_CONFIGS = frozenset({"rl-reuseport-node", "rl-ll-node", "rl-shared-node", "cluster-rr-node"})
# The stuck-worker cell: every way to run 4 node workers that keeps a stopped one's share off it
# (or not), and the launcher's modes with the C worker.
STOPPED_CONFIGS = frozenset({"rl-reuseport-node", "rl-ll-node", "rl-shared-node", "rl-rr-node", "cluster-rr-node",
                             "cluster-none-node", "pm2-node", "nginx-node", "rl-reuseport-c", "rl-shared-c",
                             "rl-rr-c", "rl-self-c", "bare-reuseport-c"})


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
    Workload("cpu-close", "CPU-heavy, new connection per request", "/cpu", 16, True, 2, False,
             f'`wrk -t1 -c16 -H "{CLOSE_HEADER}"`, GET /cpu (1e7 iterations, 80-100 ms here), 2 workers: every '
             "request is long, so a connection that lands behind others waits; how well each way of spreading "
             "connections keeps the tail short. wrk `--timeout 10s` and 3x the run length here (few requests per "
             "second), so the tail is measured, not cut at 2 s.", STEER_CONFIGS, "10s", 3),
    Workload("mixed", "Mixed: 1 request in 10 CPU-heavy", "/mixed", 16, True, 2, False,
             f'`wrk -t1 -c16 -H "{CLOSE_HEADER}"`, GET /mixed (hello.js: 1 request in 10, at random, runs a '
             "6e6-iteration loop, ~50 ms here; the rest are trivial), 2 workers: trivial requests stuck behind a "
             "heavy one make the tail (wrk `--timeout 10s`, 2x the run length).", STEER_CONFIGS, "10s", 2),
    Workload("stopped", "One of 4 workers SIGSTOPped during the run", "/", 32, True, 4, True,
             f'`wrk -t1 -c32 -H "{CLOSE_HEADER}" --timeout {WRK_TIMEOUT}`, 4 workers; one is SIGSTOPped 1 s into '
             "the measured run (a fifth of it if shorter) and stays stopped until after the hung probe (SIGCONT "
             "then): a worker that hangs under load. Connections its worker had already accepted stay stuck "
             "whatever runs it (nobody else holds them); wrk never gives up on a connection and its timeout "
             "counter adds, every 2 s, the connections waiting longer than 2 s, so **timeouts** counts stuck "
             "connections (each once per 2 s) and they also lower req/s (fewer of the 32 connections work). "
             "**hung**: right after wrk, still stopped, 50 new connections are opened at once and each given 2 s; "
             "hung = how many got no answer.", STOPPED_CONFIGS),
]

BY_NAME = {w.name: w for w in WORKLOADS}
