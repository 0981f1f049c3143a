// Tidepool console: one ES module, no framework, no build step. It signs in with a console
// session (an HttpOnly cookie the server sets), then renders one page per URL hash
// (`#/usage?days=30&group=model`); every filter lives in the hash query.
//
// Rules it keeps:
// - Every URL is relative to the page (`api/session`, `../admin/...`, `../v1/pool`), so the
//   console works under any base path.
// - Mutations send `X-Tidepool-Console: 1` and the cookie (`credentials: 'same-origin'`).
// - A page view makes at most `CALLS_PER_VIEW_MAX` API calls, counting the session check of a
//   fresh page load (made once, then cached).
// - Money arrives as integers of nano-units (`*_nanos`); it is parsed straight into BigInt from
//   the JSON text and formatted with integer arithmetic only.

export const NANOS_PER_UNIT = 1_000_000_000n;
export const CALLS_PER_VIEW_MAX = 3;
const CONSOLE_HEADER = 'X-Tidepool-Console';
const POLL_INTERVAL_MS = 3000;
const USAGE_DAYS_CHOICES = [7, 30, 90];
const USAGE_DAYS_DEFAULT = 30;
const USAGE_DAYS_MAX = 366;
const CHART_SERIES_MAX = 8;
const AUDIT_PAGE_LEN = 100;
// Okabe–Ito palette (distinguishable with the common colour-vision deficiencies), then grey
// for "other".
const SERIES_COLOURS = ['#0072B2', '#E69F00', '#009E73', '#CC79A7', '#56B4E9', '#D55E00', '#F0E442', '#332288'];
const OTHER_COLOUR = '#8c8c8c';

// ---------------------------------------------------------------------------------------------
// Pure helpers (exported for the unit tests)

/** JSON.parse that turns every `*_nanos` number into a BigInt read from the source text. */
export function parseJson(text) {
  return JSON.parse(text, function revive(key, value, context) {
    if (typeof value === 'number' && typeof key === 'string' && key.endsWith('_nanos')) {
      if (context && typeof context.source === 'string' && /^-?\d+$/.test(context.source)) {
        return BigInt(context.source);
      }
      return BigInt(Math.trunc(value));
    }
    return value;
  });
}

function groupDigits(text) {
  return text.replace(/\B(?=(\d{3})+(?!\d))/g, ',');
}

/** `1234567890123n` → `"1,234.567890123 USD"`: at least two decimals, trailing zeros trimmed. */
export function formatNanos(nanos, currency) {
  let n = BigInt(nanos);
  const negative = n < 0n;
  if (negative) n = -n;
  const whole = n / NANOS_PER_UNIT;
  let frac = (n % NANOS_PER_UNIT).toString().padStart(9, '0').replace(/0+$/, '');
  if (frac.length < 2) frac = frac.padEnd(2, '0');
  const text = `${negative ? '-' : ''}${groupDigits(whole.toString())}.${frac}`;
  return currency ? `${text} ${currency}` : text;
}

/** The exact decimal of a nano amount, no grouping (for CSV): `-1500000000n` → `"-1.5"`. */
export function decimalNanos(nanos) {
  let n = BigInt(nanos);
  const negative = n < 0n;
  if (negative) n = -n;
  const whole = n / NANOS_PER_UNIT;
  const frac = (n % NANOS_PER_UNIT).toString().padStart(9, '0').replace(/0+$/, '');
  return `${negative ? '-' : ''}${whole}${frac ? `.${frac}` : ''}`;
}

export function formatInt(value) {
  return groupDigits(BigInt(value).toString());
}

export function formatBytes(bytes) {
  const n = Number(bytes);
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let value = n;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return unit === 0 ? `${n} B` : `${value.toFixed(1)} ${units[unit]}`;
}

export function formatAgo(ms) {
  if (ms === null || ms === undefined) return 'never';
  const s = Math.floor(Number(ms) / 1000);
  if (s < 60) return `${s} s ago`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min ago`;
  const hours = Math.floor(m / 60);
  if (hours < 48) return `${hours} h ago`;
  return `${Math.floor(hours / 24)} days ago`;
}

export function formatTime(ms) {
  if (ms === null || ms === undefined) return '';
  return `${new Date(Number(ms)).toISOString().slice(0, 19).replace('T', ' ')} UTC`;
}

export function currentMonth(now = new Date()) {
  return now.toISOString().slice(0, 7);
}

export function isMonth(text) {
  return typeof text === 'string' && /^\d{4}-(0[1-9]|1[0-2])$/.test(text);
}

/** Every UTC day from `from` to `to` inclusive, as `YYYY-MM-DD`. */
export function daysBetween(from, to) {
  const out = [];
  const end = Date.parse(`${to}T00:00:00Z`);
  let at = Date.parse(`${from}T00:00:00Z`);
  if (Number.isNaN(at) || Number.isNaN(end)) return out;
  while (at <= end && out.length <= USAGE_DAYS_MAX) {
    out.push(new Date(at).toISOString().slice(0, 10));
    at += 86_400_000;
  }
  return out;
}

/** A round axis step (1, 2 or 5 × 10^k, at least 1) so that `count` steps cover `max`. */
export function niceStep(max, count) {
  if (!(max > 0)) return 1;
  const raw = max / count;
  const magnitude = 10 ** Math.floor(Math.log10(raw));
  const norm = raw / magnitude;
  const step = (norm <= 1 ? 1 : norm <= 2 ? 2 : norm <= 5 ? 5 : 10) * magnitude;
  return Math.max(1, Math.round(step));
}

function csvField(value) {
  const text = String(value);
  return /[",\r\n]/.test(text) ? `"${text.replaceAll('"', '""')}"` : text;
}

/** RFC 4180 text of a header and rows (CRLF line ends). */
export function toCsv(header, rows) {
  return [header, ...rows].map((row) => row.map(csvField).join(',')).join('\r\n') + '\r\n';
}

/** The metric a usage row contributes to the chart: BigInt nanos for cost, a Number otherwise. */
export function metricOf(row, metric) {
  if (metric === 'cost') return BigInt(row.cost_nanos);
  if (metric === 'tokens') return Number(row.prompt_tokens) + Number(row.completion_tokens);
  return Number(row.requests);
}

/** Sums usage rows by `keyOf(row)`: requests, tokens and cost (BigInt). */
export function sumUsage(rows, keyOf) {
  const groups = new Map();
  for (const row of rows) {
    const key = keyOf(row);
    let g = groups.get(key);
    if (!g) {
      g = { key, requests: 0, prompt_tokens: 0, cached_prompt_tokens: 0, completion_tokens: 0, cost_nanos: 0n };
      groups.set(key, g);
    }
    g.requests += Number(row.requests);
    g.prompt_tokens += Number(row.prompt_tokens);
    g.cached_prompt_tokens += Number(row.cached_prompt_tokens);
    g.completion_tokens += Number(row.completion_tokens);
    g.cost_nanos += BigInt(row.cost_nanos);
  }
  return groups;
}

// ---------------------------------------------------------------------------------------------
// DOM helpers

const SVG_NS = 'http://www.w3.org/2000/svg';

