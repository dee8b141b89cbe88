//! Command line: the raw clap flags ([`Args`]) and their validation into the immutable
//! [`Config`] the rest of the launcher runs on.
//!
//! Every flag can also come from an environment variable (`REUSE_LAUNCH_WORKERS`, ...), the
//! container convention; the flag wins when both are given. Validation errors name the flag,
//! the value and what was expected, and map to exit code 2 in `main`.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use nix::sys::signal::Signal;

use crate::error::Error;
pub use crate::logs::Prefix as LogPrefix;
use crate::socket::{BindSpec, Mode};

const AFTER_HELP: &str = "\
SIGNALS (send to the launcher's pid):
  USR2, HUP     rolling restart: one slot at a time, new worker ready before the old one stops
  TERM, INT     graceful stop: stop signal to every worker, SIGKILL after --grace, exit 0
                (with --drain-delay: /readyz says 503 at once, workers keep serving that long)
  second TERM/INT, QUIT
                immediate stop: SIGKILL every worker's process group, exit (a second TERM/INT
                during --drain-delay ends the delay: the graceful stop starts at once)

WORKER ENVIRONMENT (fds 3.. are the listening sockets, in --bind order):
  LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES   systemd socket-activation variables (sd_listen_fds)
  PORT                    port of the first --bind
  REUSE_LAUNCH_SLOT       0..N-1, stable across restarts of the slot
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
  REUSE_LAUNCH_MIN_READY, REUSE_LAUNCH_DRAIN_DELAY;
  PORT sets the default bind; RUST_LOG the log level. Started with LISTEN_FDS/LISTEN_PID
  (systemd socket activation) it adopts those sockets instead of binding; with NOTIFY_SOCKET it
  reports READY=1, RELOADING=1, STATUS=, STOPPING=1 to its own supervisor.

CONTROL (talk to a running launcher through its control socket, --control):
  reuse-launch status [--json]   workers, state, uptime, restarts, CPU, memory, queues
  reuse-launch scale N|+K|-K     change the number of workers (also TTIN/TTOU: +1/-1)
  reuse-launch roll              rolling restart (as USR2)
  reuse-launch stop [--no-wait]  graceful stop (as TERM), waiting until it has exited
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
    /// Number of workers, or `auto` for the number of CPUs.
    #[arg(short = 'n', long, env = "REUSE_LAUNCH_WORKERS", default_value = "auto", value_name = "N|auto")]
    pub workers: String,

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

    /// Give up (exit 1) when every slot's worker died this many times in a row before it
    /// became ready.
    #[arg(long, env = "REUSE_LAUNCH_MAX_START_FAILURES", default_value = "5", value_name = "N")]
    pub max_start_failures: String,

    /// The server command and its arguments.
    #[arg(required = true, last = true, value_name = "COMMAND")]
    pub command: Vec<OsString>,
}

/// How the launcher decides that a worker is ready to take traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ready {
    /// Alive for this long.
    Delay(Duration),
    /// Sent `READY=1` on its NOTIFY_SOCKET.
    Notify,
    /// Seen waiting for connections on its socket in /proc; this delay where /proc cannot tell.
    Auto(Duration),
}

/// `--steer`: how reuseport mode picks a serving slot for a new connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Steer {
    Hash,
    LeastLoaded,
    Ip,
    Cpu,
}

impl Steer {
    fn parse(s: &str) -> Result<Steer, String> {
        match s {
            "hash" => Ok(Steer::Hash),
            "least-loaded" => Ok(Steer::LeastLoaded),
            "ip" => Ok(Steer::Ip),
            "cpu" => Ok(Steer::Cpu),
            _ => Err("expected 'hash', 'least-loaded', 'ip' or 'cpu'".into()),
        }
    }
}

