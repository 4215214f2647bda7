-- API keys. The secret is never stored: only its SHA-256. `prefix` is the
-- visible, unique part of the key ("cdk_<prefix>_<secret>") used to find it.
-- Operator keys belong to no tenant; runtime and admin keys to exactly one.
CREATE TABLE api_keys (
    key_id      uuid PRIMARY KEY,
    prefix      text NOT NULL UNIQUE CHECK (prefix ~ '^[0-9a-f]{12}$'),
    secret_hash text NOT NULL CHECK (secret_hash ~ '^[0-9a-f]{64}$'),
    tenant_id   text REFERENCES tenants (tenant_id),
    role        text NOT NULL CHECK (role IN ('runtime', 'admin', 'operator')),
    name        text NOT NULL DEFAULT '',
    -- Operator-chosen; a replay of CreateApiKey finds the key (never its
    -- secret again).
    idempotency_key text UNIQUE,
    payload_hash    text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz,
    CHECK ((role = 'operator') = (tenant_id IS NULL))
);
CREATE INDEX api_keys_tenant ON api_keys (tenant_id);
