//! Integration tests of the control socket and the client subcommands (issue 9, parts 1-2):
//! `status` after a crash and a roll, `scale` under load, TTIN/TTOU, the socket's permissions
//! and removal, a refused peer, malformed and never-finished requests, choosing the launcher.
//!
//! Tests that rely on the default socket directory run launcher and client as a uid of their
//! own (setpriv), so that `/tmp/reuse-launch-<uid>` holds only their launchers while the rest
//! of the suite runs in parallel.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::common::*;

/// The control protocol's JSON as the tests read it: serde_json's value (the launcher's own
/// types are derived; the tests look answers up member by member).
pub(crate) mod json {
    pub use serde_json::Value;

    /// Parse one JSON text.
    pub fn parse(text: &str) -> Result<Value, serde_json::Error> {
        serde_json::from_str(text)
    }
}

use json::Value;

/// What a client subcommand did.
#[derive(Debug)]
struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Run `reuse-launch ARGS` (a client subcommand), as root or, with `uid`, as that user.
fn client_as(uid: Option<u32>, args: &[&str]) -> Out {
    let mut cmd = match uid {
        Some(uid) => {
            let mut c = Command::new("setpriv");
            let id = uid.to_string();
            c.args(["--reuid", &id, "--regid", &id, "--clear-groups", BIN]);
            c
        }
        None => Command::new(BIN),
    };
    cmd.args(args).env_remove("XDG_RUNTIME_DIR").env_remove("REUSE_LAUNCH_CONTROL").stdin(Stdio::null());
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn client(args: &[&str]) -> Out {
    client_as(None, args)
}

/// `status --json` through `pick` (`--control PATH`, `--pid N`), parsed; None if it failed.
fn status_as(uid: Option<u32>, pick: &[&str]) -> Option<Value> {
    let out = client_as(uid, &[&["status", "--json"], pick].concat());
    (out.code == 0).then(|| json::parse(out.stdout.trim()).unwrap_or_else(|e| panic!("{e}: {}", out.stdout)))
}

pub(crate) fn status(pick: &[&str]) -> Option<Value> {
    status_as(None, pick)
}

/// Poll `status` until `cond` holds; returns that status, or panics with the last one seen.
pub(crate) fn wait_status(
    l: &Launcher,
    pick: &[&str],
    timeout: Duration,
    what: &str,
    cond: impl Fn(&Value) -> bool,
) -> Value {
    let mut last = None;
    let ok = wait_until(timeout, || {
        last = status(pick);
        last.as_ref().is_some_and(&cond)
    });
    assert!(ok, "no status where {what} within {timeout:?}; last: {last:?}\nlog:\n{}", l.log());
    last.unwrap()
}

pub(crate) fn rows(s: &Value) -> Vec<Value> {
    s.get("workers").and_then(Value::as_array).expect("workers").to_vec()
}

pub(crate) fn num(v: &Value, key: &str) -> u64 {
    v.get(key).and_then(Value::as_u64).unwrap_or_else(|| panic!("no number {key} in {v}"))
}

pub(crate) fn text<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or_else(|| panic!("no string {key} in {v}"))
}

/// Exactly `n` rows, each a ready worker of generation `gen`.
fn all_ready(s: &Value, n: usize, gen: u64) -> bool {
    let r = rows(s);
    r.len() == n
        && r.iter().all(|w| w.get("state").and_then(Value::as_str) == Some("ready") && num(w, "generation") == gen)
}

/// A launcher of 2 python workers with its control socket in a temporary directory.
fn launch_with_socket(workers: usize) -> (Launcher, TempPath, String) {
    let dir = TempPath::dir("control");
    let path = dir.join("c.sock").to_str().unwrap().to_string();
    let l = Launch::new().workers(workers).ready_delay("300ms").flag("--control", &path).py(&[]).start();
    l.wait_for(&format!("control socket: {path}"), secs(10));
    l.wait_for(&format!("all {workers} workers ready"), secs(30));
    (l, dir, path)
}

