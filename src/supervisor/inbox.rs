//! The loop's inbox: signals (the signal thread), notify messages (the notify reader, with
//! `--ready notify` or `--watchdog`), control commands and queue wakes arrive as [`Event`]s on
//! one channel; the loop waits on it until its next deadline.

use std::time::Instant;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use crate::cli::{Config, Ready};
use crate::command::Identity;
use crate::error::Error;
use crate::event::{Event, WorkerId};
use crate::notify::NotifyHub;

/// The loop's inbox: one channel for every source (see [`Event`]), and the notify reader.
pub(super) struct Channels {
    pub(super) tx: Sender<Event>,
    pub(super) rx: Receiver<Event>,
    pub(super) notify: Option<NotifyHub>,
}

impl Channels {
    /// The notify reader with `--ready notify` or `--watchdog`.
    pub(super) fn open(cfg: &Config, identity: Option<&Identity>) -> Result<Channels, Error> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let notify = if cfg.ready == Ready::Notify || cfg.watchdog.is_some() {
            let uid = identity.map(|i| i.creds.uid);
            let hub = NotifyHub::start(tx.clone(), uid)
                .map_err(|e| Error::Failed(format!("cannot start the notify reader: {e}")))?;
            Some(hub)
        } else {
            None
        };
        Ok(Channels { tx, rx, notify })
    }

    /// The next event, waiting until `deadline` at most (None: it passed first).
    pub(super) fn next(&self, deadline: Option<Instant>) -> Result<Option<Event>, Error> {
        let closed = || Error::Failed("event channel closed".into());
        match deadline {
            Some(at) => match self.rx.recv_timeout(at.saturating_duration_since(Instant::now())) {
                Ok(ev) => Ok(Some(ev)),
                Err(RecvTimeoutError::Timeout) => Ok(None),
                Err(RecvTimeoutError::Disconnected) => Err(closed()),
            },
            None => Ok(Some(self.rx.recv().map_err(|_| closed())?)),
        }
    }

    /// Worker `id` is gone: its notify socket closes.
    pub(super) fn forget(&self, id: WorkerId) {
        if let Some(hub) = &self.notify {
            hub.close(id);
        }
    }
}
