//! `creditd-bench`: a closed-loop load generator for a running creditd.
//!
//! It seeds its own tenants, accounts and grants through the API (with an
//! operator key), then drives each scenario with C workers that each send
//! one request, wait for the answer, and send the next: throughput is what
//! the server sustains at that concurrency, latency is what a caller sees.
//! Every run is bounded in time and in count. Targets are loopback only.
//!
//! Besides the scenarios it measures the machine's limits in the same run:
//! the gRPC floor (`grpc.health.v1.Health/Check` on the same server) and
//! the Redis ceiling (the reserve script called directly, one `EVALSHA`,
//! through `creditd::store::hot::HotStore`). CPU per request comes from
//! `/proc/<pid>/stat` (utime + stime) of the creditd server, Redis and
//! PostgreSQL (postmaster and its children) before and after each run.
//!
//! `scripts/bench.sh` builds, starts throwaway servers and runs it; see
//! `creditd-bench --help` to point it at servers of your own.

use std::{
    future::Future,
    net::SocketAddr,
    path::PathBuf,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use clap::Parser;
use creditd::{
    domain::Credits,
    pb::{self, admin_service_client::AdminServiceClient, credit_service_client::CreditServiceClient},
    store::hot::{HotStore, HotTimings, ReserveCall},
};
use serde_json::{Value, json};
use tonic::{
    Request,
    metadata::{Ascii, MetadataValue},
    transport::{Channel, Endpoint},
};
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

type Key = MetadataValue<Ascii>;
type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

#[derive(Parser, Debug, Clone)]
#[command(name = "creditd-bench", about = "Closed-loop load generator for creditd (loopback only)")]
struct Args {
    /// The creditd gRPC address (loopback).
    #[arg(long, default_value = "127.0.0.1:50051")]
    addr: SocketAddr,
    /// An operator API key (`creditd keys create --role operator`).
    #[arg(long, env = "CREDITD_BENCH_OPERATOR_KEY", hide_env_values = true)]
    operator_key: String,
    /// The Redis creditd uses (for the ceiling, memory figures and the
    /// fast seeding of large account sets).
    #[arg(long, env = "REDIS_URL")]
    redis_url: String,
    /// creditd's `redis.key_prefix`.
    #[arg(long, default_value = "creditd:")]
    redis_prefix: String,
    /// The PostgreSQL database creditd uses (sizes, fast seeding).
    #[arg(long, env = "DATABASE_URL")]
    database_url: String,
    /// Process id of the creditd server (CPU per request).
    #[arg(long)]
    server_pid: u32,
    /// Process id of redis-server (optional: its CPU per request).
    #[arg(long)]
    redis_pid: Option<u32>,
    /// Process id of the PostgreSQL postmaster (optional: CPU of it and its
    /// children per request).
    #[arg(long)]
    postgres_pid: Option<u32>,
    /// Clock ticks per second of /proc/<pid>/stat (`getconf CLK_TCK`).
    #[arg(long, default_value_t = 100)]
    clk_tck: u64,
    /// Measured seconds per run.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Unmeasured warm-up seconds before each run, same load.
    #[arg(long, default_value_t = 0.5)]
    warmup: f64,
    /// Most operations per run (the run stops at this count or its time,
    /// whichever comes first).
    #[arg(long, default_value_t = 2_000_000)]
    max_ops: u64,
    /// Concurrency levels of every scenario.
    #[arg(long, value_delimiter = ',', default_value = "1,64")]
    concurrency: Vec<usize>,
    /// Most HTTP/2 connections the workers share (min(concurrency, this)).
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// Tenants of the spread scenarios.
    #[arg(long, default_value_t = 100)]
    tenants: usize,
    /// Users per tenant (the spread scenarios use tenants × users).
    #[arg(long, default_value_t = 100)]
    users_per_tenant: usize,
    /// Account-set sizes of the growth runs ("" skips them).
    #[arg(long, value_delimiter = ',', default_value = "1000,100000,1000000")]
    scale: Vec<usize>,
    /// Accounts of the growth tenant created through the API; beyond this
    /// they are written straight into PostgreSQL and Redis.
    #[arg(long, default_value_t = 1000)]
    scale_api_max: usize,
    /// Concurrency of the growth runs.
    #[arg(long, default_value_t = 64)]
    scale_concurrency: usize,
    /// Holds created to measure Redis memory per active hold.
    #[arg(long, default_value_t = 20_000)]
    hold_sample: u64,
    /// Reserve+Commit pairs to measure bytes per committed event.
    #[arg(long, default_value_t = 10_000)]
    event_sample: u64,
    /// Only these scenarios (comma separated names; empty: all), e.g. for
    /// profiling one of them.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Record a CPU profile (`perf record`, DWARF call graphs) of creditd
    /// and of redis-server during each measured run, into this directory.
    #[arg(long)]
    perf: Option<PathBuf>,
    /// Skip the memory and size measurements.
    #[arg(long)]
    no_footprint: bool,
    /// Directory for latest.json and latest.md (nothing written if unset).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Free text recorded with the results (e.g. the commit).
    #[arg(long, default_value = "")]
    label: String,
    /// Seconds after which remaining phases are skipped (a safety bound).
    #[arg(long, default_value_t = 600.0)]
    budget: f64,
}

/// Hold TTL of every Reserve: longer than a whole run, so no hold expires
/// while measurements are taken (the reaper then has nothing to do).
const HOLD_TTL: Duration = Duration::from_secs(1800);
const RESERVE_AMOUNT: &str = "1";
const COMMIT_AMOUNT: &str = "0.75";
const ORG_GRANT: &str = "1000000000";
const RATED_MODEL: &str = "example-fast-1";

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    match runtime.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("creditd-bench: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

type AnyResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn log(msg: impl AsRef<str>) {
    eprintln!("[bench {}] {}", chrono::Utc::now().format("%H:%M:%S"), msg.as_ref());
}

// ---------------------------------------------------------------------------
// Loopback only

fn is_loopback_host(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    if h == "localhost" {
        return true;
    }
    h.parse::<std::net::IpAddr>().map(|ip| ip.is_loopback()).unwrap_or(false)
}

fn require_loopback(args: &Args) -> AnyResult<()> {
    if !args.addr.ip().is_loopback() {
        return Err(format!("--addr {} is not a loopback address", args.addr).into());
    }
    for (what, raw) in [("--redis-url", &args.redis_url), ("--database-url", &args.database_url)] {
        let url = url::Url::parse(raw).map_err(|e| format!("{what}: {e}"))?;
        let host = url.host_str().unwrap_or("");
        if !is_loopback_host(host) {
            return Err(format!("{what} must name a loopback host (got {host:?})").into());
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// CPU time from /proc

/// utime, stime, cutime, cstime (ticks) and parent pid of a process.
fn proc_stat(pid: u32) -> Option<(u64, u64, u64, u64, u32)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces: fields resume after the last ')'.
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); utime is field 14.
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
    Some((n(11)?, n(12)?, n(13)?, n(14)?, f.get(1)?.parse().ok()?))
}

/// CPU ticks of one process (its threads).
fn cpu_of(pid: u32) -> Option<u64> {
    proc_stat(pid).map(|(u, s, _, _, _)| u + s)
}

/// A postmaster and its children.
fn postgres_pids(parent: u32) -> Vec<String> {
    let mut pids = vec![parent.to_string()];
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        if proc_stat(pid).is_some_and(|(_, _, _, _, ppid)| ppid == parent) {
            pids.push(pid.to_string());
        }
    }
    pids
}

/// CPU ticks of a postmaster and its children (exited children count
/// through the postmaster's cutime/cstime).
fn cpu_of_tree(parent: u32) -> Option<u64> {
    let (u, s, cu, cs, _) = proc_stat(parent)?;
    let mut total = u + s + cu + cs;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        if let Some((u, s, _, _, ppid)) = proc_stat(pid)
            && ppid == parent
        {
            total += u + s;
        }
    }
    Some(total)
}

/// Busy ticks of the whole machine (all CPUs), from /proc/stat.
fn machine_busy() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().next()?.strip_prefix("cpu ")?;
    let f: Vec<u64> = line.split_whitespace().filter_map(|v| v.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal: all but idle and iowait.
    Some(f.iter().take(8).enumerate().filter(|(i, _)| *i != 3 && *i != 4).map(|(_, v)| v).sum())
}

#[derive(Clone, Copy, Default)]
struct CpuSnap {
    server: Option<u64>,
    redis: Option<u64>,
    postgres: Option<u64>,
    client: Option<u64>,
    machine: Option<u64>,
}

struct Cpu {
    server: u32,
    redis: Option<u32>,
    postgres: Option<u32>,
    tck: u64,
}

impl Cpu {
    fn snap(&self) -> CpuSnap {
        CpuSnap {
            server: cpu_of(self.server),
            redis: self.redis.and_then(cpu_of),
            postgres: self.postgres.and_then(cpu_of_tree),
            client: cpu_of(std::process::id()),
            machine: machine_busy(),
        }
    }

    /// CPU cores kept busy by everything but creditd, Redis, PostgreSQL
    /// and this client (other work on the machine skews a run).
    fn others(&self, a: CpuSnap, b: CpuSnap, secs: f64) -> Value {
        let d = |x: Option<u64>, y: Option<u64>| Some(y?.saturating_sub(x?));
        let ours = [d(a.server, b.server), d(a.redis, b.redis), d(a.postgres, b.postgres), d(a.client, b.client)]
            .into_iter()
            .map(|v| v.unwrap_or(0))
            .sum::<u64>();
        match d(a.machine, b.machine) {
            Some(total) if secs > 0.0 => {
                json!(round2(total.saturating_sub(ours) as f64 / self.tck as f64 / secs))
            }
            _ => Value::Null,
        }
    }

    /// Microseconds of CPU per operation between two snapshots.
    fn per_op(&self, a: CpuSnap, b: CpuSnap, ops: u64) -> Value {
        let us = |x: Option<u64>, y: Option<u64>| match (x, y) {
            (Some(x), Some(y)) if ops > 0 => {
                json!(round2((y.saturating_sub(x)) as f64 * 1e6 / self.tck as f64 / ops as f64))
            }
            _ => Value::Null,
        };
        json!({
            "creditd": us(a.server, b.server),
            "redis": us(a.redis, b.redis),
            "postgres": us(a.postgres, b.postgres),
            "client": us(a.client, b.client),
        })
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

// ---------------------------------------------------------------------------
// The closed loop

/// One operation's outcome: `Ok(None)`, `Ok(Some([a, b]))` with the
/// latencies (ns) of its two calls (pairs), or an error text.
type OpResult = Result<Option<[u64; 2]>, String>;

trait Op: Send + Sync + 'static {
    fn call(&self, worker: usize, seq: u64) -> BoxFut<'_, OpResult>;
}

struct Load {
    ops: u64,
    errors: u64,
    first_error: Option<String>,
    elapsed: Duration,
    /// Latency of each operation, ns, sorted.
    lat: Vec<u64>,
    /// Pairs: the latency of each of the two calls, sorted.
    parts: Option<[Vec<u64>; 2]>,
    /// The slowest operations: (start, seconds into the run; latency, ns).
    slowest: Vec<(f64, u64)>,
}

/// Operations slower than this are kept with their start time, to tell
/// periodic stalls from scattered ones.
const SLOW_NS: u64 = 20_000_000;

/// Runs `op` with `concurrency` workers until `seconds` pass or `max_ops`
/// operations started.
async fn closed_loop(op: Arc<dyn Op>, concurrency: usize, seconds: f64, max_ops: u64) -> Load {
    let started = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(Mutex::new(None::<String>));
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs_f64(seconds);
    let mut handles = Vec::with_capacity(concurrency);
    for w in 0..concurrency {
        let op = op.clone();
        let started = started.clone();
        let first_error = first_error.clone();
        handles.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(4096);
            let mut parts: [Vec<u64>; 2] = [Vec::new(), Vec::new()];
            let mut errors = 0u64;
            let mut slow: Vec<(f64, u64)> = Vec::new();
            loop {
                if Instant::now() >= deadline {
                    break;
                }
                let seq = started.fetch_add(1, Ordering::Relaxed);
                if seq >= max_ops {
                    break;
                }
                let t = Instant::now();
                let r = op.call(w, seq).await;
                let ns = t.elapsed().as_nanos() as u64;
                if ns >= SLOW_NS {
                    slow.push(((t - t0).as_secs_f64(), ns));
                }
                match r {
                    Ok(p) => {
                        lat.push(ns);
                        if let Some([a, b]) = p {
                            parts[0].push(a);
                            parts[1].push(b);
                        }
                    }
                    Err(e) => {
                        errors += 1;
                        let mut slot = first_error.lock().unwrap();
                        if slot.is_none() {
                            *slot = Some(e);
                        }
                    }
                }
            }
            (lat, parts, errors, slow)
        }));
    }
    let mut lat = Vec::new();
    let mut parts: [Vec<u64>; 2] = [Vec::new(), Vec::new()];
    let mut errors = 0;
    let mut slowest = Vec::new();
    for h in handles {
        let (l, p, e, slow) = h.await.expect("bench worker");
        slowest.extend(slow);
        lat.extend(l);
        let [a, b] = p;
        parts[0].extend(a);
        parts[1].extend(b);
        errors += e;
    }
    let elapsed = t0.elapsed();
    lat.sort_unstable();
    parts[0].sort_unstable();
    parts[1].sort_unstable();
    let has_parts = !parts[0].is_empty();
    let first_error = first_error.lock().unwrap().take();
    slowest.sort_by_key(|s| std::cmp::Reverse(s.1));
    slowest.truncate(12);
    slowest.sort_by(|a, b| a.0.total_cmp(&b.0));
    Load {
        slowest,
        ops: lat.len() as u64,
        errors,
        first_error,
        elapsed,
        lat,
        parts: if has_parts { Some(parts) } else { None },
    }
}

