//! The supervisor: one synchronous loop on the launcher's main thread that owns every worker,
//! every slot and (through [`Listeners`]) every socket.
//!
//! Signals (the signal thread) and notify messages (the notify thread) arrive as [`Event`]s on
//! one crossbeam channel (`inbox`); timers are the loop's receive timeout. One turn of the loop
//! is `tick(now)` (named phases: timers, roll deadline, reconcile, queue watch, steering,
//! announcements), then a wait until [`next_deadline`](Supervisor::next_deadline) or the next
//! event, then `handle(event, now)`. Rolling restarts are decided by the pure
//! [`Roll`] machine, respawns, give-up and scaling steps by the pure
//! functions of `plan`; this module and its children only carry out their actions.
//!
//! Each field of [`Supervisor`] has one owner. The concerns live in the child modules:
//! `workers` (the workers' table and its queries; [`Slots`], one record per slot), `lifecycle`
//! (spawn, stop, reap, backoff, reconcile), `ready` (readiness, rolls), `routing` (the
//! [`Router`]: serving set, steering, rescue) with `sampling` (the queue and stall watch),
//! `scale` (`scale`, and adding and retiring slots), `drain` (the drain delay and the stop),
//! and `os` (the seam every process effect and every read routing makes goes through).

mod autoscaling;
mod binds;
mod commands;
mod drain;
mod hung;
mod inbox;
mod lifecycle;
mod memory;
mod os;
mod plan;
mod publish;
mod ready;
mod replace;
mod resume;
mod routing;
mod sampling;
mod scale;
#[cfg(test)]
mod tests;
mod workers;

use std::ffi::OsString;
use std::time::Instant;

use crossbeam_channel::Sender;
use signal_hook::consts::signal::*;

pub use os::{Os, RealOs};

use crate::cli::Config;
use crate::command::{Identity, Program};
use crate::contract::Contract;
use crate::error::Error;
use crate::event::{Event, Scale, WorkerId};
use crate::roll::Roll;
use crate::socket::{Listeners, Mode};
use drain::{Shutdown, Stop};
use inbox::Channels;
use publish::Publishing;
use routing::Router;
use scale::Scaling;
use workers::{Slots, Workers};

pub struct Supervisor<O: Os> {
    cfg: Config,
    listeners: Listeners,
    /// What every worker is started from: the program, the environment, the contract.
    launch: Launch,
    os: O,
    workers: Workers,
    slots: Slots,
    roll: Roll,
    /// Where new connections go (see `routing`).
    router: Router,
    /// Events in (signals, notify messages, control commands, queue wakes).
    channels: Channels,
    /// The watches over running workers: memory, hangs, replacements, readiness probes.
    watches: Watches,
    /// How many slots to keep (`scale`), and `-n MIN..MAX`'s policy.
    scaling: Scaling,
    /// What the outside is told: the service manager, `--metrics`.
    publishing: Publishing,
    /// TERM/INT/QUIT: the drain delay and the stop.
    halt: Stop,
    /// Ends what the workers left if the launcher dies abruptly (see `sentinel`), and each
    /// worker's cgroup, where one can be made (see `cgroup`).
    guards: Guards,
    /// `--intercept-bind`: whether workers' own binds get their slot's socket (see `binds`).
    intercept: crate::intercept::Interception,
}

/// What every worker is started from.
struct Launch {
    program: Program,
    /// The launcher's environment at start, and what every worker's environment adds to it.
    inherited_env: Vec<(OsString, OsString)>,
    contract: Contract,
}

impl Launch {
    /// The launcher's error when a first worker cannot start.
    fn cannot_start(&self, e: std::io::Error) -> Error {
        let user = self.contract.identity.as_ref().map(|i| format!(" as user {}", i.name)).unwrap_or_default();
        Error::Failed(format!("cannot start '{}'{user}: {e}", self.program.display))
    }
}

/// The watches over running workers.
#[derive(Debug, Default)]
struct Watches {
    /// `--max-memory`: samples over the limit.
    memory: memory::MemoryWatch,
    /// Make-before-break replacements under way (memory, hung; see `replace`).
    replacements: replace::Replacements,
    /// `--hung-timeout`: how long each slot's worker has been stalled (see `hung`).
    hung: hung::HungWatch,
    /// `--ready auto`: when to look at starting workers next.
    next_probe: Option<Instant>,
}

impl Watches {
    /// Worker `id` exited: forget its samples and any replacement it was.
    fn forget(&mut self, id: WorkerId) {
        self.memory.forget(id);
        if self.replacements.forget(id) {
            log::warn!("the replacement worker exited before it was ready; the old one keeps serving");
        }
    }
}

/// What outlives or contains the workers.
#[derive(Default)]
struct Guards {
    sentinel: Option<crate::sentinel::Sentinel>,
    containment: crate::cgroup::Containment,
}

