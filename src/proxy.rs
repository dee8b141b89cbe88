//! Round-robin mode's data path: accepting on the public sockets and choosing a worker; the
//! bytes are then relayed by `relay`.
//!
//! **Round-robin mode** ([`Proxy`]): the launcher accepts every connection on the public socket
//! and forwards its bytes to the next worker in turn, as Node's cluster primary and PM2 do.
//! It exists so that the kernel-balanced modes can be measured against the accepting-master
//! design on the same workers (bench/); it is not the recommended mode.
//!
//! Each worker slot has a private listening socket on loopback (held by the launcher for its
//! whole life, like the reuseport sockets), handed to the worker as fd 3. A small fixed set of
//! forwarding threads (`--proxy-threads`) each run one epoll loop: they take turns accepting
//! on the public sockets (EPOLLEXCLUSIVE), connect to the next serving slot's private address
//! (one shared round-robin counter), and relay the connection (below).
//!
//! Node cluster's rule: a worker gets the next connection only once it took the previous one.
//! When a backend comes with its private listening fd ([`Backend::listener`]), the forwarder
//! reads that socket's accept-queue length (`TCP_INFO`, [`sys::queue_len`]) before choosing
//! it: the turn's backend is skipped when its queue is not empty and another backend's is;
//! when every queue is non-empty the shortest wins (ties: the one whose turn it is). So while
//! another worker keeps up, a stuck worker (SIGSTOP, deadlock) strands only the one connection
//! it did not take (which [`crate::rescue`] can take back), and a busy one gets no second
//! connection while an idle one waits. The check is one
//! `getsockopt(TCP_INFO)` per backend looked at, usually one per connection: measured
//! **0.26-0.29 µs** per call (release build, 2 shared vCPUs under load, Linux 6.18; `cargo
//! test --release --bin reuse-launch queue_check_cost -- --ignored --nocapture`), against about
//! 150 µs of launcher CPU per forwarded connection in the benchmarks (C workers: 5,712
//! connections/s at 87% of a core), i.e. ~0.2%. A failed check counts as an empty queue, i.e.
//! plain round-robin. Reading the queue changes nothing on the socket, which the worker shares.
//!
//! The supervisor owns the backend list: [`Proxy::set_backends`] after every change in which
//! slots serve. A slot being rolled gets no new connections until its new worker took over.
//! With no serving slot the threads stop accepting, so connections wait in the public queue.

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd, RawFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use nix::sys::epoll::{EpollEvent, EpollFlags};

use crate::relay::{out_of_fds, Pumps, PAUSE, RESERVED};
use crate::sys;

/// Epoll data of the public listeners: `LISTENER + bind index`.
const LISTENER: u64 = RESERVED;

/// One serving slot's private socket for one bind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backend {
    /// Where the forwarder connects.
    pub addr: SocketAddr,
    /// The slot's private listening socket (owned by the caller, open for the launcher's
    /// life): its accept queue decides whether the slot may get the next connection. None:
    /// plain round-robin for this backend.
    pub listener: Option<RawFd>,
}

impl From<SocketAddr> for Backend {
    fn from(addr: SocketAddr) -> Backend {
        Backend { addr, listener: None }
    }
}

impl From<(SocketAddr, RawFd)> for Backend {
    fn from((addr, fd): (SocketAddr, RawFd)) -> Backend {
        Backend { addr, listener: Some(fd) }
    }
}

/// Per bind, the serving slots' backends, in slot order.
type Backends = Vec<Vec<Backend>>;

struct Shared {
    backends: RwLock<Arc<Backends>>,
    /// Bumped by every change of `backends`, so threads notice cheaply.
    version: AtomicU64,
    next: AtomicUsize,
}

/// Handle kept by the supervisor.
pub struct Proxy {
    shared: Arc<Shared>,
}

impl Proxy {
    /// Start `threads` forwarding threads over `public` (one listening socket per bind). They
    /// accept nothing until the first `set_backends`.
    pub fn start(public: Vec<TcpListener>, threads: usize) -> io::Result<Proxy> {
        let shared = Arc::new(Shared {
            backends: RwLock::new(Arc::new(vec![Vec::new(); public.len()])),
            version: AtomicU64::new(0),
            next: AtomicUsize::new(0),
        });
        let public = Arc::new(public);
        for l in public.iter() {
            l.set_nonblocking(true)?;
        }
        for i in 0..threads.max(1) {
            let (shared, public) = (shared.clone(), public.clone());
            let pumps = Pumps::new()?;
            std::thread::Builder::new().name(format!("proxy-{i}")).spawn(move || {
                let mut w = Forwarder { pumps, public, shared, version: 0, listening: false, paused_until: None };
                if let Err(e) = w.run() {
                    log::error!("round-robin forwarding thread {i} stopped: {e}");
                }
            })?;
        }
        Ok(Proxy { shared })
    }

