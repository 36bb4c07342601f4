// The dashboard's safety in a real browser: the Content-Security-Policy is sent and enforced (an
// injected inline script does not run; hostile names render as text), the page holds a session
// and never an API key (DOM, storage, cookies, the requests it sends), a form another site posts
// is refused, and another site cannot frame the dashboard.
import http from 'node:http';
import { spec, BASE, assert, call, until, account, unique } from '../lib/harness.mjs';

/** An "attacker" site on another origin (localhost vs the server's 127.0.0.1: another site). */
function attackerSite(pages) {
  return new Promise((resolve) => {
    const server = http.createServer((req, res) => {
      const body = pages[req.url.split('?')[0]];
      res.writeHead(body ? 200 : 404, { 'content-type': 'text/html' });
      res.end(body || 'not found');
    });
    server.listen(0, '127.0.0.1', () => resolve({ server, origin: `http://localhost:${server.address().port}` }));
  });
}

await spec('security', async (t) => {
  const page = await t.newPage();
  const sent = [];
  page.on('request', (r) => {
    if (r.url().startsWith(BASE)) sent.push({ url: r.url(), auth: r.headers().authorization || null });
  });

  t.log('the page is sent with the policy');
  const response = await page.goto(`${BASE}/login`);
  const csp = response.headers()['content-security-policy'];
  assert.match(csp, /script-src 'nonce-[A-Za-z0-9]{22,}' 'strict-dynamic' 'self';/);
  assert.match(csp, /frame-ancestors 'none'/);
  assert.doesNotMatch(csp, /unsafe-inline|unsafe-eval/);
  assert.equal(response.headers()['x-frame-options'], 'DENY');

  const me = await t.signUp(page, { name: '<img src=x onerror="window.__pwned=1">' });
  t.log('hostile project names are shown as text and run nothing');
  const hostile = '<script>window.__pwned=2</script><img src=x onerror="window.__pwned=3">';
  const projectId = await t.createProject(page, hostile);
  await page.goto(`${BASE}/projects`);
  await page.waitForSelector(`a[data-project="${projectId}"]`);
  assert.equal(await page.$eval(`a[data-project="${projectId}"]`, (a) => a.textContent), hostile);
  assert.equal(await page.evaluate(() => window.__pwned), undefined);
  assert.equal(await page.$$eval('img[src=x], script:not([src])', (els) => els.length), 0);
  await t.shot(page, 'hostile-names');

  t.log('markup injected into the page runs no script: event attributes, inline and framed scripts');
  // What an HTML injection could add (the views insert server text as text nodes only, so this
  // goes in by hand): the policy refuses each, and the page says so in a violation event.
  t.expectedErrors.push(/CSP violation: script-src/, /violates the following Content Security Policy directive:? ['"]script-src/);
  const injected = await page.evaluate(() => new Promise((resolve) => {
    const state = { pwned: null, seen: [], framed: false, imgFailed: false };
    const check = () => {
      state.pwned = window.__pwned ?? null;
      if (state.framed && state.imgFailed && state.seen.length) resolve(state);
    };
    document.addEventListener('securitypolicyviolation', (e) => { state.seen.push(e.violatedDirective); setTimeout(check, 0); });
    const d = document.createElement('div');
    d.innerHTML = '<img src="/nope.png" onerror="window.__pwned = \'attr\'">'
      + '<iframe srcdoc="<script>window.top.__pwned = \'srcdoc\'</scr' + 'ipt>"></iframe>';
    // The frame's load event comes after its parser-inserted scripts ran (or were refused).
    d.querySelector('iframe').addEventListener('load', () => { state.framed = true; setTimeout(check, 0); });
    d.querySelector('img').addEventListener('error', () => { state.imgFailed = true; setTimeout(check, 0); });
    document.body.append(d);
    setTimeout(() => resolve(state), 10_000); // a hang guard: the state says what never came
  }));
  assert.equal(injected.pwned, null, JSON.stringify(injected));
  assert.ok(injected.seen.some((d) => d.startsWith('script-src')), JSON.stringify(injected));

  t.log('a JavaScript file a member uploaded to storage does not run as the dashboard\'s script');
  // The markup an HTML injection could add: a frame whose document loads the uploaded file from
  // this origin. Only the nonced entry module (and its imports) may run.
  const token0 = await t.token(page);
  const bucket = await call('POST', '/api/storage/buckets', { token: token0, body: { projectId, name: 'gadgets', isPublic: true } });
  assert.equal(bucket.status, 201, JSON.stringify(bucket.body));
  const form = new FormData();
  form.append('projectId', projectId);
  form.append('bucketId', bucket.body.bucket.id);
  form.append('file', new Blob(['window.top.__pwned = "storage"'], { type: 'text/javascript' }), 'x.js');
  const up = await fetch(`${BASE}/api/storage/upload`, { method: 'POST', headers: { Authorization: `Bearer ${token0}` }, body: form });
  const uploaded = await up.json();
  assert.equal(up.status, 201, JSON.stringify(uploaded));
  const gadget = new URL(uploaded.file.public_url ?? uploaded.public_url).pathname;
  assert.equal((await fetch(`${BASE}${gadget}`)).status, 200, 'the file is served');
  t.expectedErrors.push(/violates the following Content Security Policy directive:? ['"]script-src/, /CSP violation: script-src/);
  const ran = await page.evaluate((src) => new Promise((resolve) => {
    const f = document.createElement('iframe');
    f.srcdoc = `<script src="${src}"></scr` + 'ipt>';
    // Parser-inserted scripts have run (or been refused) by the frame's load event.
    f.onload = () => resolve(window.__pwned ?? null);
    document.body.append(f);
  }), gadget);
  assert.equal(ran, null, 'the uploaded script ran inside the dashboard\'s origin');

  t.log('no API key anywhere in the page, its storage or its requests');
  await page.goto(`${BASE}/projects/${projectId}/settings`);
  await page.waitForSelector('nav.sidebar');
  const everything = await page.evaluate(async () => {
    const dbs = indexedDB.databases ? (await indexedDB.databases()).map((d) => d.name) : [];
    return JSON.stringify({ html: document.documentElement.outerHTML, session: { ...sessionStorage }, local: { ...localStorage }, cookie: document.cookie, dbs });
  });
  assert.doesNotMatch(everything, /flx_live_|flx_rt_/);
  const cookies = await page.cookies();
  assert.deepEqual(cookies, [], 'the dashboard sets no cookie');
  assert.ok(sent.length > 5, `requests seen: ${sent.length}`);
  for (const r of sent) {
    if (r.auth) assert.match(r.auth, /^Bearer flx_sess_/, `${r.url} was sent with ${r.auth.slice(0, 16)}…`);
  }
  const stored = await page.evaluate(() => Object.keys(sessionStorage));
  assert.deepEqual(stored, ['fluxbase.session']);

  t.log('another tab (another browsing context) is not signed in');
  const other = await t.newPage();
  await other.goto(`${BASE}/projects`);
  await other.waitForSelector('form[aria-label="Sign in"]');

  t.log('a form another site posts is refused, and changes nothing');
  const victim = `${unique('victim')}@example.com`;
  const forms = {
    '/signup': `<form id=f method=POST action="${BASE}/api/auth/signup" enctype="text/plain">
      <input name='{"email":"${victim}","password":"correct horse battery","x":"' value='"}'></form>
      <script>document.getElementById('f').submit()</script>`,
    '/frame': `<h1>framed</h1><iframe id=fr src="${BASE}/projects" width=600 height=400></iframe>`,
  };
  const { server, origin } = await attackerSite(forms);
  try {
    const attacker = await t.newPage({ context: page.browserContext() });
    await attacker.goto(`${origin}/signup`);
    await attacker.waitForFunction((base) => location.href.startsWith(base), {}, BASE);
    const answer = JSON.parse(await attacker.evaluate(() => document.body.innerText));
    assert.equal(answer.error.code, 'ACCESS_DENIED', JSON.stringify(answer));
    const login = await call('POST', '/api/auth/login', { body: { email: victim, password: 'correct horse battery' } });
    assert.equal(login.status, 401, 'no account was created by the cross-site form');

    t.log('another site cannot frame the dashboard');
    t.expectedErrors.push(/Refused to display|frame-ancestors|X-Frame-Options/);
    const framer = await t.newPage({ context: page.browserContext() });
    await framer.goto(`${origin}/frame`);
    await framer.waitForSelector('iframe#fr');
    // The framed document never loads: Chromium swaps in its error page, so no dashboard frame
    // with our origin and a rendered app exists.
    await until('the frame to settle', async () => framer.frames().length === 2 && framer.frames()[1].url() !== 'about:blank');
    const frame = framer.frames()[1];
    const framedApp = await frame.evaluate(() => !!document.querySelector('#app')).catch(() => false);
    assert.equal(framedApp, false, `the dashboard rendered inside ${origin}'s frame (frame url ${frame.url()})`);
    assert.equal(frame.url(), 'chrome-error://chromewebdata/', 'Chromium shows its error page in place of the framed dashboard');
    await t.shot(framer, 'framing-refused');
  } finally {
    server.close();
  }

  t.log('the session still works after all that, and logging out ends it');
  await page.bringToFront();
  const token = await t.token(page);
  assert.equal((await call('GET', '/api/auth/me', { token })).status, 200);
  await page.click('button[data-logout]');
  await page.waitForSelector('form[aria-label="Sign in"]');
  assert.equal((await call('GET', '/api/auth/me', { token })).status, 401);
  void me;
  void account;
});
