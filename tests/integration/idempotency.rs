//! Replays and mismatched replays of every mutating RPC: the same key with
//! the same payload returns the first answer and applies once; the same key
//! with another payload fails with IDEMPOTENCY_KEY_REUSED and changes
//! nothing. Keys are scoped per RPC and per tenant, and Commit replays
//! survive the loss of the Redis idempotency record.

use std::time::Duration;

use creditd::pb::{self, DenialReason, GrantCategory, GrantStatus};
use tonic::{Code, Status};

use crate::harness::{TENANT, TestApp, assert_status, eventually, req, req_operator};

const OTHER: &str = "other";

/// org (pool of 1000) ← alice (pool access), bob (own 100, no pool access).
async fn org() -> TestApp {
    let app = TestApp::spawn().await;
    app.account("org", None, false, None).await;
    app.account("alice", Some("org"), true, None).await;
    app.account("bob", Some("org"), false, None).await;
    app.grant("org", "1000", GrantCategory::Plan).await;
    app.grant("bob", "100", GrantCategory::Plan).await;
    app
}

fn assert_reused(status: &Status) {
    assert_status(status, Code::FailedPrecondition, "IDEMPOTENCY_KEY_REUSED", None);
}

fn secs(seconds: i64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration { seconds, nanos: 0 })
}

fn reserve_req(account: &str, amount: &str, key: &str) -> pb::ReserveRequest {
    pb::ReserveRequest {
        account_id: account.into(),
        cost: Some(pb::reserve_request::Cost::Amount(amount.into())),
        idempotency_key: key.into(),
        ..Default::default()
    }
}

async fn reserve_with(app: &TestApp, tenant: &str, r: pb::ReserveRequest) -> Result<pb::ReserveResponse, Status> {
    app.credit.clone().reserve(req(tenant, r)).await.map(|r| r.into_inner())
}

async fn extend(
    app: &TestApp,
    reservation: &str,
    more: &str,
    ttl_secs: i64,
    key: &str,
) -> Result<pb::ExtendResponse, Status> {
    app.credit
        .clone()
        .extend(req(
            TENANT,
            pb::ExtendRequest {
                reservation_id: reservation.into(),
                more: Some(pb::extend_request::More::Amount(more.into())),
                ttl: secs(ttl_secs),
                idempotency_key: key.into(),
            },
        ))
        .await
        .map(|r| r.into_inner())
}

async fn charge_in(app: &TestApp, tenant: &str, account: &str, amount: &str, key: &str) -> pb::CommitResponse {
    app.credit
        .clone()
        .charge(req(
            tenant,
            pb::ChargeRequest {
                account_id: account.into(),
                cost: Some(pb::charge_request::Cost::Amount(amount.into())),
                idempotency_key: key.into(),
                ..Default::default()
            },
        ))
        .await
        .expect("charge")
        .into_inner()
}

async fn commit_in(app: &TestApp, tenant: &str, reservation: &str, amount: &str, key: &str) -> pb::CommitResponse {
    app.credit
        .clone()
        .commit(req(
            tenant,
            pb::CommitRequest {
                reservation_id: reservation.into(),
                cost: Some(pb::commit_request::Cost::Amount(amount.into())),
                idempotency_key: key.into(),
                ..Default::default()
            },
        ))
        .await
        .expect("commit")
        .into_inner()
}

fn grant_req(account: &str, amount: &str, key: &str) -> pb::CreateGrantRequest {
    pb::CreateGrantRequest {
        account_id: account.into(),
        amount: amount.into(),
        category: GrantCategory::Purchase as i32,
        description: "Pack #1".into(),
        idempotency_key: key.into(),
        ..Default::default()
    }
}

async fn create_grant(app: &TestApp, tenant: &str, r: pb::CreateGrantRequest) -> Result<pb::Grant, Status> {
    app.admin.clone().create_grant(req(tenant, r)).await.map(|r| r.into_inner())
}

async fn void_grant(app: &TestApp, grant: &str, reason: &str, key: &str) -> Result<pb::Grant, Status> {
    app.admin
        .clone()
        .void_grant(req(
            TENANT,
            pb::VoidGrantRequest { grant_id: grant.into(), reason: reason.into(), idempotency_key: key.into() },
        ))
        .await
        .map(|r| r.into_inner())
}

async fn usage_events(app: &TestApp, tenant: &str) -> i64 {
    let pg = app.backends.pg().await;
    let n = sqlx::query_scalar("SELECT count(*) FROM usage_events WHERE tenant_id = $1")
        .bind(tenant)
        .fetch_one(&pg)
        .await
        .unwrap();
    pg.close().await;
    n
}

async fn usage_events_with_key(app: &TestApp, kind: &str, key: &str) -> Vec<(String, String)> {
    let pg = app.backends.pg().await;
    let rows = sqlx::query_as(
        "SELECT event_id::text, amount::text FROM usage_events \
         WHERE tenant_id = $1 AND kind = $2 AND idempotency_key = $3 ORDER BY recorded_at",
    )
    .bind(TENANT)
    .bind(kind)
    .bind(key)
    .fetch_all(&pg)
    .await
    .unwrap();
    pg.close().await;
    rows
}

