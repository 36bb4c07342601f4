// The browser tests' harness: Debian's Chromium, headless, driven by puppeteer-core, against a
// real `fluxbase serve` whose base URL is FLUXBASE_URL (tests/it/dashboard starts it).
//
// Every page opened here fails the spec on a Content-Security-Policy violation, an uncaught
// exception or a console error the spec did not expect, so a view that needs an inline script or
// style, or throws, cannot pass. Screenshots go to ARTIFACTS_DIR (target/browser-artifacts by
// default) as <spec>-<name>.png.

import puppeteer from 'puppeteer-core';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';

export { assert };
export const BASE = (process.env.FLUXBASE_URL || 'http://127.0.0.1:8080').replace(/\/$/, '');
const ARTIFACTS = process.env.ARTIFACTS_DIR || path.resolve(import.meta.dirname ?? path.dirname(new URL(import.meta.url).pathname), '../../../target/browser-artifacts');
const CHROMIUM = process.env.CHROMIUM || ['/usr/bin/chromium', '/usr/bin/chromium-browser', '/usr/bin/google-chrome'].find((p) => fs.existsSync(p));
/** The longest a single wait may take: a hang guard for a loaded machine, not a timing claim. */
export const WAIT = 30_000;

let seq = 0;
export const unique = (prefix) => `${prefix}${Date.now().toString(36)}${(++seq).toString(36)}${Math.random().toString(36).slice(2, 6)}`;

/** Runs `body(t)` with a fresh browser; `t` has page helpers. Exits non-zero on failure. */
export async function spec(name, body) {
  const started = Date.now();
  if (!CHROMIUM) {
    console.error('No Chromium found: install Debian\'s `chromium` package (scripts/deps.sh test does) or set CHROMIUM.');
    process.exit(2);
  }
  fs.mkdirSync(ARTIFACTS, { recursive: true });
  const browser = await puppeteer.launch({
    executablePath: CHROMIUM,
    headless: true,
    // --no-sandbox: CI runs as root, where Chromium's sandbox cannot start.
    args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--no-first-run', '--lang=en-US', '--window-size=1360,900'],
    defaultViewport: { width: 1360, height: 900 },
    protocolTimeout: 120_000,
  });
  const problems = [];
  const t = new Tester(name, browser, problems);
  let failed = null;
  try {
    await body(t);
  } catch (e) {
    failed = e;
    for (const p of t.pages) {
      try { await p.screenshot({ path: path.join(ARTIFACTS, `${name}-FAILED-${t.pages.indexOf(p)}.png`), fullPage: true }); } catch (_) { /* closed */ }
    }
  } finally {
    await browser.close().catch(() => {});
  }
  if (!failed && problems.length) failed = new Error(`the page reported problems:\n  ${problems.join('\n  ')}`);
  if (failed) {
    console.error(`FAIL ${name} after ${((Date.now() - started) / 1000).toFixed(1)} s (last step: ${t.step})`);
    console.error(failed.stack || failed);
    if (problems.length) console.error(`page problems:\n  ${problems.join('\n  ')}`);
    process.exit(1);
  }
  console.log(`ok ${name} (${t.steps} steps, ${((Date.now() - started) / 1000).toFixed(1)} s)`);
}

class Tester {
  constructor(name, browser, problems) {
    this.name = name;
    this.browser = browser;
    this.problems = problems;
    this.pages = [];
    this.step = '(start)';
    this.steps = 0;
    /** Console errors a spec expects (regexps), e.g. a refused request it provokes. */
    this.expectedErrors = [];
  }

  /** Names what the spec does next (printed on failure). */
  log(step) {
    this.step = step;
    this.steps += 1;
    if (process.env.VERBOSE) console.log(`  - ${step}`);
  }

