//! `creditd-rebuild-bench`: how long a running creditd takes to rebuild its
//! hot state from PostgreSQL after Redis lost it (issue 13).
//!
//! One run is one data set ("phase"): `--tenants` tenants of `--accounts`
//! users each. It creates the tenants through the admin API (tenant, keys,
//! the `org` root: the rows and the `hot_fences` row creditd itself
//! writes), then seeds the users straight into PostgreSQL with SQL in the
//! layout the API and the ledger job produce (see `seed`): per user one
//! account, one purchase grant credited at once and its applied ledger row;
//! half the users one committed usage event and a fifth a second one, each
//! allocated to the grant (its `usage` ledger row). Then, `--reps` times
//! after one warm-up round: FLUSHALL, and wait until every tenant answers
//! GetBalance with the seeded balance. The waiting is cheap: after one
//! first call per tenant (which queues its rebuild, as traffic would) a
//! tenant is asked again only once the server logged its rebuild, or once a
//! second. Each round then checks a sample of accounts per tenant.
//!
//! With `--untouched`, afterwards: a second, small tenant is loaded, its
//! GetBalance and Reserve latency is measured at rest and while the big
//! tenant is rebuilt (its state lost, and its state behind PostgreSQL).
//!
//! The result is one JSON object appended to `--out`.
//! `scripts/bench-rebuild.sh` starts throwaway servers and runs the phases.

use std::{
    collections::HashMap,
    io::{BufRead, Read, Seek, SeekFrom, Write},
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicI64, Ordering},
    },
    time::{Duration, Instant},
};

use clap::Parser;
use creditd::{
    domain::Credits,
    pb::{self, admin_service_client::AdminServiceClient, credit_service_client::CreditServiceClient},
    store::keys::TenantKeys,
};
use futures::{StreamExt, stream};
use serde_json::{Value, json};
use tonic::{
    Request,
    metadata::{Ascii, MetadataValue},
    transport::{Channel, Endpoint},
};

type Key = MetadataValue<Ascii>;
type AnyResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

#[derive(Parser, Debug, Clone)]
#[command(name = "creditd-rebuild-bench", about = "Hot-state rebuild benchmark for creditd (loopback only)")]
struct Args {
    /// The creditd gRPC address (loopback).
    #[arg(long)]
    addr: SocketAddr,
    /// An operator API key.
    #[arg(long, env = "CREDITD_BENCH_OPERATOR_KEY", hide_env_values = true)]
    operator_key: String,
    #[arg(long, env = "DATABASE_URL")]
    database_url: String,
    #[arg(long, env = "REDIS_URL")]
    redis_url: String,
    /// creditd's `redis.key_prefix`.
    #[arg(long, default_value = "creditd:")]
    redis_prefix: String,
    /// creditd's log, JSON format (its "hot state rebuilt" lines).
    #[arg(long)]
    server_log: PathBuf,
    /// creditd's metrics listener (creditd_tenants_loading), if enabled.
    #[arg(long)]
    metrics_addr: Option<SocketAddr>,
    #[arg(long)]
    server_pid: u32,
    #[arg(long)]
    redis_pid: Option<u32>,
    #[arg(long)]
    postgres_pid: Option<u32>,
    #[arg(long, default_value_t = 100)]
    clk_tck: u64,
    /// Name of the phase (also the tenant id prefix).
    #[arg(long)]
    name: String,
    #[arg(long)]
    tenants: usize,
    /// Users per tenant.
    #[arg(long)]
    accounts: usize,
    /// Measured rounds (after one warm-up round).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Accounts checked per tenant after each round (at least 1).
    #[arg(long, default_value_t = 5)]
    samples: usize,
    /// Also measure an untouched tenant's latency during a rebuild.
    #[arg(long)]
    untouched: bool,
    /// Seconds of each latency window of the untouched tenant at rest.
    #[arg(long, default_value_t = 3.0)]
    rest_seconds: f64,
    /// The database's `jit` setting, recorded with the result.
    #[arg(long, default_value = "on")]
    jit: String,
    /// JSON lines file the result is appended to.
    #[arg(long)]
    out: PathBuf,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    match rt.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("creditd-rebuild-bench: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn log(msg: impl AsRef<str>) {
    eprintln!("[rebuild-bench] {}", msg.as_ref());
}

fn with_key<T>(msg: T, key: &Key) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut().insert("authorization", key.clone());
    r
}

fn bearer(key: &str) -> AnyResult<Key> {
    Ok(format!("Bearer {key}").parse::<Key>()?)
}

