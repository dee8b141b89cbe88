//! The pure parts of answering a bind: the worker's `sockaddr` bytes (untrusted), the target
//! a bind gets, and the /proc fdinfo and fd link formats.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};

use super::Target;

/// The address in the bytes a worker passed to bind(): AF_INET (16 bytes or more) or AF_INET6
/// (24 or more, as the kernel requires); None for anything else.
pub fn parse_sockaddr(b: &[u8]) -> Option<SocketAddr> {
    if b.len() < 2 {
        return None;
    }
    let family = i32::from(u16::from_ne_bytes([b[0], b[1]]));
    let port = || u16::from_be_bytes([b[2], b[3]]);
    match family {
        libc::AF_INET if b.len() >= 16 => Some(SocketAddr::new(Ipv4Addr::new(b[4], b[5], b[6], b[7]).into(), port())),
        libc::AF_INET6 if b.len() >= 24 => {
            let ip: [u8; 16] = b[8..24].try_into().ok()?;
            let scope = b.get(24..28).map_or(0, |s| u32::from_ne_bytes([s[0], s[1], s[2], s[3]]));
            Some(SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::from(ip), port(), 0, scope)))
        }
        _ => None,
    }
}

/// Which target a bind of `want` gets: the same port, then the same address, else the same
/// family (an IPv4-mapped address counts as IPv4), else the first bind of that port. None when
/// the port is 0 or no target has it.
pub fn choose(targets: &[Target], want: &SocketAddr) -> Option<usize> {
    if want.port() == 0 {
        return None;
    }
    let plain = |ip: IpAddr| match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    let same_port: Vec<usize> = (0..targets.len()).filter(|i| targets[*i].addr.port() == want.port()).collect();
    let ip = plain(want.ip());
    let exact = same_port.iter().find(|i| plain(targets[**i].addr.ip()) == ip);
    let family = same_port.iter().find(|i| plain(targets[**i].addr.ip()).is_ipv4() == ip.is_ipv4());
    exact.or(family).or(same_port.first()).copied()
}

/// The `flags:` field (octal) of a /proc/PID/fdinfo/FD text; it shows O_CLOEXEC for an fd
/// marked close-on-exec.
pub fn fdinfo_flags(text: &str) -> Option<u32> {
    text.lines().find_map(|l| l.strip_prefix("flags:")).and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
}

/// `socket:[12345]` -> 12345.
pub fn socket_link_inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::OwnedFd;
    use std::sync::Arc;

    fn t(addr: &str, fd: u64) -> Target {
        let sock = Arc::new(OwnedFd::from(std::fs::File::open("/dev/null").unwrap()));
        Target { addr: addr.parse().unwrap(), sock, ino: fd + 100 }
    }

    fn v4(ip: [u8; 4], port: u16) -> Vec<u8> {
        let mut b = vec![0u8; 16];
        b[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        b[2..4].copy_from_slice(&port.to_be_bytes());
        b[4..8].copy_from_slice(&ip);
        b
    }

    fn v6(ip: Ipv6Addr, port: u16, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; 28];
        b[..2].copy_from_slice(&(libc::AF_INET6 as u16).to_ne_bytes());
        b[2..4].copy_from_slice(&port.to_be_bytes());
        b[8..24].copy_from_slice(&ip.octets());
        b.truncate(len);
        b
    }

    #[test]
    fn sockaddrs_of_each_family_and_length() {
        assert_eq!(parse_sockaddr(&v4([127, 0, 0, 1], 8080)), Some("127.0.0.1:8080".parse().unwrap()));
        assert_eq!(parse_sockaddr(&v4([0, 0, 0, 0], 80)[..15]), None, "short AF_INET");
        assert_eq!(parse_sockaddr(&v6(Ipv6Addr::UNSPECIFIED, 8080, 28)), Some("[::]:8080".parse().unwrap()));
        assert_eq!(
            parse_sockaddr(&v6(Ipv6Addr::LOCALHOST, 9, 24)),
            Some("[::1]:9".parse().unwrap()),
            "RFC 2133 length"
        );
        assert_eq!(parse_sockaddr(&v6(Ipv6Addr::LOCALHOST, 9, 23)), None, "short AF_INET6");
        let mut unix = vec![0u8; 20];
        unix[..2].copy_from_slice(&(libc::AF_UNIX as u16).to_ne_bytes());
        assert_eq!(parse_sockaddr(&unix), None);
        assert_eq!(parse_sockaddr(&[]), None);
        assert_eq!(parse_sockaddr(&[2]), None);
    }

    #[test]
    fn a_bind_gets_the_target_of_its_port_preferring_its_address_then_family() {
        let targets = [t("127.0.0.1:8080", 3), t("[::1]:8080", 4), t("127.0.0.1:9090", 5)];
        let pick = |a: &str| choose(&targets, &a.parse().unwrap());
        assert_eq!(pick("0.0.0.0:8080"), Some(0));
        assert_eq!(pick("[::]:8080"), Some(1), "IPv6 wildcard: the IPv6 bind of that port");
        assert_eq!(pick("[::1]:8080"), Some(1));
        assert_eq!(pick("[::ffff:127.0.0.1]:8080"), Some(0), "a v4-mapped address is IPv4");
        assert_eq!(pick("10.1.2.3:9090"), Some(2), "any address of the port");
        assert_eq!(pick("[::]:9090"), Some(2), "another family: the first bind of the port");
        assert_eq!(pick("127.0.0.1:7070"), None, "a port the launcher does not bind");
        assert_eq!(pick("127.0.0.1:0"), None, "port 0 is the worker's own");
    }

    #[test]
    fn fdinfo_flags_and_socket_links() {
        let text = "pos:\t0\nflags:\t02004002\nmnt_id:\t9\nino:\t1234\n";
        let flags = fdinfo_flags(text).unwrap();
        assert!(flags & libc::O_CLOEXEC as u32 != 0 && flags & libc::O_NONBLOCK as u32 != 0);
        assert_eq!(fdinfo_flags("flags:\t02\n"), Some(2));
        assert_eq!(fdinfo_flags("pos: 0\n"), None);
        assert_eq!(socket_link_inode("socket:[4242]"), Some(4242));
        assert_eq!(socket_link_inode("pipe:[4242]"), None);
        assert_eq!(socket_link_inode("socket:[x]"), None);
    }
}
