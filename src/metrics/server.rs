//! The `--metrics` port's server: one thread (`metrics`) with epoll over nonblocking sockets,
//! and one more (`metrics-render`) that renders `/metrics` pages. No thread per connection,
//! no async runtime.
//!
//! What a client gets, whatever the others do ([`Limits::DEFAULT`]):
//! - A connection that sends nothing is closed after [`Limits::idle`] (10 s), with a 408.
//! - A request must be complete within [`Limits::request`] (2 s) of its first byte, else 408
//!   and close: a client sending a byte a second holds a connection 2 s, not a thread forever.
//! - A malformed or oversized request gets 400, 405, 414 or 431 (see [`super::http`]) at the
//!   first byte that makes it so, and is closed.
//! - An answer must be read within [`Limits::write`] (10 s): it is written as fast as the
//!   client takes it, the rest waits for EPOLLOUT; a client that stops reading is closed.
//! - Answered, the connection is shut down for writing and lingers until the client closes
//!   it, [`Limits::linger`] (2 s) at most (see [`super::conn`]).
//! - At most [`Limits::max_connections`] (1024; half the fd limit if that is lower) are open at
//!   once. A new connection beyond that closes one that is only lingering, else the oldest
//!   one still waiting for its request (it gets a 503); if every connection is being answered
//!   the new one gets a 503. The fd limit itself (EMFILE) is handled the same way; with
//!   nothing to close, accepting pauses for 100 ms instead of spinning.
//!
//! Why a cheap request is never delayed: the loop only accepts, reads, parses and writes what
//! the sockets take without waiting; `/healthz` and `/readyz` are answered on the loop (an
//! atomic and a pointer clone, see [`super::Board`]). `/metrics` reads /proc and a socket
//! option per listener, so the loop hands it to the render thread and goes on; every scrape
//! waiting when a render starts gets that one page (64 scrapers at once cost a render or two,
//! not 64), shared without a copy. A render that takes longer than [`Limits::render`] gets its
//! scrapers a 503.

use std::collections::{BTreeSet, HashMap};
use std::io::{self, ErrorKind};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};

use super::conn::{Conn, Got, Out, Phase, Wrote};
use super::http::Response;
use super::limits::{Closed, Limits, Stats};
use super::render::Renderer;

/// How a route is answered: now, on the loop (cheap), or by the render thread.
pub enum Route {
    Now(Response),
    Render,
}

const LISTENER: u64 = 0;
const WAKE: u64 = 1;
/// Connections accepted per readiness of the listener before the loop serves the others.
const ACCEPT_BATCH: usize = 64;
/// How long accepting pauses when the fd limit is reached and no connection can be closed.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// Serve `listener` from the `metrics` thread: `route(path)` on the loop, `render()` on the
/// `metrics-render` thread for the paths it sends there.
pub fn serve(
    listener: TcpListener,
    limits: Limits,
    stats: Arc<Stats>,
    route: impl Fn(&str) -> Route + Send + 'static,
    render: impl Fn() -> Response + Send + 'static,
) -> io::Result<()> {
    listener.set_nonblocking(true)?;
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
    epoll.add(&listener, EpollEvent::new(EpollFlags::EPOLLIN, LISTENER))?;
    let renderer = Renderer::start(render)?;
    epoll.add(renderer.fd(), EpollEvent::new(EpollFlags::EPOLLIN, WAKE))?;
    let nofile = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).map_or(1024, |l| l.0);
    let cap = limits.max_connections.min((nofile / 2) as usize).max(1);
    stats.set_max(cap);
    let server = Server {
        epoll,
        listener,
        renderer,
        route,
        limits,
        cap,
        stats,
        conns: HashMap::new(),
        next: WAKE + 1,
        timers: BTreeSet::new(),
        reading: BTreeSet::new(),
        lingering: BTreeSet::new(),
        paused: None,
    };
    std::thread::Builder::new().name("metrics".into()).spawn(move || server.run())?;
    Ok(())
}

/// A connection and what the server registered for it (its timer and its phase's set).
struct Entry {
    conn: Conn,
    phase: Phase,
    deadline: Instant,
}

struct Server<R> {
    epoll: Epoll,
    listener: TcpListener,
    renderer: Renderer,
    route: R,
    limits: Limits,
    cap: usize,
    stats: Arc<Stats>,
    conns: HashMap<u64, Entry>,
    /// The next connection's token; tokens are never reused, so a lower one is an older one.
    next: u64,
    timers: BTreeSet<(Instant, u64)>,
    /// Connections waiting for their request, and connections lingering: the ones to close
    /// first at the cap.
    reading: BTreeSet<u64>,
    lingering: BTreeSet<u64>,
    /// Accepting paused (fd limit) until then.
    paused: Option<Instant>,
}

/// What to do with a connection after an event.
enum Next {
    Stay,
    Answer(Out, Option<Closed>),
    Render,
    Close(Option<Closed>),
}

