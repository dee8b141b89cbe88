//! Answering one trapped `bind` or `listen` of a worker: read the call, decide, act.
//!
//! The caller's memory and fd table are untrusted input. What is read and how it is checked:
//! - `bind(fd, addr, len)`: `len` must be 0..=128 (the kernel's `sockaddr_storage`); the address
//!   is read with `process_vm_readv` (a bad pointer fails the read); the family must be AF_INET
//!   with 16 bytes or more, or AF_INET6 with 24 or more. Anything else, a port the launcher does
//!   not bind, port 0, or a socket that is not TCP (the protocol sockfs names for the caller's
//!   fd, `system.sockprotoname` of its `/proc/TID/fd` link) is **continued**: the kernel runs
//!   the call as the worker made it and gives the error it would give (EFAULT, EINVAL, EBADF,
//!   ENOTSOCK, EADDRINUSE, ...). The caller's fd flags come from `/proc/TID/fdinfo`.
//! - `listen(fd, backlog)`: the caller's fd is named by its `/proc/TID/fd` link; a socket of
//!   the launcher's gets 0 without reaching the kernel (its backlog stays the launcher's), any
//!   other is continued.
//!
//! What a taken bind does: the caller's fd becomes the slot's socket (`SECCOMP_IOCTL_NOTIF_ADDFD`
//! with `SECCOMP_ADDFD_FLAG_SETFD`, replacing the worker's own socket on the same fd number, with
//! close-on-exec as the worker's fd had it), then the socket's open file gets the worker's
//! `O_NONBLOCK` setting, and the call returns 0 (`SECCOMP_IOCTL_NOTIF_SEND`). The only fds ever
//! installed are the worker entry's own dups of its slot's sockets, so a worker can obtain no
//! other socket and no other fd of the launcher. The socket's family must match the address's
//! (the kernel refuses the other), and MPTCP sockets are taken over like TCP ones (they fall
//! back to TCP with a client that does not speak MPTCP, which the launcher's socket is).
//!
//! Nothing here depends on a decision the worker could invalidate by changing its memory after
//! the read: a continued call is the worker's own call, and a taken bind gives the worker its
//! own slot's socket, which it could also use from fd 3.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use nix::sys::uio::{process_vm_readv, RemoteIoVec};
use nix::unistd::Pid;

mod answer;
mod parse;
pub use answer::carry_out;
pub use parse::{choose, fdinfo_flags, parse_sockaddr, socket_link_inode};

/// One listening socket a worker of the slot may get: the public address it stands for (the
/// port a worker binds), the launcher's socket (a dup of its own, held by the worker's entry),
/// and its inode.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    pub sock: Arc<OwnedFd>,
    pub ino: u64,
}

/// What to answer a trapped call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Let the kernel run the call as made.
    Continue,
    /// Return this value without running it.
    Return(i64),
    /// Put `targets[target]` on the caller's fd `newfd`, then return 0 (`want`: the address
    /// the caller asked for).
    Install { target: usize, newfd: i32, cloexec: bool, nonblock: bool, want: SocketAddr },
    /// The caller is gone (killed while it waited).
    Gone,
}

/// What carrying out an `Install` changed besides the caller's fd.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Done {
    /// The slot's socket's O_NONBLOCK was switched to this (its open file is shared).
    pub flipped_nonblock: Option<bool>,
}

/// One trapped call as read from the notification fd.
pub struct Call {
    pub id: u64,
    /// The calling thread, in the launcher's pid namespace.
    pub tid: i32,
    pub nr: i64,
    pub args: [u64; 6],
}

pub fn name(nr: i64) -> &'static str {
    if nr == libc::SYS_bind {
        "bind()"
    } else {
        "listen()"
    }
}

