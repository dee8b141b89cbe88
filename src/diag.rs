//! Every listening TCP socket's accept queue in one netlink dump (`NETLINK_SOCK_DIAG`, see
//! `sock_diag(7)`): one request (`inet_diag_req_v2`, LISTEN only, optionally one local port)
//! answers for every listener of the launcher's network namespace at once, each with its
//! socket inode and `idiag_rqueue`, which for a listener is its accept-queue length (the same
//! figure as `tcpi_unacked` of `TCP_INFO`). The caller maps the answers to its own sockets by
//! inode.
//!
//! Measured (`bench/queues.c`, this 2-core VM, Linux 6.18): a dump costs about 20 us plus
//! 0.45 us per listener on the port, `TCP_INFO` 0.72 us per listener: the dump is 1.5x cheaper
//! at 512 and 1,024 listeners, no cheaper at 64 (see `queues`, which uses it only when most
//! queues must be read). Needs Linux 4.1 (`inet_diag_req_v2` with a port filter on listeners
//! works since 3.3; the launcher falls back to `TCP_INFO` whenever a dump fails).
//!
//! No `unsafe` here: the request and the answers are built and parsed as bytes.

use std::io::{self, Read};

use socket2::{Domain, Protocol, Socket, Type};

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const TCP_LISTEN: u32 = 10;
/// struct nlmsghdr.
const HDR: usize = 16;
/// struct inet_diag_req_v2 (4 bytes, then inet_diag_sockid: 48).
const REQ: usize = 56;
/// In struct inet_diag_msg: idiag_rqueue and idiag_inode.
const RQUEUE_AT: usize = 56;
const INODE_AT: usize = 68;
const MSG: usize = 72;

/// One listener in a dump: its socket inode and its accept-queue length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listener {
    pub inode: u64,
    pub queue: u32,
}

/// A `NETLINK_SOCK_DIAG` socket and its receive buffer.
pub struct Diag {
    socket: Socket,
    buf: Vec<u8>,
    seq: u32,
}

impl Diag {
    pub fn open() -> io::Result<Diag> {
        let socket = Socket::new(
            Domain::from(libc::AF_NETLINK),
            Type::DGRAM.cloexec(),
            Some(Protocol::from(NETLINK_SOCK_DIAG)),
        )?;
        Ok(Diag { socket, buf: vec![0; 64 * 1024], seq: 0 })
    }

    /// Every TCP listener of `family` (`AF_INET` or `AF_INET6`) on local `port` (0: any),
    /// in this network namespace.
    pub fn listeners(&mut self, family: i32, port: u16) -> io::Result<Vec<Listener>> {
        self.seq = self.seq.wrapping_add(1);
        self.socket.send(&request(family, port, self.seq))?;
        let mut out = Vec::new();
        loop {
            let got = (&self.socket).read(&mut self.buf)?;
            if got == 0 || parse(&self.buf[..got], self.seq, &mut out)? {
                return Ok(out);
            }
        }
    }
}

/// The dump request: nlmsghdr + inet_diag_req_v2 for TCP listeners.
fn request(family: i32, port: u16, seq: u32) -> Vec<u8> {
    let mut r = Vec::with_capacity(HDR + REQ);
    r.extend_from_slice(&((HDR + REQ) as u32).to_ne_bytes());
    r.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    r.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    r.extend_from_slice(&seq.to_ne_bytes());
    r.extend_from_slice(&0u32.to_ne_bytes());
    r.extend_from_slice(&[family as u8, libc::IPPROTO_TCP as u8, 0, 0]);
    r.extend_from_slice(&(1u32 << TCP_LISTEN).to_ne_bytes());
    r.extend_from_slice(&port.to_be_bytes()); // idiag_sport, network order
    r.resize(HDR + REQ, 0); // dport, addresses, interface, cookie: any
    r
}