function fill(el, attrs, children) {
  for (const [name, value] of Object.entries(attrs ?? {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith('on') && typeof value === 'function') {
      el.addEventListener(name.slice(2), value);
    } else if (name === 'dataset') {
      for (const [k, v] of Object.entries(value)) el.dataset[k] = String(v);
    } else {
      el.setAttribute(name === 'className' ? 'class' : name, value === true ? '' : String(value));
    }
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

function h(tag, attrs, ...children) {
  return fill(document.createElement(tag), attrs, children);
}

function svg(tag, attrs, ...children) {
  return fill(document.createElementNS(SVG_NS, tag), attrs, children);
}

function $(id) {
  return document.getElementById(id);
}

function badge(text, tone) {
  return h('span', { class: `badge ${tone}` }, text);
}

function bar(value, max, label) {
  const fraction = max > 0 ? Math.min(1, value / max) : 0;
  const inner = h('span');
  inner.style.width = `${(fraction * 100).toFixed(1)}%`;
  return h('div', {},
    h('div', { class: `bar${max > 0 && value > max ? ' over' : ''}`, role: 'img', 'aria-label': label }, inner),
    h('div', { class: 'bar-label' }, label));
}

function table({ caption, label, columns, rows, foot, id }) {
  const head = h('tr', {}, columns.map((c) => h('th', { scope: 'col', class: c.num ? 'num' : null }, c.label)));
  // Focusable, so a table wider than the page can be scrolled from the keyboard.
  return h('div', { class: 'table-wrap', tabindex: 0, role: 'region', 'aria-label': label || caption },
    h('table', { id },
      caption ? h('caption', {}, caption) : null,
      h('thead', {}, head),
      h('tbody', {}, rows),
      foot ? h('tfoot', {}, foot) : null));
}

function td(value, num = false, attrs = {}) {
  return h('td', { ...attrs, class: [attrs.class, num ? 'num' : null].filter(Boolean).join(' ') || null }, value);
}

// ---------------------------------------------------------------------------------------------
// API

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.name = 'ApiError';
    this.status = status;
    this.code = code;
  }
}

const state = {
  session: null,
  // The view counter: results of an older view are dropped.
  view: 0,
  // Whether the next view shares its call budget with the session check or the sign-in.
  sessionCallPending: true,
  poll: null,
};

async function api(method, path, body, ctx) {
  if (ctx) {
    ctx.calls += 1;
    if (ctx.calls > ctx.budget) {
      throw new ApiError(0, 'console_call_budget', `This page tried more than ${CALLS_PER_VIEW_MAX} API calls.`);
    }
  }
  const headers = { Accept: 'application/json' };
  const init = { method, credentials: 'same-origin', headers, cache: 'no-store' };
  if (method !== 'GET') headers[CONSOLE_HEADER] = '1';
  if (body !== undefined) {
    headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(new URL(path, document.baseURI), init);
  } catch {
    throw new ApiError(0, 'network_error', 'The server could not be reached. Check the connection and try again.');
  }
  const text = await response.text();
  let data = null;
  if (text) {
    try {
      data = parseJson(text);
    } catch {
      data = null;
    }
  }
  if (!response.ok) {
    const error = data && typeof data === 'object' ? data.error : null;
    const message = error && error.message ? error.message : `The server answered ${response.status} ${response.statusText}.`;
    throw new ApiError(response.status, error ? error.code : null, message);
  }
  return data;
}

const enc = encodeURIComponent;

// ---------------------------------------------------------------------------------------------
// Banner

function showBanner(message, tone = 'error') {
  const el = $('banner');
  el.textContent = message;
  el.className = tone === 'info' ? 'banner info' : 'banner';
  el.hidden = false;
}

function clearBanner() {
  const el = $('banner');
  el.hidden = true;
  el.textContent = '';
}

function isSignedOut(error) {
  return error instanceof ApiError && error.status === 401;
}

/** Shows an API error; a signed-out answer returns to the sign-in form. */
function reportError(error) {
  if (isSignedOut(error) && state.session) {
    state.session = null;
    stopPolling();
    renderChrome();
    renderSignIn();
    showBanner(`${error.message} Sign in again.`);
    return;
  }
  showBanner(error instanceof Error ? error.message : String(error));
}

// ---------------------------------------------------------------------------------------------
// Routing

export function parseHash(hash) {
  const text = (hash || '').replace(/^#/, '');
  const at = text.indexOf('?');
  const path = (at < 0 ? text : text.slice(0, at)) || '/';
  const params = new URLSearchParams(at < 0 ? '' : text.slice(at + 1));
  return { path, params };
}

export function hashOf(path, params) {
  const query = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    if (v !== null && v !== undefined && v !== '') query.set(k, String(v));
  }
  const qs = query.toString();
  return `#${path}${qs ? `?${qs}` : ''}`;
}

/** Rewrites the hash without a new page view (filters that need no new data). */
function replaceHash(path, params) {
  history.replaceState(null, '', hashOf(path, params));
}

const TENANT_PAGES = [
  { path: '/usage', title: 'Usage', render: pageUsage },
  { path: '/keys', title: 'API keys', render: pageKeys },
  { path: '/billing', title: 'Billing', render: pageBilling },
];
const OPERATOR_PAGES = [
  { path: '/tenants', title: 'Tenants', render: pageTenants },
  { path: '/pool', title: 'Pool', render: pagePool },
  { path: '/backends', title: 'Backends', render: pageBackends },
  { path: '/audit', title: 'Audit log', render: pageAudit },
];

function isOperator() {
  return state.session && state.session.role === 'operator';
}

function defaultPath() {
  return isOperator() ? '/tenants' : '/usage';
}

function renderChrome() {
  const signedIn = Boolean(state.session);
  $('who').hidden = !signedIn;
  $('sign-out').hidden = !signedIn;
  $('nav').hidden = !signedIn;
  if (!signedIn) {
    $('nav-list').replaceChildren();
    return;
  }
  const s = state.session;
  $('who').textContent = s.role === 'operator' ? 'Signed in as operator' : `Tenant ${s.tenant} · tenant admin`;
  renderNav();
}

function renderNav() {
  const { path, params } = parseHash(location.hash);
  const items = [];
  const link = (page, extra = {}) => h('li', {}, h('a', {
    href: hashOf(page.path, extra),
    'aria-current': page.path === path ? 'page' : null,
  }, page.title));
  if (isOperator()) {
    for (const page of OPERATOR_PAGES) items.push(link(page));
    const tenant = params.get('tenant');
    if (tenant && TENANT_PAGES.some((p) => p.path === path)) {
      items.push(h('li', { class: 'sep' }, `Tenant ${tenant}:`));
      for (const page of TENANT_PAGES) items.push(link(page, { tenant }));
    }
  } else {
    for (const page of TENANT_PAGES) items.push(link(page));
  }
  $('nav-list').replaceChildren(...items);
}

async function route() {
  stopPolling();
  const view = ++state.view;
  const main = $('main');
  const page = $('page');
  clearBanner();
  if (!state.session) {
    renderSignIn();
    return;
  }
  if (state.session.expires_at && Date.now() / 1000 >= Number(state.session.expires_at)) {
    state.session = null;
    renderChrome();
    renderSignIn();
    showBanner('The console session has expired. Sign in again.', 'info');
    return;
  }
  let { path, params } = parseHash(location.hash);
  const pages = [...TENANT_PAGES, ...OPERATOR_PAGES];
  let target = pages.find((p) => p.path === path);
  if (!target) {
    path = defaultPath();
    params = new URLSearchParams();
    history.replaceState(null, '', hashOf(path, {}));
    target = pages.find((p) => p.path === path);
  }
  renderNav();
  const budget = CALLS_PER_VIEW_MAX - (state.sessionCallPending ? 1 : 0);
  state.sessionCallPending = false;
  const ctx = {
    view,
    path,
    params,
    budget,
    calls: 0,
    isCurrent: () => view === state.view,
  };
  main.dataset.page = path.slice(1);
  main.dataset.state = 'loading';
  main.setAttribute('aria-busy', 'true');
  document.title = `${target.title} · Tidepool console`;
  page.replaceChildren(h('h1', {}, target.title), h('p', { class: 'muted' }, 'Loading…'));
  try {
    const content = await target.render(ctx);
    if (!ctx.isCurrent()) return;
    page.replaceChildren(...content);
    main.dataset.state = 'ready';
  } catch (error) {
    if (!ctx.isCurrent()) return;
    page.replaceChildren(h('h1', {}, target.title));
    main.dataset.state = 'error';
    reportError(error);
  } finally {
    if (ctx.isCurrent()) main.setAttribute('aria-busy', 'false');
  }
}

// ---------------------------------------------------------------------------------------------
// Session

function renderSignIn() {
  stopPolling();
  state.view += 1;
  const main = $('main');
  main.dataset.page = 'signin';
  main.dataset.state = 'ready';
  main.setAttribute('aria-busy', 'false');
  document.title = 'Sign in · Tidepool console';
  renderChrome();
  const secretLabel = h('label', { for: 'signin-secret' }, 'API key');
  const secret = h('input', {
    id: 'signin-secret', name: 'secret', type: 'password', required: true,
    autocomplete: 'off', spellcheck: 'false', 'aria-describedby': 'signin-help',
  });
  const help = h('p', { id: 'signin-help', class: 'muted' },
    'An API key with the tenant-admin role shows that tenant’s usage, keys and billing. The operator’s admin token shows every tenant, the model pool, the backends and the audit log.');
  const kindKey = h('input', { type: 'radio', name: 'kind', value: 'api_key', id: 'signin-kind-key', checked: true });
  const kindOperator = h('input', { type: 'radio', name: 'kind', value: 'admin_token', id: 'signin-kind-operator' });
  const relabel = () => {
    secretLabel.textContent = kindOperator.checked ? 'Operator admin token' : 'API key';
  };
  kindKey.addEventListener('change', relabel);
  kindOperator.addEventListener('change', relabel);
  const submit = h('button', { type: 'submit' }, 'Sign in');
  const form = h('form', { id: 'signin-form', 'aria-labelledby': 'signin-title' },
    h('fieldset', {},
      h('legend', {}, 'Sign in with'),
      h('label', { for: 'signin-kind-key' }, kindKey, 'API key (tenant admin)'),
      h('label', { for: 'signin-kind-operator' }, kindOperator, 'Operator admin token')),
    h('div', { class: 'field' }, secretLabel, secret),
    help,
    h('div', {}, submit));
  form.addEventListener('submit', (event) => {
    event.preventDefault();
    const value = secret.value.trim();
    if (!value) return;
    submit.disabled = true;
    const body = kindOperator.checked ? { admin_token: value } : { api_key: value };
    api('POST', 'api/session', body)
      .then((session) => {
        secret.value = '';
        state.session = session;
        state.sessionCallPending = true;
        renderChrome();
        // Stay on the page in the address if this role can see it (an operator sees a tenant
        // page only for a chosen tenant).
        const { path, params } = parseHash(location.hash);
        const tenantPage = TENANT_PAGES.some((p) => p.path === path);
        const allowed = isOperator()
          ? OPERATOR_PAGES.some((p) => p.path === path) || (tenantPage && params.get('tenant'))
          : tenantPage;
        if (!allowed) history.replaceState(null, '', hashOf(defaultPath(), {}));
        return route();
      })
      .catch((error) => {
        submit.disabled = false;
        showBanner(error.message);
        secret.focus();
      });
  });
  $('page').replaceChildren(h('section', { class: 'signin', 'aria-labelledby': 'signin-title' },
    h('h1', { id: 'signin-title' }, 'Sign in'), form));
}

function signOut() {
  api('DELETE', 'api/session')
    .then(() => {
      state.session = null;
      renderChrome();
      renderSignIn();
      showBanner('Signed out.', 'info');
    })
    .catch(reportError);
}

// ---------------------------------------------------------------------------------------------
// Dialogs

function confirmDialog(title, text, okLabel) {
  const dialog = $('confirm-dialog');
  $('confirm-title').textContent = title;
  $('confirm-text').textContent = text;
  $('confirm-ok').textContent = okLabel;
  return new Promise((resolve) => {
    const done = (answer) => {
      $('confirm-ok').removeEventListener('click', ok);
      $('confirm-cancel').removeEventListener('click', cancel);
      dialog.removeEventListener('cancel', cancel);
      if (dialog.open) dialog.close();
      resolve(answer);
    };
    const ok = () => done(true);
    const cancel = (event) => {
      if (event) event.preventDefault();
      done(false);
    };
    $('confirm-ok').addEventListener('click', ok);
    $('confirm-cancel').addEventListener('click', cancel);
    dialog.addEventListener('cancel', cancel);
    dialog.showModal();
    $('confirm-cancel').focus();
  });
}

function showSecret(name, secret) {
  const dialog = $('secret-dialog');
  $('secret-name').textContent = name;
  $('secret-value').value = secret;
  $('secret-status').textContent = '';
  dialog.showModal();
  $('secret-value').focus();
  $('secret-value').select();
}

async function copySecret() {
  const input = $('secret-value');
  try {
    await navigator.clipboard.writeText(input.value);
    $('secret-status').textContent = 'Copied to the clipboard.';
  } catch {
    input.focus();
    input.select();
    const copied = document.execCommand && document.execCommand('copy');
    $('secret-status').textContent = copied ? 'Copied to the clipboard.' : 'Select the secret and copy it by hand.';
  }
}

function forgetSecret() {
  $('secret-value').value = '';
}

function closeSecret() {
  const dialog = $('secret-dialog');
  forgetSecret();
  if (dialog.open) dialog.close();
}

// ---------------------------------------------------------------------------------------------
// Polling (pool, backends): every POLL_INTERVAL_MS while the page is open and visible

function startPolling(ctx, refresh) {
  const tick = async () => {
    state.poll = { ...state.poll, timer: null };
    if (!ctx.isCurrent()) return;
    if (document.visibilityState !== 'visible') return; // resumed by visibilitychange
    try {
      await refresh();
    } catch (error) {
      if (!ctx.isCurrent()) return;
      reportError(error);
      if (isSignedOut(error)) return;
    }
    if (ctx.isCurrent() && state.poll && state.poll.tick === tick && document.visibilityState === 'visible') {
      state.poll.timer = setTimeout(tick, POLL_INTERVAL_MS);
    }
  };
  state.poll = { tick, timer: setTimeout(tick, POLL_INTERVAL_MS) };
}

function stopPolling() {
  if (state.poll && state.poll.timer) clearTimeout(state.poll.timer);
  state.poll = null;
}

function onVisibilityChange() {
  if (!state.poll) return;
  if (document.visibilityState === 'visible') {
    if (!state.poll.timer) state.poll.tick();
  } else if (state.poll.timer) {
    clearTimeout(state.poll.timer);
    state.poll.timer = null;
  }
}

function updatedNote() {
  return h('p', { class: 'muted', id: 'updated' }, `Updated ${formatTime(Date.now())}; refreshes every ${POLL_INTERVAL_MS / 1000} s while this page is open.`);
}

// ---------------------------------------------------------------------------------------------
// Tenant pages

/** The tenant a tenant page shows, or null (an operator who has not chosen one). */
function tenantOf(ctx) {
  if (!isOperator()) return state.session.tenant;
  return ctx.params.get('tenant') || null;
}

function chooseTenant(title) {
  return [
    h('h1', {}, title),
    h('p', {}, 'Choose a tenant on the ', h('a', { href: '#/tenants' }, 'Tenants'), ' page first.'),
  ];
}

function pageHeading(title, tenant) {
  return h('h1', {}, isOperator() ? `${title}: tenant ${tenant}` : title);
}

function keyLabel(keyId, names) {
  const name = names.get(keyId);
  return name ? `${name} (${keyId})` : keyId;
}

async function pageUsage(ctx) {
  const tenant = tenantOf(ctx);
  if (!tenant) return chooseTenant('Usage');
  const p = ctx.params;
  const daysParam = Number.parseInt(p.get('days') ?? '', 10);
  const days = Number.isInteger(daysParam) && daysParam >= 1 && daysParam <= USAGE_DAYS_MAX ? daysParam : USAGE_DAYS_DEFAULT;
  const view = {
    group: ['project', 'key', 'model'].includes(p.get('group')) ? p.get('group') : 'model',
    metric: ['cost', 'tokens', 'requests'].includes(p.get('metric')) ? p.get('metric') : 'cost',
  };
  const [daily, keys] = await Promise.all([
    api('GET', `../admin/tenants/${enc(tenant)}/usage/daily?days=${days}`, undefined, ctx),
    api('GET', `../admin/tenants/${enc(tenant)}/keys`, undefined, ctx),
  ]);
  const names = new Map((keys.data || []).map((k) => [k.key_id, k.name]));
  const rows = daily.data || [];
  const currency = daily.currency;
  const hashParams = () => ({
    tenant: isOperator() ? tenant : null,
    days,
    group: view.group,
    metric: view.metric,
  });

  const daysSelect = h('select', { id: 'usage-days' },
    [...new Set([...USAGE_DAYS_CHOICES, days])].sort((a, b) => a - b)
      .map((d) => h('option', { value: d, selected: d === days }, `Last ${d} days`)));
  daysSelect.addEventListener('change', () => {
    location.hash = hashOf('/usage', { ...hashParams(), days: daysSelect.value });
  });
  const groupSelect = h('select', { id: 'usage-group' },
    [['model', 'Model'], ['project', 'Project'], ['key', 'API key']]
      .map(([value, label]) => h('option', { value, selected: value === view.group }, label)));
  const metricButtons = [['cost', 'Cost'], ['tokens', 'Tokens'], ['requests', 'Requests']].map(([value, label]) =>
    h('button', { type: 'button', dataset: { metric: value }, 'aria-pressed': String(value === view.metric) }, label));
  const chartBox = h('div', { id: 'usage-chart-box' });
  const tableBox = h('div', { id: 'usage-table-box' });
  const exportButton = h('button', { type: 'button', id: 'usage-export', class: 'quiet' }, 'Export CSV');

  // A request refused before it reserved has no project, one that failed before its model was
  // resolved no model: those rows group under the empty key.
  const keyOf = (row) => (view.group === 'project' ? row.project : view.group === 'key' ? row.key_id : row.model) ?? '';
  const labelOf = (key) => {
    if (key === '') return '(none)';
    return view.group === 'key' ? keyLabel(key, names) : key;
  };
  let tableRows = [];

  const redraw = () => {
    chartBox.replaceChildren(...usageChart(rows, daysBetween(daily.from, daily.to), view, keyOf, labelOf, currency));
    const groups = [...sumUsage(rows, keyOf).values()].sort((a, b) =>
      (b.cost_nanos > a.cost_nanos ? 1 : b.cost_nanos < a.cost_nanos ? -1 : 0) || String(a.key).localeCompare(String(b.key)));
    const total = sumUsage(rows, () => 'total').get('total')
      || { requests: 0, prompt_tokens: 0, cached_prompt_tokens: 0, completion_tokens: 0, cost_nanos: 0n };
    tableRows = groups;
    const groupTitle = { project: 'Project', key: 'API key', model: 'Model' }[view.group];
    const numbers = (g) => [
      td(formatInt(g.requests), true),
      td(formatInt(g.prompt_tokens), true),
      td(formatInt(g.cached_prompt_tokens), true),
      td(formatInt(g.completion_tokens), true),
    ];
    tableBox.replaceChildren(table({
      id: 'usage-table',
      caption: `Usage by ${groupTitle.toLowerCase()}, ${daily.from} to ${daily.to}`,
      columns: [
        { label: groupTitle }, { label: 'Requests', num: true }, { label: 'Prompt tokens', num: true },
        { label: 'Cached prompt tokens', num: true }, { label: 'Completion tokens', num: true }, { label: `Cost (${currency})`, num: true },
      ],
      rows: groups.length
        ? groups.map((g) => h('tr', { dataset: { group: g.key } },
          h('th', { scope: 'row' }, labelOf(g.key)), numbers(g),
          td(formatNanos(g.cost_nanos), true, { dataset: { nanos: g.cost_nanos } })))
        : [h('tr', {}, h('td', { colspan: 6 }, `No usage in these ${days} days.`))],
      foot: h('tr', {}, h('th', { scope: 'row' }, 'Total'), numbers(total),
        td(formatNanos(total.cost_nanos), true, { id: 'usage-total-cost', dataset: { nanos: total.cost_nanos } })),
    }));
  };

  groupSelect.addEventListener('change', () => {
    view.group = groupSelect.value;
    replaceHash('/usage', hashParams());
    redraw();
  });
  for (const button of metricButtons) {
    button.addEventListener('click', () => {
      view.metric = button.dataset.metric;
      for (const b of metricButtons) b.setAttribute('aria-pressed', String(b === button));
      replaceHash('/usage', hashParams());
      redraw();
    });
  }
  exportButton.addEventListener('click', () => {
    const keyColumns = view.group === 'key' ? ['key_id', 'key_name'] : [view.group];
    const header = [...keyColumns, 'requests', 'prompt_tokens', 'cached_prompt_tokens', 'completion_tokens', 'cost_nanos', `cost_${currency}`];
    const lines = tableRows.map((g) => [
      ...(view.group === 'key' ? [g.key, names.get(g.key) ?? ''] : [g.key]),
      g.requests, g.prompt_tokens, g.cached_prompt_tokens, g.completion_tokens, g.cost_nanos.toString(), decimalNanos(g.cost_nanos),
    ]);
    download(`tidepool-usage-${tenant}-${daily.from}-to-${daily.to}-by-${view.group}.csv`, toCsv(header, lines), 'text/csv');
  });

  redraw();
  return [
    pageHeading('Usage', tenant),
    h('div', { class: 'controls' },
      h('div', { class: 'field' }, h('label', { for: 'usage-days' }, 'Period'), daysSelect),
      h('div', { class: 'field' }, h('label', { for: 'usage-group' }, 'Stack by'), groupSelect),
      h('fieldset', { class: 'toggle-field' }, h('legend', {}, 'Chart'),
        h('div', { class: 'toggle', role: 'group', 'aria-label': 'Chart metric' }, metricButtons)),
      h('div', { class: 'field' }, exportButton)),
    chartBox,
    tableBox,
    h('p', { class: 'muted' }, `Daily totals from the usage rollup, UTC days ${daily.from} to ${daily.to}. Tokens in the chart are prompt plus completion tokens.`),
  ];
}

function download(filename, text, type) {
  const url = URL.createObjectURL(new Blob([text], { type }));
  const a = h('a', { href: url, download: filename, hidden: true });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 0);
}

