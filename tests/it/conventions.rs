//! Integration tests of the conventions the launcher speaks (issue 4), checked from outside:
//! readiness seen in /proc (`--ready auto`), the worker watchdog, sd_notify to the launcher's own
//! service manager, and running workers as another user.

use std::process::Command;

use nix::sys::signal::Signal;

use crate::common::*;
use crate::status_fields::*;

/// Every worker the launcher called ready must already have been listening: the worker marks
/// `DIR/<pid>` just before it serves, after a 1.5 s start. (With `--ready delay` and the default
/// 1 s this fails: the marks come too late.)
#[test]
fn ready_auto_waits_until_the_worker_listens() {
    let marks = TempPath::dir("marks");
    let l =
        Launch::new().workers(2).ready("auto").py(&["--start-delay", "1.5", "--mark-listening", marks.str()]).start();
    wait_all_ready(&l, 2, secs(30));
    l.signal(Signal::SIGUSR2);
    l.wait_for("roll gen 2 done", secs(30));
    let ready = l.ready();
    assert_eq!(ready.len(), 4, "{}", l.log());
    for w in ready {
        // The line was logged before we read it; the mark was made before the worker could be
        // seen waiting. A missing mark means "ready" came before the worker listened.
        assert!(marks.join(w.pid.to_string()).exists(), "{w} ready before it listened");
    }
}

/// The same with node (libuv: the socket is seen in an epoll set) starting 1.5 s late.
#[test]
fn ready_auto_waits_for_a_slow_node_worker() {
    let marks = TempPath::dir("node-marks");
    let l = Launch::new()
        .workers(2)
        .ready("auto")
        .cmd(&["node", &worker("node-fd.js")])
        .env("START_DELAY_MS", "1500")
        .env("MARK_DIR", marks.str())
        .start();
    wait_all_ready(&l, 2, secs(30));
    for w in l.ready() {
        assert!(marks.join(w.pid.to_string()).exists(), "node {w} ready before it listened");
    }
    l.poll_answers(secs(10), |r| distinct(r).len() >= 2);
}

/// A shell wrapper that starts the server as its child (no exec): the child's wait counts.
#[test]
fn ready_auto_sees_through_a_shell_wrapper() {
    let script = format!("python3 {PYWORKER} --start-delay 0.5 --fd 3; exit 0");
    let l = Launch::new().workers(1).ready("auto").cmd(&["sh", "-c", &script]).start();
    wait_all_ready(&l, 1, secs(30));
    l.poll_answers(secs(10), |r| !r.is_empty());
}

#[test]
fn a_worker_that_stops_pinging_the_watchdog_is_restarted() {
    // Slot 0 pings, slot 1 does not: slot 1 is restarted again and again, slot 0 never.
    let script = format!(
        "if [ \"$REUSE_LAUNCH_SLOT\" = 0 ]; then exec python3 {PYWORKER} --notify --watchdog-ping; \
         else exec python3 {PYWORKER} --notify; fi"
    );
    // Slot 0 pings every 500ms (WATCHDOG_USEC/3) against 1.5s: slack for a loaded machine.
    let l = Launch::new().workers(2).ready("notify").flag("--watchdog", "1500ms").cmd(&["sh", "-c", &script]).start();
    wait_all_ready(&l, 2, secs(20));
    let slot0 = l.latest_pid(0);
    // Two watchdog restarts of slot 1, none of slot 0 (the status's restarts_by_cause).
    let s = wait_fields(&l, secs(30), "2 watchdog restarts of slot 1", |s| restarts_by(s, 1, "watchdog") >= 2);
    let log = l.log();
    assert_eq!(restarts_by(&s, 0, "watchdog"), 0, "{s}\n{log}");
    assert_eq!(l.latest_pid(0), slot0, "the pinging worker was restarted:\n{log}");
    // The worker sees the watchdog contract, like under systemd.
    let env = environ(slot0);
    let has = |kv: &str| env.iter().any(|e| e == kv);
    assert!(has("WATCHDOG_USEC=1500000") && has(&format!("WATCHDOG_PID={slot0}")), "{env:?}");
}

#[test]
fn the_launcher_reports_to_its_service_manager() {
    let mut systemd = NotifySocket::bind();
    let mut l = Launch::new().workers(2).ready_delay("200ms").py(&[]).env("NOTIFY_SOCKET", systemd.path()).start();
    let ready = systemd.wait_containing("READY=1", secs(30));
    assert!(ready.contains(&format!("MAINPID={}", l.pid())), "{ready}");
    systemd.wait_containing("STATUS=2/2 workers ready, gen 1", secs(30));
    // Workers must not talk to the launcher's service manager directly.
    assert!(!environ(l.latest_pid(0)).iter().any(|e| e.contains(systemd.path())));

    l.signal(Signal::SIGUSR2);
    let reloading = systemd.wait_containing("RELOADING=1", secs(30));
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    systemd.wait_containing("rolling to gen 2", secs(30));
    systemd.wait_containing("STATUS=2/2 workers ready, gen 2", secs(30));
    let after = systemd.got.iter().position(|m| m.contains("RELOADING=1")).unwrap();
    l.wait_for("roll gen 2 done", secs(20));
    systemd.wait("datagram of just \"READY=1\" after the roll", after, secs(10), |m| m == "READY=1");

    l.signal(Signal::SIGTERM);
    systemd.wait_containing("STOPPING=1", secs(30));
    assert_eq!(l.exit_code(secs(20)), 0);
}

