// DOM building blocks of the dashboard. Text always goes in as text nodes (never innerHTML), so a
// value from the database or another user cannot become markup.

/** An element: h('button', {class: 'primary', onclick: fn}, 'Save'). Attributes starting with
 * `on` are listeners; `class`, `for`, `data-*`, `aria-*` and `role` are attributes; the rest
 * are properties (value, checked, disabled, hidden, type…). Children: nodes, strings, numbers,
 * arrays of those; null/false/undefined are skipped. */
export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
    else if (k === 'class' || k === 'for' || k === 'role' || k === 'name' || k === 'title' || k === 'id' || k === 'href' || k === 'tabindex' || k === 'placeholder' || k === 'autocomplete' || k === 'list' || k.startsWith('data-') || k.startsWith('aria-'))
      el.setAttribute(k, v === true ? '' : String(v));
    else el[k] = v;
    // A checkbox's initial state survives form.reset().
    if (k === 'checked') el.defaultChecked = !!v;
  }
  append(el, children);
  return el;
}

export function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

/** Replaces an element's children. */
export function mount(el, ...children) {
  el.replaceChildren();
  return append(el, children);
}

/** A labelled form field; `input` is any control (its id is set if missing). */
let fieldSeq = 0;
export function field(label, input, hint) {
  if (!input.id) input.id = `f${++fieldSeq}`;
  return h('div', { class: 'field' },
    h('label', { for: input.id }, label),
    input,
    hint ? h('small', { class: 'hint' }, hint) : null);
}

/** A short message in the page's live region (screen readers announce it). */
export function toast(message, kind = 'info') {
  let region = document.getElementById('toasts');
  if (!region) {
    region = h('div', { id: 'toasts', class: 'toasts', role: 'status', 'aria-live': 'polite' });
    document.body.append(region);
  }
  const t = h('div', { class: `toast ${kind}` }, message);
  region.append(t);
  setTimeout(() => t.remove(), kind === 'error' ? 8000 : 4000);
}

/** An API error (or any error) as the guide shows it: code, message, details. */
export function errorBox(err) {
  const code = err && err.code ? err.code : 'ERROR';
  return h('div', { class: 'error-box', role: 'alert', 'data-code': code },
    h('strong', {}, code), ' ', err && err.message ? err.message : String(err),
    err && err.details ? h('div', { class: 'details' }, h('code', {}, err.details)) : null);
}

/** A modal dialog (the native <dialog>: focus trapped, Esc closes). `actions` are
 * [{label, value, class}]; resolves with the chosen value (or null on Esc/cancel). `body` may be
 * a node or a function (dialogEl) => node. A `form` action (type submit) resolves only when
 * `validate()` (if given) returns true. */
export function dialog({ title, body, actions = [{ label: 'Close', value: null }], validate }) {
  return new Promise((resolve) => {
    const form = h('form', { method: 'dialog', class: 'dialog-form' });
    const d = h('dialog', { class: 'dialog', 'aria-label': title }, form);
    append(form, [
      h('h2', {}, title),
      h('div', { class: 'dialog-body' }, typeof body === 'function' ? body(d) : body),
      h('div', { class: 'actions' }, actions.map((a) =>
        h('button', {
          type: a.value === null ? 'button' : 'submit', class: a.class || '', value: String(a.value ?? ''),
          'data-action': a.label,
          onclick: (e) => {
            if (a.value === null) { d.close(); return; }
            if (validate && !validate(a.value)) { e.preventDefault(); return; }
            e.preventDefault();
            d.returnValue = String(a.value);
            finish(a.value);
          },
        }, a.label))),
    ]);
    let done = false;
    function finish(v) {
      if (done) return;
      done = true;
      if (d.open) d.close();
      d.remove();
      resolve(v);
    }
    d.addEventListener('close', () => finish(null));
    document.body.append(d);
    d.showModal();
  });
}

/** A modal form (the native <dialog>): `onSubmit(form)` runs on submit; an error it throws stays
 * in the dialog (the guide's error shape, plus `explain(err)` when given: a troubleshooting
 * hint), success closes it. Resolves true once submitted, false when cancelled. */
export function formDialog({ title, body, submitLabel, onSubmit, explain, className = '' }) {
  return new Promise((resolve) => {
    const errors = h('div', { class: 'form-error', 'aria-live': 'polite' });
    const submit = h('button', { type: 'submit', class: 'primary', 'data-action': submitLabel }, submitLabel);
    let ok = false;
    const form = h('form', {
      class: 'dialog-form',
      onsubmit: async (e) => {
        e.preventDefault();
        submit.disabled = true;
        mount(errors);
        try {
          await onSubmit(form);
          ok = true;
          d.close();
        } catch (err) {
          mount(errors, errorBox(err), explain ? explain(err) : null);
        } finally {
          submit.disabled = false;
        }
      },
    });
    const d = h('dialog', { class: `dialog ${className}`.trim(), 'aria-label': title }, form);
    form.append(h('h2', {}, title), h('div', { class: 'dialog-body' }, body), errors,
      h('div', { class: 'actions' },
        h('button', { type: 'button', 'data-action': 'Cancel', onclick: () => d.close() }, 'Cancel'), submit));
    d.addEventListener('close', () => { d.remove(); resolve(ok); });
    document.body.append(d);
    d.showModal();
  });
}

