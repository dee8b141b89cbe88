//! Issue 15: unmodified servers that bind the launcher's port themselves (`--intercept-bind`).
//!
//! Each real server runs unchanged (node `http.createServer().listen(PORT)`, an Express 4 app's
//! `app.listen(port)`, `python3 -m http.server PORT`, a static Go `ListenAndServe(":"+PORT)`),
//! and [`check_server`] checks from outside that:
//! - it answers from as many distinct processes as there are workers;
//! - every LISTEN socket on the port (`/proc/net/tcp{,6}`) is one the launcher holds, and each
//!   worker holds a launcher socket on an fd of its own (not the inherited fds 3..): its bind()
//!   was taken over, which `status --json` counts too;
//! - every listening socket the launcher holds keeps the launcher's backlog (`ss -ltn` Send-Q
//!   777, while python asks for 5, node and Express for 511, Go for the somaxconn);
//! - a roll under continuous new-connection load fails no request.
//!
//! Then: node under -n 4, shared and round-robin modes, a SIGSTOPped worker among 4; a port
//! outside --bind and a UDP socket on the same port left alone; `--intercept-bind off`'s
//! EADDRINUSE and hint; a hostile worker's bad calls (raw syscalls, `binder.py probe`); a worker
//! flooding bind/listen while another slot's worker restarts; a bind-then-fork server; a crash
//! with the queue kept; scaling; a reexec with a bind after it; no_new_privs without
//! CAP_SYS_ADMIN.

use std::collections::BTreeSet;
use std::io::Read;
use std::net::{TcpStream, UdpSocket};
use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;

use nix::sys::signal::Signal;

use crate::common::*;
use crate::control::json::Value;
use crate::control::{num, rows, status, text, wait_status};
use crate::runtimes::{built, BUILD};
use crate::status_fields::*;

/// The launcher's backlog in these tests: no server asks for this number itself.
const BACKLOG: &str = "777";

/// A launcher with interception required and its control socket in `dir`.
pub(crate) fn launch(n: usize, dir: &TempPath) -> Launch {
    Launch::new()
        .workers(n)
        .ready("auto")
        .ready_delay("1s")
        .grace("10s")
        .flag("--backlog", BACKLOG)
        .flag("--intercept-bind", "on")
        .flag("--control", &control(dir))
}

fn control(dir: &TempPath) -> String {
    format!("{}/c.sock", dir.str())
}

fn status_of(dir: &TempPath) -> Value {
    status(&["--control", &control(dir)]).expect("status --json")
}

/// The inodes of the LISTEN sockets on `port`, from /proc/net/tcp and tcp6.
fn listening_inodes(port: u16) -> BTreeSet<u64> {
    let mut found = BTreeSet::new();
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let local_port = f.get(1).and_then(|a| a.rsplit(':').next()).and_then(|p| u16::from_str_radix(p, 16).ok());
            if f.get(3) == Some(&"0A") && local_port == Some(port) {
                found.insert(f[9].parse().unwrap());
            }
        }
    }
    found
}

/// Send-Q (the backlog of a LISTEN socket) of every listening TCP socket, by inode (`ss -ltnHe`).
fn backlogs() -> Vec<(u64, u32)> {
    let out = Command::new("ss").args(["-ltnHe"]).output().expect("run ss (package iproute2)");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let ino = f.iter().find_map(|x| x.strip_prefix("ino:"))?.parse().ok()?;
            Some((ino, f.get(2)?.parse().ok()?))
        })
        .collect()
}

/// The pids of the ready workers, as `status --json` shows them.
pub(crate) fn worker_pids(dir: &TempPath) -> Vec<i32> {
    rows(&status_of(dir)).iter().filter_map(|w| w.get("pid").and_then(Value::as_u64)).map(|p| p as i32).collect()
}

/// Wait until `n` workers are ready with their binds taken over (each worker binds once or more).
pub(crate) fn wait_intercepted(l: &Launcher, dir: &TempPath, n: usize) -> Value {
    wait_status(l, &["--control", &control(dir)], secs(60), "every worker ready, binds taken over", |s| {
        let ready = rows(s).iter().filter(|w| w.get("state").and_then(Value::as_str) == Some("ready")).count();
        ready == n && num(s, "intercepted_binds") >= n as u64
    })
}

