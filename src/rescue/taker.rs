//! A rescued slot's thread: parked while the slot is released; while it is taken, `poll(2)`
//! on the slot's listening sockets, then accept what their queues hold (never changing a flag
//! of those fds, see the parent module's doc) and hand each connection to the relay.

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{BorrowedFd, FromRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{accept4, SockFlag};

use super::{Slot, BATCH, POLL_MS};
use crate::relay::{out_of_fds, Relay, PAUSE};
use crate::sys;

/// A slot's thread: park while released; while taking, poll the slot's sockets and take what
/// is queued.
pub(super) fn take_loop(slot: &Slot, relay: &Relay, total: &AtomicU64) {
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
