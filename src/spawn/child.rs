//! The child's side of [`spawn`](super::spawn), between the clone and the exec: the module
//! doc's steps 0 to 8, each a small function with its `// SAFETY:` line. Everything here reads
//! the [`ChildCtx`] the parent built and makes async-signal-safe system calls on memory that
//! already exists: nothing in this file allocates.

use std::os::fd::RawFd;

use nix::sched::CpuSet;
use nix::unistd::Pid;

use super::MAX_FDS;
use crate::intercept::ChildFilter;

/// What the child reads between fork and exec: built in the parent, so the child allocates nothing.
pub(super) struct ChildCtx {
    pub(super) parent: libc::pid_t,
    pub(super) fds: [RawFd; MAX_FDS],
    pub(super) nfds: usize,
    /// Step 0: the child shares the launcher's fd table (CLONE_FILES) and takes a copy of the
    /// fds below this (the staging block, see `stage`); -1: it has a copy of the whole table.
    pub(super) table_limit: RawFd,
    /// dup2 fd 3 (the first listening socket, once in place) onto fd 0.
    pub(super) stdin_socket: bool,
    /// dup2 onto fds 1 and 2 (the log pipes' write ends).
    pub(super) stdio: Option<[RawFd; 2]>,
    /// CPU affinity to set (built in the parent).
    pub(super) cpus: Option<CpuSet>,
    pub(super) filter: Option<ChildFilter>,
    /// The channel the notification fd is sent on (-1: no `--intercept-bind`).
    pub(super) chan: RawFd,
    /// Step 1's containment (-1: none).
    pub(super) cgroup_procs: RawFd,
    pub(super) sentinel: RawFd,
    /// Set by the child when a step or the exec fails (its errno; 0 until then).
    pub(super) err: std::sync::atomic::AtomicI32,
    pub(super) pid_slots: [*mut u8; 4],
    pub(super) npid: usize,
    /// uid, gid, supplementary groups (pointer, count).
    pub(super) creds: Option<(libc::uid_t, libc::gid_t, *const libc::gid_t, usize)>,
    /// RLIMIT_NOFILE to restore (the launcher raised its own).
    pub(super) nofile: Option<libc::rlimit>,
    pub(super) path: *const libc::c_char,
    pub(super) argv: *const *const libc::c_char,
    pub(super) envp: *const *const libc::c_char,
}

/// The child's entry point on its own stack (see [`spawn`](super::spawn)).
pub(super) extern "C" fn child_entry(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the parent's ChildCtx, alive until we exec or exit (CLONE_VFORK).
    unsafe { child_exec(&*(arg as *const ChildCtx)) }
}

/// The child's side of [`spawn`](super::spawn), the module doc's steps 0 to 8 in order. Never returns.
///
/// # Safety
/// Only to be called in a child right after the clone. All pointers in `ctx` point into the
/// parent's memory, which this process shares (CLONE_VM), valid and unchanged until exec; with
/// the staging block it shares the fd table too until step 0. Every step makes
/// async-signal-safe system calls only, on memory the parent prepared: nothing allocates.
unsafe fn child_exec(ctx: &ChildCtx) -> ! {
    // SAFETY: each step below keeps this function's contract (in the child, before exec).
    unsafe {
        own_table(ctx);
        contain(ctx);
        reset_signals();
        let chan = place_fds(ctx);
        install_filter(ctx, chan);
        drop_privileges(ctx);
        arm_death_signal(ctx);
        write_pid_vars(ctx);
        // The fd limit the launcher started with, last: lowered earlier, the dups above would fail
        // (EMFILE) once the launcher holds more fds than that limit (relayed connections).
        if let Some(lim) = &ctx.nofile {
            libc::setrlimit(libc::RLIMIT_NOFILE, lim);
        }
        libc::execve(ctx.path, ctx.argv, ctx.envp);
        fail(ctx)
    }
}

/// The errno of a failed step, for the parent (an atomic store in the shared context); exit 127.
///
/// # Safety
/// In the child of [`spawn`](super::spawn) only (see [`child_exec`]).
unsafe fn fail(ctx: &ChildCtx) -> ! {
    // SAFETY: reading this thread's errno and _exit are async-signal-safe; no allocation.
    unsafe {
        let e = (*libc::__errno_location()).max(1);
        ctx.err.store(e, std::sync::atomic::Ordering::SeqCst);
        libc::_exit(127)
    }
}

