//! The flags of automatic scaling and of hung workers: `-n MIN..MAX` (and `MIN..auto`),
//! `--scale-down-after`, `--hung-timeout`, validated (each error names the flag and the cause).

use std::time::Duration;

use super::{parse_duration, parse_workers, usage};
use crate::error::Error;
use crate::socket::Mode;

/// `-n MIN..MAX`: the fewest and the most slots the launcher keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bounds {
    pub min: usize,
    pub max: usize,
}

impl std::fmt::Display for Bounds {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "{}..{}", self.min, self.max)
    }
}

/// `--scale-down-after`'s default: the calm a scale-down needs (see `autoscale`).
pub const SCALE_DOWN_AFTER: Duration = Duration::from_secs(30);

/// `-n N`, `-n auto` (fixed), or `-n MIN..MAX` / `-n MIN..auto` (automatic scaling between
/// them, starting with MIN): the slots at start and the bounds.
pub(super) fn parse_worker_bounds(s: &str) -> Result<(usize, Option<Bounds>), Error> {
    let Some((lo, hi)) = s.split_once("..") else { return Ok((parse_workers(s)?, None)) };
    let bad = |why: String| usage("--workers", s, why);
    let min = match lo.parse::<usize>() {
        Ok(n) if n >= 1 => n,
        _ => return Err(bad("MIN of MIN..MAX must be a number, at least 1".into())),
    };
    let max = match hi {
        "auto" => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        _ => match hi.parse::<usize>() {
            Ok(n) if n >= 1 => n,
            _ => return Err(bad("MAX of MIN..MAX must be a number or 'auto'".into())),
        },
    };
    if max > 4096 {
        return Err(bad("at most 4096 workers".into()));
    }
    if min > max {
        let auto = if hi == "auto" { " ('auto': one per CPU)" } else { "" };
        return Err(bad(format!("MIN {min} is more than MAX {max}{auto}")));
    }
    Ok((min, Some(Bounds { min, max })))
}

/// `--scale-down-after`: only with `-n MIN..MAX`, more than 0; default [`SCALE_DOWN_AFTER`].
pub(super) fn scale_down_after(value: Option<&str>, autoscale: Option<Bounds>) -> Result<Duration, Error> {
    match (value, autoscale) {
        (None, _) => Ok(SCALE_DOWN_AFTER),
        (Some(d), None) => Err(usage("--scale-down-after", d, "needs -n MIN..MAX (automatic scaling)")),
        (Some(d), Some(_)) => match parse_duration(d) {
            Ok(t) if !t.is_zero() => Ok(t),
            Ok(_) => Err(usage("--scale-down-after", d, "must be more than 0")),
            Err(e) => Err(usage("--scale-down-after", d, e)),
        },
    }
}

/// `--hung-timeout`: more than 0, and only where the stall watch runs (a socket per slot).
pub(super) fn hung_timeout(value: Option<&str>, mode: Mode) -> Result<Option<Duration>, Error> {
    let Some(t) = value else { return Ok(None) };
    if !matches!(mode, Mode::Reuseport | Mode::RoundRobin) {
        return Err(usage(
            "--hung-timeout",
            t,
            format!(
                "needs --mode reuseport or round-robin (not {mode}): stalled workers are seen from \
                 the queues of the sockets the launcher holds per slot"
            ),
        ));
    }
    match parse_duration(t) {
        Ok(d) if !d.is_zero() => Ok(Some(d)),
        Ok(_) => Err(usage("--hung-timeout", t, "must be more than 0")),
        Err(e) => Err(usage("--hung-timeout", t, e)),
    }
}
