//! Credit policies: billing periods and their boundaries, recurring
//! allowances, adjustments and refunds, account change requests.

use std::sync::{
    Arc,
    atomic::{AtomicI64, Ordering},
};

use chrono::{DateTime, TimeZone, Utc};
use uuid::Uuid;

use super::{Engine, payload_hash};
use crate::{
    domain::{
        Credits,
        grant::Category,
        period::{Period, PeriodRule},
    },
    error::{Error, Reason, Result},
    store::{
        hot::HotError,
        pg::{AccountRow, AccountUpdate, PeriodSpec, TenantRow},
        policy::{Adjusted, AllowanceRow, Boundary, ChangeRow, Debit},
    },
};

/// The service's notion of "now". Production reads the system clock; tests
/// move it forward to cross period boundaries without sleeping. Holds
/// still expire on the Redis clock.
#[derive(Clone, Default)]
pub struct Clock {
    offset_ms: Arc<AtomicI64>,
}

impl Clock {
    pub fn now(&self) -> DateTime<Utc> {
        Utc::now() + chrono::Duration::milliseconds(self.offset_ms.load(Ordering::Relaxed))
    }

    /// Moves "now" forward (tests).
    pub fn advance(&self, by: chrono::Duration) {
        self.offset_ms.fetch_add(by.num_milliseconds(), Ordering::Relaxed);
    }
}

/// The rule of a stored period spec; `tenant_zone` when it names none. A
/// missing anchor means calendar periods (the 1st, January 1st, 00:00).
pub fn rule_of(spec: &PeriodSpec, tenant_zone: &str) -> std::result::Result<PeriodRule, String> {
    let zone = spec.time_zone.as_deref().unwrap_or(tenant_zone);
    let anchor = match spec.anchor {
        Some(anchor) => anchor,
        None => {
            let tz: chrono_tz::Tz = zone.parse().map_err(|_| format!("{zone:?} is not an IANA time zone"))?;
            tz.with_ymd_and_hms(2000, 1, 1, 0, 0, 0)
                .earliest()
                .map(|t| t.with_timezone(&Utc))
                .ok_or_else(|| "no calendar anchor in this time zone".to_string())?
        }
    };
    PeriodRule::parse(&spec.kind, anchor, zone, spec.trial_end).map_err(|e| e.to_string())
}

/// A change of an account's settings, requested and decided later.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct RequestedChange {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool_access: Option<bool>,
    /// `Some("")` removes the cap.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cap: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
}

pub struct NewAllowance {
    pub account_id: String,
    pub amount: Credits,
    pub category: Category,
    pub priority: Option<i32>,
    /// "none" | "all" | "up_to".
    pub rollover: &'static str,
    pub rollover_max: Option<Credits>,
    pub description: String,
    pub idempotency_key: String,
}

impl Engine {
    /// The period rule in force for an account.
    pub fn account_rule(&self, tenant: &TenantRow, account: &AccountRow) -> Result<PeriodRule> {
        let spec = account.period.as_ref().unwrap_or(&tenant.period);
        rule_of(spec, &tenant.time_zone).map_err(|e| Error::internal(format!("stored period is invalid: {e}")))
    }

    /// The current period of an account, for a new account or a changed rule.
    pub fn current_period_of(&self, rule: &PeriodRule) -> Period {
        rule.containing(self.clock.now())
    }

    /// One pass of the period job: every due boundary (catching up on
    /// missed ones, one boundary per account per step) and every boundary
    /// not yet in Redis.
    pub async fn period_pass(&self) -> Result<u64> {
        let mut done = 0;
        loop {
            let now = self.clock.now();
            let due = self.pg.accounts_due(now, 200).await?;
            if due.is_empty() {
                return Ok(done);
            }
            let mut progressed = false;
            for (tenant, account, boundary_due) in due {
                if boundary_due {
                    if let Some(b) = self.cross_boundary(&tenant, &account, now).await? {
                        done += 1;
                        progressed = true;
                        self.sync_boundary(&b).await;
                    }
                } else if self.sync_hot_period(&tenant, &account).await.is_ok() {
                    progressed = true;
                }
            }
            if !progressed {
                return Ok(done);
            }
        }
    }

