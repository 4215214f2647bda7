//! `PgStore`: the durable side. Tenants, accounts, grants, usage events and
//! the ledger in PostgreSQL.
//!
//! Queries are checked at run time (no database at build time). Money
//! crosses this boundary as `NUMERIC` <-> [`Credits`], never as a float.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    str::FromStr,
    time::Duration,
};

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::{
    AssertSqlSafe, PgPool, Postgres, Row, Transaction,
    postgres::{PgConnectOptions, PgPoolOptions},
};
use uuid::Uuid;

use crate::auth::{KeyRecord, Role};
use crate::domain::{
    Credits,
    grant::{Category, SpendKey, allocate},
    limit::CommitLimit,
};
use crate::store::hot::Fenced;

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("postgres: {0}")]
    Db(#[from] sqlx::Error),
    #[error("migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("stored amount is not exact: {0}")]
    Amount(String),
    #[error("idempotency key used with another payload")]
    KeyReused,
}

impl PgError {
    /// Whether retrying later may succeed (connection loss, timeouts,
    /// serialization failures, a server shutting down).
    pub fn is_transient(&self) -> bool {
        match self {
            PgError::Db(sqlx::Error::Database(db)) => {
                let code = db.code().unwrap_or_default();
                // 40xxx transaction rollback, 53xxx resources, 57Pxx operator
                // intervention, 08xxx connection, 57014 statement timeout.
                code.starts_with("40")
                    || code.starts_with("53")
                    || code.starts_with("57P")
                    || code.starts_with("08")
                    || code == "57014"
            }
            PgError::Db(
                sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::WorkerCrashed,
            ) => true,
            _ => false,
        }
    }

    /// The SQLSTATE of a database error, if any.
    pub fn sqlstate(&self) -> Option<String> {
        match self {
            PgError::Db(sqlx::Error::Database(db)) => db.code().map(|c| c.into_owned()),
            _ => None,
        }
    }
}

pub type PgResult<T> = Result<T, PgError>;

fn commit_limit(multiple: i32, allowance: Decimal, charge_max: Option<Decimal>) -> PgResult<CommitLimit> {
    Ok(CommitLimit {
        hold_multiple: u32::try_from(multiple).unwrap_or(CommitLimit::DEFAULT_HOLD_MULTIPLE),
        allowance: credits(allowance)?,
        charge_max: charge_max.map(credits).transpose()?,
    })
}

pub(crate) fn credits(value: Decimal) -> PgResult<Credits> {
    Credits::try_from_decimal(value).map_err(|e| PgError::Amount(format!("{value}: {e}")))
}

#[derive(Clone, Debug, PartialEq)]
pub struct TenantRow {
    pub tenant_id: String,
    pub display_name: String,
    pub credit_value: Decimal,
    pub currency: String,
    pub time_zone: String,
    pub created_at: DateTime<Utc>,
    pub period: PeriodSpec,
    /// category name → most grants of it per account.
    pub grant_limits: BTreeMap<String, i32>,
    pub commit_limit: CommitLimit,
}

#[derive(Clone, Debug, PartialEq)]
pub struct AccountRow {
    pub account_id: String,
    pub parent_id: Option<String>,
    pub kind: String,
    pub display_name: String,
    pub pool_access: bool,
    pub cap: Option<Credits>,
    pub suspended: bool,
    pub depth: i32,
    pub created_at: DateTime<Utc>,
    /// The account's own period; `None`: the tenant's.
    pub period: Option<PeriodSpec>,
    pub tier: String,
    pub period_start: Option<DateTime<Utc>>,
    pub period_end: Option<DateTime<Utc>>,
}

/// A billing period as stored: kind 'month' | 'year' | 'trial', anchor
/// (NULL: calendar periods), time zone (NULL: the tenant's), trial end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeriodSpec {
    pub kind: String,
    pub anchor: Option<DateTime<Utc>>,
    pub time_zone: Option<String>,
    pub trial_end: Option<DateTime<Utc>>,
}

#[derive(Clone, Debug)]
pub struct GrantRow {
    pub grant_id: Uuid,
    pub account_id: String,
    pub amount: Credits,
    pub category: Category,
    pub priority: i32,
    pub effective_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub description: String,
    pub payload_hash: String,
    pub credited_at: Option<DateTime<Utc>>,
    pub voided_at: Option<DateTime<Utc>>,
    pub void_reason: Option<String>,
    pub void_hash: Option<String>,
    pub expired_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub reason: String,
    pub actor: String,
    pub allowance_id: Option<Uuid>,
    pub used: Credits,
    pub forfeited: Credits,
    pub remaining: Credits,
}

impl GrantRow {
    pub fn spend_key(&self) -> SpendKey {
        SpendKey {
            priority: self.priority,
            expires_at: self.expires_at,
            created_at: self.created_at,
            id: self.grant_id,
        }
    }
}

/// A usage event to write (Commit or Charge).
#[derive(Clone, Debug)]
pub struct NewEvent {
    pub event_id: Uuid,
    pub tenant_id: String,
    pub account_id: String,
    pub reservation_id: Option<Uuid>,
    pub idempotency_key: String,
    pub payload_hash: String,
    pub amount: Credits,
    pub held: Credits,
    pub overdraft: Credits,
    pub draws: Vec<(String, Credits)>,
    pub labels: serde_json::Value,
    /// Where the charge stands in the tenant's fence (stored as
    /// `hot_epoch`: the generation); the write is refused unless
    /// PostgreSQL's fence still names this generation and process.
    pub fence: Fenced,
    pub recorded_at: DateTime<Utc>,
    /// The price version and line items when the usage was rated.
    pub price_version: Option<String>,
    pub line_items: Option<serde_json::Value>,
}

impl NewEvent {
    fn kind(&self) -> &'static str {
        if self.reservation_id.is_some() { "commit" } else { "charge" }
    }
}

/// A stored usage event.
#[derive(Clone, Debug)]
pub struct EventRow {
    pub event_id: Uuid,
    pub account_id: String,
    pub reservation_id: Option<Uuid>,
    pub payload_hash: String,
    pub amount: Credits,
    pub held: Credits,
    pub overdraft: Credits,
    pub recorded_at: DateTime<Utc>,
    pub price_version: Option<String>,
    pub line_items: Option<serde_json::Value>,
}

/// What happened to one event of a batch insert.
#[derive(Clone, Debug)]
pub enum Inserted {
    /// Written now.
    New,
    /// Refused: the charge was made on a hot state PostgreSQL no longer
    /// trusts (a rebuild, or another Redis process took over). Nothing
    /// was written; a retry with the same key reaches the current state.
    Fenced,
    /// An event with the same reservation or idempotency key already
    /// exists: this one.
    Existing(EventRow),
}

/// A ledger row whose delta must reach the Redis balance.
#[derive(Clone, Debug)]
pub struct PendingEntry {
    pub entry_id: i64,
    pub tenant_id: String,
    pub account_id: String,
    pub amount: Credits,
}

/// Everything a rebuild of one tenant's hot state needs.
#[derive(Clone, Debug, Default)]
pub struct TenantSnapshot {
    pub accounts: Vec<AccountRow>,
    /// Σ ledger − unallocated draws, per account.
    pub balances: HashMap<String, Credits>,
    /// Cap usage per account: its subtree's usage in its current period.
    pub usage: HashMap<String, Credits>,
    /// Accounts with a live recurring allowance.
    pub with_allowance: Vec<String>,
    /// Per account: what it was charged in its current period (to recover
    /// the period's credits: balance + this).
    pub period_draws: HashMap<String, Credits>,
    /// Per account: alert thresholds fired in its current period ("p25,a5").
    pub fired: HashMap<String, String>,
    /// Ledger rows not yet marked applied (they are part of the balances).
    pub unapplied: Vec<i64>,
    /// Accounts with an alert policy of their own.
    pub alert_policies: HashMap<String, crate::store::alerts::AlertPolicy>,
    /// The tenant's alert policy (for every other account).
    pub tenant_alerts: crate::store::alerts::AlertPolicy,
}

/// The reconciler's view of one tenant in PostgreSQL (`ledger_view`).
#[derive(Clone, Debug)]
pub struct LedgerView {
    /// Σ ledger − unallocated draws, per account (absent: zero).
    pub balances: HashMap<String, Credits>,
    /// Ledger rows not yet marked applied to Redis.
    pub unapplied: Vec<PendingEntry>,
    /// The holds asked about that have a durable usage event.
    pub durable: std::collections::HashSet<Uuid>,
}

#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
}

/// The bound of a rebuild's snapshot reads (see `PgStore::snapshot`): long
/// enough for a tenant with millions of events this period.
const SNAPSHOT_STATEMENT_TIMEOUT: &str = "SET LOCAL statement_timeout = '10min'";

