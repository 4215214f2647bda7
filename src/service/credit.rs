//! The hot path: Authorize, Reserve, Commit, Release, Extend, Charge and
//! GetBalance.
//!
//! Reserve, Authorize, Release, Extend and GetBalance are one Redis script
//! each. Commit and Charge are a Redis prepare (the charge is applied and
//! the hold marked committing), a durable PostgreSQL write through the
//! group committer, then a Redis finalize that is not awaited: the answer
//! goes out as soon as the event is durable, and the reaper finalizes
//! whatever a crash left behind.

use std::{collections::BTreeMap, time::Duration};

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{Engine, payload_hash};
use rust_decimal::Decimal;

use crate::{
    decision::HoldState,
    domain::{
        Credits,
        pricing::{Line, Rating, UsageItem},
    },
    error::{Error, Reason, Result},
    store::{
        hot::{
            BalanceView, CommitCall, CommitTarget, ExtendCall, Extended, HotError, Prepared, Released, ReserveCall,
            ReserveOutcome, Reserved,
        },
        pg::{EventRow, Inserted, NewEvent},
    },
};

/// What a call costs: credits, or a usage to rate.
#[derive(Clone, Debug)]
pub enum Cost {
    Amount(Credits),
    Usage(Vec<UsageItem>),
}

impl Cost {
    /// A canonical text for payload hashes.
    fn fingerprint(&self) -> String {
        match self {
            Cost::Amount(a) => format!("amount:{a}"),
            Cost::Usage(items) => {
                let mut text = String::from("usage");
                for i in items {
                    text.push_str(&format!(":{}|{}|{}", i.meter, i.model, i.quantity.normalize()));
                }
                text
            }
        }
    }
}

pub struct ReserveInput {
    pub subject: String,
    pub cost: Cost,
    pub ttl: Option<Duration>,
    pub idempotency_key: String,
    pub labels: BTreeMap<String, String>,
}

pub struct CommitInput {
    pub reservation_id: Uuid,
    pub cost: Cost,
    pub idempotency_key: String,
    pub labels: BTreeMap<String, String>,
}

pub struct ChargeInput {
    pub subject: String,
    pub cost: Cost,
    pub idempotency_key: String,
    pub labels: BTreeMap<String, String>,
}

pub struct ReleaseInput {
    pub reservation_id: Uuid,
    pub idempotency_key: String,
}

pub struct ExtendInput {
    pub reservation_id: Uuid,
    pub more: Cost,
    pub ttl: Option<Duration>,
    pub idempotency_key: String,
}

/// A usage recorded by Commit or Charge.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub event_id: Uuid,
    pub amount: Credits,
    pub released: Credits,
    pub overdraft: Credits,
    pub available: Credits,
    pub replayed: bool,
    pub recorded_at: DateTime<Utc>,
    /// The line items, when the cost was a usage.
    pub rating: Option<Rating>,
}

impl Engine {
    /// Prices a cost: an amount as is, a usage with the catalog of
    /// `version` (pinned) or the one in force now.
    async fn price(&self, tenant: &str, cost: &Cost, version: Option<&str>) -> Result<(Credits, Option<Rating>)> {
        match cost {
            Cost::Amount(amount) => Ok((*amount, None)),
            Cost::Usage(items) => {
                let catalog = match version {
                    Some(v) => self.pricing.catalog(tenant, v).await?,
                    None => self.pricing.current(tenant).await?,
                };
                let rating = catalog.rate(items)?;
                Ok((rating.total, Some(rating)))
            }
        }
    }

    /// Rates a usage with no side effects (PricingService.Quote).
    pub async fn quote(&self, tenant: &str, items: &[UsageItem], at: Option<DateTime<Utc>>) -> Result<Rating> {
        let catalog = match at {
            Some(at) => {
                let version = self.pricing.version_at(tenant, at).await?;
                self.pricing.catalog(tenant, &version).await?
            }
            None => self.pricing.current(tenant).await?,
        };
        Ok(catalog.rate(items)?)
    }

