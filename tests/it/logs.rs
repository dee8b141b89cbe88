//! Worker logs through the launcher (issue 9, part 4): every line of a worker's stdout and
//! stderr comes out whole, prefixed `[SLOT PID] `, on the launcher's stdout and stderr
//! respectively; a line over 64 KiB is split with markers; the last lines of an exiting worker
//! (and of its children) are kept; `--log-prefix none` keeps direct inheritance; a stalled
//! stdout reader never stalls the supervisor loop.
//!
//! The harness lets the launcher inherit the test's stdout, so these tests start it through
//! `sh -c 'exec "$@" >FIFO'` and read that FIFO ([`Stdout`]).

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::sys::stat::Mode;

use crate::common::*;
use crate::status_fields::*;

/// The launcher's stdout as a FIFO that the test reads (or not).
struct Stdout {
    fifo: File,
    path: String,
    _dir: TempPath,
    partial: Vec<u8>,
    lines: Vec<String>,
}

impl Stdout {
    /// Make the FIFO and open its read end (non-blocking), so the launcher's open for writing
    /// does not wait.
    fn new() -> Stdout {
        let dir = TempPath::dir("logs");
        let path = format!("{}/stdout", dir.str());
        nix::unistd::mkfifo(path.as_str(), Mode::from_bits_truncate(0o600)).expect("mkfifo");
        let fifo = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)
            .unwrap_or_else(|e| panic!("open {path}: {e}"));
        Stdout { fifo, path, _dir: dir, partial: Vec::new(), lines: Vec::new() }
    }

    /// `launch` with its stdout going to this FIFO.
    fn attach(&self, launch: Launch) -> Launch {
        let script = format!("exec \"$@\" >'{}'", self.path);
        launch.via(&["sh", "-c", &script, "sh"])
    }

    /// Take in whatever is there now (never waits).
    fn read_now(&mut self) {
        let mut buf = vec![0u8; 1 << 16];
        loop {
            match self.fifo.read(&mut buf) {
                Ok(0) => return, // no writer (yet, or any more)
                Ok(n) => self.partial.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("read the launcher's stdout: {e}"),
            }
        }
        while let Some(i) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=i).collect();
            self.lines.push(String::from_utf8_lossy(&line[..i]).into_owned());
        }
    }

    /// Read until `cond` holds on every line so far; panics after `timeout`.
    fn wait(&mut self, what: &str, timeout: Duration, mut cond: impl FnMut(&[String]) -> bool) {
        let ok = wait_until(timeout, || {
            self.read_now();
            cond(&self.lines)
        });
        if !ok {
            let tail: Vec<String> = self.lines.iter().rev().take(10).map(|l| l.chars().take(200).collect()).collect();
            panic!("stdout: no {what} within {timeout:?}; {} lines, last ones: {tail:?}", self.lines.len());
        }
    }

    fn has(&self, line: &str) -> bool {
        self.lines.iter().any(|l| l == line)
    }

    /// Read to EOF in the background (the launcher may be blocked on a full FIFO as it exits).
    fn drain_in_background(mut self) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 16];
            wait_until(secs(30), || loop {
                match self.fifo.read(&mut buf) {
                    Ok(0) => return true, // the launcher is running, so this is EOF
                    Ok(_) => continue,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
                    Err(_) => return true,
                }
            });
        })
    }
}

/// A Python worker that runs `code` with `os`, `sys`, `time`, `slot` and `pid` defined, then
/// sleeps (so that it is not respawned).
fn py_worker(code: &str) -> Vec<String> {
    let program = format!(
        "import os, sys, time\nslot = os.environ['REUSE_LAUNCH_SLOT']\npid = os.getpid()\n{code}\n\
         sys.stdout.flush()\nsys.stderr.flush()\ntime.sleep(1000)\n"
    );
    vec!["python3".into(), "-c".into(), program]
}

