//! Who is connected to the control socket, and who makes room at the cap.
//!
//! Each client has a thread of its own in `server` (its requests wait for the supervisor
//! loop, and `status` reads /proc: blocking work that fits a thread), at most [`MAX_CLIENTS`]
//! at once. A client is idle while it waits for its next request line (from connecting, and
//! from each answer), busy while a request is being answered. When a new client comes and all
//! places are taken, the client idle longest is told so (`{"ok":false,"error":"closed: ..."}`,
//! never waiting on it) and disconnected, and the new one takes its place: forgotten idle
//! connections never keep `reuse-launch stop` or `roll` out. Only when every one of them is
//! being answered is the new client told `busy` and disconnected. A client of another uid is
//! refused before it takes a place (`server`), so it never makes another one leave.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use nix::sys::socket::{send, MsgFlags};

/// Clients served at once.
pub const MAX_CLIENTS: usize = 32;

struct Entry {
    id: u64,
    /// A clone of the client's socket, to disconnect it from here.
    stream: UnixStream,
    /// Since when it waits for a request (None: one is being answered).
    idle_since: Option<Instant>,
}

#[derive(Default)]
pub struct Clients {
    inner: Mutex<(u64, Vec<Entry>)>,
}

/// A client's place; dropping it frees the place.
pub struct Ticket {
    clients: Arc<Clients>,
    id: u64,
}

impl Clients {
    /// A place for `stream`, making room if needed (module docs); Err: the refusal to send.
    pub fn admit(self: &Arc<Clients>, stream: &UnixStream) -> Result<Ticket, String> {
        let clone = stream.try_clone().map_err(|e| format!("busy: cannot serve another client: {e}"))?;
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let (next, entries) = &mut *guard;
        if entries.len() >= MAX_CLIENTS {
            let oldest = entries.iter().enumerate().filter_map(|(i, e)| e.idle_since.map(|t| (t, i))).min();
            let Some((_, i)) = oldest else {
                return Err(format!("busy: {MAX_CLIENTS} control clients are being answered; try again"));
            };
            let victim = entries.swap_remove(i);
            let why = format!("closed: {MAX_CLIENTS} control clients connected; this one was idle longest");
            let line = super::protocol::Response::failure(None, why).line();
            // Never wait on the client being closed: what its socket takes now, then the end.
            let _ = send(victim.stream.as_raw_fd(), line.as_bytes(), MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL);
            let _ = victim.stream.shutdown(std::net::Shutdown::Both);
        }
        *next += 1;
        entries.push(Entry { id: *next, stream: clone, idle_since: Some(Instant::now()) });
        Ok(Ticket { clients: self.clone(), id: *next })
    }

    fn with<T>(&self, id: u64, f: impl FnOnce(&mut Entry) -> T) -> Option<T> {
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        guard.1.iter_mut().find(|e| e.id == id).map(f)
    }

    /// How many clients hold a place.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).1.len()
    }
}

impl Ticket {
    /// A request begins. False: this client was disconnected to make room (do not answer).
    pub fn busy(&self) -> bool {
        self.clients.with(self.id, |e| e.idle_since = None).is_some()
    }

    /// Answered: waiting for the next request from now on.
    pub fn idle(&self) {
        self.clients.with(self.id, |e| e.idle_since = Some(Instant::now()));
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut guard = self.clients.inner.lock().unwrap_or_else(|p| p.into_inner());
        guard.1.retain(|e| e.id != self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn the_client_idle_longest_makes_room_and_busy_ones_never_do() {
        let clients = Arc::new(Clients::default());
        let mut ends = Vec::new();
        let mut tickets = Vec::new();
        for _ in 0..MAX_CLIENTS {
            let (ours, theirs) = UnixStream::pair().unwrap();
            tickets.push(clients.admit(&ours).unwrap());
            ends.push(theirs);
        }
        // The first is busy answering; the second has been idle longest.
        assert!(tickets[0].busy());
        tickets[2].idle();
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let newcomer = clients.admit(&ours).unwrap();
        assert_eq!(clients.len(), MAX_CLIENTS);
        let mut told = String::new();
        ends[1].read_to_string(&mut told).unwrap();
        assert!(told.contains("\"ok\":false") && told.contains("idle longest"), "{told}");
        assert!(!tickets[1].busy(), "its thread learns it was closed");
        assert!(tickets[3].busy());
        // Every place busy: the next one is refused.
        for t in &tickets[2..] {
            assert!(t.busy());
        }
        assert!(newcomer.busy());
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let refused = clients.admit(&ours).err().unwrap();
        assert!(refused.starts_with("busy: "), "{refused}");
        drop(newcomer);
        assert_eq!(clients.len(), MAX_CLIENTS - 1);
        assert!(clients.admit(&ours).is_ok(), "a freed place is taken");
    }
}
