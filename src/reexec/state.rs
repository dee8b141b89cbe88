//! What the old image hands the new one at a `reexec`: [`State`], as a versioned JSON document
//! (serde_json) with every time relative to the moment of the exec. Every struct is
//! `#[serde(default)]` and unknown fields are ignored, so a newer binary reads an older one's
//! document (what it lacks reads as the default) and an older one skips what it does not know.
//! The positional text of the images before the document (format 1) is still read: `legacy`.
//!
//! Growing the state: add a field with a default that means "the old image did not say". A
//! change an older reader would misread gets a new `FORMAT` name instead. An older image would
//! refuse such a document only after the exec, with every worker lost; so before the exec the
//! launcher asks the binary which format it reads ([`super::check_binary`]: `--version` with
//! [`super::PROBE_VAR`] set answers a `hand-over: FORMAT VERSION` line) and refuses a binary that
//! does not read this one's, among them every binary from before the document.

use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::socket::Parts;

/// The document's `format` field: what it is, whatever its version.
pub(super) const FORMAT: &str = "reuse-launch-state";
/// The document's `version`: 2 (1 was the positional text). Informative: readers go by fields.
pub(super) const VERSION: u32 = 2;

/// Everything the supervisor needs to go on where the old image stopped.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct State {
    pub desired: usize,
    pub next_id: u64,
    pub all_ready_logged: bool,
    pub roll_gen: u64,
    pub roll_active: Option<RollState>,
    pub roll_pending: bool,
    pub slots: Vec<SlotState>,
    pub workers: Vec<WorkerState>,
    /// Each worker's notify socket.
    pub notify: Vec<WorkerFd>,
    /// Each worker's seccomp notification fd (`--intercept-bind`).
    pub intercept: Vec<WorkerFd>,
    /// Replacements under way (`--max-memory`, `--hung-timeout`).
    pub memory: Vec<Replacement>,
    pub listeners: Parts,
    pub sentinel: Option<SentinelState>,
    /// The workers' log pipes being pumped.
    pub logs: Vec<LogPipe>,
    /// `-n MIN..MAX`: the policy's memory (the bounds come from the command line again, the
    /// count is `desired`).
    pub autoscale: Option<AutoscaleState>,
}

/// A roll under way: its generation and slot, and once spawned the new worker and its
/// deadline.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RollState {
    pub gen: u64,
    pub slot: usize,
    pub worker: Option<u64>,
    pub deadline_ms: Option<i64>,
}

/// An fd of worker `worker`'s kept open across the exec.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct WorkerFd {
    pub worker: u64,
    pub fd: RawFd,
}

/// A make-before-break replacement under way: worker `new` on `slot` replaces `old`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Replacement {
    pub new: u64,
    pub slot: usize,
    pub old: u64,
    /// `memory` or `hung`.
    pub cause: String,
}

/// The sentinel's pid and the launcher's end of its pipe.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SentinelState {
    pub pid: u32,
    pub fd: RawFd,
}

/// A worker's stdout or stderr pipe, its read end, and the prefix of its lines.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct LogPipe {
    pub fd: RawFd,
    pub stderr: bool,
    pub prefix: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
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

/// A worker's phase; in the document `"ready"`, `{"starting":{...}}` or `{"stopping":{...}}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerPhase {
    Starting {
        #[serde(default)]
        ready_ms: Option<i64>,
        deadline_ms: i64,
    },
    #[default]
    Ready,
    Stopping {
        kill_ms: i64,
        #[serde(default)]
        killed: bool,
    },
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
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

/// The automatic scaling's memory: flaps (doublings, when the last was), the last automatic
/// scale-down, the counts of automatic changes, and the recent changes (when, from, to, by,
/// reason).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct AutoscaleState {
    pub flap: u32,
    pub flap_ms: Option<i64>,
    pub last_down_ms: Option<i64>,
    pub ups: u64,
    pub downs: u64,
    pub history: Vec<(i64, usize, usize, String, String)>,
}

/// The memfd's whole content.
#[derive(Serialize, Deserialize)]
struct Document {
    format: String,
    #[serde(default)]
    version: u32,
    #[serde(default)]
    state: State,
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

impl State {
    /// The document, pretty-printed (a few KiB: one line a field is easier to read in a dump).
    pub fn encode(&self) -> String {
        let doc = Document { format: FORMAT.into(), version: VERSION, state: self.clone() };
        serde_json::to_string_pretty(&doc).expect("the state serializes (no maps with non-string keys)")
    }