/// Read the next trapped call. Ok(None): it was withdrawn (the caller was killed meanwhile).
pub fn receive(notif: BorrowedFd) -> io::Result<Option<Call>> {
    // SAFETY: the kernel requires a zeroed struct (it checks), and fills it.
    let mut n: libc::seccomp_notif = unsafe { std::mem::zeroed() };
    // SAFETY: ioctl on an open seccomp notification fd with a struct of the size its number encodes.
    let r = unsafe { libc::ioctl(notif.as_raw_fd(), libc::SECCOMP_IOCTL_NOTIF_RECV, &mut n) };
    if r != 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENOENT) => Ok(None),
            _ => Err(e),
        };
    }
    Ok(Some(Call { id: n.id, tid: n.pid as i32, nr: n.data.nr as i64, args: n.data.args }))
}

/// Is the call still waiting for its answer (so the tid still names its thread)?
pub fn still_waiting(notif: BorrowedFd, id: u64) -> bool {
    // SAFETY: ioctl on an open seccomp notification fd with a pointer to a u64.
    unsafe { libc::ioctl(notif.as_raw_fd(), libc::SECCOMP_IOCTL_NOTIF_ID_VALID, &id) == 0 }
}

/// Decide how to answer `call`, a worker of the slot whose sockets are `targets`; with why a
/// bind of a launcher's port could not be taken over, if that is the case.
pub fn decide(notif: BorrowedFd, call: &Call, targets: &[Target]) -> (Decision, Option<String>) {
    if call.nr == libc::SYS_bind {
        decide_bind(notif, call, targets)
    } else if call.nr == libc::SYS_listen {
        (decide_listen(notif, call, targets), None)
    } else {
        (Decision::Continue, None)
    }
}

fn decide_bind(notif: BorrowedFd, call: &Call, targets: &[Target]) -> (Decision, Option<String>) {
    let pass = (Decision::Continue, None);
    // The kernel reads fd and len as C ints.
    let fd = call.args[0] as u32 as i32;
    let len = call.args[2] as u32 as i32;
    if fd < 0 || !(0..=128).contains(&len) {
        return pass;
    }
    let mut bytes = [0u8; 128];
    let bytes = &mut bytes[..len as usize];
    let remote = [RemoteIoVec { base: call.args[1] as usize, len: bytes.len() }];
    match process_vm_readv(Pid::from_raw(call.tid), &mut [io::IoSliceMut::new(bytes)], &remote) {
        Ok(n) if n == len as usize => {}
        Ok(_) | Err(nix::errno::Errno::EFAULT) => return pass,
        Err(_) if !still_waiting(notif, call.id) => return (Decision::Gone, None),
        Err(e) => {
            let why = format!("bind() goes to the kernel: its address cannot be read (process_vm_readv: {})", e.desc());
            return (Decision::Continue, Some(why));
        }
    }
    let Some(want) = parse_sockaddr(bytes) else { return pass };
    let Some(target) = choose(targets, &want) else { return pass };
    let seen = match Socket::of(call.tid, fd) {
        Ok(Some(seen)) => seen,
        // Not open (the kernel says EBADF), not a socket (ENOTSOCK), or changed under us.
        Ok(None) => return pass,
        Err(_) if !still_waiting(notif, call.id) => return (Decision::Gone, None),
        Err(e) => return (Decision::Continue, Some(format!("bind() of {want} goes to the kernel: {e}"))),
    };
    if !still_waiting(notif, call.id) {
        return (Decision::Gone, None);
    }
    let v6 = match seen.proto.as_str() {
        "TCP" | "MPTCP" => false,
        "TCPv6" | "MPTCPv6" => true,
        _ => return pass, // UDP, SCTP, raw: the worker's own business
    };
    if v6 != want.is_ipv6() {
        return pass; // an address of the other family: the kernel's EINVAL or EAFNOSUPPORT
    }
    if seen.ino == targets[target].ino {
        // Already that socket (a bind restarted after a signal, or bound twice): done.
        return (Decision::Return(0), None);
    }
    let nonblock = seen.flags.is_some_and(|f| f & libc::O_NONBLOCK as u32 != 0);
    let cloexec = seen.flags.is_none_or(|f| f & libc::O_CLOEXEC as u32 != 0);
    (Decision::Install { target, newfd: fd, cloexec, nonblock, want }, None)
}

