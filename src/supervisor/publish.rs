//! `--metrics`: what the loop publishes for the endpoint's thread (see [`crate::metrics`]).
//!
//! At every turn the loop stores a heartbeat (one atomic store). It rebuilds the published
//! [`View`] (a [`Snapshot`](crate::snapshot::Snapshot) of its tables and the serving-slot
//! count) only when a cheap fingerprint of those tables changed, or [`REFRESH`] after the last
//! build (for the uptimes and backoffs), not at every 20 ms turn of the queue watch. While
//! `--metrics` is on, the loop turns at least every [`BEAT_EVERY`], so that an idle launcher
//! (no timer due, shared mode) still beats and `/healthz` can tell idle from stuck.

use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::os::Os;
use super::workers::State;
use super::Supervisor;
use crate::error::Error;
use crate::metrics::health::BEAT_EVERY;
use crate::metrics::{self, Board, Settings, View};

/// A published view is rebuilt at least this often even when nothing changed.
pub(super) const REFRESH: Duration = Duration::from_secs(1);

/// What the outside is told of the loop.
pub(super) struct Publishing {
    /// The launcher's own service manager (systemd), if it gave us NOTIFY_SOCKET.
    pub(super) reporter: crate::upstream::Reporter,
    /// "all N workers ready" was said (and READY=1 sent) since the last change of N.
    pub(super) all_ready_logged: bool,
    /// `--metrics`: what the endpoint's thread reads, and when and from what the loop last
    /// published.
    pub(super) board: Option<Arc<Board>>,
    published: Option<(Instant, u64)>,
}

impl Publishing {
    pub(super) fn new(now: Instant) -> Publishing {
        Publishing {
            reporter: crate::upstream::Reporter::from_env(now),
            all_ready_logged: false,
            board: None,
            published: None,
        }
    }

    /// The numbers changed (a scale): "all N workers ready" is to be said again.
    pub(super) fn count_changed(&mut self) {
        self.all_ready_logged = false;
    }

    /// The launcher stops (or drains first): told once to the service manager, and `/readyz`.
    pub(super) fn stopping(&mut self, first: bool) {
        if first {
            self.reporter.stopping();
        }
        if let Some(board) = &self.board {
            board.set_stopping();
        }
    }
}

impl<O: Os> Supervisor<O> {
    /// With `--metrics`: bind the endpoint and start its thread, before any worker starts.
    pub(super) fn start_metrics(&mut self, now: Instant) -> Result<(), Error> {
        let Some(addr) = self.cfg.metrics else { return Ok(()) };
        let board = Arc::new(Board::new(now, self.view(now)));
        let local = metrics::start(addr, board.clone(), Settings { min_ready: self.cfg.min_ready })?;
        log::info!("serving /metrics, /healthz and /readyz on http://{local}");
        self.publishing.published = Some((now, self.fingerprint()));
        self.publishing.board = Some(board);
        Ok(())
    }

    fn view(&self, now: Instant) -> View {
        View { snapshot: self.snapshot(now), serving: self.serving_slots().len() }
    }

    /// The heartbeat, and a new view when the tables changed or the last one is old.
    pub(super) fn publish(&mut self, now: Instant) {
        let Some(board) = &self.publishing.board else { return };
        board.beat(now);
        let fingerprint = self.fingerprint();
        if self.publishing.published.is_some_and(|(at, f)| f == fingerprint && now < at + REFRESH) {
            return;
        }
        board.publish(self.view(now));
        self.publishing.published = Some((now, fingerprint));
    }

    /// The next turn the heartbeat needs (None without --metrics).
    pub(super) fn next_beat(&self) -> Option<Instant> {
        self.publishing.board.as_ref().map(|b| b.last_beat() + BEAT_EVERY)
    }

    /// A hash of what the published view is made of (everything but the uptimes and the
    /// backoffs' remaining time).
    fn fingerprint(&self) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        for (id, w) in self.workers.iter() {
            let state = match w.state {
                State::Starting { .. } => 0u8,
                State::Ready => 1,
                State::Stopping { .. } => 2,
            };
            (id, w.slot, w.gen, state, w.candidate).hash(&mut h);
        }
        for s in self.slots.iter() {
            let restarts: u64 = s.restarts.values().sum();
            let stalled = s.route.stall.why().is_some();
            (s.gen, restarts, s.respawn_at.is_some(), s.retiring.is_some(), stalled).hash(&mut h);
        }
        let stop = &self.halt;
        (self.scaling.desired, self.roll.progress(), stop.shutdown.is_some(), stop.drain_until.is_some()).hash(&mut h);
        self.router.steered().hash(&mut h);
        self.intercept.interceptor.as_ref().map(|i| i.counts()).hash(&mut h);
        h.finish()
    }
}
