//! API keys, roles, tenant isolation and TLS.
//!
//! The isolation matrix sends every RPC of every service (checked against
//! the descriptors the server serves for reflection) with no key, malformed
//! keys, a revoked key, keys of the wrong role and another tenant's keys,
//! and checks the status, that the tenant's state (PostgreSQL rows, Redis
//! keys, balances) did not move, and that every allowed key succeeds.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use creditd::{
    app::App,
    config::{Config, Sources},
    pb::{self, GrantCategory, admin_service_client::AdminServiceClient, credit_service_client::CreditServiceClient},
};
use tonic::{
    Code, Request, Status,
    transport::{Certificate, Channel, ClientTlsConfig, Identity},
};

use tonic_types::StatusExt;

use crate::harness::{
    Backends, TENANT, TestApp, assert_status, eventually, req, req_operator, test_overrides, with_key,
};

const OTHER: &str = "other";

/// Which keys may make a call (common.proto, and each RPC's comment).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Needs {
    /// A runtime or admin key of the tenant.
    Runtime,
    /// An admin key of the tenant.
    Admin,
    /// An operator key.
    Operator,
    /// An admin key (its own tenant) or an operator key: GetTenant, SetPrices.
    AdminOrOperator,
}

/// What another tenant's key gets for the very request sent for acme.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Foreign {
    /// The request names one of acme's accounts, grants, holds, allowances,
    /// changes or acme itself: NOT_FOUND with this reason, exactly as if it
    /// did not exist (common.proto).
    NotFound(&'static str),
    /// The request names a meter only acme's catalog prices: the caller's
    /// catalog does not know it (INVALID_ARGUMENT with this reason).
    Invalid(&'static str),
    /// The call acts on the caller's own tenant (tenant-wide settings and
    /// listings): it succeeds, and its answer shows nothing of acme.
    Own,
    /// Operator calls: no tenant key may make them (the wrong-role cases).
    Operator,
}

const CREDIT: &str = "creditd.v1.CreditService";
const ADMIN: &str = "creditd.v1.AdminService";
const PRICING: &str = "creditd.v1.PricingService";
const REPORT: &str = "creditd.v1.ReportService";
const ALERT: &str = "creditd.v1.AlertService";

/// Every RPC of every creditd service (`the_matrix_covers_every_rpc_the_server_describes`
/// checks this list against the descriptors the server serves).
const RPCS: &[(&str, &str, Needs, Foreign)] = &[
    (CREDIT, "Authorize", Needs::Runtime, Foreign::NotFound("ACCOUNT_NOT_FOUND")),
    (CREDIT, "Reserve", Needs::Runtime, Foreign::NotFound("ACCOUNT_NOT_FOUND")),
    (CREDIT, "Commit", Needs::Runtime, Foreign::NotFound("RESERVATION_NOT_FOUND")),
    (CREDIT, "Release", Needs::Runtime, Foreign::NotFound("RESERVATION_NOT_FOUND")),
    (CREDIT, "Extend", Needs::Runtime, Foreign::NotFound("RESERVATION_NOT_FOUND")),
    (CREDIT, "Charge", Needs::Runtime, Foreign::NotFound("ACCOUNT_NOT_FOUND")),
    (CREDIT, "GetBalance", Needs::Runtime, Foreign::NotFound("ACCOUNT_NOT_FOUND")),
    (ADMIN, "CreateTenant", Needs::Operator, Foreign::Operator),
    (ADMIN, "GetTenant", Needs::AdminOrOperator, Foreign::NotFound("TENANT_NOT_FOUND")),
    (ADMIN, "CreateApiKey", Needs::Operator, Foreign::Operator),
    (ADMIN, "ListApiKeys", Needs::Operator, Foreign::Operator),
    (ADMIN, "RevokeApiKey", Needs::Operator, Foreign::Operator),
    (ADMIN, "CreateAccount", Needs::Admin, Foreign::NotFound("PARENT_NOT_FOUND")),
    (ADMIN, "UpdateAccount", Needs::Admin, Foreign::NotFound("ACCOUNT_NOT_FOUND")),
    (ADMIN, "GetAccount", Needs::Admin, Foreign::NotFound("ACCOUNT_NOT_FOUND")),
    (ADMIN, "ListAccounts", Needs::Admin, Foreign::Own),
    (ADMIN, "CreateGrant", Needs::Admin, Foreign::NotFound("ACCOUNT_NOT_FOUND")),
    (ADMIN, "VoidGrant", Needs::Admin, Foreign::NotFound("GRANT_NOT_FOUND")),
    (ADMIN, "GetGrant", Needs::Admin, Foreign::NotFound("GRANT_NOT_FOUND")),
    (ADMIN, "ListGrants", Needs::Admin, Foreign::NotFound("ACCOUNT_NOT_FOUND")),
    (ADMIN, "CreateAllowance", Needs::Admin, Foreign::NotFound("ACCOUNT_NOT_FOUND")),
    (ADMIN, "ListAllowances", Needs::Admin, Foreign::NotFound("ACCOUNT_NOT_FOUND")),
    (ADMIN, "EndAllowance", Needs::Admin, Foreign::NotFound("ALLOWANCE_NOT_FOUND")),
    (ADMIN, "AdjustBalance", Needs::Admin, Foreign::NotFound("ACCOUNT_NOT_FOUND")),
    (ADMIN, "RequestAccountChange", Needs::Runtime, Foreign::NotFound("ACCOUNT_NOT_FOUND")),
    (ADMIN, "DecideAccountChange", Needs::Admin, Foreign::NotFound("CHANGE_NOT_FOUND")),
    (ADMIN, "ListAccountChanges", Needs::Admin, Foreign::Own),
    (ADMIN, "CheckBalances", Needs::Admin, Foreign::Own),
    (PRICING, "Quote", Needs::Runtime, Foreign::Invalid("UNKNOWN_METER")),
    (PRICING, "SetPrices", Needs::AdminOrOperator, Foreign::Own),
    (PRICING, "GetCatalog", Needs::Runtime, Foreign::Own),
    (REPORT, "SummarizeUsage", Needs::Admin, Foreign::NotFound("ACCOUNT_NOT_FOUND")),
    (REPORT, "ListUsageEvents", Needs::Admin, Foreign::NotFound("ACCOUNT_NOT_FOUND")),
    (REPORT, "MonthlyHistory", Needs::Admin, Foreign::NotFound("ACCOUNT_NOT_FOUND")),
    (REPORT, "ListGrantsReport", Needs::Admin, Foreign::NotFound("ACCOUNT_NOT_FOUND")),
    (REPORT, "GetLedger", Needs::Admin, Foreign::NotFound("GRANT_NOT_FOUND")),
    (ALERT, "WatchAlerts", Needs::Admin, Foreign::Own),
    (ALERT, "ListAlerts", Needs::Admin, Foreign::Own),
    (ALERT, "SetAlertPolicy", Needs::Admin, Foreign::NotFound("ACCOUNT_NOT_FOUND")),
    (ALERT, "GetAlertPolicy", Needs::Admin, Foreign::NotFound("ACCOUNT_NOT_FOUND")),
    (ALERT, "SetWebhook", Needs::Admin, Foreign::Own),
    (ALERT, "GetWebhook", Needs::Admin, Foreign::Own),
    (ALERT, "DeleteWebhook", Needs::Admin, Foreign::Own),
    (ALERT, "ListWebhookDeliveries", Needs::Admin, Foreign::Own),
];

/// acme's accounts (tenant `other` has none of these ids, only `outsider`).
const ORG: &str = "acme-org";
const ALICE: &str = "acme-alice";
const SPENDER: &str = "acme-spender";

/// Ids of tenant acme the calls refer to.
#[derive(Clone, Debug)]
struct Ids {
    hold: String,
    grant: String,
    key_id: String,
    allowance: String,
    change: String,
}

fn with_header<T>(authorization: Option<&str>, message: T) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(value) = authorization {
        request.metadata_mut().insert("authorization", value.parse().unwrap());
    }
    request
}