/// Scans `pattern` (Redis glob; `{` and `}` are literal) and deletes the
/// keys found; returns them.
async fn delete_redis_keys(app: &TestApp, pattern: &str) -> Vec<String> {
    let mut redis = app.backends.redis().await;
    let mut found = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut redis)
            .await
            .expect("scan");
        found.extend(batch);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    if !found.is_empty() {
        let _: () = redis::cmd("DEL").arg(&found).query_async(&mut redis).await.expect("del");
    }
    found
}

/// The tenant's key prefix in Redis: `<prefix>{t:<tenant>}:`.
fn tenant_prefix(app: &TestApp, tenant: &str) -> String {
    format!("{}{{t:{tenant}}}:", app.backends.key_prefix)
}

async fn hold_state(app: &TestApp, reservation: &str) -> Option<String> {
    let mut redis = app.backends.redis().await;
    redis::cmd("HGET")
        .arg(format!("{}h:{reservation}", tenant_prefix(app, TENANT)))
        .arg("st")
        .query_async(&mut redis)
        .await
        .expect("hget")
}

#[tokio::test]
async fn reserve_replay_returns_the_same_hold_and_holds_once() {
    let app = org().await;
    let first = app.reserve("alice", "100", "r1").await.unwrap();
    assert!(first.granted && !first.replayed);
    let again = app.reserve("alice", "100", "r1").await.unwrap();
    assert!(again.replayed, "a replay says so");
    assert_eq!(pb::ReserveResponse { replayed: false, ..again }, first, "the replay is the first answer");
    let b = app.balance("alice").await;
    assert_eq!(b.available, "900", "held once");
    assert_eq!(b.levels[1].held, "100");
    assert_eq!(b.levels[0].cap_used, "100");

    // The same key with another payload: refused, nothing changes.
    let e = app.reserve("alice", "101", "r1").await.unwrap_err();
    assert_reused(&e);
    let e = app.reserve("bob", "100", "r1").await.unwrap_err();
    assert_reused(&e);
    let e = reserve_with(&app, TENANT, pb::ReserveRequest { ttl: secs(120), ..reserve_req("alice", "100", "r1") })
        .await
        .unwrap_err();
    assert_reused(&e);
    let mut labelled = reserve_req("alice", "100", "r1");
    labelled.labels.insert("agent".into(), "bot".into());
    assert_reused(&reserve_with(&app, TENANT, labelled).await.unwrap_err());
    assert_eq!(app.balance("alice").await, b, "refused replays changed nothing");
    assert_eq!(app.balance("bob").await.available, "100");

    // The record is intact: the original payload still replays.
    let third = app.reserve("alice", "100", "r1").await.unwrap();
    assert!(third.replayed);
    assert_eq!(third.reservation_id, first.reservation_id);

    // Once the hold is settled, a replay still answers the first answer
    // and takes nothing again.
    app.commit(&first.reservation_id, "100", "c1").await.unwrap();
    let late = app.reserve("alice", "100", "r1").await.unwrap();
    assert!(late.replayed);
    assert_eq!(late.reservation_id, first.reservation_id);
    let b = app.balance("alice").await;
    assert_eq!(b.available, "900");
    assert_eq!(b.levels[1].held, "0");
}

#[tokio::test]
async fn a_denied_reserve_replays_its_denial() {
    let app = org().await;
    let denied = app.reserve("bob", "150", "d1").await.unwrap();
    assert!(!denied.granted && !denied.replayed);
    assert_eq!(denied.denial.as_ref().unwrap().reason(), DenialReason::InsufficientCredits);

    // Even once the credits are there, the key answers what it answered.
    app.grant("bob", "100", GrantCategory::Purchase).await;
    assert_eq!(app.available("bob").await, "200");
    let again = app.reserve("bob", "150", "d1").await.unwrap();
    assert!(again.replayed);
    assert_eq!(pb::ReserveResponse { replayed: false, ..again }, denied);
    let b = app.balance("bob").await;
    assert_eq!(b.available, "200", "a replayed denial holds nothing");
    assert_eq!(b.levels[0].held, "0");

    // A mismatched payload under the denied key is still refused.
    assert_reused(&app.reserve("bob", "50", "d1").await.unwrap_err());
    // A new key is a new decision.
    let granted = app.reserve("bob", "150", "d2").await.unwrap();
    assert!(granted.granted && !granted.replayed);
    assert_eq!(app.available("bob").await, "50");
}

#[tokio::test]
async fn commit_replay_returns_the_same_event_and_charges_once() {
    let app = org().await;
    let r = app.reserve("alice", "100", "r").await.unwrap();
    let first = app.commit(&r.reservation_id, "60", "c").await.unwrap();
    assert!(!first.replayed);
    assert_eq!((first.amount.as_str(), first.released.as_str()), ("60", "40"));
    assert_eq!(first.available, "940");

    let again = app.commit(&r.reservation_id, "60", "c").await.unwrap();
    assert!(again.replayed);
    assert_eq!(pb::CommitResponse { replayed: false, ..again.clone() }, first, "the replay is the first answer");
    assert_eq!(app.available("alice").await, "940", "charged once");
    assert_eq!(usage_events(&app, TENANT).await, 1);

    // Same key, other payload: refused, nothing changes.
    assert_reused(&app.commit(&r.reservation_id, "70", "c").await.unwrap_err());
    let other = app.reserve("alice", "10", "r2").await.unwrap();
    assert_reused(&app.commit(&other.reservation_id, "60", "c").await.unwrap_err());
    let b = app.balance("alice").await;
    assert_eq!(b.available, "930");
    assert_eq!(b.levels[1].held, "10", "the other hold is untouched");
    assert_eq!(usage_events(&app, TENANT).await, 1);
    // A second commit of the same hold under a new key is not a replay.
    let e = app.commit(&r.reservation_id, "60", "c-new").await.unwrap_err();
    assert_status(&e, Code::FailedPrecondition, "RESERVATION_COMMITTED", None);

    let stored = usage_events_with_key(&app, "commit", "c").await;
    assert_eq!(stored, vec![(first.event_id.clone(), "60.000000".to_string())]);
    assert_eq!(usage_events(&app, TENANT).await, 1);
    // The ledger charges the grants once too.
    eventually(Duration::from_secs(5), || async {
        app.grants("org").await.iter().map(|g| g.used.clone()).collect::<Vec<_>>() == ["60"]
    })
    .await;
}

