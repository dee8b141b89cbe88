//! `--steer least-loaded`: how loaded each slot's worker is, from the outside, at each sample of
//! the stall watch (every 20 ms).
//!
//! A slot's *load* is the connections waiting in its accept queue (`TCP_INFO` on the listener the
//! launcher holds) plus the connections its worker holds *more than the least of them*: each
//! worker's open sockets (the entries of `/proc/PID/fd` that link to `socket:[...]`; files,
//! pipes and eventfds a runtime opens lazily are not counted) minus the fewest any ready worker
//! holds at that sample ([`relative`]). Workers of one program keep the same sockets open for
//! good (listeners, pooled database connections), so the difference is the backlog; only
//! differences matter to the weights anyway. (A per-worker floor, the fewest it held over a few
//! seconds, was tried first: a worker loaded from its first sample had its floor at its load
//! and looked idle, and got more connections than a fast one.) The
//! second term matters for servers that accept eagerly whenever their event loop runs (Node,
//! anything that accepts in a loop): their accept queue is empty most of the time while they
//! hold a backlog of accepted requests in user space. It is a least-connections count, as
//! nginx's `least_conn` keeps for its upstreams. Only the worker's main process is counted (a
//! pre-fork server whose children accept is seen by its queue only).
//!
//! Weights fall with the square of the load ([`weight`]): a slot twice as loaded gets about a
//! quarter of the share, never none, so a burst between two samples is spread by weights
//! instead of herding onto the one slot that looked idle.

/// Each worker's sockets above the fewest any of them holds (None where unread).
pub fn relative(counts: &[Option<u32>]) -> Vec<Option<u32>> {
    let base = counts.iter().flatten().min().copied().unwrap_or(0);
    counts.iter().map(|c| c.map(|c| c - base)).collect()
}

/// Number of open sockets of process `pid` (entries of /proc/PID/fd linking to `socket:[...]`).
pub fn open_sockets(pid: i32) -> Option<u32> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    let sockets = dir
        .flatten()
        .filter(|e| {
            std::fs::read_link(e.path()).is_ok_and(|l| l.as_os_str().as_encoded_bytes().starts_with(b"socket:"))
        })
        .count();
    Some(sockets as u32)
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
    fn held_is_relative_to_the_least_held() {
        assert_eq!(relative(&[Some(9), Some(3), None, Some(4)]), vec![Some(6), Some(0), None, Some(1)]);
        assert_eq!(relative(&[None, None]), vec![None, None]);
    }

    #[test]
    fn sockets_are_counted_files_are_not() {
        let me = std::process::id() as i32;
        let before = open_sockets(me).unwrap();
        let files: Vec<std::fs::File> = (0..20).map(|_| std::fs::File::open("/proc/self/stat").unwrap()).collect();
        let sockets: Vec<std::net::UdpSocket> =
            (0..20).map(|_| std::net::UdpSocket::bind("127.0.0.1:0").unwrap()).collect();
        // Other tests of this process open and close sockets meanwhile: a margin.
        let now = open_sockets(me).unwrap();
        assert!(now >= before + 15 && now < before + 40, "{before} -> {now}");
        drop((files, sockets));
        assert_eq!(open_sockets(i32::MAX), None);
    }
}
