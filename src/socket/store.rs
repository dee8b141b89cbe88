//! The fd store side of [`Listeners`]: the names under which the launcher hands its sockets to
//! the service manager's fd store (`upstream::Reporter::store_fds`), and taking them back at the
//! next start (`LISTEN_FDS`/`LISTEN_FDNAMES`), each to its slot.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};

use socket2::Socket;

use super::{bound_socket, listen_all, BindSpec, Listeners, Mode};
use crate::error::Error;

/// What [`Listeners::restore`] took back: the listeners, how many slots kept their sockets, and
/// the stored sockets no bind of the configuration names.
pub struct Restored {
    pub listeners: Listeners,
    pub slots: usize,
    pub unknown: Vec<(Socket, String)>,
}

impl Listeners {
    /// Every socket the service manager's fd store should keep, with its name: `rl.<bind>.<slot>`
    /// for a reuseport slot's socket, `rl.<bind>` for the shared socket or round-robin's public
    /// one (its private per-slot sockets are not kept: a few connections at most wait there).
    pub fn store_names(&self) -> Vec<(RawFd, String)> {
        let names: Vec<&str> = self.names().collect();
        match self.mode {
            Mode::Reuseport => {
                let n = names.len();
                self.sockets
                    .iter()
                    .enumerate()
                    .map(|(i, s)| (s.as_raw_fd(), format!("rl.{}.{}", names[i % n], i / n)))
                    .collect()
            }
            Mode::Shared => self.sockets.iter().zip(&names).map(|(s, b)| (s.as_raw_fd(), format!("rl.{b}"))).collect(),
            Mode::RoundRobin => {
                self.public.iter().zip(&names).map(|(s, b)| (s.as_raw_fd(), format!("rl.{b}"))).collect()
            }
            Mode::SelfBind => Vec::new(),
        }
    }

    /// The fd store names of slot `slot`'s sockets (see [`store_names`](Self::store_names)).
    pub fn slot_store_names(&self, slot: usize) -> Vec<String> {
        match self.mode {
            Mode::Reuseport => self.names().map(|b| format!("rl.{b}.{slot}")).collect(),
            _ => Vec::new(),
        }
    }

    /// Serve the sockets a previous launcher handed to the fd store (names `rl.<bind>.<slot>`
    /// or `rl.<bind>`, see [`store_names`](Self::store_names)) for `binds`: each bind's stored
    /// sockets, slot by slot from 0, keep their queues and their places in the group (members
    /// were only ever closed from the end); slots beyond them get new sockets, which join the
    /// group last. Returns the listeners, how many slots were restored, and the stored sockets
    /// no bind of this configuration names (the caller keeps them out of service).
    pub fn restore(
        mut stored: Vec<(Socket, String)>,
        binds: &[BindSpec],
        mode: Mode,
        slots: usize,
        backlog: i32,
    ) -> Result<Restored, Error> {
        let mut local: Vec<SocketAddr> = binds.iter().map(|b| b.addr).collect();
        let Assembly { sockets, public, restored, fresh } = match mode {
            Mode::Reuseport => per_slot(&mut stored, binds, slots, &mut local)?,
            Mode::Shared | Mode::RoundRobin => one_per_bind(&mut stored, binds, mode, slots, &mut local)?,
            Mode::SelfBind => {
                return Err(Error::Failed("--mode self cannot take sockets back from the fd store".into()))
            }
        };
        // Listen on what is new, in order: restored sockets are listening already.
        let listen_new: Vec<&Socket> = match mode {
            Mode::Reuseport | Mode::Shared => fresh.iter().map(|i| &sockets[*i]).collect(),
            _ => fresh.iter().map(|i| &public[*i]).chain(sockets.iter()).collect(),
        };
        listen_all(listen_new, backlog)?;
        let binds = binds.iter().zip(&local).map(|(b, a)| BindSpec { name: b.name.clone(), addr: *a }).collect();
        Ok(Restored {
            listeners: Listeners { mode, binds, local, sockets, public, backlog },
            slots: restored,
            unknown: stored,
        })
    }
}

/// The sockets [`Listeners::restore`] puts together before listening on the new ones.
#[derive(Default)]
struct Assembly {
    sockets: Vec<Socket>,
    public: Vec<Socket>,
    /// How many slots kept their stored sockets.
    restored: usize,
    /// The new ones (not listening yet): indices into `sockets` (reuseport, shared) or `public`.
    fresh: Vec<usize>,
}

/// The stored socket named `name`, taken out of `stored`.
fn take(stored: &mut Vec<(Socket, String)>, name: &str) -> Option<Socket> {
    stored.iter().position(|(_, n)| n == name).map(|i| stored.remove(i).0)
}

fn addr_of(s: &Socket) -> Option<SocketAddr> {
    s.local_addr().ok().and_then(|a| a.as_socket())
}

