//! PostgreSQL side of reports: usage summaries (the daily rollup plus the
//! events it does not hold yet), usage event pages, grant and ledger pages.
//!
//! The rollup, its triggers and the share rules (`usage_shares`,
//! `usage_category`) live in `migrations/20261121000005_reports.sql`; every
//! query here that splits events into shares calls those same SQL
//! functions, so a summary and an event listing can never disagree.

use chrono::{DateTime, NaiveDate, Utc};
use rust_decimal::Decimal;
use sqlx::{Postgres, QueryBuilder, Row};
use uuid::Uuid;

use super::pg::{GRANT_SELECT, GrantRow, PgError, PgResult, PgStore, grant_row};

/// A dimension usage is grouped by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dimension {
    Account,
    Model,
    Tier,
    Category,
    Meter,
    Day,
    Month,
}

impl Dimension {
    /// Its key, as a text expression over the `parts` of a summary.
    fn sql(self) -> &'static str {
        match self {
            Dimension::Account => "account_id",
            Dimension::Model => "model",
            Dimension::Tier => "tier",
            Dimension::Category => "category",
            Dimension::Meter => "meter",
            Dimension::Day => "to_char(day, 'YYYY-MM-DD')",
            Dimension::Month => "to_char(day, 'YYYY-MM')",
        }
    }
}

/// How a range [from, to) splits into local days. Whole days come from the
/// rollup (plus their events not yet allocated), the partial first day
/// from the events. The partial last day [days_to, to) comes from the
/// rollup too when no allocated event lies in [to, its end) (the usual case
/// of a range ending now), else from the events.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DaySplit {
    /// Whole days [first_day, end_day) (none when equal).
    pub first_day: NaiveDate,
    pub end_day: NaiveDate,
    /// Local midnight of first_day and of end_day: [from, days_from) is the
    /// partial first day.
    pub days_from: DateTime<Utc>,
    pub days_to: DateTime<Utc>,
    /// The partial last day, if any: its date (end_day) and its end.
    pub tail: Option<(NaiveDate, DateTime<Utc>)>,
}

/// What to summarize.
#[derive(Clone, Debug)]
pub struct UsageQuery<'a> {
    pub tenant: &'a str,
    pub zone: &'a str,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub split: DaySplit,
    /// `None`: every account of the tenant.
    pub accounts: Option<&'a [String]>,
    pub dims: &'a [Dimension],
    /// At most this many groups are returned.
    pub limit: i64,
}

/// One group of a summary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsageGroup {
    pub keys: Vec<String>,
    pub credits: Decimal,
    pub events: i64,
    pub lines: i64,
}

/// One share of an event (see `usage_shares`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
pub struct ShareRow {
    pub category: String,
    pub meter: String,
    pub model: String,
    pub tier: String,
    /// Decimal text.
    pub credits: String,
    pub primary: bool,
}

/// A usage event as reports show it.
#[derive(Clone, Debug)]
pub struct ReportEvent {
    pub event_id: Uuid,
    pub account_id: String,
    pub kind: String,
    pub reservation_id: Option<Uuid>,
    pub idempotency_key: String,
    pub amount: Decimal,
    pub overdraft: Decimal,
    pub draws: serde_json::Value,
    pub labels: serde_json::Value,
    pub price_version: Option<String>,
    pub line_items: Option<serde_json::Value>,
    pub shares: Vec<ShareRow>,
    pub recorded_at: DateTime<Utc>,
    pub allocated: bool,
}

/// Filters of an event page.
#[derive(Clone, Debug, Default)]
pub struct EventFilter<'a> {
    pub accounts: Option<&'a [String]>,
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
    pub model: Option<&'a str>,
    pub category: Option<&'a str>,
    /// Keyset: only events strictly before (recorded_at, event_id).
    pub before: Option<(DateTime<Utc>, Uuid)>,
}

/// One month of a history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MonthSpan {
    /// "2026-11".
    pub month: String,
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
}

