//! Steering a SO_REUSEPORT group away from slots that cannot serve, with classic BPF; and
//! noticing slots that stopped accepting ([`StallWatch`]).
//!
//! Without a program the kernel hashes every new connection over all sockets of the group, so a
//! slot whose worker is crash-looping, still starting, or gone swallows its share of new
//! connections, which then wait (shared/notes/KERNEL.md: 9/20 timed out with one of two nginx
//! workers stopped). The launcher therefore attaches a small program to each bind's group that
//! picks uniformly at random among the slots that have a ready worker:
//!
//! ```text
//! ld  #random        ; SKF_AD_RANDOM: the skb is past the TCP header, so no flow bytes to hash
//! mod #K             ; K = number of serving slots
//! jeq #0 -> ret #s0  ; i-th serving slot's index in the group (= slot number: the launcher
//! jeq #1 -> ret #s1  ;   listens in slot order and never closes a member, so indexes are stable)
//! ...
//! ret #s(K-1)
//! ```
//!
//! For TCP only the SYN is steered; the connection then stays with the chosen listener. The
//! program belongs to the group and is replaced atomically by attaching again through any
//! member. When every slot serves, or none does, the program is removed and the kernel's own
//! hash applies. Unprivileged: classic BPF needs no capability. Connections already queued on a
//! slot's socket are not moved: they wait for that slot's next worker (the socket stays open).

use std::io;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

const SO_ATTACH_REUSEPORT_CBPF: libc::c_int = 51;
const SO_DETACH_REUSEPORT_BPF: libc::c_int = 68;

const BPF_LD: u16 = 0x00;
const BPF_W: u16 = 0x00;
const BPF_ABS: u16 = 0x20;
const BPF_ALU: u16 = 0x04;
const BPF_MOD: u16 = 0x90;
const BPF_K: u16 = 0x00;
const BPF_JMP: u16 = 0x05;
const BPF_JEQ: u16 = 0x10;
const BPF_RET: u16 = 0x06;

