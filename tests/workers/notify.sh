#!/bin/sh
# A POSIX shell worker that says it is ready with systemd's own tool, as a shell wrapper around
# any server would under `--ready notify`:
#
#   1. starts tests/workers/pyworker.py (without --notify) in the background on the inherited
#      fd 3; the child execs from `sh -c` so that LISTEN_PID can name the child's own pid;
#   2. waits READY_AFTER seconds (default 0), standing for a slow warm-up;
#   3. runs `systemd-notify --ready --status=...` (systemd >= 252 also sends BARRIER=1 and waits
#      until the launcher closes the fd it attached);
#   4. on TERM (the launcher signals the whole process group, so the server gets it too), passes
#      TERM on to the server, waits for it and exits with its status.
set -u

here=$(dirname "$0")
sh -c 'export LISTEN_PID=$$; exec python3 "$1/pyworker.py"' sh "$here" &
server=$!
trap 'kill -TERM "$server" 2>/dev/null || true; wait "$server"; exit $?' TERM

sleep "${READY_AFTER:-0}"
systemd-notify --ready --status="ready after ${READY_AFTER:-0}s"

wait "$server"
