//! Unit tests of the readiness probe: real processes waiting in accept, poll, select and
//! epoll on real sockets, and the parsers of /proc's formats.

use super::*;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};

#[test]
fn socket_inodes_match_proc_links_and_reject_non_sockets() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let inodes = socket_inodes(&[l.as_raw_fd()]).unwrap();
    let link = fs::read_link(format!("/proc/self/fd/{}", l.as_raw_fd())).unwrap();
    assert_eq!(link.to_str().unwrap(), format!("socket:[{}]", inodes[0]));
    let file = File::open("/proc/self/stat").unwrap();
    let e = socket_inodes(&[l.as_raw_fd(), file.as_raw_fd()]).unwrap_err();
    assert!(e.to_string().contains("not a socket"), "{e}");
    assert!(socket_inodes(&[-1]).is_err());
}

#[test]
fn gone_processes_are_not_yet_and_no_sockets_is_unknown() {
    let mut child = Command::new("true").spawn().unwrap();
    let pid = child.id() as i32;
    child.wait().unwrap();
    assert_eq!(probe(&[pid], &[1]), Probe::NotYet);
    assert_eq!(probe(&[], &[1]), Probe::NotYet);
    assert!(matches!(probe(&[std::process::id() as i32], &[]), Probe::Unknown(_)));
}

// ---- real workers ----

/// A worker in its own process group, given `listener` as fd 3; SIGKILLed with its whole
/// group (and reaped) when dropped, whatever the test's outcome.
struct Worker {
    child: Child,
    what: String,
}

