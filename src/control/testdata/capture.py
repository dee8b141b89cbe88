#!/usr/bin/env python3
"""Record what a launcher answers on its control socket, byte for byte.

    python3 src/control/testdata/capture.py BINARY OUT_DIR

Starts BINARY with 2 python test workers, sends the README's "### Protocol" requests (and the
error cases the tests use) on the control socket, and runs the client subcommands. Writes
OUT_DIR/protocol.txt: one `> request` line (as sent, escaped as a Python bytes literal) followed
by the `< answer` lines exactly as received, with the launcher's pid replaced by {pid}; and
OUT_DIR/client.txt: each subcommand's exit code, stdout and stderr, same substitution.
Recorded from the binary built at main 3b7ca04 (before the control protocol went through
serde_json); the tests compare the new implementation against these files.
"""
import os
import socket
import subprocess
import sys
import tempfile
import time

binary, out_dir = sys.argv[1], sys.argv[2]
here = os.path.dirname(os.path.abspath(__file__))
worker = os.path.join(here, "..", "..", "..", "tests", "workers", "pyworker.py")
tmp = tempfile.mkdtemp(prefix="rl-capture-")
sock = os.path.join(tmp, "c.sock")
log = open(os.path.join(tmp, "log"), "w+")
env = dict(os.environ, RUST_LOG="info")
env.pop("REUSE_LAUNCH_CONTROL", None)
launcher = subprocess.Popen(
    [binary, "-b", "127.0.0.1:0", "-n", "2", "--ready-delay", "300ms", "--control", sock, "--",
     "python3", worker], stderr=log, stdin=subprocess.DEVNULL, env=env)
pid = str(launcher.pid)


def wait_for(text, timeout=30):
    end = time.time() + timeout
    while time.time() < end:
        log.seek(0)
        if text in log.read():
            return
        time.sleep(0.05)
    raise SystemExit(f"no {text!r} in the log")


def exchange(requests, answers):
    """Send `requests` (bytes) on one connection, read `answers` lines."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(20)
    s.connect(sock)
    s.sendall(requests)
    if not requests.endswith(b"\n"):
        s.shutdown(socket.SHUT_WR)
    data = b""
    while data.count(b"\n") < answers:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    s.close()
    return data


def norm(b):
    return b.decode().replace(pid, "{pid}").replace(sock, "{control}")


try:
    wait_for("all 2 workers ready")
    cases = [
        (b'{"cmd":"scale","workers":"+2"}\n', 1),
        (b'{"cmd":"roll","id":1}\n{"cmd":"nope"}\nnot json\n', 3),
        (b'{"cmd":"scale","workers":"-2"}\n', 1),
        (b'{"cmd":"scale","workers":3,"id":"x"}\n', 1),
        (b'{"cmd":"scale","workers":0}\n', 1),
        (b'{"cmd":"scale","workers":-1}\n', 1),
        (b'{"cmd":"scale","workers":2.5}\n', 1),
        (b'{"cmd":"scale","workers":"many","id":[1,{"a":null}]}\n', 1),
        (b'{"cmd":"scale"}\n', 1),
        (b'{"cmd":"scale","workers":true}\n', 1),
        (b'{"cmd":"scale","workers":"2"}\n', 1),
        (b'{"cmd":"reboot"}\n', 1),
        (b'{"id":null}\n', 1),
        (b'{"cmd":5,"id":2.0}\n', 1),
        (b'[1,2]\n', 1),
        (b'this is not json\n', 1),
        (b'{"cmd":"status"\n', 1),
        (b'{"cmd":"status"} x\n', 1),
        (b'{"cmd":"roll","id":"\\u00e9\\n"}\n', 1),
        (b'\n\n{"cmd":"stop","id":3}', 1),
    ]
    with open(os.path.join(out_dir, "protocol.txt"), "w") as f:
        for i, (req, n) in enumerate(cases):
            if req.startswith(b'{"cmd":"scale","workers":"2"}'):
                wait_for("all 2 workers ready")
            if b'"stop"' in req:
                wait_for("roll gen 3 done")
            data = exchange(req, n)
            f.write(f"> {req!r}\n")
            for line in data.decode().splitlines(True):
                f.write("< " + norm(line.encode()))
            if b'"stop"' in req:
                break
    launcher.wait(timeout=30)
    launcher = subprocess.Popen(
        [binary, "-b", "127.0.0.1:0", "-n", "2", "--ready-delay", "300ms", "--control", sock, "--",
         "python3", worker], stderr=log, stdin=subprocess.DEVNULL, env=env)
    pid = str(launcher.pid)
    log.truncate(0)
    wait_for("all 2 workers ready")
    with open(os.path.join(out_dir, "client.txt"), "w") as f:
        for args in [["scale", "+1"], ["scale", "many"], ["scale", "-5"], ["scale", "-1"], ["roll"],
                     ["status", "--json"], ["status"], ["stop"]]:
            if args[0] == "status":
                wait_for("roll gen 2 done")
            r = subprocess.run([binary] + args + ["--control", sock], capture_output=True, env=env)
            f.write(f"$ reuse-launch {' '.join(args)}\n? {r.returncode}\n")
            for line in r.stdout.splitlines(True):
                f.write("1 " + norm(line))
            for line in r.stderr.splitlines(True):
                f.write("2 " + norm(line))
    launcher.wait(timeout=30)
finally:
    if launcher.poll() is None:
        launcher.kill()
