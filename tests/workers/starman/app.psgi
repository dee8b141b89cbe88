# A PSGI app for Starman under reuse-launch. Starman (through Plack::Handler::Starman) sees
# SERVER_STARTER_PORT, which the launcher sets (`127.0.0.1:PORT=3`, Server::Starter's form), and
# then serves on those fds with Net::Server::SS::PreFork instead of binding.
# Answers `pid=.. slot=.. gen=..` (the pid of the Starman worker process that served it).
sub {
    my $body = sprintf "pid=%d slot=%s gen=%s\n", $$, $ENV{REUSE_LAUNCH_SLOT} // '', $ENV{REUSE_LAUNCH_GENERATION} // '';
    return [200, ['Content-Type' => 'text/plain', 'Content-Length' => length $body], [$body]];
};
