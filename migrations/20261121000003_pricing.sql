-- Price books: versions of a price catalog. tenant_id NULL is the
-- deployment's default catalog; a tenant's book overrides it entry by entry.
-- Books are immutable: a change is a new book. The catalog in force for a
-- tenant at time T is the latest default book and the latest tenant book
-- with effective_at <= T; its version "d<id>.t<id>" (0 = none) is pinned by
-- each Reserve for its Commit.
CREATE TABLE price_books (
    book_id         bigserial PRIMARY KEY,
    tenant_id       text REFERENCES tenants (tenant_id),
    effective_at    timestamptz NOT NULL,
    -- {"prices": [{"meter", "model", "tier", "unit_price", "per_units"}],
    --  "models": {"<model id>": "<tier>"}}
    content         jsonb NOT NULL,
    content_hash    text NOT NULL,
    idempotency_key text,
    -- Fingerprint of the SetPrices request, to refuse a reused key.
    payload_hash    text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE NULLS NOT DISTINCT (tenant_id, idempotency_key)
);
CREATE INDEX price_books_in_force ON price_books (tenant_id, effective_at DESC, book_id DESC);

-- What each charge was priced with.
ALTER TABLE usage_events
    ADD COLUMN price_version text,
    ADD COLUMN line_items jsonb;
