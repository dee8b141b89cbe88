//! Changing the number of slots at run time (`scale`, TTIN, TTOU), without losing a connection.
//!
//! Up: the new slot's sockets join each reuseport group last (their index is the slot's
//! number), the slot gets a worker of the current generation, and it serves once that is ready.
//! Down: the highest slot retires: it leaves the serving set (steering sends nothing new), its
//! worker gets the stop signal, what waits in its queue is taken back and relayed (`rescue`),
//! and its sockets are closed only once its workers have exited, its queue is empty and a
//! second has passed since it stopped getting new connections (so no handshake begun before
//! that is still on its way into the queue). Only the last slot is ever closed: closing a member
//! of a reuseport group moves the group's last member into its index, and the steering programs
//! index members by slot number; with the last one closed nothing moves, and the programs are
//! rebuilt from the new slot count anyway.
//!
//! The number changes only between rolls: a roll keeps the N it started with, and a scale asked
//! for meanwhile is carried out when it ends.

use std::time::{Duration, Instant};

use super::os::Os;
use super::workers::Slot;
use super::Supervisor;
use crate::steer;

/// How long a retiring slot gets no new connections before its sockets may close.
const SETTLE: Duration = Duration::from_secs(1);

impl<O: Os> Supervisor<O> {
    /// Move towards `desired` slots: add one, retire one, or close a retired one.
    pub(super) fn rescale(&mut self, now: Instant) {
        if self.shutdown.is_some() || self.roll.rolling_gen().is_some() {
            return;
        }
        let kept = self.slots.iter().filter(|s| s.retiring.is_none()).count();
        if kept < self.desired {
            // Bring back a retiring slot first (they are the last ones), else add one.
            match self.slots.iter().position(|s| s.retiring.is_some()) {
                Some(slot) => {
                    log::info!("worker {slot} stays (scaled up again before it was removed)");
                    self.slots[slot].retiring = None;
                }
                None => self.add_slot(),
            }
        } else if kept > self.desired {
            let slot = kept - 1;
            log::info!("worker {slot} retires (scaling down to {})", self.desired);
            self.slots[slot].retiring = Some(now);
            for (id, _) in self.workers.on(slot).map(|(id, w)| (id, w.pid)).collect::<Vec<_>>() {
                self.stop(id, now);
            }
        }
        self.roll.set_slots(self.slots.iter().filter(|s| s.retiring.is_none()).count());
        self.close_retired(now);
    }

    fn add_slot(&mut self) {
        let slot = self.slots.len();
        if let Err(e) = self.listeners.add_slot() {
            log::error!("cannot add worker {slot}: {e}");
            self.desired = self.slots.len();
            return;
        }
        let gen = self.slots.iter().map(|s| s.gen).max().unwrap_or(1);
        self.slots.push(Slot { gen, ..Slot::default() });
        self.loads.push(None);
        self.rescued.push(false);
        if let Some((watch, _)) = &mut self.stalls {
            watch.resize(self.slots.len());
        }
        if let Some(inodes) = &mut self.slot_inodes {
            match crate::readiness::socket_inodes(&self.listeners.fds_for_slot(slot)) {
                Ok(i) => inodes.push(i),
                Err(_) => self.slot_inodes = None,
            }
        }
        let names = self.listeners.slot_store_names(slot);
        let new: Vec<_> = self.listeners.store_names().into_iter().filter(|(_, n)| names.contains(n)).collect();
        self.reporter.store_fds(&new);
        log::info!("worker {slot} added (scaling up to {})", self.desired);
    }

    /// Close the last slot while it is retired, empty and settled.
    fn close_retired(&mut self, now: Instant) {
        while let Some(slot) = self.slots.len().checked_sub(1) {
            let Some(retired) = self.slots[slot].retiring else { return };
            // Counted from when steering surely left it out (reuseport, round-robin); in the
            // other modes its sockets are shared and nothing is closed.
            let steered = !self.listeners.groups().is_empty() || self.proxy.is_some();
            let since = if steered {
                match self.slots[slot].excluded_at {
                    Some(t) => t,
                    None => return,
                }
            } else {
                retired
            };
            let fds = self.listeners.fds_for_slot(slot);
            let queued = fds.iter().any(|fd| steer::queue_len(*fd).map_or(true, |n| n > 0));
            if now.saturating_duration_since(since) < SETTLE || self.workers.on(slot).next().is_some() || queued {
                return;
            }
            if let Some(rescue) = &self.rescue {
                if !rescue.let_go(slot, &fds) {
                    return; // its thread still holds the fds: next turn
                }
            }
            for name in self.listeners.slot_store_names(slot) {
                self.reporter.remove_fd(&name);
            }
            drop(self.listeners.remove_last_slot());
            self.slots.pop();
            self.loads.pop();
            self.rescued.pop();
            if let Some((watch, _)) = &mut self.stalls {
                watch.resize(self.slots.len());
            }
            if let Some(inodes) = &mut self.slot_inodes {
                inodes.truncate(self.slots.len());
            }
            self.bpf = Some(Vec::new()); // force the programs to be rebuilt for the new count
            self.steered = Some(Vec::new());
            log::info!("worker {slot} removed: its sockets are closed, nothing was waiting there");
        }
    }
}
