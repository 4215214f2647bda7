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
use crate::{
    decision::HoldState,
    domain::Credits,
    error::{Error, Reason, Result},
    store::{
        hot::{
            BalanceView, CommitCall, CommitTarget, ExtendCall, Extended, HotError, Prepared, Released, ReserveCall,
            Reserved,
        },
        pg::{EventRow, Inserted, NewEvent},
    },
};

pub struct ReserveInput {
    pub subject: String,
    pub amount: Credits,
    pub ttl: Option<Duration>,
    pub idempotency_key: String,
    pub labels: BTreeMap<String, String>,
}

pub struct CommitInput {
    pub reservation_id: Uuid,
    pub amount: Credits,
    pub idempotency_key: String,
    pub labels: BTreeMap<String, String>,
}

pub struct ChargeInput {
    pub subject: String,
    pub amount: Credits,
    pub idempotency_key: String,
    pub labels: BTreeMap<String, String>,
}

pub struct ReleaseInput {
    pub reservation_id: Uuid,
    pub idempotency_key: String,
}

pub struct ExtendInput {
    pub reservation_id: Uuid,
    pub more: Credits,
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
}

impl Engine {
    pub async fn authorize(&self, tenant: &str, subject: &str, amount: Credits) -> Result<Reserved> {
        let call = ReserveCall {
            subject,
            amount,
            ttl: self.limits.default_ttl,
            idempotency_key: None,
            payload_hash: "",
            labels_json: "",
        };
        self.hot.reserve(tenant, &call).await.map_err(|e| self.account_error(e, subject))
    }

    pub async fn reserve(&self, tenant: &str, input: &ReserveInput) -> Result<Reserved> {
        let ttl = self.ttl(input.ttl)?;
        let labels_json = labels_json(&input.labels);
        let ttl_ms = ttl.as_millis().to_string();
        let amount = input.amount.to_string();
        let hash = payload_hash(&["reserve", &input.subject, &amount, &ttl_ms, &labels_json]);
        let call = ReserveCall {
            subject: &input.subject,
            amount: input.amount,
            ttl,
            idempotency_key: Some(&input.idempotency_key),
            payload_hash: &hash,
            labels_json: &labels_json,
        };
        self.hot.reserve(tenant, &call).await.map_err(|e| self.account_error(e, &input.subject))
    }

    pub async fn commit(&self, tenant: &str, input: &CommitInput) -> Result<Recorded> {
        let rid = input.reservation_id.to_string();
        let hash = payload_hash(&["commit", &rid, &input.amount.to_string(), &labels_json(&input.labels)]);
        let event_id = Uuid::now_v7().to_string();
        let call = CommitCall {
            target: CommitTarget::Hold(&rid),
            cost: input.amount,
            idempotency_key: &input.idempotency_key,
            payload_hash: &hash,
            event_id: &event_id,
        };
        let prepared = match self.hot.commit(tenant, &call).await {
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
            Err(e) => return Err(self.hot_error(e)),
        };
        let mut labels = prepared.labels.clone();
        labels.extend(input.labels.clone());
        self.make_durable(tenant, prepared, Some(input.reservation_id), &input.idempotency_key, &hash, labels).await
    }

    pub async fn charge(&self, tenant: &str, input: &ChargeInput) -> Result<Recorded> {
        let labels_json = labels_json(&input.labels);
        let hash = payload_hash(&["charge", &input.subject, &input.amount.to_string(), &labels_json]);
        let event_id = Uuid::now_v7().to_string();
        let call = CommitCall {
            target: CommitTarget::Charge { subject: &input.subject, labels_json: &labels_json },
            cost: input.amount,
            idempotency_key: &input.idempotency_key,
            payload_hash: &hash,
            event_id: &event_id,
        };
        let prepared = self.hot.commit(tenant, &call).await.map_err(|e| self.account_error(e, &input.subject))?;
        self.make_durable(tenant, prepared, None, &input.idempotency_key, &hash, input.labels.clone()).await
    }

