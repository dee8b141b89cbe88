//! The lifecycle rules, driven through the fake [`Os`]: no process is forked. Each test builds
//! a supervisor over real (unused) sockets, feeds it events and times, and checks what it asked
//! the OS to do.

use std::time::{Duration, Instant};

use clap::Parser;
use nix::sys::signal::Signal;
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;
use signal_hook::consts::signal::{SIGCHLD, SIGUSR2};

use super::lifecycle::{backoff, describe, BACKOFF_MAX};
use super::os::fake::{Call, FakeOs};
use super::workers::State;
use super::Supervisor;
use crate::cli::{Args, Config};
use crate::command::Program;
use crate::event::Event;
use crate::socket::Listeners;

mod cadence;
mod commands;
mod routing;

pub(super) const MS: Duration = Duration::from_millis(1);

/// A launcher in shared mode over `sh`, with `args` added to the flags.
pub(super) fn supervisor(args: &[&str]) -> Supervisor<FakeOs> {
    // No bind() interception: its start-up probe forks, and the fake Os starts nothing to serve.
    let mut argv = vec![
        "reuse-launch",
        "-b",
        "127.0.0.1:0",
        "--mode",
        "shared",
        "--ready-delay",
        "100ms",
        "--intercept-bind",
        "off",
    ];
    argv.extend(args);
    argv.extend(["--", "sh"]);
    let cfg = Config::from_args(Args::try_parse_from(argv).unwrap(), None).unwrap();
    let listeners = Listeners::bind(&cfg.binds, cfg.mode, cfg.workers, 16).unwrap();
    let program = Program::resolve(&cfg.command).unwrap();
    Supervisor::new(cfg, listeners, program, None, FakeOs::default(), false).unwrap()
}

impl Supervisor<FakeOs> {
    /// The pid of `slot`'s worker that is not stopping.
    fn pid_on(&self, slot: usize) -> Pid {
        self.workers.on(slot).find(|(_, w)| !w.is_stopping()).map(|(_, w)| w.pid).expect("a live worker")
    }

    /// `pid` exits with `code`; the loop hears SIGCHLD at `now` and ticks.
    fn exit(&mut self, pid: Pid, code: i32, now: Instant) {
        self.os.exit(pid, code);
        self.handle(Event::Signal(SIGCHLD), now);
        self.tick(now).unwrap();
    }

    fn spawns(&self) -> usize {
        self.os.calls.iter().filter(|c| matches!(c, Call::Spawn(_))).count()
    }

    /// Tick every millisecond from `from` for `span`; the first tick that fails.
    fn run_for(&mut self, from: Instant, span: Duration) -> Result<(), crate::error::Error> {
        let mut t = from;
        while t <= from + span {
            self.tick(t)?;
            t += MS;
        }
        Ok(())
    }
}

#[test]
fn backoff_grows_by_half_and_caps() {
    assert_eq!(backoff(0), Duration::ZERO);
    assert_eq!(backoff(1), Duration::from_millis(500));
    assert_eq!(backoff(2), Duration::from_millis(750));
    assert_eq!(backoff(3), Duration::from_millis(1125));
    assert_eq!(backoff(20), BACKOFF_MAX);
    assert_eq!(backoff(u32::MAX), BACKOFF_MAX);
}

#[test]
fn describes_exits() {
    let p = Pid::from_raw(1);
    assert_eq!(describe(WaitStatus::Exited(p, 3)), "exited with status 3");
    assert_eq!(describe(WaitStatus::Signaled(p, Signal::SIGSEGV, false)), "killed by SIGSEGV");
}

#[test]
fn a_crash_respawns_at_once_then_with_growing_backoff() {
    let t0 = Instant::now();
    let mut s = supervisor(&["-n", "2"]);
    s.start_all(t0).unwrap();
    s.tick(t0 + 100 * MS).unwrap();
    assert_eq!(s.workers.ready_count(), 2);
    // First death of a ready worker: a new one at once, same slot and generation.
    let first = s.pid_on(1);
    s.exit(first, 1, t0 + 200 * MS);
    assert_eq!(s.spawns(), 3);
    let second = s.pid_on(1);
    assert_ne!(first, second);
    assert_eq!(s.workers.on(1).next().unwrap().1.gen, 1);
    // It dies at once: 500 ms, then 750 ms.
    let mut t = t0 + 210 * MS;
    for delay in [500, 750] {
        let pid = s.pid_on(1);
        s.exit(pid, 1, t);
        let spawned = s.spawns();
        s.tick(t + (delay - 1) * MS).unwrap();
        assert_eq!(s.spawns(), spawned, "respawned before {delay} ms");
        assert_eq!(s.next_deadline(), Some(t + delay * MS));
        s.tick(t + delay * MS).unwrap();
        assert_eq!(s.spawns(), spawned + 1, "not respawned after {delay} ms");
        t += delay * MS;
    }
    // Slot 0 was never touched.
    assert_eq!(s.slots[0].quick_deaths, 0);
    assert_eq!(s.slots[1].quick_deaths, 3);
}

