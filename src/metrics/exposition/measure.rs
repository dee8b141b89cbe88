//! What a scrape measures outside the loop's tables: RSS and CPU of each slot's process
//! groups, the listeners' accept queues and backlogs, and ListenOverflows of /proc/net/netstat.

use super::super::limits::Counts;
use crate::readiness;
use crate::snapshot::Snapshot;
use crate::sys;

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
pub(super) fn group_cpu_ticks(pids: &[i32]) -> u64 {
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
