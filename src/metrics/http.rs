//! The smallest HTTP/1.1 server that probes and Prometheus need: GET and HEAD, no request
//! body, one request per connection (`Connection: close`), written by hand.
//!
//! Why not a crate: the three routes answer small bodies built in memory, and the clients are a
//! scraper and a kubelet or balancer. What a server must still do against a client that
//! misbehaves is here: a request head of at most [`MAX_REQUEST`] bytes, a read timeout (a
//! client that sends nothing holds a thread for [`READ_TIMEOUT`], not forever), a write
//! timeout, and at most [`MAX_CLIENTS`] connections served at once (one thread each; more are
//! answered 503 at once and closed). That is about a hundred lines against tiny_http's
//! dependency tree and its own thread pool; nothing else of HTTP (keep-alive, chunked bodies,
//! TLS) is wanted here.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The most bytes of a request head (request line and headers) read.
pub const MAX_REQUEST: usize = 8192;
/// How long a client may take to send its request.
pub const READ_TIMEOUT: Duration = Duration::from_secs(2);
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; more are answered 503 and closed.
pub const MAX_CLIENTS: usize = 8;

/// An answer: status, content type and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Response {
    pub fn ok(content_type: &'static str, body: String) -> Response {
        Response { status: 200, content_type, body }
    }

    pub fn text(status: u16, body: String) -> Response {
        Response { status, content_type: "text/plain; charset=utf-8", body }
    }

    /// The bytes on the wire (no body for HEAD).
    pub fn encode(&self, head_only: bool, extra: &str) -> Vec<u8> {
        let reason = match self.status {
            200 => "OK",
            400 => "Bad Request",
            404 => "Not Found",
            405 => "Method Not Allowed",
            431 => "Request Header Fields Too Large",
            503 => "Service Unavailable",
            _ => "",
        };
        let mut out = format!(
            "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\n\
             Connection: close\r\n{extra}\r\n",
            self.status,
            self.content_type,
            self.body.len()
        )
        .into_bytes();
        if !head_only {
            out.extend_from_slice(self.body.as_bytes());
        }
        out
    }
}

/// What a request head asks for: Ok((path without the query, HEAD?)), or the answer to give.
pub fn parse_request(head: &[u8]) -> Result<(String, bool), Response> {
    let text = std::str::from_utf8(head).map_err(|_| Response::text(400, "bad request\n".into()))?;
    let line = text.lines().next().unwrap_or_default();
    let mut parts = line.split(' ');
    let (method, target, version) = (parts.next(), parts.next(), parts.next());
    let (Some(method), Some(target), Some(version)) = (method, target, version) else {
        return Err(Response::text(400, "bad request line\n".into()));
    };
    if parts.next().is_some() || !version.starts_with("HTTP/1.") || !target.starts_with('/') {
        return Err(Response::text(400, "bad request line\n".into()));
    }
    let path = target.split(['?', '#']).next().unwrap_or(target).to_string();
    match method {
        "GET" => Ok((path, false)),
        "HEAD" => Ok((path, true)),
        _ => Err(Response::text(405, "only GET and HEAD\n".into())),
    }
}

/// Read a request head: up to the blank line, at most MAX_REQUEST bytes. Ok(None): the client
/// closed or sent too much (answered by the caller), Err: timeout or error (just closed).
fn read_head(s: &mut TcpStream) -> io::Result<Option<Vec<u8>>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
        let end = buf.windows(4).position(|w| w == b"\r\n\r\n");
        if end.unwrap_or(buf.len()) > MAX_REQUEST {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "request head too large"));
        }
        if let Some(end) = end {
            buf.truncate(end);
            return Ok(Some(buf));
        }
        if buf.len() > MAX_REQUEST + 3 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "request head too large"));
        }
    }
}

