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
pub use args::Args;
pub use scaling::Bounds;

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
    /// default bind address.
    pub fn from_args(args: Args, port_env: Option<String>) -> Result<Config, Error> {
        let (workers, autoscale) = scaling::parse_worker_bounds(&args.workers)?;
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
        let scale_down_after = scaling::scale_down_after(args.scale_down_after.as_deref(), autoscale)?;
        let hung_timeout = scaling::hung_timeout(args.hung_timeout.as_deref(), mode)?;
        if args.group.is_some() && args.user.is_none() {
            return Err(usage("--group", args.group.as_deref().unwrap_or(""), "needs --user as well"));
        }
        Ok(Config {
            proxy_threads,
            watchdog,
            user: args.user,
            group: args.group,
            socket_on_stdin: args.socket_on_stdin,
            intercept_bind,
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
            containment: crate::cgroup::Want::parse(&args.containment)
                .map_err(|e| usage("--containment", &args.containment, e))?,
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

fn parse_workers(s: &str) -> Result<usize, Error> {
    if s == "auto" {
        return Ok(std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    }
    match s.parse::<usize>() {
        Ok(0) => Err(usage("--workers", s, "must be at least 1")),
        Ok(n) if n > 4096 => Err(usage("--workers", s, "at most 4096 workers")),
        Ok(n) => Ok(n),
        Err(_) => Err(usage("--workers", s, "expected a number or 'auto' (or MIN..MAX)")),
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
    use clap::Parser;

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
        assert_eq!(e.to_string(), "invalid --workers 'abc': expected a number or 'auto' (or MIN..MAX)");
        assert!(Config::from_args(args(&["-n", "0"]), None).is_err());
        assert_eq!(Config::from_args(args(&["-n", "3"]), None).unwrap().workers, 3);
        assert!(Config::from_args(args(&["-n", "auto"]), None).unwrap().workers >= 1);
    }

    #[test]
    fn worker_bounds_and_their_errors() {
        let c = Config::from_args(args(&["-n", "1..3"]), None).unwrap();
        assert_eq!((c.workers, c.autoscale), (1, Some(Bounds { min: 1, max: 3 })));
        assert_eq!(c.scale_down_after, scaling::SCALE_DOWN_AFTER);
        let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        let c = Config::from_args(args(&["-n", "1..auto"]), None).unwrap();
        assert_eq!(c.autoscale, Some(Bounds { min: 1, max: cpus }));
        assert_eq!(Config::from_args(args(&["-n", "2"]), None).unwrap().autoscale, None);
        for (bad, why) in [
            ("0..3", "MIN of MIN..MAX must be a number, at least 1"),
            ("x..3", "MIN of MIN..MAX must be a number, at least 1"),
            ("2..y", "MAX of MIN..MAX must be a number or 'auto'"),
            ("4..2", "MIN 4 is more than MAX 2"),
            ("1..5000", "at most 4096 workers"),
        ] {
            let e = Config::from_args(args(&["-n", bad]), None).unwrap_err();
            assert_eq!(e.to_string(), format!("invalid --workers '{bad}': {why}"));
        }
        let e = Config::from_args(args(&["-n", "9999..auto"]), None).unwrap_err();
        assert!(e.to_string().contains("('auto': one per CPU)"), "{e}");
        let c = Config::from_args(args(&["-n", "1..2", "--scale-down-after", "5s"]), None).unwrap();
        assert_eq!(c.scale_down_after, Duration::from_secs(5));
        let e = Config::from_args(args(&["-n", "2", "--scale-down-after", "5s"]), None).unwrap_err();
        assert_eq!(e.to_string(), "invalid --scale-down-after '5s': needs -n MIN..MAX (automatic scaling)");
        let e = Config::from_args(args(&["-n", "1..2", "--scale-down-after", "0s"]), None).unwrap_err();
        assert_eq!(flag_of(e), "--scale-down-after");
    }

    #[test]
    fn hung_timeout_needs_a_socket_per_slot() {
        assert_eq!(Config::from_args(args(&[]), None).unwrap().hung_timeout, None);
        let c = Config::from_args(args(&["--hung-timeout", "30s"]), None).unwrap();
        assert_eq!(c.hung_timeout, Some(Duration::from_secs(30)));
        let c = Config::from_args(args(&["--hung-timeout", "2s", "--mode", "round-robin"]), None).unwrap();
        assert_eq!(c.hung_timeout, Some(Duration::from_secs(2)));
        let e = Config::from_args(args(&["--hung-timeout", "2s", "--mode", "shared"]), None).unwrap_err();
        assert!(e.to_string().starts_with("invalid --hung-timeout '2s': needs --mode reuseport"), "{e}");
        assert_eq!(flag_of(Config::from_args(args(&["--hung-timeout", "0"]), None).unwrap_err()), "--hung-timeout");
        assert_eq!(flag_of(Config::from_args(args(&["--hung-timeout", "x"]), None).unwrap_err()), "--hung-timeout");
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
