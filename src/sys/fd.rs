//! File descriptor flags: close-on-exec (`FD_CLOEXEC`) and non-blocking (`O_NONBLOCK`).

use std::io;
use std::os::fd::{AsFd, RawFd};

use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};

/// Set (or clear) close-on-exec on every fd of `fds`; an fd that is not open is skipped.
pub fn set_cloexec(fds: &[RawFd], on: bool) {
    for fd in fds {
        // SAFETY: the caller's fds stay open during this call.
        let b = unsafe { std::os::fd::BorrowedFd::borrow_raw(*fd) };
        let flags = if on { FdFlag::FD_CLOEXEC } else { FdFlag::empty() };
        let _ = fcntl(b, FcntlArg::F_SETFD(flags));
    }
}

/// Make `fd` non-blocking (or blocking), keeping its other file status flags.
pub fn set_nonblock(fd: impl AsFd, on: bool) -> io::Result<()> {
    let flags = OFlag::from_bits_truncate(fcntl(&fd, FcntlArg::F_GETFL)?);
    let flags = if on { flags | OFlag::O_NONBLOCK } else { flags & !OFlag::O_NONBLOCK };
    fcntl(&fd, FcntlArg::F_SETFL(flags))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn flags_are_set_and_cleared() {
        let (r, _w) = nix::unistd::pipe().unwrap();
        let cloexec = || FdFlag::from_bits_truncate(fcntl(&r, FcntlArg::F_GETFD).unwrap()).contains(FdFlag::FD_CLOEXEC);
        set_cloexec(&[r.as_raw_fd()], true);
        assert!(cloexec());
        set_cloexec(&[r.as_raw_fd()], false);
        assert!(!cloexec());
        let nonblock = || OFlag::from_bits_truncate(fcntl(&r, FcntlArg::F_GETFL).unwrap()).contains(OFlag::O_NONBLOCK);
        set_nonblock(&r, true).unwrap();
        assert!(nonblock());
        set_nonblock(&r, false).unwrap();
        assert!(!nonblock());
    }
}
