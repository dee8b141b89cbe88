//! The worker contract's environment, in one place: what a worker inherits from the launcher,
//! what is dropped, and what is set, for every worker and per worker. README's "The worker
//! contract" table is this module; its unit tests check it row by row.
//!
//! [`environment`] is pure: the launcher's environment (captured once at start), the
//! [`Contract`] (fixed for the launcher's life), the binds (read from `socket::Listeners`, which
//! owns them: they are not copied here) and one worker's [`WorkerVars`] in, the `envp` for
//! execve out. The variables that hold the worker's own pid (`LISTEN_PID`, `WATCHDOG_PID`)
//! cannot be known before fork: [`pid_vars`] names them and `spawn` writes them in the child.

use std::ffi::{CString, OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::time::Duration;

use crate::command::Identity;
use crate::socket::BindSpec;

/// Removed from what workers inherit: variables addressed to the launcher itself (LISTEN_*,
/// NOTIFY_SOCKET, WATCHDOG_*), Node's cluster markers (a node worker that sees them believes it
/// is a cluster worker), and the variables set anew for each worker. `EINHORN_FD_*` too.
pub const DROPPED: &[&str] = &[
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
    "NODE_UNIQUE_ID",
    "NODE_CHANNEL_FD",
    "NODE_CHANNEL_SERIALIZATION_MODE",
    "PORT",
    "REUSE_LAUNCH_SLOT",
    "NODE_APP_INSTANCE",
    "REUSE_LAUNCH_GENERATION",
    "REUSE_LAUNCH_PID",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "SERVER_STARTER_PORT",
    "SERVER_STARTER_GENERATION",
    // The launcher's own control socket: a worker that runs a launcher of its own must not take it.
    "REUSE_LAUNCH_CONTROL",
    "REUSE_LAUNCH_NOFILE",
];
const DROPPED_PREFIX: &str = "EINHORN_FD_";

/// What the environment of every worker depends on, fixed for the launcher's life.
pub struct Contract {
    /// Workers receive listening fds 3.. (every mode but `self`).
    pub sockets: bool,
    pub launcher_pid: u32,
    /// `--user`: USER, LOGNAME and HOME are that user's.
    pub identity: Option<Identity>,
    /// `--watchdog`: WATCHDOG_USEC.
    pub watchdog: Option<Duration>,
}

/// What differs from one worker to the next.
pub struct WorkerVars<'a> {
    pub slot: usize,
    pub gen: u64,
    /// With `--ready notify` or `--watchdog`: this worker's own notify socket.
    pub notify_socket: Option<&'a str>,
}

/// The environment of one worker, without the pid variables. `binds`: each `--bind` with its
/// bound address, in order (the public ones in every mode; `Listeners::binds`).
pub fn environment(
    inherited: &[(OsString, OsString)],
    c: &Contract,
    binds: &[BindSpec],
    w: &WorkerVars,
) -> Vec<CString> {
    let replaced_by_identity = |k: &OsStr| c.identity.is_some() && ["USER", "LOGNAME", "HOME"].iter().any(|n| k == *n);
    let mut env: Vec<CString> = inherited
        .iter()
        .filter(|(k, _)| representable(k) && !is_dropped(k) && !replaced_by_identity(k))
        .map(|(k, v)| entry(k, v))
        .collect();
    env.push(entry("PORT", binds[0].addr.port().to_string()));
    env.push(entry("REUSE_LAUNCH_PID", c.launcher_pid.to_string()));
    if c.sockets {
        let names: Vec<&str> = binds.iter().map(|b| b.name.as_str()).collect();
        env.push(entry("LISTEN_FDS", binds.len().to_string()));
        env.push(entry("LISTEN_FDNAMES", names.join(":")));
        // The same sockets in the forms other launchers' libraries read.
        let starter: Vec<String> = binds.iter().enumerate().map(|(i, b)| format!("{}={}", b.addr, 3 + i)).collect();
        env.push(entry("SERVER_STARTER_PORT", starter.join(";")));
        env.push(entry("EINHORN_FD_COUNT", binds.len().to_string()));
        for i in 0..binds.len() {
            env.push(entry(format!("EINHORN_FD_{i}"), (3 + i).to_string()));
        }
    }
    if let Some(id) = &c.identity {
        env.push(entry("USER", &id.name));
        env.push(entry("LOGNAME", &id.name));
        env.push(entry("HOME", &id.home));
    }
    if let Some(wd) = c.watchdog {
        env.push(entry("WATCHDOG_USEC", wd.as_micros().to_string()));
    }
    env.push(entry("REUSE_LAUNCH_SLOT", w.slot.to_string()));
    // PM2's name for the same number ("run the cron job on instance 0").
    env.push(entry("NODE_APP_INSTANCE", w.slot.to_string()));
    env.push(entry("REUSE_LAUNCH_GENERATION", w.gen.to_string()));
    env.push(entry("SERVER_STARTER_GENERATION", w.gen.to_string()));
    if let Some(sock) = w.notify_socket {
        env.push(entry("NOTIFY_SOCKET", sock));
    }
    env
}

