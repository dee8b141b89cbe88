//! Taking over a worker's own `bind()` (`--intercept-bind`): a server that binds the launcher's
//! port itself (node's `listen(PORT)`, Go's `ListenAndServe`, python, the JDK, nginx, redis)
//! gets its slot's listening socket on the fd it called `bind()` with, and its `listen()` on it
//! returns 0 without touching the socket (the launcher's `--backlog` stays). The server runs
//! unchanged, and every guarantee the launcher gives a worker on fd 3 holds: the socket is the
//! launcher's, held across restarts, steered, rescued.
//!
//! How: every worker starts under a seccomp filter (`filter`; installed by `spawn` between fork
//! and exec, inherited by everything the worker starts) that hands the worker's `bind` and
//! `listen` calls to the launcher (`SECCOMP_RET_USER_NOTIF`); every other system call stays on
//! the kernel's allow cache. The child sends the filter's notification fd to the launcher, which
//! registers it here with the slot's sockets ([`Interceptor::register`]). One thread (not the
//! supervisor loop: a slow or hostile worker never holds the loop up) waits on every worker's
//! notification fd with epoll and answers each call (`handler`). Fairness: each turn it answers
//! at most one call per worker with calls waiting, so a worker that floods bind/listen delays
//! nobody else by more than one call each. Needs Linux 5.9 (ADDFD with SETFD); `probe` checks
//! the whole path with a throw-away child at start.
//!
//! Lifetimes (`server`): a worker's entry (its notification fd and its own dups of its slot's
//! sockets) is removed when its main process has been reaped, before any of its slot's sockets
//! can close (a retiring slot closes only once it has no worker). For a `reexec` the thread is
//! stopped first ([`Interceptor::pause`]): a call it had read would otherwise be left
//! unanswered; calls not yet read wait in their fds for the new image, which adopts the fds
//! without probing again. A call that holds the thread (a hostile worker) is reported to the
//! loop, which kills that worker.

mod filter;
mod handler;
mod probe;
mod server;

use std::fmt;
use std::str::FromStr;

use crossbeam_channel::Sender;

use crate::command::Credentials;
use crate::event::Event;
pub use filter::{install, send_fd, ChildFilter};
pub use handler::Target;
pub use server::Interceptor;

/// `--intercept-bind`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Setting {
    /// On where the kernel allows it; a line at start says why not elsewhere.
    Auto,
    /// Refuse to start without it.
    On,
    Off,
}

impl FromStr for Setting {
    type Err = String;
    fn from_str(s: &str) -> Result<Setting, String> {
        match s {
            "auto" => Ok(Setting::Auto),
            "on" => Ok(Setting::On),
            "off" => Ok(Setting::Off),
            _ => Err("expected 'auto', 'on' or 'off'".into()),
        }
    }
}

impl fmt::Display for Setting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Setting::Auto => "auto",
            Setting::On => "on",
            Setting::Off => "off",
        })
    }
}

/// What a worker must do when its own bind() is not taken over (logged, and in the give-up
/// message).
pub const HINT: &str = "workers must use the inherited listening sockets (fd 3 and up, LISTEN_FDS) \
    or run with --intercept-bind (a server that binds PORT itself fails with EADDRINUSE)";

/// What deciding at start needs besides `--intercept-bind`.
pub struct Setup<'a> {
    pub setting: Setting,
    /// The mode has launcher sockets to give (every mode but `self`).
    pub holds_sockets: bool,
    /// `--user`: the probe checks the path with the credentials workers will have.
    pub creds: Option<&'a Credentials>,
    /// A reexec'd image whose old image intercepted: it goes on without probing again (a
    /// transient failure must not take the handed-over workers' interception away).
    pub resumed_on: bool,
    /// Where the interceptor reports a worker whose call holds it (`Event::Held`).
    pub events: Sender<Event>,
}

/// Whether workers' binds are taken over, decided once at start.
pub struct Interception {
    /// Running when they are.
    pub interceptor: Option<Interceptor>,
    /// `on`, `off`, `off (self mode: ...)` or `unavailable: CAUSE` (status, /metrics).
    pub state: String,
}

impl Interception {
    pub fn off(state: &str) -> Interception {
        Interception { interceptor: None, state: state.into() }
    }

    /// Decide: `On` without the kernel's support is an error naming the cause; `Auto` logs it
    /// and goes on without.
    pub fn setup(s: Setup) -> Result<Interception, String> {
        if s.setting == Setting::Off {
            return Ok(Interception::off("off"));
        }
        if !s.holds_sockets {
            if s.setting == Setting::On {
                return Err(
                    "--intercept-bind on needs a mode in which the launcher holds the sockets (not self)".into()
                );
            }
            return Ok(Interception::off("off (self mode: workers bind for themselves)"));
        }
        let child = match ChildFilter::new(!filter::has_sys_admin()) {
            Ok(child) if s.resumed_on => child,
            Ok(child) => match probe::probe(&child, s.creds) {
                Ok(()) => child,
                Err(cause) => return unavailable(s.setting, cause),
            },
            Err(cause) => return unavailable(s.setting, cause),
        };
        let interceptor =
            Interceptor::start(child, s.events).map_err(|e| format!("cannot start the bind() interceptor: {e}"))?;
        let nnp = if child.no_new_privs { "; workers run with no_new_privs" } else { "" };
        log::info!("a worker's own bind() of a --bind port gets its slot's socket (seccomp user notification{nnp})");
        Ok(Interception { interceptor: Some(interceptor), state: "on".into() })
    }
}

fn unavailable(setting: Setting, cause: String) -> Result<Interception, String> {
    if setting == Setting::On {
        return Err(format!("--intercept-bind on: {cause}"));
    }
    log::warn!("bind() interception is unavailable ({cause}); {HINT}");
    Ok(Interception { interceptor: None, state: format!("unavailable: {cause}") })
}
