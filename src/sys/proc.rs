//! What /proc says of a process: its state and CPU ticks (/proc/PID/stat) and its resident
//! memory (/proc/PID/statm), with the page size and clock tick that give them units.

use std::collections::HashMap;

use nix::unistd::{sysconf, SysconfVar};

/// The fields of /proc/PID/stat the launcher reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    /// `R`, `S`, `T`, `Z`...
    pub state: char,
    /// User and system CPU time, in clock ticks.
    pub utime: u64,
    pub stime: u64,
    /// User and system CPU time of the children it reaped, in clock ticks.
    pub cutime: u64,
    pub cstime: u64,
}

/// /proc/PID/stat of `pid`; None if it is gone (or /proc is not mounted).
pub fn stat(pid: i32) -> Option<Stat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Parse the text of /proc/PID/stat: after "pid (comm)", state is field 0 and utime, stime,
/// cutime, cstime fields 11 to 14 (cutime and cstime are signed; a negative one counts 0).
fn parse_stat(text: &str) -> Option<Stat> {
    let (_, rest) = text.rsplit_once(')')?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let state = f.first()?.chars().next()?;
    let signed = |i: usize| f.get(i).and_then(|t| t.parse::<i64>().ok()).map_or(0, |t| t.max(0) as u64);
    Some(Stat {
        state,
        utime: f.get(11)?.parse().ok()?,
        stime: f.get(12)?.parse().ok()?,
        cutime: signed(13),
        cstime: signed(14),
    })
}

/// utime + stime of one process, in clock ticks.
pub fn cpu_ticks(pid: i32) -> Option<u64> {
    stat(pid).map(|s| s.utime + s.stime)
}

/// utime + stime of every process in `groups`, by pid (processes that are gone are left out).
pub fn read_ticks(groups: &[Vec<i32>]) -> HashMap<i32, u64> {
    groups.iter().flatten().filter_map(|pid| Some((*pid, cpu_ticks(*pid)?))).collect()
}

/// Resident pages of one process (/proc/PID/statm, second field).
pub fn resident_pages(pid: i32) -> Option<u64> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    statm.split_whitespace().nth(1)?.parse().ok()
}

/// Resident memory of processes `pids` in bytes (unreadable ones count 0).
pub fn group_rss(pids: &[i32]) -> u64 {
    let page = page_size();
    pids.iter().filter_map(|pid| resident_pages(*pid)).map(|pages| pages * page).sum()
}

/// Clock ticks per second (the unit of [`Stat`]'s times).
pub fn clock_ticks_per_second() -> f64 {
    sysconf(SysconfVar::CLK_TCK).ok().flatten().filter(|n| *n > 0).unwrap_or(100) as f64
}

/// The page size in bytes (the unit of statm).
pub fn page_size() -> u64 {
    sysconf(SysconfVar::PAGE_SIZE).ok().flatten().filter(|n| *n > 0).unwrap_or(4096) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stat_line_with_a_tricky_command_name() {
        let line = "42 (a) b (c) R 1 42 42 0 -1 4194560 100 0 0 0 7 3 -1 5 20 0 1 0 123 0 0";
        let s = parse_stat(line).unwrap();
        assert_eq!(s, Stat { state: 'R', utime: 7, stime: 3, cutime: 0, cstime: 5 });
        assert_eq!(parse_stat("42 (x"), None);
        assert_eq!(parse_stat("42 (x) S 1 2"), None);
    }

    #[test]
    fn this_process_is_measured() {
        let me = std::process::id() as i32;
        assert!(stat(me).is_some_and(|s| "RS".contains(s.state)));
        assert!(cpu_ticks(me).is_some());
        assert_eq!(read_ticks(&[vec![me, i32::MAX]]).keys().copied().collect::<Vec<_>>(), vec![me]);
        assert!(resident_pages(me).unwrap() > 0);
        assert!(group_rss(&[me, me]) > resident_pages(me).unwrap() * page_size());
        assert_eq!(group_rss(&[i32::MAX]), 0);
        assert!(page_size() >= 4096 && clock_ticks_per_second() > 0.0);
    }
}
