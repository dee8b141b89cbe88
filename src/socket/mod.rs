//! Listening sockets: bind specs, the per-slot SO_REUSEPORT group, the one shared socket, or
//! round-robin mode's public socket plus per-slot private loopback sockets; and which fds each
//! slot's worker receives.
//!
//! The launcher binds everything before any worker starts and keeps every socket open for its
//! whole life ([`Listeners`] is dropped only when the launcher exits). Reason: closing a
//! reuseport listener resets every connection queued on it, while a listener the launcher still
//! holds keeps its queue for the slot's next worker (see shared/notes/KERNEL.md). Every socket is
//! CLOEXEC here; `spawn` moves a slot's sockets to fds 3.. of that slot's worker only.

use std::fmt;
use std::io;
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use socket2::{Domain, Protocol, Socket, Type};

use crate::error::Error;

mod open;
mod store;
pub use open::{open, Parts};
pub use store::Restored;

/// One `--bind`: an address and the name it gets in LISTEN_FDNAMES. As text `NAME=ADDR`
/// ([`fmt::Display`], [`FromStr`]); in the reexec state an object `{"name", "addr"}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BindSpec {
    pub name: String,
    pub addr: SocketAddr,
}

impl BindSpec {
    /// Parse `HOST:PORT`, `[V6]:PORT`, `:PORT` (all IPv4 interfaces) or `NAME=ADDR`.
    /// `index` gives the default name (`http`, then `http1`, ...).
    pub fn parse(text: &str, index: usize) -> Result<BindSpec, String> {
        let (name, addr_text) = match text.split_once('=') {
            Some((n, a)) => {
                if n.is_empty() || !n.chars().all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c)) {
                    return Err("the name before '=' must be letters, digits, '_', '-' or '.'".into());
                }
                (n.to_string(), a)
            }
            None if index == 0 => ("http".to_string(), text),
            None => (format!("http{index}"), text),
        };
        let expected = "expected HOST:PORT, [V6]:PORT or :PORT";
        let full = if let Some(port) = addr_text.strip_prefix(':') {
            format!("0.0.0.0:{port}")
        } else {
            addr_text.to_string()
        };
        let (_, port) = full.rsplit_once(':').ok_or(expected)?;
        port.parse::<u16>().map_err(|_| format!("{expected}; '{port}' is not a port number"))?;
        let addr = full
            .to_socket_addrs()
            .map_err(|e| format!("{expected}: {e}"))?
            .next()
            .ok_or_else(|| "the host name has no address".to_string())?;
        Ok(BindSpec { name, addr })
    }
}

impl FromStr for BindSpec {
    type Err = String;

    /// The first `--bind`'s parse (an unnamed address is `http`).
    fn from_str(text: &str) -> Result<BindSpec, String> {
        BindSpec::parse(text, 0)
    }
}

impl fmt::Display for BindSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.name, self.addr)
    }
}

/// How connections are spread over the workers. As text (`--mode`, `status`, the reexec state)
/// its [`fmt::Display`] word, read back by [`FromStr`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// One SO_REUSEPORT socket per slot and bind; the kernel hashes flows over the group.
    #[default]
    Reuseport,
    /// One socket per bind, handed to every worker: one accept queue.
    Shared,
    /// The launcher accepts on the public socket and forwards each connection to the next
    /// worker, which listens on a private loopback socket of its slot (see `proxy`).
    RoundRobin,
    /// The launcher binds nothing: each worker binds PORT itself with SO_REUSEPORT. A worker's
    /// exit then closes its socket and resets the connections queued on it.
    SelfBind,
}

impl Mode {
    pub fn parse(s: &str) -> Result<Mode, String> {
        s.parse()
    }
}

impl FromStr for Mode {
    type Err = String;

    fn from_str(s: &str) -> Result<Mode, String> {
        match s {
            "reuseport" => Ok(Mode::Reuseport),
            "shared" => Ok(Mode::Shared),
            "round-robin" => Ok(Mode::RoundRobin),
            "self" => Ok(Mode::SelfBind),
            _ => Err("expected 'reuseport', 'shared', 'round-robin' or 'self'".into()),
        }
    }
}

impl Serialize for Mode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Mode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Mode, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Reuseport => "reuseport",
            Mode::Shared => "shared",
            Mode::RoundRobin => "round-robin",
            Mode::SelfBind => "self",
        })
    }
}

