// Health: a fresh project's change capture shown (state, lag, last event), streaming with a
// last event and a lag after an insert, refreshed by itself every 5 s and equal to what the API
// says; the server's readiness (/ready) shown; the refresh timer stops when the view is left;
// a viewer sees the same read-only page.
import { spec, BASE, assert, call, until, memberAs, unique } from '../lib/harness.mjs';

/** Test instrumentation: the page's live setInterval timers (window.__intervals). */
async function watchIntervals(page) {
  await page.evaluateOnNewDocument(() => {
    const set = window.setInterval.bind(window);
    const clear = window.clearInterval.bind(window);
    window.__intervals = new Set();
    window.setInterval = (...args) => { const id = set(...args); window.__intervals.add(id); return id; };
    window.clearInterval = (id) => { window.__intervals.delete(id); return clear(id); };
  });
}

const field = (page, name) => page.$eval(`[data-cdc] dd[data-field="${name}"]`, (dd) => ({ raw: dd.dataset.value, text: dd.innerText }));

await spec('health', async (t) => {
  const page = await t.newPage();
  await watchIntervals(page);
  await t.signUp(page);
  const projectId = await t.createProject(page, unique('health'));
  const token = await t.token(page);
  const status = async () => {
    const r = await call('GET', `/api/cdc/status?projectId=${projectId}`, { token });
    assert.equal(r.status, 200, JSON.stringify(r.body));
    return r.body.stream;
  };

  await t.openView(page, projectId, 'health');
  t.log('a fresh project: its stream\'s state as the API says, no event yet');
  const first = await page.waitForSelector('[data-cdc-state]').then((e) => e.evaluate((s) => s.dataset.cdcState));
  assert.ok(['starting', 'streaming'].includes(first), first);
  const fresh = await status();
  if (fresh.events === 0) {
    assert.equal((await field(page, 'lastEventAt')).raw, '');
    assert.equal((await field(page, 'events')).raw, '0');
  }
  // The lag in the project's own terms: none before its first own transaction (—), never the
  // shared log's end (no server position on the page).
  const lag = await field(page, 'lagBytes');
  if (fresh.lagBytes === null) assert.equal(lag.raw, '', JSON.stringify(lag));
  else assert.match(lag.text, /\d+ (B|KiB|MiB)/);
  assert.equal(fresh.serverLsn, null, JSON.stringify(fresh));
  assert.match(await page.$eval('[data-cdc]', (e) => e.innerText), /Lag \(bytes\)[\s\S]*Other projects' writes are never counted/i);
  assert.equal(await page.$('[data-cdc] dd[data-field=serverLsn]'), null);
  assert.equal(await page.$eval('[data-slot] dd[data-field=slotName]', (d) => d.dataset.value), `fluxbase_${projectId}`);

  t.log('the server is ready: /ready as the page shows it');
  assert.equal((await call('GET', '/ready')).status, 200);
  assert.equal(await page.$eval('[data-server] dd[data-field=ready]', (d) => d.dataset.value), 'ready');
  assert.equal(await page.$eval('[data-server] dd[data-field=controlDb]', (d) => d.dataset.value), 'reachable');
  assert.equal(await page.$eval('[data-server] dd[data-field=storage]', (d) => d.dataset.value), 'usable');

  t.log('an insert: the page (refreshing by itself, no click) shows streaming, a last event and a lag');
  const before = await page.$eval('[data-updated]', (e) => e.textContent);
  const lastBefore = (await field(page, 'lastEventAt')).raw;
  const r = await call('POST', '/api/execute-sql', { token, body: { projectId, query: "create table notes (id serial primary key, body text); insert into notes (body) values ('hello')" } });
  assert.equal(r.status, 200, JSON.stringify(r.body));
  await until('the API sees the transaction', async () => (await status()).lastEventAt);
  await page.waitForFunction((prev) => document.querySelector('[data-cdc-state]').dataset.cdcState === 'streaming'
    && document.querySelector('[data-cdc] dd[data-field=lastEventAt]').dataset.value !== prev, { timeout: 15_000 }, lastBefore);
  assert.notEqual(await page.$eval('[data-updated]', (e) => e.textContent), before, 'updated by the 5 s refresh, no click');
  const oracle = await status();
  assert.equal(oracle.state, 'streaming');
  assert.equal((await field(page, 'lastEventAt')).raw, oracle.lastEventAt);
  assert.equal((await field(page, 'events')).raw, String(oracle.events));
  assert.ok(oracle.events >= 2, JSON.stringify(oracle)); // CREATE TABLE and the INSERT
  assert.equal((await field(page, 'lagSeconds')).raw, String(oracle.lagSeconds));
  assert.doesNotMatch((await field(page, 'lagSeconds')).text, /^—/);
  assert.match((await field(page, 'lastEventAt')).text, /ago|just now/);
  assert.equal(await page.$eval('[data-slot] dd[data-field=slotActive]', (d) => d.dataset.value), 'true');
  await t.shot(page, 'streaming');
  await page.emulateMediaFeatures([{ name: 'prefers-color-scheme', value: 'dark' }]);
  await t.shot(page, 'streaming-dark');
  await page.emulateMediaFeatures([{ name: 'prefers-color-scheme', value: 'light' }]);

  t.log('the refresh button asks again');
  await page.click('button[data-refresh]');
  await page.waitForFunction(() => !document.querySelector('main[aria-busy]'));

  t.log('leaving the view stops its refresh timer');
  assert.equal(await page.evaluate(() => window.__intervals.size), 1);
  await page.click('a.brand');
  await page.waitForSelector('h1::-p-text(Projects)');
  assert.equal(await page.evaluate(() => window.__intervals.size), 0);

  t.log('a viewer sees the same state (read-only: there is nothing to change)');
  const viewer = await memberAs(token, projectId, 'viewer');
  const vpage = await t.newPage();
  await t.signIn(vpage, viewer);
  await t.openView(vpage, projectId, 'health');
  await vpage.waitForSelector('[data-cdc-state=streaming]');
  assert.equal(await vpage.$eval('[data-cdc] dd[data-field=lastEventAt]', (d) => d.dataset.value), oracle.lastEventAt);
  assert.equal(await vpage.$('.content form, .content button.danger'), null);
  await t.shot(vpage, 'viewer');
});