fn insn(code: u16, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

/// The program that spreads new connections uniformly over `serving` (group indexes).
pub fn program(serving: &[usize]) -> Vec<libc::sock_filter> {
    assert!(!serving.is_empty());
    let k = serving.len() as u32;
    let mut p = vec![
        insn(BPF_LD | BPF_W | BPF_ABS, 0, 0, (libc::SKF_AD_OFF + libc::SKF_AD_RANDOM) as u32),
        insn(BPF_ALU | BPF_MOD | BPF_K, 0, 0, k),
    ];
    for (i, &slot) in serving.iter().enumerate().take(serving.len() - 1) {
        // Equal: fall through to the ret; not equal: skip it.
        p.push(insn(BPF_JMP | BPF_JEQ | BPF_K, 0, 1, i as u32));
        p.push(insn(BPF_RET | BPF_K, 0, 0, slot as u32));
    }
    p.push(insn(BPF_RET | BPF_K, 0, 0, *serving.last().unwrap() as u32));
    p
}

/// Restrict the group that `member` belongs to to `serving`, or lift any restriction when
/// `serving` is empty or covers all `group_size` members.
pub fn apply(member: RawFd, serving: &[usize], group_size: usize) -> io::Result<()> {
    if serving.is_empty() || serving.len() == group_size {
        // The value is ignored, but the kernel wants at least an int's worth of it.
        let unused: libc::c_int = 0;
        let len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: setsockopt on a socket we own, with a valid pointer to an int.
        let rc = unsafe {
            libc::setsockopt(
                member,
                libc::SOL_SOCKET,
                SO_DETACH_REUSEPORT_BPF,
                (&unused as *const libc::c_int).cast(),
                len,
            )
        };
        let err = io::Error::last_os_error();
        // ENOENT: nothing was attached.
        return if rc == 0 || err.raw_os_error() == Some(libc::ENOENT) { Ok(()) } else { Err(err) };
    }
    let mut prog = program(serving);
    let fprog = libc::sock_fprog { len: prog.len() as u16, filter: prog.as_mut_ptr() };
    // SAFETY: setsockopt on a socket we own with a valid sock_fprog that outlives the call.
    let rc = unsafe {
        libc::setsockopt(
            member,
            libc::SOL_SOCKET,
            SO_ATTACH_REUSEPORT_CBPF,
            (&fprog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A listening socket's accept-queue length (`tcpi_unacked` of TCP_INFO on a listener).
pub fn queue_len(listener: RawFd) -> io::Result<u32> {
    // SAFETY: tcp_info is plain data; getsockopt writes at most `len` bytes into it.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: getsockopt on a socket we own with a valid buffer and length.
    let rc = unsafe {
        libc::getsockopt(
            listener,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(info.tcpi_unacked)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// One slot at one sample: its accept-queue length and the CPU time its worker's processes
/// have used so far (clock ticks), None where it could not be read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sample {
    pub queue: Option<u32>,
    pub cpu: Option<u64>,
}

/// Notices slots whose worker has stopped taking connections (SIGSTOPped, deadlocked, blocked
/// on something slow) from their accept queues, sampled every [`StallWatch::EVERY`].
///
/// A slot is *stuck* at a sample when its queue is not empty and its worker used no CPU since
/// the previous sample. It is stalled once it has been stuck for [`StallWatch::AFTER`] while
/// some other slot's queue is empty: the others keep up and this one does nothing. A worker that
/// is merely busy (a long CPU-bound request, a GC) burns CPU and is never singled out, since it
/// will accept as soon as it is done; and when every queue stays full the machine is simply
/// overloaded. A stalled slot is back as soon as its queue is empty again, i.e. its worker
/// accepted everything waiting. Excluding it from new connections bounds the damage to what was
/// already queued there.
#[derive(Debug, Default)]
pub struct StallWatch {
    /// Per slot: since when it has been stuck at every sample.
    stuck_since: Vec<Option<Instant>>,
    last_cpu: Vec<Option<u64>>,
    stalled: Vec<bool>,
}

impl StallWatch {
    pub const EVERY: Duration = Duration::from_millis(100);
    pub const AFTER: Duration = Duration::from_millis(300);

    pub fn new(slots: usize) -> StallWatch {
        StallWatch { stuck_since: vec![None; slots], last_cpu: vec![None; slots], stalled: vec![false; slots] }
    }

    /// Take one sample per slot. Returns the slots that changed state, with their new state.
    pub fn observe(&mut self, now: Instant, samples: &[Sample]) -> Vec<(usize, bool)> {
        let mut changed = Vec::new();
        let someone_keeps_up = samples.iter().any(|s| s.queue == Some(0));
        for (slot, sample) in samples.iter().enumerate() {
            let busy = matches!(sample.queue, Some(n) if n > 0);
            let working = matches!((self.last_cpu[slot], sample.cpu), (Some(a), Some(b)) if b > a);
            self.last_cpu[slot] = sample.cpu;
            if busy && !working {
                self.stuck_since[slot].get_or_insert(now);
            } else {
                self.stuck_since[slot] = None;
            }
            let stuck_long = self.stuck_since[slot].is_some_and(|t| now.duration_since(t) >= Self::AFTER);
            let stalled = if self.stalled[slot] { busy } else { someone_keeps_up && stuck_long };
            if stalled != self.stalled[slot] {
                self.stalled[slot] = stalled;
                changed.push((slot, stalled));
            }
        }
        changed
    }

    pub fn is_stalled(&self, slot: usize) -> bool {
        self.stalled[slot]
    }
}

/// CPU time (user + system, clock ticks) used so far by the processes `pids`; None when none
/// of them could be read.
pub fn cpu_ticks(pids: &[i32]) -> Option<u64> {
    let per_pid = pids.iter().filter_map(|pid| {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        // After "pid (comm)": state is field 0, utime field 11, stime field 12.
        Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
    });
    per_pid.fold(None, |sum, t| Some(sum.unwrap_or(0) + t))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(queue: u32, cpu: u64) -> Sample {
        Sample { queue: Some(queue), cpu: Some(cpu) }
    }

    #[test]
    fn a_queue_nobody_works_on_while_another_slot_keeps_up_is_a_stall() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut w = StallWatch::new(3);
        assert!(w.observe(ms(0), &[at(3, 50), at(0, 10), at(1, 7)]).is_empty());
        // Slot 2 drained in between: its stuck time starts over.
        assert!(w.observe(ms(200), &[at(5, 50), at(0, 10), at(0, 7)]).is_empty());
        assert_eq!(w.observe(ms(300), &[at(9, 50), at(0, 10), at(2, 7)]), vec![(0, true)]);
        assert!(w.is_stalled(0) && !w.is_stalled(2));
        // Working again but not drained yet: still stalled. Drained: back.
        assert!(w.observe(ms(400), &[at(9, 60), at(0, 10), at(2, 7)]).is_empty());
        assert_eq!(w.observe(ms(500), &[at(0, 70), at(0, 10), at(0, 7)]), vec![(0, false)]);
    }

    #[test]
    fn a_busy_worker_is_not_a_stalled_one() {
        // Slot 0's queue never empties, but its worker burns CPU all along (a CPU-bound
        // event loop that accepts between requests): never singled out.
        let t0 = Instant::now();
        let mut w = StallWatch::new(2);
        for i in 0..50u64 {
            let t = t0 + Duration::from_millis(100 * i);
            assert!(w.observe(t, &[at(7, 100 + 10 * i), at(0, 5)]).is_empty(), "sample {i}");
        }
    }

    #[test]
    fn an_overloaded_machine_singles_out_nobody() {
        let t0 = Instant::now();
        let mut w = StallWatch::new(2);
        w.observe(t0, &[at(4, 1), at(4, 1)]);
        assert!(w.observe(t0 + Duration::from_secs(5), &[at(8, 1), at(7, 1)]).is_empty());
        // Unreadable queues count as neither stuck nor keeping up.
        let unreadable = Sample { queue: None, cpu: None };
        assert!(w.observe(t0 + Duration::from_secs(6), &[at(8, 1), unreadable]).is_empty());
    }

    #[test]
    fn cpu_ticks_of_this_process_grow_with_work() {
        let me = std::process::id() as i32;
        let before = cpu_ticks(&[me]).unwrap();
        let start = Instant::now();
        let mut x = 0u64;
        while start.elapsed() < Duration::from_millis(100) {
            x = x.wrapping_mul(31).wrapping_add(1);
        }
        assert!(x != 1);
        assert!(cpu_ticks(&[me]).unwrap() > before);
        assert_eq!(cpu_ticks(&[i32::MAX]), None);
    }

    #[test]
    fn queue_length_of_a_real_listener() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&l);
        assert_eq!(queue_len(fd).unwrap(), 0);
        let _c: Vec<_> = (0..3).map(|_| std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap()).collect();
        assert_eq!(queue_len(fd).unwrap(), 3);
        l.accept().unwrap();
        assert_eq!(queue_len(fd).unwrap(), 2);
    }
    use std::collections::HashMap;
    use std::net::{SocketAddr, TcpStream};
    use std::os::fd::AsRawFd;

    use socket2::{Domain, Socket, Type};

    #[test]
    fn program_shape() {
        let p = program(&[1, 3]);
        assert_eq!(p.len(), 5);
        assert_eq!(p[1].k, 2);
        assert_eq!((p[3].code, p[3].k), (BPF_RET | BPF_K, 1));
        assert_eq!((p[4].code, p[4].k), (BPF_RET | BPF_K, 3));
        assert_eq!(program(&[2]).len(), 3);
    }

    /// A real group of three listeners: with only #0 and #2 serving, #1 gets nothing.
    #[test]
    fn steers_connections_away_from_excluded_members() {
        let mut port = 0;
        let mut group = Vec::new();
        for _ in 0..3 {
            let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
            s.set_reuse_port(true).unwrap();
            s.bind(&SocketAddr::from(([127, 0, 0, 1], port)).into()).unwrap();
            s.listen(128).unwrap();
            port = s.local_addr().unwrap().as_socket().unwrap().port();
            s.set_nonblocking(true).unwrap();
            group.push(s);
        }
        apply(group[0].as_raw_fd(), &[0, 2], 3).unwrap();
        let clients: Vec<TcpStream> = (0..60).map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap()).collect();
        let mut counts = HashMap::new();
        for (i, s) in group.iter().enumerate() {
            while s.accept().is_ok() {
                *counts.entry(i).or_insert(0) += 1;
            }
        }
        assert_eq!(counts.get(&1), None, "{counts:?}");
        assert_eq!(counts.values().sum::<i32>(), 60, "{counts:?}");
        assert!(counts[&0] > 5 && counts[&2] > 5, "{counts:?}");
        // Lifting the restriction brings #1 back into the hash.
        apply(group[0].as_raw_fd(), &[0, 1, 2], 3).unwrap();
        let more: Vec<TcpStream> = (0..60).map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap()).collect();
        let mut got1 = 0;
        while group[1].accept().is_ok() {
            got1 += 1;
        }
        assert!(got1 > 0);
        drop((clients, more));
    }
}