    /// A document of any version (the positional text of an image from before the document is
    /// `legacy`'s: [`super::decode_state`] tells the two apart).
    pub fn from_document(text: &str) -> Result<State, String> {
        let doc: Document = serde_json::from_str(text).map_err(|e| {
            if text.trim_start().starts_with('{') {
                format!("bad state document: {e}")
            } else {
                "not a state this launcher can read (the old one is newer?)".to_string()
            }
        })?;
        if doc.format != FORMAT {
            return Err(format!("not a state this launcher can read: format {:?} (the old one is newer?)", doc.format));
        }
        Ok(doc.state)
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::socket::{BindSpec, Mode};

    pub(in crate::reexec) fn sample() -> State {
        State {
            desired: 3,
            next_id: 17,
            all_ready_logged: true,
            roll_gen: 4,
            roll_active: Some(RollState { gen: 4, slot: 1, worker: Some(16), deadline_ms: Some(2500) }),
            roll_pending: true,
            slots: sample_slots(),
            workers: sample_workers(),
            notify: vec![WorkerFd { worker: 15, fd: 9 }, WorkerFd { worker: 16, fd: 11 }],
            intercept: vec![WorkerFd { worker: 15, fd: 13 }, WorkerFd { worker: 16, fd: 14 }],
            memory: vec![replacement(16, 1, 9, "memory"), replacement(18, 0, 15, "hung")],
            listeners: Parts {
                mode: Mode::Reuseport,
                backlog: 4096,
                binds: vec![bind("http", "0.0.0.0:8080"), bind("admin api", "[::1]:9000")],
                sockets: vec![3, 4, 5, 6, 7, 8],
            },
            sentinel: Some(SentinelState { pid: 777, fd: 12 }),
            logs: vec![log(20, false, "[0 1234] "), log(21, true, "[0 1234] ")],
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

    /// The sample's slots: one with every field set, one with the defaults.
    fn sample_slots() -> Vec<SlotState> {
        vec![
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
        ]
    }

    /// The sample's workers: one ready, one starting (a replacement), one stopping.
    fn sample_workers() -> Vec<WorkerState> {
        vec![
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
        ]
    }

    pub(in crate::reexec) fn replacement(new: u64, slot: usize, old: u64, cause: &str) -> Replacement {
        Replacement { new, slot, old, cause: cause.into() }
    }

    pub(in crate::reexec) fn log(fd: RawFd, stderr: bool, prefix: &str) -> LogPipe {
        LogPipe { fd, stderr, prefix: prefix.into() }
    }

    pub(in crate::reexec) fn bind(name: &str, addr: &str) -> BindSpec {
        BindSpec { name: name.into(), addr: addr.parse().unwrap() }
    }

    #[test]
    fn state_round_trips_through_its_document() {
        let s = sample();
        let text = s.encode();
        assert_eq!(super::super::decode_state(&text).unwrap(), s, "{text}");
        let empty = State::default();
        assert_eq!(super::super::decode_state(&empty.encode()).unwrap(), empty);
    }

    #[test]
    fn the_document_is_versioned_json_with_readable_words() {
        let v: serde_json::Value = serde_json::from_str(&sample().encode()).unwrap();
        assert_eq!(v["format"], "reuse-launch-state");
        assert_eq!(v["version"], 2);
        let l = &v["state"]["listeners"];
        assert_eq!(l["mode"], "reuseport");
        assert_eq!(l["binds"][1]["addr"], "[::1]:9000");
        assert_eq!(v["state"]["workers"][0]["phase"], "ready");
        assert_eq!(v["state"]["workers"][2]["phase"]["stopping"]["kill_ms"], 29000);
    }

    #[test]
    fn unknown_fields_are_ignored_and_missing_ones_read_as_defaults() {
        let mut v: serde_json::Value = serde_json::from_str(&sample().encode()).unwrap();
        v["something_newer"] = serde_json::json!([1, 2, 3]);
        v["state"]["workers"][0]["newer"] = serde_json::json!({"x": 1});
        assert_eq!(super::super::decode_state(&v.to_string()).unwrap(), sample());
        // An older document without a field: its default.
        let old = r#"{"format":"reuse-launch-state","version":2,"state":{"desired":2,"workers":[{"id":1,"pid":42}]}}"#;
        let s = super::super::decode_state(old).unwrap();
        assert_eq!((s.desired, s.workers[0].pid, s.workers[0].phase.clone()), (2, 42, WorkerPhase::Ready));
        assert_eq!(s.listeners.mode, Mode::Reuseport);
    }

    #[test]
    fn a_foreign_text_is_refused() {
        assert!(super::super::decode_state("hello\n").is_err());
        assert!(super::super::decode_state(r#"{"format":"something-else","version":9}"#).is_err());
        assert!(super::super::decode_state(r#"{"format":"reuse-launch-state","state":{"desired":"x"}}"#).is_err());
        assert!(super::super::decode_state(r#"{"format":"reuse-launch-state","state":{"listeners":{"mode":"x"}}}"#)
            .is_err());
    }

    /// Written by this version's encoder from `sample()`: what the next version must still read.
    const V2_SAMPLE: &str = include_str!("testdata/v2-sample.json");

    #[test]
    fn the_recorded_version_2_document_reads_as_the_sample() {
        assert_eq!(super::super::decode_state(V2_SAMPLE).unwrap(), sample());
    }

    proptest::proptest! {
        /// The memfd's text is whatever the old image wrote: any text is refused or read,
        /// never a panic; any document this version writes reads back the same.
        #[test]
        fn any_text_is_read_or_refused(text in ".{0,200}", desired in 0usize..64, pid in proptest::prelude::any::<i32>()) {
            let _ = super::super::decode_state(&text);
            let _ = super::super::decode_state(&format!("{{\"format\":\"reuse-launch-state\",\"state\":{text}}}"));
            let s = State { desired, workers: vec![WorkerState { pid, ..WorkerState::default() }], ..sample() };
            proptest::prop_assert_eq!(super::super::decode_state(&s.encode()).unwrap(), s);
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
