//! Readiness by observation (`--ready auto`): is a worker actually waiting for connections on
//! one of its listening sockets? Answered from /proc alone, cheaply enough to ask every ~50 ms
//! while a worker starts.
//!
//! This module owns the detection only: [`socket_inodes`] names the launcher's listening sockets
//! by inode, [`groups_members`] lists the processes of a worker's process group, and [`probe`]
//! looks at those processes and answers [`Probe::Waiting`] (with the [`Evidence`]),
//! [`Probe::NotYet`], or [`Probe::Unknown`] when /proc cannot tell (the caller then falls back to
//! `--ready-delay`). What counts as waiting, for a process holding one of the sockets (under any
//! fd number: servers may dup them):
//! - **accept**: a thread blocked in `accept`/`accept4` on that fd
//!   (`/proc/PID/task/TID/syscall`: syscall number, then the arguments);
//! - **epoll**: the fd registered for reading (`EPOLLIN`) in one of the process's epoll sets
//!   (`/proc/PID/fdinfo/EPFD`, lines `tfd: 3 events: 19 data: .. pos:0 ino:2edd7 sdev:9`). A
//!   registration is enough: an event loop that registered its listener serves it as soon as it
//!   polls, whatever it is doing at the instant of the probe;
//! - **poll/ppoll, select/pselect6**: a thread blocked in one of them with that fd in its read
//!   set. The set lives in the worker's memory: it is read from `/proc/PID/mem` at the syscall's
//!   pointer argument, and trusted only if the thread is still in the same call afterwards.
//!
//! Limits:
//! - Syscall numbers are known for x86_64 (accept 43, accept4 288, poll 7, ppoll 271, select 23,
//!   pselect6 270) and the asm-generic arches aarch64, riscv64 and loongarch64 (accept 202,
//!   accept4 242, ppoll 73, pselect6 72). Elsewhere only epoll is seen; a process seen through
//!   nothing else is [`Probe::Unknown`]. A 32-bit (ia32) worker on x86_64 reports ia32 syscall
//!   numbers, which are not decoded: only its epoll sets are seen.
//! - `/proc/PID/fd`, `fdinfo`, `syscall` and `mem` need ptrace access to the worker (same uid and
//!   a permissive Yama scope, or CAP_SYS_PTRACE): without it the answer is Unknown.
//! - A process that holds one of the sockets and an io_uring instance, and shows no other sign
//!   of waiting, is Unknown: io_uring's pending accepts and polls are not in /proc.
//! - A thread that waits on the socket through an epoll set is seen by the registration, not by
//!   the wait: a worker that registers its listener long before it first polls is ready early.
//! - A worker that ignores the inherited sockets and listens on sockets of its own is never
//!   waiting on ours (NotYet until `--ready-timeout`).

use std::fs;
use std::io;
use std::os::fd::RawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use nix::sys::signal::kill;
use nix::unistd::{getpgid, Pid};

mod proc;
#[cfg(test)]
use proc::*;
use proc::{fail, parse_epoll_fdinfo, probe_thread, socket_link_inode, Fail, SYSCALLS_KNOWN};
pub use proc::{Evidence, Via};

/// What /proc says about a worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// Some process of the worker waits for connections on one of its listening sockets.
    Waiting(Evidence),
    /// None does (yet).
    NotYet,
    /// /proc cannot tell; why, in a few words (to be logged once before falling back to the
    /// delay).
    Unknown(String),
}

/// The socket inode numbers of the launcher's listening fds (`st_ino`, as /proc shows them in
/// `socket:[INODE]`). Fails if an fd is not open or not a socket.
pub fn socket_inodes(fds: &[RawFd]) -> io::Result<Vec<u64>> {
    fds.iter()
        .map(|fd| {
            // stat() of /proc/self/fd/N is fstat(N) (the link resolves to the open file itself),
            // without borrowing a RawFd unsafely.
            let meta = fs::metadata(format!("/proc/self/fd/{fd}"))?;
            if !meta.file_type().is_socket() {
                return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("fd {fd} is not a socket")));
            }
            Ok(meta.ino())
        })
        .collect()
}

/// The pids of every process in process group `pgid` (a worker and whatever it started, unless
/// they moved to groups of their own): each pid listed in /proc whose `getpgid(2)` is `pgid`
/// (the pgrp field of /proc/PID/stat, at a fraction of the cost of formatting that file).
/// Processes that vanish during the scan are left out.
///
/// `pgid` itself (the worker, which lives until the launcher reaps it) is always in the list,
/// even when /proc does not show it (not mounted, hidepid): [`probe`] then says Unknown rather
/// than NotYet. (The launcher uses the batch form, [`groups_members`].)
#[cfg(test)]
pub fn group_members(pgid: i32) -> Vec<i32> {
    groups_members(&[pgid]).pop().unwrap_or_default()
}