#[test]
fn status_shows_pids_generations_and_restarts_after_a_crash_and_a_roll() {
    let (l, _dir, path) = launch_with_socket(2);
    let pick = ["--control", path.as_str()];
    let s = wait_status(&l, &pick, secs(10), "2 ready gen-1 workers", |s| all_ready(s, 2, 1));
    assert_eq!(num(&s, "pid"), l.pid() as u64);
    assert_eq!((text(&s, "mode"), num(&s, "generation"), num(&s, "desired")), ("reuseport", 1, 2));
    assert_eq!(text(&s, "control"), path);
    for (slot, w) in rows(&s).iter().enumerate() {
        assert_eq!((num(w, "slot"), num(w, "pid")), (slot as u64, l.latest_pid(slot) as u64), "{w}");
        assert_eq!(num(w, "restarts"), 0);
        assert!(w.get("last_exit").unwrap().is_null());
        assert!(num(w, "rss_bytes") > 1 << 20, "a python worker's RSS: {w}");
        assert!(w.get("cpu_percent").and_then(Value::as_f64).is_some(), "{w}");
        assert_eq!(num(w, "queue"), 0);
        assert!(num(w, "queue_max") > 0, "{w}");
    }

    // A crash: slot 0's worker SIGKILLed is replaced, and status says so.
    let old = l.latest_pid(0);
    signal(old, Signal::SIGKILL);
    let s = wait_status(&l, &pick, secs(20), "slot 0 replaced after the kill", |s| {
        let r = rows(s);
        all_ready(s, 2, 1) && num(&r[0], "pid") != old as u64 && num(&r[0], "restarts") == 1
    });
    let r = rows(&s);
    assert_eq!(text(&r[0], "last_exit"), "killed by SIGKILL");
    assert_eq!(num(&r[0], "pid"), l.latest_pid(0) as u64);
    assert_eq!(num(&r[1], "restarts"), 0);
    let before: Vec<u64> = r.iter().map(|w| num(w, "pid")).collect();

    // The table shows the same.
    let table = client(&["status", "--control", &path]);
    assert_eq!(table.code, 0, "{table:?}");
    let lines: Vec<&str> = table.stdout.lines().collect();
    assert!(lines[0].starts_with(&format!("launcher {}  reuseport mode  127.0.0.1:", l.pid())), "{}", table.stdout);
    assert!(lines[0].ends_with("gen 1  2/2 workers ready"), "{}", table.stdout);
    assert!(lines[1].starts_with("slot  pid") && lines[1].ends_with("queue"), "{}", table.stdout);
    assert!(
        lines[2].contains("killed by SIGKILL") && lines[2].contains(&format!(" {} ", before[0])),
        "{}",
        table.stdout
    );

    // A roll: generation 2, new pids on both slots.
    let roll = client(&["roll", "--control", &path]);
    assert_eq!(roll.code, 0, "{roll:?}");
    assert!(roll.stdout.contains("rolling restart to generation 2"), "{roll:?}");
    let s = wait_status(&l, &pick, secs(30), "the roll to gen 2 done", |s| {
        all_ready(s, 2, 2) && s.get("roll").is_some_and(Value::is_null)
    });
    assert_eq!(num(&s, "generation"), 2);
    for (slot, w) in rows(&s).iter().enumerate() {
        let pid = num(w, "pid");
        assert!(!before.contains(&pid), "slot {slot} kept pid {pid} across the roll");
        assert_eq!(pid, l.latest_pid(slot) as u64);
    }
    l.wait_for("roll gen 2 done", secs(10));
}

#[test]
fn scale_2_4_1_3_under_load_fails_no_request() {
    let (l, _dir, path) = launch_with_socket(2);
    let pick = ["--control", path.as_str()];
    let load = Load::start(l.port(), 3);
    for (arg, n) in [("4", 4), ("-3", 1), ("+2", 3)] {
        let out = client(&["scale", arg, "--control", &path]);
        assert_eq!(out.code, 0, "scale {arg}: {out:?}");
        assert!(out.stdout.contains(&format!("scaling to {n} workers")), "{out:?}");
        wait_status(&l, &pick, secs(40), &format!("{n} ready workers after scale {arg}"), |s| {
            num(s, "desired") == n as u64 && num(s, "ready") == n as u64 && all_ready(s, n, 1)
        });
    }
    let (ok, failures) = load.finish();
    assert!(failures.is_empty(), "{} of {} requests failed: {failures:?}\n{}", failures.len(), ok, l.log());
    assert!(ok > 20, "only {ok} requests were made");
    // Refused: below one worker, and a malformed number (usage).
    let out = client(&["scale", "-5", "--control", &path]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("at least 1 must run"), "{out:?}");
    assert_eq!(client(&["scale", "many", "--control", &path]).code, 2);
}

