//! PostgreSQL side of balance alerts: policies and the outbox.

use chrono::{DateTime, TimeZone, Utc};
use rust_decimal::Decimal;
use sqlx::Row;

use super::pg::{PgResult, PgStore, credits};
use crate::domain::Credits;

/// Thresholds: percents of the period's credits, absolute amounts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AlertPolicy {
    pub percents: Vec<i32>,
    pub amounts: Vec<Credits>,
    pub rearm_on_topup: bool,
}

impl AlertPolicy {
    /// The Redis form: "p25,p15,a5000000".
    pub fn hot_spec(&self) -> String {
        self.percents
            .iter()
            .map(|p| format!("p{p}"))
            .chain(self.amounts.iter().map(|a| format!("a{}", a.micros())))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// A fired alert, as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AlertRow {
    pub seq: i64,
    pub account_id: String,
    /// "percent" | "amount".
    pub kind: String,
    pub threshold: Decimal,
    pub available: Credits,
    pub period_credits: Credits,
    pub fired_at: DateTime<Utc>,
}

/// An alert read from a tenant's Redis stream.
#[derive(Clone, Debug)]
pub struct StreamedAlert {
    pub stream_id: String,
    pub account_id: String,
    /// "p25" or "a5000000".
    pub token: String,
    pub available: Credits,
    pub period_credits: Credits,
    pub fired_at_ms: i64,
}

/// An account's own policy columns (all NULL: the tenant's applies).
type StoredPolicy = (Option<Vec<i32>>, Option<Vec<Decimal>>, Option<bool>);

pub(crate) fn policy(percents: Vec<i32>, amounts: Vec<Decimal>, rearm: bool) -> PgResult<AlertPolicy> {
    Ok(AlertPolicy {
        percents,
        amounts: amounts.into_iter().map(credits).collect::<PgResult<_>>()?,
        rearm_on_topup: rearm,
    })
}

impl PgStore {
    /// The policy in force for an account (its own, else the tenant's).
    pub async fn alert_policy(&self, tenant: &str, account: Option<&str>) -> PgResult<AlertPolicy> {
        if let Some(account) = account {
            let own: Option<StoredPolicy> = sqlx::query_as(
                "SELECT alert_percents, alert_amounts, alert_rearm_on_topup FROM accounts \
                 WHERE tenant_id = $1 AND account_id = $2",
            )
            .bind(tenant)
            .bind(account)
            .fetch_optional(self.pool())
            .await?;
            if let Some((Some(p), Some(a), Some(r))) = own {
                return policy(p, a, r);
            }
        }
        let (p, a, r): (Vec<i32>, Vec<Decimal>, bool) = sqlx::query_as(
            "SELECT alert_percents, alert_amounts, alert_rearm_on_topup FROM tenants WHERE tenant_id = $1",
        )
        .bind(tenant)
        .fetch_one(self.pool())
        .await?;
        policy(p, a, r)
    }

    /// Sets the tenant's policy (`account` None) or an account's.
    pub async fn set_alert_policy(&self, tenant: &str, account: Option<&str>, p: &AlertPolicy) -> PgResult<bool> {
        let amounts: Vec<Decimal> = p.amounts.iter().map(|a| a.to_decimal()).collect();
        let done = match account {
            None => sqlx::query(
                "UPDATE tenants SET alert_percents = $2, alert_amounts = $3, alert_rearm_on_topup = $4 \
                 WHERE tenant_id = $1",
            )
            .bind(tenant)
            .bind(&p.percents)
            .bind(&amounts)
            .bind(p.rearm_on_topup)
            .execute(self.pool())
            .await?
            .rows_affected(),
            Some(account) => sqlx::query(
                "UPDATE accounts SET alert_percents = $3, alert_amounts = $4, alert_rearm_on_topup = $5 \
                 WHERE tenant_id = $1 AND account_id = $2",
            )
            .bind(tenant)
            .bind(account)
            .bind(&p.percents)
            .bind(&amounts)
            .bind(p.rearm_on_topup)
            .execute(self.pool())
            .await?
            .rows_affected(),
        };
        Ok(done == 1)
    }

