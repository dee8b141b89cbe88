//! The launcher's flags as clap parses them, raw strings mostly: `--help` text, defaults and
//! environment variables. Validation into [`Config`](super::Config) is the parent module's.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::Parser;

const AFTER_HELP: &str = "\
SIGNALS (send to the launcher's pid):
  USR2, HUP     rolling restart: one slot at a time, new worker ready before the old one stops
  TERM, INT     graceful stop: stop signal to every worker, SIGKILL after --grace, exit 0
                (with --drain-delay: /readyz says 503 at once, workers keep serving that long)
  second TERM/INT, QUIT
                immediate stop: SIGKILL every worker's process group, exit (a second TERM/INT
                during --drain-delay ends the delay: the graceful stop starts at once)
  TTIN, TTOU    one worker slot more, one fewer (never below 1, nor outside -n MIN..MAX)

WORKER ENVIRONMENT (fds 3.. are the listening sockets, in --bind order; a worker that binds a
--bind port itself gets the same socket on that fd, see --intercept-bind):
  LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES   systemd socket-activation variables (sd_listen_fds)
  PORT                    port of the first --bind
  REUSE_LAUNCH_SLOT       0..N-1, stable across restarts of the slot
  NODE_APP_INSTANCE       the same, under PM2's name
  REUSE_LAUNCH_GENERATION bumped by every rolling restart
  REUSE_LAUNCH_PID        the launcher's pid
  NOTIFY_SOCKET           with --ready notify or --watchdog: send READY=1 (WATCHDOG=1) there
  WATCHDOG_USEC, WATCHDOG_PID              with --watchdog
  SERVER_STARTER_PORT, SERVER_STARTER_GENERATION, EINHORN_FD_COUNT, EINHORN_FD_0..
                          for servers built on Server::Starter or einhorn libraries
  In the command's arguments {fd}, {fds}, {port} and {slot} are replaced per worker.
  With --socket-on-stdin fd 0 is the slot's first listening socket too (inetd wait style:
  Java's System.inheritedChannel() returns it as a ServerSocketChannel).

LAUNCHER ENVIRONMENT:
  every flag has a variable: REUSE_LAUNCH_WORKERS, REUSE_LAUNCH_BIND (comma-separated),
  REUSE_LAUNCH_MODE, REUSE_LAUNCH_BACKLOG, REUSE_LAUNCH_GRACE, REUSE_LAUNCH_STOP_SIGNAL,
  REUSE_LAUNCH_READY, REUSE_LAUNCH_READY_DELAY, REUSE_LAUNCH_READY_TIMEOUT,
  REUSE_LAUNCH_MAX_START_FAILURES, REUSE_LAUNCH_WATCHDOG, REUSE_LAUNCH_USER, REUSE_LAUNCH_GROUP,
  REUSE_LAUNCH_SOCKET_ON_STDIN, REUSE_LAUNCH_CONTROL, REUSE_LAUNCH_LOG_PREFIX, REUSE_LAUNCH_METRICS,
  REUSE_LAUNCH_MIN_READY, REUSE_LAUNCH_DRAIN_DELAY, REUSE_LAUNCH_INTERCEPT_BIND,
  REUSE_LAUNCH_CONTAINMENT, REUSE_LAUNCH_HUNG_TIMEOUT, REUSE_LAUNCH_SCALE_DOWN_AFTER;
  PORT sets the default bind; RUST_LOG the log level. Started with LISTEN_FDS/LISTEN_PID
  (systemd socket activation) it adopts those sockets instead of binding; with NOTIFY_SOCKET it
  reports READY=1, RELOADING=1, STATUS=, STOPPING=1 to its own supervisor.

CONTROL (talk to a running launcher through its control socket, --control):
  reuse-launch status [--json]   workers, state, uptime, restarts, CPU, memory, queues
  reuse-launch scale N|+K|-K     change the number of workers (also TTIN/TTOU: +1/-1)
  reuse-launch roll              rolling restart (as USR2)
  reuse-launch stop [--no-wait]  graceful stop (as TERM), waiting until it has exited
  reuse-launch reexec            re-execute the launcher's own binary in place (same pid, same
                                 workers)
  Each takes --pid PID or --control PATH; default: the only launcher this user runs.
  Exit codes: 0 done, 1 refused or failed, 2 usage, 3 no launcher found.
  `reuse-launch status --help` for more.

EXAMPLE:
  reuse-launch -n 4 -b 127.0.0.1:8080 -- python3 tests/workers/pyworker.py";

/// The flags exactly as typed; nothing here is validated beyond clap's syntax.
#[derive(Parser, Debug)]
#[command(
    name = "reuse-launch",
    version,
    about = "Bind the port once, run N copies of any server on it, let the kernel spread connections.",
    after_help = AFTER_HELP
)]
pub struct Args {
    /// Number of workers, or `auto` for the number of CPUs; or `MIN..MAX` (MAX may be `auto`):
    /// start with MIN and follow the load between the two (see the README, "Automatic scaling").
    #[arg(short = 'n', long, env = "REUSE_LAUNCH_WORKERS", default_value = "auto", value_name = "N|auto|MIN..MAX")]
    pub workers: String,

