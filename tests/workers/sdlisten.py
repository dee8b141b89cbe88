#!/usr/bin/env python3
"""An HTTP worker that takes its socket the way C servers do: through libsystemd itself.

It loads libsystemd.so.0 with ctypes and asks the library, not the environment, whether it was
handed a socket: `sd_listen_fds(0)` must return at least 1 (it checks LISTEN_PID against this
process and reads LISTEN_FDS) and `sd_is_socket_inet(3, AF_UNSPEC, SOCK_STREAM, 1, 0)` must
say fd 3 is a listening inet stream socket. Otherwise it refuses to start and exits 3, saying
why. Then it serves on fd 3 with tests/workers/pyworker.py's handler, answering

    pid=1234 slot=0 gen=1

and on SIGTERM stops accepting, finishes the requests it has accepted and exits 0.
"""
import ctypes
import os
import signal
import socket
import sys
import threading

from pyworker import Server

SD_LISTEN_FDS_START = 3



def say(line):
    """One line to stderr in a single write: lines of several workers sharing the launcher's
    stderr must not interleave (print() writes the text and the newline separately)."""
    os.write(2, (line + "\n").encode())

def adopt_with_libsystemd():
    try:
        lib = ctypes.CDLL("libsystemd.so.0")
    except OSError as e:
        refuse(f"cannot load libsystemd.so.0 ({e}); install the systemd package (libsystemd0)")
    lib.sd_listen_fds.argtypes = [ctypes.c_int]
    lib.sd_is_socket_inet.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_uint16]
    n = lib.sd_listen_fds(0)
    if n < 1:
        refuse(
            f"sd_listen_fds(0) returned {n} (LISTEN_FDS={os.environ.get('LISTEN_FDS')}, "
            f"LISTEN_PID={os.environ.get('LISTEN_PID')}, my pid {os.getpid()})"
        )
    fd = SD_LISTEN_FDS_START
    if lib.sd_is_socket_inet(fd, socket.AF_UNSPEC, socket.SOCK_STREAM, 1, 0) <= 0:
        refuse(f"sd_is_socket_inet({fd}) says fd {fd} is not a listening inet stream socket")
    sock = socket.socket(fileno=fd)
    # Non-blocking accept, as in pyworker.py: another process may take the connection first.
    sock.setblocking(False)
    host, port = sock.getsockname()[:2]
    say(f"sdlisten: libsystemd sd_listen_fds(0) = {n}; fd {fd} listens on {host}:{port}")
    return sock


def refuse(why):
    say(f"sdlisten: refusing to start: {why}")
    sys.exit(3)


def main():
    server = Server(adopt_with_libsystemd())
    # shutdown() waits for serve_forever(), so it must run on another thread.
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    server.serve_forever(poll_interval=0.05)
    server.server_close()


if __name__ == "__main__":
    main()
