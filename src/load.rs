//! `--steer least-loaded`: how loaded each slot's worker is, from the outside, at each sample of
//! the stall watch (every 20 ms).
//!
//! A slot's *load* is the connections waiting in its accept queue (`TCP_INFO` on the listener the
//! launcher holds) plus the connections its worker holds: the worker's open file descriptors
//! (`/proc/PID/fd`) above the fewest it has had since it started. The second term matters for
//! servers that accept eagerly (Node, anything on libuv or an event loop that accepts in a loop):
//! their accept queue is empty most of the time while they hold a backlog of accepted requests
//! in user space. It is a least-connections count, as nginx's `least_conn` keeps for its
//! upstreams. Only the worker's main process is counted (a pre-fork server whose children
//! accept is seen by its queue only).
//!
//! Weights fall with the square of the load ([`weight`]): a slot twice as loaded gets about a
//! quarter of the share, never none, so a burst between two samples is spread by weights
//! instead of herding onto the one slot that looked idle.

use std::collections::HashMap;

/// The fewest open fds seen per worker pid (its baseline: listeners, epoll, pipes, logs).
#[derive(Debug, Default)]
pub struct Held {
    base: HashMap<i32, u32>,
}

impl Held {
    /// Connections worker `pid` holds now: its open fds above the fewest seen. None when
    /// /proc cannot be read (the caller counts the queue only).
    pub fn sample(&mut self, pid: i32) -> Option<u32> {
        let now = open_fds(pid)?;
        let base = self.base.entry(pid).or_insert(now);
        *base = (*base).min(now);
        Some(now - *base)
    }

    /// Forget workers that are gone.
    pub fn retain(&mut self, live: &[i32]) {
        self.base.retain(|pid, _| live.contains(pid));
    }
}

/// Number of open file descriptors of process `pid` (entries of /proc/PID/fd).
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
    fn held_connections_are_fds_above_the_fewest_seen() {
        let me = std::process::id() as i32;
        let mut held = Held::default();
        assert_eq!(held.sample(me), Some(0));
        let files: Vec<std::fs::File> = (0..3).map(|_| std::fs::File::open("/proc/self/stat").unwrap()).collect();
        assert!(held.sample(me).unwrap() >= 3);
        drop(files);
        assert_eq!(held.sample(i32::MAX), None);
        held.retain(&[]);
        assert!(held.base.is_empty());
    }
}
