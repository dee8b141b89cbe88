//! Where the launcher's listening sockets come from, in one place ([`open`]): handed over by
//! the image before a `reexec` ([`Parts`], by fd), taken back from the service manager's fd
//! store, inherited by socket activation (LISTEN_FDS), or bound here; in that order of
//! precedence. `main` calls [`open`] once; nothing else makes a [`Listeners`].

use std::os::fd::{AsRawFd, FromRawFd, RawFd};

use serde::{Deserialize, Serialize};
use socket2::Socket;

use super::{BindSpec, Listeners, Mode, Restored};
use crate::error::Error;

/// What `reexec` carries of the listeners: mode, backlog, each bind with its bound address, and
/// every listening socket's fd in the layout of [`Listeners`] (slot * binds + bind).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Parts {
    pub mode: Mode,
    pub backlog: i32,
    pub binds: Vec<BindSpec>,
    pub sockets: Vec<RawFd>,
}

/// The listening sockets: the earlier image's (`handed`, after a reexec), else the fd store's,
/// else socket activation's, else bound for `binds` (`slots` slots in `mode`).
pub fn open(
    binds: &[BindSpec],
    mode: Mode,
    slots: usize,
    backlog: i32,
    handed: Option<&Parts>,
) -> Result<Listeners, Error> {
    if let Some(parts) = handed {
        return Listeners::from_parts(parts);
    }
    let inherited = crate::activation::inherited()?.unwrap_or_default();
    let (stored, activated): (Vec<_>, Vec<_>) = inherited.into_iter().partition(|(_, name)| name.starts_with("rl."));
    if !stored.is_empty() {
        let count = stored.len();
        let Restored { listeners, slots: restored, unknown } = Listeners::restore(stored, binds, mode, slots, backlog)?;
        log::info!(
            "took back {count} listening sockets from the service manager's fd store ({restored} slots keep their queues)"
        );
        for (socket, name) in unknown {
            log::warn!("fd store socket {name} belongs to no --bind of this configuration: kept open, not served");
            std::mem::forget(socket); // closing it would reset what waits there
        }
        if !activated.is_empty() {
            log::warn!("{} sockets from socket activation are ignored: the fd store's are served", activated.len());
        }
        Ok(listeners)
    } else if !activated.is_empty() {
        log::info!("using {} listening sockets inherited from the service manager (LISTEN_FDS)", activated.len());
        Listeners::adopt(activated, mode, slots, backlog)
    } else {
        Listeners::bind(binds, mode, slots, backlog)
    }
}

impl Listeners {
    /// Each bind with its bound address (port 0 resolved), in `--bind` order.
    pub fn binds(&self) -> Vec<BindSpec> {
        self.binds.iter().zip(&self.local).map(|(b, a)| BindSpec { name: b.name.clone(), addr: *a }).collect()
    }

    /// What `reexec` carries over (the fds stay open across the exec).
    pub fn parts(&self) -> Parts {
        let sockets = self.sockets.iter().map(|s| s.as_raw_fd()).collect();
        Parts { mode: self.mode, backlog: self.backlog, binds: self.binds(), sockets }
    }

    /// The listeners of an earlier image (`reexec`): its sockets are open here already,
    /// listening, in their groups; each fd is checked, made CLOEXEC again and owned from now on.
    fn from_parts(parts: &Parts) -> Result<Listeners, Error> {
        let mut sockets = Vec::with_capacity(parts.sockets.len());
        for fd in &parts.sockets {
            crate::activation::check_is_open(*fd).map_err(Error::Failed)?;
            // SAFETY: the old image kept this listening socket open across the exec for us, and
            // nothing else in this image owns it.
            let sock = unsafe { Socket::from_raw_fd(*fd) };
            sock.set_cloexec(true).map_err(|e| Error::Failed(format!("handed-over socket {fd}: {e}")))?;
            sockets.push(sock);
        }
        let (binds, local) = (parts.binds.clone(), parts.binds.iter().map(|b| b.addr).collect());
        Ok(Listeners { mode: parts.mode, binds, local, sockets, public: Vec::new(), backlog: parts.backlog })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handed_parts_make_the_same_listeners() {
        let binds = [BindSpec::parse("127.0.0.1:0", 0).unwrap(), BindSpec::parse("admin=127.0.0.1:0", 1).unwrap()];
        let l = Listeners::bind(&binds, Mode::Reuseport, 2, 16).unwrap();
        let parts = l.parts();
        assert_eq!(parts.binds.iter().map(|b| b.addr).collect::<Vec<_>>(), l.local_addrs());
        assert_eq!(parts.sockets.len(), 4);
        // The fds as a new image finds them: open, owned by nobody (the old Listeners forgets them).
        std::mem::forget(l);
        let again = open(&[], Mode::Shared, 9, 1, Some(&parts)).unwrap();
        assert_eq!(again.parts(), parts);
        assert_eq!(again.slot_count(), Some(2));
    }

    #[test]
    fn a_handed_fd_that_is_not_open_is_refused() {
        let parts = Parts { mode: Mode::Shared, backlog: 16, binds: Vec::new(), sockets: vec![100_000] };
        assert!(open(&[], Mode::Shared, 1, 16, Some(&parts)).is_err());
    }
}
