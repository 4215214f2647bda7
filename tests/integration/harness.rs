//! Test harness: every test gets a fresh PostgreSQL database, a random
//! Redis key prefix and its own creditd on a loopback port, all talking to
//! the throwaway servers `scripts/test.sh` starts
//! (`CREDITD_TEST_DATABASE_URL`, `CREDITD_TEST_REDIS_URL`).

#![allow(dead_code)]

use std::{
    collections::HashMap,
    future::Future,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use creditd::{
    app::App,
    auth::Role,
    config::{Config, Sources},
    pb::{
        self, admin_service_client::AdminServiceClient, credit_service_client::CreditServiceClient,
        pricing_service_client::PricingServiceClient,
    },
    service::jobs::Serving,
};
use rand::Rng;
use tokio::sync::oneshot;
use tonic::{
    Code, Request, Status,
    service::{Interceptor, interceptor::InterceptedService},
    transport::Channel,
};
use tonic_types::StatusExt;

pub const TENANT: &str = "acme";

/// Extra settings for apps on `Backends::fresh_cluster`.
pub const CLUSTER: &[(&str, &str)] = &[("redis.cluster", "true")];

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run the suite with scripts/test.sh, which starts throwaway PostgreSQL and Redis")
    })
}

fn random_suffix() -> String {
    let mut rng = rand::rng();
    (0..12).map(|_| char::from(b'a' + rng.random_range(0..26))).collect()
}

/// Where one test's data lives; shared by every instance of that test.
#[derive(Clone, Debug)]
pub struct Backends {
    pub database_url: String,
    pub redis_url: String,
    pub key_prefix: String,
}

impl Backends {
    /// A fresh database and key prefix.
    pub async fn fresh() -> Backends {
        let admin_url = env("CREDITD_TEST_DATABASE_URL");
        let name = format!("creditd_t_{}", random_suffix());
        let mut admin = url::Url::parse(&admin_url).expect("CREDITD_TEST_DATABASE_URL is a URL");
        let pool = sqlx::PgPool::connect(admin.as_str()).await.expect("connect to the test postgres");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&pool)
            .await
            .expect("create database");
        pool.close().await;
        admin.set_path(&name);
        Backends {
            database_url: admin.to_string(),
            redis_url: env("CREDITD_TEST_REDIS_URL"),
            key_prefix: format!("t{}:", random_suffix()),
        }
    }

    /// Fresh backends on the test Redis Cluster; spawn apps on them with
    /// `CLUSTER` as extra settings.
    pub async fn fresh_cluster() -> Backends {
        let mut b = Backends::fresh().await;
        b.redis_url = env("CREDITD_TEST_REDIS_CLUSTER_URL");
        b
    }

    pub async fn redis(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.redis_url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .expect("connect to the test redis")
    }

    pub async fn pg(&self) -> sqlx::PgPool {
        sqlx::PgPool::connect(&self.database_url).await.expect("connect to the test database")
    }
}

/// Marks a test request with the tenant (or `!operator`) whose key the
/// client's [`KeyInjector`] must send; never reaches the server.
const TEST_CALLER: &str = "x-test-caller";
const OPERATOR: &str = "!operator";

/// Turns the test marker into `authorization: Bearer <key>`: the admin
/// key of the marked tenant, or the operator key. A request that already
/// has an authorization header, or names a tenant without a key, is sent
/// as it is (so tests can send no key, or a wrong one).
#[derive(Clone)]
pub struct KeyInjector {
    keys: Arc<Mutex<HashMap<String, String>>>,
}

impl Interceptor for KeyInjector {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let Some(marker) = request.metadata_mut().remove(TEST_CALLER) else { return Ok(request) };
        if request.metadata().contains_key("authorization") {
            return Ok(request);
        }
        let who = marker.to_str().unwrap_or_default().to_string();
        if let Some(key) = self.keys.lock().unwrap().get(&who) {
            request.metadata_mut().insert("authorization", format!("Bearer {key}").parse().unwrap());
        }
        Ok(request)
    }
}

pub type Intercepted = InterceptedService<Channel, KeyInjector>;

