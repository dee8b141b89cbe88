//! The stall watch at scale, with its idle cadence (issue 18): while nothing waits, the launcher
//! samples the queues once a second, and a connection that arrives wakes it at once. A stopped
//! or deadlocked worker is therefore taken out as fast as when it sampled every 20 ms.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::common::*;
use crate::status_fields::*;

/// One `GET /` on a new connection to hello.c: the answering pid (its `X-Pid` header).
fn hello_get(port: u16) -> std::io::Result<i32> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(secs(5)))?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let pid = text.lines().find_map(|l| l.strip_prefix("X-Pid: ")).and_then(|p| p.trim().parse().ok());
    match pid {
        Some(pid) if text.starts_with("HTTP/1.1 200") => Ok(pid),
        _ => Err(std::io::Error::other(format!("bad answer: {text:?}"))),
    }
}

/// The launcher's log at debug for the queue watch, so that a test can wait until it is idle.
const WATCH_LOG: &str = "info,reuse_launch::queues=debug";

/// Wait until the queue watch's last word is that it is idle (it samples once a second).
fn wait_idle(l: &Launcher) {
    let idle = || {
        let log = l.log();
        let last = log.lines().rev().find(|line| line.contains("queue watch: "));
        last.is_some_and(|line| line.contains("queue watch: idle"))
    };
    assert!(wait_until(secs(20), idle), "the queue watch never went idle; log:\n{}", l.log());
}

#[test]
fn with_64_workers_and_one_stopped_every_new_connection_is_answered_within_a_second() {
    let l = Launch::new()
        .workers(64)
        .ready("auto")
        .env("RUST_LOG", WATCH_LOG)
        .cmd(&[&built_c("bench/workers/hello.c")])
        .start();
    wait_all_ready(&l, 64, secs(60));
    let port = l.port();
    for i in 0..20 {
        hello_get(port).unwrap_or_else(|e| panic!("before the fault, connection {i}: {e}"));
    }
    // Nothing waits for a second: the watch samples once a second from now (the fault comes
    // when the launcher is at its cheapest).
    wait_idle(&l);
    let stopped = l.started().iter().find(|w| w.slot == 7).unwrap().pid;
    signal(stopped, Signal::SIGSTOP);
    let taken_out = format!("(pid {stopped}, gen 1) is not running");
    let (mut worst, mut n, mut stopped_at) = (Duration::ZERO, 0, None);
    // 300 in a row, and on until one has reached the stopped worker (each does with p = 1/64).
    while n < 300 || (l.find(&taken_out).is_none() && n < 3000) {
        let t = Instant::now();
        let pid = hello_get(port).unwrap_or_else(|e| panic!("connection {n} after the stop: {e}"));
        assert_ne!(pid, stopped, "connection {n} answered by the stopped worker");
        worst = worst.max(t.elapsed());
        if stopped_at.is_none() && l.find(&taken_out).is_some() {
            stopped_at = Some(n);
        }
        n += 1;
    }
    signal(stopped, Signal::SIGCONT);
    eprintln!("{n} connections after the stop, the slowest answered in {worst:?}; taken out at {stopped_at:?}");
    assert!(l.find(&taken_out).is_some(), "no connection reached the stopped worker in {n}");
    assert!(worst < secs(1), "the slowest of {n} connections took {worst:?}");
}

/// As `steering::a_deadlocked_worker_strands_nothing`, from an idle launcher, timed: a worker
/// that deadlocks with connections waiting (alive, no CPU, never accepts) is taken out within
/// `FROZEN_AFTER` (250 ms) plus a sample or two of the connections' arrival.
#[test]
fn a_deadlocked_worker_of_an_idle_launcher_is_taken_out_within_300_ms() {
    let flags = TempPath::dir("deadlock");
    let hang = format!("{}/hang-{{slot}}", flags.str());
    let l = Launch::new().workers(2).ready("auto").env("RUST_LOG", WATCH_LOG).py(&["--hang-if-file", &hang]).start();
    wait_all_ready(&l, 2, secs(20));
    wait_idle(&l);
    let port = l.port();
    std::fs::write(format!("{}/hang-1", flags.str()), "").unwrap();
    let stuck = l.started().iter().find(|w| w.slot == 1).unwrap().pid;
    let sent = Instant::now();
    let pending: Vec<TcpStream> = (0..30)
        .map(|_| {
            let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
            send_request(&mut s).unwrap();
            s
        })
        .collect();
    l.wait_for(&format!("(pid {stuck}, gen 1) is not running"), secs(10));
    let (_, seen) = l.find(&format!("(pid {stuck}, gen 1) is not running")).unwrap();
    let after = seen.saturating_duration_since(sent);
    for (i, mut s) in pending.into_iter().enumerate() {
        s.set_read_timeout(Some(secs(10))).unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap_or_else(|e| panic!("request {i} stranded: {e}"));
        assert!(text.starts_with("HTTP/1.1 200"), "request {i}: {text:?}");
    }
    eprintln!("the deadlocked worker was taken out {after:?} after the connections were sent");
    // 250 ms of no CPU with connections waiting, from the first sample after they arrived;
    // at the idle cadence without the wake this would be up to a second more.
    assert!(after < Duration::from_millis(600), "taken out {after:?} after the connections were sent");
}
