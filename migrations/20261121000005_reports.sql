-- Reports (ReportService): daily rollups of usage kept exact by triggers,
-- and the indexes the report queries page with.
--
-- Why a rollup and not partitions: a month of a busy tenant is millions of
-- events, and its summary by category, tier and model must read every line
-- item of every event (jsonb). No index makes that fast: an index can find
-- the month, not aggregate it. Partitioning usage_events by month would only
-- replace the index range scan with a partition scan, at the price of
-- rewriting a table with two unique constraints that do not contain the
-- partition key. So the summary reads a rollup instead: one row per
-- (tenant, local day, account, category, meter, model, tier) with the
-- credits, events and line items of that group (usage_rollup), and the same
-- without the account for tenant-wide summaries (usage_rollup_tenant).
--
-- What the rollups hold, exactly: the sum over every ALLOCATED usage event
-- (allocated = true: the ledger job has spread it over grants). Triggers
-- keep it so in the same transaction as any change of usage_events: an
-- event enters when it is inserted allocated or when `allocated` turns true
-- (the ledger job's UPDATE, under the tenant's ledger lock, so one tenant's
-- rows are never upserted concurrently), and leaves if it is deleted or
-- un-allocated. Nothing is added to the commit path: the committer inserts
-- events unallocated, which the insert trigger skips. A report reads, in one
-- statement (one snapshot), the rollup for whole days plus the events not
-- yet allocated and the events of partial days at the edges of its range,
-- so it is always exact, never stale.

-- The zone report days are computed in, per tenant: its time_zone when
-- PostgreSQL knows it (almost always: both use the IANA database), else
-- UTC. Fixed once chosen, since rollup rows are filed by local day.
CREATE TABLE usage_report_zones (
    tenant_id text PRIMARY KEY REFERENCES tenants (tenant_id),
    zone      text NOT NULL
);

CREATE FUNCTION usage_report_zone(p_tenant text) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    z text;
BEGIN
    SELECT zone INTO z FROM usage_report_zones WHERE tenant_id = p_tenant;
    IF FOUND THEN
        RETURN z;
    END IF;
    SELECT CASE WHEN EXISTS (SELECT 1 FROM pg_timezone_names n WHERE n.name = t.time_zone)
                THEN t.time_zone ELSE 'UTC' END
      INTO z FROM tenants t WHERE t.tenant_id = p_tenant;
    IF z IS NULL THEN
        RETURN 'UTC';
    END IF;
    INSERT INTO usage_report_zones (tenant_id, zone) VALUES (p_tenant, z) ON CONFLICT (tenant_id) DO NOTHING;
    SELECT zone INTO z FROM usage_report_zones WHERE tenant_id = p_tenant;
    RETURN z;
END
$$;

-- The usage category of a meter, for line items whose event has no
-- `category` label. Part of the schema: changing it means rebuilding the
-- rollups (DELETE FROM usage_rollup and usage_rollup_tenant, then the
-- backfill below).
CREATE FUNCTION usage_category(meter text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN meter = 'tokens' OR meter LIKE '%\_tokens' THEN 'ai_usage'
        WHEN meter LIKE 'image\_%' OR meter = 'app_calls' THEN 'tool_calls'
        WHEN meter LIKE 'runtime\_%' THEN 'runtime'
        WHEN meter = 'tasks' THEN 'tasks'
        WHEN meter = 'voice_minutes' THEN 'voice'
        WHEN meter = 'meeting_minutes' THEN 'meetings'
        ELSE meter
    END
$$;

-- How one event's amount is shared among report groups: one share per line
-- item (rated usage), or one share for the whole amount (unrated usage).
--   category: the event's `category` label if set, else usage_category(meter)
--             ('' for unrated usage without the label);
--   meter, model, tier: the line's ('' for unrated usage; model is then the
--             event's `model` label, if any);
--   credits:  the line's subtotal truncated to the micro-credit; the event's
--             rounding remainder (amount - sum of truncated subtotals, under
--             one micro-credit per line) goes to its primary line, so the
--             shares of an event always sum to its amount exactly;
--   is_primary: the line with the largest subtotal (the first of equals); an
--             event counts once, in the group of its primary share.
CREATE FUNCTION usage_shares(line_items jsonb, labels jsonb, amount numeric)
RETURNS TABLE (category text, meter text, model text, tier text, credits numeric, is_primary boolean)
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT COALESCE(NULLIF(labels ->> 'category', ''), usage_category(COALESCE(l.value ->> 'meter', ''))),
           COALESCE(l.value ->> 'meter', ''),
           COALESCE(l.value ->> 'model', ''),
           COALESCE(l.value ->> 'tier', ''),
           trunc(COALESCE((l.value ->> 'subtotal')::numeric, 0), 6)
               + CASE WHEN l.ord = p.primary_ord THEN amount - p.truncated ELSE 0 END,
           l.ord = p.primary_ord
    FROM (SELECT sum(trunc(COALESCE((x.value ->> 'subtotal')::numeric, 0), 6)) AS truncated,
                 -(max(ARRAY[COALESCE((x.value ->> 'subtotal')::numeric, 0), -x.ord]))[2] AS primary_ord
          FROM jsonb_array_elements(CASE WHEN jsonb_typeof(line_items) = 'array' THEN line_items ELSE '[]' END)
               WITH ORDINALITY AS x(value, ord)) AS p,
         jsonb_array_elements(CASE WHEN jsonb_typeof(line_items) = 'array' THEN line_items ELSE '[]' END)
               WITH ORDINALITY AS l(value, ord)
    UNION ALL
    SELECT COALESCE(NULLIF(labels ->> 'category', ''), ''), '', COALESCE(labels ->> 'model', ''), '', amount, true
    WHERE line_items IS NULL OR jsonb_typeof(line_items) <> 'array' OR jsonb_array_length(line_items) = 0
$$;

CREATE TABLE usage_rollup (
    tenant_id  text NOT NULL,
    -- The local date of recorded_at in usage_report_zone(tenant_id).
    day        date NOT NULL,
    -- The event's subject (the account that used the credits, not the pools
    -- it drew from).
    account_id text NOT NULL,
    category   text NOT NULL,
    meter      text NOT NULL,
    model      text NOT NULL,
    tier       text NOT NULL,
    -- Sum of the shares' credits.
    credits    numeric(24, 6) NOT NULL,
    -- Events whose primary share is in this group.
    events     bigint NOT NULL,
    -- Shares (line items; an unrated event is one).
    lines      bigint NOT NULL,
    PRIMARY KEY (tenant_id, day, account_id, category, meter, model, tier)
);

