//! A launcher that dies abruptly (SIGKILL, the OOM killer) leaves nothing behind.
//!
//! PDEATHSIG reaches only a worker itself, not what the worker started: a server that forks its
//! own workers (Starman, a prefork PHP, a shell wrapper) would leave them running, holding the
//! port's sockets and answering with old code. So the launcher starts a *sentinel*: a small
//! process of its own binary (`reuse-launch __sentinel PID [--cgroup DIR]`, in a process group
//! of its own, so a terminal's Ctrl-C or a group kill meant for the launcher does not reach
//! it) that needs no privilege. The launcher's end of a pipe stays open for as long as the
//! launcher lives; what the sentinel knows comes from three sources:
//! - **the pipe**: every new worker writes `+PID\n` on it before it execs (`spawn`, step 1),
//!   so the sentinel knows each worker's process group (it leads one) before the worker can
//!   have started anything, whatever the timing of a SIGKILL; the launcher writes `-PID\n`
//!   when it has reaped one, and `q` when it exits in order;
//! - **the cgroup** (`--cgroup`, see `cgroup`): the root of the workers' cgroups; its
//!   `cgroup.kill` ends every process of every worker, detached or not, without a scan;
//! - **a scan**, without a cgroup only: every [`SCAN`] it notes every process below the
//!   launcher (by /proc's parent links; each with its start time, so a reused pid is never
//!   mistaken for one). The scan is incremental: /proc is listed (a few `getdents` calls) and
//!   only the processes not seen before (new inode of their /proc entry) are read, so its cost
//!   follows the number of new processes, not the number of workers.
//!
//! When the pipe reaches end of file while the launcher is gone, the sentinel writes the
//! cgroup's `cgroup.kill`, SIGKILLs every worker's process group and every noted process still
//! running and their groups, walking again until nothing is left, removes the cgroups, and
//! exits. When the launcher exits in order it has stopped its workers first and says so (`q`):
//! the sentinel ends what they left (a child in a session of its own) and exits.
//!
//! What can still escape: without a cgroup, a process that left its worker's process group
//! *and* was never seen by a scan (started less than [`SCAN`] before the launcher died); with
//! one, a process that moved itself to another cgroup. Anything started outside the tree (a
//! daemon such as `at`, `systemd-run`, a container engine) is not the launcher's.

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;

use crate::descendants::{descendants, pgid, running, Scanner};

/// The launcher's start time as the sentinel first saw it (tells it from a later owner of its pid).
static LAUNCHER_START: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();

/// How often the sentinel notes the launcher's descendants (without a cgroup).
pub const SCAN: Duration = Duration::from_millis(500);

/// The launcher's handle: the write end of the sentinel's pipe (dropped only with the launcher).
pub struct Sentinel {
    pid: u32,
    pipe: std::fs::File,
}

impl Sentinel {
    /// Start the sentinel for this process (`cgroup`: the workers' cgroups' root, see
    /// `cgroup`). A failure is logged: the launcher runs without.
    pub fn start(cgroup: Option<&Path>) -> Option<Sentinel> {
        let exe = std::env::current_exe().ok()?;
        let mut command = Command::new(exe);
        command.arg("__sentinel").arg(std::process::id().to_string());
        if let Some(dir) = cgroup {
            command.arg("--cgroup").arg(dir);
        }
        let spawned = command
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .env_remove("NOTIFY_SOCKET")
            .process_group(0)
            .spawn();
        match spawned {
            Ok(mut child) => {
                let pipe = child.stdin.take()?;
                // Not waited for here: the supervisor reaps it like any other child.
                Some(Sentinel::on(child.id(), std::fs::File::from(std::os::fd::OwnedFd::from(pipe))))
            }
            Err(e) => {
                log::warn!("cannot start the sentinel ({e}): a SIGKILLed launcher may leave workers' children behind");
                None
            }
        }
    }

    /// Writes never block the launcher: a sentinel that does not read loses records, not time.
    fn on(pid: u32, pipe: std::fs::File) -> Sentinel {
        let _ = crate::sys::set_nonblock(&pipe, true);
        Sentinel { pid, pipe }
    }

