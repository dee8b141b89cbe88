//! A restart of the launcher refuses nothing (issue 10): the launcher hands every listening
//! socket to its service manager's fd store, so when it dies the sockets live on there; clients
//! that connect meanwhile wait in the queues, and the next launcher, started with the stored
//! sockets as LISTEN_FDS, adopts each by name and answers them all. Tested without systemd: a
//! fake NOTIFY_SOCKET receiver keeps the fds it is sent.

use std::io::{IoSliceMut, Read};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};

use crate::common::*;
use crate::status_fields::*;

/// A service manager's fd store, as far as the launcher can tell: the fds of every
/// `FDSTORE=1` datagram kept by `FDNAME`, dropped again on `FDSTOREREMOVE=1`.
struct FdStore {
    sock: UnixDatagram,
    path: TempPath,
    fds: Vec<(String, OwnedFd)>,
}

impl FdStore {
    fn bind() -> FdStore {
        let path = TempPath::new("fdstore");
        let sock = UnixDatagram::bind(&*path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        FdStore { sock, path, fds: Vec::new() }
    }

    fn receive(&mut self) {
        let mut buf = [0u8; 4096];
        let mut cmsg = nix::cmsg_space!([RawFd; 8]);
        let mut iov = [IoSliceMut::new(&mut buf)];
        let Ok(msg) = recvmsg::<()>(self.sock.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC)
        else {
            return;
        };
        let mut fds: Vec<OwnedFd> = Vec::new();
        for c in msg.cmsgs().into_iter().flatten() {
            if let ControlMessageOwned::ScmRights(got) = c {
                // SAFETY: SCM_RIGHTS just gave this process these fds; nothing else owns them.
                fds.extend(got.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
            }
        }
        let text = String::from_utf8_lossy(msg.iovs().next().unwrap()).into_owned();
        let name = text.lines().find_map(|l| l.strip_prefix("FDNAME=")).unwrap_or("").to_string();
        if text.lines().any(|l| l == "FDSTORE=1") {
            self.fds.extend(fds.into_iter().map(|fd| (name.clone(), fd)));
        } else if text.lines().any(|l| l == "FDSTOREREMOVE=1") {
            self.fds.retain(|(n, _)| *n != name);
        }
    }

    /// Receive until every name in `names` is stored.
    fn wait_for(&mut self, names: &[&str], timeout: Duration) {
        let end = Instant::now() + timeout;
        while !names.iter().all(|n| self.fds.iter().any(|(s, _)| s == n)) {
            assert!(Instant::now() < end, "fd store has {:?}, waited for {names:?}", self.names());
            self.receive();
        }
    }

    fn names(&self) -> Vec<String> {
        self.fds.iter().map(|(n, _)| n.clone()).collect()
    }
}

#[test]
fn a_killed_launchers_sockets_wait_in_the_fd_store_and_the_next_launcher_answers_every_client() {
    killed_launcher_restarts_from_the_fd_store(|l| l.py(&[]));
}

/// The same with a server that binds PORT itself (`--intercept-bind`, issue 15): its bind() gets
/// the stored socket in the next launcher too.
#[test]
fn the_fd_store_keeps_the_queues_of_a_server_that_binds_the_port_itself() {
    require(&["node", "--version"], "install Node.js 20 (apt-get install nodejs)");
    killed_launcher_restarts_from_the_fd_store(|l| {
        l.flag("--intercept-bind", "on").cmd(&["node", &worker("node-bind.js")])
    });
}

fn killed_launcher_restarts_from_the_fd_store(server: impl Fn(Launch) -> Launch) {
    let mut store = FdStore::bind();
    let mut first = server(Launch::new().workers(2).ready("auto").env("NOTIFY_SOCKET", store.path.str())).start();
    wait_all_ready(&first, 2, secs(20));
    store.wait_for(&["rl.http.0", "rl.http.1"], secs(10));
    let port = first.port();
    let workers = procs(&first.started_pids());
    first.signal(Signal::SIGKILL);
    assert!(first.wait_exit(secs(10)).is_some(), "the launcher did not die");
    assert!(wait_until(secs(10), || workers.iter().all(|w| !w.alive())), "workers outlived their launcher");
    // The gap: nothing runs, yet connections are taken into the stored sockets' queues.
    let pending: Vec<TcpStream> = (0..12)
        .map(|i| {
            let mut s =
                TcpStream::connect(("127.0.0.1", port)).unwrap_or_else(|e| panic!("connection {i} refused: {e}"));
            send_request(&mut s).unwrap();
            s
        })
        .collect();
    let names = store.names();
    let fds: Vec<RawFd> = store.fds.iter().map(|(_, fd)| fd.as_raw_fd()).collect();
    let second = server(
        Launch::new()
            .workers(2)
            .ready("auto")
            .env("LISTEN_FDS", &fds.len().to_string())
            .env("LISTEN_FDNAMES", &names.join(":"))
            .pass_fds(fds)
            .via(&["sh", "-c", "LISTEN_PID=$$ exec \"$@\"", "sh"]),
    )
    .start();
    second.wait_for("took back 2 listening sockets from the service manager's fd store", secs(10));
    assert_eq!(second.port(), port);
    let mut answered = Vec::new();
    for (i, mut s) in pending.into_iter().enumerate() {
        s.set_read_timeout(Some(secs(20))).unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap_or_else(|e| panic!("client {i} of the gap lost: {e}"));
        assert!(text.starts_with("HTTP/1.1 200"), "client {i}: {text:?}");
        answered.push(text.split("pid=").nth(1).unwrap().split(' ').next().unwrap().parse::<i32>().unwrap());
    }
    wait_all_ready(&second, 2, secs(20));
    let new_workers = second.started_pids();
    assert!(answered.iter().all(|p| new_workers.contains(p)), "answered by {answered:?}, new workers {new_workers:?}");
    drop(store);
    let r = get(port).unwrap();
    assert!(new_workers.contains(&r.pid));
}

/// With `-n MIN..MAX` the next launcher keeps the slot count the last one had (within its
/// bounds), not MIN: the stored sockets of slots 0 and 1 both serve again.
#[test]
fn the_fd_store_keeps_the_automatic_slot_count() {
    let mut store = FdStore::bind();
    let dir = TempPath::dir("fdstore-autoscale");
    let control = dir.join("c.sock").to_str().unwrap().to_string();
    let launch = || Launch::new().flag("-n", "1..3").ready("auto").flag("--control", &control);
    let mut first = launch().env("NOTIFY_SOCKET", store.path.str()).py(&[]).start();
    wait_all_ready(&first, 1, secs(20));
    let out = std::process::Command::new(BIN).args(["scale", "2", "--control", &control]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_all_ready(&first, 2, secs(20));
    store.wait_for(&["rl.http.0", "rl.http.1"], secs(10));
    first.signal(Signal::SIGKILL);
    assert!(first.wait_exit(secs(10)).is_some(), "the launcher did not die");
    let names = store.names();
    let fds: Vec<RawFd> = store.fds.iter().map(|(_, fd)| fd.as_raw_fd()).collect();
    let second = launch()
        .env("LISTEN_FDS", &fds.len().to_string())
        .env("LISTEN_FDNAMES", &names.join(":"))
        .pass_fds(fds)
        .via(&["sh", "-c", "LISTEN_PID=$$ exec \"$@\"", "sh"])
        .py(&[])
        .start();
    second.wait_for("took back 2 listening sockets from the service manager's fd store", secs(10));
    wait_all_ready(&second, 2, secs(20));
    assert_eq!(second.count("retires"), 0, "{}", second.log());
    let answers = second.poll_answers(secs(20), |r| r.iter().any(|r| r.slot == "1"));
    assert!(answers.iter().any(|r| r.slot == "1"));
}
