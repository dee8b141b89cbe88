//! `reexec`: the launcher replaces its own program in place (same pid, same children) to
//! upgrade itself without touching a worker. This module owns the hand-over: [`State`], what
//! the old image tells the new one (a versioned JSON document, so that a newer binary can read an
//! older one's state; the positional text of older images is read too), and [`exec`], the exec itself.
//!
//! What execve keeps and drops (shared/notes/KERNEL.md): the pid, the children (zombies
//! included), every fd without FD_CLOEXEC, the signal mask and pending signals are kept; the
//! other threads are gone, and caught signals go back to their default action. So the old image
//! blocks the signals it handles (a TERM or SIGCHLD arriving meanwhile stays pending instead of
//! killing it or being lost), clears CLOEXEC on every fd it hands over (the listening sockets,
//! the workers' notify sockets), writes the state into a memfd and passes its number in
//! `REUSE_LAUNCH_STATE`; the new image reads it, installs its handlers, then unblocks. Workers
//! keep running and serving throughout: their sockets never close, and PDEATHSIG fires only
//! when the thread that forked them exits, which an exec by that thread is not.
//!
//! Before the exec the old image runs the new binary with `--version`: a missing or broken
//! binary (not executable, wrong architecture, missing libraries) is refused and everything
//! keeps running. A binary that runs `--version` but cannot start from the state exits, and
//! takes the launcher with it (its workers die by PDEATHSIG, its sockets close): install a
//! binary that works.
//!
//! Times are carried as milliseconds relative to the moment of the exec (CLOCK_MONOTONIC goes
//! on), so deadlines (grace kills, ready timeouts, backoff, the roll's) survive.

use std::ffi::{CString, OsString};
use std::io::{self, Read, Seek, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::error::Error;
use crate::sys::set_cloexec;

mod legacy;
mod state;
pub use state::{
    at_ms, ms_from, AutoscaleState, LogPipe, Replacement, RollState, SentinelState, SlotState, State, WorkerFd,
    WorkerPhase, WorkerState,
};

/// The environment variable naming the state's fd in the new image.
pub const STATE_VAR: &str = "REUSE_LAUNCH_STATE";

/// Set for the `--version` run of [`check_binary`]: a launcher that reads the JSON hand-over
/// then also prints the line `hand-over: FORMAT VERSION` (see [`answer_probe`]).
pub const PROBE_VAR: &str = "REUSE_LAUNCH_HANDOVER_PROBE";

/// In `main`, first: the answer to [`check_binary`]'s question, if that is what this run is.
pub fn answer_probe(argv: &[OsString]) {
    if argv.len() == 2 && argv[1] == "--version" && std::env::var_os(PROBE_VAR).is_some() {
        println!("reuse-launch {}", env!("CARGO_PKG_VERSION"));
        println!("hand-over: {} {}", state::FORMAT, state::VERSION);
        std::process::exit(0);
    }
}

/// Does a `--version` answer (with [`PROBE_VAR`] set) say the binary reads this one's hand-over?
fn reads_our_state(out: &str) -> bool {
    let want = format!("hand-over: {} ", state::FORMAT);
    out.lines().any(|l| l.starts_with(&want))
}

/// The program to exec: the path the launcher was started from (so that a newly installed
/// version at that path takes over), made absolute at start.
pub fn own_path() -> Option<PathBuf> {
    static PATH: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        let arg0 = PathBuf::from(std::env::args_os().next()?);
        if arg0.as_os_str().as_bytes().contains(&b'/') {
            return std::env::current_dir().ok().map(|d| d.join(&arg0));
        }
        let search = std::env::var_os("PATH")?;
        std::env::split_paths(&search).map(|d| d.join(&arg0)).find(|p| p.is_file())
    })
    .clone()
}

/// Check that `path` starts at all: it must run `--version` and exit 0 within 5 s; and that
/// it reads the hand-over this launcher writes (a binary from before the JSON document does
/// not: exec'd, it would refuse the state and every worker would be lost). The answer is the
/// binary's version line.
pub fn check_binary(path: &std::path::Path) -> Result<String, String> {
    let mut child = std::process::Command::new(path)
        .arg("--version")
        .env(PROBE_VAR, "1")
        .process_group(0) // never in the launcher's group (see sentinel.rs)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", path.display()))?;
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => {
                let mut out = String::new();
                let _ = child.stdout.take().map(|mut o| o.read_to_string(&mut out));
                let version = out.lines().next().unwrap_or("").trim().to_string();
                if !reads_our_state(&out) {
                    return Err(format!(
                        "{} ({version}) cannot read this launcher's hand-over (it is from before the JSON state \
                         document): a reexec into it would lose every worker; stop and start the launcher to run it",
                        path.display()
                    ));
                }
                return Ok(version);
            }
            Ok(Some(status)) => {
                let mut err = String::new();
                let _ = child.stderr.take().map(|mut e| e.read_to_string(&mut err));
                return Err(format!("{} --version failed ({status}): {}", path.display(), err.trim()));
            }
            Ok(None) if Instant::now() < end => std::thread::sleep(Duration::from_millis(10)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{} --version did not finish within 5 s", path.display()));
            }
        }
    }
}

