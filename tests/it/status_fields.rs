//! `status --json` of a launcher the harness started, and waits on its fields: what a test
//! asserts through the fields the README's Protocol section documents (`desired`, `ready`,
//! `generation`, `roll`, the worker rows' `state`, `restarts_by_cause`, ...) rather than through
//! the log's English wording. The launcher's control socket is found where it says it is (its
//! `control socket: PATH` line), so these work for any launcher, with or without `--control`.
//!
//! The JSON itself goes through the helpers of `control` (`status`, `wait_status`, `rows`,
//! `num`), by name.

use std::time::Duration;

use crate::common::*;
use crate::control::json::Value;
use crate::control::{num, rows};

/// The launcher's control socket, from its log (waiting up to 20 s for the line).
pub fn control_of(l: &Launcher) -> String {
    let line = l.wait_for("control socket: /", secs(20));
    line.split("control socket: ").nth(1).expect("a path after the prefix").trim().to_string()
}

/// `status --json` of `l` now; panics with the log if the client fails.
pub fn status_of(l: &Launcher) -> Value {
    let control = control_of(l);
    crate::control::status(&["--control", &control])
        .unwrap_or_else(|| panic!("status --json --control {control} failed; log:\n{}", l.log()))
}

/// Poll `status --json` of `l` until `cond` holds; returns that status, or panics with the
/// last one seen and the log.
pub fn wait_fields(l: &Launcher, timeout: Duration, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
    let control = control_of(l);
    crate::control::wait_status(l, &["--control", &control], timeout, what, cond)
}

/// `desired` and `ready` both `n`: every slot has a ready worker of its own (the fact the log
/// line `all N workers ready` states).
pub fn all_ready(s: &Value, n: u64) -> bool {
    num(s, "desired") == n && num(s, "ready") == n
}

/// Wait until `desired` and `ready` are both `n` (see [`all_ready`]).
pub fn wait_all_ready(l: &Launcher, n: u64, timeout: Duration) -> Value {
    wait_fields(l, timeout, &format!("{n} of {n} workers ready"), |s| all_ready(s, n))
}

/// The worker rows of `slot` (one per worker process; one `backoff` row with `pid` null).
pub fn rows_of(s: &Value, slot: usize) -> Vec<Value> {
    rows(s).into_iter().filter(|r| r.get("slot").and_then(Value::as_u64) == Some(slot as u64)).collect()
}

/// The row of the worker process `pid`, if it is in the status.
pub fn row_of_pid(s: &Value, pid: i32) -> Option<Value> {
    rows(s).into_iter().find(|r| r.get("pid").and_then(Value::as_u64) == Some(pid as u64))
}

/// The `state` of the worker process `pid` (`starting`, `ready`, `draining`, `stalled`), or
/// None if it has no row.
pub fn state_of_pid(s: &Value, pid: i32) -> Option<String> {
    row_of_pid(s, pid).and_then(|r| r.get("state").and_then(Value::as_str).map(str::to_string))
}

/// Wait until the worker process `pid` is `stalled` (the stall watch took it out of the
/// serving set: the state behind the log's `is not running` and `has not emptied its queue`).
pub fn wait_stalled(l: &Launcher, pid: i32) -> Value {
    wait_fields(l, secs(10), &format!("pid {pid} stalled"), |s| state_of_pid(s, pid).as_deref() == Some("stalled"))
}

/// `restarts_by_cause[cause]` of `slot` (0 when absent or when the slot has no row).
pub fn restarts_by(s: &Value, slot: usize, cause: &str) -> u64 {
    let row = rows_of(s, slot).into_iter().next();
    row.and_then(|r| r.get("restarts_by_cause").and_then(|c| c.get(cause)).and_then(Value::as_u64)).unwrap_or(0)
}

/// The slots that have a row, in order, without repeats.
pub fn slots(s: &Value) -> Vec<u64> {
    let mut slots: Vec<u64> = rows(s).iter().filter_map(|r| r.get("slot").and_then(Value::as_u64)).collect();
    slots.dedup();
    slots
}