    /// With -n MIN..MAX: how long the load must stay low before one slot is removed (default 30s).
    #[arg(long, env = "REUSE_LAUNCH_SCALE_DOWN_AFTER", value_name = "DURATION")]
    pub scale_down_after: Option<String>,

    /// Replace (make-before-break) a worker that has stayed stalled this long: frozen (no CPU,
    /// connections waiting) or not accepting (its queue not drained while the others drain).
    /// Never one stopped by a signal. Default: off.
    #[arg(long, env = "REUSE_LAUNCH_HUNG_TIMEOUT", value_name = "DURATION")]
    pub hung_timeout: Option<String>,

    /// Address to listen on: HOST:PORT, [V6]:PORT, :PORT, or NAME=ADDR. Repeatable; each one is
    /// one more fd per worker (3, 4, ... in order). Default 0.0.0.0:$PORT, else 0.0.0.0:8080.
    #[arg(short = 'b', long = "bind", env = "REUSE_LAUNCH_BIND", value_delimiter = ',', value_name = "ADDR")]
    pub bind: Vec<String>,

    /// How connections are spread: `reuseport` (one socket per slot), `shared` (one socket),
    /// `round-robin` (the launcher accepts and forwards, for comparison) or `self` (workers
    /// bind PORT themselves with SO_REUSEPORT).
    #[arg(long, env = "REUSE_LAUNCH_MODE", default_value = "reuseport", value_name = "MODE")]
    pub mode: String,

    /// With --mode round-robin: forwarding threads (auto: half the CPUs, at least 1).
    #[arg(long, env = "REUSE_LAUNCH_PROXY_THREADS", default_value = "auto", value_name = "N|auto")]
    pub proxy_threads: String,

    /// listen() backlog of every socket (default: net.core.somaxconn).
    #[arg(long, env = "REUSE_LAUNCH_BACKLOG", value_name = "N")]
    pub backlog: Option<String>,

    /// How long a stopping worker gets before SIGKILL.
    #[arg(long, env = "REUSE_LAUNCH_GRACE", default_value = "30s", value_name = "DURATION")]
    pub grace: String,

    /// Signal sent to a worker's process group when it must stop.
    #[arg(long, env = "REUSE_LAUNCH_STOP_SIGNAL", default_value = "TERM", value_name = "SIG")]
    pub stop_signal: String,

    /// When a worker counts as ready: `delay` (alive for --ready-delay), `notify` (it sends
    /// READY=1 on NOTIFY_SOCKET) or `auto` (/proc shows it waiting for connections on its socket;
    /// --ready-delay where /proc cannot tell).
    #[arg(long, env = "REUSE_LAUNCH_READY", default_value = "delay", value_name = "delay|notify|auto")]
    pub ready: String,

    /// With --ready delay: how long a worker must stay alive to count as ready (also the
    /// fallback of --ready auto).
    #[arg(long, env = "REUSE_LAUNCH_READY_DELAY", default_value = "1s", value_name = "DURATION")]
    pub ready_delay: String,

    /// A worker not ready by then is stopped (a rolling restart is abandoned).
    #[arg(long, env = "REUSE_LAUNCH_READY_TIMEOUT", default_value = "60s", value_name = "DURATION")]
    pub ready_timeout: String,

    /// With sd_notify: a ready worker that sends no WATCHDOG=1 for this long is restarted
    /// (workers get WATCHDOG_USEC and WATCHDOG_PID, as under systemd).
    #[arg(long, env = "REUSE_LAUNCH_WATCHDOG", value_name = "DURATION")]
    pub watchdog: Option<String>,

    /// Run workers as this user (name or uid); the launcher binds first, so it may bind
    /// privileged ports as root.
    #[arg(long, env = "REUSE_LAUNCH_USER", value_name = "USER")]
    pub user: Option<String>,

    /// Run workers with this group (default: the --user's primary group).
    #[arg(long, env = "REUSE_LAUNCH_GROUP", value_name = "GROUP")]
    pub group: Option<String>,

    /// Also give each worker the slot's (first) listening socket as its fd 0, inetd "wait"
    /// style, for servers that can only take a socket there (Java's System.inheritedChannel()).
    /// Not with --mode self (there is no socket to give).
    #[arg(long, env = "REUSE_LAUNCH_SOCKET_ON_STDIN", value_parser = clap::builder::FalseyValueParser::new())]
    pub socket_on_stdin: bool,

    /// A worker (or any process it starts) that binds a --bind port itself gets its slot's
    /// socket on that fd instead, and its listen() leaves the launcher's backlog alone (seccomp
    /// user notification, Linux 5.9+): servers that bind PORT run unchanged. `auto`: on where
    /// the kernel allows it (a line at start says why not elsewhere); `on`: refuse to start
    /// without it; `off`: workers must use fds 3.. (LISTEN_FDS). Not with --mode self.
    #[arg(long, env = "REUSE_LAUNCH_INTERCEPT_BIND", default_value = "auto", value_name = "auto|on|off")]
    pub intercept_bind: String,