#[tokio::test]
async fn commit_replay_is_answered_from_postgres_once_redis_forgot_it() {
    let app = org().await;
    let r = app.reserve("alice", "100", "r").await.unwrap();
    let first = app.commit(&r.reservation_id, "60", "c").await.unwrap();
    // Let the background finalize settle the hold first (as it would have
    // long before a record expires).
    eventually(Duration::from_secs(5), || async {
        hold_state(&app, &r.reservation_id).await.as_deref() == Some("committed")
    })
    .await;

    let prefix = tenant_prefix(&app, TENANT);
    let records = delete_redis_keys(&app, &format!("{prefix}i:c:*")).await;
    assert_eq!(records, vec![format!("{prefix}i:c:c")], "the commit's idempotency record");
    let holds = delete_redis_keys(&app, &format!("{prefix}h:*")).await;
    assert_eq!(holds, vec![format!("{prefix}h:{}", r.reservation_id)], "the hold's tombstone");

    let again = app.commit(&r.reservation_id, "60", "c").await.expect("replay answered from PostgreSQL");
    assert!(again.replayed);
    assert_eq!(again.event_id, first.event_id);
    assert_eq!(again.amount, "60");
    assert_eq!(again.released, "40");
    assert_eq!(again.overdraft, "0");
    assert_eq!(again.recorded_at, first.recorded_at);
    assert_eq!(again.available, "940");
    assert_eq!(app.available("alice").await, "940", "charged once");
    assert_eq!(usage_events(&app, TENANT).await, 1);

    // The stored event still guards the key against another payload.
    assert_reused(&app.commit(&r.reservation_id, "61", "c").await.unwrap_err());
    assert_eq!(app.available("alice").await, "940");
    assert_eq!(usage_events(&app, TENANT).await, 1);
}

#[tokio::test]
async fn charge_replay_is_answered_from_postgres_once_redis_forgot_it() {
    let app = org().await;
    let first = app.charge("alice", "5", "t").await.unwrap();
    assert_eq!(first.available, "995");
    let prefix = tenant_prefix(&app, TENANT);
    let records = delete_redis_keys(&app, &format!("{prefix}i:g:*")).await;
    assert_eq!(records, vec![format!("{prefix}i:g:t")]);

    let again = app.charge("alice", "5", "t").await.expect("replay answered from PostgreSQL");
    assert!(again.replayed);
    assert_eq!(again.event_id, first.event_id);
    assert_eq!(again.amount, "5");
    assert_eq!(again.available, "995");
    assert_eq!(app.available("alice").await, "995", "charged once");
    assert_eq!(app.balance("alice").await.levels[0].cap_used, "5");
    assert_eq!(usage_events(&app, TENANT).await, 1);

    assert_reused(&app.charge("alice", "6", "t").await.unwrap_err());
    assert_eq!(app.available("alice").await, "995");
    assert_eq!(usage_events(&app, TENANT).await, 1);
}

#[tokio::test]
async fn release_replay_returns_the_first_answer_and_releases_once() {
    let app = org().await;
    let r = app.reserve("alice", "100", "r").await.unwrap();
    let first = app.release(&r.reservation_id, "l").await.unwrap();
    assert!(!first.replayed);
    assert_eq!((first.released.as_str(), first.available.as_str()), ("100", "1000"));

    let other = app.reserve("alice", "300", "r2").await.unwrap();
    assert_eq!(app.available("alice").await, "700");
    let again = app.release(&r.reservation_id, "l").await.unwrap();
    assert!(again.replayed);
    assert_eq!(pb::ReleaseResponse { replayed: false, ..again }, first, "the replay is the first answer");
    let b = app.balance("alice").await;
    assert_eq!(b.available, "700", "released once: the other hold still holds");
    assert_eq!(b.levels[1].held, "300");

    // The key names one release: another reservation under it is refused.
    assert_reused(&app.release(&other.reservation_id, "l").await.unwrap_err());
    assert_eq!(app.balance("alice").await, b);
    let done = app.release(&other.reservation_id, "l2").await.unwrap();
    assert_eq!(done.released, "300");
    assert_eq!(app.available("alice").await, "1000");
}

