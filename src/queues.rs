//! The stall watch's view of the slots' accept queues, at a cost that does not grow with the
//! number of slots while nothing waits, and the [`Cadence`] of its samples.
//!
//! - One level-triggered epoll set holds every listener the launcher keeps for the slots
//!   (`EPOLLIN`: its accept queue is not empty). At a sample, `epoll_wait` with no timeout
//!   lists only the listeners with connections waiting (1.2 us whether 2 or 1,024 listeners
//!   are registered, `bench/queues.c`); the others are empty for sure. Only the listed ones are
//!   read: with `TCP_INFO` each, or, when at least [`DUMP_FROM`] are listed and they are most of
//!   the listeners, with one `sock_diag` dump (`diag`; 1.5x cheaper than `TCP_INFO` at 512 and
//!   1,024). Without the epoll set (it could not be made) every listener is read with
//!   `TCP_INFO` at every sample, as before this module.
//! - A thread (`queue-wake`) blocks on the same set while the loop samples rarely, and sends
//!   [`Event::Queued`] the moment a connection waits on any listener, so the loop samples at
//!   once: a stopped or deadlocked worker is seen as soon as, or sooner than, at a fixed 20 ms.
//! - [`Cadence`]: every [`Cadence::FAST`] while something is going on (a queue holds
//!   connections, a slot is stalled, a worker starts or stops, a wake came) and for
//!   [`Cadence::HOLD`] after; otherwise every [`Cadence::IDLE`], with the wake armed.
//!
//! The epoll registrations are the launcher's own: workers that accept on the same sockets
//! are not affected (ours are non-exclusive waiters, woken alongside whoever waits). Needs
//! Linux 2.6 (epoll); the dump needs `NETLINK_SOCK_DIAG` (falls back to `TCP_INFO`).

use std::collections::HashMap;
use std::os::fd::{BorrowedFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};

use crate::diag::Diag;
use crate::event::Event;
use crate::sys::queue_len;

/// A dump instead of `TCP_INFO` from this many listeners with connections waiting (and when
/// they are at least half of all): below, the dump's fixed cost (~20 us) does not pay.
pub const DUMP_FROM: usize = 64;
/// More distinct local ports than this (round-robin mode's private sockets): one dump per
/// family of every listener, matched by inode, instead of one per port.
const PORTS_MAX: usize = 4;

/// When the stall watch samples next.
#[derive(Debug, Default, Clone)]
pub struct Cadence {
    busy_until: Option<Instant>,
    /// Until when connections count as arriving (a wake, a queue seen with connections).
    traffic_until: Option<Instant>,
    idle: bool,
}

impl Cadence {
    pub const FAST: Duration = Duration::from_millis(20);
    pub const IDLE: Duration = Duration::from_secs(1);
    pub const HOLD: Duration = Duration::from_secs(1);

    /// Connections arrive (a wake, a queue with connections): sample fast for [`Self::HOLD`].
    pub fn busy(&mut self, now: Instant) {
        self.busy_until = Some(now + Self::HOLD);
        self.traffic_until = self.busy_until;
    }

    /// Connections arrived within [`Self::HOLD`] (what `--steer least-loaded`'s counts of held
    /// connections are for: while none arrive the weights are not used, and a wake refreshes
    /// them at once).
    pub fn traffic(&self, now: Instant) -> bool {
        self.traffic_until.is_some_and(|t| now < t)
    }

    /// After a sample at `now`: the delay to the next, and whether to arm the wake (idle).
    /// `active`: a queue holds connections, or a worker is starting, stopping or stalled.
    pub fn next(&mut self, now: Instant, active: bool) -> (Duration, bool) {
        if active {
            self.busy_until = Some(now + Self::HOLD);
        }
        let was = self.idle;
        self.idle = self.busy_until.is_none_or(|t| now >= t);
        if self.idle != was {
            match self.idle {
                true => log::debug!("queue watch: idle (every {:?} until a connection waits)", Self::IDLE),
                false => log::debug!("queue watch: busy (every {:?})", Self::FAST),
            }
        }
        if self.idle {
            (Self::IDLE, true)
        } else {
            (Self::FAST, false)
        }
    }
}

