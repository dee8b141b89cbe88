//! Worker logs: each worker's stdout and stderr pass through the launcher line by line, each
//! line prefixed with the worker's slot and pid (`--log-prefix slot-pid`, the default), so
//! lines of different workers never mix mid-line. `--log-prefix none` keeps the direct
//! inheritance of the launcher's fds 1 and 2 (no pipes, no threads reading them).
//!
//! **Format.** A worker line `hello` from slot 0, pid 1234 comes out as `[0 1234] hello`. Worker
//! stdout goes to the launcher's stdout, worker stderr to the launcher's stderr. The pid is the
//! worker's (the process the launcher started): lines written by its children carry it too.
//! The launcher's own log lines (`reuse-launch: ...`) are never prefixed and never split a
//! worker line.
//!
//! **Long lines.** A line longer than [`MAX_LINE`] (64 KiB) is cut into pieces of at most 64 KiB
//! (moved back to a UTF-8 character boundary when the cut would fall inside one). Every piece
//! but the last ends with ` [line continues]`; every piece but the first starts with
//! `[continued] ` after the prefix:
//! `[0 1234] aaaa... [line continues]`, `[0 1234] [continued] aaaa...`.
//!
//! **Pipes.** Per worker, two pipes are made in the parent ([`pipes`]), with O_CLOEXEC on every
//! end; the child dup2s the write ends onto its fds 1 and 2 between fork and exec (`spawn`), and
//! the launcher then keeps only the read ends (non-blocking), handed to the pumps
//! ([`WorkerPipes::register`]). The supervisor loop only creates and hands over fds, through an
//! unbounded channel: it never reads or writes worker output, so nothing here can stall it.
//!
//! **Pumps.** Two threads, one per output: `log-out` (worker stdout to fd 1) and `log-err`
//! (worker stderr and the launcher's own log to fd 2). Each waits in epoll on its read ends and
//! an eventfd (new pipes, the launcher's log lines, finish). Each ready pipe gets one read of up
//! to 64 KiB per wake-up (fair between workers); complete lines are gathered into writes of at
//! most `PIPE_BUF` (4096) bytes of whole lines, so a write never holds part of a line and, on a
//! pipe, is atomic even against other writers; a line longer than `PIPE_BUF` gets a write of its
//! own. Since only its pump writes worker lines to a fd, lines cannot interleave; only a
//! *foreign* process writing to the same pipe could land inside a line longer than `PIPE_BUF`.
//!
//! **End of file.** A worker's pipes are read until EOF, which comes when every process holding
//! the write end has gone (its children too), not when the worker exits: the last lines are
//! never lost. A last line without a newline is written out, with one, at EOF. When the
//! launcher exits it drains for at most [`DRAIN`] (a child that left the worker's process group
//! may hold a pipe forever), then writes out what it has.
//!
//! **Backpressure (a slow reader).** Writes to fds 1 and 2 are blocking (the fds are shared with
//! whoever started the launcher; their flags are left alone). When a reader stops reading, the
//! pump of that output blocks, the workers' pipes fill, and the workers block in `write`: the
//! ordinary backpressure of a pipe, nothing is dropped and memory stays bounded (one partial
//! line of at most 64 KiB per stream). The other output's pump keeps going: a stalled stdout
//! reader does not hold back stderr, or the launcher's own log. The launcher's own log lines go
//! through a bounded queue ([`OWN_QUEUE`] lines) to `log-err`: a logging thread never blocks;
//! when the queue is full a line is dropped and counted, and the count is logged once stderr
//! moves again. If an output is closed (EPIPE), its worker lines are read and discarded.
//!
//! The pumps are process-wide (started from `main`): [`init`] installs the logger and starts
//! `log-err`, [`start`] applies `--log-prefix` (and starts `log-out`), [`finish`] drains before
//! exit. Without [`start`] (unit tests), [`pipes`] gives nothing and workers inherit fds 1 and 2.

