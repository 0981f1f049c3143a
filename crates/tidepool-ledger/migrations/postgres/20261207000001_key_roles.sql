-- API key roles: `inference` (the model endpoints and the key's own usage) or `tenant-admin`
-- (also the tenant's keys, budgets, usage and statement through the admin API and the console).
ALTER TABLE api_keys ADD COLUMN role TEXT NOT NULL DEFAULT 'inference'
    CHECK (role IN ('inference', 'tenant-admin'));
