//! `-n MIN..MAX`: when to add a slot and when to remove one, from what the launcher measures of
//! its serving slots. Pure: [`Sample`]s and times in, a [`Decision`] out ([`judge`]); the
//! policy's memory between decisions (samples since the last change, flaps, the decisions made)
//! is [`Autoscaler`]'s (`scaler`). The supervisor samples and carries decisions out
//! (`supervisor/autoscaling.rs`), through the same drop-free slot addition and retirement as
//! `scale`.
//!
//! The policy (its constants are below; the README has the measurements behind them):
//! - Every [`SAMPLE_EVERY`], each serving slot's accept queue (the longest over its binds) and
//!   its worker's CPU (its process group's, read every [`CPU_EVERY`], in cores). A sample is
//!   *pressed* when at least as many connections wait, in all the serving slots' queues, as
//!   there are serving slots (the workers cannot keep up: every request waits for another on
//!   average), or when the workers used [`CPU_BUSY`] of a core each or more (single-threaded
//!   servers at their limit: Node accepts eagerly and keeps its queue empty while it burns its
//!   core). Totals, not every slot's own queue: the kernel's hash spreads new connections
//!   unevenly, and with 8 clients on 2 one-at-a-time workers one of the two queues was empty in
//!   a third of the samples while both workers were saturated.
//! - **Up** (one slot): [`UP_SHARE`] of the samples of the last [`UP_AFTER`] pressed, all of
//!   them taken while every kept slot had a ready worker (so a slot just added counts only once
//!   it serves).
//! - **Down** (the highest slot): for the whole calm ([`Autoscaler::calm`]: `--scale-down-after`,
//!   30 s by default) no slot's queue non-empty in more than [`CALM_QUEUE`] of the samples, and
//!   the workers' CPU all together at most [`CALM_CPU`] of a core per slot that would remain.
//! - Every change, automatic or asked for (`scale`, TTIN/TTOU), starts the windows afresh: after
//!   a change nothing is decided before [`UP_AFTER`] (up) or the calm (down) has passed again.
//!   That is the cooldown. A scale-down undone by a scale-up within twice the calm doubles the
//!   calm the next scale-down needs (up to [`FLAP_MAX`] doublings), forgotten after
//!   [`FLAP_FORGET`] without another such flap: a steady load does not flap.
//! - Nothing is decided, and the samples start again, while a roll runs, the launcher stops, or
//!   a kept slot has no ready worker.
//! - Held connections (`load`) are not used: idle keep-alive connections count as held, and a
//!   thread-per-connection worker holds its clients without being short of anything.

use std::time::{Duration, Instant};

pub use crate::cli::Bounds;
pub use scaler::{Autoscaler, Record, Saved};

mod scaler;

/// How often the supervisor takes a [`Sample`].
pub const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// How often the workers' CPU is read (a scan of /proc); samples in between carry the last.
pub const CPU_EVERY: Duration = Duration::from_secs(1);
/// How long the slots must be pressed before one is added.
pub const UP_AFTER: Duration = Duration::from_secs(2);
/// The share of [`UP_AFTER`]'s samples that must be pressed.
pub const UP_SHARE: f64 = 0.75;
/// Workers that used this much of a core each (over [`CPU_EVERY`]) are pressed.
pub const CPU_BUSY: f32 = 0.9;
/// During the calm, no slot's queue may be non-empty in more than this share of the samples.
pub const CALM_QUEUE: f64 = 0.05;
/// During the calm, the workers' CPU in all may be at most this much of a core per slot kept.
pub const CALM_CPU: f32 = 0.5;
/// At most this many doublings of the calm after flaps.
pub const FLAP_MAX: u32 = 3;
/// A flap is forgotten after this long without another.
pub const FLAP_FORGET: Duration = Duration::from_secs(600);
/// Decisions kept for `status`.
pub const HISTORY: usize = 10;

/// One serving slot at one sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SlotLoad {
    pub slot: usize,
    /// Connections waiting in its accept queue (None: unread, as in `self` mode).
    pub queue: Option<u32>,
    /// Cores its worker's process group used at the last CPU reading (None: not read yet).
    pub cpu: Option<f32>,
}

impl SlotLoad {
    fn queued(&self) -> bool {
        self.queue.is_some_and(|q| q > 0)
    }
}

/// The serving slots at one moment. Only samples taken while every kept slot had a ready
/// worker, no roll ran and the launcher was not stopping are given to the policy.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub at: Instant,
    pub slots: Vec<SlotLoad>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Hold,
    /// Go to `to` slots, because of `reason` (`at least one connection waiting per slot for 2s`); `figures`
    /// say how much (for the log).
    Change {
        to: usize,
        reason: String,
        figures: String,
    },
}

impl Sample {
    /// Connections waiting in all the serving slots' queues.
    fn waiting(&self) -> u32 {
        self.slots.iter().filter_map(|l| l.queue).sum()
    }

    /// The workers' CPU in all, in cores.
    fn cpu(&self) -> f32 {
        self.slots.iter().filter_map(|l| l.cpu).sum()
    }

    /// At least one connection waiting per serving slot.
    fn backed_up(&self) -> bool {
        !self.slots.is_empty() && self.waiting() as usize >= self.slots.len()
    }

