//! The report benchmark, run by `scripts/report-bench.sh` (which starts a
//! private PostgreSQL and Redis and sets DATABASE_URL and REDIS_URL).
//!
//! Runs creditd in-process, creates tenant `bench` (Europe/Paris) with an
//! organization, 10 teams and `--users` users through the API, writes
//! `--events` usage events of one month straight into PostgreSQL
//! (`scripts/report-bench.sql`, `--writers` sessions in parallel), then times
//! the report RPCs through gRPC, checks the category → tier → model summary
//! against a recomputation from the events, and measures what the rollup
//! triggers cost the write path.

use std::{
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use clap::Parser;
use creditd::{
    app::App,
    auth::Role,
    config::{Config, Sources},
    pb::{
        self, UsageDimension as Dim, admin_service_client::AdminServiceClient,
        report_service_client::ReportServiceClient,
    },
};
use futures::StreamExt;
use rust_decimal::Decimal;
use sqlx::{PgPool, Row};
use tonic::{Request, transport::Channel};

const TENANT: &str = "bench";
const WRITE_TENANT: &str = "bench-write";
const ZONE: &str = "Europe/Paris";
const GENERATE: &str = include_str!("../scripts/report-bench.sql");

#[derive(Parser)]
struct Args {
    /// Usage events to generate in the month.
    #[arg(long, default_value_t = 10_000_000)]
    events: i64,
    /// Users (under 10 teams under one organization).
    #[arg(long, default_value_t = 1000)]
    users: i64,
    /// The month, "YYYY-MM" in Europe/Paris (default: last month).
    #[arg(long)]
    month: Option<String>,
    /// Timed runs per query (after one warm-up run).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Parallel generator sessions.
    #[arg(long, default_value_t = 2)]
    writers: usize,
    /// Events per generator statement.
    #[arg(long, default_value_t = 100_000)]
    chunk: i64,
    /// Skip the write-path measurement.
    #[arg(long)]
    skip_write_cost: bool,
}

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn with_key<T>(key: &str, message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert("authorization", format!("Bearer {key}").parse().expect("ascii key"));
    request
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn ts(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: t.timestamp(), nanos: t.timestamp_subsec_nanos() as i32 }
}

fn env(name: &str) -> Result<String> {
    std::env::var(name).map_err(|_| format!("{name} is not set (run scripts/report-bench.sh)").into())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let database_url = env("DATABASE_URL")?;
    let overrides: Vec<(String, String)> = [
        ("postgres.url", database_url.as_str()),
        ("redis.url", env("REDIS_URL")?.as_str()),
        ("redis.key_prefix", "bench:"),
        ("server.listen", "127.0.0.1:0"),
        ("postgres.migrate_on_start", "true"),
        ("postgres.max_connections", "8"),
        ("postgres.statement_timeout", "20s"),
        ("hot.commit_deadline", "60s"),
        ("log.filter", "warn"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let config = Config::load(&Sources { file: None, env: vec![], overrides })?;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,sqlx::query=error"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).try_init();
    let app = App::build(config).await?;
    let addr = app.local_addr();
    let engine = app.engine().clone();
    // A tenant Redis lost is rebuilt first (2 × statement_timeout of settling).
    tokio::time::timeout(Duration::from_secs(300), app.ready()).await.map_err(|_| "creditd is not serving")?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.serve(async {
        let _ = stopped.await;
    }));
    let channel = Channel::from_shared(format!("http://{addr}"))?.connect().await?;
    let mut admin = AdminServiceClient::new(channel.clone());
    let reports = ReportServiceClient::new(channel);
    let pool = PgPool::connect(&database_url).await?;
    sqlx::query("SET statement_timeout = 0").execute(&pool).await?;

    // Tenant, keys and accounts, through the API.
    let (_, operator) = engine.keys.create(None, Role::Operator, "report-bench", None).await?;
    let operator = operator.ok_or("no operator key")?;
    for tenant in [TENANT, WRITE_TENANT] {
        admin
            .create_tenant(with_key(
                &operator,
                pb::CreateTenantRequest { tenant_id: tenant.into(), time_zone: ZONE.into(), ..Default::default() },
            ))
            .await?;
    }
    let (_, key) = engine.keys.create(Some(TENANT), Role::Admin, "report-bench", None).await?;
    let key = key.ok_or("no admin key")?;
    let accounts: i64 =
        sqlx::query_scalar("SELECT count(*) FROM accounts WHERE tenant_id = $1").bind(TENANT).fetch_one(&pool).await?;
    if accounts != 11 + args.users {
        let started = Instant::now();
        admin_accounts(&admin, &key, vec![("org".to_string(), String::new())]).await?;
        admin_accounts(&admin, &key, (0..10).map(|t| (format!("team-{t}"), "org".to_string())).collect()).await?;
        let users = (0..args.users).map(|u| (format!("user-{u}"), format!("team-{}", u % 10)));
        admin_accounts(&admin, &key, users.collect()).await?;
        println!("accounts: 1 organization, 10 teams, {} users ({})", args.users, ms(started.elapsed()));
    }

    // The month, local.
    let month_sql = "SELECT m AT TIME ZONE $1, (m + interval '1 month') AT TIME ZONE $1, to_char(m, 'YYYY-MM') FROM \
         (SELECT COALESCE(($2 || '-01')::date::timestamp, \
                          date_trunc('month', now() AT TIME ZONE $1) - interval '1 month') AS m) x";
    let (start, end, month): (DateTime<Utc>, DateTime<Utc>, String) =
        sqlx::query_as(month_sql).bind(ZONE).bind(&args.month).fetch_one(&pool).await?;

    // The events.
    let (in_month, all): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE recorded_at >= $2 AND recorded_at < $3), count(*) \
         FROM usage_events WHERE tenant_id = $1",
    )
    .bind(TENANT)
    .bind(start)
    .bind(end)
    .fetch_one(&pool)
    .await?;
    if in_month == args.events && all == args.events {
        println!("events: reusing the {all} events of {month} already generated");
    } else if all != 0 {
        return Err(format!(
            "the bench database holds {all} other events ({in_month} in {month}): run `scripts/report-bench.sh clean` first"
        )
        .into());
    } else {
        generate(&pool, &args, start, end).await?;
        println!("vacuum analyze ...");
        sqlx::query("VACUUM ANALYZE usage_events").execute(&pool).await?;
        sqlx::query("VACUUM ANALYZE usage_rollup").execute(&pool).await?;
    }
    let facts = sqlx::query(
        "SELECT pg_size_pretty(pg_total_relation_size('usage_events')), \
           (SELECT count(*) FROM usage_rollup WHERE tenant_id = $1), pg_size_pretty(pg_total_relation_size('usage_rollup')), \
           current_setting('server_version'), current_setting('shared_buffers'), current_setting('work_mem'), \
           current_setting('max_parallel_workers_per_gather')",
    )
    .bind(TENANT)
    .fetch_one(&pool)
    .await?;
    println!(
        "data: {} events of tenant {TENANT} in {month} ({ZONE}); usage_events {}; rollup {} rows, {}",
        args.events,
        facts.get::<String, _>(0),
        facts.get::<i64, _>(1),
        facts.get::<String, _>(2)
    );
    println!(
        "postgres {}: shared_buffers {}, work_mem {}, max_parallel_workers_per_gather {}; {} cores",
        facts.get::<String, _>(3),
        facts.get::<String, _>(4),
        facts.get::<String, _>(5),
        facts.get::<String, _>(6),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );

    // Timed RPCs.
    println!("\n{:<58} {:>7} {:>10} {:>10} {:>10}", "call (through gRPC)", "rows", "min", "median", "max");
    let summary =
        |group_by: Vec<Dim>, account: &str, from: DateTime<Utc>, to: DateTime<Utc>| pb::SummarizeUsageRequest {
            from: Some(ts(from)),
            to: Some(ts(to)),
            group_by: group_by.into_iter().map(|d| d as i32).collect(),
            account_id: account.into(),
            page_size: 10_000,
            page_token: String::new(),
        };
    // A live tenant's "this month so far": the range ends just after the
    // last event.
    let last: DateTime<Utc> = sqlx::query_scalar("SELECT max(recorded_at) FROM usage_events WHERE tenant_id = $1")
        .bind(TENANT)
        .fetch_one(&pool)
        .await?;
    let mid_from = start + chrono::Duration::hours(2 * 24 + 12);
    let mid_to = end - chrono::Duration::hours(3 * 24 + 5) - chrono::Duration::minutes(30);
    let cases: Vec<(String, pb::SummarizeUsageRequest)> = vec![
        (format!("SummarizeUsage {month}, totals"), summary(vec![], "", start, end)),
        (
            format!("SummarizeUsage {month}, category/tier/model"),
            summary(vec![Dim::Category, Dim::Tier, Dim::Model], "", start, end),
        ),
        (format!("SummarizeUsage {month}, day"), summary(vec![Dim::Day], "", start, end)),
        (format!("SummarizeUsage {month}, account"), summary(vec![Dim::Account], "", start, end)),
        (
            format!("SummarizeUsage {month}, account/category/model"),
            summary(vec![Dim::Account, Dim::Category, Dim::Model], "", start, end),
        ),
        (
            format!("SummarizeUsage {month}, team-3 subtree, category/model"),
            summary(vec![Dim::Category, Dim::Model], "team-3", start, end),
        ),
        (
            format!("SummarizeUsage {month} so far (ends now), category/tier/model"),
            summary(vec![Dim::Category, Dim::Tier, Dim::Model], "", start, last + chrono::Duration::microseconds(1)),
        ),
        (
            "SummarizeUsage, mid-day to mid-day (~26 days), category".to_string(),
            summary(vec![Dim::Category], "", mid_from, mid_to),
        ),
    ];
    let mut breakdown = None;
    for (name, request) in cases {
        let mut rows = 0;
        let times = timed(args.runs, || {
            let mut client = reports.clone();
            let request = with_key(&key, request.clone());
            async move { client.summarize_usage(request).await.map(|r| r.into_inner()) }
        })
        .await?;
        if let Some(last) = &times.1 {
            rows = last.row_count;
            if last.rows.first().is_some_and(|r| r.keys.len() == 3) && breakdown.is_none() {
                breakdown = Some(last.clone());
            }
        }
        report(&name, rows, &times.0);
    }
    let times = timed(args.runs, || {
        let mut client = reports.clone();
        let request = with_key(&key, pb::MonthlyHistoryRequest { months: 12, account_id: String::new() });
        async move { client.monthly_history(request).await.map(|r| r.into_inner()) }
    })
    .await?;
    report("MonthlyHistory, 12 months, whole tenant", times.1.map(|h| h.months.len() as i64).unwrap_or(0), &times.0);
    for (name, model) in
        [("ListUsageEvents, first page of 100", ""), ("ListUsageEvents, model filter, 100", "local-llama")]
    {
        let times = timed(args.runs, || {
            let mut client = reports.clone();
            let request = with_key(
                &key,
                pb::ListUsageEventsRequest {
                    from: Some(ts(start)),
                    to: Some(ts(end)),
                    model: model.into(),
                    page_size: 100,
                    ..Default::default()
                },
            );
            async move { client.list_usage_events(request).await.map(|r| r.into_inner()) }
        })
        .await?;
        report(name, times.1.map(|p| p.events.len() as i64).unwrap_or(0), &times.0);
    }

    // The same breakdown straight from the events, and the check.
    let breakdown = breakdown.ok_or("no category/tier/model summary")?;
    let started = Instant::now();
    let raw = sqlx::query(
        "SELECT s.category, s.tier, s.model, sum(s.credits), count(*) FILTER (WHERE s.is_primary), count(*) \
         FROM usage_events e CROSS JOIN LATERAL usage_shares(e.line_items, e.labels, e.amount) s \
         WHERE e.tenant_id = $1 AND e.recorded_at >= $2 AND e.recorded_at < $3 \
         GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
    )
    .bind(TENANT)
    .bind(start)
    .bind(end)
    .fetch_all(&pool)
    .await?;
    let raw_time = started.elapsed();
    let (total, count): (Decimal, i64) = sqlx::query_as(
        "SELECT sum(amount), count(*) FROM usage_events WHERE tenant_id = $1 AND recorded_at >= $2 AND recorded_at < $3",
    )
    .bind(TENANT)
    .bind(start)
    .bind(end)
    .fetch_one(&pool)
    .await?;
    let raw_rows: Vec<pb::UsageRow> = raw
        .iter()
        .map(|r| pb::UsageRow {
            keys: vec![r.get(0), r.get(1), r.get(2)],
            credits: text(r.get(3)),
            events: r.get(4),
            line_items: r.get(5),
        })
        .collect();
    report("the same breakdown from the events (SQL, no rollup)", raw_rows.len() as i64, &[raw_time]);
    let exact = raw_rows == breakdown.rows && breakdown.total == text(total) && breakdown.events == count;
    println!(
        "\ncheck: the RPC's category/tier/model rows {} the recomputation from the events; total {} credits, {} events \
         (Σ amount {}, {} events)",
        if exact { "equal" } else { "DIFFER FROM" },
        breakdown.total,
        breakdown.events,
        text(total),
        count
    );

    let _ = stop.send(());
    let _ = server.await;
    if !args.skip_write_cost {
        write_cost(&pool, start).await?;
    }
    if !exact {
        return Err("the summary differs from the events".into());
    }
    Ok(())
}

