//! The sd_notify receiver for workers (`--ready notify`, `--watchdog`): one datagram socket per
//! worker, read by one thread that turns messages into supervisor events. (The launcher's own
//! messages to its service manager are `upstream`'s.)
//!
//! Each worker gets its own socket (abstract namespace, `NOTIFY_SOCKET=@reuse-launch/...`), so a
//! message is attributed by the socket it arrived on: any process of the worker's tree that
//! inherited NOTIFY_SOCKET speaks for that worker. Messages are parsed as systemd does
//! (`KEY=VALUE` lines). Any fds that arrive with a message are closed at once: that is how
//! `systemd-notify` learns its `BARRIER=1` was processed. Senders must run as the launcher's
//! user, the workers' `--user`, or root (checked with SO_PASSCRED), since abstract sockets have
//! no file permissions.
//!
//! The supervisor owns the lifetime: `open` when a worker is spawned, `close` when it is reaped.
//! The thread only reads and sends events.

use std::collections::HashMap;
use std::io::{self, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::{Arc, Mutex};

use crossbeam_channel::Sender;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::socket::{recvmsg, setsockopt, sockopt, ControlMessageOwned, MsgFlags};

use crate::event::{Event, WorkerId};

type Sockets = Arc<Mutex<HashMap<WorkerId, Arc<UnixDatagram>>>>;

pub struct NotifyHub {
    epoll: Arc<Epoll>,
    sockets: Sockets,
}

impl NotifyHub {
    /// Start the reader thread; events go to `tx`.
    pub fn start(tx: Sender<Event>, worker_uid: Option<u32>) -> io::Result<NotifyHub> {
        let epoll = Arc::new(Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?);
        let sockets: Sockets = Arc::default();
        let (ep, socks) = (epoll.clone(), sockets.clone());
        let mut allowed = vec![0, nix::unistd::geteuid().as_raw()];
        allowed.extend(worker_uid);
        std::thread::Builder::new().name("notify".into()).spawn(move || read_loop(&ep, &socks, &tx, &allowed))?;
        Ok(NotifyHub { epoll, sockets })
    }

    /// Create worker `id`'s socket; returns the NOTIFY_SOCKET value to give it.
    pub fn open(&self, id: WorkerId) -> io::Result<String> {
        let name = format!("reuse-launch/{}/{}/{:x}", std::process::id(), id, nonce());
        let sock = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes())?)?;
        sock.set_nonblocking(true)?;
        setsockopt(&sock, sockopt::PassCred, &true)?;
        let sock = Arc::new(sock);
        self.epoll.add(sock.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, id))?;
        self.sockets.lock().expect("notify map").insert(id, sock);
        Ok(format!("@{name}"))
    }

    /// Serve worker `id`'s socket again after `reexec` (its fd came over the exec).
    pub fn adopt(&self, id: WorkerId, sock: UnixDatagram) -> io::Result<()> {
        let sock = Arc::new(sock);
        self.epoll.add(sock.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, id))?;
        self.sockets.lock().expect("notify map").insert(id, sock);
        Ok(())
    }

    /// Every worker's socket fd, for `reexec` to keep open across the exec.
    pub fn fds(&self) -> Vec<(WorkerId, RawFd)> {
        self.sockets.lock().expect("notify map").iter().map(|(id, s)| (*id, s.as_raw_fd())).collect()
    }

    /// Forget worker `id`'s socket (after it was reaped).
    pub fn close(&self, id: WorkerId) {
        if let Some(sock) = self.sockets.lock().expect("notify map").remove(&id) {
            let _ = self.epoll.delete(sock.as_fd());
        }
    }
}

/// A little unpredictability in socket names, so that they cannot be guessed in advance.
fn nonce() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    h.finish()
}

