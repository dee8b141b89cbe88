//! A classic BPF interpreter, to test the steering programs exhaustively: it runs a program
//! as the kernel would and refuses what the kernel's checker would.

use super::*;

/// What the kernel lets a reuseport program see of a SYN: the IP header (at SKF_NET_OFF),
/// SKF_AD_RANDOM and SKF_AD_CPU.
pub(super) struct Skb<'a> {
    pub(super) net: &'a [u8],
    pub(super) random: u32,
    pub(super) cpu: u32,
}

pub(super) fn ops(p: &[libc::sock_filter]) -> Vec<(u16, u8, u8, u32)> {
    p.iter().map(|i| (i.code, i.jt, i.jf, i.k)).collect()
}

/// The static part of the kernel's bpf_check_classic that matters here: length, every jump
/// lands inside the program, scratch indexes, no constant division by zero, ends with ret.
pub(super) fn check(p: &[libc::sock_filter]) {
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
pub(super) fn run(p: &[libc::sock_filter], skb: &Skb) -> u32 {
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

pub(super) fn v4(src: [u8; 4]) -> Vec<u8> {
    let mut h = vec![0u8; 20];
    h[0] = 0x45;
    h[9] = 6;
    h[12..16].copy_from_slice(&src);
    h[16..20].copy_from_slice(&[127, 0, 0, 1]);
    h
}

pub(super) fn v6(src: [u8; 16]) -> Vec<u8> {
    let mut h = vec![0u8; 40];
    h[0] = 0x60;
    h[6] = 6;
    h[8..24].copy_from_slice(&src);
    h[39] = 1;
    h
}

pub(super) fn pick(p: &[libc::sock_filter], net: &[u8]) -> usize {
    run(p, &Skb { net, random: 0x1234_5678, cpu: 0 }) as usize
}

/// Exhaustive over residues: every value of SKF_AD_RANDOM mod SUM, each once (three times).
pub(super) fn random_counts(p: &[libc::sock_filter], span: u32) -> HashMap<usize, u32> {
    let mut counts = HashMap::new();
    for r in (0..3 * span).chain(u32::MAX - 3 * span + 1..=u32::MAX) {
        *counts.entry(run(p, &Skb { net: &[], random: r, cpu: 0 }) as usize).or_insert(0) += 1;
    }
    counts
}