    /// The workers at [`CPU_BUSY`] of a core each or more.
    fn busy(&self) -> bool {
        !self.slots.is_empty() && self.cpu() >= CPU_BUSY * self.slots.len() as f32
    }

    fn pressed(&self) -> bool {
        self.backed_up() || self.busy()
    }
}

/// What the window shows, for `status`: its samples, the share of them pressed, the
/// connections waiting in all (mean), the largest share in which one slot had a queue, the
/// workers' mean CPU in all.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Figures {
    pub samples: usize,
    pub pressed: f64,
    pub waiting: f64,
    pub queued: f64,
    pub cpu: f32,
}

/// In how many of `samples` slot `slot` served, and had a queue.
fn queued_share(samples: &[&Sample], slot: usize) -> f64 {
    let (mut present, mut queued) = (0, 0);
    for l in samples.iter().flat_map(|s| s.slots.iter().filter(|l| l.slot == slot)) {
        present += 1;
        queued += usize::from(l.queued());
    }
    share(queued, present)
}

/// The largest share of `samples` in which one slot had a queue.
fn most_queued(samples: &[&Sample]) -> f64 {
    let mut slots: Vec<usize> = samples.iter().flat_map(|s| s.slots.iter().map(|l| l.slot)).collect();
    slots.sort_unstable();
    slots.dedup();
    slots.iter().map(|s| queued_share(samples, *s)).fold(0.0, f64::max)
}

fn how_many(samples: &[&Sample], f: fn(&Sample) -> bool) -> usize {
    samples.iter().filter(|s| f(s)).count()
}

fn mean_waiting(samples: &[&Sample]) -> f64 {
    share(samples.iter().map(|s| s.waiting() as usize).sum(), samples.len())
}

fn share(n: usize, of: usize) -> f64 {
    if of == 0 {
        0.0
    } else {
        n as f64 / of as f64
    }
}

/// The workers' CPU in all, averaged over `samples`.
fn mean_cpu(samples: &[&Sample]) -> f32 {
    let total: f32 = samples.iter().map(|s| s.cpu()).sum();
    if samples.is_empty() {
        0.0
    } else {
        total / samples.len() as f32
    }
}

/// `2s`, `30s`, `1.5s`, `4m`.
pub fn span(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s >= 60.0 && d.as_secs().is_multiple_of(60) && d.subsec_nanos() == 0 {
        format!("{}m", d.as_secs() / 60)
    } else if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{s:.1}s")
    }
}

/// The samples of `samples` at or after `now - window`, if they cover that whole window (the
/// first sample is that old or older).
fn covering(samples: &[Sample], window: Duration, now: Instant) -> Option<Vec<&Sample>> {
    let start = now.checked_sub(window)?;
    samples.first().filter(|f| f.at <= start)?;
    Some(samples.iter().filter(|s| s.at >= start).collect())
}

/// The decision for `count` slots within `bounds`, from the samples since the last change
/// (oldest first) and the calm a scale-down needs now.
pub fn judge(samples: &[Sample], count: usize, bounds: Bounds, calm: Duration, now: Instant) -> Decision {
    if count < bounds.min || count > bounds.max {
        let to = count.clamp(bounds.min, bounds.max);
        let reason = format!("-n {bounds} keeps between {} and {}", bounds.min, bounds.max);
        return Decision::Change { to, reason, figures: String::new() };
    }
    if count < bounds.max {
        if let Some(d) = up(samples, count, now) {
            return d;
        }
    }
    if count > bounds.min {
        if let Some(d) = down(samples, count, calm, now) {
            return d;
        }
    }
    Decision::Hold
}

fn up(samples: &[Sample], count: usize, now: Instant) -> Option<Decision> {
    let window = covering(samples, UP_AFTER, now)?;
    let n = window.len();
    let pressed = how_many(&window, Sample::pressed);
    if n == 0 || share(pressed, n) < UP_SHARE {
        return None;
    }
    let what = match (
        share(how_many(&window, Sample::backed_up), n) >= UP_SHARE,
        share(how_many(&window, Sample::busy), n) >= UP_SHARE,
    ) {
        (true, _) => "at least one connection waiting per slot".to_string(),
        (false, true) => format!("the workers at {:.0}% of a core each or more", CPU_BUSY * 100.0),
        _ => "connections waiting or the workers' CPU at its limit".to_string(),
    };
    let figures = format!(
        "pressed in {:.0}% of {n} samples; {:.1} connections waiting on average; workers at {:.2} CPU in all",
        share(pressed, n) * 100.0,
        mean_waiting(&window),
        mean_cpu(&window)
    );
    Some(Decision::Change { to: count + 1, reason: format!("{what} for {}", span(UP_AFTER)), figures })
}

fn down(samples: &[Sample], count: usize, calm: Duration, now: Instant) -> Option<Decision> {
    let window = covering(samples, calm, now)?;
    let most_queued = most_queued(&window);
    let cpu = mean_cpu(&window);
    if most_queued > CALM_QUEUE || cpu > CALM_CPU * (count - 1) as f32 {
        return None;
    }
    let figures = format!(
        "queues non-empty in at most {:.0}% of {} samples; workers at {cpu:.2} CPU in all",
        most_queued * 100.0,
        window.len()
    );
    Some(Decision::Change { to: count - 1, reason: format!("calm for {}", span(calm)), figures })
}

#[cfg(test)]
mod tests;
