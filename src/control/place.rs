//! Where the control socket is put: binding it at its path without a moment of wrong
//! permissions, the private default directory, and the sockets of dead launchers swept from it.

use std::io::{self, ErrorKind};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

/// Bind a socket at `path`, 0600, in a directory checked (default) or created (`--control`)
/// 0700; a stale socket there is replaced, a live one is not. Returns it with the device and
/// inode of its file.
pub fn bind(path: &Path, explicit: bool) -> io::Result<(UnixListener, (u64, u64))> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| io::Error::other("not a file name"))?;
    if explicit {
        if !dir.exists() {
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
        }
    } else {
        private_dir(dir)?;
        sweep_stale(dir);
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(io::Error::other("the path exists and is not a socket"));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(io::Error::other("another launcher answers on it (stop it or pick another --control)"));
        }
        // A socket nobody listens on: a dead launcher's. The rename below replaces it.
    }
    // Bind under a temporary name, restrict it, then move it into place: no moment where the
    // socket is reachable with other permissions, and a stale socket is replaced atomically.
    let tmp = dir.join(format!(".{}.{}.tmp", name.to_string_lossy(), std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp)?;
    let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| std::fs::rename(&tmp, path))
        .and_then(|()| std::fs::symlink_metadata(path));
    match placed {
        Ok(meta) => Ok((listener, (meta.dev(), meta.ino()))),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// Make sure `dir` is a directory of ours that nobody else can enter (0700), creating it if
/// needed. A symlink, or a directory someone else owns (`/tmp/reuse-launch-<uid>` made by
/// another user first), is refused.
fn private_dir(dir: &Path) -> io::Result<()> {
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let meta = std::fs::symlink_metadata(dir)?;
    if !meta.file_type().is_dir() {
        return Err(io::Error::other(format!("{} is not a directory", dir.display())));
    }
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me {
        return Err(io::Error::other(format!("{} belongs to uid {}, not to us (uid {me})", dir.display(), meta.uid())));
    }
    if meta.mode() & 0o777 != 0o700 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// Remove the sockets of launchers that are gone from our default directory (a SIGKILLed
/// launcher cannot remove its own): `<pid>.sock` files whose pid is not running and on which
/// nobody listens (a launcher in another pid namespace may share the directory: its pid means
/// nothing here, but it answers).
fn sweep_stale(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(super::pid_of_socket_name) else { continue };
        let is_socket = entry.file_type().is_ok_and(|t| t.is_socket());
        if is_socket && !super::alive(pid) && UnixStream::connect(entry.path()).is_err() {
            log::debug!("removing {}: launcher {pid} is gone", entry.path().display());
            let _ = std::fs::remove_file(entry.path());
        }
    }
}
