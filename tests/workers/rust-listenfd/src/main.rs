//! A hyper server on the listening socket reuse-launch passes: `ListenFd::from_env()` reads
//! LISTEN_FDS/LISTEN_PID (systemd's variables, which the launcher sets) and
//! `take_tcp_listener(0)` adopts fd 3. On SIGTERM it stops accepting, lets the connections it
//! accepted finish, and exits 0. Answers `pid=.. slot=.. gen=..`.
//!
//! reuse-launch -n 2 --ready auto -- target/.../rust-listenfd-worker

use std::convert::Infallible;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::signal::unix::{signal, SignalKind};
use tokio::task::JoinSet;

fn main() {
    let std_listener = listenfd::ListenFd::from_env()
        .take_tcp_listener(0)
        .expect("LISTEN_FDS fd 0 (fd 3) is a TCP listener")
        .expect("a listening socket in LISTEN_FDS (run under reuse-launch or systemd)");
    std_listener.set_nonblocking(true).expect("set O_NONBLOCK");
    let rt = tokio::runtime::Builder::new_current_thread().enable_io().build().expect("tokio runtime");
    rt.block_on(serve(std_listener));
}

async fn serve(std_listener: std::net::TcpListener) {
    let pid = std::process::id();
    let var = |k: &str| std::env::var(k).unwrap_or_default();
    let body =
        Bytes::from(format!("pid={pid} slot={} gen={}\n", var("REUSE_LAUNCH_SLOT"), var("REUSE_LAUNCH_GENERATION")));
    let listener = tokio::net::TcpListener::from_std(std_listener).expect("tokio listener");
    eprintln!("rust-listenfd: pid {pid} took fd 3 from LISTEN_FDS ({})", listener.local_addr().unwrap());
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = term.recv() => break,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let body = body.clone();
                conns.spawn(async move {
                    let service = service_fn(move |_req: Request<hyper::body::Incoming>| {
                        let body = body.clone();
                        async move { Ok::<_, Infallible>(Response::new(Full::new(body))) }
                    });
                    let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    // Stop accepting (the launcher keeps the socket and its queue), finish what was accepted.
    drop(listener);
    while conns.join_next().await.is_some() {}
    eprintln!("rust-listenfd: pid {pid} stopped gracefully");
}
