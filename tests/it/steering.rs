//! Where new connections go (issue 8): sticky by client address (`--steer ip`), by the CPU
//! that took the connection in (`--steer cpu`, with workers pinned), and nothing stranded on a
//! deadlocked worker (its queued connections are taken back and relayed).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

use socket2::{Domain, Socket, Type};

use crate::common::*;
use crate::status_fields::*;

/// `GET /` on a new connection from source address `from`; the answering worker's pid.
fn get_from(from: [u8; 4], port: u16) -> i32 {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    s.bind(&SocketAddr::from((from, 0)).into()).unwrap();
    s.connect(&SocketAddr::from(([127, 0, 0, 1], port)).into()).unwrap();
    let mut s: TcpStream = s.into();
    s.set_read_timeout(Some(secs(10))).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    pid_in(&text)
}

fn pid_in(text: &str) -> i32 {
    let at = text.find("pid=").unwrap_or_else(|| panic!("no pid in {text:?}")) + 4;
    text[at..].split(' ').next().unwrap().parse().unwrap()
}

#[test]
fn ip_steering_is_sticky_per_source_address() {
    let l = Launch::new().workers(4).ready("auto").args(&["--steer", "ip"]).py(&[]).start();
    wait_all_ready(&l, 4, secs(20));
    let port = l.port();
    let mut by_source: BTreeMap<u8, BTreeSet<i32>> = BTreeMap::new();
    for last in 2..=21u8 {
        for _ in 0..10 {
            by_source.entry(last).or_default().insert(get_from([127, 0, 0, last], port));
        }
    }
    for (last, pids) in &by_source {
        assert_eq!(pids.len(), 1, "127.0.0.{last} was answered by {pids:?}");
    }
    let workers: BTreeSet<i32> = by_source.values().flatten().copied().collect();
    assert!(workers.len() >= 2, "20 addresses all went to {workers:?}");
    // A worker that stops serving moves only its own clients, and they stay together on
    // their new worker. Stopped: its queued connection is relayed, and it leaves the set.
    let (&moved_source, stopped) = by_source.iter().map(|(s, p)| (s, *p.iter().next().unwrap())).next().unwrap();
    signal(stopped, nix::sys::signal::Signal::SIGSTOP);
    let relayed = get_from([127, 0, 0, moved_source], port);
    assert_ne!(relayed, stopped);
    wait_stalled(&l, stopped);
    for (last, pids) in &by_source {
        let before = *pids.iter().next().unwrap();
        let now: BTreeSet<i32> = (0..5).map(|_| get_from([127, 0, 0, *last], port)).collect();
        if before == stopped {
            assert!(!now.contains(&stopped) && now.len() == 1, "127.0.0.{last}: {now:?}");
        } else {
            assert_eq!(now, BTreeSet::from([before]), "127.0.0.{last} moved although its worker kept serving");
        }
    }
    signal(stopped, nix::sys::signal::Signal::SIGCONT);
}

/// The CPU a process last ran on (/proc/PID/stat field 39) and the CPUs it may run on.
fn cpu_of(pid: i32) -> (usize, String) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    // Field 39 of the whole line is the 37th after "pid (comm)".
    let last: usize = fields[36].parse().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let allowed = status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:")).unwrap().trim().to_string();
    (last, allowed)
}

#[test]
fn cpu_steering_answers_from_the_worker_pinned_to_the_cpu() {
    let cpus: Vec<usize> = {
        let set = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).unwrap();
        (0..nix::sched::CpuSet::count()).filter(|c| set.is_set(*c).unwrap()).collect()
    };
    assert!(cpus.len() >= 2, "this test needs 2 CPUs to tell workers apart, the test process may use {cpus:?}");
    let l = Launch::new().workers(2).ready("auto").args(&["--steer", "cpu"]).py(&[]).start();
    wait_all_ready(&l, 2, secs(20));
    let port = l.port();
    let mut pinned = BTreeMap::new();
    for w in l.started() {
        let (_, allowed) = cpu_of(w.pid);
        let cpu: usize = allowed.parse().unwrap_or_else(|_| panic!("worker {w} is not pinned to one CPU: {allowed}"));
        assert_eq!(cpu, cpus[w.slot]);
        pinned.insert(cpu, w.pid);
    }
    for (&cpu, &pid) in pinned.iter() {
        let mut only = nix::sched::CpuSet::new();
        only.set(cpu).unwrap();
        // Pin this thread: on loopback the SYN is taken in on the sending CPU.
        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &only).unwrap();
        let answers: Vec<i32> = (0..20).map(|_| get(port).unwrap().pid).collect();
        assert!(answers.iter().all(|p| *p == pid), "from CPU {cpu}: {answers:?}, expected {pid}");
        assert_eq!(cpu_of(pid).0, cpu, "worker {pid} last ran elsewhere");
    }
    let mut all = nix::sched::CpuSet::new();
    cpus.iter().for_each(|c| all.set(*c).unwrap());
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &all).unwrap();
}

