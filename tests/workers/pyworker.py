#!/usr/bin/env python3
"""A small HTTP worker for reuse-launch, in the Python standard library only.

It adopts the listening socket the launcher passes as fd 3 (LISTEN_FDS), or binds PORT itself
when run alone, and answers every request with one line naming who answered:

    pid=1234 slot=0 gen=1

On SIGTERM it stops accepting, finishes the requests it has accepted and exits 0: connections
still queued stay in the launcher's socket for the next worker. Options make it misbehave for
the tests:

    --ignore-term        ignore SIGTERM (the launcher must SIGKILL it after --grace)
    --exit CODE          exit with CODE at once, before serving
    --exit-if-file PATH  exit 1 at once if PATH exists (a "bad release")
    --start-delay SECS   sleep before listening (a slow start)
    --notify             send READY=1 on NOTIFY_SOCKET once serving
    --handle-delay SECS  take this long to answer each request
    --slow-if-file PATH  with --handle-delay: only while PATH exists (a worker that turns slow)
    --mark-listening DIR create DIR/<pid> just before it starts serving
    --watchdog-ping      send WATCHDOG=1 every WATCHDOG_USEC/3 (sd_notify watchdog)
    --fd N               serve on fd N even if LISTEN_PID is not this process (started by a
                         wrapper that did not exec)
    --bind-self          bind 127.0.0.1:PORT itself with SO_REUSEPORT (reuse-launch --mode self)
    --grow-if-file PATH  once PATH holds this worker's pid, take --grow-mb MiB more memory (and
                         keep it): a leaking worker for --max-memory
    --grow-mb N          how much (default 100)
    --hang-if-file PATH  once PATH exists, block forever instead of accepting the next connection
                         (a deadlocked worker: alive, using no CPU, its queue never drained)
    --serial             serve one request at a time, in the thread that accepts (no thread per
                         request): connections beyond the one in service wait in the accept queue
    --poison             two requests poison the worker, which then never accepts again:
                         GET /deadlock blocks forever (no CPU), GET /spin loops forever (100% of a
                         core), with or without a query; each prints `poisoned by PATH` on
                         stderr first
"""
import argparse
import os
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def parse_args():
    p = argparse.ArgumentParser()
    p.add_argument("--ignore-term", action="store_true")
    p.add_argument("--exit", type=int)
    p.add_argument("--exit-if-file")
    p.add_argument("--start-delay", type=float, default=0.0)
    p.add_argument("--notify", action="store_true")
    p.add_argument("--handle-delay", type=float, default=0.0)
    p.add_argument("--slow-if-file")
    p.add_argument("--mark-listening")
    p.add_argument("--watchdog-ping", action="store_true")
    p.add_argument("--fd", type=int)
    p.add_argument("--bind-self", action="store_true")
    p.add_argument("--hang-if-file")
    p.add_argument("--grow-if-file")
    p.add_argument("--grow-mb", type=int, default=100)
    p.add_argument("--serial", action="store_true")
    p.add_argument("--poison", action="store_true")
    return p.parse_args()


def sd_notify(message):
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(message.encode(), addr)


def listening_socket(fd, bind_self):
    if bind_self:
        sock = socket.create_server(("127.0.0.1", int(os.environ["PORT"])), reuse_port=True)
    elif fd is not None:
        sock = socket.socket(fileno=fd)
    elif os.environ.get("LISTEN_FDS"):
        if os.environ.get("LISTEN_PID") != str(os.getpid()):
            sys.exit("LISTEN_FDS is meant for pid %s, not this process: exec the worker, or pass --fd 3"
                     % os.environ.get("LISTEN_PID"))
        sock = socket.socket(fileno=3)
    else:
        sock = socket.create_server(("127.0.0.1", int(os.environ.get("PORT", "8080"))))
    # Non-blocking accept: another process sharing the socket may take the connection that
    # woke us, and a blocking accept would then hang until the next one.
    sock.setblocking(False)
    return sock


# Held forever by a poisoned request; the accepting thread takes it before each accept.
ACCEPT_LOCK = threading.Lock()


def poisoned(path):
    """A poisoned request never returns, and the worker never accepts again."""
    sys.stderr.write("poisoned by %s\n" % path)
    sys.stderr.flush()
    ACCEPT_LOCK.acquire()  # the accepting thread now blocks before its next accept
    if path.startswith("/spin"):
        while True:
            pass
    threading.Event().wait()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    delay = 0.0
    slow_if_file = None
    poison = False

    def do_GET(self):
        if self.poison and self.path.split("?")[0] in ("/deadlock", "/spin"):
            poisoned(self.path)
        if self.delay and (not self.slow_if_file or os.path.exists(self.slow_if_file)):
            time.sleep(self.delay)
        body = "pid={} slot={} gen={}\n".format(
            os.getpid(),
            os.environ.get("REUSE_LAUNCH_SLOT", "-"),
            os.environ.get("REUSE_LAUNCH_GENERATION", "-"),
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class Server(ThreadingHTTPServer):
    daemon_threads = False  # server_close() joins the requests in flight
    block_on_close = True
    hang_if_file = None
    serial = False

    def get_request(self):
        if self.hang_if_file and os.path.exists(self.hang_if_file):
            threading.Event().wait()  # a deadlock: never accepts again, uses no CPU
        with ACCEPT_LOCK:
            return super().get_request()

    def process_request(self, request, client_address):
        if self.serial:
            # The plain server's way: handle it here, then close it.
            self.finish_request(request, client_address)
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def __init__(self, sock):
        super().__init__(sock.getsockname()[:2], Handler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock
        self.server_address = sock.getsockname()


def main():
    args = parse_args()
    if args.exit is not None:
        sys.exit(args.exit)
    if args.exit_if_file and os.path.exists(args.exit_if_file):
        sys.exit(1)
    if args.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if args.start_delay:
        time.sleep(args.start_delay)
    Handler.delay = args.handle_delay
    Handler.slow_if_file = args.slow_if_file
    Server.hang_if_file = args.hang_if_file
    Server.serial = args.serial
    Handler.poison = args.poison
    server = Server(listening_socket(args.fd, args.bind_self))
    if not args.ignore_term:
        # shutdown() waits for serve_forever(), so it must run on another thread.
        signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    if args.notify:
        sd_notify("READY=1\nSTATUS=serving")
    if args.watchdog_ping:
        interval = int(os.environ["WATCHDOG_USEC"]) / 3e6

        def ping():
            while True:
                sd_notify("WATCHDOG=1")
                time.sleep(interval)

        threading.Thread(target=ping, daemon=True).start()
    if args.grow_if_file:
        def grow():
            while True:
                try:
                    with open(args.grow_if_file) as f:
                        if f.read().strip() == str(os.getpid()):
                            break
                except OSError:
                    pass
                time.sleep(0.05)
            grow.kept = bytearray(args.grow_mb << 20)
            for i in range(0, len(grow.kept), 4096):
                grow.kept[i] = 1  # touch every page: resident, not just reserved

        threading.Thread(target=grow, daemon=True).start()
    if args.mark_listening:
        open(os.path.join(args.mark_listening, str(os.getpid())), "w").close()
    server.serve_forever(poll_interval=0.05)
    server.server_close()


if __name__ == "__main__":
    main()
