#!/usr/bin/env python3
"""A worker that binds the launcher's port itself with raw system calls (ctypes, no socket
module in the way), to test --intercept-bind from inside a worker, including hostile calls.

Usage: binder.py MODE [OUT]
  probe OUT    make every kind of bind() and listen() the launcher must either take over or
               leave to the kernel, write what each returned to OUT.SLOT (JSON), then serve
  loop OUT     serve, while a thread binds PORT on a new socket every 5 ms; the count of binds
               that returned 0, the failures and the slowest (ms) go to OUT every 0.1 s
  flood OUT    serve, while 4 threads call bind() and listen() as fast as they can (the count so
               far is written to OUT.SLOT every 0.2 s)
  again OUT    serve; on SIGUSR1 bind PORT once more on a new socket and write the result to OUT
  prefork N    bind PORT and listen, then fork N children that serve it (the parent only waits)
  trap         serve; on SIGUSR1 call bind() with an address on a page registered with a
               userfaultfd whose faults nobody serves: whoever reads it waits forever

Every mode answers GET with `pid=PID slot=SLOT gen=GEN` (the pid of the process that answered)
on the socket its own bind() of PORT got. Environment: PORT, REUSE_LAUNCH_SLOT,
REUSE_LAUNCH_GENERATION; OTHER_PORT (probe): a port some other process of the launcher's holds.
"""
import ctypes
import json
import os
import platform
import signal
import socket
import struct
import sys
import threading
import time

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
NR = {"x86_64": (49, 50), "aarch64": (200, 201), "riscv64": (200, 201)}[platform.machine()]
PORT = int(os.environ["PORT"])


def sys_bind(fd, addr, length):
    """bind(2) as a raw syscall: (return value, errno name or None)."""
    r = libc.syscall(NR[0], ctypes.c_long(fd), addr, ctypes.c_long(length))
    return r, (None if r == 0 else os.strerror(ctypes.get_errno()))


def sys_listen(fd, backlog):
    r = libc.syscall(NR[1], ctypes.c_long(fd), ctypes.c_long(backlog))
    return r, (None if r == 0 else os.strerror(ctypes.get_errno()))


def sockaddr_in(ip, port):
    raw = struct.pack("=H", socket.AF_INET) + struct.pack("!H", port) + socket.inet_aton(ip) + b"\0" * 8
    return ctypes.create_string_buffer(raw, len(raw))


def sockaddr_in6(ip, port):
    raw = struct.pack("=H", socket.AF_INET6) + struct.pack("!HI", port, 0) + socket.inet_pton(socket.AF_INET6, ip)
    raw += b"\0" * 4
    return ctypes.create_string_buffer(raw, len(raw))


def new_socket(family=socket.AF_INET, kind=socket.SOCK_STREAM, flags=socket.SOCK_CLOEXEC, proto=0):
    fd = libc.socket(family, kind | flags, proto)
    if fd < 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    return fd


def ino(fd):
    return os.fstat(fd).st_ino


def fd_flags(fd):
    import fcntl

    return {
        "nonblock": bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK),
        "cloexec": bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC),
    }


def bind_port():
    """The worker's own bind() of PORT, as a server makes it: the fd it then serves on."""
    fd = new_socket()
    r, err = sys_bind(fd, sockaddr_in("0.0.0.0", PORT), 16)
    if r != 0:
        print(f"binder: bind of port {PORT} failed: {err}", file=sys.stderr, flush=True)
        sys.exit(1)
    r, err = sys_listen(fd, 5)
    if r != 0:
        print(f"binder: listen failed: {err}", file=sys.stderr, flush=True)
        sys.exit(1)
    return fd


