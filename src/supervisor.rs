//! The supervisor: one synchronous loop on the launcher's main thread that owns every worker,
//! every slot and (through [`Listeners`]) every socket.
//!
//! Signals (signal-hook thread) and notify messages (notify thread) arrive as [`Event`]s on one
//! crossbeam channel; timers are the loop's receive timeout. After every event the loop runs the
//! same steps: fire due timers (readiness, ready timeouts, grace kills, the roll's deadline) and
//! reconcile each slot against what it should have (a live worker, or a respawn scheduled with
//! backoff). Rolling restarts are decided by the pure [`Roll`] machine; this module only carries
//! out its actions.
//!
//! Policies:
//! - A slot whose worker dies is respawned at once the first time, then after 0.5 s x1.5 per
//!   further quick death, capped at 15 s. A worker that ran 30 s or more resets the count.
//! - A worker that dies before it was ready counts as a start failure of its slot. When every
//!   slot has failed `--max-start-failures` times in a row, the launcher stops with an error.
//!   One bad slot never stops the others.
//! - A respawn keeps the slot's generation; a roll sets it when the slot's new worker is ready.
//! - When a worker's main process exits, what is left of its process group is killed, before
//!   the exit is reaped (the zombie pins the group id so it cannot be reused meanwhile).
//! - Orphans re-parented to the launcher (it is a child subreaper, or PID 1) are reaped too.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use nix::sys::signal::{killpg, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use signal_hook::consts::signal::*;

use crate::cli::{Config, Ready};
use crate::notify::{NotifyHub, Upstream};
use crate::proxy::Proxy;
use crate::readiness;
use crate::roll::{Action, Input, Roll, WorkerId};
use crate::socket::{Listeners, Mode};
use crate::spawn::{self, env_entry, Identity, Placeholders, Program, Spec};
use crate::steer::{self, Sample, StallWatch};

/// Something the loop must react to.
#[derive(Debug)]
pub enum Event {
    Signal(i32),
    /// An sd_notify datagram from a worker's tree: its `KEY=VALUE` fields.
    Notify(WorkerId, Vec<(String, String)>),
}

/// Why the launcher stopped with an error.
#[derive(Debug)]
pub struct Fatal(pub String);

impl fmt::Display for Fatal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

const BACKOFF_START: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(15);
const STABLE_AFTER: Duration = Duration::from_secs(30);

/// Respawn delay after the `quick_deaths`-th quick death in a row (0 = the first).
pub fn backoff(quick_deaths: u32) -> Duration {
    if quick_deaths == 0 {
        return Duration::ZERO;
    }
    let factor = 1.5f64.powi(quick_deaths.min(64) as i32 - 1);
    BACKOFF_START.mul_f64(factor).min(BACKOFF_MAX)
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    Starting { ready_at: Option<Instant>, deadline: Instant },
    Ready,
    Stopping { kill_at: Instant, killed: bool },
}

#[derive(Debug)]
struct Worker {
    slot: usize,
    gen: u64,
    pid: Pid,
    started: Instant,
    state: State,
    /// Started by a roll and not yet ready: it does not own its slot yet.
    candidate: bool,
    was_ready: bool,
    /// With --watchdog: restart unless a WATCHDOG=1 arrives before this (armed once ready).
    watchdog_at: Option<Instant>,
    /// Stopped because it failed (not ready in time, missed its watchdog): its exit counts
    /// against its slot like a crash.
    fault: bool,
}

