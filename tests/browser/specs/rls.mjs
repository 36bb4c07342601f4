// Row Level Security: a table of alice's and bob's rows; the "User owns rows" template creates the
// policy (a read key acting for alice then sees her row only); the switch turns it off (no rows:
// RLS stays on) and on again; a policy naming a missing column, or comparing an integer with
// auth.uid(), is refused with the guide's troubleshooting hint; the two-policy template; RLS
// disabled and enabled again; FORCE lifted; delete with a confirmation; a viewer reads only.
import { spec, BASE, assert, call, until, memberAs, projectFor } from '../lib/harness.mjs';

await spec('rls', async (t) => {
  const page = await t.newPage();
  const owner = await t.signUp(page);
  const token = await t.token(page);
  const project = await projectFor(token);
  const pid = project.id;

  t.log('a project without tables: the empty state, nothing to create a policy on');
  await page.goto(`${BASE}/projects/${pid}/settings`);
  await page.waitForSelector('nav a[data-view="rls"]');
  await t.openView(page, pid, 'rls');
  await page.waitForSelector('section h2::-p-text(No tables)');
  assert.equal(await page.$eval('button[data-new-policy]', (b) => b.disabled), true);

  t.log('tables made through the API: posts (alice, bob), nums (an integer user_id), articles');
  const made = await call('POST', '/api/execute-sql', {
    token: project.keys.admin,
    body: {
      projectId: pid,
      query: "CREATE TABLE posts (id serial PRIMARY KEY, user_id text NOT NULL, body text); INSERT INTO posts (user_id, body) VALUES ('alice', 'hi from alice'), ('bob', 'hi from bob'); CREATE TABLE nums (id int, user_id int); CREATE TABLE articles (id serial, author_id text, title text)",
    },
  });
  assert.equal(made.status, 200, JSON.stringify(made.body));

  /** The posts rows a read key sees acting for `uid` (an oracle beside the page). */
  const seenBy = async (uid) => {
    const r = await call('POST', '/api/execute-sql', {
      token: project.keys.read,
      headers: uid ? { 'X-Fluxbase-Auth-Uid': uid } : {},
      body: { projectId: pid, query: 'SELECT body FROM posts ORDER BY id' },
    });
    assert.equal(r.status, 200, JSON.stringify(r.body));
    return r.body.result.rows.map((row) => (Array.isArray(row) ? row[0] : row.body));
  };
  const tablesNow = async () => {
    const r = await call('GET', `/api/rls/policies?projectId=${pid}`, { token });
    assert.equal(r.status, 200, JSON.stringify(r.body));
    return Object.fromEntries(r.body.tables.map((x) => [x.table, x]));
  };
  assert.deepEqual(await seenBy('alice'), ['hi from alice', 'hi from bob'], 'no RLS yet: every row');

  t.log('open the view: every table with its RLS state');
  await page.reload();
  const posts = 'section[data-table="posts"]';
  await page.waitForSelector(`${posts} [data-rls-state=disabled]`);
  await page.waitForSelector('section[data-table="nums"]');
  await page.waitForSelector('section[data-table="articles"]');

  const fill = async (selector, value) => {
    await page.$eval(selector, (el) => { el.value = ''; });
    await page.type(selector, value);
  };
  const openCreate = async (table) => {
    await page.click(`section[data-table="${table}"] button[data-add-policy]`);
    await page.waitForSelector('dialog[open] select[data-field=template]');
    assert.equal(await page.$eval('dialog[open] select[data-field=table]', (s) => s.value), `public.${table}`);
  };

  t.log('create the "User owns rows" policy from its template');
  await openCreate('posts');
  await page.select('dialog[open] select[data-field=template]', 'owner');
  assert.equal(await page.$eval('dialog[open] [data-policy-form="0"] [data-field=using]', (x) => x.value), 'user_id = auth.uid()');
  assert.equal(await page.$eval('dialog[open] [data-policy-form="0"] [data-field=name]', (x) => x.value), 'User owns rows');
  await t.shot(page, 'create-dialog');
  await page.click('dialog[open] button[data-action="Create policy"]');
  await page.waitForSelector('dialog[open]', { hidden: true });
  const own = `${posts} tr[data-policy="User owns rows"]`;
  await page.waitForSelector(`${own} input[data-policy-enabled]:checked`);
  await page.waitForSelector(`${posts} [data-rls-state=enabled]`);
  assert.match(await page.$eval(own, (tr) => tr.innerText), /ALL[\s\S]*user_id = auth\.uid\(\)/);
  let state = await tablesNow();
  assert.equal(state.posts.rlsEnabled, true);
  assert.deepEqual(state.posts.policies, [{ name: 'User owns rows', command: 'ALL', using: 'user_id = auth.uid()', check: null, enabled: true }]);
  assert.deepEqual(await seenBy('alice'), ['hi from alice']);
  assert.deepEqual(await seenBy('bob'), ['hi from bob']);
  assert.deepEqual(await seenBy(null), []);
  await t.shot(page, 'policy');

  t.log('switch the policy off: RLS stays on, alice sees no rows');
  await page.click(`${own} input[data-policy-enabled]`);
  await until('the policy disabled on the server', async () => (await tablesNow()).posts.policies[0].enabled === false);
  await page.waitForSelector(`${own} input[data-policy-enabled]:not(:checked)`);
  await page.waitForSelector(`${posts} [data-no-policy]`);
  assert.deepEqual(await seenBy('alice'), []);
  assert.equal((await tablesNow()).posts.rlsEnabled, true);
  await t.shot(page, 'policy-off');

  t.log('and on again: alice sees her row');
  await page.click(`${own} input[data-policy-enabled]`);
  await until('the policy enabled on the server', async () => (await tablesNow()).posts.policies[0].enabled === true);
  // The box is checked as clicked; the note about no enabled policy goes once the view reloads.
  await page.waitForSelector(`${posts} [data-no-policy]`, { hidden: true });
  await page.waitForSelector(`${own} input[data-policy-enabled]:checked`);
  assert.deepEqual(await seenBy('alice'), ['hi from alice']);

  t.log('test as an end user in the page (read scope, authUid): alice sees her row, carol none');
  const testAs = async (uid) => {
    await page.select('form[aria-label="Test as an end user"] select[data-test-table]', 'public.posts');
    await page.$eval('input[data-test-uid]', (x) => { x.value = ''; });
    await page.type('input[data-test-uid]', uid);
    await page.click('form[aria-label="Test as an end user"] button[type=submit]');
    const out = await page.waitForSelector(`.rls-test-out [data-test-count]::-p-text("${uid}")`);
    return { count: Number(await out.evaluate((x) => x.dataset.testCount)), text: await page.$eval('.rls-test-out', (x) => x.innerText) };
  };
  let seen = await testAs('alice');
  assert.equal(seen.count, 1);
  assert.match(seen.text, /hi from alice/);
  assert.doesNotMatch(seen.text, /hi from bob/);
  await t.shot(page, 'test-as-user');
  await page.emulateMediaFeatures([{ name: 'prefers-color-scheme', value: 'dark' }]);
  await t.shot(page, 'dark');
  await page.emulateMediaFeatures([{ name: 'prefers-color-scheme', value: 'light' }]);
  seen = await testAs('carol');
  assert.equal(seen.count, 0);
  assert.match(seen.text, /Temporarily set USING to true/);

  t.log('a policy naming a missing column: the API\'s error and the guide\'s hint');
  await openCreate('posts');
  await fill('dialog[open] [data-policy-form="0"] [data-field=name]', 'by owner');
  await fill('dialog[open] [data-policy-form="0"] [data-field=using]', 'owner_id = auth.uid()');
  await page.click('dialog[open] button[data-action="Create policy"]');
  await page.waitForSelector('dialog[open] .error-box[data-code=BAD_REQUEST]');
  assert.match(await page.$eval('dialog[open] .error-box', (x) => x.innerText), /owner_id/);
  assert.match(await page.$eval('dialog[open] [data-trouble]', (x) => x.innerText), /Ensure user_id \(or the referenced column\) exists/);
  await t.shot(page, 'missing-column');
  await page.click('dialog[open] button[data-action=Cancel]');
  await page.waitForSelector('dialog[open]', { hidden: true });
  assert.equal((await tablesNow()).posts.policies.length, 1);

  t.log('an integer user_id compared with auth.uid(): the cast hint');
  await openCreate('nums');
  await page.select('dialog[open] select[data-field=template]', 'owner');
  await page.click('dialog[open] button[data-action="Create policy"]');
  await page.waitForSelector('dialog[open] .error-box[data-code=BAD_REQUEST]');
  assert.match(await page.$eval('dialog[open] [data-trouble]', (x) => x.innerText), /user_id::text = auth\.uid\(\)/);
  t.log('the cast, as the hint says, is accepted');
  await fill('dialog[open] [data-policy-form="0"] [data-field=using]', 'user_id::text = auth.uid()');
  await page.click('dialog[open] button[data-action="Create policy"]');
  await page.waitForSelector('dialog[open]', { hidden: true });
  await page.waitForSelector('section[data-table="nums"] tr[data-policy="User owns rows"]');
  assert.equal((await tablesNow()).nums.policies[0].using, 'user_id::text = auth.uid()');

  t.log('"Public read + owner write": two policies');
  await openCreate('articles');
  await page.select('dialog[open] select[data-field=template]', 'public-read');
  assert.equal((await page.$$('dialog[open] [data-policy-form]')).length, 2);
  await page.click('dialog[open] button[data-action="Create policy"]');
  await page.waitForSelector('dialog[open]', { hidden: true });
  await page.waitForSelector('section[data-table="articles"] tr[data-policy="Owner writes"]');
  state = await tablesNow();
  assert.deepEqual(state.articles.policies.map((p) => [p.name, p.command, p.using]).sort(),
    [['Owner writes', 'ALL', 'author_id = auth.uid()'], ['Public read', 'SELECT', 'true']]);

  t.log('disable RLS on articles (asked first), then enable it again');
  await page.click('section[data-table="articles"] button[data-rls-toggle=disable]');
  await page.waitForSelector('dialog[open] button[data-action="Disable RLS"]');
  await page.click('dialog[open] button[data-action="Disable RLS"]');
  await page.waitForSelector('section[data-table="articles"] [data-rls-state=disabled]');
  assert.equal((await tablesNow()).articles.rlsEnabled, false);
  await page.click('section[data-table="articles"] button[data-rls-toggle=enable]');
  await page.waitForSelector('section[data-table="articles"] [data-rls-state=enabled]');
  assert.equal((await tablesNow()).articles.rlsEnabled, true);

  t.log('FORCE (set through the API) is shown with the NO FORCE fix');
  const forced = await call('POST', '/api/execute-sql', { token: project.keys.admin, body: { projectId: pid, query: 'ALTER TABLE nums FORCE ROW LEVEL SECURITY' } });
  assert.equal(forced.status, 200, JSON.stringify(forced.body));
  await page.reload();
  await page.waitForSelector('section[data-table="nums"] [data-rls-forced]');
  assert.match(await page.$eval('section[data-table="nums"]', (x) => x.innerText), /Admin locked out/);
  await t.shot(page, 'forced');
  await page.click('section[data-table="nums"] button[data-no-force]');
  await page.click('dialog[open] button[data-action="Run NO FORCE"]');
  await page.waitForSelector('section[data-table="nums"] [data-rls-forced]', { hidden: true });
  assert.equal((await tablesNow()).nums.rlsForced, false);

  t.log('delete the policy (asked first): RLS stays on, alice sees nothing');
  await page.click(`${own} button[data-delete-policy]`);
  await page.waitForSelector('dialog[open] button[data-action="Delete policy"]');
  await page.click('dialog[open] button[data-action=Cancel]');
  await page.waitForSelector('dialog[open]', { hidden: true });
  assert.equal((await tablesNow()).posts.policies.length, 1, 'cancel keeps the policy');
  await page.click(`${own} button[data-delete-policy]`);
  await page.click('dialog[open] button[data-action="Delete policy"]');
  await page.waitForSelector(own, { hidden: true });
  await page.waitForSelector(`${posts} [data-no-policy]`);
  state = await tablesNow();
  assert.deepEqual(state.posts.policies, []);
  assert.equal(state.posts.rlsEnabled, true);
  assert.deepEqual(await seenBy('alice'), []);

  t.log('RLS disabled on posts: every row again; enabled without a policy (asked first): none');
  await page.click(`${posts} button[data-rls-toggle=disable]`);
  await page.click('dialog[open] button[data-action="Disable RLS"]');
  await page.waitForSelector(`${posts} [data-rls-state=disabled]`);
  assert.deepEqual(await seenBy('alice'), ['hi from alice', 'hi from bob']);
  await page.click(`${posts} button[data-rls-toggle=enable]`);
  await page.waitForSelector('dialog[open] button[data-action="Enable RLS"]');
  assert.match(await page.$eval('dialog[open]', (d) => d.innerText), /no enabled policy/);
  await page.click('dialog[open] button[data-action="Enable RLS"]');
  await page.waitForSelector(`${posts} [data-rls-state=enabled]`);
  assert.equal((await tablesNow()).posts.rlsEnabled, true);
  assert.deepEqual(await seenBy('alice'), []);

  t.log('tables whose schema and name hold dots: the policy lands on the table chosen');
  // "q.r".s and q."r.s" both read q.r.s when joined with a dot.
  const dotted = await call('POST', '/api/execute-sql', {
    token: project.keys.admin,
    body: { projectId: pid, query: 'CREATE SCHEMA q; CREATE SCHEMA "q.r"; CREATE TABLE "q.r".s (id int); CREATE TABLE q."r.s" (id int)' },
  });
  assert.equal(dotted.status, 200, JSON.stringify(dotted.body));
  await page.reload();
  const target = 'section[aria-label="Table q.r.s"]';
  await page.waitForSelector(target);
  const panels = await page.$$eval(target, (els) => els.length);
  assert.equal(panels, 2, 'two tables, both shown');
  // The second panel in the API's order; its Add policy must create on that very table.
  const all = (await call('GET', `/api/rls/policies?projectId=${pid}`, { token })).body.tables
    .filter((x) => `${x.schema}.${x.table}` === 'q.r.s');
  const chosen = all[1];
  const buttons = await page.$$(`${target} button[data-add-policy]`);
  await buttons[1].click();
  await page.waitForSelector('dialog[open] select[data-field=template]');
  await fill('dialog[open] [data-policy-form="0"] [data-field=name]', 'lock');
  await fill('dialog[open] [data-policy-form="0"] [data-field=using]', 'false');
  await page.click('dialog[open] button[data-action="Create policy"]');
  await page.waitForSelector('dialog[open]', { hidden: true });
  const after = (await call('GET', `/api/rls/policies?projectId=${pid}`, { token })).body.tables
    .filter((x) => `${x.schema}.${x.table}` === 'q.r.s');
  const withPolicy = after.filter((x) => x.policies.some((p) => p.name === 'lock'));
  assert.deepEqual(withPolicy.map((x) => [x.schema, x.table]), [[chosen.schema, chosen.table]], JSON.stringify(after));

  t.log('a viewer sees the tables and policies, and no control');
  const viewer = await memberAs(token, pid, 'viewer');
  const vpage = await t.newPage();
  await t.signIn(vpage, viewer);
  await vpage.goto(`${BASE}/projects/${pid}/rls`);
  await vpage.waitForSelector('section[data-table="articles"] tr[data-policy="Public read"] [data-policy-state=on]');
  await vpage.waitForSelector('[data-readonly]');
  for (const sel of ['[data-new-policy]', '[data-add-policy]', '[data-delete-policy]', 'input[data-policy-enabled]', '[data-rls-toggle]', '[data-no-force]', 'form[aria-label="Test as an end user"]']) {
    assert.equal(await vpage.$(sel), null, `a viewer has no ${sel}`);
  }
  assert.equal(await vpage.$$eval('main button', (bs) => bs.length), 0, 'no button at all in the view');
  await t.shot(vpage, 'viewer');
  await vpage.close();

  t.log('a developer manages policies and tests as an end user too');
  const developer = await memberAs(token, pid, 'developer');
  const dpage = await t.newPage();
  await t.signIn(dpage, developer);
  await dpage.goto(`${BASE}/projects/${pid}/rls`);
  await dpage.waitForSelector('section[data-table="posts"] button[data-rls-toggle=disable]');
  assert.equal(await dpage.$eval('button[data-new-policy]', (b) => b.disabled), false);
  assert.ok(await dpage.$('section[data-table="articles"] input[data-policy-enabled]'));
  await dpage.select('form[aria-label="Test as an end user"] select[data-test-table]', 'public.posts');
  await dpage.type('input[data-test-uid]', 'alice');
  await dpage.click('form[aria-label="Test as an end user"] button[type=submit]');
  await dpage.waitForSelector('.rls-test-out [data-test-count="0"]');
  void owner;
});
