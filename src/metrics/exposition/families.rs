//! The families of `/metrics`, in the order of the module doc's table.

use super::super::limits::{Counts, CLOSE_REASONS};
use super::super::View;
use super::out::Out;
use super::{Measured, CAUSES, STATES};
use crate::snapshot::{AutoscaleSnapshot, Snapshot};

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

    workers(&mut o, s);
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

    slots(&mut o, s, m);
    queues(&mut o, m);
    intercepted(&mut o, s);
    connections(&mut o, &m.server);
    o.0
}

/// Worker processes by state (a slot waiting to respawn counts as `backoff`).
fn workers(o: &mut Out, s: &Snapshot) {
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
}

/// Per slot: restarts by cause, resident memory, CPU time.
fn slots(o: &mut Out, s: &Snapshot, m: &Measured) {
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
}

/// The listeners' accept queues and backlogs, and the namespace's listen overflows.
fn queues(o: &mut Out, m: &Measured) {
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
}

/// The workers' own bind() and listen() calls answered by the launcher (--intercept-bind).
fn intercepted(o: &mut Out, s: &Snapshot) {
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
