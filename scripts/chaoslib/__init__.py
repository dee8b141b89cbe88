"""chaoslib: the chaos harness behind scripts/chaos (Python standard library only).

- `load`: HTTP clients on 127.0.0.1, new connections and keep-alive, every request recorded;
- `procs`: /proc readers, the leak watch, the scan for leftover processes;
- `schedule`: the seeded fault schedule;
- `account`: attributing every failed request to a SIGKILL or to nothing (a defect);
- `report`: summary.md, chaos.json and the timeline SVG;
- `run`: the segments (launcher over pyworker, over node, and the SIGKILL comparison with Node
  cluster), their faults, and the last line.
"""