/// The epoll set over the slots' listeners, the dump socket, and the wake thread's trigger.
pub struct Queues {
    epoll: Arc<Epoll>,
    /// What is registered: each slot's listeners, in bind order; by fd, its epoll data and
    /// socket inode; the last listener's inode.
    layout: Vec<Vec<RawFd>>,
    registered: HashMap<RawFd, (u64, Option<u64>)>,
    last_inode: Option<u64>,
    /// Listener inode -> slot, and the (family, port) dumps that cover them (None: one dump
    /// per family, unfiltered).
    inodes: HashMap<u64, usize>,
    dumps: Option<Vec<(i32, u16)>>,
    families: Vec<i32>,
    diag: Option<Diag>,
    events: Vec<EpollEvent>,
    arm: Sender<()>,
    pub cadence: Cadence,
}

impl Queues {
    /// The epoll set and the wake thread, which sends [`Event::Queued`] to `tx`.
    pub fn start(tx: Sender<Event>) -> std::io::Result<Queues> {
        let epoll = Arc::new(Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?);
        let (arm, armed) = crossbeam_channel::bounded::<()>(1);
        let waiter = epoll.clone();
        std::thread::Builder::new().name("queue-wake".into()).spawn(move || {
            let mut one = [EpollEvent::empty()];
            while armed.recv().is_ok() {
                loop {
                    match waiter.wait(&mut one, EpollTimeout::NONE) {
                        Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
                        Ok(_) => break,
                        Err(e) => return log::warn!("queue-wake: epoll_wait: {e}; the queues are sampled every 20 ms"),
                    }
                }
                if tx.send(Event::Queued).is_err() {
                    return;
                }
            }
        })?;
        let diag = Diag::open().map_err(|e| log::debug!("no sock_diag ({e}): TCP_INFO for every queue")).ok();
        Ok(Queues {
            epoll,
            layout: Vec::new(),
            registered: HashMap::new(),
            last_inode: None,
            inodes: HashMap::new(),
            dumps: None,
            families: Vec::new(),
            diag,
            events: Vec::new(),
            arm,
            cadence: Cadence::default(),
        })
    }

    /// Register the slots' listeners (`layout[slot]`, in bind order), following a scale. A
    /// slot closed and another added between two samples may reuse the same fd numbers for new
    /// sockets: slots come and go at the end only, so the last listener's inode (one `fstat`)
    /// tells, and then every listener is checked by inode.
    pub fn sync(&mut self, layout: Vec<Vec<RawFd>>) {
        let last = layout.iter().rev().find_map(|fds| fds.last()).and_then(|fd| inode(*fd));
        if layout == self.layout && last == self.last_inode {
            return;
        }
        let keys = |l: &[Vec<RawFd>]| -> HashMap<RawFd, (u64, Option<u64>)> {
            let each = l.iter().enumerate().flat_map(|(s, fds)| fds.iter().enumerate().map(move |(b, fd)| (s, b, *fd)));
            each.map(|(slot, bind, fd)| (fd, (((slot as u64) << 8) | bind as u64, inode(fd)))).collect()
        };
        let old = std::mem::take(&mut self.registered);
        let new = keys(&layout);
        for fd in old.keys().filter(|fd| !new.contains_key(fd)) {
            // SAFETY: a number we registered; if it is closed meanwhile, epoll_ctl fails
            // harmlessly (a listener whose last holder closed it left the set by itself).
            let _ = self.epoll.delete(unsafe { BorrowedFd::borrow_raw(*fd) });
        }
        for (fd, (data, ino)) in &new {
            // SAFETY: the fd is a listener `Listeners` holds open (see `socket`).
            let borrowed = unsafe { BorrowedFd::borrow_raw(*fd) };
            let mut event = EpollEvent::new(EpollFlags::EPOLLIN, *data);
            let done = match old.get(fd) {
                Some((d, i)) if d == data && i == ino => Ok(()),
                // The same socket under another slot number, or a new socket on the number.
                Some((_, i)) if i == ino => self.epoll.modify(borrowed, &mut event),
                _ => self.epoll.add(borrowed, event).or_else(|_| self.epoll.modify(borrowed, &mut event)),
            };
            if let Err(e) = done {
                log::warn!("cannot watch the queue of listener fd {fd} with epoll: {e}");
            }
        }
        self.events = vec![EpollEvent::empty(); new.len().max(1)];
        self.index(&layout);
        self.layout = layout;
        self.registered = new;
        self.last_inode = last;
    }

