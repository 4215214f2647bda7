//! What one client can cost everyone else: made-up API keys, and
//! WatchAlerts streams. Each is bounded per replica, and the bound refuses
//! with RESOURCE_EXHAUSTED without touching what honest callers use.

use std::time::{Duration, Instant};

use creditd::pb::{self, GrantCategory, alert_service_client::AlertServiceClient};
use futures::StreamExt;
use rand::Rng;
use tonic::Code;

use crate::harness::{Backends, TENANT, TestApp, assert_status, eventually, with_key};

fn made_up_key(rng: &mut impl Rng) -> String {
    let hex = |rng: &mut dyn rand::RngCore, n: usize| -> String {
        (0..n).map(|_| char::from_digit(rng.random_range(0..16), 16).unwrap()).collect()
    };
    format!("cdk_{}_{}", hex(rng, 12), hex(rng, 64))
}

#[tokio::test]
async fn made_up_keys_cost_one_lookup_per_prefix_and_are_rate_limited() {
    let app = TestApp::spawn_on(
        Backends::fresh().await,
        &[("auth.lookups_per_second", "20"), ("auth.lookup_burst", "20"), ("auth.unknown_key_ttl", "1m")],
    )
    .await;
    app.create_tenant(TENANT).await;
    app.account("a", None, false, None).await;
    app.grant("a", "5", GrantCategory::Plan).await;
    let known = app.create_key(TENANT, pb::ApiKeyRole::Runtime).await;
    let balance = |key: String| {
        let mut client = app.raw_credit.clone();
        async move { client.get_balance(with_key(&key, pb::GetBalanceRequest { account_id: "a".into() })).await.map(|_| ()) }
    };
    balance(known.clone()).await.expect("the known key works (and is cached now)");

    // One made-up key, 200 times: one lookup, then remembered as unknown.
    let mut rng = rand::rng();
    let one = made_up_key(&mut rng);
    let before = app.engine.keys.lookups();
    for _ in 0..200 {
        let e = balance(one.clone()).await.unwrap_err();
        assert_status(&e, Code::Unauthenticated, "INVALID_CREDENTIALS", None);
    }
    assert_eq!(app.engine.keys.lookups() - before, 1, "an unknown prefix is looked up once");

    // 2,000 distinct made-up keys, 50 at a time: lookups stay within the
    // bucket (20 at once, 20/s), the rest are refused without one.
    let keys: Vec<String> = (0..2000).map(|_| made_up_key(&mut rng)).collect();
    let before = app.engine.keys.lookups();
    let started = Instant::now();
    let (mut unauthenticated, mut limited) = (0, 0);
    for chunk in keys.chunks(50) {
        let answers = futures::future::join_all(chunk.iter().map(|k| balance(k.clone()))).await;
        for e in answers.into_iter().map(|a| a.unwrap_err()) {
            match e.code() {
                Code::Unauthenticated => unauthenticated += 1,
                Code::ResourceExhausted => {
                    assert_status(&e, Code::ResourceExhausted, "RATE_LIMITED", None);
                    limited += 1;
                }
                other => panic!("unexpected {other:?}: {e:?}"),
            }
        }
        // The key in use is never limited, flood or not.
        balance(known.clone()).await.expect("a cached key is not rate limited");
    }
    let elapsed = started.elapsed();
    let lookups = app.engine.keys.lookups() - before;
    println!(
        "2000 made-up keys in {:.2} s: {lookups} PostgreSQL lookups, {unauthenticated} unauthenticated, {limited} rate limited",
        elapsed.as_secs_f64()
    );
    let allowed = 20 + (20.0 * elapsed.as_secs_f64()).ceil() as u64 + 1;
    assert!(lookups <= allowed, "{lookups} lookups > {allowed} the bucket allows in {elapsed:?}");
    assert_eq!(unauthenticated as u64, lookups, "each lookup answered one call, the rest were refused");
    assert!(limited >= 1900, "{limited}");
}

fn stream_client(app: &TestApp) -> AlertServiceClient<tonic::transport::Channel> {
    AlertServiceClient::new(app.raw_admin_channel())
}

