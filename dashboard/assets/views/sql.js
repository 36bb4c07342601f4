// SQL Editor: runs SQL in the project's database through POST /api/execute-sql with the member's
// session. Developers and admins run as the project's owner role, or as an end user (scope read
// or readwrite plus an authUid, so row-level security policies can be tried as that user: the
// guide's RLS step 04); viewers run read-only as the read role. The answer is shown with each
// column's PostgreSQL type, the row count, time, operation and message; an error with its code,
// message, SQLSTATE and, where the guide has one, the troubleshooting hint. The project's recent
// queries (SQL text only) are kept in sessionStorage (this tab, until it closes or the user
// signs out: SQL text may hold secrets), per user and project, last 50.

import { h, mount, field, header, errorBox, cell, confirmDialog } from '../lib/dom.js';
import { post } from '../lib/api.js';

const HISTORY_MAX = 50;
/** Rows put in the page at once: a 10,000-row answer stays responsive. */
const SHOW_STEP = 500;

const historyKey = (ctx) => `fluxbase.sql.history.${ctx.user ? ctx.user.id : 'anon'}.${ctx.project.id}`;

function loadHistory(ctx) {
  try {
    const v = JSON.parse(sessionStorage.getItem(historyKey(ctx)) || '[]');
    return Array.isArray(v) ? v.filter((s) => typeof s === 'string') : [];
  } catch (_) {
    return [];
  }
}

function saveHistory(ctx, list) {
  try {
    sessionStorage.setItem(historyKey(ctx), JSON.stringify(list.slice(0, HISTORY_MAX)));
  } catch (_) { /* storage full or disabled: history is a convenience */ }
}

/** The SQLSTATE of an execute-sql error ("ERROR:  42P01" in `details`). */
export function sqlState(err) {
  const d = (err && typeof err.details === 'string' && err.details) || '';
  const m = /^[A-Z]+:\s+([0-9A-Z]{5})\b/.exec(d) || /\b(?=[0-9A-Z]*[0-9])([0-9A-Z]{5})\b/.exec(d);
  return m ? m[1] : null;
}

/** Line and column (1-based) of a 1-based character offset in `text`. */
function lineCol(text, position) {
  const before = text.slice(0, Math.max(0, position - 1));
  const lines = before.split('\n');
  return { line: lines.length, column: lines[lines.length - 1].length + 1 };
}

/** The guide's troubleshooting advice for an error, or null. `runAs`: {kind: 'owner'|'user'|'viewer', scope, authUid}. */
function errorHint(err, runAs) {
  const state = sqlState(err);
  const msg = (err && err.message) || '';
  if (err && err.code === 'SCOPE_MISMATCH' && runAs.kind === 'user') {
    return 'The server refused to run this as an end user: the scope may not be stronger than your role, and a session may name an authUid only as a developer or admin.';
  }
  if (err && err.code === 'RATE_LIMIT') return 'Too many requests at once: wait a moment and run again.';
  switch (state) {
    case '42883':
      if (/operator does not exist: .*(= text|text =)/.test(msg)) {
        return 'auth.uid() is text: compare like types. Cast explicitly: user_id::text = auth.uid()';
      }
      return 'No function or operator takes these argument types: add explicit casts (value::type).';
    case '42501':
      if (/row-level security/i.test(msg)) {
        return `A row-level security policy refused this row: it must pass the policy's WITH CHECK for auth.uid() = ${runAs.kind === 'user' ? `"${runAs.authUid}"` : 'your user id'}.`;
      }
      if (runAs.kind === 'viewer') return 'Permission denied: as a viewer your SQL runs read-only (the project\'s read role: SELECT only). An admin can make you a developer.';
      if (runAs.kind === 'user') {
        return runAs.scope === 'read'
          ? 'Permission denied: the read scope may only SELECT. Choose readwrite for INSERT and UPDATE, or run as yourself for schema changes.'
          : 'Permission denied: the readwrite scope may SELECT, INSERT and UPDATE. Run as yourself (the owner role) for DELETE and schema changes.';
      }
      return 'Permission denied: the owner role is not a superuser; the server\'s own schemas (auth, realtime) are not yours to change.';
    case '42P01':
      return 'No such table or view. Check the name and its schema (public is searched); unquoted names are folded to lower case.';
    case '42703':
      return 'No such column. Unquoted names are folded to lower case; "Double quotes" keep the case.';
    case '42601':
      return 'Syntax error: look near the marked position.';
    case '57014':
      return 'Cancelled: a statement may run 30 s at most (statement_timeout_ms). Narrow it with WHERE or LIMIT, or add an index.';
    case '53400':
      return 'The statement needed more temporary files than allowed (256 MiB): narrow it, or add an index for its sort.';
    case '23505':
      return 'A row with this key exists already (unique constraint).';
    case '23503':
      return 'A foreign key refused this: the referenced row is missing, or other rows still point to this one.';
    case '23502':
      return 'A NOT NULL column got no value: give one, or a DEFAULT.';
    case '22P02':
      return 'A value is not valid input for its type (e.g. text where a number or uuid is expected).';
    default:
      return null;
  }
}