fn text(d: Decimal) -> String {
    if d.is_zero() { "0".into() } else { d.normalize().to_string() }
}

async fn admin_accounts(admin: &AdminServiceClient<Channel>, key: &str, accounts: Vec<(String, String)>) -> Result<()> {
    let results: Vec<std::result::Result<_, tonic::Status>> = futures::stream::iter(accounts)
        .map(|(id, parent)| {
            let mut client = admin.clone();
            let request = with_key(
                key,
                pb::CreateAccountRequest {
                    account_id: id,
                    parent_id: parent.clone(),
                    pool_access: !parent.is_empty(),
                    kind: if parent.is_empty() { pb::AccountKind::Organization } else { pb::AccountKind::User } as i32,
                    ..Default::default()
                },
            );
            async move { client.create_account(request).await }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    for r in results {
        r?;
    }
    Ok(())
}

/// Writes the events, `writers` statements at a time.
async fn generate(pool: &PgPool, args: &Args, start: DateTime<Utc>, end: DateTime<Utc>) -> Result<()> {
    let next = Arc::new(AtomicI64::new(0));
    let done = Arc::new(AtomicI64::new(0));
    let started = Instant::now();
    println!("events: writing {} events ({} sessions, {} per statement) ...", args.events, args.writers, args.chunk);
    let mut tasks = Vec::new();
    for _ in 0..args.writers {
        let (pool, next, done) = (pool.clone(), next.clone(), done.clone());
        let (events, chunk, users) = (args.events, args.chunk, args.users);
        tasks.push(tokio::spawn(async move {
            loop {
                let lo = next.fetch_add(chunk, Ordering::SeqCst);
                if lo >= events {
                    return Ok::<(), sqlx::Error>(());
                }
                let hi = (lo + chunk).min(events) - 1;
                sqlx::query(GENERATE)
                    .bind(lo)
                    .bind(hi)
                    .bind(events)
                    .bind(start)
                    .bind(end)
                    .bind(users)
                    .bind(TENANT)
                    .bind(true)
                    .execute(&pool)
                    .await?;
                let total = done.fetch_add(hi - lo + 1, Ordering::SeqCst) + hi - lo + 1;
                if total % 1_000_000 < chunk || total == events {
                    let secs = started.elapsed().as_secs_f64();
                    println!("  {total:>10} events, {secs:>6.0} s, {:>7.0} events/s", total as f64 / secs);
                }
            }
        }));
    }
    for task in tasks {
        task.await??;
    }
    println!(
        "events: {} written in {:.0} s (rollup filed by its trigger)",
        args.events,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Runs `call` once to warm up, then `runs` times; the durations and the
/// last answer.
async fn timed<F, Fut, T>(runs: usize, mut call: F) -> Result<(Vec<Duration>, Option<T>)>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<T, tonic::Status>>,
{
    call().await?;
    let mut times = Vec::with_capacity(runs);
    let mut last = None;
    for _ in 0..runs {
        let started = Instant::now();
        let answer = call().await?;
        times.push(started.elapsed());
        last = Some(answer);
    }
    Ok((times, last))
}

fn report(name: &str, rows: i64, times: &[Duration]) {
    let mut sorted = times.to_vec();
    sorted.sort();
    let (min, median, max) = (sorted[0], sorted[sorted.len() / 2], sorted[sorted.len() - 1]);
    println!("{name:<58} {rows:>7} {:>10} {:>10} {:>10}", ms(min), ms(median), ms(max));
}

/// What the rollup triggers cost the write path, on a scratch tenant:
/// committer-like inserts (100 unallocated events per statement) and
/// ledger-job-like allocations (10,000 events per UPDATE), with the
/// triggers and without. The scratch events and rollup rows are removed.
async fn write_cost(pool: &PgPool, month: DateTime<Utc>) -> Result<()> {
    const BATCH: i64 = 100;
    const EVENTS: i64 = 50_000;
    const ALLOCATE: i64 = 10_000;
    let end = month + chrono::Duration::days(1);
    println!("\nwrite path, {EVENTS} events of a scratch tenant:");
    let mut results = Vec::new();
    for (round, with_triggers) in [(0i64, true), (1, false), (2, true), (3, false)] {
        let toggle = if with_triggers { "ENABLE" } else { "DISABLE" };
        sqlx::query(sqlx::AssertSqlSafe(format!("ALTER TABLE usage_events {toggle} TRIGGER USER")))
            .execute(pool)
            .await?;
        let offset = 1_000_000_000 + round * EVENTS;
        let started = Instant::now();
        for lo in (offset..offset + EVENTS).step_by(BATCH as usize) {
            sqlx::query(GENERATE)
                .bind(lo)
                .bind(lo + BATCH - 1)
                .bind(offset + EVENTS)
                .bind(month)
                .bind(end)
                .bind(1000i64)
                .bind(WRITE_TENANT)
                .bind(false)
                .execute(pool)
                .await?;
        }
        let insert = started.elapsed() / (EVENTS / BATCH) as u32;
        let started = Instant::now();
        loop {
            let n = sqlx::query(
                "UPDATE usage_events SET allocated = true WHERE event_id = ANY(ARRAY( \
                   SELECT event_id FROM usage_events WHERE tenant_id = $1 AND NOT allocated LIMIT $2))",
            )
            .bind(WRITE_TENANT)
            .bind(ALLOCATE)
            .execute(pool)
            .await?
            .rows_affected();
            if n == 0 {
                break;
            }
        }
        let allocate = started.elapsed() / (EVENTS / ALLOCATE) as u32;
        sqlx::query("ALTER TABLE usage_events DISABLE TRIGGER USER").execute(pool).await?;
        sqlx::query("DELETE FROM usage_events WHERE tenant_id = $1").bind(WRITE_TENANT).execute(pool).await?;
        sqlx::query("DELETE FROM usage_rollup WHERE tenant_id = $1").bind(WRITE_TENANT).execute(pool).await?;
        sqlx::query("ALTER TABLE usage_events ENABLE TRIGGER USER").execute(pool).await?;
        sqlx::query("VACUUM usage_events").execute(pool).await?;
        results.push((with_triggers, insert, allocate));
    }
    for with_triggers in [true, false] {
        let runs: Vec<_> = results.iter().filter(|r| r.0 == with_triggers).collect();
        let insert = runs.iter().map(|r| r.1).min().unwrap_or_default();
        let allocate = runs.iter().map(|r| r.2).min().unwrap_or_default();
        println!(
            "  {:<17} insert of {BATCH} events {:>9} per statement; allocation of {ALLOCATE} events {:>9} per statement",
            if with_triggers { "with triggers:" } else { "without triggers:" },
            ms(insert),
            ms(allocate)
        );
    }
    Ok(())
}
