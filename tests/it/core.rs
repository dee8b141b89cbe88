//! Integration tests of the launcher core (issue 2): the real binary, real worker processes
//! (tests/workers/pyworker.py, `sleep`, `sh`), checked from outside.

use std::collections::BTreeSet;
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::common::*;
use crate::status_fields::*;

#[test]
fn n_distinct_workers_answer_on_slots_0_to_n() {
    let l = Launch::new().workers(3).ready_delay("200ms").py(&[]).start();
    wait_all_ready(&l, 3, secs(20));
    let seen = l.poll_answers(secs(20), |r| distinct(r).len() >= 3);
    let pids: BTreeSet<_> = seen.iter().map(|r| r.pid).collect();
    let slots: BTreeSet<_> = seen.iter().map(|r| r.slot.as_str()).collect();
    assert_eq!(pids.len(), 3, "{seen:?}");
    assert_eq!(slots, BTreeSet::from(["0", "1", "2"]));
    assert!(seen.iter().all(|r| r.gen == "1"));
}

#[test]
fn sigkilled_worker_is_replaced_on_its_slot() {
    let l = Launch::new().workers(2).ready_delay("200ms").py(&[]).start();
    wait_all_ready(&l, 2, secs(20));
    let old = l.latest_pid(0);
    let killed_at = Instant::now();
    signal(old, Signal::SIGKILL);
    // The kill as the status states it: slot 0's last worker was killed, one crash restart.
    wait_fields(&l, secs(10), "slot 0's worker killed by SIGKILL", |s| {
        let row = rows_of(s, 0);
        row.first().and_then(|r| r.get("last_exit")).and_then(|e| e.as_str()) == Some("killed by SIGKILL")
            && restarts_by(s, 0, "crash") == 1
    });
    let new = l.wait_replacement(0, old, secs(10));
    l.poll_answers(secs(20), |r| r.iter().any(|r| r.pid == new && r.slot == "0"));
    eprintln!("respawn: slot 0 answered from its new worker {:?} after the kill", killed_at.elapsed());
    assert!(!Proc::of(old).alive());
}

#[test]
fn rolling_restarts_under_load_fail_no_request() {
    let l = Launch::new().workers(3).ready_delay("300ms").grace("10s").py(&[]).start();
    wait_all_ready(&l, 3, secs(20));
    let first: BTreeSet<i32> = l.started_pids().into_iter().collect();
    let first_procs = procs(&first.iter().copied().collect::<Vec<_>>());
    let load = Load::start(l.port(), 4);

    l.signal(Signal::SIGUSR2);
    l.wait_for("roll gen 2 done", secs(30));
    // Two more requests while gen 3 rolls coalesce into exactly one further roll (gen 4).
    l.signal(Signal::SIGUSR2);
    wait_fields(&l, secs(10), "roll gen 3 under way", |s| {
        s.get("roll").and_then(|r| r.get("generation")).and_then(|g| g.as_u64()) == Some(3)
    });
    l.signal(Signal::SIGUSR2);
    l.wait_for_nth("one more roll will follow", 1, secs(10));
    l.signal(Signal::SIGHUP);
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
    let gen4: BTreeSet<i32> = l.started().iter().filter(|w| w.generation == 4).map(|w| w.pid).collect();
    assert_eq!(gen4.len(), 3);
    assert!(gen4.is_disjoint(&first));
    for p in first_procs {
        assert!(!p.alive(), "gen 1 worker {} still runs", p.pid);
    }
    eprintln!("rolls: 3 rolls of 3 workers under load, {ok} requests, 0 failed");
}

#[test]
fn connection_queued_on_a_stopped_worker_is_served_after_it_is_killed() {
    let l = Launch::new().workers(1).ready_delay("200ms").py(&[]).start();
    wait_all_ready(&l, 1, secs(20));
    let old = l.latest_pid(0);
    signal(old, Signal::SIGSTOP);
    // connect() returns once the handshake is done: the connection now sits in the accept
    // queue of slot 0's socket, which only the stopped worker could accept from.
    let mut queued = TcpStream::connect(("127.0.0.1", l.port())).unwrap();
    signal(old, Signal::SIGKILL);
    let reply = read_reply(&mut queued).unwrap_or_else(|e| panic!("queued connection lost: {e}\n{}", l.log()));
    assert_ne!(reply.pid, old);
    assert_eq!(reply.slot, "0");
}

