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
//! the child. In the child, in order:
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

/// What the child reads between fork and exec: built in the parent, so the child allocates nothing.
struct ChildCtx {
    parent: libc::pid_t,
    fds: [RawFd; MAX_FDS],
    nfds: usize,
    /// dup2 fd 3 (the first listening socket, once in place) onto fd 0.
    stdin_socket: bool,
    /// dup2 onto fds 1 and 2 (the log pipes' write ends).
    stdio: Option<[RawFd; 2]>,
    /// CPU affinity to set (built in the parent).
    cpus: Option<CpuSet>,
    filter: Option<ChildFilter>,
    /// The channel the notification fd is sent on (-1: no `--intercept-bind`).
    chan: RawFd,
    /// Step 1's containment (-1: none).
    cgroup_procs: RawFd,
    sentinel: RawFd,
    /// Set by the child when a step or the exec fails (its errno; 0 until then).
    err: std::sync::atomic::AtomicI32,
    pid_slots: [*mut u8; 4],
    npid: usize,
    /// uid, gid, supplementary groups (pointer, count).
    creds: Option<(libc::uid_t, libc::gid_t, *const libc::gid_t, usize)>,
    /// RLIMIT_NOFILE to restore (the launcher raised its own).
    nofile: Option<libc::rlimit>,
    path: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
}

