//! The launcher's own reports to whoever started it with NOTIFY_SOCKET (systemd `Type=notify`):
//! READY=1 once every slot serves, RELOADING=1/READY=1 around a roll, STOPPING=1, a STATUS= line
//! whenever the picture changes, and WATCHDOG=1 pings at half of its WATCHDOG_USEC. Sending is
//! best effort: a failure is logged once and never stops the launcher.
//!
//! And the fd store: every listening socket is handed to the service manager (`FDSTORE=1`,
//! one `FDNAME=` per socket, see `Listeners::store_names`), so that a restart or a crash of the
//! launcher closes none of them: clients wait in the queues and the next launcher, started with
//! them as LISTEN_FDS, adopts each by name. A slot closed by a scale-down is taken out of the
//! store first (`FDSTOREREMOVE=1`): a copy left there would keep it in its reuseport group.

use std::os::fd::{AsRawFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::{Duration, Instant};

/// The launcher's own sd_notify channel to its supervisor (systemd `Type=notify`), when it was
/// started with NOTIFY_SOCKET. Sending is best effort: a failure is logged once.
struct Upstream {
    sock: UnixDatagram,
    addr: SocketAddr,
    /// NOTIFY_SOCKET as given, for messages that carry fds.
    target: String,
    failed: std::cell::Cell<bool>,
}

impl Upstream {
    /// From the launcher's NOTIFY_SOCKET (a path, or `@name` for the abstract namespace).
    fn from_env() -> Option<Upstream> {
        let value = std::env::var("NOTIFY_SOCKET").ok().filter(|v| !v.is_empty())?;
        let addr = match value.strip_prefix('@') {
            Some(name) => SocketAddr::from_abstract_name(name.as_bytes()),
            None => SocketAddr::from_pathname(&value),
        };
        let made = addr.and_then(|addr| Ok((UnixDatagram::unbound()?, addr)));
        match made {
            Ok((sock, addr)) => Some(Upstream { sock, addr, target: value, failed: Default::default() }),
            Err(e) => {
                log::warn!("cannot use NOTIFY_SOCKET={value}: {e}");
                None
            }
        }
    }

    /// `message` with `fd` attached (SCM_RIGHTS).
    fn send_fd(&self, message: &str, fd: RawFd) -> std::io::Result<()> {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};
        let addr = match self.target.strip_prefix('@') {
            Some(name) => UnixAddr::new_abstract(name.as_bytes()),
            None => UnixAddr::new(self.target.as_str()),
        }?;
        let fds = [fd];
        let iov = [std::io::IoSlice::new(message.as_bytes())];
        sendmsg(self.sock.as_raw_fd(), &iov, &[ControlMessage::ScmRights(&fds)], MsgFlags::empty(), Some(&addr))?;
        Ok(())
    }

    fn send(&self, message: &str) {
        if let Err(e) = self.sock.send_to_addr(message.as_bytes(), &self.addr) {
            if !self.failed.replace(true) {
                log::warn!("cannot notify the service manager: {e}");
            }
        }
    }
}

/// What the supervisor reports upstream, and when the next watchdog ping is due.
pub struct Reporter {
    upstream: Option<Upstream>,
    last_status: String,
    /// The launcher's own watchdog pings: interval and next ping.
    ping: Option<(Duration, Instant)>,
}

impl Reporter {
    /// From the launcher's environment (NOTIFY_SOCKET, WATCHDOG_USEC, WATCHDOG_PID); a reporter
    /// that says nothing when there is no service manager.
    pub fn from_env(now: Instant) -> Reporter {
        let upstream = Upstream::from_env();
        let ping = upstream.as_ref().and_then(|_| launcher_watchdog()).map(|every| (every, now));
        Reporter { upstream, last_status: String::new(), ping }
    }

    /// There is a service manager to report to.
    pub fn active(&self) -> bool {
        self.upstream.is_some()
    }

    fn tell(&self, message: &str) {
        if let Some(up) = &self.upstream {
            up.send(message);
        }
    }

    /// Every slot serves (at start, or a roll ended either way).
    pub fn ready(&self) {
        self.tell(&format!("READY=1\nMAINPID={}", std::process::id()));
    }

    /// Hand `sockets` (fd, name) to the service manager's fd store. Logged once if it fails
    /// (no `FileDescriptorStoreMax=` in the unit, say): the launcher runs on without.
    pub fn store_fds(&self, sockets: &[(RawFd, String)]) {
        let Some(up) = &self.upstream else { return };
        for (fd, name) in sockets {
            if let Err(e) = up.send_fd(&format!("FDSTORE=1\nFDNAME={name}"), *fd) {
                log::warn!("cannot hand socket {name} to the service manager's fd store: {e}");
                return;
            }
        }
        log::debug!("{} sockets handed to the service manager's fd store", sockets.len());
    }

    /// Take socket `name` out of the fd store (before the launcher closes it).
    pub fn remove_fd(&self, name: &str) {
        self.tell(&format!("FDSTOREREMOVE=1\nFDNAME={name}"));
    }

    /// A roll ended (done or abandoned): serving again.
    pub fn reloaded(&self) {
        self.tell("READY=1");
    }

    /// A roll starts.
    pub fn reloading(&self) {
        self.tell(&format!("RELOADING=1\nMONOTONIC_USEC={}", monotonic_usec()));
    }

    pub fn stopping(&self) {
        self.tell("STOPPING=1");
    }

    /// STATUS=, only when it changed.
    pub fn status(&mut self, status: String) {
        if self.active() && status != self.last_status {
            self.tell(&format!("STATUS={status}"));
            self.last_status = status;
        }
    }

    /// Ping the service manager's watchdog when due.
    pub fn tick(&mut self, now: Instant) {
        if let Some((every, at)) = self.ping {
            if now >= at {
                self.tell("WATCHDOG=1");
                self.ping = Some((every, now + every));
            }
        }
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.ping.map(|p| p.1)
    }
}

/// CLOCK_MONOTONIC in microseconds, as systemd wants it with RELOADING=1.
fn monotonic_usec() -> u128 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u128 * 1_000_000 + t.tv_nsec() as u128 / 1000)
        .unwrap_or(0)
}

/// The launcher's own watchdog interval from systemd (WATCHDOG_USEC, for our pid): ping at half.
fn launcher_watchdog() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    match std::env::var("WATCHDOG_PID") {
        Ok(pid) if pid != std::process::id().to_string() => None,
        _ => Some(Duration::from_micros(usec / 2)),
    }
}
