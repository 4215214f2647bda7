//! The fence between Redis and PostgreSQL, from the service's side: checking
//! a tenant's hot state before a Redis process serves it, and rebuilding
//! the tenants whose state is missing or behind, concurrently and per
//! tenant (ARCHITECTURE.md, "Fencing the hot state").
//!
//! A script refuses to decide for a tenant ('unverified') until the Redis
//! process running it has been checked against PostgreSQL: after a
//! restart, a restore, a failover. `Engine::verify_tenant` does that check
//! (one PostgreSQL statement and two small scripts); calls that met the
//! refusal run it and retry once, so the first call after a restart pays
//! one check and no other tenant waits. A state found behind PostgreSQL,
//! or missing, is rebuilt in the background (`Engine::want_rebuild`);
//! meanwhile that tenant's calls answer UNAVAILABLE (TENANT_LOADING).

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
};

use tokio::sync::Semaphore;

use super::{Engine, jobs::Rebuilt};
use crate::{
    error::{Error, Result},
    metrics::metrics,
    store::hot::{Fenced, HotError, HotResult, Verdict},
};

/// Rebuilds running at once in one replica.
const REBUILDS_AT_ONCE: usize = 4;
/// Checks running at once in one replica (each is short).
const CHECKS_AT_ONCE: usize = 16;

/// Per-replica bookkeeping of checks and rebuilds.
#[derive(Clone)]
pub struct Recovery {
    /// One check at a time per tenant.
    gates: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
    /// Tenants with a rebuild queued or running in this replica.
    rebuilding: Arc<Mutex<HashSet<String>>>,
    /// Tenants with a background check queued or running.
    checking: Arc<Mutex<HashSet<String>>>,
    rebuilds: Arc<Semaphore>,
    checks: Arc<Semaphore>,
}

impl Default for Recovery {
    fn default() -> Self {
        Recovery {
            gates: Arc::default(),
            rebuilding: Arc::default(),
            checking: Arc::default(),
            rebuilds: Arc::new(Semaphore::new(REBUILDS_AT_ONCE)),
            checks: Arc::new(Semaphore::new(CHECKS_AT_ONCE)),
        }
    }
}

impl Recovery {
    fn gate(&self, tenant: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.gates.lock().expect("fence gates lock").entry(tenant.to_string()).or_default().clone()
    }

    /// How many tenants have a rebuild queued or running here.
    pub fn rebuilding_count(&self) -> usize {
        self.rebuilding.lock().expect("rebuild set lock").len()
    }

    /// Whether a rebuild of `tenant` is queued or running here.
    pub fn is_rebuilding(&self, tenant: &str) -> bool {
        self.rebuilding.lock().expect("rebuild set lock").contains(tenant)
    }
}

impl Engine {
    /// Runs a hot-store call; when the Redis process that answers has not
    /// checked the tenant's state yet, checks it and runs the call again.
    /// A state that is missing or behind is queued for a rebuild and the
    /// call fails with `NotLoaded`.
    pub(crate) async fn fenced<T, F, Fut>(&self, tenant: &str, call: F) -> HotResult<T>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = HotResult<T>>,
    {
        match call().await {
            Err(HotError::Unverified) => {
                self.verify_tenant(tenant).await?;
                call().await
            }
            Err(HotError::NotLoaded) => {
                self.want_rebuild(tenant);
                Err(HotError::NotLoaded)
            }
            other => other,
        }
    }

    /// Checks the tenant's hot state against PostgreSQL's fence and, when
    /// it holds every change PostgreSQL confirmed, marks it verified by the
    /// Redis process that answers. The order makes the check exact:
    /// learn the process; name it in PostgreSQL's fence (from then on
    /// PostgreSQL refuses confirmations from any other process, so no
    /// change made elsewhere can be confirmed after the read); read the
    /// generation and position there; compare in Redis, in a script that
    /// first checks the same process runs it.
    pub async fn verify_tenant(&self, tenant: &str) -> HotResult<()> {
        let gate = self.recovery.gate(tenant);
        let _one_at_a_time = gate.lock().await;
        for _ in 0..3 {
            match self.check_fence(tenant).await? {
                Verdict::Current => return Ok(()),
                Verdict::Moved => continue,
                Verdict::NotLoaded => {
                    self.want_rebuild(tenant);
                    return Err(HotError::NotLoaded);
                }
                Verdict::Behind { .. } => {
                    self.want_rebuild(tenant);
                    return Err(HotError::NotLoaded);
                }
            }
        }
        Err(HotError::Unverified)
    }

