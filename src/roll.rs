//! The rolling-restart state machine: pure, `(state, input, now) -> actions`, no processes.
//!
//! Guarantees (also in the README):
//! - One slot at a time, in slot order. For each slot a new worker of the new generation is
//!   started on the slot's own socket(s); only when it is ready are the slot's older workers
//!   told to stop. Old and new share the slot's socket while both live, so nothing is refused.
//! - Only one roll runs at a time. A request during a roll is remembered (several coalesce into
//!   one) and starts one more roll when the current one ends.
//! - If the new worker exits, cannot be started, or is not ready within the ready timeout, the
//!   roll is abandoned: the new worker is stopped, the old one keeps serving, the reason is
//!   reported. Slots already rolled keep their new workers.
//! - The generation counts rolls: each roll takes the next number. Crash respawns are not the
//!   business of this machine; the supervisor respawns a slot with the slot's own generation.
//!
//! The supervisor feeds [`Input`]s and carries out the [`Action`]s; `Spawn` must be answered at
//! once with `Spawned` or `SpawnFailed`.

use std::time::{Duration, Instant};

use crate::event::WorkerId;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// A rolling restart was asked for (USR2 or HUP).
    Request,
    /// The worker asked for by the last `Spawn` is running.
    Spawned(WorkerId),
    /// The worker asked for by the last `Spawn` could not be started.
    SpawnFailed(String),
    /// A worker became ready.
    Ready(WorkerId),
    /// A worker exited; `how` describes the exit for the log.
    Exited { worker: WorkerId, how: String },
    /// Time has passed: check the ready deadline.
    Tick,
    /// The launcher is stopping: drop the roll and any pending request.
    Cancel,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Start a worker of generation `gen` on `slot`, then answer with Spawned/SpawnFailed.
    Spawn { slot: usize, gen: u64 },
    /// `worker`, of generation `gen`, is ready on `slot`: stop the slot's other workers.
    Retire { slot: usize, gen: u64, worker: WorkerId, done: usize, of: usize },
    /// Stop this new worker: it will not take over its slot.
    Stop(WorkerId),
    /// Every slot runs generation `gen`.
    Finished { gen: u64 },
    /// The roll to `gen` stopped at `slot`; older workers keep serving there and after.
    Abandoned { gen: u64, slot: usize, reason: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// A Spawn action is out; the answer comes next.
    Spawning,
    /// The new worker runs; waiting for it to be ready.
    Waiting { worker: WorkerId, deadline: Instant },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Active {
    gen: u64,
    slot: usize,
    phase: Phase,
}

/// What `reexec` carries over of the machine (see [`Roll::export`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Saved {
    pub gen: u64,
    pub active: Option<SavedRoll>,
    pub pending: bool,
}

/// A roll under way: its generation, its slot, and its new worker with its ready deadline once
/// spawned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SavedRoll {
    pub gen: u64,
    pub slot: usize,
    pub waiting: Option<(WorkerId, Instant)>,
}

#[derive(Debug)]
pub struct Roll {
    slots: usize,
    ready_timeout: Duration,
    /// The highest generation handed out so far (the launcher starts at 1).
    gen: u64,
    active: Option<Active>,
    pending: bool,
}

impl Roll {
    pub fn new(slots: usize, ready_timeout: Duration) -> Roll {
        Roll { slots, ready_timeout, gen: 1, active: None, pending: false }
    }

    /// The generation of the roll under way, if any.
    pub fn rolling_gen(&self) -> Option<u64> {
        self.active.map(|a| a.gen)
    }

    /// The roll under way: its generation, the slots done, the slots in all.
    pub fn progress(&self) -> Option<(u64, usize, usize)> {
        self.active.map(|a| (a.gen, a.slot, self.slots))
    }

    /// What `reexec` carries over: the highest generation, the roll under way (generation,
    /// slot, and its new worker with its deadline once spawned), and a pending request.
    pub fn export(&self) -> Saved {
        let active = self.active.map(|a| SavedRoll {
            gen: a.gen,
            slot: a.slot,
            waiting: match a.phase {
                Phase::Waiting { worker, deadline } => Some((worker, deadline)),
                Phase::Spawning => None,
            },
        });
        Saved { gen: self.gen, active, pending: self.pending }
    }