/// Sums for a credit bar (see `GrantTotals` in reports.proto).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GrantSums {
    pub amount: Decimal,
    pub used: Decimal,
    pub forfeited: Decimal,
    pub remaining: Decimal,
    pub pending: Decimal,
    pub overdraft: Decimal,
    pub unallocated: Decimal,
    pub ledger: Decimal,
    pub accounts: i64,
}

/// A ledger row.
#[derive(Clone, Debug)]
pub struct LedgerRow {
    pub entry_id: i64,
    pub account_id: String,
    pub kind: String,
    pub amount: Decimal,
    pub grant_id: Option<Uuid>,
    pub event_id: Option<Uuid>,
    pub adjustment_id: Option<Uuid>,
    pub created_at: DateTime<Utc>,
}

/// Whose ledger rows.
#[derive(Clone, Copy, Debug)]
pub enum LedgerOf<'a> {
    Account(&'a str),
    Grant(Uuid),
}

fn push_accounts(q: &mut QueryBuilder<Postgres>, column: &str, accounts: Option<&[String]>) {
    if let Some(accounts) = accounts {
        q.push(format!(" AND {column} = ANY(")).push_bind(accounts.to_vec()).push(")");
    }
}

/// A `UNION ALL` branch of a summary's parts: the shares of the events of
/// `range`, with `condition` (SQL over `e`).
fn push_event_shares(
    q: &mut QueryBuilder<Postgres>,
    query: &UsageQuery<'_>,
    range: (DateTime<Utc>, DateTime<Utc>),
    condition: &str,
) {
    q.push(
        " UNION ALL SELECT e.account_id, s.category, s.meter, s.model, s.tier, \
           (e.recorded_at AT TIME ZONE ",
    )
    .push_bind(query.zone.to_string())
    .push(
        ")::date, s.credits, CASE WHEN s.is_primary THEN 1 ELSE 0 END, 1 \
         FROM usage_events e CROSS JOIN LATERAL usage_shares(e.line_items, e.labels, e.amount) s \
         WHERE e.tenant_id = ",
    )
    .push_bind(query.tenant.to_string())
    .push(" AND e.recorded_at >= ")
    .push_bind(range.0)
    .push(" AND e.recorded_at < ")
    .push_bind(range.1)
    .push(condition);
    push_accounts(q, "e.account_id", query.accounts);
}

/// A branch of a summary's parts: the rollup rows of the tenant (and
/// accounts); the caller adds the days. A summary that neither filters nor
/// groups by account reads the rollup without accounts.
fn push_rollup(q: &mut QueryBuilder<Postgres>, query: &UsageQuery<'_>) {
    if query.accounts.is_none() && !query.dims.contains(&Dimension::Account) {
        q.push(
            "SELECT '', r.category, r.meter, r.model, r.tier, r.day, r.credits, r.events, r.lines \
             FROM usage_rollup_tenant r WHERE r.tenant_id = ",
        )
        .push_bind(query.tenant.to_string());
        return;
    }
    q.push(
        "SELECT r.account_id, r.category, r.meter, r.model, r.tier, r.day, r.credits, r.events, r.lines \
         FROM usage_rollup r WHERE r.tenant_id = ",
    )
    .push_bind(query.tenant.to_string());
    push_accounts(q, "r.account_id", query.accounts);
}

impl PgStore {
    /// The zone report days use for the tenant (its time_zone, or UTC when
    /// PostgreSQL does not know it).
    pub async fn report_zone(&self, tenant: &str) -> PgResult<String> {
        Ok(sqlx::query_scalar("SELECT usage_report_zone($1)").bind(tenant).fetch_one(self.pool()).await?)
    }

