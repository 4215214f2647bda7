//! Who is calling: the tenant every lookup is scoped to.
//!
//! The tenant comes from the `x-creditd-tenant` metadata entry, or from
//! `server.default_tenant` when the entry is absent. It is never read from
//! a request message. (API keys, which will carry the tenant instead, are
//! planned; until then creditd must only be reachable by trusted callers.)

use tonic::Request;

use crate::{
    error::{Error, Result},
    grpc::convert,
};

pub const TENANT_HEADER: &str = "x-creditd-tenant";

/// Resolves the tenant from metadata, falling back to `default_tenant`.
pub fn tenant_of<T>(request: &Request<T>, default_tenant: &str) -> Result<String> {
    match request.metadata().get(TENANT_HEADER) {
        Some(value) => {
            let text = value.to_str().map_err(|_| Error::Unauthenticated(format!("{TENANT_HEADER} is not ASCII")))?;
            convert::tenant_id(TENANT_HEADER, text)
                .map_err(|_| Error::Unauthenticated(format!("{TENANT_HEADER} is not a valid tenant id")))
        }
        None if !default_tenant.is_empty() => Ok(default_tenant.to_string()),
        None => Err(Error::Unauthenticated(format!("missing {TENANT_HEADER} metadata"))),
    }
}
