//! Socket activation, the launcher's side: the listening sockets a service manager passed to
//! this process (systemd's LISTEN_FDS/LISTEN_PID/LISTEN_FDNAMES), each checked to really be a
//! listening TCP socket before it is trusted. `socket::Listeners::adopt` serves them.

use std::os::fd::{FromRawFd, RawFd};

use socket2::Socket;

use crate::error::Error;

/// The sockets systemd-style socket activation passed to this process (LISTEN_PID is ours,
/// LISTEN_FDS=n: fds 3..3+n), each checked to be a listening TCP socket; None when there are none.
/// They are made CLOEXEC: workers get them only through the slot fds.
pub fn inherited() -> Result<Option<Vec<(Socket, String)>>, Error> {
    let (Ok(pid), Ok(count)) = (std::env::var("LISTEN_PID"), std::env::var("LISTEN_FDS")) else { return Ok(None) };
    if pid != std::process::id().to_string() {
        return Ok(None);
    }
    let count: usize = count.parse().map_err(|_| Error::Failed(format!("LISTEN_FDS='{count}' is not a number")))?;
    if count == 0 {
        return Ok(None);
    }
    let names: Vec<String> = std::env::var("LISTEN_FDNAMES").unwrap_or_default().split(':').map(String::from).collect();
    let mut out = Vec::new();
    for i in 0..count {
        let fd = 3 + i as RawFd;
        check_listening_tcp(fd)
            .map_err(|why| Error::Failed(format!("inherited fd {fd} (LISTEN_FDS={count}) {why}")))?;
        // SAFETY: the fd was handed to this process by its parent per LISTEN_FDS and checked
        // above; nothing else in the launcher owns it.
        let sock = unsafe { Socket::from_raw_fd(fd) };
        sock.set_cloexec(true).map_err(|e| Error::Failed(format!("inherited fd {fd}: {e}")))?;
        let name = match names.get(i).filter(|n| !n.is_empty() && *n != "unknown") {
            Some(n) => n.clone(),
            None if i == 0 => "http".to_string(),
            None => format!("http{i}"),
        };
        out.push((sock, name));
    }
    Ok(Some(out))
}

/// Is `fd` a listening TCP socket (IPv4 or IPv6)? Err says what it is instead.
fn check_listening_tcp(fd: RawFd) -> Result<(), String> {
    use nix::sys::socket::{getsockname, getsockopt, sockopt, AddressFamily, SockType, SockaddrLike, SockaddrStorage};
    use std::os::fd::BorrowedFd;
    use std::os::unix::fs::FileTypeExt;
    let meta = std::fs::metadata(format!("/proc/self/fd/{fd}")).map_err(|e| format!("is not open: {e}"))?;
    if !meta.file_type().is_socket() {
        return Err("is not a socket".into());
    }
    // SAFETY: fd is open (fstat succeeded) and stays open for this borrow.
    let b = unsafe { BorrowedFd::borrow_raw(fd) };
    if getsockopt(&b, sockopt::SockType).map_err(|e| e.to_string())? != SockType::Stream {
        return Err("is not a stream (TCP) socket".into());
    }
    let family = getsockname::<SockaddrStorage>(fd).map_err(|e| e.to_string())?.family();
    if !matches!(family, Some(AddressFamily::Inet | AddressFamily::Inet6)) {
        return Err(format!("is not an IPv4/IPv6 socket ({family:?})"));
    }
    if !getsockopt(&b, sockopt::AcceptConn).map_err(|e| e.to_string())? {
        return Err("is not listening".into());
    }
    Ok(())
}

/// Is `fd` open in this process?
pub fn check_is_open(fd: RawFd) -> Result<(), String> {
    std::fs::metadata(format!("/proc/self/fd/{fd}")).map(drop).map_err(|e| format!("fd {fd} is not open: {e}"))
}
