//! The sentinel's view of the launcher's descendants in /proc (see `sentinel`): the
//! incremental [`Scanner`] it runs every scan without a cgroup, the one-shot [`descendants`]
//! scan it runs while it ends them, and the readings of /proc/PID/stat both need (parent,
//! process group, start time against pid reuse, zombie or not).
//!
//! The incremental scan lists /proc (a few `getdents` calls) and reads the `stat` of an entry
//! only when it is new: a pid not seen before, or one whose directory entry has another inode
//! (a new process gets a new /proc inode; an entry the kernel dropped from its cache and made
//! again is simply read again). Whether a process is below the launcher is decided once: a
//! process outside the tree never enters it (orphans are re-parented to an ancestor subreaper
//! or init, and the launcher is the subreaper of its own tree), and one inside never leaves it
//! while the launcher lives. Its cost follows the processes that start on the machine, plus the
//! listing itself (about 1 ms per 1,000 processes here), not the number of workers.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::DirEntryExt;

/// The incremental scan: what each /proc entry was when first read (by the inode of its
/// directory entry, which a new process gets anew), and whether it is below the launcher.
#[derive(Default)]
pub struct Scanner {
    seen: HashMap<i32, Seen>,
}

struct Seen {
    ino: u64,
    ppid: i32,
    start: u64,
    /// Below the launcher (None: not decided yet). Once below, always: an orphan in the tree
    /// is re-parented to the launcher (a subreaper), never out of it.
    ours: Option<bool>,
}

impl Scanner {
    /// List /proc; read only new entries; note (pid -> start) every process below `launcher`,
    /// and forget noted ones that are gone.
    pub fn scan(&mut self, launcher: i32, me: i32, noted: &mut HashMap<i32, u64>) {
        let Ok(dir) = std::fs::read_dir("/proc") else { return };
        let listed: HashMap<i32, u64> =
            dir.flatten().filter_map(|e| Some((e.file_name().to_str()?.parse::<i32>().ok()?, e.ino()))).collect();
        self.seen.retain(|pid, s| listed.get(pid) == Some(&s.ino));
        for (&pid, &ino) in &listed {
            if let std::collections::hash_map::Entry::Vacant(e) = self.seen.entry(pid) {
                if let Some((ppid, _, start)) = stat(pid) {
                    e.insert(Seen { ino, ppid, start, ours: None });
                }
            }
        }
        let undecided: Vec<i32> = self.seen.iter().filter(|(_, s)| s.ours.is_none()).map(|(p, _)| *p).collect();
        for pid in undecided {
            self.decide(pid, launcher, me, 0);
        }
        for (pid, s) in &self.seen {
            if s.ours == Some(true) {
                noted.insert(*pid, s.start);
            }
        }
        noted.retain(|pid, start| self.seen.get(pid).is_some_and(|s| s.start == *start));
    }

    fn decide(&mut self, pid: i32, launcher: i32, me: i32, depth: u32) -> bool {
        let Some(s) = self.seen.get(&pid) else { return false };
        if let Some(ours) = s.ours {
            return ours;
        }
        let ppid = s.ppid;
        let ours = pid != launcher
            && pid != me
            && (ppid == launcher
                || (ppid > 1 && ppid != me && depth < 64 && self.decide(ppid, launcher, me, depth + 1)));
        if let Some(s) = self.seen.get_mut(&pid) {
            s.ours = Some(ours);
        }
        ours
    }
}

/// Every process below any of `roots` (not the roots themselves, nor `except`), with its
/// start time, from one scan of /proc.
pub fn descendants(roots: &HashSet<i32>, except: i32) -> Vec<(i32, u64)> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    let mut parent: HashMap<i32, (i32, u64)> = HashMap::new();
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        if let Some((ppid, start)) = stat(pid).map(|s| (s.0, s.2)) {
            parent.insert(pid, (ppid, start));
        }
    }
    let mut out = Vec::new();
    for (&pid, &(_, start)) in &parent {
        if roots.contains(&pid) || pid == except {
            continue;
        }
        let mut p = pid;
        for _ in 0..64 {
            match parent.get(&p) {
                Some(&(pp, _)) if roots.contains(&pp) => {
                    out.push((pid, start));
                    break;
                }
                Some(&(pp, _)) if pp > 1 && pp != except => p = pp,
                _ => break,
            }
        }
    }
    out
}

/// (ppid, pgid, start time) from /proc/PID/stat.
fn stat(pid: i32) -> Option<(i32, i32, u64)> {
    stat_and_state(pid).map(|s| s.0)
}

fn stat_and_state(pid: i32) -> Option<((i32, i32, u64), bool)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let f: Vec<&str> = text.rsplit_once(')')?.1.split_whitespace().collect();
    let zombie = matches!(f.first(), Some(&"Z") | Some(&"X"));
    Some(((f.get(1)?.parse().ok()?, f.get(2)?.parse().ok()?, f.get(19)?.parse().ok()?), zombie))
}

/// The start time of `pid` if it runs (not a zombie).
pub fn running(pid: i32) -> Option<u64> {
    stat_and_state(pid).filter(|s| !s.1).map(|s| s.0 .2)
}

pub fn pgid(pid: i32) -> Option<i32> {
    stat(pid).map(|s| s.1)
}
