//! The queue watch (reuseport and round-robin modes): sampling every slot's accept queue at the
//! `queues::Cadence` (every 20 ms while anything waits or changes, every second otherwise, and
//! at once when a connection arrives), the /proc state of the workers with connections waiting,
//! and giving the stall watch (`stall`, whose per-slot records are in the slots' own) and, with
//! `--steer least-loaded`, each slot's load, the samples. Every read goes through the [`Os`].

use std::collections::{HashMap, HashSet};
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;

use super::os::Os;
use super::workers::{Slots, State, Workers};
use crate::cli::Steer;
use crate::event::Event;
use crate::queues::Queues;
use crate::socket::Listeners;
use crate::stall::{Sample, StallWatch, Why};

/// How long a worker's list of processes (one scan of /proc) is trusted.
const MEMBERS_TTL: Duration = Duration::from_secs(1);

/// The processes of each worker's group, from the last scan of /proc, by worker pid.
type Members = HashMap<i32, (Vec<i32>, Instant)>;

pub(super) struct Sampling {
    /// When the next sample is due.
    next: Instant,
    /// The processes of the workers that had connections waiting.
    members: Members,
    /// The reader of the slots' queues and its cadence (see `queues`); None: `TCP_INFO` on
    /// every listener every 20 ms.
    queues: Option<Queues>,
}

/// One sample's readings, by slot.
struct Readings {
    queues: Vec<Option<u32>>,
    /// The worker each slot's record follows: its ready one, else its live one.
    workers: Vec<Option<i32>>,
}

impl Sampling {
    pub(super) fn start(tx: &Sender<Event>) -> Sampling {
        let queues = Queues::start(tx.clone())
            .map_err(|e| log::warn!("cannot watch the queues with epoll ({e}); sampling every 20 ms"))
            .ok();
        Sampling { next: Instant::now(), members: Members::new(), queues }
    }

    /// When the next sample is due (None: no worker to watch).
    pub(super) fn next(&self, workers: &Workers) -> Option<Instant> {
        (!workers.is_empty()).then_some(self.next)
    }

    /// A connection waits somewhere while the watch sampled rarely: sample now, and fast.
    pub(super) fn wake(&mut self, now: Instant) {
        if let Some(q) = &mut self.queues {
            q.cadence.busy(now);
        }
        self.next = now;
    }

    /// The processes of worker `pid`'s group, as last scanned (just the worker if never).
    pub(super) fn members_of(&self, pid: i32) -> Vec<i32> {
        self.members.get(&pid).map_or_else(|| vec![pid], |m| m.0.clone())
    }

    /// Take a sample when one is due: the stall watch's verdicts are logged and kept in the
    /// slots' records; the samples are returned for the hung clock.
    pub(super) fn sample(
        &mut self,
        now: Instant,
        slots: &mut Slots,
        (workers, listeners): (&Workers, &Listeners),
        os: &impl Os,
        steer: Steer,
    ) -> Option<Vec<Sample>> {
        if now < self.next || workers.is_empty() {
            return None;
        }
        let layout: Vec<Vec<RawFd>> = (0..slots.len()).map(|s| listeners.fds_for_slot(s)).collect();
        let queues = os.queues(self.queues.as_mut(), layout);
        let followed = (0..slots.len()).map(|s| followed(workers, s)).collect();
        let r = Readings { queues, workers: followed };
        self.scan_members(now, &r, workers, os);
        let samples = self.samples(&r, slots, workers, os);
        let queued = r.queues.iter().any(|q| matches!(q, Some(n) if *n > 0));
        if queued {
            if let Some(q) = &mut self.queues {
                q.cadence.busy(now);
            }
        }
        // The held connections are counted only while connections arrive (a wake samples at
        // once): reading every worker's fds once a second while idle would cost per slot.
        let traffic = self.queues.as_ref().is_none_or(|q| q.cadence.traffic(now));
        if steer == Steer::LeastLoaded && traffic {
            note_loads(slots, &r, workers, os);
        }
        let changed = StallWatch::observe_slots(now, slots.iter_mut().map(|s| &mut s.route.stall), &samples);
        // Fast while a queue holds connections, or a worker starts, stops or is stalled.
        let changing = workers.iter().any(|(_, w)| w.state != State::Ready);
        let active = queued || changing || slots.iter().any(|s| s.route.stall.why().is_some());
        self.next = now
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
        log_changes(&changed, &r, workers);
        Some(samples)
    }