#[derive(Debug, Default)]
struct Slot {
    gen: u64,
    quick_deaths: u32,
    start_failures: u32,
    /// When to start the slot's next worker, once it has none (None: at once).
    respawn_at: Option<Instant>,
    last_failure: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shutdown {
    Graceful,
    Immediate,
}

pub struct Supervisor {
    cfg: Config,
    listeners: Listeners,
    program: Program,
    base_env: Vec<CString>,
    workers: BTreeMap<WorkerId, Worker>,
    slots: Vec<Slot>,
    roll: Roll,
    next_id: WorkerId,
    notify: Option<NotifyHub>,
    rx: Receiver<Event>,
    shutdown: Option<Shutdown>,
    all_ready_logged: bool,
    /// The slots new connections currently go to (None: all), by BPF steering in reuseport
    /// mode or by the forwarder in round-robin mode.
    steered: Option<Vec<usize>>,
    proxy: Option<Proxy>,
    /// Reuseport and round-robin with several slots: accept queues sampled for stalled workers.
    stalls: Option<(StallWatch, Instant)>,
    identity: Option<Identity>,
    /// The launcher's own service manager (systemd), if it gave us NOTIFY_SOCKET.
    upstream: Option<Upstream>,
    last_status: String,
    /// The launcher's own watchdog pings to its service manager: interval and next ping.
    ping: Option<(Duration, Instant)>,
    /// --ready auto: each slot's socket inodes (None: /proc cannot tell, use the delay), and
    /// when to look at starting workers next.
    slot_inodes: Option<Vec<Vec<u64>>>,
    next_probe: Option<Instant>,
}

impl Supervisor {
    /// Install the signal handlers and the notify reader. Call before any worker exists, so
    /// that no SIGCHLD can be missed.
    pub fn new(
        cfg: Config,
        mut listeners: Listeners,
        program: Program,
        identity: Option<Identity>,
    ) -> Result<Supervisor, Fatal> {
        let (tx, rx) = crossbeam_channel::unbounded();
        start_signal_thread(tx.clone())?;
        let notify = if cfg.ready == Ready::Notify || cfg.watchdog.is_some() {
            let uid = identity.as_ref().map(|i| i.creds.uid);
            Some(NotifyHub::start(tx, uid).map_err(|e| Fatal(format!("cannot start the notify reader: {e}")))?)
        } else {
            None
        };
        // SAFETY: prctl with integer arguments only.
        if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
            log::warn!("cannot become a child subreaper: {}", std::io::Error::last_os_error());
        }
        let mut base_env: Vec<CString> =
            spawn::inherited_env().into_iter().map(|(k, v)| env_entry(&k.to_string_lossy(), v)).collect();
        base_env.push(env_entry("PORT", listeners.local_addrs()[0].port().to_string()));
        base_env.push(env_entry("REUSE_LAUNCH_PID", std::process::id().to_string()));
        if listeners.mode() != Mode::SelfBind {
            let names: Vec<&str> = listeners.names().collect();
            base_env.push(env_entry("LISTEN_FDS", names.len().to_string()));
            base_env.push(env_entry("LISTEN_FDNAMES", names.join(":")));
            // The same sockets in the forms other launchers' libraries read.
            let starter: Vec<String> =
                listeners.local_addrs().iter().enumerate().map(|(i, a)| format!("{a}={}", 3 + i)).collect();
            base_env.push(env_entry("SERVER_STARTER_PORT", starter.join(";")));
            base_env.push(env_entry("EINHORN_FD_COUNT", names.len().to_string()));
            for i in 0..names.len() {
                base_env.push(env_entry(&format!("EINHORN_FD_{i}"), (3 + i).to_string()));
            }
        }
        let proxy = match listeners.mode() {
            Mode::RoundRobin => Some(
                Proxy::start(listeners.take_public(), cfg.proxy_threads)
                    .map_err(|e| Fatal(format!("cannot start the round-robin forwarder: {e}")))?,
            ),
            _ => None,
        };
        if let Some(id) = &identity {
            base_env.retain(|e| !["USER=", "LOGNAME=", "HOME="].iter().any(|k| e.as_bytes().starts_with(k.as_bytes())));
            base_env.push(env_entry("USER", &id.name));
            base_env.push(env_entry("LOGNAME", &id.name));
            base_env.push(env_entry("HOME", &id.home));
        }
        if let Some(wd) = cfg.watchdog {
            base_env.push(env_entry("WATCHDOG_USEC", wd.as_micros().to_string()));
        }
        let slot_inodes = match cfg.ready {
            Ready::Auto(delay) => {
                let inodes: std::io::Result<Vec<Vec<u64>>> =
                    (0..cfg.workers).map(|s| readiness::socket_inodes(&listeners.fds_for_slot(s))).collect();
                inodes
                    .map_err(|e| {
                        log::warn!("--ready auto cannot name the sockets ({e}); using --ready-delay {delay:?}")
                    })
                    .ok()
            }
            _ => None,
        };
        let stalls = (matches!(listeners.mode(), Mode::Reuseport | Mode::RoundRobin) && cfg.workers > 1)
            .then(|| (StallWatch::new(cfg.workers), Instant::now()));
        let upstream = Upstream::from_env();
        let ping = upstream.as_ref().and_then(|_| launcher_watchdog()).map(|every| (every, Instant::now()));
        let slots = (0..cfg.workers).map(|_| Slot { gen: 1, ..Slot::default() }).collect();
        Ok(Supervisor {
            roll: Roll::new(cfg.workers, cfg.ready_timeout),
            cfg,
            listeners,
            program,
            base_env,
            workers: BTreeMap::new(),
            slots,
            next_id: 1,
            notify,
            rx,
            shutdown: None,
            all_ready_logged: false,
            steered: None,
            stalls,
            proxy,
            identity,
            upstream,
            last_status: String::new(),
            ping,
            slot_inodes,
            next_probe: None,
        })
    }

