//! The staging block: the fd numbers at the bottom of the launcher's fd table, up to a multiple
//! of 64, reserved at start, where [`spawn`](super::spawn) puts the fds one child needs, so
//! that the child can take a table of its own holding only those.
//!
//! Why: a child cloned without `CLONE_FILES` gets a copy of the launcher's whole fd table (one
//! reference taken per open fd) and its exec then closes every CLOEXEC one of them. At 1,024
//! workers the launcher holds about 5,000 fds (a socket per slot and its copy for the bind
//! interception, two log pipes and a seccomp notification fd per worker), so each spawn took
//! and dropped 5,000 references: spawning 1,024 workers took 754 ms against 527 ms with the
//! block (measured), a cost quadratic in the fleet. With the block, the child is cloned with
//! `CLONE_FILES` (sharing the table, nothing copied) and its first step is `close_range(limit,
//! ~0, CLOSE_RANGE_UNSHARE)`, which gives it a copy of the fds below `limit` only (the kernel
//! copies the table up to a multiple of 64 above the last open fd below `limit`: hence a limit
//! that is one).
//!
//! Used only where a probe at [`reserve`] shows it works as it must: a child of a launcher
//! with a full 64-fd word above `limit` must get `limit` from its first `dup` (Linux 5.9 to
//! 6.10 without the fix for CVE-2024-45025 copied the "word full" bits of the whole table and
//! a worker's fds would then land 64 or more too high, or fail with EMFILE under its fd limit);
//! a seccomp policy that refuses `close_range` (older container profiles) or a kernel before
//! 5.9 (ENOSYS) fails the probe as well. Then every spawn copies the whole table, as before
//! (`unshare` is not needed for that, so a policy that refuses `unshare` does not matter).
//!
//! Each slot of the block is a CLOEXEC copy of /dev/null while no spawn uses it, so no thread of
//! the launcher can be handed one of these numbers by open(2). [`Staged`] puts a spawn's fds in
//! place (`dup3`, atomic) and, when dropped, puts /dev/null back, so that the block never keeps
//! a socket or a pipe end alive after its spawn (a log pipe's write end left here would keep
//! the launcher from ever seeing its EOF). Only the main thread spawns (see `spawn`); a second
//! spawn while the block is in use (which nothing does) would get no block rather than share it.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::OnceLock;

/// Slots the block needs at least: the listening sockets, the two log pipes, the intercept
/// channel, the cgroup's `cgroup.procs` and the sentinel's pipe.
pub const SLOTS: usize = super::MAX_FDS + 5;

struct Block {
    /// Every fd of the block, lowest first (at least [`SLOTS`]).
    slots: Vec<RawFd>,
    /// One above the highest slot, a multiple of 64: what the child keeps is below it.
    limit: RawFd,
    devnull: OwnedFd,
    in_use: AtomicBool,
}

static BLOCK: OnceLock<Option<Block>> = OnceLock::new();

/// Reserve the block: the lowest free fd numbers up to a multiple of 64, so call it before the
/// launcher opens its sockets and pipes; then probe that the kernel gives a child only those.
/// Without it (or if either fails) every spawn copies the whole table.
pub fn reserve() {
    BLOCK.get_or_init(|| {
        let block = make_block()?;
        match probe(&block) {
            Ok(()) => {
                log::debug!("spawn: each worker gets an fd table of its own, the fds below {}", block.limit);
                Some(block)
            }
            Err(why) => {
                log::debug!("spawn: every worker copies the launcher's fd table ({why})");
                None
            }
        }
    });
}

/// A CLOEXEC copy of `fd` at the lowest free number at or above `floor`.
fn dup_at_least(fd: &OwnedFd, floor: RawFd) -> Option<OwnedFd> {
    // SAFETY: fcntl(F_DUPFD_CLOEXEC) on an fd we own; the new fd is ours.
    let new = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, floor) };
    // SAFETY: a fresh fd, owned by nobody else.
    (new >= 0).then(|| unsafe { OwnedFd::from_raw_fd(new) })
}

fn make_block() -> Option<Block> {
    let devnull = std::fs::File::open("/dev/null").map(OwnedFd::from).ok()?;
    let mut slots: Vec<OwnedFd> = Vec::new();
    // The lowest free numbers until there are enough and the highest ends a 64-fd word.
    let mut limit = 0;
    loop {
        let fd = dup_at_least(&devnull, 0)?;
        limit = limit.max(fd.as_raw_fd() + 1);
        slots.push(fd);
        if slots.len() >= SLOTS && limit % 64 == 0 {
            break;
        }
        if slots.len() > 4 * SLOTS {
            return None; // holes all over a big inherited table: not worth it
        }
    }
    // (devnull, opened first, is below `limit`: each child gets a CLOEXEC copy of it, harmless.)
    let slots = slots.into_iter().map(std::os::fd::IntoRawFd::into_raw_fd).collect();
    Some(Block { slots, limit, devnull, in_use: AtomicBool::new(false) })
}