    pub async fn authorize(&self, tenant: &str, subject: &str, cost: &Cost) -> Result<(Reserved, Option<Rating>)> {
        let (amount, rating) = self.price(tenant, cost, None).await?;
        let call = ReserveCall {
            subject,
            amount,
            ttl: self.limits.default_ttl,
            idempotency_key: None,
            payload_hash: "",
            labels_json: "",
            price_version: "",
        };
        let mut reserved = self
            .fenced(tenant, || self.hot.reserve(tenant, &call))
            .await
            .map_err(|e| self.account_error(e, subject))?;
        // The script answers what a granted Reserve would leave; Authorize
        // answers what a Reserve could hold now (credit.proto), which is
        // that plus the amount asked (no hold was made).
        if let ReserveOutcome::Granted { available, .. } = &mut reserved.outcome {
            *available = available.checked_add(amount).unwrap_or(*available);
        }
        Ok((reserved, rating))
    }

    pub async fn reserve(&self, tenant: &str, input: &ReserveInput) -> Result<(Reserved, Option<Rating>)> {
        let ttl = self.ttl(input.ttl)?;
        let labels_json = labels_json(&input.labels);
        let ttl_ms = ttl.as_millis().to_string();
        let hash = payload_hash(&["reserve", &input.subject, &input.cost.fingerprint(), &ttl_ms, &labels_json]);
        let (amount, rating) = self.price(tenant, &input.cost, None).await?;
        let version = rating.as_ref().map(|r| r.version.as_str()).unwrap_or_default();
        let call = ReserveCall {
            subject: &input.subject,
            amount,
            ttl,
            idempotency_key: Some(&input.idempotency_key),
            payload_hash: &hash,
            labels_json: &labels_json,
            price_version: version,
        };
        let reserved = self
            .fenced(tenant, || self.hot.reserve(tenant, &call))
            .await
            .map_err(|e| self.account_error(e, &input.subject))?;
        Ok((reserved, rating))
    }

    /// The version a hold pinned, for rating its commit or extension.
    async fn pinned_version(&self, tenant: &str, cost: &Cost, hold_id: &str) -> Result<Option<String>> {
        match cost {
            Cost::Amount(_) => Ok(None),
            Cost::Usage(_) => self.hot.price_version(tenant, hold_id).await.map_err(|e| self.hot_error(e)),
        }
    }

    pub async fn commit(&self, tenant: &str, input: &CommitInput) -> Result<Recorded> {
        let rid = input.reservation_id.to_string();
        let hash = payload_hash(&["commit", &rid, &input.cost.fingerprint(), &labels_json(&input.labels)]);
        let version = self.pinned_version(tenant, &input.cost, &rid).await?;
        let (cost, rating) = self.price(tenant, &input.cost, version.as_deref()).await?;
        // The idempotency decision comes before any effect: a key Redis no
        // longer remembers (its record outlived `hot.idempotency_ttl`, or
        // Redis lost it) may still name a stored event; the call is then a
        // replay (same payload) or a reuse (another payload), and neither
        // may touch the hold it names.
        if let Some(row) = self.pg.event_by_key(tenant, "commit", &input.idempotency_key).await? {
            return self.recorded_from_row(tenant, row, &hash).await;
        }
        let limit = self.commit_limit(tenant).await?;
        let event_id = Uuid::now_v7().to_string();
        let call = CommitCall {
            target: CommitTarget::Hold(&rid),
            cost,
            idempotency_key: &input.idempotency_key,
            payload_hash: &hash,
            event_id: &event_id,
            limit,
        };
        let prepared = match self.fenced(tenant, || self.hot.commit(tenant, &call)).await {
            Ok(prepared) => prepared,
            Err(HotError::NoHold) => {
                return self
                    .recorded_from_history(tenant, "commit", &input.idempotency_key, &hash, || {
                        Error::NotFound(Reason::ReservationNotFound, format!("reservation {rid} not found"))
                    })
                    .await;
            }
            Err(HotError::HoldState(state)) => {
                return self
                    .recorded_from_history(tenant, "commit", &input.idempotency_key, &hash, || {
                        hold_state_error(&rid, state)
                    })
                    .await;
            }
            Err(HotError::OverLimit(bound)) => {
                return Err(over_limit(format!(
                    "a cost of {cost} is above this reservation's commit limit of {bound} \
                     (the tenant's commit_limit: hold × hold_multiple + allowance); nothing changed and the \
                     reservation is still active"
                )));
            }
            Err(e) => return Err(self.hot_error(e)),
        };
        let mut labels = prepared.labels.clone();
        labels.extend(input.labels.clone());
        let durable = Durable { reservation_id: Some(input.reservation_id), key: &input.idempotency_key, hash: &hash };
        self.make_durable(tenant, prepared, durable, labels, rating).await
    }

