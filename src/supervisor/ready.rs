//! Readiness and rolls: when a starting worker becomes ready (a delay, `READY=1`, or seen
//! waiting on its socket with `--ready auto`), when it has failed to (ready timeout, missed
//! watchdog), and carrying out the [`Roll`](crate::roll::Roll) machine's actions.
//!
//! Make-before-break is enforced here: a roll's new worker starts as a *candidate* that does
//! not own its slot; only `Action::Retire`, which the machine emits once that worker is ready,
//! stops the slot's older workers.

use std::time::{Duration, Instant};

use super::os::Os;
use super::workers::State;
use super::Supervisor;
use crate::cli::Ready;
use crate::event::WorkerId;
use crate::readiness;
use crate::roll::{Action, Input};

impl<O: Os> Supervisor<O> {
    /// The timers of starting and ready workers: ready after a delay, ready timeouts, missed
    /// watchdogs, and `--ready auto` probes.
    pub(super) fn fire_timers(&mut self, now: Instant) {
        let mut due_ready = Vec::new();
        let mut timed_out = Vec::new();
        let mut missed = Vec::new();
        for (id, w) in self.workers.iter_mut() {
            if w.state == State::Ready && w.watchdog_at.is_some_and(|at| now >= at) {
                w.watchdog_at = None;
                missed.push(id);
            }
            match w.state {
                State::Starting { ready_at: Some(at), .. } if now >= at => due_ready.push(id),
                State::Starting { deadline, .. } if now >= deadline && !w.candidate => timed_out.push(id),
                _ => {}
            }
        }
        due_ready.extend(self.probe_starting(now));
        for id in due_ready {
            self.mark_ready(id, now);
        }
        for id in timed_out {
            if let Some(w) = self.workers.get(id) {
                log::warn!("{} not ready within {:?}; stopping it", w.label(), self.cfg.ready_timeout);
            }
            self.stop_faulty(id, "ready-timeout", now);
        }
        for id in missed {
            if let (Some(w), Some(every)) = (self.workers.get(id), self.cfg.watchdog) {
                log::warn!("{} sent no WATCHDOG=1 for {every:?}; restarting it", w.label());
            }
            self.stop_faulty(id, "watchdog", now);
        }
    }

    /// A WATCHDOG=1 from worker `id`: its next deadline moves on (once armed).
    pub(super) fn feed_watchdog(&mut self, id: WorkerId, now: Instant) {
        if let (Some(w), Some(every)) = (self.workers.get_mut(id), self.cfg.watchdog) {
            if w.watchdog_at.is_some() {
                w.watchdog_at = Some(now + every);
            }
        }
    }

    /// --ready auto: the starting workers that /proc shows waiting for connections on their
    /// slot's socket. Where /proc cannot tell, fall back to --ready-delay (said once).
    fn probe_starting(&mut self, now: Instant) -> Vec<WorkerId> {
        const EVERY: Duration = Duration::from_millis(50);
        let Ready::Auto(delay) = self.cfg.ready else { return Vec::new() };
        if !self.slots.inodes_known() || self.watches.next_probe.is_some_and(|at| now < at) {
            return Vec::new();
        }
        let starting: Vec<(WorkerId, i32, usize)> =
            self.workers.awaiting_probe().map(|(id, w)| (id, w.pid.as_raw(), w.slot)).collect();
        self.watches.next_probe = if starting.is_empty() { None } else { Some(now + EVERY) };
        let groups = readiness::groups_members(&starting.iter().map(|s| s.1).collect::<Vec<_>>());
        let mut ready = Vec::new();
        let mut unknown = None;
        for ((id, _, slot), pids) in starting.iter().zip(groups) {
            match readiness::probe(&pids, self.slots[*slot].inodes.as_deref().unwrap_or_default()) {
                readiness::Probe::Waiting(evidence) => {
                    log::debug!("worker {slot} is waiting for connections: {evidence}");
                    ready.push(*id);
                }
                readiness::Probe::NotYet => {}
                readiness::Probe::Unknown(why) => unknown = Some(why),
            }
        }
        if let Some(why) = unknown {
            log::warn!("--ready auto: /proc cannot tell ({why}); using --ready-delay {delay:?} instead");
            self.slots.forget_inodes();
            self.watches.next_probe = None;
            for (_, w) in self.workers.iter_mut() {
                if let State::Starting { ready_at: ready_at @ None, .. } = &mut w.state {
                    *ready_at = Some(w.started + delay);
                }
            }
        }
        ready
    }

