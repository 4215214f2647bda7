//! Repair after faults: Redis losing a tenant's state, and a crash between
//! a commit's Redis step and its PostgreSQL write (in both orders).

use std::time::Duration;

use creditd::{
    pb::GrantCategory,
    service::payload_hash,
    store::{
        hot::{CommitCall, CommitTarget, HotStore, HotTimings},
        pg::{NewEvent, PgStore},
    },
};
use redis::AsyncCommands;
use tonic::Code;

use crate::harness::{TENANT, TestApp, assert_status, eventually};

/// Fast fault handling: statements time out after 100ms, so a rebuild
/// settles for 200ms and an undurable commit is resolved after 300ms.
const FAST: &[(&str, &str)] = &[("postgres.statement_timeout", "100ms"), ("hot.commit_deadline", "300ms")];

async fn app() -> TestApp {
    let app = TestApp::spawn_on(crate::harness::Backends::fresh().await, FAST).await;
    app.create_tenant(TENANT).await;
    app.account("org", None, false, None).await;
    app.account("u", Some("org"), true, None).await;
    app.grant("org", "100", GrantCategory::Plan).await;
    app
}

pub(crate) async fn hot_store(app: &TestApp) -> HotStore {
    let timings = HotTimings {
        idempotency_ttl: Duration::from_secs(3600),
        tombstone_ttl: Duration::from_secs(3600),
        commit_deadline: Duration::from_millis(300),
    };
    HotStore::connect(
        &app.backends.redis_url,
        false,
        "",
        app.backends.key_prefix.clone(),
        8,
        timings,
        Duration::from_secs(2),
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn a_tenant_lost_by_redis_is_rebuilt_from_postgres() {
    let app = app().await;
    let done = app.reserve("u", "30", "r1").await.unwrap();
    app.commit(&done.reservation_id, "25", "c1").await.unwrap();
    let open = app.reserve("u", "10", "r2").await.unwrap();
    app.charge("u", "0.5", "g1").await.unwrap();
    assert_eq!(app.available("u").await, "64.5");

    // Redis loses every key of the tenant.
    let mut redis = app.backends.redis().await;
    let pattern = format!("{}{{t:{TENANT}}}:*", app.backends.key_prefix);
    let keys: Vec<String> = redis.keys(&pattern).await.unwrap();
    assert!(!keys.is_empty());
    let _: () = redis.del(&keys).await.unwrap();

    eventually(Duration::from_secs(10), || async {
        let mut credit = app.credit.clone();
        credit
            .get_balance(crate::harness::req(TENANT, creditd::pb::GetBalanceRequest { account_id: "u".into() }))
            .await
            .is_ok_and(|b| b.into_inner().available == "74.5")
    })
    .await;
    // Committed usage stays spent, the lost hold's credits came back, and
    // period usage (for caps) was recomputed.
    let b = app.balance("u").await;
    assert_eq!(b.levels[1].balance, "74.5");
    assert_eq!(b.levels[1].held, "0");
    assert_eq!(b.levels[0].cap_used, "25.5");
    let e = app.commit(&open.reservation_id, "10", "c2").await.unwrap_err();
    assert_status(&e, Code::NotFound, "RESERVATION_NOT_FOUND", None);
    assert!(app.reserve("u", "74.5", "r3").await.unwrap().granted);
}

#[tokio::test]
async fn a_commit_that_never_reached_postgres_is_reverted() {
    let app = app().await;
    let hold = app.reserve("u", "40", "r").await.unwrap();
    let hot = hot_store(&app).await;
    let event_id = uuid::Uuid::now_v7().to_string();
    let hash = payload_hash(&["test"]);
    // The Redis step of a commit, then a "crash": no PostgreSQL write.
    let prepared = hot
        .commit(
            TENANT,
            &CommitCall {
                target: CommitTarget::Hold(&hold.reservation_id),
                cost: creditd::domain::Credits::from_whole(40).unwrap(),
                idempotency_key: "crashed",
                payload_hash: &hash,
                event_id: &event_id,
                limit: Default::default(),
            },
        )
        .await
        .unwrap();
    assert_eq!(prepared.cost.to_string(), "40");
    assert_eq!(app.available("u").await, "60");

    eventually(Duration::from_secs(5), || async { app.available("u").await == "100" }).await;
    let b = app.balance("u").await;
    assert_eq!(b.levels[0].cap_used, "0", "cap usage is reverted too");
    // The client never released it: retrying its commit (same key, or a
    // fresh one) is told the commit was reverted.
    for key in ["crashed", "after"] {
        let e = app.commit(&hold.reservation_id, "40", key).await.unwrap_err();
        assert_status(&e, Code::FailedPrecondition, "COMMIT_REVERTED", None);
    }
    let pg = app.backends.pg().await;
    let events: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM usage_events").fetch_one(&pg).await.unwrap();
    assert_eq!(events, 0);
}

#[tokio::test]
async fn a_durable_commit_left_unfinalized_is_finalized_not_reverted() {
    let app = app().await;
    let hold = app.reserve("u", "40", "r").await.unwrap();
    let hot = hot_store(&app).await;
    let event_id = uuid::Uuid::now_v7();
    let hash = payload_hash(&["test"]);
    let prepared = hot
        .commit(
            TENANT,
            &CommitCall {
                target: CommitTarget::Hold(&hold.reservation_id),
                cost: creditd::domain::Credits::from_whole(35).unwrap(),
                idempotency_key: "durable",
                payload_hash: &hash,
                event_id: &event_id.to_string(),
                limit: Default::default(),
            },
        )
        .await
        .unwrap();
    // The PostgreSQL write lands, then the process dies before finalizing.
    let pg = PgStore::connect(&app.backends.database_url, 2, Duration::from_secs(5)).await.unwrap();
    pg.insert_events(&[NewEvent {
        event_id,
        tenant_id: TENANT.into(),
        account_id: prepared.subject.clone(),
        reservation_id: Some(hold.reservation_id.parse().unwrap()),
        idempotency_key: "durable".into(),
        payload_hash: hash.clone(),
        amount: prepared.cost,
        held: prepared.held,
        overdraft: prepared.overdraft,
        draws: prepared.charges.clone(),
        labels: serde_json::json!({}),
        fence: prepared.fence.clone(),
        recorded_at: prepared.recorded_at,
        price_version: None,
        line_items: None,
    }])
    .await
    .unwrap();

    // Past the deadline the reaper finds the event and keeps the charge.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(app.available("u").await, "65");
    let e = app.commit(&hold.reservation_id, "35", "other-key").await.unwrap_err();
    assert_status(&e, Code::FailedPrecondition, "RESERVATION_COMMITTED", None);
    assert_eq!(pg.usage_total(TENANT).await.unwrap().to_string(), "35");
}

/// A tenant whose fence key is gone while other keys of it are left (a
/// Redis written by a version before fences, with its `epoch` key, or a
/// fence lost by hand) is rebuilt after a scan for those keys: a hold left
/// in the old state must not come back and return credits it never held
/// in the rebuilt one.
#[tokio::test]
async fn a_tenant_without_a_fence_but_with_old_keys_is_scanned_clean() {
    let app = app().await;
    let open = app.reserve("u", "10", "r1").await.unwrap();
    assert_eq!(app.available("u").await, "90");
    let prefix = format!("{}{{t:{TENANT}}}:", app.backends.key_prefix);
    let mut redis = app.backends.redis().await;
    // The state as a version before fences left it: an epoch key, no fence.
    let _: () = redis.del(format!("{prefix}fence")).await.unwrap();
    let _: () = redis.set(format!("{prefix}epoch"), "old").await.unwrap();

    eventually(Duration::from_secs(10), || async {
        let mut credit = app.credit.clone();
        credit
            .get_balance(crate::harness::req(TENANT, creditd::pb::GetBalanceRequest { account_id: "u".into() }))
            .await
            .is_ok_and(|b| b.into_inner().available == "100")
    })
    .await;
    let holds: u64 = redis.zcard(format!("{prefix}holds")).await.unwrap();
    assert_eq!(holds, 0, "the old state's hold is gone with it");
    let hold: bool = redis.exists(format!("{prefix}h:{}", open.reservation_id)).await.unwrap();
    assert!(!hold, "the old hold's hash is gone");
    let epoch: bool = redis.exists(format!("{prefix}epoch")).await.unwrap();
    assert!(!epoch, "the legacy epoch key is gone");
    // The reaper finds nothing to return: the balance stays exact.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let b = app.balance("u").await;
    assert_eq!((b.levels[1].balance.as_str(), b.levels[1].held.as_str()), ("100", "0"));
    let e = app.commit(&open.reservation_id, "5", "c1").await.unwrap_err();
    assert_status(&e, Code::NotFound, "RESERVATION_NOT_FOUND", None);
}
