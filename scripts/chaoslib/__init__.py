"""chaoslib: the chaos harness behind scripts/chaos (Python standard library only).

- `load`: HTTP clients on 127.0.0.1, new connections and keep-alive, every request recorded;
- `procs`: /proc readers, the leak watch, the scan for leftover processes;
- `schedule`: the seeded fault schedule;
- `account`: attributing every failed request to a SIGKILL or to nothing (a defect);
- `duration`: `--duration`'s forms (60s, 2m, 500ms, bare seconds), the launcher's; its unit
  test is `test_duration` (`python3 -m unittest discover -s scripts/chaoslib -t scripts`);
- `report`: summary.md, chaos.json and the timeline SVG;
- `run`: the segments (launcher over pyworker, over node, and the SIGKILL comparison with Node
  cluster), their faults, and the last line.
"""
