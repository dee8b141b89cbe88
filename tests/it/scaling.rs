//! Changing what runs without losing a request (issue 9): TTIN/TTOU scaling under load, and
//! `--max-memory` replacing a growing worker make-before-break.

use nix::sys::signal::Signal;

use crate::common::*;
use crate::status_fields::*;

/// Wait until the status says `n` slots are desired (a TTIN or TTOU was taken).
fn wait_desired(l: &Launcher, n: u64) {
    wait_fields(l, secs(10), &format!("desired {n}"), |s| crate::control::num(s, "desired") == n);
}

#[test]
fn ttin_and_ttou_scale_under_load_without_failures() {
    let l = Launch::new().workers(2).ready("auto").grace("5s").py(&[]).start();
    wait_all_ready(&l, 2, secs(20));
    let load = Load::start(l.port(), 4);
    // Signals of one kind coalesce while pending: each is sent once the last was taken.
    l.signal(Signal::SIGTTIN);
    wait_desired(&l, 3);
    l.signal(Signal::SIGTTIN);
    wait_desired(&l, 4);
    wait_all_ready(&l, 4, secs(20));
    let four = l.poll_answers(secs(20), |r| r.iter().any(|r| r.slot == "3"));
    assert!(four.iter().any(|r| r.slot == "3"), "slot 3 never answered");
    for n in [4, 3, 2] {
        l.signal(Signal::SIGTTOU);
        wait_desired(&l, n - 1);
    }
    wait_fields(&l, secs(30), "slot 1 removed: only slot 0 has a row", |s| slots(s) == [0]);
    let slots: Vec<String> = (0..20).map(|_| get(l.port()).unwrap().slot).collect();
    assert!(slots.iter().all(|s| s == "0"), "{slots:?}");
    l.signal(Signal::SIGTTOU);
    l.wait_for("cannot scale to 0 workers: at least 1 must run", secs(10));
    l.signal(Signal::SIGTTIN);
    wait_desired(&l, 2);
    l.signal(Signal::SIGTTIN);
    wait_desired(&l, 3);
    wait_all_ready(&l, 3, secs(20));
    let (ok, failures) = load.finish();
    assert!(failures.is_empty(), "{} of {} failed while scaling 2 -> 4 -> 1 -> 3: {failures:?}", failures.len(), ok);
    assert!(ok > 100, "only {ok} requests");
}

#[test]
fn max_memory_replaces_a_growing_worker_before_stopping_it() {
    let flag = TempPath::new("grow");
    let l = Launch::new()
        .workers(2)
        .ready("auto")
        .flag("--max-memory", "80M")
        .py(&["--grow-if-file", flag.str(), "--grow-mb", "150"])
        .start();
    wait_all_ready(&l, 2, secs(20));
    let load = Load::start(l.port(), 4);
    let victim = l.started().iter().find(|w| w.slot == 0).unwrap().pid;
    std::fs::write(&*flag, victim.to_string()).unwrap();
    l.wait_for(&format!("(pid {victim}, gen 1) uses "), secs(20));
    let took = l.wait_for("took over slot 0", secs(20));
    l.wait_for(&format!("(pid {victim}, gen 1) exited with status 0"), secs(20));
    // Make before break: the new worker took over before the old one was told to stop.
    let log = l.log();
    let took_at = log.find(&took).unwrap();
    let stop_at = log.find(&format!("(pid {victim}, gen 1) stopping")).unwrap();
    assert!(took_at < stop_at, "stopped before its replacement was ready:\n{log}");
    let answers = l.poll_answers(secs(20), |r| r.iter().any(|r| r.slot == "0" && r.pid != victim));
    assert!(answers.iter().any(|r| r.slot == "0" && r.pid != victim));
    let (ok, failures) = load.finish();
    assert!(failures.is_empty(), "{} of {} failed across the replacement: {failures:?}", failures.len(), ok);
}
