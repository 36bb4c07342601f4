// Webhooks: register an endpoint in the UI (its secret shown once, and a received delivery's
// signatures verified with it), deliveries shown delivered, a receiver answering 500 shown as
// retrying, redelivery from the UI reaching the receiver again, disabling stops deliveries,
// deletion asks first, and a viewer sees endpoints and their log read-only.
// The server runs with FLUXBASE_WEBHOOK_ALLOW_PRIVATE=true (a loopback receiver).
import http from 'node:http';
import crypto from 'node:crypto';
import { spec, BASE, assert, call, until, memberAs, unique } from '../lib/harness.mjs';

/** A receiver on 127.0.0.1: records every request (path, headers, raw body); answers `status`. */
function receiver() {
  const r = { status: 200, got: [] };
  r.server = http.createServer((req, res) => {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => {
      r.got.push({ path: req.url, headers: req.headers, raw: Buffer.concat(chunks).toString('utf8') });
      res.writeHead(r.status, { 'Content-Type': 'text/plain' });
      res.end(r.status === 200 ? 'thanks' : 'receiver broken');
    });
  });
  return new Promise((resolve) => r.server.listen(0, '127.0.0.1', () => { r.port = r.server.address().port; resolve(r); }));
}

/** Clicks a button after scrolling it to the middle of the viewport (the toasts sit in the
 * bottom-right corner, over whatever is scrolled there). */
async function press(page, selector) {
  await page.waitForSelector(selector);
  await page.$eval(selector, (el) => el.scrollIntoView({ block: 'center' }));
  await page.click(selector);
}