    /// The inodes and (family, port) of the listeners, for dumps.
    fn index(&mut self, layout: &[Vec<RawFd>]) {
        self.inodes.clear();
        let mut ports: Vec<(i32, u16)> = Vec::new();
        for (slot, fds) in layout.iter().enumerate() {
            if let Ok(inodes) = crate::readiness::socket_inodes(fds) {
                self.inodes.extend(inodes.into_iter().map(|i| (i, slot)));
            }
            for fd in fds {
                // SAFETY: as in `sync`.
                let borrowed = unsafe { BorrowedFd::borrow_raw(*fd) };
                let sock = socket2::SockRef::from(&borrowed);
                if let Some(addr) = sock.local_addr().ok().and_then(|a| a.as_socket()) {
                    let family = if addr.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
                    if !ports.contains(&(family, addr.port())) {
                        ports.push((family, addr.port()));
                    }
                }
            }
        }
        self.families = ports.iter().map(|p| p.0).fold(Vec::new(), |mut f, x| {
            if !f.contains(&x) {
                f.push(x);
            }
            f
        });
        self.dumps = (ports.len() <= PORTS_MAX).then_some(ports);
    }

    /// Each slot's accept-queue length now (the longest over its binds; None: unreadable).
    pub fn read(&mut self) -> Vec<Option<u32>> {
        let slots = self.layout.len();
        let n = match self.epoll.wait(&mut self.events, EpollTimeout::ZERO) {
            Ok(n) => n,
            Err(e) => {
                log::debug!("epoll_wait: {e}; reading every queue");
                return (0..slots).map(|s| max_len(&self.layout[s])).collect();
            }
        };
        let mut queues = vec![Some(0u32); slots];
        let ready: Vec<(usize, usize)> =
            self.events[..n].iter().map(|e| ((e.data() >> 8) as usize, (e.data() & 0xff) as usize)).collect();
        if ready.len() >= DUMP_FROM && ready.len() * 2 >= self.inodes.len() {
            if let Some(dumped) = self.dump(slots) {
                return dumped;
            }
        }
        for (slot, bind) in ready {
            let Some(fd) = self.layout.get(slot).and_then(|f| f.get(bind)) else { continue };
            queues[slot] = match (queues[slot], queue_len(*fd)) {
                (Some(a), Ok(b)) => Some(a.max(b)),
                _ => None,
            };
        }
        queues
    }

    /// Every queue from sock_diag dumps; None if a dump failed (then `TCP_INFO` is used).
    fn dump(&mut self, slots: usize) -> Option<Vec<Option<u32>>> {
        let diag = self.diag.as_mut()?;
        let requests: Vec<(i32, u16)> = match &self.dumps {
            Some(ports) => ports.clone(),
            None => self.families.iter().map(|f| (*f, 0)).collect(),
        };
        let mut queues = vec![Some(0u32); slots];
        for (family, port) in requests {
            match diag.listeners(family, port) {
                Ok(found) => {
                    for l in found {
                        if let Some(&slot) = self.inodes.get(&l.inode) {
                            queues[slot] = queues[slot].map(|q| q.max(l.queue));
                        }
                    }
                }
                Err(e) => {
                    log::warn!("sock_diag dump failed ({e}); reading queues with TCP_INFO from now on");
                    self.diag = None;
                    return None;
                }
            }
        }
        Some(queues)
    }

    /// Idle: wake the loop ([`Event::Queued`]) as soon as a connection waits anywhere.
    pub fn arm(&self) {
        let _ = self.arm.try_send(());
    }
}

/// The socket inode of `fd` (None: not open).
fn inode(fd: RawFd) -> Option<u64> {
    crate::readiness::socket_inodes(&[fd]).ok().and_then(|i| i.first().copied())
}

/// The longest queue of `fds` with `TCP_INFO` (None: one is unreadable).
pub fn max_len(fds: &[RawFd]) -> Option<u32> {
    fds.iter().map(|fd| queue_len(*fd)).collect::<std::io::Result<Vec<u32>>>().ok().and_then(|v| v.into_iter().max())
}

#[cfg(test)]
mod tests {
    use super::*;
    use socket2::{Domain, Socket, Type};
    use std::net::{SocketAddr, TcpStream};
    use std::os::fd::AsRawFd;

    fn group(n: usize) -> (Vec<Socket>, u16) {
        let mut socks = Vec::new();
        let mut port = 0;
        for _ in 0..n {
            let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
            s.set_reuse_port(true).unwrap();
            s.bind(&SocketAddr::from(([127, 0, 0, 1], port)).into()).unwrap();
            s.listen(64).unwrap();
            port = s.local_addr().unwrap().as_socket().unwrap().port();
            socks.push(s);
        }
        (socks, port)
    }

