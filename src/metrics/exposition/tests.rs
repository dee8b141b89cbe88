//! The exposition rendered from a made-up view, escaping, netstat, and a real listener.

use super::measure::*;
use super::out::*;
use super::*;
use crate::metrics::limits::Counts;
use crate::metrics::View;
use crate::snapshot::{SlotSnapshot, Snapshot, WorkerSnapshot};
use crate::sys;
use std::time::Duration;

fn view() -> View {
    let worker = |pid, state| WorkerSnapshot { pid, generation: 2, state, uptime: Duration::from_secs(3) };
    let slot = |i, workers, restarts, backoff| SlotSnapshot {
        slot: i,
        generation: 2,
        workers,
        restarts,
        last_exit: None,
        backoff,
        retiring: false,
        listeners: vec![],
    };
    View {
        snapshot: Snapshot {
            pid: 1,
            mode: "reuseport".into(),
            binds: vec!["127.0.0.1:8080".parse().unwrap()],
            generation: 2,
            desired: 3,
            ready: 1,
            roll: Some((3, 0, 3)),
            stopping: false,
            slots: vec![
                slot(0, vec![worker(10, "ready"), worker(11, "starting")], vec![("crash", 2)], None),
                slot(1, vec![worker(12, "stalled")], vec![], None),
                slot(2, vec![], vec![("crash", 5), ("odd", 1)], Some(Duration::from_secs(2))),
            ],
            autoscale: Some(crate::snapshot::AutoscaleSnapshot {
                min: 1,
                max: 3,
                calm: Duration::from_secs(30),
                decisions: vec![crate::snapshot::ScaleRecord {
                    ago: Duration::from_secs(4),
                    from: 2,
                    to: 3,
                    by: "auto".into(),
                    reason: "at least one connection waiting per slot for 2s".into(),
                    unix_ms: 1_700_000_000_500,
                }],
                ups: 2,
                downs: 0,
                samples: 20,
                pressed_pct: 95,
                waiting_centi: 450,
                queued_pct: 95,
                cpu_milli: 50,
            }),
            intercept: crate::snapshot::InterceptSnapshot { state: "on".into(), binds: 4, listens: 3 },
        },
        serving: 1,
    }
}

#[test]
fn renders_every_family_with_its_type_and_values() {
    let m = Measured {
        slots: vec![(4096, 1.5), (8192, 0.25), (0, 0.0)],
        queues: vec![Queue { slot: "0".into(), bind: "127.0.0.1:8080".into(), len: 3, max: 4096 }],
        listen_overflows: Some(7),
        server: Counts { open: 3, max: 1024, closed: [5, 0, 0, 1, 0] },
    };
    let text = render(&view(), &m);
    for line in expected_lines() {
        assert!(text.lines().any(|l| l == line), "no line {line:?} in:\n{text}");
    }
    every_family_declared_before_its_samples(&text);
}

/// The lines `renders_every_family_with_its_type_and_values` must find, from [`view`] and its
/// measurements.
fn expected_lines() -> Vec<String> {
    let mut lines: Vec<String> = [
        "# TYPE reuse_launch_workers gauge",
        "reuse_launch_workers{state=\"ready\"} 1",
        "reuse_launch_workers{state=\"starting\"} 1",
        "reuse_launch_workers{state=\"stalled\"} 1",
        "reuse_launch_workers{state=\"draining\"} 0",
        "reuse_launch_workers{state=\"backoff\"} 1",
        "reuse_launch_workers_desired 3",
        "reuse_launch_workers_min 1",
        "reuse_launch_workers_max 3",
        "reuse_launch_autoscale_decisions_total{direction=\"up\"} 2",
        "reuse_launch_autoscale_decisions_total{direction=\"down\"} 0",
        "reuse_launch_autoscale_last_decision_timestamp_seconds{direction=\"up\",workers=\"3\",reason=\"at least one connection waiting per slot for 2s\"} 1700000000.5",
        "reuse_launch_generation 2",
        "reuse_launch_roll_in_progress 1",
        "reuse_launch_serving_slots 1",
        "# TYPE reuse_launch_restarts_total counter",
        "reuse_launch_restarts_total{slot=\"0\",cause=\"crash\"} 2",
        "reuse_launch_restarts_total{slot=\"1\",cause=\"watchdog\"} 0",
        "reuse_launch_restarts_total{slot=\"2\",cause=\"crash\"} 5",
        "reuse_launch_restarts_total{slot=\"2\",cause=\"odd\"} 1",
        "reuse_launch_worker_rss_bytes{slot=\"1\"} 8192",
        "reuse_launch_worker_cpu_seconds_total{slot=\"0\"} 1.5",
        "reuse_launch_accept_queue{slot=\"0\",bind=\"127.0.0.1:8080\"} 3",
        "reuse_launch_accept_queue_max{slot=\"0\",bind=\"127.0.0.1:8080\"} 4096",
        "reuse_launch_listen_overflows_total 7",
        "# TYPE reuse_launch_intercepted_binds_total counter",
        "reuse_launch_intercepted_binds_total 4",
        "reuse_launch_intercepted_listens_total 3",
        "reuse_launch_metrics_connections 3",
        "reuse_launch_metrics_connections_max 1024",
        "reuse_launch_metrics_closed_total{reason=\"timeout\"} 5",
        "reuse_launch_metrics_closed_total{reason=\"invalid\"} 1",
        "reuse_launch_metrics_closed_total{reason=\"write_timeout\"} 0",
    ]
    .map(String::from)
    .to_vec();
    lines.push(format!("reuse_launch_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION")));
    lines
}

/// Every sample line's family was declared (`# TYPE`) just before it.
fn every_family_declared_before_its_samples(text: &str) {
    let mut declared = Vec::new();
    for l in text.lines() {
        if let Some(rest) = l.strip_prefix("# TYPE ") {
            declared.push(rest.split(' ').next().unwrap().to_string());
        } else if !l.starts_with('#') {
            let name = l.split(['{', ' ']).next().unwrap();
            assert_eq!(declared.last().map(String::as_str), Some(name), "{l}");
        }
    }
}

#[test]
fn label_values_are_escaped() {
    assert_eq!(escape(r#"a"b\c"#), r#"a\"b\\c"#);
    assert_eq!(escape("x\ny"), "x\\ny");
}

#[test]
fn netstat_fields() {
    let text = "TcpExt: SyncookiesSent ListenOverflows ListenDrops\nTcpExt: 0 12 13\n\
                IpExt: InNoRoutes\nIpExt: 4\n";
    assert_eq!(netstat(text, "TcpExt", "ListenOverflows"), Some(12));
    assert_eq!(netstat(text, "IpExt", "InNoRoutes"), Some(4));
    assert_eq!(netstat(text, "TcpExt", "Nope"), None);
    assert!(netstat(&std::fs::read_to_string("/proc/net/netstat").unwrap(), "TcpExt", "ListenOverflows").is_some());
}

#[test]
fn a_real_listener_and_this_process() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&l);
    let _c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (len, max) = sys::listener_queue(fd).unwrap();
    assert_eq!(len, 1);
    assert!(max >= 1, "{max}");
    assert_eq!(sys::listener_queue(_c_fd(&_c)), None, "a connected socket is not a listener");
    assert!(group_cpu_ticks(&[std::process::id() as i32]) < u64::MAX);
}

fn _c_fd(s: &std::net::TcpStream) -> std::os::fd::RawFd {
    std::os::fd::AsRawFd::as_raw_fd(s)
}
