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
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::Arc;

use nix::sys::uio::{process_vm_readv, RemoteIoVec};
use nix::unistd::Pid;

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

/// Carry out `decision` for call `id`: Ok(Some) once answered, Ok(None) when the caller was
/// gone.
pub fn carry_out(notif: BorrowedFd, id: u64, decision: Decision, targets: &[Target]) -> io::Result<Option<Done>> {
    let mut done = Done::default();
    let sent = match decision {
        Decision::Gone => return Ok(None),
        Decision::Continue => respond(notif, id, 0, 0, libc::SECCOMP_USER_NOTIF_FLAG_CONTINUE as u32),
        Decision::Return(v) => respond(notif, id, v, 0, 0),
        Decision::Install { target, newfd, cloexec, nonblock, .. } => {
            let t = &targets[target];
            match add_fd(notif, id, t.sock.as_raw_fd(), newfd, cloexec) {
                Ok(()) => {
                    done.flipped_nonblock = set_nonblock(&t.sock, nonblock);
                    respond(notif, id, 0, 0, 0)
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Err(e),
                Err(e) => {
                    // Tell the caller what failed rather than leave it waiting.
                    let _ = respond(notif, id, 0, -e.raw_os_error().unwrap_or(libc::EIO), 0);
                    return Err(e);
                }
            }
        }
    };
    match sent {
        Ok(()) => Ok(Some(done)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

fn respond(notif: BorrowedFd, id: u64, val: i64, error: i32, flags: u32) -> io::Result<()> {
    let resp = libc::seccomp_notif_resp { id, val, error, flags };
    // SAFETY: ioctl on an open seccomp notification fd with a struct of the size its number encodes.
    if unsafe { libc::ioctl(notif.as_raw_fd(), libc::SECCOMP_IOCTL_NOTIF_SEND, &resp) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn add_fd(notif: BorrowedFd, id: u64, src: RawFd, newfd: i32, cloexec: bool) -> io::Result<()> {
    let req = libc::seccomp_notif_addfd {
        id,
        flags: libc::SECCOMP_ADDFD_FLAG_SETFD as u32,
        srcfd: src as u32,
        newfd: newfd as u32,
        newfd_flags: if cloexec { libc::O_CLOEXEC as u32 } else { 0 },
    };
    // SAFETY: ioctl on an open seccomp notification fd with a struct of the size its number
    // encodes; `src` is the worker entry's own dup of one of its slot's sockets.
    if unsafe { libc::ioctl(notif.as_raw_fd(), libc::SECCOMP_IOCTL_NOTIF_ADDFD, &req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Give the socket's open file (shared by the launcher and every worker of the slot) the
/// worker's own O_NONBLOCK setting: an event loop expects the fd it made non-blocking to be
/// so. Returns the new setting when it changed.
fn set_nonblock(sock: &OwnedFd, on: bool) -> Option<bool> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = OFlag::from_bits_truncate(fcntl(sock, FcntlArg::F_GETFL).ok()?);
    if flags.contains(OFlag::O_NONBLOCK) == on {
        return None;
    }
    fcntl(sock, FcntlArg::F_SETFL(flags ^ OFlag::O_NONBLOCK)).ok().map(|_| on)
}

/// The address in the bytes a worker passed to bind(): AF_INET (16 bytes or more) or AF_INET6
/// (24 or more, as the kernel requires); None for anything else.
pub fn parse_sockaddr(b: &[u8]) -> Option<SocketAddr> {
    if b.len() < 2 {
        return None;
    }
    let family = i32::from(u16::from_ne_bytes([b[0], b[1]]));
    let port = || u16::from_be_bytes([b[2], b[3]]);
    match family {
        libc::AF_INET if b.len() >= 16 => Some(SocketAddr::new(Ipv4Addr::new(b[4], b[5], b[6], b[7]).into(), port())),
        libc::AF_INET6 if b.len() >= 24 => {
            let ip: [u8; 16] = b[8..24].try_into().ok()?;
            let scope = b.get(24..28).map_or(0, |s| u32::from_ne_bytes([s[0], s[1], s[2], s[3]]));
            Some(SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::from(ip), port(), 0, scope)))
        }
        _ => None,
    }
}

/// Which target a bind of `want` gets: the same port, then the same address, else the same
/// family (an IPv4-mapped address counts as IPv4), else the first bind of that port. None when
/// the port is 0 or no target has it.
pub fn choose(targets: &[Target], want: &SocketAddr) -> Option<usize> {
    if want.port() == 0 {
        return None;
    }
    let plain = |ip: IpAddr| match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    let same_port: Vec<usize> = (0..targets.len()).filter(|i| targets[*i].addr.port() == want.port()).collect();
    let ip = plain(want.ip());
    let exact = same_port.iter().find(|i| plain(targets[**i].addr.ip()) == ip);
    let family = same_port.iter().find(|i| plain(targets[**i].addr.ip()).is_ipv4() == ip.is_ipv4());
    exact.or(family).or(same_port.first()).copied()
}

/// The `flags:` field (octal) of a /proc/PID/fdinfo/FD text; it shows O_CLOEXEC for an fd
/// marked close-on-exec.
pub fn fdinfo_flags(text: &str) -> Option<u32> {
    text.lines().find_map(|l| l.strip_prefix("flags:")).and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
}

/// `socket:[12345]` -> 12345.
pub fn socket_link_inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(addr: &str, fd: u64) -> Target {
        let sock = Arc::new(OwnedFd::from(std::fs::File::open("/dev/null").unwrap()));
        Target { addr: addr.parse().unwrap(), sock, ino: fd + 100 }
    }

    fn v4(ip: [u8; 4], port: u16) -> Vec<u8> {
        let mut b = vec![0u8; 16];
        b[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        b[2..4].copy_from_slice(&port.to_be_bytes());
        b[4..8].copy_from_slice(&ip);
        b
    }

    fn v6(ip: Ipv6Addr, port: u16, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; 28];
        b[..2].copy_from_slice(&(libc::AF_INET6 as u16).to_ne_bytes());
        b[2..4].copy_from_slice(&port.to_be_bytes());
        b[8..24].copy_from_slice(&ip.octets());
        b.truncate(len);
        b
    }

    #[test]
    fn sockaddrs_of_each_family_and_length() {
        assert_eq!(parse_sockaddr(&v4([127, 0, 0, 1], 8080)), Some("127.0.0.1:8080".parse().unwrap()));
        assert_eq!(parse_sockaddr(&v4([0, 0, 0, 0], 80)[..15]), None, "short AF_INET");
        assert_eq!(parse_sockaddr(&v6(Ipv6Addr::UNSPECIFIED, 8080, 28)), Some("[::]:8080".parse().unwrap()));
        assert_eq!(
            parse_sockaddr(&v6(Ipv6Addr::LOCALHOST, 9, 24)),
            Some("[::1]:9".parse().unwrap()),
            "RFC 2133 length"
        );
        assert_eq!(parse_sockaddr(&v6(Ipv6Addr::LOCALHOST, 9, 23)), None, "short AF_INET6");
        let mut unix = vec![0u8; 20];
        unix[..2].copy_from_slice(&(libc::AF_UNIX as u16).to_ne_bytes());
        assert_eq!(parse_sockaddr(&unix), None);
        assert_eq!(parse_sockaddr(&[]), None);
        assert_eq!(parse_sockaddr(&[2]), None);
    }

    #[test]
    fn a_bind_gets_the_target_of_its_port_preferring_its_address_then_family() {
        let targets = [t("127.0.0.1:8080", 3), t("[::1]:8080", 4), t("127.0.0.1:9090", 5)];
        let pick = |a: &str| choose(&targets, &a.parse().unwrap());
        assert_eq!(pick("0.0.0.0:8080"), Some(0));
        assert_eq!(pick("[::]:8080"), Some(1), "IPv6 wildcard: the IPv6 bind of that port");
        assert_eq!(pick("[::1]:8080"), Some(1));
        assert_eq!(pick("[::ffff:127.0.0.1]:8080"), Some(0), "a v4-mapped address is IPv4");
        assert_eq!(pick("10.1.2.3:9090"), Some(2), "any address of the port");
        assert_eq!(pick("[::]:9090"), Some(2), "another family: the first bind of the port");
        assert_eq!(pick("127.0.0.1:7070"), None, "a port the launcher does not bind");
        assert_eq!(pick("127.0.0.1:0"), None, "port 0 is the worker's own");
    }

    #[test]
    fn fdinfo_flags_and_socket_links() {
        let text = "pos:\t0\nflags:\t02004002\nmnt_id:\t9\nino:\t1234\n";
        let flags = fdinfo_flags(text).unwrap();
        assert!(flags & libc::O_CLOEXEC as u32 != 0 && flags & libc::O_NONBLOCK as u32 != 0);
        assert_eq!(fdinfo_flags("flags:\t02\n"), Some(2));
        assert_eq!(fdinfo_flags("pos: 0\n"), None);
        assert_eq!(socket_link_inode("socket:[4242]"), Some(4242));
        assert_eq!(socket_link_inode("pipe:[4242]"), None);
        assert_eq!(socket_link_inode("socket:[x]"), None);
    }
}
