//! API keys, roles, tenant isolation and TLS.
//!
//! The isolation matrix sends every RPC with no key, malformed keys, a
//! revoked key, keys of the wrong role and another tenant's key, and checks
//! the status and that the tenant's balances and ledger did not move.

use std::time::Duration;

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

use crate::harness::{Backends, TENANT, TestApp, assert_status, eventually, req_operator, test_overrides, with_key};

const OTHER: &str = "other";

/// Which role a call needs.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Needs {
    Runtime,
    Admin,
    Operator,
}

/// Ids of tenant acme the calls refer to.
struct Ids {
    hold: String,
    grant: String,
    key_id: String,
}

const RPCS: &[(&str, Needs)] = &[
    ("Authorize", Needs::Runtime),
    ("Reserve", Needs::Runtime),
    ("Commit", Needs::Runtime),
    ("Release", Needs::Runtime),
    ("Extend", Needs::Runtime),
    ("Charge", Needs::Runtime),
    ("GetBalance", Needs::Runtime),
    ("CreateTenant", Needs::Operator),
    ("CreateApiKey", Needs::Operator),
    ("ListApiKeys", Needs::Operator),
    ("RevokeApiKey", Needs::Operator),
    ("CreateAccount", Needs::Admin),
    ("UpdateAccount", Needs::Admin),
    ("GetAccount", Needs::Admin),
    ("ListAccounts", Needs::Admin),
    ("CreateGrant", Needs::Admin),
    ("VoidGrant", Needs::Admin),
    ("GetGrant", Needs::Admin),
    ("ListGrants", Needs::Admin),
];

fn with_header<T>(authorization: Option<&str>, message: T) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(value) = authorization {
        request.metadata_mut().insert("authorization", value.parse().unwrap());
    }
    request
}

/// Sends `rpc` (with a payload that would succeed for acme's admin) with
/// this `authorization` header value.
async fn send(app: &TestApp, rpc: &str, authorization: Option<&str>, ids: &Ids) -> Result<(), Status> {
    let mut credit = app.raw_credit.clone();
    let mut admin = app.raw_admin.clone();
    let h = authorization;
    let key = format!("sec-{rpc}-{}", uuid::Uuid::new_v4());
    let amount = || Some(pb::reserve_request::Cost::Amount("1".into()));
    match rpc {
        "Authorize" => credit
            .authorize(with_header(
                h,
                pb::AuthorizeRequest {
                    account_id: "alice".into(),
                    cost: Some(pb::authorize_request::Cost::Amount("1".into())),
                },
            ))
            .await
            .map(drop),
        "Reserve" => credit
            .reserve(with_header(
                h,
                pb::ReserveRequest {
                    account_id: "alice".into(),
                    cost: amount(),
                    idempotency_key: key,
                    ..Default::default()
                },
            ))
            .await
            .map(drop),
        "Commit" => credit
            .commit(with_header(
                h,
                pb::CommitRequest {
                    reservation_id: ids.hold.clone(),
                    cost: Some(pb::commit_request::Cost::Amount("1".into())),
                    idempotency_key: key,
                    ..Default::default()
                },
            ))
            .await
            .map(drop),
        "Release" => credit
            .release(with_header(h, pb::ReleaseRequest { reservation_id: ids.hold.clone(), idempotency_key: key }))
            .await
            .map(drop),
        "Extend" => credit
            .extend(with_header(
                h,
                pb::ExtendRequest {
                    reservation_id: ids.hold.clone(),
                    more: Some(pb::extend_request::More::Amount("1".into())),
                    idempotency_key: key,
                    ttl: None,
                },
            ))
            .await
            .map(drop),
        "Charge" => credit
            .charge(with_header(
                h,
                pb::ChargeRequest {
                    account_id: "alice".into(),
                    cost: Some(pb::charge_request::Cost::Amount("1".into())),
                    idempotency_key: key,
                    ..Default::default()
                },
            ))
            .await
            .map(drop),
        "GetBalance" => {
            credit.get_balance(with_header(h, pb::GetBalanceRequest { account_id: "alice".into() })).await.map(drop)
        }
        "CreateTenant" => admin
            .create_tenant(with_header(
                h,
                pb::CreateTenantRequest { tenant_id: "intruder".into(), ..Default::default() },
            ))
            .await
            .map(drop),
        "CreateApiKey" => admin
            .create_api_key(with_header(
                h,
                pb::CreateApiKeyRequest {
                    tenant_id: TENANT.into(),
                    role: pb::ApiKeyRole::Admin as i32,
                    name: "x".into(),
                    idempotency_key: key,
                },
            ))
            .await
            .map(drop),
        "ListApiKeys" => {
            admin.list_api_keys(with_header(h, pb::ListApiKeysRequest { tenant_id: TENANT.into() })).await.map(drop)
        }
        "RevokeApiKey" => {
            admin.revoke_api_key(with_header(h, pb::RevokeApiKeyRequest { key_id: ids.key_id.clone() })).await.map(drop)
        }
        "CreateAccount" => admin
            .create_account(with_header(
                h,
                pb::CreateAccountRequest { account_id: "mole".into(), parent_id: "org".into(), ..Default::default() },
            ))
            .await
            .map(drop),
        "UpdateAccount" => admin
            .update_account(with_header(
                h,
                pb::UpdateAccountRequest { account_id: "alice".into(), suspended: Some(true), ..Default::default() },
            ))
            .await
            .map(drop),
        "GetAccount" => {
            admin.get_account(with_header(h, pb::GetAccountRequest { account_id: "alice".into() })).await.map(drop)
        }
        "ListAccounts" => admin
            .list_accounts(with_header(h, pb::ListAccountsRequest { parent_id: "org".into(), ..Default::default() }))
            .await
            .map(drop),
        "CreateGrant" => admin
            .create_grant(with_header(
                h,
                pb::CreateGrantRequest {
                    account_id: "org".into(),
                    amount: "1000".into(),
                    category: GrantCategory::Promotional as i32,
                    idempotency_key: key,
                    ..Default::default()
                },
            ))
            .await
            .map(drop),
        "VoidGrant" => admin
            .void_grant(with_header(
                h,
                pb::VoidGrantRequest { grant_id: ids.grant.clone(), reason: "x".into(), idempotency_key: key },
            ))
            .await
            .map(drop),
        "GetGrant" => {
            admin.get_grant(with_header(h, pb::GetGrantRequest { grant_id: ids.grant.clone() })).await.map(drop)
        }
        "ListGrants" => admin
            .list_grants(with_header(h, pb::ListGrantsRequest { account_id: "org".into(), include_inactive: true }))
            .await
            .map(drop),
        other => panic!("unknown rpc {other}"),
    }
}

