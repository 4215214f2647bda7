//! Reserve, Commit, Release, Extend, Charge, Authorize and GetBalance: the
//! happy paths and every denial reason.

use std::time::Duration;

use creditd::pb::{self, DenialReason, GrantCategory};
use tonic::Code;

use crate::harness::{TENANT, TestApp, assert_status, eventually, req};

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

#[tokio::test]
async fn reserve_commit_returns_the_rest_of_the_hold() {
    let app = org().await;
    let r = app.reserve("alice", "12.5", "r1").await.unwrap();
    assert!(r.granted);
    assert_eq!(r.amount, "12.5");
    assert_eq!(r.available, "987.5");
    assert!(r.expires_at.is_some());

    let c = app.commit(&r.reservation_id, "10.25", "c1").await.unwrap();
    assert_eq!(c.amount, "10.25");
    assert_eq!(c.released, "2.25");
    assert_eq!(c.overdraft, "0");
    assert_eq!(c.available, "989.75");
    assert!(!c.replayed);

    let b = app.balance("alice").await;
    assert_eq!(b.available, "989.75");
    assert_eq!(b.levels.len(), 2);
    assert_eq!(b.levels[0].account_id, "alice");
    assert!(b.levels[0].in_draw_chain && b.levels[1].in_draw_chain);
    assert_eq!(b.levels[1].balance, "989.75");
    assert_eq!(b.levels[1].held, "0");
    assert_eq!(b.levels[0].cap_used, "10.25", "usage counts on the subject");
    assert_eq!(b.levels[1].cap_used, "10.25", "and on every ancestor");

    // The usage event is durable in PostgreSQL.
    let pg = app.backends.pg().await;
    let stored: (String, String) =
        sqlx::query_as("SELECT account_id, amount::text FROM usage_events WHERE event_id = $1::uuid")
            .bind(&c.event_id)
            .fetch_one(&pg)
            .await
            .unwrap();
    assert_eq!(stored.0, "alice");
    assert_eq!(stored.1, "10.250000");
}

#[tokio::test]
async fn own_grants_first_then_the_pool() {
    let app = org().await;
    app.grant("alice", "5", GrantCategory::Promotional).await;
    let r = app.reserve("alice", "8", "r").await.unwrap();
    assert!(r.granted);
    let b = app.balance("alice").await;
    assert_eq!(b.levels[0].held, "5", "alice's own credits are held first");
    assert_eq!(b.levels[1].held, "3", "then the pool's");
}

#[tokio::test]
async fn no_pool_access_means_own_credits_only() {
    let app = org().await;
    let r = app.reserve("bob", "150", "r").await.unwrap();
    assert!(!r.granted);
    let d = r.denial.unwrap();
    assert_eq!(d.reason(), DenialReason::InsufficientCredits);
    assert_eq!(d.account_id, "bob");
    assert_eq!(d.available, "100");
    assert!(d.retry_after.is_none());
    assert!(!app.balance("bob").await.levels[1].in_draw_chain);
}

#[tokio::test]
async fn pool_exhausted_denies_with_the_pool_named() {
    let app = org().await;
    let r = app.reserve("alice", "1000.000001", "r").await.unwrap();
    assert!(!r.granted);
    let d = r.denial.unwrap();
    assert_eq!(d.reason(), DenialReason::InsufficientCredits);
    assert_eq!(d.account_id, "org");
    assert_eq!(d.available, "1000");
    assert!(app.reserve("alice", "1000", "r2").await.unwrap().granted);
    assert_eq!(app.available("alice").await, "0");
}

#[tokio::test]
async fn cap_denies_while_the_pool_has_credits() {
    let app = org().await;
    app.account("carol", Some("org"), true, Some("500")).await;
    let first = app.reserve("carol", "400", "r1").await.unwrap();
    app.commit(&first.reservation_id, "400", "c1").await.unwrap();
    let r = app.reserve("carol", "100.5", "r2").await.unwrap();
    assert!(!r.granted);
    let d = r.denial.unwrap();
    assert_eq!(d.reason(), DenialReason::CapReached);
    assert_eq!(d.account_id, "carol");
    assert_eq!(d.available, "100");
    let retry = d.retry_after.expect("cap denial says when");
    let b = app.balance("carol").await;
    assert_eq!(b.levels[0].period_end.unwrap(), retry, "retry_after is the start of the next period");
    assert_eq!(b.levels[0].cap_left, "100");
    assert_eq!(b.available, "100");
    assert_eq!(b.levels[1].available, "600", "the pool still has credits");
}

#[tokio::test]
async fn cap_on_an_ancestor_counts_the_whole_subtree() {
    let app = TestApp::spawn().await;
    app.account("org", None, false, None).await;
    app.account("team", Some("org"), true, Some("50")).await;
    app.account("u1", Some("team"), true, None).await;
    app.account("u2", Some("team"), true, None).await;
    app.grant("org", "1000", GrantCategory::Plan).await;
    assert!(app.reserve("u1", "30", "a").await.unwrap().granted);
    let r = app.reserve("u2", "30", "b").await.unwrap();
    let d = r.denial.expect("team cap");
    assert_eq!(d.reason(), DenialReason::CapReached);
    assert_eq!(d.account_id, "team");
    assert_eq!(d.available, "20");
}

