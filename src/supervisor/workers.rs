//! The supervisor's tables: every live worker ([`Workers`], keyed by [`WorkerId`]) with its
//! [`State`], and every slot's own record ([`Slot`]: generation, backoff, start failures, and
//! what routing and readiness keep per slot), in [`Slots`], where adding or removing a slot is
//! one push or pop.
//!
//! Questions about the workers of a slot are asked through the named queries here
//! (`ready_on`, `live_on`, `replacing`, `by_pid`, `ready_count`), so that each rule is written
//! once.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use nix::unistd::Pid;

use crate::event::WorkerId;
use crate::stall::SlotWatch;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum State {
    /// Started; ready at `ready_at` (a delay) or when it says or is seen so, failed at `deadline`.
    Starting {
        ready_at: Option<Instant>,
        deadline: Instant,
    },
    Ready,
    /// The stop signal was sent; SIGKILL at `kill_at` unless `killed` already.
    Stopping {
        kill_at: Instant,
        killed: bool,
    },
}

#[derive(Debug)]
pub struct Worker {
    pub slot: usize,
    pub gen: u64,
    pub pid: Pid,
    pub started: Instant,
    pub state: State,
    /// Started by a roll and not yet ready: it does not own its slot yet.
    pub candidate: bool,
    pub was_ready: bool,
    /// With --watchdog: restart unless a WATCHDOG=1 arrives before this (armed once ready).
    pub watchdog_at: Option<Instant>,
    /// Stopped because it failed (`ready-timeout`, `watchdog`) or is replaced (`memory`): its
    /// exit counts as a restart of its slot for that cause; a failure counts like a crash.
    pub fault: Option<&'static str>,
}

impl Worker {
    pub fn new(slot: usize, gen: u64, pid: Pid, started: Instant, state: State, candidate: bool) -> Worker {
        Worker { slot, gen, pid, started, state, candidate, was_ready: false, watchdog_at: None, fault: None }
    }

    pub fn is_stopping(&self) -> bool {
        matches!(self.state, State::Stopping { .. })
    }

    /// `worker 2 (pid 123, gen 4)`, as every log line names a worker.
    pub fn label(&self) -> String {
        format!("worker {} (pid {}, gen {})", self.slot, self.pid, self.gen)
    }
}

/// One slot's record: everything the loop keeps per slot, so that growing or shrinking the table
/// is one push or pop ([`Slots`]). Its listening sockets are not here but in
/// `socket::Listeners`: in `shared` and `round-robin` modes every slot uses the same sockets,
/// and the one type that holds every listening socket for the launcher's whole life (dropped
/// only when `main` returns) is what keeps a queue from ever closing with a slot's record.
#[derive(Debug, Default)]
pub struct Slot {
    pub gen: u64,
    /// Workers replaced other than by a roll, by cause (`crash`, `ready-timeout`, ...).
    pub restarts: std::collections::BTreeMap<&'static str, u64>,
    /// How the slot's last worker ended.
    pub last_exit: Option<String>,
    /// Being removed by a scale-down since then: no respawn, no new connections.
    pub retiring: Option<Instant>,
    /// Since when steering has kept new connections away from it for sure (a program that
    /// leaves it out is attached, or the forwarder leaves it out): what a retiring slot's
    /// settle time counts from.
    pub excluded_at: Option<Instant>,
    pub quick_deaths: u32,
    pub start_failures: u32,
    /// When to start the slot's next worker, once it has none (None: at once).
    pub respawn_at: Option<Instant>,
    pub last_failure: String,
    /// What routing keeps for the slot: its load, stall record, rescue (see `routing`).
    pub route: SlotRoute,
    /// `--ready auto`: the slot's socket inodes (None: /proc cannot tell; then for every slot).
    pub inodes: Option<Vec<u64>>,
}

/// What routing keeps in each slot's record (see `routing`, `sampling`).
#[derive(Debug, Clone)]
pub struct SlotRoute {
    /// The slot's load at the last sample (`--steer least-loaded`: see `load`).
    pub load: Option<u32>,
    /// The stall watch's record of the slot (see `stall`).
    pub stall: SlotWatch,
    /// Its queue is being taken back and relayed (`rescue`).
    pub rescued: bool,
}

impl Default for SlotRoute {
    fn default() -> SlotRoute {
        SlotRoute { load: None, stall: SlotWatch::new(), rescued: false }
    }
}

/// Every slot's record, by slot number.
#[derive(Debug, Default)]
pub struct Slots(Vec<Slot>);