/** The stacked daily chart as inline SVG plus its legend. */
function usageChart(rows, days, view, keyOf, labelOf, currency) {
  const isCost = view.metric === 'cost';
  const zero = isCost ? 0n : 0;
  // Series order: largest total first; past CHART_SERIES_MAX, the rest is "other".
  const totals = new Map();
  for (const row of rows) {
    const key = keyOf(row);
    totals.set(key, (totals.get(key) ?? zero) + metricOf(row, view.metric));
  }
  const ranked = [...totals.entries()].sort((a, b) => (b[1] > a[1] ? 1 : b[1] < a[1] ? -1 : 0) || String(a[0]).localeCompare(String(b[0])));
  const shown = ranked.slice(0, ranked.length > CHART_SERIES_MAX ? CHART_SERIES_MAX - 1 : CHART_SERIES_MAX).map(([k]) => k);
  const OTHER = '\u0000other';
  const seriesOf = (key) => (shown.includes(key) ? key : OTHER);
  const series = ranked.length > shown.length ? [...shown, OTHER] : shown;
  const colour = (s) => (s === OTHER ? OTHER_COLOUR : SERIES_COLOURS[series.indexOf(s) % SERIES_COLOURS.length]);
  const label = (s) => (s === OTHER ? 'Other' : labelOf(s));

  const byDay = new Map(days.map((d) => [d, new Map()]));
  let total = zero;
  for (const row of rows) {
    const cells = byDay.get(row.day);
    if (!cells) continue;
    const s = seriesOf(keyOf(row));
    const v = metricOf(row, view.metric);
    cells.set(s, (cells.get(s) ?? zero) + v);
    total += v;
  }
  let peak = 0;
  for (const cells of byDay.values()) {
    let sum = zero;
    for (const v of cells.values()) sum += v;
    peak = Math.max(peak, Number(sum));
  }
  const fmt = (v) => (isCost ? formatNanos(BigInt(Math.round(Number(v)))) : formatInt(Math.round(Number(v))));
  const unit = { cost: `Cost (${currency})`, tokens: 'Tokens', requests: 'Requests' }[view.metric];

  const W = 960;
  const H = 320;
  const left = 96;
  const right = 12;
  const top = 14;
  const bottom = 44;
  const plotW = W - left - right;
  const plotH = H - top - bottom;
  const ticks = 4;
  const step = niceStep(peak, ticks);
  const yMax = Math.max(step * Math.ceil(peak / step), step);
  const y = (v) => top + plotH - (Number(v) / yMax) * plotH;
  const slot = plotW / Math.max(days.length, 1);
  const barW = Math.max(1, slot * 0.7);

  const parts = [];
  for (let i = 0; i * step <= yMax; i += 1) {
    const v = i * step;
    parts.push(svg('line', { class: 'grid', x1: left, x2: W - right, y1: y(v), y2: y(v) }));
    parts.push(svg('text', { x: left - 6, y: y(v) + 4, 'text-anchor': 'end' }, fmt(v)));
  }
  parts.push(svg('text', { x: 14, y: top + plotH / 2, 'text-anchor': 'middle', transform: `rotate(-90 14 ${top + plotH / 2})` }, unit));
  const labelEvery = Math.max(1, Math.ceil(days.length / 10));
  days.forEach((day, i) => {
    const x = left + i * slot + (slot - barW) / 2;
    let base = zero;
    for (const s of series) {
      const v = byDay.get(day).get(s);
      if (v === undefined || Number(v) === 0) continue;
      const y0 = y(base);
      base += v;
      const y1 = y(base);
      parts.push(svg('rect', { x: x.toFixed(2), y: y1.toFixed(2), width: barW.toFixed(2), height: Math.max(0.5, y0 - y1).toFixed(2), fill: colour(s), dataset: { day, series: label(s), value: v } },
        svg('title', {}, `${day} · ${label(s)}: ${isCost ? formatNanos(v, currency) : formatInt(v)}`)));
    }
    if (i % labelEvery === 0 || i === days.length - 1) {
      parts.push(svg('text', { x: (left + i * slot + slot / 2).toFixed(2), y: H - bottom + 18, 'text-anchor': 'middle' }, day.slice(5)));
    }
  });
  parts.push(svg('line', { class: 'axis', x1: left, x2: W - right, y1: top + plotH, y2: top + plotH }));
  parts.push(svg('line', { class: 'axis', x1: left, x2: left, y1: top, y2: top + plotH }));
  parts.push(svg('text', { x: left + plotW / 2, y: H - 6, 'text-anchor': 'middle' }, `UTC day (${days[0] ?? ''} to ${days[days.length - 1] ?? ''})`));

  const totalText = isCost ? formatNanos(total, currency) : `${formatInt(total)} ${view.metric}`;
  const groupName = { project: 'project', key: 'API key', model: 'model' }[view.group];
  const chart = svg('svg', {
    id: 'usage-chart',
    viewBox: `0 0 ${W} ${H}`,
    role: 'img',
    'aria-label': `${unit} per day, stacked by ${groupName}; total ${totalText}. The table below lists the numbers.`,
    dataset: { metric: view.metric, total: total.toString() },
  }, parts);
  return [
    h('p', { id: 'usage-summary' }, `Total ${view.metric === 'cost' ? 'cost' : view.metric} in this period: `, h('strong', {}, totalText)),
    h('figure', { class: 'chart' }, chart),
    h('ul', { class: 'legend', 'aria-label': 'Legend' }, series.length
      ? series.map((s) => {
        const swatch = h('span', { class: 'swatch', 'aria-hidden': 'true' });
        swatch.style.background = colour(s);
        return h('li', {}, swatch, label(s));
      })
      : h('li', { class: 'muted' }, 'No usage in this period.')),
  ];
}

