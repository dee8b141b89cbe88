//! Relaying connections: copying bytes both ways between a client's connection and a
//! connection the launcher opens to a target, for round-robin mode's forwarder (`proxy`) and
//! for the connections taken back from stalled slots (`rescue`).
//!
//! [`Pumps`]: one epoll set of relayed connections, each copied both ways with edge-triggered
//! non-blocking reads and writes through a fixed 16 KiB buffer per direction. Half-closes are
//! forwarded (shutdown(SHUT_WR) once a side's EOF has been flushed); an error ends only the
//! direction it happened in, so a worker's answer still reaches a client whose upload it
//! refused. Each connection costs the launcher two fds (main raises the soft RLIMIT_NOFILE to
//! the hard limit).
//!
//! [`Relay`]: the same for connections somebody else accepted: one or a few epoll threads take
//! (client, target) pairs from a channel (woken through an eventfd in their epoll set), connect
//! non-blocking to the target and pump.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use socket2::{Domain, Socket, Type};

const BUF: usize = 16 * 1024;
/// How long accepting pauses when the launcher is out of file descriptors.
pub const PAUSE: Duration = Duration::from_millis(100);
/// Epoll data from here up is the owner's own (listeners, wake-ups); below, relayed sides.
pub const RESERVED: u64 = u64::MAX - 1024;
/// Epoll data of a relay thread's wake-up eventfd.
const WAKE: u64 = u64::MAX;

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
    /// Connections handed to it and not yet finished.
    live: Arc<AtomicUsize>,
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
            let live = Arc::new(AtomicUsize::new(0));
            let (thread_wake, thread_stop, thread_live) = (wake.clone(), stop.clone(), live.clone());
            let thread = format!("{name}-{i}");
            std::thread::Builder::new().name(thread.clone()).spawn(move || {
                if let Err(e) = relay_loop(pumps, rx, &thread_wake, &thread_stop, &thread_live) {
                    log::error!("relay thread {thread} stopped: {e}");
                }
            })?;
            handles.push(RelayThread { tx, wake, stop, live });
        }
        Ok(Relay { threads: handles, next: AtomicUsize::new(0) })
    }

    /// Relay `client` (any blocking mode; it is made non-blocking) to `target`: connect there
    /// and copy bytes both ways until both sides are done. Never blocks. A failed connect to the
    /// target closes the client's connection.
    pub fn hand(&self, client: TcpStream, target: SocketAddr) -> io::Result<()> {
        let t = &self.threads[self.next.fetch_add(1, Ordering::Relaxed) % self.threads.len()];
        t.live.fetch_add(1, Ordering::AcqRel);
        if t.tx.send((client, target)).is_err() {
            t.live.fetch_sub(1, Ordering::AcqRel);
            return Err(io::Error::other("relay thread stopped"));
        }
        t.wake.write(1)?;
        Ok(())
    }

    /// Connections handed over and not finished yet (a reexec would cut them).
    pub fn carrying(&self) -> usize {
        self.threads.iter().map(|t| t.live.load(Ordering::Acquire)).sum()
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
    live: &AtomicUsize,
) -> io::Result<()> {
    let mut events = vec![EpollEvent::empty(); 256];
    loop {
        // Handed over but not taken in yet, plus what this thread carries.
        live.store(rx.len() + pumps.carried(), Ordering::Release);
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
/// `s` is `id * 2 + s`, below [`RESERVED`].
pub struct Pumps {
    pub epoll: Epoll,
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
}

impl Pumps {
    pub fn new() -> io::Result<Pumps> {
        Ok(Pumps { epoll: Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?, conns: Vec::new(), free: Vec::new() })
    }

    /// epoll_wait; `timeout_ms` -1 waits for ever. An interrupted wait reports no event.
    pub fn wait(&self, events: &mut [EpollEvent], timeout_ms: i32) -> io::Result<usize> {
        let timeout = u16::try_from(timeout_ms).map_or(EpollTimeout::NONE, EpollTimeout::from);
        match self.epoll.wait(events, timeout) {
            Ok(n) => Ok(n),
            Err(nix::errno::Errno::EINTR) => Ok(0),
            Err(e) => Err(e.into()),
        }
    }

    /// Start relaying `client` to `target`: a non-blocking connect, both sides in the set.
    pub fn open(&mut self, client: TcpStream, target: SocketAddr) -> io::Result<()> {
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
    pub fn pump(&mut self, data: u64) {
        self.pump_conn((data / 2) as usize);
    }

    fn pump_conn(&mut self, id: usize) {
        let Some(conn) = self.conns.get_mut(id).and_then(|c| c.as_mut()) else { return };
        if let Step::Closed = conn.pump() {
            self.release(id);
        }
    }

    /// Forget connection `id`: out of the epoll set, both sockets closed.
    /// Connections in the set.
    pub fn carried(&self) -> usize {
        self.conns.len() - self.free.len()
    }

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
    pub fn pump(&mut self) -> Step {
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
