//! `creditd-soak`: mixed traffic over several creditd replicas while faults
//! are injected from outside, then an audit of the invariants.
//!
//! `creditd-soak run` seeds tenants, pooled accounts and grants through the
//! API (with an operator key), then runs closed-loop workers for a bounded
//! time and count: Reserve → Commit (plain amounts and token usage rated by
//! the price catalog), Reserve → Release, holds left to expire, Reserve →
//! Extend → Commit, Charge, GetBalance and Authorize, with admin grants
//! during the run and occasional replays of an idempotency key. Every call
//! goes to a replica picked at random; UNAVAILABLE, DEADLINE_EXCEEDED and
//! transport failures are retried with the same idempotency key (bounded
//! backoff, another replica). Every acknowledged Commit and Charge (event
//! id, amount), every granted reservation and its fate, every grant, and
//! every replay's answer are written to a records file.
//!
//! `creditd-soak audit` waits until the replicas serve and every hold has
//! expired or settled, then checks the records against PostgreSQL and
//! Redis: acknowledged usage durable exactly once with its amount, no usage
//! nobody was told about, every hold resolved, Σ grants − Σ usage = the
//! ledger balance = the Redis balance of every account, CheckBalances on
//! every replica, replays answered alike. It writes latest.json and
//! latest.md and exits non-zero when an invariant fails.
//!
//! `scripts/soak.sh` builds, starts PostgreSQL, Redis and two replicas on
//! loopback ports, injects the faults and runs both steps. Targets are
//! loopback only.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    future::Future,
    net::SocketAddr,
    path::PathBuf,
    str::FromStr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use clap::{Args, Parser, Subcommand};
use creditd::pb::{self, admin_service_client::AdminServiceClient, credit_service_client::CreditServiceClient};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tonic::{
    Code, Request, Response, Status,
    metadata::{Ascii, MetadataValue},
    transport::{Channel, Endpoint},
};
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};
use tonic_types::StatusExt;

type Key = MetadataValue<Ascii>;
type AnyResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

#[derive(Parser, Debug)]
#[command(name = "creditd-soak", about = "Soak traffic and invariant audit for creditd replicas (loopback only)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Seed, then drive mixed traffic; writes the records file.
    Run(RunArgs),
    /// Wait for the system to settle, check the invariants, write the report.
    Audit(AuditArgs),
}

#[derive(Args, Debug, Clone)]
struct RunArgs {
    /// The replicas' gRPC addresses (loopback), comma separated.
    #[arg(long, value_delimiter = ',', required = true)]
    addr: Vec<SocketAddr>,
    /// An operator API key (`creditd keys create --role operator`).
    #[arg(long, env = "CREDITD_SOAK_OPERATOR_KEY", hide_env_values = true)]
    operator_key: String,
    /// Seconds of traffic after seeding.
    #[arg(long, default_value_t = 300.0)]
    seconds: f64,
    /// Most scenarios started in the whole run.
    #[arg(long, default_value_t = 2_000_000)]
    max_ops: u64,
    /// Closed-loop traffic workers.
    #[arg(long, default_value_t = 24)]
    workers: usize,
    /// Seed of every random choice of the traffic.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Tenants seeded.
    #[arg(long, default_value_t = 3)]
    tenants: usize,
    /// Users per tenant (split over two teams drawing on the organization).
    #[arg(long, default_value_t = 16)]
    users: usize,
    /// How long one call is retried (same key) before it is abandoned.
    #[arg(long, default_value_t = 60.0)]
    retry_for: f64,
    /// Per-attempt deadline of one call.
    #[arg(long, default_value_t = 8.0)]
    call_timeout: f64,
    /// The records file (JSON).
    #[arg(long)]
    records: PathBuf,
    /// Tenant ids, one a line (written after seeding).
    #[arg(long)]
    tenants_file: Option<PathBuf>,
    /// Written once seeding is done and traffic starts: the Unix time (s)
    /// at which traffic will stop.
    #[arg(long)]
    ready_file: Option<PathBuf>,
}

