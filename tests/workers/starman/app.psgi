# A PSGI app for Starman under reuse-launch. Starman (through Plack::Handler::Starman) sees
# SERVER_STARTER_PORT, which the launcher sets (`127.0.0.1:PORT=3`, Server::Starter's form), and
# then serves on those fds with Net::Server::SS::PreFork instead of binding.
# Answers `pid=.. slot=.. gen=.. starter=..` (the pid of the Starman worker process that served
# it, and the SERVER_STARTER_PORT it saw: a test cannot read that from /proc/PID/environ, since
# Perl's `$0 = ..` overwrites the environ area with the new process title).
#
# Run it with --stop-signal QUIT (Starman's graceful stop). The launcher sends the stop signal
# to the worker's whole process group, so Starman's own worker processes get that QUIT too, and
# Net::Server::PreFork's worker handler for QUIT exits at once, even in the middle of a request
# (Server::Starter signals only the master). This file is loaded in each Starman worker (unless
# --preload-app), so it ignores QUIT there: the master's graceful shutdown sends its workers
# HUP, on which each finishes the request in hand and exits.
$SIG{QUIT} = 'IGNORE';

sub {
    my $body = sprintf "pid=%d slot=%s gen=%s starter=%s\n", $$, $ENV{REUSE_LAUNCH_SLOT} // '',
      $ENV{REUSE_LAUNCH_GENERATION} // '', $ENV{SERVER_STARTER_PORT} // '';
    return [200, ['Content-Type' => 'text/plain', 'Content-Length' => length $body], [$body]];
};
