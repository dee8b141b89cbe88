//! `reexec` from the supervisor's side: what it hands over ([`State`], and the fds to keep),
//! and going on from it in the new image. The mechanics of the exec are `crate::reexec`'s.
//!
//! Refused while the launcher stops, in round-robin mode (the forwarder's connections live in
//! threads an exec ends) and while connections are being relayed from a stalled slot (the same);
//! say so, and the operator tries again. A roll under way, backoffs, deadlines, restart counts
//! and memory and hung replacements are carried over.

use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::time::Instant;

use nix::unistd::Pid;

use super::os::Os;
use super::workers::{Slot, State as Phase, Worker};
use super::Supervisor;
use crate::error::Error;
use crate::event::{WorkerId, HANDLED};
use crate::reexec::{
    self, at_ms, ms_from, LogPipe, Replacement, RollState, SentinelState, SlotState, State, WorkerFd, WorkerPhase,
    WorkerState,
};
use crate::roll::{Saved, SavedRoll};
use crate::socket::Mode;

/// Causes and faults are the supervisor's static words; an unknown one (a newer image's) reads
/// as `crash`.
fn cause(word: &str) -> &'static str {
    ["crash", "ready-timeout", "watchdog", "memory", "hung"].into_iter().find(|c| *c == word).unwrap_or("crash")
}

impl<O: Os> Supervisor<O> {
    /// First step: may it be done, and with which binary?
    pub(super) fn reexec_check(&self) -> Result<(String, String), String> {
        if self.halt.stopping() {
            return Err("the launcher is stopping".into());
        }
        if self.listeners.mode() == Mode::RoundRobin {
            return Err("not in round-robin mode: the forwarder's connections would be cut".into());
        }
        let carrying = self.router.carrying();
        if self.slots.iter().any(|s| s.route.rescued) || carrying > 0 {
            return Err(format!(
                "connections taken back from a stalled slot are being relayed ({carrying} open); try again"
            ));
        }
        let path = reexec::own_path().ok_or("cannot tell which binary the launcher was started from")?;
        let version = reexec::check_binary(&path)?;
        Ok((path.display().to_string(), version))
    }

    /// Second step: exec. Returns only if it failed; then everything runs on as before.
    pub(super) fn reexec_now(&mut self, now: Instant) -> String {
        let (path, version) = match self.reexec_check() {
            Ok(p) => p,
            Err(e) => return e,
        };
        // The interceptor's thread answers the call it may be reading, and stops: a call read
        // and not answered would be lost with the thread; calls not read wait for the new image.
        if let Some(i) = &mut self.intercept.interceptor {
            i.pause();
        }
        let (state, keep) = self.capture(now);
        log::info!("reexec: {path} ({version}) takes over, pid {} and every worker stay", std::process::id());
        let err = reexec::exec(std::path::Path::new(&path), &state, &keep, &HANDLED);
        log::error!("{err}; the launcher runs on");
        if let Some(Err(e)) = self.intercept.interceptor.as_mut().map(|i| i.resume()) {
            log::error!("cannot restart the bind() interceptor after the failed reexec: {e}");
        }
        err.to_string()
    }

    /// The supervisor's state, and every fd it names.
    fn capture(&self, now: Instant) -> (State, Vec<RawFd>) {
        let saved = self.roll.export();
        let slots = self
            .slots
            .iter()
            .map(|s| SlotState {
                gen: s.gen,
                quick_deaths: s.quick_deaths,
                start_failures: s.start_failures,
                respawn_ms: s.respawn_at.map(|t| ms_from(now, t)),
                retiring_ms: s.retiring.map(|t| ms_from(now, t)),
                last_failure: s.last_failure.clone(),
                last_exit: s.last_exit.clone(),
                restarts: s.restarts.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            })
            .collect();
        let workers = self.workers.iter().map(|(id, w)| worker_state(id, w, now)).collect();
        let worker_fds = |fds: Vec<(u64, RawFd)>| fds.into_iter().map(|(worker, fd)| WorkerFd { worker, fd }).collect();
        let notify: Vec<WorkerFd> = worker_fds(self.channels.notify.as_ref().map(|n| n.fds()).unwrap_or_default());
        let intercept: Vec<WorkerFd> =
            worker_fds(self.intercept.interceptor.as_ref().map(|i| i.fds()).unwrap_or_default());
        let listeners = self.listeners.parts();
        let mut keep: Vec<RawFd> = listeners.sockets.clone();
        keep.extend(notify.iter().chain(&intercept).map(|n| n.fd));
        let sentinel = self.guards.sentinel.as_ref().map(|s| SentinelState { pid: s.pid(), fd: s.pipe_fd() });
        keep.extend(sentinel.map(|s| s.fd));
        let logs: Vec<LogPipe> = crate::logs::handover()
            .into_iter()
            .map(|(fd, stderr, prefix)| LogPipe { fd, stderr, prefix: String::from_utf8_lossy(&prefix).into_owned() })
            .collect();
        keep.extend(logs.iter().map(|l| l.fd));
        let memory = self.watches.replacements.export();
        let memory = memory.into_iter().map(|(new, slot, old, cause)| Replacement { new, slot, old, cause }).collect();
        let state = State {
            desired: self.scaling.desired,
            next_id: self.workers.next_id(),
            all_ready_logged: self.publishing.all_ready_logged,
            roll_gen: saved.gen,
            roll_active: saved.active.map(|a| RollState {
                gen: a.gen,
                slot: a.slot,
                worker: a.waiting.map(|w| w.0),
                deadline_ms: a.waiting.map(|w| ms_from(now, w.1)),
            }),
            roll_pending: saved.pending,
            slots,
            workers,
            notify,
            intercept,
            memory,
            listeners,
            sentinel,
            logs,
            autoscale: self.autoscale_state(now),
        };
        (state, keep)
    }