function rlsHint(runAs) {
  if (runAs.kind === 'owner') {
    return 'No rows. You ran as the owner role, which bypasses row-level security unless the table has FORCE ROW LEVEL SECURITY; if so, ALTER TABLE … NO FORCE ROW LEVEL SECURITY restores access.';
  }
  const who = runAs.kind === 'user' ? `end user "${runAs.authUid}"` : 'your user id';
  return `No rows. Row-level security may filter them: rows no policy admits for auth.uid() = ${who} are silently left out. To confirm, temporarily set the policy's USING to true.`;
}

export default {
  id: 'sql',
  title: 'SQL Editor',
  group: 'Database',
  render(ctx, el) {
    const canActAs = ctx.can.write; // developers and admins may run as an end user
    let history = loadHistory(ctx);
    let running = null; // AbortController of the request in flight
    let escaped = false; // after Esc, Tab leaves the editor

    const editor = h('textarea', {
      class: 'code sql-input', 'data-sql-editor': '', spellcheck: false, autocomplete: 'off',
      placeholder: 'SELECT * FROM todos LIMIT 10;', 'aria-describedby': 'sql-keys',
      onkeydown: (e) => {
        if (e.key === 'Enter' && (e.ctrlKey || e.metaKey)) {
          e.preventDefault();
          run();
          return;
        }
        if (e.key === 'Escape') { escaped = true; return; }
        if (e.key === 'Tab' && !e.shiftKey && !e.ctrlKey && !e.altKey && !e.metaKey && !escaped) {
          e.preventDefault();
          insertText(editor, '  ');
          return;
        }
        escaped = false;
      },
      onblur: () => { escaped = false; },
    });
    editor.rows = 10;

    // ---- run as ----
    const mode = h('select', { 'data-run-as': '', onchange: () => syncMode() },
      h('option', { value: 'owner' }, 'Yourself (owner role)'),
      h('option', { value: 'user' }, 'An end user (row-level security applies)'));
    const scope = h('select', { 'data-scope': '' },
      h('option', { value: 'read' }, 'read (SELECT)'),
      h('option', { value: 'readwrite' }, 'readwrite (SELECT, INSERT, UPDATE)'));
    const authUid = h('input', { type: 'text', 'data-auth-uid': '', maxLength: 256, placeholder: 'alice', autocomplete: 'off' });
    const userFields = h('div', { class: 'sql-user-fields', 'data-user-fields': '' },
      field('Scope', scope),
      field('End user id — auth.uid()', authUid));
    const roleNote = h('p', { class: 'muted sql-role-note', 'data-role-note': '' });
    function syncMode() {
      const asUser = canActAs && mode.value === 'user';
      userFields.hidden = !asUser;
      authUid.required = asUser;
      roleNote.textContent = !canActAs
        ? 'You are a viewer: your SQL runs read-only, as the project\'s read role (SELECT only), and row-level security policies apply with auth.uid() = your user id.'
        : asUser
          ? 'Runs with the chosen scope\'s role and auth.uid() set to this end user: row-level security policies apply as they will for your app\'s users.'
          : 'Runs as the project\'s owner role: DDL and DML, and row-level security is bypassed (unless FORCE ROW LEVEL SECURITY).';
    }
    function runAs() {
      if (!canActAs) return { kind: 'viewer' };
      if (mode.value === 'user') return { kind: 'user', scope: scope.value, authUid: authUid.value.trim() };
      return { kind: 'owner' };
    }

    const runButton = h('button', { type: 'button', class: 'primary', 'data-run': '', onclick: () => run() }, 'Run');
    const status = h('span', { class: 'muted sql-status', 'data-status': '', role: 'status' });
    // The status line (a live region) announces each outcome in a sentence; the grid is not read out.
    const output = h('div', { class: 'sql-output', 'data-result': '' },
      h('p', { class: 'empty' }, 'Write a query and press Run (Ctrl+Enter). The answer shows here.'));

    // ---- history ----
    const historyList = h('ol', { class: 'sql-history', 'data-history': '' });
    const clearHistory = h('button', {
      type: 'button', class: 'small ghost', 'data-clear-history': '', 'aria-label': 'Clear the history',
      onclick: async () => {
        if (!await confirmDialog('Forget the queries kept for this project in this tab?', { confirmLabel: 'Clear history' })) return;
        history = [];
        saveHistory(ctx, history);
        renderHistory();
      },
    }, 'Clear');
    function renderHistory() {
      clearHistory.hidden = !history.length;
      if (!history.length) {
        mount(historyList, h('li', { class: 'empty' }, 'Queries you run in this project show here (this tab only, until you sign out).'));
        return;
      }
      mount(historyList, history.map((q, i) => h('li', {},
        h('button', {
          type: 'button', class: 'sql-history-item', 'data-history-item': String(i), title: q,
          'aria-label': `Load query: ${q.slice(0, 80)}`,
          onclick: () => {
            editor.value = q;
            editor.focus();
            editor.setSelectionRange(q.length, q.length);
          },
        }, h('code', {}, q.replace(/\s+/g, ' ').trim())))));
    }
    function remember(q) {
      history = [q, ...history.filter((x) => x !== q)].slice(0, HISTORY_MAX);
      saveHistory(ctx, history);
      renderHistory();
    }

    async function run() {
      const query = editor.value;
      if (!query.trim()) {
        editor.focus();
        status.textContent = 'Nothing to run: write a query first.';
        return;
      }
      const as = runAs();
      if (as.kind === 'user' && !as.authUid) {
        status.textContent = 'Name the end user (auth.uid()) to run as.';
        authUid.focus();
        return;
      }
      if (running) running.abort();
      const ctl = new AbortController();
      running = ctl;
      remember(query);
      runButton.disabled = true;
      output.setAttribute('aria-busy', 'true');
      status.textContent = 'Running…';
      const body = { projectId: ctx.project.id, query };
      if (as.kind === 'user') Object.assign(body, { scope: as.scope, authUid: as.authUid });
      try {
        // lib/api.js's sql() takes no AbortSignal: the same request through post().
        const answer = await post('/api/execute-sql', body, { signal: ctl.signal });
        if (running !== ctl) return;
        const r = answer.result || {};
        const info = answer.executionInfo || {};
        status.textContent = `${info.operation || 'Done'}: ${r.rowCount ?? info.rowCount ?? 0} rows in ${info.time || '?'}${r.truncated ? ' (truncated)' : ''}.`;
        mount(output, resultView(answer, as));
      } catch (err) {
        if (err.name === 'AbortError' || running !== ctl) return;
        status.textContent = `Failed: ${err.code || 'ERROR'}${sqlState(err) ? ` ${sqlState(err)}` : ''}.`;
        mount(output, errorView(err, query, as));
      } finally {
        if (running === ctl) {
          running = null;
          runButton.disabled = false;
          output.removeAttribute('aria-busy');
        }
      }
    }

    function errorView(err, query, as) {
      const state = sqlState(err);
      const hint = errorHint(err, as);
      const position = err.body && err.body.error && Number(err.body.error.position);
      let where = null;
      if (position > 0 && position <= query.length + 1) {
        const { line, column } = lineCol(query, position);
        where = h('p', { class: 'sql-position', 'data-position': String(position) },
          `At line ${line}, column ${column}. `,
          h('button', {
            type: 'button', class: 'small', onclick: () => {
              editor.focus();
              editor.setSelectionRange(position - 1, Math.min(query.length, position));
            },
          }, 'Show in editor'));
      }
      const pgHint = err.body && err.body.error && typeof err.body.error.hint === 'string' ? err.body.error.hint : null;
      const box = errorBox(err);
      if (state) box.setAttribute('data-sqlstate', state);
      return h('div', { class: 'sql-error', 'data-error': err.code || 'ERROR' },
        box,
        state ? h('p', { class: 'sql-sqlstate' }, 'SQLSTATE ', h('code', { 'data-sqlstate': state }, state)) : null,
        where,
        pgHint ? h('p', { class: 'sql-pg-hint', 'data-pg-hint': '' }, 'PostgreSQL\'s hint: ', pgHint) : null,
        hint ? h('p', { class: 'sql-hint', 'data-hint': state || err.code || '' }, h('strong', {}, 'Hint: '), hint) : null);
    }

    mount(el,
      header('SQL Editor', 'Runs SQL in this project\'s PostgreSQL database (POST /api/execute-sql). A script of several statements runs in one transaction and answers with its last statement.'),
      h('div', { class: 'sql-layout' },
        h('div', { class: 'sql-main' },
          h('section', { class: 'panel', 'aria-label': 'Query' },
            field('SQL', editor),
            h('p', { class: 'hint sql-keys', id: 'sql-keys' },
              'Ctrl+Enter (⌘+Enter) runs. Tab indents; Esc then Tab, or Shift+Tab, leaves the editor.'),
            canActAs ? h('div', { class: 'sql-run-as' }, field('Run as', mode), userFields) : null,
            roleNote,
            h('div', { class: 'row' }, runButton, status)),
          h('section', { class: 'panel', 'aria-label': 'Result' }, h('h2', {}, 'Result'), output)),
        h('aside', { class: 'panel sql-aside', 'aria-label': 'History' },
          h('div', { class: 'row sql-aside-head' }, h('h2', { class: 'grow' }, 'History'), clearHistory),
          historyList)));
    syncMode();
    renderHistory();
    editor.focus();
    return () => { if (running) running.abort(); running = null; };
  },
};