fn account_id(i: usize) -> String {
    format!("u{i:07}")
}

/// The balance `seed` gives user i, in micro-credits: a grant of
/// 100 + i mod 97 credits, less 1.25 when i is even, less 0.75 when i is a
/// multiple of 5.
fn expected_micros(i: usize) -> i64 {
    let mut b = (100 + (i % 97) as i64) * 1_000_000;
    if i.is_multiple_of(2) {
        b -= 1_250_000;
    }
    if i.is_multiple_of(5) {
        b -= 750_000;
    }
    b
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg").map(|s| s.trim().to_string()).unwrap_or_default()
}

// ---------------------------------------------------------------------------
// CPU of the processes involved

fn proc_stat(pid: u32) -> Option<(u64, u64, u64, u64, u32)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
    Some((n(11)?, n(12)?, n(13)?, n(14)?, f.get(1)?.parse().ok()?))
}

fn cpu_of(pid: u32) -> u64 {
    proc_stat(pid).map_or(0, |(u, s, _, _, _)| u + s)
}

/// A postmaster and its children (exited ones through cutime/cstime).
fn cpu_of_tree(parent: u32) -> u64 {
    let Some((u, s, cu, cs, _)) = proc_stat(parent) else { return 0 };
    let mut total = u + s + cu + cs;
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        if let Some((u, s, _, _, ppid)) = proc_stat(pid)
            && ppid == parent
        {
            total += u + s;
        }
    }
    total
}

/// Busy and total ticks of the machine, from /proc/stat.
fn machine_ticks() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = text.lines().next() else { return (0, 0) };
    let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    let total: u64 = v.iter().sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

#[derive(Clone, Copy)]
struct CpuSnap {
    server: u64,
    redis: u64,
    postgres: u64,
    machine_busy: u64,
    machine_total: u64,
    bench: u64,
}

fn cpu_snap(args: &Args) -> CpuSnap {
    let (machine_busy, machine_total) = machine_ticks();
    CpuSnap {
        server: cpu_of(args.server_pid),
        redis: args.redis_pid.map_or(0, cpu_of),
        postgres: args.postgres_pid.map_or(0, cpu_of_tree),
        machine_busy,
        machine_total,
        bench: cpu_of(std::process::id()),
    }
}

/// CPU seconds of each process between two snapshots, and what else the
/// machine ran meanwhile (busy ticks of nobody measured here).
fn cpu_json(args: &Args, a: CpuSnap, b: CpuSnap) -> Value {
    let s = |x: u64| (x as f64 / args.clk_tck as f64 * 100.0).round() / 100.0;
    let ours = (b.server - a.server) + (b.redis - a.redis) + (b.postgres - a.postgres) + (b.bench - a.bench);
    // /proc/stat counts ticks per CPU in USER_HZ too.
    let busy = b.machine_busy - a.machine_busy;
    json!({
        "creditd_s": s(b.server - a.server),
        "redis_s": s(b.redis - a.redis),
        "postgres_s": s(b.postgres - a.postgres),
        "bench_client_s": s(b.bench - a.bench),
        "machine_busy_s": s(busy),
        "other_processes_s": s(busy.saturating_sub(ours)),
        "machine_capacity_s": s(b.machine_total - a.machine_total),
    })
}

// ---------------------------------------------------------------------------
// The server's log and metrics

/// Reads the JSON lines creditd appends to its log.
struct LogTail {
    file: std::io::BufReader<std::fs::File>,
    partial: String,
}

impl LogTail {
    fn at_end(path: &PathBuf) -> AnyResult<LogTail> {
        let mut f = std::fs::File::open(path)?;
        f.seek(SeekFrom::End(0))?;
        Ok(LogTail { file: std::io::BufReader::new(f), partial: String::new() })
    }

    /// New complete lines whose message is "hot state rebuilt from
    /// postgres": (tenant, took_ms, accounts).
    fn rebuilt(&mut self) -> Vec<(String, u64, u64)> {
        let mut out = Vec::new();
        loop {
            let mut line = String::new();
            match self.file.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            if !line.ends_with('\n') {
                self.partial.push_str(&line);
                break;
            }
            let whole = std::mem::take(&mut self.partial) + &line;
            let Ok(v) = serde_json::from_str::<Value>(&whole) else { continue };
            let fields = &v["fields"];
            if fields["message"] != "hot state rebuilt from postgres" {
                continue;
            }
            let tenant = fields["tenant"].as_str().or_else(|| v["tenant"].as_str()).unwrap_or_default().to_string();
            out.push((tenant, fields["took_ms"].as_u64().unwrap_or(0), fields["accounts"].as_u64().unwrap_or(0)));
        }
        out
    }
}

