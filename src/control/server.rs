//! The launcher's end of the control socket: the accept thread, and one thread per client
//! (at most [`MAX_CLIENTS`](super::clients::MAX_CLIENTS) at once; at the cap the client idle
//! longest makes room, see `clients`). Where the socket is bound is `place`'s.
//!
//! Each client is checked with SO_PEERCRED (the launcher's own uid or root; anyone else gets
//! one refusal line). A request is one line of at most [`MAX_LINE`] bytes that must be complete
//! within [`REQUEST_TIMEOUT`] of the previous answer (or of connecting); otherwise the client
//! gets an error line and is dropped. A request becomes an `Event::Control` on the loop's
//! channel; this thread, not the loop, waits for the reply (at most [`REPLY_TIMEOUT`]), then
//! measures what `status` needs and writes the response (at most [`WRITE_TIMEOUT`] blocked on
//! a client that does not read). A slow, stuck or hostile client costs one of these threads,
//! never a turn of the supervisor loop.
//!
//! Why threads here and epoll on the `--metrics` port: the socket is 0600 in a 0700 directory,
//! so its clients are the launcher's own user and root, who can stop the launcher anyway; the
//! work of a request blocks (waiting for the loop, reading /proc for `status`); and the
//! number of threads is bounded. What a forgetful or stuck script of that user could still do,
//! hold every place with idle connections, is undone by the eviction of the idle client.
//!
//! [`ControlSocket`] is the guard that removes the socket file when the launcher returns from
//! `run` (a clean stop or a fatal error alike).

use std::io::{self, ErrorKind, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{RecvTimeoutError, Sender};
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};

use super::clients::{Clients, Ticket};
use super::measure::CpuHistory;
use super::protocol::{self, Body, Response, Upgrade};
use crate::error::Error;
use crate::event::{Answer, Command, Event};

/// The longest request line accepted.
pub const MAX_LINE: usize = 64 * 1024;
/// How long a client may take to send a complete request line.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client thread waits for the supervisor loop's reply (it answers at once unless
/// the launcher is wedged).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long writing a response may block on a client that does not read.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an exiting launcher waits for the answers being written.
const FINISH_TIMEOUT: Duration = Duration::from_secs(1);

/// The bound control socket; dropping it removes the socket file (if it is still ours).
pub struct ControlSocket {
    path: PathBuf,
    /// Device and inode of our socket file, so that we never remove someone else's.
    id: (u64, u64),
    /// Requests being answered: the launcher waits for them (briefly) before it exits, so that
    /// a `stop` gets its answer even when the workers are gone at once.
    busy: Arc<AtomicUsize>,
}

