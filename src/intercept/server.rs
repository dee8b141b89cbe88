//! The interceptor: the registered workers ([`Interceptor::register`], [`Interceptor::forget`])
//! and the thread that answers their trapped calls, one per worker per turn of its epoll wait.
//!
//! Each worker's entry holds its own duplicates of its slot's sockets ([`Target::sock`]), so an
//! fd installed into a worker is always one of those sockets, never an fd number the launcher
//! may have closed or reused meanwhile, and no lock is held while a call is answered: an
//! `ADDFD` waits until the worker has installed the fd, which closes the file it had on that
//! number, and a hostile worker could make that close wait (a file of its own FUSE mount).
//!
//! A call that keeps the thread longer than [`HELD`] (a worker whose address page never
//! answers a read: its own userfaultfd or FUSE) is reported to the supervisor loop by a small
//! watchdog thread (`Event::Held`); the loop kills that worker, which ends the wait. Stopping
//! the thread (before a reexec, at exit) waits at most [`STOP_WAIT`] for it.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};

use super::filter::ChildFilter;
use super::handler::{self, Decision, Target};
use crate::event::{Event, WorkerId};

/// A call kept this long is reported to the loop, which kills the worker that made it.
pub const HELD: Duration = Duration::from_secs(2);
/// How long stopping the thread waits for the call it is answering.
const STOP_WAIT: Duration = Duration::from_secs(2);
/// The token of the thread's wake-up eventfd (worker ids start at 1).
const WAKE: u64 = 0;

/// Registered workers and the thread that answers their calls.
pub struct Interceptor {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
    watchdog: Option<std::thread::JoinHandle<()>>,
    child: ChildFilter,
}

struct Shared {
    registry: Mutex<Registry>,
    epoll: Epoll,
    wake: EventFd,
    stop: AtomicBool,
    /// The serving thread runs (cleared when it returns).
    running: AtomicBool,
    binds: AtomicU64,
    listens: AtomicU64,
    /// The call being answered: since when (ms after `base`, 0: none) and whose.
    base: Instant,
    busy_since: AtomicU64,
    busy_worker: AtomicU64,
    events: Sender<Event>,
    /// The O_NONBLOCK setting a bind last gave each slot socket, by inode: a later bind that
    /// wants the other one is logged (the flag is the socket's, shared by the slot's workers).
    nonblock_by_bind: Mutex<HashMap<u64, bool>>,
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
    /// Warned once already (the rest of its warnings go to the debug log).
    warned: bool,
}

impl Interceptor {
    pub(super) fn start(child: ChildFilter, events: Sender<Event>) -> io::Result<Interceptor> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        let wake = EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?;
        epoll.add(wake.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, WAKE))?;
        let shared = Arc::new(Shared {
            registry: Mutex::default(),
            epoll,
            wake,
            stop: AtomicBool::new(false),
            running: AtomicBool::new(false),
            binds: AtomicU64::new(0),
            listens: AtomicU64::new(0),
            base: Instant::now(),
            busy_since: AtomicU64::new(0),
            busy_worker: AtomicU64::new(0),
            events,
            nonblock_by_bind: Mutex::default(),
        });
        let mut i = Interceptor { shared, thread: None, watchdog: None, child };
        i.resume()?;
        Ok(i)
    }

    /// What `spawn` installs in each worker.
    pub fn child_filter(&self) -> &ChildFilter {
        &self.child
    }

    /// Serve worker `id`'s calls from now on: `notif` is its filter's notification fd (from
    /// `spawn`, or kept across a reexec), `targets` its slot's sockets (this entry's own dups).
    pub fn register(&self, id: WorkerId, label: String, notif: OwnedFd, targets: Vec<Target>) -> io::Result<()> {
        let mut reg = self.lock();
        self.shared.epoll.add(notif.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, id))?;
        let entry =
            Entry { notif: Arc::new(notif), label: label.into(), targets: targets.into(), taken: 0, warned: false };
        reg.entries.insert(id, entry);
        Ok(())
    }

    /// Worker `id` has been reaped: close its notification fd (calls of processes of its tree
    /// that outlived it fail with ENOSYS) and its dups of the slot's sockets.
    pub fn forget(&self, id: WorkerId) {
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

    /// Stop the threads after the call being answered, if any (before a reexec): waits at most
    /// [`STOP_WAIT`]; a thread still held by a worker's call is left behind (an exec ends it).
    pub fn pause(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let _ = self.shared.wake.write(1);
        let end = Instant::now() + STOP_WAIT;
        while self.shared.running.load(Ordering::SeqCst) && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(2));
        }
        match self.thread.take() {
            Some(t) if !self.shared.running.load(Ordering::SeqCst) => drop(t.join()),
            Some(_) => log::warn!("the bind() interceptor is held by a worker's call; going on without it"),
            None => {}
        }
        if let Some(w) = self.watchdog.take() {
            w.thread().unpark();
            let _ = w.join();
        }
        self.shared.stop.store(false, Ordering::SeqCst);
    }

    /// Start (again) the threads that answer the calls and watch them.
    pub fn resume(&mut self) -> io::Result<()> {
        if self.thread.is_none() {
            let shared = self.shared.clone();
            shared.running.store(true, Ordering::SeqCst);
            let spawned = std::thread::Builder::new().name("intercept".into()).spawn(move || {
                run(&shared);
                shared.running.store(false, Ordering::SeqCst);
            });
            self.thread = Some(spawned.inspect_err(|_| self.shared.running.store(false, Ordering::SeqCst))?);
        }
        if self.watchdog.is_none() {
            let shared = self.shared.clone();
            self.watchdog =
                Some(std::thread::Builder::new().name("intercept-watch".into()).spawn(move || watch(&shared))?);
        }
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, Registry> {
        self.shared.lock()
    }
}