    /// Moves alerts into the outbox, once each and in stream order (the
    /// tenant's alerts are written under one lock, so `alert_seq` follows
    /// the order they fired in).
    pub async fn insert_alerts(&self, tenant: &str, alerts: &[StreamedAlert]) -> PgResult<()> {
        let mut tx = self.pool().begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('creditd.alerts.' || $1, 0))")
            .bind(tenant)
            .execute(&mut *tx)
            .await?;
        for a in alerts {
            let (kind, threshold) = match a.token.split_at(1) {
                ("p", value) => ("percent", value.parse::<Decimal>().unwrap_or_default()),
                (_, value) => ("amount", Credits::from_micros(value.parse().unwrap_or_default()).to_decimal()),
            };
            sqlx::query(
                "INSERT INTO alerts (tenant_id, stream_id, account_id, kind, threshold, available, period_credits, \
                   fired_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (tenant_id, stream_id) DO NOTHING",
            )
            .bind(tenant)
            .bind(&a.stream_id)
            .bind(&a.account_id)
            .bind(kind)
            .bind(threshold)
            .bind(a.available.to_decimal())
            .bind(a.period_credits.to_decimal())
            .bind(Utc.timestamp_millis_opt(a.fired_at_ms).single().unwrap_or_else(Utc::now))
            .execute(&mut *tx)
            .await?;
        }
        // Alerts of a tenant with a webhook get a delivery each, in the same
        // transaction that records them.
        sqlx::query(
            "INSERT INTO webhook_deliveries (alert_seq, tenant_id) \
             SELECT al.alert_seq, al.tenant_id FROM alerts al JOIN webhooks w ON w.tenant_id = al.tenant_id \
             WHERE al.tenant_id = $1 AND al.stream_id = ANY($2) ON CONFLICT DO NOTHING",
        )
        .bind(tenant)
        .bind(alerts.iter().map(|a| a.stream_id.clone()).collect::<Vec<_>>())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Alerts after `after` (a sequence number), oldest first.
    pub async fn alerts_after(&self, tenant: &str, after: i64, limit: i64) -> PgResult<Vec<AlertRow>> {
        sqlx::query(
            "SELECT alert_seq, account_id, kind, threshold, available, period_credits, fired_at FROM alerts \
             WHERE tenant_id = $1 AND alert_seq > $2 ORDER BY alert_seq LIMIT $3",
        )
        .bind(tenant)
        .bind(after)
        .bind(limit)
        .fetch_all(self.pool())
        .await?
        .into_iter()
        .map(|r| {
            Ok(AlertRow {
                seq: r.get(0),
                account_id: r.get(1),
                kind: r.get(2),
                threshold: r.get(3),
                available: credits(r.get(4))?,
                period_credits: credits(r.get(5))?,
                fired_at: r.get(6),
            })
        })
        .collect()
    }

