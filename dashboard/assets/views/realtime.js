// Realtime Inspector: watches the project's room live. The page mints a short-lived realtime
// token with the member's session (POST /api/realtime/token; kept in memory only, a new one for
// every connection), opens a WebSocket to the server and subscribes to `project_<id>`; it shows
// db_event, schema_update and broadcast messages newest first (the last 500 kept), each
// expandable to its JSON, filtered by type, table and operation, with pause, clear and the
// connection's state. Developers and admins send broadcasts (POST /api/realtime/broadcast).
// A lost connection is re-opened with a fresh token and resumes after the last event seen.
// No API key is ever used or shown here.

import { h, mount, field, errorBox, header, section, act } from '../lib/dom.js';
import { post } from '../lib/api.js';

const CAP = 500;
const TOKEN_SECONDS = 600;
const PING_MS = 25_000;
const BACKOFF_MS = [1000, 2000, 5000, 10_000, 30_000];
const TYPES = [['db_event', 'Row changes (db_event)'], ['schema_update', 'Schema changes (schema_update)'], ['broadcast', 'Broadcasts'], ['error', 'Errors']];
const OPERATIONS = ['INSERT', 'UPDATE', 'DELETE'];
const STATE_TEXT = {
  connecting: 'Connecting…',
  subscribed: 'Subscribed: live',
  reconnecting: 'Connection lost: reconnecting…',
  closed: 'Disconnected',
  failed: 'Could not connect',
};

