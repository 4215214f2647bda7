//! The fence between Redis and PostgreSQL, under the failures of a Redis
//! run the way production runs it: an older RDB snapshot restored, an
//! `appendfsync everysec` AOF that lost its last writes, a replica promoted
//! while it had not received the last writes (by hand, and by real
//! Sentinels), and a restart that answers LOADING for seconds.
//!
//! Each test spends a pool of credits, 1 at a time, from 8 clients on two
//! replicas, injects its fault while most of the pool is left, and ends
//! with the audit of `fault_tools::audit`: every acknowledged commit
//! recorded exactly once and nothing else (0 credits spent twice, 0
//! acknowledged commits lost), the pool spent exactly, every hold resolved
//! and Redis balances equal to the ledger. Clients retry UNAVAILABLE with
//! their keys and fail the test on any other answer (INTERNAL included).

use std::{
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use creditd::pb::{self, GrantCategory};
use redis::AsyncCommands;
use tokio::task::JoinHandle;
use tonic::Code;

use crate::{
    fault_tools::{
        Client, Fault, FaultProxy, RedisServer, Tally, audit_at, copy_dir, free_port, own_level, reason, redis_conn,
        url_addr, url_via,
    },
    faults::{key_of, spend_until_denied, tenant_with_pool},
    harness::{Backends, TENANT, TestApp, eventually, req},
};

const POOL: i64 = 400;
/// The LOADING test's pool: traffic must outlast a background save.
const BIG_POOL: i64 = 3000;

/// Settings of the apps under fault: short timeouts so the faults resolve
/// in seconds.
const SETTINGS: &[(&str, &str)] =
    &[("postgres.statement_timeout", "500ms"), ("hot.commit_deadline", "2s"), ("redis.timeout", "1s")];

/// Two replicas spending the pool.
struct Load {
    pool: i64,
    a: TestApp,
    _b: TestApp,
    tally: Arc<Tally>,
    clients: Vec<JoinHandle<()>>,
}

async fn start_load(backends: Backends, extra: &[(&str, &str)]) -> Load {
    start_load_of(backends, extra, POOL).await
}

async fn start_load_of(backends: Backends, extra: &[(&str, &str)], pool: i64) -> Load {
    let mut settings: Vec<(&str, &str)> = SETTINGS.to_vec();
    settings.extend_from_slice(extra);
    let a = TestApp::spawn_on(backends.clone(), &settings).await;
    a.create_tenant(TENANT).await;
    let b = TestApp::spawn_on(backends.clone(), &settings).await;
    b.adopt_keys(&a);
    tenant_with_pool(&a, 4, &pool.to_string()).await;
    let tally = Arc::new(Tally::default());
    let client = Client::new(&[&a, &b]);
    let clients = (0..8).map(|c| tokio::spawn(spend_until_denied(client.clone(), c, tally.clone()))).collect();
    Load { pool, a, _b: b, tally, clients }
}

impl Load {
    /// Pauses the replica's replication (its link to the primary goes
    /// through `link`) and waits for 80 more acknowledged commits: writes
    /// the replica never receives.
    async fn write_past_the_replica(&self, link: &FaultProxy) {
        link.set(Fault::Blackhole);
        let paused_at = self.tally.acked_count();
        self.wait_acked(paused_at + 80).await;
    }

    async fn wait_acked(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.tally.acked_count() < n {
            assert!(Instant::now() < deadline, "traffic does not flow ({} acked)", self.tally.acked_count());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Waits for the clients to spend the pool, then audits.
    async fn finish(self, what: &str) {
        let url = self.a.backends.redis_url.clone();
        self.finish_at(what, &url).await
    }

    /// `finish`, auditing Redis at `redis_url`.
    async fn finish_at(self, what: &str, redis_url: &str) {
        for c in self.clients {
            tokio::time::timeout(Duration::from_secs(120), c).await.expect("clients spend the pool").unwrap();
        }
        let acked = self.tally.acked.lock().unwrap().clone();
        let audit = audit_at(&self.a, &acked, redis_url).await;
        assert_eq!(audit.used, rust_decimal::Decimal::from(self.pool), "{what}: Σ committed = the pool: {audit:?}");
        assert_eq!(acked.len() as i64, self.pool, "{what}: every credit acknowledged once");
        let (balance, held) = own_level(&self.a, "pool").await;
        assert_eq!((balance.as_str(), held.as_str()), ("0", "0"), "{what}");
        eprintln!(
            "{what}: {} commits, {} reserve and {} commit retries, {} holds lost",
            acked.len(),
            self.tally.reserve_retries.load(std::sync::atomic::Ordering::Relaxed),
            self.tally.commit_retries.load(std::sync::atomic::Ordering::Relaxed),
            self.tally.holds_lost.load(std::sync::atomic::Ordering::Relaxed),
        );
    }
}

async fn fence_generation(redis_url: &str, prefix: &str) -> Option<String> {
    redis_conn(redis_url).await.hget(key_of(prefix, "fence"), "g").await.unwrap()
}

/// The fault was real: the state Redis came back with was found behind
/// and the tenant rebuilt (a new generation).
async fn assert_rebuilt(redis_url: &str, prefix: &str, before: &Option<String>) {
    let now = fence_generation(redis_url, prefix).await;
    assert!(before.is_some() && now.is_some() && now != *before, "rebuilt: generation {before:?} -> {now:?}");
}

/// The reproduction, step by step: a snapshot taken with 100
/// credits, 100 spent, Redis restored from the snapshot. The restored
/// Redis is found behind PostgreSQL before it decides anything: the next
/// Reserve of 100 is denied, and the balance is 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_snapshot_is_never_trusted() {
    let mut redis = RedisServer::start_with(&[]).await;
    let mut backends = Backends::fresh().await;
    backends.redis_url = redis.url();
    let app = TestApp::spawn_on(backends.clone(), SETTINGS).await;
    app.create_tenant(TENANT).await;
    app.account("u", None, false, None).await;
    app.grant("u", "100", GrantCategory::Plan).await;
    assert_eq!(app.available("u").await, "100");

    let mut conn = redis_conn(&redis.url()).await;
    let _: () = redis::cmd("SAVE").query_async(&mut conn).await.unwrap();
    let backup = redis.dir().join("backup.rdb");
    std::fs::copy(redis.dir().join("dump.rdb"), &backup).unwrap();
    let generation = fence_generation(&redis.url(), &backends.key_prefix).await;

    let held = app.reserve("u", "100", "r1").await.unwrap();
    assert!(held.granted);
    app.commit(&held.reservation_id, "100", "c1").await.unwrap();
    assert_eq!(app.available("u").await, "0");

    redis.kill();
    std::fs::copy(&backup, redis.dir().join("dump.rdb")).unwrap();
    redis.crash_and_restart().await;

    // Every answer until the rebuild is done is UNAVAILABLE (retryable);
    // none grants.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut unavailable = 0;
    let second = loop {
        match app.reserve("u", "100", "r2").await {
            Ok(r) => break r,
            Err(s) if s.code() == Code::Unavailable => {
                unavailable += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(s) => panic!("reserve after the restore: {s:?}"),
        }
        assert!(Instant::now() < deadline, "the tenant never came back");
    };
    assert!(!second.granted, "a restored snapshot granted credits already spent: {second:?}");
    assert_eq!(app.available("u").await, "0");
    assert_ne!(fence_generation(&redis.url(), &backends.key_prefix).await, generation, "rebuilt: a new generation");
    let pg = backends.pg().await;
    let used: rust_decimal::Decimal =
        sqlx::query_scalar("SELECT SUM(amount) FROM usage_events").fetch_one(&pg).await.unwrap();
    assert_eq!(used, rust_decimal::Decimal::from(100));
    eprintln!("restored snapshot: {unavailable} UNAVAILABLE answers before the rebuilt tenant answered");
}

/// (a) An older RDB snapshot restored under load.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_older_rdb_restored_under_load_spends_nothing_twice() {
    let mut redis = RedisServer::start_with(&[]).await;
    let mut backends = Backends::fresh().await;
    backends.redis_url = redis.url();
    let load = start_load(backends.clone(), &[]).await;
    load.wait_acked(60).await;
    let before = fence_generation(&redis.url(), &backends.key_prefix).await;
    let mut conn = redis_conn(&redis.url()).await;
    let _: () = redis::cmd("SAVE").query_async(&mut conn).await.unwrap();
    let backup = redis.dir().join("backup.rdb");
    std::fs::copy(redis.dir().join("dump.rdb"), &backup).unwrap();
    load.wait_acked(load.tally.acked_count() + 80).await;
    redis.kill();
    std::fs::copy(&backup, redis.dir().join("dump.rdb")).unwrap();
    redis.crash_and_restart().await;
    load.finish("older RDB restored").await;
    assert_rebuilt(&redis.url(), &backends.key_prefix, &before).await;
}

/// (c) `appendfsync everysec` losing its last writes: the AOF is cut back
/// to an earlier point (a copy of the AOF directory taken under load), as
/// a host crash that loses the last second of writes leaves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_everysec_aof_that_lost_writes_spends_nothing_twice() {
    let mut redis =
        RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "everysec", "--aof-load-truncated", "yes"])
            .await;
    let mut backends = Backends::fresh().await;
    backends.redis_url = redis.url();
    let load = start_load(backends.clone(), &[]).await;
    load.wait_acked(60).await;
    let before = fence_generation(&redis.url(), &backends.key_prefix).await;
    // Let the fsync of everysec catch up, then copy the AOF as it is.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let earlier = redis.dir().join("aof-earlier");
    copy_dir(&redis.dir().join("appendonlydir"), &earlier);
    load.wait_acked(load.tally.acked_count() + 80).await;
    redis.kill();
    std::fs::remove_dir_all(redis.dir().join("appendonlydir")).unwrap();
    copy_dir(&earlier, &redis.dir().join("appendonlydir"));
    redis.crash_and_restart().await;
    load.finish("everysec AOF cut back").await;
    assert_rebuilt(&redis.url(), &backends.key_prefix, &before).await;
}

