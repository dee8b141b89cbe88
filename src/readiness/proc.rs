//! The /proc readers behind `probe`: which syscall a thread is blocked in and on which fds
//! (`/proc/PID/task/TID/syscall`, and the poll/select sets in `/proc/PID/mem`), and which fds an
//! epoll set watches (`/proc/PID/fdinfo/EPFD`). Pure parsers plus the reads; the decisions are
//! the parent module's.

use std::fmt;
use std::fs::{self, File};
use std::io;
use std::os::fd::RawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Which process waits on which of its fds, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evidence {
    pub pid: i32,
    /// The fd number in that process (any dup of a listening socket).
    pub fd: RawFd,
    pub via: Via,
}

/// How a process waits for connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// Thread `tid` is blocked in `syscall` (`accept` or `accept4`) on the fd.
    Accept { tid: i32, syscall: &'static str },
    /// Thread `tid` is blocked in `syscall` (`poll` or `ppoll`) with the fd in its set, for reading.
    Poll { tid: i32, syscall: &'static str },
    /// Thread `tid` is blocked in `syscall` (`select` or `pselect6`) with the fd in its read set.
    Select { tid: i32, syscall: &'static str },
    /// The fd is registered for reading in the epoll set `epfd` of the process.
    Epoll { epfd: RawFd },
}

impl fmt::Display for Evidence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Evidence { pid, fd, via } = self;
        match via {
            Via::Accept { tid, syscall } => write!(f, "pid {pid} (thread {tid}) is blocked in {syscall} on fd {fd}"),
            Via::Poll { tid, syscall } | Via::Select { tid, syscall } => {
                write!(f, "pid {pid} (thread {tid}) is blocked in {syscall} with fd {fd} in its read set")
            }
            Via::Epoll { epfd } => write!(f, "pid {pid} has fd {fd} in its epoll set (fd {epfd}) for reading"),
        }
    }
}

/// Why one process gave no answer.
#[derive(Debug)]
pub(super) enum Fail {
    /// It does not exist (any more), or is a zombie: not a process to look at.
    Gone,
    /// It exists but /proc cannot tell.
    CantTell(String),
}

pub(super) fn fail(e: &io::Error, what: &str) -> Fail {
    match e.raw_os_error() {
        Some(libc::ENOENT | libc::ESRCH) => Fail::Gone,
        Some(libc::EACCES | libc::EPERM) => {
            Fail::CantTell(format!("cannot read {what}: permission denied (it needs ptrace access to the worker)"))
        }
        _ => Fail::CantTell(format!("cannot read {what}: {e}")),
    }
}

/// `socket:[12345]` -> 12345.
pub(super) fn socket_link_inode(link: &[u8]) -> Option<u64> {
    let digits = link.strip_prefix(b"socket:[")?.strip_suffix(b"]")?;
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// One registration of an epoll set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct EpollTarget {
    pub(super) fd: RawFd,
    pub(super) events: u32,
    pub(super) ino: u64,
}

/// The registrations listed in an epoll fd's fdinfo, one per line
/// `tfd: %8d events: %8x data: %16llx  pos:%lli ino:%lx sdev:%x` (events and ino in hex).
/// Keys may be followed by their value after a space or not; unknown keys are ignored.
pub(super) fn parse_epoll_fdinfo(text: &str) -> Vec<EpollTarget> {
    text.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("tfd:")?;
            let (mut fd, mut events, mut ino) = (None, None, None);
            let mut pending = Some("tfd");
            for token in rest.split_ascii_whitespace() {
                let (key, value) = match pending.take() {
                    Some(key) => (key, token),
                    None => match token.strip_suffix(':') {
                        Some(key) => {
                            pending = Some(key);
                            continue;
                        }
                        None => match token.split_once(':') {
                            Some(kv) => kv,
                            None => continue,
                        },
                    },
                };
                match key {
                    "tfd" => fd = value.parse().ok(),
                    "events" => events = u32::from_str_radix(value, 16).ok(),
                    "ino" => ino = u64::from_str_radix(value, 16).ok(),
                    _ => {}
                }
            }
            Some(EpollTarget { fd: fd?, events: events?, ino: ino? })
        })
        .collect()
}

