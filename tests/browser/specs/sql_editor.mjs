// The SQL Editor: a table and rows made with Ctrl+Enter; a SELECT's grid with column names and
// PostgreSQL types, row count and time; an error with its code, SQLSTATE and the guide's hint;
// the project's history (reload one); running as an end user under a row-level security policy
// (the guide's RLS step 04); the truncation notice; a viewer's DDL refused with 42501.
import { spec, BASE, projectFor, assert, call, textOf, memberAs } from '../lib/harness.mjs';

/** Replaces the editor's text (typed, as a user would). */
async function setQuery(page, text) {
  await page.click('[data-sql-editor]');
  await page.evaluate(() => { const e = document.querySelector('[data-sql-editor]'); e.value = ''; });
  await page.type('[data-sql-editor]', text);
}

/** Runs the editor's query (Run button, or Ctrl+Enter) and waits for its answer: the result
 * area's old content is marked first, so the wait ends on the new one. */
async function run(page, { keys = false } = {}) {
  await page.$$eval('[data-result] > *', (els) => els.forEach((e) => e.setAttribute('data-stale', '')));
  if (keys) {
    await page.focus('[data-sql-editor]');
    await page.keyboard.down('Control');
    await page.keyboard.press('Enter');
    await page.keyboard.up('Control');
  } else {
    await page.click('[data-run]');
  }
  await page.waitForSelector('[data-result]:not([aria-busy]) > :not([data-stale])');
}

async function sqlAs(token, projectId, query, extra = {}) {
  const r = await call('POST', '/api/execute-sql', { token, body: { projectId, query, ...extra } });
  assert.equal(r.status, 200, JSON.stringify(r.body));
  return r.body;
}