#[test]
fn ttin_and_ttou_change_desired() {
    let (l, _dir, path) = launch_with_socket(2);
    let pick = ["--control", path.as_str()];
    l.signal(Signal::SIGTTIN);
    wait_status(&l, &pick, secs(30), "3 ready after TTIN", |s| num(s, "desired") == 3 && all_ready(s, 3, 1));
    l.signal(Signal::SIGTTOU);
    l.wait_for("scaling from 3 to 2 workers", secs(10));
    l.signal(Signal::SIGTTOU);
    wait_status(&l, &pick, secs(30), "1 ready after TTOU twice", |s| num(s, "desired") == 1 && all_ready(s, 1, 1));
}

/// Run the launcher as `uid` (the default socket directory is then `/tmp/reuse-launch-<uid>`).
fn launch_as(uid: u32) -> Launcher {
    let id = uid.to_string();
    let l = Launch::new()
        .via(&["setpriv", "--reuid", &id, "--regid", &id, "--clear-groups"])
        .workers(1)
        .ready_delay("100ms")
        .env("XDG_RUNTIME_DIR", "")
        .cmd(&["sleep", "1000"])
        .start();
    l.wait_for("all 1 workers ready", secs(20));
    l
}

#[test]
fn the_socket_is_private_and_removed_on_exit_and_on_a_fatal_error() {
    // The default place for a user without XDG_RUNTIME_DIR.
    let uid = 4242;
    let mut l = launch_as(uid);
    let dir = format!("/tmp/reuse-launch-{uid}");
    let path = format!("{dir}/{}.sock", l.pid());
    l.wait_for(&format!("control socket: {path}"), secs(10));
    let d = std::fs::symlink_metadata(&dir).unwrap();
    assert_eq!((d.mode() & 0o7777, d.uid()), (0o700, uid), "the directory");
    let s = std::fs::symlink_metadata(&path).unwrap();
    assert_eq!((s.mode() & 0o7777, s.uid()), (0o600, uid), "the socket");
    // `stop` waits until the launcher has exited; the socket goes with it.
    let out = client_as(Some(uid), &["stop"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains(&format!("launcher {}: stopped", l.pid())), "{out:?}");
    assert_eq!(l.exit_code(secs(10)), 0);
    assert!(!std::path::Path::new(&path).exists(), "{path} is left after a clean stop");

    // TERM, and a fatal error (every worker fails at start), with --control.
    let tmp = TempPath::dir("control-exit");
    let path = tmp.join("c.sock");
    let mut l = Launch::new().workers(1).ready_delay("100ms").flag("--control", path.to_str().unwrap()).py(&[]).start();
    l.wait_for("all 1 workers ready", secs(20));
    assert!(path.exists());
    l.signal(Signal::SIGTERM);
    assert_eq!(l.exit_code(secs(20)), 0);
    assert!(!path.exists(), "left after TERM");
    let mut l = Launch::new()
        .workers(1)
        .flag("--max-start-failures", "1")
        .flag("--control", path.to_str().unwrap())
        .cmd(&["sh", "-c", "exit 3"])
        .spawn();
    l.wait_for("control socket:", secs(10));
    assert_eq!(l.exit_code(secs(20)), 1, "{}", l.log());
    assert!(!path.exists(), "left after a fatal error");
}

#[test]
fn a_client_of_another_uid_is_refused() {
    if !nix::unistd::geteuid().is_root() {
        panic!("this test needs root (CI runs as root): it runs the client as nobody");
    }
    let (l, dir, path) = launch_with_socket(1);
    // The socket is 0600: nobody cannot even connect.
    let out = client_as(Some(65534), &["status", "--control", &path]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("ermission denied"), "{out:?}");
    // With the file opened up, the launcher's own check (SO_PEERCRED) refuses.
    std::fs::set_permissions(&*dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = client_as(Some(65534), &["roll", "--control", &path]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("refused: uid 65534"), "{out:?}");
    l.wait_for("control socket: refused a client: uid 65534", secs(10));
    assert_eq!(l.count("rolling restart"), 0, "a refused roll was carried out:\n{}", l.log());
    // Root and the launcher's own uid (root here) still get answers.
    assert!(status(&["--control", &path]).is_some());
}

/// Send `line` on a new connection and read one response line.
fn raw(path: &str, bytes: &[u8]) -> (UnixStream, Value) {
    let mut s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(secs(20))).unwrap();
    s.write_all(bytes).unwrap();
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).unwrap();
    (s, json::parse(line.trim()).unwrap_or_else(|e| panic!("{e}: {line:?}")))
}

