//! Memory recycling (`--max-memory`): a worker whose process group's resident memory stays
//! above the limit for [`TRIPS`] samples, [`EVERY`] apart, is replaced make-before-break, like
//! a one-slot roll: a new worker of the same generation starts on the slot's sockets, and only
//! once it is ready does the old one get the stop signal (it finishes its requests; PM2's
//! memory restart kills them, pm2 #5562). The replacement counts as a restart with cause
//! `memory`. A new worker that fails to become ready is stopped and the old one kept; the next
//! trip tries again. Nothing is replaced while a roll runs, the slot is being replaced or
//! retired, or the launcher stops.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::os::Os;
use super::workers::State;
use super::Supervisor;
use crate::event::WorkerId;
use crate::readiness;

pub(super) const EVERY: Duration = Duration::from_secs(1);
pub(super) const TRIPS: u32 = 3;

#[derive(Debug, Default)]
pub(super) struct MemoryWatch {
    next: Option<Instant>,
    /// Samples in a row over the limit, per worker.
    over: HashMap<WorkerId, u32>,
    /// Replacements under way: the new worker, and the slot and old worker it replaces.
    replacing: HashMap<WorkerId, (usize, WorkerId)>,
}

impl MemoryWatch {
    /// Replacements under way (new worker, slot, old worker), for `reexec`.
    pub(super) fn replacements(&self) -> Vec<(WorkerId, usize, WorkerId)> {
        self.replacing.iter().map(|(new, (slot, old))| (*new, *slot, *old)).collect()
    }

    pub(super) fn restore(&mut self, replacements: &[(WorkerId, usize, WorkerId)]) {
        self.replacing = replacements.iter().map(|(new, slot, old)| (*new, (*slot, *old))).collect();
    }
}

impl<O: Os> Supervisor<O> {
    /// Sample the ready workers' memory when due; start a replacement where it is over.
    pub(super) fn watch_memory(&mut self, now: Instant) {
        let Some(limit) = self.cfg.max_memory else { return };
        if self.memory.next.is_some_and(|at| now < at) || self.shutdown.is_some() {
            return;
        }
        self.memory.next = Some(now + EVERY);
        let ready: Vec<(WorkerId, i32)> = self
            .workers
            .iter()
            .filter(|(_, w)| w.state == State::Ready && !w.candidate)
            .map(|(id, w)| (id, w.pid.as_raw()))
            .collect();
        let groups = readiness::groups_members(&ready.iter().map(|r| r.1).collect::<Vec<_>>());
        self.memory.over.retain(|id, _| ready.iter().any(|r| r.0 == *id));
        for ((id, _), members) in ready.into_iter().zip(groups) {
            let rss = group_rss(&members);
            if rss <= limit {
                self.memory.over.remove(&id);
                continue;
            }
            let trips = self.memory.over.entry(id).or_default();
            *trips += 1;
            if *trips >= TRIPS {
                self.replace_for_memory(id, rss, limit, now);
            }
        }
    }

    fn replace_for_memory(&mut self, id: WorkerId, rss: u64, limit: u64, now: Instant) {
        let Some(w) = self.workers.get(id) else { return };
        let (slot, gen, label) = (w.slot, w.gen, w.label());
        let busy = self.roll.rolling_gen().is_some()
            || self.workers.replacing(slot)
            || self.slots[slot].retiring.is_some()
            || self.memory.replacing.values().any(|r| r.0 == slot);
        if busy {
            return;
        }
        log::warn!(
            "{label} uses {} MiB of memory (limit {} MiB) for {TRIPS} samples in a row; replacing it",
            rss >> 20,
            limit >> 20
        );
        self.memory.over.remove(&id);
        match self.spawn(slot, gen, true, now) {
            Ok(new) => {
                self.memory.replacing.insert(new, (slot, id));
            }
            Err(e) => log::error!("cannot start a replacement for {label}: {e}"),
        }
    }

    /// `id` became ready: if it replaces a worker for memory, it takes over its slot now.
    pub(super) fn memory_replacement_ready(&mut self, id: WorkerId, now: Instant) {
        let Some((slot, old)) = self.memory.replacing.remove(&id) else { return };
        if let Some(w) = self.workers.get_mut(id) {
            w.candidate = false;
            log::info!("{} took over slot {slot}", w.label());
        }
        if let Some(w) = self.workers.get_mut(old) {
            w.fault = Some("memory");
        }
        self.stop(old, now);
    }

    /// A replacement that is not ready by its deadline is stopped; the old worker stays.
    pub(super) fn memory_replacements_due(&mut self, now: Instant) {
        let late: Vec<WorkerId> = self
            .memory
            .replacing
            .keys()
            .copied()
            .filter(|id| {
                self.workers
                    .get(*id)
                    .is_some_and(|w| matches!(w.state, State::Starting { deadline, .. } if now >= deadline))
            })
            .collect();
        for id in late {
            if let Some(w) = self.workers.get(id) {
                log::warn!(
                    "{} not ready within {:?}; the worker it was to replace keeps serving",
                    w.label(),
                    self.cfg.ready_timeout
                );
            }
            self.memory.replacing.remove(&id);
            self.stop(id, now);
        }
    }

    /// A worker exited: forget it as a replacement (the old one keeps its slot).
    pub(super) fn memory_forget(&mut self, id: WorkerId) {
        self.memory.over.remove(&id);
        if self.memory.replacing.remove(&id).is_some() {
            log::warn!("the replacement worker exited before it was ready; the old one keeps serving");
        }
    }

    pub(super) fn next_memory_sample(&self) -> Option<Instant> {
        self.cfg.max_memory.and(self.memory.next).filter(|_| !self.workers.is_empty())
    }
}

/// Resident memory of processes `pids` in bytes (/proc/PID/statm; unreadable ones count 0).
pub fn group_rss(pids: &[i32]) -> u64 {
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE).ok().flatten().unwrap_or(4096) as u64;
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/statm")).ok())
        .filter_map(|s| s.split_whitespace().nth(1).and_then(|r| r.parse::<u64>().ok()))
        .map(|pages| pages * page)
        .sum()
}