use std::collections::HashMap;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};

/// Longest line written in one piece (bytes of the worker's line, without prefix or markers).
pub const MAX_LINE: usize = 64 * 1024;
/// Writes of whole lines up to this size are atomic on a pipe.
const PIPE_BUF: usize = libc::PIPE_BUF;
/// Ends every piece of a split line but the last.
pub const CONTINUES: &[u8] = b" [line continues]";
/// Starts every piece of a split line but the first (after the prefix).
pub const CONTINUED: &[u8] = b"[continued] ";
/// The launcher's own log lines waiting for stderr; beyond that they are dropped and counted.
pub const OWN_QUEUE: usize = 4096;
/// At exit, how long the pumps wait for the last pipes to reach EOF.
pub const DRAIN: Duration = Duration::from_secs(1);
/// At exit, how long [`finish`] waits for a blocked output on top of [`DRAIN`].
const FINISH_GRACE: Duration = Duration::from_secs(2);
/// One read from a worker's pipe (the default pipe capacity).
const READ_CHUNK: usize = 64 * 1024;
/// The epoll token of a pump's eventfd.
const WAKE: u64 = u64::MAX;

/// `--log-prefix`: how workers' stdout and stderr reach the launcher's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prefix {
    /// Through the launcher, line by line, each line prefixed `[SLOT PID] `.
    SlotPid,
    /// Workers inherit the launcher's fds 1 and 2.
    None,
}

impl Prefix {
    pub fn parse(s: &str) -> Result<Prefix, String> {
        match s {
            "slot-pid" => Ok(Prefix::SlotPid),
            "none" => Ok(Prefix::None),
            _ => Err("expected 'slot-pid' or 'none'".into()),
        }
    }
}

/// A running pump thread, as the rest of the launcher sees it.
struct Pump {
    tx: Sender<Msg>,
    wake: Arc<EventFd>,
    done: Receiver<()>,
}

impl Pump {
    fn send(&self, msg: Msg) {
        if self.tx.send(msg).is_ok() {
            self.wake();
        }
    }

    fn wake(&self) {
        let _ = self.wake.write(1);
    }
}

enum Msg {
    /// A worker's read end to pump until EOF.
    Pipe(Stream),
    /// The launcher is exiting: drain until EOF or [`DRAIN`], then stop.
    Finish,
}

/// The launcher's own log lines on their way to `log-err`.
struct Own {
    tx: Sender<Vec<u8>>,
    rx: Receiver<Vec<u8>>,
    dropped: AtomicU64,
}

static OWN: OnceLock<Own> = OnceLock::new();
static ERR: OnceLock<Pump> = OnceLock::new();
static OUT: OnceLock<Pump> = OnceLock::new();
/// `log-err` has stopped: the launcher's log goes straight to fd 2.
static FINISHED: AtomicBool = AtomicBool::new(false);
/// `--log-prefix slot-pid` is on and `log-out` runs.
static PREFIXING: AtomicBool = AtomicBool::new(false);
/// The read ends being pumped, with their stream (stderr?) and prefix, for `reexec` to hand
/// over: (fd, stderr, prefix).
static OPEN: std::sync::Mutex<Vec<(RawFd, bool, Vec<u8>)>> = std::sync::Mutex::new(Vec::new());

/// The workers' pipes being pumped (fd, stderr?, prefix): `reexec` keeps them open across the
/// exec, and the new image pumps them on ([`adopt`]). Bytes still in a pipe are read by the new
/// image; a partial line the old one held is cut.
pub fn handover() -> Vec<(RawFd, bool, Vec<u8>)> {
    OPEN.lock().map(|o| o.clone()).unwrap_or_default()
}

