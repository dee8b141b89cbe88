//! `-n MIN..MAX` from the supervisor's side: taking the policy's samples (`crate::autoscale`
//! decides) and carrying its decisions out through `scale`'s drop-free addition and
//! retirement of slots (`scale`), as a `scale N` would.
//!
//! Every [`SAMPLE_EVERY`]: each serving slot's accept queue (the longest over its binds,
//! `TCP_INFO` on the listeners the launcher holds; `shared` mode's one queue counted once, for
//! the first slot) and, every [`CPU_EVERY`], the CPU its ready
//! worker's process group used since the reading before (`/proc/PID/stat` of each member; the
//! members from a scan of /proc at most every [`MEMBERS_EVERY`], or when a worker is new). A sample counts only while no roll runs, the launcher is not
//! stopping or draining, and every kept slot has a ready worker; any other sample starts the
//! policy's windows again.

use std::collections::HashMap;
use std::time::Instant;

use super::os::Os;
use super::Supervisor;
use crate::autoscale::{Autoscaler, Bounds, Decision, Record, Sample, Saved, SlotLoad, CPU_EVERY, SAMPLE_EVERY};
use crate::reexec::{at_ms, ms_from, AutoscaleState};
use crate::snapshot::{AutoscaleSnapshot, ScaleRecord};
use crate::sys;

#[derive(Debug)]
pub(super) struct Autoscaling {
    pub(super) policy: Autoscaler,
    next: Option<Instant>,
    next_cpu: Option<Instant>,
    /// The last CPU reading of each worker (by pid): when, and its group's ticks.
    ticks: HashMap<i32, (Instant, u64)>,
    /// Cores each slot's worker used between its last two readings.
    cores: HashMap<usize, f32>,
    /// The processes of each worker's group (by worker pid), from the last scan of /proc.
    members: HashMap<i32, Vec<i32>>,
    members_at: Option<Instant>,
}

/// How long a scan of /proc for the workers' process groups is trusted (a scan visits every
/// process of the machine; reading the members' CPU is a few small reads).
const MEMBERS_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

impl Autoscaling {
    pub(super) fn new(bounds: Bounds, down_after: std::time::Duration) -> Autoscaling {
        Autoscaling {
            policy: Autoscaler::new(bounds, down_after),
            next: None,
            next_cpu: None,
            ticks: HashMap::new(),
            cores: HashMap::new(),
            members: HashMap::new(),
            members_at: None,
        }
    }

    /// For `status` and `/metrics`.
    pub(super) fn snapshot(&self, now: Instant) -> AutoscaleSnapshot {
        let f = self.policy.figures(now);
        let epoch = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let record = |r: &crate::autoscale::Record| {
            let ago = now.saturating_duration_since(r.at);
            let unix_ms = epoch.saturating_sub(ago).as_millis() as u64;
            ScaleRecord { ago, from: r.from, to: r.to, by: r.by.clone(), reason: r.reason.clone(), unix_ms }
        };
        let (ups, downs) = self.policy.counts();
        AutoscaleSnapshot {
            min: self.policy.bounds.min,
            max: self.policy.bounds.max,
            calm: self.policy.calm(now),
            decisions: self.policy.history().map(record).collect(),
            ups,
            downs,
            samples: f.samples,
            pressed_pct: (f.pressed * 100.0).round() as u32,
            waiting_centi: (f.waiting * 100.0).round() as u32,
            queued_pct: (f.queued * 100.0).round() as u32,
            cpu_milli: (f.cpu * 1000.0).round() as u32,
        }
    }
}

impl<O: Os> Supervisor<O> {
    /// With `-n MIN..MAX`, when a sample is due: take it, and carry out the policy's decision.
    pub(super) fn autoscale(&mut self, now: Instant) {
        match &self.scaling.autoscale {
            Some(a) if a.next.is_none_or(|t| now >= t) => {}
            _ => return,
        }
        let kept: Vec<usize> = (0..self.slots.len()).filter(|s| self.slots[*s].retiring.is_none()).collect();
        let settled = !self.halt.stopping()
            && self.roll.rolling_gen().is_none()
            && kept.len() == self.scaling.desired
            && kept.iter().all(|s| self.workers.ready_on(*s));
        let cpu_due = self.scaling.autoscale.as_ref().is_some_and(|a| a.next_cpu.is_none_or(|t| now >= t));
        if settled && cpu_due {
            self.read_worker_cpu(now, &kept);
        }
        let sample = settled.then(|| {
            let cores = &self.scaling.autoscale.as_ref().expect("checked above").cores;
            let mut counted = Vec::new();
            let slots = self
                .serving_slots()
                .into_iter()
                .filter(|s| kept.contains(s))
                .map(|slot| {
                    let queue = self.slot_queue(slot, &mut counted);
                    SlotLoad { slot, queue, cpu: cores.get(&slot).copied() }
                })
                .collect();
            Sample { at: now, slots }
        });
        let Some(a) = &mut self.scaling.autoscale else { return };
        a.next = Some(now + SAMPLE_EVERY);
        a.policy.observe(sample);
        if !settled {
            return;
        }
        if let Decision::Change { to, reason, figures } = a.policy.decide(kept.len(), now) {
            let from = self.scaling.desired;
            a.policy.changed(from, to, "auto", &reason, now);
            let text = a.policy.history().last().map(|r| r.text()).unwrap_or_default();
            log::info!("autoscale: {text} ({figures})");
            self.scaling.desired = to;
            self.publishing.count_changed();
        }
    }