async function pageKeys(ctx) {
  const tenant = tenantOf(ctx);
  if (!tenant) return chooseTenant('API keys');
  const [keys, account] = await Promise.all([
    api('GET', `../admin/tenants/${enc(tenant)}/keys`, undefined, ctx),
    api('GET', `../admin/tenants/${enc(tenant)}`, undefined, ctx),
  ]);
  const list = keys.data || [];
  const projects = account.projects && account.projects.length ? account.projects : ['default'];
  const tableBox = h('div');

  const statusOf = (k) => {
    if (k.revoked_at_ms !== null && k.revoked_at_ms !== undefined) return badge('revoked', 'bad');
    if (k.suspended_at_ms !== null && k.suspended_at_ms !== undefined) return badge('suspended', 'warn');
    return badge('active', 'ok');
  };
  const redraw = () => {
    const sorted = [...list].sort((a, b) => Number(b.created_at_ms ?? 0) - Number(a.created_at_ms ?? 0));
    tableBox.replaceChildren(table({
      id: 'keys-table',
      caption: `${list.length} key${list.length === 1 ? '' : 's'} of tenant ${tenant}`,
      columns: [{ label: 'Name' }, { label: 'Key id' }, { label: 'Project' }, { label: 'Role' }, { label: 'Created' }, { label: 'Status' }, { label: 'Action' }],
      rows: sorted.length ? sorted.map((k) => {
        const revoked = k.revoked_at_ms !== null && k.revoked_at_ms !== undefined;
        const own = state.session.key_id && state.session.key_id === k.key_id;
        const details = [];
        if (revoked) details.push(`revoked ${formatTime(k.revoked_at_ms)}`);
        if (k.suspended_at_ms !== null && k.suspended_at_ms !== undefined) {
          details.push(`suspended ${formatTime(k.suspended_at_ms)}${k.suspended_reason ? `: ${k.suspended_reason}` : ''}`);
        }
        const action = revoked ? h('span', { class: 'muted' }, '—') : h('button', {
          type: 'button', class: 'danger small', dataset: { revoke: k.key_id },
          'aria-label': `Revoke key ${k.name} (${k.key_id})`,
          onclick: () => revoke(k, own),
        }, 'Revoke');
        return h('tr', { class: revoked ? 'revoked' : null, dataset: { keyId: k.key_id } },
          h('th', { scope: 'row' }, k.name, own ? h('span', { class: 'muted' }, ' (this session)') : null),
          td(h('code', {}, k.key_id)),
          td(k.project),
          td(badge(k.role || 'inference', k.role === 'tenant-admin' ? 'info' : 'idle')),
          td(formatTime(k.created_at_ms), false, { class: 'nowrap' }),
          td([statusOf(k), details.length ? h('div', { class: 'muted' }, details.join('; ')) : null], false, { class: 'status' }),
          td(action));
      }) : [h('tr', {}, h('td', { colspan: 7 }, 'No keys yet.'))],
    }));
  };

  const revoke = async (key, own) => {
    const warning = own ? ' This is the key of your console session: you will be signed out.' : '';
    const yes = await confirmDialog('Revoke API key', `Revoke “${key.name}” (${key.key_id})? Requests with it fail from now on; this cannot be undone.${warning}`, 'Revoke');
    if (!yes) return;
    try {
      await api('DELETE', `../admin/keys/${enc(key.key_id)}`);
      key.revoked_at_ms = Date.now();
      clearBanner();
      if (own) {
        state.session = null;
        renderChrome();
        renderSignIn();
        showBanner(`Key ${key.key_id} was revoked; its console session ended.`, 'info');
        return;
      }
      redraw();
      showBanner(`Key “${key.name}” (${key.key_id}) is revoked.`, 'info');
    } catch (error) {
      reportError(error);
    }
  };

  const name = h('input', { id: 'key-name', name: 'name', type: 'text', required: true, maxlength: 128, autocomplete: 'off' });
  const project = h('select', { id: 'key-project', name: 'project' },
    projects.map((p) => h('option', { value: p, selected: p === 'default' }, p)));
  const role = h('select', { id: 'key-role', name: 'role' },
    h('option', { value: 'inference', selected: true }, 'inference'),
    h('option', { value: 'tenant-admin' }, 'tenant-admin'));
  const submit = h('button', { type: 'submit' }, 'Create key');
  const form = h('form', { id: 'key-create', class: 'form-grid', 'aria-label': 'Create an API key' },
    h('div', { class: 'field' }, h('label', { for: 'key-name' }, 'Name'), name),
    h('div', { class: 'field' }, h('label', { for: 'key-project' }, 'Project'), project),
    h('div', { class: 'field' }, h('label', { for: 'key-role' }, 'Role'), role),
    h('div', { class: 'field' }, submit));
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    const keyName = name.value.trim();
    if (!keyName) return;
    submit.disabled = true;
    try {
      const created = await api('POST', '../admin/keys', { tenant, project: project.value, name: keyName, role: role.value });
      list.push({
        object: 'api_key', key_id: created.key_id, tenant: created.tenant, project: created.project,
        name: created.name, role: created.role ?? role.value, created_at_ms: Date.now(),
        revoked_at_ms: null, suspended_at_ms: null, suspended_reason: null,
      });
      form.reset();
      clearBanner();
      redraw();
      showSecret(created.name, created.key);
    } catch (error) {
      reportError(error);
    } finally {
      submit.disabled = false;
    }
  });

  redraw();
  return [
    pageHeading('API keys', tenant),
    h('h2', {}, 'Create a key'),
    h('p', { class: 'muted' }, 'Inference keys call the API; tenant-admin keys can also sign in here and manage this tenant’s keys. The secret is shown once.'),
    form,
    h('h2', {}, 'Keys'),
    tableBox,
  ];
}