    pub async fn release(&self, tenant: &str, input: &ReleaseInput) -> Result<Released> {
        let rid = input.reservation_id.to_string();
        let hash = payload_hash(&["release", &rid]);
        self.hot.release(tenant, &rid, &input.idempotency_key, &hash).await.map_err(|e| match e {
            HotError::NoHold => Error::NotFound(Reason::ReservationNotFound, format!("reservation {rid} not found")),
            HotError::HoldState(state) => hold_state_error(&rid, state),
            e => self.hot_error(e),
        })
    }

    pub async fn extend(&self, tenant: &str, input: &ExtendInput) -> Result<Extended> {
        let ttl = self.ttl(input.ttl)?;
        let rid = input.reservation_id.to_string();
        let hash = payload_hash(&["extend", &rid, &input.more.to_string(), &ttl.as_millis().to_string()]);
        let call = ExtendCall {
            hold_id: &rid,
            more: input.more,
            ttl,
            idempotency_key: &input.idempotency_key,
            payload_hash: &hash,
        };
        self.hot.extend(tenant, &call).await.map_err(|e| match e {
            HotError::NoHold => Error::NotFound(Reason::ReservationNotFound, format!("reservation {rid} not found")),
            HotError::HoldState(state) => hold_state_error(&rid, state),
            e => self.hot_error(e),
        })
    }

    pub async fn balance(&self, tenant: &str, subject: &str) -> Result<BalanceView> {
        self.hot.balance(tenant, subject).await.map_err(|e| self.account_error(e, subject))
    }

    /// Writes the prepared usage event durably, then finalizes the hold in
    /// the background.
    async fn make_durable(
        &self,
        tenant: &str,
        prepared: Prepared,
        reservation_id: Option<Uuid>,
        idempotency_key: &str,
        hash: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Recorded> {
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
            hot_epoch: prepared.epoch.clone(),
            recorded_at: prepared.recorded_at,
        };
        match self.committer.write(event).await {
            Ok(Inserted::New) => {}
            Ok(Inserted::Existing(row)) if row.event_id == event_id => {}
            Ok(Inserted::Existing(row)) => {
                // The key was used before, beyond what Redis remembers: undo
                // this second charge and answer from the stored event.
                if let Err(e) = self.hot.revert_now(tenant, &prepared.hold_id).await {
                    tracing::error!(error = %e, hold = %prepared.hold_id, "cannot undo a duplicate charge; the reconciler must");
                }
                return self.recorded_from_row(tenant, row, hash).await;
            }
            Err(e) => {
                tracing::warn!(error = %e, hold = %prepared.hold_id, "usage event not durable; the client should retry");
                return Err(Error::Unavailable(Box::new(ArcError(e))));
            }
        }
        let hot = self.hot.clone();
        let tenant_owned = tenant.to_string();
        let hold_id = prepared.hold_id.clone();
        tokio::spawn(async move {
            if let Err(e) = hot.finalize(&tenant_owned, &hold_id).await {
                tracing::debug!(error = %e, hold = %hold_id, "finalize deferred to the reaper");
            }
        });
        Ok(Recorded {
            event_id,
            amount: prepared.cost,
            released: prepared.released,
            overdraft: prepared.overdraft,
            available: prepared.available,
            replayed: prepared.replayed,
            recorded_at: prepared.recorded_at,
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
        if matches!(e, HotError::NotLoaded) {
            self.rebuild_wanted.notify_one();
        }
        e.into()
    }
}

fn hold_state_error(rid: &str, state: HoldState) -> Error {
    let (reason, what) = match state {
        HoldState::Committing | HoldState::Committed => (Reason::ReservationCommitted, "already committed"),
        HoldState::Released => (Reason::ReservationReleased, "already released"),
        HoldState::Expired => (Reason::ReservationExpired, "expired"),
    };
    Error::FailedPrecondition(reason, format!("reservation {rid} is {what}"))
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
