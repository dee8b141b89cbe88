"""benchlib: the pieces of bench/run, the reuse-launch comparison benchmark.

procs      processes the bench starts and how it always stops them (by pid / own group)
tools      installing wrk, nginx and pm2 when missing; building reuse-launch and hello.c; versions
configs    the configurations compared (reuse-launch modes, Node cluster, PM2, nginx, bare C)
workloads  the load shapes (keep-alive, new connection per request, CPU-heavy, one worker stopped)
load       running wrk and parsing it; sampling how requests spread over workers
runner     the plan of cells and the round-by-round alternation; medians
report     results.md, results.json, LATEST.md and the ratios/targets
chart      results.svg
"""
