//! The supervisor: one synchronous loop on the launcher's main thread that owns every worker,
//! every slot and (through [`Listeners`]) every socket.
//!
//! Signals (the signal thread) and notify messages (the notify thread) arrive as [`Event`]s on
//! one crossbeam channel; timers are the loop's receive timeout. One turn of the loop is
//! `tick(now)` (named phases: timers, roll deadline, reconcile, queue watch, steering,
//! announcements), then a wait until [`next_deadline`](Supervisor::next_deadline) or the next
//! event, then `handle(event, now)`. Rolling restarts are decided by the pure
//! [`Roll`](crate::roll::Roll) machine; this module and its children only carry out its actions.
//!
//! The concerns live in the child modules: `workers` (the tables and their queries),
//! `lifecycle` (spawn, stop, reap, backoff, reconcile), `ready` (readiness, rolls), `routing`
//! (serving set, stalls, steering), and `os` (the seam every process effect goes through).

mod autoscaling;
mod binds;
mod commands;
mod drain;
mod hung;
mod lifecycle;
mod memory;
mod os;
mod publish;
mod ready;
mod replace;
mod resume;
mod routing;
mod scale;
#[cfg(test)]
mod tests;
mod workers;

use std::ffi::OsString;
use std::time::Instant;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use signal_hook::consts::signal::*;

pub use memory::group_rss;
pub use os::{Os, RealOs};

use crate::cli::{Config, Ready};
use crate::command::{Identity, Program};
use crate::contract::Contract;
use crate::error::Error;
use crate::event::{Event, Scale, WorkerId};
use crate::notify::NotifyHub;
use crate::proxy::Proxy;
use crate::readiness;
use crate::rescue::Rescue;
use crate::roll::Roll;
use crate::socket::{Listeners, Mode};
use crate::stall::StallWatch;
use crate::upstream::Reporter;
use workers::{Slot, Workers};

/// The processes of each worker's group, from the last scan of /proc, by worker pid.
type Members = std::collections::HashMap<i32, (Vec<i32>, Instant)>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shutdown {
    Graceful,
    Immediate,
}

pub struct Supervisor<O: Os> {
    cfg: Config,
    listeners: Listeners,
    program: Program,
    /// The launcher's environment at start, and what every worker's environment adds to it.
    inherited_env: Vec<(OsString, OsString)>,
    contract: Contract,
    os: O,
    workers: Workers,
    slots: Vec<Slot>,
    roll: Roll,
    notify: Option<NotifyHub>,
    tx: Sender<Event>,
    rx: Receiver<Event>,
    shutdown: Option<Shutdown>,
    /// `--max-memory`: samples over the limit.
    memory: memory::MemoryWatch,
    /// Make-before-break replacements under way (memory, hung; see `replace`).
    replacements: replace::Replacements,
    /// `--hung-timeout`: how long each slot's worker has been stalled (see `hung`).
    hung: hung::HungWatch,
    /// Ends what the workers left if the launcher dies abruptly (see `sentinel`).
    sentinel: Option<crate::sentinel::Sentinel>,
    /// Each worker's cgroup, where one can be made (see `cgroup`).
    containment: crate::cgroup::Containment,
    /// How many slots to keep: `-n`, then `scale`, TTIN and TTOU, and with `-n MIN..MAX` the
    /// automatic scaling.
    desired: usize,
    /// `-n MIN..MAX`: the policy and its samples (see `autoscaling`).
    autoscale: Option<autoscaling::Autoscaling>,
    all_ready_logged: bool,
    /// The slots new connections currently go to (None: all), by BPF steering in reuseport
    /// mode or by the forwarder in round-robin mode.
    steered: Option<Vec<usize>>,
    /// The program attached to the reuseport groups (None: the kernel's hash).
    bpf: Option<Vec<libc::sock_filter>>,
    /// Each slot's load at the last sample (`--steer least-loaded`: see `load`).
    loads: Vec<Option<u32>>,
    /// With --pin: the CPUs the launcher may run on; slot s is pinned to `cpus[s % len]`.
    cpus: Option<Vec<usize>>,
    proxy: Option<Proxy>,
    /// Reuseport and round-robin with several slots: accept queues sampled for stalled workers.
    stalls: Option<(StallWatch, Instant)>,
    /// The processes of the workers that had connections waiting (see `routing`).
    members: Members,
    /// The queue watch's reader of the slots' queues and its cadence (see `queues`); None:
    /// `TCP_INFO` on every listener every 20 ms.
    queues: Option<crate::queues::Queues>,
    /// Takes back connections queued on slots that cannot serve; which slots it takes from.
    rescue: Option<Rescue>,
    rescued: Vec<bool>,
    /// The launcher's own service manager (systemd), if it gave us NOTIFY_SOCKET.
    reporter: Reporter,
    /// --ready auto: each slot's socket inodes (None: /proc cannot tell, use the delay), and
    /// when to look at starting workers next.
    slot_inodes: Option<Vec<Vec<u64>>>,
    next_probe: Option<Instant>,
    /// `--metrics`: what the endpoint's thread reads, and when and from what the loop last
    /// published (see `publish`).
    board: Option<std::sync::Arc<crate::metrics::Board>>,
    published: Option<(Instant, u64)>,
    /// `--drain-delay`: TERM/INT arrived; the workers are stopped at this time.
    drain_until: Option<Instant>,
    /// `--intercept-bind`: whether workers' own binds get their slot's socket (see `binds`).
    intercept: crate::intercept::Interception,
}