/// The launcher's sockets are the only ones listening on the port; each worker holds one of
/// them on an fd of its own (its bind() was taken over); every one keeps the launcher's backlog.
pub(crate) fn check_sockets(l: &Launcher, dir: &TempPath, inherited: usize) {
    let port = l.port();
    let ours: BTreeSet<u64> = socket_fds(l.pid()).into_iter().map(|(_, ino)| ino).collect();
    let listening = listening_inodes(port);
    assert!(!listening.is_empty(), "nothing listens on {port}");
    assert!(listening.is_subset(&ours), "LISTEN sockets on {port} {listening:?}, the launcher's {ours:?}");
    let pids = worker_pids(dir);
    assert!(!pids.is_empty());
    for pid in &pids {
        let own: Vec<(i32, u64)> = socket_fds(*pid)
            .into_iter()
            .filter(|(fd, ino)| *fd >= 3 + inherited as i32 && ours.contains(ino))
            .collect();
        assert!(
            !own.is_empty(),
            "worker {pid} holds no launcher socket beyond its inherited fds: {:?}",
            fd_targets(*pid)
        );
    }
    // The sockets the workers got (the launcher's other listeners, /metrics, keep their own).
    let given: BTreeSet<u64> =
        pids.iter().flat_map(|p| socket_fds(*p)).map(|(_, i)| i).filter(|i| ours.contains(i)).collect();
    let mut checked = 0;
    for (ino, backlog) in backlogs().into_iter().filter(|(ino, _)| given.contains(ino)) {
        assert_eq!(backlog.to_string(), BACKLOG, "socket {ino}'s backlog changed (ss -ltn Send-Q)");
        checked += 1;
    }
    assert!(checked >= 1, "no listening socket of the launcher found by ss");
}

/// One GET on a new connection to a server that need not answer `pid=..`: Ok on a 200.
fn get_200(port: u16) -> std::io::Result<()> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(secs(10)))?;
    send_request(&mut s)?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    if text.starts_with("HTTP/1.") && text.contains(" 200 ") {
        Ok(())
    } else {
        Err(std::io::Error::other(format!("bad answer: {:?}", text.chars().take(80).collect::<String>())))
    }
}

/// A roll (USR2) under continuous new-connection load, until every gen-1 worker is gone:
/// requests were answered during it; the requests made and the failures.
pub(crate) fn roll_counting(
    l: &Launcher,
    dir: &TempPath,
    request: fn(u16) -> std::io::Result<()>,
) -> (usize, Vec<String>) {
    let old: Vec<Proc> = worker_pids(dir).into_iter().map(Proc::of).collect();
    let load = Load::start_with(l.port(), 3, request);
    assert!(wait_until(secs(20), || load.ok() >= 20), "the load made no requests\nlog:\n{}", l.log());
    let at_usr2 = load.ok();
    l.signal(Signal::SIGUSR2);
    l.wait_for("roll gen 2 done", secs(120));
    let during = load.ok() - at_usr2;
    let gone = wait_until(secs(20), || old.iter().all(|p| !p.alive()));
    let (ok, failures) = load.finish();
    assert!(during > 0, "no request was answered during the roll\nlog:\n{}", l.log());
    assert!(gone, "gen 1 workers {old:?} still alive\nlog:\n{}", l.log());
    assert!(ok >= 20, "only {ok} requests during the roll");
    eprintln!("roll under load: {ok} requests, {during} during the roll, {} failed", failures.len());
    (ok, failures)
}

/// [`roll_counting`], and no request may fail.
pub(crate) fn roll_under_load(l: &Launcher, dir: &TempPath, request: fn(u16) -> std::io::Result<()>) {
    let (ok, failures) = roll_counting(l, dir, request);
    assert!(
        failures.is_empty(),
        "{} of {ok} requests failed in the roll: {failures:?}\nlog:\n{}",
        failures.len(),
        l.log()
    );
}

/// Everything [`check_server`] checks, for a server that answers `pid=.. slot=.. gen=..`.
fn check_server(l: &Launcher, dir: &TempPath, n: usize, spread: usize) {
    wait_intercepted(l, dir, n);
    let seen = l.poll_answers(secs(60), |r| distinct_pids(r) >= spread);
    eprintln!("answers from {} processes", distinct_pids(&seen));
    check_sockets(l, dir, 1);
    roll_under_load(l, dir, |p| get(p).map(drop));
    wait_intercepted(l, dir, n);
    check_sockets(l, dir, 1);
}

fn distinct_pids(replies: &[Reply]) -> usize {
    replies.iter().map(|r| r.pid).collect::<BTreeSet<_>>().len()
}

fn node() -> String {
    require(&["node", "--version"], "install Node.js 20 (apt-get install nodejs)")
}

fn node_server(n: usize, mode: &str, dir: &TempPath) -> Launcher {
    node();
    launch(n, dir).mode(mode).cmd(&["node", &worker("node-bind.js")]).start()
}

