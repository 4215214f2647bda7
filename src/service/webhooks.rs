//! Alert webhooks: each alert of a tenant with a webhook is POSTed as JSON
//! to its URL, signed, by whichever replica claims the delivery first;
//! failures are retried with exponential backoff until `max_attempts`,
//! then the delivery is dead (listed by `ListWebhookDeliveries`).
//!
//! Signature: header `creditd-signature: t=<unix seconds>,v1=<hex>` where
//! `<hex>` is HMAC-SHA256(secret, "<t>.<body>"). Receivers check it, reject
//! stale `t`, and deduplicate on `creditd-alert-id` (a crash between a send
//! and its record can send an alert again: delivery is at least once).

use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::{client::legacy::Client, rt::TokioExecutor};

use super::Engine;
use crate::{
    domain::hmac::hmac_sha256,
    error::Result,
    store::alerts::{AlertRow, Delivery},
};

/// The signature header's value for a body sent at `t`.
pub fn signature(secret: &str, t: i64, body: &[u8]) -> String {
    let mut message = format!("{t}.").into_bytes();
    message.extend_from_slice(body);
    format!("t={t},v1={}", hex::encode(hmac_sha256(secret.as_bytes(), &message)))
}

/// The JSON body of an alert.
pub fn body(tenant: &str, a: &AlertRow) -> Vec<u8> {
    serde_json::json!({
        "tenant_id": tenant,
        "cursor": a.seq.to_string(),
        "account_id": a.account_id,
        "kind": a.kind,
        "threshold": a.threshold.normalize().to_string(),
        "available": a.available.to_string(),
        "period_credits": a.period_credits.to_string(),
        "fired_at": a.fired_at.to_rfc3339(),
    })
    .to_string()
    .into_bytes()
}

async fn send(d: Delivery, timeout: Duration) -> std::result::Result<(), String> {
    let body = body(&d.tenant_id, &d.alert);
    let t = chrono::Utc::now().timestamp();
    let request = hyper::Request::post(&d.webhook.url)
        .header("content-type", "application/json")
        .header("creditd-alert-id", format!("{}:{}", d.tenant_id, d.alert.seq))
        .header("creditd-signature", signature(&d.webhook.secret, t, &body))
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| format!("bad request: {e}"))?;
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let response = tokio::time::timeout(timeout, client.request(request))
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| format!("connection: {e}"))?;
    let status = response.status();
    // Drain the body so the connection can close cleanly.
    let _ = tokio::time::timeout(timeout, response.into_body().collect()).await;
    if status.is_success() { Ok(()) } else { Err(format!("HTTP {status}")) }
}

impl Engine {
    /// One pass: sends every due delivery (a few at a time per replica).
    pub async fn deliver_webhooks(&self) -> Result<usize> {
        let now = chrono::Utc::now();
        Ok(self.pg.deliver_due(now, 5, |d| send(d, Duration::from_secs(3))).await?)
    }
}
