'use strict';
/**
 * hello.js: the Node.js HTTP worker every Node configuration of the benchmark runs.
 *
 * Where it listens, in this order:
 *   - LISTEN_FDS set (and LISTEN_PID, if set, is this process), unless HELLO_BIND=1: the
 *     inherited socket on fd 3, as handed down by reuse-launch (or systemd);
 *   - a cluster worker (Node's cluster module, bench/workers/cluster.js or PM2 cluster mode):
 *     listen(PORT) through the cluster primary, which accepts for it (SCHED_RR) or shares
 *     its socket (SCHED_NONE);
 *   - otherwise: its own socket on HOST:PORT (default 127.0.0.1:8080), for the single-process
 *     configuration and for nginx's upstream backends; under reuse-launch with HELLO_BIND=1 that
 *     bind() gets the slot's socket (--intercept-bind: bench/intercept.py).
 *
 * Routes: `/` answers "hello from pid N"; `/cpu` runs a busy loop of 1e7 iterations first;
 * `/mixed` runs a busy loop of 6e6 iterations (about 50 ms on the bench machine) for 1 request in
 * 10, picked at random, and answers at once otherwise (`/mixed?n=K` picks 1 in K).
 * Every response carries an `X-Pid` header so the bench can count how requests spread.
 * Once listening it prints `ready pid=N` on stdout; SIGTERM makes it exit at once.
 */
const cluster = require('node:cluster');
const http = require('node:http');

const CPU_ITERATIONS = 1e7;
const MIXED_ITERATIONS = 6e6;
const PID = String(process.pid);

function busyLoop(iterations = CPU_ITERATIONS) {
  let acc = 0;
  for (let i = 0; i < iterations; i++) {
    acc = (acc * 31 + i) | 0;
  }
  return acc;
}

function handle(req, res) {
  let status = 200;
  let body;
  if (req.url === '/' || req.url.startsWith('/?')) {
    body = `hello from pid ${PID}\n`;
  } else if (req.url === '/cpu' || req.url.startsWith('/cpu?')) {
    body = `cpu ${busyLoop()} from pid ${PID}\n`;
  } else if (req.url === '/mixed' || req.url.startsWith('/mixed?')) {
    const k = Number(new URLSearchParams(req.url.slice(6)).get('n')) || 10;
    const heavy = Math.random() * k < 1;
    body = heavy ? `heavy ${busyLoop(MIXED_ITERATIONS)} from pid ${PID}\n` : `light from pid ${PID}\n`;
  } else {
    status = 404;
    body = `not found (pid ${PID})\n`;
  }
  res.writeHead(status, {
    'Content-Type': 'text/plain',
    'Content-Length': Buffer.byteLength(body),
    'X-Pid': PID,
  });
  res.end(body);
}

/** The argument for server.listen(): see the file comment for the order. */
function listenTarget() {
  const inherited = process.env.LISTEN_FDS && (!process.env.LISTEN_PID || process.env.LISTEN_PID === PID)
    && process.env.HELLO_BIND !== '1';
  if (inherited) {
    return { fd: 3 };
  }
  const port = Number(process.env.PORT || 8080);
  const host = process.env.HOST || '127.0.0.1';
  return { port, host };
}

function main() {
  const server = http.createServer(handle);
  server.on('error', (err) => {
    console.error(`hello.js pid=${PID}: ${err.message}`);
    process.exit(1);
  });
  const target = listenTarget();
  server.listen(target, () => {
    const where = target.fd !== undefined ? 'fd 3' : `${target.host}:${target.port}`;
    const role = cluster.isWorker ? ' cluster-worker' : '';
    console.log(`ready pid=${PID} on ${where}${role}`);
  });
  process.on('SIGTERM', () => process.exit(0));
  process.on('SIGINT', () => process.exit(0));
}

main();
