//! Malformed requests across CreditService and AdminService: each is refused
//! with the documented code, ErrorInfo reason and (for INVALID_ARGUMENT) the
//! field named in BadRequest, and none of them changes anything.

use std::{
    panic::AssertUnwindSafe,
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use creditd::pb::{self, GrantCategory};
use tonic::{Code, Request, Status};
use tonic_types::StatusExt;

use crate::harness::{Backends, TENANT, TestApp, assert_status, eventually, req, req_operator, with_key};

const OTHER: &str = "other";
/// Sends with a runtime key of acme (see `fixture`).
const RUNTIME: &str = "acme-runtime";
/// The server's request message limit (common.proto).
const MAX_MESSAGE: usize = 4 * 1024 * 1024;

/// Passes request bytes through untouched, to send what a hostile or
/// broken client would.
#[derive(Clone, Default)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }
    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, buf: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), Status> {
        use bytes_put::BufMut;
        buf.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, buf: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        use bytes_put::Buf;
        let mut out = vec![0; buf.remaining()];
        buf.copy_to_slice(&mut out);
        Ok(Some(out))
    }
}

mod bytes_put {
    pub use prost::bytes::{Buf, BufMut};
}

/// A fresh idempotency key, so that no two rows could ever collide.
fn key() -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!("bad-{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Text with a NUL byte.
const NUL: &str = "a\u{0}b";

/// A CreateGrantRequest one byte over the message limit (its description
/// is huge; the limit is checked before anything is decoded).
fn oversize() -> Vec<u8> {
    use prost::Message;
    let mut m = create_grant("bob", "1");
    m.description = "d".repeat(MAX_MESSAGE);
    let mut bytes = m.encode_to_vec();
    bytes.truncate(MAX_MESSAGE + 1);
    bytes
}

/// A field name built at run time, for a row.
fn leak(text: String) -> &'static str {
    Box::leak(text.into_boxed_str())
}

fn dur(seconds: i64, nanos: i32) -> Option<prost_types::Duration> {
    Some(prost_types::Duration { seconds, nanos })
}

fn ts(seconds: i64, nanos: i32) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp { seconds, nanos })
}

fn now_secs() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

fn usage() -> pb::Usage {
    pb::Usage {
        items: vec![pb::UsageItem {
            meter: "input_tokens".into(),
            model: "unpriced-model".into(),
            quantity: "1200".into(),
        }],
    }
}

fn labels(pairs: &[(&str, &str)]) -> std::collections::HashMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn many_labels(n: usize) -> std::collections::HashMap<String, String> {
    (0..n).map(|i| (format!("k{i}"), "v".to_string())).collect()
}

fn authorize(account: &str, amount: &str) -> pb::AuthorizeRequest {
    pb::AuthorizeRequest { account_id: account.into(), cost: Some(pb::authorize_request::Cost::Amount(amount.into())) }
}

fn reserve(account: &str, amount: &str) -> pb::ReserveRequest {
    pb::ReserveRequest {
        account_id: account.into(),
        cost: Some(pb::reserve_request::Cost::Amount(amount.into())),
        idempotency_key: key(),
        ..Default::default()
    }
}

fn commit(reservation: &str, amount: &str) -> pb::CommitRequest {
    pb::CommitRequest {
        reservation_id: reservation.into(),
        cost: Some(pb::commit_request::Cost::Amount(amount.into())),
        idempotency_key: key(),
        ..Default::default()
    }
}

fn release(reservation: &str) -> pb::ReleaseRequest {
    pb::ReleaseRequest { reservation_id: reservation.into(), idempotency_key: key() }
}

fn extend(reservation: &str, more: &str) -> pb::ExtendRequest {
    pb::ExtendRequest {
        reservation_id: reservation.into(),
        more: Some(pb::extend_request::More::Amount(more.into())),
        ttl: None,
        idempotency_key: key(),
    }
}

fn charge(account: &str, amount: &str) -> pb::ChargeRequest {
    pb::ChargeRequest {
        account_id: account.into(),
        cost: Some(pb::charge_request::Cost::Amount(amount.into())),
        idempotency_key: key(),
        ..Default::default()
    }
}

fn balance(account: &str) -> pb::GetBalanceRequest {
    pb::GetBalanceRequest { account_id: account.into() }
}

fn create_account(id: &str, parent: &str) -> pb::CreateAccountRequest {
    pb::CreateAccountRequest {
        account_id: id.into(),
        parent_id: parent.into(),
        kind: pb::AccountKind::User as i32,
        ..Default::default()
    }
}

fn create_grant(account: &str, amount: &str) -> pb::CreateGrantRequest {
    pb::CreateGrantRequest {
        account_id: account.into(),
        amount: amount.into(),
        category: GrantCategory::Purchase as i32,
        idempotency_key: key(),
        ..Default::default()
    }
}

fn void_grant(grant: &str, reason: &str) -> pb::VoidGrantRequest {
    pb::VoidGrantRequest { grant_id: grant.into(), reason: reason.into(), idempotency_key: key() }
}

/// One RPC with its request.
enum Call {
    Authorize(pb::AuthorizeRequest),
    Reserve(pb::ReserveRequest),
    Commit(pb::CommitRequest),
    Release(pb::ReleaseRequest),
    Extend(pb::ExtendRequest),
    Charge(pb::ChargeRequest),
    GetBalance(pb::GetBalanceRequest),
    CreateTenant(pb::CreateTenantRequest),
    GetTenant(pb::GetTenantRequest),
    CreateAccount(pb::CreateAccountRequest),
    UpdateAccount(pb::UpdateAccountRequest),
    GetAccount(pb::GetAccountRequest),
    ListAccounts(pb::ListAccountsRequest),
    CreateGrant(pb::CreateGrantRequest),
    VoidGrant(pb::VoidGrantRequest),
    GetGrant(pb::GetGrantRequest),
    ListGrants(pb::ListGrantsRequest),
    CreateApiKey(pb::CreateApiKeyRequest),
    CreateAllowance(pb::CreateAllowanceRequest),
    AdjustBalance(pb::AdjustBalanceRequest),
    RequestAccountChange(pb::RequestAccountChangeRequest),
    DecideAccountChange(pb::DecideAccountChangeRequest),
    SetWebhook(pb::SetWebhookRequest),
    RevokeApiKey(pb::RevokeApiKeyRequest),
    EndAllowance(pb::EndAllowanceRequest),
    SetPrices(pb::SetPricesRequest),
    SetAlertPolicy(pb::SetAlertPolicyRequest),
    /// Bytes sent as the message of `path` (e.g.
    /// "/creditd.v1.CreditService/Reserve"), with the tenant's key.
    Raw {
        path: &'static str,
        bytes: Vec<u8>,
    },
}

impl std::fmt::Debug for Call {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&debug_call(self))
    }
}

fn debug_call(call: &Call) -> String {
    match call {
        Call::Authorize(m) => format!("Authorize({m:?})"),
        Call::Reserve(m) => format!("Reserve({m:?})"),
        Call::Commit(m) => format!("Commit({m:?})"),
        Call::Release(m) => format!("Release({m:?})"),
        Call::Extend(m) => format!("Extend({m:?})"),
        Call::Charge(m) => format!("Charge({m:?})"),
        Call::GetBalance(m) => format!("GetBalance({m:?})"),
        Call::CreateTenant(m) => format!("CreateTenant({m:?})"),
        Call::GetTenant(m) => format!("GetTenant({m:?})"),
        Call::CreateAccount(m) => format!("CreateAccount({m:?})"),
        Call::UpdateAccount(m) => format!("UpdateAccount({m:?})"),
        Call::GetAccount(m) => format!("GetAccount({m:?})"),
        Call::ListAccounts(m) => format!("ListAccounts({m:?})"),
        Call::CreateGrant(m) => format!("CreateGrant({m:?})"),
        Call::VoidGrant(m) => format!("VoidGrant({m:?})"),
        Call::GetGrant(m) => format!("GetGrant({m:?})"),
        Call::ListGrants(m) => format!("ListGrants({m:?})"),
        Call::CreateApiKey(m) => format!("CreateApiKey({m:?})"),
        Call::CreateAllowance(m) => format!("CreateAllowance({m:?})"),
        Call::AdjustBalance(m) => format!("AdjustBalance({m:?})"),
        Call::RequestAccountChange(m) => format!("RequestAccountChange({m:?})"),
        Call::DecideAccountChange(m) => format!("DecideAccountChange({m:?})"),
        Call::SetWebhook(m) => format!("SetWebhook({m:?})"),
        Call::RevokeApiKey(m) => format!("RevokeApiKey({m:?})"),
        Call::EndAllowance(m) => format!("EndAllowance({m:?})"),
        Call::SetPrices(m) => format!("SetPrices({m:?})"),
        Call::SetAlertPolicy(m) => format!("SetAlertPolicy({m:?})"),
        Call::Raw { path, bytes } => format!("Raw {path} ({} bytes)", bytes.len()),
    }
}

/// Sends `call` as `tenant` (no tenant metadata at all when `None`);
/// returns the response, printed, when it succeeds.
async fn send(app: &TestApp, tenant: Option<&str>, call: Call) -> Result<String, Status> {
    fn wrap<T>(tenant: Option<&str>, message: T) -> Request<T> {
        match tenant {
            Some(tenant) => req(tenant, message),
            None => Request::new(message),
        }
    }
    fn as_operator<T>(tenant: Option<&str>, message: T) -> Request<T> {
        match tenant {
            Some(_) => crate::harness::req_operator(message),
            None => Request::new(message),
        }
    }
    fn show<T: std::fmt::Debug>(r: tonic::Response<T>) -> String {
        format!("{:?}", r.into_inner())
    }
    let mut credit = app.credit.clone();
    let mut admin = app.admin.clone();
    let t = tenant;
    match call {
        Call::Authorize(m) => credit.authorize(wrap(t, m)).await.map(show),
        Call::Reserve(m) => credit.reserve(wrap(t, m)).await.map(show),
        Call::Commit(m) => credit.commit(wrap(t, m)).await.map(show),
        Call::Release(m) => credit.release(wrap(t, m)).await.map(show),
        Call::Extend(m) => credit.extend(wrap(t, m)).await.map(show),
        Call::Charge(m) => credit.charge(wrap(t, m)).await.map(show),
        Call::GetBalance(m) => credit.get_balance(wrap(t, m)).await.map(show),
        // Tenants are the operator's: a row sent "as a tenant" uses the
        // operator key.
        Call::CreateTenant(m) => admin.create_tenant(as_operator(t, m)).await.map(show),
        Call::GetTenant(m) if t == Some(RUNTIME) => admin.get_tenant(wrap(t, m)).await.map(show),
        Call::GetTenant(m) => admin.get_tenant(as_operator(t, m)).await.map(show),
        Call::CreateApiKey(m) => admin.create_api_key(as_operator(t, m)).await.map(show),
        Call::CreateAllowance(m) => admin.create_allowance(wrap(t, m)).await.map(show),
        Call::AdjustBalance(m) => admin.adjust_balance(wrap(t, m)).await.map(show),
        Call::RequestAccountChange(m) => admin.request_account_change(wrap(t, m)).await.map(show),
        Call::DecideAccountChange(m) => admin.decide_account_change(wrap(t, m)).await.map(show),
        Call::SetWebhook(m) => app.alerts().set_webhook(wrap(t, m)).await.map(show),
        Call::RevokeApiKey(m) => admin.revoke_api_key(as_operator(t, m)).await.map(show),
        Call::EndAllowance(m) => admin.end_allowance(wrap(t, m)).await.map(show),
        Call::SetPrices(m) => app.credit_pricing().set_prices(wrap(t, m)).await.map(show),
        Call::SetAlertPolicy(m) => app.alerts().set_alert_policy(wrap(t, m)).await.map(show),
        Call::Raw { path, bytes } => {
            let key = app.keys.lock().unwrap()[t.unwrap_or(TENANT)].clone();
            let mut grpc = tonic::client::Grpc::new(app.raw_admin_channel());
            grpc.ready().await.map_err(|e| Status::unavailable(e.to_string()))?;
            grpc.unary(with_key(&key, bytes), tonic::codegen::http::uri::PathAndQuery::from_static(path), RawCodec)
                .await
                .map(|r| format!("{} bytes", r.into_inner().len()))
        }
        Call::CreateAccount(m) => admin.create_account(wrap(t, m)).await.map(show),
        Call::UpdateAccount(m) => admin.update_account(wrap(t, m)).await.map(show),
        Call::GetAccount(m) => admin.get_account(wrap(t, m)).await.map(show),
        Call::ListAccounts(m) => admin.list_accounts(wrap(t, m)).await.map(show),
        Call::CreateGrant(m) => admin.create_grant(wrap(t, m)).await.map(show),
        Call::VoidGrant(m) => admin.void_grant(wrap(t, m)).await.map(show),
        Call::GetGrant(m) => admin.get_grant(wrap(t, m)).await.map(show),
        Call::ListGrants(m) => admin.list_grants(wrap(t, m)).await.map(show),
    }
}

