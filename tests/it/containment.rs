//! Nothing of a worker's tree outlives a launcher SIGKILLed soon after it started that worker
//! (issue 18): 0.1 s after the first start, after a respawn, during a roll; 10 trials each,
//! with the default containment (a cgroup per worker where the machine allows, as here) and
//! with the sentinel alone (`--containment sentinel`: the worker tells the sentinel its pid
//! before it execs, so its process group is killed though no scan has seen it yet). With a
//! delegated cgroup v2, a worker's double-forked `setsid` child does not survive either,
//! young or old.
//!
//! The worker is `tests/workers/prefork.sh`: a master that starts two children in its group,
//! as nginx's master starts its workers, and reports their pids; every process of the tree
//! carries the trial's marker in its argv. A trial first checks that the whole tree runs.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::common::*;
use crate::status_fields::*;

/// A marker no other process has: `sleep MARKER.N` sleeps for hours, found again in /proc.
fn marker() -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    format!("{}{:03}", 5000 + std::process::id() % 4000, N.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
}

/// The live processes with `marker` (or `marker.N`) as one of their arguments.
fn marked(marker: &str) -> Vec<i32> {
    let has = |pid: i32| {
        let argv = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        argv.split(|b| *b == 0).any(|a| {
            let a = String::from_utf8_lossy(a);
            a == marker || a.strip_prefix(marker).is_some_and(|rest| rest.starts_with('.'))
        })
    };
    processes().into_iter().filter(|p| p.state != "Z" && has(p.pid)).map(|p| p.pid).collect()
}

/// Kills what a failed trial left (only processes with its marker), so nothing lingers.
struct Leftovers(String);

impl Drop for Leftovers {
    fn drop(&mut self) {
        for pid in marked(&self.0) {
            signal(pid, Signal::SIGKILL);
        }
    }
}

/// The pids worker `pid` reported (`children A B [C]`), once it did: its tree is up.
fn children(l: &Launcher, slot: usize, pid: i32) -> Vec<i32> {
    let line = l.wait_for(&format!("[{slot} {pid}] children "), secs(20));
    line.split("children ").nth(1).unwrap().split_whitespace().map(|p| p.parse().unwrap()).collect()
}

/// The `n`-th worker start of the log: the worker and when its line arrived.
fn nth_start(l: &Launcher, n: usize) -> (Worker, Instant) {
    l.wait_for_nth(") started", n, secs(20));
    let worker = l.started().into_iter().nth(n - 1).unwrap();
    let label = format!("(pid {}, gen {}) started", worker.pid, worker.generation);
    (worker, l.find(&label).unwrap().1)
}

#[derive(Clone, Copy, Debug)]
enum When {
    Start,
    Respawn,
    Roll,
}

/// One trial: a launcher over one prefork worker, SIGKILLed 0.1 s after the worker (`when`:
/// the first, a respawned one, a roll's new one) started and once its tree runs. Returns how
/// long after that start the kill came.
fn trial(containment: &str, when: When) -> Duration {
    let marker = marker();
    let _leftovers = Leftovers(marker.clone());
    let mut l = Launch::new()
        .workers(1)
        .ready_delay("100ms")
        .flag("--containment", containment)
        .cmd(&[&worker("prefork.sh"), &marker])
        .start();
    let (first, mut started) = nth_start(&l, 1);
    let mut worker = first.pid;
    match when {
        When::Start => {}
        When::Respawn => {
            children(&l, 0, first.pid);
            signal(first.pid, Signal::SIGKILL);
            let (second, at) = nth_start(&l, 2);
            (worker, started) = (second.pid, at);
        }
        When::Roll => {
            wait_fields(&l, secs(20), "the first worker ready", |s| {
                state_of_pid(s, first.pid).as_deref() == Some("ready")
            });
            l.signal(Signal::SIGUSR2);
            let (new, at) = nth_start(&l, 2);
            assert_eq!(new.generation, 2, "the roll's new worker");
            (worker, started) = (new.pid, at);
        }
    }
    let mut tree = children(&l, 0, worker);
    tree.push(worker);
    let tree = procs(&tree);
    assert!(tree.iter().all(|p| p.alive()), "the worker's tree is not all up: {tree:?}");
    if let Some(wait) = (started + Duration::from_millis(100)).checked_duration_since(Instant::now()) {
        std::thread::sleep(wait); // the moment of the kill, not a condition
    }
    l.signal(Signal::SIGKILL);
    let age = started.elapsed();
    assert!(l.wait_exit(secs(10)).is_some());
    let gone = wait_until(secs(10), || tree.iter().all(|p| !p.alive()) && marked(&marker).is_empty());
    assert!(gone, "{containment}, {when:?}: left behind {:?} (killed {age:?} after the start)", marked(&marker));
    age
}