fn interest(phase: Phase) -> EpollFlags {
    match phase {
        Phase::Reading | Phase::Lingering => EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP,
        Phase::Writing => EpollFlags::EPOLLOUT,
        Phase::Rendering => EpollFlags::empty(),
    }
}

fn encoded(status: u16, body: &str) -> Arc<[u8]> {
    Response::text(status, format!("{body}\n")).encode().into()
}

impl<R: Fn(&str) -> Route> Server<R> {
    fn run(mut self) {
        let mut events = vec![EpollEvent::empty(); 256];
        loop {
            let now = Instant::now();
            self.expire(now);
            self.resume_accepting(now);
            let next = self.timers.first().map(|t| t.0).into_iter().chain(self.paused).min();
            let timeout = next.map_or(EpollTimeout::NONE, |at| {
                let ms = at.saturating_duration_since(now).as_nanos().div_ceil(1_000_000);
                EpollTimeout::try_from(ms.min(i32::MAX as u128) as i32).unwrap_or(EpollTimeout::MAX)
            });
            let n = match self.epoll.wait(&mut events, timeout) {
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => 0,
                Err(e) => {
                    log::error!("--metrics: epoll_wait failed: {e}");
                    std::thread::sleep(ACCEPT_PAUSE);
                    0
                }
            };
            let now = Instant::now();
            for ev in &events[..n] {
                match ev.data() {
                    LISTENER => self.accept(now),
                    WAKE => self.rendered(now),
                    token => self.ready(token, ev.events(), now),
                }
            }
            self.start_render(now);
        }
    }

    fn accept(&mut self, now: Instant) {
        for _ in 0..ACCEPT_BATCH {
            match self.listener.accept() {
                Ok((stream, _)) => self.admit(stream, now),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if matches!(e.kind(), ErrorKind::Interrupted | ErrorKind::ConnectionAborted) => {}
                Err(e) => {
                    // EMFILE, ENFILE, ENOBUFS: make room, or stop accepting for a moment.
                    if !self.evict() {
                        log::warn!("--metrics: cannot accept: {e}; pausing for {ACCEPT_PAUSE:?}");
                        let _ = self.epoll.modify(&self.listener, &mut EpollEvent::new(EpollFlags::empty(), LISTENER));
                        self.paused = Some(now + ACCEPT_PAUSE);
                        return;
                    }
                }
            }
        }
    }

    fn resume_accepting(&mut self, now: Instant) {
        if self.paused.is_some_and(|at| at <= now) {
            self.paused = None;
            let _ = self.epoll.modify(&self.listener, &mut EpollEvent::new(EpollFlags::EPOLLIN, LISTENER));
        }
    }

    fn admit(&mut self, stream: TcpStream, now: Instant) {
        if stream.set_nonblocking(true).is_err() {
            return;
        }
        if self.conns.len() >= self.cap && !self.evict() {
            let _ = io::Write::write(&mut &stream, &encoded(503, "too many connections"));
            self.stats.closed(Closed::Refused);
            return;
        }
        let token = self.next;
        self.next += 1;
        if self.epoll.add(&stream, EpollEvent::new(interest(Phase::Reading), token)).is_err() {
            return;
        }
        let deadline = now + self.limits.idle;
        self.timers.insert((deadline, token));
        self.reading.insert(token);
        self.conns.insert(token, Entry { conn: Conn::new(stream, deadline), phase: Phase::Reading, deadline });
        self.stats.set_open(self.conns.len());
    }

    /// Close a lingering connection, else the oldest one waiting for its request (it gets a
    /// 503). False if every connection is being answered.
    fn evict(&mut self) -> bool {
        if let Some(&token) = self.lingering.first() {
            self.close(token, None);
        } else if let Some(&token) = self.reading.first() {
            self.last_words(token, &encoded(503, "too many connections: closing the one idle longest"));
            self.close(token, Some(Closed::Evicted));
        } else {
            return false;
        }
        true
    }