#[test]
fn term_stops_every_worker_and_exits_zero() {
    // Each worker leaves a child in its process group that ignores TERM: when the worker exits,
    // the launcher must kill what is left of the group.
    let script = format!("(trap '' TERM; exec sleep 1000) & exec python3 {PYWORKER} --notify");
    let mut l = Launch::new().workers(3).ready("notify").cmd(&["sh", "-c", &script]).start();
    wait_all_ready(&l, 3, secs(20));
    let pids = l.started_pids();
    let workers = procs(&pids);
    assert!(wait_until(secs(10), || members_of(&pids, u64::MAX).len() == 6), "3 workers and 3 sleeps expected");
    // Two ticks of margin: a process started later can only be reusing a freed group id.
    let before = uptime_ticks().saturating_sub(2);
    l.signal(Signal::SIGTERM);
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
    let mut l = Launch::new().workers(2).ready("notify").grace("60s").py(&["--ignore-term", "--notify"]).start();
    wait_all_ready(&l, 2, secs(20));
    let workers = procs(&l.started_pids());
    l.signal(Signal::SIGTERM);
    wait_fields(&l, secs(10), "a stop under way", |s| s.get("stopping").and_then(|v| v.as_bool()) == Some(true));
    l.signal(Signal::SIGTERM);
    assert_eq!(l.exit_code(secs(10)), 0, "{}", l.log());
    assert!(workers.iter().all(|p| !p.alive()));
}

#[test]
fn launcher_sigkill_takes_the_workers_down() {
    let mut l = Launch::new().workers(2).ready_delay("200ms").py(&[]).start();
    wait_all_ready(&l, 2, secs(20));
    let workers = procs(&l.started_pids());
    l.signal(Signal::SIGKILL);
    l.wait_exit(secs(10)).expect("launcher gone");
    assert!(wait_until(secs(10), || workers.iter().all(|p| !p.alive())), "workers outlived the launcher");
}

#[test]
fn port_in_use_is_a_clear_error_and_starts_nothing() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let marker = TempPath::new("marker");
    let script = format!("touch {}; exec sleep 100", marker.display());
    let mut l = Launch::new().workers(2).bind(&addr).cmd(&["sh", "-c", &script]).spawn();
    assert_eq!(l.exit_code(secs(10)), 1);
    let log = l.log();
    assert!(log.contains(&format!("failed to bind {addr}")) && log.contains("in use"), "{log}");
    assert!(!marker.exists(), "a worker was started although the bind failed");
}

