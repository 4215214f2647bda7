//! The demo tenant seeded by `creditd serve --demo`: an organization with
//! a pool of credits and two users, one drawing on the pool and one with
//! its own small allowance and a cap.

use crate::{
    auth::Role,
    domain::{Credits, grant::Category},
    error::Result,
    service::{
        Engine,
        admin::{NewAccount, NewGrant, NewTenant},
    },
};

pub const TENANT: &str = "demo";

/// Creates the demo tenant (idempotent: safe on every start) and a new
/// admin API key for it, which it returns.
pub async fn seed(engine: &Engine, max_depth: u32) -> Result<String> {
    engine
        .create_tenant(NewTenant {
            tenant_id: TENANT.into(),
            display_name: "Demo".into(),
            credit_value: rust_decimal::Decimal::new(1, 2),
            currency: "USD".into(),
            time_zone: "UTC".into(),
            period: None,
            grant_limits: Default::default(),
            commit_limit: Default::default(),
        })
        .await?;
    let account = |id: &str, parent: Option<&str>, kind: &str, pool: bool, cap: Option<i64>| NewAccount {
        account_id: id.into(),
        parent_id: parent.map(str::to_string),
        kind: kind.into(),
        display_name: String::new(),
        pool_access: pool,
        cap: cap.and_then(Credits::from_whole),
        period: None,
        tier: String::new(),
    };
    engine.create_account(TENANT, account("acme", None, "organization", false, None), max_depth).await?;
    engine.create_account(TENANT, account("alice", Some("acme"), "user", true, None), max_depth).await?;
    engine.create_account(TENANT, account("bob", Some("acme"), "user", false, Some(50)), max_depth).await?;
    let grant = |account: &str, amount: i64, category, key: &str| NewGrant {
        account_id: account.into(),
        amount: Credits::from_whole(amount).unwrap_or_default(),
        category,
        priority: None,
        effective_at: None,
        expiry: crate::service::admin::GrantExpiry::Never,
        description: "demo".into(),
        reason: String::new(),
        actor: String::new(),
        idempotency_key: key.into(),
    };
    engine.create_grant(TENANT, grant("acme", 10_000, Category::Plan, "demo-acme-plan")).await?;
    engine.create_grant(TENANT, grant("bob", 100, Category::Plan, "demo-bob-plan")).await?;
    let (_, key) = engine.keys.create(Some(TENANT), Role::Admin, "demo", None).await?;
    key.ok_or_else(|| crate::error::Error::internal("a key without idempotency key is always new"))
}