#[test]
fn malformed_huge_and_endless_requests_never_get_in_the_way() {
    let (l, _dir, path) = launch_with_socket(2);
    // Garbage: an error, and the same connection still serves.
    let (mut s, bad) = raw(&path, b"this is not json\n");
    assert_eq!(bad.get("ok"), Some(&Value::Bool(false)));
    assert!(text(&bad, "error").starts_with("invalid request: invalid JSON"), "{bad}");
    s.write_all(b"{\"cmd\":\"status\",\"id\":\"x1\"}\n").unwrap();
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).unwrap();
    let ok = json::parse(line.trim()).unwrap();
    assert_eq!((ok.get("ok"), text(&ok, "id")), (Some(&Value::Bool(true)), "x1"), "{ok}");
    let (_, bad) = raw(&path, b"{\"cmd\":\"reboot\"}\n");
    assert!(text(&bad, "error").contains("unknown cmd 'reboot'"), "{bad}");
    let (_, bad) = raw(&path, b"[1,2]\n");
    assert!(text(&bad, "error").contains("expected a JSON object"), "{bad}");
    // Huge: 100 KB without a newline is refused and the connection closed.
    let (mut s, bad) = raw(&path, &vec![b'{'; 100 * 1024]);
    assert!(text(&bad, "error").contains("longer than 65536 bytes"), "{bad}");
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);

    // Endless: 5 clients that send half a request and never finish it.
    let mut stuck: Vec<UnixStream> = (0..5)
        .map(|_| {
            let mut s = UnixStream::connect(&path).unwrap();
            s.write_all(b"{\"cmd\":\"sta").unwrap();
            s
        })
        .collect();
    // Meanwhile others get answers, and a roll happens.
    let started = std::time::Instant::now();
    assert!(status(&["--control", &path]).is_some());
    assert_eq!(client(&["roll", "--control", &path]).code, 0);
    l.wait_for("roll gen 2 done", secs(30));
    wait_status(&l, &["--control", &path], secs(10), "2 gen-2 workers", |s| all_ready(s, 2, 2));
    // The stuck ones are told and dropped after the request timeout (10 s).
    for s in &mut stuck {
        s.set_read_timeout(Some(secs(30))).unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        assert!(answer.contains("no complete request line within 10s"), "{answer:?}");
    }
    eprintln!("stuck clients dropped after {:?}", started.elapsed());
    assert!(status(&["--control", &path]).is_some());
}

#[test]
fn pid_and_control_pick_among_several_launchers() {
    let uid = 4243;
    let a = launch_as(uid);
    let b = launch_as(uid);
    let out = client_as(Some(uid), &["status"]);
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("2 launchers are running"), "{out:?}");
    for l in [&a, &b] {
        assert!(out.stderr.contains(&format!("pid {}: /tmp/reuse-launch-{uid}/{}.sock", l.pid(), l.pid())), "{out:?}");
    }
    let by_pid = status_as(Some(uid), &["--pid", &a.pid().to_string()]).expect("status --pid");
    assert_eq!(num(&by_pid, "pid"), a.pid() as u64);
    let b_path = format!("/tmp/reuse-launch-{uid}/{}.sock", b.pid());
    let by_path = status_as(Some(uid), &["--control", &b_path]).expect("status --control");
    assert_eq!(num(&by_path, "pid"), b.pid() as u64);
    // Root may talk to another user's launcher by path.
    assert_eq!(status(&["--control", &b_path]).map(|s| num(&s, "pid")), Some(b.pid() as u64));
    // One left: it is the one.
    let out = client_as(Some(uid), &["stop", "--pid", &a.pid().to_string()]);
    assert_eq!(out.code, 0, "{out:?}");
    let only = status_as(Some(uid), &[]).expect("status of the only launcher");
    assert_eq!(num(&only, "pid"), b.pid() as u64);
}

#[test]
fn no_launcher_is_exit_code_3() {
    let uid = 4244;
    let out = client_as(Some(uid), &["status"]);
    assert_eq!(out.code, 3, "{out:?}");
    assert!(out.stderr.contains("no running launcher found"), "{out:?}");
    assert_eq!(client_as(Some(uid), &["roll", "--pid", "999999"]).code, 3);
    assert_eq!(client(&["stop", "--control", "/nonexistent/reuse-launch.sock"]).code, 3);
    assert_eq!(client(&["status", "--bogus"]).code, 2);
}

/// The pids in a status object's worker rows (a slot in backoff has none).
fn worker_pids(s: &Value) -> BTreeSet<u64> {
    rows(s).iter().filter_map(|w| w.get("pid").and_then(Value::as_u64)).collect()
}