/// What a thread is doing, from /proc/PID/task/TID/syscall.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Syscall {
    /// On a CPU: not waiting.
    Running,
    /// Blocked, but not in a system call (e.g. stopped, or in a page fault).
    Outside,
    /// Blocked in system call `nr` with these arguments.
    In { nr: libc::c_long, args: [u64; 6] },
}

/// `running`, `-1 SP PC`, or `NR ARG1 .. ARG6 SP PC` (NR decimal, the rest 0x-hex).
pub(super) fn parse_syscall(text: &str) -> Option<Syscall> {
    let mut fields = text.split_ascii_whitespace();
    let first = fields.next()?;
    if first == "running" {
        return Some(Syscall::Running);
    }
    let nr: libc::c_long = first.parse().ok()?;
    if nr < 0 {
        return Some(Syscall::Outside);
    }
    let mut args = [0u64; 6];
    for arg in &mut args {
        let field = fields.next()?;
        *arg = u64::from_str_radix(field.strip_prefix("0x").unwrap_or(field), 16).ok()?;
    }
    Some(Syscall::In { nr, args })
}

/// The kinds of blocking system call that can wait for a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Wait {
    Accept,
    Poll,
    Select,
}

#[cfg(target_arch = "x86_64")]
pub(super) const SYSCALLS_KNOWN: bool = true;
#[cfg(target_arch = "x86_64")]
pub(super) fn wait_syscall(nr: libc::c_long) -> Option<(Wait, &'static str)> {
    Some(match nr {
        43 => (Wait::Accept, "accept"),
        288 => (Wait::Accept, "accept4"),
        7 => (Wait::Poll, "poll"),
        271 => (Wait::Poll, "ppoll"),
        23 => (Wait::Select, "select"),
        270 => (Wait::Select, "pselect6"),
        _ => return None,
    })
}

/// The asm-generic table (no poll, no select: only their p-variants).
#[cfg(any(target_arch = "aarch64", target_arch = "riscv64", target_arch = "loongarch64"))]
pub(super) const SYSCALLS_KNOWN: bool = true;
#[cfg(any(target_arch = "aarch64", target_arch = "riscv64", target_arch = "loongarch64"))]
pub(super) fn wait_syscall(nr: libc::c_long) -> Option<(Wait, &'static str)> {
    Some(match nr {
        202 => (Wait::Accept, "accept"),
        242 => (Wait::Accept, "accept4"),
        73 => (Wait::Poll, "ppoll"),
        72 => (Wait::Select, "pselect6"),
        _ => return None,
    })
}

#[cfg(not(any(
    target_arch = "x86_64",
    target_arch = "aarch64",
    target_arch = "riscv64",
    target_arch = "loongarch64"
)))]
pub(super) const SYSCALLS_KNOWN: bool = false;
#[cfg(not(any(
    target_arch = "x86_64",
    target_arch = "aarch64",
    target_arch = "riscv64",
    target_arch = "loongarch64"
)))]
pub(super) fn wait_syscall(_nr: libc::c_long) -> Option<(Wait, &'static str)> {
    None
}

/// The raw text of /proc/PID/task/TID/syscall.
pub(super) fn read_syscall(pid: i32, tid: i32) -> Result<String, Fail> {
    let path = format!("/proc/{pid}/task/{tid}/syscall");
    fs::read_to_string(&path).map_err(|e| match fail(&e, &path) {
        // The thread is there but the file is not: a kernel without it.
        Fail::Gone if Path::new(&format!("/proc/{pid}/task/{tid}")).exists() => {
            Fail::CantTell(format!("{path} does not exist (kernel without CONFIG_HAVE_ARCH_TRACEHOOK?)"))
        }
        other => other,
    })
}

