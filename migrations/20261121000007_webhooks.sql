-- Alert webhooks: one endpoint per tenant, and one delivery per alert,
-- claimed by one replica at a time (FOR UPDATE SKIP LOCKED), retried with
-- exponential backoff, dead after max_attempts.
CREATE TABLE webhooks (
    tenant_id    text PRIMARY KEY REFERENCES tenants (tenant_id),
    url          text NOT NULL CHECK (url ~ '^https?://'),
    -- HMAC-SHA256 key of the signature header. Never returned by the API.
    secret       text NOT NULL CHECK (length(secret) >= 16),
    max_attempts integer NOT NULL CHECK (max_attempts BETWEEN 1 AND 100),
    created_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE webhook_deliveries (
    alert_seq       bigint PRIMARY KEY REFERENCES alerts (alert_seq),
    tenant_id       text NOT NULL,
    status          text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'dead')),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error      text NOT NULL DEFAULT '',
    delivered_at    timestamptz
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE status = 'pending';
CREATE INDEX webhook_deliveries_tenant ON webhook_deliveries (tenant_id, status, alert_seq);
