//! The client subcommands of the same binary: `status [--json]`, `scale N|+K|-K`, `roll`,
//! `stop`. Each finds its launcher (`--pid`, `--control`, `REUSE_LAUNCH_CONTROL`, else the only
//! one this user runs), sends one request, prints the answer, and exits with
//! [`DONE`], [`FAILED`], [`USAGE`] or [`NOT_FOUND`].
//!
//! `main` recognises a subcommand by the first argument alone, so the launcher's own form
//! `reuse-launch [OPTIONS] -- COMMAND` is untouched (its command always follows `--`).

use std::ffi::OsString;
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};

use super::protocol::{Reply, Request};

pub const DONE: u8 = 0;
/// Refused by the launcher, or the request failed.
pub const FAILED: u8 = 1;
/// Bad arguments, or several launchers and no `--pid`/`--control` to choose.
pub const USAGE: u8 = 2;
/// No launcher found (or none answers at the path given).
pub const NOT_FOUND: u8 = 3;

/// The subcommand names: a first argument among these selects the client.
pub const SUBCOMMANDS: [&str; 5] = ["status", "scale", "roll", "stop", "reexec"];

/// How long the client waits for its answer (status measures for 200 ms; the loop answers at
/// once; the server gives up on the loop after 5 s).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Parser, Debug)]
#[command(name = "reuse-launch", about = "Control a running reuse-launch through its control socket.")]
struct ClientArgs {
    #[command(subcommand)]
    cmd: Sub,
}

#[derive(clap::Args, Debug, Clone)]
struct Pick {
    /// The launcher with this pid (its socket in the default directories).
    #[arg(long, value_name = "PID", conflicts_with = "control")]
    pid: Option<u32>,
    /// The launcher's control socket (default: REUSE_LAUNCH_CONTROL, else the only launcher
    /// this user runs).
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum Sub {
    /// Workers, their state, CPU, memory and queues (a table; --json for the raw object).
    Status {
        /// Print the status object as JSON (one line).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        pick: Pick,
    },
    /// Change the number of workers: N, +K or -K.
    Scale {
        #[arg(allow_hyphen_values = true, value_name = "N|+K|-K")]
        workers: String,
        #[command(flatten)]
        pick: Pick,
    },
    /// Rolling restart (as USR2).
    Roll {
        #[command(flatten)]
        pick: Pick,
    },
    /// Upgrade the launcher in place: it re-executes the binary it was started from (same pid,
    /// same workers); waits until the new image answers.
    Reexec {
        #[command(flatten)]
        pick: Pick,
    },
    /// Graceful stop (as TERM); waits until the launcher has exited.
    Stop {
        /// Return once the launcher has accepted the request.
        #[arg(long)]
        no_wait: bool,
        #[command(flatten)]
        pick: Pick,
    },
}

/// Is this argument a client subcommand?
pub fn is_subcommand(arg: Option<&OsString>) -> bool {
    arg.and_then(|a| a.to_str()).is_some_and(|a| SUBCOMMANDS.contains(&a))
}

/// An outcome to report: the exit code and the message for stderr.
struct Fail(u8, String);

/// Run a client subcommand; returns the exit code.
pub fn main(argv: Vec<OsString>) -> u8 {
    let args = match ClientArgs::try_parse_from(argv) {
        Ok(a) => a,
        Err(e) => {
            let code = if e.use_stderr() { USAGE } else { DONE };
            let _ = e.print();
            return code;
        }
    };
    match run(args.cmd) {
        Ok(()) => DONE,
        Err(Fail(code, message)) => {
            eprintln!("reuse-launch: {message}");
            code
        }
    }
}

fn run(cmd: Sub) -> Result<(), Fail> {
    let (request, pick) = match &cmd {
        Sub::Status { pick, .. } => (Request::Status, pick),
        Sub::Scale { workers, pick } => {
            let workers = workers.parse().map_err(|e| Fail(USAGE, format!("scale: {e}")))?;
            (Request::Scale { workers }, pick)
        }
        Sub::Roll { pick } => (Request::Roll, pick),
        Sub::Stop { pick, .. } => (Request::Stop, pick),
        Sub::Reexec { pick } => (Request::Reexec, pick),
    };
    let path = find(pick)?;
    // Which image answers now: after a reexec, another one must.
    let before = match cmd {
        Sub::Reexec { .. } => ask(&path, &Request::Status)?.0.image,
        _ => None,
    };
    let (answer, line) = ask(&path, &request)?;
    let pid = answer.pid;
    match cmd {
        // The line as the launcher wrote it (its members in its order).
        Sub::Status { json: true, .. } => println!("{line}"),
        Sub::Status { .. } => {
            let status = super::wire::parse(&line).map_err(|e| Fail(FAILED, format!("unreadable answer ({e})")))?;
            print!("{}", super::table::render(&status))
        }
        Sub::Scale { .. } => println!("launcher {pid}: scaling to {} workers", answer.desired),
        Sub::Roll { .. } => println!("launcher {pid}: rolling restart to generation {}", answer.generation),
        Sub::Reexec { .. } => {
            let to = answer.reexec.unwrap_or_default();
            let text = |s: &str| if s.is_empty() { "?".to_string() } else { s.to_string() };
            println!("launcher {pid}: re-executing {} ({})", text(&to.binary), text(&to.version));
            // The new image binds the control socket again once it runs.
            let end = Instant::now() + Duration::from_secs(20);
            loop {
                std::thread::sleep(Duration::from_millis(50));
                match ask(&path, &Request::Status) {
                    Ok((s, _)) if s.image.is_some() && s.image != before => break,
                    _ if Instant::now() > end => {
                        return Err(Fail(FAILED, format!("launcher {pid}: no answer within 20 s after reexec")))
                    }
                    _ => {}
                }
            }
            println!("launcher {pid}: running the new binary; every worker kept");
        }
        Sub::Stop { no_wait, .. } => {
            let pid = pid as i32;
            println!("launcher {pid}: stopping");
            if !no_wait {
                // Gone once its process is (or, where pids are not ours to see, its socket).
                while super::alive(pid) && path.exists() {
                    std::thread::sleep(Duration::from_millis(50));
                }
                println!("launcher {pid}: stopped");
            }
        }
    }
    Ok(())
}

/// The control socket to talk to.
fn find(pick: &Pick) -> Result<PathBuf, Fail> {
    if let Some(path) = &pick.control {
        return Ok(path.clone());
    }
    let dirs = super::search_dirs();
    let shown = || dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ");
    if let Some(pid) = pick.pid {
        return dirs
            .iter()
            .map(|d| d.join(format!("{pid}.sock")))
            .find(|p| std::fs::symlink_metadata(p).is_ok())
            .ok_or_else(|| Fail(NOT_FOUND, format!("no launcher with pid {pid}: no {pid}.sock in {}", shown())));
    }
    if let Some(path) = std::env::var_os("REUSE_LAUNCH_CONTROL").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(path));
    }
    let found = running(&dirs);
    match found.as_slice() {
        [] => {
            Err(Fail(NOT_FOUND, format!("no running launcher found (looked in {}); give --pid or --control", shown())))
        }
        [(_, path)] => Ok(path.clone()),
        several => {
            let list: Vec<String> = several.iter().map(|(pid, p)| format!("  pid {pid}: {}", p.display())).collect();
            Err(Fail(
                USAGE,
                format!(
                    "{} launchers are running; pick one with --pid PID or --control PATH:\n{}",
                    several.len(),
                    list.join("\n")
                ),
            ))
        }
    }
}

