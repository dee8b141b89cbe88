#!/usr/bin/env node
/**
 * An HTTP worker in Node.js (any current version) that adopts the launcher's socket with
 * `server.listen({fd: 3})`: no cluster module, no port of its own. Every request is answered
 * with one line naming who answered:
 *
 *     pid=1234 slot=0 gen=1
 *
 * On SIGTERM it stops accepting (server.close()), closes idle keep-alive connections, answers
 * the requests in flight with `Connection: close`, and exits 0 once the last connection is gone.
 * Connections it has not accepted stay queued in the launcher's socket for the next worker.
 */
'use strict';

const http = require('http');

let closing = false;

const server = http.createServer((req, res) => {
  const body = `pid=${process.pid} slot=${process.env.REUSE_LAUNCH_SLOT ?? '-'} ` +
    `gen=${process.env.REUSE_LAUNCH_GENERATION ?? '-'}\n`;
  const headers = { 'Content-Type': 'text/plain', 'Content-Length': Buffer.byteLength(body) };
  if (closing) headers.Connection = 'close';
  res.writeHead(200, headers);
  res.end(body);
});

// Test knobs: START_DELAY_MS waits before listening (a slow start); MARK_DIR gets a file named
// after the pid just before listen(), i.e. before the socket can be in libuv's epoll set.
function listen() {
  if (process.env.MARK_DIR) require('fs').writeFileSync(`${process.env.MARK_DIR}/${process.pid}`, '');
  server.listen({ fd: 3 }, () => {
    const { address, port } = server.address();
    console.error(`node-fd: node ${process.version} listens on fd 3 (${address}:${port})`);
  });
}
setTimeout(listen, Number(process.env.START_DELAY_MS || 0));

process.on('SIGTERM', () => {
  closing = true;
  server.close(() => process.exit(0));
  server.closeIdleConnections();
});
