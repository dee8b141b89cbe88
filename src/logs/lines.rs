//! Turning a worker's bytes into whole, prefixed lines: [`Stream`] gathers what is read from one
//! pipe, [`Out`] batches whole lines into writes of at most `PIPE_BUF` bytes (one line longer than
//! that gets a write of its own), and a line over [`MAX_LINE`] is cut into marked pieces.

use std::io;
use std::os::fd::OwnedFd;

/// Longest line written in one piece (bytes of the worker's line, without prefix or markers).
pub const MAX_LINE: usize = 64 * 1024;
/// Writes of whole lines up to this size are atomic on a pipe.
pub const PIPE_BUF: usize = libc::PIPE_BUF;
/// Ends every piece of a split line but the last.
pub const CONTINUES: &[u8] = b" [line continues]";
/// Starts every piece of a split line but the first (after the prefix).
pub const CONTINUED: &[u8] = b"[continued] ";

/// Where an [`Out`] writes.
pub trait Sink {
    fn write_all(&mut self, data: &[u8]) -> io::Result<()>;
}

/// Lines on their way to one output: gathered into writes of whole lines, at most `PIPE_BUF`
/// bytes unless one line is longer.
pub struct Out<S: Sink> {
    sink: S,
    batch: Vec<u8>,
    /// The output failed (EPIPE, EBADF): lines are discarded from then on.
    broken: bool,
}

impl<S: Sink> Out<S> {
    pub fn new(sink: S) -> Out<S> {
        Out { sink, batch: Vec::with_capacity(PIPE_BUF), broken: false }
    }

    /// One whole line, given in parts (the newline included).
    pub(super) fn line(&mut self, parts: &[&[u8]]) {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if !self.batch.is_empty() && self.batch.len() + len > PIPE_BUF {
            self.flush();
        }
        for p in parts {
            self.batch.extend_from_slice(p);
        }
        if self.batch.len() >= PIPE_BUF {
            self.flush();
        }
    }

    pub fn flush(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        if !self.broken && self.sink.write_all(&self.batch).is_err() {
            self.broken = true;
        }
        self.batch.clear();
        if self.batch.capacity() > 4 * PIPE_BUF {
            self.batch.shrink_to(PIPE_BUF);
        }
    }
}

/// One worker's stdout or stderr: its read end, its prefix, and the line begun so far.
pub struct Stream {
    pub(super) fd: Option<OwnedFd>,
    prefix: Vec<u8>,
    partial: Vec<u8>,
    /// The next piece continues a line that was split.
    continued: bool,
}

impl Stream {
    pub(super) fn new(fd: OwnedFd, prefix: Vec<u8>) -> Stream {
        Stream { fd: Some(fd), prefix, partial: Vec::new(), continued: false }
    }

    /// Take in bytes read from the pipe; write out every line they complete, and the 64 KiB
    /// pieces of a line that grew too long.
    pub fn feed<S: Sink>(&mut self, data: &[u8], out: &mut Out<S>) {
        let mut rest = data;
        while let Some(i) = rest.iter().position(|&b| b == b'\n') {
            let line = &rest[..i];
            rest = &rest[i + 1..];
            if self.partial.is_empty() {
                self.whole(line, out);
            } else {
                let mut p = std::mem::take(&mut self.partial);
                p.extend_from_slice(line);
                self.whole(&p, out);
                p.clear();
                if p.capacity() > 2 * MAX_LINE {
                    p.shrink_to(MAX_LINE);
                }
                self.partial = p;
            }
        }
        self.partial.extend_from_slice(rest);
        while self.partial.len() > MAX_LINE {
            let cut = cut_at(&self.partial);
            piece(out, &self.prefix, self.continued, &self.partial[..cut], true);
            self.continued = true;
            self.partial.drain(..cut);
        }
    }

    /// End of file: write out the last line even without its newline.
    pub fn end<S: Sink>(&mut self, out: &mut Out<S>) {
        if !self.partial.is_empty() {
            let p = std::mem::take(&mut self.partial);
            self.whole(&p, out);
        }
        self.fd = None;
    }

    /// A complete line (without its newline), in pieces if longer than [`MAX_LINE`].
    fn whole<S: Sink>(&mut self, mut line: &[u8], out: &mut Out<S>) {
        while line.len() > MAX_LINE {
            let cut = cut_at(line);
            piece(out, &self.prefix, self.continued, &line[..cut], true);
            self.continued = true;
            line = &line[cut..];
        }
        piece(out, &self.prefix, self.continued, line, false);
        self.continued = false;
    }
}

/// Where to cut a line longer than [`MAX_LINE`]: at 64 KiB, moved back (at most 3 bytes) so as
/// not to split a UTF-8 character.
fn cut_at(line: &[u8]) -> usize {
    let mut cut = MAX_LINE;
    while cut > MAX_LINE - 3 && line[cut] & 0xC0 == 0x80 {
        cut -= 1;
    }
    if line[cut] & 0xC0 == 0x80 {
        MAX_LINE // not UTF-8 after all: cut anywhere
    } else {
        cut
    }
}

