// Storage: the project's buckets (create with the name rules, rename, public or private, limits,
// delete when empty) and a bucket's files in folders (the `/` of their names): breadcrumbs, a new
// folder as the prefix of the next upload, uploads with progress from a file input or dropped on
// the list, downloads and signed URLs (15 minutes), deletes. Viewers list and download only.

import { h, mount, field, header, section, errorBox, confirmDialog, formDialog, toast, act, when, copyText } from '../lib/dom.js';
import { get, post, patch, del, upload } from '../lib/api.js';

const NAME_RULE = /^[a-z0-9_-]{1,63}$/;
const NAME_HINT = 'Lowercase letters, digits, hyphens and underscores; 1 to 63 characters; unique in the project.';
const MIB = 1024 * 1024;

/** What is wrong with a bucket name (the guide's rules), or '' when nothing. */
function nameProblem(name) {
  if (!name) return 'A name is required.';
  if (name.length > 63) return `Too long: ${name.length} characters (at most 63).`;
  if (/[A-Z]/.test(name)) return 'Uppercase letters are not allowed: use lowercase.';
  if (!NAME_RULE.test(name)) return 'Only lowercase letters, digits, hyphens and underscores are allowed.';
  return '';
}

/** What is wrong with a folder name (one segment of a file's path), or ''. */
function folderProblem(name) {
  if (!name) return 'A name is required.';
  if (name.includes('/') || name.includes('\\')) return 'One folder at a time: no slash.';
  if (name === '.' || name === '..') return '"." and ".." are not folder names.';
  if (/[#\u0000-\u001f\u007f]/.test(name)) return 'No "#" or control characters.';
  if (/%2e|%2f/i.test(name)) return 'No percent-encoded dots or slashes.';
  return '';
}

function bytes(n) {
  if (n === null || n === undefined) return '—';
  if (n < 1024) return `${n} B`;
  const units = ['KiB', 'MiB', 'GiB', 'TiB'];
  let v = n / 1024;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i += 1; }
  return `${v < 10 ? v.toFixed(1) : Math.round(v)} ${units[i]}`;
}

const baseName = (name) => name.slice(name.lastIndexOf('/') + 1);

/** A download URL of this server as this page reaches it: the API builds its links from
 * public_url or the request's Host, which a reverse proxy may have rewritten. URLs of another
 * origin (an S3 backend's presigned ones) are left as they are. */
function ours(u) {
  try {
    const url = new URL(u, location.origin);
    return url.pathname.startsWith('/api/storage/') ? location.origin + url.pathname + url.search : u;
  } catch (_) {
    return u;
  }
}


/** The limit fields of a bucket (create and settings): max file size in MiB, allowed types. */
function limitFields(bucket) {
  const size = h('input', {
    type: 'number', name: 'maxFileSize', min: '0', step: 'any', inputMode: 'decimal', 'data-field': 'maxFileSize',
    value: bucket && bucket.maxFileSize ? String(+(bucket.maxFileSize / MIB).toFixed(3)) : '',
  });
  const types = h('input', {
    type: 'text', name: 'allowedMimeTypes', 'data-field': 'allowedMimeTypes', placeholder: 'image/*, application/pdf',
    value: bucket && bucket.allowedMimeTypes ? bucket.allowedMimeTypes.join(', ') : '',
  });
  return {
    nodes: [field('Max file size (MiB)', size, 'Empty: the server\'s limit only.'),
      field('Allowed types', types, 'Comma-separated MIME types, wildcards allowed. Empty: any type.')],
    maxFileSize: () => (size.value.trim() === '' ? null : Math.round(Number(size.value) * MIB)),
    allowedMimeTypes: () => {
      const list = types.value.split(',').map((s) => s.trim()).filter(Boolean);
      return list.length ? list : null;
    },
  };
}

/** Files per listing request: a folder of more shows a "Load more" button. */
const FILE_PAGE = 1000;

export default {
  id: 'storage',
  title: 'Storage',
  group: 'Storage',
  render(ctx, el) {
    const projectId = ctx.project.id;
    const can = ctx.can.write;
    const params = new URLSearchParams(location.search);
    const state = {
      buckets: null,
      totalSize: 0,
      bucket: params.get('bucket') || null, // the selected bucket's name
      prefix: params.get('path') || '', // '' or 'a/b/'
      files: null,
      filesError: null,
      folders: new Set(), // new, still empty folders (full prefixes)
      uploads: [], // {name, sent, total, state: 'uploading'|'done'|'failed', error}
      upsert: false, // uploads replace a file of the same name (upsert=true)
    };
    if (state.prefix && !state.prefix.endsWith('/')) state.prefix += '/';
    // Work under way on the files panel (uploads, reloads): shown as aria-busy.
    let busy = 0;
    function working(delta) {
      busy += delta;
      const panel = detailEl.querySelector('[data-files-of]');
      if (panel) panel.setAttribute('aria-busy', busy > 0 ? 'true' : 'false');
    }
    let alive = true;

    const bucketsEl = h('div', { class: 'storage-buckets' });
    const detailEl = h('div', { class: 'storage-detail' });
    mount(el,
      header('Storage', 'Files in buckets, private by default: downloads go through signed URLs valid 15 minutes; a public bucket\'s files also have a stable public URL.'),
      can ? null : h('p', { class: 'storage-readonly muted', 'data-readonly': '' }, 'You are a viewer: you can list and download files.'),
      h('div', { class: 'storage-layout' }, bucketsEl, detailEl));

    function remember() {
      const q = new URLSearchParams();
      if (state.bucket) q.set('bucket', state.bucket);
      if (state.bucket && state.prefix) q.set('path', state.prefix);
      const s = q.toString();
      history.replaceState(null, '', location.pathname + (s ? `?${s}` : ''));
    }

    const selected = () => (state.buckets || []).find((b) => b.name === state.bucket) || null;

    async function loadBuckets() {
      try {
        const a = await get('/api/storage/buckets', { projectId });
        if (!alive) return;
        state.buckets = a.buckets;
        state.totalSize = a.totalSize;
        if (state.bucket && !selected()) { state.bucket = null; state.prefix = ''; }
        if (!state.bucket && a.buckets.length) state.bucket = a.buckets[0].name;
        remember();
        drawBuckets();
      } catch (err) {
        if (!alive) return;
        mount(bucketsEl, section('Buckets', errorBox(err), h('button', { type: 'button', onclick: () => refresh() }, 'Retry')));
        mount(detailEl);
        throw err;
      }
    }

    /** Loads the current folder's files (names under state.prefix, subfolders included), a page
     * of FILE_PAGE at a time; `more` appends the next page. A bucket of any size costs one page. */
    async function loadFiles({ more = false } = {}) {
      const b = selected();
      if (!b) { state.files = null; state.filesOf = null; drawDetail(); return; }
      const of = `${b.id}/${state.prefix}`;
      if (state.filesOf !== of) {
        // Another bucket or folder: its list is loading. The same one again keeps its list meanwhile.
        state.files = null;
        state.filesOf = of;
      }
      state.filesError = null;
      working(+1);
      drawDetail();
      try {
        const after = more ? state.nextAfter : undefined;
        const a = await get('/api/storage/files', { projectId, bucketId: b.id, prefix: state.prefix || undefined, limit: FILE_PAGE, after });
        if (!alive || state.filesOf !== of) return;
        state.files = more ? [...(state.files || []), ...a.files] : a.files;
        state.nextAfter = a.truncated ? a.nextAfter : null;
      } catch (err) {
        if (!alive) return;
        state.filesError = err;
      } finally {
        working(-1);
      }
      drawDetail();
    }

    async function refresh() {
      mount(bucketsEl, section('Buckets', h('p', { class: 'loading', 'aria-busy': 'true' }, 'Loading buckets…')));
      try { await loadBuckets(); } catch (_) { return; }
      await loadFiles();
    }

    // ---- buckets ----
    function drawBuckets() {
      const list = state.buckets;
      mount(bucketsEl,
        section('Buckets',
          list.length
            ? h('ul', { class: 'bucket-list', 'aria-label': 'Buckets' }, list.map((b) => h('li', {},
              h('button', {
                type: 'button', class: 'bucket-item', 'data-bucket': b.name,
                'aria-current': b.name === state.bucket ? 'true' : undefined,
                onclick: () => {
                  if (b.name === state.bucket) return;
                  // New folders and finished uploads belong to the bucket being left.
                  state.bucket = b.name;
                  state.prefix = '';
                  state.folders.clear();
                  state.uploads = state.uploads.filter((u) => u.state === 'uploading');
                  remember();
                  drawBuckets();
                  loadFiles();
                },
              },
              h('span', { class: 'bucket-name' }, b.name),
              h('span', { class: `bucket-vis ${b.isPublic ? 'public' : 'private'}` }, b.isPublic ? 'public' : 'private'),
              h('span', { class: 'bucket-meta muted' }, `${b.fileCount} file${b.fileCount === 1 ? '' : 's'} · ${bytes(b.size)}`)))))
            : h('p', { class: 'empty', 'data-no-buckets': '' }, can ? 'No buckets yet: create one below.' : 'No buckets yet.'),
          list.length ? h('p', { class: 'muted storage-total' }, `Total: ${bytes(state.totalSize)}`) : null),
        can ? createForm() : null);
    }

    function createForm() {
      const name = h('input', { type: 'text', id: 'bucket-name', name: 'name', required: true, maxLength: 100, autocomplete: 'off', placeholder: 'profile-photos', 'data-field': 'bucketName', 'aria-describedby': 'bucket-name-rule' });
      const rule = h('small', { class: 'hint', id: 'bucket-name-rule', 'data-name-rule': '' }, NAME_HINT);
      const check = () => {
        const p = name.value ? nameProblem(name.value) : '';
        name.setAttribute('aria-invalid', p ? 'true' : 'false');
        rule.textContent = p ? `${p} ${NAME_HINT}` : NAME_HINT;
        rule.classList.toggle('bad', !!p);
      };
      name.addEventListener('input', check);
      const isPublic = h('input', { type: 'checkbox', name: 'isPublic', 'data-field': 'isPublic' });
      const limits = limitFields(null);
      const errors = h('div', { class: 'form-error', 'aria-live': 'polite' });
      const form = h('form', {
        class: 'storage-create', 'aria-label': 'Create a bucket', noValidate: true,
        onsubmit: act(async () => {
          mount(errors);
          // The server is the authority on names: a name the page flags is still sent, so its
          // answer (the rule, or a taken name) is what the user reads.
          const body = { projectId, name: name.value.trim(), isPublic: isPublic.checked };
          const max = limits.maxFileSize();
          const types = limits.allowedMimeTypes();
          if (max !== null) body.maxFileSize = max;
          if (types) body.allowedMimeTypes = types;
          try {
            const a = await post('/api/storage/buckets', body);
            toast(`Bucket "${a.bucket.name}" created.`, 'success');
            state.bucket = a.bucket.name;
            state.prefix = '';
            await loadBuckets();
            await loadFiles();
          } catch (err) {
            mount(errors, errorBox(err));
            name.focus();
          }
        }),
      },
      h('div', { class: 'field' }, h('label', { for: 'bucket-name' }, 'Name'), name, rule),
      h('label', { class: 'switch' }, isPublic, 'Public (files readable by anyone with the link)'),
      h('details', { class: 'storage-limits' }, h('summary', {}, 'Limits'), limits.nodes),
      errors,
      h('button', { type: 'submit', class: 'primary', 'data-create-bucket': '' }, 'Create bucket'));
      return section('New bucket', form);
    }

    async function bucketSettings(b) {
      const name = h('input', { type: 'text', name: 'name', required: true, value: b.name, 'data-field': 'bucketName' });
      name.addEventListener('input', () => {
        const p = nameProblem(name.value.trim());
        name.setAttribute('aria-invalid', p ? 'true' : 'false');
        name.setCustomValidity(p);
      });
      const isPublic = h('input', { type: 'checkbox', name: 'isPublic', checked: b.isPublic, 'data-field': 'isPublic' });
      const limits = limitFields(b);
      await formDialog({ className: 'storage-dialog',
        title: `Bucket ${b.name}`,
        submitLabel: 'Save',
        body: h('div', {},
          field('Name', name, `${NAME_HINT} Renaming changes no file key.`),
          h('label', { class: 'switch' }, isPublic, 'Public (files readable by anyone with the link)'),
          h('p', { class: 'hint' }, 'Private: downloads need a signed URL. Public: every file also has a stable public URL, which stops working when the bucket is made private again.'),
          limits.nodes),
        onSubmit: async () => {
          const body = { projectId, bucketId: b.id };
          const n = name.value.trim();
          if (n !== b.name) body.name = n;
          if (isPublic.checked !== b.isPublic) body.isPublic = isPublic.checked;
          const max = limits.maxFileSize();
          if (max !== (b.maxFileSize ?? null)) body.maxFileSize = max;
          const types = limits.allowedMimeTypes();
          if (JSON.stringify(types) !== JSON.stringify(b.allowedMimeTypes ?? null)) body.allowedMimeTypes = types;
          if (Object.keys(body).length === 2) return;
          const a = await patch('/api/storage/buckets', body);
          toast(`Bucket "${a.bucket.name}" saved.`, 'success');
          if (state.bucket === b.name) state.bucket = a.bucket.name;
          await loadBuckets();
          await loadFiles();
        },
      });
    }

    async function deleteBucket(b) {
      if (!await confirmDialog(`Delete the empty bucket "${b.name}"?`, { confirmLabel: 'Delete bucket' })) return;
      await del('/api/storage/buckets', { projectId, bucketId: b.id });
      toast(`Bucket "${b.name}" deleted.`, 'success');
      state.bucket = null;
      state.prefix = '';
      await loadBuckets();
      await loadFiles();
    }

    // ---- files ----
    function entries() {
      const files = state.files || [];
      const folders = new Set();
      const here = [];
      for (const f of files) {
        if (!f.name.startsWith(state.prefix)) continue;
        const rest = f.name.slice(state.prefix.length);
        const slash = rest.indexOf('/');
        if (slash >= 0) folders.add(rest.slice(0, slash));
        else here.push(f);
      }
      for (const p of state.folders) {
        if (p.startsWith(state.prefix) && p !== state.prefix) folders.add(p.slice(state.prefix.length).split('/')[0]);
      }
      return { folders: [...folders].sort(), files: here.sort((a, b) => a.name.localeCompare(b.name)) };
    }

    function go(prefix) {
      state.prefix = prefix;
      remember();
      loadFiles();
    }

    function breadcrumbs(b) {
      const parts = state.prefix.split('/').filter(Boolean);
      const crumbs = [{ label: b.name, prefix: '' }];
      parts.forEach((p, i) => crumbs.push({ label: p, prefix: `${parts.slice(0, i + 1).join('/')}/` }));
      return h('nav', { class: 'breadcrumbs', 'aria-label': 'Folder path' }, h('ol', {}, crumbs.map((c, i) => h('li', {},
        i === crumbs.length - 1
          ? h('span', { 'aria-current': 'location', 'data-crumb': c.prefix }, c.label)
          : h('button', { type: 'button', class: 'link', 'data-crumb': c.prefix, onclick: () => go(c.prefix) }, c.label)))));
    }

    function drawDetail() {
      const b = selected();
      if (!state.buckets) return mount(detailEl);
      if (!b) {
        return mount(detailEl, section('Files', h('p', { class: 'empty' },
          can ? 'Create a bucket to store files: its name is part of every upload (bucketId).' : 'This project has no bucket yet.')));
      }
      const limits = [];
      if (b.maxFileSize) limits.push(`max ${bytes(b.maxFileSize)} per file`);
      if (b.allowedMimeTypes && b.allowedMimeTypes.length) limits.push(`types: ${b.allowedMimeTypes.join(', ')}`);
      const tools = can ? h('div', { class: 'tools' },
        h('button', { type: 'button', 'data-bucket-settings': '', onclick: () => bucketSettings(b) }, 'Settings'),
        b.fileCount === 0
          ? h('button', { type: 'button', class: 'danger', 'data-delete-bucket': '', onclick: act(() => deleteBucket(b)) }, 'Delete bucket')
          : h('button', { type: 'button', class: 'danger', disabled: true, 'data-delete-bucket': '', 'aria-describedby': 'bucket-not-empty' }, 'Delete bucket')) : null;
      const head = h('div', { class: 'storage-head' },
        h('div', {},
          h('h2', {}, b.name, ' ', h('span', { class: `bucket-vis ${b.isPublic ? 'public' : 'private'}`, 'data-visibility': b.isPublic ? 'public' : 'private' }, b.isPublic ? 'public' : 'private')),
          h('p', { class: 'muted' }, `${b.fileCount} file${b.fileCount === 1 ? '' : 's'} · ${bytes(b.size)}`, limits.length ? ` · ${limits.join(' · ')}` : '', ` · created ${when(b.createdAt)}`),
          can && b.fileCount > 0 ? h('p', { class: 'hint', id: 'bucket-not-empty', 'data-not-empty': '' },
            `Only an empty bucket can be deleted: this one holds ${b.fileCount} file${b.fileCount === 1 ? '' : 's'} (in all its folders). Delete them first.`) : null),
        tools);
      mount(detailEl, h('section', { class: 'panel storage-files', 'aria-label': `Files of ${b.name}`, 'data-files-of': b.name, 'aria-busy': busy > 0 ? 'true' : 'false' },
        head, breadcrumbs(b), can ? uploadBar(b) : null, uploadsList(), fileList(b)));
      return undefined;
    }

    function uploadBar(b) {
      const input = h('input', {
        type: 'file', multiple: true, class: 'visually-hidden', 'data-upload-input': '',
        onchange: () => {
          const files = [...input.files];
          input.value = '';
          uploadAll(b, files);
        },
      });
      const upsert = h('input', { type: 'checkbox', 'data-upsert': '', checked: state.upsert, onchange: (e) => { state.upsert = e.target.checked; } });
      return h('div', { class: 'storage-toolbar' },
        h('label', { class: 'button primary upload-button' }, 'Upload files', input),
        h('button', { type: 'button', 'data-new-folder': '', onclick: () => newFolder() }, 'New folder'),
        h('label', { class: 'switch' }, upsert, 'Replace files of the same name'),
        h('span', { class: 'muted' }, `Into ${state.prefix ? `/${state.prefix}` : 'the bucket\'s root'} — or drop files on the list.`));
    }

    async function newFolder() {
      const name = h('input', { type: 'text', name: 'folder', required: true, autocomplete: 'off', 'data-field': 'folder' });
      await formDialog({ className: 'storage-dialog',
        title: 'New folder',
        submitLabel: 'Create folder',
        body: h('div', {}, field('Folder name', name, `In ${state.prefix ? `/${state.prefix}` : 'the bucket\'s root'}. A folder is the start of its files' names: it is kept once a file is uploaded into it.`)),
        onSubmit: async () => {
          const n = name.value.trim();
          const p = folderProblem(n);
          if (p) throw Object.assign(new Error(p), { code: 'INVALID_NAME' });
          const prefix = `${state.prefix}${n}/`;
          state.folders.add(prefix);
          go(prefix);
        },
      });
    }

    function uploadsList() {
      if (!state.uploads.length) return null;
      const done = state.uploads.every((u) => u.state !== 'uploading');
      return h('div', { class: 'uploads', role: 'group', 'aria-label': 'Uploads' },
        h('ul', {}, state.uploads.map((u) => h('li', { class: `upload ${u.state}`, 'data-upload': u.name, 'data-state': u.state },
          h('span', { class: 'upload-name' }, u.name),
          h('progress', { max: u.total || 1, value: u.state === 'done' ? (u.total || 1) : u.sent, 'aria-label': `Upload of ${u.name}`, 'data-progress': '' }),
          h('span', { class: 'upload-state' }, u.state === 'uploading' ? `${u.total ? Math.floor((100 * u.sent) / u.total) : 0}%`
            : u.state === 'done' ? 'Uploaded' : `${u.error.code}: ${u.error.message}`)))),
        done ? h('button', { type: 'button', class: 'small', 'data-clear-uploads': '', onclick: () => { state.uploads = []; drawDetail(); } }, 'Clear') : null);
    }

    async function uploadAll(b, files) {
      if (!files.length) return;
      working(+1);
      try {
        await uploadEach(b, files);
      } finally {
        working(-1);
      }
    }

    async function uploadEach(b, files) {
      const prefix = state.prefix;
      const items = files.map((f) => ({ name: prefix + f.name, file: f, sent: 0, total: f.size, state: 'uploading' }));
      state.uploads = state.uploads.filter((u) => u.state === 'uploading').concat(items);
      drawDetail();
      for (const it of items) {
        const form = new FormData();
        form.append('projectId', projectId);
        form.append('bucketId', b.id);
        if (prefix) form.append('path', prefix);
        if (state.upsert) form.append('upsert', 'true');
        form.append('file', it.file, it.file.name);
        try {
          await upload('/api/storage/upload', null, form, (sent, total) => {
            it.sent = sent;
            it.total = total;
            const p = detailEl.querySelector(`li[data-upload="${CSS.escape(it.name)}"]`);
            if (p) {
              p.querySelector('progress').max = total;
              p.querySelector('progress').value = sent;
              p.querySelector('.upload-state').textContent = `${Math.floor((100 * sent) / total)}%`;
            }
          });
          it.state = 'done';
        } catch (err) {
          it.state = 'failed';
          it.error = err;
          toast(`${it.name}: ${err.code}: ${err.message}`, 'error');
        }
        if (!alive) return;
        drawDetail();
      }
      state.folders.delete(prefix);
      try { await loadBuckets(); } catch (_) { return; }
      await loadFiles();
    }

    function fileList(b) {
      if (state.filesError) return h('div', {}, errorBox(state.filesError), h('button', { type: 'button', onclick: () => loadFiles() }, 'Retry'));
      if (!state.files) return h('p', { class: 'loading', 'aria-busy': 'true' }, 'Loading files…');
      const { folders, files } = entries();
      const zone = h('div', { class: 'dropzone', 'data-dropzone': '' });
      if (can) {
        let depth = 0;
        zone.addEventListener('dragenter', (e) => { e.preventDefault(); depth += 1; zone.classList.add('dragging'); });
        zone.addEventListener('dragover', (e) => { e.preventDefault(); if (e.dataTransfer) e.dataTransfer.dropEffect = 'copy'; });
        zone.addEventListener('dragleave', () => { depth -= 1; if (depth <= 0) { depth = 0; zone.classList.remove('dragging'); } });
        zone.addEventListener('drop', (e) => {
          e.preventDefault();
          depth = 0;
          zone.classList.remove('dragging');
          const dropped = e.dataTransfer ? [...e.dataTransfer.files] : [];
          uploadAll(b, dropped);
        });
      }
      if (!folders.length && !files.length) {
        return mount(zone, h('p', { class: 'empty', 'data-empty-folder': '' }, state.prefix
          ? `This folder is empty.${can ? ' Upload files into it (or drop them here): it exists once it holds a file.' : ''}`
          : `No files yet.${can ? ' Upload files or drop them here.' : ''}`));
      }
      const up = state.prefix ? state.prefix.slice(0, state.prefix.slice(0, -1).lastIndexOf('/') + 1) : null;
      const moreRow = state.nextAfter
        ? h('p', { class: 'muted', 'data-more-files': '' }, `Showing the first ${state.files.length} files of this folder. `,
          h('button', { type: 'button', class: 'small', onclick: act(() => loadFiles({ more: true })) }, 'Load more'))
        : null;
      return mount(zone, moreRow, h('div', { class: 'table-wrap' }, h('table', { class: 'grid storage-grid' },
        h('caption', { class: 'offscreen' }, `Files in ${b.name}/${state.prefix}`),
        h('thead', {}, h('tr', {}, ['Name', 'Size', 'Type', 'Updated', 'Actions'].map((c) => h('th', { scope: 'col' }, c)))),
        h('tbody', {},
          up !== null ? h('tr', { class: 'folder-row' }, h('td', { colSpan: 5 },
            h('button', { type: 'button', class: 'link', 'data-folder-up': '', onclick: () => go(up) }, '.. (up one folder)'))) : null,
          folders.map((f) => h('tr', { class: 'folder-row', 'data-folder': f },
            h('td', {}, h('button', { type: 'button', class: 'link folder', 'data-open-folder': f, onclick: () => go(`${state.prefix}${f}/`) }, `${f}/`)),
            h('td', {}, '—'), h('td', { class: 'muted' }, 'folder'), h('td', {}, '—'), h('td', {}))),
          files.map((f) => fileRow(b, f))))));
    }

    /** A signed URL for a file (fetched when asked for; valid 15 minutes). */
    async function signedUrl(f) {
      const a = await get('/api/storage/url', { projectId, s3Key: f.s3_key });
      return { ...a, url: ours(a.url) };
    }

    function fileRow(b, f) {
      const short = baseName(f.name);
      const link = h('a', {
        class: 'button small', download: short, href: b.isPublic && f.public_url ? ours(f.public_url) : '#', 'data-download': f.name,
        'aria-label': `Download ${short}`,
        onclick: async (e) => {
          if (b.isPublic && f.public_url) return; // a stable URL: the browser downloads it
          const exp = Number(link.dataset.expires || 0);
          if (link.dataset.ready === 'yes' && exp - Date.now() > 30_000) return; // a fresh signed URL
          e.preventDefault();
          try {
            const a = await signedUrl(f);
            link.href = a.url;
            link.dataset.expires = String(Date.parse(a.expiresAt));
            link.dataset.ready = 'yes';
            link.click();
          } catch (err) {
            toast(`${err.code || 'ERROR'}: ${err.message}`, 'error');
          }
        },
      }, 'Download');
      link.setAttribute('download', short);
      return h('tr', { 'data-file': f.name },
        h('td', {}, h('span', { class: 'file-name', title: f.name }, short)),
        h('td', {}, bytes(f.size)),
        h('td', {}, h('code', {}, f.content_type || '—')),
        h('td', {}, when(f.updated_at || f.created_at)),
        h('td', {}, h('div', { class: 'file-actions' },
          link,
          h('button', {
            type: 'button', class: 'small', 'data-copy-url': f.name, 'aria-label': `Copy a signed URL of ${short}`,
            onclick: act(async () => {
              const a = await signedUrl(f);
              const ok = await copyText(a.url);
              toast(ok ? `Signed URL of ${short} copied: valid until ${new Date(a.expiresAt).toLocaleTimeString()}.` : 'The clipboard refused the copy.', ok ? 'success' : 'error');
            }),
          }, 'Copy URL'),
          can ? h('button', {
            type: 'button', class: 'small danger', 'data-delete-file': f.name, 'aria-label': `Delete ${f.name}`,
            onclick: act(async () => {
              if (!await confirmDialog(`Delete "${f.name}" from ${b.name}? The file cannot be recovered.`, { confirmLabel: 'Delete file' })) return;
              await del('/api/storage/files', { projectId, s3Key: f.s3_key });
              toast(`Deleted ${f.name}.`, 'success');
              // Keep the folder the user is in, even once it is empty.
              if (state.prefix && !(state.files || []).some((x) => x !== f && x.name.startsWith(state.prefix))) state.folders.add(state.prefix);
              await loadBuckets();
              await loadFiles();
            }),
          }, 'Delete') : null)));
    }

    refresh();
    return () => { alive = false; };
  },
};
