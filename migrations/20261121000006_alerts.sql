-- Balance alerts: thresholds per tenant (default) or per account, and the
-- outbox of fired alerts (moved here exactly once from each tenant's Redis
-- stream, in order: alert_seq is the WatchAlerts cursor).
ALTER TABLE tenants
    ADD COLUMN alert_percents      integer[] NOT NULL DEFAULT '{25,15,0}',
    ADD COLUMN alert_amounts       numeric(24, 6)[] NOT NULL DEFAULT '{}',
    ADD COLUMN alert_rearm_on_topup boolean NOT NULL DEFAULT false;
ALTER TABLE accounts
    ADD COLUMN alert_percents      integer[],
    ADD COLUMN alert_amounts       numeric(24, 6)[],
    ADD COLUMN alert_rearm_on_topup boolean,
    -- An account's own policy replaces the tenant's when set.
    ADD CONSTRAINT accounts_alert_policy CHECK (
        (alert_percents IS NULL) = (alert_amounts IS NULL)
        AND (alert_percents IS NULL) = (alert_rearm_on_topup IS NULL));

CREATE TABLE alerts (
    alert_seq      bigserial PRIMARY KEY,
    tenant_id      text NOT NULL REFERENCES tenants (tenant_id),
    -- The Redis stream entry id: moving an alert twice inserts it once.
    stream_id      text NOT NULL,
    account_id     text NOT NULL,
    kind           text NOT NULL CHECK (kind IN ('percent', 'amount')),
    threshold      numeric(24, 6) NOT NULL,
    available      numeric(24, 6) NOT NULL,
    period_credits numeric(24, 6) NOT NULL,
    fired_at       timestamptz NOT NULL,
    UNIQUE (tenant_id, stream_id)
);
CREATE INDEX alerts_tenant_seq ON alerts (tenant_id, alert_seq);
CREATE INDEX alerts_account_time ON alerts (tenant_id, account_id, fired_at);
