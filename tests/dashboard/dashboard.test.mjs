// End-to-end test of the web dashboard: a live `kvtier serve` (the debug binary), headless Debian
// Chromium driven by playwright-core, load over the real ZeroMQ socket and shared memory
// (load.py), and a fault injected through the test-only route.
//
// Screenshots of the idle and loaded dashboard go to $DASHBOARD_SCREENSHOTS_DIR (run.sh
// --screenshots sets it to docs/), else to a temporary directory.

import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, before, test } from 'node:test';

import { launchBrowser, newPage, num, runLoad, startServer, waitFor } from './lib.mjs';

const EVICTOR = 'engine.storage_manager.l1_eviction_controller';
const RED = 'rgb(217, 45, 32)'; // --bad in the light scheme
const GREEN = 'rgb(26, 155, 80)'; // --ok in the light scheme
const SHOTS = process.env.DASHBOARD_SCREENSHOTS_DIR ||
  fs.mkdtempSync(path.join(os.tmpdir(), 'kvtier-dash-shots-'));
// Seconds of load (run.sh --screenshots runs longer for a fuller picture).
const LOAD_SECONDS = Number(process.env.DASHBOARD_LOAD_SECONDS || 9);

let server;
let chrome;
let page;
let errors;

before(async () => {
  server = await startServer([
    '--enable-fault-injection',
    '--l2-adapter', '{"type":"mock","max_size_gb":1,"mock_bandwidth_gb":10}',
  ]);
  chrome = await launchBrowser();
  ({ page, errors } = await newPage(chrome.context));
});

after(async () => {
  if (chrome) await chrome.close();
  if (server) {
    const exit = await server.stop();
    assert.deepEqual(exit, { code: 0, signal: null }, `kvtier did not exit cleanly\n${server.log()}`);
  }
});

const node = (p) => page.locator(`#tree details[data-path="${p}"]`);
const dotColour = (p) => node(p).locator(':scope > summary > .dot')
  .evaluate((e) => getComputedStyle(e).backgroundColor);

test('the status tree renders, with health colours', async () => {
  const res = await page.goto(server.httpUrl + '/');
  assert.equal(res.status(), 200);
  assert.match(res.headers()['content-type'], /text\/html/);
  await node('engine').waitFor({ timeout: 10000 });
  assert.equal(await node('engine').getAttribute('data-healthy'), 'true');
  await node(EVICTOR).waitFor({ state: 'attached' });
  assert.equal(await node(EVICTOR).getAttribute('data-healthy'), 'true');
  assert.equal(await dotColour(EVICTOR), GREEN);
  // Components the server owns each have a node; plain objects are collapsible groups.
  for (const p of ['engine.storage_manager', 'engine.storage_manager.l1_manager', 'engine.telemetry',
    'engine.housekeeping', 'engine.transport']) {
    assert.equal(await node(p).count(), 1, `node ${p}`);
  }
  assert.equal(await page.locator('#health-badge').textContent(), 'healthy');
  assert.equal(await page.locator('#unhealthy').isHidden(), true);
  // Collapsing a node sticks across refreshes.
  const l1 = node('engine.storage_manager.l1_manager');
  const wasOpen = await l1.evaluate((d) => d.open);
  await l1.locator(':scope > summary').click();
  const seq = await num(page.locator('#chart-l1'), 'data-points');
  await waitFor('a refresh', async () => (await num(page.locator('#chart-l1'), 'data-points')) > seq, 6000);
  assert.equal(await l1.evaluate((d) => d.open), !wasOpen);
  // Tiles and tables.
  assert.equal(await page.locator('#tile-l1 [data-v]').textContent(), '0 B');
  assert.equal(await page.locator('#tile-l1 [data-sub]').textContent(), 'of 512 MiB · 0 %');
  assert.equal(await page.locator('#engines tbody').textContent(), 'No engine registered.');
  const l2 = page.locator('#l2 tbody tr');
  assert.equal(await l2.count(), 1);
  assert.deepEqual(await l2.locator('td').allTextContents(),
    ['0', 'mock', 'healthy', '0', '0 B / 1.00 GiB', 'yes', '0', '0', '']);
  assert.equal(await node('engine.storage_manager.l2_adapters[0]').getAttribute('data-healthy'), 'true');
  await waitFor('three samples on the charts',
    async () => (await num(page.locator('#chart-rpc'), 'data-points')) >= 3, 8000);
  await page.screenshot({ path: path.join(SHOTS, 'dashboard-idle.png'), fullPage: true });
});

test('the page fits a narrow window', async () => {
  await page.setViewportSize({ width: 390, height: 900 });
  try {
    await waitFor('the charts to be redrawn at the narrow width', () => page.evaluate(() => {
      const svgEl = document.querySelector('#chart-l1 svg');
      return svgEl && Number(svgEl.getAttribute('width')) < 390;
    }), 3000);
    const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
    assert.ok(overflow <= 0, `page is ${overflow}px wider than a 390px window`);
  } finally {
    await page.setViewportSize({ width: 1440, height: 1000 });
  }
});