const EVENT_COLUMNS: &str = "event_id, account_id, reservation_id, payload_hash, amount, held, overdraft, recorded_at, price_version, line_items";

pub(crate) const GRANT_SELECT: &str = "SELECT g.grant_id, g.account_id, g.amount, g.category, g.priority, g.effective_at, \
     g.expires_at, g.description, g.payload_hash, g.credited_at, g.voided_at, g.void_reason, g.void_hash, \
     g.expired_at, g.created_at, g.reason, g.actor, g.allowance_id, \
     COALESCE((SELECT -SUM(l.amount) FROM ledger l WHERE l.grant_id = g.grant_id AND l.kind IN ('usage', 'cover')), 0) AS used, \
     COALESCE((SELECT -SUM(l.amount) FROM ledger l WHERE l.grant_id = g.grant_id AND l.kind IN ('void', 'expiry')), 0) AS forfeited, \
     COALESCE((SELECT SUM(l.amount) FROM ledger l WHERE l.grant_id = g.grant_id), 0) AS remaining \
     FROM grants g";

impl PgStore {
    /// Connects now (fails when PostgreSQL is unreachable): for commands.
    pub async fn connect(url: &str, max_connections: u32, statement_timeout: Duration) -> PgResult<Self> {
        let store = Self::lazy(url, max_connections, statement_timeout)?;
        store.ping().await?;
        Ok(store)
    }

    /// A pool that connects on first use: the server starts while
    /// PostgreSQL is unreachable and its calls fail (UNAVAILABLE) until it
    /// answers. Only a malformed URL fails here.
    pub fn lazy(url: &str, max_connections: u32, statement_timeout: Duration) -> PgResult<Self> {
        let timeout_ms = statement_timeout.as_millis().to_string();
        let options = PgConnectOptions::from_str(url)?
            .application_name("creditd")
            .options([("statement_timeout", timeout_ms.as_str()), ("idle_in_transaction_session_timeout", "60000")]);
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(statement_timeout)
            .connect_lazy_with(options);
        Ok(PgStore { pool })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub async fn migrate(&self) -> PgResult<()> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    pub async fn ping(&self) -> PgResult<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    // ---- tenants ---------------------------------------------------------

    /// Inserts the tenant unless it exists; returns the stored row and
    /// whether it was created now.
    /// Creates the tenant (unless it exists) with its fence row naming the
    /// hot state `fence` (generation, process) that `HotStore::init_tenant`
    /// made, in one transaction.
    pub async fn create_tenant(&self, t: &TenantRow, fence: (&str, &str)) -> PgResult<(TenantRow, bool)> {
        let mut tx = self.pool.begin().await?;
        let created = sqlx::query(
            "INSERT INTO tenants (tenant_id, display_name, credit_value, currency, time_zone, \
               period_kind, period_anchor, period_time_zone, trial_end, grant_limits, \
               commit_hold_multiple, commit_allowance, charge_max) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) ON CONFLICT (tenant_id) DO NOTHING",
        )
        .bind(&t.tenant_id)
        .bind(&t.display_name)
        .bind(t.credit_value)
        .bind(&t.currency)
        .bind(&t.time_zone)
        .bind(&t.period.kind)
        .bind(t.period.anchor)
        .bind(&t.period.time_zone)
        .bind(t.period.trial_end)
        .bind(serde_json::to_value(&t.grant_limits).unwrap_or_default())
        .bind(t.commit_limit.hold_multiple as i32)
        .bind(t.commit_limit.allowance.to_decimal())
        .bind(t.commit_limit.charge_max.map(Credits::to_decimal))
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if created {
            sqlx::query("INSERT INTO hot_fences (tenant_id, generation, position, process) VALUES ($1, $2, 0, $3)")
                .bind(&t.tenant_id)
                .bind(fence.0)
                .bind(fence.1)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        let row = self.tenant(&t.tenant_id).await?.ok_or(PgError::Db(sqlx::Error::RowNotFound))?;
        Ok((row, created))
    }

    pub async fn tenant(&self, tenant_id: &str) -> PgResult<Option<TenantRow>> {
        let row = sqlx::query(
            "SELECT tenant_id, display_name, credit_value, currency, time_zone, created_at, \
               period_kind, period_anchor, period_time_zone, trial_end, grant_limits, \
               commit_hold_multiple, commit_allowance, charge_max FROM tenants WHERE tenant_id = $1",
        )
        .bind(tenant_id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            Ok(TenantRow {
                tenant_id: r.get(0),
                display_name: r.get(1),
                credit_value: r.get(2),
                currency: r.get(3),
                time_zone: r.get(4),
                created_at: r.get(5),
                period: PeriodSpec { kind: r.get(6), anchor: r.get(7), time_zone: r.get(8), trial_end: r.get(9) },
                grant_limits: serde_json::from_value(r.get(10)).unwrap_or_default(),
                commit_limit: commit_limit(r.get(11), r.get(12), r.get(13))?,
            })
        })
        .transpose()
    }

    /// Every tenant's id with its commit limit.
    pub async fn tenant_limits(&self) -> PgResult<Vec<(String, CommitLimit)>> {
        let rows: Vec<(String, i32, Decimal, Option<Decimal>)> = sqlx::query_as(
            "SELECT tenant_id, commit_hold_multiple, commit_allowance, charge_max FROM tenants ORDER BY tenant_id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(|(id, m, a, c)| Ok((id, commit_limit(m, a, c)?))).collect()
    }

    // ---- accounts --------------------------------------------------------

    /// Inserts the account unless it exists. `Ok(None)` when the parent
    /// does not exist; otherwise the stored row and whether it is new.
    pub async fn create_account(&self, tenant: &str, a: &AccountRow) -> PgResult<Option<(AccountRow, bool)>> {
        let depth: i32 = match &a.parent_id {
            None => 1,
            Some(parent) => match self.account(tenant, parent).await? {
                Some(p) => p.depth + 1,
                None => return Ok(None),
            },
        };
        let created = sqlx::query(
            "INSERT INTO accounts (tenant_id, account_id, parent_id, kind, display_name, pool_access, cap, depth, \
               period_kind, period_anchor, period_time_zone, trial_end, tier, period_start, period_end) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15) \
             ON CONFLICT (tenant_id, account_id) DO NOTHING",
        )
        .bind(tenant)
        .bind(&a.account_id)
        .bind(&a.parent_id)
        .bind(&a.kind)
        .bind(&a.display_name)
        .bind(a.pool_access)
        .bind(a.cap.map(Credits::to_decimal))
        .bind(depth)
        .bind(a.period.as_ref().map(|p| p.kind.clone()))
        .bind(a.period.as_ref().and_then(|p| p.anchor))
        .bind(a.period.as_ref().and_then(|p| p.time_zone.clone()))
        .bind(a.period.as_ref().and_then(|p| p.trial_end))
        .bind(&a.tier)
        .bind(a.period_start)
        .bind(a.period_end)
        .execute(&self.pool)
        .await?
        .rows_affected()
            == 1;
        let row = self.account(tenant, &a.account_id).await?.ok_or(PgError::Db(sqlx::Error::RowNotFound))?;
        Ok(Some((row, created)))
    }

    pub async fn update_account(&self, tenant: &str, update: &AccountUpdate) -> PgResult<Option<AccountRow>> {
        let done = sqlx::query(
            "UPDATE accounts SET \
               pool_access = COALESCE($3, pool_access), \
               cap = CASE WHEN $4 THEN $5 ELSE cap END, \
               suspended = COALESCE($6, suspended), \
               display_name = COALESCE($7, display_name), \
               tier = COALESCE($8, tier) \
             WHERE tenant_id = $1 AND account_id = $2",
        )
        .bind(tenant)
        .bind(&update.account_id)
        .bind(update.pool_access)
        .bind(update.cap.is_some())
        .bind(update.cap.flatten().map(Credits::to_decimal))
        .bind(update.suspended)
        .bind(&update.display_name)
        .bind(&update.tier)
        .execute(&self.pool)
        .await?;
        if done.rows_affected() == 0 {
            return Ok(None);
        }
        self.account(tenant, &update.account_id).await
    }

    pub async fn account(&self, tenant: &str, account_id: &str) -> PgResult<Option<AccountRow>> {
        let row = sqlx::query(
            "SELECT account_id, parent_id, kind, display_name, pool_access, cap, suspended, depth, created_at, \
               period_kind, period_anchor, period_time_zone, trial_end, tier, period_start, period_end \
             FROM accounts WHERE tenant_id = $1 AND account_id = $2",
        )
        .bind(tenant)
        .bind(account_id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(account_row).transpose()
    }

    /// Accounts ordered by id after `after`, optionally children of one parent.
    pub async fn list_accounts(
        &self,
        tenant: &str,
        parent: Option<&str>,
        after: &str,
        limit: i64,
    ) -> PgResult<Vec<AccountRow>> {
        let rows = sqlx::query(
            "SELECT account_id, parent_id, kind, display_name, pool_access, cap, suspended, depth, created_at, \
               period_kind, period_anchor, period_time_zone, trial_end, tier, period_start, period_end \
             FROM accounts WHERE tenant_id = $1 AND ($2::text IS NULL OR parent_id = $2) AND account_id > $3 \
             ORDER BY account_id LIMIT $4",
        )
        .bind(tenant)
        .bind(parent)
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(account_row).collect()
    }

    // ---- grants ----------------------------------------------------------

    /// Inserts a grant (and, if effective now, its ledger row) unless one
    /// with the same idempotency key exists; refuses it when `limit` grants
    /// of its category already exist for the account.
    pub async fn create_grant(
        &self,
        tenant: &str,
        g: &GrantRow,
        idem_key: &str,
        now: DateTime<Utc>,
        limit: Option<i32>,
    ) -> PgResult<GrantCreated> {
        let mut tx = self.pool.begin().await?;
        if let Some(limit) = limit {
            // Serialize grants of one account so the count is exact.
            sqlx::query("SELECT 1 FROM accounts WHERE tenant_id = $1 AND account_id = $2 FOR UPDATE")
                .bind(tenant)
                .bind(&g.account_id)
                .execute(&mut *tx)
                .await?;
            let count: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM grants WHERE tenant_id = $1 AND account_id = $2 AND category = $3",
            )
            .bind(tenant)
            .bind(&g.account_id)
            .bind(g.category.as_str())
            .fetch_one(&mut *tx)
            .await?;
            let replay: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM grants WHERE tenant_id = $1 AND idempotency_key = $2)",
            )
            .bind(tenant)
            .bind(idem_key)
            .fetch_one(&mut *tx)
            .await?;
            if !replay && count >= i64::from(limit) {
                return Ok(GrantCreated::LimitReached);
            }
        }
        let credit_now = g.effective_at <= now;
        let inserted = sqlx::query(
            "INSERT INTO grants (grant_id, tenant_id, account_id, amount, category, priority, effective_at, expires_at, \
               description, idempotency_key, payload_hash, credited_at, reason, actor, allowance_id) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, CASE WHEN $12 THEN $16::timestamptz END, \
               $13, $14, $15) \
             ON CONFLICT (tenant_id, idempotency_key) DO NOTHING",
        )
        .bind(g.grant_id)
        .bind(tenant)
        .bind(&g.account_id)
        .bind(g.amount.to_decimal())
        .bind(g.category.as_str())
        .bind(g.priority)
        .bind(g.effective_at)
        .bind(g.expires_at)
        .bind(&g.description)
        .bind(idem_key)
        .bind(&g.payload_hash)
        .bind(credit_now)
        .bind(&g.reason)
        .bind(&g.actor)
        .bind(g.allowance_id)
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        let mut pending = None;
        if inserted && credit_now {
            pending = Some(insert_entry(&mut tx, tenant, &g.account_id, g.grant_id, "grant", g.amount).await?);
        }
        tx.commit().await?;
        let grant_id: Uuid = if inserted {
            g.grant_id
        } else {
            sqlx::query_scalar("SELECT grant_id FROM grants WHERE tenant_id = $1 AND idempotency_key = $2")
                .bind(tenant)
                .bind(idem_key)
                .fetch_one(&self.pool)
                .await?
        };
        let row = self.grant(tenant, grant_id).await?.ok_or(PgError::Db(sqlx::Error::RowNotFound))?;
        Ok(GrantCreated::Stored { grant: Box::new(row), pending, created: inserted })
    }