/// Launchers with a socket in `dirs`: `<pid>.sock` whose pid runs and whose socket answers.
fn running(dirs: &[PathBuf]) -> Vec<(i32, PathBuf)> {
    let mut found = Vec::new();
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else { continue };
        for entry in entries.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(super::pid_of_socket_name) else { continue };
            let path = entry.path();
            let is_socket = entry.file_type().is_ok_and(|t| t.is_socket());
            if is_socket
                && super::alive(pid)
                && UnixStream::connect(&path).is_ok()
                && !found.iter().any(|(p, _)| *p == pid)
            {
                found.push((pid, path));
            }
        }
    }
    found.sort();
    found
}

/// Send one request and read its answer (read, and the line as received without its newline);
/// an `"ok": false` answer is a [`FAILED`].
fn ask(path: &Path, request: &Request) -> Result<(Reply, String), Fail> {
    let mut stream = UnixStream::connect(path).map_err(|e| {
        let code = match e.kind() {
            ErrorKind::NotFound | ErrorKind::ConnectionRefused => NOT_FOUND,
            _ => FAILED,
        };
        Fail(code, format!("cannot reach a launcher at {}: {e}", path.display()))
    })?;
    let io = |e: std::io::Error| Fail(FAILED, format!("control socket {}: {e}", path.display()));
    stream.set_write_timeout(Some(ANSWER_TIMEOUT)).map_err(io)?;
    stream.set_read_timeout(Some(ANSWER_TIMEOUT)).map_err(io)?;
    let started = Instant::now();
    // A refusal may arrive (and the launcher hang up) before the request is written: read the
    // answer even when writing failed.
    let written = stream.write_all(format!("{}\n", super::wire::to_line(request)).as_bytes());
    let mut line = String::new();
    let read = BufReader::new(&stream).read_line(&mut line);
    if let (Err(e), true) = (written, line.trim().is_empty()) {
        return Err(io(e));
    }
    read.map_err(|e| {
        if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) {
            Fail(FAILED, format!("no answer from {} within {:?}", path.display(), started.elapsed()))
        } else {
            io(e)
        }
    })?;
    if line.trim().is_empty() {
        return Err(Fail(FAILED, format!("{} closed the connection without answering", path.display())));
    }
    let raw = line.as_str();
    let line = raw.trim();
    let unreadable = |e: String| Fail(FAILED, format!("unreadable answer ({e}): {raw}"));
    let value = super::wire::parse(line).map_err(unreadable)?;
    let answer: Reply = serde_json::from_value(value).map_err(|e| unreadable(e.to_string()))?;
    if answer.ok {
        Ok((answer, line.to_string()))
    } else {
        Err(Fail(FAILED, answer.error.unwrap_or_else(|| "refused without a reason".to_string())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<ClientArgs, clap::Error> {
        ClientArgs::try_parse_from(std::iter::once("reuse-launch").chain(args.iter().copied()))
    }

    #[test]
    fn subcommands_parse() {
        assert!(matches!(parse(&["status", "--json"]).unwrap().cmd, Sub::Status { json: true, .. }));
        match parse(&["scale", "-1", "--pid", "12"]).unwrap().cmd {
            Sub::Scale { workers, pick } => assert_eq!((workers.as_str(), pick.pid), ("-1", Some(12))),
            other => panic!("{other:?}"),
        }
        assert!(matches!(parse(&["scale", "+2"]).unwrap().cmd, Sub::Scale { .. }));
        assert!(parse(&["roll", "--pid", "1", "--control", "/x"]).is_err());
        assert!(parse(&["stop", "--no-wait"]).is_ok());
        assert!(parse(&["status", "extra"]).is_err());
        assert!(is_subcommand(Some(&OsString::from("roll"))));
        assert!(!is_subcommand(Some(&OsString::from("-n"))));
        assert!(!is_subcommand(Some(&OsString::from("--"))));
    }
}