    /// The account and its descendants; empty when the account does not
    /// exist in the tenant.
    pub async fn subtree(&self, tenant: &str, account: &str) -> PgResult<Vec<String>> {
        Ok(sqlx::query_scalar(
            "WITH RECURSIVE sub(account_id) AS ( \
               SELECT account_id FROM accounts WHERE tenant_id = $1 AND account_id = $2 \
               UNION ALL \
               SELECT a.account_id FROM accounts a JOIN sub ON a.tenant_id = $1 AND a.parent_id = sub.account_id) \
             SELECT account_id FROM sub ORDER BY account_id",
        )
        .bind(tenant)
        .bind(account)
        .fetch_all(self.pool())
        .await?)
    }

    /// Splits [from, to) into local days (see [`DaySplit`]).
    pub async fn day_split(&self, zone: &str, from: DateTime<Utc>, to: DateTime<Utc>) -> PgResult<DaySplit> {
        type Row = (NaiveDate, NaiveDate, DateTime<Utc>, DateTime<Utc>, DateTime<Utc>);
        let (first_day, end_day, days_from, days_to, tail_end): Row = sqlx::query_as(
            "SELECT d0, d1, d0::timestamp AT TIME ZONE $1, d1::timestamp AT TIME ZONE $1, \
               (d1 + 1)::timestamp AT TIME ZONE $1 FROM ( \
               SELECT CASE WHEN (($2 AT TIME ZONE $1)::date::timestamp AT TIME ZONE $1) = $2 \
                           THEN ($2 AT TIME ZONE $1)::date ELSE ($2 AT TIME ZONE $1)::date + 1 END AS d0, \
                      ($3 AT TIME ZONE $1)::date AS d1) x",
        )
        .bind(zone)
        .bind(from)
        .bind(to)
        .fetch_one(self.pool())
        .await?;
        let days = first_day <= end_day && from <= days_from && days_from <= days_to && days_to <= to && to < tail_end;
        Ok(if days {
            DaySplit { first_day, end_day, days_from, days_to, tail: (to > days_to).then_some((end_day, tail_end)) }
        } else {
            // Within one day that starts before `from`: the events only.
            DaySplit { first_day, end_day: first_day, days_from: to, days_to: to, tail: None }
        })
    }

    /// The start of the month containing `at`, in `zone`.
    pub async fn month_start(&self, zone: &str, at: DateTime<Utc>) -> PgResult<DateTime<Utc>> {
        Ok(sqlx::query_scalar("SELECT date_trunc('month', $2 AT TIME ZONE $1) AT TIME ZONE $1")
            .bind(zone)
            .bind(at)
            .fetch_one(self.pool())
            .await?)
    }

    /// The `months` months ending with the one containing `now`, oldest
    /// first.
    pub async fn month_spans(&self, zone: &str, now: DateTime<Utc>, months: i32) -> PgResult<Vec<MonthSpan>> {
        let rows: Vec<(String, DateTime<Utc>, DateTime<Utc>)> = sqlx::query_as(
            "SELECT to_char(m, 'YYYY-MM'), m AT TIME ZONE $1, (m + interval '1 month') AT TIME ZONE $1 \
             FROM generate_series(date_trunc('month', $2 AT TIME ZONE $1) - ($3 - 1) * interval '1 month', \
                                  date_trunc('month', $2 AT TIME ZONE $1), interval '1 month') AS m \
             ORDER BY m",
        )
        .bind(zone)
        .bind(now)
        .bind(months)
        .fetch_all(self.pool())
        .await?;
        Ok(rows.into_iter().map(|(month, start, end)| MonthSpan { month, start, end }).collect())
    }