test('charts gain points while load runs', async () => {
  const chart = page.locator('#chart-throughput');
  const before = await num(chart, 'data-points');
  assert.equal(await num(chart, 'data-nonzero'), 0, 'no throughput before the load');
  const load = runLoad(server, LOAD_SECONDS);
  try {
    await waitFor('non-zero store throughput on the chart',
      async () => (await num(chart, 'data-nonzero')) >= 2, 15000);
    assert.ok((await num(chart, 'data-points')) > before);
    await waitFor('a lookup hit rate', async () =>
      /%$/.test((await page.locator('#tile-hit [data-v]').textContent()).trim()), 10000);
    assert.match(await page.locator('#engines tbody').textContent(), /dashboard-load/);
    // Write-behind copies the stores to the L2 adapter.
    await waitFor('objects in the L2 adapter', async () =>
      Number((await page.locator('#l2 tbody tr td').nth(3).textContent()).replace(/,/g, '')) > 0, 10000);
    assert.notEqual(await page.locator('#tile-rpc [data-v]').textContent(), 'idle');
    // Let a few more seconds of load reach the charts for the screenshot.
    const want = Math.max(6, LOAD_SECONDS - 4);
    await waitFor(`${want} loaded samples`, async () => (await num(chart, 'data-nonzero')) >= want,
      LOAD_SECONDS * 1000 + 10000);
    await waitFor('the hit-rate curve', async () =>
      (await num(page.locator('#chart-curve'), 'data-points')) > 0, 15000);
    // A full-page shot draws the sticky header where the window is scrolled to.
    await page.evaluate(() => window.scrollTo(0, 0));
    await page.screenshot({ path: path.join(SHOTS, 'dashboard-load.png'), fullPage: true });
  } finally {
    const totals = await load.done;
    assert.ok(totals.stored_chunks > 0 && totals.hit_chunks > 0, JSON.stringify(totals));
  }
});

test('the hit-rate curve renders after load, with its points and the current-size marker', async () => {
  const fig = page.locator('#chart-curve');
  await waitFor('curve points', async () => (await num(fig, 'data-points')) === 6, 15000);
  assert.equal(await num(fig, 'data-current'), 1);
  assert.equal(await fig.locator('svg circle.curve-point').count(), 6);
  assert.equal(await fig.locator('svg circle.current-marker').count(), 1, 'one current-size marker');
  assert.equal(await fig.locator('svg line.current-size').count(), 1);
  // The marker sits on L1's size: the middle of 0.25x..8x on the log axis, at ratio 1.
  assert.equal(await fig.locator('svg circle.current-marker').getAttribute('data-ratio'), '1');
  // The mock L2 adapter (1 GiB) is a diamond on the same curve.
  assert.equal(await fig.locator('svg path.l2-point').count(), 1);
  const ys = await fig.locator('svg circle.curve-point').evaluateAll(
    (cs) => cs.map((c) => Number(c.getAttribute('cy'))));
  // Larger caches never hit less: y (downwards) never increases along the curve.
  for (let i = 1; i < ys.length; i += 1) assert.ok(ys[i] <= ys[i - 1] + 1e-6, `monotone: ${ys}`);
  assert.match(await fig.locator('.legend').textContent(), /L1 .*est\..*measured/);
});

test('an unhealthy component turns red within 5 s, its reason first', async () => {
  const t0 = Date.now();
  const r = await fetch(server.httpUrl + '/api/debug/fault', {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ component: 'l1_eviction_controller' }),
  });
  assert.equal(r.status, 200, await r.text());
  await node(EVICTOR).and(page.locator('[data-healthy="false"]')).waitFor({ timeout: 5000 });
  const elapsed = Date.now() - t0;
  assert.ok(elapsed < 5000, `took ${elapsed} ms`);
  assert.equal(await dotColour(EVICTOR), RED);
  // The reason is the first thing inside the node, right under its title, and the node is open.
  const first = node(EVICTOR).locator(':scope > summary + *');
  assert.equal(await first.getAttribute('class'), 'reason');
  assert.equal(await first.textContent(), 'eviction thread is not running');
  assert.equal(await node(EVICTOR).evaluate((d) => d.open), true);
  // Ancestors are red too, the badge says so, and the summary at the top lists the component.
  assert.equal(await node('engine.storage_manager').getAttribute('data-healthy'), 'false');
  assert.equal(await page.locator('#health-badge').textContent(), 'unhealthy');
  const summary = page.locator('#unhealthy');
  assert.equal(await summary.isVisible(), true);
  assert.match(await summary.textContent(), /l1_eviction_controller.*eviction thread is not running/);
  console.log(`# node turned red ${elapsed} ms after the fault`);
  await page.screenshot({ path: path.join(SHOTS, 'dashboard-unhealthy.png') });
});

test('no script or content-security-policy errors', () => {
  assert.deepEqual(errors, []);
});