    /// The latest alert sequence number of a tenant (0 when none).
    pub async fn last_alert(&self, tenant: &str) -> PgResult<i64> {
        Ok(sqlx::query_scalar("SELECT COALESCE(MAX(alert_seq), 0) FROM alerts WHERE tenant_id = $1")
            .bind(tenant)
            .fetch_one(self.pool())
            .await?)
    }
}

/// A tenant's webhook (the secret stays inside the service).
#[derive(Clone, Debug)]
pub struct Webhook {
    pub url: String,
    pub secret: String,
    pub max_attempts: i32,
}

/// A delivery claimed for sending, with its alert.
#[derive(Clone, Debug)]
pub struct Delivery {
    pub tenant_id: String,
    pub attempts: i32,
    pub alert: AlertRow,
    pub webhook: Webhook,
}

/// A delivery as listed to admins.
#[derive(Clone, Debug)]
pub struct DeliveryRow {
    pub alert_seq: i64,
    pub status: String,
    pub attempts: i32,
    pub next_attempt_at: DateTime<Utc>,
    pub last_error: String,
    pub delivered_at: Option<DateTime<Utc>>,
}

impl PgStore {
    pub async fn set_webhook(&self, tenant: &str, w: &Webhook) -> PgResult<()> {
        sqlx::query(
            "INSERT INTO webhooks (tenant_id, url, secret, max_attempts) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (tenant_id) DO UPDATE SET url = $2, secret = $3, max_attempts = $4",
        )
        .bind(tenant)
        .bind(&w.url)
        .bind(&w.secret)
        .bind(w.max_attempts)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    pub async fn webhook(&self, tenant: &str) -> PgResult<Option<Webhook>> {
        Ok(sqlx::query_as::<_, (String, String, i32)>(
            "SELECT url, secret, max_attempts FROM webhooks WHERE tenant_id = $1",
        )
        .bind(tenant)
        .fetch_optional(self.pool())
        .await?
        .map(|(url, secret, max_attempts)| Webhook { url, secret, max_attempts }))
    }

    pub async fn delete_webhook(&self, tenant: &str) -> PgResult<bool> {
        Ok(sqlx::query("DELETE FROM webhooks WHERE tenant_id = $1")
            .bind(tenant)
            .execute(self.pool())
            .await?
            .rows_affected()
            == 1)
    }

    /// Sends due deliveries with `send`, holding each claimed row locked
    /// (other replicas skip it) until its outcome is written. `send`
    /// returns `Err(reason)` for a failed attempt.
    pub async fn deliver_due<F, Fut>(&self, now: DateTime<Utc>, limit: i64, send: F) -> PgResult<usize>
    where
        F: Fn(Delivery) -> Fut,
        Fut: Future<Output = Result<(), String>>,
    {
        let mut tx = self.pool().begin().await?;
        let rows = sqlx::query(
            "SELECT d.tenant_id, d.attempts, a.alert_seq, a.account_id, a.kind, a.threshold, a.available, \
               a.period_credits, a.fired_at, w.url, w.secret, w.max_attempts \
             FROM webhook_deliveries d JOIN alerts a ON a.alert_seq = d.alert_seq \
             JOIN webhooks w ON w.tenant_id = d.tenant_id \
             WHERE d.status = 'pending' AND d.next_attempt_at <= $1 \
             ORDER BY d.alert_seq LIMIT $2 FOR UPDATE OF d SKIP LOCKED",
        )
        .bind(now)
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        let count = rows.len();
        for r in rows {
            let delivery = Delivery {
                tenant_id: r.get(0),
                attempts: r.get(1),
                alert: AlertRow {
                    seq: r.get(2),
                    account_id: r.get(3),
                    kind: r.get(4),
                    threshold: r.get(5),
                    available: credits(r.get(6))?,
                    period_credits: credits(r.get(7))?,
                    fired_at: r.get(8),
                },
                webhook: Webhook { url: r.get(9), secret: r.get(10), max_attempts: r.get(11) },
            };
            let seq = delivery.alert.seq;
            let attempts = delivery.attempts + 1;
            let max_attempts = delivery.webhook.max_attempts;
            match send(delivery).await {
                Ok(()) => {
                    sqlx::query(
                        "UPDATE webhook_deliveries SET status = 'delivered', attempts = $2, delivered_at = $3, \
                           last_error = '' WHERE alert_seq = $1",
                    )
                    .bind(seq)
                    .bind(attempts)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                }
                Err(reason) => {
                    // 1 s, 2 s, 4 s … capped at 5 minutes.
                    let backoff =
                        chrono::Duration::seconds(1i64 << (attempts - 1).clamp(0, 8)).min(chrono::Duration::minutes(5));
                    let status = if attempts >= max_attempts { "dead" } else { "pending" };
                    sqlx::query(
                        "UPDATE webhook_deliveries SET status = $2, attempts = $3, next_attempt_at = $4, last_error = $5 \
                         WHERE alert_seq = $1",
                    )
                    .bind(seq)
                    .bind(status)
                    .bind(attempts)
                    .bind(now + backoff)
                    .bind(reason.chars().take(500).collect::<String>())
                    .execute(&mut *tx)
                    .await?;
                }
            }
        }
        tx.commit().await?;
        Ok(count)
    }

    pub async fn deliveries(&self, tenant: &str, status: Option<&str>, limit: i64) -> PgResult<Vec<DeliveryRow>> {
        Ok(sqlx::query_as::<_, (i64, String, i32, DateTime<Utc>, String, Option<DateTime<Utc>>)>(
            "SELECT alert_seq, status, attempts, next_attempt_at, last_error, delivered_at FROM webhook_deliveries \
             WHERE tenant_id = $1 AND ($2::text IS NULL OR status = $2) ORDER BY alert_seq DESC LIMIT $3",
        )
        .bind(tenant)
        .bind(status)
        .bind(limit)
        .fetch_all(self.pool())
        .await?
        .into_iter()
        .map(|(alert_seq, status, attempts, next_attempt_at, last_error, delivered_at)| DeliveryRow {
            alert_seq,
            status,
            attempts,
            next_attempt_at,
            last_error,
            delivered_at,
        })
        .collect())
    }
}
