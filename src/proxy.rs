//! Round-robin mode's data path, and the relay engine it shares with [`crate::rescue`].
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
//! reads that socket's accept-queue length (`TCP_INFO`, [`steer::queue_len`]) before choosing
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
//! **Relaying** ([`Pumps`], shared with [`Relay`]): copy bytes both ways with edge-triggered
//! non-blocking reads and writes through a fixed 16 KiB buffer per direction. Half-closes are
//! forwarded (shutdown(SHUT_WR) once a side's EOF has been flushed); an error ends only the
//! direction it happened in, so a worker's answer still reaches a client whose upload it
//! refused. Each connection costs the launcher two fds (main raises the soft RLIMIT_NOFILE to
//! the hard limit); out of fds, a thread pauses accepting for a moment rather than spin.
//!
//! **[`Relay`]**: the same relaying for connections somebody else accepted: one or a few epoll
//! threads take (client, target) pairs from a channel (woken through an eventfd in their epoll
//! set), connect non-blocking to the target and pump. [`crate::rescue`] uses it.
//!
//! The supervisor owns the backend list: [`Proxy::set_backends`] after every change in which
//! slots serve. A slot being rolled gets no new connections until its new worker took over.
//! With no serving slot the threads stop accepting, so connections wait in the public queue.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use socket2::{Domain, Socket, Type};

use crate::steer;

const BUF: usize = 16 * 1024;
/// How long accepting pauses when the launcher is out of file descriptors.
pub const PAUSE: Duration = Duration::from_millis(100);
/// Epoll data of the public listeners: `LISTENER + bind index`.
const LISTENER: u64 = u64::MAX - 1024;
/// Epoll data of a relay thread's wake-up eventfd.
const WAKE: u64 = u64::MAX;

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
        let queued = list[i].listener.map_or(0, |fd| steer::queue_len(fd).unwrap_or(0));
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

/// EMFILE or ENFILE: the process or the system is out of file descriptors.
pub fn out_of_fds(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// A relay engine: threads that each pump the connections handed to them ([`Relay::hand`]).
/// Dropping it (its last `Arc`) stops the threads, closing the connections they still carry.
pub struct Relay {
    threads: Vec<RelayThread>,
    next: AtomicUsize,
}

/// The handle of one relay thread.
struct RelayThread {
    tx: Sender<(TcpStream, SocketAddr)>,
    wake: Arc<EventFd>,
    stop: Arc<AtomicBool>,
}

impl Relay {
    /// Start `threads` (at least one) relay threads, named `{name}-{i}`.
    pub fn start(name: &str, threads: usize) -> io::Result<Relay> {
        let mut handles = Vec::new();
        for i in 0..threads.max(1) {
            let (tx, rx) = crossbeam_channel::unbounded();
            let wake = Arc::new(EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?);
            let stop = Arc::new(AtomicBool::new(false));
            let pumps = Pumps::new()?;
            pumps.epoll.add(wake.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, WAKE))?;
            let (thread_wake, thread_stop) = (wake.clone(), stop.clone());
            let thread = format!("{name}-{i}");
            std::thread::Builder::new().name(thread.clone()).spawn(move || {
                if let Err(e) = relay_loop(pumps, rx, &thread_wake, &thread_stop) {
                    log::error!("relay thread {thread} stopped: {e}");
                }
            })?;
            handles.push(RelayThread { tx, wake, stop });
        }
        Ok(Relay { threads: handles, next: AtomicUsize::new(0) })
    }

    /// Relay `client` (any blocking mode; it is made non-blocking) to `target`: connect there
    /// and copy bytes both ways until both sides are done. Never blocks. A failed connect to the
    /// target closes the client's connection.
    pub fn hand(&self, client: TcpStream, target: SocketAddr) -> io::Result<()> {
        let t = &self.threads[self.next.fetch_add(1, Ordering::Relaxed) % self.threads.len()];
        t.tx.send((client, target)).map_err(|_| io::Error::other("relay thread stopped"))?;
        t.wake.write(1)?;
        Ok(())
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        for t in &self.threads {
            t.stop.store(true, Ordering::Release);
            let _ = t.wake.write(1);
        }
    }
}