/// Every listening socket of the launcher, owned for its whole life.
pub struct Listeners {
    mode: Mode,
    binds: Vec<BindSpec>,
    /// The bound address of each bind (port 0 resolved to the real port).
    local: Vec<SocketAddr>,
    /// Reuseport and round-robin: `sockets[slot * binds + bind]` (round-robin: the private
    /// loopback sockets). Shared: `sockets[bind]`. Self: none.
    sockets: Vec<Socket>,
    /// Round-robin: the public sockets the launcher accepts on, until the proxy takes them.
    public: Vec<Socket>,
    /// For the sockets of slots added later (`scale`).
    backlog: i32,
}

/// A bind failure, naming the address and the cause.
fn bind_error(addr: SocketAddr, err: io::Error) -> Error {
    let cause = match err.raw_os_error() {
        Some(libc::EADDRINUSE) => "address already in use (another process listens there)".to_string(),
        Some(libc::EACCES) => "permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)".to_string(),
        Some(libc::EADDRNOTAVAIL) => "address not available on this machine".to_string(),
        _ => err.to_string(),
    };
    Error::Failed(format!("failed to bind {addr}: {cause}"))
}

impl Listeners {
    /// Bind and listen on every socket the configuration needs.
    pub fn bind(binds: &[BindSpec], mode: Mode, slots: usize, backlog: i32) -> Result<Listeners, Error> {
        let mut local = Vec::with_capacity(binds.len());
        // Resolve port 0 and detect "in use" first with a plain socket: a SO_REUSEPORT bind
        // would silently join a group some other process of this user already listens in.
        for b in binds {
            let probe = TcpListener::bind(b.addr).map_err(|err| bind_error(b.addr, err))?;
            local.push(probe.local_addr().map_err(|err| bind_error(b.addr, err))?);
        }
        let mut sockets = Vec::new();
        let mut public = Vec::new();
        match mode {
            Mode::Reuseport => {
                for _slot in 0..slots {
                    for addr in &local {
                        sockets.push(bound_socket(*addr, true)?);
                    }
                }
            }
            Mode::Shared => {
                for addr in &local {
                    sockets.push(bound_socket(*addr, false)?);
                }
            }
            Mode::RoundRobin => {
                for addr in &local {
                    public.push(bound_socket(*addr, false)?);
                }
                let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
                for _ in 0..slots * binds.len() {
                    sockets.push(bound_socket(loopback, false)?);
                }
            }
            Mode::SelfBind => {}
        }
        // Everything is bound; only now start listening, so a failure above left no queue.
        listen_all(public.iter().chain(&sockets), backlog)?;
        Ok(Listeners { mode, binds: binds.to_vec(), local, sockets, public, backlog })
    }

    /// Serve sockets the launcher inherited (systemd socket activation) instead of binding.
    /// In reuseport mode the inherited sockets become slot 0's and every other slot gets a new
    /// socket in the same group, which needs SO_REUSEPORT on the inherited socket (`ReusePort=yes`
    /// in the .socket unit) and the same user as its creator; otherwise they are served shared.
    pub fn adopt(inherited: Vec<(Socket, String)>, mode: Mode, slots: usize, backlog: i32) -> Result<Listeners, Error> {
        let mut local = Vec::new();
        for (s, _) in &inherited {
            local.push(
                s.local_addr()
                    .ok()
                    .and_then(|a| a.as_socket())
                    .ok_or_else(|| Error::Failed("inherited socket has no inet address".into()))?,
            );
        }
        let binds: Vec<BindSpec> = inherited
            .iter()
            .zip(&local)
            .map(|((_, name), addr)| BindSpec { name: name.clone(), addr: *addr })
            .collect();
        let sockets: Vec<Socket> = inherited.into_iter().map(|(s, _)| s).collect();
        let shared = |sockets| {
            Ok(Listeners {
                mode: Mode::Shared,
                binds: binds.clone(),
                local: local.clone(),
                sockets,
                public: Vec::new(),
                backlog,
            })
        };
        if mode == Mode::RoundRobin || mode == Mode::SelfBind {
            return Err(Error::Failed(format!(
                "--mode {mode} cannot serve inherited sockets (LISTEN_FDS): use reuseport or shared"
            )));
        }
        if mode == Mode::Shared || slots == 1 {
            return shared(sockets);
        }
        if let Some((i, _)) = sockets.iter().enumerate().find(|(_, s)| !s.reuse_port().unwrap_or(false)) {
            log::warn!(
                "inherited socket {} has no SO_REUSEPORT (ReusePort=yes in the .socket unit); serving it in shared mode",
                local[i]
            );
            return shared(sockets);
        }
        let mut all = Vec::with_capacity(slots * sockets.len());
        for slot in 1..slots {
            for addr in &local {
                match bound_socket(*addr, true) {
                    Ok(s) => all.push(s),
                    Err(e) => {
                        log::warn!(
                            "cannot add slot {slot}'s socket to the inherited group ({e}); serving it in shared mode"
                        );
                        return shared(sockets);
                    }
                }
            }
        }
        // All bound: join the group (listen) only now, in slot order after the inherited one.
        listen_all(&all, backlog)?;
        let mut ordered = sockets;
        ordered.extend(all);
        Ok(Listeners { mode: Mode::Reuseport, binds, local, sockets: ordered, public: Vec::new(), backlog })
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.local
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.binds.iter().map(|b| b.name.as_str())
    }