-- The same without the account: what tenant-wide summaries (no account
-- filter, no account dimension) read, a few rows per day.
CREATE TABLE usage_rollup_tenant (
    tenant_id  text NOT NULL,
    day        date NOT NULL,
    category   text NOT NULL,
    meter      text NOT NULL,
    model      text NOT NULL,
    tier       text NOT NULL,
    credits    numeric(24, 6) NOT NULL,
    events     bigint NOT NULL,
    lines      bigint NOT NULL,
    PRIMARY KEY (tenant_id, day, category, meter, model, tier)
);

-- The statement that adds (direction 1) or removes (direction -1) the
-- allocated events of `source` (a relation name or a parenthesized query)
-- to or from both rollups. It aggregates as it reads, so its memory follows
-- the number of groups, not of events. Keys are upserted in key order, the
-- per-account rollup first, so concurrent callers cannot deadlock.
CREATE FUNCTION usage_rollup_statement(source text, direction integer) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT format($f$
        WITH zones AS MATERIALIZED (
            SELECT t.tenant_id, usage_report_zone(t.tenant_id) AS zone
            FROM (SELECT DISTINCT c.tenant_id FROM %1$s AS c WHERE c.allocated) AS t
        ), groups AS MATERIALIZED (
            SELECT e.tenant_id, (e.recorded_at AT TIME ZONE z.zone)::date AS day, e.account_id,
                   s.category, s.meter, s.model, s.tier,
                   %2$s * sum(s.credits) AS credits, %2$s * count(*) FILTER (WHERE s.is_primary) AS events,
                   %2$s * count(*) AS lines
            FROM %1$s AS e
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
                lines = r.lines + excluded.lines
    $f$, source, direction)
$$;

-- The transition tables of a statement, old rows out, new rows in. The
-- committer's inserts are unallocated: one cheap EXISTS, nothing else.
-- (The IFs are nested: a trigger may only mention the transition tables it
-- has, and an IF's condition is planned as a whole.)
CREATE FUNCTION usage_rollup_sync() RETURNS trigger
LANGUAGE plpgsql SET jit = off AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        IF EXISTS (SELECT 1 FROM old_rows WHERE allocated) THEN
            EXECUTE usage_rollup_statement('old_rows', -1);
        END IF;
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        IF EXISTS (SELECT 1 FROM new_rows WHERE allocated) THEN
            EXECUTE usage_rollup_statement('new_rows', 1);
        END IF;
    END IF;
    RETURN NULL;
END
$$;

CREATE FUNCTION usage_rollup_truncate() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    TRUNCATE usage_rollup, usage_rollup_tenant;
    RETURN NULL;
END
$$;

-- Creating the triggers locks usage_events against writes until this
-- migration commits, so the backfill below and the triggers see every event
-- exactly once.
CREATE TRIGGER usage_rollup_insert AFTER INSERT ON usage_events
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION usage_rollup_sync();
CREATE TRIGGER usage_rollup_update AFTER UPDATE ON usage_events
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION usage_rollup_sync();
CREATE TRIGGER usage_rollup_delete AFTER DELETE ON usage_events
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION usage_rollup_sync();
CREATE TRIGGER usage_rollup_truncate AFTER TRUNCATE ON usage_events
    FOR EACH STATEMENT EXECUTE FUNCTION usage_rollup_truncate();

-- Backfill from the events already allocated (about a minute and a half
-- per 10 million events).
DO $$
BEGIN
    EXECUTE usage_rollup_statement('usage_events', 1);
END
$$;

-- Events of a tenant by time: the edges of a summary's range, and
-- ListUsageEvents pages (newest first, keyset on recorded_at, event_id).
CREATE INDEX usage_events_tenant_time ON usage_events (tenant_id, recorded_at, event_id);

-- GetLedger pages by entry_id, per account or per grant. These replace the
-- indexes on (tenant_id, account_id) and (grant_id), which they extend.
CREATE INDEX ledger_account_entry ON ledger (tenant_id, account_id, entry_id);
DROP INDEX ledger_account;
CREATE INDEX ledger_grant_entry ON ledger (grant_id, entry_id) WHERE grant_id IS NOT NULL;
DROP INDEX ledger_grant;
