//! Alert webhooks against a receiver on loopback: signed requests,
//! retries with backoff, dead letters.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use creditd::{
    domain::hmac::hmac_sha256,
    pb::{self, GrantCategory, alert_service_client::AlertServiceClient},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

use crate::harness::{TENANT, TestApp, eventually, with_key};

/// One request the receiver got.
#[derive(Clone, Debug)]
struct Received {
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

/// An HTTP receiver answering the scripted statuses in order, then 200.
async fn receiver(script: Vec<u16>) -> (String, Arc<Mutex<Vec<Received>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hooks/credits", listener.local_addr().unwrap());
    let got = Arc::new(Mutex::new(Vec::new()));
    let script = Arc::new(Mutex::new(script.into_iter().collect::<std::collections::VecDeque<_>>()));
    let seen = got.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else { return };
            let seen = seen.clone();
            let script = script.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let (head_end, length) = loop {
                    let n = socket.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..pos]).to_lowercase();
                        let length = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:").map(|v| v.trim().parse::<usize>().unwrap()))
                            .unwrap_or(0);
                        break (pos + 4, length);
                    }
                };
                while buf.len() < head_end + length {
                    let n = socket.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
                let headers = head
                    .lines()
                    .skip(1)
                    .filter_map(|l| l.split_once(':'))
                    .map(|(k, v)| (k.trim().to_lowercase(), v.trim().to_string()))
                    .collect();
                seen.lock().unwrap().push(Received { headers, body: buf[head_end..head_end + length].to_vec() });
                let status = script.lock().unwrap().pop_front().unwrap_or(200);
                let reply = format!("HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                let _ = socket.write_all(reply.as_bytes()).await;
            });
        }
    });
    (url, got)
}

async fn set_webhook(app: &TestApp, url: &str, max_attempts: i32) {
    let key = app.keys.lock().unwrap()[TENANT].clone();
    AlertServiceClient::new(app.raw_admin_channel())
        .set_webhook(with_key(
            &key,
            pb::SetWebhookRequest { url: url.into(), secret: "s3cret-s3cret-s3cret".into(), max_attempts },
        ))
        .await
        .unwrap();
}

async fn deliveries(app: &TestApp, status: pb::DeliveryStatus) -> Vec<pb::WebhookDelivery> {
    let key = app.keys.lock().unwrap()[TENANT].clone();
    AlertServiceClient::new(app.raw_admin_channel())
        .list_webhook_deliveries(with_key(&key, pb::ListWebhookDeliveriesRequest { status: status as i32, limit: 0 }))
        .await
        .unwrap()
        .into_inner()
        .deliveries
}

async fn exhaust(app: &TestApp) {
    app.account("org", None, false, None).await;
    app.grant("org", "100", GrantCategory::Plan).await;
    app.charge("org", "80", "c1").await.unwrap(); // fires 25 %
}

#[tokio::test]
async fn alerts_are_posted_signed() {
    let app = TestApp::spawn().await;
    let (url, got) = receiver(vec![]).await;
    set_webhook(&app, &url, 0).await;
    exhaust(&app).await;
    eventually(Duration::from_secs(5), || async { !got.lock().unwrap().is_empty() }).await;
    let r = got.lock().unwrap()[0].clone();
    let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(body["account_id"], "org");
    assert_eq!(body["threshold"], "25");
    assert_eq!(body["available"], "20");
    assert!(r.headers["creditd-alert-id"].starts_with("acme:"));
    let sig = &r.headers["creditd-signature"];
    let (t, v1) = sig.split_once(",v1=").unwrap();
    let t = t.strip_prefix("t=").unwrap();
    let mut message = format!("{t}.").into_bytes();
    message.extend_from_slice(&r.body);
    assert_eq!(v1, hex::encode(hmac_sha256(b"s3cret-s3cret-s3cret", &message)), "the signature verifies");
    eventually(Duration::from_secs(5), || async { deliveries(&app, pb::DeliveryStatus::Delivered).await.len() == 1 })
        .await;
    // The secret is never echoed.
    let key = app.keys.lock().unwrap()[TENANT].clone();
    let info = AlertServiceClient::new(app.raw_admin_channel())
        .get_webhook(with_key(&key, pb::GetWebhookRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert!(info.secret_set);
    assert!(!format!("{info:?}").contains("s3cret"));
}

#[tokio::test]
async fn failures_are_retried_then_dead_lettered() {
    let app = TestApp::spawn().await;
    // Fails twice, then succeeds: delivered on the third attempt.
    let (url, got) = receiver(vec![500, 503]).await;
    set_webhook(&app, &url, 5).await;
    exhaust(&app).await;
    eventually(Duration::from_secs(10), || async { deliveries(&app, pb::DeliveryStatus::Delivered).await.len() == 1 })
        .await;
    let delivered = deliveries(&app, pb::DeliveryStatus::Delivered).await;
    assert_eq!(delivered[0].attempts, 3);
    assert_eq!(got.lock().unwrap().len(), 3, "no duplicate sends");

    // An endpoint that always fails: dead after max_attempts.
    let (url, got) = receiver(vec![500; 10]).await;
    set_webhook(&app, &url, 2).await;
    app.charge("org", "20", "c2").await.unwrap(); // fires 15 % and 0 %
    eventually(Duration::from_secs(10), || async { deliveries(&app, pb::DeliveryStatus::Dead).await.len() == 2 }).await;
    let dead = deliveries(&app, pb::DeliveryStatus::Dead).await;
    assert!(dead.iter().all(|d| d.attempts == 2 && d.last_error.contains("500")));
    assert_eq!(got.lock().unwrap().len(), 4, "two attempts each");
}