fn ten_trials(containment: &str, when: When) {
    let ages: Vec<Duration> = (0..10).map(|_| trial(containment, when)).collect();
    eprintln!("{containment}, {when:?}: 10 of 10 left nothing; killed {ages:?} after the worker's start");
}

#[test]
fn a_launcher_sigkilled_just_after_starting_a_forking_worker_leaves_nothing() {
    ten_trials("auto", When::Start);
}

#[test]
fn a_launcher_sigkilled_just_after_a_respawn_leaves_nothing() {
    ten_trials("auto", When::Respawn);
}

#[test]
fn a_launcher_sigkilled_during_a_roll_leaves_nothing() {
    ten_trials("auto", When::Roll);
}

#[test]
fn with_the_sentinel_alone_a_launcher_sigkilled_just_after_starting_a_forking_worker_leaves_nothing() {
    ten_trials("sentinel", When::Start);
}

#[test]
fn with_the_sentinel_alone_a_launcher_sigkilled_just_after_a_respawn_leaves_nothing() {
    ten_trials("sentinel", When::Respawn);
}

#[test]
fn with_the_sentinel_alone_a_launcher_sigkilled_during_a_roll_leaves_nothing() {
    ten_trials("sentinel", When::Roll);
}

/// A cgroup v2 of the test's own below its cgroup, removed (with whatever is left in it) on drop.
struct TestCgroup(PathBuf);

impl TestCgroup {
    /// Why not, when the machine gives no writable cgroup v2 with cgroup.kill.
    fn create() -> Result<TestCgroup, String> {
        let own = std::fs::read_to_string("/proc/self/cgroup").map_err(|e| format!("/proc/self/cgroup: {e}"))?;
        let path = own.lines().find_map(|l| l.strip_prefix("0::")).ok_or("no cgroup v2 hierarchy")?.to_string();
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").map_err(|e| format!("mountinfo: {e}"))?;
        let mount = mounts
            .lines()
            .find(|l| l.split(" - ").nth(1).is_some_and(|r| r.starts_with("cgroup2 ")))
            .and_then(|l| l.split_whitespace().nth(4))
            .ok_or("cgroup v2 is not mounted")?;
        let dir = Path::new(mount).join(path.trim_start_matches('/')).join(format!("rl-test-{}", marker()));
        std::fs::create_dir(&dir).map_err(|e| format!("cannot create {} ({e}): no delegated cgroup", dir.display()))?;
        let cg = TestCgroup(dir);
        if !cg.0.join("cgroup.kill").exists() {
            return Err("no cgroup.kill (Linux 5.14 or later)".into());
        }
        Ok(cg)
    }

    fn str(&self) -> &str {
        self.0.to_str().unwrap()
    }

    fn populated(&self) -> bool {
        std::fs::read_to_string(self.0.join("cgroup.events")).is_ok_and(|t| t.contains("populated 1"))
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let _ = std::fs::write(self.0.join("cgroup.kill"), "1");
        wait_until(secs(5), || !self.populated());
        fn remove(dir: &Path) {
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    remove(&e.path());
                }
            }
            let _ = std::fs::remove_dir(dir);
        }
        remove(&self.0);
    }
}

