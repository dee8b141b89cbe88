//! Property tests (proptest) for every parser of outside input, and for the roll machine driven
//! by random event sequences against a model of the workers it drives (issue 11, part 5).
//!
//! Parsers: no panic on any input, and round trips or invariants where they exist. `BindSpec`
//! resolves host names (getaddrinfo), so its any-input test only feeds it what resolves without
//! a DNS query (IP literals, `localhost`, or text rejected before resolution): a test must not
//! send traffic off the machine.

use std::ffi::OsString;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::time::Duration;

use proptest::prelude::*;

use crate::cli::{parse_duration, parse_signal, parse_size};
use crate::command::{Placeholders, Program};
use crate::contract::{environment, Contract, WorkerVars, DROPPED};
use crate::notify;
use crate::socket::BindSpec;

const YEAR: Duration = Duration::from_secs(86400 * 365);

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    // ---------- durations ----------

    #[test]
    fn duration_any_text_never_panics(s in any::<String>()) {
        if let Ok(d) = parse_duration(&s) {
            prop_assert!(d <= YEAR, "{s:?} -> {d:?}");
        }
    }

    #[test]
    fn duration_shaped_text_never_panics(
        num in "[0-9]{0,22}(\\.[0-9]{0,12})?", unit in "(ms|s|m|h|d|us|S|MS|)", pad in " {0,2}"
    ) {
        let s = format!("{pad}{num}{unit}{pad}");
        if let Ok(d) = parse_duration(&s) {
            prop_assert!(d <= YEAR, "{s:?} -> {d:?}");
        }
    }

    #[test]
    fn duration_round_trips(ms in 0u64..=YEAR.as_millis() as u64) {
        prop_assert_eq!(parse_duration(&format!("{ms}ms")), Ok(Duration::from_millis(ms)));
        let secs = ms / 1000;
        prop_assert_eq!(parse_duration(&format!("{secs}s")), Ok(Duration::from_secs(secs)));
        prop_assert_eq!(parse_duration(&format!("{secs}")), Ok(Duration::from_secs(secs)));
        let mins = secs / 60;
        prop_assert_eq!(parse_duration(&format!("{mins}m")), Ok(Duration::from_secs(mins * 60)));
        let hours = mins / 60;
        prop_assert_eq!(parse_duration(&format!("{hours}h")), Ok(Duration::from_secs(hours * 3600)));
    }

    #[test]
    fn duration_decimal_seconds_round_trip(whole in 0u64..100_000, millis in 0u64..1000) {
        let text = format!("{whole}.{millis:03}s");
        prop_assert_eq!(parse_duration(&text), Ok(Duration::from_millis(whole * 1000 + millis)), "{}", text);
    }

    // ---------- sizes ----------

    #[test]
    fn size_any_text_never_panics(s in any::<String>()) {
        if let Ok(b) = parse_size(&s) {
            prop_assert!(b >= 1 << 20, "{s:?} -> {b}");
        }
    }

    #[test]
    fn size_round_trips(n in 1u64..(1 << 23), unit in 0usize..4, suffix in 0usize..4, lower in any::<bool>()) {
        let (letter, shift) = [("K", 10), ("M", 20), ("G", 30), ("T", 40)][unit];
        let text = format!("{n}{letter}{}", ["", "B", "iB", "IB"][suffix]);
        let text = if lower { text.to_lowercase() } else { text };
        let bytes = n << shift;
        if bytes >= 1 << 20 {
            prop_assert_eq!(parse_size(&text), Ok(bytes), "{}", text);
        } else {
            prop_assert!(parse_size(&text).is_err(), "{text} is under 1 MiB");
        }
    }

    #[test]
    fn size_bare_bytes_round_trip(n in (1u64 << 20)..(1 << 53)) {
        prop_assert_eq!(parse_size(&n.to_string()), Ok(n));
        prop_assert_eq!(parse_size(&format!("{n}B")), Ok(n));
    }

    /// Only the documented forms are taken: a number, then nothing, `B`, or one of K, M, G, T
    /// followed by nothing, `B` or `iB` (any case).
    #[test]
    fn size_unit_is_one_of_the_documented_forms(n in 1u64..4096, unit in "[kKmMgGtTbBiI]{0,4}") {
        let documented = {
            let u = unit.to_ascii_uppercase();
            let letter = u.chars().next().filter(|c| "KMGT".contains(*c));
            match letter {
                Some(_) => matches!(&u[1..], "" | "B" | "IB"),
                None => matches!(u.as_str(), "" | "B"),
            }
        };
        let text = format!("{n}{unit}");
        if parse_size(&text).is_ok() {
            prop_assert!(documented, "{text:?} was accepted");
        }
    }

    // ---------- signals ----------

    #[test]
    fn signal_any_text_never_panics(s in any::<String>()) {
        let _ = parse_signal(&s);
    }

    #[test]
    fn signal_names_and_numbers_round_trip(i in 0usize..nix::sys::signal::Signal::iterator().count(), lower in any::<bool>()) {
        let sig = nix::sys::signal::Signal::iterator().nth(i).unwrap();
        let name = sig.as_str();
        prop_assert_eq!(parse_signal(name), Ok(sig));
        let short = &name[3..];
        prop_assert_eq!(parse_signal(&if lower { short.to_lowercase() } else { short.to_string() }), Ok(sig));
        prop_assert_eq!(parse_signal(&(sig as i32).to_string()), Ok(sig));
    }

    // ---------- bind specs ----------

    #[test]
    fn bind_any_text_never_panics(s in "[0-9a-f:.\\[\\]=%_ -]{0,40}|\\PC{0,20}", index in 0usize..5) {
        prop_assume!(resolves_without_dns(&s));
        if let Ok(spec) = BindSpec::parse(&s, index) {
            prop_assert!(!spec.name.is_empty());
            if !s.contains('=') {
                prop_assert_eq!(spec.name, if index == 0 { "http".to_string() } else { format!("http{index}") });
            }
        }
    }

    #[test]
    fn bind_addresses_round_trip(addr in socket_addr(), name in "[A-Za-z0-9_.-]{1,12}", index in 0usize..5) {
        let spec = BindSpec::parse(&addr.to_string(), index).unwrap();
        prop_assert_eq!(spec.addr, addr);
        let named = BindSpec::parse(&format!("{name}={addr}"), index).unwrap();
        prop_assert_eq!((named.name.as_str(), named.addr), (name.as_str(), addr));
        if let SocketAddr::V4(v4) = addr {
            if v4.ip().is_unspecified() {
                prop_assert_eq!(BindSpec::parse(&format!(":{}", v4.port()), index).unwrap().addr, addr);
            }
        }
    }

    // ---------- sd_notify datagrams ----------

    #[test]
    fn notify_any_datagram_never_panics(data in proptest::collection::vec(any::<u8>(), 0..600)) {
        for (k, v) in notify::parse(&data) {
            prop_assert!(!k.contains('=') && !k.contains('\n') && !v.contains('\n'), "{k:?}={v:?}");
        }
    }

    #[test]
    fn notify_assignments_round_trip(
        fields in proptest::collection::vec(("[A-Z_]{1,16}", "[^\n\r]{0,40}"), 0..8), trailing in any::<bool>()
    ) {
        let mut text = fields.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("\n");
        if trailing {
            text.push('\n');
        }
        prop_assert_eq!(notify::parse(text.as_bytes()), fields);
    }

    // ---------- the worker environment ----------

    #[test]
    fn environment_never_panics_and_passes_inherited_variables_unchanged(
        inherited in proptest::collection::vec((env_bytes(), env_bytes()), 0..12),
        slot in 0usize..64, gen in 1u64..1000, watchdog in any::<bool>(), sockets in any::<bool>(),
    ) {
        let inherited: Vec<(OsString, OsString)> =
            inherited.into_iter().map(|(k, v)| (OsString::from_vec(k), OsString::from_vec(v))).collect();
        let c = Contract {
            sockets,
            launcher_pid: 77,
            identity: None,
            watchdog: watchdog.then_some(Duration::from_secs(3)),
        };
        let w = WorkerVars { slot, gen, notify_socket: Some("@reuse-launch/1/2/3") };
        let binds = ["http=127.0.0.1:8080".parse().unwrap()];
        let env = environment(&inherited, &c, &binds, &w);
        let pairs: Vec<(&[u8], &[u8])> = env.iter().map(|e| split_entry(e.as_bytes())).collect();
        // Every variable at most once; the per-worker ones with their values.
        let mut keys: Vec<&[u8]> = pairs.iter().map(|(k, _)| *k).collect();
        keys.sort();
        let unique = {
            let mut k = keys.clone();
            k.dedup();
            k.len()
        };
        let mut seen = std::collections::HashSet::new();
        let inherited_unique = inherited.iter().all(|(k, _)| seen.insert(k.as_bytes()));
        if inherited_unique {
            prop_assert_eq!(unique, keys.len(), "a variable set twice: {:?}", keys);
        }
        let get = |k: &str| pairs.iter().find(|(key, _)| *key == k.as_bytes()).map(|(_, v)| *v);
        let slot_text = slot.to_string();
        let gen_text = gen.to_string();
        prop_assert_eq!(get("REUSE_LAUNCH_SLOT"), Some(slot_text.as_bytes()));
        prop_assert_eq!(get("REUSE_LAUNCH_GENERATION"), Some(gen_text.as_bytes()));
        prop_assert_eq!(get("PORT"), Some(&b"8080"[..]));
        prop_assert_eq!(get("LISTEN_FDS").is_some(), sockets);
        // What the launcher inherited and does not drop reaches the worker byte for byte (a
        // variable that no environment can hold, with a NUL or '=' in its name, is left out).
        for (k, v) in &inherited {
            let (k, v) = (k.as_bytes(), v.as_bytes());
            let dropped = DROPPED.iter().any(|d| d.as_bytes() == k) || k.starts_with(b"EINHORN_FD_");
            if dropped || k.is_empty() || k.contains(&0) || k.contains(&b'=') || !inherited_unique {
                continue;
            }
            let expected: &[u8] = if v.contains(&0) { b"" } else { v };
            prop_assert!(pairs.contains(&(k, expected)), "{:?}={:?} missing from {:?}", k, v, pairs);
        }
    }

    // ---------- placeholders ----------

    #[test]
    fn argv_placeholders_expand_and_other_arguments_stay(
        args in proptest::collection::vec(arg_bytes(), 0..6), nfds in 1usize..4, port in any::<u16>(), slot in 0usize..100
    ) {
        let mut command = vec![OsString::from("/bin/sh")];
        command.extend(args.iter().map(|a| OsString::from_vec(a.clone())));
        let program = Program::resolve(&command).unwrap();
        let fds: Vec<i32> = (0..nfds as i32).map(|i| 10 + i).collect();
        let argv = program.argv(&Placeholders { fds: &fds, port, slot });
        prop_assert_eq!(argv.len(), command.len());
        prop_assert_eq!(argv[0].as_bytes(), b"/bin/sh");
        let fds_text = (0..nfds).map(|i| (3 + i).to_string()).collect::<Vec<_>>().join(",");
        for (got, given) in argv[1..].iter().zip(&args) {
            let want = replace(&replace(&replace(&replace(given, b"{fds}", fds_text.as_bytes()), b"{fd}", b"3"),
                b"{port}", port.to_string().as_bytes()), b"{slot}", slot.to_string().as_bytes());
            prop_assert_eq!(got.as_bytes(), &want[..], "argument {:?}", given);
        }
    }
}

