'use strict';
// Real `tidepool` processes for the browser tests: a gateway (`tidepool serve`, real models from
// TIDEPOOL_MODELS_DIR, a fresh SQLite database in a temp dir, a free loopback port, an admin
// token) and optionally a `tidepool worker` it uses as a remote backend. Tenants, projects,
// keys, credit and budgets are made through the admin API, like an operator would.

const { spawn, execFileSync } = require('node:child_process');
const fs = require('node:fs');
const net = require('node:net');
const os = require('node:os');
const path = require('node:path');
const crypto = require('node:crypto');

const STARTUP_MS_MAX = 300_000; // model calibration on a cold page cache, debug binary
const STOP_MS_MAX = 30_000;
const REQUEST_MS_MAX = 120_000;
const CHAT_MODEL = 'smollm2-135m-instruct';

function bin() {
  const file = process.env.TIDEPOOL_BIN;
  if (!file) throw new Error('TIDEPOOL_BIN is not set: run `make browser-test`');
  return file;
}

function modelsDir() {
  return process.env.TIDEPOOL_MODELS_DIR || path.join(os.homedir(), '.cache/tidepool/models');
}

function freePort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Polls `probe` (an async function returning a truthy value when done) up to `ms`. */
async function waitFor(what, probe, ms = 60_000, everyMs = 200) {
  const deadline = Date.now() + ms;
  let last;
  for (;;) {
    try {
      last = await probe();
      if (last) return last;
    } catch (error) {
      last = error;
    }
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what} (last: ${last instanceof Error ? last.message : JSON.stringify(last)})`);
    await sleep(everyMs);
  }
}

/** The chat model every server here runs locally. */
function chatModelToml(seqsMax = 4) {
  return `
[[models]]
id = "${CHAT_MODEL}"
kind = "chat"
file = "SmolLM2-135M-Instruct.Q4_1.gguf"
context_tokens = 2048
seqs_max = ${seqsMax}
price_input_per_mtok = 50_000_000
price_output_per_mtok = 200_000_000
`;
}

class Tidepool {
  /**
   * @param {object} o
   * @param {string} o.name       label in errors and the log file name
   * @param {(port: number, dir: string) => string} o.config  the TOML text
   * @param {string[]} o.command  `['serve']` or `['worker', '--region', R, '--zone', Z]`
   * @param {string} [o.basePath] the configured `[server] base_path`
   * @param {boolean} [o.admin]   start with an admin token
   */
  constructor({ name, config, command, basePath = '', admin = true }) {
    this.name = name;
    this.dir = fs.mkdtempSync(path.join(os.tmpdir(), `tidepool-browser-${name}-`));
    this.makeConfig = config;
    this.command = command;
    this.basePath = basePath;
    this.adminToken = admin ? `admin-${crypto.randomBytes(12).toString('hex')}` : null;
    this.databaseUrl = `sqlite://${path.join(this.dir, 'tidepool.db')}`;
    this.proc = null;
  }

  get logFile() {
    return path.join(this.dir, 'server.log');
  }

  origin() {
    return `http://127.0.0.1:${this.port}`;
  }

  /** An absolute URL of a route (`/v1/models`) under the base path. */
  url(route) {
    return `${this.origin()}${this.basePath}${route}`;
  }

  consoleUrl(hash = '') {
    return this.url(`/console/${hash}`);
  }

  env() {
    return { ...process.env, TIDEPOOL_MODELS_DIR: modelsDir(), RUST_LOG: process.env.RUST_LOG || 'info' };
  }

  /** Runs the CLI against this server's database; returns stdout. */
  cli(...args) {
    return execFileSync(bin(), args, { cwd: this.dir, env: this.env(), encoding: 'utf8', timeout: REQUEST_MS_MAX });
  }

  async start() {
    this.port = await freePort();
    this.configFile = path.join(this.dir, 'tidepool.toml');
    fs.writeFileSync(this.configFile, this.makeConfig(this.port, this.dir));
    const args = [...this.command, '--config', this.configFile, '--listen', `127.0.0.1:${this.port}`];
    if (this.adminToken) args.push('--admin-token', this.adminToken);
    const log = fs.openSync(this.logFile, 'a');
    this.proc = spawn(bin(), args, { cwd: this.dir, env: this.env(), stdio: ['ignore', log, log] });
    fs.closeSync(log);
    this.exited = new Promise((resolve) => this.proc.once('exit', (code, signal) => resolve({ code, signal })));
    const deadline = Date.now() + STARTUP_MS_MAX;
    for (;;) {
      if (this.proc.exitCode !== null || this.proc.signalCode !== null) {
        throw new Error(`${this.name} exited early:\n${this.logTail()}`);
      }
      try {
        const response = await fetch(this.url('/healthz'), { signal: AbortSignal.timeout(2000) });
        if (response.ok) return;
      } catch {
        // not listening yet
      }
      if (Date.now() > deadline) throw new Error(`${this.name} did not become healthy:\n${this.logTail()}`);
      await sleep(200);
    }
  }

  logTail(chars = 4000) {
    try {
      return fs.readFileSync(this.logFile, 'utf8').slice(-chars);
    } catch {
      return '';
    }
  }

  /** Ends the process at once (a crash, as far as its peers can tell). */
  async kill() {
    if (this.proc && this.proc.exitCode === null && this.proc.signalCode === null) {
      this.proc.kill('SIGKILL');
      await this.exited;
    }
  }

  async stop() {
    if (!this.proc || this.proc.exitCode !== null || this.proc.signalCode !== null) return;
    this.proc.kill('SIGTERM');
    const done = await Promise.race([this.exited, sleep(STOP_MS_MAX).then(() => null)]);
    if (!done) await this.kill();
  }

  /** Deletes the temp directory (database, config, log) unless TIDEPOOL_KEEP_TEST_DIRS=1. */
  removeDir() {
    if (process.env.TIDEPOOL_KEEP_TEST_DIRS === '1') return;
    fs.rmSync(this.dir, { recursive: true, force: true });
  }

  /** One HTTP call: `{ status, text, json }` (json parsed when the body is JSON). */
  async request(method, route, { body, bearer, headers = {} } = {}) {
    const init = { method, headers: { ...headers }, signal: AbortSignal.timeout(REQUEST_MS_MAX) };
    if (bearer) init.headers.Authorization = `Bearer ${bearer}`;
    if (body !== undefined) {
      init.headers['Content-Type'] = 'application/json';
      init.body = JSON.stringify(body);
    }
    const response = await fetch(this.url(route), init);
    const text = await response.text();
    let json = null;
    try {
      json = text ? JSON.parse(text) : null;
    } catch {
      json = null;
    }
    return { status: response.status, text, json, headers: response.headers };
  }

  /** An admin call that must succeed with `expected`. */
  async admin(method, route, body, expected = [200, 201, 202, 204]) {
    const r = await this.request(method, route, { body, bearer: this.adminToken });
    if (!expected.includes(r.status)) throw new Error(`${method} ${route} → ${r.status}: ${r.text}`);
    return r.json;
  }

  async createTenant(tenant, credit) {
    await this.admin('POST', '/admin/tenants', { tenant });
    if (credit) await this.admin('POST', `/admin/tenants/${tenant}/credits`, { amount: credit, note: 'opening credit' });
  }

  /** A new key: `{ key, key_id, ... }`. */
  async createKey(tenant, name, { project, role } = {}) {
    const body = { tenant, name };
    if (project) body.project = project;
    if (role) body.role = role;
    return this.admin('POST', '/admin/keys', body);
  }

  /** A short real chat completion; `{ status, json }`. */
  chat(key, { model = CHAT_MODEL, content = 'Say hello.', maxTokens = 8 } = {}) {
    return this.request('POST', '/v1/chat/completions', {
      bearer: key,
      body: { model, messages: [{ role: 'user', content }], max_tokens: maxTokens, temperature: 0 },
    });
  }
}

/** The integer value of a `*_nanos` field in JSON text, exactly (no float on the way). */
function nanosField(text, field) {
  const match = new RegExp(`"${field}"\\s*:\\s*(-?\\d+)`).exec(text);
  if (!match) throw new Error(`no ${field} in ${text.slice(0, 300)}`);
  return BigInt(match[1]);
}

module.exports = { Tidepool, CHAT_MODEL, chatModelToml, freePort, nanosField, sleep, waitFor };
