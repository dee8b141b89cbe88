"""A WSGI app for gunicorn under reuse-launch; answers `pid=1234 slot=0 gen=1`.

Run as (one gunicorn master per slot, each with one sync worker):

    reuse-launch -n 2 -b 127.0.0.1:8080 --ready notify -- \
        gunicorn --workers 1 --no-control-socket --chdir tests/workers wsgi_app:app

gunicorn adopts the slot's socket by itself: its arbiter reads LISTEN_FDS when LISTEN_PID is its
own pid, which the launcher sets. Do NOT add `-b fd://3` on top: gunicorn then takes fd 3 twice
and crashes. Its arbiter also sends READY=1 to NOTIFY_SOCKET once booted, so `--ready notify`
works as is. `--no-control-socket`: gunicorn 27 opens a control socket at one fixed path
($XDG_RUNTIME_DIR/gunicorn.ctl, else ~/.gunicorn/gunicorn.ctl), which the masters of the slots
would take from each other. TERM, which the launcher sends to the whole process group, is
gunicorn's graceful stop: master and worker finish the requests in flight and exit 0. The pid in
the answer is gunicorn's worker process, a child of the master the launcher started.
"""
import os


def app(environ, start_response):
    body = "pid={} slot={} gen={}\n".format(
        os.getpid(),
        os.environ.get("REUSE_LAUNCH_SLOT", "-"),
        os.environ.get("REUSE_LAUNCH_GENERATION", "-"),
    ).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
