//! `creditd.v1.AdminService`.

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use tonic::{Request, Response, Status};

use super::{
    caller::{Need, authenticated, caller, tenant},
    convert::{self, Sign},
};
use crate::{
    auth::Role,
    domain::{Credits, grant::Category},
    error::{Error, Reason},
    pb::{self, admin_service_server::AdminService},
    service::{
        Engine,
        admin::{GrantExpiry, NewAccount, NewGrant, NewTenant, VoidInput},
        policy::{NewAllowance, RequestedChange},
    },
    store::pg::AccountUpdate,
};

pub struct AdminApi {
    pub engine: Engine,
    pub max_depth: u32,
}

impl AdminApi {
    async fn tenant<T>(&self, request: &Request<T>) -> Result<String, Status> {
        Ok(tenant(&self.engine, request, Need::Admin).await?)
    }
}

fn grant_limits(map: std::collections::HashMap<String, i32>) -> Result<BTreeMap<String, i32>, Error> {
    for (category, limit) in &map {
        if Category::parse(category).is_none() {
            return Err(Error::invalid(
                format!("grant_limits[{category:?}]"),
                Reason::InvalidArgument,
                "is not a category",
            ));
        }
        if *limit < 0 {
            return Err(Error::invalid(
                format!("grant_limits[{category:?}]"),
                Reason::InvalidArgument,
                "must not be negative",
            ));
        }
    }
    Ok(map.into_iter().collect())
}

/// Bounds of free-text fields (characters), as documented in admin.proto.
const TIER_MAX: usize = 64;
const NAME_MAX: usize = 256;
const TEXT_MAX: usize = 512;
const KEY_NAME_MAX: usize = 128;

fn tier(value: String) -> Result<String, Error> {
    convert::text("tier", value, TIER_MAX)
}

fn short_text(field: &'static str, value: String) -> Result<String, Error> {
    convert::text(field, value, TEXT_MAX)
}

fn required_text(field: &'static str, value: String) -> Result<String, Error> {
    convert::required_text(field, value, TEXT_MAX)
}

fn text_or(value: String, default: &str) -> String {
    if value.is_empty() { default.to_string() } else { value }
}