def probe():
    """Every case, and what it returned."""
    out = {"fd3_ino": ino(3)}
    addr = sockaddr_in("127.0.0.1", PORT)
    s = new_socket()
    out["bad_pointer"] = sys_bind(s, ctypes.c_void_p(16), 16)
    out["long_len"] = sys_bind(s, addr, 1000)
    out["negative_len"] = sys_bind(s, addr, -1)
    out["short_len"] = sys_bind(s, addr, 8)
    out["bad_fd"] = sys_bind(9999, addr, 16)
    os.close(s)
    # Taken over: the slot's socket, with this socket's flags.
    s = new_socket(flags=socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
    out["taken"] = sys_bind(s, sockaddr_in("0.0.0.0", PORT), 16)
    out["taken_ino"] = ino(s)
    out["taken_flags"] = fd_flags(s)
    out["taken_listen"] = sys_listen(s, 1)
    out["rebind"] = sys_bind(s, sockaddr_in("0.0.0.0", PORT), 16)
    try:
        m = new_socket(proto=262)  # IPPROTO_MPTCP
        out["mptcp"] = sys_bind(m, sockaddr_in("127.0.0.1", PORT), 16)
        out["mptcp_ino"] = ino(m)
    except OSError as e:
        out["mptcp"] = f"unsupported: {e}"
    wrong = new_socket(socket.AF_INET6)
    out["wrong_family"] = sys_bind(wrong, sockaddr_in("127.0.0.1", PORT), 16)
    plain = new_socket(flags=0)
    out["plain"] = sys_bind(plain, sockaddr_in("127.0.0.1", PORT), 16)
    out["plain_ino"] = ino(plain)
    out["plain_flags"] = fd_flags(plain)
    v6 = new_socket(socket.AF_INET6)
    out["v6"] = sys_bind(v6, sockaddr_in6("::", PORT), 28)
    out["v6_ino"] = ino(v6)
    # Left to the kernel.
    z = new_socket()
    out["port0"] = sys_bind(z, sockaddr_in("127.0.0.1", 0), 16)
    out["port0_ino"] = ino(z)
    out["port0_port"] = socket.socket(fileno=os.dup(z)).getsockname()[1]
    u = new_socket(kind=socket.SOCK_DGRAM)
    one = ctypes.c_int(1)  # every slot's worker binds it: SO_REUSEPORT lets them all
    libc.setsockopt(u, socket.SOL_SOCKET, socket.SO_REUSEPORT, ctypes.byref(one), ctypes.sizeof(one))
    out["udp"] = sys_bind(u, sockaddr_in("127.0.0.1", PORT), 16)
    out["udp_ino"] = ino(u)
    other = int(os.environ.get("OTHER_PORT", "0"))
    o = new_socket()
    out["other_port"] = sys_bind(o, sockaddr_in("127.0.0.1", other), 16)
    out["other_ino"] = ino(o)
    path = f"/tmp/binder-{os.getpid()}.sock"
    un = new_socket(socket.AF_UNIX)
    raw = struct.pack("=H", socket.AF_UNIX) + path.encode() + b"\0"
    out["unix"] = sys_bind(un, ctypes.create_string_buffer(raw, len(raw)), len(raw))
    os.unlink(path)
    out["own_listen"] = sys_listen(z, 3)
    os.set_blocking(s, True)
    return out, s


def write_json(path, value):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f)
    os.rename(tmp, path)


def answer(conn):
    conn.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            return
        data += chunk
    slot, gen = os.environ.get("REUSE_LAUNCH_SLOT", "?"), os.environ.get("REUSE_LAUNCH_GENERATION", "?")
    body = f"pid={os.getpid()} slot={slot} gen={gen}\n".encode()
    head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
    conn.sendall(head + body)


def serve(fd):
    os.set_blocking(fd, True)
    listener = socket.socket(fileno=fd)
    while True:
        conn, _ = listener.accept()
        with conn:
            try:
                answer(conn)
            except OSError:
                pass


