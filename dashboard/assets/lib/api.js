// The dashboard's only way to the server: the public REST API, authenticated with the user's
// session token. The token lives in sessionStorage (this tab only, gone when it closes) and goes
// out as `Authorization: Bearer`; the API reads no cookie, so no other site can make the browser
// act for the user (see docs/dashboard.md). API keys are never stored: a new key's secret is
// shown once and dropped.

const SESSION = 'fluxbase.session';

/** The signed-in user's session: {token, user, expiresAt} or null. */
export function session() {
  try {
    const s = JSON.parse(sessionStorage.getItem(SESSION) || 'null');
    if (!s || !s.token) return null;
    if (s.expiresAt && Date.parse(s.expiresAt) <= Date.now()) {
      sessionStorage.removeItem(SESSION);
      return null;
    }
    return s;
  } catch (_) {
    return null;
  }
}

export function setSession(answer) {
  sessionStorage.setItem(SESSION, JSON.stringify({ token: answer.token, user: answer.user, expiresAt: answer.expiresAt }));
}

/** Forgets the session and everything the dashboard kept for it in this tab (the SQL
 * Editor's history). */
export function clearSession() {
  for (const k of Object.keys(sessionStorage)) if (k.startsWith('fluxbase.')) sessionStorage.removeItem(k);
}

/** An error in the guide's shape: status, code, message, details. */
export class ApiError extends Error {
  constructor(status, body) {
    const e = (body && body.error) || {};
    super(e.message || `HTTP ${status}`);
    this.status = status;
    this.code = e.code || `HTTP_${status}`;
    this.details = e.details;
    this.body = body;
  }
}

/** Called when the session is refused (expired, logged out elsewhere): set by the app. */
let onSignedOut = () => {};
export function whenSignedOut(f) { onSignedOut = f; }

function url(path, query) {
  const u = new URL(path, location.origin);
  for (const [k, v] of Object.entries(query || {})) if (v !== undefined && v !== null) u.searchParams.set(k, v);
  return u.pathname + u.search;
}

/** Calls the API; resolves with the JSON answer, rejects with an ApiError (a `success: false`
 * answer, such as a SQL error's HTTP 200, is an error too). */
export async function api(method, path, { query, body, signal, headers } = {}) {
  const s = session();
  const h = { Accept: 'application/json', ...(headers || {}) };
  if (s) h.Authorization = `Bearer ${s.token}`;
  let payload;
  if (body !== undefined) {
    h['Content-Type'] = 'application/json';
    payload = JSON.stringify(body);
  }
  let res;
  for (let attempt = 0; ; attempt += 1) {
    try {
      res = await fetch(url(path, query), { method, headers: h, body: payload, signal, credentials: 'omit', cache: 'no-store' });
    } catch (e) {
      if (e.name === 'AbortError') throw e;
      throw new ApiError(0, { error: { code: 'NETWORK_ERROR', message: `The server could not be reached (${e.message}).` } });
    }
    // A 429 was refused before anything ran (the request limit, a busy pool): wait as told and
    // send it again, twice at most, rather than fail a view on a burst of its own requests.
    const wait = retryAfter(res);
    if (res.status !== 429 || attempt >= 2 || wait === null) break;
    await sleep(wait, signal);
  }
  let json = null;
  const text = await res.text();
  try { json = text ? JSON.parse(text) : null; } catch (_) { json = null; }
  if (!res.ok || (json && json.success === false)) {
    const err = new ApiError(res.status, json || { error: { message: text.slice(0, 200) || `HTTP ${res.status}` } });
    if (res.status === 401 && s && (err.code === 'AUTH_REQUIRED' || err.code === 'TOKEN_EXPIRED')) {
      clearSession();
      onSignedOut(err);
    }
    throw err;
  }
  return json;
}

/** Seconds a 429 asks to wait (at most 10), or null. */
function retryAfter(res) {
  const v = Number(res.headers ? res.headers.get('retry-after') : null);
  return res.status === 429 && Number.isFinite(v) && v >= 0 && v <= 10 ? v : null;
}

function sleep(seconds, signal) {
  return new Promise((resolve, reject) => {
    const t = setTimeout(resolve, seconds * 1000);
    if (signal) signal.addEventListener('abort', () => { clearTimeout(t); reject(new DOMException('aborted', 'AbortError')); }, { once: true });
  });
}

export const get = (path, query, opts) => api('GET', path, { ...opts, query });
export const post = (path, body, opts) => api('POST', path, { ...opts, body });
export const patch = (path, body, opts) => api('PATCH', path, { ...opts, body });
export const del = (path, query, opts) => api('DELETE', path, { ...opts, query });

/** Runs SQL in a project (as the member: `_owner` for developers and admins, `_read` for
 * viewers). Resolves with the whole answer ({result, executionInfo}); a SQL error rejects with
 * its SQLSTATE in `details`. */
export function sql(projectId, query, params, extra = {}) {
  const body = { projectId, query, ...extra };
  if (params && params.length) body.params = params;
  return post('/api/execute-sql', body);
}

/** Quotes an SQL identifier (a table or column name from the catalog). */
export function ident(name) {
  return '"' + String(name).replaceAll('"', '""') + '"';
}

/** A table's key in the page (selects, `data-table`, `?table=`): schema and name joined by a
 * dot, each with its own dots and backslashes escaped, so `"public.x".y` and `public."x.y"`
 * never share one. */
export function tableKey(schema, name) {
  const esc = (s) => String(s).replaceAll('\\', '\\\\').replaceAll('.', '\\.');
  return `${esc(schema)}.${esc(name)}`;
}

/** Uploads a file with progress: XMLHttpRequest, since fetch reports no upload progress.
 * `onProgress(sentBytes, totalBytes)`. Resolves with the JSON answer. */
export async function upload(path, query, formData, onProgress) {
  for (let attempt = 0; ; attempt += 1) {
    try {
      return await uploadOnce(path, query, formData, onProgress);
    } catch (e) {
      // Refused before anything was stored (the request limit): wait as told, send it again.
      if (e.status !== 429 || attempt >= 2 || e.retryAfter === null) throw e;
      await sleep(e.retryAfter);
    }
  }
}

function uploadOnce(path, query, formData, onProgress) {
  return new Promise((resolve, reject) => {
    const s = session();
    const xhr = new XMLHttpRequest();
    xhr.open('POST', url(path, query));
    if (s) xhr.setRequestHeader('Authorization', `Bearer ${s.token}`);
    xhr.upload.onprogress = (e) => { if (e.lengthComputable && onProgress) onProgress(e.loaded, e.total); };
    xhr.onload = () => {
      let json = null;
      try { json = JSON.parse(xhr.responseText); } catch (_) { json = null; }
      if (xhr.status >= 200 && xhr.status < 300 && json && json.success !== false) resolve(json);
      else {
        const err = new ApiError(xhr.status, json);
        const v = Number(xhr.getResponseHeader('retry-after'));
        err.retryAfter = xhr.status === 429 && Number.isFinite(v) && v >= 0 && v <= 10 ? v : null;
        reject(err);
      }
    };
    xhr.onerror = () => reject(new ApiError(0, { error: { code: 'NETWORK_ERROR', message: 'The upload was interrupted.' } }));
    xhr.send(formData);
  });
}
