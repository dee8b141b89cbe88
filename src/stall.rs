//! Noticing slots whose worker has stopped taking connections, from the outside: each slot's
//! accept-queue length (`TCP_INFO` on the listener the launcher holds) and the state and CPU
//! time of its worker's processes (`/proc/PID/stat`), sampled every [`StallWatch::EVERY`].
//!
//! A slot is *stalled* for one of two reasons ([`Why`]):
//! - **Frozen**: connections wait in its queue and its worker cannot take them: one of its
//!   processes is stopped (SIGSTOP, a debugger), seen at two samples in a row (20-40 ms); or
//!   none of its processes ran (used CPU, or was runnable) for [`StallWatch::FROZEN_AFTER`]
//!   (a deadlock, a blocking call). A worker that accepts is never frozen: accepting takes CPU,
//!   and an idle one empties its queue within microseconds; a worker that waits for a CPU on a
//!   loaded machine is runnable (`R`), not frozen. A stopped worker is back as soon as it is
//!   not stopped; an idle one as soon as it runs, or after a probation (1 s, doubling up to
//!   30 s) when nothing shows it (an idle worker may use no CPU for long): if it is still stuck,
//!   connections queue again and it is frozen again within [`StallWatch::FROZEN_AFTER`].
//! - **Not accepting**: its queue has been neither empty nor shorter than at the sample before
//!   for [`StallWatch::BUSY_AFTER`] while some other slot's was empty (a worker burning CPU on
//!   one long request, or in a loop; a queue that got shorter was accepted from, so a worker
//!   that accepts in batches between long requests is not singled out): the others
//!   keep up and this one does not. When every queue stays full the machine is overloaded and
//!   nobody is singled out. It is tried again after a probation (1 s, doubled each time it
//!   stalls again, up to 30 s; reset after a minute of serving).
//!
//! The caller steers new connections away from a stalled slot and takes back what is queued
//! there (`rescue`); this module only decides. It is pure: samples and times in, changes out.

use std::time::{Duration, Instant};

/// One slot at one sample.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sample {
    /// The slot's worker (its main pid), so that a new worker starts with a clean record.
    pub worker: Option<i32>,
    /// Accept-queue length (the longest over the slot's binds); None where unreadable.
    pub queue: Option<u32>,
    /// CPU used so far by the worker's processes, as a counter that grows whenever one of them
    /// runs (see [`proc_state`]); None where unread.
    pub cpu: Option<u64>,
    /// One of the worker's processes is stopped.
    pub stopped: bool,
    /// One of the worker's processes is running or runnable (`R`).
    pub running: bool,
}

/// The slots whose state changed at a sample, with their new state.
pub type Changes = Vec<(usize, Option<Why>)>;
type W = SlotWatch;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    Frozen,
    NotAccepting,
}

/// One slot's record in the watch: the supervisor keeps it in the slot's own record (see
/// [`StallWatch::observe_slots`]); a [`StallWatch`] keeps one per slot itself.
#[derive(Debug, Default, Clone)]
pub struct SlotWatch {
    worker: Option<i32>,
    /// Since when the queue has been non-empty, and never shorter than at the sample before.
    queued_since: Option<Instant>,
    last_queue: Option<u32>,
    /// Since when the queue has been non-empty with no CPU used, and the CPU time then.
    idle_since: Option<(Instant, u64)>,
    /// Stopped with a queue at the previous sample.
    stopped_before: bool,
    /// Frozen because stopped (back when it is not), rather than idle.
    frozen_stopped: bool,
    last_cpu: Option<u64>,
    stalled: Option<Why>,
    /// Not accepting: when it is tried again, and how long the next probation lasts.
    retry_at: Option<Instant>,
    probation: Duration,
    /// Last time it was seen stalled (probation resets after a long good spell).
    stalled_at: Option<Instant>,
}

/// The watch's rules and constants; the per-slot records are kept by the caller, one in each
/// slot's own record (a table of its own only for the tests here).
#[derive(Debug, Default)]
pub struct StallWatch {
    #[cfg(test)]
    slots: Vec<SlotWatch>,
}

impl StallWatch {
    pub const EVERY: Duration = Duration::from_millis(20);
    pub const FROZEN_AFTER: Duration = Duration::from_millis(250);
    pub const BUSY_AFTER: Duration = Duration::from_secs(1);
    const PROBATION: Duration = Duration::from_secs(1);
    const PROBATION_MAX: Duration = Duration::from_secs(30);
    const GOOD_SPELL: Duration = Duration::from_secs(60);