    /// The sentinel of an earlier image (`reexec`), by its pid and the pipe fd kept open.
    pub fn adopt(pid: u32, fd: std::os::fd::RawFd) -> Sentinel {
        crate::sys::set_cloexec(&[fd], true); // never a worker's: its end must close with us
                                              // SAFETY: the old image kept this pipe open across the exec for us; nothing else owns it.
        let pipe = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        Sentinel::on(pid, pipe)
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The pipe's write end, which must stay open across a reexec (and which each new worker
    /// writes its own `+PID` to, see `spawn`).
    pub fn pipe_fd(&self) -> std::os::fd::RawFd {
        self.pipe.as_raw_fd()
    }

    /// A worker the sentinel was not told of by the worker itself (a new sentinel's).
    pub fn started(&self, pid: i32) {
        let _ = (&self.pipe).write_all(format!("+{pid}\n").as_bytes());
    }

    /// The launcher reaped worker `pid` and killed its group: the sentinel may forget it.
    pub fn gone(&self, pid: i32) {
        let _ = (&self.pipe).write_all(format!("-{pid}\n").as_bytes());
    }

    /// The launcher exits in order (its workers are stopped): the sentinel may go.
    pub fn release(self) {
        let _ = (&self.pipe).write_all(b"q");
    }
}

use std::os::unix::process::CommandExt;

/// What the pipe says.
enum Msg {
    Started(i32),
    Gone(i32),
    Quit,
    Closed,
}

/// Read the pipe (stdin) into messages until it closes.
fn read_pipe(tx: crossbeam_channel::Sender<Msg>) {
    let mut buf = [0u8; 4096];
    let mut line = Vec::new();
    let mut stdin = std::io::stdin();
    loop {
        let n = match stdin.read(&mut buf) {
            Ok(n) if n > 0 => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            _ => return drop(tx.send(Msg::Closed)),
        };
        for &b in &buf[..n] {
            match b {
                b'q' => return drop(tx.send(Msg::Quit)),
                b'\n' => {
                    let text = String::from_utf8_lossy(&line);
                    let pid = text.get(1..).and_then(|p| p.parse::<i32>().ok()).filter(|p| *p > 1);
                    let msg = match (text.as_bytes().first(), pid) {
                        (Some(b'+'), Some(pid)) => Some(Msg::Started(pid)),
                        (Some(b'-'), Some(pid)) => Some(Msg::Gone(pid)),
                        _ => None,
                    };
                    if let Some(msg) = msg {
                        let _ = tx.send(msg);
                    }
                    line.clear();
                }
                _ if line.len() < 64 => line.push(b),
                _ => {}
            }
        }
    }
}

/// What the sentinel will end: the workers' process groups (leader pid -> its start time as
/// first seen), the noted processes (pid -> start time), the cgroup root.
#[derive(Default)]
struct Known {
    groups: HashMap<i32, Option<u64>>,
    noted: HashMap<i32, u64>,
    cgroup: Option<PathBuf>,
}

/// The sentinel process: `reuse-launch __sentinel LAUNCHER_PID [--cgroup DIR]`, its stdin the
/// launcher's pipe.
pub fn run(launcher: i32, cgroup: Option<PathBuf>) -> ! {
    // Ignore what a terminal or a group kill sends: only the pipe decides.
    for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP, Signal::SIGQUIT] {
        // SAFETY: SIG_IGN installs no handler code.
        let _ = unsafe { nix::sys::signal::signal(sig, nix::sys::signal::SigHandler::SigIgn) };
    }
    let me = std::process::id() as i32;
    let _ = LAUNCHER_START.set(running(launcher));
    let (tx, rx) = crossbeam_channel::unbounded::<Msg>();
    std::thread::spawn(move || read_pipe(tx));
    let mut known = Known { cgroup, ..Default::default() };
    let mut scanner = Scanner::default();
    // For tests: how many processes it would end now (noted, or in the cgroup), written to
    // this file every SCAN.
    let trace = std::env::var_os("REUSE_LAUNCH_SENTINEL_TRACE");
    let mut next = Instant::now();
    loop {
        let now = Instant::now();
        if now >= next {
            if known.cgroup.is_none() {
                scanner.scan(launcher, me, &mut known.noted);
            }
            if let Some(path) = &trace {
                let n = known.cgroup.as_deref().map_or(known.noted.len(), crate::cgroup::count);
                let _ = std::fs::write(path, n.to_string());
            }
            next = now + SCAN;
        }
        // With a cgroup and no trace nothing is periodic: wait for the pipe alone.
        let idle = known.cgroup.is_some() && trace.is_none();
        let wait = if idle { Duration::from_secs(3600) } else { next.saturating_duration_since(Instant::now()) };
        match rx.recv_timeout(wait) {
            Ok(Msg::Started(pid)) => {
                known.groups.insert(pid, running(pid));
            }
            Ok(Msg::Gone(pid)) => {
                known.groups.remove(&pid);
            }
            Ok(Msg::Quit) => {
                // The launcher exits in order, its workers stopped: end what they left (a child
                // in a session of its own escapes their group's kill) and go.
                end_all(launcher, me, known, false);
                std::process::exit(0)
            }
            Ok(Msg::Closed) | Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
        }
    }
    // The launcher is gone (or going): wait for it to be, then end what it left.
    let end = Instant::now() + Duration::from_secs(2);
    while running(launcher).is_some() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(10));
    }
    end_all(launcher, me, known, true);
    std::process::exit(0)
}

