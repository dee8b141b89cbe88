"""/proc readers, the leak watch and the scan for leftover processes.

The leak watch samples one process (a launcher) every second: open fds, threads, RSS, and its
zombie children. `judge` decides whether a series is flat after warm-up (see its docstring).
Leftover processes are found by a tag: every process of a run inherits CHAOS_TAG=<tag> in its
environment, so `tagged(tag)` finds whatever is left of a run, grandchildren included.
"""
import os
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple


def stat_fields(pid: int) -> Optional[List[str]]:
    """Fields of /proc/PID/stat after the command name (index 0 is `state`, 1 is `ppid`)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def all_pids() -> List[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def is_sentinel(pid: int) -> bool:
    """Is `pid` a launcher's sentinel process (src/sentinel.rs)?"""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"__sentinel" in f.read().split(b"\0")
    except OSError:
        return False


def children(ppid: int) -> List[Tuple[int, str]]:
    """(pid, state) of the children of `ppid`."""
    out = []
    for pid in all_pids():
        f = stat_fields(pid)
        if f and int(f[1]) == ppid:
            out.append((pid, f[0]))
    return out


def alive(pid: int) -> bool:
    f = stat_fields(pid)
    return f is not None and f[0] not in ("Z", "X")


def tagged(tag: str) -> List[int]:
    """Live processes whose environment holds CHAOS_TAG=tag."""
    needle = f"CHAOS_TAG={tag}".encode()
    out = []
    for pid in all_pids():
        if pid == os.getpid():
            continue
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if needle in env.split(b"\0") and alive(pid):
            out.append(pid)
    return out


def status_field(pid: int, name: str) -> Optional[int]:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


@dataclass
class Sample:
    t: float
    fds: int
    threads: int
    rss_kib: int
    zombies: List[int]
    workers: int


@dataclass
class Watch:
    """The samples of one process (one launcher instance)."""
    pid: int
    label: str
    samples: List[Sample] = field(default_factory=list)


class Sampler(threading.Thread):
    """Samples the watched process every second until stopped; `retarget` after a restart."""

    def __init__(self, t_origin: float):
        super().__init__(daemon=True, name="leak-watch")
        self.t_origin = t_origin
        self.watches: List[Watch] = []
        self.current: Optional[Watch] = None
        self.lock = threading.Lock()
        self.stop_ev = threading.Event()

    def retarget(self, pid: Optional[int], label: str = ""):
        with self.lock:
            self.current = Watch(pid, label) if pid else None
            if self.current:
                self.watches.append(self.current)

    def sample_now(self):
        with self.lock:
            w = self.current
        if w is None:
            return
        try:
            fds = len(os.listdir(f"/proc/{w.pid}/fd"))
        except OSError:
            return
        kids = children(w.pid)
        s = Sample(time.monotonic() - self.t_origin, fds, status_field(w.pid, "Threads") or 0,
                   status_field(w.pid, "VmRSS") or 0, [p for p, st in kids if st == "Z"],
                   sum(1 for _, st in kids if st != "Z"))
        with self.lock:
            if self.current is w:
                w.samples.append(s)

    def run(self):
        while not self.stop_ev.wait(1.0):
            self.sample_now()

    def stop(self):
        self.stop_ev.set()
        self.join(5)


# How much a series may rise after warm-up and still be flat: (absolute, fraction of the first
# half's max), whichever is larger.
MARGINS = {"fds": (8, 0.20), "threads": (4, 0.25), "rss_kib": (4096, 0.10)}
WARMUP = 5.0        # seconds of an instance's life not judged
MIN_SAMPLES = 16    # fewer after warm-up: not judged (said so)
ZOMBIE_SAMPLES = 3  # a zombie child seen in this many samples in a row was not reaped: a leak


def judge(w: Watch) -> List[dict]:
    """Leaks of one instance. A series is *flat* unless, after warm-up, both the max and the
    median of its second half exceed those of its first half by more than the margin: a
    rising level, not one spike (a burst of rescued connections holds fds for a moment) and
    not noise. A zombie child seen in ZOMBIE_SAMPLES samples in a row (2 s and more) is a
    leak of its own."""
    out = []
    if not w.samples:
        return out
    start = w.samples[0].t + WARMUP
    kept = [s for s in w.samples if s.t >= start]
    for metric, (absolute, fraction) in MARGINS.items():
        if len(kept) < MIN_SAMPLES:
            continue
        half = len(kept) // 2
        first = [getattr(s, metric) for s in kept[:half]]
        second = [getattr(s, metric) for s in kept[half:]]
        margin = max(absolute, fraction * max(first))
        if max(second) > max(first) + margin and statistics.median(second) > statistics.median(first) + margin:
            out.append({"instance": w.label, "pid": w.pid, "metric": metric,
                        "detail": f"first half max {max(first)} median {statistics.median(first)}, "
                                  f"second half max {max(second)} median {statistics.median(second)}"})
    streak: Dict[int, int] = {}
    reported = set()
    for s in w.samples:
        streak = {z: streak.get(z, 0) + 1 for z in s.zombies}
        for z, n in streak.items():
            if n >= ZOMBIE_SAMPLES and z not in reported:
                reported.add(z)
                out.append({"instance": w.label, "pid": w.pid, "metric": "zombie",
                            "detail": f"child {z} a zombie for {n}+ samples"})
    return out


def summary(w: Watch) -> dict:
    """First and last (after warm-up) and max of each series, for the report."""
    if not w.samples:
        return {"instance": w.label, "pid": w.pid, "samples": 0}
    start = w.samples[0].t + WARMUP
    kept = [s for s in w.samples if s.t >= start] or w.samples
    out = {"instance": w.label, "pid": w.pid, "samples": len(w.samples), "judged": len(kept) >= MIN_SAMPLES}
    for metric in MARGINS:
        vals = [getattr(s, metric) for s in kept]
        out[metric] = (vals[0], vals[-1], max(vals))
    out["max_zombies"] = max(len(s.zombies) for s in w.samples)
    return out