fn read_loop(epoll: &Epoll, sockets: &Sockets, tx: &Sender<Event>, allowed: &[u32]) {
    let mut events = [EpollEvent::empty(); 32];
    loop {
        let n = match epoll.wait(&mut events, EpollTimeout::NONE) {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                log::error!("notify reader stopped: {e}");
                return;
            }
        };
        for ev in &events[..n] {
            let id = ev.data();
            let Some(sock) = sockets.lock().expect("notify map").get(&id).cloned() else { continue };
            while let Some(fields) = receive(sock.as_raw_fd(), allowed) {
                if !fields.is_empty() && tx.send(Event::Notify(id, fields)).is_err() {
                    return;
                }
            }
        }
    }
}

/// Read one datagram: `None` when there is nothing more to read now; an empty list for a
/// datagram that was refused or had nothing in it.
fn receive(fd: RawFd, allowed: &[u32]) -> Option<Vec<(String, String)>> {
    let mut buf = [0u8; 4096];
    let mut cmsg = nix::cmsg_space!(libc::ucred, [RawFd; 16]);
    let (len, sender_uid) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC;
        let msg = match recvmsg::<()>(fd, &mut iov, Some(&mut cmsg), flags) {
            Ok(m) => m,
            Err(nix::errno::Errno::EINTR) => return Some(Vec::new()),
            Err(_) => return None,
        };
        let mut sender_uid = None;
        for c in msg.cmsgs().into_iter().flatten() {
            match c {
                // Closing what was passed is the acknowledgement systemd-notify's BARRIER=1 waits for.
                ControlMessageOwned::ScmRights(fds) => fds.into_iter().for_each(|f| {
                    let _ = nix::unistd::close(f);
                }),
                ControlMessageOwned::ScmCredentials(c) => sender_uid = Some(c.uid()),
                _ => {}
            }
        }
        (msg.bytes, sender_uid)
    };
    if !matches!(sender_uid, Some(u) if allowed.contains(&u)) {
        log::warn!("ignored a notify message from uid {sender_uid:?}");
        return Some(Vec::new());
    }
    Some(parse(&buf[..len]))
}

/// Parse an sd_notify datagram: newline-separated `KEY=VALUE` assignments.
pub fn parse(data: &[u8]) -> Vec<(String, String)> {
    String::from_utf8_lossy(data)
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn parses_assignments() {
        let f = parse(b"READY=1\nSTATUS=warming up\ngarbage\n");
        assert_eq!(f, vec![("READY".into(), "1".into()), ("STATUS".into(), "warming up".into())]);
    }

    #[test]
    fn messages_are_attributed_and_passed_fds_closed() {
        let (tx, rx) = crossbeam_channel::unbounded();
        let hub = NotifyHub::start(tx, None).unwrap();
        let addr = hub.open(42).unwrap();
        let name = addr.strip_prefix('@').unwrap();
        let client = UnixDatagram::unbound().unwrap();
        // systemd-notify's BARRIER=1 passes the write end of a pipe and waits for EOF on the read end.
        let (keep, passed) = nix::unistd::pipe().unwrap();
        let target = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let fds = [passed.as_raw_fd()];
        let iov = [std::io::IoSlice::new(b"BARRIER=1")];
        let cmsg = [nix::sys::socket::ControlMessage::ScmRights(&fds)];
        let ua = nix::sys::socket::UnixAddr::new_abstract(name.as_bytes()).unwrap();
        nix::sys::socket::sendmsg(client.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), Some(&ua)).unwrap();
        drop(passed);
        client.send_to_addr(b"READY=1", &target).unwrap();
        let first = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert!(matches!(first, Event::Notify(42, ref f) if f[0].0 == "BARRIER"));
        let second = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert!(matches!(second, Event::Notify(42, ref f) if f[0] == ("READY".into(), "1".into())));
        // The read end sees EOF only once the launcher closed the copy it received.
        let mut b = [0u8; 1];
        assert_eq!(nix::unistd::read(&keep, &mut b).unwrap(), 0);
        hub.close(42);
    }
}