impl Worker {
    /// Run `argv` with the socket as fd 3 (via stdin: no fd of the test process loses its
    /// CLOEXEC, so concurrent tests' children inherit nothing). `wrapped`: under an `sh`
    /// that stays the group leader and waits for it.
    fn start(listener: &TcpListener, wrapped: bool, argv: &[&str]) -> Worker {
        let sock: OwnedFd = listener.try_clone().expect("dup the listener").into();
        let script = if wrapped {
            r#"exec 3<&0 0</dev/null; "$@"; exit $?"#
        } else {
            r#"exec 3<&0 0</dev/null; LISTEN_FDS=1 LISTEN_PID=$$ exec "$@""#
        };
        let child = Command::new("sh")
            .args(["-c", script, "sh"])
            .args(argv)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .stdin(Stdio::from(sock))
            .stdout(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("spawn the worker");
        Worker { child, what: argv.join(" ") }
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn probe(&self, inodes: &[u64]) -> Probe {
        probe(&group_members(self.pid()), inodes)
    }

    fn assert_alive(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("{}: exited early: {status}", self.what);
        }
    }

    /// Probe every 20 ms until Waiting; the number of NotYet answers before it.
    fn wait_waiting(&mut self, inodes: &[u64], timeout: Duration) -> (Evidence, usize) {
        let deadline = Instant::now() + timeout;
        let mut not_yet = 0;
        loop {
            match self.probe(inodes) {
                Probe::Waiting(e) => {
                    eprintln!("{}: {e} (after {not_yet} NotYet)", self.what);
                    return (e, not_yet);
                }
                Probe::Unknown(why) => panic!("{}: unknown: {why}", self.what),
                Probe::NotYet => not_yet += 1,
            }
            self.assert_alive();
            assert!(Instant::now() < deadline, "{}: not waiting after {timeout:?}", self.what);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Wait (bounded) until `cond` holds for this worker.
    fn wait_until(&mut self, what: &str, mut cond: impl FnMut(&Worker) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond(self) {
            self.assert_alive();
            assert!(Instant::now() < deadline, "{}: never {what}", self.what);
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = killpg(Pid::from_raw(self.pid()), Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

fn listener() -> (TcpListener, Vec<u64>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let inodes = socket_inodes(&[l.as_raw_fd()]).expect("inode");
    (l, inodes)
}

const TIMEOUT: Duration = Duration::from_secs(15);

/// Start `argv`, wait until it is Waiting, and return how it was seen.
fn detect(argv: &[&str]) -> Evidence {
    let (l, inodes) = listener();
    let mut w = Worker::start(&l, false, argv);
    let (e, _) = w.wait_waiting(&inodes, TIMEOUT);
    assert_eq!(e.pid, w.pid(), "{e}");
    e
}

fn py(code: &str) -> Evidence {
    detect(&["python3", "-c", code])
}

#[test]
fn python_blocking_accept() {
    let e = py("import socket; s = socket.socket(fileno=3); s.accept()");
    assert_eq!(e.fd, 3);
    assert!(matches!(e.via, Via::Accept { syscall: "accept4", .. }), "{e}");
}

#[test]
fn python_accept_on_a_dup() {
    let e = py("import os, socket; fd = os.dup(3); os.close(3); socket.socket(fileno=fd).accept()");
    assert_ne!(e.fd, 3);
    assert!(matches!(e.via, Via::Accept { .. }), "{e}");
}

#[test]
fn python_accept_in_a_thread() {
    let e = py("import socket, threading, time\n\
                s = socket.socket(fileno=3)\n\
                threading.Thread(target=s.accept, daemon=True).start()\n\
                time.sleep(60)");
    assert!(matches!(e.via, Via::Accept { tid, .. } if tid != e.pid), "{e}");
}

#[test]
fn python_select() {
    let e = py("import select, socket; s = socket.socket(fileno=3); select.select([s], [], [])");
    // glibc's select() is the pselect6 system call.
    assert!(matches!(e.via, Via::Select { .. }), "{e}");
}

#[test]
fn python_poll() {
    let e = py("import select, socket\n\
                p = select.poll(); p.register(3, select.POLLIN); p.poll()");
    assert!(matches!(e.via, Via::Poll { syscall: "poll", .. }), "{e}");
}

#[test]
#[cfg(target_arch = "x86_64")]
fn raw_select_syscall() {
    // select(2) itself (23), not glibc's pselect6, with a higher fd in the set too.
    let e = py("import ctypes, os\n\
                fd = os.dup2(3, 70)\n\
                bits = (ctypes.c_ulong * 2)()\n\
                bits[0] = 1 << 3; bits[1] = 1 << (70 - 64)\n\
                ctypes.CDLL(None, use_errno=True).syscall(23, 71, ctypes.byref(bits), None, None, None)");
    assert!(matches!(e.via, Via::Select { syscall: "select", .. }), "{e}");
}

#[test]
fn ppoll_via_ctypes() {
    let e = py("import ctypes, os\n\
                class P(ctypes.Structure):\n    _fields_ = [('fd', ctypes.c_int), ('events', ctypes.c_short), ('revents', ctypes.c_short)]\n\
                r, w = os.pipe()\n\
                fds = (P * 2)(P(r, 1, 0), P(3, 1, 0))\n\
                ctypes.CDLL(None).ppoll(fds, 2, None, None)");
    assert!(matches!(e.via, Via::Poll { syscall: "ppoll", .. }), "{e}");
    assert_eq!(e.fd, 3);
}

#[test]
fn python_asyncio_epoll() {
    let e = py("import asyncio, socket\n\
                async def main():\n    srv = await asyncio.start_server(lambda r, w: None, sock=socket.socket(fileno=3))\n    await srv.serve_forever()\n\
                asyncio.run(main())");
    assert!(matches!(e.via, Via::Epoll { .. }), "{e}");
}

/// GET / on `l` and read the reply's first line.
fn answer(l: &TcpListener) -> String {
    let mut s = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut reply = String::new();
    let _ = s.read_to_string(&mut reply);
    reply.lines().next().unwrap_or("").to_string()
}

#[test]
fn node_epoll_and_it_answers() {
    let (l, inodes) = listener();
    let mut w = Worker::start(&l, false, &["node", "tests/workers/node-fd.js"]);
    let (e, _) = w.wait_waiting(&inodes, TIMEOUT);
    assert!(matches!(e.via, Via::Epoll { .. }), "{e}");
    assert_eq!(answer(&l), "HTTP/1.1 200 OK");
}

#[test]
fn late_listener_is_not_yet_then_waiting() {
    // The repo's Python worker (http.server: poll) sleeps 1 s before it serves.
    let (l, inodes) = listener();
    let started = Instant::now();
    let mut w = Worker::start(&l, false, &["python3", "tests/workers/pyworker.py", "--start-delay", "1"]);
    let (e, not_yet) = w.wait_waiting(&inodes, TIMEOUT);
    assert!(started.elapsed() >= Duration::from_secs(1), "waiting before its start delay: {e}");
    assert!(not_yet > 0);
    assert!(matches!(e.via, Via::Poll { .. }), "{e}");
    assert_eq!(answer(&l), "HTTP/1.1 200 OK");
}

/// Probe for `window` and require NotYet every time.
fn stays_not_yet(w: &mut Worker, inodes: &[u64], window: Duration) {
    let until = Instant::now() + window;
    while Instant::now() < until {
        assert_eq!(w.probe(inodes), Probe::NotYet, "{}", w.what);
        w.assert_alive();
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn holds(pid: i32, inode: u64) -> bool {
    let want = format!("socket:[{inode}]");
    fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.flatten().any(|e| fs::read_link(e.path()).is_ok_and(|t| t.as_os_str() == want.as_str())))
        .unwrap_or(false)
}

#[test]
fn never_accepting_stays_not_yet() {
    let (l, inodes) = listener();
    let mut w = Worker::start(&l, false, &["sleep", "30"]);
    w.wait_until("sleeping with the socket", |w| {
        fs::read_to_string(format!("/proc/{}/comm", w.pid())).is_ok_and(|c| c.trim() == "sleep")
            && holds(w.pid(), inodes[0])
    });
    stays_not_yet(&mut w, &inodes, Duration::from_secs(1));
}

#[test]
fn waiting_on_other_things_stays_not_yet() {
    // Holds the socket, but: epoll has it for writing only, poll and select wait on a pipe
    // (select with the socket in its write set), and one thread accepts on another socket.
    let (l, inodes) = listener();
    let code = "import os, select, socket, threading\n\
                r, w = os.pipe()\n\
                other = socket.create_server(('127.0.0.1', 0))\n\
                ep = select.epoll(); ep.register(r, select.EPOLLIN); ep.register(3, select.EPOLLOUT)\n\
                p = select.poll(); p.register(r, select.POLLIN); p.register(3, select.POLLOUT)\n\
                for f in (lambda: select.select([r], [3], []), lambda: ep.poll(), other.accept):\n    threading.Thread(target=f, daemon=True).start()\n\
                p.poll()";
    let mut w = Worker::start(&l, false, &["python3", "-c", code]);
    let pid = w.pid();
    w.wait_until("blocked in its 4 threads", |_| {
        let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else { return false };
        let calls: Vec<_> = tasks
            .flatten()
            .filter_map(|t| fs::read_to_string(t.path().join("syscall")).ok())
            .filter_map(|s| parse_syscall(&s))
            .collect();
        // poll, select and accept: the decoded ones; the fourth is in epoll_wait.
        let decoded = calls.iter().filter(|c| matches!(c, Syscall::In { nr, .. } if wait_syscall(*nr).is_some()));
        calls.len() == 4 && decoded.count() == 3
    });
    stays_not_yet(&mut w, &inodes, Duration::from_secs(1));
}

#[test]
fn sh_wrapper_child_found_through_the_group() {
    let (l, inodes) = listener();
    let mut w = Worker::start(&l, true, &["python3", "-c", "import socket; s = socket.socket(fileno=3); s.accept()"]);
    let (e, _) = w.wait_waiting(&inodes, TIMEOUT);
    assert_ne!(e.pid, w.pid(), "the wrapper itself does not accept: {e}");
    assert!(group_members(w.pid()).contains(&e.pid));
    let both = groups_members(&[w.pid(), std::process::id() as i32]);
    assert_eq!(both[0], group_members(w.pid()));
    assert!(both[0].len() >= 2 && both[0].contains(&w.pid()), "{both:?}");
    assert!(!both[1].contains(&w.pid()) && both[1].contains(&(std::process::id() as i32)), "{both:?}");
    assert!(matches!(e.via, Via::Accept { .. }), "{e}");
    // The wrapper alone (it holds the socket too, blocked in wait4) is not waiting.
    assert_eq!(probe(&[w.pid()], &inodes), Probe::NotYet);
}

#[test]
fn unreadable_proc_is_unknown() {
    // As another user, a root worker's /proc/PID/fd is unreadable. Runs the helper test
    // below in a copy of this test binary as nobody.
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root to run a probe as another user");
        return;
    }
    let (l, inodes) = listener();
    let mut w = Worker::start(&l, false, &["python3", "-c", "import socket; socket.socket(fileno=3).accept()"]);
    w.wait_waiting(&inodes, TIMEOUT);
    // A copy nobody can run wherever the checkout lives (e.g. under a private /root).
    let exe = std::env::temp_dir().join(format!("reuse-launch-readiness-test-{}", std::process::id()));
    fs::copy(std::env::current_exe().unwrap(), &exe).unwrap();
    let _remove = RemoveOnDrop(exe.clone());
    let out = Command::new(&exe)
        .args(["--exact", "readiness::tests::probe_as_nobody_helper", "--ignored", "--nocapture"])
        .env("READINESS_TEST_PID", w.pid().to_string())
        .env("READINESS_TEST_INODE", inodes[0].to_string())
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && text.contains("1 passed"), "{text}");
    let line = text.lines().find(|l| l.starts_with("Unknown as expected")).unwrap_or_default();
    eprintln!("as nobody: {line}");
    assert!(line.contains("permission denied"), "{text}");
}

struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

#[test]
#[ignore = "run by unreadable_proc_is_unknown as another user"]
fn probe_as_nobody_helper() {
    let var = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
    let (Some(pid), Some(inode)) = (var("READINESS_TEST_PID"), var("READINESS_TEST_INODE")) else { return };
    let pids = group_members(pid as i32);
    assert_eq!(pids, vec![pid as i32]);
    match probe(&pids, &[inode]) {
        Probe::Unknown(why) => eprintln!("Unknown as expected: {why}"),
        other => panic!("expected Unknown as nobody, got {other:?}"),
    }
}
