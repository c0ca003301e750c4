// Helpers for the dashboard end-to-end tests: start a real `kvtier serve`, start Debian's
// Chromium through playwright-core, wait for conditions with deadlines (nothing here sleeps for
// a fixed time to let something happen).

import { spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import { chromium } from 'playwright-core';

export const HERE = path.dirname(fileURLToPath(import.meta.url));
export const ROOT = path.resolve(HERE, '..', '..');

export const KVTIER_BIN = process.env.KVTIER_BIN ||
  path.join(process.env.CARGO_TARGET_DIR || path.join(ROOT, 'target'), 'debug', 'kvtier');
export const PYTHON = process.env.KVTIER_PYTHON || path.join(ROOT, '.venv', 'bin', 'python');
export const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';

let serverSeq = 0;

const givenPorts = new Set();

/** Whether `port` can be listened on at 127.0.0.1 right now. */
function canListen(port) {
  return new Promise((resolve) => {
    const srv = net.createServer();
    srv.unref();
    srv.on('error', () => resolve(false));
    srv.listen(port, '127.0.0.1', () => srv.close(() => resolve(true)));
  });
}

/**
 * A free loopback port for a test server, from below the kernel's ephemeral range (32768 and
 * up by default): a port from listen(0) is ephemeral, and a connecting client can take it as its
 * source port before the server binds it. Never handed out twice in this process (the same
 * rule as tests/python/ports.py).
 */
export async function freePort() {
  for (let i = 0; i < 1000; i++) {
    const port = 10000 + Math.floor(Math.random() * 22000);
    if (!givenPorts.has(port) && await canListen(port)) {
      givenPorts.add(port);
      return port;
    }
  }
  throw new Error('no free loopback port in 10000..32000');
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Polls `fn` until it returns a truthy value; throws `what` after `timeoutMs`. */
export async function waitFor(what, fn, timeoutMs = 10000, everyMs = 50) {
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    try {
      const v = await fn();
      if (v) return v;
    } catch (e) {
      last = e;
    }
    if (Date.now() > deadline) {
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}${last ? `: ${last.message}` : ''}`);
    }
    await sleep(everyMs);
  }
}

/**
 * Starts `kvtier serve` on free ports with a unique shared-memory name and waits until its
 * health check answers. `extra` are additional flags.
 */
export async function startServer(extra = []) {
  if (!fs.existsSync(KVTIER_BIN)) {
    throw new Error(`no kvtier binary at ${KVTIER_BIN}: build it (cargo build -p kvtier) or set KVTIER_BIN`);
  }
  const port = await freePort();
  const httpPort = await freePort();
  const shmName = `kvtier_dash_${process.pid}_${serverSeq++}`;
  const logPath = path.join(os.tmpdir(), `${shmName}.log`);
  const log = fs.openSync(logPath, 'w');
  const args = [
    'serve', '--host', '127.0.0.1', '--port', String(port), '--http-host', '127.0.0.1',
    '--http-port', String(httpPort), '--shm-name', shmName, '--l1-size-gb', '0.5',
    '--no-l1-prefault', '--max-workers', '2', ...extra,
  ];
  const proc = spawn(KVTIER_BIN, args, { stdio: ['ignore', log, log], env: { ...process.env, NO_COLOR: '1' } });
  fs.closeSync(log);
  let exited = null;
  const exit = new Promise((resolve) => proc.on('exit', (code, signal) => {
    exited = { code, signal };
    resolve(exited);
  }));
  const server = {
    proc,
    rpcUrl: `tcp://127.0.0.1:${port}`,
    httpUrl: `http://127.0.0.1:${httpPort}`,
    shmName,
    logPath,
    log: () => fs.readFileSync(logPath, 'utf8'),
    async stop() {
      if (exited) return exited;
      proc.kill('SIGTERM');
      const timer = setTimeout(() => proc.kill('SIGKILL'), 15000);
      const r = await exit;
      clearTimeout(timer);
      return r;
    },
  };
  try {
    await waitFor('the server to answer /api/healthcheck', async () => {
      if (exited) throw new Error(`kvtier exited early (${JSON.stringify(exited)})`);
      const r = await fetch(`${server.httpUrl}/api/healthcheck`);
      return r.status === 200;
    }, 20000, 100);
  } catch (e) {
    await server.stop();
    throw new Error(`${e.message}\n--- server log ---\n${server.log()}`);
  }
  return server;
}

/** Runs tests/dashboard/load.py against `server` for `seconds`; resolves to its totals. */
export function runLoad(server, seconds) {
  const proc = spawn(PYTHON, [path.join(HERE, 'load.py'), server.rpcUrl, String(seconds)], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  let err = '';
  proc.stdout.on('data', (d) => { out += d; });
  proc.stderr.on('data', (d) => { err += d; });
  const done = new Promise((resolve, reject) => {
    proc.on('error', reject);
    proc.on('exit', (code) => {
      if (code === 0) resolve(JSON.parse(out.trim().split('\n').pop()));
      else reject(new Error(`load.py exited with ${code}\n${err}`));
    });
  });
  return { proc, done };
}

/**
 * Headless Debian Chromium with the flags this machine needs and a fresh profile (a persistent
 * context on a new empty directory: playwright's way of passing --user-data-dir).
 */
export async function launchBrowser() {
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'kvtier-dash-chromium-'));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    viewport: { width: 1440, height: 1000 },
    colorScheme: 'light',
    args: [
      '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
    ],
  });
  return {
    context,
    async close() {
      await context.close();
      fs.rmSync(profile, { recursive: true, force: true });
    },
  };
}

/** A new tab that records console errors and uncaught exceptions into `errors`. */
export async function newPage(context) {
  const page = await context.newPage();
  const errors = [];
  page.on('console', (m) => {
    if (m.type() === 'error') errors.push(`console: ${m.text()}`);
  });
  page.on('pageerror', (e) => errors.push(`pageerror: ${e.message}`));
  return { page, errors };
}

export const num = async (locator, attr) => Number(await locator.getAttribute(attr));