fn relay_loop(
    mut pumps: Pumps,
    rx: Receiver<(TcpStream, SocketAddr)>,
    wake: &EventFd,
    stop: &AtomicBool,
) -> io::Result<()> {
    let mut events = vec![EpollEvent::empty(); 256];
    loop {
        let n = pumps.wait(&mut events, -1)?;
        for ev in &events[..n] {
            if ev.data() != WAKE {
                pumps.pump(ev.data());
                continue;
            }
            if stop.load(Ordering::Acquire) {
                return Ok(());
            }
            let _ = wake.read(); // reset the counter (EAGAIN: already reset)
            loop {
                match rx.try_recv() {
                    Ok((client, target)) => {
                        if let Err(e) = pumps.open(client, target) {
                            log::warn!("cannot relay a connection to {target}: {e}");
                        }
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => return Ok(()),
                }
            }
        }
    }
}

/// The connections one thread relays, in its epoll set. Epoll data of a connection's side
/// `s` is `id * 2 + s`, below [`LISTENER`].
struct Pumps {
    epoll: Epoll,
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
}

impl Pumps {
    fn new() -> io::Result<Pumps> {
        Ok(Pumps { epoll: Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?, conns: Vec::new(), free: Vec::new() })
    }

    /// epoll_wait; `timeout_ms` -1 waits for ever. An interrupted wait reports no event.
    fn wait(&self, events: &mut [EpollEvent], timeout_ms: i32) -> io::Result<usize> {
        let timeout = u16::try_from(timeout_ms).map_or(EpollTimeout::NONE, EpollTimeout::from);
        match self.epoll.wait(events, timeout) {
            Ok(n) => Ok(n),
            Err(nix::errno::Errno::EINTR) => Ok(0),
            Err(e) => Err(e.into()),
        }
    }

    /// Start relaying `client` to `target`: a non-blocking connect, both sides in the set.
    fn open(&mut self, client: TcpStream, target: SocketAddr) -> io::Result<()> {
        client.set_nonblocking(true)?;
        client.set_nodelay(true)?;
        let backend = Socket::new(Domain::for_address(target), Type::STREAM.cloexec(), None)?;
        backend.set_nonblocking(true)?;
        backend.set_tcp_nodelay(true)?;
        let connected = match backend.connect(&target.into()) {
            Ok(()) => true,
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => false,
            Err(e) => return Err(e),
        };
        let conn = Conn {
            sides: [client, backend.into()],
            connected,
            bufs: [Box::new([0; BUF]), Box::new([0; BUF])],
            pending: [(0, 0); 2],
            eof: [false; 2],
            done: [false; 2],
        };
        let id = match self.free.pop() {
            Some(id) => {
                self.conns[id] = Some(conn);
                id
            }
            None => {
                self.conns.push(Some(conn));
                self.conns.len() - 1
            }
        };
        let flags = EpollFlags::EPOLLIN | EpollFlags::EPOLLOUT | EpollFlags::EPOLLRDHUP | EpollFlags::EPOLLET;
        let conn = self.conns[id].as_ref().expect("just stored");
        for (side, s) in conn.sides.iter().enumerate() {
            if let Err(e) = self.epoll.add(s.as_fd(), EpollEvent::new(flags, (id * 2 + side) as u64)) {
                self.release(id);
                return Err(e.into());
            }
        }
        // The client may have sent its request already: edge-triggered, so read it now.
        self.pump_conn(id);
        Ok(())
    }

    /// Handle an event of the connection side whose epoll data is `data`.
    fn pump(&mut self, data: u64) {
        self.pump_conn((data / 2) as usize);
    }

    fn pump_conn(&mut self, id: usize) {
        let Some(conn) = self.conns.get_mut(id).and_then(|c| c.as_mut()) else { return };
        if let Step::Closed = conn.pump() {
            self.release(id);
        }
    }

    /// Forget connection `id`: out of the epoll set, both sockets closed.
    fn release(&mut self, id: usize) {
        if let Some(conn) = self.conns[id].take() {
            for s in &conn.sides {
                let _ = self.epoll.delete(s.as_fd());
            }
            self.free.push(id);
        }
    }
}

/// One forwarded connection: side 0 is the client, side 1 the worker.
struct Conn {
    sides: [TcpStream; 2],
    /// The worker side's non-blocking connect has completed.
    connected: bool,
    /// bufs[i]: bytes read from side i, not yet written to the other side (start, end).
    bufs: [Box<[u8; BUF]>; 2],
    pending: [(usize, usize); 2],
    /// Side i has sent EOF.
    eof: [bool; 2],
    /// The direction from side i is finished: its EOF was passed on, or an error ended it.
    done: [bool; 2],
}

enum Step {
    Open,
    Closed,
}

impl Conn {
    /// Move bytes both ways until nothing moves; Closed when the connection is finished.
    fn pump(&mut self) -> Step {
        if !self.connected {
            match self.sides[1].take_error() {
                Ok(None) if self.sides[1].peer_addr().is_err() => {} // still connecting
                Ok(None) => self.connected = true,
                _ => return Step::Closed, // the connect failed: nothing can be forwarded
            }
        }
        loop {
            let moved = self.transfer(0, 1) | self.transfer(1, 0);
            if self.done == [true, true] {
                return Step::Closed;
            }
            if !moved {
                return Step::Open;
            }
        }
    }

    /// One round of reading from side `from` and writing to side `to`; true if anything
    /// happened. An error ends only this direction: the other may still carry, say, the
    /// worker's answer to a client whose upload it refused.
    fn transfer(&mut self, from: usize, to: usize) -> bool {
        if self.done[from] {
            return false;
        }
        let mut moved = false;
        if self.pending[from] == (0, 0) && !self.eof[from] {
            match (&self.sides[from]).read(&mut self.bufs[from][..]) {
                Ok(0) => self.eof[from] = true,
                Ok(n) => self.pending[from] = (0, n),
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => {}
                Err(_) => return self.end(from, to),
            }
            moved = self.eof[from] || self.pending[from] != (0, 0);
        }
        // The worker side takes nothing before its connect completes (it wakes us then).
        let writable = to == 0 || self.connected;
        let (start, end) = self.pending[from];
        if start < end && writable {
            match (&self.sides[to]).write(&self.bufs[from][start..end]) {
                Ok(n) => {
                    self.pending[from].0 += n;
                    if self.pending[from].0 == end {
                        self.pending[from] = (0, 0);
                    }
                    moved = true;
                }
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => {}
                Err(_) => return self.end(from, to),
            }
        }
        if self.eof[from] && self.pending[from] == (0, 0) && writable {
            // Everything `from` sent has been delivered: pass its EOF on.
            let _ = self.sides[to].shutdown(Shutdown::Write);
            self.done[from] = true;
            moved = true;
        }
        moved
    }

    /// End the direction from `from` to `to` after an error: drop what is buffered, read no
    /// more from `from`, and tell `to` that nothing more comes.
    fn end(&mut self, from: usize, to: usize) -> bool {
        self.done[from] = true;
        self.pending[from] = (0, 0);
        let _ = self.sides[from].shutdown(Shutdown::Read);
        if to == 0 || self.connected {
            let _ = self.sides[to].shutdown(Shutdown::Write);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
        while steer::queue_len(a_fd).unwrap() == 0 {
            assert!(Instant::now() < deadline, "nothing reached A");
            let c = TcpStream::connect(("127.0.0.1", port)).unwrap();
            stranded.push(c);
            // Wait until this one is either queued at A or taken by B.
            let n = stranded.len();
            while steer::queue_len(a_fd).unwrap() == 0 && b_took.load(Ordering::SeqCst) < n {
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
        assert_eq!(steer::queue_len(a_fd).unwrap(), 1, "A received no more");
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
                sum += u64::from(steer::queue_len(fd).unwrap());
            }
            let per = start.elapsed() / n;
            assert_eq!(sum, u64::from(n));
            eprintln!("round {round}: queue_len {per:?} per call");
        }
    }
}
