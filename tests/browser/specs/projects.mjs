// Sign up, the projects list, create a project (its keys shown once), switch between projects,
// sign out and in again; a suspended project shown as such (the operator's CLI suspends).
import { spec, BASE, assert, call, textOf, unique, operator, until } from '../lib/harness.mjs';

await spec('projects', async (t) => {
  const page = await t.newPage();
  t.log('an anonymous visitor is sent to the login page');
  await page.goto(`${BASE}/projects`);
  await page.waitForSelector('form[aria-label="Sign in"]');
  assert.match(page.url(), /\/login\?next=%2Fprojects$/);
  await t.shot(page, 'login');

  const account = await t.signUp(page);
  assert.match(await textOf(page, '.content'), /No projects yet/);
  await t.shot(page, 'empty');

  const first = await t.createProject(page, 'shop');
  const second = await t.createProject(page, 'blog');
  await page.goto(`${BASE}/projects`);
  await page.waitForSelector(`a[data-project="${second}"]`);
  const rows = await page.$$eval('table.grid tbody tr', (trs) => trs.map((tr) => tr.innerText));
  assert.equal(rows.length, 2, rows.join('\n'));
  assert.ok(rows.some((r) => r.includes('shop') && r.includes(first) && r.includes('PostgreSQL') && r.includes('admin') && r.includes('active')), rows.join('\n'));
  await t.shot(page, 'list');

  t.log('a MySQL project: chosen in the form, shown in the list, SQL in the editor');
  const mysql = await t.createProject(page, 'legacy', 'mysql');
  await page.goto(`${BASE}/projects`);
  await page.waitForSelector(`a[data-project="${mysql}"]`);
  const mysqlRow = await page.$eval(`a[data-project="${mysql}"]`, (a) => a.closest('tr').innerText);
  assert.match(mysqlRow, /MySQL/, mysqlRow);
  const answer = await call('POST', '/api/execute-sql', { token: await t.token(page), body: { projectId: mysql, query: 'SELECT VERSION() LIKE \'%MariaDB%\' AS maria' } });
  assert.equal(answer.body.result.rows[0].maria, 1, JSON.stringify(answer.body));

  t.log('switch projects with the top bar');
  await page.click(`a[data-project="${first}"]`);
  await page.waitForFunction((id) => location.pathname === `/projects/${id}/settings`, {}, first);
  await page.select('select.switcher', second);
  await page.waitForFunction((id) => location.pathname === `/projects/${id}/settings`, {}, second);

  t.log('the session survives a reload of the tab, and no key is kept');
  await page.reload();
  await page.waitForSelector('nav.sidebar');
  const stored = await page.evaluate(() => JSON.stringify({ ...sessionStorage }) + JSON.stringify({ ...localStorage }) + document.cookie + document.documentElement.outerHTML);
  assert.doesNotMatch(stored, /flx_live_/);

  t.log('sign out: the token stops working, and the tab keeps nothing (the SQL history included)');
  await page.goto(`${BASE}/projects/${second}/sql`);
  await page.waitForSelector('[data-sql-editor]');
  await page.type('[data-sql-editor]', "SELECT 'secret' AS s");
  await page.keyboard.down('Control'); await page.keyboard.press('Enter'); await page.keyboard.up('Control');
  await page.waitForSelector('[data-history-item]');
  const token = await t.token(page);
  await page.click('button[data-logout]');
  await page.waitForSelector('form[aria-label="Sign in"]');
  assert.equal((await call('GET', '/api/auth/me', { token })).status, 401);
  assert.equal(await page.evaluate(() => sessionStorage.length), 0);

  t.log('a wrong password is shown in the guide\'s error shape');
  await page.type('input[name=email]', account.email);
  await page.type('input[name=password]', 'not the password');
  await page.click('button[type=submit]');
  await page.waitForSelector('.error-box[data-code=AUTH_REQUIRED]');

  await t.signIn(page, account);
  await page.waitForSelector(`a[data-project="${first}"]`);

  t.log('a project the operator suspends is shown as suspended');
  await operator('project', 'suspend', second);
  const token2 = await t.token(page);
  await until('the server to refuse the suspended project', async () => (await call('GET', `/api/keys?projectId=${second}`, { token: token2 })).status === 403);
  await page.goto(`${BASE}/projects`);
  await page.waitForSelector(`a[data-project="${second}"]`);
  const suspendedRow = await page.$eval(`a[data-project="${second}"]`, (a) => a.closest('tr').innerText);
  assert.match(suspendedRow, /suspended/, suspendedRow);
  assert.match(await page.$eval(`select.switcher option[value="${second}"]`, (o) => o.textContent), /\(suspended\)$/);
  await page.goto(`${BASE}/projects/${second}/settings`);
  await page.waitForSelector('.banner.warn');
  assert.match(await textOf(page, '.banner.warn'), /suspended/);
  await t.shot(page, 'suspended');
  await operator('project', 'resume', second);

  t.log('an unknown project id is not found, not an error');
  await page.goto(`${BASE}/projects/${'0'.repeat(16)}/settings`);
  await page.waitForSelector('h1::-p-text(Project not found)');
  void unique;
});
