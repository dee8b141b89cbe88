//! Answering a decided call on the notification fd: continue it, return a value, or install
//! the slot's socket on the caller's fd (then the worker's O_NONBLOCK on the socket's file).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};

use super::{Decision, Done, Target};

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
