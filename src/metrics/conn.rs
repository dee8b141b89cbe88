//! One connection of the `--metrics` port, as the event loop ([`super::server`]) drives it: a
//! nonblocking socket, the phase it is in, the bytes it sent, the answer being written, and
//! its one deadline. Nothing here blocks or waits; every method does what the socket lets it
//! do now and says what comes next.
//!
//! Phases, each with its deadline (see [`super::server`] for the values):
//! 1. `Reading`: from the accept until the head is complete. Deadline: the idle timeout from
//!    the accept while nothing arrived, then the request timeout from the first byte.
//! 2. `Rendering`: a `/metrics` page is being rendered for it off the loop.
//! 3. `Writing`: the answer goes out as fast as the client reads it; the rest waits for
//!    EPOLLOUT. Deadline: the write timeout from the first byte written.
//! 4. `Lingering`: answered and shut down for writing; what the client still sends is read and
//!    dropped until it closes (closing with unread bytes would reset the connection, and the
//!    client could lose the answer), for at most the linger time and [`LINGER_BYTES`].

use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::time::Instant;

use super::http::{self, Head};

/// The most bytes read and dropped from a client after its answer.
pub const LINGER_BYTES: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Reading,
    Rendering,
    Writing,
    Lingering,
}

/// What reading brought.
#[derive(Debug, PartialEq, Eq)]
pub enum Got {
    /// Nothing to do until more arrives.
    Wait,
    /// A complete request.
    Request { path: String, head_only: bool },
    /// Answer this, then close.
    Reject(http::Response),
    /// The client is gone (or sent nothing and closed): close without an answer.
    Gone,
}

/// How writing went.
#[derive(Debug, PartialEq, Eq)]
pub enum Wrote {
    /// All of it: linger.
    Done,
    /// The client's window is full: wait for EPOLLOUT.
    Pending,
    /// The client is gone.
    Failed,
}

/// An answer shared by every connection that gets it (one render of `/metrics` for many
/// scrapers), and how much of it this one gets (the head alone for HEAD).
#[derive(Debug, Clone)]
pub struct Out {
    pub bytes: Arc<[u8]>,
    pub len: usize,
}

impl Out {
    pub fn new(bytes: Arc<[u8]>, head_only: bool) -> Out {
        let len = if head_only { http::head_len(&bytes) } else { bytes.len() };
        Out { bytes, len }
    }
}

#[derive(Debug)]
pub struct Conn {
    stream: TcpStream,
    pub phase: Phase,
    /// When it must have moved on (what that means depends on the phase).
    pub deadline: Instant,
    buf: Vec<u8>,
    scanned: usize,
    head_only: bool,
    out: Option<Out>,
    written: usize,
    dropped: usize,
}

impl Conn {
    /// A connection just accepted (made nonblocking by the caller), idle until `deadline`.
    pub fn new(stream: TcpStream, deadline: Instant) -> Conn {
        Conn {
            stream,
            phase: Phase::Reading,
            deadline,
            buf: Vec::new(),
            scanned: 0,
            head_only: false,
            out: None,
            written: 0,
            dropped: 0,
        }
    }

    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    /// Has the client sent anything yet?
    pub fn started(&self) -> bool {
        !self.buf.is_empty()
    }

    /// Was the request a HEAD (valid once a request was read)?
    pub fn head_only(&self) -> bool {
        self.head_only
    }

