// Team and invitations: the owner invites an account as developer in the UI; the invitee (a
// browser context of its own) sees the badge and the invitation, accepts, and the project is in
// their list; the owner changes their role (to admin and back: the last admin, and the last
// owner while the other admin only got the role by a change, is never offered a demotion or removal), to viewer (the invitee's views turn read-only), removes them; a rejected
// invitation shows as rejected. Every step is checked against the API too.
import { spec, BASE, assert, call, until, textOf, unique, account } from '../lib/harness.mjs';

await spec('team', async (t) => {
  const owner = await t.newPage();
  const ownerAccount = await t.signUp(owner, { name: 'Olivia Owner' });
  const name = unique('team');
  const id = await t.createProject(owner, name);
  const token = await t.token(owner);
  const team = async () => (await call('GET', `/api/team?projectId=${id}`, { token })).body;
  const bob = await account({ displayName: 'Bob Builder' });
  const carol = await account({ displayName: 'Carol Critic' });
  const ownerRow = `tr[data-member="${ownerAccount.email}"]`;
  const bobRow = `tr[data-member="${bob.email}"]`;
  /** Picks a role in a member's select and saves it (the button is off until the role differs). */
  const setRole = async (email, role) => {
    assert.ok(await owner.$eval(`button[data-save-role="${email}"]`, (b) => b.disabled), 'Save is on before a change');
    await owner.select(`select[data-role-of="${email}"]`, role);
    await owner.click(`button[data-save-role="${email}"]:not([disabled])`);
  };

  t.log('the team view: the owner alone, the last admin, offered neither demotion nor removal');
  await t.openView(owner, id, 'team');
  await owner.waitForSelector(ownerRow);
  assert.equal(await owner.$eval(ownerRow, (tr) => tr.dataset.role), 'admin');
  assert.match(await textOf(owner, ownerRow), /\(you\)[\s\S]*last admin/);
  assert.equal(await owner.$(`${ownerRow} select`), null);
  assert.equal(await owner.$(`${ownerRow} button[data-remove]`), null);
  assert.match(await textOf(owner, '[data-invites-list]'), /No invitations yet/);

  t.log('inviting an address without an account shows USER_NOT_FOUND');
  await owner.type('input[name=invite-email]', `${unique('nobody')}@example.com`);
  await owner.click('form[data-invite-form] button[type=submit]');
  await owner.waitForSelector('form[data-invite-form] .error-box[data-code=USER_NOT_FOUND]');

  t.log('invite Bob as developer');
  await owner.$eval('input[name=invite-email]', (i) => { i.value = ''; });
  await owner.type('input[name=invite-email]', bob.email.toUpperCase());
  await owner.select('select[name=invite-role]', 'developer');
  await owner.click('form[data-invite-form] button[type=submit]');
  await owner.waitForSelector(`tr[data-invite="${bob.email}"][data-status=pending]`);
  assert.equal(await owner.$('form[data-invite-form] .error-box'), null, 'the old error stays after a success');
  assert.match(await textOf(owner, `tr[data-invite="${bob.email}"]`), /developer[\s\S]*pending/);
  const invited = (await team()).invites.find((i) => i.email === bob.email);
  assert.ok(invited && invited.role === 'developer' && invited.status === 'pending', JSON.stringify(invited));
  await t.shot(owner, 'invited');

  t.log('Bob signs in: the badge counts one invitation; he accepts it');
  const bp = await t.newPage();
  await t.signIn(bp, bob);
  await bp.waitForSelector('a.invites[data-invites="1"] .badge');
  assert.equal(await bp.$(`a[data-project="${id}"]`), null);
  await bp.click('a.invites');
  await bp.waitForSelector(`tr[data-project="${id}"]`);
  assert.match(await textOf(bp, `tr[data-project="${id}"]`), new RegExp(`${name}[\\s\\S]*developer`));
  await t.shot(bp, 'invitation');
  await bp.click(`button[data-accept="${invited.id}"]`);
  await bp.waitForSelector(`[data-answered="${id}"][data-status=accepted] a[data-open-project="${id}"]`);
  await bp.waitForSelector('a.invites[data-invites="0"]');
  assert.equal(await bp.$('.badge'), null);
  assert.match(await textOf(bp, '.content'), /No pending invitations/);
  await t.shot(bp, 'accepted');
  const joined = (await team()).members.find((m) => m.email === bob.email);
  assert.equal(joined && joined.role, 'developer', JSON.stringify(joined));
  assert.equal((await team()).invites.find((i) => i.email === bob.email).status, 'accepted');

  t.log('the project link opens it as developer, and it is in Bob\'s list');
  await bp.click(`a[data-open-project="${id}"]`);
  await bp.waitForFunction((p) => location.pathname === `/projects/${p}/settings`, {}, id);
  assert.equal(await textOf(bp, '[data-role]'), 'developer');
  await bp.goto(`${BASE}/projects`);
  await bp.waitForSelector(`a[data-project="${id}"]`);
  assert.match(await bp.$eval(`a[data-project="${id}"]`, (a) => a.closest('tr').innerText), /developer/);

  t.log('the owner sees Bob; making him admin by a role change leaves the owner locked as the last owner (the API would answer 409), then as the last admin again');
  await owner.reload();
  await owner.waitForSelector(bobRow);
  assert.match(await textOf(owner, `tr[data-invite="${bob.email}"]`), /accepted/);
  assert.equal(await owner.$eval(`select[data-role-of="${bob.email}"]`, (s) => s.value), 'developer');
  await setRole(bob.email, 'admin');
  await owner.waitForSelector(`${bobRow}[data-role=admin]`);
  await owner.waitForFunction((s) => /last owner/.test(document.querySelector(s)?.innerText || ''), {}, ownerRow);
  assert.equal(await owner.$(`${ownerRow} select`), null);
  assert.equal(await owner.$(`${ownerRow} button[data-remove]`), null);
  const listed = await team();
  assert.deepEqual(listed.members.map((m) => [m.email, m.role, m.owner]),
    [[ownerAccount.email, 'admin', true], [bob.email, 'admin', false]]);
  assert.equal((await call('DELETE', `/api/team?projectId=${id}&userId=${listed.members[0].userId}`, { token })).status, 409);
  await setRole(bob.email, 'developer');
  await owner.waitForSelector(`${bobRow}[data-role=developer]`);
  await owner.waitForFunction((s) => /last admin/.test(document.querySelector(s)?.innerText || ''), {}, ownerRow);

  t.log('the owner makes Bob a viewer');
  await setRole(bob.email, 'viewer');
  await owner.waitForSelector(`${bobRow}[data-role=viewer]`);
  await until('Bob is viewer in the API', async () => (await team()).members.find((m) => m.email === bob.email).role === 'viewer');
  await t.shot(owner, 'team');
  await owner.emulateMediaFeatures([{ name: 'prefers-color-scheme', value: 'dark' }]);
  await t.shot(owner, 'team-dark');
  await owner.emulateMediaFeatures([{ name: 'prefers-color-scheme', value: 'light' }]);

  t.log('Bob reloads: his views show viewer, read-only');
  await bp.goto(`${BASE}/projects/${id}/settings`);
  await bp.waitForSelector('[data-readonly-note]');
  assert.equal(await textOf(bp, '[data-role]'), 'viewer');
  assert.equal(await bp.$('form[data-rename]'), null);
  assert.equal(await bp.$('button[data-delete-project]'), null);
  await t.openView(bp, id, 'team');
  await bp.waitForSelector('[data-team-admins-only] [data-my-role=viewer]');
  for (const s of ['form[data-invite-form]', '[data-members]', 'select', 'button[data-remove]', '.error-box']) {
    assert.equal(await bp.$(`.content ${s}`), null, `a viewer sees ${s}`);
  }
  assert.equal((await call('GET', `/api/team?projectId=${id}`, { token: bob.token })).status, 403);
  await t.shot(bp, 'viewer-team');

  t.log('the owner removes Bob (asks first): gone from the team and from his projects');
  await owner.click(`button[data-remove="${bob.email}"]`);
  await owner.waitForSelector('dialog[open] button[data-action=Cancel]');
  await owner.click('dialog[open] button[data-action=Cancel]');
  await owner.waitForFunction(() => !document.querySelector('dialog'));
  assert.ok((await team()).members.some((m) => m.email === bob.email), 'cancel removed Bob');
  await owner.click(`button[data-remove="${bob.email}"]`);
  await (await owner.waitForSelector('dialog[open] button[data-action="Remove member"]')).click();
  await owner.waitForFunction((s) => !document.querySelector(s), {}, bobRow);
  assert.ok(!(await team()).members.some((m) => m.email === bob.email));
  const bobsProjects = (await call('GET', '/api/projects', { token: bob.token })).body.projects;
  assert.ok(!bobsProjects.some((p) => p.id === id), JSON.stringify(bobsProjects));
  await bp.reload();
  await bp.waitForSelector('h1::-p-text(Project not found)');

  t.log('Carol, already signed in, is invited as viewer: the Invitations page finds it');
  const cp = await t.newPage();
  await t.signIn(cp, carol);
  await cp.waitForSelector('a.invites[data-invites="0"]');
  await owner.type('input[name=invite-email]', carol.email);
  await owner.select('select[name=invite-role]', 'viewer');
  await owner.click('form[data-invite-form] button[type=submit]');
  await owner.waitForSelector(`tr[data-invite="${carol.email}"][data-status=pending]`);
  await cp.click('a.invites');
  await cp.waitForSelector('a.invites[data-invites="1"]');

  t.log('Carol rejects (asks first): the owner sees the invitation rejected');
  const carolInvite = (await team()).invites.find((i) => i.email === carol.email);
  await (await cp.waitForSelector(`button[data-reject="${carolInvite.id}"]`)).click();
  await (await cp.waitForSelector('dialog[open] button[data-action="Reject invitation"]')).click();
  await cp.waitForSelector(`[data-answered="${id}"][data-status=rejected]`);
  await cp.waitForSelector('a.invites[data-invites="0"]');
  assert.equal(await cp.$(`a[data-open-project="${id}"]`), null);
  assert.equal((await team()).invites.find((i) => i.email === carol.email).status, 'rejected');
  assert.ok(!(await call('GET', '/api/projects', { token: carol.token })).body.projects.some((p) => p.id === id));
  await owner.reload();
  await owner.waitForSelector(`tr[data-invite="${carol.email}"][data-status=rejected]`);
  assert.match(await textOf(owner, `tr[data-invite="${carol.email}"]`), /viewer[\s\S]*rejected/);
  assert.equal(await owner.$(`tr[data-member="${carol.email}"]`), null);
  await t.shot(owner, 'rejected');

  t.log('the owner invites Carol again, then withdraws it (asks first): gone from both sides');
  await owner.type('input[name=invite-email]', carol.email);
  await owner.select('select[name=invite-role]', 'developer');
  await owner.click('form[data-invite-form] button[type=submit]');
  await owner.waitForSelector(`tr[data-invite="${carol.email}"][data-status=pending][data-answerable=true]`);
  await cp.reload();
  await cp.waitForSelector('a.invites[data-invites="1"]');
  await owner.click(`button[data-withdraw="${carol.email}"]`);
  await (await owner.waitForSelector('dialog[open] button[data-action="Withdraw"]')).click();
  await owner.waitForFunction((email) => !document.querySelector(`tr[data-invite="${email}"]`), {}, carol.email);
  assert.equal((await team()).invites.find((i) => i.email === carol.email), undefined);
  await cp.reload();
  await cp.waitForSelector('a.invites[data-invites="0"]');
});
