"""The configurations compared: how each one is started, found ready, and stopped.

A configuration's `start(ctx, n)` returns a `Deployment`: the port it serves on, the worker
pids (each worker prints `ready pid=N`, the bench reads them from the logs), the pids whose
CPU time is "the thing in between" (launcher, cluster primary, PM2 daemon, nginx), and how to
stop it. A start that fails (a process exits, or nothing is ready within the time limit)
raises `StartFailed` with the tail of the log; the runner then skips that configuration and
says why in the results (this is how a launcher that rejects `--mode round-robin` is handled).

Every worker runs bench/workers/hello.js (node) or bench/workers/hello.c (native), on
127.0.0.1 only.
"""
import os
import re
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, FrozenSet, List, Optional

from .load import http_ok
from .procs import Proc, Registry, children, cpu_seconds, free_port, tail, wait_until
from .tools import Paths, find_binary, pm2_env, say

READY_LINE = re.compile(r"ready pid=(\d+)")
START_TIMEOUT = 30.0
SCRUBBED_ENV = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "NODE_UNIQUE_ID", "NODE_CHANNEL_FD",
                "NODE_CLUSTER_SCHED_POLICY", "PM2_HOME", "PORT", "HOST", "WORKERS", "NOTIFY_SOCKET")


class StartFailed(Exception):
    """The configuration did not come up; the message says why (for the results notes)."""


@dataclass
class Context:
    """What a start function needs: tools, the process registry, where to put logs."""
    paths: Paths
    registry: Registry
    logs: Path
    label: str  # unique per cell run, prefixes log names

    def log(self, name: str) -> Path:
        return self.logs / f"{self.label}-{name}.log"

    def env(self, **extra: str) -> Dict[str, str]:
        """The bench's environment without anything that would change how a worker listens."""
        env = {k: v for k, v in os.environ.items() if k not in SCRUBBED_ENV and not k.startswith("REUSE_LAUNCH_")}
        env.update(HOST="127.0.0.1", **extra)
        return env

    def node(self) -> str:
        return shutil.which("node") or "node"


@dataclass
class Deployment:
    """A started configuration: where it serves, its workers, what sits in between, how to stop."""
    port: int
    workers: List[int]
    overhead: Callable[[], List[int]] = lambda: []
    procs: List[Proc] = field(default_factory=list)
    teardown: Optional[Callable[[], None]] = None
    extra_pids: List[int] = field(default_factory=list)

    def overhead_cpu(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.overhead())

    def stop(self, registry: Registry) -> None:
        """Stop everything of this deployment: its own teardown, its processes, its workers."""
        try:
            if self.teardown is not None:
                self.teardown()
        finally:
            for proc in reversed(self.procs):
                registry.stop(proc)
            registry.stop_recorded(self.workers + self.extra_pids)


@dataclass(frozen=True)
class Config:
    name: str
    title: str
    family: str  # "reuse-launch" or "peer"
    worker: str  # "node" or "c"
    start: Callable[[Context, int], Deployment]
    overhead_label: str  # what the CPU column measures, "-" when nothing sits in between
    about: str
    needs: FrozenSet[str] = frozenset()
    fixed_workers: Optional[int] = None
    kernel_spread: bool = False  # connections spread by the kernel's reuseport hash


# ---------- readiness ----------

def ready_pids(logs: List[Path]) -> List[int]:
    pids: List[int] = []
    for log in logs:
        try:
            pids += [int(p) for p in READY_LINE.findall(log.read_text(errors="replace"))]
        except OSError:
            pass
    return pids


def wait_ready(ctx: Context, watched: List[Proc], logs: List[Path], count: int,
               also: Callable[[], bool] = lambda: True, timeout: float = START_TIMEOUT) -> List[int]:
    """Wait for `count` ready lines in `logs` and `also()`; fail if a watched process exits."""
    def check() -> bool:
        for proc in watched:
            status = proc.exited()
            if status is not None:
                raise StartFailed(f"{proc.name} exited with status {status} at start: {tail(proc.log, 3)}")
        return len(ready_pids(logs)) >= count and also()

    if not wait_until(check, timeout):
        log = (logs or [p.log for p in watched])[0]
        raise StartFailed(f"not ready within {timeout:.0f}s: {tail(log, 3)}")
    pids = ready_pids(logs)[:count]
    for pid in pids:
        ctx.registry.record(pid)
    return pids


