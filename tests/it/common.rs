//! Test harness: runs the real `reuse-launch` binary, reads its log, talks HTTP to its workers,
//! and polls for conditions with deadlines (never fixed sleeps).
//!
//! - [`Launch`] says how to start the launcher; [`Launcher`] is the running one. Dropping a
//!   [`Launcher`] SIGKILLs it and every worker process group it logged, so a failing test leaves
//!   nothing behind, and prints its log when the test is failing.
//! - [`Worker`] is a worker as the launcher logged it; [`Reply`] is what a test worker answered.
//! - [`NotifySocket`] stands in for systemd's end of `NOTIFY_SOCKET`.
//! - [`TempPath`] is a file or directory that removes itself.
//! - The rest reads `/proc`: [`Proc`] names a process even across pid reuse.

use std::collections::BTreeSet;
use std::fmt;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::ops::Deref;
use std::os::fd::RawFd;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::{sysconf, Pid, SysconfVar};

pub const BIN: &str = env!("CARGO_BIN_EXE_reuse-launch");
pub const PYWORKER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/workers/pyworker.py");
/// The directory of the test workers and the apps the real servers load.
pub const WORKERS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/workers");

/// The path of the test worker file `name` (in [`WORKERS`]).
pub fn worker(name: &str) -> String {
    format!("{WORKERS}/{name}")
}

pub fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
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

/// Send `sig` to process `pid`, which must exist (a zombie does).
pub fn signal(pid: i32, sig: Signal) {
    kill(Pid::from_raw(pid), sig).unwrap_or_else(|e| panic!("kill({pid}, {sig}): {e}"));
}

/// PATH for launchers under test: the directory of the real python3 first. A version manager's
/// `python3` shim (pyenv: a bash script that runs more bash) costs hundreds of milliseconds per
/// worker start and forks helpers inside the worker's group; the tests are about the launcher.
fn test_path() -> String {
    static PATH: OnceLock<String> = OnceLock::new();
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

/// A worker as the launcher logs it: `worker 3 (pid 1234, gen 2) ...`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Worker {
    pub pid: i32,
    pub slot: usize,
    pub generation: u64,
}

impl Worker {
    fn parse(line: &str) -> Worker {
        let rest = &line[line.find("worker ").expect("worker line") + 7..];
        let slot = rest.split_whitespace().next().unwrap().parse().unwrap();
        let pid = rest.split("(pid ").nth(1).unwrap().split(',').next().unwrap().parse().unwrap();
        let generation = rest.split("gen ").nth(1).unwrap().split(')').next().unwrap().parse().unwrap();
        Worker { pid, slot, generation }
    }
}

/// The worker's name in the launcher's log: `worker 3 (pid 1234, gen 2)`.
impl fmt::Display for Worker {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "worker {} (pid {}, gen {})", self.slot, self.pid, self.generation)
    }
}

/// How to start the launcher under test. It binds `127.0.0.1:0` unless told otherwise:
///
/// ```ignore
/// let l = Launch::new().workers(2).mode("shared").ready_delay("200ms").py(&["--notify"]).start();
/// ```
#[derive(Clone, Debug, Default)]
pub struct Launch {
    via: Vec<String>,
    flags: Vec<String>,
    /// None: the default `-b 127.0.0.1:0`.
    binds: Option<Vec<String>>,
    command: Vec<String>,
    env: Vec<(String, String)>,
    own_pid_namespace: bool,
    /// Open fds to hand to the launcher as its fds 3, 4, ... (socket activation, the fd store).
    fds: Vec<RawFd>,
    /// Run this copy of the launcher's binary instead of the built one.
    binary: Option<String>,
}

impl Launch {
    pub fn new() -> Launch {
        Launch::default()
    }

    /// `-n n`.
    pub fn workers(self, n: usize) -> Launch {
        self.flag("-n", &n.to_string())
    }

    /// `-b spec`, in place of the default `127.0.0.1:0`; call again for more sockets.
    pub fn bind(mut self, spec: &str) -> Launch {
        self.binds.get_or_insert_with(Vec::new).push(spec.to_string());
        self
    }

    /// No `-b` at all (start-up errors, an inherited socket).
    pub fn no_bind(mut self) -> Launch {
        self.binds = Some(Vec::new());
        self
    }

    /// `--mode mode`.
    pub fn mode(self, mode: &str) -> Launch {
        self.flag("--mode", mode)
    }