    pub async fn charge(&self, tenant: &str, input: &ChargeInput) -> Result<Recorded> {
        let labels_json = labels_json(&input.labels);
        let hash = payload_hash(&["charge", &input.subject, &input.cost.fingerprint(), &labels_json]);
        let (cost, rating) = self.price(tenant, &input.cost, None).await?;
        // As in `commit`: the key's stored event decides first.
        if let Some(row) = self.pg.event_by_key(tenant, "charge", &input.idempotency_key).await? {
            return self.recorded_from_row(tenant, row, &hash).await;
        }
        let limit = self.commit_limit(tenant).await?;
        let event_id = Uuid::now_v7().to_string();
        let call = CommitCall {
            target: CommitTarget::Charge { subject: &input.subject, labels_json: &labels_json },
            cost,
            idempotency_key: &input.idempotency_key,
            payload_hash: &hash,
            event_id: &event_id,
            limit,
        };
        let prepared = match self.fenced(tenant, || self.hot.commit(tenant, &call)).await {
            Ok(prepared) => prepared,
            // Redis keeps the key's record but no longer the charge it
            // points at: the charge is in PostgreSQL.
            Err(HotError::NoHold) => {
                return self
                    .recorded_from_history(tenant, "charge", &input.idempotency_key, &hash, || {
                        Error::internal(format!(
                            "charge {}: an idempotency record without its charge in Redis or PostgreSQL",
                            input.idempotency_key
                        ))
                    })
                    .await;
            }
            Err(HotError::OverLimit(bound)) => {
                return Err(over_limit(format!(
                    "a cost of {cost} is above the largest Charge of {bound} (the tenant's commit_limit.charge_max); \
                     nothing changed"
                )));
            }
            Err(e) => return Err(self.account_error(e, &input.subject)),
        };
        let durable = Durable { reservation_id: None, key: &input.idempotency_key, hash: &hash };
        self.make_durable(tenant, prepared, durable, input.labels.clone(), rating).await
    }

    pub async fn release(&self, tenant: &str, input: &ReleaseInput) -> Result<Released> {
        let rid = input.reservation_id.to_string();
        let hash = payload_hash(&["release", &rid]);
        self.fenced(tenant, || self.hot.release(tenant, &rid, &input.idempotency_key, &hash)).await.map_err(|e| match e
        {
            HotError::NoHold => Error::NotFound(Reason::ReservationNotFound, format!("reservation {rid} not found")),
            HotError::HoldState(state) => hold_state_error(&rid, state),
            e => self.hot_error(e),
        })
    }

    pub async fn extend(&self, tenant: &str, input: &ExtendInput) -> Result<(Extended, Option<Rating>)> {
        let ttl = self.ttl(input.ttl)?;
        let rid = input.reservation_id.to_string();
        let hash = payload_hash(&["extend", &rid, &input.more.fingerprint(), &ttl.as_millis().to_string()]);
        let version = self.pinned_version(tenant, &input.more, &rid).await?;
        let (more, rating) = self.price(tenant, &input.more, version.as_deref()).await?;
        let call =
            ExtendCall { hold_id: &rid, more, ttl, idempotency_key: &input.idempotency_key, payload_hash: &hash };
        let extended = self.fenced(tenant, || self.hot.extend(tenant, &call)).await.map_err(|e| match e {
            HotError::NoHold => Error::NotFound(Reason::ReservationNotFound, format!("reservation {rid} not found")),
            HotError::HoldState(state) => hold_state_error(&rid, state),
            e => self.hot_error(e),
        })?;
        Ok((extended, rating))
    }

    pub async fn balance(&self, tenant: &str, subject: &str) -> Result<BalanceView> {
        self.fenced(tenant, || self.hot.balance(tenant, subject)).await.map_err(|e| self.account_error(e, subject))
    }

