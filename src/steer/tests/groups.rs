//! The programs attached to real SO_REUSEPORT groups of listeners on loopback: exclusion,
//! weights, source-IP stickiness (IPv4, IPv6, dual stack), CPU, the largest programs.

use super::interp::*;
use super::programs::shares;
use super::*;

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