/// What `BindSpec::parse` can take without asking a DNS server: text it rejects before resolving
/// (no `:`, or no valid port after the last one), IP literals, and `localhost` (/etc/hosts).
fn resolves_without_dns(text: &str) -> bool {
    let addr = match text.split_once('=') {
        Some((_, a)) => a,
        None => text,
    };
    let Some((host, port)) = addr.rsplit_once(':') else { return true };
    if port.parse::<u16>().is_err() || host.is_empty() {
        return true;
    }
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    host.parse::<IpAddr>().is_ok() || host == "localhost"
}

fn socket_addr() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        (any::<u32>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::from((Ipv4Addr::from(ip), port))),
        Just(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 8080))),
        (any::<u128>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::V6(SocketAddrV6::new(
            Ipv6Addr::from(ip),
            port,
            0,
            0
        ))),
    ]
}

/// Environment names and values as bytes: mostly ordinary, sometimes not UTF-8, sometimes a NUL.
fn env_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => "[A-Z_]{1,10}".prop_map(String::into_bytes),
        1 => Just(b"PORT".to_vec()),
        1 => Just(b"EINHORN_FD_3".to_vec()),
        2 => proptest::collection::vec(any::<u8>(), 0..12),
    ]
}

/// Command arguments: no NUL (execve cannot take one), some placeholders, some invalid UTF-8.
fn arg_bytes() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        Just(b"{fd}".to_vec()),
        Just(b"{fds}".to_vec()),
        Just(b"{port}".to_vec()),
        Just(b"{slot}".to_vec()),
        Just(b"{".to_vec()),
        Just(b"}".to_vec()),
        "[a-z=/.-]{1,6}".prop_map(String::into_bytes),
        proptest::collection::vec(1u8..=255, 1..4),
    ];
    proptest::collection::vec(piece, 0..5).prop_map(|p| p.concat())
}

fn split_entry(e: &[u8]) -> (&[u8], &[u8]) {
    // A name may start with '=' only in theory; names here never do after filtering.
    let at = e.iter().skip(1).position(|b| *b == b'=').map(|i| i + 1).unwrap_or(e.len());
    (&e[..at], e.get(at + 1..).unwrap_or(b""))
}

fn replace(text: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    let mut i = 0;
    while i < text.len() {
        if text[i..].starts_with(from) {
            out.extend_from_slice(to);
            i += from.len();
        } else {
            out.push(text[i]);
            i += 1;
        }
    }
    out
}

mod control;
mod regressions;
mod roll_machine;