/// Step 0, with the staging block (`table_limit` >= 0, only where the probe of `stage` showed
/// the kernel does it right): an fd table of its own holding the fds below the block's limit
/// only. Should that fail all the same (ENOMEM), a copy of the whole table, else exit 127.
///
/// # Safety
/// In the child of [`spawn`](super::spawn) only (see [`child_exec`]).
unsafe fn own_table(ctx: &ChildCtx) {
    if ctx.table_limit < 0 {
        return;
    }
    // SAFETY: unshare makes this process's own copy of the whole fd table (the launcher's is
    // only read); nothing allocated in user space.
    unsafe {
        if !super::stage::unshare_below(ctx.table_limit) && libc::unshare(libc::CLONE_FILES) != 0 {
            fail(ctx);
        }
    }
}

/// Step 1: a process group of its own, then the cgroup and the sentinel's record.
///
/// # Safety
/// In the child of [`spawn`](super::spawn) only (see [`child_exec`]).
unsafe fn contain(ctx: &ChildCtx) {
    // SAFETY: setpgid, getpid and write(2) of a constant and of a stack buffer to fds the
    // parent opened for this; nothing allocated. The move into the cgroup must succeed: a
    // worker outside it would escape the containment the launcher reports.
    unsafe {
        libc::setpgid(0, 0);
        if ctx.cgroup_procs >= 0 && libc::write(ctx.cgroup_procs, b"0".as_ptr().cast(), 1) != 1 {
            fail(ctx);
        }
        if ctx.sentinel >= 0 {
            // `+PID\n`; a full pipe (EAGAIN: the sentinel is not reading) loses only the record.
            let mut rec = [0u8; 16];
            rec[0] = b'+';
            let len = 1 + crate::vfork::write_decimal(&mut rec[1..], libc::getpid() as u32);
            rec[len] = b'\n';
            libc::write(ctx.sentinel, rec.as_ptr().cast(), len + 1);
        }
    }
}

/// Step 2 (but the fd limit, restored last): default dispositions and an empty signal mask.
///
/// # Safety
/// In the child of [`spawn`](super::spawn) only (see [`child_exec`]).
unsafe fn reset_signals() {
    // SAFETY: signal(2) and sigprocmask on a stack sigset; async-signal-safe, no allocation.
    unsafe {
        for sig in 1..=libc::SIGRTMAX() {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::pthread_sigmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
    }
}

/// Step 3: the sockets to 3.., fd 0 and the log pipes, the CPU, every other fd CLOEXEC.
/// Returns the intercept's channel, moved above the range (-1 without `--intercept-bind`).
///
/// # Safety
/// In the child of [`spawn`](super::spawn) only (see [`child_exec`]).
unsafe fn place_fds(ctx: &ChildCtx) -> RawFd {
    let floor = 3 + ctx.nfds as libc::c_int;
    // SAFETY: the steps keep child_exec's contract; their buffers are on this stack.
    unsafe {
        let (chan, stdio, tmp) = lift_fds(ctx, floor);
        for (i, &t) in tmp.iter().enumerate().take(ctx.nfds) {
            // dup2 clears CLOEXEC on the target: these are the fds the worker keeps.
            if libc::dup2(t, 3 + i as libc::c_int) < 0 {
                fail(ctx);
            }
        }
        // inetd "wait" style: the first listening socket is also stdin (replacing whatever fd 0
        // was); dup2 leaves fd 0 without CLOEXEC.
        if ctx.stdin_socket && libc::dup2(3, 0) < 0 {
            fail(ctx);
        }
        // The log pipes become stdout and stderr (dup2 leaves them without CLOEXEC).
        if ctx.stdio.is_some() && (libc::dup2(stdio[0], 1) < 0 || libc::dup2(stdio[1], 2) < 0) {
            fail(ctx);
        }
        if let Some(set) = &ctx.cpus {
            // nix's wrapper is the bare system call on our copy of the set: no allocation.
            if nix::sched::sched_setaffinity(Pid::from_raw(0), set).is_err() {
                fail(ctx);
            }
        }
        cloexec_from(floor);
        chan
    }
}

/// Step 3's first half: a CLOEXEC copy at `floor` or above of everything still needed (the
/// intercept's channel, the log pipes, the sockets), since their numbers may be among 3.. (or
/// even 1 and 2). Returns (channel, log pipes, sockets), the copies.
///
/// # Safety
/// In the child of [`spawn`](super::spawn) only (see [`child_exec`]).
unsafe fn lift_fds(ctx: &ChildCtx, floor: libc::c_int) -> (RawFd, [RawFd; 2], [RawFd; MAX_FDS]) {
    // SAFETY: fcntl(F_DUPFD_CLOEXEC) on fds the parent passed; results in stack arrays.
    unsafe {
        let chan = if ctx.chan >= 0 { libc::fcntl(ctx.chan, libc::F_DUPFD_CLOEXEC, floor) } else { -1 };
        if ctx.chan >= 0 && chan < 0 {
            fail(ctx);
        }
        let mut stdio = [-1 as RawFd; 2];
        if let Some(fds) = &ctx.stdio {
            for (t, &fd) in stdio.iter_mut().zip(fds) {
                *t = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, floor);
                if *t < 0 {
                    fail(ctx);
                }
            }
        }
        let mut tmp = [-1 as RawFd; MAX_FDS];
        for (t, &fd) in tmp.iter_mut().zip(&ctx.fds).take(ctx.nfds) {
            *t = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, floor);
            if *t < 0 {
                fail(ctx);
            }
        }
        (chan, stdio, tmp)
    }
}