impl<O: Os> Supervisor<O> {
    /// Set up everything but the workers: the notify reader, the round-robin forwarder, the
    /// worker contract. Signals are the caller's: start the signal thread on [`sender`]
    /// before [`run`], so that no SIGCHLD can be missed.
    ///
    /// [`sender`]: Supervisor::sender
    /// [`run`]: Supervisor::run
    /// `resumed_on`: a reexec'd image whose old image intercepted workers' binds (it goes on
    /// intercepting without probing again).
    pub fn new(
        cfg: Config,
        mut listeners: Listeners,
        program: Program,
        identity: Option<Identity>,
        os: O,
        resumed_on: bool,
    ) -> Result<Supervisor<O>, Error> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let notify = if cfg.ready == Ready::Notify || cfg.watchdog.is_some() {
            let uid = identity.as_ref().map(|i| i.creds.uid);
            let hub = NotifyHub::start(tx.clone(), uid)
                .map_err(|e| Error::Failed(format!("cannot start the notify reader: {e}")))?;
            Some(hub)
        } else {
            None
        };
        let proxy = match listeners.mode() {
            Mode::RoundRobin => Some(
                Proxy::start(listeners.take_public(), cfg.proxy_threads)
                    .map_err(|e| Error::Failed(format!("cannot start the round-robin forwarder: {e}")))?,
            ),
            _ => None,
        };
        let contract = Contract {
            sockets: listeners.mode() != Mode::SelfBind,
            launcher_pid: std::process::id(),
            identity,
            watchdog: cfg.watchdog,
        };
        // Sockets taken back from the fd store may be for more slots than -n: those retire.
        // As many slots as sockets (after a reexec or a scale, not -n); beyond -n they retire.
        let slots_n = listeners.slot_count().unwrap_or(cfg.workers);
        // With -n MIN..MAX, the sockets' slots (the fd store's) are kept within the bounds.
        let desired_n = cfg.autoscale.map_or(cfg.workers, |b| slots_n.clamp(b.min, b.max));
        let autoscale = cfg.autoscale.map(|b| autoscaling::Autoscaling::new(b, cfg.scale_down_after));
        let slot_inodes = match cfg.ready {
            Ready::Auto(delay) => {
                let inodes: std::io::Result<Vec<Vec<u64>>> =
                    (0..slots_n).map(|s| readiness::socket_inodes(&listeners.fds_for_slot(s))).collect();
                inodes
                    .map_err(|e| {
                        log::warn!("--ready auto cannot name the sockets ({e}); using --ready-delay {delay:?}")
                    })
                    .ok()
            }
            _ => None,
        };
        let stalls = matches!(listeners.mode(), Mode::Reuseport | Mode::RoundRobin)
            .then(|| (StallWatch::new(slots_n), Instant::now()));
        let queues = stalls.as_ref().and_then(|_| {
            crate::queues::Queues::start(tx.clone())
                .map_err(|e| log::warn!("cannot watch the queues with epoll ({e}); sampling every 20 ms"))
                .ok()
        });
        let rescue = match &stalls {
            Some(_) => {
                Some(Rescue::start().map_err(|e| Error::Failed(format!("cannot start the rescue threads: {e}")))?)
            }
            None => None,
        };
        let cpus = cfg.pin.then(allowed_cpus);
        let intercept = crate::intercept::Interception::setup(crate::intercept::Setup {
            setting: cfg.intercept_bind,
            holds_sockets: listeners.mode() != Mode::SelfBind,
            creds: contract.identity.as_ref().map(|i| &i.creds),
            resumed_on,
            events: tx.clone(),
        })
        .map_err(Error::Failed)?;
        let now = Instant::now();
        let slots = (0..slots_n)
            .map(|s| Slot { gen: 1, retiring: (s >= desired_n).then_some(now), ..Slot::default() })
            .collect();
        let mut supervisor = Supervisor {
            roll: Roll::new(cfg.workers, cfg.ready_timeout),
            cfg,
            listeners,
            program,
            inherited_env: std::env::vars_os().collect(),
            contract,
            os,
            workers: Workers::default(),
            slots,
            notify,
            tx,
            rx,
            shutdown: None,
            desired: desired_n,
            autoscale,
            memory: Default::default(),
            replacements: Default::default(),
            hung: Default::default(),
            sentinel: None,
            containment: Default::default(),
            all_ready_logged: false,
            steered: None,
            bpf: None,
            loads: vec![None; slots_n],
            cpus,
            stalls,
            members: Default::default(),
            queues,
            rescue,
            rescued: vec![false; slots_n],
            proxy,
            reporter: Reporter::from_env(Instant::now()),
            slot_inodes,
            next_probe: None,
            board: None,
            published: None,
            drain_until: None,
            intercept,
        };
        supervisor.start_metrics(Instant::now())?;
        Ok(supervisor)
    }

    /// Give the supervisor the sentinel (see `sentinel`), released when it exits in order.
    pub fn set_sentinel(&mut self, sentinel: Option<crate::sentinel::Sentinel>) {
        self.sentinel = sentinel;
    }

    /// Give the supervisor the workers' containment (see `cgroup`).
    pub fn set_containment(&mut self, containment: crate::cgroup::Containment) {
        self.containment = containment;
    }

    /// Where the signal thread sends its events.
    pub fn sender(&self) -> Sender<Event> {
        self.tx.clone()
    }

    /// Start every slot (`fresh`; after a reexec the workers run already), then run until
    /// stopped. Ok(()) is a clean stop (exit 0).
    pub fn run(mut self, fresh: bool) -> Result<(), Error> {
        if fresh {
            self.reporter.store_fds(&self.listeners.store_names());
            self.start_all(Instant::now())?;
        } else {
            // A worker that exited around the exec: its SIGCHLD may have gone with the old image.
            self.reap(Instant::now());
        }
        loop {
            let now = Instant::now();
            if let Err(e) = self.tick(now) {
                self.kill_all_and_reap();
                drop(self.rescue.take());
                if let Some(s) = self.sentinel.take() {
                    s.release();
                }
                return Err(e);
            }
            if self.shutdown.is_some() && self.workers.is_empty() {
                self.containment.finish();
                if let Some(s) = self.sentinel.take() {
                    s.release();
                }
                self.reap_orphans();
                if let Some(n) = self.rescue.as_ref().map(|r| r.relayed()).filter(|n| *n > 0) {
                    log::info!("{n} connections were taken back from stalled or stopped workers and relayed");
                }
                // Its threads poll the listeners' fds: they end before the fds close.
                drop(self.rescue.take());
                log::info!("all workers stopped; exiting");
                return Ok(());
            }
            let closed = || Error::Failed("event channel closed".into());
            let event = match self.next_deadline() {
                Some(at) => match self.rx.recv_timeout(at.saturating_duration_since(Instant::now())) {
                    Ok(ev) => Some(ev),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => return Err(closed()),
                },
                None => Some(self.rx.recv().map_err(|_| closed())?),
            };
            if let Some(ev) = event {
                self.handle(ev, Instant::now());
            }
        }
    }

    /// The first worker of every slot; any failure to start one is fatal (nothing is left).
    fn start_all(&mut self, now: Instant) -> Result<(), Error> {
        for slot in 0..self.desired {
            if self.slots[slot].retiring.is_some() {
                continue;
            }
            if let Err(e) = self.spawn(slot, 1, false, now) {
                self.kill_all_and_reap();
                let user = self.contract.identity.as_ref().map(|i| format!(" as user {}", i.name)).unwrap_or_default();
                return Err(Error::Failed(format!("cannot start '{}'{user}: {e}", self.program.display)));
            }
        }
        Ok(())
    }

    fn handle(&mut self, ev: Event, now: Instant) {
        match ev {
            Event::Signal(SIGCHLD) => self.reap(now),
            Event::Signal(SIGTERM) => self.stop_signal("TERM", now),
            Event::Signal(SIGINT) => self.stop_signal("INT", now),
            Event::Signal(SIGQUIT) => self.stop_all(Shutdown::Immediate, now),
            Event::Signal(sig @ (SIGUSR2 | SIGHUP | SIGTTIN | SIGTTOU))
                if self.refused_while_draining(if sig == SIGTTIN || sig == SIGTTOU { "scaling" } else { "roll" }) => {}
            Event::Signal(SIGUSR2) => self.request_roll("USR2", now),
            Event::Signal(SIGHUP) => self.request_roll("HUP", now),
            Event::Signal(SIGTTIN) => {
                self.scale(Scale::By(1), "TTIN", now).map(drop).unwrap_or_else(|e| log::warn!("{e}"))
            }
            Event::Signal(SIGTTOU) => {
                self.scale(Scale::By(-1), "TTOU", now).map(drop).unwrap_or_else(|e| log::warn!("{e}"))
            }
            Event::Signal(other) => log::debug!("ignoring signal {other}"),
            Event::Notify(id, fields) => self.on_notify(id, fields, now),
            Event::Held(id, held) => self.intercept_held(id, held),
            Event::Queued => self.on_queued(now),
            Event::Control(command, reply) => {
                // The control thread waits for this answer, never the other way round.
                let _ = reply.send(self.command(command, now));
            }
        }
    }

    fn on_notify(&mut self, id: WorkerId, fields: Vec<(String, String)>, now: Instant) {
        let Some(label) = self.workers.get(id).map(|w| w.label()) else { return };
        for (k, v) in fields {
            match (k.as_str(), v.as_str()) {
                ("READY", "1") => self.mark_ready(id, now),
                ("WATCHDOG", "1") => self.feed_watchdog(id, now),
                ("WATCHDOG", "trigger") => {
                    log::warn!("{label} asked to be restarted (WATCHDOG=trigger)");
                    self.stop_faulty(id, "watchdog", now);
                }
                ("STOPPING", "1") => log::info!("{label} says it is stopping"),
                ("STATUS", status) => log::info!("{label} status: {status}"),
                _ => {}
            }
        }
    }

    /// Everything that is due at `now`, in order.
    fn tick(&mut self, now: Instant) -> Result<(), Error> {
        self.kill_overdue(now);
        self.drain_due(now);
        self.fire_timers(now);
        self.reporter.tick(now);
        let actions = self.roll.step(crate::roll::Input::Tick, now);
        self.apply(actions, now);
        self.autoscale(now);
        self.rescale(now);
        self.replacements_due(now);
        self.watch_memory(now);
        self.reconcile(now)?;
        self.watch_queues(now);
        self.steer(now);
        self.announce_ready();
        self.report_status();
        self.publish(now);
        Ok(())
    }

    /// The earliest timer: readiness delays and deadlines, grace kills, respawns, watchdogs,
    /// the roll's deadline, the launcher's own pings, probes and queue samples.
    fn next_deadline(&self) -> Option<Instant> {
        use workers::State;
        let workers = self.workers.iter().filter_map(|(_, w)| match w.state {
            State::Starting { ready_at, deadline } => Some(ready_at.map_or(deadline, |r| r.min(deadline))),
            State::Stopping { kill_at, killed: false } => Some(kill_at),
            _ => None,
        });
        let slots = self.slots.iter().filter_map(|s| s.respawn_at);
        let watchdogs = self.workers.iter().filter(|(_, w)| w.state == State::Ready).filter_map(|(_, w)| w.watchdog_at);
        workers
            .chain(slots)
            .chain(watchdogs)
            .chain(self.roll.deadline())
            .chain(self.reporter.next_deadline())
            .chain(self.next_probe())
            .chain(self.next_sample())
            .chain(self.next_memory_sample())
            .chain(self.next_autoscale())
            .chain(self.drain_until.filter(|_| self.shutdown.is_none()))
            .chain(self.next_beat())
            .min()
    }

    /// STATUS= to the service manager whenever the picture changes.
    fn report_status(&mut self) {
        if !self.reporter.active() {
            return;
        }
        let gen = self.slots.iter().map(|s| s.gen).max().unwrap_or(1);
        let mut status = format!("{}/{} workers ready, gen {gen}", self.workers.ready_count(), self.desired);
        if let Some(g) = self.roll.rolling_gen() {
            status.push_str(&format!(", rolling to gen {g}"));
        }
        if self.shutdown.is_some() {
            status = format!("stopping, {} workers left", self.workers.len());
        } else if self.drain_until.is_some() {
            status = format!("draining before the stop, {}/{} workers ready", self.workers.ready_count(), self.desired);
        }
        self.reporter.status(status);
    }
}

/// The CPUs this process may run on (its affinity, which follows a container's cpuset).
fn allowed_cpus() -> Vec<usize> {
    let cpus: Vec<usize> = match nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)) {
        Ok(set) => (0..nix::sched::CpuSet::count()).filter(|c| set.is_set(*c).unwrap_or(false)).collect(),
        Err(e) => {
            log::warn!("cannot read the launcher's CPU affinity ({e}); pinning to CPU 0 and up");
            Vec::new()
        }
    };
    if cpus.is_empty() {
        let n = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        return (0..n).collect();
    }
    cpus
}
