// An unmodified Express 4 app: app.listen(port) binds PORT itself. Under reuse-launch that
// bind() gets the slot's socket (--intercept-bind). The graceful stop is the one the Express
// docs recommend (close the server, exit once what was accepted is answered).
const express = require('express');
const app = express();
app.get('/', (req, res) => {
  res.send(`pid=${process.pid} slot=${process.env.NODE_APP_INSTANCE} gen=${process.env.REUSE_LAUNCH_GENERATION}\n`);
});
const server = app.listen(Number(process.env.PORT || 3000));
process.on('SIGTERM', () => server.close(() => process.exit(0)));