/// Pump a pipe an earlier image handed over (see [`handover`]).
pub fn adopt(fd: RawFd, stderr: bool, prefix: Vec<u8>) {
    crate::reexec::set_cloexec(&[fd], true);
    // SAFETY: the old image kept this read end open across the exec for us; nothing else here
    // owns it.
    let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let pump = if stderr { ERR.get() } else { OUT.get() };
    match pump {
        Some(pump) => {
            if let Ok(mut o) = OPEN.lock() {
                o.push((fd.as_raw_fd(), stderr, prefix.clone()));
            }
            pump.send(Msg::Pipe(Stream::new(fd, prefix)));
        }
        None => drop(fd), // --log-prefix none now: the worker's next write gets EPIPE
    }
}

fn forget(fd: RawFd) {
    if let Ok(mut o) = OPEN.lock() {
        o.retain(|e| e.0 != fd);
    }
}

/// Install the launcher's logger (`reuse-launch: [level: ]message` on stderr, `RUST_LOG`
/// filter, info by default), writing through `log-err`, which starts here. Call first in `main`.
pub fn init() {
    let (tx, rx) = crossbeam_channel::bounded(OWN_QUEUE);
    let _ = OWN.set(Own { tx, rx: rx.clone(), dropped: AtomicU64::new(0) });
    match Pump::start("log-err", FdSink::Stderr(io::stderr()), Some(rx)) {
        Ok(pump) => {
            let _ = ERR.set(pump);
        }
        Err(e) => {
            FINISHED.store(true, Ordering::Release);
            direct(format!("reuse-launch: warn: cannot start the log thread ({e}); logging directly\n").as_bytes());
        }
    }
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format(|buf, record| {
            let level = match record.level() {
                log::Level::Info => String::new(),
                l => format!("{}: ", l.as_str().to_lowercase()),
            };
            writeln!(buf, "reuse-launch: {level}{}", record.args())
        })
        .target(env_logger::Target::Pipe(Box::new(OwnLog)))
        .init();
}

/// Apply `--log-prefix`: with `slot-pid`, start `log-out`; from now on [`pipes`] gives each
/// new worker its pipes.
pub fn start(prefix: Prefix) -> io::Result<()> {
    if prefix == Prefix::None || ERR.get().is_none() {
        return Ok(());
    }
    let pump = Pump::start("log-out", FdSink::Stdout(io::stdout()), None)?;
    let _ = OUT.set(pump);
    PREFIXING.store(true, Ordering::Release);
    Ok(())
}

/// Before exit: let the pumps read every worker pipe to EOF (at most [`DRAIN`]) and write
/// out what they hold, waiting at most [`FINISH_GRACE`] more for a blocked output. Then the
/// launcher's log goes straight to fd 2.
pub fn finish() {
    PREFIXING.store(false, Ordering::Release);
    let deadline = Instant::now() + DRAIN + FINISH_GRACE;
    for pump in [OUT.get(), ERR.get()].into_iter().flatten() {
        pump.send(Msg::Finish);
    }
    if let Some(out) = OUT.get() {
        let _ = out.done.recv_deadline(deadline);
    }
    let Some(err) = ERR.get() else { return };
    if err.done.recv_deadline(deadline).is_err() {
        return; // stderr is blocked: leave the queue as it is
    }
    FINISHED.store(true, Ordering::Release);
    // Lines queued between log-err's last look and the switch.
    if let Some(own) = OWN.get() {
        while let Ok(line) = own.rx.try_recv() {
            direct(&line);
        }
    }
}

