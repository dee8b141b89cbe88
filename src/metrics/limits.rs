//! What the `--metrics` server allows each connection ([`Limits`]) and what it counts about
//! the connections it closed ([`Stats`], shown on `/metrics`). The rules that use them are
//! [`super::server`]'s.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The deadlines and the cap of the `--metrics` server.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections open at once (lowered to half the fd limit when that is less).
    pub max_connections: usize,
    /// How long a connection may stay open without sending a byte.
    pub idle: Duration,
    /// How long a request may take to arrive, from its first byte.
    pub request: Duration,
    /// How long a client may take to read its answer.
    pub write: Duration,
    /// How long an answered connection stays open waiting for the client to close it.
    pub linger: Duration,
    /// How long a scrape waits for its page before it gets a 503.
    pub render: Duration,
}

impl Limits {
    pub const DEFAULT: Limits = Limits {
        max_connections: 1024,
        idle: Duration::from_secs(10),
        request: Duration::from_secs(2),
        write: Duration::from_secs(10),
        linger: Duration::from_secs(2),
        render: Duration::from_secs(10),
    };
}

/// Why the server closed a connection: the `reason` label of
/// `reuse_launch_metrics_closed_total`, in [`Closed`]'s order.
pub const CLOSE_REASONS: [&str; 5] = ["timeout", "evicted", "refused", "invalid", "write_timeout"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// No complete request in time (408), or nothing at all within the idle time.
    Timeout = 0,
    /// Closed at the cap, the one waiting for its request the longest (503).
    Evicted,
    /// Not taken at the cap: every open connection was being answered (503).
    Refused,
    /// Malformed or oversized (400, 405, 414, 431).
    Invalid,
    /// Did not read its answer in time.
    WriteTimeout,
}

/// What the server counts (atomics written by its loop, read by a render).
#[derive(Debug, Default)]
pub struct Stats {
    open: AtomicU64,
    max: AtomicU64,
    closed: [AtomicU64; CLOSE_REASONS.len()],
}

/// A reading of [`Stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub open: u64,
    pub max: u64,
    /// By [`CLOSE_REASONS`].
    pub closed: [u64; CLOSE_REASONS.len()],
}

impl Stats {
    pub fn counts(&self) -> Counts {
        Counts {
            open: self.open.load(Ordering::Relaxed),
            max: self.max.load(Ordering::Relaxed),
            closed: std::array::from_fn(|i| self.closed[i].load(Ordering::Relaxed)),
        }
    }

    pub fn set_open(&self, n: usize) {
        self.open.store(n as u64, Ordering::Relaxed);
    }

    pub fn set_max(&self, n: usize) {
        self.max.store(n as u64, Ordering::Relaxed);
    }

    pub fn closed(&self, why: Closed) {
        self.closed[why as usize].fetch_add(1, Ordering::Relaxed);
    }
}
