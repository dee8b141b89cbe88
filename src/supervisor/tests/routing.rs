//! Routing in reuseport and round-robin modes, through the fake `Os` over real (unused)
//! sockets: where new connections go (the program attached to the reuseport group, the
//! forwarder's backends) while a worker crashes and is respawned, during a roll, and when the
//! queue readings the fake returns show a slot stalled. No process is forked.

use std::time::{Duration, Instant};

use clap::Parser;
use signal_hook::consts::signal::SIGUSR2;

use super::super::Supervisor;
use super::{FakeOs, MS};
use crate::cli::{Args, Config};
use crate::command::Program;
use crate::event::Event;
use crate::socket::Listeners;
use crate::stall::StallWatch;

use super::super::os::fake::Call;

fn launcher(mode: &str, workers: &str, extra: &[&str]) -> Supervisor<FakeOs> {
    let mut argv = vec![
        "reuse-launch",
        "-b",
        "127.0.0.1:0",
        "--mode",
        mode,
        "-n",
        workers,
        "--ready-delay",
        "100ms",
        "--intercept-bind",
        "off",
    ];
    argv.extend(extra);
    argv.extend(["--", "sh"]);
    let cfg = Config::from_args(Args::try_parse_from(argv).unwrap(), None).unwrap();
    let listeners = Listeners::bind(&cfg.binds, cfg.mode, cfg.workers, 16).unwrap();
    let program = Program::resolve(&cfg.command).unwrap();
    Supervisor::new(cfg, listeners, program, None, FakeOs::default(), false).unwrap()
}

/// A launcher whose `n` workers are all ready at `t0 + 150 ms`.
fn ready(mode: &str, n: usize, t0: Instant) -> Supervisor<FakeOs> {
    ready_with(mode, n, &[], t0)
}

fn ready_with(mode: &str, n: usize, extra: &[&str], t0: Instant) -> Supervisor<FakeOs> {
    let mut s = launcher(mode, &n.to_string(), extra);
    s.start_all(t0).unwrap();
    s.run_for(t0, 150 * MS).unwrap();
    assert_eq!(s.workers.ready_count(), n);
    s
}

impl Supervisor<FakeOs> {
    /// The steering calls so far: each attached program's length, None for a detach.
    fn steering(&self) -> Vec<Option<usize>> {
        self.os
            .calls
            .iter()
            .filter_map(|c| match c {
                Call::Steer(_, p) => Some(*p),
                _ => None,
            })
            .collect()
    }

    fn steered(&self) -> Option<Vec<usize>> {
        self.router.steered().clone()
    }

    fn rescued(&self) -> Vec<bool> {
        self.slots.iter().map(|s| s.route.rescued).collect()
    }
}

#[test]
fn reuseport_steers_away_from_a_crashed_slot_until_its_new_worker_is_ready() {
    let t0 = Instant::now();
    let mut s = ready("reuseport", 3, t0);
    assert_eq!(s.steered(), None, "every slot serves: the kernel's hash");
    assert!(s.steering().is_empty(), "no program was ever attached");
    let crashed = s.pid_on(1);
    s.exit(crashed, 1, t0 + 200 * MS);
    assert_eq!(s.spawns(), 4, "respawned at once");
    assert_eq!(s.serving_slots(), vec![0, 2]);
    assert_eq!(s.steered(), Some(vec![0, 2]));
    assert!(matches!(s.steering()[..], [Some(n)] if n > 0), "a program for slots 0 and 2: {:?}", s.steering());
    assert_eq!(s.rescued(), vec![false, true, false], "what waits on slot 1 is taken back");
    // Its new worker is ready 100 ms later: every slot again, the program detached.
    s.run_for(t0 + 201 * MS, 100 * MS).unwrap();
    assert_eq!(s.steered(), None);
    assert_eq!(s.steering().last(), Some(&None));
    assert_eq!(s.rescued(), vec![false; 3]);
}