async fn open(app: &TestApp, key: &str) -> Result<tonic::Streaming<pb::Alert>, tonic::Status> {
    stream_client(app)
        .watch_alerts(with_key(key, pb::WatchAlertsRequest { cursor: String::new() }))
        .await
        .map(|r| r.into_inner())
}

#[tokio::test]
async fn watch_streams_are_bounded_per_key_and_per_tenant() {
    let app = TestApp::spawn_on(
        Backends::fresh().await,
        &[("alerts.watch_streams_per_key", "2"), ("alerts.watch_streams_per_tenant", "3")],
    )
    .await;
    app.create_tenant(TENANT).await;
    app.account("org", None, false, None).await;
    app.grant("org", "100", GrantCategory::Plan).await;
    let first = app.keys.lock().unwrap()[TENANT].clone();
    let second = app.create_key(TENANT, pb::ApiKeyRole::Admin).await;

    let mut a1 = open(&app, &first).await.expect("first stream");
    let a2 = open(&app, &first).await.expect("second stream");
    let e = open(&app, &first).await.unwrap_err();
    assert_status(&e, Code::ResourceExhausted, "TOO_MANY_STREAMS", None);
    assert!(e.message().contains("alerts.watch_streams_per_key"), "{e:?}");
    let _b1 = open(&app, &second).await.expect("another key of the tenant");
    let e = open(&app, &second).await.unwrap_err();
    assert_status(&e, Code::ResourceExhausted, "TOO_MANY_STREAMS", None);
    assert!(e.message().contains("alerts.watch_streams_per_tenant"), "{e:?}");

    // Another tenant is not affected.
    app.create_tenant("other").await;
    let other = app.keys.lock().unwrap()["other"].clone();
    let _o = open(&app, &other).await.expect("another tenant's stream");

    // Open streams still deliver, in order, once each.
    app.charge("org", "80", "c1").await.unwrap(); // 20 % left: fires 25
    let alert = tokio::time::timeout(Duration::from_secs(5), a1.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(alert.threshold, "25");

    // A stream the client drops frees its slot.
    drop(a2);
    eventually(Duration::from_secs(5), || async { open(&app, &second).await.is_ok() }).await;
}

/// PostgreSQL transactions committed in the test's database so far.
async fn transactions(app: &TestApp) -> i64 {
    let pg = app.backends.pg().await;
    // Statistics are flushed by each backend at most once a second.
    sqlx::query_scalar::<_, i64>("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")
        .fetch_one(&pg)
        .await
        .unwrap()
}

#[tokio::test]
async fn idle_watch_streams_cost_no_queries() {
    let app = TestApp::spawn_on(
        Backends::fresh().await,
        &[
            ("alerts.watch_streams_per_key", "40"),
            ("alerts.watch_streams_per_tenant", "40"),
            ("alerts.watch_poll", "100ms"),
        ],
    )
    .await;
    app.create_tenant(TENANT).await;
    app.account("org", None, false, None).await;
    app.grant("org", "100", GrantCategory::Plan).await;
    let key = app.keys.lock().unwrap()[TENANT].clone();
    let window = Duration::from_secs(3);

    let one = open(&app, &key).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let t0 = transactions(&app).await;
    tokio::time::sleep(window).await;
    let with_one = transactions(&app).await - t0;

    let mut many = vec![one];
    for _ in 0..29 {
        many.push(open(&app, &key).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let t0 = transactions(&app).await;
    tokio::time::sleep(window).await;
    let with_thirty = transactions(&app).await - t0;
    println!("PostgreSQL transactions in {window:?}: {with_one} with 1 idle stream, {with_thirty} with 30");
    // A poll per stream would add 29 × 10/s × 3 s = 870.
    assert!(with_thirty < with_one + 100, "{with_thirty} vs {with_one}");

    // They still deliver.
    app.charge("org", "80", "c1").await.unwrap();
    for stream in many.iter_mut() {
        let alert = tokio::time::timeout(Duration::from_secs(5), stream.next()).await.unwrap().unwrap().unwrap();
        assert_eq!(alert.threshold, "25");
    }
}
