//! Running many launchers (issue 10): `--metrics` (`/metrics` parsed by Prometheus' own text
//! parser, `prometheus-client` from PyPI; `/healthz`; `/readyz` and `--min-ready`),
//! `--drain-delay`, the cost of a scrape with 64 workers, and the Kubernetes examples
//! (parsed with PyYAML and validated against the Kubernetes API schemas by
//! `kubernetes-validate --strict`, both from PyPI in .venv-test/).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::common::*;

const VENV_BIN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/.venv-test/bin");
const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/examples/kubernetes");

/// The address of the launcher's `--metrics` endpoint, from its log.
pub fn metrics_addr(l: &Launcher) -> SocketAddr {
    let line = l.wait_for("serving /metrics, /healthz and /readyz on http://", secs(20));
    line.rsplit("http://").next().unwrap().trim().parse().expect("an address in the log")
}

/// `GET path` on a new connection: the status and the body.
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, secs(5))?;
    s.set_read_timeout(Some(secs(10)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok());
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string());
    match (status, body) {
        (Some(status), Some(body)) => Ok((status, body)),
        _ => Err(std::io::Error::other(format!("bad answer: {text:?}"))),
    }
}

/// The python of .venv-test/, which has the parsers (fails, naming the fix, if `module` of the
/// PyPI package `dist` is missing).
fn venv_python(module: &str, dist: &str) -> String {
    let python = format!("{VENV_BIN}/python3");
    let probe = format!("import {module}, importlib.metadata as m; print('{dist}', m.version('{dist}'))");
    require(&[&python, "-c", &probe], &format!("{dist} in .venv-test/ (pinned in tests/workers/requirements.txt)"));
    python
}

/// Run `script` with the venv's python and `args`, `input` on stdin; its stdout (panics on
/// failure).
fn python((module, dist): (&str, &str), script: &str, args: &[&str], input: &str) -> String {
    let mut child = Command::new(venv_python(module, dist))
        .args(["-c", script])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "python failed: {}\non input:\n{input}", String::from_utf8_lossy(&out.stderr));
    stdout
}

/// One sample of a scrape, as prometheus-client's parser read it.
#[derive(Debug, Clone)]
struct Sample {
    family_type: String,
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parse a `/metrics` answer with Prometheus' Python client's text parser (which raises on
/// anything malformed: a bad line fails the test).
fn parse_metrics(text: &str) -> Vec<Sample> {
    const SCRIPT: &str = r#"
import sys
from prometheus_client.parser import text_string_to_metric_families
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        labels = "\x1f".join("%s=%s" % kv for kv in sorted(s.labels.items()))
        print("%s\t%s\t%s\t%r" % (family.type, s.name, labels, s.value))
"#;
    python(("prometheus_client", "prometheus-client"), SCRIPT, &[], text)
        .lines()
        .map(|line| {
            let f: Vec<&str> = line.split('\t').collect();
            let labels = f[2].split('\x1f').filter(|kv| !kv.is_empty()).map(|kv| kv.split_once('=').unwrap());
            Sample {
                family_type: f[0].to_string(),
                name: f[1].to_string(),
                labels: labels.map(|(k, v)| (k.to_string(), v.to_string())).collect(),
                value: f[3].parse().unwrap_or_else(|_| panic!("value of {line}")),
            }
        })
        .collect()
}

fn scrape(addr: SocketAddr) -> Vec<Sample> {
    let (status, body) = http_get(addr, "/metrics").expect("GET /metrics");
    assert_eq!(status, 200, "{body}");
    parse_metrics(&body)
}

/// The samples named `name` whose labels include `labels`.
fn find<'a>(samples: &'a [Sample], name: &str, labels: &[(&str, &str)]) -> Vec<&'a Sample> {
    samples
        .iter()
        .filter(|s| s.name == name && labels.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v)))
        .collect()
}

/// The value of the one sample `name{labels}`.
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    match find(samples, name, labels).as_slice() {
        [one] => one.value,
        other => panic!("{} samples {name}{labels:?}: {other:?}", other.len()),
    }
}