/// Issue 10: `reuse-launch reexec` upgrades the launcher in place. Ten in a row under continuous
/// new-connection load: no request fails, the pid and every worker stay; a roll and a crash
/// respawn work afterwards.
#[test]
fn ten_reexecs_under_load_lose_nothing_and_keep_every_worker() {
    let sock = TempPath::new("reexec.sock");
    let l = Launch::new().workers(3).ready("auto").flag("--control", sock.str()).py(&[]).start();
    l.wait_for("all 3 workers ready", secs(20));
    let pick = ["--control", sock.str()];
    let before = status(&pick).unwrap();
    let load = Load::start(l.port(), 4);
    for i in 0..10 {
        let out = client(&["reexec", "--control", sock.str()]);
        assert_eq!(out.code, 0, "reexec {i}: {out:?}\n{}", l.log());
        assert!(out.stdout.contains("every worker kept"), "{out:?}");
    }
    let after = status(&pick).unwrap();
    let (ok, failures) = load.finish();
    assert!(failures.is_empty(), "{} of {} failed across 10 reexecs: {failures:?}", failures.len(), ok);
    assert_eq!(after.get("pid"), before.get("pid"));
    assert_ne!(after.get("image"), before.get("image"));
    assert_eq!(worker_pids(&after), worker_pids(&before), "the workers changed");
    assert_eq!(l.count("resumed after reexec: 3 workers in 3 slots"), 10, "{}", l.log());
    let launcher = after.get("pid").and_then(Value::as_u64).unwrap() as i32;
    let sentinels = children_of(launcher).into_iter().filter(|c| is_sentinel(c.pid)).count();
    assert_eq!(sentinels, 1, "the sentinel is handed over, not started again");
    // Still a launcher: a roll, then a crash respawn.
    assert_eq!(client(&["roll", "--control", sock.str()]).code, 0);
    l.wait_for("roll gen 2 done", secs(30));
    let victim = *worker_pids(&status(&pick).unwrap()).iter().next().unwrap() as i32;
    signal(victim, Signal::SIGKILL);
    wait_status(&l, &pick, secs(20), "the killed worker replaced and all ready", |s| {
        !worker_pids(s).contains(&(victim as u64)) && s.get("ready").and_then(Value::as_u64) == Some(3)
    });
}

/// A reexec into a binary that cannot start is refused and changes nothing; the binary
/// installed at the launcher's path afterwards takes over.
#[test]
fn a_reexec_into_a_broken_binary_keeps_everything_running() {
    let dir = TempPath::dir("reexec-bin");
    let path = format!("{}/reuse-launch", dir.str());
    std::fs::copy(BIN, &path).unwrap();
    let sock = TempPath::new("reexec2.sock");
    let l = Launch::new().binary(&path).workers(2).ready("auto").flag("--control", sock.str()).py(&[]).start();
    l.wait_for("all 2 workers ready", secs(20));
    let pick = ["--control", sock.str()];
    let before = status(&pick).unwrap();
    // A broken "new version" at the launcher's path.
    std::fs::remove_file(&path).unwrap();
    std::fs::write(&path, "#!/bin/sh\necho 'broken build' >&2\nexit 1\n").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = client(&["reexec", "--control", sock.str()]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("--version failed") && out.stderr.contains("broken build"), "{out:?}");
    let same = status(&pick).unwrap();
    assert_eq!(same.get("image"), before.get("image"), "the old image runs on");
    assert_eq!(worker_pids(&same), worker_pids(&before));
    assert_eq!(get(l.port()).unwrap().slot.len(), 1, "still serving");
    // The fixed binary installed at the same path takes over.
    std::fs::remove_file(&path).unwrap();
    std::fs::copy(BIN, &path).unwrap();
    let out = client(&["reexec", "--control", sock.str()]);
    assert_eq!(out.code, 0, "{out:?}\n{}", l.log());
    assert!(out.stdout.contains(&path), "{out:?}");
}

/// The commit before the reexec hand-over became a JSON document (issue 16): main's HEAD
/// when that change was begun. Its launcher writes the positional text (format 1).
const BEFORE_JSON_STATE: &str = "3b7ca042e05c0c06031671aba2f0acd39bbc5ac2";

