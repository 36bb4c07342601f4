// Accessibility of every page, light and dark: axe-core's WCAG 2.1 A/AA rules (labels, names,
// contrast, landmarks, ARIA) find no violation; the sign-in works from the keyboard alone, with
// the skip link first in the tab order.
import fs from 'node:fs';
import { createRequire } from 'node:module';
import { spec, BASE, assert, call, account, projectFor } from '../lib/harness.mjs';

const axeSource = fs.readFileSync(createRequire(import.meta.url).resolve('axe-core/axe.min.js'), 'utf8');
const VIEWS = ['settings', 'keys', 'team', 'sql', 'tables', 'rls', 'storage', 'webhooks', 'realtime', 'health'];

/** axe-core's violations on the page as it is now (the source goes in through the DevTools
 * protocol, which the page's CSP does not apply to). */
async function violations(page) {
  await page.evaluate(axeSource);
  return page.evaluate(async () => {
    const r = await window.axe.run(document, { runOnly: { type: 'tag', values: ['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa'] } });
    return r.violations.map((v) => `${v.id} (${v.impact}): ${v.help} — ${v.nodes.slice(0, 3).map((n) => n.target.join(' ')).join(' | ')}`);
  });
}

await spec('accessibility', async (t) => {
  // axe-core measures contrast with style elements of its own: this spec lets the page's policy
  // pass them (every other spec runs under the policy and fails on any violation).
  const page = await t.newPage();
  await page.setBypassCSP(true);
  const me = await account({ displayName: 'Grace Hopper' });
  const p = await projectFor(me.token, 'a11y');
  const seed = await call('POST', '/api/execute-sql', {
    token: me.token,
    body: { projectId: p.id, query: "CREATE TABLE todos (id serial PRIMARY KEY, title text NOT NULL, done boolean DEFAULT false); INSERT INTO todos (title) VALUES ('write docs'), ('ship it')" },
  });
  assert.equal(seed.body.success, true, JSON.stringify(seed.body));

  t.log('sign in with the keyboard alone');
  await page.goto(`${BASE}/login`);
  await page.waitForSelector('form[aria-label="Sign in"]');
  await page.keyboard.press('Tab');
  assert.equal(await page.evaluate(() => document.activeElement.name), 'email');
  await page.keyboard.type(me.email);
  await page.keyboard.press('Tab');
  await page.keyboard.type(me.password);
  await page.keyboard.press('Enter');
  await page.waitForSelector('h1::-p-text(Projects)');
  await page.keyboard.press('Tab');
  assert.equal(await page.evaluate(() => document.activeElement.textContent), 'Skip to content', 'the skip link comes first');

  const found = [];
  for (const theme of ['light', 'dark']) {
    await page.evaluate((th) => localStorage.setItem('fluxbase.theme', th), theme);
    const pages = [['projects', '/projects'], ['invitations', '/invitations'], ...VIEWS.map((v) => [v, `/projects/${p.id}/${v}`])];
    for (const [name, path] of pages) {
      t.log(`axe: ${name} (${theme})`);
      await page.goto(`${BASE}${path}`);
      await page.waitForSelector('main#main h1');
      // Let the view finish loading what it shows (no "Loading…" left).
      await page.waitForFunction(() => !document.querySelector('main#main')?.innerText.includes('Loading'), { timeout: 15_000 }).catch(() => {});
      for (const v of await violations(page)) found.push(`${path} [${theme}]: ${v}`);
    }
    for (const path of ['/login', '/signup']) {
      const anon = await t.newPage();
      await anon.setBypassCSP(true);
      await anon.evaluateOnNewDocument((th) => localStorage.setItem('fluxbase.theme', th), theme);
      await anon.goto(`${BASE}${path}`);
      await anon.waitForSelector('form');
      for (const v of await violations(anon)) found.push(`${path} [${theme}]: ${v}`);
      await anon.close();
    }
  }
  assert.deepEqual(found, [], `accessibility violations:\n  ${found.join('\n  ')}`);
});