    pub async fn grant(&self, tenant: &str, grant_id: Uuid) -> PgResult<Option<GrantRow>> {
        let row = sqlx::query(AssertSqlSafe(format!("{GRANT_SELECT} WHERE g.tenant_id = $1 AND g.grant_id = $2")))
            .bind(tenant)
            .bind(grant_id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(grant_row).transpose()
    }

    /// Grants of an account in spend order.
    pub async fn grants_of(&self, tenant: &str, account_id: &str, include_inactive: bool) -> PgResult<Vec<GrantRow>> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "{GRANT_SELECT} WHERE g.tenant_id = $1 AND g.account_id = $2 \
               AND ($3 OR (g.voided_at IS NULL AND g.expired_at IS NULL))"
        )))
        .bind(tenant)
        .bind(account_id)
        .bind(include_inactive)
        .fetch_all(&self.pool)
        .await?;
        let mut grants = rows.into_iter().map(grant_row).collect::<PgResult<Vec<_>>>()?;
        grants.sort_by(|a, b| a.spend_key().cmp_spend(&b.spend_key()));
        Ok(grants)
    }

    /// Removes what is left of a live grant (void or expiry). Allocates the
    /// tenant's pending usage first so the remainder is exact. Everything
    /// runs under the tenant's ledger lock, so concurrent voids (and their
    /// replays) are serialized.
    pub async fn forfeit(&self, tenant: &str, grant_id: Uuid, kind: Forfeit<'_>) -> PgResult<Forfeited> {
        let mut tx = self.pool.begin().await?;
        lock_tenant_ledger(&mut tx, tenant).await?;
        if let Forfeit::Void { key, .. } = &kind {
            let used: Option<(Uuid, Option<String>)> =
                sqlx::query_as("SELECT grant_id, void_hash FROM grants WHERE tenant_id = $1 AND void_key = $2")
                    .bind(tenant)
                    .bind(*key)
                    .fetch_optional(&mut *tx)
                    .await?;
            if let Some((grant_id, payload_hash)) = used {
                return Ok(Forfeited::KeyUsed { grant_id, payload_hash: payload_hash.unwrap_or_default() });
            }
        }
        allocate_pending(&mut tx, tenant).await?;
        let live: Option<(String, Option<DateTime<Utc>>)> = sqlx::query_as(
            "SELECT account_id, credited_at FROM grants WHERE tenant_id = $1 AND grant_id = $2 \
               AND voided_at IS NULL AND expired_at IS NULL FOR UPDATE",
        )
        .bind(tenant)
        .bind(grant_id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((account_id, credited_at)) = live else {
            return Ok(Forfeited::NotLive);
        };
        let remaining: Decimal = sqlx::query_scalar("SELECT COALESCE(SUM(amount), 0) FROM ledger WHERE grant_id = $1")
            .bind(grant_id)
            .fetch_one(&mut *tx)
            .await?;
        let remaining = credits(remaining)?;
        let entry_kind = match kind {
            Forfeit::Void { reason, key, payload_hash } => {
                sqlx::query(
                    "UPDATE grants SET voided_at = now(), void_reason = $2, void_key = $3, void_hash = $4 WHERE grant_id = $1",
                )
                .bind(grant_id)
                .bind(reason)
                .bind(key)
                .bind(payload_hash)
                .execute(&mut *tx)
                .await?;
                "void"
            }
            Forfeit::Expiry => {
                sqlx::query("UPDATE grants SET expired_at = COALESCE(expires_at, now()) WHERE grant_id = $1")
                    .bind(grant_id)
                    .execute(&mut *tx)
                    .await?;
                "expiry"
            }
        };
        let pending = if credited_at.is_some() && remaining > Credits::ZERO {
            Some(
                insert_entry(
                    &mut tx,
                    tenant,
                    &account_id,
                    grant_id,
                    entry_kind,
                    Credits::ZERO.checked_sub(remaining).unwrap_or_default(),
                )
                .await?,
            )
        } else {
            None
        };
        tx.commit().await?;
        let row = self.grant(tenant, grant_id).await?.ok_or(PgError::Db(sqlx::Error::RowNotFound))?;
        Ok(Forfeited::Done(Box::new(row), pending))
    }

    /// The grant created with this idempotency key, if any.
    pub async fn grant_by_key(&self, tenant: &str, key: &str) -> PgResult<Option<GrantRow>> {
        let row =
            sqlx::query(AssertSqlSafe(format!("{GRANT_SELECT} WHERE g.tenant_id = $1 AND g.idempotency_key = $2")))
                .bind(tenant)
                .bind(key)
                .fetch_optional(&self.pool)
                .await?;
        row.map(grant_row).transpose()
    }

    /// Credits pending grants whose effective_at has come (any replica may
    /// run this; rows are claimed with SKIP LOCKED). Returns the ledger rows
    /// to apply.
    pub async fn activate_due_grants(&self, now: DateTime<Utc>, limit: i64) -> PgResult<Vec<PendingEntry>> {
        let mut tx = self.pool.begin().await?;
        let due: Vec<(Uuid, String, String, Decimal)> = sqlx::query_as(
            "SELECT grant_id, tenant_id, account_id, amount FROM grants \
             WHERE credited_at IS NULL AND voided_at IS NULL AND effective_at <= $2 \
             ORDER BY effective_at LIMIT $1 FOR UPDATE SKIP LOCKED",
        )
        .bind(limit)
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
        let mut entries = Vec::with_capacity(due.len());
        for (grant_id, tenant, account, amount) in due {
            sqlx::query("UPDATE grants SET credited_at = $2 WHERE grant_id = $1")
                .bind(grant_id)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            entries.push(insert_entry(&mut tx, &tenant, &account, grant_id, "grant", credits(amount)?).await?);
        }
        tx.commit().await?;
        Ok(entries)
    }

    /// Grants whose expires_at has passed and that are still live (but for
    /// allowance grants: their period boundary expires them, to roll over).
    pub async fn expired_grants(&self, now: DateTime<Utc>, limit: i64) -> PgResult<Vec<(String, Uuid)>> {
        Ok(sqlx::query_as(
            "SELECT tenant_id, grant_id FROM grants \
             WHERE expires_at <= $2 AND expired_at IS NULL AND voided_at IS NULL AND allowance_id IS NULL \
             ORDER BY expires_at LIMIT $1",
        )
        .bind(limit)
        .bind(now)
        .fetch_all(&self.pool)
        .await?)
    }

    // ---- ledger ----------------------------------------------------------

    pub async fn unapplied_entries(&self, limit: i64) -> PgResult<Vec<PendingEntry>> {
        let rows: Vec<(i64, String, String, Decimal)> = sqlx::query_as(
            "SELECT entry_id, tenant_id, account_id, amount FROM ledger WHERE NOT applied ORDER BY entry_id LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|(entry_id, tenant_id, account_id, amount)| {
                Ok(PendingEntry { entry_id, tenant_id, account_id, amount: credits(amount)? })
            })
            .collect()
    }

    /// Names `process` as the Redis process whose changes the tenant's
    /// fence accepts (refusing every later confirmation from another), and
    /// returns the generation and position a state it holds must match.
    pub async fn claim_fence(&self, tenant: &str, process: &str) -> PgResult<Option<(String, i64)>> {
        Ok(sqlx::query_as("UPDATE hot_fences SET process = $2 WHERE tenant_id = $1 RETURNING generation, position")
            .bind(tenant)
            .bind(process)
            .fetch_optional(&self.pool)
            .await?)
    }

    /// Confirms a change to the hot state: raises the tenant's fence
    /// position to it, unless the fence names another generation or
    /// process (then false: the change was made on a state no longer
    /// trusted).
    pub async fn confirm_fence(&self, tenant: &str, fence: &Fenced) -> PgResult<bool> {
        let done = sqlx::query(
            "UPDATE hot_fences SET position = GREATEST(position, $4) \
             WHERE tenant_id = $1 AND generation = $2 AND process = $3",
        )
        .bind(tenant)
        .bind(&fence.generation)
        .bind(&fence.process)
        .bind(fence.position)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Starts a new generation of the tenant's hot state, made by
    /// `process`: from the commit on, every confirmation of the previous
    /// one is refused, and a batch of events that raised the old fence
    /// before has committed (the row lock orders them).
    pub async fn new_generation(&self, tenant: &str, generation: &str, process: &str) -> PgResult<()> {
        sqlx::query(
            "INSERT INTO hot_fences (tenant_id, generation, position, process) VALUES ($1, $2, 0, $3) \
             ON CONFLICT (tenant_id) DO UPDATE SET generation = $2, position = 0, process = $3",
        )
        .bind(tenant)
        .bind(generation)
        .bind(process)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Every tenant's fence: tenant, generation, position.
    pub async fn fences(&self) -> PgResult<Vec<(String, String, i64)>> {
        Ok(sqlx::query_as("SELECT tenant_id, generation, position FROM hot_fences").fetch_all(&self.pool).await?)
    }

    pub async fn mark_applied(&self, entry_ids: &[i64]) -> PgResult<()> {
        sqlx::query("UPDATE ledger SET applied = true WHERE entry_id = ANY($1)")
            .bind(entry_ids)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Spreads the tenant's unallocated usage over grants in spend order.
    pub async fn allocate(&self, tenant: &str) -> PgResult<u64> {
        let mut tx = self.pool.begin().await?;
        lock_tenant_ledger(&mut tx, tenant).await?;
        let n = allocate_pending(&mut tx, tenant).await?;
        tx.commit().await?;
        Ok(n)
    }

    /// Tenants with usage not yet allocated to grants.
    pub async fn tenants_to_allocate(&self) -> PgResult<Vec<String>> {
        Ok(sqlx::query_scalar("SELECT DISTINCT tenant_id FROM usage_events WHERE NOT allocated")
            .fetch_all(&self.pool)
            .await?)
    }

    /// The state a rebuild of the tenant's hot balances starts from. Runs
    /// under the tenant's ledger lock, in one snapshot.
    ///
    /// Its reads grow with the tenant's usage in the current period, so
    /// they are not bound by `postgres.statement_timeout` (which bounds
    /// commits in doubt): under that limit, a tenant with enough usage
    /// could never be rebuilt and would stay UNAVAILABLE after a Redis loss.
    pub async fn snapshot(&self, tenant: &str) -> PgResult<TenantSnapshot> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ").execute(&mut *tx).await?;
        sqlx::query(SNAPSHOT_STATEMENT_TIMEOUT).execute(&mut *tx).await?;
        // No JIT: these statements are short per tenant, and below, joins
        // that can only be nested loops (the draws' jsonb_to_recordset) carry
        // the planner's disable cost, which made every rebuild JIT-compile
        // (the rebuild benchmark: 1,000 tenants of 1,000 accounts back in
        // 164 s with JIT, 18 s without).
        sqlx::query("SET LOCAL jit = off").execute(&mut *tx).await?;
        lock_tenant_ledger(&mut tx, tenant).await?;
        let accounts = sqlx::query(
            "SELECT account_id, parent_id, kind, display_name, pool_access, cap, suspended, depth, created_at, \
               period_kind, period_anchor, period_time_zone, trial_end, tier, period_start, period_end \
             FROM accounts WHERE tenant_id = $1 ORDER BY depth, account_id",
        )
        .bind(tenant)
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .map(account_row)
        .collect::<PgResult<Vec<_>>>()?;
        // The alert policy in force per account: its own when set, else
        // the tenant's (read here, not once per account).
        type OwnPolicy = (String, Option<Vec<i32>>, Option<Vec<Decimal>>, Option<bool>);
        let own: Vec<OwnPolicy> = sqlx::query_as(
            "SELECT account_id, alert_percents, alert_amounts, alert_rearm_on_topup FROM accounts \
             WHERE tenant_id = $1 AND alert_percents IS NOT NULL AND alert_amounts IS NOT NULL \
               AND alert_rearm_on_topup IS NOT NULL",
        )
        .bind(tenant)
        .fetch_all(&mut *tx)
        .await?;
        let mut alert_policies = HashMap::with_capacity(own.len());
        for (account, p, a, r) in own {
            if let (Some(p), Some(a), Some(r)) = (p, a, r) {
                alert_policies.insert(account, crate::store::alerts::policy(p, a, r)?);
            }
        }
        let (p, a, r): (Vec<i32>, Vec<Decimal>, bool) = sqlx::query_as(
            "SELECT alert_percents, alert_amounts, alert_rearm_on_topup FROM tenants WHERE tenant_id = $1",
        )
        .bind(tenant)
        .fetch_one(&mut *tx)
        .await?;
        let tenant_alerts = crate::store::alerts::policy(p, a, r)?;
        let balances = ledger_balances(&mut tx, tenant).await?;
        // Cap usage: per account, the usage of its subtree since its own
        // current period start. The (descendant, ancestor, since) pairs
        // come from the accounts read above, so the statement is a plain
        // join whatever the planner knows of the tables (a recursive query
        // here was planned at billions of rows on tables not yet
        // analyzed); hash joins keep it linear in the events read.
        let by_id: HashMap<&str, &AccountRow> = accounts.iter().map(|a| (a.account_id.as_str(), a)).collect();
        let (mut descendant, mut ancestor, mut since) = (Vec::new(), Vec::new(), Vec::new());
        for a in &accounts {
            let mut up = Some(a);
            // Bounded: a parent cycle cannot exist, but a walk never trusts it.
            for _ in 0..1024 {
                let Some(node) = up else { break };
                descendant.push(a.account_id.as_str());
                ancestor.push(node.account_id.as_str());
                since.push(node.period_start);
                up = node.parent_id.as_deref().and_then(|p| by_id.get(p).copied());
            }
        }
        sqlx::query("SET LOCAL enable_nestloop = off").execute(&mut *tx).await?;
        sqlx::query("SET LOCAL enable_mergejoin = off").execute(&mut *tx).await?;
        let usage: Vec<(String, Decimal)> = sqlx::query_as(
            "SELECT p.ancestor, SUM(e.amount) \
             FROM UNNEST($2::text[], $3::text[], $4::timestamptz[]) AS p(descendant, ancestor, since) \
             JOIN usage_events e ON e.tenant_id = $1 AND e.account_id = p.descendant \
               AND e.recorded_at >= COALESCE(p.since, '-infinity'::timestamptz) \
             GROUP BY p.ancestor",
        )
        .bind(tenant)
        .bind(&descendant)
        .bind(&ancestor)
        .bind(&since)
        .fetch_all(&mut *tx)
        .await?;
        let usage = usage.into_iter().map(|(a, s)| Ok((a, credits(s)?))).collect::<PgResult<HashMap<_, _>>>()?;
        let unapplied: Vec<i64> =
            sqlx::query_scalar("SELECT entry_id FROM ledger WHERE tenant_id = $1 AND NOT applied")
                .bind(tenant)
                .fetch_all(&mut *tx)
                .await?;
        let with_allowance: Vec<String> =
            sqlx::query_scalar("SELECT DISTINCT account_id FROM allowances WHERE tenant_id = $1 AND ended_at IS NULL")
                .bind(tenant)
                .fetch_all(&mut *tx)
                .await?;
        let draws: Vec<(String, Decimal)> = sqlx::query_as(
            "SELECT d.account, SUM(d.amount) FROM usage_events e \
             CROSS JOIN jsonb_to_recordset(e.draws) AS d(account text, amount numeric) \
             JOIN accounts a ON a.tenant_id = e.tenant_id AND a.account_id = d.account \
             WHERE e.tenant_id = $1 AND e.recorded_at >= COALESCE(a.period_start, '-infinity'::timestamptz) \
             GROUP BY d.account",
        )
        .bind(tenant)
        .fetch_all(&mut *tx)
        .await?;
        let period_draws = draws.into_iter().map(|(a, s)| Ok((a, credits(s)?))).collect::<PgResult<HashMap<_, _>>>()?;
        let fired_rows: Vec<(String, String, Decimal)> = sqlx::query_as(
            "SELECT al.account_id, al.kind, al.threshold FROM alerts al \
             JOIN accounts a ON a.tenant_id = al.tenant_id AND a.account_id = al.account_id \
             WHERE al.tenant_id = $1 AND al.fired_at >= COALESCE(a.period_start, '-infinity'::timestamptz)",
        )
        .bind(tenant)
        .fetch_all(&mut *tx)
        .await?;
        let mut fired: HashMap<String, String> = HashMap::new();
        for (account, kind, threshold) in fired_rows {
            let token = if kind == "percent" {
                format!("p{}", threshold.normalize())
            } else {
                format!("a{}", credits(threshold)?.micros())
            };
            let entry = fired.entry(account).or_default();
            if !entry.is_empty() {
                entry.push(',');
            }
            entry.push_str(&token);
        }
        tx.commit().await?;
        Ok(TenantSnapshot {
            accounts,
            balances,
            usage,
            with_allowance,
            period_draws,
            fired,
            unapplied,
            alert_policies,
            tenant_alerts,
        })
    }

    // ---- usage events ----------------------------------------------------

    /// Writes a batch of events in one statement (one transaction, one
    /// WAL flush: the group commit). An event whose reservation or
    /// idempotency key is already stored is not written; the stored one is
    /// returned instead.
    pub async fn insert_events(&self, events: &[NewEvent]) -> PgResult<Vec<Inserted>> {
        // One array per column (binary parameters, no JSON document to
        // build and parse); jsonb columns travel as text.
        let n = events.len();
        let mut event_id = Vec::with_capacity(n);
        let mut tenant_id = Vec::with_capacity(n);
        let mut account_id = Vec::with_capacity(n);
        let mut reservation_id = Vec::with_capacity(n);
        let mut kind = Vec::with_capacity(n);
        let mut idempotency_key = Vec::with_capacity(n);
        let mut payload_hash = Vec::with_capacity(n);
        let mut amount = Vec::with_capacity(n);
        let mut held = Vec::with_capacity(n);
        let mut overdraft = Vec::with_capacity(n);
        let mut draws = Vec::with_capacity(n);
        let mut labels = Vec::with_capacity(n);
        let mut hot_epoch = Vec::with_capacity(n);
        let mut hot_process = Vec::with_capacity(n);
        // The fence rows to raise: the highest position per tenant,
        // generation and process of the batch.
        let mut raise: BTreeMap<(&str, &str, &str), i64> = BTreeMap::new();
        let mut recorded_at = Vec::with_capacity(n);
        let mut price_version = Vec::with_capacity(n);
        let mut line_items = Vec::with_capacity(n);
        for e in events {
            event_id.push(e.event_id);
            tenant_id.push(e.tenant_id.as_str());
            account_id.push(e.account_id.as_str());
            reservation_id.push(e.reservation_id);
            kind.push(e.kind());
            idempotency_key.push(e.idempotency_key.as_str());
            payload_hash.push(e.payload_hash.as_str());
            amount.push(e.amount.to_decimal());
            held.push(e.held.to_decimal());
            overdraft.push(e.overdraft.to_decimal());
            draws.push(draws_json(&e.draws));
            labels.push(e.labels.to_string());
            hot_epoch.push(e.fence.generation.as_str());
            hot_process.push(e.fence.process.as_str());
            let top = raise.entry((&e.tenant_id, &e.fence.generation, &e.fence.process)).or_insert(0);
            *top = (*top).max(e.fence.position);
            recorded_at.push(e.recorded_at);
            price_version.push(e.price_version.as_deref());
            line_items.push(e.line_items.as_ref().map(|l| l.to_string()));
        }
        let mut f_tenant = Vec::with_capacity(raise.len());
        let mut f_generation = Vec::with_capacity(raise.len());
        let mut f_process = Vec::with_capacity(raise.len());
        let mut f_position = Vec::with_capacity(raise.len());
        for ((t, g, p), n) in raise {
            f_tenant.push(t);
            f_generation.push(g);
            f_process.push(p);
            f_position.push(n);
        }
        // One statement: the fence rows of the batch are raised (and
        // locked until commit, so a rebuild's new generation waits for
        // this batch, and a batch after it finds the new generation); the
        // events of the rows raised are written. Events whose fence is not
        // PostgreSQL's come back as neither written nor existing: Fenced.
        let rows: Vec<(String, Option<Uuid>)> = sqlx::query_as(
            "WITH fence AS ( \
               UPDATE hot_fences h SET position = GREATEST(h.position, f.position) \
               FROM UNNEST($18::text[], $19::text[], $20::text[], $21::int8[]) AS f(tenant_id, generation, process, position) \
               WHERE h.tenant_id = f.tenant_id AND h.generation = f.generation AND h.process = f.process \
               RETURNING h.tenant_id, h.generation, h.process), \
             written AS ( \
               INSERT INTO usage_events (event_id, tenant_id, account_id, reservation_id, kind, idempotency_key, \
                 payload_hash, amount, held, overdraft, draws, labels, hot_epoch, recorded_at, price_version, line_items) \
               SELECT event_id, tenant_id, account_id, reservation_id, kind, idempotency_key, payload_hash, \
                 amount, held, overdraft, draws::jsonb, labels::jsonb, hot_epoch, recorded_at, price_version, \
                 line_items::jsonb \
               FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::uuid[], $5::text[], $6::text[], $7::text[], \
                 $8::numeric[], $9::numeric[], $10::numeric[], $11::text[], $12::text[], $13::text[], \
                 $14::timestamptz[], $15::text[], $16::text[], $17::text[]) \
                 AS r(event_id, tenant_id, account_id, reservation_id, kind, idempotency_key, payload_hash, \
                   amount, held, overdraft, draws, labels, hot_epoch, recorded_at, price_version, line_items, hot_process) \
               WHERE EXISTS (SELECT 1 FROM fence WHERE fence.tenant_id = r.tenant_id \
                 AND fence.generation = r.hot_epoch AND fence.process = r.hot_process) \
               ON CONFLICT DO NOTHING RETURNING event_id) \
             SELECT 'w', event_id FROM written \
             UNION ALL SELECT tenant_id || chr(31) || generation || chr(31) || process, NULL FROM fence",
        )
        .bind(&event_id)
        .bind(&tenant_id)
        .bind(&account_id)
        .bind(&reservation_id)
        .bind(&kind)
        .bind(&idempotency_key)
        .bind(&payload_hash)
        .bind(&amount)
        .bind(&held)
        .bind(&overdraft)
        .bind(&draws)
        .bind(&labels)
        .bind(&hot_epoch)
        .bind(&recorded_at)
        .bind(&price_version)
        .bind(&line_items)
        .bind(&hot_process)
        .bind(&f_tenant)
        .bind(&f_generation)
        .bind(&f_process)
        .bind(&f_position)
        .fetch_all(&self.pool)
        .await?;
        let written: HashSet<Uuid> = rows.iter().filter_map(|(_, id)| *id).collect();
        let accepted: HashSet<&str> = rows.iter().filter(|(_, id)| id.is_none()).map(|(k, _)| k.as_str()).collect();
        let mut out = Vec::with_capacity(events.len());
        for e in events {
            if written.contains(&e.event_id) {
                out.push(Inserted::New);
                continue;
            }
            let key = format!("{}\u{1f}{}\u{1f}{}", e.tenant_id, e.fence.generation, e.fence.process);
            if !accepted.contains(key.as_str()) {
                out.push(Inserted::Fenced);
                continue;
            }
            let existing = match e.reservation_id {
                Some(rid) => self.event_by_reservation(&e.tenant_id, rid).await?,
                None => None,
            };
            let existing = match existing {
                Some(row) => Some(row),
                None => self.event_by_key(&e.tenant_id, e.kind(), &e.idempotency_key).await?,
            };
            match existing {
                Some(row) => out.push(Inserted::Existing(row)),
                None => return Err(PgError::Db(sqlx::Error::RowNotFound)),
            }
        }
        Ok(out)
    }

    pub async fn event_by_reservation(&self, tenant: &str, reservation: Uuid) -> PgResult<Option<EventRow>> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {EVENT_COLUMNS} FROM usage_events WHERE tenant_id = $1 AND reservation_id = $2"
        )))
        .bind(tenant)
        .bind(reservation)
        .fetch_optional(&self.pool)
        .await?;
        row.map(event_row).transpose()
    }

    /// `kind`: "commit" or "charge".
    pub async fn event_by_key(&self, tenant: &str, kind: &str, key: &str) -> PgResult<Option<EventRow>> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {EVENT_COLUMNS} FROM usage_events WHERE tenant_id = $1 AND kind = $2 AND idempotency_key = $3"
        )))
        .bind(tenant)
        .bind(kind)
        .bind(key)
        .fetch_optional(&self.pool)
        .await?;
        row.map(event_row).transpose()
    }

    /// What the reconciler compares Redis with, from one snapshot: the
    /// accounts' ledger balances, the ledger rows not yet marked applied,
    /// and which of `holds` (reservation or charge ids) have a usage event.
    pub async fn ledger_view(&self, tenant: &str, holds: &[Uuid]) -> PgResult<LedgerView> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY").execute(&mut *tx).await?;
        let balances = ledger_balances(&mut tx, tenant).await?;
        let rows: Vec<(i64, String, String, Decimal)> = sqlx::query_as(
            "SELECT entry_id, tenant_id, account_id, amount FROM ledger WHERE tenant_id = $1 AND NOT applied",
        )
        .bind(tenant)
        .fetch_all(&mut *tx)
        .await?;
        let unapplied = rows
            .into_iter()
            .map(|(entry_id, tenant_id, account_id, amount)| {
                Ok(PendingEntry { entry_id, tenant_id, account_id, amount: credits(amount)? })
            })
            .collect::<PgResult<Vec<_>>>()?;
        let durable = holds_with_events(&mut *tx, tenant, holds).await?;
        tx.commit().await?;
        Ok(LedgerView { balances, unapplied, durable: durable.into_iter().collect() })
    }

    /// Every account id of the tenant, in order.
    pub async fn account_ids(&self, tenant: &str) -> PgResult<Vec<String>> {
        Ok(sqlx::query_scalar("SELECT account_id FROM accounts WHERE tenant_id = $1 ORDER BY account_id")
            .bind(tenant)
            .fetch_all(&self.pool)
            .await?)
    }

    /// Of these hold ids, the ones whose usage event is stored (a commit's
    /// event names its reservation; a charge's event has the hold's id).
    pub async fn holds_with_events(&self, tenant: &str, holds: &[Uuid]) -> PgResult<Vec<Uuid>> {
        holds_with_events(&self.pool, tenant, holds).await
    }

    /// Σ ledger of an account (its credits, as far as allocated).
    pub async fn ledger_balance(&self, tenant: &str, account: &str) -> PgResult<Credits> {
        let sum: Decimal =
            sqlx::query_scalar("SELECT COALESCE(SUM(amount), 0) FROM ledger WHERE tenant_id = $1 AND account_id = $2")
                .bind(tenant)
                .bind(account)
                .fetch_one(&self.pool)
                .await?;
        credits(sum)
    }

    /// Σ amount of the tenant's usage events (for audits and tests).
    pub async fn usage_total(&self, tenant: &str) -> PgResult<Credits> {
        let sum: Decimal = sqlx::query_scalar("SELECT COALESCE(SUM(amount), 0) FROM usage_events WHERE tenant_id = $1")
            .bind(tenant)
            .fetch_one(&self.pool)
            .await?;
        credits(sum)
    }
}

