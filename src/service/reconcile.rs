//! The reconciler: measures, per account, the drift between the hot
//! balance in Redis and the balance the ledger in PostgreSQL implies, and
//! repairs it.
//!
//! Both stores move under traffic, so a naive comparison sees commits in
//! flight as drift. A measurement is exact instead:
//!
//! 1. Redis, atomically per page of accounts (`reconcile.lua`): balances,
//!    cap usage and period credits, and the holds still `committing` with
//!    what they charged each account;
//! 2. PostgreSQL, one snapshot: ledger balances (Σ ledger − unallocated
//!    draws), ledger rows not yet applied to Redis, and which of those
//!    committing holds already have their usage event;
//! 3. the expected hot balance is the ledger's, minus what committing holds
//!    charged without an event in the snapshot, minus unapplied rows whose
//!    Redis marker is absent;
//! 4. every account that differs is read again in Redis: if its counters
//!    moved since step 1, something happened in between and the account is
//!    left to the next pass (`busy`); otherwise the difference is drift.
//!
//! Repair (when enabled) needs two measurements that agree, then moves the
//! hot balance by the difference only if it still holds the measured value
//! (`repair.lua`). PostgreSQL is the source of truth; Redis follows it.

use std::collections::{HashMap, HashSet};

use uuid::Uuid;

use super::Engine;
use crate::{
    domain::Credits,
    error::Result,
    metrics::metrics,
    store::hot::{HotCounters, HotCut, HotError},
};

/// Accounts per Redis read.
const PAGE: usize = 500;

/// One account whose hot balance differs from the ledger.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Drift {
    pub account_id: String,
    /// Redis.
    pub hot: Credits,
    /// What the ledger implies Redis should hold, commits in flight and
    /// ledger rows not yet applied accounted for.
    pub ledger: Credits,
}

impl Drift {
    /// hot − ledger.
    pub fn amount(&self) -> Credits {
        Credits::from_micros(self.hot.micros() - self.ledger.micros())
    }
}

/// One measurement of a tenant.
#[derive(Clone, Debug, Default)]
pub struct Measured {
    /// The epoch of the hot state measured ('' when not loaded).
    pub epoch: String,
    pub accounts: u64,
    pub drifts: Vec<Drift>,
    /// Accounts that moved while being compared (not judged this time).
    pub busy: Vec<String>,
}

/// The outcome of one reconciliation of a tenant.
#[derive(Clone, Debug, Default)]
pub struct Reconciled {
    pub measured: Measured,
    /// Drifts confirmed by a second measurement and repaired.
    pub repaired: Vec<Drift>,
}

impl Engine {
    /// Measures every account of the tenant once (see the module comment).
    pub async fn measure_drift(&self, tenant: &str) -> Result<Measured> {
        let accounts = self.pg.account_ids(tenant).await?;
        let mut cuts = Vec::new();
        let mut epoch = None;
        for page in accounts.chunks(PAGE) {
            let cut = self.hot.reconcile_read(tenant, page, &[], true).await?;
            if cut.epoch.is_empty() || epoch.get_or_insert_with(|| cut.epoch.clone()) != &cut.epoch {
                // Not loaded, or rebuilt meanwhile: nothing can be judged.
                return Err(self.hot_error(HotError::NotLoaded));
            }
            cuts.push((page, cut));
        }
        let epoch = epoch.unwrap_or_default();
        // Each page saw the committing holds at its own instant: the same
        // hold is usually on several.
        let holds: Vec<Uuid> = cuts
            .iter()
            .flat_map(|(_, cut)| cut.committing.iter().filter_map(|(id, _)| Uuid::parse_str(id).ok()))
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let view = self.pg.ledger_view(tenant, &holds).await?;

        // Candidates: accounts whose hot balance differs from the ledger's
        // as far as the first read can tell.
        struct Candidate<'a> {
            account: &'a str,
            first: HotCounters,
            in_flight: Credits,
        }
        let with_unapplied: HashSet<&str> = view.unapplied.iter().map(|e| e.account_id.as_str()).collect();
        let mut candidates = Vec::new();
        let mut busy = Vec::new();
        let mut measured_accounts = 0u64;
        for (page, cut) in &cuts {
            let in_flight = in_flight_charges(cut, &view.durable);
            for (account, counters) in page.iter().zip(&cut.counters) {
                let Some(first) = counters else {
                    // An account PostgreSQL has and Redis lacks (yet: an
                    // account reaches Redis just after its row commits):
                    // not judged, like one that moves while compared.
                    tracing::warn!(tenant, account = %account, "account missing from the hot state");
                    busy.push(account.clone());
                    continue;
                };
                measured_accounts += 1;
                let in_flight = in_flight.get(account.as_str()).copied().unwrap_or_default();
                let ledger = view.balances.get(account).copied().unwrap_or_default();
                // Unapplied rows are checked in the second read; a first
                // guess assumes every one of them reached Redis.
                if first.balance.micros() + in_flight.micros() != ledger.micros()
                    || with_unapplied.contains(account.as_str())
                {
                    candidates.push(Candidate { account, first: *first, in_flight });
                }
            }
        }