impl Slots {
    /// The slots at start: as many as sockets (or -n), those beyond the desired count retiring,
    /// each with its socket inodes for `--ready auto` (none for any when /proc cannot tell).
    pub fn at_start(cfg: &crate::cli::Config, listeners: &crate::socket::Listeners, n: usize, desired: usize) -> Slots {
        let now = Instant::now();
        let inodes = match cfg.ready {
            crate::cli::Ready::Auto(delay) => {
                let inodes: std::io::Result<Vec<Vec<u64>>> =
                    (0..n).map(|s| crate::readiness::socket_inodes(&listeners.fds_for_slot(s))).collect();
                inodes
                    .map_err(|e| {
                        log::warn!("--ready auto cannot name the sockets ({e}); using --ready-delay {delay:?}")
                    })
                    .ok()
            }
            _ => None,
        };
        let mut inodes = inodes.map(|i| i.into_iter().map(Some).collect::<Vec<_>>()).unwrap_or_else(|| vec![None; n]);
        Slots(
            (0..n)
                .map(|s| Slot {
                    gen: 1,
                    retiring: (s >= desired).then_some(now),
                    inodes: inodes[s].take(),
                    ..Slot::default()
                })
                .collect(),
        )
    }

    /// A slot added at the end (`scale` up).
    pub fn push(&mut self, slot: Slot) {
        self.0.push(slot);
    }

    /// The last slot removed (its sockets closed).
    pub fn pop(&mut self) -> Option<Slot> {
        self.0.pop()
    }

    /// `n` slots (a resumed state's count in shared or self mode, where the slots share the
    /// sockets: a new one has the first one's inodes).
    pub fn resize(&mut self, n: usize) {
        let inodes = self.0.first().and_then(|s| s.inodes.clone());
        self.0.resize_with(n, || Slot { inodes: inodes.clone(), ..Slot::default() });
    }

    /// The slots that are not retiring.
    pub fn kept(&self) -> usize {
        self.0.iter().filter(|s| s.retiring.is_none()).count()
    }

    /// The newest generation of any slot (1 before any roll).
    pub fn gen(&self) -> u64 {
        self.0.iter().map(|s| s.gen).max().unwrap_or(1)
    }

    /// `--ready auto` can tell from /proc which sockets are each slot's (every slot's inodes
    /// are known, or none are: `forget_inodes` drops them all).
    pub fn inodes_known(&self) -> bool {
        !self.0.is_empty() && self.0.iter().all(|s| s.inodes.is_some())
    }

    /// /proc cannot tell: every slot falls back to the delay.
    pub fn forget_inodes(&mut self) {
        self.0.iter_mut().for_each(|s| s.inodes = None);
    }
}

impl std::ops::Deref for Slots {
    type Target = [Slot];
    fn deref(&self) -> &[Slot] {
        &self.0
    }
}

impl std::ops::DerefMut for Slots {
    fn deref_mut(&mut self) -> &mut [Slot] {
        &mut self.0
    }
}

/// Every worker the launcher has started and not yet reaped.
#[derive(Debug, Default)]
pub struct Workers {
    map: BTreeMap<WorkerId, Worker>,
    /// The same workers by (slot, id): the per-slot queries cost the slot's workers, not every
    /// worker (they run for every slot at every turn: at 1,024 slots a scan each was quadratic).
    /// A worker's slot never changes once inserted.
    by_slot: BTreeSet<(usize, WorkerId)>,
    next_id: WorkerId,
}

impl Workers {
    /// The id the next inserted worker gets (ids are never reused).
    pub fn next_id(&self) -> WorkerId {
        self.next_id + 1
    }

    pub fn insert(&mut self, w: Worker) -> WorkerId {
        self.next_id += 1;
        self.by_slot.insert((w.slot, self.next_id));
        self.map.insert(self.next_id, w);
        self.next_id
    }

    /// Put back a worker with its old id (`reexec`); later ids start after `next`.
    pub fn restore(&mut self, id: WorkerId, w: Worker, next: WorkerId) {
        self.remove(id);
        self.by_slot.insert((w.slot, id));
        self.map.insert(id, w);
        self.next_id = self.next_id.max(next.saturating_sub(1)).max(id);
    }

    pub fn get(&self, id: WorkerId) -> Option<&Worker> {
        self.map.get(&id)
    }

    pub fn get_mut(&mut self, id: WorkerId) -> Option<&mut Worker> {
        self.map.get_mut(&id)
    }

