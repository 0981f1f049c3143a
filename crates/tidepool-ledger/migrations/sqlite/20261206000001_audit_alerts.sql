-- Audit log, alert outbox and key suspension. Times are integer milliseconds since the Unix
-- epoch.

-- Append-only, hash-chained audit log: `hash` = SHA-256 of `prev_hash` and the entry's own
-- canonical content (see `audit.rs`), so editing or deleting a row breaks the chain.
CREATE TABLE audit_log (
    seq       INTEGER PRIMARY KEY NOT NULL,
    at_ms     INTEGER NOT NULL,
    actor     TEXT    NOT NULL,
    action    TEXT    NOT NULL,
    target    TEXT    NOT NULL,
    details   TEXT    NOT NULL,
    prev_hash TEXT    NOT NULL,
    hash      TEXT    NOT NULL
);

-- The chain's head: one row, locked by every append so appends are serialised (on SQLite the
-- write lock of BEGIN IMMEDIATE already does it).
CREATE TABLE audit_head (
    id   INTEGER PRIMARY KEY NOT NULL CHECK (id = 1),
    seq  INTEGER NOT NULL,
    hash TEXT    NOT NULL
);
INSERT INTO audit_head (id, seq, hash)
    VALUES (1, 0, '0000000000000000000000000000000000000000000000000000000000000000');

-- Durable outbox of webhook alerts: one row per event and receiver (`sink_id`).
CREATE TABLE alert_outbox (
    id                 INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL,
    sink_id            TEXT    NOT NULL,
    event              TEXT    NOT NULL,
    -- the exact body sent (and signed)
    payload            TEXT    NOT NULL,
    -- deduplicated events (`budget_reached`) carry a key; NULLs never conflict
    dedup_key          TEXT,
    created_at_ms      INTEGER NOT NULL,
    attempts           INTEGER NOT NULL DEFAULT 0,
    next_attempt_at_ms INTEGER NOT NULL,
    claimed_by         TEXT,
    claimed_until_ms   INTEGER,
    delivered_at_ms    INTEGER,
    failed_at_ms       INTEGER,
    last_error         TEXT,
    UNIQUE (sink_id, dedup_key)
);
CREATE INDEX alert_outbox_due ON alert_outbox (next_attempt_at_ms)
    WHERE delivered_at_ms IS NULL AND failed_at_ms IS NULL;

ALTER TABLE api_keys ADD COLUMN suspended_at_ms INTEGER;
ALTER TABLE api_keys ADD COLUMN suspended_reason TEXT;
