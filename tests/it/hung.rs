//! Hung workers (issue 17): `--hung-timeout` replaces a worker that deadlocks or spins on one
//! request make-before-break, while steady load on new connections fails nothing, and never a
//! worker stopped by a signal. The restart cause reads `hung` in `status --json` and /metrics.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::common::*;
use crate::status_fields::*;

use crate::control::json;

const TIMEOUT: Duration = Duration::from_secs(2);
const GRACE: Duration = Duration::from_secs(1);
/// What a loaded 2-core machine may add to the timings: a stall is seen 0.3-1 s after
/// connections start to wait, and a log line may reach the test late.
const MARGIN: Duration = Duration::from_secs(3);

struct Setup {
    l: Launcher,
    control: String,
    _dir: TempPath,
}

fn launch() -> Setup {
    let dir = TempPath::dir("hung");
    let control = dir.join("c.sock").to_str().unwrap().to_string();
    let l = Launch::new()
        .workers(2)
        .ready("auto")
        .grace("1s")
        .flag("--hung-timeout", "2s")
        .flag("--control", &control)
        .flag("--metrics", "127.0.0.1:0")
        .py(&["--poison"])
        .start();
    wait_all_ready(&l, 2, secs(20));
    Setup { l, control, _dir: dir }
}

/// `GET path` on a connection of its own, left open (a poisoned request never answers).
fn poison(port: u16, path: &str) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").unwrap();
    s
}

/// The worker a poisoned request reached, from its `[SLOT PID] poisoned by PATH` line.
fn poisoned(l: &Launcher, path: &str) -> (usize, i32) {
    let line = l.wait_for(&format!("poisoned by {path}"), secs(10));
    let prefix = line.split(']').next().unwrap().trim_start_matches('[');
    let mut f = prefix.split_whitespace();
    (f.next().unwrap().parse().unwrap(), f.next().unwrap().parse().unwrap())
}

fn arrived(l: &Launcher, needle: &str) -> Instant {
    l.wait_for(needle, secs(30));
    l.find(needle).unwrap().1
}

fn status(control: &str) -> json::Value {
    crate::control::status(&["--control", control]).expect("status --json")
}

