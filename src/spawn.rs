//! Starting one worker process: command resolution, the worker's fds and environment, and the
//! fork/exec itself (the unsafe part of the launcher).
//!
//! Everything the child needs (argv, envp, the fd list) is built in the parent. Between fork
//! and exec the child only makes async-signal-safe system calls on memory it already has:
//! it never allocates. In the child, in order:
//! 1. `setpgid(0, 0)`: the worker leads its own process group (stop signals go to the group);
//! 2. `PR_SET_PDEATHSIG = SIGKILL`, then a check that the launcher is still its parent. The
//!    death signal fires when the *thread* that forked exits, so workers are only ever forked
//!    from the supervisor loop on the launcher's main thread, which lives as long as the
//!    launcher: the signal, notify and helper threads may come and go without killing workers;
//! 3. every signal disposition back to default and an empty signal mask;
//! 4. the slot's listening sockets moved to fds 3, 4, ... (without CLOEXEC); every other fd
//!    above them is marked CLOEXEC, so the worker sees 0-2 and its own sockets, nothing else;
//! 5. `LISTEN_PID` written with the child's own pid into a buffer prepared by the parent;
//! 6. `execve`. A failure is reported to the parent through a CLOEXEC pipe (errno, 4 bytes),
//!    so the parent knows synchronously whether the exec happened.

use std::ffi::{CString, OsStr, OsString};
use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::unistd::{access, AccessFlags, Pid};

/// Most listening fds one worker can receive (fixed so the child needs no allocation).
pub const MAX_FDS: usize = 64;

/// A command resolved to an executable file, with argv ready for execve.
pub struct Program {
    pub display: String,
    path: CString,
    argv: Vec<CString>,
}

/// Why a command cannot be started; maps to the shell's exit codes 127 and 126.
#[derive(Debug)]
pub struct ResolveError {
    pub command: String,
    pub cause: String,
    pub exit_code: u8,
}

impl fmt::Display for ResolveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cannot run '{}': {}", self.command, self.cause)
    }
}

impl Program {
    /// Find `command[0]` as the shell would (a name with '/' is a path, else search PATH) and
    /// check it can be executed.
    pub fn resolve(command: &[OsString]) -> Result<Program, ResolveError> {
        let name = &command[0];
        let display = name.to_string_lossy().into_owned();
        let err = |cause: &str, exit_code| ResolveError { command: display.clone(), cause: cause.into(), exit_code };
        if name.is_empty() {
            return Err(err("empty command", 127));
        }
        let path = if name.as_bytes().contains(&b'/') {
            PathBuf::from(name)
        } else {
            let search = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
            let mut found = None;
            let mut not_executable = None;
            for dir in std::env::split_paths(&search) {
                let candidate = dir.join(name);
                if candidate.is_file() {
                    if access(&candidate, AccessFlags::X_OK).is_ok() {
                        found = Some(candidate);
                        break;
                    }
                    not_executable.get_or_insert(candidate);
                }
            }
            match (found, not_executable) {
                (Some(p), _) => p,
                (None, Some(p)) => p,
                (None, None) => return Err(err("command not found in PATH", 127)),
            }
        };
        check_executable(&path).map_err(|(cause, code)| err(&cause, code))?;
        let cstr = |s: &OsStr| CString::new(s.as_bytes()).map_err(|_| err("argument contains a NUL byte", 126));
        let argv = command.iter().map(|a| cstr(a)).collect::<Result<Vec<_>, _>>()?;
        let path = cstr(path.as_os_str())?;
        Ok(Program { display, path, argv })
    }
}

fn check_executable(path: &Path) -> Result<(), (String, u8)> {
    match std::fs::metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(("no such file".into(), 127)),
        Err(e) => Err((e.to_string(), 126)),
        Ok(m) if m.is_dir() => Err(("is a directory".into(), 126)),
        Ok(_) => access(path, AccessFlags::X_OK).map_err(|_| ("permission denied (not executable)".into(), 126)),
    }
}

