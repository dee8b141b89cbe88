//! The builders of the steering programs (see the parent module's doc for each program in
//! pseudo-assembly): weighted and uniform random, by client source address (rendezvous
//! hashing), by CPU.

use super::bpf::*;

/// Largest serving set SourceIp handles with rendezvous hashing (15 instructions per slot).
pub(super) const RENDEZVOUS_MAX: usize = 256;
/// Weights are scaled down until they sum to at most this (modulo bias of a u32 < 2^-8).
pub(super) const MAX_WEIGHT_SUM: u64 = 1 << 24;
pub(super) const GOLDEN: u32 = 0x9E37_79B1;
pub(super) const FMIX1: u32 = 0x85EB_CA6B;
pub(super) const FMIX2: u32 = 0xC2B2_AE35;

pub(super) fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

pub(super) fn weighted(entries: &[(usize, u32)]) -> Vec<libc::sock_filter> {
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

pub(super) fn cpu(cpu_to_slot: &[usize]) -> Vec<libc::sock_filter> {
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
pub(super) fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(FMIX1);
    h ^= h >> 13;
    h = h.wrapping_mul(FMIX2);
    h ^ (h >> 16)
}

pub(super) fn seed(slot: usize) -> u32 {
    fmix32((slot as u32).wrapping_add(1).wrapping_mul(GOLDEN))
}

pub(super) fn source_ip(serving: &[usize]) -> Vec<libc::sock_filter> {
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