#[tokio::test]
async fn extend_replay_returns_the_first_answer_and_extends_once() {
    let app = org().await;
    let r = app.reserve("alice", "100", "r").await.unwrap();
    let first = extend(&app, &r.reservation_id, "50", 120, "x").await.unwrap();
    assert!(first.granted && !first.replayed);
    assert_eq!(first.amount, "150");

    let again = extend(&app, &r.reservation_id, "50", 120, "x").await.unwrap();
    assert!(again.replayed);
    assert_eq!(pb::ExtendResponse { replayed: false, ..again }, first, "the replay is the first answer");
    let b = app.balance("alice").await;
    assert_eq!(b.available, "850", "extended once");
    assert_eq!(b.levels[1].held, "150");

    assert_reused(&extend(&app, &r.reservation_id, "60", 120, "x").await.unwrap_err());
    assert_reused(&extend(&app, &r.reservation_id, "50", 90, "x").await.unwrap_err());
    let r2 = app.reserve("alice", "1", "r2").await.unwrap();
    assert_reused(&extend(&app, &r2.reservation_id, "50", 120, "x").await.unwrap_err());
    let after = app.balance("alice").await;
    assert_eq!(after.available, "849");
    assert_eq!(after.levels[1].held, "151");

    // A denied extension replays its denial, even once credits are back.
    let denied = extend(&app, &r.reservation_id, "900", 120, "x-big").await.unwrap();
    assert!(!denied.granted);
    assert_eq!(denied.denial.as_ref().unwrap().reason(), DenialReason::InsufficientCredits);
    app.release(&r2.reservation_id, "l2").await.unwrap();
    app.grant("org", "100", GrantCategory::Purchase).await;
    let replayed = extend(&app, &r.reservation_id, "900", 120, "x-big").await.unwrap();
    assert!(replayed.replayed);
    assert_eq!(pb::ExtendResponse { replayed: false, ..replayed }, denied);
    assert_eq!(app.balance("alice").await.levels[1].held, "150");

    let c = app.commit(&r.reservation_id, "150", "c").await.unwrap();
    assert_eq!(c.released, "0");
    assert_eq!(app.available("alice").await, "950");
}

#[tokio::test]
async fn charge_replay_records_one_usage_event() {
    let app = org().await;
    let first = app.charge("alice", "2.5", "task-1").await.unwrap();
    assert!(!first.replayed);
    let again = app.charge("alice", "2.5", "task-1").await.unwrap();
    assert!(again.replayed);
    assert_eq!(pb::CommitResponse { replayed: false, ..again }, first, "the replay is the first answer");
    assert_eq!(app.available("alice").await, "997.5");
    assert_eq!(usage_events_with_key(&app, "charge", "task-1").await.len(), 1);

    assert_reused(&app.charge("alice", "3", "task-1").await.unwrap_err());
    assert_reused(&app.charge("bob", "2.5", "task-1").await.unwrap_err());
    let mut labelled = pb::ChargeRequest {
        account_id: "alice".into(),
        cost: Some(pb::charge_request::Cost::Amount("2.5".into())),
        idempotency_key: "task-1".into(),
        ..Default::default()
    };
    labelled.labels.insert("agent".into(), "bot".into());
    assert_reused(&app.credit.clone().charge(req(TENANT, labelled)).await.unwrap_err());
    assert_eq!(app.available("alice").await, "997.5");
    assert_eq!(app.available("bob").await, "100");
    assert_eq!(usage_events(&app, TENANT).await, 1);
}

#[tokio::test]
async fn create_grant_replay_returns_the_same_grant_and_credits_once() {
    let app = TestApp::spawn().await;
    app.account("solo", None, false, None).await;
    let first = create_grant(&app, TENANT, grant_req("solo", "100", "g1")).await.unwrap();
    let again = create_grant(&app, TENANT, grant_req("solo", "100", "g1")).await.unwrap();
    assert_eq!(again, first, "the replay is the first answer");
    assert_eq!(app.available("solo").await, "100", "credited once");
    assert_eq!(app.grants("solo").await, vec![first.clone()]);

    assert_reused(&create_grant(&app, TENANT, grant_req("solo", "150", "g1")).await.unwrap_err());
    assert_reused(
        &create_grant(
            &app,
            TENANT,
            pb::CreateGrantRequest { category: GrantCategory::Plan as i32, ..grant_req("solo", "100", "g1") },
        )
        .await
        .unwrap_err(),
    );
    assert_reused(
        &create_grant(&app, TENANT, pb::CreateGrantRequest { priority: Some(1), ..grant_req("solo", "100", "g1") })
            .await
            .unwrap_err(),
    );
    assert_reused(
        &create_grant(
            &app,
            TENANT,
            pb::CreateGrantRequest { description: "Pack #2".into(), ..grant_req("solo", "100", "g1") },
        )
        .await
        .unwrap_err(),
    );
    app.account("duo", None, false, None).await;
    assert_reused(&create_grant(&app, TENANT, grant_req("duo", "100", "g1")).await.unwrap_err());
    assert_eq!(app.available("solo").await, "100");
    assert_eq!(app.available("duo").await, "0");
    assert_eq!(app.grants("solo").await, vec![first]);
    assert!(app.grants("duo").await.is_empty());
}