/// Reuseport: each bind on its own, its stored sockets for slots 0, 1, ... (a prefix: members
/// were only ever closed from the end). A bind added since has none, a slot one bind lacks gets
/// a new socket, which joins that bind's group last, in slot order. `local` gets the stored
/// sockets' addresses.
fn per_slot(
    stored: &mut Vec<(Socket, String)>,
    binds: &[BindSpec],
    slots: usize,
    local: &mut [SocketAddr],
) -> Result<Assembly, Error> {
    let mut a = Assembly::default();
    let mut per_bind: Vec<std::vec::IntoIter<Socket>> = Vec::new();
    for (b, bind) in binds.iter().enumerate() {
        let mut kept = Vec::new();
        while let Some(s) = take(stored, &format!("rl.{}.{}", bind.name, kept.len())) {
            kept.push(s);
        }
        if let Some(first) = kept.first() {
            local[b] = addr_of(first).unwrap_or(local[b]);
        }
        a.restored = a.restored.max(kept.len());
        per_bind.push(kept.into_iter());
    }
    for _slot in 0..slots.max(a.restored) {
        for (b, kept) in per_bind.iter_mut().enumerate() {
            match kept.next() {
                Some(s) => a.sockets.push(s),
                None => {
                    a.fresh.push(a.sockets.len());
                    a.sockets.push(bound_socket(local[b], true)?);
                }
            }
        }
    }
    Ok(a)
}

/// Shared and round-robin: one stored socket per bind (`rl.<bind>`), or a new one; round-robin's
/// private per-slot sockets are always new. `local` gets the stored sockets' addresses.
fn one_per_bind(
    stored: &mut Vec<(Socket, String)>,
    binds: &[BindSpec],
    mode: Mode,
    slots: usize,
    local: &mut [SocketAddr],
) -> Result<Assembly, Error> {
    let mut a = Assembly::default();
    for (b, bind) in binds.iter().enumerate() {
        let s = match take(stored, &format!("rl.{}", bind.name)) {
            Some(s) => {
                a.restored = 1;
                local[b] = addr_of(&s).unwrap_or(local[b]);
                s
            }
            None => {
                a.fresh.push(b);
                bound_socket(bind.addr, false)?
            }
        };
        if mode == Mode::Shared {
            a.sockets.push(s)
        } else {
            a.public.push(s)
        }
    }
    if mode == Mode::RoundRobin {
        let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
        for _ in 0..slots * binds.len() {
            a.sockets.push(bound_socket(loopback, false)?);
        }
    }
    Ok(a)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    /// A reuseport group of `n` listening sockets on one port, stored as `rl.<name>.<slot>`.
    fn stored(name: &str, n: usize) -> (Vec<(Socket, String)>, SocketAddr) {
        let mut addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let mut out = Vec::new();
        for slot in 0..n {
            let s = bound_socket(addr, true).unwrap();
            s.listen(16).unwrap();
            addr = s.local_addr().unwrap().as_socket().unwrap();
            out.push((s, format!("rl.{name}.{slot}")));
        }
        (out, addr)
    }

    /// Found in review: with a bind added since, every stored slot failed as a whole and its
    /// sockets were dropped or left unserved in their group.
    #[test]
    fn a_bind_added_since_keeps_the_stored_slots_of_the_others() {
        let (sockets, http) = stored("http", 2);
        let fds: Vec<i32> = sockets.iter().map(|s| s.0.as_raw_fd()).collect();
        let binds = vec![
            BindSpec { name: "http".into(), addr: http },
            BindSpec { name: "admin".into(), addr: "127.0.0.1:0".parse().unwrap() },
        ];
        let r = Listeners::restore(sockets, &binds, Mode::Reuseport, 3, 16).unwrap();
        assert!(r.unknown.is_empty());
        assert_eq!(r.slots, 2);
        assert_eq!(r.listeners.slot_count(), Some(3));
        // Slots 0 and 1 keep their stored http sockets; slot 2 and every admin socket are new.
        assert_eq!(r.listeners.fds_for_slot(0)[0], fds[0]);
        assert_eq!(r.listeners.fds_for_slot(1)[0], fds[1]);
        assert!(!fds.contains(&r.listeners.fds_for_slot(2)[0]));
        assert_eq!(r.listeners.local_addrs()[0], http);
    }

    #[test]
    fn a_stored_bind_no_longer_configured_is_returned_unserved() {
        let (sockets, _) = stored("old", 1);
        let binds = vec![BindSpec { name: "http".into(), addr: "127.0.0.1:0".parse().unwrap() }];
        let r = Listeners::restore(sockets, &binds, Mode::Reuseport, 2, 16).unwrap();
        assert_eq!(r.unknown.iter().map(|u| u.1.as_str()).collect::<Vec<_>>(), vec!["rl.old.0"]);
        assert_eq!((r.slots, r.listeners.slot_count()), (0, Some(2)));
    }
}