/// Sends `service/method` (with a payload that would succeed for acme's
/// admin) with this `authorization` header value; the answer, printed.
async fn send(
    app: &TestApp,
    service: &str,
    method: &str,
    authorization: Option<&str>,
    ids: &Ids,
) -> Result<String, Status> {
    let channel = app.raw_admin_channel();
    let mut credit = CreditServiceClient::new(channel.clone());
    let mut admin = AdminServiceClient::new(channel.clone());
    let mut pricing = pb::pricing_service_client::PricingServiceClient::new(channel.clone());
    let mut reports = pb::report_service_client::ReportServiceClient::new(channel.clone());
    let mut alerts = pb::alert_service_client::AlertServiceClient::new(channel);
    let h = authorization;
    let key = format!("sec-{method}-{}", uuid::Uuid::new_v4());
    macro_rules! call {
        ($client:ident . $rpc:ident ( $message:expr )) => {
            $client.$rpc(with_header(h, $message)).await.map(|r| format!("{:?}", r.into_inner()))
        };
    }
    let _ = service;
    match method {
        "Authorize" => call!(credit.authorize(pb::AuthorizeRequest {
            account_id: ALICE.into(),
            cost: Some(pb::authorize_request::Cost::Amount("1".into())),
        })),
        "Reserve" => call!(credit.reserve(pb::ReserveRequest {
            account_id: ALICE.into(),
            cost: Some(pb::reserve_request::Cost::Amount("1".into())),
            idempotency_key: key,
            ..Default::default()
        })),
        "Commit" => call!(credit.commit(pb::CommitRequest {
            reservation_id: ids.hold.clone(),
            cost: Some(pb::commit_request::Cost::Amount("1".into())),
            idempotency_key: key,
            ..Default::default()
        })),
        "Release" => {
            call!(credit.release(pb::ReleaseRequest { reservation_id: ids.hold.clone(), idempotency_key: key }))
        }
        "Extend" => call!(credit.extend(pb::ExtendRequest {
            reservation_id: ids.hold.clone(),
            more: Some(pb::extend_request::More::Amount("1".into())),
            idempotency_key: key,
            ttl: None,
        })),
        "Charge" => call!(credit.charge(pb::ChargeRequest {
            account_id: ALICE.into(),
            cost: Some(pb::charge_request::Cost::Amount("1".into())),
            idempotency_key: key,
            ..Default::default()
        })),
        "GetBalance" => call!(credit.get_balance(pb::GetBalanceRequest { account_id: ALICE.into() })),
        "CreateTenant" => {
            call!(admin.create_tenant(pb::CreateTenantRequest { tenant_id: "intruder".into(), ..Default::default() }))
        }
        "GetTenant" => call!(admin.get_tenant(pb::GetTenantRequest { tenant_id: TENANT.into() })),
        "CreateApiKey" => call!(admin.create_api_key(pb::CreateApiKeyRequest {
            tenant_id: TENANT.into(),
            role: pb::ApiKeyRole::Admin as i32,
            name: "x".into(),
            idempotency_key: key,
        })),
        "ListApiKeys" => call!(admin.list_api_keys(pb::ListApiKeysRequest { tenant_id: TENANT.into() })),
        "RevokeApiKey" => call!(admin.revoke_api_key(pb::RevokeApiKeyRequest { key_id: ids.key_id.clone() })),
        "CreateAccount" => call!(admin.create_account(pb::CreateAccountRequest {
            account_id: "mole".into(),
            parent_id: ORG.into(),
            ..Default::default()
        })),
        "UpdateAccount" => call!(admin.update_account(pb::UpdateAccountRequest {
            account_id: ALICE.into(),
            tier: Some("intruded".into()),
            ..Default::default()
        })),
        "GetAccount" => call!(admin.get_account(pb::GetAccountRequest { account_id: ALICE.into() })),
        "ListAccounts" => {
            call!(admin.list_accounts(pb::ListAccountsRequest { parent_id: ORG.into(), ..Default::default() }))
        }
        "CreateGrant" => call!(admin.create_grant(pb::CreateGrantRequest {
            account_id: ORG.into(),
            amount: "1000".into(),
            category: GrantCategory::Promotional as i32,
            idempotency_key: key,
            ..Default::default()
        })),
        "VoidGrant" => call!(admin.void_grant(pb::VoidGrantRequest {
            grant_id: ids.grant.clone(),
            reason: "x".into(),
            idempotency_key: key
        })),
        "GetGrant" => call!(admin.get_grant(pb::GetGrantRequest { grant_id: ids.grant.clone() })),
        "ListGrants" => {
            call!(admin.list_grants(pb::ListGrantsRequest { account_id: ORG.into(), include_inactive: true }))
        }
        "CreateAllowance" => call!(admin.create_allowance(pb::CreateAllowanceRequest {
            account_id: ORG.into(),
            amount: "7".into(),
            idempotency_key: key,
            ..Default::default()
        })),
        "ListAllowances" => call!(admin.list_allowances(pb::ListAllowancesRequest { account_id: ORG.into() })),
        "EndAllowance" => {
            call!(admin.end_allowance(pb::EndAllowanceRequest { allowance_id: ids.allowance.clone() }))
        }
        "AdjustBalance" => call!(admin.adjust_balance(pb::AdjustBalanceRequest {
            account_id: ALICE.into(),
            amount: "3".into(),
            reason: "x".into(),
            actor: "x".into(),
            refund: false,
            idempotency_key: key,
        })),
        "RequestAccountChange" => call!(admin.request_account_change(pb::RequestAccountChangeRequest {
            account_id: ALICE.into(),
            tier: Some("pro".into()),
            idempotency_key: key,
            ..Default::default()
        })),
        "DecideAccountChange" => call!(admin.decide_account_change(pb::DecideAccountChangeRequest {
            change_id: ids.change.clone(),
            approve: true,
            note: String::new(),
        })),
        "ListAccountChanges" => call!(admin.list_account_changes(pb::ListAccountChangesRequest::default())),
        "CheckBalances" => call!(admin.check_balances(pb::CheckBalancesRequest {})),
        "Quote" => call!(pricing.quote(pb::QuoteRequest {
            usage: Some(pb::Usage {
                items: vec![pb::UsageItem { meter: "acme_meter".into(), model: String::new(), quantity: "1".into() }],
            }),
            at: None,
        })),
        "SetPrices" => call!(pricing.set_prices(pb::SetPricesRequest {
            prices: vec![pb::Price { meter: "intruder_meter".into(), unit_price: "1".into(), ..Default::default() }],
            idempotency_key: key,
            ..Default::default()
        })),
        "GetCatalog" => call!(pricing.get_catalog(pb::GetCatalogRequest { at: None })),
        "SummarizeUsage" => call!(
            reports.summarize_usage(pb::SummarizeUsageRequest { account_id: SPENDER.into(), ..Default::default() })
        ),
        "ListUsageEvents" => call!(
            reports.list_usage_events(pb::ListUsageEventsRequest { account_id: SPENDER.into(), ..Default::default() })
        ),
        "MonthlyHistory" => {
            call!(reports.monthly_history(pb::MonthlyHistoryRequest { account_id: SPENDER.into(), months: 0 }))
        }
        "ListGrantsReport" => call!(
            reports
                .list_grants_report(pb::ListGrantsReportRequest { account_id: SPENDER.into(), ..Default::default() })
        ),
        "GetLedger" => {
            call!(reports.get_ledger(pb::GetLedgerRequest { grant_id: ids.grant.clone(), ..Default::default() }))
        }
        "WatchAlerts" => {
            // The status of opening the stream, then whatever it sends
            // first (cursor 0: every alert the caller's tenant recorded).
            let mut stream =
                alerts.watch_alerts(with_header(h, pb::WatchAlertsRequest { cursor: "0".into() })).await?.into_inner();
            let first = tokio::time::timeout(Duration::from_millis(300), stream.message()).await;
            Ok(format!("{first:?}"))
        }
        "ListAlerts" => call!(alerts.list_alerts(pb::ListAlertsRequest::default())),
        "SetAlertPolicy" => call!(alerts.set_alert_policy(pb::SetAlertPolicyRequest {
            policy: Some(pb::AlertPolicy { account_id: ALICE.into(), percents: vec![40], ..Default::default() }),
        })),
        "GetAlertPolicy" => call!(alerts.get_alert_policy(pb::GetAlertPolicyRequest { account_id: ALICE.into() })),
        "SetWebhook" => call!(alerts.set_webhook(pb::SetWebhookRequest {
            url: "http://127.0.0.1:9/intruder-hook".into(),
            secret: "s".repeat(20),
            max_attempts: 0,
        })),
        "GetWebhook" => call!(alerts.get_webhook(pb::GetWebhookRequest {})),
        "DeleteWebhook" => call!(alerts.delete_webhook(pb::GetWebhookRequest {})),
        "ListWebhookDeliveries" => {
            call!(alerts.list_webhook_deliveries(pb::ListWebhookDeliveriesRequest::default()))
        }
        other => panic!("no request for {service}/{other}: add one"),
    }
}