/// A worker that deadlocks (alive, no CPU, never accepts again) would keep every connection
/// queued on its socket forever. The launcher notices, steers new connections away and relays
/// the queued ones: every request is answered while the worker is still deadlocked.
#[test]
fn a_deadlocked_worker_strands_nothing() {
    let flags = TempPath::dir("deadlock");
    let hang = format!("{}/hang-{{slot}}", flags.str());
    let l = Launch::new().workers(2).ready("auto").grace("1s").py(&["--hang-if-file", &hang]).start();
    wait_all_ready(&l, 2, secs(20));
    let port = l.port();
    std::fs::write(format!("{}/hang-1", flags.str()), "").unwrap();
    let stuck = l.started().iter().find(|w| w.slot == 1).unwrap().pid;
    let stuck_proc = Proc::of(stuck);
    // Every one of these is made before the launcher can know: some land in slot 1's queue.
    let sent = std::time::Instant::now();
    let pending: Vec<TcpStream> = (0..30)
        .map(|_| {
            let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
            send_request(&mut s).unwrap();
            s
        })
        .collect();
    for (i, mut s) in pending.into_iter().enumerate() {
        s.set_read_timeout(Some(secs(10))).unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap_or_else(|e| panic!("request {i} stranded: {e}"));
        assert!(text.starts_with("HTTP/1.1 200"), "request {i}: {text:?}");
        assert_ne!(pid_in(&text), stuck, "request {i} answered by the deadlocked worker");
    }
    // A figure for the record, not a limit (the machine is shared): how long the last waited.
    eprintln!("all 30 answered {:?} after they were sent", sent.elapsed());
    l.wait_for(&format!("(pid {stuck}, gen 1) is not running"), secs(10));
    assert!(stuck_proc.alive(), "the deadlocked worker is still there, still stuck");
}

/// `--steer least-loaded`: new connections go mostly to the worker that keeps up, and a worker
/// that is fast again gets its share back within a few samples. Compared in the same test with
/// `--steer hash`, which sends every second connection to the slow worker whatever it does.
#[test]
fn least_loaded_favours_the_worker_that_keeps_up() {
    let flags = TempPath::dir("slow");
    let slow = format!("{}/slow-{{slot}}", flags.str());
    let slow1 = format!("{}/slow-1", flags.str());
    // The share of requests answered by slot 1 over `span`, 8 clients on new connections.
    let share = |l: &Launcher, span: std::time::Duration| -> (f64, usize) {
        let end = std::time::Instant::now() + span;
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let port = l.port();
                std::thread::spawn(move || {
                    let (mut one, mut all) = (0usize, 0usize);
                    while std::time::Instant::now() < end {
                        if let Ok(r) = get(port) {
                            all += 1;
                            one += usize::from(r.slot == "1");
                        }
                    }
                    (one, all)
                })
            })
            .collect();
        let (one, all) = threads.into_iter().map(|t| t.join().unwrap()).fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
        (one as f64 / all.max(1) as f64, all)
    };
    let run = |steer: &str| -> (f64, f64) {
        std::fs::write(&slow1, "").unwrap();
        let l = Launch::new()
            .workers(2)
            .ready("auto")
            .args(&["--steer", steer])
            .py(&["--handle-delay", "0.4", "--slow-if-file", &slow])
            .start();
        wait_all_ready(&l, 2, secs(20));
        let (slow_share, n) = share(&l, secs(3));
        assert!(n > 20, "{steer}: only {n} requests");
        std::fs::remove_file(&slow1).unwrap();
        // A few sampling periods (20 ms each) later, and over a while: slot 1 is as fast again.
        let (fast_share, m) = share(&l, secs(2));
        assert!(m > 20, "{steer}: only {m} requests");
        (slow_share, fast_share)
    };
    let (hash_slow, _) = run("hash");
    let (ll_slow, ll_fast) = run("least-loaded");
    eprintln!("slot 1's share while slow: hash {hash_slow:.2}, least-loaded {ll_slow:.2}; fast again: {ll_fast:.2}");
    assert!(hash_slow > 0.3, "hash sends the slow slot its half: {hash_slow:.2}");
    assert!(
        // Alone 0.08-0.20 against hash's 0.5; a loaded machine samples less often: a margin.
        ll_slow < hash_slow * 0.8,
        "least-loaded spared the slow slot too little: {ll_slow:.2} vs hash {hash_slow:.2}"
    );
    assert!(ll_fast > 0.3, "least-loaded did not give the fast-again slot its share back: {ll_fast:.2}");
}
