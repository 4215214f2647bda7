//! `creditd.v1.CreditService`.

use tonic::{Request, Response, Status};

use super::{
    caller::{Need, tenant},
    convert::{self, Sign},
    observe::record,
};
use crate::{
    decision::DenialReason,
    metrics::{Call, Decision, HoldEnd, metrics},
    pb::{self, credit_service_server::CreditService},
    service::{
        Engine,
        credit::{ChargeInput, CommitInput, ExtendInput, ReleaseInput, ReserveInput},
    },
    store::hot::ReserveOutcome,
};

fn count_decision(call: Call, outcome: &ReserveOutcome) {
    let decision = match outcome {
        ReserveOutcome::Granted { .. } => Decision::granted,
        ReserveOutcome::Denied(d) => match d.reason {
            DenialReason::InsufficientCredits => Decision::insufficient_credits,
            DenialReason::CapReached => Decision::cap_reached,
            DenialReason::AccountSuspended => Decision::account_suspended,
        },
    };
    metrics().decision(call, decision);
}

pub struct CreditApi {
    pub engine: Engine,
    /// Largest quantity of one usage item.
    pub max_quantity: rust_decimal::Decimal,
}

impl CreditApi {
    async fn tenant<T>(&self, request: &Request<T>) -> Result<String, Status> {
        Ok(tenant(&self.engine, request, Need::Runtime).await?)
    }
}

#[tonic::async_trait]
impl CreditService for CreditApi {
    async fn authorize(
        &self,
        request: Request<pb::AuthorizeRequest>,
    ) -> Result<Response<pb::AuthorizeResponse>, Status> {
        let tenant = self.tenant(&request).await?;
        let r = request.into_inner();
        let subject = convert::account_id("account_id", &r.account_id)?;
        record("account", &subject);
        let (text, usage) = match &r.cost {
            Some(pb::authorize_request::Cost::Amount(a)) => (Some(a.as_str()), None),
            Some(pb::authorize_request::Cost::Usage(u)) => (None, Some(u)),
            None => (None, None),
        };
        let cost = convert::cost(text, usage, Sign::Positive, "amount", self.max_quantity)?;
        let (decision, rating) = self.engine.authorize(&tenant, &subject, &cost).await?;
        count_decision(Call::authorize, &decision.outcome);
        Ok(Response::new(convert::authorize_response(&decision, rating.as_ref())))
    }

    async fn reserve(&self, request: Request<pb::ReserveRequest>) -> Result<Response<pb::ReserveResponse>, Status> {
        let tenant = self.tenant(&request).await?;
        let r = request.into_inner();
        let (text, usage) = match &r.cost {
            Some(pb::reserve_request::Cost::Amount(a)) => (Some(a.as_str()), None),
            Some(pb::reserve_request::Cost::Usage(u)) => (None, Some(u)),
            None => (None, None),
        };
        let input = ReserveInput {
            subject: convert::account_id("account_id", &r.account_id)?,
            cost: convert::cost(text, usage, Sign::Positive, "amount", self.max_quantity)?,
            ttl: convert::ttl(r.ttl)?,
            idempotency_key: convert::idempotency_key(&r.idempotency_key)?,
            labels: convert::labels(r.labels)?,
        };
        record("account", &input.subject);
        let (reserved, rating) = self.engine.reserve(&tenant, &input).await?;
        count_decision(Call::reserve, &reserved.outcome);
        if let ReserveOutcome::Granted { hold_id, .. } = &reserved.outcome {
            record("reservation", hold_id);
        }
        Ok(Response::new(convert::reserve_response(&reserved, rating.as_ref())))
    }