/// Everything of acme a breach could change.
async fn snapshot(app: &TestApp) -> (String, String, i64, i64, i64, i64) {
    let alice = app.balance("alice").await;
    let pg = app.backends.pg().await;
    let count = |sql: &'static str| {
        let pg = pg.clone();
        async move { sqlx::query_scalar::<_, i64>(sql).fetch_one(&pg).await.unwrap() }
    };
    (
        format!("{alice:?}"),
        format!("{:?}", app.grants("org").await),
        count("SELECT COUNT(*) FROM usage_events").await,
        count("SELECT COUNT(*) FROM ledger").await,
        count("SELECT COUNT(*) FROM accounts").await,
        count("SELECT COUNT(*) FROM api_keys WHERE revoked_at IS NULL").await,
    )
}

#[tokio::test]
async fn isolation_matrix() {
    let app = TestApp::spawn().await;
    app.account("org", None, false, None).await;
    app.account("alice", Some("org"), true, None).await;
    let grant = app.grant("org", "100", GrantCategory::Plan).await;
    let hold = app.reserve("alice", "5", "h").await.unwrap();
    app.create_tenant(OTHER).await;
    app.account_in(OTHER, "org", None, false, None).await;
    app.account_in(OTHER, "alice", Some("org"), true, None).await;
    app.grant_in(OTHER, "org", "100", GrantCategory::Plan).await;

    let runtime = app.create_key(TENANT, pb::ApiKeyRole::Runtime).await;
    let admin = app.create_key(TENANT, pb::ApiKeyRole::Admin).await;
    let other_admin = app.create_key(OTHER, pb::ApiKeyRole::Admin).await;
    let other_runtime = app.create_key(OTHER, pb::ApiKeyRole::Runtime).await;
    let revoked = app.create_key(TENANT, pb::ApiKeyRole::Admin).await;
    let victim = app
        .admin
        .clone()
        .create_api_key(req_operator(pb::CreateApiKeyRequest {
            tenant_id: TENANT.into(),
            role: pb::ApiKeyRole::Runtime as i32,
            name: "victim".into(),
            idempotency_key: "victim".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    let keys = app
        .admin
        .clone()
        .list_api_keys(req_operator(pb::ListApiKeysRequest { tenant_id: TENANT.into() }))
        .await
        .unwrap()
        .into_inner()
        .api_keys;
    let revoked_prefix = &revoked[4..16];
    let revoked_id = keys.iter().find(|k| k.prefix == revoked_prefix).unwrap().key_id.clone();
    app.admin.clone().revoke_api_key(req_operator(pb::RevokeApiKeyRequest { key_id: revoked_id })).await.unwrap();
    let operator = app.operator_key();
    let ids = Ids {
        hold: hold.reservation_id.clone(),
        grant: grant.grant_id.clone(),
        key_id: victim.api_key.unwrap().key_id,
    };

    let before = snapshot(&app).await;
    let bearer = |k: &str| format!("Bearer {k}");
    let mut failures = Vec::new();
    let mut checked = 0;
    for (rpc, needs) in RPCS {
        let mut cases: Vec<(String, Option<String>, Code, &str)> = vec![
            ("no key".into(), None, Code::Unauthenticated, "MISSING_CREDENTIALS"),
            ("not bearer".into(), Some(format!("Basic {admin}")), Code::Unauthenticated, "INVALID_CREDENTIALS"),
            ("garbage".into(), Some("Bearer nope".into()), Code::Unauthenticated, "INVALID_CREDENTIALS"),
            (
                "unknown prefix".into(),
                Some(bearer(&format!("cdk_000000000000_{}", "0".repeat(64)))),
                Code::Unauthenticated,
                "INVALID_CREDENTIALS",
            ),
            (
                "right prefix, wrong secret".into(),
                Some(bearer(&format!("{}{}", &admin[..17], "0".repeat(64)))),
                Code::Unauthenticated,
                "INVALID_CREDENTIALS",
            ),
            ("revoked".into(), Some(bearer(&revoked)), Code::Unauthenticated, "INVALID_CREDENTIALS"),
        ];
        match needs {
            Needs::Runtime => {
                cases.push(("operator key".into(), Some(bearer(&operator)), Code::PermissionDenied, "WRONG_ROLE"));
            }
            Needs::Admin => {
                cases.push(("runtime key".into(), Some(bearer(&runtime)), Code::PermissionDenied, "WRONG_ROLE"));
                cases.push(("operator key".into(), Some(bearer(&operator)), Code::PermissionDenied, "WRONG_ROLE"));
            }
            Needs::Operator => {
                cases.push(("runtime key".into(), Some(bearer(&runtime)), Code::PermissionDenied, "WRONG_ROLE"));
                cases.push(("admin key".into(), Some(bearer(&admin)), Code::PermissionDenied, "WRONG_ROLE"));
            }
        }
        // Another tenant's key reaching for acme's ids: as if they did not
        // exist. (Calls naming only account ids that both tenants have act
        // on the other tenant's own accounts, which is its right.)
        let foreign = if *needs == Needs::Admin { &other_admin } else { &other_runtime };
        match *rpc {
            "Commit" | "Release" | "Extend" => {
                cases.push(("other tenant".into(), Some(bearer(foreign)), Code::NotFound, "RESERVATION_NOT_FOUND"))
            }
            "VoidGrant" | "GetGrant" => {
                cases.push(("other tenant".into(), Some(bearer(foreign)), Code::NotFound, "GRANT_NOT_FOUND"))
            }
            _ => {}
        }
        for (case, header, code, reason) in cases {
            checked += 1;
            match send(&app, rpc, header.as_deref(), &ids).await {
                Ok(()) => failures.push(format!("{rpc} / {case}: succeeded")),
                Err(status) => {
                    let got = status.get_error_details().error_info().map(|i| i.reason.clone()).unwrap_or_default();
                    if status.code() != code || got != reason {
                        failures.push(format!("{rpc} / {case}: got {:?} {got} ({})", status.code(), status.message()));
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{} of {checked} cases failed:\n{}", failures.len(), failures.join("\n"));
    assert_eq!(checked, 150, "19 RPCs × their cases");
    assert_eq!(snapshot(&app).await, before, "no refused call changed anything");

    // The other tenant's own ids resolve with its own key and show its
    // own data, never acme's.
    let theirs = app.balance_in(OTHER, "alice").await;
    assert_eq!(theirs.available, "100");
    assert_eq!(app.balance("alice").await.available, "95");

    // Every key works for what its role allows.
    for rpc in ["Reserve", "GetBalance"] {
        send(&app, rpc, Some(&bearer(&runtime)), &ids).await.unwrap();
    }
    send(&app, "GetAccount", Some(&bearer(&admin)), &ids).await.unwrap();
    send(&app, "ListApiKeys", Some(&bearer(&operator)), &ids).await.unwrap();
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
