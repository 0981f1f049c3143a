-- The Batch API (OpenAI's /v1/files and /v1/batches). File contents live on disk in the
-- gateway's `[batch] files_dir`; these rows are their metadata. A batch's lines each get exactly
-- one row in batch_lines, keyed by (batch_id, custom_id): a succeeded line's row is written in
-- the same transaction as its settlement, so a crash never leaves a billed line without its
-- result nor a result billed twice. usage_entries.batch_id marks the entries of batch lines.
CREATE TABLE batch_files (
    file_id        TEXT    PRIMARY KEY,
    tenant_id      TEXT    NOT NULL,
    key_id         TEXT    NOT NULL,
    purpose        TEXT    NOT NULL,
    filename       TEXT    NOT NULL,
    bytes          BIGINT NOT NULL CHECK (bytes >= 0),
    status         TEXT    NOT NULL,
    created_at_ms  BIGINT NOT NULL,
    deleted_at_ms  BIGINT
);
CREATE INDEX batch_files_by_tenant ON batch_files (tenant_id, file_id);

CREATE TABLE batches (
    batch_id           TEXT    PRIMARY KEY,
    tenant_id          TEXT    NOT NULL,
    key_id             TEXT    NOT NULL,
    endpoint           TEXT    NOT NULL,
    model              TEXT,
    input_file_id      TEXT    NOT NULL,
    completion_window  TEXT    NOT NULL,
    metadata           TEXT,
    status             TEXT    NOT NULL CHECK (status IN ('validating', 'failed', 'in_progress',
                           'finalizing', 'completed', 'expired', 'cancelling', 'cancelled')),
    errors             TEXT,
    total              BIGINT NOT NULL DEFAULT 0 CHECK (total >= 0),
    output_file_id     TEXT,
    error_file_id      TEXT,
    created_at_ms      BIGINT NOT NULL,
    expires_at_ms      BIGINT NOT NULL,
    in_progress_at_ms  BIGINT,
    finalizing_at_ms   BIGINT,
    completed_at_ms    BIGINT,
    failed_at_ms       BIGINT,
    expired_at_ms      BIGINT,
    cancelling_at_ms   BIGINT,
    cancelled_at_ms    BIGINT,
    lease_owner        TEXT,
    lease_until_ms     BIGINT
);
CREATE INDEX batches_by_tenant ON batches (tenant_id, batch_id);
CREATE INDEX batches_active ON batches (status, created_at_ms);

CREATE TABLE batch_lines (
    batch_id           TEXT    NOT NULL,
    custom_id          TEXT    NOT NULL,
    line               BIGINT NOT NULL CHECK (line >= 1),
    request_id         TEXT,
    succeeded          BIGINT NOT NULL CHECK (succeeded IN (0, 1)),
    status_code        BIGINT,
    body               TEXT,
    error_code         TEXT,
    error_message      TEXT,
    prompt_tokens      BIGINT NOT NULL DEFAULT 0,
    completion_tokens  BIGINT NOT NULL DEFAULT 0,
    cost_nanos         BIGINT NOT NULL DEFAULT 0 CHECK (cost_nanos >= 0),
    created_at_ms      BIGINT NOT NULL,
    PRIMARY KEY (batch_id, custom_id),
    UNIQUE (batch_id, line)
);

ALTER TABLE usage_entries ADD COLUMN batch_id TEXT;