/// Parse one datagram of the dump into `out`; Ok(true) at its end (NLMSG_DONE).
fn parse(mut b: &[u8], seq: u32, out: &mut Vec<Listener>) -> io::Result<bool> {
    let u32_at = |b: &[u8], at: usize| b.get(at..at + 4).map(|x| u32::from_ne_bytes([x[0], x[1], x[2], x[3]]));
    let u16_at = |b: &[u8], at: usize| b.get(at..at + 2).map(|x| u16::from_ne_bytes([x[0], x[1]]));
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "sock_diag: malformed answer");
    while b.len() >= HDR {
        let len = u32_at(b, 0).ok_or_else(bad)? as usize;
        let kind = u16_at(b, 4).ok_or_else(bad)?;
        if len < HDR || len > b.len() {
            return Err(bad());
        }
        let body = &b[HDR..len];
        if u32_at(b, 8) == Some(seq) {
            match kind {
                NLMSG_DONE => return Ok(true),
                NLMSG_ERROR => {
                    let errno = u32_at(body, 0).ok_or_else(bad)? as i32;
                    return Err(io::Error::from_raw_os_error(-errno));
                }
                SOCK_DIAG_BY_FAMILY if body.len() >= MSG => out.push(Listener {
                    inode: u64::from(u32_at(body, INODE_AT).ok_or_else(bad)?),
                    queue: u32_at(body, RQUEUE_AT).ok_or_else(bad)?,
                }),
                _ => {}
            }
        }
        b = &b[((len + 3) & !3).min(b.len())..];
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn a_dump_finds_each_listener_by_inode_with_its_queue_as_tcp_info_does() {
        let mut socks = Vec::new();
        let mut port = 0;
        for _ in 0..3 {
            let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
            s.set_reuse_port(true).unwrap();
            s.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], port)).into()).unwrap();
            s.listen(16).unwrap();
            port = s.local_addr().unwrap().as_socket().unwrap().port();
            socks.push(s);
        }
        let clients: Vec<_> = (0..4).map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).unwrap()).collect();
        let inodes = crate::readiness::socket_inodes(&socks.iter().map(|s| s.as_raw_fd()).collect::<Vec<_>>()).unwrap();
        let mut diag = Diag::open().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let found = diag.listeners(libc::AF_INET, port).unwrap();
            let ours: Vec<Listener> =
                inodes.iter().filter_map(|i| found.iter().find(|l| l.inode == *i).copied()).collect();
            assert_eq!(ours.len(), 3, "every listener is in the dump: {found:?}");
            let by_tcp_info: Vec<u32> = socks.iter().map(|s| crate::sys::queue_len(s.as_raw_fd()).unwrap()).collect();
            let total: u32 = ours.iter().map(|l| l.queue).sum();
            if total == 4 && ours.iter().map(|l| l.queue).collect::<Vec<_>>() == by_tcp_info {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "queues {ours:?}, TCP_INFO {by_tcp_info:?}");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        // Another port's listeners are not in a dump filtered to this one.
        let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let other_inode = crate::readiness::socket_inodes(&[other.as_raw_fd()]).unwrap()[0];
        assert!(!diag.listeners(libc::AF_INET, port).unwrap().iter().any(|l| l.inode == other_inode));
        assert!(diag.listeners(libc::AF_INET, 0).unwrap().iter().any(|l| l.inode == other_inode));
        drop(clients);
    }

    #[test]
    fn malformed_answers_are_errors_not_panics() {
        let mut out = Vec::new();
        assert!(parse(&[0u8; 8], 1, &mut out).is_ok_and(|done| !done));
        let mut short = vec![0u8; 16];
        short[..4].copy_from_slice(&400u32.to_ne_bytes());
        assert!(parse(&short, 1, &mut out).is_err());
        let mut err = vec![0u8; 20];
        err[..4].copy_from_slice(&20u32.to_ne_bytes());
        err[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        err[8..12].copy_from_slice(&7u32.to_ne_bytes());
        err[16..20].copy_from_slice(&(-libc::EPERM).to_ne_bytes());
        assert_eq!(parse(&err, 7, &mut out).unwrap_err().raw_os_error(), Some(libc::EPERM));
    }
}