#[tokio::test]
async fn suspension_denies_the_account_and_everything_below() {
    let app = org().await;
    let held = app.reserve("alice", "10", "before").await.unwrap();
    app.admin
        .clone()
        .update_account(req(
            TENANT,
            pb::UpdateAccountRequest { account_id: "org".into(), suspended: Some(true), ..Default::default() },
        ))
        .await
        .unwrap();
    for who in ["alice", "bob", "org"] {
        let r = app.reserve(who, "1", &format!("s-{who}")).await.unwrap();
        let d = r.denial.expect("suspended");
        assert_eq!(d.reason(), DenialReason::AccountSuspended);
        assert_eq!(d.account_id, "org");
        assert_eq!(d.available, "0");
    }
    // A hold taken before still commits.
    app.commit(&held.reservation_id, "10", "c").await.unwrap();
}

#[tokio::test]
async fn authorize_has_no_side_effects() {
    let app = org().await;
    let ok = app
        .credit
        .clone()
        .authorize(req(
            TENANT,
            pb::AuthorizeRequest {
                account_id: "alice".into(),
                cost: Some(pb::authorize_request::Cost::Amount("999".into())),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(ok.granted);
    // The largest amount a Reserve could hold now, not what would be left.
    assert_eq!(ok.available, "1000");
    let no = app
        .credit
        .clone()
        .authorize(req(
            TENANT,
            pb::AuthorizeRequest {
                account_id: "alice".into(),
                cost: Some(pb::authorize_request::Cost::Amount("1001".into())),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(!no.granted);
    assert_eq!(no.denial.unwrap().reason(), DenialReason::InsufficientCredits);
    let b = app.balance("alice").await;
    assert_eq!(b.available, "1000");
    assert_eq!(b.levels[1].held, "0");
}

/// credit.proto: Authorize's `available` is the largest amount a Reserve
/// could hold now, granted or denied (a Reserve's is what is left after it).
#[tokio::test]
async fn authorize_answers_what_a_reserve_could_hold() {
    let app = TestApp::spawn().await;
    app.account("ten", None, false, None).await;
    app.account("plenty", None, false, Some("30")).await;
    app.grant("ten", "10", GrantCategory::Plan).await;
    app.grant("plenty", "100", GrantCategory::Plan).await;
    let authorize = |account: &str, amount: &str| {
        let mut credit = app.credit.clone();
        let request = req(
            TENANT,
            pb::AuthorizeRequest {
                account_id: account.into(),
                cost: Some(pb::authorize_request::Cost::Amount(amount.into())),
            },
        );
        async move { credit.authorize(request).await.unwrap().into_inner() }
    };
    // 10 credits: 10 could be held.
    let ok = authorize("ten", "8").await;
    assert!(ok.granted);
    assert_eq!(ok.available, "10");
    let all = authorize("ten", "10").await;
    assert_eq!((all.granted, all.available.as_str()), (true, "10"));
    let no = authorize("ten", "10.5").await;
    assert!(!no.granted);
    assert_eq!(no.available, "10", "granted or denied, the same figure");
    // 100 credits, a cap of 30: the cap bounds it.
    let ok = authorize("plenty", "8").await;
    assert_eq!((ok.granted, ok.available.as_str()), (true, "30"));
    // Reserve answers what is left after its hold.
    let r = app.reserve("plenty", "8", "after-authorize").await.unwrap();
    assert_eq!((r.granted, r.available.as_str()), (true, "22"));
    let ok = authorize("plenty", "22").await;
    assert_eq!((ok.granted, ok.available.as_str()), (true, "22"));
}

#[tokio::test]
async fn release_returns_everything() {
    let app = org().await;
    let r = app.reserve("alice", "300", "r").await.unwrap();
    assert_eq!(app.available("alice").await, "700");
    let rel = app.release(&r.reservation_id, "l").await.unwrap();
    assert_eq!(rel.released, "300");
    assert_eq!(rel.available, "1000");
    assert_eq!(app.available("alice").await, "1000");
    assert_eq!(app.balance("alice").await.levels[0].cap_used, "0");
}

#[tokio::test]
async fn extend_grows_the_hold_or_says_stop() {
    let app = org().await;
    let r = app.reserve("alice", "100", "r").await.unwrap();
    let grow = |amount: &str, key: &str| {
        let mut client = app.credit.clone();
        let rid = r.reservation_id.clone();
        let amount = amount.to_string();
        let key = key.to_string();
        async move {
            client
                .extend(req(
                    TENANT,
                    pb::ExtendRequest {
                        reservation_id: rid,
                        more: Some(pb::extend_request::More::Amount(amount)),
                        idempotency_key: key,
                        ttl: Some(prost_types::Duration { seconds: 120, nanos: 0 }),
                    },
                ))
                .await
                .unwrap()
                .into_inner()
        }
    };
    let e = grow("400", "x1").await;
    assert!(e.granted);
    assert_eq!(e.amount, "500");
    assert_eq!(e.available, "500");
    let exp1 = e.expires_at.unwrap();
    assert!(exp1.seconds > r.expires_at.unwrap().seconds, "ttl pushed");

    let stop = grow("600", "x2").await;
    assert!(!stop.granted);
    assert_eq!(stop.denial.unwrap().reason(), DenialReason::InsufficientCredits);
    assert_eq!(stop.amount, "500", "the hold keeps what it had");
    assert_eq!(stop.expires_at.unwrap(), exp1);

    let c = app.commit(&r.reservation_id, "450", "c").await.unwrap();
    assert_eq!(c.released, "50");
    assert_eq!(app.available("alice").await, "550");
}

#[tokio::test]
async fn charge_records_post_paid_usage() {
    let app = org().await;
    let c = app.charge("alice", "0.25", "task-1").await.unwrap();
    assert_eq!(c.amount, "0.25");
    assert_eq!(c.released, "0");
    assert_eq!(c.available, "999.75");
    let zero = app.charge("alice", "0", "task-free").await.unwrap();
    assert_eq!(zero.amount, "0");
    assert_eq!(app.available("alice").await, "999.75");
}

#[tokio::test]
async fn commit_above_the_hold_overdraws_and_blocks_until_covered() {
    let app = TestApp::spawn().await;
    app.account("solo", None, false, None).await;
    app.grant("solo", "10", GrantCategory::Plan).await;
    let r = app.reserve("solo", "8", "r").await.unwrap();
    let c = app.commit(&r.reservation_id, "13", "c").await.unwrap();
    assert_eq!(c.amount, "13", "usage that happened is recorded in full");
    assert_eq!(c.released, "0");
    assert_eq!(c.overdraft, "3");
    assert_eq!(c.available, "0");
    let b = app.balance("solo").await;
    assert_eq!(b.levels[0].balance, "-3");

    let denied = app.reserve("solo", "0.000001", "r2").await.unwrap();
    assert_eq!(denied.denial.unwrap().reason(), DenialReason::InsufficientCredits);

    app.grant("solo", "5", GrantCategory::Purchase).await;
    assert_eq!(app.available("solo").await, "2");
    assert!(app.reserve("solo", "2", "r3").await.unwrap().granted);

    // The ledger shows the overdraft paid by the later grant.
    eventually(Duration::from_secs(5), || async {
        let grants = app.grants("solo").await;
        let remaining: Vec<_> = grants.iter().map(|g| (g.remaining.clone(), g.used.clone())).collect();
        remaining == vec![("2".to_string(), "3".to_string()), ("0".to_string(), "10".to_string())]
    })
    .await;
}

#[tokio::test]
async fn an_expired_hold_returns_its_credits_once() {
    let app = org().await;
    let r = app.reserve_ttl("alice", "250", "r", Duration::from_millis(300)).await;
    assert!(r.granted);
    assert_eq!(app.available("alice").await, "750");
    eventually(Duration::from_secs(5), || async { app.available("alice").await == "1000" }).await;
    // Several more reaper passes change nothing.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let b = app.balance("alice").await;
    assert_eq!(b.available, "1000");
    assert_eq!(b.levels[1].held, "0");
    assert_eq!(b.levels[0].cap_used, "0");

    let late = app.commit(&r.reservation_id, "250", "c").await.unwrap_err();
    assert_status(&late, Code::FailedPrecondition, "RESERVATION_EXPIRED", None);
    let late = app.release(&r.reservation_id, "l").await.unwrap_err();
    assert_status(&late, Code::FailedPrecondition, "RESERVATION_EXPIRED", None);
    assert_eq!(app.available("alice").await, "1000");
}

#[tokio::test]
async fn settled_holds_cannot_be_settled_again() {
    let app = org().await;
    let released = app.reserve("alice", "10", "r1").await.unwrap();
    app.release(&released.reservation_id, "l1").await.unwrap();
    let committed = app.reserve("alice", "10", "r2").await.unwrap();
    app.commit(&committed.reservation_id, "10", "c2").await.unwrap();
    let before = app.balance("alice").await;

    let e = app.commit(&released.reservation_id, "10", "c-other").await.unwrap_err();
    assert_status(&e, Code::FailedPrecondition, "RESERVATION_RELEASED", None);
    let e = app.release(&released.reservation_id, "l-other").await.unwrap_err();
    assert_status(&e, Code::FailedPrecondition, "RESERVATION_RELEASED", None);
    let e = app.commit(&committed.reservation_id, "10", "c-other2").await.unwrap_err();
    assert_status(&e, Code::FailedPrecondition, "RESERVATION_COMMITTED", None);
    let e = app.release(&committed.reservation_id, "l-other2").await.unwrap_err();
    assert_status(&e, Code::FailedPrecondition, "RESERVATION_COMMITTED", None);
    let unknown = uuid::Uuid::now_v7().to_string();
    let e = app.commit(&unknown, "1", "c-x").await.unwrap_err();
    assert_status(&e, Code::NotFound, "RESERVATION_NOT_FOUND", None);

    let after = app.balance("alice").await;
    assert_eq!(before, after, "rejected calls change nothing");
}