const KEY_COLUMNS: &str = "key_id, prefix, secret_hash, tenant_id, role, name, created_at, revoked_at";

fn key_row(r: sqlx::postgres::PgRow) -> PgResult<KeyRecord> {
    let role: String = r.get(4);
    Ok(KeyRecord {
        key_id: r.get(0),
        prefix: r.get(1),
        secret_hash: r.get(2),
        tenant: r.get(3),
        role: Role::parse(&role).ok_or_else(|| PgError::Amount(format!("unknown role {role}")))?,
        name: r.get(5),
        created_at: r.get(6),
        revoked_at: r.get(7),
    })
}

impl PgStore {
    pub async fn api_key_by_prefix(&self, prefix: &str) -> PgResult<Option<KeyRecord>> {
        let row = sqlx::query(AssertSqlSafe(format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE prefix = $1")))
            .bind(prefix)
            .fetch_optional(&self.pool)
            .await?;
        row.map(key_row).transpose()
    }

    pub async fn api_keys_by_prefixes(&self, prefixes: &[String]) -> PgResult<Vec<KeyRecord>> {
        let rows = sqlx::query(AssertSqlSafe(format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE prefix = ANY($1)")))
            .bind(prefixes)
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter().map(key_row).collect()
    }

    /// Inserts a key unless its idempotency key was used; returns the stored
    /// key and whether it is new. A replay with another payload returns the
    /// stored key too: the caller compares.
    pub async fn insert_api_key(&self, k: &KeyRecord, idempotency_key: Option<&str>) -> PgResult<(KeyRecord, bool)> {
        let hash = crate::service::payload_hash(&[k.tenant.as_deref().unwrap_or(""), k.role.as_str(), &k.name]);
        let inserted = sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO api_keys (key_id, prefix, secret_hash, tenant_id, role, name, idempotency_key, payload_hash) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (idempotency_key) DO NOTHING RETURNING {KEY_COLUMNS}"
        )))
        .bind(k.key_id)
        .bind(&k.prefix)
        .bind(&k.secret_hash)
        .bind(&k.tenant)
        .bind(k.role.as_str())
        .bind(&k.name)
        .bind(idempotency_key)
        .bind(&hash)
        .fetch_optional(&self.pool)
        .await?;
        if let Some(row) = inserted {
            return Ok((key_row(row)?, true));
        }
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE idempotency_key = $1 AND payload_hash = $2"
        )))
        .bind(idempotency_key)
        .bind(&hash)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(row) => Ok((key_row(row)?, false)),
            None => Err(PgError::KeyReused),
        }
    }

    pub async fn revoke_api_key(&self, key_id: Uuid) -> PgResult<Option<KeyRecord>> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, now()) WHERE key_id = $1 RETURNING {KEY_COLUMNS}"
        )))
        .bind(key_id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(key_row).transpose()
    }

    /// Keys of one tenant (`Some`), or operator keys (`None`), oldest first.
    pub async fn list_api_keys(&self, tenant: Option<&str>) -> PgResult<Vec<KeyRecord>> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE tenant_id IS NOT DISTINCT FROM $1 ORDER BY created_at, key_id"
        )))
        .bind(tenant)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(key_row).collect()
    }
}

