"""The plan of cells and the round-by-round alternation.

A cell is one (workload, configuration) pair at a worker count. Each round runs every cell
once, workload by workload, with the configurations in an order rotated by one each round, so
slow drift of a shared machine hits every configuration alike; reports use medians over rounds.

One run of a cell: start the configuration, wait until every worker is ready, warm up with a
short unrecorded wrk run, read the CPU time of the process(es) in between, run wrk (for the
`stopped` workload: SIGSTOP one worker while wrk runs, `Workload.stop_at` seconds in), read the
CPU time again, (probe for hung connections, SIGCONT), sample how 200 new connections spread
over the workers, stop everything the cell started.

A configuration that fails to start is skipped for the rest of the run, with the reason kept
for the report (e.g. a launcher that rejects `--mode round-robin` with exit 2).
"""
import re
import signal
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from .configs import Config, Context, Deployment, StartFailed
from .load import Hangs, LoadError, Spread, WrkResult, probe_hangs, run_wrk, sample_spread
from .procs import Registry
from .tools import Paths, say
from .workloads import Workload


@dataclass(frozen=True)
class Settings:
    duration: int
    warmup: int
    rounds: int
    workers: int
    spread_sample: int = 200


@dataclass
class Run:
    """One measured wrk run of a cell."""
    round: int
    wrk: WrkResult
    overhead_cpu_s: Optional[float]  # None when nothing sits between client and workers
    spread: Spread
    raw: Path
    hangs: Optional[Hangs] = None  # only with a stopped worker

    @property
    def overhead_pct(self) -> Optional[float]:
        """CPU of the process(es) in between, in % of one core over the run."""
        if self.overhead_cpu_s is None or self.wrk.duration_s <= 0:
            return None
        return 100.0 * self.overhead_cpu_s / self.wrk.duration_s


@dataclass
class Cell:
    workload: Workload
    config: Config
    workers: int
    runs: List[Run] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    @property
    def key(self) -> Tuple[str, str]:
        return self.workload.name, self.config.name

    def median(self, value: Callable[[Run], Optional[float]]) -> Optional[float]:
        values = [v for v in (value(r) for r in self.runs) if v is not None]
        return statistics.median(values) if values else None


@dataclass
class Outcome:
    cells: List[Cell]
    skipped: Dict[str, str] = field(default_factory=dict)  # config name -> why
    problems: List[str] = field(default_factory=list)      # anything that went wrong


def plan(configs: List[Config], workloads: List[Workload], default_workers: int,
         selected: Callable[[Workload, Config], bool]) -> List[Cell]:
    """Every selected cell that makes sense (1-process configs only at 1 worker; the stopped
    workload only with 2 workers or more)."""
    cells = []
    for workload in workloads:
        for config in configs:
            n = config.fixed_workers or workload.worker_count(default_workers)
            if config.fixed_workers and workload.workers and workload.workers != config.fixed_workers:
                continue
            if workload.stop_one and n < 2:
                continue
            if workload.configs is not None and config.name not in workload.configs:
                continue
            if selected(workload, config):
                cells.append(Cell(workload, config, n))
    return cells


def pattern_selector(pattern: Optional[str]) -> Callable[[Workload, Config], bool]:
    """`--only PATTERN`: a regular expression searched in "workload/config"."""
    if not pattern:
        return lambda w, c: True
    regex = re.compile(pattern)
    return lambda w, c: bool(regex.search(f"{w.name}/{c.name}"))


