//! What the supervisor loop reacts to: [`Event`]s from the signal thread and the notify reader,
//! all on one crossbeam channel, and the [`WorkerId`] that names a worker in them.
//!
//! This module owns the signal thread: signal-hook's handler only records the signal; the
//! thread turns each into an `Event::Signal` for the loop. Nothing here touches a worker.

use crossbeam_channel::Sender;
use signal_hook::consts::signal::*;

use crate::error::Error;
use crate::snapshot::Snapshot;

/// The supervisor's id of one worker process (never reused within a launcher's life).
pub type WorkerId = u64;

/// Something the loop must react to.
#[derive(Debug)]
pub enum Event {
    Signal(i32),
    /// An sd_notify datagram from a worker's tree: its `KEY=VALUE` fields.
    Notify(WorkerId, Vec<(String, String)>),
    /// A request from the control socket; the loop answers at once on the channel (it never
    /// waits on the client: the control thread does the talking).
    Control(Command, Sender<Reply>),
    /// A worker's trapped bind()/listen() has kept the interceptor's thread this long (see
    /// `intercept`): the loop kills that worker.
    Held(WorkerId, std::time::Duration),
}

/// What a control client can ask the running launcher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Status,
    /// `scale N`, `scale +K`, `scale -K` (never below 1 slot).
    Scale(Scale),
    /// A rolling restart, as USR2.
    Roll,
    /// A graceful stop, as TERM.
    Stop,
    /// Upgrade the launcher in place, first step: check that the binary it was started from
    /// runs, and say which version takes over (answered with `Answer::Reexec`). The control
    /// thread answers its client, then sends `ReexecNow`.
    Reexec,
    /// Second step: exec now. Answered only if the exec failed (the launcher then runs on).
    ReexecNow,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    To(usize),
    By(i64),
}

/// The loop's answer: what it did, or why it refused.
pub type Reply = Result<Answer, String>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Status(Box<Snapshot>),
    /// The desired number of slots now (reached as workers start and slots drain).
    Scaled {
        desired: usize,
    },
    /// The roll that will run this request: its generation (it may follow the one under way).
    Rolling {
        generation: u64,
    },
    Stopping,
    /// The binary that will take over, and what its `--version` printed.
    Reexec {
        path: String,
        version: String,
    },
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