/// Nearest-rank percentile of sorted samples, in ms.
fn pct_ms(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    let i = rank.clamp(1, sorted.len()) - 1;
    round3(sorted[i] as f64 / 1e6)
}

fn latency_json(sorted: &[u64]) -> Value {
    let mean = if sorted.is_empty() { 0.0 } else { sorted.iter().sum::<u64>() as f64 / sorted.len() as f64 / 1e6 };
    json!({
        "p50": pct_ms(sorted, 50.0),
        "p90": pct_ms(sorted, 90.0),
        "p99": pct_ms(sorted, 99.0),
        "p99_9": pct_ms(sorted, 99.9),
        "max": sorted.last().map(|v| round3(*v as f64 / 1e6)),
        "mean": round3(mean),
    })
}

/// splitmix64: spreads worker × sequence over the target set.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn pick(worker: usize, seq: u64, n: usize) -> usize {
    (mix(seq ^ ((worker as u64) << 48)) % n as u64) as usize
}

fn status_text(s: &tonic::Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}

fn with_key<T>(msg: T, key: &Key) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut().insert("authorization", key.clone());
    r
}

fn bearer(key: &str) -> AnyResult<Key> {
    Ok(format!("Bearer {key}").parse::<Key>()?)
}

fn ttl() -> Option<prost_types::Duration> {
    Some(prost_types::Duration { seconds: HOLD_TTL.as_secs() as i64, nanos: 0 })
}

// ---------------------------------------------------------------------------
// Targets of the scenarios

/// One account a scenario may address, with its tenant's runtime key.
#[derive(Clone)]
struct Target {
    tenant: usize,
    account: String,
}

#[derive(Clone)]
struct Fixture {
    /// Runtime key per tenant index.
    keys: Vec<Key>,
    tenant_ids: Vec<String>,
    /// The spread set.
    users: Vec<Target>,
    hot: Target,
}

struct Clients {
    credit: Vec<CreditServiceClient<Channel>>,
    health: Vec<HealthClient<Channel>>,
}

impl Clients {
    async fn connect(addr: SocketAddr, n: usize) -> AnyResult<Clients> {
        let mut credit = Vec::new();
        let mut health = Vec::new();
        for _ in 0..n {
            // One Endpoint::connect is one HTTP/2 connection.
            let channel = Endpoint::from_shared(format!("http://{addr}"))?
                .tcp_nodelay(true)
                .connect_timeout(Duration::from_secs(5))
                .timeout(Duration::from_secs(10))
                .connect()
                .await?;
            credit.push(CreditServiceClient::new(channel.clone()));
            health.push(HealthClient::new(channel));
        }
        Ok(Clients { credit, health })
    }
}

fn usage(input: &str, output: &str) -> pb::Usage {
    pb::Usage {
        items: vec![
            pb::UsageItem { meter: "input_tokens".into(), model: RATED_MODEL.into(), quantity: input.into() },
            pb::UsageItem { meter: "output_tokens".into(), model: RATED_MODEL.into(), quantity: output.into() },
        ],
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    RedisPing,
    Floor,
    Ceiling,
    ReserveSpread,
    ReserveHot,
    ReserveCommit,
    Authorize,
    GetBalance,
    ReserveCommitRated,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::RedisPing => "redis_ping",
            Kind::Floor => "grpc_floor",
            Kind::Ceiling => "redis_ceiling",
            Kind::ReserveSpread => "reserve_spread",
            Kind::ReserveHot => "reserve_hot",
            Kind::ReserveCommit => "reserve_commit",
            Kind::Authorize => "authorize",
            Kind::GetBalance => "get_balance",
            Kind::ReserveCommitRated => "reserve_commit_rated",
        }
    }

    fn title(self) -> &'static str {
        match self {
            Kind::RedisPing => "machine: Redis PING round trip",
            Kind::Floor => "gRPC floor: Health/Check",
            Kind::Ceiling => "Redis ceiling: reserve script, direct",
            Kind::ReserveSpread => "Reserve, 10k users / 100 tenants",
            Kind::ReserveHot => "Reserve, one hot user",
            Kind::ReserveCommit => "Reserve+Commit pairs (durable)",
            Kind::Authorize => "Authorize",
            Kind::GetBalance => "GetBalance",
            Kind::ReserveCommitRated => "Reserve+Commit, rated tokens",
        }
    }

    fn pairs(self) -> bool {
        matches!(self, Kind::ReserveCommit | Kind::ReserveCommitRated)
    }
}

