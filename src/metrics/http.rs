//! The HTTP/1.1 that probes and Prometheus need, as pure functions: reading a request head
//! as it arrives ([`parse_head`]) and writing an answer ([`Response::encode`]). GET and HEAD,
//! no request body, one request per connection (`Connection: close`). The connections
//! themselves (deadlines, the cap, writing to slow readers) are [`super::server`]'s.
//!
//! Why not a crate: the three routes answer small bodies built in memory, and the clients are
//! a scraper and a kubelet or balancer. What a server must still do against a client that
//! misbehaves is a page of code: a request line of at most [`MAX_REQUEST_LINE`] bytes (414
//! beyond), a head of at most [`MAX_REQUEST`] bytes (431 beyond), a request line that is not
//! `METHOD /target HTTP/1.x` refused (400) as soon as its first wrong byte arrives (binary
//! garbage and TLS handshakes are answered at once, not after a timeout), methods other than
//! GET and HEAD refused (405). Nothing else of HTTP (keep-alive, chunked bodies, TLS) is wanted
//! here.

/// The most bytes of a request head (request line and headers) read: 431 beyond.
pub const MAX_REQUEST: usize = 8192;
/// The longest request line: 414 beyond.
pub const MAX_REQUEST_LINE: usize = 4096;
/// The longest method name taken for one before the request is called malformed.
const MAX_METHOD: usize = 16;

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

    /// The bytes on the wire, head and body (a HEAD request gets the first
    /// [`head_len`](Response::head_len) of them).
    pub fn encode(&self) -> Vec<u8> {
        let reason = match self.status {
            200 => "OK",
            400 => "Bad Request",
            404 => "Not Found",
            405 => "Method Not Allowed",
            408 => "Request Timeout",
            414 => "URI Too Long",
            431 => "Request Header Fields Too Large",
            503 => "Service Unavailable",
            _ => "",
        };
        let extra = if self.status == 405 { "Allow: GET, HEAD\r\n" } else { "" };
        let mut out = format!(
            "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\n\
             Connection: close\r\n{extra}\r\n",
            self.status,
            self.content_type,
            self.body.len()
        )
        .into_bytes();
        out.extend_from_slice(self.body.as_bytes());
        out
    }
}

/// How long the head is in `encoded` (an answer from [`Response::encode`]).
pub fn head_len(encoded: &[u8]) -> usize {
    encoded.windows(4).position(|w| w == b"\r\n\r\n").map_or(encoded.len(), |i| i + 4)
}

/// What the bytes received so far on a connection amount to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Head {
    /// Nothing wrong yet; the head is not complete.
    More,
    /// A complete request: the path without its query, and whether it is HEAD.
    Request { path: String, head_only: bool },
    /// The answer to give before closing (400, 405, 414, 431).
    Reject(Response),
}

fn reject(status: u16, why: &str) -> Head {
    Head::Reject(Response::text(status, format!("{why}\n")))
}

/// Read `buf` (every byte received so far) as the start of a request. `scanned` is how far an
/// earlier call looked for the end of the head (0 the first time); it is moved on, so that a
/// client sending one byte at a time costs a constant amount per byte.
pub fn parse_head(buf: &[u8], scanned: &mut usize) -> Head {
    let line_end = buf.iter().position(|b| *b == b'\n');
    let line = &buf[..line_end.unwrap_or(buf.len())];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.len() > MAX_REQUEST_LINE {
        return reject(414, &format!("request line longer than {MAX_REQUEST_LINE} bytes"));
    }
    if let Err(why) = line_so_far(line, line_end.is_some()) {
        return reject(400, &why);
    }
    let Some(line_end) = line_end else { return Head::More };
    // A '\n' that an earlier call saw without the two bytes after it may end the head now.
    let from = scanned.saturating_sub(2).max(line_end);
    *scanned = buf.len();
    let Some(end) = find_end(&buf[from..]).map(|e| from + e) else {
        if buf.len() > MAX_REQUEST {
            return reject(431, &format!("request head longer than {MAX_REQUEST} bytes"));
        }
        return Head::More;
    };
    if end > MAX_REQUEST {
        return reject(431, &format!("request head longer than {MAX_REQUEST} bytes"));
    }
    if buf[..end].contains(&0) {
        return reject(400, "a NUL byte in the request head");
    }
    request(line)
}

/// The end of a head (just past its blank line) in `b`, if it is there.
fn find_end(b: &[u8]) -> Option<usize> {
    (0..b.len()).find_map(|i| {
        if b[i] != b'\n' {
            return None;
        }
        match &b[i + 1..] {
            [b'\n', ..] => Some(i + 2),
            [b'\r', b'\n', ..] => Some(i + 3),
            _ => None,
        }
    })
}

/// Can `line` (without CR LF) begin a request line `METHOD /target HTTP/1.x`? `complete`: the
/// line ended. Err with what is wrong, found at the first byte that makes it wrong.
fn line_so_far(line: &[u8], complete: bool) -> Result<(), String> {
    let method_end = line.iter().position(|b| *b == b' ').unwrap_or(line.len());
    let method = &line[..method_end];
    if !method.iter().all(u8::is_ascii_uppercase) || method.len() > MAX_METHOD {
        return Err("not an HTTP request (expected a method like GET)".into());
    }
    if let Some(bad) = line[method_end..].iter().find(|b| !(b' '..=b'~').contains(*b)) {
        return Err(format!("byte 0x{bad:02x} in the request line"));
    }
    if complete && method.is_empty() {
        return Err("bad request line".into());
    }
    Ok(())
}

