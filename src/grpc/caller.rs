//! Who is calling, and may they: every RPC starts here.
//!
//! The caller is the API key in `authorization: Bearer …` metadata (see
//! `crate::auth`). Its tenant, never a request field, scopes every lookup.

use tonic::Request;

use crate::{
    auth::{Caller, Role},
    error::{Error, Reason, Result},
    service::Engine,
};

/// What a call requires.
#[derive(Clone, Copy, Debug)]
pub enum Need {
    /// The hot path: a runtime or admin key.
    Runtime,
    /// Tenant administration: an admin key.
    Admin,
    /// Tenants and keys: an operator key.
    Operator,
}

impl Need {
    fn allows(self, role: Role) -> bool {
        match self {
            Need::Runtime => matches!(role, Role::Runtime | Role::Admin),
            Need::Admin => role == Role::Admin,
            Need::Operator => role == Role::Operator,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Need::Runtime => "a runtime or admin key",
            Need::Admin => "an admin key",
            Need::Operator => "an operator key",
        }
    }
}

/// Authenticates the request, whatever its role.
pub async fn authenticated<T>(engine: &Engine, request: &Request<T>) -> Result<Caller> {
    let header = match request.metadata().get("authorization") {
        Some(value) => Some(
            value.to_str().map_err(|_| Error::Unauthenticated(Reason::InvalidCredentials, "invalid API key".into()))?,
        ),
        None => None,
    };
    Ok(engine.keys.authenticate(header).await?)
}

/// Authenticates the request and checks its role.
pub async fn caller<T>(engine: &Engine, request: &Request<T>, need: Need) -> Result<Caller> {
    let caller = authenticated(engine, request).await?;
    if !need.allows(caller.role) {
        return Err(Error::PermissionDenied(
            Reason::WrongRole,
            format!("this call needs {}; key {} has the {} role", need.describe(), caller.prefix, caller.role.as_str()),
        ));
    }
    Ok(caller)
}

/// Authenticates a tenant-scoped call and returns the key's tenant.
pub async fn tenant<T>(engine: &Engine, request: &Request<T>, need: Need) -> Result<String> {
    let caller = caller(engine, request, need).await?;
    let tenant = caller.tenant.ok_or_else(|| {
        Error::PermissionDenied(Reason::WrongRole, "operator keys act on no tenant's accounts".into())
    })?;
    engine.require_tenant(&tenant).await?;
    super::observe::record("tenant", &tenant);
    Ok(tenant)
}
