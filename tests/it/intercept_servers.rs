//! Issue 15, two more servers people run, unchanged, binding the port themselves: nginx (a
//! master that binds `127.0.0.1:PORT` and `[::1]:PORT`, then forks two worker processes that
//! accept) and redis (one process binding `127.0.0.1` and `::1`). For each, from outside:
//! answers from distinct processes, only the launcher's sockets listen on the port, each
//! worker holds one on an fd of its own, the backlog stays the launcher's (nginx and redis ask
//! for 511). nginx is rolled under continuous new-connection load with `--stop-signal QUIT`
//! (its graceful stop): no request may fail. redis stops on TERM by closing its clients, so
//! its roll counts what failed, and it is reported, not asserted (the launcher cannot finish a
//! request the server drops); requests queued on a killed redis (one slot) are answered by
//! its replacement.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;

use nix::sys::signal::Signal;

use crate::common::*;
use crate::intercept::{check_sockets, launch, roll_counting, roll_under_load, wait_intercepted, worker_pids};

fn nginx() -> &'static str {
    require(&["/usr/sbin/nginx", "-v"], "install nginx (apt-get install nginx)");
    "/usr/sbin/nginx"
}

/// nginx's configuration, made per process by [`NGINX_WRAPPER`] from this template.
const NGINX_CONF: &str = r#"worker_processes 2;
daemon off;
master_process on;
error_log stderr notice;
events { worker_connections 512; }
http {
    access_log off;
    client_body_temp_path @DIR@/body;
    proxy_temp_path @DIR@/proxy;
    fastcgi_temp_path @DIR@/fastcgi;
    uwsgi_temp_path @DIR@/uwsgi;
    scgi_temp_path @DIR@/scgi;
    server {
        listen 127.0.0.1:@PORT@;
        listen [::1]:@PORT@;
        location / {
            default_type text/plain;
            return 200 "pid=$pid slot=@SLOT@ gen=@GEN@\n";
        }
    }
}
"#;

/// `sh -c` script: this process's configuration (its slot and generation in the answers, a
/// pid file of its own: old and new masters of a slot overlap in a roll), then nginx itself.
const NGINX_WRAPPER: &str = r#"d=$1
sed -e "s|@SLOT@|$REUSE_LAUNCH_SLOT|" -e "s|@GEN@|$REUSE_LAUNCH_GENERATION|" -e "s|@PORT@|$2|g" \
  -e "s|@DIR@|$d|g" "$d/nginx.conf.in" > "$d/nginx.$$.conf"
exec "$3" -p "$d" -c "$d/nginx.$$.conf" -g "pid $d/nginx.$$.pid;""#;

#[test]
fn nginx_master_and_workers_bind_the_port_themselves_and_roll_under_load() {
    let bin = nginx();
    let dir = TempPath::dir("intercept-nginx");
    std::fs::write(format!("{}/nginx.conf.in", dir.str()), NGINX_CONF).unwrap();
    let l = launch(2, &dir)
        .flag("--stop-signal", "QUIT")
        .cmd(&["sh", "-c", NGINX_WRAPPER, "sh", dir.str(), "{port}", bin])
        .start();
    // Each master binds twice (IPv4 and IPv6 on the one port): both get the slot's socket.
    let s = wait_intercepted(&l, &dir, 2);
    assert!(crate::control::num(&s, "intercepted_binds") >= 4, "binds taken over: {s:?}");
    // Answers come from nginx's worker processes (2 per slot), never from a master.
    let masters = worker_pids(&dir);
    let seen = l.poll_answers(secs(60), |r| r.iter().map(|r| r.pid).collect::<BTreeSet<_>>().len() >= 3);
    let answering: BTreeSet<i32> = seen.iter().map(|r| r.pid).collect();
    assert!(answering.is_disjoint(&masters.iter().copied().collect()), "{answering:?} vs masters {masters:?}");
    check_sockets(&l, &dir, 1);
    roll_under_load(&l, &dir, |p| get(p).map(drop));
    wait_intercepted(&l, &dir, 2);
    check_sockets(&l, &dir, 1);
    let after = l.poll_answers(secs(30), |r| r.iter().any(|r| r.gen == "2"));
    assert!(after.iter().any(|r| r.gen == "2"), "no answer from gen 2: {after:?}");
}

