//! `/metrics`: what is measured at each scrape (on the endpoint's thread: /proc and one
//! `getsockopt` per listener) and the Prometheus text exposition format (version 0.0.4), by
//! hand: `# HELP`, `# TYPE`, then `name{label="value"} number` lines, label values escaped.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `reuse_launch_build_info` | gauge (1) | `version` |
//! | `reuse_launch_workers` | gauge | `state`: starting, ready, stalled, draining, backoff (a slot waiting to respawn) |
//! | `reuse_launch_workers_desired` | gauge | |
//! | `reuse_launch_workers_min`, `reuse_launch_workers_max` | gauge | (with `-n MIN..MAX`) |
//! | `reuse_launch_autoscale_decisions_total` | counter | `direction`: up, down (with `-n MIN..MAX`) |
//! | `reuse_launch_autoscale_last_decision_timestamp_seconds` | gauge | `direction`, `workers`, `reason` (once one was made) |
//! | `reuse_launch_generation` | gauge | |
//! | `reuse_launch_roll_in_progress` | gauge (0/1) | |
//! | `reuse_launch_serving_slots` | gauge | |
//! | `reuse_launch_restarts_total` | counter | `slot`, `cause`: crash, ready-timeout, watchdog, memory, hung |
//! | `reuse_launch_worker_rss_bytes` | gauge | `slot` |
//! | `reuse_launch_worker_cpu_seconds_total` | counter | `slot` |
//! | `reuse_launch_accept_queue` | gauge | `slot`, `bind` |
//! | `reuse_launch_accept_queue_max` | gauge | `slot`, `bind` |
//! | `reuse_launch_listen_overflows_total` | counter | |
//! | `reuse_launch_intercepted_binds_total` | counter | |
//! | `reuse_launch_intercepted_listens_total` | counter | |
//! | `reuse_launch_metrics_connections` | gauge | |
//! | `reuse_launch_metrics_connections_max` | gauge | |
//! | `reuse_launch_metrics_closed_total` | counter | `reason`: timeout, evicted, refused, invalid, write_timeout |
//!
//! A slot's RSS and CPU are those of every process of its workers' process groups (during a
//! roll, old and new worker together); CPU includes the children those processes reaped, and
//! starts again from 0 when the slot's worker is replaced (a counter reset, which `rate()`
//! handles). Queues are read from the listeners the launcher holds (`tcpi_unacked` and
//! `tcpi_sacked` of TCP_INFO on a listener: its accept queue and backlog); in `shared` mode the
//! one socket per bind is reported once, as `slot="shared"`; `self` mode has none.
//! `reuse_launch_listen_overflows_total` is `ListenOverflows` of /proc/net/netstat: every
//! listener of the launcher's network namespace (the host, or the pod), not only its own.
//! The last three are the `--metrics` endpoint's own connections (see [`super::limits`]).

use std::fmt::{Display, Write as _};

use super::limits::{Counts, CLOSE_REASONS};
use super::View;
use crate::readiness;
use crate::snapshot::{AutoscaleSnapshot, Snapshot};
use crate::sys;

/// Prometheus text format 0.0.4.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The restart causes always listed (at 0 until one happens), so that `increase()` works from
/// the first one.
pub const CAUSES: [&str; 5] = ["crash", "ready-timeout", "watchdog", "memory", "hung"];

/// The worker states always listed.
pub const STATES: [&str; 5] = ["starting", "ready", "stalled", "draining", "backoff"];

/// One listener's accept queue at the scrape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queue {
    /// The slot's number, or `shared`.
    pub slot: String,
    pub bind: String,
    pub len: u32,
    pub max: u32,
}

/// What a scrape measures outside the loop's tables.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Measured {
    /// Per slot of the snapshot, in its order: resident bytes and CPU seconds of its workers'
    /// process groups.
    pub slots: Vec<(u64, f64)>,
    pub queues: Vec<Queue>,
    pub listen_overflows: Option<u64>,
    /// The endpoint's connections.
    pub server: Counts,
}