/** Inserts text at the caret (undoable where the browser supports it). */
function insertText(textarea, text) {
  // execCommand keeps the editor's undo history; setRangeText is the standard fallback.
  let ok = false;
  try { ok = document.execCommand('insertText', false, text); } catch (_) { ok = false; }
  if (!ok) textarea.setRangeText(text, textarea.selectionStart, textarea.selectionEnd, 'end');
}

/** An answer: meta line, truncation notice, grid with names and types, RLS hint when empty. */
function resultView(answer, as) {
  const r = answer.result || {};
  const info = answer.executionInfo || {};
  const columns = r.columns || [];
  const types = Array.isArray(r.columnTypes) ? r.columnTypes : [];
  const rows = r.rows || [];
  const operation = info.operation || '';
  const count = r.rowCount ?? info.rowCount ?? rows.length;
  const meta = h('p', { class: 'sql-meta', 'data-result-meta': '' },
    h('span', { 'data-operation': operation }, operation || 'OK'),
    ' · ',
    h('span', { 'data-row-count': String(count) }, `${count} ${count === 1 ? 'row' : 'rows'}`),
    ' · ',
    h('span', { 'data-time': info.time || '' }, info.time || '—'),
    r.message ? [' · ', h('code', { 'data-message': '' }, r.message)] : null);
  const parts = [meta];
  if (r.truncated) {
    parts.push(h('p', { class: 'sql-truncated warn', role: 'note', 'data-truncated': '' },
      `Truncated: the statement produced ${count} rows; the server sent the first ${rows.length} (its cap is 10,000 rows or 32 MiB). Add a LIMIT or a WHERE to see the rest.`));
  }
  const dup = columns.filter((c, i) => columns.indexOf(c) !== i);
  if (dup.length) {
    parts.push(h('p', { class: 'warn', role: 'note' },
      `Several columns are named ${[...new Set(dup)].join(', ')}: each row holds one value per name, so only the last shows. Give them distinct aliases (AS).`));
  }
  if (columns.length) {
    if (!rows.length) {
      parts.push(h('p', { class: 'empty', 'data-no-rows': '' }, 'The query returned no rows.'));
      if (operation === 'SELECT') parts.push(h('p', { class: 'sql-hint', 'data-hint': 'rls' }, h('strong', {}, 'Hint: '), rlsHint(as)));
    } else {
      parts.push(grid(columns, types, rows));
    }
  } else if (operation !== 'SELECT') {
    parts.push(h('p', { class: 'muted' }, `Done${r.message ? `: ${r.message}` : ''}.`));
  }
  return parts;
}

function grid(columns, types, rows) {
  const body = h('tbody');
  let shown = 0;
  const more = h('button', { type: 'button', class: 'small', 'data-show-more': '', onclick: () => showMore() });
  const note = h('p', { class: 'muted sql-shown' });
  function showMore() {
    const next = rows.slice(shown, shown + SHOW_STEP);
    for (const row of next) body.append(h('tr', {}, columns.map((c) => h('td', {}, cell(row[c])))));
    shown += next.length;
    const left = rows.length - shown;
    more.hidden = left <= 0;
    more.textContent = `Show ${Math.min(SHOW_STEP, left)} more`;
    note.textContent = left > 0 ? `Showing ${shown} of ${rows.length} rows received.` : '';
  }
  const table = h('table', { class: 'grid sql-grid', 'data-grid': '' },
    h('thead', {}, h('tr', {}, columns.map((c, i) => h('th', { scope: 'col', 'data-column': c },
      c, types[i] ? h('span', { class: 'type', 'data-type': types[i] }, types[i]) : null)))),
    body);
  showMore();
  return [h('div', { class: 'table-wrap sql-grid-wrap' }, table), h('div', { class: 'row' }, note, more)];
}