#[test]
fn missing_command_exits_127_and_non_executable_126() {
    let mut l = Launch::new().cmd(&["no-such-server-xyz"]).spawn();
    assert_eq!(l.exit_code(secs(10)), 127);
    assert!(l.log().contains("cannot run 'no-such-server-xyz'"), "{}", l.log());

    let mut l = Launch::new().cmd(&[PYWORKER.trim_end_matches(".py")]).spawn();
    assert_eq!(l.exit_code(secs(10)), 127, "{}", l.log());

    let plain = TempPath::new("noexec");
    std::fs::write(&plain, "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut l = Launch::new().cmd(&[plain.str()]).spawn();
    assert_eq!(l.exit_code(secs(10)), 126);
    assert!(l.log().contains("not executable"), "{}", l.log());
}

#[test]
fn usage_errors_exit_2_with_the_flag_named() {
    let mut l = Launch::new().no_bind().flag("-n", "abc").cmd(&["true"]).spawn();
    assert_eq!(l.exit_code(secs(10)), 2);
    assert!(l.log().contains("reuse-launch: invalid --workers 'abc': expected a number or 'auto'"), "{}", l.log());
}

#[test]
fn workers_that_exit_at_once_make_the_launcher_give_up() {
    // A long ready delay: they must not count as ready even on a slow, loaded machine.
    let mut l =
        Launch::new().workers(2).flag("--max-start-failures", "3").ready_delay("20s").py(&["--exit", "3"]).start();
    assert_eq!(l.exit_code(secs(30)), 1);
    // Anything still in a worker's group that started before the exit was left behind.
    let before = uptime_ticks().saturating_sub(2);
    let log = l.log();
    assert!(log.contains("giving up") && log.contains("exited with status 3"), "{log}");
    let pids = l.started_pids();
    assert!(pids.len() >= 6, "{log}");
    assert_eq!(members_of(&pids, before), Vec::<i32>::new(), "processes left in the workers' groups");
}

#[test]
fn one_bad_slot_does_not_take_the_others_down() {
    // Slot 1 always fails; slot 0 serves. The launcher must keep going.
    let script = format!("[ \"$REUSE_LAUNCH_SLOT\" = 1 ] && exit 4; exec python3 {PYWORKER}");
    let mut l = Launch::new()
        .workers(2)
        .ready_delay("200ms")
        .flag("--max-start-failures", "2")
        .cmd(&["sh", "-c", &script])
        .start();
    // Three failed starts of slot 1 (more than --max-start-failures), each counted as a crash.
    wait_fields(&l, secs(30), "3 crashes of slot 1", |s| restarts_by(s, 1, "crash") >= 3);
    assert!(l.wait_exit(Duration::ZERO).is_none(), "launcher gave up:\n{}", l.log());
    l.poll_answers(secs(10), |r| r.iter().any(|r| r.slot == "0"));
}

#[test]
fn worker_ignoring_term_is_killed_after_grace() {
    // Ready by notify: the worker says so only after it has set SIGTERM to ignored.
    let mut l = Launch::new().workers(1).ready("notify").grace("1s").py(&["--ignore-term", "--notify"]).start();
    wait_all_ready(&l, 1, secs(20));
    let pid = l.latest_pid(0);
    let worker = Proc::of(pid);
    l.signal(Signal::SIGTERM);
    l.wait_for("still running after 1s; sending SIGKILL", secs(10));
    assert_eq!(l.exit_code(secs(10)), 0);
    assert!(l.log().contains(&format!("worker 0 (pid {pid}, gen 1) killed by SIGKILL")), "{}", l.log());
    assert!(!worker.alive());
}

#[test]
fn worker_sees_only_its_own_sockets_and_the_contract_environment() {
    // The launcher itself inherits a stray fd 9 and cluster markers; no worker may see them.
    let mut l = Launch::new()
        .via(&["sh", "-c", "exec 9</dev/null; exec \"$@\"", "sh"])
        .workers(2)
        .bind("127.0.0.1:0")
        .bind("admin=127.0.0.1:0")
        .ready_delay("100ms")
        .cmd(&["sleep", "1000"])
        .env("NODE_UNIQUE_ID", "1")
        .env("NODE_CHANNEL_FD", "5")
        .start();
    wait_all_ready(&l, 2, secs(10));
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
        first_inodes.push((fd_target(pid, 3), fd_target(pid, 4)));
    }
    assert_ne!(first_inodes[0], first_inodes[1], "slots must have their own sockets in reuseport mode");
    // A replacement gets the very same sockets: they were held open by the launcher.
    let old = l.latest_pid(0);
    signal(old, Signal::SIGKILL);
    let new = l.wait_replacement(0, old, secs(10));
    assert!(wait_until(secs(10), || fd_targets(new).len() == 5 && environ(new).iter().any(|e| e.starts_with("PORT="))));
    assert_eq!((fd_target(new, 3), fd_target(new, 4)), first_inodes[0]);
    l.signal(Signal::SIGTERM);
    assert_eq!(l.exit_code(secs(20)), 0);
}

/// Two sleeping workers, with the spawn module's debug lines (whether the staging block is in
/// use); run through `via` if given.
fn two_sleepers(via: Option<&str>) -> Launcher {
    let mut launch = Launch::new().workers(2).ready_delay("100ms").env("RUST_LOG", "info,reuse_launch::spawn=debug");
    if let Some(wrapper) = via {
        launch = launch.via(&[wrapper]);
    }
    let l = launch.cmd(&["sleep", "1000"]).start();
    wait_all_ready(&l, 2, secs(10));
    l
}

/// Worker `pid` holds fds 0-2 and its one socket on fd 3, nothing else.
fn assert_own_fds_only(l: &Launcher, pid: i32) {
    let fds = fd_targets(pid);
    let numbers: Vec<i32> = fds.iter().map(|f| f.0).collect();
    assert_eq!(numbers, vec![0, 1, 2, 3], "worker {pid} fds: {fds:?}\nlog:\n{}", l.log());
    assert!(fds[3].1.starts_with("socket:"), "{fds:?}");
}

/// Where close_range(2) is refused (a container's seccomp profile older than it; a kernel
/// before 5.9), the launcher's probe says so and it spawns without its staging block (spawn's
/// `stage`), copying its whole fd table as before: the workers start, a respawn too, and each
/// sees only fds 0-2 and its socket.
#[test]
fn where_close_range_is_refused_workers_start_as_before() {
    let mut l = two_sleepers(Some(&built_c("tests/workers/no-close-range.c")));
    let refused = "every worker copies the launcher's fd table (close_range(CLOSE_RANGE_UNSHARE) refused";
    assert_eq!(l.count(refused), 1, "{}", l.log());
    for slot in 0..2 {
        assert_own_fds_only(&l, l.latest_pid(slot));
    }
    let old = l.latest_pid(1);
    signal(old, Signal::SIGKILL);
    let new = l.wait_replacement(1, old, secs(10));
    assert!(wait_until(secs(10), || fd_targets(new).len() == 4), "{:?}", fd_targets(new));
    assert_own_fds_only(&l, new);
    l.signal(Signal::SIGTERM);
    assert_eq!(l.exit_code(secs(20)), 0, "{}", l.log());
}