async function pageBilling(ctx) {
  const tenant = tenantOf(ctx);
  if (!tenant) return chooseTenant('Billing');
  const monthParam = ctx.params.get('month');
  const month = isMonth(monthParam) ? monthParam : currentMonth();
  // The account carries the tenant's budgets: with the session check and the statement, the
  // page stays within its three calls.
  const account = await api('GET', `../admin/tenants/${enc(tenant)}`, undefined, ctx);
  const currency = account.currency;
  const money = (n) => formatNanos(n, currency);

  const cards = h('dl', { class: 'cards', id: 'billing-account' },
    h('div', { class: 'card' }, h('dt', {}, 'Balance'), h('dd', { dataset: { nanos: account.balance_nanos } }, money(account.balance_nanos))),
    h('div', { class: 'card' }, h('dt', {}, 'Reserved by requests in flight'), h('dd', { dataset: { nanos: account.reserved_nanos } }, money(account.reserved_nanos))),
    h('div', { class: 'card' }, h('dt', {}, 'Available'), h('dd', { dataset: { nanos: account.available_nanos } }, money(account.available_nanos))));

  const budgetRows = (account.budgets || []).map((b) => {
    const used = BigInt(b.spent_nanos) + BigInt(b.reserved_nanos);
    const limit = b.limit_nanos === null || b.limit_nanos === undefined ? null : BigInt(b.limit_nanos);
    return h('tr', {},
      td(b.scope),
      h('th', { scope: 'row' }, b.scope === 'key' ? h('code', {}, b.key_id) : b.project),
      td(b.month),
      td(limit === null ? 'no limit' : money(limit), true),
      td(money(b.spent_nanos), true),
      td(money(b.reserved_nanos), true),
      td(limit === null ? '—' : bar(Number(used), Number(limit), `${limit > 0n ? ((Number(used) / Number(limit)) * 100).toFixed(1) : '100.0'}% used`)));
  });

  const statementBox = h('div', { id: 'statement-box' });
  const monthInput = h('input', { id: 'statement-month', type: 'month', value: month, required: true });
  const show = h('button', { type: 'submit', id: 'statement-show' }, 'Show statement');
  const loadStatement = async (m, callCtx) => {
    const statement = await api('GET', `../admin/tenants/${enc(tenant)}/statement?month=${enc(m)}`, undefined, callCtx);
    statementBox.replaceChildren(...statementView(statement));
  };
  const form = h('form', { class: 'form-grid', 'aria-label': 'Choose the statement month' },
    h('div', { class: 'field' }, h('label', { for: 'statement-month' }, 'Month (UTC)'), monthInput),
    h('div', { class: 'field' }, show));
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    if (!isMonth(monthInput.value)) return;
    show.disabled = true;
    replaceHash('/billing', { tenant: isOperator() ? tenant : null, month: monthInput.value });
    try {
      clearBanner();
      await loadStatement(monthInput.value);
    } catch (error) {
      reportError(error);
    } finally {
      show.disabled = false;
    }
  });
  // The statement comes with the page (the third call on a fresh load), unless the page's call
  // budget is spent; then it waits for "Show statement".
  if (ctx.calls < ctx.budget) {
    await loadStatement(month, ctx);
  } else {
    statementBox.replaceChildren(h('p', { class: 'muted' }, 'Choose a month and select “Show statement”.'));
  }

  return [
    pageHeading('Billing', tenant),
    h('h2', {}, 'Prepaid account'),
    cards,
    h('h2', {}, 'Monthly budgets'),
    table({
      id: 'budgets-table',
      label: 'Monthly budgets',
      caption: budgetRows.length ? null : 'No budgets are set; spending is limited by the balance only.',
      columns: [{ label: 'Scope' }, { label: 'Project or key' }, { label: 'Month' }, { label: 'Limit', num: true }, { label: 'Spent', num: true }, { label: 'Reserved', num: true }, { label: 'Used' }],
      rows: budgetRows,
    }),
    h('h2', {}, 'Monthly statement'),
    form,
    statementBox,
  ];
}

