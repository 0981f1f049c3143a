-- Billing (issue 6): accounts with prepaid balance, projects, credits, a versioned price book,
-- monthly budgets, RPM/TPM windows and durable reservations. Money is INTEGER nano-units of the
-- account's currency; times are integer milliseconds since the Unix epoch; months are 'YYYY-MM'
-- in UTC.

CREATE TABLE accounts (
    tenant_id      TEXT    PRIMARY KEY NOT NULL REFERENCES tenants (tenant_id),
    currency       TEXT    NOT NULL,
    -- credits minus settled costs
    balance_nanos  INTEGER NOT NULL,
    -- sum of the holds of open reservations
    reserved_nanos INTEGER NOT NULL DEFAULT 0,
    CHECK (reserved_nanos >= 0),
    CHECK (balance_nanos >= reserved_nanos)
);
INSERT INTO accounts (tenant_id, currency, balance_nanos, reserved_nanos)
    SELECT tenant_id, 'USD', 0, 0 FROM tenants;

CREATE TABLE projects (
    tenant_id     TEXT    NOT NULL REFERENCES tenants (tenant_id),
    project_id    TEXT    NOT NULL,
    created_at_ms INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, project_id)
);
INSERT INTO projects (tenant_id, project_id, created_at_ms)
    SELECT tenant_id, 'default', created_at_ms FROM tenants;
ALTER TABLE api_keys ADD COLUMN project_id TEXT NOT NULL DEFAULT 'default';

CREATE TABLE credits (
    credit_id     TEXT    PRIMARY KEY NOT NULL,
    tenant_id     TEXT    NOT NULL REFERENCES tenants (tenant_id),
    amount_nanos  INTEGER NOT NULL CHECK (amount_nanos > 0),
    month         TEXT    NOT NULL,
    created_at_ms INTEGER NOT NULL,
    note          TEXT    NOT NULL
);
CREATE INDEX credits_by_tenant_month ON credits (tenant_id, month);

CREATE TABLE prices (
    model                       TEXT    NOT NULL,
    effective_from_ms           INTEGER NOT NULL,
    currency                    TEXT    NOT NULL,
    input_per_mtok_nanos        INTEGER NOT NULL CHECK (input_per_mtok_nanos >= 0),
    output_per_mtok_nanos       INTEGER NOT NULL CHECK (output_per_mtok_nanos >= 0),
    cached_input_per_mtok_nanos INTEGER NOT NULL CHECK (cached_input_per_mtok_nanos >= 0),
    PRIMARY KEY (model, effective_from_ms)
);

-- scope is 'project' (scope_id 'tenant/project') or 'key' (scope_id = key id).
CREATE TABLE budgets (
    scope       TEXT    NOT NULL,
    scope_id    TEXT    NOT NULL,
    limit_nanos INTEGER NOT NULL CHECK (limit_nanos >= 0),
    PRIMARY KEY (scope, scope_id)
);

CREATE TABLE budget_spend (
    scope          TEXT    NOT NULL,
    scope_id       TEXT    NOT NULL,
    month          TEXT    NOT NULL,
    reserved_nanos INTEGER NOT NULL CHECK (reserved_nanos >= 0),
    spent_nanos    INTEGER NOT NULL CHECK (spent_nanos >= 0),
    PRIMARY KEY (scope, scope_id, month)
);

-- scope is 'key', 'project' or 'model'.
CREATE TABLE rate_limits (
    scope               TEXT    NOT NULL,
    scope_id            TEXT    NOT NULL,
    requests_per_minute INTEGER CHECK (requests_per_minute >= 0),
    tokens_per_minute   INTEGER CHECK (tokens_per_minute >= 0),
    PRIMARY KEY (scope, scope_id)
);

CREATE TABLE rate_windows (
    scope           TEXT    NOT NULL,
    scope_id        TEXT    NOT NULL,
    window_start_ms INTEGER NOT NULL,
    requests        INTEGER NOT NULL CHECK (requests >= 0),
    tokens          INTEGER NOT NULL CHECK (tokens >= 0),
    PRIMARY KEY (scope, scope_id, window_start_ms)
);

CREATE TABLE reservations (
    request_id                  TEXT    PRIMARY KEY NOT NULL,
    tenant_id                   TEXT    NOT NULL,
    project_id                  TEXT    NOT NULL,
    key_id                      TEXT    NOT NULL,
    model                       TEXT    NOT NULL,
    replica_id                  TEXT    NOT NULL,
    idempotency_key             TEXT,
    month                       TEXT    NOT NULL,
    currency                    TEXT    NOT NULL,
    price_effective_from_ms     INTEGER NOT NULL,
    input_per_mtok_nanos        INTEGER NOT NULL,
    output_per_mtok_nanos       INTEGER NOT NULL,
    cached_input_per_mtok_nanos INTEGER NOT NULL,
    prompt_tokens_max           INTEGER NOT NULL CHECK (prompt_tokens_max >= 0),
    completion_tokens_max       INTEGER NOT NULL CHECK (completion_tokens_max >= 0),
    hold_nanos                  INTEGER NOT NULL CHECK (hold_nanos >= 0),
    progress_completion_tokens  INTEGER NOT NULL DEFAULT 0,
    progress_at_ms              INTEGER,
    state                       TEXT    NOT NULL CHECK (state IN ('open', 'settled', 'voided')),
    created_at_ms               INTEGER NOT NULL,
    resolved_at_ms              INTEGER,
    UNIQUE (tenant_id, idempotency_key)
);
CREATE INDEX reservations_open ON reservations (created_at_ms) WHERE state = 'open';

ALTER TABLE usage_entries ADD COLUMN project_id TEXT;
ALTER TABLE usage_entries ADD COLUMN month TEXT;
ALTER TABLE usage_entries ADD COLUMN currency TEXT;
ALTER TABLE usage_entries ADD COLUMN cost_nanos INTEGER NOT NULL DEFAULT 0;
ALTER TABLE usage_entries ADD COLUMN price_effective_from_ms INTEGER;
ALTER TABLE usage_entries ADD COLUMN input_per_mtok_nanos INTEGER;
ALTER TABLE usage_entries ADD COLUMN output_per_mtok_nanos INTEGER;
ALTER TABLE usage_entries ADD COLUMN cached_input_per_mtok_nanos INTEGER;
CREATE INDEX usage_entries_by_tenant_month ON usage_entries (tenant_id, month);
