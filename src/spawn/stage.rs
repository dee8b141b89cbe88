//! The staging block: a few fd numbers at the bottom of the launcher's fd table, reserved at
//! start, where [`spawn`](super::spawn) puts the fds one child needs, so that the child can
//! take a table of its own holding only those.
//!
//! Why: a child cloned without `CLONE_FILES` gets a copy of the launcher's whole fd table (one
//! reference taken per open fd) and its exec then closes every CLOEXEC one of them. At 1,024
//! workers the launcher holds about 5,000 fds (a socket per slot and its copy for the bind
//! interception, two log pipes and a seccomp notification fd per worker), so each spawn took
//! and dropped 5,000 references: 0.3 ms of the 0.75 ms one spawn cost (measured), quadratic
//! in the fleet. With the block, the child is cloned with `CLONE_FILES` (sharing the table,
//! nothing copied) and its first step is `close_range(limit, ~0, CLOSE_RANGE_UNSHARE)`, which
//! gives it a copy of the fds below `limit` only (Linux 5.9; the kernel copies nothing of the
//! range it is asked to close). Older kernels refuse that call and the child falls back to
//! `unshare(CLONE_FILES)`, a copy of the whole table, as before.
//!
//! Each slot of the block is a CLOEXEC copy of /dev/null while no spawn uses it, so no thread of
//! the launcher can be handed one of these numbers by open(2). [`Staged`] puts a spawn's fds in
//! place (`dup3`, atomic) and, when dropped, puts /dev/null back, so that the block never keeps
//! a socket or a pipe end alive after its spawn (a log pipe's write end left here would keep
//! the launcher from ever seeing its EOF). Only the main thread spawns (see `spawn`), so one
//! block serves every spawn.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::OnceLock;

/// Slots in the block: the listening sockets, the two log pipes, the intercept channel, the
/// cgroup's `cgroup.procs` and the sentinel's pipe.
pub const SLOTS: usize = super::MAX_FDS + 5;

struct Block {
    slots: [RawFd; SLOTS],
    /// One above the highest slot: what the child keeps is below it.
    limit: RawFd,
    devnull: OwnedFd,
}

static BLOCK: OnceLock<Option<Block>> = OnceLock::new();

/// Reserve the block: the lowest free fd numbers, so call it before the launcher opens its
/// sockets and pipes. Without it (or if it fails) every spawn copies the whole table.
pub fn reserve() {
    BLOCK.get_or_init(|| {
        let devnull = std::fs::File::open("/dev/null").map(OwnedFd::from).ok()?;
        let mut slots = [-1; SLOTS];
        for slot in &mut slots {
            // SAFETY: fcntl(F_DUPFD_CLOEXEC) on an fd we own; the new fd is owned by the block.
            let fd = unsafe { libc::fcntl(devnull.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
            if fd < 0 {
                for &s in slots.iter().filter(|&&s| s >= 0) {
                    // SAFETY: the copies made above, ours to close.
                    drop(unsafe { OwnedFd::from_raw_fd(s) });
                }
                return None;
            }
            *slot = fd;
        }
        let limit = slots.iter().copied().max().unwrap_or(0).max(devnull.as_raw_fd()) + 1;
        Some(Block { slots, limit, devnull })
    });
}

/// One spawn's fds, copied into the block until this is dropped.
pub struct Staged {
    used: usize,
    /// The child's `close_range` floor: -1 without a block (the child copies the whole table).
    pub limit: RawFd,
}

impl Staged {
    /// Copy `fds` into the block, in order, replacing each (the -1s stay -1): the numbers the
    /// child is to use. Without a block, or with more fds than slots, the fds are returned as
    /// they are, and [`Staged::limit`] is -1.
    pub fn new(fds: &mut [RawFd]) -> Staged {
        let Some(block) = BLOCK.get().and_then(Option::as_ref) else { return Staged { used: 0, limit: -1 } };
        if fds.len() > SLOTS {
            return Staged { used: 0, limit: -1 };
        }
        let mut staged = Staged { used: 0, limit: block.limit };
        for (fd, &slot) in fds.iter_mut().zip(&block.slots) {
            staged.used += 1;
            if *fd < 0 {
                continue;
            }
            // SAFETY: dup3 onto a slot of the block (atomically replacing its /dev/null copy);
            // both fds are open.
            if unsafe { libc::dup3(*fd, slot, libc::O_CLOEXEC) } < 0 {
                // Keep the originals: the child copies the whole table.
                staged.limit = -1;
                return staged;
            }
            *fd = slot;
        }
        staged
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        let Some(block) = BLOCK.get().and_then(Option::as_ref) else { return };
        for &slot in &block.slots[..self.used] {
            // SAFETY: /dev/null back onto a slot of the block; dup3 closes what was there.
            unsafe { libc::dup3(block.devnull.as_raw_fd(), slot, libc::O_CLOEXEC) };
        }
    }
}