#[test]
fn node_listen_port_under_reuseport() {
    let dir = TempPath::dir("intercept");
    let l = node_server(2, "reuseport", &dir);
    check_server(&l, &dir, 2, 2);
    // NODE_APP_INSTANCE is the slot, as PM2 sets it.
    let r = l.poll_answers(secs(30), |r| r.iter().any(|r| r.slot == "1"));
    assert!(r.iter().all(|r| r.slot == "0" || r.slot == "1"), "{:?}", distinct(&r));
}

#[test]
fn node_listen_port_under_four_workers() {
    let dir = TempPath::dir("intercept");
    let l = node_server(4, "reuseport", &dir);
    check_server(&l, &dir, 4, 4);
}

#[test]
fn node_listen_port_under_shared_mode() {
    let dir = TempPath::dir("intercept");
    let l = node_server(2, "shared", &dir);
    check_server(&l, &dir, 2, 2);
}

#[test]
fn node_listen_port_under_round_robin_mode() {
    let dir = TempPath::dir("intercept");
    let l = node_server(2, "round-robin", &dir);
    check_server(&l, &dir, 2, 2);
}

#[test]
fn express_app_listen() {
    node();
    let app = worker("express/app.js");
    assert!(
        Path::new(&worker("express/node_modules/express/package.json")).exists(),
        "express is not installed in tests/workers/express/node_modules; {DEPS}"
    );
    let dir = TempPath::dir("intercept");
    let l = launch(2, &dir).cmd(&["node", &app]).start();
    check_server(&l, &dir, 2, 2);
}

/// tests/workers/go-bind/main.go, static (CGO_ENABLED=0).
fn go_bind() -> std::path::PathBuf {
    require(&["go", "version"], "install Go (apt-get install golang-go)");
    static GO: OnceLock<Result<std::path::PathBuf, String>> = OnceLock::new();
    built(&GO, "the Go ListenAndServe server", || {
        let out = Path::new(BUILD).join("go-bind");
        let mut cmd = Command::new("go");
        cmd.args(["build", "-o"]).arg(&out).arg("main.go").current_dir(worker("go-bind"));
        cmd.env("GOCACHE", Path::new(BUILD).join("go-cache")).env("GOPATH", Path::new(BUILD).join("gopath"));
        cmd.env("GOFLAGS", "").env("GO111MODULE", "off").env("GOTOOLCHAIN", "local").env("CGO_ENABLED", "0");
        (cmd, out)
    })
}

/// Whether an ELF64 file asks for a dynamic loader (a PT_INTERP program header).
fn has_interpreter(path: &Path) -> bool {
    let elf = std::fs::read(path).unwrap();
    assert_eq!(&elf[..5], b"\x7fELF\x02", "not an ELF64 file");
    let u = |at: usize, n: usize| elf[at..at + n].iter().rev().fold(0usize, |a, b| (a << 8) | *b as usize);
    let (phoff, phentsize, phnum) = (u(0x20, 8), u(0x36, 2), u(0x38, 2));
    (0..phnum).any(|i| u(phoff + i * phentsize, 4) == 3)
}

#[test]
fn go_listen_and_serve_static_binary() {
    let bin = go_bind();
    assert!(!has_interpreter(&bin), "{} is not static: no libc for LD_PRELOAD to hook", bin.display());
    let dir = TempPath::dir("intercept");
    let l = launch(2, &dir).cmd(&[bin.to_str().unwrap()]).start();
    check_server(&l, &dir, 2, 2);
}

/// Which worker process holds the server side of a new connection to `port`, once it has
/// accepted it; then the request is made and must be answered 200.
fn answering_pid(port: u16, pids: &[i32]) -> Option<i32> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    let client = s.local_addr().ok()?.port();
    let mut holder = None;
    wait_until(secs(10), || {
        let ino = server_side_inode(port, client);
        holder = ino.and_then(|ino| pids.iter().copied().find(|p| socket_fds(*p).iter().any(|(_, i)| *i == ino)));
        holder.is_some()
    });
    s.set_read_timeout(Some(secs(10))).ok()?;
    send_request(&mut s).ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    assert!(text.contains(" 200 "), "{text:?}");
    holder
}

#[test]
fn python_http_server() {
    let dir = TempPath::dir("intercept");
    let l = launch(2, &dir).cmd(&["python3", "-m", "http.server", "{port}"]).start();
    wait_intercepted(&l, &dir, 2);
    let pids = worker_pids(&dir);
    let mut answered = BTreeSet::new();
    wait_until(secs(60), || {
        answered.extend(answering_pid(l.port(), &pids));
        answered.len() == 2
    });
    assert_eq!(answered.len(), 2, "answers only from {answered:?} of {pids:?}");
    check_sockets(&l, &dir, 1);
    roll_under_load(&l, &dir, get_200);
    wait_intercepted(&l, &dir, 2);
    check_sockets(&l, &dir, 1);
}

