// Settings and API keys: a project made in the UI shows its id, URLs and the guide's .env block;
// rename and the realtimePublic switch reach the API; a key is created (secret shown once, works,
// gone from the page when dismissed, never stored), rotated (old secret refused) and revoked; a
// viewer sees the values read-only and no key management; deleting asks for the project's name.
import { spec, BASE, assert, call, until, textOf, unique, memberAs } from '../lib/harness.mjs';

const sqlWith = (key, projectId) => call('POST', '/api/execute-sql', { token: key, body: { projectId, query: 'SELECT 1 AS one' } });

/** Everything a page could keep: both storages, cookies. */
const stored = (page) => page.evaluate(() => JSON.stringify({ ...sessionStorage }) + JSON.stringify({ ...localStorage }) + document.cookie);

await spec('settings_keys', async (t) => {
  const page = await t.newPage();
  await t.signUp(page);
  const name = unique('shop');
  const id = await t.createProject(page, name);
  const token = await t.token(page);
  const project = async () => (await call('GET', '/api/projects', { token })).body.projects.find((p) => p.id === id);

  t.log('settings show the project id, base URL, WebSocket URL and the .env.local block');
  await page.waitForSelector('[data-setting=project-id] [data-value]');
  assert.equal(await textOf(page, '[data-setting=project-id] [data-value]'), id);
  assert.equal(await textOf(page, '[data-setting=base-url] [data-value]'), BASE);
  const ws = BASE.replace(/^http/, 'ws');
  assert.equal(await textOf(page, '[data-setting=ws-url] [data-value]'), ws);
  const env = await textOf(page, '[data-env]');
  const vars = Object.fromEntries(env.split('\n').filter((l) => l && !l.startsWith('#')).map((l) => [l.slice(0, l.indexOf('=')), l.slice(l.indexOf('=') + 1)]));
  assert.deepEqual(Object.keys(vars), ['FLUXBASE_API_KEY', 'FLUXBASE_PROJECT_ID', 'NEXT_PUBLIC_WS_URL'], env);
  assert.equal(vars.FLUXBASE_PROJECT_ID, id);
  assert.equal(vars.NEXT_PUBLIC_WS_URL, ws);
  assert.match(vars.FLUXBASE_API_KEY, /^<your API key from Settings → API Keys>$/);
  assert.match(env, new RegExp(`^# .*${BASE.replace(/[.]/g, '\\.')}$`, 'm'));
  assert.doesNotMatch(await page.content(), /flx_live_/, 'no key on the settings page');

  t.log('the copy buttons put the values on the clipboard');
  await page.browserContext().overridePermissions(BASE, ['clipboard-read', 'clipboard-write', 'clipboard-sanitized-write']);
  const clipboard = () => page.evaluate(() => navigator.clipboard.readText());
  for (const [k, v] of [['project-id', id], ['base-url', BASE], ['ws-url', ws]]) {
    await page.click(`[data-setting=${k}] button[data-copy]`);
    await until(`${k} copied`, async () => (await clipboard()) === v);
  }
  await page.click('button[data-copy="env"]');
  await until('.env.local copied', async () => (await clipboard()).trim() === env.trim());
  await t.shot(page, 'settings');
  await page.emulateMediaFeatures([{ name: 'prefers-color-scheme', value: 'dark' }]);
  await t.shot(page, 'settings-dark');
  await page.emulateMediaFeatures([{ name: 'prefers-color-scheme', value: 'light' }]);

  t.log('rename: the API shows the new name, so do the page and the project switcher');
  const renamed = unique('renamed');
  await page.$eval('input[name=project-name]', (i) => { i.value = ''; });
  await page.type('input[name=project-name]', renamed);
  await page.click('form[data-rename] button[type=submit]');
  await page.waitForFunction((n) => document.querySelector('[data-project-name]')?.textContent === n, {}, renamed);
  assert.equal((await project()).name, renamed);
  assert.match(await page.$eval('select.switcher', (s) => s.selectedOptions[0].textContent), new RegExp(renamed));

  t.log('realtimePublic: on, then off again, each time in the API');
  assert.equal((await project()).realtimePublic, false);
  assert.equal(await page.$eval('input[data-realtime-public]', (i) => i.checked), false);
  await page.click('input[data-realtime-public]');
  await until('realtimePublic on in the API', async () => (await project()).realtimePublic === true);
  await page.waitForFunction(() => { const i = document.querySelector('input[data-realtime-public]'); return i.checked && !i.disabled; });
  await page.click('input[data-realtime-public]');
  await until('realtimePublic off in the API', async () => (await project()).realtimePublic === false);
  await page.waitForFunction(() => { const i = document.querySelector('input[data-realtime-public]'); return !i.checked && !i.disabled; });

  t.log('keys: the three keys a project comes with are listed');
  await t.openView(page, id, 'keys');
  await page.waitForSelector('[data-keys-list] table');
  const initial = (await call('GET', `/api/keys?projectId=${id}`, { token })).body.keys;
  assert.equal(await page.$$eval('[data-keys-list] tbody tr', (r) => r.length), initial.length);

  t.log('create a readwrite key: its secret is shown once and works');
  await page.type('input[name=key-name]', 'ci key');
  await page.select('select[name=key-scope]', 'readwrite');
  await page.click('form[data-create-key] button[type=submit]');
  const secret = await (await page.waitForSelector('dialog[open] [data-secret]')).evaluate((i) => i.value);
  assert.match(secret, /^flx_live_[0-9A-Za-z]{32}$/);
  const keys = (await call('GET', `/api/keys?projectId=${id}`, { token })).body.keys;
  const created = keys.find((k) => k.name === 'ci key');
  assert.ok(created, JSON.stringify(keys));
  assert.equal(created.scope, 'readwrite');
  assert.ok(secret.startsWith(created.prefix));
  const row = `[data-keys-list] tr[data-key-id="${created.id}"]`;
  await page.waitForSelector(row);
  assert.match(await textOf(page, row), /ci key[\s\S]*readwrite/);
  const used = await sqlWith(secret, id);
  assert.equal(used.status, 200, JSON.stringify(used.body));
  assert.equal(used.body.result.rows[0].one, 1);
  await t.shot(page, 'key-created');

  t.log('dismissed: the secret is gone from the page and was never stored');
  await page.click('dialog[open] button[data-action=Done]');
  await page.waitForFunction(() => !document.querySelector('dialog'));
  assert.equal(await page.$('[data-secret]'), null);
  assert.ok(!(await page.content()).includes(secret), 'the secret is still in the DOM');
  assert.ok(!(await stored(page)).includes(secret), 'the secret was stored');
  assert.ok(!(await stored(page)).includes('flx_live_'), 'a key was stored');

  t.log('the key list shows its last use after a reload of the view');
  await page.reload();
  await page.waitForSelector(row);
  assert.doesNotMatch(await page.$eval(`${row} td:nth-child(5)`, (td) => td.innerText), /never/);
  await t.shot(page, 'keys');
  await page.emulateMediaFeatures([{ name: 'prefers-color-scheme', value: 'dark' }]);
  await t.shot(page, 'keys-dark');
  await page.emulateMediaFeatures([{ name: 'prefers-color-scheme', value: 'light' }]);

  t.log('rotate (asks first): the old secret is refused, the new one works');
  await page.click(`button[data-rotate="${created.id}"]`);
  await page.waitForSelector('dialog[open] button[data-action="Rotate key"]');
  await page.click('dialog[open] button[data-action="Rotate key"]');
  const rotated = await (await page.waitForSelector('dialog[open] [data-secret]')).evaluate((i) => i.value);
  assert.notEqual(rotated, secret);
  assert.equal((await sqlWith(secret, id)).status, 401);
  assert.equal((await sqlWith(rotated, id)).status, 200);
  await page.click('dialog[open] button[data-action=Done]');
  await page.waitForFunction(() => !document.querySelector('dialog'));
  assert.ok(!(await page.content()).includes(rotated));
  assert.ok(!(await stored(page)).includes(rotated));

  t.log('revoke: cancel keeps it; confirmed, the key is refused and leaves the list');
  await page.click(`button[data-revoke="${created.id}"]`);
  await page.waitForSelector('dialog[open] button[data-action=Cancel]');
  await page.click('dialog[open] button[data-action=Cancel]');
  await page.waitForFunction(() => !document.querySelector('dialog'));
  assert.equal((await sqlWith(rotated, id)).status, 200, 'cancel revoked the key');
  await page.click(`button[data-revoke="${created.id}"]`);
  await (await page.waitForSelector('dialog[open] button[data-action="Revoke key"]')).click();
  await page.waitForFunction((s) => !document.querySelector(s), {}, row);
  assert.equal((await sqlWith(rotated, id)).status, 401);
  assert.ok(!(await call('GET', `/api/keys?projectId=${id}`, { token })).body.keys.some((k) => k.id === created.id));

  t.log('a viewer: values read-only, no settings actions, no key management, no red errors');
  const viewer = await memberAs(token, id, 'viewer');
  const vpage = await t.newPage();
  await t.signIn(vpage, viewer);
  await vpage.goto(`${BASE}/projects/${id}/settings`);
  await vpage.waitForSelector('[data-readonly-note]');
  assert.equal(await textOf(vpage, '[data-setting=project-id] [data-value]'), id);
  assert.equal(await textOf(vpage, '[data-role]'), 'viewer');
  assert.match(await textOf(vpage, '[data-env]'), new RegExp(`FLUXBASE_PROJECT_ID=${id}`));
  for (const s of ['form[data-rename]', 'input[data-realtime-public]', 'button[data-delete-project]', '.error-box']) {
    assert.equal(await vpage.$(s), null, `a viewer sees ${s}`);
  }
  await t.shot(vpage, 'viewer-settings');
  await t.openView(vpage, id, 'keys');
  await vpage.waitForSelector('[data-keys-admins-only]');
  for (const s of ['form[data-create-key]', '[data-keys-list]', 'button[data-rotate]', 'button[data-revoke]', '.error-box']) {
    assert.equal(await vpage.$(s), null, `a viewer sees ${s}`);
  }
  assert.equal((await call('GET', `/api/keys?projectId=${id}`, { token: viewer.token })).status, 403);
  await t.shot(vpage, 'viewer-keys');

  t.log('a developer: no key management and no settings actions either');
  const developer = await memberAs(token, id, 'developer');
  const dpage = await t.newPage();
  await t.signIn(dpage, developer);
  await dpage.goto(`${BASE}/projects/${id}/keys`);
  await dpage.waitForSelector('[data-keys-admins-only]');
  assert.equal(await dpage.$('form[data-create-key]'), null);
  await t.openView(dpage, id, 'settings');
  await dpage.waitForSelector('[data-readonly-note]');
  assert.equal(await textOf(dpage, '[data-role]'), 'developer');
  for (const s of ['form[data-rename]', 'input[data-realtime-public]', 'button[data-delete-project]']) {
    assert.equal(await dpage.$(s), null, `a developer sees ${s}`);
  }
  assert.equal((await call('PATCH', '/api/projects', { token: developer.token, body: { projectId: id, name: 'nope' } })).status, 403);

  t.log('delete: the confirmation needs the project\'s name typed');
  await page.goto(`${BASE}/projects/${id}/settings`);
  await (await page.waitForSelector('button[data-delete-project]')).click();
  const input = await page.waitForSelector('dialog[open] input[type=text]');
  await input.type('not the name');
  await page.click('dialog[open] button[data-action="Delete project"]');
  assert.ok(await page.$('dialog[open]'), 'the wrong name closed the dialog');
  assert.ok(await project(), 'the wrong name deleted the project');
  await t.shot(page, 'delete-confirm');
  await input.click({ clickCount: 3 });
  await input.type(renamed);
  await page.click('dialog[open] button[data-action="Delete project"]');
  await page.waitForFunction(() => location.pathname === '/projects');
  await page.waitForSelector('h1::-p-text(Projects)');
  assert.equal(await page.$(`a[data-project="${id}"]`), null);
  assert.equal(await project(), undefined);
  const gone = await call('GET', `/api/keys?projectId=${id}`, { token });
  assert.ok([403, 404].includes(gone.status), JSON.stringify(gone));
  const sqlGone = await sqlWith(rotated, id);
  assert.ok([401, 403, 404].includes(sqlGone.status), JSON.stringify(sqlGone));
});
