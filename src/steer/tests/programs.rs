//! Every steering program through the interpreter: exact weights, uniform spread, the CPU
//! table, and the source-IP rendezvous hash (sticky, even, minimally disrupted).

use super::interp::*;
use super::*;

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

pub(super) fn shares(map: &[usize]) -> HashMap<usize, usize> {
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
