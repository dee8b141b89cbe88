//! The `status` response: the loop's [`Snapshot`] plus what the server thread measures
//! (`measure`), as the JSON object documented in the README. One row per worker process, and
//! one row with `"pid": null, "state": "backoff"` for a slot that has none.

use std::collections::HashMap;
use std::time::Duration;

use super::json::Value;
use super::measure::{self, CpuHistory, Usage};
use crate::snapshot::{AutoscaleSnapshot, ScaleRecord, SlotSnapshot, Snapshot};

/// Build the status object (measuring CPU, memory and queues now; this may take
/// [`measure::MIN_WINDOW`]).
pub fn status(snap: &Snapshot, cpu: &CpuHistory, control: &str) -> Value {
    let pids: Vec<i32> = snap.slots.iter().flat_map(|s| s.workers.iter().map(|w| w.pid)).collect();
    let usage: HashMap<i32, Usage> = pids.iter().copied().zip(cpu.measure(&pids)).collect();
    let queues: Vec<Option<(u32, u32)>> = snap.slots.iter().map(|s| measure::queue(&s.listeners)).collect();
    let Value::Obj(mut fields) = build(snap, &usage, &queues, control) else { unreachable!("an object") };
    // How the workers' trees are contained (see `cgroup`), before the worker rows.
    let (kind, root) = crate::cgroup::in_use();
    let at = fields.len() - 1;
    fields.insert(at, ("containment".into(), kind.into()));
    fields.insert(at + 1, ("cgroup".into(), root.map(|r| r.display().to_string()).into()));
    Value::Obj(fields)
}

/// The object from the snapshot and the measurements (pure, for tests).
fn build(snap: &Snapshot, usage: &HashMap<i32, Usage>, queues: &[Option<(u32, u32)>], control: &str) -> Value {
    let mut rows = Vec::new();
    for (slot, queue) in snap.slots.iter().zip(queues) {
        let queue = *queue;
        if slot.workers.is_empty() {
            rows.push(row(slot, None, queue));
        }
        for w in &slot.workers {
            let u = usage.get(&w.pid).copied().unwrap_or_default();
            let worker = Value::obj([
                ("pid", w.pid.into()),
                ("generation", w.generation.into()),
                ("state", w.state.into()),
                ("uptime_s", seconds(w.uptime)),
                ("cpu_percent", u.cpu_percent.into()),
                ("rss_bytes", u.rss_bytes.into()),
            ]);
            rows.push(row(slot, Some(worker), queue));
        }
    }
    let roll = match snap.roll {
        Some((generation, done, slots)) => {
            Value::obj([("generation", generation.into()), ("done", done.into()), ("slots", slots.into())])
        }
        None => Value::Null,
    };
    Value::obj([
        ("pid", snap.pid.into()),
        ("mode", snap.mode.as_str().into()),
        ("binds", Value::Arr(snap.binds.iter().map(|b| b.to_string().into()).collect())),
        ("generation", snap.generation.into()),
        ("desired", snap.desired.into()),
        ("ready", snap.ready.into()),
        ("autoscale", snap.autoscale.as_ref().map_or(Value::Null, autoscale)),
        ("roll", roll),
        ("stopping", snap.stopping.into()),
        ("control", control.into()),
        ("version", env!("CARGO_PKG_VERSION").into()),
        ("image", image().into()),
        ("intercept_bind", snap.intercept.state.as_str().into()),
        ("intercepted_binds", snap.intercept.binds.into()),
        ("intercepted_listens", snap.intercept.listens.into()),
        ("workers", Value::Arr(rows)),
    ])
}