    async fn cross_boundary(&self, tenant: &str, account: &str, now: DateTime<Utc>) -> Result<Option<Boundary>> {
        let tenant_row =
            self.pg.tenant(tenant).await?.ok_or_else(|| Error::internal(format!("tenant {tenant} vanished")))?;
        let engine = self.clone();
        let boundary = self
            .pg
            .advance_period(tenant, account, now, move |acct, at| {
                let rule = engine.account_rule(&tenant_row, acct).ok()?;
                Some(rule.containing(at))
            })
            .await?;
        if let Some(b) = &boundary {
            tracing::info!(
                tenant, account, start = %b.new_period.start, end = ?b.new_period.end, grants = b.entries.len(),
                "billing period started"
            );
        }
        Ok(boundary)
    }

    /// Applies a boundary's ledger rows and period to Redis; a failure is
    /// retried by the next pass (the account stays unsynced).
    async fn sync_boundary(&self, b: &Boundary) {
        for entry in &b.entries {
            self.apply_entry(entry).await;
        }
        if let Err(e) = self.sync_hot_period(&b.tenant_id, &b.account_id).await {
            tracing::warn!(error = %e, tenant = %b.tenant_id, account = %b.account_id, "period not in redis yet");
        }
    }

    /// Brings an account's hot period (cap usage, period end, renewal) in
    /// line with PostgreSQL.
    async fn sync_hot_period(&self, tenant: &str, account: &str) -> Result<()> {
        let row = self.pg.account(tenant, account).await?.ok_or_else(|| Error::internal("account vanished"))?;
        let start = row.period_start.unwrap_or(row.created_at);
        let used = self.pg.subtree_usage_since(tenant, account, start).await?;
        let renews = if self.pg.has_live_allowance(tenant, account).await? { row.period_end } else { None };
        self.confirmed(tenant, || self.hot.new_period(tenant, account, used, row.period_end, renews)).await?;
        self.pg.mark_period_synced(tenant, account).await?;
        Ok(())
    }

    // ---- allowances ------------------------------------------------------

    pub async fn create_allowance(&self, tenant: &str, a: NewAllowance) -> Result<(AllowanceRow, bool)> {
        self.require_tenant(tenant).await?;
        let priority = a.priority.unwrap_or_else(|| a.category.default_priority());
        let hash = payload_hash(&[
            "allowance",
            &a.account_id,
            &a.amount.to_string(),
            a.category.as_str(),
            &priority.to_string(),
            a.rollover,
            &a.rollover_max.map(|m| m.to_string()).unwrap_or_default(),
            &a.description,
        ]);
        let tenant_row = self.get_tenant(tenant).await?;
        let account = self.get_account(tenant, &a.account_id).await?;
        let period = self.current_period_of(&self.account_rule(&tenant_row, &account)?);
        let row = AllowanceRow {
            allowance_id: Uuid::now_v7(),
            account_id: a.account_id.clone(),
            amount: a.amount,
            category: a.category.as_str().to_string(),
            priority,
            rollover: a.rollover.to_string(),
            rollover_max: a.rollover_max,
            description: a.description,
            payload_hash: hash.clone(),
            created_at: Utc::now(),
            ended_at: None,
        };
        let (stored, pending, created) =
            self.pg.create_allowance(tenant, &row, &a.idempotency_key, &period, self.clock.now()).await?;
        if !created && stored.payload_hash != hash {
            return Err(HotError::KeyReused.into());
        }
        if let Some(entry) = pending {
            self.apply_entry(&entry).await;
        }
        if created {
            // The account now renews an allowance: denials can say when.
            self.put_hot_account(tenant, &account).await?;
        }
        Ok((stored, created))
    }

    pub async fn list_allowances(&self, tenant: &str, account: &str) -> Result<Vec<AllowanceRow>> {
        self.get_account(tenant, account).await?;
        Ok(self.pg.allowances_of(tenant, account).await?)
    }

    pub async fn end_allowance(&self, tenant: &str, id: Uuid) -> Result<AllowanceRow> {
        let row = self
            .pg
            .end_allowance(tenant, id, self.clock.now())
            .await?
            .ok_or_else(|| Error::NotFound(Reason::AllowanceNotFound, format!("allowance {id} not found")))?;
        let account = self.get_account(tenant, &row.account_id).await?;
        self.put_hot_account(tenant, &account).await?;
        Ok(row)
    }

    // ---- adjustments -----------------------------------------------------