/// What the probe's child saw: its first `dup` (-1 until it ran, which a child killed by a
/// seccomp policy leaves; -2: close_range failed).
struct Probe {
    limit: RawFd,
    got: AtomicI32,
}

/// In a child cloned with `CLONE_FILES`: an fd table of its own holding the fds below `limit`
/// only (`close_range(limit, ~0, CLOSE_RANGE_UNSHARE)`); false if the kernel refused. What a
/// spawned child does first, and what the probe checks. One system call: async-signal-safe.
pub(super) fn unshare_below(limit: RawFd) -> bool {
    // SAFETY: close_range(UNSHARE) replaces this process's fd table (shared with the launcher
    // until now) by a copy of the fds below `limit`, then closes nothing (the copy holds nothing
    // above it; were the launcher gone, it would close ours in place). The launcher's table is
    // only read; nothing allocated in user space.
    unsafe {
        libc::syscall(libc::SYS_close_range, limit as libc::c_uint, libc::c_uint::MAX, libc::CLOSE_RANGE_UNSHARE) == 0
    }
}

extern "C" fn probe_entry(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the parent's Probe, alive until this child exits (CLONE_VFORK); only
    // raw system calls and an atomic store, then _exit: nothing allocated, no fd of the
    // launcher's touched before this process has a table of its own.
    unsafe {
        let p = &*(arg as *const Probe);
        if !unshare_below(p.limit) {
            p.got.store(-2, Ordering::SeqCst);
            libc::_exit(0);
        }
        // CLOEXEC: were close_range faked (a seccomp policy answering 0), this fd would be in
        // the launcher's table.
        p.got.store(libc::fcntl(0, libc::F_DUPFD_CLOEXEC, 0), Ordering::SeqCst);
        libc::_exit(0)
    }
}

/// With the 64 fds above the block open (a full word), a child sharing the table and taking
/// its own copy below `limit` must get `limit` from its first dup.
fn probe(block: &Block) -> Result<(), String> {
    // 64 fds at `limit` or above: the word from `limit` on is full (with what was there).
    let mut above = Vec::new();
    for _ in 0..64 {
        above.push(dup_at_least(&block.devnull, block.limit).ok_or("no fd for the probe")?);
    }
    let p = Probe { limit: block.limit, got: AtomicI32::new(-1) };
    // SAFETY: probe_entry keeps vfork::run's contract (system calls only, then _exit) and
    // touches no fd before its own table; `p` outlives the child, which has exited when
    // run returns.
    let pid = unsafe { crate::vfork::run(probe_entry, (&p as *const Probe).cast_mut().cast(), true) }
        .map_err(|e| format!("clone: {e}"))?;
    let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
    drop(above);
    match p.got.load(Ordering::SeqCst) {
        got if got == block.limit => Ok(()),
        -2 => Err("close_range(CLOSE_RANGE_UNSHARE) refused: a kernel before 5.9 or a seccomp policy".into()),
        -1 => Err("the probe's child died before its first dup (a seccomp policy that kills on close_range?)".into()),
        got => Err(format!(
            "the kernel's close_range(CLOSE_RANGE_UNSHARE) gives a child a wrong fd table (first free fd {got}, \
             not {}: CVE-2024-45025)",
            block.limit
        )),
    }
}

/// One spawn's fds, copied into the block until this is dropped.
pub struct Staged {
    /// This spawn holds the block (and must give it back).
    took: bool,
    used: usize,
    /// The child's `close_range` floor: -1 without the block (the child copies the whole table).
    pub limit: RawFd,
}

impl Staged {
    /// Copy `fds` into the block, in order, replacing each (the -1s stay -1): the numbers the
    /// child is to use. Without a block (none, in use, too small, or a dup3 that failed: some
    /// of `fds` may then name slots, which hold the same files), [`Staged::limit`] is -1 and the
    /// child copies the whole table.
    pub fn new(fds: &mut [RawFd]) -> Staged {
        let none = Staged { took: false, used: 0, limit: -1 };
        let Some(block) = BLOCK.get().and_then(Option::as_ref) else { return none };
        if fds.len() > block.slots.len() || block.in_use.swap(true, Ordering::AcqRel) {
            return none;
        }
        let mut staged = Staged { took: true, used: 0, limit: block.limit };
        for (fd, &slot) in fds.iter_mut().zip(&block.slots) {
            staged.used += 1;
            if *fd < 0 {
                continue;
            }
            // SAFETY: dup3 onto a slot of the block (atomically replacing what is there); both
            // fds are open.
            if unsafe { libc::dup3(*fd, slot, libc::O_CLOEXEC) } < 0 {
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
        let Some(block) = BLOCK.get().and_then(Option::as_ref).filter(|_| self.took) else { return };
        for &slot in &block.slots[..self.used] {
            // SAFETY: /dev/null back onto a slot of the block; dup3 closes what was there.
            let back = unsafe { libc::dup3(block.devnull.as_raw_fd(), slot, libc::O_CLOEXEC) };
            debug_assert!(back == slot, "dup3 onto block slot {slot}: {}", std::io::Error::last_os_error());
        }
        block.in_use.store(false, Ordering::Release);
    }
}
