//! `creditd.v1.AlertService`.

use std::{collections::VecDeque, pin::Pin};

use futures::Stream;
use tonic::{Request, Response, Status};

use super::{
    caller::{Need, caller, tenant},
    convert::{self, Sign},
};
use crate::{
    error::{Error, Reason},
    pb::{self, alert_service_server::AlertService},
    service::{
        Engine,
        watch::{AlertWatch, Subscription},
    },
    store::alerts::{AlertPolicy, AlertRow, Webhook},
};

pub struct AlertApi {
    pub engine: Engine,
    /// The WatchAlerts streams open on this replica and their limits.
    pub watch: AlertWatch,
}

/// A stream holding its slot of the stream limits until it is dropped.
struct Slotted<S> {
    inner: Pin<Box<S>>,
    _slot: Subscription,
}

impl<S: Stream> Stream for Slotted<S> {
    type Item = S::Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

fn alert(a: &AlertRow) -> pb::Alert {
    pb::Alert {
        cursor: a.seq.to_string(),
        account_id: a.account_id.clone(),
        kind: if a.kind == "percent" { pb::ThresholdKind::Percent } else { pb::ThresholdKind::Amount } as i32,
        threshold: a.threshold.normalize().to_string(),
        available: a.available.to_string(),
        period_credits: a.period_credits.to_string(),
        fired_at: Some(convert::timestamp(a.fired_at)),
    }
}

fn cursor(text: &str) -> Result<Option<i64>, Error> {
    if text.is_empty() {
        return Ok(None);
    }
    text.parse::<i64>()
        .ok()
        .filter(|c| *c >= 0)
        .map(Some)
        .ok_or_else(|| Error::invalid("cursor", Reason::InvalidArgument, "is not a cursor creditd issued"))
}

fn policy_pb(account_id: &str, p: &AlertPolicy) -> pb::AlertPolicy {
    pb::AlertPolicy {
        account_id: account_id.to_string(),
        percents: p.percents.clone(),
        amounts: p.amounts.iter().map(|a| a.to_string()).collect(),
        rearm_on_topup: p.rearm_on_topup,
    }
}

#[tonic::async_trait]
impl AlertService for AlertApi {
    type WatchAlertsStream = Pin<Box<dyn Stream<Item = Result<pb::Alert, Status>> + Send>>;

    async fn watch_alerts(
        &self,
        request: Request<pb::WatchAlertsRequest>,
    ) -> Result<Response<Self::WatchAlertsStream>, Status> {
        let caller = caller(&self.engine, &request, Need::Admin).await?;
        let tenant = tenant(&self.engine, &request, Need::Admin).await?;
        let start = cursor(&request.get_ref().cursor)?;
        // The slot first: a refused stream costs no query.
        let subscription = self.watch.subscribe(&tenant, caller.key_id)?;
        let start = match start {
            Some(c) => c,
            None => self.engine.pg.last_alert(&tenant).await.map_err(Error::from)?,
        };
        let engine = self.engine.clone();
        let poll = self.watch.poll();
        let state = (start, VecDeque::<AlertRow>::new(), subscription.newest.clone());
        let stream = futures::stream::unfold(state, move |(mut after, mut buffer, mut newest)| {
            let engine = engine.clone();
            let tenant = tenant.clone();
            async move {
                loop {
                    if let Some(next) = buffer.pop_front() {
                        after = next.seq;
                        return Some((Ok(alert(&next)), (after, buffer, newest)));
                    }
                    if *newest.borrow_and_update() > after {
                        match engine.pg.alerts_after(&tenant, after, 100).await {
                            Ok(rows) if !rows.is_empty() => {
                                buffer.extend(rows);
                                continue;
                            }
                            // A sequence gap (a rolled-back write): wait for
                            // the next alert.
                            Ok(_) => {}
                            Err(e) => {
                                tracing::warn!(error = %e, "alert stream: cannot read the outbox; retrying");
                                tokio::time::sleep(poll * 4).await;
                                continue;
                            }
                        }
                    }
                    if newest.changed().await.is_err() {
                        // The poller is gone (it never is while a stream
                        // lives); fall back to the interval.
                        tokio::time::sleep(poll).await;
                    }
                }
            }
        });
        // The slot is held as long as the stream, and freed when the
        // client goes away and tonic drops it.
        Ok(Response::new(Box::pin(Slotted { inner: Box::pin(stream), _slot: subscription })))
    }

