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
//! Lifetimes: a worker's entry (its notification fd and its slot's sockets) is removed when its
//! main process has been reaped, before any of its slot's sockets can close (a retiring slot
//! closes only once it has no worker). An fd of the launcher is installed into a worker only
//! under the registry's lock and only while the worker's entry is there, so a socket the
//! launcher has closed (or an fd number reused since) can never be given out. For a `reexec` the
//! thread is stopped first ([`Interceptor::pause`]): a call it had read would otherwise be left
//! unanswered; calls not yet read wait in their fds for the new image.

mod filter;
mod handler;
mod probe;

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};

pub use filter::{install, send_fd, ChildFilter};
use handler::Decision;
pub use handler::Target;

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
    /// and goes on without. `holds_sockets`: the mode has launcher sockets to give (every mode
    /// but `self`).
    pub fn setup(setting: Setting, holds_sockets: bool) -> Result<Interception, String> {
        if setting == Setting::Off {
            return Ok(Interception::off("off"));
        }
        if !holds_sockets {
            if setting == Setting::On {
                return Err(
                    "--intercept-bind on needs a mode in which the launcher holds the sockets (not self)".into()
                );
            }
            return Ok(Interception::off("off (self mode: workers bind for themselves)"));
        }
        let child = ChildFilter::new(!filter::has_sys_admin());
        match probe::probe(&child) {
            Ok(()) => {}
            Err(cause) if setting == Setting::On => return Err(format!("--intercept-bind on: {cause}")),
            Err(cause) => {
                log::warn!("bind() interception is unavailable ({cause}); {HINT}");
                return Ok(Interception { interceptor: None, state: format!("unavailable: {cause}") });
            }
        }
        let interceptor = Interceptor::start(child).map_err(|e| format!("cannot start the bind() interceptor: {e}"))?;
        let nnp = if child.no_new_privs { "; workers run with no_new_privs" } else { "" };
        log::info!("a worker's own bind() of a --bind port gets its slot's socket (seccomp user notification{nnp})");
        Ok(Interception { interceptor: Some(interceptor), state: "on".into() })
    }
}

/// The token of the thread's wake-up eventfd (worker ids start at 1).
const WAKE: u64 = 0;

/// Registered workers and the thread that answers their calls.
pub struct Interceptor {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
    child: ChildFilter,
}

struct Shared {
    registry: Mutex<Registry>,
    epoll: Epoll,
    wake: EventFd,
    stop: AtomicBool,
    binds: AtomicU64,
    listens: AtomicU64,
}

#[derive(Default)]
struct Registry {
    entries: HashMap<u64, Entry>,
}

struct Entry {
    notif: Arc<OwnedFd>,
    /// `worker 2 (pid 123, gen 4)`, for the log.
    label: Arc<str>,
    targets: Arc<[Target]>,
    taken: u64,
    warned: bool,
}

