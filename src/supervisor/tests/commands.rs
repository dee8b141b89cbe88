//! The control commands, `--drain-delay` and publishing for `--metrics`, driven through the
//! fake [`Os`](super::super::os::Os) like the lifecycle rules in the parent module.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use signal_hook::consts::signal::SIGUSR2;

use super::{supervisor, MS};
use crate::event::{Answer, Command, Event, Scale};

#[test]
fn control_status_reports_slots_workers_and_restarts() {
    let t0 = Instant::now();
    let mut s = supervisor(&["-n", "2"]);
    s.start_all(t0).unwrap();
    s.tick(t0 + 100 * MS).unwrap();
    let crashed = s.pid_on(1);
    s.exit(crashed, 3, t0 + 200 * MS);
    let Ok(Answer::Status(st)) = s.command(Command::Status, t0 + 250 * MS) else { panic!("no status") };
    assert_eq!((st.desired, st.ready, st.generation, st.roll), (2, 1, 1, None));
    assert_eq!(st.slots.len(), 2);
    assert_eq!(st.slots[0].workers[0].state, "ready");
    assert_eq!(st.slots[1].workers[0].state, "starting");
    assert_eq!(st.slots[1].restarts, vec![("crash", 1)]);
    assert_eq!(st.slots[1].last_exit.as_deref(), Some("exited with status 3"));
    assert_eq!(st.slots[0].restarts_total(), 0);
}

#[test]
fn control_scale_adds_and_retires_slots_and_refuses_zero() {
    let t0 = Instant::now();
    let mut s = supervisor(&["-n", "2"]);
    s.start_all(t0).unwrap();
    s.tick(t0 + 100 * MS).unwrap();
    assert_eq!(s.command(Command::Scale(Scale::To(3)), t0 + 200 * MS), Ok(Answer::Scaled { desired: 3 }));
    s.tick(t0 + 200 * MS).unwrap();
    assert_eq!((s.slots.len(), s.spawns()), (3, 3));
    assert!(s.command(Command::Scale(Scale::By(-3)), t0 + 300 * MS).unwrap_err().contains("at least 1 must run"));
    assert_eq!(s.command(Command::Scale(Scale::By(-2)), t0 + 300 * MS), Ok(Answer::Scaled { desired: 1 }));
    s.tick(t0 + 300 * MS).unwrap();
    s.tick(t0 + 301 * MS).unwrap();
    // The highest slots retire one a turn: their workers are told to stop, not respawned.
    assert!(s.slots[2].retiring.is_some() && s.slots[1].retiring.is_some());
    for slot in [1, 2] {
        let pid = s.workers.on(slot).next().unwrap().1.pid;
        assert_eq!(s.os.signals_to(pid), vec![Signal::SIGTERM]);
        s.exit(pid, 0, t0 + 400 * MS);
    }
    assert_eq!(s.spawns(), 3, "a retiring slot is not respawned");
    // Closed once empty and settled (a second without new connections).
    s.tick(t0 + 1400 * MS).unwrap();
    assert_eq!(s.slots.len(), 1);
}

#[test]
fn control_roll_and_stop() {
    let t0 = Instant::now();
    let mut s = supervisor(&["-n", "1"]);
    s.start_all(t0).unwrap();
    s.tick(t0 + 100 * MS).unwrap();
    assert_eq!(s.command(Command::Roll, t0 + 200 * MS), Ok(Answer::Rolling { generation: 2 }));
    assert_eq!(s.command(Command::Roll, t0 + 200 * MS), Ok(Answer::Rolling { generation: 3 }), "queued after gen 2");
    assert_eq!(s.command(Command::Stop, t0 + 300 * MS), Ok(Answer::Stopping));
    assert!(s.command(Command::Roll, t0 + 300 * MS).is_err());
    assert!(s.command(Command::Scale(Scale::To(4)), t0 + 300 * MS).is_err());
}

