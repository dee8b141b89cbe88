//! Steering a SO_REUSEPORT group with classic BPF (which slot's listener gets each new
//! connection). Which slots stalled is `stall`'s business.
//!
//! This module owns the cBPF programs the launcher attaches to a bind's group (built from the
//! set of *serving* slots by [`build`], attached with [`attach`], removed with [`detach`]),
//! plus the accept-queue reading ([`queue_len`]) the stall watch and `--steer least-loaded` use. Which slots serve (starting, stalled and draining slots are left out)
//! is the caller's business: every builder takes only the serving slots.
//!
//! Without a program the kernel hashes every new connection over all sockets of the group, so a
//! slot whose worker is crash-looping, still starting, or gone swallows its share of new
//! connections, which then wait (shared/notes/KERNEL.md: 9/20 timed out with one of two nginx
//! workers stopped). A program's return value is an index into the group in listen() order; the
//! launcher listens in slot order and never closes a member, so index = slot number. An index
//! out of range makes the kernel fall back to its hash over *all* members, so no program here
//! ever returns one. For TCP the program sees the SYN with its data pointer past the TCP header:
//! offset 0 is payload (none in a SYN), so flow bytes are read relative to `SKF_NET_OFF` (the IP
//! header) and the rest comes from the ancillary loads `SKF_AD_RANDOM` and `SKF_AD_CPU`. A load
//! that faults ends the program with 0 (slot 0, serving or not): only IP-header loads are used,
//! and those are always in the linear part of a received SYN.
//!
//! The programs ([`Program`]), in cBPF pseudo-assembly (`M[i]` is scratch memory):
//!
//! **Weighted** (and **Uniform** = every weight 1): slot s with probability w_s / Σw. Weights are
//! divided by their gcd (so equal weights give the plain uniform program) and scaled down when
//! Σw exceeds 2^24 (so the modulo bias of a 32-bit random number stays below 2^-8 of a share).
//! Zero weights drop their slot, unless all are zero (then uniform).
//!
//! ```text
//! ld  [SKF_AD_RANDOM]      ; 32 random bits
//! mod #SUM                 ; SUM = Σw
//! jge #w0, +1              ; A < w0          -> first slot
//! ret #s0
//! jge #w0+w1, +1           ; A < w0+w1       -> second slot ... (only 1-instruction jumps)
//! ret #s1
//! ...
//! ret #s(K-1)
//! ```
//!
//! **SourceIp**: sticky by client source address (IPv4 and IPv6), with rendezvous (highest random
//! weight) hashing: each serving slot s scores `mix(h ^ seed(s))`, where h hashes the source
//! address and seed(s) depends on the slot number only; the best score wins. While the serving
//! set is unchanged one address always lands on one slot; when a slot stops serving only its
//! clients move (spread over all the others), and when it comes back only the clients it would
//! win move back to it. The spread of runs of consecutive addresses is as even as random (tested
//! by chi-square). Cost 15 instructions per serving slot; beyond 256 serving slots (4096
//! instructions) the program falls back to `h mod K` into a `jeq` table, which is still sticky
//! for a fixed set but remaps most clients when K changes. An IPv4 client of a dual-stack `[::]`
//! listener arrives as an IPv4 packet, so it hashes the same as on a `0.0.0.0` listener (tested).
//!
//! ```text
//! ldb [SKF_NET_OFF]        ; version nibble
//! rsh #4
//! jeq #4, 0, +2
//! ld  [SKF_NET_OFF+12]     ; IPv4 source address
//! ja  common
//! jeq #6, 0, common        ; neither (not TCP/IP): hash the version number, a constant
//! ld  [SKF_NET_OFF+8]      ; IPv6 source, four words: ((w0*G + w1)*G + w2)*G + w3
//! mul #G ; tax ; ld [SKF_NET_OFF+12] ; add x ; mul #G ; tax ; ld [SKF_NET_OFF+16] ; add x
//! mul #G ; tax ; ld [SKF_NET_OFF+20] ; add x
//! common:
//! mul #G ; tax ; rsh #16 ; xor x     ; h = fold(A * 0x9E3779B1)
//! st  M[0]                 ; M[0] = h
//! ld  #0 ; st M[1]         ; M[1] = best score so far
//! ld  #s0 ; st M[2]        ; M[2] = its slot
//! ; for each serving slot s:
//! ld  M[0] ; xor #seed(s)    ; score = murmur3's fmix32(h ^ seed(s)) but its last xorshift
//! tax ; rsh #16 ; xor x ; mul #0x85EBCA6B
//! tax ; rsh #13 ; xor x ; mul #0xC2B2AE35
//! ldx M[1]
//! jgt x, 0, +3             ; not better: next slot
//! st  M[1] ; ld #s ; st M[2]
//! ; after the last slot:
//! ld  M[2]
//! ret a
//! ```
//!
//! **Cpu**: the slot chosen by the CPU that processes the SYN (`cpu_to_slot[cpu mod N]`); the
//! caller maps each CPU to the slot whose worker is pinned there, or to a serving fallback. On
//! loopback (no RPS configured) the SYN is processed on the CPU of the connecting thread:
//! measured 50/50 connections for a client pinned to CPU 0, and 50/50 pinned to CPU 1. From a
//! network card it is the CPU that runs the receive softirq of the packet's queue (RSS, RPS),
//! not anything about the client.
//!
//! ```text
//! ld  [SKF_AD_CPU]
//! mod #N                   ; N = cpu_to_slot.len(); never out of the table
//! jeq #0, 0, +1            ; same table as above
//! ret #cpu_to_slot[0]
//! ...
//! ret #cpu_to_slot[N-1]
//! ```
//!
//! A program with a single possible answer is just `ret #s`. Sizes: Weighted/Uniform and Cpu
//! take 2K+1 instructions (K up to 2047 within BPF_MAXINSNS = 4096), SourceIp 15K+30 up to
//! K = 256 and 2K+24 beyond (K up to 2036); [`attach`] refuses a longer program with
//! `InvalidInput`. Every conditional jump offset is at most 13 (they are u8 in cBPF; `ja` takes
//! 32 bits).
//!
//! The program belongs to the group and is replaced atomically by attaching again through any
//! member; cBPF has no maps, so a change of the serving set means building and attaching a new
//! program. When every slot serves with equal weight under the default policy (or none serves),
//! the caller detaches and the kernel's own hash applies. Unprivileged: classic BPF needs no
//! capability. Connections already queued on a slot's socket are not moved: they wait for that
//! slot's next worker (the socket stays open).

