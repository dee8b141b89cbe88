//! `--hung-timeout`: replacing workers that stay stalled. At every sample of the stall watch
//! (`routing`) the hung clock (`crate::hung`: when a stall counts as a hang) is given each
//! slot's verdict; a worker due is replaced make-before-break (`replace`, cause `hung`): a new
//! worker of the same generation starts on the slot's sockets, and once it is ready the hung
//! one gets the stop signal, then SIGKILL after `--grace`. Meanwhile the slot stays out of the
//! serving set and its queue keeps being relayed, even while a probation lets the hung worker
//! back in (`routing`). A worker stopped by a signal is never replaced for hanging.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use nix::unistd::Pid;

use super::os::Os;
use super::workers::State;
use super::Supervisor;
use crate::hung::{Due, HungClock, Seen};
use crate::stall::{Sample, Why};
use crate::sys;

#[derive(Debug, Default)]
pub(super) struct HungWatch {
    clock: HungClock,
    /// For each slot whose clock runs: its worker, when the clock started, and the CPU ticks of
    /// the worker's process group then (for the figure in the log line).
    cpu_at: HashMap<usize, (i32, Instant, u64)>,
}

/// `2.0s` under 10 s, `30s` above.
fn secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 10.0 {
        format!("{s:.1}s")
    } else {
        format!("{s:.0}s")
    }
}

/// `12 connections waiting`, `1 connection waiting`.
fn waiting(n: u32) -> String {
    format!("{n} connection{} waiting", if n == 1 { "" } else { "s" })
}

impl<O: Os> Supervisor<O> {
    /// One sample of the stall watch (`samples`, one per slot, as `watch_queues` took them):
    /// start the replacement of every worker that has been stalled for `--hung-timeout`.
    pub(super) fn watch_hung(&mut self, now: Instant, samples: &[Sample]) {
        let Some(timeout) = self.cfg.hung_timeout else { return };
        let seen: Vec<Seen> = samples
            .iter()
            .enumerate()
            .map(|(s, x)| Seen {
                worker: x.worker,
                stalled: self.slots[s].route.stall.why(),
                stopped: x.stopped,
                queue: x.queue,
            })
            .collect();
        let due = self.watches.hung.clock.observe(now, &seen, timeout);
        self.note_stall_cpu(now, &seen);
        for d in due {
            self.replace_hung(d, now);
        }
    }

    /// Remember the CPU ticks of each worker whose clock just started; forget the others.
    fn note_stall_cpu(&mut self, now: Instant, seen: &[Seen]) {
        for (slot, s) in seen.iter().enumerate() {
            let hung = &mut self.watches.hung;
            let Some(pid) = s.worker.filter(|_| hung.clock.since(slot).is_some()) else {
                hung.cpu_at.remove(&slot);
                continue;
            };
            if hung.cpu_at.get(&slot).is_none_or(|c| c.0 != pid) {
                let ticks = self.group_ticks(pid);
                self.watches.hung.cpu_at.insert(slot, (pid, now, ticks));
            }
        }
    }

    /// utime + stime of worker `pid`'s process group (its members as last scanned).
    fn group_ticks(&self, pid: i32) -> u64 {
        let members = self.router.members_of(pid);
        sys::read_ticks(&[members]).values().sum()
    }

    fn replace_hung(&mut self, d: Due, now: Instant) {
        let Some(id) = self.workers.by_pid(Pid::from_raw(d.worker)) else { return };
        let Some(w) = self.workers.get(id).filter(|w| w.state == State::Ready && !w.candidate) else { return };
        if !self.may_replace(w.slot) {
            return;
        }
        let label = w.label();
        let why = match d.why {
            Why::Frozen => format!("no CPU, {}", waiting(d.most_waiting)),
            Why::NotAccepting => {
                let cpu = match self.watches.hung.cpu_at.get(&d.slot) {
                    Some(&(pid, at, ticks)) if pid == d.worker => {
                        let used = self.group_ticks(pid).saturating_sub(ticks) as f64;
                        let window = now.saturating_duration_since(at).as_secs_f64().max(0.001);
                        format!("{:.0}% CPU, ", used / sys::clock_ticks_per_second() / window * 100.0)
                    }
                    _ => String::new(),
                };
                format!("{cpu}its queue not drained while others were, {}", waiting(d.most_waiting))
            }
        };
        log::warn!("{label} has been stalled for {} ({why}); replacing it", secs(d.stalled_for));
        self.replace(id, "hung", now);
    }
}

#[cfg(test)]
mod tests {
    use super::{secs, waiting};
    use std::time::Duration;

    #[test]
    fn stall_lengths_read_as_the_log_says_them() {
        assert_eq!(secs(Duration::from_millis(2010)), "2.0s");
        assert_eq!(secs(Duration::from_millis(30_040)), "30s");
        assert_eq!((waiting(1), waiting(12)), ("1 connection waiting".into(), "12 connections waiting".into()));
    }
}
