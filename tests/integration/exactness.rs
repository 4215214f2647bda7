//! Exactness under concurrency: two creditd instances sharing one Redis
//! and one PostgreSQL never grant more than there is, and what leaves the
//! balances equals what PostgreSQL recorded.

use std::sync::Arc;

use creditd::pb::{self, GrantCategory};
use futures::{StreamExt, stream};
use rust_decimal::Decimal;

use crate::harness::{TENANT, TestApp, req};

#[tokio::test]
async fn two_instances_grant_exactly_the_pool() {
    let first = Arc::new(TestApp::spawn().await);
    let second = Arc::new(TestApp::spawn_on(first.backends.clone(), &[]).await);
    first.account("pool", None, false, None).await;
    for i in 0..50 {
        first.account(&format!("u{i}"), Some("pool"), true, None).await;
    }
    first.grant("pool", "1000", GrantCategory::Plan).await;
    second.adopt_keys(&first);

    let attempts = 5_000;
    let results: Vec<pb::ReserveResponse> = stream::iter(0..attempts)
        .map(|i| {
            let app = if i % 2 == 0 { first.clone() } else { second.clone() };
            async move { app.reserve(&format!("u{}", i % 50), "1", &format!("k{i}")).await.expect("reserve answers") }
        })
        .buffer_unordered(256)
        .collect()
        .await;
    let granted: Vec<&pb::ReserveResponse> = results.iter().filter(|r| r.granted).collect();
    assert_eq!(granted.len(), 1000, "exactly the pool is granted");
    assert!(results.iter().filter(|r| !r.granted).all(|r| {
        r.denial.as_ref().is_some_and(|d| d.reason() == pb::DenialReason::InsufficientCredits && d.account_id == "pool")
    }));
    assert_eq!(first.available("u0").await, "0");

    let ids: Vec<String> = granted.iter().map(|r| r.reservation_id.clone()).collect();
    let commits: Vec<pb::CommitResponse> = stream::iter(ids.into_iter().enumerate())
        .map(|(i, rid)| {
            let app = if i % 2 == 0 { second.clone() } else { first.clone() };
            async move { app.commit(&rid, "1", &format!("c{i}")).await.expect("commit") }
        })
        .buffer_unordered(128)
        .collect()
        .await;
    assert_eq!(commits.len(), 1000);

    // Σ usage in PostgreSQL equals what left the Redis balances.
    let pg = first.backends.pg().await;
    let (events, total): (i64, Decimal) =
        sqlx::query_as("SELECT COUNT(*), COALESCE(SUM(amount), 0) FROM usage_events WHERE tenant_id = $1")
            .bind(TENANT)
            .fetch_one(&pg)
            .await
            .unwrap();
    assert_eq!(events, 1000);
    assert_eq!(total, Decimal::from(1000));
    let b = first.balance("u0").await;
    assert_eq!(b.levels[1].balance, "0");
    assert_eq!(b.levels[1].held, "0");
    assert_eq!(b.levels[1].cap_used, "1000");

    // And the ledger allocates all of it to the pool's grant.
    let grants = first
        .admin
        .clone()
        .list_grants(req(TENANT, pb::ListGrantsRequest { account_id: "pool".into(), include_inactive: true }))
        .await
        .unwrap()
        .into_inner()
        .grants;
    assert_eq!(grants[0].used, "1000");
    assert_eq!(grants[0].remaining, "0");
}
