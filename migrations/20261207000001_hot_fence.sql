-- The fence between Redis and PostgreSQL (ARCHITECTURE.md, "Fencing the hot
-- state"). One row per tenant:
--   generation  the hot state PostgreSQL trusts (new at every rebuild; the
--               Redis fence hash names it too; '' = none yet: rebuild)
--   position    the highest fence position of a change PostgreSQL has
--               confirmed (a usage event written, a ledger row applied,
--               account settings, a period boundary, a repair): a Redis
--               whose fence is below it lost a confirmed change
--   process     the Redis process ("<run_id>:<master_replid>") whose
--               changes PostgreSQL accepts; naming a new one refuses every
--               later confirmation from the old one
CREATE TABLE hot_fences (
    tenant_id  text PRIMARY KEY REFERENCES tenants (tenant_id),
    generation text NOT NULL DEFAULT '',
    position   bigint NOT NULL DEFAULT 0 CHECK (position >= 0),
    process    text NOT NULL DEFAULT ''
);

-- Existing tenants get no generation: their hot state (under the earlier
-- `epoch` key) is rebuilt once by the first replica of this version.
INSERT INTO hot_fences (tenant_id) SELECT tenant_id FROM tenants;
