//! `--metrics ADDR`: an HTTP endpoint for monitoring and orchestrators, served from threads
//! of its own, never from the supervisor loop.
//!
//! - `GET /metrics`: Prometheus text exposition ([`exposition`]): the loop's tables, plus what
//!   costs a /proc read or a syscall per worker (RSS and CPU of each worker's process group,
//!   accept-queue lengths), measured at each scrape on the `metrics-render` thread, plus the
//!   endpoint's own connections ([`limits::Stats`]).
//! - `GET /healthz`: 200 while the supervisor loop turns, 503 once it has not turned for
//!   [`health::STUCK_AFTER`] (a liveness probe). It reads the loop's heartbeat and nothing
//!   else: how many clients are connected, or what they do, does not change the answer.
//! - `GET /readyz`: 200 while at least `--min-ready` workers (default: every desired one) are
//!   ready, else 503 with the reason; 503 from the first moment of a graceful stop (a readiness
//!   probe, and what a balancer in front of several launchers checks).
//!
//! The loop and the endpoint share one [`Board`]: the loop stores a heartbeat at every turn
//! (an atomic), raises the stopping flag at TERM/INT (an atomic), and publishes a [`View`] (a
//! [`Snapshot`] of its tables and the serving-slot count) behind a mutex whenever its picture
//! changed, and at least once a second for the uptimes. The endpoint only ever clones the
//! `Arc` of the latest view under that mutex: it never waits for the loop, and the loop never
//! waits for a client. The HTTP side is hand-written: [`http`] (the protocol, pure),
//! [`conn`] (one nonblocking connection), [`server`] (one epoll thread for every connection,
//! with per-connection deadlines and a cap, and a thread that renders `/metrics`; its module
//! docs list the limits and what a client that exceeds them gets).

pub mod conn;
pub mod exposition;
pub mod health;
pub mod http;
pub mod limits;
mod render;
pub mod server;
#[cfg(test)]
mod tests;

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::Error;
use crate::snapshot::Snapshot;

/// What the loop last published for the endpoint.
#[derive(Debug, Clone)]
pub struct View {
    pub snapshot: Snapshot,
    /// How many slots take new connections (the serving set).
    pub serving: usize,
}

/// The loop's side and the endpoint's side of what they share (see the module docs).
#[derive(Debug)]
pub struct Board {
    base: Instant,
    /// Milliseconds from `base` to the loop's last turn.
    beat: AtomicU64,
    stopping: AtomicBool,
    view: Mutex<Arc<View>>,
}

impl Board {
    pub fn new(now: Instant, view: View) -> Board {
        Board { base: now, beat: AtomicU64::new(0), stopping: AtomicBool::new(false), view: Mutex::new(Arc::new(view)) }
    }

    /// The loop turned at `now`.
    pub fn beat(&self, now: Instant) {
        let ms = now.saturating_duration_since(self.base).as_millis() as u64;
        self.beat.store(ms, Ordering::Relaxed);
    }

    /// When the loop last turned.
    pub fn last_beat(&self) -> Instant {
        self.base + Duration::from_millis(self.beat.load(Ordering::Relaxed))
    }

    /// A graceful stop began (the drain delay's first moment): /readyz says 503 from now on.
    pub fn set_stopping(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    pub fn publish(&self, view: View) {
        let view = Arc::new(view);
        *self.view.lock().unwrap_or_else(|p| p.into_inner()) = view;
    }

    /// The latest view (a clone of its `Arc`: the lock is held for no more than that).
    pub fn view(&self) -> Arc<View> {
        self.view.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// What the endpoint needs besides the board.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// `--min-ready` (None: every desired worker).
    pub min_ready: Option<usize>,
}

/// Bind `addr` (a failure is fatal, before any worker starts) and serve from a thread.
pub fn start(addr: SocketAddr, board: Arc<Board>, settings: Settings) -> Result<SocketAddr, Error> {
    let listener =
        TcpListener::bind(addr).map_err(|e| Error::Failed(format!("failed to bind {addr} (--metrics): {e}")))?;
    let local = listener.local_addr().unwrap_or(addr);
    let stats = Arc::new(limits::Stats::default());
    let (board2, stats2) = (board.clone(), stats.clone());
    let render = move || {
        let view = board2.view();
        let mut measured = exposition::measure(&view.snapshot);
        measured.server = stats2.counts();
        http::Response::ok(exposition::CONTENT_TYPE, exposition::render(&view, &measured))
    };
    server::serve(listener, limits::Limits::DEFAULT, stats, move |path| route(path, &board, settings), render)
        .map_err(|e| Error::Failed(format!("cannot start the --metrics thread: {e}")))?;
    Ok(local)
}

/// How `GET path` is answered: at once for everything but `/metrics`, which is rendered off
/// the event loop.
fn route(path: &str, board: &Board, settings: Settings) -> server::Route {
    use server::Route::{Now, Render};
    match path {
        "/metrics" => Render,
        "/healthz" => match health::live(board.last_beat(), Instant::now()) {
            Ok(()) => Now(http::Response::text(200, "ok\n".into())),
            Err(why) => Now(http::Response::text(503, format!("{why}\n"))),
        },
        "/readyz" => match health::ready(&board.view().snapshot, board.stopping(), settings.min_ready) {
            Ok(what) => Now(http::Response::text(200, format!("{what}\n"))),
            Err(why) => Now(http::Response::text(503, format!("{why}\n"))),
        },
        "/" => Now(http::Response::text(200, "reuse-launch: /metrics /healthz /readyz\n".into())),
        _ => Now(http::Response::text(404, "not found: try /metrics, /healthz or /readyz\n".into())),
    }
}
