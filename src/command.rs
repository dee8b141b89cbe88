//! The command a worker runs and who it runs as: resolving the program as a shell would (exit
//! codes 127/126 for not found/not executable), expanding the per-worker placeholders in its
//! arguments, and resolving `--user`/`--group`. Everything here happens in the parent, before
//! any fork.

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::RawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::unistd::{access, AccessFlags};

use crate::error::Error;

/// A command resolved to an executable file, with argv ready for execve.
pub struct Program {
    pub display: String,
    path: CString,
    argv: Vec<CString>,
}

impl Program {
    /// The executable's path, for execve.
    pub fn path(&self) -> &CString {
        &self.path
    }

    /// Find `command[0]` as the shell would (a name with '/' is a path, else search PATH) and
    /// check it can be executed.
    pub fn resolve(command: &[OsString]) -> Result<Program, Error> {
        let name = &command[0];
        let display = name.to_string_lossy().into_owned();
        let err = |cause: &str, code| Error::Command { command: display.clone(), cause: cause.into(), code };
        if name.is_empty() {
            return Err(err("empty command", 127));
        }
        let path = if name.as_bytes().contains(&b'/') {
            PathBuf::from(name)
        } else {
            let search = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
            let mut found = None;
            let mut not_executable = None;
            for dir in std::env::split_paths(&search) {
                let candidate = dir.join(name);
                if candidate.is_file() {
                    if access(&candidate, AccessFlags::X_OK).is_ok() {
                        found = Some(candidate);
                        break;
                    }
                    not_executable.get_or_insert(candidate);
                }
            }
            match (found, not_executable) {
                (Some(p), _) => p,
                (None, Some(p)) => p,
                (None, None) => return Err(err("command not found in PATH", 127)),
            }
        };
        check_executable(&path).map_err(|(cause, code)| err(&cause, code))?;
        let cstr = |s: &OsStr| CString::new(s.as_bytes()).map_err(|_| err("argument contains a NUL byte", 126));
        let argv = command.iter().map(|a| cstr(a)).collect::<Result<Vec<_>, _>>()?;
        let path = cstr(path.as_os_str())?;
        Ok(Program { display, path, argv })
    }
}

fn check_executable(path: &Path) -> Result<(), (String, u8)> {
    match std::fs::metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(("no such file".into(), 127)),
        Err(e) => Err((e.to_string(), 126)),
        Ok(m) if m.is_dir() => Err(("is a directory".into(), 126)),
        Ok(_) => access(path, AccessFlags::X_OK).map_err(|_| ("permission denied (not executable)".into(), 126)),
    }
}

/// Values for the placeholders a command's arguments may hold.
pub struct Placeholders<'a> {
    pub fds: &'a [RawFd],
    pub port: u16,
    pub slot: usize,
}

impl Program {
    /// argv for one worker: `{fd}` (first listening fd), `{fds}` (all, comma-separated),
    /// `{port}` (first bind's port) and `{slot}` replaced; anything else is left as written,
    /// byte for byte (an argument need not be UTF-8).
    pub fn argv(&self, p: &Placeholders) -> Vec<CString> {
        if !self.argv.iter().any(|a| a.as_bytes().contains(&b'{')) {
            return self.argv.clone();
        }
        let fds: Vec<String> = (0..p.fds.len()).map(|i| (3 + i).to_string()).collect();
        let values = [
            ("{fds}", fds.join(",")),
            ("{fd}", "3".to_string()),
            ("{port}", p.port.to_string()),
            ("{slot}", p.slot.to_string()),
        ];
        self.argv
            .iter()
            .map(|a| {
                let mut out = Vec::with_capacity(a.as_bytes().len());
                let mut rest = a.as_bytes();
                while let Some((&first, tail)) = rest.split_first() {
                    match values.iter().find(|(name, _)| rest.starts_with(name.as_bytes())) {
                        Some((name, value)) => {
                            out.extend_from_slice(value.as_bytes());
                            rest = &rest[name.len()..];
                        }
                        None => {
                            out.push(first);
                            rest = tail;
                        }
                    }
                }
                CString::new(out).unwrap_or_else(|_| a.clone())
            })
            .collect()
    }
}

/// Who a worker runs as (`--user`/`--group`), resolved in the parent.
#[derive(Clone, Debug)]
pub struct Credentials {
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
    pub groups: Vec<libc::gid_t>,
}