/// Scrape until `n` workers are desired and `n` ready (what the log's `all N workers ready`
/// says, from the gauges).
fn all_ready_in_metrics(addr: SocketAddr, n: u32, timeout: Duration) -> Vec<Sample> {
    scrape_until(addr, timeout, &format!("{n} of {n} workers ready"), |m| {
        value(m, "reuse_launch_workers_desired", &[]) == f64::from(n)
            && value(m, "reuse_launch_workers", &[("state", "ready")]) == f64::from(n)
    })
}

/// Scrape until `cond` holds on the samples, or panic with the last ones after `timeout`.
fn scrape_until(addr: SocketAddr, timeout: Duration, what: &str, cond: impl Fn(&[Sample]) -> bool) -> Vec<Sample> {
    let end = Instant::now() + timeout;
    loop {
        let samples = scrape(addr);
        if cond(&samples) {
            return samples;
        }
        assert!(Instant::now() < end, "{what}: not seen within {timeout:?}; last scrape: {samples:#?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn metrics_report_workers_generation_restarts_and_queues() {
    let l = Launch::new()
        .workers(2)
        .bind("127.0.0.1:0")
        .bind("127.0.0.1:0")
        .ready_delay("300ms")
        .flag("--metrics", "127.0.0.1:0")
        .py(&[])
        .start();
    let addr = metrics_addr(&l);
    all_ready_in_metrics(addr, 2, secs(30));
    let binds = l.listening();
    let m = scrape_until(addr, secs(10), "2 ready workers", |m| {
        value(m, "reuse_launch_workers", &[("state", "ready")]) == 2.0
    });
    assert_eq!(value(&m, "reuse_launch_workers_desired", &[]), 2.0);
    assert_eq!(value(&m, "reuse_launch_generation", &[]), 1.0);
    assert_eq!(value(&m, "reuse_launch_roll_in_progress", &[]), 0.0);
    assert_eq!(value(&m, "reuse_launch_serving_slots", &[]), 2.0);
    for state in ["starting", "stalled", "draining", "backoff"] {
        assert_eq!(value(&m, "reuse_launch_workers", &[("state", state)]), 0.0, "{state}");
    }
    let build = find(&m, "reuse_launch_build_info", &[]);
    assert_eq!(build.len(), 1);
    assert_eq!(build[0].labels["version"], env!("CARGO_PKG_VERSION"));
    for slot in ["0", "1"] {
        // A Python worker's group holds at least a few MiB and has used some CPU to start.
        let rss = value(&m, "reuse_launch_worker_rss_bytes", &[("slot", slot)]);
        assert!(rss > 4e6, "slot {slot} rss {rss}");
        let cpu = find(&m, "reuse_launch_worker_cpu_seconds_total", &[("slot", slot)]);
        assert!(cpu.len() == 1 && cpu[0].value > 0.0 && cpu[0].family_type == "counter", "{cpu:?}");
        assert_eq!(value(&m, "reuse_launch_restarts_total", &[("slot", slot), ("cause", "crash")]), 0.0);
        for bind in &binds {
            assert_eq!(value(&m, "reuse_launch_accept_queue", &[("slot", slot), ("bind", bind)]), 0.0);
            let max = value(&m, "reuse_launch_accept_queue_max", &[("slot", slot), ("bind", bind)]);
            assert!(max >= 1.0, "backlog {max}");
        }
    }
    let overflows = find(&m, "reuse_launch_listen_overflows_total", &[]);
    assert!(overflows.len() == 1 && overflows[0].family_type == "counter", "{overflows:?}");
    let restarts = find(&m, "reuse_launch_restarts_total", &[]);
    assert!(restarts.iter().all(|s| s.family_type == "counter"));

    // A roll: generation 2.
    l.signal(Signal::SIGUSR2);
    l.wait_for("roll gen 2 done", secs(60));
    scrape_until(addr, secs(10), "generation 2", |m| {
        value(m, "reuse_launch_generation", &[]) == 2.0 && value(m, "reuse_launch_roll_in_progress", &[]) == 0.0
    });

    // A SIGKILLed worker: one restart of its slot with cause crash, and back to 2 ready.
    let victim = l.latest_pid(1);
    signal(victim, Signal::SIGKILL);
    l.wait_replacement(1, victim, secs(20));
    let m = scrape_until(addr, secs(30), "a crash restart of slot 1, 2 ready", |m| {
        value(m, "reuse_launch_restarts_total", &[("slot", "1"), ("cause", "crash")]) == 1.0
            && value(m, "reuse_launch_workers", &[("state", "ready")]) == 2.0
    });
    assert_eq!(value(&m, "reuse_launch_restarts_total", &[("slot", "0"), ("cause", "crash")]), 0.0);
    assert_eq!(value(&m, "reuse_launch_generation", &[]), 2.0, "a respawn keeps the generation");
}

#[test]
fn healthz_and_readyz_follow_the_loop_and_the_workers() {
    let flag = TempPath::new("crash-loop");
    // The workers are held before they start serving until the test opens the gate, so the
    // launcher is not ready for as long as the test looks (not for a delay a slow machine may
    // outlast); they say READY=1 themselves once serving.
    let gate = TempPath::new("ready-gate");
    let script = format!(
        "while [ ! -e \"$0\" ]; do sleep 0.05; done; exec python3 {PYWORKER} --notify --exit-if-file {}",
        flag.str()
    );
    let l = Launch::new()
        .workers(2)
        .mode("shared")
        .ready("notify")
        .flag("--metrics", "127.0.0.1:0")
        .cmd(&["sh", "-c", &script, gate.str()])
        .start();
    let addr = metrics_addr(&l);
    // Not ready until every worker is: both started, neither ready.
    assert!(wait_until(secs(20), || l.started().len() == 2), "2 workers not started:\n{}", l.log());
    let (status, body) = http_get(addr, "/readyz").unwrap();
    assert!(l.ready().is_empty(), "a worker was ready before the gate opened:\n{}", l.log());
    assert_eq!(status, 503, "{body}");
    assert!(body.starts_with("not ready: "), "{body}");
    assert_eq!(http_get(addr, "/healthz").unwrap(), (200, "ok\n".to_string()));
    std::fs::write(&*gate, "").unwrap();
    all_ready_in_metrics(addr, 2, secs(30));
    assert!(wait_until(secs(5), || http_get(addr, "/readyz").unwrap().0 == 200));
    assert_eq!(http_get(addr, "/readyz").unwrap().1, "ready: 2 of 2 workers ready (need 2)\n");

    // Idle (shared mode, every worker ready: no timer of its own), the loop still beats: 200 for
    // longer than a stuck loop would take to show (5 s).
    let end = Instant::now() + secs(7);
    while Instant::now() < end {
        let (status, body) = http_get(addr, "/healthz").unwrap();
        assert_eq!(status, 200, "{body}");
        // The probes' pace over the 7 s of idleness (the scenario), not a wait for a condition.
        std::thread::sleep(Duration::from_millis(500));
    }

    // One slot crash-loops (its respawns exit at once, with growing backoff): 503 with the reason.
    std::fs::write(&*flag, "").unwrap();
    let victim = l.latest_pid(1);
    signal(victim, Signal::SIGKILL);
    let mut last = (0, String::new());
    let seen = wait_until(secs(10), || {
        last = http_get(addr, "/readyz").unwrap();
        last.0 == 503
    });
    assert!(seen, "still {last:?}");
    assert_eq!(last.1, "not ready: 1 of 2 workers ready (need 2)\n");
    assert_eq!(http_get(addr, "/healthz").unwrap().0, 200, "a crash-looping worker is not a stuck launcher");
    // The release is fixed: the slot comes back, and so does 200.
    std::fs::remove_file(&*flag).unwrap();
    assert!(wait_until(secs(40), || http_get(addr, "/readyz").unwrap().0 == 200), "log:\n{}", l.log());
    assert_eq!(http_get(addr, "/nope").unwrap().0, 404);
}

#[test]
fn min_ready_keeps_readyz_up_while_enough_workers_serve() {
    let flag = TempPath::new("crash-loop");
    // Ready when seen accepting (not after a delay): a worker must have passed its start-up
    // check of the flag before the test creates it.
    let l = Launch::new()
        .workers(3)
        .ready("auto")
        .flag("--metrics", "127.0.0.1:0")
        .flag("--min-ready", "2")
        .py(&["--exit-if-file", flag.str()])
        .start();
    let addr = metrics_addr(&l);
    all_ready_in_metrics(addr, 3, secs(30));
    assert!(wait_until(secs(5), || http_get(addr, "/readyz").unwrap().0 == 200));
    std::fs::write(&*flag, "").unwrap();
    let first = l.latest_pid(2);
    signal(first, Signal::SIGKILL);
    // Slot 2 crash-loops: 2 of 3 ready is enough.
    scrape_until(addr, secs(20), "a crash restart of slot 2", |m| {
        value(m, "reuse_launch_restarts_total", &[("slot", "2"), ("cause", "crash")]) >= 1.0
    });
    // What the endpoint says follows the loop's published picture (within a turn or two).
    let want = (200, "ready: 2 of 3 workers ready (need 2)\n".to_string());
    let mut seen = (0, String::new());
    assert!(
        wait_until(secs(10), || {
            seen = http_get(addr, "/readyz").unwrap();
            seen == want
        }),
        "{seen:?}"
    );
    let second = l.latest_pid(1);
    signal(second, Signal::SIGKILL);
    let mut last = (0, String::new());
    assert!(
        wait_until(secs(10), || {
            last = http_get(addr, "/readyz").unwrap();
            last.0 == 503
        }),
        "{last:?}"
    );
    // Slot 0 alone is ready (or fewer for an instant: a respawn starting, a stall).
    assert!(last.1.starts_with("not ready: ") && last.1.ends_with(" of 3 workers ready (need 2)\n"), "{last:?}");
    let ready: u32 = last.1["not ready: ".len()..].split(' ').next().unwrap().parse().unwrap();
    assert!(ready < 2, "{last:?}");
}

#[test]
fn drain_delay_says_503_at_once_and_keeps_serving_until_it_stops() {
    let mut notify = NotifySocket::bind();
    let mut l = Launch::new()
        .workers(2)
        .ready("auto")
        .grace("5s")
        .flag("--metrics", "127.0.0.1:0")
        .flag("--drain-delay", "2s")
        .env("NOTIFY_SOCKET", notify.path())
        .py(&[])
        .start();
    let addr = metrics_addr(&l);
    all_ready_in_metrics(addr, 2, secs(30));
    assert!(wait_until(secs(5), || http_get(addr, "/readyz").unwrap().0 == 200));
    let load = Load::start(l.port(), 3);
    assert!(wait_until(secs(10), || get(l.port()).is_ok()));
    let term = Instant::now();
    l.signal(Signal::SIGTERM);
    // 503 from the first moment: the first answer that is not 200 comes within a few turns.
    let mut last = (200, String::new());
    assert!(wait_until(secs(2), || {
        last = http_get(addr, "/readyz").unwrap();
        last.0 == 503
    }));
    let became_503 = term.elapsed();
    assert!(last.1.starts_with("stopping: "), "{last:?}");
    assert!(l.find(") stopping (SIGTERM)").is_none(), "workers stopped before the drain delay:\n{}", l.log());
    // STOPPING=1 upstream at the start of the delay, not at its end.
    notify.wait_for("STOPPING=1", 0, secs(5));
    assert!(l.find(") stopping (SIGTERM)").is_none(), "STOPPING=1 came only with the stop:\n{}", l.log());
    // Requests are served during the delay: a few of our own, and the clients, which run
    // until shortly before its end, see no failure.
    for _ in 0..5 {
        get(l.port()).expect("a request during the drain delay");
    }
    // The scenario: the clients run on until 1.5 s into the 2 s delay (no condition to wait for).
    std::thread::sleep(Duration::from_millis(1500).saturating_sub(term.elapsed()));
    assert!(l.find(") stopping (SIGTERM)").is_none(), "workers stopped before the drain delay:\n{}", l.log());
    let (ok, failures) = load.finish();
    assert!(failures.is_empty(), "{} of {} requests failed during the drain delay: {failures:?}", failures.len(), ok);
    let (_, stopping_at) = l.find(") stopping (SIGTERM)").unwrap_or_else(|| {
        l.wait_for(") stopping (SIGTERM)", secs(10));
        l.find(") stopping (SIGTERM)").unwrap()
    });
    let waited = stopping_at.duration_since(term);
    assert!(waited >= Duration::from_millis(1900), "workers stopped {waited:?} after TERM");
    assert_eq!(l.exit_code(secs(20)), 0);
    eprintln!(
        "drain: /readyz 503 {became_503:?} after TERM, workers stopped {waited:?} after; {ok} requests, 0 failed"
    );
}

/// CPU time (user + system, every thread) of process `pid`, in seconds.
fn cpu_seconds(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = stat.rsplit_once(')').unwrap().1;
    let f: Vec<u64> = rest.split_whitespace().skip(11).take(2).map(|x| x.parse().unwrap()).collect();
    let tick = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).unwrap().unwrap() as f64;
    (f[0] + f[1]) as f64 / tick
}

#[test]
fn the_cost_of_a_scrape_with_64_workers() {
    let hello = built_c("bench/workers/hello.c");
    let l = Launch::new().workers(64).ready_delay("500ms").flag("--metrics", "127.0.0.1:0").cmd(&[&hello]).start();
    let addr = metrics_addr(&l);
    all_ready_in_metrics(addr, 64, secs(120));
    let pid = l.pid();
    // Settled before the idle window (in place of a fixed second): the loop's published picture
    // has caught up with the start-up, every worker ready and every slot serving.
    scrape_until(addr, secs(30), "64 ready workers on 64 serving slots", |m| {
        value(m, "reuse_launch_workers", &[("state", "ready")]) == 64.0
            && value(m, "reuse_launch_serving_slots", &[]) == 64.0
    });
    // The launcher's own rate without scrapes (the loop samples 64 queues every 20 ms), then
    // a burst of back-to-back scrapes: what they add, per scrape.
    let idle_window = secs(5);
    let c0 = cpu_seconds(pid);
    // The measurement window itself, not a wait for a condition.
    std::thread::sleep(idle_window);
    let c1 = cpu_seconds(pid);
    let idle_rate = (c1 - c0) / idle_window.as_secs_f64();
    let (burst, t) = (100, Instant::now());
    let mut slowest = Duration::ZERO;
    let mut size = 0;
    for _ in 0..burst {
        let t = Instant::now();
        let (status, body) = http_get(addr, "/metrics").unwrap();
        slowest = slowest.max(t.elapsed());
        assert_eq!(status, 200);
        size = body.len();
    }
    let took = t.elapsed();
    let c2 = cpu_seconds(pid);
    let per_scrape = ((c2 - c1) - idle_rate * took.as_secs_f64()).max(0.0) / burst as f64;
    eprintln!(
        "metrics cost, 64 workers: launcher {:.1}% of a core without scrapes; a scrape adds {:.2} ms of launcher \
         CPU ({:.2}% of a core at one scrape a second); {size} bytes; {burst} scrapes in {took:?}, slowest {slowest:?}",
        idle_rate * 100.0,
        per_scrape * 1000.0,
        per_scrape * 100.0,
    );
    let m = parse_metrics(&http_get(addr, "/metrics").unwrap().1);
    assert_eq!(value(&m, "reuse_launch_workers", &[("state", "ready")]), 64.0);
    assert_eq!(find(&m, "reuse_launch_worker_rss_bytes", &[]).len(), 64);
    assert_eq!(find(&m, "reuse_launch_accept_queue", &[]).len(), 64);
    // Generous, for a shared machine: a scrape is one /proc scan and 128 small reads.
    assert!(per_scrape < 0.2, "{per_scrape} s of launcher CPU per scrape");
}

/// Facts of the Kubernetes examples, read by PyYAML: `key\tvalue` lines.
const K8S_FACTS: &str = r#"
import glob, sys, yaml
docs = [d for f in sorted(glob.glob(sys.argv[1] + "/*.yaml")) for d in yaml.safe_load_all(open(f)) if d]
kinds = {d["kind"]: d for d in docs}
dep, svc = kinds["Deployment"], kinds["Service"]
pod = dep["spec"]["template"]
c = pod["spec"]["containers"][0]
ports = {p["name"]: p["containerPort"] for p in c["ports"]}
def port(p):
    return ports[p] if isinstance(p, str) else p
print("kinds\t" + ",".join(sorted(kinds)))
print("argv\t" + "\x1f".join(c.get("command", []) + c.get("args", [])))
print("termination\t%d" % pod["spec"]["terminationGracePeriodSeconds"])
for probe in ("readinessProbe", "livenessProbe"):
    g = c[probe]["httpGet"]
    print("%s\t%s %d" % (probe, g["path"], port(g["port"])))
a = pod["metadata"]["annotations"]
print("scrape\t%s %s %s" % (a["prometheus.io/scrape"], a["prometheus.io/port"], a["prometheus.io/path"]))
print("service\t%d" % port(svc["spec"]["ports"][0]["targetPort"]))
print("selects\t%s" % all(pod["metadata"]["labels"].get(k) == v for k, v in svc["spec"]["selector"].items()))
print("matches\t%s" % all(pod["metadata"]["labels"].get(k) == v for k, v in dep["spec"]["selector"]["matchLabels"].items()))
"#;

/// A duration flag's value in seconds (`20s`, `1m`, `500ms`).
fn seconds(text: &str) -> f64 {
    let (num, unit) = text.split_at(text.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(text.len()));
    let n: f64 = num.parse().unwrap();
    match unit {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" => n * 60.0,
        other => panic!("unit {other}"),
    }
}

#[test]
fn kubernetes_example_matches_its_flags_and_the_api_schemas() {
    let facts: BTreeMap<String, String> = python(("yaml", "PyYAML"), K8S_FACTS, &[EXAMPLES], "")
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    assert_eq!(facts["kinds"], "Deployment,PodDisruptionBudget,Service");
    let argv: Vec<&str> = facts["argv"].split('\x1f').collect();
    assert!(argv[0].ends_with("/reuse-launch"), "reuse-launch is the container's PID 1: {argv:?}");
    let flag = |name: &str| argv.iter().position(|a| *a == name).map(|i| argv[i + 1]);
    assert_eq!(flag("-n"), Some("auto"));
    let metrics_port: u16 = flag("--metrics").expect("--metrics").rsplit(':').next().unwrap().parse().unwrap();
    let bind_port: u16 = flag("--bind").expect("--bind").rsplit(':').next().unwrap().parse().unwrap();
    assert_eq!(facts["readinessProbe"], format!("/readyz {metrics_port}"));
    assert_eq!(facts["livenessProbe"], format!("/healthz {metrics_port}"));
    assert_eq!(facts["scrape"], format!("true {metrics_port} /metrics"));
    assert_eq!(facts["service"], bind_port.to_string(), "the Service sends traffic to the --bind port");
    assert_eq!((facts["selects"].as_str(), facts["matches"].as_str()), ("True", "True"));
    let grace = seconds(flag("--grace").expect("--grace"));
    let drain = seconds(flag("--drain-delay").expect("--drain-delay"));
    let termination: f64 = facts["termination"].parse().unwrap();
    assert!(
        termination > grace + drain,
        "terminationGracePeriodSeconds {termination} <= --grace {grace} + --drain-delay {drain}"
    );
    // The launcher accepts the flags as written: with the addresses made local and a command
    // that does not exist, it gets past validating them (exit 2) to resolving the command (127).
    let dash = argv.iter().position(|a| *a == "--").unwrap();
    let flags: Vec<&str> =
        argv[1..dash].iter().map(|a| if a.starts_with("0.0.0.0:") { "127.0.0.1:0" } else { *a }).collect();
    let check = Command::new(BIN).args(&flags).args(["--", "/nonexistent/my-server"]).output().unwrap();
    assert_eq!(check.status.code(), Some(127), "{}", String::from_utf8_lossy(&check.stderr));

    // Every manifest against the Kubernetes API's schemas, unknown fields refused.
    let validate = format!("{VENV_BIN}/kubernetes-validate");
    require(&[&validate, "--version"], "kubernetes-validate in .venv-test/ (pinned in tests/workers/requirements.txt)");
    let files: Vec<String> = std::fs::read_dir(EXAMPLES)
        .unwrap()
        .map(|e| e.unwrap().path().display().to_string())
        .filter(|p| p.ends_with(".yaml"))
        .collect();
    let out = Command::new(&validate).arg("--strict").args(&files).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "kubernetes-validate --strict:\n{text}");
    assert_eq!(text.matches(" passed for resource ").count(), 3, "{text}");
}
