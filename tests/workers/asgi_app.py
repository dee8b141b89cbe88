"""An ASGI app for uvicorn under reuse-launch; answers `pid=1234 slot=0 gen=1`.

Run as:

    reuse-launch -n 2 -b 127.0.0.1:8080 -- uvicorn --app-dir tests/workers asgi_app:app --fd {fd}

uvicorn does not read LISTEN_FDS; `--fd {fd}` (the launcher replaces `{fd}` with 3) makes it
serve on the inherited socket. On TERM uvicorn stops accepting, finishes the requests in flight,
runs the lifespan shutdown and re-raises the signal (the launcher logs the worker as killed by
SIGTERM after a clean shutdown). Its shutdown also closes every connection it has accepted but
not yet read a request from (uvicorn/server.py `Server.shutdown`, then `H11Protocol.shutdown`
when `cycle is None`), so under continuous load on new connections a roll can lose the few
connections accepted just before TERM (measured: 0 to 3 of ~1500 per roll).
"""
import os


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = "pid={} slot={} gen={}\n".format(
        os.getpid(),
        os.environ.get("REUSE_LAUNCH_SLOT", "-"),
        os.environ.get("REUSE_LAUNCH_GENERATION", "-"),
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
