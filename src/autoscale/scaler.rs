//! The policy's memory between two decisions: the samples since the last change (what
//! [`judge`] decides from), the calm in force after flaps, the decisions made (for `status`),
//! and what a `reexec` hands over.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::{
    how_many, judge, mean_cpu, mean_waiting, most_queued, share, Bounds, Decision, Figures, Sample, FLAP_FORGET,
    FLAP_MAX, HISTORY, SAMPLE_EVERY, UP_AFTER,
};

/// One change of the slot count, for `status`.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub at: Instant,
    pub from: usize,
    pub to: usize,
    /// `auto`, or who asked (`TTIN`, `TTOU`, `control`).
    pub by: String,
    pub reason: String,
}

impl Record {
    /// `scaled up to 3: at least one connection waiting per slot for 2s`.
    pub fn text(&self) -> String {
        let dir = if self.to > self.from { "up" } else { "down" };
        format!("scaled {dir} to {}: {}", self.to, self.reason)
    }
}

/// The policy's memory: the samples since the last change, flaps, and the decisions made.
#[derive(Debug)]
pub struct Autoscaler {
    pub bounds: Bounds,
    down_after: Duration,
    /// Since the last change (or the last sample that did not count), oldest first.
    samples: Vec<Sample>,
    /// Doublings of the calm, and when the last flap was.
    flap: u32,
    flap_at: Option<Instant>,
    /// The last automatic scale-down.
    last_down: Option<Instant>,
    history: VecDeque<Record>,
    /// Automatic scale-ups and scale-downs so far.
    ups: u64,
    downs: u64,
}

/// What `reexec` hands over (times as instants; `reexec::state` makes them relative).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Saved {
    pub flap: u32,
    pub flap_at: Option<Instant>,
    pub last_down: Option<Instant>,
    pub history: Vec<Record>,
    pub ups: u64,
    pub downs: u64,
}

impl Autoscaler {
    pub fn new(bounds: Bounds, down_after: Duration) -> Autoscaler {
        Autoscaler {
            bounds,
            down_after,
            samples: Vec::new(),
            flap: 0,
            flap_at: None,
            last_down: None,
            history: VecDeque::new(),
            ups: 0,
            downs: 0,
        }
    }

    /// Doublings of the calm in force: those of the last flap, unless it is forgotten.
    fn flaps(&self, now: Instant) -> u32 {
        match self.flap_at {
            Some(t) if now.saturating_duration_since(t) < FLAP_FORGET => self.flap,
            _ => 0,
        }
    }

    /// The calm a scale-down needs now: `--scale-down-after`, doubled per recent flap.
    pub fn calm(&self, now: Instant) -> Duration {
        self.down_after * (1 << self.flaps(now))
    }

    /// Take a sample; `None` when no sample counts now (a roll, a stop, a slot without a ready
    /// worker): the windows start again.
    pub fn observe(&mut self, sample: Option<Sample>) {
        let Some(sample) = sample else {
            self.samples.clear();
            return;
        };
        let keep = UP_AFTER.max(self.down_after * (1 << FLAP_MAX)) + SAMPLE_EVERY * 2;
        let old = self.samples.partition_point(|s| sample.at.saturating_duration_since(s.at) > keep);
        self.samples.drain(..old);
        self.samples.push(sample);
    }

    /// What to do with `count` slots now.
    pub fn decide(&self, count: usize, now: Instant) -> Decision {
        judge(&self.samples, count, self.bounds, self.calm(now), now)
    }

    /// The slot count changed from `from` to `to` (by the policy: `by` is `auto`): the windows
    /// start again, and a scale-up soon after an automatic scale-down is a flap.
    pub fn changed(&mut self, from: usize, to: usize, by: &str, reason: &str, now: Instant) {
        self.samples.clear();
        if by == "auto" && to < from {
            self.last_down = Some(now);
            self.downs += 1;
        }
        if by == "auto" && to > from {
            self.ups += 1;
        }
        let soon = |t: Instant| now.saturating_duration_since(t) < self.calm(now) * 2;
        if by == "auto" && to > from && self.last_down.is_some_and(soon) {
            self.flap = (self.flaps(now) + 1).min(FLAP_MAX);
            self.flap_at = Some(now);
        }
        self.history.push_back(Record { at: now, from, to, by: by.to_string(), reason: reason.to_string() });
        while self.history.len() > HISTORY {
            self.history.pop_front();
        }
    }

    /// Automatic scale-ups and scale-downs so far.
    pub fn counts(&self) -> (u64, u64) {
        (self.ups, self.downs)
    }

    /// The changes made, oldest first.
    pub fn history(&self) -> impl Iterator<Item = &Record> {
        self.history.iter()
    }

    /// What the window of the last [`UP_AFTER`] shows.
    pub fn figures(&self, now: Instant) -> Figures {
        let start = now.checked_sub(UP_AFTER).unwrap_or(now);
        let window: Vec<&Sample> = self.samples.iter().filter(|s| s.at >= start).collect();
        Figures {
            samples: window.len(),
            pressed: share(how_many(&window, Sample::pressed), window.len()),
            waiting: mean_waiting(&window),
            queued: most_queued(&window),
            cpu: mean_cpu(&window),
        }
    }

    pub fn export(&self) -> Saved {
        Saved {
            flap: self.flap,
            flap_at: self.flap_at,
            last_down: self.last_down,
            history: self.history.iter().cloned().collect(),
            ups: self.ups,
            downs: self.downs,
        }
    }

    pub fn import(&mut self, saved: Saved) {
        self.flap = saved.flap.min(FLAP_MAX);
        self.flap_at = saved.flap_at;
        self.last_down = saved.last_down;
        self.history = saved.history.into_iter().collect();
        self.ups = saved.ups;
        self.downs = saved.downs;
    }
}