impl ControlSocket {
    /// Bind the control socket at `path` (None: `<default dir>/<pid>.sock`) and start serving
    /// it, sending requests to the loop through `tx`. With the default path a failure is only
    /// a warning (the launcher runs without a control socket); with `--control` it is fatal.
    pub fn start(path: Option<PathBuf>, tx: Sender<Event>) -> Result<Option<ControlSocket>, Error> {
        let explicit = path.is_some();
        let path = path.unwrap_or_else(|| super::default_dir().join(format!("{}.sock", std::process::id())));
        match super::place::bind(&path, explicit) {
            Ok((listener, id)) => {
                let socket = ControlSocket { path: path.clone(), id, busy: Arc::default() };
                let shown = path.display().to_string();
                let busy = socket.busy.clone();
                std::thread::Builder::new()
                    .name("control".into())
                    .spawn(move || accept_loop(listener, tx, shown, busy))
                    .map_err(|e| Error::Failed(format!("cannot start the control thread: {e}")))?;
                log::info!("control socket: {}", path.display());
                Ok(Some(socket))
            }
            Err(e) if explicit => Err(Error::Failed(format!("control socket {}: {e}", path.display()))),
            Err(e) => {
                log::warn!("no control socket ({}: {e}); use --control PATH to put it elsewhere", path.display());
                Ok(None)
            }
        }
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let end = Instant::now() + FINISH_TIMEOUT;
        while self.busy.load(Ordering::SeqCst) > 0 && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(5));
        }
        let ours = std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.id);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn accept_loop(listener: UnixListener, tx: Sender<Event>, path: String, busy: Arc<AtomicUsize>) {
    let clients = Arc::new(Clients::default());
    let cpu = Arc::new(CpuHistory::default());
    for stream in listener.incoming() {
        let mut stream = match stream {
            Ok(s) => s,
            Err(e) => {
                log::warn!("control socket: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(100)); // EMFILE: do not spin
                continue;
            }
        };
        // Checked before it takes a place: a refused client never makes another one leave.
        if let Err(why) = peer_allowed(&stream) {
            log::warn!("control socket: refused a client: {why}");
            let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
            let _ = reply(&mut stream, &Response::failure(None, format!("refused: {why}")));
            continue;
        }
        let ticket = match clients.admit(&stream) {
            Ok(ticket) => ticket,
            Err(why) => {
                let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
                let _ = reply(&mut stream, &Response::failure(None, why));
                continue;
            }
        };
        let client = Client { tx: tx.clone(), cpu: cpu.clone(), path: path.clone(), busy: busy.clone(), ticket };
        let spawned = std::thread::Builder::new().name("control-client".into()).spawn(move || client.serve(stream));
        if let Err(e) = spawned {
            log::warn!("control socket: cannot start a client thread: {e}");
        }
    }
}

/// One connected client, served by its own thread; its place is freed when it is dropped.
struct Client {
    tx: Sender<Event>,
    cpu: Arc<CpuHistory>,
    path: String,
    busy: Arc<AtomicUsize>,
    ticket: Ticket,
}

impl Client {
    fn serve(self, mut stream: UnixStream) {
        let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
        let mut buf: Vec<u8> = Vec::new();
        loop {
            let line = match read_line(&mut stream, &mut buf, Instant::now() + REQUEST_TIMEOUT) {
                Ok(Some(line)) => line,
                Ok(None) => return,
                Err(why) => {
                    let _ = reply(&mut stream, &Response::failure(None, why));
                    return;
                }
            };
            let text = String::from_utf8_lossy(&line);
            if text.trim().is_empty() {
                continue;
            }
            if !self.ticket.busy() {
                return; // disconnected to make room for a new client (it was told so)
            }
            self.busy.fetch_add(1, Ordering::SeqCst);
            let response = self.request(&text);
            let written = reply(&mut stream, &response);
            self.busy.fetch_sub(1, Ordering::SeqCst);
            self.ticket.idle();
            if written.is_err() {
                return;
            }
            if matches!(response.body, Body::Reexec { .. }) {
                // Answered: now the exec. Ending this connection first tells the client to
                // wait for the new image; a failed exec is logged by the launcher, which runs on.
                drop(stream);
                let _ = ask(&self.tx, Command::ReexecNow);
                return;
            }
        }
    }

    /// One request line to its response.
    fn request(&self, text: &str) -> Response {
        let (id, request) = match protocol::decode(text) {
            Ok(decoded) => decoded,
            Err(refused) => return Response::failure(refused.id, refused.error),
        };
        let answer = match ask(&self.tx, request.into()) {
            Ok(a) => a,
            Err(e) => return Response::failure(id, e),
        };
        let pid = std::process::id();
        let body = match answer {
            Answer::Status(snapshot) => {
                let mut status = super::status::status(&snapshot, &self.cpu, &self.path);
                status.pid = pid;
                Body::Status(Box::new(status))
            }
            Answer::Scaled { desired } => Body::Scaled { pid, desired },
            Answer::Rolling { generation } => Body::Rolling { pid, generation },
            Answer::Stopping => Body::Stopping { pid, stopping: true },
            Answer::Reexec { path, version } => Body::Reexec { pid, reexec: Upgrade { binary: path, version } },
        };
        Response::success(id, body)
    }
}

/// Hand `command` to the supervisor loop and wait (here, not there) for its reply.
fn ask(tx: &Sender<Event>, command: Command) -> Result<Answer, String> {
    let (reply_tx, reply_rx) = crossbeam_channel::bounded(1);
    tx.send(Event::Control(command, reply_tx)).map_err(|_| "the launcher is exiting".to_string())?;
    match reply_rx.recv_timeout(REPLY_TIMEOUT) {
        Ok(reply) => reply,
        Err(RecvTimeoutError::Timeout) => Err(format!("the launcher did not answer within {REPLY_TIMEOUT:?}")),
        Err(RecvTimeoutError::Disconnected) => Err("the launcher is exiting".to_string()),
    }
}

/// The client's uid must be ours or root's.
fn peer_allowed(stream: &UnixStream) -> Result<(), String> {
    let creds = getsockopt(stream, PeerCredentials).map_err(|e| format!("cannot read its credentials: {e}"))?;
    let me = nix::unistd::geteuid().as_raw();
    if creds.uid() == me || creds.uid() == 0 {
        Ok(())
    } else {
        Err(format!(
            "uid {} (pid {}) may not control this launcher (only uid {me} and root may)",
            creds.uid(),
            creds.pid()
        ))
    }
}

/// Read up to the next newline (returned without it). Ok(None) at end of input; Err with the
/// message to send back for a line too long or not finished by `deadline`. Bytes after the
/// newline stay in `buf` for the next call. A last line without newline counts at EOF.
fn read_line(stream: &mut UnixStream, buf: &mut Vec<u8>, deadline: Instant) -> Result<Option<Vec<u8>>, String> {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(i) = buf.iter().position(|b| *b == b'\n') {
            let rest = buf.split_off(i + 1);
            let mut line = std::mem::replace(buf, rest);
            line.pop();
            return Ok(Some(line));
        }
        if buf.len() > MAX_LINE {
            return Err(format!("request longer than {MAX_LINE} bytes"));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("no complete request line within {REQUEST_TIMEOUT:?}; closing"));
        }
        let _ = stream.set_read_timeout(Some(left));
        match stream.read(&mut chunk) {
            Ok(0) if buf.is_empty() => return Ok(None),
            Ok(0) => return Ok(Some(std::mem::take(buf))),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return Ok(None),
        }
    }
}