/// One output line: prefix, markers, content, newline.
fn piece<S: Sink>(out: &mut Out<S>, prefix: &[u8], continued: bool, content: &[u8], continues: bool) {
    let head: &[u8] = if continued { CONTINUED } else { b"" };
    let tail: &[u8] = if continues { CONTINUES } else { b"" };
    out.line(&[prefix, head, content, tail, b"\n"]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logs::Prefix;

    /// Records every write.
    #[derive(Default)]
    struct Writes(Vec<Vec<u8>>);

    impl Sink for Writes {
        fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
            self.0.push(data.to_vec());
            Ok(())
        }
    }

    fn stream() -> Stream {
        Stream { fd: None, prefix: b"[3 42] ".to_vec(), partial: Vec::new(), continued: false }
    }

    fn lines(out: &Out<Writes>) -> Vec<String> {
        let all: Vec<u8> = out.sink.0.concat();
        String::from_utf8(all).unwrap().lines().map(String::from).collect()
    }

    #[test]
    fn lines_are_prefixed_and_partial_lines_wait_for_their_end() {
        let mut out = Out::new(Writes::default());
        let mut s = stream();
        s.feed(b"one\ntw", &mut out);
        out.flush();
        assert_eq!(lines(&out), ["[3 42] one"]);
        s.feed(b"o\n\nthree", &mut out);
        s.end(&mut out);
        out.flush();
        assert_eq!(lines(&out), ["[3 42] one", "[3 42] two", "[3 42] ", "[3 42] three"]);
    }

    #[test]
    fn writes_hold_whole_lines_and_at_most_pipe_buf_unless_one_line_is_longer() {
        let mut out = Out::new(Writes::default());
        let mut s = stream();
        let short = format!("{}\n", "x".repeat(100));
        for _ in 0..200 {
            s.feed(short.as_bytes(), &mut out);
        }
        let long = format!("{}\n", "y".repeat(10_000));
        s.feed(long.as_bytes(), &mut out);
        s.feed(short.as_bytes(), &mut out);
        out.flush();
        for w in &out.sink.0 {
            assert!(w.ends_with(b"\n"), "a write ends inside a line");
            assert!(w.len() <= PIPE_BUF || w.iter().filter(|b| **b == b'\n').count() == 1, "{}", w.len());
        }
        assert!(out.sink.0.iter().any(|w| w.len() > 10_000));
        assert_eq!(lines(&out).len(), 202);
    }

    #[test]
    fn a_line_over_64k_is_split_with_markers_and_reassembles() {
        let original: Vec<u8> = (0..150_000u32).map(|i| b'a' + (i % 26) as u8).collect();
        // Fed in odd chunks, as a pipe delivers it.
        let mut out = Out::new(Writes::default());
        let mut s = stream();
        let mut data = original.clone();
        data.push(b'\n');
        data.extend_from_slice(b"next\n");
        for chunk in data.chunks(7_777) {
            s.feed(chunk, &mut out);
        }
        out.flush();
        let got = lines(&out);
        assert_eq!(got.len(), 4, "{:?}", got.iter().map(|l| l.len()).collect::<Vec<_>>());
        let mut whole = String::new();
        for (i, l) in got[..3].iter().enumerate() {
            let mut body = l.strip_prefix("[3 42] ").unwrap();
            if i > 0 {
                body = body.strip_prefix("[continued] ").expect("continued marker");
            }
            if i < 2 {
                body = body.strip_suffix(" [line continues]").expect("continues marker");
                assert_eq!(body.len(), MAX_LINE);
            }
            whole.push_str(body);
        }
        assert_eq!(whole.as_bytes(), &original[..]);
        assert_eq!(got[3], "[3 42] next");
        // The same line in one piece of input splits the same way.
        let mut out2 = Out::new(Writes::default());
        let mut s2 = stream();
        s2.feed(&data, &mut out2);
        out2.flush();
        assert_eq!(lines(&out2), got);
    }

    #[test]
    fn a_line_of_exactly_64k_is_not_split_and_cuts_respect_utf8() {
        let mut out = Out::new(Writes::default());
        let mut s = stream();
        let mut exact = vec![b'z'; MAX_LINE];
        exact.push(b'\n');
        s.feed(&exact, &mut out);
        out.flush();
        assert_eq!(lines(&out).len(), 1);
        // 'é' is two bytes: with one ASCII byte first, byte 65536 is inside a character.
        let text = format!("a{}\n", "é".repeat(40_000));
        let mut out = Out::new(Writes::default());
        s.feed(text.as_bytes(), &mut out);
        out.flush();
        let got = lines(&out); // from_utf8 in lines() would panic on a split character
        assert_eq!(got.len(), 2);
        assert!(got[0].ends_with("é [line continues]"));
    }

    #[test]
    fn an_unterminated_long_tail_is_split_then_ended() {
        let mut out = Out::new(Writes::default());
        let mut s = stream();
        s.feed(&vec![b'q'; MAX_LINE + 10], &mut out);
        s.end(&mut out);
        out.flush();
        let got = lines(&out);
        assert_eq!(got.len(), 2);
        assert!(got[0].ends_with(" [line continues]"));
        assert_eq!(got[1], format!("[3 42] [continued] {}", "q".repeat(10)));
    }

    #[test]
    fn a_broken_output_discards_without_failing() {
        struct Broken(usize);
        impl Sink for Broken {
            fn write_all(&mut self, _: &[u8]) -> io::Result<()> {
                self.0 += 1;
                Err(io::Error::from_raw_os_error(libc::EPIPE))
            }
        }
        let mut out = Out::new(Broken(0));
        let mut s = Stream { fd: None, prefix: Vec::new(), partial: Vec::new(), continued: false };
        s.feed(&vec![b'a'; 5000], &mut out);
        s.feed(b"\nb\n", &mut out);
        out.flush();
        s.feed(b"c\n", &mut out);
        out.flush();
        assert_eq!(out.sink.0, 1, "no more writes once broken");
        assert!(out.broken);
    }

    #[test]
    fn prefix_values() {
        assert_eq!(Prefix::parse("slot-pid"), Ok(Prefix::SlotPid));
        assert_eq!(Prefix::parse("none"), Ok(Prefix::None));
        assert!(Prefix::parse("yes").is_err());
    }
}
