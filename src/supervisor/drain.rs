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
use super::Supervisor;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Shutdown {
    Graceful,
    Immediate,
}

/// Where the launcher is on its way out.
#[derive(Debug, Default)]
pub(super) struct Stop {
    /// The workers were told to stop (or killed).
    pub(super) shutdown: Option<Shutdown>,
    /// `--drain-delay`: TERM/INT arrived; the workers are stopped at this time.
    pub(super) drain_until: Option<Instant>,
}

impl Stop {
    /// Rolls, scaling and reexec are refused during the drain delay (the one rule, for the
    /// signals and the control commands alike).
    pub(super) fn refuse_while_draining(&self) -> Result<(), String> {
        match self.drain_until.is_some() && self.shutdown.is_none() {
            true => Err("the launcher is draining before its stop".into()),
            false => Ok(()),
        }
    }

    /// Stopping, or draining before the stop (`status`'s `stopping`).
    pub(super) fn stopping(&self) -> bool {
        self.shutdown.is_some() || self.drain_until.is_some()
    }
}

impl<O: Os> Supervisor<O> {
    /// TERM or INT (`name`) arrived.
    pub(super) fn stop_signal(&mut self, name: &str, now: Instant) {
        if self.halt.shutdown.is_some() {
            self.stop_all(Shutdown::Immediate, now);
            return;
        }
        if self.halt.drain_until.is_some() {
            log::info!("{name} again during the drain delay: stopping the workers now");
            self.stop_all(Shutdown::Graceful, now);
            return;
        }
        let delay = self.cfg.drain_delay;
        if delay.is_zero() {
            self.stop_all(Shutdown::Graceful, now);
            return;
        }
        self.publishing.stopping(true);
        self.halt.drain_until = Some(now + delay);
        log::info!(
            "{name}: draining for {delay:?} before stopping the workers: /readyz says 503, workers keep serving \
             (send {name} again to stop them now)"
        );
    }

    /// The drain delay is over: the graceful stop begins.
    pub(super) fn drain_due(&mut self, now: Instant) {
        if self.halt.shutdown.is_none() && self.halt.drain_until.is_some_and(|at| now >= at) {
            log::info!("drain delay over");
            self.stop_all(Shutdown::Graceful, now);
        }
    }
}
