//! Steering a SO_REUSEPORT group with classic BPF (which slot's listener gets each new
//! connection). Which slots stalled is `stall`'s business.
//!
//! This module owns the cBPF programs the launcher attaches to a bind's group (built from the
//! set of *serving* slots by [`build`], attached with [`attach`], removed with [`detach`]);
//! the accept-queue reading the stall watch and `--steer least-loaded` use is
//! `sys::queue_len`. Which slots serve (starting, stalled and draining slots are left out)
//! is the caller's business: every builder takes only the serving slots.
//!
//! Files: `bpf` the cBPF instruction set, `programs` the builders below, `kernel` attaching
//! and detaching (the only `unsafe` here).
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

mod bpf;
mod kernel;
mod programs;
#[cfg(test)]
mod tests;

pub use kernel::{attach, detach};

/// The kernel's limit on a classic BPF program's length (BPF_MAXINSNS).
pub const MAX_INSNS: usize = libc::BPF_MAXINSNS as usize;

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

/// Build the program for `p`. Panics when `p` names no slot at all.
pub fn build(p: &Program) -> Vec<libc::sock_filter> {
    match *p {
        Program::Uniform(serving) => programs::weighted(&serving.iter().map(|&s| (s, 1)).collect::<Vec<_>>()),
        Program::Weighted(w) => programs::weighted(w),
        Program::SourceIp { serving } => programs::source_ip(serving),
        Program::Cpu { cpu_to_slot } => programs::cpu(cpu_to_slot),
    }
}
