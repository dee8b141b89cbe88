#!/usr/bin/env node
/**
 * An HTTP worker in Node.js (any current version) that adopts the launcher's socket with
 * `server.listen({fd: 3})`: no cluster module, no port of its own. Every request is answered
 * with one line naming who answered:
 *
 *     pid=1234 slot=0 gen=1
 *
 * On SIGTERM it stops accepting, answers the requests in flight and the next request of every
 * open connection with `Connection: close`, closes what is still idle a second later, and exits
 * 0 once the last connection is gone.
 * Connections it has not accepted stay queued in the launcher's socket for the next worker.
 */
'use strict';

const http = require('http');
const net = require('net');

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
  // Stop accepting only. http.Server.close() (Node 19+) would also destroy at once every
  // connection without a request in progress: a keep-alive client's next request, or a
  // connection accepted a moment ago whose request is on its way, then meets a reset (found by
  // scripts/chaos). Those get one more answer, with Connection: close; what is still idle a
  // second later is closed then.
  net.Server.prototype.close.call(server, () => process.exit(0));
  setTimeout(() => server.closeIdleConnections(), 1000).unref();
});
