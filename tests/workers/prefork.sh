#!/bin/sh
# A prefork server in miniature, for the containment tests (tests/it/containment.rs): the master
# (this shell, the launcher's worker) starts two children in its own process group, as nginx's
# master starts its workers, and with `detach` one double-forked child in a session of its own
# (a daemon it detaches); it reports their pids on stderr (`children PID PID [PID]`, after the
# launcher's `[SLOT PID] ` prefix), then waits. Every process of the tree carries the marker $1
# in its argv (`sleep MARKER.N`), so a test finds them in /proc whatever became of their parents.
#   prefork.sh MARKER [detach]
marker=${1:?usage: prefork.sh MARKER [detach]}
sleep "$marker.1" &
a=$!
sleep "$marker.2" &
b=$!
c=
if [ "$2" = detach ]; then
  # Double fork and setsid: re-parented to the launcher, in no group or session of the master's.
  pidfile=$(mktemp)
  ( setsid sh -c 'echo $$ > "$1"; exec sleep "$2.3"' sh "$pidfile" "$marker" & )
  while [ ! -s "$pidfile" ]; do :; done
  c=$(cat "$pidfile")
  rm -f "$pidfile"
fi
echo "children $a $b $c" >&2
exec sleep "$marker.0"