    /// When the next `--ready auto` probe is due (None: nobody to probe).
    pub(super) fn next_probe(&self) -> Option<Instant> {
        match self.cfg.ready {
            Ready::Auto(_) if self.slots.inodes_known() => {
                self.workers.awaiting_probe().next().map(|_| self.watches.next_probe.unwrap_or_else(Instant::now))
            }
            _ => None,
        }
    }

    pub(super) fn mark_ready(&mut self, id: WorkerId, now: Instant) {
        let Some(w) = self.workers.get_mut(id) else { return };
        if !matches!(w.state, State::Starting { .. }) {
            return;
        }
        w.state = State::Ready;
        w.was_ready = true;
        w.watchdog_at = self.cfg.watchdog.map(|every| now + every);
        log::info!("{} ready after {:.2?}", w.label(), now.saturating_duration_since(w.started));
        if !w.candidate {
            self.slots[w.slot].start_failures = 0;
        }
        let actions = self.roll.step(Input::Ready(id), now);
        self.apply(actions, now);
        self.replacement_ready(id, now);
    }

    /// Once, when every slot first has a ready worker and new connections are routed to them
    /// all: the log line, and READY=1 to the service manager.
    pub(super) fn announce_ready(&mut self) {
        if !self.publishing.all_ready_logged && self.workers.ready_count() == self.scaling.desired {
            self.publishing.all_ready_logged = true;
            log::info!("all {} workers ready", self.scaling.desired);
            self.publishing.reporter.ready();
        }
    }

    /// A roll was asked for (USR2, HUP).
    pub(super) fn request_roll(&mut self, name: &str, now: Instant) {
        if self.halt.shutdown.is_some() {
            return;
        }
        match self.roll.rolling_gen() {
            Some(g) => log::info!("{name}: roll gen {g} under way; one more roll will follow it"),
            None => log::info!("{name}: rolling restart"),
        }
        let actions = self.roll.step(Input::Request, now);
        if actions.iter().any(|a| matches!(a, Action::Spawn { .. })) {
            self.publishing.reporter.reloading();
        }
        self.apply(actions, now);
    }

    /// Carry out the roll machine's actions (answering each Spawn at once).
    pub(super) fn apply(&mut self, actions: Vec<Action>, now: Instant) {
        for action in actions {
            match action {
                Action::Spawn { slot, gen } => {
                    log::info!("roll gen {gen}: starting a new worker for slot {slot}");
                    let answer = match self.spawn(slot, gen, true, now) {
                        Ok(id) => Input::Spawned(id),
                        Err(e) => Input::SpawnFailed(e.to_string()),
                    };
                    let next = self.roll.step(answer, now);
                    self.apply(next, now);
                }
                Action::Retire { slot, gen, worker, done, of } => {
                    log::info!("roll gen {gen}: slot {slot} ready ({done}/{of})");
                    if let Some(w) = self.workers.get_mut(worker) {
                        w.candidate = false;
                    }
                    self.slots[slot].gen = gen;
                    self.slots[slot].start_failures = 0;
                    let old: Vec<WorkerId> =
                        self.workers.on(slot).map(|(id, _)| id).filter(|id| *id != worker).collect();
                    for id in old {
                        self.stop(id, now);
                    }
                }
                Action::Stop(id) => self.stop(id, now),
                Action::Finished { gen } => {
                    log::info!("roll gen {gen} done: all {} slots run gen {gen}", self.slots.len());
                    self.publishing.reporter.reloaded();
                }
                Action::Abandoned { gen, slot, reason } => {
                    log::warn!("roll gen {gen} abandoned at slot {slot}: {reason}; the older workers keep serving");
                    self.publishing.reporter.reloaded();
                }
            }
        }
    }
}