/// Everything of acme (and of the deployment) a breach could change:
/// every PostgreSQL row that is not tenant `other`'s, every Redis key of
/// acme (but the reconciler's claim), and what GetBalance shows.
async fn snapshot(app: &TestApp) -> BTreeMap<String, String> {
    let mut state = BTreeMap::new();
    for account in [ORG, ALICE, SPENDER] {
        state.insert(format!("balance {account}"), format!("{:?}", app.balance_in(TENANT, account).await));
    }
    let pg = app.backends.pg().await;
    let tables: Vec<(String, bool)> = sqlx::query_as(
        "SELECT t.table_name::text, EXISTS (SELECT 1 FROM information_schema.columns c \
           WHERE c.table_schema = t.table_schema AND c.table_name = t.table_name AND c.column_name = 'tenant_id') \
         FROM information_schema.tables t WHERE t.table_schema = 'public' AND t.table_type = 'BASE TABLE' \
           AND t.table_name NOT LIKE '\\_sqlx%'",
    )
    .fetch_all(&pg)
    .await
    .unwrap();
    assert!(tables.len() >= 15, "the schema's tables: {tables:?}");
    for (table, scoped) in tables {
        // A tenant table shows every tenant, so a created one is seen.
        let filter = if scoped && table != "tenants" { "WHERE tenant_id IS DISTINCT FROM 'other'" } else { "" };
        let rows: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT to_jsonb(t)::text FROM {table} t {filter} ORDER BY 1"
        )))
        .fetch_all(&pg)
        .await
        .unwrap();
        state.insert(format!("pg {table}"), rows.join("\n"));
    }
    pg.close().await;
    let mut redis = app.backends.redis().await;
    let prefix = format!("{}{{t:{TENANT}}}:", app.backends.key_prefix);
    let mut keys = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut redis)
            .await
            .unwrap();
        keys.extend(batch);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    assert!(keys.len() >= 4, "acme's hot state is in Redis: {keys:?}");
    for key in keys {
        if key == format!("{prefix}rc") {
            continue;
        }
        let kind: String = redis::cmd("TYPE").arg(&key).query_async(&mut redis).await.unwrap();
        let content = match kind.as_str() {
            "hash" => {
                let mut pairs: Vec<(String, String)> =
                    redis::cmd("HGETALL").arg(&key).query_async(&mut redis).await.unwrap();
                pairs.sort();
                format!("{pairs:?}")
            }
            "set" => {
                let mut members: Vec<String> = redis::cmd("SMEMBERS").arg(&key).query_async(&mut redis).await.unwrap();
                members.sort();
                format!("{members:?}")
            }
            "string" => {
                let value: String = redis::cmd("GET").arg(&key).query_async(&mut redis).await.unwrap();
                value
            }
            "zset" => {
                let value: Vec<(String, String)> = redis::cmd("ZRANGE")
                    .arg(&key)
                    .arg(0)
                    .arg(-1)
                    .arg("WITHSCORES")
                    .query_async(&mut redis)
                    .await
                    .unwrap();
                format!("{value:?}")
            }
            "list" => {
                let value: Vec<String> =
                    redis::cmd("LRANGE").arg(&key).arg(0).arg(-1).query_async(&mut redis).await.unwrap();
                format!("{value:?}")
            }
            _ => {
                let value: redis::Value =
                    redis::cmd("XRANGE").arg(&key).arg("-").arg("+").query_async(&mut redis).await.unwrap();
                format!("{kind} {value:?}")
            }
        };
        state.insert(format!("redis {key}"), content);
    }
    state
}