    #[cfg(test)]
    pub fn new(slots: usize) -> StallWatch {
        StallWatch { slots: vec![SlotWatch::new(); slots] }
    }

    /// Take one sample per slot. Returns the slots that changed, with their new state.
    #[cfg(test)]
    pub fn observe(&mut self, now: Instant, samples: &[Sample]) -> Vec<(usize, Option<Why>)> {
        Self::observe_slots(now, self.slots.iter_mut(), samples)
    }

    /// Take one sample per slot, over records kept elsewhere (one per slot, in slot order).
    /// Returns the slots that changed, with their new state.
    pub fn observe_slots<'a>(now: Instant, watches: impl Iterator<Item = &'a mut W>, samples: &[Sample]) -> Changes {
        let someone_keeps_up = samples.iter().any(|s| s.queue == Some(0));
        let mut changed = Vec::new();
        for (slot, (w, s)) in watches.zip(samples).enumerate() {
            if w.worker != s.worker {
                let was = w.stalled;
                *w = SlotWatch {
                    worker: s.worker,
                    probation: w.probation,
                    stalled_at: w.stalled_at,
                    ..Default::default()
                };
                if was.is_some() {
                    changed.push((slot, None));
                }
            }
            let queued = matches!(s.queue, Some(n) if n > 0);
            let worked = matches!((w.last_cpu, s.cpu), (Some(a), Some(b)) if b > a);
            if s.cpu.is_some() {
                w.last_cpu = s.cpu;
            }
            let accepted = matches!((w.last_queue, s.queue), (Some(a), Some(b)) if b < a);
            w.last_queue = s.queue;
            w.queued_since = if queued && !accepted { Some(w.queued_since.unwrap_or(now)) } else { None };
            w.idle_since = match (queued && !s.running, s.cpu, w.idle_since) {
                (true, Some(cpu), Some((t, at))) if cpu == at => Some((t, at)),
                (true, Some(cpu), _) => Some((now, cpu)),
                _ => None,
            };
            let stopped_twice = queued && s.stopped && w.stopped_before;
            w.stopped_before = queued && s.stopped;
            let next = match w.stalled {
                // Frozen: back once it is not stopped, or (idle) runs or has done its probation.
                Some(Why::Frozen) if w.frozen_stopped && !s.stopped => None,
                Some(Why::Frozen) if !w.frozen_stopped && (worked || s.running) => None,
                Some(Why::Frozen) if !w.frozen_stopped && w.retry_at.is_some_and(|t| now >= t) => None,
                Some(Why::Frozen) => Some(Why::Frozen),
                Some(Why::NotAccepting) if w.retry_at.is_some_and(|t| now >= t) => None,
                Some(Why::NotAccepting) => Some(Why::NotAccepting),
                None => {
                    let frozen =
                        stopped_twice || w.idle_since.is_some_and(|(t, _)| now.duration_since(t) >= Self::FROZEN_AFTER);
                    let busy =
                        someone_keeps_up && w.queued_since.is_some_and(|t| now.duration_since(t) >= Self::BUSY_AFTER);
                    if frozen {
                        w.frozen_stopped = stopped_twice;
                        Some(Why::Frozen)
                    } else if busy {
                        Some(Why::NotAccepting)
                    } else {
                        None
                    }
                }
            };
            if next == w.stalled {
                continue;
            }
            match next {
                Some(why) => {
                    if w.stalled_at.is_some_and(|t| now.duration_since(t) >= Self::GOOD_SPELL) {
                        w.probation = Self::PROBATION;
                    }
                    w.stalled_at = Some(now);
                    if why == Why::NotAccepting || !w.frozen_stopped {
                        w.retry_at = Some(now + w.probation);
                        w.probation = (w.probation * 2).min(Self::PROBATION_MAX);
                    }
                }
                None => {
                    w.retry_at = None;
                    w.queued_since = None;
                    w.idle_since = None;
                }
            }
            w.stalled = next;
            changed.push((slot, next));
        }
        changed
    }

    #[cfg(test)]
    pub fn is_stalled(&self, slot: usize) -> bool {
        self.slots.get(slot).is_some_and(|w| w.stalled.is_some())
    }
}

impl SlotWatch {
    /// A clean record (a new slot).
    pub fn new() -> SlotWatch {
        SlotWatch { probation: StallWatch::PROBATION, ..Default::default() }
    }

    /// Why the slot is stalled now (None: it is not).
    pub fn why(&self) -> Option<Why> {
        self.stalled
    }
}

