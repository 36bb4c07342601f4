// Realtime Inspector: subscribes with a short-lived realtime token; rows inserted through the
// API appear live with table and operation, each expandable to its JSON; the table, operation
// and type filters hide the rest; a CREATE TABLE shows a schema_update; pause and clear; a
// broadcast sent from the page reaches a second WebSocket client; leaving the view closes the
// socket (the page's WebSocket is CLOSED and the server delivers to one socket fewer); a viewer
// watches but cannot broadcast. No API key is ever in the page.
import { spec, BASE, assert, call, until, memberAs, unique } from '../lib/harness.mjs';

/** Test instrumentation: remembers every WebSocket the page opens (window.__sockets). */
async function watchSockets(page) {
  await page.evaluateOnNewDocument(() => {
    const Native = window.WebSocket;
    window.__sockets = [];
    window.WebSocket = class extends Native {
      constructor(...args) {
        super(...args);
        window.__sockets.push(this);
      }
    };
  });
}

const shownMessages = (page) => page.$$eval('[data-messages] details', (ds) => ds.map((d) => ({
  type: d.dataset.type, table: d.dataset.table, op: d.dataset.op, text: d.querySelector('summary').innerText,
})));

await spec('realtime_inspector', async (t) => {
  const page = await t.newPage();
  await watchSockets(page);
  await t.signUp(page);
  const projectId = await t.createProject(page, unique('live'));
  const token = await t.token(page);
  const sql = async (query) => {
    const r = await call('POST', '/api/execute-sql', { token, body: { projectId, query } });
    assert.equal(r.status, 200, JSON.stringify(r.body));
  };
  await sql('create table orders (id serial primary key, item text); create table other (id int primary key)');

  await t.openView(page, projectId, 'realtime');
  await page.waitForSelector('[data-conn-state=subscribed]');
  assert.equal(await page.$$eval('[data-messages] details', (d) => d.length), 0);
  await page.waitForSelector('[data-empty]:not([hidden])');

  t.log('rows inserted through the API appear live, newest first, with table and operation');
  await sql("insert into orders (item) values ('apple'), ('pear')");
  await sql("update orders set item = 'green apple' where item = 'apple'");
  await sql('insert into other values (7)');
  await page.waitForFunction(() => document.querySelectorAll('[data-messages] details[data-type=db_event]').length === 4);
  const live = await shownMessages(page);
  assert.deepEqual(live.map((m) => `${m.table} ${m.op}`), ['other INSERT', 'orders UPDATE', 'orders INSERT', 'orders INSERT']);
  assert.match(live[1].text, /UPDATE\s+public\.orders/);

  t.log('a message expands to its JSON');
  await page.click('[data-messages] details[data-op=UPDATE] summary');
  const json = JSON.parse(await page.$eval('[data-messages] details[data-op=UPDATE][open] pre', (p) => p.textContent));
  assert.equal(json.type, 'db_event');
  assert.equal(json.payload.record.item, 'green apple');
  assert.equal(json.payload.old.item, 'apple');
  await t.shot(page, 'live');

  t.log('the table filter hides other tables; the operation filter other operations');
  await page.type('input[data-filter-table]', 'orders');
  await page.waitForFunction(() => !document.querySelector('[data-messages] details[data-table=other]'));
  assert.deepEqual((await shownMessages(page)).map((m) => m.table), ['orders', 'orders', 'orders']);
  await page.select('select[data-filter-op]', 'UPDATE');
  await page.waitForFunction(() => document.querySelectorAll('[data-messages] details').length === 1);
  assert.equal((await shownMessages(page))[0].op, 'UPDATE');
  await t.shot(page, 'filtered');
  await page.select('select[data-filter-op]', '');
  await page.$eval('input[data-filter-table]', (i) => { i.value = ''; i.dispatchEvent(new Event('input')); });
  await page.waitForFunction(() => document.querySelectorAll('[data-messages] details').length === 4);

  t.log('CREATE TABLE shows a schema_update');
  await sql('create table audit (id int)');
  await page.waitForSelector('[data-messages] details[data-type=schema_update][data-table=audit]');
  const schema = (await shownMessages(page))[0];
  assert.equal(schema.op, 'CREATE TABLE');
  assert.match(schema.text, /schema_update\s+CREATE TABLE\s+public\.audit/);
  await page.select('select[data-filter-type]', 'schema_update');
  await page.waitForFunction(() => [...document.querySelectorAll('[data-messages] details')].every((d) => d.dataset.type === 'schema_update'));
  await page.select('select[data-filter-type]', '');

  t.log('pause holds new messages back; resume shows them');
  await page.click('button[data-pause]');
  await sql("insert into orders (item) values ('paused plum')");
  await page.waitForFunction(() => /paused: 1 new not shown/.test(document.querySelector('[data-counter]').textContent));
  assert.equal(await page.$$eval('[data-messages] details', (d) => d.length), 5);
  await page.click('button[data-pause]');
  await page.waitForFunction(() => document.querySelectorAll('[data-messages] details').length === 6);
  assert.match(await page.$eval('[data-messages] details', (d) => d.querySelector('pre').textContent), /paused plum/);

  t.log('clear empties the list');
  await page.click('button[data-clear]');
  await page.waitForFunction(() => document.querySelectorAll('[data-messages] details').length === 0);
  await page.waitForSelector('[data-empty]:not([hidden])');

  t.log('disconnect, a change meanwhile, connect: a fresh token, and the change is resumed');
  const mints = [];
  page.on('request', (req) => { if (req.method() === 'POST' && req.url().endsWith('/api/realtime/token')) mints.push(req.url()); });
  await page.click('button[data-connect]');
  await page.waitForSelector('[data-conn-state=closed]');
  await page.waitForFunction(() => window.__sockets.every((s) => s.readyState === WebSocket.CLOSED));
  const published = async () => (await call('GET', `/api/cdc/status?projectId=${projectId}`, { token })).body.stream.events;
  const eventsBefore = await published();
  await sql("insert into orders (item) values ('while away')");
  // Published while no socket of the page is subscribed: only a resume brings it.
  await until('the change published', async () => (await published()) > eventsBefore);
  await page.click('button[data-connect]');
  await page.waitForSelector('[data-conn-state=subscribed]');
  assert.equal(mints.length, 1, 'a new realtime token for the new connection');
  assert.equal(await page.evaluate(() => window.__sockets.length), 2);
  await page.waitForSelector('[data-messages] details[data-type=db_event][data-op=INSERT]');
  assert.match(await page.$eval('[data-messages] details', (d) => d.querySelector('pre').textContent), /while away/);
  await page.click('button[data-clear]');
  await page.waitForFunction(() => document.querySelectorAll('[data-messages] details').length === 0);

  t.log('a second client (a plain WebSocket with its own realtime token) subscribes');
  const rt = await call('POST', '/api/realtime/token', { token, body: { projectId, expiresIn: 120 } });
  assert.equal(rt.status, 200, JSON.stringify(rt.body));
  const other = await t.newPage();
  await other.goto(`${BASE}/health`);
  await other.evaluate((url, roomId, rtToken) => new Promise((resolve, reject) => {
    window.__got = [];
    const ws = new WebSocket(url);
    ws.onopen = () => ws.send(JSON.stringify({ type: 'subscribe', roomId, token: rtToken }));
    ws.onmessage = (e) => {
      const m = JSON.parse(e.data);
      window.__got.push(m);
      if (m.type === 'subscribed') resolve();
      if (m.type === 'error') reject(new Error(e.data));
    };
  }), BASE.replace(/^http/, 'ws'), `project_${projectId}`, rt.body.token);

  t.log('send a broadcast from the page: both sockets get it');
  await page.type('form[aria-label="Send a broadcast"] input[name=event]', 'cursor-moved');
  await page.$eval('form[aria-label="Send a broadcast"] textarea[name=payload]', (ta) => { ta.value = '{"x": 42, "who": "ada"}'; });
  await page.click('form[aria-label="Send a broadcast"] button[type=submit]');
  const delivered = await page.waitForSelector('[data-delivered]');
  assert.equal(await delivered.evaluate((p) => p.dataset.delivered), '2', 'the inspector and the second client');
  await until('the second client got the broadcast', () => other.evaluate(() => window.__got.find((m) => m.type === 'broadcast')))
    .then((m) => { assert.equal(m.event, 'cursor-moved'); assert.deepEqual(m.payload, { x: 42, who: 'ada' }); });
  await page.waitForSelector('[data-messages] details[data-type=broadcast]');
  assert.match((await shownMessages(page))[0].text, /broadcast\s+cursor-moved/);

  t.log('a payload that is not JSON is refused before sending');
  await page.$eval('form[aria-label="Send a broadcast"] textarea[name=payload]', (ta) => { ta.value = '{oops'; });
  await page.click('form[aria-label="Send a broadcast"] button[type=submit]');
  await page.waitForSelector('form[aria-label="Send a broadcast"] .error-box[data-code=BAD_JSON]');
  await t.shot(page, 'broadcast');
  await page.emulateMediaFeatures([{ name: 'prefers-color-scheme', value: 'dark' }]);
  await page.click('[data-messages] details[data-type=broadcast] summary');
  await t.shot(page, 'broadcast-dark');
  await page.emulateMediaFeatures([{ name: 'prefers-color-scheme', value: 'light' }]);

  t.log('no API key and no realtime token is kept in the page\'s storage');
  const stored = await page.evaluate(() => JSON.stringify({ ...sessionStorage }) + JSON.stringify({ ...localStorage }) + document.documentElement.outerHTML);
  assert.doesNotMatch(stored, /flx_live_|flx_rt_/);

  t.log('leaving the view closes its socket');
  assert.equal(await page.evaluate(() => window.__sockets.filter((s) => s.readyState === WebSocket.OPEN).length), 1);
  await page.click('nav a[data-view="webhooks"]');
  await page.waitForFunction(() => window.__sockets.every((s) => s.readyState === WebSocket.CLOSED));
  await until('the server delivers to the second client only', async () => {
    const r = await call('POST', '/api/realtime/broadcast', { token, body: { projectId, event: 'count', payload: {} } });
    assert.equal(r.status, 200, JSON.stringify(r.body));
    return r.body.delivered === 1;
  });

  t.log('a viewer watches live but has no broadcast form');
  const viewer = await memberAs(token, projectId, 'viewer');
  const vpage = await t.newPage();
  await t.signIn(vpage, viewer);
  await t.openView(vpage, projectId, 'realtime');
  await vpage.waitForSelector('[data-conn-state=subscribed]');
  await vpage.waitForSelector('[data-read-only]');
  assert.equal(await vpage.$('form[aria-label="Send a broadcast"]'), null);
  await sql("insert into orders (item) values ('seen by the viewer')");
  await vpage.waitForSelector('[data-messages] details[data-type=db_event][data-table=orders][data-op=INSERT]');
  const refused = await call('POST', '/api/realtime/broadcast', { token: viewer.token, body: { projectId, event: 'x', payload: {} } });
  assert.equal(refused.status, 403, 'the API refuses a viewer\'s broadcast, so the page offers none');
  await t.shot(vpage, 'viewer');
});
