//! Command line: the raw clap flags ([`Args`]) and their validation into the immutable
//! [`Config`] the rest of the launcher runs on.
//!
//! Every flag can also come from an environment variable (`REUSE_LAUNCH_WORKERS`, ...), the
//! container convention; the flag wins when both are given. Validation errors name the flag,
//! the value and what was expected, and map to exit code 2 in `main`.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::error::Error;
pub use crate::logs::Prefix as LogPrefix;
use crate::socket::{BindSpec, Mode};

mod args;
mod scaling;
mod values;
pub use args::Args;
pub use scaling::Bounds;
use values::{default_backlog, parse_workers};
pub use values::{parse_duration, parse_signal, parse_size};

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
    /// Slots at start: `-n N`, or MIN of `-n MIN..MAX`.
    pub workers: usize,
    /// `-n MIN..MAX`: the bounds the automatic scaling keeps to (see `autoscale`).
    pub autoscale: Option<Bounds>,
    /// `--scale-down-after`: the calm a scale-down needs (with `-n MIN..MAX`).
    pub scale_down_after: Duration,
    /// `--hung-timeout`: replace a worker stalled for this long (None: never).
    pub hung_timeout: Option<Duration>,
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
    /// `--intercept-bind`: workers' own binds of a --bind port get their slot's socket.
    pub intercept_bind: crate::intercept::Setting,
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
    /// `--containment`: a cgroup per worker where one can be made, or the sentinel alone.
    pub containment: crate::cgroup::Want,
    pub command: Vec<OsString>,
}

fn usage(flag: &'static str, value: &str, expected: impl Into<String>) -> Error {
    Error::usage(flag, value, expected)
}

