//! Test harness: runs the real `reuse-launch` binary, reads its log, talks HTTP to its workers,
//! and polls for conditions with deadlines (never fixed sleeps). Dropping a [`Launcher`]
//! SIGKILLs the launcher and every worker process group it logged, so a failing test leaves
//! nothing behind.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_reuse-launch");
pub const PYWORKER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/workers/pyworker.py");

/// PATH for launchers under test: the directory of the real python3 first. A version manager's
/// `python3` shim (pyenv: a bash script that runs more bash) costs hundreds of milliseconds per
/// worker start and forks helpers inside the worker's group; the tests are about the launcher.
pub fn test_path() -> String {
    static PATH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        let path = std::env::var("PATH").unwrap_or_default();
        let real = Command::new("python3")
            .args(["-c", "import os, sys; print(os.path.dirname(os.path.realpath(sys.executable)))"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
        match real {
            Some(dir) if !dir.is_empty() => format!("{dir}:{path}"),
            _ => path,
        }
    })
    .clone()
}

/// Poll `cond` every 20 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The launcher's log lines (its stderr, which its workers share), when each arrived, and
/// whether stderr reached EOF.
#[derive(Default)]
struct Log {
    lines: Vec<String>,
    times: Vec<Instant>,
    eof: bool,
}

type Lines = Arc<(Mutex<Log>, Condvar)>;

pub struct Launcher {
    child: Child,
    lines: Lines,
    exit: Option<ExitStatus>,
    /// The first listening address the launcher logged (None until `wait_listening`).
    pub addr: Option<SocketAddr>,
    /// The launcher runs in its own pid namespace: the pids in its log are not ours, so Drop
    /// must not signal them (the namespace dies with the launcher anyway).
    pub own_pid_namespace: bool,
}

impl Launcher {
    /// Start the launcher with `args` (flags, `--`, command) and wait until it listens.
    pub fn start(args: &[&str]) -> Launcher {
        let mut l = Launcher::spawn(Command::new(BIN).args(args));
        l.wait_listening();
        l
    }

    /// Start without waiting for anything (for start-up failures).
    pub fn spawn(cmd: &mut Command) -> Launcher {
        cmd.env("RUST_LOG", "info").env("PATH", test_path()).stdin(Stdio::null()).stdout(Stdio::inherit());
        cmd.stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("start reuse-launch");
        let lines: Lines = Arc::default();
        let stderr = child.stderr.take().unwrap();
        let sink = lines.clone();
        std::thread::spawn(move || {
            let (buf, cv) = &*sink;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut log = buf.lock().unwrap();
                log.lines.push(line);
                log.times.push(Instant::now());
                cv.notify_all();
            }
            buf.lock().unwrap().eof = true;
            cv.notify_all();
        });
        Launcher { child, lines, exit: None, addr: None, own_pid_namespace: false }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn port(&self) -> u16 {
        self.addr.expect("launcher is listening").port()
    }

    pub fn log(&self) -> String {
        self.lines.0.lock().unwrap().lines.join("\n")
    }

    pub fn count(&self, needle: &str) -> usize {
        self.lines.0.lock().unwrap().lines.iter().filter(|l| l.contains(needle)).count()
    }

    /// The first log line containing `needle`: its index in the log and when it arrived.
    pub fn find(&self, needle: &str) -> Option<(usize, Instant)> {
        let log = self.lines.0.lock().unwrap();
        log.lines.iter().position(|l| l.contains(needle)).map(|i| (i, log.times[i]))
    }

    /// Wait until `n` log lines contain `needle`; returns the n-th. Panics with the log.
    pub fn wait_for_nth(&self, needle: &str, n: usize, timeout: Duration) -> String {
        let (buf, cv) = &*self.lines;
        let end = Instant::now() + timeout;
        let mut guard = buf.lock().unwrap();
        loop {
            if let Some(l) = guard.lines.iter().filter(|l| l.contains(needle)).nth(n - 1) {
                return l.clone();
            }
            let now = Instant::now();
            if now >= end {
                drop(guard);
                panic!("no {n}. log line containing {needle:?} within {timeout:?}; log:\n{}", self.log());
            }
            guard = cv.wait_timeout(guard, end - now).unwrap().0;
        }
    }

    pub fn wait_for(&self, needle: &str, timeout: Duration) -> String {
        self.wait_for_nth(needle, 1, timeout)
    }

    pub fn wait_listening(&mut self) {
        let line = self.wait_for("listening on ", Duration::from_secs(20));
        let addr = line.split("listening on ").nth(1).unwrap().split_whitespace().next().unwrap();
        self.addr = Some(addr.parse().expect("address in the log"));
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on the pid of a child we started and have not reaped.
        unsafe { libc::kill(self.pid(), sig) };
    }

