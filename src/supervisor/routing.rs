//! Where new connections go: the serving set (slots with a ready worker that is neither being
//! replaced nor stalled), the stall watch over the accept queues, and carrying the set out —
//! BPF steering of the reuseport groups, or the forwarder's backend list in round-robin mode.

use std::net::SocketAddr;
use std::time::Instant;

use super::os::Os;
use super::Supervisor;
use crate::readiness;
use crate::steer::{self, Sample, StallWatch};

impl<O: Os> Supervisor<O> {
    /// The slots that should take new connections: those with a ready worker, except a slot
    /// whose worker is being replaced or has stopped accepting (unless that leaves no slot).
    pub(super) fn serving_slots(&self) -> Vec<usize> {
        // Being replaced: a new worker is starting there, or the old one is draining. Keeping
        // new connections away until the old worker has exited means it cannot accept one
        // after its stop signal (servers that close accepted-but-unread connections on
        // shutdown, such as uvicorn, would drop it).
        let stalled = |s: usize| self.stalls.as_ref().is_some_and(|(w, _)| w.is_stalled(s));
        let all: Vec<usize> = (0..self.slots.len()).filter(|s| self.workers.ready_on(*s)).collect();
        let preferred: Vec<usize> =
            all.iter().copied().filter(|s| !self.workers.replacing(*s) && !stalled(*s)).collect();
        if preferred.is_empty() {
            all
        } else {
            preferred
        }
    }

    /// Sample every slot's accept queue (every `StallWatch::EVERY`) and log stalls.
    pub(super) fn watch_queues(&mut self, now: Instant) {
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
            .iter()
            .filter(|(_, w)| matches!(queues[w.slot], Some(n) if n > 0))
            .map(|(_, w)| (w.slot, w.pid.as_raw()))
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
            let who = self.workers.ready_label(slot).unwrap_or_else(|| format!("worker {slot}"));
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

    /// When the next queue sample is due (None: nothing to watch).
    pub(super) fn next_sample(&self) -> Option<Instant> {
        self.stalls.as_ref().filter(|_| !self.workers.is_empty()).map(|(_, next)| *next)
    }

    /// Send new connections only to the serving slots: BPF steering of the reuseport groups
    /// (see `steer`), or the forwarder's backend list in round-robin mode.
    pub(super) fn steer(&mut self) {
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
}