use std::io;
use std::os::fd::RawFd;

const SO_ATTACH_REUSEPORT_CBPF: libc::c_int = 51;
const SO_DETACH_REUSEPORT_BPF: libc::c_int = 68;

// Classic BPF opcodes (linux/bpf_common.h, linux/filter.h).
const BPF_LD: u16 = 0x00;
const BPF_LDX: u16 = 0x01;
const BPF_ST: u16 = 0x02;
const BPF_ALU: u16 = 0x04;
const BPF_JMP: u16 = 0x05;
const BPF_RET: u16 = 0x06;
const BPF_MISC: u16 = 0x07;
const BPF_W: u16 = 0x00;
const BPF_B: u16 = 0x10;
const BPF_IMM: u16 = 0x00;
const BPF_ABS: u16 = 0x20;
const BPF_MEM: u16 = 0x60;
const BPF_ADD: u16 = 0x00;
const BPF_MUL: u16 = 0x20;
const BPF_RSH: u16 = 0x70;
const BPF_MOD: u16 = 0x90;
const BPF_XOR: u16 = 0xa0;
const BPF_JA: u16 = 0x00;
const BPF_JEQ: u16 = 0x10;
const BPF_JGT: u16 = 0x20;
const BPF_JGE: u16 = 0x30;
const BPF_K: u16 = 0x00;
const BPF_X: u16 = 0x08;
/// `ret a` (BPF_RVAL source A).
const BPF_A: u16 = 0x10;
const BPF_TAX: u16 = 0x00;

const AD_RANDOM: u32 = (libc::SKF_AD_OFF + libc::SKF_AD_RANDOM) as u32;
const AD_CPU: u32 = (libc::SKF_AD_OFF + libc::SKF_AD_CPU) as u32;
/// Loads at `NET + k` read byte k of the IP header.
const NET: u32 = libc::SKF_NET_OFF as u32;

/// The kernel's limit on a classic BPF program's length (BPF_MAXINSNS).
pub const MAX_INSNS: usize = libc::BPF_MAXINSNS as usize;
/// Largest serving set SourceIp handles with rendezvous hashing (15 instructions per slot).
const RENDEZVOUS_MAX: usize = 256;
/// Weights are scaled down until they sum to at most this (modulo bias of a u32 < 2^-8).
const MAX_WEIGHT_SUM: u64 = 1 << 24;
const GOLDEN: u32 = 0x9E37_79B1;
const FMIX1: u32 = 0x85EB_CA6B;
const FMIX2: u32 = 0xC2B2_AE35;

