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
  assert.match(csp, /script-src 'self';/);
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

  t.log('an inline script injected into the page is blocked by the policy');
  t.expectedErrors.push(/CSP violation: script-src/, /violates the following Content Security Policy directive 'script-src 'self''/);
  const blocked = await page.evaluate(() => new Promise((resolve) => {
    document.addEventListener('securitypolicyviolation', (e) => resolve(e.violatedDirective), { once: true });
    const s = document.createElement('script');
    s.textContent = 'window.__inline = 1';
    document.head.append(s);
    setTimeout(() => resolve(null), 5000);
  }));
  assert.match(String(blocked), /^script-src/);
  assert.equal(await page.evaluate(() => window.__inline), undefined);

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
