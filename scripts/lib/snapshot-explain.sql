-- EXPLAIN (ANALYZE, BUFFERS) of the statements PgStore::snapshot runs for
-- one tenant, in its order and settings (REPEATABLE READ; hash joins for
-- the cap-usage pairs). psql -v tenant=<id> -f snapshot-explain.sql
\timing on
\pset pager off
BEGIN ISOLATION LEVEL REPEATABLE READ;
\echo '== accounts'
EXPLAIN (ANALYZE, BUFFERS) SELECT account_id, parent_id, kind, display_name, pool_access, cap, suspended, depth, created_at,
  period_kind, period_anchor, period_time_zone, trial_end, tier, period_start, period_end
FROM accounts WHERE tenant_id = :'tenant' ORDER BY depth, account_id;
\echo '== own alert policies'
EXPLAIN (ANALYZE, BUFFERS) SELECT account_id, alert_percents, alert_amounts, alert_rearm_on_topup FROM accounts
WHERE tenant_id = :'tenant' AND alert_percents IS NOT NULL AND alert_amounts IS NOT NULL AND alert_rearm_on_topup IS NOT NULL;
\echo '== ledger balances'
EXPLAIN (ANALYZE, BUFFERS) SELECT account_id, SUM(amount) FROM ledger WHERE tenant_id = :'tenant' GROUP BY account_id;
\echo '== unallocated draws'
EXPLAIN (ANALYZE, BUFFERS) SELECT d.account, SUM(d.amount) FROM usage_events e,
  jsonb_to_recordset(e.draws) AS d(account text, amount numeric)
WHERE e.tenant_id = :'tenant' AND NOT e.allocated GROUP BY d.account;
-- The (descendant, ancestor, since) pairs creditd computes in Rust.
WITH RECURSIVE up AS (
  SELECT account_id AS descendant, account_id AS ancestor, parent_id, period_start AS since
  FROM accounts WHERE tenant_id = :'tenant'
  UNION ALL
  SELECT u.descendant, a.account_id, a.parent_id, a.period_start
  FROM up u JOIN accounts a ON a.tenant_id = :'tenant' AND a.account_id = u.parent_id)
SELECT array_agg(descendant) AS d, array_agg(ancestor) AS a, array_agg(since) AS s FROM up \gset
SET LOCAL enable_nestloop = off;
SET LOCAL enable_mergejoin = off;
PREPARE cap(text, text[], text[], timestamptz[]) AS
SELECT p.ancestor, SUM(e.amount)
FROM UNNEST($2, $3, $4) AS p(descendant, ancestor, since)
JOIN usage_events e ON e.tenant_id = $1 AND e.account_id = p.descendant
  AND e.recorded_at >= COALESCE(p.since, '-infinity'::timestamptz)
GROUP BY p.ancestor;
\echo '== cap usage (pairs from the accounts)'
EXPLAIN (ANALYZE, BUFFERS) EXECUTE cap(:'tenant', :'d', :'a', :'s');
\echo '== unapplied ledger rows'
EXPLAIN (ANALYZE, BUFFERS) SELECT entry_id FROM ledger WHERE tenant_id = :'tenant' AND NOT applied;
\echo '== accounts with allowances'
EXPLAIN (ANALYZE, BUFFERS) SELECT DISTINCT account_id FROM allowances WHERE tenant_id = :'tenant' AND ended_at IS NULL;
\echo '== period draws'
EXPLAIN (ANALYZE, BUFFERS) SELECT d.account, SUM(d.amount) FROM usage_events e
CROSS JOIN jsonb_to_recordset(e.draws) AS d(account text, amount numeric)
JOIN accounts a ON a.tenant_id = e.tenant_id AND a.account_id = d.account
WHERE e.tenant_id = :'tenant' AND e.recorded_at >= COALESCE(a.period_start, '-infinity'::timestamptz)
GROUP BY d.account;
\echo '== fired alerts'
EXPLAIN (ANALYZE, BUFFERS) SELECT al.account_id, al.kind, al.threshold FROM alerts al
JOIN accounts a ON a.tenant_id = al.tenant_id AND a.account_id = al.account_id
WHERE al.tenant_id = :'tenant' AND al.fired_at >= COALESCE(a.period_start, '-infinity'::timestamptz);
COMMIT;