/// One thread of `pid`: is it blocked in a call that waits on one of `ours`?
pub(super) fn probe_thread(
    pid: i32,
    tid: i32,
    ours: &[(RawFd, u64)],
    mem: &mut Option<File>,
) -> Result<Option<Evidence>, Fail> {
    let text = read_syscall(pid, tid)?;
    let call = parse_syscall(&text)
        .ok_or_else(|| Fail::CantTell(format!("unexpected /proc/{pid}/task/{tid}/syscall: {}", text.trim())))?;
    let Syscall::In { nr, args } = call else { return Ok(None) };
    let Some((wait, syscall)) = wait_syscall(nr) else { return Ok(None) };
    let is_ours = |fd: RawFd| ours.iter().any(|&(f, _)| f == fd);
    if wait == Wait::Accept {
        let fd = args[0] as i32;
        return Ok(is_ours(fd).then_some(Evidence { pid, fd, via: Via::Accept { tid, syscall } }));
    }

    // poll/select: the fd set is in the worker's memory.
    let mem = match mem {
        Some(file) => file,
        None => {
            let path = format!("/proc/{pid}/mem");
            mem.insert(File::open(&path).map_err(|e| fail(&e, &path))?)
        }
    };
    let found = match wait {
        Wait::Poll => pollfds_for_reading(mem, args[0], args[1], &is_ours),
        _ => select_read_set(mem, args[0], args[1], ours),
    };
    // Trust what was read only if the thread is still in the very same call (same arguments,
    // stack and program counter): else the memory may already hold something else.
    let still = read_syscall(pid, tid)? == text;
    match found {
        _ if !still => Ok(None),
        Ok(Some(fd)) => {
            let via = if wait == Wait::Poll { Via::Poll { tid, syscall } } else { Via::Select { tid, syscall } };
            Ok(Some(Evidence { pid, fd, via }))
        }
        Ok(None) => Ok(None),
        Err(e) => Err(match fail(&e, &format!("/proc/{pid}/mem")) {
            Fail::Gone => Fail::Gone,
            Fail::CantTell(why) => Fail::CantTell(format!("{why} (the {syscall} set of thread {tid})")),
        }),
    }
}

/// Read exactly `buf.len()` bytes of the process's memory at `addr + offset`.
pub(super) fn read_mem(mem: &File, addr: u64, offset: u64, buf: &mut [u8]) -> io::Result<()> {
    let at = addr.checked_add(offset).ok_or_else(|| io::Error::from_raw_os_error(libc::EFAULT))?;
    mem.read_exact_at(buf, at)
}

/// `struct pollfd { int fd; short events; short revents; }`
pub(super) const POLLFD_SIZE: usize = 8;
/// Pollfds read per chunk (nfds is bounded by RLIMIT_NOFILE; this bounds the buffer).
pub(super) const POLLFD_CHUNK: usize = 4096;

/// The first fd of ours in the pollfd array at `addr` (`nfds` entries) that is polled for
/// reading.
pub(super) fn pollfds_for_reading(
    mem: &File,
    addr: u64,
    nfds: u64,
    is_ours: &dyn Fn(RawFd) -> bool,
) -> io::Result<Option<RawFd>> {
    let reading = (libc::POLLIN | libc::POLLRDNORM) as u16;
    let mut buf = vec![0u8; POLLFD_SIZE * POLLFD_CHUNK.min(nfds as usize)];
    let mut done = 0u64;
    while done < nfds {
        let n = (nfds - done).min(POLLFD_CHUNK as u64) as usize;
        let chunk = &mut buf[..n * POLLFD_SIZE];
        read_mem(mem, addr, done * POLLFD_SIZE as u64, chunk)?;
        for entry in chunk.chunks_exact(POLLFD_SIZE) {
            let fd = i32::from_ne_bytes([entry[0], entry[1], entry[2], entry[3]]);
            let events = u16::from_ne_bytes([entry[4], entry[5]]);
            if events & reading != 0 && is_ours(fd) {
                return Ok(Some(fd));
            }
        }
        done += n as u64;
    }
    Ok(None)
}

