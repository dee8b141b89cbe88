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
            addrs: vec!["127.0.0.1:8080".parse().unwrap()],
            names: vec!["http".into()],
            sockets,
            launcher_pid: 77,
            identity: None,
            watchdog: watchdog.then_some(Duration::from_secs(3)),
        };
        let w = WorkerVars { slot, gen, notify_socket: Some("@reuse-launch/1/2/3") };
        let env = environment(&inherited, &c, &w);
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

/// The roll machine against a model of the workers it drives: random sequences of requests,
/// readiness, exits, failed spawns and time, with the invariants of README's "Rolling restart".
mod roll_machine {
    use std::collections::BTreeMap;
    use std::time::{Duration, Instant};

    use proptest::prelude::*;

    use crate::event::WorkerId;
    use crate::roll::{Action, Input, Roll};

    const TIMEOUT: Duration = Duration::from_secs(10);

    #[derive(Clone, Debug)]
    enum Op {
        /// USR2 / HUP.
        Request,
        /// The roll's new worker becomes ready.
        CandidateReady,
        /// The roll's new worker exits before it is ready (a bad release).
        CandidateExits,
        /// Time passes, then a Tick.
        Wait(u64),
        /// Readiness or exit of a worker the machine does not know (a crash respawn's).
        Stray(bool),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => Just(Op::Request),
            6 => Just(Op::CandidateReady),
            1 => Just(Op::CandidateExits),
            2 => (0u64..12_000).prop_map(Op::Wait),
            1 => any::<bool>().prop_map(Op::Stray),
        ]
    }

    #[derive(Debug)]
    struct Worker {
        slot: usize,
        gen: u64,
        ready: bool,
        /// Told to stop (draining); no longer counts as alive for the slot.
        stopping: bool,
        exited: bool,
    }

    /// The supervisor's side, reduced to what the machine's guarantees are about.
    struct Model {
        n: usize,
        roll: Roll,
        now: Instant,
        workers: BTreeMap<WorkerId, Worker>,
        next_id: WorkerId,
        spawn_fails: Vec<bool>,
        /// The roll under way as the model sees it: generation, next slot to retire.
        active: Option<(u64, usize)>,
        pending: bool,
        last_gen: u64,
        rolls_started: Vec<u64>,
        rolls_ended: Vec<u64>,
        expected_starts: usize,
    }

    impl Model {
        fn new(n: usize, spawn_fails: Vec<bool>) -> Model {
            let now = Instant::now();
            let workers = (0..n)
                .map(|s| (s as WorkerId, Worker { slot: s, gen: 1, ready: true, stopping: false, exited: false }));
            Model {
                n,
                roll: Roll::new(n, TIMEOUT),
                now,
                workers: workers.collect(),
                next_id: n as WorkerId,
                spawn_fails,
                active: None,
                pending: false,
                last_gen: 1,
                rolls_started: vec![],
                rolls_ended: vec![],
                expected_starts: 0,
            }
        }

        fn live(&self) -> impl Iterator<Item = (&WorkerId, &Worker)> {
            self.workers.iter().filter(|(_, w)| !w.stopping && !w.exited)
        }

        /// The roll's new worker: alive, not ready, not stopping.
        fn candidate(&self) -> Option<WorkerId> {
            self.live().find(|(_, w)| !w.ready).map(|(id, _)| *id)
        }

        fn step(&mut self, input: Input) -> Result<(), TestCaseError> {
            let actions = self.roll.step(input, self.now);
            self.apply(actions)
        }

        fn apply(&mut self, actions: Vec<Action>) -> Result<(), TestCaseError> {
            for action in actions {
                match action {
                    Action::Spawn { slot, gen } => {
                        prop_assert!(slot < self.n);
                        if slot == 0 {
                            prop_assert_eq!(gen, self.last_gen + 1, "each roll takes the next generation");
                            prop_assert!(self.active.is_none(), "a roll started while another ran");
                            self.last_gen = gen;
                            self.active = Some((gen, 0));
                            self.rolls_started.push(gen);
                        } else {
                            prop_assert_eq!(self.active, Some((gen, slot)), "slots in order, one at a time");
                        }
                        prop_assert!(self.candidate().is_none(), "two new workers at once");
                        let fail = if self.spawn_fails.is_empty() { false } else { self.spawn_fails.remove(0) };
                        if fail {
                            self.step(Input::SpawnFailed("no such file".into()))?;
                        } else {
                            let id = self.next_id;
                            self.next_id += 1;
                            self.workers.insert(id, Worker { slot, gen, ready: false, stopping: false, exited: false });
                            let more = self.roll.step(Input::Spawned(id), self.now);
                            prop_assert!(more.is_empty(), "Spawned led to {more:?}");
                        }
                    }
                    Action::Retire { slot, gen, worker, done, of } => {
                        prop_assert_eq!(self.active, Some((gen, slot)));
                        prop_assert_eq!((done, of), (slot + 1, self.n));
                        let w = &self.workers[&worker];
                        prop_assert!(w.ready && !w.stopping && !w.exited && w.slot == slot && w.gen == gen);
                        for (id, w) in self.workers.iter_mut() {
                            if w.slot == slot && *id != worker {
                                w.stopping = true;
                            }
                        }
                        self.active = Some((gen, slot + 1));
                    }
                    Action::Stop(id) => {
                        prop_assert_eq!(Some(id), self.candidate(), "only the roll's new worker is stopped");
                        self.workers.get_mut(&id).unwrap().stopping = true;
                    }
                    Action::Finished { gen } => {
                        prop_assert_eq!(self.active, Some((gen, self.n)), "finished before the last slot");
                        for slot in 0..self.n {
                            prop_assert!(
                                self.live().any(|(_, w)| w.slot == slot && w.gen == gen && w.ready),
                                "slot {} does not run gen {}",
                                slot,
                                gen
                            );
                        }
                        self.end(gen);
                    }
                    Action::Abandoned { gen, slot, .. } => {
                        prop_assert_eq!(self.active, Some((gen, slot)));
                        prop_assert!(self.candidate().is_none(), "the new worker was left running");
                        // The old workers keep serving: every slot has a ready worker.
                        for s in 0..self.n {
                            prop_assert!(
                                self.live().any(|(_, w)| w.slot == s && w.ready),
                                "slot {} lost its worker",
                                s
                            );
                        }
                        self.end(gen);
                    }
                }
                self.counts()?;
            }
            Ok(())
        }

        fn end(&mut self, gen: u64) {
            self.active = None;
            self.rolls_ended.push(gen);
            if std::mem::take(&mut self.pending) {
                self.expected_starts += 1;
            }
        }

        /// After every action: never more than N+1 workers alive, never fewer than N-1 ready.
        fn counts(&self) -> Result<(), TestCaseError> {
            let alive = self.live().count();
            prop_assert!(alive <= self.n + 1, "{alive} workers alive with N = {}", self.n);
            let ready = self.live().filter(|(_, w)| w.ready).count();
            prop_assert!(ready + 1 >= self.n, "{ready} ready with N = {}", self.n);
            Ok(())
        }

        /// After every input (its actions all carried out): the machine and the model agree.
        fn invariants(&self) -> Result<(), TestCaseError> {
            self.counts()?;
            prop_assert_eq!(self.roll.rolling_gen(), self.active.map(|(g, _)| g));
            prop_assert_eq!(self.roll.pending(), self.pending);
            Ok(())
        }

        fn run(&mut self, op: Op) -> Result<(), TestCaseError> {
            match op {
                Op::Request => {
                    if self.active.is_some() {
                        self.pending = true;
                    } else {
                        self.expected_starts += 1;
                    }
                    self.step(Input::Request)?;
                }
                Op::CandidateReady => {
                    if let Some(id) = self.candidate() {
                        self.workers.get_mut(&id).unwrap().ready = true;
                        self.step(Input::Ready(id))?;
                    }
                }
                Op::CandidateExits => {
                    if let Some(id) = self.candidate() {
                        self.workers.get_mut(&id).unwrap().exited = true;
                        self.step(Input::Exited { worker: id, how: "exited with status 1".into() })?;
                    }
                }
                Op::Wait(ms) => {
                    self.now += Duration::from_millis(ms);
                    self.step(Input::Tick)?;
                }
                Op::Stray(ready) => {
                    let id = 1_000_000 + self.next_id;
                    let input = if ready { Input::Ready(id) } else { Input::Exited { worker: id, how: "x".into() } };
                    let out = self.roll.step(input, self.now);
                    prop_assert!(out.is_empty(), "a stranger's event led to {out:?}");
                }
            }
            self.invariants()?;
            // Stopped workers finish draining and exit in the model's next turn.
            for w in self.workers.values_mut() {
                if w.stopping {
                    w.exited = true;
                }
            }
            Ok(())
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

        #[test]
        fn roll_machine_keeps_its_guarantees(
            n in 1usize..6,
            ops in proptest::collection::vec(op(), 0..80),
            spawn_fails in proptest::collection::vec(proptest::bool::weighted(0.1), 0..40),
        ) {
            let mut m = Model::new(n, spawn_fails);
            for op in ops {
                m.run(op)?;
            }
            // Let every roll under way (and the one a request left pending) run to its end.
            let mut turns = 0;
            while m.active.is_some() {
                turns += 1;
                prop_assert!(turns < 100, "a roll that never ends");
                m.run(Op::CandidateReady)?;
            }
            prop_assert!(!m.roll.pending() && !m.pending);
            // Each roll ended exactly once (finished or abandoned), and requests coalesced: one
            // roll for each request while idle, plus one for any number during a roll.
            prop_assert_eq!(&m.rolls_started, &m.rolls_ended);
            prop_assert_eq!(m.rolls_started.len(), m.expected_starts);
        }

        #[test]
        fn cancel_ends_everything(n in 1usize..5, ops in proptest::collection::vec(op(), 0..40)) {
            let mut m = Model::new(n, vec![]);
            for op in ops {
                m.run(op)?;
            }
            let out = m.roll.step(Input::Cancel, m.now);
            prop_assert!(out.is_empty());
            prop_assert_eq!(m.roll.rolling_gen(), None);
            prop_assert!(!m.roll.pending());
            prop_assert!(m.roll.step(Input::Tick, m.now + TIMEOUT * 2).is_empty());
        }
    }
}

