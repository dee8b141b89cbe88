//! Memory recycling (`--max-memory`): a worker whose process group's resident memory stays
//! above the limit for [`TRIPS`] samples, [`EVERY`] apart, is replaced make-before-break, like
//! a one-slot roll (`replace`): a new worker of the same generation starts on the slot's
//! sockets, and only once it is ready does the old one get the stop signal (it finishes its
//! requests; PM2's memory restart kills them, pm2 #5562). The replacement counts as a restart
//! with cause `memory`. A new worker that fails to become ready is stopped and the old one kept;
//! the next trip tries again. Nothing is replaced while a roll runs, the slot is being replaced
//! or retired, or the launcher stops.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::os::Os;
use super::workers::State;
use super::Supervisor;
use crate::event::WorkerId;
use crate::readiness;
use crate::sys::group_rss;

pub(super) const EVERY: Duration = Duration::from_secs(1);
pub(super) const TRIPS: u32 = 3;

#[derive(Debug, Default)]
pub(super) struct MemoryWatch {
    next: Option<Instant>,
    /// Samples in a row over the limit, per worker.
    over: HashMap<WorkerId, u32>,
}

impl MemoryWatch {
    /// A worker exited: forget its samples.
    pub(super) fn forget(&mut self, id: WorkerId) {
        self.over.remove(&id);
    }
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
        let groups = readiness::groups_members(&ready.iter().map(|r| r.1).collect::<Vec<_>>());
        self.watches.memory.over.retain(|id, _| ready.iter().any(|r| r.0 == *id));
        for ((id, _), members) in ready.into_iter().zip(groups) {
            let rss = group_rss(&members);
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