    /// Writes the prepared usage event durably, then finalizes the hold in
    /// the background.
    async fn make_durable(
        &self,
        tenant: &str,
        prepared: Prepared,
        durable: Durable<'_>,
        labels: BTreeMap<String, String>,
        rating: Option<Rating>,
    ) -> Result<Recorded> {
        let Durable { reservation_id, key: idempotency_key, hash } = durable;
        let event_id = Uuid::parse_str(&prepared.event_id)
            .map_err(|_| Error::internal(format!("hold {} carries a malformed event id", prepared.hold_id)))?;
        let event = NewEvent {
            event_id,
            tenant_id: tenant.to_string(),
            account_id: prepared.subject.clone(),
            reservation_id,
            idempotency_key: idempotency_key.to_string(),
            payload_hash: hash.to_string(),
            amount: prepared.cost,
            held: prepared.held,
            overdraft: prepared.overdraft,
            draws: prepared.charges.clone(),
            labels: serde_json::to_value(&labels).unwrap_or_default(),
            fence: prepared.fence.clone(),
            recorded_at: prepared.recorded_at,
            price_version: rating.as_ref().map(|r| r.version.clone()),
            line_items: rating.as_ref().map(|r| lines_json(&r.lines)),
        };
        match self.committer.write(event).await {
            Ok(Inserted::New) => {}
            Ok(Inserted::Existing(row)) if row.event_id == event_id => {}
            Ok(Inserted::Fenced) => {
                // Prepared on a hot state PostgreSQL no longer trusts (a
                // rebuild started, or another Redis process took over):
                // nothing is recorded; the retry reaches the current state
                // (which has the hold or reports it lost), and the reaper
                // reverts this preparation if no retry comes.
                tracing::warn!(tenant, hold = %prepared.hold_id, "usage prepared on a hot state no longer trusted; the client should retry");
                self.want_check(tenant);
                return Err(Error::Unavailable(
                    "the hot state changed under the commit (a rebuild or a Redis failover); nothing was recorded"
                        .into(),
                ));
            }
            Ok(Inserted::Existing(row)) => {
                // The key was used before, beyond what Redis remembers: undo
                // this second charge and answer from the stored event.
                if let Err(e) = self.hot.revert_now(tenant, &prepared.hold_id).await {
                    tracing::error!(error = %e, hold = %prepared.hold_id, "cannot undo a duplicate charge; the reconciler must");
                }
                return self.recorded_from_row(tenant, row, hash).await;
            }
            Err(e) if e.is_transient() => {
                tracing::warn!(error = %e, hold = %prepared.hold_id, "usage event not durable; the client should retry");
                return Err(Error::Unavailable(Box::new(ArcError(e))));
            }
            Err(e) => {
                // PostgreSQL refused this event for good: a retry with the
                // same payload would fail the same way, so the client is
                // not told to retry. The hold stays committing and the
                // reaper reverts it at its deadline (no event exists).
                tracing::error!(error = %e, hold = %prepared.hold_id, "usage event refused by postgres");
                crate::metrics::metrics().store_error(crate::metrics::Store::postgres, false);
                return Err(Error::Internal(Box::new(ArcError(e))));
            }
        }
        self.hot.finalize_later(tenant, prepared.hold_id.clone());
        Ok(Recorded {
            event_id,
            amount: prepared.cost,
            released: prepared.released,
            overdraft: prepared.overdraft,
            available: prepared.available,
            replayed: prepared.replayed,
            recorded_at: prepared.recorded_at,
            rating,
        })
    }

    /// Answers a Commit or Charge whose idempotency key Redis no longer
    /// remembers from the stored usage event, or fails with `otherwise`.
    async fn recorded_from_history(
        &self,
        tenant: &str,
        kind: &str,
        key: &str,
        hash: &str,
        otherwise: impl FnOnce() -> Error,
    ) -> Result<Recorded> {
        match self.pg.event_by_key(tenant, kind, key).await? {
            Some(row) => self.recorded_from_row(tenant, row, hash).await,
            None => Err(otherwise()),
        }
    }