/// End everything `known` names: the cgroup (cgroup.kill), the workers' groups, and every
/// noted process still running below `launcher` and their groups, until none is left (at most
/// 50 rounds); then remove the cgroups.
fn end_all(launcher: i32, me: i32, known: Known, died: bool) {
    let Known { groups, mut noted, cgroup } = known;
    let in_cgroup = cgroup.as_deref().map_or(0, crate::cgroup::count);
    if let Some(root) = &cgroup {
        let _ = crate::cgroup::kill(root);
    }
    let mut killed: HashSet<i32> = HashSet::new();
    let trace = died || std::env::var_os("REUSE_LAUNCH_SENTINEL_TRACE").is_some();
    // Never a group the launcher or the sentinel belongs to (a launcher started by a shell,
    // `npm start` or `make` shares its parent's group).
    let protected: HashSet<i32> = [pgid(launcher), pgid(me), Some(launcher), Some(me)].into_iter().flatten().collect();
    // A worker's group, unless its leader's pid now belongs to another process (then the
    // group cannot be ours: a group keeps its leader's pid from reuse while it has members).
    let worker_groups: Vec<i32> = groups
        .iter()
        .filter(|(g, start)| match (running(**g), start) {
            (Some(now), Some(then)) => now == *then,
            _ => true,
        })
        .map(|(g, _)| *g)
        .filter(|g| !protected.contains(g))
        .collect();
    let launcher_start = LAUNCHER_START.get().copied().flatten();
    for round in 0..50 {
        for g in &worker_groups {
            let _ = killpg(Pid::from_raw(*g), Signal::SIGKILL);
        }
        // Below the launcher only while it is the same process: once it is gone its pid may be
        // another's, whose children are none of ours. What was noted before is enough then.
        let mut roots: HashSet<i32> =
            noted.iter().filter(|(p, s)| running(**p) == Some(**s)).map(|(p, _)| *p).collect();
        if launcher_start.is_some() && running(launcher) == launcher_start {
            roots.insert(launcher);
        }
        // Their children are re-parented as they die: follow them (one scan of /proc a round).
        if !roots.is_empty() {
            noted.extend(descendants(&roots, me));
        }
        let alive: Vec<i32> = noted.iter().filter(|(p, s)| running(**p) == Some(**s)).map(|(p, _)| *p).collect();
        if alive.is_empty() {
            break;
        }
        let groups: HashSet<i32> =
            alive.iter().filter_map(|p| pgid(*p)).filter(|g| *g > 1 && !protected.contains(g)).collect();
        for g in groups {
            let _ = killpg(Pid::from_raw(g), Signal::SIGKILL);
        }
        for p in &alive {
            let _ = kill(Pid::from_raw(*p), Signal::SIGKILL);
            if killed.insert(*p) && trace {
                let cmd = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
                let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
                eprintln!("reuse-launch: sentinel: killing pid {p} ({})", cmd.trim());
            }
        }
        std::thread::sleep(Duration::from_millis(if round == 0 { 5 } else { 20 }));
    }
    if let Some(root) = &cgroup {
        crate::cgroup::end(root, Duration::from_secs(2));
    }
    if !killed.is_empty() || in_cgroup > 0 {
        let why = if died { format!("the launcher (pid {launcher}) died") } else { "the launcher stops".to_string() };
        let cg = if cgroup.is_some() { format!(" and {in_cgroup} in its workers' cgroups") } else { String::new() };
        eprintln!("reuse-launch: sentinel: {why}; killed {} processes its workers left{cg}", killed.len());
    }
}
