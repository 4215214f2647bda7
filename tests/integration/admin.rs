//! Accounts and grants through AdminService: the spend-order ledger,
//! voids, pending and expiring grants, tree settings taking effect.

use std::time::Duration;

use chrono::Utc;
use creditd::pb::{self, GrantCategory, GrantStatus};
use tonic::Code;

use crate::harness::{TENANT, TestApp, assert_status, eventually, req};

fn ts(t: chrono::DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: t.timestamp(), nanos: t.timestamp_subsec_nanos() as i32 }
}

#[tokio::test]
async fn usage_is_allocated_in_spend_order_and_matches_the_hot_balance() {
    let app = TestApp::spawn().await;
    app.account("org", None, false, None).await;
    let plan = app.grant("org", "100", GrantCategory::Plan).await;
    let pack = app.grant("org", "30", GrantCategory::Purchase).await;
    let promo = app.grant("org", "5", GrantCategory::Promotional).await;
    assert_eq!((plan.priority, pack.priority, promo.priority), (40, 30, 10));

    app.charge("org", "20", "c1").await.unwrap();
    app.charge("org", "20.5", "c2").await.unwrap();

    let grants = app.grants("org").await;
    let order: Vec<&str> = grants.iter().map(|g| g.grant_id.as_str()).collect();
    assert_eq!(order, vec![promo.grant_id.as_str(), pack.grant_id.as_str(), plan.grant_id.as_str()]);
    let used: Vec<&str> = grants.iter().map(|g| g.used.as_str()).collect();
    assert_eq!(used, vec!["5", "30", "5.5"], "promo, then the pack, then the plan");
    let remaining: Vec<&str> = grants.iter().map(|g| g.remaining.as_str()).collect();
    assert_eq!(remaining, vec!["0", "0", "94.5"]);
    assert!(grants.iter().all(|g| g.status() == GrantStatus::Active));
    assert_eq!(app.balance("org").await.levels[0].balance, "94.5", "Σ remaining equals the hot balance");
}

