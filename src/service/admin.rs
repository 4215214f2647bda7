//! Administration: tenants, the account tree, grants and voids.
//!
//! PostgreSQL is written first; Redis follows (account settings, ledger
//! rows applied exactly once through markers). If Redis is unreachable the
//! change is still durable and the ledger job applies it later.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use uuid::Uuid;

use super::{Engine, payload_hash};
use crate::{
    domain::{Credits, grant::Category, limit::CommitLimit, money::MAX_BALANCE},
    error::{Error, Reason, Result},
    service::policy::rule_of,
    store::{
        alerts::AlertPolicy,
        hot::AccountSettings,
        pg::{
            AccountRow, AccountUpdate, Forfeit, Forfeited, GrantCreated, GrantRow, PendingEntry, PeriodSpec, TenantRow,
        },
    },
};

pub struct NewTenant {
    pub tenant_id: String,
    pub display_name: String,
    pub credit_value: Decimal,
    pub currency: String,
    pub time_zone: String,
    /// `None`: calendar months in `time_zone`.
    pub period: Option<PeriodSpec>,
    pub grant_limits: BTreeMap<String, i32>,
    pub commit_limit: CommitLimit,
}

pub struct NewAccount {
    pub account_id: String,
    pub parent_id: Option<String>,
    pub kind: String,
    pub display_name: String,
    pub pool_access: bool,
    pub cap: Option<Credits>,
    /// `None`: the tenant's default period.
    pub period: Option<PeriodSpec>,
    pub tier: String,
}

/// When a new grant expires.
pub enum GrantExpiry {
    Never,
    At(DateTime<Utc>),
    /// At the end of the account's current billing period.
    PeriodEnd,
}

pub struct NewGrant {
    pub account_id: String,
    pub amount: Credits,
    pub category: Category,
    pub priority: Option<i32>,
    pub effective_at: Option<DateTime<Utc>>,
    pub expiry: GrantExpiry,
    pub description: String,
    pub reason: String,
    pub actor: String,
    pub idempotency_key: String,
}

pub struct VoidInput {
    pub grant_id: Uuid,
    pub reason: String,
    pub idempotency_key: String,
}

/// A page of accounts.
pub struct AccountPage {
    pub accounts: Vec<AccountRow>,
    pub next_page_token: String,
}

impl Engine {
    pub async fn create_tenant(&self, t: NewTenant) -> Result<TenantRow> {
        let period =
            t.period.unwrap_or(PeriodSpec { kind: "month".into(), anchor: None, time_zone: None, trial_end: None });
        rule_of(&period, &t.time_zone).map_err(|e| Error::invalid("default_period", Reason::InvalidPeriod, e))?;
        let wanted = TenantRow {
            tenant_id: t.tenant_id,
            display_name: t.display_name,
            credit_value: t.credit_value,
            currency: t.currency,
            time_zone: t.time_zone,
            created_at: Utc::now(),
            period,
            grant_limits: t.grant_limits,
            commit_limit: t.commit_limit,
        };
        // The hot state of a new tenant is empty: mark it loaded before the
        // tenant becomes visible, so no replica ever sees it unloaded. An
        // existing tenant's state is left alone (if Redis lost it, only a
        // rebuild may restore it).
        let exists = self.pg.tenant(&wanted.tenant_id).await?.is_some();
        let fence = if exists {
            (String::new(), String::new())
        } else {
            self.hot.init_tenant(&wanted.tenant_id).await.map_err(|e| self.hot_error(e))?
        };
        let (stored, created) = self.pg.create_tenant(&wanted, (&fence.0, &fence.1)).await?;
        let same = stored.display_name == wanted.display_name
            && stored.credit_value == wanted.credit_value
            && stored.currency == wanted.currency
            && stored.time_zone == wanted.time_zone
            && stored.period == wanted.period
            && stored.grant_limits == wanted.grant_limits
            && stored.commit_limit == wanted.commit_limit;
        if !created && !same {
            return Err(Error::AlreadyExists(
                Reason::TenantExists,
                format!("tenant {} exists with other settings", stored.tenant_id),
            ));
        }
        self.tenants.insert(&stored.tenant_id, stored.commit_limit);
        if created {
            tracing::info!(tenant = %stored.tenant_id, "tenant created");
        }
        Ok(stored)
    }