/// One row of the table: a call and the error it must get.
struct Row {
    name: &'static str,
    tenant: Option<&'static str>,
    call: Call,
    code: Code,
    reason: &'static str,
    field: Option<&'static str>,
}

/// INVALID_ARGUMENT naming `field`, as tenant acme.
fn invalid(name: &'static str, call: Call, reason: &'static str, field: &'static str) -> Row {
    Row { name, tenant: Some(TENANT), call, code: Code::InvalidArgument, reason, field: Some(field) }
}

/// Any other error, as tenant acme.
fn fails(name: &'static str, call: Call, code: Code, reason: &'static str) -> Row {
    Row { name, tenant: Some(TENANT), call, code, reason, field: None }
}

impl Row {
    fn sent_by(mut self, tenant: Option<&'static str>) -> Row {
        self.tenant = tenant;
        self
    }
}

/// What the table must leave untouched.
struct Fixture {
    /// A live hold of alice (acme), 1h TTL.
    hold: String,
    /// A live hold of outsider (tenant other).
    other_hold: String,
    /// A live grant of bob (acme).
    grant: String,
    /// A live grant of outsider (tenant other).
    other_grant: String,
}

/// acme: org (1000) ← alice (pool access), bob (own 100), a chain d1..d8
/// (the deepest tree allowed). other: outsider (50). Each tenant has one
/// live hold.
async fn fixture() -> (TestApp, Fixture) {
    fixture_with(&[]).await
}

/// `fixture`, with acme created with these `grant_limits`.
async fn fixture_with(grant_limits: &[(&str, i32)]) -> (TestApp, Fixture) {
    let app = TestApp::spawn_on(Backends::fresh().await, &[]).await;
    app.admin
        .clone()
        .create_tenant(req_operator(pb::CreateTenantRequest {
            tenant_id: TENANT.into(),
            grant_limits: grant_limits.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            ..Default::default()
        }))
        .await
        .expect("create acme");
    let admin = app.create_key(TENANT, pb::ApiKeyRole::Admin).await;
    app.keys.lock().unwrap().insert(TENANT.to_string(), admin);
    let runtime = app.create_key(TENANT, pb::ApiKeyRole::Runtime).await;
    app.keys.lock().unwrap().insert(RUNTIME.to_string(), runtime);
    app.account("org", None, false, None).await;
    app.account("alice", Some("org"), true, None).await;
    app.account("bob", Some("org"), false, Some("500")).await;
    app.grant("org", "1000", GrantCategory::Plan).await;
    let grant = app.grant("bob", "100", GrantCategory::Plan).await.grant_id;
    let mut parent: Option<String> = None;
    for level in 1..=8 {
        let id = format!("d{level}");
        app.account(&id, parent.as_deref(), false, None).await;
        parent = Some(id);
    }
    app.create_tenant(OTHER).await;
    app.account_in(OTHER, "outsider", None, false, None).await;
    let other_grant = app.grant_in(OTHER, "outsider", "50", GrantCategory::Plan).await.grant_id;

    let hold = app.reserve_ttl("alice", "40", "setup-hold", Duration::from_secs(3600)).await;
    assert!(hold.granted);
    let other_hold = app
        .credit
        .clone()
        .reserve(req(
            OTHER,
            pb::ReserveRequest { ttl: dur(3600, 0), idempotency_key: "setup-hold".into(), ..reserve("outsider", "5") },
        ))
        .await
        .expect("reserve in other")
        .into_inner();
    assert!(other_hold.granted);
    let fixture = Fixture { hold: hold.reservation_id, other_hold: other_hold.reservation_id, grant, other_grant };
    (app, fixture)
}

