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
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::relay::Relay;

mod taker;
use taker::take_loop;

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

#[cfg(test)]
mod tests;
