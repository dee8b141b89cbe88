//! The control socket's commands, as the loop carries them out: `status` (a [`Snapshot`] of
//! the loop's tables), `scale`, `roll` and `stop`. Each is answered at once; `scale` and `roll`
//! then proceed in later turns of the loop like their signals (TTIN/TTOU, USR2).

use std::time::Instant;

use super::os::Os;
use super::workers::State;
use super::Supervisor;
use crate::event::{Answer, Command, Reply, Scale};
use crate::snapshot::{SlotSnapshot, Snapshot, WorkerSnapshot};

/// The most slots a launcher keeps (as `-n`).
const MAX_SLOTS: usize = 4096;

impl<O: Os> Supervisor<O> {
    pub(super) fn command(&mut self, command: Command, now: Instant) -> Reply {
        match command {
            Command::Status => Ok(Answer::Status(Box::new(self.snapshot(now)))),
            Command::Scale(_) | Command::Roll | Command::Reexec if self.drain_until.is_some() => {
                Err("the launcher is draining before its stop".into())
            }
            Command::Scale(to) => self.scale(to, "control", now).map(|desired| Answer::Scaled { desired }),
            Command::Roll => {
                if self.shutdown.is_some() {
                    return Err("the launcher is stopping".into());
                }
                self.request_roll("control", now);
                let generation = self.roll.rolling_gen().unwrap_or(0) + u64::from(self.roll.pending());
                Ok(Answer::Rolling { generation })
            }
            Command::Reexec => self.reexec_check().map(|(path, version)| Answer::Reexec { path, version }),
            Command::ReexecNow => Err(self.reexec_now(now)),
            Command::Stop => {
                // As TERM: through --drain-delay first, if set (a stop already under way stays).
                if self.shutdown.is_none() && self.drain_until.is_none() {
                    self.stop_signal("stop", now);
                }
                Ok(Answer::Stopping)
            }
        }
    }

    /// Change the desired number of slots; `rescale` gets there in the next turns.
    pub(super) fn scale(&mut self, to: Scale, by: &str, now: Instant) -> Result<usize, String> {
        if self.shutdown.is_some() {
            return Err(format!("{by}: cannot scale, the launcher is stopping"));
        }
        let wanted = match to {
            Scale::To(n) => n as i64,
            Scale::By(k) => self.desired as i64 + k,
        };
        if wanted < 1 {
            return Err(format!("{by}: cannot scale to {wanted} workers: at least 1 must run"));
        }
        if wanted > MAX_SLOTS as i64 {
            return Err(format!("{by}: cannot scale to {wanted} workers: at most {MAX_SLOTS}"));
        }
        let wanted = wanted as usize;
        self.within_bounds(wanted, by)?;
        if wanted != self.desired {
            let later = if self.roll.rolling_gen().is_some() { " once the roll under way is done" } else { "" };
            log::info!("{by}: scaling from {} to {wanted} workers{later}", self.desired);
            self.autoscale_asked(self.desired, wanted, by, now);
            self.desired = wanted;
            self.all_ready_logged = false;
        }
        Ok(self.desired)
    }

    /// The loop's picture of itself. CPU, memory and queue lengths are the reader's to measure.
    pub(super) fn snapshot(&self, now: Instant) -> Snapshot {
        let stalled = |s: usize| self.stalls.as_ref().is_some_and(|(w, _)| w.is_stalled(s));
        let slots = self
            .slots
            .iter()
            .enumerate()
            .map(|(i, s)| SlotSnapshot {
                slot: i,
                generation: s.gen,
                workers: self
                    .workers
                    .on(i)
                    .map(|(_, w)| WorkerSnapshot {
                        pid: w.pid.as_raw(),
                        generation: w.gen,
                        state: match w.state {
                            State::Starting { .. } => "starting",
                            State::Stopping { .. } => "draining",
                            State::Ready if stalled(i) => "stalled",
                            State::Ready => "ready",
                        },
                        uptime: now.saturating_duration_since(w.started),
                    })
                    .collect(),
                restarts: s.restarts.iter().map(|(k, v)| (*k, *v)).collect(),
                last_exit: s.last_exit.clone(),
                backoff: s.respawn_at.filter(|_| !self.workers.live_on(i)).map(|at| at.saturating_duration_since(now)),
                retiring: s.retiring.is_some(),
                listeners: self.listeners.fds_for_slot(i),
            })
            .collect();
        Snapshot {
            pid: std::process::id(),
            mode: self.listeners.mode().to_string(),
            binds: self.listeners.local_addrs().to_vec(),
            generation: self.slots.iter().map(|s| s.gen).max().unwrap_or(1),
            desired: self.desired,
            ready: self.workers.ready_count(),
            roll: self.roll.progress(),
            stopping: self.shutdown.is_some() || self.drain_until.is_some(),
            slots,
            autoscale: self.autoscale.as_ref().map(|a| a.snapshot(now)),
            intercept: self.intercept_snapshot(),
        }
    }
}
