//! Where new connections go, and what happens to connections already queued on a slot that
//! cannot take them: the [`Router`] owns the serving set (slots with a ready worker that is
//! neither being replaced nor stalled), the stall watch over the accept queues (`sampling`),
//! steering (BPF programs of the reuseport groups, or the forwarder's backend list in
//! round-robin mode), and the rescue of queued connections (`rescue`: the launcher accepts them
//! on the slot's listener it holds and relays each through the public address, where steering
//! sends it to a serving slot). What it keeps per slot is in the slot's record (`SlotRoute`).
//!
//! A slot's queue is rescued while the slot is out of the serving set because it is stalled or
//! has no ready worker (crashed, in backoff), and some other slot serves; never while new
//! connections could still be steered to it (a relayed connection would come back).

use std::net::SocketAddr;
use std::time::Instant;

use crossbeam_channel::Sender;

use super::os::Os;
use super::replace::Replacements;
use super::workers::{Slots, Workers};
use super::Supervisor;
use crate::cli::{Config, Steer};
use crate::error::Error;
use crate::event::Event;
use crate::proxy::Proxy;
use crate::rescue::{loopback, Rescue};
use crate::socket::{Listeners, Mode};
use crate::steer::{self, Program};

/// What routing reads of the rest of the supervisor.
pub(super) struct Fleet<'a> {
    pub workers: &'a Workers,
    pub listeners: &'a Listeners,
    pub replacements: &'a Replacements,
    /// The launcher stops: nothing is rescued any more.
    pub stopping: bool,
    /// Every slot has had a ready worker (before that, changes of the serving set are quiet).
    pub announced: bool,
}

impl<'a> Fleet<'a> {
    pub fn of(
        workers: &'a Workers,
        listeners: &'a Listeners,
        watches: &'a super::Watches,
        stop: &super::drain::Stop,
        publishing: &super::publish::Publishing,
    ) -> Fleet<'a> {
        Fleet {
            workers,
            listeners,
            replacements: &watches.replacements,
            stopping: stop.shutdown.is_some(),
            announced: publishing.all_ready_logged,
        }
    }

    /// `slot`'s worker is stalled, or is hung and being replaced (see `hung`): no new
    /// connections, and its queue is relayed, even while a probation lets a hung one back in.
    pub fn held_out(&self, slots: &Slots, slot: usize) -> bool {
        slots[slot].route.stall.why().is_some() || self.replacements.on(slot, "hung")
    }

    /// The slots that should take new connections, best first: those with a ready worker that
    /// is neither being replaced nor stalled; failing that, those whose only change under way
    /// is a roll's new worker still starting (their old worker has had no stop signal yet);
    /// failing that, every slot with a ready worker.
    pub fn serving(&self, slots: &Slots) -> Vec<usize> {
        // Being replaced: a new worker is starting there, or the old one is draining. Keeping
        // new connections away until the old worker has exited means it cannot accept one
        // after its stop signal (servers that close accepted-but-unread connections on
        // shutdown, such as uvicorn, would drop it).
        let stalled = |s: usize| self.held_out(slots, s);
        let w = self.workers;
        let all: Vec<usize> = (0..slots.len()).filter(|s| w.ready_on(*s) && slots[*s].retiring.is_none()).collect();
        let tiers: [&dyn Fn(usize) -> bool; 2] =
            [&|s| !w.replacing(s) && !stalled(s), &|s| !w.draining(s) && !stalled(s)];
        for tier in tiers {
            let serving: Vec<usize> = all.iter().copied().filter(|s| tier(*s)).collect();
            if !serving.is_empty() {
                return serving;
            }
        }
        all
    }
}