        let mut drifts = Vec::new();
        for chunk in candidates.chunks(PAGE) {
            let names: Vec<String> = chunk.iter().map(|c| c.account.to_string()).collect();
            let in_chunk: HashSet<&str> = chunk.iter().map(|c| c.account).collect();
            let rows: Vec<_> = view.unapplied.iter().filter(|e| in_chunk.contains(e.account_id.as_str())).collect();
            let markers: Vec<i64> = rows.iter().map(|e| e.entry_id).collect();
            let again = self.hot.reconcile_read(tenant, &names, &markers, false).await?;
            if again.epoch != epoch {
                return Err(self.hot_error(HotError::NotLoaded));
            }
            for (candidate, now) in chunk.iter().zip(&again.counters) {
                if now.as_ref() != Some(&candidate.first) {
                    busy.push(candidate.account.to_string());
                    measured_accounts -= 1;
                    continue;
                }
                let missing: i64 = rows
                    .iter()
                    .zip(&again.applied)
                    .filter(|(e, applied)| e.account_id == candidate.account && !**applied)
                    .map(|(e, _)| e.amount.micros())
                    .sum();
                let ledger = view.balances.get(candidate.account).copied().unwrap_or_default().micros();
                let expected = Credits::from_micros(ledger - missing - candidate.in_flight.micros());
                if candidate.first.balance != expected {
                    drifts.push(Drift {
                        account_id: candidate.account.to_string(),
                        hot: candidate.first.balance,
                        ledger: expected,
                    });
                }
            }
        }
        Ok(Measured { epoch, accounts: measured_accounts, drifts, busy })
    }

    /// Measures until no account is busy (at most six times, 50 ms
    /// apart), for the CheckBalances RPC: drifts, and accounts still busy
    /// at the end. UNAVAILABLE while the tenant's hot state is not loaded.
    pub async fn check_balances(&self, tenant: &str) -> Result<Measured> {
        let mut measured = self.measure_drift(tenant).await?;
        for _ in 0..5 {
            if measured.busy.is_empty() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            measured = self.measure_drift(tenant).await?;
        }
        Ok(measured)
    }

    /// Reconciles one tenant: measures, and with `repair`, measures again
    /// and repairs the drifts both measurements agree on.
    pub async fn reconcile_tenant(&self, tenant: &str, repair: bool) -> Result<Reconciled> {
        let first = self.measure_drift(tenant).await?;
        let m = metrics();
        m.reconcile_skipped_busy.inc_by(first.busy.len() as u64);
        m.drift_accounts.set(tenant, first.drifts.len() as f64);
        let total: i64 = first.drifts.iter().map(|d| d.amount().micros().abs()).sum();
        m.drift_credits.set(tenant, total as f64 / 1_000_000.0);
        m.reconcile_runs.inc();
        if first.drifts.is_empty() {
            return Ok(Reconciled { measured: first, repaired: Vec::new() });
        }
        m.drift_found.inc_by(first.drifts.len() as u64);
        for d in &first.drifts {
            tracing::warn!(
                tenant,
                account = %d.account_id,
                hot = %d.hot,
                ledger = %d.ledger,
                drift = %d.amount(),
                "hot balance drifts from the ledger"
            );
        }
        if !repair {
            return Ok(Reconciled { measured: first, repaired: Vec::new() });
        }
        let second = self.measure_drift(tenant).await?;
        let mut repaired = Vec::new();
        for d in &first.drifts {
            if second.epoch != first.epoch || !second.drifts.contains(d) {
                continue;
            }
            let delta = Credits::from_micros(d.ledger.micros() - d.hot.micros());
            let Some(fence) = self.hot.repair_balance(tenant, &first.epoch, &d.account_id, d.hot, delta).await? else {
                continue;
            };
            // A repair PostgreSQL's fence refuses was made on a state no
            // longer trusted, which is checked (and rebuilt) anyway.
            if self.pg.confirm_fence(tenant, &fence).await? {
                tracing::warn!(tenant, account = %d.account_id, set_to = %d.ledger, "hot balance repaired from the ledger");
                m.drift_repaired.inc();
                repaired.push(d.clone());
            }
        }
        // The gauges say what is left after this pass's repairs.
        let left: Vec<&Drift> = first.drifts.iter().filter(|d| !repaired.contains(d)).collect();
        m.drift_accounts.set(tenant, left.len() as f64);
        let total: i64 = left.iter().map(|d| d.amount().micros().abs()).sum();
        m.drift_credits.set(tenant, total as f64 / 1_000_000.0);
        Ok(Reconciled { measured: first, repaired })
    }

    /// One reconciler pass: every tenant whose interval this replica
    /// claims.
    pub async fn reconcile_pass(&self, replica: &str, interval: std::time::Duration, repair: bool) {
        for tenant in self.tenants.all() {
            let claimed = match self.hot.claim_reconcile(&tenant, replica, interval).await {
                Ok(claimed) => claimed,
                Err(e) => {
                    tracing::debug!(error = %e, tenant = %tenant, "reconcile claim failed");
                    continue;
                }
            };
            if !claimed {
                continue;
            }
            if let Err(e) = self.reconcile_tenant(&tenant, repair).await {
                tracing::debug!(error = %e, tenant = %tenant, "reconciliation failed");
            }
        }
    }
}

/// Per account: what holds committing at the read charged it and that
/// PostgreSQL has no event for yet (Redis already counts it, the ledger
/// not).
fn in_flight_charges<'a>(cut: &'a HotCut, durable: &HashSet<Uuid>) -> HashMap<&'a str, Credits> {
    let mut out: HashMap<&str, Credits> = HashMap::new();
    for (hold, charges) in &cut.committing {
        if Uuid::parse_str(hold).is_ok_and(|id| durable.contains(&id)) {
            continue;
        }
        for (account, amount) in charges {
            let entry = out.entry(account.as_str()).or_default();
            *entry = Credits::from_micros(entry.micros() + amount.micros());
        }
    }
    out
}
