//! Strand nothing (issue 8): takes back the connections already queued on the listening
//! sockets of a slot whose worker stopped accepting (SIGSTOPped, deadlocked, a long GC), and
//! relays each one to a slot that serves.
//!
//! The supervisor notices a stuck slot and steers *new* connections away from it (`steer`);
//! this module owns what was queued there before: [`Rescue::take`] starts accepting on the
//! slot's listening sockets from the launcher, [`Rescue::release`] stops when the worker
//! accepts again or the slot is being closed. Each connection taken is handed to a [`Relay`]
//! (the round-robin forwarder's pump, see `proxy`) with its target: in reuseport mode the
//! bind's public address in its loopback form ([`loopback`]), which the BPF steering (with the
//! stuck slot excluded) sends to a serving slot; in round-robin mode another slot's private
//! address. The caller must only take a slot while new connections to the target cannot come
//! back to it (the slot is excluded from steering and another slot serves): otherwise a
//! relayed connection can land in the same queue, be taken again, and circle.
//!
//! **The listening sockets are shared with the worker.** The slot's worker has the same open
//! file description as its fd 3, so any file status flag (`O_NONBLOCK`) or socket option
//! (`SO_RCVTIMEO`) set here would change the worker's `accept()` too: a plain blocking server
//! would get EAGAIN. So nothing here changes any flag or option of those fds, and nothing here
//! closes them (they are the caller's, open for the launcher's life). Instead, one thread per
//! slot (spawned on the slot's first `take`, parked on a condition variable while released,
//! reused on the next `take`; so at most one per slot ever taken, plus one relay thread) loops:
//! `poll(2)` for readability with a [`POLL_MS`] timeout (so a release is noticed within that),
//! then while the socket's accept queue (`TCP_INFO`) is not empty, a blocking
//! `accept4(SOCK_CLOEXEC | SOCK_NONBLOCK)` (those flags apply to the new socket only).
//!
//! **The race.** Between the queue check and `accept4` the worker may resume and take the
//! last queued connection. Our `accept4` then blocks (if the socket is blocking; a worker that
//! set `O_NONBLOCK` itself, as Node does, makes it return EAGAIN instead) until the next
//! connection reaches that socket, which it takes and relays like the others: nothing is
//! lost, one connection takes a detour through the launcher. Until then the thread ignores
//! `release` (and the slot's next `take` finds it still there).
//!
//! **What the worker sees.** A relayed connection is a new connection from the launcher: its
//! peer address is the launcher's loopback address, not the client's, and it reaches whichever
//! worker the target leads to. Bytes and half-closes pass through unchanged; the connection
//! costs the launcher two fds while it lasts. Out of fds, a slot's thread pauses for
//! [`crate::relay::PAUSE`] rather than spin on the queue.

// Not used by the supervisor yet: it is wired in separately.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::os::fd::{BorrowedFd, FromRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{accept4, SockFlag};

use crate::relay::{out_of_fds, Relay, PAUSE};
use crate::sys;

/// How long a slot's thread waits in poll(2) before it looks again at whether it still takes.
pub const POLL_MS: u16 = 20;
/// How long dropping a [`Rescue`] waits for its threads to leave the fds.
const DROP_WAIT: Duration = Duration::from_millis(200);
/// At most this many connections per socket per poll round, so every socket gets its turn.
const BATCH: usize = 64;

/// Takes the connections queued on listening sockets whose worker stopped accepting, and
/// relays each.
pub struct Rescue {
    relay: Arc<Relay>,
    slots: Mutex<HashMap<usize, Arc<Slot>>>,
    relayed: Arc<AtomicU64>,
}

/// One slot's taking thread and what it should do.
struct Slot {
    state: Mutex<State>,
    changed: Condvar,
    relayed: AtomicU64,
}

#[derive(Default)]
struct State {
    /// What to take from: (listening fd, where its connections go).
    listeners: Vec<(RawFd, SocketAddr)>,
    taking: bool,
    /// The Rescue is gone: the thread ends.
    closing: bool,
    /// The thread waits for the next `take` (touches no fd).
    parked: bool,
    /// The thread has ended.
    ended: bool,
}

