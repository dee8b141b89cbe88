"""The seeded fault schedule: when each fault happens, of which kind, and which worker it hits.

`plan(seed, segment, duration, kinds, workers)` returns the same list of `Fault`s for the same
arguments: times (seconds from the segment's start), kinds, and for faults that hit a worker
a `pick` in [0, 1) that chooses among the live workers sorted by pid at that moment (the pids
differ from run to run, the choice does not). Scaling is planned so that the slot count stays
within [max(1, N-1), N+2] and comes back to N at the end.
"""
import random
import zlib
from dataclasses import dataclass, field
from typing import Dict, List

# Relative frequency of each kind; a kind the segment or the binary cannot do is left out.
WEIGHTS: Dict[str, float] = {
    "kill": 30,          # SIGKILL one worker
    "stop": 14,          # SIGSTOP one worker, SIGCONT after `hold` seconds
    "roll": 8,           # one USR2
    "roll-burst": 5,     # 2-4 USR2 within 0.3 s (they must coalesce into one more roll)
    "bad-roll": 4,       # a roll to a generation that crashes at start, then a good roll
    "scale-up": 6,       # TTIN (or `reuse-launch scale +1`)
    "scale-down": 6,     # TTOU (or `reuse-launch scale -1`)
    "memory": 4,         # a worker grows past --max-memory
    "hang": 3,           # a poisoned request deadlocks (pick < 0.5) or spins the worker that takes it
    "reexec": 3,         # `reuse-launch reexec` (control socket), if the binary has it
    "launcher-kill": 1.5,  # SIGKILL the launcher, count leftovers, start a new one
}
MEAN_GAP = 1.6  # seconds between faults, on average (exponential)


@dataclass
class Fault:
    at: float
    kind: str
    pick: float = 0.0
    hold: float = 0.0       # stop: how long the worker stays stopped
    burst: int = 1          # roll-burst: how many USR2
    done: Dict = field(default_factory=dict)  # filled in when it runs: time, pid, outcome


def plan(seed: int, segment: str, duration: float, kinds: List[str], workers: int,
         quiet_tail: float = 3.0) -> List[Fault]:
    rng = random.Random(seed * 1_000_003 + zlib.crc32(segment.encode()))
    kinds = [k for k in WEIGHTS if k in kinds]
    weights = [WEIGHTS[k] for k in kinds]
    out: List[Fault] = []
    slots, lo, hi = workers, max(1, workers - 1), workers + 2
    t = 1.0 + rng.expovariate(1 / MEAN_GAP)
    end = duration - quiet_tail
    while t < end and kinds:
        kind = rng.choices(kinds, weights)[0]
        if kind == "scale-up" and slots >= hi or kind == "scale-down" and slots <= lo:
            kind = "scale-down" if kind == "scale-up" else "scale-up"
        f = Fault(round(t, 3), kind, pick=rng.random())
        if kind == "stop":
            f.hold = round(rng.uniform(0.3, 1.5), 2)
        elif kind == "roll-burst":
            f.burst = rng.randint(2, 4)
        elif kind == "scale-up":
            slots += 1
        elif kind == "scale-down":
            slots -= 1
        out.append(f)
        t += rng.expovariate(1 / MEAN_GAP)
    # Back to N slots before the end, so that the last samples compare with the first.
    tail = end
    while slots != workers:
        kind = "scale-down" if slots > workers else "scale-up"
        slots += -1 if kind == "scale-down" else 1
        out.append(Fault(round(tail, 3), kind))
        tail += 0.2
    return out


def kills_only(seed: int, segment: str, duration: float) -> List[Fault]:
    """The SIGKILL schedule of the comparison segments (the same for the launcher and for Node
    cluster): SIGKILLs only, at the same average rate as kills in the full mix x3."""
    rng = random.Random(seed * 7_919 + zlib.crc32(segment.encode()))
    out, t = [], 2.0 + rng.expovariate(1 / 1.5)
    while t < duration - 2.0:
        out.append(Fault(round(t, 3), "kill", pick=rng.random()))
        t += rng.expovariate(1 / 1.5)
    return out