impl Interceptor {
    fn start(child: ChildFilter) -> io::Result<Interceptor> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        let wake = EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?;
        epoll.add(wake.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, WAKE))?;
        let shared = Arc::new(Shared {
            registry: Mutex::default(),
            epoll,
            wake,
            stop: AtomicBool::new(false),
            binds: AtomicU64::new(0),
            listens: AtomicU64::new(0),
        });
        let mut i = Interceptor { shared, thread: None, child };
        i.resume()?;
        Ok(i)
    }

    /// What `spawn` installs in each worker.
    pub fn child_filter(&self) -> &ChildFilter {
        &self.child
    }

    /// Serve worker `id`'s calls from now on: `notif` is its filter's notification fd (from
    /// `spawn`, or kept across a reexec), `targets` its slot's sockets.
    pub fn register(&self, id: u64, label: String, notif: OwnedFd, targets: Vec<Target>) -> io::Result<()> {
        let mut reg = self.lock();
        self.shared.epoll.add(notif.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, id))?;
        let entry =
            Entry { notif: Arc::new(notif), label: label.into(), targets: targets.into(), taken: 0, warned: false };
        reg.entries.insert(id, entry);
        Ok(())
    }

    /// Worker `id` has been reaped: close its notification fd (calls of processes of its tree
    /// that outlived it fail with ENOSYS).
    pub fn forget(&self, id: u64) {
        if let Some(e) = self.lock().entries.remove(&id) {
            let _ = self.shared.epoll.delete(e.notif.as_fd());
        }
    }

    /// Binds taken over and listens answered without the kernel, since start.
    pub fn counts(&self) -> (u64, u64) {
        (self.shared.binds.load(Ordering::Relaxed), self.shared.listens.load(Ordering::Relaxed))
    }

    /// Every registered worker's notification fd, by worker id (for a reexec).
    pub fn fds(&self) -> Vec<(u64, RawFd)> {
        let mut fds: Vec<(u64, RawFd)> = self.lock().entries.iter().map(|(id, e)| (*id, e.notif.as_raw_fd())).collect();
        fds.sort_unstable();
        fds
    }

    /// Stop the thread after the call it is answering, if any (before a reexec).
    pub fn pause(&mut self) {
        let Some(t) = self.thread.take() else { return };
        self.shared.stop.store(true, Ordering::SeqCst);
        let _ = self.shared.wake.write(1);
        let _ = t.join();
        self.shared.stop.store(false, Ordering::SeqCst);
    }

    /// Start (again) the thread that answers the calls.
    pub fn resume(&mut self) -> io::Result<()> {
        if self.thread.is_some() {
            return Ok(());
        }
        let shared = self.shared.clone();
        self.thread = Some(std::thread::Builder::new().name("intercept".into()).spawn(move || run(&shared))?);
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, Registry> {
        self.shared.registry.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Interceptor {
    fn drop(&mut self) {
        self.pause();
    }
}

/// The thread: wait for calls, answer at most one per worker per turn.
fn run(shared: &Shared) {
    let mut events = [EpollEvent::empty(); 64];
    loop {
        let n = match shared.epoll.wait(&mut events, EpollTimeout::NONE) {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                log::error!("the bind() interceptor stops: epoll_wait: {e}");
                return;
            }
        };
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        for ev in &events[..n] {
            match ev.data() {
                WAKE => drop(shared.wake.read()),
                id => serve(shared, id, ev.events()),
            }
        }
    }
}

/// Answer one call of worker `id`.
fn serve(shared: &Shared, id: u64, events: EpollFlags) {
    let found = {
        let reg = shared.registry.lock().unwrap_or_else(|e| e.into_inner());
        reg.entries.get(&id).map(|e| (e.notif.clone(), e.targets.clone(), e.label.clone()))
    };
    let Some((notif, targets, label)) = found else { return };
    if !events.contains(EpollFlags::EPOLLIN) {
        // Hung up: no process of the worker's tree runs under the filter any more.
        let _ = shared.epoll.delete(notif.as_fd());
        return;
    }
    let call = match handler::receive(notif.as_fd()) {
        Ok(Some(call)) => call,
        Ok(None) => return,
        Err(e) => {
            log::debug!("{label}: cannot read a trapped call: {e}");
            return;
        }
    };
    let mut warning = None;
    let decision = handler::decide(notif.as_fd(), &call, &targets, &mut |w| warning = Some(w));
    let result = match decision {
        Decision::Install { .. } => {
            // Under the lock, and only while the worker is registered: its targets are open.
            let mut reg = shared.registry.lock().unwrap_or_else(|e| e.into_inner());
            match reg.entries.get_mut(&id) {
                Some(entry) => {
                    let r = handler::carry_out(notif.as_fd(), call.id, decision, &targets);
                    if matches!(r, Ok(true)) {
                        entry.taken += 1;
                        log_taken(&label, &call, &decision, &targets, entry.taken);
                    }
                    r
                }
                None => handler::carry_out(notif.as_fd(), call.id, Decision::Continue, &targets),
            }
        }
        d => handler::carry_out(notif.as_fd(), call.id, d, &targets),
    };
    match (result, decision) {
        (Ok(true), Decision::Install { .. }) => drop(shared.binds.fetch_add(1, Ordering::Relaxed)),
        (Ok(true), Decision::Return(0)) if call.nr == libc::SYS_listen => {
            shared.listens.fetch_add(1, Ordering::Relaxed);
        }
        (Ok(_), _) => {}
        (Err(e), _) => log::warn!("{label}: cannot answer its {}: {e}", name(call.nr)),
    }
    if let Some(w) = warning {
        let mut reg = shared.registry.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = reg.entries.get_mut(&id).filter(|e| !e.warned) {
            entry.warned = true;
            log::warn!("{label}: its bind() of a --bind port goes to the kernel: {w}");
        }
    }
}

fn name(nr: i64) -> &'static str {
    if nr == libc::SYS_bind {
        "bind()"
    } else {
        "listen()"
    }
}

fn log_taken(label: &str, call: &handler::Call, decision: &Decision, targets: &[Target], n: u64) {
    let Decision::Install { target, newfd, want, .. } = *decision else { return };
    let line = format!(
        "{label}: bind() of {want} on fd {newfd} (thread {}) got the slot's socket for {}",
        call.tid, targets[target].addr
    );
    if n == 1 {
        log::info!("{line}");
    } else {
        log::debug!("{line}");
    }
}
