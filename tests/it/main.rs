//! The integration tests: one crate that drives the real `reuse-launch` binary through the
//! harness in `common`. One module per area:
//!
//! - `core`: the launcher core (issue 2): workers, respawn, rolls, stop, start-up errors.
//! - `modes`: the balancing modes (issue 3).
//! - `conventions`: readiness, the watchdog, sd_notify, `--user`, pid 1 (issue 4).
//! - `real_servers`: servers of other languages, and systemd's tools.
//! - `fleet`: `--metrics` (/metrics, /healthz, /readyz), `--drain-delay`, the Kubernetes example.
//!
//! Run one area with `cargo test --test it core::`.

mod common;
mod conventions;
mod core;
mod fleet;
mod modes;
mod real_servers;
mod runtimes;
mod scaling;
mod steering;