    /// Usage grouped by `dims`, ordered by key, at most `limit` groups. One
    /// statement, so one snapshot: rollup rows for the whole days, events
    /// for the partial days and for the whole days' events not yet
    /// allocated (which the rollup does not hold yet).
    pub async fn summarize_usage(&self, query: &UsageQuery<'_>) -> PgResult<Vec<UsageGroup>> {
        let keys: Vec<&str> = query.dims.iter().map(|d| d.sql()).collect();
        let split = &query.split;
        let mut q = QueryBuilder::<Postgres>::new("WITH tail (clean) AS (SELECT ");
        // Whether the partial last day may come from the rollup: no
        // allocated event of it lies after `to`.
        match split.tail {
            Some((_, tail_end)) => {
                q.push("NOT EXISTS (SELECT 1 FROM usage_events e WHERE e.tenant_id = ")
                    .push_bind(query.tenant.to_string())
                    .push(" AND e.recorded_at >= ")
                    .push_bind(query.to)
                    .push(" AND e.recorded_at < ")
                    .push_bind(tail_end)
                    .push(" AND e.allocated");
                push_accounts(&mut q, "e.account_id", query.accounts);
                q.push(")");
            }
            None => {
                q.push("false");
            }
        }
        q.push("), parts (account_id, category, meter, model, tier, day, credits, events, lines) AS (");
        push_rollup(&mut q, query);
        q.push(" AND r.day >= ").push_bind(split.first_day).push(" AND r.day < ").push_bind(split.end_day);
        push_event_shares(&mut q, query, (query.from, split.days_from), "");
        push_event_shares(&mut q, query, (split.days_from, split.days_to), " AND NOT e.allocated");
        if let Some((tail_day, _)) = split.tail {
            q.push(" UNION ALL ");
            push_rollup(&mut q, query);
            q.push(" AND r.day = ").push_bind(tail_day).push(" AND (SELECT clean FROM tail)");
            push_event_shares(
                &mut q,
                query,
                (split.days_to, query.to),
                " AND NOT e.allocated AND (SELECT clean FROM tail)",
            );
            push_event_shares(&mut q, query, (split.days_to, query.to), " AND NOT (SELECT clean FROM tail)");
        }
        q.push(") SELECT ");
        for key in &keys {
            q.push(format!("{key}, "));
        }
        q.push(
            "COALESCE(sum(credits), 0), COALESCE(sum(events), 0)::bigint, COALESCE(sum(lines), 0)::bigint FROM parts",
        );
        if !keys.is_empty() {
            let list = keys.join(", ");
            q.push(format!(" GROUP BY {list} HAVING sum(lines) <> 0 ORDER BY {list}"));
        } else {
            q.push(" HAVING sum(lines) <> 0");
        }
        q.push(" LIMIT ").push_bind(query.limit);
        // The event branches are estimated at up to millions of rows, which
        // would have PostgreSQL spend hundreds of milliseconds compiling the
        // plan (JIT) to run branches that read little or nothing.
        let mut tx = self.pool().begin().await?;
        sqlx::query("SET LOCAL jit = off").execute(&mut *tx).await?;
        let rows = q.build().fetch_all(&mut *tx).await?;
        tx.commit().await?;
        let n = keys.len();
        Ok(rows
            .into_iter()
            .map(|r| UsageGroup {
                keys: (0..n).map(|i| r.get::<String, _>(i)).collect(),
                credits: r.get(n),
                events: r.get(n + 1),
                lines: r.get(n + 2),
            })
            .collect())
    }

