// API keys: the project's keys (name, prefix, scope, created, last used); admins create one with
// a scope, rotate or revoke it. A new secret is shown once in a dialog and dropped with it: the
// page keeps no secret anywhere. Only admins may see keys (the API answers developers and
// viewers 403 INSUFFICIENT_PERMISSIONS): they get a short note instead.

import { h, mount, field, header, section, errorBox, dataTable, when, dialog, secretBox, confirmDialog, toast, act } from '../lib/dom.js';
import { get, post, del } from '../lib/api.js';

const SCOPES = [
  ['read', 'read: SELECT only (dashboards, public APIs)'],
  ['readwrite', 'readwrite: SELECT, INSERT, UPDATE (backend services)'],
  ['admin', 'admin: DDL and DML, keys and team (migrations, init scripts)'],
];

function adminsOnly(ctx, el) {
  mount(el,
    header('API Keys', 'The keys your backends use to call this project.'),
    h('section', { class: 'panel note', 'data-keys-admins-only': '' },
      h('h2', {}, 'Only admins can see API keys'),
      h('p', {}, `Your role in ${ctx.project.name} is ${ctx.role}. A project admin can create a key for you; `,
        'the Settings page has the project id and URLs your app needs.')));
}

/** Shows a secret once; resolves when the user is done (the dialog, and the secret, are then
 * removed from the page). */
async function showSecret(title, key, secret) {
  await dialog({
    title,
    body: h('div', { class: 'key-secret', 'data-key-secret': key.id },
      h('p', {}, `Key ${key.name} (${key.scope}), prefix `, h('code', {}, key.prefix), '.'),
      secretBox(secret, 'The secret'),
      h('p', { class: 'hint' }, 'Use it as "Authorization: Bearer <secret>" from your server only (FLUXBASE_API_KEY).')),
    actions: [{ label: 'Done', value: 'done', class: 'primary' }],
  });
}

/** A suspended project answers 403 PROJECT_SUSPENDED to every request naming it. */
function suspendedNote(ctx, el) {
  mount(el,
    header('API Keys'),
    h('section', { class: 'panel', 'data-keys-suspended': '' },
      h('h2', {}, 'The project is suspended'),
      h('p', {}, 'The API refuses every request that names it (403 PROJECT_SUSPENDED), so API keys cannot be listed or changed until the operator resumes it.')));
}

function render(ctx, el) {
  const p = ctx.project;
  if (!ctx.can.manage) return adminsOnly(ctx, el);
  if (p.status === 'suspended') return suspendedNote(ctx, el);

  const list = h('div', { 'data-keys-list': '' }, h('p', { class: 'loading' }, 'Loading keys…'));
  let alive = true;

  async function load() {
    let answer;
    try {
      answer = await get('/api/keys', { projectId: p.id });
    } catch (err) {
      if (!alive) return;
      if (err.code === 'INSUFFICIENT_PERMISSIONS') return adminsOnly(ctx, el); // demoted meanwhile
      mount(list, errorBox(err), h('button', { type: 'button', onclick: act(load) }, 'Try again'));
      return;
    }
    if (!alive) return;
    mount(list, dataTable([
      { key: 'name', label: 'Name', render: (k) => h('span', { 'data-key-name': '' }, k.name) },
      { key: 'prefix', label: 'Prefix', render: (k) => h('code', {}, `${k.prefix}…`) },
      { key: 'scope', label: 'Scope', render: (k) => h('span', { class: `scope scope-${k.scope}` }, k.scope) },
      { key: 'createdAt', label: 'Created', render: (k) => when(k.createdAt) },
      { key: 'lastUsedAt', label: 'Last used', render: (k) => (k.lastUsedAt ? when(k.lastUsedAt) : h('span', { class: 'muted' }, 'never')) },
      { key: 'actions', label: 'Actions', render: (k) => h('div', { class: 'row' },
        h('button', { type: 'button', class: 'small', 'data-rotate': k.id, 'aria-label': `Rotate ${k.name}`, onclick: act(() => rotate(k)) }, 'Rotate'),
        h('button', { type: 'button', class: 'small danger', 'data-revoke': k.id, 'aria-label': `Revoke ${k.name}`, onclick: act(() => revoke(k)) }, 'Revoke')) },
    ], answer.keys, { empty: 'No keys: create one above. Your backends need one to call the API.', caption: `${answer.keys.length} key${answer.keys.length === 1 ? '' : 's'}` }));
    for (const [i, k] of answer.keys.entries()) {
      const tr = list.querySelectorAll('tbody tr')[i];
      if (tr) { tr.dataset.keyId = k.id; tr.dataset.scope = k.scope; }
    }
  }

  async function rotate(k) {
    const ok = await confirmDialog(
      `Rotate ${k.name} (${k.prefix}…)? A new secret is made and the current one is refused from the next request on; realtime tokens minted with it stop working.`,
      { confirmLabel: 'Rotate key' });
    if (!ok) return;
    const answer = await post('/api/keys/rotate', { projectId: p.id, keyId: k.id });
    await load();
    await showSecret(`API key "${answer.key.name}" rotated`, answer.key, answer.secret);
  }

  async function revoke(k) {
    const ok = await confirmDialog(
      `Revoke ${k.name} (${k.prefix}…)? Every request made with it is refused from now on. This cannot be undone.`,
      { confirmLabel: 'Revoke key' });
    if (!ok) return;
    await del('/api/keys', { projectId: p.id, keyId: k.id });
    toast(`${k.name} revoked.`, 'success');
    await load();
  }

  const name = h('input', { type: 'text', name: 'key-name', maxLength: 100, autocomplete: 'off', placeholder: 'readwrite key' });
  const scope = h('select', { name: 'key-scope', onchange: () => { name.placeholder = `${scope.value} key`; } },
    SCOPES.map(([v, label]) => h('option', { value: v, selected: v === 'readwrite' }, label)));
  const create = h('form', {
    class: 'inline-form', 'aria-label': 'Create an API key', 'data-create-key': '',
    onsubmit: act(async () => {
      const body = { projectId: p.id, scope: scope.value };
      if (name.value.trim()) body.name = name.value.trim();
      const answer = await post('/api/keys', body);
      name.value = '';
      await load();
      await showSecret(`API key "${answer.key.name}" created`, answer.key, answer.secret);
    }),
  },
  field('Name (optional)', name),
  field('Scope', scope),
  h('button', { type: 'submit', class: 'primary' }, 'Create key'));

  mount(el,
    header('API Keys', 'The keys your backends use to call this project (Authorization: Bearer). Secrets are shown once, when a key is created or rotated.'),
    section('New key', create),
    section('Keys', list));
  load();
  return () => { alive = false; };
}

export default {
  id: 'keys',
  title: 'API Keys',
  group: 'Project',
  render,
};