/// The user workers run as, with what a login would set in their environment.
#[derive(Clone, Debug)]
pub struct Identity {
    pub creds: Credentials,
    pub name: String,
    pub home: PathBuf,
}

/// Resolve `--user` (name or uid) and `--group` (name or gid; default the user's primary group).
/// Refuses when the launcher could not switch to them (not root, and not already that user).
pub fn resolve_identity(user: &str, group: Option<&str>) -> Result<Identity, Error> {
    resolve_identity_inner(user, group).map_err(Error::Failed)
}

fn resolve_identity_inner(user: &str, group: Option<&str>) -> Result<Identity, String> {
    use nix::unistd::{Gid, Group, Uid, User};
    let found = match user.parse::<u32>() {
        Ok(uid) => User::from_uid(Uid::from_raw(uid)),
        Err(_) => User::from_name(user),
    };
    let u = found.map_err(|e| format!("cannot look up user '{user}': {e}"))?;
    let u = u.ok_or_else(|| format!("no such user '{user}'"))?;
    let gid = match group {
        None => u.gid,
        Some(g) => {
            let found = match g.parse::<u32>() {
                Ok(gid) => Group::from_gid(Gid::from_raw(gid)),
                Err(_) => Group::from_name(g),
            };
            found
                .map_err(|e| format!("cannot look up group '{g}': {e}"))?
                .ok_or_else(|| format!("no such group '{g}'"))?
                .gid
        }
    };
    let euid = nix::unistd::geteuid();
    if !euid.is_root() && euid != u.uid {
        return Err(format!(
            "cannot run workers as user '{user}': the launcher runs as uid {euid}, and only root can switch users"
        ));
    }
    let cname = CString::new(u.name.clone()).map_err(|_| format!("bad user name '{user}'"))?;
    let groups = if euid.is_root() {
        nix::unistd::getgrouplist(&cname, gid).map_err(|e| format!("cannot list the groups of '{user}': {e}"))?
    } else {
        vec![gid]
    };
    Ok(Identity {
        creds: Credentials {
            uid: u.uid.as_raw(),
            gid: gid.as_raw(),
            groups: groups.into_iter().map(|g| g.as_raw()).collect(),
        },
        name: u.name,
        home: u.dir,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_finds_commands_and_classifies_failures() {
        assert!(Program::resolve(&["sh".into()]).is_ok());
        let e = Program::resolve(&["definitely-not-a-command-xyz".into()]).err().unwrap();
        assert_eq!(e.exit_code(), 127);
        assert!(e.to_string().contains("definitely-not-a-command-xyz"));
        use std::os::unix::fs::PermissionsExt;
        let plain = std::env::temp_dir().join(format!("reuse-launch-plain-{}", std::process::id()));
        std::fs::write(&plain, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Program::resolve(&[plain.clone().into()]).err().unwrap();
        std::fs::remove_file(&plain).unwrap();
        assert_eq!(e.exit_code(), 126);
        assert!(e.to_string().contains("not executable"), "{e}");
        let e = Program::resolve(&["/tmp".into()]).err().unwrap();
        assert_eq!(e.exit_code(), 126);
        let e = Program::resolve(&["./no/such/file".into()]).err().unwrap();
        assert_eq!(e.exit_code(), 127);
    }

    #[test]
    fn placeholders_are_expanded_per_worker() {
        let p =
            Program::resolve(&["sh".into(), "--fd={fd}".into(), "{fds}:{port}:{slot}".into(), "{x}".into()]).unwrap();
        let argv = p.argv(&Placeholders { fds: &[7, 8], port: 8080, slot: 2 });
        let argv: Vec<&str> = argv.iter().map(|a| a.to_str().unwrap()).collect();
        assert_eq!(argv, vec!["sh", "--fd=3", "3,4:8080:2", "{x}"]);
    }

    #[test]
    fn identity_of_root_and_errors() {
        let me = nix::unistd::geteuid();
        let name = nix::unistd::User::from_uid(me).unwrap().unwrap().name;
        let id = resolve_identity(&name, None).unwrap();
        assert_eq!(id.creds.uid, me.as_raw());
        assert!(resolve_identity("no-such-user-xyz", None)
            .unwrap_err()
            .to_string()
            .contains("no such user 'no-such-user-xyz'"));
        assert!(resolve_identity(&name, Some("no-such-group-xyz")).unwrap_err().to_string().contains("no such group"));
    }
}
