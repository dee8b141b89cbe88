//! What `status` measures itself, in the control thread and never in the supervisor loop: each
//! worker's process group's CPU use and resident memory (from /proc), and each slot's accept
//! queue (TCP_INFO on the listeners the launcher holds).
//!
//! One status request scans /proc once for the members of every worker's group. CPU % is the
//! group's utime + stime over a window: since the previous status request when that was
//! between [`MIN_WINDOW`] and [`MAX_WINDOW`] ago, else over a fresh [`MIN_WINDOW`] (the request
//! then waits that long).

use std::collections::HashMap;
use std::os::fd::RawFd;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::readiness::groups_members;
use crate::sys::{self, clock_ticks_per_second, page_size, read_ticks, resident_pages};

pub const MIN_WINDOW: Duration = Duration::from_millis(200);
pub const MAX_WINDOW: Duration = Duration::from_secs(10);

/// One worker's process group, measured.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    /// Percent of one CPU (above 100 for a group busy on several CPUs), as `top` shows it.
    pub cpu_percent: Option<f64>,
    pub rss_bytes: Option<u64>,
}

/// CPU ticks of processes at one moment, kept between requests.
#[derive(Default)]
pub struct CpuHistory {
    last: Mutex<Option<(Instant, HashMap<i32, u64>)>>,
}

impl CpuHistory {
    /// Measure the groups led by `pgids` (worker pids); one [`Usage`] per pgid, in order.
    pub fn measure(&self, pgids: &[i32]) -> Vec<Usage> {
        let members = groups_members(pgids);
        let (mut at, mut ticks) = (Instant::now(), read_ticks(&members));
        // Not held while sleeping: concurrent requests each measure their own window.
        let previous = self.last.lock().unwrap_or_else(|e| e.into_inner()).take();
        let before = match previous {
            Some((t, prev)) if (MIN_WINDOW..=MAX_WINDOW).contains(&at.saturating_duration_since(t)) => (t, prev),
            _ => {
                std::thread::sleep(MIN_WINDOW);
                let before = (at, ticks);
                at = Instant::now();
                ticks = read_ticks(&members);
                before
            }
        };
        let window = at.saturating_duration_since(before.0).as_secs_f64();
        let hz = clock_ticks_per_second();
        let page = page_size();
        let usage = members
            .iter()
            .map(|group| {
                let used: u64 = group
                    .iter()
                    .filter_map(|pid| Some(ticks.get(pid)?.saturating_sub(*before.1.get(pid).unwrap_or(&0))))
                    .sum();
                let seen = group.iter().any(|pid| ticks.contains_key(pid));
                let cpu = (seen && window > 0.0).then(|| round1(used as f64 / hz / window * 100.0));
                let pages: Vec<u64> = group.iter().filter_map(|pid| resident_pages(*pid)).collect();
                let rss = (!pages.is_empty()).then(|| pages.iter().sum::<u64>() * page);
                Usage { cpu_percent: cpu, rss_bytes: rss }
            })
            .collect();
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some((at, ticks));
        usage
    }
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// A slot's accept queue: connections waiting now and the backlog, summed over its listeners
/// (one per bind). None when it has none (self mode) or none could be read.
pub fn queue(listeners: &[RawFd]) -> Option<(u32, u32)> {
    let each: Vec<(u32, u32)> = listeners.iter().filter_map(|fd| sys::listener_queue(*fd)).collect();
    (!each.is_empty()).then(|| each.iter().fold((0, 0), |(n, m), (a, b)| (n + a, m + b)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn the_queue_and_backlog_of_a_real_listener() {
        let l = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        l.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into()).unwrap();
        l.listen(7).unwrap();
        let addr = l.local_addr().unwrap().as_socket().unwrap();
        let _c: Vec<_> = (0..2).map(|_| std::net::TcpStream::connect(addr).unwrap()).collect();
        assert_eq!(queue(&[l.as_raw_fd()]), Some((2, 7)));
        assert_eq!(queue(&[]), None);
    }

    #[test]
    fn a_busy_group_uses_memory_and_cpu() {
        use std::os::unix::process::CommandExt;
        let ticks_of = |pid: i32| read_ticks(&[vec![pid]]).get(&pid).copied();
        let mut child =
            std::process::Command::new("sh").args(["-c", "while :; do :; done"]).process_group(0).spawn().unwrap();
        let pid = child.id() as i32;
        // Spinning already (its first tick), so that the window measures the loop, not the exec.
        let deadline = Instant::now() + Duration::from_secs(10);
        while ticks_of(pid).unwrap_or(0) == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let h = CpuHistory::default();
        let (t0, ticks0) = (Instant::now(), ticks_of(pid).unwrap());
        let u = h.measure(&[pid]);
        let (t1, ticks1) = (Instant::now(), ticks_of(pid).unwrap());
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(u.len(), 1);
        assert!(u[0].rss_bytes.unwrap() > 100 << 10, "{u:?}");
        // What the shell really got around the measurement (all of a core on an idle machine,
        // less on a busy one): the measured window, inside that time, must agree with it.
        let got = (ticks1 - ticks0) as f64 / clock_ticks_per_second() / (t1 - t0).as_secs_f64() * 100.0;
        let cpu = u[0].cpu_percent.unwrap();
        assert!(cpu <= 110.0 && cpu >= got * 0.5 - 10.0 && cpu <= got * 1.5 + 10.0, "{u:?}, the shell got {got:.1}%");
    }
}
