//! The queue watch's cadence (see `queues`), through the fake `Os` over real sockets: fast
//! while workers start, every second once all is quiet, and a sample at once when a
//! connection waits on a listener (the wake thread's `Event::Queued`).

use std::time::{Duration, Instant};

use clap::Parser;

use super::super::Supervisor;
use super::MS;
use crate::cli::{Args, Config};
use crate::command::Program;
use crate::event::Event;
use crate::queues::Cadence;
use crate::socket::Listeners;

fn reuseport(workers: &str) -> Supervisor<super::FakeOs> {
    let argv = ["reuse-launch", "-b", "127.0.0.1:0", "-n", workers, "--ready-delay", "100ms", "--", "sh"];
    let cfg = Config::from_args(Args::try_parse_from(argv).unwrap(), None).unwrap();
    let listeners = Listeners::bind(&cfg.binds, cfg.mode, cfg.workers, 16).unwrap();
    let program = Program::resolve(&cfg.command).unwrap();
    Supervisor::new(cfg, listeners, program, None, super::FakeOs::default(), false).unwrap()
}

#[test]
fn the_watch_samples_fast_while_workers_start_then_every_second_and_at_once_on_a_connection() {
    let mut s = reuseport("3");
    let t0 = Instant::now();
    s.start_all(t0).unwrap();
    s.tick(t0).unwrap();
    assert_eq!(s.next_sample(), Some(t0 + Cadence::FAST), "workers are starting");
    // Ready after 100 ms; quiet for a second after that: every second.
    s.run_for(t0, Duration::from_millis(150)).unwrap();
    assert_eq!(s.workers.ready_count(), 3);
    let quiet = t0 + Duration::from_millis(150) + Cadence::HOLD + 50 * MS;
    s.run_for(t0 + Duration::from_millis(151), quiet - t0 - Duration::from_millis(151)).unwrap();
    let next = s.next_sample().unwrap();
    assert!(next > quiet && next - quiet > Duration::from_millis(500), "idle: next sample {:?} ahead", next - quiet);
    // A connection on the public port: the wake thread tells the loop, which samples now.
    let port = s.listeners.local_addrs()[0].port();
    let client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let woke = s.channels.rx.recv_timeout(Duration::from_secs(5));
    assert!(matches!(woke, Ok(Event::Queued)), "no wake: {woke:?}");
    let at = quiet + 10 * MS;
    s.handle(Event::Queued, at);
    assert_eq!(s.next_sample(), Some(at));
    // The sample sees the connection waiting: fast again.
    s.tick(at).unwrap();
    assert_eq!(s.next_sample(), Some(at + Cadence::FAST));
    drop(client);
}
