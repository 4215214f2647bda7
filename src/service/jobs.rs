//! Background work, run by every replica. Coordination goes through the
//! stores themselves: Lua scripts are atomic, PostgreSQL rows are claimed
//! with `FOR UPDATE SKIP LOCKED` or serialized by advisory locks, and
//! ledger rows reach Redis through exactly-once markers. No job assumes
//! it is the only one running.
//!
//! - reaper: expires holds past their TTL; finalizes or reverts commits
//!   whose PostgreSQL write never confirmed.
//! - ledger: credits grants that became effective, forfeits expired ones,
//!   allocates usage to grants, applies ledger rows Redis missed.
//! - webhooks: sends due alert deliveries, retries, dead letters.
//! - keys: re-reads cached API keys (revocations reach every replica).
//! - health: watches Redis and PostgreSQL, compares every tenant's fence,
//!   queues checks and rebuilds (`service/fence.rs`); SERVING while Redis
//!   answers.
//! - reconciler: compares hot balances with the ledger, repairs confirmed
//!   drift (`service/reconcile.rs`); one replica per tenant per interval.

use std::{collections::HashSet, time::Duration};

use tokio::{sync::watch, task::JoinHandle, time::MissedTickBehavior};
use uuid::Uuid;

use super::{Engine, admin::hot_settings};
use crate::{
    domain::Credits,
    error::{Error, Result},
    metrics::{HoldEnd, metrics},
    store::{
        hot::{AccountCounters, Verdict},
        pg::{Forfeit, Forfeited},
    },
};

/// Job intervals.
#[derive(Clone, Debug)]
pub struct JobTimings {
    pub reap: Duration,
    pub ledger: Duration,
    pub health: Duration,
    /// Reconciler interval per tenant; zero: no reconciler.
    pub reconcile: Duration,
    /// Whether the reconciler repairs confirmed drift.
    pub repair: bool,
}

/// What a call to `Engine::rebuild` found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rebuilt {
    /// The tenant is loaded (rebuilt now, or already by another replica).
    Done,
    /// Another replica holds the rebuild lock: its work is under way.
    Elsewhere,
}

/// Serving status, as the health job sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Serving {
    Yes,
    No,
}

/// Starts the jobs; each stops when `shutdown` turns true.
pub fn spawn(
    engine: Engine,
    timings: JobTimings,
    status: watch::Sender<Serving>,
    shutdown: watch::Receiver<bool>,
) -> Vec<JoinHandle<()>> {
    let mut handles = vec![
        tokio::spawn(every(timings.reap, shutdown.clone(), {
            let engine = engine.clone();
            move || {
                let engine = engine.clone();
                async move { engine.reap_all().await }
            }
        })),
        tokio::spawn(every(timings.ledger, shutdown.clone(), {
            let engine = engine.clone();
            move || {
                let engine = engine.clone();
                async move { engine.ledger_pass().await }
            }
        })),
        tokio::spawn(every(timings.reap * 2, shutdown.clone(), {
            let engine = engine.clone();
            move || {
                let engine = engine.clone();
                async move {
                    if let Err(e) = engine.deliver_webhooks().await {
                        tracing::debug!(error = %e, "webhook pass failed");
                    }
                }
            }
        })),
        tokio::spawn({
            let keys = engine.keys.clone();
            let shutdown = shutdown.clone();
            async move { keys.refresh_forever(shutdown).await }
        }),
        tokio::spawn(health_loop(engine.clone(), timings.health, status, shutdown.clone())),
    ];
    if !timings.reconcile.is_zero() {
        let replica = Uuid::new_v4().to_string();
        // Every replica looks often; one claims each tenant per interval.
        let look = (timings.reconcile / 4).max(Duration::from_millis(100));
        let (interval, repair) = (timings.reconcile, timings.repair);
        handles.push(tokio::spawn(every(look, shutdown, move || {
            let engine = engine.clone();
            let replica = replica.clone();
            async move { engine.reconcile_pass(&replica, interval, repair).await }
        })));
    }
    handles
}

async fn every<F, Fut>(period: Duration, mut shutdown: watch::Receiver<bool>, mut job: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => job().await,
            _ = shutdown.changed() => return,
        }
    }
}

async fn health_loop(
    engine: Engine,
    period: Duration,
    status: watch::Sender<Serving>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        let serving = engine.health_pass().await;
        publish(&status, serving);
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.changed() => return,
        }
    }
}

fn publish(status: &watch::Sender<Serving>, serving: Serving) {
    status.send_if_modified(|current| {
        let changed = *current != serving;
        *current = serving;
        changed
    });
}