#[test]
fn with_a_delegated_cgroup_a_detached_child_of_a_worker_never_outlives_a_sigkilled_launcher() {
    let cg = match TestCgroup::create() {
        Ok(cg) => cg,
        Err(why) => return eprintln!("SKIPPED: {why}"),
    };
    // Young (killed as soon as it runs, before any scan could see it) and old (1.5 s).
    for age in [Duration::ZERO, Duration::from_millis(1500)] {
        let marker = marker();
        let _leftovers = Leftovers(marker.clone());
        let mut l = Launch::new()
            .workers(2)
            .flag("--containment", "cgroup")
            .via(&["sh", "-c", "echo $$ > \"$0/cgroup.procs\" && exec \"$@\"", cg.str()])
            .cmd(&[&worker("prefork.sh"), &marker, "detach"])
            .start();
        let line = l.wait_for("containment: cgroup ", secs(10));
        let root = line.split("containment: cgroup ").nth(1).unwrap().split(" (").next().unwrap().to_string();
        let ours = format!("{}/reuse-launch.{}.", cg.str(), l.pid());
        assert!(root.starts_with(&ours), "the workers' cgroups are not below the delegated one: {line}");
        let status = || {
            let out =
                std::process::Command::new(BIN).args(["status", "--json", "--pid", &l.pid().to_string()]).output();
            String::from_utf8_lossy(&out.unwrap().stdout).into_owned()
        };
        let field = format!(r#""containment":"cgroup","cgroup":"{root}""#);
        assert!(wait_until(secs(10), || status().contains(&field)), "status: {}", status());
        let mut tree = Vec::new();
        for slot in 0..2 {
            let (w, _) = nth_start(&l, slot + 1);
            let kids = children(&l, w.slot, w.pid);
            assert_eq!(kids.len(), 3, "two in the group, one detached: {kids:?}");
            // Proof that the third one left: it leads a group (and session) of its own, and
            // was re-parented to the launcher by the double fork.
            let detached = processes().into_iter().find(|p| p.pid == kids[2]).expect("the detached child runs");
            assert!(detached.pgrp == detached.pid && detached.ppid == l.pid(), "not detached: {detached:?}");
            tree.extend(kids);
            tree.push(w.pid);
        }
        let tree = procs(&tree);
        assert!(tree.iter().all(|p| p.alive()), "the trees are not all up: {tree:?}");
        std::thread::sleep(age); // the age of the detached children at the kill, not a condition
        l.signal(Signal::SIGKILL);
        assert!(l.wait_exit(secs(10)).is_some());
        let gone = wait_until(secs(10), || tree.iter().all(|p| !p.alive()) && marked(&marker).is_empty());
        assert!(gone, "aged {age:?}: left behind {:?}", marked(&marker));
        assert!(wait_until(secs(10), || !Path::new(&root).exists()), "the sentinel did not remove {root}");
    }
}

/// A `reexec`'d image keeps the workers' cgroups (it takes the root its sentinel names): the
/// status says so, a worker started after it is in it, and a SIGKILL still leaves nothing.
#[test]
fn after_a_reexec_the_cgroup_is_kept_and_still_ends_everything() {
    let marker = marker();
    let _leftovers = Leftovers(marker.clone());
    let mut l = Launch::new().workers(1).ready_delay("100ms").cmd(&[&worker("prefork.sh"), &marker, "detach"]).start();
    let line = l.wait_for("containment: cgroup ", secs(10));
    let root = line.split("containment: cgroup ").nth(1).unwrap().split(" (").next().unwrap().to_string();
    let (first, _) = nth_start(&l, 1);
    children(&l, 0, first.pid);
    let pid = l.pid().to_string();
    let out = std::process::Command::new(BIN).args(["reexec", "--pid", &pid]).output().unwrap();
    assert!(out.status.success(), "reexec: {}", String::from_utf8_lossy(&out.stderr));
    let status = || {
        let out = std::process::Command::new(BIN).args(["status", "--json", "--pid", &pid]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let field = format!(r#""containment":"cgroup","cgroup":"{root}""#);
    assert!(wait_until(secs(10), || status().contains(&field)), "after the reexec: {}", status());
    // A new worker of the new image (the old one killed) goes into the same root.
    signal(first.pid, Signal::SIGKILL);
    let (second, _) = nth_start(&l, 2);
    let mut tree = children(&l, 0, second.pid);
    tree.push(second.pid);
    // Its /proc/PID/cgroup line names a worker's cgroup (`/.../reuse-launch.X.Y/wN`) whose
    // parent is the root (which is that path below the cgroup2 mount).
    let in_root = |p: i32| {
        let own = std::fs::read_to_string(format!("/proc/{p}/cgroup")).unwrap_or_default();
        let path = own.lines().find_map(|l| l.strip_prefix("0::")).unwrap_or("").to_string();
        path.rsplit_once('/').is_some_and(|(parent, _)| !parent.is_empty() && root.ends_with(parent))
    };
    assert!(tree.iter().all(|p| in_root(*p)), "not in {root}: {tree:?}");
    let tree = procs(&tree);
    l.signal(Signal::SIGKILL);
    assert!(l.wait_exit(secs(10)).is_some());
    let gone = wait_until(secs(10), || tree.iter().all(|p| !p.alive()) && marked(&marker).is_empty());
    assert!(gone, "left behind {:?}", marked(&marker));
}