    /// The inverse of [`export`](Self::export), in the new image. A roll caught between its
    /// Spawn and the answer (it cannot be: the loop answers at once) resumes waiting.
    pub fn import(&mut self, saved: Saved) {
        self.gen = saved.gen;
        self.pending = saved.pending;
        self.active = saved.active.map(|a| Active {
            gen: a.gen,
            slot: a.slot,
            phase: match a.waiting {
                Some((worker, deadline)) => Phase::Waiting { worker, deadline },
                None => Phase::Spawning,
            },
        });
    }

    /// A request is waiting for the roll under way to end.
    pub fn pending(&self) -> bool {
        self.pending
    }

    /// The number of slots the next roll goes through (`scale`); only between rolls.
    pub fn set_slots(&mut self, slots: usize) {
        debug_assert!(self.active.is_none() || self.slots == slots, "the slot count changed during a roll");
        if self.active.is_none() {
            self.slots = slots;
        }
    }

    /// When a `Tick` may change something.
    pub fn deadline(&self) -> Option<Instant> {
        match self.active?.phase {
            Phase::Waiting { deadline, .. } => Some(deadline),
            Phase::Spawning => None,
        }
    }

    pub fn step(&mut self, input: Input, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        match (input, self.active) {
            (Input::Cancel, _) => {
                self.active = None;
                self.pending = false;
            }
            (Input::Request, Some(_)) => self.pending = true,
            (Input::Request, None) => self.start(&mut out),
            (Input::Spawned(worker), Some(a @ Active { phase: Phase::Spawning, .. })) => {
                let deadline = now + self.ready_timeout;
                self.active = Some(Active { phase: Phase::Waiting { worker, deadline }, ..a });
            }
            (Input::SpawnFailed(reason), Some(a @ Active { phase: Phase::Spawning, .. })) => {
                self.abandon(a, format!("cannot start the new worker: {reason}"), &mut out);
            }
            (Input::Ready(w), Some(a @ Active { phase: Phase::Waiting { worker, .. }, .. })) if w == worker => {
                out.push(Action::Retire { slot: a.slot, gen: a.gen, worker, done: a.slot + 1, of: self.slots });
                if a.slot + 1 < self.slots {
                    self.active = Some(Active { gen: a.gen, slot: a.slot + 1, phase: Phase::Spawning });
                    out.push(Action::Spawn { slot: a.slot + 1, gen: a.gen });
                } else {
                    self.active = None;
                    out.push(Action::Finished { gen: a.gen });
                    self.start_pending(&mut out);
                }
            }
            (Input::Exited { worker: w, how }, Some(a @ Active { phase: Phase::Waiting { worker, .. }, .. }))
                if w == worker =>
            {
                self.abandon(a, format!("the new worker {how} before it was ready"), &mut out);
            }
            (Input::Tick, Some(a @ Active { phase: Phase::Waiting { worker, deadline }, .. })) if now >= deadline => {
                out.push(Action::Stop(worker));
                let reason = format!("the new worker was not ready within {:?}", self.ready_timeout);
                self.abandon(a, reason, &mut out);
            }
            _ => {}
        }
        out
    }

    fn start(&mut self, out: &mut Vec<Action>) {
        self.gen += 1;
        self.active = Some(Active { gen: self.gen, slot: 0, phase: Phase::Spawning });
        out.push(Action::Spawn { slot: 0, gen: self.gen });
    }

    fn start_pending(&mut self, out: &mut Vec<Action>) {
        if std::mem::take(&mut self.pending) {
            self.start(out);
        }
    }

