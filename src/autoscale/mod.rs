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
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);
    const B: Bounds = Bounds { min: 1, max: 3 };
    const CALM: Duration = Duration::from_secs(30);

    fn load(slot: usize, queue: u32, cpu: f32) -> SlotLoad {
        SlotLoad { slot, queue: Some(queue), cpu: Some(cpu) }
    }

    /// Drive a policy from `t0` for `span`, a sample every 100 ms from `make(t, count)`, carrying
    /// out every decision at once; the changes made, with their times since `t0`.
    fn simulate(
        a: &mut Autoscaler,
        t0: Instant,
        span: Duration,
        count: &mut usize,
        make: impl Fn(Duration, usize) -> Vec<SlotLoad>,
    ) -> Vec<(Duration, usize, String)> {
        let mut out = Vec::new();
        let mut t = Duration::ZERO;
        while t <= span {
            let now = t0 + t;
            a.observe(Some(Sample { at: now, slots: make(t, *count) }));
            if let Decision::Change { to, reason, .. } = a.decide(*count, now) {
                a.changed(*count, to, "auto", &reason, now);
                out.push((t, to, reason));
                *count = to;
            }
            t += SAMPLE_EVERY;
        }
        out
    }

    fn every(count: usize, queue: u32, cpu: f32) -> Vec<SlotLoad> {
        (0..count).map(|s| load(s, queue, cpu)).collect()
    }

    #[test]
    fn a_connection_waiting_per_slot_for_2s_adds_one_slot_at_a_time_up_to_max() {
        let (t0, mut n) = (Instant::now(), 1);
        let mut a = Autoscaler::new(B, CALM);
        let got = simulate(&mut a, t0, Duration::from_secs(10), &mut n, |_, c| every(c, 4, 0.05));
        let times: Vec<(Duration, usize)> = got.iter().map(|g| (g.0, g.1)).collect();
        assert_eq!(times, vec![(2000 * MS, 2), (4100 * MS, 3)], "{got:?}");
        assert_eq!(got[0].2, "at least one connection waiting per slot for 2s");
        assert_eq!(
            a.history().last().unwrap().text(),
            "scaled up to 3: at least one connection waiting per slot for 2s"
        );
    }

    #[test]
    fn up_needs_three_quarters_of_the_samples_pressed() {
        let t0 = Instant::now();
        // Two slots, 2 waiting in 3 samples of 4 (75%), 1 in the fourth: up.
        let pattern = |t: Duration, c: usize| {
            let k = (t.as_millis() / 100) as u32;
            vec![load(0, 1, 0.0), load(1, u32::from(!k.is_multiple_of(4)), 0.0), load(2, 2, 0.0)]
                .into_iter()
                .take(c)
                .collect()
        };
        let mut n = 2;
        let got = simulate(&mut Autoscaler::new(B, CALM), t0, Duration::from_secs(3), &mut n, pattern);
        assert_eq!(got.first().map(|g| g.1), Some(3), "{got:?}");
        // In 2 of 4 (50%): never.
        let half = |t: Duration, c: usize| {
            let k = (t.as_millis() / 100) as u32;
            vec![load(0, 1, 0.0), load(1, u32::from(k.is_multiple_of(2)), 0.0)].into_iter().take(c).collect()
        };
        let mut n = 2;
        assert!(simulate(&mut Autoscaler::new(B, CALM), t0, Duration::from_secs(20), &mut n, half).is_empty());
    }

    #[test]
    fn busy_cpus_count_as_pressure_and_say_so() {
        let (t0, mut n) = (Instant::now(), 1);
        let got = simulate(&mut Autoscaler::new(B, CALM), t0, Duration::from_secs(2), &mut n, |_, c| every(c, 0, 0.97));
        assert_eq!(got[0].2, "the workers at 90% of a core each or more for 2s");
        // Half the samples backed up, the other half busy: pressed throughout, by neither alone.
        let mixed = |t: Duration, _: usize| {
            let k = (t.as_millis() / 100) as u32;
            let (q, cpu) = if k.is_multiple_of(2) { (2, 0.1) } else { (0, 0.95) };
            vec![load(0, q, cpu), load(1, 0, cpu)]
        };
        let mut n = 2;
        let got = simulate(&mut Autoscaler::new(B, CALM), t0, Duration::from_secs(2), &mut n, mixed);
        assert_eq!(got[0].2, "connections waiting or the workers' CPU at its limit for 2s");
    }

    #[test]
    fn uneven_queues_count_in_all() {
        let t0 = Instant::now();
        // One connection waiting on two slots: no pressure.
        let mut n = 2;
        let one = |_: Duration, _: usize| vec![load(0, 1, 0.3), load(1, 0, 0.3)];
        assert!(simulate(&mut Autoscaler::new(B, CALM), t0, Duration::from_secs(20), &mut n, one).is_empty());
        // Five on one slot, none on the other (the hash is uneven): the workers cannot keep up.
        let mut n = 2;
        let uneven = |_: Duration, c: usize| (0..c).map(|s| load(s, if s == 0 { 5 } else { 0 }, 0.3)).collect();
        let got = simulate(&mut Autoscaler::new(B, CALM), t0, Duration::from_secs(2), &mut n, uneven);
        assert_eq!(got.len(), 1, "{got:?}");
    }

    #[test]
    fn a_calm_of_30s_removes_one_slot_then_waits_another_calm() {
        let (t0, mut n) = (Instant::now(), 3);
        let mut a = Autoscaler::new(B, CALM);
        let got = simulate(&mut a, t0, Duration::from_secs(70), &mut n, |_, c| every(c, 0, 0.01));
        let times: Vec<(Duration, usize)> = got.iter().map(|g| (g.0, g.1)).collect();
        assert_eq!(times, vec![(30 * 1000 * MS, 2), (60100 * MS, 1)], "{got:?}");
        assert_eq!(got[0].2, "calm for 30s");
        assert_eq!(n, 1, "never below MIN");
    }

    #[test]
    fn a_queue_seen_now_and_then_or_busy_cpus_keep_the_slots() {
        let t0 = Instant::now();
        // Slot 1 queued in 1 sample of 10 (10% > 5%).
        let sometimes = |t: Duration, c: usize| {
            let k = (t.as_millis() / 100) as u32;
            (0..c).map(|s| load(s, u32::from(s == 1 && k.is_multiple_of(10)), 0.05)).collect()
        };
        let mut n = 2;
        assert!(simulate(&mut Autoscaler::new(B, CALM), t0, Duration::from_secs(90), &mut n, sometimes).is_empty());
        // 1 in 25 (4%): calm.
        let rarely = |t: Duration, c: usize| {
            let k = (t.as_millis() / 100) as u32;
            (0..c).map(|s| load(s, u32::from(s == 1 && k.is_multiple_of(25)), 0.05)).collect()
        };
        let mut n = 2;
        assert_eq!(simulate(&mut Autoscaler::new(B, CALM), t0, Duration::from_secs(31), &mut n, rarely).len(), 1);
        // 3 workers at 0.4 core each: 1.2 cores would not fit in 2 at 0.5: kept.
        let mut n = 3;
        let got = simulate(&mut Autoscaler::new(B, CALM), t0, Duration::from_secs(90), &mut n, |_, c| every(c, 0, 0.4));
        assert!(got.is_empty(), "{got:?}");
    }

    #[test]
    fn a_steady_load_one_worker_serves_causes_no_decision() {
        let (t0, mut n) = (Instant::now(), 1);
        // A connection waiting in 1 sample of 5, a third of a core: pressed 20% of the time.
        let got = simulate(&mut Autoscaler::new(B, CALM), t0, Duration::from_secs(120), &mut n, |t, c| {
            let k = (t.as_millis() / 100) as u32;
            every(c, u32::from(k.is_multiple_of(5)), 0.33)
        });
        assert!(got.is_empty(), "{got:?}");
    }

    #[test]
    fn a_step_up_and_back_scales_up_fast_and_down_slowly() {
        let (t0, mut n) = (Instant::now(), 1);
        let span = Duration::from_secs(120);
        let heavy = |t: Duration| (Duration::from_secs(5)..Duration::from_secs(35)).contains(&t);
        let got = simulate(&mut Autoscaler::new(B, CALM), t0, span, &mut n, |t, c| {
            every(c, if heavy(t) { 3 } else { 0 }, 0.02)
        });
        let times: Vec<(u64, usize)> = got.iter().map(|g| (g.0.as_millis() as u64, g.1)).collect();
        // Up once 3/4 of the last 2 s were pressed (1.5 s into the heavy part), again 2.1 s
        // later; down once the last 30 s had queues in no more than 5% of the samples (28.5 s
        // after the heavy part), then a whole calm later.
        assert_eq!(times, vec![(6500, 2), (8600, 3), (63500, 2), (93600, 1)]);
    }

    #[test]
    fn a_scale_down_undone_soon_doubles_the_next_calm_up_to_8x_then_is_forgotten() {
        let t0 = Instant::now();
        let mut a = Autoscaler::new(B, CALM);
        assert_eq!(a.calm(t0), CALM);
        a.changed(2, 1, "auto", "calm for 30s", t0);
        a.changed(1, 2, "auto", "at least one connection waiting per slot for 2s", t0 + Duration::from_secs(10));
        assert_eq!(a.calm(t0 + Duration::from_secs(10)), 2 * CALM);
        for i in 0..4 {
            let t = t0 + Duration::from_secs(20 + i * 20);
            a.changed(2, 1, "auto", "calm", t);
            a.changed(1, 2, "auto", "up", t + Duration::from_secs(5));
        }
        assert_eq!(a.calm(t0 + Duration::from_secs(100)), 8 * CALM);
        assert_eq!(a.calm(t0 + Duration::from_secs(85) + FLAP_FORGET), CALM);
        // An up long after a down, or asked for by hand, is no flap.
        let mut b = Autoscaler::new(B, CALM);
        b.changed(2, 1, "auto", "calm", t0);
        b.changed(1, 2, "control", "asked by control", t0 + Duration::from_secs(1));
        b.changed(2, 3, "auto", "up", t0 + Duration::from_secs(61));
        assert_eq!(b.calm(t0 + Duration::from_secs(61)), CALM);
        assert_eq!(b.history().count(), 3);
    }

    #[test]
    fn a_sample_that_does_not_count_restarts_the_windows() {
        let (t0, n) = (Instant::now(), 1);
        let mut a = Autoscaler::new(B, CALM);
        for i in 0..19 {
            a.observe(Some(Sample { at: t0 + i * SAMPLE_EVERY, slots: every(n, 2, 0.0) }));
        }
        a.observe(None); // a roll began
        for i in 20..40 {
            let now = t0 + i * SAMPLE_EVERY;
            a.observe(Some(Sample { at: now, slots: every(n, 2, 0.0) }));
            assert_eq!(a.decide(n, now), Decision::Hold, "sample {i}");
        }
        let now = t0 + 40 * SAMPLE_EVERY;
        a.observe(Some(Sample { at: now, slots: every(n, 2, 0.0) }));
        assert!(matches!(a.decide(n, now), Decision::Change { to: 2, .. }));
    }

    #[test]
    fn a_count_outside_the_bounds_is_brought_back_and_the_bounds_hold() {
        let now = Instant::now();
        let Decision::Change { to, reason, .. } = judge(&[], 5, B, CALM, now) else { panic!() };
        assert_eq!((to, reason.as_str()), (3, "-n 1..3 keeps between 1 and 3"));
        let pressed: Vec<Sample> =
            (0..30).map(|i| Sample { at: now + i * SAMPLE_EVERY, slots: every(3, 9, 1.0) }).collect();
        assert_eq!(judge(&pressed, 3, B, CALM, now + 29 * SAMPLE_EVERY), Decision::Hold);
        let fixed = Bounds { min: 2, max: 2 };
        assert_eq!(judge(&pressed, 2, fixed, CALM, now + 29 * SAMPLE_EVERY), Decision::Hold);
    }

    #[test]
    fn figures_and_spans() {
        let now = Instant::now();
        let mut a = Autoscaler::new(B, CALM);
        assert_eq!(a.figures(now), Figures::default());
        for i in 0..10u32 {
            let slots = vec![load(0, 1, 0.5), load(1, u32::from(i.is_multiple_of(2)), 0.25)];
            a.observe(Some(Sample { at: now + i * SAMPLE_EVERY, slots }));
        }
        let f = a.figures(now + 9 * SAMPLE_EVERY);
        assert_eq!((f.samples, f.pressed, f.waiting, f.queued, f.cpu), (10, 0.5, 1.5, 1.0, 0.75));
        assert_eq!(
            (span(UP_AFTER), span(CALM), span(Duration::from_millis(1500))),
            ("2s".into(), "30s".into(), "1.5s".into())
        );
        assert_eq!(span(Duration::from_secs(240)), "4m");
    }

    #[test]
    fn export_and_import_keep_flaps_and_history() {
        let t0 = Instant::now();
        let mut a = Autoscaler::new(B, CALM);
        a.changed(2, 1, "auto", "calm for 30s", t0);
        a.changed(1, 2, "auto", "at least one connection waiting per slot for 2s", t0 + Duration::from_secs(3));
        let mut b = Autoscaler::new(B, CALM);
        b.import(a.export());
        assert_eq!(b.calm(t0 + Duration::from_secs(4)), 2 * CALM);
        assert_eq!(
            b.history().map(Record::text).collect::<Vec<_>>(),
            a.history().map(Record::text).collect::<Vec<_>>()
        );
        assert_eq!((b.counts(), a.counts()), ((1, 1), (1, 1)));
    }
}