    /// One check (see `verify_tenant`), without the per-tenant gate.
    pub(crate) async fn check_fence(&self, tenant: &str) -> HotResult<Verdict> {
        let process = self.hot.whoami(tenant).await?;
        let claimed = self.pg.claim_fence(tenant, &process).await.map_err(|e| {
            tracing::warn!(error = %e, tenant, "cannot check the hot state against postgres");
            HotError::Unverified
        })?;
        let Some((generation, position)) = claimed else {
            // No fence row: the tenant is unknown to PostgreSQL (or was
            // created by a version before fences): rebuild decides.
            return Ok(Verdict::NotLoaded);
        };
        let verdict = self.hot.verify(tenant, &process, &generation, position).await?;
        match &verdict {
            Verdict::Current => tracing::debug!(tenant, process = %process, "hot state verified against postgres"),
            Verdict::Behind { generation: hot_generation, position: hot_position } => {
                metrics().fence_behind.inc();
                tracing::warn!(
                    tenant,
                    process = %process,
                    postgres_generation = %generation,
                    postgres_position = position,
                    redis_generation = %hot_generation,
                    redis_position = hot_position,
                    "redis is behind postgres (lost or rolled-back writes): rebuilding the tenant"
                );
            }
            Verdict::Moved | Verdict::NotLoaded => {}
        }
        Ok(verdict)
    }

    /// Runs a hot-state change that PostgreSQL must confirm (a ledger row
    /// applied, account settings, a period boundary) and confirms it in the
    /// tenant's fence. A change refused there was made on a state no
    /// longer trusted (a rebuild, or another Redis process answering now):
    /// it runs again on the current one, so no confirmed change is missing
    /// from a state that passes its check. Changes are idempotent (ledger
    /// markers, settings written whole).
    pub(crate) async fn confirmed<T, F, Fut>(&self, tenant: &str, change: F) -> Result<T>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = HotResult<(T, Fenced)>>,
    {
        for _ in 0..3 {
            let (out, fence) = self.fenced(tenant, &change).await.map_err(|e| self.hot_error(e))?;
            if self.pg.confirm_fence(tenant, &fence).await? {
                return Ok(out);
            }
            tracing::info!(tenant, process = %fence.process, "a hot-state change was made on a state no longer trusted; again");
            self.verify_tenant(tenant).await.map_err(|e| self.hot_error(e))?;
        }
        Err(Error::Unavailable("the tenant's hot state kept changing hands; try again".into()))
    }

    /// Queues a rebuild of the tenant (one per tenant at a time, a few
    /// tenants at once), unless one is queued or running here.
    pub fn want_rebuild(&self, tenant: &str) {
        if !self.recovery.rebuilding.lock().expect("rebuild set lock").insert(tenant.to_string()) {
            return;
        }
        let engine = self.clone();
        let tenant = tenant.to_string();
        tokio::spawn(async move {
            let permit = engine.recovery.rebuilds.clone().acquire_owned().await;
            let result = engine.rebuild(&tenant).await;
            drop(permit);
            engine.recovery.rebuilding.lock().expect("rebuild set lock").remove(&tenant);
            match result {
                Ok(Rebuilt::Done) => {}
                Ok(Rebuilt::Elsewhere) => {
                    tracing::debug!(tenant = %tenant, "another replica is rebuilding the tenant");
                }
                Err(e) => tracing::warn!(error = %e, tenant = %tenant, "rebuild failed; the health job tries again"),
            }
        });
    }

    /// Queues a check of the tenant in the background (the health job's
    /// sweep after a new Redis process appears, so that first calls find
    /// their tenants verified).
    pub fn want_check(&self, tenant: &str) {
        if !self.recovery.checking.lock().expect("check set lock").insert(tenant.to_string()) {
            return;
        }
        let engine = self.clone();
        let tenant = tenant.to_string();
        tokio::spawn(async move {
            let permit = engine.recovery.checks.clone().acquire_owned().await;
            let result = engine.verify_tenant(&tenant).await;
            drop(permit);
            engine.recovery.checking.lock().expect("check set lock").remove(&tenant);
            if let Err(e) = result {
                tracing::debug!(error = %e, tenant = %tenant, "background check of the hot state did not pass");
            }
        });
    }
}
