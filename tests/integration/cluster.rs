//! The same service on a real 3-master Redis Cluster (started by
//! scripts/test.sh): exactness across two instances, tenants spread over
//! shards, and a rebuild after a tenant's keys are lost.

use std::{sync::Arc, time::Duration};

use creditd::{
    pb::{self, GrantCategory},
    store::{
        hot::{HotStore, HotTimings},
        keys::TenantKeys,
    },
};
use futures::{StreamExt, stream};
use rust_decimal::Decimal;

use crate::harness::{Backends, CLUSTER, TENANT, TestApp, eventually, req};

async fn cluster_app() -> TestApp {
    let app = TestApp::spawn_on(Backends::fresh_cluster().await, CLUSTER).await;
    app.create_tenant(TENANT).await;
    app
}

#[tokio::test]
async fn exactness_on_a_redis_cluster() {
    let first = Arc::new(cluster_app().await);
    let second = Arc::new(TestApp::spawn_on(first.backends.clone(), CLUSTER).await);
    first.account("pool", None, false, None).await;
    for i in 0..20 {
        first.account(&format!("u{i}"), Some("pool"), true, None).await;
    }
    first.grant("pool", "500", GrantCategory::Plan).await;
    second.adopt_keys(&first);

    let results: Vec<pb::ReserveResponse> = stream::iter(0..2_000)
        .map(|i| {
            let app = if i % 2 == 0 { first.clone() } else { second.clone() };
            async move { app.reserve(&format!("u{}", i % 20), "1", &format!("k{i}")).await.expect("reserve answers") }
        })
        .buffer_unordered(128)
        .collect()
        .await;
    let granted: Vec<String> = results.iter().filter(|r| r.granted).map(|r| r.reservation_id.clone()).collect();
    assert_eq!(granted.len(), 500, "exactly the pool is granted");
    stream::iter(granted.into_iter().enumerate())
        .for_each_concurrent(64, |(i, rid)| {
            let app = if i % 2 == 0 { second.clone() } else { first.clone() };
            async move {
                app.commit(&rid, "1", &format!("c{i}")).await.expect("commit");
            }
        })
        .await;
    let pg = first.backends.pg().await;
    let total: Decimal = sqlx::query_scalar("SELECT SUM(amount) FROM usage_events").fetch_one(&pg).await.unwrap();
    assert_eq!(total, Decimal::from(500));
    let b = first.balance("u0").await;
    assert_eq!(b.levels[1].balance, "0");
    assert_eq!(b.levels[1].held, "0");
}

#[tokio::test]
async fn tenants_on_different_shards_and_a_rebuild() {
    let app = cluster_app().await;
    let tenants = ["t-alpha", "t-beta", "t-gamma", "t-delta", "t-epsilon"];
    let slots: std::collections::BTreeSet<u16> =
        tenants.iter().map(|t| TenantKeys::new(&app.backends.key_prefix, t).slot() / 5462).collect();
    assert!(slots.len() >= 2, "the tenants spread over several shards");
    for t in tenants {
        app.create_tenant(t).await;
        app.account_in(t, "org", None, false, None).await;
        app.account_in(t, "u", Some("org"), true, None).await;
        app.grant_in(t, "org", "100", GrantCategory::Plan).await;
        let r = app
            .credit
            .clone()
            .reserve(req(
                t,
                pb::ReserveRequest {
                    account_id: "u".into(),
                    cost: Some(pb::reserve_request::Cost::Amount("30".into())),
                    idempotency_key: "r".into(),
                    ..Default::default()
                },
            ))
            .await
            .unwrap()
            .into_inner();
        assert!(r.granted);
        app.credit
            .clone()
            .commit(req(
                t,
                pb::CommitRequest {
                    reservation_id: r.reservation_id,
                    cost: Some(pb::commit_request::Cost::Amount("25".into())),
                    idempotency_key: "c".into(),
                    ..Default::default()
                },
            ))
            .await
            .unwrap();
        assert_eq!(app.balance_in(t, "u").await.available, "75");
    }

    // One tenant's keys are lost on its shard: it is rebuilt from PostgreSQL.
    let timings = HotTimings {
        idempotency_ttl: Duration::from_secs(60),
        tombstone_ttl: Duration::from_secs(60),
        commit_deadline: Duration::from_secs(30),
    };
    let hot = HotStore::connect(
        &app.backends.redis_url,
        true,
        "",
        app.backends.key_prefix.clone(),
        8,
        timings,
        Duration::from_secs(2),
    )
    .await
    .unwrap();
    hot.unload_tenant("t-gamma").await.unwrap();
    assert!(!hot.is_loaded("t-gamma").await.unwrap());
    eventually(Duration::from_secs(20), || async {
        let mut credit = app.credit.clone();
        credit
            .get_balance(req("t-gamma", pb::GetBalanceRequest { account_id: "u".into() }))
            .await
            .is_ok_and(|b| b.into_inner().available == "75")
    })
    .await;
    assert_eq!(app.balance_in("t-alpha", "u").await.available, "75", "other tenants were untouched");
}