/// One test per defect the properties above found, named after the fault.
mod regressions {
    use std::ffi::OsString;
    use std::os::unix::ffi::OsStringExt;
    use std::time::Duration;

    use crate::cli::{parse_duration, parse_size};
    use crate::command::{Placeholders, Program};
    use crate::contract::{environment, Contract, WorkerVars};

    fn contract() -> Contract {
        Contract {
            addrs: vec!["127.0.0.1:8080".parse().unwrap()],
            names: vec!["http".into()],
            sockets: true,
            launcher_pid: 1,
            identity: None,
            watchdog: None,
        }
    }

    const W: WorkerVars<'static> = WorkerVars { slot: 0, gen: 1, notify_socket: None };

    #[test]
    fn placeholder_expansion_mangled_non_utf8_arguments() {
        // Any argument holding a '{' made every argument go through a lossy UTF-8 conversion.
        let command: Vec<OsString> = vec![
            "/bin/sh".into(),
            OsString::from_vec(b"--name=caf\xe9".to_vec()),
            OsString::from_vec(b"\x80{port}".to_vec()),
        ];
        let program = Program::resolve(&command).unwrap();
        let argv = program.argv(&Placeholders { fds: &[7], port: 8080, slot: 2 });
        assert_eq!(argv[1].as_bytes(), b"--name=caf\xe9");
        assert_eq!(argv[2].as_bytes(), b"\x808080");
    }