pub(super) struct Router {
    steer: Steer,
    /// The slots new connections currently go to (None: all), by BPF steering in reuseport
    /// mode or by the forwarder in round-robin mode.
    steered: Option<Vec<usize>>,
    /// The program attached to the reuseport groups (None: the kernel's hash).
    bpf: Option<Vec<libc::sock_filter>>,
    /// With --pin: the CPUs the launcher may run on; slot s is pinned to `cpus[s % len]`.
    cpus: Option<Vec<usize>>,
    proxy: Option<Proxy>,
    /// Takes back connections queued on slots that cannot serve; which slots it takes from is
    /// each slot's `rescued`.
    rescue: Option<Rescue>,
    /// The stall watch and its queue samples (None: shared and self modes, nothing to steer).
    sampling: Option<super::sampling::Sampling>,
}

impl Router {
    /// Reuseport and round-robin modes watch the queues and rescue; round-robin mode starts
    /// the forwarder on the public sockets.
    pub(super) fn new(cfg: &Config, listeners: &mut Listeners, tx: &Sender<Event>) -> Result<Router, Error> {
        let proxy = match listeners.mode() {
            Mode::RoundRobin => Some(
                Proxy::start(listeners.take_public(), cfg.proxy_threads)
                    .map_err(|e| Error::Failed(format!("cannot start the round-robin forwarder: {e}")))?,
            ),
            _ => None,
        };
        let watched = matches!(listeners.mode(), Mode::Reuseport | Mode::RoundRobin);
        let sampling = watched.then(|| super::sampling::Sampling::start(tx));
        let rescue = match watched {
            true => Some(Rescue::start().map_err(|e| Error::Failed(format!("cannot start the rescue threads: {e}")))?),
            false => None,
        };
        let cpus = cfg.pin.then(allowed_cpus);
        Ok(Router { steer: cfg.steer, steered: None, bpf: None, cpus, proxy, rescue, sampling })
    }

    /// Sample the accept queues when due (see `sampling`); the samples, for the hung clock.
    pub(super) fn sample(
        &mut self,
        now: Instant,
        slots: &mut Slots,
        (workers, listeners): (&Workers, &Listeners),
        os: &impl Os,
    ) -> Option<Vec<crate::stall::Sample>> {
        self.sampling.as_mut()?.sample(now, slots, (workers, listeners), os, self.steer)
    }

    /// When the next queue sample is due (None: nothing to watch).
    pub(super) fn next_sample(&self, workers: &Workers) -> Option<Instant> {
        self.sampling.as_ref().and_then(|s| s.next(workers))
    }

    /// A connection waits on a listener: sample now.
    pub(super) fn wake(&mut self, now: Instant) {
        if let Some(sampling) = &mut self.sampling {
            sampling.wake(now);
        }
    }

    /// The processes of worker `pid`'s group, as the queue watch last scanned them.
    pub(super) fn members_of(&self, pid: i32) -> Vec<i32> {
        self.sampling.as_ref().map_or_else(|| vec![pid], |s| s.members_of(pid))
    }

    /// With --pin: the CPU `slot`'s worker runs on.
    pub(super) fn cpu_for(&self, slot: usize) -> Option<usize> {
        self.cpus.as_ref().map(|cpus| cpus[slot % cpus.len()])
    }

    /// Where new connections go now (None: all), for the published view's fingerprint.
    pub(super) fn steered(&self) -> &Option<Vec<usize>> {
        &self.steered
    }

    /// Steering leaves a slot out for sure when it does not serve: the forwarder, or the
    /// reuseport groups' programs (in the other modes the slots share the sockets).
    pub(super) fn steers(&self, listeners: &Listeners) -> bool {
        self.proxy.is_some() || !listeners.groups().is_empty()
    }

    /// Whatever is attached now is to be replaced at the next turn (the slot count changed, or
    /// the old image's program is still attached after a reexec).
    pub(super) fn forget_program(&mut self) {
        self.bpf = Some(Vec::new());
        self.steered = Some(Vec::new());
    }

