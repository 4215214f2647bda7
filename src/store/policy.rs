//! PostgreSQL side of credit policies: period boundaries, recurring
//! allowances, negative adjustments, account change requests, drift checks.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::{AssertSqlSafe, Row};
use uuid::Uuid;

use super::pg::{
    AccountRow, GRANT_SELECT, PendingEntry, PgError, PgResult, PgStore, allocate_pending, credits, grant_row,
    insert_entry, lock_tenant_ledger,
};
use crate::domain::{Credits, grant::allocate, period::Period};

/// A stored recurring allowance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllowanceRow {
    pub allowance_id: Uuid,
    pub account_id: String,
    pub amount: Credits,
    pub category: String,
    pub priority: i32,
    /// "none" | "all" | "up_to".
    pub rollover: String,
    pub rollover_max: Option<Credits>,
    pub description: String,
    pub payload_hash: String,
    pub created_at: DateTime<Utc>,
    pub ended_at: Option<DateTime<Utc>>,
}

const ALLOWANCE_COLUMNS: &str = "allowance_id, account_id, amount, category, priority, rollover, rollover_max, \
     description, payload_hash, created_at, ended_at";

fn allowance_row(r: sqlx::postgres::PgRow) -> PgResult<AllowanceRow> {
    let max: Option<Decimal> = r.get(6);
    Ok(AllowanceRow {
        allowance_id: r.get(0),
        account_id: r.get(1),
        amount: credits(r.get(2))?,
        category: r.get(3),
        priority: r.get(4),
        rollover: r.get(5),
        rollover_max: max.map(credits).transpose()?,
        description: r.get(7),
        payload_hash: r.get(8),
        created_at: r.get(9),
        ended_at: r.get(10),
    })
}

/// What a period boundary did.
#[derive(Clone, Debug)]
pub struct Boundary {
    pub tenant_id: String,
    pub account_id: String,
    pub new_period: Period,
    /// Ledger rows to apply to Redis (expiries, new grants).
    pub entries: Vec<PendingEntry>,
    pub has_allowance: bool,
}

/// A stored account change request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChangeRow {
    pub change_id: Uuid,
    pub account_id: String,
    pub requested: serde_json::Value,
    pub note: String,
    pub status: String,
    pub payload_hash: String,
    pub requested_at: DateTime<Utc>,
    pub decided_at: Option<DateTime<Utc>>,
    pub decision_note: String,
}

const CHANGE_COLUMNS: &str =
    "change_id, account_id, requested, note, status, payload_hash, requested_at, decided_at, decision_note";

fn change_row(r: sqlx::postgres::PgRow) -> ChangeRow {
    ChangeRow {
        change_id: r.get(0),
        account_id: r.get(1),
        requested: r.get(2),
        note: r.get(3),
        status: r.get(4),
        payload_hash: r.get(5),
        requested_at: r.get(6),
        decided_at: r.get(7),
        decision_note: r.get(8),
    }
}

/// A negative adjustment to write.
#[derive(Clone, Copy)]
pub struct Debit<'a> {
    /// What to remove (> 0).
    pub amount: Credits,
    pub reason: &'a str,
    pub actor: &'a str,
    pub idem_key: &'a str,
    pub payload_hash: &'a str,
}

/// The outcome of a negative adjustment.
pub enum Adjusted {
    Done { adjustment_id: Uuid, entries: Vec<PendingEntry>, created: bool },
    KeyReused,
}

impl PgStore {
    // ---- periods ---------------------------------------------------------