    pub fn socket_count(&self) -> usize {
        self.sockets.len() + self.public.len()
    }

    /// Round-robin mode: the public sockets, for the proxy (which keeps them for the
    /// launcher's life).
    pub fn take_public(&mut self) -> Vec<std::net::TcpListener> {
        std::mem::take(&mut self.public).into_iter().map(Into::into).collect()
    }

    /// Round-robin mode: slot `slot`'s private addresses, one per bind.
    pub fn private_addrs(&self, slot: usize) -> Vec<SocketAddr> {
        let n = self.binds.len();
        self.sockets[slot * n..slot * n + n]
            .iter()
            .filter_map(|s| s.local_addr().ok().and_then(|a| a.as_socket()))
            .collect()
    }

    /// One member of each bind's reuseport group (the program attached through it governs the
    /// whole group) and the group's size; empty in the other modes.
    pub fn groups(&self) -> Vec<(RawFd, usize)> {
        match self.mode {
            Mode::Reuseport => {
                let slots = self.sockets.len() / self.binds.len();
                (0..self.binds.len()).map(|b| (self.sockets[b].as_raw_fd(), slots)).collect()
            }
            Mode::Shared | Mode::RoundRobin | Mode::SelfBind => Vec::new(),
        }
    }

    /// How many slots the sockets are for (reuseport and round-robin; None in the other modes,
    /// where any number of slots shares them).
    pub fn slot_count(&self) -> Option<usize> {
        matches!(self.mode, Mode::Reuseport | Mode::RoundRobin).then(|| self.sockets.len() / self.binds.len().max(1))
    }

    /// Add the sockets of one more slot at the end (`scale` up): in reuseport mode new members
    /// of each bind's group, which join it last (their index is the new slot's number); in
    /// round-robin mode new private loopback sockets. Nothing in the other modes.
    pub fn add_slot(&mut self) -> Result<(), Error> {
        let addrs: Vec<SocketAddr> = match self.mode {
            Mode::Reuseport => self.local.clone(),
            Mode::RoundRobin => vec![SocketAddr::from(([127, 0, 0, 1], 0)); self.binds.len()],
            Mode::Shared | Mode::SelfBind => return Ok(()),
        };
        let reuseport = self.mode == Mode::Reuseport;
        let new = addrs.into_iter().map(|a| bound_socket(a, reuseport)).collect::<Result<Vec<Socket>, Error>>()?;
        listen_all(&new, self.backlog)?;
        self.sockets.extend(new);
        Ok(())
    }

    /// Take the last slot's sockets out (`scale` down), for the caller to close once nothing
    /// uses them. Only the last: closing a member of a reuseport group moves the group's last
    /// member into its index, which would renumber a slot that stays.
    pub fn remove_last_slot(&mut self) -> Vec<Socket> {
        match self.mode {
            Mode::Reuseport | Mode::RoundRobin => {
                let keep = self.sockets.len().saturating_sub(self.binds.len());
                self.sockets.split_off(keep)
            }
            Mode::Shared | Mode::SelfBind => Vec::new(),
        }
    }

    /// The fds slot `slot`'s worker receives, in bind order (they become fds 3, 4, ...).
    pub fn fds_for_slot(&self, slot: usize) -> Vec<RawFd> {
        let n = self.binds.len();
        let base = match self.mode {
            Mode::Reuseport | Mode::RoundRobin => slot * n,
            Mode::Shared => 0,
            Mode::SelfBind => return Vec::new(),
        };
        self.sockets[base..base + n].iter().map(|s| s.as_raw_fd()).collect()
    }
}

