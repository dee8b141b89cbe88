//! Starting one worker process: the fork/exec itself, the unsafe part of the launcher. What to
//! run comes from `command`, the environment from `contract`; this module only carries them
//! into the child.
//!
//! Everything the child needs (argv, envp, the fd list) is built in the parent. Between fork
//! and exec the child only makes async-signal-safe system calls on memory it already has:
//! it never allocates. In the child, in order:
//! 1. `setpgid(0, 0)`: the worker leads its own process group (stop signals go to the group);
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
//!    its notification fd is sent to the parent over the error channel (SCM_RIGHTS) and closed
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
//! 8. `execve`. A failure is reported to the parent through a CLOEXEC channel (a SEQPACKET
//!    socket pair: errno, 4 bytes), so the parent knows synchronously whether the exec
//!    happened; the channel's end of file is the exec.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

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
    pipe_w: RawFd,
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

    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    let (pipe_r, pipe_w) = socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)?;
    let mut ctx = ChildCtx {
        parent: std::process::id() as libc::pid_t,
        fds: [-1; MAX_FDS],
        nfds: spec.fds.len(),
        stdin_socket: spec.socket_on_stdin,
        stdio: spec.stdio,
        cpus: spec.cpu.and_then(cpu_set),
        filter: spec.intercept.copied(),
        pipe_w: pipe_w.as_raw_fd(),
        pid_slots,
        npid: spec.pid_vars.len(),
        creds: spec.creds.map(|c| (c.uid, c.gid, c.groups.as_ptr(), c.groups.len())),
        nofile: ORIGINAL_NOFILE.get().copied(),
        path: program.path().as_ptr(),
        argv: argv.as_ptr(),
        envp: envp.as_ptr(),
    };
    ctx.fds[..spec.fds.len()].copy_from_slice(spec.fds);

    // SAFETY: fork in a multi-threaded process; the child branch below only makes
    // async-signal-safe calls on memory prepared before the fork and ends in execve or _exit.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: we are the freshly forked child; see child_exec's contract.
        unsafe { child_exec(&ctx) }
    }
    drop(pipe_w);
    let pid = Pid::from_raw(pid);
    let kill_and_reap = |e: io::Error| {
        // Whatever the child is doing (it may have exec'd), it must not run unaccounted for.
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        let _ = nix::sys::wait::waitpid(pid, None);
        Err(e)
    };
    match read_channel(&pipe_r) {
        Ok(Said::Exec(notif)) if spec.intercept.is_some() && notif.is_none() => {
            // The child fails before exec when it cannot send the fd: a lost fd (the launcher
            // out of fds: the kernel drops it) leaves a worker whose binds nobody would serve.
            kill_and_reap(io::Error::other("the worker's seccomp notification fd did not arrive"))
        }
        Ok(Said::Exec(notif)) => Ok(Spawned { pid, notif }),
        Ok(Said::Failed(errno)) => {
            // The exec failed: the child has exited (or is about to); reap it here, synchronously.
            let _ = nix::sys::wait::waitpid(pid, None);
            Err(io::Error::from_raw_os_error(errno))
        }
        Err(e) => kill_and_reap(e),
    }
}

/// What the child said on its channel.
enum Said {
    /// It exec'd (end of file), after sending its notification fd (with `--intercept-bind`).
    Exec(Option<OwnedFd>),
    /// A step or the exec failed with this errno (4 bytes).
    Failed(i32),
}

