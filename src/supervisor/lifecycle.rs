//! Worker lifecycle: spawn, stop (signal, then SIGKILL after `--grace`), reap, what an exit
//! means for its slot (backoff, `--max-start-failures`), and reconciling every slot with what
//! it should have. Every process effect goes through the [`Os`] seam.
//!
//! Rules (also in the README):
//! - A slot whose worker dies is respawned at once the first time, then after 0.5 s x1.5 per
//!   further quick death, capped at 15 s. A worker that ran 30 s or more, or that had been ready
//!   and ran 5 s or more, resets the count: a serving worker killed now and then (an OOM kill, a
//!   chaos test) is replaced at once each time, while one that crashes at or right after start
//!   backs off.
//! - A worker that dies before it was ready counts as a start failure of its slot. When every
//!   slot has failed `--max-start-failures` times in a row, the launcher stops with an error.
//!   One bad slot never stops the others.
//! - A respawn keeps the slot's generation; a roll sets it when the slot's new worker is ready.
//! - When a worker's main process exits, what is left of its process group is killed, before
//!   the exit is reaped (the zombie pins the group id so it cannot be reused meanwhile).
//! - Orphans re-parented to the launcher (it is a child subreaper, or PID 1) are reaped too.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::sys::wait::WaitStatus;

use super::drain::Shutdown;
use super::os::Os;
use super::plan::{self, Life, SlotFacts};
use super::workers::{State, Worker};
use super::Supervisor;
use crate::cli::Ready;
use crate::command::Placeholders;
use crate::contract::{self, WorkerVars};
use crate::error::Error;
use crate::event::WorkerId;
use crate::roll::Input;
use crate::spawn::{Contain, Spec};
use std::os::fd::AsRawFd;

const BACKOFF_START: Duration = Duration::from_millis(500);
pub(super) const BACKOFF_MAX: Duration = Duration::from_secs(15);
pub(super) const STABLE_AFTER: Duration = Duration::from_secs(30);
/// A worker that had been ready and lived this long died of something else than its start.
pub(super) const SERVED_AFTER: Duration = Duration::from_secs(5);

/// Respawn delay after the `quick_deaths`-th quick death in a row (0 = the first).
pub fn backoff(quick_deaths: u32) -> Duration {
    if quick_deaths == 0 {
        return Duration::ZERO;
    }
    let factor = 1.5f64.powi(quick_deaths.min(64) as i32 - 1);
    BACKOFF_START.mul_f64(factor).min(BACKOFF_MAX)
}

/// `exited with status 1` / `killed by SIGSEGV`.
pub fn describe(status: WaitStatus) -> String {
    match status {
        WaitStatus::Exited(_, code) => format!("exited with status {code}"),
        WaitStatus::Signaled(_, sig, core) => {
            format!("killed by {}{}", sig.as_str(), if core { " (core dumped)" } else { "" })
        }
        other => format!("changed state: {other:?}"),
    }
}