impl Engine {
    /// One reaper pass over every tenant.
    pub async fn reap_all(&self) {
        for tenant in self.tenants.all() {
            if let Err(e) = self.reap_tenant(&tenant).await {
                tracing::debug!(error = %e, tenant = %tenant, "reaper pass failed");
            }
        }
    }

    async fn reap_tenant(&self, tenant: &str) -> Result<()> {
        // Expiring holds needs Redis alone: alerts that cannot reach
        // PostgreSQL stay in their stream for the next pass.
        if let Err(e) = self.move_alerts(tenant).await {
            tracing::debug!(error = %e, tenant, "alerts not moved to postgres yet");
        }
        let pass = self.hot.reap(tenant, 1000).await?;
        if pass.expired > 0 {
            tracing::debug!(tenant, expired = pass.expired, "holds expired");
            metrics().hold_ended(HoldEnd::expired, pass.expired);
        }
        let active = self.hot.active_holds(tenant).await?;
        metrics().holds_active.set(tenant, active as f64);
        if pass.overdue_commits.is_empty() {
            return Ok(());
        }
        let ids: Vec<Uuid> = pass.overdue_commits.iter().filter_map(|id| Uuid::parse_str(id).ok()).collect();
        // Without PostgreSQL's answer nothing is reverted.
        let durable = self.pg.holds_with_events(tenant, &ids).await?;
        for id in ids {
            let hold = id.to_string();
            if durable.contains(&id) {
                self.hot.finalize(tenant, &hold).await?;
            } else if self.hot.revert_overdue(tenant, &hold).await? {
                tracing::warn!(tenant, hold = %hold, "commit never became durable; its charge was reverted");
                metrics().hold_ended(HoldEnd::reverted, 1);
            }
        }
        Ok(())
    }

    /// Moves fired alerts from the tenant's Redis stream to the PostgreSQL
    /// outbox. Written first, removed after: a crash in between moves them
    /// again, and the outbox keeps one of each.
    async fn move_alerts(&self, tenant: &str) -> Result<()> {
        loop {
            let alerts = self.hot.pending_alerts(tenant, 500).await?;
            if alerts.is_empty() {
                return Ok(());
            }
            self.pg.insert_alerts(tenant, &alerts).await?;
            let ids: Vec<String> = alerts.iter().map(|a| a.stream_id.clone()).collect();
            self.hot.ack_alerts(tenant, &ids).await?;
            if alerts.len() < 500 {
                return Ok(());
            }
        }
    }

    /// One pass of ledger work.
    pub async fn ledger_pass(&self) {
        if let Err(e) = self.ledger_work().await {
            tracing::debug!(error = %e, "ledger pass failed");
        }
    }

    async fn ledger_work(&self) -> Result<()> {
        let now = self.clock.now();
        self.period_pass().await?;
        for entry in self.pg.activate_due_grants(now, 500).await? {
            self.apply_entry(&entry).await;
        }
        for (tenant, grant_id) in self.pg.expired_grants(now, 500).await? {
            if let Forfeited::Done(grant, Some(entry)) = self.pg.forfeit(&tenant, grant_id, Forfeit::Expiry).await? {
                tracing::info!(tenant = %tenant, grant = %grant.grant_id, forfeited = %grant.forfeited, "grant expired");
                self.apply_entry(&entry).await;
            }
        }
        for tenant in self.pg.tenants_to_allocate().await? {
            self.pg.allocate(&tenant).await?;
        }
        for entry in self.pg.unapplied_entries(500).await? {
            self.apply_entry(&entry).await;
        }
        Ok(())
    }

    /// Checks the backends and compares every tenant's fence in Redis with
    /// PostgreSQL's (one statement, one pipeline): a tenant Redis lacks is
    /// queued for a rebuild; one whose generation or position differs, or
    /// that the Redis process answering now has not verified (a restart,
    /// a restore, a failover), is queued for a check, which rebuilds it if
    /// it is behind. Both run in the background, a few at once; every
    /// other tenant keeps serving meanwhile, and a tenant's own calls
    /// answer UNAVAILABLE (TENANT_LOADING) until its rebuild ends.
    ///
    /// SERVING means Redis answers: a replica that cannot reach it can
    /// decide nothing. PostgreSQL being down alone does not stop Reserve,
    /// so it does not stop serving.
    pub async fn health_pass(&self) -> Serving {
        if let Err(e) = self.hot.ping().await {
            tracing::warn!(error = %e, "redis unreachable: not serving");
            return Serving::No;
        }
        match self.pg.tenant_limits().await {
            Ok(tenants) => self.tenants.replace(tenants),
            Err(e) => {
                tracing::warn!(error = %e, "postgres unreachable");
                return if self.tenants.all().is_empty() { Serving::No } else { Serving::Yes };
            }
        }
        let fences = match self.pg.fences().await {
            Ok(fences) => fences,
            Err(e) => {
                tracing::warn!(error = %e, "postgres unreachable");
                return Serving::Yes;
            }
        };
        let tenants: Vec<String> = fences.iter().map(|(t, _, _)| t.clone()).collect();
        let (views, identity) = match self.hot.fences(&tenants).await {
            Ok(read) => read,
            Err(e) => {
                tracing::warn!(error = %e, "redis unreachable: not serving");
                return Serving::No;
            }
        };
        for ((tenant, generation, position), view) in fences.iter().zip(&views) {
            if view.generation.is_empty() {
                self.want_rebuild(tenant);
            } else if view.generation != *generation
                || view.position < *position
                || (!identity.is_empty() && view.verified_by != identity)
            {
                self.want_check(tenant);
            }
        }
        metrics().tenants_loading.set(self.recovery.rebuilding_count() as i64);
        Serving::Yes
    }

