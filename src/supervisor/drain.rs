//! `--drain-delay`: on TERM/INT, keep serving for a while before stopping the workers, while
//! `/readyz` already answers 503 and the service manager has been told STOPPING=1. That is the
//! time a balancer (a Kubernetes Service's endpoints, a load balancer probing `/readyz`) needs
//! to stop sending new connections here; Kubernetes' usual preStop `sleep`, without a sleep
//! binary in the image.
//!
//! During the delay workers keep running and are respawned if they die; rolls and scaling are
//! refused. A second TERM/INT ends the delay: the graceful stop (stop signal, `--grace`) starts
//! at once; a TERM/INT after that, or QUIT at any time, kills every worker at once.

use std::time::Instant;

use super::os::Os;
use super::{Shutdown, Supervisor};

impl<O: Os> Supervisor<O> {
    /// TERM or INT (`name`) arrived.
    pub(super) fn stop_signal(&mut self, name: &str, now: Instant) {
        if self.shutdown.is_some() {
            self.stop_all(Shutdown::Immediate, now);
            return;
        }
        if self.drain_until.is_some() {
            log::info!("{name} again during the drain delay: stopping the workers now");
            self.stop_all(Shutdown::Graceful, now);
            return;
        }
        let delay = self.cfg.drain_delay;
        if delay.is_zero() {
            self.stop_all(Shutdown::Graceful, now);
            return;
        }
        if let Some(board) = &self.board {
            board.set_stopping();
        }
        self.drain_until = Some(now + delay);
        self.reporter.stopping();
        log::info!(
            "{name}: draining for {delay:?} before stopping the workers: /readyz says 503, workers keep serving \
             (send {name} again to stop them now)"
        );
    }

    /// The drain delay is over: the graceful stop begins.
    pub(super) fn drain_due(&mut self, now: Instant) {
        if self.shutdown.is_none() && self.drain_until.is_some_and(|at| now >= at) {
            log::info!("drain delay over");
            self.stop_all(Shutdown::Graceful, now);
        }
    }

    /// A roll or a scaling request (`what`) while draining is refused; true if so.
    pub(super) fn refused_while_draining(&self, what: &str) -> bool {
        if self.drain_until.is_some() && self.shutdown.is_none() {
            log::warn!("{what}: ignored, the launcher is draining before its stop");
            return true;
        }
        false
    }
}