    fn abandon(&mut self, a: Active, reason: String, out: &mut Vec<Action>) {
        self.active = None;
        out.push(Action::Abandoned { gen: a.gen, slot: a.slot, reason });
        self.start_pending(out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(10);

    fn spawned(r: &mut Roll, id: WorkerId, now: Instant) {
        assert!(r.step(Input::Spawned(id), now).is_empty());
    }

    #[test]
    fn rolls_slot_by_slot_and_retires_only_after_ready() {
        let now = Instant::now();
        let mut r = Roll::new(3, T);
        assert_eq!(r.step(Input::Request, now), vec![Action::Spawn { slot: 0, gen: 2 }]);
        spawned(&mut r, 10, now);
        // Another worker's readiness or exit changes nothing.
        assert!(r.step(Input::Ready(99), now).is_empty());
        assert!(r.step(Input::Exited { worker: 98, how: "x".into() }, now).is_empty());
        assert_eq!(
            r.step(Input::Ready(10), now),
            vec![Action::Retire { slot: 0, gen: 2, worker: 10, done: 1, of: 3 }, Action::Spawn { slot: 1, gen: 2 }]
        );
        spawned(&mut r, 11, now);
        assert_eq!(r.step(Input::Ready(11), now)[1], Action::Spawn { slot: 2, gen: 2 });
        spawned(&mut r, 12, now);
        assert_eq!(
            r.step(Input::Ready(12), now),
            vec![Action::Retire { slot: 2, gen: 2, worker: 12, done: 3, of: 3 }, Action::Finished { gen: 2 }]
        );
        assert_eq!(r.rolling_gen(), None);
    }

    #[test]
    fn requests_during_a_roll_coalesce_into_one_more() {
        let now = Instant::now();
        let mut r = Roll::new(1, T);
        r.step(Input::Request, now);
        spawned(&mut r, 1, now);
        assert!(r.step(Input::Request, now).is_empty());
        assert!(r.step(Input::Request, now).is_empty());
        assert_eq!(
            r.step(Input::Ready(1), now),
            vec![
                Action::Retire { slot: 0, gen: 2, worker: 1, done: 1, of: 1 },
                Action::Finished { gen: 2 },
                Action::Spawn { slot: 0, gen: 3 }
            ]
        );
        spawned(&mut r, 2, now);
        assert_eq!(r.step(Input::Ready(2), now).last(), Some(&Action::Finished { gen: 3 }));
        assert_eq!(r.rolling_gen(), None);
    }

    #[test]
    fn new_worker_dying_abandons_and_keeps_old() {
        let now = Instant::now();
        let mut r = Roll::new(2, T);
        r.step(Input::Request, now);
        spawned(&mut r, 5, now);
        let out = r.step(Input::Exited { worker: 5, how: "exited with status 1".into() }, now);
        assert_eq!(out.len(), 1);
        match &out[0] {
            Action::Abandoned { gen: 2, slot: 0, reason } => assert!(reason.contains("status 1"), "{reason}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(r.rolling_gen(), None);
        // The next roll gets a new generation.
        assert_eq!(r.step(Input::Request, now), vec![Action::Spawn { slot: 0, gen: 3 }]);
    }

    #[test]
    fn ready_timeout_stops_the_new_worker() {
        let now = Instant::now();
        let mut r = Roll::new(2, T);
        r.step(Input::Request, now);
        spawned(&mut r, 7, now);
        assert_eq!(r.deadline(), Some(now + T));
        assert!(r.step(Input::Tick, now + T - Duration::from_millis(1)).is_empty());
        let out = r.step(Input::Tick, now + T);
        assert_eq!(out[0], Action::Stop(7));
        assert!(matches!(out[1], Action::Abandoned { gen: 2, slot: 0, .. }));
        assert_eq!(r.deadline(), None);
    }

    #[test]
    fn spawn_failure_abandons_and_runs_pending() {
        let now = Instant::now();
        let mut r = Roll::new(2, T);
        r.step(Input::Request, now);
        r.step(Input::Request, now);
        let out = r.step(Input::SpawnFailed("no such file".into()), now);
        assert!(matches!(&out[0], Action::Abandoned { gen: 2, reason, .. } if reason.contains("no such file")));
        assert_eq!(out[1], Action::Spawn { slot: 0, gen: 3 });
    }

    #[test]
    fn cancel_drops_everything() {
        let now = Instant::now();
        let mut r = Roll::new(2, T);
        r.step(Input::Request, now);
        spawned(&mut r, 1, now);
        r.step(Input::Request, now);
        r.step(Input::Cancel, now);
        assert_eq!(r.rolling_gen(), None);
        assert!(r.step(Input::Ready(1), now).is_empty());
    }
}