/// The outcome of [`PgStore::create_grant`].
pub enum GrantCreated {
    /// The stored grant, the ledger row to apply to Redis if one was
    /// written, and whether the grant is new.
    Stored { grant: Box<GrantRow>, pending: Option<PendingEntry>, created: bool },
    /// The tenant's limit of grants of this category per account is reached.
    LimitReached,
}

/// A stored price book.
#[derive(Clone, Debug)]
pub struct BookRow {
    pub book_id: i64,
    pub tenant_id: Option<String>,
    pub effective_at: DateTime<Utc>,
    pub content: serde_json::Value,
    pub content_hash: String,
    pub created_at: DateTime<Utc>,
}

fn book_row(r: sqlx::postgres::PgRow) -> BookRow {
    BookRow {
        book_id: r.get(0),
        tenant_id: r.get(1),
        effective_at: r.get(2),
        content: r.get(3),
        content_hash: r.get(4),
        created_at: r.get(5),
    }
}

const BOOK_COLUMNS: &str = "book_id, tenant_id, effective_at, content, content_hash, created_at";

impl PgStore {
    pub async fn book(&self, book_id: i64) -> PgResult<Option<BookRow>> {
        let row = sqlx::query(AssertSqlSafe(format!("SELECT {BOOK_COLUMNS} FROM price_books WHERE book_id = $1")))
            .bind(book_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(book_row))
    }