/// creditd_tenants_loading, read with a plain HTTP/1.0 GET.
fn tenants_loading(addr: SocketAddr) -> Option<i64> {
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    body.lines()
        .find_map(|l| l.strip_prefix("creditd_tenants_loading "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as i64)
}

/// Samples creditd_tenants_loading every 100 ms until stopped; the
/// highest value seen.
struct LoadingWatch {
    stop: Arc<AtomicBool>,
    max: Arc<AtomicI64>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl LoadingWatch {
    fn start(addr: Option<SocketAddr>) -> LoadingWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let max = Arc::new(AtomicI64::new(-1));
        let handle = addr.map(|addr| {
            let (stop, max) = (stop.clone(), max.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Some(v) = tenants_loading(addr) {
                        max.fetch_max(v, Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
        });
        LoadingWatch { stop, max, handle }
    }

    fn finish(mut self) -> Option<i64> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        let v = self.max.load(Ordering::Relaxed);
        (v >= 0).then_some(v)
    }
}

// ---------------------------------------------------------------------------
// Set-up

struct Ctx {
    args: Args,
    pg: sqlx::PgPool,
    redis: redis::aio::MultiplexedConnection,
    admin: AdminServiceClient<Channel>,
    credit: Vec<CreditServiceClient<Channel>>,
    operator: Key,
}

impl Ctx {
    fn credit(&self, i: usize) -> CreditServiceClient<Channel> {
        self.credit[i % self.credit.len()].clone()
    }
}

struct Tenant {
    id: String,
    runtime: Key,
    accounts: usize,
}

/// Creates the tenant, its keys and its `org` root through the API.
async fn create_tenant(ctx: &Ctx, id: &str, accounts: usize) -> AnyResult<Tenant> {
    let mut c = ctx.admin.clone();
    c.create_tenant(with_key(
        pb::CreateTenantRequest { tenant_id: id.into(), display_name: "rebuild bench".into(), ..Default::default() },
        &ctx.operator,
    ))
    .await?;
    let mut keys = Vec::new();
    for role in [pb::ApiKeyRole::Admin, pb::ApiKeyRole::Runtime] {
        let r = c
            .create_api_key(with_key(
                pb::CreateApiKeyRequest {
                    tenant_id: id.into(),
                    role: role as i32,
                    name: format!("rebuild-bench-{}", role.as_str_name()),
                    idempotency_key: format!("rebuild-bench-{id}-{}", role as i32),
                },
                &ctx.operator,
            ))
            .await?
            .into_inner();
        keys.push(bearer(&r.key)?);
    }
    let runtime = keys.pop().expect("two keys");
    let admin = keys.pop().expect("two keys");
    c.create_account(with_key(
        pb::CreateAccountRequest {
            account_id: "org".into(),
            kind: pb::AccountKind::Organization as i32,
            ..Default::default()
        },
        &admin,
    ))
    .await?;
    Ok(Tenant { id: id.to_string(), runtime, accounts })
}

async fn create_tenants(ctx: &Ctx, ids: Vec<String>, accounts: usize) -> AnyResult<Vec<Tenant>> {
    let results: Vec<AnyResult<Tenant>> =
        stream::iter(ids.iter().map(|id| create_tenant(ctx, id, accounts))).buffered(16).collect().await;
    results.into_iter().collect()
}

/// Seeds `accounts` users under `org` in each tenant, in PostgreSQL only,
/// as creditd's API and ledger job would have written them:
///
/// - `accounts`: CreateAccount of a user under `org` (depth 2, no pool
///   access, the tenant's current period copied from `org`, which the API
///   computed);
/// - `grants` + `ledger` `grant` row (applied: the ledger job has moved it
///   into Redis): CreateGrant of 100 + i mod 97 credits, purchase, default
///   priority 30, effective now, payload hash as the service computes it;
/// - `usage_events` (Commit of 1.25 credits for even i, another of 0.75
///   for i multiple of 5, recorded this period, allocated) + their `usage`
///   ledger rows on the grant (what the ledger job's allocation writes).
///   The rollup triggers run as for the API's writes.
///
/// Account, grant and ledger rows skip the foreign-key triggers
/// (session_replication_role = replica): every parent row is read in the
/// same statement.
async fn seed(ctx: &Ctx, tenants: &[Tenant], accounts: usize) -> AnyResult<Duration> {
    let t0 = Instant::now();
    let per_chunk = (100_000 / accounts.max(1)).max(1);
    for chunk in tenants.chunks(per_chunk) {
        let ids: Vec<&str> = chunk.iter().map(|t| t.id.as_str()).collect();
        let mut tx = ctx.pg.begin().await?;
        sqlx::query("SET LOCAL statement_timeout = '600s'").execute(&mut *tx).await?;
        sqlx::query(
            "CREATE TEMP TABLE seed_src ON COMMIT DROP AS \
             SELECT a.tenant_id, g AS i, 'u' || lpad(g::text, 7, '0') AS acc, a.depth + 1 AS depth, \
               a.period_start, a.period_end, f.generation AS gen, (100 + g % 97)::numeric AS amount, \
               md5('g:' || a.tenant_id || ':' || g)::uuid AS grant_id, now() AS at \
             FROM accounts a JOIN hot_fences f ON f.tenant_id = a.tenant_id \
             CROSS JOIN generate_series(0, $2::int - 1) AS g \
             WHERE a.tenant_id = ANY($1) AND a.account_id = 'org'",
        )
        .bind(&ids)
        .bind(accounts as i32)
        .execute(&mut *tx)
        .await?;
        sqlx::query("SET LOCAL session_replication_role = replica").execute(&mut *tx).await?;
        sqlx::query(
            "INSERT INTO accounts (tenant_id, account_id, parent_id, kind, display_name, pool_access, depth, tier, \
               period_start, period_end, created_at) \
             SELECT tenant_id, acc, 'org', 'user', '', false, depth, '', period_start, period_end, at \
             FROM seed_src ORDER BY tenant_id, acc",
        )
        .execute(&mut *tx)
        .await?;
        // payload_hash: the service's payload_hash(["grant", account,
        // amount, category, priority, effective_at (unset: ''), expiry
        // (never: ''), description, reason, actor]).
        sqlx::query(
            "INSERT INTO grants (grant_id, tenant_id, account_id, amount, category, priority, effective_at, \
               expires_at, description, idempotency_key, payload_hash, credited_at, reason, actor, created_at) \
             SELECT grant_id, tenant_id, acc, amount, 'purchase', 30, at, NULL, '', 'seed-grant-' || acc, \
               left(encode(sha256(convert_to(concat_ws(chr(31), 'grant', acc, amount::text, 'purchase', '30', \
                 '', '', '', '', '') || chr(31), 'UTF8')), 'hex'), 32), at, '', '', at \
             FROM seed_src ORDER BY tenant_id, acc",
        )
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO ledger (tenant_id, account_id, grant_id, kind, amount, applied, created_at) \
             SELECT tenant_id, acc, grant_id, 'grant', amount, true, at FROM seed_src ORDER BY tenant_id, acc",
        )
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "CREATE TEMP TABLE seed_use ON COMMIT DROP AS \
             SELECT s.tenant_id, s.acc, s.grant_id, s.gen, u.n, u.amt, \
               md5('e:' || s.tenant_id || ':' || s.i || ':' || u.n)::uuid AS event_id, \
               md5('r:' || s.tenant_id || ':' || s.i || ':' || u.n)::uuid AS reservation_id, \
               GREATEST(s.period_start, s.at - make_interval(secs => (s.i % 3600) * 10 + u.n)) AS recorded_at \
             FROM seed_src s CROSS JOIN (VALUES (1, 1.25::numeric), (2, 0.75::numeric)) AS u(n, amt) \
             WHERE (u.n = 1 AND s.i % 2 = 0) OR (u.n = 2 AND s.i % 5 = 0)",
        )
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO ledger (tenant_id, account_id, grant_id, event_id, kind, amount, applied, created_at) \
             SELECT tenant_id, acc, grant_id, event_id, 'usage', -amt, true, recorded_at FROM seed_use \
             ORDER BY recorded_at",
        )
        .execute(&mut *tx)
        .await?;
        sqlx::query("SET LOCAL session_replication_role = origin").execute(&mut *tx).await?;
        sqlx::query(
            "INSERT INTO usage_events (event_id, tenant_id, account_id, reservation_id, kind, idempotency_key, \
               payload_hash, amount, held, overdraft, draws, labels, hot_epoch, recorded_at, allocated) \
             SELECT event_id, tenant_id, acc, reservation_id, 'commit', 'seed-commit-' || acc || '-' || n, \
               left(md5('c:' || acc || ':' || n), 32), amt, amt, 0, \
               jsonb_build_array(jsonb_build_object('account', acc, 'amount', amt::text)), '{}', gen, \
               recorded_at, true \
             FROM seed_use ORDER BY recorded_at",
        )
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
    }
    sqlx::query("VACUUM (ANALYZE) accounts, grants, ledger, usage_events").execute(&ctx.pg).await?;
    Ok(t0.elapsed())
}