function statementView(s) {
  const money = (n) => formatNanos(n, s.currency);
  const rows = (s.lines || []).map((line) => {
    const isUsage = line.kind === 'usage';
    const what = isUsage
      ? `${line.model} · ${formatInt(line.requests ?? 0)} requests · ${formatInt(line.prompt_tokens ?? 0)} prompt (${formatInt(line.cached_prompt_tokens ?? 0)} cached) + ${formatInt(line.completion_tokens ?? 0)} completion tokens`
      : (line.note || 'credit');
    const price = isUsage
      ? `${formatNanos(line.input_per_mtok_nanos ?? 0n)} in / ${formatNanos(line.output_per_mtok_nanos ?? 0n)} out per 1M tokens`
      : '';
    return h('tr', {},
      td(isUsage ? badge('usage', 'idle') : badge('credit', 'ok')),
      td(isUsage ? `prices from ${formatTime(line.at_ms)}` : formatTime(line.at_ms)),
      td(what),
      td(price),
      td(money(line.amount_nanos), true, { dataset: { nanos: line.amount_nanos } }));
  });
  return [
    table({
      id: 'statement-table',
      caption: `Statement for ${s.month}, tenant ${s.tenant}`,
      columns: [{ label: 'Kind' }, { label: 'When' }, { label: 'What' }, { label: 'Price' }, { label: 'Amount', num: true }],
      rows: [
        h('tr', {}, td(''), td(''), h('th', { scope: 'row' }, 'Opening balance'), td(''), td(money(s.opening_balance_nanos), true)),
        ...rows,
      ],
      foot: h('tr', {}, td(''), td(''), h('th', { scope: 'row' }, 'Closing balance'), td(''),
        td(money(s.closing_balance_nanos), true, { id: 'statement-closing', dataset: { nanos: s.closing_balance_nanos } })),
    }),
  ];
}

