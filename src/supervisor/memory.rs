//! Memory recycling (`--max-memory`): a worker whose process group's resident memory stays
//! above the limit for [`TRIPS`] samples, [`EVERY`] apart, is replaced make-before-break, like
//! a one-slot roll (`replace`): a new worker of the same generation starts on the slot's
//! sockets, and only once it is ready does the old one get the stop signal (it finishes its
//! requests; PM2's memory restart kills them, pm2 #5562). The replacement counts as a restart
//! with cause `memory`. A new worker that fails to become ready is stopped and the old one kept;
//! the next trip tries again. Nothing is replaced while a roll runs, the slot is being replaced
//! or retired, or the launcher stops.
//!
//! A worker whose last sample was at most half the limit is sampled [`FAR_EVERY`] only: it
//! would have to take half the limit more between two samples to pass it unseen for longer
//! than that, and a fleet far below its limit (the usual case) costs a quarter of the reads
//! (each sample reads the worker's `cgroup.procs` or scans /proc, then a `statm` per process:
//! at 1,024 idle workers, 3.3% of a core every second).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::os::Os;
use super::workers::State;
use super::Supervisor;
use crate::event::WorkerId;
use crate::readiness;
use crate::sys::group_rss;

pub(super) const EVERY: Duration = Duration::from_secs(1);
/// How often a worker at most half the limit is sampled.
pub(super) const FAR_EVERY: Duration = Duration::from_secs(4);
pub(super) const TRIPS: u32 = 3;

#[derive(Debug, Default)]
pub(super) struct MemoryWatch {
    next: Option<Instant>,
    /// Samples in a row over the limit, per worker.
    over: HashMap<WorkerId, u32>,
    /// When each sampled worker is due again.
    due: HashMap<WorkerId, Instant>,
}

impl MemoryWatch {
    /// A worker exited: forget its samples.
    pub(super) fn forget(&mut self, id: WorkerId) {
        self.over.remove(&id);
        self.due.remove(&id);
    }
}

/// When a worker whose group uses `rss` of `limit` is to be sampled again.
fn next_due(rss: u64, limit: u64, now: Instant) -> Instant {
    now + if rss > limit / 2 { EVERY } else { FAR_EVERY }
}

impl<O: Os> Supervisor<O> {
    /// Sample the ready workers' memory when due; start a replacement where it is over.
    pub(super) fn watch_memory(&mut self, now: Instant) {
        let Some(limit) = self.cfg.max_memory else { return };
        if self.watches.memory.next.is_some_and(|at| now < at) || self.halt.shutdown.is_some() {
            return;
        }
        self.watches.memory.next = Some(now + EVERY);
        let ready: Vec<(WorkerId, i32)> = self
            .workers
            .iter()
            .filter(|(_, w)| w.state == State::Ready && !w.candidate)
            .map(|(id, w)| (id, w.pid.as_raw()))
            .collect();
        let watch = &mut self.watches.memory;
        watch.over.retain(|id, _| ready.iter().any(|r| r.0 == *id));
        watch.due.retain(|id, _| ready.iter().any(|r| r.0 == *id));
        let due: Vec<(WorkerId, i32)> =
            ready.into_iter().filter(|(id, _)| watch.due.get(id).is_none_or(|at| now >= *at)).collect();
        let groups = readiness::groups_members(&due.iter().map(|r| r.1).collect::<Vec<_>>());
        for ((id, _), members) in due.into_iter().zip(groups) {
            let rss = group_rss(&members);
            self.watches.memory.due.insert(id, next_due(rss, limit, now));
            if rss <= limit {
                self.watches.memory.over.remove(&id);
                continue;
            }
            let trips = self.watches.memory.over.entry(id).or_default();
            *trips += 1;
            if *trips >= TRIPS {
                self.replace_for_memory(id, rss, limit, now);
            }
        }
    }

    fn replace_for_memory(&mut self, id: WorkerId, rss: u64, limit: u64, now: Instant) {
        let Some(w) = self.workers.get(id) else { return };
        if !self.may_replace(w.slot) {
            return;
        }
        log::warn!(
            "{} uses {} MiB of memory (limit {} MiB) for {TRIPS} samples in a row; replacing it",
            w.label(),
            rss >> 20,
            limit >> 20
        );
        self.watches.memory.over.remove(&id);
        self.replace(id, "memory", now);
    }

    pub(super) fn next_memory_sample(&self) -> Option<Instant> {
        self.cfg.max_memory.and(self.watches.memory.next).filter(|_| !self.workers.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_far_below_the_limit_is_sampled_less_often() {
        let (now, limit) = (Instant::now(), 100 << 20);
        assert_eq!(next_due(10 << 20, limit, now), now + FAR_EVERY);
        assert_eq!(next_due(50 << 20, limit, now), now + FAR_EVERY, "half the limit: still far");
        assert_eq!(next_due((50 << 20) + 1, limit, now), now + EVERY);
        assert_eq!(next_due(200 << 20, limit, now), now + EVERY, "over it: every second");
    }
}
