//! Starting one worker process: the fork/exec itself, the unsafe part of the launcher. What to
//! run comes from `command`, the environment from `contract`; this module only carries them
//! into the child.
//!
//! Everything the child needs (argv, envp, the fd list) is built in the parent. Between fork
//! and exec the child only makes async-signal-safe system calls on memory it already has:
//! it never allocates. The "fork" is `clone(CLONE_VM | CLONE_VFORK)` on a stack of its own,
//! as `posix_spawn` does: the child shares the launcher's memory (no page tables copied, no
//! copy-on-write faults after it: a plain fork cost milliseconds a worker at 1,024) and the
//! calling thread waits until the child has exec'd or exited. So a step never waits for the
//! launcher, writes no memory of the launcher's but the buffers prepared for it, and makes raw
//! system calls where glibc's wrapper would consult its threads (setuid and friends); every
//! signal is blocked in the parent around the clone, so no handler of the launcher's runs in
//! the child. Where a probe at start shows the kernel does it right (see `stage`), the fds the
//! child needs are first copied into a block of low fd numbers reserved at start, and the
//! child is cloned with `CLONE_FILES`, so that nothing of the launcher's thousands of fds is
//! copied for it and nothing is closed at its exec; elsewhere the clone copies the whole table.
//! In the child, in order:
//! 0. with the block: `close_range(limit, ~0, CLOSE_RANGE_UNSHARE)`, an fd table of its own
//!    with the fds below the block's end only;
//! 1. `setpgid(0, 0)`: the worker leads its own process group (stop signals go to the group).
//!    Then containment (see `cgroup`, `sentinel`), before anything of the worker's runs: with
//!    a cgroup, `"0"` written to the worker's `cgroup.procs` (opened by the parent), so that
//!    everything it will ever start is in that cgroup; with a sentinel, `+PID\n` written to its
//!    pipe (non-blocking, atomic), so that the sentinel knows the worker's process group even
//!    if the launcher is SIGKILLed before the worker's first fork;
//! 2. every signal disposition back to default, an empty signal mask, and the fd limit the
//!    launcher started with;
//! 3. the slot's listening sockets moved to fds 3, 4, ... (without CLOEXEC); every other fd
//!    above them is marked CLOEXEC, so the worker sees 0-2 and its own sockets, nothing else;
//!    with `--socket-on-stdin`, fd 3 is then also dup2'd onto fd 0 (inetd "wait" style); with
//!    log pipes (`--log-prefix slot-pid`, see `logs`), their write ends are dup2'd onto fds 1
//!    and 2 (first moved above the target range, like the sockets; the parent made them, with
//!    O_CLOEXEC, and closes its copies after the fork);
//! 4. with `--intercept-bind`: the seccomp filter that hands the worker's `bind` and `listen` to
//!    the launcher (see `intercept`), after `no_new_privs` when the launcher lacks CAP_SYS_ADMIN;
//!    its notification fd is sent to the parent over a channel (SCM_RIGHTS) and closed
//!    here. Before 5: installed while the child still has the launcher's credentials, so a root
//!    launcher needs no `no_new_privs` even for a `--user` worker;
//! 5. with `--user`: supplementary groups, gid, uid dropped (and checked);
//! 6. `PR_SET_PDEATHSIG = SIGKILL` (after 5: a credential change clears it), then a check that
//!    the launcher is still its parent. The death signal fires when the *thread* that forked
//!    exits, so workers are only ever forked from the supervisor loop on the launcher's main
//!    thread, which lives as long as the launcher: the signal, notify and helper threads may
//!    come and go without killing workers;
//! 7. `LISTEN_PID` (and `WATCHDOG_PID`) written with the child's own pid into buffers prepared
//!    by the parent;
//! 8. `execve`. A failure leaves its errno in the context the parent shares, and the child
//!    exits 127: the parent, which resumes when the child has exec'd or exited, knows
//!    synchronously whether the exec happened. With `--intercept-bind` the notification fd is
//!    already queued on the channel then (sent before the exec), and taken without waiting.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use nix::sched::CpuSet;
use nix::sys::resource::{getrlimit, setrlimit, Resource};
use nix::unistd::Pid;

use crate::command::{Credentials, Program};
use crate::intercept::ChildFilter;

mod child;
mod stage;
use child::{child_entry, ChildCtx};
pub use stage::reserve as reserve_stage;

/// Most listening fds one worker can receive (fixed so the child needs no allocation).
pub const MAX_FDS: usize = 64;

/// The launcher's RLIMIT_NOFILE as it started, before [`raise_fd_limit`]: workers get it back.
static ORIGINAL_NOFILE: std::sync::OnceLock<libc::rlimit> = std::sync::OnceLock::new();