/// The snapshot once background work (ledger allocation, alert outbox)
/// has settled: two in a row a moment apart are equal.
async fn settled_snapshot(app: &TestApp) -> BTreeMap<String, String> {
    let mut last = snapshot(app).await;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = snapshot(app).await;
        if now == last {
            return now;
        }
        last = now;
    }
    panic!("acme's state does not settle: {last:?}");
}

/// What differs between two snapshots, for a failure message.
fn diff(before: &BTreeMap<String, String>, after: &BTreeMap<String, String>) -> Vec<String> {
    let mut out = Vec::new();
    for key in before.keys().chain(after.keys().filter(|k| !before.contains_key(*k))) {
        if before.get(key) != after.get(key) {
            let cut = |v: Option<&String>| v.map(|v| v.chars().take(400).collect::<String>());
            out.push(format!("{key}: {:?} -> {:?}", cut(before.get(key)), cut(after.get(key))));
        }
    }
    out
}

/// The status's ErrorInfo reason ("" when it has none).
fn reason_of(status: &Status) -> String {
    status.get_error_details().error_info().map(|i| i.reason.clone()).unwrap_or_default()
}

/// Keys and ids of the matrix's world.
struct World {
    runtime: String,
    admin: String,
    operator: String,
    other_admin: String,
    other_runtime: String,
    revoked: String,
    ids: Ids,
}

async fn reserve_hold(app: &TestApp) -> String {
    let hold = app.reserve_ttl(ALICE, "5", &format!("h-{}", uuid::Uuid::new_v4()), Duration::from_secs(3600)).await;
    assert!(hold.granted, "{hold:?}");
    hold.reservation_id
}

async fn victim_key(app: &TestApp) -> String {
    app.admin
        .clone()
        .create_api_key(req_operator(pb::CreateApiKeyRequest {
            tenant_id: TENANT.into(),
            role: pb::ApiKeyRole::Runtime as i32,
            name: "victim".into(),
            idempotency_key: format!("victim-{}", uuid::Uuid::new_v4()),
        }))
        .await
        .unwrap()
        .into_inner()
        .api_key
        .unwrap()
        .key_id
}