  /** A new page (a tab of its own browser context: its own sessionStorage), watched for CSP
   * violations and errors. */
  async newPage({ context } = {}) {
    const ctx = context || await this.browser.createBrowserContext();
    const page = await ctx.newPage();
    page.setDefaultTimeout(WAIT);
    const problem = (what) => {
      if (this.expectedErrors.some((re) => re.test(what))) return;
      this.problems.push(what);
    };
    page.on('pageerror', (e) => problem(`uncaught: ${e.message}`));
    page.on('console', (m) => {
      if (m.type() !== 'error') return;
      const text = m.text();
      // A refused API call is logged by Chromium as "Failed to load resource: … 4xx": the
      // dashboard shows those errors itself; specs assert on what the page shows.
      if (/Failed to load resource: the server responded with a status of (4\d\d)/.test(text)) return;
      problem(`console error: ${text}`);
    });
    await page.evaluateOnNewDocument(() => {
      document.addEventListener('securitypolicyviolation', (e) => {
        console.error(`CSP violation: ${e.violatedDirective} blocked ${e.blockedURI || '(inline)'}`);
      });
    });
    this.pages.push(page);
    return page;
  }

  /** A full-page screenshot from the top (the sticky top bar drawn where it belongs); with
   * `dark`, in the dark theme (toggled back after). */
  async shot(page, name, { dark = false } = {}) {
    await page.evaluate(() => window.scrollTo(0, 0));
    if (dark) await page.click('button[data-theme-toggle]');
    await page.screenshot({ path: path.join(ARTIFACTS, `${this.name}-${name}.png`), fullPage: true });
    if (dark) await page.click('button[data-theme-toggle]');
  }

  /** Opens a project view by its address and waits until the app shows it. */
  async visit(page, projectId, view) {
    this.log(`visit view ${view}`);
    await page.goto(`${BASE}/projects/${projectId}/${view}`);
    await page.waitForSelector(`nav a[data-view="${view}"][aria-current=page]`);
  }

  /** Signs up a fresh account through the sign-up page; returns {email, password}. */
  async signUp(page, { name = 'Ada Lovelace', email = `${unique('ada')}@example.com`, password = 'correct horse battery' } = {}) {
    this.log(`sign up ${email}`);
    await page.goto(`${BASE}/signup`);
    await page.waitForSelector('form[aria-label="Create your account"]');
    await page.type('input[name=displayName]', name);
    await page.type('input[name=email]', email);
    await page.type('input[name=password]', password);
    await Promise.all([page.waitForSelector('h1::-p-text(Projects)'), page.click('button[type=submit]')]);
    return { email, password };
  }

  /** Signs in through the login page. */
  async signIn(page, { email, password }) {
    this.log(`sign in ${email}`);
    await page.goto(`${BASE}/login`);
    await page.waitForSelector('form[aria-label="Sign in"]');
    await page.type('input[name=email]', email);
    await page.type('input[name=password]', password);
    await Promise.all([page.waitForSelector('h1::-p-text(Projects)'), page.click('button[type=submit]')]);
  }

  /** Creates a project through the Projects page (dismissing the keys shown once); returns its
   * id. The page is left on the project's Settings. */
  async createProject(page, name = unique('proj'), engine = 'postgresql') {
    this.log(`create project ${name} (${engine})`);
    await page.goto(`${BASE}/projects`);
    await page.waitForSelector('form[aria-label="Create a project"] input[name=name]');
    await page.type('input[name=name]', name);
    await page.select('form[aria-label="Create a project"] select[name=engine]', engine);
    await page.click('form[aria-label="Create a project"] button[type=submit]');
    await page.waitForSelector('dialog[open] [data-secret]');
    await page.click('dialog[open] button[data-action=Done]');
    await page.waitForFunction(() => /^\/projects\/[0-9a-f]{16}\/settings$/.test(location.pathname));
    return page.evaluate(() => location.pathname.split('/')[2]);
  }

  /** Opens a project view through the sidebar. */
  async openView(page, projectId, view) {
    this.log(`open view ${view}`);
    if (!page.url().includes(`/projects/${projectId}/`)) await page.goto(`${BASE}/projects/${projectId}/settings`);
    await page.waitForSelector(`nav a[data-view="${view}"]`);
    await page.click(`nav a[data-view="${view}"]`);
    await page.waitForFunction((v) => location.pathname.endsWith(`/${v}`), {}, view);
  }

