//! Nothing a worker started outlives the launcher (issue 11, part 6): not when the launcher is
//! SIGKILLed (the OOM killer), not when it stops in order. PDEATHSIG reaches only the workers
//! themselves; the sentinel (`src/sentinel.rs`) ends the rest: children in the worker's group,
//! double-forked ones, ones in a session of their own, and a forking server's own workers.

use nix::sys::signal::Signal;

use crate::common::*;
use crate::status_fields::*;

/// The processes whose command line contains `token`.
fn with_token(token: &str) -> Vec<i32> {
    let has = |pid: i32| {
        std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| String::from_utf8_lossy(&c).contains(token))
    };
    processes().into_iter().filter(|p| p.state != "Z").map(|p| p.pid).filter(|p| has(*p)).collect()
}

fn token() -> String {
    // Unique per test process and call: seconds for `sleep`, found again in /proc.
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    format!("{}{}", 7000 + std::process::id() % 1000, N.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
}

/// The number of processes the sentinel's last scan noted (its test hook).
fn noted(trace: &TempPath) -> usize {
    std::fs::read_to_string(&**trace).ok().and_then(|t| t.trim().parse().ok()).unwrap_or(0)
}

/// A launcher over 2 forky workers, once their 8 sleepers run and the sentinel has noted them
/// (and the 2 workers).
fn forky(token: &str, trace: &TempPath) -> Launcher {
    let l = Launch::new()
        .workers(2)
        .ready("auto")
        .env("REUSE_LAUNCH_SENTINEL_TRACE", trace.str())
        .cmd(&[&worker("forky.sh"), token])
        .start();
    wait_all_ready(&l, 2, secs(20));
    assert!(wait_until(secs(10), || with_token(token).len() >= 8), "{:?}", with_token(token));
    assert!(wait_until(secs(10), || noted(trace) >= 10), "the sentinel noted {}", noted(trace));
    l
}

#[test]
fn a_sigkilled_launcher_leaves_no_process_of_its_workers() {
    let (token, trace) = (token(), TempPath::new("sentinel"));
    let mut l = forky(&token, &trace);
    l.signal(Signal::SIGKILL);
    assert!(l.wait_exit(secs(10)).is_some());
    let gone = wait_until(secs(10), || with_token(&token).is_empty());
    assert!(gone, "left behind: {:?}", with_token(&token));
}

#[test]
fn a_launcher_that_stops_in_order_leaves_no_process_of_its_workers() {
    let (token, trace) = (token(), TempPath::new("sentinel"));
    let mut l = forky(&token, &trace);
    l.signal(Signal::SIGTERM);
    assert_eq!(l.exit_code(secs(20)), 0);
    let gone = wait_until(secs(10), || with_token(&token).is_empty());
    assert!(gone, "left behind: {:?}", with_token(&token));
}

#[test]
fn a_sigkilled_launcher_running_starman_leaves_no_starman_worker() {
    require(&["starman", "--version"], "install Starman (apt-get install starman libserver-starter-perl)");
    let app = worker("starman/app.psgi");
    let trace = TempPath::new("sentinel");
    let mut l = Launch::new()
        .workers(2)
        .ready("auto")
        .env("REUSE_LAUNCH_SENTINEL_TRACE", trace.str())
        .flag("--stop-signal", "QUIT")
        .cmd(&["starman", "--workers", "2", &app])
        .start();
    wait_all_ready(&l, 2, secs(30));
    let masters = l.started_pids();
    assert!(wait_until(secs(20), || members_of(&masters, u64::MAX).len() >= 6), "2 masters with 2 workers each");
    let procs = procs(&members_of(&masters, u64::MAX));
    assert!(wait_until(secs(10), || noted(&trace) >= 6), "the sentinel noted {}", noted(&trace));
    l.signal(Signal::SIGKILL);
    assert!(l.wait_exit(secs(10)).is_some());
    assert!(wait_until(secs(10), || procs.iter().all(|p| !p.alive())), "Starman processes outlived the launcher");
}

/// Found by scripts/chaos (it SIGKILLed the sentinel as if it were a worker): a sentinel that
/// dies is replaced, and the new one still ends what the workers leave when the launcher dies.
#[test]
fn a_killed_sentinel_is_replaced_and_still_cleans_up() {
    let (token, trace) = (token(), TempPath::new("sentinel"));
    let mut l = forky(&token, &trace);
    let launcher = l.pid();
    let sentinel = || children_of(launcher).into_iter().find(|c| is_sentinel(c.pid) && c.state != "Z").map(|c| c.pid);
    let first = sentinel().expect("a sentinel");
    signal(first, Signal::SIGKILL);
    l.wait_for(&format!("the sentinel (pid {first}) killed by SIGKILL; a new one runs"), secs(10));
    assert!(wait_until(secs(10), || sentinel().is_some_and(|p| p != first)), "no new sentinel");
    // The new one writes the same trace: wait until it has noted the workers' processes again.
    std::fs::write(&*trace, "0").unwrap();
    assert!(wait_until(secs(10), || noted(&trace) >= 10), "the new sentinel noted {}", noted(&trace));
    l.signal(Signal::SIGKILL);
    assert!(l.wait_exit(secs(10)).is_some());
    assert!(wait_until(secs(10), || with_token(&token).is_empty()), "left behind: {:?}", with_token(&token));
}