/// Waits until `replica` reports its link to the primary up and in sync.
async fn wait_replicating(replica_url: &str) {
    eventually(Duration::from_secs(20), || async {
        let info: String =
            redis::cmd("INFO").arg("replication").query_async(&mut redis_conn(replica_url).await).await.unwrap();
        info.contains("master_link_status:up")
    })
    .await;
}

/// (b) A real primary and replica: replication is paused (the replica's
/// link to the primary goes through a proxy that stops forwarding), the
/// primary takes writes the replica never gets, dies, and the replica is
/// promoted and takes over behind creditd's endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_promoted_while_behind_spends_nothing_twice() {
    let mut primary = RedisServer::start_with(&[]).await;
    let link = FaultProxy::start(url_addr(&primary.url())).await;
    let link_port = link.port().to_string();
    let replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &link_port]).await;
    wait_replicating(&replica.url()).await;
    let front = FaultProxy::start(url_addr(&primary.url())).await;
    let mut backends = Backends::fresh().await;
    backends.redis_url = url_via(&primary.url(), front.port());
    let load = start_load(backends.clone(), &[]).await;
    load.wait_acked(60).await;
    let before = fence_generation(&primary.url(), &backends.key_prefix).await;
    load.write_past_the_replica(&link).await;
    primary.kill();
    let mut conn = redis_conn(&replica.url()).await;
    let _: () = redis::cmd("REPLICAOF").arg("NO").arg("ONE").query_async(&mut conn).await.unwrap();
    front.set_upstream(url_addr(&replica.url()));
    front.cut_all().await;
    front.set(Fault::Pass);
    load.finish("replica promoted while behind").await;
    assert_rebuilt(&replica.url(), &backends.key_prefix, &before).await;
}

