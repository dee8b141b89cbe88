//! `--hung-timeout`: when a stalled worker counts as hung. Pure: the stall watch's verdicts
//! (`stall`) and times in, the workers to replace out; the supervisor replaces them
//! (`supervisor/hung.rs`).
//!
//! Rules (also in the README):
//! - A worker's clock starts at its first stall (frozen or not accepting, see `stall`) and is
//!   not reset when a probation lets it back in: a worker that stalls again after each
//!   re-admission has been hung since its first stall. It is reset only when the worker has
//!   gone [`HungClock::RECOVERED_AFTER`] without stalling again (it serves), when its slot gets
//!   another worker, or when one of its processes is stopped by a signal (state T/t: a debugger,
//!   SIGSTOP): a stopped worker is never hung, and its clock starts afresh at its next stall
//!   once it runs again.
//! - A worker is due for replacement when its clock has run for the timeout and it is stalled
//!   now (during a probation re-admission it waits until it stalls again). It is reported once;
//!   again only another timeout later, if it still is hung then (its replacement failed).

use std::time::{Duration, Instant};

use crate::stall::Why;

/// One slot at one sample of the stall watch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Seen {
    /// The worker the stall watch follows on this slot (its pid).
    pub worker: Option<i32>,
    /// Stalled now, and why.
    pub stalled: Option<Why>,
    /// One of its processes is stopped by a signal.
    pub stopped: bool,
    /// Connections waiting in its queue (None: unread).
    pub queue: Option<u32>,
}

/// A worker to replace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Due {
    pub slot: usize,
    pub worker: i32,
    /// Since its first stall.
    pub stalled_for: Duration,
    /// Why it is stalled now.
    pub why: Why,
    /// The most connections seen waiting in its queue since its first stall.
    pub most_waiting: u32,
}

#[derive(Debug, Clone, Copy)]
struct Clock {
    worker: i32,
    since: Instant,
    /// Not stalled since then (None: stalled now).
    unstalled_at: Option<Instant>,
    most_waiting: u32,
    /// Reported as due; not again before this.
    quiet_until: Option<Instant>,
}

#[derive(Debug, Default)]
pub struct HungClock {
    slots: Vec<Option<Clock>>,
}

impl HungClock {
    /// A worker that goes this long without stalling again has recovered.
    pub const RECOVERED_AFTER: Duration = Duration::from_secs(10);

    /// Take one sample (one [`Seen`] per slot, in slot order); the workers due for replacement.
    pub fn observe(&mut self, now: Instant, seen: &[Seen], timeout: Duration) -> Vec<Due> {
        self.slots.resize(seen.len(), None);
        let mut due = Vec::new();
        for (slot, (clock, s)) in self.slots.iter_mut().zip(seen).enumerate() {
            let Some(worker) = s.worker.filter(|_| !s.stopped) else {
                *clock = None;
                continue;
            };
            if clock.is_some_and(|c| c.worker != worker) {
                *clock = None;
            }
            let Some(why) = s.stalled else {
                if let Some(c) = clock {
                    let since = *c.unstalled_at.get_or_insert(now);
                    if now.saturating_duration_since(since) >= Self::RECOVERED_AFTER {
                        *clock = None;
                    }
                }
                continue;
            };
            let c = clock.get_or_insert(Clock {
                worker,
                since: now,
                unstalled_at: None,
                most_waiting: 0,
                quiet_until: None,
            });
            c.unstalled_at = None;
            c.most_waiting = c.most_waiting.max(s.queue.unwrap_or(0));
            let stalled_for = now.saturating_duration_since(c.since);
            if stalled_for >= timeout && c.quiet_until.is_none_or(|t| now >= t) {
                c.quiet_until = Some(now + timeout);
                due.push(Due { slot, worker, stalled_for, why, most_waiting: c.most_waiting });
            }
        }
        due
    }

    /// When `slot`'s current stall began (None: no clock runs there).
    pub fn since(&self, slot: usize) -> Option<Instant> {
        self.slots.get(slot).copied().flatten().map(|c| c.since)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);
    const T: Duration = Duration::from_secs(2);

    fn stalled(why: Why, queue: u32) -> Seen {
        Seen { worker: Some(7), stalled: Some(why), stopped: false, queue: Some(queue) }
    }

    fn serving() -> Seen {
        Seen { worker: Some(7), stalled: None, stopped: false, queue: Some(0) }
    }