/// Read /proc and the listeners for the slots of `s`.
pub fn measure(s: &Snapshot) -> Measured {
    let pids: Vec<i32> = s.slots.iter().flat_map(|slot| slot.workers.iter().map(|w| w.pid)).collect();
    let mut groups = readiness::groups_members(&pids).into_iter();
    let tick = sys::clock_ticks_per_second();
    let slots = s
        .slots
        .iter()
        .map(|slot| {
            let members: Vec<i32> = slot.workers.iter().flat_map(|_| groups.next().unwrap_or_default()).collect();
            (sys::group_rss(&members), group_cpu_ticks(&members) as f64 / tick)
        })
        .collect();
    let shared = s.mode == "shared";
    let mut seen = Vec::new();
    let mut queues = Vec::new();
    for slot in &s.slots {
        for (i, &fd) in slot.listeners.iter().enumerate() {
            if seen.contains(&fd) {
                continue;
            }
            seen.push(fd);
            let Some((len, max)) = sys::listener_queue(fd) else { continue };
            let bind = s.binds.get(i).map(|b| b.to_string()).unwrap_or_default();
            let slot = if shared { "shared".to_string() } else { slot.slot.to_string() };
            queues.push(Queue { slot, bind, len, max });
        }
    }
    let listen_overflows =
        std::fs::read_to_string("/proc/net/netstat").ok().and_then(|t| netstat(&t, "TcpExt", "ListenOverflows"));
    Measured { slots, queues, listen_overflows, server: Counts::default() }
}

/// User and system CPU time of `pids`, and of the children they reaped, in clock ticks.
fn group_cpu_ticks(pids: &[i32]) -> u64 {
    pids.iter().filter_map(|pid| sys::stat(*pid)).map(|s| s.utime + s.stime + s.cutime + s.cstime).sum()
}

/// The value of `field` in the `section` (`TcpExt`) of /proc/net/netstat's text: a line of
/// names, then a line of values.
pub fn netstat(text: &str, section: &str, field: &str) -> Option<u64> {
    let prefix = format!("{section}:");
    let mut lines = text.lines().filter(|l| l.starts_with(&prefix));
    while let (Some(names), Some(values)) = (lines.next(), lines.next()) {
        let i = names.split_whitespace().position(|n| n == field);
        if let Some(v) = i.and_then(|i| values.split_whitespace().nth(i)) {
            return v.parse().ok();
        }
    }
    None
}

/// The exposition writer: families with their HELP and TYPE, then samples.
struct Out(String);

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl Display) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let _ = write!(self.0, "{k}=\"{}\"", escape(v));
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }
}

/// A label value as the format wants it: backslash, double quote and newline escaped.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// `-n MIN..MAX`: the bounds, the automatic decisions, and the last one with its reason.
fn autoscale(o: &mut Out, a: &AutoscaleSnapshot) {
    o.family("reuse_launch_workers_min", "gauge", "With -n MIN..MAX: the fewest worker slots kept.");
    o.sample("reuse_launch_workers_min", &[], a.min);
    o.family("reuse_launch_workers_max", "gauge", "With -n MIN..MAX: the most worker slots kept.");
    o.sample("reuse_launch_workers_max", &[], a.max);
    let name = "reuse_launch_autoscale_decisions_total";
    o.family(name, "counter", "Automatic changes of the number of worker slots, by direction.");
    o.sample(name, &[("direction", "up")], a.ups);
    o.sample(name, &[("direction", "down")], a.downs);
    if let Some(last) = a.last() {
        let name = "reuse_launch_autoscale_last_decision_timestamp_seconds";
        let help = "When the last automatic decision was made (Unix time), with the slot count it chose and why.";
        o.family(name, "gauge", help);
        let (to, secs) = (last.to.to_string(), last.unix_ms as f64 / 1000.0);
        o.sample(name, &[("direction", last.direction()), ("workers", &to), ("reason", &last.reason)], secs);
    }
}

