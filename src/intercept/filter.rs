//! The seccomp filter itself and the two steps a worker's child takes with it between fork and
//! exec (see `spawn`): install it, and send its notification fd to the launcher.
//!
//! The program traps exactly two system calls of the native architecture, `bind` and `listen`,
//! with `SECCOMP_RET_USER_NOTIF`, and allows everything else. It looks at nothing but the
//! architecture and the syscall number, so the kernel (5.11+) puts every other syscall on its
//! per-filter allow cache: they never run the program at all. A call made through another ABI
//! (ia32 or x32 on x86_64) is allowed untouched: such a worker binds for itself, as without the
//! filter.
//!
//! Everything the child uses is prepared in the parent ([`ChildFilter`]); the child functions
//! only make system calls on memory they are given, and never allocate.

use std::os::fd::RawFd;

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: Option<u32> = Some(0xC000_003E); // AUDIT_ARCH_X86_64
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: Option<u32> = Some(0xC000_00B7); // AUDIT_ARCH_AARCH64
#[cfg(target_arch = "riscv64")]
const AUDIT_ARCH: Option<u32> = Some(0xC000_00F3); // AUDIT_ARCH_RISCV64
/// Elsewhere the filter's architecture number is not known here: no interception.
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64", target_arch = "riscv64")))]
const AUDIT_ARCH: Option<u32> = None;

/// `struct seccomp_data`: `nr` at 0, `arch` at 4.
const NR_OFFSET: u32 = 0;
const ARCH_OFFSET: u32 = 4;

const fn stmt(code: u32, k: u32) -> libc::sock_filter {
    libc::sock_filter { code: code as u16, jt: 0, jf: 0, k }
}

const fn jeq(k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter { code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16, jt, jf, k }
}

/// The program (indices in the comments are the jump targets).
static PROGRAM: [libc::sock_filter; 8] = [
    /* 0 */ stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, ARCH_OFFSET),
    /* 1 */
    jeq(
        match AUDIT_ARCH {
            Some(a) => a,
            None => 0,
        },
        1,
        0,
    ), // native: 3, else 2
    /* 2 */ stmt(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW),
    /* 3 */ stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, NR_OFFSET),
    /* 4 */ jeq(libc::SYS_bind as u32, 2, 0), // 7
    /* 5 */ jeq(libc::SYS_listen as u32, 1, 0), // 7
    /* 6 */ stmt(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW),
    /* 7 */ stmt(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_USER_NOTIF),
];

/// What the child needs to install the filter, built in the parent.
#[derive(Clone, Copy)]
pub struct ChildFilter {
    prog: libc::sock_fprog,
    /// Set `no_new_privs` first: the launcher lacks CAP_SYS_ADMIN, and the kernel lets an
    /// unprivileged process install a filter only with it.
    pub no_new_privs: bool,
}

impl ChildFilter {
    /// The filter of this architecture; Err (the cause, in words) where none is known.
    pub fn new(no_new_privs: bool) -> Result<ChildFilter, String> {
        if AUDIT_ARCH.is_none() {
            return Err(format!("no seccomp architecture number is known for {}", std::env::consts::ARCH));
        }
        let prog = libc::sock_fprog { len: PROGRAM.len() as u16, filter: PROGRAM.as_ptr().cast_mut() };
        Ok(ChildFilter { prog, no_new_privs })
    }
}

/// linux/capability.h
const CAP_SYS_ADMIN: u32 = 21;

/// Whether this process may install a filter without `no_new_privs`: CAP_SYS_ADMIN in its
/// effective set (bit 21 of `CapEff` in /proc/self/status).
pub fn has_sys_admin() -> bool {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else { return false };
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_SYS_ADMIN) != 0)
}

