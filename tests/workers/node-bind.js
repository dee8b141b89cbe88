// An unmodified node server: it binds PORT itself, the way `pm2 start server.js -i 4` runs it
// (seed 003's server, with an answer the tests can read, and the graceful stop any production
// server has: finish what was accepted, then exit). Under reuse-launch its listen() gets the
// slot's socket (--intercept-bind); NODE_APP_INSTANCE is the slot, as PM2 sets it.
// With EXTRA_PORT (slot 0 only), it also serves on that port, which is not a --bind port; with
// UDP=1 (slot 0 only) it also answers UDP datagrams on PORT itself.
const http = require('http');
const answer = (req, res) =>
  res.end(`pid=${process.pid} slot=${process.env.NODE_APP_INSTANCE} gen=${process.env.REUSE_LAUNCH_GENERATION}\n`);
const server = http.createServer(answer).listen(process.env.PORT || 8080);
if (process.env.NODE_APP_INSTANCE === '0' && process.env.EXTRA_PORT) {
  http.createServer(answer).listen(Number(process.env.EXTRA_PORT), '127.0.0.1');
}
if (process.env.NODE_APP_INSTANCE === '0' && process.env.UDP === '1') {
  const udp = require('dgram').createSocket('udp4');
  udp.on('message', (msg, from) => udp.send(`udp pid=${process.pid} ${msg}`, from.port, from.address));
  udp.bind(Number(process.env.PORT), '127.0.0.1');
}
process.on('SIGTERM', () => server.close(() => process.exit(0)));