/// What the child said before its exec: the notification fd (with `--intercept-bind`), then
/// the end of file of the exec, or the errno of a failure.
fn read_channel(chan: &OwnedFd) -> io::Result<Said> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let mut notif = None;
    loop {
        let mut buf = [0u8; 4];
        let mut space = nix::cmsg_space!(RawFd);
        let (n, fds, truncated) = {
            let mut iov = [io::IoSliceMut::new(&mut buf)];
            match recvmsg::<()>(chan.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC) {
                Ok(msg) => {
                    let mut fds = Vec::new();
                    let truncated = msg.flags.contains(MsgFlags::MSG_CTRUNC);
                    for c in msg.cmsgs().into_iter().flatten() {
                        if let ControlMessageOwned::ScmRights(f) = c {
                            fds.extend(f);
                        }
                    }
                    (msg.bytes, fds, truncated)
                }
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        };
        // SAFETY: SCM_RIGHTS just gave this process these fds; nothing else owns them.
        let mut owned = fds.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) });
        match (n, owned.next()) {
            (0, _) => return Ok(Said::Exec(notif)),
            (1, Some(fd)) => notif = Some(fd),
            (1, None) if truncated => {
                return Err(io::Error::other(
                    "the worker's seccomp notification fd was lost (the launcher is out of fds)",
                ))
            }
            (4, None) => return Ok(Said::Failed(i32::from_ne_bytes(buf))),
            (n, _) => return Err(io::Error::other(format!("unexpected message of {n} bytes from the worker's child"))),
        }
    }
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
        let fail = |pipe: RawFd| -> ! {
            let e = *libc::__errno_location();
            let bytes = e.to_ne_bytes();
            libc::write(pipe, bytes.as_ptr().cast(), 4);
            libc::_exit(127)
        };
        libc::setpgid(0, 0);
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
        let pipe = libc::fcntl(ctx.pipe_w, libc::F_DUPFD_CLOEXEC, floor);
        if pipe < 0 {
            fail(ctx.pipe_w);
        }
        // The log pipes too: their numbers may be among 3.. (or even 1 and 2).
        let mut stdio = [-1 as RawFd; 2];
        if let Some(fds) = &ctx.stdio {
            for (t, &fd) in stdio.iter_mut().zip(fds) {
                *t = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, floor);
                if *t < 0 {
                    fail(pipe);
                }
            }
        }
        let mut tmp = [-1 as RawFd; MAX_FDS];
        for (t, &fd) in tmp.iter_mut().zip(&ctx.fds).take(nfds) {
            *t = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, floor);
            if *t < 0 {
                fail(pipe);
            }
        }
        for (i, &t) in tmp.iter().enumerate().take(nfds) {
            // dup2 clears CLOEXEC on the target: these are the fds the worker keeps.
            if libc::dup2(t, 3 + i as libc::c_int) < 0 {
                fail(pipe);
            }
        }
        // inetd "wait" style: the first listening socket is also stdin (replacing whatever fd 0
        // was); dup2 leaves fd 0 without CLOEXEC.
        if ctx.stdin_socket && libc::dup2(3, 0) < 0 {
            fail(pipe);
        }
        // The log pipes become stdout and stderr (dup2 leaves them without CLOEXEC).
        if ctx.stdio.is_some() && (libc::dup2(stdio[0], 1) < 0 || libc::dup2(stdio[1], 2) < 0) {
            fail(pipe);
        }
        if let Some(set) = &ctx.cpus {
            // nix's wrapper is the bare system call on our copy of the set: no allocation.
            if nix::sched::sched_setaffinity(Pid::from_raw(0), set).is_err() {
                fail(pipe);
            }
        }
        // Everything from `floor` up closes at exec (the error pipe stays usable until then).
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
            if notif < 0 || !crate::intercept::send_fd(pipe, notif) {
                fail(pipe);
            }
            libc::close(notif);
        }

        // Drop privileges last (groups, then gid, then uid) and check it took.
        if let Some((uid, gid, groups, ngroups)) = ctx.creds {
            if libc::setgroups(ngroups, groups) != 0 || libc::setgid(gid) != 0 || libc::setuid(uid) != 0 {
                fail(pipe);
            }
            if libc::getuid() != uid || libc::geteuid() != uid || libc::getgid() != gid {
                *libc::__errno_location() = libc::EPERM;
                fail(pipe);
            }
        }

        // Armed after the credential change, which clears it (commit_creds).
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
            fail(pipe);
        }
        if libc::getppid() != ctx.parent {
            // The launcher died before PDEATHSIG was armed.
            libc::_exit(1);
        }

        // The pid variables: write our pid's decimal digits into the prepared buffers.
        let mut n = libc::getpid() as u32;
        let mut digits = [0u8; 12];
        let mut len = 0;
        loop {
            digits[len] = b'0' + (n % 10) as u8;
            len += 1;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        for slot in &ctx.pid_slots[..ctx.npid] {
            for i in 0..len {
                *slot.add(i) = digits[len - 1 - i];
            }
        }

        // The fd limit the launcher started with, last: lowered earlier, the dups above would fail
        // (EMFILE) once the launcher holds more fds than that limit (relayed connections).
        if let Some(lim) = &ctx.nofile {
            libc::setrlimit(libc::RLIMIT_NOFILE, lim);
        }
        libc::execve(ctx.path, ctx.argv, ctx.envp);
        fail(pipe)
    }
}
