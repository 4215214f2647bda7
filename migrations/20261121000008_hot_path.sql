-- The commit path and the ledger job write usage events and ledger rows
-- only for tenants, accounts, grants and events the service has just read
-- (ledger rows under the tenant's ledger lock, in the transaction that
-- read them), and nothing ever deletes those parents. The foreign keys of
-- these append-only tables therefore only cost a lookup of each parent per
-- written row, on the hottest writes there are: they go. (Foreign keys of
-- the tables written by admin calls stay.)
DO $$
DECLARE c record;
BEGIN
    FOR c IN
        SELECT conrelid::regclass AS tbl, conname FROM pg_constraint
        WHERE contype = 'f'
          AND ((conrelid = 'usage_events'::regclass AND confrelid = 'tenants'::regclass)
            OR (conrelid = 'ledger'::regclass
                AND confrelid IN ('accounts'::regclass, 'grants'::regclass, 'usage_events'::regclass)))
    LOOP
        EXECUTE format('ALTER TABLE %s DROP CONSTRAINT %I', c.tbl, c.conname);
    END LOOP;
END $$;

-- The ledger job looks for accounts owing an overdraft (rows without a
-- grant) on every pass over a tenant with new usage; without this index it
-- read every ledger row of the tenant to find the few without a grant.
CREATE INDEX ledger_overdrafts ON ledger (tenant_id, account_id) WHERE grant_id IS NULL;

-- The rollup triggers' statement, static: PL/pgSQL plans a static
-- statement once per session and keeps the plan, where EXECUTE of the
-- formatted text (usage_rollup_statement) planned it again on every
-- statement that allocates events, i.e. on every ledger pass over a tenant.
-- Same text as usage_rollup_statement('old_rows', -1) and
-- usage_rollup_statement('new_rows', 1), which the backfill still uses.
CREATE OR REPLACE FUNCTION usage_rollup_sync() RETURNS trigger
LANGUAGE plpgsql SET jit = off AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        IF EXISTS (SELECT 1 FROM old_rows WHERE allocated) THEN
                WITH zones AS MATERIALIZED (
                    SELECT t.tenant_id, usage_report_zone(t.tenant_id) AS zone
                    FROM (SELECT DISTINCT c.tenant_id FROM old_rows AS c WHERE c.allocated) AS t
                ), groups AS MATERIALIZED (
                    SELECT e.tenant_id, (e.recorded_at AT TIME ZONE z.zone)::date AS day, e.account_id,
                           s.category, s.meter, s.model, s.tier,
                           -1 * sum(s.credits) AS credits, -1 * count(*) FILTER (WHERE s.is_primary) AS events,
                           -1 * count(*) AS lines
                    FROM old_rows AS e
                    JOIN zones AS z ON z.tenant_id = e.tenant_id
                    CROSS JOIN LATERAL usage_shares(e.line_items, e.labels, e.amount) AS s
                    WHERE e.allocated
                    GROUP BY 1, 2, 3, 4, 5, 6, 7
                ), by_account AS (
                    INSERT INTO usage_rollup AS r (tenant_id, day, account_id, category, meter, model, tier, credits, events, lines)
                    SELECT * FROM groups ORDER BY 1, 2, 3, 4, 5, 6, 7
                    ON CONFLICT (tenant_id, day, account_id, category, meter, model, tier) DO UPDATE
                        SET credits = r.credits + excluded.credits, events = r.events + excluded.events,
                            lines = r.lines + excluded.lines
                )
                INSERT INTO usage_rollup_tenant AS r (tenant_id, day, category, meter, model, tier, credits, events, lines)
                SELECT tenant_id, day, category, meter, model, tier, sum(credits), sum(events), sum(lines)
                FROM groups GROUP BY 1, 2, 3, 4, 5, 6 ORDER BY 1, 2, 3, 4, 5, 6
                ON CONFLICT (tenant_id, day, category, meter, model, tier) DO UPDATE
                    SET credits = r.credits + excluded.credits, events = r.events + excluded.events,
                        lines = r.lines + excluded.lines;
        END IF;
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        IF EXISTS (SELECT 1 FROM new_rows WHERE allocated) THEN
                WITH zones AS MATERIALIZED (
                    SELECT t.tenant_id, usage_report_zone(t.tenant_id) AS zone
                    FROM (SELECT DISTINCT c.tenant_id FROM new_rows AS c WHERE c.allocated) AS t
                ), groups AS MATERIALIZED (
                    SELECT e.tenant_id, (e.recorded_at AT TIME ZONE z.zone)::date AS day, e.account_id,
                           s.category, s.meter, s.model, s.tier,
                           1 * sum(s.credits) AS credits, 1 * count(*) FILTER (WHERE s.is_primary) AS events,
                           1 * count(*) AS lines
                    FROM new_rows AS e
                    JOIN zones AS z ON z.tenant_id = e.tenant_id
                    CROSS JOIN LATERAL usage_shares(e.line_items, e.labels, e.amount) AS s
                    WHERE e.allocated
                    GROUP BY 1, 2, 3, 4, 5, 6, 7
                ), by_account AS (
                    INSERT INTO usage_rollup AS r (tenant_id, day, account_id, category, meter, model, tier, credits, events, lines)
                    SELECT * FROM groups ORDER BY 1, 2, 3, 4, 5, 6, 7
                    ON CONFLICT (tenant_id, day, account_id, category, meter, model, tier) DO UPDATE
                        SET credits = r.credits + excluded.credits, events = r.events + excluded.events,
                            lines = r.lines + excluded.lines
                )
                INSERT INTO usage_rollup_tenant AS r (tenant_id, day, category, meter, model, tier, credits, events, lines)
                SELECT tenant_id, day, category, meter, model, tier, sum(credits), sum(events), sum(lines)
                FROM groups GROUP BY 1, 2, 3, 4, 5, 6 ORDER BY 1, 2, 3, 4, 5, 6
                ON CONFLICT (tenant_id, day, category, meter, model, tier) DO UPDATE
                    SET credits = r.credits + excluded.credits, events = r.events + excluded.events,
                        lines = r.lines + excluded.lines;
        END IF;
    END IF;
    RETURN NULL;
END
$$;