export default {
  id: 'realtime',
  title: 'Realtime Inspector',
  group: 'Integrations',
  render(ctx, el) {
    const projectId = ctx.project.id;
    const roomId = `project_${projectId}`;
    let ws = null;
    let left = false;
    let wanted = true; // false after the user disconnects
    let attempt = 0;
    let reconnectTimer = null;
    let pingTimer = null;
    let lastEventId = null; // the newest db_event / schema_update id: a reconnect resumes after it
    const seen = new Set(); // ids already listed (a resume may replay some)
    let seq = 0;
    let messages = []; // newest first: {n, at, msg, node}
    let paused = false;
    let missed = 0;
    const tables = new Set();

    // ---- connection ----
    const stateBox = h('span', { class: 'rt-state', 'data-conn-state': 'connecting', role: 'status', 'aria-live': 'polite' });
    const connError = h('div', { class: 'rt-conn-error' });
    const connectButton = h('button', { type: 'button', 'data-connect': '', onclick: () => toggleConnection() }, 'Disconnect');

    function setState(state, detail) {
      stateBox.dataset.connState = state;
      mount(stateBox, h('span', { class: 'rt-dot', 'aria-hidden': 'true' }), STATE_TEXT[state], detail ? h('span', { class: 'muted' }, ` ${detail}`) : null);
      connectButton.textContent = state === 'closed' || state === 'failed' ? 'Connect' : 'Disconnect';
    }

    function toggleConnection() {
      if (ws || reconnectTimer) {
        wanted = false;
        shutdown();
        setState('closed', '(by you)');
      } else {
        wanted = true;
        attempt = 0;
        connect();
      }
    }

    async function connect() {
      clearTimeout(reconnectTimer);
      reconnectTimer = null;
      if (left || !wanted) return;
      setState(attempt ? 'reconnecting' : 'connecting');
      let token;
      try {
        // A fresh short-lived token for every connection, never stored.
        token = (await post('/api/realtime/token', { projectId, expiresIn: TOKEN_SECONDS })).token;
      } catch (err) {
        if (left) return;
        mount(connError, errorBox(err));
        if (err.status >= 400 && err.status < 500 && err.status !== 429) {
          setState('failed');
          return;
        }
        retryLater();
        return;
      }
      if (left || !wanted) return;
      const socket = new WebSocket(`${ctx.wsUrl}/realtime`);
      ws = socket;
      socket.onopen = () => {
        const subscribe = { type: 'subscribe', roomId, token };
        if (lastEventId) subscribe.since = lastEventId;
        socket.send(JSON.stringify(subscribe));
        token = null;
      };
      socket.onmessage = (e) => {
        let msg;
        try { msg = JSON.parse(e.data); } catch (_) { return; }
        onMessage(socket, msg);
      };
      socket.onclose = (e) => {
        if (ws !== socket) return;
        ws = null;
        clearInterval(pingTimer);
        if (left) return;
        if (!wanted) { setState('closed', '(by you)'); return; }
        setState('reconnecting', e.code ? `(closed with ${e.code}${e.reason ? `: ${e.reason}` : ''})` : '');
        retryLater();
      };
    }

    function retryLater() {
      if (left || !wanted) return;
      const wait = BACKOFF_MS[Math.min(attempt, BACKOFF_MS.length - 1)];
      attempt += 1;
      setState('reconnecting', `(next try in ${Math.round(wait / 1000)} s)`);
      reconnectTimer = setTimeout(connect, wait);
    }

    function onMessage(socket, msg) {
      if (msg.type === 'subscribed') {
        attempt = 0;
        mount(connError);
        setState('subscribed', `to ${msg.roomId}`);
        clearInterval(pingTimer);
        pingTimer = setInterval(() => { if (socket.readyState === WebSocket.OPEN) socket.send('{"type":"ping"}'); }, PING_MS);
        return;
      }
      if (msg.type === 'pong' || msg.type === 'unsubscribed') return;
      if (msg.type === 'error') {
        record(msg);
        if (msg.code === 'RESUME_TOO_OLD') {
          // The history no longer holds the last event seen: start from now.
          lastEventId = null;
          socket.close(1000);
          return;
        }
        if (['TOKEN_EXPIRED', 'ACCESS_REVOKED'].includes(msg.code)) {
          // A new token (it follows the member's current role) and a new subscription.
          socket.close(1000);
          return;
        }
        mount(connError, errorBox(msg));
        return;
      }
      if ((msg.type === 'db_event' || msg.type === 'schema_update') && msg.payload && msg.payload.id) lastEventId = msg.payload.id;
      record(msg);
    }

    function shutdown() {
      clearTimeout(reconnectTimer);
      reconnectTimer = null;
      clearInterval(pingTimer);
      const socket = ws;
      ws = null;
      if (!socket) return;
      // Closing a socket still connecting makes the browser log an error: close it once open.
      if (socket.readyState === WebSocket.CONNECTING) socket.onopen = () => socket.close(1000, 'left');
      else if (socket.readyState === WebSocket.OPEN) socket.close(1000, 'left');
    }

    // ---- the messages ----
    const typeFilter = h('select', { 'data-filter-type': '', onchange: () => redraw() },
      h('option', { value: '' }, 'All types'), TYPES.map(([v, label]) => h('option', { value: v }, label)));
    const tableList = h('datalist', { id: 'rt-tables' });
    const tableFilter = h('input', { type: 'search', 'data-filter-table': '', placeholder: 'any table', autocomplete: 'off', oninput: () => redraw() });
    tableFilter.setAttribute('list', 'rt-tables');
    const opFilter = h('select', { 'data-filter-op': '', onchange: () => redraw() },
      h('option', { value: '' }, 'Any operation'), OPERATIONS.map((o) => h('option', { value: o }, o)));
    const pauseButton = h('button', { type: 'button', 'data-pause': '', 'aria-pressed': 'false', onclick: () => setPaused(!paused) }, 'Pause');
    const clearButton = h('button', { type: 'button', 'data-clear': '', onclick: () => { messages = []; seen.clear(); missed = 0; redraw(); } }, 'Clear');
    const counter = h('p', { class: 'muted rt-counter', 'data-counter': '', 'aria-live': 'polite' });
    const list = h('ol', { class: 'rt-list', 'data-messages': '', reversed: true, 'aria-label': 'Messages, newest first' });
    const empty = h('p', { class: 'empty', 'data-empty': '' });

    function tableOf(msg) {
      return msg.payload && typeof msg.payload === 'object' && typeof msg.payload.table === 'string' ? msg.payload.table : null;
    }
    function opOf(msg) {
      if (msg.type === 'db_event') return msg.payload.operation;
      if (msg.type === 'schema_update') return msg.payload.command;
      return null;
    }

    function record(msg) {
      const id = msg.type === 'broadcast' ? msg.id : msg.payload && msg.payload.id;
      if (id && msg.type !== 'error') {
        if (seen.has(id)) return;
        seen.add(id);
      }
      const entry = { n: ++seq, at: new Date(), msg, node: null };
      messages.unshift(entry);
      const table = tableOf(msg);
      if (table && !tables.has(table)) {
        tables.add(table);
        tableList.append(h('option', { value: table }));
      }
      if (messages.length > CAP) {
        for (const old of messages.splice(CAP)) {
          if (old.node) old.node.remove();
          const oldId = old.msg.type === 'broadcast' ? old.msg.id : old.msg.payload && old.msg.payload.id;
          if (oldId) seen.delete(oldId);
        }
      }
      if (paused) {
        missed += 1;
        updateCounter();
        return;
      }
      if (matches(msg)) list.prepend(entry.node = messageNode(entry));
      updateCounter();
    }

    function matches(msg) {
      if (typeFilter.value && msg.type !== typeFilter.value) return false;
      const table = tableFilter.value.trim();
      if (table && tableOf(msg) !== table) return false;
      if (opFilter.value && !(msg.type === 'db_event' && msg.payload.operation === opFilter.value)) return false;
      return true;
    }

    function redraw() {
      const shown = [];
      for (const e of messages) {
        if (matches(e.msg)) {
          if (!e.node) e.node = messageNode(e);
          shown.push(e.node);
        }
      }
      list.replaceChildren(...shown);
      updateCounter();
    }

    function updateCounter() {
      const shown = list.childElementCount;
      counter.textContent = `${shown} shown of ${messages.length} kept (the newest ${CAP})${paused ? ` · paused: ${missed} new not shown` : ''}`;
      empty.hidden = shown > 0;
      empty.textContent = messages.length
        ? 'No message matches the filters.'
        : (ctx.can.write
          ? 'Nothing yet: change a row (SQL Editor, Table Editor or your app) or send a broadcast below, and it shows up here.'
          : 'Nothing yet: changes to this project\'s rows and schema show up here as they are committed.');
    }

    function setPaused(p) {
      paused = p;
      pauseButton.setAttribute('aria-pressed', String(p));
      pauseButton.textContent = p ? 'Resume' : 'Pause';
      if (!p) {
        missed = 0;
        redraw();
      } else updateCounter();
    }

    function messageNode(entry) {
      const { msg } = entry;
      const table = tableOf(msg);
      const op = opOf(msg);
      let what;
      if (msg.type === 'db_event') what = [h('span', { class: `rt-op rt-op-${String(op).toLowerCase()}` }, op), ' ', h('code', {}, `${msg.payload.schema}.${table}`)];
      else if (msg.type === 'schema_update') what = [h('span', { class: 'rt-op' }, op), ' ', h('code', {}, msg.payload.object || table || '')];
      else if (msg.type === 'broadcast') {
        const preview = JSON.stringify(msg.payload) ?? '';
        what = [h('code', {}, msg.event), ' ', h('span', { class: 'muted rt-preview' }, preview.length > 120 ? `${preview.slice(0, 120)}…` : preview)];
      }
      else if (msg.type === 'error') what = [h('strong', {}, msg.code), ' ', msg.message];
      else what = [];
      const details = h('details', {
        class: `rt-msg rt-${msg.type}`, 'data-type': msg.type, 'data-table': table || undefined, 'data-op': op || undefined,
        'data-id': (msg.type === 'broadcast' ? msg.id : msg.payload && msg.payload.id) || undefined,
      },
      h('summary', {},
        h('time', { class: 'rt-time', dateTime: entry.at.toISOString() }, entry.at.toLocaleTimeString()),
        h('span', { class: 'rt-type' }, msg.type),
        h('span', { class: 'rt-what' }, what)),
      h('pre', { class: 'rt-json' }, JSON.stringify(msg, null, 2)));
      return h('li', {}, details);
    }

    // ---- broadcasting ----
    function broadcastForm() {
      const event = h('input', { type: 'text', name: 'event', required: true, maxLength: 200, placeholder: 'cursor-moved', autocomplete: 'off' });
      const payload = h('textarea', { name: 'payload', class: 'code rt-payload', spellcheck: false, value: '{\n  "hello": "world"\n}' });
      const result = h('div', { class: 'rt-sent', 'aria-live': 'polite' });
      return h('form', {
        class: 'rt-send', 'aria-label': 'Send a broadcast',
        onsubmit: act(async () => {
          mount(result);
          let body;
          try {
            body = JSON.parse(payload.value);
          } catch (err) {
            mount(result, errorBox({ code: 'BAD_JSON', message: `The payload is not JSON: ${err.message}` }));
            return;
          }
          try {
            const answer = await post('/api/realtime/broadcast', { projectId, event: event.value, payload: body });
            mount(result, h('p', { class: 'ok', 'data-delivered': String(answer.delivered) },
              `Sent "${event.value}" to ${answer.delivered} subscribed socket${answer.delivered === 1 ? '' : 's'}.`));
          } catch (err) {
            mount(result, errorBox(err));
          }
        }),
      },
      h('div', { class: 'rt-broadcast-fields' },
        field('Event', event, '1 to 200 characters.'),
        field('Payload (JSON)', payload)),
      h('div', { class: 'row' }, h('button', { type: 'submit', class: 'primary' }, 'Send broadcast')),
      result);
    }

    mount(el,
      header('Realtime Inspector', `Live messages of the room ${roomId}: row changes, schema changes and broadcasts as subscribers receive them (as you: row-level security applies).`),
      h('section', { class: 'panel rt-conn', 'aria-label': 'Connection' },
        h('div', { class: 'row' }, stateBox, h('div', { class: 'spacer' }), connectButton),
        connError),
      h('section', { class: 'panel', 'aria-label': 'Messages' },
        h('div', { class: 'rt-tools' },
          field('Type', typeFilter), field('Table', tableFilter), tableList, field('Operation', opFilter),
          h('div', { class: 'row rt-buttons' }, pauseButton, clearButton)),
        counter, empty, list),
      ctx.can.write
        ? section('Send a broadcast', h('p', { class: 'muted' }, 'Every socket subscribed to this project\'s room receives it (this page too).'), broadcastForm())
        : h('p', { class: 'panel muted', 'data-read-only': '' }, 'You are a viewer of this project: you can watch, but sending broadcasts needs a developer or an admin.'));
    setState('connecting');
    updateCounter();
    connect();

    return () => {
      left = true;
      shutdown();
    };
  },
};