    /// The CPU of each kept slot's ready worker's process group since its reading before.
    fn read_worker_cpu(&mut self, now: Instant, kept: &[usize]) {
        let workers: Vec<(usize, i32)> = kept
            .iter()
            .filter_map(|s| {
                let ready = self.workers.on(*s).find(|(_, w)| w.state == super::workers::State::Ready && !w.candidate);
                ready.map(|(_, w)| (*s, w.pid.as_raw()))
            })
            .collect();
        let pids: Vec<i32> = workers.iter().map(|w| w.1).collect();
        let Some(a) = &mut self.scaling.autoscale else { return };
        let stale = a.members_at.is_none_or(|t| now.saturating_duration_since(t) >= MEMBERS_EVERY);
        if stale || pids.iter().any(|p| !a.members.contains_key(p)) {
            a.members = pids.iter().copied().zip(crate::readiness::groups_members(&pids)).collect();
            a.members_at = Some(now);
        }
        let groups: Vec<Vec<i32>> =
            pids.iter().map(|p| a.members.get(p).cloned().unwrap_or_else(|| vec![*p])).collect();
        let ticks = sys::read_ticks(&groups);
        let hz = sys::clock_ticks_per_second();
        a.next_cpu = Some(now + CPU_EVERY);
        a.cores.clear();
        let mut seen = HashMap::new();
        for ((slot, pid), group) in workers.into_iter().zip(groups) {
            let total: u64 = group.iter().filter_map(|p| ticks.get(p)).sum();
            if let Some(&(at, before)) = a.ticks.get(&pid) {
                let window = now.saturating_duration_since(at).as_secs_f64();
                if window > 0.0 {
                    a.cores.insert(slot, (total.saturating_sub(before) as f64 / hz / window) as f32);
                }
            }
            seen.insert(pid, (now, total));
        }
        a.ticks = seen;
    }

    /// `slot`'s accept queue: the longest over its binds (None: no socket, or unreadable). A
    /// listener already `counted` for another slot (`shared` mode: one for all) counts as empty,
    /// so that its queue is counted once in all.
    fn slot_queue(&self, slot: usize, counted: &mut Vec<std::os::fd::RawFd>) -> Option<u32> {
        let fds = self.listeners.fds_for_slot(slot);
        let fresh: Vec<_> = fds.iter().copied().filter(|fd| !counted.contains(fd)).collect();
        counted.extend(&fresh);
        if fresh.is_empty() && !fds.is_empty() {
            return Some(0);
        }
        fresh.into_iter().filter_map(|fd| self.os.queue_len(fd).ok()).max()
    }

    /// When the next sample is due (None: no automatic scaling, or no worker).
    pub(super) fn next_autoscale(&self) -> Option<Instant> {
        let a = self.scaling.autoscale.as_ref().filter(|_| !self.workers.is_empty())?;
        Some(a.next.unwrap_or_else(Instant::now))
    }

    /// The policy's memory for `reexec` (the bounds come from the command line again).
    pub(super) fn autoscale_state(&self, now: Instant) -> Option<AutoscaleState> {
        let saved = self.scaling.autoscale.as_ref()?.policy.export();
        let history = saved.history.into_iter().map(|r| (ms_from(now, r.at), r.from, r.to, r.by, r.reason)).collect();
        Some(AutoscaleState {
            flap: saved.flap,
            flap_ms: saved.flap_at.map(|t| ms_from(now, t)),
            last_down_ms: saved.last_down.map(|t| ms_from(now, t)),
            ups: saved.ups,
            downs: saved.downs,
            history,
        })
    }

    /// In the new image: go on with the old one's memory.
    pub(super) fn autoscale_resume(&mut self, state: Option<AutoscaleState>, now: Instant) {
        let (Some(a), Some(s)) = (&mut self.scaling.autoscale, state) else { return };
        let history = s
            .history
            .into_iter()
            .map(|(ms, from, to, by, reason)| Record { at: at_ms(now, ms), from, to, by, reason })
            .collect();
        a.policy.import(Saved {
            flap: s.flap,
            flap_at: s.flap_ms.map(|ms| at_ms(now, ms)),
            last_down: s.last_down_ms.map(|ms| at_ms(now, ms)),
            history,
            ups: s.ups,
            downs: s.downs,
        });
    }
}
