//! The `status` response: the loop's [`Snapshot`] plus what the server thread measures
//! (`measure`), as the JSON object documented in the README, derived from the types below (their
//! members in the order they are written on the wire). One row per worker process, and one row
//! with `"pid": null, "state": "backoff"` for a slot that has none.

use std::collections::HashMap;
use std::time::Duration;

use serde::{Serialize, Serializer};

use super::measure::{self, CpuHistory, Usage};
use crate::snapshot::{AutoscaleSnapshot, ScaleRecord, SlotSnapshot, Snapshot};

/// The status object.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Status {
    pub pid: u32,
    mode: String,
    binds: Vec<String>,
    generation: u64,
    desired: usize,
    ready: usize,
    autoscale: Option<Autoscale>,
    roll: Option<Roll>,
    stopping: bool,
    control: String,
    version: &'static str,
    image: String,
    intercept_bind: String,
    intercepted_binds: u64,
    intercepted_listens: u64,
    /// How the workers' trees are contained (see `cgroup`); left out by [`build`].
    #[serde(flatten)]
    containment: Option<Containment>,
    workers: Vec<Row>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
struct Containment {
    containment: &'static str,
    cgroup: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
struct Roll {
    generation: u64,
    done: usize,
    slots: usize,
}

/// `-n MIN..MAX`: the bounds, the calm, the last automatic decision, every recent change, and
/// what the policy's window shows now.
#[derive(Debug, Clone, PartialEq, Serialize)]
struct Autoscale {
    min: usize,
    max: usize,
    scale_down_after_s: f64,
    last: Option<Record>,
    decisions: Vec<Record>,
    ups: u64,
    downs: u64,
    load: Load,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
struct Record {
    direction: &'static str,
    from: usize,
    to: usize,
    by: String,
    reason: String,
    text: String,
    ago_s: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
struct Load {
    samples: usize,
    pressed: f64,
    waiting: f64,
    queued: f64,
    cpu: f64,
}

/// One row: a worker (or a slot without one, in backoff) and its slot's history and queue.
#[derive(Debug, Clone, PartialEq, Serialize)]
struct Row {
    slot: usize,
    pid: Option<i32>,
    generation: u64,
    state: &'static str,
    uptime_s: Option<f64>,
    cpu_percent: Option<f64>,
    rss_bytes: Option<u64>,
    restarts: u64,
    /// `{"crash":1}`, in the slot's order.
    #[serde(serialize_with = "in_order")]
    restarts_by_cause: Vec<(&'static str, u64)>,
    last_exit: Option<String>,
    queue: Option<u32>,
    queue_max: Option<u32>,
    backoff_s: Option<f64>,
    retiring: bool,
}

fn in_order<S: Serializer>(pairs: &[(&'static str, u64)], s: S) -> Result<S::Ok, S::Error> {
    s.collect_map(pairs.iter().map(|(k, v)| (k, v)))
}

/// Build the status object (measuring CPU, memory and queues now; this may take
/// [`measure::MIN_WINDOW`]).
pub fn status(snap: &Snapshot, cpu: &CpuHistory, control: &str) -> Status {
    let pids: Vec<i32> = snap.slots.iter().flat_map(|s| s.workers.iter().map(|w| w.pid)).collect();
    let usage: HashMap<i32, Usage> = pids.iter().copied().zip(cpu.measure(&pids)).collect();
    let queues: Vec<Option<(u32, u32)>> = snap.slots.iter().map(|s| measure::queue(&s.listeners)).collect();
    let mut status = build(snap, &usage, &queues, control);
    let (kind, root) = crate::cgroup::in_use();
    status.containment = Some(Containment { containment: kind, cgroup: root.map(|r| r.display().to_string()) });
    status
}

/// The object from the snapshot and the measurements (pure, for tests).
fn build(snap: &Snapshot, usage: &HashMap<i32, Usage>, queues: &[Option<(u32, u32)>], control: &str) -> Status {
    let mut rows = Vec::new();
    for (slot, queue) in snap.slots.iter().zip(queues) {
        if slot.workers.is_empty() {
            rows.push(row(slot, None, *queue));
        }
        for w in &slot.workers {
            rows.push(row(slot, Some((w, usage.get(&w.pid).copied().unwrap_or_default())), *queue));
        }
    }
    Status {
        pid: snap.pid,
        mode: snap.mode.clone(),
        binds: snap.binds.iter().map(|b| b.to_string()).collect(),
        generation: snap.generation,
        desired: snap.desired,
        ready: snap.ready,
        autoscale: snap.autoscale.as_ref().map(autoscale),
        roll: snap.roll.map(|(generation, done, slots)| Roll { generation, done, slots }),
        stopping: snap.stopping,
        control: control.to_string(),
        version: env!("CARGO_PKG_VERSION"),
        image: image(),
        intercept_bind: snap.intercept.state.clone(),
        intercepted_binds: snap.intercept.binds,
        intercepted_listens: snap.intercept.listens,
        containment: None,
        workers: rows,
    }
}

fn autoscale(a: &AutoscaleSnapshot) -> Autoscale {
    let record = |r: &ScaleRecord| Record {
        direction: r.direction(),
        from: r.from,
        to: r.to,
        by: r.by.clone(),
        reason: r.reason.clone(),
        text: r.text(),
        ago_s: seconds(r.ago),
    };
    let pct = |p: u32| f64::from(p) / 100.0;
    Autoscale {
        min: a.min,
        max: a.max,
        scale_down_after_s: seconds(a.calm),
        last: a.last().map(record),
        decisions: a.decisions.iter().map(record).collect(),
        ups: a.ups,
        downs: a.downs,
        load: Load {
            samples: a.samples,
            pressed: pct(a.pressed_pct),
            waiting: pct(a.waiting_centi),
            queued: pct(a.queued_pct),
            cpu: f64::from(a.cpu_milli) / 1000.0,
        },
    }
}

/// This process image's own number: it changes with a `reexec` (the pid does not).
pub fn image() -> String {
    static IMAGE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    IMAGE
        .get_or_init(|| {
            let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            format!("{:x}", t.as_nanos())
        })
        .clone()
}

/// One row: the worker and what was measured of it (None: a slot without one, in backoff), and
/// the slot's own fields.
fn row(
    slot: &SlotSnapshot,
    worker: Option<(&crate::snapshot::WorkerSnapshot, Usage)>,
    queue: Option<(u32, u32)>,
) -> Row {
    Row {
        slot: slot.slot,
        pid: worker.map(|(w, _)| w.pid),
        generation: worker.map_or(slot.generation, |(w, _)| w.generation),
        state: worker.map_or("backoff", |(w, _)| w.state),
        uptime_s: worker.map(|(w, _)| seconds(w.uptime)),
        cpu_percent: worker.and_then(|(_, u)| u.cpu_percent),
        rss_bytes: worker.and_then(|(_, u)| u.rss_bytes),
        restarts: slot.restarts_total(),
        restarts_by_cause: slot.restarts.clone(),
        last_exit: slot.last_exit.clone(),
        queue: queue.map(|q| q.0),
        queue_max: queue.map(|q| q.1),
        backoff_s: slot.backoff.filter(|_| slot.workers.is_empty()).map(seconds),
        retiring: slot.retiring,
    }
}

/// Seconds with millisecond precision.
fn seconds(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::wire::to_line;
    use crate::snapshot::WorkerSnapshot;

    /// A snapshot with every part filled in: two slots (one in backoff), a roll, autoscaling.
    fn rich() -> Snapshot {
        let mut snap = sample();
        snap.roll = Some((3, 1, 2));
        snap.stopping = true;
        // Every escape the printer knows, in a string the launcher reports.
        snap.slots[1].last_exit = Some("a\"b\\c\n\r\t\u{8}\u{c}\u{1}\u{2028}\u{2029}\u{7f}é😀".into());
        let record = |secs, from, to, by: &str, reason: &str| ScaleRecord {
            ago: Duration::from_millis(secs),
            from,
            to,
            by: by.into(),
            reason: reason.into(),
            unix_ms: 1,
        };
        snap.autoscale = Some(AutoscaleSnapshot {
            min: 1,
            max: 3,
            calm: Duration::from_secs(30),
            decisions: vec![
                record(9_500, 1, 2, "control", "asked by control"),
                record(4_125, 2, 3, "auto", "at least one connection waiting per slot for 2s"),
            ],
            ups: 1,
            downs: 0,
            samples: 20,
            pressed_pct: 50,
            waiting_centi: 125,
            queued_pct: 100,
            cpu_milli: 1500,
        });
        snap
    }

    /// The whole object, byte for byte as the hand-written JSON printer made it before the
    /// control protocol went through serde_json (recorded from main 3b7ca04).
    #[test]
    fn the_whole_object_is_unchanged_byte_for_byte() {
        let usage = HashMap::from([(11, Usage { cpu_percent: Some(0.0), rss_bytes: Some(4096) })]);
        let text = to_line(&build(&rich(), &usage, &[Some((0, 128)), None], "/run/x \"y\".sock"));
        let text = text.replace(&image(), "{image}");
        assert_eq!(text, include_str!("testdata/status.json").trim_end());
    }

    #[test]
    fn a_worker_row_and_a_backoff_row() {
        let snap = sample();
        let usage = HashMap::from([(11, Usage { cpu_percent: Some(1.5), rss_bytes: Some(4096) })]);
        let v = build(&snap, &usage, &[Some((0, 128)), None], "/run/x.sock");
        check_rows(&v, &to_line(&v));
    }

    fn sample() -> Snapshot {
        Snapshot {
            pid: 10,
            mode: "reuseport".into(),
            binds: vec!["127.0.0.1:8080".parse().unwrap()],
            generation: 2,
            desired: 2,
            ready: 1,
            roll: None,
            stopping: false,
            slots: vec![
                SlotSnapshot {
                    slot: 0,
                    generation: 2,
                    workers: vec![WorkerSnapshot {
                        pid: 11,
                        generation: 2,
                        state: "ready",
                        uptime: Duration::from_millis(1500),
                    }],
                    restarts: vec![("crash", 1)],
                    last_exit: Some("killed by SIGKILL".into()),
                    backoff: None,
                    retiring: false,
                    listeners: vec![],
                },
                SlotSnapshot {
                    slot: 1,
                    generation: 1,
                    workers: vec![],
                    restarts: vec![("crash", 2), ("watchdog", 1)],
                    last_exit: Some("exited with status 1".into()),
                    backoff: Some(Duration::from_millis(750)),
                    retiring: false,
                    listeners: vec![],
                },
            ],
            autoscale: None,
            intercept: crate::snapshot::InterceptSnapshot { state: "on".into(), binds: 3, listens: 2 },
        }
    }

    fn check_rows(v: &Status, text: &str) {
        assert!(
            text.starts_with(r#"{"pid":10,"mode":"reuseport","binds":["127.0.0.1:8080"],"generation":2,"#),
            "{text}"
        );
        assert!(text.contains(r#""intercept_bind":"on","intercepted_binds":3,"intercepted_listens":2,"#), "{text}");
        let rows = &v.workers;
        assert_eq!(
            to_line(&rows[0]),
            r#"{"slot":0,"pid":11,"generation":2,"state":"ready","uptime_s":1.5,"cpu_percent":1.5,"rss_bytes":4096,"restarts":1,"restarts_by_cause":{"crash":1},"last_exit":"killed by SIGKILL","queue":0,"queue_max":128,"backoff_s":null,"retiring":false}"#
        );
        assert_eq!(
            to_line(&rows[1]),
            r#"{"slot":1,"pid":null,"generation":1,"state":"backoff","uptime_s":null,"cpu_percent":null,"rss_bytes":null,"restarts":3,"restarts_by_cause":{"crash":2,"watchdog":1},"last_exit":"exited with status 1","queue":null,"queue_max":null,"backoff_s":0.75,"retiring":false}"#
        );
    }
}
