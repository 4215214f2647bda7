-- Credit policies: billing periods, recurring allowances, adjustments,
-- account change requests.

-- Billing periods. kind: 'month' | 'year' | 'trial'. A NULL anchor means
-- calendar periods: the 1st (January 1st) at 00:00 in the time zone.
ALTER TABLE tenants
    ADD COLUMN period_kind      text NOT NULL DEFAULT 'month' CHECK (period_kind IN ('month', 'year', 'trial')),
    ADD COLUMN period_anchor    timestamptz,
    ADD COLUMN period_time_zone text,
    ADD COLUMN trial_end        timestamptz,
    -- category → most grants of it per account.
    ADD COLUMN grant_limits     jsonb NOT NULL DEFAULT '{}';

-- An account's own period (period_kind NULL: the tenant's), and its
-- current period, advanced by the period job exactly once per boundary.
ALTER TABLE accounts
    ADD COLUMN period_kind       text CHECK (period_kind IN ('month', 'year', 'trial')),
    ADD COLUMN period_anchor     timestamptz,
    ADD COLUMN period_time_zone  text,
    ADD COLUMN trial_end         timestamptz,
    ADD COLUMN tier              text NOT NULL DEFAULT '',
    ADD COLUMN period_start      timestamptz,
    -- NULL once a trial has ended (no more boundaries).
    ADD COLUMN period_end        timestamptz,
    -- false between a boundary's PostgreSQL step and its Redis step.
    ADD COLUMN hot_period_synced boolean NOT NULL DEFAULT true;
CREATE INDEX accounts_period_due ON accounts (period_end) WHERE period_end IS NOT NULL;
CREATE INDEX accounts_period_unsynced ON accounts (tenant_id) WHERE NOT hot_period_synced;

CREATE TABLE allowances (
    allowance_id    uuid PRIMARY KEY,
    tenant_id       text NOT NULL,
    account_id      text NOT NULL,
    amount          numeric(24, 6) NOT NULL CHECK (amount > 0),
    category        text NOT NULL,
    priority        integer NOT NULL,
    rollover        text NOT NULL CHECK (rollover IN ('none', 'all', 'up_to')),
    rollover_max    numeric(24, 6) CHECK (rollover_max >= 0),
    description     text NOT NULL DEFAULT '',
    idempotency_key text NOT NULL,
    payload_hash    text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    ended_at        timestamptz,
    FOREIGN KEY (tenant_id, account_id) REFERENCES accounts (tenant_id, account_id),
    UNIQUE (tenant_id, idempotency_key),
    CHECK ((rollover = 'up_to') = (rollover_max IS NOT NULL))
);
CREATE INDEX allowances_account ON allowances (tenant_id, account_id);

ALTER TABLE grants
    ADD COLUMN reason       text NOT NULL DEFAULT '',
    ADD COLUMN actor        text NOT NULL DEFAULT '',
    ADD COLUMN allowance_id uuid REFERENCES allowances (allowance_id);
CREATE INDEX grants_allowance ON grants (allowance_id, expires_at) WHERE allowance_id IS NOT NULL;

-- Manual corrections that remove credits (positive ones are grants).
CREATE TABLE adjustments (
    adjustment_id   uuid PRIMARY KEY,
    tenant_id       text NOT NULL,
    account_id      text NOT NULL,
    amount          numeric(24, 6) NOT NULL CHECK (amount < 0),
    reason          text NOT NULL,
    actor           text NOT NULL,
    idempotency_key text NOT NULL,
    payload_hash    text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (tenant_id, account_id) REFERENCES accounts (tenant_id, account_id),
    UNIQUE (tenant_id, idempotency_key)
);

-- The ledger gains 'adjustment' rows (a negative adjustment spread over
-- grants in spend order; grant_id NULL for what no grant covered).
ALTER TABLE ledger ADD COLUMN adjustment_id uuid REFERENCES adjustments (adjustment_id);
DO $$
DECLARE c record;
BEGIN
    FOR c IN SELECT conname FROM pg_constraint WHERE conrelid = 'ledger'::regclass AND contype = 'c' LOOP
        EXECUTE format('ALTER TABLE ledger DROP CONSTRAINT %I', c.conname);
    END LOOP;
END $$;
ALTER TABLE ledger
    ADD CONSTRAINT ledger_kind CHECK (kind IN ('grant', 'usage', 'cover', 'void', 'expiry', 'adjustment')),
    ADD CONSTRAINT ledger_grant_rows CHECK (kind IN ('usage', 'cover', 'adjustment') OR grant_id IS NOT NULL),
    ADD CONSTRAINT ledger_usage_rows CHECK ((kind = 'usage') = (event_id IS NOT NULL)),
    ADD CONSTRAINT ledger_adjustment_rows CHECK ((kind = 'adjustment') = (adjustment_id IS NOT NULL));

CREATE TABLE account_changes (
    change_id       uuid PRIMARY KEY,
    tenant_id       text NOT NULL,
    account_id      text NOT NULL,
    -- {"pool_access": bool, "cap": "500" | "", "tier": "pro"}: the keys asked for.
    requested       jsonb NOT NULL,
    note            text NOT NULL DEFAULT '',
    status          text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'approved', 'denied')),
    idempotency_key text NOT NULL,
    payload_hash    text NOT NULL,
    requested_at    timestamptz NOT NULL DEFAULT now(),
    decided_at      timestamptz,
    decision_note   text NOT NULL DEFAULT '',
    FOREIGN KEY (tenant_id, account_id) REFERENCES accounts (tenant_id, account_id),
    UNIQUE (tenant_id, idempotency_key)
);