    fn until(mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !f() {
            assert!(Instant::now() < deadline, "condition not met within 5 s");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn only_queues_with_connections_are_read_and_a_connection_wakes_the_armed_thread() {
        let (socks, port) = group(8);
        let (tx, rx) = crossbeam_channel::unbounded();
        let mut q = Queues::start(tx).unwrap();
        q.sync(socks.iter().map(|s| vec![s.as_raw_fd()]).collect());
        assert_eq!(q.read(), vec![Some(0); 8]);
        q.arm();
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err(), "no wake while every queue is empty");
        let clients: Vec<TcpStream> = (0..6).map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap()).collect();
        assert!(matches!(rx.recv_timeout(Duration::from_secs(5)), Ok(Event::Queued)), "a waiting connection wakes");
        until(|| q.read().iter().map(|x| x.unwrap()).sum::<u32>() == 6);
        let by_tcp_info: Vec<Option<u32>> = socks.iter().map(|s| max_len(&[s.as_raw_fd()])).collect();
        assert_eq!(q.read(), by_tcp_info);
        // Accepted everywhere: empty again, and no wake until the next connection.
        for s in &socks {
            s.set_nonblocking(true).unwrap();
            while s.accept().is_ok() {}
        }
        assert_eq!(q.read(), vec![Some(0); 8]);
        drop(clients);
    }

    #[test]
    fn a_new_socket_on_a_reused_fd_number_is_watched() {
        let (socks, _) = group(2);
        let (tx, rx) = crossbeam_channel::unbounded();
        let mut q = Queues::start(tx).unwrap();
        let layout: Vec<Vec<RawFd>> = socks.iter().map(|s| vec![s.as_raw_fd()]).collect();
        q.sync(layout.clone());
        // The last slot closed and another added between two samples, on the same fd number:
        // dup2 puts a new listener (another port) there in one step.
        let (fresh, port) = group(1);
        // SAFETY: both fds are this test's own sockets; dup2 replaces the old one atomically.
        assert!(unsafe { libc::dup2(fresh[0].as_raw_fd(), layout[1][0]) } >= 0);
        drop(fresh);
        q.sync(layout); // the same numbers: only the inode tells
        let _c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        until(|| q.read() == vec![Some(0), Some(1)]);
        q.arm();
        assert!(matches!(rx.recv_timeout(Duration::from_secs(5)), Ok(Event::Queued)), "the new socket wakes");
    }

    #[test]
    fn a_dump_reads_the_same_queues_when_most_are_full() {
        let (socks, port) = group(DUMP_FROM);
        let (tx, _rx) = crossbeam_channel::unbounded();
        let mut q = Queues::start(tx).unwrap();
        q.sync(socks.iter().map(|s| vec![s.as_raw_fd()]).collect());
        // Enough connections that most listeners hold some (the kernel hashes them).
        let clients: Vec<TcpStream> =
            (0..DUMP_FROM * 8).map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap()).collect();
        until(|| q.read().iter().map(|x| x.unwrap()).sum::<u32>() == clients.len() as u32);
        let full = socks.iter().filter(|s| max_len(&[s.as_raw_fd()]) > Some(0)).count();
        assert!(full * 2 >= socks.len(), "{full} of {} listeners hold connections", socks.len());
        assert!(q.diag.is_some(), "sock_diag is available here");
        let by_tcp_info: Vec<Option<u32>> = socks.iter().map(|s| max_len(&[s.as_raw_fd()])).collect();
        assert_eq!(q.dump(socks.len()).unwrap(), by_tcp_info);
        assert_eq!(q.read(), by_tcp_info);
    }

    #[test]
    fn the_cadence_is_fast_while_something_happens_and_for_a_second_after() {
        let t = Instant::now();
        let mut c = Cadence::default();
        assert_eq!(c.next(t, false), (Cadence::IDLE, true));
        assert_eq!(c.next(t, true), (Cadence::FAST, false));
        assert_eq!(c.next(t + Duration::from_millis(999), false), (Cadence::FAST, false));
        assert_eq!(c.next(t + Duration::from_secs(1), false), (Cadence::IDLE, true));
        assert!(!c.traffic(t), "workers starting or stopping are no traffic");
        c.busy(t + Duration::from_secs(2));
        assert!(c.traffic(t + Duration::from_secs(2)));
        assert_eq!(c.next(t + Duration::from_secs(2), false), (Cadence::FAST, false));
        assert!(!c.traffic(t + Duration::from_secs(3)));
    }
}