    /// Recomputes one tenant's hot state from PostgreSQL. Replicas
    /// serialize on an advisory lock: one that finds it taken answers
    /// `Elsewhere` at once (its next health pass looks again), one that
    /// gets it after the work was done finds the state current.
    ///
    /// No wait bounds the commits in flight: the rebuild starts a new
    /// generation in PostgreSQL's fence before it reads, and from that
    /// commit on no usage event, ledger application or setting made on the
    /// old state is accepted there (a batch that raised the old fence
    /// first holds its row lock until it commits, so it is in the
    /// snapshot). The old state is unloaded first, so nothing decides on it
    /// meanwhile.
    pub async fn rebuild(&self, tenant: &str) -> Result<Rebuilt> {
        let started = std::time::Instant::now();
        let mut lock = self.pg.pool().begin().await?;
        // The lock's transaction idles while the snapshot runs (it has its
        // own, longer timeout): the session's idle-in-transaction limit
        // must not end it, or a second replica could start the same
        // rebuild meanwhile.
        sqlx::query("SET LOCAL idle_in_transaction_session_timeout = '15min'").execute(&mut *lock).await?;
        let locked: bool =
            sqlx::query_scalar("SELECT pg_try_advisory_xact_lock(hashtextextended('creditd.rebuild.' || $1, 0))")
                .bind(tenant)
                .fetch_one(&mut *lock)
                .await?;
        if !locked {
            return Ok(Rebuilt::Elsewhere);
        }
        if self.check_fence(tenant).await? == Verdict::Current {
            return Ok(Rebuilt::Done);
        }
        let process = self.hot.whoami(tenant).await?;
        // Unload first: from here on no script decides for the tenant.
        let scanned = self.hot.unload_tenant(tenant).await?;
        let generation = Uuid::now_v7().to_string();
        self.pg.new_generation(tenant, &generation, &process).await?;
        let snapshot = self.pg.snapshot(tenant).await?;
        let with_allowance: HashSet<&str> = snapshot.with_allowance.iter().map(String::as_str).collect();
        let mut accounts = Vec::with_capacity(snapshot.accounts.len());
        for a in &snapshot.accounts {
            let balance = snapshot.balances.get(&a.account_id).copied().unwrap_or_default();
            let drawn = snapshot.period_draws.get(&a.account_id).copied().unwrap_or_default();
            let counters = AccountCounters {
                balance,
                used: snapshot.usage.get(&a.account_id).copied().unwrap_or_default(),
                period_credits: balance
                    .max(Credits::ZERO)
                    .checked_add(drawn)
                    .ok_or_else(|| Error::internal(format!("account {}: period credits overflow", a.account_id)))?,
                fired: snapshot.fired.get(&a.account_id).cloned().unwrap_or_default(),
            };
            let has_allowance = with_allowance.contains(a.account_id.as_str());
            let alerts = snapshot.alert_policies.get(&a.account_id).unwrap_or(&snapshot.tenant_alerts);
            accounts.push((a.account_id.clone(), hot_settings(a, has_allowance, alerts), counters));
        }
        self.hot.load_tenant(tenant, &generation, &process, &accounts, &snapshot.unapplied).await?;
        self.pg.mark_applied(&snapshot.unapplied).await?;
        lock.commit().await?;
        tracing::info!(
            tenant,
            accounts = accounts.len(),
            generation = %generation,
            scanned_for_stale_keys = scanned,
            took_ms = started.elapsed().as_millis() as u64,
            "hot state rebuilt from postgres"
        );
        metrics().rebuilds.inc();
        Ok(Rebuilt::Done)
    }
}