/// The pipes of one worker about to be started: None with `--log-prefix none`.
pub fn pipes() -> io::Result<Option<WorkerPipes>> {
    if !PREFIXING.load(Ordering::Acquire) {
        return Ok(None);
    }
    let (out_r, out_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    let (err_r, err_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    for r in [&out_r, &err_r] {
        fcntl(r, FcntlArg::F_SETFL(OFlag::O_NONBLOCK))?;
    }
    Ok(Some(WorkerPipes { out_r, out_w, err_r, err_w }))
}

/// One worker's two pipes, all four ends, until [`register`](WorkerPipes::register).
pub struct WorkerPipes {
    out_r: OwnedFd,
    out_w: OwnedFd,
    err_r: OwnedFd,
    err_w: OwnedFd,
}

impl WorkerPipes {
    /// The write ends, to become the worker's fds 1 and 2.
    pub fn child_fds(&self) -> [RawFd; 2] {
        [self.out_w.as_raw_fd(), self.err_w.as_raw_fd()]
    }

    /// After the fork: close the write ends here and hand the read ends to the pumps.
    pub fn register(self, slot: usize, pid: i32) {
        let WorkerPipes { out_r, out_w, err_r, err_w } = self;
        drop((out_w, err_w));
        let prefix = format!("[{slot} {pid}] ").into_bytes();
        if let Ok(mut o) = OPEN.lock() {
            o.push((out_r.as_raw_fd(), false, prefix.clone()));
            o.push((err_r.as_raw_fd(), true, prefix.clone()));
        }
        if let Some(pump) = OUT.get() {
            pump.send(Msg::Pipe(Stream::new(out_r, prefix.clone())));
        }
        if let Some(pump) = ERR.get() {
            pump.send(Msg::Pipe(Stream::new(err_r, prefix)));
        }
    }
}

/// The logger's target: hands each formatted record (one whole line) to `log-err`.
struct OwnLog;

impl Write for OwnLog {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match (ERR.get(), OWN.get()) {
            (Some(pump), Some(own)) if !FINISHED.load(Ordering::Acquire) => match own.tx.try_send(buf.to_vec()) {
                Ok(()) => pump.wake(),
                Err(TrySendError::Full(_)) => {
                    own.dropped.fetch_add(1, Ordering::Relaxed);
                }
                Err(TrySendError::Disconnected(_)) => direct(buf),
            },
            _ => direct(buf),
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Write `data` to `fd`, ignoring errors (the last resort of the log itself).
fn direct(data: &[u8]) {
    let _ = FdSink::Stderr(io::stderr()).write_all(data);
}

/// Where an [`Out`] writes.
pub trait Sink {
    fn write_all(&mut self, data: &[u8]) -> io::Result<()>;
}

/// The launcher's fd 1 or 2, written with blocking semantics whatever its flags (the file
/// description is shared with whoever started the launcher: its flags are left alone).
enum FdSink {
    Stdout(io::Stdout),
    Stderr(io::Stderr),
}

impl FdSink {
    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            FdSink::Stdout(s) => s.as_fd(),
            FdSink::Stderr(s) => s.as_fd(),
        }
    }
}

impl Sink for FdSink {
    fn write_all(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            match nix::unistd::write(self.fd(), data) {
                Ok(n) => data = &data[n..],
                Err(Errno::EINTR) => {}
                // Someone made the shared file description non-blocking: wait until writable.
                Err(Errno::EAGAIN) => {
                    let mut pfd = [PollFd::new(self.fd(), PollFlags::POLLOUT)];
                    let _ = poll(&mut pfd, PollTimeout::NONE);
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
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
    fn line(&mut self, parts: &[&[u8]]) {
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
    fd: Option<OwnedFd>,
    prefix: Vec<u8>,
    partial: Vec<u8>,
    /// The next piece continues a line that was split.
    continued: bool,
}

impl Stream {
    fn new(fd: OwnedFd, prefix: Vec<u8>) -> Stream {
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

/// A pump thread's state.
struct PumpThread {
    epoll: Epoll,
    wake: Arc<EventFd>,
    rx: Receiver<Msg>,
    /// `log-err` only: the launcher's own log lines.
    own: Option<Receiver<Vec<u8>>>,
    streams: HashMap<u64, Stream>,
    next_token: u64,
    out: Out<FdSink>,
    /// Finishing: stop at this instant, or when every stream reached EOF.
    finish_at: Option<Instant>,
    buf: Vec<u8>,
}

impl Pump {
    fn start(name: &str, sink: FdSink, own: Option<Receiver<Vec<u8>>>) -> io::Result<Pump> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        let wake = Arc::new(EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?);
        epoll.add(wake.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, WAKE))?;
        let (tx, rx) = crossbeam_channel::unbounded();
        let (done_tx, done) = crossbeam_channel::bounded(1);
        let mut t = PumpThread {
            epoll,
            wake: wake.clone(),
            rx,
            own,
            streams: HashMap::new(),
            next_token: 0,
            out: Out::new(sink),
            finish_at: None,
            buf: vec![0; READ_CHUNK],
        };
        std::thread::Builder::new().name(name.into()).spawn(move || {
            t.run();
            let _ = done_tx.send(());
        })?;
        Ok(Pump { tx, wake, done })
    }
}

impl PumpThread {
    fn run(&mut self) {
        let mut events = [EpollEvent::empty(); 64];
        loop {
            let timeout = match self.finish_at {
                None => EpollTimeout::NONE,
                Some(at) => {
                    let ms = at.saturating_duration_since(Instant::now()).as_millis().min(1000) as u16;
                    EpollTimeout::from(ms)
                }
            };
            let n = match self.epoll.wait(&mut events, timeout) {
                Ok(n) => n,
                Err(Errno::EINTR) => 0,
                Err(e) => {
                    direct(format!("reuse-launch: error: log thread: epoll_wait: {e}\n").as_bytes());
                    std::thread::sleep(Duration::from_millis(100));
                    0
                }
            };
            for ev in &events[..n] {
                match ev.data() {
                    WAKE => {
                        let _ = self.wake.read();
                    }
                    token => self.read(token),
                }
            }
            self.take_messages();
            self.out.flush();
            if let Some(at) = self.finish_at {
                if self.streams.is_empty() || Instant::now() >= at {
                    for (_, mut s) in self.streams.drain() {
                        s.end(&mut self.out);
                    }
                    self.take_messages();
                    self.out.flush();
                    return;
                }
            }
        }
    }

    /// One read from the stream `token`; at EOF (or an error) its last line and its end.
    fn read(&mut self, token: u64) {
        let Some(s) = self.streams.get_mut(&token) else { return };
        let Some(fd) = s.fd.as_ref() else { return };
        match nix::unistd::read(fd, &mut self.buf) {
            Ok(0) => {}
            Ok(n) => return s.feed(&self.buf[..n], &mut self.out),
            Err(Errno::EAGAIN | Errno::EINTR) => return,
            Err(_) => {}
        }
        let _ = self.epoll.delete(fd);
        forget(fd.as_raw_fd());
        s.end(&mut self.out);
        self.streams.remove(&token);
    }

    /// New pipes, the finish order, and the launcher's own log lines.
    fn take_messages(&mut self) {
        while let Ok(msg) = self.rx.try_recv() {
            match msg {
                Msg::Pipe(stream) => {
                    let token = self.next_token;
                    self.next_token += 1;
                    let Some(fd) = stream.fd.as_ref() else { continue };
                    match self.epoll.add(fd, EpollEvent::new(EpollFlags::EPOLLIN, token)) {
                        Ok(()) => {
                            self.streams.insert(token, stream);
                        }
                        Err(e) => direct(format!("reuse-launch: error: log thread: epoll_ctl: {e}\n").as_bytes()),
                    }
                }
                Msg::Finish => self.finish_at = Some(Instant::now() + DRAIN),
            }
        }
        if let Some(own) = &self.own {
            while let Ok(line) = own.try_recv() {
                self.out.line(&[&line]);
            }
            if let Some(counter) = OWN.get() {
                let dropped = counter.dropped.swap(0, Ordering::Relaxed);
                if dropped > 0 {
                    let note = format!(
                        "reuse-launch: warn: {dropped} log lines of the launcher were dropped: its stderr was not being read\n"
                    );
                    self.out.line(&[note.as_bytes()]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