/// Run `cmd`; panic naming `what` and its output unless it succeeds.
fn must(cmd: &mut Command, what: &str) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: cannot run {cmd:?}: {e}"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{what}: {cmd:?} failed ({}): {err}", out.status);
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The launcher of [`BEFORE_JSON_STATE`], built from `git archive` in target/tmp/old-launcher
/// (target/tmp/old-target, kept across runs). Without the git history there is no such binary:
/// the test fails saying so.
fn old_launcher() -> String {
    let root = env!("CARGO_MANIFEST_DIR");
    let commit = Command::new("git")
        .args(["-C", root, "rev-parse", "--verify", "--quiet", &format!("{BEFORE_JSON_STATE}^{{commit}}")])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    let Some(commit) = commit else {
        panic!("commit {BEFORE_JSON_STATE} (the launcher before the JSON state) is not in {root}'s git history: cannot build the old binary this test upgrades from");
    };
    let (src, target) = (format!("{root}/target/tmp/old-launcher"), format!("{root}/target/tmp/old-target"));
    let stamp = format!("{src}/.commit");
    if std::fs::read_to_string(&stamp).ok().as_deref() != Some(commit.as_str()) {
        let _ = std::fs::remove_dir_all(&src);
        std::fs::create_dir_all(&src).unwrap();
        let tar = format!("{src}.tar");
        must(Command::new("git").args(["-C", root, "archive", "-o", &tar, &commit]), "archiving the old commit");
        must(Command::new("tar").args(["-x", "-f", &tar, "-C", &src]), "extracting the old commit");
        std::fs::remove_file(&tar).unwrap();
        std::fs::write(&stamp, &commit).unwrap();
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest = format!("{src}/Cargo.toml");
    must(
        Command::new(cargo)
            .args(["build", "--bin", "reuse-launch", "--manifest-path", &manifest])
            .env("CARGO_TARGET_DIR", &target),
        "building the launcher of the commit before the JSON state",
    );
    format!("{target}/debug/reuse-launch")
}

/// Issue 16: the binary built before the hand-over became a JSON document hands over in its
/// positional text; this one reads it and keeps every worker, its restarts, and serving. And
/// the way back, into that binary, which cannot read the document, is refused before the exec.
#[test]
fn a_reexec_from_the_binary_before_the_json_state_keeps_every_worker() {
    let old = old_launcher();
    let dir = TempPath::dir("reexec-upgrade");
    let path = format!("{}/reuse-launch", dir.str());
    std::fs::copy(&old, &path).unwrap();
    let sock = TempPath::new("reexec-upgrade.sock");
    let pick = ["--control", sock.str()];
    let l = Launch::new().binary(&path).workers(3).ready("auto").flag("--control", sock.str()).py(&[]).start();
    l.wait_for("all 3 workers ready", secs(20));
    // A crash, so that a slot has a restart and a last failure to carry over.
    let victim = *worker_pids(&status(&pick).unwrap()).iter().next().unwrap() as i32;
    signal(victim, Signal::SIGKILL);
    let before = wait_status(&l, &pick, secs(20), "the killed worker replaced and all ready", |s| {
        !worker_pids(s).contains(&(victim as u64)) && s.get("ready").and_then(Value::as_u64) == Some(3)
    });
    let launcher = num(&before, "pid") as i32;
    let exe = || std::fs::read_link(format!("/proc/{launcher}/exe")).unwrap().display().to_string();
    // The new version installed at the launcher's path (a new file: the old one runs on).
    std::fs::remove_file(&path).unwrap();
    std::fs::copy(BIN, &path).unwrap();
    assert_eq!(exe(), format!("{path} (deleted)"), "the old binary runs until the reexec");
    let load = Load::start(l.port(), 4);
    let out = client(&["reexec", "--control", sock.str()]);
    assert_eq!(out.code, 0, "{out:?}\n{}", l.log());
    assert!(out.stdout.contains("every worker kept"), "{out:?}");
    l.wait_for("resumed after reexec: 3 workers in 3 slots", secs(10));
    let after = status(&pick).expect("status answers from the new binary");
    let (ok, failures) = load.finish();
    assert!(ok > 0 && failures.is_empty(), "{} of {ok} failed across the upgrade: {failures:?}", failures.len());
    assert_eq!(exe(), path, "the new binary runs");
    assert_eq!(num(&after, "pid") as i32, launcher);
    assert_ne!(after.get("image"), before.get("image"));
    assert_eq!(worker_pids(&after), worker_pids(&before), "the workers changed");
    let restarts = |s: &Value| rows(s).iter().map(|r| num(r, "restarts")).collect::<Vec<_>>();
    assert_eq!(restarts(&after), restarts(&before), "the restart counts are carried over");
    assert_eq!(restarts(&after).iter().sum::<u64>(), 1);
    assert_eq!(get(l.port()).unwrap().gen, "1");
    // The new image is a launcher: a roll.
    assert_eq!(client(&["roll", "--control", sock.str()]).code, 0);
    l.wait_for("roll gen 2 done", secs(30));
    // Back to the old binary: it could not read the new image's document, so the reexec is
    // refused before the exec, and everything runs on.
    let rolled = worker_pids(&wait_status(&l, &pick, secs(20), "the old workers gone after the roll", |s| {
        worker_pids(s).len() == 3
    }));
    std::fs::remove_file(&path).unwrap();
    std::fs::copy(&old, &path).unwrap();
    let out = client(&["reexec", "--control", sock.str()]);
    assert_eq!(out.code, 1, "a reexec into the old binary is refused: {out:?}");
    assert!(out.stderr.contains("cannot read this launcher's hand-over"), "{out:?}");
    let s = status(&pick).expect("the launcher runs on after the refusal");
    assert_eq!(num(&s, "pid") as i32, launcher);
    assert_eq!(worker_pids(&s), rolled, "the workers changed");
    assert_eq!(get(l.port()).unwrap().gen, "2");
}

/// Found by scripts/chaos: a reexec after a scale-down panicked in the new image (it sized its
/// slots from -n, not from the sockets it was handed) and took the workers with it.
#[test]
fn reexec_after_a_scale_down_keeps_every_worker() {
    let sock = TempPath::new("reexec3.sock");
    let l = Launch::new().workers(3).ready("auto").flag("--control", sock.str()).py(&[]).start();
    l.wait_for("all 3 workers ready", secs(20));
    assert_eq!(client(&["scale", "2", "--control", sock.str()]).code, 0);
    l.wait_for("worker 2 removed", secs(30));
    let out = client(&["reexec", "--control", sock.str()]);
    assert_eq!(out.code, 0, "{out:?}\n{}", l.log());
    let s = status(&["--control", sock.str()]).unwrap();
    assert_eq!(s.get("desired").and_then(Value::as_u64), Some(2), "{s:?}");
    assert_eq!(s.get("workers").and_then(Value::as_array).map(|w| w.len()), Some(2), "{s:?}");
    l.wait_for("resumed after reexec: 2 workers in 2 slots", secs(5));
    // And it scales up again from there.
    assert_eq!(client(&["scale", "3", "--control", sock.str()]).code, 0);
    l.wait_for_nth("all 3 workers ready", 2, secs(30));
}

/// What main (3b7ca04, before the protocol went through serde_json) answered, recorded by
/// `src/control/testdata/capture.py`; `{pid}` stands for the launcher's pid.
const RECORDED_PROTOCOL: &str = include_str!("../../src/control/testdata/protocol.txt");
const RECORDED_CLIENT: &str = include_str!("../../src/control/testdata/client.txt");

/// The one recorded answer that differs now, and why: a line that ends inside an object is
/// named with serde_json's words (the old parser said what it expected next).
const CHANGED: [(&str, &str); 1] =
    [("invalid JSON at byte 15: expected ',' or '}'", "invalid JSON at byte 15: EOF while parsing an object")];

/// A request as recorded: a Python bytes literal (`b'{"cmd":"roll"}\n'`).
fn unrepr(literal: &str) -> Vec<u8> {
    let body = literal.strip_prefix("b'").and_then(|s| s.strip_suffix('\'')).expect("a bytes literal");
    let mut out = Vec::new();
    let mut chars = body.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.extend_from_slice(c.to_string().as_bytes());
            continue;
        }
        match chars.next() {
            Some('n') => out.push(b'\n'),
            Some('x') => {
                let hex: String = chars.by_ref().take(2).collect();
                out.push(u8::from_str_radix(&hex, 16).unwrap());
            }
            Some(c) => out.extend_from_slice(c.to_string().as_bytes()),
            None => panic!("a lone backslash in {literal}"),
        }
    }
    out
}

