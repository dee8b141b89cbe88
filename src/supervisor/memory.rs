//! Memory recycling (`--max-memory`): a worker whose process group's resident memory stays
//! above the limit for [`TRIPS`] samples, [`EVERY`] apart, is replaced make-before-break, like
//! a one-slot roll (`replace`): a new worker of the same generation starts on the slot's
//! sockets, and only once it is ready does the old one get the stop signal (it finishes its
//! requests; PM2's memory restart kills them, pm2 #5562). The replacement counts as a restart
//! with cause `memory`. A new worker that fails to become ready is stopped and the old one kept;
//! the next trip tries again. Nothing is replaced while a roll runs, the slot is being replaced
//! or retired, or the launcher stops.
//!
//! A worker whose last sample was at most half the limit is sampled only every
//! [`FAR_PASSES`]th pass: it would have to take half the limit more between two samples to
//! pass it unseen for longer than that. Those samples fall on the same passes for every such
//! worker, so a fleet far below its limit (the usual case) costs a quarter of the reads, the
//! scan of /proc for process groups without a cgroup included (each pass reads the sampled
//! workers' `cgroup.procs`, or scans /proc, then a `statm` per process: at 1,024 idle workers,
//! 2.3% of a core when all were read every second).

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use super::os::Os;
use super::workers::State;
use super::Supervisor;
use crate::event::WorkerId;
use crate::readiness;
use crate::sys::group_rss;

pub(super) const EVERY: Duration = Duration::from_secs(1);
/// A worker at most half the limit is sampled at every this-many passes only (4 s).
pub(super) const FAR_PASSES: u64 = 4;
pub(super) const TRIPS: u32 = 3;

#[derive(Debug, Default)]
pub(super) struct MemoryWatch {
    next: Option<Instant>,
    /// Passes so far (a far worker is sampled when it is a multiple of [`FAR_PASSES`]).
    pass: u64,
    /// Samples in a row over the limit, per worker.
    over: HashMap<WorkerId, u32>,
    /// The workers whose last sample was at most half the limit.
    far: HashSet<WorkerId>,
}

impl MemoryWatch {
    /// A worker exited: forget its samples.
    pub(super) fn forget(&mut self, id: WorkerId) {
        self.over.remove(&id);
        self.far.remove(&id);
    }

    /// Whether a worker is sampled at this pass: one never sampled or not far, at every pass.
    fn due(&self, id: WorkerId) -> bool {
        !self.far.contains(&id) || self.pass.is_multiple_of(FAR_PASSES)
    }

    /// Record a worker's sample: far when it is at most half the limit.
    fn sampled(&mut self, id: WorkerId, rss: u64, limit: u64) {
        if rss <= limit / 2 {
            self.far.insert(id);
        } else {
            self.far.remove(&id);
        }
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
        let watch = &mut self.watches.memory;
        watch.pass += 1;
        let serving: HashSet<WorkerId> = ready.iter().map(|r| r.0).collect();
        watch.over.retain(|id, _| serving.contains(id));
        watch.far.retain(|id| serving.contains(id));
        let due: Vec<(WorkerId, i32)> = ready.into_iter().filter(|(id, _)| watch.due(*id)).collect();
        let groups = readiness::groups_members(&due.iter().map(|r| r.1).collect::<Vec<_>>());
        for ((id, _), members) in due.into_iter().zip(groups) {
            let rss = group_rss(&members);
            self.watches.memory.sampled(id, rss, limit);
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
    fn a_worker_far_below_the_limit_is_sampled_at_every_fourth_pass() {
        let limit = 100 << 20;
        let (new, far, near) = (1, 2, 3);
        let mut w = MemoryWatch::default();
        w.sampled(far, 50 << 20, limit); // half the limit: still far
        w.sampled(near, (50 << 20) + 1, limit);
        let mut seen = Vec::new();
        for _ in 0..8 {
            w.pass += 1;
            seen.push([new, far, near].map(|id| w.due(id)));
        }
        assert!(seen.iter().all(|s| s[0] && s[2]), "a new worker and one over half: every pass");
        let far_passes: Vec<usize> = seen.iter().enumerate().filter(|(_, s)| s[1]).map(|(i, _)| i + 1).collect();
        assert_eq!(far_passes, vec![4, 8]);
        w.sampled(far, 200 << 20, limit);
        w.pass += 1;
        assert!(w.due(far), "once over half: every pass again");
        w.forget(far);
        assert!(w.far.is_empty());
    }
}