def flood(out):
    fd = bind_port()
    counts = [0, 0, 0, 0]

    def binds(i):
        s = new_socket()
        while True:
            sys_bind(s, sockaddr_in("0.0.0.0", PORT), 16)
            counts[i] += 1

    def listens(i):
        while True:
            sys_listen(fd, 1)
            counts[i] += 1

    for i, f in enumerate([binds, binds, listens, listens]):
        threading.Thread(target=f, args=(i,), daemon=True).start()

    def report():
        while True:
            write_json(f"{out}.{os.environ['REUSE_LAUNCH_SLOT']}", {"calls": sum(counts)})
            time.sleep(0.2)

    threading.Thread(target=report, daemon=True).start()
    serve(fd)


def loop(out):
    fd = bind_port()
    state = {"ok": 0, "failures": [], "slowest_ms": 0.0}

    def binds():
        while True:
            s = new_socket()
            start = time.monotonic()
            r, err = sys_bind(s, sockaddr_in("0.0.0.0", PORT), 16)
            took = (time.monotonic() - start) * 1000
            os.close(s)
            state["slowest_ms"] = max(state["slowest_ms"], took)
            if r == 0:
                state["ok"] += 1
            else:
                state["failures"].append(err)
            time.sleep(0.005)

    def report():
        while True:
            write_json(out, state)
            time.sleep(0.1)

    threading.Thread(target=binds, daemon=True).start()
    threading.Thread(target=report, daemon=True).start()
    serve(fd)


def trap():
    fd = bind_port()
    nr_userfaultfd = {"x86_64": 323, "aarch64": 282, "riscv64": 282}[platform.machine()]
    uffd = libc.syscall(nr_userfaultfd, ctypes.c_long(os.O_CLOEXEC | os.O_NONBLOCK))
    assert uffd >= 0, os.strerror(ctypes.get_errno())
    api = (ctypes.c_uint64 * 3)(0xAA, 0, 0)  # struct uffdio_api: UFFD_API, features, ioctls
    assert libc.ioctl(uffd, ctypes.c_ulong(0xC018AA3F), api) == 0, os.strerror(ctypes.get_errno())
    libc.mmap.restype = ctypes.c_void_p
    page = libc.mmap(None, ctypes.c_size_t(4096), 3, 0x22, -1, ctypes.c_long(0))  # RW, PRIVATE|ANON
    reg = (ctypes.c_uint64 * 4)(page, 4096, 1, 0)  # range, UFFDIO_REGISTER_MODE_MISSING, ioctls
    assert libc.ioctl(uffd, ctypes.c_ulong(0xC020AA00), reg) == 0, os.strerror(ctypes.get_errno())

    def on_usr1(*_):
        def held():
            s = new_socket()
            sys_bind(s, ctypes.c_void_p(page), 16)

        threading.Thread(target=held, daemon=True).start()

    signal.signal(signal.SIGUSR1, on_usr1)
    serve(fd)


def again(out):
    fd = bind_port()

    def on_usr1(*_):
        def bind_once():
            s = new_socket()
            r = sys_bind(s, sockaddr_in("0.0.0.0", PORT), 16)
            write_json(out, {"bind": r, "ino": ino(s), "first_ino": ino(fd)})

        threading.Thread(target=bind_once, daemon=True).start()

    signal.signal(signal.SIGUSR1, on_usr1)
    serve(fd)


def prefork(n):
    fd = bind_port()
    children = []
    for _ in range(n):
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            serve(fd)
        children.append(pid)

    def stop(*_):
        for c in children:
            os.kill(c, signal.SIGTERM)
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    while True:
        signal.pause()


def main():
    mode = sys.argv[1]
    if mode == "probe":
        result, fd = probe()
        write_json(f"{sys.argv[2]}.{os.environ['REUSE_LAUNCH_SLOT']}", result)
        serve(fd)
    elif mode == "loop":
        loop(sys.argv[2])
    elif mode == "flood":
        flood(sys.argv[2])
    elif mode == "again":
        again(sys.argv[2])
    elif mode == "prefork":
        prefork(int(sys.argv[2]))
    elif mode == "trap":
        trap()
    else:
        sys.exit(f"binder: unknown mode {mode}")


main()
