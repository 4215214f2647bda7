-- creditd schema, version 1. PostgreSQL is the source of truth: Redis holds
-- only what can be rebuilt from these tables.

CREATE TABLE tenants (
    tenant_id    text PRIMARY KEY,
    display_name text NOT NULL DEFAULT '',
    credit_value numeric(24, 6) NOT NULL CHECK (credit_value > 0),
    currency     text NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    time_zone    text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);

-- The account tree of each tenant. Behaviour comes from parent_id,
-- pool_access, cap and suspended; kind is informational.
CREATE TABLE accounts (
    tenant_id    text NOT NULL REFERENCES tenants (tenant_id),
    account_id   text NOT NULL,
    parent_id    text,
    kind         text NOT NULL CHECK (kind IN ('unspecified', 'organization', 'team', 'user', 'workspace')),
    display_name text NOT NULL DEFAULT '',
    pool_access  boolean NOT NULL DEFAULT false,
    cap          numeric(24, 6) CHECK (cap > 0),
    suspended    boolean NOT NULL DEFAULT false,
    depth        integer NOT NULL CHECK (depth BETWEEN 1 AND 8),
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, account_id),
    FOREIGN KEY (tenant_id, parent_id) REFERENCES accounts (tenant_id, account_id),
    CHECK (parent_id IS NULL OR parent_id <> account_id)
);
CREATE INDEX accounts_children ON accounts (tenant_id, parent_id);

CREATE TABLE grants (
    grant_id        uuid PRIMARY KEY,
    tenant_id       text NOT NULL,
    account_id      text NOT NULL,
    amount          numeric(24, 6) NOT NULL CHECK (amount > 0),
    category        text NOT NULL CHECK (category IN
                        ('plan', 'purchase', 'promotional', 'referral', 'welcome', 'trial', 'refund', 'adjustment')),
    priority        integer NOT NULL,
    effective_at    timestamptz NOT NULL,
    expires_at      timestamptz CHECK (expires_at IS NULL OR expires_at > effective_at),
    description     text NOT NULL DEFAULT '',
    idempotency_key text NOT NULL,
    payload_hash    text NOT NULL,
    -- When the credits entered the balance (NULL while pending).
    credited_at     timestamptz,
    voided_at       timestamptz,
    void_reason     text,
    void_key        text,
    void_hash       text,
    expired_at      timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (tenant_id, account_id) REFERENCES accounts (tenant_id, account_id),
    UNIQUE (tenant_id, idempotency_key),
    UNIQUE (tenant_id, void_key),
    CHECK ((voided_at IS NULL) = (void_reason IS NULL))
);
CREATE INDEX grants_account ON grants (tenant_id, account_id);
CREATE INDEX grants_pending ON grants (effective_at) WHERE credited_at IS NULL AND voided_at IS NULL;
CREATE INDEX grants_expiring ON grants (expires_at)
    WHERE expires_at IS NOT NULL AND expired_at IS NULL AND voided_at IS NULL;

-- One row per Commit or Charge, append-only. draws: [{"account": id,
-- "amount": "1.5"}], what each account of the draw chain was charged
-- (decided atomically in Redis). allocated: its draws have been spread
-- over grants in the ledger.
CREATE TABLE usage_events (
    event_id        uuid PRIMARY KEY,
    tenant_id       text NOT NULL REFERENCES tenants (tenant_id),
    account_id      text NOT NULL,
    reservation_id  uuid,
    kind            text NOT NULL CHECK (kind IN ('commit', 'charge')),
    idempotency_key text NOT NULL,
    payload_hash    text NOT NULL,
    amount          numeric(24, 6) NOT NULL CHECK (amount >= 0),
    held            numeric(24, 6) NOT NULL CHECK (held >= 0),
    overdraft       numeric(24, 6) NOT NULL CHECK (overdraft >= 0 AND overdraft <= amount),
    draws           jsonb NOT NULL,
    labels          jsonb NOT NULL DEFAULT '{}',
    hot_epoch       text NOT NULL,
    recorded_at     timestamptz NOT NULL,
    allocated       boolean NOT NULL DEFAULT false,
    UNIQUE (tenant_id, reservation_id),
    UNIQUE (tenant_id, kind, idempotency_key),
    CHECK ((kind = 'commit') = (reservation_id IS NOT NULL))
);
CREATE INDEX usage_events_unallocated ON usage_events (tenant_id, recorded_at) WHERE NOT allocated;
CREATE INDEX usage_events_account_time ON usage_events (tenant_id, account_id, recorded_at);

-- The ledger: every change of an account's credits, per grant.
--   grant   +amount     the grant's credits entered the balance
--   usage   -part       usage allocated to this grant (grant_id NULL: no
--                       grant covered it; an overdraft of the account)
--   cover   -x / +x     a later grant paid x of the account's overdraft:
--                       one row on the grant, one (+x, grant_id NULL)
--   void    -remaining  voided
--   expiry  -remaining  expired
-- Σ amount of a grant = its remaining credits. Σ amount of an account,
-- minus the draws of its events not yet allocated, = its hot balance.
-- applied: the row's delta reached the Redis balance (grant, void, expiry;
-- usage and cover rows change no hot balance and are born applied).
CREATE TABLE ledger (
    entry_id   bigserial PRIMARY KEY,
    tenant_id  text NOT NULL,
    account_id text NOT NULL,
    grant_id   uuid REFERENCES grants (grant_id),
    event_id   uuid REFERENCES usage_events (event_id),
    kind       text NOT NULL CHECK (kind IN ('grant', 'usage', 'cover', 'void', 'expiry')),
    amount     numeric(24, 6) NOT NULL,
    applied    boolean NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (tenant_id, account_id) REFERENCES accounts (tenant_id, account_id),
    CHECK (kind IN ('usage', 'cover') OR grant_id IS NOT NULL),
    CHECK ((kind = 'usage') = (event_id IS NOT NULL))
);
CREATE INDEX ledger_account ON ledger (tenant_id, account_id);
CREATE INDEX ledger_grant ON ledger (grant_id) WHERE grant_id IS NOT NULL;
CREATE INDEX ledger_unapplied ON ledger (tenant_id) WHERE NOT applied;