#[tonic::async_trait]
impl AdminService for AdminApi {
    async fn create_tenant(&self, request: Request<pb::CreateTenantRequest>) -> Result<Response<pb::Tenant>, Status> {
        caller(&self.engine, &request, Need::Operator).await?;
        let r = request.into_inner();
        let tenant_id = convert::tenant_id("tenant_id", &r.tenant_id)?;
        let credit_value_text = text_or(r.credit_value, "1");
        let credit_value = convert::amount("credit_value", &credit_value_text, Sign::Positive)?;
        let currency = text_or(r.currency, "USD");
        if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(Error::invalid("currency", Reason::InvalidArgument, "must be an ISO 4217 code like USD").into());
        }
        let time_zone = text_or(r.time_zone, "UTC");
        convert::time_zone("time_zone", &time_zone, Reason::InvalidArgument)?;
        let display_name = convert::text("display_name", r.display_name, NAME_MAX)?;
        let tenant = self
            .engine
            .create_tenant(NewTenant {
                tenant_id,
                display_name,
                credit_value: Decimal::from(credit_value.micros()) / Decimal::from(1_000_000),
                currency,
                time_zone,
                period: convert::period_spec("default_period", r.default_period)?,
                grant_limits: grant_limits(r.grant_limits)?,
                commit_limit: convert::commit_limit("commit_limit", r.commit_limit)?,
            })
            .await?;
        Ok(Response::new(convert::tenant(&tenant)))
    }

    async fn get_tenant(&self, request: Request<pb::GetTenantRequest>) -> Result<Response<pb::Tenant>, Status> {
        let who = authenticated(&self.engine, &request).await?;
        // The role first: a key that may not call GetTenant learns nothing
        // from the validation of its request.
        if who.role == Role::Runtime {
            return Err(
                Error::PermissionDenied(Reason::WrongRole, "GetTenant needs an admin or operator key".into()).into()
            );
        }
        let tenant_id = convert::tenant_id("tenant_id", &request.get_ref().tenant_id)?;
        let visible = match who.role {
            Role::Operator => true,
            Role::Admin | Role::Runtime => who.tenant.as_deref() == Some(tenant_id.as_str()),
        };
        if !visible {
            return Err(Error::NotFound(Reason::TenantNotFound, format!("tenant {tenant_id} not found")).into());
        }
        Ok(Response::new(convert::tenant(&self.engine.get_tenant(&tenant_id).await?)))
    }

    async fn create_api_key(
        &self,
        request: Request<pb::CreateApiKeyRequest>,
    ) -> Result<Response<pb::CreateApiKeyResponse>, Status> {
        caller(&self.engine, &request, Need::Operator).await?;
        let r = request.into_inner();
        let role = convert::api_key_role(r.role)?;
        let tenant = match (role, r.tenant_id.is_empty()) {
            (Role::Operator, true) => None,
            (Role::Operator, false) => {
                return Err(
                    Error::invalid("tenant_id", Reason::InvalidArgument, "must be empty for an operator key").into()
                );
            }
            (_, true) => {
                return Err(Error::invalid("tenant_id", Reason::InvalidTenantId, "is required for this role").into());
            }
            (_, false) => {
                let tenant = convert::tenant_id("tenant_id", &r.tenant_id)?;
                self.engine.require_tenant(&tenant).await?;
                Some(tenant)
            }
        };
        let name = convert::text("name", r.name, KEY_NAME_MAX)?;
        let idempotency_key = convert::idempotency_key(&r.idempotency_key)?;
        let (record, key) = self
            .engine
            .keys
            .create(tenant.as_deref(), role, &name, Some(&idempotency_key))
            .await
            .map_err(Error::from)?;
        if key.is_some() {
            tracing::info!(prefix = %record.prefix, role = role.as_str(), tenant = ?record.tenant, "api key created");
        }
        Ok(Response::new(pb::CreateApiKeyResponse {
            api_key: Some(convert::api_key(&record)),
            replayed: key.is_none(),
            key: key.unwrap_or_default(),
        }))
    }

    async fn list_api_keys(
        &self,
        request: Request<pb::ListApiKeysRequest>,
    ) -> Result<Response<pb::ListApiKeysResponse>, Status> {
        caller(&self.engine, &request, Need::Operator).await?;
        let r = request.into_inner();
        let tenant = if r.tenant_id.is_empty() { None } else { Some(convert::tenant_id("tenant_id", &r.tenant_id)?) };
        let keys = self.engine.pg.list_api_keys(tenant.as_deref()).await.map_err(Error::from)?;
        Ok(Response::new(pb::ListApiKeysResponse { api_keys: keys.iter().map(convert::api_key).collect() }))
    }

    async fn revoke_api_key(&self, request: Request<pb::RevokeApiKeyRequest>) -> Result<Response<pb::ApiKey>, Status> {
        caller(&self.engine, &request, Need::Operator).await?;
        let key_id = convert::key_id(&request.get_ref().key_id)?;
        let record = self
            .engine
            .keys
            .revoke(key_id)
            .await
            .map_err(Error::from)?
            .ok_or_else(|| Error::NotFound(Reason::KeyNotFound, format!("key {key_id} not found")))?;
        tracing::info!(prefix = %record.prefix, "api key revoked");
        Ok(Response::new(convert::api_key(&record)))
    }

    async fn create_account(
        &self,
        request: Request<pb::CreateAccountRequest>,
    ) -> Result<Response<pb::Account>, Status> {
        let tenant = self.tenant(&request).await?;
        let r = request.into_inner();
        let input = NewAccount {
            account_id: convert::account_id("account_id", &r.account_id)?,
            parent_id: if r.parent_id.is_empty() {
                None
            } else {
                Some(convert::account_id("parent_id", &r.parent_id)?)
            },
            kind: convert::account_kind(r.kind)?,
            display_name: convert::text("display_name", r.display_name, NAME_MAX)?,
            pool_access: r.pool_access,
            cap: convert::optional_amount("cap", &r.cap)?,
            period: convert::period_spec("period", r.period)?,
            tier: tier(r.tier)?,
        };
        let account = self.engine.create_account(&tenant, input, self.max_depth).await?;
        Ok(Response::new(convert::account(&account)))
    }

    async fn update_account(
        &self,
        request: Request<pb::UpdateAccountRequest>,
    ) -> Result<Response<pb::Account>, Status> {
        let tenant = self.tenant(&request).await?;
        let r = request.into_inner();
        let update = AccountUpdate {
            account_id: convert::account_id("account_id", &r.account_id)?,
            pool_access: r.pool_access,
            cap: match r.cap.as_deref() {
                None => None,
                Some(text) => Some(convert::optional_amount("cap", text)?),
            },
            suspended: r.suspended,
            display_name: r.display_name.map(|d| convert::text("display_name", d, NAME_MAX)).transpose()?,
            tier: r.tier.map(tier).transpose()?,
        };
        let account = self.engine.update_account(&tenant, update).await?;
        Ok(Response::new(convert::account(&account)))
    }

    async fn get_account(&self, request: Request<pb::GetAccountRequest>) -> Result<Response<pb::Account>, Status> {
        let tenant = self.tenant(&request).await?;
        let account_id = convert::account_id("account_id", &request.get_ref().account_id)?;
        Ok(Response::new(convert::account(&self.engine.get_account(&tenant, &account_id).await?)))
    }

    async fn list_accounts(
        &self,
        request: Request<pb::ListAccountsRequest>,
    ) -> Result<Response<pb::ListAccountsResponse>, Status> {
        let tenant = self.tenant(&request).await?;
        let r = request.into_inner();
        let parent = if r.parent_id.is_empty() { None } else { Some(convert::account_id("parent_id", &r.parent_id)?) };
        let page_size = match r.page_size {
            0 => 100,
            n @ 1..=1000 => i64::from(n),
            _ => return Err(Error::invalid("page_size", Reason::InvalidArgument, "must be between 0 and 1000").into()),
        };
        let page_token = convert::account_page_token(&r.page_token)?;
        let page = self.engine.list_accounts(&tenant, parent.as_deref(), page_size, &page_token).await?;
        Ok(Response::new(pb::ListAccountsResponse {
            accounts: page.accounts.iter().map(convert::account).collect(),
            next_page_token: page.next_page_token,
        }))
    }

    async fn create_grant(&self, request: Request<pb::CreateGrantRequest>) -> Result<Response<pb::Grant>, Status> {
        let tenant = self.tenant(&request).await?;
        let r = request.into_inner();
        let description = short_text("description", r.description)?;
        let input = NewGrant {
            account_id: convert::account_id("account_id", &r.account_id)?,
            amount: convert::amount("amount", &r.amount, Sign::Positive)?,
            category: convert::category(r.category)?,
            priority: r.priority,
            effective_at: convert::from_timestamp("effective_at", r.effective_at)?,
            expiry: match (convert::from_timestamp("expires_at", r.expires_at)?, r.expire_at_period_end) {
                (None, false) => GrantExpiry::Never,
                (Some(at), false) => GrantExpiry::At(at),
                (None, true) => GrantExpiry::PeriodEnd,
                (Some(_), true) => {
                    return Err(Error::invalid(
                        "expire_at_period_end",
                        Reason::InvalidArgument,
                        "cannot be set together with expires_at",
                    )
                    .into());
                }
            },
            description,
            reason: short_text("reason", r.reason)?,
            actor: short_text("actor", r.actor)?,
            idempotency_key: convert::idempotency_key(&r.idempotency_key)?,
        };
        let grant = self.engine.create_grant(&tenant, input).await?;
        Ok(Response::new(convert::grant(&grant)))
    }

    async fn void_grant(&self, request: Request<pb::VoidGrantRequest>) -> Result<Response<pb::Grant>, Status> {
        let tenant = self.tenant(&request).await?;
        let r = request.into_inner();
        let reason = required_text("reason", r.reason)?;
        let input = VoidInput {
            grant_id: convert::grant_id(&r.grant_id)?,
            reason,
            idempotency_key: convert::idempotency_key(&r.idempotency_key)?,
        };
        let grant = self.engine.void_grant(&tenant, input).await?;
        Ok(Response::new(convert::grant(&grant)))
    }

    async fn get_grant(&self, request: Request<pb::GetGrantRequest>) -> Result<Response<pb::Grant>, Status> {
        let tenant = self.tenant(&request).await?;
        let grant_id = convert::grant_id(&request.get_ref().grant_id)?;
        Ok(Response::new(convert::grant(&self.engine.get_grant(&tenant, grant_id).await?)))
    }

    async fn list_grants(
        &self,
        request: Request<pb::ListGrantsRequest>,
    ) -> Result<Response<pb::ListGrantsResponse>, Status> {
        let tenant = self.tenant(&request).await?;
        let r = request.into_inner();
        let account_id = convert::account_id("account_id", &r.account_id)?;
        let grants = self.engine.list_grants(&tenant, &account_id, r.include_inactive).await?;
        Ok(Response::new(pb::ListGrantsResponse { grants: grants.iter().map(convert::grant).collect() }))
    }

    async fn create_allowance(
        &self,
        request: Request<pb::CreateAllowanceRequest>,
    ) -> Result<Response<pb::Allowance>, Status> {
        let tenant = self.tenant(&request).await?;
        let r = request.into_inner();
        let (rollover, rollover_max) = match pb::RolloverKind::try_from(r.rollover) {
            Ok(pb::RolloverKind::Unspecified | pb::RolloverKind::None) => ("none", None),
            Ok(pb::RolloverKind::All) => ("all", None),
            Ok(pb::RolloverKind::UpTo) => {
                ("up_to", Some(convert::amount("rollover_max", &r.rollover_max, Sign::NonNegative)?))
            }
            Err(_) => return Err(Error::invalid("rollover", Reason::InvalidArgument, "is not a RolloverKind").into()),
        };
        if rollover != "up_to" && !r.rollover_max.is_empty() {
            return Err(
                Error::invalid("rollover_max", Reason::InvalidArgument, "is only for ROLLOVER_KIND_UP_TO").into()
            );
        }
        let category = if r.category == 0 { Category::Plan } else { convert::category(r.category)? };
        let input = NewAllowance {
            account_id: convert::account_id("account_id", &r.account_id)?,
            amount: convert::amount("amount", &r.amount, Sign::Positive)?,
            category,
            priority: r.priority,
            rollover,
            rollover_max,
            description: short_text("description", r.description)?,
            idempotency_key: convert::idempotency_key(&r.idempotency_key)?,
        };
        let (allowance, _) = self.engine.create_allowance(&tenant, input).await?;
        Ok(Response::new(convert::allowance(&allowance)))
    }

    async fn list_allowances(
        &self,
        request: Request<pb::ListAllowancesRequest>,
    ) -> Result<Response<pb::ListAllowancesResponse>, Status> {
        let tenant = self.tenant(&request).await?;
        let account = convert::account_id("account_id", &request.get_ref().account_id)?;
        let rows = self.engine.list_allowances(&tenant, &account).await?;
        Ok(Response::new(pb::ListAllowancesResponse { allowances: rows.iter().map(convert::allowance).collect() }))
    }

    async fn end_allowance(
        &self,
        request: Request<pb::EndAllowanceRequest>,
    ) -> Result<Response<pb::Allowance>, Status> {
        let tenant = self.tenant(&request).await?;
        let id = convert::uuid_field("allowance_id", Reason::InvalidArgument, &request.get_ref().allowance_id)?;
        Ok(Response::new(convert::allowance(&self.engine.end_allowance(&tenant, id).await?)))
    }

    async fn adjust_balance(
        &self,
        request: Request<pb::AdjustBalanceRequest>,
    ) -> Result<Response<pb::Adjustment>, Status> {
        let tenant = self.tenant(&request).await?;
        let r = request.into_inner();
        let account_id = convert::account_id("account_id", &r.account_id)?;
        let amount = Credits::parse(&r.amount).map_err(|e| Error::invalid("amount", Reason::InvalidAmount, e))?;
        if amount == Credits::ZERO {
            return Err(Error::invalid("amount", Reason::InvalidAmount, "must not be zero").into());
        }
        let reason = required_text("reason", r.reason)?;
        let actor = required_text("actor", r.actor)?;
        let key = convert::idempotency_key(&r.idempotency_key)?;
        if amount > Credits::ZERO {
            // A credit is a grant under the call's key; a key a debit used
            // is another payload.
            let replay = self.engine.pg.grant_by_key(&tenant, &key).await.map_err(Error::from)?.is_some();
            if !replay && self.engine.pg.adjustment_key_used(&tenant, &key).await.map_err(Error::from)? {
                return Err(Error::FailedPrecondition(
                    Reason::IdempotencyKeyReused,
                    "the idempotency key was already used with a different payload".into(),
                )
                .into());
            }
            let grant = self
                .engine
                .create_grant(
                    &tenant,
                    NewGrant {
                        account_id: account_id.clone(),
                        amount,
                        category: if r.refund { Category::Refund } else { Category::Adjustment },
                        priority: None,
                        effective_at: None,
                        expiry: GrantExpiry::Never,
                        description: reason.clone(),
                        reason,
                        actor,
                        idempotency_key: key,
                    },
                )
                .await?;
            let balance = self.engine.own_balance(&tenant, &account_id).await?;
            return Ok(Response::new(pb::Adjustment {
                account_id,
                amount: grant.amount.to_string(),
                grant_id: grant.grant_id.to_string(),
                balance: balance.to_string(),
                replayed: replay,
            }));
        }
        if r.refund {
            return Err(Error::invalid("refund", Reason::InvalidArgument, "a refund must be a positive amount").into());
        }
        let debit = Credits::ZERO.checked_sub(amount).unwrap_or_default();
        let (balance, created) = self.engine.debit(&tenant, &account_id, debit, &reason, &actor, &key).await?;
        Ok(Response::new(pb::Adjustment {
            account_id,
            amount: amount.to_string(),
            grant_id: String::new(),
            balance: balance.to_string(),
            replayed: !created,
        }))
    }

    async fn request_account_change(
        &self,
        request: Request<pb::RequestAccountChangeRequest>,
    ) -> Result<Response<pb::AccountChange>, Status> {
        let tenant = tenant(&self.engine, &request, Need::Runtime).await?;
        let r = request.into_inner();
        let account = convert::account_id("account_id", &r.account_id)?;
        if let Some(cap) = &r.cap {
            convert::optional_amount("cap", cap)?;
        }
        if r.pool_access.is_none() && r.cap.is_none() && r.tier.is_none() {
            return Err(Error::invalid(
                "pool_access",
                Reason::InvalidArgument,
                "nothing to change: set pool_access, cap or tier",
            )
            .into());
        }
        let change = RequestedChange { pool_access: r.pool_access, cap: r.cap, tier: r.tier.map(tier).transpose()? };
        let note = short_text("note", r.note)?;
        let key = convert::idempotency_key(&r.idempotency_key)?;
        let (row, _) = self.engine.request_change(&tenant, &account, &change, &note, &key).await?;
        Ok(Response::new(convert::change(&row)))
    }

    async fn decide_account_change(
        &self,
        request: Request<pb::DecideAccountChangeRequest>,
    ) -> Result<Response<pb::AccountChange>, Status> {
        let tenant = self.tenant(&request).await?;
        let r = request.into_inner();
        let id = convert::uuid_field("change_id", Reason::InvalidArgument, &r.change_id)?;
        let note = short_text("note", r.note)?;
        Ok(Response::new(convert::change(&self.engine.decide_change(&tenant, id, r.approve, &note).await?)))
    }

    async fn list_account_changes(
        &self,
        request: Request<pb::ListAccountChangesRequest>,
    ) -> Result<Response<pb::ListAccountChangesResponse>, Status> {
        let tenant = self.tenant(&request).await?;
        let status = match pb::ChangeStatus::try_from(request.get_ref().status) {
            Ok(pb::ChangeStatus::Unspecified) => None,
            Ok(pb::ChangeStatus::Pending) => Some("pending"),
            Ok(pb::ChangeStatus::Approved) => Some("approved"),
            Ok(pb::ChangeStatus::Denied) => Some("denied"),
            Err(_) => return Err(Error::invalid("status", Reason::InvalidArgument, "is not a ChangeStatus").into()),
        };
        let rows = self.engine.pg.changes(&tenant, status).await.map_err(Error::from)?;
        Ok(Response::new(pb::ListAccountChangesResponse { changes: rows.iter().map(convert::change).collect() }))
    }

    async fn check_balances(
        &self,
        request: Request<pb::CheckBalancesRequest>,
    ) -> Result<Response<pb::CheckBalancesResponse>, Status> {
        let tenant = self.tenant(&request).await?;
        let measured = self.engine.check_balances(&tenant).await?;
        Ok(Response::new(pb::CheckBalancesResponse {
            accounts_checked: measured.accounts as i64,
            drifts: measured
                .drifts
                .iter()
                .map(|d| pb::BalanceDrift {
                    account_id: d.account_id.clone(),
                    hot_balance: d.hot.to_string(),
                    ledger_balance: d.ledger.to_string(),
                    drift: d.amount().to_string(),
                })
                .collect(),
            busy_accounts: measured.busy,
        }))
    }
}