#[test]
fn a_worker_that_served_for_5s_resets_its_backoff_one_that_did_not_backs_off() {
    let t0 = Instant::now();
    let mut s = supervisor(&["-n", "1"]);
    s.start_all(t0).unwrap();
    s.slots[0].quick_deaths = 6;
    s.tick(t0 + 100 * MS).unwrap();
    let pid = s.pid_on(0);
    // Ready at 100 ms, killed at 4.9 s: still a quick death (backoff grows).
    s.exit(pid, 1, t0 + 4900 * MS);
    assert_eq!(s.spawns(), 1, "backing off");
    assert_eq!(s.slots[0].quick_deaths, 7);
    let at = s.slots[0].respawn_at.unwrap();
    s.tick(at).unwrap();
    s.tick(at + 100 * MS).unwrap();
    // This one serves for 5 s, then is killed: replaced at once.
    let pid = s.pid_on(0);
    s.exit(pid, 1, at + 5000 * MS);
    assert_eq!(s.spawns(), 3, "a worker that served 5 s is replaced at once");
    assert_eq!(s.slots[0].quick_deaths, 1);
}

#[test]
fn a_worker_that_ran_long_resets_its_backoff() {
    let t0 = Instant::now();
    let mut s = supervisor(&["-n", "1"]);
    s.start_all(t0).unwrap();
    s.slots[0].quick_deaths = 7;
    s.tick(t0 + 100 * MS).unwrap();
    let pid = s.pid_on(0);
    s.exit(pid, 1, t0 + Duration::from_secs(31));
    assert_eq!(s.spawns(), 2, "a stable worker's death respawns at once");
}

/// `slot`'s worker dies before it was ready, at `t`; the loop then runs until its next worker
/// has started. Returns that time, or the loop's error.
fn fail_before_ready(s: &mut Supervisor<FakeOs>, slot: usize, t: Instant) -> Result<Instant, crate::error::Error> {
    let pid = s.pid_on(slot);
    s.os.exit(pid, 1);
    s.handle(Event::Signal(SIGCHLD), t);
    s.tick(t)?;
    let at = s.slots[slot].respawn_at.unwrap_or(t);
    s.tick(at)?;
    Ok(at)
}

#[test]
fn gives_up_when_every_slot_fails_to_start_max_times() {
    let t0 = Instant::now();
    let mut s = supervisor(&["-n", "2", "--max-start-failures", "3", "--ready", "notify"]);
    s.start_all(t0).unwrap();
    let ready0 = s.pid_on(0);
    s.mark_ready(s.workers.by_pid(ready0).unwrap(), t0);
    // Slot 1 never becomes ready: no give-up, one bad slot stops nobody.
    let mut t = t0;
    for _ in 0..3 {
        t = fail_before_ready(&mut s, 1, t).unwrap();
    }
    assert_eq!(s.slots[1].start_failures, 3);
    assert_eq!(s.pid_on(0), ready0);
    // Now slot 0 fails three times before ready too: the launcher gives up at the third.
    s.os.exit(ready0, 1);
    s.handle(Event::Signal(SIGCHLD), t);
    s.tick(t).unwrap();
    assert_eq!(s.slots[0].start_failures, 0, "a ready worker's death is no start failure");
    t = fail_before_ready(&mut s, 0, t).unwrap();
    t = fail_before_ready(&mut s, 0, t).unwrap();
    let err = fail_before_ready(&mut s, 0, t).expect_err("gave up").to_string();
    assert!(err.contains("3 times in a row on each slot"), "{err}");
    assert!(err.contains("exited with status 1"), "{err}");
}

