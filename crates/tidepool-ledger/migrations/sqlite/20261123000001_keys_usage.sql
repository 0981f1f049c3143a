-- Walking skeleton (issue 3): tenants, API keys (SHA-256 only), one usage row per request id.
-- Times are integer milliseconds since the Unix epoch.
CREATE TABLE tenants (
    tenant_id     TEXT    PRIMARY KEY NOT NULL,
    created_at_ms INTEGER NOT NULL
);

CREATE TABLE api_keys (
    key_id        TEXT    PRIMARY KEY NOT NULL,
    tenant_id     TEXT    NOT NULL REFERENCES tenants (tenant_id),
    name          TEXT    NOT NULL,
    secret_sha256 TEXT    NOT NULL,
    created_at_ms INTEGER NOT NULL,
    revoked_at_ms INTEGER
);
CREATE INDEX api_keys_by_tenant ON api_keys (tenant_id);

CREATE TABLE usage_entries (
    request_id           TEXT    PRIMARY KEY NOT NULL,
    tenant_id            TEXT    NOT NULL,
    key_id               TEXT    NOT NULL,
    model                TEXT,
    endpoint             TEXT    NOT NULL,
    prompt_tokens        INTEGER NOT NULL CHECK (prompt_tokens >= 0),
    completion_tokens    INTEGER NOT NULL CHECK (completion_tokens >= 0),
    cached_prompt_tokens INTEGER NOT NULL CHECK (cached_prompt_tokens >= 0),
    status               TEXT    NOT NULL,
    error_code           TEXT,
    latency_ms           INTEGER NOT NULL CHECK (latency_ms >= 0),
    created_at_ms        INTEGER NOT NULL
);
CREATE INDEX usage_entries_by_tenant_time ON usage_entries (tenant_id, created_at_ms);