/// The members of each of `pgids`' process groups (in that order), from one scan of /proc: for several
/// starting workers at once, this costs one scan instead of one per worker. A worker with a
/// cgroup of its own (see `cgroup`) is read from it instead (everything it started, in its group
/// or not), and when every one has, /proc is not scanned at all.
pub fn groups_members(pgids: &[i32]) -> Vec<Vec<i32>> {
    if pgids.is_empty() {
        return Vec::new(); // nothing to look for: no scan of /proc
    }
    let mut members: Vec<Vec<i32>> = pgids.iter().map(|&pgid| vec![pgid]).collect();
    let from_cgroup: Vec<bool> = pgids
        .iter()
        .zip(&mut members)
        .map(|(&pgid, m)| match crate::cgroup::procs_of(pgid) {
            Some(procs) => {
                m.extend(procs.into_iter().filter(|p| *p != pgid));
                true
            }
            None => false,
        })
        .collect();
    let scan = from_cgroup.iter().any(|c| !c);
    if let Some(dir) = fs::read_dir("/proc").ok().filter(|_| scan) {
        // The groups to fill from the scan, by pgid (a lookup per process, not a pass over
        // every worker: at 1,024 workers and 2,000 processes that was 4 million comparisons).
        let mut wanted: std::collections::HashMap<i32, Vec<usize>> = std::collections::HashMap::new();
        for (i, &pgid) in pgids.iter().enumerate().filter(|(i, _)| !from_cgroup[*i]) {
            wanted.entry(pgid).or_default().push(i);
        }
        let leaders: std::collections::HashSet<i32> = pgids.iter().copied().collect();
        for pid in dir.filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok()) {
            if leaders.contains(&pid) {
                continue; // a leader: listed already
            }
            let Ok(pgrp) = getpgid(Some(Pid::from_raw(pid))) else { continue };
            for &i in wanted.get(&pgrp.as_raw()).into_iter().flatten() {
                members[i].push(pid);
            }
        }
    }
    for m in &mut members {
        m.sort_unstable();
    }
    members
}

/// Is any process of `pids` (a worker's group members: see [`groups_members`]) waiting for
/// connections on one of the sockets `inodes` (see [`socket_inodes`])?
///
/// Waiting wins over Unknown, Unknown over NotYet: one process that cannot be read makes the
/// answer Unknown unless another one is seen waiting. Processes that are gone (or exit during
/// the probe) are skipped.
pub fn probe(pids: &[i32], inodes: &[u64]) -> Probe {
    if inodes.is_empty() {
        return Probe::Unknown("no listening socket to look for".into());
    }
    let mut unknown = None;
    for &pid in pids {
        match probe_pid(pid, inodes) {
            Ok(Some(evidence)) => return Probe::Waiting(evidence),
            Ok(None) | Err(Fail::Gone) => {}
            Err(Fail::CantTell(why)) => {
                unknown.get_or_insert(why);
            }
        }
    }
    unknown.map_or(Probe::NotYet, Probe::Unknown)
}

/// One process: Ok(Some) if it waits on one of `inodes`, Ok(None) if it does not. First its
/// epoll sets, then its threads' system calls; what could not be read makes the answer
/// CantTell unless something else shows it waiting.
fn probe_pid(pid: i32, inodes: &[u64]) -> Result<Option<Evidence>, Fail> {
    let fds = scan_fds(pid, inodes)?;
    if fds.ours.is_empty() {
        return Ok(None);
    }
    let mut cant_tell = None;
    if let Some(evidence) = probe_epolls(pid, &fds, &mut cant_tell) {
        return Ok(Some(evidence));
    }
    if !SYSCALLS_KNOWN {
        return Err(Fail::CantTell(format!(
            "syscall numbers of this architecture ({}) are not known; only epoll sets are seen",
            std::env::consts::ARCH
        )));
    }
    if let Some(evidence) = probe_threads(pid, &fds.ours, &mut cant_tell)? {
        return Ok(Some(evidence));
    }
    if let Some(why) = cant_tell {
        return Err(Fail::CantTell(why));
    }
    if fds.uring {
        return Err(Fail::CantTell(format!(
            "pid {pid} uses io_uring, whose pending accepts and polls /proc does not show"
        )));
    }
    Ok(None)
}

