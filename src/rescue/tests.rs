//! Unit tests of [`Rescue`](super::Rescue): real listeners whose worker does not accept,
//! a target server, and what reaches it.

use super::*;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;

use nix::fcntl::{fcntl, FcntlArg};
use socket2::SockRef;

use crate::sys;

const HEAD: &str = "HTTP/1.0 200 OK\r\n\r\n";

/// A target server: answers every connection with [`HEAD`] and the request echoed (read up
/// to the blank line or the client's EOF). Returns its address.
fn target() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let mut s = s.unwrap();
            std::thread::spawn(move || {
                let mut req = Vec::new();
                let mut buf = [0; 4096];
                while !req.ends_with(b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s.write_all(HEAD.as_bytes());
                let _ = s.write_all(&req);
            });
        }
    });
    addr
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn answer(mut c: &TcpStream) -> String {
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut s = String::new();
    c.read_to_string(&mut s).unwrap();
    s
}

/// A listener nobody accepts on, like a stopped worker's.
fn stuck_listener() -> (TcpListener, RawFd) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let fd = l.as_raw_fd();
    (l, fd)
}

/// What the worker would notice if we changed its socket: file status flags, SO_RCVTIMEO.
fn flags(l: &TcpListener) -> (i32, Option<Duration>) {
    (fcntl(l, FcntlArg::F_GETFL).unwrap(), SockRef::from(l).read_timeout().unwrap())
}

#[test]
fn relays_every_queued_connection_and_leaves_the_socket_as_it_was() {
    let (l, fd) = stuck_listener();
    let before = flags(&l);
    let clients: Vec<(TcpStream, String)> = (0..20)
        .map(|i| {
            let mut c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
            let req = format!("GET /{i} HTTP/1.1\r\nHost: x\r\n\r\n");
            c.write_all(req.as_bytes()).unwrap();
            (c, req)
        })
        .collect();
    wait_until("20 queued", || sys::queue_len(fd).unwrap() == 20);
    let rescue = Rescue::start().unwrap();
    rescue.take(3, &[(fd, target())]);
    assert_eq!(flags(&l), before);
    for (c, req) in &clients {
        assert_eq!(answer(c), format!("{HEAD}{req}"));
    }
    assert_eq!((rescue.relayed(), rescue.relayed_from(3), rescue.relayed_from(0)), (20, 20, 0));
    assert_eq!(sys::queue_len(fd).unwrap(), 0);
    rescue.release(3);
    wait_until("parked", || rescue.parked(3));
    assert_eq!(flags(&l), before, "O_NONBLOCK or SO_RCVTIMEO changed on the worker's socket");
    // Still a blocking listener that accepts, as the worker expects.
    let _c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    l.accept().unwrap();
}

#[test]
fn after_release_new_connections_stay_queued_until_taken_again() {
    let (l, fd) = stuck_listener();
    let rescue = Rescue::start().unwrap();
    rescue.take(0, &[(fd, target())]);
    let mut c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    c.write_all(b"first\r\n\r\n").unwrap();
    assert_eq!(answer(&c), format!("{HEAD}first\r\n\r\n"));
    rescue.release(0);
    wait_until("parked", || rescue.parked(0));
    let later: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(l.local_addr().unwrap()).unwrap()).collect();
    // A negative: watch for several poll periods that nothing is taken.
    let until = Instant::now() + Duration::from_millis(5 * u64::from(POLL_MS));
    while Instant::now() < until {
        assert_eq!(sys::queue_len(fd).unwrap(), 3, "taken after release");
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(rescue.relayed(), 1);
    // Taken again: the same thread takes them.
    rescue.take(0, &[(fd, target())]);
    for mut c in later {
        c.write_all(b"later\r\n\r\n").unwrap();
        assert_eq!(answer(&c), format!("{HEAD}later\r\n\r\n"));
    }
    assert_eq!(rescue.relayed(), 4);
}

#[test]
fn a_client_that_half_closes_still_gets_the_whole_answer() {
    let (l, fd) = stuck_listener();
    let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    // No blank line: the target answers at the client's EOF, which must pass through.
    let req = "x".repeat(300_000);
    let writer = {
        let mut c = c.try_clone().unwrap();
        let req = req.clone();
        std::thread::spawn(move || {
            c.write_all(req.as_bytes()).unwrap();
            c.shutdown(Shutdown::Write).unwrap();
        })
    };
    let rescue = Rescue::start().unwrap();
    rescue.take(1, &[(fd, target())]);
    writer.join().unwrap();
    let got = answer(&c);
    assert_eq!(got.len(), HEAD.len() + req.len());
    assert!(got.starts_with(HEAD) && got.ends_with("xxx"));
    c.shutdown(Shutdown::Read).ok();
}

/// The worker resumes while we take: both accept on the same open file description (the
/// worker blocking, as a plain server does). Whoever wins, every client gets its answer.
#[test]
fn a_worker_accepting_at_the_same_time_loses_nothing() {
    let (l, fd) = stuck_listener();
    let rescue = Rescue::start().unwrap();
    rescue.take(2, &[(fd, target())]);
    let worker_took = Arc::new(AtomicU64::new(0));
    {
        let (l, took) = (l.try_clone().unwrap(), worker_took.clone());
        std::thread::spawn(move || {
            for s in l.incoming() {
                let mut s = s.unwrap();
                took.fetch_add(1, Ordering::SeqCst);
                std::thread::spawn(move || {
                    let mut req = [0; 64];
                    let n = s.read(&mut req).unwrap();
                    s.write_all(b"worker:").unwrap();
                    s.write_all(&req[..n]).unwrap();
                });
            }
        });
    }
    let clients: Vec<TcpStream> = (0..30)
        .map(|i| {
            let mut c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
            c.write_all(format!("r{i}\r\n\r\n").as_bytes()).unwrap();
            c
        })
        .collect();
    for (i, c) in clients.iter().enumerate() {
        let got = answer(c);
        let req = format!("r{i}\r\n\r\n");
        assert!(got == format!("worker:{req}") || got == format!("{HEAD}{req}"), "{got:?}");
    }
    assert_eq!(rescue.relayed() + worker_took.load(Ordering::SeqCst), 30);
}

#[test]
fn several_slots_and_sockets_at_once() {
    let sockets: Vec<_> = (0..3).map(|_| stuck_listener()).collect();
    let to = target();
    let rescue = Rescue::start().unwrap();
    rescue.take(0, &[(sockets[0].1, to), (sockets[1].1, to)]);
    rescue.take(1, &[(sockets[2].1, to)]);
    for (l, _) in &sockets {
        let mut c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        c.write_all(b"hi\r\n\r\n").unwrap();
        assert_eq!(answer(&c), format!("{HEAD}hi\r\n\r\n"));
    }
    assert_eq!((rescue.relayed_from(0), rescue.relayed_from(1), rescue.relayed()), (2, 1, 3));
}

#[test]
fn wildcard_binds_relay_to_loopback() {
    assert_eq!(loopback("0.0.0.0:80".parse().unwrap()), "127.0.0.1:80".parse().unwrap());
    assert_eq!(loopback("[::]:80".parse().unwrap()), "[::1]:80".parse().unwrap());
    assert_eq!(loopback("10.1.2.3:80".parse().unwrap()), "10.1.2.3:80".parse().unwrap());
}
