"""The step-load cell of bench/autoscale.py: one launcher configuration under a load that steps
from light to heavy and back, every request timed, the worker count sampled.

- `Phase`: so many seconds with so many closed-loop clients (each sends its next request on a
  new connection as soon as the last one is answered).
- `StepLoad`: the client threads; thread i runs while i < the current phase's clients. Every
  request is kept as (start, latency, ok), start in seconds from the load's start.
- `run_config`: start reuse-launch over `pyworker.py --serial` (one request at a time, so
  connections beyond the one in service wait in the accept queue, as with gunicorn's sync
  workers), wait until it serves, run the phases while sampling the worker processes (the
  launcher's children but its sentinel, every 0.25 s) and the launcher's CPU, then stop it
  and read its automatic decisions from `status --json`.
"""
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from . import load, procs

PYWORKER = Path(__file__).resolve().parents[2] / "tests" / "workers" / "pyworker.py"
TIMEOUT = 10.0


@dataclass(frozen=True)
class Phase:
    name: str
    seconds: float
    clients: int


@dataclass(frozen=True)
class Config:
    name: str
    title: str
    workers: str            # the -n value: "1", "3" or "1..3"
    auto: bool = False


@dataclass
class Run:
    config: Config
    round: int
    requests: List[Tuple[float, float, bool]] = field(default_factory=list)  # (start s, latency s, ok)
    workers: List[Tuple[float, int]] = field(default_factory=list)           # (t s, worker processes)
    launcher_cpu: float = 0.0    # seconds of CPU over the load
    seconds: float = 0.0
    decisions: List[dict] = field(default_factory=list)
    errors: Dict[str, int] = field(default_factory=dict)


def ready_flags(mode: str) -> List[str]:
    """`--ready auto` where steering keeps new connections off a starting slot (reuseport,
    round-robin); elsewhere a delay: a one-at-a-time worker that takes connections from its first
    moment (one shared queue) is never seen waiting for one, so `auto` would not call it ready
    before the load ends."""
    if mode in ("reuseport", "round-robin"):
        return ["--ready", "auto"]
    return ["--ready", "delay", "--ready-delay", "500ms"]


def one_request(port: int) -> bool:
    """One GET on a new connection: answered 200? (OSError when it failed.)"""
    return load.http_get(port, timeout=TIMEOUT)[0] == 200


class StepLoad:
    def __init__(self, port: int, phases: List[Phase]):
        self.port, self.phases = port, phases
        self.t0 = 0.0
        self.done = threading.Event()
        self.lock = threading.Lock()
        self.requests: List[Tuple[float, float, bool]] = []
        self.errors: Dict[str, int] = {}

    def clients_at(self, t: float) -> int:
        for p in self.phases:
            if t < p.seconds:
                return p.clients
            t -= p.seconds
        return 0

    def client(self, i: int) -> None:
        while not self.done.is_set():
            t = time.monotonic() - self.t0
            if i >= self.clients_at(t):
                time.sleep(0.01)
                continue
            try:
                ok = one_request(self.port)
                err = None if ok else "bad answer"
            except OSError as e:
                ok, err = False, type(e).__name__
            latency = time.monotonic() - self.t0 - t
            with self.lock:
                self.requests.append((t, latency, ok))
                if err:
                    self.errors[err] = self.errors.get(err, 0) + 1

    def run(self) -> None:
        most = max(p.clients for p in self.phases)
        self.t0 = time.monotonic()
        threads = [threading.Thread(target=self.client, args=(i,), daemon=True) for i in range(most)]
        for t in threads:
            t.start()
        time.sleep(sum(p.seconds for p in self.phases))
        self.done.set()
        for t in threads:
            t.join(TIMEOUT + 1)


def worker_processes(launcher: int) -> int:
    def sentinel(pid: int) -> bool:
        try:
            return b"__sentinel" in Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return True
    return sum(1 for p in procs.children(launcher) if not procs.is_zombie_or_gone(p) and not sentinel(p))


def status(binary: str, control: Path) -> Optional[dict]:
    done = subprocess.run([binary, "status", "--json", "--control", str(control)], capture_output=True,
                          text=True, timeout=20)
    return json.loads(done.stdout) if done.returncode == 0 else None


def run_config(registry: procs.Registry, binary: str, cfg: Config, phases: List[Phase], delay: float,
               scale_down_after: Optional[str], raw: Path, round_: int, mode: str = "reuseport") -> Run:
    port = procs.free_port()
    control = raw / f"{cfg.name}-r{round_}.sock"
    control.unlink(missing_ok=True)
    argv = [binary, "-n", cfg.workers, "-b", f"127.0.0.1:{port}", "--mode", mode, *ready_flags(mode),
            "--grace", "10s", "--control", str(control)]
    if cfg.auto and scale_down_after:
        argv += ["--scale-down-after", scale_down_after]
    argv += ["--", sys.executable, str(PYWORKER), "--serial", "--handle-delay", str(delay)]
    env = dict(os.environ, RUST_LOG="info")
    proc = registry.start(cfg.name, argv, env, raw / f"{cfg.name}-r{round_}.log")
    first = int(cfg.workers.split("..")[0])
    if not procs.wait_until(lambda: _ready(binary, control, first) and _answers(port), 30):
        registry.stop(proc)
        raise RuntimeError(f"{cfg.name}: the launcher did not serve within 30 s (see {proc.log})")
    run = Run(cfg, round_)
    load = StepLoad(port, phases)
    cpu0 = procs.cpu_seconds(proc.pid)
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.is_set():
            run.workers.append((time.monotonic() - load.t0, worker_processes(proc.pid)))
            sampling.wait(0.25)
    runner = threading.Thread(target=load.run)
    runner.start()
    while load.t0 == 0.0:
        time.sleep(0.001)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    runner.join()
    sampling.set()
    sampler.join()
    run.seconds = time.monotonic() - load.t0
    run.launcher_cpu = procs.cpu_seconds(proc.pid) - cpu0
    run.requests, run.errors = load.requests, load.errors
    st = status(binary, control) if cfg.auto else None
    if st and st.get("autoscale"):
        run.decisions = st["autoscale"].get("decisions", [])
    registry.stop(proc, grace=12.0)
    return run