    async fn commit(&self, request: Request<pb::CommitRequest>) -> Result<Response<pb::CommitResponse>, Status> {
        let tenant = self.tenant(&request).await?;
        let r = request.into_inner();
        let (text, usage) = match &r.cost {
            Some(pb::commit_request::Cost::Amount(a)) => (Some(a.as_str()), None),
            Some(pb::commit_request::Cost::Usage(u)) => (None, Some(u)),
            None => (None, None),
        };
        let input = CommitInput {
            reservation_id: convert::reservation_id(&r.reservation_id)?,
            cost: convert::cost(text, usage, Sign::NonNegative, "amount", self.max_quantity)?,
            idempotency_key: convert::idempotency_key(&r.idempotency_key)?,
            labels: convert::labels(r.labels)?,
        };
        record("reservation", input.reservation_id);
        let recorded = self.engine.commit(&tenant, &input).await?;
        if !recorded.replayed {
            metrics().hold_ended(HoldEnd::committed, 1);
        }
        Ok(Response::new(convert::commit_response(&recorded)))
    }

    async fn release(&self, request: Request<pb::ReleaseRequest>) -> Result<Response<pb::ReleaseResponse>, Status> {
        let tenant = self.tenant(&request).await?;
        let r = request.into_inner();
        let input = ReleaseInput {
            reservation_id: convert::reservation_id(&r.reservation_id)?,
            idempotency_key: convert::idempotency_key(&r.idempotency_key)?,
        };
        record("reservation", input.reservation_id);
        let released = self.engine.release(&tenant, &input).await?;
        if !released.replayed {
            metrics().hold_ended(HoldEnd::released, 1);
        }
        Ok(Response::new(pb::ReleaseResponse {
            released: released.amount.to_string(),
            available: released.available.to_string(),
            replayed: released.replayed,
        }))
    }

    async fn extend(&self, request: Request<pb::ExtendRequest>) -> Result<Response<pb::ExtendResponse>, Status> {
        let tenant = self.tenant(&request).await?;
        let r = request.into_inner();
        let (text, usage) = match &r.more {
            Some(pb::extend_request::More::Amount(a)) => (Some(a.as_str()), None),
            Some(pb::extend_request::More::Usage(u)) => (None, Some(u)),
            None => (None, None),
        };
        let input = ExtendInput {
            reservation_id: convert::reservation_id(&r.reservation_id)?,
            more: convert::cost(text, usage, Sign::NonNegative, "amount", self.max_quantity)?,
            ttl: convert::ttl(r.ttl)?,
            idempotency_key: convert::idempotency_key(&r.idempotency_key)?,
        };
        record("reservation", input.reservation_id);
        let (extended, rating) = self.engine.extend(&tenant, &input).await?;
        let mut response = convert::extend_response(&extended);
        response.rating = rating.as_ref().map(convert::rating);
        Ok(Response::new(response))
    }

    async fn charge(&self, request: Request<pb::ChargeRequest>) -> Result<Response<pb::CommitResponse>, Status> {
        let tenant = self.tenant(&request).await?;
        let r = request.into_inner();
        let (text, usage) = match &r.cost {
            Some(pb::charge_request::Cost::Amount(a)) => (Some(a.as_str()), None),
            Some(pb::charge_request::Cost::Usage(u)) => (None, Some(u)),
            None => (None, None),
        };
        let input = ChargeInput {
            subject: convert::account_id("account_id", &r.account_id)?,
            cost: convert::cost(text, usage, Sign::NonNegative, "amount", self.max_quantity)?,
            idempotency_key: convert::idempotency_key(&r.idempotency_key)?,
            labels: convert::labels(r.labels)?,
        };
        record("account", &input.subject);
        let recorded = self.engine.charge(&tenant, &input).await?;
        Ok(Response::new(convert::commit_response(&recorded)))
    }

    async fn get_balance(
        &self,
        request: Request<pb::GetBalanceRequest>,
    ) -> Result<Response<pb::GetBalanceResponse>, Status> {
        let tenant = self.tenant(&request).await?;
        let r = request.into_inner();
        let subject = convert::account_id("account_id", &r.account_id)?;
        record("account", &subject);
        let view = self.engine.balance(&tenant, &subject).await?;
        Ok(Response::new(convert::balance_response(&subject, &view)))
    }
}
