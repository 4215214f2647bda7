//! Balance alerts: thresholds fire once per period, from any replica,
//! reach the outbox exactly once, and stream resumably.

use std::{sync::Arc, time::Duration};

use chrono::{TimeZone, Utc};
use creditd::pb::{self, GrantCategory, alert_service_client::AlertServiceClient};
use futures::{StreamExt, stream};

use crate::harness::{TENANT, TestApp, eventually, req};

fn alerts_client(app: &TestApp) -> AlertServiceClient<tonic::transport::Channel> {
    AlertServiceClient::new(app.raw_admin_channel())
}

async fn list(app: &TestApp) -> Vec<pb::Alert> {
    let key = app.keys.lock().unwrap()[TENANT].clone();
    alerts_client(app)
        .list_alerts(crate::harness::with_key(&key, pb::ListAlertsRequest { cursor: String::new(), limit: 1000 }))
        .await
        .unwrap()
        .into_inner()
        .alerts
}

async fn wait_for(app: &TestApp, n: usize) -> Vec<pb::Alert> {
    eventually(Duration::from_secs(5), || async { list(app).await.len() >= n }).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    list(app).await
}

fn thresholds(alerts: &[pb::Alert]) -> Vec<String> {
    alerts.iter().map(|a| format!("{}:{}", a.account_id, a.threshold)).collect()
}

#[tokio::test]
async fn default_thresholds_fire_once_each_in_order() {
    let app = TestApp::spawn().await;
    app.account("org", None, false, None).await;
    app.account("u", Some("org"), true, None).await;
    app.grant("org", "1000", GrantCategory::Plan).await;
    app.charge("u", "700", "c1").await.unwrap();
    app.charge("u", "60", "c2").await.unwrap(); // 240 left: 24 %
    // A reserve counts too: holds are not spendable.
    let held = app.reserve("u", "100", "r1").await.unwrap(); // 140 left: 14 %
    app.charge("u", "10", "c3").await.unwrap(); // nothing new
    app.commit(&held.reservation_id, "100", "r1c").await.unwrap();
    app.charge("u", "130", "c4").await.unwrap(); // 0 left
    let alerts = wait_for(&app, 3).await;
    assert_eq!(thresholds(&alerts), vec!["org:25", "org:15", "org:0"]);
    assert_eq!(alerts[0].kind(), pb::ThresholdKind::Percent);
    assert_eq!(alerts[0].available, "240");
    assert_eq!(alerts[0].period_credits, "1000");
    assert_eq!(alerts[1].available, "140", "the reserve crossed 15 %");
    assert_eq!(alerts[2].available, "0");
    // Further usage below every threshold fires nothing more.
    app.charge("u", "5", "c5").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(list(&app).await.len(), 3);
}

#[tokio::test]
async fn two_replicas_crossing_at_once_fire_one_alert_per_threshold() {
    let first = Arc::new(TestApp::spawn().await);
    let second = Arc::new(TestApp::spawn_on(first.backends.clone(), &[]).await);
    first.account("org", None, false, None).await;
    first.grant("org", "1000", GrantCategory::Plan).await;
    second.adopt_keys(&first);
    stream::iter(0..200)
        .for_each_concurrent(32, |i| {
            let app = if i % 2 == 0 { first.clone() } else { second.clone() };
            async move {
                app.charge("org", "5", &format!("c{i}")).await.unwrap();
            }
        })
        .await;
    let alerts = wait_for(&first, 3).await;
    assert_eq!(thresholds(&alerts), vec!["org:25", "org:15", "org:0"]);
}

