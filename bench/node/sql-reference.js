// sql_bench's second reference: what a developer would write by hand instead of Fluxbase's
// SQL endpoint. Node.js `http` + node-postgres (`pg.Pool` of BENCH_POOL connections), the
// guide's request (`POST /api/execute-sql`, `Authorization: Bearer <key>`, JSON
// `{projectId, query, params}`) and answer shapes (`success`, `result {rows, columns,
// columnTypes, rowCount, message, truncated}`, `executionInfo {time, rowCount, operation}`,
// SQL errors as 200 `SQL_EXEC_ERROR`). The key is compared with a constant; no scopes, no
// per-request session reset, no limits: the work Fluxbase does on top is what the ratio shows.
//
// Environment: PORT, DATABASE_URL, API_KEY, PROJECT_ID, BENCH_POOL. Prints "listening <port>".
'use strict';
const http = require('http');
const pg = require('pg');

const pool = new pg.Pool({ connectionString: process.env.DATABASE_URL, max: Number(process.env.BENCH_POOL || 8) });
const expected = 'Bearer ' + process.env.API_KEY;
const project = process.env.PROJECT_ID;
const typeNames = new Map();
const MAX_BODY = 1 << 20;

function send(res, status, body) {
  const text = JSON.stringify(body);
  res.writeHead(status, { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(text) });
  res.end(text);
}

function refuse(res, status, code, message) {
  send(res, status, { success: false, error: { message, code } });
}

async function execute(res, req) {
  const started = process.hrtime.bigint();
  let result;
  try {
    result = await pool.query({ text: req.query, values: req.params || [] });
  } catch (e) {
    if (!e.code) throw e;
    return send(res, 200, { success: false, error: { message: e.message, code: 'SQL_EXEC_ERROR', details: `ERROR:  ${e.code}` } });
  }
  const ms = Number(process.hrtime.bigint() - started) / 1e6;
  const rowCount = result.rowCount ?? result.rows.length;
  send(res, 200, {
    success: true,
    result: {
      rows: result.rows,
      columns: result.fields.map((f) => f.name),
      columnTypes: result.fields.map((f) => typeNames.get(f.dataTypeID) || String(f.dataTypeID)),
      rowCount,
      message: result.command === 'SELECT' ? null : `${result.command} ${rowCount}`,
      truncated: false,
    },
    executionInfo: { time: `${Math.round(ms)}ms`, rowCount, operation: result.command },
  });
}

const server = http.createServer((req, res) => {
  if (req.method !== 'POST' || req.url !== '/api/execute-sql') return refuse(res, 404, 'NOT_FOUND', 'no such endpoint');
  if (req.headers.authorization !== expected) return refuse(res, 401, 'UNAUTHORIZED', 'invalid API key');
  const chunks = [];
  let size = 0;
  req.on('data', (c) => {
    size += c.length;
    if (size > MAX_BODY) req.destroy();
    else chunks.push(c);
  });
  req.on('end', () => {
    let body;
    try {
      body = JSON.parse(Buffer.concat(chunks));
    } catch (e) {
      return refuse(res, 400, 'INVALID_REQUEST', 'the body is not JSON');
    }
    if (body.projectId !== project || typeof body.query !== 'string') return refuse(res, 400, 'INVALID_REQUEST', 'projectId and query');
    execute(res, body).catch((e) => refuse(res, 503, 'DATABASE_UNAVAILABLE', e.message));
  });
});

pool.query('SELECT oid, typname FROM pg_catalog.pg_type').then((r) => {
  for (const t of r.rows) typeNames.set(Number(t.oid), t.typname);
  server.keepAliveTimeout = 60000;
  server.listen(Number(process.env.PORT), '127.0.0.1', () => console.log(`listening ${server.address().port}`));
}, (e) => {
  console.error(e.message);
  process.exit(1);
});
