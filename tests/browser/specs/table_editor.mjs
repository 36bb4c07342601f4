// The Table Editor: create a table with the form; insert two rows, edit one, delete one (each
// checked against the database through the API); paging through more than 50 rows inserted with
// the API; a table without a primary key is read-only; a viewer sees no write controls.
import { spec, BASE, projectFor, assert, call, textOf, memberAs } from '../lib/harness.mjs';

async function sqlAs(token, projectId, query, params) {
  const r = await call('POST', '/api/execute-sql', { token, body: { projectId, query, ...(params ? { params } : {}) } });
  assert.equal(r.status, 200, JSON.stringify(r.body));
  assert.equal(r.body.success, true, JSON.stringify(r.body));
  return r.body.result.rows;
}

/** The grid's rows as the page shows them: {key, cells: {column: text}}. */
function gridRows(page) {
  return page.$$eval('[data-rows] [data-grid] tbody tr', (trs) => trs.map((tr) => ({
    key: tr.dataset.rowKey ? JSON.parse(tr.dataset.rowKey) : null,
    cells: Object.fromEntries([...tr.querySelectorAll('td[data-column]')].map((td) => [td.dataset.column, td.innerText])),
  })));
}

/** Waits for the rows area to show `text` in its page info. */
async function waitPageInfo(page, text) {
  await page.waitForFunction((want) => {
    const i = document.querySelector('[data-page-info]');
    return i && i.textContent === want && !document.querySelector('[data-rows][aria-busy]');
  }, {}, text);
}

/** Fills the open row dialog: {column: text | {empty: 'null'|'default'|'empty'}}, then saves. */
async function fillRow(page, values) {
  await page.waitForSelector('dialog[open][data-row-dialog]');
  for (const [col, v] of Object.entries(values)) {
    const input = `dialog[open] [data-input="${col}"]`;
    await page.$eval(input, (e) => { e.value = ''; e.dispatchEvent(new Event('input', { bubbles: true })); });
    if (typeof v === 'string') await page.type(input, v);
    else await page.select(`dialog[open] [data-empty="${col}"]`, v.empty);
  }
  await page.click('dialog[open] [data-save]');
}