    /// Sets an account's current period (creation, or a change of period).
    pub async fn set_account_period(&self, tenant: &str, account: &str, period: &Period) -> PgResult<()> {
        sqlx::query("UPDATE accounts SET period_start = $3, period_end = $4 WHERE tenant_id = $1 AND account_id = $2")
            .bind(tenant)
            .bind(account)
            .bind(period.start)
            .bind(period.end)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    /// Accounts whose current period ended by `now` (due boundaries), or
    /// whose last boundary has not reached Redis yet.
    pub async fn accounts_due(&self, now: DateTime<Utc>, limit: i64) -> PgResult<Vec<(String, String, bool)>> {
        Ok(sqlx::query_as(
            "(SELECT tenant_id, account_id, true FROM accounts WHERE period_end <= $1 ORDER BY period_end LIMIT $2) \
             UNION ALL \
             (SELECT tenant_id, account_id, false FROM accounts WHERE NOT hot_period_synced LIMIT $2)",
        )
        .bind(now)
        .bind(limit)
        .fetch_all(self.pool())
        .await?)
    }

    /// Processes the account's due boundary, if still due and not being
    /// processed by another replica: expires its allowance grants, rolls
    /// over per each allowance's rule, issues the new period's grants and
    /// advances the period. `next` computes the period starting at the
    /// boundary. Exactly once per boundary: the row lock and the advance
    /// happen in one transaction.
    pub async fn advance_period<F>(
        &self,
        tenant: &str,
        account: &str,
        now: DateTime<Utc>,
        next: F,
    ) -> PgResult<Option<Boundary>>
    where
        F: FnOnce(&AccountRow, DateTime<Utc>) -> Option<Period>,
    {
        let mut tx = self.pool().begin().await?;
        lock_tenant_ledger(&mut tx, tenant).await?;
        let row = sqlx::query(
            "SELECT account_id, parent_id, kind, display_name, pool_access, cap, suspended, depth, created_at, \
               period_kind, period_anchor, period_time_zone, trial_end, tier, period_start, period_end \
             FROM accounts WHERE tenant_id = $1 AND account_id = $2 AND period_end <= $3 FOR UPDATE SKIP LOCKED",
        )
        .bind(tenant)
        .bind(account)
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let acct = super::pg::account_row(row)?;
        let boundary = acct.period_end.ok_or_else(|| PgError::Amount("due account has no period end".into()))?;
        let Some(new_period) = next(&acct, boundary) else {
            return Err(PgError::Amount(format!("no period follows {boundary} for account {account}")));
        };
        allocate_pending(&mut tx, tenant).await?;

        // Every allowance: an ended one still has its last grant to expire.
        let allowances = sqlx::query(AssertSqlSafe(format!(
            "SELECT {ALLOWANCE_COLUMNS} FROM allowances WHERE tenant_id = $1 AND account_id = $2"
        )))
        .bind(tenant)
        .bind(account)
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .map(allowance_row)
        .collect::<PgResult<Vec<_>>>()?;

        let mut entries = Vec::new();
        let mut has_allowance = false;
        for a in &allowances {
            // What is left of this allowance's grants ending at the boundary.
            let expiring: Vec<(Uuid, Decimal, Option<DateTime<Utc>>)> = sqlx::query_as(
                "SELECT g.grant_id, COALESCE((SELECT SUM(l.amount) FROM ledger l WHERE l.grant_id = g.grant_id), 0), \
                   g.credited_at \
                 FROM grants g WHERE g.allowance_id = $1 AND g.expires_at <= $2 \
                   AND g.expired_at IS NULL AND g.voided_at IS NULL FOR UPDATE",
            )
            .bind(a.allowance_id)
            .bind(boundary)
            .fetch_all(&mut *tx)
            .await?;
            let mut left = Credits::ZERO;
            for (grant_id, remaining, credited_at) in expiring {
                let remaining = credits(remaining)?;
                sqlx::query("UPDATE grants SET expired_at = $2 WHERE grant_id = $1")
                    .bind(grant_id)
                    .bind(boundary)
                    .execute(&mut *tx)
                    .await?;
                if credited_at.is_some() && remaining > Credits::ZERO {
                    left = left.checked_add(remaining).unwrap_or(left);
                    let minus = Credits::ZERO.checked_sub(remaining).unwrap_or_default();
                    entries.push(insert_entry(&mut tx, tenant, account, grant_id, "expiry", minus).await?);
                }
            }
            if a.ended_at.is_some_and(|ended| ended <= boundary) || new_period.end.is_none() {
                continue;
            }
            has_allowance = true;
            let rollover = match a.rollover.as_str() {
                "all" => left,
                "up_to" => left.min(a.rollover_max.unwrap_or_default()),
                _ => Credits::ZERO,
            };
            let issue = [(rollover, format!("{} (rolled over)", a.description)), (a.amount, a.description.clone())];
            for (amount, description) in issue {
                if amount <= Credits::ZERO {
                    continue;
                }
                let grant_id = Uuid::now_v7();
                sqlx::query(
                    "INSERT INTO grants (grant_id, tenant_id, account_id, amount, category, priority, effective_at, \
                       expires_at, description, idempotency_key, payload_hash, credited_at, allowance_id) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, '', $7, $11)",
                )
                .bind(grant_id)
                .bind(tenant)
                .bind(account)
                .bind(amount.to_decimal())
                .bind(&a.category)
                .bind(a.priority)
                .bind(boundary)
                .bind(new_period.end)
                .bind(&description)
                .bind(format!("allowance:{}:{}", grant_id, boundary.timestamp()))
                .bind(a.allowance_id)
                .execute(&mut *tx)
                .await?;
                entries.push(insert_entry(&mut tx, tenant, account, grant_id, "grant", amount).await?);
            }
        }
        sqlx::query(
            "UPDATE accounts SET period_start = $3, period_end = $4, hot_period_synced = false \
             WHERE tenant_id = $1 AND account_id = $2",
        )
        .bind(tenant)
        .bind(account)
        .bind(new_period.start)
        .bind(new_period.end)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some(Boundary {
            tenant_id: tenant.to_string(),
            account_id: account.to_string(),
            new_period,
            entries,
            has_allowance,
        }))
    }