    /// Connections relayed now (`reexec` waits for none).
    pub(super) fn carrying(&self) -> usize {
        self.rescue.as_ref().map_or(0, |r| r.carrying())
    }

    /// The rescue lets go of `slot`'s fds before they close; false while its thread holds them.
    pub(super) fn let_go(&self, slot: usize, fds: &[std::os::fd::RawFd]) -> bool {
        self.rescue.as_ref().is_none_or(|r| r.let_go(slot, fds))
    }

    /// Stop the rescue's threads (they poll the listeners' fds: before those close), saying
    /// how many connections were relayed.
    pub(super) fn end_rescue(&mut self, say: bool) {
        if let Some(n) = self.rescue.as_ref().map(|r| r.relayed()).filter(|n| *n > 0 && say) {
            log::info!("{n} connections were taken back from stalled or stopped workers and relayed");
        }
        drop(self.rescue.take());
    }

    /// Send new connections only to the `serving` slots: the `--steer` program of each
    /// reuseport group (see `steer`), or the forwarder's backend list in round-robin mode.
    /// Then take back what waits on slots that cannot serve.
    pub(super) fn steer(
        &mut self,
        now: Instant,
        serving: &[usize],
        slots: &mut Slots,
        fleet: &Fleet,
        os: &mut impl Os,
    ) {
        let groups = fleet.listeners.groups();
        if groups.is_empty() && self.proxy.is_none() {
            return;
        }
        let all = serving.is_empty() || serving.len() == slots.len();
        let wanted = if all && self.proxy.is_none() { None } else { Some(serving.to_vec()) };
        if wanted != self.steered {
            self.route_to(serving, wanted, slots.len(), fleet);
        }
        if !groups.is_empty() {
            let program = self.program_for(serving, slots);
            if program != self.bpf {
                for &(member, _) in &groups {
                    if let Err(e) = os.steer(member, program.as_deref()) {
                        log::warn!("cannot steer new connections ({:?}): {e}", self.steer);
                        note_exclusions(slots, serving, false, now);
                        return;
                    }
                }
                self.bpf = program;
            }
        }
        // Left out for sure: by the forwarder, or by an attached program (none: the hash).
        let sure = self.proxy.is_some() || self.bpf.is_some();
        note_exclusions(slots, serving, sure, now);
        self.rescue_stranded(serving, slots, fleet);
    }

    /// The program for the reuseport groups, or None for the kernel's own hash.
    fn program_for(&self, serving: &[usize], slots: &Slots) -> Option<Vec<libc::sock_filter>> {
        let every = serving.len() == slots.len();
        if serving.is_empty() {
            return None;
        }
        match self.steer {
            Steer::Hash if every => None,
            Steer::Hash => Some(steer::build(&Program::Uniform(serving))),
            Steer::Ip => Some(steer::build(&Program::SourceIp { serving })),
            Steer::Cpu => {
                let cpus = self.cpus.as_deref().unwrap_or(&[0]);
                let pinned = |slot: usize| cpus[slot % cpus.len()];
                let table: Vec<usize> = (0..=cpus.iter().copied().max().unwrap_or(0))
                    .map(|cpu| {
                        serving.iter().copied().find(|s| pinned(*s) == cpu).unwrap_or(serving[cpu % serving.len()])
                    })
                    .collect();
                Some(steer::build(&Program::Cpu { cpu_to_slot: &table }))
            }
            Steer::LeastLoaded => {
                let weights: Vec<(usize, u32)> =
                    serving.iter().map(|&s| (s, crate::load::weight(slots[s].route.load))).collect();
                let loads: Vec<Option<u32>> = slots.iter().map(|s| s.route.load).collect();
                log::trace!("least-loaded: loads {loads:?}, weights {weights:?}");
                let equal = weights.iter().all(|w| w.1 == weights[0].1);
                match (equal, every) {
                    (true, true) => None,
                    (true, false) => Some(steer::build(&Program::Uniform(serving))),
                    (false, _) => Some(steer::build(&Program::Weighted(&weights))),
                }
            }
        }
    }