fn metrics(l: &Launcher) -> String {
    let line = l.wait_for("serving /metrics, /healthz and /readyz on http://", secs(20));
    let addr: SocketAddr = line.rsplit("http://").next().unwrap().trim().parse().unwrap();
    let mut s = TcpStream::connect_timeout(&addr, secs(5)).unwrap();
    s.set_read_timeout(Some(secs(10))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text
}

/// A worker poisoned by `path` is replaced once it has been stalled for the timeout (not
/// before), its replacement takes over, and it is SIGKILLed after the grace; steady load on
/// new connections fails nothing meanwhile; status and /metrics count a `hung` restart.
fn replaced_when_poisoned_by(path: &str) {
    let Setup { l, control, _dir } = launch();
    let port = l.port();
    let load = Load::start(port, 3);
    l.poll_answers(secs(10), |r| r.len() >= 10);
    let sent = Instant::now();
    let _poisoned = poison(port, path);
    let (slot, victim) = poisoned(&l, path);
    let victim_proc = Proc::of(victim);
    let w = format!("(pid {victim}, gen 1)");
    let first_stall = if path == "/deadlock" { "is not running" } else { "has not emptied its queue" };
    let stalled_at = arrived(&l, &format!("{w} {first_stall}"));
    let replacing = arrived(&l, &format!("{w} has been stalled for "));
    let took_over = arrived(&l, &format!("took over slot {slot}"));
    let killed = arrived(&l, &format!("{w} killed by SIGKILL"));
    assert!(l.count(&format!("{w} still running after 1s; sending SIGKILL")) == 1, "{}", l.log());
    let line = l.wait_for(&format!("{w} has been stalled for "), secs(1));
    let why = if path == "/deadlock" { "(no CPU, " } else { "CPU, its queue not drained while others were, " };
    assert!(line.contains(why) && line.ends_with(" waiting); replacing it"), "{line}");
    // Not before the timeout from its first stall (the launcher's own figure, and the log's
    // order), and within it plus what it takes to notice the stall.
    let figure: f64 = line.split("stalled for ").nth(1).unwrap().split('s').next().unwrap().parse().unwrap();
    assert!(figure >= TIMEOUT.as_secs_f64(), "{line}");
    assert!(replacing >= stalled_at, "replaced before it was seen stalled:\n{}", l.log());
    assert!(replacing.duration_since(sent) <= TIMEOUT + MARGIN, "replaced {:?} after the poison", replacing - sent);
    let start = took_over.duration_since(replacing);
    eprintln!(
        "{path}: stalled at ~{:?}, replacing at {:?}, replacement ready {start:?} later, killed {:?} after that",
        stalled_at.saturating_duration_since(sent),
        replacing - sent,
        killed.duration_since(took_over)
    );
    // Gone after the grace (the stop signal cannot stop it: SIGKILL), not before.
    assert!(killed.duration_since(took_over) >= GRACE, "killed {:?} after the take-over", killed - took_over);
    assert!(killed.duration_since(took_over) <= GRACE + MARGIN, "killed {:?} after", killed - took_over);
    assert!(wait_until(secs(5), || !victim_proc.alive()), "the hung worker {victim} is still there");
    // The new worker serves the slot.
    let answers = l.poll_answers(secs(20), |r| r.iter().any(|r| r.slot == slot.to_string() && r.pid != victim));
    assert!(answers.iter().any(|r| r.slot == slot.to_string() && r.pid != victim));
    let (ok, failures) = load.finish();
    assert!(failures.is_empty(), "{} of {} failed around the hang: {failures:?}", failures.len(), ok);
    assert!(ok > 50, "only {ok} requests");
    // Counted as cause `hung`: status --json and /metrics.
    let st = status(&control);
    let rows = st.get("workers").and_then(json::Value::as_array).unwrap().to_vec();
    let row = rows.iter().find(|r| r.get("slot").and_then(json::Value::as_u64) == Some(slot as u64)).unwrap();
    let causes = row.get("restarts_by_cause").unwrap().to_string();
    assert_eq!(causes, r#"{"hung":1}"#, "{st}");
    let m = metrics(&l);
    let sample = format!("reuse_launch_restarts_total{{slot=\"{slot}\",cause=\"hung\"}} 1");
    assert!(m.lines().any(|x| x == sample), "no {sample} in\n{m}");
}

#[test]
fn a_worker_that_deadlocks_on_one_request_is_replaced() {
    replaced_when_poisoned_by("/deadlock");
}

#[test]
fn a_worker_that_spins_forever_on_one_request_is_replaced() {
    replaced_when_poisoned_by("/spin");
}

/// SIGSTOP for twice the timeout: the worker is routed around (frozen), never replaced, and
/// serves again after SIGCONT.
#[test]
fn a_stopped_worker_is_never_replaced_for_hanging() {
    let Setup { l, control: _, _dir } = launch();
    let port = l.port();
    let load = Load::start(port, 3);
    l.poll_answers(secs(10), |r| r.len() >= 10);
    let victim = l.started().iter().find(|w| w.slot == 0).unwrap().pid;
    signal(victim, Signal::SIGSTOP);
    let stopped = Instant::now();
    wait_stalled(&l, victim);
    // The scenario itself: stopped for twice the timeout.
    std::thread::sleep((stopped + 2 * TIMEOUT).saturating_duration_since(Instant::now()));
    // Still routed around, and never replaced for hanging.
    let s = status_of(&l);
    assert_eq!(state_of_pid(&s, victim).as_deref(), Some("stalled"), "{s}\n{}", l.log());
    assert_eq!(restarts_by(&s, 0, "hung"), 0, "{s}\n{}", l.log());
    assert_eq!(l.started().len(), 2, "a replacement was started:\n{}", l.log());
    signal(victim, Signal::SIGCONT);
    let answers = l.poll_answers(secs(20), |r| r.iter().any(|r| r.pid == victim));
    assert!(answers.iter().any(|r| r.pid == victim));
    let (ok, failures) = load.finish();
    assert!(failures.is_empty(), "{} of {} failed around the stop: {failures:?}", failures.len(), ok);
    // The log, not restarts_by_cause: the count moves only once a replacement took over, the
    // warning comes when the replacement starts.
    assert_eq!(l.count("has been stalled for"), 0, "{}", l.log());
}
