//! The start-up check of `--intercept-bind auto|on`: a throw-away child installs the same filter
//! a worker gets, drops to the workers' `--user` credentials as a worker does, sends its
//! notification fd, and binds a port the launcher holds; the launcher takes that bind over and
//! answers its listen through the same code that serves workers. Only if the child then finds
//! the launcher's socket on its fd is interception on. Every way this can fail has a cause in
//! words (kernel too old, seccomp forbidden, a notifier already above us, no access to the
//! memory of a `--user` worker without CAP_SYS_PTRACE).

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{recvmsg, socketpair, AddressFamily, ControlMessageOwned, MsgFlags, SockFlag, SockType};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use super::filter::{install, send_fd, ChildFilter};
use super::handler::{self, Decision, Target};
use crate::command::Credentials;

/// Where the child failed (the first byte of its failure message; then errno, 4 bytes).
const STAGE_INSTALL: u8 = 1;
const STAGE_SEND: u8 = 2;
const STAGE_SOCKET: u8 = 3;
const STAGE_BIND: u8 = 4;
const STAGE_LISTEN: u8 = 5;
const STAGE_STAT: u8 = 6;
const STAGE_OTHER_SOCKET: u8 = 7;
const STAGE_CREDS: u8 = 8;

/// The credentials the child drops to (uid, gid, groups), prepared in the parent.
type Creds = Option<(libc::uid_t, libc::gid_t, *const libc::gid_t, usize)>;

/// Run the check, as a worker with `creds` would be served; Err is the cause, in words.
pub fn probe(filter: &ChildFilter, creds: Option<&Credentials>) -> Result<(), String> {
    let ours = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("cannot bind a probe socket: {e}"))?;
    let addr = ours.local_addr().map_err(|e| e.to_string())?;
    let ino = std::fs::metadata(format!("/proc/self/fd/{}", ours.as_raw_fd())).map_err(|e| e.to_string())?.ino();
    let target = Target { addr, sock: std::sync::Arc::new(OwnedFd::from(ours)), ino };
    let creds: Creds = creds.map(|c| (c.uid, c.gid, c.groups.as_ptr(), c.groups.len()));
    let (mine, theirs) = socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)
        .map_err(|e| format!("socketpair: {e}"))?;
    let sockaddr = sockaddr_in(addr);
    // SAFETY: fork in a multi-threaded process; the child only makes system calls on memory
    // prepared before the fork (the filter, the address, the fds) and ends in _exit.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork: {}", io::Error::last_os_error()));
    }
    if pid == 0 {
        // SAFETY: the freshly forked child; see child's contract.
        unsafe { child(filter, creds, theirs.as_raw_fd(), &sockaddr, ino) }
    }
    drop(theirs);
    let child = Pid::from_raw(pid);
    let result = serve(&mine, &target);
    let status = wait(child, result.is_ok());
    match (result, status) {
        (Err(cause), _) => Err(cause),
        (Ok(()), Some(WaitStatus::Exited(_, 0))) => Ok(()),
        (Ok(()), other) => Err(format!("the probe child ended with {other:?}")),
    }
}

/// The parent's side: the notification fd, then the child's bind and listen, each answered.
fn serve(chan: &OwnedFd, target: &Target) -> Result<(), String> {
    let notif = match receive(chan)? {
        Message::Fd(fd) => fd,
        Message::Failed(stage, errno) => return Err(cause(stage, errno)),
    };
    for expected in [libc::SYS_bind, libc::SYS_listen] {
        if !readable(notif.as_fd(), Duration::from_secs(5)) {
            // The child may have failed instead of calling.
            return match receive(chan) {
                Ok(Message::Failed(stage, errno)) => Err(cause(stage, errno)),
                _ => Err("the probe child made no call within 5 s".into()),
            };
        }
        let call = handler::receive(notif.as_fd())
            .map_err(|e| format!("SECCOMP_IOCTL_NOTIF_RECV: {e}"))?
            .ok_or("the probe child's call was withdrawn")?;
        if call.nr != expected {
            return Err(format!("the probe child made syscall {} instead of {expected}", call.nr));
        }
        let targets = std::slice::from_ref(target);
        let (decision, why) = handler::decide(notif.as_fd(), &call, targets);
        let wanted = if expected == libc::SYS_bind {
            matches!(decision, Decision::Install { .. })
        } else {
            decision == Decision::Return(0)
        };
        if !wanted {
            let _ = handler::carry_out(notif.as_fd(), call.id, Decision::Continue, targets);
            return Err(why.unwrap_or_else(|| format!("the probe's call was not recognised ({decision:?})")));
        }
        handler::carry_out(notif.as_fd(), call.id, decision, targets).map_err(|e| match e.raw_os_error() {
            Some(libc::EINVAL | libc::ENOTTY) => {
                "the kernel cannot install an fd in a trapped process (SECCOMP_IOCTL_NOTIF_ADDFD needs Linux 5.9)"
                    .to_string()
            }
            _ => format!("cannot answer the probe's call: {e}"),
        })?;
    }
    Ok(())
}

enum Message {
    Fd(OwnedFd),
    Failed(u8, i32),
}