def _ready(binary: str, control: Path, n: int) -> bool:
    """`n` workers ready (before any load: `--ready auto` sees a one-at-a-time worker waiting in
    poll() only between requests, so one loaded from its first moment would wait for
    --ready-timeout)."""
    try:
        st = status(binary, control) if control.exists() else None
    except (OSError, ValueError, subprocess.SubprocessError):
        return False
    return bool(st) and st.get("ready", 0) >= n


def _answers(port: int) -> bool:
    try:
        return one_request(port)
    except OSError:
        return False


# ---------- figures ----------

def percentile(values: List[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def summary(run: Run, phases: List[Phase]) -> dict:
    lat = [r[1] for r in run.requests if r[2]]
    bounds, t = [], 0.0
    for p in phases:
        bounds.append((p.name, t, t + p.seconds))
        t += p.seconds
    per_phase = {}
    for name, a, b in bounds:
        inside = [r[1] for r in run.requests if r[2] and a <= r[0] < b]
        per_phase[f"{name}@{a:.0f}s"] = {"requests": len(inside), "p99_ms": percentile(inside, 0.99) * 1000,
                                         "mean_ms": 1000 * sum(inside) / len(inside) if inside else float("nan")}
    mean_workers = sum(n for _, n in run.workers) / len(run.workers) if run.workers else float("nan")
    return {
        "config": run.config.name, "round": run.round, "requests": len(run.requests),
        "failed": sum(1 for r in run.requests if not r[2]), "errors": run.errors,
        "p50_ms": percentile(lat, 0.50) * 1000, "p99_ms": percentile(lat, 0.99) * 1000,
        "max_ms": max(lat) * 1000 if lat else float("nan"), "mean_workers": mean_workers,
        "most_workers": max((n for _, n in run.workers), default=0),
        "launcher_cpu_pct": 100.0 * run.launcher_cpu / run.seconds if run.seconds else float("nan"),
        "phases": per_phase, "decisions": [d.get("text") for d in run.decisions if d.get("by") == "auto"],
    }


def buckets(run: Run, width: float, total: float) -> List[Tuple[float, float, float]]:
    """(bucket start, p99 ms of the requests started in it, mean worker processes in it)."""
    out = []
    t = 0.0
    while t < total:
        lat = [r[1] for r in run.requests if r[2] and t <= r[0] < t + width]
        ws = [n for (s, n) in run.workers if t <= s < t + width]
        out.append((t, percentile(lat, 0.99) * 1000 if lat else float("nan"),
                    sum(ws) / len(ws) if ws else float("nan")))
        t += width
    return out


# ---------- the policy's figures at fixed loads (bench/autoscale.py --policy-table) ----------

@dataclass(frozen=True)
class Probe:
    slots: int
    clients: int
    pause: float    # seconds a client waits between requests (0: back to back)


def probe(registry: procs.Registry, binary: str, p: Probe, delay: float, seconds: float, raw: Path) -> dict:
    """`-n N..N` (the policy runs, cannot change anything) under `p`'s load: what its 2 s window
    showed, polled from `status --json` every 0.5 s after a 2 s warm-up."""
    port = procs.free_port()
    control = raw / f"probe-{p.slots}-{p.clients}-{p.pause}.sock"
    control.unlink(missing_ok=True)
    argv = [binary, "-n", f"{p.slots}..{p.slots}", "-b", f"127.0.0.1:{port}", "--ready", "auto",
            "--control", str(control), "--", sys.executable, str(PYWORKER), "--serial", "--handle-delay", str(delay)]
    proc = registry.start("probe", argv, dict(os.environ, RUST_LOG="warn"), raw / "probe.log")
    if not procs.wait_until(lambda: _ready(binary, control, p.slots) and _answers(port), 30):
        registry.stop(proc)
        raise RuntimeError(f"probe {p}: the launcher did not serve within 30 s")
    done = threading.Event()
    counts = {"ok": 0, "failed": 0}

    def client():
        while not done.is_set():
            try:
                counts["ok" if one_request(port) else "failed"] += 1
            except OSError:
                counts["failed"] += 1
            if p.pause:
                time.sleep(p.pause)
    threads = [threading.Thread(target=client, daemon=True) for _ in range(p.clients)]
    for t in threads:
        t.start()
    time.sleep(2.0)
    seen = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        st = status(binary, control)
        if st and st.get("autoscale"):
            seen.append(st["autoscale"]["load"])
        time.sleep(0.5)
    done.set()
    for t in threads:
        t.join(TIMEOUT + 1)
    registry.stop(proc)
    pressed = sorted(x["pressed"] for x in seen)
    queued = sorted(x["queued"] for x in seen)
    waiting = sorted(x["waiting"] for x in seen)
    return {"slots": p.slots, "clients": p.clients, "pause": p.pause, "windows": len(seen), **counts,
            "pressed_min": pressed[0] if pressed else None, "pressed_median": pressed[len(pressed) // 2] if pressed else None,
            "waiting_median": waiting[len(waiting) // 2] if waiting else None,
            "queued_max": queued[-1] if queued else None, "queued_median": queued[len(queued) // 2] if queued else None,
            "cpu_median": sorted(x["cpu"] for x in seen)[len(seen) // 2] if seen else None}
