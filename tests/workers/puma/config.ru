# A Rack app for puma under reuse-launch: answers `pid=.. slot=.. gen=..`. puma adopts the
# launcher's socket itself from LISTEN_FDS/LISTEN_PID (systemd socket activation) when its
# -b names the same address: -b tcp://127.0.0.1:{port}.
body = "pid=%d slot=%s gen=%s\n"
run lambda { |_env|
  text = format(body, Process.pid, ENV["REUSE_LAUNCH_SLOT"], ENV["REUSE_LAUNCH_GENERATION"])
  [200, { "Content-Type" => "text/plain", "Content-Length" => text.bytesize.to_s }, [text]]
}