    /// The book of a scope (`None`: the default catalog) in force at `at`.
    pub async fn book_in_force(&self, tenant: Option<&str>, at: DateTime<Utc>) -> PgResult<Option<BookRow>> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {BOOK_COLUMNS} FROM price_books WHERE tenant_id IS NOT DISTINCT FROM $1 AND effective_at <= $2 \
             ORDER BY effective_at DESC, book_id DESC LIMIT 1"
        )))
        .bind(tenant)
        .bind(at)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(book_row))
    }

    /// The most recent book of a scope, whatever its effective time.
    pub async fn latest_book(&self, tenant: Option<&str>) -> PgResult<Option<BookRow>> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {BOOK_COLUMNS} FROM price_books WHERE tenant_id IS NOT DISTINCT FROM $1 \
             ORDER BY effective_at DESC, book_id DESC LIMIT 1"
        )))
        .bind(tenant)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(book_row))
    }

    /// Writes a book computed by `make` from the scope's latest one, under
    /// a per-scope lock so concurrent writers compose. Returns the stored
    /// book and whether it is new (false: the idempotency key was used; the
    /// caller compares hashes). `make` returning `None` writes nothing.
    pub async fn write_book<F>(
        &self,
        tenant: Option<&str>,
        idempotency: Option<(&str, &str)>,
        effective_at: DateTime<Utc>,
        make: F,
    ) -> PgResult<Option<(BookRow, bool)>>
    where
        F: FnOnce(Option<&BookRow>) -> Option<(serde_json::Value, String)>,
    {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('creditd.prices.' || COALESCE($1, ''), 0))")
            .bind(tenant)
            .execute(&mut *tx)
            .await?;
        if let Some((key, payload_hash)) = idempotency {
            let used = sqlx::query(AssertSqlSafe(format!(
                "SELECT {BOOK_COLUMNS}, payload_hash FROM price_books \
                 WHERE tenant_id IS NOT DISTINCT FROM $1 AND idempotency_key = $2"
            )))
            .bind(tenant)
            .bind(key)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some(row) = used {
                let stored_hash: Option<String> = row.get(6);
                if stored_hash.as_deref() != Some(payload_hash) {
                    return Err(PgError::KeyReused);
                }
                return Ok(Some((book_row(row), false)));
            }
        }
        let latest = sqlx::query(AssertSqlSafe(format!(
            "SELECT {BOOK_COLUMNS} FROM price_books WHERE tenant_id IS NOT DISTINCT FROM $1 \
             ORDER BY effective_at DESC, book_id DESC LIMIT 1"
        )))
        .bind(tenant)
        .fetch_optional(&mut *tx)
        .await?
        .map(book_row);
        let Some((content, hash)) = make(latest.as_ref()) else {
            return Ok(None);
        };
        let row = sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO price_books (tenant_id, effective_at, content, content_hash, idempotency_key, payload_hash) \
             VALUES ($1, $2, $3, $4, $5, $6) RETURNING {BOOK_COLUMNS}"
        )))
        .bind(tenant)
        .bind(effective_at)
        .bind(content)
        .bind(hash)
        .bind(idempotency.map(|(k, _)| k))
        .bind(idempotency.map(|(_, h)| h))
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some((book_row(row), true)))
    }
}

