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
use nix::fcntl::OFlag;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};

mod lines;
mod pump;
use lines::{Sink, Stream};

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
    crate::sys::set_cloexec(&[fd], true);
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
        crate::sys::set_nonblock(r, true)?;
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
