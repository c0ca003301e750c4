// The dashboard on a token-protected server (`--http-auth-token`): without a token, or with a
// wrong one, the page says that the server requires an access token instead of showing a broken
// page; with ?token=... (or the form) it shows the data and keeps the token out of the address
// bar.
//
// Needs the admin API's access control (--http-auth-token, the `http` branch) and the
// dashboard's static routes (dashboard::STATIC_ROUTES) among the routes open without a token.

import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';

import { launchBrowser, newPage, startServer } from './lib.mjs';

const TOKEN = 'dashboard-e2e-token-5b1f';

let server;
let chrome;

before(async () => {
  server = await startServer(['--http-auth-token', TOKEN]);
  chrome = await launchBrowser();
});

after(async () => {
  if (chrome) await chrome.close();
  if (server) {
    const exit = await server.stop();
    assert.deepEqual(exit, { code: 0, signal: null }, `kvtier did not exit cleanly\n${server.log()}`);
  }
});

// Only the expected 401s may show up as console errors.
function unexpected(errors) {
  return errors.filter((e) => !/status of 401/.test(e));
}

test('the API itself refuses requests without the token', async () => {
  const r = await fetch(server.httpUrl + '/api/status');
  assert.equal(r.status, 401);
  const ts = await fetch(server.httpUrl + '/api/timeseries');
  assert.equal(ts.status, 401);
});

test('without a token the page says the server requires one', async () => {
  const { page, errors } = await newPage(chrome.context);
  const res = await page.goto(server.httpUrl + '/');
  assert.equal(res.status(), 200, 'the static page must be served without the token');
  const auth = page.locator('#auth');
  await auth.waitFor({ state: 'visible', timeout: 5000 });
  assert.match(await auth.textContent(), /This server requires an access token/);
  assert.match(await auth.textContent(), /\?token=/);
  assert.equal(await page.locator('#content').isHidden(), true, 'no half-rendered data');
  assert.equal(await page.locator('#tree details').count(), 0);
  assert.deepEqual(unexpected(errors), []);
  await page.close();
});

test('a wrong token is reported as rejected', async () => {
  const { page, errors } = await newPage(chrome.context);
  await page.goto(server.httpUrl + '/?token=not-the-token');
  const auth = page.locator('#auth');
  await auth.waitFor({ state: 'visible', timeout: 5000 });
  assert.match(await auth.textContent(), /The access token was rejected/);
  assert.deepEqual(unexpected(errors), []);
  await page.close();
});

test('?token= shows the dashboard and leaves the address bar', async () => {
  const { page, errors } = await newPage(chrome.context);
  await page.goto(`${server.httpUrl}/?token=${TOKEN}`);
  await page.locator('#tree details[data-path="engine"]').waitFor({ timeout: 10000 });
  assert.equal(await page.locator('#auth').isHidden(), true);
  assert.doesNotMatch(page.url(), /token/);
  // A reload in the same tab keeps working (sessionStorage), with the charts fed.
  await page.reload();
  await page.locator('#tree details[data-path="engine"]').waitFor({ timeout: 10000 });
  await page.waitForFunction(() => Number(document.querySelector('#chart-l1').dataset.points) >= 1,
    null, { timeout: 5000 });
  assert.equal(await page.locator('#l2 tbody').textContent(), 'No L2 adapters configured.');
  assert.deepEqual(errors, []);
  await page.close();
});

test('the token form unlocks the page', async () => {
  const { page, errors } = await newPage(chrome.context);
  await page.goto(server.httpUrl + '/');
  await page.locator('#auth').waitFor({ state: 'visible', timeout: 5000 });
  await page.fill('#auth-token', TOKEN);
  await page.click('#auth-form button[type=submit]');
  await page.locator('#tree details[data-path="engine"]').waitFor({ timeout: 10000 });
  assert.equal(await page.locator('#auth').isHidden(), true);
  assert.deepEqual(unexpected(errors), []);
  await page.close();
});
