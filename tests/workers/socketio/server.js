#!/usr/bin/env node
/**
 * A socket.io worker (the real `socket.io` package, version pinned in package.json) on the
 * launcher's socket: an http server that adopts fd 3 with `server.listen({fd: 3})`, socket.io
 * attached with its defaults, so every engine.io session lives in this process's memory only.
 * A long-polling client whose requests reach another worker gets HTTP 400
 * `{"code":1,"message":"Session ID unknown"}`: that is why it needs sticky sessions.
 *
 * Events: `echo` (any arguments) acks with `{pid, slot, gen, args}`, naming the worker.
 *
 * On SIGTERM it closes socket.io (every session) and the http server, and exits 0.
 */
'use strict';

const http = require('http');
const { Server } = require('socket.io');

const me = {
  pid: process.pid,
  slot: process.env.REUSE_LAUNCH_SLOT ?? '-',
  gen: process.env.REUSE_LAUNCH_GENERATION ?? '-',
};

const server = http.createServer((req, res) => {
  // What socket.io does not take (it serves /socket.io/): a plain answer, as node-fd.js gives.
  const body = `pid=${me.pid} slot=${me.slot} gen=${me.gen}\n`;
  res.writeHead(200, { 'Content-Type': 'text/plain', 'Content-Length': Buffer.byteLength(body) });
  res.end(body);
});

const io = new Server(server);
io.on('connection', (socket) => {
  socket.on('echo', (...args) => {
    const ack = typeof args[args.length - 1] === 'function' ? args.pop() : null;
    if (ack) ack({ ...me, args });
  });
});

// socket.io's package.json is not in its `exports`: read the installed one by path.
const version = require('./node_modules/socket.io/package.json').version;
server.listen({ fd: 3 }, () => {
  const { address, port } = server.address();
  console.error(`socketio: socket.io ${version} on node ${process.version} listens on fd 3 (${address}:${port})`);
});

process.on('SIGTERM', () => {
  io.close(() => process.exit(0));
  server.closeIdleConnections();
});