/// A running creditd.
pub struct TestApp {
    pub addr: std::net::SocketAddr,
    /// The metrics endpoint, when `metrics.listen` was set.
    pub metrics_addr: Option<std::net::SocketAddr>,
    pub backends: Backends,
    pub credit: CreditServiceClient<Intercepted>,
    pub admin: AdminServiceClient<Intercepted>,
    /// Plain clients: what a request carries is what is sent.
    pub raw_credit: CreditServiceClient<Channel>,
    pub raw_admin: AdminServiceClient<Channel>,
    pricing: PricingServiceClient<Intercepted>,
    raw_pricing: PricingServiceClient<Channel>,
    /// tenant (or `!operator`) → API key.
    pub keys: Arc<Mutex<HashMap<String, String>>>,
    pub engine: creditd::service::Engine,
    channel: Channel,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// Test settings: short intervals so background work is quick to observe.
pub fn test_overrides(b: &Backends) -> Vec<(String, String)> {
    [
        ("postgres.url", b.database_url.as_str()),
        ("redis.url", b.redis_url.as_str()),
        ("redis.key_prefix", b.key_prefix.as_str()),
        ("server.listen", "127.0.0.1:0"),
        ("postgres.migrate_on_start", "true"),
        ("postgres.max_connections", "8"),
        ("hot.min_ttl", "100ms"),
        ("jobs.reap_interval", "50ms"),
        ("jobs.ledger_interval", "100ms"),
        ("jobs.health_interval", "100ms"),
        ("server.shutdown_grace", "2s"),
        ("log.filter", "warn"),
        // Measure only: a test must see drift, not have it repaired away.
        ("reconcile.repair", "false"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

impl TestApp {
    /// A creditd on fresh backends, with tenant `acme` created.
    pub async fn spawn() -> TestApp {
        let app = TestApp::spawn_on(Backends::fresh().await, &[]).await;
        app.create_tenant(TENANT).await;
        app
    }

    /// A creditd on the given backends (a second replica shares them).
    pub async fn spawn_on(backends: Backends, extra: &[(&str, &str)]) -> TestApp {
        TestApp::spawn_with(backends, extra, |_| async {}).await
    }

    /// As `spawn_on`, running `before_ready` with the gRPC address once the
    /// server listens and before it is waited for to report SERVING.
    pub async fn spawn_with<F, Fut>(backends: Backends, extra: &[(&str, &str)], before_ready: F) -> TestApp
    where
        F: FnOnce(SocketAddr) -> Fut,
        Fut: Future<Output = ()>,
    {
        init_logs();
        let mut overrides = test_overrides(&backends);
        overrides.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let config = Config::load(&Sources { file: None, env: vec![], overrides }).expect("test config");
        let app = App::build(config).await.expect("app builds");
        let addr = app.local_addr();
        let metrics_addr = app.metrics_addr();
        let engine = app.engine().clone();
        let mut ready = app.readiness();
        let (tx, rx) = oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            app.serve(async {
                let _ = rx.await;
            })
            .await
            .expect("serve");
        });
        before_ready(addr).await;
        tokio::time::timeout(Duration::from_secs(20), ready.wait_for(|s| *s == Serving::Yes))
            .await
            .expect("app reports serving")
            .expect("status channel open");
        let (_, operator_key) =
            engine.keys.create(None, Role::Operator, "tests", None).await.expect("create an operator key");
        let keys = Arc::new(Mutex::new(HashMap::from([(OPERATOR.to_string(), operator_key.unwrap())])));
        let channel = Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.expect("connect");
        let injector = KeyInjector { keys: keys.clone() };
        TestApp {
            addr,
            metrics_addr,
            backends,
            credit: CreditServiceClient::with_interceptor(channel.clone(), injector.clone()),
            admin: AdminServiceClient::with_interceptor(channel.clone(), injector.clone()),
            pricing: PricingServiceClient::with_interceptor(channel.clone(), injector),
            raw_pricing: PricingServiceClient::new(channel.clone()),
            raw_credit: CreditServiceClient::new(channel.clone()),
            raw_admin: AdminServiceClient::new(channel.clone()),
            keys,
            engine,
            channel: channel.clone(),
            shutdown: Some(tx),
            server: Some(server),
        }
    }

    /// Stops serving and waits for the drain.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(server) = self.server.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), server).await;
        }
    }

