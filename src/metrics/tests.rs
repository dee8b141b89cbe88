//! The `--metrics` server end to end over real loopback sockets, with short limits: routes,
//! bad requests, deadlines, the cap, slow readers, and a cheap request beside a slow render.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::http::Response;
use super::limits::{Closed, Limits, Stats};
use super::server::{serve, Route};

const FAST: Limits = Limits {
    max_connections: 1024,
    idle: Duration::from_millis(600),
    request: Duration::from_millis(300),
    write: Duration::from_millis(500),
    linger: Duration::from_millis(500),
    render: Duration::from_secs(10),
};

fn route(path: &str) -> Route {
    match path {
        "/metrics" => Route::Render,
        "/a" => Route::Now(Response::text(200, "a\n".into())),
        _ => Route::Now(Response::text(404, "nope\n".into())),
    }
}

fn start(limits: Limits, render: impl Fn() -> Response + Send + 'static) -> (SocketAddr, Arc<Stats>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let stats = Arc::new(Stats::default());
    serve(l, limits, stats.clone(), route, render).unwrap();
    (addr, stats)
}

fn exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

fn get(addr: SocketAddr, path: &str) -> String {
    exchange(addr, format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < end, "not within 20 s: {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The connection was closed by the server (after whatever it sent): what it sent.
fn closed_with(s: &mut TcpStream) -> String {
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut out = Vec::new();
    match s.read_to_end(&mut out) {
        Ok(_) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        Err(e) => panic!("not closed: {e}"),
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn serves_routes_and_refuses_what_it_does_not_do() {
    let (addr, stats) = start(FAST, || Response::text(200, "page\n".into()));
    let ok = get(addr, "/a");
    assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
    assert!(
        ok.contains("Content-Length: 2\r\n") && ok.contains("Connection: close\r\n") && ok.ends_with("\r\n\r\na\n")
    );
    let head = exchange(addr, b"HEAD /metrics HTTP/1.1\r\n\r\n");
    assert!(
        head.starts_with("HTTP/1.1 200 OK\r\n")
            && head.ends_with("Content-Length: 5\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n"),
        "{head}"
    );
    assert!(get(addr, "/metrics").ends_with("\r\n\r\npage\n"));
    assert!(get(addr, "/b").starts_with("HTTP/1.1 404 "));
    let post = exchange(addr, b"POST /a HTTP/1.1\r\n\r\n");
    assert!(post.starts_with("HTTP/1.1 405 ") && post.contains("Allow: GET, HEAD\r\n"), "{post}");
    let huge = [b"GET /a HTTP/1.1\r\nX: ".as_slice(), &[b'a'; 20_000], b"\r\n\r\n"].concat();
    assert!(exchange(addr, &huge).starts_with("HTTP/1.1 431 "));
    let line = [b"GET /".as_slice(), &[b'a'; 200_000], b" HTTP/1.1\r\n\r\n"].concat();
    assert!(exchange(addr, &line).starts_with("HTTP/1.1 414 "), "the whole 200 KB is taken in, the answer arrives");
    let tls = exchange(addr, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03");
    assert!(tls.starts_with("HTTP/1.1 400 "), "{tls}");
    assert_eq!(stats.counts().closed[Closed::Invalid as usize], 4);
    wait_for("every connection closed", || stats.counts().open == 0);
}

#[test]
fn slow_and_silent_clients_time_out_with_408() {
    let (addr, stats) = start(FAST, || Response::text(200, "page\n".into()));
    let t0 = Instant::now();
    let mut silent = TcpStream::connect(addr).unwrap();
    let mut slow = TcpStream::connect(addr).unwrap();
    slow.write_all(b"GET /a HT").unwrap();
    let got = closed_with(&mut slow);
    assert!(got.starts_with("HTTP/1.1 408 "), "{got}");
    assert!(t0.elapsed() >= FAST.request, "not before the request timeout");
    // A byte a second does not keep a connection: the deadline runs from the first byte.
    let got = closed_with(&mut silent);
    assert!(got.starts_with("HTTP/1.1 408 "), "{got}");
    assert!(t0.elapsed() >= FAST.idle);
    assert_eq!(stats.counts().closed[Closed::Timeout as usize], 2);
    assert_eq!(stats.counts().open, 0);
}

#[test]
fn at_the_cap_the_oldest_idle_connection_makes_room() {
    let limits = Limits { max_connections: 4, idle: Duration::from_secs(30), ..FAST };
    let (addr, stats) = start(limits, || Response::text(200, "page\n".into()));
    let mut idle: Vec<TcpStream> = (0..4).map(|_| TcpStream::connect(addr).unwrap()).collect();
    wait_for("4 open", || stats.counts().open == 4);
    assert!(get(addr, "/a").starts_with("HTTP/1.1 200 "));
    let evicted = closed_with(&mut idle[0]);
    assert!(evicted.starts_with("HTTP/1.1 503 ") && evicted.contains("idle longest"), "{evicted}");
    for s in &mut idle[1..] {
        s.set_nonblocking(true).unwrap();
        let e = s.read(&mut [0u8; 16]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::WouldBlock, "the newer ones stay open");
    }
    assert_eq!(stats.counts().closed[Closed::Evicted as usize], 1);
    assert_eq!(stats.counts().max, 4);
}

#[test]
fn a_cheap_request_is_answered_while_a_render_is_under_way() {
    let (gate_tx, gate_rx) = crossbeam_channel::unbounded::<()>();
    let (started_tx, started_rx) = crossbeam_channel::unbounded::<()>();
    let gate_rx = Mutex::new(gate_rx);
    let renders = Arc::new(AtomicUsize::new(0));
    let r = renders.clone();
    let (addr, _) = start(FAST, move || {
        let _ = started_tx.send(());
        let _ = gate_rx.lock().unwrap().recv();
        Response::text(200, format!("page {}\n", r.fetch_add(1, Ordering::SeqCst) + 1))
    });
    let (sent_tx, sent_rx) = crossbeam_channel::unbounded::<()>();
    let scrapers: Vec<_> = (0..16)
        .map(|_| {
            let sent = sent_tx.clone();
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(addr).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
                sent.send(()).unwrap();
                let mut page = String::new();
                s.read_to_string(&mut page).unwrap();
                page
            })
        })
        .collect();
    for _ in 0..16 {
        sent_rx.recv_timeout(Duration::from_secs(20)).unwrap();
    }
    started_rx.recv_timeout(Duration::from_secs(20)).expect("a render started");
    // The render is blocked: a cheap request goes past it. By its answer the loop has read
    // the 16 scrapes sent before it: the first render's, and the next one's.
    assert!(get(addr, "/a").starts_with("HTTP/1.1 200 "));
    for _ in 0..2 {
        gate_tx.send(()).unwrap();
    }
    for s in scrapers {
        let page = s.join().unwrap();
        assert!(page.starts_with("HTTP/1.1 200 ") && page.contains("\r\n\r\npage "), "{page}");
    }
    assert!(renders.load(Ordering::SeqCst) <= 2, "16 waiting scrapes share a page or two");
}

#[test]
fn a_client_that_does_not_read_its_answer_is_closed_and_holds_nobody_up() {
    let (addr, stats) = start(FAST, || Response::text(200, "x".repeat(64 << 20)));
    let mut sink = TcpStream::connect(addr).unwrap();
    sink.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
    wait_for("the answer started", || stats.counts().open == 1);
    assert!(get(addr, "/a").starts_with("HTTP/1.1 200 "), "served beside a stuck reader");
    wait_for("the write timeout", || stats.counts().closed[Closed::WriteTimeout as usize] == 1);
    wait_for("every connection closed", || stats.counts().open == 0);
    drop(sink);
}