/// `-n MIN..MAX`: the bounds, the calm, the last automatic decision, every recent change, and
/// what the policy's window shows now.
fn autoscale(a: &AutoscaleSnapshot) -> Value {
    let record = |r: &ScaleRecord| {
        Value::obj([
            ("direction", r.direction().into()),
            ("from", r.from.into()),
            ("to", r.to.into()),
            ("by", r.by.as_str().into()),
            ("reason", r.reason.as_str().into()),
            ("text", r.text().into()),
            ("ago_s", seconds(r.ago)),
        ])
    };
    let pct = |p: u32| Value::Num(f64::from(p) / 100.0);
    Value::obj([
        ("min", a.min.into()),
        ("max", a.max.into()),
        ("scale_down_after_s", seconds(a.calm)),
        ("last", a.last().map_or(Value::Null, record)),
        ("decisions", Value::Arr(a.decisions.iter().map(record).collect())),
        ("ups", a.ups.into()),
        ("downs", a.downs.into()),
        (
            "load",
            Value::obj([
                ("samples", a.samples.into()),
                ("pressed", pct(a.pressed_pct)),
                ("waiting", pct(a.waiting_centi)),
                ("queued", pct(a.queued_pct)),
                ("cpu", Value::Num(f64::from(a.cpu_milli) / 1000.0)),
            ]),
        ),
    ])
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

/// One row: the worker's own fields (None: a slot without one, in backoff) and the slot's.
fn row(slot: &SlotSnapshot, worker: Option<Value>, queue: Option<(u32, u32)>) -> Value {
    let worker = worker.unwrap_or_else(|| {
        Value::obj([
            ("pid", Value::Null),
            ("generation", slot.generation.into()),
            ("state", "backoff".into()),
            ("uptime_s", Value::Null),
            ("cpu_percent", Value::Null),
            ("rss_bytes", Value::Null),
        ])
    });
    let Value::Obj(mut fields) = worker else { unreachable!("rows are objects") };
    fields.insert(0, ("slot".into(), slot.slot.into()));
    let causes = Value::obj(slot.restarts.iter().map(|(cause, n)| (*cause, Value::from(*n))));
    fields.extend([
        ("restarts".to_string(), slot.restarts_total().into()),
        ("restarts_by_cause".to_string(), causes),
        ("last_exit".to_string(), slot.last_exit.clone().into()),
        ("queue".to_string(), queue.map(|q| q.0).into()),
        ("queue_max".to_string(), queue.map(|q| q.1).into()),
        ("backoff_s".to_string(), slot.backoff.filter(|_| slot.workers.is_empty()).map_or(Value::Null, seconds)),
        ("retiring".to_string(), slot.retiring.into()),
    ]);
    Value::Obj(fields)
}

/// Seconds with millisecond precision.
fn seconds(d: Duration) -> Value {
    Value::Num((d.as_secs_f64() * 1000.0).round() / 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;
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
        let text = build(&rich(), &usage, &[Some((0, 128)), None], "/run/x \"y\".sock").to_string();
        let text = text.replace(&image(), "{image}");
        assert_eq!(text, include_str!("testdata/status.json").trim_end());
    }

    #[test]
    fn a_worker_row_and_a_backoff_row() {
        let snap = sample();
        let usage = HashMap::from([(11, Usage { cpu_percent: Some(1.5), rss_bytes: Some(4096) })]);
        let v = build(&snap, &usage, &[Some((0, 128)), None], "/run/x.sock");
        check_rows(v);
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

    fn check_rows(v: Value) {
        let text = v.to_string();
        assert!(
            text.starts_with(r#"{"pid":10,"mode":"reuseport","binds":["127.0.0.1:8080"],"generation":2,"#),
            "{text}"
        );
        assert!(text.contains(r#""intercept_bind":"on","intercepted_binds":3,"intercepted_listens":2,"#), "{text}");
        let rows = v.get("workers").and_then(Value::as_array).unwrap();
        assert_eq!(
            rows[0].to_string(),
            r#"{"slot":0,"pid":11,"generation":2,"state":"ready","uptime_s":1.5,"cpu_percent":1.5,"rss_bytes":4096,"restarts":1,"restarts_by_cause":{"crash":1},"last_exit":"killed by SIGKILL","queue":0,"queue_max":128,"backoff_s":null,"retiring":false}"#
        );
        assert_eq!(
            rows[1].to_string(),
            r#"{"slot":1,"pid":null,"generation":1,"state":"backoff","uptime_s":null,"cpu_percent":null,"rss_bytes":null,"restarts":3,"restarts_by_cause":{"crash":2,"watchdog":1},"last_exit":"exited with status 1","queue":null,"queue_max":null,"backoff_s":0.75,"retiring":false}"#
        );
    }
}
