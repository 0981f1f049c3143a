-- Cached prompt tokens a backend did not report: 1 marks an entry whose cached_prompt_tokens
-- is unknown (stored as 0 and billed as uncached input), not a true 0. Local engines always
-- know; a remote backend without prompt_tokens_details (or Anthropic-style cache fields) does
-- not. The daily rollup counts such requests, so reports show what is known.
ALTER TABLE usage_entries ADD COLUMN cached_prompt_tokens_unknown BIGINT NOT NULL DEFAULT 0
    CHECK (cached_prompt_tokens_unknown IN (0, 1));
ALTER TABLE usage_daily ADD COLUMN cached_unknown_requests BIGINT NOT NULL DEFAULT 0
    CHECK (cached_unknown_requests >= 0);