fn answer(mut s: TcpStream, route: &(dyn Fn(&str) -> Response + Send + Sync)) {
    let _ = s.set_read_timeout(Some(READ_TIMEOUT));
    let _ = s.set_write_timeout(Some(WRITE_TIMEOUT));
    let (response, head_only) = match read_head(&mut s) {
        Ok(Some(head)) => match parse_request(&head) {
            Ok((path, head_only)) => (route(&path), head_only),
            Err(r) => (r, false),
        },
        Ok(None) => return,
        Err(e) if e.kind() == io::ErrorKind::InvalidData => (Response::text(431, "request too large\n".into()), false),
        Err(_) => return, // timed out or reset: nobody to answer
    };
    let extra = if response.status == 405 { "Allow: GET, HEAD\r\n" } else { "" };
    let _ = s.write_all(&response.encode(head_only, extra));
    let _ = s.shutdown(std::net::Shutdown::Write);
    if response.status == 431 {
        // Take in (a bounded part of) what the client is still sending: closing with unread
        // data would reset the connection, and the client could lose the answer.
        let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
        let mut sink = [0u8; 4096];
        let mut left = 16 * MAX_REQUEST;
        while let Ok(n @ 1..) = s.read(&mut sink) {
            left = left.saturating_sub(n);
            if left == 0 {
                break;
            }
        }
    }
}

/// Serve `listener` from a thread of its own, answering each GET with `route(path)`.
pub fn serve(listener: TcpListener, route: impl Fn(&str) -> Response + Send + Sync + 'static) -> io::Result<()> {
    let route: Arc<dyn Fn(&str) -> Response + Send + Sync> = Arc::new(route);
    let busy = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new().name("metrics".into()).spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut s) = conn else { continue };
            if busy.load(Ordering::Relaxed) >= MAX_CLIENTS {
                let _ = s.set_nonblocking(true);
                let _ = s.write_all(&Response::text(503, "too many clients\n".into()).encode(false, ""));
                continue;
            }
            busy.fetch_add(1, Ordering::Relaxed);
            let (route, busy2) = (route.clone(), busy.clone());
            let spawned = std::thread::Builder::new().name("metrics-client".into()).spawn(move || {
                answer(s, &*route);
                busy2.fetch_sub(1, Ordering::Relaxed);
            });
            if spawned.is_err() {
                busy.fetch_sub(1, Ordering::Relaxed);
            }
        }
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines() {
        assert_eq!(parse_request(b"GET /metrics HTTP/1.1\r\nHost: x").unwrap(), ("/metrics".into(), false));
        assert_eq!(parse_request(b"HEAD /readyz?verbose=1 HTTP/1.0").unwrap(), ("/readyz".into(), true));
        assert_eq!(parse_request(b"POST /metrics HTTP/1.1").unwrap_err().status, 405);
        assert_eq!(parse_request(b"GET metrics HTTP/1.1").unwrap_err().status, 400);
        assert_eq!(parse_request(b"GET / SPDY/3").unwrap_err().status, 400);
        assert_eq!(parse_request(b"\xff\xfe").unwrap_err().status, 400);
        assert_eq!(parse_request(b"").unwrap_err().status, 400);
    }

    fn get(addr: std::net::SocketAddr, request: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(request).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn serves_routes_and_refuses_what_it_does_not_do() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        serve(l, |path| Response::text(if path == "/a" { 200 } else { 404 }, format!("{path}\n"))).unwrap();
        let ok = get(addr, b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(
            ok.contains("Content-Length: 3\r\n")
                && ok.contains("Connection: close\r\n")
                && ok.ends_with("\r\n\r\n/a\n")
        );
        let head = get(addr, b"HEAD /a HTTP/1.1\r\n\r\n");
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n") && head.ends_with("\r\n\r\n"), "{head}");
        assert!(get(addr, b"GET /b HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404 "));
        let post = get(addr, b"POST /a HTTP/1.1\r\n\r\n");
        assert!(post.starts_with("HTTP/1.1 405 ") && post.contains("Allow: GET, HEAD\r\n"), "{post}");
        let huge = [b"GET /a HTTP/1.1\r\nX: ".as_slice(), &[b'a'; MAX_REQUEST + 10], b"\r\n\r\n"].concat();
        assert!(get(addr, &huge).starts_with("HTTP/1.1 431 "));
    }
}