// ---------------------------------------------------------------------------------------------
// Operator pages

function operatorOnly(title) {
  return [h('h1', {}, title), h('p', {}, 'This page is for the operator. Sign in with the operator’s admin token to see it.')];
}

async function pageTenants(ctx) {
  if (!isOperator()) return operatorOnly('Tenants');
  const monthParam = ctx.params.get('month');
  const month = isMonth(monthParam) ? monthParam : currentMonth();
  const list = await api('GET', `../admin/tenants?month=${enc(month)}`, undefined, ctx);
  const monthInput = h('input', { id: 'tenants-month', type: 'month', value: month });
  monthInput.addEventListener('change', () => {
    if (isMonth(monthInput.value)) location.hash = hashOf('/tenants', { month: monthInput.value });
  });
  const rows = (list.data || []).map((t) => h('tr', { dataset: { tenant: t.tenant } },
    h('th', { scope: 'row' }, t.tenant),
    td(formatNanos(t.month_cost_nanos, t.currency), true, { dataset: { nanos: t.month_cost_nanos } }),
    td(formatInt(t.requests), true),
    td(formatInt(t.prompt_tokens), true),
    td(formatInt(t.completion_tokens), true),
    td(formatNanos(t.balance_nanos, t.currency), true),
    td(formatNanos(t.reserved_nanos, t.currency), true),
    td([
      h('a', { href: hashOf('/usage', { tenant: t.tenant }), 'aria-label': `Usage of ${t.tenant}` }, 'Usage'), ' · ',
      h('a', { href: hashOf('/keys', { tenant: t.tenant }), 'aria-label': `Keys of ${t.tenant}` }, 'Keys'), ' · ',
      h('a', { href: hashOf('/billing', { tenant: t.tenant }), 'aria-label': `Billing of ${t.tenant}` }, 'Billing'),
    ])));
  return [
    h('h1', {}, 'Tenants'),
    h('div', { class: 'controls' }, h('div', { class: 'field' }, h('label', { for: 'tenants-month' }, 'Month (UTC)'), monthInput)),
    table({
      id: 'tenants-table',
      caption: `Every tenant’s spend in ${list.month || month}`,
      columns: [{ label: 'Tenant' }, { label: 'Cost this month', num: true }, { label: 'Requests', num: true }, { label: 'Prompt tokens', num: true },
        { label: 'Completion tokens', num: true }, { label: 'Balance', num: true }, { label: 'Reserved', num: true }, { label: 'Pages' }],
      rows: rows.length ? rows : [h('tr', {}, h('td', { colspan: 8 }, 'No tenants yet.'))],
    }),
    h('p', { class: 'muted' }, 'Spend comes from the daily usage rollup; balances from the prepaid accounts.'),
  ];
}

const STATE_TONES = { resident: 'ok', loading: 'info', evicting: 'warn', cold: 'idle' };
// A budget this large means none was configured.
const MEMORY_UNBOUNDED = 2 ** 53;

async function pagePool(ctx) {
  if (!isOperator()) return operatorOnly('Pool');
  const box = h('div', { id: 'pool-box' });
  const draw = (pool) => {
    const bounded = pool.memory_bytes_max > 0 && pool.memory_bytes_max < MEMORY_UNBOUNDED;
    const max = pool.memory_bytes_max;
    const c = pool.counters || {};
    const memoryLabel = (used) => (bounded ? `${formatBytes(used)} of ${formatBytes(max)}` : `${formatBytes(used)} (no budget)`);
    const rows = (pool.models || []).map((m) => h('tr', { dataset: { model: m.id, state: m.state } },
      h('th', { scope: 'row' }, m.id, m.pinned ? h('span', { class: 'muted' }, ' (pinned)') : null),
      td(badge(m.state, STATE_TONES[m.state] || 'idle'), false, { class: 'state' }),
      td(formatInt(m.queued), true),
      td(formatInt(m.in_flight), true),
      td(bounded ? bar(m.memory_bytes, max, memoryLabel(m.memory_bytes)) : memoryLabel(m.memory_bytes)),
      td(formatAgo(m.last_switch_ms_ago)),
      td(m.state === 'cold' && m.last_switch_ms_ago == null ? 'never' : formatAgo(m.last_used_ms_ago))));
    box.replaceChildren(
      h('dl', { class: 'cards' },
        h('div', { class: 'card' }, h('dt', {}, 'Policy'), h('dd', {}, pool.policy)),
        h('div', { class: 'card' }, h('dt', {}, 'Memory'), h('dd', {},
          bounded ? bar(pool.memory_bytes_used, max, memoryLabel(pool.memory_bytes_used)) : memoryLabel(pool.memory_bytes_used))),
        h('div', { class: 'card' }, h('dt', {}, 'Queued'), h('dd', { id: 'pool-queued' }, formatInt(pool.queued))),
        h('div', { class: 'card' }, h('dt', {}, 'Loads · evictions'), h('dd', { id: 'pool-loads', dataset: { loads: c.loads ?? 0 } }, `${formatInt(c.loads ?? 0)} · ${formatInt(c.evictions ?? 0)}`)),
        h('div', { class: 'card' }, h('dt', {}, 'Requests admitted · finished'), h('dd', {}, `${formatInt(c.requests_admitted ?? 0)} · ${formatInt(c.requests_finished ?? 0)}`))),
      table({
        id: 'pool-table',
        caption: 'Models in the pool',
        columns: [{ label: 'Model' }, { label: 'State' }, { label: 'Queued', num: true }, { label: 'In flight', num: true },
          { label: 'Memory' }, { label: 'Last switch' }, { label: 'Last used' }],
        rows: rows.length ? rows : [h('tr', {}, h('td', { colspan: 7 }, 'No pooled models.'))],
      }),
      updatedNote());
  };
  draw(await api('GET', '../v1/pool', undefined, ctx));
  startPolling(ctx, async () => {
    const pool = await api('GET', '../v1/pool');
    if (ctx.isCurrent()) draw(pool);
  });
  return [h('h1', {}, 'Pool'), box];
}

