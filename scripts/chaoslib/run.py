"""The segments of a chaos run, their faults, and the verdict.

A run is four segments, one after the other, each on its own free port under its own load:

- `py`: reuse-launch over tests/workers/pyworker.py, every kind of fault;
- `node`: reuse-launch over tests/workers/node-fd.js (through `sh -c '... exec node'` so that a
  file can make a generation crash at start), every kind but --max-memory trips;
- `cmp-rl` and `cmp-cluster`: bench/workers/hello.js under reuse-launch, then under Node cluster
  round-robin (bench/workers/cluster.js, NODE_CLUSTER_SCHED_POLICY=rr, RESPAWN=1), with the
  same seeded schedule of SIGKILLs and nothing else: expected losses per kill, side by side.

The last line counts the reuse-launch segments only (py, node, cmp-rl); Node cluster's figures
are reported next to them.
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from . import account, procs, report, schedule
from .load import Load

ROOT = Path(__file__).resolve().parents[2]


def say(msg: str):
    print(f"chaos: {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: chaos\r\nConnection: close\r\n\r\n")
            return s.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


@dataclass
class Features:
    control: bool = False   # --control and the client subcommands (scale, status)
    reexec: bool = False    # `reuse-launch reexec`
    hung: bool = False      # --hung-timeout


HUNG_TIMEOUT = "3s"  # the py segment's --hung-timeout


def features(binary: str) -> Features:
    try:
        out = subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return Features()
    return Features(control="--control" in out, reexec="reexec" in out, hung="--hung-timeout" in out)


@dataclass
class Segment:
    name: str
    server: str                 # "rl" or "cluster"
    command: List[str]
    duration: float
    faults: List[schedule.Fault]
    counts: bool = True         # in the last line (reuse-launch segments)
    flags: List[str] = field(default_factory=list)  # more launcher flags
    port: int = 0
    t0: float = 0.0
    t_end: float = 0.0
    kills: List[account.Kill] = field(default_factory=list)
    log: List[dict] = field(default_factory=list)   # every fault as it ran
    notes: List[str] = field(default_factory=list)
    leaks: List[dict] = field(default_factory=list)
    watches: List[procs.Watch] = field(default_factory=list)
    stats: object = None
    verdicts: List[account.Verdict] = field(default_factory=list)
    launcher_log: str = ""
    exit_codes: List[Optional[int]] = field(default_factory=list)


class Runner:
    def __init__(self, args, binary: str, feats: Features, out: Path, t_origin: float):
        self.args, self.binary, self.feats, self.out, self.t_origin = args, binary, feats, out, t_origin
        self.scratch = out / "raw"
        self.scratch.mkdir(parents=True, exist_ok=True)
        self.bad = self.scratch / "bad-release"      # exists: new workers exit 1 at start
        self.grow = self.scratch / "grow-pid"         # holds the pid of the worker that must grow
        self.stopped: set = set()
        self.servers: List[subprocess.Popen] = []
        self.poisons: List[socket.socket] = []        # poisoned requests, kept open until the end
        self.hangs = 0

    # ----- the server under test -----

    def start_server(self, seg: Segment, tag: str) -> subprocess.Popen:
        env = dict(os.environ, CHAOS_TAG=tag, CHAOS_BAD=str(self.bad), RUST_LOG="info")
        if seg.server == "rl":
            argv = [self.binary, "-n", str(self.args.workers), "-b", f"127.0.0.1:{seg.port}", "--ready", "auto",
                    "--grace", "10s", "--max-memory", f"{self.args.max_memory_mb}M"]
            if self.feats.control:
                argv += ["--control", str(self.control_path(seg))]
            argv += seg.flags + ["--"] + seg.command
        else:
            env.update(WORKERS=str(self.args.workers), PORT=str(seg.port), HOST="127.0.0.1",
                       NODE_CLUSTER_SCHED_POLICY="rr", RESPAWN="1")
            argv = seg.command
        logf = open(self.scratch / f"{seg.name}-server.log", "ab")
        p = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                             start_new_session=True)
        self.servers.append(p)
        logf.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if p.poll() is not None:
                raise RuntimeError(f"{seg.name}: the server exited with {p.returncode} at start "
                                   f"(see {self.scratch / (seg.name + '-server.log')})")
            if answers(seg.port) and len(self.workers(p.pid)) >= self.args.workers:
                return p
            time.sleep(0.1)
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        raise RuntimeError(f"{seg.name}: the server did not answer within 30 s")

    def control_path(self, seg: Segment) -> Path:
        return Path("/tmp") / f"chaos-{os.getpid()}-{seg.name}.sock"

    def client(self, seg: Segment, *words: str) -> str:
        env = dict(os.environ, REUSE_LAUNCH_CONTROL=str(self.control_path(seg)))
        r = subprocess.run([self.binary, *words], env=env, capture_output=True, text=True, timeout=30)
        return f"exit {r.returncode}: {(r.stdout + r.stderr).strip()[:120]}"

    @staticmethod
    def workers(server_pid: int) -> List[int]:
        # The launcher's children but its sentinel (`reuse-launch __sentinel`), which is no worker.
        return sorted(p for p, st in procs.children(server_pid) if st != "Z" and not procs.is_sentinel(p))

    # ----- faults -----

    def fault(self, seg: Segment, f: schedule.Fault, server: subprocess.Popen, tag: str) -> subprocess.Popen:
        now = time.monotonic()
        entry = {"t": round(now - self.t_origin, 3), "kind": f.kind}
        pids = self.workers(server.pid)
        victim = pids[int(f.pick * len(pids))] if pids else None
        try:
            if f.kind == "kill" and victim:
                os.kill(victim, signal.SIGKILL)
                seg.kills.append(account.Kill(now, victim, "worker"))
                entry["pid"] = victim
            elif f.kind == "stop" and victim:
                os.kill(victim, signal.SIGSTOP)
                self.stopped.add(victim)
                threading.Timer(f.hold, self.cont, (victim,)).start()
                entry.update(pid=victim, hold=f.hold)
            elif f.kind == "roll":
                os.kill(server.pid, signal.SIGUSR2)
            elif f.kind == "roll-burst":
                for _ in range(f.burst):
                    os.kill(server.pid, signal.SIGUSR2)
                    time.sleep(0.1)
                entry["burst"] = f.burst
            elif f.kind == "bad-roll":
                threading.Thread(target=self.bad_roll, args=(seg, server.pid, entry), daemon=True).start()
            elif f.kind in ("scale-up", "scale-down"):
                if self.feats.control:
                    entry["client"] = self.client(seg, "scale", "+1" if f.kind == "scale-up" else "-1")
                else:
                    os.kill(server.pid, signal.SIGTTIN if f.kind == "scale-up" else signal.SIGTTOU)
            elif f.kind == "memory" and victim:
                tmp = self.grow.with_suffix(".tmp")
                tmp.write_text(str(victim))
                tmp.rename(self.grow)
                entry["pid"] = victim
            elif f.kind == "hang":
                threading.Thread(target=self.hang, args=(seg, f, entry), daemon=True).start()
            elif f.kind == "reexec":
                entry["client"] = self.client(seg, "reexec")
            elif f.kind == "launcher-kill":
                server = self.launcher_kill(seg, server, tag, entry)
            else:
                entry["skipped"] = "no live worker"
        except ProcessLookupError:
            entry["skipped"] = "the process was gone"
        seg.log.append(entry)
        return server

    def cont(self, pid: int):
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
        self.stopped.discard(pid)

    def bad_roll(self, seg: Segment, launcher: int, entry: dict):
        """A roll to a generation that crashes at start (the bad-release file exists while it is
        tried), then a good roll."""
        log_path = self.scratch / f"{seg.name}-server.log"
        start = log_path.stat().st_size
        self.bad.touch()
        outcome = "no abandon seen within 8 s"
        try:
            os.kill(launcher, signal.SIGUSR2)
            deadline = time.monotonic() + 8
            while time.monotonic() < deadline:
                with open(log_path, "rb") as fh:
                    fh.seek(start)
                    if b"abandoned" in fh.read():
                        outcome = "abandoned"
                        break
                time.sleep(0.05)
        finally:
            self.bad.unlink(missing_ok=True)
        entry["outcome"] = outcome
        try:
            os.kill(launcher, signal.SIGUSR2)
        except ProcessLookupError:
            pass

    def hang(self, seg: Segment, f: schedule.Fault, entry: dict):
        """A poisoned request (pyworker --poison): the worker that takes it deadlocks or spins and
        never accepts again. The launcher must replace it (--hung-timeout) and SIGKILL it after
        --grace; the connections it held then are expected losses (rule 4), recorded at its death."""
        self.hangs += 1
        path = f"/{'deadlock' if f.pick < 0.5 else 'spin'}?n={self.hangs}"
        entry["path"] = path
        log_path = self.scratch / f"{seg.name}-server.log"
        start = log_path.stat().st_size
        sent = time.monotonic()
        try:
            s = socket.create_connection(("127.0.0.1", seg.port), timeout=2)
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: chaos\r\n\r\n".encode())
            self.poisons.append(s)
        except OSError as e:
            entry["outcome"] = f"not sent: {e}"
            return
        line = re.compile(rb"\[\d+ (\d+)\] poisoned by " + re.escape(path.encode()) + rb"\n")

        def since() -> bytes:
            with open(log_path, "rb") as fh:
                fh.seek(start)
                return fh.read()
        victim = None
        while victim is None and time.monotonic() < sent + 10:
            m = line.search(since())
            victim = int(m.group(1)) if m else None
            time.sleep(0.05)
        if victim is None:
            entry["outcome"] = "no worker took it within 10 s"
            return
        entry["pid"] = victim
        while procs.alive(victim) and time.monotonic() < sent + 120:
            time.sleep(0.01)
        died = time.monotonic()
        if procs.alive(victim):
            entry["outcome"] = "still alive after 120 s"
            return
        by_harness = any(k.pid == victim and k.target == "worker" for k in seg.kills)
        if not by_harness:
            seg.kills.append(account.Kill(died, victim, "hung"))
        replaced = re.search(rb"\(pid %d, gen \d+\) has been stalled for " % victim, since())
        entry["outcome"] = ("replaced as hung" if replaced else "SIGKILLed by the harness" if by_harness
                            else "stopped otherwise (a roll, a scale-down, the launcher's end)")
        entry["died_after"] = round(died - sent, 2)

    def launcher_kill(self, seg: Segment, server: subprocess.Popen, tag: str, entry: dict) -> subprocess.Popen:
        old = server.pid
        t = time.monotonic()
        os.kill(old, signal.SIGKILL)
        kill = account.Kill(t, old, "launcher")
        seg.kills.append(kill)
        server.wait()
        self.sampler.retarget(None)
        time.sleep(1.0)
        left = procs.tagged(tag)
        for pid in left:
            seg.leaks.append({"instance": f"{seg.name} launcher {old}", "pid": pid, "metric": "leftover",
                              "detail": f"process {pid} still alive 1 s after its launcher was SIGKILLed"})
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        entry.update(pid=old, leftovers=len(left))
        new = self.start_server(seg, tag)
        kill.up = time.monotonic()
        self.sampler.retarget(new.pid, f"{seg.name} launcher {new.pid}")
        entry["restarted_in"] = round(kill.up - t, 2)
        return new

    # ----- one segment -----

    def segment(self, seg: Segment):
        tag = f"{os.getpid()}-{seg.name}"
        seg.port = free_port()
        self.bad.unlink(missing_ok=True)
        self.grow.write_text("")
        say(f"segment {seg.name}: {seg.server} on 127.0.0.1:{seg.port} for {seg.duration:.0f} s, "
            f"{len(seg.faults)} faults planned")
        self.sampler = procs.Sampler(self.t_origin)
        server = self.start_server(seg, tag)
        if seg.server == "rl":
            self.sampler.retarget(server.pid, f"{seg.name} launcher {server.pid}")
            self.sampler.start()
        seg.t0 = time.monotonic()
        load = Load(seg.port, self.args.rate, self.args.clients, self.t_origin)
        load.start()
        try:
            for f in seg.faults:
                delay = seg.t0 + f.at - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                server = self.fault(seg, f, server, tag)
                if server.poll() is not None:
                    seg.notes.append(f"the server exited on its own with {server.returncode} "
                                     f"at {time.monotonic() - self.t_origin:.1f} s")
                    break
            delay = seg.t0 + seg.duration - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        finally:
            load.stop()
            seg.t_end = time.monotonic()
            for s in self.poisons:
                s.close()
            self.poisons.clear()
            for pid in list(self.stopped):
                self.cont(pid)
            if seg.server == "rl":
                self.sampler.stop()
                seg.watches = self.sampler.watches
            seg.exit_codes.append(self.stop_server(seg, server))
            self.bad.unlink(missing_ok=True)
        time.sleep(1.0)
        for pid in procs.tagged(tag):
            seg.leaks.append({"instance": seg.name, "pid": pid, "metric": "leftover",
                              "detail": f"process {pid} still alive after the server stopped"})
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        seg.stats = load.merged()
        seg.verdicts = account.attribute(seg.stats.failures, seg.kills)
        for w in seg.watches:
            seg.leaks.extend(procs.judge(w))
        seg.launcher_log = (self.scratch / f"{seg.name}-server.log").read_text(errors="replace")
        ok = sum(seg.stats.ok.values())
        bad = len(seg.verdicts)
        unexplained = sum(1 for v in seg.verdicts if v.cause == "unexplained")
        say(f"segment {seg.name}: {ok + bad} requests, {bad} failed, {unexplained} unexplained, "
            f"{len(seg.leaks)} leaks, {sum(1 for k in seg.kills if k.target == 'worker')} worker SIGKILLs")

    def cleanup(self):
        """Whatever server is still running when the run ends early (TERM, Ctrl-C, an error)."""
        for p in self.servers:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.servers:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    def stop_server(self, seg: Segment, server: subprocess.Popen) -> Optional[int]:
        if server.poll() is not None:
            return server.returncode
        server.send_signal(signal.SIGTERM)
        try:
            return server.wait(25)
        except subprocess.TimeoutExpired:
            seg.notes.append("the server did not stop within 25 s of SIGTERM: SIGKILLed its group")
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
            return None


def build(smoke: bool) -> str:
    profile = [] if smoke else ["--release"]
    say(f"cargo build {' '.join(profile)}".rstrip())
    subprocess.run(["cargo", "build", "--quiet", *profile], cwd=ROOT, check=True)
    return str(ROOT / "target" / ("debug" if smoke else "release") / "reuse-launch")


def segments(args, feats: Features) -> List[Segment]:
    py = sys.executable
    every = [k for k in schedule.WEIGHTS if (k != "reexec" or feats.reexec) and (k != "hang" or feats.hung)]
    if args.no_launcher_kill:
        every.remove("launcher-kill")
    if args.faults:
        wanted = args.faults.split(",")
        unknown = set(wanted) - set(schedule.WEIGHTS)
        if unknown:
            raise SystemExit(f"chaos: unknown fault kinds {sorted(unknown)}: expected {list(schedule.WEIGHTS)}")
        every = [k for k in every if k in wanted]
    d = args.duration
    smoke_gap = 0.8 if args.smoke else None
    if smoke_gap:
        schedule.MEAN_GAP = smoke_gap
    n = args.workers
    part = {"py": 0.35, "node": 0.35, "cmp": 0.15}
    segs = [
        Segment("py", "rl", [py, "tests/workers/pyworker.py", "--exit-if-file", "{bad}", "--grow-if-file", "{grow}",
                             "--grow-mb", str(args.grow_mb), "--poison"],
                d * part["py"], schedule.plan(args.seed, "py", d * part["py"], every, n),
                flags=["--hung-timeout", HUNG_TIMEOUT] if feats.hung else []),
        Segment("node", "rl", ["sh", "-c", '[ -e "$CHAOS_BAD" ] && exit 1; exec node tests/workers/node-fd.js'],
                d * part["node"], schedule.plan(args.seed, "node", d * part["node"],
                                                [k for k in every if k not in ("memory", "hang")], n)),
    ]
    kills = schedule.kills_only(args.seed, "cmp", d * part["cmp"])
    segs.append(Segment("cmp-rl", "rl", ["node", "bench/workers/hello.js"], d * part["cmp"], kills))
    segs.append(Segment("cmp-cluster", "cluster", ["node", "bench/workers/cluster.js"], d * part["cmp"],
                        [schedule.Fault(f.at, f.kind, f.pick) for f in kills], counts=False))
    chosen = args.segments.split(",")
    return [s for s in segs if s.name in chosen]


def _interrupted(signum, _frame):
    # TERM/HUP end the run like Ctrl-C: the segment's `finally` stops its server and its load.
    raise KeyboardInterrupt(f"signal {signum}")


def main(args) -> int:
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupted)
    t_origin = time.monotonic()
    started = time.strftime("%Y-%m-%d-%H%M")
    if args.out:
        out = Path(args.out)
    elif args.smoke:
        out = ROOT / "target" / "chaos-smoke"
    else:
        out = ROOT / "bench" / "results" / f"chaos-{started}"
    out.mkdir(parents=True, exist_ok=True)
    binary = args.binary or build(args.smoke)
    feats = features(binary)
    say(f"seed {args.seed} (repeat with --seed {args.seed}), {args.duration:.0f} s, {args.workers} workers, "
        f"{args.rate:.0f} req/s, binary {binary}; control socket: {'yes' if feats.control else 'no (TTIN/TTOU)'}, "
        f"reexec: {'yes' if feats.reexec else 'no'}, --hung-timeout: {'yes' if feats.hung else 'no'}; results in {out}")
    runner = Runner(args, binary, feats, out, t_origin)
    segs = segments(args, feats)
    for seg in segs:
        seg.command = [a.replace("{bad}", str(runner.bad)).replace("{grow}", str(runner.grow)) for a in seg.command]
    load_start = os.getloadavg()
    errors = []
    try:
        for seg in segs:
            try:
                runner.segment(seg)
            except Exception as e:  # noqa: BLE001 - a segment that could not run is a failed run
                errors.append(f"{seg.name}: {e}")
                say(f"segment {seg.name} failed: {e}")
    finally:
        runner.cleanup()
    totals = report.write(out, args, feats, segs, errors, load_start, os.getloadavg(), started, t_origin)
    print(report.table(totals, segs), flush=True)
    r, f, e, u, l = totals["R"], totals["F"], totals["E"], totals["U"], totals["L"]
    print(f"chaos: {r} requests, {f} failed, {e} expected, {u} unexplained, {l} leaks", flush=True)
    return 0 if (u == 0 and l == 0 and not errors) else 1