#[derive(Args, Debug, Clone)]
struct AuditArgs {
    /// The replicas' gRPC addresses (loopback), comma separated.
    #[arg(long, value_delimiter = ',', required = true)]
    addr: Vec<SocketAddr>,
    #[arg(long, env = "DATABASE_URL")]
    database_url: String,
    #[arg(long, env = "REDIS_URL")]
    redis_url: String,
    /// creditd's `redis.key_prefix`.
    #[arg(long, default_value = "creditd:")]
    redis_prefix: String,
    /// The records file written by `run`.
    #[arg(long)]
    records: PathBuf,
    /// The fault log: one line per event, `<RFC 3339 time>\t<kind>\t<detail>`.
    #[arg(long)]
    faults: Option<PathBuf>,
    /// Most seconds to wait for holds to expire and commits to settle.
    #[arg(long, default_value_t = 180.0)]
    settle_timeout: f64,
    /// Directory for latest.json and latest.md.
    #[arg(long)]
    out: PathBuf,
    /// Free text recorded with the results (e.g. the commit and profile).
    #[arg(long, default_value = "")]
    label: String,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run(args) => run(args).await.map(|_| true),
            Command::Audit(args) => audit(args).await,
        }
    });
    match result {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::from(3),
        Err(e) => {
            eprintln!("creditd-soak: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn log(msg: impl AsRef<str>) {
    eprintln!("[soak {}] {}", chrono::Utc::now().format("%H:%M:%S%.3f"), msg.as_ref());
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

// ---------------------------------------------------------------------------
// Loopback only

fn is_loopback_host(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    h == "localhost" || h.parse::<std::net::IpAddr>().map(|ip| ip.is_loopback()).unwrap_or(false)
}

fn require_loopback(addrs: &[SocketAddr], urls: &[(&str, &str)]) -> AnyResult<()> {
    for a in addrs {
        if !a.ip().is_loopback() {
            return Err(format!("--addr {a} is not a loopback address").into());
        }
    }
    for (what, raw) in urls {
        let url = url::Url::parse(raw).map_err(|e| format!("{what}: {e}"))?;
        let host = url.host_str().unwrap_or("");
        if !is_loopback_host(host) {
            return Err(format!("{what} must name a loopback host (got {host:?})").into());
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Randomness (seeded; no dependency)

#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x5eed_5eed_5eed_5eed)
    }

    /// splitmix64.
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut x = self.0;
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^ (x >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }

    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

fn micros(m: u64) -> String {
    Decimal::new(m as i64, 6).normalize().to_string()
}

fn dec(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap_or_else(|_| Decimal::new(-999_999_999, 0))
}

// ---------------------------------------------------------------------------
// Records

#[derive(Serialize, Deserialize, Clone, Debug)]
struct TenantFixture {
    id: String,
    /// Kept in the records file (a throwaway directory) for the audit's
    /// CheckBalances; never written to the results.
    admin_key: String,
    runtime_key: String,
    accounts: Vec<String>,
    /// Accounts drawing on the pool (users), spending only their own
    /// grants (solos), and with a per-period cap.
    users: Vec<String>,
    solos: Vec<String>,
    capped: Vec<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum HoldFate {
    /// The client saw the commit acknowledged.
    Committed {
        key: String,
        event_id: String,
        amount: String,
    },
    /// The commit ended in a definitive error (the hold expired meanwhile,
    /// or Redis lost it): nothing may be recorded.
    CommitFailed {
        key: String,
        code: String,
        reason: String,
    },
    /// The commit was never answered: its outcome is unknown.
    CommitAbandoned {
        key: String,
    },
    Released,
    ReleaseFailed {
        code: String,
        reason: String,
    },
    ReleaseAbandoned,
    /// Left to expire on purpose.
    Expire,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
struct HoldRec {
    tenant: usize,
    rid: String,
    account: String,
    /// Unix ms when the reservation was acknowledged.
    at: i64,
    fate: HoldFate,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
struct UsageRec {
    tenant: usize,
    account: String,
    key: String,
    at: i64,
    /// Some when acknowledged.
    event_id: Option<String>,
    amount: Option<String>,
    /// "acked", "failed CODE REASON", "abandoned".
    outcome: String,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
struct GrantRec {
    tenant: usize,
    account: String,
    key: String,
    amount: String,
    grant_id: Option<String>,
    outcome: String,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
struct ReplayRec {
    rpc: String,
    tenant: usize,
    key: String,
    /// When the first answer and the replay's answer arrived (Unix ms).
    first_at: i64,
    replay_at: i64,
    same: bool,
    detail: String,
}

#[derive(Serialize, Deserialize, Default, Clone, Debug)]
struct Stats {
    /// Scenarios completed, by name.
    ops: BTreeMap<String, u64>,
    /// OK answers, by RPC.
    calls: BTreeMap<String, u64>,
    /// Error answers (every attempt), by "RPC CODE REASON".
    errors: BTreeMap<String, u64>,
    /// Denials (normal answers), by "RPC REASON".
    denials: BTreeMap<String, u64>,
    /// Calls given up after --retry-for, by RPC.
    abandoned: BTreeMap<String, u64>,
    /// Attempts beyond the first.
    retries: u64,
    /// Calls that needed at least one retry and then succeeded.
    recovered: u64,
    /// Latency of OK answers, including retries (µs), by RPC.
    #[serde(skip)]
    latencies: BTreeMap<String, Vec<u64>>,
    latency_ms: BTreeMap<String, Value>,
}

impl Stats {
    fn merge(&mut self, o: Stats) {
        for (k, v) in o.ops {
            *self.ops.entry(k).or_default() += v;
        }
        for (k, v) in o.calls {
            *self.calls.entry(k).or_default() += v;
        }
        for (k, v) in o.errors {
            *self.errors.entry(k).or_default() += v;
        }
        for (k, v) in o.denials {
            *self.denials.entry(k).or_default() += v;
        }
        for (k, v) in o.abandoned {
            *self.abandoned.entry(k).or_default() += v;
        }
        for (k, v) in o.latencies {
            self.latencies.entry(k).or_default().extend(v);
        }
        self.retries += o.retries;
        self.recovered += o.recovered;
    }

    fn summarize_latency(&mut self) {
        for (k, v) in &mut self.latencies {
            v.sort_unstable();
            let p = |q: f64| -> f64 {
                if v.is_empty() {
                    return 0.0;
                }
                let i = ((q / 100.0) * (v.len() - 1) as f64).round() as usize;
                (v[i] as f64 / 1000.0 * 100.0).round() / 100.0
            };
            self.latency_ms.insert(k.clone(), json!({"n": v.len(), "p50": p(50.0), "p99": p(99.0), "max": p(100.0)}));
        }
    }
}

#[derive(Serialize, Deserialize, Default, Clone, Debug)]
struct Records {
    run_id: String,
    seed: u64,
    addrs: Vec<String>,
    workers: usize,
    started_at: String,
    traffic_started_at: String,
    ended_at: String,
    traffic_seconds: f64,
    tenants: Vec<TenantFixture>,
    stats: Stats,
    holds: Vec<HoldRec>,
    charges: Vec<UsageRec>,
    grants: Vec<GrantRec>,
    replays: Vec<ReplayRec>,
    /// Reserves never answered (a hold may exist; it expires).
    reserves_abandoned: u64,
}

// ---------------------------------------------------------------------------
// The client: a replica per attempt, retries with the same request

enum Outcome<T> {
    Ok(T),
    /// A definitive error answer.
    Failed(Status),
    /// Retried until --retry-for (or the hard stop) without an answer.
    Abandoned(Status),
}

fn reason_of(s: &Status) -> String {
    s.get_error_details().error_info().map(|i| i.reason.clone()).unwrap_or_default()
}

fn retryable(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Unknown
            | Code::Cancelled
            | Code::Aborted
            | Code::Internal
            | Code::ResourceExhausted
    )
}

fn bearer(key: &str) -> AnyResult<Key> {
    Ok(format!("Bearer {key}").parse::<Key>()?)
}

fn endpoint(addr: SocketAddr, timeout: Duration) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .expect("a socket address is a valid URI")
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(1))
        .timeout(timeout)
        .connect_lazy()
}

struct Client {
    addrs: Vec<SocketAddr>,
    channels: Vec<Channel>,
    call_timeout: Duration,
    retry_for: Duration,
    /// After it, nothing is retried any more.
    hard_stop: Arc<AtomicBool>,
    rng: Rng,
    stats: Stats,
}

impl Client {
    fn new(
        addrs: &[SocketAddr],
        call_timeout: Duration,
        retry_for: Duration,
        hard_stop: Arc<AtomicBool>,
        rng: Rng,
    ) -> Client {
        Client {
            addrs: addrs.to_vec(),
            channels: addrs.iter().map(|a| endpoint(*a, call_timeout)).collect(),
            call_timeout,
            retry_for,
            hard_stop,
            rng,
            stats: Stats::default(),
        }
    }

    /// Sends `req` with `key` until it is answered; retries keep the request
    /// (and so its idempotency key) and move to another replica.
    async fn call<Req, Resp, F, Fut>(&mut self, rpc: &str, key: &Key, req: &Req, mut f: F) -> Outcome<Resp>
    where
        Req: Clone,
        F: FnMut(Channel, Request<Req>) -> Fut,
        Fut: Future<Output = Result<Response<Resp>, Status>>,
    {
        let t0 = Instant::now();
        let mut replica = self.rng.below(self.addrs.len() as u64) as usize;
        let mut attempt = 0u32;
        loop {
            let mut r = Request::new(req.clone());
            r.metadata_mut().insert("authorization", key.clone());
            let result = f(self.channels[replica].clone(), r).await;
            match result {
                Ok(resp) => {
                    *self.stats.calls.entry(rpc.to_string()).or_default() += 1;
                    self.stats.latencies.entry(rpc.to_string()).or_default().push(t0.elapsed().as_micros() as u64);
                    if attempt > 0 {
                        self.stats.recovered += 1;
                    }
                    return Outcome::Ok(resp.into_inner());
                }
                Err(status) => {
                    let label = format!("{rpc} {:?} {}", status.code(), reason_of(&status));
                    *self.stats.errors.entry(label.trim_end().to_string()).or_default() += 1;
                    if !retryable(status.code()) {
                        return Outcome::Failed(status);
                    }
                    if t0.elapsed() >= self.retry_for || self.hard_stop.load(Ordering::Relaxed) {
                        *self.stats.abandoned.entry(rpc.to_string()).or_default() += 1;
                        return Outcome::Abandoned(status);
                    }
                    // A fresh connection: the replica may have restarted.
                    self.channels[replica] = endpoint(self.addrs[replica], self.call_timeout);
                    attempt += 1;
                    self.stats.retries += 1;
                    let backoff = 50u64.saturating_mul(1 << attempt.min(5)).min(1000);
                    tokio::time::sleep(Duration::from_millis(backoff / 2 + self.rng.below(backoff / 2 + 1))).await;
                    replica = (replica + 1) % self.addrs.len();
                }
            }
        }
    }
}

macro_rules! credit {
    ($method:ident) => {
        |ch: Channel, r| async move { CreditServiceClient::new(ch).$method(r).await }
    };
}

macro_rules! admin {
    ($method:ident) => {
        |ch: Channel, r| async move { AdminServiceClient::new(ch).$method(r).await }
    };
}

// ---------------------------------------------------------------------------
// run

const MODELS: [&str; 4] = ["example-fast-1", "example-fast-mini", "example-standard-1", "example-advanced-1"];
/// Normal holds live long enough to outlast a fault; "expire" holds do not.
const HOLD_TTL_SECS: i64 = 30;

struct Shared {
    tenants: Vec<TenantFixture>,
    keys: Vec<(Key, Key)>,
    run_id: String,
    deadline: Instant,
    max_ops: u64,
    started: AtomicU64,
}

struct Worker {
    id: usize,
    seq: u64,
    client: Client,
    shared: Arc<Shared>,
    holds: Vec<HoldRec>,
    charges: Vec<UsageRec>,
    grants: Vec<GrantRec>,
    replays: Vec<ReplayRec>,
    reserves_abandoned: u64,
}

fn ttl(secs: i64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration { seconds: secs, nanos: 0 })
}

fn token_usage(rng: &mut Rng, model: &str, scale: u64, reasoning: bool) -> pb::Usage {
    let mut items = vec![
        pb::UsageItem {
            meter: "input_tokens".into(),
            model: model.into(),
            quantity: rng.range(100, 8000 * scale).to_string(),
        },
        pb::UsageItem {
            meter: "output_tokens".into(),
            model: model.into(),
            quantity: rng.range(10, 2000 * scale).to_string(),
        },
    ];
    if reasoning {
        items.push(pb::UsageItem {
            meter: "reasoning_tokens".into(),
            model: model.into(),
            quantity: rng.range(1, 1000).to_string(),
        });
    }
    pb::Usage { items }
}

fn status_pair(s: &Status) -> (String, String) {
    (format!("{:?}", s.code()), reason_of(s))
}

impl Worker {
    fn key(&mut self, what: &str) -> String {
        self.seq += 1;
        format!("{}-w{}-{}-{what}", self.shared.run_id, self.id, self.seq)
    }

    fn op_done(&mut self, name: &str) {
        *self.client.stats.ops.entry(name.to_string()).or_default() += 1;
    }

    fn subject(&mut self) -> (usize, String) {
        let t = self.client.rng.below(self.shared.tenants.len() as u64) as usize;
        let fx = &self.shared.tenants[t];
        let roll = self.client.rng.below(100);
        let list = if roll < 80 {
            &fx.users
        } else if roll < 90 {
            &fx.solos
        } else {
            &fx.capped
        };
        let account = list[self.client.rng.below(list.len() as u64) as usize].clone();
        (t, account)
    }

    async fn reserve(&mut self, t: usize, req: pb::ReserveRequest) -> Option<(pb::ReserveResponse, i64)> {
        let key = self.shared.keys[t].1.clone();
        match self.client.call("Reserve", &key, &req, credit!(reserve)).await {
            Outcome::Ok(r) => {
                if !r.granted {
                    let reason = r.denial.as_ref().map(|d| d.reason().as_str_name()).unwrap_or("NONE");
                    *self.client.stats.denials.entry(format!("Reserve {reason}")).or_default() += 1;
                    return None;
                }
                let at = now_ms();
                if self.client.rng.chance(3) {
                    // A replay: the same hold, marked replayed.
                    if let Outcome::Ok(again) = self.client.call("Reserve", &key, &req, credit!(reserve)).await {
                        let same = again.reservation_id == r.reservation_id && again.replayed;
                        self.replays.push(ReplayRec {
                            rpc: "Reserve".into(),
                            tenant: t,
                            key: req.idempotency_key.clone(),
                            first_at: at,
                            replay_at: now_ms(),
                            same,
                            detail: format!(
                                "first {} replay {} replayed={} granted={}",
                                r.reservation_id, again.reservation_id, again.replayed, again.granted
                            ),
                        });
                        if !same && again.granted && again.reservation_id != r.reservation_id {
                            // Redis lost the key in between: a second hold
                            // exists; it is left to expire.
                            self.holds.push(HoldRec {
                                tenant: t,
                                rid: again.reservation_id.clone(),
                                account: req.account_id.clone(),
                                at: now_ms(),
                                fate: HoldFate::Expire,
                            });
                        }
                    }
                }
                Some((r, at))
            }
            Outcome::Failed(s) => {
                log_unexpected(&s, "Reserve");
                None
            }
            Outcome::Abandoned(_) => {
                self.reserves_abandoned += 1;
                None
            }
        }
    }

    async fn commit(&mut self, t: usize, account: &str, rid: String, at: i64, cost: pb::commit_request::Cost) {
        let key_s = self.key("c");
        let req = pb::CommitRequest {
            reservation_id: rid.clone(),
            cost: Some(cost.clone()),
            idempotency_key: key_s.clone(),
            labels: Default::default(),
        };
        let key = self.shared.keys[t].1.clone();
        let fate = match self.client.call("Commit", &key, &req, credit!(commit)).await {
            Outcome::Ok(r) => {
                let acked_at = now_ms();
                if self.client.rng.chance(4) {
                    let again = self.client.call("Commit", &key, &req, credit!(commit)).await;
                    let (same, detail) = match &again {
                        Outcome::Ok(a) => (
                            a.event_id == r.event_id && dec(&a.amount) == dec(&r.amount) && a.replayed,
                            format!(
                                "first {} {} replay {} {} replayed={}",
                                r.event_id, r.amount, a.event_id, a.amount, a.replayed
                            ),
                        ),
                        Outcome::Failed(s) | Outcome::Abandoned(s) => (false, format!("replay failed: {s:?}")),
                    };
                    self.replays.push(ReplayRec {
                        rpc: "Commit".into(),
                        tenant: t,
                        key: key_s.clone(),
                        first_at: acked_at,
                        replay_at: now_ms(),
                        same,
                        detail,
                    });
                } else if self.client.rng.chance(1) {
                    // The same key with another payload: refused, changes nothing.
                    let mut other = req.clone();
                    other.cost = Some(pb::commit_request::Cost::Amount("0.000001".into()));
                    let again = self.client.call("Commit (key reused on purpose)", &key, &other, credit!(commit)).await;
                    let (same, detail) = match &again {
                        Outcome::Failed(s) => (
                            s.code() == Code::FailedPrecondition && reason_of(s) == "IDEMPOTENCY_KEY_REUSED",
                            format!("{:?} {}", s.code(), reason_of(s)),
                        ),
                        Outcome::Ok(a) => (false, format!("accepted: event {} amount {}", a.event_id, a.amount)),
                        Outcome::Abandoned(s) => (false, format!("abandoned: {s:?}")),
                    };
                    self.replays.push(ReplayRec {
                        rpc: "Commit (other payload)".into(),
                        tenant: t,
                        key: key_s.clone(),
                        first_at: acked_at,
                        replay_at: now_ms(),
                        same,
                        detail,
                    });
                }
                HoldFate::Committed { key: key_s, event_id: r.event_id, amount: r.amount }
            }
            Outcome::Failed(s) => {
                let (code, reason) = status_pair(&s);
                HoldFate::CommitFailed { key: key_s, code, reason }
            }
            Outcome::Abandoned(_) => HoldFate::CommitAbandoned { key: key_s },
        };
        self.holds.push(HoldRec { tenant: t, rid, account: account.to_string(), at, fate });
    }

    async fn scenario(&mut self) {
        let roll = self.client.rng.below(100);
        let (t, account) = self.subject();
        match roll {
            0..=27 => {
                // Reserve → Commit, plain amounts.
                let hold = self.client.rng.range(100_000, 20_000_000);
                let req = pb::ReserveRequest {
                    account_id: account.clone(),
                    cost: Some(pb::reserve_request::Cost::Amount(micros(hold))),
                    ttl: ttl(HOLD_TTL_SECS),
                    idempotency_key: self.key("r"),
                    labels: Default::default(),
                };
                if let Some((r, at)) = self.reserve(t, req).await {
                    self.think().await;
                    let c = self.client.rng.below(100);
                    let actual = if c < 70 {
                        self.client.rng.range(0, hold)
                    } else if c < 90 {
                        hold
                    } else {
                        hold + self.client.rng.range(1, hold)
                    };
                    self.commit(t, &account, r.reservation_id, at, pb::commit_request::Cost::Amount(micros(actual)))
                        .await;
                }
                self.op_done("reserve_commit");
            }
            28..=41 => {
                // Reserve → Commit, token usage rated by the catalog.
                let model = *self.client.rng.pick(&MODELS);
                let estimate = token_usage(&mut self.client.rng, model, 2, false);
                let req = pb::ReserveRequest {
                    account_id: account.clone(),
                    cost: Some(pb::reserve_request::Cost::Usage(estimate)),
                    ttl: ttl(HOLD_TTL_SECS),
                    idempotency_key: self.key("r"),
                    labels: [("model".to_string(), model.to_string())].into_iter().collect(),
                };
                if let Some((r, at)) = self.reserve(t, req).await {
                    self.think().await;
                    let reasoning = self.client.rng.chance(30);
                    let actual = token_usage(&mut self.client.rng, model, 1, reasoning);
                    self.commit(t, &account, r.reservation_id, at, pb::commit_request::Cost::Usage(actual)).await;
                }
                self.op_done("reserve_commit_rated");
            }
            42..=51 => {
                // Reserve → Release.
                let req = pb::ReserveRequest {
                    account_id: account.clone(),
                    cost: Some(pb::reserve_request::Cost::Amount(micros(self.client.rng.range(1, 10_000_000)))),
                    ttl: ttl(HOLD_TTL_SECS),
                    idempotency_key: self.key("r"),
                    labels: Default::default(),
                };
                if let Some((r, at)) = self.reserve(t, req).await {
                    self.think().await;
                    let rreq =
                        pb::ReleaseRequest { reservation_id: r.reservation_id.clone(), idempotency_key: self.key("l") };
                    let key = self.shared.keys[t].1.clone();
                    let fate = match self.client.call("Release", &key, &rreq, credit!(release)).await {
                        Outcome::Ok(first) => {
                            if self.client.rng.chance(3) {
                                let first_at = now_ms();
                                let again = self.client.call("Release", &key, &rreq, credit!(release)).await;
                                let (same, detail) = match &again {
                                    Outcome::Ok(a) => (
                                        a.replayed && dec(&a.released) == dec(&first.released),
                                        format!(
                                            "released {} then {} replayed={}",
                                            first.released, a.released, a.replayed
                                        ),
                                    ),
                                    Outcome::Failed(s) | Outcome::Abandoned(s) => {
                                        (false, format!("{:?} {}", s.code(), reason_of(s)))
                                    }
                                };
                                self.replays.push(ReplayRec {
                                    rpc: "Release".into(),
                                    tenant: t,
                                    key: rreq.idempotency_key.clone(),
                                    first_at,
                                    replay_at: now_ms(),
                                    same,
                                    detail,
                                });
                            }
                            HoldFate::Released
                        }
                        Outcome::Failed(s) => {
                            let (code, reason) = status_pair(&s);
                            HoldFate::ReleaseFailed { code, reason }
                        }
                        Outcome::Abandoned(_) => HoldFate::ReleaseAbandoned,
                    };
                    self.holds.push(HoldRec { tenant: t, rid: r.reservation_id, account: account.clone(), at, fate });
                }
                self.op_done("reserve_release");
            }
            52..=56 => {
                // A hold left to expire.
                let req = pb::ReserveRequest {
                    account_id: account.clone(),
                    cost: Some(pb::reserve_request::Cost::Amount(micros(self.client.rng.range(1, 5_000_000)))),
                    ttl: ttl(self.client.rng.range(1, 3) as i64),
                    idempotency_key: self.key("r"),
                    labels: Default::default(),
                };
                if let Some((r, at)) = self.reserve(t, req).await {
                    self.holds.push(HoldRec {
                        tenant: t,
                        rid: r.reservation_id,
                        account: account.clone(),
                        at,
                        fate: HoldFate::Expire,
                    });
                }
                self.op_done("reserve_expire");
            }
            57..=62 => {
                // Reserve → Extend → Commit (long-running work).
                let hold = self.client.rng.range(100_000, 5_000_000);
                let req = pb::ReserveRequest {
                    account_id: account.clone(),
                    cost: Some(pb::reserve_request::Cost::Amount(micros(hold))),
                    ttl: ttl(10),
                    idempotency_key: self.key("r"),
                    labels: Default::default(),
                };
                if let Some((r, at)) = self.reserve(t, req).await {
                    self.think().await;
                    let more = self.client.rng.range(0, 3_000_000);
                    let xreq = pb::ExtendRequest {
                        reservation_id: r.reservation_id.clone(),
                        more: Some(pb::extend_request::More::Amount(micros(more))),
                        ttl: ttl(HOLD_TTL_SECS),
                        idempotency_key: self.key("x"),
                    };
                    let key = self.shared.keys[t].1.clone();
                    let mut total = hold;
                    match self.client.call("Extend", &key, &xreq, credit!(extend)).await {
                        Outcome::Ok(x) if x.granted => total += more,
                        Outcome::Ok(x) => {
                            let reason = x.denial.as_ref().map(|d| d.reason().as_str_name()).unwrap_or("NONE");
                            *self.client.stats.denials.entry(format!("Extend {reason}")).or_default() += 1;
                        }
                        Outcome::Failed(s) => log_unexpected(&s, "Extend"),
                        Outcome::Abandoned(_) => {}
                    }
                    let actual = self.client.rng.range(0, total);
                    self.commit(t, &account, r.reservation_id, at, pb::commit_request::Cost::Amount(micros(actual)))
                        .await;
                }
                self.op_done("reserve_extend_commit");
            }
            63..=77 => {
                // Charge: post-paid, plain or an activity rated by the catalog.
                let cost = if self.client.rng.chance(50) {
                    pb::charge_request::Cost::Amount(micros(self.client.rng.range(0, 3_000_000)))
                } else {
                    let meter = *self.client.rng.pick(&["tasks", "app_calls", "image_standard", "runtime_seconds"]);
                    pb::charge_request::Cost::Usage(pb::Usage {
                        items: vec![pb::UsageItem {
                            meter: meter.into(),
                            model: String::new(),
                            quantity: self.client.rng.range(1, 30).to_string(),
                        }],
                    })
                };
                let key_s = self.key("g");
                let req = pb::ChargeRequest {
                    account_id: account.clone(),
                    cost: Some(cost),
                    idempotency_key: key_s.clone(),
                    labels: Default::default(),
                };
                let key = self.shared.keys[t].1.clone();
                let at = now_ms();
                let rec = match self.client.call("Charge", &key, &req, credit!(charge)).await {
                    Outcome::Ok(r) => {
                        if self.client.rng.chance(4) {
                            let first_at = now_ms();
                            let again = self.client.call("Charge", &key, &req, credit!(charge)).await;
                            let (same, detail) = match &again {
                                Outcome::Ok(a) => (
                                    a.event_id == r.event_id && dec(&a.amount) == dec(&r.amount) && a.replayed,
                                    format!("first {} {} replay {} {}", r.event_id, r.amount, a.event_id, a.amount),
                                ),
                                Outcome::Failed(s) | Outcome::Abandoned(s) => (false, format!("{s:?}")),
                            };
                            self.replays.push(ReplayRec {
                                rpc: "Charge".into(),
                                tenant: t,
                                key: key_s.clone(),
                                first_at,
                                replay_at: now_ms(),
                                same,
                                detail,
                            });
                        }
                        UsageRec {
                            tenant: t,
                            account: account.clone(),
                            key: key_s,
                            at,
                            event_id: Some(r.event_id),
                            amount: Some(r.amount),
                            outcome: "acked".into(),
                        }
                    }
                    Outcome::Failed(s) => {
                        let (code, reason) = status_pair(&s);
                        UsageRec {
                            tenant: t,
                            account: account.clone(),
                            key: key_s,
                            at,
                            event_id: None,
                            amount: None,
                            outcome: format!("failed {code} {reason}"),
                        }
                    }
                    Outcome::Abandoned(_) => UsageRec {
                        tenant: t,
                        account: account.clone(),
                        key: key_s,
                        at,
                        event_id: None,
                        amount: None,
                        outcome: "abandoned".into(),
                    },
                };
                self.charges.push(rec);
                self.op_done("charge");
            }
            78..=92 => {
                let key = self.shared.keys[t].1.clone();
                let req = pb::GetBalanceRequest { account_id: account };
                if let Outcome::Failed(s) = self.client.call("GetBalance", &key, &req, credit!(get_balance)).await {
                    log_unexpected(&s, "GetBalance");
                }
                self.op_done("get_balance");
            }
            _ => {
                let key = self.shared.keys[t].1.clone();
                let req = pb::AuthorizeRequest {
                    account_id: account,
                    cost: Some(pb::authorize_request::Cost::Amount(micros(self.client.rng.range(1, 50_000_000)))),
                };
                match self.client.call("Authorize", &key, &req, credit!(authorize)).await {
                    Outcome::Ok(r) if !r.granted => {
                        let reason = r.denial.as_ref().map(|d| d.reason().as_str_name()).unwrap_or("NONE");
                        *self.client.stats.denials.entry(format!("Authorize {reason}")).or_default() += 1;
                    }
                    Outcome::Failed(s) => log_unexpected(&s, "Authorize"),
                    _ => {}
                }
                self.op_done("authorize");
            }
        }
    }

    /// The model call between Reserve and Commit.
    async fn think(&mut self) {
        let ms = self.client.rng.below(20);
        if ms > 0 {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
    }

    /// Admin traffic: grants and top-ups while the run goes on.
    async fn admin_step(&mut self) {
        let t = self.client.rng.below(self.shared.tenants.len() as u64) as usize;
        let fx = &self.shared.tenants[t];
        let roll = self.client.rng.below(100);
        let account = if roll < 50 {
            self.client.rng.pick(&fx.solos).clone()
        } else if roll < 80 {
            self.client.rng.pick(&fx.users).clone()
        } else if roll < 90 {
            "team-b".to_string()
        } else {
            "org".to_string()
        };
        let category = *self.client.rng.pick(&[
            pb::GrantCategory::Purchase,
            pb::GrantCategory::Promotional,
            pb::GrantCategory::Refund,
            pb::GrantCategory::Plan,
        ]);
        let amount = micros(self.client.rng.range(1_000_000, 300_000_000));
        self.grant(t, &account, &amount, category, true).await;
    }

    async fn grant(&mut self, t: usize, account: &str, amount: &str, category: pb::GrantCategory, replay: bool) {
        let key_s = self.key("grant");
        let req = pb::CreateGrantRequest {
            account_id: account.to_string(),
            amount: amount.to_string(),
            category: category as i32,
            idempotency_key: key_s.clone(),
            description: "soak top-up".into(),
            ..Default::default()
        };
        let key = self.shared.keys[t].0.clone();
        let (grant_id, outcome) = match self.client.call("CreateGrant", &key, &req, admin!(create_grant)).await {
            Outcome::Ok(g) => {
                if replay && self.client.rng.chance(20) {
                    let first_at = now_ms();
                    let again = self.client.call("CreateGrant", &key, &req, admin!(create_grant)).await;
                    let (same, detail) = match &again {
                        Outcome::Ok(a) => {
                            (a.grant_id == g.grant_id, format!("first {} replay {}", g.grant_id, a.grant_id))
                        }
                        Outcome::Failed(s) | Outcome::Abandoned(s) => (false, format!("{s:?}")),
                    };
                    self.replays.push(ReplayRec {
                        rpc: "CreateGrant".into(),
                        tenant: t,
                        key: key_s.clone(),
                        first_at,
                        replay_at: now_ms(),
                        same,
                        detail,
                    });
                }
                (Some(g.grant_id), "acked".to_string())
            }
            Outcome::Failed(s) => {
                let (code, reason) = status_pair(&s);
                (None, format!("failed {code} {reason}"))
            }
            Outcome::Abandoned(_) => (None, "abandoned".to_string()),
        };
        self.grants.push(GrantRec {
            tenant: t,
            account: account.to_string(),
            key: key_s,
            amount: amount.to_string(),
            grant_id,
            outcome,
        });
    }
}

fn log_unexpected(s: &Status, rpc: &str) {
    // Denials are answers; errors other than the retryable ones are counted
    // in the stats and shown here once in a while.
    static SHOWN: AtomicU64 = AtomicU64::new(0);
    if SHOWN.fetch_add(1, Ordering::Relaxed) < 20 {
        log(format!("{rpc}: {:?} {} {}", s.code(), reason_of(s), s.message()));
    }
}

async fn wait_serving(addr: SocketAddr, limit: Duration) -> AnyResult<()> {
    let t0 = Instant::now();
    loop {
        let attempt = async {
            let channel = Endpoint::from_shared(format!("http://{addr}"))?
                .connect_timeout(Duration::from_secs(2))
                .timeout(Duration::from_secs(2))
                .connect()
                .await?;
            let r = HealthClient::new(channel).check(HealthCheckRequest { service: String::new() }).await?;
            Ok::<bool, Box<dyn std::error::Error + Send + Sync>>(r.into_inner().status == ServingStatus::Serving as i32)
        };
        if let Ok(true) = attempt.await {
            return Ok(());
        }
        if t0.elapsed() > limit {
            return Err(format!("creditd at {addr} did not report SERVING within {} s", limit.as_secs()).into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn seed_tenant(
    client: &mut Client,
    operator: &Key,
    run_id: &str,
    index: usize,
    users: usize,
) -> AnyResult<(TenantFixture, Vec<GrantRec>)> {
    fn ok<T>(o: Outcome<T>, what: &str) -> AnyResult<T> {
        match o {
            Outcome::Ok(v) => Ok(v),
            Outcome::Failed(s) | Outcome::Abandoned(s) => Err(format!("{what}: {:?} {}", s.code(), s.message()).into()),
        }
    }
    let id = format!("soak-{run_id}-{index}");
    let req = pb::CreateTenantRequest { tenant_id: id.clone(), display_name: "soak".into(), ..Default::default() };
    ok(client.call("CreateTenant", operator, &req, admin!(create_tenant)).await, "CreateTenant")?;
    let mut keys = Vec::new();
    for role in [pb::ApiKeyRole::Admin, pb::ApiKeyRole::Runtime] {
        let req = pb::CreateApiKeyRequest {
            tenant_id: id.clone(),
            role: role as i32,
            name: format!("soak-{}", role.as_str_name()),
            idempotency_key: format!("soak-{id}-{}", role as i32),
        };
        let r = ok(client.call("CreateApiKey", operator, &req, admin!(create_api_key)).await, "CreateApiKey")?;
        if r.key.is_empty() {
            return Err("CreateApiKey answered without a key".into());
        }
        keys.push(r.key);
    }
    let admin_key = bearer(&keys[0])?;
    let mut accounts = Vec::new();
    let mut fx = TenantFixture {
        id: id.clone(),
        admin_key: keys[0].clone(),
        runtime_key: keys[1].clone(),
        accounts: Vec::new(),
        users: Vec::new(),
        solos: Vec::new(),
        capped: Vec::new(),
    };
    let mut create = |account: &str, parent: &str, kind: pb::AccountKind, pool: bool, cap: &str| {
        accounts.push(pb::CreateAccountRequest {
            account_id: account.into(),
            parent_id: parent.into(),
            kind: kind as i32,
            pool_access: pool,
            cap: cap.into(),
            ..Default::default()
        });
    };
    create("org", "", pb::AccountKind::Organization, false, "");
    create("team-a", "org", pb::AccountKind::Team, true, "");
    create("team-b", "org", pb::AccountKind::Team, true, "");
    for u in 0..users {
        let name = format!("u{u:02}");
        create(&name, if u % 2 == 0 { "team-a" } else { "team-b" }, pb::AccountKind::User, true, "");
        fx.users.push(name);
    }
    for s in 0..2 {
        let name = format!("solo-{s}");
        create(&name, "org", pb::AccountKind::User, false, "");
        fx.solos.push(name);
    }
    create("capped", "team-a", pb::AccountKind::User, true, "400");
    fx.capped.push("capped".into());
    for req in &accounts {
        ok(client.call("CreateAccount", &admin_key, req, admin!(create_account)).await, "CreateAccount")?;
        fx.accounts.push(req.account_id.clone());
    }
    let mut grants = Vec::new();
    let mut seed_grants = vec![
        ("org".to_string(), "50000000", pb::GrantCategory::Plan),
        ("team-b".to_string(), "5000", pb::GrantCategory::Purchase),
        ("u00".to_string(), "25", pb::GrantCategory::Welcome),
        ("u01".to_string(), "25", pb::GrantCategory::Welcome),
    ];
    for s in &fx.solos {
        seed_grants.push((s.clone(), "300", pb::GrantCategory::Purchase));
    }
    for (account, amount, category) in seed_grants {
        let key_s = format!("soak-seed-{account}");
        let req = pb::CreateGrantRequest {
            account_id: account.clone(),
            amount: amount.into(),
            category: category as i32,
            idempotency_key: key_s.clone(),
            description: "soak seed".into(),
            ..Default::default()
        };
        let g = ok(client.call("CreateGrant", &admin_key, &req, admin!(create_grant)).await, "CreateGrant")?;
        grants.push(GrantRec {
            tenant: index,
            account,
            key: key_s,
            amount: amount.into(),
            grant_id: Some(g.grant_id),
            outcome: "acked".into(),
        });
    }
    Ok((fx, grants))
}

async fn run(args: RunArgs) -> AnyResult<()> {
    require_loopback(&args.addr, &[])?;
    if args.addr.is_empty() {
        return Err("--addr: at least one replica".into());
    }
    let started_at = chrono::Utc::now();
    let run_id = {
        let mut r = Rng::new(args.seed ^ started_at.timestamp_millis() as u64);
        format!("{:08x}", r.next() as u32)
    };
    for a in &args.addr {
        log(format!("waiting for creditd at {a}"));
        wait_serving(*a, Duration::from_secs(120)).await?;
    }
    let hard_stop = Arc::new(AtomicBool::new(false));
    let call_timeout = Duration::from_secs_f64(args.call_timeout);
    let retry_for = Duration::from_secs_f64(args.retry_for);
    let operator = bearer(&args.operator_key)?;
    let mut seeder = Client::new(&args.addr, call_timeout, retry_for, hard_stop.clone(), Rng::new(args.seed));
    let mut tenants = Vec::new();
    let mut grants = Vec::new();
    for i in 0..args.tenants {
        let (fx, g) = seed_tenant(&mut seeder, &operator, &run_id, i, args.users).await?;
        log(format!("seeded tenant {} ({} accounts)", fx.id, fx.accounts.len()));
        tenants.push(fx);
        grants.extend(g);
    }
    let keys =
        tenants.iter().map(|t| Ok((bearer(&t.admin_key)?, bearer(&t.runtime_key)?))).collect::<AnyResult<Vec<_>>>()?;
    let traffic_start = Instant::now();
    let traffic_started_at = chrono::Utc::now();
    let shared = Arc::new(Shared {
        tenants: tenants.clone(),
        keys,
        run_id: run_id.clone(),
        deadline: traffic_start + Duration::from_secs_f64(args.seconds),
        max_ops: args.max_ops,
        started: AtomicU64::new(0),
    });
    if let Some(path) = &args.tenants_file {
        std::fs::write(path, tenants.iter().map(|t| format!("{}\n", t.id)).collect::<String>())?;
    }
    if let Some(path) = &args.ready_file {
        let end = traffic_started_at.timestamp() as f64 + args.seconds;
        std::fs::write(path, format!("{end:.0}\n"))?;
    }
    log(format!("traffic: {} workers for {} s over {:?} (run {run_id})", args.workers, args.seconds, args.addr));

    // The hard stop: past the deadline plus one retry window nothing is
    // retried any more, so every worker ends.
    {
        let hard_stop = hard_stop.clone();
        let limit = Duration::from_secs_f64(args.seconds) + retry_for + Duration::from_secs(5);
        tokio::spawn(async move {
            tokio::time::sleep(limit).await;
            hard_stop.store(true, Ordering::Relaxed);
        });
    }
    let mut handles = Vec::new();
    for w in 0..=args.workers {
        let shared = shared.clone();
        let client = Client::new(
            &args.addr,
            call_timeout,
            retry_for,
            hard_stop.clone(),
            Rng::new(args.seed.wrapping_mul(1_000_003).wrapping_add(w as u64 + 1)),
        );
        let admin = w == args.workers;
        handles.push(tokio::spawn(async move {
            let mut worker = Worker {
                id: w,
                seq: 0,
                client,
                shared,
                holds: Vec::new(),
                charges: Vec::new(),
                grants: Vec::new(),
                replays: Vec::new(),
                reserves_abandoned: 0,
            };
            let mut last_report = Instant::now();
            while Instant::now() < worker.shared.deadline {
                if admin {
                    worker.admin_step().await;
                    let pause = worker.client.rng.range(500, 2500);
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                    continue;
                }
                if worker.shared.started.fetch_add(1, Ordering::Relaxed) >= worker.shared.max_ops {
                    break;
                }
                worker.scenario().await;
                if w == 0 && last_report.elapsed() > Duration::from_secs(15) {
                    last_report = Instant::now();
                    log(format!("{} scenarios started", worker.shared.started.load(Ordering::Relaxed)));
                }
            }
            worker
        }));
    }
    let mut records = Records {
        run_id,
        seed: args.seed,
        addrs: args.addr.iter().map(|a| a.to_string()).collect(),
        workers: args.workers,
        started_at: started_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        traffic_started_at: traffic_started_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        tenants,
        grants,
        ..Default::default()
    };
    records.stats.merge(std::mem::take(&mut seeder.stats));
    for h in handles {
        let w = h.await?;
        records.stats.merge(w.client.stats);
        records.holds.extend(w.holds);
        records.charges.extend(w.charges);
        records.grants.extend(w.grants);
        records.replays.extend(w.replays);
        records.reserves_abandoned += w.reserves_abandoned;
    }
    records.traffic_seconds = traffic_start.elapsed().as_secs_f64();
    records.ended_at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    records.stats.summarize_latency();
    let ops: u64 = records.stats.ops.values().sum();
    log(format!(
        "traffic done: {ops} scenarios in {:.0} s, {} holds, {} charges, {} grants, {} replays",
        records.traffic_seconds,
        records.holds.len(),
        records.charges.len(),
        records.grants.len(),
        records.replays.len()
    ));
    std::fs::write(&args.records, serde_json::to_vec(&records)?)?;
    Ok(())
}

// ---------------------------------------------------------------------------
// audit

#[derive(Serialize, Clone, Debug)]
struct Check {
    name: String,
    ok: bool,
    detail: String,
    /// Up to 10 examples of what failed.
    examples: Vec<String>,
}

struct Checks(Vec<Check>);

impl Checks {
    fn add(&mut self, name: &str, failures: Vec<String>, detail: String) {
        let ok = failures.is_empty();
        log(format!(
            "{} {name}: {detail}{}",
            if ok { "PASS" } else { "FAIL" },
            if ok { String::new() } else { format!(" ({} failures, e.g. {})", failures.len(), failures[0]) }
        ));
        self.0.push(Check {
            name: name.to_string(),
            ok,
            detail: if ok { detail } else { format!("{detail}; {} failures", failures.len()) },
            examples: failures.into_iter().take(10).collect(),
        });
    }
}

#[derive(Clone, Debug)]
struct Fault {
    at: chrono::DateTime<chrono::Utc>,
    kind: String,
    detail: String,
}

fn read_faults(path: &Option<PathBuf>) -> AnyResult<Vec<Fault>> {
    let Some(path) = path else { return Ok(Vec::new()) };
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut out = Vec::new();
    for line in text.lines() {
        let mut parts = line.splitn(3, '\t');
        let (Some(at), Some(kind)) = (parts.next(), parts.next()) else { continue };
        let Ok(at) = chrono::DateTime::parse_from_rfc3339(at) else { continue };
        out.push(Fault {
            at: at.with_timezone(&chrono::Utc),
            kind: kind.to_string(),
            detail: parts.next().unwrap_or("").to_string(),
        });
    }
    Ok(out)
}

/// event id, reservation id, kind, idempotency key, amount, Σ draws.
type EventTuple = (uuid::Uuid, Option<uuid::Uuid>, String, String, Decimal, Option<Decimal>);
/// grant id, account, idempotency key, amount, credited.
type GrantTuple = (uuid::Uuid, String, String, Decimal, bool);

struct EventRow {
    event_id: String,
    reservation_id: Option<String>,
    kind: String,
    key: String,
    amount: Decimal,
    draws_sum: Decimal,
}

fn redis_micros(v: Option<&String>) -> Decimal {
    v.and_then(|s| s.parse::<i64>().ok()).map(|m| Decimal::new(m, 6)).unwrap_or(Decimal::new(-1, 0))
}

async fn audit(args: AuditArgs) -> AnyResult<bool> {
    require_loopback(&args.addr, &[("--database-url", &args.database_url), ("--redis-url", &args.redis_url)])?;
    let records: Records = serde_json::from_slice(&std::fs::read(&args.records)?)?;
    let faults = read_faults(&args.faults)?;
    let audit_started = Instant::now();
    for a in &args.addr {
        log(format!("audit: waiting for {a} to serve"));
        wait_serving(*a, Duration::from_secs(120)).await?;
    }
    let pg = sqlx::postgres::PgPoolOptions::new().max_connections(2).connect(&args.database_url).await?;
    let mut redis = redis::Client::open(args.redis_url.as_str())?.get_multiplexed_async_connection().await?;
    let prefix = |t: &str| format!("{}{{t:{t}}}:", args.redis_prefix);

    // Settle: holds expired or settled, commits finalized or reverted, usage
    // allocated, ledger rows applied.
    let t0 = Instant::now();
    let mut settled_after = None;
    while t0.elapsed() < Duration::from_secs_f64(args.settle_timeout) {
        let mut busy = 0i64;
        for t in &records.tenants {
            let p = prefix(&t.id);
            let holds: i64 = redis::cmd("ZCARD").arg(format!("{p}holds")).query_async(&mut redis).await?;
            let committing: i64 = redis::cmd("ZCARD").arg(format!("{p}committing")).query_async(&mut redis).await?;
            busy += holds + committing;
        }
        let unallocated: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM usage_events WHERE NOT allocated AND tenant_id = ANY($1)")
                .bind(records.tenants.iter().map(|t| t.id.clone()).collect::<Vec<_>>())
                .fetch_one(&pg)
                .await?;
        let unapplied: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM ledger WHERE NOT applied AND tenant_id = ANY($1)")
                .bind(records.tenants.iter().map(|t| t.id.clone()).collect::<Vec<_>>())
                .fetch_one(&pg)
                .await?;
        if busy == 0 && unallocated == 0 && unapplied == 0 {
            settled_after = Some(t0.elapsed().as_secs_f64());
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // One more ledger pass after the last change.
    tokio::time::sleep(Duration::from_secs(2)).await;
    log(format!("audit: settled after {:?} s", settled_after.map(|s| (s * 10.0).round() / 10.0)));

    let mut checks = Checks(Vec::new());
    checks.add(
        "system settled",
        if settled_after.is_some() { vec![] } else { vec![format!("not settled within {} s", args.settle_timeout)] },
        format!(
            "no active or committing hold in Redis, every event allocated, every ledger row applied after {} s",
            settled_after.map(|s| format!("{s:.1}")).unwrap_or_else(|| "-".into())
        ),
    );

    // When Redis lost state: an emptying (an instant), or a rollback (from
    // the copy of its AOF to the restart from it: writes in between lost).
    let mut redis_lost: Vec<(i64, i64)> = Vec::new();
    for f in &faults {
        let at = f.at.timestamp_millis();
        match f.kind.as_str() {
            k if k.starts_with("redis_empty") => redis_lost.push((at, at)),
            "redis_rollback" => redis_lost.push((at, at)),
            "redis_rollback_end" => {
                if let Some(last) = redis_lost.last_mut() {
                    last.1 = at;
                }
            }
            _ => {}
        }
    }
    let redis_lost_between = |a: i64, b: i64| redis_lost.iter().any(|&(from, to)| from <= b + 2000 && to >= a - 2000);

    // Per tenant: events, grants, ledger, Redis.
    let mut ack_missing = Vec::new();
    let mut ack_mismatch = Vec::new();
    let mut unacked_events = Vec::new();
    let mut dup_events = Vec::new();
    let mut draws_mismatch = Vec::new();
    let mut charged_after_no = Vec::new();
    let mut grant_fail = Vec::new();
    let mut balance_fail = Vec::new();
    let mut redis_fail = Vec::new();
    let mut hold_fail = Vec::new();
    let mut tomb_fail = Vec::new();
    let mut check_rpc_fail = Vec::new();
    let mut acked_commits = 0u64;
    let mut acked_charges = 0u64;
    let mut events_total = 0u64;
    let mut events_unknown_outcome = 0u64;
    let mut tomb_counts: BTreeMap<String, u64> = BTreeMap::new();
    let mut accounts_checked = 0u64;
    let mut totals = Vec::new();

    for (ti, t) in records.tenants.iter().enumerate() {
        let rows: Vec<EventTuple> = sqlx::query_as(
            "SELECT e.event_id, e.reservation_id, e.kind, e.idempotency_key, e.amount, \
               (SELECT SUM(d.amount) FROM jsonb_to_recordset(e.draws) AS d(account text, amount numeric)) \
             FROM usage_events e WHERE e.tenant_id = $1",
        )
        .bind(&t.id)
        .fetch_all(&pg)
        .await?;
        let events: Vec<EventRow> = rows
            .into_iter()
            .map(|(e, r, kind, key, amount, draws)| EventRow {
                event_id: e.to_string(),
                reservation_id: r.map(|r| r.to_string()),
                kind,
                key,
                amount,
                draws_sum: draws.unwrap_or_default(),
            })
            .collect();
        events_total += events.len() as u64;
        let mut by_id: HashMap<&str, usize> = HashMap::new();
        let mut by_rid: HashMap<&str, Vec<usize>> = HashMap::new();
        let mut by_key: HashMap<(&str, &str), Vec<usize>> = HashMap::new();
        for (i, e) in events.iter().enumerate() {
            by_id.insert(&e.event_id, i);
            if let Some(r) = &e.reservation_id {
                by_rid.entry(r).or_default().push(i);
            }
            by_key.entry((&e.kind, &e.key)).or_default().push(i);
            if e.draws_sum != e.amount {
                draws_mismatch
                    .push(format!("{} event {}: draws {} ≠ amount {}", t.id, e.event_id, e.draws_sum, e.amount));
            }
        }
        for (r, v) in &by_rid {
            if v.len() > 1 {
                dup_events.push(format!("{} reservation {r}: {} events", t.id, v.len()));
            }
        }
        for ((kind, key), v) in &by_key {
            if v.len() > 1 {
                dup_events.push(format!("{} {kind} key {key}: {} events", t.id, v.len()));
            }
        }
        // Which events are explained by a client's record.
        let mut explained: HashSet<usize> = HashSet::new();
        let mut sum_acked = Decimal::ZERO;
        for h in records.holds.iter().filter(|h| h.tenant == ti) {
            let evs = by_rid.get(h.rid.as_str()).cloned().unwrap_or_default();
            match &h.fate {
                HoldFate::Committed { event_id, amount, key } => {
                    acked_commits += 1;
                    sum_acked += dec(amount);
                    match by_id.get(event_id.as_str()) {
                        None => {
                            ack_missing.push(format!("{} commit {key} of {}: event {event_id} missing", t.id, h.rid))
                        }
                        Some(&i) => {
                            explained.insert(i);
                            let e = &events[i];
                            if e.amount != dec(amount)
                                || e.reservation_id.as_deref() != Some(h.rid.as_str())
                                || e.kind != "commit"
                                || &e.key != key
                            {
                                ack_mismatch.push(format!(
                                    "{} event {event_id}: acknowledged {amount} for {} key {key}, stored {} {} for {:?} key {}",
                                    t.id, h.rid, e.kind, e.amount, e.reservation_id, e.key
                                ));
                            }
                        }
                    }
                }
                HoldFate::CommitAbandoned { .. } | HoldFate::ReleaseAbandoned => {
                    if !evs.is_empty() {
                        events_unknown_outcome += evs.len() as u64;
                    }
                    explained.extend(evs);
                }
                HoldFate::CommitFailed { key, code, reason } => {
                    if !evs.is_empty() {
                        charged_after_no.push(format!(
                            "{} reservation {}: commit {key} answered {code} {reason}, yet {} event(s)",
                            t.id,
                            h.rid,
                            evs.len()
                        ));
                        explained.extend(evs);
                    }
                }
                HoldFate::Released | HoldFate::ReleaseFailed { .. } | HoldFate::Expire => {
                    if !evs.is_empty() {
                        charged_after_no.push(format!(
                            "{} reservation {} ({:?}): {} event(s)",
                            t.id,
                            h.rid,
                            h.fate,
                            evs.len()
                        ));
                        explained.extend(evs);
                    }
                }
            }
        }
        for c in records.charges.iter().filter(|c| c.tenant == ti) {
            let evs = by_key.get(&("charge", c.key.as_str())).cloned().unwrap_or_default();
            match (&c.event_id, &c.amount) {
                (Some(event_id), Some(amount)) => {
                    acked_charges += 1;
                    sum_acked += dec(amount);
                    match by_id.get(event_id.as_str()) {
                        None => ack_missing.push(format!("{} charge {}: event {event_id} missing", t.id, c.key)),
                        Some(&i) => {
                            explained.insert(i);
                            let e = &events[i];
                            if e.amount != dec(amount) || e.kind != "charge" || e.key != c.key {
                                ack_mismatch.push(format!(
                                    "{} event {event_id}: acknowledged charge {amount} key {}, stored {} {} key {}",
                                    t.id, c.key, e.kind, e.amount, e.key
                                ));
                            }
                        }
                    }
                }
                _ if c.outcome == "abandoned" => {
                    events_unknown_outcome += evs.len() as u64;
                    explained.extend(evs);
                }
                _ => {
                    if !evs.is_empty() {
                        charged_after_no
                            .push(format!("{} charge {} answered {}, yet recorded", t.id, c.key, c.outcome));
                        explained.extend(evs);
                    }
                }
            }
        }
        for (i, e) in events.iter().enumerate() {
            if !explained.contains(&i) {
                unacked_events.push(format!(
                    "{} event {} ({} {:?} key {} amount {}) was never acknowledged to a client",
                    t.id, e.event_id, e.kind, e.reservation_id, e.key, e.amount
                ));
            }
        }
        let sum_events: Decimal = events.iter().map(|e| e.amount).sum();

        // Grants: every acknowledged grant stored once with its amount.
        let grant_rows: Vec<GrantTuple> = sqlx::query_as(
            "SELECT grant_id, account_id, idempotency_key, amount, credited_at IS NOT NULL FROM grants WHERE tenant_id = $1",
        )
        .bind(&t.id)
        .fetch_all(&pg)
        .await?;
        let grants_by_key: HashMap<&str, &GrantTuple> = grant_rows.iter().map(|g| (g.2.as_str(), g)).collect();
        let mut known_keys = HashSet::new();
        for g in records.grants.iter().filter(|g| g.tenant == ti) {
            known_keys.insert(g.key.as_str());
            let stored = grants_by_key.get(g.key.as_str());
            match (&g.grant_id, stored) {
                (Some(id), Some(s)) if s.0.to_string() != *id || s.3 != dec(&g.amount) || s.1 != g.account || !s.4 => {
                    grant_fail.push(format!(
                        "{} grant {}: acknowledged {id} {} on {}, stored {:?}",
                        t.id, g.key, g.amount, g.account, s
                    ));
                }
                (Some(id), None) => {
                    grant_fail.push(format!("{} grant {} ({id}) acknowledged but missing", t.id, g.key))
                }
                (None, Some(_)) if g.outcome != "abandoned" => {
                    grant_fail.push(format!("{} grant {} answered {} yet stored", t.id, g.key, g.outcome))
                }
                _ => {}
            }
        }
        for g in &grant_rows {
            if !known_keys.contains(g.2.as_str()) {
                grant_fail.push(format!("{} grant {} ({}) not made by a client", t.id, g.0, g.2));
            }
        }
        let sum_grants: Decimal = grant_rows.iter().filter(|g| g.4).map(|g| g.3).sum();

        // Balances: Σ grants − Σ forfeits − Σ draws = Σ ledger = Redis b.
        let per_account: Vec<(String, Decimal, Decimal, Decimal, Decimal)> = sqlx::query_as(
            "SELECT a.account_id, \
               COALESCE((SELECT SUM(g.amount) FROM grants g WHERE g.tenant_id = a.tenant_id AND g.account_id = a.account_id \
                          AND g.credited_at IS NOT NULL), 0), \
               COALESCE((SELECT SUM(l.amount) FROM ledger l WHERE l.tenant_id = a.tenant_id AND l.account_id = a.account_id \
                          AND l.kind IN ('void', 'expiry')), 0), \
               COALESCE((SELECT SUM(d.amount) FROM usage_events e, \
                          jsonb_to_recordset(e.draws) AS d(account text, amount numeric) \
                          WHERE e.tenant_id = a.tenant_id AND d.account = a.account_id), 0), \
               COALESCE((SELECT SUM(l.amount) FROM ledger l WHERE l.tenant_id = a.tenant_id \
                          AND l.account_id = a.account_id), 0) \
             FROM accounts a WHERE a.tenant_id = $1 ORDER BY a.account_id",
        )
        .bind(&t.id)
        .fetch_all(&pg)
        .await?;
        // Cap counters: usage of each account's subtree since its period start.
        let subtree_usage: HashMap<String, Decimal> = sqlx::query_as::<_, (String, Decimal)>(
            "WITH RECURSIVE tree(ancestor, descendant) AS ( \
               SELECT account_id, account_id FROM accounts WHERE tenant_id = $1 \
               UNION ALL \
               SELECT t.ancestor, a.account_id FROM tree t \
               JOIN accounts a ON a.tenant_id = $1 AND a.parent_id = t.descendant) \
             SELECT t.ancestor, SUM(e.amount) FROM tree t \
             JOIN accounts anc ON anc.tenant_id = $1 AND anc.account_id = t.ancestor \
             JOIN usage_events e ON e.tenant_id = $1 AND e.account_id = t.descendant \
               AND e.recorded_at >= COALESCE(anc.period_start, '-infinity'::timestamptz) \
             GROUP BY t.ancestor",
        )
        .bind(&t.id)
        .fetch_all(&pg)
        .await?
        .into_iter()
        .collect();
        let p = prefix(&t.id);
        let mut sum_balances = Decimal::ZERO;
        for (account, granted, forfeited, drawn, ledger) in &per_account {
            accounts_checked += 1;
            let expected = granted + forfeited - drawn;
            sum_balances += ledger;
            if expected != *ledger {
                balance_fail.push(format!(
                    "{} {account}: grants {granted} forfeits {forfeited} usage {drawn} → {expected}, ledger {ledger}",
                    t.id
                ));
            }
            let hash: HashMap<String, String> =
                redis::cmd("HGETALL").arg(format!("{p}a:{account}")).query_async(&mut redis).await?;
            let b = redis_micros(hash.get("b"));
            let h = redis_micros(hash.get("h"));
            let uh = redis_micros(hash.get("uh"));
            let u = redis_micros(hash.get("u"));
            let used = subtree_usage.get(account).copied().unwrap_or_default();
            if b != *ledger || !h.is_zero() || !uh.is_zero() || u != used {
                redis_fail.push(format!(
                    "{} {account}: Redis b {b} h {h} uh {uh} u {u}; PostgreSQL balance {ledger}, period usage {used}",
                    t.id
                ));
            }
        }
        if sum_grants - sum_events != sum_balances && per_account.iter().all(|(_, _, f, _, _)| f.is_zero()) {
            balance_fail
                .push(format!("{}: Σ grants {sum_grants} − Σ usage {sum_events} ≠ Σ balances {sum_balances}", t.id));
        }
        totals.push(json!({
            "tenant": t.id,
            "grants": sum_grants.normalize().to_string(),
            "usage": sum_events.normalize().to_string(),
            "balances": sum_balances.normalize().to_string(),
            "acknowledged_usage": sum_acked.normalize().to_string(),
            "events": events.len(),
        }));

        // Holds: none active or committing; tombstones agree with the client.
        let zh: i64 = redis::cmd("ZCARD").arg(format!("{p}holds")).query_async(&mut redis).await?;
        let zc: i64 = redis::cmd("ZCARD").arg(format!("{p}committing")).query_async(&mut redis).await?;
        if zh != 0 || zc != 0 {
            hold_fail.push(format!("{}: {zh} active and {zc} committing holds left in Redis", t.id));
        }
        let mut cursor: u64 = 0;
        let mut hold_keys = Vec::new();
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{p}h:*"))
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut redis)
                .await?;
            hold_keys.extend(keys);
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        let mut state_of: HashMap<String, String> = HashMap::new();
        for chunk in hold_keys.chunks(500) {
            let mut pipe = redis::pipe();
            for k in chunk {
                pipe.cmd("HGET").arg(k).arg("st");
            }
            let states: Vec<Option<String>> = pipe.query_async(&mut redis).await?;
            for (k, st) in chunk.iter().zip(states) {
                let id = k.rsplit(':').next().unwrap_or("").to_string();
                let st = st.unwrap_or_else(|| "none".into());
                if st == "active" || st == "committing" {
                    hold_fail.push(format!("{}: hold {id} still {st}", t.id));
                }
                state_of.insert(id, st);
            }
        }
        for h in records.holds.iter().filter(|h| h.tenant == ti) {
            let st = state_of.get(&h.rid).map(String::as_str).unwrap_or("absent");
            let expected: &[&str] = match &h.fate {
                HoldFate::Committed { .. } => &["committed"],
                HoldFate::Released => &["released"],
                HoldFate::Expire => &["expired"],
                // A commit that failed definitively found the hold expired,
                // released, reverted or gone, or was above the commit limit
                // (the hold then expired).
                HoldFate::CommitFailed { .. } => &["expired", "released", "reverted"],
                HoldFate::ReleaseFailed { .. } => &["expired", "released", "reverted", "committed"],
                HoldFate::CommitAbandoned { .. } | HoldFate::ReleaseAbandoned => {
                    &["expired", "released", "reverted", "committed"]
                }
            };
            let label = match &h.fate {
                HoldFate::Committed { .. } => "committed",
                HoldFate::CommitFailed { .. } => "commit failed",
                HoldFate::CommitAbandoned { .. } => "commit abandoned",
                HoldFate::Released => "released",
                HoldFate::ReleaseFailed { .. } => "release failed",
                HoldFate::ReleaseAbandoned => "release abandoned",
                HoldFate::Expire => "left to expire",
            };
            *tomb_counts.entry(format!("{label} → {st}")).or_default() += 1;
            // Redis emptied after the hold: its tombstone is gone with it.
            if st != "absent" && !expected.contains(&st) {
                tomb_fail.push(format!("{} hold {} ({label}): Redis says {st}", t.id, h.rid));
            }
            if st == "absent" && !redis_lost_between(h.at, now_ms()) {
                tomb_fail.push(format!("{} hold {} ({label}): no tombstone and Redis was not emptied", t.id, h.rid));
            }
        }

        // The service's own check, on every replica.
        for addr in &args.addr {
            let mut answer = Err(Status::unknown("not called"));
            // A transient error (a connection reset) is retried; a lasting
            // one fails the check.
            for _ in 0..3 {
                let ch = endpoint(*addr, Duration::from_secs(60));
                let mut r = Request::new(pb::CheckBalancesRequest {});
                r.metadata_mut().insert("authorization", bearer(&t.admin_key)?);
                answer = AdminServiceClient::new(ch).check_balances(r).await;
                if answer.is_ok() {
                    break;
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            match answer {
                Ok(resp) => {
                    let resp = resp.into_inner();
                    for d in resp.drifts {
                        check_rpc_fail.push(format!(
                            "{} via {addr}: {} hot {} ledger {}",
                            t.id, d.account_id, d.hot_balance, d.ledger_balance
                        ));
                    }
                }
                Err(s) => check_rpc_fail.push(format!("{} via {addr}: {:?} {}", t.id, s.code(), s.message())),
            }
        }
    }

    let n_holds = records.holds.len();
    checks.add(
        "acknowledged usage is durable",
        ack_missing,
        format!(
            "{acked_commits} acknowledged commits and {acked_charges} acknowledged charges, each found by event id"
        ),
    );
    checks.add(
        "acknowledged usage recorded as answered",
        ack_mismatch,
        "amount, kind, reservation and idempotency key of each acknowledged event equal the answer".into(),
    );
    checks.add(
        "no duplicate usage",
        dup_events,
        format!("{events_total} events: at most one per reservation and per (kind, idempotency key)"),
    );
    checks.add(
        "no usage nobody was told about",
        unacked_events,
        format!(
            "every event is an acknowledged commit or charge, or the outcome of a call given up \
             ({events_unknown_outcome} such events)"
        ),
    );
    checks.add(
        "released, expired and refused holds are not charged",
        charged_after_no,
        "no event for a hold released, left to expire, or whose commit was refused".into(),
    );
    checks.add("draws add up", draws_mismatch, "Σ draws of each event = its amount".into());
    checks.add(
        "grants",
        grant_fail,
        format!(
            "{} grants made (seed and during the run): each acknowledged one stored once with its amount, no other",
            records.grants.len()
        ),
    );
    checks.add(
        "Σ grants − Σ usage = balance",
        balance_fail,
        format!("{accounts_checked} accounts: grants − forfeits − usage drawn = Σ ledger, per account and per tenant"),
    );
    checks.add(
        "Redis equals PostgreSQL",
        redis_fail,
        format!("{accounts_checked} accounts: hot balance = ledger balance, nothing held, cap usage = usage recorded"),
    );
    checks.add(
        "CheckBalances on every replica",
        check_rpc_fail,
        format!("{} tenants × {} replicas report no drift", records.tenants.len(), args.addr.len()),
    );
    checks.add(
        "every hold resolved once",
        hold_fail,
        "no active or committing hold in Redis (zsets and hold hashes)".into(),
    );
    checks.add(
        "hold tombstones agree with the clients",
        tomb_fail,
        format!("{n_holds} granted reservations: Redis's final state matches what the client saw (absent only after Redis was emptied or rolled back)"),
    );
    let mut replay_fail = Vec::new();
    let mut replay_excused = 0u64;
    for r in &records.replays {
        if r.same {
            continue;
        }
        // Reserve and Release replays are answered from Redis only: a Redis
        // emptied in between forgets them (documented).
        if (r.rpc == "Reserve" || r.rpc == "Release") && redis_lost_between(r.first_at, r.replay_at) {
            replay_excused += 1;
            continue;
        }
        replay_fail.push(format!("{} {} key {}: {}", records.tenants[r.tenant].id, r.rpc, r.key, r.detail));
    }
    checks.add(
        "replays answered alike",
        replay_fail,
        format!(
            "{} replays of an idempotency key (Reserve, Commit, Release, Charge, CreateGrant, and a Commit key with another \
             payload refused){}",
            records.replays.len(),
            if replay_excused > 0 {
                format!("; {replay_excused} Reserve/Release replays crossed a Redis wipe and were not compared")
            } else {
                String::new()
            }
        ),
    );

    let ok = checks.0.iter().all(|c| c.ok);
    let mut faults_by_kind: BTreeMap<String, u64> = BTreeMap::new();
    for f in &faults {
        if !f.kind.ends_with("_end") && f.kind != "note" {
            *faults_by_kind.entry(f.kind.clone()).or_default() += 1;
        }
    }
    let report = json!({
        "label": args.label,
        "ok": ok,
        "run_id": records.run_id,
        "seed": records.seed,
        "replicas": records.addrs.len(),
        "workers": records.workers,
        "started_at": records.started_at,
        "traffic_started_at": records.traffic_started_at,
        "ended_at": records.ended_at,
        "traffic_seconds": (records.traffic_seconds * 10.0).round() / 10.0,
        "audit_seconds": (audit_started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
        "settled_after_seconds": settled_after,
        "tenants": records.tenants.iter().map(|t| json!({"id": t.id, "accounts": t.accounts.len()})).collect::<Vec<_>>(),
        "ops": records.stats.ops,
        "calls_ok": records.stats.calls,
        "errors": records.stats.errors,
        "denials": records.stats.denials,
        "abandoned": records.stats.abandoned,
        "retries": records.stats.retries,
        "recovered_by_retry": records.stats.recovered,
        "reserves_abandoned": records.reserves_abandoned,
        "latency_ms": records.stats.latency_ms,
        "holds": n_holds,
        "hold_outcomes": tomb_counts,
        "acknowledged_commits": acked_commits,
        "acknowledged_charges": acked_charges,
        "events": events_total,
        "events_of_abandoned_calls": events_unknown_outcome,
        "grants": records.grants.len(),
        "replays": records.replays.len(),
        "totals": totals,
        "faults_by_kind": faults_by_kind,
        "faults": faults.iter().map(|f| json!({"at": f.at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true), "kind": f.kind, "detail": f.detail})).collect::<Vec<_>>(),
        "checks": checks.0,
    });
    std::fs::create_dir_all(&args.out)?;
    std::fs::write(args.out.join("latest.json"), serde_json::to_string_pretty(&report)? + "\n")?;
    std::fs::write(args.out.join("latest.md"), markdown(&report))?;
    log(format!("audit: {} ({})", if ok { "all invariants hold" } else { "INVARIANTS FAILED" }, args.out.display()));
    Ok(ok)
}

fn markdown(r: &Value) -> String {
    let mut s = String::new();
    let u = |v: &Value| v.as_u64().unwrap_or(0);
    let map_rows = |v: &Value| -> Vec<(String, u64)> {
        v.as_object().map(|m| m.iter().map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0))).collect()).unwrap_or_default()
    };
    s.push_str("# Soak test: latest run\n\n");
    s.push_str(&format!(
        "Result: **{}**. Written by `scripts/soak.sh` ({}); seed {}, run {}.\n\n",
        if r["ok"].as_bool() == Some(true) { "all invariants hold" } else { "INVARIANTS FAILED" },
        r["label"].as_str().unwrap_or(""),
        r["seed"],
        r["run_id"].as_str().unwrap_or("")
    ));
    let ops: u64 = map_rows(&r["ops"]).iter().map(|(_, n)| n).sum();
    let calls: u64 = map_rows(&r["calls_ok"]).iter().map(|(_, n)| n).sum();
    let traffic = r["traffic_seconds"].as_f64().unwrap_or(0.0);
    s.push_str(&format!(
        "- Traffic: {traffic:.0} s ({} to {}), {} replicas, {} closed-loop workers and one admin worker, {} tenants\n",
        r["traffic_started_at"].as_str().unwrap_or(""),
        r["ended_at"].as_str().unwrap_or(""),
        r["replicas"],
        r["workers"],
        r["tenants"].as_array().map(|a| a.len()).unwrap_or(0)
    ));
    s.push_str(&format!(
        "- {ops} scenarios, {calls} calls answered OK ({:.0}/s); {} retries, {} calls recovered by a retry, {} abandoned\n",
        if traffic > 0.0 { calls as f64 / traffic } else { 0.0 },
        u(&r["retries"]),
        u(&r["recovered_by_retry"]),
        map_rows(&r["abandoned"]).iter().map(|(_, n)| n).sum::<u64>(),
    ));
    s.push_str(&format!(
        "- {} granted reservations, {} acknowledged commits, {} acknowledged charges, {} usage events, {} grants, {} replays\n",
        u(&r["holds"]),
        u(&r["acknowledged_commits"]),
        u(&r["acknowledged_charges"]),
        u(&r["events"]),
        u(&r["grants"]),
        u(&r["replays"]),
    ));
    s.push_str(&format!(
        "- Settled {} s after the traffic (audit {} s in all)\n\n",
        r["settled_after_seconds"].as_f64().map(|v| format!("{v:.1}")).unwrap_or_else(|| "-".into()),
        r["audit_seconds"]
    ));
    s.push_str("## Invariants\n\n| check | result | what |\n|---|---|---|\n");
    for c in r["checks"].as_array().into_iter().flatten() {
        s.push_str(&format!(
            "| {} | {} | {} |\n",
            c["name"].as_str().unwrap_or(""),
            if c["ok"].as_bool() == Some(true) { "pass" } else { "**FAIL**" },
            c["detail"].as_str().unwrap_or("").replace('|', "\\|")
        ));
    }
    let failures: Vec<&Value> = r["checks"].as_array().into_iter().flatten().filter(|c| c["ok"] != true).collect();
    if !failures.is_empty() {
        s.push_str("\nFailures (first examples):\n\n");
        for c in failures {
            for e in c["examples"].as_array().into_iter().flatten() {
                s.push_str(&format!("- {}: {}\n", c["name"].as_str().unwrap_or(""), e.as_str().unwrap_or("")));
            }
        }
    }
    s.push_str("\n## Faults\n\n| kind | count |\n|---|---:|\n");
    for (k, n) in map_rows(&r["faults_by_kind"]) {
        s.push_str(&format!("| {k} | {n} |\n"));
    }
    s.push_str("\n<details><summary>Fault log</summary>\n\n| time (UTC) | event | detail |\n|---|---|---|\n");
    for f in r["faults"].as_array().into_iter().flatten() {
        s.push_str(&format!(
            "| {} | {} | {} |\n",
            f["at"].as_str().unwrap_or(""),
            f["kind"].as_str().unwrap_or(""),
            f["detail"].as_str().unwrap_or("")
        ));
    }
    s.push_str("\n</details>\n\n## Operations\n\n| scenario | completed |\n|---|---:|\n");
    for (k, n) in map_rows(&r["ops"]) {
        s.push_str(&format!("| {k} | {n} |\n"));
    }
    s.push_str("\n| RPC | OK answers | p50 ms | p99 ms | max ms |\n|---|---:|---:|---:|---:|\n");
    for (k, n) in map_rows(&r["calls_ok"]) {
        let l = &r["latency_ms"][&k];
        s.push_str(&format!("| {k} | {n} | {} | {} | {} |\n", l["p50"], l["p99"], l["max"]));
    }
    s.push_str("\nLatencies include retries (a call retried through a fault counts once, with its whole wait).\n");
    s.push_str("\n## Errors (every attempt) and denials\n\n| RPC code reason | count |\n|---|---:|\n");
    for (k, n) in map_rows(&r["errors"]) {
        s.push_str(&format!("| {k} | {n} |\n"));
    }
    for (k, n) in map_rows(&r["denials"]) {
        s.push_str(&format!("| denial: {k} | {n} |\n"));
    }
    s.push_str(
        "\n## Granted reservations: client's outcome → Redis's final state\n\n| outcome | count |\n|---|---:|\n",
    );
    for (k, n) in map_rows(&r["hold_outcomes"]) {
        s.push_str(&format!("| {k} | {n} |\n"));
    }
    s.push_str("\n## Money per tenant\n\n| tenant | Σ grants | Σ usage | Σ balances | Σ acknowledged usage | events |\n|---|---:|---:|---:|---:|---:|\n");
    for t in r["totals"].as_array().into_iter().flatten() {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            t["tenant"].as_str().unwrap_or(""),
            t["grants"].as_str().unwrap_or(""),
            t["usage"].as_str().unwrap_or(""),
            t["balances"].as_str().unwrap_or(""),
            t["acknowledged_usage"].as_str().unwrap_or(""),
            t["events"]
        ));
    }
    s
}