#[test]
fn drain_delay_keeps_serving_then_stops_and_a_second_term_cuts_it_short() {
    use signal_hook::consts::signal::{SIGINT, SIGTERM};
    let t0 = Instant::now();
    let mut s = supervisor(&["-n", "2", "--drain-delay", "2s"]);
    s.start_all(t0).unwrap();
    s.tick(t0 + 100 * MS).unwrap();
    let pids = [s.pid_on(0), s.pid_on(1)];
    let t1 = t0 + 200 * MS;
    s.handle(Event::Signal(SIGTERM), t1);
    s.tick(t1).unwrap();
    assert!(s.snapshot(t1).stopping, "stopping from the first moment");
    assert!(s.halt.shutdown.is_none() && s.os.signals_to(pids[0]).is_empty());
    assert!(s.next_deadline().unwrap() <= t1 + Duration::from_secs(2));
    // Workers that die meanwhile are respawned; rolls are refused.
    s.exit(pids[1], 1, t1 + 500 * MS);
    assert_eq!(s.spawns(), 3);
    s.handle(Event::Signal(SIGUSR2), t1 + 600 * MS);
    assert_eq!(s.roll.rolling_gen(), None);
    s.run_for(t1 + 600 * MS, 1390 * MS).unwrap();
    assert!(s.os.signals_to(pids[0]).is_empty(), "stopped before the delay was over");
    s.tick(t1 + Duration::from_secs(2)).unwrap();
    assert_eq!(s.os.signals_to(pids[0]), vec![Signal::SIGTERM]);
    assert!(s.halt.shutdown.is_some());

    // A second TERM (or INT) during the delay starts the graceful stop at once; a third kills.
    let mut s = supervisor(&["-n", "1", "--drain-delay", "30s"]);
    s.start_all(t0).unwrap();
    s.tick(t0 + 100 * MS).unwrap();
    let pid = s.pid_on(0);
    s.handle(Event::Signal(SIGTERM), t1);
    assert!(s.os.signals_to(pid).is_empty());
    s.handle(Event::Signal(SIGINT), t1 + MS);
    assert_eq!(s.os.signals_to(pid), vec![Signal::SIGTERM]);
    s.handle(Event::Signal(SIGTERM), t1 + 2 * MS);
    assert_eq!(s.os.signals_to(pid), vec![Signal::SIGTERM, Signal::SIGKILL]);
}

#[test]
fn without_drain_delay_term_stops_at_once() {
    let t0 = Instant::now();
    let mut s = supervisor(&["-n", "1"]);
    s.start_all(t0).unwrap();
    s.tick(t0 + 100 * MS).unwrap();
    let pid = s.pid_on(0);
    s.handle(Event::Signal(signal_hook::consts::SIGTERM), t0 + 200 * MS);
    assert_eq!(s.os.signals_to(pid), vec![Signal::SIGTERM]);
}

#[test]
fn with_metrics_the_loop_beats_every_second_and_publishes_only_changes() {
    let t0 = Instant::now();
    let mut s = supervisor(&["-n", "2", "--metrics", "127.0.0.1:0", "--drain-delay", "1s"]);
    s.start_all(t0).unwrap();
    let t = t0 + 500 * MS;
    s.tick(t).unwrap();
    let board = s.publishing.board.clone().unwrap();
    assert_eq!(board.view().snapshot.ready, 2);
    // Idle (shared mode, every worker ready): the only deadline is the next heartbeat.
    let beat = board.last_beat();
    assert!(beat + Duration::from_secs(1) >= s.next_deadline().unwrap());
    assert!(s.next_deadline().unwrap() <= t + Duration::from_secs(1));
    // Nothing changed: the same view is kept (no rebuild) until the refresh.
    let v1 = board.view();
    s.tick(t + 20 * MS).unwrap();
    assert!(std::sync::Arc::ptr_eq(&v1, &board.view()));
    assert!(board.last_beat() > beat);
    s.tick(t + 1100 * MS).unwrap();
    assert!(!std::sync::Arc::ptr_eq(&v1, &board.view()), "refreshed after a second");
    // A change is published in the same turn.
    let pid = s.pid_on(0);
    s.exit(pid, 1, t + 1200 * MS);
    assert_eq!(board.view().snapshot.slots[0].restarts, vec![("crash", 1)]);
    // TERM with a drain delay: stopping at once for /readyz, before any turn.
    assert!(!board.stopping());
    s.handle(Event::Signal(signal_hook::consts::SIGTERM), t + 1300 * MS);
    assert!(board.stopping());
}