/// Raise the launcher's soft limit on open fds to the hard limit (the round-robin forwarder
/// holds two fds per connection). Workers are given the original limit back before exec.
/// After a reexec: the limit the first image started with (`REUSE_LAUNCH_NOFILE=soft:hard`,
/// set by the old image), not the raised one this image starts with.
pub const NOFILE_VAR: &str = "REUSE_LAUNCH_NOFILE";

pub fn raise_fd_limit() {
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else { return };
    let inherited = std::env::var(NOFILE_VAR).ok().and_then(|v| {
        let (s, h) = v.split_once(':')?;
        Some(libc::rlimit { rlim_cur: s.parse().ok()?, rlim_max: h.parse().ok()? })
    });
    let _ = ORIGINAL_NOFILE.set(inherited.unwrap_or(libc::rlimit { rlim_cur: soft, rlim_max: hard }));
    if soft < hard {
        if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            log::debug!("cannot raise RLIMIT_NOFILE: {e}");
        }
    }
}

/// `REUSE_LAUNCH_NOFILE` for a reexec: the original limit, to be given to workers again.
pub fn original_nofile() -> Option<String> {
    ORIGINAL_NOFILE.get().map(|l| format!("{}:{}", l.rlim_cur, l.rlim_max))
}

/// Everything one fork/exec needs besides the program.
pub struct Spec<'a> {
    pub argv: &'a [CString],
    /// Become the worker's fds 3, 4, ...
    pub fds: &'a [RawFd],
    /// The whole environment except the `pid_vars`.
    pub env: &'a [CString],
    /// Variables the child sets to its own pid (LISTEN_PID, WATCHDOG_PID): at most 4.
    pub pid_vars: &'a [&'a str],
    /// Also make the first of `fds` the worker's fd 0 (`--socket-on-stdin`).
    pub socket_on_stdin: bool,
    /// Pin the worker to this CPU.
    pub cpu: Option<usize>,
    pub creds: Option<&'a Credentials>,
    /// Become the worker's fds 1 and 2 (the write ends of its log pipes, see `logs`); None:
    /// it inherits the launcher's.
    pub stdio: Option<[RawFd; 2]>,
    /// `--intercept-bind`: the filter to start the worker under.
    pub intercept: Option<&'a ChildFilter>,
    /// Where the child puts itself before exec (step 1).
    pub contain: Contain,
}

/// The containment steps of the child (step 1): either, both or neither.
#[derive(Debug, Default, Clone, Copy)]
pub struct Contain {
    /// The worker's cgroup's `cgroup.procs`, open for writing (see `cgroup`).
    pub cgroup_procs: Option<RawFd>,
    /// The write end of the sentinel's pipe, non-blocking (see `sentinel`).
    pub sentinel: Option<RawFd>,
}

/// A started worker.
#[derive(Debug)]
pub struct Spawned {
    pub pid: Pid,
    /// With [`Spec::intercept`]: the filter's notification fd.
    pub notif: Option<OwnedFd>,
}

/// Start one worker. Must be called from the launcher's main thread (see the module doc on
/// PDEATHSIG).
pub fn spawn(program: &Program, spec: &Spec) -> io::Result<Spawned> {
    check(spec)?;
    // NAME=<21 NULs> for each pid variable: the child writes its pid digits in place.
    let mut pid_bufs: Vec<Vec<u8>> = spec
        .pid_vars
        .iter()
        .map(|name| {
            let mut b = format!("{name}=").into_bytes();
            b.extend_from_slice(&[0u8; 21]);
            b
        })
        .collect();
    let mut argv: Vec<*const libc::c_char> = spec.argv.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut envp: Vec<*const libc::c_char> = spec.env.iter().map(|e| e.as_ptr()).collect();
    let mut pid_slots = [std::ptr::null_mut(); 4];
    for (i, (buf, name)) in pid_bufs.iter_mut().zip(spec.pid_vars).enumerate() {
        envp.push(buf.as_ptr().cast());
        // SAFETY: the offset is inside the buffer, which outlives the fork below.
        pid_slots[i] = unsafe { buf.as_mut_ptr().add(name.len() + 1) };
    }
    envp.push(std::ptr::null());

    // With --intercept-bind: the channel the child sends its notification fd on.
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    let pair = || socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC);
    let chan = spec.intercept.map(|_| pair()).transpose()?;
    let mut fds = ChildFds::new(spec, chan.as_ref().map_or(-1, |c| c.1.as_raw_fd()));
    let staged = stage::Staged::new(fds.used_mut());
    let mut ctx = ChildCtx {
        parent: std::process::id() as libc::pid_t,
        fds: [-1; MAX_FDS],
        nfds: fds.sockets().len(),
        table_limit: staged.limit,
        stdin_socket: spec.socket_on_stdin,
        stdio: spec.stdio.map(|_| [fds.all[ChildFds::OUT], fds.all[ChildFds::ERR]]),
        cpus: spec.cpu.and_then(cpu_set),
        filter: spec.intercept.copied(),
        chan: fds.all[ChildFds::CHAN],
        cgroup_procs: fds.all[ChildFds::PROCS],
        sentinel: fds.all[ChildFds::SENTINEL],
        err: std::sync::atomic::AtomicI32::new(0),
        pid_slots,
        npid: spec.pid_vars.len(),
        creds: spec.creds.map(|c| (c.uid, c.gid, c.groups.as_ptr(), c.groups.len())),
        nofile: ORIGINAL_NOFILE.get().copied(),
        path: program.path().as_ptr(),
        argv: argv.as_ptr(),
        envp: envp.as_ptr(),
    };
    ctx.fds[..ctx.nfds].copy_from_slice(fds.sockets());

    let share_table = staged.limit >= 0;
    // SAFETY: child_entry only runs child_exec on `ctx`, which lives until the child has exec'd;
    // sharing the fd table, it takes its own copy before it touches any fd (step 0).
    let pid = unsafe { crate::vfork::run(child_entry, (&ctx as *const ChildCtx).cast_mut().cast(), share_table) };
    // The block's copies closed (before the channel is read: its write end must be gone).
    drop(staged);
    finish(Pid::from_raw(pid?), ctx.err.load(std::sync::atomic::Ordering::SeqCst), chan)
}