    /// `--ready how`.
    pub fn ready(self, how: &str) -> Launch {
        self.flag("--ready", how)
    }

    /// `--ready-delay delay`.
    pub fn ready_delay(self, delay: &str) -> Launch {
        self.flag("--ready-delay", delay)
    }

    /// `--grace grace`.
    pub fn grace(self, grace: &str) -> Launch {
        self.flag("--grace", grace)
    }

    /// Any other flag of the launcher, with its value.
    pub fn flag(mut self, name: &str, value: &str) -> Launch {
        self.flags.extend([name.to_string(), value.to_string()]);
        self
    }

    /// Flags as they are written, for those that take no value or come in a list.
    pub fn args(mut self, args: &[&str]) -> Launch {
        self.flags.extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// The workers' command (after `--`).
    pub fn cmd(mut self, command: &[&str]) -> Launch {
        self.command = command.iter().map(|s| s.to_string()).collect();
        self
    }

    /// The workers' command: the test worker [`PYWORKER`] with `args`.
    pub fn py(self, args: &[&str]) -> Launch {
        self.cmd(&[&["python3", PYWORKER], args].concat())
    }

    /// An environment variable for the launcher (and so its workers).
    pub fn env(mut self, key: &str, value: &str) -> Launch {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// Run the launcher through `wrapper`, which ends up exec'ing or running it
    /// (`sh -c ...`, `setpriv ...`, `systemd-socket-activate ...`).
    pub fn via(mut self, wrapper: &[&str]) -> Launch {
        self.via = wrapper.iter().map(|s| s.to_string()).collect();
        self
    }

    /// Run the launcher as pid 1 of a pid namespace of its own, as a container runtime does
    /// (`unshare --pid --fork`). Its pid as seen here is unshare's; the pids it logs are not ours.
    pub fn in_pid_namespace(mut self) -> Launch {
        self.own_pid_namespace = true;
        self.via(&["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"])
    }

    /// Run the launcher from `path` (a copy of the built binary) instead of [`BIN`].
    pub fn binary(mut self, path: &str) -> Launch {
        self.binary = Some(path.to_string());
        self
    }

    /// Hand `fds` to the launcher as its fds 3, 4, ... (as a service manager passes LISTEN_FDS).
    pub fn pass_fds(mut self, fds: Vec<RawFd>) -> Launch {
        assert!(fds.len() <= 16, "at most 16 fds");
        self.fds = fds;
        self
    }

    /// Start the launcher and wait until it logs that it listens.
    pub fn start(self) -> Launcher {
        let mut l = self.spawn();
        l.wait_listening();
        l
    }

    /// Start the launcher without waiting for anything (for start-up failures).
    pub fn spawn(self) -> Launcher {
        let bin = self.binary.clone().unwrap_or_else(|| BIN.to_string());
        let mut cmd = match self.via.split_first() {
            Some((program, args)) => {
                let mut cmd = Command::new(program);
                cmd.args(args).arg(&bin);
                cmd
            }
            None => Command::new(&bin),
        };
        let binds = self.binds.unwrap_or_else(|| vec!["127.0.0.1:0".to_string()]);
        cmd.args(binds.iter().flat_map(|b| ["-b", b])).args(&self.flags);
        if !self.command.is_empty() {
            cmd.arg("--").args(&self.command);
        }
        cmd.env("RUST_LOG", "info").env("PATH", test_path()).envs(self.env);
        cmd.stdin(Stdio::null()).stdout(Stdio::inherit()).stderr(Stdio::piped());
        if !self.fds.is_empty() {
            let fds = self.fds.clone();
            // SAFETY: between fork and exec the closure only calls dup2 (async-signal-safe) on
            // fds this process holds, reading a Vec allocated before the fork.
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                    // Above the targets first (an fd may already sit on one of them), then into
                    // place: dup2 from another number also clears CLOEXEC.
                    let floor = 3 + fds.len() as i32;
                    let mut high = [0; 16];
                    for (h, fd) in high.iter_mut().zip(&fds) {
                        *h = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, floor);
                        if *h < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    for (i, h) in high.iter().take(fds.len()).enumerate() {
                        if libc::dup2(*h, 3 + i as i32) < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    Ok(())
                })
            };
        }
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("start {cmd:?}: {e}"));
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
        Launcher { child, lines, exit: None, addr: None, own_pid_namespace: self.own_pid_namespace }
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

/// A running launcher (started by [`Launch`]).
pub struct Launcher {
    child: Child,
    lines: Lines,
    exit: Option<ExitStatus>,
    /// The first listening address the launcher logged (None until `wait_listening`).
    pub addr: Option<SocketAddr>,
    /// The launcher runs in its own pid namespace: the pids in its log are not ours, so Drop
    /// must not signal them (the namespace dies with the launcher anyway).
    own_pid_namespace: bool,
}

impl Launcher {
    /// The pid of the process started (the launcher, or the wrapper it runs under).
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

