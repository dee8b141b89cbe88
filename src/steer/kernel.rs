//! Attaching a steering program to a SO_REUSEPORT group and detaching it (setsockopt).

use std::io;
use std::os::fd::RawFd;

use super::MAX_INSNS;

const SO_ATTACH_REUSEPORT_CBPF: libc::c_int = 51;
const SO_DETACH_REUSEPORT_BPF: libc::c_int = 68;

/// Attach `prog` to the group that `member` belongs to, replacing any program it had.
pub fn attach(member: RawFd, prog: &[libc::sock_filter]) -> io::Result<()> {
    if prog.is_empty() || prog.len() > MAX_INSNS {
        let msg = format!("a steering program of {} instructions (1 to {MAX_INSNS} allowed)", prog.len());
        return Err(io::Error::new(io::ErrorKind::InvalidInput, msg));
    }
    // The kernel copies the instructions and never writes through this pointer.
    let fprog = libc::sock_fprog { len: prog.len() as u16, filter: prog.as_ptr().cast_mut() };
    // SAFETY: setsockopt with a valid sock_fprog whose instructions outlive the call; a bad
    // fd only makes it fail.
    let rc = unsafe {
        libc::setsockopt(
            member,
            libc::SOL_SOCKET,
            SO_ATTACH_REUSEPORT_CBPF,
            (&fprog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Remove the program of the group that `member` belongs to (Ok when it had none): the kernel
/// hashes over all members again.
pub fn detach(member: RawFd) -> io::Result<()> {
    // The value is ignored, but the kernel wants at least an int's worth of it.
    let unused: libc::c_int = 0;
    let len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: setsockopt with a valid pointer to an int; a bad fd only makes it fail.
    let rc = unsafe {
        libc::setsockopt(member, libc::SOL_SOCKET, SO_DETACH_REUSEPORT_BPF, (&unused as *const libc::c_int).cast(), len)
    };
    let err = io::Error::last_os_error();
    // ENOENT: nothing was attached.
    if rc == 0 || err.raw_os_error() == Some(libc::ENOENT) {
        Ok(())
    } else {
        Err(err)
    }
}
