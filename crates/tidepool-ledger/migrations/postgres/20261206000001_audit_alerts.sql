-- Audit log, alert outbox and key suspension. Times are BIGINT milliseconds since the Unix
-- epoch.

-- Append-only, hash-chained audit log: `hash` = SHA-256 of `prev_hash` and the entry's own
-- canonical content (see `audit.rs`), so editing or deleting a row breaks the chain.
CREATE TABLE audit_log (
    seq       BIGINT PRIMARY KEY,
    at_ms     BIGINT NOT NULL,
    actor     TEXT   NOT NULL,
    action    TEXT   NOT NULL,
    target    TEXT   NOT NULL,
    details   TEXT   NOT NULL,
    prev_hash TEXT   NOT NULL,
    hash      TEXT   NOT NULL
);

-- The chain's head: one row, locked (`SELECT ... FOR UPDATE`) by every append, so appends from
-- every replica are serialised and each links to the one before.
CREATE TABLE audit_head (
    id   INTEGER PRIMARY KEY CHECK (id = 1),
    seq  BIGINT  NOT NULL,
    hash TEXT    NOT NULL
);
INSERT INTO audit_head (id, seq, hash)
    VALUES (1, 0, '0000000000000000000000000000000000000000000000000000000000000000');

-- Durable outbox of webhook alerts: one row per event and receiver (`sink_id`).
CREATE TABLE alert_outbox (
    id                 BIGSERIAL PRIMARY KEY,
    sink_id            TEXT   NOT NULL,
    event              TEXT   NOT NULL,
    -- the exact body sent (and signed)
    payload            TEXT   NOT NULL,
    -- deduplicated events (`budget_reached`) carry a key; NULLs never conflict
    dedup_key          TEXT,
    created_at_ms      BIGINT NOT NULL,
    attempts           BIGINT NOT NULL DEFAULT 0,
    next_attempt_at_ms BIGINT NOT NULL,
    claimed_by         TEXT,
    claimed_until_ms   BIGINT,
    delivered_at_ms    BIGINT,
    failed_at_ms       BIGINT,
    last_error         TEXT,
    UNIQUE (sink_id, dedup_key)
);
CREATE INDEX alert_outbox_due ON alert_outbox (next_attempt_at_ms)
    WHERE delivered_at_ms IS NULL AND failed_at_ms IS NULL;

ALTER TABLE api_keys ADD COLUMN suspended_at_ms BIGINT;
ALTER TABLE api_keys ADD COLUMN suspended_reason TEXT;