impl Rescue {
    pub fn start() -> io::Result<Rescue> {
        Ok(Rescue {
            relay: Arc::new(Relay::start("rescue-relay", 1)?),
            slots: Mutex::new(HashMap::new()),
            relayed: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Start taking what is queued on `slot`'s listening sockets: for each (fd, target), accept
    /// and relay to target. Replaces the list of an earlier `take` of the slot; an empty list
    /// is a `release`. The fds are owned by the caller, which must keep them open for the life
    /// of this `Rescue` (the launcher keeps them for its own): a thread may still be in one
    /// `poll` or a blocked `accept` on them after `release` returns. Rescue never closes them
    /// and never changes their flags or options.
    pub fn take(&self, slot: usize, listeners: &[(RawFd, SocketAddr)]) {
        if listeners.is_empty() {
            return self.release(slot);
        }
        let mut slots = self.slots.lock().expect("rescue slots");
        let s = match slots.get(&slot) {
            Some(s) => s.clone(),
            None => {
                let s = Arc::new(Slot { state: Mutex::default(), changed: Condvar::new(), relayed: AtomicU64::new(0) });
                let (thread_slot, relay, total) = (s.clone(), self.relay.clone(), self.relayed.clone());
                let spawned = std::thread::Builder::new()
                    .name(format!("rescue-{slot}"))
                    .spawn(move || take_loop(&thread_slot, &relay, &total));
                if let Err(e) = spawned {
                    log::error!("cannot start taking the connections queued on slot {slot}: {e}");
                    return;
                }
                slots.insert(slot, s.clone());
                s
            }
        };
        let mut state = s.state.lock().expect("rescue slot");
        state.listeners = listeners.to_vec();
        state.taking = true;
        s.changed.notify_all();
    }

    /// Stop taking from `slot` (its worker accepts again, or it is being closed). Returns at
    /// once; the slot's thread parks within [`POLL_MS`], or after the accept it is blocked in
    /// (see the module doc).
    pub fn release(&self, slot: usize) {
        if let Some(s) = self.slots.lock().expect("rescue slots").get(&slot) {
            s.state.lock().expect("rescue slot").taking = false;
            s.changed.notify_all();
        }
    }

    /// Before `slot`'s sockets `fds` are closed (`scale` down, their queues empty): stop taking,
    /// and true once the slot's thread has left them. A thread blocked in `accept` on one of
    /// them (see the module doc) is woken by shutting the listener down (nothing is queued
    /// there, and the caller closes it next); the caller asks again on its next turn.
    pub fn let_go(&self, slot: usize, fds: &[RawFd]) -> bool {
        self.release(slot);
        let Some(s) = self.slots.lock().expect("rescue slots").get(&slot).cloned() else { return true };
        let parked = s.state.lock().expect("rescue slot").parked;
        if !parked {
            for fd in fds {
                // The caller owns these fds and keeps them open until this returns true.
                let _ = nix::sys::socket::shutdown(*fd, nix::sys::socket::Shutdown::Read);
            }
        }
        parked
    }

    /// Relayed connections not finished yet (a reexec would cut them).
    pub fn carrying(&self) -> usize {
        self.relay.carrying()
    }

    /// Connections taken and handed to the relay so far, from every slot.
    pub fn relayed(&self) -> u64 {
        self.relayed.load(Ordering::Relaxed)
    }

    /// Connections taken from `slot` so far.
    pub fn relayed_from(&self, slot: usize) -> u64 {
        self.slots.lock().expect("rescue slots").get(&slot).map_or(0, |s| s.relayed.load(Ordering::Relaxed))
    }

    /// The slot's thread waits for a `take` and touches none of its fds.
    #[cfg(test)]
    fn parked(&self, slot: usize) -> bool {
        self.slots.lock().unwrap().get(&slot).is_some_and(|s| s.state.lock().unwrap().parked)
    }
}

impl Drop for Rescue {
    /// Ends the slots' threads and then the relay thread, which closes the connections it
    /// still carries. Waits up to [`DROP_WAIT`] for the slots' threads to leave their fds (a
    /// thread blocked in `accept` stays until that returns; see the module doc).
    fn drop(&mut self) {
        let slots: Vec<Arc<Slot>> = self.slots.lock().expect("rescue slots").values().cloned().collect();
        for s in &slots {
            let mut state = s.state.lock().expect("rescue slot");
            state.taking = false;
            state.closing = true;
            s.changed.notify_all();
        }
        let deadline = Instant::now() + DROP_WAIT;
        for s in &slots {
            let mut state = s.state.lock().expect("rescue slot");
            while !state.ended {
                let Some(left) = deadline.checked_duration_since(Instant::now()) else { break };
                state = s.changed.wait_timeout(state, left).expect("rescue slot").0;
            }
        }
    }
}

/// The address to relay to for a socket bound to `bind`: the same port on loopback when it is
/// a wildcard (0.0.0.0 -> 127.0.0.1, :: -> ::1), else `bind` itself.
pub fn loopback(bind: SocketAddr) -> SocketAddr {
    match bind.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => SocketAddr::new(Ipv4Addr::LOCALHOST.into(), bind.port()),
        IpAddr::V6(ip) if ip.is_unspecified() => SocketAddr::new(Ipv6Addr::LOCALHOST.into(), bind.port()),
        _ => bind,
    }
}

/// A slot's thread: park while released; while taking, poll the slot's sockets and take what
/// is queued.
fn take_loop(slot: &Slot, relay: &Relay, total: &AtomicU64) {
    loop {
        let listeners = {
            let mut state = slot.state.lock().expect("rescue slot");
            while !state.taking && !state.closing {
                state.parked = true;
                state = slot.changed.wait(state).expect("rescue slot");
            }
            state.parked = false;
            if state.closing {
                state.ended = true;
                slot.changed.notify_all();
                return;
            }
            state.listeners.clone()
        };
        let mut fds: Vec<PollFd> = listeners
            .iter()
            // SAFETY: the caller of `take` keeps these fds open for the Rescue's life, which
            // outlasts this thread's use of them; the borrow ends with `fds` below.
            .map(|&(fd, _)| PollFd::new(unsafe { BorrowedFd::borrow_raw(fd) }, PollFlags::POLLIN))
            .collect();
        match nix::poll::poll(&mut fds, PollTimeout::from(POLL_MS)) {
            Ok(0) | Err(Errno::EINTR) => continue,
            Ok(_) => {}
            Err(e) => {
                log::warn!("rescue: poll: {e}");
                std::thread::sleep(PAUSE);
                continue;
            }
        }
        let revents: Vec<PollFlags> = fds.iter().map(|p| p.revents().unwrap_or(PollFlags::empty())).collect();
        drop(fds);
        if let Some(i) = revents.iter().position(|r| r.contains(PollFlags::POLLNVAL)) {
            // The caller closed an fd it gave us: stop before the number names something else.
            log::error!("rescue: fd {} is not open; no longer taking from it", listeners[i].0);
            let mut state = slot.state.lock().expect("rescue slot");
            if state.listeners == listeners {
                state.taking = false;
            }
            continue;
        }
        let mut ready = 0;
        let mut taken = 0;
        for (&(fd, target), r) in listeners.iter().zip(revents) {
            if r.intersects(PollFlags::POLLIN | PollFlags::POLLERR | PollFlags::POLLHUP) {
                ready += 1;
                taken += take_queued(slot, relay, total, fd, target);
            }
        }
        if ready > 0 && taken == 0 {
            // Readable, yet nothing to take (the worker won, or the socket is in a state we do
            // not handle): do not spin on it.
            std::thread::sleep(Duration::from_millis(u64::from(POLL_MS)));
        }
    }
}

/// Accept and relay what is queued on `fd` while the slot is taken, up to [`BATCH`]; returns
/// how many.
fn take_queued(slot: &Slot, relay: &Relay, total: &AtomicU64, fd: RawFd, target: SocketAddr) -> usize {
    let mut taken = 0;
    for _ in 0..BATCH {
        if !slot.state.lock().expect("rescue slot").taking {
            break;
        }
        // Only accept while something is queued, so that the accept (blocking: the worker's
        // socket is left as it is) normally returns at once. The worker may still win the
        // race; see the module doc.
        if !matches!(sys::queue_len(fd), Ok(n) if n > 0) {
            break;
        }
        let client = match accept4(fd, SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK) {
            // SAFETY: accept4 just returned this fd; nothing else owns it.
            Ok(new) => unsafe { TcpStream::from_raw_fd(new) },
            Err(Errno::EINTR | Errno::ECONNABORTED) => continue,
            Err(e) => {
                let e = io::Error::from(e);
                if out_of_fds(&e) {
                    log::warn!("rescue: cannot accept ({e}); pausing for {PAUSE:?}");
                    std::thread::sleep(PAUSE);
                } else if e.kind() != io::ErrorKind::WouldBlock {
                    log::debug!("rescue: accept: {e}");
                }
                break;
            }
        };
        taken += 1;
        match relay.hand(client, target) {
            Ok(()) => {
                slot.relayed.fetch_add(1, Ordering::Relaxed);
                total.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => log::warn!("rescue: cannot relay a connection to {target}: {e}"),
        }
    }
    taken
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpListener};
    use std::os::fd::AsRawFd;

    use nix::fcntl::{fcntl, FcntlArg};
    use socket2::SockRef;

    const HEAD: &str = "HTTP/1.0 200 OK\r\n\r\n";

    /// A target server: answers every connection with [`HEAD`] and the request echoed (read up
    /// to the blank line or the client's EOF). Returns its address.
    fn target() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let mut s = s.unwrap();
                std::thread::spawn(move || {
                    let mut req = Vec::new();
                    let mut buf = [0; 4096];
                    while !req.ends_with(b"\r\n\r\n") {
                        match s.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => req.extend_from_slice(&buf[..n]),
                        }
                    }
                    let _ = s.write_all(HEAD.as_bytes());
                    let _ = s.write_all(&req);
                });
            }
        });
        addr
    }

    fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn answer(mut c: &TcpStream) -> String {
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut s = String::new();
        c.read_to_string(&mut s).unwrap();
        s
    }

    /// A listener nobody accepts on, like a stopped worker's.
    fn stuck_listener() -> (TcpListener, RawFd) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let fd = l.as_raw_fd();
        (l, fd)
    }

    /// What the worker would notice if we changed its socket: file status flags, SO_RCVTIMEO.
    fn flags(l: &TcpListener) -> (i32, Option<Duration>) {
        (fcntl(l, FcntlArg::F_GETFL).unwrap(), SockRef::from(l).read_timeout().unwrap())
    }

    #[test]
    fn relays_every_queued_connection_and_leaves_the_socket_as_it_was() {
        let (l, fd) = stuck_listener();
        let before = flags(&l);
        let clients: Vec<(TcpStream, String)> = (0..20)
            .map(|i| {
                let mut c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
                let req = format!("GET /{i} HTTP/1.1\r\nHost: x\r\n\r\n");
                c.write_all(req.as_bytes()).unwrap();
                (c, req)
            })
            .collect();
        wait_until("20 queued", || sys::queue_len(fd).unwrap() == 20);
        let rescue = Rescue::start().unwrap();
        rescue.take(3, &[(fd, target())]);
        assert_eq!(flags(&l), before);
        for (c, req) in &clients {
            assert_eq!(answer(c), format!("{HEAD}{req}"));
        }
        assert_eq!((rescue.relayed(), rescue.relayed_from(3), rescue.relayed_from(0)), (20, 20, 0));
        assert_eq!(sys::queue_len(fd).unwrap(), 0);
        rescue.release(3);
        wait_until("parked", || rescue.parked(3));
        assert_eq!(flags(&l), before, "O_NONBLOCK or SO_RCVTIMEO changed on the worker's socket");
        // Still a blocking listener that accepts, as the worker expects.
        let _c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        l.accept().unwrap();
    }

    #[test]
    fn after_release_new_connections_stay_queued_until_taken_again() {
        let (l, fd) = stuck_listener();
        let rescue = Rescue::start().unwrap();
        rescue.take(0, &[(fd, target())]);
        let mut c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        c.write_all(b"first\r\n\r\n").unwrap();
        assert_eq!(answer(&c), format!("{HEAD}first\r\n\r\n"));
        rescue.release(0);
        wait_until("parked", || rescue.parked(0));
        let later: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(l.local_addr().unwrap()).unwrap()).collect();
        // A negative: watch for several poll periods that nothing is taken.
        let until = Instant::now() + Duration::from_millis(5 * u64::from(POLL_MS));
        while Instant::now() < until {
            assert_eq!(sys::queue_len(fd).unwrap(), 3, "taken after release");
            std::thread::sleep(Duration::from_millis(2));
        }
        assert_eq!(rescue.relayed(), 1);
        // Taken again: the same thread takes them.
        rescue.take(0, &[(fd, target())]);
        for mut c in later {
            c.write_all(b"later\r\n\r\n").unwrap();
            assert_eq!(answer(&c), format!("{HEAD}later\r\n\r\n"));
        }
        assert_eq!(rescue.relayed(), 4);
    }

    #[test]
    fn a_client_that_half_closes_still_gets_the_whole_answer() {
        let (l, fd) = stuck_listener();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        // No blank line: the target answers at the client's EOF, which must pass through.
        let req = "x".repeat(300_000);
        let writer = {
            let mut c = c.try_clone().unwrap();
            let req = req.clone();
            std::thread::spawn(move || {
                c.write_all(req.as_bytes()).unwrap();
                c.shutdown(Shutdown::Write).unwrap();
            })
        };
        let rescue = Rescue::start().unwrap();
        rescue.take(1, &[(fd, target())]);
        writer.join().unwrap();
        let got = answer(&c);
        assert_eq!(got.len(), HEAD.len() + req.len());
        assert!(got.starts_with(HEAD) && got.ends_with("xxx"));
        c.shutdown(Shutdown::Read).ok();
    }

    /// The worker resumes while we take: both accept on the same open file description (the
    /// worker blocking, as a plain server does). Whoever wins, every client gets its answer.
    #[test]
    fn a_worker_accepting_at_the_same_time_loses_nothing() {
        let (l, fd) = stuck_listener();
        let rescue = Rescue::start().unwrap();
        rescue.take(2, &[(fd, target())]);
        let worker_took = Arc::new(AtomicU64::new(0));
        {
            let (l, took) = (l.try_clone().unwrap(), worker_took.clone());
            std::thread::spawn(move || {
                for s in l.incoming() {
                    let mut s = s.unwrap();
                    took.fetch_add(1, Ordering::SeqCst);
                    std::thread::spawn(move || {
                        let mut req = [0; 64];
                        let n = s.read(&mut req).unwrap();
                        s.write_all(b"worker:").unwrap();
                        s.write_all(&req[..n]).unwrap();
                    });
                }
            });
        }
        let clients: Vec<TcpStream> = (0..30)
            .map(|i| {
                let mut c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
                c.write_all(format!("r{i}\r\n\r\n").as_bytes()).unwrap();
                c
            })
            .collect();
        for (i, c) in clients.iter().enumerate() {
            let got = answer(c);
            let req = format!("r{i}\r\n\r\n");
            assert!(got == format!("worker:{req}") || got == format!("{HEAD}{req}"), "{got:?}");
        }
        assert_eq!(rescue.relayed() + worker_took.load(Ordering::SeqCst), 30);
    }

    #[test]
    fn several_slots_and_sockets_at_once() {
        let sockets: Vec<_> = (0..3).map(|_| stuck_listener()).collect();
        let to = target();
        let rescue = Rescue::start().unwrap();
        rescue.take(0, &[(sockets[0].1, to), (sockets[1].1, to)]);
        rescue.take(1, &[(sockets[2].1, to)]);
        for (l, _) in &sockets {
            let mut c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
            c.write_all(b"hi\r\n\r\n").unwrap();
            assert_eq!(answer(&c), format!("{HEAD}hi\r\n\r\n"));
        }
        assert_eq!((rescue.relayed_from(0), rescue.relayed_from(1), rescue.relayed()), (2, 1, 3));
    }

    #[test]
    fn wildcard_binds_relay_to_loopback() {
        assert_eq!(loopback("0.0.0.0:80".parse().unwrap()), "127.0.0.1:80".parse().unwrap());
        assert_eq!(loopback("[::]:80".parse().unwrap()), "[::1]:80".parse().unwrap());
        assert_eq!(loopback("10.1.2.3:80".parse().unwrap()), "10.1.2.3:80".parse().unwrap());
    }
}