/// Exec `path` in place with this process's arguments, `state` in a memfd, and `keep` (the
/// fds the state names) open across the exec. Returns only if the exec failed, with everything
/// as it was (CLOEXEC back on `keep`, the signals unblocked).
pub fn exec(path: &std::path::Path, state: &State, keep: &[RawFd], signals: &[i32]) -> Error {
    match try_exec(path, state, keep, signals) {
        Ok(never) => match never {},
        Err(e) => {
            set_cloexec(keep, true);
            block(signals, false);
            Error::Failed(format!("cannot re-execute {}: {e}", path.display()))
        }
    }
}

fn try_exec(
    path: &std::path::Path,
    state: &State,
    keep: &[RawFd],
    signals: &[i32],
) -> io::Result<std::convert::Infallible> {
    let memfd: OwnedFd = nix::sys::memfd::memfd_create(c"reuse-launch-state", nix::sys::memfd::MFdFlags::empty())?;
    let mut file = std::fs::File::from(memfd);
    file.write_all(state.encode().as_bytes())?;
    file.rewind()?;
    let fd = file.as_raw_fd();
    let cpath = CString::new(path.as_os_str().as_bytes())?;
    let argv: Vec<CString> = std::env::args_os().map(|a| CString::new(a.as_bytes())).collect::<Result<_, _>>()?;
    let mut env: Vec<CString> = std::env::vars_os()
        .filter(|(k, _)| k != STATE_VAR && !k.as_bytes().starts_with(b"LISTEN_"))
        .map(|(k, v)| {
            let mut e: OsString = k;
            e.push("=");
            e.push(v);
            CString::new(e.as_bytes())
        })
        .collect::<Result<_, _>>()?;
    env.push(CString::new(format!("{STATE_VAR}={fd}"))?);
    if let Some(nofile) = crate::spawn::original_nofile() {
        env.retain(|e| !e.as_bytes().starts_with(format!("{}=", crate::spawn::NOFILE_VAR).as_bytes()));
        env.push(CString::new(format!("{}={nofile}", crate::spawn::NOFILE_VAR))?);
    }
    set_cloexec(keep, false);
    block(signals, true);
    let err = nix::unistd::execve(&cpath, &argv, &env).unwrap_err();
    drop(file);
    Err(err.into())
}

/// The state the old image left, if this process is a re-executed launcher (and the fd is
/// closed after reading; the variable is removed so that workers never see it).
pub fn take_state() -> Result<Option<State>, Error> {
    let Some(value) = std::env::var_os(STATE_VAR) else { return Ok(None) };
    // SAFETY (no unsafe here): the variable is removed before any thread is started.
    std::env::remove_var(STATE_VAR);
    let fd: RawFd = value.to_string_lossy().parse().map_err(|_| Error::Failed(format!("{STATE_VAR} is not an fd")))?;
    crate::activation::check_is_open(fd).map_err(|e| Error::Failed(format!("{STATE_VAR}={fd}: {e}")))?;
    // SAFETY: the old image passed this memfd to us by number; nothing else here owns it.
    let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
    let mut text = String::new();
    file.read_to_string(&mut text).map_err(|e| Error::Failed(format!("cannot read the state: {e}")))?;
    decode_state(&text).map(Some).map_err(|e| Error::Failed(format!("cannot resume: {e}")))
}

/// A hand-over of any image: the JSON document (`state`), or the positional text of an image
/// from before it (`legacy`).
pub fn decode_state(text: &str) -> Result<State, String> {
    if legacy::is_legacy(text) {
        legacy::decode(text)
    } else {
        State::from_document(text)
    }
}

/// Block (or unblock) `signals` in the calling thread; blocked ones stay pending across exec.
pub fn block(signals: &[i32], on: bool) {
    use nix::sys::signal::{pthread_sigmask, SigSet, SigmaskHow, Signal};
    let mut set = SigSet::empty();
    for s in signals.iter().filter_map(|s| Signal::try_from(*s).ok()) {
        set.add(s);
    }
    let how = if on { SigmaskHow::SIG_BLOCK } else { SigmaskHow::SIG_UNBLOCK };
    let _ = pthread_sigmask(how, Some(&set), None);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_binary_that_names_this_format_reads_our_state() {
        assert!(reads_our_state("reuse-launch 0.2.0\nhand-over: reuse-launch-state 2\n"));
        assert!(
            reads_our_state("reuse-launch 0.3.0\nhand-over: reuse-launch-state 7\n"),
            "a newer version of the format"
        );
        assert!(!reads_our_state("reuse-launch 0.1.0\n"), "a binary from before the document");
        assert!(!reads_our_state("reuse-launch 0.1.0\nhand-over: reuse-launch-state-v3 1\n"), "another format");
    }
}