fn reply(stream: &mut UnixStream, response: &Response) -> io::Result<()> {
    stream.write_all(response.line().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Reply;
    use serde_json::Value;
    use std::io::{BufRead, BufReader};

    /// A fake loop that answers each control event like the supervisor would.
    fn fake_loop() -> Sender<Event> {
        let (tx, rx) = crossbeam_channel::unbounded::<Event>();
        std::thread::spawn(move || {
            for ev in rx {
                if let Event::Control(cmd, reply) = ev {
                    let r: Reply = match cmd {
                        Command::Roll => Ok(Answer::Rolling { generation: 2 }),
                        Command::Scale(crate::event::Scale::To(n)) => Ok(Answer::Scaled { desired: n }),
                        Command::Scale(_) => Err("control: cannot scale to 0 workers: at least 1 must run".into()),
                        _ => Ok(Answer::Stopping),
                    };
                    let _ = reply.send(r);
                }
            }
        });
        tx
    }

    fn temp_socket(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("rl-ctl-unit-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir.join("c.sock")
    }

    #[test]
    fn lines_in_lines_out_and_garbage_is_an_error() {
        let path = temp_socket("lines");
        let guard = ControlSocket::start(Some(path.clone()), fake_loop()).unwrap().unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert_eq!(std::fs::metadata(path.parent().unwrap()).unwrap().mode() & 0o777, 0o700);
        let mut s = UnixStream::connect(&path).unwrap();
        s.write_all(b"{\"cmd\":\"roll\",\"id\":7}\nnot json\n{\"cmd\":\"scale\",\"workers\":3}\n").unwrap();
        s.write_all(
            b"{\"cmd\":\"scale\",\"workers\":\"-9\"}\n{\"cmd\":\"dance\"}\n{\"cmd\":\"scale\",\"workers\":-1}\n",
        )
        .unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut next = || {
            let mut l = String::new();
            r.read_line(&mut l).unwrap();
            serde_json::from_str::<serde_json::Value>(&l).unwrap()
        };
        let roll = next();
        assert_eq!(roll.get("id").and_then(Value::as_u64), Some(7));
        assert_eq!(roll.get("generation").and_then(Value::as_u64), Some(2));
        let bad = next();
        assert_eq!(bad.get("ok"), Some(&Value::Bool(false)));
        assert!(bad.get("error").and_then(Value::as_str).unwrap().starts_with("invalid request: invalid JSON"));
        assert_eq!(next().get("desired").and_then(Value::as_u64), Some(3));
        assert!(next().get("error").and_then(Value::as_str).unwrap().contains("at least 1"));
        assert!(next().get("error").and_then(Value::as_str).unwrap().starts_with("unknown cmd 'dance'"));
        assert!(next().get("error").and_then(Value::as_str).unwrap().contains("-1 is not a number of workers"));
        // A line over the cap: an error, then the connection is closed.
        s.write_all(&vec![b'x'; MAX_LINE + 10]).unwrap();
        let huge = next();
        assert!(huge.get("error").and_then(Value::as_str).unwrap().contains("longer than"), "{huge}");
        drop(guard);
        assert!(!path.exists(), "the socket is removed with its guard");
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    #[test]
    fn a_live_socket_is_not_taken_over_and_a_stale_one_is() {
        let path = temp_socket("stale");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let stale = UnixListener::bind(&path).unwrap();
        drop(stale); // the file stays, nobody listens: stale
        let first = ControlSocket::start(Some(path.clone()), fake_loop()).unwrap().unwrap();
        let second = ControlSocket::start(Some(path.clone()), fake_loop());
        assert!(second.err().unwrap().to_string().contains("another launcher answers"));
        drop(first);
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }
}
