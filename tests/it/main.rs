//! The integration tests: one crate that drives the real `reuse-launch` binary through the
//! harness in `common`. One module per area:
//!
//! - `core`: the launcher core (issue 2): workers, respawn, rolls, stop, start-up errors.
//! - `modes`: the balancing modes (issue 3).
//! - `conventions`: readiness, the watchdog, sd_notify, `--user`, pid 1 (issue 4).
//! - `real_servers`: servers of other languages, and systemd's tools.
//! - `runtimes`: Go, puma, Starman, Rust listenfd and Java workers rolled under load.
//! - `sticky`: socket.io long-polling sessions under `--steer ip` and `--steer hash` (issue 8).
//! - `control`: the control socket and the client subcommands (issue 9).
//! - `logs`: worker output through the launcher, prefixed and line-safe (issue 9).
//! - `fleet`: `--metrics` (/metrics, /healthz, /readyz), `--drain-delay`, the Kubernetes example.
//! - `autoscale`: `-n MIN..MAX` following the load up and down, and not moving under a steady one (issue 17).
//! - `hung`: `--hung-timeout` replacing deadlocked and spinning workers, never stopped ones (issue 17).
//! - `intercept`: unmodified servers that bind the port themselves (`--intercept-bind`, issue 15).
//! - `hostile`: idle, slowloris, oversized and binary clients on `--metrics` and the control
//!   socket (issue 19).
//! - `watch`: the stall watch at scale and from its idle cadence (issue 18).
//! - `containment`: nothing of a worker's tree outlives a SIGKILLed launcher: soon after a
//!   start, a respawn, during a roll; with a delegated cgroup v2, detached processes too (issue 18).
//!
//! Run one area with `cargo test --test it core::`.

mod autoscale;
mod common;
mod containment;
mod control;
mod conventions;
mod core;
mod fleet;
mod hostile;
mod hung;
mod intercept;
mod leftovers;
mod logs;
mod modes;
mod real_servers;
mod restart;
mod runtimes;
mod scaling;
mod steering;
mod sticky;
mod watch;