/// The validated, immutable configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub workers: usize,
    pub binds: Vec<BindSpec>,
    pub mode: Mode,
    pub proxy_threads: usize,
    pub backlog: i32,
    pub grace: Duration,
    pub stop_signal: Signal,
    pub ready: Ready,
    pub ready_timeout: Duration,
    pub max_start_failures: u32,
    pub watchdog: Option<Duration>,
    pub user: Option<String>,
    pub group: Option<String>,
    /// `--socket-on-stdin`: the slot's first listening socket is also the worker's fd 0.
    pub socket_on_stdin: bool,
    pub steer: Steer,
    /// `--max-memory` in bytes.
    pub max_memory: Option<u64>,
    /// Pin each worker to one CPU (`--pin`, or implied by `--steer cpu`).
    pub pin: bool,
    /// `--control`: where the control socket goes (None: the default directory).
    pub control: Option<PathBuf>,
    /// `--log-prefix`: workers' output through the launcher, prefixed, or inherited.
    pub log_prefix: LogPrefix,
    /// `--metrics`: where to serve /metrics, /healthz and /readyz.
    pub metrics: Option<std::net::SocketAddr>,
    /// `--min-ready`: ready workers /readyz needs (None: every desired one).
    pub min_ready: Option<usize>,
    /// `--drain-delay`: serving on after TERM/INT before the workers are stopped.
    pub drain_delay: Duration,
    pub command: Vec<OsString>,
}

fn usage(flag: &'static str, value: &str, expected: impl Into<String>) -> Error {
    Error::usage(flag, value, expected)
}

impl Config {
    /// Validate raw flags. `port_env` is the launcher's own `PORT` variable, used for the
    /// default bind address.
    pub fn from_args(args: Args, port_env: Option<String>) -> Result<Config, Error> {
        let workers = parse_workers(&args.workers)?;
        let mut binds = Vec::new();
        let bind_texts = if args.bind.is_empty() {
            let port = port_env.unwrap_or_else(|| "8080".to_string());
            vec![format!("0.0.0.0:{port}")]
        } else {
            args.bind.clone()
        };
        for (i, text) in bind_texts.iter().enumerate() {
            let spec = BindSpec::parse(text, i).map_err(|e| usage("--bind", text, e))?;
            binds.push(spec);
        }
        let mode = Mode::parse(&args.mode).map_err(|e| usage("--mode", &args.mode, e))?;
        if args.socket_on_stdin && mode == Mode::SelfBind {
            return Err(usage(
                "--mode",
                &args.mode,
                "--socket-on-stdin gives workers a listening socket, and in self mode there is none \
                 (workers bind PORT themselves): drop one of the two",
            ));
        }
        let steer = Steer::parse(&args.steer).map_err(|e| usage("--steer", &args.steer, e))?;
        if steer != Steer::Hash && mode != Mode::Reuseport {
            return Err(usage(
                "--steer",
                &args.steer,
                format!("steering programs need --mode reuseport (not {mode}): drop --steer or change the mode"),
            ));
        }
        let log_prefix = LogPrefix::parse(&args.log_prefix).map_err(|e| usage("--log-prefix", &args.log_prefix, e))?;
        let proxy_threads = match args.proxy_threads.as_str() {
            "auto" => std::thread::available_parallelism().map(|n| n.get().div_ceil(2)).unwrap_or(1),
            t => match t.parse::<usize>() {
                Ok(n) if (1..=256).contains(&n) => n,
                _ => return Err(usage("--proxy-threads", t, "expected a number from 1 to 256 or 'auto'")),
            },
        };
        let backlog = match &args.backlog {
            Some(b) => match b.parse::<i32>() {
                Ok(n) if n > 0 => n,
                _ => return Err(usage("--backlog", b, "expected a positive number")),
            },
            None => default_backlog(),
        };
        let grace = parse_duration(&args.grace).map_err(|e| usage("--grace", &args.grace, e))?;
        let stop_signal = parse_signal(&args.stop_signal).map_err(|e| usage("--stop-signal", &args.stop_signal, e))?;
        let ready = match args.ready.as_str() {
            "delay" => Ready::Delay(
                parse_duration(&args.ready_delay).map_err(|e| usage("--ready-delay", &args.ready_delay, e))?,
            ),
            "notify" => Ready::Notify,
            "auto" => Ready::Auto(
                parse_duration(&args.ready_delay).map_err(|e| usage("--ready-delay", &args.ready_delay, e))?,
            ),
            other => return Err(usage("--ready", other, "expected 'delay', 'notify' or 'auto'")),
        };
        let ready_timeout =
            parse_duration(&args.ready_timeout).map_err(|e| usage("--ready-timeout", &args.ready_timeout, e))?;
        if ready_timeout.is_zero() {
            return Err(usage("--ready-timeout", &args.ready_timeout, "must be more than 0"));
        }
        let max_start_failures = match args.max_start_failures.parse::<u32>() {
            Ok(n) if n > 0 => n,
            _ => {
                return Err(usage("--max-start-failures", &args.max_start_failures, "expected a positive number"));
            }
        };
        let watchdog = match &args.watchdog {
            Some(w) => match parse_duration(w) {
                Ok(d) if !d.is_zero() => Some(d),
                Ok(_) => return Err(usage("--watchdog", w, "must be more than 0")),
                Err(e) => return Err(usage("--watchdog", w, e)),
            },
            None => None,
        };
        let metrics = match &args.metrics {
            Some(m) if m.contains('=') => {
                return Err(usage("--metrics", m, "expected HOST:PORT, [V6]:PORT or :PORT (no name)"))
            }
            Some(m) => Some(BindSpec::parse(m, 0).map_err(|e| usage("--metrics", m, e))?.addr),
            None => None,
        };
        let min_ready = match &args.min_ready {
            Some(n) => match n.parse::<usize>() {
                Ok(n) if n > 0 => Some(n),
                _ => return Err(usage("--min-ready", n, "expected a positive number")),
            },
            None => None,
        };
        if min_ready.is_some() && metrics.is_none() {
            return Err(usage(
                "--min-ready",
                args.min_ready.as_deref().unwrap_or(""),
                "needs --metrics (it is /readyz's rule)",
            ));
        }
        let drain_delay =
            parse_duration(&args.drain_delay).map_err(|e| usage("--drain-delay", &args.drain_delay, e))?;
        if args.group.is_some() && args.user.is_none() {
            return Err(usage("--group", args.group.as_deref().unwrap_or(""), "needs --user as well"));
        }
        Ok(Config {
            proxy_threads,
            watchdog,
            user: args.user,
            group: args.group,
            socket_on_stdin: args.socket_on_stdin,
            steer,
            max_memory: match &args.max_memory {
                Some(m) => Some(parse_size(m).map_err(|e| usage("--max-memory", m, e))?),
                None => None,
            },
            pin: args.pin || steer == Steer::Cpu,
            control: args.control.filter(|p| !p.as_os_str().is_empty()),
            log_prefix,
            metrics,
            min_ready,
            drain_delay,
            workers,
            binds,
            mode,
            backlog,
            grace,
            stop_signal,
            ready,
            ready_timeout,
            max_start_failures,
            command: args.command,
        })
    }
}