fn cmd(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Check one prefixed line of the long-line workers: `[S P] S-P-I-fill`, 5,000 characters
/// after the prefix. Returns (slot, pid, i); panics on a mixed or broken line.
fn check_long_line(line: &str) -> (usize, i32, usize) {
    let parsed = parse_long_line(line);
    parsed
        .unwrap_or_else(|| panic!("mixed or broken line ({} bytes): {:?}...", line.len(), &line[..line.len().min(120)]))
}

fn parse_long_line(line: &str) -> Option<(usize, i32, usize)> {
    let (head, body) = line.strip_prefix('[')?.split_once("] ")?;
    let (slot, pid) = head.split_once(' ')?;
    let mut f = body.splitn(4, '-');
    let (bslot, bpid, i, fill) = (f.next()?, f.next()?, f.next()?, f.next()?);
    let c = (b'a' + slot.parse::<u8>().ok()?) as char;
    let whole = bslot == slot && bpid == pid && body.len() == 5000 && fill.chars().all(|x| x == c);
    whole.then_some((slot.parse().ok()?, pid.parse().ok()?, i.parse().ok()?))
}

#[test]
fn long_lines_of_two_workers_never_mix_on_stdout_or_stderr() {
    const N: usize = 1000;
    // Each worker writes N lines of 5,000 characters as fast as Python can (stdout block
    // buffered: 8 KiB writes that cut lines anywhere), even ones to stdout, odd ones to stderr.
    let worker = py_worker(&format!(
        "fill = chr(ord('a') + int(slot))\n\
         for i in range({N}):\n\
         \x20   head = f'{{slot}}-{{pid}}-{{i:05d}}-'\n\
         \x20   (sys.stdout if i % 2 == 0 else sys.stderr).write(head + fill * (5000 - len(head)) + '\\n')"
    ));
    let mut out = Stdout::new();
    let l = out.attach(Launch::new().workers(2).ready_delay("100ms").cmd(&cmd(&worker))).start();
    wait_all_ready(&l, 2, secs(20));
    out.wait("every stdout line", secs(60), |lines| lines.len() >= N);
    let workers = l.started();
    assert_eq!(workers.len(), 2, "{}", l.log());
    let mut seen = std::collections::BTreeSet::new();
    for line in &out.lines {
        let (slot, pid, i) = check_long_line(line);
        assert!(workers.iter().any(|w| w.slot == slot && w.pid == pid), "line from an unknown worker: [{slot} {pid}]");
        assert_eq!(i % 2, 0, "a stderr line on stdout");
        assert!(seen.insert((slot, i)), "line {i} of slot {slot} twice");
    }
    assert_eq!(seen.len(), N);
    // The launcher's stderr: its own lines intact, and every worker stderr line whole.
    let worker_lines = |log: &str| log.lines().filter(|x| x.starts_with('[')).count();
    assert!(wait_until(secs(30), || worker_lines(&l.log()) >= N), "stderr lines missing");
    let log = l.log();
    let mut err_lines = 0;
    for line in log.lines() {
        if line.starts_with("reuse-launch: ") {
            assert!(!line.contains("aaaa") && !line.contains("bbbb"), "a launcher line holds worker output");
            continue;
        }
        let (_, _, i) = check_long_line(line);
        assert_eq!(i % 2, 1, "a stdout line on stderr");
        err_lines += 1;
    }
    assert_eq!(err_lines, N);
}

#[test]
fn last_lines_are_kept_when_a_worker_exits_even_from_its_children() {
    // Slot 0 writes to both outputs, ends each with an unterminated line and exits. Slot 1
    // starts a child in a session of its own (so that it outlives the worker's group; the
    // worker waits until it is there), exits, and the child writes a while later.
    let dir = TempPath::dir("logs-late");
    let script = format!(
        "if [ \"$REUSE_LAUNCH_SLOT\" = 0 ]; then \
           echo out-first; echo err-first >&2; printf out-tail; printf err-tail >&2; exit 3; \
         fi; \
         mark={dir}/$$; \
         setsid sh -c \"touch $mark; sleep 0.5; echo late-out; printf late-err-tail >&2\" & \
         while [ ! -e $mark ]; do sleep 0.01; done; exit 4",
        dir = dir.str()
    );
    let mut out = Stdout::new();
    let launch = Launch::new().workers(2).ready_delay("5s").flag("--max-start-failures", "100");
    let l = out.attach(launch.cmd(&["sh", "-c", &script])).start();
    l.wait_for("(pid ", secs(10));
    let first = |slot: usize| {
        assert!(wait_until(secs(10), || l.started().iter().any(|w| w.slot == slot)), "{}", l.log());
        let w = l.started().into_iter().find(|w| w.slot == slot).unwrap();
        (w.pid, format!("[{slot} {}] ", w.pid))
    };
    let (pid0, p0) = first(0);
    let (pid1, p1) = first(1);
    l.wait_for(&format!("{p0}err-tail"), secs(10));
    l.wait_for(&format!("{p1}late-err-tail"), secs(10));
    let log = l.log();
    let lines: Vec<&str> = log.lines().collect();
    for want in [format!("{p0}err-first"), format!("{p0}err-tail"), format!("{p1}late-err-tail")] {
        assert!(lines.contains(&want.as_str()), "no {want} on stderr:\n{log}");
    }
    assert!(!log.contains("out-"), "stdout lines on stderr:\n{log}");
    // The child's line came after the worker's exit had been logged: its pipe was kept.
    l.wait_for(&format!("(pid {pid0}, gen 1) exited with status 3"), secs(1));
    let exit_at = l.find(&format!("(pid {pid1}, gen 1) exited with status 4")).expect("slot 1's exit").0;
    assert!(l.find(&format!("{p1}late-err-tail")).unwrap().0 > exit_at, "{log}");
    out.wait("the late stdout line", secs(10), |lines| lines.iter().any(|x| x == &format!("{p1}late-out")));
    for want in [format!("{p0}out-first"), format!("{p0}out-tail")] {
        assert!(out.has(&want), "no {want} on stdout: {:?}", out.lines);
    }
    assert!(!out.lines.iter().any(|x| x.contains("err-")), "stderr lines on stdout: {:?}", out.lines);
}

#[test]
fn a_line_over_64k_is_split_with_visible_markers() {
    let worker = py_worker("sys.stdout.write(''.join(chr(97 + i % 26) for i in range(150000)) + '\\nafter\\n')");
    let mut out = Stdout::new();
    let l = out.attach(Launch::new().workers(1).ready_delay("100ms").cmd(&cmd(&worker))).start();
    l.wait_for(") started", secs(10));
    let pid = l.started()[0].pid;
    let p = format!("[0 {pid}] ");
    out.wait("the line after the long one", secs(20), |lines| lines.iter().any(|x| x == &format!("{p}after")));
    assert_eq!(out.lines.len(), 4, "{:?}", out.lines.iter().map(|x| x.len()).collect::<Vec<_>>());
    let mut whole = String::new();
    for (i, line) in out.lines[..3].iter().enumerate() {
        let mut body = line.strip_prefix(&p).expect("prefix");
        if i > 0 {
            body = body.strip_prefix("[continued] ").expect("[continued] at the start of a continuation");
        }
        if i < 2 {
            body = body.strip_suffix(" [line continues]").expect("[line continues] at the end of a cut piece");
            assert_eq!(body.len(), 65536, "pieces of 64 KiB");
        }
        whole.push_str(body);
    }
    let original: String = (0..150000).map(|i| (b'a' + (i % 26) as u8) as char).collect();
    assert!(whole == original, "the pieces do not make up the line");
}

#[test]
fn log_prefix_none_passes_output_unprefixed_by_flag_or_environment() {
    for how in ["flag", "env"] {
        let mut out = Stdout::new();
        let tag = format!("plain-{how}");
        let script = format!("echo {tag}-out; echo {tag}-err >&2; exec sleep 1000");
        let launch = Launch::new().workers(1).ready_delay("100ms").cmd(&["sh", "-c", &script]);
        let launch = match how {
            "flag" => launch.flag("--log-prefix", "none"),
            _ => launch.env("REUSE_LAUNCH_LOG_PREFIX", "none"),
        };
        let mut l = out.attach(launch).start();
        l.wait_for(&format!("{tag}-err"), secs(10));
        l.wait_for(") started", secs(10));
        assert!(l.log().lines().any(|x| x == format!("{tag}-err")), "{}", l.log());
        out.wait("the worker's line", secs(10), |lines| lines.iter().any(|x| x == &format!("{tag}-out")));
        // Direct inheritance: the worker's fd 1 is the launcher's stdout itself.
        let pid = l.started()[0].pid;
        // (Once the shell has exec'd sleep: during `echo >&2` dash keeps fd 1 elsewhere.)
        let direct = wait_until(secs(10), || {
            cmdline(pid).first().is_some_and(|c| c == "sleep") && fd_target(pid, 1).ends_with("/stdout")
        });
        assert!(direct, "{how}: worker fds: {:?}", fd_targets(pid));
        l.signal(Signal::SIGTERM);
        assert_eq!(l.exit_code(secs(20)), 0);
    }
    // The default: the worker's fds 1 and 2 are pipes to the launcher.
    let mut l = Launch::new().workers(1).ready_delay("100ms").cmd(&["sleep", "1000"]).start();
    l.wait_for(") started", secs(10));
    let pid = l.started()[0].pid;
    assert!(fd_target(pid, 1).starts_with("pipe:") && fd_target(pid, 2).starts_with("pipe:"), "{:?}", fd_targets(pid));
    assert_ne!(fd_target(pid, 1), fd_target(pid, 2));
    l.signal(Signal::SIGTERM);
    assert_eq!(l.exit_code(secs(20)), 0);
}

/// The launcher's `log-out` thread is blocked writing to its stdout.
fn stdout_blocked(launcher: i32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{launcher}/task")) else { return false };
    tasks.flatten().any(|t| {
        let read = |f: &str| std::fs::read_to_string(t.path().join(f)).unwrap_or_default();
        read("comm").trim() == "log-out" && (read("wchan") == "pipe_write" || read("syscall").starts_with("1 0x1 "))
    })
}

#[test]
fn a_stalled_stdout_reader_does_not_stall_the_supervisor() {
    let out = Stdout::new();
    let l = out.attach(Launch::new().workers(2).ready_delay("200ms").grace("5s").cmd(&["yes", "flood-line"])).start();
    wait_all_ready(&l, 2, secs(20));
    // Nobody reads stdout: the FIFO fills and log-out blocks in write (then the workers block).
    assert!(wait_until(secs(20), || stdout_blocked(l.pid())), "log-out never blocked:\n{}", l.log());
    // A crash is still seen and the slot respawned ...
    let old = l.latest_pid(0);
    signal(old, Signal::SIGKILL);
    let new = l.wait_replacement(0, old, secs(10));
    assert!(children_of(l.pid()).iter().any(|p| p.pid == new), "the replacement is not running");
    // ... and a whole roll completes, while stdout is still blocked.
    l.signal(Signal::SIGUSR2);
    l.wait_for("roll gen 2 done", secs(30));
    assert!(stdout_blocked(l.pid()), "stdout was read meanwhile?");
    // Reading again: the new generation's lines come through.
    let mut out = out;
    let slot1 = l.latest_pid(1);
    let want = format!("[1 {slot1}] flood-line");
    out.wait("a line of the rolled worker", secs(30), |lines| lines.iter().any(|x| x == &want));
    let reader = out.drain_in_background();
    let mut l = l;
    l.signal(Signal::SIGTERM);
    assert_eq!(l.exit_code(secs(20)), 0, "{}", l.log());
    reader.join().unwrap();
}