async fn pending_change(app: &TestApp) -> String {
    app.admin
        .clone()
        .request_account_change(req(
            TENANT,
            pb::RequestAccountChangeRequest {
                account_id: ALICE.into(),
                pool_access: Some(false),
                idempotency_key: format!("ch-{}", uuid::Uuid::new_v4()),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .change_id
}

/// acme: acme-org (100 + an allowance of 10) ← acme-alice (pool access,
/// a live hold of 5, a pending change request), acme-spender (10, 9 spent:
/// its alerts fired), a tenant price for `acme_meter`, an alert policy, a
/// webhook. other: outsider (100). Keys of every role.
async fn world() -> (TestApp, World) {
    let app = TestApp::spawn_on(Backends::fresh().await, &[("webhooks.allow_destinations", "127.0.0.0/8")]).await;
    app.create_tenant(TENANT).await;
    app.create_tenant(OTHER).await;
    app.account(ORG, None, false, None).await;
    app.account(ALICE, Some(ORG), true, None).await;
    app.account(SPENDER, None, false, None).await;
    let grant = app.grant(ORG, "100", GrantCategory::Plan).await.grant_id;
    app.grant(SPENDER, "10", GrantCategory::Plan).await;
    app.charge(SPENDER, "9", "spend").await.unwrap();
    app.account_in(OTHER, "outsider", None, false, None).await;
    app.grant_in(OTHER, "outsider", "100", GrantCategory::Plan).await;
    let allowance = app
        .admin
        .clone()
        .create_allowance(req(
            TENANT,
            pb::CreateAllowanceRequest {
                account_id: ORG.into(),
                amount: "10".into(),
                idempotency_key: "allowance".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .allowance_id;
    app.credit_pricing()
        .set_prices(req(
            TENANT,
            pb::SetPricesRequest {
                prices: vec![pb::Price { meter: "acme_meter".into(), unit_price: "2".into(), ..Default::default() }],
                idempotency_key: "acme-prices".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    app.alerts()
        .set_alert_policy(req(
            TENANT,
            pb::SetAlertPolicyRequest {
                policy: Some(pb::AlertPolicy { account_id: ALICE.into(), percents: vec![50], ..Default::default() }),
            },
        ))
        .await
        .unwrap();
    // acme-spender's alerts reach the outbox, then the webhook is set (it
    // sends alerts from then on: none during the matrix).
    eventually(Duration::from_secs(10), || async {
        let listed = app.alerts().list_alerts(req(TENANT, pb::ListAlertsRequest::default())).await.unwrap();
        listed.into_inner().alerts.iter().any(|a| a.account_id == SPENDER)
    })
    .await;
    app.alerts()
        .set_webhook(req(
            TENANT,
            pb::SetWebhookRequest {
                url: "http://127.0.0.1:9/acme-hook".into(),
                secret: "s".repeat(20),
                max_attempts: 0,
            },
        ))
        .await
        .unwrap();

    let hold = reserve_hold(&app).await;
    let change = pending_change(&app).await;
    let runtime = app.create_key(TENANT, pb::ApiKeyRole::Runtime).await;
    let admin = app.create_key(TENANT, pb::ApiKeyRole::Admin).await;
    let other_admin = app.create_key(OTHER, pb::ApiKeyRole::Admin).await;
    let other_runtime = app.create_key(OTHER, pb::ApiKeyRole::Runtime).await;
    let revoked = app.create_key(TENANT, pb::ApiKeyRole::Admin).await;
    let key_id = victim_key(&app).await;
    let keys = app
        .admin
        .clone()
        .list_api_keys(req_operator(pb::ListApiKeysRequest { tenant_id: TENANT.into() }))
        .await
        .unwrap()
        .into_inner()
        .api_keys;
    let revoked_id = keys.iter().find(|k| k.prefix == revoked[4..16]).unwrap().key_id.clone();
    app.admin.clone().revoke_api_key(req_operator(pb::RevokeApiKeyRequest { key_id: revoked_id })).await.unwrap();
    let operator = app.operator_key();
    let ids = Ids { hold, grant, key_id, allowance, change };
    (app, World { runtime, admin, operator, other_admin, other_runtime, revoked, ids })
}

/// The refusals every RPC gets, whatever its role: (case, header, code, reason).
fn refusals(w: &World, needs: Needs, foreign: Foreign) -> Vec<(String, Option<String>, Code, &'static str)> {
    let bearer = |k: &str| Some(format!("Bearer {k}"));
    let mut cases: Vec<(String, Option<String>, Code, &'static str)> = vec![
        ("no key".into(), None, Code::Unauthenticated, "MISSING_CREDENTIALS"),
        ("not bearer".into(), Some(format!("Basic {}", w.admin)), Code::Unauthenticated, "INVALID_CREDENTIALS"),
        ("garbage".into(), Some("Bearer nope".into()), Code::Unauthenticated, "INVALID_CREDENTIALS"),
        (
            "unknown prefix".into(),
            bearer(&format!("cdk_000000000000_{}", "0".repeat(64))),
            Code::Unauthenticated,
            "INVALID_CREDENTIALS",
        ),
        (
            "right prefix, wrong secret".into(),
            bearer(&format!("{}{}", &w.admin[..17], "0".repeat(64))),
            Code::Unauthenticated,
            "INVALID_CREDENTIALS",
        ),
        ("revoked".into(), bearer(&w.revoked), Code::Unauthenticated, "INVALID_CREDENTIALS"),
    ];
    let wrong: &[(&str, &String)] = match needs {
        Needs::Runtime => &[("operator key", &w.operator)],
        Needs::Admin => &[("runtime key", &w.runtime), ("operator key", &w.operator)],
        Needs::Operator => &[("runtime key", &w.runtime), ("admin key", &w.admin)],
        Needs::AdminOrOperator => &[("runtime key", &w.runtime)],
    };
    for (case, key) in wrong {
        cases.push((case.to_string(), bearer(key), Code::PermissionDenied, "WRONG_ROLE"));
    }
    for (case, key) in foreign_keys(w, needs) {
        match foreign {
            Foreign::NotFound(reason) => cases.push((case, bearer(key), Code::NotFound, reason)),
            Foreign::Invalid(reason) => cases.push((case, bearer(key), Code::InvalidArgument, reason)),
            Foreign::Own | Foreign::Operator => {}
        }
    }
    cases
}

/// The other tenant's keys that may make a call of this role.
fn foreign_keys(w: &World, needs: Needs) -> Vec<(String, &String)> {
    match needs {
        Needs::Runtime => {
            vec![("other's runtime key".into(), &w.other_runtime), ("other's admin key".into(), &w.other_admin)]
        }
        Needs::Admin | Needs::AdminOrOperator => vec![("other's admin key".into(), &w.other_admin)],
        Needs::Operator => vec![],
    }
}

/// The keys that may make a call of this role.
fn allowed_keys(w: &World, needs: Needs) -> Vec<(&'static str, &String)> {
    match needs {
        Needs::Runtime => vec![("runtime key", &w.runtime), ("admin key", &w.admin)],
        Needs::Admin => vec![("admin key", &w.admin)],
        Needs::Operator => vec![("operator key", &w.operator)],
        Needs::AdminOrOperator => vec![("admin key", &w.admin), ("operator key", &w.operator)],
    }
}

/// Every RPC × no key, malformed keys, a revoked key, each wrong role and
/// another tenant's keys: the documented code and reason, and acme's state
/// (PostgreSQL rows, Redis keys, balances) unchanged after each RPC's
/// refusals. Another tenant's key that may make a tenant-wide call acts on
/// its own tenant and sees nothing of acme. Then every allowed key succeeds.
#[tokio::test]
async fn isolation_matrix() {
    let (app, w) = world().await;
    let mut failures = Vec::new();
    let mut checked = 0;
    let mut before = settled_snapshot(&app).await;
    for &(service, method, needs, foreign) in RPCS {
        for (case, header, code, reason) in refusals(&w, needs, foreign) {
            checked += 1;
            match send(&app, service, method, header.as_deref(), &w.ids).await {
                Ok(answer) => failures.push(format!("{method} / {case}: succeeded: {answer}")),
                Err(status) => {
                    let got = reason_of(&status);
                    if status.code() != code || got != reason {
                        failures.push(format!(
                            "{method} / {case}: expected {code:?} {reason}, got {:?} {got} ({})",
                            status.code(),
                            status.message()
                        ));
                    }
                }
            }
        }
        if foreign == Foreign::Own {
            for (case, key) in foreign_keys(&w, needs) {
                checked += 1;
                match send(&app, service, method, Some(&format!("Bearer {key}")), &w.ids).await {
                    Ok(answer) if answer.contains(TENANT) => {
                        failures.push(format!("{method} / {case}: shows acme's data: {answer}"))
                    }
                    Ok(_) => {}
                    Err(status) => {
                        failures.push(format!("{method} / {case}: its own tenant's call failed: {status:?}"))
                    }
                }
            }
        }
        let after = snapshot(&app).await;
        if after != before {
            failures.push(format!(
                "{method}: refused calls changed acme's state:\n  {}",
                diff(&before, &after).join("\n  ")
            ));
            before = after;
        }
    }
    assert!(failures.is_empty(), "{} of {checked} cases failed:\n{}", failures.len(), failures.join("\n"));
    // 6 key cases per RPC, plus each wrong role and each foreign key.
    let expected: usize = RPCS
        .iter()
        .map(|&(_, _, needs, foreign)| {
            let wrong = match needs {
                Needs::Runtime | Needs::AdminOrOperator => 1,
                Needs::Admin | Needs::Operator => 2,
            };
            let foreign = if foreign == Foreign::Operator { 0 } else { foreign_keys(&w, needs).len() };
            6 + wrong + foreign
        })
        .sum();
    assert_eq!(checked, expected);
    assert_eq!(RPCS.len(), 44);

    // Every allowed key makes every call (each on things of its own where
    // the call consumes them: a hold, a grant, a key, a change request).
    for &(service, method, needs, _) in RPCS {
        for (who, key) in allowed_keys(&w, needs) {
            let mut ids = w.ids.clone();
            match method {
                "Commit" | "Release" | "Extend" => ids.hold = reserve_hold(&app).await,
                "VoidGrant" => ids.grant = app.grant(ORG, "1", GrantCategory::Promotional).await.grant_id,
                "RevokeApiKey" => ids.key_id = victim_key(&app).await,
                "DecideAccountChange" => ids.change = pending_change(&app).await,
                _ => {}
            }
            if let Err(status) = send(&app, service, method, Some(&format!("Bearer {key}")), &ids).await {
                failures.push(format!(
                    "{method} / {who}: {:?} {} ({})",
                    status.code(),
                    reason_of(&status),
                    status.message()
                ));
            }
        }
    }
    assert!(failures.is_empty(), "allowed calls failed:\n{}", failures.join("\n"));
}

/// The descriptors the server serves for reflection, as
/// `package.Service/Method`, for the creditd services.
async fn reflected_methods(app: &TestApp) -> BTreeSet<String> {
    use prost::Message;
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut client = ServerReflectionClient::new(app.raw_admin_channel());
    let ask = |request: MessageRequest| ServerReflectionRequest { host: String::new(), message_request: Some(request) };
    let mut answers = client
        .server_reflection_info(futures::stream::iter([ask(MessageRequest::ListServices(String::new()))]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) = answers.message().await.unwrap().unwrap().message_response
    else {
        panic!("no service list")
    };
    let services: Vec<String> =
        list.service.into_iter().map(|s| s.name).filter(|name| name.starts_with("creditd.")).collect();
    assert!(services.len() >= 5, "{services:?}");
    let mut methods = BTreeSet::new();
    let requests: Vec<_> = services.iter().map(|s| ask(MessageRequest::FileContainingSymbol(s.clone()))).collect();
    let mut answers = client.server_reflection_info(futures::stream::iter(requests)).await.unwrap().into_inner();
    while let Some(answer) = answers.message().await.unwrap() {
        let Some(MessageResponse::FileDescriptorResponse(files)) = answer.message_response else {
            panic!("no descriptor in {answer:?}")
        };
        for bytes in files.file_descriptor_proto {
            let file = prost_types::FileDescriptorProto::decode(bytes.as_slice()).unwrap();
            for service in &file.service {
                let qualified = format!("{}.{}", file.package(), service.name());
                if services.contains(&qualified) {
                    methods.extend(service.method.iter().map(|m| format!("{qualified}/{}", m.name())));
                }
            }
        }
    }
    methods
}

/// The methods of the descriptor set build.rs produces (`creditd::pb`).
fn built_methods() -> BTreeSet<String> {
    use prost::Message;
    let set = prost_types::FileDescriptorSet::decode(pb::FILE_DESCRIPTOR_SET).unwrap();
    let mut methods = BTreeSet::new();
    for file in &set.file {
        for service in &file.service {
            for method in &service.method {
                methods.insert(format!("{}.{}/{}", file.package(), service.name(), method.name()));
            }
        }
    }
    methods
}

/// Adding an RPC to a proto without a row in the isolation matrix fails
/// here: the matrix's RPCs are exactly the methods the server describes.
#[tokio::test]
async fn the_matrix_covers_every_rpc_the_server_describes() {
    let app = TestApp::spawn().await;
    let served = reflected_methods(&app).await;
    assert_eq!(served, built_methods(), "reflection serves build.rs's descriptors");
    let matrix: BTreeSet<String> = RPCS.iter().map(|(service, method, _, _)| format!("{service}/{method}")).collect();
    assert_eq!(matrix.len(), RPCS.len(), "an RPC has two rows");
    let missing: Vec<_> = served.difference(&matrix).collect();
    let stale: Vec<_> = matrix.difference(&served).collect();
    assert!(
        missing.is_empty() && stale.is_empty(),
        "RPCs without a matrix row: {missing:?}; rows of no RPC: {stale:?}"
    );
    // Streams are in it too.
    assert!(served.contains("creditd.v1.AlertService/WatchAlerts"));
}

#[tokio::test]
async fn get_tenant_shows_an_admin_only_its_own_tenant() {
    let app = TestApp::spawn().await;
    app.create_tenant(OTHER).await;
    let admin = app.create_key(TENANT, pb::ApiKeyRole::Admin).await;
    let runtime = app.create_key(TENANT, pb::ApiKeyRole::Runtime).await;
    let mut client = app.raw_admin.clone();
    let own = client.get_tenant(with_key(&admin, pb::GetTenantRequest { tenant_id: TENANT.into() })).await.unwrap();
    assert_eq!(own.into_inner().tenant_id, TENANT);
    let e = client.get_tenant(with_key(&admin, pb::GetTenantRequest { tenant_id: OTHER.into() })).await.unwrap_err();
    assert_status(&e, Code::NotFound, "TENANT_NOT_FOUND", None);
    let e = client.get_tenant(with_key(&runtime, pb::GetTenantRequest { tenant_id: TENANT.into() })).await.unwrap_err();
    assert_status(&e, Code::PermissionDenied, "WRONG_ROLE", None);
    let any = client.get_tenant(with_key(&app.operator_key(), pb::GetTenantRequest { tenant_id: OTHER.into() })).await;
    assert_eq!(any.unwrap().into_inner().tenant_id, OTHER);
}

#[tokio::test]
async fn keys_are_stored_hashed_and_shown_once() {
    let app = TestApp::spawn().await;
    let request = pb::CreateApiKeyRequest {
        tenant_id: TENANT.into(),
        role: pb::ApiKeyRole::Runtime as i32,
        name: "agents".into(),
        idempotency_key: "once".into(),
    };
    let first = app.admin.clone().create_api_key(req_operator(request.clone())).await.unwrap().into_inner();
    assert!(first.key.starts_with("cdk_") && first.key.len() == 4 + 12 + 1 + 64);
    assert!(!first.replayed);
    let again = app.admin.clone().create_api_key(req_operator(request.clone())).await.unwrap().into_inner();
    assert!(again.replayed);
    assert!(again.key.is_empty(), "the secret is never shown twice");
    assert_eq!(again.api_key, first.api_key);
    let e = app
        .admin
        .clone()
        .create_api_key(req_operator(pb::CreateApiKeyRequest { name: "other".into(), ..request }))
        .await
        .unwrap_err();
    assert_status(&e, Code::FailedPrecondition, "IDEMPOTENCY_KEY_REUSED", None);

    let pg = app.backends.pg().await;
    let secret = &first.key[17..];
    let stored: Vec<String> = sqlx::query_scalar("SELECT secret_hash FROM api_keys").fetch_all(&pg).await.unwrap();
    assert!(stored.iter().all(|h| !h.contains(secret)));
    assert!(stored.contains(&creditd::auth::hash_secret(secret)));

    for (tenant, role, field) in [
        ("", pb::ApiKeyRole::Admin, "tenant_id"),
        (TENANT, pb::ApiKeyRole::Operator, "tenant_id"),
        (TENANT, pb::ApiKeyRole::Unspecified, "role"),
    ] {
        let e = app
            .admin
            .clone()
            .create_api_key(req_operator(pb::CreateApiKeyRequest {
                tenant_id: tenant.into(),
                role: role as i32,
                name: String::new(),
                idempotency_key: format!("bad-{field}-{tenant}"),
            }))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    }
    let e = app
        .admin
        .clone()
        .create_api_key(req_operator(pb::CreateApiKeyRequest {
            tenant_id: "nosuch".into(),
            role: pb::ApiKeyRole::Admin as i32,
            name: String::new(),
            idempotency_key: "nosuch".into(),
        }))
        .await
        .unwrap_err();
    assert_status(&e, Code::NotFound, "TENANT_NOT_FOUND", None);
}

#[tokio::test]
async fn revocation_reaches_every_replica_within_a_second() {
    let first = TestApp::spawn().await;
    let second = TestApp::spawn_on(first.backends.clone(), &[]).await;
    first.account("u", None, false, None).await;
    let key = first.create_key(TENANT, pb::ApiKeyRole::Runtime).await;
    let balance = |app: &TestApp| {
        let mut client = app.raw_credit.clone();
        let request = with_key(&key, pb::GetBalanceRequest { account_id: "u".into() });
        async move { client.get_balance(request).await }
    };
    balance(&second).await.expect("the second replica knows the key (and caches it)");
    let keys = first
        .admin
        .clone()
        .list_api_keys(req_operator(pb::ListApiKeysRequest { tenant_id: TENANT.into() }))
        .await
        .unwrap()
        .into_inner()
        .api_keys;
    let id = keys.iter().find(|k| key.starts_with(&format!("cdk_{}_", k.prefix))).unwrap().key_id.clone();
    let revoked_at = tokio::time::Instant::now();
    first.admin.clone().revoke_api_key(req_operator(pb::RevokeApiKeyRequest { key_id: id })).await.unwrap();
    assert_status(&balance(&first).await.unwrap_err(), Code::Unauthenticated, "INVALID_CREDENTIALS", None);
    eventually(Duration::from_secs(1), || async { balance(&second).await.is_err() }).await;
    assert!(revoked_at.elapsed() <= Duration::from_secs(1));
}

/// A CA, a server certificate for localhost and a client certificate.
struct Pki {
    ca: String,
    server_cert: String,
    server_key: String,
    client_cert: String,
    client_key: String,
}

fn pki() -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let server_key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec!["localhost".to_string()]).unwrap().signed_by(&server_key, &ca).unwrap();
    let client_key = KeyPair::generate().unwrap();
    let client =
        CertificateParams::new(vec!["agent-runtime".to_string()]).unwrap().signed_by(&client_key, &ca).unwrap();
    Pki {
        ca: ca.pem(),
        server_cert: server.pem(),
        server_key: server_key.serialize_pem(),
        client_cert: client.pem(),
        client_key: client_key.serialize_pem(),
    }
}

/// Serves creditd with TLS (and mTLS when `mutual`); returns its address
/// and the operator key.
async fn spawn_tls(pki: &Pki, mutual: bool) -> (std::net::SocketAddr, String, tokio::sync::oneshot::Sender<()>) {
    let dir = std::env::temp_dir().join(format!("creditd-tls-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, content: &str| {
        let path = dir.join(name);
        std::fs::write(&path, content).unwrap();
        path.to_string_lossy().into_owned()
    };
    let backends = Backends::fresh().await;
    let mut overrides = test_overrides(&backends);
    overrides.push(("tls.cert_file".into(), write("server.pem", &pki.server_cert)));
    overrides.push(("tls.key_file".into(), write("server.key", &pki.server_key)));
    if mutual {
        overrides.push(("tls.client_ca_file".into(), write("ca.pem", &pki.ca)));
    }
    let app = App::build(Config::load(&Sources { overrides, ..Default::default() }).unwrap()).await.unwrap();
    let addr = app.local_addr();
    tokio::time::timeout(Duration::from_secs(20), app.ready()).await.expect("app reports serving");
    let (_, key) = app.engine().keys.create(None, creditd::auth::Role::Operator, "tls", None).await.unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let _ = app
            .serve(async {
                let _ = rx.await;
            })
            .await;
    });
    (addr, key.unwrap(), tx)
}

async fn tls_channel(
    addr: std::net::SocketAddr,
    pki: &Pki,
    client_cert: bool,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&pki.ca)).domain_name("localhost");
    if client_cert {
        tls = tls.identity(Identity::from_pem(&pki.client_cert, &pki.client_key));
    }
    Channel::from_shared(format!("https://localhost:{}", addr.port())).unwrap().tls_config(tls)?.connect().await
}

#[tokio::test]
async fn tls_and_mutual_tls() {
    let pki = pki();

    let (addr, operator, _stop) = spawn_tls(&pki, false).await;
    let channel = tls_channel(addr, &pki, false).await.expect("TLS handshake");
    let tenant = AdminServiceClient::new(channel)
        .create_tenant(with_key(
            &operator,
            pb::CreateTenantRequest { tenant_id: "secure".into(), ..Default::default() },
        ))
        .await
        .expect("a call over TLS");
    assert_eq!(tenant.into_inner().tenant_id, "secure");
    let plain = Channel::from_shared(format!("http://127.0.0.1:{}", addr.port())).unwrap().connect().await;
    if let Ok(channel) = plain {
        let e = CreditServiceClient::new(channel)
            .get_balance(with_key(&operator, pb::GetBalanceRequest { account_id: "x".into() }))
            .await
            .unwrap_err();
        assert_ne!(e.code(), Code::Ok, "plaintext is not served on a TLS port");
    }

    let (addr, operator, _stop) = spawn_tls(&pki, true).await;
    let channel = tls_channel(addr, &pki, true).await.expect("mTLS handshake with a client certificate");
    AdminServiceClient::new(channel)
        .create_tenant(with_key(
            &operator,
            pb::CreateTenantRequest { tenant_id: "secure".into(), ..Default::default() },
        ))
        .await
        .expect("a call over mTLS");
    let refused = match tls_channel(addr, &pki, false).await {
        Err(_) => true,
        Ok(channel) => AdminServiceClient::new(channel)
            .create_tenant(with_key(
                &operator,
                pb::CreateTenantRequest { tenant_id: "nocert".into(), ..Default::default() },
            ))
            .await
            .is_err(),
    };
    assert!(refused, "a client without a certificate is refused under mTLS");
}
