//! Round-robin mode's data path: the launcher accepts every connection on the public socket
//! and forwards its bytes to the next worker in turn, as Node's cluster primary and PM2 do.
//! It exists so that the kernel-balanced modes can be measured against the accepting-master
//! design on the same workers (bench/); it is not the recommended mode.
//!
//! Each worker slot has a private listening socket on loopback (held by the launcher for its
//! whole life, like the reuseport sockets), handed to the worker as fd 3. A small fixed set of
//! forwarding threads (`--proxy-threads`) each run one epoll loop: they take turns accepting
//! on the public sockets (EPOLLEXCLUSIVE), connect to the next serving slot's private address
//! (one shared round-robin counter), and copy bytes both ways with edge-triggered non-blocking
//! reads and writes through a fixed 16 KiB buffer per direction. Half-closes are forwarded
//! (shutdown(SHUT_WR) once a side's EOF has been flushed); an error ends only the direction it
//! happened in, so a worker's answer still reaches a client whose upload it refused. Each
//! connection costs the launcher two fds (main raises the soft RLIMIT_NOFILE to the hard
//! limit); out of fds, a thread pauses accepting for a moment rather than spin.
//!
//! The supervisor owns the backend list: [`Proxy::set_backends`] after every change in which
//! slots serve. A slot being rolled gets no new connections until its new worker took over.
//! With no serving slot the threads stop accepting, so connections wait in the public queue.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use socket2::{Domain, Socket, Type};

const BUF: usize = 16 * 1024;
/// How long accepting pauses when the launcher is out of file descriptors.
const PAUSE: Duration = Duration::from_millis(100);
/// Epoll data of the public listeners: `LISTENER + bind index`.
const LISTENER: u64 = u64::MAX - 1024;

/// Per bind, the private addresses of the serving slots, in slot order.
type Backends = Vec<Vec<SocketAddr>>;

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
            let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
            std::thread::Builder::new().name(format!("proxy-{i}")).spawn(move || {
                let mut w = Forwarder {
                    epoll,
                    public,
                    shared,
                    conns: Vec::new(),
                    free: Vec::new(),
                    version: 0,
                    listening: false,
                    paused_until: None,
                };
                if let Err(e) = w.run() {
                    log::error!("round-robin forwarding thread {i} stopped: {e}");
                }
            })?;
        }
        Ok(Proxy { shared })
    }

    /// The serving slots' private addresses, per bind.
    pub fn set_backends(&self, backends: Backends) {
        *self.shared.backends.write().expect("backends lock") = Arc::new(backends);
        self.shared.version.fetch_add(1, Ordering::Release);
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

struct Forwarder {
    epoll: Epoll,
    public: Arc<Vec<TcpListener>>,
    shared: Arc<Shared>,
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
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
            let n = match self.epoll.wait(&mut events, EpollTimeout::from(100u16)) {
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            };
            for ev in &events[..n] {
                let data = ev.data();
                if data >= LISTENER {
                    self.accept((data - LISTENER) as usize)?;
                } else {
                    self.pump((data / 2) as usize);
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
                self.epoll.add(l.as_fd(), EpollEvent::new(flags, LISTENER + i as u64))?;
            } else {
                self.epoll.delete(l.as_fd())?;
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
                Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
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
            let target = list[self.shared.next.fetch_add(1, Ordering::Relaxed) % list.len()];
            if let Err(e) = self.open(client, target) {
                log::warn!("round-robin: cannot forward a connection to {target}: {e}");
            }
        }
        Ok(())
    }

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
        self.pump(id);
        Ok(())
    }

    fn pump(&mut self, id: usize) {
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
}