/// A complete request line, checked.
fn request(line: &[u8]) -> Head {
    let text = String::from_utf8_lossy(line);
    let mut parts = text.split(' ');
    let (method, target, version) = (parts.next(), parts.next(), parts.next());
    let (Some(method), Some(target), Some(version)) = (method, target, version) else {
        return reject(400, "bad request line");
    };
    if parts.next().is_some() || !version.starts_with("HTTP/1.") || !target.starts_with('/') {
        return reject(400, "bad request line");
    }
    let path = target.split(['?', '#']).next().unwrap_or(target).to_string();
    match method {
        "GET" => Head::Request { path, head_only: false },
        "HEAD" => Head::Request { path, head_only: true },
        _ => reject(405, "only GET and HEAD"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(b: &[u8]) -> Head {
        parse_head(b, &mut 0)
    }

    fn status(h: Head) -> u16 {
        match h {
            Head::Reject(r) => r.status,
            other => panic!("not a rejection: {other:?}"),
        }
    }

    #[test]
    fn request_lines() {
        assert_eq!(
            parse(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Head::Request { path: "/metrics".into(), head_only: false }
        );
        assert_eq!(
            parse(b"HEAD /readyz?verbose=1 HTTP/1.0\r\n\r\n"),
            Head::Request { path: "/readyz".into(), head_only: true }
        );
        assert_eq!(parse(b"GET /a HTTP/1.1\n\n"), Head::Request { path: "/a".into(), head_only: false });
        assert_eq!(status(parse(b"POST /metrics HTTP/1.1\r\n\r\n")), 405);
        assert_eq!(status(parse(b"GET metrics HTTP/1.1\r\n\r\n")), 400);
        assert_eq!(status(parse(b"GET / SPDY/3\r\n\r\n")), 400);
        assert_eq!(status(parse(b"GET / HTTP/1.1 x\r\n\r\n")), 400);
        assert_eq!(status(parse(b"\r\n\r\n")), 400);
        assert_eq!(status(parse(b"GET / HTTP/1.1\r\nX: \0\r\n\r\n")), 400);
    }

    #[test]
    fn garbage_is_refused_at_its_first_byte() {
        assert_eq!(status(parse(b"\x16\x03\x01")), 400, "a TLS ClientHello");
        assert_eq!(status(parse(b"\xff")), 400);
        assert_eq!(status(parse(b"get")), 400);
        assert_eq!(status(parse(b"GET /\x00")), 400);
        assert_eq!(status(parse(b"GET /\xc3\xa9")), 400);
        assert_eq!(status(parse(&[b'A'; MAX_METHOD + 1])), 400);
        // What can still become a request waits.
        for partial in [&b""[..], b"G", b"GET", b"GET ", b"GET /healthz HT", b"GET / HTTP/1.1\r\nHost: x\r\n"] {
            assert_eq!(parse(partial), Head::More, "{partial:?}");
        }
    }

    #[test]
    fn sizes() {
        let long_line = [b"GET /".as_slice(), &[b'a'; MAX_REQUEST_LINE]].concat();
        assert_eq!(status(parse(&long_line)), 414, "known before the line ends");
        let fits = [b"GET /".as_slice(), &[b'a'; MAX_REQUEST_LINE - 20], b" HTTP/1.1\r\n\r\n"].concat();
        assert!(matches!(parse(&fits), Head::Request { .. }));
        let headers = [b"GET / HTTP/1.1\r\nX: ".as_slice(), &[b'a'; MAX_REQUEST]].concat();
        assert_eq!(status(parse(&headers)), 431);
        let done = [b"GET / HTTP/1.1\r\nX: ".as_slice(), &[b'a'; MAX_REQUEST], b"\r\n\r\n"].concat();
        assert_eq!(status(parse(&done)), 431);
    }

    #[test]
    fn byte_by_byte_as_a_slow_client_sends_it() {
        let whole = b"GET /healthz HTTP/1.1\r\nHost: x\r\nUser-Agent: probe\r\n\r\n";
        let mut scanned = 0;
        for n in 1..whole.len() {
            assert_eq!(parse_head(&whole[..n], &mut scanned), Head::More, "{n}");
        }
        assert_eq!(parse_head(whole, &mut scanned), Head::Request { path: "/healthz".into(), head_only: false });
        let mut scanned = 0;
        let lf = b"GET / HTTP/1.0\nA: b\n\n";
        for n in 1..lf.len() {
            assert_eq!(parse_head(&lf[..n], &mut scanned), Head::More, "{n}");
        }
        assert!(matches!(parse_head(lf, &mut scanned), Head::Request { .. }));
    }

    #[test]
    fn encoding() {
        let r = Response::text(405, "only GET and HEAD\n".into()).encode();
        let text = String::from_utf8(r.clone()).unwrap();
        assert!(text.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"), "{text}");
        assert!(text.contains("Allow: GET, HEAD\r\n") && text.contains("Connection: close\r\n"));
        assert!(text.ends_with("\r\n\r\nonly GET and HEAD\n"));
        assert_eq!(&r[head_len(&r)..], b"only GET and HEAD\n");
    }
}