    /// The launcher's listening addresses, in the order of its log.
    pub fn listening(&self) -> Vec<String> {
        let log = self.lines.0.lock().unwrap();
        let lines = log.lines.iter().filter_map(|x| x.split("listening on ").nth(1));
        lines.map(|x| x.split_whitespace().next().unwrap().to_string()).collect()
    }

    fn wait_listening(&mut self) {
        self.wait_for("listening on ", secs(20));
        self.addr = Some(self.listening()[0].parse().expect("address in the log"));
    }

    pub fn signal(&self, sig: Signal) {
        signal(self.pid(), sig);
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
                let _ = cv.wait_timeout_while(guard, secs(5), |g| !g.eof).unwrap();
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

    /// The workers named by the log lines that `pick`, in order.
    fn workers(&self, pick: impl Fn(&str) -> bool) -> Vec<Worker> {
        let log = self.lines.0.lock().unwrap();
        log.lines.iter().filter(|l| pick(l)).map(|l| Worker::parse(l)).collect()
    }

    /// Every worker the launcher logged as started, in order.
    pub fn started(&self) -> Vec<Worker> {
        self.workers(|l| l.ends_with(") started"))
    }

    /// The pids of [`started`](Self::started).
    pub fn started_pids(&self) -> Vec<i32> {
        self.started().iter().map(|w| w.pid).collect()
    }

    /// Every worker the launcher logged as ready (`... ready after ...`), in order.
    pub fn ready(&self) -> Vec<Worker> {
        self.workers(|l| l.contains(") ready after"))
    }

    /// The pid of the latest worker started on `slot`.
    pub fn latest_pid(&self, slot: usize) -> i32 {
        self.started().iter().rev().find(|w| w.slot == slot).expect("a worker on that slot").pid
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
        if std::thread::panicking() {
            eprintln!("--- log of the launcher (pid {}) ---\n{}\n---", self.pid(), self.log());
        }
        // Freeze the launcher first: once its workers die it would respawn them at once, and a
        // respawned worker's children would outlive it (PDEATHSIG covers only the worker
        // itself). Then kill the current workers' whole groups (they are its unreaped children,
        // so the pids are theirs; pids of workers that exited earlier may have been reused and
        // are left alone), then the launcher. Errors are ignored: whatever is gone is gone.
        let launcher = self.pid();
        if !self.own_pid_namespace && self.exit.is_none() {
            let _ = kill(Pid::from_raw(launcher), Signal::SIGSTOP);
            let workers = self.started_pids();
            for p in children_of(launcher).into_iter().filter(|p| workers.contains(&p.pid)) {
                let _ = killpg(Pid::from_raw(p.pid), Signal::SIGKILL);
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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
    let mut s = TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)), secs(5))?;
    read_reply(&mut s)
}

/// Send `GET /` (the connection to be closed after the answer) on an open connection.
pub fn send_request(s: &mut TcpStream) -> std::io::Result<()> {
    s.write_all(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
}

/// Send a request on an open connection and read the whole answer.
pub fn read_reply(s: &mut TcpStream) -> std::io::Result<Reply> {
    s.set_read_timeout(Some(secs(10)))?;
    send_request(s)?;
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

/// Clients on new connections, counting answers and failures until told to stop.
pub struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failures: Arc<Mutex<Vec<String>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    pub fn start(port: u16, clients: usize) -> Load {
        Load::start_with(port, clients, |p| get(p).map(drop))
    }

    /// Clients that each call `request` in a loop (one request on a new connection).
    pub fn start_with(port: u16, clients: usize, request: fn(u16) -> std::io::Result<()>) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let threads = (0..clients)
            .map(|_| {
                let (stop, ok, failures) = (stop.clone(), ok.clone(), failures.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        match request(port) {
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

    /// Answers so far.
    pub fn ok(&self) -> usize {
        self.ok.load(Ordering::Relaxed)
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

/// A path in the temp directory, unique to this test process and call, with nothing there yet
/// (or an empty directory, from [`TempPath::dir`]). Dropping it removes the file or the whole
/// directory, even when the test fails.
pub struct TempPath(PathBuf);

impl TempPath {
    pub fn new(tag: &str) -> TempPath {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("reuse-launch-{tag}-{}-{n}", std::process::id()));
        // A leftover of an earlier run whose pid this process reuses.
        let _ = std::fs::remove_dir_all(&path);
        let _ = std::fs::remove_file(&path);
        TempPath(path)
    }

    pub fn dir(tag: &str) -> TempPath {
        let d = TempPath::new(tag);
        std::fs::create_dir(&d.0).unwrap_or_else(|e| panic!("mkdir {}: {e}", d.0.display()));
        d
    }

    pub fn str(&self) -> &str {
        self.0.to_str().expect("temp paths are UTF-8")
    }
}

impl Deref for TempPath {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for TempPath {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        if self.0.is_dir() {
            let _ = std::fs::remove_dir_all(&self.0);
        } else {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

/// A stand-in for systemd's end of NOTIFY_SOCKET: every datagram received, in order.
pub struct NotifySocket {
    sock: UnixDatagram,
    path: TempPath,
    /// The datagrams received so far (each `KEY=VALUE` lines).
    pub got: Vec<String>,
}

impl NotifySocket {
    pub fn bind() -> NotifySocket {
        let path = TempPath::new("notify");
        let sock = UnixDatagram::bind(&path).unwrap_or_else(|e| panic!("bind {}: {e}", path.display()));
        NotifySocket { sock, path, got: Vec::new() }
    }

    /// The value for `NOTIFY_SOCKET`.
    pub fn path(&self) -> &str {
        self.path.str()
    }

    /// Take in what has arrived, waiting at most `timeout` for the first datagram.
    fn recv(&mut self, timeout: Duration) {
        let mut buf = [0u8; 4096];
        let mut wait = Some(timeout.max(Duration::from_millis(1)));
        loop {
            self.sock.set_read_timeout(wait).unwrap();
            match self.sock.recv(&mut buf) {
                Ok(n) => self.got.push(String::from_utf8_lossy(&buf[..n]).into_owned()),
                Err(_) => return,
            }
            wait = Some(Duration::from_millis(1));
        }
    }

    /// Wait until a datagram for which `matches` holds arrives after the first `after` ones;
    /// returns its index. Panics after `timeout`, naming `what` was expected.
    pub fn wait(&mut self, what: &str, after: usize, timeout: Duration, matches: impl Fn(&str) -> bool) -> usize {
        let end = Instant::now() + timeout;
        loop {
            if let Some(i) = self.got.iter().skip(after).position(|m| matches(m)) {
                return after + i;
            }
            let now = Instant::now();
            assert!(now < end, "no {what} on NOTIFY_SOCKET within {timeout:?}; got {:?}", self.got);
            self.recv(end - now);
        }
    }

    /// Wait until a datagram with the line `field` arrives after the first `after`; its index.
    pub fn wait_for(&mut self, field: &str, after: usize, timeout: Duration) -> usize {
        self.wait(&format!("{field:?}"), after, timeout, |m| has_field(m, field))
    }

    /// Wait until any datagram contains `needle`; returns the first such.
    pub fn wait_containing(&mut self, needle: &str, timeout: Duration) -> String {
        let i = self.wait(&format!("message with {needle:?}"), 0, timeout, |m| m.contains(needle));
        self.got[i].clone()
    }

    /// Whether a datagram after the first `from` has the line `field`.
    pub fn has(&self, from: usize, field: &str) -> bool {
        self.got.iter().skip(from).any(|m| has_field(m, field))
    }
}

fn has_field(datagram: &str, field: &str) -> bool {
    datagram.lines().any(|f| f == field)
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

fn proc_info(pid: i32) -> Option<ProcInfo> {
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

/// Is `pid` a launcher's sentinel (`reuse-launch __sentinel`, see src/sentinel.rs)?
pub fn is_sentinel(pid: i32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c.split(|b| *b == 0).any(|a| a == b"__sentinel"))
}

/// The children of `launcher` but its sentinel: its workers and the orphans it adopted.
pub fn launcher_children(launcher: i32) -> Vec<ProcInfo> {
    children_of(launcher).into_iter().filter(|p| !is_sentinel(p.pid)).collect()
}

/// The children of process `ppid`, zombies included.
pub fn children_of(ppid: i32) -> Vec<ProcInfo> {
    processes().into_iter().filter(|p| p.ppid == ppid).collect()
}

/// Clock ticks since boot, comparable with `ProcInfo::start`.
pub fn uptime_ticks() -> u64 {
    let up = std::fs::read_to_string("/proc/uptime").unwrap();
    let secs: f64 = up.split_whitespace().next().unwrap().parse().unwrap();
    let tick = sysconf(SysconfVar::CLK_TCK).expect("sysconf(CLK_TCK)").expect("CLK_TCK is defined");
    (secs * tick as f64) as u64
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

/// The socket inodes among a process's fds: (fd, inode).
pub fn socket_fds(pid: i32) -> Vec<(i32, u64)> {
    fd_targets(pid)
        .into_iter()
        .filter_map(|(fd, t)| Some((fd, t.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()?)))
        .collect()
}

/// The inode of the accepted socket of the IPv4 connection from `client` to `port` (None until
/// a process has accepted it).
pub fn server_side_inode(port: u16, client: u16) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/tcp").ok()?;
    text.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let p = |a: &str| a.rsplit(':').next().and_then(|p| u16::from_str_radix(p, 16).ok());
        (p(f[1]) == Some(port) && p(f[2]) == Some(client)).then(|| f[9].parse().ok()).flatten().filter(|i| *i != 0)
    })
}

/// Whether process `pid` holds the server side of the connection `conn` (to `port`) made.
pub fn holds_connection(pid: i32, port: u16, conn: &TcpStream) -> bool {
    let client = conn.local_addr().map(|a| a.port()).unwrap_or(0);
    server_side_inode(port, client).is_some_and(|ino| socket_fds(pid).iter().any(|(_, i)| *i == ino))
}

/// What fd `fd` of process `pid` points to; panics if it has no such fd.
pub fn fd_target(pid: i32, fd: i32) -> String {
    let link = std::fs::read_link(format!("/proc/{pid}/fd/{fd}"));
    link.unwrap_or_else(|e| panic!("pid {pid} has no fd {fd}: {e}")).display().to_string()
}

pub const DEPS: &str = "run scripts/test-deps, which installs every runtime these tests use";

/// A C program of this repository (`src`, relative to the crate), built once per test run with
/// the system's C compiler (`cc -O2`) into this crate's `CARGO_TARGET_TMPDIR`; its path. A
/// missing compiler fails the test, saying so.
pub fn built_c(src: &str) -> String {
    static BUILT: Mutex<Vec<(String, Result<String, String>)>> = Mutex::new(Vec::new());
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, done)) = built.iter().find(|(s, _)| s == src) {
        return done.clone().unwrap_or_else(|e| panic!("{e}"));
    }
    let name = Path::new(src).file_stem().unwrap().to_string_lossy().into_owned();
    let out = format!("{}/{name}", env!("CARGO_TARGET_TMPDIR"));
    let path = format!("{}/{src}", env!("CARGO_MANIFEST_DIR"));
    let done = match Command::new("cc").args(["-O2", "-o", &out, &path]).output() {
        Ok(o) if o.status.success() => Ok(out),
        Ok(o) => Err(format!("cc {path} failed: {}", String::from_utf8_lossy(&o.stderr))),
        Err(e) => Err(format!("cannot run cc (a C compiler, gcc): {e}; {DEPS}")),
    };
    built.push((src.to_string(), done.clone()));
    done.unwrap_or_else(|e| panic!("{e}"))
}

/// Run `argv` (a version probe) and return the first line it prints. If it cannot run or
/// fails, the test fails, saying what to install: a missing runtime never passes silently.
pub fn require(argv: &[&str], install: &str) -> String {
    let out = Command::new(argv[0]).args(&argv[1..]).stdin(Stdio::null()).output();
    let out = match out {
        Ok(o) if o.status.success() => o,
        Ok(o) => panic!(
            "`{}` failed ({}): {}\nmissing runtime: {install}; or {DEPS}",
            argv.join(" "),
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => panic!("cannot run `{}`: {e}\nmissing runtime: {install}; or {DEPS}", argv.join(" ")),
    };
    let text = if out.stdout.is_empty() { out.stderr } else { out.stdout };
    let version = String::from_utf8_lossy(&text).lines().next().unwrap_or_default().trim().to_string();
    eprintln!("runtime: {} -> {version}", argv.join(" "));
    version
}
