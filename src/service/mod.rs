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
pub mod watch;
pub mod webhooks;

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
    time::Duration,
};

use sha2::{Digest, Sha256};

use crate::{
    auth::KeyStore,
    domain::limit::CommitLimit,
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

/// The known tenants with their commit limits, cached; PostgreSQL is asked
/// on a miss, and the health job reloads the whole set every pass.
#[derive(Clone, Default)]
pub struct Tenants {
    known: Arc<RwLock<HashMap<String, CommitLimit>>>,
}

impl Tenants {
    pub fn insert(&self, tenant: &str, limit: CommitLimit) {
        self.known.write().expect("tenant cache lock").insert(tenant.to_string(), limit);
    }

    pub fn replace(&self, tenants: Vec<(String, CommitLimit)>) {
        *self.known.write().expect("tenant cache lock") = tenants.into_iter().collect();
    }

    pub fn all(&self) -> Vec<String> {
        self.known.read().expect("tenant cache lock").keys().cloned().collect()
    }

    pub fn get(&self, tenant: &str) -> Option<CommitLimit> {
        self.known.read().expect("tenant cache lock").get(tenant).copied()
    }
}

impl Engine {
    /// Fails with NOT_FOUND unless the tenant exists.
    pub async fn require_tenant(&self, tenant: &str) -> Result<()> {
        self.commit_limit(tenant).await.map(|_| ())
    }

    /// The tenant's commit limit (NOT_FOUND unless the tenant exists).
    pub async fn commit_limit(&self, tenant: &str) -> Result<CommitLimit> {
        if let Some(limit) = self.tenants.get(tenant) {
            return Ok(limit);
        }
        match self.pg.tenant(tenant).await? {
            Some(row) => {
                self.tenants.insert(tenant, row.commit_limit);
                Ok(row.commit_limit)
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