    /// The serving slots' backends, per bind, in slot order: each a private address
    /// (`SocketAddr`: plain round-robin) or a private address with that slot's private listening
    /// fd (`(SocketAddr, RawFd)`: round-robin that skips a slot whose worker has not taken its
    /// previous connection, see the module doc). The fds stay owned by the caller and must stay
    /// open while they are in the list (the launcher keeps them for its life).
    pub fn set_backends<B: Into<Backend>>(&self, backends: Vec<Vec<B>>) {
        let backends: Backends = backends.into_iter().map(|b| b.into_iter().map(Into::into).collect()).collect();
        *self.shared.backends.write().expect("backends lock") = Arc::new(backends);
        self.shared.version.fetch_add(1, Ordering::Release);
    }
}

/// Choose the backend for the next connection: the one whose turn it is (`turn`, the shared
/// counter), unless its accept queue is not empty; then the first in turn order with an empty
/// queue, else the shortest queue.
fn pick(list: &[Backend], turn: usize) -> SocketAddr {
    let mut best: Option<(u32, usize)> = None;
    for k in 0..list.len() {
        let i = (turn + k) % list.len();
        // Unreadable counts as empty: plain round-robin.
        let queued = list[i].listener.map_or(0, |fd| sys::queue_len(fd).unwrap_or(0));
        if queued == 0 {
            return list[i].addr;
        }
        if best.is_none_or(|(q, _)| queued < q) {
            best = Some((queued, i));
        }
    }
    list[best.expect("a non-empty list").1].addr
}

struct Forwarder {
    pumps: Pumps,
    public: Arc<Vec<TcpListener>>,
    shared: Arc<Shared>,
    version: u64,
    listening: bool,
    /// Accepting is paused (out of fds) until then.
    paused_until: Option<Instant>,
}

impl Forwarder {
    fn run(&mut self) -> io::Result<()> {
        let mut events = vec![EpollEvent::empty(); 256];
        loop {
            // Listen while some slot serves on every bind and accepting is not paused.
            let version = self.shared.version.load(Ordering::Acquire);
            let resume = self.paused_until.is_some_and(|t| Instant::now() >= t);
            if version != self.version || resume {
                self.version = version;
                if resume {
                    self.paused_until = None;
                }
                let want = self.paused_until.is_none() && self.backends().iter().all(|b| !b.is_empty());
                if want != self.listening {
                    self.listen(want)?;
                }
            }
            // Wake up now and then to notice backend changes while idle or paused.
            let n = self.pumps.wait(&mut events, 100)?;
            for ev in &events[..n] {
                let data = ev.data();
                if data >= LISTENER {
                    self.accept((data - LISTENER) as usize)?;
                } else {
                    self.pumps.pump(data);
                }
            }
        }
    }

    fn backends(&self) -> Arc<Backends> {
        self.shared.backends.read().expect("backends lock").clone()
    }

    fn listen(&mut self, on: bool) -> io::Result<()> {
        if on == self.listening {
            return Ok(());
        }
        self.listening = on;
        for (i, l) in self.public.iter().enumerate() {
            if on {
                let flags = EpollFlags::EPOLLIN | EpollFlags::EPOLLEXCLUSIVE;
                self.pumps.epoll.add(l.as_fd(), EpollEvent::new(flags, LISTENER + i as u64))?;
            } else {
                self.pumps.epoll.delete(l.as_fd())?;
            }
        }
        Ok(())
    }

