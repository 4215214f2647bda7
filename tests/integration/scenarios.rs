//! One end-to-end scenario per product policy in `shared/seeds`, each
//! configured through the API alone and crossing at least one period
//! boundary. Time moves with the service's injectable clock (no sleeps);
//! the period job is run at once after each move.

use chrono::{DateTime, Duration, TimeZone, Utc};
use creditd::pb::{self, DenialReason, GrantCategory, GrantStatus, PeriodKind, RolloverKind};
use tonic::Code;

use crate::harness::{TestApp, assert_status, req, req_operator};

fn ts(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: t.timestamp(), nanos: t.timestamp_subsec_nanos() as i32 }
}

fn from_ts(t: &prost_types::Timestamp) -> DateTime<Utc> {
    Utc.timestamp_opt(t.seconds, t.nanos as u32).unwrap()
}

/// A tenant client bound to one tenant of the app.
struct Tenant<'a> {
    app: &'a TestApp,
    id: &'static str,
}

impl<'a> Tenant<'a> {
    async fn create(app: &'a TestApp, id: &'static str, request: pb::CreateTenantRequest) -> Tenant<'a> {
        app.admin
            .clone()
            .create_tenant(req_operator(pb::CreateTenantRequest { tenant_id: id.into(), ..request }))
            .await
            .expect("create tenant");
        let key = app.create_key(id, pb::ApiKeyRole::Admin).await;
        app.keys.lock().unwrap().insert(id.to_string(), key);
        Tenant { app, id }
    }

    async fn account(&self, request: pb::CreateAccountRequest) -> pb::Account {
        self.app.admin.clone().create_account(req(self.id, request)).await.expect("create account").into_inner()
    }

    async fn get_account(&self, id: &str) -> pb::Account {
        self.app
            .admin
            .clone()
            .get_account(req(self.id, pb::GetAccountRequest { account_id: id.into() }))
            .await
            .unwrap()
            .into_inner()
    }

    async fn allowance(&self, account: &str, amount: &str, rollover: RolloverKind, max: &str) -> pb::Allowance {
        self.app
            .admin
            .clone()
            .create_allowance(req(
                self.id,
                pb::CreateAllowanceRequest {
                    account_id: account.into(),
                    amount: amount.into(),
                    rollover: rollover as i32,
                    rollover_max: max.into(),
                    description: "monthly allowance".into(),
                    idempotency_key: format!("allowance-{account}-{amount}"),
                    ..Default::default()
                },
            ))
            .await
            .expect("create allowance")
            .into_inner()
    }

    async fn grant(&self, request: pb::CreateGrantRequest) -> Result<pb::Grant, tonic::Status> {
        self.app.admin.clone().create_grant(req(self.id, request)).await.map(|r| r.into_inner())
    }

    async fn simple_grant(&self, account: &str, amount: &str, category: GrantCategory, key: &str) -> pb::Grant {
        self.grant(pb::CreateGrantRequest {
            account_id: account.into(),
            amount: amount.into(),
            category: category as i32,
            idempotency_key: key.into(),
            ..Default::default()
        })
        .await
        .expect("grant")
    }

    async fn grants(&self, account: &str) -> Vec<pb::Grant> {
        self.app
            .admin
            .clone()
            .list_grants(req(self.id, pb::ListGrantsRequest { account_id: account.into(), include_inactive: true }))
            .await
            .unwrap()
            .into_inner()
            .grants
    }

    async fn reserve(&self, account: &str, amount: &str, key: &str) -> pb::ReserveResponse {
        self.app
            .credit
            .clone()
            .reserve(req(
                self.id,
                pb::ReserveRequest {
                    account_id: account.into(),
                    cost: Some(pb::reserve_request::Cost::Amount(amount.into())),
                    idempotency_key: key.into(),
                    ..Default::default()
                },
            ))
            .await
            .expect("reserve")
            .into_inner()
    }

    /// Reserve then commit `amount`; panics if not granted.
    async fn spend(&self, account: &str, amount: &str, key: &str) {
        let r = self.reserve(account, amount, key).await;
        assert!(r.granted, "{account} could not reserve {amount}: {:?}", r.denial);
        self.app
            .credit
            .clone()
            .commit(req(
                self.id,
                pb::CommitRequest {
                    reservation_id: r.reservation_id,
                    cost: Some(pb::commit_request::Cost::Amount(amount.into())),
                    idempotency_key: format!("{key}-commit"),
                    ..Default::default()
                },
            ))
            .await
            .expect("commit");
    }

    async fn balance(&self, account: &str) -> pb::GetBalanceResponse {
        self.app.balance_in(self.id, account).await
    }

    async fn available(&self, account: &str) -> String {
        self.balance(account).await.available
    }

    /// Moves the clock just past the account's period end and runs the
    /// period job. Returns the boundary crossed.
    async fn cross_period_of(&self, account: &str) -> DateTime<Utc> {
        let end = from_ts(self.get_account(account).await.period_end.as_ref().expect("the period ends"));
        advance_to(self.app, end + Duration::seconds(1)).await;
        end
    }

    async fn check_balances(&self) {
        let report = self
            .app
            .admin
            .clone()
            .check_balances(req(self.id, pb::CheckBalancesRequest {}))
            .await
            .unwrap()
            .into_inner();
        assert!(report.drifts.is_empty(), "hot balances drift from the ledger: {:?}", report.drifts);
    }
}