/// Send one redis command (RESP) on an open connection.
fn redis_send(s: &mut TcpStream, args: &[&str]) -> std::io::Result<()> {
    let mut req = format!("*{}\r\n", args.len());
    for a in args {
        req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    s.write_all(req.as_bytes())
}

/// One redis command on a new connection, its reply's text.
fn redis(port: u16, args: &[&str]) -> std::io::Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(secs(10)))?;
    redis_send(&mut s, args)?;
    redis_reply(&mut s)
}

/// The whole reply on `s`: a bulk one (INFO) ends with its length, a status (+PONG) with its line.
fn redis_reply(s: &mut TcpStream) -> std::io::Result<String> {
    let mut text = String::new();
    let mut buf = [0u8; 8192];
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Err(std::io::Error::other(format!("closed after {text:?}")));
        }
        text.push_str(&String::from_utf8_lossy(&buf[..n]));
        let complete = match text.as_bytes()[0] {
            b'$' => text
                .split_once("\r\n")
                .is_some_and(|(len, rest)| len[1..].parse::<usize>().is_ok_and(|len| rest.len() >= len + 2)),
            _ => text.ends_with("\r\n"),
        };
        if complete {
            return Ok(text);
        }
    }
}

/// The pid in an `INFO server` reply.
fn info_pid(info: &str) -> std::io::Result<i32> {
    info.lines()
        .find_map(|l| l.strip_prefix("process_id:")?.trim().parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no process_id in {info:?}")))
}

/// The pid of the redis that answered `INFO server` on a new connection.
fn redis_pid(port: u16) -> std::io::Result<i32> {
    info_pid(&redis(port, &["INFO", "server"])?)
}

fn require_redis() {
    require(&["redis-server", "--version"], "install redis (apt-get install redis-server)");
}

/// redis on the launcher's port, both loopback addresses, nothing saved.
fn redis_server(n: usize, dir: &TempPath) -> Launcher {
    launch(n, dir)
        .cmd(&[
            "redis-server",
            "--port",
            "{port}",
            "--bind",
            "127.0.0.1 ::1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "no",
            "--dir",
            dir.str(),
        ])
        .start()
}

fn ping(port: u16) -> std::io::Result<()> {
    match redis(port, &["PING"])? {
        pong if pong == "+PONG\r\n" => Ok(()),
        other => Err(std::io::Error::other(format!("bad answer: {other:?}"))),
    }
}

#[test]
fn redis_binds_ipv4_and_ipv6_itself_and_rolls() {
    require_redis();
    let dir = TempPath::dir("intercept-redis");
    let l = redis_server(2, &dir);
    let s = wait_intercepted(&l, &dir, 2);
    assert!(crate::control::num(&s, "intercepted_binds") >= 4, "binds taken over: {s:?}");
    let pids: BTreeSet<i32> = worker_pids(&dir).into_iter().collect();
    let mut answered = BTreeSet::new();
    let port = l.port();
    let both = wait_until(secs(30), || {
        answered.extend(redis_pid(port).ok());
        answered.len() == 2
    });
    assert!(both && answered == pids, "answers from {answered:?}, workers {pids:?}\nlog:\n{}", l.log());
    check_sockets(&l, &dir, 1);
    // A roll: redis closes its clients at TERM, so what fails is counted, not asserted.
    let (ok, failures) = roll_counting(&l, &dir, ping);
    eprintln!("redis roll under load: {ok} requests, {} failed: {failures:?}", failures.len());
    check_sockets(&l, &dir, 1);
}

/// One slot, so that nothing else can take the queue: PINGs queued on a stopped redis that
/// is then killed are answered by its replacement, which bound the port itself.
#[test]
fn a_killed_rediss_queue_waits_for_its_replacement() {
    require_redis();
    let dir = TempPath::dir("intercept-redis");
    let l = redis_server(1, &dir);
    wait_intercepted(&l, &dir, 1);
    let old = l.latest_pid(0);
    signal(old, Signal::SIGSTOP);
    let mut queued = Vec::new();
    for _ in 0..8 {
        let mut c = TcpStream::connect(("127.0.0.1", l.port())).unwrap();
        redis_send(&mut c, &["INFO", "server"]).unwrap();
        queued.push(c);
    }
    signal(old, Signal::SIGKILL);
    let new = l.wait_replacement(0, old, secs(30));
    for mut c in queued {
        c.set_read_timeout(Some(secs(20))).unwrap();
        let info = redis_reply(&mut c).expect("every queued request is answered");
        assert_eq!(info_pid(&info).unwrap(), new, "answered by the replacement");
    }
}