    /// Start every slot, then run until stopped. Ok(()) is a clean stop (exit 0).
    pub fn run(mut self) -> Result<(), Fatal> {
        for slot in 0..self.cfg.workers {
            if let Err(e) = self.spawn(slot, 1, false) {
                self.kill_all_and_reap();
                let user = self.identity.as_ref().map(|i| format!(" as user {}", i.name)).unwrap_or_default();
                return Err(Fatal(format!("cannot start '{}'{user}: {e}", self.program.display)));
            }
        }
        loop {
            let now = Instant::now();
            if let Err(e) = self.tick(now) {
                self.kill_all_and_reap();
                return Err(e);
            }
            if self.shutdown.is_some() && self.workers.is_empty() {
                self.reap_orphans();
                log::info!("all workers stopped; exiting");
                return Ok(());
            }
            let event = match self.next_deadline() {
                Some(at) => match self.rx.recv_timeout(at.saturating_duration_since(Instant::now())) {
                    Ok(ev) => Some(ev),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => return Err(Fatal("event channel closed".into())),
                },
                None => Some(self.rx.recv().map_err(|_| Fatal("event channel closed".into()))?),
            };
            if let Some(ev) = event {
                self.handle(ev);
            }
        }
    }

    fn handle(&mut self, ev: Event) {
        match ev {
            Event::Signal(SIGCHLD) => self.reap(),
            Event::Signal(SIGTERM | SIGINT) if self.shutdown.is_none() => self.stop_all(Shutdown::Graceful),
            Event::Signal(SIGTERM | SIGINT | SIGQUIT) => self.stop_all(Shutdown::Immediate),
            Event::Signal(sig @ (SIGUSR2 | SIGHUP)) => {
                if self.shutdown.is_some() {
                    return;
                }
                let name = if sig == SIGHUP { "HUP" } else { "USR2" };
                match self.roll.rolling_gen() {
                    Some(g) => log::info!("{name}: roll gen {g} under way; one more roll will follow it"),
                    None => log::info!("{name}: rolling restart"),
                }
                let actions = self.roll.step(Input::Request, Instant::now());
                if actions.iter().any(|a| matches!(a, Action::Spawn { .. })) {
                    self.tell_upstream(&format!("RELOADING=1\nMONOTONIC_USEC={}", monotonic_usec()));
                }
                self.apply(actions);
            }
            Event::Signal(other) => log::debug!("ignoring signal {other}"),
            Event::Notify(id, fields) => self.on_notify(id, fields),
        }
    }

    fn on_notify(&mut self, id: WorkerId, fields: Vec<(String, String)>) {
        let Some(w) = self.workers.get(&id) else { return };
        let label = label(w);
        for (k, v) in fields {
            match (k.as_str(), v.as_str()) {
                ("READY", "1") => self.mark_ready(id, Instant::now()),
                ("WATCHDOG", "1") => {
                    if let (Some(w), Some(every)) = (self.workers.get_mut(&id), self.cfg.watchdog) {
                        if w.watchdog_at.is_some() {
                            w.watchdog_at = Some(Instant::now() + every);
                        }
                    }
                }
                ("WATCHDOG", "trigger") => {
                    log::warn!("{label} asked to be restarted (WATCHDOG=trigger)");
                    self.stop_faulty(id, Instant::now());
                }
                ("STOPPING", "1") => log::info!("{label} says it is stopping"),
                ("STATUS", status) => log::info!("{label} status: {status}"),
                _ => {}
            }
        }
    }

    // ---- spawning and stopping ----