/// What a process's fds say: our sockets among them (fd, inode), its epoll sets, and whether
/// it has an io_uring.
struct Fds {
    ours: Vec<(RawFd, u64)>,
    epolls: Vec<RawFd>,
    uring: bool,
}

/// Read `/proc/PID/fd`: which fds hold one of `inodes`, which are epoll sets or io_urings.
fn scan_fds(pid: i32, inodes: &[u64]) -> Result<Fds, Fail> {
    let fd_dir = format!("/proc/{pid}/fd");
    let entries = fs::read_dir(&fd_dir).map_err(|e| match fail(&e, &fd_dir) {
        Fail::Gone => gone_or_hidden(pid),
        other => other,
    })?;
    let mut fds = Fds { ours: Vec::new(), epolls: Vec::new(), uring: false };
    for entry in entries {
        let Ok(entry) = entry else { continue };
        let Some(fd) = entry.file_name().to_str().and_then(|s| s.parse::<RawFd>().ok()) else { continue };
        // Unreadable link: the fd was closed meanwhile.
        let Ok(target) = fs::read_link(entry.path()) else { continue };
        let target = target.as_os_str().as_bytes();
        if let Some(ino) = socket_link_inode(target) {
            if inodes.contains(&ino) {
                fds.ours.push((fd, ino));
            }
        } else if target == b"anon_inode:[eventpoll]" {
            fds.epolls.push(fd);
        } else if target == b"anon_inode:[io_uring]" {
            fds.uring = true;
        }
    }
    Ok(fds)
}

/// One of the process's epoll sets with one of our fds registered for reading, if any; an
/// fdinfo that cannot be read leaves its reason in `cant_tell` (the first one kept).
fn probe_epolls(pid: i32, fds: &Fds, cant_tell: &mut Option<String>) -> Option<Evidence> {
    for &epfd in &fds.epolls {
        let path = format!("/proc/{pid}/fdinfo/{epfd}");
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) => match fail(&e, &path) {
                Fail::Gone => continue, // closed meanwhile, or the process is gone
                Fail::CantTell(why) => {
                    cant_tell.get_or_insert(why);
                    continue;
                }
            },
        };
        // The registration must still name the fd that holds our socket: epoll keeps an entry
        // until the *file* is released, and the launcher holds the file, so an fd the worker
        // closed may linger in its set.
        let registered = parse_epoll_fdinfo(&text)
            .into_iter()
            .find(|t| t.events & (libc::EPOLLIN | libc::EPOLLRDNORM) as u32 != 0 && fds.ours.contains(&(t.fd, t.ino)));
        if let Some(t) = registered {
            return Some(Evidence { pid, fd: t.fd, via: Via::Epoll { epfd } });
        }
    }
    None
}

/// One of the process's threads blocked in accept, poll or select on one of `ours`, if any;
/// a thread that cannot be read leaves its reason in `cant_tell` (the first one kept).
fn probe_threads(pid: i32, ours: &[(RawFd, u64)], cant_tell: &mut Option<String>) -> Result<Option<Evidence>, Fail> {
    let task_dir = format!("/proc/{pid}/task");
    let tasks = fs::read_dir(&task_dir).map_err(|e| fail(&e, &task_dir))?;
    let mut mem = None;
    for task in tasks {
        let Ok(task) = task else { continue };
        let Some(tid) = task.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        match probe_thread(pid, tid, ours, &mut mem) {
            Ok(Some(evidence)) => return Ok(Some(evidence)),
            Ok(None) | Err(Fail::Gone) => {}
            Err(Fail::CantTell(why)) => {
                cant_tell.get_or_insert(why);
            }
        }
    }
    Ok(None)
}

/// /proc/PID has no such entry: the process is gone, unless it is alive and /proc does not
/// show it (no /proc mounted, or hidepid).
fn gone_or_hidden(pid: i32) -> Fail {
    if Path::new(&format!("/proc/{pid}")).exists() {
        return Fail::Gone; // a zombie, or exiting right now
    }
    match kill(Pid::from_raw(pid), None) {
        Ok(()) | Err(nix::errno::Errno::EPERM) => {
            Fail::CantTell(format!("pid {pid} is alive but not in /proc (/proc not mounted, or mounted with hidepid?)"))
        }
        Err(_) => Fail::Gone,
    }
}

#[cfg(test)]
mod tests;
