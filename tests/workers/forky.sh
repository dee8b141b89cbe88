#!/bin/sh
# A worker that leaves children behind it, for the sentinel tests: one in its process group,
# one double-forked (re-parented to the launcher), one in a session of its own, one both.
# $1 is a token that makes them findable: each sleeps $1 seconds plus a little.
token=${1:-9000}
sleep "$token.1" &
( sleep "$token.2" & )
setsid sleep "$token.3" &
( setsid sleep "$token.4" & )
shift
exec python3 "$(dirname "$0")/pyworker.py" "$@"
