//! Where new connections go, and what happens to connections already queued on a slot that
//! cannot take them: the serving set (slots with a ready worker that is neither being replaced
//! nor stalled), the stall watch over the accept queues, steering (BPF programs of the
//! reuseport groups, or the forwarder's backend list in round-robin mode), and the rescue of
//! queued connections (`rescue`: the launcher accepts them on the slot's listener it holds and
//! relays each through the public address, where steering sends it to a serving slot).
//!
//! A slot's queue is rescued while the slot is out of the serving set because it is stalled or
//! has no ready worker (crashed, in backoff), and some other slot serves; never while new
//! connections could still be steered to it (a relayed connection would come back).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::os::Os;
use super::Supervisor;
use crate::cli::Steer;
use crate::readiness;
use crate::rescue::loopback;
use crate::stall::{self, Sample, StallWatch, Why};
use crate::steer::{self, Program};

/// `--steer least-loaded`: a slot's weight from its load at the last sample (queue plus held
/// connections, see `load`; unknown counts as 0).
fn load_weight(load: Option<u32>) -> u32 {
    crate::load::weight(load)
}

/// How long a worker's list of processes (one scan of /proc) is trusted.
const MEMBERS_TTL: Duration = Duration::from_secs(1);

impl<O: Os> Supervisor<O> {
    /// The slots that should take new connections, best first: those with a ready worker that
    /// is neither being replaced nor stalled; failing that, those whose only change under way
    /// is a roll's new worker still starting (their old worker has had no stop signal yet);
    /// failing that, every slot with a ready worker.
    pub(super) fn serving_slots(&self) -> Vec<usize> {
        // Being replaced: a new worker is starting there, or the old one is draining. Keeping
        // new connections away until the old worker has exited means it cannot accept one
        // after its stop signal (servers that close accepted-but-unread connections on
        // shutdown, such as uvicorn, would drop it).
        let stalled = |s: usize| self.held_out(s);
        let all: Vec<usize> =
            (0..self.slots.len()).filter(|s| self.workers.ready_on(*s) && self.slots[*s].retiring.is_none()).collect();
        let tiers: [&dyn Fn(usize) -> bool; 2] =
            [&|s| !self.workers.replacing(s) && !stalled(s), &|s| !self.workers.draining(s) && !stalled(s)];
        for tier in tiers {
            let slots: Vec<usize> = all.iter().copied().filter(|s| tier(*s)).collect();
            if !slots.is_empty() {
                return slots;
            }
        }
        all
    }

    /// `slot`'s worker is stalled, or is hung and being replaced (see `hung`): no new
    /// connections, and its queue is relayed, even while a probation lets a hung one back in.
    fn held_out(&self, slot: usize) -> bool {
        self.stalls.as_ref().is_some_and(|(w, _)| w.is_stalled(slot)) || self.replacements.on(slot, "hung")
    }

