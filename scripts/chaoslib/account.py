"""Attributing every failed request, from the harness's own log of what it did and when.

A failure is an *expected loss* when one of these rules explains it, and *unexplained* (a
defect) otherwise:

1. **holder killed**: the request went on a keep-alive connection whose last answer came from
   worker P (every response names its pid), and the harness SIGKILLed P after that answer and
   no later than the failure (+ SLACK), the failure coming within WINDOW of the kill. The bytes
   were read, or were to be read, by a process that no longer exists.
2. **in flight at a kill**: a request whose connection had not been answered on yet (a new
   connection, or the first request of a keep-alive one), so nobody knows which worker held it,
   that failed by a reset or an early close (not refused, not timed out) while the harness
   SIGKILLed a worker of the same server: the kill came after the request started (- SLACK) and
   before it failed (+ SLACK), and the failure within WINDOW of the kill.
3. **launcher killed**: any failure between a SIGKILL of the launcher (- SLACK) and RESTART_GRACE
   after the new launcher answered: its sockets, and every queued connection, died with it.
4. **hung worker killed**: rules 1 and 2 for a worker that a poisoned request hung (a `hang`
   fault) and that the launcher then SIGKILLed after --grace (replaced for --hung-timeout, or by
   a roll): the connections it held died with it. The harness sees that death rather than
   causing it (it polls /proc), so the times get OBSERVED_SLACK instead of SLACK.

Nothing else is expected: not a refused connection while a launcher runs, not a timeout, not a
reset on a connection whose holder the harness did not kill (a roll, a scale-down, a --max-memory
replacement, a SIGSTOP, a reexec must lose nothing). Each expected loss is charged to one kill
(rule 1: the holder's; rule 2: the latest kill that fits), so losses per kill can be compared.
"""
from collections import Counter
from dataclasses import dataclass
from typing import Dict, List, Optional

from .load import Failure

SLACK = 0.05          # clock slack between the harness's threads, seconds
WINDOW = 2.0          # a kill's reset reaches the client within this (loaded machine)
RESTART_GRACE = 1.0   # after a restarted launcher answers
OBSERVED_SLACK = 0.3  # a hung worker's death, seen by polling rather than caused


@dataclass
class Kill:
    t: float
    pid: int
    target: str   # "worker", "launcher", or "hung" (a hung worker the launcher killed)
    up: Optional[float] = None  # launcher kills: when the new launcher answered


@dataclass
class Verdict:
    failure: Failure
    cause: str                 # holder-killed, in-flight-at-kill, launcher-killed, hung-killed, unexplained
    kill: Optional[Kill] = None


def attribute(failures: List[Failure], kills: List[Kill]) -> List[Verdict]:
    worker_kills = sorted((k for k in kills if k.target == "worker"), key=lambda k: k.t)
    launcher_kills = [k for k in kills if k.target == "launcher"]
    hung_kills = [k for k in kills if k.target == "hung"]
    out = []
    for f in failures:
        v = Verdict(f, "unexplained")
        for k in launcher_kills:
            up = k.up if k.up is not None else float("inf")
            if k.t - SLACK <= f.t1 <= up + RESTART_GRACE:
                v = Verdict(f, "launcher-killed", k)
                break
        if v.cause == "unexplained" and f.holder is not None:
            for k in worker_kills:
                if k.pid == f.holder and f.holder_t - SLACK <= k.t <= f.t1 + SLACK and f.t1 - k.t <= WINDOW:
                    v = Verdict(f, "holder-killed", k)
        if v.cause == "unexplained" and f.holder is None and f.error in ("reset", "eof"):
            for k in worker_kills:
                if f.t0 - SLACK <= k.t <= f.t1 + SLACK and f.t1 - k.t <= WINDOW:
                    v = Verdict(f, "in-flight-at-kill", k)  # the latest that fits wins
        if v.cause == "unexplained":
            v = hung_killed(f, hung_kills) or v
        out.append(v)
    return out


def hung_killed(f: Failure, hung_kills: List[Kill]) -> Optional[Verdict]:
    """Rule 4: rules 1 and 2 for the death of a hung worker (seen, not caused: OBSERVED_SLACK)."""
    s = OBSERVED_SLACK
    for k in hung_kills:
        held = f.holder == k.pid and f.holder_t - s <= k.t <= f.t1 + s
        in_flight = f.holder is None and f.error in ("reset", "eof") and f.t0 - s <= k.t <= f.t1 + s
        if (held or in_flight) and f.t1 - k.t <= WINDOW:
            return Verdict(f, "hung-killed", k)
    return None


def per_kill(verdicts: List[Verdict], kills: List[Kill]) -> Dict[str, float]:
    """Expected losses per worker SIGKILL: mean, max, and how many kills lost nothing."""
    worker_kills = [k for k in kills if k.target == "worker"]
    charged = Counter(id(v.kill) for v in verdicts if v.kill is not None and v.kill.target == "worker")
    counts = [charged.get(id(k), 0) for k in worker_kills]
    if not counts:
        return {"kills": 0, "losses": 0, "mean": 0.0, "max": 0, "zero": 0}
    return {"kills": len(counts), "losses": sum(counts), "mean": sum(counts) / len(counts),
            "max": max(counts), "zero": sum(1 for c in counts if c == 0)}