struct ScenarioOp {
    kind: Kind,
    clients: Arc<Clients>,
    fx: Arc<Fixture>,
    hot_store: Option<HotStore>,
    /// Makes idempotency keys unique to this process and run.
    tag: String,
}

impl ScenarioOp {
    fn credit(&self, worker: usize) -> CreditServiceClient<Channel> {
        self.clients.credit[worker % self.clients.credit.len()].clone()
    }

    async fn reserve(&self, worker: usize, seq: u64, t: &Target, rated: bool) -> Result<String, String> {
        let cost = if rated {
            pb::reserve_request::Cost::Usage(usage("4000", "2000"))
        } else {
            pb::reserve_request::Cost::Amount(RESERVE_AMOUNT.into())
        };
        let req = pb::ReserveRequest {
            account_id: t.account.clone(),
            cost: Some(cost),
            ttl: ttl(),
            idempotency_key: format!("{}-r-{worker}-{seq}", self.tag),
            labels: Default::default(),
        };
        let r = self
            .credit(worker)
            .reserve(with_key(req, &self.fx.keys[t.tenant]))
            .await
            .map_err(|s| status_text(&s))?
            .into_inner();
        if !r.granted {
            return Err(format!("reserve denied: {:?}", r.denial));
        }
        Ok(r.reservation_id)
    }

    async fn call_inner(&self, worker: usize, seq: u64) -> OpResult {
        let fx = &self.fx;
        match self.kind {
            Kind::RedisPing => {
                let store = self.hot_store.as_ref().expect("ping has a store");
                store.ping().await.map_err(|e| e.to_string())?;
                Ok(None)
            }
            Kind::Floor => {
                let mut h = self.clients.health[worker % self.clients.health.len()].clone();
                let r = h
                    .check(HealthCheckRequest { service: String::new() })
                    .await
                    .map_err(|s| status_text(&s))?
                    .into_inner();
                if r.status != ServingStatus::Serving as i32 {
                    return Err(format!("health status {}", r.status));
                }
                Ok(None)
            }
            Kind::Ceiling => {
                let t = &fx.users[pick(worker, seq, fx.users.len())];
                let store = self.hot_store.as_ref().expect("ceiling has a store");
                let key = format!("{}-c-{worker}-{seq}", self.tag);
                let call = ReserveCall {
                    subject: &t.account,
                    amount: Credits::from_micros(1_000_000),
                    ttl: HOLD_TTL,
                    idempotency_key: Some(&key),
                    payload_hash: "bench-ceiling",
                    labels_json: "",
                    price_version: "",
                };
                let r = store.reserve(&fx.tenant_ids[t.tenant], &call).await.map_err(|e| e.to_string())?;
                match r.outcome {
                    creditd::store::hot::ReserveOutcome::Granted { .. } => Ok(None),
                    creditd::store::hot::ReserveOutcome::Denied(d) => Err(format!("ceiling denied: {d:?}")),
                }
            }
            Kind::ReserveSpread => {
                let t = &fx.users[pick(worker, seq, fx.users.len())];
                self.reserve(worker, seq, t, false).await.map(|_| None)
            }
            Kind::ReserveHot => self.reserve(worker, seq, &fx.hot, false).await.map(|_| None),
            Kind::Authorize => {
                let t = &fx.users[pick(worker, seq, fx.users.len())];
                let req = pb::AuthorizeRequest {
                    account_id: t.account.clone(),
                    cost: Some(pb::authorize_request::Cost::Amount(RESERVE_AMOUNT.into())),
                };
                let r = self
                    .credit(worker)
                    .authorize(with_key(req, &fx.keys[t.tenant]))
                    .await
                    .map_err(|s| status_text(&s))?
                    .into_inner();
                if !r.granted {
                    return Err(format!("authorize denied: {:?}", r.denial));
                }
                Ok(None)
            }
            Kind::GetBalance => {
                let t = &fx.users[pick(worker, seq, fx.users.len())];
                let req = pb::GetBalanceRequest { account_id: t.account.clone() };
                let r = self
                    .credit(worker)
                    .get_balance(with_key(req, &fx.keys[t.tenant]))
                    .await
                    .map_err(|s| status_text(&s))?
                    .into_inner();
                if r.levels.is_empty() {
                    return Err("balance without levels".into());
                }
                Ok(None)
            }
            Kind::ReserveCommit | Kind::ReserveCommitRated => {
                let rated = self.kind == Kind::ReserveCommitRated;
                let t = &fx.users[pick(worker, seq, fx.users.len())];
                let t0 = Instant::now();
                let rid = self.reserve(worker, seq, t, rated).await?;
                let t1 = Instant::now();
                let cost = if rated {
                    pb::commit_request::Cost::Usage(usage("3000", "1200"))
                } else {
                    pb::commit_request::Cost::Amount(COMMIT_AMOUNT.into())
                };
                let req = pb::CommitRequest {
                    reservation_id: rid,
                    cost: Some(cost),
                    idempotency_key: format!("{}-k-{worker}-{seq}", self.tag),
                    labels: Default::default(),
                };
                let r = self
                    .credit(worker)
                    .commit(with_key(req, &fx.keys[t.tenant]))
                    .await
                    .map_err(|s| status_text(&s))?
                    .into_inner();
                if rated && r.rating.is_none() {
                    return Err("rated commit without rating".into());
                }
                let t2 = Instant::now();
                Ok(Some([(t1 - t0).as_nanos() as u64, (t2 - t1).as_nanos() as u64]))
            }
        }
    }
}

impl Op for ScenarioOp {
    fn call(&self, worker: usize, seq: u64) -> BoxFut<'_, OpResult> {
        Box::pin(self.call_inner(worker, seq))
    }
}

// ---------------------------------------------------------------------------
// Seeding through the API

struct Admin {
    client: AdminServiceClient<Channel>,
    operator: Key,
}

impl Admin {
    async fn tenant(&self, tenant_id: &str, run: &str) -> AnyResult<(Key, Key)> {
        let mut c = self.client.clone();
        c.create_tenant(with_key(
            pb::CreateTenantRequest {
                tenant_id: tenant_id.into(),
                display_name: "benchmark".into(),
                ..Default::default()
            },
            &self.operator,
        ))
        .await?;
        let mut keys = Vec::new();
        for role in [pb::ApiKeyRole::Admin, pb::ApiKeyRole::Runtime] {
            let r = c
                .create_api_key(with_key(
                    pb::CreateApiKeyRequest {
                        tenant_id: tenant_id.into(),
                        role: role as i32,
                        name: format!("bench-{}", role.as_str_name()),
                        idempotency_key: format!("bench-{run}-{tenant_id}-{}", role as i32),
                    },
                    &self.operator,
                ))
                .await?
                .into_inner();
            keys.push(bearer(&r.key)?);
        }
        let runtime = keys.pop().expect("two keys");
        let admin = keys.pop().expect("two keys");
        // The pool every user of the tenant draws on.
        c.create_account(with_key(
            pb::CreateAccountRequest {
                account_id: "org".into(),
                kind: pb::AccountKind::Organization as i32,
                ..Default::default()
            },
            &admin,
        ))
        .await?;
        c.create_grant(with_key(
            pb::CreateGrantRequest {
                account_id: "org".into(),
                amount: ORG_GRANT.into(),
                category: pb::GrantCategory::Purchase as i32,
                idempotency_key: "bench-org-grant".into(),
                description: "benchmark pool".into(),
                ..Default::default()
            },
            &admin,
        ))
        .await?;
        Ok((admin, runtime))
    }
}

async fn create_user(client: &AdminServiceClient<Channel>, admin: &Key, account: &str) -> AnyResult<()> {
    client
        .clone()
        .create_account(with_key(
            pb::CreateAccountRequest {
                account_id: account.into(),
                parent_id: "org".into(),
                kind: pb::AccountKind::User as i32,
                pool_access: true,
                ..Default::default()
            },
            admin,
        ))
        .await?;
    Ok(())
}