@dataclass
class Runner:
    """Runs cells round by round; raw wrk output to `raw_dir`, process logs to `log_dir`."""
    paths: Paths
    registry: Registry
    settings: Settings
    raw_dir: Path
    log_dir: Path

    def run(self, cells: List[Cell], unavailable: Optional[Dict[str, str]] = None) -> Outcome:
        """Run every cell `settings.rounds` times; configurations in `unavailable` (name -> why)
        are skipped from the start."""
        outcome = Outcome(cells)
        for name in dict.fromkeys(c.config.name for c in cells):
            if unavailable and name in unavailable:
                outcome.skipped[name] = unavailable[name]
                outcome.problems.append(f"{name}: {unavailable[name]}")
        workloads = list(dict.fromkeys(c.workload.name for c in cells))
        for r in range(self.settings.rounds):
            for name in workloads:
                row = [c for c in cells if c.workload.name == name]
                shift = r % len(row)
                for cell in row[shift:] + row[:shift]:
                    if cell.config.name not in outcome.skipped:
                        self.run_cell(cell, r, outcome)
        return outcome

    def run_cell(self, cell: Cell, r: int, outcome: Outcome) -> None:
        label = f"r{r + 1}-{cell.workload.name}-{cell.config.name}"
        say(f"round {r + 1}/{self.settings.rounds}  {cell.workload.name:<9} {cell.config.name:<18} n={cell.workers}")
        ctx = Context(self.paths, self.registry, self.log_dir, label)
        try:
            dep = cell.config.start(ctx, cell.workers)
        except StartFailed as e:
            outcome.skipped[cell.config.name] = str(e)
            outcome.problems.append(f"{cell.config.name} did not start: {e}")
            say(f"  skipped: {e}")
            return
        try:
            run = self.measure(cell, dep, r, self.raw_dir / f"{label}.txt")
        except LoadError as e:
            cell.notes.append(f"round {r + 1}: {e}")
            outcome.problems.append(f"{label}: {e}")
            say(f"  failed: {e}")
            return
        finally:
            dep.stop(self.registry)
        cell.runs.append(run)
        say("  " + describe(run))
        for problem in sanity_problems(cell, run):
            cell.notes.append(f"round {r + 1}: {problem}")
            outcome.problems.append(f"{label}: {problem}")

    def measure(self, cell: Cell, dep: Deployment, r: int, raw: Path) -> Run:
        lua, wl = self.paths.stats_lua, cell.workload
        if self.settings.warmup > 0:
            run_wrk(self.registry, wl, dep.port, self.settings.warmup, lua, raw_out=None)
        stopped = dep.workers[0] if wl.stop_one else None
        stop_at = wl.stop_at(self.settings.duration)
        try:
            cpu_before = dep.overhead_cpu()
            if stopped is None:
                result = run_wrk(self.registry, wl, dep.port, self.settings.duration * wl.length, lua, raw_out=raw)
            else:
                result = self._wrk_with_stop(wl, dep.port, lua, raw, stopped, stop_at)
            cpu_used = max(0.0, dep.overhead_cpu() - cpu_before)
            hangs = probe_hangs(dep.port) if stopped is not None else None
        finally:
            if stopped is not None:
                self.registry.signal_recorded(stopped, signal.SIGCONT)
        spread = sample_spread(dep.port, self.settings.spread_sample)
        overhead = None if cell.config.overhead_label == "-" else cpu_used
        return Run(r, result, overhead, spread, raw, hangs)

    def _wrk_with_stop(self, wl: Workload, port: int, lua: Path, raw: Path, victim: int,
                       stop_at: float) -> WrkResult:
        """Run wrk and SIGSTOP `victim` `stop_at` seconds after wrk started (it stays stopped)."""
        done: Dict[str, object] = {}

        def load() -> None:
            try:
                done["result"] = run_wrk(self.registry, wl, port, self.settings.duration * wl.length, lua,
                                         raw_out=raw)
            except BaseException as e:  # re-raised in the caller's thread
                done["error"] = e
        thread = threading.Thread(target=load, daemon=True)
        thread.start()
        time.sleep(stop_at)
        self.registry.signal_recorded(victim, signal.SIGSTOP)
        thread.join()
        if "error" in done:
            raise done["error"]  # type: ignore[misc]
        return done["result"]  # type: ignore[return-value]


def describe(run: Run) -> str:
    w = run.wrk
    cpu = "-" if run.overhead_pct is None else f"{run.overhead_pct:.0f}%"
    hung = f"  hung {run.hangs.hung}/{run.hangs.sent}" if run.hangs else ""
    return (f"{w.rps:8.0f} req/s  p50 {w.p50_ms:.2f} p99 {w.p99_ms:.2f} p99.9 {w.p999_ms:.2f} ms  "
            f"errors {w.socket_errors}+{w.errors['status']} timeouts {w.errors['timeout']}{hung}  "
            f"in-between cpu {cpu}  spread {run.spread.distinct} pids, busiest {run.spread.busiest_share:.0%}")


def sanity_problems(cell: Cell, run: Run) -> List[str]:
    """What is wrong with a run regardless of speed (bench/run --smoke fails on any of it)."""
    problems = []
    if run.wrk.requests == 0:
        problems.append("no request completed")
    if run.wrk.errors["status"]:
        problems.append(f"{run.wrk.errors['status']} responses were not 2xx/3xx")
    if not cell.workload.stop_one and run.spread.failures:
        problems.append(f"{run.spread.failures}/{run.spread.sample} spread-sample requests failed")
    expect_all = cell.config.kernel_spread or cell.workers == 1
    if expect_all and not cell.workload.stop_one and run.spread.distinct != cell.workers:
        problems.append(f"{run.spread.distinct} of {cell.workers} workers answered the spread sample")
    return problems