    /// Sample every slot's accept queue (at the `queues::Cadence`: every 20 ms while anything
    /// waits or changes, every second otherwise, and at once when a connection arrives) and log
    /// stalls. The /proc reads happen only for slots with connections waiting.
    pub(super) fn watch_queues(&mut self, now: Instant) {
        match &self.stalls {
            Some((_, next)) if now >= *next && !self.workers.is_empty() => {}
            _ => return,
        }
        let slots = self.slots.len();
        let layout: Vec<Vec<std::os::fd::RawFd>> = (0..slots).map(|s| self.listeners.fds_for_slot(s)).collect();
        let queues: Vec<Option<u32>> = match &mut self.queues {
            Some(q) => {
                q.sync(layout);
                q.read()
            }
            None => layout.iter().map(|fds| crate::queues::max_len(fds)).collect(),
        };
        // The worker each slot's record follows: its ready one, else its live one.
        let workers: Vec<Option<i32>> = (0..slots)
            .map(|s| {
                let mut on = self.workers.on(s).filter(|(_, w)| !w.is_stopping());
                let ready = self.workers.on(s).find(|(_, w)| w.state == super::workers::State::Ready);
                ready.or_else(|| on.next()).map(|(_, w)| w.pid.as_raw())
            })
            .collect();
        let waiting: Vec<i32> = (0..slots)
            .filter(|s| matches!(queues[*s], Some(n) if n > 0))
            .filter_map(|s| workers[s])
            .filter(|pid| self.members.get(pid).is_none_or(|(_, at)| now.duration_since(*at) >= MEMBERS_TTL))
            .collect();
        if !waiting.is_empty() {
            for (pid, pids) in waiting.iter().zip(readiness::groups_members(&waiting)) {
                self.members.insert(*pid, (pids, now));
            }
        }
        let live: std::collections::HashSet<i32> = self.workers.iter().map(|(_, w)| w.pid.as_raw()).collect();
        self.members.retain(|pid, _| live.contains(pid));
        let samples: Vec<Sample> = (0..slots)
            .map(|s| {
                let (stopped, running, cpu) = match (queues[s], workers[s]) {
                    (Some(n), Some(pid)) if n > 0 => {
                        stall::proc_state(self.members.get(&pid).map(|m| m.0.as_slice()).unwrap_or(&[pid]))
                    }
                    (_, Some(pid)) if self.stalls.as_ref().is_some_and(|(w, _)| w.is_stalled(s)) => {
                        stall::proc_state(self.members.get(&pid).map(|m| m.0.as_slice()).unwrap_or(&[pid]))
                    }
                    _ => (false, false, None),
                };
                // A retiring slot is neither judged nor a sign that others keep up; nor is one
                // without a ready worker (just added, in backoff): steering sends it nothing,
                // so its empty queue says nothing of the others (a saturated one-at-a-time
                // worker, whose queue refills as fast as it accepts, was taken for stalled).
                let unserved = self.slots[s].retiring.is_some() || !self.workers.ready_on(s);
                let queue = if unserved { None } else { queues[s] };
                Sample { worker: workers[s], queue, cpu, stopped, running }
            })
            .collect();
        let queued = queues.iter().any(|q| matches!(q, Some(n) if *n > 0));
        if queued {
            if let Some(q) = &mut self.queues {
                q.cadence.busy(now);
            }
        }
        // The held connections are counted only while connections arrive (a wake samples at
        // once): reading every worker's fds once a second while idle would cost per slot.
        let traffic = self.queues.as_ref().is_none_or(|q| q.cadence.traffic(now));
        if self.cfg.steer == Steer::LeastLoaded && traffic {
            // Only a ready worker's fds: a starting one is still opening its own.
            let counts: Vec<Option<u32>> = (0..slots)
                .map(|s| workers[s].filter(|_| self.workers.ready_on(s)).and_then(crate::load::open_sockets))
                .collect();
            let held = crate::load::relative(&counts);
            self.loads = queues.iter().zip(&held).map(|(q, h)| q.map(|q| q + h.unwrap_or(0)).or(*h)).collect();
        }
        // Fast while a queue holds connections, or a worker starts, stops or is stalled.
        let changing = self.workers.iter().any(|(_, w)| w.state != super::workers::State::Ready);
        let Some((watch, next)) = &mut self.stalls else { return };
        let changed = watch.observe(now, &samples);
        let active = queued || changing || (0..slots).any(|s| watch.is_stalled(s));
        *next = now
            + match &mut self.queues {
                Some(q) => {
                    let (delay, idle) = q.cadence.next(now, active);
                    if idle {
                        q.arm();
                    }
                    delay
                }
                None => StallWatch::EVERY,
            };
        for (slot, why) in changed {
            let who = self.workers.ready_label(slot).unwrap_or_else(|| format!("worker {slot}"));
            let waiting = queues[slot].unwrap_or(0);
            match why {
                Some(Why::Frozen) => log::warn!(
                    "{who} is not running ({waiting} connections waiting, no CPU used); new connections go elsewhere and the waiting ones are relayed"
                ),
                Some(Why::NotAccepting) => log::warn!(
                    "{who} has not emptied its queue for {:?} while others did ({waiting} waiting); new connections go elsewhere and the waiting ones are relayed",
                    StallWatch::BUSY_AFTER
                ),
                None => log::info!("{who} gets new connections again"),
            }
        }
        self.watch_hung(now, &samples);
    }

    /// A connection waits somewhere while the queue watch sampled rarely: sample now, and fast.
    pub(super) fn on_queued(&mut self, now: Instant) {
        if let Some(q) = &mut self.queues {
            q.cadence.busy(now);
        }
        if let Some((_, next)) = &mut self.stalls {
            *next = now;
        }
    }

