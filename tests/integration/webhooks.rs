//! Alert webhooks against a receiver on loopback: signed requests,
//! retries with backoff, dead letters, https; and the destinations creditd
//! refuses (SSRF), at configuration and again at each delivery.

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

use crate::harness::{Backends, TENANT, TestApp, assert_status, eventually, with_key};

/// The receivers below listen on loopback, which creditd refuses unless
/// the operator allowlists it.
const ALLOW_LOOPBACK: &[(&str, &str)] = &[("webhooks.allow_destinations", "127.0.0.0/8,::1")];

async fn spawn_allowing_loopback(extra: &[(&str, &str)]) -> TestApp {
    let mut settings = ALLOW_LOOPBACK.to_vec();
    settings.extend_from_slice(extra);
    let app = TestApp::spawn_on(Backends::fresh().await, &settings).await;
    app.create_tenant(TENANT).await;
    app
}

/// One request the receiver got.
#[derive(Clone, Debug)]
struct Received {
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

/// An HTTP receiver answering the scripted statuses in order, then 200.
async fn receiver(script: Vec<u16>) -> (String, Arc<Mutex<Vec<Received>>>) {
    receiver_on(script, None).await
}

/// The same over TLS (`acceptor`), at https://localhost:<port>.
async fn receiver_on(
    script: Vec<u16>,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
) -> (String, Arc<Mutex<Vec<Received>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let url = match acceptor {
        Some(_) => format!("https://localhost:{port}/hooks/credits"),
        None => format!("http://127.0.0.1:{port}/hooks/credits"),
    };
    let got = Arc::new(Mutex::new(Vec::new()));
    let script = Arc::new(Mutex::new(script.into_iter().collect::<std::collections::VecDeque<_>>()));
    let seen = got.clone();
    tokio::spawn(async move {
        loop {
            let Ok((socket, _)) = listener.accept().await else { return };
            let seen = seen.clone();
            let script = script.clone();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                match acceptor {
                    Some(acceptor) => {
                        if let Ok(tls) = acceptor.accept(socket).await {
                            serve_one(tls, seen, script).await;
                        }
                    }
                    None => serve_one(socket, seen, script).await,
                }
            });
        }
    });
    (url, got)
}

async fn serve_one<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut socket: S,
    seen: Arc<Mutex<Vec<Received>>>,
    script: Arc<Mutex<std::collections::VecDeque<u16>>>,
) {
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
    let _ = socket.shutdown().await;
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
    let app = spawn_allowing_loopback(&[]).await;
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
    let app = spawn_allowing_loopback(&[]).await;
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

/// A CA and a certificate for localhost signed by it; the CA's PEM.
fn tls_receiver_pki() -> (tokio_rustls::TlsAcceptor, String) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_string()]).unwrap().signed_by(&key, &ca).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from_pem_slice(cert.pem().as_bytes()).unwrap()],
            PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).unwrap(),
        )
        .unwrap();
    (tokio_rustls::TlsAcceptor::from(Arc::new(config)), ca.pem())
}

/// https webhooks: verified against webhooks.ca_file (beside the
/// built-in roots), delivered and signed as over http.
#[tokio::test]
async fn alerts_are_posted_over_https() {
    let (acceptor, ca) = tls_receiver_pki();
    let ca_file = std::env::temp_dir().join(format!("creditd-webhook-ca-{}.pem", uuid::Uuid::new_v4()));
    std::fs::write(&ca_file, ca).unwrap();
    let ca_path = ca_file.to_string_lossy().into_owned();
    let app = spawn_allowing_loopback(&[("webhooks.ca_file", &ca_path)]).await;
    let (url, got) = receiver_on(vec![], Some(acceptor)).await;
    assert!(url.starts_with("https://localhost:"));
    set_webhook(&app, &url, 0).await;
    exhaust(&app).await;
    eventually(Duration::from_secs(5), || async { deliveries(&app, pb::DeliveryStatus::Delivered).await.len() == 1 })
        .await;
    let r = got.lock().unwrap()[0].clone();
    assert!(r.headers["creditd-signature"].starts_with("t="));
    assert!(r.headers["host"].starts_with("localhost:"));

    // Without the CA, the receiver's certificate is not trusted.
    let strict = spawn_allowing_loopback(&[]).await;
    let (acceptor, _) = tls_receiver_pki();
    let (url, got) = receiver_on(vec![], Some(acceptor)).await;
    set_webhook(&strict, &url, 1).await;
    exhaust(&strict).await;
    eventually(Duration::from_secs(5), || async { deliveries(&strict, pb::DeliveryStatus::Dead).await.len() == 1 })
        .await;
    let dead = deliveries(&strict, pb::DeliveryStatus::Dead).await;
    assert!(dead[0].last_error.contains("tls"), "{:?}", dead[0]);
    assert!(got.lock().unwrap().is_empty());
    let _ = std::fs::remove_file(ca_file);
}