fn parse_workers(s: &str) -> Result<usize, Error> {
    if s == "auto" {
        return Ok(std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    }
    match s.parse::<usize>() {
        Ok(0) => Err(usage("--workers", s, "must be at least 1")),
        Ok(n) if n > 4096 => Err(usage("--workers", s, "at most 4096 workers")),
        Ok(n) => Ok(n),
        Err(_) => Err(usage("--workers", s, "expected a number or 'auto'")),
    }
}

/// `net.core.somaxconn`, the ceiling the kernel applies to any backlog anyway.
fn default_backlog() -> i32 {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(4096)
}

/// Parse `512M`, `2G`, `1.5G`, `300K`, `1T` (powers of 1024; `MB`, `MiB` and lowercase too);
/// a bare number is bytes. At least 1 MiB, so that a typo cannot recycle every worker at once.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let err = || "expected a size like 512M or 2G (K, M, G, T), at least 1M".to_string();
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().map_err(|_| err())?;
    let unit = unit.trim().to_ascii_uppercase();
    // One optional `B` or `iB` after the letter (`B` alone: bytes), not several.
    let letter = unit.strip_suffix("IB").filter(|l| !l.is_empty()).or_else(|| unit.strip_suffix('B')).unwrap_or(&unit);
    let shift = match letter {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(err()),
    };
    let bytes = value * (1u64 << shift) as f64;
    if !bytes.is_finite() || bytes < (1u64 << 20) as f64 || bytes > u64::MAX as f64 {
        return Err(err());
    }
    Ok(bytes as u64)
}

