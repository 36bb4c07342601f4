// Health: the project's change capture (GET /api/cdc/status: the stream's state, lag, last
// event, counters, and its replication slot) and the server's readiness (GET /ready: the control
// database, then the storage backend; GET /health: the process). Each value is explained in a
// sentence. Refreshed on demand and every 5 s while the view is open (the timer stops when the
// view is left). Read-only for every role: any member may read the CDC status.

import { h, mount, errorBox, header, when, act } from '../lib/dom.js';
import { get } from '../lib/api.js';

const EVERY_MS = 5000;

const STATES = {
  starting: ['warn', 'The stream is connecting to its replication slot; it starts streaming with the first change.'],
  streaming: ['ok', 'Every committed change is read from the write-ahead log and published to realtime and webhooks.'],
  reconnecting: ['warn', 'A transient error (a lost connection, PostgreSQL restarting): the stream retries with backoff; changes wait in the slot meanwhile.'],
  slot_lost: ['bad', 'The replication slot is gone: changes since then cannot be read. The operator must fix it (fluxbase doctor) and restart the server.'],
  failed: ['bad', 'A definite error stopped the stream (see the last error); retrying could not fix it. It starts again when the server restarts.'],
  stopped: ['bad', 'The stream is stopped; it starts again when the server restarts.'],
};

const WAL_STATUS = {
  reserved: 'the WAL the slot needs is within max_wal_size.',
  extended: 'the slot holds WAL beyond max_wal_size, still kept for it.',
  unreserved: 'the slot\'s WAL is about to be removed: the stream is far behind.',
  lost: 'WAL the slot needs was removed: the slot cannot be used any more.',
};

function bytes(n) {
  if (n === null || n === undefined) return '—';
  if (n < 1024) return `${n} B`;
  const units = ['KiB', 'MiB', 'GiB', 'TiB'];
  let v = n;
  let i = -1;
  do { v /= 1024; i += 1; } while (v >= 1024 && i < units.length - 1);
  return `${v.toFixed(v < 10 ? 1 : 0)} ${units[i]}`;
}

function seconds(s) {
  if (s === null || s === undefined) return '—';
  if (s < 1) return `${Math.round(s * 1000)} ms`;
  if (s < 120) return `${s.toFixed(1)} s`;
  return `${Math.round(s / 60)} min`;
}

function ago(iso) {
  if (!iso) return null;
  const s = (Date.now() - Date.parse(iso)) / 1000;
  if (!Number.isFinite(s)) return null;
  if (s < 5) return 'just now';
  if (s < 120) return `${Math.round(s)} s ago`;
  if (s < 7200) return `${Math.round(s / 60)} min ago`;
  return `${Math.round(s / 3600)} h ago`;
}

/** One explained value: the label, the value (its raw form in data-value), a sentence. */
function item(name, label, shown, raw, explanation, cls) {
  return h('div', { class: 'hl-item' },
    h('dt', {}, label),
    h('dd', { 'data-field': name, 'data-value': raw === null || raw === undefined ? '' : String(raw) },
      h('span', { class: `hl-value ${cls || ''}` }, shown),
      h('small', { class: 'hint hl-why' }, explanation)));
}

