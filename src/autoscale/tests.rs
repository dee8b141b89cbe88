//! Unit tests of the policy: simulated samples over time through [`judge`](super::judge) and
//! [`Autoscaler`](super::Autoscaler), each rule of the module doc and its figures.

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
    assert_eq!(a.history().last().unwrap().text(), "scaled up to 3: at least one connection waiting per slot for 2s");
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
    let got =
        simulate(&mut Autoscaler::new(B, CALM), t0, span, &mut n, |t, c| every(c, if heavy(t) { 3 } else { 0 }, 0.02));
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
    assert_eq!(b.history().map(Record::text).collect::<Vec<_>>(), a.history().map(Record::text).collect::<Vec<_>>());
    assert_eq!((b.counts(), a.counts()), ((1, 1), (1, 1)));
}