/// In a freshly forked child: install the filter on this process (and so on everything it
/// starts). Returns the notification fd (CLOEXEC), or -1 with errno set.
///
/// # Safety
/// Only between fork and exec in a child of the launcher, with `f` prepared by the parent.
pub unsafe fn install(f: &ChildFilter) -> RawFd {
    // SAFETY: plain system calls on memory the parent prepared; nothing is allocated.
    unsafe {
        if f.no_new_privs && libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return -1;
        }
        // SPEC_ALLOW (4.17): this filter is not a sandbox, so it must not switch on the
        // speculative store bypass mitigation that the kernel otherwise forces on a task with a
        // filter (spec_store_bypass_disable=seccomp, the default on many kernels): that costs
        // every worker speed. WAIT_KILLABLE_RECV (5.19): once the launcher has read a call, a
        // signal to the caller no longer interrupts it (no bind restarted half done); without
        // it on older kernels.
        let base = libc::SECCOMP_FILTER_FLAG_NEW_LISTENER | libc::SECCOMP_FILTER_FLAG_SPEC_ALLOW;
        let flags = base | libc::SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV;
        let mut fd = libc::syscall(libc::SYS_seccomp, libc::SECCOMP_SET_MODE_FILTER, flags, &f.prog);
        if fd < 0 && *libc::__errno_location() == libc::EINVAL {
            fd = libc::syscall(libc::SYS_seccomp, libc::SECCOMP_SET_MODE_FILTER, base, &f.prog);
        }
        fd as RawFd
    }
}

/// In the child: send `fd` to the launcher over the unix socket `chan` (one byte, `fd` as
/// SCM_RIGHTS). Returns false with errno set on failure.
///
/// # Safety
/// Only between fork and exec; `chan` and `fd` are open fds of this process.
pub unsafe fn send_fd(chan: RawFd, fd: RawFd) -> bool {
    #[repr(C, align(8))]
    struct Control([u8; 64]);
    // SAFETY: the message, its one-byte payload and its control buffer live on this stack
    // frame for the duration of sendmsg; the CMSG macros only compute offsets into them.
    unsafe {
        let mut byte = [b'N'];
        let mut iov = libc::iovec { iov_base: byte.as_mut_ptr().cast(), iov_len: 1 };
        let mut control = Control([0; 64]);
        let space = libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) as usize;
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.0.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as _;
        std::ptr::copy_nonoverlapping((&fd as *const RawFd).cast::<u8>(), libc::CMSG_DATA(cmsg), 4);
        libc::sendmsg(chan, &msg, libc::MSG_NOSIGNAL) == 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64", target_arch = "riscv64"))]
    fn traps_bind_and_listen_of_the_native_arch_only() {
        // A tiny interpreter of the three kinds of instruction the program uses.
        let run = |arch: u32, nr: u32| -> u32 {
            let mut pc = 0;
            let mut a = 0;
            loop {
                let i = PROGRAM[pc];
                match i.code as u32 {
                    c if c == libc::BPF_LD | libc::BPF_W | libc::BPF_ABS => {
                        a = if i.k == ARCH_OFFSET { arch } else { nr };
                        pc += 1;
                    }
                    c if c == libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K => {
                        pc += 1 + if a == i.k { i.jt as usize } else { i.jf as usize };
                    }
                    c if c == libc::BPF_RET | libc::BPF_K => return i.k,
                    c => panic!("unexpected instruction {c:#x}"),
                }
            }
        };
        let notif = libc::SECCOMP_RET_USER_NOTIF;
        let allow = libc::SECCOMP_RET_ALLOW;
        let arch = AUDIT_ARCH.unwrap();
        assert_eq!(run(arch, libc::SYS_bind as u32), notif);
        assert_eq!(run(arch, libc::SYS_listen as u32), notif);
        for nr in [libc::SYS_accept4, libc::SYS_connect, libc::SYS_read, libc::SYS_socket, libc::SYS_getppid] {
            assert_eq!(run(arch, nr as u32), allow, "syscall {nr}");
        }
        assert_eq!(run(0x4000_0003, libc::SYS_bind as u32), allow, "another ABI binds for itself");
    }
}