/// The outcome of [`PgStore::forfeit`].
pub enum Forfeited {
    /// Done: the grant now, and the ledger row to apply (none when nothing
    /// was left or the grant was never credited).
    Done(Box<GrantRow>, Option<PendingEntry>),
    /// The grant was already voided or expired.
    NotLive,
    /// The void's idempotency key was used before, for this grant and
    /// payload or not.
    KeyUsed { grant_id: Uuid, payload_hash: String },
}

/// Why a grant's remainder leaves the balance.
pub enum Forfeit<'a> {
    Void { reason: &'a str, key: &'a str, payload_hash: &'a str },
    Expiry,
}

/// Changes to an account; `None` leaves a field as it is. `cap:
/// Some(None)` removes the cap.
#[derive(Clone, Debug, Default)]
pub struct AccountUpdate {
    pub account_id: String,
    pub pool_access: Option<bool>,
    pub cap: Option<Option<Credits>>,
    pub suspended: Option<bool>,
    pub display_name: Option<String>,
    pub tier: Option<String>,
}

async fn holds_with_events<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    tenant: &str,
    holds: &[Uuid],
) -> PgResult<Vec<Uuid>> {
    Ok(sqlx::query_scalar(
        "SELECT COALESCE(reservation_id, event_id) FROM usage_events \
         WHERE tenant_id = $1 AND (reservation_id = ANY($2) OR event_id = ANY($2))",
    )
    .bind(tenant)
    .bind(holds)
    .fetch_all(executor)
    .await?)
}

/// Σ ledger − draws of usage not yet allocated, per account (accounts
/// with neither are absent: their balance is zero).
async fn ledger_balances(tx: &mut Transaction<'_, Postgres>, tenant: &str) -> PgResult<HashMap<String, Credits>> {
    let mut balances: HashMap<String, Credits> = HashMap::new();
    let ledger: Vec<(String, Decimal)> =
        sqlx::query_as("SELECT account_id, SUM(amount) FROM ledger WHERE tenant_id = $1 GROUP BY account_id")
            .bind(tenant)
            .fetch_all(&mut **tx)
            .await?;
    for (account, sum) in ledger {
        balances.insert(account, credits(sum)?);
    }
    let draws: Vec<(String, Decimal)> = sqlx::query_as(
        "SELECT d.account, SUM(d.amount) FROM usage_events e, \
           jsonb_to_recordset(e.draws) AS d(account text, amount numeric) \
         WHERE e.tenant_id = $1 AND NOT e.allocated GROUP BY d.account",
    )
    .bind(tenant)
    .fetch_all(&mut **tx)
    .await?;
    for (account, sum) in draws {
        let entry = balances.entry(account).or_default();
        *entry = entry.checked_sub(credits(sum)?).ok_or_else(|| PgError::Amount("balance overflow".into()))?;
    }
    Ok(balances)
}