impl Guards {
    /// Release the sentinel: the launcher exits in order (or fails with its workers killed).
    fn release(&mut self) {
        if let Some(s) = self.sentinel.take() {
            s.release();
        }
    }
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
        let channels = Channels::open(&cfg, identity.as_ref())?;
        let router = Router::new(&cfg, &mut listeners, &channels.tx)?;
        let contract = Contract {
            sockets: listeners.mode() != Mode::SelfBind,
            launcher_pid: std::process::id(),
            identity,
            watchdog: cfg.watchdog,
        };
        // Sockets taken back from the fd store may be for more slots than -n: those retire.
        // As many slots as sockets (after a reexec or a scale, not -n); beyond -n they retire.
        let slots_n = listeners.slot_count().unwrap_or(cfg.workers);
        let scaling = Scaling::new(&cfg, slots_n);
        let intercept = crate::intercept::Interception::setup(crate::intercept::Setup {
            setting: cfg.intercept_bind,
            holds_sockets: listeners.mode() != Mode::SelfBind,
            creds: contract.identity.as_ref().map(|i| &i.creds),
            resumed_on,
            events: channels.tx.clone(),
        })
        .map_err(Error::Failed)?;
        let slots = Slots::at_start(&cfg, &listeners, slots_n, scaling.desired);
        let mut supervisor = Supervisor {
            roll: Roll::new(cfg.workers, cfg.ready_timeout),
            launch: Launch { program, inherited_env: std::env::vars_os().collect(), contract },
            os,
            workers: Workers::default(),
            slots,
            router,
            channels,
            watches: Watches::default(),
            scaling,
            publishing: Publishing::new(Instant::now()),
            halt: Stop::default(),
            guards: Guards::default(),
            intercept,
            cfg,
            listeners,
        };
        supervisor.start_metrics(Instant::now())?;
        Ok(supervisor)
    }

    /// Give the supervisor the sentinel (see `sentinel`), released when it exits in order.
    pub fn set_sentinel(&mut self, sentinel: Option<crate::sentinel::Sentinel>) {
        self.guards.sentinel = sentinel;
    }

    /// Give the supervisor the workers' containment (see `cgroup`).
    pub fn set_containment(&mut self, containment: crate::cgroup::Containment) {
        self.guards.containment = containment;
    }

    /// Where the signal thread sends its events.
    pub fn sender(&self) -> Sender<Event> {
        self.channels.tx.clone()
    }

    /// Start every slot (`fresh`; after a reexec the workers run already), then run until
    /// stopped. Ok(()) is a clean stop (exit 0).
    pub fn run(mut self, fresh: bool) -> Result<(), Error> {
        if fresh {
            self.publishing.reporter.store_fds(&self.listeners.store_names());
            self.start_all(Instant::now())?;
        } else {
            // A worker that exited around the exec: its SIGCHLD may have gone with the old image.
            self.reap(Instant::now());
        }
        loop {
            let now = Instant::now();
            if let Err(e) = self.tick(now) {
                self.kill_all_and_reap();
                self.router.end_rescue(false);
                self.guards.release();
                return Err(e);
            }
            if self.halt.shutdown.is_some() && self.workers.is_empty() {
                self.guards.containment.finish();
                self.guards.release();
                self.reap_orphans();
                // Its threads poll the listeners' fds: they end before the fds close.
                self.router.end_rescue(true);
                log::info!("all workers stopped; exiting");
                return Ok(());
            }
            if let Some(ev) = self.channels.next(self.next_deadline())? {
                self.handle(ev, Instant::now());
            }
        }
    }

    /// The first worker of every slot; any failure to start one is fatal (nothing is left).
    fn start_all(&mut self, now: Instant) -> Result<(), Error> {
        for slot in 0..self.scaling.desired {
            if self.slots[slot].retiring.is_some() {
                continue;
            }
            if let Err(e) = self.spawn(slot, 1, false, now) {
                self.kill_all_and_reap();
                return Err(self.launch.cannot_start(e));
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
            Event::Signal(sig @ (SIGUSR2 | SIGHUP | SIGTTIN | SIGTTOU)) => {
                let what = if sig == SIGTTIN || sig == SIGTTOU { "scaling" } else { "roll" };
                if let Err(e) = self.halt.refuse_while_draining() {
                    log::warn!("{what}: ignored, {e}");
                    return;
                }
                match sig {
                    SIGUSR2 => self.request_roll("USR2", now),
                    SIGHUP => self.request_roll("HUP", now),
                    SIGTTIN => self.scale(Scale::By(1), "TTIN", now).map(drop).unwrap_or_else(|e| log::warn!("{e}")),
                    _ => self.scale(Scale::By(-1), "TTOU", now).map(drop).unwrap_or_else(|e| log::warn!("{e}")),
                }
            }
            Event::Signal(other) => log::debug!("ignoring signal {other}"),
            Event::Notify(id, fields) => self.on_notify(id, fields, now),
            Event::Held(id, held) => self.intercept_held(id, held),
            Event::Queued => self.router.wake(now),
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
        self.publishing.reporter.tick(now);
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
            .chain(self.publishing.reporter.next_deadline())
            .chain(self.next_probe())
            .chain(self.next_sample())
            .chain(self.next_memory_sample())
            .chain(self.next_autoscale())
            .chain(self.halt.drain_until.filter(|_| self.halt.shutdown.is_none()))
            .chain(self.next_beat())
            .min()
    }

    /// STATUS= to the service manager whenever the picture changes.
    fn report_status(&mut self) {
        if !self.publishing.reporter.active() {
            return;
        }
        let (ready, desired) = (self.workers.ready_count(), self.scaling.desired);
        let mut status = format!("{ready}/{desired} workers ready, gen {}", self.slots.gen());
        if let Some(g) = self.roll.rolling_gen() {
            status.push_str(&format!(", rolling to gen {g}"));
        }
        if self.halt.shutdown.is_some() {
            status = format!("stopping, {} workers left", self.workers.len());
        } else if self.halt.drain_until.is_some() {
            status = format!("draining before the stop, {ready}/{desired} workers ready");
        }
        self.publishing.reporter.status(status);
    }
}