    fn spawn(&mut self, slot: usize, gen: u64, candidate: bool) -> std::io::Result<WorkerId> {
        let id = self.next_id;
        self.next_id += 1;
        let mut env = self.base_env.clone();
        env.push(env_entry("REUSE_LAUNCH_SLOT", slot.to_string()));
        env.push(env_entry("REUSE_LAUNCH_GENERATION", gen.to_string()));
        env.push(env_entry("SERVER_STARTER_GENERATION", gen.to_string()));
        if let Some(hub) = &self.notify {
            env.push(env_entry("NOTIFY_SOCKET", hub.open(id)?));
        }
        let fds = self.listeners.fds_for_slot(slot);
        let port = self.listeners.local_addrs()[0].port();
        let argv = self.program.argv(&Placeholders { fds: &fds, port, slot });
        let mut pid_vars = Vec::with_capacity(2);
        if self.listeners.mode() != Mode::SelfBind {
            pid_vars.push("LISTEN_PID");
        }
        if self.cfg.watchdog.is_some() {
            pid_vars.push("WATCHDOG_PID");
        }
        let creds = self.identity.as_ref().map(|i| &i.creds);
        let socket_on_stdin = self.cfg.socket_on_stdin;
        let spec = Spec { argv: &argv, fds: &fds, env: &env, pid_vars: &pid_vars, socket_on_stdin, creds };
        let pid = match spawn::spawn(&self.program, &spec) {
            Ok(pid) => pid,
            Err(e) => {
                if let Some(hub) = &self.notify {
                    hub.close(id);
                }
                return Err(e);
            }
        };
        let now = Instant::now();
        let ready_at = match self.cfg.ready {
            Ready::Delay(d) => Some(now + d),
            Ready::Auto(d) if self.slot_inodes.is_none() => Some(now + d),
            Ready::Auto(_) | Ready::Notify => None,
        };
        let state = State::Starting { ready_at, deadline: now + self.cfg.ready_timeout };
        let w = Worker {
            slot,
            gen,
            pid,
            started: now,
            state,
            candidate,
            was_ready: false,
            watchdog_at: None,
            fault: false,
        };
        log::info!("{} started", label(&w));
        self.workers.insert(id, w);
        Ok(id)
    }

    /// Send the stop signal to worker `id`'s process group; SIGKILL follows after --grace.
    fn stop(&mut self, id: WorkerId, now: Instant) {
        let Some(w) = self.workers.get_mut(&id) else { return };
        if matches!(w.state, State::Stopping { .. }) {
            return;
        }
        signal_worker(w.pid, self.cfg.stop_signal);
        w.state = State::Stopping { kill_at: now + self.cfg.grace, killed: false };
        w.watchdog_at = None;
        log::info!("{} stopping ({})", label(w), self.cfg.stop_signal.as_str());
    }

    /// Stop a worker that failed (ready timeout, watchdog): its exit then counts against its
    /// slot (backoff, --max-start-failures) like a crash.
    fn stop_faulty(&mut self, id: WorkerId, now: Instant) {
        if let Some(w) = self.workers.get_mut(&id) {
            w.fault = true;
        }
        self.stop(id, now);
    }

    fn stop_all(&mut self, how: Shutdown) {
        let now = Instant::now();
        self.roll.step(Input::Cancel, now);
        for slot in &mut self.slots {
            slot.respawn_at = None;
        }
        match how {
            Shutdown::Graceful => {
                log::info!(
                    "stopping {} workers (grace {:?}; send TERM again to kill at once)",
                    self.workers.len(),
                    self.cfg.grace
                );
                let ids: Vec<_> = self.workers.keys().copied().collect();
                for id in ids {
                    self.stop(id, now);
                }
            }
            Shutdown::Immediate => {
                log::info!("killing {} workers", self.workers.len());
                for w in self.workers.values_mut() {
                    signal_worker(w.pid, Signal::SIGKILL);
                    w.state = State::Stopping { kill_at: now, killed: true };
                }
            }
        }
        if self.shutdown.is_none() {
            self.tell_upstream("STOPPING=1");
        }
        self.shutdown = Some(how);
    }

    /// For fatal exits: SIGKILL every worker and wait for each, so nothing is left behind.
    fn kill_all_and_reap(&mut self) {
        for (id, w) in std::mem::take(&mut self.workers) {
            signal_worker(w.pid, Signal::SIGKILL);
            let _ = waitpid(w.pid, None);
            if let Some(hub) = &self.notify {
                hub.close(id);
            }
        }
        self.reap_orphans();
    }

    // ---- exits ----