/// Runs `f(i)` for i in 0..n with `parallel` tasks; returns the elapsed time.
async fn parallel<F, Fut>(n: usize, parallel: usize, f: F) -> AnyResult<Duration>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = AnyResult<()>> + Send,
{
    let t0 = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let f = Arc::new(f);
    let mut handles = Vec::new();
    for _ in 0..parallel.max(1) {
        let next = next.clone();
        let f = f.clone();
        handles.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return Ok::<(), Box<dyn std::error::Error + Send + Sync>>(());
                }
                f(i).await?;
            }
        }));
    }
    for h in handles {
        h.await??;
    }
    Ok(t0.elapsed())
}

// ---------------------------------------------------------------------------
// Redis and PostgreSQL figures

/// Redis memory: all of it (INFO used_memory), the data (MEMORY STATS
/// dataset.bytes) and the key tables of db 0 (their buckets and entries;
/// Redis doubles a table as it grows, so a delta may include a resize).
#[derive(Clone, Copy, Debug, Default)]
struct RedisMem {
    used: i64,
    dataset: i64,
    tables: i64,
}

impl RedisMem {
    /// Bytes per unit between two readings, as JSON.
    fn per(self, later: RedisMem, n: u64) -> Value {
        let n = n.max(1) as f64;
        json!({
            "used_memory": ((later.used - self.used) as f64 / n).round(),
            "dataset": ((later.dataset - self.dataset) as f64 / n).round(),
            "key_tables": ((later.tables - self.tables) as f64 / n).round(),
        })
    }
}

fn stat_pairs(v: &redis::Value, out: &mut Vec<(String, i64)>) {
    let items = match v {
        redis::Value::Array(items) => items.clone(),
        redis::Value::Map(pairs) => pairs.iter().flat_map(|(k, v)| [k.clone(), v.clone()]).collect(),
        _ => return,
    };
    for pair in items.chunks(2) {
        let [k, v] = pair else { continue };
        let key = match k {
            redis::Value::BulkString(b) => String::from_utf8_lossy(b).to_string(),
            redis::Value::SimpleString(s) => s.clone(),
            _ => continue,
        };
        match v {
            redis::Value::Int(i) => out.push((key, *i)),
            redis::Value::Array(_) | redis::Value::Map(_) => stat_pairs(v, out),
            _ => {}
        }
    }
}

async fn redis_memory(conn: &mut redis::aio::MultiplexedConnection) -> AnyResult<RedisMem> {
    let used = redis_used_memory(conn).await?;
    let stats: redis::Value = redis::cmd("MEMORY").arg("STATS").query_async(conn).await?;
    let mut pairs = Vec::new();
    stat_pairs(&stats, &mut pairs);
    let get = |k: &str| pairs.iter().find(|(n, _)| n == k).map_or(0, |(_, v)| *v);
    Ok(RedisMem {
        used,
        dataset: get("dataset.bytes"),
        tables: get("overhead.hashtable.main") + get("overhead.hashtable.expires"),
    })
}

async fn redis_used_memory(conn: &mut redis::aio::MultiplexedConnection) -> AnyResult<i64> {
    let info: String = redis::cmd("INFO").arg("memory").query_async(conn).await?;
    for line in info.lines() {
        if let Some(v) = line.strip_prefix("used_memory:") {
            return Ok(v.trim().parse()?);
        }
    }
    Err("INFO memory has no used_memory".into())
}

async fn redis_memory_usage(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> Option<i64> {
    redis::cmd("MEMORY").arg("USAGE").arg(key).arg("SAMPLES").arg(0).query_async(conn).await.ok()
}

/// Lets Redis's cron shrink client buffers before memory is read.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(1500)).await;
}

async fn redis_keys(conn: &mut redis::aio::MultiplexedConnection) -> AnyResult<i64> {
    Ok(redis::cmd("DBSIZE").query_async(conn).await?)
}

#[derive(Clone, Copy, Debug, Default)]
struct PgSizes {
    events_rows: i64,
    ledger_rows: i64,
    events_bytes: i64,
    ledger_bytes: i64,
    wal: i64,
}

async fn pg_sizes(pg: &sqlx::PgPool) -> AnyResult<PgSizes> {
    let (events_rows, ledger_rows, events_bytes, ledger_bytes, wal): (i64, i64, i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM usage_events), (SELECT count(*) FROM ledger), \
           pg_total_relation_size('usage_events'), pg_total_relation_size('ledger'), \
           pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint",
    )
    .fetch_one(pg)
    .await?;
    Ok(PgSizes { events_rows, ledger_rows, events_bytes, ledger_bytes, wal })
}