/// What a worker's fd is, seen through /proc without following it into any file system but
/// sockfs: the link must name a socket, and it is looked at through an `O_PATH` fd of our own
/// that pins the very file the link named (a worker that swaps the fd meanwhile changes
/// nothing here, and a file of its own FUSE mount is never read).
struct Socket {
    ino: u64,
    /// sockfs's name of the protocol: `TCP`, `TCPv6`, `UDP`, `UNIX`, `MPTCP`, ...
    proto: String,
    /// The `flags:` of its fdinfo (the file's status flags, and O_CLOEXEC for the fd).
    flags: Option<u32>,
}

impl Socket {
    /// Ok(None): not an open socket (the kernel will say what it is).
    fn of(tid: i32, fd: i32) -> io::Result<Option<Socket>> {
        let link = format!("/proc/{tid}/fd/{fd}");
        let target = match std::fs::read_link(&link) {
            Ok(t) => t,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
            Err(e) => return Err(io::Error::new(e.kind(), format!("{link}: {e}"))),
        };
        let target = target.to_string_lossy().into_owned();
        let Some(ino) = socket_link_inode(&target) else { return Ok(None) };
        use nix::fcntl::{open, OFlag};
        let pinned: OwnedFd = match open(link.as_str(), OFlag::O_PATH | OFlag::O_CLOEXEC, nix::sys::stat::Mode::empty())
        {
            Ok(f) => f,
            Err(nix::errno::Errno::ENOENT) => return Ok(None),
            Err(e) => return Err(io::Error::other(format!("{link}: {}", e.desc()))),
        };
        let ours = format!("/proc/self/fd/{}", pinned.as_raw_fd());
        if std::fs::read_link(&ours).map(|t| t.to_string_lossy().into_owned()).ok().as_deref() != Some(target.as_str())
        {
            return Ok(None);
        }
        let proto = sock_proto_name(&ours)?;
        let flags = std::fs::read_to_string(format!("/proc/{tid}/fdinfo/{fd}")).ok().and_then(|t| fdinfo_flags(&t));
        Ok(Some(Socket { ino, proto, flags }))
    }
}

/// The protocol of the socket a `/proc/self/fd` link names (`TCP`, `TCPv6`, `UDP`, `UNIX`,
/// ...): sockfs's `system.sockprotoname` attribute.
fn sock_proto_name(link: &str) -> io::Result<String> {
    let path = std::ffi::CString::new(link).map_err(io::Error::other)?;
    let mut buf = [0u8; 32];
    // SAFETY: both strings are NUL-terminated and the buffer's length is passed with it.
    let n =
        unsafe { libc::getxattr(path.as_ptr(), c"system.sockprotoname".as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("cannot name the socket's protocol: {e}")));
    }
    let name = &buf[..n as usize];
    Ok(String::from_utf8_lossy(name.strip_suffix(&[0]).unwrap_or(name)).into_owned())
}

fn decide_listen(notif: BorrowedFd, call: &Call, targets: &[Target]) -> Decision {
    let fd = call.args[0] as u32 as i32;
    if fd < 0 {
        return Decision::Continue;
    }
    let Ok(link) = std::fs::read_link(format!("/proc/{}/fd/{fd}", call.tid)) else { return Decision::Continue };
    let ours = socket_link_inode(&link.to_string_lossy()).is_some_and(|ino| targets.iter().any(|t| t.ino == ino));
    if !still_waiting(notif, call.id) {
        return Decision::Gone;
    }
    if ours {
        Decision::Return(0)
    } else {
        Decision::Continue
    }
}
