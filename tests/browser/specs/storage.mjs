// Storage: a bad bucket name refused with the API's message; a bucket created in the page; a
// 3 MiB file uploaded through the file input with its progress shown, downloaded through its
// signed link (the bytes compared, and the browser's own download) and through a copied signed
// URL; a new folder and an upload into it; a file dropped on the list; a non-empty bucket's
// delete explained; rename and public (the public URL serves the bytes); files and the bucket
// deleted after a confirmation; a viewer lists and downloads, and has no other control.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import crypto from 'node:crypto';
import { spec, BASE, assert, call, until, unique, memberAs, projectFor } from '../lib/harness.mjs';

await spec('storage', async (t) => {
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'fx-storage-'));
  const downloads = path.join(tmp, 'downloads');
  fs.mkdirSync(downloads);
  const big = crypto.randomBytes(3 * 1024 * 1024);
  const bigPath = path.join(tmp, 'big.bin');
  fs.writeFileSync(bigPath, big);
  const small = Buffer.from(`a report ${unique('r')}\n`);
  const smallPath = path.join(tmp, 'a.txt');
  fs.writeFileSync(smallPath, small);

  const page = await t.newPage();
  await page.browserContext().overridePermissions(BASE, ['clipboard-read', 'clipboard-write', 'clipboard-sanitized-write']);
  const cdp = await page.createCDPSession();
  await cdp.send('Browser.setDownloadBehavior', { behavior: 'allow', downloadPath: downloads, browserContextId: page.browserContext().id, eventsEnabled: true });
  await t.signUp(page);
  const token = await t.token(page);
  const project = await projectFor(token);
  const pid = project.id;

  const bucketsNow = async () => {
    const r = await call('GET', `/api/storage/buckets?projectId=${pid}`, { token });
    assert.equal(r.status, 200, JSON.stringify(r.body));
    return r.body.buckets;
  };
  const filesNow = async (bucket) => {
    const r = await call('GET', `/api/storage/files?projectId=${pid}&bucketId=${bucket}`, { token });
    assert.equal(r.status, 200, JSON.stringify(r.body));
    return r.body.files;
  };
  /** The bytes at a URL fetched with no credentials. */
  const fetchBytes = async (url) => {
    const r = await fetch(url);
    assert.equal(r.status, 200, `${url}: ${r.status}`);
    return Buffer.from(await r.arrayBuffer());
  };
  /** Waits until the files panel has no upload or reload under way (aria-busy). */
  const idle = () => page.waitForSelector('[data-files-of][aria-busy=false]');
  const uploadThroughInput = async (file) => {
    const input = await page.waitForSelector('input[data-upload-input]');
    await input.uploadFile(file);
  };

  t.log('open Storage: no bucket yet');
  await page.goto(`${BASE}/projects/${pid}/settings`);
  await page.waitForSelector('nav a[data-view="storage"]');
  await t.openView(page, pid, 'storage');
  await page.waitForSelector('[data-no-buckets]');
  await page.waitForSelector('[data-name-rule]');

  t.log('a bad name: flagged while typed, refused with the API\'s message');
  await page.type('input[data-field=bucketName]', 'Bad Name!');
  await page.waitForSelector('input[data-field=bucketName][aria-invalid=true]');
  assert.match(await page.$eval('[data-name-rule]', (x) => x.innerText), /lowercase/i);
  await page.click('button[data-create-bucket]');
  await page.waitForSelector('form[aria-label="Create a bucket"] .error-box[data-code=BAD_REQUEST]');
  const refused = await call('POST', '/api/storage/buckets', { token, body: { projectId: pid, name: 'Bad Name!' } });
  assert.equal(refused.status, 400);
  assert.match(await page.$eval('form[aria-label="Create a bucket"] .error-box', (x) => x.innerText), new RegExp(refused.body.error.message.slice(0, 40).replace(/[.*+?^${}()|[\]\\]/g, '\\$&')));
  assert.deepEqual(await bucketsNow(), []);
  await t.shot(page, 'bad-name');

  const name = unique('docs-').toLowerCase();
  t.log(`create bucket ${name}`);
  await page.$eval('input[data-field=bucketName]', (x) => { x.value = ''; });
  await page.type('input[data-field=bucketName]', name);
  await page.waitForSelector('input[data-field=bucketName][aria-invalid=false]');
  await page.click('button[data-create-bucket]');
  await page.waitForSelector(`button[data-bucket="${name}"][aria-current=true]`);
  await page.waitForSelector(`[data-files-of="${name}"] [data-empty-folder]`);
  let buckets = await bucketsNow();
  assert.equal(buckets.length, 1);
  assert.equal(buckets[0].name, name);
  assert.equal(buckets[0].isPublic, false);

  t.log('upload 3 MiB through the file input: the progress bar moves and ends full');
  await page.evaluate(() => {
    window.fxProgress = [];
    const seen = () => document.querySelectorAll('li[data-upload] progress').forEach((p) => {
      window.fxProgress.push({ state: p.closest('li').dataset.state, value: p.value, max: p.max });
    });
    new MutationObserver(seen).observe(document.querySelector('main'), { subtree: true, childList: true, attributes: true, attributeFilter: ['value', 'max'] });
  });
  await uploadThroughInput(bigPath);
  await page.waitForSelector('li[data-upload="big.bin"][data-state=done]');
  const progress = await page.evaluate(() => window.fxProgress);
  assert.ok(progress.some((p) => p.state === 'uploading'), 'a progress bar was shown while uploading');
  const [value, max] = await page.$eval('li[data-upload="big.bin"] progress', (p) => [p.value, p.max]);
  assert.ok(value === max && max >= big.length, `the bar ends full (${value} of ${max})`);
  await page.waitForSelector(`[data-files-of="${name}"] tr[data-file="big.bin"]`);
  await idle();
  let files = await filesNow(name);
  assert.deepEqual(files.map((f) => [f.name, f.size]), [['big.bin', big.length]]);
  await t.shot(page, 'uploaded');

  t.log('download: the link gets a signed URL; its bytes and the browser\'s download are the file');
  await page.click('a[data-download="big.bin"]');
  const href = await page.waitForFunction(() => {
    const a = document.querySelector('a[data-download="big.bin"]');
    return a.dataset.ready === 'yes' && a.href;
  }).then((x) => x.jsonValue());
  assert.match(href, /\/api\/storage\/object\?key=/);
  assert.equal(await page.$eval('a[data-download="big.bin"]', (a) => a.getAttribute('download')), 'big.bin');
  assert.ok((await fetchBytes(href)).equals(big), 'the signed link serves the uploaded bytes');
  const saved = path.join(downloads, 'big.bin');
  await until('the browser\'s download', () => fs.existsSync(saved) && fs.statSync(saved).size === big.length);
  assert.ok(fs.readFileSync(saved).equals(big), 'the downloaded file is the uploaded one');

  t.log('copy a signed URL: the clipboard holds a URL serving the bytes');
  await page.click('button[data-copy-url="big.bin"]');
  await page.waitForSelector('.toast.success::-p-text(Signed URL of big.bin copied)');
  const copied = await page.evaluate(() => navigator.clipboard.readText());
  assert.match(copied, /^http.*\/api\/storage\/object\?key=.*&signature=/);
  assert.ok((await fetchBytes(copied)).equals(big), 'the copied URL serves the uploaded bytes');

  t.log('a new folder is where the next upload goes');
  await page.click('button[data-new-folder]');
  await page.type('dialog[open] input[data-field=folder]', 'reports');
  await page.click('dialog[open] button[data-action="Create folder"]');
  await page.waitForSelector('nav[aria-label="Folder path"] [data-crumb="reports/"][aria-current=location]');
  await page.waitForSelector(`[data-files-of="${name}"] [data-empty-folder]`);
  assert.match(page.url(), /path=reports%2F/);
  await uploadThroughInput(smallPath);
  await page.waitForSelector('tr[data-file="reports/a.txt"]');
  await idle();
  files = await filesNow(name);
  assert.deepEqual(files.map((f) => f.name).sort(), ['big.bin', 'reports/a.txt']);

  t.log('a file dropped on the list is uploaded into the folder');
  const dropped = `dropped ${unique('d')}`;
  await page.evaluate((text) => {
    const dt = new DataTransfer();
    dt.items.add(new File([text], 'dropped.txt', { type: 'text/plain' }));
    const zone = document.querySelector('[data-dropzone]');
    zone.dispatchEvent(new DragEvent('dragenter', { dataTransfer: dt, bubbles: true, cancelable: true }));
    zone.dispatchEvent(new DragEvent('dragover', { dataTransfer: dt, bubbles: true, cancelable: true }));
    zone.dispatchEvent(new DragEvent('drop', { dataTransfer: dt, bubbles: true, cancelable: true }));
  }, dropped);
  await page.waitForSelector('li[data-upload="reports/dropped.txt"][data-state=done]');
  await page.waitForSelector('tr[data-file="reports/dropped.txt"]');
  await idle();
  files = await filesNow(name);
  const droppedFile = files.find((f) => f.name === 'reports/dropped.txt');
  assert.ok(droppedFile, JSON.stringify(files));
  const u = await call('GET', `/api/storage/url?projectId=${pid}&s3Key=${encodeURIComponent(droppedFile.s3_key)}`, { token });
  assert.equal((await fetchBytes(u.body.url)).toString(), dropped);
  await t.shot(page, 'folder');
  await page.emulateMediaFeatures([{ name: 'prefers-color-scheme', value: 'dark' }]);
  await t.shot(page, 'dark');
  await page.emulateMediaFeatures([{ name: 'prefers-color-scheme', value: 'light' }]);

  t.log('breadcrumbs back to the root: the folder is listed');
  await page.click('nav[aria-label="Folder path"] button[data-crumb=""]');
  await page.waitForSelector('tr[data-folder="reports"]');
  assert.ok(await page.$('tr[data-file="big.bin"]'));
  assert.equal(await page.$('tr[data-file="reports/a.txt"]'), null, 'a folder\'s files are inside it');

  t.log('a bucket with files cannot be deleted: the page says why');
  assert.equal(await page.$eval('button[data-delete-bucket]', (b) => b.disabled), true);
  assert.match(await page.$eval('[data-not-empty]', (x) => x.innerText), /holds 3 files/);

  t.log('a viewer lists and downloads, and has nothing else');
  const viewer = await memberAs(token, pid, 'viewer');
  const vpage = await t.newPage();
  await t.signIn(vpage, viewer);
  await vpage.goto(`${BASE}/projects/${pid}/storage?bucket=${name}&path=reports%2F`);
  await vpage.waitForSelector('tr[data-file="reports/a.txt"]');
  for (const sel of ['input[data-upload-input]', '[data-new-folder]', '[data-delete-file]', '[data-delete-bucket]', '[data-bucket-settings]', 'form[aria-label="Create a bucket"]']) {
    assert.equal(await vpage.$(sel), null, `a viewer has no ${sel}`);
  }
  assert.equal(await vpage.$eval('[data-visibility]', (x) => x.dataset.visibility), 'private');
  await vpage.click('a[data-download="reports/a.txt"]');
  const vhref = await vpage.waitForFunction(() => {
    const a = document.querySelector('a[data-download="reports/a.txt"]');
    return a.dataset.ready === 'yes' && a.href;
  }).then((x) => x.jsonValue());
  assert.match(vhref, /\/api\/storage\/object\?key=/);
  assert.ok((await fetchBytes(vhref)).equals(small), 'the viewer\'s link serves the file');
  await t.shot(vpage, 'viewer');
  await vpage.close();

  t.log('settings: rename and make public; the public URL serves the file');
  const renamed = `${name}-pub`;
  await page.click('button[data-bucket-settings]');
  await page.waitForSelector('dialog[open] input[data-field=bucketName]');
  await page.$eval('dialog[open] input[data-field=bucketName]', (x) => { x.value = ''; });
  await page.type('dialog[open] input[data-field=bucketName]', renamed);
  await page.click('dialog[open] input[data-field=isPublic]');
  await page.type('dialog[open] input[data-field=allowedMimeTypes]', 'text/*');
  await page.click('dialog[open] button[data-action=Save]');
  await page.waitForSelector(`button[data-bucket="${renamed}"][aria-current=true]`);
  await page.waitForSelector(`[data-files-of="${renamed}"] [data-visibility=public]`);
  buckets = await bucketsNow();
  assert.deepEqual(buckets.map((b) => [b.name, b.isPublic, b.allowedMimeTypes]), [[renamed, true, ['text/*']]]);
  assert.match(await page.$eval(`[data-files-of="${renamed}"]`, (x) => x.innerText), /types: text\/\*/);
  // The list reloads with each file's stable public URL as its download link.
  const publicHref = await page.waitForFunction(() => {
    const a = document.querySelector('a[data-download="big.bin"]');
    return a && a.href.includes('/api/storage/public/') && a.href;
  }).then((x) => x.jsonValue());
  assert.ok((await fetchBytes(publicHref)).equals(big));

  t.log('the bucket\'s allowed types refuse another type: the upload shows the API\'s error');
  const binPath = path.join(tmp, 'refused.bin');
  fs.writeFileSync(binPath, crypto.randomBytes(64));
  await uploadThroughInput(binPath);
  await page.waitForSelector('li[data-upload="refused.bin"][data-state=failed]');
  assert.match(await page.$eval('li[data-upload="refused.bin"]', (x) => x.innerText), /BAD_REQUEST: .*not allowed/);
  await idle();
  assert.equal((await filesNow(renamed)).length, 3);

  t.log('delete the files (asked first)');
  for (const f of ['big.bin', 'reports/a.txt', 'reports/dropped.txt']) {
    if (f.startsWith('reports/') && !await page.$('nav[aria-label="Folder path"] [data-crumb="reports/"][aria-current]')) {
      await page.click('button[data-open-folder="reports"]');
      await page.waitForSelector('nav[aria-label="Folder path"] [data-crumb="reports/"][aria-current]');
    }
    await (await page.waitForSelector(`button[data-delete-file="${f}"]`)).click();
    await page.waitForSelector('dialog[open] button[data-action="Delete file"]');
    if (f === 'big.bin') {
      await page.click('dialog[open] button[data-action=Cancel]');
      await page.waitForSelector('dialog[open]', { hidden: true });
      assert.equal((await filesNow(renamed)).length, 3, 'cancel keeps the file');
      await page.click(`button[data-delete-file="${f}"]`);
    }
    await page.click('dialog[open] button[data-action="Delete file"]');
    await page.waitForSelector(`tr[data-file="${f}"]`, { hidden: true });
    assert.ok(!(await filesNow(renamed)).some((x) => x.name === f), `${f} deleted on the server`);
  }
  await page.waitForSelector(`[data-files-of="${renamed}"] [data-empty-folder]`);
  assert.deepEqual(await filesNow(renamed), []);

  t.log('the empty bucket is deleted (asked first)');
  await page.waitForSelector('button[data-delete-bucket]:not([disabled])');
  await page.click('button[data-delete-bucket]');
  await page.click('dialog[open] button[data-action="Delete bucket"]');
  await page.waitForSelector('[data-no-buckets]');
  assert.deepEqual(await bucketsNow(), []);
  fs.rmSync(tmp, { recursive: true, force: true });
});
