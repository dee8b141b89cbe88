#!/usr/bin/env node
/**
 * Long-polling socket.io clients (the real `socket.io-client`, transports: ['polling'] only),
 * each from its own loopback source address, for tests/it/sticky.rs:
 *
 *     node client.js PORT [CLIENTS] [ACKS]        (defaults: 20 clients, 6 acks each)
 *     node client.js --versions                   (the installed socket.io and client)
 *
 * Client i (0-based) binds 127.0.0.(2+i) through an http.Agent with `localAddress` and no
 * keep-alive (socket.io-client hands its `agent` option down to the xmlhttprequest-ssl requests
 * of engine.io's polling transport), so every HTTP request is a new TCP connection that the
 * kernel steers on its own. Each client runs one session: the engine.io handshake (GET), the
 * socket.io CONNECT, then ACKS `echo` events one after the other, each waiting for its ack
 * (a POST, answered on a long-polling GET). No reconnection: a session that fails stays failed.
 *
 * Every HTTP response the agent sees is recorded; a *session error* is one that is not 200
 * (engine.io answers a request whose sid this worker does not know with 400
 * `{"code":1,"message":"Session ID unknown"}`). Output, one line per client then a summary:
 *
 *     client 127.0.0.2 ok acks=6 pids=1234 requests=16 connections=16 errors=0
 *     client 127.0.0.3 failed acks=0 pids= requests=4 connections=4 errors=1 (400 Session ID unknown) why=transport error
 *     total clients=20 ok=19 acks=114 requests=300 connections=300 errors=1
 *
 * Exit status 0 whatever happened to the sessions (the test judges), 2 on bad usage.
 */
'use strict';

const http = require('http');

if (process.argv[2] === '--versions') {
  // Their package.json files are not in their `exports`: read the installed ones by path.
  const version = (name) => require(`./node_modules/${name}/package.json`).version;
  console.log(`socket.io ${version('socket.io')}, socket.io-client ${version('socket.io-client')}`);
  process.exit(0);
}

const { io } = require('socket.io-client');

const [port, clients = 20, acks = 6] = process.argv.slice(2).map(Number);
if (!port) {
  console.error('usage: node client.js PORT [CLIENTS] [ACKS]');
  process.exit(2);
}

/** An agent bound to one source address that records every request, connection and answer. */
class RecordingAgent extends http.Agent {
  constructor(localAddress) {
    super({ keepAlive: false, localAddress });
    this.requests = 0;
    this.connections = 0;
    this.errors = [];
  }

  createConnection(options, cb) {
    this.connections += 1;
    return super.createConnection(options, cb);
  }

  addRequest(req, options) {
    this.requests += 1;
    req.on('response', (res) => {
      if (res.statusCode === 200) return;
      let body = '';
      res.on('data', (chunk) => { body += chunk; });
      res.on('end', () => {
        let message = body.trim();
        try { message = JSON.parse(body).message ?? message; } catch { /* not JSON */ }
        this.errors.push(`${res.statusCode} ${message}`);
      });
    });
    return super.addRequest(req, options);
  }
}

function session(i) {
  const addr = `127.0.0.${2 + i}`;
  const agent = new RecordingAgent(addr);
  const result = { addr, ok: false, pids: [], why: '', agent };
  return new Promise((resolve) => {
    const socket = io(`http://127.0.0.1:${port}`, {
      transports: ['polling'],
      agent,
      forceNew: true,
      reconnection: false,
      timeout: 10000,
    });
    let done = false;
    const finish = (why) => {
      if (done) return;
      done = true;
      clearTimeout(deadline);
      result.why = why;
      result.ok = why === '';
      socket.close();
      // Let the answers of requests still in flight (a POST's, a poll's) be recorded.
      setTimeout(() => resolve(result), 300);
    };
    const deadline = setTimeout(() => finish('timeout'), 30000);
    socket.on('connect_error', (e) => finish(`connect_error: ${e.message}`));
    socket.on('disconnect', (reason) => finish(reason));
    socket.on('connect', async () => {
      try {
        for (let n = 0; n < acks; n++) {
          const answer = await socket.timeout(10000).emitWithAck('echo', addr, n);
          result.pids.push(answer.pid);
        }
        finish('');
      } catch (e) {
        finish(`ack: ${e.message}`);
      }
    });
  });
}

(async () => {
  const results = await Promise.all(Array.from({ length: clients }, (_, i) => session(i)));
  const sum = (f) => results.reduce((n, r) => n + f(r), 0);
  for (const r of results) {
    const a = r.agent;
    const errs = a.errors.length ? ` (${a.errors.join('; ')})` : '';
    console.log(`client ${r.addr} ${r.ok ? 'ok' : 'failed'} acks=${r.pids.length} ` +
      `pids=${[...new Set(r.pids)].join(',')} requests=${a.requests} connections=${a.connections} ` +
      `errors=${a.errors.length}${errs}${r.why ? ` why=${r.why}` : ''}`);
  }
  console.log(`total clients=${clients} ok=${sum((r) => r.ok)} acks=${sum((r) => r.pids.length)} ` +
    `requests=${sum((r) => r.agent.requests)} connections=${sum((r) => r.agent.connections)} ` +
    `errors=${sum((r) => r.agent.errors.length)}`);
  // A long-polling GET that socket.close() abandoned can stay open until the server's next
  // ping (25 s): do not wait for it.
  process.exit(0);
})();
