//! Containing each worker's whole tree in a cgroup v2 of its own, where the launcher may
//! create cgroups (`--containment`, default `auto`).
//!
//! Layout: the launcher's own cgroup (its `0::` line of /proc/self/cgroup, under the cgroup2
//! mount) gets one child, `reuse-launch.<pid>.<random>` (the [`Containment`]'s root), and each worker
//! one below that, `w<id>` (its worker id, never reused). The child process of a spawn writes
//! `"0"` into its own cgroup's `cgroup.procs` before exec (`spawn`, step 1): membership follows
//! fork, so everything a worker ever starts is in its cgroup, detached or not.
//! - A worker's exit: its process group is killed, as without a cgroup (a child it put in a
//!   session of its own may outlive it, as before); its directory is removed once empty
//!   (retried at later reaps).
//! - The launcher's end: in order, the same for the root; SIGKILLed, the sentinel (which runs
//!   outside the root) writes the root's `cgroup.kill` when the launcher's pipe closes, with
//!   no scan of /proc at all (see `sentinel`).
//! - A worker's processes are read from its `cgroup.procs` ([`procs_of`]) instead of a scan
//!   of /proc for its process group (readiness, stall watch, memory, status, metrics).
//!
//! Needs: the cgroup v2 hierarchy mounted (unified or hybrid), the launcher's cgroup writable
//! (root; systemd `Delegate=yes`; a container with its own cgroup namespace and a writable
//! mount) and `cgroup.kill` (Linux 5.14). Without any of these, `auto` falls back to the
//! sentinel alone (the reason is logged); `--containment cgroup` is then an error (exit 1).
//! No controller is enabled: the cgroups only group processes (CPU and memory limits stay the
//! operator's), so the no-internal-processes rule never applies and the launcher stays in its
//! own cgroup. A worker that moves itself to another cgroup (it needs write access to that
//! cgroup's `cgroup.procs`, root usually) leaves this containment.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// `--containment`: what the operator asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    Auto,
    Cgroup,
    Sentinel,
}

impl Want {
    pub fn parse(text: &str) -> Result<Want, String> {
        match text {
            "auto" => Ok(Want::Auto),
            "cgroup" => Ok(Want::Cgroup),
            "sentinel" => Ok(Want::Sentinel),
            _ => Err("expected 'auto', 'cgroup' or 'sentinel'".into()),
        }
    }
}

/// Worker pid -> its cgroup directory, for [`procs_of`] (read from any thread).
static WORKERS: Mutex<Option<HashMap<i32, PathBuf>>> = Mutex::new(None);
/// The root in use, for `status` ([`in_use`]).
static ROOT: Mutex<Option<PathBuf>> = Mutex::new(None);

/// The containment in use, for `status` and its `containment` field: `("cgroup", Some(root))`
/// or `("sentinel", None)`.
pub fn in_use() -> (&'static str, Option<PathBuf>) {
    match ROOT.lock().unwrap_or_else(|e| e.into_inner()).clone() {
        Some(root) => ("cgroup", Some(root)),
        None => ("sentinel", None),
    }
}

/// The processes of the worker whose main process is `pid`, from its cgroup (None: it has no
/// cgroup, or the file cannot be read; then the caller scans /proc for its process group).
pub fn procs_of(pid: i32) -> Option<Vec<i32>> {
    let dir = WORKERS.lock().unwrap_or_else(|e| e.into_inner()).as_ref()?.get(&pid)?.clone();
    read_procs(&dir).ok()
}

