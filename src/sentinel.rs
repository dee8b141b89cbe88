//! A launcher that dies abruptly (SIGKILL, the OOM killer) leaves nothing behind.
//!
//! PDEATHSIG reaches only a worker itself, not what the worker started: a server that forks its
//! own workers (Starman, a prefork PHP, a shell wrapper) would leave them running, holding the
//! port's sockets and answering with old code. So the launcher starts a *sentinel*: a small
//! process of its own binary (`reuse-launch __sentinel`, in a process group of its own, so a
//! terminal's Ctrl-C or a group kill meant for the launcher does not reach it) that needs no
//! privilege. It watches the launcher's descendants: every [`SCAN`] it notes every process below
//! the launcher (by walking /proc's parent links; each with its start time, so a reused pid is
//! never mistaken for one), and the launcher's end of a pipe stays open for as long as the
//! launcher lives. When that pipe reaches end of file while the launcher is gone, the sentinel
//! SIGKILLs every process it noted that still runs, and their process groups, walking again
//! until nothing is left, then exits. When the launcher exits normally it has stopped its
//! workers first and says so (`q` on the pipe): the sentinel exits without a look.
//!
//! What can still escape: a process that detached itself completely (double fork *and* a new
//! session) less than one scan before the launcher died; anything started outside the tree
//! (through a daemon such as `at`, `systemd-run` or a container engine). Under systemd,
//! `KillMode=mixed` (the example unit) also cleans the cgroup; in a container the death of
//! PID 1 ends everything.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;

/// The launcher's start time as the sentinel first saw it (tells it from a later owner of its pid).
static LAUNCHER_START: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();

/// How often the sentinel notes the launcher's descendants.
pub const SCAN: Duration = Duration::from_millis(500);

/// The launcher's handle: the write end of the sentinel's pipe (dropped only with the launcher).
pub struct Sentinel {
    pid: u32,
    pipe: std::fs::File,
}

impl Sentinel {
    /// Start the sentinel for this process. A failure is logged: the launcher runs without.
    pub fn start() -> Option<Sentinel> {
        let exe = std::env::current_exe().ok()?;
        let spawned = Command::new(exe)
            .arg("__sentinel")
            .arg(std::process::id().to_string())
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
                Some(Sentinel { pid: child.id(), pipe: std::fs::File::from(std::os::fd::OwnedFd::from(pipe)) })
            }
            Err(e) => {
                log::warn!("cannot start the sentinel ({e}): a SIGKILLed launcher may leave workers' children behind");
                None
            }
        }
    }

    /// The sentinel of an earlier image (`reexec`), by its pid and the pipe fd kept open.
    pub fn adopt(pid: u32, fd: std::os::fd::RawFd) -> Sentinel {
        crate::reexec::set_cloexec(&[fd], true); // never a worker's: its end must close with us
                                                 // SAFETY: the old image kept this pipe open across the exec for us; nothing else owns it.
        let pipe = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        Sentinel { pid, pipe }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The pipe's write end, which must stay open across a reexec.
    pub fn pipe_fd(&self) -> std::os::fd::RawFd {
        self.pipe.as_raw_fd()
    }

    /// The launcher exits in order (its workers are stopped): the sentinel may go.
    pub fn release(mut self) {
        use std::io::Write;
        let _ = self.pipe.write_all(b"q");
    }
}

use std::os::unix::process::CommandExt;

/// The sentinel process: `reuse-launch __sentinel LAUNCHER_PID`, its stdin the launcher's pipe.
pub fn run(launcher: i32) -> ! {
    // Ignore what a terminal or a group kill sends: only the pipe decides.
    for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP, Signal::SIGQUIT] {
        // SAFETY: SIG_IGN installs no handler code.
        let _ = unsafe { nix::sys::signal::signal(sig, nix::sys::signal::SigHandler::SigIgn) };
    }
    let me = std::process::id() as i32;
    let _ = LAUNCHER_START.set(running(launcher));
    let (tx, rx) = crossbeam_channel::bounded::<bool>(1);
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        let mut stdin = std::io::stdin();
        loop {
            match stdin.read(&mut buf) {
                Ok(n) if n > 0 && buf[..n].contains(&b'q') => {
                    let _ = tx.send(true);
                    return;
                }
                Ok(n) if n > 0 => continue,
                _ => {
                    let _ = tx.send(false);
                    return;
                }
            }
        }
    });
    let mut noted: HashMap<i32, u64> = HashMap::new();
    // For tests: how many processes the last scan noted, written to this file after each scan.
    let trace = std::env::var_os("REUSE_LAUNCH_SENTINEL_TRACE");
    loop {
        for (pid, start) in descendants(launcher, me) {
            noted.insert(pid, start);
        }
        noted.retain(|pid, start| running(*pid) == Some(*start));
        if let Some(path) = &trace {
            let _ = std::fs::write(path, noted.len().to_string());
        }
        match rx.recv_timeout(SCAN) {
            Ok(true) => {
                // The launcher exits in order, its workers stopped: end what they left (a child
                // in a session of its own escapes their group's kill) and go.
                end_all(launcher, me, noted, false);
                std::process::exit(0)
            }
            Ok(false) => break,
            Err(_) => {}
        }
    }
    // The launcher is gone (or going): wait for it to be, then end what it left.
    let end = Instant::now() + Duration::from_secs(2);
    while running(launcher).is_some() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(10));
    }
    end_all(launcher, me, noted, true);
    std::process::exit(0)
}

