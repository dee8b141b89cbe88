//! Reading the hand-over of an image from before the JSON document (`state`): format 1, a
//! positional text of one item a line after the line `reuse-launch-state 1`, strings
//! percent-encoded, `-` for none. Only read, never written: a launcher built before the document
//! re-executes into this one with it, and every worker must be kept. Unknown lines are skipped,
//! as that format's readers always did.
//!
//! ```text
//! slot GEN QUICK_DEATHS START_FAILURES RESPAWN_MS RETIRING_MS LAST_FAILURE LAST_EXIT CAUSE:N,..
//! worker ID SLOT GEN PID STARTED_MS PHASE CANDIDATE WAS_READY WATCHDOG_MS FAULT
//! listeners MODE BACKLOG NAME=ADDR,.. FD,..
//! ```

use std::os::fd::RawFd;

use super::state::{
    AutoscaleState, LogPipe, Replacement, RollState, SentinelState, SlotState, State, WorkerFd, WorkerPhase,
    WorkerState,
};
use crate::socket::{BindSpec, Parts};

const MAGIC: &str = "reuse-launch-state 1";

type Fields<'a> = std::str::Split<'a, char>;

/// Is `text` a format-1 hand-over?
pub(super) fn is_legacy(text: &str) -> bool {
    text.lines().next() == Some(MAGIC)
}

/// A format-1 text as the [`State`] it stands for.
pub(super) fn decode(text: &str) -> Result<State, String> {
    let mut lines = text.lines();
    if lines.next() != Some(MAGIC) {
        return Err("not a state this launcher can read (the old one is newer?)".into());
    }
    let mut s = State::default();
    for line in lines {
        let mut f = line.split(' ');
        let word = f.next().unwrap_or("");
        line_into(&mut s, word, &mut f)?;
    }
    Ok(s)
}

/// One line, its word `word` and its fields `f`, into `s`.
fn line_into(s: &mut State, word: &str, f: &mut Fields) -> Result<(), String> {
    match word {
        "desired" => s.desired = num(f.next(), "desired")?,
        "next_id" => s.next_id = num(f.next(), "next_id")?,
        "all_ready_logged" => s.all_ready_logged = f.next() == Some("1"),
        "roll" => roll(s, f)?,
        "slot" => s.slots.push(slot(f)?),
        "worker" => s.workers.push(worker(f)?),
        "notify" => s.notify.push(WorkerFd { worker: num(f.next(), "notify id")?, fd: num(f.next(), "notify fd")? }),
        "intercept" => {
            s.intercept.push(WorkerFd { worker: num(f.next(), "intercept id")?, fd: num(f.next(), "intercept fd")? })
        }
        // An image older still wrote no cause: a memory replacement.
        "memory" => s.memory.push(Replacement {
            new: num(f.next(), "memory new")?,
            slot: num(f.next(), "memory slot")?,
            old: num(f.next(), "memory old")?,
            cause: f.next().map_or_else(|| "memory".to_string(), dec),
        }),
        "log" => s.logs.push(LogPipe {
            fd: num(f.next(), "log fd")?,
            stderr: f.next() == Some("err"),
            prefix: dec(f.next().unwrap_or("%")),
        }),
        "autoscale" => autoscale(s.autoscale.get_or_insert_with(AutoscaleState::default), f)?,
        "scaled" => scaled(s.autoscale.get_or_insert_with(AutoscaleState::default), f)?,
        "sentinel" => {
            s.sentinel = Some(SentinelState { pid: num(f.next(), "sentinel pid")?, fd: num(f.next(), "sentinel fd")? })
        }
        "listeners" => s.listeners = listeners(f)?,
        _ => {} // a newer image's addition: ignored
    }
    Ok(())
}

fn num<T: std::str::FromStr>(v: Option<&str>, what: &str) -> Result<T, String> {
    v.ok_or(format!("{what} missing"))?.parse::<T>().map_err(|_| format!("bad {what}"))
}

/// `-` or a number.
fn optn(v: Option<&str>, what: &str) -> Result<Option<i64>, String> {
    match v {
        Some("-") => Ok(None),
        other => num(other, what).map(Some),
    }
}