/// Moves the service clock to `t` (never back) and runs the ledger and
/// period work at once.
async fn advance_to(app: &TestApp, t: DateTime<Utc>) {
    let now = app.engine.clock.now();
    if t > now {
        app.engine.clock.advance(t - now);
    }
    app.engine.ledger_pass().await;
}

fn remaining_of(grants: &[pb::Grant], category: GrantCategory, status: GrantStatus) -> Vec<String> {
    grants.iter().filter(|g| g.category() == category && g.status() == status).map(|g| g.remaining.clone()).collect()
}

/// Coworker: a network pool with a monthly base allowance, purchased
/// credits that roll over and are spent first, Pro users on the pool,
/// Base users with their own allowance, admin caps, upgrade requests.
#[tokio::test]
async fn coworker_network_pool() {
    let app = TestApp::spawn().await;
    let t =
        Tenant::create(&app, "coworker", pb::CreateTenantRequest { credit_value: "0.5".into(), ..Default::default() })
            .await;
    let account = |id: &str, parent: &str, pool: bool, cap: &str, tier: &str| pb::CreateAccountRequest {
        account_id: id.into(),
        parent_id: parent.into(),
        kind: if parent.is_empty() { pb::AccountKind::Organization } else { pb::AccountKind::User } as i32,
        pool_access: pool,
        cap: cap.into(),
        tier: tier.into(),
        ..Default::default()
    };
    t.account(account("network", "", false, "", "")).await;
    t.account(account("pro1", "network", true, "", "pro")).await;
    t.account(account("pro2", "network", true, "500", "pro")).await;
    t.account(account("base1", "network", false, "", "base")).await;
    t.allowance("network", "10000", RolloverKind::None, "").await;
    t.simple_grant("network", "2000", GrantCategory::Purchase, "pack-1").await;
    t.allowance("base1", "300", RolloverKind::None, "").await;

    // Purchased credits are spent before the base credits.
    t.spend("pro1", "1000", "p1").await;
    let grants = t.grants("network").await;
    assert_eq!(remaining_of(&grants, GrantCategory::Purchase, GrantStatus::Active), vec!["1000"]);
    assert_eq!(remaining_of(&grants, GrantCategory::Plan, GrantStatus::Active), vec!["10000"]);

    // An admin cap of 500 denies pro2 at 500 while the pool has credits.
    t.spend("pro2", "500", "p2").await;
    let denied = t.reserve("pro2", "1", "p2-more").await;
    let d = denied.denial.expect("capped");
    assert_eq!(d.reason(), DenialReason::CapReached);
    assert_eq!(d.account_id, "pro2");
    let period_end = t.get_account("pro2").await.period_end.unwrap();
    assert_eq!(d.retry_after.as_ref(), Some(&period_end), "retry at the start of the next period");
    assert_eq!(t.balance("network").await.levels[0].available, "10500", "the pool still has credits");

    // A Base user has only their own allowance; it renews with the period.
    t.spend("base1", "300", "b1").await;
    let d = t.reserve("base1", "1", "b1-more").await.denial.expect("allowance spent");
    assert_eq!(d.reason(), DenialReason::InsufficientCredits);
    assert_eq!(d.account_id, "base1");
    assert_eq!(d.retry_after.as_ref(), Some(&t.get_account("base1").await.period_end.unwrap()));

    // base1 asks for Pro; nothing changes until an admin approves.
    let asked = app
        .credit
        .clone()
        .reserve(req(
            "coworker",
            pb::ReserveRequest {
                account_id: "base1".into(),
                cost: Some(pb::reserve_request::Cost::Amount("1".into())),
                idempotency_key: "probe".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(!asked.granted);
    let change = app
        .admin
        .clone()
        .request_account_change(req(
            "coworker",
            pb::RequestAccountChangeRequest {
                account_id: "base1".into(),
                pool_access: Some(true),
                tier: Some("pro".into()),
                note: "need more for a launch".into(),
                idempotency_key: "upgrade-base1".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(change.status(), pb::ChangeStatus::Pending);
    assert!(!t.reserve("base1", "1", "b1-pending").await.granted);
    let decided = app
        .admin
        .clone()
        .decide_account_change(req(
            "coworker",
            pb::DecideAccountChangeRequest { change_id: change.change_id.clone(), approve: true, note: "ok".into() },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(decided.status(), pb::ChangeStatus::Approved);
    let base1 = t.get_account("base1").await;
    assert!(base1.pool_access);
    assert_eq!(base1.tier, "pro");
    assert!(t.reserve("base1", "1", "b1-pro").await.granted, "approved: base1 now draws on the pool");
    let again = app
        .admin
        .clone()
        .decide_account_change(req(
            "coworker",
            pb::DecideAccountChangeRequest { change_id: change.change_id, approve: false, note: String::new() },
        ))
        .await
        .unwrap_err();
    assert_status(&again, Code::FailedPrecondition, "CHANGE_DECIDED", None);

    // Next period: base credits reset (what was left of them expires), the
    // purchased remainder carries over, caps restart.
    t.cross_period_of("network").await;
    let grants = t.grants("network").await;
    assert_eq!(
        remaining_of(&grants, GrantCategory::Purchase, GrantStatus::Active),
        vec!["500"],
        "purchased credits roll over"
    );
    assert_eq!(
        remaining_of(&grants, GrantCategory::Plan, GrantStatus::Active),
        vec!["10000"],
        "a fresh base allowance"
    );
    assert_eq!(
        grants.iter().filter(|g| g.category() == GrantCategory::Plan && g.status() == GrantStatus::Expired).count(),
        1
    );
    assert!(t.reserve("pro2", "400", "p2-next").await.granted, "pro2's cap restarted");
    assert_eq!(t.balance("pro2").await.levels[0].cap_used, "400");
    let base1_grants = t.grants("base1").await;
    assert_eq!(remaining_of(&base1_grants, GrantCategory::Plan, GrantStatus::Active), vec!["300"]);
    t.check_balances().await;
}

/// The AI-employee platform: one user's balance shared by the two
/// organizations they own; welcome, promo and capped referral grants; a
/// pack that expires at the period end; at zero everything is denied until
/// a top-up.
#[tokio::test]
async fn ai_employee_platform_user_balance() {
    let app = TestApp::spawn().await;
    let mut limits = std::collections::HashMap::new();
    limits.insert("referral".to_string(), 10);
    let t = Tenant::create(
        &app,
        "aiemp",
        pb::CreateTenantRequest { credit_value: "0.01".into(), grant_limits: limits, ..Default::default() },
    )
    .await;
    t.account(pb::CreateAccountRequest {
        account_id: "user-1".into(),
        kind: pb::AccountKind::User as i32,
        ..Default::default()
    })
    .await;
    for org in ["org-a", "org-b"] {
        t.account(pb::CreateAccountRequest {
            account_id: org.into(),
            parent_id: "user-1".into(),
            kind: pb::AccountKind::Organization as i32,
            pool_access: true,
            ..Default::default()
        })
        .await;
    }
    t.simple_grant("user-1", "1000", GrantCategory::Welcome, "welcome").await;
    t.simple_grant("user-1", "150", GrantCategory::Promotional, "promo-launch").await;
    for i in 0..10 {
        t.simple_grant("user-1", "10", GrantCategory::Referral, &format!("ref-{i}")).await;
    }
    let eleventh = t
        .grant(pb::CreateGrantRequest {
            account_id: "user-1".into(),
            amount: "10".into(),
            category: GrantCategory::Referral as i32,
            idempotency_key: "ref-10".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_status(&eleventh, Code::FailedPrecondition, "GRANT_LIMIT_REACHED", None);
    let pack = t
        .grant(pb::CreateGrantRequest {
            account_id: "user-1".into(),
            amount: "500".into(),
            category: GrantCategory::Purchase as i32,
            expire_at_period_end: true,
            idempotency_key: "pack-1".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(pack.expires_at, t.get_account("user-1").await.period_end, "the pack ends with the period");

    // Both organizations spend the same balance.
    assert_eq!(t.available("org-a").await, "1750");
    t.spend("org-a", "300", "a1").await;
    t.spend("org-b", "200", "b1").await;
    assert_eq!(t.available("org-a").await, "1250");
    assert_eq!(t.available("org-b").await, "1250");

    // Next period: the pack's remainder expires, everything else stays.
    t.cross_period_of("user-1").await;
    let grants = t.grants("user-1").await;
    let pack_now = grants.iter().find(|g| g.grant_id == pack.grant_id).unwrap();
    assert_eq!(pack_now.status(), GrantStatus::Expired);
    // Free credits (priority 10) were spent before the pack (30).
    assert_eq!(pack_now.used, "0");
    assert_eq!(pack_now.forfeited, "500");
    assert_eq!(t.available("org-b").await, "750");

    // At zero every reserve is denied until a top-up.
    t.spend("org-a", "750", "a2").await;
    for org in ["org-a", "org-b"] {
        let d = t.reserve(org, "0.01", &format!("zero-{org}")).await.denial.expect("at zero");
        assert_eq!(d.reason(), DenialReason::InsufficientCredits);
        assert_eq!(d.account_id, "user-1");
    }
    t.simple_grant("user-1", "100", GrantCategory::Purchase, "top-up").await;
    assert!(t.reserve("org-b", "100", "after-top-up").await.granted);
    t.check_balances().await;
}

/// WRITER: a dollar balance; an org pool on a yearly contract whose
/// platform and purchased credits expire at the contract-year end; Lite
/// users with their own 50 a month, no pool access, reset on the 1st;
/// another org's accounts are unreachable.
#[tokio::test]
async fn writer_contract_year_and_lite_users() {
    let app = TestApp::spawn().await;
    let now = app.engine.clock.now();
    let contract_start = now - Duration::days(40);
    let t = Tenant::create(
        &app,
        "writer-a",
        pb::CreateTenantRequest {
            credit_value: "1".into(),
            currency: "USD".into(),
            time_zone: "America/New_York".into(),
            default_period: Some(pb::BillingPeriod {
                kind: PeriodKind::Yearly as i32,
                anchor: Some(ts(contract_start)),
                ..Default::default()
            }),
            ..Default::default()
        },
    )
    .await;
    t.account(pb::CreateAccountRequest {
        account_id: "org".into(),
        kind: pb::AccountKind::Organization as i32,
        ..Default::default()
    })
    .await;
    t.account(pb::CreateAccountRequest {
        account_id: "pro".into(),
        parent_id: "org".into(),
        pool_access: true,
        tier: "pro".into(),
        ..Default::default()
    })
    .await;
    let calendar_months = pb::BillingPeriod { kind: PeriodKind::Monthly as i32, ..Default::default() };
    t.account(pb::CreateAccountRequest {
        account_id: "lite".into(),
        parent_id: "org".into(),
        pool_access: false,
        tier: "lite".into(),
        period: Some(calendar_months),
        ..Default::default()
    })
    .await;
    t.allowance("org", "20000", RolloverKind::None, "").await;
    t.allowance("lite", "50", RolloverKind::None, "").await;
    t.grant(pb::CreateGrantRequest {
        account_id: "org".into(),
        amount: "5000".into(),
        category: GrantCategory::Purchase as i32,
        expire_at_period_end: true,
        idempotency_key: "extra".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let org = t.get_account("org").await;
    let year_end = from_ts(org.period_end.as_ref().unwrap());
    assert!(year_end - contract_start >= Duration::days(364), "a contract year");
    let lite = t.get_account("lite").await;
    let month_end = from_ts(lite.period_end.as_ref().unwrap());
    assert_eq!(month_end.format("%d %H:%M").to_string(), "01 05:00", "midnight on the 1st, New York time");

    // Lite users never reach the pool.
    t.spend("lite", "40", "l1").await;
    let d = t.reserve("lite", "20", "l2").await.denial.expect("own credits only");
    assert_eq!(d.reason(), DenialReason::InsufficientCredits);
    assert_eq!(d.account_id, "lite");
    assert_eq!(d.available, "10");
    t.spend("pro", "1000", "p1").await;

    // New month: the Lite user gets a fresh 50, nothing carried over; the
    // org's contract year goes on.
    t.cross_period_of("lite").await;
    assert_eq!(t.available("lite").await, "50");
    let lite_grants = t.grants("lite").await;
    assert_eq!(remaining_of(&lite_grants, GrantCategory::Plan, GrantStatus::Active), vec!["50"]);
    assert_eq!(remaining_of(&lite_grants, GrantCategory::Plan, GrantStatus::Expired), vec!["0"]);
    assert_eq!(t.balance("pro").await.available, "24000");

    // Contract-year end: platform and purchased credits expire together,
    // and the new year's platform credits arrive.
    advance_to(&app, year_end + Duration::seconds(1)).await;
    let grants = t.grants("org").await;
    assert_eq!(remaining_of(&grants, GrantCategory::Purchase, GrantStatus::Active), Vec::<String>::new());
    assert_eq!(remaining_of(&grants, GrantCategory::Plan, GrantStatus::Active), vec!["20000"]);
    assert_eq!(t.balance("pro").await.available, "20000");

    // Another organization's accounts are unreachable.
    let other =
        Tenant::create(&app, "writer-b", pb::CreateTenantRequest { credit_value: "1".into(), ..Default::default() })
            .await;
    other.account(pb::CreateAccountRequest { account_id: "secret-org".into(), ..Default::default() }).await;
    let e = app
        .credit
        .clone()
        .get_balance(req("writer-a", pb::GetBalanceRequest { account_id: "secret-org".into() }))
        .await
        .unwrap_err();
    assert_status(&e, Code::NotFound, "ACCOUNT_NOT_FOUND", None);
    t.check_balances().await;
}

/// Cassidy: credits reset each period with no rollover, except an
/// enterprise agreement rolling over at most 20 %; per-user limits; out of
/// credits means denied until the next period or a top-up.
#[tokio::test]
async fn cassidy_reset_and_enterprise_rollover() {
    let app = TestApp::spawn().await;
    let standard = Tenant::create(&app, "cassidy", Default::default()).await;
    let enterprise = Tenant::create(&app, "cassidy-ent", Default::default()).await;
    for (t, rollover, max) in [(&standard, RolloverKind::None, ""), (&enterprise, RolloverKind::UpTo, "200")] {
        t.account(pb::CreateAccountRequest { account_id: "org".into(), ..Default::default() }).await;
        t.account(pb::CreateAccountRequest {
            account_id: "amy".into(),
            parent_id: "org".into(),
            pool_access: true,
            cap: "600".into(),
            ..Default::default()
        })
        .await;
        t.account(pb::CreateAccountRequest {
            account_id: "bo".into(),
            parent_id: "org".into(),
            pool_access: true,
            ..Default::default()
        })
        .await;
        t.allowance("org", "1000", rollover, max).await;
        t.spend("amy", "600", "a1").await;
        // Per-user limit.
        let d = t.reserve("amy", "1", "a2").await.denial.expect("amy's limit");
        assert_eq!(d.reason(), DenialReason::CapReached);
        t.spend("bo", "100", "b1").await;
    }
    // Out of credits: denied, with the renewal as retry_after.
    standard.spend("bo", "300", "b2").await;
    let d = standard.reserve("bo", "1", "b3").await.denial.expect("out of credits");
    assert_eq!(d.reason(), DenialReason::InsufficientCredits);
    assert_eq!(d.account_id, "org");
    let renewal = standard.get_account("org").await.period_end.unwrap();
    assert_eq!(d.retry_after, Some(renewal));

    standard.cross_period_of("org").await;
    enterprise.cross_period_of("org").await;
    let g = standard.grants("org").await;
    assert_eq!(remaining_of(&g, GrantCategory::Plan, GrantStatus::Active), vec!["1000"], "no rollover");
    assert_eq!(standard.available("bo").await, "1000");
    let g = enterprise.grants("org").await;
    let mut active = remaining_of(&g, GrantCategory::Plan, GrantStatus::Active);
    active.sort();
    assert_eq!(active, vec!["1000", "200"], "300 were left: at most 200 roll over");
    assert_eq!(enterprise.available("bo").await, "1200");
    assert!(enterprise.reserve("amy", "600", "a-next").await.granted, "limits restart");
    standard.check_balances().await;
    enterprise.check_balances().await;
}

/// Upwex: a team pool renewing on the 15th; a pack bought mid-month is
/// usable at once and carries across the renewal; a trial tenant gets a
/// fixed allowance for a 14-day window and nothing after; a support refund
/// restores credits with an audit entry.
#[tokio::test]
async fn upwex_team_pool_trial_and_refund() {
    let app = TestApp::spawn().await;
    let t = Tenant::create(
        &app,
        "upwex",
        pb::CreateTenantRequest {
            default_period: Some(pb::BillingPeriod {
                kind: PeriodKind::Monthly as i32,
                anchor: Some(ts(Utc.with_ymd_and_hms(2026, 1, 15, 0, 0, 0).unwrap())),
                ..Default::default()
            }),
            ..Default::default()
        },
    )
    .await;
    t.account(pb::CreateAccountRequest {
        account_id: "team".into(),
        kind: pb::AccountKind::Team as i32,
        ..Default::default()
    })
    .await;
    for seat in ["seat-1", "seat-2"] {
        t.account(pb::CreateAccountRequest {
            account_id: seat.into(),
            parent_id: "team".into(),
            pool_access: true,
            ..Default::default()
        })
        .await;
    }
    t.allowance("team", "500", RolloverKind::None, "").await;
    let team = t.get_account("team").await;
    assert_eq!(from_ts(team.period_end.as_ref().unwrap()).format("%d").to_string(), "15", "renews on the 15th");

    t.spend("seat-1", "450", "s1").await;
    // A pack spent after the monthly allowance (priority 50 > plan's 40),
    // so the allowance is used before it expires and the pack stays.
    t.grant(pb::CreateGrantRequest {
        account_id: "team".into(),
        amount: "200".into(),
        category: GrantCategory::Purchase as i32,
        priority: Some(50),
        idempotency_key: "pack".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(t.available("seat-2").await, "250", "the pack is usable at once");
    t.spend("seat-2", "100", "s2").await;

    t.cross_period_of("team").await;
    let g = t.grants("team").await;
    assert_eq!(remaining_of(&g, GrantCategory::Purchase, GrantStatus::Active), vec!["150"], "the pack carries over");
    assert_eq!(remaining_of(&g, GrantCategory::Plan, GrantStatus::Active), vec!["500"]);
    assert_eq!(t.available("seat-1").await, "650");

    // A support refund with an audit entry.
    let refund = app
        .admin
        .clone()
        .adjust_balance(req(
            "upwex",
            pb::AdjustBalanceRequest {
                account_id: "team".into(),
                amount: "25".into(),
                reason: "duplicate generation charged twice".into(),
                actor: "support:dana".into(),
                refund: true,
                idempotency_key: "ticket-881".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(t.available("seat-1").await, "675");
    let refunded = t.grants("team").await.into_iter().find(|g| g.grant_id == refund.grant_id).unwrap();
    assert_eq!(refunded.category(), GrantCategory::Refund);
    assert_eq!(refunded.reason, "duplicate generation charged twice");
    assert_eq!(refunded.actor, "support:dana");
    // And a manual correction the other way.
    let debit = app
        .admin
        .clone()
        .adjust_balance(req(
            "upwex",
            pb::AdjustBalanceRequest {
                account_id: "team".into(),
                amount: "-5".into(),
                reason: "goodwill reversed".into(),
                actor: "support:dana".into(),
                idempotency_key: "ticket-882".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(debit.balance, "670");
    t.check_balances().await;

    // A trial tenant: a fixed allowance for 14 days, nothing after.
    let start = app.engine.clock.now();
    let trial = Tenant::create(
        &app,
        "upwex-trial",
        pb::CreateTenantRequest {
            default_period: Some(pb::BillingPeriod {
                kind: PeriodKind::Trial as i32,
                anchor: Some(ts(start)),
                trial_end: Some(ts(start + Duration::days(14))),
                ..Default::default()
            }),
            ..Default::default()
        },
    )
    .await;
    trial.account(pb::CreateAccountRequest { account_id: "team".into(), ..Default::default() }).await;
    trial
        .grant(pb::CreateGrantRequest {
            account_id: "team".into(),
            amount: "100".into(),
            category: GrantCategory::Trial as i32,
            expire_at_period_end: true,
            idempotency_key: "trial".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    trial.spend("team", "30", "t1").await;
    advance_to(&app, start + Duration::days(3)).await;
    trial.spend("team", "30", "t2").await;
    assert_eq!(trial.available("team").await, "40", "at whatever pace within the window");

    trial.cross_period_of("team").await;
    assert_eq!(trial.available("team").await, "0");
    let after = trial.get_account("team").await;
    assert!(after.period_end.is_none(), "a trial does not renew");
    let d = trial.reserve("team", "1", "t3").await.denial.expect("trial over");
    assert_eq!(d.reason(), DenialReason::InsufficientCredits);
    assert!(d.retry_after.is_none(), "nothing renews after a trial");
    let g = trial.grants("team").await;
    assert_eq!(g[0].status(), GrantStatus::Expired);
    assert_eq!(g[0].forfeited, "40");
    trial.check_balances().await;
}
