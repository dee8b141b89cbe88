//! The supervisor's side of `--intercept-bind` (the mechanism is `crate::intercept`'s): which
//! sockets a slot's worker may be given when it binds a port itself, and registering each new
//! worker's seccomp notification fd with the interceptor, at spawn and after a reexec.

use std::os::fd::OwnedFd;

use super::os::Os;
use super::workers::Worker;
use super::Supervisor;
use crate::event::WorkerId;
use crate::intercept::Target;
use crate::snapshot::InterceptSnapshot;

impl<O: Os> Supervisor<O> {
    /// Slot `slot`'s sockets, one per bind, each standing for its bind's public address (in
    /// round-robin mode the slot's private socket stands for the public port): dups the
    /// worker's entry holds, so that nothing but these sockets can ever be installed.
    fn slot_targets(&self, slot: usize) -> std::io::Result<Vec<Target>> {
        let fds = self.listeners.fds_for_slot(slot);
        let inodes = crate::readiness::socket_inodes(&fds)?;
        let addrs = self.listeners.local_addrs();
        let mut targets = Vec::with_capacity(fds.len());
        for ((addr, fd), ino) in addrs.iter().zip(fds).zip(inodes) {
            // SAFETY: the listener's fd is open for the launcher's life; borrowed only to dup it.
            let sock = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }.try_clone_to_owned()?;
            targets.push(Target { addr: *addr, sock: std::sync::Arc::new(sock), ino });
        }
        Ok(targets)
    }

    /// A worker's trapped call has held the interceptor for `held`: kill the worker (its
    /// process group), which ends the wait; its exit is a crash of its slot.
    pub(super) fn intercept_held(&mut self, id: WorkerId, held: std::time::Duration) {
        let Some(w) = self.workers.get(id) else { return };
        log::warn!(
            "{} has held the bind() interceptor for {held:.1?} (a bind() whose address or fd cannot be read: \
             its own userfaultfd or FUSE mount?); killing it",
            w.label()
        );
        self.os.signal(w.pid, nix::sys::signal::Signal::SIGKILL);
    }

    /// For `status` and `/metrics`.
    pub(super) fn intercept_snapshot(&self) -> InterceptSnapshot {
        let (binds, listens) = self.intercept.interceptor.as_ref().map_or((0, 0), |i| i.counts());
        InterceptSnapshot { state: self.intercept.state.clone(), binds, listens }
    }

    /// A worker just started under the filter: serve its calls.
    pub(super) fn intercept_register(&mut self, id: WorkerId, w: &Worker, notif: OwnedFd) {
        self.intercept_adopt(id, w.label(), w.slot, notif);
    }

    /// Serve worker `id`'s calls from `notif` (new, or kept across a reexec). A failure leaves
    /// the worker's binds to the kernel: its calls fail with ENOSYS once `notif` is closed.
    pub(super) fn intercept_adopt(&mut self, id: WorkerId, label: String, slot: usize, notif: OwnedFd) {
        let Some(interceptor) = &self.intercept.interceptor else {
            log::warn!("{label} runs under a bind() filter this image does not serve: its binds fail with ENOSYS");
            return;
        };
        let registered = self.slot_targets(slot).and_then(|t| interceptor.register(id, label.clone(), notif, t));
        if let Err(e) = registered {
            log::error!("{label}: cannot serve its bind() calls: {e}");
        }
    }
}
