"""Processes the bench starts, and how it always stops them.

Every long-running process is started in a new session, so it leads its own process group and
the terminal's Ctrl-C does not reach it: the bench alone decides when it stops. The `Registry`
remembers each one, plus the pids of processes they created that the bench must also answer
for (reuse-launch workers, the PM2 daemon and its workers). `Registry.stop_all()` runs from a
`finally` in bench/run, so everything is stopped even on Ctrl-C or an error. Signals only ever
go to a pid (or a process group) the bench started or recorded, and a recorded pid is checked
against its start time first, so a recycled pid is never signalled.

Also here: the small /proc readers the bench needs (CPU time, children, start time) and
free-port / wait-until helpers.
"""
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# ---------- /proc ----------

def _stat_fields(pid: int) -> Optional[List[str]]:
    """Fields of /proc/PID/stat after the command name (index 0 is field 3, `state`)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds; 0 if it is gone."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def start_time(pid: int) -> Optional[int]:
    """The process start time in clock ticks since boot, or None if it is gone."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def is_zombie_or_gone(pid: int) -> bool:
    fields = _stat_fields(pid)
    return fields is None or fields[0] in ("Z", "X")


def children(pid: int) -> List[int]:
    """Direct children of a process (of all its threads)."""
    kids: List[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids += [int(k) for k in (task / "children").read_text().split()]
        except OSError:
            pass
    return kids


# ---------- small helpers ----------

def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Call `check` until it returns true or `timeout` seconds pass. `check` may raise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(interval)
    return check()


def tail(path: Path, lines: int = 6) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


def signal_pid(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


# ---------- the registry ----------

@dataclass
class Proc:
    """One process the bench started, leader of its own process group."""
    name: str
    popen: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def exited(self) -> Optional[int]:
        """The exit status (negative: killed by that signal), or None while it runs.

        The leader is not reaped here: while it is a zombie its pid, and so its process group
        id, cannot be reused, which keeps the group sweep in `Registry.stop` safe.
        """
        if self.popen.returncode is not None:
            return self.popen.returncode
        try:
            info = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return self.popen.poll()
        if info is None:
            return None
        return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status


@dataclass
class Recorded:
    """A process the bench caused to exist indirectly, remembered with its start time."""
    pid: int
    started: int


@dataclass
class Registry:
    procs: List[Proc] = field(default_factory=list)
    recorded: Dict[int, Recorded] = field(default_factory=dict)

    def start(self, name: str, argv: Sequence[str], env: Dict[str, str], log: Path,
              cwd: Optional[Path] = None) -> Proc:
        """Start a process in its own session, stdout and stderr to `log`."""
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            popen = subprocess.Popen(list(argv), env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def run(self, argv: Sequence[str], env: Optional[Dict[str, str]] = None, timeout: float = 60,
            cwd: Optional[Path] = None) -> subprocess.CompletedProcess:
        """Run a short command to completion (output captured); kill it by pid on timeout."""
        with subprocess.Popen(list(argv), env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) as popen:
            try:
                out, err = popen.communicate(timeout=timeout)
            except BaseException:
                popen.kill()
                popen.wait()
                raise
        return subprocess.CompletedProcess(popen.args, popen.returncode, out, err)

    def record(self, pid: int) -> None:
        """Remember a pid the bench is responsible for (stopped in `stop_all` if still alive)."""
        started = start_time(pid)
        if started is not None:
            self.recorded[pid] = Recorded(pid, started)

    def signal_recorded(self, pid: int, sig: int) -> None:
        """Signal a recorded pid, only if it is still the same process."""
        rec = self.recorded.get(pid)
        if rec is not None and start_time(pid) == rec.started:
            signal_pid(pid, sig)

    def stop(self, proc: Proc, grace: float = 5.0) -> None:
        """SIGTERM the process group, SIGKILL it after `grace` seconds, reap the leader."""
        if proc.popen.returncode is None:
            if proc.exited() is None:
                self._signal_group(proc, signal.SIGCONT)
                self._signal_group(proc, signal.SIGTERM)
                if not wait_until(lambda: proc.exited() is not None, grace):
                    self._signal_group(proc, signal.SIGKILL)
                    wait_until(lambda: proc.exited() is not None, 5.0)
            # The leader is a zombie, not reaped: its group id is still ours. Members that
            # linger (the leader's children) get a SIGKILL, then the leader is reaped.
            self._signal_group(proc, signal.SIGKILL)
            try:
                proc.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_recorded(self, pids: Sequence[int], grace: float = 3.0) -> None:
        """Stop recorded pids that are still alive: SIGCONT + SIGTERM, then SIGKILL."""
        alive = [p for p in pids if p in self.recorded and not is_zombie_or_gone(p)]
        for pid in alive:
            self.signal_recorded(pid, signal.SIGCONT)
            self.signal_recorded(pid, signal.SIGTERM)
        wait_until(lambda: all(is_zombie_or_gone(p) for p in alive), grace)
        for pid in alive:
            if not is_zombie_or_gone(pid):
                self.signal_recorded(pid, signal.SIGKILL)
        for pid in pids:
            self.recorded.pop(pid, None)

    def stop_all(self) -> None:
        """Stop everything still running: the bench's last word, also on Ctrl-C."""
        for proc in list(reversed(self.procs)):
            self.stop(proc, grace=3.0)
        self.stop_recorded(list(self.recorded))

    @staticmethod
    def _signal_group(proc: Proc, sig: int) -> None:
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