    async fn recorded_from_row(&self, tenant: &str, row: EventRow, hash: &str) -> Result<Recorded> {
        if row.payload_hash != hash {
            return Err(HotError::KeyReused.into());
        }
        let available = self.hot.balance(tenant, &row.account_id).await.map(|b| b.available).unwrap_or_default();
        Ok(Recorded {
            event_id: row.event_id,
            amount: row.amount,
            released: row.held.checked_sub(row.amount).unwrap_or_default().max(Credits::ZERO),
            overdraft: row.overdraft,
            available,
            replayed: true,
            recorded_at: row.recorded_at,
            rating: match (row.price_version, row.line_items) {
                (Some(version), Some(lines)) => {
                    Some(Rating { lines: lines_from_json(&lines)?, total: row.amount, version })
                }
                _ => None,
            },
        })
    }

    fn ttl(&self, requested: Option<Duration>) -> Result<Duration> {
        let ttl = requested.unwrap_or(self.limits.default_ttl);
        if ttl < self.limits.min_ttl || ttl > self.limits.max_ttl {
            return Err(Error::invalid(
                "ttl",
                Reason::InvalidTtl,
                format!(
                    "must lie within [{}s, {}s]",
                    self.limits.min_ttl.as_secs_f64(),
                    self.limits.max_ttl.as_secs_f64()
                ),
            ));
        }
        Ok(ttl)
    }

    /// Maps a hot-store error of a call naming `subject`.
    fn account_error(&self, e: HotError, subject: &str) -> Error {
        match e {
            HotError::AccountNotFound => {
                Error::NotFound(Reason::AccountNotFound, format!("account {subject} not found"))
            }
            e => self.hot_error(e),
        }
    }

    pub(crate) fn hot_error(&self, e: HotError) -> Error {
        e.into()
    }
}

/// How a prepared usage is identified in PostgreSQL.
struct Durable<'a> {
    reservation_id: Option<Uuid>,
    key: &'a str,
    hash: &'a str,
}

/// Line items as stored with the usage event (decimals as strings).
fn lines_json(lines: &[Line]) -> serde_json::Value {
    serde_json::Value::Array(
        lines
            .iter()
            .map(|l| {
                serde_json::json!({
                    "meter": l.meter, "model": l.model, "tier": l.tier,
                    "quantity": l.quantity.normalize().to_string(),
                    "unit_price": l.unit_price.normalize().to_string(),
                    "per_units": l.per_units,
                    "subtotal": l.subtotal.normalize().to_string(),
                })
            })
            .collect(),
    )
}

fn lines_from_json(value: &serde_json::Value) -> Result<Vec<Line>> {
    let bad = || Error::internal("stored line items are unreadable");
    let decimal = |v: &serde_json::Value| v.as_str().and_then(|s| s.parse::<Decimal>().ok()).ok_or_else(bad);
    value
        .as_array()
        .ok_or_else(bad)?
        .iter()
        .map(|l| {
            Ok(Line {
                meter: l["meter"].as_str().ok_or_else(bad)?.to_string(),
                model: l["model"].as_str().unwrap_or_default().to_string(),
                tier: l["tier"].as_str().map(str::to_string),
                quantity: decimal(&l["quantity"])?,
                unit_price: decimal(&l["unit_price"])?,
                per_units: l["per_units"].as_i64().ok_or_else(bad)?,
                subtotal: decimal(&l["subtotal"])?,
            })
        })
        .collect()
}

fn hold_state_error(rid: &str, state: HoldState) -> Error {
    let (reason, what) = match state {
        HoldState::Committing | HoldState::Committed => (Reason::ReservationCommitted, "already committed"),
        HoldState::Released => (Reason::ReservationReleased, "already released"),
        HoldState::Expired => (Reason::ReservationExpired, "expired"),
        HoldState::Reverted => (
            Reason::CommitReverted,
            "not committed: its commit could not be recorded before its deadline, so it was reverted \
             (no usage was recorded and its credits returned; record the usage with Charge)",
        ),
    };
    Error::FailedPrecondition(reason, format!("reservation {rid} is {what}"))
}

fn over_limit(detail: String) -> Error {
    Error::FailedPrecondition(Reason::CommitLimitExceeded, detail)
}

fn labels_json(labels: &BTreeMap<String, String>) -> String {
    if labels.is_empty() {
        return String::new();
    }
    serde_json::to_string(labels).unwrap_or_default()
}

/// Lets an error shared by a whole commit batch be a boxed source.
#[derive(Debug)]
struct ArcError(std::sync::Arc<crate::store::pg::PgError>);

impl std::fmt::Display for ArcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for ArcError {}