/// The control socket's stop goes through --drain-delay like TERM, and nothing else is taken
/// meanwhile.
#[test]
fn control_stop_drains_first_and_refuses_changes_meanwhile() {
    let t0 = Instant::now();
    let mut s = supervisor(&["-n", "1", "--drain-delay", "2s"]);
    s.start_all(t0).unwrap();
    s.tick(t0 + 100 * MS).unwrap();
    let pid = s.pid_on(0);
    assert_eq!(s.command(Command::Stop, t0 + 200 * MS), Ok(Answer::Stopping));
    assert!(s.os.signals_to(pid).is_empty(), "no stop signal during the drain delay");
    assert!(s.command(Command::Roll, t0 + 300 * MS).unwrap_err().contains("draining"));
    assert!(s.command(Command::Scale(Scale::To(3)), t0 + 300 * MS).unwrap_err().contains("draining"));
    s.tick(t0 + 2200 * MS).unwrap();
    assert_eq!(s.os.signals_to(pid), vec![Signal::SIGTERM]);
}

#[test]
fn scaling_stays_within_min_max_and_the_policy_goes_on_from_a_manual_change() {
    let t0 = Instant::now();
    let mut s = supervisor(&["-n", "1..3", "--scale-down-after", "1s"]);
    s.start_all(t0).unwrap();
    s.tick(t0 + 100 * MS).unwrap();
    let refused = s.command(Command::Scale(Scale::To(4)), t0 + 150 * MS).unwrap_err();
    assert_eq!(refused, "control: cannot scale to 4 workers: -n 1..3 keeps between 1 and 3");
    assert_eq!(s.command(Command::Scale(Scale::By(1)), t0 + 200 * MS), Ok(Answer::Scaled { desired: 2 }));
    // Nothing waits anywhere (the sockets are unused): after the calm, back to MIN.
    s.run_for(t0 + 200 * MS, Duration::from_millis(1800)).unwrap();
    let Ok(Answer::Status(st)) = s.command(Command::Status, t0 + 2000 * MS) else { panic!("no status") };
    let a = st.autoscale.expect("autoscale in the status");
    let texts: Vec<(String, String)> = a.decisions.iter().map(|d| (d.by.clone(), d.text())).collect();
    assert_eq!(
        texts,
        [
            ("control".into(), "scaled up to 2: asked by control".into()),
            ("auto".into(), "scaled down to 1: calm for 1s".into())
        ]
    );
    assert_eq!((st.desired, a.min, a.max, a.downs), (1, 1, 3, 1));
}

#[test]
fn the_one_shared_queue_counts_once_for_the_policy() {
    let t0 = Instant::now();
    let mut s = supervisor(&["-n", "2..3"]);
    s.start_all(t0).unwrap();
    s.tick(t0 + 100 * MS).unwrap();
    // One connection waits in the one queue of shared mode: not one per slot.
    let addr = s.listeners.local_addrs()[0];
    let one = std::net::TcpStream::connect(addr).unwrap();
    s.run_for(t0 + 100 * MS, Duration::from_millis(3000)).unwrap();
    assert_eq!(s.scaling.desired, 2, "one waiting connection on two slots is no pressure");
    // Two wait: every request waits behind another.
    let two = std::net::TcpStream::connect(addr).unwrap();
    s.run_for(t0 + 3200 * MS, Duration::from_millis(2500)).unwrap();
    assert_eq!(s.scaling.desired, 3);
    drop((one, two));
}
