//! A replica killed with SIGKILL in the middle of reserve/commit traffic,
//! then restarted. Clients retry with their idempotency keys. Afterwards:
//! no acknowledged commit lost, none counted twice, every hold resolved,
//! and Redis balances equal to the ledger.

use std::{
    net::TcpListener,
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use creditd::{
    auth::{KeyStore, Role},
    pb::{self, GrantCategory, admin_service_client::AdminServiceClient, credit_service_client::CreditServiceClient},
    store::pg::PgStore,
};
use tonic::transport::Channel;

use crate::harness::{Backends, TENANT, with_key};

/// A creditd process on its own loopback port.
struct Replica {
    child: Child,
}

impl Replica {
    fn start(backends: &Backends, port: u16) -> Replica {
        let child = Command::new(env!("CARGO_BIN_EXE_creditd"))
            .arg("serve")
            .arg("--migrate")
            .env("DATABASE_URL", &backends.database_url)
            .env("REDIS_URL", &backends.redis_url)
            .env("CREDITD_REDIS__KEY_PREFIX", &backends.key_prefix)
            .env("CREDITD_SERVER__LISTEN", format!("127.0.0.1:{port}"))
            .env("CREDITD_POSTGRES__MAX_CONNECTIONS", "8")
            .env("CREDITD_POSTGRES__STATEMENT_TIMEOUT", "500ms")
            .env("CREDITD_HOT__COMMIT_DEADLINE", "2s")
            .env("CREDITD_JOBS__REAP_INTERVAL", "100ms")
            .env("CREDITD_JOBS__LEDGER_INTERVAL", "200ms")
            .env("CREDITD_LOG__FILTER", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start creditd");
        Replica { child }
    }

    fn kill(&mut self) {
        let _ = self.child.kill(); // SIGKILL
        let _ = self.child.wait();
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

async fn channel(port: u16) -> Option<Channel> {
    Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect_timeout(Duration::from_millis(500))
        .timeout(Duration::from_secs(3))
        .connect()
        .await
        .ok()
}

/// Waits until the replica answers health SERVING.
async fn wait_serving(port: u16) {
    for _ in 0..200 {
        if let Some(ch) = channel(port).await {
            let mut health = tonic_health::pb::health_client::HealthClient::new(ch);
            if let Ok(r) = health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await
                && r.into_inner().status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
            {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("replica on port {port} never served");
}

/// Reserve then commit 1 credit, retrying each step with its key on either
/// replica until it is acknowledged. Returns the acknowledged event id.
async fn reserve_and_commit(ports: [u16; 2], key: &str, i: usize, api_key: &str) -> String {
    let mut attempt = i;
    let rid = loop {
        attempt += 1;
        let Some(ch) = channel(ports[attempt % 2]).await else { continue };
        let request = pb::ReserveRequest {
            account_id: format!("u{}", i % 10),
            cost: Some(pb::reserve_request::Cost::Amount("1".into())),
            idempotency_key: format!("r-{key}"),
            ttl: Some(prost_types::Duration { seconds: 120, nanos: 0 }),
            ..Default::default()
        };
        match CreditServiceClient::new(ch).reserve(with_key(api_key, request)).await {
            Ok(r) => {
                let r = r.into_inner();
                assert!(r.granted, "the pool is large enough");
                break r.reservation_id;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    loop {
        attempt += 1;
        let Some(ch) = channel(ports[attempt % 2]).await else { continue };
        let request = pb::CommitRequest {
            reservation_id: rid.clone(),
            cost: Some(pb::commit_request::Cost::Amount("1".into())),
            idempotency_key: format!("c-{key}"),
            ..Default::default()
        };
        match CreditServiceClient::new(ch).commit(with_key(api_key, request)).await {
            Ok(c) => return c.into_inner().event_id,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

#[tokio::test]
async fn a_killed_replica_loses_and_doubles_nothing() {
    let backends = Backends::fresh().await;
    let ports = [free_port(), free_port()];
    let mut a = Replica::start(&backends, ports[0]);
    wait_serving(ports[0]).await;
    let b = Replica::start(&backends, ports[1]);
    wait_serving(ports[1]).await;

    // Set up through the API with keys made straight in PostgreSQL.
    let pg = PgStore::connect(&backends.database_url, 2, Duration::from_secs(5)).await.unwrap();
    let keys = KeyStore::new(pg.clone(), Duration::from_millis(500), Default::default());
    let operator = keys.create(None, Role::Operator, "crash-test", None).await.unwrap().1.unwrap();
    let mut admin = AdminServiceClient::new(channel(ports[0]).await.unwrap());
    admin
        .create_tenant(with_key(&operator, pb::CreateTenantRequest { tenant_id: TENANT.into(), ..Default::default() }))
        .await
        .unwrap();
    let api_key = keys.create(Some(TENANT), Role::Admin, "crash-test", None).await.unwrap().1.unwrap();
    let account = |id: &str, parent: &str| pb::CreateAccountRequest {
        account_id: id.into(),
        parent_id: parent.into(),
        pool_access: !parent.is_empty(),
        ..Default::default()
    };
    admin.create_account(with_key(&api_key, account("pool", ""))).await.unwrap();
    for i in 0..10 {
        admin.create_account(with_key(&api_key, account(&format!("u{i}"), "pool"))).await.unwrap();
    }
    admin
        .create_grant(with_key(
            &api_key,
            pb::CreateGrantRequest {
                account_id: "pool".into(),
                amount: "100000".into(),
                category: GrantCategory::Plan as i32,
                idempotency_key: "plan".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap();

    // Traffic from 16 clients while replica A is killed and restarted.
    let acknowledged = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for c in 0..16 {
        let acknowledged = acknowledged.clone();
        let stop = stop.clone();
        let api_key = api_key.clone();
        clients.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) && n < 400 {
                let event = reserve_and_commit(ports, &format!("{c}-{n}"), c * 1000 + n, &api_key).await;
                acknowledged.lock().unwrap().push(event);
                n += 1;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    a.kill();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let a = Replica::start(&backends, ports[0]);
    wait_serving(ports[0]).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        tokio::time::timeout(Duration::from_secs(60), client).await.expect("clients finish").unwrap();
    }
    let acknowledged = acknowledged.lock().unwrap().clone();
    assert!(acknowledged.len() > 100, "traffic ran ({} commits)", acknowledged.len());

    // Past the commit deadline, every hold is resolved.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pool = pg.pool();
    let (events, distinct): (i64, i64) =
        sqlx::query_as("SELECT COUNT(*), COUNT(DISTINCT reservation_id) FROM usage_events")
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(events, distinct, "no reservation counted twice");
    let mut unique = acknowledged.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), acknowledged.len(), "each client commit acknowledged once");
    let stored: Vec<uuid::Uuid> =
        sqlx::query_scalar("SELECT event_id FROM usage_events").fetch_all(pool).await.unwrap();
    for event in &acknowledged {
        assert!(stored.contains(&event.parse().unwrap()), "acknowledged commit {event} is durable");
    }
    assert_eq!(events as usize, acknowledged.len(), "nothing committed that no client saw acknowledged");

    let mut credit = CreditServiceClient::new(channel(ports[1]).await.unwrap());
    let balance =
        credit.get_balance(with_key(&api_key, pb::GetBalanceRequest { account_id: "u0".into() })).await.unwrap();
    let pool_level = &balance.into_inner().levels[1];
    assert_eq!(pool_level.held, "0", "no hold leaked");
    assert_eq!(pool_level.balance, (100_000 - events).to_string(), "Redis equals the ledger");
    let report = admin.check_balances(with_key(&api_key, pb::CheckBalancesRequest {})).await;
    // Replica A's client may be stale after the restart: use B.
    let report = match report {
        Ok(r) => r.into_inner(),
        Err(_) => AdminServiceClient::new(channel(ports[1]).await.unwrap())
            .check_balances(with_key(&api_key, pb::CheckBalancesRequest {}))
            .await
            .unwrap()
            .into_inner(),
    };
    assert!(report.drifts.is_empty(), "{:?}", report.drifts);
    drop((a, b));
}