    #[test]
    fn environment_mangled_non_utf8_names() {
        let inherited = vec![(OsString::from_vec(b"CAF\xc9".to_vec()), OsString::from_vec(b"cr\xe8me".to_vec()))];
        let env = environment(&inherited, &contract(), &W);
        assert!(env.iter().any(|e| e.as_bytes() == b"CAF\xc9=cr\xe8me"), "{env:?}");
    }

    #[test]
    fn environment_panicked_on_a_name_no_environment_can_hold() {
        // A name with a NUL (or an '=' past its first byte) cannot be passed: it is left out
        // instead of panicking (NUL) or turning into another variable ("PORT=1" -> PORT).
        let inherited: Vec<(OsString, OsString)> = vec![
            (OsString::from_vec(b"A\0B".to_vec()), "x".into()),
            ("PORT=1".into(), "2".into()),
            ("=C:".into(), "kept".into()),
        ];
        let env = environment(&inherited, &contract(), &W);
        assert!(!env.iter().any(|e| e.as_bytes().starts_with(b"A")), "{env:?}");
        assert_eq!(env.iter().filter(|e| e.as_bytes().starts_with(b"PORT=")).count(), 1, "{env:?}");
        assert!(env.iter().any(|e| e.as_bytes() == b"=C:=kept"), "{env:?}");
    }

    #[test]
    fn size_with_a_repeated_unit_suffix_was_accepted() {
        for bad in ["1MBb", "1MBB", "1MiBiB", "1GIBB", "2000000iB", "2000000BB"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        for (good, bytes) in [("1MB", 1u64 << 20), ("1mib", 1 << 20), ("2000000B", 2_000_000), ("1g", 1 << 30)] {
            assert_eq!(parse_size(good), Ok(bytes), "{good}");
        }
    }

    #[test]
    fn duration_in_ms_drifted_by_float_rounding() {
        assert_eq!(parse_duration("9737498469ms"), Ok(Duration::from_millis(9_737_498_469)));
        assert_eq!(parse_duration("1.000000001s"), Ok(Duration::new(1, 1)));
        assert_eq!(parse_duration("0.1s"), Ok(Duration::from_millis(100)));
        assert_eq!(parse_duration(".5"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2.5m"), Ok(Duration::from_secs(150)));
        for bad in [".", "1.2.3s", "", "s", "366d", "8761h", "1e3s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