// ---------------------------------------------------------------------------
// Balances

enum Answer {
    Balance(i64),
    Unavailable,
    Failed(String),
}

async fn balance(ctx: &Ctx, worker: usize, t: &Tenant, i: usize) -> Answer {
    let req = pb::GetBalanceRequest { account_id: account_id(i) };
    match ctx.credit(worker).get_balance(with_key(req, &t.runtime)).await {
        Ok(r) => match Credits::parse(&r.into_inner().available) {
            Ok(c) => Answer::Balance(c.micros()),
            Err(e) => Answer::Failed(format!("available: {e}")),
        },
        Err(s) if s.code() == tonic::Code::Unavailable => Answer::Unavailable,
        Err(s) => Answer::Failed(format!("{:?}: {}", s.code(), s.message())),
    }
}

/// Checks `samples` accounts per tenant (deterministic spread, varying
/// with `round`); returns (checked, mismatches).
async fn verify(ctx: &Ctx, tenants: &[Tenant], samples: usize, round: usize) -> (usize, Vec<String>) {
    let mut calls = Vec::new();
    for (ti, t) in tenants.iter().enumerate() {
        let n = samples.min(t.accounts).max(1);
        for k in 0..n {
            let i = (k * 7919 + round * 104_729 + ti * 31) % t.accounts;
            calls.push((ti, i));
        }
    }
    let checked = calls.len();
    let bad: Vec<Option<String>> = stream::iter(calls.into_iter().enumerate().map(|(w, (ti, i))| async move {
        let t = &tenants[ti];
        match balance(ctx, w, t, i).await {
            Answer::Balance(b) if b == expected_micros(i) => None,
            Answer::Balance(b) => {
                Some(format!("{}/{}: available {b} µ, seeded {}", t.id, account_id(i), expected_micros(i)))
            }
            Answer::Unavailable => Some(format!("{}/{}: UNAVAILABLE", t.id, account_id(i))),
            Answer::Failed(e) => Some(format!("{}/{}: {e}", t.id, account_id(i))),
        }
    }))
    .buffer_unordered(16)
    .collect()
    .await;
    (checked, bad.into_iter().flatten().collect())
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[idx.clamp(1, sorted.len()) - 1]
}

