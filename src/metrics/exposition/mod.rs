//! `/metrics`: what is measured at each scrape (on the endpoint's thread: /proc and one
//! `getsockopt` per listener) and the Prometheus text exposition format (version 0.0.4), by
//! hand: `# HELP`, `# TYPE`, then `name{label="value"} number` lines, label values escaped.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `reuse_launch_build_info` | gauge (1) | `version` |
//! | `reuse_launch_workers` | gauge | `state`: starting, ready, stalled, draining, backoff (a slot waiting to respawn) |
//! | `reuse_launch_workers_desired` | gauge | |
//! | `reuse_launch_workers_min`, `reuse_launch_workers_max` | gauge | (with `-n MIN..MAX`) |
//! | `reuse_launch_autoscale_decisions_total` | counter | `direction`: up, down (with `-n MIN..MAX`) |
//! | `reuse_launch_autoscale_last_decision_timestamp_seconds` | gauge | `direction`, `workers`, `reason` (once one was made) |
//! | `reuse_launch_generation` | gauge | |
//! | `reuse_launch_roll_in_progress` | gauge (0/1) | |
//! | `reuse_launch_serving_slots` | gauge | |
//! | `reuse_launch_restarts_total` | counter | `slot`, `cause`: crash, ready-timeout, watchdog, memory, hung |
//! | `reuse_launch_worker_rss_bytes` | gauge | `slot` |
//! | `reuse_launch_worker_cpu_seconds_total` | counter | `slot` |
//! | `reuse_launch_accept_queue` | gauge | `slot`, `bind` |
//! | `reuse_launch_accept_queue_max` | gauge | `slot`, `bind` |
//! | `reuse_launch_listen_overflows_total` | counter | |
//! | `reuse_launch_intercepted_binds_total` | counter | |
//! | `reuse_launch_intercepted_listens_total` | counter | |
//! | `reuse_launch_metrics_connections` | gauge | |
//! | `reuse_launch_metrics_connections_max` | gauge | |
//! | `reuse_launch_metrics_closed_total` | counter | `reason`: timeout, evicted, refused, invalid, write_timeout |
//!
//! A slot's RSS and CPU are those of every process of its workers' process groups (during a
//! roll, old and new worker together); CPU includes the children those processes reaped, and
//! starts again from 0 when the slot's worker is replaced (a counter reset, which `rate()`
//! handles). Queues are read from the listeners the launcher holds (`tcpi_unacked` and
//! `tcpi_sacked` of TCP_INFO on a listener: its accept queue and backlog); in `shared` mode the
//! one socket per bind is reported once, as `slot="shared"`; `self` mode has none.
//! `reuse_launch_listen_overflows_total` is `ListenOverflows` of /proc/net/netstat: every
//! listener of the launcher's network namespace (the host, or the pod), not only its own.
//! The last three are the `--metrics` endpoint's own connections (see [`super::limits`]).
//!
//! Files: `measure` what a scrape reads (through `sys`), `families` the families in the
//! order above, `out` the writer of the text format.

mod families;
mod measure;
mod out;
#[cfg(test)]
mod tests;

pub use families::render;
pub use measure::{measure, Measured};

/// Prometheus text format 0.0.4.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The restart causes always listed (at 0 until one happens), so that `increase()` works from
/// the first one.
pub const CAUSES: [&str; 5] = ["crash", "ready-timeout", "watchdog", "memory", "hung"];

/// The worker states always listed.
pub const STATES: [&str; 5] = ["starting", "ready", "stalled", "draining", "backoff"];