fn read_procs(dir: &Path) -> io::Result<Vec<i32>> {
    Ok(fs::read_to_string(dir.join("cgroup.procs"))?.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

/// How the launcher's workers are contained.
#[derive(Debug, Default)]
pub struct Containment {
    /// `<launcher's cgroup>/reuse-launch.<pid>.<random>`; None: the sentinel alone.
    root: Option<PathBuf>,
    /// Why there is no cgroup (for the log).
    why_not: Option<String>,
    /// Workers' cgroups to remove once empty.
    pending: Vec<PathBuf>,
}

impl Containment {
    /// Decide and set up, at a fresh start.
    pub fn set_up(want: Want) -> Result<Containment, String> {
        if want == Want::Sentinel {
            return Ok(Containment { why_not: Some("--containment sentinel".into()), ..Default::default() });
        }
        match launcher_cgroup().and_then(|dir| make_root(&dir)) {
            Ok(root) => Ok(Containment::using(root)),
            Err(why) if want == Want::Cgroup => Err(format!("--containment cgroup: {why}")),
            Err(why) => Ok(Containment { why_not: Some(why), ..Default::default() }),
        }
    }

    /// After a reexec: the root the old image made (as its sentinel was told, see
    /// [`sentinel_root`]), if it made one and it is still there.
    pub fn adopt(root: Option<PathBuf>) -> Containment {
        match root.filter(|r| r.is_dir()) {
            Some(root) => Containment::using(root),
            None => {
                Containment { why_not: Some("the launcher before the reexec used none".into()), ..Default::default() }
            }
        }
    }

    fn using(root: PathBuf) -> Containment {
        *WORKERS.lock().unwrap_or_else(|e| e.into_inner()) = Some(HashMap::new());
        *ROOT.lock().unwrap_or_else(|e| e.into_inner()) = Some(root.clone());
        Containment { root: Some(root), ..Default::default() }
    }

    pub fn root(&self) -> Option<&Path> {
        self.root.as_deref()
    }

    /// The start-up log line.
    pub fn describe(&self) -> String {
        match (&self.root, &self.why_not) {
            (Some(root), _) => format!(
                "containment: cgroup {} (each worker's tree in a cgroup of its own, ended with cgroup.kill)",
                root.display()
            ),
            (None, Some(why)) => format!(
                "containment: sentinel (no cgroup: {why}); a process that leaves its worker's process group and session escapes until the sentinel's next scan"
            ),
            (None, None) => "containment: sentinel".into(),
        }
    }

    /// Make worker `id`'s cgroup; the `cgroup.procs` to give the child (None: no cgroup).
    pub fn prepare(&mut self, id: u64) -> io::Result<Option<OwnedFd>> {
        let Some(root) = &self.root else { return Ok(None) };
        let dir = root.join(format!("w{id}"));
        // The root too, if another launcher's start-up swept it while it was empty.
        if let Err(e) = fs::create_dir_all(&dir) {
            return Err(io::Error::new(e.kind(), format!("cannot make the worker's cgroup {}: {e}", dir.display())));
        }
        let procs = fs::OpenOptions::new().write(true).open(dir.join("cgroup.procs"))?;
        Ok(Some(procs.into()))
    }

    /// Worker `id` (main process `pid`) was started in its cgroup.
    pub fn started(&self, id: u64, pid: i32) {
        let Some(root) = &self.root else { return };
        if let Some(map) = WORKERS.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            map.insert(pid, root.join(format!("w{id}")));
        }
    }

    /// Worker `id` (main process `pid`) exited, or could not start: remove its cgroup, now or
    /// once empty. What is left in it is not killed: as without a cgroup, only the worker's
    /// process group is (by the caller); a child in a session of its own may outlive its
    /// worker (and write its last log lines) until the launcher ends.
    pub fn exited(&mut self, id: u64, pid: i32) {
        let Some(root) = &self.root else { return };
        if let Some(map) = WORKERS.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            map.remove(&pid);
        }
        let dir = root.join(format!("w{id}"));
        if !remove_tree(&dir) {
            self.pending.push(dir);
        }
        self.tidy();
    }

    /// Remove the workers' cgroups that have emptied since.
    pub fn tidy(&mut self) {
        self.pending.retain(|dir| !remove_tree(dir));
    }

    /// The launcher stops in order (its workers have exited): end whatever is left in the
    /// root and remove it.
    pub fn finish(&mut self) {
        if let Some(root) = self.root.take() {
            end(&root, Duration::from_secs(1));
            *ROOT.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
    }
}

/// Write `cgroup.kill` of `dir` (it and every cgroup below: SIGKILL to all their processes).
pub fn kill(dir: &Path) -> io::Result<()> {
    fs::OpenOptions::new().write(true).open(dir.join("cgroup.kill"))?.write_all(b"1")
}

/// Kill everything in `root`, wait (at most `wait`) until it is empty, remove it and the
/// cgroups below. Returns how many processes were in it.
pub fn end(root: &Path, wait: Duration) -> usize {
    let count = count(root);
    let _ = kill(root);
    let deadline = Instant::now() + wait;
    while populated(root) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    remove_tree(root);
    count
}

/// Remove `dir` and the cgroups below it, deepest first (a worker may have made cgroups of its
/// own: a launcher run as a worker does). Populated ones stay (EBUSY). True if `dir` is gone.
pub fn remove_tree(dir: &Path) -> bool {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())) {
            remove_tree(&e.path());
        }
    }
    fs::remove_dir(dir).is_ok() || !dir.exists()
}

/// The processes in `root` and the cgroups below it.
pub fn count(root: &Path) -> usize {
    let mut n = read_procs(root).map_or(0, |p| p.len());
    if let Ok(dir) = fs::read_dir(root) {
        for e in dir.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())) {
            n += count(&e.path());
        }
    }
    n
}

/// `populated 1` in `cgroup.events`: a process lives in it or below.
fn populated(dir: &Path) -> bool {
    fs::read_to_string(dir.join("cgroup.events")).is_ok_and(|t| t.lines().any(|l| l.trim() == "populated 1"))
}

/// The launcher's own cgroup v2 directory.
fn launcher_cgroup() -> Result<PathBuf, String> {
    let own = fs::read_to_string("/proc/self/cgroup").map_err(|e| format!("cannot read /proc/self/cgroup: {e}"))?;
    let path = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or("no cgroup v2 hierarchy (no 0:: line in /proc/self/cgroup)")?;
    let mounts = fs::read_to_string("/proc/self/mountinfo").map_err(|e| format!("cannot read mountinfo: {e}"))?;
    let mount = mounts.lines().find_map(cgroup2_mount).ok_or("the cgroup v2 hierarchy is not mounted")?;
    let (mount_root, mount_point) = mount;
    // A mount of a subtree (a container's) shows cgroup paths below its own root.
    let rel = path.strip_prefix(mount_root.trim_end_matches('/')).unwrap_or(path).trim_start_matches('/');
    Ok(Path::new(&mount_point).join(rel))
}