    pub fn remove(&mut self, id: WorkerId) -> Option<Worker> {
        let w = self.map.remove(&id)?;
        self.by_slot.remove(&(w.slot, id));
        Some(w)
    }

    pub fn take_all(&mut self) -> BTreeMap<WorkerId, Worker> {
        self.by_slot.clear();
        std::mem::take(&mut self.map)
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = (WorkerId, &Worker)> {
        self.map.iter().map(|(id, w)| (*id, w))
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = (WorkerId, &mut Worker)> {
        self.map.iter_mut().map(|(id, w)| (*id, w))
    }

    pub fn ids(&self) -> Vec<WorkerId> {
        self.map.keys().copied().collect()
    }

    /// The worker whose main process is `pid`.
    pub fn by_pid(&self, pid: Pid) -> Option<WorkerId> {
        self.iter().find(|(_, w)| w.pid == pid).map(|(id, _)| id)
    }

    /// The workers of `slot`, in id order.
    pub fn on(&self, slot: usize) -> impl Iterator<Item = (WorkerId, &Worker)> {
        self.by_slot.range((slot, 0)..=(slot, WorkerId::MAX)).filter_map(|(_, id)| Some((*id, self.map.get(id)?)))
    }

    /// `slot` has a ready worker.
    pub fn ready_on(&self, slot: usize) -> bool {
        self.on(slot).any(|(_, w)| w.state == State::Ready)
    }

    /// `slot`'s ready worker, for log lines.
    pub fn ready_label(&self, slot: usize) -> Option<String> {
        self.on(slot).find(|(_, w)| w.state == State::Ready).map(|(_, w)| w.label())
    }

    /// `slot` has a worker that is not stopping (starting or ready): it needs no respawn.
    pub fn live_on(&self, slot: usize) -> bool {
        self.on(slot).any(|(_, w)| !w.is_stopping())
    }

    /// `slot` is being replaced: a roll's new worker is starting there, or an old one drains.
    pub fn replacing(&self, slot: usize) -> bool {
        self.on(slot).any(|(_, w)| w.candidate || w.is_stopping())
    }

    /// `slot` has a worker that was told to stop and has not exited yet.
    pub fn draining(&self, slot: usize) -> bool {
        self.on(slot).any(|(_, w)| w.is_stopping())
    }

    /// Workers that own their slot and are ready.
    pub fn ready_count(&self) -> usize {
        self.iter().filter(|(_, w)| w.state == State::Ready && !w.candidate).count()
    }

    /// Starting workers that are neither on a delay nor known ready: the ones to probe.
    pub fn awaiting_probe(&self) -> impl Iterator<Item = (WorkerId, &Worker)> {
        self.iter().filter(|(_, w)| matches!(w.state, State::Starting { ready_at: None, .. }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn named_queries() {
        let now = Instant::now();
        let starting = State::Starting { ready_at: None, deadline: now + Duration::from_secs(1) };
        let mut t = Workers::default();
        let a = t.insert(Worker::new(0, 1, Pid::from_raw(10), now, State::Ready, false));
        let b = t.insert(Worker::new(0, 2, Pid::from_raw(11), now, starting, true));
        let c =
            t.insert(Worker::new(1, 1, Pid::from_raw(12), now, State::Stopping { kill_at: now, killed: false }, false));
        assert_eq!((a, b, c), (1, 2, 3));
        assert_eq!(t.next_id(), 4);
        assert_eq!(t.by_pid(Pid::from_raw(11)), Some(b));
        assert_eq!(t.by_pid(Pid::from_raw(99)), None);
        assert!(t.ready_on(0) && !t.ready_on(1));
        assert!(t.live_on(0) && !t.live_on(1) && !t.live_on(2));
        assert!(t.replacing(0) && t.replacing(1) && !t.replacing(2));
        assert_eq!(t.ready_count(), 1);
        assert_eq!(t.awaiting_probe().map(|(id, _)| id).collect::<Vec<_>>(), vec![b]);
        assert_eq!(t.ready_label(0).unwrap(), "worker 0 (pid 10, gen 1)");
        assert_eq!(t.on(0).map(|(id, _)| id).collect::<Vec<_>>(), vec![a, b]);
        t.remove(a);
        assert_eq!(t.on(0).map(|(id, _)| id).collect::<Vec<_>>(), vec![b]);
        assert!(!t.ready_on(0) && t.on(5).next().is_none());
        t.take_all();
        assert!(t.on(0).next().is_none() && t.on(1).next().is_none());
    }
}
