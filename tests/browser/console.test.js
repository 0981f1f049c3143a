'use strict';
// Browser tests of the web console against real servers: a gateway (`tidepool serve` on the real
// SmolLM2 model, SQLite, an admin token) with a `tidepool worker` as its remote backend, and a
// second gateway configured with `[server] base_path = "/gw"`. Debian's chromium, driven by
// playwright-core; axe-core checks accessibility inside each page. Every test also fails on an
// uncaught page error, a failed request or an unexpected HTTP error status.
//
// Run with `make browser-test`; TIDEPOOL_CONSOLE_SCREENSHOTS=1 also writes docs/console/*.png,
// TIDEPOOL_KEEP_TEST_DIRS=1 keeps each server's directory (database, config, log).

const { test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const { Tidepool, CHAT_MODEL, chatModelToml, nanosField, sleep, waitFor } = require('./lib/servers');
const B = require('./lib/browser');

const REMOTE_MODEL = 'smol-remote';
const WORKER_BACKEND = 'worker-1';
const SUB_PATH = '/gw';
const POLL_INTERVAL_MS = 3000; // the console's refresh period of the pool and backends pages
const TEST_MS_MAX = 600_000;
const TENANT_PAGES = ['usage', 'keys', 'billing'];
const OPERATOR_PAGES = ['tenants', 'pool', 'backends', 'audit'];

let worker;
let gateway;
let sub;
let browser;
const keys = {};
const subKeys = {};

const month = () => new Date().toISOString().slice(0, 7);

function gatewayToml({ basePath, backend }) {
  return (port, dir) => {
    let toml = `[server]
database_url = "sqlite://${dir}/tidepool.db"
${basePath ? `base_path = "${basePath}"` : ''}

[pool]
# The budget of the largest model: the pool page shows memory against it.
memory_models_max = 1
${chatModelToml()}`;
    if (backend) {
      toml += `
[[models]]
id = "${REMOTE_MODEL}"
kind = "chat"
backend = "remote"
price_input_per_mtok = 60_000_000
price_output_per_mtok = 240_000_000

[[backends]]
id = "${WORKER_BACKEND}"
kind = "worker"
url = "${backend.url}"
region = "local"
zone = "local-b"
api_key_file = "${backend.keyFile}"
models = ["${REMOTE_MODEL}"]
aliases = { ${REMOTE_MODEL} = "${CHAT_MODEL}" }

[routing]
health_interval_ms = 250
`;
    }
    return toml;
  };
}

async function chatOk(server, key, options) {
  const r = await server.chat(key, options);
  assert.equal(r.status, 200, `chat with ${options && options.model ? options.model : CHAT_MODEL}: ${r.text}`);
  return r.json;
}

/** The worker, then the gateway that uses it as a backend. */
async function startGatewayWithWorker() {
  worker = new Tidepool({
    name: 'worker',
    command: ['worker', '--region', 'local', '--zone', 'local-b'],
    admin: false,
    config: (port, dir) => `[server]
database_url = "sqlite://${dir}/tidepool.db"

[billing]
enforce = false
${chatModelToml()}`,
  });
  await worker.start();
  const out = worker.cli('keys', 'create', '--database-url', worker.databaseUrl, '--tenant', 'gateway', '--create-tenant', '--name', 'gateway');
  const token = /\btp-[A-Za-z0-9_-]+/.exec(out);
  assert.ok(token, `no key in: ${out}`);
  const keyFile = `${worker.dir}/gateway.key`;
  fs.writeFileSync(keyFile, token[0], { mode: 0o600 });

  gateway = new Tidepool({ name: 'gateway', command: ['serve'], config: gatewayToml({ backend: { url: worker.origin(), keyFile } }) });
  await gateway.start();
  await gateway.createTenant('acme', '100');
  await gateway.admin('POST', '/admin/tenants/acme/projects', { project: 'research' });
  await gateway.createTenant('globex', '50');
  keys.acmeAdmin = await gateway.createKey('acme', 'console', { role: 'tenant-admin' });
  keys.acmeApp = await gateway.createKey('acme', 'app');
  keys.acmeBatch = await gateway.createKey('acme', 'batch', { project: 'research' });
  keys.globexApp = await gateway.createKey('globex', 'app');
  await gateway.admin('PUT', '/admin/budgets', { scope: 'project', tenant: 'acme', project: 'default', limit: '5.00' });
  // Real usage: two projects, three keys, a local and a remote model, two tenants.
  await chatOk(gateway, keys.acmeApp.key, { content: 'Name a colour.' });
  await chatOk(gateway, keys.acmeApp.key, { content: 'Name a fruit.', maxTokens: 12 });
  await chatOk(gateway, keys.acmeBatch.key, { content: 'Count to three.' });
  await chatOk(gateway, keys.acmeApp.key, { model: REMOTE_MODEL, content: 'Name a river.' });
  await chatOk(gateway, keys.globexApp.key, { content: 'Name a city.' });
}

async function startSubPathGateway() {
  sub = new Tidepool({ name: 'gateway-gw', command: ['serve'], basePath: SUB_PATH, config: gatewayToml({ basePath: SUB_PATH }) });
  await sub.start();
  await sub.createTenant('acme', '10');
  subKeys.admin = await sub.createKey('acme', 'console', { role: 'tenant-admin' });
  subKeys.app = await sub.createKey('acme', 'app');
  await chatOk(sub, subKeys.app.key, { content: 'Name a bird.' });
}

before(async () => {
  browser = await B.launch();
  await startGatewayWithWorker();
  await startSubPathGateway();
}, { timeout: TEST_MS_MAX });

after(async () => {
  if (browser) await browser.close();
  for (const server of [sub, gateway, worker]) {
    if (!server) continue;
    await server.stop();
    server.removeDir();
  }
});

/**
 * The tenant's usage as the ledger reports it to the operator (`GET /admin/tenants/T/usage`, the
 * report `/v1/usage?scope=tenant` gives a key; asking for it with a key would add a request of
 * its own to the numbers compared).
 */
async function ledgerUsage(server, tenant, query = '') {
  const r = await server.request('GET', `/admin/tenants/${tenant}/usage${query ? `?${query}` : ''}`, { bearer: server.adminToken });
  assert.equal(r.status, 200, r.text);
  return { total: nanosField(r.text, 'total_cost_nanos'), data: r.json.data };
}

/** The ledger's name of "no model" (requests that failed before one was resolved). */
const NO_MODEL = '(none)';

/** The daily rollup's cost total (what the usage page reads), summed exactly. */
async function rollupTotal(server, tenant) {
  const r = await server.request('GET', `/admin/tenants/${tenant}/usage/daily?days=30`, { bearer: server.adminToken });
  assert.equal(r.status, 200, r.text);
  return [...r.text.matchAll(/"cost_nanos"\s*:\s*(-?\d+)/g)].reduce((sum, m) => sum + BigInt(m[1]), 0n);
}

/** A page signed in through the form; `kind` is `api_key` or `admin_token`. */
async function signedIn(server, kind, secret, hash, landing) {
  const session = await B.newPage(browser);
  session.watcher.allowSignedOutCheck();
  await session.page.goto(server.consoleUrl(hash));
  await B.signIn(session.page, kind, secret, landing);
  return session;
}

test('sign-in: refused keys show the API message; a tenant admin signs in, stays signed in and signs out', { timeout: TEST_MS_MAX }, async () => {
  const { context, page, watcher } = await B.newPage(browser);
  try {
    watcher.allowSignedOutCheck();
    await page.goto(gateway.consoleUrl());
    await B.ready(page, 'signin');

    const signInDirect = (body) => gateway.request('POST', '/console/api/session', { body, headers: { 'X-Tidepool-Console': '1' } });
    const wrong = await signInDirect({ api_key: 'tp-not-a-key' });
    assert.equal(wrong.status, 401);
    watcher.allow((r) => r.status() === 401 && r.url().endsWith('/console/api/session'));
    await B.signIn(page, 'api_key', 'tp-not-a-key');
    await page.waitForSelector('#banner:not([hidden])');
    assert.equal(await page.textContent('#banner'), wrong.json.error.message);

    const inference = await signInDirect({ api_key: keys.acmeApp.key });
    assert.equal(inference.status, 403);
    assert.equal(inference.json.error.code, 'console_role_required');
    watcher.allow((r) => r.status() === 403 && r.url().endsWith('/console/api/session'));
    await page.fill('#signin-secret', keys.acmeApp.key);
    await page.click('#signin-form button[type="submit"]');
    await page.waitForFunction((m) => document.getElementById('banner').textContent === m, inference.json.error.message);

    await page.evaluate(() => {
      window.location.hash = '#/keys';
    });
    await page.fill('#signin-secret', keys.acmeAdmin.key);
    await page.click('#signin-form button[type="submit"]');
    await B.ready(page, 'keys');
    assert.match(await page.textContent('#who'), /acme/);
    const cookie = (await context.cookies()).find((c) => c.name === 'tidepool_console');
    assert.ok(cookie, 'the session cookie is set');
    assert.equal(cookie.httpOnly, true);
    assert.equal(cookie.sameSite, 'Strict');
    assert.equal(cookie.path, '/');
    assert.ok(!(await page.content()).includes(keys.acmeAdmin.key), 'the key is not kept in the page');

    // The cookie keeps the session across a reload; the session is checked once per load.
    const calls = await B.view(page, watcher, gateway, '#/billing', 'billing', { full: true });
    assert.equal(calls.filter((c) => c.includes('/console/api/session')).length, 1);

    await B.signOut(page);
    watcher.allowSignedOutCheck();
    await page.reload();
    await B.ready(page, 'signin');
    watcher.assertClean('sign-in');
  } finally {
    await context.close();
  }
});

test('keys: a new key\'s secret is shown once; once revoked, the API refuses it', { timeout: TEST_MS_MAX }, async () => {
  const { context, page, watcher } = await signedIn(gateway, 'api_key', keys.acmeAdmin.key, '#/keys', 'keys');
  try {
    await context.grantPermissions(['clipboard-read', 'clipboard-write']);
    await page.fill('#key-name', 'temporary');
    await page.selectOption('#key-project', 'research');
    await page.selectOption('#key-role', 'inference');
    const before = watcher.api.length;
    await page.click('#key-create button[type="submit"]');
    await page.waitForSelector('#secret-dialog[open]');
    assert.deepEqual(watcher.api.slice(before), ['POST /admin/keys'], 'creating a key is one call');
    const secret = await page.inputValue('#secret-value');
    assert.match(secret, /^tp-/);
    await B.assertAccessible(page, 'keys with the secret dialog');
    await page.click('#secret-copy');
    await page.waitForFunction(() => document.getElementById('secret-status').textContent.startsWith('Copied'));
    assert.equal(await page.evaluate(() => navigator.clipboard.readText()), secret);

    // The secret works, and the page forgets it once the dialog is closed.
    assert.equal((await gateway.chat(secret, { maxTokens: 1 })).status, 200);
    await page.click('#secret-close');
    await page.waitForFunction(() => !document.getElementById('secret-dialog').open);
    assert.ok(!(await page.content()).includes(secret), 'the secret is gone from the page');
    const keyId = await page.getAttribute('#keys-table tbody tr[data-key-id]:has-text("temporary")', 'data-key-id');
    assert.ok(keyId);
    await B.view(page, watcher, gateway, '#/keys', 'keys', { full: true });
    assert.ok(!(await page.content()).includes(secret), 'the secret is never shown again');
    const row = `#keys-table tr[data-key-id="${keyId}"]`;
    assert.match(await page.textContent(row), /research/);

    // Revoke with confirmation; the API refuses the key at once.
    await page.click(`${row} button[data-revoke]`);
    await page.waitForSelector('#confirm-dialog[open]');
    await B.assertAccessible(page, 'keys with the confirmation dialog');
    await page.click('#confirm-ok');
    await page.waitForSelector(`${row}.revoked`);
    const refused = await gateway.chat(secret, { maxTokens: 1 });
    assert.equal(refused.status, 401, refused.text);
    await B.view(page, watcher, gateway, '#/keys', 'keys', { full: true });
    await page.waitForSelector(`${row}.revoked`);
    assert.match(await page.textContent(`${row} td.status`), /revoked/);
    watcher.assertClean('keys');
  } finally {
    await context.close();
  }
});

/** Presses Tab until `selector` has the focus (at most `pressesMax` times). */
async function tabTo(page, selector, pressesMax = 40) {
  for (let i = 0; i < pressesMax; i += 1) {
    if (await page.evaluate((sel) => document.activeElement && document.activeElement.matches(sel), selector)) return;
    await page.keyboard.press('Tab');
  }
  throw new Error(`${selector} never got the focus`);
}

test('keyboard: sign in, change pages, create and revoke a key without a mouse', { timeout: TEST_MS_MAX }, async () => {
  const { context, page, watcher } = await B.newPage(browser);
  try {
    watcher.allowSignedOutCheck();
    await page.goto(gateway.consoleUrl('#/keys'));
    await B.ready(page, 'signin');
    await tabTo(page, '#signin-secret');
    await page.keyboard.type(keys.acmeAdmin.key);
    await page.keyboard.press('Enter');
    await B.ready(page, 'keys');

    await tabTo(page, '#nav-list a[href="#/billing"]');
    await page.keyboard.press('Enter');
    await B.ready(page, 'billing');
    await tabTo(page, '#nav-list a[href="#/keys"]');
    await page.keyboard.press('Enter');
    await B.ready(page, 'keys');

    await tabTo(page, '#key-name');
    await page.keyboard.type('keyboard');
    await page.keyboard.press('Enter');
    await page.waitForSelector('#secret-dialog[open]');
    assert.equal(await page.evaluate(() => document.activeElement.id), 'secret-value', 'the dialog takes the focus');
    await page.keyboard.press('Escape');
    await page.waitForFunction(() => !document.getElementById('secret-dialog').open);
    assert.equal(await page.inputValue('#secret-value'), '', 'closing the dialog forgets the secret');

    const keyId = await page.getAttribute('#keys-table tbody tr[data-key-id]:has-text("keyboard")', 'data-key-id');
    await tabTo(page, `button[data-revoke="${keyId}"]`);
    await page.keyboard.press('Enter');
    await page.waitForSelector('#confirm-dialog[open]');
    assert.equal(await page.evaluate(() => document.activeElement.id), 'confirm-cancel', 'the safe choice has the focus');
    await page.keyboard.press('Tab');
    await page.keyboard.press('Enter');
    await page.waitForSelector(`#keys-table tr[data-key-id="${keyId}"].revoked`);
    watcher.assertClean('keyboard');
  } finally {
    await context.close();
  }
});

test('usage: the chart\'s and the table\'s totals equal the ledger\'s; the CSV export carries them', { timeout: TEST_MS_MAX }, async () => {
  // What a key of the tenant is told; that call is a (free) request of its own, recorded once
  // it answered, so the ledger's report is read after it shows up there.
  const own = await gateway.request('GET', '/v1/usage?scope=tenant', { bearer: keys.acmeApp.key });
  assert.equal(own.status, 200, own.text);
  const ownRequests = own.json.data.reduce((n, m) => n + m.requests, 0);
  const ledger = await waitFor('the ledger to record the usage request', async () => {
    const report = await ledgerUsage(gateway, 'acme');
    return report.data.reduce((n, m) => n + m.requests, 0) === ownRequests + 1 && report;
  }, 30_000);
  assert.ok(ledger.total > 0n, 'seeded usage costs something');
  assert.equal(nanosField(own.text, 'total_cost_nanos'), ledger.total, 'a key of the tenant is told the same cost');
  assert.equal(await rollupTotal(gateway, 'acme'), ledger.total, 'the daily rollup holds every request');
  const tokens = ledger.data.reduce((n, m) => n + m.prompt_tokens + m.completion_tokens, 0);
  const requests = ledger.data.reduce((n, m) => n + m.requests, 0);

  const { context, page, watcher } = await signedIn(gateway, 'api_key', keys.acmeAdmin.key, '#/usage', 'usage');
  try {
    assert.equal(BigInt(await page.getAttribute('#usage-total-cost', 'data-nanos')), ledger.total);
    assert.equal(await page.getAttribute('#usage-chart', 'data-metric'), 'cost');
    assert.equal(BigInt(await page.getAttribute('#usage-chart', 'data-total')), ledger.total);
    // The chart's bars add up to the same total.
    const barSum = await page.$$eval('#usage-chart rect[data-value]', (rects) => rects.reduce((s, r) => s + BigInt(r.dataset.value), 0n).toString());
    assert.equal(BigInt(barSum), ledger.total);
    // Every model of the ledger is a row of the table, with the ledger's cost.
    for (const m of ledger.data) {
      const cell = `#usage-table tr[data-group="${m.model === NO_MODEL ? '' : m.model}"] td[data-nanos]`;
      assert.equal(await page.getAttribute(cell, 'data-nanos'), String(m.cost_nanos), `cost of ${m.model}`);
    }

    await page.click('button[data-metric="tokens"]');
    await page.waitForSelector('#usage-chart[data-metric="tokens"]');
    assert.equal(Number(await page.getAttribute('#usage-chart', 'data-total')), tokens);
    await page.click('button[data-metric="requests"]');
    await page.waitForSelector('#usage-chart[data-metric="requests"]');
    assert.equal(Number(await page.getAttribute('#usage-chart', 'data-total')), requests);
    assert.match(page.url(), /metric=requests/);

    // Stacked by key: one row per key that has usage; the total does not move.
    const before = watcher.api.length;
    await page.selectOption('#usage-group', 'key');
    await page.waitForSelector(`#usage-table tr[data-group="${keys.acmeBatch.key_id}"]`);
    assert.equal(watcher.api.length, before, 'regrouping needs no new call');
    assert.match(page.url(), /group=key/);
    for (const key of [keys.acmeApp, keys.acmeBatch]) {
      const ofKey = await ledgerUsage(gateway, 'acme', `key_id=${key.key_id}`);
      assert.equal(BigInt(await page.getAttribute(`#usage-table tr[data-group="${key.key_id}"] td[data-nanos]`, 'data-nanos')), ofKey.total, `cost of key ${key.name}`);
      assert.match(await page.textContent(`#usage-table tr[data-group="${key.key_id}"] th`), new RegExp(`^${key.name} `));
    }
    assert.equal(BigInt(await page.getAttribute('#usage-total-cost', 'data-nanos')), ledger.total);

    const [download] = await Promise.all([page.waitForEvent('download'), page.click('#usage-export')]);
    const csv = fs.readFileSync(await download.path(), 'utf8').trim().split('\r\n').map((line) => line.split(','));
    const header = csv[0];
    assert.deepEqual(header.slice(0, 2), ['key_id', 'key_name']);
    const costAt = header.indexOf('cost_nanos');
    assert.equal(csv.slice(1).reduce((s, row) => s + BigInt(row[costAt]), 0n), ledger.total);
    assert.equal(csv.slice(1).reduce((s, row) => s + Number(row[header.indexOf('requests')]), 0), requests);
    assert.match(download.suggestedFilename(), /^tidepool-usage-acme-.*-by-key\.csv$/);

    // The filters live in the hash: a reload shows the same view.
    await B.view(page, watcher, gateway, '#/usage?group=project&metric=tokens', 'usage', { full: true });
    assert.equal(await page.inputValue('#usage-group'), 'project');
    assert.equal(await page.getAttribute('button[data-metric="tokens"]', 'aria-pressed'), 'true');
    assert.equal(Number(await page.getAttribute('#usage-chart', 'data-total')), tokens);
    await page.waitForSelector('#usage-table tr[data-group="research"]');
    watcher.assertClean('usage');
  } finally {
    await context.close();
  }
});

test('billing: balance, budgets and the month\'s statement are the ledger\'s', { timeout: TEST_MS_MAX }, async () => {
  const account = await gateway.request('GET', '/admin/tenants/acme', { bearer: gateway.adminToken });
  const balance = nanosField(account.text, 'balance_nanos');
  const { context, page, watcher } = await signedIn(gateway, 'api_key', keys.acmeAdmin.key, '#/keys', 'keys');
  try {
    // Opened from another page: balance, budgets and statement in one view.
    await B.view(page, watcher, gateway, '#/billing', 'billing');
    assert.equal(BigInt(await page.getAttribute('#billing-account dd[data-nanos]', 'data-nanos')), balance);
    assert.match(await page.textContent('#budgets-table'), /default[\s\S]*5\.00 USD/);
    assert.equal(BigInt(await page.getAttribute('#statement-closing', 'data-nanos')), balance);
    assert.match(await page.textContent('#statement-table'), new RegExp(`Statement for ${month()}`));

    // A fresh load (session check, account with its budgets, statement: three calls) shows the
    // statement too, and the button loads it again.
    await B.view(page, watcher, gateway, `#/billing?month=${month()}`, 'billing', { full: true });
    assert.equal(BigInt(await page.getAttribute('#statement-closing', 'data-nanos')), balance);
    assert.match(await page.textContent('#budgets-table'), /default[\s\S]*5\.00 USD/);
    await page.click('#statement-show');
    await page.waitForSelector('#statement-closing');
    assert.equal(BigInt(await page.getAttribute('#statement-closing', 'data-nanos')), balance);
    watcher.assertClean('billing');
  } finally {
    await context.close();
  }
});

test('tenant admin: operator pages stay closed and other tenants do not exist', { timeout: TEST_MS_MAX }, async () => {
  const { context, page, watcher } = await signedIn(gateway, 'api_key', keys.acmeAdmin.key, '#/keys', 'keys');
  try {
    const links = await page.$$eval('#nav-list a', (as) => as.map((a) => a.textContent));
    assert.deepEqual(links, ['Usage', 'API keys', 'Billing']);
    for (const name of OPERATOR_PAGES) {
      const calls = await B.view(page, watcher, gateway, `#/${name}`, name);
      assert.deepEqual(calls, [], `${name} makes no call for a tenant admin`);
      assert.match(await page.textContent('#page'), /for the operator/);
    }
    // The cookie is a tenant admin's of acme: globex and the operator API answer 404.
    for (const route of ['../admin/tenants/globex', '../admin/tenants/globex/keys', '../v1/pool']) {
      watcher.allow((r) => r.status() === 404);
      const status = await page.evaluate((u) => fetch(u, { credentials: 'same-origin' }).then((r) => r.status), route);
      assert.equal(status, 404, route);
    }
    watcher.assertClean('tenant admin');
  } finally {
    await context.close();
  }
});

test('operator: the tenants page shows every tenant\'s spend this month', { timeout: TEST_MS_MAX }, async () => {
  const acme = await ledgerUsage(gateway, 'acme', `month=${month()}`);
  const globex = await ledgerUsage(gateway, 'globex', `month=${month()}`);
  const { context, page, watcher } = await signedIn(gateway, 'admin_token', gateway.adminToken, '#/tenants', 'tenants');
  try {
    assert.match(await page.textContent('#who'), /operator/);
    assert.equal(BigInt(await page.getAttribute('#tenants-table tr[data-tenant="acme"] td[data-nanos]', 'data-nanos')), acme.total);
    assert.equal(BigInt(await page.getAttribute('#tenants-table tr[data-tenant="globex"] td[data-nanos]', 'data-nanos')), globex.total);
    // From a tenant's row to that tenant's usage, as the operator.
    await page.click('#tenants-table tr[data-tenant="globex"] a[aria-label="Usage of globex"]');
    await B.ready(page, 'usage');
    assert.equal(BigInt(await page.getAttribute('#usage-total-cost', 'data-nanos')), globex.total);
    assert.match(await page.textContent('h1'), /globex/);
    watcher.assertClean('tenants');
  } finally {
    await context.close();
  }
});

test('operator: the pool page shows the model load a request caused, and stops refreshing when left', { timeout: TEST_MS_MAX }, async () => {
  await gateway.admin('POST', `/admin/models/${CHAT_MODEL}/unload`, undefined, [202]);
  const cold = await waitFor('the chat model to be cold', async () => {
    const r = await gateway.request('GET', '/v1/pool', { bearer: gateway.adminToken });
    return r.json.models.find((m) => m.id === CHAT_MODEL).state === 'cold' && r.json;
  });
  const { context, page, watcher } = await signedIn(gateway, 'admin_token', gateway.adminToken, '#/pool', 'pool');
  try {
    const row = `#pool-table tr[data-model="${CHAT_MODEL}"]`;
    await page.waitForSelector(`${row}[data-state="cold"]`);
    assert.ok(Number(await page.getAttribute('#pool-loads', 'data-loads')) >= cold.counters.loads);
    await chatOk(gateway, keys.acmeApp.key, { content: 'Name a tree.' });
    // The page refreshes itself: the model is resident and one more load is counted.
    await page.waitForSelector(`${row}[data-state="resident"]`);
    await page.waitForFunction((n) => Number(document.getElementById('pool-loads').dataset.loads) > n, cold.counters.loads);

    await B.view(page, watcher, gateway, '#/audit', 'audit');
    await B.idle(watcher);
    const calls = watcher.api.length;
    await sleep(POLL_INTERVAL_MS + 1000);
    assert.equal(watcher.api.length, calls, 'no refresh after leaving the pool page');
    watcher.assertClean('pool');
  } finally {
    await context.close();
  }
});

test('operator: the audit log lists key changes under a verified chain', { timeout: TEST_MS_MAX }, async () => {
  const { context, page, watcher } = await signedIn(gateway, 'admin_token', gateway.adminToken, '#/audit', 'audit');
  try {
    const audit = await gateway.request('GET', '/admin/audit?after=0&limit=1000', { bearer: gateway.adminToken });
    assert.equal(audit.status, 200, audit.text);
    assert.equal(await page.getAttribute('#audit-chain', 'data-chain-ok'), 'true');
    const shown = await page.$$eval('#audit-table tbody tr', (rows) => rows.map((r) => Number(r.dataset.seq)));
    const expected = audit.json.data.map((e) => e.seq).slice(-100).reverse();
    assert.deepEqual(shown, expected, 'the newest entries, newest first');
    const actions = await page.$$eval('#audit-table tbody th', (cells) => cells.map((c) => c.textContent));
    assert.ok(actions.some((a) => a.startsWith('key.') && a.includes('revoke')), `a revocation is listed: ${actions}`);
    assert.ok(actions.some((a) => a.startsWith('key.') && a.includes('create')), `a creation is listed: ${actions}`);
    watcher.assertClean('audit');
  } finally {
    await context.close();
  }
});

/** Every page of both roles: full loads and hash navigations within the call budget, no errors, accessible. */
async function sweep(server, adminKey, label, { screenshots }) {
  const { context, page, watcher } = await B.newPage(browser);
  try {
    watcher.allowSignedOutCheck();
    await page.goto(server.consoleUrl());
    await B.ready(page, 'signin');
    await B.assertAccessible(page, `${label} sign-in`);
    if (screenshots) await B.screenshot(page, 'signin');
    for (const [kind, secret, pages] of [['api_key', adminKey, TENANT_PAGES], ['admin_token', server.adminToken, OPERATOR_PAGES]]) {
      await B.signIn(page, kind, secret, pages[0]);
      for (const name of pages) {
        await B.view(page, watcher, server, `#/${name}`, name, { full: true });
        await B.assertAccessible(page, `${label} ${name} (full load)`);
      }
      for (const name of [...pages.slice(1), pages[0]]) {
        await B.view(page, watcher, server, `#/${name}`, name);
        await B.assertAccessible(page, `${label} ${name}`);
        if (screenshots) await B.screenshot(page, name);
      }
      if (kind === 'admin_token') {
        // The operator's view of one tenant's pages.
        for (const name of TENANT_PAGES) {
          await B.view(page, watcher, server, `#/${name}?tenant=acme`, name);
          await B.assertAccessible(page, `${label} operator ${name}`);
        }
      }
      await B.view(page, watcher, server, `#/${pages[0]}`, pages[0]);
      await B.idle(watcher);
      await B.signOut(page);
    }
    watcher.assertClean(label);
  } finally {
    await context.close();
  }
}

test('every page: at most 3 API calls per view, no errors, no serious accessibility violation', { timeout: TEST_MS_MAX }, async () => {
  await sweep(gateway, keys.acmeAdmin.key, 'root', { screenshots: true });
});

test('operator: a killed worker is shown down on the backends page', { timeout: TEST_MS_MAX }, async () => {
  const { context, page, watcher } = await signedIn(gateway, 'admin_token', gateway.adminToken, '#/backends', 'backends');
  try {
    const row = `#backends-table tr[data-backend="${WORKER_BACKEND}"]`;
    await page.waitForSelector(`${row}[data-healthy="true"]`);
    assert.equal((await page.textContent(`${row} td.health`)).trim(), 'up');
    await worker.kill();
    // The gateway's prober sees the dead worker; the page, refreshing itself, shows it.
    await page.waitForSelector(`${row}[data-healthy="false"]`);
    assert.equal((await page.textContent(`${row} td.health`)).trim(), 'down');
    const api = await gateway.request('GET', '/v1/backends', { bearer: gateway.adminToken });
    assert.equal(api.json.data.find((b) => b.id === WORKER_BACKEND).healthy, false);
    await B.assertAccessible(page, 'backends with a backend down');
    watcher.assertClean('backends');
  } finally {
    await context.close();
  }
});

test('under a base path: the console and its API calls stay under /gw', { timeout: TEST_MS_MAX }, async () => {
  const redirect = await fetch(sub.url('/console'), { redirect: 'manual' });
  assert.ok([301, 302, 303, 307, 308].includes(redirect.status), `GET ${SUB_PATH}/console → ${redirect.status}`);
  assert.equal(new URL(redirect.headers.get('location'), sub.url('/console')).pathname, `${SUB_PATH}/console/`);
  const outside = await fetch(`${sub.origin()}/console/`);
  assert.equal(outside.status, 404, 'nothing is served outside the base path');

  const { context, page, watcher } = await signedIn(sub, 'api_key', subKeys.admin.key, '#/keys', 'keys');
  try {
    const cookie = (await context.cookies()).find((c) => c.name === 'tidepool_console');
    assert.equal(cookie.path, `${SUB_PATH}/`);
    const ledger = await ledgerUsage(sub, 'acme');
    await waitFor('the daily rollup', async () => (await rollupTotal(sub, 'acme')) === ledger.total, 30_000);
    await B.view(page, watcher, sub, '#/usage', 'usage', { full: true });
    assert.equal(BigInt(await page.getAttribute('#usage-total-cost', 'data-nanos')), ledger.total);
    const paths = watcher.api.map((c) => c.split(' ')[1]);
    assert.ok(paths.length > 0 && paths.every((p) => p.startsWith(`${SUB_PATH}/`)), `every call under ${SUB_PATH}: ${paths}`);
    watcher.assertClean('base path');
  } finally {
    await context.close();
  }
  await sweep(sub, subKeys.admin.key, 'base path', { screenshots: false });
});

test('money is formatted exactly from the JSON text', { timeout: TEST_MS_MAX }, async () => {
  const { context, page, watcher } = await B.newPage(browser);
  try {
    watcher.allowSignedOutCheck();
    await page.goto(gateway.consoleUrl());
    await B.ready(page, 'signin');
    const out = await page.evaluate(async () => {
      const m = await import(new URL('app.js', document.baseURI).href);
      const parsed = m.parseJson('{"cost_nanos": 9007199254740993, "n": 1.5}');
      return {
        big: parsed.cost_nanos.toString(),
        n: parsed.n,
        formatted: m.formatNanos(parsed.cost_nanos, 'USD'),
        small: m.formatNanos(1n, 'EUR'),
        whole: m.formatNanos(5_000_000_000n),
        negative: m.formatNanos(-1_500_000_000n),
        csv: m.decimalNanos(-1_500_000_000n),
        zero: m.decimalNanos(0n),
      };
    });
    assert.deepEqual(out, {
      big: '9007199254740993',
      n: 1.5,
      formatted: '9,007,199.254740993 USD',
      small: '0.000000001 EUR',
      whole: '5.00',
      negative: '-1.50',
      csv: '-1.5',
      zero: '0',
    });
    watcher.assertClean('money');
  } finally {
    await context.close();
  }
});
