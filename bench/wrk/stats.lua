-- stats.lua: wrk's end-of-run summary in a machine-readable form for bench/run.
--
-- wrk's own --latency table stops at p99; this script adds p99.9, the mean and the max, and
-- the error counters, all on lines starting with "BENCH " (latencies in microseconds).
-- It defines only done(), so it does not slow the request loop down.

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH requests=%d duration_us=%d bytes=%d connect=%d read=%d write=%d status=%d timeout=%d\n",
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout))
  io.write(string.format(
    "BENCH p50_us=%d p75_us=%d p90_us=%d p99_us=%d p999_us=%d mean_us=%.1f max_us=%d\n",
    latency:percentile(50), latency:percentile(75), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9), latency.mean, latency.max))
end