/// State and CPU use of processes `pids`: (any stopped, any running or runnable, a CPU counter); None for
/// the counter when none could be read. The counter adds, per process, its CPU time over all threads in
/// clock ticks (`/proc/PID/stat`, 10 ms steps: a worker that gets a few ms of CPU per 100 ms
/// on a busy machine may show no tick for a while) and its main thread's run time in ns
/// (`/proc/PID/schedstat`, precise), so it grows whenever any thread runs a tick's worth or the
/// main thread runs at all.
pub fn proc_state(pids: &[i32]) -> (bool, bool, Option<u64>) {
    let mut stopped = false;
    let mut running = false;
    let mut counter = None;
    for pid in pids {
        let Some(stat) = crate::sys::stat(*pid) else { continue };
        match stat.state {
            'T' | 't' => stopped = true,
            'R' => running = true,
            _ => {}
        }
        let ran = main_thread_ns(*pid).unwrap_or(0);
        counter = Some(counter.unwrap_or(0) + stat.utime + stat.stime + ran);
    }
    (stopped, running, counter)
}

/// Time the main thread of `pid` has spent on a CPU, in ns (first field of /proc/PID/schedstat).
fn main_thread_ns(pid: i32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/schedstat")).ok()?;
    text.split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn at(queue: u32, cpu: u64) -> Sample {
        Sample { worker: Some(1), queue: Some(queue), cpu: Some(cpu), stopped: false, running: false }
    }

    fn stopped(queue: u32, cpu: u64) -> Sample {
        Sample { stopped: true, ..at(queue, cpu) }
    }

    #[test]
    fn a_stopped_worker_with_a_queue_is_frozen_at_the_second_sample_and_back_when_it_runs() {
        let t0 = Instant::now();
        let mut w = StallWatch::new(2);
        assert!(w.observe(t0, &[stopped(1, 50), at(0, 10)]).is_empty());
        assert_eq!(w.observe(t0 + 20 * MS, &[stopped(3, 50), at(2, 10)]), vec![(0, Some(Why::Frozen))]);
        // Its queue taken back by the launcher: still frozen while stopped.
        assert!(w.observe(t0 + 40 * MS, &[stopped(0, 50), at(0, 11)]).is_empty());
        // SIGCONT: it runs.
        assert_eq!(w.observe(t0 + 60 * MS, &[at(0, 51), at(0, 11)]), vec![(0, None)]);
    }

    #[test]
    fn a_stopped_worker_without_a_queue_is_left_alone() {
        let t0 = Instant::now();
        let mut w = StallWatch::new(1);
        for i in 0..10 {
            assert!(w.observe(t0 + i * 20 * MS, &[stopped(0, 5)]).is_empty());
        }
    }

    #[test]
    fn a_queue_nobody_works_on_is_frozen_after_250ms_even_when_every_queue_is_full() {
        let t0 = Instant::now();
        let mut w = StallWatch::new(2);
        for i in 0..12 {
            assert!(w.observe(t0 + i * 20 * MS, &[at(4, 70), at(3, 10 + i as u64)]).is_empty(), "sample {i}");
        }
        assert_eq!(w.observe(t0 + 250 * MS, &[at(4, 70), at(3, 30)]), vec![(0, Some(Why::Frozen))]);
        assert!(w.is_stalled(0) && !w.is_stalled(1));
        // Deadlocked and idle: tried again after its probation (1 s), frozen again if still stuck.
        assert!(w.observe(t0 + 1249 * MS, &[at(0, 70), at(0, 31)]).is_empty());
        assert_eq!(w.observe(t0 + 1250 * MS, &[at(0, 70), at(0, 31)]), vec![(0, None)]);
    }

    #[test]
    fn a_runnable_worker_waiting_for_a_cpu_is_not_frozen() {
        let t0 = Instant::now();
        let mut w = StallWatch::new(2);
        let starved = Sample { running: true, ..at(6, 70) };
        for i in 0..50 {
            assert!(w.observe(t0 + i * 20 * MS, &[starved, at(0, 1)]).is_empty(), "sample {i}");
        }
    }

    #[test]
    fn a_worker_waiting_for_a_cpu_is_not_frozen() {
        let t0 = Instant::now();
        let mut w = StallWatch::new(2);
        let starved = Sample { running: true, ..at(4, 70) };
        for i in 0..20 {
            assert!(w.observe(t0 + i * 20 * MS, &[starved, at(3, 10 + i as u64)]).is_empty(), "sample {i}");
        }
    }

    #[test]
    fn cpu_used_in_between_restarts_the_idle_clock() {
        let t0 = Instant::now();
        let mut w = StallWatch::new(1);
        w.observe(t0, &[at(2, 70)]);
        w.observe(t0 + 200 * MS, &[at(2, 71)]);
        assert!(w.observe(t0 + 440 * MS, &[at(2, 71)]).is_empty());
        assert_eq!(w.observe(t0 + 450 * MS, &[at(2, 71)]), vec![(0, Some(Why::Frozen))]);
        // Runs again: back at once.
        assert_eq!(w.observe(t0 + 470 * MS, &[at(0, 72)]), vec![(0, None)]);
    }

    #[test]
    fn a_busy_worker_that_never_drains_while_others_do_is_not_accepting_then_tried_again() {
        let t0 = Instant::now();
        let mut w = StallWatch::new(2);
        let mut t = t0;
        let mut cpu = 100;
        while t < t0 + Duration::from_millis(980) {
            cpu += 2;
            assert!(w.observe(t, &[at(7, cpu), at(0, 5)]).is_empty());
            t += 20 * MS;
        }
        t = t0 + Duration::from_secs(1);
        assert_eq!(w.observe(t, &[at(7, cpu + 2), at(0, 5)]), vec![(0, Some(Why::NotAccepting))]);
        // Probation: 1 s, then tried again; stalls again: 2 s.
        assert!(w.observe(t + 999 * MS, &[at(0, cpu + 50), at(0, 5)]).is_empty());
        assert_eq!(w.observe(t + 1000 * MS, &[at(0, cpu + 51), at(0, 5)]), vec![(0, None)]);
        let t2 = t + Duration::from_secs(3);
        w.observe(t + 1020 * MS, &[at(3, cpu + 52), at(0, 5)]);
        assert_eq!(w.observe(t2, &[at(3, cpu + 90), at(0, 5)]), vec![(0, Some(Why::NotAccepting))]);
        assert!(w.observe(t2 + 1999 * MS, &[at(0, cpu + 99), at(0, 5)]).is_empty());
        assert_eq!(w.observe(t2 + 2000 * MS, &[at(0, cpu + 99), at(0, 5)]), vec![(0, None)]);
    }

    #[test]
    fn a_worker_that_accepts_in_batches_between_long_requests_is_not_singled_out() {
        let t0 = Instant::now();
        let mut w = StallWatch::new(2);
        for i in 0..200u64 {
            // Its queue never empties at a sample, but it drops every 100 ms: it accepts.
            let queue = 2 + (i % 5) as u32 * 3;
            assert!(w.observe(t0 + i as u32 * 20 * MS, &[at(queue, i), at(0, 2 * i)]).is_empty(), "sample {i}");
        }
    }

    #[test]
    fn an_overloaded_machine_singles_out_nobody_who_works() {
        let t0 = Instant::now();
        let mut w = StallWatch::new(2);
        for i in 0..300u64 {
            assert!(w.observe(t0 + i as u32 * 20 * MS, &[at(8, i), at(7, 2 * i)]).is_empty());
        }
        let unreadable = Sample::default();
        assert!(w.observe(t0 + Duration::from_secs(7), &[at(8, 400), unreadable]).is_empty());
    }

    #[test]
    fn a_new_worker_on_the_slot_starts_clean() {
        let t0 = Instant::now();
        let mut w = StallWatch::new(2);
        w.observe(t0, &[stopped(1, 5), at(0, 1)]);
        assert_eq!(w.observe(t0 + 20 * MS, &[stopped(1, 5), at(0, 1)]), vec![(0, Some(Why::Frozen))]);
        let new = Sample { worker: Some(2), ..at(1, 0) };
        assert_eq!(w.observe(t0 + 40 * MS, &[new, at(0, 1)]), vec![(0, None)]);
    }

    #[test]
    fn proc_state_sees_running_and_stopped_processes() {
        let mut busy = std::process::Command::new("sh").args(["-c", "while :; do :; done"]).spawn().unwrap();
        let pid = busy.id() as i32;
        let deadline = Instant::now() + Duration::from_secs(10);
        let seen = |want: (bool, bool)| loop {
            let (stopped, running, ticks) = proc_state(&[pid]);
            if (stopped, running) == want && ticks.is_some() {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(seen((false, true)), "a busy loop is running or runnable");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGSTOP).unwrap();
        assert!(seen((true, false)), "a stopped process is stopped");
        busy.kill().unwrap();
        busy.wait().unwrap();
        assert_eq!(proc_state(&[i32::MAX]), (false, false, None));
    }
}