    pub async fn get_tenant(&self, tenant_id: &str) -> Result<TenantRow> {
        self.pg
            .tenant(tenant_id)
            .await?
            .ok_or_else(|| Error::NotFound(Reason::TenantNotFound, format!("tenant {tenant_id} not found")))
    }

    pub async fn create_account(&self, tenant: &str, a: NewAccount, max_depth: u32) -> Result<AccountRow> {
        self.require_tenant(tenant).await?;
        let tenant_row = self.get_tenant(tenant).await?;
        let spec = a.period.clone().unwrap_or_else(|| tenant_row.period.clone());
        let rule =
            rule_of(&spec, &tenant_row.time_zone).map_err(|e| Error::invalid("period", Reason::InvalidPeriod, e))?;
        let period = self.current_period_of(&rule);
        if let Some(parent) = &a.parent_id {
            let parent_row = self.pg.account(tenant, parent).await?.ok_or_else(|| parent_missing(parent))?;
            if parent_row.depth as u32 >= max_depth {
                return Err(Error::invalid(
                    "parent_id",
                    Reason::TreeTooDeep,
                    format!("would make the tree deeper than {max_depth} levels"),
                ));
            }
        }
        let wanted = AccountRow {
            account_id: a.account_id,
            parent_id: a.parent_id,
            kind: a.kind,
            display_name: a.display_name,
            pool_access: a.pool_access,
            cap: a.cap,
            suspended: false,
            depth: 0,
            created_at: Utc::now(),
            period: a.period,
            tier: a.tier,
            period_start: Some(period.start),
            period_end: period.end,
        };
        let (stored, created) = self
            .pg
            .create_account(tenant, &wanted)
            .await?
            .ok_or_else(|| parent_missing(wanted.parent_id.as_deref().unwrap_or_default()))?;
        let same = stored.parent_id == wanted.parent_id
            && stored.kind == wanted.kind
            && stored.display_name == wanted.display_name
            && stored.pool_access == wanted.pool_access
            && stored.cap == wanted.cap
            && stored.period == wanted.period
            && stored.tier == wanted.tier;
        if !created && !same {
            return Err(Error::AlreadyExists(
                Reason::AccountExists,
                format!("account {} exists with other settings", stored.account_id),
            ));
        }
        self.put_hot_account(tenant, &stored).await?;
        Ok(stored)
    }

    pub async fn update_account(&self, tenant: &str, update: AccountUpdate) -> Result<AccountRow> {
        self.require_tenant(tenant).await?;
        let stored = self.pg.update_account(tenant, &update).await?.ok_or_else(|| {
            Error::NotFound(Reason::AccountNotFound, format!("account {} not found", update.account_id))
        })?;
        self.put_hot_account(tenant, &stored).await?;
        Ok(stored)
    }

    pub async fn get_account(&self, tenant: &str, account_id: &str) -> Result<AccountRow> {
        self.pg.account(tenant, account_id).await?.ok_or_else(|| account_missing(account_id))
    }