/// A socket bound to `addr` but not listening yet: until listen() nothing can queue on it, so
/// dropping it after a later failure loses no connection.
fn bound_socket(addr: SocketAddr, reuseport: bool) -> Result<Socket, Error> {
    let e = |err| bind_error(addr, err);
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)).map_err(e)?;
    sock.set_reuse_address(true).map_err(e)?;
    if reuseport {
        sock.set_reuse_port(true).map_err(e)?;
    }
    sock.bind(&addr.into()).map_err(e)?;
    Ok(sock)
}

/// listen() on every socket, in order (a reuseport group indexes its members in listen order).
fn listen_all<'a>(sockets: impl IntoIterator<Item = &'a Socket>, backlog: i32) -> Result<(), Error> {
    for sock in sockets {
        let addr = sock.local_addr().ok().and_then(|a| a.as_socket()).unwrap_or(([0, 0, 0, 0], 0).into());
        sock.listen(backlog).map_err(|err| bind_error(addr, err))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_forms() {
        let b = BindSpec::parse("127.0.0.1:80", 0).unwrap();
        assert_eq!((b.name.as_str(), b.addr.to_string().as_str()), ("http", "127.0.0.1:80"));
        let b = BindSpec::parse("[::1]:8080", 1).unwrap();
        assert_eq!((b.name.as_str(), b.addr.to_string().as_str()), ("http1", "[::1]:8080"));
        let b = BindSpec::parse(":9000", 0).unwrap();
        assert_eq!(b.addr.to_string(), "0.0.0.0:9000");
        let b = BindSpec::parse("admin=127.0.0.1:9001", 0).unwrap();
        assert_eq!(b.name, "admin");
        assert!(BindSpec::parse("127.0.0.1", 0).is_err());
        assert!(BindSpec::parse("127.0.0.1:http", 0).is_err());
        assert!(BindSpec::parse("127.0.0.1:70000", 0).is_err());
        assert!(BindSpec::parse("bad name=127.0.0.1:1", 0).is_err());
    }

    #[test]
    fn modes_and_binds_read_back_what_they_print() {
        for m in [Mode::Reuseport, Mode::Shared, Mode::RoundRobin, Mode::SelfBind] {
            assert_eq!(m.to_string().parse::<Mode>(), Ok(m));
            assert_eq!(serde_json::to_string(&m).unwrap(), format!("\"{m}\""));
            assert_eq!(serde_json::from_str::<Mode>(&format!("\"{m}\"")).unwrap(), m);
        }
        assert!("sideways".parse::<Mode>().is_err() && serde_json::from_str::<Mode>("\"sideways\"").is_err());
        for text in ["http=127.0.0.1:80", "admin=[::1]:9001"] {
            let b: BindSpec = text.parse().unwrap();
            assert_eq!(b.to_string(), text);
        }
        assert_eq!("127.0.0.1:80".parse::<BindSpec>().unwrap().to_string(), "http=127.0.0.1:80");
    }

    #[test]
    fn reuseport_group_shares_one_resolved_port() {
        let binds = [BindSpec::parse("127.0.0.1:0", 0).unwrap()];
        let l = Listeners::bind(&binds, Mode::Reuseport, 3, 16).unwrap();
        let port = l.local_addrs()[0].port();
        assert_ne!(port, 0);
        assert_eq!(l.socket_count(), 3);
        let fds: Vec<_> = (0..3).map(|s| l.fds_for_slot(s)[0]).collect();
        assert!(fds[0] != fds[1] && fds[1] != fds[2]);
        for s in &l.sockets {
            let a = s.local_addr().unwrap().as_socket().unwrap();
            assert_eq!(a.port(), port);
        }
    }

    #[test]
    fn shared_mode_hands_one_socket_to_all() {
        let binds = [BindSpec::parse("127.0.0.1:0", 0).unwrap()];
        let l = Listeners::bind(&binds, Mode::Shared, 3, 16).unwrap();
        assert_eq!(l.socket_count(), 1);
        assert_eq!(l.fds_for_slot(0), l.fds_for_slot(2));
    }

    #[test]
    fn in_use_is_refused_even_against_a_reuseport_listener() {
        let other = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        other.set_reuse_port(true).unwrap();
        other.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into()).unwrap();
        other.listen(8).unwrap();
        let addr = other.local_addr().unwrap().as_socket().unwrap();
        let binds = [BindSpec { name: "http".into(), addr }];
        let err = Listeners::bind(&binds, Mode::Reuseport, 2, 16).err().unwrap();
        let msg = err.to_string();
        assert!(msg.contains(&addr.to_string()) && msg.contains("in use"), "{msg}");
    }
}