    /// Scan /proc for the groups of the workers with connections waiting (at most every
    /// [`MEMBERS_TTL`] each); forget the workers gone.
    fn scan_members(&mut self, now: Instant, r: &Readings, workers: &Workers, os: &impl Os) {
        let waiting: Vec<i32> = (0..r.queues.len())
            .filter(|s| matches!(r.queues[*s], Some(n) if n > 0))
            .filter_map(|s| r.workers[s])
            .filter(|pid| self.members.get(pid).is_none_or(|(_, at)| now.duration_since(*at) >= MEMBERS_TTL))
            .collect();
        if !waiting.is_empty() {
            for (pid, pids) in waiting.iter().zip(os.members(&waiting)) {
                self.members.insert(*pid, (pids, now));
            }
        }
        let live: HashSet<i32> = workers.iter().map(|(_, w)| w.pid.as_raw()).collect();
        self.members.retain(|pid, _| live.contains(pid));
    }

    /// Each slot's sample; the /proc reads happen only for slots with connections waiting (or
    /// stalled).
    fn samples(&self, r: &Readings, slots: &Slots, workers: &Workers, os: &impl Os) -> Vec<Sample> {
        (0..slots.len())
            .map(|s| {
                let group = |pid: i32| self.members.get(&pid).map(|m| m.0.clone()).unwrap_or_else(|| vec![pid]);
                let (stopped, running, cpu) = match (r.queues[s], r.workers[s]) {
                    (Some(n), Some(pid)) if n > 0 => os.proc_state(&group(pid)),
                    (_, Some(pid)) if slots[s].route.stall.why().is_some() => os.proc_state(&group(pid)),
                    _ => (false, false, None),
                };
                // A retiring slot is neither judged nor a sign that others keep up; nor is one
                // without a ready worker (just added, in backoff): steering sends it nothing,
                // so its empty queue says nothing of the others (a saturated one-at-a-time
                // worker, whose queue refills as fast as it accepts, was taken for stalled).
                let unserved = slots[s].retiring.is_some() || !workers.ready_on(s);
                let queue = if unserved { None } else { r.queues[s] };
                Sample { worker: r.workers[s], queue, cpu, stopped, running }
            })
            .collect()
    }
}

/// The worker `slot`'s stall record follows: its ready one, else its live one.
fn followed(workers: &Workers, slot: usize) -> Option<i32> {
    let mut on = workers.on(slot).filter(|(_, w)| !w.is_stopping());
    let ready = workers.on(slot).find(|(_, w)| w.state == State::Ready);
    ready.or_else(|| on.next()).map(|(_, w)| w.pid.as_raw())
}

/// `--steer least-loaded`: each slot's load, its queue plus its ready worker's held
/// connections (a starting one is still opening its own).
fn note_loads(slots: &mut Slots, r: &Readings, workers: &Workers, os: &impl Os) {
    let counts: Vec<Option<u32>> = (0..slots.len())
        .map(|s| r.workers[s].filter(|_| workers.ready_on(s)).and_then(|pid| os.open_sockets(pid)))
        .collect();
    let held = crate::load::relative(&counts);
    for ((slot, q), h) in slots.iter_mut().zip(&r.queues).zip(&held) {
        slot.route.load = q.map(|q| q + h.unwrap_or(0)).or(*h);
    }
}

fn log_changes(changed: &[(usize, Option<Why>)], r: &Readings, workers: &Workers) {
    for &(slot, why) in changed {
        let who = workers.ready_label(slot).unwrap_or_else(|| format!("worker {slot}"));
        let waiting = r.queues[slot].unwrap_or(0);
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
}
