'use strict';
// The browser side of the console tests: Debian's chromium driven by playwright-core, a watcher
// per page that records every uncaught error, failed request, unexpected HTTP error status and
// API call, axe-core run inside the page, and optional screenshots for docs/console/.

const fs = require('node:fs');
const path = require('node:path');
const assert = require('node:assert/strict');
const { chromium } = require('playwright-core');

const CHROMIUM = process.env.TIDEPOOL_CHROMIUM || '/usr/bin/chromium';
const AXE_SOURCE = fs.readFileSync(require.resolve('axe-core/axe.min.js'), 'utf8');
const VIEWPORT = { width: 1280, height: 800 };
const CALLS_PER_VIEW_MAX = 3;
const SCREENSHOT_DIR = path.resolve(__dirname, '..', '..', '..', 'docs', 'console');
const READY_MS_MAX = 60_000;

function launch() {
  return chromium.launch({ executablePath: CHROMIUM, headless: true });
}

async function newPage(browser) {
  const context = await browser.newContext({ viewport: VIEWPORT, acceptDownloads: true });
  const page = await context.newPage();
  page.setDefaultTimeout(READY_MS_MAX);
  return { context, page, watcher: watch(page) };
}

function isApi(url) {
  const { pathname } = new URL(url);
  return /\/(console\/api|admin|v1)\//.test(pathname);
}

/**
 * Records what a page does. `allow(predicate)` declares a deliberate error response (a wrong
 * key on the sign-in form, the signed-out session check) for the next matching response only.
 */
function watch(page) {
  const w = {
    problems: [],
    api: [],
    inFlight: 0,
    allowed: [],
    allow(predicate) {
      w.allowed.push(predicate);
    },
    allowSignedOutCheck() {
      w.allow((r) => r.status() === 401 && r.request().method() === 'GET' && r.url().endsWith('/console/api/session'));
    },
    assertClean(label) {
      assert.deepEqual(w.problems, [], `${label}: the page had problems`);
    },
  };
  page.on('pageerror', (error) => w.problems.push(`uncaught error: ${error.message}`));
  page.on('requestfailed', (request) => {
    w.inFlight -= 1;
    // A download of a client-made blob is not a network request.
    if (request.url().startsWith('blob:')) return;
    w.problems.push(`request failed: ${request.method()} ${request.url()} (${request.failure() && request.failure().errorText})`);
  });
  page.on('requestfinished', () => {
    w.inFlight -= 1;
  });
  page.on('request', (request) => {
    w.inFlight += 1;
    if (isApi(request.url())) w.api.push(`${request.method()} ${new URL(request.url()).pathname}${new URL(request.url()).search}`);
  });
  page.on('response', (response) => {
    if (response.status() < 400) return;
    const at = w.allowed.findIndex((predicate) => predicate(response));
    if (at >= 0) {
      w.allowed.splice(at, 1);
      return;
    }
    w.problems.push(`HTTP ${response.status()}: ${response.request().method()} ${response.url()}`);
  });
  page.on('console', (message) => {
    // Error statuses are judged by the response listener above (Chromium logs every one).
    if (message.type() === 'error' && !message.text().startsWith('Failed to load resource')) {
      w.problems.push(`console error: ${message.text()}`);
    }
  });
  return w;
}

/** Waits until no request of the page is in flight. */
async function idle(watcher) {
  const deadline = Date.now() + READY_MS_MAX;
  while (watcher.inFlight > 0) {
    if (Date.now() > deadline) throw new Error(`${watcher.inFlight} requests still in flight`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

// Pages that refresh themselves; a full navigation away from one could cut a refresh short.
const POLLING_PAGES = ['pool', 'backends'];

/** Waits until the console rendered page `name` (the `data-page` of `<main>`). */
async function ready(page, name) {
  const main = `main[data-page="${name}"]`;
  await page.waitForSelector(`${main}[data-state="ready"], ${main}[data-state="error"]`);
  if ((await page.getAttribute('main', 'data-state')) === 'error') {
    throw new Error(`the ${name} page failed: ${await page.textContent('#banner')}`);
  }
}

/**
 * Opens `hash` (`#/usage?...`) as one page view and returns its API calls: a full page load when
 * `full`, else a hash navigation from the current page. Asserts the call budget.
 */
async function view(page, watcher, server, hash, name, { full = false } = {}) {
  let start = watcher.api.length;
  if (full) {
    const current = await page.evaluate(() => document.querySelector('main') && document.querySelector('main').dataset.page);
    if (POLLING_PAGES.includes(current)) {
      // Leave through a page that does not refresh, then let the last refresh finish.
      await page.evaluate(() => {
        window.location.hash = '#/audit';
      });
      await ready(page, 'audit');
    }
    await idle(watcher);
    await page.goto('about:blank');
    start = watcher.api.length;
    await page.goto(server.consoleUrl(hash));
  } else {
    await page.evaluate((h) => {
      window.location.hash = h;
    }, hash);
  }
  await ready(page, name);
  const calls = watcher.api.slice(start);
  assert.ok(calls.length <= CALLS_PER_VIEW_MAX, `${name} (${full ? 'full load' : 'hash navigation'}) made ${calls.length} API calls: ${calls.join(', ')}`);
  return calls;
}

/** axe-core in the page: no serious or critical violation. */
async function assertAccessible(page, label) {
  const loaded = await page.evaluate(() => typeof window.axe !== 'undefined');
  if (!loaded) await page.evaluate(AXE_SOURCE);
  const result = await page.evaluate(() => window.axe.run(document, { resultTypes: ['violations'] }));
  const bad = result.violations
    .filter((v) => v.impact === 'serious' || v.impact === 'critical')
    .map((v) => `${v.impact} ${v.id}: ${v.help} (${v.nodes.map((n) => n.target.join(' ')).slice(0, 3).join(' | ')})`);
  assert.deepEqual(bad, [], `${label}: accessibility violations`);
}

/** A 1280×800 PNG into docs/console/ when TIDEPOOL_CONSOLE_SCREENSHOTS=1. */
async function screenshot(page, name) {
  if (process.env.TIDEPOOL_CONSOLE_SCREENSHOTS !== '1') return;
  fs.mkdirSync(SCREENSHOT_DIR, { recursive: true });
  await page.mouse.move(0, 0);
  await page.screenshot({ path: path.join(SCREENSHOT_DIR, `${name}.png`) });
}

/** Signs in through the form (`kind`: `api_key` or `admin_token`) and waits for page `landing`. */
async function signIn(page, kind, secret, landing) {
  await ready(page, 'signin');
  await page.check(kind === 'admin_token' ? '#signin-kind-operator' : '#signin-kind-key');
  await page.fill('#signin-secret', secret);
  await page.click('#signin-form button[type="submit"]');
  if (landing) await ready(page, landing);
}

async function signOut(page) {
  await page.click('#sign-out');
  await ready(page, 'signin');
}

module.exports = { launch, newPage, watch, idle, ready, view, assertAccessible, screenshot, signIn, signOut, CALLS_PER_VIEW_MAX };