    /// Something happened on connection `token`.
    fn ready(&mut self, token: u64, flags: EpollFlags, now: Instant) {
        let Some(entry) = self.conns.get_mut(&token) else { return };
        let c = &mut entry.conn;
        let next = match c.phase {
            Phase::Reading => {
                let started = c.started();
                match c.read() {
                    Got::Wait => {
                        if !started && c.started() {
                            c.deadline = now + self.limits.request;
                        }
                        Next::Stay
                    }
                    Got::Request { path, head_only } => match (self.route)(&path) {
                        Route::Now(r) => Next::Answer(Out::new(r.encode().into(), head_only), None),
                        Route::Render => Next::Render,
                    },
                    Got::Reject(r) => Next::Answer(Out::new(r.encode().into(), false), Some(Closed::Invalid)),
                    Got::Gone => Next::Close(None),
                }
            }
            Phase::Rendering if flags.intersects(EpollFlags::EPOLLHUP | EpollFlags::EPOLLERR) => Next::Close(None),
            Phase::Rendering => Next::Stay,
            Phase::Writing => match c.write() {
                Wrote::Done => {
                    c.linger(now + self.limits.linger);
                    Next::Stay
                }
                Wrote::Pending => Next::Stay,
                Wrote::Failed => Next::Close(None),
            },
            Phase::Lingering => match c.drain() {
                true => Next::Close(None),
                false => Next::Stay,
            },
        };
        match next {
            Next::Stay => {}
            Next::Answer(out, why) => {
                if let Some(why) = why {
                    self.stats.closed(why);
                }
                return self.answer(token, out, now);
            }
            Next::Render => {
                c.phase = Phase::Rendering;
                c.deadline = now + self.limits.render;
                self.renderer.want(token);
            }
            Next::Close(why) => return self.close(token, why),
        }
        self.sync(token);
    }

    /// Start writing `out` on `token`; done at once, it lingers.
    fn answer(&mut self, token: u64, out: Out, now: Instant) {
        let Some(entry) = self.conns.get_mut(&token) else { return };
        match entry.conn.answer(out, now + self.limits.write) {
            Wrote::Done => entry.conn.linger(now + self.limits.linger),
            Wrote::Pending => {}
            Wrote::Failed => return self.close(token, None),
        }
        self.sync(token);
    }

    /// Bring the timers, the phase sets and the epoll interest in line with the connection.
    fn sync(&mut self, token: u64) {
        let Some(e) = self.conns.get_mut(&token) else { return };
        if e.conn.deadline != e.deadline {
            self.timers.remove(&(e.deadline, token));
            self.timers.insert((e.conn.deadline, token));
            e.deadline = e.conn.deadline;
        }
        if e.conn.phase != e.phase {
            let (old, new) = (e.phase, e.conn.phase);
            e.phase = new;
            let _ = self.epoll.modify(e.conn.stream(), &mut EpollEvent::new(interest(new), token));
            if let Some(set) = self.phase_set(old) {
                set.remove(&token);
            }
            if let Some(set) = self.phase_set(new) {
                set.insert(token);
            }
        }
    }

    /// The connections of `phase` that may be closed to make room.
    fn phase_set(&mut self, phase: Phase) -> Option<&mut BTreeSet<u64>> {
        match phase {
            Phase::Reading => Some(&mut self.reading),
            Phase::Lingering => Some(&mut self.lingering),
            Phase::Rendering | Phase::Writing => None,
        }
    }

    fn close(&mut self, token: u64, why: Option<Closed>) {
        let Some(e) = self.conns.remove(&token) else { return };
        self.timers.remove(&(e.deadline, token));
        self.reading.remove(&token);
        self.lingering.remove(&token);
        if let Some(why) = why {
            self.stats.closed(why);
        }
        self.stats.set_open(self.conns.len());
        // Dropping the stream closes the fd, which takes it out of the epoll set.
    }

    fn last_words(&mut self, token: u64, bytes: &[u8]) {
        if let Some(e) = self.conns.get_mut(&token) {
            let _ = e.conn.last_words(bytes);
        }
    }

    /// Every connection whose deadline passed.
    fn expire(&mut self, now: Instant) {
        while let Some(&(at, token)) = self.timers.first() {
            if at > now {
                return;
            }
            let Some(phase) = self.conns.get(&token).map(|e| e.phase) else {
                self.timers.remove(&(at, token));
                continue;
            };
            match phase {
                Phase::Reading => {
                    self.last_words(token, &encoded(408, "request not complete in time"));
                    self.close(token, Some(Closed::Timeout));
                }
                Phase::Rendering => {
                    let body = format!("/metrics took longer than {:?} to render", self.limits.render);
                    self.answer(token, Out::new(encoded(503, &body), false), now);
                }
                Phase::Writing => self.close(token, Some(Closed::WriteTimeout)),
                Phase::Lingering => self.close(token, None),
            }
        }
    }

    /// Hand the waiting scrapes to the render thread if it is free.
    fn start_render(&mut self, now: Instant) {
        let conns = &self.conns;
        let still = |t| conns.get(&t).is_some_and(|e| e.phase == Phase::Rendering);
        if let Err(orphans) = self.renderer.kick(still) {
            for token in orphans {
                self.answer(token, Out::new(encoded(503, "/metrics cannot be rendered"), false), now);
            }
        }
    }

    /// Pages are ready: to every scrape of their batch that still waits.
    fn rendered(&mut self, now: Instant) {
        for (page, tokens) in self.renderer.pages() {
            for token in tokens {
                let Some(e) = self.conns.get(&token).filter(|e| e.phase == Phase::Rendering) else { continue };
                let out = Out::new(page.clone(), e.conn.head_only());
                self.answer(token, out, now);
            }
        }
    }
}