/// Send `request` on a new connection (shutting down the writing side after a last line
/// without newline) and read `n` answer lines, exactly as they come.
fn exchange(path: &str, request: &[u8], n: usize) -> String {
    let mut s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(secs(20))).unwrap();
    s.write_all(request).unwrap();
    if !request.ends_with(b"\n") {
        s.shutdown(std::net::Shutdown::Write).unwrap();
    }
    let mut r = BufReader::new(s);
    let mut got = String::new();
    for _ in 0..n {
        r.read_line(&mut got).unwrap();
    }
    got
}

/// The README's "### Protocol" requests and every error case the tests use, in the order and
/// the scenario capture.py recorded them (2 workers): each answer byte for byte, id echoes,
/// member order and escapes included.
#[test]
fn the_protocol_answers_byte_for_byte_as_main_recorded_them() {
    let (mut l, _dir, path) = launch_with_socket(2);
    let pid = l.pid().to_string();
    let mut cases: Vec<(String, String)> = Vec::new();
    for line in RECORDED_PROTOCOL.lines() {
        if let Some(request) = line.strip_prefix("> ") {
            cases.push((request.to_string(), String::new()));
        } else {
            let answer = line.strip_prefix("< ").expect("an answer line");
            let answer = CHANGED.iter().fold(answer.to_string(), |a, (old, new)| a.replace(old, new));
            cases.last_mut().expect("a request first").1 += &format!("{}\n", answer.replace("{pid}", &pid));
        }
    }
    assert_eq!(cases.len(), 20, "the recording");
    for (request, expected) in &cases {
        if request.contains(r#""stop""#) {
            l.wait_for("roll gen 3 done", secs(60));
        }
        let got = exchange(&path, &unrepr(request), expected.lines().count());
        assert_eq!(&got, expected, "the answer to {request}");
    }
    assert_eq!(l.exit_code(secs(30)), 0);
}