    async fn list_alerts(
        &self,
        request: Request<pb::ListAlertsRequest>,
    ) -> Result<Response<pb::ListAlertsResponse>, Status> {
        let tenant = tenant(&self.engine, &request, Need::Admin).await?;
        let r = request.into_inner();
        let after = cursor(&r.cursor)?.unwrap_or(0);
        let limit = match r.limit {
            0 => 100,
            n @ 1..=1000 => i64::from(n),
            _ => return Err(Error::invalid("limit", Reason::InvalidArgument, "must be between 0 and 1000").into()),
        };
        let rows = self.engine.pg.alerts_after(&tenant, after, limit).await.map_err(Error::from)?;
        let cursor = rows.last().map_or(r.cursor.clone(), |a| a.seq.to_string());
        Ok(Response::new(pb::ListAlertsResponse { alerts: rows.iter().map(alert).collect(), cursor }))
    }

    async fn set_alert_policy(
        &self,
        request: Request<pb::SetAlertPolicyRequest>,
    ) -> Result<Response<pb::AlertPolicy>, Status> {
        let tenant = tenant(&self.engine, &request, Need::Admin).await?;
        let p = request
            .into_inner()
            .policy
            .ok_or_else(|| Error::invalid("policy", Reason::InvalidArgument, "is required"))?;
        if p.percents.len() + p.amounts.len() > 16 {
            return Err(Error::invalid("policy", Reason::InvalidArgument, "has more than 16 thresholds").into());
        }
        for (i, pct) in p.percents.iter().enumerate() {
            if !(0..=100).contains(pct) {
                return Err(Error::invalid(
                    format!("policy.percents[{i}]"),
                    Reason::InvalidArgument,
                    "must be 0 to 100",
                )
                .into());
            }
        }
        let amounts = p
            .amounts
            .iter()
            .enumerate()
            .map(|(i, a)| {
                convert::amount("policy.amounts", a, Sign::NonNegative).map_err(|_| {
                    Error::invalid(format!("policy.amounts[{i}]"), Reason::InvalidAmount, "is not an amount")
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut percents = p.percents.clone();
        percents.sort_unstable_by(|a, b| b.cmp(a));
        percents.dedup();
        let policy = AlertPolicy { percents, amounts, rearm_on_topup: p.rearm_on_topup };
        let account =
            if p.account_id.is_empty() { None } else { Some(convert::account_id("policy.account_id", &p.account_id)?) };
        self.engine.set_alert_policy(&tenant, account.as_deref(), &policy).await?;
        Ok(Response::new(policy_pb(&p.account_id, &policy)))
    }

    async fn get_alert_policy(
        &self,
        request: Request<pb::GetAlertPolicyRequest>,
    ) -> Result<Response<pb::AlertPolicy>, Status> {
        let tenant = tenant(&self.engine, &request, Need::Admin).await?;
        let id = request.into_inner().account_id;
        let account = if id.is_empty() { None } else { Some(convert::account_id("account_id", &id)?) };
        if let Some(a) = &account {
            self.engine.get_account(&tenant, a).await?;
        }
        let policy = self.engine.pg.alert_policy(&tenant, account.as_deref()).await.map_err(Error::from)?;
        Ok(Response::new(policy_pb(&id, &policy)))
    }

    async fn set_webhook(&self, request: Request<pb::SetWebhookRequest>) -> Result<Response<pb::WebhookInfo>, Status> {
        let tenant = tenant(&self.engine, &request, Need::Admin).await?;
        let r = request.into_inner();
        let url_text = convert::text("url", r.url, 2048)?;
        let url = url::Url::parse(&url_text)
            .map_err(|e| Error::invalid("url", Reason::InvalidArgument, format!("is not a URL ({e})")))?;
        let secret = convert::text("secret", r.secret, 256)?;
        if secret.chars().count() < 16 {
            return Err(Error::invalid("secret", Reason::InvalidArgument, "must be 16 to 256 characters").into());
        }
        let max_attempts = match r.max_attempts {
            0 => 8,
            n @ 1..=100 => n,
            _ => {
                return Err(Error::invalid("max_attempts", Reason::InvalidArgument, "must be between 0 and 100").into());
            }
        };
        // Last, as it may resolve the host: http(s), no credentials, and no
        // internal address unless allowlisted (checked again at each
        // delivery).
        self.engine.webhooks.resolve(&url).await.map_err(|e| Error::invalid("url", Reason::InvalidArgument, e))?;
        let webhook = Webhook { url: url.to_string(), secret, max_attempts };
        self.engine.pg.set_webhook(&tenant, &webhook).await.map_err(Error::from)?;
        tracing::info!(tenant, url = %webhook.url, "webhook set");
        Ok(Response::new(pb::WebhookInfo { url: webhook.url, max_attempts, secret_set: true }))
    }

    async fn get_webhook(&self, request: Request<pb::GetWebhookRequest>) -> Result<Response<pb::WebhookInfo>, Status> {
        let tenant = tenant(&self.engine, &request, Need::Admin).await?;
        let webhook = self.engine.pg.webhook(&tenant).await.map_err(Error::from)?;
        Ok(Response::new(webhook.map_or_else(pb::WebhookInfo::default, |w| pb::WebhookInfo {
            url: w.url,
            max_attempts: w.max_attempts,
            secret_set: true,
        })))
    }

    async fn delete_webhook(
        &self,
        request: Request<pb::GetWebhookRequest>,
    ) -> Result<Response<pb::WebhookInfo>, Status> {
        let tenant = tenant(&self.engine, &request, Need::Admin).await?;
        self.engine.pg.delete_webhook(&tenant).await.map_err(Error::from)?;
        Ok(Response::new(pb::WebhookInfo::default()))
    }

    async fn list_webhook_deliveries(
        &self,
        request: Request<pb::ListWebhookDeliveriesRequest>,
    ) -> Result<Response<pb::ListWebhookDeliveriesResponse>, Status> {
        let tenant = tenant(&self.engine, &request, Need::Admin).await?;
        let r = request.into_inner();
        let status = match pb::DeliveryStatus::try_from(r.status) {
            Ok(pb::DeliveryStatus::Unspecified) => None,
            Ok(pb::DeliveryStatus::Pending) => Some("pending"),
            Ok(pb::DeliveryStatus::Delivered) => Some("delivered"),
            Ok(pb::DeliveryStatus::Dead) => Some("dead"),
            Err(_) => return Err(Error::invalid("status", Reason::InvalidArgument, "is not a DeliveryStatus").into()),
        };
        let limit = match r.limit {
            0 => 100,
            n @ 1..=1000 => i64::from(n),
            _ => return Err(Error::invalid("limit", Reason::InvalidArgument, "must be between 0 and 1000").into()),
        };
        let rows = self.engine.pg.deliveries(&tenant, status, limit).await.map_err(Error::from)?;
        Ok(Response::new(pb::ListWebhookDeliveriesResponse {
            deliveries: rows
                .iter()
                .map(|d| pb::WebhookDelivery {
                    cursor: d.alert_seq.to_string(),
                    status: match d.status.as_str() {
                        "delivered" => pb::DeliveryStatus::Delivered,
                        "dead" => pb::DeliveryStatus::Dead,
                        _ => pb::DeliveryStatus::Pending,
                    } as i32,
                    attempts: d.attempts,
                    next_attempt_at: Some(convert::timestamp(d.next_attempt_at)),
                    last_error: d.last_error.clone(),
                    delivered_at: d.delivered_at.map(convert::timestamp),
                })
                .collect(),
        }))
    }
}