    /// Sample every 20 ms from `from` for `span`, each with `seen`; every due reported.
    fn run(c: &mut HungClock, from: Instant, span: Duration, seen: &[Seen]) -> Vec<(Duration, Due)> {
        let mut out = Vec::new();
        let mut t = from;
        while t < from + span {
            out.extend(c.observe(t, seen, T).into_iter().map(|d| (t - from, d)));
            t += 20 * MS;
        }
        out
    }

    #[test]
    fn a_worker_stalled_for_the_timeout_is_due_once_with_its_figures() {
        let t0 = Instant::now();
        let mut c = HungClock::default();
        let got = run(&mut c, t0, 3 * T, &[serving(), stalled(Why::Frozen, 12)]);
        assert_eq!(got.len(), 2, "{got:?}");
        let (at, due) = got[0];
        assert_eq!(at, T);
        assert_eq!(due, Due { slot: 1, worker: 7, stalled_for: T, why: Why::Frozen, most_waiting: 12 });
        // Still hung a timeout later (its replacement failed): reported again.
        assert_eq!(got[1].0, 2 * T);
        assert_eq!(c.since(1), Some(t0));
        assert_eq!(c.since(0), None);
    }

    #[test]
    fn probation_re_admissions_do_not_reset_the_clock() {
        let t0 = Instant::now();
        let mut c = HungClock::default();
        // Stalled 1 s, let back in for 250 ms, stalled again: hung from its first stall.
        assert!(run(&mut c, t0, Duration::from_millis(1000), &[stalled(Why::NotAccepting, 3)]).is_empty());
        assert!(run(&mut c, t0 + Duration::from_millis(1000), 250 * MS, &[serving()]).is_empty());
        let got = run(&mut c, t0 + Duration::from_millis(1250), T, &[stalled(Why::NotAccepting, 5)]);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].0, Duration::from_millis(760)); // t0 + 2.01 s: the first sample past 2 s
        assert_eq!(got[0].1.most_waiting, 5);
    }

    #[test]
    fn a_worker_re_admitted_at_the_timeout_is_due_when_it_stalls_again() {
        let t0 = Instant::now();
        let mut c = HungClock::default();
        run(&mut c, t0, Duration::from_millis(1900), &[stalled(Why::Frozen, 1)]);
        assert!(run(&mut c, t0 + Duration::from_millis(1900), Duration::from_secs(1), &[serving()]).is_empty());
        let got = c.observe(t0 + Duration::from_millis(2900), &[stalled(Why::Frozen, 2)], T);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].stalled_for, Duration::from_millis(2900));
    }

    #[test]
    fn a_worker_that_serves_for_a_while_has_recovered() {
        let t0 = Instant::now();
        let mut c = HungClock::default();
        run(&mut c, t0, Duration::from_secs(1), &[stalled(Why::NotAccepting, 4)]);
        run(&mut c, t0 + Duration::from_secs(1), HungClock::RECOVERED_AFTER + 20 * MS, &[serving()]);
        assert_eq!(c.since(0), None);
        let later = t0 + Duration::from_secs(30);
        assert!(run(&mut c, later, T - 20 * MS, &[stalled(Why::NotAccepting, 4)]).is_empty(), "a fresh clock");
    }

    #[test]
    fn a_stopped_worker_is_never_due_and_starts_afresh() {
        let t0 = Instant::now();
        let stopped = Seen { stopped: true, ..stalled(Why::Frozen, 9) };
        let mut c = HungClock::default();
        run(&mut c, t0, Duration::from_millis(500), &[stalled(Why::Frozen, 9)]);
        assert!(run(&mut c, t0 + Duration::from_millis(500), 2 * T, &[stopped]).is_empty());
        assert_eq!(c.since(0), None);
        // SIGCONT, and still deadlocked: a new clock from its next stall.
        let back = t0 + Duration::from_millis(500) + 2 * T;
        let got = run(&mut c, back, 2 * T, &[stalled(Why::Frozen, 9)]);
        assert_eq!(got.first().map(|g| g.0), Some(T));
    }

    #[test]
    fn a_new_worker_on_the_slot_starts_clean() {
        let t0 = Instant::now();
        let mut c = HungClock::default();
        run(&mut c, t0, Duration::from_millis(1500), &[stalled(Why::Frozen, 1)]);
        let other = Seen { worker: Some(8), ..stalled(Why::Frozen, 1) };
        let got = run(&mut c, t0 + Duration::from_millis(1500), T + 20 * MS, &[other]);
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].0, got[0].1.worker), (T, 8));
        assert!(c.observe(t0, &[Seen::default()], T).is_empty());
        assert_eq!(c.since(0), None);
    }
}
