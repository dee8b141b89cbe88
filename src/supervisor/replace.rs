//! Replacing one worker make-before-break, like a one-slot roll, for a cause that is not a roll:
//! `memory` (`--max-memory`, see `memory`) and `hung` (`--hung-timeout`, see `hung`).
//!
//! A new worker of the slot's generation starts on the slot's sockets as a *candidate* (it does
//! not own the slot yet); once it is ready it takes over, and only then does the old worker get
//! the stop signal (SIGKILL after `--grace`). The old worker's exit counts as a restart of its
//! slot for the cause, and needs no respawn: the new worker is already there. A candidate not
//! ready within `--ready-timeout` is stopped and the old worker kept; the caller tries again
//! later. Nothing is replaced while a roll runs, the slot is being replaced (a roll's candidate,
//! a draining worker, another replacement) or retired, or the launcher stops.

use std::collections::HashMap;
use std::time::Instant;

use super::os::Os;
use super::workers::State;
use super::Supervisor;
use crate::event::WorkerId;

/// The causes a replacement can have; an old worker stopped with one of them needs no respawn.
pub(super) const CAUSES: [&str; 2] = ["memory", "hung"];

/// Replacements under way: the new worker, and the slot, the old worker and the cause.
#[derive(Debug, Default)]
pub(super) struct Replacements {
    map: HashMap<WorkerId, (usize, WorkerId, &'static str)>,
}

impl Replacements {
    /// Replacements under way (new worker, slot, old worker, cause), for `reexec`.
    pub(super) fn export(&self) -> Vec<(WorkerId, usize, WorkerId, String)> {
        self.map.iter().map(|(new, (slot, old, cause))| (*new, *slot, *old, cause.to_string())).collect()
    }

    pub(super) fn restore(&mut self, replacements: &[(WorkerId, usize, WorkerId, String)]) {
        let cause = |c: &str| CAUSES.into_iter().find(|k| *k == c).unwrap_or("memory");
        self.map = replacements.iter().map(|(new, slot, old, c)| (*new, (*slot, *old, cause(c)))).collect();
    }

    /// A worker exited: forget it as a replacement (true if it was one; the old one keeps its
    /// slot).
    pub(super) fn forget(&mut self, id: WorkerId) -> bool {
        self.map.remove(&id).is_some()
    }

    /// A replacement for `cause` is under way on `slot`.
    pub(super) fn on(&self, slot: usize, cause: &str) -> bool {
        self.map.values().any(|r| r.0 == slot && r.2 == cause)
    }
}

impl<O: Os> Supervisor<O> {
    /// Start replacing worker `id` for `cause`; false when it cannot be now (see the module
    /// docs) or the new worker could not start (logged).
    pub(super) fn replace(&mut self, id: WorkerId, cause: &'static str, now: Instant) -> bool {
        let Some(w) = self.workers.get(id) else { return false };
        let (slot, gen, label) = (w.slot, w.gen, w.label());
        if !self.may_replace(slot) || w.is_stopping() {
            return false;
        }
        match self.spawn(slot, gen, true, now) {
            Ok(new) => {
                self.watches.replacements.map.insert(new, (slot, id, cause));
                true
            }
            Err(e) => {
                log::error!("cannot start a replacement for {label}: {e}");
                false
            }
        }
    }

    /// Nothing else changes `slot` now: no roll, no stop, no replacement or retirement.
    pub(super) fn may_replace(&self, slot: usize) -> bool {
        self.roll.rolling_gen().is_none()
            && self.halt.shutdown.is_none()
            && !self.workers.replacing(slot)
            && self.slots[slot].retiring.is_none()
            && !self.watches.replacements.map.values().any(|r| r.0 == slot)
    }

    /// `id` became ready: if it replaces a worker, it takes over its slot now.
    pub(super) fn replacement_ready(&mut self, id: WorkerId, now: Instant) {
        let Some((slot, old, cause)) = self.watches.replacements.map.remove(&id) else { return };
        if let Some(w) = self.workers.get_mut(id) {
            w.candidate = false;
            log::info!("{} took over slot {slot}", w.label());
        }
        if let Some(w) = self.workers.get_mut(old) {
            w.fault = Some(cause);
        }
        self.stop(old, now);
    }

    /// A replacement that is not ready by its deadline is stopped; the old worker stays.
    pub(super) fn replacements_due(&mut self, now: Instant) {
        let late: Vec<WorkerId> = self
            .watches
            .replacements
            .map
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
            self.watches.replacements.map.remove(&id);
            self.stop(id, now);
        }
    }
}
