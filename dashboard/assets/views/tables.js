// Table Editor: the project's tables (schema public and the other schemas the project's owner
// role made) with row estimates; a table's columns; its rows 50 a page in primary-key order;
// insert, edit and delete a row by its primary key; create a table. Everything goes through
// POST /api/execute-sql with the member's session (the owner role for developers and admins, the
// read role for viewers). Values always travel as parameters ($1, cast from their text form to
// the column's type); identifiers are quoted with ident(); types come from the catalog.

import { h, mount, append, field, header, section, errorBox, cell, toast, confirmDialog, act } from '../lib/dom.js';
import { sql, ident, tableKey } from '../lib/api.js';

const PAGE = 50;
/** Values longer than this (bytes of their JSON text) are shown as a preview of PREVIEW chars. */
const CUT_AT = 2048;
const PREVIEW = 200;
let formSeq = 0;

/** The types offered when creating a table (PostgreSQL's names). */
const TYPES = ['text', 'varchar', 'int2', 'int4', 'int8', 'serial', 'bigserial', 'bool', 'numeric', 'float8',
  'date', 'timestamptz', 'timestamp', 'uuid', 'jsonb', 'json', 'bytea', 'text[]', 'int4[]'];

const TABLES_SQL = `SELECT n.nspname AS schema, c.relname AS name, c.relkind AS kind,
  CASE WHEN c.reltuples >= 0 THEN c.reltuples::bigint ELSE s.n_live_tup END AS estimate,
  c.relrowsecurity AS rls
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_stat_all_tables s ON s.relid = c.oid
WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f') AND NOT c.relispartition
  AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'auth', 'realtime', 'fluxbase_cdc')
  AND n.nspname NOT LIKE 'pg\\_%'
  AND (n.nspname = 'public' OR pg_get_userbyid(n.nspowner) ~ '^fx_[0-9a-f]+_owner$')
ORDER BY n.nspname <> 'public', n.nspname, c.relname`;

const SCHEMAS_SQL = `SELECT n.nspname AS name FROM pg_namespace n
WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'auth', 'realtime', 'fluxbase_cdc')
  AND n.nspname NOT LIKE 'pg\\_%'
  AND (n.nspname = 'public' OR pg_get_userbyid(n.nspowner) ~ '^fx_[0-9a-f]+_owner$')
  AND has_schema_privilege(n.oid, 'CREATE')
ORDER BY n.nspname <> 'public', n.nspname`;

const COLUMNS_SQL = `SELECT a.attname AS name, format_type(a.atttypid, a.atttypmod) AS type,
  format_type(a.atttypid, NULL) AS base, NOT a.attnotnull AS nullable,
  pg_get_expr(d.adbin, d.adrelid) AS "default", a.attidentity AS identity, a.attgenerated AS generated,
  k.pos AS pk, t.typcategory AS category
FROM pg_attribute a
JOIN pg_type t ON t.oid = a.atttypid
LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
LEFT JOIN LATERAL (
  SELECT array_position(i.indkey::int2[], a.attnum) - array_lower(i.indkey::int2[], 1) + 1 AS pos
  FROM pg_index i WHERE i.indrelid = a.attrelid AND i.indisprimary
) k ON true
WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum`;

const KIND = { r: 'table', p: 'partitioned table', v: 'view', m: 'materialized view', f: 'foreign table' };

const qualified = (t) => `${ident(t.schema)}.${ident(t.name)}`;
const tableId = (t) => tableKey(t.schema, t.name);
/** A value's cast from its text form: the column's type without its modifier, so that a too
 * long varchar is refused on assignment instead of cut by an explicit cast. */
const castOf = (c) => `::text::${c.base}`;

