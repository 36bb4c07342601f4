// Row Level Security: every table with its RLS state and its policies (GET /api/rls/policies);
// create a policy from the guide's patterns, switch one on or off, delete one; enable or disable
// RLS on a table and lift FORCE through POST /api/execute-sql (the ALTER TABLE the guide says the
// dashboard runs); try a table as an end user (scope "read" with an authUid). Viewers read only.

import { h, mount, field, header, section, errorBox, confirmDialog, formDialog, toast, act, dataTable, cell } from '../lib/dom.js';
import { get, post, patch, del, sql, ident, tableKey } from '../lib/api.js';

const COMMANDS = ['ALL', 'SELECT', 'INSERT', 'UPDATE', 'DELETE'];

/** The guide's "Common Policy Patterns": each a list of policies to create. */
const TEMPLATES = [
  { id: 'custom', label: 'Custom', about: 'Write your own expression.', policies: [{ name: '', command: 'ALL', using: '', check: '' }] },
  {
    id: 'owner', label: 'User owns rows', about: 'Classic pattern for posts, orders and profiles: each end user sees and changes only their rows.',
    policies: [{ name: 'User owns rows', command: 'ALL', using: 'user_id = auth.uid()', check: '' }],
  },
  {
    id: 'tenant', label: 'Multi-tenant (org_id)', about: 'All members of an organization share visibility: your backend names the org id as the end user (authUid).',
    policies: [{ name: 'Members of the org', command: 'ALL', using: 'org_id = auth.uid()', check: '' }],
  },
  {
    id: 'public-read', label: 'Public read + owner write (two policies)', about: 'Anyone may read; only the author inserts, updates and deletes. Two policies on the same table with different command scopes.',
    policies: [
      { name: 'Public read', command: 'SELECT', using: 'true', check: '' },
      { name: 'Owner writes', command: 'ALL', using: 'author_id = auth.uid()', check: '' },
    ],
  },
  {
    id: 'lockdown', label: 'Full lockdown', about: 'For internal audit tables that no API caller should read (the owner role still can).',
    policies: [{ name: 'Full lockdown', command: 'ALL', using: 'false', check: '' }],
  },
];

/** The guide's troubleshooting table. */
const TROUBLE = {
  zeroRows: { problem: 'Query returns 0 rows', cause: 'Policy never matches (or none is enabled)', fix: 'Temporarily set USING to true to confirm RLS is the cause.' },
  missingColumn: { problem: 'Policy toggle fails', cause: 'Column in expression missing', fix: 'Ensure user_id (or the referenced column) exists in the table.' },
  typeMismatch: { problem: 'User can\'t see own rows', cause: 'Type mismatch (INT vs TEXT)', fix: 'Cast explicitly: user_id::text = auth.uid()' },
  forced: { problem: 'Admin locked out', cause: 'FORCE ROW LEVEL SECURITY active', fix: 'Run ALTER TABLE … NO FORCE ROW LEVEL SECURITY.' },
};

/** Which troubleshooting row an API error matches: by the SQLSTATE the API puts in `details`
 * (42703 undefined column, 42883 undefined operator). */
function troubleFor(err) {
  const state = String((err && err.details) || '').replace(/^ERROR:\s*/, '');
  if (state === '42703') return TROUBLE.missingColumn;
  if (state === '42883') return TROUBLE.typeMismatch;
  return null;
}

function troubleBox(t, extra) {
  return h('div', { class: 'rls-trouble', role: 'note', 'data-trouble': t.problem },
    h('strong', {}, t.problem), h('span', { class: 'muted' }, ` — ${t.cause}. `), h('span', {}, t.fix), extra || null);
}

const qualified = (t) => `${ident(t.schema)}.${ident(t.table)}`;
const label = (t) => (t.schema === 'public' ? t.table : `${t.schema}.${t.table}`);
const tableKeyOf = (t) => tableKey(t.schema, t.table);
const withSchema = (t, body) => (t.schema && t.schema !== 'public' ? { ...body, schema: t.schema } : body);