fn uid_of(pid: i32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn workers_run_as_the_given_user_on_sockets_bound_by_root() {
    if !nix::unistd::geteuid().is_root() {
        panic!("this test needs root (CI runs as root): it checks that workers drop to --user nobody");
    }
    // The machine's python3 may live under /root (pyenv), out of nobody's reach: use Debian's.
    let python = ["/usr/bin/python3", "/usr/local/bin/python3"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("a python3 outside /root (apt-get install python3)");
    let l = Launch::new().workers(2).ready_delay("200ms").flag("--user", "nobody").cmd(&[python, PYWORKER]).start();
    wait_all_ready(&l, 2, secs(20));
    let seen = l.poll_answers(secs(20), |r| distinct(r).len() >= 2);
    for r in distinct(&seen) {
        assert_eq!(uid_of(r.pid), 65534, "worker {} runs as uid {}", r.pid, uid_of(r.pid));
        let env = environ(r.pid);
        assert!(env.contains(&"USER=nobody".to_string()), "{env:?}");
    }
    assert_eq!(uid_of(l.pid()), 0, "the launcher itself stays root");
    // The parent-death signal survives the switch of user (it is armed after it).
    let workers = procs(&l.started_pids());
    l.signal(Signal::SIGKILL);
    assert!(wait_until(secs(10), || workers.iter().all(|p| !p.alive())), "workers outlived the launcher");
}

#[test]
fn a_user_the_launcher_cannot_become_is_refused_before_anything_starts() {
    // As nobody, switching workers to root is impossible: a clear error, exit 1, no worker.
    let mut l = Launch::new()
        .via(&["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .workers(1)
        .flag("--user", "root")
        .cmd(&["sleep", "100"])
        .spawn();
    assert_eq!(l.exit_code(secs(10)), 1);
    assert!(l.log().contains("cannot run workers as user 'root'"), "{}", l.log());
    assert!(l.started().is_empty());

    let mut l = Launch::new().no_bind().flag("--user", "no-such-user-xyz").cmd(&["sleep", "1"]).spawn();
    assert_eq!(l.exit_code(secs(10)), 1);
    assert!(l.log().contains("no such user 'no-such-user-xyz'"), "{}", l.log());
}

/// In a container the launcher is PID 1: it must reap every orphan and stop cleanly on TERM.
/// `unshare --pid --fork` gives it a pid namespace of its own, as a container runtime does.
#[test]
fn runs_as_pid_1_of_a_pid_namespace() {
    // Each worker leaves an orphan that the launcher, as init of the namespace, must reap.
    let script = format!("(sleep 0.2 &); exec python3 {PYWORKER}");
    let mut l = Launch::new().in_pid_namespace().workers(2).ready_delay("300ms").cmd(&["sh", "-c", &script]).start();
    l.wait_for("all 2 workers ready", secs(20));
    // The launcher as seen from here: unshare's child. Inside its namespace it is pid 1.
    let unshare = l.pid();
    let children = std::fs::read_to_string(format!("/proc/{unshare}/task/{unshare}/children")).unwrap();
    let launcher: i32 = children.split_whitespace().next().expect("unshare's child").parse().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{launcher}/status")).unwrap();
    let nspid = status.lines().find(|l| l.starts_with("NSpid:")).unwrap();
    assert!(nspid.ends_with("\t1"), "the launcher is not pid 1 in its namespace: {nspid}");
    l.poll_answers(secs(20), |r| distinct(r).len() >= 2);
    let zombies = || launcher_children(launcher).iter().filter(|p| p.state == "Z").count();
    let orphans_gone = || launcher_children(launcher).len() == 2;
    assert!(wait_until(secs(10), || zombies() == 0 && orphans_gone()), "orphans not reaped: {:?}", processes());
    signal(launcher, Signal::SIGTERM);
    assert_eq!(l.exit_code(secs(20)), 0, "{}", l.log());
    assert!(l.log().contains("all workers stopped; exiting"));
}

/// The shipped unit files parse: `systemd-analyze verify`, with the launcher's real path.
#[test]
fn the_example_systemd_units_verify() {
    let dir = TempPath::dir("units");
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/examples");
    for ext in ["service", "socket"] {
        let text = std::fs::read_to_string(format!("{examples}/reuse-launch.{ext}")).unwrap();
        let text = text.replace("/usr/local/bin/reuse-launch", BIN).replace("/usr/local/bin/my-server", "/bin/true");
        std::fs::write(dir.join(format!("reuse-launch-example.{ext}")), text).unwrap();
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(["service", "socket"].map(|e| dir.join(format!("reuse-launch-example.{e}"))))
        .output()
        .expect("systemd-analyze (apt-get install systemd; scripts/test-deps does)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && !stderr.contains("reuse-launch-example"), "{stderr}");
}
