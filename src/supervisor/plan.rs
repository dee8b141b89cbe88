//! The pure decisions of the lifecycle and of scaling, as `roll.rs` is for rolls: facts about
//! the slots and a time in, actions out. `lifecycle::reconcile` and `scale::rescale` read the
//! facts from the tables and carry the actions out; the rules are tested here without a
//! supervisor.

use std::time::{Duration, Instant};

/// What the lifecycle's reconcile knows of one slot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SlotFacts {
    /// Being removed by a scale-down: never respawned.
    pub retiring: bool,
    /// Has a worker that is not stopping (starting or ready).
    pub live: bool,
    /// When its next worker is due (None: at once).
    pub respawn_at: Option<Instant>,
    /// Its workers' failed starts in a row.
    pub start_failures: u32,
    /// The generation its next worker runs.
    pub gen: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Life {
    /// Every kept slot has failed to start `--max-start-failures` times in a row: the
    /// launcher stops with an error.
    GiveUp,
    /// The slot has a live worker: no respawn is pending.
    Settled(usize),
    /// Start the slot's next worker now (its respawn time is over).
    Respawn { slot: usize, gen: u64 },
}

/// Give every kept slot without a live worker its respawn, when due; give up when every kept
/// slot keeps failing to start. Nothing while the launcher stops.
pub fn reconcile(slots: &[SlotFacts], max_start_failures: u32, stopping: bool, now: Instant) -> Vec<Life> {
    if stopping {
        return Vec::new();
    }
    let kept = slots.iter().filter(|s| !s.retiring);
    if kept.clone().all(|s| s.start_failures >= max_start_failures) {
        return vec![Life::GiveUp];
    }
    let mut actions = Vec::new();
    for (slot, s) in slots.iter().enumerate().filter(|(_, s)| !s.retiring) {
        if s.live {
            actions.push(Life::Settled(slot));
        } else if s.respawn_at.is_none_or(|at| now >= at) {
            actions.push(Life::Respawn { slot, gen: s.gen });
        }
    }
    actions
}

/// One step towards the desired number of slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resize {
    /// Bring back a retiring slot (scaled up again before it was removed).
    Keep(usize),
    /// Add a slot at the end.
    Add,
    /// Retire the highest kept slot.
    Retire(usize),
}

/// What `scale` does this turn, from each slot's retiring flag (the caller asks only between
/// rolls, a roll keeps the N it started with, and not while the launcher stops).
pub fn rescale(retiring: &[bool], desired: usize) -> Option<Resize> {
    let kept = retiring.iter().filter(|r| !**r).count();
    if kept < desired {
        // A retiring slot first (they are the last ones), else a new one.
        return Some(retiring.iter().position(|r| *r).map_or(Resize::Add, Resize::Keep));
    }
    (kept > desired).then(|| Resize::Retire(kept - 1))
}

/// How long a retiring slot gets no new connections before its sockets may close.
pub const SETTLE: Duration = Duration::from_secs(1);

/// The last slot, retiring: may its sockets close now? Only once no new connection has come
/// its way for [`SETTLE`] since `since` (None: steering has not surely left it out yet), its
/// workers have exited and nothing waits in its queue.
pub fn may_close(since: Option<Instant>, now: Instant, has_workers: bool, queued: bool) -> bool {
    since.is_some_and(|t| now.saturating_duration_since(t) >= SETTLE) && !has_workers && !queued
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn slot(live: bool, failures: u32) -> SlotFacts {
        SlotFacts { live, start_failures: failures, gen: 1, ..SlotFacts::default() }
    }

    #[test]
    fn respawns_when_due_and_settles_live_slots() {
        let t = Instant::now();
        let later = SlotFacts { respawn_at: Some(t + 500 * MS), ..slot(false, 1) };
        let due = SlotFacts { respawn_at: Some(t), gen: 3, ..slot(false, 1) };
        let retiring = SlotFacts { retiring: true, ..slot(false, 0) };
        let got = reconcile(&[slot(true, 0), later, due, slot(false, 0), retiring], 3, false, t);
        assert_eq!(got, vec![Life::Settled(0), Life::Respawn { slot: 2, gen: 3 }, Life::Respawn { slot: 3, gen: 1 }]);
        assert_eq!(reconcile(&[later], 3, false, t + 500 * MS), vec![Life::Respawn { slot: 0, gen: 1 }]);
    }

    #[test]
    fn gives_up_only_when_every_kept_slot_failed_max_times() {
        let t = Instant::now();
        let one_bad = reconcile(&[slot(false, 3), slot(true, 2)], 3, false, t);
        assert_eq!(one_bad, vec![Life::Respawn { slot: 0, gen: 1 }, Life::Settled(1)], "one bad slot stops nobody");
        assert_eq!(reconcile(&[slot(false, 3), slot(false, 4)], 3, false, t), vec![Life::GiveUp]);
        // A retiring slot's failures do not count, nor does it keep the others going.
        let retiring = SlotFacts { retiring: true, ..slot(false, 0) };
        assert_eq!(reconcile(&[slot(false, 3), retiring], 3, false, t), vec![Life::GiveUp]);
        assert!(reconcile(&[slot(false, 3)], 3, true, t).is_empty(), "nothing while stopping");
    }

    #[test]
    fn rescale_keeps_a_retiring_slot_first_then_adds_and_retires_the_highest() {
        assert_eq!(rescale(&[false, false], 2), None);
        assert_eq!(rescale(&[false, false], 3), Some(Resize::Add));
        assert_eq!(rescale(&[false, true, true], 2), Some(Resize::Keep(1)));
        assert_eq!(rescale(&[false, true, true], 3), Some(Resize::Keep(1)));
        assert_eq!(rescale(&[false, false, false], 1), Some(Resize::Retire(2)));
        assert_eq!(rescale(&[false, false, true], 1), Some(Resize::Retire(1)));
    }

    #[test]
    fn a_retired_slot_closes_once_settled_empty_and_without_workers() {
        let t = Instant::now();
        assert!(!may_close(None, t, false, false), "steering has not surely left it out");
        assert!(!may_close(Some(t), t + 999 * MS, false, false));
        assert!(may_close(Some(t), t + SETTLE, false, false));
        assert!(!may_close(Some(t), t + SETTLE, true, false), "a worker is still there");
        assert!(!may_close(Some(t), t + SETTLE, false, true), "connections wait");
    }
}