/// What one child can be given (fixed sizes, so that it needs no allocation).
fn check(spec: &Spec) -> io::Result<()> {
    if spec.fds.len() > MAX_FDS {
        return Err(io::Error::other(format!("at most {MAX_FDS} listening fds per worker")));
    }
    if spec.socket_on_stdin && spec.fds.is_empty() {
        return Err(io::Error::other("--socket-on-stdin: the worker has no listening socket to get as fd 0"));
    }
    if spec.pid_vars.len() > 4 {
        return Err(io::Error::other("at most 4 pid variables"));
    }
    Ok(())
}

/// Every fd the child uses, in the order the staging block (see `stage`) holds them: five
/// fixed places (-1: none), then the listening sockets.
struct ChildFds {
    all: [RawFd; stage::SLOTS],
    sockets: usize,
}

impl ChildFds {
    const OUT: usize = 0;
    const ERR: usize = 1;
    /// The intercept's channel.
    const CHAN: usize = 2;
    const PROCS: usize = 3;
    const SENTINEL: usize = 4;
    const SOCKETS: usize = 5;

    fn new(spec: &Spec, chan: RawFd) -> ChildFds {
        let mut all = [-1 as RawFd; stage::SLOTS];
        if let Some([out, err]) = spec.stdio {
            (all[Self::OUT], all[Self::ERR]) = (out, err);
        }
        all[Self::CHAN] = chan;
        all[Self::PROCS] = spec.contain.cgroup_procs.unwrap_or(-1);
        all[Self::SENTINEL] = spec.contain.sentinel.unwrap_or(-1);
        all[Self::SOCKETS..Self::SOCKETS + spec.fds.len()].copy_from_slice(spec.fds);
        ChildFds { all, sockets: spec.fds.len() }
    }

    /// The places in use, for the block to rewrite.
    fn used_mut(&mut self) -> &mut [RawFd] {
        &mut self.all[..Self::SOCKETS + self.sockets]
    }

    fn sockets(&self) -> &[RawFd] {
        &self.all[Self::SOCKETS..Self::SOCKETS + self.sockets]
    }
}

/// After the clone returned: the child exec'd (errno 0) or has exited with the errno of what
/// failed; with `--intercept-bind`, its notification fd taken from the channel.
fn finish(pid: Pid, errno: i32, chan: Option<(OwnedFd, OwnedFd)>) -> io::Result<Spawned> {
    if errno != 0 {
        // The exec failed: the child has exited; reap it here, synchronously.
        let _ = nix::sys::wait::waitpid(pid, None);
        return Err(io::Error::from_raw_os_error(errno));
    }
    let Some((chan_r, chan_w)) = chan else { return Ok(Spawned { pid, notif: None }) };
    drop(chan_w);
    match crate::intercept::recv_fd(&chan_r) {
        Ok(notif) => Ok(Spawned { pid, notif: Some(notif) }),
        Err(e) => {
            // It exec'd without its fd (the launcher out of fds: the kernel drops it): a
            // worker whose binds nobody would serve must not run unaccounted for.
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(pid, None);
            Err(e)
        }
    }
}

/// A CPU set with only `cpu` in it (None when `cpu` is beyond what a set can hold).
fn cpu_set(cpu: usize) -> Option<CpuSet> {
    let mut set = CpuSet::new();
    set.set(cpu).ok()?;
    Some(set)
}
