'use strict';
/**
 * cluster.js: a Node.js cluster primary running N copies of hello.js, the way Node apps
 * usually scale on one machine without a launcher.
 *
 * Environment:
 *   WORKERS                    number of workers (default: the number of CPUs)
 *   NODE_CLUSTER_SCHED_POLICY  `rr` (the primary accepts every connection and passes it to a
 *                              worker over IPC) or `none` (the workers share one socket)
 *   PORT, HOST                 passed through to the workers (default 127.0.0.1:8080)
 *
 * Prints `primary pid=N policy=P: all K workers listening` once every worker listens.
 * Dead workers are not replaced (a benchmark wants to see it, not hide it), unless RESPAWN=1
 * (scripts/chaos: Node cluster under the same SIGKILLs as reuse-launch), which forks a new one.
 * SIGTERM/SIGINT stop every worker, then the primary exits.
 */
const cluster = require('node:cluster');
const os = require('node:os');
const path = require('node:path');

const POLICIES = { rr: cluster.SCHED_RR, none: cluster.SCHED_NONE };

function schedulingPolicy() {
  const name = process.env.NODE_CLUSTER_SCHED_POLICY || 'rr';
  if (!(name in POLICIES)) {
    console.error(`cluster.js: NODE_CLUSTER_SCHED_POLICY must be rr or none, not '${name}'`);
    process.exit(2);
  }
  return name;
}

function workerCount() {
  const n = Number(process.env.WORKERS || os.availableParallelism());
  if (!Number.isInteger(n) || n < 1) {
    console.error(`cluster.js: WORKERS must be a positive integer, not '${process.env.WORKERS}'`);
    process.exit(2);
  }
  return n;
}

let stopping = false;

function stopAll() {
  stopping = true;
  for (const worker of Object.values(cluster.workers)) {
    worker.process.kill('SIGTERM');
  }
  setTimeout(() => process.exit(0), 200).unref();
  cluster.disconnect(() => process.exit(0));
}

function main() {
  const policy = schedulingPolicy();
  const count = workerCount();
  cluster.schedulingPolicy = POLICIES[policy];
  cluster.setupPrimary({ exec: path.join(__dirname, 'hello.js') });

  let listening = 0;
  cluster.on('listening', () => {
    listening += 1;
    if (listening === count) {
      console.log(`primary pid=${process.pid} policy=${policy}: all ${count} workers listening`);
    }
  });
  cluster.on('exit', (worker, code, signal) => {
    console.error(`cluster.js: worker pid=${worker.process.pid} exited (${signal || code})`);
    if (process.env.RESPAWN === '1' && !stopping) {
      cluster.fork();
    }
  });
  for (let i = 0; i < count; i++) {
    cluster.fork();
  }
  process.on('SIGTERM', stopAll);
  process.on('SIGINT', stopAll);
}

main();