#[test]
fn a_stopped_worker_of_four_strands_no_new_connection() {
    let dir = TempPath::dir("intercept");
    let l = node_server(4, "reuseport", &dir);
    wait_intercepted(&l, &dir, 4);
    let load = Load::start(l.port(), 4);
    let stopped = l.latest_pid(2);
    assert!(wait_until(secs(20), || load.ok() >= 20), "the load made no requests");
    signal(stopped, Signal::SIGSTOP);
    // Made at once, before the launcher can have noticed: the kernel's hash puts some of them
    // into the stopped worker's queue, from which the launcher takes them back.
    let pending: Vec<TcpStream> = (0..40)
        .map(|i| {
            let mut s = TcpStream::connect(("127.0.0.1", l.port())).unwrap();
            send_request(&mut s).unwrap_or_else(|e| panic!("request {i}: {e}"));
            s
        })
        .collect();
    for (i, mut s) in pending.into_iter().enumerate() {
        let mut text = String::new();
        s.set_read_timeout(Some(secs(10))).unwrap();
        s.read_to_string(&mut text).unwrap_or_else(|e| panic!("request {i} waited for SIGCONT: {e}"));
        assert!(
            text.starts_with("HTTP/1.1 200") && !text.contains(&format!("pid={stopped} ")),
            "request {i}: {text:?}"
        );
    }
    wait_stalled(&l, stopped);
    let during: Vec<Reply> = (0..40).map(|i| get(l.port()).unwrap_or_else(|e| panic!("request {i}: {e}"))).collect();
    assert!(during.iter().all(|r| r.pid != stopped));
    signal(stopped, Signal::SIGCONT);
    let (ok, failures) = load.finish();
    assert!(failures.is_empty(), "{} of {ok} failed with a worker stopped: {failures:?}", failures.len());
    assert!(ok > 0);
}

#[test]
fn a_port_outside_bind_and_a_udp_socket_on_the_port_are_left_alone() {
    node();
    let extra = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dir = TempPath::dir("intercept");
    let l = launch(2, &dir)
        .env("EXTRA_PORT", &extra.to_string())
        .env("UDP", "1")
        .cmd(&["node", &worker("node-bind.js")])
        .start();
    wait_intercepted(&l, &dir, 2);
    let slot0 = l.latest_pid(0);
    // The extra port: node's own socket, not the launcher's, answered by slot 0.
    let r = get(extra).expect("the extra port answers");
    assert_eq!(r.pid, slot0);
    let ours: BTreeSet<u64> = socket_fds(l.pid()).into_iter().map(|(_, i)| i).collect();
    let extra_listeners = listening_inodes(extra);
    assert_eq!(extra_listeners.len(), 1);
    assert!(extra_listeners.is_disjoint(&ours), "the extra port's socket is the worker's own");
    // UDP on PORT itself: the worker's own datagram socket answers.
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.set_read_timeout(Some(secs(2))).unwrap();
    let mut buf = [0u8; 256];
    let got = (0..10).find_map(|_| {
        udp.send_to(b"ping", ("127.0.0.1", l.port())).unwrap();
        udp.recv(&mut buf).ok()
    });
    let reply = String::from_utf8_lossy(&buf[..got.expect("no UDP answer")]).into_owned();
    assert_eq!(reply, format!("udp pid={slot0} ping"));
    // And the HTTP port still is the launcher's.
    check_sockets(&l, &dir, 1);
}

#[test]
fn off_gives_eaddrinuse_and_the_hint() {
    node();
    let mut l = Launch::new()
        .workers(2)
        .flag("--intercept-bind", "off")
        .flag("--max-start-failures", "2")
        .cmd(&["node", &worker("node-bind.js")])
        .start();
    assert_eq!(l.exit_code(secs(60)), 1, "{}", l.log());
    let log = l.log();
    assert!(log.contains("EADDRINUSE"), "{log}");
    assert!(log.contains("giving up"), "{log}");
    assert!(
        log.contains("bind() interception is off: workers must use the inherited listening sockets (fd 3 and up, LISTEN_FDS) or run with --intercept-bind"),
        "{log}"
    );
}

#[test]
fn on_in_self_mode_is_refused() {
    let mut l = Launch::new().workers(1).mode("self").flag("--intercept-bind", "on").py(&[]).spawn();
    assert_eq!(l.exit_code(secs(20)), 2, "{}", l.log());
    assert!(l.log().contains("--intercept-bind"), "{}", l.log());
}