/// Waits until the ledger job has allocated every usage event (bounded).
async fn wait_allocated(pg: &sqlx::PgPool, limit: Duration) -> AnyResult<bool> {
    let t0 = Instant::now();
    loop {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM usage_events WHERE NOT allocated").fetch_one(pg).await?;
        if n == 0 {
            return Ok(true);
        }
        if t0.elapsed() > limit {
            log(format!("{n} usage events still unallocated after {limit:?}"));
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

// ---------------------------------------------------------------------------
// Fast seeding of large account sets

/// Writes users `from..to` of `tenant` (children of `org` with pool
/// access) straight into PostgreSQL and Redis, in the layout creditd
/// itself writes (`accounts` rows as CreateAccount inserts them; the Redis
/// hash fields of `HotStore::load_tenant`). PostgreSQL first, as the
/// service does. Returns the elapsed time.
async fn seed_direct(
    pg: &sqlx::PgPool,
    redis_url: &str,
    prefix: &str,
    tenant: &str,
    from: usize,
    to: usize,
) -> AnyResult<Duration> {
    let t0 = Instant::now();
    let mut tx = pg.begin().await?;
    // Bounded, and without per-row foreign-key triggers: the parent (and so
    // the tenant) is read below, in this transaction, and every row names it.
    sqlx::query("SET LOCAL statement_timeout = '300s'").execute(&mut *tx).await?;
    sqlx::query("SET LOCAL session_replication_role = replica").execute(&mut *tx).await?;
    let (depth, period_start, pe): (i32, Option<chrono::DateTime<chrono::Utc>>, Option<chrono::DateTime<chrono::Utc>>) =
        sqlx::query_as(
            "SELECT depth, period_start, period_end FROM accounts \
             WHERE tenant_id = $1 AND account_id = 'org' FOR KEY SHARE",
        )
        .bind(tenant)
        .fetch_one(&mut *tx)
        .await?;
    let mut lo = from;
    while lo < to {
        let hi = (lo + 100_000).min(to);
        sqlx::query(
            "INSERT INTO accounts (tenant_id, account_id, parent_id, kind, display_name, pool_access, depth, tier, \
               period_start, period_end) \
             SELECT $1, 's' || lpad(g::text, 7, '0'), 'org', 'user', '', true, $2, '', $3, $4 \
             FROM generate_series($5::int, $6::int - 1) AS g \
             ON CONFLICT (tenant_id, account_id) DO NOTHING",
        )
        .bind(tenant)
        .bind(depth + 1)
        .bind(period_start)
        .bind(pe)
        .bind(lo as i32)
        .bind(hi as i32)
        .execute(&mut *tx)
        .await?;
        lo = hi;
    }
    tx.commit().await?;
    let pe_ms = pe.map_or(0, |t| t.timestamp_millis()).to_string();
    let keys = creditd::store::keys::TenantKeys::new(prefix, tenant);
    let client = redis::Client::open(redis_url)?;
    let next = Arc::new(AtomicUsize::new(from));
    let mut handles = Vec::new();
    for _ in 0..4 {
        let mut conn = client.get_multiplexed_async_connection().await?;
        let next = next.clone();
        let keys = keys.clone();
        let pe_ms = pe_ms.clone();
        handles.push(tokio::spawn(async move {
            loop {
                let lo = next.fetch_add(1000, Ordering::Relaxed);
                if lo >= to {
                    return Ok::<(), redis::RedisError>(());
                }
                let hi = (lo + 1000).min(to);
                let mut pipe = redis::pipe();
                for i in lo..hi {
                    let fields: [&str; 20] = [
                        "p",
                        "org",
                        "pa",
                        "1",
                        "cap",
                        "",
                        "s",
                        "0",
                        "pe",
                        pe_ms.as_str(),
                        "ra",
                        "0",
                        "b",
                        "0",
                        "h",
                        "0",
                        "u",
                        "0",
                        "uh",
                        "0",
                    ];
                    pipe.cmd("HSET").arg(keys.account(&format!("s{i:07}"))).arg(&fields[..]).ignore();
                }
                let _: () = pipe.query_async(&mut conn).await?;
            }
        }));
    }
    for h in handles {
        h.await??;
    }
    Ok(t0.elapsed())
}

// ---------------------------------------------------------------------------
// The run

struct Ctx {
    args: Args,
    cpu: Cpu,
    fx: Arc<Fixture>,
    hot_store: HotStore,
    run: String,
    started: Instant,
}

impl Ctx {
    fn over_budget(&self) -> bool {
        self.started.elapsed().as_secs_f64() > self.args.budget
    }

    fn wants(&self, name: &str) -> bool {
        self.args.only.is_empty() || self.args.only.iter().any(|o| o == name)
    }

    /// `perf record` of creditd and redis-server for one run's duration.
    fn start_perf(&self, kind: Kind, concurrency: usize) -> AnyResult<Vec<std::process::Child>> {
        let Some(dir) = &self.args.perf else { return Ok(Vec::new()) };
        std::fs::create_dir_all(dir)?;
        let mut children = Vec::new();
        let pids = [
            ("creditd", Some(self.cpu.server.to_string())),
            ("redis", self.cpu.redis.map(|p| p.to_string())),
            // The postmaster and its backends (frame-pointer call graphs).
            ("postgres", self.cpu.postgres.map(|p| postgres_pids(p).join(","))),
        ];
        for (what, pids) in pids {
            let Some(pids) = pids else { continue };
            let out = dir.join(format!("{}-c{concurrency}-{what}.perf", kind.name()));
            let graph = if what == "postgres" { "fp" } else { "dwarf,16384" };
            let child = std::process::Command::new("perf")
                .args(["record", "-F", "499", "--call-graph", graph, "-p", &pids, "-o"])
                .arg(&out)
                .args(["--", "sleep", &format!("{}", self.args.seconds)])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .map_err(|e| format!("perf: {e}"))?;
            children.push(child);
        }
        Ok(children)
    }

    /// Warm-up, then one measured run of `kind` over `fx`.
    async fn measure(&self, kind: Kind, fx: Arc<Fixture>, concurrency: usize, tag: &str) -> AnyResult<Value> {
        let conns = concurrency.min(self.args.connections).max(1);
        let clients = Arc::new(Clients::connect(self.args.addr, conns).await?);
        let op = |suffix: &str| -> Arc<dyn Op> {
            Arc::new(ScenarioOp {
                kind,
                clients: clients.clone(),
                fx: fx.clone(),
                hot_store: matches!(kind, Kind::Ceiling | Kind::RedisPing).then(|| self.hot_store.clone()),
                tag: format!("{}-{tag}-{suffix}", self.run),
            })
        };
        if self.args.warmup > 0.0 {
            let w = closed_loop(op("w"), concurrency, self.args.warmup, self.args.max_ops).await;
            if w.errors > 0 {
                log(format!("warm-up of {} c={concurrency}: {} errors ({:?})", kind.name(), w.errors, w.first_error));
            }
        }
        let perf = self.start_perf(kind, concurrency)?;
        let before = self.cpu.snap();
        let load = closed_loop(op("m"), concurrency, self.args.seconds, self.args.max_ops).await;
        let after = self.cpu.snap();
        for mut child in perf {
            tokio::task::spawn_blocking(move || child.wait()).await??;
        }
        let secs = load.elapsed.as_secs_f64();
        let rps = load.ops as f64 / secs;
        let mut v = json!({
            "scenario": kind.name(),
            "title": kind.title(),
            "concurrency": concurrency,
            "connections": conns,
            "seconds": round3(secs),
            "ops": load.ops,
            "unit": if kind.pairs() { "pair" } else { "request" },
            "ops_per_sec": round2(rps),
            "errors": load.errors,
            "first_error": load.first_error,
            "latency_ms": latency_json(&load.lat),
            "cpu_us_per_op": self.cpu.per_op(before, after, load.ops),
            "other_load_cores": self.cpu.others(before, after, secs),
            "slowest_ops": load.slowest.iter().map(|(at, ns)| json!({
                "at_s": round3(*at), "ms": round3(*ns as f64 / 1e6)
            })).collect::<Vec<_>>(),
        });
        if let Some([r, c]) = &load.parts {
            v["reserve_latency_ms"] = latency_json(r);
            v["commit_latency_ms"] = latency_json(c);
        }
        log(format!(
            "{:<22} c={:<3} {:>9.0} {}/s  p50 {:.3} ms  p99 {:.3} ms  p99.9 {:.3} ms  creditd {} µs/op  errors {}",
            kind.name(),
            concurrency,
            rps,
            if kind.pairs() { "pairs" } else { "req" },
            pct_ms(&load.lat, 50.0),
            pct_ms(&load.lat, 99.0),
            pct_ms(&load.lat, 99.9),
            v["cpu_us_per_op"]["creditd"],
            load.errors,
        ));
        Ok(v)
    }
}

async fn wait_serving(addr: SocketAddr) -> AnyResult<()> {
    let t0 = Instant::now();
    loop {
        let attempt = async {
            let channel = Endpoint::from_shared(format!("http://{addr}"))?
                .connect_timeout(Duration::from_secs(2))
                .connect()
                .await?;
            let r = HealthClient::new(channel).check(HealthCheckRequest { service: String::new() }).await?;
            Ok::<bool, Box<dyn std::error::Error + Send + Sync>>(r.into_inner().status == ServingStatus::Serving as i32)
        };
        if let Ok(true) = attempt.await {
            return Ok(());
        }
        if t0.elapsed() > Duration::from_secs(60) {
            return Err(format!("creditd at {addr} did not report SERVING within 60 s").into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn machine() -> Value {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").map(|r| r.trim_start_matches([' ', '\t', ':']).to_string()))
        .unwrap_or_default();
    let mem_kb = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:").and_then(|r| r.split_whitespace().next()?.parse::<u64>().ok()))
        .unwrap_or(0);
    json!({
        "nproc": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu_model": model,
        "memory_gib": round2(mem_kb as f64 / 1024.0 / 1024.0),
        "kernel": read("/proc/sys/kernel/osrelease").trim(),
    })
}

async fn run(args: Args) -> AnyResult<()> {
    require_loopback(&args)?;
    let started = Instant::now();
    let run = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    log(format!("run {run}: waiting for creditd at {}", args.addr));
    wait_serving(args.addr).await?;

    let channel = Endpoint::from_shared(format!("http://{}", args.addr))?.tcp_nodelay(true).connect().await?;
    let admin = Arc::new(Admin { client: AdminServiceClient::new(channel), operator: bearer(&args.operator_key)? });
    let pg = sqlx::postgres::PgPoolOptions::new().max_connections(4).connect(&args.database_url).await?;
    let mut redis_conn = redis::Client::open(args.redis_url.as_str())?.get_multiplexed_async_connection().await?;
    let hot_store = HotStore::connect(
        &args.redis_url,
        false,
        "",
        args.redis_prefix.clone(),
        8,
        HotTimings {
            idempotency_ttl: Duration::from_secs(24 * 3600),
            tombstone_ttl: Duration::from_secs(24 * 3600),
            commit_deadline: Duration::from_secs(30),
        },
        Duration::from_secs(2),
    )
    .await?;
    let server_info: String = redis::cmd("INFO").arg("server").query_async(&mut redis_conn).await?;
    let redis_version =
        server_info.lines().find_map(|l| l.strip_prefix("redis_version:")).unwrap_or("").trim().to_string();
    let versions = json!({
        "redis": redis_version,
        "postgres": sqlx::query_scalar::<_, String>("SHOW server_version").fetch_one(&pg).await?,
        "postgres_fsync": sqlx::query_scalar::<_, String>("SHOW fsync").fetch_one(&pg).await?,
        "postgres_synchronous_commit": sqlx::query_scalar::<_, String>("SHOW synchronous_commit").fetch_one(&pg).await?,
    });

    // --- seed: tenants, pools, users, the hot user -----------------------
    log(format!("seeding {} tenants × {} users through the API", args.tenants, args.users_per_tenant));
    let t0 = Instant::now();
    let tenant_ids: Vec<String> = (0..args.tenants).map(|t| format!("bench-t{t:03}")).collect();
    let admin_keys = Arc::new(Mutex::new(vec![None::<Key>; args.tenants]));
    let runtime_keys = Arc::new(Mutex::new(vec![None::<Key>; args.tenants]));
    {
        let (admin, ids, ak, rk, run) =
            (admin.clone(), Arc::new(tenant_ids.clone()), admin_keys.clone(), runtime_keys.clone(), run.clone());
        parallel(args.tenants, 8, move |t| {
            let (admin, ids, ak, rk, run) = (admin.clone(), ids.clone(), ak.clone(), rk.clone(), run.clone());
            async move {
                let (a, r) = admin.tenant(&ids[t], &run).await?;
                ak.lock().unwrap()[t] = Some(a);
                rk.lock().unwrap()[t] = Some(r);
                Ok(())
            }
        })
        .await?;
    }
    let tenants_secs = t0.elapsed().as_secs_f64();
    let admin_keys: Vec<Key> = admin_keys.lock().unwrap().iter().map(|k| k.clone().expect("seeded")).collect();
    let keys: Vec<Key> = runtime_keys.lock().unwrap().iter().map(|k| k.clone().expect("seeded")).collect();
    let upt = args.users_per_tenant;
    let n_users = args.tenants * upt;
    let user_secs = {
        let (client, ak) = (admin.client.clone(), Arc::new(admin_keys.clone()));
        parallel(n_users, 32, move |i| {
            let (client, ak) = (client.clone(), ak.clone());
            async move { create_user(&client, &ak[i / upt], &format!("u{:05}", i % upt)).await }
        })
        .await?
        .as_secs_f64()
    };
    create_user(&admin.client, &admin_keys[0], "hot").await?;
    let users: Vec<Target> =
        (0..n_users).map(|i| Target { tenant: i / upt, account: format!("u{:05}", i % upt) }).collect();
    log(format!(
        "seeded {} tenants in {tenants_secs:.1} s, {n_users} users in {user_secs:.1} s ({:.0} CreateAccount/s)",
        args.tenants,
        n_users as f64 / user_secs
    ));
    let fx = Arc::new(Fixture {
        keys,
        tenant_ids: tenant_ids.clone(),
        users,
        hot: Target { tenant: 0, account: "hot".into() },
    });
    let ctx = Ctx {
        cpu: Cpu { server: args.server_pid, redis: args.redis_pid, postgres: args.postgres_pid, tck: args.clk_tck },
        args: args.clone(),
        fx: fx.clone(),
        hot_store,
        run: run.clone(),
        started,
    };

    // --- scenarios ---------------------------------------------------------
    let kinds = [
        Kind::RedisPing,
        Kind::Floor,
        Kind::Ceiling,
        Kind::ReserveSpread,
        Kind::ReserveHot,
        Kind::ReserveCommit,
        Kind::Authorize,
        Kind::GetBalance,
        Kind::ReserveCommitRated,
    ];
    let mut scenarios = Vec::new();
    for kind in kinds {
        if !ctx.wants(kind.name()) {
            continue;
        }
        for &c in &args.concurrency {
            if ctx.over_budget() {
                log(format!("time budget spent: skipping {} c={c}", kind.name()));
                continue;
            }
            if kind.pairs() {
                // Commits of the previous run allocate in the background:
                // start each from an idle ledger.
                wait_allocated(&pg, Duration::from_secs(30)).await?;
            }
            scenarios.push(ctx.measure(kind, fx.clone(), c, &format!("{}-{c}", kind.name())).await?);
        }
    }
    // Ratios to the floor and the ceiling at the same concurrency.
    let rate = |name: &str, c: u64| {
        scenarios
            .iter()
            .find(|s| s["scenario"] == name && s["concurrency"].as_u64() == Some(c))
            .and_then(|s| s["ops_per_sec"].as_f64())
    };
    let rates: Vec<(Option<f64>, Option<f64>)> = scenarios
        .iter()
        .map(|s| {
            let c = s["concurrency"].as_u64().unwrap_or(0);
            (rate("grpc_floor", c), rate("redis_ceiling", c))
        })
        .collect();
    for (s, (floor, ceiling)) in scenarios.iter_mut().zip(rates) {
        let r = s["ops_per_sec"].as_f64().unwrap_or(0.0);
        s["vs_floor"] = floor.map_or(Value::Null, |f| json!(round3(r / f)));
        s["vs_ceiling"] = ceiling.map_or(Value::Null, |f| json!(round3(r / f)));
    }

    // --- footprint: Redis per active hold, per committed pair; PG per event
    let mut footprint = json!({});
    if !args.no_footprint && ctx.wants("footprint") && !ctx.over_budget() {
        footprint = match measure_footprint(&ctx, &pg, &mut redis_conn).await {
            Ok(v) => v,
            Err(e) => {
                log(format!("footprint failed: {e}"));
                json!({ "error": e.to_string() })
            }
        };
    }

    // --- growth: Reserve over 1k, 100k, 1M accounts ------------------------
    let mut growth = Vec::new();
    let scale: Vec<usize> = args.scale.iter().copied().filter(|n| *n > 0).collect();
    if !scale.is_empty()
        && ctx.wants("growth")
        && !ctx.over_budget()
        && let Err(e) = measure_growth(&ctx, &admin, &pg, &mut redis_conn, &scale, &mut growth).await
    {
        log(format!("growth failed: {e}"));
        growth.push(json!({ "error": e.to_string() }));
    }

    let total = started.elapsed().as_secs_f64();
    let results = json!({
        "generated_at": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        "label": args.label,
        "machine": machine(),
        "versions": versions,
        "settings": {
            "seconds_per_run": args.seconds,
            "warmup_seconds": args.warmup,
            "max_ops_per_run": args.max_ops,
            "max_connections": args.connections,
            "tenants": args.tenants,
            "users_per_tenant": args.users_per_tenant,
            "hold_ttl_seconds": HOLD_TTL.as_secs(),
            "reserve_amount": RESERVE_AMOUNT,
            "commit_amount": COMMIT_AMOUNT,
            "rated_model": RATED_MODEL,
            "rated_reserve_usage": {"input_tokens": 4000, "output_tokens": 2000},
            "rated_commit_usage": {"input_tokens": 3000, "output_tokens": 1200},
        },
        "seeding": {
            "tenants": args.tenants,
            "tenant_seconds": round2(tenants_secs),
            "users_via_api": n_users,
            "user_seconds": round2(user_secs),
            "create_account_per_sec": round2(n_users as f64 / user_secs),
        },
        "scenarios": scenarios,
        "footprint": footprint,
        "growth": growth,
        "targets": targets(&scenarios),
        "bench_seconds": round2(total),
    });
    log(format!("done in {total:.0} s"));
    if let Some(dir) = &args.out {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("latest.json"), serde_json::to_string_pretty(&results)? + "\n")?;
        std::fs::write(dir.join("latest.md"), markdown(&results))?;
        log(format!("wrote {}/latest.json and latest.md", dir.display()));
    } else {
        println!("{}", serde_json::to_string_pretty(&results)?);
    }
    Ok(())
}

async fn measure_footprint(
    ctx: &Ctx,
    pg: &sqlx::PgPool,
    redis_conn: &mut redis::aio::MultiplexedConnection,
) -> AnyResult<Value> {
    let args = &ctx.args;
    log("footprint: Redis bytes per active hold");
    // Active holds: Reserve only.
    let clients = Arc::new(Clients::connect(args.addr, args.connections.max(1)).await?);
    let op = |kind: Kind, tag: &str| -> Arc<dyn Op> {
        Arc::new(ScenarioOp {
            kind,
            clients: clients.clone(),
            fx: ctx.fx.clone(),
            hot_store: None,
            tag: format!("{}-{tag}", ctx.run),
        })
    };
    settle().await;
    let m0 = redis_memory(redis_conn).await?;
    let k0 = redis_keys(redis_conn).await?;
    let holds = closed_loop(op(Kind::ReserveSpread, "fh"), 64, 120.0, args.hold_sample).await;
    settle().await;
    let m1 = redis_memory(redis_conn).await?;
    let k1 = redis_keys(redis_conn).await?;
    let per_hold = m0.per(m1, holds.ops);
    log(format!("{} holds: {per_hold} B each, {} keys", holds.ops, k1 - k0));

    // One probe hold with known keys, for the breakdown by key.
    let probe = &ctx.fx.users[0];
    let keys = creditd::store::keys::TenantKeys::new(&args.redis_prefix, &ctx.fx.tenant_ids[probe.tenant]);
    let mut credit = clients.credit[0].clone();
    let (probe_r, probe_c) = (format!("{}-probe-r", ctx.run), format!("{}-probe-c", ctx.run));
    let rid = credit
        .reserve(with_key(
            pb::ReserveRequest {
                account_id: probe.account.clone(),
                cost: Some(pb::reserve_request::Cost::Amount(RESERVE_AMOUNT.into())),
                ttl: ttl(),
                idempotency_key: probe_r.clone(),
                labels: Default::default(),
            },
            &ctx.fx.keys[probe.tenant],
        ))
        .await?
        .into_inner()
        .reservation_id;
    let hold_bytes = redis_memory_usage(redis_conn, &keys.hold(&rid)).await;
    let idem_bytes = redis_memory_usage(redis_conn, &keys.idempotency('r', &probe_r)).await;
    let account_bytes = redis_memory_usage(redis_conn, &keys.account(&probe.account)).await;

    log("footprint: PostgreSQL rows and bytes per committed event");
    wait_allocated(pg, Duration::from_secs(60)).await?;
    settle().await;
    let s0 = pg_sizes(pg).await?;
    let r0 = redis_memory(redis_conn).await?;
    let rk0 = redis_keys(redis_conn).await?;
    let pairs = closed_loop(op(Kind::ReserveCommit, "fe"), 64, 120.0, args.event_sample).await;
    let allocated = wait_allocated(pg, Duration::from_secs(60)).await?;
    settle().await;
    let s1 = pg_sizes(pg).await?;
    let r1 = redis_memory(redis_conn).await?;
    let rk1 = redis_keys(redis_conn).await?;
    credit
        .commit(with_key(
            pb::CommitRequest {
                reservation_id: rid.clone(),
                cost: Some(pb::commit_request::Cost::Amount(COMMIT_AMOUNT.into())),
                idempotency_key: probe_c.clone(),
                labels: Default::default(),
            },
            &ctx.fx.keys[probe.tenant],
        ))
        .await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Average stored row (tuple) of the newest rows, beside the size deltas
    // (which move by whole pages and with vacuum's reuse of dead rows).
    let (event_tuple, ledger_tuple): (Option<f64>, Option<f64>) = sqlx::query_as(
        "SELECT (SELECT avg(pg_column_size(e.*))::float8 FROM \
                   (SELECT * FROM usage_events ORDER BY recorded_at DESC LIMIT 1000) e), \
                (SELECT avg(pg_column_size(l.*))::float8 FROM \
                   (SELECT * FROM ledger ORDER BY entry_id DESC LIMIT 1000) l)",
    )
    .fetch_one(pg)
    .await?;
    let tombstone_bytes = redis_memory_usage(redis_conn, &keys.hold(&rid)).await;
    let commit_idem_bytes = redis_memory_usage(redis_conn, &keys.idempotency('c', &probe_c)).await;
    let n = pairs.ops.max(1) as f64;
    let fp = json!({
        "active_holds": holds.ops,
        "hold_errors": holds.errors,
        "redis_bytes_per_active_hold": per_hold,
        "redis_keys_per_active_hold": round2((k1 - k0) as f64 / holds.ops.max(1) as f64),
        "redis_sample_hold_hash_bytes": hold_bytes,
        "redis_sample_reserve_idempotency_bytes": idem_bytes,
        "redis_sample_user_account_bytes": account_bytes,
        "committed_pairs": pairs.ops,
        "commit_errors": pairs.errors,
        "allocated": allocated,
        "redis_bytes_per_committed_pair": r0.per(r1, pairs.ops),
        "redis_keys_per_committed_pair": round2((rk1 - rk0) as f64 / n),
        "redis_sample_tombstone_bytes": tombstone_bytes,
        "redis_sample_commit_idempotency_bytes": commit_idem_bytes,
        "pg_usage_event_rows_per_commit": round2((s1.events_rows - s0.events_rows) as f64 / n),
        "pg_ledger_rows_per_commit": round2((s1.ledger_rows - s0.ledger_rows) as f64 / n),
        "pg_usage_events_bytes_per_commit": ((s1.events_bytes - s0.events_bytes) as f64 / n).round(),
        "pg_ledger_bytes_per_commit": ((s1.ledger_bytes - s0.ledger_bytes) as f64 / n).round(),
        "pg_wal_bytes_per_commit": ((s1.wal - s0.wal) as f64 / n).round(),
        "pg_usage_event_tuple_bytes": event_tuple.map(f64::round),
        "pg_ledger_tuple_bytes": ledger_tuple.map(f64::round),
    });
    log(format!("footprint: {fp}"));
    Ok(fp)
}

async fn measure_growth(
    ctx: &Ctx,
    admin: &Arc<Admin>,
    pg: &sqlx::PgPool,
    redis_conn: &mut redis::aio::MultiplexedConnection,
    scale: &[usize],
    out: &mut Vec<Value>,
) -> AnyResult<()> {
    let args = &ctx.args;
    let tenant = "bench-scale".to_string();
    let (scale_admin, scale_runtime) = admin.tenant(&tenant, &ctx.run).await?;
    let mut have = 0usize;
    for &n in scale {
        if ctx.over_budget() {
            log(format!("time budget spent: skipping growth to {n} accounts"));
            break;
        }
        settle().await;
        let m0 = redis_memory(redis_conn).await?;
        let a0: i64 = sqlx::query_scalar("SELECT pg_total_relation_size('accounts')").fetch_one(pg).await?;
        let (how, took) = if n <= args.scale_api_max {
            let (client, key) = (admin.client.clone(), scale_admin.clone());
            let from = have;
            let took = parallel(n.saturating_sub(have), 32, move |i| {
                let (client, key) = (client.clone(), key.clone());
                async move { create_user(&client, &key, &format!("s{:07}", from + i)).await }
            })
            .await?;
            ("api", took)
        } else {
            ("direct", seed_direct(pg, &args.redis_url, &args.redis_prefix, &tenant, have, n).await?)
        };
        let added = n.saturating_sub(have);
        settle().await;
        let m1 = redis_memory(redis_conn).await?;
        let a1: i64 = sqlx::query_scalar("SELECT pg_total_relation_size('accounts')").fetch_one(pg).await?;
        log(format!("growth: {added} accounts added ({how}) in {:.1} s; now {n}", took.as_secs_f64()));
        have = n.max(have);
        // The last one written must answer through the API like any other.
        let check = CreditServiceClient::new(Endpoint::from_shared(format!("http://{}", args.addr))?.connect().await?)
            .get_balance(with_key(pb::GetBalanceRequest { account_id: format!("s{:07}", have - 1) }, &scale_runtime))
            .await?
            .into_inner();
        if check.levels.len() != 2 {
            return Err(format!("seeded account s{:07} has {} levels", have - 1, check.levels.len()).into());
        }
        let fx = Arc::new(Fixture {
            keys: vec![scale_runtime.clone()],
            tenant_ids: vec![tenant.clone()],
            users: (0..have).map(|i| Target { tenant: 0, account: format!("s{i:07}") }).collect(),
            hot: Target { tenant: 0, account: "s0000000".into() },
        });
        let mut v = ctx.measure(Kind::ReserveSpread, fx, args.scale_concurrency, &format!("g{n}")).await?;
        v["accounts"] = json!(n);
        v["seeded_via"] = json!(how);
        v["seed_seconds"] = json!(round2(took.as_secs_f64()));
        v["accounts_added"] = json!(added);
        v["redis_bytes_per_account"] = if added > 0 { m0.per(m1, added as u64) } else { Value::Null };
        v["pg_accounts_bytes_per_account"] =
            json!(if added > 0 { ((a1 - a0) as f64 / added as f64).round() } else { 0.0 });
        out.push(v);
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Targets and the report

fn find<'a>(scenarios: &'a [Value], name: &str, c: u64) -> Option<&'a Value> {
    scenarios.iter().find(|s| s["scenario"] == name && s["concurrency"].as_u64() == Some(c))
}

fn targets(scenarios: &[Value]) -> Vec<Value> {
    let mut out = Vec::new();
    let mut add = |target: &str, measured: Option<f64>, limit: Option<f64>, at_most: bool, unit: &str| {
        let met = match (measured, limit) {
            (Some(m), Some(l)) => Some(if at_most { m <= l } else { m >= l }),
            _ => None,
        };
        out.push(json!({
            "target": target,
            "measured": measured.map(round3),
            "limit": limit.map(round3),
            "unit": unit,
            "met": met,
        }));
    };
    let r1 = find(scenarios, "reserve_spread", 1);
    let r64 = find(scenarios, "reserve_spread", 64);
    let f64_ = find(scenarios, "grpc_floor", 64);
    let rc64 = find(scenarios, "reserve_commit", 64);
    let get = |v: Option<&Value>, path: &[&str]| {
        let mut cur = v?;
        for p in path {
            cur = cur.get(*p)?;
        }
        cur.as_f64()
    };
    let floor64 = get(f64_, &["ops_per_sec"]);
    add("Reserve c=1 p50 ≤ 0.40 ms", get(r1, &["latency_ms", "p50"]), Some(0.40), true, "ms");
    add("Reserve c=1 p99 ≤ 1 ms", get(r1, &["latency_ms", "p99"]), Some(1.0), true, "ms");
    add("Reserve c=64 ≥ 0.6 × floor req/s", get(r64, &["ops_per_sec"]), floor64.map(|f| 0.6 * f), false, "req/s");
    add("Reserve c=64 p99 ≤ 10 ms", get(r64, &["latency_ms", "p99"]), Some(10.0), true, "ms");
    add("creditd CPU per Reserve ≤ 40 µs (c=64)", get(r64, &["cpu_us_per_op", "creditd"]), Some(40.0), true, "µs");
    add(
        "Reserve+Commit c=64 ≥ 0.4 × floor/2 pairs/s",
        get(rc64, &["ops_per_sec"]),
        floor64.map(|f| 0.4 * f / 2.0),
        false,
        "pairs/s",
    );
    out
}

fn num(v: &Value, digits: usize) -> String {
    match v.as_f64() {
        Some(x) => format!("{x:.digits$}"),
        None => "–".into(),
    }
}

/// Redis bytes per unit: data + key tables (the INFO used_memory delta).
fn mem_cell(v: &Value) -> String {
    if v.is_null() {
        return "–".into();
    }
    format!("{} + {} ({})", num(&v["dataset"], 0), num(&v["key_tables"], 0), num(&v["used_memory"], 0))
}

fn markdown(r: &Value) -> String {
    let m = &r["machine"];
    let mut s = String::new();
    s.push_str("# creditd benchmark: latest results\n\n");
    s.push_str(&format!(
        "Generated {} by `scripts/bench.sh`{}. Machine: {} × {}, {} GiB, Linux {}. Redis {}, PostgreSQL {} \
         (fsync {}, synchronous_commit {}). Client, creditd, Redis and PostgreSQL share the machine.\n\n",
        r["generated_at"].as_str().unwrap_or(""),
        match r["label"].as_str() {
            Some(l) if !l.is_empty() => format!(" ({l})"),
            _ => String::new(),
        },
        m["nproc"],
        m["cpu_model"].as_str().unwrap_or(""),
        m["memory_gib"],
        m["kernel"].as_str().unwrap_or(""),
        r["versions"]["redis"].as_str().unwrap_or(""),
        r["versions"]["postgres"].as_str().unwrap_or(""),
        r["versions"]["postgres_fsync"].as_str().unwrap_or(""),
        r["versions"]["postgres_synchronous_commit"].as_str().unwrap_or(""),
    ));
    let st = &r["settings"];
    s.push_str(&format!(
        "Each run: {} s measured after {} s of warm-up, closed loop, at most {} operations; up to {} HTTP/2 \
         connections. Spread scenarios pick uniformly among {} tenants × {} users (each user draws on its \
         organization's pool). Holds live {} s, so none expires during the run.\n\n",
        st["seconds_per_run"],
        st["warmup_seconds"],
        st["max_ops_per_run"],
        st["max_connections"],
        st["tenants"],
        st["users_per_tenant"],
        st["hold_ttl_seconds"],
    ));
    s.push_str(
        "| scenario | conc. | ops/s | p50 ms | p99 ms | p99.9 ms | creditd CPU µs/op | Redis µs/op | \
         PostgreSQL µs/op | client µs/op | × floor | × ceiling | other load (cores) | errors |\n",
    );
    s.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for sc in r["scenarios"].as_array().into_iter().flatten() {
        let unit = if sc["unit"] == "pair" { " (pairs)" } else { "" };
        s.push_str(&format!(
            "| {}{} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            sc["title"].as_str().unwrap_or(""),
            unit,
            sc["concurrency"],
            num(&sc["ops_per_sec"], 0),
            num(&sc["latency_ms"]["p50"], 3),
            num(&sc["latency_ms"]["p99"], 3),
            num(&sc["latency_ms"]["p99_9"], 3),
            num(&sc["cpu_us_per_op"]["creditd"], 1),
            num(&sc["cpu_us_per_op"]["redis"], 1),
            num(&sc["cpu_us_per_op"]["postgres"], 1),
            num(&sc["cpu_us_per_op"]["client"], 1),
            num(&sc["vs_floor"], 2),
            num(&sc["vs_ceiling"], 2),
            num(&sc["other_load_cores"], 2),
            sc["errors"],
        ));
    }
    let pairs: Vec<&Value> =
        r["scenarios"].as_array().into_iter().flatten().filter(|sc| sc["unit"] == "pair").collect();
    if !pairs.is_empty() {
        s.push_str("\nInside the pairs (each call on its own):\n\n");
        s.push_str("| scenario | conc. | Reserve p50 / p99 ms | Commit p50 / p99 ms |\n|---|---:|---:|---:|\n");
        for sc in pairs {
            s.push_str(&format!(
                "| {} | {} | {} / {} | {} / {} |\n",
                sc["title"].as_str().unwrap_or(""),
                sc["concurrency"],
                num(&sc["reserve_latency_ms"]["p50"], 3),
                num(&sc["reserve_latency_ms"]["p99"], 3),
                num(&sc["commit_latency_ms"]["p50"], 3),
                num(&sc["commit_latency_ms"]["p99"], 3),
            ));
        }
    }
    if let Some(growth) = r["growth"].as_array().filter(|g| !g.is_empty()) {
        s.push_str("\n## How cost grows with the number of accounts\n\n");
        s.push_str("Reserve spread uniformly over all users of one tenant (one pool).\n\n");
        s.push_str("| accounts | seeded | conc. | Reserve/s | p50 ms | p99 ms | creditd CPU µs/op | Redis µs/op | Redis B/account: data + key tables (used_memory) | PostgreSQL B/account | other load (cores) |\n");
        s.push_str("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
        for g in growth {
            if let Some(e) = g["error"].as_str() {
                s.push_str(&format!("\nGrowth stopped: {e}\n"));
                continue;
            }
            s.push_str(&format!(
                "| {} | {} ({} in {} s) | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                g["accounts"],
                g["seeded_via"].as_str().unwrap_or(""),
                g["accounts_added"],
                num(&g["seed_seconds"], 1),
                g["concurrency"],
                num(&g["ops_per_sec"], 0),
                num(&g["latency_ms"]["p50"], 3),
                num(&g["latency_ms"]["p99"], 3),
                num(&g["cpu_us_per_op"]["creditd"], 1),
                num(&g["cpu_us_per_op"]["redis"], 1),
                mem_cell(&g["redis_bytes_per_account"]),
                num(&g["pg_accounts_bytes_per_account"], 0),
                num(&g["other_load_cores"], 2),
            ));
        }
    }
    let fp = &r["footprint"];
    if fp.get("active_holds").is_some() {
        s.push_str("\n## Footprint\n\n| what | value |\n|---|---:|\n");
        let rows = [
            ("Redis bytes per active hold: data + key tables (used_memory)", "redis_bytes_per_active_hold"),
            ("Redis keys per active hold", "redis_keys_per_active_hold"),
            ("sample hold hash (MEMORY USAGE)", "redis_sample_hold_hash_bytes"),
            ("sample Reserve idempotency record (MEMORY USAGE)", "redis_sample_reserve_idempotency_bytes"),
            ("sample user account hash (MEMORY USAGE)", "redis_sample_user_account_bytes"),
            (
                "Redis bytes kept 24 h per committed pair (tombstone, two idempotency records)",
                "redis_bytes_per_committed_pair",
            ),
            ("Redis keys kept per committed pair", "redis_keys_per_committed_pair"),
            ("sample hold tombstone after Commit (MEMORY USAGE)", "redis_sample_tombstone_bytes"),
            ("sample Commit idempotency record (MEMORY USAGE)", "redis_sample_commit_idempotency_bytes"),
            ("PostgreSQL usage_events rows per commit", "pg_usage_event_rows_per_commit"),
            ("PostgreSQL ledger rows per commit", "pg_ledger_rows_per_commit"),
            ("PostgreSQL usage_events bytes per commit (table + indexes)", "pg_usage_events_bytes_per_commit"),
            ("PostgreSQL ledger bytes per commit (table + indexes)", "pg_ledger_bytes_per_commit"),
            ("PostgreSQL WAL bytes per commit", "pg_wal_bytes_per_commit"),
            ("PostgreSQL usage_events row, stored (average tuple)", "pg_usage_event_tuple_bytes"),
            ("PostgreSQL ledger row, stored (average tuple)", "pg_ledger_tuple_bytes"),
        ];
        for (label, key) in rows {
            let cell = if fp[key].is_object() {
                mem_cell(&fp[key])
            } else {
                num(&fp[key], if key.contains("rows") || key.contains("keys") { 2 } else { 0 })
            };
            s.push_str(&format!("| {label} | {cell} |\n"));
        }
        s.push_str(&format!(
            "\nMeasured over {} holds and {} committed pairs. Redis bytes read \"data + key tables (used_memory)\": \
             MEMORY STATS dataset.bytes and the db's key-table overhead, then the INFO used_memory delta, which \
             also holds any key-table resize (Redis doubles a table as it grows). PostgreSQL: \
             pg_total_relation_size and WAL position deltas, after the ledger job allocated every event.\n",
            fp["active_holds"], fp["committed_pairs"]
        ));
    }
    s.push_str("\n## Targets\n\n| target | measured | limit | met |\n|---|---:|---:|---|\n");
    for t in r["targets"].as_array().into_iter().flatten() {
        s.push_str(&format!(
            "| {} | {} {} | {} | {} |\n",
            t["target"].as_str().unwrap_or(""),
            num(&t["measured"], 3),
            t["unit"].as_str().unwrap_or(""),
            num(&t["limit"], 3),
            match t["met"].as_bool() {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "–",
            }
        ));
    }
    let sd = &r["seeding"];
    s.push_str(&format!(
        "\nSeeding through the API: {} tenants in {} s; {} users in {} s ({} CreateAccount/s at 32 in flight). \
         Whole benchmark: {} s.\n",
        sd["tenants"],
        num(&sd["tenant_seconds"], 1),
        sd["users_via_api"],
        num(&sd["user_seconds"], 1),
        num(&sd["create_account_per_sec"], 0),
        num(&r["bench_seconds"], 0),
    ));
    s
}