pub(crate) async fn lock_tenant_ledger(tx: &mut Transaction<'_, Postgres>, tenant: &str) -> PgResult<()> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('creditd.ledger.' || $1, 0))")
        .bind(tenant)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

pub(crate) async fn insert_entry(
    tx: &mut Transaction<'_, Postgres>,
    tenant: &str,
    account: &str,
    grant_id: Uuid,
    kind: &str,
    amount: Credits,
) -> PgResult<PendingEntry> {
    let entry_id: i64 = sqlx::query_scalar(
        "INSERT INTO ledger (tenant_id, account_id, grant_id, kind, amount, applied) \
         VALUES ($1, $2, $3, $4, $5, false) RETURNING entry_id",
    )
    .bind(tenant)
    .bind(account)
    .bind(grant_id)
    .bind(kind)
    .bind(amount.to_decimal())
    .fetch_one(&mut **tx)
    .await?;
    Ok(PendingEntry { entry_id, tenant_id: tenant.to_string(), account_id: account.to_string(), amount })
}

/// Allocates every unallocated event of the tenant (caller holds the
/// tenant's ledger lock), then lets grants with credits left pay the
/// overdrafts of their accounts. Returns how many events were allocated.
pub(crate) async fn allocate_pending(tx: &mut Transaction<'_, Postgres>, tenant: &str) -> PgResult<u64> {
    let events: Vec<(Uuid, serde_json::Value, DateTime<Utc>)> = sqlx::query_as(
        "SELECT event_id, draws, recorded_at FROM usage_events WHERE tenant_id = $1 AND NOT allocated \
         ORDER BY recorded_at, event_id LIMIT 10000",
    )
    .bind(tenant)
    .fetch_all(&mut **tx)
    .await?;
    let mut draws_by_event = Vec::with_capacity(events.len());
    let mut accounts: Vec<String> = Vec::new();
    for (event_id, draws, recorded_at) in &events {
        let parsed: Vec<(String, Credits)> = draws
            .as_array()
            .map(|list| {
                list.iter()
                    .map(|d| {
                        let account = d["account"].as_str().unwrap_or_default().to_string();
                        let amount = Credits::parse(d["amount"].as_str().unwrap_or_default())
                            .map_err(|e| PgError::Amount(format!("draw of event {event_id}: {e}")))?;
                        Ok((account, amount))
                    })
                    .collect::<PgResult<Vec<_>>>()
            })
            .transpose()?
            .unwrap_or_default();
        for (account, _) in &parsed {
            if !accounts.contains(account) {
                accounts.push(account.clone());
            }
        }
        draws_by_event.push((*event_id, parsed, *recorded_at));
    }
    // Accounts owing an overdraft also get a chance to be covered.
    let debtors: Vec<String> = sqlx::query_scalar(
        "SELECT account_id FROM ledger WHERE tenant_id = $1 AND grant_id IS NULL \
         GROUP BY account_id HAVING SUM(amount) < 0",
    )
    .bind(tenant)
    .fetch_all(&mut **tx)
    .await?;
    for d in debtors {
        if !accounts.contains(&d) {
            accounts.push(d);
        }
    }
    if accounts.is_empty() {
        return Ok(0);
    }

    // Live grants with credits left, per account, in spend order.
    let rows = sqlx::query(AssertSqlSafe(format!(
        "{GRANT_SELECT} WHERE g.tenant_id = $1 AND g.account_id = ANY($2) AND g.credited_at IS NOT NULL \
           AND g.voided_at IS NULL AND g.expired_at IS NULL"
    )))
    .bind(tenant)
    .bind(&accounts)
    .fetch_all(&mut **tx)
    .await?;
    let mut grants: HashMap<String, Vec<GrantRow>> = HashMap::new();
    for row in rows {
        let g = grant_row(row)?;
        grants.entry(g.account_id.clone()).or_default().push(g);
    }
    for list in grants.values_mut() {
        list.sort_by(|a, b| a.spend_key().cmp_spend(&b.spend_key()));
    }

    let mut entries: Vec<serde_json::Value> = Vec::new();
    let entry = |account: &str, grant: Option<Uuid>, event: Option<Uuid>, kind: &str, amount: i64| {
        serde_json::json!({
            "account_id": account, "grant_id": grant, "event_id": event, "kind": kind,
            "amount": Credits::from_micros(amount).to_string(),
        })
    };
    // What each account newly owes: usage no grant covered.
    let mut new_debt: HashMap<String, i64> = HashMap::new();
    for (event_id, draws, recorded_at) in &draws_by_event {
        for (account, amount) in draws {
            if amount.micros() == 0 {
                continue;
            }
            let list = grants.entry(account.clone()).or_default();
            // Only grants already credited when the usage happened pay for
            // it; a later grant pays what is left as an overdraft.
            let remaining: Vec<i64> = list
                .iter()
                .map(|g| if g.credited_at.is_some_and(|c| c <= *recorded_at) { g.remaining.micros() } else { 0 })
                .collect();
            let (taken, uncovered) = allocate(amount.micros(), &remaining);
            for (g, take) in list.iter_mut().zip(taken) {
                if take > 0 {
                    g.remaining = Credits::from_micros(g.remaining.micros() - take);
                    entries.push(entry(account, Some(g.grant_id), Some(*event_id), "usage", -take));
                }
            }
            if uncovered > 0 {
                entries.push(entry(account, None, Some(*event_id), "usage", -uncovered));
                *new_debt.entry(account.clone()).or_default() += uncovered;
            }
        }
    }
    // Overdrafts (older ones, and the ones just found) are paid by grants
    // with credits left.
    let owed: Vec<(String, Decimal)> = sqlx::query_as(
        "SELECT account_id, -SUM(amount) FROM ledger WHERE tenant_id = $1 AND grant_id IS NULL \
           AND account_id = ANY($2) GROUP BY account_id",
    )
    .bind(tenant)
    .bind(&accounts)
    .fetch_all(&mut **tx)
    .await?;
    let mut owed: HashMap<String, i64> =
        owed.into_iter().map(|(a, s)| Ok((a, credits(s)?.micros()))).collect::<PgResult<_>>()?;
    for (account, debt) in new_debt {
        *owed.entry(account).or_default() += debt;
    }
    for (account, debt) in owed {
        if debt <= 0 {
            continue;
        }
        let Some(list) = grants.get_mut(&account) else { continue };
        let remaining: Vec<i64> = list.iter().map(|g| g.remaining.micros()).collect();
        let (taken, _) = allocate(debt, &remaining);
        for (g, take) in list.iter_mut().zip(taken) {
            if take > 0 {
                g.remaining = Credits::from_micros(g.remaining.micros() - take);
                entries.push(entry(&account, Some(g.grant_id), None, "cover", -take));
                entries.push(entry(&account, None, None, "cover", take));
            }
        }
    }

    if !entries.is_empty() {
        sqlx::query(
            "INSERT INTO ledger (tenant_id, account_id, grant_id, event_id, kind, amount, applied) \
             SELECT $1, account_id, grant_id, event_id, kind, amount, true \
             FROM jsonb_to_recordset($2) AS r(account_id text, grant_id uuid, event_id uuid, kind text, amount numeric)",
        )
        .bind(tenant)
        .bind(serde_json::Value::Array(entries))
        .execute(&mut **tx)
        .await?;
    }
    let ids: Vec<Uuid> = events.iter().map(|(id, _, _)| *id).collect();
    if !ids.is_empty() {
        sqlx::query("UPDATE usage_events SET allocated = true WHERE event_id = ANY($1)")
            .bind(&ids)
            .execute(&mut **tx)
            .await?;
    }
    Ok(ids.len() as u64)
}

/// A usage event's draws as stored: `[{"account": id, "amount": "1.5"}]`.
fn draws_json(draws: &[(String, Credits)]) -> String {
    let list: Vec<serde_json::Value> =
        draws.iter().map(|(a, c)| serde_json::json!({"account": a, "amount": c.to_string()})).collect();
    serde_json::Value::Array(list).to_string()
}

pub(crate) fn account_row(r: sqlx::postgres::PgRow) -> PgResult<AccountRow> {
    let cap: Option<Decimal> = r.get(5);
    Ok(AccountRow {
        account_id: r.get(0),
        parent_id: r.get(1),
        kind: r.get(2),
        display_name: r.get(3),
        pool_access: r.get(4),
        cap: cap.map(credits).transpose()?,
        suspended: r.get(6),
        depth: r.get(7),
        created_at: r.get(8),
        period: r.get::<Option<String>, _>(9).map(|kind| PeriodSpec {
            kind,
            anchor: r.get(10),
            time_zone: r.get(11),
            trial_end: r.get(12),
        }),
        tier: r.get(13),
        period_start: r.get(14),
        period_end: r.get(15),
    })
}

pub(crate) fn grant_row(r: sqlx::postgres::PgRow) -> PgResult<GrantRow> {
    let category: String = r.get(3);
    Ok(GrantRow {
        grant_id: r.get(0),
        account_id: r.get(1),
        amount: credits(r.get(2))?,
        category: Category::parse(&category).ok_or_else(|| PgError::Amount(format!("unknown category {category}")))?,
        priority: r.get(4),
        effective_at: r.get(5),
        expires_at: r.get(6),
        description: r.get(7),
        payload_hash: r.get(8),
        credited_at: r.get(9),
        voided_at: r.get(10),
        void_reason: r.get(11),
        void_hash: r.get(12),
        expired_at: r.get(13),
        created_at: r.get(14),
        reason: r.get(15),
        actor: r.get(16),
        allowance_id: r.get(17),
        used: credits(r.get(18))?,
        forfeited: credits(r.get(19))?,
        remaining: credits(r.get(20))?,
    })
}

fn event_row(r: sqlx::postgres::PgRow) -> PgResult<EventRow> {
    Ok(EventRow {
        event_id: r.get(0),
        account_id: r.get(1),
        reservation_id: r.get(2),
        payload_hash: r.get(3),
        amount: credits(r.get(4))?,
        held: credits(r.get(5))?,
        overdraft: credits(r.get(6))?,
        recorded_at: r.get(7),
        price_version: r.get(8),
        line_items: r.get(9),
    })
}