/// On a kernel with the fix for CVE-2024-45025 (6.11 and later), the probe passes and workers
/// are spawned with the staging block: no fallback line, and each worker sees only its fds.
/// Skipped, saying why, on an older kernel or where close_range is refused.
#[test]
fn on_a_fixed_kernel_spawns_use_the_staging_block() {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut parts = release.trim().split(['.', '-']).map(|p| p.parse::<u32>().unwrap_or(0));
    let version = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if version < (6, 11) {
        eprintln!("skipped: kernel {} may lack the fix for CVE-2024-45025 (6.11)", release.trim());
        return;
    }
    let l = two_sleepers(None);
    let log = l.log();
    if let Some(line) = log.lines().find(|l| l.contains("every worker copies the launcher's fd table")) {
        assert!(line.contains("refused") || line.contains("died"), "the probe failed on kernel {release}: {line}");
        eprintln!("skipped: close_range is refused here: {line}");
        return;
    }
    assert_eq!(l.count("each worker gets an fd table of its own, the fds below "), 1, "{log}");
    for slot in 0..2 {
        assert_own_fds_only(&l, l.latest_pid(slot));
    }
}

#[test]
fn shared_mode_hands_one_socket_to_every_worker() {
    let l = Launch::new().workers(2).mode("shared").ready_delay("100ms").cmd(&["sleep", "1000"]).start();
    wait_all_ready(&l, 2, secs(10));
    assert_eq!(fd_target(l.latest_pid(0), 3), fd_target(l.latest_pid(1), 3));
}

#[test]
fn no_zombies_after_many_respawns() {
    // Each worker also leaves an orphan behind, re-parented to the launcher (a subreaper).
    let script = format!("(sleep 0.1 &); exec python3 {PYWORKER}");
    let l = Launch::new().workers(3).ready_delay("100ms").cmd(&["sh", "-c", &script]).start();
    wait_all_ready(&l, 3, secs(20));
    for _round in 0..4 {
        let current: Vec<i32> = (0..3).map(|s| l.latest_pid(s)).collect();
        for pid in &current {
            signal(*pid, Signal::SIGKILL);
        }
        for (slot, pid) in current.iter().enumerate() {
            l.wait_replacement(slot, *pid, secs(20));
        }
    }
    assert_eq!(l.started().len(), 15);
    let launcher = l.pid();
    let zombies = || launcher_children(launcher).iter().filter(|p| p.state == "Z").count();
    assert!(wait_until(secs(10), || zombies() == 0), "zombies left: {:?}", processes());
    let children = || launcher_children(launcher).len();
    assert!(wait_until(secs(10), || children() == 3), "launcher children: {}", children());
    l.poll_answers(secs(20), |r| distinct(r).len() >= 3);
}

#[test]
fn abandoned_roll_keeps_the_old_workers_serving() {
    let bad = TempPath::new("bad-release");
    let l = Launch::new()
        .workers(2)
        .ready("notify")
        .flag("--ready-timeout", "5s")
        .py(&["--notify", "--exit-if-file", bad.str()])
        .start();
    wait_all_ready(&l, 2, secs(20));
    let first: Vec<i32> = (0..2).map(|s| l.latest_pid(s)).collect();
    std::fs::write(&bad, "").unwrap();
    l.signal(Signal::SIGUSR2);
    let line = l.wait_for("roll gen 2 abandoned at slot 0", secs(20));
    assert!(line.contains("exited with status 1 before it was ready"), "{line}");
    let seen = l.poll_answers(secs(20), |r| distinct(r).len() >= 2);
    assert!(seen.iter().all(|r| first.contains(&r.pid) && r.gen == "1"), "{seen:?}");

    // The fixed release rolls through; the generation number moved on past the failed roll.
    std::fs::remove_file(&bad).unwrap();
    l.signal(Signal::SIGUSR2);
    l.wait_for("roll gen 3 done", secs(30));
    l.poll_answers(secs(20), |r| r.iter().rev().take(20).filter(|r| r.gen == "3").count() >= 2);
}