#[tokio::test]
async fn void_grant_replay_returns_the_same_grant_and_forfeits_once() {
    let app = TestApp::spawn().await;
    app.account("solo", None, false, None).await;
    let g = app.grant("solo", "100", GrantCategory::Purchase).await;
    let keep = app.grant("solo", "30", GrantCategory::Plan).await;
    app.charge("solo", "10", "t").await.unwrap();

    let first = void_grant(&app, &g.grant_id, "refunded", "v1").await.unwrap();
    assert_eq!(first.status(), GrantStatus::Voided);
    assert_eq!((first.used.as_str(), first.forfeited.as_str(), first.remaining.as_str()), ("10", "90", "0"));
    assert_eq!(app.available("solo").await, "30");

    let again = void_grant(&app, &g.grant_id, "refunded", "v1").await.unwrap();
    assert_eq!(again, first, "the replay is the first answer");
    assert_eq!(app.available("solo").await, "30", "forfeited once");
    let pg = app.backends.pg().await;
    let voids: i64 = sqlx::query_scalar("SELECT count(*) FROM ledger WHERE grant_id = $1::uuid AND kind = 'void'")
        .bind(&g.grant_id)
        .fetch_one(&pg)
        .await
        .unwrap();
    pg.close().await;
    assert_eq!(voids, 1);

    assert_reused(&void_grant(&app, &g.grant_id, "mistake", "v1").await.unwrap_err());
    assert_reused(&void_grant(&app, &keep.grant_id, "refunded", "v1").await.unwrap_err());
    let kept = app.grants("solo").await.into_iter().find(|x| x.grant_id == keep.grant_id).unwrap();
    assert_eq!(kept.status(), GrantStatus::Active, "the other grant is untouched");
    assert_eq!(app.available("solo").await, "30");

    // A new key on a voided grant is not a replay.
    let e = void_grant(&app, &g.grant_id, "refunded", "v2").await.unwrap_err();
    assert_status(&e, Code::FailedPrecondition, "GRANT_NOT_LIVE", None);
    assert_eq!(app.available("solo").await, "30");
}

#[tokio::test]
async fn create_tenant_and_account_are_idempotent_on_their_name() {
    let app = TestApp::spawn().await;
    let mut admin = app.admin.clone();
    let tenant = pb::CreateTenantRequest {
        tenant_id: "beta".into(),
        display_name: "Beta Inc".into(),
        credit_value: "0.01".into(),
        currency: "EUR".into(),
        time_zone: "Europe/Paris".into(),
        ..Default::default()
    };
    let first = admin.create_tenant(req_operator(tenant.clone())).await.unwrap().into_inner();
    let again = admin.create_tenant(req_operator(tenant.clone())).await.unwrap().into_inner();
    assert_eq!(again, first);
    for changed in [
        pb::CreateTenantRequest { display_name: "Beta SA".into(), ..tenant.clone() },
        pb::CreateTenantRequest { credit_value: "0.02".into(), ..tenant.clone() },
        pb::CreateTenantRequest { currency: "USD".into(), ..tenant.clone() },
        pb::CreateTenantRequest { time_zone: "UTC".into(), ..tenant.clone() },
    ] {
        let e = admin.create_tenant(req_operator(changed)).await.unwrap_err();
        assert_status(&e, Code::AlreadyExists, "TENANT_EXISTS", None);
    }
    let stored =
        admin.get_tenant(req_operator(pb::GetTenantRequest { tenant_id: "beta".into() })).await.unwrap().into_inner();
    assert_eq!(stored, first, "refused calls changed nothing");

    app.account("org", None, false, None).await;
    let account = pb::CreateAccountRequest {
        account_id: "team".into(),
        parent_id: "org".into(),
        kind: pb::AccountKind::Team as i32,
        display_name: "Team A".into(),
        pool_access: true,
        cap: "500".into(),
        ..Default::default()
    };
    let first = admin.create_account(req(TENANT, account.clone())).await.unwrap().into_inner();
    app.grant("team", "25", GrantCategory::Plan).await;
    app.reserve("team", "5", "r").await.unwrap();
    let before = app.balance("team").await;
    let again = admin.create_account(req(TENANT, account.clone())).await.unwrap().into_inner();
    assert_eq!(again, first);
    assert_eq!(app.balance("team").await, before, "a replay resets nothing");
    app.account("org2", None, false, None).await;
    for changed in [
        pb::CreateAccountRequest { parent_id: "org2".into(), ..account.clone() },
        pb::CreateAccountRequest { parent_id: String::new(), ..account.clone() },
        pb::CreateAccountRequest { kind: pb::AccountKind::User as i32, ..account.clone() },
        pb::CreateAccountRequest { display_name: "Team B".into(), ..account.clone() },
        pb::CreateAccountRequest { pool_access: false, ..account.clone() },
        pb::CreateAccountRequest { cap: "600".into(), ..account.clone() },
        pb::CreateAccountRequest { cap: String::new(), ..account.clone() },
    ] {
        let what = format!("{changed:?}");
        let e = admin.create_account(req(TENANT, changed)).await.expect_err(&what);
        assert_status(&e, Code::AlreadyExists, "ACCOUNT_EXISTS", None);
    }
    let stored =
        admin.get_account(req(TENANT, pb::GetAccountRequest { account_id: "team".into() })).await.unwrap().into_inner();
    assert_eq!(stored, first, "refused calls changed nothing");
    assert_eq!(app.balance("team").await, before);
}

