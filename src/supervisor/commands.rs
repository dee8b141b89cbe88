//! The control socket's commands, as the loop carries them out: `status` (a [`Snapshot`] of
//! the loop's tables), `scale` (see `scale`), `roll`, `reexec` (see `resume`) and `stop`. Each
//! is answered at once; `scale` and `roll` then proceed in later turns of the loop like their
//! signals (TTIN/TTOU, USR2).

use std::time::Instant;

use super::os::Os;
use super::workers::State;
use super::Supervisor;
use crate::event::{Answer, Command, Reply};
use crate::snapshot::{SlotSnapshot, Snapshot, WorkerSnapshot};

impl<O: Os> Supervisor<O> {
    pub(super) fn command(&mut self, command: Command, now: Instant) -> Reply {
        if matches!(command, Command::Scale(_) | Command::Roll | Command::Reexec) {
            self.halt.refuse_while_draining()?;
        }
        match command {
            Command::Status => Ok(Answer::Status(Box::new(self.snapshot(now)))),
            Command::Scale(to) => self.scale(to, "control", now).map(|desired| Answer::Scaled { desired }),
            Command::Roll => {
                if self.halt.shutdown.is_some() {
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
                if !self.halt.stopping() {
                    self.stop_signal("stop", now);
                }
                Ok(Answer::Stopping)
            }
        }
    }

    /// The loop's picture of itself. CPU, memory and queue lengths are the reader's to measure.
    pub(super) fn snapshot(&self, now: Instant) -> Snapshot {
        let stalled = |s: usize| self.slots[s].route.stall.why().is_some();
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
            generation: self.slots.gen(),
            desired: self.scaling.desired,
            ready: self.workers.ready_count(),
            roll: self.roll.progress(),
            stopping: self.halt.stopping(),
            slots,
            autoscale: self.scaling.autoscale.as_ref().map(|a| a.snapshot(now)),
            intercept: self.intercept_snapshot(),
        }
    }
}