    /// Wait for the launcher to exit; None if it is still running after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if self.exit.is_none() {
            let child = &mut self.child;
            let mut status = None;
            wait_until(timeout, || {
                status = child.try_wait().unwrap();
                status.is_some()
            });
            self.exit = status;
            if status.is_some() {
                // Let the reader take in the last lines (EOF comes once no worker holds stderr).
                let (buf, cv) = &*self.lines;
                let guard = buf.lock().unwrap();
                let _ = cv.wait_timeout_while(guard, Duration::from_secs(5), |g| !g.eof).unwrap();
            }
        }
        self.exit
    }

    /// Wait for the launcher to exit and return its exit code, panicking with the log if not.
    pub fn exit_code(&mut self, timeout: Duration) -> i32 {
        match self.wait_exit(timeout) {
            Some(s) => s.code().unwrap_or_else(|| panic!("launcher killed by a signal: {s:?}\n{}", self.log())),
            None => panic!("launcher still running after {timeout:?}; log:\n{}", self.log()),
        }
    }

    /// Every worker (pid, slot, gen) the launcher logged as started, in order.
    pub fn started(&self) -> Vec<(i32, usize, u64)> {
        let log = self.lines.0.lock().unwrap();
        log.lines.iter().filter(|l| l.ends_with(") started")).map(|l| parse_worker(l)).collect()
    }

    /// The pid of the latest worker started on `slot`.
    pub fn latest_pid(&self, slot: usize) -> i32 {
        self.started().iter().rev().find(|w| w.1 == slot).expect("a worker on that slot").0
    }

    /// Wait until `slot` has a started worker other than `old`; returns its pid.
    pub fn wait_replacement(&self, slot: usize, old: i32, timeout: Duration) -> i32 {
        let mut pid = old;
        let ok = wait_until(timeout, || {
            pid = self.latest_pid(slot);
            pid != old
        });
        assert!(ok, "slot {slot} was not given a new worker after pid {old}; log:\n{}", self.log());
        pid
    }

    /// GET / until `cond` holds on the set of answers seen, or panic after `timeout`.
    pub fn poll_answers(&self, timeout: Duration, mut cond: impl FnMut(&[Reply]) -> bool) -> Vec<Reply> {
        let mut seen = Vec::new();
        let port = self.port();
        let ok = wait_until(timeout, || {
            if let Ok(r) = get(port) {
                seen.push(r);
            }
            cond(&seen)
        });
        assert!(ok, "condition on the answers not met; saw {:?}\nlog:\n{}", distinct(&seen), self.log());
        seen
    }
}

impl Drop for Launcher {
    fn drop(&mut self) {
        // Freeze the launcher first: once its workers die it would respawn them at once, and a
        // respawned worker's children would outlive it (PDEATHSIG covers only the worker
        // itself). Then kill the current workers' whole groups (they are its unreaped children,
        // so the pids are theirs; pids of workers that exited earlier may have been reused and
        // are left alone), then the launcher.
        let launcher = self.pid();
        if !self.own_pid_namespace && self.exit.is_none() {
            // SAFETY: kill(2) on the launcher this test started and has not reaped.
            unsafe { libc::kill(launcher, libc::SIGSTOP) };
            let workers: Vec<i32> = self.started().iter().map(|w| w.0).collect();
            for p in processes().into_iter().filter(|p| p.ppid == launcher && workers.contains(&p.pid)) {
                // SAFETY: kill(2) on the process group of a live worker of this test's launcher.
                unsafe { libc::kill(-p.pid, libc::SIGKILL) };
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Parse `worker 3 (pid 1234, gen 2) ...` into (pid, slot, gen).
pub fn parse_worker(line: &str) -> (i32, usize, u64) {
    let rest = &line[line.find("worker ").expect("worker line") + 7..];
    let slot = rest.split_whitespace().next().unwrap().parse().unwrap();
    let pid = rest.split("(pid ").nth(1).unwrap().split(',').next().unwrap().parse().unwrap();
    let gen = rest.split("gen ").nth(1).unwrap().split(')').next().unwrap().parse().unwrap();
    (pid, slot, gen)
}

/// What a test worker answered: `pid=.. slot=.. gen=..`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Reply {
    pub pid: i32,
    pub slot: String,
    pub gen: String,
}

pub fn distinct(replies: &[Reply]) -> BTreeSet<Reply> {
    replies.iter().cloned().collect()
}

/// One request on a new connection.
pub fn get(port: u16) -> std::io::Result<Reply> {
    let mut s = TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)), Duration::from_secs(5))?;
    read_reply(&mut s)
}

/// Send a request on an open connection and read the whole answer.
pub fn read_reply(s: &mut TcpStream) -> std::io::Result<Reply> {
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    parse_reply(&text).ok_or_else(|| std::io::Error::other(format!("bad answer: {text:?}")))
}