/// `roll GEN ACTIVE PENDING`, ACTIVE `-` or `GEN,SLOT,WORKER,DEADLINE_MS` (the last two `-`
/// until the new worker is spawned).
fn roll(s: &mut State, f: &mut Fields) -> Result<(), String> {
    s.roll_gen = num(f.next(), "roll gen")?;
    let active = f.next().ok_or("roll missing")?;
    if active != "-" {
        let p: Vec<&str> = active.split(',').collect();
        let (worker, deadline_ms) = match (p.get(2), p.get(3)) {
            (Some(&"-"), _) | (None, _) => (None, None),
            (Some(w), d) => (Some(num(Some(w), "roll worker")?), Some(num(d.copied(), "roll deadline")?)),
        };
        let (gen, slot) = (num(p.first().copied(), "roll")?, num(p.get(1).copied(), "roll slot")?);
        s.roll_active = Some(RollState { gen, slot, worker, deadline_ms });
    }
    s.roll_pending = f.next() == Some("1");
    Ok(())
}

fn slot(f: &mut Fields) -> Result<SlotState, String> {
    Ok(SlotState {
        gen: num(f.next(), "slot gen")?,
        quick_deaths: num(f.next(), "quick deaths")?,
        start_failures: num(f.next(), "start failures")?,
        respawn_ms: optn(f.next(), "respawn")?,
        retiring_ms: optn(f.next(), "retiring")?,
        last_failure: dec(f.next().unwrap_or("%")),
        last_exit: f.next().filter(|v| *v != "-").map(dec),
        restarts: match f.next() {
            None | Some("-") => Vec::new(),
            Some(r) => r
                .split(',')
                .filter_map(|kv| kv.split_once(':'))
                .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
                .collect(),
        },
    })
}

fn worker(f: &mut Fields) -> Result<WorkerState, String> {
    let id = num(f.next(), "worker id")?;
    let slot = num(f.next(), "worker slot")?;
    let gen = num(f.next(), "worker gen")?;
    let pid = num(f.next(), "worker pid")?;
    let started_ms = num(f.next(), "worker start")?;
    let phase = phase(f.next().ok_or("worker phase missing")?)?;
    Ok(WorkerState {
        id,
        slot,
        gen,
        pid,
        started_ms,
        phase,
        candidate: f.next() == Some("1"),
        was_ready: f.next() == Some("1"),
        watchdog_ms: optn(f.next(), "watchdog")?,
        fault: f.next().filter(|v| *v != "-").map(String::from),
    })
}

/// `ready`, `starting,READY_MS,DEADLINE_MS` or `stopping,KILL_MS,KILLED`.
fn phase(text: &str) -> Result<WorkerPhase, String> {
    let p: Vec<&str> = text.split(',').collect();
    Ok(match p[0] {
        "starting" => WorkerPhase::Starting {
            ready_ms: optn(p.get(1).copied(), "ready")?,
            deadline_ms: num(p.get(2).copied(), "deadline")?,
        },
        "ready" => WorkerPhase::Ready,
        "stopping" => {
            WorkerPhase::Stopping { kill_ms: num(p.get(1).copied(), "kill")?, killed: p.get(2) == Some(&"1") }
        }
        other => return Err(format!("unknown worker phase {other}")),
    })
}

/// `autoscale FLAP FLAP_MS DOWN_MS UPS DOWNS`.
fn autoscale(a: &mut AutoscaleState, f: &mut Fields) -> Result<(), String> {
    a.flap = num(f.next(), "autoscale flap")?;
    a.flap_ms = optn(f.next(), "autoscale flap time")?;
    a.last_down_ms = optn(f.next(), "autoscale last down")?;
    a.ups = num(f.next(), "autoscale ups")?;
    a.downs = num(f.next(), "autoscale downs")?;
    Ok(())
}

/// `scaled MS FROM TO BY REASON`, one per recent change.
fn scaled(a: &mut AutoscaleState, f: &mut Fields) -> Result<(), String> {
    let ms = num(f.next(), "scaled time")?;
    let from = num(f.next(), "scaled from")?;
    let to = num(f.next(), "scaled to")?;
    let (by, reason) = (dec(f.next().unwrap_or("%")), dec(f.next().unwrap_or("%")));
    a.history.push((ms, from, to, by, reason));
    Ok(())
}

