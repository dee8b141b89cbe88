"""Continuous HTTP load on 127.0.0.1, every request recorded.

Two kinds of client thread, each paced to its share of `--rate`:

- `new`: one connection per request (`Connection: close`);
- `keepalive`: a connection kept for up to KEEPALIVE_REQUESTS back-to-back requests, then closed
  (and at once on `Connection: close`). Before reusing a connection the client checks that the
  server has not closed it while idle (what every HTTP client does: an idle keep-alive connection
  may be closed by the server at any time); such a connection is replaced, not counted as a
  failure.

Successes are counted per second; each failure is kept with what the accounting needs: when the
request started and failed, how it failed, whether the connection was reused, and if so the pid
of the worker that answered on it last (the *holder*) and when.
"""
import errno
import re
import select
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

KEEPALIVE_REQUESTS = 20
TIMEOUT = 10.0
FAILURE_PAUSE = 0.1
PID_RE = re.compile(rb"pid[= ](\d+)")


@dataclass
class Failure:
    t0: float            # when the request started (connect for a new connection)
    t1: float            # when it failed
    kind: str            # "new" or "keepalive"
    error: str           # refused, reset, eof, timeout, bad
    reused: bool         # sent on a connection that had answered before
    holder: Optional[int]  # pid that answered last on this connection
    holder_t: Optional[float]  # when it answered last
    got_bytes: bool      # some of the response arrived
    detail: str = ""


@dataclass
class ClientStats:
    ok: Dict[int, int] = field(default_factory=dict)        # second -> successes
    failures: List[Failure] = field(default_factory=list)
    pids: Dict[int, int] = field(default_factory=dict)      # pid -> answers
    stale: int = 0                                           # idle keep-alive closed by the server, replaced


class BadResponse(Exception):
    pass


def _classify(e: BaseException) -> str:
    if isinstance(e, socket.timeout):
        return "timeout"
    if isinstance(e, ConnectionRefusedError):
        return "refused"
    if isinstance(e, (ConnectionResetError, BrokenPipeError)):
        return "reset"
    if isinstance(e, BadResponse):
        return "bad"
    if isinstance(e, EOFError):
        return "eof"
    if isinstance(e, OSError) and e.errno in (errno.ECONNRESET, errno.EPIPE):
        return "reset"
    return "other"


def _read_response(sock: socket.socket, state: dict) -> (int, bool):
    """Read one response; returns (pid, server wants to close). Raises on any failure."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(4096)
        if not chunk:
            raise EOFError("closed before the response" if not buf else "closed in the headers")
        state["got"] = True
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    if not lines[0].startswith(b"HTTP/1.1 200") and not lines[0].startswith(b"HTTP/1.0 200"):
        raise BadResponse(lines[0][:60].decode("latin-1"))
    length = None
    close = lines[0].startswith(b"HTTP/1.0")
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        k = k.strip().lower()
        if k == b"content-length":
            length = int(v.strip())
        elif k == b"connection" and v.strip().lower() == b"close":
            close = True
    if length is None:
        raise BadResponse("no Content-Length")
    while len(body) < length:
        chunk = sock.recv(4096)
        if not chunk:
            raise EOFError("closed in the body")
        body += chunk
    m = PID_RE.search(body)
    if not m:
        raise BadResponse("no pid in the body")
    return int(m.group(1)), close


def _dropped(sock: socket.socket) -> bool:
    """An idle connection the server closed (readable with nothing sent means EOF or RST)."""
    try:
        r, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(r)


class Client(threading.Thread):
    def __init__(self, port: int, kind: str, rate: float, t_origin: float, stop: threading.Event):
        super().__init__(daemon=True, name=f"client-{kind}")
        self.port, self.kind, self.interval = port, kind, 1.0 / rate
        self.t_origin, self.stop_ev = t_origin, stop
        self.stats = ClientStats()
        self.conn: Optional[socket.socket] = None
        self.holder: Optional[int] = None
        self.holder_t: Optional[float] = None
        self.served = 0

    def _close(self):
        if self.conn is not None:
            try:
                self.conn.close()
            except OSError:
                pass
        self.conn, self.holder, self.holder_t, self.served = None, None, None, 0

    def _connect(self) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s

    def one(self):
        keep = self.kind == "keepalive"
        if keep and self.conn is not None and _dropped(self.conn):
            self.stats.stale += 1
            self._close()
        reused = self.conn is not None
        holder, holder_t = self.holder, self.holder_t
        state = {"got": False}
        t0 = time.monotonic()
        try:
            if self.conn is None:
                self.conn = self._connect()
            req = b"GET / HTTP/1.1\r\nHost: chaos\r\n" + (b"\r\n" if keep else b"Connection: close\r\n\r\n")
            self.conn.sendall(req)
            pid, close = _read_response(self.conn, state)
        except Exception as e:  # noqa: BLE001 - every failure is recorded, whatever it is
            t1 = time.monotonic()
            self.stats.failures.append(Failure(t0, t1, self.kind, _classify(e), reused, holder, holder_t,
                                               state["got"], f"{type(e).__name__}: {e}"[:120]))
            self._close()
            # Back off a little, as a real client would: a burst of refused connections while
            # nothing listens says nothing more than the first few.
            self.stop_ev.wait(FAILURE_PAUSE)
            return
        t1 = time.monotonic()
        sec = int(t1 - self.t_origin)
        self.stats.ok[sec] = self.stats.ok.get(sec, 0) + 1
        self.stats.pids[pid] = self.stats.pids.get(pid, 0) + 1
        self.served += 1
        if keep and not close and self.served < KEEPALIVE_REQUESTS:
            self.holder, self.holder_t = pid, t1
        else:
            self._close()

    def run(self):
        next_at = time.monotonic()
        while not self.stop_ev.is_set():
            self.one()
            next_at += self.interval
            delay = next_at - time.monotonic()
            if delay > 0:
                # Keep-alive requests go back to back on a connection (an idle connection may be
                # closed by a stopping server); the pause comes between connections.
                if self.kind == "keepalive" and self.conn is not None:
                    continue
                self.stop_ev.wait(delay)
            elif delay < -1.0:
                next_at = time.monotonic()  # fell behind (a stopped worker): do not burst after
        self._close()


class Load:
    """`threads` clients of each kind sharing `rate` requests per second."""

    def __init__(self, port: int, rate: float, threads: int, t_origin: float):
        self.stop_ev = threading.Event()
        per = rate / (2 * threads)
        self.clients = [Client(port, kind, per, t_origin, self.stop_ev)
                        for kind in ("new", "keepalive") for _ in range(threads)]

    def start(self):
        for c in self.clients:
            c.start()

    def stop(self):
        self.stop_ev.set()
        for c in self.clients:
            c.join(TIMEOUT + 5)

    def merged(self) -> ClientStats:
        out = ClientStats()
        for c in self.clients:
            for k, v in c.stats.ok.items():
                out.ok[k] = out.ok.get(k, 0) + v
            for k, v in c.stats.pids.items():
                out.pids[k] = out.pids.get(k, 0) + v
            out.failures.extend(c.stats.failures)
            out.stale += c.stats.stale
        out.failures.sort(key=lambda f: f.t1)
        return out