impl<O: Os> Supervisor<O> {
    /// Start a worker of generation `gen` on `slot`; `candidate` when a roll starts it.
    pub(super) fn spawn(&mut self, slot: usize, gen: u64, candidate: bool, now: Instant) -> std::io::Result<WorkerId> {
        let id = self.workers.next_id();
        // With --log-prefix slot-pid: the worker's stdout and stderr pipes (closed on failure).
        let log_pipes = crate::logs::pipes()?;
        let notify_socket = match &self.channels.notify {
            Some(hub) => Some(hub.open(id)?),
            None => None,
        };
        let vars = WorkerVars { slot, gen, notify_socket: notify_socket.as_deref() };
        let env =
            contract::environment(&self.launch.inherited_env, &self.launch.contract, &self.listeners.binds(), &vars);
        let fds = self.listeners.fds_for_slot(slot);
        let port = self.listeners.local_addrs()[0].port();
        let argv = self.launch.program.argv(&Placeholders { fds: &fds, port, slot });
        let pid_vars = contract::pid_vars(&self.launch.contract);
        let creds = self.launch.contract.identity.as_ref().map(|i| &i.creds);
        let socket_on_stdin = self.cfg.socket_on_stdin;
        let cpu = self.router.cpu_for(slot);
        let stdio = log_pipes.as_ref().map(|p| p.child_fds());
        let intercept = self.intercept.interceptor.as_ref().map(|i| i.child_filter());
        // The child puts itself in its cgroup and tells the sentinel its pid before exec.
        let cgroup_procs = match self.guards.containment.prepare(id) {
            Ok(procs) => procs,
            Err(e) => {
                self.channels.forget(id);
                return Err(e);
            }
        };
        let sentinel = self.guards.sentinel.as_ref().map(|s| s.pipe_fd());
        let contain = Contain { cgroup_procs: cgroup_procs.as_ref().map(|f| f.as_raw_fd()), sentinel };
        let spec = Spec {
            argv: &argv,
            fds: &fds,
            env: &env,
            pid_vars: &pid_vars,
            socket_on_stdin,
            cpu,
            creds,
            stdio,
            intercept,
            contain,
        };
        let spawned = self.os.spawn(&self.launch.program, &spec);
        drop(cgroup_procs);
        let spawned = match spawned {
            Ok(spawned) => spawned,
            Err(e) => {
                self.channels.forget(id);
                self.guards.containment.exited(id, 0);
                return Err(e);
            }
        };
        let pid = spawned.pid;
        self.guards.containment.started(id, pid.as_raw());
        if let Some(pipes) = log_pipes {
            pipes.register(slot, pid.as_raw());
        }
        let ready_at = match self.cfg.ready {
            Ready::Delay(d) => Some(now + d),
            Ready::Auto(d) if !self.slots.inodes_known() => Some(now + d),
            Ready::Auto(_) | Ready::Notify => None,
        };
        let state = State::Starting { ready_at, deadline: now + self.cfg.ready_timeout };
        let w = Worker::new(slot, gen, pid, now, state, candidate);
        log::info!("{} started", w.label());
        if let Some(notif) = spawned.notif {
            self.intercept_register(id, &w, notif);
        }
        let inserted = self.workers.insert(w);
        debug_assert_eq!(inserted, id);
        Ok(id)
    }

    /// Send the stop signal to worker `id`'s process group; SIGKILL follows after --grace.
    pub(super) fn stop(&mut self, id: WorkerId, now: Instant) {
        let Some(w) = self.workers.get_mut(id) else { return };
        if w.is_stopping() {
            return;
        }
        self.os.signal(w.pid, self.cfg.stop_signal);
        w.state = State::Stopping { kill_at: now + self.cfg.grace, killed: false };
        w.watchdog_at = None;
        log::info!("{} stopping ({})", w.label(), self.cfg.stop_signal.as_str());
    }

    /// Stop a worker that failed (ready timeout, watchdog): its exit then counts against its
    /// slot (backoff, --max-start-failures) like a crash.
    pub(super) fn stop_faulty(&mut self, id: WorkerId, cause: &'static str, now: Instant) {
        if let Some(w) = self.workers.get_mut(id) {
            w.fault = Some(cause);
        }
        self.stop(id, now);
    }

    /// SIGKILL the stopping workers whose grace has run out.
    pub(super) fn kill_overdue(&mut self, now: Instant) {
        for (_, w) in self.workers.iter_mut() {
            if let State::Stopping { kill_at, killed: false } = w.state {
                if now >= kill_at {
                    log::warn!("{} still running after {:?}; sending SIGKILL", w.label(), self.cfg.grace);
                    self.os.signal(w.pid, Signal::SIGKILL);
                    w.state = State::Stopping { kill_at, killed: true };
                }
            }
        }
    }