    /// Accept what is waiting on public socket `bind` and forward each connection to the next
    /// serving slot. Accepts nothing while no slot serves: connections wait in the queue.
    fn accept(&mut self, bind: usize) -> io::Result<()> {
        let backends = self.backends();
        let list = &backends[bind];
        if list.is_empty() {
            return Ok(());
        }
        for _ in 0..64 {
            let client = match self.public[bind].accept() {
                Ok((c, _)) => c,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if out_of_fds(&e) => {
                    // Out of fds: stop accepting for a moment instead of spinning on the queue.
                    log::warn!("round-robin: cannot accept ({e}); pausing for {PAUSE:?}");
                    self.listen(false)?;
                    self.paused_until = Some(Instant::now() + PAUSE);
                    return Ok(());
                }
                Err(e) => {
                    log::debug!("accept: {e}");
                    return Ok(());
                }
            };
            let target = pick(list, self.shared.next.fetch_add(1, Ordering::Relaxed));
            if let Err(e) = self.pumps.open(client, target) {
                log::warn!("round-robin: cannot forward a connection to {target}: {e}");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpStream};
    use std::time::Duration;

    /// Two echo backends that prefix their answer with their name; the proxy alternates.
    #[test]
    fn forwards_both_ways_round_robin_with_half_close() {
        let mut addrs = Vec::new();
        for name in ["a", "b"] {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            addrs.push(l.local_addr().unwrap());
            std::thread::spawn(move || {
                for s in l.incoming() {
                    let mut s = s.unwrap();
                    let mut req = String::new();
                    s.read_to_string(&mut req).unwrap(); // until the client's half-close
                    s.write_all(format!("{name}:{req}").as_bytes()).unwrap();
                }
            });
        }
        let public = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = public.local_addr().unwrap().port();
        let proxy = Proxy::start(vec![public], 1).unwrap();
        proxy.set_backends(vec![addrs.clone()]);
        let mut answers = Vec::new();
        for i in 0..4 {
            let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let big = "x".repeat(100_000 * (i % 2));
            c.write_all(format!("hello{i}{big}").as_bytes()).unwrap();
            c.shutdown(Shutdown::Write).unwrap();
            let mut answer = String::new();
            c.read_to_string(&mut answer).unwrap();
            let (name, echoed) = answer.split_once(':').unwrap();
            assert_eq!(echoed.len(), 6 + 100_000 * (i % 2), "the whole payload came back");
            assert!(echoed.starts_with(&format!("hello{i}")));
            answers.push(name.to_string());
        }
        answers.sort();
        assert_eq!(answers, vec!["a", "a", "b", "b"], "round robin over both backends");
    }

    /// Node cluster's rule: backend A's worker never accepts; once one connection waits in A's
    /// queue, every further connection goes to B.
    #[test]
    fn skips_a_backend_that_has_not_taken_its_last_connection() {
        use std::os::fd::AsRawFd;
        let a = TcpListener::bind("127.0.0.1:0").unwrap();
        let b = TcpListener::bind("127.0.0.1:0").unwrap();
        let (a_fd, b_fd) = (a.as_raw_fd(), b.as_raw_fd());
        let backends = vec![vec![(a.local_addr().unwrap(), a_fd), (b.local_addr().unwrap(), b_fd)]];
        let b_took = Arc::new(AtomicUsize::new(0));
        let took = b_took.clone();
        std::thread::spawn(move || {
            for s in b.incoming() {
                let s = s.unwrap();
                took.fetch_add(1, Ordering::SeqCst);
                std::thread::spawn(move || {
                    let mut s = s;
                    let mut req = String::new();
                    s.read_to_string(&mut req).unwrap();
                    s.write_all(format!("b:{req}").as_bytes()).unwrap();
                });
            }
        });
        let public = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = public.local_addr().unwrap().port();
        let proxy = Proxy::start(vec![public], 1).unwrap();
        proxy.set_backends(backends);
        let deadline = Instant::now() + Duration::from_secs(10);
        // Whichever backend's turn it is, the first connections fill A's queue with one.
        let mut stranded = Vec::new();
        while sys::queue_len(a_fd).unwrap() == 0 {
            assert!(Instant::now() < deadline, "nothing reached A");
            let c = TcpStream::connect(("127.0.0.1", port)).unwrap();
            stranded.push(c);
            // Wait until this one is either queued at A or taken by B.
            let n = stranded.len();
            while sys::queue_len(a_fd).unwrap() == 0 && b_took.load(Ordering::SeqCst) < n {
                assert!(Instant::now() < deadline, "connection {n} went nowhere");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let before = b_took.load(Ordering::SeqCst);
        for i in 0..10 {
            let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            c.write_all(format!("req{i}").as_bytes()).unwrap();
            c.shutdown(Shutdown::Write).unwrap();
            let mut answer = String::new();
            c.read_to_string(&mut answer).unwrap();
            assert_eq!(answer, format!("b:req{i}"));
        }
        assert_eq!(b_took.load(Ordering::SeqCst), before + 10, "B received every later connection");
        assert_eq!(sys::queue_len(a_fd).unwrap(), 1, "A received no more");
        drop((stranded, a));
    }

    #[test]
    fn pick_prefers_an_empty_queue_then_the_shortest() {
        let ls: Vec<TcpListener> = (0..3).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
        let queued = [2, 1, 3];
        let _clients: Vec<TcpStream> = ls
            .iter()
            .zip(queued)
            .flat_map(|(l, n)| (0..n).map(|_| TcpStream::connect(l.local_addr().unwrap()).unwrap()))
            .collect();
        let list: Vec<Backend> =
            ls.iter().map(|l| (l.local_addr().unwrap(), std::os::fd::AsRawFd::as_raw_fd(l)).into()).collect();
        let addr = |i: usize| ls[i].local_addr().unwrap();
        for turn in 0..3 {
            assert_eq!(pick(&list, turn), addr(1), "shortest queue");
        }
        ls[1].accept().unwrap();
        assert_eq!(pick(&list, 2), addr(1), "empty beats the turn's backend");
        // Without fds: plain round-robin.
        let plain: Vec<Backend> = ls.iter().map(|l| l.local_addr().unwrap().into()).collect();
        assert_eq!((pick(&plain, 0), pick(&plain, 2), pick(&plain, 4)), (addr(0), addr(2), addr(1)));
    }

    /// The cost of the queue check: one getsockopt(TCP_INFO) on a listener. Run with
    /// `cargo test --release --bin reuse-launch queue_check_cost -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn queue_check_cost() {
        use std::os::fd::AsRawFd;
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let _queued = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let fd = l.as_raw_fd();
        let n = 1_000_000;
        for round in 0..3 {
            let start = Instant::now();
            let mut sum = 0u64;
            for _ in 0..n {
                sum += u64::from(sys::queue_len(fd).unwrap());
            }
            let per = start.elapsed() / n;
            assert_eq!(sum, u64::from(n));
            eprintln!("round {round}: queue_len {per:?} per call");
        }
    }
}
