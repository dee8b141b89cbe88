//! The supervisor's seam to the operating system: every process effect of the lifecycle rules
//! (start a worker, signal its group, reap exits) goes through [`Os`]. [`RealOs`] is the nix
//! implementation; the unit tests use a fake that records calls and reports the exits a test
//! decides, so respawn, backoff, give-up, timeouts, grace and roll order are tested without
//! forking.

use std::io;

use nix::sys::signal::{killpg, Signal};
use nix::sys::wait::{waitid, waitpid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::command::Program;
use crate::spawn::{self, Spawned, Spec};

pub trait Os {
    /// Fork and exec one worker (see `spawn`); its pid (and its seccomp notification fd with
    /// `--intercept-bind`) once the exec happened.
    fn spawn(&mut self, program: &Program, spec: &Spec) -> io::Result<Spawned>;
    /// Signal a worker's process group, and the worker itself in case it left the group
    /// (setsid): its pid cannot be reused before the launcher reaps it.
    fn signal(&mut self, pid: Pid, sig: Signal);
    /// A child that has exited, left waitable (its zombie pins its pid and process group id);
    /// None when none has.
    fn exited(&mut self) -> Option<Pid>;
    /// Reap `pid`: its status (None if it cannot be reaped). `block`: wait for it to exit.
    fn reap(&mut self, pid: Pid, block: bool) -> Option<WaitStatus>;
    /// Reap any exited child: Ok(None) when some are left but none has exited, Err when no
    /// child is left.
    fn reap_any(&mut self) -> Result<Option<WaitStatus>, ()>;
}

/// The real thing.
pub struct RealOs;

impl RealOs {
    /// Become a child subreaper, so that orphans of workers are re-parented to the launcher and
    /// reaped here (not by init).
    pub fn new() -> RealOs {
        if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
            log::warn!("cannot become a child subreaper: {e}");
        }
        RealOs
    }
}

impl Os for RealOs {
    fn spawn(&mut self, program: &Program, spec: &Spec) -> io::Result<Spawned> {
        spawn::spawn(program, spec)
    }

    fn signal(&mut self, pid: Pid, sig: Signal) {
        let _ = killpg(pid, sig);
        let _ = nix::sys::signal::kill(pid, sig);
    }

    fn exited(&mut self) -> Option<Pid> {
        let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
        waitid(Id::All, flags).ok().and_then(|s| s.pid())
    }

    fn reap(&mut self, pid: Pid, block: bool) -> Option<WaitStatus> {
        waitpid(pid, (!block).then_some(WaitPidFlag::WNOHANG)).ok()
    }

    fn reap_any(&mut self) -> Result<Option<WaitStatus>, ()> {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => Ok(None),
            Ok(s) => Ok(Some(s)),
            Err(_) => Err(()),
        }
    }
}

#[cfg(test)]
pub mod fake {
    //! A recording fake: pids from 1000 up, exits only when the test says so.
    use super::*;
    use std::collections::VecDeque;

    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Call {
        Spawn(Pid),
        Signal(Pid, Signal),
    }

    #[derive(Default)]
    pub struct FakeOs {
        pub calls: Vec<Call>,
        next_pid: i32,
        alive: Vec<Pid>,
        exited: VecDeque<(Pid, WaitStatus)>,
        /// Make the next spawns fail with this errno.
        pub fail_spawns: Option<i32>,
    }

    impl FakeOs {
        /// `pid` exits with `code` (the test then sends SIGCHLD).
        pub fn exit(&mut self, pid: Pid, code: i32) {
            self.alive.retain(|p| *p != pid);
            self.exited.push_back((pid, WaitStatus::Exited(pid, code)));
        }

        pub fn alive(&self) -> &[Pid] {
            &self.alive
        }

        pub fn signals_to(&self, pid: Pid) -> Vec<Signal> {
            let to = |c: &Call| match c {
                Call::Signal(p, s) if *p == pid => Some(*s),
                _ => None,
            };
            self.calls.iter().filter_map(to).collect()
        }
    }

    impl Os for FakeOs {
        fn spawn(&mut self, _: &Program, _: &Spec) -> io::Result<Spawned> {
            if let Some(errno) = self.fail_spawns {
                return Err(io::Error::from_raw_os_error(errno));
            }
            self.next_pid += 1;
            let pid = Pid::from_raw(1000 + self.next_pid);
            self.alive.push(pid);
            self.calls.push(Call::Spawn(pid));
            Ok(Spawned { pid, notif: None })
        }

        fn signal(&mut self, pid: Pid, sig: Signal) {
            self.calls.push(Call::Signal(pid, sig));
            if sig == Signal::SIGKILL && self.alive.contains(&pid) {
                self.alive.retain(|p| *p != pid);
                self.exited.push_back((pid, WaitStatus::Signaled(pid, sig, false)));
            }
        }

        fn exited(&mut self) -> Option<Pid> {
            self.exited.front().map(|e| e.0)
        }

        fn reap(&mut self, pid: Pid, _block: bool) -> Option<WaitStatus> {
            let i = self.exited.iter().position(|e| e.0 == pid)?;
            self.exited.remove(i).map(|e| e.1)
        }

        fn reap_any(&mut self) -> Result<Option<WaitStatus>, ()> {
            match self.exited.pop_front() {
                Some(e) => Ok(Some(e.1)),
                None if self.alive.is_empty() => Err(()),
                None => Ok(None),
            }
        }
    }
}