#[tokio::test]
async fn keys_are_scoped_per_rpc() {
    let app = org().await;
    let k = "same-key";
    let r = app.reserve("alice", "100", k).await.unwrap();
    assert!(r.granted && !r.replayed);
    let charged = app.charge("alice", "1", k).await.unwrap();
    assert!(!charged.replayed);
    let r2 = app.reserve("alice", "50", "r2").await.unwrap();
    let extended = extend(&app, &r2.reservation_id, "10", 120, k).await.unwrap();
    assert!(extended.granted && !extended.replayed);
    let released = app.release(&r2.reservation_id, k).await.unwrap();
    assert!(!released.replayed);
    assert_eq!(released.released, "60");
    let committed = app.commit(&r.reservation_id, "40", k).await.unwrap();
    assert!(!committed.replayed);
    assert_ne!(committed.event_id, charged.event_id);
    let grant = create_grant(&app, TENANT, grant_req("bob", "10", k)).await.unwrap();
    let voided = void_grant(&app, &grant.grant_id, "test", k).await.unwrap();
    assert_eq!(voided.status(), GrantStatus::Voided);

    assert_eq!(app.available("alice").await, "959");
    assert_eq!(app.available("bob").await, "100");
    assert_eq!(usage_events_with_key(&app, "commit", k).await.len(), 1);
    assert_eq!(usage_events_with_key(&app, "charge", k).await.len(), 1);
    assert_eq!(usage_events(&app, TENANT).await, 2);
}

#[tokio::test]
async fn keys_are_scoped_per_tenant() {
    let app = org().await;
    app.create_tenant(OTHER).await;
    app.account_in(OTHER, "alice", None, false, None).await;
    app.grant_in(OTHER, "alice", "50", GrantCategory::Plan).await;
    let k = "shared";

    let mine = app.reserve("alice", "10", k).await.unwrap();
    let theirs = reserve_with(&app, OTHER, reserve_req("alice", "10", k)).await.unwrap();
    assert!(mine.granted && theirs.granted);
    assert!(!theirs.replayed, "another tenant's key is another key");
    assert_ne!(mine.reservation_id, theirs.reservation_id);
    // Different payloads under the same key string, in each tenant.
    let theirs_bigger = reserve_with(&app, OTHER, reserve_req("alice", "20", "k2")).await.unwrap();
    let mine_smaller = app.reserve("alice", "5", "k2").await.unwrap();
    assert!(!theirs_bigger.replayed && !mine_smaller.replayed);

    let c_mine = commit_in(&app, TENANT, &mine.reservation_id, "10", k).await;
    let c_theirs = commit_in(&app, OTHER, &theirs.reservation_id, "10", k).await;
    assert!(!c_mine.replayed && !c_theirs.replayed);
    assert_ne!(c_mine.event_id, c_theirs.event_id);
    let g_mine = charge_in(&app, TENANT, "alice", "1", k).await;
    let g_theirs = charge_in(&app, OTHER, "alice", "1", k).await;
    assert!(!g_mine.replayed && !g_theirs.replayed);
    assert_ne!(g_mine.event_id, g_theirs.event_id);
    let grant_mine = create_grant(&app, TENANT, grant_req("alice", "3", k)).await.unwrap();
    let grant_theirs = create_grant(&app, OTHER, grant_req("alice", "3", k)).await.unwrap();
    assert_ne!(grant_mine.grant_id, grant_theirs.grant_id);

    assert_eq!(app.available("alice").await, "987", "1000 + 3 − 10 − 1 − 5 held");
    assert_eq!(app.balance_in(OTHER, "alice").await.available, "22", "50 + 3 − 10 − 1 − 20 held");
    assert_eq!(usage_events(&app, TENANT).await, 2);
    assert_eq!(usage_events(&app, OTHER).await, 2);
}