await spec('table_editor', async (t) => {
  const page = await t.newPage();
  await t.signUp(page);
  const token = await t.token(page);
  // The project through the API, then the view by its address (the page waits for the app).
  const { id: projectId } = await projectFor(token);
  await t.visit(page, projectId, 'tables');
  await page.waitForSelector('[data-table-detail] .empty');
  assert.match(await textOf(page, '[data-table-detail]'), /No tables yet/);

  t.log('create a table with the form');
  await page.click('[data-new-table]');
  await page.waitForSelector('form[aria-label="Create a table"]');
  await page.type('[data-table-name]', 'items');
  // The form starts with id serial primary key and an empty text column.
  const rows = await page.$$('[data-new-column]');
  assert.equal(rows.length, 2);
  await page.type('[data-new-column]:nth-child(2) [data-col-name]', 'title');
  await page.click('[data-new-column]:nth-child(2) [data-col-nullable]'); // NOT NULL
  await page.click('[data-add-column]');
  await page.type('[data-new-column]:nth-child(3) [data-col-name]', 'qty');
  await page.select('[data-new-column]:nth-child(3) [data-col-type]', 'int4');
  await page.type('[data-new-column]:nth-child(3) [data-col-default]', '0');
  await page.click('[data-add-column]');
  await page.type('[data-new-column]:nth-child(4) [data-col-name]', 'note');
  const preview = await textOf(page, '[data-preview]');
  assert.equal(preview, 'CREATE TABLE "public"."items" (\n  "id" serial NOT NULL,\n  "title" text NOT NULL,\n  "qty" int4 DEFAULT 0,\n  "note" text,\n  PRIMARY KEY ("id")\n)');
  await t.shot(page, 'create-form');
  await page.click('[data-create-table]');
  await page.waitForSelector('[data-table-view="public.items"] [data-no-rows]');
  const cols = await sqlAs(token, projectId, `SELECT c.column_name AS name, c.data_type AS type, c.is_nullable AS nullable, c.column_default AS "default",
    EXISTS (SELECT 1 FROM information_schema.key_column_usage k JOIN information_schema.table_constraints tc USING (constraint_name, table_schema, table_name)
      WHERE tc.constraint_type = 'PRIMARY KEY' AND k.table_name = c.table_name AND k.column_name = c.column_name) AS pk
    FROM information_schema.columns c WHERE c.table_schema = 'public' AND c.table_name = 'items' ORDER BY c.ordinal_position`);
  assert.deepEqual(cols.map((c) => [c.name, c.type, c.nullable, c.pk]), [
    ['id', 'integer', 'NO', true], ['title', 'text', 'NO', false], ['qty', 'integer', 'YES', false], ['note', 'text', 'YES', false]]);
  assert.equal(cols[2].default, '0');
  const shownCols = await page.$$eval('[data-columns] tbody tr', (trs) => trs.map((tr) => [tr.dataset.column, tr.querySelector('[data-col-type]').dataset.colType, tr.querySelector('[data-col-pk]').dataset.colPk]));
  assert.deepEqual(shownCols, [['id', 'integer', '1'], ['title', 'text', ''], ['qty', 'integer', ''], ['note', 'text', '']]);
  assert.ok(await page.$('[data-table-list] [data-table="public.items"]'));

  t.log('a value PostgreSQL refuses is shown in the form, which stays open');
  await page.click('[data-insert]');
  await fillRow(page, { title: 'first', qty: 'five' });
  await page.waitForSelector('dialog[open] [data-form-error] .error-box[data-code=SQL_EXEC_ERROR]');
  assert.match(await textOf(page, 'dialog[open] [data-form-error]'), /invalid input syntax for type integer: "five"/);
  assert.match(await textOf(page, 'dialog[open] [data-form-error]'), /22P02/);
  await t.shot(page, 'insert-error');

  t.log('insert two rows');
  await fillRow(page, { title: 'first', qty: '5', note: { empty: 'null' } });
  await page.waitForSelector('dialog[open]', { hidden: true });
  await waitPageInfo(page, 'Rows 1–1 of 1');
  await page.click('[data-insert]');
  // qty empty: DEFAULT (0); note empty: the empty string; a quote stays data.
  await fillRow(page, { title: "it's second", qty: { empty: 'default' }, note: { empty: 'empty' } });
  await waitPageInfo(page, 'Rows 1–2 of 2');
  let db = await sqlAs(token, projectId, 'SELECT id, title, qty, note FROM items ORDER BY id');
  assert.deepEqual(db, [{ id: 1, title: 'first', qty: 5, note: null }, { id: 2, title: "it's second", qty: 0, note: '' }]);
  let shown = await gridRows(page);
  assert.deepEqual(shown.map((r) => r.key), [['1'], ['2']]);
  assert.deepEqual(shown.map((r) => [r.cells.title, r.cells.qty, r.cells.note]), [['first', '5', 'NULL'], ["it's second", '0', '']]);

  t.log('edit a row');
  await page.click('tr[data-row-key=\'["1"]\'] [data-edit]');
  await page.waitForSelector('dialog[open][data-row-dialog=edit]');
  assert.equal(await page.$eval('dialog[open] [data-input=title]', (e) => e.value), 'first');
  assert.equal(await page.$eval('dialog[open] [data-input=qty]', (e) => e.value), '5');
  assert.equal(await page.$eval('dialog[open] [data-empty=note]', (e) => e.value), 'null');
  await t.shot(page, 'edit-form');
  await fillRow(page, { title: 'first (edited)', note: '"; DROP TABLE items; --' });
  await page.waitForSelector('dialog[open]', { hidden: true });
  await page.waitForFunction(() => document.querySelector('tr[data-row-key=\'["1"]\'] td[data-column=title]')?.innerText === 'first (edited)');
  db = await sqlAs(token, projectId, 'SELECT id, title, qty, note FROM items ORDER BY id');
  assert.deepEqual(db, [{ id: 1, title: 'first (edited)', qty: 5, note: '"; DROP TABLE items; --' }, { id: 2, title: "it's second", qty: 0, note: '' }]);

  t.log('delete a row (asked first)');
  await page.click('tr[data-row-key=\'["2"]\'] [data-delete]');
  await page.waitForSelector('dialog[open] button[data-action="Delete row"]');
  await page.click('dialog[open] button[data-action="Cancel"]');
  await page.waitForSelector('dialog[open]', { hidden: true });
  assert.equal((await sqlAs(token, projectId, 'SELECT count(*)::int AS n FROM items'))[0].n, 2, 'cancel keeps the row');
  await page.click('tr[data-row-key=\'["2"]\'] [data-delete]');
  await page.click('dialog[open] button[data-action="Delete row"]');
  await waitPageInfo(page, 'Rows 1–1 of 1');
  db = await sqlAs(token, projectId, 'SELECT id FROM items ORDER BY id');
  assert.deepEqual(db, [{ id: 1 }]);
  shown = await gridRows(page);
  assert.deepEqual(shown.map((r) => r.key), [['1']]);

  t.log('paging: 120 more rows through the API');
  await sqlAs(token, projectId, "INSERT INTO items (title, qty) SELECT 'bulk ' || g, g FROM generate_series(1, 120) g");
  await page.reload();
  await page.waitForSelector('[data-table-view="public.items"]');
  await waitPageInfo(page, 'Rows 1–50 of 121');
  const ids = (await sqlAs(token, projectId, 'SELECT id::text AS key FROM items ORDER BY items.id')).map((r) => r.key);
  shown = await gridRows(page);
  assert.deepEqual(shown.map((r) => r.key[0]), ids.slice(0, 50));
  assert.equal(await page.$eval('[data-page-prev]', (b) => b.disabled), true);
  await page.click('[data-page-next]');
  await waitPageInfo(page, 'Rows 51–100 of 121');
  shown = await gridRows(page);
  assert.deepEqual(shown.map((r) => r.key[0]), ids.slice(50, 100));
  await page.click('[data-page-next]');
  await waitPageInfo(page, 'Rows 101–121 of 121');
  shown = await gridRows(page);
  assert.deepEqual(shown.map((r) => r.key[0]), ids.slice(100));
  assert.equal(await page.$eval('[data-page-next]', (b) => b.disabled), true);
  await t.shot(page, 'rows-page3');
  await page.click('[data-page-prev]');
  await waitPageInfo(page, 'Rows 51–100 of 121');
  await t.shot(page, 'rows');
  await t.shot(page, 'rows-dark', { dark: true });

  t.log('a two-column key and a name that needs quoting; a too long varchar is refused, not cut');
  await sqlAs(token, projectId, 'CREATE TABLE "Odd ""name""" (k1 text, k2 int4, v varchar(3), PRIMARY KEY (k1, k2))');
  await page.reload();
  const oddButton = '[data-table="public.Odd \\"name\\""]';
  await page.waitForSelector(oddButton);
  await page.click(oddButton);
  await waitPageInfo(page, 'No rows');
  assert.deepEqual(await page.$$eval('[data-columns] [data-col-pk]', (tds) => tds.map((td) => td.dataset.colPk)), ['1', '2', '']);
  await page.click('[data-insert]');
  await fillRow(page, { k1: 'a b', k2: '7', v: 'abcd' });
  await page.waitForSelector('dialog[open] [data-form-error] .error-box');
  assert.match(await textOf(page, 'dialog[open] [data-form-error]'), /too long[\s\S]*22001/);
  await fillRow(page, { v: 'abc' });
  await waitPageInfo(page, 'Rows 1–1 of 1');
  await page.click('tr[data-row-key=\'["a b","7"]\'] [data-edit]');
  await fillRow(page, { v: 'xyz' });
  await page.waitForFunction(() => document.querySelector('tr[data-row-key=\'["a b","7"]\'] td[data-column=v]')?.innerText === 'xyz');
  assert.deepEqual(await sqlAs(token, projectId, 'SELECT * FROM "Odd ""name"""'), [{ k1: 'a b', k2: 7, v: 'xyz' }]);

  t.log('a long value is shown in part, with its size, and edited whole');
  await sqlAs(token, projectId, "CREATE TABLE big (id int PRIMARY KEY, v text); INSERT INTO big VALUES (1, repeat('x', 1000000) || 'END')");
  await page.reload();
  await page.waitForSelector('[data-table="public.big"]');
  await page.click('[data-table="public.big"]');
  await waitPageInfo(page, 'Rows 1–1 of 1');
  const cut = await page.$eval('td[data-column=v] [data-cut]', (e) => ({ bytes: e.dataset.cut, text: e.textContent }));
  assert.equal(cut.bytes, String(1000003 + 2), 'the JSON text of the value: its characters and quotes');
  assert.equal(cut.text, `${'x'.repeat(200)}…`);
  assert.match(await textOf(page, 'td[data-column=v]'), /976\.6 KiB, shown in part/);
  await page.click('tr[data-row-key=\'["1"]\'] [data-edit]');
  await page.waitForSelector('dialog[open] [data-input=v]');
  assert.equal(await page.$eval('dialog[open] [data-input=v]', (i) => i.value.length), 1000003, 'the form edits the whole value');
  await page.keyboard.press('Escape');
  await page.waitForSelector('dialog[open]', { hidden: true });

  t.log('a table without a primary key is read-only');
  await sqlAs(token, projectId, "CREATE TABLE logs (msg text); INSERT INTO logs VALUES ('hello')");
  await page.reload();
  await page.waitForSelector('[data-table="public.logs"]');
  await page.click('[data-table="public.logs"]');
  await page.waitForSelector('[data-table-view="public.logs"] [data-readonly-note]');
  await waitPageInfo(page, 'Rows 1–1 of 1');
  assert.equal(await page.$('[data-insert]'), null);
  assert.equal(await page.$('[data-edit]'), null);
  assert.match(await textOf(page, '[data-rows]'), /hello/);

  t.log('a viewer sees the rows, and no write controls');
  const viewer = await memberAs(token, projectId, 'viewer');
  const vpage = await t.newPage();
  await t.signIn(vpage, viewer);
  await t.visit(vpage, projectId, 'tables');
  await vpage.waitForSelector('[data-table="public.items"]');
  await vpage.click('[data-table="public.items"]');
  await waitPageInfo(vpage, 'Rows 1–50 of 121');
  for (const sel of ['[data-new-table]', '[data-insert]', '[data-edit]', '[data-delete]', '[data-drop-table]']) {
    assert.equal(await vpage.$(sel), null, `a viewer sees no ${sel}`);
  }
  assert.match(await textOf(vpage, '.view-header'), /You are a viewer: read-only/);
  shown = await gridRows(vpage);
  assert.deepEqual(shown.map((r) => r.key[0]), ids.slice(0, 50));
  await t.shot(vpage, 'viewer');
});