/// The members of a JSON object line in the order written, nested ones included (`"name":`
/// after `{` or `,`).
fn member_order(line: &str) -> Vec<&str> {
    let b = line.as_bytes();
    let mut names = Vec::new();
    for i in 1..b.len() {
        if b[i] == b'"' && matches!(b[i - 1], b'{' | b',') {
            let end = i + 1 + line[i + 1..].find('"').unwrap();
            if b.get(end + 1) == Some(&b':') {
                names.push(&line[i + 1..end]);
            }
        }
    }
    names
}

/// The client subcommands print what main printed (recorded the same way); `status --json`
/// has the recorded members in the recorded order, and the table the recorded header.
#[test]
fn the_client_prints_what_main_printed() {
    let (mut l, _dir, path) = launch_with_socket(2);
    let pid = l.pid().to_string();
    for block in RECORDED_CLIENT.split("$ reuse-launch ").skip(1) {
        let mut lines = block.lines();
        let args: Vec<&str> = lines.next().unwrap().split(' ').collect();
        let code: i32 = lines.next().unwrap().strip_prefix("? ").unwrap().parse().unwrap();
        let (mut stdout, mut stderr) = (String::new(), String::new());
        for line in lines {
            let (to, text) = line.split_at(2);
            let text = format!("{}\n", text.replace("{pid}", &pid).replace("{control}", &path));
            if to == "1 " {
                stdout += &text
            } else {
                stderr += &text
            }
        }
        if args[0] == "status" {
            l.wait_for("roll gen 2 done", secs(60));
        }
        let out = client(&[&args[..], &["--control", &path]].concat());
        assert_eq!(out.code, code, "{args:?}: {out:?}");
        match args[..] {
            ["status", "--json"] => {
                let (got, want) = (out.stdout.trim(), stdout.trim());
                assert_eq!(
                    member_order(&got[..got.find("\"workers\"").unwrap()]),
                    member_order(&want[..want.find("\"workers\"").unwrap()]),
                    "{got}"
                );
                fn row(s: &str) -> Vec<&str> {
                    let rows = &s[s.find("\"workers\":[").unwrap() + 11..];
                    member_order(rows).into_iter().take_while(|k| *k != "retiring").collect()
                }
                assert_eq!(row(got), row(want), "{got}");
                let (g, w) = (json::parse(got).unwrap(), json::parse(want).unwrap());
                for k in [
                    "ok",
                    "mode",
                    "generation",
                    "desired",
                    "ready",
                    "autoscale",
                    "roll",
                    "stopping",
                    "control",
                    "version",
                    "containment",
                ] {
                    assert_eq!(g.get(k), w.get(k), "{k}: {got}");
                }
            }
            ["status"] => {
                let port = format!("127.0.0.1:{}", l.port());
                let header = stdout.lines().next().unwrap();
                let header = header.replacen(&header.split("  ").nth(2).unwrap().to_string(), &port, 1);
                assert_eq!(out.stdout.lines().next(), Some(header.as_str()), "{}", out.stdout);
                assert!(out.stdout.lines().nth(1).unwrap().starts_with("slot  pid"), "{}", out.stdout);
            }
            _ => assert_eq!((out.stdout.as_str(), out.stderr.as_str()), (stdout.as_str(), stderr.as_str()), "{args:?}"),
        }
    }
    assert_eq!(l.exit_code(secs(30)), 0);
}