#[test]
fn a_ready_timeout_stops_the_worker_and_counts_as_a_crash() {
    let t0 = Instant::now();
    let mut s = supervisor(&["-n", "1", "--ready", "notify", "--ready-timeout", "2s"]);
    s.start_all(t0).unwrap();
    let pid = s.pid_on(0);
    s.tick(t0 + 1999 * MS).unwrap();
    assert!(s.os.signals_to(pid).is_empty());
    s.tick(t0 + 2000 * MS).unwrap();
    assert_eq!(s.os.signals_to(pid), vec![Signal::SIGTERM]);
    s.exit(pid, 0, t0 + 2010 * MS);
    assert_eq!(s.slots[0].start_failures, 1, "a timed-out start is a start failure");
    assert_eq!(s.slots[0].quick_deaths, 1);
    assert_eq!(s.spawns(), 2);
}

#[test]
fn a_missed_watchdog_restarts_the_worker_like_a_crash() {
    let t0 = Instant::now();
    let mut s = supervisor(&["-n", "1", "--watchdog", "1s"]);
    s.start_all(t0).unwrap();
    let pid = s.pid_on(0);
    s.tick(t0 + 100 * MS).unwrap();
    assert_eq!(s.workers.ready_count(), 1);
    // Fed at 900 ms: the deadline moves to 1.9 s.
    s.feed_watchdog(s.workers.by_pid(pid).unwrap(), t0 + 900 * MS);
    s.tick(t0 + 1800 * MS).unwrap();
    assert!(s.os.signals_to(pid).is_empty());
    s.tick(t0 + 1900 * MS).unwrap();
    assert_eq!(s.os.signals_to(pid), vec![Signal::SIGTERM]);
    s.exit(pid, 0, t0 + 1950 * MS);
    assert_eq!(s.slots[0].quick_deaths, 1, "counted as a crash");
    assert_eq!(s.slots[0].start_failures, 0, "it had been ready");
    assert_eq!(s.spawns(), 2);
}

#[test]
fn sigkill_follows_the_stop_signal_after_grace() {
    let t0 = Instant::now();
    let mut s = supervisor(&["-n", "2", "--grace", "3s", "--stop-signal", "INT"]);
    s.start_all(t0).unwrap();
    s.tick(t0 + 100 * MS).unwrap();
    let (a, b) = (s.pid_on(0), s.pid_on(1));
    s.handle(Event::Signal(signal_hook::consts::SIGTERM), t0 + Duration::from_secs(1));
    assert_eq!(s.os.signals_to(a), vec![Signal::SIGINT]);
    // `a` exits in time (its group is then SIGKILLed for leftovers); `b` does not.
    let a_before_exit = s.os.signals_to(a);
    s.exit(a, 0, t0 + Duration::from_secs(2));
    assert_eq!(s.os.signals_to(a), vec![Signal::SIGINT, Signal::SIGKILL], "leftovers of an exited worker");
    s.tick(t0 + Duration::from_millis(3999)).unwrap();
    assert_eq!(s.os.signals_to(b), vec![Signal::SIGINT]);
    s.tick(t0 + Duration::from_secs(4)).unwrap();
    assert_eq!(s.os.signals_to(b), vec![Signal::SIGINT, Signal::SIGKILL]);
    assert_eq!(a_before_exit, vec![Signal::SIGINT], "no SIGKILL before it exited");
    s.handle(Event::Signal(SIGCHLD), t0 + Duration::from_secs(4));
    assert!(s.workers.is_empty());
    assert_eq!(s.spawns(), 2, "nothing respawned during a stop");
}