fn table(f: &Fixture) -> Vec<Row> {
    use Call::*;
    let unknown_uuid = uuid::Uuid::now_v7().to_string();
    let long_key = "k".repeat(129);
    let long_id = "a".repeat(129);
    let now = now_secs();
    vec![
        // ---- Reserve: amounts -------------------------------------------
        invalid("reserve negative", Reserve(reserve("alice", "-5")), "INVALID_AMOUNT", "amount"),
        invalid("reserve 7 decimals", Reserve(reserve("alice", "0.0000001")), "INVALID_AMOUNT", "amount"),
        invalid("reserve exponent", Reserve(reserve("alice", "1e3")), "INVALID_AMOUNT", "amount"),
        invalid("reserve plus sign", Reserve(reserve("alice", "+1")), "INVALID_AMOUNT", "amount"),
        invalid("reserve NaN", Reserve(reserve("alice", "NaN")), "INVALID_AMOUNT", "amount"),
        invalid("reserve empty amount", Reserve(reserve("alice", "")), "INVALID_AMOUNT", "amount"),
        invalid(
            "reserve missing cost",
            Reserve(pb::ReserveRequest { cost: None, ..reserve("alice", "1") }),
            "INVALID_AMOUNT",
            "amount",
        ),
        invalid("reserve above max", Reserve(reserve("alice", "1000000000.000001")), "INVALID_AMOUNT", "amount"),
        invalid("reserve far above max", Reserve(reserve("alice", "99999999999999999999")), "INVALID_AMOUNT", "amount"),
        invalid("reserve zero", Reserve(reserve("alice", "0")), "INVALID_AMOUNT", "amount"),
        invalid("reserve zero with decimals", Reserve(reserve("alice", "0.000000")), "INVALID_AMOUNT", "amount"),
        // ---- Reserve: accounts, tenants ---------------------------------
        fails("reserve unknown account", Reserve(reserve("ghost", "1")), Code::NotFound, "ACCOUNT_NOT_FOUND"),
        fails(
            "reserve another tenant's account",
            Reserve(reserve("outsider", "1")),
            Code::NotFound,
            "ACCOUNT_NOT_FOUND",
        ),
        fails("reserve acme's account as other", Reserve(reserve("alice", "1")), Code::NotFound, "ACCOUNT_NOT_FOUND")
            .sent_by(Some(OTHER)),
        invalid("reserve account with space", Reserve(reserve("a b", "1")), "INVALID_ACCOUNT_ID", "account_id"),
        invalid("reserve account with braces", Reserve(reserve("{x}", "1")), "INVALID_ACCOUNT_ID", "account_id"),
        invalid("reserve empty account", Reserve(reserve("", "1")), "INVALID_ACCOUNT_ID", "account_id"),
        invalid("reserve account too long", Reserve(reserve(&long_id, "1")), "INVALID_ACCOUNT_ID", "account_id"),
        fails("reserve unknown tenant", Reserve(reserve("alice", "1")), Code::Unauthenticated, "MISSING_CREDENTIALS")
            .sent_by(Some("nosuch")),
        fails("reserve no key", Reserve(reserve("alice", "1")), Code::Unauthenticated, "MISSING_CREDENTIALS")
            .sent_by(None),
        fails(
            "reserve malformed tenant header",
            Reserve(reserve("alice", "1")),
            Code::Unauthenticated,
            "MISSING_CREDENTIALS",
        )
        .sent_by(Some("{acme}")),
        // ---- Reserve: ttl -----------------------------------------------
        invalid(
            "reserve ttl above 1h",
            Reserve(pb::ReserveRequest { ttl: dur(3601, 0), ..reserve("alice", "1") }),
            "INVALID_TTL",
            "ttl",
        ),
        invalid(
            "reserve ttl below min",
            Reserve(pb::ReserveRequest { ttl: dur(0, 50_000_000), ..reserve("alice", "1") }),
            "INVALID_TTL",
            "ttl",
        ),
        invalid(
            "reserve ttl zero",
            Reserve(pb::ReserveRequest { ttl: dur(0, 0), ..reserve("alice", "1") }),
            "INVALID_TTL",
            "ttl",
        ),
        invalid(
            "reserve ttl negative",
            Reserve(pb::ReserveRequest { ttl: dur(-1, 0), ..reserve("alice", "1") }),
            "INVALID_TTL",
            "ttl",
        ),
        invalid(
            "reserve ttl negative nanos",
            Reserve(pb::ReserveRequest { ttl: dur(5, -1), ..reserve("alice", "1") }),
            "INVALID_TTL",
            "ttl",
        ),
        // ---- Reserve: idempotency keys, labels, usage --------------------
        invalid(
            "reserve empty key",
            Reserve(pb::ReserveRequest { idempotency_key: String::new(), ..reserve("alice", "1") }),
            "INVALID_IDEMPOTENCY_KEY",
            "idempotency_key",
        ),
        invalid(
            "reserve key with space",
            Reserve(pb::ReserveRequest { idempotency_key: "run 1".into(), ..reserve("alice", "1") }),
            "INVALID_IDEMPOTENCY_KEY",
            "idempotency_key",
        ),
        invalid(
            "reserve key too long",
            Reserve(pb::ReserveRequest { idempotency_key: long_key.clone(), ..reserve("alice", "1") }),
            "INVALID_IDEMPOTENCY_KEY",
            "idempotency_key",
        ),
        invalid(
            "reserve key not ascii",
            Reserve(pb::ReserveRequest { idempotency_key: "clé".into(), ..reserve("alice", "1") }),
            "INVALID_IDEMPOTENCY_KEY",
            "idempotency_key",
        ),
        invalid(
            "reserve label key with space",
            Reserve(pb::ReserveRequest { labels: labels(&[("bad key", "v")]), ..reserve("alice", "1") }),
            "INVALID_LABELS",
            "labels[\"bad key\"]",
        ),
        invalid(
            "reserve label key with colon",
            Reserve(pb::ReserveRequest { labels: labels(&[("a:b", "v")]), ..reserve("alice", "1") }),
            "INVALID_LABELS",
            "labels[\"a:b\"]",
        ),
        invalid(
            "reserve empty label key",
            Reserve(pb::ReserveRequest { labels: labels(&[("", "v")]), ..reserve("alice", "1") }),
            "INVALID_LABELS",
            "labels[\"\"]",
        ),
        invalid(
            "reserve label key too long",
            Reserve(pb::ReserveRequest { labels: labels(&[(&"k".repeat(65), "v")]), ..reserve("alice", "1") }),
            "INVALID_LABELS",
            leak(format!("labels[{:?}]", "k".repeat(65))),
        ),
        invalid(
            "reserve label value too long",
            Reserve(pb::ReserveRequest { labels: labels(&[("k", &"v".repeat(257))]), ..reserve("alice", "1") }),
            "INVALID_LABELS",
            "labels[\"k\"]",
        ),
        invalid(
            "reserve 17 labels",
            Reserve(pb::ReserveRequest { labels: many_labels(17), ..reserve("alice", "1") }),
            "INVALID_LABELS",
            "labels",
        ),
        fails(
            "reserve usage",
            Reserve(pb::ReserveRequest {
                cost: Some(pb::reserve_request::Cost::Usage(usage())),
                ..reserve("alice", "1")
            }),
            Code::InvalidArgument,
            "NO_PRICE",
        ),
        // ---- Authorize ---------------------------------------------------
        invalid("authorize zero", Authorize(authorize("alice", "0")), "INVALID_AMOUNT", "amount"),
        invalid("authorize negative", Authorize(authorize("alice", "-1")), "INVALID_AMOUNT", "amount"),
        invalid(
            "authorize missing cost",
            Authorize(pb::AuthorizeRequest { account_id: "alice".into(), cost: None }),
            "INVALID_AMOUNT",
            "amount",
        ),
        invalid("authorize bad account", Authorize(authorize("a b", "1")), "INVALID_ACCOUNT_ID", "account_id"),
        fails("authorize unknown account", Authorize(authorize("ghost", "1")), Code::NotFound, "ACCOUNT_NOT_FOUND"),
        fails(
            "authorize usage",
            Authorize(pb::AuthorizeRequest {
                account_id: "alice".into(),
                cost: Some(pb::authorize_request::Cost::Usage(usage())),
            }),
            Code::InvalidArgument,
            "NO_PRICE",
        ),
        // ---- Commit (of the live hold unless said otherwise) ------------
        invalid("commit negative", Commit(commit(&f.hold, "-1")), "INVALID_AMOUNT", "amount"),
        invalid("commit 7 decimals", Commit(commit(&f.hold, "1.0000001")), "INVALID_AMOUNT", "amount"),
        invalid("commit exponent", Commit(commit(&f.hold, "1e3")), "INVALID_AMOUNT", "amount"),
        invalid("commit empty amount", Commit(commit(&f.hold, "")), "INVALID_AMOUNT", "amount"),
        invalid(
            "commit missing cost",
            Commit(pb::CommitRequest { cost: None, ..commit(&f.hold, "1") }),
            "INVALID_AMOUNT",
            "amount",
        ),
        invalid("commit above max", Commit(commit(&f.hold, "1000000001")), "INVALID_AMOUNT", "amount"),
        invalid(
            "commit reservation not a uuid",
            Commit(commit("not-a-uuid", "1")),
            "INVALID_RESERVATION_ID",
            "reservation_id",
        ),
        invalid("commit empty reservation", Commit(commit("", "1")), "INVALID_RESERVATION_ID", "reservation_id"),
        fails(
            "commit unknown reservation",
            Commit(commit(&unknown_uuid, "1")),
            Code::NotFound,
            "RESERVATION_NOT_FOUND",
        ),
        fails(
            "commit another tenant's reservation",
            Commit(commit(&f.other_hold, "1")),
            Code::NotFound,
            "RESERVATION_NOT_FOUND",
        ),
        fails(
            "commit acme's reservation as other",
            Commit(commit(&f.hold, "1")),
            Code::NotFound,
            "RESERVATION_NOT_FOUND",
        )
        .sent_by(Some(OTHER)),
        invalid(
            "commit empty key",
            Commit(pb::CommitRequest { idempotency_key: String::new(), ..commit(&f.hold, "1") }),
            "INVALID_IDEMPOTENCY_KEY",
            "idempotency_key",
        ),
        invalid(
            "commit 17 labels",
            Commit(pb::CommitRequest { labels: many_labels(17), ..commit(&f.hold, "1") }),
            "INVALID_LABELS",
            "labels",
        ),
        fails(
            "commit usage",
            Commit(pb::CommitRequest { cost: Some(pb::commit_request::Cost::Usage(usage())), ..commit(&f.hold, "1") }),
            Code::InvalidArgument,
            "NO_PRICE",
        ),
        fails("commit unknown tenant", Commit(commit(&f.hold, "1")), Code::Unauthenticated, "MISSING_CREDENTIALS")
            .sent_by(Some("nosuch")),
        // ---- Release -----------------------------------------------------
        invalid("release reservation not a uuid", Release(release("xyz")), "INVALID_RESERVATION_ID", "reservation_id"),
        invalid(
            "release key too long",
            Release(pb::ReleaseRequest { idempotency_key: long_key.clone(), ..release(&f.hold) }),
            "INVALID_IDEMPOTENCY_KEY",
            "idempotency_key",
        ),
        invalid(
            "release empty key",
            Release(pb::ReleaseRequest { idempotency_key: String::new(), ..release(&f.hold) }),
            "INVALID_IDEMPOTENCY_KEY",
            "idempotency_key",
        ),
        fails("release unknown reservation", Release(release(&unknown_uuid)), Code::NotFound, "RESERVATION_NOT_FOUND"),
        fails(
            "release another tenant's reservation",
            Release(release(&f.other_hold)),
            Code::NotFound,
            "RESERVATION_NOT_FOUND",
        ),
        fails("release no key", Release(release(&f.hold)), Code::Unauthenticated, "MISSING_CREDENTIALS").sent_by(None),
        // ---- Extend ------------------------------------------------------
        invalid(
            "extend ttl above 1h",
            Extend(pb::ExtendRequest { ttl: dur(7200, 0), ..extend(&f.hold, "1") }),
            "INVALID_TTL",
            "ttl",
        ),
        invalid(
            "extend ttl below min",
            Extend(pb::ExtendRequest { ttl: dur(0, 50_000_000), ..extend(&f.hold, "1") }),
            "INVALID_TTL",
            "ttl",
        ),
        invalid(
            "extend ttl negative",
            Extend(pb::ExtendRequest { ttl: dur(-30, 0), ..extend(&f.hold, "1") }),
            "INVALID_TTL",
            "ttl",
        ),
        invalid("extend negative", Extend(extend(&f.hold, "-1")), "INVALID_AMOUNT", "amount"),
        invalid("extend 7 decimals", Extend(extend(&f.hold, "0.1234567")), "INVALID_AMOUNT", "amount"),
        invalid(
            "extend missing amount",
            Extend(pb::ExtendRequest { more: None, ..extend(&f.hold, "1") }),
            "INVALID_AMOUNT",
            "amount",
        ),
        invalid(
            "extend reservation not a uuid",
            Extend(extend("123", "1")),
            "INVALID_RESERVATION_ID",
            "reservation_id",
        ),
        invalid(
            "extend key with space",
            Extend(pb::ExtendRequest { idempotency_key: "a b".into(), ..extend(&f.hold, "1") }),
            "INVALID_IDEMPOTENCY_KEY",
            "idempotency_key",
        ),
        fails(
            "extend unknown reservation",
            Extend(extend(&unknown_uuid, "1")),
            Code::NotFound,
            "RESERVATION_NOT_FOUND",
        ),
        fails(
            "extend usage",
            Extend(pb::ExtendRequest { more: Some(pb::extend_request::More::Usage(usage())), ..extend(&f.hold, "1") }),
            Code::InvalidArgument,
            "NO_PRICE",
        ),
        // ---- Charge ------------------------------------------------------
        invalid("charge negative", Charge(charge("alice", "-0.5")), "INVALID_AMOUNT", "amount"),
        invalid("charge 7 decimals", Charge(charge("alice", "0.1234567")), "INVALID_AMOUNT", "amount"),
        invalid("charge exponent", Charge(charge("alice", "2E2")), "INVALID_AMOUNT", "amount"),
        invalid(
            "charge missing cost",
            Charge(pb::ChargeRequest { cost: None, ..charge("alice", "1") }),
            "INVALID_AMOUNT",
            "amount",
        ),
        invalid("charge above max", Charge(charge("alice", "1000000000.5")), "INVALID_AMOUNT", "amount"),
        fails("charge unknown account", Charge(charge("ghost", "1")), Code::NotFound, "ACCOUNT_NOT_FOUND"),
        fails("charge another tenant's account", Charge(charge("outsider", "1")), Code::NotFound, "ACCOUNT_NOT_FOUND"),
        fails("charge acme's account as other", Charge(charge("bob", "1")), Code::NotFound, "ACCOUNT_NOT_FOUND")
            .sent_by(Some(OTHER)),
        invalid("charge account with braces", Charge(charge("{x}", "1")), "INVALID_ACCOUNT_ID", "account_id"),
        invalid(
            "charge empty key",
            Charge(pb::ChargeRequest { idempotency_key: String::new(), ..charge("alice", "1") }),
            "INVALID_IDEMPOTENCY_KEY",
            "idempotency_key",
        ),
        invalid(
            "charge bad label key",
            Charge(pb::ChargeRequest { labels: labels(&[("{x}", "v")]), ..charge("alice", "1") }),
            "INVALID_LABELS",
            "labels[\"{x}\"]",
        ),
        fails(
            "charge usage",
            Charge(pb::ChargeRequest { cost: Some(pb::charge_request::Cost::Usage(usage())), ..charge("alice", "1") }),
            Code::InvalidArgument,
            "NO_PRICE",
        ),
        // ---- GetBalance --------------------------------------------------
        invalid("balance account with space", GetBalance(balance("a b")), "INVALID_ACCOUNT_ID", "account_id"),
        fails("balance unknown account", GetBalance(balance("ghost")), Code::NotFound, "ACCOUNT_NOT_FOUND"),
        fails("balance another tenant's account", GetBalance(balance("outsider")), Code::NotFound, "ACCOUNT_NOT_FOUND"),
        fails("balance acme's account as other", GetBalance(balance("org")), Code::NotFound, "ACCOUNT_NOT_FOUND")
            .sent_by(Some(OTHER)),
        fails("balance unknown tenant", GetBalance(balance("org")), Code::Unauthenticated, "MISSING_CREDENTIALS")
            .sent_by(Some("nosuch")),
        // ---- CreateTenant, GetTenant -------------------------------------
        invalid(
            "create tenant empty id",
            CreateTenant(pb::CreateTenantRequest::default()),
            "INVALID_TENANT_ID",
            "tenant_id",
        ),
        invalid(
            "create tenant id with space",
            CreateTenant(pb::CreateTenantRequest { tenant_id: "new tenant".into(), ..Default::default() }),
            "INVALID_TENANT_ID",
            "tenant_id",
        ),
        invalid(
            "create tenant lowercase currency",
            CreateTenant(pb::CreateTenantRequest {
                tenant_id: "new1".into(),
                currency: "usd".into(),
                ..Default::default()
            }),
            "INVALID_ARGUMENT",
            "currency",
        ),
        invalid(
            "create tenant zero credit value",
            CreateTenant(pb::CreateTenantRequest {
                tenant_id: "new2".into(),
                credit_value: "0".into(),
                ..Default::default()
            }),
            "INVALID_AMOUNT",
            "credit_value",
        ),
        invalid(
            "create tenant exponent credit value",
            CreateTenant(pb::CreateTenantRequest {
                tenant_id: "new3".into(),
                credit_value: "1e-2".into(),
                ..Default::default()
            }),
            "INVALID_AMOUNT",
            "credit_value",
        ),
        invalid(
            "create tenant zone with space",
            CreateTenant(pb::CreateTenantRequest {
                tenant_id: "new4".into(),
                time_zone: "Europe/ Paris".into(),
                ..Default::default()
            }),
            "INVALID_ARGUMENT",
            "time_zone",
        ),
        fails(
            "get unknown tenant",
            GetTenant(pb::GetTenantRequest { tenant_id: "nosuch".into() }),
            Code::NotFound,
            "TENANT_NOT_FOUND",
        ),
        // ---- CreateAccount, UpdateAccount, GetAccount, ListAccounts ------
        invalid(
            "create account id with braces",
            CreateAccount(create_account("{x}", "")),
            "INVALID_ACCOUNT_ID",
            "account_id",
        ),
        invalid(
            "create account id with space",
            CreateAccount(create_account("a b", "")),
            "INVALID_ACCOUNT_ID",
            "account_id",
        ),
        invalid("create account empty id", CreateAccount(create_account("", "")), "INVALID_ACCOUNT_ID", "account_id"),
        invalid(
            "create account bad parent id",
            CreateAccount(create_account("new-a", "p q")),
            "INVALID_ACCOUNT_ID",
            "parent_id",
        ),
        fails(
            "create account unknown parent",
            CreateAccount(create_account("new-b", "ghost")),
            Code::NotFound,
            "PARENT_NOT_FOUND",
        ),
        fails(
            "create account under another tenant's account",
            CreateAccount(create_account("new-c", "outsider")),
            Code::NotFound,
            "PARENT_NOT_FOUND",
        ),
        fails(
            "create account under acme's account as other",
            CreateAccount(create_account("new-d", "org")),
            Code::NotFound,
            "PARENT_NOT_FOUND",
        )
        .sent_by(Some(OTHER)),
        invalid(
            "create account negative cap",
            CreateAccount(pb::CreateAccountRequest { cap: "-1".into(), ..create_account("new-e", "org") }),
            "INVALID_AMOUNT",
            "cap",
        ),
        invalid(
            "create account zero cap",
            CreateAccount(pb::CreateAccountRequest { cap: "0".into(), ..create_account("new-f", "org") }),
            "INVALID_AMOUNT",
            "cap",
        ),
        invalid(
            "create account unknown kind",
            CreateAccount(pb::CreateAccountRequest { kind: 99, ..create_account("new-g", "org") }),
            "INVALID_ARGUMENT",
            "kind",
        ),
        invalid("create account too deep", CreateAccount(create_account("d9", "d8")), "TREE_TOO_DEEP", "parent_id"),
        fails(
            "create account unknown tenant",
            CreateAccount(create_account("new-h", "")),
            Code::Unauthenticated,
            "MISSING_CREDENTIALS",
        )
        .sent_by(Some("nosuch")),
        fails(
            "create account no key",
            CreateAccount(create_account("new-i", "")),
            Code::Unauthenticated,
            "MISSING_CREDENTIALS",
        )
        .sent_by(None),
        fails(
            "update unknown account",
            UpdateAccount(pb::UpdateAccountRequest {
                account_id: "ghost".into(),
                suspended: Some(true),
                ..Default::default()
            }),
            Code::NotFound,
            "ACCOUNT_NOT_FOUND",
        ),
        fails(
            "suspend another tenant's account",
            UpdateAccount(pb::UpdateAccountRequest {
                account_id: "outsider".into(),
                suspended: Some(true),
                ..Default::default()
            }),
            Code::NotFound,
            "ACCOUNT_NOT_FOUND",
        ),
        invalid(
            "update cap exponent",
            UpdateAccount(pb::UpdateAccountRequest {
                account_id: "bob".into(),
                cap: Some("1e3".into()),
                suspended: Some(true),
                ..Default::default()
            }),
            "INVALID_AMOUNT",
            "cap",
        ),
        invalid(
            "update cap zero",
            UpdateAccount(pb::UpdateAccountRequest {
                account_id: "bob".into(),
                cap: Some("0".into()),
                ..Default::default()
            }),
            "INVALID_AMOUNT",
            "cap",
        ),
        fails(
            "get another tenant's account",
            GetAccount(pb::GetAccountRequest { account_id: "outsider".into() }),
            Code::NotFound,
            "ACCOUNT_NOT_FOUND",
        ),
        invalid(
            "get account bad id",
            GetAccount(pb::GetAccountRequest { account_id: "{x}".into() }),
            "INVALID_ACCOUNT_ID",
            "account_id",
        ),
        invalid(
            "list accounts page size too big",
            ListAccounts(pb::ListAccountsRequest { page_size: 1001, ..Default::default() }),
            "INVALID_ARGUMENT",
            "page_size",
        ),
        invalid(
            "list accounts negative page size",
            ListAccounts(pb::ListAccountsRequest { page_size: -1, ..Default::default() }),
            "INVALID_ARGUMENT",
            "page_size",
        ),
        // ---- CreateGrant -------------------------------------------------
        invalid(
            "grant category unspecified",
            CreateGrant(pb::CreateGrantRequest {
                category: GrantCategory::Unspecified as i32,
                ..create_grant("bob", "10")
            }),
            "INVALID_ARGUMENT",
            "category",
        ),
        invalid(
            "grant unknown category",
            CreateGrant(pb::CreateGrantRequest { category: 42, ..create_grant("bob", "10") }),
            "INVALID_ARGUMENT",
            "category",
        ),
        invalid("grant zero", CreateGrant(create_grant("bob", "0")), "INVALID_AMOUNT", "amount"),
        invalid("grant negative", CreateGrant(create_grant("bob", "-10")), "INVALID_AMOUNT", "amount"),
        invalid("grant empty amount", CreateGrant(create_grant("bob", "")), "INVALID_AMOUNT", "amount"),
        invalid("grant 7 decimals", CreateGrant(create_grant("bob", "10.0000001")), "INVALID_AMOUNT", "amount"),
        invalid("grant exponent", CreateGrant(create_grant("bob", "1e3")), "INVALID_AMOUNT", "amount"),
        invalid("grant above max", CreateGrant(create_grant("bob", "1000000000.000001")), "INVALID_AMOUNT", "amount"),
        invalid(
            "grant expires before effective",
            CreateGrant(pb::CreateGrantRequest {
                effective_at: ts(now + 86_400, 0),
                expires_at: ts(now + 3_600, 0),
                ..create_grant("bob", "10")
            }),
            "INVALID_ARGUMENT",
            "expires_at",
        ),
        invalid(
            "grant expires at effective",
            CreateGrant(pb::CreateGrantRequest {
                effective_at: ts(now + 86_400, 0),
                expires_at: ts(now + 86_400, 0),
                ..create_grant("bob", "10")
            }),
            "INVALID_ARGUMENT",
            "expires_at",
        ),
        invalid(
            "grant already expired",
            CreateGrant(pb::CreateGrantRequest { expires_at: ts(now - 60, 0), ..create_grant("bob", "10") }),
            "INVALID_ARGUMENT",
            "expires_at",
        ),
        invalid(
            "grant effective nanos out of range",
            CreateGrant(pb::CreateGrantRequest { effective_at: ts(now, 1_000_000_000), ..create_grant("bob", "10") }),
            "INVALID_ARGUMENT",
            "effective_at",
        ),
        invalid(
            "grant description too long",
            CreateGrant(pb::CreateGrantRequest { description: "d".repeat(513), ..create_grant("bob", "10") }),
            "INVALID_ARGUMENT",
            "description",
        ),
        invalid(
            "grant empty key",
            CreateGrant(pb::CreateGrantRequest { idempotency_key: String::new(), ..create_grant("bob", "10") }),
            "INVALID_IDEMPOTENCY_KEY",
            "idempotency_key",
        ),
        invalid("grant bad account", CreateGrant(create_grant("a b", "10")), "INVALID_ACCOUNT_ID", "account_id"),
        fails("grant unknown account", CreateGrant(create_grant("ghost", "10")), Code::NotFound, "ACCOUNT_NOT_FOUND"),
        fails(
            "grant to another tenant's account",
            CreateGrant(create_grant("outsider", "10")),
            Code::NotFound,
            "ACCOUNT_NOT_FOUND",
        ),
        fails(
            "grant to acme's account as other",
            CreateGrant(create_grant("bob", "10")),
            Code::NotFound,
            "ACCOUNT_NOT_FOUND",
        )
        .sent_by(Some(OTHER)),
        // ---- VoidGrant, GetGrant, ListGrants -----------------------------
        invalid("void empty reason", VoidGrant(void_grant(&f.grant, "")), "INVALID_ARGUMENT", "reason"),
        invalid("void blank reason", VoidGrant(void_grant(&f.grant, "   ")), "INVALID_ARGUMENT", "reason"),
        invalid(
            "void reason too long",
            VoidGrant(void_grant(&f.grant, &"r".repeat(513))),
            "INVALID_ARGUMENT",
            "reason",
        ),
        invalid("void grant not a uuid", VoidGrant(void_grant("nope", "test")), "INVALID_GRANT_ID", "grant_id"),
        invalid("void empty grant id", VoidGrant(void_grant("", "test")), "INVALID_GRANT_ID", "grant_id"),
        invalid(
            "void empty key",
            VoidGrant(pb::VoidGrantRequest { idempotency_key: String::new(), ..void_grant(&f.grant, "test") }),
            "INVALID_IDEMPOTENCY_KEY",
            "idempotency_key",
        ),
        fails("void unknown grant", VoidGrant(void_grant(&unknown_uuid, "test")), Code::NotFound, "GRANT_NOT_FOUND"),
        fails(
            "void another tenant's grant",
            VoidGrant(void_grant(&f.other_grant, "test")),
            Code::NotFound,
            "GRANT_NOT_FOUND",
        ),
        fails("void acme's grant as other", VoidGrant(void_grant(&f.grant, "test")), Code::NotFound, "GRANT_NOT_FOUND")
            .sent_by(Some(OTHER)),
        invalid(
            "get grant not a uuid",
            GetGrant(pb::GetGrantRequest { grant_id: "g-1".into() }),
            "INVALID_GRANT_ID",
            "grant_id",
        ),
        fails(
            "get another tenant's grant",
            GetGrant(pb::GetGrantRequest { grant_id: f.other_grant.clone() }),
            Code::NotFound,
            "GRANT_NOT_FOUND",
        ),
        fails(
            "list grants of unknown account",
            ListGrants(pb::ListGrantsRequest { account_id: "ghost".into(), include_inactive: true }),
            Code::NotFound,
            "ACCOUNT_NOT_FOUND",
        ),
        fails(
            "list grants of acme's account as other",
            ListGrants(pb::ListGrantsRequest { account_id: "bob".into(), include_inactive: true }),
            Code::NotFound,
            "ACCOUNT_NOT_FOUND",
        )
        .sent_by(Some(OTHER)),
        invalid(
            "list grants bad account",
            ListGrants(pb::ListGrantsRequest { account_id: "a b".into(), include_inactive: false }),
            "INVALID_ACCOUNT_ID",
            "account_id",
        ),
        // ---- One rule for free text: no control characters ---------------
        invalid(
            "reserve NUL in a label value",
            Reserve(pb::ReserveRequest { labels: labels(&[("k", NUL)]), ..reserve("alice", "1") }),
            "INVALID_LABELS",
            "labels[\"k\"]",
        ),
        invalid(
            "reserve newline in a label value",
            Reserve(pb::ReserveRequest { labels: labels(&[("k", "a\nb")]), ..reserve("alice", "1") }),
            "INVALID_LABELS",
            "labels[\"k\"]",
        ),
        invalid(
            "commit NUL in a label value",
            Commit(pb::CommitRequest { labels: labels(&[("k", NUL)]), ..commit(&f.hold, "1") }),
            "INVALID_LABELS",
            "labels[\"k\"]",
        ),
        invalid(
            "charge NUL in a label value",
            Charge(pb::ChargeRequest { labels: labels(&[("k", NUL)]), ..charge("alice", "1") }),
            "INVALID_LABELS",
            "labels[\"k\"]",
        ),
        invalid(
            "charge DEL in a label value",
            Charge(pb::ChargeRequest { labels: labels(&[("k", "a\u{7f}")]), ..charge("alice", "1") }),
            "INVALID_LABELS",
            "labels[\"k\"]",
        ),
        invalid(
            "create tenant NUL in display_name",
            CreateTenant(pb::CreateTenantRequest {
                tenant_id: "t-nul".into(),
                display_name: NUL.into(),
                ..Default::default()
            }),
            "INVALID_ARGUMENT",
            "display_name",
        ),
        invalid(
            "create tenant display_name too long",
            CreateTenant(pb::CreateTenantRequest {
                tenant_id: "t-long".into(),
                display_name: "d".repeat(257),
                ..Default::default()
            }),
            "INVALID_ARGUMENT",
            "display_name",
        ),
        invalid(
            "create account NUL in display_name",
            CreateAccount(pb::CreateAccountRequest { display_name: NUL.into(), ..create_account("kid", "org") }),
            "INVALID_ARGUMENT",
            "display_name",
        ),
        invalid(
            "create account NUL in tier",
            CreateAccount(pb::CreateAccountRequest { tier: NUL.into(), ..create_account("kid", "org") }),
            "INVALID_ARGUMENT",
            "tier",
        ),
        invalid(
            "update account NUL in display_name",
            UpdateAccount(pb::UpdateAccountRequest {
                account_id: "bob".into(),
                display_name: Some(NUL.into()),
                ..Default::default()
            }),
            "INVALID_ARGUMENT",
            "display_name",
        ),
        invalid(
            "list accounts NUL in page_token",
            ListAccounts(pb::ListAccountsRequest { page_token: NUL.into(), ..Default::default() }),
            "INVALID_ARGUMENT",
            "page_token",
        ),
        invalid(
            "grant NUL in description",
            CreateGrant(pb::CreateGrantRequest { description: NUL.into(), ..create_grant("bob", "1") }),
            "INVALID_ARGUMENT",
            "description",
        ),
        invalid(
            "grant NUL in reason",
            CreateGrant(pb::CreateGrantRequest { reason: NUL.into(), ..create_grant("bob", "1") }),
            "INVALID_ARGUMENT",
            "reason",
        ),
        invalid(
            "grant NUL in actor",
            CreateGrant(pb::CreateGrantRequest { actor: NUL.into(), ..create_grant("bob", "1") }),
            "INVALID_ARGUMENT",
            "actor",
        ),
        invalid("void NUL in reason", VoidGrant(void_grant(&f.grant, NUL)), "INVALID_ARGUMENT", "reason"),
        invalid(
            "allowance NUL in description",
            CreateAllowance(pb::CreateAllowanceRequest {
                account_id: "bob".into(),
                amount: "5".into(),
                description: NUL.into(),
                idempotency_key: key(),
                ..Default::default()
            }),
            "INVALID_ARGUMENT",
            "description",
        ),
        invalid(
            "adjust NUL in reason",
            AdjustBalance(pb::AdjustBalanceRequest {
                account_id: "bob".into(),
                amount: "5".into(),
                reason: NUL.into(),
                actor: "support".into(),
                refund: false,
                idempotency_key: key(),
            }),
            "INVALID_ARGUMENT",
            "reason",
        ),
        invalid(
            "adjust NUL in actor",
            AdjustBalance(pb::AdjustBalanceRequest {
                account_id: "bob".into(),
                amount: "-5".into(),
                reason: "fix".into(),
                actor: NUL.into(),
                refund: false,
                idempotency_key: key(),
            }),
            "INVALID_ARGUMENT",
            "actor",
        ),
        invalid(
            "request change NUL in note",
            RequestAccountChange(pb::RequestAccountChangeRequest {
                account_id: "bob".into(),
                pool_access: Some(true),
                note: NUL.into(),
                idempotency_key: key(),
                ..Default::default()
            }),
            "INVALID_ARGUMENT",
            "note",
        ),
        invalid(
            "decide change NUL in note",
            DecideAccountChange(pb::DecideAccountChangeRequest {
                change_id: unknown_uuid.clone(),
                approve: true,
                note: NUL.into(),
            }),
            "INVALID_ARGUMENT",
            "note",
        ),
        invalid(
            "api key NUL in name",
            CreateApiKey(pb::CreateApiKeyRequest {
                tenant_id: TENANT.into(),
                role: pb::ApiKeyRole::Runtime as i32,
                name: NUL.into(),
                idempotency_key: key(),
            }),
            "INVALID_ARGUMENT",
            "name",
        ),
        invalid(
            "webhook NUL in url",
            SetWebhook(pb::SetWebhookRequest {
                url: "https://hooks.example.com/a\u{0}b".into(),
                secret: "s".repeat(16),
                max_attempts: 0,
            }),
            "INVALID_ARGUMENT",
            "url",
        ),
        invalid(
            "webhook NUL in secret",
            SetWebhook(pb::SetWebhookRequest {
                url: "https://203.0.113.10/a".into(),
                secret: format!("{}{NUL}", "s".repeat(16)),
                max_attempts: 0,
            }),
            "INVALID_ARGUMENT",
            "secret",
        ),
        // ---- One amount grammar: digits on both sides of the point -------
        invalid("reserve trailing point", Reserve(reserve("alice", "1.")), "INVALID_AMOUNT", "amount"),
        invalid("reserve leading point", Reserve(reserve("alice", ".5")), "INVALID_AMOUNT", "amount"),
        invalid("charge leading point", Charge(charge("alice", ".5")), "INVALID_AMOUNT", "amount"),
        invalid("grant trailing point", CreateGrant(create_grant("bob", "10.")), "INVALID_AMOUNT", "amount"),
        invalid(
            "reserve usage quantity with a trailing point",
            Reserve(pb::ReserveRequest {
                cost: Some(pb::reserve_request::Cost::Usage(pb::Usage {
                    items: vec![pb::UsageItem { meter: "tasks".into(), model: String::new(), quantity: "1.".into() }],
                })),
                ..reserve("alice", "1")
            }),
            "INVALID_USAGE",
            "usage.items[0].quantity",
        ),
        // ---- Sub-fields of periods -----------------------------------------
        invalid(
            "create account unknown period.time_zone",
            CreateAccount(pb::CreateAccountRequest {
                period: Some(pb::BillingPeriod {
                    kind: pb::PeriodKind::Monthly as i32,
                    time_zone: "Mars/Olympus".into(),
                    ..Default::default()
                }),
                ..create_account("kid", "org")
            }),
            "INVALID_PERIOD",
            "period.time_zone",
        ),
        invalid(
            "create account trial ending before it starts",
            CreateAccount(pb::CreateAccountRequest {
                period: Some(pb::BillingPeriod {
                    kind: pb::PeriodKind::Trial as i32,
                    anchor: ts(now, 0),
                    trial_end: ts(now - 86_400, 0),
                    ..Default::default()
                }),
                ..create_account("kid", "org")
            }),
            "INVALID_PERIOD",
            "period.trial_end",
        ),
        invalid(
            "create tenant unknown default_period.time_zone",
            CreateTenant(pb::CreateTenantRequest {
                tenant_id: "t-zone".into(),
                default_period: Some(pb::BillingPeriod {
                    kind: pb::PeriodKind::Monthly as i32,
                    time_zone: "Nowhere/Town".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            "INVALID_PERIOD",
            "default_period.time_zone",
        ),
        // ---- Authorization before validation -------------------------------
        fails(
            "get tenant with a runtime key and an empty id",
            GetTenant(pb::GetTenantRequest { tenant_id: String::new() }),
            Code::PermissionDenied,
            "WRONG_ROLE",
        )
        .sent_by(Some(RUNTIME)),
        fails(
            "create account with a runtime key and a bad id",
            CreateAccount(create_account("a b", "org")),
            Code::PermissionDenied,
            "WRONG_ROLE",
        )
        .sent_by(Some(RUNTIME)),
        // ---- Wire-level garbage and size -----------------------------------
        invalid(
            "reserve account_id sent as a varint",
            Raw { path: "/creditd.v1.CreditService/Reserve", bytes: vec![0x08, 0x01] },
            "MALFORMED_REQUEST",
            "account_id",
        ),
        invalid(
            "charge with a truncated string",
            Raw { path: "/creditd.v1.CreditService/Charge", bytes: vec![0x0a, 0x05, b'a'] },
            "MALFORMED_REQUEST",
            "account_id",
        ),
        invalid(
            "commit with invalid UTF-8 in a string",
            Raw { path: "/creditd.v1.CreditService/Commit", bytes: vec![0x0a, 0x02, 0xff, 0xfe] },
            "MALFORMED_REQUEST",
            "reservation_id",
        ),
        fails(
            "create grant over the message size limit",
            Raw { path: "/creditd.v1.AdminService/CreateGrant", bytes: oversize() },
            Code::ResourceExhausted,
            "MESSAGE_TOO_LARGE",
        ),
    ]
}

/// Everything a refused call could have changed.
#[derive(Clone, Debug, PartialEq)]
struct Snapshot {
    balances: Vec<(&'static str, pb::GetBalanceResponse)>,
    grants: Vec<(&'static str, Vec<pb::Grant>)>,
    accounts: Vec<(&'static str, Vec<pb::Account>)>,
    tenants: Vec<String>,
    usage_events: i64,
    ledger_rows: i64,
    /// Names of the idempotency records in Redis.
    idempotency_records: Vec<String>,
    /// Every hold hash in Redis (live holds and tombstones), field by field.
    holds: Vec<(String, Vec<(String, String)>)>,
    /// Row count and a digest of the content of tables an admin call
    /// writes (api_keys, allowances, account_changes, adjustments,
    /// webhooks, price_books, grants, tenants, accounts).
    other_rows: Vec<(&'static str, i64, String)>,
}

const ACME_ACCOUNTS: [&str; 5] = ["org", "alice", "bob", "d1", "d8"];

async fn snapshot(app: &TestApp) -> Snapshot {
    let mut balances = Vec::new();
    let mut grants = Vec::new();
    let accounts_of = ACME_ACCOUNTS.iter().map(|a| (TENANT, *a)).chain([(OTHER, "outsider")]);
    for (tenant, account) in accounts_of {
        balances.push((account, app.balance_in(tenant, account).await));
        let listed = app
            .admin
            .clone()
            .list_grants(req(tenant, pb::ListGrantsRequest { account_id: account.into(), include_inactive: true }))
            .await
            .expect("list grants")
            .into_inner()
            .grants;
        grants.push((account, listed));
    }
    let mut accounts = Vec::new();
    for tenant in [TENANT, OTHER] {
        let listed = app
            .admin
            .clone()
            .list_accounts(req(tenant, pb::ListAccountsRequest { page_size: 1000, ..Default::default() }))
            .await
            .expect("list accounts")
            .into_inner()
            .accounts;
        accounts.push((tenant, listed));
    }
    let pg = app.backends.pg().await;
    let tenants: Vec<String> =
        sqlx::query_scalar("SELECT tenant_id FROM tenants ORDER BY tenant_id").fetch_all(&pg).await.unwrap();
    let usage_events: i64 = sqlx::query_scalar("SELECT count(*) FROM usage_events").fetch_one(&pg).await.unwrap();
    let ledger_rows: i64 = sqlx::query_scalar("SELECT count(*) FROM ledger").fetch_one(&pg).await.unwrap();
    let mut other_rows = Vec::new();
    for table in [
        "api_keys",
        "allowances",
        "account_changes",
        "adjustments",
        "webhooks",
        "price_books",
        "grants",
        "tenants",
        "accounts",
    ] {
        let (n, digest): (i64, String) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT count(*), md5(coalesce(string_agg(to_jsonb(t)::text, '|' ORDER BY to_jsonb(t)::text), '')) \
             FROM {table} t"
        )))
        .fetch_one(&pg)
        .await
        .unwrap();
        other_rows.push((table, n, digest));
    }
    pg.close().await;
    let mut idempotency_records = redis_keys(app, &format!("{}*:i:*", app.backends.key_prefix)).await;
    idempotency_records.sort();
    let mut hold_keys = redis_keys(app, &format!("{}*:h:*", app.backends.key_prefix)).await;
    hold_keys.sort();
    let mut redis = app.backends.redis().await;
    let mut holds = Vec::new();
    for key in hold_keys {
        let mut fields: Vec<(String, String)> =
            redis::cmd("HGETALL").arg(&key).query_async(&mut redis).await.expect("hgetall");
        fields.sort();
        holds.push((key, fields));
    }
    Snapshot { balances, grants, accounts, tenants, usage_events, ledger_rows, idempotency_records, holds, other_rows }
}

async fn redis_keys(app: &TestApp, pattern: &str) -> Vec<String> {
    let mut redis = app.backends.redis().await;
    let mut keys = Vec::new();
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
        keys.extend(batch);
        if next == 0 {
            return keys;
        }
        cursor = next;
    }
}

fn panic_text(panic: Box<dyn std::any::Any + Send>) -> String {
    match panic.downcast::<String>() {
        Ok(text) => *text,
        Err(panic) => panic.downcast_ref::<&str>().map(|s| s.to_string()).unwrap_or_else(|| "panic".into()),
    }
}

#[tokio::test]
async fn malformed_requests_are_refused_and_change_nothing() {
    let (app, f) = fixture().await;
    let rows = table(&f);
    assert!(rows.len() >= 40, "the table has {} rows", rows.len());
    let before = snapshot(&app).await;

    let mut failures = Vec::new();
    let total = rows.len();
    for row in rows {
        let Row { name, tenant, call, code, reason, field } = row;
        let described = format!("{call:?}");
        match send(&app, tenant, call).await {
            Ok(response) => {
                failures.push(format!("{name}: expected {code:?} {reason}, got OK {response} for {described}"))
            }
            Err(status) => {
                let checked =
                    std::panic::catch_unwind(AssertUnwindSafe(|| assert_status(&status, code, reason, field)));
                if let Err(panic) = checked {
                    failures.push(format!("{name}: {}", panic_text(panic)));
                }
            }
        }
    }
    let after = snapshot(&app).await;
    let changed = if before == after { "nothing changed" } else { "and the state CHANGED" };
    assert!(failures.is_empty(), "{} of {total} rows failed, {changed}:\n{}", failures.len(), failures.join("\n"));

    assert_eq!(before.tenants, after.tenants, "no tenant was created");
    assert_eq!(before.accounts, after.accounts, "no account was created or changed");
    assert_eq!(before.balances, after.balances, "no balance changed");
    assert_eq!(before.grants, after.grants, "no grant was created or changed");
    assert_eq!(before, after);

    // The holds the table aimed at are intact and settle normally.
    let c = app.commit(&f.hold, "15", "after-table").await.unwrap();
    assert_eq!((c.amount.as_str(), c.released.as_str(), c.available.as_str()), ("15", "25", "985"));
}

/// A message over the limit is answered with the limit, before anything
/// is decoded.
#[tokio::test]
async fn an_oversize_message_is_told_the_limit() {
    let (app, _) = fixture().await;
    let status =
        send(&app, Some(TENANT), Call::Raw { path: "/creditd.v1.AdminService/CreateGrant", bytes: oversize() })
            .await
            .expect_err("over the limit");
    assert_status(&status, Code::ResourceExhausted, "MESSAGE_TOO_LARGE", None);
    assert!(status.message().contains("4194304 bytes"), "{status:?}");
    // Exactly at the limit is read (and then judged on its content).
    let mut at_limit = oversize();
    at_limit.truncate(MAX_MESSAGE);
    let status = send(&app, Some(TENANT), Call::Raw { path: "/creditd.v1.AdminService/CreateGrant", bytes: at_limit })
        .await
        .expect_err("a truncated message");
    assert_status(&status, Code::InvalidArgument, "MALFORMED_REQUEST", Some("description"));
}

/// Zero is not an amount to reserve, authorize or grant; it is a valid
/// actual cost (Commit, Charge) and a valid extension ("only push the expiry").
#[tokio::test]
async fn zero_is_refused_where_a_positive_amount_is_required() {
    let (app, f) = fixture().await;
    let e = app.reserve("alice", "0", "z-r").await.unwrap_err();
    assert_status(&e, Code::InvalidArgument, "INVALID_AMOUNT", Some("amount"));
    let e = send(&app, Some(TENANT), Call::Authorize(authorize("alice", "0"))).await.unwrap_err();
    assert_status(&e, Code::InvalidArgument, "INVALID_AMOUNT", Some("amount"));
    let e = send(&app, Some(TENANT), Call::CreateGrant(create_grant("bob", "0"))).await.unwrap_err();
    assert_status(&e, Code::InvalidArgument, "INVALID_AMOUNT", Some("amount"));
    assert_eq!(app.available("alice").await, "960");

    // The largest accepted amount is accepted (and simply not affordable).
    let max = app
        .credit
        .clone()
        .authorize(req(TENANT, authorize("alice", "1000000000")))
        .await
        .expect("1000000000 is a valid amount")
        .into_inner();
    assert!(!max.granted);

    let extended = app
        .credit
        .clone()
        .extend(req(TENANT, pb::ExtendRequest { ttl: dur(3600, 0), ..extend(&f.hold, "0") }))
        .await
        .expect("extend by 0")
        .into_inner();
    assert!(extended.granted);
    assert_eq!(extended.amount, "40");

    let charged = app.charge("alice", "0", "z-charge").await.expect("charge 0");
    assert_eq!((charged.amount.as_str(), charged.overdraft.as_str()), ("0", "0"));
    let committed = app.commit(&f.hold, "0", "z-commit").await.expect("commit 0");
    assert_eq!((committed.amount.as_str(), committed.released.as_str()), ("0", "40"));
    assert_eq!(committed.available, "1000");
    let b = app.balance("alice").await;
    assert_eq!(b.available, "1000");
    assert_eq!(b.levels[0].cap_used, "0");
}

/// Another tenant's account, grant or reservation is answered exactly like
/// one that does not exist: nothing tells a caller it is there.
#[tokio::test]
async fn another_tenants_things_look_like_missing_ones() {
    let (app, f) = fixture().await;
    let missing_uuid = uuid::Uuid::now_v7().to_string();
    // (tenant asking, call on the other tenant's thing, its id, the same
    // call on a thing that does not exist, that id)
    type Probe = (&'static str, Call, String, Call, String);
    let probes: Vec<Probe> = vec![
        (OTHER, Call::GetBalance(balance("alice")), "alice".into(), Call::GetBalance(balance("ghost")), "ghost".into()),
        (
            TENANT,
            Call::GetBalance(balance("outsider")),
            "outsider".into(),
            Call::GetBalance(balance("ghost")),
            "ghost".into(),
        ),
        (
            OTHER,
            Call::GetAccount(pb::GetAccountRequest { account_id: "bob".into() }),
            "bob".into(),
            Call::GetAccount(pb::GetAccountRequest { account_id: "ghost".into() }),
            "ghost".into(),
        ),
        (
            OTHER,
            Call::ListGrants(pb::ListGrantsRequest { account_id: "bob".into(), include_inactive: true }),
            "bob".into(),
            Call::ListGrants(pb::ListGrantsRequest { account_id: "ghost".into(), include_inactive: true }),
            "ghost".into(),
        ),
        (OTHER, Call::Reserve(reserve("bob", "1")), "bob".into(), Call::Reserve(reserve("ghost", "1")), "ghost".into()),
        (OTHER, Call::Charge(charge("bob", "1")), "bob".into(), Call::Charge(charge("ghost", "1")), "ghost".into()),
        (
            OTHER,
            Call::Authorize(authorize("bob", "1")),
            "bob".into(),
            Call::Authorize(authorize("ghost", "1")),
            "ghost".into(),
        ),
        (
            OTHER,
            Call::CreateGrant(create_grant("bob", "1")),
            "bob".into(),
            Call::CreateGrant(create_grant("ghost", "1")),
            "ghost".into(),
        ),
        (
            OTHER,
            Call::CreateAccount(create_account("kid", "org")),
            "org".into(),
            Call::CreateAccount(create_account("kid", "ghost")),
            "ghost".into(),
        ),
        (
            OTHER,
            Call::UpdateAccount(pb::UpdateAccountRequest {
                account_id: "bob".into(),
                suspended: Some(true),
                ..Default::default()
            }),
            "bob".into(),
            Call::UpdateAccount(pb::UpdateAccountRequest {
                account_id: "ghost".into(),
                suspended: Some(true),
                ..Default::default()
            }),
            "ghost".into(),
        ),
        (
            OTHER,
            Call::GetGrant(pb::GetGrantRequest { grant_id: f.grant.clone() }),
            f.grant.clone(),
            Call::GetGrant(pb::GetGrantRequest { grant_id: missing_uuid.clone() }),
            missing_uuid.clone(),
        ),
        (
            OTHER,
            Call::VoidGrant(void_grant(&f.grant, "x")),
            f.grant.clone(),
            Call::VoidGrant(void_grant(&missing_uuid, "x")),
            missing_uuid.clone(),
        ),
        (
            OTHER,
            Call::Commit(commit(&f.hold, "1")),
            f.hold.clone(),
            Call::Commit(commit(&missing_uuid, "1")),
            missing_uuid.clone(),
        ),
        (
            OTHER,
            Call::Release(release(&f.hold)),
            f.hold.clone(),
            Call::Release(release(&missing_uuid)),
            missing_uuid.clone(),
        ),
        (
            OTHER,
            Call::Extend(extend(&f.hold, "1")),
            f.hold.clone(),
            Call::Extend(extend(&missing_uuid, "1")),
            missing_uuid.clone(),
        ),
        (
            TENANT,
            Call::Commit(commit(&f.other_hold, "1")),
            f.other_hold.clone(),
            Call::Commit(commit(&missing_uuid, "1")),
            missing_uuid.clone(),
        ),
    ];
    let before = snapshot(&app).await;
    for (tenant, foreign, foreign_id, missing, missing_id) in probes {
        let what = format!("{foreign:?}");
        let foreign = send(&app, Some(tenant), foreign).await.expect_err(&what);
        let missing = send(&app, Some(tenant), missing).await.expect_err(&what);
        assert_eq!(foreign.code(), Code::NotFound, "{what}: {foreign:?}");
        assert_eq!(foreign.code(), missing.code(), "{what}");
        let info = |s: &Status| {
            let info = s.get_error_details().error_info().cloned().expect("ErrorInfo");
            (info.reason, info.domain, info.metadata)
        };
        assert_eq!(info(&foreign), info(&missing), "{what}: same ErrorInfo");
        assert_eq!(
            foreign.message().replace(&foreign_id, "<id>"),
            missing.message().replace(&missing_id, "<id>"),
            "{what}: same message"
        );
    }
    assert_eq!(before, snapshot(&app).await, "the probes changed nothing");
}

// ---- Rejections other than validation -----------------------------------
//
// Each row is a mutating RPC and a way it is refused once its request is
// valid: a reused idempotency key (also after Redis forgot it), a hold or
// grant or change request in a state that forbids the call, something that
// does not exist, a limit. Each row's code and ErrorInfo reason are the
// proto's, and the state `snapshot` sees is the same after each row.
//
// Reasons a proto lists that no valid request of these can produce, and
// refusals that are not errors:
// - Reserve on a suspended account is a normal answer (`granted = false`,
//   Denial ACCOUNT_SUSPENDED), remembered under its key, not an error; a
//   Charge on one is recorded (usage that happened is always recorded).
// - Reserve, Release and Extend keys live only in Redis: once Redis forgot
//   one, the key is new again (common.proto promises the PostgreSQL answer
//   for Commit and Charge only), so there is no "forgotten key" row for them.
// - CreateGrant, VoidGrant, CreateAllowance, AdjustBalance,
//   RequestAccountChange, CreateApiKey and SetPrices keep their keys in
//   PostgreSQL: Redis forgetting anything does not concern them.
// - RevokeApiKey of a revoked key and EndAllowance of an ended allowance
//   return the record unchanged (documented), UpdateAccount,
//   SetAlertPolicy, SetWebhook and DeleteWebhook set values: no
//   FAILED_PRECONDITION exists for them.
// - BACKEND_UNAVAILABLE and TENANT_LOADING need a failing backend
//   (tests/integration/faults.rs, fencing.rs).

/// Ids of the things in each state the rejection rows aim at.
struct Rejections {
    /// A second live hold of alice (10), never touched by a row.
    live: String,
    released: String,
    expired: String,
    /// Committed with key `c-kept` (its record still in Redis).
    committed: String,
    /// Committed with key `c-forgot`, whose Redis record was deleted.
    committed_forgotten: String,
    voided_grant: String,
    expired_grant: String,
    approved_change: String,
    denied_change: String,
}

async fn hold_state(app: &TestApp, reservation: &str) -> Option<String> {
    let mut redis = app.backends.redis().await;
    redis::cmd("HGET")
        .arg(format!("{}{{t:{TENANT}}}:h:{reservation}", app.backends.key_prefix))
        .arg("st")
        .query_async(&mut redis)
        .await
        .expect("hget")
}

/// Forgets an idempotency record of acme, as Redis does after
/// `hot.idempotency_ttl` (`rpc`: `c` commit, `g` charge).
async fn forget(app: &TestApp, rpc: char, key: &str) {
    let mut redis = app.backends.redis().await;
    let record = format!("{}{{t:{TENANT}}}:i:{rpc}:{key}", app.backends.key_prefix);
    let removed: i64 = redis::cmd("DEL").arg(&record).query_async(&mut redis).await.expect("del");
    assert_eq!(removed, 1, "{record} existed");
}

fn change_request(account: &str, key: &str) -> pb::RequestAccountChangeRequest {
    pb::RequestAccountChangeRequest {
        account_id: account.into(),
        tier: Some("pro".into()),
        idempotency_key: key.into(),
        ..Default::default()
    }
}

fn adjust(account: &str, amount: &str, key: &str) -> pb::AdjustBalanceRequest {
    pb::AdjustBalanceRequest {
        account_id: account.into(),
        amount: amount.into(),
        reason: "correction".into(),
        actor: "ops".into(),
        refund: false,
        idempotency_key: key.into(),
    }
}

fn allowance(account: &str, amount: &str, key: &str) -> pb::CreateAllowanceRequest {
    pb::CreateAllowanceRequest {
        account_id: account.into(),
        amount: amount.into(),
        idempotency_key: key.into(),
        ..Default::default()
    }
}

fn prices(unit_price: &str, key: &str) -> pb::SetPricesRequest {
    pb::SetPricesRequest {
        prices: vec![pb::Price { meter: "acme_meter".into(), unit_price: unit_price.into(), ..Default::default() }],
        idempotency_key: key.into(),
        ..Default::default()
    }
}

fn decide(change: &str, approve: bool) -> pb::DecideAccountChangeRequest {
    pb::DecideAccountChangeRequest { change_id: change.into(), approve, note: String::new() }
}

/// Sends a call that must succeed (setting the rejection fixture up).
async fn ok(app: &TestApp, call: Call) -> String {
    let what = format!("{call:?}");
    send(app, Some(TENANT), call).await.unwrap_or_else(|e| panic!("{what}: {e:?}"))
}

/// The field `name: "…"` of a printed response.
fn field_of(printed: &str, name: &str) -> String {
    let start =
        printed.find(&format!("{name}: \"")).unwrap_or_else(|| panic!("no {name} in {printed}")) + name.len() + 3;
    printed[start..].split('"').next().unwrap().to_string()
}

/// `fixture` (acme with grant_limits {"referral": 1}), plus holds released,
/// expired and committed (one commit's key forgotten by Redis), a charge
/// whose key Redis forgot, used keys of every RPC that takes one, a voided
/// and an expired grant, decided change requests, and an allowance.
async fn rejection_fixture() -> (TestApp, Fixture, Rejections) {
    use Call::*;
    let (app, f) = fixture_with(&[("referral", 1)]).await;
    let hour = Duration::from_secs(3600);
    let live = app.reserve_ttl("alice", "10", "live", hour).await.reservation_id;
    let released = app.reserve_ttl("alice", "1", "rel", hour).await.reservation_id;
    app.release(&released, "l-done").await.unwrap();
    let expired = app.reserve_ttl("alice", "1", "exp", Duration::from_millis(100)).await.reservation_id;
    let committed = app.reserve_ttl("alice", "2", "ck", hour).await.reservation_id;
    app.commit(&committed, "1", "c-kept").await.unwrap();
    let committed_forgotten = app.reserve_ttl("alice", "2", "cf", hour).await.reservation_id;
    app.commit(&committed_forgotten, "1", "c-forgot").await.unwrap();
    ok(&app, Extend(pb::ExtendRequest { ttl: dur(3600, 0), idempotency_key: "x-done".into(), ..extend(&f.hold, "0") }))
        .await;
    app.charge("alice", "2", "g-kept").await.unwrap();
    app.charge("alice", "2", "g-forgot").await.unwrap();

    ok(
        &app,
        CreateApiKey(pb::CreateApiKeyRequest {
            tenant_id: TENANT.into(),
            role: pb::ApiKeyRole::Runtime as i32,
            name: "used".into(),
            idempotency_key: "k-used".into(),
        }),
    )
    .await;
    ok(&app, CreateGrant(pb::CreateGrantRequest { idempotency_key: "grant-used".into(), ..create_grant("bob", "5") }))
        .await;
    ok(
        &app,
        CreateGrant(pb::CreateGrantRequest {
            category: GrantCategory::Referral as i32,
            idempotency_key: "ref-1".into(),
            ..create_grant("bob", "1")
        }),
    )
    .await;
    let voided = ok(&app, CreateGrant(create_grant("bob", "3"))).await;
    let voided_grant = field_of(&voided, "grant_id");
    ok(&app, VoidGrant(pb::VoidGrantRequest { idempotency_key: "void-used".into(), ..void_grant(&voided_grant, "x") }))
        .await;
    let expiring = ok(
        &app,
        CreateGrant(pb::CreateGrantRequest {
            expires_at: Some(prost_types::Timestamp { seconds: now_secs() + 2, nanos: 0 }),
            ..create_grant("bob", "4")
        }),
    )
    .await;
    let expired_grant = field_of(&expiring, "grant_id");
    ok(&app, CreateAllowance(allowance("org", "10", "allow-used"))).await;
    ok(&app, AdjustBalance(adjust("bob", "5", "adj-plus"))).await;
    ok(&app, AdjustBalance(adjust("bob", "-1", "adj-minus"))).await;
    ok(&app, RequestAccountChange(change_request("bob", "ch-pending"))).await;
    let approved_change = field_of(&ok(&app, RequestAccountChange(change_request("alice", "ch-a"))).await, "change_id");
    ok(&app, DecideAccountChange(decide(&approved_change, true))).await;
    let denied_change = field_of(&ok(&app, RequestAccountChange(change_request("bob", "ch-d"))).await, "change_id");
    ok(&app, DecideAccountChange(decide(&denied_change, false))).await;
    ok(&app, SetPrices(prices("2", "prices-used"))).await;

    // The hold expires (reaper), the grant expires (ledger job), the
    // commits settle; then Redis forgets two keys.
    eventually(Duration::from_secs(10), || async {
        hold_state(&app, &expired).await.as_deref() == Some("expired")
            && hold_state(&app, &committed_forgotten).await.as_deref() == Some("committed")
            && app
                .grants("bob")
                .await
                .iter()
                .any(|g| g.grant_id == expired_grant && g.status == pb::GrantStatus::Expired as i32)
    })
    .await;
    forget(&app, 'c', "c-forgot").await;
    forget(&app, 'g', "g-forgot").await;
    let r = Rejections {
        live,
        released,
        expired,
        committed,
        committed_forgotten,
        voided_grant,
        expired_grant,
        approved_change,
        denied_change,
    };
    (app, f, r)
}

fn rejection_table(f: &Fixture, r: &Rejections) -> Vec<Row> {
    use Call::*;
    let unknown = uuid::Uuid::now_v7().to_string();
    let keyed_commit = |hold: &str, amount: &str, key: &str| {
        Commit(pb::CommitRequest { idempotency_key: key.into(), ..commit(hold, amount) })
    };
    let keyed_release =
        |hold: &str, key: &str| Release(pb::ReleaseRequest { idempotency_key: key.into(), ..release(hold) });
    let keyed_extend = |hold: &str, more: &str, key: &str| {
        Extend(pb::ExtendRequest { ttl: dur(3600, 0), idempotency_key: key.into(), ..extend(hold, more) })
    };
    let keyed_charge =
        |amount: &str, key: &str| Charge(pb::ChargeRequest { idempotency_key: key.into(), ..charge("alice", amount) });
    let keyed_void = |grant: &str, reason: &str, key: &str| {
        VoidGrant(pb::VoidGrantRequest { idempotency_key: key.into(), ..void_grant(grant, reason) })
    };
    let nf = Code::NotFound;
    let fp = Code::FailedPrecondition;
    let reused = "IDEMPOTENCY_KEY_REUSED";
    vec![
        // ---- Reserve ----------------------------------------------------
        fails("reserve: unknown account", Reserve(reserve("ghost", "1")), nf, "ACCOUNT_NOT_FOUND"),
        fails(
            "reserve: key reused with another amount",
            Reserve(pb::ReserveRequest { idempotency_key: "live".into(), ..reserve("alice", "11") }),
            fp,
            reused,
        ),
        fails(
            "reserve: key reused for another account",
            Reserve(pb::ReserveRequest { idempotency_key: "live".into(), ..reserve("bob", "10") }),
            fp,
            reused,
        ),
        // ---- Commit -----------------------------------------------------
        fails("commit: unknown reservation", Commit(commit(&unknown, "1")), nf, "RESERVATION_NOT_FOUND"),
        fails("commit: released hold", Commit(commit(&r.released, "1")), fp, "RESERVATION_RELEASED"),
        fails("commit: expired hold", Commit(commit(&r.expired, "1")), fp, "RESERVATION_EXPIRED"),
        fails("commit: committed hold, new key", Commit(commit(&r.committed, "1")), fp, "RESERVATION_COMMITTED"),
        fails("commit: key reused with another amount", keyed_commit(&r.committed, "2", "c-kept"), fp, reused),
        fails("commit: key reused on another hold", keyed_commit(&r.live, "1", "c-kept"), fp, reused),
        // The fixed bug: Redis forgot key K of an acknowledged commit; a
        // commit of another hold with K is refused and leaves that hold
        // active (it commits with a fresh key after the table).
        fails("commit: forgotten key reused on another hold", keyed_commit(&r.live, "1", "c-forgot"), fp, reused),
        fails(
            "commit: forgotten key reused with another amount",
            keyed_commit(&r.committed_forgotten, "2", "c-forgot"),
            fp,
            reused,
        ),
        fails(
            "commit: another payload on a released hold with a used key",
            keyed_commit(&r.released, "1", "c-kept"),
            fp,
            reused,
        ),
        // ---- Release ----------------------------------------------------
        fails("release: unknown reservation", Release(release(&unknown)), nf, "RESERVATION_NOT_FOUND"),
        fails("release: released hold, new key", Release(release(&r.released)), fp, "RESERVATION_RELEASED"),
        fails("release: expired hold", Release(release(&r.expired)), fp, "RESERVATION_EXPIRED"),
        fails("release: committed hold", Release(release(&r.committed)), fp, "RESERVATION_COMMITTED"),
        fails("release: key reused on another hold", keyed_release(&r.live, "l-done"), fp, reused),
        // ---- Extend -----------------------------------------------------
        fails("extend: unknown reservation", Extend(extend(&unknown, "1")), nf, "RESERVATION_NOT_FOUND"),
        fails("extend: released hold", Extend(extend(&r.released, "1")), fp, "RESERVATION_RELEASED"),
        fails("extend: expired hold", Extend(extend(&r.expired, "1")), fp, "RESERVATION_EXPIRED"),
        fails("extend: committed hold", Extend(extend(&r.committed, "1")), fp, "RESERVATION_COMMITTED"),
        fails("extend: key reused with another amount", keyed_extend(&f.hold, "1", "x-done"), fp, reused),
        fails("extend: key reused on another hold", keyed_extend(&r.live, "0", "x-done"), fp, reused),
        // ---- Charge -----------------------------------------------------
        fails("charge: unknown account", Charge(charge("ghost", "1")), nf, "ACCOUNT_NOT_FOUND"),
        fails("charge: key reused with another amount", keyed_charge("3", "g-kept"), fp, reused),
        fails("charge: forgotten key reused with another amount", keyed_charge("3", "g-forgot"), fp, reused),
        // ---- CreateTenant -----------------------------------------------
        fails(
            "create tenant: exists with other settings",
            CreateTenant(pb::CreateTenantRequest {
                tenant_id: OTHER.into(),
                display_name: "Other Inc".into(),
                ..Default::default()
            }),
            Code::AlreadyExists,
            "TENANT_EXISTS",
        ),
        // ---- CreateApiKey -----------------------------------------------
        fails(
            "create api key: unknown tenant",
            CreateApiKey(pb::CreateApiKeyRequest {
                tenant_id: "ghost".into(),
                role: pb::ApiKeyRole::Runtime as i32,
                name: String::new(),
                idempotency_key: key(),
            }),
            nf,
            "TENANT_NOT_FOUND",
        ),
        fails(
            "create api key: key reused with another role",
            CreateApiKey(pb::CreateApiKeyRequest {
                tenant_id: TENANT.into(),
                role: pb::ApiKeyRole::Admin as i32,
                name: "used".into(),
                idempotency_key: "k-used".into(),
            }),
            fp,
            reused,
        ),
        // ---- RevokeApiKey -----------------------------------------------
        fails(
            "revoke api key: unknown key",
            RevokeApiKey(pb::RevokeApiKeyRequest { key_id: uuid::Uuid::new_v4().to_string() }),
            nf,
            "KEY_NOT_FOUND",
        ),
        // ---- CreateAccount ----------------------------------------------
        fails(
            "create account: exists with other settings",
            CreateAccount(pb::CreateAccountRequest {
                pool_access: true,
                cap: "500".into(),
                ..create_account("bob", "org")
            }),
            Code::AlreadyExists,
            "ACCOUNT_EXISTS",
        ),
        fails("create account: unknown parent", CreateAccount(create_account("kid", "ghost")), nf, "PARENT_NOT_FOUND"),
        // ---- UpdateAccount ----------------------------------------------
        fails(
            "update account: unknown account",
            UpdateAccount(pb::UpdateAccountRequest {
                account_id: "ghost".into(),
                suspended: Some(true),
                ..Default::default()
            }),
            nf,
            "ACCOUNT_NOT_FOUND",
        ),
        // ---- CreateGrant ------------------------------------------------
        fails("create grant: unknown account", CreateGrant(create_grant("ghost", "1")), nf, "ACCOUNT_NOT_FOUND"),
        fails(
            "create grant: key reused with another amount",
            CreateGrant(pb::CreateGrantRequest { idempotency_key: "grant-used".into(), ..create_grant("bob", "6") }),
            fp,
            reused,
        ),
        fails(
            "create grant: the tenant's referral limit reached",
            CreateGrant(pb::CreateGrantRequest {
                category: GrantCategory::Referral as i32,
                ..create_grant("bob", "1")
            }),
            fp,
            "GRANT_LIMIT_REACHED",
        ),
        // ---- VoidGrant --------------------------------------------------
        fails("void grant: unknown grant", VoidGrant(void_grant(&unknown, "x")), nf, "GRANT_NOT_FOUND"),
        fails("void grant: voided grant, new key", VoidGrant(void_grant(&r.voided_grant, "x")), fp, "GRANT_NOT_LIVE"),
        fails("void grant: expired grant", VoidGrant(void_grant(&r.expired_grant, "x")), fp, "GRANT_NOT_LIVE"),
        fails("void grant: key reused on another grant", keyed_void(&f.grant, "x", "void-used"), fp, reused),
        fails("void grant: key reused with another reason", keyed_void(&r.voided_grant, "y", "void-used"), fp, reused),
        // ---- CreateAllowance --------------------------------------------
        fails(
            "create allowance: unknown account",
            CreateAllowance(allowance("ghost", "10", &key())),
            nf,
            "ACCOUNT_NOT_FOUND",
        ),
        fails(
            "create allowance: key reused with another amount",
            CreateAllowance(allowance("org", "11", "allow-used")),
            fp,
            reused,
        ),
        // ---- EndAllowance -----------------------------------------------
        fails(
            "end allowance: unknown allowance",
            EndAllowance(pb::EndAllowanceRequest { allowance_id: unknown.clone() }),
            nf,
            "ALLOWANCE_NOT_FOUND",
        ),
        // ---- AdjustBalance ----------------------------------------------
        fails(
            "adjust: credit of an unknown account",
            AdjustBalance(adjust("ghost", "5", &key())),
            nf,
            "ACCOUNT_NOT_FOUND",
        ),
        fails(
            "adjust: debit of an unknown account",
            AdjustBalance(adjust("ghost", "-5", &key())),
            nf,
            "ACCOUNT_NOT_FOUND",
        ),
        fails(
            "adjust: credit key reused with another amount",
            AdjustBalance(adjust("bob", "6", "adj-plus")),
            fp,
            reused,
        ),
        fails(
            "adjust: debit key reused with another amount",
            AdjustBalance(adjust("bob", "-2", "adj-minus")),
            fp,
            reused,
        ),
        fails("adjust: credit key reused for a debit", AdjustBalance(adjust("bob", "-5", "adj-plus")), fp, reused),
        fails("adjust: debit key reused for a credit", AdjustBalance(adjust("bob", "1", "adj-minus")), fp, reused),
        // ---- RequestAccountChange ---------------------------------------
        fails(
            "request change: unknown account",
            RequestAccountChange(change_request("ghost", &key())),
            nf,
            "ACCOUNT_NOT_FOUND",
        ),
        fails(
            "request change: key reused for another account",
            RequestAccountChange(change_request("alice", "ch-pending")),
            fp,
            reused,
        ),
        // ---- DecideAccountChange ----------------------------------------
        fails("decide change: unknown change", DecideAccountChange(decide(&unknown, true)), nf, "CHANGE_NOT_FOUND"),
        fails(
            "decide change: approve an approved one",
            DecideAccountChange(decide(&r.approved_change, true)),
            fp,
            "CHANGE_DECIDED",
        ),
        fails(
            "decide change: deny an approved one",
            DecideAccountChange(decide(&r.approved_change, false)),
            fp,
            "CHANGE_DECIDED",
        ),
        fails(
            "decide change: approve a denied one",
            DecideAccountChange(decide(&r.denied_change, true)),
            fp,
            "CHANGE_DECIDED",
        ),
        // ---- SetPrices --------------------------------------------------
        fails("set prices: key reused with another price", SetPrices(prices("3", "prices-used")), fp, reused),
        // ---- SetAlertPolicy ---------------------------------------------
        fails(
            "set alert policy: unknown account",
            SetAlertPolicy(pb::SetAlertPolicyRequest {
                policy: Some(pb::AlertPolicy { account_id: "ghost".into(), percents: vec![10], ..Default::default() }),
            }),
            nf,
            "ACCOUNT_NOT_FOUND",
        ),
    ]
}

/// Every mutating RPC × every way a valid request of it is refused: the
/// documented code and reason, and nothing changed, row by row.
#[tokio::test]
async fn rejected_calls_change_nothing() {
    let (app, f, r) = rejection_fixture().await;
    let rows = rejection_table(&f, &r);
    let total = rows.len();
    let mut before = snapshot(&app).await;
    // Settled: the background jobs have nothing left to do.
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = snapshot(&app).await;
        if now == before {
            break;
        }
        before = now;
    }
    let initial = before.clone();
    let mut failures = Vec::new();
    for Row { name, tenant, call, code, reason, field } in rows {
        let described = format!("{call:?}");
        match send(&app, tenant, call).await {
            Ok(response) => {
                failures.push(format!("{name}: expected {code:?} {reason}, got OK {response} for {described}"))
            }
            Err(status) => {
                let checked =
                    std::panic::catch_unwind(AssertUnwindSafe(|| assert_status(&status, code, reason, field)));
                if let Err(panic) = checked {
                    failures.push(format!("{name}: {}", panic_text(panic)));
                }
            }
        }
        let after = snapshot(&app).await;
        if after != before {
            failures.push(format!("{name}: CHANGED the state\n  before {before:?}\n  after  {after:?}"));
            before = after;
        }
    }
    assert!(failures.is_empty(), "{} of {total} rows failed:\n{}", failures.len(), failures.join("\n"));
    assert_eq!(initial, snapshot(&app).await);

    // The holds and grants the rows aimed at are intact and still work:
    // the live hold refused under a forgotten key commits with a fresh one.
    assert_eq!(hold_state(&app, &r.live).await.as_deref(), Some("active"));
    let c = app.commit(&r.live, "4", "live-commit").await.expect("the live hold commits");
    assert_eq!((c.amount.as_str(), c.released.as_str()), ("4", "6"));
    let c = app.commit(&f.hold, "15", "after-table").await.expect("the fixture's hold commits");
    assert_eq!(c.released, "25");
    send(&app, Some(TENANT), Call::VoidGrant(void_grant(&f.grant, "after"))).await.expect("the live grant voids");
    send(&app, Some(TENANT), Call::DecideAccountChange(decide_pending(&app).await)).await.expect("pending decides");
}

/// A decision on acme's pending change request (`ch-pending`).
async fn decide_pending(app: &TestApp) -> pb::DecideAccountChangeRequest {
    let changes = app
        .admin
        .clone()
        .list_account_changes(req(TENANT, pb::ListAccountChangesRequest { status: pb::ChangeStatus::Pending as i32 }))
        .await
        .unwrap()
        .into_inner()
        .changes;
    assert_eq!(changes.len(), 1, "{changes:?}");
    decide(&changes[0].change_id, false)
}
