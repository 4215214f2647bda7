//! Faults of the backends under load, each bounded in time, on loopback
//! only, leaving no process behind (see `fault_tools`):
//!
//! - Redis killed and restarted empty: the tenant is rebuilt from
//!   PostgreSQL (its calls answer UNAVAILABLE meanwhile), and not one
//!   credit is granted twice. Restores, rollbacks and failovers are in
//!   `fencing.rs`.
//! - PostgreSQL unreachable for 10 s: Reserve keeps working; Commit fails
//!   UNAVAILABLE until it is back and is retried with its key; nothing is
//!   reverted without PostgreSQL's answer.
//! - Redis slow, then silent, then refusing: calls fail UNAVAILABLE within
//!   the configured timeout, and nothing leaks once it is back.
//!
//! Every test ends with the same audit: each acknowledged commit recorded
//! exactly once, nothing else recorded, every hold resolved, Redis
//! balances equal to the ledger.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use creditd::pb::{self, DenialReason, GrantCategory};
use redis::AsyncCommands;
use tonic::Code;

use crate::{
    fault_tools::{
        Acked, Client, Fault, FaultProxy, HealthWatch, NOT_SERVING, RedisServer, SERVING, Tally, audit, own_level,
        process_alive, reason, redis_conn, retryable, url_addr, url_via,
    },
    harness::eventually,
    harness::{Backends, TENANT, TestApp, req},
};

/// Sets up the tenant: `pool` with `grant` plan credits, and users
/// `u0`..`u{users}` drawing on it.
pub(crate) async fn tenant_with_pool(app: &TestApp, users: usize, grant: &str) {
    app.account("pool", None, false, None).await;
    for i in 0..users {
        app.account(&format!("u{i}"), Some("pool"), true, None).await;
    }
    app.grant("pool", grant, GrantCategory::Plan).await;
}

pub(crate) fn key_of(prefix: &str, what: &str) -> String {
    format!("{prefix}{{t:{TENANT}}}:{what}")
}

// ---- Redis lost ------------------------------------------------------------