    pub(super) fn stop_all(&mut self, how: Shutdown, now: Instant) {
        self.roll.step(Input::Cancel, now);
        for slot in self.slots.iter_mut() {
            slot.respawn_at = None;
        }
        match how {
            Shutdown::Graceful => {
                log::info!(
                    "stopping {} workers (grace {:?}; send TERM again to kill at once)",
                    self.workers.len(),
                    self.cfg.grace
                );
                for id in self.workers.ids() {
                    self.stop(id, now);
                }
            }
            Shutdown::Immediate => {
                log::info!("killing {} workers", self.workers.len());
                for (_, w) in self.workers.iter_mut() {
                    self.os.signal(w.pid, Signal::SIGKILL);
                    w.state = State::Stopping { kill_at: now, killed: true };
                }
            }
        }
        self.publishing.stopping(!self.halt.stopping());
        self.halt.shutdown = Some(how);
    }

    /// For fatal exits: SIGKILL every worker and wait for each, so nothing is left behind.
    pub(super) fn kill_all_and_reap(&mut self) {
        for (id, w) in self.workers.take_all() {
            self.os.signal(w.pid, Signal::SIGKILL);
            self.guards.containment.exited(id, w.pid.as_raw());
            let _ = self.os.reap(w.pid, true);
            self.channels.forget(id);
            if let Some(i) = &self.intercept.interceptor {
                i.forget(id);
            }
        }
        self.guards.containment.finish();
        self.reap_orphans();
    }

    /// Reap every exited child. For a worker, kill what is left of its process group while its
    /// zombie still pins the group id, then reap it.
    pub(super) fn reap(&mut self, now: Instant) {
        while let Some(pid) = self.os.exited() {
            let id = self.workers.by_pid(pid);
            if let Some(id) = id {
                // What the worker left in its group (its cgroup goes once empty).
                self.os.signal(pid, Signal::SIGKILL);
                self.guards.containment.exited(id, pid.as_raw());
                if let Some(s) = &self.guards.sentinel {
                    s.gone(pid.as_raw());
                }
            }
            let Some(status) = self.os.reap(pid, false) else { continue };
            match id {
                Some(id) => self.on_exit(id, status, now),
                None if self.guards.sentinel.as_ref().is_some_and(|s| s.pid() as i32 == pid.as_raw()) => {
                    let guards = &mut self.guards;
                    guards.sentinel = crate::sentinel::Sentinel::start(guards.containment.root());
                    let next = guards.sentinel.as_ref().map_or("none".to_string(), |s| format!("pid {}", s.pid()));
                    log::warn!("the sentinel (pid {pid}) {}; a new one runs ({next})", describe(status));
                    // It knows no worker yet: their groups, as each spawn would have told it.
                    if let Some(s) = &self.guards.sentinel {
                        self.workers.iter().for_each(|(_, w)| s.started(w.pid.as_raw()));
                    }
                }
                None => log::debug!("reaped orphan pid {pid}: {status:?}"),
            }
        }
        self.guards.containment.tidy();
    }