export default {
  id: 'rls',
  title: 'Row Level Security',
  group: 'Database',
  render(ctx, el) {
    const projectId = ctx.project.id;
    const can = ctx.can.write;
    let tables = [];
    let alive = true;

    async function load() {
      try {
        const answer = await get('/api/rls/policies', { projectId });
        if (!alive) return;
        tables = answer.tables;
        draw();
      } catch (err) {
        if (!alive) return;
        mount(el, top(), errorBox(err), h('button', { type: 'button', onclick: () => { mount(el, top(), loading()); load(); } }, 'Retry'));
      }
    }

    const loading = () => h('p', { class: 'loading', 'aria-busy': 'true' }, 'Loading tables and policies…');
    const top = () => header('Row Level Security',
      'Policies PostgreSQL applies to every read and readwrite request: rows a policy does not admit are silently left out. The owner role (admin keys, developers, this dashboard) bypasses them unless FORCE is on.',
      can ? h('button', { type: 'button', class: 'primary', 'data-new-policy': '', disabled: !tables.length, onclick: () => createPolicy() }, 'New policy') : null);

    function draw() {
      mount(el, top(),
        can ? null : h('p', { class: 'rls-readonly muted', 'data-readonly': '' }, 'You are a viewer: policies are shown read-only.'),
        tables.length
          ? tables.map(tablePanel)
          : section('No tables', h('p', { class: 'empty' }, 'This project has no tables yet. Create one in the SQL Editor or the Table Editor, then add policies here.')),
        can && tables.length ? testPanel() : null,
        section('Troubleshooting', dataTable([
          { key: 'problem', label: 'Problem' }, { key: 'cause', label: 'Cause' }, { key: 'fix', label: 'Fix', render: (r) => h('code', {}, r.fix) },
        ], Object.values(TROUBLE))));
    }

    function tablePanel(t) {
      const enabledPolicies = t.policies.filter((p) => p.enabled);
      const state = h('span', { class: `rls-badge ${t.rlsEnabled ? 'on' : 'off'}`, 'data-rls-state': t.rlsEnabled ? 'enabled' : 'disabled' },
        t.rlsEnabled ? 'RLS enabled' : 'RLS disabled');
      const forced = t.rlsForced ? h('span', { class: 'rls-badge forced', 'data-rls-forced': '' }, 'FORCED') : null;
      const tools = can ? h('div', { class: 'tools' },
        h('button', { type: 'button', 'data-add-policy': '', onclick: () => createPolicy(t) }, 'Add policy'),
        t.rlsEnabled
          ? h('button', { type: 'button', class: 'danger', 'data-rls-toggle': 'disable', onclick: act(() => setRls(t, false)) }, 'Disable RLS')
          : h('button', { type: 'button', 'data-rls-toggle': 'enable', onclick: act(() => setRls(t, true)) }, 'Enable RLS')) : null;
      const notes = [];
      if (t.rlsForced) {
        notes.push(h('div', { class: 'rls-note warn', role: 'note' },
          'FORCE ROW LEVEL SECURITY is on: the owner role (admin keys, developers, this dashboard) is subject to the policies too.',
          troubleBox(TROUBLE.forced, can ? h('button', { type: 'button', class: 'small', 'data-no-force': '', onclick: act(() => noForce(t)) }, 'Run NO FORCE') : null)));
      }
      if (t.rlsEnabled && !enabledPolicies.length) {
        notes.push(h('div', { class: 'rls-note', role: 'note', 'data-no-policy': '' },
          t.policies.length ? 'RLS is on and every policy is switched off: ' : 'RLS is on and there is no policy: ',
          'read and readwrite requests see no rows of this table.', troubleBox(TROUBLE.zeroRows)));
      } else if (!t.rlsEnabled) {
        notes.push(h('p', { class: 'rls-note muted' }, t.policies.length
          ? 'RLS is disabled: the policies below are not applied; every API key sees every row.'
          : 'RLS is disabled: every API key sees every row. Creating a policy enables it.'));
      }
      return h('section', { class: 'panel rls-table', 'data-table': label(t), 'aria-label': `Table ${label(t)}` },
        h('div', { class: 'rls-table-head' },
          h('h2', {}, h('code', {}, label(t)), ' ', state, ' ', forced),
          tools),
        notes,
        t.policies.length ? policyTable(t) : h('p', { class: 'empty' }, can ? 'No policies yet: add one with a template.' : 'No policies.'));
    }

    function policyTable(t) {
      return h('div', { class: 'table-wrap' }, h('table', { class: 'grid rls-policies' },
        h('caption', { class: 'offscreen' }, `Policies of ${label(t)}`),
        h('thead', {}, h('tr', {}, ['Name', 'Command', 'USING', 'WITH CHECK', 'Enabled', can ? 'Actions' : null]
          .filter(Boolean).map((c) => h('th', { scope: 'col' }, c)))),
        h('tbody', {}, t.policies.map((p) => h('tr', { 'data-policy': p.name },
          h('th', { scope: 'row' }, p.name),
          h('td', {}, h('span', { class: 'rls-cmd' }, p.command)),
          h('td', {}, p.using === null ? cell(null) : h('code', { class: 'rls-expr' }, p.using)),
          h('td', {}, p.check === null ? cell(null) : h('code', { class: 'rls-expr' }, p.check)),
          h('td', {}, can
            ? h('label', { class: 'switch' }, h('input', {
              type: 'checkbox', role: 'switch', checked: p.enabled, 'data-policy-enabled': p.name,
              'aria-label': `Policy ${p.name} on ${label(t)} enabled`,
              onchange: act(async (e) => {
                const box = e.currentTarget;
                try {
                  await patch('/api/rls/policies', withSchema(t, { projectId, table: t.table, name: p.name, enabled: box.checked }));
                  toast(`Policy "${p.name}" ${box.checked ? 'enabled' : 'disabled'}.`, 'success');
                } catch (err) {
                  box.checked = !box.checked;
                  throw err;
                }
                await load();
              }),
            }), h('span', { class: p.enabled ? 'ok' : 'muted' }, p.enabled ? 'On' : 'Off'))
            : h('span', { class: p.enabled ? 'ok' : 'muted', 'data-policy-state': p.enabled ? 'on' : 'off' }, p.enabled ? 'On' : 'Off')),
          can ? h('td', {}, h('button', {
            type: 'button', class: 'small danger', 'data-delete-policy': p.name, 'aria-label': `Delete policy ${p.name}`,
            onclick: act(async () => {
              if (!await confirmDialog(`Delete the policy "${p.name}" on ${label(t)}? ${t.policies.length === 1 && t.rlsEnabled ? 'It is the table\'s last policy: RLS stays enabled, so read and readwrite requests will see no rows.' : ''}`, { confirmLabel: 'Delete policy' })) return;
              await del('/api/rls/policies', withSchema(t, { projectId, table: t.table, name: p.name }));
              toast(`Policy "${p.name}" deleted.`, 'success');
              await load();
            }),
          }, 'Delete')) : null)))));
    }

    async function setRls(t, on) {
      if (on && !t.policies.some((p) => p.enabled)
        && !await confirmDialog(`Enable row level security on ${label(t)}? It has no enabled policy: read and readwrite requests will see no rows of it until you add one.`, { confirmLabel: 'Enable RLS', danger: false })) return;
      if (!on && !await confirmDialog(`Disable row level security on ${label(t)}? Its policies stop applying: every API key, read keys included, sees and changes every row.`, { confirmLabel: 'Disable RLS' })) return;
      await sql(projectId, `ALTER TABLE ${qualified(t)} ${on ? 'ENABLE' : 'DISABLE'} ROW LEVEL SECURITY`);
      toast(`RLS ${on ? 'enabled' : 'disabled'} on ${label(t)}.`, 'success');
      await load();
    }

    async function noForce(t) {
      if (!await confirmDialog(`Run ALTER TABLE ${qualified(t)} NO FORCE ROW LEVEL SECURITY? The owner role (admin keys, developers) bypasses the policies again; read and readwrite keys stay subject to them.`, { confirmLabel: 'Run NO FORCE', danger: false })) return;
      await sql(projectId, `ALTER TABLE ${qualified(t)} NO FORCE ROW LEVEL SECURITY`);
      toast(`FORCE lifted on ${label(t)}.`, 'success');
      await load();
    }

    /** One policy's fields; `p` its starting values. */
    function policyFields(p, n, count) {
      const name = h('input', { type: 'text', name: `name${n}`, required: true, maxLength: 63, value: p.name, 'data-field': 'name' });
      const command = h('select', { name: `command${n}`, 'data-field': 'command' }, COMMANDS.map((c) => h('option', { value: c, selected: c === p.command }, c)));
      const using = h('textarea', { name: `using${n}`, class: 'code rls-input', rows: 2, value: p.using, 'data-field': 'using', spellcheck: false });
      const check = h('textarea', { name: `check${n}`, class: 'code rls-input', rows: 2, value: p.check, 'data-field': 'check', spellcheck: false });
      const usingField = field('USING expression', using, 'Rows the policy admits for reading, updating and deleting, e.g. user_id = auth.uid().');
      const checkField = field('WITH CHECK expression (optional)', check, 'Rows a write may produce; empty: the USING expression.');
      function shape() {
        const c = command.value;
        usingField.hidden = c === 'INSERT';
        using.required = c !== 'INSERT';
        checkField.hidden = c === 'SELECT' || c === 'DELETE';
        check.required = c === 'INSERT';
        checkField.querySelector('label').textContent = c === 'INSERT' ? 'WITH CHECK expression' : 'WITH CHECK expression (optional)';
        if (c === 'INSERT' && !check.value && using.value) check.value = using.value;
      }
      command.addEventListener('change', shape);
      shape();
      const box = h('fieldset', { class: 'rls-policy-fields', 'data-policy-form': String(n) },
        h('legend', {}, count > 1 ? `Policy ${n + 1}` : 'Policy'),
        h('div', { class: 'row rls-name-row' }, field('Name', name), field('Command scope', command)),
        usingField, checkField);
      return {
        box,
        value: () => {
          const c = command.value;
          const body = { name: name.value.trim(), command: c };
          if (c === 'INSERT') body.check = check.value.trim();
          else {
            body.using = using.value.trim();
            if (c !== 'SELECT' && c !== 'DELETE' && check.value.trim()) body.check = check.value.trim();
          }
          return body;
        },
      };
    }

    async function createPolicy(preset) {
      const tableSelect = h('select', { name: 'table', required: true, 'data-field': 'table' },
        tables.map((t) => h('option', { value: tableKeyOf(t), selected: preset && t.schema === preset.schema && t.table === preset.table }, label(t))));
      const templateSelect = h('select', { name: 'template', 'data-field': 'template' }, TEMPLATES.map((tp) => h('option', { value: tp.id }, tp.label)));
      const about = h('p', { class: 'hint rls-about' });
      const slots = h('div', { class: 'rls-slots' });
      let forms = [];
      let created = 0;
      function applyTemplate() {
        const tp = TEMPLATES.find((x) => x.id === templateSelect.value);
        about.textContent = tp.about;
        forms = tp.policies.slice(created).map((p, i, all) => policyFields(p, i, all.length));
        mount(slots, forms.map((f) => f.box));
      }
      templateSelect.addEventListener('change', () => { created = 0; applyTemplate(); });
      applyTemplate();
      if (!tables.length) {
        toast('This project has no tables yet: create one first.', 'error');
        return;
      }
      const done = await formDialog({ className: 'rls-dialog',
        title: 'New policy',
        submitLabel: 'Create policy',
        body: h('div', {},
          h('div', { class: 'row rls-name-row' }, field('Table', tableSelect), field('Template', templateSelect)), about,
          h('p', { class: 'hint' }, 'Creating a policy runs ALTER TABLE … ENABLE ROW LEVEL SECURITY and CREATE POLICY. auth.uid() is the end user a request acts for.'),
          slots),
        explain: (err) => {
          const t = troubleFor(err);
          return t ? troubleBox(t) : null;
        },
        onSubmit: async () => {
          const t = tables.find((x) => tableKeyOf(x) === tableSelect.value);
          // Policies are created one by one; after a partial failure only the rest is left to send.
          while (forms.length) {
            const body = withSchema(t, { projectId, table: t.table, ...forms[0].value() });
            try {
              await post('/api/rls/policies', body);
            } catch (err) {
              if (created) err.message = `${err.message} (the first ${created} polic${created === 1 ? 'y was' : 'ies were'} created)`;
              throw err;
            }
            created += 1;
            forms.shift().box.remove();
            toast(`Policy "${body.name}" created on ${label(t)}.`, 'success');
          }
        },
      });
      if (done || created) await load();
    }

    function testPanel() {
      const tableSelect = h('select', { name: 'table', 'data-test-table': '' }, tables.map((t) => h('option', { value: tableKeyOf(t) }, label(t))));
      const uid = h('input', { type: 'text', name: 'authUid', required: true, maxLength: 256, placeholder: 'alice', 'data-test-uid': '' });
      const out = h('div', { class: 'rls-test-out', 'aria-live': 'polite' });
      const form = h('form', {
        class: 'inline-form', 'aria-label': 'Test as an end user',
        onsubmit: act(async () => {
          const t = tables.find((x) => tableKeyOf(x) === tableSelect.value);
          mount(out, h('p', { class: 'loading' }, 'Running…'));
          try {
            const a = await sql(projectId, `SELECT * FROM ${qualified(t)} LIMIT 100`, [], { scope: 'read', authUid: uid.value.trim() });
            const r = a.result;
            mount(out, h('p', { 'data-test-count': String(r.rowCount) }, `As end user "${uid.value.trim()}" (read scope): ${r.rowCount} row${r.rowCount === 1 ? '' : 's'} of ${label(t)}.`),
              r.rowCount ? dataTable(r.columns.map((c, i) => ({ key: c, label: c, type: r.columnTypes ? r.columnTypes[i] : undefined })), r.rows.map((row) => Array.isArray(row) ? Object.fromEntries(r.columns.map((c, i) => [c, row[i]])) : row))
                : troubleBox(TROUBLE.zeroRows));
          } catch (err) {
            mount(out, errorBox(err));
          }
        }),
      }, field('Table', tableSelect), field('End user id (authUid)', uid), h('button', { type: 'submit' }, 'Run SELECT'));
      return section('Test as an end user',
        h('p', { class: 'muted' }, 'Runs SELECT * FROM the table with the read scope as the end user you name, as the guide\'s step 04: you see only the rows the policies admit for them.'),
        form, out);
    }

    mount(el, top(), loading());
    load();
    return () => { alive = false; };
  },
};
