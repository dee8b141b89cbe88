//! `--steer least-loaded`: how loaded each slot's worker is, from the outside, at each sample of
//! the stall watch (every 20 ms).
//!
//! A slot's *load* is the connections waiting in its accept queue (`TCP_INFO` on the listener the
//! launcher holds) plus the connections its worker holds: the worker's open fds (the entries of
//! `/proc/PID/fd`, one `getdents`, no `readlink` of each) above its *floor*, the fewest it had
//! over the last 5 to 10 s (two 5 s windows). The floor absorbs what a worker keeps open for
//! good (listeners, pipes, eventfds and files its runtime opens lazily, pooled database
//! connections, idle keep-alive connections), so what is left is the transient backlog. The
//! second term matters for servers that accept eagerly whenever their event loop runs (Node,
//! anything that accepts in a loop): their accept queue is empty most of the time while they
//! hold a backlog of accepted requests in user space. It is a least-connections count, as
//! nginx's `least_conn` keeps for its upstreams. Only the worker's main process is counted (a
//! pre-fork server whose children accept is seen by its queue only).
//!
//! Weights fall with the square of the load ([`weight`]): a slot twice as loaded gets about a
//! quarter of the share, never none, so a burst between two samples is spread by weights
//! instead of herding onto the one slot that looked idle.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// A worker's floor: the fewest open fds in the current window and in the one before.
#[derive(Debug, Clone, Copy)]
struct Floor {
    since: Instant,
    current: u32,
    previous: u32,
}

/// Each worker's fd floor, by pid.
#[derive(Debug, Default)]
pub struct Held {
    floors: HashMap<i32, Floor>,
}

impl Held {
    /// Length of one window of the floor.
    pub const WINDOW: Duration = Duration::from_secs(5);

    /// Connections worker `pid` holds at `now`: its open fds above its floor (the caller samples
    /// only ready workers). None when /proc cannot be read (the caller counts the queue only).
    pub fn sample(&mut self, pid: i32, now: Instant) -> Option<u32> {
        let fds = open_fds(pid)?;
        let f = self.floors.entry(pid).or_insert(Floor { since: now, current: fds, previous: fds });
        if now.duration_since(f.since) >= Self::WINDOW {
            *f = Floor { since: now, current: fds, previous: f.current };
        }
        f.current = f.current.min(fds);
        Some(fds - f.current.min(f.previous))
    }

    /// Forget workers that are gone.
    pub fn retain(&mut self, live: &[i32]) {
        self.floors.retain(|pid, _| live.contains(pid));
    }
}

/// Number of open fds of process `pid` (entries of /proc/PID/fd).
pub fn open_fds(pid: i32) -> Option<u32> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    Some(dir.count() as u32)
}

/// A slot's weight from its load (None: unknown, counted as 0): 2^20 / (1 + load)^2.
pub fn weight(load: Option<u32>) -> u32 {
    let l = u64::from(load.unwrap_or(0).min(1023)) + 1;
    ((1u64 << 20) / (l * l)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_fall_with_the_square_of_the_load_and_never_reach_zero() {
        assert_eq!(weight(None), 1 << 20);
        assert_eq!(weight(Some(0)), 1 << 20);
        assert_eq!(weight(Some(1)), 1 << 18);
        assert_eq!(weight(Some(3)), 1 << 16);
        assert!(weight(Some(u32::MAX)) >= 1);
    }

    #[test]
    fn held_connections_are_fds_above_the_floor_of_the_last_windows() {
        let me = std::process::id() as i32;
        let t0 = Instant::now();
        let mut held = Held::default();
        // Other tests open and close fds meanwhile: compare with margins.
        let base = open_fds(me).unwrap();
        held.sample(me, t0).unwrap();
        let files: Vec<std::fs::File> = (0..40).map(|_| std::fs::File::open("/proc/self/stat").unwrap()).collect();
        assert!(held.sample(me, t0 + Held::WINDOW / 2).unwrap() >= 30);
        // Kept open for two windows: they become the floor.
        held.sample(me, t0 + Held::WINDOW);
        held.sample(me, t0 + Held::WINDOW * 2);
        assert!(held.sample(me, t0 + Held::WINDOW * 2).unwrap() < 20, "floor was {base}");
        drop(files);
        assert_eq!(held.sample(i32::MAX, t0), None);
        held.retain(&[]);
        assert!(held.floors.is_empty());
    }
}