/// Start one worker. `fds` become the worker's fds 3, 4, ...; `env` is its whole environment
/// except `LISTEN_PID`, which the child fills in with its own pid. Must be called from the
/// launcher's main thread (see the module doc on PDEATHSIG).
pub fn spawn(program: &Program, fds: &[RawFd], env: &[CString]) -> io::Result<Pid> {
    if fds.len() > MAX_FDS {
        return Err(io::Error::other(format!("at most {MAX_FDS} listening fds per worker")));
    }
    let mut fd_array = [-1 as RawFd; MAX_FDS];
    fd_array[..fds.len()].copy_from_slice(fds);
    let nfds = fds.len();

    // LISTEN_PID=<20 NULs>: the child writes its pid digits in place.
    let mut listen_pid = b"LISTEN_PID=".to_vec();
    let digits_at = listen_pid.len();
    listen_pid.extend_from_slice(&[0u8; 21]);
    let mut argv: Vec<*const libc::c_char> = program.argv.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut envp: Vec<*const libc::c_char> = env.iter().map(|e| e.as_ptr()).collect();
    envp.push(listen_pid.as_ptr().cast());
    envp.push(std::ptr::null());
    // SAFETY: digits_at is inside the buffer, which outlives the fork below.
    let pid_slot = unsafe { listen_pid.as_mut_ptr().add(digits_at) };
    let path = program.path.as_ptr();

    let (pipe_r, pipe_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)?;
    let parent = std::process::id() as libc::pid_t;

    // SAFETY: fork in a multi-threaded process; the child branch below only makes
    // async-signal-safe calls on memory prepared before the fork and ends in execve or _exit.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: we are the freshly forked child; see child_exec's contract.
        unsafe { child_exec(parent, &fd_array, nfds, pipe_w.as_raw_fd(), pid_slot, path, argv.as_ptr(), envp.as_ptr()) }
    }
    drop(pipe_w);
    let mut errno = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match nix::unistd::read(&pipe_r, &mut errno[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    if got == 0 {
        return Ok(Pid::from_raw(pid));
    }
    // The exec failed: the child has exited (or is about to); reap it here, synchronously.
    let _ = nix::sys::wait::waitpid(Pid::from_raw(pid), None);
    Err(io::Error::from_raw_os_error(i32::from_ne_bytes(errno)))
}

/// The child's side of [`spawn`]. Never returns.
///
/// # Safety
/// Only to be called in a child right after fork. All pointers come from the parent's memory,
/// copied into this process by fork and valid until exec.
#[allow(clippy::too_many_arguments)]
unsafe fn child_exec(
    parent: libc::pid_t,
    fds: &[RawFd; MAX_FDS],
    nfds: usize,
    pipe_w: RawFd,
    pid_slot: *mut u8,
    path: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
) -> ! {
    // SAFETY: every call below is an async-signal-safe system call wrapper; no allocation.
    unsafe {
        let fail = |pipe: RawFd| -> ! {
            let e = *libc::__errno_location();
            let bytes = e.to_ne_bytes();
            libc::write(pipe, bytes.as_ptr().cast(), 4);
            libc::_exit(127)
        };
        libc::setpgid(0, 0);
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
            fail(pipe_w);
        }
        if libc::getppid() != parent {
            // The launcher died before PDEATHSIG was armed.
            libc::_exit(1);
        }
        for sig in 1..libc::SIGRTMAX() {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::pthread_sigmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());

        // Move everything we still need above the target range first, then dup2 into 3.. .
        let floor = 3 + nfds as libc::c_int;
        let pipe = libc::fcntl(pipe_w, libc::F_DUPFD_CLOEXEC, floor);
        if pipe < 0 {
            fail(pipe_w);
        }
        let mut tmp = [-1 as RawFd; MAX_FDS];
        for i in 0..nfds {
            tmp[i] = libc::fcntl(fds[i], libc::F_DUPFD_CLOEXEC, floor);
            if tmp[i] < 0 {
                fail(pipe);
            }
        }
        for (i, &t) in tmp.iter().enumerate().take(nfds) {
            // dup2 clears CLOEXEC on the target: these are the fds the worker keeps.
            if libc::dup2(t, 3 + i as libc::c_int) < 0 {
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

        // LISTEN_PID: write our pid's decimal digits into the prepared buffer.
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
        for i in 0..len {
            *pid_slot.add(i) = digits[len - 1 - i];
        }

        libc::execve(path, argv, envp);
        fail(pipe)
    }
}

/// Build `KEY=VALUE` entries for execve.
pub fn env_entry(key: &str, value: impl AsRef<OsStr>) -> CString {
    let mut v = key.as_bytes().to_vec();
    v.push(b'=');
    v.extend_from_slice(value.as_ref().as_bytes());
    CString::new(v).unwrap_or_else(|_| CString::new(format!("{key}=")).expect("no NUL in key"))
}

/// The launcher's environment minus what must not reach a worker: variables addressed to the
/// launcher itself (LISTEN_*, NOTIFY_SOCKET), Node's cluster markers (a node worker that sees
/// them believes it is a cluster worker), and the per-worker variables set anew for each one.
pub fn inherited_env() -> Vec<(OsString, OsString)> {
    const DROP: &[&str] = &[
        "LISTEN_FDS",
        "LISTEN_PID",
        "LISTEN_FDNAMES",
        "NOTIFY_SOCKET",
        "NODE_UNIQUE_ID",
        "NODE_CHANNEL_FD",
        "NODE_CHANNEL_SERIALIZATION_MODE",
        "PORT",
        "REUSE_LAUNCH_SLOT",
        "REUSE_LAUNCH_GENERATION",
        "REUSE_LAUNCH_PID",
    ];
    std::env::vars_os().filter(|(k, _)| !DROP.iter().any(|d| k == OsStr::new(d))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_finds_commands_and_classifies_failures() {
        assert!(Program::resolve(&["sh".into()]).is_ok());
        let e = Program::resolve(&["definitely-not-a-command-xyz".into()]).err().unwrap();
        assert_eq!(e.exit_code, 127);
        assert!(e.to_string().contains("definitely-not-a-command-xyz"));
        use std::os::unix::fs::PermissionsExt;
        let plain = std::env::temp_dir().join(format!("reuse-launch-plain-{}", std::process::id()));
        std::fs::write(&plain, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Program::resolve(&[plain.clone().into()]).err().unwrap();
        std::fs::remove_file(&plain).unwrap();
        assert_eq!(e.exit_code, 126);
        assert!(e.to_string().contains("not executable"), "{e}");
        let e = Program::resolve(&["/tmp".into()]).err().unwrap();
        assert_eq!(e.exit_code, 126);
        let e = Program::resolve(&["./no/such/file".into()]).err().unwrap();
        assert_eq!(e.exit_code, 127);
    }

    #[test]
    fn env_entry_formats() {
        assert_eq!(env_entry("A", "b").to_str().unwrap(), "A=b");
    }
}