fn receive(chan: &OwnedFd) -> Result<Message, String> {
    if !readable(chan.as_fd(), Duration::from_secs(5)) {
        return Err("the probe child sent nothing within 5 s".into());
    }
    let mut buf = [0u8; 8];
    let mut iov = [io::IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!(RawFd);
    let msg = recvmsg::<()>(chan.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)
        .map_err(|e| format!("recvmsg: {e}"))?;
    let mut fd = None;
    for c in msg.cmsgs().map_err(|e| e.to_string())? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            // SAFETY: SCM_RIGHTS just gave this process these fds; nothing else owns them.
            fd = fds.first().map(|f| unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(*f) });
        }
    }
    let n = msg.bytes;
    match fd {
        Some(fd) => Ok(Message::Fd(fd)),
        None if n >= 5 => Ok(Message::Failed(buf[0], i32::from_ne_bytes([buf[1], buf[2], buf[3], buf[4]]))),
        None => Err("the probe child ended before it said anything".into()),
    }
}

fn readable(fd: BorrowedFd, timeout: Duration) -> bool {
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    let ms = PollTimeout::try_from(timeout.as_millis() as i32).unwrap_or(PollTimeout::MAX);
    matches!(poll(&mut fds, ms), Ok(1)) && fds[0].revents().is_some_and(|r| r.contains(PollFlags::POLLIN))
}

/// Reap the child (killing it when the check failed or it takes too long).
fn wait(child: Pid, ok: bool) -> Option<WaitStatus> {
    if !ok {
        let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
    }
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        match waitpid(child, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) if Instant::now() < end => std::thread::sleep(Duration::from_millis(1)),
            Ok(WaitStatus::StillAlive) => {
                let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
                return waitpid(child, None).ok();
            }
            other => return other.ok(),
        }
    }
}

/// The cause of a failure of the child, in words.
fn cause(stage: u8, errno: i32) -> String {
    let e = io::Error::from_raw_os_error(errno);
    match (stage, errno) {
        (STAGE_INSTALL, libc::EINVAL | libc::ENOSYS) => {
            format!("this kernel has no seccomp user notification (Linux 5.0 with CONFIG_SECCOMP_FILTER; {e})")
        }
        (STAGE_INSTALL, libc::EBUSY) => {
            "the launcher itself runs under a seccomp notifier (inside another launcher, or a container runtime \
             that uses one), and the kernel allows one per process tree"
                .into()
        }
        (STAGE_INSTALL, libc::EPERM | libc::EACCES) => {
            format!("installing a seccomp filter is not permitted here (a container's seccomp policy?): {e}")
        }
        (STAGE_INSTALL, _) => format!("seccomp(SECCOMP_SET_MODE_FILTER): {e}"),
        (STAGE_BIND, libc::EADDRINUSE) => "the probe's bind() reached the kernel (EADDRINUSE)".into(),
        (STAGE_SEND, _) => format!("cannot pass the notification fd: {e}"),
        (STAGE_OTHER_SOCKET, _) => "the probe child did not get the launcher's socket".into(),
        (STAGE_CREDS, _) => format!("the probe child cannot take the --user credentials: {e}"),
        (s, _) => format!("the probe child failed at step {s}: {e}"),
    }
}

/// `struct sockaddr_in` for `addr` (IPv4: the probe binds 127.0.0.1).
fn sockaddr_in(addr: SocketAddr) -> libc::sockaddr_in {
    let SocketAddr::V4(v4) = addr else { unreachable!("the probe socket is IPv4") };
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: v4.port().to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(v4.ip().octets()) },
        sin_zero: [0; 8],
    }
}

/// The child: install, send the fd, bind and listen, check the socket is the launcher's.
///
/// # Safety
/// Only right after fork; everything it reads was prepared by the parent.
unsafe fn child(filter: &ChildFilter, creds: Creds, chan: RawFd, addr: &libc::sockaddr_in, ino: u64) -> ! {
    // SAFETY: async-signal-safe system calls on memory prepared before the fork; no allocation.
    unsafe {
        let fail = |stage: u8| -> ! {
            let e = (*libc::__errno_location()).to_ne_bytes();
            let msg = [stage, e[0], e[1], e[2], e[3]];
            libc::write(chan, msg.as_ptr().cast(), msg.len());
            libc::_exit(1)
        };
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0);
        let notif = install(filter);
        if notif < 0 {
            fail(STAGE_INSTALL);
        }
        if !send_fd(chan, notif) {
            fail(STAGE_SEND);
        }
        libc::close(notif);
        // As a worker: the --user credentials after the filter (see `spawn`, steps 4 and 5).
        if let Some((uid, gid, groups, ngroups)) = creds {
            if libc::setgroups(ngroups, groups) != 0 || libc::setgid(gid) != 0 || libc::setuid(uid) != 0 {
                fail(STAGE_CREDS);
            }
        }
        let s = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if s < 0 {
            fail(STAGE_SOCKET);
        }
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        if libc::bind(s, (addr as *const libc::sockaddr_in).cast(), len) != 0 {
            fail(STAGE_BIND);
        }
        if libc::listen(s, 1) != 0 {
            fail(STAGE_LISTEN);
        }
        // The launcher's socket is on our fd now: the same inode.
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(s, &mut st) != 0 {
            fail(STAGE_STAT);
        }
        if st.st_ino != ino {
            *libc::__errno_location() = 0;
            fail(STAGE_OTHER_SOCKET);
        }
        libc::_exit(0)
    }
}
