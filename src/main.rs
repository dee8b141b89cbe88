//! reuse-launch: binds the listening sockets once, hands them to N copies of any server binary,
//! and supervises those workers (respawn with backoff, rolling restart on USR2/HUP).
//!
//! `main` parses flags into a [`cli::Config`], resolves the command, binds every socket, then
//! hands over to [`supervisor::Supervisor`]. It maps each kind of failure to an exit code:
//! 2 usage, 127 command not found, 126 not executable, 1 bind failure or a fatal supervisor
//! error, 0 a clean stop.
//!
//! ```text
//! reuse-launch -n 4 -b 127.0.0.1:8080 -- python3 tests/workers/pyworker.py
//! ```

mod cli;
mod command;
mod contract;
mod error;
mod event;
mod load;
mod notify;
mod proxy;
mod readiness;
mod rescue;
mod roll;
mod socket;
mod spawn;
mod stall;
mod steer;
mod supervisor;
mod upstream;

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

use error::Error;
use supervisor::{RealOs, Supervisor};

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format(|buf, record| {
            let level = match record.level() {
                log::Level::Info => String::new(),
                l => format!("{}: ", l.as_str().to_lowercase()),
            };
            writeln!(buf, "reuse-launch: {level}{}", record.args())
        })
        .init();
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("reuse-launch: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn run() -> Result<(), Error> {
    let args = cli::Args::parse();
    let config = cli::Config::from_args(args, std::env::var("PORT").ok())?;
    let program = command::Program::resolve(&config.command)?;
    let identity =
        config.user.as_deref().map(|user| command::resolve_identity(user, config.group.as_deref())).transpose()?;
    let listeners = match socket::inherited()? {
        Some(sockets) => {
            log::info!("using {} listening sockets inherited from the service manager (LISTEN_FDS)", sockets.len());
            socket::Listeners::adopt(sockets, config.mode, config.workers, config.backlog)?
        }
        None => socket::Listeners::bind(&config.binds, config.mode, config.workers, config.backlog)?,
    };
    for addr in listeners.local_addrs() {
        log::info!(
            "listening on {addr} ({} mode, {} workers, {} sockets in all)",
            listeners.mode(),
            config.workers,
            listeners.socket_count()
        );
    }
    spawn::raise_fd_limit();
    let supervisor = Supervisor::new(config, listeners, program, identity, RealOs::new())?;
    event::start_signal_thread(supervisor.sender())?;
    supervisor.run()
}