/// Parse `500ms`, `2s`, `1.5s`, `1m`, `1h`; a bare number is seconds. Exact to the nanosecond
/// (decimal arithmetic, not floating point: `9737498469ms` is that many milliseconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let err = || "expected a duration like 500ms, 2s or 1m".to_string();
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let nanos_per_unit: u128 = match unit {
        "ms" => 1_000_000,
        "" | "s" => 1_000_000_000,
        "m" => 60_000_000_000,
        "h" => 3_600_000_000_000,
        _ => return Err(err()),
    };
    let (whole, fraction) = num.split_once('.').unwrap_or((num, ""));
    if (whole.is_empty() && fraction.is_empty()) || fraction.contains('.') {
        return Err(err());
    }
    // Leading zeros aside, more than 20 digits is far beyond the limit below anyway.
    let whole = whole.trim_start_matches('0');
    if whole.len() > 20 {
        return Err(err());
    }
    let whole: u128 = if whole.is_empty() { 0 } else { whole.parse().map_err(|_| err())? };
    // Digits past the 18th are below a nanosecond for every unit: dropped.
    let fraction = &fraction[..fraction.len().min(18)];
    let fraction_nanos = if fraction.is_empty() {
        0
    } else {
        fraction.parse::<u128>().map_err(|_| err())? * nanos_per_unit / 10u128.pow(fraction.len() as u32)
    };
    let nanos = whole * nanos_per_unit + fraction_nanos;
    if nanos > 86400 * 365 * 1_000_000_000 {
        return Err(err());
    }
    Ok(Duration::from_nanos(nanos as u64))
}