/// A real `redis-sentinel` (the Debian package's binary; redis-server in
/// sentinel mode where it is missing) watching `primary`, with a config
/// file of its own. Killed on drop.
struct Sentinel {
    child: Child,
    port: u16,
    dir: std::path::PathBuf,
}

impl Sentinel {
    async fn start(primary_port: u16) -> Sentinel {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("creditd-sentinel-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let conf = dir.join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {}\nsentinel monitor m 127.0.0.1 {primary_port} 1\n\
                 sentinel down-after-milliseconds m 1000\nsentinel failover-timeout m 10000\n\
                 sentinel parallel-syncs m 1\n",
                dir.display()
            ),
        )
        .unwrap();
        let packaged = std::path::Path::new("/usr/bin/redis-sentinel").exists();
        let mut args: Vec<std::ffi::OsString> = if packaged {
            vec!["redis-sentinel".into(), conf.clone().into()]
        } else {
            vec!["redis-server".into(), conf.clone().into(), "--sentinel".into()]
        };
        // As RedisServer: the kernel kills the sentinel if the test dies.
        let mut command = if std::path::Path::new("/usr/bin/setpriv").exists() {
            args.splice(0..0, ["--pdeathsig".into(), "KILL".into(), "--".into()]);
            Command::new("/usr/bin/setpriv")
        } else {
            Command::new(args.remove(0))
        };
        command.args(&args);
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-sentinel");
        let sentinel = Sentinel { child, port, dir };
        eventually(Duration::from_secs(20), || async {
            let Ok(client) = redis::Client::open(sentinel.url()) else { return false };
            let Ok(mut conn) = client.get_multiplexed_async_connection().await else { return false };
            let addr: redis::RedisResult<Option<(String, u16)>> =
                redis::cmd("SENTINEL").arg("get-master-addr-by-name").arg("m").query_async(&mut conn).await;
            matches!(addr, Ok(Some((_, p))) if p == primary_port)
        })
        .await;
        sentinel
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    async fn primary_port(&self) -> Option<u16> {
        let mut conn = redis_conn(&self.url()).await;
        let addr: Option<(String, u16)> =
            redis::cmd("SENTINEL").arg("get-master-addr-by-name").arg("m").query_async(&mut conn).await.ok()?;
        addr.map(|(_, p)| p)
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Failover is followed: creditd finds the primary through a real
/// Sentinel; the primary dies with writes its replica never received
/// (replication paused), the Sentinel promotes the replica, and creditd
/// fences the new primary (finding it behind, rebuilding) before it
/// decides anything on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sentinel_failover_to_a_behind_replica_spends_nothing_twice() {
    let mut primary = RedisServer::start_with(&[]).await;
    let link = FaultProxy::start(url_addr(&primary.url())).await;
    let link_port = link.port().to_string();
    let replica = RedisServer::start_with(&[
        "--replicaof",
        "127.0.0.1",
        &link_port,
        // What the replica announces to the primary (and so to the
        // Sentinel): its own port, not the proxy's.
        "--replica-announce-ip",
        "127.0.0.1",
    ])
    .await;
    wait_replicating(&replica.url()).await;
    let sentinel = Sentinel::start(primary.port).await;
    // The Sentinel learns of the replica from the primary's INFO.
    eventually(Duration::from_secs(30), || async {
        let mut conn = redis_conn(&sentinel.url()).await;
        let replicas: redis::Value =
            redis::cmd("SENTINEL").arg("replicas").arg("m").query_async(&mut conn).await.unwrap();
        matches!(replicas, redis::Value::Array(ref r) if !r.is_empty())
    })
    .await;

    let mut backends = Backends::fresh().await;
    backends.redis_url = sentinel.url();
    let load = start_load(backends.clone(), &[("redis.sentinel_master", "m")]).await;
    load.wait_acked(60).await;
    let before = fence_generation(&primary.url(), &backends.key_prefix).await;
    load.write_past_the_replica(&link).await;
    primary.kill();
    eventually(Duration::from_secs(60), || async { sentinel.primary_port().await == Some(replica.port) }).await;
    load.finish_at("sentinel failover to a behind replica", &replica.url()).await;
    assert_rebuilt(&replica.url(), &backends.key_prefix, &before).await;
}

/// (d) A restart with a dataset big enough that Redis answers LOADING for
/// a while: every call meanwhile is UNAVAILABLE (retryable), none
/// INTERNAL, and the audit holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn loading_after_a_restart_is_retryable() {
    let mut redis = RedisServer::start_with(&["--enable-debug-command", "yes"]).await;
    // Ballast outside creditd's keys, before the load (DEBUG POPULATE
    // blocks Redis): a few seconds of loading at the restart.
    let mut conn = redis_conn(&redis.url()).await;
    let _: () =
        redis::cmd("DEBUG").arg("POPULATE").arg(2_000_000).arg("ballast").arg(64).query_async(&mut conn).await.unwrap();
    let mut backends = Backends::fresh().await;
    backends.redis_url = redis.url();
    let load = start_load_of(backends.clone(), &[], BIG_POOL).await;
    load.wait_acked(60).await;
    let before = fence_generation(&redis.url(), &backends.key_prefix).await;
    // A background save (Redis keeps serving), then a crash: the restart
    // loads the saved file, older than the state at the crash.
    let _: () = redis::cmd("BGSAVE").query_async(&mut conn).await.unwrap();
    eventually(Duration::from_secs(60), || async {
        let info: String =
            redis::cmd("INFO").arg("persistence").query_async(&mut redis_conn(&redis.url()).await).await.unwrap();
        info.contains("rdb_bgsave_in_progress:0") && info.contains("rdb_last_bgsave_status:ok")
    })
    .await;
    load.wait_acked(load.tally.acked_count() + 20).await;
    redis.kill();
    redis.spawn_process();
    // Redis answers LOADING while it reads the file.
    let mut saw_loading = false;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let Ok(client) = redis::Client::open(redis.url()) else { continue };
        match client.get_multiplexed_async_connection().await {
            Ok(mut c) => match redis::cmd("PING").query_async::<String>(&mut c).await {
                Ok(_) => break,
                Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::BusyLoading) => {
                    saw_loading = true;
                }
                Err(_) => {}
            },
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::BusyLoading) => saw_loading = true,
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    redis.wait_answering().await;
    assert!(saw_loading, "the restart was long enough to answer LOADING");
    load.finish("LOADING after a restart").await;
    assert_rebuilt(&redis.url(), &backends.key_prefix, &before).await;
}

