//! The control socket: a running launcher answers `status`, `scale`, `roll` and `stop` on a Unix
//! stream socket, one JSON object per line each way, and the same binary is its client
//! (`reuse-launch status`, ...).
//!
//! This module owns where the socket lives ([`default_dir`], [`search_dirs`]). The children own
//! the rest:
//! - `server`: the socket's threads in the launcher (accept, peer check, one thread per
//!   client, requests in, [`Event::Control`](crate::event::Event::Control) to the loop,
//!   responses out). The supervisor loop never waits on a client.
//! - `clients`: the cap on clients, and the idle client that makes room for a new one.
//! - `place`: binding the socket at its path, the private default directory, stale sockets.
//! - `status`: the status response, built in the server thread from the loop's
//!   [`Snapshot`](crate::snapshot::Snapshot) plus what `measure` reads off the loop.
//! - `measure`: CPU %, RSS of each worker's process group (/proc) and accept queues (TCP_INFO).
//! - `client`: the subcommands: finding the launcher, one request, printing, exit codes.
//! - `table`: the `status` table, rendered by the client from the JSON response.
//! - `protocol`: the messages both ends share, as types serde derives: the request (decoded
//!   once, into what goes to the loop), the response, the reply the client reads.
//! - `wire`: how that JSON looks on the wire (serde_json with the launcher's numbers and
//!   escapes), and the words of a malformed-JSON error.
//!
//! ```text
//! $ reuse-launch status
//! $ echo '{"cmd":"scale","workers":"+2"}' | socat - UNIX-CONNECT:/run/reuse-launch/1234.sock
//! ```

pub mod client;
mod clients;
pub(crate) mod measure;
mod place;
pub(crate) mod protocol;
mod server;
mod status;
pub(crate) mod table;
pub(crate) mod wire;

use std::path::PathBuf;

pub use server::ControlSocket;

/// The directory a launcher puts `<pid>.sock` in when not told where: `$XDG_RUNTIME_DIR/
/// reuse-launch`, else `/run/reuse-launch` as root, else `/tmp/reuse-launch-<uid>`.
pub fn default_dir() -> PathBuf {
    search_dirs().into_iter().next().expect("there is always a fallback directory")
}

/// Every directory a launcher of this user may have used by default, in order of preference
/// (the client looks in all of them: a launcher started by cron has no XDG_RUNTIME_DIR).
pub fn search_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(xdg) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        dirs.push(PathBuf::from(xdg).join("reuse-launch"));
    }
    let uid = nix::unistd::geteuid();
    if uid.is_root() {
        dirs.push(PathBuf::from("/run/reuse-launch"));
    }
    dirs.push(PathBuf::from(format!("/tmp/reuse-launch-{uid}")));
    dirs
}

/// The launcher pid a default socket's file name stands for (`1234.sock`).
pub fn pid_of_socket_name(name: &str) -> Option<i32> {
    let digits = name.strip_suffix(".sock")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().filter(|p| *p > 0)
}

/// Is process `pid` running (not a zombie)?
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next()) != Some("Z"),
        // No /proc: ask the kernel (EPERM means it exists).
        Err(_) => {
            !matches!(nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None), Err(nix::errno::Errno::ESRCH))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_names() {
        assert_eq!(pid_of_socket_name("1234.sock"), Some(1234));
        for bad in ["x.sock", ".sock", "0.sock", "12.sock.tmp", "12", "-1.sock"] {
            assert_eq!(pid_of_socket_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn default_dir_is_first_searched() {
        assert_eq!(default_dir(), search_dirs()[0]);
        assert!(alive(std::process::id() as i32));
    }
}