export default {
  id: 'tables',
  title: 'Table Editor',
  group: 'Database',
  render(ctx, el) {
    const pid = ctx.project.id;
    const writable = ctx.can.write;
    let alive = true;
    let tables = [];
    let current = null; // {table, columns, pk, page, total}
    const list = h('div', { class: 'tables-list', 'data-table-list': '' }, h('p', { class: 'loading' }, 'Loading tables…'));
    const detail = h('div', { class: 'tables-detail', 'data-table-detail': '' });
    const newButton = writable
      ? h('button', { type: 'button', class: 'primary', 'data-new-table': '', onclick: () => showCreate() }, 'New table')
      : null;

    mount(el,
      header('Table Editor',
        writable
          ? 'Browse and edit rows, and create tables. Runs as the project\'s owner role, which row-level security policies do not filter.'
          : 'Browse tables and rows. You are a viewer: read-only, and row-level security policies filter the rows you see.',
        newButton),
      h('div', { class: 'tables-layout' },
        h('nav', { class: 'panel tables-aside', 'aria-label': 'Tables' }, h('h2', {}, 'Tables'), list),
        detail));

    function selectedFromUrl() {
      return new URLSearchParams(location.search).get('table');
    }
    function rememberSelection(t) {
      const u = new URL(location.href);
      if (t) u.searchParams.set('table', tableId(t)); else u.searchParams.delete('table');
      history.replaceState(null, '', u.pathname + u.search);
    }

    async function loadTables(select) {
      try {
        const answer = await sql(pid, TABLES_SQL);
        if (!alive) return;
        tables = answer.result.rows;
      } catch (err) {
        if (!alive) return;
        mount(list, errorBox(err));
        mount(detail);
        return;
      }
      renderList();
      const want = select || selectedFromUrl();
      const t = tables.find((x) => tableId(x) === want) || (current && tables.find((x) => tableId(x) === tableId(current.table)));
      if (t) openTable(t);
      else if (!current) renderNothing();
    }

    function renderNothing() {
      current = null;
      rememberSelection(null);
      markCurrent();
      mount(detail, section(tables.length ? 'Pick a table' : 'No tables yet',
        h('p', { class: 'empty' }, tables.length
          ? 'Choose a table on the left to see its columns and rows.'
          : writable
            ? 'This project has no tables yet: create one with New table, or with CREATE TABLE in the SQL Editor.'
            : 'This project has no tables yet. A developer or admin can create them.')));
    }

    function renderList() {
      if (!tables.length) {
        mount(list, h('p', { class: 'empty' }, 'No tables.'));
        return;
      }
      const bySchema = new Map();
      for (const t of tables) {
        if (!bySchema.has(t.schema)) bySchema.set(t.schema, []);
        bySchema.get(t.schema).push(t);
      }
      mount(list, [...bySchema].map(([schema, ts]) => h('div', { class: 'tables-schema' },
        h('h3', {}, schema),
        h('ul', {}, ts.map((t) => h('li', {}, h('button', {
          type: 'button', class: 'tables-item', 'data-table': tableId(t),
          'aria-current': current && tableId(current.table) === tableId(t) ? 'true' : undefined,
          onclick: () => openTable(t),
        }, h('span', { class: 'tables-name' }, t.name),
        h('span', { class: 'tables-estimate', 'data-estimate': t.estimate ?? '' },
          estimateText(t)))))))));
    }

    /** Marks the open table in the list (in place: a button keeps the keyboard focus). */
    function markCurrent() {
      for (const b of list.querySelectorAll('[data-table]')) {
        if (current && b.dataset.table === tableId(current.table)) b.setAttribute('aria-current', 'true');
        else b.removeAttribute('aria-current');
      }
    }

    async function openTable(t) {
      current = { table: t, columns: null, pk: [], page: 0, total: null };
      const mine = current;
      rememberSelection(t);
      markCurrent();
      mount(detail, h('p', { class: 'loading' }, `Loading ${t.name}…`));
      let columns;
      try {
        columns = (await sql(pid, COLUMNS_SQL, [qualified(t)])).result.rows;
      } catch (err) {
        if (alive && current === mine) mount(detail, section(t.name, errorBox(err)));
        return;
      }
      if (!alive || current !== mine) return;
      mine.columns = columns;
      mine.pk = columns.filter((c) => c.pk).sort((a, b) => a.pk - b.pk);
      renderDetail();
      await loadRows();
    }

    const rowsBox = h('div', { class: 'tables-rows', 'data-rows': '' });
    const pageInfo = h('span', { class: 'muted', 'data-page-info': '' });
    const prev = h('button', { type: 'button', class: 'small', 'data-page-prev': '', onclick: () => goPage(-1) }, '← Previous');
    const next = h('button', { type: 'button', class: 'small', 'data-page-next': '', onclick: () => goPage(1) }, 'Next →');

    /** Whether the current table's rows can be changed here: a writer, a table, a primary key. */
    const editable = () => writable && current && (current.table.kind === 'r' || current.table.kind === 'p') && current.pk.length > 0;

    function renderDetail() {
      const { table: t, columns, pk } = current;
      const isTable = t.kind === 'r' || t.kind === 'p';
      let note = null;
      if (!isTable) note = h('p', { class: 'tables-note', 'data-readonly-note': '' }, `A ${KIND[t.kind] || t.kind}: read-only here.`);
      else if (!pk.length) {
        note = h('p', { class: 'tables-note', 'data-readonly-note': '' },
          'This table has no primary key, so a row cannot be named one by one: it is read-only here. Add one in the SQL Editor (ALTER TABLE … ADD PRIMARY KEY).');
      }
      const tools = [];
      if (editable()) tools.push(h('button', { type: 'button', class: 'primary', 'data-insert': '', onclick: () => rowForm(null) }, 'Insert row'));
      if (writable && isTable) {
        tools.push(h('button', { type: 'button', class: 'danger', 'data-drop-table': '', onclick: act(() => dropTable(t)) }, 'Delete table'));
      }
      mount(detail,
        h('section', { class: 'panel', 'data-table-view': tableId(t) },
          h('div', { class: 'tables-head' },
            h('div', {},
              h('h2', {}, t.schema === 'public' ? t.name : `${t.schema}.${t.name}`),
              h('p', { class: 'muted' }, KIND[t.kind] || t.kind,
                t.rls ? ' · row-level security enabled' : '')),
            tools.length ? h('div', { class: 'tools' }, tools) : null),
          note,
          h('h3', {}, 'Columns'),
          h('div', { class: 'table-wrap' }, h('table', { class: 'grid', 'data-columns': '' },
            h('thead', {}, h('tr', {}, ['Name', 'Type', 'Nullable', 'Default', 'Primary key'].map((x) => h('th', { scope: 'col' }, x)))),
            h('tbody', {}, columns.map((c) => h('tr', { 'data-column': c.name },
              h('th', { scope: 'row' }, c.name),
              h('td', { 'data-col-type': c.type }, h('code', {}, c.type)),
              h('td', {}, c.nullable ? 'yes' : 'no'),
              h('td', {}, defaultText(c)),
              h('td', { 'data-col-pk': c.pk ? String(c.pk) : '' }, c.pk ? (pk.length > 1 ? `yes (${c.pk})` : 'yes') : '')))))),
          h('div', { class: 'tables-rows-head' },
            h('h3', {}, 'Rows'),
            h('div', { class: 'row' }, prev, pageInfo, next)),
          rowsBox));
    }

    async function loadRows() {
      const mine = current;
      const { table: t, columns, pk } = mine;
      const order = pk.length ? ` ORDER BY ${pk.map((c) => `r.${ident(c.name)}`).join(', ')}` : '';
      const key = pk.length ? `, ARRAY[${pk.map((c) => `r.${ident(c.name)}::text`).join(', ')}] AS key` : '';
      rowsBox.setAttribute('aria-busy', 'true');
      prev.disabled = true;
      next.disabled = true;
      try {
        const [rows, count] = await Promise.all([
          // Long values come cut to a preview (their size beside it): a page of rows holding
          // megabytes each would stall the tab. Editing reads the row whole again.
          sql(pid, `SELECT (SELECT json_object_agg(e.key, CASE WHEN octet_length(e.value::text) > ${CUT_AT}
                               THEN to_json(left(e.value #>> '{}', ${PREVIEW})) ELSE e.value END)
                            FROM json_each(row_to_json(r.*)) AS e) AS "row",
                           (SELECT json_object_agg(e.key, octet_length(e.value::text)) FROM json_each(row_to_json(r.*)) AS e
                            WHERE octet_length(e.value::text) > ${CUT_AT}) AS cut${key}
                      FROM ${qualified(t)} AS r${order} LIMIT ${PAGE} OFFSET $1`, [mine.page * PAGE]),
          sql(pid, `SELECT count(*) AS n FROM ${qualified(t)}`),
        ]);
        if (!alive || current !== mine) return;
        mine.total = Number(count.result.rows[0].n);
        if (mine.table.estimate !== mine.total || !mine.table.exact) { // the list shows the count now known
          mine.table.estimate = mine.total;
          mine.table.exact = true;
          const size = list.querySelector(`[data-table="${CSS.escape(tableId(mine.table))}"] .tables-estimate`);
          if (size) size.textContent = estimateText(mine.table);
        }
        if (mine.page > 0 && mine.page * PAGE >= mine.total) { // the last page emptied: step back
          mine.page = Math.max(0, Math.ceil(mine.total / PAGE) - 1);
          await loadRows();
          return;
        }
        renderRows(rows.result.rows, columns, rows.result.truncated);
      } catch (err) {
        if (alive && current === mine) mount(rowsBox, errorBox(err));
      } finally {
        if (current === mine) rowsBox.removeAttribute('aria-busy');
      }
    }

    function renderRows(rows, columns, truncated = false) {
      const { page, total } = current;
      const from = total ? page * PAGE + 1 : 0;
      const to = page * PAGE + rows.length;
      pageInfo.textContent = total ? `Rows ${from}–${to} of ${total}` : 'No rows';
      pageInfo.dataset.total = String(total);
      pageInfo.dataset.page = String(page + 1);
      prev.disabled = page === 0;
      next.disabled = to >= total;
      if (!rows.length) {
        mount(rowsBox, h('p', { class: 'empty', 'data-no-rows': '' },
          editable() ? 'No rows yet: insert one with Insert row.' : writable ? 'No rows.' : 'No rows (that you may see).'));
        return;
      }
      const canEdit = editable();
      mount(rowsBox, truncated
        ? h('p', { class: 'warn', role: 'status', 'data-truncated': '' }, `This page was cut at ${rows.length} rows: the answer reached the server's size limit. Use the SQL Editor for these rows.`)
        : null,
      h('div', { class: 'table-wrap' }, h('table', { class: 'grid tables-grid', 'data-grid': '' },
        h('thead', {}, h('tr', {},
          columns.map((c) => h('th', { scope: 'col', 'data-column': c.name }, c.name, h('span', { class: 'type' }, c.type))),
          canEdit ? h('th', { scope: 'col' }, h('span', { class: 'offscreen' }, 'Actions')) : null)),
        h('tbody', {}, rows.map((r) => {
          const label = r.key ? current.pk.map((c, i) => `${c.name} = ${r.key[i]}`).join(', ') : '';
          return h('tr', { 'data-row-key': r.key ? JSON.stringify(r.key) : undefined },
            columns.map((c) => h('td', { 'data-column': c.name },
              r.cut && r.cut[c.name] !== undefined
                ? [h('span', { 'data-cut': String(r.cut[c.name]) }, `${r.row[c.name]}…`), ' ', h('span', { class: 'muted' }, `(${bytes(r.cut[c.name])}, shown in part)`)]
                : cell(r.row[c.name]))),
            canEdit ? h('td', { class: 'tables-actions' },
              h('button', { type: 'button', class: 'small', 'data-edit': '', 'aria-label': `Edit row ${label}`, onclick: () => rowForm(r.key) }, 'Edit'),
              h('button', { type: 'button', class: 'small danger', 'data-delete': '', 'aria-label': `Delete row ${label}`, onclick: act(() => deleteRow(r.key, label)) }, 'Delete')) : null);
        })))));
    }

    function bytes(n) {
      return n >= 1048576 ? `${(n / 1048576).toFixed(1)} MiB` : n >= 1024 ? `${(n / 1024).toFixed(1)} KiB` : `${n} bytes`;
    }

    function goPage(step) {
      if (!current) return;
      current.page = Math.max(0, current.page + step);
      loadRows();
    }

    /** WHERE for the row with this primary key (text values cast to the key columns' types). */
    function keyWhere(key, firstParam) {
      return current.pk.map((c, i) => `${ident(c.name)} = $${firstParam + i}${castOf(c)}`).join(' AND ');
    }

    async function deleteRow(key, label) {
      const t = current.table;
      if (!await confirmDialog(`Delete the row ${label} from ${t.name}? This cannot be undone.`, { confirmLabel: 'Delete row' })) return;
      const answer = await sql(pid, `DELETE FROM ${qualified(t)} WHERE ${keyWhere(key, 1)}`, key);
      if (answer.result.rowCount !== 1) toast('No row was deleted: it was changed or deleted meanwhile.', 'error');
      else toast(`Row ${label} deleted.`, 'success');
      await loadRows(); // its count updates the list too
    }

    async function dropTable(t) {
      if (!await confirmDialog(`Delete the table ${t.schema}.${t.name} and all its rows? This cannot be undone.`,
        { confirmLabel: 'Delete table', typeToConfirm: t.name })) return;
      await sql(pid, `DROP TABLE ${qualified(t)}`);
      toast(`Table ${t.name} deleted.`, 'success');
      current = null;
      rememberSelection(null);
      await loadTables();
    }

    /** The insert (key null) or edit form of a row, in a modal dialog. */
    async function rowForm(key) {
      const { table: t, columns } = current;
      const editing = key !== null;
      let original = null;
      if (editing) {
        // The row's values in their PostgreSQL text form (what the inputs edit and send back).
        const answer = await sql(pid,
          `SELECT ARRAY[${columns.map((c) => `${ident(c.name)}::text`).join(', ')}] AS v FROM ${qualified(t)} WHERE ${keyWhere(key, 1)}`, key);
        if (!answer.result.rows.length) {
          toast('This row is gone: it was deleted meanwhile.', 'error');
          await loadRows();
          return;
        }
        original = answer.result.rows[0].v;
      }
      const inputs = [];
      const fields = columns.map((c, i) => {
        if (c.generated === 's' || c.identity === 'a') {
          return h('div', { class: 'field tables-fixed', 'data-fixed': c.name }, h('span', { class: 'tables-label' }, c.name),
            h('span', { class: 'muted' }, c.generated === 's' ? 'generated: computed by PostgreSQL' : 'identity: numbered by PostgreSQL'));
        }
        const hasDefault = c.default !== null || !!c.identity;
        const value = h('input', {
          type: 'text', class: 'mono', id: `tables-v${++formSeq}`, 'data-input': c.name, autocomplete: 'off', spellcheck: false,
          placeholder: c.type, value: editing && original[i] !== null ? original[i] : '',
        });
        // What an empty input means: DEFAULT, NULL or the empty string, as the column allows.
        const choices = [];
        if (hasDefault) choices.push(['default', 'DEFAULT']);
        if (c.nullable) choices.push(['null', 'NULL']);
        if (c.category === 'S') choices.push(['empty', "'' (empty text)"]);
        const empty = choices.length
          ? h('select', { 'data-empty': c.name, 'aria-label': `${c.name}: when empty` }, choices.map(([v, l]) => h('option', { value: v }, l)))
          : null;
        if (empty) {
          if (editing) empty.value = original[i] === null && c.nullable ? 'null' : original[i] === '' && c.category === 'S' ? 'empty' : choices[0][0];
          else empty.value = choices[0][0];
          const sync = () => { empty.disabled = value.value !== ''; };
          value.addEventListener('input', sync);
          sync();
        } else {
          value.required = true;
        }
        inputs.push({ c, i, value, empty });
        const hint = [c.type, c.nullable ? null : 'not null', c.default !== null ? `default ${c.default}` : null, c.identity ? 'identity' : null, c.pk ? 'primary key' : null]
          .filter(Boolean).join(' · ');
        return h('div', { class: 'field tables-field' },
          h('label', { for: value.id }, c.name),
          h('div', { class: 'tables-value' }, value,
            empty ? h('span', { class: 'tables-empty' }, h('span', { class: 'muted', 'aria-hidden': 'true' }, 'if empty'), empty) : null),
          h('small', { class: 'hint' }, hint));
      });

      /** The columns to write, each as an SQL expression, and the parameters they use. An edit
       * writes only what changed. */
      const build = () => {
        const params = [];
        const parts = [];
        for (const { c, i, value, empty } of inputs) {
          const choice = value.value !== '' ? 'value' : empty ? empty.value : 'value';
          const text = choice === 'value' ? value.value : choice === 'empty' ? '' : choice === 'null' ? null : undefined;
          if (editing && choice !== 'default' && text === original[i]) continue; // unchanged
          if (!editing && choice === 'default') continue; // left out: DEFAULT
          let expr;
          if (choice === 'default') expr = 'DEFAULT';
          else if (choice === 'null') expr = 'NULL';
          else { params.push(text); expr = `$${params.length}${castOf(c)}`; }
          parts.push({ c, expr });
        }
        return { params, parts };
      };

      const error = h('div', { class: 'form-error', 'data-form-error': '' });
      const submit = h('button', { type: 'submit', class: 'primary', 'data-save': '' }, editing ? 'Save' : 'Insert');
      const cancel = h('button', { type: 'button', 'data-cancel': '', onclick: () => d.close() }, 'Cancel');
      const form = h('form', {
        class: 'dialog-form tables-row-form',
        onsubmit: async (e) => {
          e.preventDefault();
          mount(error);
          const { params, parts } = build();
          let query;
          if (editing) {
            if (!parts.length) { d.close(); toast('Nothing changed.'); return; }
            query = `UPDATE ${qualified(t)} SET ${parts.map((p) => `${ident(p.c.name)} = ${p.expr}`).join(', ')} WHERE ${keyWhere(key, params.length + 1)}`;
            params.push(...key);
          } else {
            const ret = ` RETURNING ARRAY[${current.pk.map((c) => `${ident(c.name)}::text`).join(', ')}] AS key`;
            query = parts.length
              ? `INSERT INTO ${qualified(t)} (${parts.map((p) => ident(p.c.name)).join(', ')}) VALUES (${parts.map((p) => p.expr).join(', ')})${ret}`
              : `INSERT INTO ${qualified(t)} DEFAULT VALUES${ret}`;
          }
          submit.disabled = true;
          try {
            const answer = await sql(pid, query, params);
            if (editing && answer.result.rowCount !== 1) throw Object.assign(new Error('No row was updated: it was deleted meanwhile.'), { code: 'NOT_FOUND' });
            d.close();
            if (editing) toast('Row saved.', 'success');
            else toast(`Row inserted (${current.pk.map((c, i) => `${c.name} = ${answer.result.rows[0].key[i]}`).join(', ')}).`, 'success');
            await loadRows();
          } catch (err) {
            mount(error, errorBox(err));
          } finally {
            submit.disabled = false;
          }
        },
      },
      h('h2', {}, editing ? `Edit row of ${t.name}` : `Insert a row into ${t.name}`),
      h('p', { class: 'muted' }, 'Values are PostgreSQL text input (true/false, 2026-01-31, {1,2}, {"k": 1}); an empty value takes the choice beside it.'),
      h('div', { class: 'dialog-body tables-fields' }, fields),
      error,
      h('div', { class: 'actions' }, cancel, submit));
      const d = h('dialog', { class: 'dialog tables-dialog', 'aria-label': editing ? 'Edit row' : 'Insert row', 'data-row-dialog': editing ? 'edit' : 'insert' }, form);
      d.addEventListener('close', () => d.remove());
      document.body.append(d);
      d.showModal();
      const first = inputs.find((x) => !x.value.disabled && !(editing && x.c.pk)) || inputs[0];
      if (first) first.value.focus();
    }

    // ---- create a table ----
    async function showCreate() {
      let schemas = ['public'];
      try {
        schemas = (await sql(pid, SCHEMAS_SQL)).result.rows.map((r) => r.name);
      } catch (_) { /* public, then */ }
      if (!alive) return;
      current = null;
      rememberSelection(null);
      markCurrent();
      const schema = h('select', { 'data-schema': '' }, schemas.map((s) => h('option', { value: s }, s)));
      const name = h('input', { type: 'text', 'data-table-name': '', required: true, maxLength: 63, autocomplete: 'off', placeholder: 'todos' });
      const colsBody = h('tbody');
      const preview = h('pre', { class: 'tables-preview', 'data-preview': '' });
      const error = h('div', { class: 'form-error', 'data-form-error': '' });
      let seq = 0;
      function addColumn(init = {}) {
        const n = ++seq;
        const cname = h('input', { type: 'text', 'data-col-name': '', 'aria-label': `Column ${n} name`, value: init.name || '', autocomplete: 'off', maxLength: 63 });
        const type = h('select', { 'data-col-type': '', 'aria-label': `Column ${n} type` }, TYPES.map((x) => h('option', { value: x }, x)));
        type.value = init.type || 'text';
        const nullable = h('input', { type: 'checkbox', 'data-col-nullable': '', 'aria-label': `Column ${n} nullable`, checked: init.nullable ?? true });
        const def = h('input', { type: 'text', class: 'mono', 'data-col-default': '', 'aria-label': `Column ${n} default (an SQL expression)`, value: init.default || '', autocomplete: 'off', placeholder: 'none' });
        const pk = h('input', { type: 'checkbox', 'data-col-pk': '', 'aria-label': `Column ${n} primary key`, checked: !!init.pk });
        const tr = h('tr', { 'data-new-column': '' },
          h('td', {}, cname), h('td', {}, type), h('td', { class: 'tables-check' }, nullable), h('td', {}, def), h('td', { class: 'tables-check' }, pk),
          h('td', {}, h('button', { type: 'button', class: 'small ghost', 'aria-label': `Remove column ${n}`, onclick: () => { tr.remove(); update(); } }, 'Remove')));
        tr.read = () => ({ name: cname.value.trim(), type: type.value, nullable: nullable.checked && !pk.checked, default: def.value.trim(), pk: pk.checked });
        pk.addEventListener('change', () => { nullable.disabled = pk.checked; update(); });
        nullable.disabled = pk.checked;
        colsBody.append(tr);
        update();
        return tr;
      }
      function spec() {
        const cols = [...colsBody.children].map((tr) => tr.read()).filter((c) => c.name);
        return { schema: schema.value, name: name.value.trim(), cols };
      }
      function ddl({ schema: s, name: n, cols }) {
        const lines = cols.map((c) => `  ${ident(c.name)} ${c.type}${c.nullable ? '' : ' NOT NULL'}${c.default ? ` DEFAULT ${c.default}` : ''}`);
        const pks = cols.filter((c) => c.pk);
        if (pks.length) lines.push(`  PRIMARY KEY (${pks.map((c) => ident(c.name)).join(', ')})`);
        return `CREATE TABLE ${ident(s)}.${ident(n || '…')} (\n${lines.join(',\n')}\n)`;
      }
      function update() { preview.textContent = ddl(spec()); }
      const form = h('form', {
        class: 'tables-create', 'aria-label': 'Create a table', oninput: update, onchange: update,
        onsubmit: async (e) => {
          e.preventDefault();
          mount(error);
          const s = spec();
          const problem = !s.name ? 'Name the table.'
            : !s.cols.length ? 'Add at least one column with a name.'
              : new Set(s.cols.map((c) => c.name)).size !== s.cols.length ? 'Two columns have the same name.' : null;
          if (problem) { mount(error, errorBox({ code: 'BAD_REQUEST', message: problem })); return; }
          submitButton.disabled = true;
          try {
            await sql(pid, ddl(s));
            toast(`Table ${s.name} created.`, 'success');
            await loadTables(tableId(s));
          } catch (err) {
            mount(error, errorBox(err));
          } finally {
            submitButton.disabled = false;
          }
        },
      });
      const submitButton = h('button', { type: 'submit', class: 'primary', 'data-create-table': '' }, 'Create table');
      append(form, [
        h('div', { class: 'inline-form' }, schemas.length > 1 ? field('Schema', schema) : null, field('Table name', name)),
        h('h3', {}, 'Columns'),
        h('div', { class: 'table-wrap' }, h('table', { class: 'grid tables-new-columns' },
          h('thead', {}, h('tr', {}, ['Name', 'Type', 'Nullable', 'Default', 'Primary key', ''].map((x) => h('th', { scope: 'col' }, x || h('span', { class: 'offscreen' }, 'Remove'))))),
          colsBody)),
        h('div', { class: 'row tables-add' }, h('button', { type: 'button', class: 'small', 'data-add-column': '', onclick: () => addColumn().querySelector('input').focus() }, 'Add column')),
        h('p', { class: 'hint' }, 'A default is an SQL expression: now(), 0, \'draft\', gen_random_uuid(). serial and bigserial number rows by themselves.'),
        h('h3', {}, 'SQL'),
        preview,
        error,
        h('div', { class: 'row' }, submitButton,
          h('button', { type: 'button', 'data-cancel-create': '', onclick: () => renderNothing() }, 'Cancel'))]);
      mount(detail, section('New table', form));
      addColumn({ name: 'id', type: 'serial', nullable: false, pk: true });
      addColumn({ name: '', type: 'text' });
      name.focus();
    }

    loadTables();
    return () => { alive = false; };
  },
};

/** A table's size in the list: the exact count once its rows were read, else PostgreSQL's estimate. */
function estimateText(t) {
  if (t.kind !== 'r' && t.kind !== 'p') return KIND[t.kind] || t.kind;
  if (t.estimate === null || t.estimate === undefined) return '';
  return t.exact ? `${t.estimate} ${t.estimate === 1 ? 'row' : 'rows'}` : `≈ ${t.estimate}`;
}

function defaultText(c) {
  if (c.generated === 's') return h('span', {}, 'generated: ', h('code', {}, c.default));
  if (c.identity) return h('span', { class: 'muted' }, c.identity === 'a' ? 'identity (always)' : 'identity');
  return c.default === null ? h('span', { class: 'null' }, 'none') : h('code', {}, c.default);
}