/// (root, mount point) of a cgroup2 line of /proc/self/mountinfo.
fn cgroup2_mount(line: &str) -> Option<(String, String)> {
    let (left, right) = line.split_once(" - ")?;
    if right.split_whitespace().next()? != "cgroup2" {
        return None;
    }
    let f: Vec<&str> = left.split_whitespace().collect();
    Some((f.get(3)?.to_string(), f.get(4)?.replace("\\040", " ")))
}

/// A new `reuse-launch.<pid>.<random>` below `dir`, checked to have `cgroup.kill`. The random
/// part keeps launchers apart that have the same pid in pid namespaces of their own (every
/// container's launcher may be pid 1) under one cgroup.
fn make_root(dir: &Path) -> Result<PathBuf, String> {
    sweep(dir);
    use std::hash::{BuildHasher, Hasher};
    let random = std::collections::hash_map::RandomState::new().build_hasher().finish() as u32;
    let root = dir.join(format!("reuse-launch.{}.{random:08x}", std::process::id()));
    fs::create_dir(&root).map_err(|e| format!("cannot create a cgroup in {} ({e})", dir.display()))?;
    if !root.join("cgroup.kill").exists() {
        let _ = fs::remove_dir(&root);
        return Err("no cgroup.kill (Linux 5.14 or later is needed)".into());
    }
    Ok(root)
}

/// Remove the `reuse-launch.*` roots in `dir` that are empty and were made more than a minute
/// ago (of launchers that died with their sentinel, in a pid namespace that ended, say). A live
/// launcher's root is never swept while it starts its first workers (a failed first start is
/// fatal); one with no process at the moment (every slot in backoff) is made again at its next
/// spawn (`prepare`).
fn sweep(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    let old = |e: &fs::DirEntry| {
        let made = e.metadata().and_then(|m| m.modified()).ok();
        made.and_then(|t| t.elapsed().ok()).is_some_and(|age| age > Duration::from_secs(60))
    };
    let roots = entries.flatten().filter(|e| e.file_name().to_str().is_some_and(|n| n.starts_with("reuse-launch.")));
    for root in roots.filter(old).map(|e| e.path()).filter(|r| !populated(r)) {
        if remove_tree(&root) {
            log::debug!("removed the empty cgroup {}", root.display());
        }
    }
}

/// The `--cgroup DIR` a running sentinel was started with (`/proc/PID/cmdline`): how a
/// reexec'd image finds the root its old image made.
pub fn sentinel_root(sentinel: u32) -> Option<PathBuf> {
    let argv = fs::read(format!("/proc/{sentinel}/cmdline")).ok()?;
    let mut args = argv.split(|b| *b == 0);
    args.by_ref().find(|a| *a == b"--cgroup")?;
    let dir = args.next().filter(|d| !d.is_empty())?;
    Some(PathBuf::from(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(dir)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_name_the_cgroup2_mount() {
        let line = "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw";
        assert_eq!(cgroup2_mount(line), Some(("/".into(), "/sys/fs/cgroup/unified".into())));
        let v1 = "35 30 0:30 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory";
        assert_eq!(cgroup2_mount(v1), None);
        assert_eq!(Want::parse("cgroup"), Ok(Want::Cgroup));
        assert!(Want::parse("systemd").unwrap_err().contains("'auto'"));
    }

    /// Needs a writable cgroup v2 (root here); says so and passes where there is none.
    #[test]
    fn a_tree_of_empty_cgroups_is_removed_deepest_first_and_a_populated_one_stays() {
        let Ok(dir) = launcher_cgroup() else { return eprintln!("SKIPPED: no cgroup v2") };
        let top = dir.join(format!("reuse-launch-test.{}", std::process::id()));
        if let Err(e) = fs::create_dir(&top) {
            return eprintln!("SKIPPED: cannot create {} ({e})", top.display());
        }
        fs::create_dir_all(top.join("w1/reuse-launch.1.0/w1")).unwrap();
        fs::create_dir_all(top.join("w2")).unwrap();
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        fs::write(top.join("w2/cgroup.procs"), child.id().to_string()).unwrap();
        assert!(!remove_tree(&top), "w2 holds a process");
        assert!(!top.join("w1").exists() && top.join("w2").exists());
        assert_eq!(count(&top), 1);
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(wait(|| !populated(&top)));
        assert!(remove_tree(&top) && !top.exists());
    }

    fn wait(mut f: impl FnMut() -> bool) -> bool {
        let end = Instant::now() + Duration::from_secs(5);
        while !f() {
            if Instant::now() > end {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }
}