/// A call on a tenant being rebuilt names that state: UNAVAILABLE with
/// reason TENANT_LOADING, while another tenant keeps answering.
#[tokio::test]
async fn a_tenant_being_rebuilt_answers_tenant_loading_and_others_serve() {
    let backends = Backends::fresh().await;
    let app = TestApp::spawn_on(backends.clone(), &[]).await;
    app.create_tenant(TENANT).await;
    app.create_tenant("t-other").await;
    app.account("u", None, false, None).await;
    app.grant("u", "10", GrantCategory::Plan).await;
    app.account_in("t-other", "v", None, false, None).await;
    app.grant_in("t-other", "v", "10", GrantCategory::Plan).await;

    // Hold the tenant's rebuild lock, as a replica mid-rebuild does, and
    // drop its hot state.
    let pg = backends.pg().await;
    let mut lock = pg.begin().await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('creditd.rebuild.' || $1, 0))")
        .bind(TENANT)
        .execute(&mut *lock)
        .await
        .unwrap();
    let mut conn = backends.redis().await;
    let _: () = conn.del(key_of(&backends.key_prefix, "fence")).await.unwrap();

    let denied = app.reserve("u", "1", "r1").await.unwrap_err();
    assert_eq!(denied.code(), Code::Unavailable, "{denied:?}");
    assert_eq!(reason(&denied), "TENANT_LOADING", "{denied:?}");
    let other = app
        .credit
        .clone()
        .get_balance(req("t-other", pb::GetBalanceRequest { account_id: "v".into() }))
        .await
        .expect("another tenant keeps serving")
        .into_inner();
    assert_eq!(other.available, "10");

    lock.rollback().await.unwrap();
    eventually(Duration::from_secs(20), || async { app.reserve("u", "1", "r1").await.is_ok_and(|r| r.granted) }).await;
}
