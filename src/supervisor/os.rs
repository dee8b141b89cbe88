//! The supervisor's seam to the operating system: every process effect of the lifecycle rules
//! (start a worker, signal its group, reap exits) and what routing touches (attach a steering
//! program, read an accept queue, read /proc) goes through [`Os`]. [`RealOs`] is the nix
//! implementation; the unit tests use a fake that records calls and reports the exits, queue
//! lengths and process states a test decides, so respawn, backoff, give-up, timeouts, grace,
//! roll order, steering and stalls are tested without forking.

use std::io;
use std::os::fd::RawFd;

use nix::sys::signal::{killpg, Signal};
use nix::sys::wait::{waitid, waitpid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::command::Program;
use crate::queues::Queues;
use crate::spawn::{self, Spawned, Spec};
use crate::steer;
use crate::sys;

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
    /// Attach `program` to the reuseport group of listener `member` (None: detach it, the
    /// kernel's hash decides).
    fn steer(&mut self, member: RawFd, program: Option<&[libc::sock_filter]>) -> io::Result<()>;
    /// Each slot's accept queue (the longest over its listeners `layout[slot]`; None where
    /// unreadable), through the queue watch's reader if there is one.
    fn queues(&self, reader: Option<&mut Queues>, layout: Vec<Vec<RawFd>>) -> Vec<Option<u32>>;
    /// One listener's accept-queue length.
    fn queue_len(&self, listener: RawFd) -> io::Result<u32>;
    /// The processes of each worker's process group (a scan of /proc), by worker pid.
    fn members(&self, pids: &[i32]) -> Vec<Vec<i32>>;
    /// /proc: processes `pids`' state and CPU (see `stall::proc_state`).
    fn proc_state(&self, pids: &[i32]) -> (bool, bool, Option<u64>);
    /// /proc: the connections worker `pid` holds (`--steer least-loaded`, see `load`).
    fn open_sockets(&self, pid: i32) -> Option<u32>;
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

    fn steer(&mut self, member: RawFd, program: Option<&[libc::sock_filter]>) -> io::Result<()> {
        match program {
            Some(p) => steer::attach(member, p),
            None => steer::detach(member),
        }
    }

    fn queues(&self, reader: Option<&mut Queues>, layout: Vec<Vec<RawFd>>) -> Vec<Option<u32>> {
        real_queues(reader, layout)
    }

    fn queue_len(&self, listener: RawFd) -> io::Result<u32> {
        sys::queue_len(listener)
    }

    fn members(&self, pids: &[i32]) -> Vec<Vec<i32>> {
        crate::readiness::groups_members(pids)
    }

    fn proc_state(&self, pids: &[i32]) -> (bool, bool, Option<u64>) {
        crate::stall::proc_state(pids)
    }

    fn open_sockets(&self, pid: i32) -> Option<u32> {
        crate::load::open_sockets(pid)
    }
}

/// The queues as read for real: by the watch's reader, or `TCP_INFO` on every listener.
fn real_queues(reader: Option<&mut Queues>, layout: Vec<Vec<RawFd>>) -> Vec<Option<u32>> {
    match reader {
        Some(q) => {
            q.sync(layout);
            q.read()
        }
        None => layout.iter().map(|fds| crate::queues::max_len(fds)).collect(),
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
        /// A steering program (its length; None: detached) for the group of this listener.
        Steer(RawFd, Option<usize>),
    }

    #[derive(Default)]
    pub struct FakeOs {
        pub calls: Vec<Call>,
        next_pid: i32,
        alive: Vec<Pid>,
        exited: VecDeque<(Pid, WaitStatus)>,
        /// Make the next spawns fail with this errno.
        pub fail_spawns: Option<i32>,
        /// The slots' queue lengths the watch reads (None: the real sockets').
        pub queues: Option<Vec<Option<u32>>>,
        /// The state of a worker's processes by worker pid (stopped, running, CPU); a pid not
        /// here runs and uses no CPU.
        pub procs: std::collections::HashMap<i32, (bool, bool, Option<u64>)>,
        /// The connections each worker holds, by pid (`--steer least-loaded`; none: 0).
        pub held: std::collections::HashMap<i32, u32>,
        /// The programs attached now, by listener (what `steer` last did).
        pub programs: std::collections::HashMap<RawFd, Vec<libc::sock_filter>>,
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

        fn steer(&mut self, member: RawFd, program: Option<&[libc::sock_filter]>) -> io::Result<()> {
            self.calls.push(Call::Steer(member, program.map(|p| p.len())));
            match program {
                Some(p) => self.programs.insert(member, p.to_vec()),
                None => self.programs.remove(&member),
            };
            Ok(())
        }

        fn queues(&self, reader: Option<&mut Queues>, layout: Vec<Vec<RawFd>>) -> Vec<Option<u32>> {
            match &self.queues {
                Some(q) => (0..layout.len()).map(|s| q.get(s).copied().flatten()).collect(),
                None => real_queues(reader, layout),
            }
        }

        fn queue_len(&self, listener: RawFd) -> io::Result<u32> {
            sys::queue_len(listener)
        }

        fn members(&self, pids: &[i32]) -> Vec<Vec<i32>> {
            pids.iter().map(|p| vec![*p]).collect()
        }

        fn proc_state(&self, pids: &[i32]) -> (bool, bool, Option<u64>) {
            pids.iter().find_map(|p| self.procs.get(p).copied()).unwrap_or((false, true, Some(0)))
        }

        fn open_sockets(&self, pid: i32) -> Option<u32> {
            Some(self.held.get(&pid).copied().unwrap_or(0))
        }
    }
}