    /// Creates a tenant (as operator) and an admin key for it, which
    /// `req(tenant, …)` then sends.
    pub async fn create_tenant(&self, tenant: &str) {
        self.admin
            .clone()
            .create_tenant(req_operator(pb::CreateTenantRequest { tenant_id: tenant.into(), ..Default::default() }))
            .await
            .expect("create tenant");
        let key = self.create_key(tenant, pb::ApiKeyRole::Admin).await;
        self.keys.lock().unwrap().insert(tenant.to_string(), key);
    }

    /// Creates a key (as operator) and returns it.
    pub async fn create_key(&self, tenant: &str, role: pb::ApiKeyRole) -> String {
        self.admin
            .clone()
            .create_api_key(req_operator(pb::CreateApiKeyRequest {
                tenant_id: tenant.into(),
                role: role as i32,
                name: "test".into(),
                idempotency_key: format!("key-{}", random_suffix()),
            }))
            .await
            .expect("create api key")
            .into_inner()
            .key
    }

    /// The app's channel, for clients the harness does not wrap.
    pub fn raw_admin_channel(&self) -> Channel {
        self.channel.clone()
    }

    /// AlertService, with keys injected like `credit` and `admin`.
    pub fn alerts(&self) -> pb::alert_service_client::AlertServiceClient<Intercepted> {
        pb::alert_service_client::AlertServiceClient::with_interceptor(
            self.channel.clone(),
            KeyInjector { keys: self.keys.clone() },
        )
    }

    /// PricingService, with keys injected like `credit` and `admin`.
    pub fn credit_pricing(&self) -> PricingServiceClient<Intercepted> {
        self.pricing.clone()
    }

    /// PricingService, sending exactly what a request carries.
    pub fn pricing_raw(&self) -> PricingServiceClient<Channel> {
        self.raw_pricing.clone()
    }

    /// Uses the tenants' keys of another app (a replica sharing backends).
    pub fn adopt_keys(&self, other: &TestApp) {
        let theirs = other.keys.lock().unwrap().clone();
        self.keys.lock().unwrap().extend(theirs.into_iter().filter(|(who, _)| who != OPERATOR));
    }

    /// The operator key of this app.
    pub fn operator_key(&self) -> String {
        self.keys.lock().unwrap()[OPERATOR].clone()
    }

    /// Creates an account in `acme`.
    pub async fn account(&self, id: &str, parent: Option<&str>, pool_access: bool, cap: Option<&str>) {
        self.account_in(TENANT, id, parent, pool_access, cap).await;
    }

    pub async fn account_in(&self, tenant: &str, id: &str, parent: Option<&str>, pool_access: bool, cap: Option<&str>) {
        self.admin
            .clone()
            .create_account(req(
                tenant,
                pb::CreateAccountRequest {
                    account_id: id.into(),
                    parent_id: parent.unwrap_or_default().into(),
                    kind: pb::AccountKind::User as i32,
                    pool_access,
                    cap: cap.unwrap_or_default().into(),
                    ..Default::default()
                },
            ))
            .await
            .expect("create account");
    }

    /// Grants `amount` to an account of `acme` now; returns the grant.
    pub async fn grant(&self, account: &str, amount: &str, category: pb::GrantCategory) -> pb::Grant {
        self.grant_in(TENANT, account, amount, category).await
    }

    pub async fn grant_in(&self, tenant: &str, account: &str, amount: &str, category: pb::GrantCategory) -> pb::Grant {
        self.admin
            .clone()
            .create_grant(req(
                tenant,
                pb::CreateGrantRequest {
                    account_id: account.into(),
                    amount: amount.into(),
                    category: category as i32,
                    idempotency_key: format!("g-{}", random_suffix()),
                    ..Default::default()
                },
            ))
            .await
            .expect("create grant")
            .into_inner()
    }

    pub async fn reserve(&self, account: &str, amount: &str, key: &str) -> Result<pb::ReserveResponse, Status> {
        self.credit
            .clone()
            .reserve(req(
                TENANT,
                pb::ReserveRequest {
                    account_id: account.into(),
                    cost: Some(pb::reserve_request::Cost::Amount(amount.into())),
                    idempotency_key: key.into(),
                    ..Default::default()
                },
            ))
            .await
            .map(|r| r.into_inner())
    }

