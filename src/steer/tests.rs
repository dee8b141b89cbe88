//! The steering programs run through a cBPF interpreter, and on real SO_REUSEPORT groups.

use super::bpf::*;
use super::programs::*;
use super::*;
use std::io;
use std::time::{Duration, Instant};

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