#[tokio::test]
async fn tenant_amounts_account_overrides_and_rearm_on_top_up() {
    let app = TestApp::spawn().await;
    app.account("a", None, false, None).await;
    app.account("b", None, false, None).await;
    let key = app.keys.lock().unwrap()[TENANT].clone();
    let mut client = alerts_client(&app);
    client
        .set_alert_policy(crate::harness::with_key(
            &key,
            pb::SetAlertPolicyRequest {
                policy: Some(pb::AlertPolicy {
                    account_id: String::new(),
                    percents: vec![],
                    amounts: vec!["50".into()],
                    rearm_on_topup: true,
                }),
            },
        ))
        .await
        .unwrap();
    client
        .set_alert_policy(crate::harness::with_key(
            &key,
            pb::SetAlertPolicyRequest {
                policy: Some(pb::AlertPolicy {
                    account_id: "b".into(),
                    percents: vec![50],
                    amounts: vec![],
                    rearm_on_topup: false,
                }),
            },
        ))
        .await
        .unwrap();
    app.grant("a", "100", GrantCategory::Plan).await;
    app.grant("b", "100", GrantCategory::Plan).await;
    app.charge("a", "60", "a1").await.unwrap(); // a: 40 left ≤ 50
    app.charge("b", "60", "b1").await.unwrap(); // b: 40 % ≤ 50 %
    let alerts = wait_for(&app, 2).await;
    let mut got = thresholds(&alerts);
    got.sort();
    assert_eq!(got, vec!["a:50", "b:50"]);
    let a_alert = alerts.iter().find(|x| x.account_id == "a").unwrap();
    assert_eq!(a_alert.kind(), pb::ThresholdKind::Amount);

    // A top-up above the threshold re-arms it for `a` (the tenant asks for
    // it), not for `b` (its own policy does not).
    app.grant("a", "100", GrantCategory::Purchase).await;
    app.grant("b", "100", GrantCategory::Purchase).await;
    app.charge("a", "100", "a2").await.unwrap(); // 40 left again
    app.charge("b", "150", "b2").await.unwrap(); // 10 of 200 left: still below
    let alerts = wait_for(&app, 3).await;
    let mut got = thresholds(&alerts);
    got.sort();
    assert_eq!(got, vec!["a:50", "a:50", "b:50"]);
}

#[tokio::test]
async fn watch_alerts_resumes_where_it_left_off() {
    let app = TestApp::spawn().await;
    app.account("org", None, false, None).await;
    app.grant("org", "100", GrantCategory::Plan).await;
    let key = app.keys.lock().unwrap()[TENANT].clone();
    let watch = |cursor: String| {
        let mut client = alerts_client(&app);
        let key = key.clone();
        async move {
            client
                .watch_alerts(crate::harness::with_key(&key, pb::WatchAlertsRequest { cursor }))
                .await
                .unwrap()
                .into_inner()
        }
    };
    let mut stream = watch(String::new()).await;
    app.charge("org", "80", "c1").await.unwrap(); // 20 %: fires 25
    let first = tokio::time::timeout(Duration::from_secs(5), stream.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(first.threshold, "25");
    drop(stream); // the subscriber goes away

    app.charge("org", "10", "c2").await.unwrap(); // 10 %: fires 15
    app.charge("org", "10", "c3").await.unwrap(); // 0: fires 0
    let mut resumed = watch(first.cursor.clone()).await;
    let mut next = Vec::new();
    for _ in 0..2 {
        let a = tokio::time::timeout(Duration::from_secs(5), resumed.next()).await.unwrap().unwrap().unwrap();
        next.push(a.threshold);
    }
    assert_eq!(next, vec!["15", "0"], "nothing missed, nothing twice");
    assert!(tokio::time::timeout(Duration::from_millis(500), resumed.next()).await.is_err(), "no more alerts");
}

#[tokio::test]
async fn thresholds_rearm_at_the_period_start() {
    let app = TestApp::spawn().await;
    app.account("org", None, false, None).await;
    app.admin
        .clone()
        .create_allowance(req(
            TENANT,
            pb::CreateAllowanceRequest {
                account_id: "org".into(),
                amount: "100".into(),
                idempotency_key: "monthly".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    app.charge("org", "100", "c1").await.unwrap();
    assert_eq!(wait_for(&app, 3).await.len(), 3);

    // Next period: a fresh allowance, thresholds armed again.
    let end = app
        .admin
        .clone()
        .get_account(req(TENANT, pb::GetAccountRequest { account_id: "org".into() }))
        .await
        .unwrap()
        .into_inner()
        .period_end
        .unwrap();
    let end = Utc.timestamp_opt(end.seconds, 0).unwrap();
    let now = app.engine.clock.now();
    app.engine.clock.advance(end - now + chrono::Duration::seconds(1));
    app.engine.ledger_pass().await;
    assert_eq!(app.available("org").await, "100");
    app.charge("org", "80", "c2").await.unwrap();
    let alerts = wait_for(&app, 4).await;
    assert_eq!(thresholds(&alerts), vec!["org:25", "org:15", "org:0", "org:25"]);
    assert_eq!(alerts[3].period_credits, "100");
}