#[tokio::test]
async fn earlier_expiry_is_spent_first_within_a_priority() {
    let app = TestApp::spawn().await;
    app.account("u", None, false, None).await;
    let later = app.grant("u", "10", GrantCategory::Purchase).await;
    let soon = app
        .admin
        .clone()
        .create_grant(req(
            TENANT,
            pb::CreateGrantRequest {
                account_id: "u".into(),
                amount: "10".into(),
                category: GrantCategory::Purchase as i32,
                expires_at: Some(ts(Utc::now() + chrono::Duration::days(3))),
                idempotency_key: "soon".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    app.charge("u", "4", "c").await.unwrap();
    let grants = app.grants("u").await;
    assert_eq!(grants[0].grant_id, soon.grant_id);
    assert_eq!(grants[0].used, "4");
    assert_eq!(grants[1].grant_id, later.grant_id);
    assert_eq!(grants[1].used, "0");
}

#[tokio::test]
async fn void_removes_the_remainder_once() {
    let app = TestApp::spawn().await;
    app.account("u", None, false, None).await;
    let keep = app.grant("u", "10", GrantCategory::Plan).await;
    let promo = app.grant("u", "50", GrantCategory::Promotional).await;
    app.charge("u", "20", "c").await.unwrap();
    let void = |key: &str| {
        let mut admin = app.admin.clone();
        let request = pb::VoidGrantRequest {
            grant_id: promo.grant_id.clone(),
            reason: "abuse".into(),
            idempotency_key: key.into(),
        };
        async move { admin.void_grant(req(TENANT, request)).await }
    };
    let voided = void("v1").await.unwrap().into_inner();
    assert_eq!(voided.status(), GrantStatus::Voided);
    assert_eq!(voided.used, "20");
    assert_eq!(voided.forfeited, "30");
    assert_eq!(voided.remaining, "0");
    assert_eq!(voided.void_reason, "abuse");
    assert_eq!(app.available("u").await, "10", "only the plan grant is left");

    let again = void("v1").await.unwrap().into_inner();
    assert_eq!(again.forfeited, "30");
    let e = void("v2").await.unwrap_err();
    assert_status(&e, Code::FailedPrecondition, "GRANT_NOT_LIVE", None);
    assert_eq!(app.available("u").await, "10");
    let active = app
        .admin
        .clone()
        .list_grants(req(TENANT, pb::ListGrantsRequest { account_id: "u".into(), include_inactive: false }))
        .await
        .unwrap()
        .into_inner()
        .grants;
    assert_eq!(active.len(), 1);
    assert_eq!(active[0].grant_id, keep.grant_id);
}

#[tokio::test]
async fn a_future_grant_is_pending_until_effective() {
    let app = TestApp::spawn().await;
    app.account("u", None, false, None).await;
    let grant = app
        .admin
        .clone()
        .create_grant(req(
            TENANT,
            pb::CreateGrantRequest {
                account_id: "u".into(),
                amount: "7".into(),
                category: GrantCategory::Trial as i32,
                effective_at: Some(ts(Utc::now() + chrono::Duration::milliseconds(600))),
                idempotency_key: "later".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(grant.status(), GrantStatus::Pending);
    assert_eq!(app.available("u").await, "0");
    eventually(Duration::from_secs(5), || async { app.available("u").await == "7" }).await;
    assert_eq!(app.grants("u").await[0].status(), GrantStatus::Active);
}

#[tokio::test]
async fn an_expiring_grant_takes_its_remainder_with_it() {
    let app = TestApp::spawn().await;
    app.account("u", None, false, None).await;
    app.grant("u", "5", GrantCategory::Plan).await;
    app.admin
        .clone()
        .create_grant(req(
            TENANT,
            pb::CreateGrantRequest {
                account_id: "u".into(),
                amount: "20".into(),
                category: GrantCategory::Purchase as i32,
                expires_at: Some(ts(Utc::now() + chrono::Duration::milliseconds(800))),
                idempotency_key: "pack".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    app.charge("u", "8", "c").await.unwrap();
    assert_eq!(app.available("u").await, "17");
    eventually(Duration::from_secs(5), || async { app.available("u").await == "5" }).await;
    let grants = app.grants("u").await;
    let pack = grants.iter().find(|g| g.category() == GrantCategory::Purchase).unwrap();
    assert_eq!(pack.status(), GrantStatus::Expired);
    assert_eq!(pack.used, "8");
    assert_eq!(pack.forfeited, "12");
}

#[tokio::test]
async fn pool_access_switch_applies_to_the_next_reserve() {
    let app = TestApp::spawn().await;
    app.account("org", None, false, None).await;
    app.account("u", Some("org"), false, None).await;
    app.grant("org", "100", GrantCategory::Plan).await;
    assert!(!app.reserve("u", "1", "r1").await.unwrap().granted);
    let updated = app
        .admin
        .clone()
        .update_account(req(
            TENANT,
            pb::UpdateAccountRequest { account_id: "u".into(), pool_access: Some(true), ..Default::default() },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(updated.pool_access);
    assert!(app.reserve("u", "1", "r2").await.unwrap().granted);
    // Setting and removing a cap.
    let capped = app
        .admin
        .clone()
        .update_account(req(
            TENANT,
            pb::UpdateAccountRequest { account_id: "u".into(), cap: Some("1.5".into()), ..Default::default() },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(capped.cap, "1.5");
    let denied = app.reserve("u", "1", "r3").await.unwrap();
    assert_eq!(denied.denial.unwrap().reason(), pb::DenialReason::CapReached);
    app.admin
        .clone()
        .update_account(req(
            TENANT,
            pb::UpdateAccountRequest { account_id: "u".into(), cap: Some(String::new()), ..Default::default() },
        ))
        .await
        .unwrap();
    assert!(app.reserve("u", "1", "r4").await.unwrap().granted);
}

#[tokio::test]
async fn trees_are_bounded_and_listable() {
    let app = TestApp::spawn().await;
    let mut parent: Option<String> = None;
    for depth in 1..=8 {
        let id = format!("d{depth}");
        app.account(&id, parent.as_deref(), true, None).await;
        parent = Some(id);
    }
    let e = app
        .admin
        .clone()
        .create_account(req(
            TENANT,
            pb::CreateAccountRequest { account_id: "d9".into(), parent_id: "d8".into(), ..Default::default() },
        ))
        .await
        .unwrap_err();
    assert_status(&e, Code::InvalidArgument, "TREE_TOO_DEEP", Some("parent_id"));
    app.grant("d1", "3", GrantCategory::Plan).await;
    assert_eq!(app.available("d8").await, "3", "a deep subject draws through every pool");

    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = app
            .admin
            .clone()
            .list_accounts(req(
                TENANT,
                pb::ListAccountsRequest { page_size: 3, page_token: token.clone(), ..Default::default() },
            ))
            .await
            .unwrap()
            .into_inner();
        seen.extend(page.accounts.into_iter().map(|a| a.account_id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen, (1..=8).map(|d| format!("d{d}")).collect::<Vec<_>>());
    let children = app
        .admin
        .clone()
        .list_accounts(req(TENANT, pb::ListAccountsRequest { parent_id: "d3".into(), ..Default::default() }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(children.accounts.len(), 1);
    assert_eq!(children.accounts[0].account_id, "d4");
}
