//! Integration tests of the launcher core (issue 2): the real binary, real worker processes
//! (tests/workers/pyworker.py, `sleep`, `sh`), checked from outside.

mod common;

use std::collections::BTreeSet;
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

fn py(args: &[&'static str]) -> Vec<&'static str> {
    let mut v = vec!["python3", PYWORKER];
    v.extend_from_slice(args);
    v
}

fn launch(flags: &[&str], command: &[&str]) -> Launcher {
    let mut args: Vec<&str> = vec!["-b", "127.0.0.1:0"];
    args.extend_from_slice(flags);
    args.push("--");
    args.extend_from_slice(command);
    Launcher::start(&args)
}

#[test]
fn n_distinct_workers_answer_on_slots_0_to_n() {
    let l = launch(&["-n", "3", "--ready-delay", "200ms"], &py(&[]));
    l.wait_for("all 3 workers ready", secs(20));
    let seen = l.poll_answers(secs(20), |r| distinct(r).len() >= 3);
    let pids: BTreeSet<_> = seen.iter().map(|r| r.pid).collect();
    let slots: BTreeSet<_> = seen.iter().map(|r| r.slot.as_str()).collect();
    assert_eq!(pids.len(), 3, "{seen:?}");
    assert_eq!(slots, BTreeSet::from(["0", "1", "2"]));
    assert!(seen.iter().all(|r| r.gen == "1"));
}

#[test]
fn sigkilled_worker_is_replaced_on_its_slot() {
    let l = launch(&["-n", "2", "--ready-delay", "200ms"], &py(&[]));
    l.wait_for("all 2 workers ready", secs(20));
    let old = l.latest_pid(0);
    let killed_at = Instant::now();
    // SAFETY: kill(2) on a worker pid this test's launcher started.
    unsafe { libc::kill(old, libc::SIGKILL) };
    l.wait_for(&format!("worker 0 (pid {old}, gen 1) killed by SIGKILL"), secs(10));
    let new = l.wait_replacement(0, old, secs(10));
    l.poll_answers(secs(20), |r| r.iter().any(|r| r.pid == new && r.slot == "0"));
    eprintln!("respawn: slot 0 answered from its new worker {:?} after the kill", killed_at.elapsed());
    assert!(!Proc::of(old).alive());
}

#[test]
fn rolling_restarts_under_load_fail_no_request() {
    let l = launch(&["-n", "3", "--ready-delay", "300ms", "--grace", "10s"], &py(&[]));
    l.wait_for("all 3 workers ready", secs(20));
    let first: BTreeSet<i32> = l.started().iter().map(|w| w.0).collect();
    let first_procs = procs(&first.iter().copied().collect::<Vec<_>>());
    let load = Load::start(l.port(), 4);

    l.signal(libc::SIGUSR2);
    l.wait_for("roll gen 2 done", secs(30));
    // Two more requests while gen 3 rolls coalesce into exactly one further roll (gen 4).
    l.signal(libc::SIGUSR2);
    l.wait_for("roll gen 3: starting a new worker for slot 0", secs(10));
    l.signal(libc::SIGUSR2);
    l.wait_for_nth("one more roll will follow", 1, secs(10));
    l.signal(libc::SIGHUP);
    l.wait_for_nth("one more roll will follow", 2, secs(10));
    l.wait_for("roll gen 4 done", secs(40));
    l.poll_answers(secs(20), |r| {
        let latest: BTreeSet<_> = r.iter().rev().take(30).filter(|r| r.gen == "4").map(|r| r.slot.clone()).collect();
        latest.len() == 3
    });
    let (ok, failures) = load.finish();

    assert!(failures.is_empty(), "{} of {} requests failed: {:?}\nlog:\n{}", failures.len(), ok, failures, l.log());
    assert!(ok > 50, "only {ok} requests were made during three rolls");
    assert_eq!(l.count("roll gen 5"), 0, "the coalesced requests ran more than one roll:\n{}", l.log());
    let gen4: BTreeSet<i32> = l.started().iter().filter(|w| w.2 == 4).map(|w| w.0).collect();
    assert_eq!(gen4.len(), 3);
    assert!(gen4.is_disjoint(&first));
    for p in first_procs {
        assert!(!p.alive(), "gen 1 worker {} still runs", p.pid);
    }
    eprintln!("rolls: 3 rolls of 3 workers under load, {ok} requests, 0 failed");
}

#[test]
fn connection_queued_on_a_stopped_worker_is_served_after_it_is_killed() {
    let l = launch(&["-n", "1", "--ready-delay", "200ms"], &py(&[]));
    l.wait_for("all 1 workers ready", secs(20));
    let old = l.latest_pid(0);
    // SAFETY: kill(2) on a worker pid this test's launcher started.
    unsafe { libc::kill(old, libc::SIGSTOP) };
    // connect() returns once the handshake is done: the connection now sits in the accept
    // queue of slot 0's socket, which only the stopped worker could accept from.
    let mut queued = TcpStream::connect(("127.0.0.1", l.port())).unwrap();
    // SAFETY: as above.
    unsafe { libc::kill(old, libc::SIGKILL) };
    let reply = read_reply(&mut queued).unwrap_or_else(|e| panic!("queued connection lost: {e}\n{}", l.log()));
    assert_ne!(reply.pid, old);
    assert_eq!(reply.slot, "0");
}

#[test]
fn term_stops_every_worker_and_exits_zero() {
    // Each worker leaves a child in its process group that ignores TERM: when the worker exits,
    // the launcher must kill what is left of the group.
    let script = format!("(trap '' TERM; exec sleep 1000) & exec python3 {PYWORKER} --notify");
    let mut l = launch(&["-n", "3", "--ready", "notify"], &["sh", "-c", &script]);
    l.wait_for("all 3 workers ready", secs(20));
    let pids: Vec<i32> = l.started().iter().map(|w| w.0).collect();
    let workers = procs(&pids);
    assert!(wait_until(secs(10), || members_of(&pids, u64::MAX).len() == 6), "3 workers and 3 sleeps expected");
    // Two ticks of margin: a process started later can only be reusing a freed group id.
    let before = uptime_ticks().saturating_sub(2);
    l.signal(libc::SIGTERM);
    assert_eq!(l.exit_code(secs(20)), 0, "{}", l.log());
    assert!(workers.iter().all(|p| !p.alive()));
    let left: Vec<String> = members_of(&pids, before)
        .into_iter()
        .map(|p| format!("{p}: {:?}", std::fs::read_to_string(format!("/proc/{p}/cmdline")).unwrap_or_default()))
        .collect();
    assert!(left.is_empty(), "processes left in the workers' groups: {left:?}\n{}", l.log());
}

#[test]
fn second_term_kills_at_once() {
    let mut l = launch(&["-n", "2", "--ready", "notify", "--grace", "60s"], &py(&["--ignore-term", "--notify"]));
    l.wait_for("all 2 workers ready", secs(20));
    let workers = procs(&l.started().iter().map(|w| w.0).collect::<Vec<_>>());
    l.signal(libc::SIGTERM);
    l.wait_for("send TERM again", secs(10));
    l.signal(libc::SIGTERM);
    assert_eq!(l.exit_code(secs(10)), 0, "{}", l.log());
    assert!(workers.iter().all(|p| !p.alive()));
}

#[test]
fn launcher_sigkill_takes_the_workers_down() {
    let mut l = launch(&["-n", "2", "--ready-delay", "200ms"], &py(&[]));
    l.wait_for("all 2 workers ready", secs(20));
    let workers = procs(&l.started().iter().map(|w| w.0).collect::<Vec<_>>());
    l.signal(libc::SIGKILL);
    l.wait_exit(secs(10)).expect("launcher gone");
    assert!(wait_until(secs(10), || workers.iter().all(|p| !p.alive())), "workers outlived the launcher");
}

#[test]
fn port_in_use_is_a_clear_error_and_starts_nothing() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let marker = std::env::temp_dir().join(format!("reuse-launch-marker-{}", std::process::id()));
    let script = format!("touch {}; exec sleep 100", marker.display());
    let mut l = Launcher::spawn(Command::new(BIN).args(["-n", "2", "-b", &addr, "--", "sh", "-c", &script]));
    assert_eq!(l.exit_code(secs(10)), 1);
    let log = l.log();
    assert!(log.contains(&format!("failed to bind {addr}")) && log.contains("in use"), "{log}");
    assert!(!marker.exists(), "a worker was started although the bind failed");
}

#[test]
fn missing_command_exits_127_and_non_executable_126() {
    let mut l = Launcher::spawn(Command::new(BIN).args(["-b", "127.0.0.1:0", "--", "no-such-server-xyz"]));
    assert_eq!(l.exit_code(secs(10)), 127);
    assert!(l.log().contains("cannot run 'no-such-server-xyz'"), "{}", l.log());

    let mut l = Launcher::spawn(Command::new(BIN).args(["-b", "127.0.0.1:0", "--", PYWORKER.trim_end_matches(".py")]));
    assert_eq!(l.exit_code(secs(10)), 127, "{}", l.log());

    use std::os::unix::fs::PermissionsExt;
    let plain = std::env::temp_dir().join(format!("reuse-launch-noexec-{}", std::process::id()));
    std::fs::write(&plain, "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut l = Launcher::spawn(Command::new(BIN).args(["-b", "127.0.0.1:0", "--"]).arg(&plain));
    assert_eq!(l.exit_code(secs(10)), 126);
    assert!(l.log().contains("not executable"), "{}", l.log());
    std::fs::remove_file(plain).unwrap();
}

#[test]
fn usage_errors_exit_2_with_the_flag_named() {
    let mut l = Launcher::spawn(Command::new(BIN).args(["-n", "abc", "--", "true"]));
    assert_eq!(l.exit_code(secs(10)), 2);
    assert!(l.log().contains("reuse-launch: invalid --workers 'abc': expected a number or 'auto'"), "{}", l.log());
}

#[test]
fn workers_that_exit_at_once_make_the_launcher_give_up() {
    // A long ready delay: they must not count as ready even on a slow, loaded machine.
    let mut l = launch(&["-n", "2", "--max-start-failures", "3", "--ready-delay", "20s"], &py(&["--exit", "3"]));
    assert_eq!(l.exit_code(secs(30)), 1);
    // Anything still in a worker's group that started before the exit was left behind.
    let before = uptime_ticks().saturating_sub(2);
    let log = l.log();
    assert!(log.contains("giving up") && log.contains("exited with status 3"), "{log}");
    let pids: Vec<i32> = l.started().iter().map(|w| w.0).collect();
    assert!(pids.len() >= 6, "{log}");
    assert_eq!(members_of(&pids, before), Vec::<i32>::new(), "processes left in the workers' groups");
}

#[test]
fn one_bad_slot_does_not_take_the_others_down() {
    // Slot 1 always fails; slot 0 serves. The launcher must keep going.
    let mut l = launch(
        &["-n", "2", "--ready-delay", "200ms", "--max-start-failures", "2"],
        &["sh", "-c", &format!("[ \"$REUSE_LAUNCH_SLOT\" = 1 ] && exit 4; exec python3 {PYWORKER}")],
    );
    l.wait_for_nth("worker 1 (pid", 6, secs(30));
    assert!(l.wait_exit(Duration::ZERO).is_none(), "launcher gave up:\n{}", l.log());
    l.poll_answers(secs(10), |r| r.iter().any(|r| r.slot == "0"));
}

#[test]
fn worker_ignoring_term_is_killed_after_grace() {
    // Ready by notify: the worker says so only after it has set SIGTERM to ignored.
    let mut l = launch(&["-n", "1", "--ready", "notify", "--grace", "1s"], &py(&["--ignore-term", "--notify"]));
    l.wait_for("all 1 workers ready", secs(20));
    let pid = l.latest_pid(0);
    let worker = Proc::of(pid);
    l.signal(libc::SIGTERM);
    l.wait_for("still running after 1s; sending SIGKILL", secs(10));
    assert_eq!(l.exit_code(secs(10)), 0);
    assert!(l.log().contains(&format!("worker 0 (pid {pid}, gen 1) killed by SIGKILL")), "{}", l.log());
    assert!(!worker.alive());
}

#[test]
fn worker_sees_only_its_own_sockets_and_the_contract_environment() {
    // The launcher itself inherits a stray fd 9 and cluster markers; no worker may see them.
    let mut l = Launcher::spawn(
        Command::new("sh")
            .args(["-c", "exec 9</dev/null; exec \"$@\"", "sh", BIN])
            .args(["-n", "2", "-b", "127.0.0.1:0", "-b", "admin=127.0.0.1:0", "--ready-delay", "100ms"])
            .args(["--", "sleep", "1000"])
            .env("NODE_UNIQUE_ID", "1")
            .env("NODE_CHANNEL_FD", "5"),
    );
    l.wait_listening();
    l.wait_for("all 2 workers ready", secs(10));
    let inode = |pid: i32, fd: i32| fd_targets(pid).into_iter().find(|f| f.0 == fd).unwrap().1;
    let mut first_inodes = Vec::new();
    for slot in 0..2 {
        let pid = l.latest_pid(slot);
        let fds = fd_targets(pid);
        let numbers: Vec<i32> = fds.iter().map(|f| f.0).collect();
        assert_eq!(numbers, vec![0, 1, 2, 3, 4], "worker {slot} fds: {fds:?}");
        assert!(fds[3].1.starts_with("socket:") && fds[4].1.starts_with("socket:"), "{fds:?}");
        let env = environ(pid);
        let has = |kv: String| assert!(env.contains(&kv), "worker {slot} lacks {kv}: {env:?}");
        has("LISTEN_FDS=2".into());
        has(format!("LISTEN_PID={pid}"));
        has("LISTEN_FDNAMES=http:admin".into());
        has(format!("REUSE_LAUNCH_SLOT={slot}"));
        has("REUSE_LAUNCH_GENERATION=1".into());
        has(format!("REUSE_LAUNCH_PID={}", l.pid()));
        has(format!("PORT={}", l.port()));
        assert!(!env.iter().any(|e| e.starts_with("NODE_UNIQUE_ID=") || e.starts_with("NODE_CHANNEL_FD=")));
        first_inodes.push((inode(pid, 3), inode(pid, 4)));
    }
    assert_ne!(first_inodes[0], first_inodes[1], "slots must have their own sockets in reuseport mode");
    // A replacement gets the very same sockets: they were held open by the launcher.
    let old = l.latest_pid(0);
    // SAFETY: kill(2) on a worker pid this test's launcher started.
    unsafe { libc::kill(old, libc::SIGKILL) };
    let new = l.wait_replacement(0, old, secs(10));
    assert!(wait_until(secs(10), || fd_targets(new).len() == 5 && environ(new).iter().any(|e| e.starts_with("PORT="))));
    assert_eq!((inode(new, 3), inode(new, 4)), first_inodes[0]);
    l.signal(libc::SIGTERM);
    assert_eq!(l.exit_code(secs(20)), 0);
}

#[test]
fn shared_mode_hands_one_socket_to_every_worker() {
    let l = launch(&["-n", "2", "--mode", "shared", "--ready-delay", "100ms"], &["sleep", "1000"]);
    l.wait_for("all 2 workers ready", secs(10));
    let target = |pid: i32| std::fs::read_link(format!("/proc/{pid}/fd/3")).unwrap();
    assert_eq!(target(l.latest_pid(0)), target(l.latest_pid(1)));
}

#[test]
fn no_zombies_after_many_respawns() {
    // Each worker also leaves an orphan behind, re-parented to the launcher (a subreaper).
    let script = format!("(sleep 0.1 &); exec python3 {PYWORKER}");
    let l = launch(&["-n", "3", "--ready-delay", "100ms"], &["sh", "-c", &script]);
    l.wait_for("all 3 workers ready", secs(20));
    for _round in 0..4 {
        let current: Vec<i32> = (0..3).map(|s| l.latest_pid(s)).collect();
        for pid in &current {
            // SAFETY: kill(2) on worker pids this test's launcher started.
            unsafe { libc::kill(*pid, libc::SIGKILL) };
        }
        for (slot, pid) in current.iter().enumerate() {
            l.wait_replacement(slot, *pid, secs(20));
        }
    }
    assert_eq!(l.started().len(), 15);
    let launcher = l.pid();
    let zombies = || processes().into_iter().filter(|p| p.ppid == launcher && p.state == "Z").count();
    assert!(wait_until(secs(10), || zombies() == 0), "zombies left: {:?}", processes());
    let children = || processes().into_iter().filter(|p| p.ppid == launcher).count();
    assert!(wait_until(secs(10), || children() == 3), "launcher children: {}", children());
    l.poll_answers(secs(20), |r| distinct(r).len() >= 3);
}

#[test]
fn abandoned_roll_keeps_the_old_workers_serving() {
    let bad = std::env::temp_dir().join(format!("reuse-launch-bad-release-{}", std::process::id()));
    let _ = std::fs::remove_file(&bad);
    let bad_str = bad.to_str().unwrap();
    let l = launch(
        &["-n", "2", "--ready", "notify", "--ready-timeout", "5s"],
        &py(&["--notify", "--exit-if-file"]).into_iter().chain([bad_str]).collect::<Vec<_>>(),
    );
    l.wait_for("all 2 workers ready", secs(20));
    let first: Vec<i32> = (0..2).map(|s| l.latest_pid(s)).collect();
    std::fs::write(&bad, "").unwrap();
    l.signal(libc::SIGUSR2);
    let line = l.wait_for("roll gen 2 abandoned at slot 0", secs(20));
    assert!(line.contains("exited with status 1 before it was ready"), "{line}");
    let seen = l.poll_answers(secs(20), |r| distinct(r).len() >= 2);
    assert!(seen.iter().all(|r| first.contains(&r.pid) && r.gen == "1"), "{seen:?}");

    // The fixed release rolls through; the generation number moved on past the failed roll.
    std::fs::remove_file(&bad).unwrap();
    l.signal(libc::SIGUSR2);
    l.wait_for("roll gen 3 done", secs(30));
    l.poll_answers(secs(20), |r| r.iter().rev().take(20).filter(|r| r.gen == "3").count() >= 2);
}
