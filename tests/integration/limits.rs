//! The commit limit: one Commit may cost at most `hold × hold_multiple +
//! allowance`, one Charge at most `charge_max` (tenant settings). Beyond
//! either the call is refused with COMMIT_LIMIT_EXCEEDED and nothing moves:
//! balances, holds, caps, usage events and the idempotency key.

use creditd::pb::{self, GrantCategory};
use tonic::Code;

use crate::harness::{TENANT, TestApp, assert_status, req, req_operator};

/// org (pool 1000) ← u (pool access, capped at 5).
async fn capped(app: &TestApp, tenant: &str) {
    app.account_in(tenant, "org", None, false, None).await;
    app.account_in(tenant, "u", Some("org"), true, Some("5")).await;
    app.grant_in(tenant, "org", "1000", GrantCategory::Plan).await;
}

/// Every figure a refused call must leave as it was.
async fn state(app: &TestApp, tenant: &str) -> (Vec<pb::BalanceLevel>, i64) {
    let mut levels = app.balance_in(tenant, "u").await.levels;
    if tenant == "lim" {
        levels.extend(app.balance_in(tenant, "v").await.levels);
    }
    let pg = app.backends.pg().await;
    let events: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM usage_events WHERE tenant_id = $1")
        .bind(tenant)
        .fetch_one(&pg)
        .await
        .unwrap();
    (levels, events)
}

async fn reserve_in(app: &TestApp, tenant: &str, amount: &str, key: &str) -> String {
    reserve_on(app, tenant, "u", amount, key).await
}

async fn reserve_on(app: &TestApp, tenant: &str, account: &str, amount: &str, key: &str) -> String {
    let r = app
        .credit
        .clone()
        .reserve(req(
            tenant,
            pb::ReserveRequest {
                account_id: account.into(),
                cost: Some(pb::reserve_request::Cost::Amount(amount.into())),
                idempotency_key: key.into(),
                ..Default::default()
            },
        ))
        .await
        .expect("reserve")
        .into_inner();
    assert!(r.granted, "{r:?}");
    r.reservation_id
}

async fn commit_in(
    app: &TestApp,
    tenant: &str,
    hold: &str,
    amount: &str,
    key: &str,
) -> Result<pb::CommitResponse, tonic::Status> {
    app.credit
        .clone()
        .commit(req(
            tenant,
            pb::CommitRequest {
                reservation_id: hold.into(),
                cost: Some(pb::commit_request::Cost::Amount(amount.into())),
                idempotency_key: key.into(),
                ..Default::default()
            },
        ))
        .await
        .map(|r| r.into_inner())
}

async fn charge_in(app: &TestApp, tenant: &str, amount: &str, key: &str) -> Result<pb::CommitResponse, tonic::Status> {
    app.credit
        .clone()
        .charge(req(
            tenant,
            pb::ChargeRequest {
                account_id: "u".into(),
                cost: Some(pb::charge_request::Cost::Amount(amount.into())),
                idempotency_key: key.into(),
                ..Default::default()
            },
        ))
        .await
        .map(|r| r.into_inner())
}

async fn tenant_with(app: &TestApp, tenant: &str, limit: pb::CommitLimit) -> Result<pb::Tenant, tonic::Status> {
    let created = app
        .admin
        .clone()
        .create_tenant(req_operator(pb::CreateTenantRequest {
            tenant_id: tenant.into(),
            commit_limit: Some(limit),
            ..Default::default()
        }))
        .await
        .map(|r| r.into_inner())?;
    let key = app.create_key(tenant, pb::ApiKeyRole::Admin).await;
    app.keys.lock().unwrap().insert(tenant.to_string(), key);
    Ok(created)
}

#[tokio::test]
async fn a_micro_hold_cannot_be_committed_at_a_billion() {
    let app = TestApp::spawn().await;
    capped(&app, TENANT).await;
    let hold = reserve_in(&app, TENANT, "0.000001", "r").await;
    let before = state(&app, TENANT).await;

    let e = commit_in(&app, TENANT, &hold, "1000000000", "c").await.unwrap_err();
    assert_status(&e, Code::FailedPrecondition, "COMMIT_LIMIT_EXCEEDED", None);
    assert!(e.message().contains("0.00001"), "the bound is told: {}", e.message());
    assert_eq!(state(&app, TENANT).await, before, "a refused commit changes nothing");

    // The hold is still active, the key unused: the same key commits the
    // largest cost the default limit allows (10 × the hold).
    let done = commit_in(&app, TENANT, &hold, "0.00001", "c").await.expect("commit at the bound");
    assert_eq!(done.amount, "0.00001");
    let (_, events) = state(&app, TENANT).await;
    assert_eq!(events, 1);
}