    pub async fn reserve_ttl(&self, account: &str, amount: &str, key: &str, ttl: Duration) -> pb::ReserveResponse {
        self.credit
            .clone()
            .reserve(req(
                TENANT,
                pb::ReserveRequest {
                    account_id: account.into(),
                    cost: Some(pb::reserve_request::Cost::Amount(amount.into())),
                    idempotency_key: key.into(),
                    ttl: Some(prost_types::Duration {
                        seconds: ttl.as_secs() as i64,
                        nanos: ttl.subsec_nanos() as i32,
                    }),
                    ..Default::default()
                },
            ))
            .await
            .expect("reserve")
            .into_inner()
    }

    pub async fn commit(&self, reservation: &str, amount: &str, key: &str) -> Result<pb::CommitResponse, Status> {
        self.credit
            .clone()
            .commit(req(
                TENANT,
                pb::CommitRequest {
                    reservation_id: reservation.into(),
                    cost: Some(pb::commit_request::Cost::Amount(amount.into())),
                    idempotency_key: key.into(),
                    ..Default::default()
                },
            ))
            .await
            .map(|r| r.into_inner())
    }

    pub async fn release(&self, reservation: &str, key: &str) -> Result<pb::ReleaseResponse, Status> {
        self.credit
            .clone()
            .release(req(
                TENANT,
                pb::ReleaseRequest { reservation_id: reservation.into(), idempotency_key: key.into() },
            ))
            .await
            .map(|r| r.into_inner())
    }

    pub async fn charge(&self, account: &str, amount: &str, key: &str) -> Result<pb::CommitResponse, Status> {
        self.credit
            .clone()
            .charge(req(
                TENANT,
                pb::ChargeRequest {
                    account_id: account.into(),
                    cost: Some(pb::charge_request::Cost::Amount(amount.into())),
                    idempotency_key: key.into(),
                    ..Default::default()
                },
            ))
            .await
            .map(|r| r.into_inner())
    }

    pub async fn balance(&self, account: &str) -> pb::GetBalanceResponse {
        self.balance_in(TENANT, account).await
    }

    pub async fn balance_in(&self, tenant: &str, account: &str) -> pb::GetBalanceResponse {
        self.credit
            .clone()
            .get_balance(req(tenant, pb::GetBalanceRequest { account_id: account.into() }))
            .await
            .expect("get balance")
            .into_inner()
    }

    /// The subject's available credits, as a string.
    pub async fn available(&self, account: &str) -> String {
        self.balance(account).await.available
    }

    pub async fn grants(&self, account: &str) -> Vec<pb::Grant> {
        self.admin
            .clone()
            .list_grants(req(TENANT, pb::ListGrantsRequest { account_id: account.into(), include_inactive: true }))
            .await
            .expect("list grants")
            .into_inner()
            .grants
    }
}

/// Logs of the apps under test go to the test output (RUST_LOG, default
/// warn), shown for failing tests.
fn init_logs() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
    });
}

/// A request sent with the admin key of `tenant` (through the
/// intercepted clients).
pub fn req<T>(tenant: &str, message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(TEST_CALLER, tenant.parse().expect("ascii tenant"));
    request
}

/// A request sent with the operator key.
pub fn req_operator<T>(message: T) -> Request<T> {
    req(OPERATOR, message)
}

/// A request carrying exactly this key.
pub fn with_key<T>(key: &str, message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert("authorization", format!("Bearer {key}").parse().expect("ascii key"));
    request
}

/// Asserts a status's code, ErrorInfo reason and (for INVALID_ARGUMENT)
/// the field named in its BadRequest.
pub fn assert_status(status: &Status, code: Code, reason: &str, field: Option<&str>) {
    assert_eq!(status.code(), code, "unexpected status: {status:?}");
    let details = status.get_error_details();
    let info = details.error_info().unwrap_or_else(|| panic!("no ErrorInfo in {status:?}"));
    assert_eq!(info.reason, reason, "unexpected reason in {status:?}");
    assert_eq!(info.domain, "creditd");
    if let Some(field) = field {
        let bad = details.bad_request().unwrap_or_else(|| panic!("no BadRequest in {status:?}"));
        assert_eq!(bad.field_violations[0].field, field, "{status:?}");
    }
}

/// Polls `check` until it returns true, for at most `limit`.
pub async fn eventually<F, Fut>(limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if check().await {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "condition not met within {limit:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