/// SetWebhook refuses internal destinations (INVALID_ARGUMENT naming
/// `url`) and changes nothing; a public one is accepted, http or https.
#[tokio::test]
async fn internal_destinations_are_refused_at_configuration() {
    let app = TestApp::spawn().await;
    let key = app.keys.lock().unwrap()[TENANT].clone();
    let set = |url: &str| {
        let request = with_key(
            &key,
            pb::SetWebhookRequest { url: url.into(), secret: "s3cret-s3cret-s3cret".into(), max_attempts: 0 },
        );
        let mut client = AlertServiceClient::new(app.raw_admin_channel());
        async move { client.set_webhook(request).await }
    };
    for url in [
        "http://127.0.0.1:8080/hook",
        "http://localhost/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.7/hook",
        "https://172.16.3.4/hook",
        "http://192.168.0.10/hook",
        "http://100.64.0.1/hook",
        "http://[::1]/hook",
        "http://[fd00::1]/hook",
        "http://[fe80::1]/hook",
        "http://[::ffff:127.0.0.1]/hook",
        "http://0.0.0.0/hook",
        "ftp://203.0.113.10/hook",
        "http://user:pw@203.0.113.10/hook",
        "not a url",
    ] {
        let e = set(url).await.expect_err(url);
        assert_status(&e, tonic::Code::InvalidArgument, "INVALID_ARGUMENT", Some("url"));
    }
    let info = AlertServiceClient::new(app.raw_admin_channel())
        .get_webhook(with_key(&key, pb::GetWebhookRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.url, "", "nothing was set");
    // A public address (documentation range, so nothing is ever sent).
    let ok = set("https://203.0.113.10/hooks/credits").await.unwrap().into_inner();
    assert_eq!(ok.url, "https://203.0.113.10/hooks/credits");
    set("http://203.0.113.10:8080/hooks").await.unwrap();
}

/// A webhook whose name later resolves to an internal address (DNS
/// rebinding: here "localhost", stored as if it had resolved elsewhere
/// when set) is checked again at delivery and never sent to.
#[tokio::test]
async fn each_delivery_checks_the_destination_again() {
    let app = TestApp::spawn().await;
    let (url, got) = receiver(vec![]).await;
    let url = url.replace("127.0.0.1", "localhost");
    app.engine
        .pg
        .set_webhook(
            TENANT,
            &creditd::store::alerts::Webhook { url, secret: "s3cret-s3cret-s3cret".into(), max_attempts: 1 },
        )
        .await
        .unwrap();
    exhaust(&app).await;
    eventually(Duration::from_secs(5), || async { deliveries(&app, pb::DeliveryStatus::Dead).await.len() == 1 }).await;
    let dead = deliveries(&app, pb::DeliveryStatus::Dead).await;
    assert!(dead[0].last_error.contains("refused destination"), "{:?}", dead[0]);
    assert!(dead[0].last_error.contains("loopback"), "{:?}", dead[0]);
    assert!(got.lock().unwrap().is_empty(), "nothing reached the internal receiver");
}