/// A CreateTenant replay must not touch the tenant's hot state: if Redis
/// lost it, the replay must not mark the empty state loaded (which would
/// stop the health job from rebuilding it from PostgreSQL).
#[tokio::test]
async fn a_create_tenant_replay_does_not_hide_a_lost_hot_state() {
    // Statements time out after 100ms, so a rebuild settles for 200ms.
    let app =
        TestApp::spawn_on(crate::harness::Backends::fresh().await, &[("postgres.statement_timeout", "100ms")]).await;
    app.create_tenant(TENANT).await;
    app.account("org", None, false, None).await;
    app.account("alice", Some("org"), true, None).await;
    app.grant("org", "1000", GrantCategory::Plan).await;
    app.charge("alice", "10", "t").await.unwrap();
    assert_eq!(app.available("alice").await, "990");

    // Redis loses every key of the tenant; the operator's provisioning
    // retries CreateTenant (same payload) before anything else happens.
    let lost = delete_redis_keys(&app, &format!("{}*", tenant_prefix(&app, TENANT))).await;
    assert!(lost.iter().any(|k| k.ends_with(":fence")));
    app.create_tenant(TENANT).await;

    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let last = loop {
        let answer = app
            .credit
            .clone()
            .get_balance(req(TENANT, pb::GetBalanceRequest { account_id: "alice".into() }))
            .await
            .map(|b| b.into_inner().available);
        if answer.as_deref().is_ok_and(|a| a == "990") || tokio::time::Instant::now() > deadline {
            break answer;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(last.map_err(|s| format!("{:?} {}", s.code(), s.message())), Ok("990".to_string()), "rebuilt");
}

/// A replay answers the first answer even when the request, checked anew,
/// would now be refused: its expiry has passed since.
#[tokio::test]
async fn a_create_grant_replay_is_answered_after_its_expiry_passed() {
    let app = TestApp::spawn().await;
    app.account("solo", None, false, None).await;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    let expires = prost_types::Timestamp { seconds: now.as_secs() as i64 + 2, nanos: 0 };
    let request = pb::CreateGrantRequest { expires_at: Some(expires), ..grant_req("solo", "10", "short") };
    let first = create_grant(&app, TENANT, request.clone()).await.unwrap();
    assert_eq!(first.status(), GrantStatus::Active);

    // Wait until the grant has expired.
    eventually(Duration::from_secs(10), || async {
        app.grants("solo").await.first().is_some_and(|g| g.status() == GrantStatus::Expired)
    })
    .await;
    let again = create_grant(&app, TENANT, request).await.expect("a replay of the grant");
    assert_eq!(again.grant_id, first.grant_id);
    assert_eq!(again.status(), GrantStatus::Expired);
    assert_eq!(app.grants("solo").await.len(), 1);
    assert_eq!(app.available("solo").await, "0");
}

/// A replay is not a new grant: it is answered even when the account is at
/// the balance limit a new grant would exceed.
#[tokio::test]
async fn a_create_grant_replay_is_answered_at_the_balance_limit() {
    let app = TestApp::spawn().await;
    app.account("whale", None, false, None).await;
    let first = create_grant(&app, TENANT, grant_req("whale", "1000000000", "w1")).await.unwrap();
    for key in ["w2", "w3", "w4"] {
        create_grant(&app, TENANT, grant_req("whale", "1000000000", key)).await.unwrap();
    }
    assert_eq!(app.available("whale").await, "4000000000");
    let e = create_grant(&app, TENANT, grant_req("whale", "1", "w5")).await.unwrap_err();
    assert_status(&e, Code::InvalidArgument, "BALANCE_LIMIT", Some("amount"));

    let again = create_grant(&app, TENANT, grant_req("whale", "1000000000", "w1")).await.expect("a replay of w1");
    assert_eq!(again.grant_id, first.grant_id);
    assert_eq!(app.available("whale").await, "4000000000");
    assert_eq!(app.grants("whale").await.len(), 4);
}

/// A client retrying while its first call is still in flight: every copy
/// gets the first answer and the call applies once.
#[tokio::test]
async fn concurrent_replays_apply_once() {
    const COPIES: usize = 8;
    let app = org().await;
    app.account("solo", None, false, None).await;

    let reserves = futures::future::join_all((0..COPIES).map(|_| app.reserve("alice", "100", "r"))).await;
    let rid = reserves[0].as_ref().unwrap().reservation_id.clone();
    for r in &reserves {
        assert_eq!(r.as_ref().expect("reserve").reservation_id, rid);
    }
    assert_eq!(reserves.iter().filter(|r| !r.as_ref().unwrap().replayed).count(), 1);
    assert_eq!(app.available("alice").await, "900");

    let commits = futures::future::join_all((0..COPIES).map(|_| app.commit(&rid, "60", "c"))).await;
    let event = commits[0].as_ref().expect("commit").event_id.clone();
    for c in &commits {
        assert_eq!(c.as_ref().expect("commit").event_id, event);
    }
    let charges = futures::future::join_all((0..COPIES).map(|_| app.charge("alice", "1", "t"))).await;
    let charged = charges[0].as_ref().expect("charge").event_id.clone();
    for c in &charges {
        assert_eq!(c.as_ref().expect("charge").event_id, charged);
    }
    assert_eq!(app.available("alice").await, "939");
    assert_eq!(usage_events(&app, TENANT).await, 2);

    let grants =
        futures::future::join_all((0..COPIES).map(|_| create_grant(&app, TENANT, grant_req("solo", "100", "g")))).await;
    let grant = grants[0].as_ref().expect("grant").grant_id.clone();
    for g in &grants {
        assert_eq!(g.as_ref().expect("grant").grant_id, grant);
    }
    assert_eq!(app.available("solo").await, "100");

    let voids = futures::future::join_all((0..COPIES).map(|_| void_grant(&app, &grant, "refunded", "v"))).await;
    let outcomes: Vec<String> = voids
        .iter()
        .map(|v| match v {
            Ok(g) => format!("ok {}", g.grant_id),
            Err(s) => format!("{:?} {}", s.code(), s.message()),
        })
        .collect();
    assert!(voids.iter().all(|v| v.as_ref().is_ok_and(|g| g.grant_id == grant)), "void replays: {outcomes:#?}");
    assert_eq!(app.available("solo").await, "0");
}

/// Two different voids racing under one key: one applies, the other is a
/// reused key, and nothing else is voided.
#[tokio::test]
async fn concurrent_voids_of_two_grants_under_one_key() {
    let app = TestApp::spawn().await;
    app.account("solo", None, false, None).await;
    let a = app.grant("solo", "10", GrantCategory::Purchase).await;
    let b = app.grant("solo", "20", GrantCategory::Purchase).await;
    let (ra, rb) = tokio::join!(void_grant(&app, &a.grant_id, "x", "v"), void_grant(&app, &b.grant_id, "x", "v"));
    let show = |r: &Result<pb::Grant, Status>| match r {
        Ok(g) => format!("ok {}", g.grant_id),
        Err(s) => format!("{:?} {:?}", s.code(), s.message()),
    };
    let what = format!("{} / {}", show(&ra), show(&rb));
    let (won, lost, left) = match (&ra, &rb) {
        (Ok(g), Err(e)) => (g, e, "20"),
        (Err(e), Ok(g)) => (g, e, "10"),
        _ => panic!("exactly one void must apply: {what}"),
    };
    assert_eq!(won.status(), GrantStatus::Voided, "{what}");
    assert_reused(lost);
    assert_eq!(app.available("solo").await, left);
}

#[tokio::test]
async fn a_charge_replayed_after_its_hold_left_redis_is_answered_not_charged_again() {
    let app = org().await;
    let first = charge_in(&app, TENANT, "bob", "7", "charge-evicted").await;
    assert_eq!(app.available("bob").await, "93");
    // The settled charge's hash goes (eviction, or a tombstone shorter
    // than the record); its idempotency record stays.
    let mut redis = app.backends.redis().await;
    let hold = format!("{}{{t:{TENANT}}}:h:{}", app.backends.key_prefix, first.event_id);
    let record = format!("{}{{t:{TENANT}}}:i:g:charge-evicted", app.backends.key_prefix);
    eventually(Duration::from_secs(5), || {
        let mut redis = redis.clone();
        let hold = hold.clone();
        async move {
            let st: Option<String> = redis::cmd("HGET").arg(&hold).arg("st").query_async(&mut redis).await.unwrap();
            st.as_deref() == Some("committed")
        }
    })
    .await;
    let removed: i64 = redis::cmd("DEL").arg(&hold).query_async(&mut redis).await.unwrap();
    assert_eq!(removed, 1);
    let kept: i64 = redis::cmd("EXISTS").arg(&record).query_async(&mut redis).await.unwrap();
    assert_eq!(kept, 1, "the record is still there");

    let again = charge_in(&app, TENANT, "bob", "7", "charge-evicted").await;
    assert!(again.replayed);
    assert_eq!(again.event_id, first.event_id);
    assert_eq!(app.available("bob").await, "93", "charged once");
    assert_eq!(usage_events(&app, TENANT).await, 1);
    // Not even charged and taken back: no second charge hold was made.
    let holds: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}{{t:{TENANT}}}:h:*", app.backends.key_prefix).replace('{', "\\{").replace('}', "\\}"))
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(holds.is_empty(), "a replay ran the charge again: {holds:?}");
}

/// A key Redis no longer remembers (here its record is deleted, as its TTL
/// or a lost Redis would) is still decided before any effect: committing
/// another hold with it is IDEMPOTENCY_KEY_REUSED and leaves that hold
/// active and its credits held; a Charge reusing a stored key changes
/// nothing either.
#[tokio::test]
async fn a_reused_key_redis_forgot_is_refused_before_any_effect() {
    let app = org().await;
    let h1 = app.reserve("alice", "100", "r1").await.unwrap();
    app.commit(&h1.reservation_id, "60", "k").await.unwrap();
    app.charge("alice", "5", "g").await.unwrap();
    let prefix = tenant_prefix(&app, TENANT);
    let forgotten = delete_redis_keys(&app, &format!("{prefix}i:*")).await;
    assert!(forgotten.contains(&format!("{prefix}i:c:k")) && forgotten.contains(&format!("{prefix}i:g:g")));

    let h2 = app.reserve("alice", "50", "r2").await.unwrap();
    let before = app.balance("alice").await;
    assert_reused(&app.commit(&h2.reservation_id, "10", "k").await.unwrap_err());
    assert_eq!(hold_state(&app, &h2.reservation_id).await.as_deref(), Some("active"), "the hold is untouched");
    assert_eq!(app.balance("alice").await, before, "nothing moved");
    assert_eq!(usage_events(&app, TENANT).await, 2);
    assert_reused(&app.charge("alice", "7", "g").await.unwrap_err());
    assert_eq!(app.balance("alice").await, before, "nothing moved");
    assert_eq!(usage_events(&app, TENANT).await, 2);

    // The hold is still there to commit with a fresh key.
    let done = app.commit(&h2.reservation_id, "10", "k2").await.expect("the hold still commits");
    assert_eq!(done.amount, "10");
    assert_eq!(app.available("alice").await, "925");
}

async fn adjust(app: &TestApp, amount: &str, key: &str) -> Result<pb::Adjustment, Status> {
    app.admin
        .clone()
        .adjust_balance(req(
            TENANT,
            pb::AdjustBalanceRequest {
                account_id: "org".into(),
                amount: amount.into(),
                reason: "correction".into(),
                actor: "ops".into(),
                refund: false,
                idempotency_key: key.into(),
            },
        ))
        .await
        .map(|r| r.into_inner())
}

/// An AdjustBalance replay (credit or debit) returns the first answer with
/// `replayed` set and moves nothing; its key, whatever the sign it was used
/// with, refuses the other sign.
#[tokio::test]
async fn adjust_balance_replays_once_and_its_key_refuses_the_other_sign() {
    let app = org().await;
    let first = adjust(&app, "5", "plus").await.unwrap();
    assert!(!first.replayed);
    let again = adjust(&app, "5", "plus").await.unwrap();
    assert!(again.replayed, "{again:?}");
    assert_eq!(again.grant_id, first.grant_id);
    let debit = adjust(&app, "-2", "minus").await.unwrap();
    assert!(!debit.replayed);
    assert!(adjust(&app, "-2", "minus").await.unwrap().replayed);
    let available = app.available("org").await;

    assert_reused(&adjust(&app, "-5", "plus").await.unwrap_err());
    assert_reused(&adjust(&app, "2", "minus").await.unwrap_err());
    assert_eq!(app.available("org").await, available, "nothing moved");
    let grants = app.grants("org").await;
    assert_eq!(grants.iter().filter(|g| g.category == pb::GrantCategory::Adjustment as i32).count(), 1);
}
