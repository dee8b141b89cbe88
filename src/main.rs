//! reuse-launch: binds the listening sockets once, hands them to N copies of any server binary,
//! and supervises those workers (respawn with backoff, rolling restart on USR2/HUP).
//!
//! `main` parses flags into a [`cli::Config`], resolves the command, binds every socket, then
//! hands over to [`supervisor::Supervisor`]. It maps each kind of failure to an exit code:
//! 2 usage, 127 command not found, 126 not executable, 1 bind failure or a fatal supervisor
//! error, 0 a clean stop.
//!
//! A first argument naming a client subcommand (`status`, `scale`, `roll`, `stop`) runs the
//! client instead ([`control::client`]); the launcher's command always follows `--`, so the two
//! forms never overlap.
//!
//! ```text
//! reuse-launch -n 4 -b 127.0.0.1:8080 -- python3 tests/workers/pyworker.py
//! ```

mod activation;
mod autoscale;
mod cgroup;
mod cli;
mod command;
mod contract;
mod control;
mod descendants;
mod diag;
mod error;
mod event;
mod hung;
mod intercept;
mod load;
mod logs;
mod metrics;
mod notify;
mod proxy;
mod queues;
mod readiness;
mod reexec;
mod relay;
mod rescue;
mod roll;
mod sentinel;
mod snapshot;
mod socket;
mod spawn;
mod stall;
mod steer;
mod supervisor;
mod sys;
mod upstream;
mod vfork;

#[cfg(test)]
mod proptests;

use std::process::ExitCode;

use clap::Parser;

use error::Error;
use supervisor::{RealOs, Supervisor};

fn main() -> ExitCode {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    reexec::answer_probe(&argv);
    if argv.get(1).is_some_and(|a| a == "__sentinel") {
        let cgroup = argv.get(3).filter(|a| *a == "--cgroup").and(argv.get(4)).map(std::path::PathBuf::from);
        sentinel::run(argv.get(2).and_then(|p| p.to_str()).and_then(|p| p.parse().ok()).unwrap_or(0), cgroup);
    }
    if control::client::is_subcommand(argv.get(1)) {
        return ExitCode::from(control::client::main(argv));
    }
    logs::init();
    let result = run();
    logs::finish();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("reuse-launch: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn run() -> Result<(), Error> {
    // The lowest free fd numbers (after the log thread's few), before any socket or pipe takes
    // them (see spawn's `stage`).
    spawn::reserve_stage();
    let args = cli::Args::parse();
    let mut config = cli::Config::from_args(args, std::env::var("PORT").ok())?;
    logs::start(config.log_prefix).map_err(|e| Error::Failed(format!("cannot start the log thread: {e}")))?;
    let program = command::Program::resolve(&config.command)?;
    let identity =
        config.user.as_deref().map(|user| command::resolve_identity(user, config.group.as_deref())).transpose()?;
    let resumed = reexec::take_state()?;
    let handed = resumed.as_ref().map(|s| &s.listeners);
    // From here on the binds are the listeners' (`Listeners::binds`, with their bound addresses):
    // the configuration keeps no copy.
    let binds = std::mem::take(&mut config.binds);
    let listeners = socket::open(&binds, config.mode, config.workers, config.backlog, handed)?;
    for addr in listeners.local_addrs().iter().filter(|_| resumed.is_none()) {
        log::info!(
            "listening on {addr} ({} mode, {} workers, {} sockets in all)",
            listeners.mode(),
            config.workers,
            listeners.socket_count()
        );
    }
    spawn::raise_fd_limit();
    let control_path = config.control.clone();
    let want = config.containment;
    let resumed_on = resumed.as_ref().is_some_and(|s| !s.intercept.is_empty());
    let mut supervisor = Supervisor::new(config, listeners, program, identity, RealOs::new(), resumed_on)?;
    // The workers' cgroups, then the sentinel told of them (after a reexec: the old image's
    // sentinel, which names the cgroups it was told of).
    let (containment, sentinel) = match resumed.as_ref().and_then(|s| s.sentinel) {
        Some(reexec::SentinelState { pid, fd }) => {
            (cgroup::Containment::adopt(cgroup::sentinel_root(pid)), Some(sentinel::Sentinel::adopt(pid, fd)))
        }
        None => {
            let containment = cgroup::Containment::set_up(want).map_err(Error::Failed)?;
            let sentinel = sentinel::Sentinel::start(containment.root());
            (containment, sentinel)
        }
    };
    if resumed.is_none() {
        log::info!("{}", containment.describe());
    }
    supervisor.set_sentinel(sentinel);
    supervisor.set_containment(containment);
    // Removed when `run` returns, on a clean stop and on a fatal error alike (a reexec keeps
    // the path: the new image finds nobody answering there and binds it again).
    let _control = control::ControlSocket::start(control_path, supervisor.sender())?;
    event::start_signal_thread(supervisor.sender())?;
    // After a reexec the old image left the handled signals blocked: what arrived meanwhile is
    // pending, and is delivered now that the handlers are in place.
    reexec::block(&event::HANDLED, false);
    let fresh = resumed.is_none();
    if let Some(state) = resumed {
        supervisor.resume(state, std::time::Instant::now())?;
    }
    supervisor.run(fresh)
}