#[test]
fn reuseport_roll_keeps_new_connections_off_the_slot_being_replaced() {
    let t0 = Instant::now();
    let mut s = ready("reuseport", 2, t0);
    let t = t0 + Duration::from_secs(1);
    s.handle(Event::Signal(SIGUSR2), t);
    s.tick(t).unwrap();
    assert_eq!(s.steered(), Some(vec![1]), "slot 0's new worker is starting");
    assert!(matches!(s.steering()[..], [Some(_)]));
    // Slot 0's new worker ready: its old one drains; slot 1's new one starts.
    s.tick(t + 100 * MS).unwrap();
    assert_eq!(s.steered(), Some(vec![1]));
    let old0 = s.workers.on(0).find(|(_, w)| w.is_stopping()).unwrap().1.pid;
    s.exit(old0, 0, t + 150 * MS);
    assert_eq!(s.steered(), Some(vec![0]), "slot 1 is being replaced now");
    s.tick(t + 250 * MS).unwrap();
    let old1 = s.workers.on(1).find(|(_, w)| w.is_stopping()).unwrap().1.pid;
    s.exit(old1, 0, t + 300 * MS);
    assert_eq!(s.roll.rolling_gen(), None);
    assert_eq!(s.steered(), None, "the roll is done: every slot");
    assert_eq!(s.steering().last(), Some(&None));
}

#[test]
fn reuseport_steers_away_from_a_slot_whose_queue_does_not_drain_and_back_after_probation() {
    let t0 = Instant::now();
    let mut s = ready("reuseport", 2, t0);
    // Slot 1's queue stays at 5 while slot 0's is empty.
    s.os.queues = Some(vec![Some(0), Some(5)]);
    let from = t0 + 200 * MS;
    s.run_for(from, StallWatch::BUSY_AFTER - 100 * MS).unwrap();
    assert_eq!(s.steered(), None, "not yet: {:?}", StallWatch::BUSY_AFTER);
    s.run_for(from + StallWatch::BUSY_AFTER - 99 * MS, 200 * MS).unwrap();
    assert_eq!(s.serving_slots(), vec![0]);
    assert_eq!(s.steered(), Some(vec![0]));
    assert_eq!(s.rescued(), vec![false, true]);
    let Ok(crate::event::Answer::Status(st)) = s.command(crate::event::Command::Status, from + 1200 * MS) else {
        panic!("no status")
    };
    assert_eq!(st.slots[1].workers[0].state, "stalled");
    // Its queue drains (the rescue took it): back once its probation (1 s) is over.
    s.os.queues = Some(vec![Some(0), Some(0)]);
    s.run_for(from + 1201 * MS, Duration::from_millis(1100)).unwrap();
    assert_eq!(s.serving_slots(), vec![0, 1]);
    assert_eq!(s.steered(), None);
    assert_eq!(s.rescued(), vec![false, false]);
}

#[test]
fn reuseport_a_stopped_worker_with_connections_waiting_is_frozen_within_two_samples() {
    let t0 = Instant::now();
    let mut s = ready("reuseport", 2, t0);
    let pid = s.pid_on(0).as_raw();
    s.os.queues = Some(vec![Some(3), Some(0)]);
    s.os.procs.insert(pid, (true, false, Some(7)));
    s.run_for(t0 + 200 * MS, 60 * MS).unwrap();
    assert_eq!(s.steered(), Some(vec![1]), "slot 0 is frozen");
    assert_eq!(s.rescued(), vec![true, false]);
    // SIGCONT: back at the next sample.
    s.os.procs.remove(&pid);
    s.run_for(t0 + 261 * MS, 40 * MS).unwrap();
    assert_eq!(s.steered(), None);
    assert_eq!(s.rescued(), vec![false, false]);
}