    /// A negative adjustment; returns the account's hot balance after it.
    pub async fn debit(
        &self,
        tenant: &str,
        account: &str,
        amount: Credits,
        reason: &str,
        actor: &str,
        idempotency_key: &str,
    ) -> Result<(Credits, bool)> {
        self.require_tenant(tenant).await?;
        self.get_account(tenant, account).await?;
        // A credit's key is its grant's (AdjustBalance with a positive
        // amount): the same key for a debit is another payload.
        if self.pg.grant_by_key(tenant, idempotency_key).await?.is_some() {
            return Err(HotError::KeyReused.into());
        }
        let hash = payload_hash(&["debit", account, &amount.to_string(), reason, actor]);
        let debit = Debit { amount, reason, actor, idem_key: idempotency_key, payload_hash: &hash };
        match self.pg.debit_adjustment(tenant, account, &debit).await? {
            Adjusted::KeyReused => Err(HotError::KeyReused.into()),
            Adjusted::Done { entries, created, .. } => {
                for entry in &entries {
                    self.apply_entry(entry).await;
                }
                if created {
                    tracing::info!(tenant, account, amount = %amount, actor, reason, "credits removed by adjustment");
                }
                Ok((self.own_balance(tenant, account).await?, created))
            }
        }
    }

    /// An account's own hot balance.
    pub async fn own_balance(&self, tenant: &str, account: &str) -> Result<Credits> {
        let view = self.fenced(tenant, || self.hot.balance(tenant, account)).await.map_err(|e| self.hot_error(e))?;
        Ok(view.levels.first().map(|l| l.balance).unwrap_or_default())
    }

    // ---- account change requests ------------------------------------------

    pub async fn request_change(
        &self,
        tenant: &str,
        account: &str,
        change: &RequestedChange,
        note: &str,
        idempotency_key: &str,
    ) -> Result<(ChangeRow, bool)> {
        self.require_tenant(tenant).await?;
        self.get_account(tenant, account).await?;
        let requested = serde_json::to_value(change).map_err(|e| Error::internal(e.to_string()))?;
        let hash = payload_hash(&["change", account, &requested.to_string(), note]);
        let (row, created) = self.pg.request_change(tenant, account, &requested, note, idempotency_key, &hash).await?;
        if !created && row.payload_hash != hash {
            return Err(HotError::KeyReused.into());
        }
        Ok((row, created))
    }

    pub async fn decide_change(&self, tenant: &str, id: Uuid, approve: bool, note: &str) -> Result<ChangeRow> {
        let current = self
            .pg
            .change(tenant, id)
            .await?
            .ok_or_else(|| Error::NotFound(Reason::ChangeNotFound, format!("change {id} not found")))?;
        if current.status != "pending" {
            return Err(Error::FailedPrecondition(
                Reason::ChangeDecided,
                format!("change {id} is already {}", current.status),
            ));
        }
        let requested: RequestedChange =
            serde_json::from_value(current.requested.clone()).map_err(|e| Error::internal(e.to_string()))?;
        if approve {
            let cap = match &requested.cap {
                None => None,
                Some(text) if text.is_empty() => Some(None),
                Some(text) => {
                    Some(Some(Credits::parse_stored(text).map_err(|e| Error::internal(format!("stored cap: {e}")))?))
                }
            };
            self.update_account(
                tenant,
                AccountUpdate {
                    account_id: current.account_id.clone(),
                    pool_access: requested.pool_access,
                    cap,
                    suspended: None,
                    display_name: None,
                    tier: requested.tier.clone(),
                },
            )
            .await?;
        }
        let decided = self.pg.decide_change(tenant, id, approve, note).await?.ok_or_else(|| {
            Error::FailedPrecondition(Reason::ChangeDecided, format!("change {id} was decided meanwhile"))
        })?;
        tracing::info!(tenant, change = %id, approve, account = %decided.account_id, "account change decided");
        Ok(decided)
    }
}

impl Engine {
    /// Sets alert thresholds for the tenant (`account` None) or one account,
    /// and pushes them to the hot state of every account they now govern.
    pub async fn set_alert_policy(
        &self,
        tenant: &str,
        account: Option<&str>,
        policy: &crate::store::alerts::AlertPolicy,
    ) -> Result<()> {
        self.require_tenant(tenant).await?;
        if let Some(a) = account {
            self.get_account(tenant, a).await?;
        }
        self.pg.set_alert_policy(tenant, account, policy).await?;
        match account {
            Some(a) => {
                let row = self.get_account(tenant, a).await?;
                self.put_hot_account(tenant, &row).await?;
            }
            None => {
                let mut after = String::new();
                loop {
                    let page = self.pg.list_accounts(tenant, None, &after, 500).await?;
                    for row in &page {
                        self.put_hot_account(tenant, row).await?;
                    }
                    match page.last() {
                        Some(last) if page.len() == 500 => after = last.account_id.clone(),
                        _ => break,
                    }
                }
            }
        }
        Ok(())
    }
}