    /// Before exiting: reap whatever descendants were re-parented to the launcher (they were
    /// killed with their worker's group), waiting up to 2 s for the last ones to die, so that
    /// nothing is handed over to init.
    pub(super) fn reap_orphans(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            match self.os.reap_any() {
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
                Ok(None) => {
                    log::warn!("some processes re-parented to the launcher are still running at exit");
                    return;
                }
                Ok(Some(s)) => log::debug!("reaped orphan: {s:?}"),
                Err(()) => return, // ECHILD: no child left
            }
        }
    }

    fn on_exit(&mut self, id: WorkerId, status: WaitStatus, now: Instant) {
        let Some(w) = self.workers.remove(id) else { return };
        self.channels.forget(id);
        if let Some(i) = &self.intercept.interceptor {
            i.forget(id);
        }
        self.watches.forget(id);
        let how = describe(status);
        let expected = w.is_stopping();
        if expected {
            log::info!("{} {how}", w.label());
        } else {
            log::warn!("{} {how}", w.label());
        }
        let actions = self.roll.step(Input::Exited { worker: id, how: how.clone() }, now);
        self.apply(actions, now);
        if let Some(slot) = self.slots.get_mut(w.slot).filter(|_| !w.candidate) {
            slot.last_exit = Some(how.clone());
            let cause = match w.fault {
                Some(cause) => Some(cause),
                None if !expected && self.halt.shutdown.is_none() => Some("crash"),
                None => None,
            };
            if let Some(cause) = cause.filter(|_| self.halt.shutdown.is_none()) {
                *slot.restarts.entry(cause).or_default() += 1;
            }
        }
        let replaced = w.fault.is_some_and(|f| super::replace::CAUSES.contains(&f));
        if (expected && (w.fault.is_none() || replaced)) || w.candidate || self.halt.shutdown.is_some() {
            return;
        }
        let lived = now.duration_since(w.started);
        self.record_failure(w.slot, now, lived, w.was_ready, format!("{} {how}", w.label()));
    }

    /// Account one unexpected death (or failed start) of `slot`'s worker for backoff and give-up,
    /// and schedule the slot's next worker.
    fn record_failure(&mut self, slot: usize, now: Instant, lived: Duration, was_ready: bool, what: String) {
        let s = &mut self.slots[slot];
        if lived >= STABLE_AFTER || (was_ready && lived >= SERVED_AFTER) {
            s.quick_deaths = 0;
        }
        let delay = backoff(s.quick_deaths);
        s.quick_deaths += 1;
        if !was_ready {
            s.start_failures += 1;
        }
        s.last_failure = what;
        s.respawn_at = Some(now + delay);
        if delay > Duration::ZERO {
            log::info!("worker {slot} restarts in {delay:?} ({} quick exits in a row)", s.quick_deaths);
        }
    }

    /// Give every slot without a live worker its respawn, when due; give up when every slot
    /// keeps failing to start (the rules: `plan::reconcile`).
    pub(super) fn reconcile(&mut self, now: Instant) -> Result<(), Error> {
        let facts: Vec<SlotFacts> = (0..self.slots.len())
            .map(|slot| {
                let s = &self.slots[slot];
                SlotFacts {
                    retiring: s.retiring.is_some(),
                    live: self.workers.live_on(slot),
                    respawn_at: s.respawn_at,
                    start_failures: s.start_failures,
                    gen: s.gen,
                }
            })
            .collect();
        let max = self.cfg.max_start_failures;
        for action in plan::reconcile(&facts, max, self.halt.shutdown.is_some(), now) {
            match action {
                Life::GiveUp => return Err(self.give_up(max)),
                Life::Settled(slot) => self.slots[slot].respawn_at = None,
                Life::Respawn { slot, gen } => {
                    self.slots[slot].respawn_at = None;
                    if let Err(e) = self.spawn(slot, gen, false, now) {
                        log::error!("cannot start '{}' for worker {slot}: {e}", self.launch.program.display);
                        let what = format!("worker {slot} could not start: {e}");
                        self.record_failure(slot, now, Duration::ZERO, false, what);
                    }
                }
            }
        }
        Ok(())
    }

    /// Every slot failed to start `max` times in a row: the launcher's error.
    fn give_up(&self, max: u32) -> Error {
        let last: Vec<String> =
            self.slots.iter().filter(|s| s.retiring.is_none()).map(|s| s.last_failure.clone()).collect();
        let hint = match &self.intercept.interceptor {
            None if self.listeners.mode() != crate::socket::Mode::SelfBind => {
                format!("; bind() interception is {}: {}", self.intercept.state, crate::intercept::HINT)
            }
            Some(i) if i.counts().0 == 0 => "; no worker's own bind() of a --bind port was taken over (a \
                server that binds another port needs that port in --bind)"
                .to_string(),
            _ => String::new(),
        };
        Error::Failed(format!(
            "every worker exited before it became ready, {max} times in a row on each slot; giving up (last: {}){hint}",
            last.join("; ")
        ))
    }
}