#[test]
fn round_robin_forwards_only_to_ready_slots_through_a_crash_and_a_roll() {
    let t0 = Instant::now();
    let mut s = ready("round-robin", 3, t0);
    assert_eq!(s.steered(), Some(vec![0, 1, 2]), "the forwarder's backends: every slot");
    let crashed = s.pid_on(2);
    s.exit(crashed, 1, t0 + 200 * MS);
    assert_eq!(s.steered(), Some(vec![0, 1]));
    assert_eq!(s.rescued(), vec![false, false, true]);
    s.run_for(t0 + 201 * MS, 100 * MS).unwrap();
    assert_eq!(s.steered(), Some(vec![0, 1, 2]));
    let t = t0 + Duration::from_secs(1);
    s.handle(Event::Signal(SIGUSR2), t);
    s.tick(t).unwrap();
    assert_eq!(s.steered(), Some(vec![1, 2]), "slot 0 is being replaced");
    assert!(s.steering().is_empty(), "no reuseport group, no program");
}

#[test]
fn round_robin_leaves_out_a_slot_whose_queue_does_not_drain() {
    let t0 = Instant::now();
    let mut s = ready("round-robin", 2, t0);
    s.os.queues = Some(vec![Some(4), Some(0)]);
    s.run_for(t0 + 200 * MS, StallWatch::BUSY_AFTER + 100 * MS).unwrap();
    assert_eq!(s.steered(), Some(vec![1]));
    assert_eq!(s.rescued(), vec![true, false]);
}

#[test]
fn reuseport_least_loaded_weights_the_slots_by_their_queues_and_held_connections() {
    let t0 = Instant::now();
    let mut s = ready_with("reuseport", 2, &["--steer", "least-loaded"], t0);
    // One connection waits on each slot (connections arrive); slot 0's worker holds 9 more.
    s.os.queues = Some(vec![Some(1), Some(1)]);
    let busy = s.pid_on(0).as_raw();
    s.os.held.insert(busy, 9);
    s.run_for(t0 + 200 * MS, 50 * MS).unwrap();
    let loads: Vec<Option<u32>> = s.slots.iter().map(|s| s.route.load).collect();
    assert_eq!(loads, vec![Some(10), Some(1)]);
    assert_eq!(s.steered(), None, "both slots serve");
    assert!(matches!(s.steering()[..], [Some(n)] if n > 0), "a weighted program: {:?}", s.steering());
    // As loaded as each other again: the kernel's hash.
    s.os.held.clear();
    s.run_for(t0 + 251 * MS, 50 * MS).unwrap();
    assert_eq!(s.steering().last(), Some(&None));
}

#[test]
fn reuseport_scale_down_steers_away_from_the_retiring_slot_and_closes_it_once_settled() {
    let t0 = Instant::now();
    let mut s = ready("reuseport", 3, t0);
    let t = t0 + 200 * MS;
    let scaled = s.command(crate::event::Command::Scale(crate::event::Scale::To(2)), t);
    assert_eq!(scaled, Ok(crate::event::Answer::Scaled { desired: 2 }));
    s.tick(t).unwrap();
    assert!(s.slots[2].retiring.is_some());
    assert_eq!(s.steered(), Some(vec![0, 1]));
    assert!(matches!(s.steering()[..], [Some(_)]), "a program that leaves slot 2 out");
    assert_eq!(s.slots[2].excluded_at, Some(t));
    let pid = s.workers.on(2).next().unwrap().1.pid;
    s.exit(pid, 0, t + 10 * MS);
    s.tick(t + 999 * MS).unwrap();
    assert_eq!(s.slots.len(), 3, "not settled yet");
    // Once settled, and once the rescue's thread has let go of its fds (a real thread: a
    // turn or a few).
    let settled = t + plan_settle();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut at = settled;
    while s.slots.len() == 3 && Instant::now() < deadline {
        s.tick(at).unwrap();
        at += MS;
        std::thread::yield_now();
    }
    assert_eq!(s.slots.len(), 2, "closed: one pop");
    assert_eq!(s.listeners.slot_count(), Some(2));
    // The programs are rebuilt for two slots: both serve, so the kernel's hash.
    assert_eq!(s.steered(), None);
    assert_eq!(s.steering().last(), Some(&None));
}

fn plan_settle() -> Duration {
    super::super::plan::SETTLE
}