    /// Reap every exited child. For a worker, kill what is left of its process group while its
    /// zombie still pins the group id, then reap it.
    fn reap(&mut self) {
        loop {
            // SAFETY: siginfo_t is plain data that waitid fills in.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            let flags = libc::WEXITED | libc::WNOHANG | libc::WNOWAIT;
            // SAFETY: waitid with a valid siginfo_t pointer; WNOWAIT leaves the child waitable.
            let rc = unsafe { libc::waitid(libc::P_ALL, 0, &mut info, flags) };
            // SAFETY: si_pid is valid for the CLD_* codes waitid reports, and 0 when none.
            let raw = if rc == 0 { unsafe { info.si_pid() } } else { 0 };
            if raw == 0 {
                return;
            }
            let pid = Pid::from_raw(raw);
            let id = self.workers.iter().find(|(_, w)| w.pid == pid).map(|(id, _)| *id);
            if id.is_some() {
                let _ = killpg(pid, Signal::SIGKILL);
            }
            let status = match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
                Ok(s) => s,
                Err(_) => continue,
            };
            match id {
                Some(id) => self.on_exit(id, status),
                None => log::debug!("reaped orphan pid {pid}: {status:?}"),
            }
        }
    }

    /// Before exiting: reap whatever descendants were re-parented to the launcher (they were
    /// killed with their worker's group), waiting up to 2 s for the last ones to die, so that
    /// nothing is handed over to init.
    fn reap_orphans(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Ok(WaitStatus::StillAlive) => {
                    log::warn!("some processes re-parented to the launcher are still running at exit");
                    return;
                }
                Ok(s) => log::debug!("reaped orphan: {s:?}"),
                Err(_) => return, // ECHILD: no child left
            }
        }
    }

    fn on_exit(&mut self, id: WorkerId, status: WaitStatus) {
        let now = Instant::now();
        let Some(w) = self.workers.remove(&id) else { return };
        if let Some(hub) = &self.notify {
            hub.close(id);
        }
        let how = describe(status);
        let expected = matches!(w.state, State::Stopping { .. });
        if expected {
            log::info!("{} {how}", label(&w));
        } else {
            log::warn!("{} {how}", label(&w));
        }
        let actions = self.roll.step(Input::Exited { worker: id, how: how.clone() }, now);
        self.apply(actions);
        if (expected && !w.fault) || w.candidate || self.shutdown.is_some() {
            return;
        }
        let lived = now.duration_since(w.started);
        self.record_failure(w.slot, now, lived, w.was_ready, format!("{} {how}", label(&w)));
    }

    /// Account one unexpected death (or failed start) of `slot`'s worker for backoff and give-up,
    /// and schedule the slot's next worker.
    fn record_failure(&mut self, slot: usize, now: Instant, lived: Duration, was_ready: bool, what: String) {
        let s = &mut self.slots[slot];
        if lived >= STABLE_AFTER {
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

    // ---- readiness ----

    fn mark_ready(&mut self, id: WorkerId, now: Instant) {
        let Some(w) = self.workers.get_mut(&id) else { return };
        if !matches!(w.state, State::Starting { .. }) {
            return;
        }
        w.state = State::Ready;
        w.was_ready = true;
        w.watchdog_at = self.cfg.watchdog.map(|every| now + every);
        log::info!("{} ready after {:.2?}", label(w), now.saturating_duration_since(w.started));
        if !w.candidate {
            self.slots[w.slot].start_failures = 0;
        }
        let actions = self.roll.step(Input::Ready(id), now);
        self.apply(actions);
    }

    /// Once, when every slot first has a ready worker and new connections are routed to them
    /// all: the log line, and READY=1 to the service manager.
    fn announce_ready(&mut self) {
        if !self.all_ready_logged && self.ready_count() == self.cfg.workers {
            self.all_ready_logged = true;
            log::info!("all {} workers ready", self.cfg.workers);
            self.tell_upstream(&format!("READY=1\nMAINPID={}", std::process::id()));
        }
    }

    fn ready_count(&self) -> usize {
        self.workers.values().filter(|w| w.state == State::Ready && !w.candidate).count()
    }

    // ---- roll actions ----

    fn apply(&mut self, actions: Vec<Action>) {
        for action in actions {
            let now = Instant::now();
            match action {
                Action::Spawn { slot, gen } => {
                    log::info!("roll gen {gen}: starting a new worker for slot {slot}");
                    let answer = match self.spawn(slot, gen, true) {
                        Ok(id) => Input::Spawned(id),
                        Err(e) => Input::SpawnFailed(e.to_string()),
                    };
                    let next = self.roll.step(answer, now);
                    self.apply(next);
                }
                Action::Retire { slot, gen, worker, done, of } => {
                    log::info!("roll gen {gen}: slot {slot} ready ({done}/{of})");
                    if let Some(w) = self.workers.get_mut(&worker) {
                        w.candidate = false;
                    }
                    self.slots[slot].gen = gen;
                    self.slots[slot].start_failures = 0;
                    let old: Vec<_> = self
                        .workers
                        .iter()
                        .filter(|(id, w)| w.slot == slot && **id != worker)
                        .map(|(id, _)| *id)
                        .collect();
                    for id in old {
                        self.stop(id, now);
                    }
                }
                Action::Stop(id) => self.stop(id, now),
                Action::Finished { gen } => {
                    log::info!("roll gen {gen} done: all {} slots run gen {gen}", self.cfg.workers);
                    self.tell_upstream("READY=1");
                }
                Action::Abandoned { gen, slot, reason } => {
                    log::warn!("roll gen {gen} abandoned at slot {slot}: {reason}; the older workers keep serving");
                    self.tell_upstream("READY=1");
                }
            }
        }
    }

    // ---- timers and reconciliation ----

    fn tick(&mut self, now: Instant) -> Result<(), Fatal> {
        let mut due_ready = Vec::new();
        let mut timed_out = Vec::new();
        let mut missed = Vec::new();
        for (id, w) in &mut self.workers {
            if w.state == State::Ready && w.watchdog_at.is_some_and(|at| now >= at) {
                w.watchdog_at = None;
                missed.push(*id);
            }
            match w.state {
                State::Starting { ready_at: Some(at), .. } if now >= at => due_ready.push(*id),
                State::Starting { deadline, .. } if now >= deadline && !w.candidate => timed_out.push(*id),
                State::Stopping { kill_at, killed: false } if now >= kill_at => {
                    log::warn!("{} still running after {:?}; sending SIGKILL", label(w), self.cfg.grace);
                    signal_worker(w.pid, Signal::SIGKILL);
                    w.state = State::Stopping { kill_at, killed: true };
                }
                _ => {}
            }
        }
        due_ready.extend(self.probe_starting(now));
        for id in due_ready {
            self.mark_ready(id, now);
        }
        for id in timed_out {
            if let Some(w) = self.workers.get(&id) {
                log::warn!("{} not ready within {:?}; stopping it", label(w), self.cfg.ready_timeout);
            }
            self.stop_faulty(id, now);
        }
        for id in missed {
            if let (Some(w), Some(every)) = (self.workers.get(&id), self.cfg.watchdog) {
                log::warn!("{} sent no WATCHDOG=1 for {every:?}; restarting it", label(w));
            }
            self.stop_faulty(id, now);
        }
        if let Some((every, at)) = self.ping {
            if now >= at {
                self.tell_upstream("WATCHDOG=1");
                self.ping = Some((every, now + every));
            }
        }
        let actions = self.roll.step(Input::Tick, now);
        self.apply(actions);
        self.reconcile(now)?;
        self.watch_queues(now);
        self.steer();
        self.announce_ready();
        self.report_status();
        Ok(())
    }

    /// --ready auto: the starting workers that /proc shows waiting for connections on their
    /// slot's socket. Where /proc cannot tell, fall back to --ready-delay (said once).
    fn probe_starting(&mut self, now: Instant) -> Vec<WorkerId> {
        const EVERY: Duration = Duration::from_millis(50);
        let (Ready::Auto(delay), Some(inodes)) = (self.cfg.ready, &self.slot_inodes) else { return Vec::new() };
        if self.next_probe.is_some_and(|at| now < at) {
            return Vec::new();
        }
        let starting: Vec<(WorkerId, i32, usize)> = self
            .workers
            .iter()
            .filter(|(_, w)| matches!(w.state, State::Starting { ready_at: None, .. }))
            .map(|(id, w)| (*id, w.pid.as_raw(), w.slot))
            .collect();
        self.next_probe = if starting.is_empty() { None } else { Some(now + EVERY) };
        let groups = readiness::groups_members(&starting.iter().map(|s| s.1).collect::<Vec<_>>());
        let mut ready = Vec::new();
        let mut unknown = None;
        for ((id, _, slot), pids) in starting.iter().zip(groups) {
            match readiness::probe(&pids, &inodes[*slot]) {
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
            self.slot_inodes = None;
            self.next_probe = None;
            for w in self.workers.values_mut() {
                if let State::Starting { ready_at: ready_at @ None, .. } = &mut w.state {
                    *ready_at = Some(w.started + delay);
                }
            }
        }
        ready
    }

    fn tell_upstream(&self, message: &str) {
        if let Some(up) = &self.upstream {
            up.send(message);
        }
    }

    /// STATUS= to the service manager whenever the picture changes.
    fn report_status(&mut self) {
        if self.upstream.is_none() {
            return;
        }
        let gen = self.slots.iter().map(|s| s.gen).max().unwrap_or(1);
        let mut status = format!("{}/{} workers ready, gen {gen}", self.ready_count(), self.cfg.workers);
        if let Some(g) = self.roll.rolling_gen() {
            status.push_str(&format!(", rolling to gen {g}"));
        }
        if self.shutdown.is_some() {
            status = format!("stopping, {} workers left", self.workers.len());
        }
        if status != self.last_status {
            self.tell_upstream(&format!("STATUS={status}"));
            self.last_status = status;
        }
    }

    /// The slots that should take new connections: those with a ready worker, except a slot
    /// whose worker is being replaced or has stopped accepting (unless that leaves no slot).
    fn serving_slots(&self) -> Vec<usize> {
        let ready = |s: usize| self.workers.values().any(|w| w.slot == s && w.state == State::Ready);
        // Being replaced: a new worker is starting there, or the old one is draining. Keeping
        // new connections away until the old worker has exited means it cannot accept one
        // after its stop signal (servers that close accepted-but-unread connections on
        // shutdown, such as uvicorn, would drop it).
        let rolling = |s: usize| {
            self.workers.values().any(|w| w.slot == s && (w.candidate || matches!(w.state, State::Stopping { .. })))
        };
        let stalled = |s: usize| self.stalls.as_ref().is_some_and(|(w, _)| w.is_stalled(s));
        let all: Vec<usize> = (0..self.slots.len()).filter(|s| ready(*s)).collect();
        let preferred: Vec<usize> = all.iter().copied().filter(|s| !rolling(*s) && !stalled(*s)).collect();
        if preferred.is_empty() {
            all
        } else {
            preferred
        }
    }

    /// Sample every slot's accept queue (every `StallWatch::EVERY`) and log stalls.
    fn watch_queues(&mut self, now: Instant) {
        let Some((watch, next)) = &mut self.stalls else { return };
        if now < *next || self.workers.is_empty() {
            return;
        }
        *next = now + StallWatch::EVERY;
        let queues: Vec<Option<u32>> = (0..self.slots.len())
            .map(|s| {
                let lens = self.listeners.fds_for_slot(s).into_iter().map(steer::queue_len);
                lens.collect::<std::io::Result<Vec<u32>>>().ok().and_then(|v| v.into_iter().max())
            })
            .collect();
        // CPU time only where something waits (rare): all processes of those slots' workers,
        // found with one scan of /proc.
        let leaders: Vec<(usize, i32)> = self
            .workers
            .values()
            .filter(|w| matches!(queues[w.slot], Some(n) if n > 0))
            .map(|w| (w.slot, w.pid.as_raw()))
            .collect();
        let members = readiness::groups_members(&leaders.iter().map(|l| l.1).collect::<Vec<_>>());
        let samples: Vec<Sample> = queues
            .iter()
            .enumerate()
            .map(|(slot, &queue)| {
                let pids: Vec<i32> =
                    leaders.iter().zip(&members).filter(|(l, _)| l.0 == slot).flat_map(|(_, m)| m.clone()).collect();
                Sample { queue, cpu: steer::cpu_ticks(&pids) }
            })
            .collect();
        for (slot, stalled) in watch.observe(now, &samples) {
            let who = self
                .workers
                .values()
                .filter(|w| w.slot == slot && w.state == State::Ready)
                .map(label)
                .next()
                .unwrap_or_else(|| format!("worker {slot}"));
            if stalled {
                log::warn!(
                    "{who} left {} connections waiting for {:?} while others kept up; new connections go elsewhere until it catches up",
                    queues[slot].unwrap_or(0),
                    StallWatch::AFTER
                );
            } else {
                log::info!("{who} accepts again");
            }
        }
    }

    /// Send new connections only to the serving slots: BPF steering of the reuseport groups
    /// (see `steer`), or the forwarder's backend list in round-robin mode.
    fn steer(&mut self) {
        let groups = self.listeners.groups();
        if groups.is_empty() && self.proxy.is_none() {
            return;
        }
        let serving = self.serving_slots();
        let all = serving.is_empty() || serving.len() == self.slots.len();
        let wanted = if all && self.proxy.is_none() { None } else { Some(serving.clone()) };
        if wanted == self.steered {
            return;
        }
        if let Some(proxy) = &self.proxy {
            let slots = wanted.clone().unwrap_or_default();
            let per_slot: Vec<Vec<SocketAddr>> = slots.iter().map(|s| self.listeners.private_addrs(*s)).collect();
            let binds = self.listeners.local_addrs().len();
            proxy.set_backends((0..binds).map(|b| per_slot.iter().map(|a| a[b]).collect()).collect());
        }
        for (member, size) in groups {
            if let Err(e) = steer::apply(member, wanted.as_deref().unwrap_or(&[]), size) {
                log::warn!("cannot steer new connections away from slots without a ready worker: {e}");
                return;
            }
        }
        let partial = wanted.as_ref().is_some_and(|s| s.len() < self.slots.len());
        if !self.all_ready_logged || self.shutdown.is_some() {
            log::debug!("new connections go to slots {wanted:?} (None: all)");
        } else if serving.is_empty() {
            log::warn!("no worker is ready: new connections wait until one is");
        } else if partial {
            log::info!(
                "new connections go to slots {serving:?} only (the others have no ready worker, are being replaced or stalled)"
            );
        } else {
            log::info!("new connections go to every slot");
        }
        self.steered = wanted;
    }

    /// Give every slot without a live worker its respawn, when due; give up when every slot
    /// keeps failing to start.
    fn reconcile(&mut self, now: Instant) -> Result<(), Fatal> {
        if self.shutdown.is_some() {
            return Ok(());
        }
        let max = self.cfg.max_start_failures;
        if self.slots.iter().all(|s| s.start_failures >= max) {
            let last: Vec<String> = self.slots.iter().map(|s| s.last_failure.clone()).collect();
            return Err(Fatal(format!(
                "every worker exited before it became ready, {max} times in a row on each slot; giving up (last: {})",
                last.join("; ")
            )));
        }
        for slot in 0..self.slots.len() {
            let live = self.workers.values().any(|w| w.slot == slot && !matches!(w.state, State::Stopping { .. }));
            let s = &mut self.slots[slot];
            if live {
                s.respawn_at = None;
                continue;
            }
            let at = *s.respawn_at.get_or_insert(now);
            if now < at {
                continue;
            }
            s.respawn_at = None;
            let gen = s.gen;
            if let Err(e) = self.spawn(slot, gen, false) {
                log::error!("cannot start '{}' for worker {slot}: {e}", self.program.display);
                self.record_failure(slot, now, Duration::ZERO, false, format!("worker {slot} could not start: {e}"));
            }
        }
        Ok(())
    }

    fn next_deadline(&self) -> Option<Instant> {
        let workers = self.workers.values().filter_map(|w| match w.state {
            State::Starting { ready_at, deadline } => Some(ready_at.map_or(deadline, |r| r.min(deadline))),
            State::Stopping { kill_at, killed: false } => Some(kill_at),
            _ => None,
        });
        let slots = self.slots.iter().filter_map(|s| s.respawn_at);
        let watchdogs = self.workers.values().filter(|w| w.state == State::Ready).filter_map(|w| w.watchdog_at);
        let ping = self.ping.map(|p| p.1);
        let sample = self.stalls.as_ref().filter(|_| !self.workers.is_empty()).map(|(_, next)| *next);
        let probe = match self.cfg.ready {
            Ready::Auto(_) if self.slot_inodes.is_some() => self
                .workers
                .values()
                .any(|w| matches!(w.state, State::Starting { ready_at: None, .. }))
                .then(|| self.next_probe.unwrap_or_else(Instant::now)),
            _ => None,
        };
        workers.chain(slots).chain(watchdogs).chain(self.roll.deadline()).chain(ping).chain(probe).chain(sample).min()
    }
}

/// Signal a worker's process group, and the worker itself in case it left the group (setsid):
/// its pid cannot be reused before the launcher reaps it.
fn signal_worker(pid: Pid, sig: Signal) {
    let _ = killpg(pid, sig);
    let _ = nix::sys::signal::kill(pid, sig);
}

fn label(w: &Worker) -> String {
    format!("worker {} (pid {}, gen {})", w.slot, w.pid, w.gen)
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

/// CLOCK_MONOTONIC in microseconds, as systemd wants it with RELOADING=1.
fn monotonic_usec() -> u128 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u128 * 1_000_000 + t.tv_nsec() as u128 / 1000)
        .unwrap_or(0)
}

/// The launcher's own watchdog interval from systemd (WATCHDOG_USEC, for our pid): ping at half.
fn launcher_watchdog() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    match std::env::var("WATCHDOG_PID") {
        Ok(pid) if pid != std::process::id().to_string() => None,
        _ => Some(Duration::from_micros(usec / 2)),
    }
}