    pub async fn list_accounts(
        &self,
        tenant: &str,
        parent: Option<&str>,
        page_size: i64,
        page_token: &str,
    ) -> Result<AccountPage> {
        let mut accounts = self.pg.list_accounts(tenant, parent, page_token, page_size + 1).await?;
        let next_page_token = if accounts.len() as i64 > page_size {
            accounts.truncate(page_size as usize);
            accounts.last().map(|a| a.account_id.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(AccountPage { accounts, next_page_token })
    }

    pub async fn create_grant(&self, tenant: &str, g: NewGrant) -> Result<GrantRow> {
        self.require_tenant(tenant).await?;
        let priority = g.priority.unwrap_or_else(|| g.category.default_priority());
        let hash = payload_hash(&[
            "grant",
            &g.account_id,
            &g.amount.to_string(),
            g.category.as_str(),
            &priority.to_string(),
            &g.effective_at.map(|t| t.to_rfc3339()).unwrap_or_default(),
            &match g.expiry {
                GrantExpiry::Never => String::new(),
                GrantExpiry::At(t) => t.to_rfc3339(),
                GrantExpiry::PeriodEnd => "period-end".into(),
            },
            &g.description,
            &g.reason,
            &g.actor,
        ]);
        // A replay is answered before any check that time may have changed.
        if let Some(existing) = self.pg.grant_by_key(tenant, &g.idempotency_key).await? {
            if existing.payload_hash != hash {
                return Err(crate::store::hot::HotError::KeyReused.into());
            }
            return Ok(existing);
        }
        let account = self.pg.account(tenant, &g.account_id).await?.ok_or_else(|| account_missing(&g.account_id))?;
        let now = self.clock.now();
        let effective_at = g.effective_at.unwrap_or(now);
        let expires_at = match g.expiry {
            GrantExpiry::Never => None,
            GrantExpiry::At(t) => Some(t),
            GrantExpiry::PeriodEnd => Some(account.period_end.ok_or_else(|| {
                Error::invalid("expire_at_period_end", Reason::InvalidArgument, "the account's period never ends")
            })?),
        };
        if let Some(expires_at) = expires_at
            && expires_at <= effective_at
        {
            return Err(Error::invalid("expires_at", Reason::InvalidArgument, "must be after effective_at"));
        }
        let limit = self.get_tenant(tenant).await?.grant_limits.get(g.category.as_str()).copied();
        let balance = self.pg.ledger_balance(tenant, &g.account_id).await?;
        if balance.checked_add(g.amount).is_none_or(|b| b > MAX_BALANCE) {
            return Err(Error::invalid(
                "amount",
                Reason::BalanceLimit,
                format!("would raise the account's credits above {MAX_BALANCE}"),
            ));
        }
        let wanted = GrantRow {
            grant_id: Uuid::now_v7(),
            account_id: g.account_id,
            amount: g.amount,
            category: g.category,
            priority,
            effective_at,
            expires_at,
            description: g.description,
            reason: g.reason,
            actor: g.actor,
            allowance_id: None,
            payload_hash: hash.clone(),
            credited_at: None,
            voided_at: None,
            void_reason: None,
            void_hash: None,
            expired_at: None,
            created_at: Utc::now(),
            used: Credits::ZERO,
            forfeited: Credits::ZERO,
            remaining: Credits::ZERO,
        };
        let (stored, pending, created) =
            match self.pg.create_grant(tenant, &wanted, &g.idempotency_key, now, limit).await? {
                GrantCreated::Stored { grant, pending, created } => (*grant, pending, created),
                GrantCreated::LimitReached => {
                    return Err(Error::FailedPrecondition(
                        Reason::GrantLimitReached,
                        format!(
                            "account {} already has the most {} grants the tenant allows ({})",
                            wanted.account_id,
                            wanted.category.as_str(),
                            limit.unwrap_or_default()
                        ),
                    ));
                }
            };
        if !created && stored.payload_hash != hash {
            return Err(crate::store::hot::HotError::KeyReused.into());
        }
        if let Some(entry) = pending {
            self.apply_entry(&entry).await;
        }
        if created {
            tracing::info!(tenant, grant = %stored.grant_id, account = %stored.account_id, amount = %stored.amount, "grant created");
        }
        Ok(stored)
    }

    pub async fn void_grant(&self, tenant: &str, v: VoidInput) -> Result<GrantRow> {
        self.require_tenant(tenant).await?;
        let hash = payload_hash(&["void", &v.grant_id.to_string(), &v.reason]);
        self.pg.grant(tenant, v.grant_id).await?.ok_or_else(|| grant_missing(v.grant_id))?;
        let forfeit = Forfeit::Void { reason: &v.reason, key: &v.idempotency_key, payload_hash: &hash };
        match self.pg.forfeit(tenant, v.grant_id, forfeit).await? {
            Forfeited::Done(grant, pending) => {
                if let Some(entry) = pending {
                    self.apply_entry(&entry).await;
                }
                tracing::info!(tenant, grant = %grant.grant_id, forfeited = %grant.forfeited, "grant voided");
                Ok(*grant)
            }
            Forfeited::KeyUsed { grant_id, payload_hash } if grant_id == v.grant_id && payload_hash == hash => {
                self.pg.grant(tenant, grant_id).await?.ok_or_else(|| grant_missing(grant_id))
            }
            Forfeited::KeyUsed { .. } => Err(crate::store::hot::HotError::KeyReused.into()),
            Forfeited::NotLive => Err(Error::FailedPrecondition(
                Reason::GrantNotLive,
                format!("grant {} is already voided or expired", v.grant_id),
            )),
        }
    }

    pub async fn get_grant(&self, tenant: &str, grant_id: Uuid) -> Result<GrantRow> {
        self.pg.allocate(tenant).await?;
        self.pg.grant(tenant, grant_id).await?.ok_or_else(|| grant_missing(grant_id))
    }

    pub async fn list_grants(&self, tenant: &str, account_id: &str, include_inactive: bool) -> Result<Vec<GrantRow>> {
        self.pg.account(tenant, account_id).await?.ok_or_else(|| account_missing(account_id))?;
        self.pg.allocate(tenant).await?;
        Ok(self.pg.grants_of(tenant, account_id, include_inactive).await?)
    }

    /// Applies a ledger row to the hot balance and marks it applied. A
    /// failure is logged; the ledger job retries it.
    pub async fn apply_entry(&self, entry: &PendingEntry) {
        let apply = || self.hot.apply_ledger(&entry.tenant_id, &entry.account_id, entry.entry_id, entry.amount);
        match self.confirmed(&entry.tenant_id, apply).await {
            Ok(_) => {
                if let Err(e) = self.pg.mark_applied(&[entry.entry_id]).await {
                    tracing::warn!(error = %e, entry = entry.entry_id, "ledger row applied but not marked; will be skipped by its marker");
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, entry = entry.entry_id, tenant = %entry.tenant_id, "ledger row not applied to redis yet");
            }
        }
    }

    pub(crate) async fn put_hot_account(&self, tenant: &str, row: &AccountRow) -> Result<()> {
        let has_allowance = self.pg.has_live_allowance(tenant, &row.account_id).await?;
        let alerts = self.pg.alert_policy(tenant, Some(&row.account_id)).await?;
        let settings = hot_settings(row, has_allowance, &alerts);
        let put = || async { Ok(((), self.hot.put_account(tenant, &row.account_id, &settings).await?)) };
        self.confirmed(tenant, put).await
    }
}

/// The Redis settings of an account.
pub fn hot_settings(row: &AccountRow, has_allowance: bool, alerts: &AlertPolicy) -> AccountSettings {
    AccountSettings {
        parent_id: row.parent_id.clone(),
        pool_access: row.pool_access,
        cap: row.cap,
        suspended: row.suspended,
        period_end: row.period_end,
        renews_at: if has_allowance { row.period_end } else { None },
        alert_thresholds: alerts.hot_spec(),
        rearm_on_topup: alerts.rearm_on_topup,
    }
}

fn account_missing(account_id: &str) -> Error {
    Error::NotFound(Reason::AccountNotFound, format!("account {account_id} not found"))
}

fn parent_missing(parent: &str) -> Error {
    Error::NotFound(Reason::ParentNotFound, format!("parent account {parent} not found"))
}

fn grant_missing(grant_id: Uuid) -> Error {
    Error::NotFound(Reason::GrantNotFound, format!("grant {grant_id} not found"))
}