def serving(port: int) -> Callable[[], bool]:
    return lambda: http_ok(port)


def log_has(log: Path, text: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            return text in log.read_text(errors="replace")
        except OSError:
            return False
    return check


def worker_argv(ctx: Context, worker: str) -> List[str]:
    return [ctx.node(), str(ctx.paths.hello_js)] if worker == "node" else [str(ctx.paths.hello_c)]


def bring_up(ctx: Context, dep: Deployment, steps: Callable[[], None]) -> Deployment:
    """Run `steps` to finish starting `dep`; on any failure stop what was started, re-raise."""
    try:
        steps()
    except BaseException:
        dep.stop(ctx.registry)
        raise
    return dep


# ---------- start functions ----------

def start_single(worker: str) -> Callable[[Context, int], Deployment]:
    def start(ctx: Context, n: int) -> Deployment:
        port = free_port()
        proc = ctx.registry.start("worker", worker_argv(ctx, worker), ctx.env(PORT=str(port)), ctx.log("worker"))
        dep = Deployment(port, [], procs=[proc])

        def steps() -> None:
            dep.workers = wait_ready(ctx, [proc], [proc.log], 1, serving(port))
        return bring_up(ctx, dep, steps)
    return start


def start_launcher(mode: str, worker: str, steer: Optional[str] = None) -> Callable[[Context, int], Deployment]:
    def start(ctx: Context, n: int) -> Deployment:
        port = free_port()
        steering = ["--steer", steer] if steer else []
        argv = [str(ctx.paths.launcher), "-n", str(n), "-b", f"127.0.0.1:{port}", "--mode", mode, *steering,
                "--ready-delay", "300ms", "--grace", "3s", "--", *worker_argv(ctx, worker)]
        proc = ctx.registry.start("reuse-launch", argv, ctx.env(RUST_LOG="info"), ctx.log("launcher"))
        dep = Deployment(port, [], overhead=lambda: [proc.pid], procs=[proc])
        ready = log_has(proc.log, f"all {n} workers ready")

        def steps() -> None:
            dep.workers = wait_ready(ctx, [proc], [proc.log], n, lambda: ready() and http_ok(port))
        return bring_up(ctx, dep, steps)
    return start


def start_node_cluster(policy: str) -> Callable[[Context, int], Deployment]:
    def start(ctx: Context, n: int) -> Deployment:
        port = free_port()
        env = ctx.env(PORT=str(port), WORKERS=str(n), NODE_CLUSTER_SCHED_POLICY=policy)
        proc = ctx.registry.start("cluster", [ctx.node(), str(ctx.paths.cluster_js)], env, ctx.log("cluster"))
        dep = Deployment(port, [], overhead=lambda: [proc.pid], procs=[proc])
        listening = log_has(proc.log, f"all {n} workers listening")

        def steps() -> None:
            dep.workers = wait_ready(ctx, [proc], [proc.log], n, lambda: listening() and http_ok(port))
        return bring_up(ctx, dep, steps)
    return start


def _pm2(ctx: Context, *args: str, timeout: float = 60) -> None:
    env = ctx.env(**pm2_env(ctx.paths))
    done = ctx.registry.run([str(ctx.paths.pm2), *args], env=env, timeout=timeout)
    if done.returncode != 0:
        raise StartFailed(f"pm2 {args[0]} failed ({done.returncode}): {(done.stderr or done.stdout).strip()[-300:]}")


def _pm2_daemon_pid(paths: Paths) -> Optional[int]:
    try:
        return int((paths.pm2_home / "pm2.pid").read_text().strip())
    except (OSError, ValueError):
        return None


def start_pm2(ctx: Context, n: int) -> Deployment:
    """`pm2 start hello.js -i N` (cluster mode), its daemon under bench/.tools/pm2-home."""
    port = free_port()
    log = ctx.log("pm2")
    _pm2(ctx, "kill", timeout=30)  # a daemon left over by an interrupted bench run, if any
    env = ctx.env(PORT=str(port), **pm2_env(ctx.paths))
    argv = [str(ctx.paths.pm2), "start", str(ctx.paths.hello_js), "-i", str(n), "--name", "bench-hello",
            "--merge-logs", "-o", str(log), "-e", str(log)]
    dep = Deployment(port, [])
    dep.teardown = lambda: _pm2_teardown(ctx, dep)

    def steps() -> None:
        done = ctx.registry.run(argv, env=env, timeout=60)
        daemon = _pm2_daemon_pid(ctx.paths)
        if daemon is not None:
            ctx.registry.record(daemon)
            dep.extra_pids = [daemon]
            dep.overhead = lambda: [daemon]
        if done.returncode != 0:
            raise StartFailed(f"pm2 start failed ({done.returncode}): {done.stderr.strip()[-300:]}")
        dep.workers = wait_ready(ctx, [], [log], n, serving(port))
    return bring_up(ctx, dep, steps)


def _pm2_teardown(ctx: Context, dep: Deployment) -> None:
    for pid in dep.workers:
        ctx.registry.signal_recorded(pid, signal.SIGCONT)  # so a stopped worker can exit
    try:
        _pm2(ctx, "kill", timeout=30)
    except (StartFailed, OSError) as e:
        say(f"pm2 kill: {e}; stopping its pids directly")


NGINX_CONF = """\
daemon off;
master_process on;
worker_processes {nginx_workers};
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/tmp-body;
    proxy_temp_path {dir}/tmp-proxy;
    fastcgi_temp_path {dir}/tmp-fastcgi;
    uwsgi_temp_path {dir}/tmp-uwsgi;
    scgi_temp_path {dir}/tmp-scgi;
    upstream backends {{
{servers}
        keepalive 64;
        keepalive_timeout 4s;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://backends;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""


def start_nginx(ctx: Context, n: int) -> Deployment:
    """N single node processes on their own ports behind an nginx round-robin upstream."""
    backends: List[Proc] = []
    dep = Deployment(free_port(), [], procs=backends)

    def steps() -> None:
        ports = [free_port() for _ in range(n)]
        for i, port in enumerate(ports):
            proc = ctx.registry.start(f"backend{i}", worker_argv(ctx, "node"), ctx.env(PORT=str(port)),
                                      ctx.log(f"backend{i}"))
            backends.append(proc)
            dep.workers += wait_ready(ctx, [proc], [proc.log], 1, serving(port))
        conf_dir = ctx.logs / f"{ctx.label}-nginx"
        conf_dir.mkdir(parents=True, exist_ok=True)
        servers = "\n".join(f"        server 127.0.0.1:{p};" for p in ports)
        conf = NGINX_CONF.format(nginx_workers=n, dir=conf_dir, servers=servers, port=dep.port)
        (conf_dir / "nginx.conf").write_text(conf)
        argv = [_nginx_binary(), "-p", str(conf_dir), "-c", str(conf_dir / "nginx.conf"),
                "-e", str(conf_dir / "error.log")]
        master = ctx.registry.start("nginx", argv, ctx.env(), ctx.log("nginx"))
        backends.append(master)
        wait_ready(ctx, [master], [], 0, serving(dep.port))
        dep.overhead = lambda: [master.pid, *children(master.pid)]
    return bring_up(ctx, dep, steps)


def _nginx_binary() -> str:
    return find_binary("nginx") or "nginx"


def start_bare_c(ctx: Context, n: int) -> Deployment:
    """N copies of hello.c, each binding the port itself with SO_REUSEPORT: nothing in between."""
    port = free_port()
    procs: List[Proc] = []
    dep = Deployment(port, [], procs=procs)

    def steps() -> None:
        for i in range(n):
            procs.append(ctx.registry.start(f"c{i}", worker_argv(ctx, "c"), ctx.env(PORT=str(port)),
                                            ctx.log(f"c{i}")))
        dep.workers = wait_ready(ctx, procs, [p.log for p in procs], n, serving(port))
    return bring_up(ctx, dep, steps)


# ---------- the list ----------

def _launcher_config(mode: str, worker: str) -> Config:
    """reuse-launch in `mode`; reuseport mode with `--steer hash` (the kernel's hash while every slot
    serves), named explicitly so the figures keep their meaning whatever the default is."""
    short = {"reuseport": "reuseport", "shared": "shared", "round-robin": "rr", "self": "self"}[mode]
    abouts = {
        "reuseport": "one SO_REUSEPORT socket per worker, the kernel hashes each new connection to one",
        "shared": "one listening socket shared by every worker (one accept queue)",
        "round-robin": "the launcher accepts every connection and forwards the bytes to the workers",
        "self": "the launcher binds nothing, each worker binds PORT with SO_REUSEPORT itself (supervision only)",
    }
    lang = "node" if worker == "node" else "C"
    steer = "hash" if mode == "reuseport" else None
    flags = f"--mode {mode}" + (f" --steer {steer}" if steer else "")
    return Config(f"rl-{short}-{worker}", f"reuse-launch {mode} ({lang})", "reuse-launch", worker,
                  start_launcher(mode, worker, steer), "launcher",
                  f"`reuse-launch -n N {flags}` running {'hello.js' if worker == 'node' else 'hello.c'}: "
                  f"{abouts[mode]}.", needs=frozenset({"hello-c"} if worker == "c" else ()),
                  kernel_spread=mode in ("reuseport", "self"))


def _least_loaded_config(worker: str) -> Config:
    lang = "node" if worker == "node" else "C"
    return Config(f"rl-ll-{worker}", f"reuse-launch reuseport least-loaded ({lang})", "reuse-launch", worker,
                  start_launcher("reuseport", worker, "least-loaded"), "launcher",
                  f"`reuse-launch -n N --mode reuseport --steer least-loaded` running "
                  f"{'hello.js' if worker == 'node' else 'hello.c'}: one SO_REUSEPORT socket per worker, the "
                  "launcher weights new connections towards the workers with the least load (see README).",
                  needs=frozenset({"hello-c"} if worker == "c" else ()), kernel_spread=True)


CONFIGS: List[Config] = [
    Config("single-node", "single node process", "peer", "node", start_single("node"), "-",
           "one `node hello.js` binding the port itself: the 1-process baseline.", fixed_workers=1),
    _launcher_config("reuseport", "node"),
    _least_loaded_config("node"),
    _launcher_config("shared", "node"),
    _launcher_config("round-robin", "node"),
    Config("cluster-rr-node", "Node cluster SCHED_RR", "peer", "node", start_node_cluster("rr"), "primary",
           "bench/workers/cluster.js with `NODE_CLUSTER_SCHED_POLICY=rr`: the primary accepts every connection "
           "and passes it to a worker over IPC (Node's default on Linux)."),
    Config("cluster-none-node", "Node cluster SCHED_NONE", "peer", "node", start_node_cluster("none"), "primary",
           "bench/workers/cluster.js with `NODE_CLUSTER_SCHED_POLICY=none`: the workers share the primary's socket."),
    Config("pm2-node", "PM2 cluster mode", "peer", "node", start_pm2, "pm2 daemon",
           "`pm2 start hello.js -i N` (PM2's God daemon is the cluster primary, SCHED_RR), `pm2 kill` after.",
           needs=frozenset({"pm2"})),
    Config("nginx-node", "nginx upstream", "peer", "node", start_nginx, "nginx",
           "nginx (`worker_processes N`, foreground, generated config) round-robin `upstream` with keep-alive "
           "to N single node processes on their own ports.", needs=frozenset({"nginx"})),
    _launcher_config("reuseport", "c"),
    _launcher_config("shared", "c"),
    _launcher_config("round-robin", "c"),
    _launcher_config("self", "c"),
    Config("bare-reuseport-c", "bare SO_REUSEPORT (C)", "peer", "c", start_bare_c, "-",
           "N copies of hello.c each binding the port with SO_REUSEPORT themselves: the kernel alone, "
           "nothing in between (the ceiling for reuse-launch reuseport).",
           needs=frozenset({"hello-c"}), kernel_spread=True),
]

BY_NAME: Dict[str, Config] = {c.name: c for c in CONFIGS}