/// What `binder.py` wrote at `path`, once it has (a bind's result is (return value, error)).
fn probe_results(path: &str) -> Value {
    let mut text = String::new();
    wait_until(secs(30), || {
        text = std::fs::read_to_string(path).unwrap_or_default();
        !text.is_empty()
    });
    crate::control::json::parse(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

fn call(v: &Value, key: &str) -> (i64, Option<String>) {
    let a = v.get(key).and_then(Value::as_array).unwrap_or_else(|| panic!("no {key} in {v}"));
    let r = match &a[0] {
        Value::Number(n) => n.as_f64().unwrap_or_else(|| panic!("{key}: {n}")) as i64,
        other => panic!("{key}: {other}"),
    };
    (r, a[1].as_str().map(String::from))
}

#[test]
fn a_hostile_worker_gets_the_kernels_errors_and_only_its_own_slots_socket() {
    let dir = TempPath::dir("intercept");
    let out = TempPath::dir("probe");
    let path = format!("{}/result", out.str());
    let metrics = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let l = launch(2, &dir)
        .flag("--metrics", &format!("127.0.0.1:{metrics}"))
        .env("OTHER_PORT", &metrics.to_string())
        .cmd(&["python3", &worker("binder.py"), "probe", &path])
        .start();
    let slots = [probe_results(&format!("{path}.0")), probe_results(&format!("{path}.1"))];
    let ours: BTreeSet<u64> = socket_fds(l.pid()).into_iter().map(|(_, i)| i).collect();
    assert_ne!(num(&slots[0], "fd3_ino"), num(&slots[1], "fd3_ino"), "two slots, two sockets");
    for (slot, v) in slots.iter().enumerate() {
        let fd3 = num(v, "fd3_ino");
        let other = num(&slots[1 - slot], "fd3_ino");
        let err = |k: &str| call(v, k).1.unwrap_or_else(|| panic!("slot {slot}: {k} succeeded: {v}"));
        assert_eq!(err("bad_pointer"), "Bad address");
        assert_eq!(err("long_len"), "Invalid argument");
        assert_eq!(err("negative_len"), "Invalid argument");
        assert_eq!(err("short_len"), "Invalid argument");
        assert_eq!(err("bad_fd"), "Bad file descriptor");
        assert_eq!(err("wrong_family"), "Invalid argument", "an AF_INET address on an AF_INET6 socket");
        assert_eq!(err("other_port"), "Address already in use", "another socket of the launcher is not given out");
        for k in ["taken", "taken_listen", "rebind", "plain", "v6", "port0", "udp", "unix", "own_listen"] {
            assert_eq!(call(v, k), (0, None), "slot {slot}: {k}: {v}");
        }
        // Taken over: the slot's own socket (its fd 3's), never the other slot's, every time.
        let mut taken = vec!["taken_ino", "plain_ino", "v6_ino"];
        match v.get("mptcp").and_then(Value::as_str) {
            Some(unsupported) => eprintln!("MPTCP not tested here: {unsupported}"),
            None => {
                assert_eq!(call(v, "mptcp"), (0, None), "an MPTCP socket is taken over like a TCP one");
                taken.push("mptcp_ino");
            }
        }
        for k in taken {
            assert_eq!(num(v, k), fd3, "slot {slot}: {k}");
            assert_ne!(num(v, k), other, "slot {slot}: {k} is the other slot's socket");
        }
        // With the caller's fd flags.
        let flags = |k: &str| {
            (v.get(k).and_then(|f| f.get("nonblock")).cloned(), v.get(k).and_then(|f| f.get("cloexec")).cloned())
        };
        assert_eq!(flags("taken_flags"), (Some(Value::Bool(true)), Some(Value::Bool(true))));
        assert_eq!(flags("plain_flags"), (Some(Value::Bool(false)), Some(Value::Bool(false))));
        // Left to the kernel: sockets of the worker's own.
        for k in ["port0_ino", "udp_ino", "other_ino"] {
            assert!(!ours.contains(&num(v, k)), "slot {slot}: {k} is a launcher socket");
        }
        assert_ne!(num(v, "port0_port"), u64::from(l.port()));
    }
    // Its listen(1) did not shrink the backlog; the workers serve on what they got.
    wait_intercepted(&l, &dir, 2);
    check_sockets(&l, &dir, 1);
    let answers = l.poll_answers(secs(30), |r| distinct_pids(r) == 2);
    assert_eq!(distinct_pids(&answers), 2);
    assert!(num(&status_of(&dir), "intercepted_listens") >= 2);
}

/// A worker whose bind() address lies on a page nobody can read (its own userfaultfd, faults
/// never served) holds the interceptor's thread; the loop is never held (status answers), and
/// after 2 s it kills that worker, which ends the wait: the other slot's new worker binds.
#[test]
fn a_worker_whose_bind_holds_the_interceptor_is_killed() {
    let dir = TempPath::dir("intercept");
    let l = launch(2, &dir).cmd(&["python3", &worker("binder.py"), "trap"]).start();
    wait_intercepted(&l, &dir, 2);
    let trapper = l.latest_pid(0);
    signal(trapper, Signal::SIGUSR1);
    // While it holds the thread: the loop answers, and a bind of another worker waits.
    let other = l.latest_pid(1);
    assert_eq!(text(&status_of(&dir), "intercept_bind"), "on");
    signal(other, Signal::SIGKILL);
    l.wait_for(&format!("(pid {trapper}, gen 1) has held the bind() interceptor for"), secs(20));
    l.wait_replacement(0, trapper, secs(30));
    l.wait_replacement(1, other, secs(30));
    wait_intercepted(&l, &dir, 2);
    l.poll_answers(secs(30), |r| distinct_pids(r) == 2);
}

/// `setpriv` without CAP_SYS_PTRACE in the bounding set: a root launcher then cannot read the
/// memory of a `--user` worker (Docker's default). The probe runs as the worker would, so `on`
/// refuses to start, naming the cause, and `auto` says so and goes on without.
#[test]
fn without_cap_sys_ptrace_a_user_workers_bind_cannot_be_served_and_the_probe_says_so() {
    let no_ptrace = ["setpriv", "--bounding-set", "-sys_ptrace"];
    let mut l = Launch::new()
        .workers(1)
        .via(&no_ptrace)
        .flag("--user", "nobody")
        .flag("--intercept-bind", "on")
        .cmd(&["/usr/bin/python3", PYWORKER])
        .spawn();
    assert_eq!(l.exit_code(secs(30)), 1, "{}", l.log());
    let log = l.log();
    assert!(log.contains("--intercept-bind on:") && log.contains("process_vm_readv"), "{log}");
    let l = Launch::new()
        .workers(1)
        .ready_delay("300ms")
        .via(&no_ptrace)
        .flag("--user", "nobody")
        .cmd(&["/usr/bin/python3", PYWORKER])
        .start();
    wait_fields(&l, secs(30), "intercept_bind unavailable", |s| {
        s.get("intercept_bind").and_then(|v| v.as_str()).is_some_and(|v| v.starts_with("unavailable: "))
    });
    l.poll_answers(secs(30), |r| !r.is_empty());
}

#[test]
fn a_worker_flooding_bind_and_listen_delays_no_other_slot_nor_the_loop() {
    let dir = TempPath::dir("intercept");
    let out = TempPath::dir("flood");
    let path = format!("{}/calls", out.str());
    let l = launch(2, &dir).cmd(&["python3", &worker("binder.py"), "flood", &path]).start();
    wait_intercepted(&l, &dir, 2);
    // Slot 0's flood goes on throughout (slot 1's worker floods too, until it is killed).
    let calls = || {
        let text = std::fs::read_to_string(format!("{path}.0")).unwrap_or_default();
        crate::control::json::parse(&text).ok().map(|v| num(&v, "calls")).unwrap_or(0)
    };
    let before = calls();
    assert!(wait_until(secs(10), || calls() > before + 1000), "the flood is not flooding");
    // Slot 1's worker dies; its replacement's bind must get through while slot 0 floods on.
    let old = l.latest_pid(1);
    signal(old, Signal::SIGKILL);
    let new = l.wait_replacement(1, old, secs(30));
    let s = wait_intercepted(&l, &dir, 2);
    assert!(rows(&s).iter().any(|w| w.get("pid").and_then(Value::as_u64) == Some(new as u64)));
    l.poll_answers(secs(30), |r| r.iter().any(|r| r.pid == new));
    let during = calls();
    assert!(during > before + 1000, "flood calls {before} -> {during}");
    eprintln!("slot 1 came back while slot 0 made {} bind/listen calls", during - before);
    for _ in 0..10 {
        assert_eq!(text(&status_of(&dir), "intercept_bind"), "on");
    }
}

#[test]
fn a_server_that_binds_then_forks_shares_the_slots_socket() {
    let dir = TempPath::dir("intercept");
    let l = launch(1, &dir).cmd(&["python3", &worker("binder.py"), "prefork", "3"]).start();
    wait_intercepted(&l, &dir, 1);
    let seen = l.poll_answers(secs(60), |r| distinct_pids(r) >= 2);
    let master = l.latest_pid(0);
    let ours: BTreeSet<u64> = socket_fds(l.pid()).into_iter().map(|(_, i)| i).collect();
    for pid in seen.iter().map(|r| r.pid).collect::<BTreeSet<_>>() {
        assert_ne!(pid, master, "the master only waits");
        assert!(
            socket_fds(pid).iter().any(|(fd, i)| *fd > 3 && ours.contains(i)),
            "child {pid}: {:?}",
            fd_targets(pid)
        );
    }
    check_sockets(&l, &dir, 1);
}

#[test]
fn a_killed_launcher_leaves_nothing_of_a_bind_then_fork_tree() {
    let dir = TempPath::dir("intercept");
    let mut l = launch(1, &dir).cmd(&["python3", &worker("binder.py"), "prefork", "3"]).start();
    wait_intercepted(&l, &dir, 1);
    let seen = l.poll_answers(secs(60), |r| distinct_pids(r) >= 2);
    let mut tree: Vec<Proc> = seen.iter().map(|r| Proc::of(r.pid)).collect();
    tree.push(Proc::of(l.latest_pid(0)));
    assert!(tree.iter().all(Proc::alive));
    l.signal(Signal::SIGKILL);
    assert!(l.wait_exit(secs(10)).is_some());
    let gone = wait_until(secs(10), || tree.iter().all(|p| !p.alive()));
    assert!(gone, "left alive: {:?}", tree.iter().filter(|p| p.alive()).map(|p| p.pid).collect::<Vec<_>>());
}

#[test]
fn a_crashed_workers_queue_waits_for_its_replacement() {
    let dir = TempPath::dir("intercept");
    let l = node_server(1, "reuseport", &dir);
    wait_intercepted(&l, &dir, 1);
    let old = l.latest_pid(0);
    signal(old, Signal::SIGSTOP);
    let mut queued = TcpStream::connect(("127.0.0.1", l.port())).unwrap();
    send_request(&mut queued).unwrap();
    signal(old, Signal::SIGKILL);
    let new = l.wait_replacement(0, old, secs(30));
    let r = read_reply(&mut queued).expect("the queued connection is answered");
    assert_eq!(r.pid, new, "answered by the replacement, which bound the port itself");
}

#[test]
fn scale_up_and_down_under_load() {
    let dir = TempPath::dir("intercept");
    let l = node_server(2, "reuseport", &dir);
    wait_intercepted(&l, &dir, 2);
    let load = Load::start(l.port(), 3);
    let client = |args: &[&str]| {
        let out = Command::new(BIN).args(args).args(["--control", &control(&dir)]).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    client(&["scale", "4"]);
    wait_intercepted(&l, &dir, 4);
    l.poll_answers(secs(30), |r| r.iter().any(|r| r.slot == "3"));
    client(&["scale", "1"]);
    wait_fields(&l, secs(60), "slot 1 removed: only slot 0 has a row", |s| slots(s) == [0]);
    let (ok, failures) = load.finish();
    assert!(failures.is_empty(), "{} of {ok} failed while scaling: {failures:?}", failures.len());
    check_sockets(&l, &dir, 1);
}

#[test]
fn a_bind_after_a_reexec_is_served_by_the_new_image() {
    let dir = TempPath::dir("intercept");
    let out = TempPath::new("again.json");
    let l = launch(2, &dir).cmd(&["python3", &worker("binder.py"), "again", out.str()]).start();
    wait_intercepted(&l, &dir, 2);
    let image = text(&status_of(&dir), "image").to_string();
    let pids = worker_pids(&dir);
    let reexec = Command::new(BIN).args(["reexec", "--control", &control(&dir)]).output().unwrap();
    assert!(reexec.status.success(), "{}", String::from_utf8_lossy(&reexec.stderr));
    wait_status(&l, &["--control", &control(&dir)], secs(30), "the new image", |s| text(s, "image") != image);
    assert_eq!(worker_pids(&dir), pids, "the workers stayed");
    // A worker started before the reexec binds again: the new image answers through the
    // notification fd the old one handed over.
    signal(pids[0], Signal::SIGUSR1);
    let v = probe_results(out.str());
    assert_eq!(call(&v, "bind"), (0, None), "{v}");
    assert_eq!(num(&v, "ino"), num(&v, "first_ino"));
    // A worker started after it too (a crash respawn).
    signal(pids[1], Signal::SIGKILL);
    let new = l.wait_replacement(1, pids[1], secs(30));
    l.poll_answers(secs(30), |r| r.iter().any(|r| r.pid == new));
}

/// A worker that keeps binding while the launcher re-executes itself: calls made while the old
/// image stops its thread wait in the notification fd for the new image; none fails, none hangs.
#[test]
fn binds_made_across_a_reexec_all_succeed() {
    let dir = TempPath::dir("intercept");
    let out = TempPath::new("loop.json");
    let l = launch(1, &dir).cmd(&["python3", &worker("binder.py"), "loop", out.str()]).start();
    wait_intercepted(&l, &dir, 1);
    let ok = || crate::control::json::parse(&std::fs::read_to_string(&out).unwrap_or_default()).ok();
    assert!(wait_until(secs(30), || ok().is_some_and(|v| num(&v, "ok") >= 50)), "the worker is not binding");
    let image = text(&status_of(&dir), "image").to_string();
    let reexec = Command::new(BIN).args(["reexec", "--control", &control(&dir)]).output().unwrap();
    assert!(reexec.status.success(), "{}", String::from_utf8_lossy(&reexec.stderr));
    wait_status(&l, &["--control", &control(&dir)], secs(30), "the new image", |s| text(s, "image") != image);
    let at_reexec = ok().map(|v| num(&v, "ok")).unwrap();
    let going_on = wait_until(secs(30), || ok().is_some_and(|v| num(&v, "ok") >= at_reexec + 200));
    let v = ok().unwrap();
    assert!(going_on, "binds stopped after the reexec: {v}");
    let failures = v.get("failures").and_then(Value::as_array).unwrap();
    assert!(failures.is_empty(), "binds failed across the reexec: {v}");
    eprintln!("{} binds, the slowest {:.1} ms", num(&v, "ok"), v.get("slowest_ms").and_then(Value::as_f64).unwrap());
}

#[test]
fn without_cap_sys_admin_workers_run_with_no_new_privs() {
    let field = |pid: i32| {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status.lines().find_map(|l| l.strip_prefix("NoNewPrivs:")).map(|v| v.trim().to_string()).unwrap()
    };
    // With CAP_SYS_ADMIN (as the test runs, as root) the filter is installed without it.
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let caps = status.lines().find_map(|l| l.strip_prefix("CapEff:")).unwrap();
    let sys_admin = u64::from_str_radix(caps.trim(), 16).unwrap() & (1 << 21) != 0;
    let dir = TempPath::dir("intercept");
    let l = node_server(1, "reuseport", &dir);
    wait_intercepted(&l, &dir, 1);
    assert_eq!(field(l.latest_pid(0)), if sys_admin { "0" } else { "1" });
    drop(l);
    // As nobody: no_new_privs, and still intercepted.
    let l = Launch::new()
        .workers(1)
        .ready_delay("300ms")
        .flag("--intercept-bind", "on")
        .via(&["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .cmd(&["/usr/bin/python3", &worker("binder.py"), "again", "/dev/null"])
        .start();
    l.wait_for("got the slot's socket", secs(30));
    l.wait_for("no_new_privs", secs(1));
    let r = l.poll_answers(secs(30), |r| !r.is_empty());
    assert_eq!(field(r[0].pid), "1");
}

/// A launcher inside another one's worker tree: the kernel allows one seccomp listener per
/// process tree, so the inner launcher's probe fails (EBUSY). With `auto` it says so in one
/// line, with the hint, and its fd-3 workers serve (on the outer's socket, which it adopts as
/// LISTEN_FDS); with `on` it refuses to start, naming the cause.
#[test]
fn a_launcher_under_another_ones_filter_says_why_and_goes_on_without() {
    let inner_bind = "127.0.0.1:1"; // ignored: it adopts the outer one's socket (LISTEN_FDS)
    let dir = TempPath::dir("intercept");
    let inner = [BIN, "-n", "1", "-b", inner_bind, "--ready-delay", "300ms", "--", "python3", PYWORKER];
    let l = launch(1, &dir).cmd(&inner).start();
    l.wait_for("bind() interception is unavailable", secs(30));
    let log = l.log();
    assert!(
        log.contains("already runs under a seccomp notifier") || log.contains("itself runs under a seccomp notifier"),
        "{log}"
    );
    assert!(log.contains("workers must use the inherited listening sockets (fd 3 and up, LISTEN_FDS)"), "{log}");
    let inner_worker = l.poll_answers(secs(30), |r| !r.is_empty())[0].pid;
    let outer_workers: Vec<i32> = children_of(l.pid()).iter().map(|p| p.pid).collect();
    assert!(
        !outer_workers.contains(&inner_worker),
        "answered by the inner launcher's own worker, not {outer_workers:?}"
    );
    drop(l);
    let refused = [BIN, "-n", "1", "-b", inner_bind, "--intercept-bind", "on", "--", "python3", PYWORKER];
    let dir = TempPath::dir("intercept");
    let l = launch(1, &dir).flag("--max-start-failures", "1").cmd(&refused).start();
    l.wait_for("--intercept-bind on: the launcher itself runs under a seccomp notifier", secs(30));
}
