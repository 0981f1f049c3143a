-- Daily usage rollups: one row per tenant, project, key, model and UTC day with the sums of
-- that day's usage entries, written in the same transaction as the entries themselves (by the
-- settle writer and by record_usage), so the console reads a few rows instead of every entry.
-- `day` is the UTC calendar day of the entry's created_at_ms as days since 1970-01-01; entries
-- without a project (money-free) or without a model are counted under the empty string.
CREATE TABLE usage_daily (
    tenant_id            TEXT    NOT NULL,
    project_id           TEXT    NOT NULL,
    key_id               TEXT    NOT NULL,
    model                TEXT    NOT NULL,
    day                  BIGINT  NOT NULL,
    requests             BIGINT  NOT NULL CHECK (requests >= 0),
    prompt_tokens        BIGINT  NOT NULL CHECK (prompt_tokens >= 0),
    cached_prompt_tokens BIGINT  NOT NULL CHECK (cached_prompt_tokens >= 0),
    completion_tokens    BIGINT  NOT NULL CHECK (completion_tokens >= 0),
    cost_nanos           BIGINT  NOT NULL CHECK (cost_nanos >= 0),
    PRIMARY KEY (tenant_id, project_id, key_id, model, day)
);
CREATE INDEX usage_daily_by_tenant_day ON usage_daily (tenant_id, day);

-- Backfill from every usage entry already written. The day is the floor of created_at_ms /
-- 86,400,000 (integer division truncates towards zero on both stores, hence the negative case).
INSERT INTO usage_daily (tenant_id, project_id, key_id, model, day, requests, prompt_tokens,
                         cached_prompt_tokens, completion_tokens, cost_nanos)
    SELECT tenant_id, COALESCE(project_id, ''), key_id, COALESCE(model, ''),
           CASE WHEN created_at_ms >= 0 THEN created_at_ms / 86400000
                ELSE -((-(created_at_ms + 1)) / 86400000) - 1 END,
           COUNT(*), SUM(prompt_tokens), SUM(cached_prompt_tokens), SUM(completion_tokens),
           SUM(cost_nanos)
    FROM usage_entries
    GROUP BY 1, 2, 3, 4, 5;