fn r1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn r3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

// ---------------------------------------------------------------------------
// One round: FLUSHALL, then wait for every tenant

async fn flush_round(ctx: &mut Ctx, tenants: &[Tenant], label: &str, round: usize) -> AnyResult<Value> {
    let load_before = loadavg();
    let mut tail = LogTail::at_end(&ctx.args.server_log)?;
    let watch = LoadingWatch::start(ctx.args.metrics_addr);
    let cpu0 = cpu_snap(&ctx.args);
    let t0 = Instant::now();
    let _: () = redis::cmd("FLUSHALL").query_async(&mut ctx.redis).await?;
    let ctx = &*ctx;
    let n = tenants.len();
    let mut ready: Vec<Option<f64>> = vec![None; n];
    let mut logged: HashMap<String, (u64, u64, f64)> = HashMap::new();
    let index: HashMap<&str, usize> = tenants.iter().enumerate().map(|(i, t)| (t.id.as_str(), i)).collect();
    let mut wrong = Vec::new();
    let mut calls = 0usize;
    // The first contact with each tenant (as traffic would): it queues the
    // rebuild at once, instead of at the next health pass.
    let mut ask: Vec<usize> = (0..n).collect();
    let mut last_sweep = Instant::now();
    let limit = Duration::from_secs(900);
    loop {
        if !ask.is_empty() {
            calls += ask.len();
            let answers: Vec<(usize, Answer, f64)> = stream::iter(ask.drain(..).map(|ti| async move {
                let t = &tenants[ti];
                let i = (round * 7 + ti) % t.accounts;
                let a = balance(ctx, ti, t, i).await;
                let a = match a {
                    Answer::Balance(b) if b != expected_micros(i) => Answer::Failed(format!(
                        "{}/{}: available {b} µ, seeded {}",
                        t.id,
                        account_id(i),
                        expected_micros(i)
                    )),
                    other => other,
                };
                (ti, a, t0.elapsed().as_secs_f64())
            }))
            .buffer_unordered(16)
            .collect()
            .await;
            for (ti, a, at) in answers {
                match a {
                    Answer::Balance(_) => ready[ti] = Some(at),
                    Answer::Unavailable => {}
                    Answer::Failed(e) => {
                        wrong.push(e);
                        ready[ti] = Some(at);
                    }
                }
            }
        }
        let pending = ready.iter().filter(|r| r.is_none()).count();
        if pending == 0 {
            break;
        }
        if t0.elapsed() > limit {
            return Err(format!("{label}: {pending} tenants still loading after {limit:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        for (tenant, took, accounts) in tail.rebuilt() {
            if let Some(&ti) = index.get(tenant.as_str()) {
                logged.insert(tenant, (took, accounts, t0.elapsed().as_secs_f64()));
                if ready[ti].is_none() {
                    ask.push(ti);
                }
            }
        }
        if last_sweep.elapsed() > Duration::from_secs(1) {
            last_sweep = Instant::now();
            for (ti, r) in ready.iter().enumerate() {
                if r.is_none() && !ask.contains(&ti) {
                    ask.push(ti);
                }
            }
        }
    }
    let cpu1 = cpu_snap(&ctx.args);
    let load_after = loadavg();
    let loading_max = watch.finish();
    // Lines logged between the last read and the end.
    tokio::time::sleep(Duration::from_millis(50)).await;
    for (tenant, took, accounts) in tail.rebuilt() {
        if index.contains_key(tenant.as_str()) {
            logged.entry(tenant).or_insert((took, accounts, t0.elapsed().as_secs_f64()));
        }
    }
    let mut at: Vec<f64> = ready.iter().map(|r| r.unwrap_or(0.0)).collect();
    at.sort_by(f64::total_cmp);
    let mut took: Vec<f64> = logged.values().map(|(t, _, _)| *t as f64).collect();
    took.sort_by(f64::total_cmp);
    let logged_accounts: u64 = logged.values().map(|(_, a, _)| *a).sum();
    let (checked, bad) = verify(ctx, tenants, ctx.args.samples, round).await;
    wrong.extend(bad);
    let total_s = at.last().copied().unwrap_or(0.0);
    let accounts: usize = tenants.iter().map(|t| t.accounts + 1).sum();
    let v = json!({
        "round": label,
        "tenants": n,
        "accounts": accounts,
        "all_serving_s": r3(total_s),
        "tenant_ready_s": {"p50": r3(pct(&at, 50.0)), "p90": r3(pct(&at, 90.0)), "max": r3(total_s)},
        "rebuild_took_ms": {
            "logged": took.len(),
            "sum": took.iter().sum::<f64>(),
            "mean": r1(took.iter().sum::<f64>() / took.len().max(1) as f64),
            "p50": pct(&took, 50.0), "p90": pct(&took, 90.0), "max": took.last().copied().unwrap_or(0.0),
        },
        "logged_accounts": logged_accounts,
        "accounts_per_s": (accounts as f64 / total_s.max(1e-9)).round(),
        "poll_calls": calls,
        "tenants_loading_max": loading_max,
        "verified": checked,
        "mismatches": wrong.len(),
        "mismatch_examples": wrong.iter().take(5).collect::<Vec<_>>(),
        "cpu": cpu_json(&ctx.args, cpu0, cpu1),
        "loadavg_before": load_before,
        "loadavg_after": load_after,
    });
    log(format!(
        "{label}: {n} tenants / {accounts} accounts serving after {total_s:.3} s (rebuild took_ms p50 {} max {}; {} mismatches of {checked} checked; load {load_before})",
        pct(&took, 50.0),
        took.last().copied().unwrap_or(0.0),
        wrong.len()
    ));
    Ok(v)
}

// ---------------------------------------------------------------------------
// The untouched tenant while another is rebuilt

#[derive(Clone, Copy)]
struct Sample {
    start_s: f64,
    ns: u64,
    reserve: bool,
    ok: bool,
}

/// Closed loop of 4 workers on the quiet tenant, alternating GetBalance
/// and a small Reserve (2 s hold), until `stop`.
async fn quiet_load(ctx: Arc<Ctx>, quiet: Arc<Tenant>, t0: Instant, stop: Arc<AtomicBool>) -> Vec<Sample> {
    let out = Arc::new(Mutex::new(Vec::new()));
    let mut handles = Vec::new();
    for w in 0..4usize {
        let (ctx, quiet, stop, out) = (ctx.clone(), quiet.clone(), stop.clone(), out.clone());
        handles.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            let mut seq = 0usize;
            while !stop.load(Ordering::Relaxed) {
                seq += 1;
                let i = (seq * 7919 + w * 131) % quiet.accounts;
                let reserve = seq.is_multiple_of(2);
                let start = Instant::now();
                let ok = if reserve {
                    let req = pb::ReserveRequest {
                        account_id: account_id(i),
                        cost: Some(pb::reserve_request::Cost::Amount("0.01".into())),
                        ttl: Some(prost_types::Duration { seconds: 2, nanos: 0 }),
                        idempotency_key: format!("quiet-{w}-{seq}-{}", t0.elapsed().as_nanos()),
                        labels: Default::default(),
                    };
                    matches!(ctx.credit(w).reserve(with_key(req, &quiet.runtime)).await, Ok(r) if r.get_ref().granted)
                } else {
                    matches!(balance(&ctx, w, &quiet, i).await, Answer::Balance(_))
                };
                mine.push(Sample {
                    start_s: (start - t0).as_secs_f64(),
                    ns: start.elapsed().as_nanos() as u64,
                    reserve,
                    ok,
                });
            }
            out.lock().expect("samples").extend(mine);
        }));
    }
    for h in handles {
        let _ = h.await;
    }
    out.lock().expect("samples").clone()
}

