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

use std::time::Instant;

use super::os::Os;
use super::plan::{self, Resize};
use super::workers::Slot;
use super::Supervisor;
use crate::cli::Config;
use crate::event::Scale;

/// The most slots a launcher keeps (as `-n`).
const MAX_SLOTS: usize = 4096;

/// How many slots to keep, and who decides.
pub(super) struct Scaling {
    /// `-n`, then `scale`, TTIN and TTOU, and with `-n MIN..MAX` the automatic scaling.
    pub(super) desired: usize,
    /// `-n MIN..MAX`: the policy and its samples (see `autoscaling`).
    pub(super) autoscale: Option<super::autoscaling::Autoscaling>,
}

impl Scaling {
    /// `slots`: the slots there are (the sockets' count); with -n MIN..MAX they are kept
    /// within the bounds.
    pub(super) fn new(cfg: &Config, slots: usize) -> Scaling {
        let desired = cfg.autoscale.map_or(cfg.workers, |b| slots.clamp(b.min, b.max));
        let autoscale = cfg.autoscale.map(|b| super::autoscaling::Autoscaling::new(b, cfg.scale_down_after));
        Scaling { desired, autoscale }
    }

    /// The count `to` asks for, if it is one the launcher can keep.
    fn wanted(&self, to: Scale, by: &str) -> Result<usize, String> {
        let wanted = match to {
            Scale::To(n) => n as i64,
            Scale::By(k) => self.desired as i64 + k,
        };
        if wanted < 1 {
            return Err(format!("{by}: cannot scale to {wanted} workers: at least 1 must run"));
        }
        if wanted > MAX_SLOTS as i64 {
            return Err(format!("{by}: cannot scale to {wanted} workers: at most {MAX_SLOTS}"));
        }
        let wanted = wanted as usize;
        // `-n MIN..MAX` refuses a count outside its bounds.
        match self.autoscale.as_ref().map(|a| a.policy.bounds) {
            Some(b) if wanted < b.min || wanted > b.max => {
                Err(format!("{by}: cannot scale to {wanted} workers: -n {b} keeps between {} and {}", b.min, b.max))
            }
            _ => Ok(wanted),
        }
    }
}

impl<O: Os> Supervisor<O> {
    /// Change the desired number of slots (`scale`, TTIN, TTOU: `by`); `rescale` gets there
    /// in the next turns.
    pub(super) fn scale(&mut self, to: Scale, by: &str, now: Instant) -> Result<usize, String> {
        if self.halt.shutdown.is_some() {
            return Err(format!("{by}: cannot scale, the launcher is stopping"));
        }
        let wanted = self.scaling.wanted(to, by)?;
        let desired = self.scaling.desired;
        if wanted != desired {
            let later = if self.roll.rolling_gen().is_some() { " once the roll under way is done" } else { "" };
            log::info!("{by}: scaling from {desired} to {wanted} workers{later}");
            if let Some(a) = &mut self.scaling.autoscale {
                a.policy.changed(desired, wanted, by, &format!("asked by {by}"), now);
            }
            self.scaling.desired = wanted;
            self.publishing.count_changed();
        }
        Ok(self.scaling.desired)
    }

    /// Move towards `desired` slots: add one, retire one, or close a retired one.
    pub(super) fn rescale(&mut self, now: Instant) {
        if self.halt.shutdown.is_some() || self.roll.rolling_gen().is_some() {
            return;
        }
        let retiring: Vec<bool> = self.slots.iter().map(|s| s.retiring.is_some()).collect();
        match plan::rescale(&retiring, self.scaling.desired) {
            Some(Resize::Keep(slot)) => {
                log::info!("worker {slot} stays (scaled up again before it was removed)");
                self.slots[slot].retiring = None;
            }
            Some(Resize::Add) => self.add_slot(),
            Some(Resize::Retire(slot)) => {
                log::info!("worker {slot} retires (scaling down to {})", self.scaling.desired);
                self.slots[slot].retiring = Some(now);
                for id in self.workers.on(slot).map(|(id, _)| id).collect::<Vec<_>>() {
                    self.stop(id, now);
                }
            }
            None => {}
        }
        self.roll.set_slots(self.slots.kept());
        self.close_retired(now);
    }

    fn add_slot(&mut self) {
        let slot = self.slots.len();
        if let Err(e) = self.listeners.add_slot() {
            log::error!("cannot add worker {slot}: {e}");
            self.scaling.desired = self.slots.len();
            return;
        }
        let inodes = match self.slots.inodes_known() {
            true => crate::readiness::socket_inodes(&self.listeners.fds_for_slot(slot)).ok(),
            false => None,
        };
        if inodes.is_none() {
            self.slots.forget_inodes();
        }
        self.slots.push(Slot { gen: self.slots.gen(), inodes, ..Slot::default() });
        let names = self.listeners.slot_store_names(slot);
        let new: Vec<_> = self.listeners.store_names().into_iter().filter(|(_, n)| names.contains(n)).collect();
        self.publishing.reporter.store_fds(&new);
        log::info!("worker {slot} added (scaling up to {})", self.scaling.desired);
    }

    /// Close the last slot while it is retired, empty and settled.
    fn close_retired(&mut self, now: Instant) {
        while let Some(last) = self.slots.last() {
            let slot = self.slots.len() - 1;
            let Some(retired) = last.retiring else { return };
            // Counted from when steering surely left it out (reuseport, round-robin); in the
            // other modes its sockets are shared and nothing is closed.
            let since = if self.router.steers(&self.listeners) { last.excluded_at } else { Some(retired) };
            let fds = self.listeners.fds_for_slot(slot);
            let queued = since.is_some() && fds.iter().any(|fd| self.os.queue_len(*fd).map_or(true, |n| n > 0));
            if !plan::may_close(since, now, self.workers.on(slot).next().is_some(), queued) {
                return;
            }
            if !self.router.let_go(slot, &fds) {
                return; // its thread still holds the fds: next turn
            }
            for name in self.listeners.slot_store_names(slot) {
                self.publishing.reporter.remove_fd(&name);
            }
            drop(self.listeners.remove_last_slot());
            self.slots.pop();
            self.router.forget_program(); // the programs are rebuilt for the new count
            log::info!("worker {slot} removed: its sockets are closed, nothing was waiting there");
        }
    }
}