fn parse_reply(text: &str) -> Option<Reply> {
    if !text.starts_with("HTTP/1.") || !text.contains(" 200 ") {
        return None;
    }
    let body = text.split("\r\n\r\n").nth(1)?.trim();
    let field = |k: &str| body.split_whitespace().find_map(|f| f.strip_prefix(k)).map(str::to_string);
    Some(Reply { pid: field("pid=")?.parse().ok()?, slot: field("slot=")?, gen: field("gen=")? })
}

/// One process as seen in /proc/PID/stat.
#[derive(Clone, Debug)]
pub struct ProcInfo {
    pub pid: i32,
    pub ppid: i32,
    pub pgrp: i32,
    pub state: String,
    /// Start time in clock ticks after boot: with the pid, it names a process even when pids
    /// are reused (pid_max is small on this kind of machine and tests run in parallel).
    pub start: u64,
}

pub fn proc_info(pid: i32) -> Option<ProcInfo> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(ProcInfo {
        pid,
        ppid: f[1].parse().ok()?,
        pgrp: f[2].parse().ok()?,
        state: f[0].to_string(),
        start: f[19].parse().ok()?,
    })
}

/// A process identity taken while it runs; `alive` stays false once it exited, even if its
/// pid is reused.
#[derive(Clone, Debug)]
pub struct Proc {
    pub pid: i32,
    start: Option<u64>,
}

impl Proc {
    pub fn of(pid: i32) -> Proc {
        Proc { pid, start: proc_info(pid).map(|p| p.start) }
    }

    pub fn alive(&self) -> bool {
        match (proc_info(self.pid), self.start) {
            (Some(p), Some(start)) => p.start == start && p.state != "Z",
            _ => false,
        }
    }
}

pub fn procs(pids: &[i32]) -> Vec<Proc> {
    pids.iter().map(|p| Proc::of(*p)).collect()
}

/// Every process on the machine.
pub fn processes() -> Vec<ProcInfo> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<i32>().ok())
        .filter_map(proc_info)
        .collect()
}

/// Clock ticks since boot, comparable with `ProcInfo::start`.
pub fn uptime_ticks() -> u64 {
    let up = std::fs::read_to_string("/proc/uptime").unwrap();
    let secs: f64 = up.split_whitespace().next().unwrap().parse().unwrap();
    // SAFETY: sysconf has no preconditions.
    (secs * unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64) as u64
}

/// Live (not zombie) processes in one of the process groups `groups` (worker pids lead their
/// own groups) that started before `before` (uptime ticks): a later one only reuses a freed
/// group id.
pub fn members_of(groups: &[i32], before: u64) -> Vec<i32> {
    processes()
        .into_iter()
        .filter(|p| groups.contains(&p.pgrp) && p.start < before && p.state != "Z")
        .map(|p| p.pid)
        .collect()
}

pub fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// Clients on new connections, counting answers and failures until told to stop.
pub struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failures: Arc<Mutex<Vec<String>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    pub fn start(port: u16, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let threads = (0..clients)
            .map(|_| {
                let (stop, ok, failures) = (stop.clone(), ok.clone(), failures.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        match get(port) {
                            Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                            Err(e) => {
                                failures.lock().unwrap().push(e.to_string());
                                0
                            }
                        };
                    }
                })
            })
            .collect();
        Load { stop, ok, failures, threads }
    }

    /// Stop the clients; returns the number of answers and the failures.
    pub fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        (self.ok.load(Ordering::Relaxed), self.failures.lock().unwrap().clone())
    }
}

/// The NUL-separated strings of /proc/PID/`file` (`environ`, `cmdline`).
fn proc_strings(pid: i32, file: &str) -> Vec<String> {
    let raw = std::fs::read(format!("/proc/{pid}/{file}")).unwrap_or_else(|e| panic!("/proc/{pid}/{file}: {e}"));
    raw.split(|b| *b == 0).filter(|s| !s.is_empty()).map(|s| String::from_utf8_lossy(s).into_owned()).collect()
}

/// The environment process `pid` was started with, as `KEY=VALUE` strings.
pub fn environ(pid: i32) -> Vec<String> {
    proc_strings(pid, "environ")
}

/// The arguments of process `pid`, its program name first.
pub fn cmdline(pid: i32) -> Vec<String> {
    proc_strings(pid, "cmdline")
}

/// The open fds of process `pid` and what each points to (`socket:[1234]`, a path), by number.
pub fn fd_targets(pid: i32) -> Vec<(i32, String)> {
    let mut fds: Vec<(i32, String)> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .map(|e| {
            let fd = e.file_name().to_string_lossy().parse().unwrap();
            (fd, std::fs::read_link(e.path()).map(|p| p.display().to_string()).unwrap_or_default())
        })
        .collect();
    fds.sort();
    fds
}
