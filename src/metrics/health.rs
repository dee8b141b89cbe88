//! The rules of `/healthz` and `/readyz`, as pure functions of what the loop published and the
//! time (so that they are tested with a made-up clock).
//!
//! - Live: the supervisor loop turned within [`STUCK_AFTER`]. With `--metrics` the loop turns
//!   at least every [`BEAT_EVERY`] even when nothing happens, so an idle launcher is not
//!   mistaken for a stuck one.
//! - Ready: not stopping (from the first moment of a graceful stop, the drain delay included),
//!   and at least `--min-ready` workers ready, default every desired one (a stalled worker
//!   still counts: it is routed around, not gone). `--min-ready` above the desired number
//!   (after a scale-down) asks for the desired number.

use std::time::{Duration, Instant};

use crate::snapshot::Snapshot;

/// The loop turns at least this often while `--metrics` is on.
pub const BEAT_EVERY: Duration = Duration::from_secs(1);

/// A loop that has not turned for longer than this is stuck: `/healthz` says 503.
pub const STUCK_AFTER: Duration = Duration::from_secs(5);

/// Ok if the loop last turned at `beat` and that is recent at `now`; else why not.
pub fn live(beat: Instant, now: Instant) -> Result<(), String> {
    let since = now.saturating_duration_since(beat);
    if since > STUCK_AFTER {
        Err(format!("the supervisor loop has not turned for {:.1}s", since.as_secs_f64()))
    } else {
        Ok(())
    }
}

/// Ok(what) when the launcher should get traffic; Err(why not) otherwise.
pub fn ready(s: &Snapshot, stopping: bool, min_ready: Option<usize>) -> Result<String, String> {
    if stopping || s.stopping {
        return Err(format!("stopping: {} of {} workers ready", s.ready, s.desired));
    }
    let need = min_ready.unwrap_or(s.desired).min(s.desired);
    if s.ready >= need {
        Ok(format!("ready: {} of {} workers ready (need {need})", s.ready, s.desired))
    } else {
        Err(format!("not ready: {} of {} workers ready (need {need})", s.ready, s.desired))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(ready: usize, desired: usize) -> Snapshot {
        Snapshot {
            pid: 1,
            mode: "reuseport".into(),
            binds: vec![],
            generation: 1,
            desired,
            ready,
            roll: None,
            stopping: false,
            slots: vec![],
            autoscale: None,
            intercept: Default::default(),
        }
    }

    #[test]
    fn a_loop_that_stops_turning_is_unhealthy_after_stuck_after() {
        let t0 = Instant::now();
        assert!(live(t0, t0).is_ok());
        assert!(live(t0, t0 + BEAT_EVERY).is_ok());
        assert!(live(t0, t0 + STUCK_AFTER).is_ok());
        let e = live(t0, t0 + STUCK_AFTER + Duration::from_millis(200)).unwrap_err();
        assert_eq!(e, "the supervisor loop has not turned for 5.2s");
        // A beat stored after `now` was read (the loop turned meanwhile) is fresh.
        assert!(live(t0 + Duration::from_millis(5), t0).is_ok());
        // The loop turns every BEAT_EVERY at least: that alone never looks stuck.
        let mut beat = t0;
        for i in 1..100 {
            let now = t0 + BEAT_EVERY * i;
            assert!(live(beat, now).is_ok());
            beat = now;
        }
    }

    #[test]
    fn ready_needs_every_desired_worker_by_default() {
        assert_eq!(ready(&snapshot(3, 4), false, None).unwrap_err(), "not ready: 3 of 4 workers ready (need 4)");
        assert_eq!(ready(&snapshot(4, 4), false, None).unwrap(), "ready: 4 of 4 workers ready (need 4)");
        // A scale-down in progress: more ready than desired is ready.
        assert!(ready(&snapshot(5, 4), false, None).is_ok());
    }

    #[test]
    fn min_ready_lowers_the_bar_but_never_above_desired() {
        assert!(ready(&snapshot(2, 4), false, Some(2)).is_ok());
        assert!(ready(&snapshot(1, 4), false, Some(2)).is_err());
        assert!(ready(&snapshot(2, 2), false, Some(8)).is_ok());
    }

    #[test]
    fn stopping_is_never_ready() {
        assert_eq!(ready(&snapshot(4, 4), true, None).unwrap_err(), "stopping: 4 of 4 workers ready");
        let mut s = snapshot(4, 4);
        s.stopping = true;
        assert!(ready(&s, false, Some(1)).is_err());
    }
}
