// Project settings: the values an app needs to connect (project id, base URL, WebSocket URL, the
// guide's .env.local block), and for admins the project's name, its public-realtime switch and
// its deletion. Developers and viewers see the values read-only.

import { h, mount, field, header, section, copyButton, confirmDialog, toast, when, act } from '../lib/dom.js';
import { patch, del } from '../lib/api.js';

/** The placeholder in the .env block: the dashboard never shows a real key outside its
 * shown-once box. */
export const KEY_PLACEHOLDER = '<your API key from Settings → API Keys>';

/** The guide's `.env.local` (its "Environment Setup"), filled in for this project. The REST base
 * URL has no variable in the guide (its fluxbase.js hard-codes BASE_URL): it goes in a comment. */
export function envBlock(ctx) {
  return [
    `# Fluxbase REST base URL (BASE_URL in the guide's fluxbase.js): ${ctx.baseUrl}`,
    `FLUXBASE_API_KEY=${KEY_PLACEHOLDER}`,
    `FLUXBASE_PROJECT_ID=${ctx.project.id}`,
    `NEXT_PUBLIC_WS_URL=${ctx.wsUrl}`,
  ].join('\n') + '\n';
}

/** A value with a copy button: label, the value in monospace, "Copy <label>". */
function valueRow(label, value, key) {
  const copy = copyButton(value);
  copy.setAttribute('aria-label', `Copy ${label}`);
  return h('div', { class: 'setting-row', 'data-setting': key },
    h('dt', {}, label),
    h('dd', {}, h('code', { class: 'setting-value', 'data-value': '' }, value), copy));
}

function render(ctx, el) {
  const p = ctx.project;
  // A suspended project refuses every request that names it (403 PROJECT_SUSPENDED): nothing to
  // change until the operator resumes it.
  const suspended = p.status === 'suspended';
  const admin = ctx.can.manage && !suspended;
  const env = envBlock(ctx);
  const envCopy = copyButton(env, 'Copy .env.local');
  envCopy.setAttribute('data-copy', 'env');

  const connection = section('Connect your app',
    h('p', { class: 'muted' }, 'Every integration needs these values (see the integration guide\'s "Getting Started").'),
    h('dl', { class: 'settings-values' },
      valueRow('Project ID', p.id, 'project-id'),
      valueRow('Base URL', ctx.baseUrl, 'base-url'),
      valueRow('WebSocket URL', ctx.wsUrl, 'ws-url')),
    h('div', { class: 'env-head' }, h('h3', { id: 'env-title' }, '.env.local'), envCopy),
    h('pre', { class: 'env-block', 'data-env': '', role: 'region', 'aria-labelledby': 'env-title', tabindex: '0' }, h('code', {}, env)),
    h('p', { class: 'hint' },
      'Create or rotate the key itself under ',
      h('a', { href: `/projects/${p.id}/keys` }, 'API Keys'),
      ': its secret is shown once. Keep it in server-only environment variables; never ship it to a browser.'));

  const about = section('Project',
    h('dl', { class: 'settings-values' },
      h('div', { class: 'setting-row' }, h('dt', {}, 'Name'), h('dd', { 'data-project-name': '' }, p.name)),
      h('div', { class: 'setting-row' }, h('dt', {}, 'Status'), h('dd', {}, h('span', { class: `status ${p.status}` }, p.status))),
      h('div', { class: 'setting-row' }, h('dt', {}, 'Created'), h('dd', {}, when(p.createdAt))),
      h('div', { class: 'setting-row' }, h('dt', {}, 'Your role'), h('dd', { 'data-role': ctx.role }, ctx.role)),
      admin ? null : h('div', { class: 'setting-row' }, h('dt', {}, 'Public realtime'),
        h('dd', { 'data-realtime-public': String(!!p.realtimePublic) }, p.realtimePublic ? 'on' : 'off'))),
    admin ? null : h('p', { class: 'muted', 'data-readonly-note': '' }, suspended
      ? 'The project is suspended: its settings cannot change until the operator resumes it.'
      : 'Only project admins can rename the project, change its realtime access or delete it.'));

  mount(el,
    header('Settings', `Project ${p.name}: how to connect to it${admin ? ', and its settings' : ''}.`),
    connection,
    about,
    admin ? renameSection(ctx) : null,
    admin ? realtimeSection(ctx) : null,
    admin ? dangerSection(ctx) : null);
}

function renameSection(ctx) {
  const p = ctx.project;
  const name = h('input', { type: 'text', name: 'project-name', required: true, maxLength: 100, value: p.name, autocomplete: 'off' });
  return section('Rename',
    h('form', {
      class: 'inline-form', 'aria-label': 'Rename the project', 'data-rename': '',
      onsubmit: act(async () => {
        const next = name.value.trim();
        if (!next || next === p.name) return;
        const answer = await patch('/api/projects', { projectId: p.id, name: next });
        await ctx.refreshProjects();
        toast(`Renamed to ${answer.project.name}.`, 'success');
        ctx.rerender();
      }),
    }, field('Project name', name), h('button', { type: 'submit', class: 'primary' }, 'Rename')));
}

function realtimeSection(ctx) {
  const p = ctx.project;
  let current = !!p.realtimePublic;
  const state = h('span', { class: 'switch-state', 'aria-hidden': 'true' }, current ? 'On' : 'Off');
  const box = h('input', {
    type: 'checkbox', role: 'switch', checked: current, name: 'realtime-public', 'data-realtime-public': '',
    'aria-describedby': 'realtime-public-help',
    onchange: async () => {
      const wanted = box.checked;
      box.disabled = true;
      try {
        const answer = await patch('/api/projects', { projectId: p.id, realtimePublic: wanted });
        current = !!answer.project.realtimePublic;
        await ctx.refreshProjects();
        toast(`Public realtime is ${current ? 'on' : 'off'}.`, 'success');
      } catch (err) {
        toast(`${err.code ? err.code + ': ' : ''}${err.message || err}`, 'error');
      } finally {
        box.checked = current;
        state.textContent = current ? 'On' : 'Off';
        box.disabled = false;
      }
    },
  });
  return section('Realtime access',
    h('label', { class: 'switch' }, box, 'Public realtime (subscribe without a token)', state),
    h('p', { id: 'realtime-public-help', class: 'hint' },
      'On: any WebSocket client that knows the project id may subscribe to its room without a token and receive its row changes ',
      'that the read role may SELECT (row-level security applies, with no user id), as the guide\'s own realtime.js client does. ',
      'Off (the default): a subscribe needs a realtime token or an API key, else it is answered AUTH_REQUIRED; ',
      'turning it off ends the subscriptions made without a token (ACCESS_REVOKED).'));
}

function dangerSection(ctx) {
  const p = ctx.project;
  return h('section', { class: 'panel danger-zone' },
    h('h2', {}, 'Delete the project'),
    h('p', {}, 'Removes its database, roles, API keys, replication slot and stored files. This cannot be undone.'),
    h('button', {
      type: 'button', class: 'danger', 'data-delete-project': '',
      onclick: act(async () => {
        const ok = await confirmDialog(
          `Delete project ${p.name} (${p.id}) with its database, keys and files? This cannot be undone.`,
          { confirmLabel: 'Delete project', typeToConfirm: p.name });
        if (!ok) return;
        await del('/api/projects', { projectId: p.id });
        await ctx.refreshProjects();
        toast(`Project ${p.name} deleted.`, 'success');
        ctx.navigate('/projects');
      }),
    }, 'Delete project…'));
}

export default {
  id: 'settings',
  title: 'Settings',
  group: 'Project',
  render,
};