const BREAKER_TONES = { closed: 'ok', open: 'bad', half_open: 'warn' };

async function pageBackends(ctx) {
  if (!isOperator()) return operatorOnly('Backends');
  const box = h('div', { id: 'backends-box' });
  const draw = (list) => {
    const rows = (list.data || []).map((b) => h('tr', { dataset: { backend: b.id, healthy: String(b.healthy), breaker: b.breaker } },
      h('th', { scope: 'row' }, b.id),
      td(b.kind),
      td(h('code', {}, b.url)),
      td(`${b.region} / ${b.zone}`),
      td((b.models || []).join(', ')),
      td(b.healthy ? badge('up', 'ok') : badge('down', 'bad'), false, { class: 'health' }),
      td(badge(String(b.breaker).replace('_', '-'), BREAKER_TONES[b.breaker] || 'idle'), false, { class: 'breaker' }),
      td(`${formatInt(b.latency_ms_ewma)} ms`, true),
      td(`${formatInt(b.in_flight)} / ${formatInt(b.concurrency_max)}`, true),
      td(`${formatInt(b.attempts_ok)} / ${formatInt(b.attempts_failed)}`, true)));
    box.replaceChildren(
      h('p', {}, 'This gateway runs in region ', h('strong', {}, list.region), '.'),
      table({
        id: 'backends-table',
        caption: rows.length ? 'Remote backends' : 'No remote backends are configured.',
        columns: [{ label: 'Backend' }, { label: 'Kind' }, { label: 'URL' }, { label: 'Region / zone' }, { label: 'Models' }, { label: 'Health' },
          { label: 'Breaker' }, { label: 'Latency (average)', num: true }, { label: 'In flight / max', num: true }, { label: 'Attempts ok / failed', num: true }],
        rows,
      }),
      updatedNote());
  };
  draw(await api('GET', '../v1/backends', undefined, ctx));
  startPolling(ctx, async () => {
    const list = await api('GET', '../v1/backends');
    if (ctx.isCurrent()) draw(list);
  });
  return [h('h1', {}, 'Backends'), box];
}

async function pageAudit(ctx) {
  if (!isOperator()) return operatorOnly('Audit log');
  const afterParam = Number.parseInt(ctx.params.get('after') ?? '', 10);
  let page;
  if (Number.isInteger(afterParam) && afterParam >= 0) {
    page = await api('GET', `../admin/audit?after=${afterParam}&limit=${AUDIT_PAGE_LEN}`, undefined, ctx);
  } else {
    // Without `after`, the newest page: entries are numbered from 1, so the last page starts
    // after `chain_entries − page length`.
    page = await api('GET', `../admin/audit?after=0&limit=${AUDIT_PAGE_LEN}`, undefined, ctx);
    const last = Number(page.chain_entries) - AUDIT_PAGE_LEN;
    if (page.next_after !== null && last > 0) {
      page = await api('GET', `../admin/audit?after=${last}&limit=${AUDIT_PAGE_LEN}`, undefined, ctx);
    }
  }
  const entries = page.data || [];
  const verdict = page.chain_ok
    ? badge(`chain verified · ${formatInt(page.chain_entries)} entries`, 'ok')
    : badge(`chain broken at entry ${page.first_broken_seq}: ${page.first_broken_reason ?? 'unknown reason'}`, 'bad');
  const firstSeq = entries.length ? Number(entries[0].seq) : null;
  const pager = h('nav', { class: 'pager', 'aria-label': 'Audit pages' },
    firstSeq !== null && firstSeq > 1
      ? h('a', { href: hashOf('/audit', { after: Math.max(0, firstSeq - 1 - AUDIT_PAGE_LEN) }) }, 'Older entries') : null,
    page.next_after !== null && page.next_after !== undefined && Number(page.next_after) < Number(page.chain_entries)
      ? h('a', { href: hashOf('/audit', { after: page.next_after }) }, 'Newer entries') : null,
    h('a', { href: '#/audit' }, 'Newest'));
  const rows = [...entries].reverse().map((e) => h('tr', { dataset: { seq: e.seq } },
    td(formatInt(e.seq), true),
    td(formatTime(e.at_ms), false, { class: 'nowrap' }),
    td(h('code', {}, e.actor)),
    h('th', { scope: 'row' }, e.action),
    td(h('code', {}, e.target)),
    td(h('code', {}, JSON.stringify(e.details, (k, v) => (typeof v === 'bigint' ? v.toString() : v))), false, { class: 'details' })));
  return [
    h('h1', {}, 'Audit log'),
    h('p', { id: 'audit-chain', dataset: { chainOk: String(page.chain_ok) } }, verdict),
    checkpointNote(page),
    pager,
    table({
      id: 'audit-table',
      caption: entries.length ? `Entries ${entries[0].seq} to ${entries[entries.length - 1].seq}, newest first` : 'No audit entries.',
      columns: [{ label: 'Seq', num: true }, { label: 'When' }, { label: 'Actor' }, { label: 'Action' }, { label: 'Target' }, { label: 'Details' }],
      rows,
    }),
  ];
}

/** What the signed checkpoints of the audit chain add to its verdict. */
function checkpointNote(page) {
  const count = Number(page.chain_checkpoints ?? 0);
  if (count === 0) return h('p', { class: 'muted' }, 'No signed checkpoint yet.');
  const signatures = page.checkpoint_signatures_checked
    ? 'their signatures verified'
    : 'their signatures not checked (no checkpoint key is configured)';
  const latest = page.latest_checkpoint;
  return h('p', { class: 'muted', id: 'audit-checkpoints' },
    `${formatInt(count)} signed checkpoint${count === 1 ? '' : 's'} checked against the entries, ${signatures}`,
    latest ? `; the newest covers entry ${latest.seq} (${formatTime(latest.created_at_ms)}).` : '.');
}

// ---------------------------------------------------------------------------------------------
// Start

async function boot() {
  $('sign-out').addEventListener('click', signOut);
  $('secret-copy').addEventListener('click', () => {
    copySecret().catch(() => {
      $('secret-status').textContent = 'Select the secret and copy it by hand.';
    });
  });
  $('secret-close').addEventListener('click', closeSecret);
  // Escape fires `cancel` before the dialog closes; `close` itself comes a task later. Forget
  // the secret on both, so it is gone by the time the dialog is.
  $('secret-dialog').addEventListener('cancel', forgetSecret);
  $('secret-dialog').addEventListener('close', forgetSecret);
  window.addEventListener('hashchange', () => {
    route().catch(reportError);
  });
  document.addEventListener('visibilitychange', onVisibilityChange);
  try {
    state.session = await api('GET', 'api/session');
  } catch (error) {
    state.session = null;
    if (!isSignedOut(error)) {
      renderSignIn();
      showBanner(error.message);
      return;
    }
  }
  renderChrome();
  await route();
}

if (typeof document !== 'undefined') {
  boot().catch((error) => showBanner(error instanceof Error ? error.message : String(error)));
}