#[tokio::test]
async fn the_tenant_sets_the_multiple_and_the_allowance() {
    let app = TestApp::spawn().await;
    let t = tenant_with(
        &app,
        "lim",
        pb::CommitLimit { hold_multiple: "2".into(), allowance: "1".into(), ..Default::default() },
    )
    .await
    .unwrap();
    let limit = t.commit_limit.unwrap();
    assert_eq!((limit.hold_multiple.as_str(), limit.allowance.as_str(), limit.charge_max.as_str()), ("2", "1", ""));
    capped(&app, "lim").await;
    app.account_in("lim", "v", Some("org"), true, None).await;

    // 3 × 2 + 1 = 7: exactly 7 is allowed, one micro-credit more is not.
    let first = reserve_on(&app, "lim", "v", "3", "r1").await;
    assert_eq!(commit_in(&app, "lim", &first, "7", "c1").await.unwrap().amount, "7");
    let second = reserve_on(&app, "lim", "v", "3", "r2").await;
    let before = state(&app, "lim").await;
    let e = commit_in(&app, "lim", &second, "7.000001", "c2").await.unwrap_err();
    assert_status(&e, Code::FailedPrecondition, "COMMIT_LIMIT_EXCEEDED", None);
    assert_eq!(state(&app, "lim").await, before);

    // An extension raises the bound with the hold: (3 + 2) × 2 + 1 = 11.
    let third = reserve_on(&app, "lim", "v", "3", "r3").await;
    let extended = app
        .credit
        .clone()
        .extend(req(
            "lim",
            pb::ExtendRequest {
                reservation_id: third.clone(),
                more: Some(pb::extend_request::More::Amount("2".into())),
                idempotency_key: "x".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(extended.granted, "{extended:?}");
    let e = commit_in(&app, "lim", &third, "11.000001", "c3").await.unwrap_err();
    assert_status(&e, Code::FailedPrecondition, "COMMIT_LIMIT_EXCEEDED", None);
    assert_eq!(commit_in(&app, "lim", &third, "11", "c3").await.unwrap().amount, "11");

    // The default tenant is unaffected by another tenant's limit.
    capped(&app, TENANT).await;
    let h = reserve_in(&app, TENANT, "1", "r").await;
    assert_eq!(commit_in(&app, TENANT, &h, "10", "c").await.unwrap().amount, "10");
}

#[tokio::test]
async fn a_charge_above_charge_max_is_refused() {
    let app = TestApp::spawn().await;
    tenant_with(&app, "chg", pb::CommitLimit { charge_max: "50".into(), ..Default::default() }).await.unwrap();
    capped(&app, "chg").await;
    let before = state(&app, "chg").await;
    let e = charge_in(&app, "chg", "50.000001", "g").await.unwrap_err();
    assert_status(&e, Code::FailedPrecondition, "COMMIT_LIMIT_EXCEEDED", None);
    assert_eq!(state(&app, "chg").await, before);
    // The key was not used: it records the charge at the limit.
    assert_eq!(charge_in(&app, "chg", "50", "g").await.unwrap().amount, "50");

    // Without charge_max (the default), a Charge has no limit.
    capped(&app, TENANT).await;
    assert_eq!(charge_in(&app, TENANT, "2000", "g").await.unwrap().overdraft, "1000");
}

#[tokio::test]
async fn a_bad_commit_limit_names_its_field_and_creates_nothing() {
    let app = TestApp::spawn().await;
    let cases = [
        (pb::CommitLimit { hold_multiple: "0".into(), ..Default::default() }, "INVALID_ARGUMENT", "hold_multiple"),
        (pb::CommitLimit { hold_multiple: "1.5".into(), ..Default::default() }, "INVALID_ARGUMENT", "hold_multiple"),
        (pb::CommitLimit { hold_multiple: "+2".into(), ..Default::default() }, "INVALID_ARGUMENT", "hold_multiple"),
        (
            pb::CommitLimit { hold_multiple: "1000001".into(), ..Default::default() },
            "INVALID_ARGUMENT",
            "hold_multiple",
        ),
        (pb::CommitLimit { allowance: "-1".into(), ..Default::default() }, "INVALID_AMOUNT", "allowance"),
        (pb::CommitLimit { allowance: "1.".into(), ..Default::default() }, "INVALID_AMOUNT", "allowance"),
        (pb::CommitLimit { charge_max: "0".into(), ..Default::default() }, "INVALID_AMOUNT", "charge_max"),
    ];
    for (limit, reason, part) in cases {
        let e = tenant_with(&app, "bad", limit.clone()).await.unwrap_err();
        assert_status(&e, Code::InvalidArgument, reason, Some(&format!("commit_limit.{part}")));
    }
    let e =
        app.admin.clone().get_tenant(req_operator(pb::GetTenantRequest { tenant_id: "bad".into() })).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    // Defaults are filled in; another limit for an existing tenant is
    // TENANT_EXISTS.
    let t = app
        .admin
        .clone()
        .get_tenant(req_operator(pb::GetTenantRequest { tenant_id: TENANT.into() }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        t.commit_limit,
        Some(pb::CommitLimit { hold_multiple: "10".into(), allowance: "0".into(), charge_max: String::new() })
    );
    let e = app
        .admin
        .clone()
        .create_tenant(req_operator(pb::CreateTenantRequest {
            tenant_id: TENANT.into(),
            commit_limit: Some(pb::CommitLimit { hold_multiple: "3".into(), ..Default::default() }),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_status(&e, Code::AlreadyExists, "TENANT_EXISTS", None);
}