    /// The serving set changed: the forwarder's backends, and the log line.
    fn route_to(&mut self, serving: &[usize], wanted: Option<Vec<usize>>, slots: usize, fleet: &Fleet) {
        let listeners = fleet.listeners;
        if let Some(proxy) = &self.proxy {
            let chosen = wanted.clone().unwrap_or_default();
            let per_slot: Vec<Vec<(SocketAddr, std::os::fd::RawFd)>> = chosen
                .iter()
                .map(|s| listeners.private_addrs(*s).into_iter().zip(listeners.fds_for_slot(*s)).collect())
                .collect();
            let binds = listeners.local_addrs().len();
            proxy.set_backends((0..binds).map(|b| per_slot.iter().map(|a| a[b]).collect()).collect());
        }
        let partial = wanted.as_ref().is_some_and(|s| s.len() < slots);
        if !fleet.announced || fleet.stopping {
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

    /// Rescue the queues of the slots that are out of the serving set because they are stalled
    /// or have no ready worker, while another slot serves; release the others.
    fn rescue_stranded(&mut self, serving: &[usize], slots: &mut Slots, fleet: &Fleet) {
        let Some(rescue) = &self.rescue else { return };
        for slot in 0..slots.len() {
            let stranded = !fleet.stopping
                && !serving.is_empty()
                && !serving.contains(&slot)
                && (fleet.held_out(slots, slot) || !fleet.workers.ready_on(slot));
            if stranded == slots[slot].route.rescued {
                continue;
            }
            slots[slot].route.rescued = stranded;
            if stranded {
                let fds = fleet.listeners.fds_for_slot(slot);
                let addrs = fleet.listeners.local_addrs().iter().map(|a| loopback(*a));
                let targets: Vec<_> = fds.into_iter().zip(addrs).collect();
                log::debug!("taking back the connections queued on slot {slot}");
                rescue.take(slot, &targets);
            } else {
                log::debug!("slot {slot}'s queue is its worker's again ({} relayed so far)", rescue.relayed_from(slot));
                rescue.release(slot);
            }
        }
    }
}

/// Since when each retiring slot has surely got no new connection.
fn note_exclusions(slots: &mut Slots, serving: &[usize], sure: bool, now: Instant) {
    for (i, slot) in slots.iter_mut().enumerate() {
        if slot.retiring.is_some() && sure && !serving.contains(&i) {
            slot.excluded_at.get_or_insert(now);
        } else {
            slot.excluded_at = None;
        }
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

impl<O: Os> Supervisor<O> {
    /// What routing reads of the supervisor now.
    pub(super) fn fleet(&self) -> Fleet<'_> {
        Fleet::of(&self.workers, &self.listeners, &self.watches, &self.halt, &self.publishing)
    }

    pub(super) fn serving_slots(&self) -> Vec<usize> {
        self.fleet().serving(&self.slots)
    }

    /// Steer new connections to the serving slots (see [`Router::steer`]).
    pub(super) fn steer(&mut self, now: Instant) {
        let serving = self.serving_slots();
        let fleet = Fleet::of(&self.workers, &self.listeners, &self.watches, &self.halt, &self.publishing);
        self.router.steer(now, &serving, &mut self.slots, &fleet, &mut self.os);
    }

    /// When the next queue sample is due (None: nothing to watch).
    pub(super) fn next_sample(&self) -> Option<Instant> {
        self.router.next_sample(&self.workers)
    }

    /// Sample the accept queues when due (see `sampling`), then give the hung clock the sample.
    pub(super) fn watch_queues(&mut self, now: Instant) {
        let tables = (&self.workers, &self.listeners);
        if let Some(samples) = self.router.sample(now, &mut self.slots, tables, &self.os) {
            self.watch_hung(now, &samples);
        }
    }
}