await spec('webhooks', async (t) => {
  const rx = await receiver();
  const on = (path) => rx.got.filter((g) => g.path === path);
  try {
    const page = await t.newPage();
    await t.signUp(page);
    const projectId = await t.createProject(page, unique('hooks'));
    const token = await t.token(page);
    const sql = async (query) => {
      const r = await call('POST', '/api/execute-sql', { token, body: { projectId, query } });
      assert.equal(r.status, 200, JSON.stringify(r.body));
      return r.body;
    };
    await sql('create table orders (id serial primary key, item text not null); create table other (id int)');

    await t.openView(page, projectId, 'webhooks');
    await page.waitForSelector('[data-webhook-list] .empty');
    await t.shot(page, 'empty');

    t.log('a refused URL is shown in the guide\'s error shape');
    const form = 'form[aria-label="Register a webhook"]';
    await page.type(`${form} input[name=url]`, 'ftp://example.com/hook');
    await page.click(`${form} button[type=submit]`);
    await page.waitForSelector(`${form} .error-box[data-code=BAD_REQUEST]`);
    assert.equal((await call('GET', `/api/webhooks?projectId=${projectId}`, { token })).body.webhooks.length, 0);

    t.log('register an endpoint for the orders table: the secret is shown once');
    const hookUrl = `http://127.0.0.1:${rx.port}/hook`;
    await page.$eval(`${form} input[name=url]`, (i) => { i.value = ''; });
    await page.type(`${form} input[name=url]`, hookUrl);
    await page.type(`${form} input[name=tables]`, 'orders');
    await page.click(`${form} button[type=submit]`);
    const secretField = await page.waitForSelector('dialog[open] [data-secret]');
    const secret = await secretField.evaluate((i) => i.value);
    assert.match(secret, /^whsec_/);
    await t.shot(page, 'secret');
    await page.click('dialog[open] button[data-action=Done]');
    await page.waitForFunction(() => !document.querySelector('dialog'));
    assert.ok(!(await page.content()).includes(secret), 'the secret is gone from the page once dismissed');
    assert.ok(!JSON.stringify(await page.evaluate(() => ({ ...sessionStorage, ...localStorage }))).includes(secret));

    const listed = (await call('GET', `/api/webhooks?projectId=${projectId}`, { token })).body.webhooks;
    assert.equal(listed.length, 1, JSON.stringify(listed));
    const hook = listed[0];
    assert.equal(hook.url, hookUrl);
    assert.deepEqual(hook.tables, ['orders']);
    assert.deepEqual(hook.events, ['row.inserted', 'row.updated', 'row.deleted']);
    assert.equal(hook.enabled, true);
    const row = `tr[data-webhook="${hook.id}"]`;
    await page.waitForSelector(`${row}[data-enabled=true]`);
    const rowText = await page.$eval(row, (tr) => tr.innerText);
    assert.match(rowText, /row\.inserted, row\.updated, row\.deleted/);
    assert.match(rowText, /orders/);
    assert.match(rowText, /enabled/);

    t.log('rows inserted through the API reach the receiver, signed with that secret');
    await sql("insert into orders (item) values ('apple'), ('pear'); insert into other values (1)");
    await until('two deliveries received', () => on('/hook').length >= 2);
    for (const g of on('/hook')) {
      const expected = crypto.createHmac('sha256', secret).update(g.raw).digest('hex');
      assert.equal(g.headers['x-fluxbase-signature'], `sha256=${expected}`);
      const key = Buffer.from(secret.slice('whsec_'.length), 'base64');
      const std = crypto.createHmac('sha256', key).update(`${g.headers['webhook-id']}.${g.headers['webhook-timestamp']}.${g.raw}`).digest('base64');
      assert.ok(g.headers['webhook-signature'].split(' ').includes(`v1,${std}`), g.headers['webhook-signature']);
      const body = JSON.parse(g.raw);
      assert.equal(body.event_type, 'row.inserted');
      assert.equal(body.table_id, 'orders');
    }
    assert.deepEqual(on('/hook').map((g) => JSON.parse(g.raw).data.new.item).sort(), ['apple', 'pear']);

    t.log('the delivery log shows both delivered, with the receiver\'s answer');
    await press(page, `button[data-show-log="${hook.id}"]`);
    await page.waitForSelector(`[data-delivery-log][data-webhook="${hook.id}"]`);
    const refresh = async () => {
      await page.click('button[data-refresh-log]');
      await page.waitForFunction(() => !document.querySelector('[data-delivery-log][aria-busy]'));
    };
    const shown = () => page.$$eval('[data-deliveries] tbody tr', (trs) => trs.map((tr) => ({
      id: tr.dataset.delivery, status: tr.dataset.status, text: tr.innerText,
      shown: tr.querySelector('[data-shown-status]').dataset.shownStatus,
    })));
    await until('two delivered rows in the log', async () => {
      await refresh();
      const s = await shown();
      return s.length === 2 && s.every((d) => d.status === 'delivered') && s;
    });
    for (const d of await shown()) {
      assert.match(d.text, /HTTP 200/);
      assert.match(d.text, /row\.inserted/);
      assert.equal(d.shown, 'delivered');
    }
    const oracle = (await call('GET', `/api/webhooks/deliveries?projectId=${projectId}&webhookId=${hook.id}`, { token })).body.deliveries;
    assert.deepEqual(oracle.map((d) => d.id).sort(), (await shown()).map((d) => d.id).sort());
    assert.ok(oracle.every((d) => d.status === 'delivered' && d.responseStatus === 200 && d.responseBody === 'thanks'), JSON.stringify(oracle));
    await t.shot(page, 'log-delivered');

    t.log('the receiver answers 500: the next delivery is shown retrying');
    rx.status = 500;
    await sql("insert into orders (item) values ('plum')");
    await until('the failing attempt', () => on('/hook').some((g) => JSON.parse(g.raw).data.new.item === 'plum'));
    const plumId = on('/hook').find((g) => JSON.parse(g.raw).data.new.item === 'plum').headers['webhook-id'];
    const failed = await until('the failed attempt in the log', async () => {
      await refresh();
      return (await shown()).find((d) => d.id === plumId && d.status === 'pending');
    });
    assert.equal(failed.shown, 'retrying');
    assert.match(failed.text, /HTTP 500/);
    assert.match(failed.text, /next attempt/);
    const plumOracle = (await call('GET', `/api/webhooks/deliveries?projectId=${projectId}&webhookId=${hook.id}&status=pending`, { token })).body.deliveries;
    assert.equal(plumOracle.length, 1, JSON.stringify(plumOracle));
    assert.ok(plumOracle[0].id === plumId && plumOracle[0].responseStatus === 500 && plumOracle[0].attempts >= 1, JSON.stringify(plumOracle));
    await t.shot(page, 'log-retrying');
    await page.emulateMediaFeatures([{ name: 'prefers-color-scheme', value: 'dark' }]);
    await t.shot(page, 'log-retrying-dark');
    await page.emulateMediaFeatures([{ name: 'prefers-color-scheme', value: 'light' }]);

    t.log('the status filter: pending shows the retrying one only, delivered the two others');
    const idle = () => page.waitForFunction(() => !document.querySelector('[data-delivery-log][aria-busy]'));
    await page.select('select[data-status-filter]', 'pending');
    await until('only the pending row', async () => {
      await idle();
      const s = await shown();
      return s.length === 1 && s[0].id === plumId;
    });
    await page.select('select[data-status-filter]', 'delivered');
    await until('only delivered rows', async () => {
      await idle();
      const s = await shown();
      return s.length === 2 && s.every((d) => d.status === 'delivered' && d.id !== plumId);
    });
    await page.select('select[data-status-filter]', 'failed');
    await page.waitForSelector('[data-deliveries] .empty');
    assert.match(await page.$eval('[data-deliveries] .empty', (e) => e.textContent), /No failed deliveries/);
    await page.select('select[data-status-filter]', '');
    await page.waitForFunction(() => document.querySelectorAll('[data-deliveries] tbody tr').length === 3);

    t.log('the receiver works again; redeliver the retrying one from the UI: delivered');
    rx.status = 200;
    await press(page, `button[data-redeliver="${plumId}"]`);
    await until('the plum delivery received with 200', () => on('/hook').filter((g) => g.headers['webhook-id'] === plumId).length >= 2);
    await until('the plum delivery delivered', async () => {
      await refresh();
      return (await shown()).some((d) => d.id === plumId && d.status === 'delivered');
    });

    t.log('redeliver a delivered delivery from the UI: the receiver gets the same id again');
    const first = oracle[0].id;
    const before = on('/hook').filter((g) => g.headers['webhook-id'] === first).length;
    assert.equal(before, 1);
    await press(page, `button[data-redeliver="${first}"]`);
    await until('the redelivery received', () => on('/hook').filter((g) => g.headers['webhook-id'] === first).length === 2);
    await until('the redelivery delivered again (API)', async () => {
      const d = (await call('GET', `/api/webhooks/deliveries?projectId=${projectId}&webhookId=${hook.id}`, { token })).body.deliveries.find((x) => x.id === first);
      return d.status === 'delivered';
    });

    t.log('edit it: another table, without row.deleted');
    await press(page, `button[data-edit="${hook.id}"]`);
    await page.waitForSelector(`dialog[open] [data-edit-form="${hook.id}"]`);
    await page.click('dialog[open] input[value="row.deleted"]');
    await page.$eval('dialog[open] input[name=tables]', (i) => { i.value = ''; });
    await page.click('dialog[open] button[data-action=Save]');
    await page.waitForSelector('dialog[open] .error-box[data-code=BAD_REQUEST]');
    await t.shot(page, 'edit');
    await page.type('dialog[open] input[name=tables]', 'orders, other');
    await page.click('dialog[open] button[data-action=Save]');
    await page.waitForFunction(() => !document.querySelector('dialog'));
    await page.waitForFunction((sel) => /orders, other/.test(document.querySelector(sel).innerText), {}, row);
    const edited = (await call('GET', `/api/webhooks?projectId=${projectId}`, { token })).body.webhooks[0];
    assert.deepEqual(edited.tables, ['orders', 'other']);
    assert.deepEqual(edited.events, ['row.inserted', 'row.updated']);
    assert.equal(edited.url, hookUrl);

    t.log('rotate its secret: asked first, the new one shown once, the next delivery signed with it');
    await press(page, `button[data-rotate="${hook.id}"]`);
    await page.waitForSelector('dialog[open]');
    await page.click('dialog[open] button[data-action=Cancel]');
    await page.waitForFunction(() => !document.querySelector('dialog'));
    await press(page, `button[data-rotate="${hook.id}"]`);
    await page.click('dialog[open] button[data-action="Rotate secret"]');
    const rotatedField = await page.waitForSelector('dialog[open] [data-secret]');
    const rotated = await rotatedField.evaluate((i) => i.value);
    assert.match(rotated, /^whsec_/);
    assert.notEqual(rotated, secret);
    await page.click('dialog[open] button[data-action=Done]');
    await page.waitForFunction(() => !document.querySelector('dialog'));
    assert.ok(!(await page.content()).includes(rotated), 'the rotated secret is gone from the page once dismissed');
    await sql("insert into orders (item) values ('fig')");
    const fig = await until('the fig delivery', () => on('/hook').find((g) => JSON.parse(g.raw).data.new.item === 'fig'));
    assert.equal(fig.headers['x-fluxbase-signature'], `sha256=${crypto.createHmac('sha256', rotated).update(fig.raw).digest('hex')}`);
    const standard = (g, s) => `v1,${crypto.createHmac('sha256', Buffer.from(s.slice('whsec_'.length), 'base64'))
      .update(`${g.headers['webhook-id']}.${g.headers['webhook-timestamp']}.${g.raw}`).digest('base64')}`;
    assert.equal(fig.headers['webhook-signature'], `${standard(fig, rotated)} ${standard(fig, secret)}`, 'the old secret signs beside the new one');

    t.log('the previous secret is shown as still signing; "End now" stops it');
    await page.waitForSelector(`[data-previous-secret="${hook.id}"]`);
    await t.shot(page, 'previous-secret');
    await press(page, `button[data-end-previous="${hook.id}"]`);
    await page.waitForFunction((id) => !document.querySelector(`[data-previous-secret="${id}"]`), {}, hook.id);
    assert.equal((await call('GET', `/api/webhooks?projectId=${projectId}`, { token })).body.webhooks[0].previousSecretUntil, null);
    await sql("insert into orders (item) values ('date')");
    const date = await until('the date delivery', () => on('/hook').find((g) => JSON.parse(g.raw).data.new.item === 'date'));
    assert.equal(date.headers['webhook-signature'], standard(date, rotated), 'the new secret alone');

    t.log('disable it: no more deliveries (a second, enabled endpoint is the witness)');
    await press(page, `button[data-toggle="${hook.id}"]`);
    await page.waitForSelector(`${row}[data-enabled=false]`);
    assert.equal((await call('GET', `/api/webhooks?projectId=${projectId}`, { token })).body.webhooks[0].enabled, false);
    const witness = await call('POST', '/api/webhooks', { token, body: { projectId, url: `http://127.0.0.1:${rx.port}/witness`, events: ['row.inserted'], tables: ['orders'] } });
    assert.equal(witness.status, 201, JSON.stringify(witness.body));
    const sentBefore = on('/hook').length;
    const loggedBefore = (await call('GET', `/api/webhooks/deliveries?projectId=${projectId}&webhookId=${hook.id}`, { token })).body.deliveries.length;
    await sql("insert into orders (item) values ('kiwi')");
    await until('the witness got the kiwi', () => on('/witness').some((g) => JSON.parse(g.raw).data.new.item === 'kiwi'));
    assert.equal(on('/hook').length, sentBefore, 'a disabled endpoint gets nothing');
    const loggedAfter = (await call('GET', `/api/webhooks/deliveries?projectId=${projectId}&webhookId=${hook.id}`, { token })).body.deliveries;
    assert.equal(loggedAfter.length, loggedBefore, JSON.stringify(loggedAfter));
    await page.click('button[data-refresh-webhooks]');
    await page.waitForSelector(`tr[data-webhook="${witness.body.webhook.id}"]`);
    await t.shot(page, 'disabled');

    t.log('a viewer sees the endpoints and the log, with no control');
    const viewer = await memberAs(token, projectId, 'viewer');
    const vpage = await t.newPage();
    await t.signIn(vpage, viewer);
    await t.openView(vpage, projectId, 'webhooks');
    await vpage.waitForSelector(`tr[data-webhook="${hook.id}"][data-enabled=false]`);
    await vpage.waitForSelector('[data-read-only]');
    assert.equal(await vpage.$(form), null);
    assert.equal(await vpage.$('button[data-toggle], button[data-delete], button[data-edit], button[data-rotate]'), null);
    await press(vpage, `button[data-show-log="${hook.id}"]`);
    await vpage.waitForSelector(`[data-deliveries] tr[data-delivery="${first}"]`);
    assert.equal(await vpage.$('button[data-redeliver]'), null);
    await t.shot(vpage, 'viewer');

    t.log('a developer manages webhooks too (the API lets developers)');
    const dev = await memberAs(token, projectId, 'developer');
    const dpage = await t.newPage();
    await t.signIn(dpage, dev);
    await t.openView(dpage, projectId, 'webhooks');
    await dpage.waitForSelector(`button[data-toggle="${hook.id}"]`);
    assert.ok(await dpage.$(form), 'the create form');
    assert.ok(await dpage.$(`button[data-delete="${hook.id}"]`) && await dpage.$(`button[data-edit="${hook.id}"]`));
    await dpage.close();

    t.log('delete asks first; cancel keeps it, confirm removes it');
    await page.bringToFront();
    assert.equal(await page.$eval(`${form} input[value="row.inserted"]`, (i) => i.checked), true, 'the form is reset to its defaults');
    await press(page, `button[data-delete="${hook.id}"]`);
    await page.waitForSelector('dialog[open]');
    await page.click('dialog[open] button[data-action=Cancel]');
    await page.waitForFunction(() => !document.querySelector('dialog'));
    assert.equal((await call('GET', `/api/webhooks?projectId=${projectId}`, { token })).body.webhooks.length, 2);
    await press(page, `button[data-delete="${hook.id}"]`);
    await page.click('dialog[open] button[data-action="Delete webhook"]');
    await page.waitForFunction((id) => !document.querySelector(`tr[data-webhook="${id}"]`), {}, hook.id);
    const after = (await call('GET', `/api/webhooks?projectId=${projectId}`, { token })).body.webhooks;
    assert.deepEqual(after.map((w) => w.id), [witness.body.webhook.id]);
    assert.ok(await page.$('[data-delivery-log][hidden]'), 'the deleted endpoint\'s log is closed');
  } finally {
    rx.server.close();
  }
});