fn latency(samples: &[Sample], from: f64, to: f64) -> Value {
    let pick = |reserve: Option<bool>| {
        let mut v: Vec<f64> = samples
            .iter()
            .filter(|s| s.start_s >= from && s.start_s <= to && reserve.is_none_or(|r| s.reserve == r))
            .map(|s| s.ns as f64 / 1e6)
            .collect();
        v.sort_by(f64::total_cmp);
        let failed = samples
            .iter()
            .filter(|s| s.start_s >= from && s.start_s <= to && !s.ok && reserve.is_none_or(|r| s.reserve == r))
            .count();
        json!({"calls": v.len(), "failed": failed, "p50_ms": r3(pct(&v, 50.0)), "p99_ms": r3(pct(&v, 99.0)), "max_ms": r3(v.last().copied().unwrap_or(0.0))})
    };
    json!({"all": pick(None), "get_balance": pick(Some(false)), "reserve": pick(Some(true))})
}

/// Measures the quiet tenant at rest, then while `big` is rebuilt after
/// `how` ("lost": its fence key deleted; "behind": PostgreSQL's fence
/// position raised, as after a Redis rollback).
async fn untouched(ctx: Arc<Ctx>, big: Arc<Tenant>, quiet: Arc<Tenant>) -> AnyResult<Value> {
    let rest_s = ctx.args.rest_seconds;
    let t0 = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(quiet_load(ctx.clone(), quiet.clone(), t0, stop.clone()));
    tokio::time::sleep(Duration::from_secs_f64(rest_s)).await;
    stop.store(true, Ordering::Relaxed);
    let samples = load.await?;
    let rest = latency(&samples, 0.2, rest_s);
    log(format!("untouched tenant at rest: {rest}"));
    let mut out = json!({"at_rest": rest, "load": loadavg()});
    for how in ["lost", "behind"] {
        let t0 = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let load = tokio::spawn(quiet_load(ctx.clone(), quiet.clone(), t0, stop.clone()));
        tokio::time::sleep(Duration::from_millis(500)).await;
        let trigger_s = t0.elapsed().as_secs_f64();
        let mut redis = ctx.redis.clone();
        if how == "lost" {
            let _: () = redis::cmd("DEL")
                .arg(TenantKeys::new(&ctx.args.redis_prefix, &big.id).fence())
                .query_async(&mut redis)
                .await?;
        } else {
            sqlx::query("UPDATE hot_fences SET position = position + 1 WHERE tenant_id = $1")
                .bind(&big.id)
                .execute(&ctx.pg)
                .await?;
        }
        // The big tenant's own view: first refusal, first answer after it.
        let (mut down, mut up) = (None, None);
        let mut seq = 0usize;
        while up.is_none() && t0.elapsed() < Duration::from_secs(120) {
            seq += 1;
            let at = t0.elapsed().as_secs_f64();
            match balance(&ctx, 7, &big, seq % big.accounts).await {
                Answer::Balance(_) if down.is_some() => up = Some(t0.elapsed().as_secs_f64()),
                Answer::Balance(_) => {}
                Answer::Unavailable => {
                    if down.is_none() {
                        down = Some(at);
                    }
                }
                Answer::Failed(e) => return Err(format!("big tenant: {e}").into()),
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        stop.store(true, Ordering::Relaxed);
        let samples = load.await?;
        let (Some(down), Some(up)) = (down, up) else {
            return Err(format!("{how}: the big tenant was never seen loading and back").into());
        };
        let first = samples.iter().filter(|s| s.start_s >= trigger_s).min_by(|a, b| a.start_s.total_cmp(&b.start_s));
        let during = latency(&samples, down, up);
        log(format!("untouched tenant while the big one rebuilds ({how}, {:.3} s unavailable): {during}", up - down));
        out[how] = json!({
            "big_unavailable_s": r3(up - down),
            "detected_after_s": r3(down - trigger_s),
            "during_rebuild": during,
            "first_call_after_trigger_ms": first.map(|s| r3(s.ns as f64 / 1e6)),
            "load": loadavg(),
        });
    }
    Ok(out)
}

// ---------------------------------------------------------------------------

async fn run(args: Args) -> AnyResult<()> {
    let pg = sqlx::postgres::PgPoolOptions::new().max_connections(4).connect(&args.database_url).await?;
    let mut redis = redis::Client::open(args.redis_url.as_str())?.get_multiplexed_async_connection().await?;
    // A synchronous FLUSHALL of a million keys takes longer than the
    // client's default 500 ms response timeout.
    redis.set_response_timeout(Duration::from_secs(300));
    let mut credit = Vec::new();
    let mut admin = None;
    for _ in 0..4 {
        let channel = Endpoint::from_shared(format!("http://{}", args.addr))?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30))
            .connect()
            .await?;
        admin.get_or_insert_with(|| AdminServiceClient::new(channel.clone()));
        credit.push(CreditServiceClient::new(channel));
    }
    let operator = bearer(&args.operator_key)?;
    let mut ctx = Ctx { args: args.clone(), pg, redis, admin: admin.expect("a channel"), credit, operator };

    let started = Instant::now();
    let ids: Vec<String> = (0..args.tenants).map(|i| format!("{}-{i:04}", args.name)).collect();
    let tenants = create_tenants(&ctx, ids, args.accounts).await?;
    let api_s = started.elapsed().as_secs_f64();
    let seed_took = seed(&ctx, &tenants, args.accounts).await?;
    log(format!(
        "{}: {} tenants through the API in {api_s:.1} s, {} users seeded in PostgreSQL in {:.1} s",
        args.name,
        args.tenants,
        args.tenants * args.accounts,
        seed_took.as_secs_f64()
    ));
    let (events, ledger): (i64, i64) =
        sqlx::query_as("SELECT (SELECT count(*) FROM usage_events), (SELECT count(*) FROM ledger)")
            .fetch_one(&ctx.pg)
            .await?;

    let warmup = flush_round(&mut ctx, &tenants, "warm-up", 0).await?;
    let mut rounds = Vec::new();
    for r in 1..=args.reps {
        rounds.push(flush_round(&mut ctx, &tenants, &format!("round {r}"), r).await?);
    }
    let mut result = json!({
        "name": args.name,
        "tenants": args.tenants,
        "accounts_per_tenant": args.accounts,
        "jit": args.jit,
        "usage_events": events,
        "ledger_rows": ledger,
        "setup_api_s": r1(api_s),
        "seed_s": r1(seed_took.as_secs_f64()),
        "warmup": warmup,
        "rounds": rounds,
    });

    if args.untouched {
        let quiet = create_tenants(&ctx, vec![format!("{}-quiet", args.name)], 1000).await?;
        seed(&ctx, &quiet, 1000).await?;
        let mut both: Vec<Tenant> = tenants;
        both.extend(quiet);
        // Load both (the quiet tenant's users exist only in PostgreSQL).
        flush_round(&mut ctx, &both, "load both", 0).await?;
        let quiet = Arc::new(both.pop().expect("quiet tenant"));
        let big = Arc::new(both.swap_remove(0));
        let ctx = Arc::new(ctx);
        result["untouched"] = untouched(ctx.clone(), big, quiet).await?;
        append(&ctx.args.out, &result)?;
    } else {
        append(&ctx.args.out, &result)?;
    }
    Ok(())
}

fn append(path: &PathBuf, v: &Value) -> AnyResult<()> {
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    writeln!(f, "{v}")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_balances() {
        assert_eq!(expected_micros(0), 98_000_000);
        assert_eq!(expected_micros(1), 101_000_000);
        assert_eq!(expected_micros(2), 100_750_000);
        assert_eq!(expected_micros(5), 104_250_000);
    }

    #[test]
    fn percentiles() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(pct(&v, 50.0), 2.0);
        assert_eq!(pct(&v, 99.0), 4.0);
        assert_eq!(pct(&[], 50.0), 0.0);
    }
}