/// A client of the Redis-loss test: reserve 1 credit, commit 1, until the
/// pool is spent. Each step is retried with its key while the service
/// answers UNAVAILABLE; a commit answered RESERVATION_NOT_FOUND lost its
/// hold with Redis, and the client starts that unit of work over with
/// new keys.
pub(crate) async fn spend_until_denied(client: Client, c: usize, tally: Arc<Tally>) {
    let mut attempt = c;
    for n in 0.. {
        let mut generation = 0;
        loop {
            let key = format!("{c}-{n}-{generation}");
            let account = format!("u{}", c % 4);
            let reserved =
                client.reserve(&account, "1", &format!("r-{key}"), Duration::from_secs(60), &tally, &mut attempt).await;
            if !reserved.granted {
                let denial = reserved.denial.expect("a denial says why");
                assert_eq!(denial.reason, DenialReason::InsufficientCredits as i32, "{denial:?}");
                return;
            }
            let rid = reserved.reservation_id;
            // The work the credits pay for: holds are open when Redis dies.
            tokio::time::sleep(Duration::from_millis(30)).await;
            let committed = loop {
                let sent = Instant::now();
                match client.commit_once(&rid, "1", &format!("c-{key}"), &mut attempt).await {
                    Ok(done) => break Some((done, sent)),
                    Err(s) if retryable(&s) => {
                        tally.commit_retries.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Err(s) if s.code() == Code::NotFound && reason(&s) == "RESERVATION_NOT_FOUND" => break None,
                    Err(s) => panic!("commit c-{key}: unexpected failure {s:?}"),
                }
            };
            match committed {
                Some((done, sent)) => {
                    assert_eq!(done.amount, "1");
                    tally.acked.lock().unwrap().push(Acked::new(done.event_id, rid, sent));
                    break;
                }
                None => {
                    tally.holds_lost.fetch_add(1, Ordering::Relaxed);
                    generation += 1;
                }
            }
        }
    }
}

/// Redis is killed (SIGKILL) under reserve/commit traffic on two replicas
/// and restarted empty on the same port. Clients keep spending a pool of
/// 600 credits, 1 at a time, until it is denied.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_restarted_empty_under_load_grants_nothing_twice() {
    const POOL: i64 = 600;
    let mut redis = RedisServer::start().await;
    let redis_pid = redis.pid().unwrap();
    let mut backends = Backends::fresh().await;
    backends.redis_url = redis.url();
    let settings = [("postgres.statement_timeout", "500ms"), ("hot.commit_deadline", "2s"), ("redis.timeout", "1s")];
    let a = TestApp::spawn_on(backends.clone(), &settings).await;
    a.create_tenant(TENANT).await;
    let b = TestApp::spawn_on(backends.clone(), &settings).await;
    b.adopt_keys(&a);
    tenant_with_pool(&a, 4, &POOL.to_string()).await;
    let health = HealthWatch::start(vec![a.raw_admin_channel(), b.raw_admin_channel()]);
    let fence_key = key_of(&backends.key_prefix, "fence");
    let generation_before: String = redis_conn(&backends.redis_url).await.hget(&fence_key, "g").await.unwrap();

    let tally = Arc::new(Tally::default());
    let client = Client::new(&[&a, &b]);
    let clients: Vec<_> = (0..8).map(|c| tokio::spawn(spend_until_denied(client.clone(), c, tally.clone()))).collect();

    // Kill Redis once traffic runs, with most of the pool left.
    let deadline = Instant::now() + Duration::from_secs(30);
    while tally.acked_count() < 100 {
        assert!(Instant::now() < deadline, "traffic does not flow");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let killed_at = Instant::now();
    let acked_before = tally.acked_count();
    redis.kill();
    assert!(!process_alive(redis_pid), "redis-server was killed");
    tokio::time::sleep(Duration::from_millis(500)).await;
    redis.restart_empty().await;
    let restarted_pid = redis.pid().unwrap();
    assert!(acked_before < 300, "the fault came while most of the pool was left ({acked_before} spent)");

    // The tenant is rebuilt with a new generation; both replicas serve
    // (health follows Redis being reachable, not one tenant's state).
    eventually(Duration::from_secs(30), || async {
        let now: Option<String> = redis_conn(&backends.redis_url).await.hget(&fence_key, "g").await.unwrap();
        now.is_some_and(|g| g != generation_before)
    })
    .await;
    for replica in 0..2 {
        health.wait_for(replica, SERVING, killed_at, Duration::from_secs(30)).await;
    }

    for c in clients {
        tokio::time::timeout(Duration::from_secs(90), c).await.expect("clients spend the pool").unwrap();
    }
    let acked = tally.acked.lock().unwrap().clone();
    let retries = tally.reserve_retries.load(Ordering::Relaxed) + tally.commit_retries.load(Ordering::Relaxed);
    assert!(retries > 0, "clients saw UNAVAILABLE while Redis was away");
    assert!(tally.holds_lost.load(Ordering::Relaxed) > 0, "holds open when Redis died were lost with it");

    // The pool is spent exactly: every credit committed once, none twice,
    // none lost with the holds Redis forgot.
    let audit = audit(&a, &acked).await;
    assert_eq!(audit.used, rust_decimal::Decimal::from(POOL), "Σ committed = the pool: {audit:?}");
    assert_eq!(acked.len() as i64, POOL);
    let (balance, held) = own_level(&a, "pool").await;
    assert_eq!((balance.as_str(), held.as_str()), ("0", "0"));
    eprintln!(
        "redis restarted empty: {} commits ({acked_before} before the kill), {} reserve and {} commit retries, \
         {} holds lost with Redis",
        acked.len(),
        tally.reserve_retries.load(Ordering::Relaxed),
        tally.commit_retries.load(Ordering::Relaxed),
        tally.holds_lost.load(Ordering::Relaxed),
    );
    drop(health);
    drop((a, b));
    drop(redis);
    assert!(!process_alive(restarted_pid), "the restarted redis-server is gone with its guard");
}

// ---- PostgreSQL unreachable --------------------------------------------------

/// A client of the PostgreSQL-outage test: reserve 1, commit 1, each commit
/// retried with its key until acknowledged. A `sleepy` client, at its
/// first failed commit while PostgreSQL is down, goes quiet for longer
/// than the commit deadline (as a client stuck elsewhere would), then
/// retries with the same key: its commit must not have been reverted.
async fn commit_through_outage(
    client: Client,
    c: usize,
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
    pg_down: Arc<AtomicBool>,
    sleepy: bool,
) {
    let mut attempt = c;
    let mut slept = false;
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        let key = format!("{c}-{n}");
        let reserved = client
            .reserve(&format!("u{c}"), "1", &format!("r-{key}"), Duration::from_secs(60), &tally, &mut attempt)
            .await;
        assert!(reserved.granted, "the pool is large enough: {reserved:?}");
        let rid = reserved.reservation_id;
        loop {
            let sent = Instant::now();
            match client.commit_once(&rid, "1", &format!("c-{key}"), &mut attempt).await {
                Ok(done) => {
                    tally.acked.lock().unwrap().push(Acked::new(done.event_id, rid, sent));
                    break;
                }
                Err(s) if retryable(&s) => {
                    tally.commit_retries.fetch_add(1, Ordering::Relaxed);
                    if sleepy && !slept && pg_down.load(Ordering::Relaxed) {
                        slept = true;
                        tokio::time::sleep(Duration::from_secs(5)).await;
                    } else {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
                Err(s) => panic!("commit c-{key}: unexpected failure {s:?}"),
            }
        }
        n += 1;
    }
}

/// A client that only reserves and releases: none of it needs PostgreSQL.
async fn reserve_and_release(client: Client, c: usize, tally: Arc<Tally>, stop: Arc<AtomicBool>) {
    let mut attempt = c;
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        let key = format!("rr-{c}-{n}");
        let reserved = client.reserve(&format!("u{c}"), "1", &key, Duration::from_secs(60), &tally, &mut attempt).await;
        assert!(reserved.granted, "the pool is large enough: {reserved:?}");
        client.release(&reserved.reservation_id, &format!("l-{key}"), &mut attempt).await;
        n += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// PostgreSQL is cut off (every connection closed, new ones refused, by a
/// proxy in front of it) for 10 s under traffic on two replicas.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_unreachable_for_ten_seconds() {
    const OUTAGE: Duration = Duration::from_secs(10);
    let backends = Backends::fresh().await;
    let proxy = FaultProxy::start(url_addr(&backends.database_url)).await;
    let mut via_proxy = backends.clone();
    via_proxy.database_url = url_via(&backends.database_url, proxy.port());
    // Commits are overdue 1.5 s after their Redis step.
    let settings = [("postgres.statement_timeout", "500ms"), ("hot.commit_deadline", "1500ms")];
    let a = TestApp::spawn_on(via_proxy.clone(), &settings).await;
    a.create_tenant(TENANT).await;
    let b = TestApp::spawn_on(via_proxy.clone(), &settings).await;
    b.adopt_keys(&a);
    tenant_with_pool(&a, 6, "10000").await;
    let health = HealthWatch::start(vec![a.raw_admin_channel(), b.raw_admin_channel()]);

    let client = Client::new(&[&a, &b]);
    let committers = Arc::new(Tally::default());
    let reservers = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let pg_down = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for c in 0..4 {
        let sleepy = c < 2;
        clients.push(tokio::spawn(commit_through_outage(
            client.clone(),
            c,
            committers.clone(),
            stop.clone(),
            pg_down.clone(),
            sleepy,
        )));
    }
    for c in 4..6 {
        clients.push(tokio::spawn(reserve_and_release(client.clone(), c, reservers.clone(), stop.clone())));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while committers.acked_count() < 50 {
        assert!(Instant::now() < deadline, "traffic does not flow");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // A commit in doubt when the outage starts, as a replica leaves one
    // that dies between its Redis step and its PostgreSQL write (a Commit
    // that meets the outage itself fails before Redis: its key cannot be
    // checked): it must stay committing until PostgreSQL can answer.
    let doubt = a.reserve("u0", "1", "in-doubt").await.unwrap();
    let doubt_event = uuid::Uuid::now_v7().to_string();
    crate::recovery::hot_store(&a)
        .await
        .commit(
            TENANT,
            &creditd::store::hot::CommitCall {
                target: creditd::store::hot::CommitTarget::Hold(&doubt.reservation_id),
                cost: creditd::domain::Credits::from_whole(1).unwrap(),
                idempotency_key: "in-doubt",
                payload_hash: &creditd::service::payload_hash(&["in-doubt"]),
                event_id: &doubt_event,
                limit: Default::default(),
            },
        )
        .await
        .unwrap();

    // ---- the outage
    proxy.cut_all().await;
    pg_down.store(true, Ordering::Relaxed);
    let down_at = Instant::now();

    // A hold that crosses the pool's 25% alert threshold, then expires:
    // the alert cannot reach PostgreSQL, but the hold must still expire.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let big = a.reserve_ttl("pool", "8000", "big", Duration::from_secs(1)).await;
    assert!(big.granted, "{big:?}");
    let mut redis = redis_conn(&backends.redis_url).await;
    let big_hold = key_of(&backends.key_prefix, &format!("h:{}", big.reservation_id));
    let expired_by = Instant::now() + Duration::from_secs(4);
    loop {
        let state: Option<String> = redis.hget(&big_hold, "st").await.unwrap();
        if state.as_deref() == Some("expired") {
            break;
        }
        assert!(
            Instant::now() < expired_by,
            "a hold past its TTL was not expired while PostgreSQL is down (state {state:?})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Commits overdue by more than a second (the quiet clients' at least)
    // are still committing: the reaper could not ask PostgreSQL, so it
    // reverted nothing.
    tokio::time::sleep((down_at + Duration::from_secs(4)).saturating_duration_since(Instant::now())).await;
    let (now_s, now_us): (String, String) = redis::cmd("TIME").query_async(&mut redis).await.unwrap();
    let now_ms = now_s.parse::<i64>().unwrap() * 1000 + now_us.parse::<i64>().unwrap() / 1000;
    let overdue: Vec<String> =
        redis.zrangebyscore(key_of(&backends.key_prefix, "committing"), "-inf", now_ms - 1000).await.unwrap();
    assert!(!overdue.is_empty(), "the quiet clients left commits past their deadline");
    for hold in &overdue {
        let state: Option<String> = redis.hget(key_of(&backends.key_prefix, &format!("h:{hold}")), "st").await.unwrap();
        assert_eq!(state.as_deref(), Some("committing"), "hold {hold} settled without PostgreSQL");
    }

    tokio::time::sleep((down_at + OUTAGE).saturating_duration_since(Instant::now())).await;
    // PostgreSQL comes back, reached slowly at first.
    proxy.set(Fault::DelayConnect(Duration::from_millis(200)));
    pg_down.store(false, Ordering::Relaxed);
    let up_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    proxy.set(Fault::Pass);
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        tokio::time::timeout(Duration::from_secs(60), c).await.expect("clients finish").unwrap();
    }

    // Reserve worked all along: no failure, and grants in every second of
    // the outage.
    assert_eq!(reservers.reserve_retries.load(Ordering::Relaxed), 0, "a Reserve failed");
    let reserves = reservers.reserves.lock().unwrap().clone();
    let during: Vec<_> = reserves.iter().filter(|(s, e, g)| *g && *s >= down_at && *e <= up_at).collect();
    for second in 0..OUTAGE.as_secs() as u32 {
        let from = down_at + Duration::from_secs(second as u64);
        let to = from + Duration::from_secs(1);
        assert!(
            during.iter().any(|(s, _, _)| *s >= from && *s < to),
            "no Reserve granted in second {second} of the outage"
        );
    }
    // Replicas kept serving: PostgreSQL down alone does not stop Reserve.
    for replica in 0..2 {
        let statuses = health.statuses_between(replica, down_at, up_at);
        assert_eq!(statuses, vec![crate::fault_tools::SERVING], "replica {replica} health during the outage");
    }
    // No commit attempt made and answered while PostgreSQL was unreachable
    // was acknowledged, and clients saw why.
    let acked = committers.acked.lock().unwrap().clone();
    let blind: Vec<_> = acked
        .iter()
        .filter(|a| a.sent > down_at && a.answered < up_at)
        .map(|a| (a.sent - down_at, a.answered - down_at))
        .collect();
    assert!(blind.is_empty(), "commits acknowledged while PostgreSQL was unreachable (sent, answered): {blind:?}");
    assert!(committers.commit_retries.load(Ordering::Relaxed) > 0);

    let audit = audit(&a, &acked).await;
    let (balance, held) = own_level(&a, "pool").await;
    assert_eq!(held, "0");
    assert_eq!(balance, (10_000 - audit.events).to_string(), "pool balance = grant − commits");
    // The alert fired during the outage reached PostgreSQL afterwards.
    let pg = backends.pg().await;
    crate::harness::eventually(Duration::from_secs(10), || async {
        sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM alerts WHERE account_id = 'pool'")
            .fetch_one(&pg)
            .await
            .unwrap()
            > 0
    })
    .await;
    eprintln!(
        "postgres unreachable {OUTAGE:?}: {} reserves granted during it ({} in all), {} commits acknowledged, \
         {} commit retries, {} commits overdue and kept at +4 s; proxy: {:?}",
        during.len(),
        reserves.len(),
        acked.len(),
        committers.commit_retries.load(Ordering::Relaxed),
        overdue.len(),
        proxy.stats(),
    );
}

// ---- Redis slow, silent, refusing ---------------------------------------------

/// A call of `probe_all`, boxed so calls of every kind fit in one list.
type Call = std::pin::Pin<Box<dyn Future<Output = Result<(), tonic::Status>> + Send>>;

/// One call made while Redis misbehaves: what it was, how long it took,
/// how it ended.
struct Probe {
    what: String,
    took: Duration,
    code: Option<Code>,
}

/// Calls of every kind at once while a fault is on: Reserves, a Commit of
/// a hold taken before, a Charge, a GetBalance, and a Reserve whose
/// client deadline (300 ms) is shorter than the Redis timeout.
async fn probe_all(app: &TestApp, phase: &str, hold: &str) -> Vec<Probe> {
    let credit = app.credit.clone();
    let timed = |what: String, call: Call| async move {
        let start = Instant::now();
        let result = call.await;
        Probe { what, took: start.elapsed(), code: result.err().map(|s| s.code()) }
    };
    let reserve = |key: String, deadline: Option<Duration>| {
        let mut credit = credit.clone();
        Box::pin(async move {
            let mut request = req(
                TENANT,
                pb::ReserveRequest {
                    account_id: "u0".into(),
                    cost: Some(pb::reserve_request::Cost::Amount("1".into())),
                    idempotency_key: key,
                    ttl: Some(prost_types::Duration { seconds: 60, nanos: 0 }),
                    ..Default::default()
                },
            );
            if let Some(d) = deadline {
                request.set_timeout(d);
            }
            credit.reserve(request).await.map(|_| ())
        }) as Call
    };
    let mut calls = Vec::new();
    for i in 0..3 {
        calls.push(timed(format!("{phase}-r{i}"), reserve(format!("{phase}-r{i}"), None)));
    }
    calls.push(timed(format!("{phase}-d"), reserve(format!("{phase}-d"), Some(Duration::from_millis(300)))));
    let (c, g, b) = (credit.clone(), credit.clone(), credit.clone());
    let (hold, commit_key, charge_key) = (hold.to_string(), format!("{phase}-c"), format!("{phase}-g"));
    calls.push(timed(
        format!("{phase}-c"),
        Box::pin(async move {
            let request = pb::CommitRequest {
                reservation_id: hold,
                cost: Some(pb::commit_request::Cost::Amount("1".into())),
                idempotency_key: commit_key,
                ..Default::default()
            };
            c.clone().commit(req(TENANT, request)).await.map(|_| ())
        }),
    ));
    calls.push(timed(
        format!("{phase}-g"),
        Box::pin(async move {
            let request = pb::ChargeRequest {
                account_id: "u0".into(),
                cost: Some(pb::charge_request::Cost::Amount("1".into())),
                idempotency_key: charge_key,
                ..Default::default()
            };
            g.clone().charge(req(TENANT, request)).await.map(|_| ())
        }),
    ));
    calls.push(timed(
        format!("{phase}-b"),
        Box::pin(async move {
            b.clone().get_balance(req(TENANT, pb::GetBalanceRequest { account_id: "u0".into() })).await.map(|_| ())
        }),
    ));
    futures::future::join_all(calls).await
}

/// Redis behind a proxy turns slow (every chunk held longer than
/// `redis.timeout`), then silent (nothing forwarded), then refusing (every
/// connection closed). Calls fail closed, within the configured bound, and
/// clients retrying with their keys afterwards leave nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_slow_or_unreachable_fails_closed_in_time() {
    const TIMEOUT: Duration = Duration::from_secs(1);
    // Generous for a loaded 2-core machine; the point is "bounded".
    const BOUND: Duration = Duration::from_secs(4);
    let backends = Backends::fresh().await;
    let proxy = FaultProxy::start(url_addr(&backends.redis_url)).await;
    let mut via_proxy = backends.clone();
    via_proxy.redis_url = url_via(&backends.redis_url, proxy.port());
    let app = TestApp::spawn_on(via_proxy, &[("redis.timeout", "1s")]).await;
    app.create_tenant(TENANT).await;
    tenant_with_pool(&app, 1, "1000").await;
    let health = HealthWatch::start(vec![app.raw_admin_channel()]);

    let phases = [
        ("slow", Fault::DelayChunks(TIMEOUT + Duration::from_millis(500))),
        ("silent", Fault::Blackhole),
        ("refusing", Fault::Refuse),
    ];
    // One hold per phase to commit during it.
    let mut holds = Vec::new();
    for (phase, _) in &phases {
        let r = app.reserve("u0", "1", &format!("{phase}-hold")).await.unwrap();
        assert!(r.granted);
        holds.push(r.reservation_id);
    }
    let mut worst = Vec::new();
    for ((phase, fault), hold) in phases.iter().zip(&holds) {
        match fault {
            Fault::Refuse => proxy.cut_all().await,
            other => proxy.set(*other),
        }
        let since = Instant::now();
        let probes = probe_all(&app, phase, hold).await;
        for p in &probes {
            if p.what.ends_with("-d") {
                // The client's own deadline is shorter than redis.timeout.
                assert!(
                    matches!(p.code, Some(Code::DeadlineExceeded | Code::Cancelled | Code::Unavailable)),
                    "{}: {:?}",
                    p.what,
                    p.code
                );
                assert!(p.took <= Duration::from_millis(300) + BOUND - TIMEOUT, "{} took {:?}", p.what, p.took);
            } else {
                assert_eq!(p.code, Some(Code::Unavailable), "{} fails closed", p.what);
                assert!(p.took <= BOUND, "{} took {:?}, past redis.timeout + 3 s", p.what, p.took);
            }
        }
        health.wait_for(0, NOT_SERVING, since, BOUND).await;
        if let Fault::DelayChunks(delay) = fault {
            // Let the delayed requests reach Redis: they run there after
            // their callers were told UNAVAILABLE (retries replay them).
            tokio::time::sleep((since + *delay * 2).saturating_duration_since(Instant::now())).await;
        }
        let slowest = probes.iter().map(|p| p.took).max().unwrap();
        let deadline = probes.iter().find(|p| p.what.ends_with("-d")).unwrap();
        worst.push(format!(
            "{phase}: slowest call {slowest:?}, 300 ms client deadline -> {:?} in {:?}",
            deadline.code.unwrap(),
            deadline.took
        ));
    }

    // Redis comes back: serving again, and clients retry every call that
    // failed, with the same keys.
    proxy.set(Fault::Pass);
    let back = Instant::now();
    health.wait_for(0, SERVING, back, Duration::from_secs(15)).await;
    let recovered_in = back.elapsed();
    let client = Client::new(&[&app]);
    let tally = Tally::default();
    let mut attempt = 0;
    let mut replayed = 0;
    for ((phase, _), hold) in phases.iter().zip(&holds) {
        for key in [format!("{phase}-r0"), format!("{phase}-r1"), format!("{phase}-r2"), format!("{phase}-d")] {
            let r = client.reserve("u0", "1", &key, Duration::from_secs(60), &tally, &mut attempt).await;
            assert!(r.granted, "{key}: {r:?}");
            replayed += r.replayed as usize;
            client.release(&r.reservation_id, &format!("{key}-release"), &mut attempt).await;
        }
        let commit = loop {
            match client.commit_once(hold, "1", &format!("{phase}-c"), &mut attempt).await {
                Ok(c) => break c,
                Err(s) if retryable(&s) => tokio::time::sleep(Duration::from_millis(50)).await,
                Err(s) => panic!("{phase}-c after recovery: {s:?}"),
            }
        };
        replayed += commit.replayed as usize;
        tally.acked.lock().unwrap().push(Acked::new(commit.event_id, hold.clone(), Instant::now()));
        let charge = loop {
            match app.charge("u0", "1", &format!("{phase}-g")).await {
                Ok(c) => break c,
                Err(s) if retryable(&s) => tokio::time::sleep(Duration::from_millis(50)).await,
                Err(s) => panic!("{phase}-g after recovery: {s:?}"),
            }
        };
        replayed += charge.replayed as usize;
        tally.acked.lock().unwrap().push(Acked::new(charge.event_id, String::new(), Instant::now()));
    }
    assert!(replayed > 0, "calls Redis ran after the caller gave up are answered by replays");
    let acked = tally.acked.lock().unwrap().clone();
    let audit = audit(&app, &acked).await;
    assert_eq!(audit.events, 6);
    let (balance, held) = own_level(&app, "pool").await;
    assert_eq!((balance.as_str(), held.as_str()), ("994", "0"), "no hold leaked, nothing charged twice");
    eprintln!(
        "redis slow/silent/refusing (redis.timeout {TIMEOUT:?}): {}; serving again {recovered_in:?} after it \
         passed; {replayed} retried calls answered as replays of work Redis did after the caller gave up",
        worst.join(", ")
    );
}

// ---- the tools themselves --------------------------------------------------------

/// The proxy does what each fault says, and nothing a test starts outlives
/// it, even when the test panics.
#[tokio::test]
async fn fault_tools_do_what_they_say_and_leave_nothing_behind() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // An echo server behind the proxy.
    let echo = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let echo_addr = echo.local_addr().unwrap();
    let echo_task = tokio::spawn(async move {
        loop {
            let (mut s, _) = echo.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let proxy = FaultProxy::start(echo_addr).await;
    let connect = || tokio::net::TcpStream::connect(("127.0.0.1", proxy.port()));
    // Writes "ping" and reads 4 bytes back within `limit`: what came back
    // (None: nothing, or the connection closed) and how long it took.
    let roundtrip = |mut s: tokio::net::TcpStream, limit: Duration| async move {
        let start = Instant::now();
        let mut buf = [0u8; 4];
        let got = match s.write_all(b"ping").await {
            Ok(()) => matches!(tokio::time::timeout(limit, s.read_exact(&mut buf)).await, Ok(Ok(_))),
            Err(_) => false,
        };
        (got.then_some(buf), start.elapsed(), s)
    };

    let (got, _, _) = roundtrip(connect().await.unwrap(), Duration::from_secs(2)).await;
    assert_eq!(got, Some(*b"ping"), "pass forwards");

    proxy.set(Fault::DelayChunks(Duration::from_millis(200)));
    let (got, took, _) = roundtrip(connect().await.unwrap(), Duration::from_secs(2)).await;
    assert!(got.is_some() && took >= Duration::from_millis(400), "delayed both ways: {took:?}");

    proxy.set(Fault::DelayConnect(Duration::from_millis(300)));
    let (got, took, _) = roundtrip(connect().await.unwrap(), Duration::from_secs(2)).await;
    assert!(got.is_some() && took >= Duration::from_millis(300), "connection delayed: {took:?}");

    proxy.set(Fault::Pass);
    let held = connect().await.unwrap();
    proxy.set(Fault::Blackhole);
    let (got, _, mut held) = roundtrip(held, Duration::from_millis(300)).await;
    assert_eq!(got, None, "blackhole forwards nothing");
    proxy.set(Fault::Pass);
    let mut buf = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(2), held.read_exact(&mut buf)).await.unwrap().unwrap();
    assert_eq!(buf, *b"ping", "what a blackhole held flows once it passes");

    proxy.set(Fault::Refuse);
    let cut = tokio::time::timeout(Duration::from_secs(2), held.read(&mut buf)).await.unwrap();
    assert!(matches!(cut, Ok(0) | Err(_)), "open connections are cut");
    let (got, _, _) = roundtrip(connect().await.unwrap(), Duration::from_secs(2)).await;
    assert_eq!(got, None, "new connections are closed");
    assert!(proxy.stats().refused.load(Ordering::Relaxed) >= 1);
    assert!(proxy.stats().cut.load(Ordering::Relaxed) >= 1);

    // A panicking test: its redis-server and proxy go with it.
    let (tx, rx) = tokio::sync::oneshot::channel();
    let doomed = tokio::spawn(async move {
        let redis = RedisServer::start().await;
        let proxy = FaultProxy::start(([127, 0, 0, 1], redis.port).into()).await;
        tx.send((redis.pid().unwrap(), proxy.port())).unwrap();
        panic!("a failing fault test");
    });
    assert!(doomed.await.unwrap_err().is_panic());
    let (pid, port) = rx.await.unwrap();
    assert!(!process_alive(pid), "redis-server {pid} outlived its test");
    // The proxy's tasks end at their next poll after the abort.
    crate::harness::eventually(Duration::from_secs(2), || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err()
    })
    .await;
    echo_task.abort();
}

/// Liveness follows the process, readiness follows Redis: with Redis gone,
/// every service name reports NOT_SERVING except `creditd.liveness`, so a
/// liveness probe asking it never restarts replicas during an outage.
#[tokio::test]
async fn liveness_stays_serving_while_redis_is_down() {
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};
    let mut redis = RedisServer::start().await;
    let mut backends = Backends::fresh().await;
    backends.redis_url = redis.url();
    let app = TestApp::spawn_on(backends, &[("redis.timeout", "500ms")]).await;
    let health = HealthClient::new(app.raw_admin_channel());
    let status = |name: &'static str| {
        let mut health = health.clone();
        async move {
            health.check(HealthCheckRequest { service: name.into() }).await.expect("health answers").into_inner().status
        }
    };
    assert_eq!(status("creditd.liveness").await, ServingStatus::Serving as i32);
    assert_eq!(status("").await, ServingStatus::Serving as i32);
    redis.kill();
    eventually(Duration::from_secs(10), || async { status("").await == ServingStatus::NotServing as i32 }).await;
    assert_eq!(status("creditd.v1.CreditService").await, ServingStatus::NotServing as i32);
    assert_eq!(status("creditd.liveness").await, ServingStatus::Serving as i32, "the process is alive");
}

/// creditd starts while PostgreSQL and Redis are both unreachable: it
/// listens, answers liveness SERVING and readiness NOT_SERVING, retries
/// with backoff, and becomes ready without a restart once they answer
/// (migrations and all). Calls meanwhile fail UNAVAILABLE, not INTERNAL.
#[tokio::test]
async fn starts_with_both_stores_down_and_becomes_ready_when_they_answer() {
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};
    let backends = Backends::fresh().await;
    let pg = FaultProxy::start(url_addr(&backends.database_url)).await;
    let redis = FaultProxy::start(url_addr(&backends.redis_url)).await;
    pg.set(Fault::Refuse);
    redis.set(Fault::Refuse);
    let mut via = backends.clone();
    via.database_url = url_via(&backends.database_url, pg.port());
    via.redis_url = url_via(&backends.redis_url, redis.port());
    let app = TestApp::spawn_with(via, &[("redis.timeout", "500ms")], |addr| {
        let (pg, redis) = (&pg, &redis);
        async move {
            let channel =
                tonic::transport::Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
            let health = HealthClient::new(channel.clone());
            let status = |name: &'static str| {
                let mut health = health.clone();
                async move {
                    health
                        .check(HealthCheckRequest { service: name.into() })
                        .await
                        .expect("health answers")
                        .into_inner()
                        .status
                }
            };
            // Down for a while: several retries happen, the process stays up.
            for _ in 0..10 {
                assert_eq!(status("creditd.liveness").await, ServingStatus::Serving as i32);
                assert_eq!(status("").await, ServingStatus::NotServing as i32);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            let mut credit = pb::credit_service_client::CreditServiceClient::new(channel);
            // A well-formed key must be looked up in PostgreSQL: fail closed,
            // retryable.
            let key = format!("cdk_{}_{}", "0a".repeat(6), "1b".repeat(32));
            let e = credit
                .get_balance(crate::harness::with_key(&key, pb::GetBalanceRequest { account_id: "a".into() }))
                .await
                .unwrap_err();
            assert_eq!(e.code(), Code::Unavailable, "a call while the stores are down: {e:?}");
            assert!(pg.stats().refused.load(Ordering::Relaxed) > 1, "postgres was retried");
            pg.set(Fault::Pass);
            redis.set(Fault::Pass);
        }
    })
    .await;
    // Ready (spawn_with waited for SERVING): migrations ran, calls work.
    app.create_tenant(TENANT).await;
    app.account("a", None, false, None).await;
    app.grant("a", "10", GrantCategory::Plan).await;
    assert!(app.reserve("a", "4", "r").await.unwrap().granted);
    assert_eq!(app.available("a").await, "6");
}
