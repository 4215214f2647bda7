//! `creditd.v1.AdminService`.

use rust_decimal::Decimal;
use tonic::{Request, Response, Status};

use super::{
    caller::{Need, authenticated, caller, tenant},
    convert::{self, Sign},
};
use crate::{
    auth::Role,
    error::{Error, Reason},
    pb::{self, admin_service_server::AdminService},
    service::{
        Engine,
        admin::{NewAccount, NewGrant, NewTenant, VoidInput},
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
        if time_zone.len() > 64 || time_zone.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(
                Error::invalid("time_zone", Reason::InvalidArgument, "must be an IANA zone like Europe/Paris").into()
            );
        }
        if r.display_name.chars().count() > 256 {
            return Err(Error::invalid("display_name", Reason::InvalidArgument, "is longer than 256 characters").into());
        }
        let tenant = self
            .engine
            .create_tenant(NewTenant {
                tenant_id,
                display_name: r.display_name,
                credit_value: Decimal::from(credit_value.micros()) / Decimal::from(1_000_000),
                currency,
                time_zone,
            })
            .await?;
        Ok(Response::new(convert::tenant(&tenant)))
    }

    async fn get_tenant(&self, request: Request<pb::GetTenantRequest>) -> Result<Response<pb::Tenant>, Status> {
        let who = authenticated(&self.engine, &request).await?;
        let tenant_id = convert::tenant_id("tenant_id", &request.get_ref().tenant_id)?;
        let visible = match who.role {
            Role::Operator => true,
            Role::Admin => who.tenant.as_deref() == Some(tenant_id.as_str()),
            Role::Runtime => {
                return Err(Error::PermissionDenied(
                    Reason::WrongRole,
                    "GetTenant needs an admin or operator key".into(),
                )
                .into());
            }
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
        if r.name.chars().count() > 128 {
            return Err(Error::invalid("name", Reason::InvalidArgument, "is longer than 128 characters").into());
        }
        let idempotency_key = convert::idempotency_key(&r.idempotency_key)?;
        let (record, key) = self
            .engine
            .keys
            .create(tenant.as_deref(), role, &r.name, Some(&idempotency_key))
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
            display_name: r.display_name,
            pool_access: r.pool_access,
            cap: convert::optional_amount("cap", &r.cap)?,
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
            display_name: r.display_name,
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
        let page = self.engine.list_accounts(&tenant, parent.as_deref(), page_size, &r.page_token).await?;
        Ok(Response::new(pb::ListAccountsResponse {
            accounts: page.accounts.iter().map(convert::account).collect(),
            next_page_token: page.next_page_token,
        }))
    }

    async fn create_grant(&self, request: Request<pb::CreateGrantRequest>) -> Result<Response<pb::Grant>, Status> {
        let tenant = self.tenant(&request).await?;
        let r = request.into_inner();
        if r.description.chars().count() > 512 {
            return Err(Error::invalid("description", Reason::InvalidArgument, "is longer than 512 characters").into());
        }
        let input = NewGrant {
            account_id: convert::account_id("account_id", &r.account_id)?,
            amount: convert::amount("amount", &r.amount, Sign::Positive)?,
            category: convert::category(r.category)?,
            priority: r.priority,
            effective_at: convert::from_timestamp("effective_at", r.effective_at)?,
            expires_at: convert::from_timestamp("expires_at", r.expires_at)?,
            description: r.description,
            idempotency_key: convert::idempotency_key(&r.idempotency_key)?,
        };
        let grant = self.engine.create_grant(&tenant, input).await?;
        Ok(Response::new(convert::grant(&grant)))
    }

    async fn void_grant(&self, request: Request<pb::VoidGrantRequest>) -> Result<Response<pb::Grant>, Status> {
        let tenant = self.tenant(&request).await?;
        let r = request.into_inner();
        let reason = r.reason.trim().to_string();
        if reason.is_empty() || reason.chars().count() > 512 {
            return Err(
                Error::invalid("reason", Reason::InvalidArgument, "is required (at most 512 characters)").into()
            );
        }
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
}