    /// Take in what arrived (phase `Reading`).
    pub fn read(&mut self) -> Got {
        let mut chunk = [0u8; 4096];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) if self.buf.is_empty() => return Got::Gone,
                Ok(0) => return Got::Reject(http::Response::text(400, "incomplete request\n".into())),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Got::Wait,
                Err(_) => return Got::Gone,
            }
            match http::parse_head(&self.buf, &mut self.scanned) {
                Head::More => {}
                Head::Request { path, head_only } => {
                    self.head_only = head_only;
                    self.buf = Vec::new();
                    return Got::Request { path, head_only };
                }
                Head::Reject(r) => {
                    self.buf = Vec::new();
                    return Got::Reject(r);
                }
            }
        }
    }

    /// Start writing `out` (phase `Writing` until done), with `deadline` for all of it.
    pub fn answer(&mut self, out: Out, deadline: Instant) -> Wrote {
        self.phase = Phase::Writing;
        self.deadline = deadline;
        self.out = Some(out);
        self.written = 0;
        self.write()
    }

    /// Write what the socket takes now.
    pub fn write(&mut self) -> Wrote {
        let Some(out) = &self.out else { return Wrote::Done };
        while self.written < out.len {
            match self.stream.write(&out.bytes[self.written..out.len]) {
                Ok(0) => return Wrote::Failed,
                Ok(n) => self.written += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Wrote::Pending,
                Err(_) => return Wrote::Failed,
            }
        }
        self.out = None;
        Wrote::Done
    }

    /// Answered: send FIN and read until the client closes, `deadline` at the latest.
    pub fn linger(&mut self, deadline: Instant) {
        let _ = self.stream.shutdown(Shutdown::Write);
        self.phase = Phase::Lingering;
        self.deadline = deadline;
    }

    /// Drop what arrived (phase `Lingering`). True: close now (the client closed, or sent more
    /// than [`LINGER_BYTES`]).
    pub fn drain(&mut self) -> bool {
        let mut sink = [0u8; 16384];
        loop {
            match self.stream.read(&mut sink) {
                Ok(0) => return true,
                Ok(n) => {
                    self.dropped += n;
                    if self.dropped > LINGER_BYTES {
                        return true;
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
                Err(_) => return true,
            }
        }
    }

    /// One try at writing a short answer, whatever the socket takes, before closing (a client
    /// that timed out or is evicted): never waits.
    pub fn last_words(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.stream.write(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::time::Duration;

    fn pair() -> (Conn, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (server, _) = l.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        (Conn::new(server, Instant::now() + Duration::from_secs(1)), client)
    }

    /// Poll `f` until it is not `Wait` (a loopback write shows up on the other end at once, but
    /// not necessarily before the next instruction).
    fn read_until(c: &mut Conn) -> Got {
        for _ in 0..500 {
            match c.read() {
                Got::Wait => std::thread::sleep(Duration::from_millis(2)),
                other => return other,
            }
        }
        Got::Wait
    }

    #[test]
    fn reads_a_request_in_pieces_then_answers_and_lingers() {
        let (mut c, mut client) = pair();
        assert_eq!(c.read(), Got::Wait);
        assert!(!c.started());
        client.write_all(b"HEAD /healthz HT").unwrap();
        assert_eq!(read_until(&mut c), Got::Wait);
        assert!(c.started());
        client.write_all(b"TP/1.1\r\nHost: x\r\n\r\n").unwrap();
        assert_eq!(read_until(&mut c), Got::Request { path: "/healthz".into(), head_only: true });
        let bytes: Arc<[u8]> = http::Response::text(200, "ok\n".into()).encode().into();
        let out = Out::new(bytes, c.head_only());
        assert_eq!(c.answer(out, Instant::now()), Wrote::Done);
        c.linger(Instant::now());
        let mut got = String::new();
        client.read_to_string(&mut got).unwrap();
        assert!(got.starts_with("HTTP/1.1 200 OK\r\n") && got.ends_with("\r\n\r\n"), "HEAD: no body: {got:?}");
        drop(client);
        let mut closed = false;
        for _ in 0..500 {
            if c.drain() {
                closed = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        assert!(closed, "the client's close is seen");
    }

    #[test]
    fn a_client_that_closes_early_is_gone_or_incomplete() {
        let (mut c, client) = pair();
        drop(client);
        assert_eq!(read_until(&mut c), Got::Gone);
        let (mut c, mut client) = pair();
        client.write_all(b"GET / HT").unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        match read_until(&mut c) {
            Got::Reject(r) => assert_eq!(r.status, 400),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_large_answer_to_a_client_that_does_not_read_waits_for_room() {
        let (mut c, mut client) = pair();
        let big: Arc<[u8]> = vec![b'x'; 16 << 20].into();
        assert_eq!(c.answer(Out::new(big, false), Instant::now()), Wrote::Pending);
        assert_eq!(c.phase, Phase::Writing);
        let reader = std::thread::spawn(move || {
            let mut n = 0;
            let mut buf = vec![0u8; 1 << 16];
            while let Ok(k @ 1..) = client.read(&mut buf) {
                n += k;
            }
            n
        });
        let mut wrote = Wrote::Pending;
        for _ in 0..10_000 {
            wrote = c.write();
            if wrote != Wrote::Pending {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(wrote, Wrote::Done);
        c.linger(Instant::now());
        assert_eq!(reader.join().unwrap(), 16 << 20);
    }
}