/** Asks before something that cannot be undone. With `typeToConfirm`, the user must type that
 * text (a project's name before its deletion). */
export async function confirmDialog(text, { confirmLabel = 'Confirm', danger = true, typeToConfirm } = {}) {
  let input = null;
  const body = h('div', {}, h('p', {}, text),
    typeToConfirm ? field(`Type "${typeToConfirm}" to confirm`, input = h('input', { type: 'text', autocomplete: 'off' })) : null);
  const v = await dialog({
    title: confirmLabel,
    body,
    actions: [{ label: 'Cancel', value: null }, { label: confirmLabel, value: 'yes', class: danger ? 'danger' : 'primary' }],
    validate: () => !input || input.value === typeToConfirm,
  });
  return v === 'yes';
}

/** Copies text to the clipboard (the Clipboard API where the page is a secure context, else a
 * selected read-only field and execCommand). */
export async function copyText(text) {
  try {
    if (navigator.clipboard && window.isSecureContext) {
      await navigator.clipboard.writeText(text);
      return true;
    }
  } catch (_) { /* fall through */ }
  const ta = h('textarea', { readOnly: true, class: 'offscreen', value: text });
  document.body.append(ta);
  ta.select();
  let ok = false;
  try { ok = document.execCommand('copy'); } catch (_) { ok = false; }
  ta.remove();
  return ok;
}

export function copyButton(text, label = 'Copy') {
  return h('button', {
    type: 'button', class: 'small', 'data-copy': '', onclick: async (e) => {
      const ok = await copyText(typeof text === 'function' ? text() : text);
      e.target.textContent = ok ? 'Copied' : 'Copy failed';
      setTimeout(() => { e.target.textContent = label; }, 1500);
    },
  }, label);
}

/** A secret shown once: the value in a read-only field, a copy button, and the warning. The
 * caller drops the node (and so the secret) when the user is done. */
export function secretBox(secret, what = 'This secret') {
  return h('div', { class: 'secret-box' },
    h('p', { class: 'warn' }, `${what} is shown once. Copy it now: it cannot be shown again.`),
    h('div', { class: 'row' },
      h('input', { type: 'text', readOnly: true, value: secret, class: 'mono grow', 'aria-label': 'Secret', 'data-secret': '' }),
      copyButton(secret)));
}

/** A table of rows. `columns`: [{key, label, type?, render?(row)}]. */
export function dataTable(columns, rows, { empty = 'Nothing here yet.', caption } = {}) {
  if (!rows.length) return h('p', { class: 'empty' }, empty);
  return h('div', { class: 'table-wrap' }, h('table', { class: 'grid' },
    caption ? h('caption', {}, caption) : null,
    h('thead', {}, h('tr', {}, columns.map((c) => h('th', { scope: 'col' }, c.label ?? c.key,
      c.type ? h('span', { class: 'type' }, c.type) : null)))),
    h('tbody', {}, rows.map((r) => h('tr', {}, columns.map((c) => h('td', {}, c.render ? c.render(r) : cell(r[c.key]))))))));
}

/** A JSON value as grid text: null shown as such, objects as JSON. */
export function cell(v) {
  if (v === null || v === undefined) return h('span', { class: 'null' }, 'NULL');
  if (typeof v === 'object') return h('code', {}, JSON.stringify(v));
  return String(v);
}

/** A date (ISO text or epoch seconds) in the reader's locale; '—' when missing. */
export function when(v) {
  if (v === null || v === undefined || v === '') return '—';
  const d = typeof v === 'number' ? new Date(v * 1000) : new Date(v);
  return Number.isNaN(d.getTime()) ? String(v) : d.toLocaleString();
}

/** A page section: title, optional toolbar, content. */
export function section(title, ...content) {
  return h('section', { class: 'panel' }, h('h2', {}, title), ...content);
}

/** A view's heading: h1 plus a short description. */
export function header(title, description, ...tools) {
  return h('header', { class: 'view-header' },
    h('div', {}, h('h1', {}, title), description ? h('p', { class: 'muted' }, description) : null),
    tools.length ? h('div', { class: 'tools' }, tools) : null);
}

/** A click handler for an async action: the button is disabled meanwhile and an error is shown
 * as a toast (the guide's code and message). h('button', {onclick: act(async () => …)}, 'Save'). */
export function act(action) {
  return async (e) => {
    const button = e && e.currentTarget instanceof HTMLElement ? e.currentTarget : null;
    if (e && e.type === 'submit') e.preventDefault();
    if (button) button.disabled = true;
    try {
      return await action(e);
    } catch (err) {
      toast(`${err.code ? err.code + ': ' : ''}${err.message || err}`, 'error');
      return undefined;
    } finally {
      if (button) button.disabled = false;
    }
  };
}