await spec('sql_editor', async (t) => {
  const page = await t.newPage();
  await t.signUp(page);
  const token = await t.token(page);
  // The project through the API, then the view by its address (the page waits for the app).
  const { id: projectId } = await projectFor(token);
  await t.visit(page, projectId, 'sql');
  await page.waitForSelector('[data-sql-editor]');
  assert.match(await textOf(page, '[data-history]'), /Queries you run/);

  t.log('Tab inserts two spaces in the editor');
  await page.click('[data-sql-editor]');
  await page.keyboard.type('SELECT');
  await page.keyboard.press('Tab');
  await page.keyboard.type('1');
  assert.equal(await page.$eval('[data-sql-editor]', (e) => e.value), 'SELECT  1');
  assert.equal(await page.evaluate(() => document.activeElement.matches('[data-sql-editor]')), true);

  t.log('create a table and rows with Ctrl+Enter');
  await setQuery(page, "CREATE TABLE posts (id serial PRIMARY KEY, user_id text NOT NULL, body text, score int4, tags text[], meta jsonb);\n"
    + "INSERT INTO posts (user_id, body, score, tags, meta) VALUES ('alice', 'hi from alice', 10, '{a,b}', '{\"k\": 1}'), ('bob', 'hi from bob', 20, NULL, NULL), ('alice', 'again', 30, '{}', '[]');");
  await run(page, { keys: true });
  assert.equal(await page.$eval('[data-operation]', (e) => e.dataset.operation), 'INSERT');
  assert.equal(await page.$eval('[data-message]', (e) => e.textContent), 'INSERT 0 3');
  const made = await sqlAs(token, projectId, 'SELECT user_id, body, score FROM posts ORDER BY id');
  assert.deepEqual(made.result.rows.map((r) => r.body), ['hi from alice', 'hi from bob', 'again']);

  t.log('a SELECT: column names and types, row count, time');
  const select = 'SELECT id, user_id, body, score, tags, meta, now() AS at\nFROM posts\nORDER BY id';
  await setQuery(page, select);
  await run(page);
  const headers = await page.$$eval('[data-grid] thead th', (ths) => ths.map((th) => [th.dataset.column, th.querySelector('[data-type]') ? th.querySelector('[data-type]').dataset.type : null]));
  assert.deepEqual(headers.map((x) => x[0]), ['id', 'user_id', 'body', 'score', 'tags', 'meta', 'at']);
  assert.deepEqual(headers.map((x) => x[1]), ['int4', 'text', 'text', 'int4', 'text[]', 'jsonb', 'timestamptz']);
  assert.equal(await page.$eval('[data-row-count]', (e) => e.dataset.rowCount), '3');
  assert.match(await textOf(page, '[data-row-count]'), /^3 rows$/);
  assert.match(await page.$eval('[data-time]', (e) => e.dataset.time), /^\d+(\.\d+)?\s*(ms|s|µs|us)$/);
  assert.equal(await page.$eval('[data-operation]', (e) => e.dataset.operation), 'SELECT');
  const cells = await page.$$eval('[data-grid] tbody tr', (trs) => trs.map((tr) => [...tr.cells].map((td) => td.innerText)));
  const oracle = await sqlAs(token, projectId, select);
  assert.equal(cells.length, oracle.result.rows.length);
  assert.deepEqual(cells.map((c) => c.slice(0, 4)), oracle.result.rows.map((r) => [String(r.id), r.user_id, r.body, String(r.score)]));
  assert.equal(cells[1][4], 'NULL');
  assert.equal(cells[0][5], '{"k":1}');
  await t.shot(page, 'select');
  await t.shot(page, 'select-dark', { dark: true });

  t.log('an error: code, SQLSTATE and a hint');
  await setQuery(page, 'SELECT * FROM post');
  await run(page);
  await page.waitForSelector('[data-error] .error-box[data-code=SQL_EXEC_ERROR]');
  assert.equal(await page.$eval('[data-error] .error-box', (e) => e.dataset.sqlstate), '42P01');
  assert.match(await textOf(page, '[data-error]'), /relation "post" does not exist/);
  assert.match(await textOf(page, '[data-error]'), /42P01/);
  assert.match(await textOf(page, '[data-error] [data-position]'), /line 1, column 15/);
  assert.ok(await page.$('[data-error] [data-hint="42P01"]'));
  await t.shot(page, 'error');
  await t.shot(page, 'error-dark', { dark: true });

  t.log('the guide\'s hint for integer = text');
  await setQuery(page, 'SELECT * FROM posts WHERE score = auth.uid()');
  await run(page);
  assert.equal(await page.$eval('[data-error] .error-box', (e) => e.dataset.sqlstate), '42883');
  assert.match(await textOf(page, '[data-hint="42883"]'), /Cast explicitly: user_id::text = auth\.uid\(\)/);

  t.log('the history holds the queries, newest first, and reloads one');
  let items = await page.$$eval('[data-history-item]', (bs) => bs.map((b) => b.title));
  assert.equal(items.length, 4, items.join('\n'));
  assert.equal(items[0], 'SELECT * FROM posts WHERE score = auth.uid()');
  assert.equal(items[2], select);
  await page.reload();
  await page.waitForSelector('[data-history-item="2"]');
  items = await page.$$eval('[data-history-item]', (bs) => bs.map((b) => b.title));
  assert.equal(items.length, 4);
  await page.click('[data-history-item="2"]');
  assert.equal(await page.$eval('[data-sql-editor]', (e) => e.value), select);
  await run(page);
  assert.equal(await page.$eval('[data-row-count]', (e) => e.dataset.rowCount), '3');
  items = await page.$$eval('[data-history-item]', (bs) => bs.map((b) => b.title));
  assert.equal(items[0], select, 'a query run again moves to the top, once');
  assert.equal(items.length, 4);
  const history = await page.evaluate(() => JSON.stringify(Object.entries(sessionStorage).filter(([k]) => k.startsWith('fluxbase.sql.history.'))));
  assert.match(history, /SELECT/, 'the history is in sessionStorage');
  assert.doesNotMatch(history, /flx_(sess|live)_/, 'the history keeps SQL text only');
  assert.deepEqual(await page.evaluate(() => Object.keys(localStorage).filter((k) => k.startsWith('fluxbase.sql'))), [], 'nothing outlives the tab');

  t.log('a policy made as the owner; run as end user alice');
  await setQuery(page, 'ALTER TABLE posts ENABLE ROW LEVEL SECURITY;\nCREATE POLICY own_rows ON posts USING (user_id = auth.uid())');
  await run(page);
  assert.equal(await page.$eval('[data-operation]', (e) => e.dataset.operation), 'CREATE POLICY');
  await page.select('[data-run-as]', 'user');
  await page.waitForSelector('[data-user-fields]:not([hidden])');
  await page.select('[data-scope]', 'read');
  await page.type('[data-auth-uid]', 'alice');
  const mine = 'SELECT body FROM posts ORDER BY id';
  await setQuery(page, mine);
  await run(page);
  assert.equal(await page.$$eval('[data-error]', (e) => e.length), 0, await textOf(page, '[data-result]'));
  const aliceCells = await page.$$eval('[data-grid] tbody td', (tds) => tds.map((td) => td.innerText));
  assert.deepEqual(aliceCells, ['hi from alice', 'again']);
  // Oracle: a read API key acting for alice (the path the guide's backends take).
  const key = await call('POST', '/api/keys', { token, body: { projectId, scope: 'read', name: 'oracle' } });
  assert.equal(key.status, 201, JSON.stringify(key.body));
  const asAlice = await sqlAs(key.body.secret, projectId, mine, { authUid: 'alice' });
  assert.deepEqual(asAlice.result.rows.map((r) => r.body), aliceCells);
  const asOwner = await sqlAs(token, projectId, mine);
  assert.equal(asOwner.result.rows.length, 3, 'the owner role bypasses the policy');
  await t.shot(page, 'run-as-alice');

  t.log('an end user no policy admits: no rows, and the RLS hint');
  await page.$eval('[data-auth-uid]', (e) => { e.value = ''; });
  await page.type('[data-auth-uid]', 'carol');
  await run(page);
  assert.equal(await page.$eval('[data-row-count]', (e) => e.dataset.rowCount), '0');
  assert.match(await textOf(page, '[data-hint="rls"]'), /Row-level security may filter them.*"carol"/);

  t.log('the read scope cannot write: 42501');
  await setQuery(page, "INSERT INTO posts (user_id, body) VALUES ('alice', 'nope')");
  await run(page);
  assert.equal(await page.$eval('[data-error] .error-box', (e) => e.dataset.sqlstate), '42501');
  assert.match(await textOf(page, '[data-hint="42501"]'), /read scope may only SELECT/);

  t.log('back to yourself: a truncated answer');
  await page.select('[data-run-as]', 'owner');
  await page.waitForSelector('[data-user-fields][hidden]', { hidden: true });
  await setQuery(page, 'SELECT generate_series(1, 20000) AS n');
  await run(page);
  await page.waitForSelector('[data-truncated]');
  assert.equal(await page.$eval('[data-row-count]', (e) => e.dataset.rowCount), '20000');
  assert.match(await textOf(page, '[data-truncated]'), /20000 rows; the server sent the first 10000/);
  assert.equal(await page.$$eval('[data-grid] tbody tr', (trs) => trs.length), 500);
  await page.click('[data-show-more]');
  assert.equal(await page.$$eval('[data-grid] tbody tr', (trs) => trs.length), 1000);
  const big = await sqlAs(token, projectId, 'SELECT generate_series(1, 20000) AS n');
  assert.equal(big.result.truncated, true);
  assert.equal(big.result.rows.length, 10000);
  await t.shot(page, 'truncated');

  t.log('clearing the history asks first');
  const kept = (await page.$$('[data-history-item]')).length;
  assert.equal(kept, 8, 'eight distinct queries ran');
  await page.click('[data-clear-history]');
  await page.click('dialog[open] button[data-action="Cancel"]');
  await page.waitForSelector('dialog[open]', { hidden: true });
  assert.equal((await page.$$('[data-history-item]')).length, kept);
  await page.click('[data-clear-history]');
  await page.click('dialog[open] button[data-action="Clear history"]');
  await page.waitForFunction(() => !document.querySelector('[data-history-item]'));
  assert.equal(await page.evaluate((id) => Object.keys(sessionStorage).filter((k) => k.endsWith(id) && sessionStorage.getItem(k) !== '[]').length, projectId), 0);

  t.log('a viewer: read-only, no run-as, DDL refused with 42501');
  const viewer = await memberAs(token, projectId, 'viewer');
  const vpage = await t.newPage();
  await t.signIn(vpage, viewer);
  await t.visit(vpage, projectId, 'sql');
  await vpage.waitForSelector('[data-sql-editor]');
  assert.equal(await vpage.$('[data-run-as]'), null, 'a viewer cannot run as an end user');
  assert.match(await textOf(vpage, '[data-role-note]'), /viewer: your SQL runs read-only/);
  assert.match(await textOf(vpage, '[data-history]'), /Queries you run/, 'another account does not see the owner\'s history');
  await setQuery(vpage, 'CREATE TABLE viewer_made (id int)');
  await run(vpage);
  await vpage.waitForSelector('[data-error] .error-box[data-code=SQL_EXEC_ERROR]');
  assert.equal(await vpage.$eval('[data-error] .error-box', (e) => e.dataset.sqlstate), '42501');
  assert.match(await textOf(vpage, '[data-hint="42501"]'), /as a viewer your SQL runs read-only/);
  const exists = await sqlAs(token, projectId, "SELECT to_regclass('public.viewer_made') IS NOT NULL AS made");
  assert.equal(exists.result.rows[0].made, false);
  await t.shot(vpage, 'viewer-denied');
  await setQuery(vpage, 'SELECT count(*) AS n FROM posts');
  await run(vpage);
  assert.equal(await vpage.$$eval('[data-grid] tbody td', (tds) => tds.map((td) => td.innerText).join()), '0',
    'the policy filters a viewer\'s rows too (auth.uid() is the viewer\'s id)');
});
