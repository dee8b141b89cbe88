//! Running a function in a new process that shares the launcher's memory until it execs:
//! `clone(CLONE_VM | CLONE_VFORK)` on a stack of the calling thread's own, as `posix_spawn`
//! does (see `spawn`, the one user, for the rules such a child must keep), and the
//! async-signal-safe helpers that child uses.
//!
//! Why not fork: at 1,024 workers a fork of the launcher copied its page tables and then
//! took copy-on-write faults in the launcher for every page it wrote, 3-6 ms a worker on this
//! VM; with `CLONE_VM` nothing is copied and the caller resumes as soon as the child has exec'd.

use std::io;

/// The child's stack (its frames are a few syscall wrappers deep).
const CHILD_STACK: usize = 256 * 1024;

/// Run `entry(arg)` in a new process sharing this memory, on this thread's child stack, with
/// every signal blocked (the child sets its own mask); returns the child's pid once it has
/// exec'd or exited. `share_files`: the child shares this process's fd table too
/// (`CLONE_FILES`) until it takes its own.
///
/// # Safety
/// `entry` must only make async-signal-safe calls, write no memory but what `arg` names for
/// it, never return without `_exit` or `execve`, and never wait for this process; `arg` must
/// stay valid until this returns. With `share_files`, `entry` must not open, close or change
/// any fd before it has a table of its own (close_range with CLOSE_RANGE_UNSHARE, unshare).
pub unsafe fn run(
    entry: extern "C" fn(*mut libc::c_void) -> libc::c_int,
    arg: *mut libc::c_void,
    share_files: bool,
) -> io::Result<libc::pid_t> {
    // One stack, made once for every spawn of this thread (a new one cost its page faults each time).
    thread_local! {
        static STACK: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let top = STACK.with_borrow_mut(|stack| {
        if stack.is_empty() {
            stack.resize(CHILD_STACK, 0);
        }
        // The stack grows down from its end, which must be 16-byte aligned.
        (stack.as_mut_ptr() as usize + CHILD_STACK) & !15
    });
    // Every signal is blocked while the child shares our memory (it unblocks them after
    // setting default dispositions), so none of the launcher's handlers runs in it.
    use nix::sys::signal::{pthread_sigmask, SigSet, SigmaskHow};
    let mut old = SigSet::empty();
    pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::all()), Some(&mut old)).map_err(io::Error::from)?;
    // SAFETY: clone with CLONE_VM | CLONE_VFORK runs `entry` on STACK in a new process that
    // shares this memory; this thread is suspended until the child execs or exits, so `arg`,
    // the stack (this thread's, used by nothing else meanwhile) and what `arg` points to stay
    // valid and unchanged meanwhile (the caller's contract covers what `entry` does, with the
    // fd table shared too under `share_files`).
    let pid = unsafe {
        let files = if share_files { libc::CLONE_FILES } else { 0 };
        libc::clone(entry, top as *mut libc::c_void, libc::CLONE_VM | libc::CLONE_VFORK | files | libc::SIGCHLD, arg)
    };
    let clone_err = io::Error::last_os_error();
    let _ = pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&old), None);
    if pid < 0 {
        return Err(clone_err);
    }
    Ok(pid)
}

/// `n` in decimal at the start of `buf` (at least 10 bytes): the number of digits. No allocation.
pub fn write_decimal(buf: &mut [u8], mut n: u32) -> usize {
    let mut rev = [0u8; 10];
    let mut len = 0;
    loop {
        rev[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for i in 0..len {
        buf[i] = rev[len - 1 - i];
    }
    len
}

#[cfg(test)]
mod tests {
    #[test]
    fn decimal_digits_without_allocation() {
        let mut buf = [0u8; 12];
        let n = super::write_decimal(&mut buf, 4294967295);
        assert_eq!(&buf[..n], b"4294967295");
        let n = super::write_decimal(&mut buf, 0);
        assert_eq!(&buf[..n], b"0");
        let n = super::write_decimal(&mut buf, 407);
        assert_eq!(&buf[..n], b"407");
    }
}
