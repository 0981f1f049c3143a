-- Audit entries carry the request that made them, and the chain gets HMAC-signed checkpoints.

-- The request id of the change (NULL for entries with none, and for every entry written before
-- this migration). `format` names the canonical content the entry's hash covers: 1 for the
-- entries written before this migration, 2 (which includes the request id) for new ones.
ALTER TABLE audit_log ADD COLUMN request_id TEXT;
ALTER TABLE audit_log ADD COLUMN format INTEGER NOT NULL DEFAULT 1;

-- A checkpoint signs the hash of entry `seq` (and so the whole chain up to it) with
-- HMAC-SHA256 under a key kept outside the database (see `audit.rs`).
CREATE TABLE audit_checkpoints (
    seq           INTEGER PRIMARY KEY NOT NULL,
    hash          TEXT    NOT NULL,
    created_at_ms INTEGER NOT NULL,
    hmac          TEXT    NOT NULL
);