/// The whole `/metrics` answer.
pub fn render(view: &View, m: &Measured) -> String {
    let s = &view.snapshot;
    let mut o = Out(String::with_capacity(256 + 400 * s.slots.len()));
    o.family("reuse_launch_build_info", "gauge", "The launcher's version (always 1).");
    o.sample("reuse_launch_build_info", &[("version", env!("CARGO_PKG_VERSION"))], 1);

    o.family("reuse_launch_workers", "gauge", "Worker processes by state; backoff counts slots waiting to respawn.");
    let mut counts = [0usize; STATES.len()];
    for slot in &s.slots {
        for w in &slot.workers {
            if let Some(i) = STATES.iter().position(|st| *st == w.state) {
                counts[i] += 1;
            }
        }
        if slot.workers.is_empty() && slot.backoff.is_some() {
            counts[4] += 1;
        }
    }
    for (state, n) in STATES.iter().zip(counts) {
        o.sample("reuse_launch_workers", &[("state", state)], n);
    }
    o.family("reuse_launch_workers_desired", "gauge", "Worker slots the launcher keeps (-n, then scaling).");
    o.sample("reuse_launch_workers_desired", &[], s.desired);
    if let Some(a) = &s.autoscale {
        autoscale(&mut o, a);
    }
    o.family("reuse_launch_generation", "gauge", "The highest generation any slot runs (1, then one more per roll).");
    o.sample("reuse_launch_generation", &[], s.generation);
    o.family("reuse_launch_roll_in_progress", "gauge", "1 while a rolling restart runs.");
    o.sample("reuse_launch_roll_in_progress", &[], u8::from(s.roll.is_some()));
    o.family("reuse_launch_serving_slots", "gauge", "Slots that new connections are sent to.");
    o.sample("reuse_launch_serving_slots", &[], view.serving);

    o.family("reuse_launch_restarts_total", "counter", "Workers replaced other than by a roll, by slot and cause.");
    for slot in &s.slots {
        let label = slot.slot.to_string();
        let extra = slot.restarts.iter().filter(|(c, _)| !CAUSES.contains(c));
        for (cause, n) in CAUSES
            .iter()
            .map(|c| (*c, slot.restarts.iter().find(|r| r.0 == *c).map_or(0, |r| r.1)))
            .chain(extra.copied())
        {
            o.sample("reuse_launch_restarts_total", &[("slot", &label), ("cause", cause)], n);
        }
    }
    o.family("reuse_launch_worker_rss_bytes", "gauge", "Resident memory of the slot's worker process groups.");
    for (slot, (rss, _)) in s.slots.iter().zip(&m.slots) {
        o.sample("reuse_launch_worker_rss_bytes", &[("slot", &slot.slot.to_string())], rss);
    }
    o.family(
        "reuse_launch_worker_cpu_seconds_total",
        "counter",
        "CPU time (user and system) of the slot's worker process groups; resets when the worker is replaced.",
    );
    for (slot, (_, cpu)) in s.slots.iter().zip(&m.slots) {
        o.sample("reuse_launch_worker_cpu_seconds_total", &[("slot", &slot.slot.to_string())], cpu);
    }
    o.family("reuse_launch_accept_queue", "gauge", "Connections waiting in a listener's accept queue.");
    for q in &m.queues {
        o.sample("reuse_launch_accept_queue", &[("slot", &q.slot), ("bind", &q.bind)], q.len);
    }
    o.family("reuse_launch_accept_queue_max", "gauge", "A listener's backlog: the most connections its queue holds.");
    for q in &m.queues {
        o.sample("reuse_launch_accept_queue_max", &[("slot", &q.slot), ("bind", &q.bind)], q.max);
    }
    if let Some(n) = m.listen_overflows {
        o.family(
            "reuse_launch_listen_overflows_total",
            "counter",
            "Connections dropped because an accept queue was full (ListenOverflows, whole network namespace).",
        );
        o.sample("reuse_launch_listen_overflows_total", &[], n);
    }
    o.family(
        "reuse_launch_intercepted_binds_total",
        "counter",
        "Workers' own bind() calls of a --bind port that got the slot's socket (--intercept-bind).",
    );
    o.sample("reuse_launch_intercepted_binds_total", &[], s.intercept.binds);
    o.family(
        "reuse_launch_intercepted_listens_total",
        "counter",
        "Workers' listen() calls on a launcher's socket answered without changing it (--intercept-bind).",
    );
    o.sample("reuse_launch_intercepted_listens_total", &[], s.intercept.listens);
    connections(&mut o, &m.server);
    o.0
}

/// The endpoint's own connections.
fn connections(o: &mut Out, c: &Counts) {
    o.family("reuse_launch_metrics_connections", "gauge", "Open connections to this endpoint.");
    o.sample("reuse_launch_metrics_connections", &[], c.open);
    o.family("reuse_launch_metrics_connections_max", "gauge", "The most connections this endpoint keeps open.");
    o.sample("reuse_launch_metrics_connections_max", &[], c.max);
    o.family(
        "reuse_launch_metrics_closed_total",
        "counter",
        "Connections this endpoint closed on a client, by reason.",
    );
    for (reason, n) in CLOSE_REASONS.iter().zip(c.closed) {
        o.sample("reuse_launch_metrics_closed_total", &[("reason", reason)], n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::{SlotSnapshot, WorkerSnapshot};
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
        for line in [
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
            &format!("reuse_launch_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION")),
        ] {
            assert!(text.lines().any(|l| l == line), "no line {line:?} in:\n{text}");
        }
        // Every sample line's family was declared before it.
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
}
