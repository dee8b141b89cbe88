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
    /// With `-n MIN..MAX`: the bounds, the decisions, what the policy sees now.
    pub autoscale: Option<AutoscaleSnapshot>,
    /// `--intercept-bind`.
    pub intercept: InterceptSnapshot,
}

/// Workers' own binds taken over (`--intercept-bind`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InterceptSnapshot {
    /// `on`, `off`, `off (self mode: ...)` or `unavailable: CAUSE`.
    pub state: String,
    /// Binds of a --bind port that got the slot's socket, since start.
    pub binds: u64,
    /// listen() calls on a launcher's socket answered without reaching the kernel.
    pub listens: u64,
}

/// The automatic scaling (`-n MIN..MAX`, see `autoscale`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AutoscaleSnapshot {
    pub min: usize,
    pub max: usize,
    /// The calm a scale-down needs now (`--scale-down-after`, doubled after flaps).
    pub calm: Duration,
    /// The last changes of the slot count, automatic or asked for, oldest first.
    pub decisions: Vec<ScaleRecord>,
    /// Automatic scale-ups and scale-downs so far.
    pub ups: u64,
    pub downs: u64,
    /// The window of the last 2 s: its samples, the share of them pressed (%), the connections
    /// waiting in all (mean, hundredths), the largest share in which one slot had a queue (%),
    /// the workers' CPU in all (thousandths of a core).
    pub samples: usize,
    pub pressed_pct: u32,
    pub waiting_centi: u32,
    pub queued_pct: u32,
    pub cpu_milli: u32,
}

/// One change of the slot count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScaleRecord {
    pub ago: Duration,
    pub from: usize,
    pub to: usize,
    /// `auto`, or who asked (`TTIN`, `TTOU`, `control`).
    pub by: String,
    pub reason: String,
    /// When, in ms since the Unix epoch (for `/metrics`).
    pub unix_ms: u64,
}

impl ScaleRecord {
    /// `up` or `down`.
    pub fn direction(&self) -> &'static str {
        if self.to > self.from {
            "up"
        } else {
            "down"
        }
    }

    /// `scaled up to 3: at least one connection waiting per slot for 2s`.
    pub fn text(&self) -> String {
        format!("scaled {} to {}: {}", self.direction(), self.to, self.reason)
    }
}

impl AutoscaleSnapshot {
    /// The last automatic decision.
    pub fn last(&self) -> Option<&ScaleRecord> {
        self.decisions.iter().rev().find(|d| d.by == "auto")
    }
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