    /// Usage of the account and its descendants recorded since `since`.
    pub async fn subtree_usage_since(&self, tenant: &str, account: &str, since: DateTime<Utc>) -> PgResult<Credits> {
        let sum: Decimal = sqlx::query_scalar(
            "WITH RECURSIVE sub(account_id) AS ( \
               SELECT $2::text UNION ALL \
               SELECT a.account_id FROM accounts a JOIN sub ON a.tenant_id = $1 AND a.parent_id = sub.account_id) \
             SELECT COALESCE(SUM(e.amount), 0) FROM usage_events e \
             WHERE e.tenant_id = $1 AND e.account_id IN (SELECT account_id FROM sub) AND e.recorded_at >= $3",
        )
        .bind(tenant)
        .bind(account)
        .bind(since)
        .fetch_one(self.pool())
        .await?;
        credits(sum)
    }

    pub async fn mark_period_synced(&self, tenant: &str, account: &str) -> PgResult<()> {
        sqlx::query("UPDATE accounts SET hot_period_synced = true WHERE tenant_id = $1 AND account_id = $2")
            .bind(tenant)
            .bind(account)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    pub async fn has_live_allowance(&self, tenant: &str, account: &str) -> PgResult<bool> {
        Ok(sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM allowances WHERE tenant_id = $1 AND account_id = $2 AND ended_at IS NULL)",
        )
        .bind(tenant)
        .bind(account)
        .fetch_one(self.pool())
        .await?)
    }

    // ---- allowances ------------------------------------------------------

    /// Inserts an allowance and its first grant (for the current period,
    /// `period`), unless the idempotency key was used. Returns the stored
    /// allowance, the ledger row of the first grant, and whether it is new.
    pub async fn create_allowance(
        &self,
        tenant: &str,
        a: &AllowanceRow,
        idem_key: &str,
        period: &Period,
        now: DateTime<Utc>,
    ) -> PgResult<(AllowanceRow, Option<PendingEntry>, bool)> {
        let mut tx = self.pool().begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO allowances (allowance_id, tenant_id, account_id, amount, category, priority, rollover, \
               rollover_max, description, idempotency_key, payload_hash) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) ON CONFLICT (tenant_id, idempotency_key) DO NOTHING",
        )
        .bind(a.allowance_id)
        .bind(tenant)
        .bind(&a.account_id)
        .bind(a.amount.to_decimal())
        .bind(&a.category)
        .bind(a.priority)
        .bind(&a.rollover)
        .bind(a.rollover_max.map(Credits::to_decimal))
        .bind(&a.description)
        .bind(idem_key)
        .bind(&a.payload_hash)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        let mut pending = None;
        if inserted && period.end.is_some() {
            let grant_id = Uuid::now_v7();
            sqlx::query(
                "INSERT INTO grants (grant_id, tenant_id, account_id, amount, category, priority, effective_at, \
                   expires_at, description, idempotency_key, payload_hash, credited_at, allowance_id) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, '', $11, $12)",
            )
            .bind(grant_id)
            .bind(tenant)
            .bind(&a.account_id)
            .bind(a.amount.to_decimal())
            .bind(&a.category)
            .bind(a.priority)
            .bind(period.start.min(now))
            .bind(period.end)
            .bind(&a.description)
            .bind(format!("allowance:{grant_id}:first"))
            .bind(now)
            .bind(a.allowance_id)
            .execute(&mut *tx)
            .await?;
            pending = Some(insert_entry(&mut tx, tenant, &a.account_id, grant_id, "grant", a.amount).await?);
        }
        tx.commit().await?;
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {ALLOWANCE_COLUMNS} FROM allowances WHERE tenant_id = $1 AND idempotency_key = $2"
        )))
        .bind(tenant)
        .bind(idem_key)
        .fetch_one(self.pool())
        .await?;
        Ok((allowance_row(row)?, pending, inserted))
    }

    pub async fn allowances_of(&self, tenant: &str, account: &str) -> PgResult<Vec<AllowanceRow>> {
        sqlx::query(AssertSqlSafe(format!(
            "SELECT {ALLOWANCE_COLUMNS} FROM allowances WHERE tenant_id = $1 AND account_id = $2 ORDER BY created_at"
        )))
        .bind(tenant)
        .bind(account)
        .fetch_all(self.pool())
        .await?
        .into_iter()
        .map(allowance_row)
        .collect()
    }

    pub async fn end_allowance(&self, tenant: &str, id: Uuid, now: DateTime<Utc>) -> PgResult<Option<AllowanceRow>> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "UPDATE allowances SET ended_at = COALESCE(ended_at, $3) WHERE tenant_id = $1 AND allowance_id = $2 \
             RETURNING {ALLOWANCE_COLUMNS}"
        )))
        .bind(tenant)
        .bind(id)
        .bind(now)
        .fetch_optional(self.pool())
        .await?;
        row.map(allowance_row).transpose()
    }

    // ---- adjustments -----------------------------------------------------

    /// Whether a debit adjustment used this idempotency key.
    pub async fn adjustment_key_used(&self, tenant: &str, idem_key: &str) -> PgResult<bool> {
        let used: Option<i32> =
            sqlx::query_scalar("SELECT 1 FROM adjustments WHERE tenant_id = $1 AND idempotency_key = $2")
                .bind(tenant)
                .bind(idem_key)
                .fetch_optional(self.pool())
                .await?;
        Ok(used.is_some())
    }

    /// Removes `amount` (> 0) credits from the account's grants in spend
    /// order (what they lack stays owed), with a reason and an actor.
    pub async fn debit_adjustment(&self, tenant: &str, account: &str, d: &Debit<'_>) -> PgResult<Adjusted> {
        let Debit { amount, reason, actor, idem_key, payload_hash } = *d;
        let mut tx = self.pool().begin().await?;
        lock_tenant_ledger(&mut tx, tenant).await?;
        let used: Option<(Uuid, String)> = sqlx::query_as(
            "SELECT adjustment_id, payload_hash FROM adjustments WHERE tenant_id = $1 AND idempotency_key = $2",
        )
        .bind(tenant)
        .bind(idem_key)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some((adjustment_id, hash)) = used {
            if hash != payload_hash {
                return Ok(Adjusted::KeyReused);
            }
            return Ok(Adjusted::Done { adjustment_id, entries: Vec::new(), created: false });
        }
        allocate_pending(&mut tx, tenant).await?;
        let adjustment_id = Uuid::now_v7();
        sqlx::query(
            "INSERT INTO adjustments (adjustment_id, tenant_id, account_id, amount, reason, actor, idempotency_key, \
               payload_hash) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(adjustment_id)
        .bind(tenant)
        .bind(account)
        .bind(-amount.to_decimal())
        .bind(reason)
        .bind(actor)
        .bind(idem_key)
        .bind(payload_hash)
        .execute(&mut *tx)
        .await?;
        let rows = sqlx::query(AssertSqlSafe(format!(
            "{GRANT_SELECT} WHERE g.tenant_id = $1 AND g.account_id = $2 AND g.credited_at IS NOT NULL \
               AND g.voided_at IS NULL AND g.expired_at IS NULL"
        )))
        .bind(tenant)
        .bind(account)
        .fetch_all(&mut *tx)
        .await?;
        let mut grants = rows.into_iter().map(grant_row).collect::<PgResult<Vec<_>>>()?;
        grants.sort_by(|a, b| a.spend_key().cmp_spend(&b.spend_key()));
        let remaining: Vec<i64> = grants.iter().map(|g| g.remaining.micros()).collect();
        let (taken, uncovered) = allocate(amount.micros(), &remaining);
        let mut parts: Vec<(Option<Uuid>, i64)> =
            grants.iter().zip(taken).filter(|(_, t)| *t > 0).map(|(g, t)| (Some(g.grant_id), t)).collect();
        if uncovered > 0 {
            parts.push((None, uncovered));
        }
        let mut entries = Vec::new();
        for (grant_id, take) in parts {
            let entry_id: i64 = sqlx::query_scalar(
                "INSERT INTO ledger (tenant_id, account_id, grant_id, kind, amount, applied, adjustment_id) \
                 VALUES ($1, $2, $3, 'adjustment', $4, false, $5) RETURNING entry_id",
            )
            .bind(tenant)
            .bind(account)
            .bind(grant_id)
            .bind(Credits::from_micros(-take).to_decimal())
            .bind(adjustment_id)
            .fetch_one(&mut *tx)
            .await?;
            entries.push(PendingEntry {
                entry_id,
                tenant_id: tenant.to_string(),
                account_id: account.to_string(),
                amount: Credits::from_micros(-take),
            });
        }
        tx.commit().await?;
        Ok(Adjusted::Done { adjustment_id, entries, created: true })
    }

    // ---- account change requests ------------------------------------------

    /// Stores a pending request unless the key was used; returns the stored
    /// request and whether it is new.
    pub async fn request_change(
        &self,
        tenant: &str,
        account: &str,
        requested: &serde_json::Value,
        note: &str,
        idem_key: &str,
        payload_hash: &str,
    ) -> PgResult<(ChangeRow, bool)> {
        let created = sqlx::query(
            "INSERT INTO account_changes (change_id, tenant_id, account_id, requested, note, idempotency_key, \
               payload_hash) VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (tenant_id, idempotency_key) DO NOTHING",
        )
        .bind(Uuid::now_v7())
        .bind(tenant)
        .bind(account)
        .bind(requested)
        .bind(note)
        .bind(idem_key)
        .bind(payload_hash)
        .execute(self.pool())
        .await?
        .rows_affected()
            == 1;
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {CHANGE_COLUMNS} FROM account_changes WHERE tenant_id = $1 AND idempotency_key = $2"
        )))
        .bind(tenant)
        .bind(idem_key)
        .fetch_one(self.pool())
        .await?;
        Ok((change_row(row), created))
    }

    pub async fn change(&self, tenant: &str, id: Uuid) -> PgResult<Option<ChangeRow>> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {CHANGE_COLUMNS} FROM account_changes WHERE tenant_id = $1 AND change_id = $2"
        )))
        .bind(tenant)
        .bind(id)
        .fetch_optional(self.pool())
        .await?;
        Ok(row.map(change_row))
    }

    /// Marks a pending request decided; `None` if it was not pending.
    pub async fn decide_change(
        &self,
        tenant: &str,
        id: Uuid,
        approve: bool,
        note: &str,
    ) -> PgResult<Option<ChangeRow>> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "UPDATE account_changes SET status = $3, decided_at = now(), decision_note = $4 \
             WHERE tenant_id = $1 AND change_id = $2 AND status = 'pending' RETURNING {CHANGE_COLUMNS}"
        )))
        .bind(tenant)
        .bind(id)
        .bind(if approve { "approved" } else { "denied" })
        .bind(note)
        .fetch_optional(self.pool())
        .await?;
        Ok(row.map(change_row))
    }

    pub async fn changes(&self, tenant: &str, status: Option<&str>) -> PgResult<Vec<ChangeRow>> {
        Ok(sqlx::query(AssertSqlSafe(format!(
            "SELECT {CHANGE_COLUMNS} FROM account_changes WHERE tenant_id = $1 AND ($2::text IS NULL OR status = $2) \
             ORDER BY requested_at, change_id"
        )))
        .bind(tenant)
        .bind(status)
        .fetch_all(self.pool())
        .await?
        .into_iter()
        .map(change_row)
        .collect())
    }
}