/// The first fd of ours set in the `fd_set` at `readfds` (an array of `unsigned long` bitmaps)
/// whose first `nfds` bits count; a null `readfds` is an empty set.
pub(super) fn select_read_set(mem: &File, nfds: u64, readfds: u64, ours: &[(RawFd, u64)]) -> io::Result<Option<RawFd>> {
    const WORD: usize = std::mem::size_of::<libc::c_ulong>();
    let nfds = nfds as i32; // the kernel takes an int
    if readfds == 0 {
        return Ok(None);
    }
    for &(fd, _) in ours {
        if fd >= nfds {
            continue;
        }
        let bit = fd as usize;
        let mut word = [0u8; WORD];
        read_mem(mem, readfds, (bit / (WORD * 8) * WORD) as u64, &mut word)?;
        if libc::c_ulong::from_ne_bytes(word) & (1 << (bit % (WORD * 8))) != 0 {
            return Ok(Some(fd));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_epoll_fdinfo() {
        let text = "pos:\t0\nflags:\t02000002\nmnt_id:\t17\nino:\t1038\n\
            tfd:        3 events:       19 data:     7fc000000003  pos:0 ino:42b7a sdev:9\n\
            tfd:       11 events:        4 data:                b  pos:0 ino:2edd7 sdev:f\n\
            tfd:12 events:1 data:0 pos:0 ino:ff sdev:9 extra: 7\n";
        assert_eq!(
            parse_epoll_fdinfo(text),
            vec![
                EpollTarget { fd: 3, events: 0x19, ino: 0x42b7a },
                EpollTarget { fd: 11, events: 0x4, ino: 0x2edd7 },
                EpollTarget { fd: 12, events: 0x1, ino: 0xff },
            ]
        );
        assert_eq!(parse_epoll_fdinfo("pos:\t0\nflags:\t02\n"), vec![]);
        assert_eq!(parse_epoll_fdinfo("tfd: 3 events: zz ino:1\n"), vec![]);
    }

    #[test]
    fn parses_syscall_lines() {
        assert_eq!(parse_syscall("running\n"), Some(Syscall::Running));
        assert_eq!(parse_syscall("-1 0x7ffd7c0cd168 0x7fc330328f63\n"), Some(Syscall::Outside));
        assert_eq!(
            parse_syscall("288 0x3 0x7ffd7c0cd1a0 0x7ffd7c0cd194 0x80000 0x0 0x0 0x7ffd7c0cd168 0x7fc330328f63\n"),
            Some(Syscall::In { nr: 288, args: [3, 0x7ffd7c0cd1a0, 0x7ffd7c0cd194, 0x80000, 0, 0] })
        );
        assert_eq!(parse_syscall(""), None);
        assert_eq!(parse_syscall("7 0x1 0x2\n"), None);
    }

    #[test]
    fn parses_socket_links() {
        assert_eq!(socket_link_inode(b"socket:[191959]"), Some(191959));
        assert_eq!(socket_link_inode(b"anon_inode:[eventpoll]"), None);
        assert_eq!(socket_link_inode(b"/tmp/socket:[1]"), None);
    }

    #[test]
    fn syscall_numbers_match_libc() {
        #[cfg(target_arch = "x86_64")]
        let table = [
            (libc::SYS_accept, "accept"),
            (libc::SYS_accept4, "accept4"),
            (libc::SYS_poll, "poll"),
            (libc::SYS_ppoll, "ppoll"),
            (libc::SYS_select, "select"),
            (libc::SYS_pselect6, "pselect6"),
        ];
        #[cfg(not(target_arch = "x86_64"))]
        let table = [
            (libc::SYS_accept, "accept"),
            (libc::SYS_accept4, "accept4"),
            (libc::SYS_ppoll, "ppoll"),
            (libc::SYS_pselect6, "pselect6"),
        ];
        for (nr, name) in table {
            assert_eq!(wait_syscall(nr).map(|w| w.1), Some(name));
        }
        assert_eq!(wait_syscall(libc::SYS_read), None);
    }
}