impl Config {
    /// Validate raw flags. `port_env` is the launcher's own `PORT` variable, used for the
    /// default bind address. The steps run in flag order; the first invalid flag is the error.
    pub fn from_args(args: Args, port_env: Option<String>) -> Result<Config, Error> {
        let (workers, autoscale) = scaling::parse_worker_bounds(&args.workers)?;
        let binds = parse_binds(&args.bind, port_env)?;
        let (mode, intercept_bind, steer) = parse_socket_flags(&args)?;
        let log_prefix = LogPrefix::parse(&args.log_prefix).map_err(|e| usage("--log-prefix", &args.log_prefix, e))?;
        let proxy_threads = parse_proxy_threads(&args.proxy_threads)?;
        let backlog = parse_backlog(args.backlog.as_deref())?;
        let grace = parse_duration(&args.grace).map_err(|e| usage("--grace", &args.grace, e))?;
        let stop_signal = parse_signal(&args.stop_signal).map_err(|e| usage("--stop-signal", &args.stop_signal, e))?;
        let (ready, ready_timeout) = parse_readiness(&args)?;
        let max_start_failures = match args.max_start_failures.parse::<u32>() {
            Ok(n) if n > 0 => n,
            _ => return Err(usage("--max-start-failures", &args.max_start_failures, "expected a positive number")),
        };
        let watchdog = parse_watchdog(args.watchdog.as_deref())?;
        let (metrics, min_ready) = parse_metrics(args.metrics.as_deref(), args.min_ready.as_deref())?;
        let drain_delay =
            parse_duration(&args.drain_delay).map_err(|e| usage("--drain-delay", &args.drain_delay, e))?;
        let scale_down_after = scaling::scale_down_after(args.scale_down_after.as_deref(), autoscale)?;
        let hung_timeout = scaling::hung_timeout(args.hung_timeout.as_deref(), mode)?;
        if args.group.is_some() && args.user.is_none() {
            return Err(usage("--group", args.group.as_deref().unwrap_or(""), "needs --user as well"));
        }
        let max_memory = match &args.max_memory {
            Some(m) => Some(parse_size(m).map_err(|e| usage("--max-memory", m, e))?),
            None => None,
        };
        let containment =
            crate::cgroup::Want::parse(&args.containment).map_err(|e| usage("--containment", &args.containment, e))?;
        Ok(Config {
            proxy_threads,
            watchdog,
            user: args.user,
            group: args.group,
            socket_on_stdin: args.socket_on_stdin,
            intercept_bind,
            steer,
            max_memory,
            pin: args.pin || steer == Steer::Cpu,
            control: args.control.filter(|p| !p.as_os_str().is_empty()),
            log_prefix,
            metrics,
            min_ready,
            drain_delay,
            containment,
            workers,
            autoscale,
            scale_down_after,
            hung_timeout,
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

/// `--bind`, in order (each one's index names it when it has no NAME=); default
/// `0.0.0.0:$PORT`, else `0.0.0.0:8080`.
fn parse_binds(texts: &[String], port_env: Option<String>) -> Result<Vec<BindSpec>, Error> {
    let texts = if texts.is_empty() {
        let port = port_env.unwrap_or_else(|| "8080".to_string());
        vec![format!("0.0.0.0:{port}")]
    } else {
        texts.to_vec()
    };
    texts.iter().enumerate().map(|(i, text)| BindSpec::parse(text, i).map_err(|e| usage("--bind", text, e))).collect()
}

/// `--mode`, `--intercept-bind` and `--steer`, with the rules that tie them to the mode (and
/// `--socket-on-stdin`'s).
fn parse_socket_flags(args: &Args) -> Result<(Mode, crate::intercept::Setting, Steer), Error> {
    let mode = Mode::parse(&args.mode).map_err(|e| usage("--mode", &args.mode, e))?;
    if args.socket_on_stdin && mode == Mode::SelfBind {
        return Err(usage(
            "--mode",
            &args.mode,
            "--socket-on-stdin gives workers a listening socket, and in self mode there is none \
             (workers bind PORT themselves): drop one of the two",
        ));
    }
    let intercept_bind =
        args.intercept_bind.parse().map_err(|e: String| usage("--intercept-bind", &args.intercept_bind, e))?;
    if intercept_bind == crate::intercept::Setting::On && mode == Mode::SelfBind {
        return Err(usage(
            "--intercept-bind",
            &args.intercept_bind,
            "in self mode the launcher holds no socket to give a worker's bind(): drop one of the two",
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
    Ok((mode, intercept_bind, steer))
}

/// `--proxy-threads`: 1 to 256, or `auto` (half the CPUs, at least 1).
fn parse_proxy_threads(text: &str) -> Result<usize, Error> {
    match text {
        "auto" => Ok(std::thread::available_parallelism().map(|n| n.get().div_ceil(2)).unwrap_or(1)),
        t => match t.parse::<usize>() {
            Ok(n) if (1..=256).contains(&n) => Ok(n),
            _ => Err(usage("--proxy-threads", t, "expected a number from 1 to 256 or 'auto'")),
        },
    }
}

/// `--backlog`: positive; default `net.core.somaxconn`.
fn parse_backlog(text: Option<&str>) -> Result<i32, Error> {
    match text {
        Some(b) => match b.parse::<i32>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(usage("--backlog", b, "expected a positive number")),
        },
        None => Ok(default_backlog()),
    }
}

/// `--ready` (with `--ready-delay` for `delay` and `auto`) and `--ready-timeout` (more than 0).
fn parse_readiness(args: &Args) -> Result<(Ready, Duration), Error> {
    let delay = || parse_duration(&args.ready_delay).map_err(|e| usage("--ready-delay", &args.ready_delay, e));
    let ready = match args.ready.as_str() {
        "delay" => Ready::Delay(delay()?),
        "notify" => Ready::Notify,
        "auto" => Ready::Auto(delay()?),
        other => return Err(usage("--ready", other, "expected 'delay', 'notify' or 'auto'")),
    };
    let ready_timeout =
        parse_duration(&args.ready_timeout).map_err(|e| usage("--ready-timeout", &args.ready_timeout, e))?;
    if ready_timeout.is_zero() {
        return Err(usage("--ready-timeout", &args.ready_timeout, "must be more than 0"));
    }
    Ok((ready, ready_timeout))
}

/// `--watchdog`: more than 0 when given.
fn parse_watchdog(text: Option<&str>) -> Result<Option<Duration>, Error> {
    match text {
        Some(w) => match parse_duration(w) {
            Ok(d) if !d.is_zero() => Ok(Some(d)),
            Ok(_) => Err(usage("--watchdog", w, "must be more than 0")),
            Err(e) => Err(usage("--watchdog", w, e)),
        },
        None => Ok(None),
    }
}

/// `--metrics` (an address, no NAME=) and `--min-ready` (positive, only with `--metrics`).
fn parse_metrics(
    metrics: Option<&str>,
    min_ready: Option<&str>,
) -> Result<(Option<std::net::SocketAddr>, Option<usize>), Error> {
    let addr = match metrics {
        Some(m) if m.contains('=') => {
            return Err(usage("--metrics", m, "expected HOST:PORT, [V6]:PORT or :PORT (no name)"))
        }
        Some(m) => Some(BindSpec::parse(m, 0).map_err(|e| usage("--metrics", m, e))?.addr),
        None => None,
    };
    let min = match min_ready {
        Some(n) => match n.parse::<usize>() {
            Ok(n) if n > 0 => Some(n),
            _ => return Err(usage("--min-ready", n, "expected a positive number")),
        },
        None => None,
    };
    if min.is_some() && addr.is_none() {
        return Err(usage("--min-ready", min_ready.unwrap_or(""), "needs --metrics (it is /readyz's rule)"));
    }
    Ok((addr, min))
}

#[cfg(test)]
mod tests;