    /// A page of usage events, newest first.
    pub async fn usage_events_page(
        &self,
        tenant: &str,
        filter: &EventFilter<'_>,
        limit: i64,
    ) -> PgResult<Vec<ReportEvent>> {
        let mut q = QueryBuilder::<Postgres>::new(
            "SELECT e.event_id, e.account_id, e.kind, e.reservation_id, e.idempotency_key, e.amount, e.overdraft, \
               e.draws, e.labels, e.price_version, e.line_items, e.recorded_at, e.allocated, \
               (SELECT COALESCE(jsonb_agg(jsonb_build_object('category', s.category, 'meter', s.meter, \
                   'model', s.model, 'tier', s.tier, 'credits', s.credits::text, 'primary', s.is_primary)), '[]') \
                FROM usage_shares(e.line_items, e.labels, e.amount) s) \
             FROM usage_events e WHERE e.tenant_id = ",
        );
        q.push_bind(tenant.to_string());
        push_accounts(&mut q, "e.account_id", filter.accounts);
        if let Some(from) = filter.from {
            q.push(" AND e.recorded_at >= ").push_bind(from);
        }
        if let Some(to) = filter.to {
            q.push(" AND e.recorded_at < ").push_bind(to);
        }
        if let Some(model) = filter.model {
            q.push(" AND (e.line_items @> jsonb_build_array(jsonb_build_object('model', ")
                .push_bind(model.to_string())
                .push("::text)) OR (e.line_items IS NULL AND e.labels ->> 'model' = ")
                .push_bind(model.to_string())
                .push("))");
        }
        if let Some(category) = filter.category {
            q.push(" AND EXISTS (SELECT 1 FROM usage_shares(e.line_items, e.labels, e.amount) s WHERE s.category = ")
                .push_bind(category.to_string())
                .push(")");
        }
        if let Some((at, id)) = filter.before {
            q.push(" AND (e.recorded_at, e.event_id) < (").push_bind(at).push(", ").push_bind(id).push(")");
        }
        q.push(" ORDER BY e.recorded_at DESC, e.event_id DESC LIMIT ").push_bind(limit);
        let rows = q.build().fetch_all(self.pool()).await?;
        rows.into_iter()
            .map(|r| {
                let shares: serde_json::Value = r.get(13);
                let event_id: Uuid = r.get(0);
                Ok(ReportEvent {
                    event_id,
                    account_id: r.get(1),
                    kind: r.get(2),
                    reservation_id: r.get(3),
                    idempotency_key: r.get(4),
                    amount: r.get(5),
                    overdraft: r.get(6),
                    draws: r.get(7),
                    labels: r.get(8),
                    price_version: r.get(9),
                    line_items: r.get(10),
                    recorded_at: r.get(11),
                    allocated: r.get(12),
                    shares: serde_json::from_value(shares)
                        .map_err(|e| PgError::Amount(format!("shares of event {event_id}: {e}")))?,
                })
            })
            .collect()
    }