  /** The session token the page holds (for API checks the spec makes beside the page). */
  async token(page) {
    await page.bringToFront(); // a background tab may not answer evaluate() in headless mode
    return page.evaluate(() => JSON.parse(sessionStorage.getItem('fluxbase.session')).token);
  }
}

/** Runs the operator's CLI (`fluxbase <args>`) on the server's control database: the Rust
 * wrapper gives OPERATOR_CLI, OPERATOR_DATABASE_URL and OPERATOR_DATA_DIR (by hand: the binary
 * and OPERATOR_DATA_DIR alone for an embedded cluster). Returns stdout; throws on failure. */
export async function operator(...args) {
  const bin = process.env.OPERATOR_CLI;
  if (!bin) throw new Error('OPERATOR_CLI is not set: this step needs the operator CLI (tests/it/dashboard sets it)');
  const { execFileSync } = await import('node:child_process');
  // The CLI refuses FLUXBASE_* variables it does not know (FLUXBASE_URL is the specs').
  const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('FLUXBASE_')));
  if (process.env.OPERATOR_DATABASE_URL) env.FLUXBASE_DATABASE_URL = process.env.OPERATOR_DATABASE_URL;
  if (process.env.OPERATOR_DATA_DIR) env.FLUXBASE_DATA_DIR = process.env.OPERATOR_DATA_DIR;
  return execFileSync(bin, args, { env, encoding: 'utf8' });
}

/** Calls the API directly (an oracle beside the page): resolves {status, body}. */
export async function call(method, path, { token, body, headers } = {}) {
  const h = { ...(headers || {}) };
  if (token) h.Authorization = `Bearer ${token}`;
  if (body !== undefined) h['Content-Type'] = 'application/json';
  const res = await fetch(`${BASE}${path}`, { method, headers: h, body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await res.text();
  let json = null;
  try { json = JSON.parse(text); } catch (_) { json = text; }
  return { status: res.status, body: json, headers: res.headers };
}

/** Waits until `f()` resolves truthy (polling), up to WAIT: for state the API shows. */
export async function until(what, f, { timeout = WAIT, every = 100 } = {}) {
  const deadline = Date.now() + timeout;
  let last;
  for (;;) {
    last = await f();
    if (last) return last;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what} (last: ${JSON.stringify(last)})`);
    await new Promise((r) => setTimeout(r, every));
  }
}

/** The visible text of an element (trimmed). */
export function textOf(page, selector) {
  return page.$eval(selector, (el) => el.innerText.trim());
}

/** Signs up an account through the API: {email, password, token, user}. */
export async function account({ email = `${unique('user')}@example.com`, password = 'correct horse battery', displayName = 'Test User' } = {}) {
  const r = await call('POST', '/api/auth/signup', { body: { email, password, displayName } });
  assert.equal(r.status, 201, JSON.stringify(r.body));
  return { email, password, token: r.body.token, user: r.body.user };
}

/** A member of `projectId` with `role` (admin, developer, viewer): a new account invited by
 * `ownerToken` (an admin's session) and accepting through the API. {email, password, token}. */
export async function memberAs(ownerToken, projectId, role) {
  const a = await account({ displayName: `A ${role}` });
  const inv = await call('POST', '/api/team', { token: ownerToken, body: { projectId, email: a.email, role } });
  assert.equal(inv.status, 201, JSON.stringify(inv.body));
  const ok = await call('POST', '/api/team/invites/accept', { token: a.token, body: { inviteId: inv.body.invite.id, status: 'accepted' } });
  assert.equal(ok.status, 200, JSON.stringify(ok.body));
  return a;
}

/** A project made through the API for `token`'s user: {id, keys: {read, readwrite, admin}}. */
export async function projectFor(token, name = unique('p')) {
  const r = await call('POST', '/api/projects', { token, body: { name } });
  assert.equal(r.status, 201, JSON.stringify(r.body));
  return { id: r.body.project.id, name, keys: r.body.apiKeys };
}