/// Everything from `floor` up closes at exec (close_range, else one fcntl per fd).
///
/// # Safety
/// In the child of [`spawn`](super::spawn) only (see [`child_exec`]).
unsafe fn cloexec_from(floor: libc::c_int) {
    // SAFETY: close_range, sysconf and fcntl(F_SETFD) only change fd flags; no allocation.
    unsafe {
        if libc::syscall(libc::SYS_close_range, floor as libc::c_uint, libc::c_uint::MAX, libc::CLOSE_RANGE_CLOEXEC)
            != 0
        {
            let max = libc::sysconf(libc::_SC_OPEN_MAX).clamp(1024, 65536) as libc::c_int;
            for fd in floor..max {
                libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
            }
        }
    }
}

/// Step 4: the bind() interception's filter, with the launcher's credentials still; its
/// notification fd sent to the parent on `chan`, then closed here.
///
/// # Safety
/// In the child of [`spawn`](super::spawn) only (see [`child_exec`]).
unsafe fn install_filter(ctx: &ChildCtx, chan: RawFd) {
    let Some(filter) = &ctx.filter else { return };
    // SAFETY: install (prctl/seccomp on the parent-built program) and send_fd (sendmsg from
    // stack buffers) make system calls only; close(2) of the fd just made.
    unsafe {
        let notif = crate::intercept::install(filter);
        if notif < 0 || !crate::intercept::send_fd(chan, notif) {
            fail(ctx);
        }
        libc::close(notif);
    }
}

/// Step 5: drop privileges (groups, then gid, then uid) and check it took. Raw system calls:
/// glibc's wrappers would signal the launcher's threads (setxid), whose records this child
/// shares but which are not its own.
///
/// # Safety
/// In the child of [`spawn`](super::spawn) only (see [`child_exec`]).
unsafe fn drop_privileges(ctx: &ChildCtx) {
    let Some((uid, gid, groups, ngroups)) = ctx.creds else { return };
    // SAFETY: raw setgroups/setgid/setuid on the parent's group list, which outlives the exec.
    unsafe {
        if libc::syscall(libc::SYS_setgroups, ngroups, groups) != 0
            || libc::syscall(libc::SYS_setgid, gid) != 0
            || libc::syscall(libc::SYS_setuid, uid) != 0
        {
            fail(ctx);
        }
        if libc::getuid() != uid || libc::geteuid() != uid || libc::getgid() != gid {
            *libc::__errno_location() = libc::EPERM;
            fail(ctx);
        }
    }
}

/// Step 6: `PR_SET_PDEATHSIG = SIGKILL`, armed after the credential change, which clears it
/// (commit_creds); then exit 1 if the launcher died before it was armed.
///
/// # Safety
/// In the child of [`spawn`](super::spawn) only (see [`child_exec`]).
unsafe fn arm_death_signal(ctx: &ChildCtx) {
    // SAFETY: prctl, getppid and _exit are system calls; no allocation.
    unsafe {
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
            fail(ctx);
        }
        if libc::getppid() != ctx.parent {
            // The launcher died before PDEATHSIG was armed.
            libc::_exit(1);
        }
    }
}

/// Step 7: the pid variables: our pid's decimal digits written into the prepared buffers.
///
/// # Safety
/// In the child of [`spawn`](super::spawn) only (see [`child_exec`]); `ctx.pid_slots` point at 21 bytes each.
unsafe fn write_pid_vars(ctx: &ChildCtx) {
    let mut digits = [0u8; 12];
    // SAFETY: getpid is a system call; each slot has room for the digits (21 NULs, see spawn),
    // in buffers the parent keeps alive until the exec.
    unsafe {
        let len = crate::vfork::write_decimal(&mut digits, libc::getpid() as u32);
        for slot in &ctx.pid_slots[..ctx.npid] {
            for (i, d) in digits[..len].iter().enumerate() {
                *slot.add(i) = *d;
            }
        }
    }
}