impl Drop for Interceptor {
    fn drop(&mut self) {
        self.pause();
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn now_ms(&self) -> u64 {
        self.base.elapsed().as_millis() as u64 + 1
    }

    /// Log `line` as a warning the first time for worker `id`, then at debug level.
    fn warn_once(&self, id: u64, line: &str) {
        let first = self.lock().entries.get_mut(&id).is_some_and(|e| !std::mem::replace(&mut e.warned, true));
        if first {
            log::warn!("{line}");
        } else {
            log::debug!("{line}");
        }
    }
}

/// The serving thread: wait for calls, answer at most one per worker per turn.
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

/// The watchdog: every second, report a call that has kept the serving thread over [`HELD`].
fn watch(shared: &Shared) {
    let mut reported = 0;
    while !shared.stop.load(Ordering::SeqCst) {
        std::thread::park_timeout(Duration::from_secs(1));
        let since = shared.busy_since.load(Ordering::SeqCst);
        if since == 0 || since == reported {
            continue;
        }
        let held = Duration::from_millis(shared.now_ms().saturating_sub(since));
        if held >= HELD {
            reported = since;
            let _ = shared.events.send(Event::Held(shared.busy_worker.load(Ordering::SeqCst), held));
        }
    }
}

/// Answer one call of worker `id`.
fn serve(shared: &Shared, id: u64, events: EpollFlags) {
    let found = shared.lock().entries.get(&id).map(|e| (e.notif.clone(), e.targets.clone(), e.label.clone()));
    let Some((notif, targets, label)) = found else { return };
    if !events.contains(EpollFlags::EPOLLIN) {
        // Hung up: no process of the worker's tree runs under the filter any more.
        let _ = shared.epoll.delete(notif.as_fd());
        return;
    }
    shared.busy_worker.store(id, Ordering::SeqCst);
    shared.busy_since.store(shared.now_ms(), Ordering::SeqCst);
    answer(shared, id, &notif, &targets, &label);
    shared.busy_since.store(0, Ordering::SeqCst);
}

fn answer(shared: &Shared, id: u64, notif: &OwnedFd, targets: &[Target], label: &str) {
    let call = match handler::receive(notif.as_fd()) {
        Ok(Some(call)) => call,
        Ok(None) => return,
        Err(e) => {
            log::debug!("{label}: cannot read a trapped call: {e}");
            return;
        }
    };
    let (decision, why) = handler::decide(notif.as_fd(), &call, targets);
    if let Some(why) = why {
        shared.warn_once(id, &format!("{label}: its {why}"));
    }
    match handler::carry_out(notif.as_fd(), call.id, decision, targets) {
        Ok(Some(done)) => match decision {
            Decision::Install { target, newfd, want, nonblock, .. } => {
                shared.binds.fetch_add(1, Ordering::Relaxed);
                let taken = shared.lock().entries.get_mut(&id).map_or(0, |e| {
                    e.taken += 1;
                    e.taken
                });
                let line = format!(
                    "{label}: bind() of {want} on fd {newfd} (thread {}) got the slot's socket for {}",
                    call.tid, targets[target].addr
                );
                if taken == 1 {
                    log::info!("{line}");
                } else {
                    log::debug!("{line}");
                }
                let before = {
                    let mut set = shared.nonblock_by_bind.lock().unwrap_or_else(|e| e.into_inner());
                    set.insert(targets[target].ino, nonblock)
                };
                if done.flipped_nonblock.is_some() && before.is_some_and(|b| b != nonblock) {
                    let how = if nonblock { "non-blocking" } else { "blocking" };
                    let line = format!(
                        "{label}: its bind() made the slot's socket {how}, which an earlier worker's bind had made \
                         the other way (O_NONBLOCK lives on the socket, which every process of the slot shares)"
                    );
                    shared.warn_once(id, &line);
                }
            }
            Decision::Return(0) if call.nr == libc::SYS_listen => drop(shared.listens.fetch_add(1, Ordering::Relaxed)),
            _ => {}
        },
        Ok(None) => {}
        Err(e) => shared.warn_once(id, &format!("{label}: cannot answer its {}: {e}", handler::name(call.nr))),
    }
}
