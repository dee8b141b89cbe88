//! Integration tests of the conventions the launcher speaks (issue 4), checked from outside:
//! readiness seen in /proc (`--ready auto`), the worker watchdog, sd_notify to the launcher's own
//! service manager, and running workers as another user.

mod common;

use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::Duration;

use common::*;

/// The launcher with 2 workers on a free loopback port, then `args`.
fn start(args: &[&str]) -> Launcher {
    Launcher::start(&[&["-n", "2", "-b", "127.0.0.1:0"], args].concat())
}

fn temp_dir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("reuse-launch-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Every worker the launcher called ready must already have been listening: the worker marks
/// `DIR/<pid>` just before it serves, after a 1.5 s start. (With `--ready delay` and the default
/// 1 s this fails: the marks come too late.)
#[test]
fn ready_auto_waits_until_the_worker_listens() {
    let marks = temp_dir("marks");
    let dir = marks.to_str().unwrap();
    let l = start(&["--ready", "auto", "--", "python3", PYWORKER, "--start-delay", "1.5", "--mark-listening", dir]);
    l.wait_for("all 2 workers ready", secs(30));
    l.signal(libc::SIGUSR2);
    l.wait_for("roll gen 2 done", secs(30));
    let ready: Vec<(i32, usize, u64)> =
        l.log().lines().filter(|line| line.contains(") ready after")).map(parse_worker).collect();
    assert_eq!(ready.len(), 4, "{}", l.log());
    for (pid, slot, gen) in ready {
        // The line was logged before we read it; the mark was made before the worker could be
        // seen waiting. A missing mark means "ready" came before the worker listened.
        assert!(marks.join(pid.to_string()).exists(), "worker {slot} gen {gen} (pid {pid}) ready before it listened");
    }
    std::fs::remove_dir_all(marks).unwrap();
}

/// The same with node (libuv: the socket is seen in an epoll set) starting 1.5 s late.
#[test]
fn ready_auto_waits_for_a_slow_node_worker() {
    let marks = temp_dir("node-marks");
    let node_fd = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/workers/node-fd.js");
    let mut cmd = Command::new(BIN);
    cmd.args(["-n", "2", "-b", "127.0.0.1:0", "--ready", "auto", "--", "node", node_fd]);
    cmd.env("START_DELAY_MS", "1500").env("MARK_DIR", &marks);
    let mut l = Launcher::spawn(&mut cmd);
    l.wait_listening();
    l.wait_for("all 2 workers ready", secs(30));
    for (pid, slot, _) in l.log().lines().filter(|x| x.contains(") ready after")).map(parse_worker) {
        assert!(marks.join(pid.to_string()).exists(), "node worker {slot} (pid {pid}) ready before it listened");
    }
    l.poll_answers(secs(10), |r| distinct(r).len() >= 2);
    std::fs::remove_dir_all(marks).unwrap();
}

/// A shell wrapper that starts the server as its child (no exec): the child's wait counts.
#[test]
fn ready_auto_sees_through_a_shell_wrapper() {
    let script = format!("python3 {PYWORKER} --start-delay 0.5 --fd 3; exit 0");
    let l = Launcher::start(&["-n", "1", "-b", "127.0.0.1:0", "--ready", "auto", "--", "sh", "-c", &script]);
    l.wait_for("all 1 workers ready", secs(30));
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
    let l = start(&["--ready", "notify", "--watchdog", "1500ms", "--", "sh", "-c", &script]);
    l.wait_for("all 2 workers ready", secs(20));
    let slot0 = l.latest_pid(0);
    l.wait_for_nth("sent no WATCHDOG=1 for 1.5s; restarting it", 2, secs(30));
    let log = l.log();
    assert!(log.lines().filter(|x| x.contains("sent no WATCHDOG")).all(|x| x.contains("worker 1 ")), "{log}");
    assert_eq!(l.latest_pid(0), slot0, "the pinging worker was restarted:\n{log}");
    // The worker sees the watchdog contract, like under systemd.
    let env = std::fs::read(format!("/proc/{slot0}/environ")).unwrap();
    let env = String::from_utf8_lossy(&env);
    assert!(env.contains("WATCHDOG_USEC=1500000\0") && env.contains(&format!("WATCHDOG_PID={slot0}\0")), "{env}");
}

/// Collects the launcher's sd_notify messages, as systemd would for a Type=notify service.
struct FakeSystemd {
    sock: UnixDatagram,
    path: std::path::PathBuf,
    got: Vec<String>,
}

impl FakeSystemd {
    fn new() -> FakeSystemd {
        let path = std::env::temp_dir().join(format!("reuse-launch-notify-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        FakeSystemd { sock, path, got: Vec::new() }
    }

    /// Wait for a message containing `needle`; returns it.
    fn expect(&mut self, needle: &str, l: &Launcher) -> String {
        let mut buf = [0u8; 4096];
        let found = wait_until(secs(30), || {
            if let Ok(n) = self.sock.recv(&mut buf) {
                self.got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
            self.got.iter().any(|m| m.contains(needle))
        });
        assert!(found, "no sd_notify message with {needle:?}; got {:?}\nlog:\n{}", self.got, l.log());
        self.got.iter().find(|m| m.contains(needle)).unwrap().clone()
    }
}

impl Drop for FakeSystemd {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[test]
fn the_launcher_reports_to_its_service_manager() {
    let mut systemd = FakeSystemd::new();
    let mut l = Launcher::spawn(
        Command::new(BIN)
            .args(["-n", "2", "-b", "127.0.0.1:0", "--ready-delay", "200ms", "--", "python3", PYWORKER])
            .env("NOTIFY_SOCKET", &systemd.path),
    );
    l.wait_listening();
    let ready = systemd.expect("READY=1", &l);
    assert!(ready.contains(&format!("MAINPID={}", l.pid())), "{ready}");
    systemd.expect("STATUS=2/2 workers ready, gen 1", &l);
    // Workers must not talk to the launcher's service manager directly.
    let env = std::fs::read(format!("/proc/{}/environ", l.latest_pid(0))).unwrap();
    assert!(!String::from_utf8_lossy(&env).contains(systemd.path.to_str().unwrap()));

    l.signal(libc::SIGUSR2);
    let reloading = systemd.expect("RELOADING=1", &l);
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    systemd.expect("rolling to gen 2", &l);
    systemd.expect("STATUS=2/2 workers ready, gen 2", &l);
    let after = systemd.got.iter().position(|m| m.contains("RELOADING=1")).unwrap();
    l.wait_for("roll gen 2 done", secs(20));
    assert!(
        wait_until(secs(10), || {
            let mut buf = [0u8; 4096];
            if let Ok(n) = systemd.sock.recv(&mut buf) {
                systemd.got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
            systemd.got[after..].iter().any(|m| m == "READY=1")
        }),
        "no READY=1 after the roll: {:?}",
        systemd.got
    );

    l.signal(libc::SIGTERM);
    systemd.expect("STOPPING=1", &l);
    assert_eq!(l.exit_code(secs(20)), 0);
}

fn uid_of(pid: i32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn workers_run_as_the_given_user_on_sockets_bound_by_root() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!("this test needs root (CI runs as root): it checks that workers drop to --user nobody");
    }
    // The machine's python3 may live under /root (pyenv), out of nobody's reach: use Debian's.
    let python = ["/usr/bin/python3", "/usr/local/bin/python3"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("a python3 outside /root (apt-get install python3)");
    let l = start(&["--ready-delay", "200ms", "--user", "nobody", "--", python, PYWORKER]);
    l.wait_for("all 2 workers ready", secs(20));
    let seen = l.poll_answers(secs(20), |r| distinct(r).len() >= 2);
    for r in distinct(&seen) {
        assert_eq!(uid_of(r.pid), 65534, "worker {} runs as uid {}", r.pid, uid_of(r.pid));
        let env = String::from_utf8_lossy(&std::fs::read(format!("/proc/{}/environ", r.pid)).unwrap()).into_owned();
        assert!(env.contains("USER=nobody\0"), "{env}");
    }
    assert_eq!(uid_of(l.pid()), 0, "the launcher itself stays root");
    // The parent-death signal survives the switch of user (it is armed after it).
    let workers = procs(&l.started().iter().map(|w| w.0).collect::<Vec<_>>());
    l.signal(libc::SIGKILL);
    assert!(wait_until(secs(10), || workers.iter().all(|p| !p.alive())), "workers outlived the launcher");
}

#[test]
fn a_user_the_launcher_cannot_become_is_refused_before_anything_starts() {
    // As nobody, switching workers to root is impossible: a clear error, exit 1, no worker.
    let mut l = Launcher::spawn(
        Command::new("setpriv").args(["--reuid", "65534", "--regid", "65534", "--clear-groups", BIN]).args([
            "-n",
            "1",
            "-b",
            "127.0.0.1:0",
            "--user",
            "root",
            "--",
            "sleep",
            "100",
        ]),
    );
    assert_eq!(l.exit_code(secs(10)), 1);
    assert!(l.log().contains("cannot run workers as user 'root'"), "{}", l.log());
    assert!(l.started().is_empty());

    let mut l = Launcher::spawn(Command::new(BIN).args(["--user", "no-such-user-xyz", "--", "sleep", "1"]));
    assert_eq!(l.exit_code(secs(10)), 1);
    assert!(l.log().contains("no such user 'no-such-user-xyz'"), "{}", l.log());
}

/// In a container the launcher is PID 1: it must reap every orphan and stop cleanly on TERM.
/// `unshare --pid --fork` gives it a pid namespace of its own, as a container runtime does.
#[test]
fn runs_as_pid_1_of_a_pid_namespace() {
    // Each worker leaves an orphan that the launcher, as init of the namespace, must reap.
    let script = format!("(sleep 0.2 &); exec python3 {PYWORKER}");
    let mut cmd = Command::new("unshare");
    cmd.args(["--pid", "--fork", "--mount-proc", "--kill-child", BIN]);
    cmd.args(["-n", "2", "-b", "127.0.0.1:0", "--ready-delay", "300ms", "--", "sh", "-c", &script]);
    let mut l = Launcher::spawn(&mut cmd);
    l.own_pid_namespace = true;
    l.wait_listening();
    l.wait_for("all 2 workers ready", secs(20));
    // The launcher as seen from here: unshare's child. Inside its namespace it is pid 1.
    let unshare = l.pid();
    let children = std::fs::read_to_string(format!("/proc/{unshare}/task/{unshare}/children")).unwrap();
    let launcher: i32 = children.split_whitespace().next().expect("unshare's child").parse().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{launcher}/status")).unwrap();
    let nspid = status.lines().find(|l| l.starts_with("NSpid:")).unwrap();
    assert!(nspid.ends_with("\t1"), "the launcher is not pid 1 in its namespace: {nspid}");
    l.poll_answers(secs(20), |r| distinct(r).len() >= 2);
    let zombies = || processes().into_iter().filter(|p| p.ppid == launcher && p.state == "Z").count();
    let orphans_gone = || processes().into_iter().filter(|p| p.ppid == launcher).count() == 2;
    assert!(wait_until(secs(10), || zombies() == 0 && orphans_gone()), "orphans not reaped: {:?}", processes());
    // SAFETY: kill(2) on the launcher this test started (through unshare).
    unsafe { libc::kill(launcher, libc::SIGTERM) };
    assert_eq!(l.exit_code(secs(20)), 0, "{}", l.log());
    assert!(l.log().contains("all workers stopped; exiting"));
}

/// The shipped unit files parse: `systemd-analyze verify`, with the launcher's real path.
#[test]
fn the_example_systemd_units_verify() {
    let dir = temp_dir("units");
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
    std::fs::remove_dir_all(dir).unwrap();
}
