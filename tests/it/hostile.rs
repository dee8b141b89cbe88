//! Clients that misbehave (issue 19): idle connections, slowloris clients, floods of scrapes,
//! oversized and binary requests on the `--metrics` port, idle clients filling the control
//! socket. What is checked is what probes, scrapers and the workers' clients live through:
//! `/healthz` keeps answering 200 within the 0.5 s, `/metrics` keeps answering, the
//! workers' steady load fails nothing, and every fd the launcher took comes back.
//!
//! The misbehaving clients ([`Hostile`]) run on threads of this test process, reconnect when
//! the launcher closes them, stop by themselves after a time limit, and are stopped and joined
//! when dropped, so a failing test leaves none behind.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::common::*;
use crate::fleet::{http_get, metrics_addr};
use crate::status_fields::*;

/// This process's RLIMIT_NOFILE soft limit raised to the hard one (hundreds of clients).
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    }
    let (soft, _) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    assert!(soft >= 2048, "these tests need 2048 fds; RLIMIT_NOFILE is {soft} (raise the hard limit)");
}

/// How many fds process `pid` has open.
fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count()
}

/// The launcher's fd count with no connection to its metrics port `addr` open (the probes of
/// the start-up linger until their clients close them): counted while our own scrape is the
/// only connection the endpoint reports, less that one.
fn quiet_fds(l: &Launcher, addr: SocketAddr) -> usize {
    let end = Instant::now() + secs(20);
    loop {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(secs(10))).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
        let mut page = String::new();
        s.read_to_string(&mut page).unwrap();
        let with_ours = fd_count(l.pid());
        drop(s);
        let open = sample(&page, "reuse_launch_metrics_connections");
        if open == 1.0 {
            fds_return_to(l, with_ours - 1);
            return with_ours - 1;
        }
        assert!(Instant::now() < end, "{open} connections to {addr} stay open");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Wait until the launcher has `baseline` fds again (every connection released).
fn fds_return_to(l: &Launcher, baseline: usize) {
    let mut now = fd_count(l.pid());
    let ok = wait_until(secs(30), || {
        now = fd_count(l.pid());
        now == baseline
    });
    assert!(ok, "the launcher holds {now} fds, {baseline} before the clients: {:?}", fd_targets(l.pid()));
}

/// The value of the sample line `name` (with its labels, as written) in a `/metrics` answer.
fn sample(text: &str, name: &str) -> f64 {
    let line = text.lines().find(|l| l.strip_prefix(name).is_some_and(|r| r.starts_with(' ')));
    let line = line.unwrap_or_else(|| panic!("no sample {name} in:\n{text}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

/// `GET path` timed from connect to the last byte.
fn timed_get(addr: SocketAddr, path: &str) -> (u16, String, Duration) {
    let t = Instant::now();
    let (status, body) = http_get(addr, path).unwrap_or_else(|e| panic!("GET {path}: {e}"));
    (status, body, t.elapsed())
}

/// Misbehaving clients on threads (module docs).
struct Hostile {
    stop: Arc<AtomicBool>,
    /// Connections the launcher closed (and that were opened again).
    closed: Arc<AtomicUsize>,
    /// Of those, how many got a 408 first.
    timeouts: Arc<AtomicUsize>,
    threads: Vec<JoinHandle<()>>,
}

/// One misbehaving connection: its socket, and for a slow one what it sent so far.
struct Slot {
    s: Option<TcpStream>,
    sent: usize,
    next: Instant,
}

const SLOW_REQUEST: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: slowloris\r\nX-Padding: aaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";

impl Hostile {
    fn new() -> Hostile {
        Hostile { stop: Arc::default(), closed: Arc::default(), timeouts: Arc::default(), threads: Vec::new() }
    }

    /// `n` connections on `addr` that send nothing (`pace` None) or one byte of a request
    /// every `pace`; each is opened again when the launcher closes it. They stop after `limit`.
    fn add(mut self, addr: SocketAddr, n: usize, pace: Option<Duration>, limit: Duration) -> Hostile {
        let (stop, closed, timeouts) = (self.stop.clone(), self.closed.clone(), self.timeouts.clone());
        let end = Instant::now() + limit;
        self.threads.push(std::thread::spawn(move || {
            let connect = || {
                let s = TcpStream::connect_timeout(&addr, secs(5)).ok()?;
                s.set_nonblocking(true).ok()?;
                Some(s)
            };
            let mut slots: Vec<Slot> = (0..n)
                .map(|i| Slot {
                    s: connect(),
                    sent: 0,
                    next: Instant::now() + pace.unwrap_or_default() * i as u32 / n as u32,
                })
                .collect();
            let mut buf = [0u8; 512];
            while !stop.load(Ordering::Relaxed) && Instant::now() < end {
                let now = Instant::now();
                for slot in &mut slots {
                    let Some(s) = &mut slot.s else {
                        *slot = Slot { s: connect(), sent: 0, next: now + pace.unwrap_or_default() };
                        continue;
                    };
                    let gone = match s.read(&mut buf) {
                        Ok(0) => true,
                        Ok(k) => {
                            if buf[..k].starts_with(b"HTTP/1.1 408 ") {
                                timeouts.fetch_add(1, Ordering::Relaxed);
                            }
                            true
                        }
                        Err(e) => e.kind() != ErrorKind::WouldBlock,
                    };
                    let wrote = match pace {
                        Some(pace) if !gone && now >= slot.next && slot.sent < SLOW_REQUEST.len() => {
                            slot.next = now + pace;
                            slot.sent += 1;
                            s.write(&SLOW_REQUEST[slot.sent - 1..slot.sent]).is_ok()
                        }
                        _ => true,
                    };
                    if gone || !wrote {
                        closed.fetch_add(1, Ordering::Relaxed);
                        slot.s = None;
                    }
                }
                // The hostile clients' pace (the scenario), not a wait for a condition.
                std::thread::sleep(Duration::from_millis(50));
            }
        }));
        self
    }

    fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Hostile {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A launcher of 2 python workers with `--metrics`, every worker ready.
fn launch() -> (Launcher, SocketAddr) {
    let l = Launch::new().workers(2).ready("auto").flag("--metrics", "127.0.0.1:0").py(&[]).start();
    let addr = metrics_addr(&l);
    wait_all_ready(&l, 2, secs(30));
    assert!(wait_until(secs(10), || http_get(addr, "/readyz").is_ok_and(|r| r.0 == 200)));
    (l, addr)
}

#[test]
fn probes_and_scrapes_answer_beside_300_idle_and_50_slowloris_clients() {
    raise_fd_limit();
    let (l, addr) = launch();
    let workers = l.started_pids();
    let load = Load::start(l.port(), 2);
    assert!(wait_until(secs(10), || get(l.port()).is_ok()));
    let baseline = quiet_fds(&l, addr);

    let mut hostile = Hostile::new().add(addr, 300, None, secs(180)).add(addr, 50, Some(secs(1)), secs(180));
    let mut held = 0;
    let ok = wait_until(secs(30), || {
        held = fd_count(l.pid()) - baseline;
        held >= 330
    });
    assert!(ok, "only {held} hostile connections reached the launcher");
    // The slowloris clients are on: cut off at their deadline and back, twice each on average.
    let cut = wait_until(secs(30), || hostile.timeouts.load(Ordering::Relaxed) >= 100);
    assert!(cut, "{} slowloris connections got a 408", hostile.timeouts.load(Ordering::Relaxed));

    let probes: Vec<(u16, String, Duration)> = (0..10).map(|_| timed_get(addr, "/healthz")).collect();
    eprintln!("10 /healthz beside {held} hostile connections: {:?}", probes.iter().map(|p| p.2).collect::<Vec<_>>());
    for (status, body, took) in &probes {
        assert_eq!((*status, body.as_str()), (200, "ok\n"));
        assert!(*took < Duration::from_millis(500), "a /healthz took {took:?}: {probes:?}");
    }
    let (status, body, _) = timed_get(addr, "/readyz");
    assert_eq!((status, body.as_str()), (200, "ready: 2 of 2 workers ready (need 2)\n"));
    let (status, body, _) = timed_get(addr, "/metrics");
    assert_eq!(status, 200, "{body}");
    assert!(sample(&body, "reuse_launch_metrics_connections") >= 330.0, "{body}");
    assert!(sample(&body, "reuse_launch_metrics_closed_total{reason=\"timeout\"}") >= 50.0);

    // 64 scrapes at once, the hostile clients still there.
    let scrapes: Vec<_> = (0..64).map(|_| std::thread::spawn(move || http_get(addr, "/metrics"))).collect();
    let answers: Vec<_> = scrapes.into_iter().map(|t| t.join().unwrap()).collect();
    let good = answers
        .iter()
        .filter(|a| a.as_ref().is_ok_and(|(s, b)| *s == 200 && b.contains("reuse_launch_workers{")))
        .count();
    assert_eq!(good, 64, "{:?}", answers.iter().filter(|a| !a.as_ref().is_ok_and(|a| a.0 == 200)).collect::<Vec<_>>());
    let still = fd_count(l.pid()) - baseline;
    assert!(
        still >= 330,
        "the hostile clients were gone during the scrapes ({still} connections; {} fds, {} before; {} cut off)",
        fd_count(l.pid()),
        baseline,
        hostile.closed.load(Ordering::Relaxed)
    );
    assert!(timed_get(addr, "/healthz").0 == 200);

    let closed = hostile.closed.load(Ordering::Relaxed);
    hostile.stop();
    fds_return_to(&l, baseline);
    let (ok, failures) = load.finish();
    assert!(failures.is_empty(), "{} of {ok} requests to the workers failed: {failures:?}", failures.len());
    assert_eq!(l.started_pids(), workers, "no worker was replaced");
    eprintln!("{ok} requests to the workers, 0 failed; {closed} hostile connections cut off and reopened");
}

#[test]
fn oversized_and_binary_requests_get_an_error_and_change_nothing() {
    let (l, addr) = launch();
    let workers = l.started_pids();
    let load = Load::start(l.port(), 2);
    assert!(wait_until(secs(10), || get(l.port()).is_ok()));
    let baseline = quiet_fds(&l, addr);
    let exchange = |bytes: &[u8]| {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(secs(20))).unwrap();
        s.write_all(bytes).unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).unwrap();
        String::from_utf8_lossy(&out).into_owned()
    };
    let line = [b"GET /".as_slice(), &vec![b'a'; 200 * 1024], b" HTTP/1.1\r\nHost: x\r\n\r\n"].concat();
    let got = exchange(&line);
    assert!(got.starts_with("HTTP/1.1 414 URI Too Long\r\n"), "{got:?}");
    assert!(got.ends_with("request line longer than 4096 bytes\n"), "{got:?}");
    let mut garbage: Vec<u8> = (0..64 * 1024u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    garbage[0] = 0x16; // a TLS record header first, as a client speaking HTTPS sends
    let got = exchange(&garbage);
    assert!(got.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{got:?}");
    let headers =
        [b"GET /healthz HTTP/1.1\r\n".as_slice(), &b"X-Fill: 0123456789abcdef\r\n".repeat(1000), b"\r\n"].concat();
    let got = exchange(&headers);
    assert!(got.starts_with("HTTP/1.1 431 "), "{got:?}");
    let got = exchange(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(got.starts_with("HTTP/1.1 200 OK\r\n") && got.ends_with("\r\n\r\nok\n"), "{got:?}");
    let (status, body) = http_get(addr, "/metrics").unwrap();
    assert_eq!(status, 200);
    assert_eq!(sample(&body, "reuse_launch_metrics_closed_total{reason=\"invalid\"}"), 3.0, "{body}");
    fds_return_to(&l, baseline);
    let (ok, failures) = load.finish();
    assert!(failures.is_empty(), "{} of {ok} requests to the workers failed: {failures:?}", failures.len());
    assert_eq!(l.started_pids(), workers, "no worker was replaced");
}

#[test]
fn at_the_cap_the_oldest_idle_connection_is_closed_and_a_probe_gets_in() {
    raise_fd_limit();
    let (l, addr) = launch();
    let (_, body) = http_get(addr, "/metrics").unwrap();
    let cap = sample(&body, "reuse_launch_metrics_connections_max") as usize;
    assert_eq!(cap, 1024, "the launcher's fd limit allows the full cap");
    let baseline = quiet_fds(&l, addr);
    let mut idle: Vec<TcpStream> = (0..cap).map(|_| TcpStream::connect(addr).unwrap()).collect();
    let mut taken = 0;
    let all = wait_until(secs(10), || {
        taken = fd_count(l.pid()) - baseline;
        taken == cap
    });
    assert!(all, "{taken} of the {cap} connections were taken");
    let (status, body, _) = timed_get(addr, "/healthz");
    assert_eq!((status, body.as_str()), (200, "ok\n"), "a probe gets in at the cap");
    // The one closed to make room is the oldest.
    idle[0].set_read_timeout(Some(secs(10))).unwrap();
    let mut got = String::new();
    let _ = idle[0].read_to_string(&mut got);
    assert!(got.starts_with("HTTP/1.1 503 ") && got.contains("idle longest"), "{got:?}");
    for s in &idle[cap - 10..] {
        s.set_nonblocking(true).unwrap();
        let e = (&*s).read(&mut [0u8; 8]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::WouldBlock, "a newer idle connection stays open");
    }
    idle.clear();
    fds_return_to(&l, baseline);
}

/// Connect to the control socket at `path` and send `bytes`.
fn control_client(path: &str, bytes: &[u8]) -> UnixStream {
    let mut s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(secs(20))).unwrap();
    s.write_all(bytes).unwrap();
    s
}

fn control_line(s: &UnixStream) -> String {
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    line
}

#[test]
fn control_clients_past_the_cap_close_the_one_idle_longest() {
    let dir = TempPath::dir("hostile-control");
    let path = dir.join("c.sock").to_str().unwrap().to_string();
    let l = Launch::new().workers(1).ready("auto").flag("--control", &path).py(&[]).start();
    wait_all_ready(&l, 1, secs(30));
    let status = b"{\"cmd\":\"status\"}\n";
    // 32 clients, each answered once and then idle, the first one idle longest.
    let idle: Vec<UnixStream> = (0..32)
        .map(|_| {
            let s = control_client(&path, status);
            assert!(control_line(&s).contains("\"ok\":true"));
            s
        })
        .collect();
    let mut late = control_client(&path, status);
    let answer = control_line(&late);
    assert!(answer.contains("\"ok\":true"), "a 33rd client is served: {answer}");
    let mut evicted = String::new();
    let _ = (&idle[0]).read_to_string(&mut evicted);
    assert!(evicted.contains("\"ok\":false") && evicted.contains("idle longest"), "{evicted:?}");
    // The others stay connected and served.
    (&idle[31]).write_all(status).unwrap();
    assert!(control_line(&idle[31]).contains("\"ok\":true"));
    late.write_all(status).unwrap();
    assert!(control_line(&late).contains("\"ok\":true"));
}
