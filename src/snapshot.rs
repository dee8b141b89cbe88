//! What the launcher is doing, as the supervisor loop sees it at one moment: the answer to a
//! control socket's `status` (and what `--metrics` will publish). Built by the loop from its
//! own tables only; anything that costs a /proc read or a syscall per worker (CPU, RSS, queue
//! lengths) is left to the reader, which has the pids and the listener fds to do it off the
//! loop.

use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::time::Duration;

/// The launcher as a whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub pid: u32,
    /// `reuseport`, `shared`, `round-robin` or `self`.
    pub mode: String,
    pub binds: Vec<SocketAddr>,
    /// The highest generation any slot runs.
    pub generation: u64,
    /// How many slots the launcher keeps (after `scale`, TTIN, TTOU).
    pub desired: usize,
    /// Workers that own their slot and are ready.
    pub ready: usize,
    /// A roll under way: its generation, slots done, slots in all.
    pub roll: Option<(u64, usize, usize)>,
    /// A graceful or immediate stop is under way.
    pub stopping: bool,
    pub slots: Vec<SlotSnapshot>,
}

/// One slot: its workers (usually one; two during a roll or a memory replacement), its history,
/// and the listeners whose queues belong to it (empty in `self` mode; in `shared` mode every
/// slot names the one shared socket).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotSnapshot {
    pub slot: usize,
    pub generation: u64,
    pub workers: Vec<WorkerSnapshot>,
    /// Workers of this slot that were replaced other than by a roll, by cause (`crash`,
    /// `ready-timeout`, `watchdog`, `memory`, `hung`).
    pub restarts: Vec<(&'static str, u64)>,
    /// How its last worker ended (`exited with status 1`, `killed by SIGKILL`), if one did.
    pub last_exit: Option<String>,
    /// No worker runs; the next one starts after this long (`backoff`).
    pub backoff: Option<Duration>,
    /// Being removed by a scale-down: no new connections, its worker stopping, its socket
    /// closed once its queue is empty.
    pub retiring: bool,
    pub listeners: Vec<RawFd>,
}

impl SlotSnapshot {
    pub fn restarts_total(&self) -> u64 {
        self.restarts.iter().map(|r| r.1).sum()
    }
}

/// One worker process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerSnapshot {
    pub pid: i32,
    pub generation: u64,
    /// `starting`, `ready`, `draining` or `stalled` (a slot without a worker is `backoff`).
    pub state: &'static str,
    pub uptime: Duration,
}
