//! The one `getsockopt(TCP_INFO)` of the launcher. On a listening socket the kernel reuses
//! `tcpi_unacked` for its accept-queue length and `tcpi_sacked` for its backlog. Neither nix
//! nor socket2 reads TCP_INFO, hence the raw getsockopt.

use std::io;
use std::os::fd::RawFd;

/// `tcpi_state` of a listening socket (TCP_LISTEN).
const TCP_LISTEN: u8 = 10;

/// What the launcher reads of a socket's TCP_INFO.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpInfo {
    /// `tcpi_state` (10: listening).
    pub state: u8,
    /// `tcpi_unacked`: on a listener, the connections waiting in its accept queue.
    pub unacked: u32,
    /// `tcpi_sacked`: on a listener, its backlog.
    pub sacked: u32,
}

impl TcpInfo {
    pub fn listening(&self) -> bool {
        self.state == TCP_LISTEN
    }
}

/// TCP_INFO of socket `fd`.
pub fn tcp_info(fd: RawFd) -> io::Result<TcpInfo> {
    // SAFETY: tcp_info is plain old data, valid when zeroed.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `info`, which is that large. A closed
    // or reused fd only makes it fail or describe another socket (callers check the state).
    let rc = unsafe {
        libc::getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_INFO, (&mut info as *mut libc::tcp_info).cast(), &mut len)
    };
    if rc == 0 {
        Ok(TcpInfo { state: info.tcpi_state, unacked: info.tcpi_unacked, sacked: info.tcpi_sacked })
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A listening socket's accept-queue length (`tcpi_unacked`).
pub fn queue_len(listener: RawFd) -> io::Result<u32> {
    tcp_info(listener).map(|i| i.unacked)
}

/// A listener's accept-queue length and its backlog; None if `fd` is not (or no longer) a
/// listening TCP socket.
pub fn listener_queue(fd: RawFd) -> Option<(u32, u32)> {
    tcp_info(fd).ok().filter(TcpInfo::listening).map(|i| (i.unacked, i.sacked))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn a_listeners_queue_and_backlog() {
        let l = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        l.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into()).unwrap();
        l.listen(5).unwrap();
        let addr = l.local_addr().unwrap().as_socket().unwrap();
        assert_eq!(listener_queue(l.as_raw_fd()), Some((0, 5)));
        let _c: Vec<_> = (0..3).map(|_| std::net::TcpStream::connect(addr).unwrap()).collect();
        assert_eq!(queue_len(l.as_raw_fd()).unwrap(), 3);
        assert_eq!(listener_queue(l.as_raw_fd()), Some((3, 5)));
        let c = std::net::TcpStream::connect(addr).unwrap();
        assert!(!tcp_info(c.as_raw_fd()).unwrap().listening());
        assert_eq!(listener_queue(c.as_raw_fd()), None);
        let (r, _w) = nix::unistd::pipe().unwrap();
        assert!(tcp_info(r.as_raw_fd()).is_err());
    }

    #[test]
    fn queue_length_of_a_real_listener() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&l);
        assert_eq!(queue_len(fd).unwrap(), 0);
        let _c: Vec<_> = (0..3).map(|_| std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap()).collect();
        assert_eq!(queue_len(fd).unwrap(), 3);
        l.accept().unwrap();
        assert_eq!(queue_len(fd).unwrap(), 2);
    }
}