    /// With --mode reuseport: how a new connection picks its slot among the serving ones.
    /// `hash` (the kernel's hash of the connection; uniformly at random while some slot is left
    /// out), `least-loaded` (favour slots with the shortest accept queues, by weights),
    /// `ip` (sticky by client address: every connection of one address goes to one slot while
    /// it serves), `cpu` (the slot whose worker is pinned to the CPU that took the connection
    /// in; implies --pin).
    #[arg(long, env = "REUSE_LAUNCH_STEER", default_value = "hash", value_name = "hash|least-loaded|ip|cpu")]
    pub steer: String,

    /// Pin each worker to one CPU: slot s to the s-th CPU the launcher may run on (slots
    /// beyond the number of CPUs share them, round-robin).
    #[arg(long, env = "REUSE_LAUNCH_PIN", value_parser = clap::builder::FalseyValueParser::new())]
    pub pin: bool,

    /// Replace a worker (make-before-break, like a one-slot roll) whose process group's RSS
    /// stays above this for 3 samples a second apart: `512M`, `2G` (K, M, G, T: powers of 1024).
    #[arg(long, env = "REUSE_LAUNCH_MAX_MEMORY", value_name = "SIZE")]
    pub max_memory: Option<String>,

    /// The control socket (`reuse-launch status`, `scale`, `roll`, `stop`). Default:
    /// $XDG_RUNTIME_DIR/reuse-launch/<pid>.sock, else /run/reuse-launch/<pid>.sock as root, else
    /// /tmp/reuse-launch-<uid>/<pid>.sock.
    #[arg(long, env = "REUSE_LAUNCH_CONTROL", value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// How workers' stdout and stderr reach the launcher's: `slot-pid` (through the launcher,
    /// line by line, each line prefixed `[SLOT PID] `; lines never mix) or `none` (workers
    /// inherit the launcher's stdout and stderr).
    #[arg(long, env = "REUSE_LAUNCH_LOG_PREFIX", default_value = "slot-pid", value_name = "slot-pid|none")]
    pub log_prefix: String,

    /// Serve `GET /metrics` (Prometheus text), `/healthz` (the supervisor loop turns) and
    /// `/readyz` (enough workers ready, not stopping) on this address (HOST:PORT, :PORT), from a
    /// thread of its own.
    #[arg(long, env = "REUSE_LAUNCH_METRICS", value_name = "ADDR")]
    pub metrics: Option<String>,

    /// With --metrics: `/readyz` answers 200 once this many workers are ready (default: every
    /// desired worker; never more than the desired number).
    #[arg(long, env = "REUSE_LAUNCH_MIN_READY", value_name = "N")]
    pub min_ready: Option<String>,

    /// On TERM/INT, keep serving this long before stopping the workers, while `/readyz` already
    /// says 503 (Kubernetes' preStop sleep, without a sleep binary in the image).
    #[arg(long, env = "REUSE_LAUNCH_DRAIN_DELAY", default_value = "0s", value_name = "DURATION")]
    pub drain_delay: String,

    /// How a worker's whole tree is ended (at its exit, and when the launcher dies): `auto` (a
    /// cgroup v2 per worker where the launcher may create one, cgroup.kill, Linux 5.14; else the
    /// sentinel alone), `cgroup` (that, or exit 1) or `sentinel` (process groups and a scan of
    /// /proc, see the README).
    #[arg(long, env = "REUSE_LAUNCH_CONTAINMENT", default_value = "auto", value_name = "auto|cgroup|sentinel")]
    pub containment: String,

    /// Give up (exit 1) when every slot's worker died this many times in a row before it
    /// became ready.
    #[arg(long, env = "REUSE_LAUNCH_MAX_START_FAILURES", default_value = "5", value_name = "N")]
    pub max_start_failures: String,

    /// The server command and its arguments.
    #[arg(required = true, last = true, value_name = "COMMAND")]
    pub command: Vec<OsString>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn help_has_each_section_once() {
        let help = Args::command().render_long_help().to_string();
        for section in ["SIGNALS", "CONTROL", "WORKER ENVIRONMENT", "LAUNCHER ENVIRONMENT", "EXAMPLE"] {
            // Headings start a line at column 0: "CONTROL (...):", "EXAMPLE:".
            let count =
                help.lines().filter(|l| l.strip_prefix(section).is_some_and(|r| r.starts_with([' ', ':']))).count();
            assert_eq!(count, 1, "the {section} section appears {count} times in --help:\n{help}");
        }
        for command in ["status", "scale", "roll", "stop", "reexec"] {
            assert!(help.contains(&format!("  reuse-launch {command} ")), "no {command} in CONTROL:\n{help}");
        }
    }
}
