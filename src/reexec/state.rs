//! What the old image hands the new one at a `reexec`: [`State`], as a versioned text of one
//! item a line (unknown lines are skipped, so a newer binary reads an older one's state), with
//! every time relative to the moment of the exec.

use std::fmt::Write as _;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

pub use super::scaling::AutoscaleState;

const MAGIC: &str = "reuse-launch-state 1";

/// A roll under way: (generation, slot, the new worker and its deadline in ms, once spawned).
pub type RollActive = (u64, usize, Option<(u64, i64)>);

/// Everything the supervisor needs to go on where the old image stopped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct State {
    pub desired: usize,
    pub next_id: u64,
    pub all_ready_logged: bool,
    pub roll_gen: u64,
    /// A roll under way: (generation, slot, the new worker once spawned, its deadline).
    pub roll_active: Option<RollActive>,
    pub roll_pending: bool,
    pub slots: Vec<SlotState>,
    pub workers: Vec<WorkerState>,
    /// Each worker's notify socket fd, by worker id.
    pub notify: Vec<(u64, RawFd)>,
    /// Each worker's seccomp notification fd (`--intercept-bind`), by worker id.
    pub intercept: Vec<(u64, RawFd)>,
    /// Replacements under way (`--max-memory`, `--hung-timeout`): (new worker, slot, old
    /// worker, cause). The line is `memory NEW SLOT OLD CAUSE`; an older image wrote no cause
    /// (read as `memory`) and reads only the first three fields.
    pub memory: Vec<(u64, usize, u64, String)>,
    pub listeners: ListenerState,
    /// The sentinel's pid and the launcher's end of its pipe.
    pub sentinel: Option<(u32, RawFd)>,
    /// The workers' log pipes being pumped: (read end, stderr?, prefix).
    pub logs: Vec<(RawFd, bool, String)>,
    /// `-n MIN..MAX`: the policy's memory (the bounds come from the command line again, the
    /// count is `desired`).
    pub autoscale: Option<AutoscaleState>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SlotState {
    pub gen: u64,
    pub quick_deaths: u32,
    pub start_failures: u32,
    pub respawn_ms: Option<i64>,
    pub retiring_ms: Option<i64>,
    pub last_failure: String,
    pub last_exit: Option<String>,
    pub restarts: Vec<(String, u64)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkerPhase {
    Starting { ready_ms: Option<i64>, deadline_ms: i64 },
    Ready,
    Stopping { kill_ms: i64, killed: bool },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerState {
    pub id: u64,
    pub slot: usize,
    pub gen: u64,
    pub pid: i32,
    pub started_ms: i64,
    pub phase: WorkerPhase,
    pub candidate: bool,
    pub was_ready: bool,
    pub watchdog_ms: Option<i64>,
    pub fault: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListenerState {
    pub mode: String,
    pub backlog: i32,
    /// (name, bound address) per bind.
    pub binds: Vec<(String, String)>,
    /// Every listening socket, in the layout of `Listeners` (slot * binds + bind).
    pub sockets: Vec<RawFd>,
}

/// `at` as milliseconds after `now` (negative: before).
pub fn ms_from(now: Instant, at: Instant) -> i64 {
    if at >= now {
        at.duration_since(now).as_millis() as i64
    } else {
        -(now.duration_since(at).as_millis() as i64)
    }
}

/// The instant `ms` milliseconds after `now`.
pub fn at_ms(now: Instant, ms: i64) -> Instant {
    if ms >= 0 {
        now + Duration::from_millis(ms as u64)
    } else {
        now.checked_sub(Duration::from_millis(ms.unsigned_abs())).unwrap_or(now)
    }
}

/// Percent-encode what would break a space-separated line.
pub(super) fn enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_graphic() && b != b'%' {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    match out.as_str() {
        "" => "%".to_string(),
        "-" => "%2D".to_string(), // "-" alone stands for "none"
        _ => out,
    }
}

pub(super) fn dec(s: &str) -> String {
    if s == "%" {
        return String::new();
    }
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 3 <= b.len() {
            let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok());
            if let Some(v) = hex {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub(super) fn opt<T: std::fmt::Display>(v: &Option<T>) -> String {
    v.as_ref().map_or_else(|| "-".to_string(), |v| v.to_string())
}

impl State {
    pub fn encode(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(o, "{MAGIC}");
        let _ = writeln!(o, "desired {}", self.desired);
        let _ = writeln!(o, "next_id {}", self.next_id);
        let _ = writeln!(o, "all_ready_logged {}", u8::from(self.all_ready_logged));
        let active = match self.roll_active {
            None => "-".to_string(),
            Some((gen, slot, None)) => format!("{gen},{slot},-,-"),
            Some((gen, slot, Some((w, d)))) => format!("{gen},{slot},{w},{d}"),
        };
        let _ = writeln!(o, "roll {} {active} {}", self.roll_gen, u8::from(self.roll_pending));
        for s in &self.slots {
            let restarts: Vec<String> = s.restarts.iter().map(|(k, v)| format!("{k}:{v}")).collect();
            let _ = writeln!(
                o,
                "slot {} {} {} {} {} {} {} {}",
                s.gen,
                s.quick_deaths,
                s.start_failures,
                opt(&s.respawn_ms),
                opt(&s.retiring_ms),
                enc(&s.last_failure),
                s.last_exit.as_deref().map_or("-".to_string(), enc),
                if restarts.is_empty() { "-".to_string() } else { restarts.join(",") }
            );
        }
        for w in &self.workers {
            let phase = match &w.phase {
                WorkerPhase::Starting { ready_ms, deadline_ms } => format!("starting,{},{deadline_ms}", opt(ready_ms)),
                WorkerPhase::Ready => "ready".to_string(),
                WorkerPhase::Stopping { kill_ms, killed } => format!("stopping,{kill_ms},{}", u8::from(*killed)),
            };
            let _ = writeln!(
                o,
                "worker {} {} {} {} {} {phase} {} {} {} {}",
                w.id,
                w.slot,
                w.gen,
                w.pid,
                w.started_ms,
                u8::from(w.candidate),
                u8::from(w.was_ready),
                opt(&w.watchdog_ms),
                w.fault.as_deref().unwrap_or("-")
            );
        }
        for (id, fd) in &self.notify {
            let _ = writeln!(o, "notify {id} {fd}");
        }
        for (id, fd) in &self.intercept {
            let _ = writeln!(o, "intercept {id} {fd}");
        }
        for (new, slot, old, cause) in &self.memory {
            let _ = writeln!(o, "memory {new} {slot} {old} {}", enc(cause));
        }
        if let Some((pid, fd)) = self.sentinel {
            let _ = writeln!(o, "sentinel {pid} {fd}");
        }
        for (fd, stderr, prefix) in &self.logs {
            let _ = writeln!(o, "log {fd} {} {}", if *stderr { "err" } else { "out" }, enc(prefix));
        }
        if let Some(a) = &self.autoscale {
            a.encode(&mut o);
        }
        let l = &self.listeners;
        let binds: Vec<String> = l.binds.iter().map(|(n, a)| format!("{}={}", enc(n), a)).collect();
        let fds: Vec<String> = l.sockets.iter().map(|f| f.to_string()).collect();
        let _ = writeln!(
            o,
            "listeners {} {} {} {}",
            l.mode,
            l.backlog,
            binds.join(","),
            if fds.is_empty() { "-".into() } else { fds.join(",") }
        );
        o
    }

    pub fn decode(text: &str) -> Result<State, String> {
        let mut lines = text.lines();
        if lines.next() != Some(MAGIC) {
            return Err("not a state this launcher can read (the old one is newer?)".into());
        }
        let mut s = State::default();
        let num = |v: Option<&str>, what: &str| -> Result<i64, String> {
            v.ok_or(format!("{what} missing"))?.parse::<i64>().map_err(|_| format!("bad {what}"))
        };
        let optn = |v: Option<&str>, what: &str| -> Result<Option<i64>, String> {
            match v {
                Some("-") => Ok(None),
                other => num(other, what).map(Some),
            }
        };
        for line in lines {
            let mut f = line.split(' ');
            match f.next() {
                Some("desired") => s.desired = num(f.next(), "desired")? as usize,
                Some("next_id") => s.next_id = num(f.next(), "next_id")? as u64,
                Some("all_ready_logged") => s.all_ready_logged = f.next() == Some("1"),
                Some("roll") => {
                    s.roll_gen = num(f.next(), "roll gen")? as u64;
                    let active = f.next().ok_or("roll missing")?;
                    if active != "-" {
                        let p: Vec<&str> = active.split(',').collect();
                        let spawned = match (p.get(2), p.get(3)) {
                            (Some(&"-"), _) | (None, _) => None,
                            (Some(w), d) => {
                                Some((num(Some(w), "roll worker")? as u64, num(d.copied(), "roll deadline")?))
                            }
                        };
                        s.roll_active = Some((
                            num(p.first().copied(), "roll")? as u64,
                            num(p.get(1).copied(), "roll slot")? as usize,
                            spawned,
                        ));
                    }
                    s.roll_pending = f.next() == Some("1");
                }
                Some("slot") => {
                    let gen = num(f.next(), "slot gen")? as u64;
                    let quick_deaths = num(f.next(), "quick deaths")? as u32;
                    let start_failures = num(f.next(), "start failures")? as u32;
                    let respawn_ms = optn(f.next(), "respawn")?;
                    let retiring_ms = optn(f.next(), "retiring")?;
                    let last_failure = dec(f.next().unwrap_or("%"));
                    let last_exit = f.next().filter(|v| *v != "-").map(dec);
                    let restarts = match f.next() {
                        None | Some("-") => Vec::new(),
                        Some(r) => r
                            .split(',')
                            .filter_map(|kv| kv.split_once(':'))
                            .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
                            .collect(),
                    };
                    s.slots.push(SlotState {
                        gen,
                        quick_deaths,
                        start_failures,
                        respawn_ms,
                        retiring_ms,
                        last_failure,
                        last_exit,
                        restarts,
                    });
                }
                Some("worker") => {
                    let id = num(f.next(), "worker id")? as u64;
                    let slot = num(f.next(), "worker slot")? as usize;
                    let gen = num(f.next(), "worker gen")? as u64;
                    let pid = num(f.next(), "worker pid")? as i32;
                    let started_ms = num(f.next(), "worker start")?;
                    let p: Vec<&str> = f.next().ok_or("worker phase missing")?.split(',').collect();
                    let phase = match p[0] {
                        "starting" => WorkerPhase::Starting {
                            ready_ms: optn(p.get(1).copied(), "ready")?,
                            deadline_ms: num(p.get(2).copied(), "deadline")?,
                        },
                        "ready" => WorkerPhase::Ready,
                        "stopping" => WorkerPhase::Stopping {
                            kill_ms: num(p.get(1).copied(), "kill")?,
                            killed: p.get(2) == Some(&"1"),
                        },
                        other => return Err(format!("unknown worker phase {other}")),
                    };
                    let candidate = f.next() == Some("1");
                    let was_ready = f.next() == Some("1");
                    let watchdog_ms = optn(f.next(), "watchdog")?;
                    let fault = f.next().filter(|v| *v != "-").map(String::from);
                    s.workers.push(WorkerState {
                        id,
                        slot,
                        gen,
                        pid,
                        started_ms,
                        phase,
                        candidate,
                        was_ready,
                        watchdog_ms,
                        fault,
                    });
                }
                Some("notify") => {
                    s.notify.push((num(f.next(), "notify id")? as u64, num(f.next(), "notify fd")? as RawFd))
                }
                Some("intercept") => {
                    s.intercept.push((num(f.next(), "intercept id")? as u64, num(f.next(), "intercept fd")? as RawFd))
                }
                Some("memory") => s.memory.push((
                    num(f.next(), "memory new")? as u64,
                    num(f.next(), "memory slot")? as usize,
                    num(f.next(), "memory old")? as u64,
                    f.next().map_or_else(|| "memory".to_string(), dec),
                )),
                Some("log") => s.logs.push((
                    num(f.next(), "log fd")? as RawFd,
                    f.next() == Some("err"),
                    dec(f.next().unwrap_or("%")),
                )),
                Some(word @ ("autoscale" | "scaled")) => {
                    s.autoscale.get_or_insert_with(AutoscaleState::default).decode(word, &mut f)?;
                }
                Some("sentinel") => {
                    s.sentinel = Some((num(f.next(), "sentinel pid")? as u32, num(f.next(), "sentinel fd")? as RawFd))
                }
                Some("listeners") => {
                    let mode = f.next().ok_or("listeners mode missing")?.to_string();
                    let backlog = num(f.next(), "backlog")? as i32;
                    let binds = f
                        .next()
                        .unwrap_or("")
                        .split(',')
                        .filter(|b| !b.is_empty())
                        .filter_map(|b| b.split_once('=').map(|(n, a)| (dec(n), a.to_string())))
                        .collect();
                    let sockets = match f.next() {
                        None | Some("-") => Vec::new(),
                        Some(l) => l
                            .split(',')
                            .map(|fd| num(Some(fd), "socket fd").map(|v| v as RawFd))
                            .collect::<Result<_, _>>()?,
                    };
                    s.listeners = ListenerState { mode, backlog, binds, sockets };
                }
                _ => {} // a newer image's addition: ignored
            }
        }
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> State {
        State {
            desired: 3,
            next_id: 17,
            all_ready_logged: true,
            roll_gen: 4,
            roll_active: Some((4, 1, Some((16, 2500)))),
            roll_pending: true,
            slots: vec![
                SlotState {
                    gen: 4,
                    quick_deaths: 2,
                    start_failures: 1,
                    respawn_ms: Some(-20),
                    retiring_ms: None,
                    last_failure: "worker 0 (pid 12, gen 4) exited with status 1".into(),
                    last_exit: Some("killed by SIGKILL".into()),
                    restarts: vec![("crash".into(), 2), ("memory".into(), 1)],
                },
                SlotState { gen: 3, ..SlotState::default() },
            ],
            workers: vec![
                WorkerState {
                    id: 15,
                    slot: 0,
                    gen: 4,
                    pid: 1234,
                    started_ms: -60000,
                    phase: WorkerPhase::Ready,
                    candidate: false,
                    was_ready: true,
                    watchdog_ms: Some(900),
                    fault: None,
                },
                WorkerState {
                    id: 16,
                    slot: 1,
                    gen: 4,
                    pid: 1240,
                    started_ms: -5,
                    phase: WorkerPhase::Starting { ready_ms: None, deadline_ms: 59000 },
                    candidate: true,
                    was_ready: false,
                    watchdog_ms: None,
                    fault: Some("memory".into()),
                },
                WorkerState {
                    id: 9,
                    slot: 1,
                    gen: 3,
                    pid: 1100,
                    started_ms: -90000,
                    phase: WorkerPhase::Stopping { kill_ms: 29000, killed: false },
                    candidate: false,
                    was_ready: true,
                    watchdog_ms: None,
                    fault: None,
                },
            ],
            notify: vec![(15, 9), (16, 11)],
            intercept: vec![(15, 13), (16, 14)],
            memory: vec![(16, 1, 9, "memory".into()), (18, 0, 15, "hung".into())],
            listeners: ListenerState {
                mode: "reuseport".into(),
                backlog: 4096,
                binds: vec![("http".into(), "0.0.0.0:8080".into()), ("admin api".into(), "[::1]:9000".into())],
                sockets: vec![3, 4, 5, 6, 7, 8],
            },
            sentinel: Some((777, 12)),
            logs: vec![(20, false, "[0 1234] ".into()), (21, true, "[0 1234] ".into())],
            autoscale: Some(AutoscaleState {
                flap: 1,
                flap_ms: Some(-4000),
                last_down_ms: None,
                ups: 3,
                downs: 1,
                history: vec![
                    (-9000, 1, 2, "auto".into(), "at least one connection waiting per slot for 2s".into()),
                    (-5000, 2, 1, "TTOU".into(), "asked by TTOU".into()),
                ],
            }),
        }
    }

    #[test]
    fn state_round_trips_through_its_text() {
        let s = sample();
        let text = s.encode();
        assert_eq!(State::decode(&text).unwrap(), s, "{text}");
        let empty = State::default();
        assert_eq!(State::decode(&empty.encode()).unwrap(), empty);
    }

    #[test]
    fn unknown_lines_are_ignored_and_a_foreign_text_refused() {
        let text = sample().encode() + "something_newer 1 2 3\n";
        assert_eq!(State::decode(&text).unwrap(), sample());
        assert!(State::decode("hello\n").is_err());
        assert!(State::decode(&format!("{MAGIC}\nworker x\n")).is_err());
    }

    #[test]
    fn a_replacement_line_without_a_cause_is_a_memory_one() {
        let text = format!("{MAGIC}\nmemory 16 1 9\n");
        assert_eq!(State::decode(&text).unwrap().memory, vec![(16, 1, 9, "memory".to_string())]);
    }

    #[test]
    fn strings_survive_encoding() {
        for s in ["", "a b", "100%", "x\ny", "é ü", "%", "-"] {
            assert_eq!(dec(&enc(s)), s, "{s:?} -> {}", enc(s));
        }
    }

    #[test]
    fn times_relative_to_now() {
        let now = Instant::now();
        for ms in [-5000i64, -1, 0, 1, 123456] {
            assert_eq!(ms_from(now, at_ms(now, ms)), ms);
        }
    }
}
