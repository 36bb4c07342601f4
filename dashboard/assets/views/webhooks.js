// Webhooks: the project's endpoints (URL, events, tables, state), creating one (its signing
// secret shown once), rotating its secret, enabling/disabling and deleting it, and each endpoint's delivery log
// (status, attempts, the receiver's last answer, timestamps) with a status filter, refresh and
// redelivery. Viewers see the endpoints and their logs read-only, as the API decides.

import { h, mount, field, toast, errorBox, dialog, confirmDialog, secretBox, dataTable, when, section, header, act } from '../lib/dom.js';
import { get, post, patch, del } from '../lib/api.js';

const EVENTS = [
  ['row.inserted', 'Row inserted'],
  ['row.updated', 'Row updated'],
  ['row.deleted', 'Row deleted'],
  ['schema.changed', 'Schema changed'],
];
const STATUSES = ['pending', 'delivered', 'failed'];
const AUTO_REFRESH_MS = 5000;

export default {
  id: 'webhooks',
  title: 'Webhooks',
  group: 'Integrations',
  render(ctx, el) {
    const projectId = ctx.project.id;
    const canWrite = ctx.can.write;
    let webhooks = [];
    let selected = null; // the webhook whose deliveries are shown
    let statusFilter = '';
    let timer = null;
    let left = false;
    let logSeq = 0; // drops answers of a log request overtaken by a newer one

    const listBox = h('div', { 'data-webhook-list': '' }, h('p', { class: 'loading' }, 'Loading webhooks…'));
    const logPanel = h('section', { class: 'panel wh-log', 'data-delivery-log': '', hidden: true, 'aria-label': 'Delivery log' });

    // ---- the endpoints ----
    async function loadWebhooks() {
      try {
        const answer = await get('/api/webhooks', { projectId });
        webhooks = answer.webhooks;
        if (selected) selected = webhooks.find((w) => w.id === selected.id) || null;
        renderList();
        if (!selected) closeLog();
      } catch (err) {
        mount(listBox, errorBox(err), h('button', { type: 'button', onclick: act(loadWebhooks) }, 'Try again'));
      }
    }

    function renderList() {
      mount(listBox, dataTable([
        { key: 'url', label: 'URL', render: (w) => h('code', { class: 'wh-url', title: w.url }, w.url) },
        { key: 'events', label: 'Events', render: (w) => h('span', { class: 'wh-events' }, w.events.join(', ')) },
        { key: 'tables', label: 'Tables', render: tablesCell },
        { key: 'ordering', label: 'Ordering', render: (w) => h('code', { class: 'wh-ordering', title: w.ordering === 'strict' ? 'one delivery at a time, oldest first' : 'each row in commit order; other rows concurrently' }, w.ordering) },
        { key: 'enabled', label: 'State', render: stateCell },
        { key: 'createdAt', label: 'Created', render: (w) => when(w.createdAt) },
        { key: 'actions', label: 'Actions', render: actionsCell },
      ], webhooks, {
        empty: canWrite
          ? 'No webhooks yet: register an endpoint above and every matching committed change is POSTed to it.'
          : 'No webhooks yet. A developer or an admin of this project can register one.',
      }));
      for (const tr of listBox.querySelectorAll('tbody tr')) {
        const w = webhooks[tr.sectionRowIndex];
        tr.dataset.webhook = w.id;
        tr.dataset.enabled = String(w.enabled);
        if (selected && selected.id === w.id) tr.classList.add('selected');
      }
    }

    function tablesCell(w) {
      if (w.tables === null || w.tables === undefined) return h('span', { class: 'muted' }, 'all tables');
      // An empty list (the API accepts one) matches no table: the endpoint never gets a change.
      if (!w.tables.length) return h('span', { class: 'warn', title: 'An empty table list matches no change' }, 'none (never sent)');
      return w.tables.join(', ');
    }

    function stateCell(w) {
      return h('span', { class: 'wh-state' },
        h('span', { class: w.enabled ? 'status active' : 'status bad', 'data-state': w.enabled ? 'enabled' : 'disabled' }, w.enabled ? 'enabled' : 'disabled'),
        w.disabledReason ? h('small', { class: 'hint wh-reason' }, w.disabledReason) : null,
        w.previousSecretUntil ? h('small', { class: 'hint wh-previous', 'data-previous-secret': w.id },
          'old secret also signs until ', when(w.previousSecretUntil),
          canWrite ? h('button', {
            type: 'button', class: 'small', 'data-end-previous': w.id,
            'aria-label': `Stop signing with the previous secret of the webhook to ${w.url}`,
            onclick: act(async () => {
              await patch('/api/webhooks', { projectId, webhookId: w.id, keepPreviousSecretSecs: 0 });
              toast('The previous secret no longer signs.', 'success');
              await loadWebhooks();
            }),
          }, 'End now') : null) : null);
    }

    function actionsCell(w) {
      return h('div', { class: 'row wh-actions' },
        h('button', {
          type: 'button', class: 'small', 'data-show-log': w.id, 'aria-label': `Delivery log of ${w.url}`,
          onclick: () => openLog(w),
        }, 'Deliveries'),
        canWrite ? h('button', {
          type: 'button', class: 'small', 'data-edit': w.id, 'aria-label': `Edit the webhook to ${w.url}`,
          onclick: act(() => editWebhook(w)),
        }, 'Edit') : null,
        canWrite ? h('button', {
          type: 'button', class: 'small', 'data-rotate': w.id, 'aria-label': `Rotate the signing secret of the webhook to ${w.url}`,
          onclick: act(async () => {
            if (!await confirmDialog(`Rotate the signing secret of the webhook to ${w.url}? Every delivery from now on is signed with a new secret, shown once. For a day the old secret's signature goes beside it in webhook-signature (Standard Webhooks receivers keep verifying); X-Fluxbase-Signature carries the new one only: give it to the receiver.`, { confirmLabel: 'Rotate secret' })) return;
            const answer = await patch('/api/webhooks', { projectId, webhookId: w.id, rotateSecret: true });
            await showSecret(answer, 'Signing secret rotated');
            await loadWebhooks();
          }),
        }, 'Rotate secret') : null,
        canWrite ? h('button', {
          type: 'button', class: 'small', 'data-toggle': w.id,
          'aria-label': `${w.enabled ? 'Disable' : 'Enable'} the webhook to ${w.url}`,
          onclick: act(async () => {
            const answer = await patch('/api/webhooks', { projectId, webhookId: w.id, enabled: !w.enabled });
            toast(`Webhook ${answer.webhook.enabled ? 'enabled' : 'disabled'}.`, 'success');
            await loadWebhooks();
          }),
        }, w.enabled ? 'Disable' : 'Enable') : null,
        canWrite ? h('button', {
          type: 'button', class: 'small danger', 'data-delete': w.id, 'aria-label': `Delete the webhook to ${w.url}`,
          onclick: act(async () => {
            if (!await confirmDialog(`Delete the webhook to ${w.url}? Its pending deliveries are dropped and no further change is sent to it.`, { confirmLabel: 'Delete webhook' })) return;
            await del('/api/webhooks', { projectId, webhookId: w.id });
            toast('Webhook deleted.', 'success');
            if (selected && selected.id === w.id) selected = null;
            await loadWebhooks();
          }),
        }, 'Delete') : null);
    }

    // ---- editing one (URL, events, tables; the secret stays) ----
    async function editWebhook(w) {
      const url = h('input', { type: 'url', name: 'url', required: true, value: w.url, autocomplete: 'off' });
      const boxes = EVENTS.map(([value, label]) => h('label', { class: 'wh-check' },
        h('input', { type: 'checkbox', name: 'events', value, checked: w.events.includes(value) }), ' ', label));
      const tables = h('input', { type: 'text', name: 'tables', value: (w.tables || []).join(', '), autocomplete: 'off' });
      const error = h('div', { class: 'form-error' });
      const read = () => ({
        url: url.value.trim(),
        events: boxes.map((b) => b.querySelector('input')).filter((i) => i.checked).map((i) => i.value),
        tables: tables.value.split(',').map((x) => x.trim()).filter(Boolean),
      });
      const choice = await dialog({
        title: 'Edit webhook',
        body: h('div', { class: 'wh-form', 'data-edit-form': w.id },
          field('Endpoint URL', url),
          h('fieldset', { class: 'wh-events-set' }, h('legend', {}, 'Events'), h('div', { class: 'wh-checks' }, boxes)),
          field('Tables', tables, w.tables
            ? 'Comma-separated table names. The API cannot widen a table filter back to every table: delete the webhook and register it again for that.'
            : 'Comma-separated table names; empty: every table.'),
          error),
        actions: [{ label: 'Cancel', value: null }, { label: 'Save', value: 'save', class: 'primary' }],
        validate: () => {
          const v = read();
          let problem = null;
          if (!url.checkValidity() || !v.url) problem = 'Enter the endpoint URL.';
          else if (!v.events.length) problem = 'Choose at least one event.';
          else if (!v.tables.length && w.tables) problem = 'The API cannot reset the table filter to every table: name at least one table, or delete the webhook and register it again.';
          mount(error, problem ? errorBox({ code: 'BAD_REQUEST', message: problem }) : null);
          return !problem;
        },
      });
      if (choice !== 'save') return;
      const v = read();
      const body = { projectId, webhookId: w.id, url: v.url, events: v.events };
      if (v.tables.length) body.tables = v.tables;
      await patch('/api/webhooks', body);
      toast('Webhook saved.', 'success');
      await loadWebhooks();
      if (selected && selected.id === w.id) openLog(selected);
    }

    // ---- creating one ----
    function createForm() {
      const url = h('input', { type: 'url', name: 'url', required: true, placeholder: 'https://example.com/hooks/fluxbase', autocomplete: 'off', class: 'grow' });
      const boxes = EVENTS.map(([value, label]) => h('label', { class: 'wh-check' },
        h('input', { type: 'checkbox', name: 'events', value, defaultChecked: value !== 'schema.changed', checked: value !== 'schema.changed' }), ' ', label, ' ', h('code', {}, value)));
      const tables = h('input', { type: 'text', name: 'tables', placeholder: 'orders, customers', autocomplete: 'off' });
      const secret = h('input', { type: 'text', name: 'secret', autocomplete: 'off', minLength: 16, maxLength: 256, class: 'mono' });
      const enabled = h('input', { type: 'checkbox', name: 'enabled', defaultChecked: true, checked: true });
      const error = h('div', { class: 'form-error' });
      const form = h('form', {
        class: 'wh-form', 'aria-label': 'Register a webhook',
        onsubmit: act(async () => {
          mount(error);
          const events = boxes.map((b) => b.querySelector('input')).filter((i) => i.checked).map((i) => i.value);
          if (!events.length) {
            mount(error, errorBox({ code: 'BAD_REQUEST', message: 'Choose at least one event.' }));
            return;
          }
          const tableList = tables.value.split(',').map((s) => s.trim()).filter(Boolean);
          const body = { projectId, url: url.value.trim(), events, enabled: enabled.checked };
          if (tableList.length) body.tables = tableList;
          if (secret.value) body.secret = secret.value;
          let answer;
          try {
            answer = await post('/api/webhooks', body);
          } catch (err) {
            mount(error, errorBox(err));
            return;
          }
          form.reset();
          await loadWebhooks();
          await showSecret(answer);
        }),
      },
      field('Endpoint URL', url, 'http or https. Fluxbase POSTs each matching committed change to it.'),
      h('fieldset', { class: 'wh-events-set' }, h('legend', {}, 'Events'), h('div', { class: 'wh-checks' }, boxes)),
      field('Tables', tables, 'Comma-separated table names; empty: every table.'),
      field('Signing secret (optional)', secret, '16 to 256 characters; empty: Fluxbase generates a whsec_ secret.'),
      h('label', { class: 'switch' }, enabled, 'Enabled'),
      error,
      h('div', { class: 'row' }, h('button', { type: 'submit', class: 'primary' }, 'Register webhook')));
      return form;
    }

    async function showSecret(answer, title = 'Webhook registered') {
      await dialog({
        title,
        body: h('div', { 'data-webhook-created': answer.webhook.id },
          h('p', {}, 'Each delivery is signed with this secret: ',
            h('code', {}, 'X-Fluxbase-Signature: sha256=<hex HMAC-SHA256 of the raw body>'),
            ' and the Standard Webhooks headers (webhook-id, webhook-timestamp, webhook-signature). Verify them in your receiver.'),
          secretBox(answer.secret, 'The signing secret')),
        actions: [{ label: 'Done', value: 'done', class: 'primary' }],
      });
    }

    // ---- the delivery log ----
    const statusSelect = h('select', {
      'data-status-filter': '',
      onchange: () => { statusFilter = statusSelect.value; loadLog(); },
    }, h('option', { value: '' }, 'All'), STATUSES.map((s) => h('option', { value: s }, s)));
    const autoBox = h('input', {
      type: 'checkbox', 'data-auto-refresh': '',
      onchange: () => schedule(),
    });
    const logTitle = h('h2', {}, 'Deliveries');
    const logBody = h('div', { 'data-deliveries': '' });
    const logUpdated = h('small', { class: 'hint', 'aria-live': 'polite' });
    mount(logPanel, logTitle,
      h('div', { class: 'row wh-log-tools' },
        field('Status', statusSelect),
        h('label', { class: 'switch' }, autoBox, `Refresh every ${AUTO_REFRESH_MS / 1000} s`),
        h('button', { type: 'button', 'data-refresh-log': '', onclick: act(() => loadLog()) }, 'Refresh'),
        h('button', { type: 'button', class: 'ghost', 'aria-label': 'Close the delivery log', onclick: () => { closeLog(); renderList(); } }, 'Close'),
        logUpdated),
      logBody);

    function openLog(w) {
      selected = w;
      logPanel.hidden = false;
      mount(logTitle, 'Deliveries to ', h('code', {}, w.url));
      logPanel.dataset.webhook = w.id;
      mount(logBody, h('p', { class: 'loading' }, 'Loading deliveries…'));
      renderList();
      loadLog();
      schedule();
      logPanel.scrollIntoView({ block: 'nearest' });
    }

    function closeLog() {
      selected = null;
      logPanel.hidden = true;
      delete logPanel.dataset.webhook;
      schedule();
    }

    function schedule() {
      clearInterval(timer);
      timer = null;
      if (!left && selected && autoBox.checked) timer = setInterval(() => loadLog(), AUTO_REFRESH_MS);
    }

    async function loadLog() {
      if (!selected) return;
      const seq = ++logSeq;
      const w = selected;
      logPanel.setAttribute('aria-busy', 'true');
      try {
        const answer = await get('/api/webhooks/deliveries', { projectId, webhookId: w.id, status: statusFilter || undefined });
        if (seq !== logSeq || left) return;
        renderLog(answer.deliveries);
        logUpdated.textContent = `Updated ${new Date().toLocaleTimeString()}`;
      } catch (err) {
        if (seq !== logSeq || left) return;
        mount(logBody, errorBox(err));
      } finally {
        if (seq === logSeq) logPanel.removeAttribute('aria-busy');
      }
    }

    function renderLog(deliveries) {
      const columns = [
        { key: 'id', label: 'Delivery', render: (d) => h('code', {}, d.id) },
        { key: 'eventType', label: 'Event', render: (d) => h('span', {}, d.eventType, h('small', { class: 'hint wh-sub' }, d.eventId)) },
        { key: 'status', label: 'Status', render: statusCell },
        { key: 'attempts', label: 'Attempts', render: (d) => String(d.attempts) },
        { key: 'responseStatus', label: 'Last response', render: responseCell },
        { key: 'createdAt', label: 'When', render: timesCell },
      ];
      if (canWrite) {
        columns.push({
          key: 'redeliver', label: 'Actions', render: (d) => h('button', {
            type: 'button', class: 'small', 'data-redeliver': d.id, 'aria-label': `Redeliver ${d.id}`,
            onclick: act(async () => {
              await post('/api/webhooks/redeliver', { projectId, deliveryId: d.id });
              toast(`Delivery ${d.id} queued again.`, 'success');
              await loadLog();
            }),
          }, 'Redeliver'),
        });
      }
      mount(logBody, dataTable(columns, deliveries, {
        caption: 'Newest first (up to 500)',
        empty: statusFilter
          ? `No ${statusFilter} deliveries for this webhook.`
          : 'No deliveries yet: each committed change matching its events and tables creates one.',
      }));
      for (const tr of logBody.querySelectorAll('tbody tr')) {
        const d = deliveries[tr.sectionRowIndex];
        tr.dataset.delivery = d.id;
        tr.dataset.status = d.status;
        tr.dataset.attempts = String(d.attempts);
      }
    }

    function statusCell(d) {
      // A pending delivery that has been tried already is waiting for its next attempt.
      const retrying = d.status === 'pending' && d.attempts > 0;
      const label = retrying ? 'retrying' : d.status;
      const cls = { delivered: 'ok', failed: 'bad', retrying: 'warn', pending: 'muted' }[label];
      return h('span', { class: `wh-status ${cls}`, 'data-shown-status': label }, label,
        d.lastError ? h('small', { class: 'hint wh-sub wh-error', title: d.lastError }, d.lastError) : null);
    }

    function responseCell(d) {
      if (d.responseStatus === null || d.responseStatus === undefined) return h('span', { class: 'muted' }, '—');
      const code = h('span', { class: d.responseStatus >= 200 && d.responseStatus < 300 ? 'ok' : 'bad' }, `HTTP ${d.responseStatus}`);
      if (!d.responseBody) return code;
      return h('details', { class: 'wh-body' }, h('summary', {}, code, ' body'), h('pre', {}, d.responseBody));
    }

    function timesCell(d) {
      let second = null;
      if (d.deliveredAt) second = `delivered ${when(d.deliveredAt)}`;
      else if (d.nextAttemptAt && d.status === 'pending') second = `next attempt ${when(d.nextAttemptAt)}`;
      return h('span', {}, `created ${when(d.createdAt)}`, second ? h('small', { class: 'hint wh-sub' }, second) : null);
    }

    mount(el,
      header('Webhooks', 'Fluxbase POSTs every committed change matching an endpoint\'s events and tables to it, signed with its secret, retried until it answers 2xx.',
        h('button', { type: 'button', 'data-refresh-webhooks': '', onclick: act(loadWebhooks) }, 'Refresh')),
      canWrite
        ? section('Register a webhook', createForm())
        : h('p', { class: 'panel muted', 'data-read-only': '' }, 'You are a viewer of this project: webhooks and their deliveries are read-only for you.'),
      section('Endpoints', listBox),
      logPanel);
    loadWebhooks();
    return () => {
      left = true;
      clearInterval(timer);
    };
  },
};