    /// When the next queue sample is due (None: nothing to watch).
    pub(super) fn next_sample(&self) -> Option<Instant> {
        self.stalls.as_ref().filter(|_| !self.workers.is_empty()).map(|(_, next)| *next)
    }

    /// Send new connections only to the serving slots: the `--steer` program of each reuseport
    /// group (see `steer`), or the forwarder's backend list in round-robin mode. Then take back
    /// what waits on slots that cannot serve.
    pub(super) fn steer(&mut self, now: Instant) {
        let groups = self.listeners.groups();
        if groups.is_empty() && self.proxy.is_none() {
            return;
        }
        let serving = self.serving_slots();
        let all = serving.is_empty() || serving.len() == self.slots.len();
        let wanted = if all && self.proxy.is_none() { None } else { Some(serving.clone()) };
        if wanted != self.steered {
            self.route_to(&serving, wanted);
        }
        if !groups.is_empty() {
            let program = self.program_for(&serving);
            if program != self.bpf {
                for &(member, _) in &groups {
                    let done = match &program {
                        Some(p) => steer::attach(member, p),
                        None => steer::detach(member),
                    };
                    if let Err(e) = done {
                        log::warn!("cannot steer new connections ({:?}): {e}", self.cfg.steer);
                        self.note_exclusions(&serving, false, now);
                        return;
                    }
                }
                self.bpf = program;
            }
        }
        // Left out for sure: by the forwarder, or by an attached program (none: the hash).
        let sure = self.proxy.is_some() || self.bpf.is_some();
        self.note_exclusions(&serving, sure, now);
        self.rescue_stranded(&serving);
    }

    /// Since when each retiring slot has surely got no new connection.
    fn note_exclusions(&mut self, serving: &[usize], sure: bool, now: Instant) {
        for (i, slot) in self.slots.iter_mut().enumerate() {
            if slot.retiring.is_some() && sure && !serving.contains(&i) {
                slot.excluded_at.get_or_insert(now);
            } else {
                slot.excluded_at = None;
            }
        }
    }

    /// The program for the reuseport groups, or None for the kernel's own hash.
    fn program_for(&self, serving: &[usize]) -> Option<Vec<libc::sock_filter>> {
        let every = serving.len() == self.slots.len();
        if serving.is_empty() {
            return None;
        }
        match self.cfg.steer {
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
                let weights: Vec<(usize, u32)> = serving.iter().map(|&s| (s, load_weight(self.loads[s]))).collect();
                log::trace!("least-loaded: loads {:?}, weights {weights:?}", self.loads);
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
    fn route_to(&mut self, serving: &[usize], wanted: Option<Vec<usize>>) {
        if let Some(proxy) = &self.proxy {
            let slots = wanted.clone().unwrap_or_default();
            let per_slot: Vec<Vec<(SocketAddr, std::os::fd::RawFd)>> = slots
                .iter()
                .map(|s| self.listeners.private_addrs(*s).into_iter().zip(self.listeners.fds_for_slot(*s)).collect())
                .collect();
            let binds = self.listeners.local_addrs().len();
            proxy.set_backends((0..binds).map(|b| per_slot.iter().map(|a| a[b]).collect()).collect());
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

    /// Rescue the queues of the slots that are out of the serving set because they are stalled
    /// or have no ready worker, while another slot serves; release the others.
    fn rescue_stranded(&mut self, serving: &[usize]) {
        let held: Vec<bool> = (0..self.slots.len()).map(|s| self.held_out(s)).collect();
        let Some(rescue) = &self.rescue else { return };
        let stalled = |s: usize| held[s];
        for slot in 0..self.slots.len() {
            let stranded = self.shutdown.is_none()
                && !serving.is_empty()
                && !serving.contains(&slot)
                && (stalled(slot) || !self.workers.ready_on(slot));
            if stranded == self.rescued[slot] {
                continue;
            }
            self.rescued[slot] = stranded;
            if stranded {
                let fds = self.listeners.fds_for_slot(slot);
                let targets: Vec<_> =
                    fds.into_iter().zip(self.listeners.local_addrs().iter().map(|a| loopback(*a))).collect();
                log::debug!("taking back the connections queued on slot {slot}");
                rescue.take(slot, &targets);
            } else {
                log::debug!("slot {slot}'s queue is its worker's again ({} relayed so far)", rescue.relayed_from(slot));
                rescue.release(slot);
            }
        }
    }
}