fn start_signal_thread(tx: Sender<Event>) -> Result<(), Fatal> {
    let mut signals = signal_hook::iterator::Signals::new([
        SIGCHLD, SIGTERM, SIGINT, SIGQUIT, SIGHUP, SIGUSR2, SIGUSR1, SIGTTIN, SIGTTOU,
    ])
    .map_err(|e| Fatal(format!("cannot install signal handlers: {e}")))?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                if tx.send(Event::Signal(sig)).is_err() {
                    return;
                }
            }
        })
        .map_err(|e| Fatal(format!("cannot start the signal thread: {e}")))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_by_half_and_caps() {
        assert_eq!(backoff(0), Duration::ZERO);
        assert_eq!(backoff(1), Duration::from_millis(500));
        assert_eq!(backoff(2), Duration::from_millis(750));
        assert_eq!(backoff(3), Duration::from_millis(1125));
        assert_eq!(backoff(20), BACKOFF_MAX);
        assert_eq!(backoff(u32::MAX), BACKOFF_MAX);
    }

    #[test]
    fn describes_exits() {
        let p = Pid::from_raw(1);
        assert_eq!(describe(WaitStatus::Exited(p, 3)), "exited with status 3");
        assert_eq!(describe(WaitStatus::Signaled(p, Signal::SIGSEGV, false)), "killed by SIGSEGV");
    }
}