/// What to steer by. Every slot named must be a serving one (index into the group = slot).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Program<'a> {
    /// Uniformly at random over these slots.
    Uniform(&'a [usize]),
    /// At random, slot s with probability weight_s / Σ weights (`--steer least-loaded`).
    Weighted(&'a [(usize, u32)]),
    /// By client source address, sticky while the set is unchanged (`--steer ip`).
    SourceIp { serving: &'a [usize] },
    /// By the CPU processing the SYN: `cpu_to_slot[cpu % len]` (`--steer cpu`).
    Cpu { cpu_to_slot: &'a [usize] },
}

fn insn(code: u16, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

fn stmt(code: u16, k: u32) -> libc::sock_filter {
    insn(code, 0, 0, k)
}

fn ret(slot: usize) -> libc::sock_filter {
    stmt(BPF_RET | BPF_K, slot as u32)
}

/// Build the program for `p`. Panics when `p` names no slot at all.
pub fn build(p: &Program) -> Vec<libc::sock_filter> {
    match *p {
        Program::Uniform(serving) => weighted(&serving.iter().map(|&s| (s, 1)).collect::<Vec<_>>()),
        Program::Weighted(w) => weighted(w),
        Program::SourceIp { serving } => source_ip(serving),
        Program::Cpu { cpu_to_slot } => cpu(cpu_to_slot),
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

fn weighted(entries: &[(usize, u32)]) -> Vec<libc::sock_filter> {
    assert!(!entries.is_empty(), "a steering program needs at least one slot");
    let mut w: Vec<(usize, u64)> = entries.iter().filter(|e| e.1 > 0).map(|&(s, w)| (s, u64::from(w))).collect();
    if w.is_empty() {
        w = entries.iter().map(|&(s, _)| (s, 1)).collect();
    }
    let sum: u64 = w.iter().map(|e| e.1).sum();
    if sum > MAX_WEIGHT_SUM {
        let d = sum.div_ceil(MAX_WEIGHT_SUM);
        w.iter_mut().for_each(|e| e.1 = (e.1 / d).max(1));
    }
    let g = w.iter().fold(0, |g, e| gcd(g, e.1));
    w.iter_mut().for_each(|e| e.1 /= g);
    let (last, rest) = w.split_last().unwrap();
    if rest.iter().all(|e| e.0 == last.0) {
        return vec![ret(last.0)];
    }
    let sum: u64 = w.iter().map(|e| e.1).sum();
    let mut p = vec![stmt(BPF_LD | BPF_W | BPF_ABS, AD_RANDOM), stmt(BPF_ALU | BPF_MOD | BPF_K, sum as u32)];
    let mut cum = 0;
    for &(slot, weight) in rest {
        cum += weight;
        // A >= cum: skip this slot's ret; below it: take it.
        p.push(insn(BPF_JMP | BPF_JGE | BPF_K, 1, 0, cum as u32));
        p.push(ret(slot));
    }
    p.push(ret(last.0));
    p
}

/// A holds an index in 0..table.len(): return table[A].
fn ret_table(p: &mut Vec<libc::sock_filter>, table: &[usize]) {
    let (last, rest) = table.split_last().unwrap();
    for (i, &slot) in rest.iter().enumerate() {
        // Equal: fall through to the ret; not equal: skip it.
        p.push(insn(BPF_JMP | BPF_JEQ | BPF_K, 0, 1, i as u32));
        p.push(ret(slot));
    }
    p.push(ret(*last));
}

fn cpu(cpu_to_slot: &[usize]) -> Vec<libc::sock_filter> {
    assert!(!cpu_to_slot.is_empty(), "a steering program needs at least one slot");
    if cpu_to_slot.iter().all(|&s| s == cpu_to_slot[0]) {
        return vec![ret(cpu_to_slot[0])];
    }
    let mut p = vec![stmt(BPF_LD | BPF_W | BPF_ABS, AD_CPU), stmt(BPF_ALU | BPF_MOD | BPF_K, cpu_to_slot.len() as u32)];
    ret_table(&mut p, cpu_to_slot);
    p
}

/// murmur3's finalizer: the per-slot seeds of the rendezvous hash (fixed for a slot number, so
/// a client keeps its slot across re-attachments and launcher restarts).
fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(FMIX1);
    h ^= h >> 13;
    h = h.wrapping_mul(FMIX2);
    h ^ (h >> 16)
}

fn seed(slot: usize) -> u32 {
    fmix32((slot as u32).wrapping_add(1).wrapping_mul(GOLDEN))
}

fn source_ip(serving: &[usize]) -> Vec<libc::sock_filter> {
    assert!(!serving.is_empty(), "a steering program needs at least one slot");
    if serving.iter().all(|&s| s == serving[0]) {
        return vec![ret(serving[0])];
    }
    let ld = |off: u32| stmt(BPF_LD | BPF_W | BPF_ABS, NET.wrapping_add(off));
    let mul = |k: u32| stmt(BPF_ALU | BPF_MUL | BPF_K, k);
    let tax = stmt(BPF_MISC | BPF_TAX, 0);
    let add_x = stmt(BPF_ALU | BPF_ADD | BPF_X, 0);
    let xor_x = stmt(BPF_ALU | BPF_XOR | BPF_X, 0);
    let rsh = |k: u32| stmt(BPF_ALU | BPF_RSH | BPF_K, k);
    let st = |m: u32| stmt(BPF_ST, m);
    let ld_mem = |m: u32| stmt(BPF_LD | BPF_W | BPF_MEM, m);
    let ld_imm = |k: u32| stmt(BPF_LD | BPF_W | BPF_IMM, k);

    let v6 = [ld(8), mul(GOLDEN), tax, ld(12), add_x, mul(GOLDEN), tax, ld(16), add_x, mul(GOLDEN), tax, ld(20), add_x];
    let v6_len = v6.len() as u8;
    let mut p = vec![
        stmt(BPF_LD | BPF_B | BPF_ABS, NET),
        rsh(4),
        insn(BPF_JMP | BPF_JEQ | BPF_K, 0, 2, 4),
        ld(12),
        // To `common`: past the jeq #6 below and the IPv6 block.
        stmt(BPF_JMP | BPF_JA, u32::from(v6_len) + 1),
        insn(BPF_JMP | BPF_JEQ | BPF_K, 0, v6_len, 6),
    ];
    p.extend(v6);
    // common: h = fold(A * G)
    p.extend([mul(GOLDEN), tax, rsh(16), xor_x, st(0)]);
    if serving.len() > RENDEZVOUS_MAX {
        p.push(stmt(BPF_ALU | BPF_MOD | BPF_K, serving.len() as u32));
        ret_table(&mut p, serving);
        return p;
    }
    p.extend([ld_imm(0), st(1), ld_imm(serving[0] as u32), st(2)]);
    for &slot in serving {
        p.extend([ld_mem(0), stmt(BPF_ALU | BPF_XOR | BPF_K, seed(slot))]);
        // murmur3's fmix32 without its last `x ^= x >> 16`, which leaves the top 16 bits, and
        // so the comparison, unchanged.
        p.extend([tax, rsh(16), xor_x, mul(FMIX1), tax, rsh(13), xor_x, mul(FMIX2)]);
        p.extend([stmt(BPF_LDX | BPF_W | BPF_MEM, 1), insn(BPF_JMP | BPF_JGT | BPF_X, 0, 3, 0)]);
        p.extend([st(1), ld_imm(slot as u32), st(2)]);
    }
    p.extend([ld_mem(2), stmt(BPF_RET | BPF_A, 0)]);
    p
}

/// Attach `prog` to the group that `member` belongs to, replacing any program it had.
pub fn attach(member: RawFd, prog: &[libc::sock_filter]) -> io::Result<()> {
    if prog.is_empty() || prog.len() > MAX_INSNS {
        let msg = format!("a steering program of {} instructions (1 to {MAX_INSNS} allowed)", prog.len());
        return Err(io::Error::new(io::ErrorKind::InvalidInput, msg));
    }
    // The kernel copies the instructions and never writes through this pointer.
    let fprog = libc::sock_fprog { len: prog.len() as u16, filter: prog.as_ptr().cast_mut() };
    // SAFETY: setsockopt with a valid sock_fprog whose instructions outlive the call; a bad
    // fd only makes it fail.
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

/// Remove the program of the group that `member` belongs to (Ok when it had none): the kernel
/// hashes over all members again.
pub fn detach(member: RawFd) -> io::Result<()> {
    // The value is ignored, but the kernel wants at least an int's worth of it.
    let unused: libc::c_int = 0;
    let len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: setsockopt with a valid pointer to an int; a bad fd only makes it fail.
    let rc = unsafe {
        libc::setsockopt(member, libc::SOL_SOCKET, SO_DETACH_REUSEPORT_BPF, (&unused as *const libc::c_int).cast(), len)
    };
    let err = io::Error::last_os_error();
    // ENOENT: nothing was attached.
    if rc == 0 || err.raw_os_error() == Some(libc::ENOENT) {
        Ok(())
    } else {
        Err(err)
    }
}

/// A listening socket's accept-queue length (`tcpi_unacked` of TCP_INFO on a listener).
pub use crate::sys::queue_len;

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

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
    use std::net::{IpAddr, SocketAddr, TcpStream};
    use std::os::fd::AsRawFd;

    use socket2::{Domain, Socket, Type};

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
        attach(group[0].as_raw_fd(), &build(&Program::Uniform(&[0, 2]))).unwrap();
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
        detach(group[0].as_raw_fd()).unwrap();
        let more: Vec<TcpStream> = (0..60).map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap()).collect();
        let mut got1 = 0;
        while group[1].accept().is_ok() {
            got1 += 1;
        }
        assert!(got1 > 0);
        drop((clients, more));
    }

    // ---- A classic BPF interpreter, to test the programs exhaustively ----

    /// What the kernel lets a reuseport program see of a SYN: the IP header (at SKF_NET_OFF),
    /// SKF_AD_RANDOM and SKF_AD_CPU.
    struct Skb<'a> {
        net: &'a [u8],
        random: u32,
        cpu: u32,
    }

    fn ops(p: &[libc::sock_filter]) -> Vec<(u16, u8, u8, u32)> {
        p.iter().map(|i| (i.code, i.jt, i.jf, i.k)).collect()
    }

    /// The static part of the kernel's bpf_check_classic that matters here: length, every jump
    /// lands inside the program, scratch indexes, no constant division by zero, ends with ret.
    fn check(p: &[libc::sock_filter]) {
        assert!(!p.is_empty() && p.len() <= MAX_INSNS, "{} instructions", p.len());
        for (pc, i) in p.iter().enumerate() {
            let class = i.code & 0x07;
            if class == BPF_JMP {
                if i.code & 0xf0 == BPF_JA {
                    assert!(pc + 1 + (i.k as usize) < p.len(), "ja out of the program at {pc}");
                } else {
                    assert!(pc + 1 + usize::from(i.jt.max(i.jf)) < p.len(), "jump out of the program at {pc}");
                }
            }
            if i.code == BPF_ST || i.code & !0x07 == BPF_W | BPF_MEM {
                assert!(i.k < 16, "scratch M[{}] at {pc}", i.k);
            }
            if i.code == BPF_ALU | BPF_MOD | BPF_K {
                assert!(i.k != 0, "mod #0 at {pc}");
            }
        }
        assert_eq!(p.last().unwrap().code & 0x07, BPF_RET);
    }

    /// Runs `p` the way the kernel would (fixed-width unsigned arithmetic, u8 jump offsets);
    /// panics where the kernel would refuse it or fault (a fault would mean "slot 0").
    fn run(p: &[libc::sock_filter], skb: &Skb) -> u32 {
        check(p);
        let (mut a, mut x, mut mem) = (0u32, 0u32, [None::<u32>; 16]);
        let mut pc = 0;
        loop {
            let i = p[pc];
            pc += 1;
            let src = if i.code & BPF_X != 0 { x } else { i.k };
            match i.code {
                c if c == BPF_LD | BPF_W | BPF_ABS || c == BPF_LD | BPF_B | BPF_ABS => {
                    a = if i.k == AD_RANDOM {
                        skb.random
                    } else if i.k == AD_CPU {
                        skb.cpu
                    } else {
                        let off = i.k.wrapping_sub(NET) as usize;
                        assert!(off < 60, "load outside the IP header: {:#x}", i.k);
                        let n = if c & BPF_B != 0 { 1 } else { 4 };
                        skb.net[off..off + n].iter().fold(0, |v, &b| v << 8 | u32::from(b))
                    }
                }
                c if c == BPF_LD | BPF_W | BPF_IMM => a = i.k,
                c if c == BPF_LD | BPF_W | BPF_MEM => a = mem[i.k as usize].expect("M[] read before write"),
                c if c == BPF_LDX | BPF_W | BPF_MEM => x = mem[i.k as usize].expect("M[] read before write"),
                BPF_ST => mem[i.k as usize] = Some(a),
                c if c == BPF_MISC | BPF_TAX => x = a,
                c if c & 0x07 == BPF_ALU => {
                    a = match c & 0xf0 {
                        BPF_ADD => a.wrapping_add(src),
                        BPF_MUL => a.wrapping_mul(src),
                        BPF_RSH => a >> src,
                        BPF_MOD => a % src,
                        BPF_XOR => a ^ src,
                        op => panic!("alu op {op:#x}"),
                    }
                }
                c if c == BPF_JMP | BPF_JA => pc += i.k as usize,
                c if c & 0x07 == BPF_JMP => {
                    let taken = match c & 0xf0 {
                        BPF_JEQ => a == src,
                        BPF_JGT => a > src,
                        BPF_JGE => a >= src,
                        op => panic!("jump op {op:#x}"),
                    };
                    pc += usize::from(if taken { i.jt } else { i.jf });
                }
                c if c == BPF_RET | BPF_K => return i.k,
                c if c == BPF_RET | BPF_A => return a,
                c => panic!("opcode {c:#x}"),
            }
        }
    }

    fn v4(src: [u8; 4]) -> Vec<u8> {
        let mut h = vec![0u8; 20];
        h[0] = 0x45;
        h[9] = 6;
        h[12..16].copy_from_slice(&src);
        h[16..20].copy_from_slice(&[127, 0, 0, 1]);
        h
    }

    fn v6(src: [u8; 16]) -> Vec<u8> {
        let mut h = vec![0u8; 40];
        h[0] = 0x60;
        h[6] = 6;
        h[8..24].copy_from_slice(&src);
        h[39] = 1;
        h
    }

    fn pick(p: &[libc::sock_filter], net: &[u8]) -> usize {
        run(p, &Skb { net, random: 0x1234_5678, cpu: 0 }) as usize
    }

    /// Exhaustive over residues: every value of SKF_AD_RANDOM mod SUM, each once (three times).
    fn random_counts(p: &[libc::sock_filter], span: u32) -> HashMap<usize, u32> {
        let mut counts = HashMap::new();
        for r in (0..3 * span).chain(u32::MAX - 3 * span + 1..=u32::MAX) {
            *counts.entry(run(p, &Skb { net: &[], random: r, cpu: 0 }) as usize).or_insert(0) += 1;
        }
        counts
    }

    #[test]
    fn weighted_program_gives_each_slot_exactly_its_weight() {
        let p = build(&Program::Weighted(&[(0, 1), (1, 9)]));
        assert_eq!(p[1].k, 10);
        assert_eq!(random_counts(&p, 10), HashMap::from([(0, 6), (1, 54)]));
        let p = build(&Program::Weighted(&[(3, 5), (1, 1), (7, 10), (2, 0)]));
        assert_eq!(random_counts(&p, 16), HashMap::from([(3, 30), (1, 6), (7, 60)]));
        // Equal weights are the uniform program; weights are divided by their gcd.
        let equal = build(&Program::Weighted(&[(0, 4), (2, 4), (5, 4)]));
        assert_eq!(ops(&equal), ops(&build(&Program::Uniform(&[0, 2, 5]))));
        assert_eq!(random_counts(&equal, 3), HashMap::from([(0, 6), (2, 6), (5, 6)]));
        assert_eq!(ops(&build(&Program::Weighted(&[(0, 20), (1, 60)])))[1].3, 4);
        // All zero: uniform. One slot: a bare ret.
        assert_eq!(ops(&build(&Program::Weighted(&[(1, 0), (4, 0)]))), ops(&build(&Program::Uniform(&[1, 4]))));
        assert_eq!(ops(&build(&Program::Weighted(&[(6, 3)]))), vec![(BPF_RET | BPF_K, 0, 0, 6)]);
        assert_eq!(ops(&build(&Program::Uniform(&[2]))), vec![(BPF_RET | BPF_K, 0, 0, 2)]);
        // Huge weights are scaled, keeping their ratio.
        let p = build(&Program::Weighted(&[(0, u32::MAX), (1, u32::MAX / 3)]));
        let sum = p[1].k;
        assert!(u64::from(sum) <= MAX_WEIGHT_SUM + 2, "{sum}");
        // jge #w0 ; ret #0 ; ret #1: slot 0 takes residues below w0.
        let w0 = p[2].k;
        assert!((f64::from(w0) / f64::from(sum - w0) - 3.0).abs() < 1e-5, "{w0} of {sum}");
        assert_eq!(run(&p, &Skb { net: &[], random: w0 - 1, cpu: 0 }), 0);
        assert_eq!(run(&p, &Skb { net: &[], random: w0, cpu: 0 }), 1);
        assert_eq!(run(&p, &Skb { net: &[], random: sum + w0 - 1, cpu: 0 }), 0);
    }

    #[test]
    fn uniform_program_is_exact_and_fits_up_to_2047_slots() {
        let serving: Vec<usize> = (0..512).step_by(2).collect();
        let p = build(&Program::Uniform(&serving));
        assert_eq!(p.len(), 2 * serving.len() + 1);
        let c = random_counts(&p, serving.len() as u32);
        assert_eq!(c.len(), serving.len());
        assert!(c.iter().all(|(s, &n)| s % 2 == 0 && n == 6), "{c:?}");
        let all: Vec<usize> = (0..2047).collect();
        assert_eq!(build(&Program::Uniform(&all)).len(), MAX_INSNS - 1);
        check(&build(&Program::Uniform(&all)));
    }

    #[test]
    fn cpu_program_maps_every_cpu_through_the_table() {
        let table = [1, 0, 2, 2];
        let p = build(&Program::Cpu { cpu_to_slot: &table });
        for cpu in 0..64 {
            assert_eq!(run(&p, &Skb { net: &[], random: cpu * 7, cpu }), table[cpu as usize % 4] as u32, "cpu {cpu}");
        }
        assert_eq!(ops(&build(&Program::Cpu { cpu_to_slot: &[3, 3] })), vec![(BPF_RET | BPF_K, 0, 0, 3)]);
    }

    /// Slot per address for `serving`, over `addrs` (IP headers).
    fn sticky_map(serving: &[usize], addrs: &[Vec<u8>]) -> Vec<usize> {
        let p = build(&Program::SourceIp { serving });
        addrs
            .iter()
            .map(|net| {
                let s = pick(&p, net);
                // The random number and the CPU play no part.
                assert_eq!(run(&p, &Skb { net, random: 99, cpu: 1 }) as usize, s);
                assert!(serving.contains(&s), "{s} not in {serving:?}");
                s
            })
            .collect()
    }

    fn shares(map: &[usize]) -> HashMap<usize, usize> {
        let mut c = HashMap::new();
        map.iter().for_each(|&s| *c.entry(s).or_insert(0) += 1);
        c
    }

    /// Pearson's chi-square of `counts` against an even spread of `n` over `k` slots.
    fn chi2(counts: &HashMap<usize, usize>, k: usize, n: usize) -> f64 {
        let e = n as f64 / k as f64;
        let missing = (k - counts.len()) as f64 * e;
        counts.values().map(|&c| (c as f64 - e).powi(2) / e).sum::<f64>() + missing
    }

    /// Rendezvous hashing over `addrs`: even spread; excluding a slot moves only its clients,
    /// spread over all the others; adding a slot takes only clients to the new slot.
    fn check_rendezvous(addrs: &[Vec<u8>]) {
        let n = addrs.len();
        let all: Vec<usize> = (0..8).collect();
        let before = sticky_map(&all, addrs);
        let c = shares(&before);
        assert!(all.iter().all(|s| c.get(s).is_some_and(|&k| k * 8 > n * 85 / 100 && k * 8 < n * 115 / 100)), "{c:?}");
        assert!(chi2(&c, 8, n) < 24.3, "spread worse than random (p < 0.001): {c:?}");
        let without3: Vec<usize> = all.iter().copied().filter(|&s| s != 3).collect();
        let after = sticky_map(&without3, addrs);
        let mut moved = Vec::new();
        for (i, (&b, &a)) in before.iter().zip(&after).enumerate() {
            if b == 3 {
                moved.push(a);
            } else {
                assert_eq!(a, b, "address #{i} moved from serving slot {b} to {a}");
            }
        }
        let m = shares(&moved);
        let k = moved.len();
        assert!(without3.iter().all(|s| m.get(s).is_some_and(|&x| x * 7 > k * 70 / 100)), "{m:?}");
        // Slot 8 starts serving: only clients going to it move.
        let with8: Vec<usize> = (0..9).collect();
        let grown = sticky_map(&with8, addrs);
        let gained = before.iter().zip(&grown).filter(|(b, g)| b != g).inspect(|(_, &g)| assert_eq!(g, 8)).count();
        assert!(gained * 9 > n * 85 / 100 && gained * 9 < n * 115 / 100, "{gained} of {n}");
    }

    #[test]
    fn source_ip_ipv4_is_sticky_even_and_minimally_disrupted() {
        // Consecutive addresses (a /18) and scattered ones.
        let mut addrs: Vec<Vec<u8>> = (0..16384u32).map(|i| v4((0x0A00_0000 + i).to_be_bytes())).collect();
        addrs.extend((0..16384u32).map(|i| v4(fmix32(i).to_be_bytes())));
        check_rendezvous(&addrs);
    }

    #[test]
    fn source_ip_ipv6_is_sticky_even_and_minimally_disrupted() {
        let mut addrs = Vec::new();
        for i in 0..16384u32 {
            // One /64 with consecutive interface ids, and scattered /64s.
            let mut a = [0u8; 16];
            a[..8].copy_from_slice(&0x2001_0db8_0000_0001u64.to_be_bytes());
            a[12..].copy_from_slice(&i.to_be_bytes());
            addrs.push(v6(a));
            a[4..8].copy_from_slice(&fmix32(i).to_be_bytes());
            a[12..].copy_from_slice(&fmix32(!i).to_be_bytes());
            addrs.push(v6(a));
        }
        check_rendezvous(&addrs);
    }

    #[test]
    fn source_ip_spreads_a_run_of_loopback_addresses_like_random() {
        // What the real-group test connects from, and more: 127.0.0.2 ..= 127.0.0.251.
        let addrs: Vec<Vec<u8>> = (2..=251).map(|i| v4([127, 0, 0, i])).collect();
        // chi-square critical values at p = 0.001 for 1, 3, 7 degrees of freedom.
        for (k, limit) in [(2, 10.8), (4, 16.3), (8, 24.3)] {
            let serving: Vec<usize> = (0..k).collect();
            let c = shares(&sticky_map(&serving, &addrs));
            assert!(chi2(&c, k, addrs.len()) < limit, "{k} slots: {c:?}");
        }
    }

    #[test]
    fn source_ip_beyond_256_slots_hashes_mod_k_and_fits() {
        let serving: Vec<usize> = (0..1000).filter(|s| s % 3 != 0).collect();
        assert!(serving.len() > RENDEZVOUS_MAX);
        let p = build(&Program::SourceIp { serving: &serving });
        assert!(p.len() <= MAX_INSNS);
        let addrs: Vec<Vec<u8>> = (0..20000u32).map(|i| v4(fmix32(i).to_be_bytes())).collect();
        let c = shares(&sticky_map(&serving, &addrs));
        assert!(c.len() > serving.len() * 9 / 10, "{} slots used", c.len());
        // The largest rendezvous program fits too.
        let p = build(&Program::SourceIp { serving: &serving[..RENDEZVOUS_MAX] });
        assert!(p.len() <= MAX_INSNS, "{}", p.len());
        assert_eq!(p.len(), 15 * RENDEZVOUS_MAX + 30);
    }

    #[test]
    fn source_ip_of_a_non_ip_header_still_picks_a_serving_slot() {
        let p = build(&Program::SourceIp { serving: &[2, 5] });
        let mut odd = v4([1, 2, 3, 4]);
        odd[0] = 0x50;
        assert!([2, 5].contains(&pick(&p, &odd)));
    }

    // ---- Real reuseport groups ----

    fn group(ip: IpAddr, n: usize) -> (Vec<Socket>, SocketAddr) {
        group_v6only(ip, n, true)
    }

    fn group_v6only(ip: IpAddr, n: usize, v6only: bool) -> (Vec<Socket>, SocketAddr) {
        let mut addr = SocketAddr::new(ip, 0);
        let mut group = Vec::new();
        for _ in 0..n {
            let s = Socket::new(Domain::for_address(addr), Type::STREAM, None).unwrap();
            s.set_reuse_port(true).unwrap();
            if ip.is_ipv6() {
                s.set_only_v6(v6only).unwrap();
            }
            s.bind(&addr.into()).unwrap();
            s.listen(1024).unwrap();
            addr = s.local_addr().unwrap().as_socket().unwrap();
            s.set_nonblocking(true).unwrap();
            group.push(s);
        }
        (group, addr)
    }

    fn connect_from(src: IpAddr, dst: SocketAddr) -> Socket {
        let c = Socket::new(Domain::for_address(dst), Type::STREAM, None).unwrap();
        c.bind(&SocketAddr::new(src, 0).into()).unwrap_or_else(|e| panic!("bind {src}: {e}"));
        c.connect(&dst.into()).unwrap_or_else(|e| panic!("connect {src} -> {dst}: {e}"));
        c
    }

    /// Accept `n` connections from the group: (member index, peer address) each.
    fn drain(group: &[Socket], n: usize) -> Vec<(usize, SocketAddr)> {
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while got.len() < n && Instant::now() < deadline {
            for (i, s) in group.iter().enumerate() {
                while let Ok((_, peer)) = s.accept() {
                    got.push((i, peer.as_socket().unwrap()));
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(got.len(), n, "accepted {} of {n}", got.len());
        got
    }

    #[test]
    fn weighted_split_on_a_real_group() {
        let (g, addr) = group(IpAddr::from([127, 0, 0, 1]), 2);
        attach(g[0].as_raw_fd(), &build(&Program::Weighted(&[(0, 1), (1, 9)]))).unwrap();
        let mut counts = [0; 2];
        for _ in 0..8 {
            let clients: Vec<Socket> = (0..50).map(|_| connect_from(addr.ip(), addr)).collect();
            drain(&g, 50).iter().for_each(|&(i, _)| counts[i] += 1);
            drop(clients);
        }
        eprintln!("weights 1:9 over 400 connections: {counts:?}");
        // Expected 40 (sd 6): uniform would give 200, reversed weights 360.
        assert!((12..=80).contains(&counts[0]), "{counts:?}");
    }

    /// Which member each source address's `per_source` connections went to; each must have
    /// gone to exactly one, and the one the interpreter predicts from `header(source)`.
    fn sticky_round(
        g: &[Socket],
        dst: SocketAddr,
        sources: &[IpAddr],
        serving: &[usize],
        header: impl Fn(IpAddr) -> Vec<u8>,
    ) -> HashMap<IpAddr, usize> {
        let p = build(&Program::SourceIp { serving });
        attach(g[0].as_raw_fd(), &p).unwrap();
        let per_source = 10;
        let mut seen: HashMap<IpAddr, Vec<usize>> = HashMap::new();
        for &src in sources {
            let clients: Vec<Socket> = (0..per_source).map(|_| connect_from(src, dst)).collect();
            for (i, peer) in drain(g, per_source) {
                seen.entry(peer.ip().to_canonical()).or_default().push(i);
            }
            drop(clients);
        }
        let mut placed = HashMap::new();
        for &src in sources {
            let members = &seen[&src];
            assert_eq!(members.len(), per_source, "{src}: {members:?}");
            assert!(members.iter().all(|&m| m == members[0]), "{src} spread over {members:?}");
            assert_eq!(members[0], pick(&p, &header(src)), "{src}: kernel and interpreter disagree");
            placed.insert(src, members[0]);
        }
        placed
    }

    #[test]
    fn source_ip_is_sticky_on_a_real_ipv4_group() {
        let (g, addr) = group(IpAddr::from([127, 0, 0, 1]), 4);
        let sources: Vec<IpAddr> = (2..=21).map(|i| IpAddr::from([127, 0, 0, i])).collect();
        let header = |ip: IpAddr| match ip {
            IpAddr::V4(a) => v4(a.octets()),
            IpAddr::V6(_) => unreachable!(),
        };
        let before = sticky_round(&g, addr, &sources, &[0, 1, 2, 3], header);
        let c = shares(&before.values().copied().collect::<Vec<_>>());
        eprintln!("20 sources over 4 members: {c:?}");
        assert!(c.len() >= 2, "{c:?}");
        // Exclude the busiest member: only its sources move.
        let gone = *c.iter().max_by_key(|&(s, n)| (n, s)).unwrap().0;
        let serving: Vec<usize> = (0..4).filter(|&s| s != gone).collect();
        let after = sticky_round(&g, addr, &sources, &serving, header);
        for src in &sources {
            if before[src] == gone {
                assert_ne!(after[src], gone);
            } else {
                assert_eq!(after[src], before[src], "{src} moved");
            }
        }
        let moved: Vec<usize> = sources.iter().filter(|s| before[s] == gone).map(|s| after[s]).collect();
        eprintln!("excluding member {gone} moved {} sources to {moved:?}, the others stayed", moved.len());
    }

    /// IPv6 addresses of this host (/proc/net/if_inet6), except link-local ones.
    fn local_ipv6() -> Vec<std::net::Ipv6Addr> {
        let table = std::fs::read_to_string("/proc/net/if_inet6").unwrap_or_default();
        table
            .lines()
            .filter_map(|l| u128::from_str_radix(l.split_whitespace().next()?, 16).ok())
            .map(std::net::Ipv6Addr::from)
            .filter(|a| a.segments()[0] & 0xffc0 != 0xfe80)
            .collect()
    }

    #[test]
    fn source_ip_is_sticky_on_a_real_ipv6_group() {
        let mine = local_ipv6();
        assert!(
            mine.contains(&std::net::Ipv6Addr::LOCALHOST),
            "::1 is not configured (/proc/net/if_inet6 lists {mine:?}): this test needs IPv6 on lo"
        );
        let (g, addr) = group(IpAddr::from(std::net::Ipv6Addr::LOCALHOST), 3);
        // ::1 always; the host's other non-link-local addresses also reach ::1 through lo.
        let sources: Vec<IpAddr> = mine.iter().map(|&a| IpAddr::V6(a)).collect();
        let header = |ip: IpAddr| match ip {
            IpAddr::V6(a) => v6(a.octets()),
            IpAddr::V4(_) => unreachable!(),
        };
        let placed = sticky_round(&g, addr, &sources, &[0, 1, 2], header);
        eprintln!("IPv6 sources and their member: {placed:?}");
    }

    #[test]
    fn source_ip_on_a_real_dual_stack_group_hashes_ipv4_clients_as_ipv4() {
        let (g, addr) = group_v6only(IpAddr::from(std::net::Ipv6Addr::UNSPECIFIED), 3, false);
        let header = |ip: IpAddr| match ip {
            IpAddr::V4(a) => v4(a.octets()),
            IpAddr::V6(a) => v6(a.octets()),
        };
        let v4_dst = SocketAddr::from(([127, 0, 0, 1], addr.port()));
        let sources: Vec<IpAddr> = (2..=9).map(|i| IpAddr::from([127, 0, 0, i])).collect();
        let placed = sticky_round(&g, v4_dst, &sources, &[0, 1, 2], header);
        eprintln!("IPv4 clients of a [::] group: {placed:?}");
        let v6_dst = SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, addr.port()));
        sticky_round(&g, v6_dst, &[IpAddr::from(std::net::Ipv6Addr::LOCALHOST)], &[0, 1, 2], header);
    }

    /// Pin the calling thread to one CPU.
    fn pin_to(cpu: usize) {
        // SAFETY: cpu_set_t is plain data that CPU_SET writes within; sched_setaffinity only
        // reads it. (nix's sched feature is not enabled in this crate.)
        let rc = unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
        };
        assert_eq!(rc, 0, "sched_setaffinity({cpu}): {}", io::Error::last_os_error());
    }

    /// The CPU this thread last ran on (/proc/thread-self/stat field 39).
    fn last_cpu() -> usize {
        let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
        stat.rsplit_once(')').unwrap().1.split_whitespace().nth(36).unwrap().parse().unwrap()
    }

    #[test]
    fn cpu_program_on_a_real_group_follows_the_connecting_cpu() {
        let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        assert!(cpus >= 2, "this test needs two CPUs, the affinity mask allows {cpus}");
        let (g, addr) = group(IpAddr::from([127, 0, 0, 1]), 2);
        // Crossed on purpose: CPU 0 -> member 1, CPU 1 -> member 0.
        attach(g[0].as_raw_fd(), &build(&Program::Cpu { cpu_to_slot: &[1, 0] })).unwrap();
        let g = &g;
        let results = std::thread::scope(|s| {
            s.spawn(move || {
                [0usize, 1]
                    .map(|cpu| {
                        pin_to(cpu);
                        let mut on = [0; 2];
                        let mut ran_elsewhere = 0;
                        for _ in 0..50 {
                            let c = connect_from(addr.ip(), addr);
                            ran_elsewhere += usize::from(last_cpu() != cpu);
                            let (i, _) = drain(g, 1)[0];
                            on[i] += 1;
                            drop(c);
                        }
                        (cpu, on, ran_elsewhere)
                    })
                    .to_vec()
            })
            .join()
            .unwrap()
        });
        eprintln!("(cpu, connections per member, samples on another cpu): {results:?}");
        for (cpu, on, ran_elsewhere) in results {
            assert_eq!(ran_elsewhere, 0);
            let want = [1, 0][cpu];
            assert!(on[want] >= 45, "pinned to CPU {cpu}: {on:?}, wanted member {want}");
        }
    }

    #[test]
    fn the_kernel_accepts_the_largest_programs() {
        let (g, _) = group(IpAddr::from([127, 0, 0, 1]), 1);
        let fd = g[0].as_raw_fd();
        let serving: Vec<usize> = (0..RENDEZVOUS_MAX).collect();
        let weights: Vec<(usize, u32)> = (0..2047).map(|s| (s, 1 + s as u32 % 1000)).collect();
        let table: Vec<usize> = (0..2047).map(|c| c % 7).collect();
        let big: Vec<usize> = (0..2047).collect();
        assert_eq!(build(&Program::SourceIp { serving: &big[..2036] }).len(), MAX_INSNS);
        for p in [
            Program::SourceIp { serving: &serving },
            Program::SourceIp { serving: &big[..2036] },
            Program::Weighted(&weights),
            Program::Uniform(&big),
            Program::Cpu { cpu_to_slot: &table },
        ] {
            let prog = build(&p);
            check(&prog);
            attach(fd, &prog).unwrap_or_else(|e| panic!("{} instructions: {e}", prog.len()));
        }
        let too_big: Vec<usize> = (0..2048).collect();
        let e = attach(fd, &build(&Program::Uniform(&too_big))).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        detach(fd).unwrap();
        detach(fd).unwrap();
    }
}
