//! What the supervisor loop reacts to: [`Event`]s from the signal thread and the notify reader,
//! all on one crossbeam channel, and the [`WorkerId`] that names a worker in them.
//!
//! This module owns the signal thread: signal-hook's handler only records the signal; the
//! thread turns each into an `Event::Signal` for the loop. Nothing here touches a worker.

use crossbeam_channel::Sender;
use signal_hook::consts::signal::*;

use crate::error::Error;

/// The supervisor's id of one worker process (never reused within a launcher's life).
pub type WorkerId = u64;

/// Something the loop must react to.
#[derive(Debug)]
pub enum Event {
    Signal(i32),
    /// An sd_notify datagram from a worker's tree: its `KEY=VALUE` fields.
    Notify(WorkerId, Vec<(String, String)>),
}

/// The signals the launcher handles; everything else keeps its default action.
pub const HANDLED: [i32; 9] = [SIGCHLD, SIGTERM, SIGINT, SIGQUIT, SIGHUP, SIGUSR2, SIGUSR1, SIGTTIN, SIGTTOU];

/// Install the handlers and start the thread that forwards each signal to `tx`. Call before
/// the first worker is forked, so that no SIGCHLD can be missed.
pub fn start_signal_thread(tx: Sender<Event>) -> Result<(), Error> {
    let mut signals = signal_hook::iterator::Signals::new(HANDLED)
        .map_err(|e| Error::Failed(format!("cannot install signal handlers: {e}")))?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                if tx.send(Event::Signal(sig)).is_err() {
                    return;
                }
            }
        })
        .map_err(|e| Error::Failed(format!("cannot start the signal thread: {e}")))?;
    Ok(())
}