    /// In the new image: everything but the workers from `Supervisor::new`, then the state.
    pub fn resume(&mut self, state: State, now: Instant) -> Result<(), Error> {
        self.scaling.desired = state.desired;
        self.publishing.all_ready_logged = state.all_ready_logged;
        let active = state.roll_active.map(|a| SavedRoll {
            gen: a.gen,
            slot: a.slot,
            waiting: a.worker.zip(a.deadline_ms).map(|(id, d)| (id, at_ms(now, d))),
        });
        let n = state.slots.len();
        if n != self.slots.len() {
            if self.listeners.slot_count().is_some() {
                return Err(Error::Failed(format!(
                    "cannot resume: {n} slots in the state, {} in the sockets",
                    self.slots.len()
                )));
            }
            // Shared and self modes: the slots share the sockets; -n was scaled since.
            self.slots.resize(n);
        }
        let kept = state.slots.iter().filter(|s| s.retiring_ms.is_none()).count();
        self.roll.set_slots(kept);
        self.roll.import(Saved { gen: state.roll_gen, active, pending: state.roll_pending });
        for (slot, s) in self.slots.iter_mut().zip(state.slots) {
            *slot = Slot {
                gen: s.gen,
                quick_deaths: s.quick_deaths,
                start_failures: s.start_failures,
                respawn_at: s.respawn_ms.map(|ms| at_ms(now, ms)),
                retiring: s.retiring_ms.map(|ms| at_ms(now, ms)),
                excluded_at: None,
                last_failure: s.last_failure,
                last_exit: s.last_exit,
                restarts: s.restarts.iter().map(|(k, v)| (cause(k), *v)).collect(),
                ..std::mem::take(slot)
            };
        }
        for w in &state.workers {
            self.workers.restore(w.id, worker_of(w, now), state.next_id);
        }
        self.adopt_fds(state.notify, state.intercept)?;
        let memory: Vec<_> = state.memory.into_iter().map(|r| (r.new, r.slot, r.old, r.cause)).collect();
        self.watches.replacements.restore(&memory);
        self.autoscale_resume(state.autoscale, now);
        for LogPipe { fd, stderr, prefix } in state.logs {
            crate::logs::adopt(fd, stderr, prefix.into_bytes());
        }
        // The old image's steering program is still attached to the groups: whatever this one
        // decides at its first turn replaces it.
        self.router.forget_program();
        log::info!(
            "resumed after reexec: {} workers in {} slots, generation {}",
            self.workers.len(),
            self.slots.len(),
            self.slots.gen()
        );
        Ok(())
    }

    /// The workers' notify sockets and seccomp notification fds the old image kept open.
    fn adopt_fds(&mut self, notify: Vec<WorkerFd>, intercept: Vec<WorkerFd>) -> Result<(), Error> {
        for WorkerFd { worker: id, fd } in notify {
            // SAFETY: the old image kept this fd open across the exec for worker `id`'s notify
            // socket; nothing else here owns it.
            let sock = unsafe { UnixDatagram::from_raw_fd(fd) };
            crate::sys::set_cloexec(&[fd], true);
            match &self.channels.notify {
                Some(hub) => {
                    hub.adopt(id, sock).map_err(|e| Error::Failed(format!("cannot resume notify socket: {e}")))?
                }
                None => drop(sock),
            }
        }
        for WorkerFd { worker: id, fd } in intercept {
            // SAFETY: the old image kept this fd open across the exec for worker `id`'s seccomp
            // notifications; nothing else here owns it.
            let notif = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
            crate::sys::set_cloexec(&[fd], true);
            match self.workers.get(id).map(|w| (w.label(), w.slot)) {
                Some((label, slot)) => self.intercept_adopt(id, label, slot, notif),
                None => drop(notif),
            }
        }
        Ok(())
    }
}

/// A worker as the state carries it, its times relative to `now`.
fn worker_state(id: WorkerId, w: &Worker, now: Instant) -> WorkerState {
    WorkerState {
        id,
        slot: w.slot,
        gen: w.gen,
        pid: w.pid.as_raw(),
        started_ms: ms_from(now, w.started),
        phase: match w.state {
            Phase::Starting { ready_at, deadline } => WorkerPhase::Starting {
                ready_ms: ready_at.map(|t| ms_from(now, t)),
                deadline_ms: ms_from(now, deadline),
            },
            Phase::Ready => WorkerPhase::Ready,
            Phase::Stopping { kill_at, killed } => WorkerPhase::Stopping { kill_ms: ms_from(now, kill_at), killed },
        },
        candidate: w.candidate,
        was_ready: w.was_ready,
        watchdog_ms: w.watchdog_at.map(|t| ms_from(now, t)),
        fault: w.fault.map(String::from),
    }
}

/// The worker a state's entry stands for, its times relative to `now`.
fn worker_of(w: &WorkerState, now: Instant) -> Worker {
    let phase = match w.phase {
        WorkerPhase::Starting { ready_ms, deadline_ms } => {
            Phase::Starting { ready_at: ready_ms.map(|ms| at_ms(now, ms)), deadline: at_ms(now, deadline_ms) }
        }
        WorkerPhase::Ready => Phase::Ready,
        WorkerPhase::Stopping { kill_ms, killed } => Phase::Stopping { kill_at: at_ms(now, kill_ms), killed },
    };
    let mut worker = Worker::new(w.slot, w.gen, Pid::from_raw(w.pid), at_ms(now, w.started_ms), phase, w.candidate);
    worker.was_ready = w.was_ready;
    worker.watchdog_at = w.watchdog_ms.map(|ms| at_ms(now, ms));
    worker.fault = w.fault.as_deref().map(cause);
    worker
}