/// Parse `TERM`, `SIGTERM`, `term` or `15`.
pub fn parse_signal(s: &str) -> Result<Signal, String> {
    let err = || "expected a signal name like TERM or INT, or its number".to_string();
    if let Ok(n) = s.parse::<i32>() {
        return Signal::try_from(n).map_err(|_| err());
    }
    let upper = s.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") { upper } else { format!("SIG{upper}") };
    name.parse::<Signal>().map_err(|_| err())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Args {
        let mut v = vec!["reuse-launch"];
        v.extend_from_slice(extra);
        v.extend_from_slice(&["--", "server"]);
        Args::try_parse_from(v).unwrap()
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("1m").unwrap(), Duration::from_secs(60));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("abc").is_err());
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
        assert_eq!(parse_size("1.5g").unwrap(), 3 << 29);
        assert_eq!(parse_size("300MiB").unwrap(), 300 << 20);
        assert_eq!(parse_size("1048576").unwrap(), 1 << 20);
        for bad in ["", "M", "12X", "-1G", "100K", "1e3G", "nanG"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn signals() {
        assert_eq!(parse_signal("TERM").unwrap(), Signal::SIGTERM);
        assert_eq!(parse_signal("sigint").unwrap(), Signal::SIGINT);
        assert_eq!(parse_signal("9").unwrap(), Signal::SIGKILL);
        assert!(parse_signal("NOPE").is_err());
    }

    #[test]
    fn workers_error_names_flag_value_and_expectation() {
        let e = Config::from_args(args(&["-n", "abc"]), None).unwrap_err();
        assert_eq!(e.to_string(), "invalid --workers 'abc': expected a number or 'auto'");
        assert!(Config::from_args(args(&["-n", "0"]), None).is_err());
        assert_eq!(Config::from_args(args(&["-n", "3"]), None).unwrap().workers, 3);
        assert!(Config::from_args(args(&["-n", "auto"]), None).unwrap().workers >= 1);
    }

    #[test]
    fn default_bind_follows_port_env() {
        let c = Config::from_args(args(&[]), Some("9123".into())).unwrap();
        assert_eq!(c.binds[0].addr.to_string(), "0.0.0.0:9123");
        let c = Config::from_args(args(&[]), None).unwrap();
        assert_eq!(c.binds[0].addr.to_string(), "0.0.0.0:8080");
    }

    fn flag_of(e: Error) -> &'static str {
        match e {
            Error::Usage { flag, .. } => flag,
            other => panic!("not a usage error: {other}"),
        }
    }

    #[test]
    fn bad_values_are_named() {
        let e = Config::from_args(args(&["--grace", "soon"]), None).unwrap_err();
        assert_eq!(flag_of(e), "--grace");
        let e = Config::from_args(args(&["--ready", "maybe"]), None).unwrap_err();
        assert_eq!(flag_of(e), "--ready");
        let e = Config::from_args(args(&["-b", "nohost"]), None).unwrap_err();
        assert_eq!(flag_of(e), "--bind");
        let e = Config::from_args(args(&["--mode", "magic"]), None).unwrap_err();
        assert_eq!(flag_of(e), "--mode");
    }

    #[test]
    fn socket_on_stdin_needs_a_socket_to_give() {
        assert!(!Config::from_args(args(&[]), None).unwrap().socket_on_stdin);
        assert!(Config::from_args(args(&["--socket-on-stdin"]), None).unwrap().socket_on_stdin);
        for mode in ["reuseport", "shared", "round-robin"] {
            assert!(Config::from_args(args(&["--socket-on-stdin", "--mode", mode]), None).unwrap().socket_on_stdin);
        }
        let e = Config::from_args(args(&["--socket-on-stdin", "--mode", "self"]), None).unwrap_err();
        assert!(e.to_string().contains("--socket-on-stdin"), "{e}");
        assert_eq!(flag_of(e), "--mode");
    }

    #[test]
    fn steer_needs_reuseport_and_cpu_pins() {
        assert_eq!(Config::from_args(args(&[]), None).unwrap().steer, Steer::Hash);
        let c = Config::from_args(args(&["--steer", "cpu"]), None).unwrap();
        assert!(c.steer == Steer::Cpu && c.pin);
        assert_eq!(Config::from_args(args(&["--steer", "ip"]), None).unwrap().steer, Steer::Ip);
        let e = Config::from_args(args(&["--steer", "least-loaded", "--mode", "shared"]), None).unwrap_err();
        assert!(e.to_string().contains("need --mode reuseport (not shared)"), "{e}");
        let e = Config::from_args(args(&["--steer", "magic"]), None).unwrap_err();
        assert_eq!(flag_of(e), "--steer");
    }

    #[test]
    fn control_path() {
        assert_eq!(Config::from_args(args(&[]), None).unwrap().control, None);
        let c = Config::from_args(args(&["--control", "/tmp/x.sock"]), None).unwrap();
        assert_eq!(c.control, Some(PathBuf::from("/tmp/x.sock")));
    }

    #[test]
    fn log_prefix_defaults_to_slot_pid() {
        assert_eq!(Config::from_args(args(&[]), None).unwrap().log_prefix, LogPrefix::SlotPid);
        assert_eq!(Config::from_args(args(&["--log-prefix", "none"]), None).unwrap().log_prefix, LogPrefix::None);
        let e = Config::from_args(args(&["--log-prefix", "yes"]), None).unwrap_err();
        assert_eq!(flag_of(e), "--log-prefix");
    }

    #[test]
    fn metrics_min_ready_and_drain_delay() {
        let c = Config::from_args(args(&[]), None).unwrap();
        assert_eq!((c.metrics, c.min_ready, c.drain_delay), (None, None, Duration::ZERO));
        let c = Config::from_args(args(&["--metrics", "127.0.0.1:9100", "--min-ready", "2"]), None).unwrap();
        assert_eq!(c.metrics, Some("127.0.0.1:9100".parse().unwrap()));
        assert_eq!(c.min_ready, Some(2));
        let c = Config::from_args(args(&["--metrics", ":9100", "--drain-delay", "5s"]), None).unwrap();
        assert_eq!(c.metrics, Some("0.0.0.0:9100".parse().unwrap()));
        assert_eq!(c.drain_delay, Duration::from_secs(5));
        assert_eq!(flag_of(Config::from_args(args(&["--metrics", "9100"]), None).unwrap_err()), "--metrics");
        assert_eq!(flag_of(Config::from_args(args(&["--metrics", "m=:9100"]), None).unwrap_err()), "--metrics");
        let e = Config::from_args(args(&["--metrics", ":9100", "--min-ready", "0"]), None).unwrap_err();
        assert_eq!(flag_of(e), "--min-ready");
        assert_eq!(flag_of(Config::from_args(args(&["--min-ready", "1"]), None).unwrap_err()), "--min-ready");
        assert_eq!(flag_of(Config::from_args(args(&["--drain-delay", "soon"]), None).unwrap_err()), "--drain-delay");
    }

    #[test]
    fn notify_mode() {
        let c = Config::from_args(args(&["--ready", "notify"]), None).unwrap();
        assert_eq!(c.ready, Ready::Notify);
    }
}