/// Start one worker. Must be called from the launcher's main thread (see the module doc on
/// PDEATHSIG).
pub fn spawn(program: &Program, spec: &Spec) -> io::Result<Spawned> {
    if spec.fds.len() > MAX_FDS {
        return Err(io::Error::other(format!("at most {MAX_FDS} listening fds per worker")));
    }
    if spec.socket_on_stdin && spec.fds.is_empty() {
        return Err(io::Error::other("--socket-on-stdin: the worker has no listening socket to get as fd 0"));
    }
    if spec.pid_vars.len() > 4 {
        return Err(io::Error::other("at most 4 pid variables"));
    }
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
    let mut ctx = ChildCtx {
        parent: std::process::id() as libc::pid_t,
        fds: [-1; MAX_FDS],
        nfds: spec.fds.len(),
        stdin_socket: spec.socket_on_stdin,
        stdio: spec.stdio,
        cpus: spec.cpu.and_then(cpu_set),
        filter: spec.intercept.copied(),
        chan: chan.as_ref().map_or(-1, |c| c.1.as_raw_fd()),
        cgroup_procs: spec.contain.cgroup_procs.unwrap_or(-1),
        sentinel: spec.contain.sentinel.unwrap_or(-1),
        err: std::sync::atomic::AtomicI32::new(0),
        pid_slots,
        npid: spec.pid_vars.len(),
        creds: spec.creds.map(|c| (c.uid, c.gid, c.groups.as_ptr(), c.groups.len())),
        nofile: ORIGINAL_NOFILE.get().copied(),
        path: program.path().as_ptr(),
        argv: argv.as_ptr(),
        envp: envp.as_ptr(),
    };
    ctx.fds[..spec.fds.len()].copy_from_slice(spec.fds);

    // SAFETY: child_entry only runs child_exec on `ctx`, which lives until the child has exec'd.
    let pid = unsafe { crate::vfork::run(child_entry, (&ctx as *const ChildCtx).cast_mut().cast())? };
    let pid = Pid::from_raw(pid);
    let errno = ctx.err.load(std::sync::atomic::Ordering::SeqCst);
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

/// The child's entry point on its own stack (see [`spawn`]).
extern "C" fn child_entry(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the parent's ChildCtx, alive until we exec or exit (CLONE_VFORK).
    unsafe { child_exec(&*(arg as *const ChildCtx)) }
}

/// A CPU set with only `cpu` in it (None when `cpu` is beyond what a set can hold).
fn cpu_set(cpu: usize) -> Option<CpuSet> {
    let mut set = CpuSet::new();
    set.set(cpu).ok()?;
    Some(set)
}

/// The child's side of [`spawn`]. Never returns.
///
/// # Safety
/// Only to be called in a child right after fork. All pointers in `ctx` point into the
/// parent's memory, copied into this process by fork and valid until exec.
unsafe fn child_exec(ctx: &ChildCtx) -> ! {
    // SAFETY: every call below is an async-signal-safe system call wrapper; no allocation.
    unsafe {
        // The errno of a failed step, for the parent (an atomic store in the shared context).
        let fail = || -> ! {
            let e = (*libc::__errno_location()).max(1);
            ctx.err.store(e, std::sync::atomic::Ordering::SeqCst);
            libc::_exit(127)
        };
        libc::setpgid(0, 0);
        // SAFETY (containment): write(2) of a constant and of a stack buffer to fds the parent
        // opened for this; nothing allocated. The move into the cgroup must succeed: a worker
        // outside it would escape the containment the launcher reports.
        if ctx.cgroup_procs >= 0 && libc::write(ctx.cgroup_procs, b"0".as_ptr().cast(), 1) != 1 {
            fail();
        }
        if ctx.sentinel >= 0 {
            // `+PID\n`; a full pipe (EAGAIN: the sentinel is not reading) loses only the record.
            let mut rec = [0u8; 16];
            rec[0] = b'+';
            let len = 1 + crate::vfork::write_decimal(&mut rec[1..], libc::getpid() as u32);
            rec[len] = b'\n';
            libc::write(ctx.sentinel, rec.as_ptr().cast(), len + 1);
        }
        for sig in 1..=libc::SIGRTMAX() {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::pthread_sigmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());

        // Move everything we still need above the target range first, then dup2 into 3.. .
        let nfds = ctx.nfds;
        let floor = 3 + nfds as libc::c_int;
        // The intercept's channel (sent on in step 4) and the log pipes too: their numbers may
        // be among 3.. (or even 1 and 2).
        let chan = if ctx.chan >= 0 { libc::fcntl(ctx.chan, libc::F_DUPFD_CLOEXEC, floor) } else { -1 };
        if ctx.chan >= 0 && chan < 0 {
            fail();
        }
        let mut stdio = [-1 as RawFd; 2];
        if let Some(fds) = &ctx.stdio {
            for (t, &fd) in stdio.iter_mut().zip(fds) {
                *t = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, floor);
                if *t < 0 {
                    fail();
                }
            }
        }
        let mut tmp = [-1 as RawFd; MAX_FDS];
        for (t, &fd) in tmp.iter_mut().zip(&ctx.fds).take(nfds) {
            *t = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, floor);
            if *t < 0 {
                fail();
            }
        }
        for (i, &t) in tmp.iter().enumerate().take(nfds) {
            // dup2 clears CLOEXEC on the target: these are the fds the worker keeps.
            if libc::dup2(t, 3 + i as libc::c_int) < 0 {
                fail();
            }
        }
        // inetd "wait" style: the first listening socket is also stdin (replacing whatever fd 0
        // was); dup2 leaves fd 0 without CLOEXEC.
        if ctx.stdin_socket && libc::dup2(3, 0) < 0 {
            fail();
        }
        // The log pipes become stdout and stderr (dup2 leaves them without CLOEXEC).
        if ctx.stdio.is_some() && (libc::dup2(stdio[0], 1) < 0 || libc::dup2(stdio[1], 2) < 0) {
            fail();
        }
        if let Some(set) = &ctx.cpus {
            // nix's wrapper is the bare system call on our copy of the set: no allocation.
            if nix::sched::sched_setaffinity(Pid::from_raw(0), set).is_err() {
                fail();
            }
        }
        // Everything from `floor` up closes at exec.
        const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
        if libc::syscall(libc::SYS_close_range, floor as libc::c_uint, libc::c_uint::MAX, CLOSE_RANGE_CLOEXEC) != 0 {
            let max = libc::sysconf(libc::_SC_OPEN_MAX).clamp(1024, 65536) as libc::c_int;
            for fd in floor..max {
                libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
            }
        }

        // The bind() interception's filter, with the launcher's credentials still (see step 4).
        if let Some(filter) = &ctx.filter {
            let notif = crate::intercept::install(filter);
            if notif < 0 || !crate::intercept::send_fd(chan, notif) {
                fail();
            }
            libc::close(notif);
        }

        // Drop privileges last (groups, then gid, then uid) and check it took.
        // Raw system calls: glibc's wrappers would signal the launcher's threads (setxid),
        // whose records this child shares but which are not its own.
        if let Some((uid, gid, groups, ngroups)) = ctx.creds {
            if libc::syscall(libc::SYS_setgroups, ngroups, groups) != 0
                || libc::syscall(libc::SYS_setgid, gid) != 0
                || libc::syscall(libc::SYS_setuid, uid) != 0
            {
                fail();
            }
            if libc::getuid() != uid || libc::geteuid() != uid || libc::getgid() != gid {
                *libc::__errno_location() = libc::EPERM;
                fail();
            }
        }

        // Armed after the credential change, which clears it (commit_creds).
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
            fail();
        }
        if libc::getppid() != ctx.parent {
            // The launcher died before PDEATHSIG was armed.
            libc::_exit(1);
        }

        // The pid variables: write our pid's decimal digits into the prepared buffers.
        let mut digits = [0u8; 12];
        let len = crate::vfork::write_decimal(&mut digits, libc::getpid() as u32);
        for slot in &ctx.pid_slots[..ctx.npid] {
            for (i, d) in digits[..len].iter().enumerate() {
                *slot.add(i) = *d;
            }
        }

        // The fd limit the launcher started with, last: lowered earlier, the dups above would fail
        // (EMFILE) once the launcher holds more fds than that limit (relayed connections).
        if let Some(lim) = &ctx.nofile {
            libc::setrlimit(libc::RLIMIT_NOFILE, lim);
        }
        libc::execve(ctx.path, ctx.argv, ctx.envp);
        fail()
    }
}
