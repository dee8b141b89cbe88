//! The integration tests: one crate that drives the real `reuse-launch` binary through the
//! harness in `common`. One module per area (the test `every_module_is_described` below keeps
//! this list in step with the `mod` lines):
//!
//! - `common`: the harness: starting the launcher, reading its log, HTTP to its workers,
//!   `/proc`, polling for conditions with deadlines.
//! - `status_fields`: `status --json` of a launcher started by the harness, and waits on its
//!   fields (what a test asserts through the status rather than through the log's wording).
//! - `core`: the launcher core (issue 2): workers, respawn, rolls, stop, start-up errors.
//! - `modes`: the balancing modes (issue 3).
//! - `conventions`: readiness, the watchdog, sd_notify, `--user`, pid 1 (issue 4).
//! - `real_servers`: servers of other languages, and systemd's tools.
//! - `runtimes`: Go, puma, Starman, Rust listenfd and Java workers rolled under load.
//! - `steering`: `--steer ip` and `--steer cpu`, and nothing stranded on a deadlocked worker (issue 8).
//! - `sticky`: socket.io long-polling sessions under `--steer ip` and `--steer hash` (issue 8).
//! - `control`: the control socket and the client subcommands (issue 9).
//! - `logs`: worker output through the launcher, prefixed and line-safe (issue 9).
//! - `scaling`: TTIN/TTOU under load and `--max-memory` replacing a growing worker (issue 9).
//! - `restart`: a restart of the launcher through the service manager's fd store refuses nothing (issue 10).
//! - `leftovers`: nothing a worker started outlives the launcher, SIGKILLed or stopped (issue 11).
//! - `fleet`: `--metrics` (/metrics, /healthz, /readyz), `--drain-delay`, the Kubernetes example.
//! - `autoscale`: `-n MIN..MAX` following the load up and down, and not moving under a steady one (issue 17).
//! - `hung`: `--hung-timeout` replacing deadlocked and spinning workers, never stopped ones (issue 17).
//! - `intercept`: unmodified servers that bind the port themselves (`--intercept-bind`, issue 15).
//! - `intercept_servers`: nginx (a master and its workers) and redis, unchanged, on the
//!   launcher's sockets (issue 15).
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
mod intercept_servers;
mod leftovers;
mod logs;
mod modes;
mod real_servers;
mod restart;
mod runtimes;
mod scaling;
mod status_fields;
mod steering;
mod sticky;
mod watch;

/// Every `mod x;` of this file has its line `` - `x`: `` in the module doc above, and the doc
/// names no module that is not there.
#[test]
fn every_module_is_described() {
    let source = include_str!("main.rs");
    let mods: Vec<&str> = source.lines().filter_map(|l| l.strip_prefix("mod ")?.strip_suffix(';')).collect();
    let described: Vec<&str> =
        source.lines().filter_map(|l| l.strip_prefix("//! - `")?.split_once("`:").map(|(name, _)| name)).collect();
    assert!(mods.len() >= 20, "the mod lines were not found: {mods:?}");
    let missing: Vec<&&str> = mods.iter().filter(|m| !described.contains(m)).collect();
    assert!(missing.is_empty(), "modules of tests/it/main.rs without a line in its doc: {missing:?}");
    let stale: Vec<&&str> = described.iter().filter(|d| !mods.contains(d)).collect();
    assert!(stale.is_empty(), "the doc of tests/it/main.rs describes modules that are gone: {stale:?}");
}