/// The variables the child sets to its own pid after fork.
pub fn pid_vars(c: &Contract) -> Vec<&'static str> {
    let mut vars = Vec::with_capacity(2);
    if c.sockets {
        vars.push("LISTEN_PID");
    }
    if c.watchdog.is_some() {
        vars.push("WATCHDOG_PID");
    }
    vars
}

fn is_dropped(key: &OsStr) -> bool {
    DROPPED.iter().any(|d| key == OsStr::new(d)) || key.as_bytes().starts_with(DROPPED_PREFIX.as_bytes())
}

/// A name an environment can hold: not empty, no NUL, no `=` (but as its first byte, which
/// `std::env::vars_os` can return).
fn representable(key: &OsStr) -> bool {
    let k = key.as_bytes();
    !k.is_empty() && !k.contains(&0) && !k[1..].contains(&b'=')
}

/// `KEY=VALUE` for execve, byte for byte (names and values need not be UTF-8); a value with a
/// NUL byte, which no environment can hold, is emptied.
fn entry(key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> CString {
    let mut v = key.as_ref().as_bytes().to_vec();
    v.push(b'=');
    let name = v.clone();
    v.extend_from_slice(value.as_ref().as_bytes());
    CString::new(v).unwrap_or_else(|_| CString::new(name).expect("names with a NUL are filtered out"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::Credentials;
    use std::collections::BTreeMap;

    fn contract() -> Contract {
        Contract { sockets: true, launcher_pid: 4242, identity: None, watchdog: None }
    }

    fn launcher_env() -> Vec<(OsString, OsString)> {
        [
            ("PATH", "/usr/bin"),
            ("HOME", "/root"),
            ("USER", "root"),
            ("LISTEN_FDS", "1"),
            ("LISTEN_PID", "1"),
            ("LISTEN_FDNAMES", "x"),
            ("NOTIFY_SOCKET", "/run/systemd/notify"),
            ("NODE_UNIQUE_ID", "1"),
            ("NODE_CHANNEL_FD", "4"),
            ("NODE_CHANNEL_SERIALIZATION_MODE", "json"),
            ("PORT", "1"),
            ("REUSE_LAUNCH_SLOT", "9"),
            ("NODE_APP_INSTANCE", "9"),
            ("REUSE_LAUNCH_GENERATION", "9"),
            ("REUSE_LAUNCH_PID", "9"),
            ("WATCHDOG_USEC", "1"),
            ("WATCHDOG_PID", "1"),
            ("SERVER_STARTER_PORT", "x"),
            ("SERVER_STARTER_GENERATION", "9"),
            ("EINHORN_FD_COUNT", "9"),
            ("EINHORN_FD_7", "9"),
            ("REUSE_LAUNCH_CONTROL", "/run/reuse-launch/1.sock"),
        ]
        .into_iter()
        .map(|(k, v)| (k.into(), v.into()))
        .collect()
    }

    /// The environment as a map, checking no variable is set twice.
    fn env_of(c: &Contract, w: &WorkerVars) -> BTreeMap<String, String> {
        let mut map = BTreeMap::new();
        let binds = ["http=127.0.0.1:8080".parse().unwrap(), "admin=[::1]:9090".parse().unwrap()];
        for e in environment(&launcher_env(), c, &binds, w) {
            let (k, v) = e.to_str().unwrap().split_once('=').unwrap();
            assert!(map.insert(k.to_string(), v.to_string()).is_none(), "{k} set twice");
        }
        map
    }

    const W: WorkerVars<'static> = WorkerVars { slot: 2, gen: 5, notify_socket: None };

    #[test]
    fn readme_table_row_by_row() {
        let env = env_of(&contract(), &W);
        let row = |k: &str| env.get(k).map(String::as_str);
        assert_eq!(row("LISTEN_FDS"), Some("2"));
        assert_eq!(row("LISTEN_PID"), None, "written by the child itself");
        assert_eq!(pid_vars(&contract()), vec!["LISTEN_PID"]);
        assert_eq!(row("LISTEN_FDNAMES"), Some("http:admin"));
        assert_eq!(row("PORT"), Some("8080"));
        assert_eq!(row("REUSE_LAUNCH_SLOT"), Some("2"));
        assert_eq!(row("NODE_APP_INSTANCE"), Some("2"));
        assert_eq!(row("REUSE_LAUNCH_GENERATION"), Some("5"));
        assert_eq!(row("REUSE_LAUNCH_PID"), Some("4242"));
        assert_eq!(row("NOTIFY_SOCKET"), None);
        assert_eq!(row("WATCHDOG_USEC"), None);
        assert_eq!(row("SERVER_STARTER_PORT"), Some("127.0.0.1:8080=3;[::1]:9090=4"));
        assert_eq!(row("SERVER_STARTER_GENERATION"), Some("5"));
        assert_eq!(row("EINHORN_FD_COUNT"), Some("2"));
        assert_eq!((row("EINHORN_FD_0"), row("EINHORN_FD_1"), row("EINHORN_FD_7")), (Some("3"), Some("4"), None));
        // Dropped: Node's cluster markers; kept: the rest of the launcher's environment.
        for k in ["NODE_UNIQUE_ID", "NODE_CHANNEL_FD", "NODE_CHANNEL_SERIALIZATION_MODE", "REUSE_LAUNCH_CONTROL"] {
            assert_eq!(row(k), None, "{k}");
        }
        assert_eq!((row("PATH"), row("HOME"), row("USER")), (Some("/usr/bin"), Some("/root"), Some("root")));
    }

    #[test]
    fn notify_and_watchdog_rows() {
        let c = Contract { watchdog: Some(Duration::from_millis(1500)), ..contract() };
        let w = WorkerVars { notify_socket: Some("@reuse-launch/1/2/ab"), ..W };
        let env = env_of(&c, &w);
        assert_eq!(env["NOTIFY_SOCKET"], "@reuse-launch/1/2/ab");
        assert_eq!(env["WATCHDOG_USEC"], "1500000");
        assert!(!env.contains_key("WATCHDOG_PID"));
        assert_eq!(pid_vars(&c), vec!["LISTEN_PID", "WATCHDOG_PID"]);
    }

    #[test]
    fn self_mode_sets_no_socket_variables() {
        let c = Contract { sockets: false, ..contract() };
        let env = env_of(&c, &W);
        for k in ["LISTEN_FDS", "LISTEN_FDNAMES", "SERVER_STARTER_PORT", "EINHORN_FD_COUNT", "EINHORN_FD_0"] {
            assert!(!env.contains_key(k), "{k}");
        }
        assert_eq!(env["PORT"], "8080");
        assert_eq!(env["SERVER_STARTER_GENERATION"], "5");
        assert!(pid_vars(&c).is_empty());
    }

    #[test]
    fn user_rows_replace_the_launchers() {
        let identity = Identity {
            creds: Credentials { uid: 65534, gid: 65534, groups: vec![] },
            name: "nobody".into(),
            home: "/nonexistent".into(),
        };
        let env = env_of(&Contract { identity: Some(identity), ..contract() }, &W);
        assert_eq!((env["USER"].as_str(), env["LOGNAME"].as_str()), ("nobody", "nobody"));
        assert_eq!(env["HOME"], "/nonexistent");
    }
}