export default {
  id: 'health',
  title: 'Health',
  group: 'Operations',
  render(ctx, el) {
    const projectId = ctx.project.id;
    let timer = null;
    let busy = false;
    let left = false;

    const serverBox = h('div', { 'data-server': '' }, h('p', { class: 'loading' }, 'Loading…'));
    const cdcBox = h('div', { 'data-cdc': '' }, h('p', { class: 'loading' }, 'Loading…'));
    const slotBox = h('div', { 'data-slot': '' });
    const updated = h('small', { class: 'hint', 'data-updated': '' });
    const auto = h('input', { type: 'checkbox', checked: true, 'data-auto-refresh': '', onchange: () => schedule() });

    async function load() {
      if (busy || left) return;
      busy = true;
      el.setAttribute('aria-busy', 'true');
      try {
        const [cdc, ready, alive] = await Promise.all([
          get('/api/cdc/status', { projectId }).then((v) => ({ ok: v }), (err) => ({ err })),
          get('/ready').then((v) => ({ ok: v }), (err) => ({ err })),
          get('/health').then((v) => ({ ok: v }), (err) => ({ err })),
        ]);
        if (left) return;
        renderServer(ready, alive);
        renderCdc(cdc);
        updated.textContent = `Updated ${new Date().toLocaleTimeString()}`;
      } finally {
        busy = false;
        el.removeAttribute('aria-busy');
      }
    }

    function renderServer(ready, alive) {
      let db; let storage;
      if (ready.ok) {
        db = ['ok', 'reachable', 'The control database (accounts, projects, keys, webhook outbox) answered a query.'];
        storage = ['ok', 'usable', 'The storage backend (local disk or S3) accepted a check: uploads and downloads work.'];
      } else if (ready.err.code === 'DATABASE_CONNECTION_ERROR') {
        db = ['bad', 'unreachable', 'The control database did not answer: every API call fails with 503 until it is back (the server reconnects by itself).'];
        storage = ['muted', 'not checked', 'Checked once the control database answers.'];
      } else if (ready.err.code === 'STORAGE_UNAVAILABLE') {
        db = ['ok', 'reachable', 'The control database answered a query.'];
        storage = ['bad', 'unavailable', 'The storage backend cannot be used: file uploads and downloads fail. The server\'s log says why.'];
      } else {
        db = ['muted', 'unknown', 'The readiness check could not be read.'];
        storage = ['muted', 'unknown', 'The readiness check could not be read.'];
      }
      const readyState = ready.ok ? 'ready' : 'not ready';
      mount(serverBox,
        h('dl', { class: 'hl-list' },
          item('ready', 'Readiness (GET /ready)', readyState, ready.ok ? ready.ok.status : ready.err.code,
            'Ready when the control database answers and the storage backend is usable; load balancers route to a ready server only.',
            ready.ok ? 'ok' : 'bad'),
          item('controlDb', 'Control database', db[1], db[1], db[2], db[0]),
          item('storage', 'Storage backend', storage[1], storage[1], storage[2], storage[0]),
          item('process', 'Process (GET /health)', alive.ok ? alive.ok.status : 'not answering', alive.ok ? alive.ok.status : alive.err.code,
            'The server process answers HTTP.', alive.ok ? 'ok' : 'bad')),
        ready.err ? errorBox(ready.err) : null);
    }

    function renderCdc(cdc) {
      if (cdc.err) {
        mount(cdcBox, errorBox(cdc.err));
        mount(slotBox);
        return;
      }
      const s = cdc.ok.stream;
      const [cls, meaning] = STATES[s.state] || ['muted', 'An unknown state.'];
      const since = ago(s.lastEventAt);
      mount(cdcBox,
        h('p', { class: 'hl-state' },
          h('span', { class: `hl-badge ${cls}`, 'data-cdc-state': s.state }, s.state.replace('_', ' ')),
          ' ', h('span', {}, meaning)),
        s.lastError ? errorBox({ code: 'LAST_ERROR', message: s.lastError }) : null,
        h('dl', { class: 'hl-list' },
          item('lagBytes', 'Lag (bytes)', bytes(s.lagBytes), s.lagBytes,
            'This project\'s own changes the stream has received but not stored yet (its newest transaction\'s position minus the stored one); 0 when it keeps up. Other projects\' writes are never counted here.'),
          item('lagSeconds', 'Lag (time)', seconds(s.lagSeconds), s.lagSeconds,
            'How long the last transaction took from its commit to being published; — until the first one.'),
          item('lastEventAt', 'Last event', s.lastEventAt ? [when(s.lastEventAt), since ? h('span', { class: 'muted' }, ` (${since})`) : null] : '—', s.lastEventAt,
            'When the newest change was published; — while no change has been seen since the stream started.'),
          item('events', 'Events', String(s.events), s.events,
            'Changes published since the stream started: row changes, schema changes, broadcasts from SQL.'),
          item('transactions', 'Transactions', String(s.transactions), s.transactions,
            'Committed transactions those changes came in.'),
          item('reconnects', 'Reconnects', String(s.reconnects), s.reconnects,
            'Times the stream lost its connection and resumed from its slot (nothing is lost).', s.reconnects ? 'warn' : ''),
          item('buffered', 'Buffered', `${bytes(s.bufferedBytes)} (peak ${bytes(s.peakBufferedBytes)})`, s.bufferedBytes,
            'Memory held for open transactions; past 16 MiB per transaction the rest spills to disk.'),
          item('spilledBytes', 'Spilled to disk', bytes(s.spilledBytes), s.spilledBytes,
            'Bytes of large transactions written to spill files rather than kept in memory.'),
          item('rejectedMessages', 'Rejected messages', String(s.rejectedMessages), s.rejectedMessages,
            'Messages in the WAL claiming to be Fluxbase\'s own without its signature: dropped (a sign of forgery attempts).', s.rejectedMessages ? 'warn' : ''),
          item('lsn', 'Positions (LSN)', h('code', {}, `confirmed ${s.confirmedLsn || '—'} · received ${s.receivedLsn || '—'}`), s.confirmedLsn,
            'The end of this project\'s newest transaction the stream received, and how far of it is stored; — until the stream has received one since it started.')));
      const slot = cdc.ok.slot;
      if (slot.missing) {
        mount(slotBox, h('dl', { class: 'hl-list' },
          item('slotName', 'Slot', h('code', {}, slot.name), slot.name, 'The replication slot this project\'s stream reads.'),
          item('slotMissing', 'State', 'missing', 'missing', 'The slot does not exist in PostgreSQL: changes cannot be captured until the operator recreates it (fluxbase doctor).', 'bad')));
      } else {
        mount(slotBox, h('dl', { class: 'hl-list' },
          item('slotName', 'Slot', h('code', {}, slot.name), slot.name, 'The replication slot this project\'s stream reads; PostgreSQL keeps the WAL it still needs.'),
          item('walStatus', 'WAL status', slot.walStatus || '—', slot.walStatus,
            slot.walStatus && WAL_STATUS[slot.walStatus] ? `From pg_replication_slots: ${WAL_STATUS[slot.walStatus]}` : 'From pg_replication_slots.',
            slot.walStatus === 'lost' ? 'bad' : slot.walStatus === 'unreserved' ? 'warn' : 'ok'),
          item('slotActive', 'Active', slot.active ? 'yes' : 'no', slot.active,
            slot.active ? 'A WAL sender is reading the slot right now.' : 'No WAL sender is reading it at this moment (normal before the first change).')));
      }
    }

    function schedule() {
      clearInterval(timer);
      timer = null;
      if (!left && auto.checked) timer = setInterval(load, EVERY_MS);
    }

    mount(el,
      header('Health', 'Whether this project\'s changes are being captured, and whether the server is ready.',
        h('label', { class: 'switch hl-auto' }, auto, `Refresh every ${EVERY_MS / 1000} s`),
        h('button', { type: 'button', 'data-refresh': '', onclick: act(load) }, 'Refresh')),
      h('p', { class: 'hl-updated' }, updated),
      h('section', { class: 'panel', 'aria-labelledby': 'hl-cdc-title' },
        h('h2', { id: 'hl-cdc-title' }, 'Change capture'),
        h('p', { class: 'muted' }, 'A logical replication stream reads every committed change of this project\'s database and feeds the Realtime Inspector, subscribers and webhooks (GET /api/cdc/status).'),
        cdcBox),
      h('section', { class: 'panel', 'aria-labelledby': 'hl-slot-title' },
        h('h2', { id: 'hl-slot-title' }, 'Replication slot'),
        slotBox),
      h('section', { class: 'panel', 'aria-labelledby': 'hl-server-title' },
        h('h2', { id: 'hl-server-title' }, 'Server'),
        serverBox));
    load();
    schedule();
    return () => {
      left = true;
      clearInterval(timer);
      timer = null;
    };
  },
};