    /// Grants of the accounts (`None`: the whole tenant) by account, then
    /// in spend order, and the totals over all of them, in one snapshot.
    pub async fn grants_report(
        &self,
        tenant: &str,
        accounts: Option<&[String]>,
        include_inactive: bool,
        limit: i64,
        offset: i64,
    ) -> PgResult<(Vec<GrantRow>, GrantSums)> {
        let mut tx = self.pool().begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY").execute(&mut *tx).await?;
        sqlx::query("SET LOCAL jit = off").execute(&mut *tx).await?;
        let live = if include_inactive { "" } else { " AND g.voided_at IS NULL AND g.expired_at IS NULL" };

        let mut q = QueryBuilder::<Postgres>::new(format!("{GRANT_SELECT} WHERE g.tenant_id = "));
        q.push_bind(tenant.to_string());
        push_accounts(&mut q, "g.account_id", accounts);
        q.push(live)
            .push(" ORDER BY g.account_id, g.priority, g.expires_at ASC NULLS LAST, g.created_at, g.grant_id LIMIT ")
            .push_bind(limit)
            .push(" OFFSET ")
            .push_bind(offset);
        let grants = q.build().fetch_all(&mut *tx).await?.into_iter().map(grant_row).collect::<PgResult<Vec<_>>>()?;

        let mut sums = GrantSums::default();
        let mut q = QueryBuilder::<Postgres>::new(
            "SELECT COALESCE(sum(g.amount), 0), \
               COALESCE(sum(g.amount) FILTER (WHERE g.credited_at IS NULL AND g.voided_at IS NULL), 0) \
             FROM grants g WHERE g.tenant_id = ",
        );
        q.push_bind(tenant.to_string());
        push_accounts(&mut q, "g.account_id", accounts);
        q.push(live);
        let row = q.build().fetch_one(&mut *tx).await?;
        sums.amount = row.get(0);
        sums.pending = row.get(1);

        let mut q = QueryBuilder::<Postgres>::new(
            "SELECT COALESCE(-sum(l.amount) FILTER (WHERE l.kind IN ('usage', 'cover')), 0), \
               COALESCE(-sum(l.amount) FILTER (WHERE l.kind IN ('void', 'expiry')), 0), \
               COALESCE(sum(l.amount), 0) \
             FROM ledger l JOIN grants g ON g.grant_id = l.grant_id WHERE g.tenant_id = ",
        );
        q.push_bind(tenant.to_string());
        push_accounts(&mut q, "g.account_id", accounts);
        q.push(live);
        let row = q.build().fetch_one(&mut *tx).await?;
        sums.used = row.get(0);
        sums.forfeited = row.get(1);
        sums.remaining = row.get(2);

        let mut q = QueryBuilder::<Postgres>::new(
            "SELECT COALESCE(sum(l.amount), 0), COALESCE(-sum(l.amount) FILTER (WHERE l.grant_id IS NULL), 0) \
             FROM ledger l WHERE l.tenant_id = ",
        );
        q.push_bind(tenant.to_string());
        push_accounts(&mut q, "l.account_id", accounts);
        let row = q.build().fetch_one(&mut *tx).await?;
        sums.ledger = row.get(0);
        sums.overdraft = row.get(1);

        let mut q = QueryBuilder::<Postgres>::new(
            "SELECT COALESCE(sum(d.amount), 0) FROM usage_events e, \
               jsonb_to_recordset(e.draws) AS d(account text, amount numeric) \
             WHERE e.tenant_id = ",
        );
        q.push_bind(tenant.to_string()).push(" AND NOT e.allocated");
        push_accounts(&mut q, "d.account", accounts);
        sums.unallocated = q.build().fetch_one(&mut *tx).await?.get(0);

        sums.accounts = match accounts {
            Some(list) => list.len() as i64,
            None => {
                sqlx::query_scalar("SELECT count(*) FROM accounts WHERE tenant_id = $1")
                    .bind(tenant)
                    .fetch_one(&mut *tx)
                    .await?
            }
        };
        tx.commit().await?;
        Ok((grants, sums))
    }

    /// Whether the grant exists in the tenant.
    pub async fn grant_exists(&self, tenant: &str, grant_id: Uuid) -> PgResult<bool> {
        Ok(sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM grants WHERE tenant_id = $1 AND grant_id = $2)")
            .bind(tenant)
            .bind(grant_id)
            .fetch_one(self.pool())
            .await?)
    }

    /// Ledger rows of an account or a grant, newest first, with entry_id
    /// below `before` (if set).
    pub async fn ledger_page(
        &self,
        tenant: &str,
        of: LedgerOf<'_>,
        before: Option<i64>,
        limit: i64,
    ) -> PgResult<Vec<LedgerRow>> {
        let mut q = QueryBuilder::<Postgres>::new(
            "SELECT entry_id, account_id, kind, amount, grant_id, event_id, adjustment_id, created_at \
             FROM ledger WHERE tenant_id = ",
        );
        q.push_bind(tenant.to_string());
        match of {
            LedgerOf::Account(account) => q.push(" AND account_id = ").push_bind(account.to_string()),
            LedgerOf::Grant(grant) => q.push(" AND grant_id = ").push_bind(grant),
        };
        if let Some(before) = before {
            q.push(" AND entry_id < ").push_bind(before);
        }
        q.push(" ORDER BY entry_id DESC LIMIT ").push_bind(limit);
        let rows = q.build().fetch_all(self.pool()).await?;
        Ok(rows
            .into_iter()
            .map(|r| LedgerRow {
                entry_id: r.get(0),
                account_id: r.get(1),
                kind: r.get(2),
                amount: r.get(3),
                grant_id: r.get(4),
                event_id: r.get(5),
                adjustment_id: r.get(6),
                created_at: r.get(7),
            })
            .collect())
    }
}
