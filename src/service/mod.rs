//! The service layer: hot-path and admin operations over the two stores,
//! and the background jobs that keep them in step. Knows nothing of gRPC.

pub mod admin;
pub mod committer;
pub mod credit;
pub mod fence;
pub mod jobs;
pub mod policy;
pub mod pricing;
pub mod reconcile;
pub mod reports;
pub mod webhooks;

use std::{
    collections::HashSet,
    sync::{Arc, RwLock},
    time::Duration,
};

use sha2::{Digest, Sha256};

use crate::{
    auth::KeyStore,
    error::{Error, Reason, Result},
    store::{hot::HotStore, pg::PgStore},
};

pub use committer::Committer;

/// Hot-path limits taken from the configuration.
#[derive(Clone, Debug)]
pub struct Limits {
    pub default_ttl: Duration,
    pub min_ttl: Duration,
    pub max_ttl: Duration,
}

/// Everything the operations need; cheap to clone.
#[derive(Clone)]
pub struct Engine {
    pub hot: HotStore,
    pub pg: PgStore,
    pub committer: Committer,
    pub keys: KeyStore,
    pub pricing: pricing::Pricing,
    pub clock: policy::Clock,
    pub limits: Limits,
    pub tenants: Tenants,
    /// Checks and rebuilds of tenants' hot state under way here.
    pub recovery: fence::Recovery,
    /// Where alert webhooks may be sent (`webhooks.*` configuration).
    pub webhooks: Arc<webhooks::WebhookPolicy>,
}

/// The known tenant ids, cached; PostgreSQL is asked on a miss.
#[derive(Clone, Default)]
pub struct Tenants {
    ids: Arc<RwLock<HashSet<String>>>,
}

impl Tenants {
    pub fn insert(&self, tenant: &str) {
        self.ids.write().expect("tenant cache lock").insert(tenant.to_string());
    }

    pub fn replace(&self, ids: Vec<String>) {
        *self.ids.write().expect("tenant cache lock") = ids.into_iter().collect();
    }

    pub fn all(&self) -> Vec<String> {
        self.ids.read().expect("tenant cache lock").iter().cloned().collect()
    }

    pub fn contains(&self, tenant: &str) -> bool {
        self.ids.read().expect("tenant cache lock").contains(tenant)
    }
}

impl Engine {
    /// Fails with NOT_FOUND unless the tenant exists.
    pub async fn require_tenant(&self, tenant: &str) -> Result<()> {
        if self.tenants.contains(tenant) {
            return Ok(());
        }
        match self.pg.tenant(tenant).await? {
            Some(_) => {
                self.tenants.insert(tenant);
                Ok(())
            }
            None => Err(Error::NotFound(Reason::TenantNotFound, format!("tenant {tenant} not found"))),
        }
    }
}

/// A short, stable fingerprint of a request's payload, for idempotency.
pub fn payload_hash(parts: &[&str]) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update(part.as_bytes());
        hasher.update([0x1f]);
    }
    hex::encode(&hasher.finalize()[..16])
}