/// The order of spawns and stop signals during a roll of 3 slots: each new worker is ready
/// before its slot's old one is told to stop, one slot at a time.
#[test]
fn a_roll_makes_before_it_breaks_one_slot_at_a_time() {
    let t0 = Instant::now();
    let mut s = supervisor(&["-n", "3"]);
    s.start_all(t0).unwrap();
    s.tick(t0 + 100 * MS).unwrap();
    let old: Vec<Pid> = (0..3).map(|slot| s.pid_on(slot)).collect();
    let mut t = t0 + Duration::from_secs(1);
    s.handle(Event::Signal(SIGUSR2), t);
    for (slot, &old_pid) in old.iter().enumerate() {
        let new = *s.os.alive().last().unwrap();
        let w = s.workers.get(s.workers.by_pid(new).unwrap()).unwrap();
        assert_eq!((w.slot, w.gen, w.candidate), (slot, 2, true));
        assert!(s.os.signals_to(old_pid).is_empty(), "slot {slot}: old stopped before the new one was ready");
        assert!(s.workers.len() <= 4, "never more than N+1 workers");
        t += 99 * MS;
        s.tick(t).unwrap();
        assert!(s.os.signals_to(old_pid).is_empty());
        t += MS;
        s.tick(t).unwrap();
        assert_eq!(s.os.signals_to(old_pid), vec![Signal::SIGTERM], "slot {slot}");
        assert_eq!(s.slots[slot].gen, 2);
        // The next slot starts only once this one's old worker has exited.
        s.exit(old_pid, 0, t);
    }
    assert_eq!(s.roll.rolling_gen(), None);
    assert_eq!(s.spawns(), 6);
    assert!(s.workers.iter().all(|(_, w)| w.gen == 2 && w.state == State::Ready));
}

#[test]
fn roll_requests_during_a_roll_coalesce_into_one() {
    let t0 = Instant::now();
    let mut s = supervisor(&["-n", "2"]);
    s.start_all(t0).unwrap();
    s.tick(t0 + 100 * MS).unwrap();
    let t1 = t0 + Duration::from_secs(1);
    for _ in 0..5 {
        s.handle(Event::Signal(SIGUSR2), t1);
    }
    assert_eq!(s.roll.rolling_gen(), Some(2));
    // Let every new worker become ready and every old one exit, until nothing rolls.
    let mut t = t1;
    for _ in 0..200 {
        t += 10 * MS;
        s.tick(t).unwrap();
        for pid in s.workers.iter().filter(|(_, w)| w.is_stopping()).map(|(_, w)| w.pid).collect::<Vec<_>>() {
            s.exit(pid, 0, t);
        }
        if s.roll.rolling_gen().is_none() {
            break;
        }
    }
    assert!(s.roll.rolling_gen().is_none());
    let gens: Vec<u64> = s.workers.iter().map(|(_, w)| w.gen).collect();
    assert_eq!(gens, vec![3, 3], "five requests during gen 2 made exactly one more roll");
    assert_eq!(s.spawns(), 2 + 2 + 2);
}

#[test]
fn a_failed_spawn_is_a_start_failure_with_backoff() {
    let t0 = Instant::now();
    let mut s = supervisor(&["-n", "1"]);
    s.start_all(t0).unwrap();
    s.tick(t0 + 100 * MS).unwrap();
    s.os.fail_spawns = Some(libc::EAGAIN);
    let pid = s.pid_on(0);
    s.exit(pid, 1, t0 + 200 * MS);
    assert_eq!(s.slots[0].start_failures, 1);
    assert!(s.slots[0].last_failure.contains("could not start"), "{}", s.slots[0].last_failure);
    assert_eq!(s.slots[0].respawn_at, Some(t0 + 700 * MS));
    s.os.fail_spawns = None;
    s.run_for(t0 + 201 * MS, 500 * MS).unwrap();
    assert_eq!(s.spawns(), 2);
}

/// During a roll of 2 slots, while slot 0's old worker drains and slot 1's new one starts, new
/// connections go to slot 1 (whose old worker has had no stop signal), not to both.
#[test]
fn a_draining_slot_gets_no_new_connections_while_another_can_take_them() {
    let t0 = Instant::now();
    let mut s = supervisor(&["-n", "2"]);
    s.start_all(t0).unwrap();
    s.tick(t0 + 100 * MS).unwrap();
    assert_eq!(s.serving_slots(), vec![0, 1]);
    let t = t0 + Duration::from_secs(1);
    s.handle(Event::Signal(SIGUSR2), t);
    assert_eq!(s.serving_slots(), vec![1], "slot 0's new worker is starting");
    s.tick(t + 100 * MS).unwrap();
    // Slot 0: new worker ready, old one stopping. Slot 1: its new worker starting.
    assert!(s.workers.draining(0) && s.workers.replacing(1) && !s.workers.draining(1));
    assert_eq!(s.serving_slots(), vec![1]);
    let old0 = s.workers.on(0).find(|(_, w)| w.is_stopping()).unwrap().1.pid;
    s.exit(old0, 0, t + 150 * MS);
    assert_eq!(s.serving_slots(), vec![0]);
}
