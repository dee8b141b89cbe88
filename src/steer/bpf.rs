//! The classic BPF instruction set, as far as the steering programs use it: opcodes
//! (linux/bpf_common.h, linux/filter.h), the ancillary and IP-header load offsets, and helpers
//! that make one instruction.

pub(super) const BPF_LD: u16 = 0x00;
pub(super) const BPF_LDX: u16 = 0x01;
pub(super) const BPF_ST: u16 = 0x02;
pub(super) const BPF_ALU: u16 = 0x04;
pub(super) const BPF_JMP: u16 = 0x05;
pub(super) const BPF_RET: u16 = 0x06;
pub(super) const BPF_MISC: u16 = 0x07;
pub(super) const BPF_W: u16 = 0x00;
pub(super) const BPF_B: u16 = 0x10;
pub(super) const BPF_IMM: u16 = 0x00;
pub(super) const BPF_ABS: u16 = 0x20;
pub(super) const BPF_MEM: u16 = 0x60;
pub(super) const BPF_ADD: u16 = 0x00;
pub(super) const BPF_MUL: u16 = 0x20;
pub(super) const BPF_RSH: u16 = 0x70;
pub(super) const BPF_MOD: u16 = 0x90;
pub(super) const BPF_XOR: u16 = 0xa0;
pub(super) const BPF_JA: u16 = 0x00;
pub(super) const BPF_JEQ: u16 = 0x10;
pub(super) const BPF_JGT: u16 = 0x20;
pub(super) const BPF_JGE: u16 = 0x30;
pub(super) const BPF_K: u16 = 0x00;
pub(super) const BPF_X: u16 = 0x08;
/// `ret a` (BPF_RVAL source A).
pub(super) const BPF_A: u16 = 0x10;
pub(super) const BPF_TAX: u16 = 0x00;

pub(super) const AD_RANDOM: u32 = (libc::SKF_AD_OFF + libc::SKF_AD_RANDOM) as u32;
pub(super) const AD_CPU: u32 = (libc::SKF_AD_OFF + libc::SKF_AD_CPU) as u32;
/// Loads at `NET + k` read byte k of the IP header.
pub(super) const NET: u32 = libc::SKF_NET_OFF as u32;

pub(super) fn insn(code: u16, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

pub(super) fn stmt(code: u16, k: u32) -> libc::sock_filter {
    insn(code, 0, 0, k)
}

pub(super) fn ret(slot: usize) -> libc::sock_filter {
    stmt(BPF_RET | BPF_K, slot as u32)
}

/// A holds an index in 0..table.len(): return table[A].
pub(super) fn ret_table(p: &mut Vec<libc::sock_filter>, table: &[usize]) {
    let (last, rest) = table.split_last().unwrap();
    for (i, &slot) in rest.iter().enumerate() {
        // Equal: fall through to the ret; not equal: skip it.
        p.push(insn(BPF_JMP | BPF_JEQ | BPF_K, 0, 1, i as u32));
        p.push(ret(slot));
    }
    p.push(ret(*last));
}