/// `listeners MODE BACKLOG NAME=ADDR,.. FD,..` (the fds `-` in self mode).
fn listeners(f: &mut Fields) -> Result<Parts, String> {
    let mode = f.next().ok_or("listeners mode missing")?.parse()?;
    let backlog = num(f.next(), "backlog")?;
    let mut binds = Vec::new();
    for b in f.next().unwrap_or("").split(',').filter(|b| !b.is_empty()) {
        let Some((name, addr)) = b.split_once('=') else { continue };
        let addr = addr.parse().map_err(|_| format!("bad address {addr}"))?;
        binds.push(BindSpec { name: dec(name), addr });
    }
    let sockets = match f.next() {
        None | Some("-") => Vec::new(),
        Some(l) => l.split(',').map(|fd| num::<RawFd>(Some(fd), "socket fd")).collect::<Result<_, _>>()?,
    };
    Ok(Parts { mode, backlog, binds, sockets })
}

/// Undo the percent-encoding (`%` alone is the empty string).
fn dec(s: &str) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reexec::state::tests::{bind, log, replacement, sample};
    use crate::socket::Mode;

    /// Written by main's encoder (3b7ca04) from `sample()`.
    const SAMPLE: &str = include_str!("testdata/v1-sample.txt");
    /// Captured from a real reexec of main's binary: `-n 3 -b 127.0.0.1:18431 -b
    /// admin=127.0.0.1:18432 --ready auto --max-memory 2G --watchdog 30s`, after a roll.
    const REUSEPORT: &str = include_str!("testdata/v1-reuseport.txt");
    /// Captured likewise: `-n 2..4 --mode shared --ready-delay 2s --grace 20s` scaled to 3, one
    /// worker killed, then a roll under way (a stopping and a starting worker).
    const SHARED: &str = include_str!("testdata/v1-shared-mid-roll.txt");

    fn ready(id: u64, slot: usize, gen: u64, pid: i32, started_ms: i64) -> WorkerState {
        WorkerState { id, slot, gen, pid, started_ms, was_ready: true, ..WorkerState::default() }
    }

    #[test]
    fn main_s_encoding_of_the_sample_reads_as_the_sample() {
        assert!(is_legacy(SAMPLE));
        assert_eq!(decode(SAMPLE).unwrap(), sample());
        assert_eq!(super::super::decode_state(SAMPLE).unwrap(), sample(), "decode_state takes the old text too");
    }

    #[test]
    fn a_real_reuseport_hand_over_keeps_every_worker_and_socket() {
        let s = super::super::decode_state(REUSEPORT).unwrap();
        assert_eq!(
            (s.desired, s.next_id, s.all_ready_logged, s.roll_gen, s.roll_active, s.roll_pending),
            (3, 7, true, 2, None, false)
        );
        let slot = SlotState { gen: 2, last_exit: Some("exited with status 0".into()), ..SlotState::default() };
        assert_eq!(s.slots, vec![slot; 3]);
        let mut w = vec![ready(4, 0, 2, 5448, -851), ready(5, 1, 2, 5495, -687), ready(6, 2, 2, 5555, -486)];
        for (w, ms) in w.iter_mut().zip([29312, 29513, 29731]) {
            w.watchdog_ms = Some(ms);
        }
        assert_eq!(s.workers, w);
        let fds = |l: &[WorkerFd]| l.iter().map(|w| (w.worker, w.fd)).collect::<Vec<_>>();
        assert_eq!(fds(&s.notify), [(4, 50), (5, 54), (6, 29)]);
        assert_eq!(fds(&s.intercept), [(4, 53), (5, 57), (6, 56)]);
        assert_eq!(s.sentinel, Some(SentinelState { pid: 5288, fd: 22 }));
        assert_eq!(s.logs.len(), 6);
        assert_eq!(s.logs[1], log(48, true, "[0 5448] "));
        let binds = vec![bind("http", "127.0.0.1:18431"), bind("admin", "127.0.0.1:18432")];
        let l = Parts { mode: Mode::Reuseport, backlog: 4096, binds, sockets: vec![7, 8, 9, 11, 12, 13] };
        assert_eq!(s.listeners, l);
        assert_eq!((s.memory.len(), s.autoscale), (0, None));
    }

    #[test]
    fn a_real_shared_hand_over_mid_roll_keeps_the_roll_and_the_scaling() {
        let s = super::super::decode_state(SHARED).unwrap();
        assert_eq!(
            (s.desired, s.roll_gen, s.roll_active, s.roll_pending),
            (3, 2, Some(RollState { gen: 2, slot: 1, worker: Some(6), deadline_ms: Some(59449) }), false)
        );
        assert_eq!(s.slots[2].last_failure, "worker 2 (pid 6344, gen 1) killed by SIGKILL");
        assert_eq!(s.slots[2].restarts, vec![("crash".to_string(), 1)]);
        assert_eq!((s.slots[2].quick_deaths, s.slots[0].gen, s.slots[1].gen), (1, 2, 1));
        let pids: Vec<i32> = s.workers.iter().map(|w| w.pid).collect();
        assert_eq!(pids, [6138, 6140, 6552, 6599, 6712]);
        assert_eq!(s.workers[0].phase, WorkerPhase::Stopping { kill_ms: 19449, killed: false });
        assert_eq!(s.workers[4].phase, WorkerPhase::Starting { ready_ms: Some(1449), deadline_ms: 59449 });
        assert!(s.workers[4].candidate && !s.workers[4].was_ready);
        assert_eq!(s.intercept.len(), 5);
        assert!(s.notify.is_empty());
        let a = s.autoscale.unwrap();
        assert_eq!((a.flap, a.flap_ms, a.last_down_ms, a.ups, a.downs), (0, None, None, 0, 0));
        assert_eq!(a.history, vec![(-5156, 2, 3, "control".into(), "asked by control".into())]);
        let l =
            Parts { mode: Mode::Shared, backlog: 4096, binds: vec![bind("http", "127.0.0.1:18433")], sockets: vec![7] };
        assert_eq!(s.listeners, l);
    }

    #[test]
    fn unknown_lines_are_ignored_and_a_foreign_text_refused() {
        let text = SAMPLE.to_string() + "something_newer 1 2 3\n";
        assert_eq!(decode(&text).unwrap(), sample());
        assert!(decode("hello\n").is_err());
        assert!(decode(&format!("{MAGIC}\nworker x\n")).is_err());
        assert!(decode(&format!("{MAGIC}\nlisteners sideways 1 - -\n")).is_err());
    }

    #[test]
    fn a_replacement_line_without_a_cause_is_a_memory_one() {
        let text = format!("{MAGIC}\nmemory 16 1 9\n");
        assert_eq!(decode(&text).unwrap().memory, vec![replacement(16, 1, 9, "memory")]);
    }

    #[test]
    fn self_mode_has_no_sockets() {
        let s = decode(&format!("{MAGIC}\nlisteners self 128 http=0.0.0.0:8080 -\n")).unwrap();
        assert_eq!((s.listeners.mode, s.listeners.sockets.len()), (Mode::SelfBind, 0));
    }

    proptest::proptest! {
        /// Lines of the format's words and fields in any order and number: read or refused,
        /// never a panic.
        #[test]
        fn any_lines_are_read_or_refused(lines in proptest::collection::vec(
            ("(desired|next_id|roll|slot|worker|notify|intercept|memory|log|autoscale|scaled|sentinel|listeners|x)",
             proptest::collection::vec("(-|%|[0-9]{1,3}|-[0-9]{1,2}|[a-z%,:=.]{0,12}|starting,-,1|stopping,1,1|ready|reuseport|shared)", 0..10)),
            0..12,
        )) {
            let mut text = format!("{MAGIC}\n");
            for (word, fields) in lines {
                text += &format!("{word} {}\n", fields.join(" "));
            }
            let _ = decode(&text);
        }
    }

    #[test]
    fn strings_are_percent_decoded() {
        for (enc, s) in
            [("%", ""), ("a%20b", "a b"), ("100%25", "100%"), ("x%0Ay", "x\ny"), ("%2D", "-"), ("%C3%A9", "é")]
        {
            assert_eq!(dec(enc), s);
        }
    }
}
