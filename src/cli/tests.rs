//! Unit tests of [`Config::from_args`](super::Config::from_args): each flag's validation, its
//! error naming the flag, and the rules that tie flags together.

use super::*;
use clap::Parser;

fn args(extra: &[&str]) -> Args {
    let mut v = vec!["reuse-launch"];
    v.extend_from_slice(extra);
    v.extend_from_slice(&["--", "server"]);
    Args::try_parse_from(v).unwrap()
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