/// SIGKILL every noted process still running below `launcher`, and their groups, until none is
/// left (at most 50 rounds).
fn end_all(launcher: i32, me: i32, mut noted: HashMap<i32, u64>, died: bool) {
    let mut killed: HashSet<i32> = HashSet::new();
    let trace = died || std::env::var_os("REUSE_LAUNCH_SENTINEL_TRACE").is_some();
    // Never a group the launcher or the sentinel belongs to (a launcher started by a shell,
    // `npm start` or `make` shares its parent's group).
    let protected: HashSet<i32> = [pgid(launcher), pgid(me), Some(launcher), Some(me)].into_iter().flatten().collect();
    let launcher_start = LAUNCHER_START.get().copied().flatten();
    for round in 0..50 {
        // Below the launcher only while it is the same process: once it is gone its pid may be
        // another's, whose children are none of ours. What was noted before is enough then.
        if launcher_start.is_some() && running(launcher) == launcher_start {
            for (pid, start) in descendants(launcher, me) {
                noted.insert(pid, start);
            }
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
            // Their children are reparented; follow them through the next round's scan.
            for (child, start) in descendants(*p, me) {
                noted.insert(child, start);
            }
        }
        for p in &alive {
            if killed.insert(*p) && trace {
                let cmd = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
                let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
                eprintln!("reuse-launch: sentinel: killing pid {p} ({})", cmd.trim());
            }
        }
        std::thread::sleep(Duration::from_millis(if round == 0 { 5 } else { 20 }));
    }
    if !killed.is_empty() {
        let why = if died { format!("the launcher (pid {launcher}) died") } else { "the launcher stops".to_string() };
        eprintln!("reuse-launch: sentinel: {why}; killed {} processes its workers left", killed.len());
    }
}

/// Every process below `root` (not `root` itself, nor `except`), with its start time.
fn descendants(root: i32, except: i32) -> Vec<(i32, u64)> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    let mut parent: HashMap<i32, (i32, u64)> = HashMap::new();
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        if let Some((ppid, start)) = stat(pid).map(|s| (s.0, s.2)) {
            parent.insert(pid, (ppid, start));
        }
    }
    let mut out = Vec::new();
    for (&pid, &(_, start)) in &parent {
        if pid == root || pid == except {
            continue;
        }
        let mut p = pid;
        for _ in 0..64 {
            match parent.get(&p) {
                Some(&(pp, _)) if pp == root => {
                    out.push((pid, start));
                    break;
                }
                Some(&(pp, _)) if pp > 1 && pp != except => p = pp,
                _ => break,
            }
        }
    }
    out
}

/// (ppid, pgid, start time) from /proc/PID/stat.
fn stat(pid: i32) -> Option<(i32, i32, u64)> {
    stat_and_state(pid).map(|s| s.0)
}

fn stat_and_state(pid: i32) -> Option<((i32, i32, u64), bool)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let f: Vec<&str> = text.rsplit_once(')')?.1.split_whitespace().collect();
    let zombie = matches!(f.first(), Some(&"Z") | Some(&"X"));
    Some(((f.get(1)?.parse().ok()?, f.get(2)?.parse().ok()?, f.get(19)?.parse().ok()?), zombie))
}

/// The start time of `pid` if it runs (not a zombie).
fn running(pid: i32) -> Option<u64> {
    stat_and_state(pid).filter(|s| !s.1).map(|s| s.0 .2)
}

fn pgid(pid: i32) -> Option<i32> {
    stat(pid).map(|s| s.1)
}
