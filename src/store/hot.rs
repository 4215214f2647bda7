//! `HotStore`: balances, caps, holds and idempotency records in Redis.
//!
//! Every mutation is one Lua script (in `src/lua/`), atomic across all keys
//! of one tenant. This module owns the calls and the parsing of their
//! replies; it knows nothing of gRPC or PostgreSQL.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use chrono::{DateTime, TimeZone, Utc};
use redis::{AsyncCommands, Script};

use super::{
    alerts::StreamedAlert,
    keys::TenantKeys,
    link::{self, Handle, Single, Target},
};
use crate::{
    decision::{Denial, DenialReason, HoldState},
    domain::{Credits, limit::CommitLimit},
};

const PRELUDE: &str = include_str!("../lua/prelude.lua");

/// A script: its `EVALSHA` is written straight into one command buffer (no
/// intermediate argument vectors), and loaded on NOSCRIPT like
/// `redis::Script` does. `HotStore::eval` appends the caller's identity of
/// the Redis process as the last argument (see prelude.lua).
struct Lua {
    hash: String,
    code: String,
}

impl Lua {
    fn new(body: &str) -> Self {
        let code = format!("{PRELUDE}\n{body}");
        Lua { hash: Script::new(&code).get_hash().to_string(), code }
    }

    /// `EVALSHA <hash> <nkeys>`; the caller adds keys, then arguments.
    fn call(&self, nkeys: usize) -> redis::Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(&self.hash).arg(nkeys);
        cmd
    }
}

/// The compiled scripts. Each is the shared prelude followed by its body.
struct Scripts {
    reserve: Lua,
    commit: Lua,
    settle: Lua,
    release: Lua,
    extend: Lua,
    reap: Lua,
    balance: Lua,
    apply: Lua,
    account: Lua,
    period: Lua,
    reconcile: Lua,
    repair: Lua,
    fence: Lua,
}

impl Scripts {
    fn load() -> Self {
        Scripts {
            reserve: Lua::new(include_str!("../lua/reserve.lua")),
            commit: Lua::new(include_str!("../lua/commit.lua")),
            settle: Lua::new(include_str!("../lua/settle.lua")),
            release: Lua::new(include_str!("../lua/release.lua")),
            extend: Lua::new(include_str!("../lua/extend.lua")),
            reap: Lua::new(include_str!("../lua/reap.lua")),
            balance: Lua::new(include_str!("../lua/balance.lua")),
            apply: Lua::new(include_str!("../lua/apply.lua")),
            account: Lua::new(include_str!("../lua/account.lua")),
            period: Lua::new(include_str!("../lua/period.lua")),
            reconcile: Lua::new(include_str!("../lua/reconcile.lua")),
            repair: Lua::new(include_str!("../lua/repair.lua")),
            fence: Lua::new(include_str!("../lua/fence.lua")),
        }
    }
}

/// Lifetimes of the records the scripts keep.
#[derive(Clone, Debug)]
pub struct HotTimings {
    /// How long replays of an idempotency key are answered from Redis.
    pub idempotency_ttl: Duration,
    /// How long a settled hold is kept so late calls learn its state.
    pub tombstone_ttl: Duration,
    /// How long a commit may take to become durable in PostgreSQL before
    /// the reaper looks it up there and finalizes or reverts it.
    pub commit_deadline: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum HotError {
    #[error(
        "the tenant's hot state is not loaded (Redis was emptied, or it was behind PostgreSQL); a rebuild is under way"
    )]
    NotLoaded,
    #[error("this Redis process has not been checked against PostgreSQL yet (it restarted, was restored or took over)")]
    Unverified,
    #[error("account not found")]
    AccountNotFound,
    #[error("the account tree is deeper than allowed")]
    TooDeep,
    #[error("an ancestor account is missing from Redis")]
    Broken,
    #[error("the idempotency key was used with a different payload")]
    KeyReused,
    #[error("reservation not found")]
    NoHold,
    #[error("reservation is {0:?}")]
    HoldState(HoldState),
    /// The commit's cost is above the tenant's bound (which is given).
    #[error("the cost is above the commit limit {0}")]
    OverLimit(Credits),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("unexpected reply from a Redis script: {0}")]
    Protocol(String),
}

impl HotError {
    /// Whether retrying later may succeed (drives UNAVAILABLE vs INTERNAL).
    pub fn is_transient(&self) -> bool {
        match self {
            HotError::NotLoaded | HotError::Unverified | HotError::Broken => true,
            HotError::Redis(e) => link::is_transient(e),
            _ => false,
        }
    }
}

pub type HotResult<T> = Result<T, HotError>;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReserveOutcome {
    Granted { hold_id: String, amount: Credits, expires_at: DateTime<Utc>, available: Credits },
    Denied(Denial),
}

#[derive(Clone, Debug)]
pub struct Reserved {
    pub outcome: ReserveOutcome,
    pub replayed: bool,
}

/// A commit or charge applied to the hot state, waiting to become durable.
#[derive(Clone, Debug)]
pub struct Prepared {
    pub hold_id: String,
    pub event_id: String,
    pub subject: String,
    pub cost: Credits,
    pub released: Credits,
    pub overdraft: Credits,
    /// Accounts of the draw chain and what was charged to each.
    pub charges: Vec<(String, Credits)>,
    pub labels: BTreeMap<String, String>,
    pub recorded_at: DateTime<Utc>,
    pub available: Credits,
    pub held: Credits,
    /// Where the charge stands in the tenant's fence: PostgreSQL confirms
    /// it with the usage event.
    pub fence: Fenced,
    pub replayed: bool,
}

/// A change to the hot state that PostgreSQL must confirm
/// (`PgStore::confirm_fence`): the tenant's fence generation, its position
/// after the change, and the Redis process that made it. A confirmation is
/// refused when PostgreSQL's fence names another generation or process:
/// the change happened on a state no longer trusted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fenced {
    pub generation: String,
    pub position: i64,
    pub process: String,
}

/// What `fence.lua verify` found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The state holds every change PostgreSQL confirmed; it is trusted
    /// by this process from now on.
    Current,
    /// Another process answers now (a reconnection in between): check again.
    Moved,
    /// No hot state: rebuild.
    NotLoaded,
    /// Another generation, or an older position: the state is behind.
    Behind { generation: String, position: i64 },
}

/// One tenant's fence as Redis holds it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FenceView {
    /// '' when the tenant is not loaded.
    pub generation: String,
    pub position: i64,
    /// The process that verified it ('' if none).
    pub verified_by: String,
}

#[derive(Clone, Debug)]
pub struct Released {
    pub amount: Credits,
    pub available: Credits,
    pub replayed: bool,
}

#[derive(Clone, Debug)]
pub enum ExtendOutcome {
    Granted { amount: Credits, expires_at: DateTime<Utc>, available: Credits },
    Denied { denial: Denial, amount: Credits, expires_at: DateTime<Utc> },
}

#[derive(Clone, Debug)]
pub struct Extended {
    pub outcome: ExtendOutcome,
    pub replayed: bool,
}

/// One account of a chain, as Redis holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LevelView {
    pub account_id: String,
    pub balance: Credits,
    pub held: Credits,
    pub pool_access: bool,
    pub cap: Option<Credits>,
    pub used: Credits,
    pub used_held: Credits,
    pub suspended: bool,
    /// `None`: the period never ends.
    pub period_end: Option<DateTime<Utc>>,
}

#[derive(Clone, Debug)]
pub struct BalanceView {
    pub available: Credits,
    pub draw_len: usize,
    pub levels: Vec<LevelView>,
}

/// Hot settings of one account, written by admin calls and rebuilds.
#[derive(Clone, Debug)]
pub struct AccountSettings {
    pub parent_id: Option<String>,
    pub pool_access: bool,
    pub cap: Option<Credits>,
    pub suspended: bool,
    /// `None`: the period never ends (a finished trial).
    pub period_end: Option<DateTime<Utc>>,
    /// When a recurring allowance of the account next renews.
    pub renews_at: Option<DateTime<Utc>>,
    /// Alert thresholds in their Redis form ("p25,p15,a5000000").
    pub alert_thresholds: String,
    pub rearm_on_topup: bool,
}

/// Counters of one account, written only by a rebuild.
#[derive(Clone, Debug, Default)]
pub struct AccountCounters {
    pub balance: Credits,
    pub used: Credits,
    /// The period's credits (for percent alerts).
    pub period_credits: Credits,
    /// Alert thresholds already fired this period ("p25,p15").
    pub fired: String,
}

/// Counters of one account read by the reconciler.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HotCounters {
    pub balance: Credits,
    pub used: Credits,
    pub period_credits: Credits,
}

/// What `reconcile_read` saw at one instant.
#[derive(Clone, Debug)]
pub struct HotCut {
    /// '' when the tenant is not loaded.
    pub epoch: String,
    /// Holds committing: id, and what each account of its draw chain was charged.
    pub committing: Vec<(String, Vec<(String, Credits)>)>,
    /// Per account asked, in order; `None` when Redis has no such account.
    pub counters: Vec<Option<HotCounters>>,
    /// Per ledger row asked, in order: its marker exists.
    pub applied: Vec<bool>,
}

/// The result of one reaper pass over a tenant.
#[derive(Clone, Debug, Default)]
pub struct ReapPass {
    pub expired: u64,
    pub overdue_commits: Vec<String>,
}

struct LazyCluster {
    client: redis::cluster::ClusterClient,
    conn: tokio::sync::OnceCell<redis::cluster_async::ClusterConnection>,
}

/// One Redis (direct or through Sentinel), or a Redis Cluster. Every call
/// of one tenant touches keys of one hash slot, so scripts and pipelines
/// work unchanged on a cluster.
#[derive(Clone)]
enum Redis {
    Single(Arc<Single>),
    /// Connected on first use (creditd starts while the cluster is down),
    /// then kept: the cluster connection reconnects by itself.
    Cluster(Arc<LazyCluster>),
}

#[derive(Clone)]
pub struct HotStore {
    redis: Redis,
    scripts: Arc<Scripts>,
    base: String,
    max_depth: u32,
    timings: HotTimings,
    /// Holds to finalize (tenant, hold id), see `finalize_later`.
    finalizer: tokio::sync::mpsc::UnboundedSender<(String, String)>,
}

/// Request of a Reserve or Authorize.
pub struct ReserveCall<'a> {
    pub subject: &'a str,
    pub amount: Credits,
    pub ttl: Duration,
    pub idempotency_key: Option<&'a str>,
    pub payload_hash: &'a str,
    pub labels_json: &'a str,
    /// Price version to pin for the commit ("" when not rated).
    pub price_version: &'a str,
}

impl HotStore {
    /// Connects to one Redis (`url`), with `sentinel_master` to the primary
    /// the sentinels `url` lists (comma-separated) name so, or with
    /// `cluster` to a Redis Cluster (`url` lists seed nodes).
    #[allow(clippy::too_many_arguments)]
    pub async fn connect(
        url: &str,
        cluster: bool,
        sentinel_master: &str,
        base: String,
        max_depth: u32,
        timings: HotTimings,
        timeout: Duration,
    ) -> HotResult<Self> {
        let urls: Vec<&str> = url.split(',').map(str::trim).filter(|n| !n.is_empty()).collect();
        let redis = if cluster {
            let client = redis::cluster::ClusterClientBuilder::new(urls)
                .connection_timeout(timeout)
                .response_timeout(timeout)
                .retries(2)
                .build()?;
            Redis::Cluster(Arc::new(LazyCluster { client, conn: tokio::sync::OnceCell::new() }))
        } else if !sentinel_master.is_empty() {
            let sentinels = urls.iter().map(|u| redis::Client::open(*u)).collect::<Result<Vec<_>, _>>()?;
            let template = redis::IntoConnectionInfo::into_connection_info(urls.first().copied().unwrap_or_default())?;
            let single =
                Single::new(Target::Sentinel { sentinels, master: sentinel_master.to_string(), template }, timeout);
            Redis::Single(Arc::new(single))
        } else {
            Redis::Single(Arc::new(Single::new(Target::Direct(redis::Client::open(url)?), timeout)))
        };
        let (finalizer, queue) = tokio::sync::mpsc::unbounded_channel();
        let store = HotStore { redis, scripts: Arc::new(Scripts::load()), base, max_depth, timings, finalizer };
        // The worker's own copy must not keep the queue open.
        let (closed, _) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(run_finalizer(HotStore { finalizer: closed, ..store.clone() }, queue));
        Ok(store)
    }

    /// A connection for one call: the open link (opening one if needed),
    /// or the cluster connection.
    async fn conn(&self) -> HotResult<Handle> {
        match &self.redis {
            Redis::Single(single) => Ok(Handle::Link(single.link().await?, single.clone())),
            Redis::Cluster(c) => {
                let conn = c.conn.get_or_try_init(|| c.client.get_async_connection()).await?;
                Ok(Handle::Cluster(conn.clone()))
            }
        }
    }

    /// Runs a script's `EVALSHA` with the identity of the process the
    /// connection reached as its last argument, loading the script first
    /// if Redis does not have it (a restart, a new node).
    async fn eval(&self, script: &Lua, mut cmd: redis::Cmd) -> HotResult<Vec<String>> {
        let mut conn = self.conn().await?;
        cmd.arg(conn.identity());
        match cmd.query_async(&mut conn).await {
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                let _: String = redis::cmd("SCRIPT").arg("LOAD").arg(&script.code).query_async(&mut conn).await?;
                Ok(cmd.query_async(&mut conn).await?)
            }
            reply => Ok(reply?),
        }
    }

    pub fn keys(&self, tenant: &str) -> TenantKeys {
        TenantKeys::new(&self.base, tenant)
    }

    pub fn timings(&self) -> &HotTimings {
        &self.timings
    }

    /// Checks Redis answers, and that the process behind the open link is
    /// still the primary it was when the link opened (same run id and
    /// replication id): otherwise the link is dropped and the next call
    /// opens a new one, whose scripts then find every tenant unverified.
    pub async fn ping(&self) -> HotResult<()> {
        let mut conn = self.conn().await?;
        let _: String = redis::cmd("PING").query_async(&mut conn).await?;
        if let (Handle::Link(link, single), Redis::Single(_)) = (&conn, &self.redis) {
            let mut c = link.conn.clone();
            match link::handshake(&mut c).await {
                Ok(identity) if *identity == *link.identity => {}
                Ok(identity) => {
                    tracing::warn!(was = %link.identity, now = %identity, "the Redis process behind the connection changed; reconnecting");
                    single.reset();
                }
                Err(e) => {
                    single.reset();
                    return Err(e.into());
                }
            }
        }
        Ok(())
    }

    /// Reserve (with an idempotency key) or Authorize (without).
    pub async fn reserve(&self, tenant: &str, call: &ReserveCall<'_>) -> HotResult<Reserved> {
        let keys = self.keys(tenant);
        let hold_id = uuid::Uuid::now_v7().to_string();
        let (mode, idem) = match call.idempotency_key {
            Some(key) => ("reserve", keys.idempotency('r', key)),
            None => ("authorize", keys.idempotency('r', "")),
        };
        let mut cmd = self.scripts.reserve.call(5);
        cmd.arg(keys.fence())
            .arg(keys.account(call.subject))
            .arg(keys.holds())
            .arg(idem)
            .arg(keys.hold(&hold_id))
            .arg(keys.prefix())
            .arg(call.amount.micros())
            .arg(millis(call.ttl))
            .arg(call.payload_hash)
            .arg(&hold_id)
            .arg(millis(self.timings.idempotency_ttl))
            .arg(mode)
            .arg(call.labels_json)
            .arg(self.max_depth)
            .arg(call.price_version);
        let reply = self.eval(&self.scripts.reserve, cmd).await?;
        let r = Reply::new(&reply);
        match r.head()? {
            "granted" => Ok(Reserved {
                replayed: r.flag(1)?,
                outcome: ReserveOutcome::Granted {
                    hold_id: r.text(2)?.to_string(),
                    amount: r.credits(3)?,
                    expires_at: r.time(4)?,
                    available: r.credits(5)?.max(Credits::ZERO),
                },
            }),
            "denied" => Ok(Reserved { replayed: r.flag(1)?, outcome: ReserveOutcome::Denied(r.denial(2)?) }),
            other => Err(r.failure(other)),
        }
    }

    /// The price version a hold pinned ("" or `None`: none, or no hold).
    pub async fn price_version(&self, tenant: &str, hold_id: &str) -> HotResult<Option<String>> {
        let pv: Option<String> = self.conn().await?.hget(self.keys(tenant).hold(hold_id), "pv").await?;
        Ok(pv.filter(|v| !v.is_empty()))
    }

    /// The prepare step of Commit (hold given) or Charge (subject given).
    pub async fn commit(&self, tenant: &str, call: &CommitCall<'_>) -> HotResult<Prepared> {
        let keys = self.keys(tenant);
        let (hold_id, idem, charge) = match call.target {
            CommitTarget::Hold(hold_id) => (hold_id.to_string(), keys.idempotency('c', call.idempotency_key), None),
            // A charge's hold carries its event's id.
            CommitTarget::Charge { subject, labels_json } => {
                (call.event_id.to_string(), keys.idempotency('g', call.idempotency_key), Some((subject, labels_json)))
            }
        };
        let mut cmd = self.scripts.commit.call(5);
        cmd.arg(keys.fence())
            .arg(keys.hold(&hold_id))
            .arg(keys.holds())
            .arg(idem.as_str())
            .arg(keys.committing())
            .arg(keys.prefix())
            .arg(call.cost.micros())
            .arg(call.payload_hash)
            .arg(millis(self.timings.idempotency_ttl))
            .arg(millis(self.timings.commit_deadline))
            .arg(call.event_id)
            .arg(call.idempotency_key)
            .arg(self.max_depth)
            .arg(call.limit.hold_multiple)
            .arg(call.limit.allowance.micros())
            .arg(call.limit.charge_max.map(|c| c.micros().to_string()).unwrap_or_default());
        if let Some((subject, labels_json)) = charge {
            cmd.arg("charge").arg(subject).arg(labels_json);
        }
        let reply = self.eval(&self.scripts.commit, cmd).await?;
        let r = Reply::new(&reply);
        match r.head()? {
            "prepared" => {
                let ids = split_csv(r.text(8)?);
                let amounts = split_csv(r.text(9)?);
                if ids.len() != amounts.len() {
                    return Err(HotError::Protocol("charges do not match the draw chain".into()));
                }
                let charges = ids
                    .into_iter()
                    .zip(amounts)
                    .map(|(id, amount)| Ok((id.to_string(), parse_micros(amount)?)))
                    .collect::<HotResult<Vec<_>>>()?;
                Ok(Prepared {
                    replayed: r.flag(1)?,
                    hold_id: r.text(2)?.to_string(),
                    event_id: r.text(3)?.to_string(),
                    subject: r.text(4)?.to_string(),
                    cost: r.credits(5)?,
                    released: r.credits(6)?,
                    overdraft: r.credits(7)?,
                    charges,
                    labels: parse_labels(r.text(10)?)?,
                    recorded_at: r.time(11)?,
                    available: r.credits(12)?.max(Credits::ZERO),
                    held: r.credits(13)?,
                    fence: r.fenced(14)?,
                })
            }
            other => Err(r.failure(other)),
        }
    }

    /// Marks a committing hold committed (its event is durable).
    pub async fn finalize(&self, tenant: &str, hold_id: &str) -> HotResult<()> {
        self.finalize_many(tenant, &[hold_id]).await.map(|_| ())
    }

    /// Marks committing holds of one tenant committed, in one script call.
    /// Returns how many were still committing.
    pub async fn finalize_many(&self, tenant: &str, hold_ids: &[&str]) -> HotResult<u64> {
        let keys = self.keys(tenant);
        let mut cmd = self.scripts.settle.call(1 + hold_ids.len());
        cmd.arg(keys.committing());
        for hold_id in hold_ids {
            cmd.arg(keys.hold(hold_id));
        }
        cmd.arg(keys.prefix()).arg("finalize").arg(millis(self.timings.tombstone_ttl)).arg("0");
        let reply = self.eval(&self.scripts.settle, cmd).await?;
        let r = Reply::new(&reply);
        match r.head()? {
            "ok" => r.text(1)?.parse().map_err(|_| HotError::Protocol(format!("finalize count {:?}", r.text(1)))),
            other => Err(r.failure(other)),
        }
    }

    /// Finalizes a hold soon, without waiting: holds queued together are
    /// finalized with one script call per tenant. Whatever is lost (a
    /// crash, Redis unreachable) the reaper finalizes after the deadline.
    pub fn finalize_later(&self, tenant: &str, hold_id: String) {
        if self.finalizer.send((tenant.to_string(), hold_id)).is_err() {
            tracing::debug!("finalizer stopped; the reaper will finalize");
        }
    }

    /// Undoes a committing hold whose event never reached PostgreSQL, if its
    /// deadline passed. Returns whether it was reverted.
    pub async fn revert_overdue(&self, tenant: &str, hold_id: &str) -> HotResult<bool> {
        self.revert(tenant, hold_id, true).await
    }

    /// Undoes a committing hold at once (its charge turned out to be a
    /// duplicate of a stored event).
    pub async fn revert_now(&self, tenant: &str, hold_id: &str) -> HotResult<bool> {
        self.revert(tenant, hold_id, false).await
    }

    async fn revert(&self, tenant: &str, hold_id: &str, only_overdue: bool) -> HotResult<bool> {
        let keys = self.keys(tenant);
        let mut cmd = self.scripts.settle.call(2);
        cmd.arg(keys.committing())
            .arg(keys.hold(hold_id))
            .arg(keys.prefix())
            .arg("revert")
            .arg(millis(self.timings.tombstone_ttl))
            .arg(if only_overdue { "1" } else { "0" });
        let reply = self.eval(&self.scripts.settle, cmd).await?;
        let r = Reply::new(&reply);
        match r.head()? {
            "ok" => Ok(true),
            "skip" | "early" => Ok(false),
            other => Err(r.failure(other)),
        }
    }

    pub async fn release(
        &self,
        tenant: &str,
        hold_id: &str,
        idem_key: &str,
        payload_hash: &str,
    ) -> HotResult<Released> {
        let keys = self.keys(tenant);
        let mut cmd = self.scripts.release.call(4);
        cmd.arg(keys.fence())
            .arg(keys.hold(hold_id))
            .arg(keys.holds())
            .arg(keys.idempotency('l', idem_key))
            .arg(keys.prefix())
            .arg(payload_hash)
            .arg(millis(self.timings.idempotency_ttl))
            .arg(millis(self.timings.tombstone_ttl))
            .arg(self.max_depth);
        let reply = self.eval(&self.scripts.release, cmd).await?;
        let r = Reply::new(&reply);
        match r.head()? {
            "released" => Ok(Released {
                replayed: r.flag(1)?,
                amount: r.credits(2)?,
                available: r.credits(3)?.max(Credits::ZERO),
            }),
            other => Err(r.failure(other)),
        }
    }

    pub async fn extend(&self, tenant: &str, call: &ExtendCall<'_>) -> HotResult<Extended> {
        let keys = self.keys(tenant);
        let mut cmd = self.scripts.extend.call(4);
        cmd.arg(keys.fence())
            .arg(keys.hold(call.hold_id))
            .arg(keys.holds())
            .arg(keys.idempotency('x', call.idempotency_key))
            .arg(keys.prefix())
            .arg(call.more.micros())
            .arg(millis(call.ttl))
            .arg(call.payload_hash)
            .arg(millis(self.timings.idempotency_ttl))
            .arg(self.max_depth);
        let reply = self.eval(&self.scripts.extend, cmd).await?;
        let r = Reply::new(&reply);
        match r.head()? {
            "granted" => Ok(Extended {
                replayed: r.flag(1)?,
                outcome: ExtendOutcome::Granted {
                    amount: r.credits(2)?,
                    expires_at: r.time(3)?,
                    available: r.credits(4)?.max(Credits::ZERO),
                },
            }),
            "denied" => Ok(Extended {
                replayed: r.flag(1)?,
                outcome: ExtendOutcome::Denied { denial: r.denial(2)?, amount: r.credits(6)?, expires_at: r.time(7)? },
            }),
            other => Err(r.failure(other)),
        }
    }

    pub async fn balance(&self, tenant: &str, subject: &str) -> HotResult<BalanceView> {
        let keys = self.keys(tenant);
        let mut cmd = self.scripts.balance.call(2);
        cmd.arg(keys.fence()).arg(keys.account(subject)).arg(keys.prefix()).arg(self.max_depth);
        let reply = self.eval(&self.scripts.balance, cmd).await?;
        let r = Reply::new(&reply);
        match r.head()? {
            "ok" => {
                let available = r.credits(1)?.max(Credits::ZERO);
                let draw_len = r.text(2)?.parse::<usize>().map_err(|_| HotError::Protocol("draw length".into()))?;
                let mut levels = Vec::new();
                let mut i = 3;
                while i + 9 <= reply.len() {
                    let cap = r.text(i + 4)?;
                    levels.push(LevelView {
                        account_id: r.text(i)?.to_string(),
                        balance: r.credits(i + 1)?,
                        held: r.credits(i + 2)?,
                        pool_access: r.text(i + 3)? == "1",
                        cap: if cap.is_empty() { None } else { Some(parse_micros(cap)?) },
                        used: r.credits(i + 5)?,
                        used_held: r.credits(i + 6)?,
                        suspended: r.text(i + 7)? == "1",
                        period_end: Some(r.time(i + 8)?).filter(|t| t.timestamp_millis() > 0),
                    });
                    i += 9;
                }
                Ok(BalanceView { available, draw_len, levels })
            }
            other => Err(r.failure(other)),
        }
    }

    /// Applies one ledger row's delta to an account's balance, once.
    /// Returns false when it had been applied before, and where the fence
    /// stands (for PostgreSQL to confirm before the row counts as applied).
    pub async fn apply_ledger(
        &self,
        tenant: &str,
        account: &str,
        entry_id: i64,
        delta: Credits,
    ) -> HotResult<(bool, Fenced)> {
        let keys = self.keys(tenant);
        let mut cmd = self.scripts.apply.call(3);
        cmd.arg(keys.fence())
            .arg(keys.account(account))
            .arg(keys.marker(entry_id))
            .arg(delta.micros())
            .arg(millis(self.timings.idempotency_ttl.max(Duration::from_secs(7 * 86_400))))
            .arg(keys.prefix())
            .arg(account);
        let reply = self.eval(&self.scripts.apply, cmd).await?;
        let r = Reply::new(&reply);
        match r.head()? {
            "applied" => Ok((true, r.fenced(2)?)),
            "duplicate" => Ok((false, r.fenced(2)?)),
            other => Err(r.failure(other)),
        }
    }

    /// Writes an account's settings (creating its counters at zero).
    pub async fn put_account(&self, tenant: &str, account: &str, settings: &AccountSettings) -> HotResult<Fenced> {
        let keys = self.keys(tenant);
        let mut cmd = self.scripts.account.call(2);
        cmd.arg(keys.fence())
            .arg(keys.account(account))
            .arg(settings.parent_id.as_deref().unwrap_or(""))
            .arg(if settings.pool_access { "1" } else { "0" })
            .arg(settings.cap.map(|c| c.micros().to_string()).unwrap_or_default())
            .arg(if settings.suspended { "1" } else { "0" })
            .arg(ms_or_zero(settings.period_end))
            .arg(ms_or_zero(settings.renews_at))
            .arg(&settings.alert_thresholds)
            .arg(if settings.rearm_on_topup { "1" } else { "0" });
        let reply = self.eval(&self.scripts.account, cmd).await?;
        let r = Reply::new(&reply);
        match r.head()? {
            "ok" => r.fenced(1),
            other => Err(r.failure(other)),
        }
    }

    /// A period boundary: cap usage restarts at `used`, the period end and
    /// allowance renewal move on. Returns false when Redis already had it,
    /// and where the fence stands.
    pub async fn new_period(
        &self,
        tenant: &str,
        account: &str,
        used: Credits,
        period_end: Option<DateTime<Utc>>,
        renews_at: Option<DateTime<Utc>>,
    ) -> HotResult<(bool, Fenced)> {
        let keys = self.keys(tenant);
        let mut cmd = self.scripts.period.call(2);
        cmd.arg(keys.fence())
            .arg(keys.account(account))
            .arg(used.micros())
            .arg(ms_or_zero(period_end))
            .arg(ms_or_zero(renews_at));
        let reply = self.eval(&self.scripts.period, cmd).await?;
        let r = Reply::new(&reply);
        match r.head()? {
            "ok" => Ok((true, r.fenced(1)?)),
            "stale" => Ok((false, r.fenced(1)?)),
            other => Err(r.failure(other)),
        }
    }

    /// The oldest alerts waiting in the tenant's stream.
    pub async fn pending_alerts(&self, tenant: &str, limit: usize) -> HotResult<Vec<StreamedAlert>> {
        let entries: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(self.keys(tenant).alerts())
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(limit)
            .query_async(&mut self.conn().await?)
            .await?;
        entries
            .ids
            .into_iter()
            .map(|entry| {
                let field = |name: &str| -> HotResult<String> {
                    entry.get::<String>(name).ok_or_else(|| HotError::Protocol(format!("alert without {name}")))
                };
                Ok(StreamedAlert {
                    stream_id: entry.id.clone(),
                    account_id: field("account")?,
                    token: field("threshold")?,
                    available: parse_micros(&field("available")?)?,
                    period_credits: parse_micros(&field("pc")?)?,
                    fired_at_ms: field("at")?.parse().map_err(|_| HotError::Protocol("alert time".into()))?,
                })
            })
            .collect()
    }

    /// Removes alerts the outbox has.
    pub async fn ack_alerts(&self, tenant: &str, ids: &[String]) -> HotResult<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let _: i64 =
            redis::cmd("XDEL").arg(self.keys(tenant).alerts()).arg(ids).query_async(&mut self.conn().await?).await?;
        Ok(())
    }

    pub async fn reap(&self, tenant: &str, limit: usize) -> HotResult<ReapPass> {
        let keys = self.keys(tenant);
        let mut cmd = self.scripts.reap.call(2);
        cmd.arg(keys.holds())
            .arg(keys.committing())
            .arg(keys.prefix())
            .arg(limit)
            .arg(millis(self.timings.tombstone_ttl));
        let reply = self.eval(&self.scripts.reap, cmd).await?;
        let expired =
            reply.first().and_then(|n| n.parse::<u64>().ok()).ok_or_else(|| HotError::Protocol("reap count".into()))?;
        Ok(ReapPass { expired, overdue_commits: reply[1..].to_vec() })
    }

    /// Reads, atomically, `accounts`' counters, the holds committing, and
    /// whether the ledger rows `markers` were applied (see reconcile.lua).
    /// `with_holds` false skips the committing holds (`HotCut::committing`
    /// is then empty).
    pub async fn reconcile_read(
        &self,
        tenant: &str,
        accounts: &[String],
        markers: &[i64],
        with_holds: bool,
    ) -> HotResult<HotCut> {
        let keys = self.keys(tenant);
        let mut cmd = self.scripts.reconcile.call(2);
        let n = i64::try_from(accounts.len()).map_err(|_| HotError::Protocol("too many accounts".into()))?;
        cmd.arg(keys.fence()).arg(keys.committing()).arg(keys.prefix()).arg(if with_holds { n } else { -n });
        for a in accounts {
            cmd.arg(a);
        }
        for m in markers {
            cmd.arg(*m);
        }
        let reply = self.eval(&self.scripts.reconcile, cmd).await?;
        let bad = || HotError::Protocol(format!("reconcile reply of {} fields", reply.len()));
        let mut fields = reply.iter().map(String::as_str);
        let epoch = fields.next().ok_or_else(bad)?.to_string();
        let holds: usize = fields.next().and_then(|n| n.parse().ok()).ok_or_else(bad)?;
        let mut committing = Vec::with_capacity(holds);
        for _ in 0..holds {
            let (id, dc, ch) = (fields.next(), fields.next(), fields.next());
            let (Some(id), Some(dc), Some(ch)) = (id, dc, ch) else { return Err(bad()) };
            let accounts = split_csv(dc);
            let charged = split_csv(ch);
            if accounts.len() != charged.len() {
                return Err(HotError::Protocol(format!(
                    "hold {id}: {} accounts, {} charges",
                    accounts.len(),
                    charged.len()
                )));
            }
            let charges = accounts
                .into_iter()
                .zip(charged)
                .map(|(a, c)| Ok((a.to_string(), parse_micros(c)?)))
                .collect::<HotResult<Vec<_>>>()?;
            committing.push((id.to_string(), charges));
        }
        let mut counters = Vec::with_capacity(accounts.len());
        for _ in accounts {
            let (b, u, pc) = (fields.next(), fields.next(), fields.next());
            let (Some(b), Some(u), Some(pc)) = (b, u, pc) else { return Err(bad()) };
            counters.push(if b.is_empty() {
                None
            } else {
                let or_zero = |s: &str| if s.is_empty() { Ok(Credits::ZERO) } else { parse_micros(s) };
                Some(HotCounters { balance: parse_micros(b)?, used: or_zero(u)?, period_credits: or_zero(pc)? })
            });
        }
        let applied = fields.by_ref().take(markers.len()).map(|m| m == "1").collect::<Vec<_>>();
        if applied.len() != markers.len() || fields.next().is_some() {
            return Err(bad());
        }
        Ok(HotCut { epoch, committing, counters, applied })
    }

    /// Moves an account's hot balance by `delta` if the fence generation
    /// and balance are still `generation` and `measured`; `None` when
    /// something moved.
    pub async fn repair_balance(
        &self,
        tenant: &str,
        generation: &str,
        account: &str,
        measured: Credits,
        delta: Credits,
    ) -> HotResult<Option<Fenced>> {
        let keys = self.keys(tenant);
        let mut cmd = self.scripts.repair.call(2);
        cmd.arg(keys.fence()).arg(keys.account(account)).arg(generation).arg(measured.micros()).arg(delta.micros());
        let reply = self.eval(&self.scripts.repair, cmd).await?;
        let r = Reply::new(&reply);
        match r.head()? {
            "repaired" => Ok(Some(r.fenced(2)?)),
            _ => Ok(None),
        }
    }

    /// Claims the tenant's reconciliation for `interval`: true for the one
    /// replica that gets it.
    pub async fn claim_reconcile(&self, tenant: &str, replica: &str, interval: Duration) -> HotResult<bool> {
        let claimed: Option<String> = redis::cmd("SET")
            .arg(self.keys(tenant).reconcile_claim())
            .arg(replica)
            .arg("NX")
            .arg("PX")
            .arg(millis(interval).max(1))
            .query_async(&mut self.conn().await?)
            .await?;
        Ok(claimed.is_some())
    }

    /// Number of active holds of the tenant.
    pub async fn active_holds(&self, tenant: &str) -> HotResult<u64> {
        Ok(self.conn().await?.zcard(self.keys(tenant).holds()).await?)
    }

    /// Whether the tenant's hot state is loaded (its fence names a
    /// generation); says nothing of whether it is current.
    pub async fn is_loaded(&self, tenant: &str) -> HotResult<bool> {
        let generation: Option<String> = self.conn().await?.hget(self.keys(tenant).fence(), "g").await?;
        Ok(generation.is_some_and(|g| !g.is_empty()))
    }

    /// Gives a new tenant an empty hot state, verified by this process,
    /// unless it has one already. Returns the fence generation and the
    /// process, for PostgreSQL's fence row.
    pub async fn init_tenant(&self, tenant: &str) -> HotResult<(String, String)> {
        let generation = uuid::Uuid::now_v7().to_string();
        let reply = self.fence_call(tenant, &["init", &generation]).await?;
        let r = Reply::new(&reply);
        match r.head()? {
            "ok" => Ok((r.text(1)?.to_string(), r.text(2)?.to_string())),
            other => Err(r.failure(other)),
        }
    }

    async fn fence_call(&self, tenant: &str, args: &[&str]) -> HotResult<Vec<String>> {
        let mut cmd = self.scripts.fence.call(1);
        cmd.arg(self.keys(tenant).fence());
        for a in args {
            cmd.arg(*a);
        }
        self.eval(&self.scripts.fence, cmd).await
    }

    /// The identity of the Redis process that answers for `tenant` now.
    pub async fn whoami(&self, tenant: &str) -> HotResult<String> {
        let reply = self.fence_call(tenant, &["whoami"]).await?;
        Reply::new(&reply).text(1).map(str::to_string)
    }

    /// Compares the tenant's state with PostgreSQL's fence (read after
    /// `process` was named there) and, when it is current, marks it
    /// verified by `process`.
    pub async fn verify(&self, tenant: &str, process: &str, generation: &str, position: i64) -> HotResult<Verdict> {
        let position = position.to_string();
        let reply = self.fence_call(tenant, &["verify", process, generation, &position]).await?;
        let r = Reply::new(&reply);
        match r.head()? {
            "ok" => Ok(Verdict::Current),
            "moved" => Ok(Verdict::Moved),
            "not_loaded" => Ok(Verdict::NotLoaded),
            "behind" => Ok(Verdict::Behind {
                generation: r.text(1)?.to_string(),
                position: r.text(2)?.parse().map_err(|_| HotError::Protocol("fence position".into()))?,
            }),
            other => Err(r.failure(other)),
        }
    }

    /// The fences of `tenants`, read in one pipeline, and the identity the
    /// scripts would compare them with ('' on a cluster).
    pub async fn fences(&self, tenants: &[String]) -> HotResult<(Vec<FenceView>, String)> {
        let mut conn = self.conn().await?;
        let mut out = Vec::with_capacity(tenants.len());
        for chunk in tenants.chunks(500) {
            let mut pipe = redis::pipe();
            for t in chunk {
                pipe.cmd("HMGET").arg(self.keys(t).fence()).arg("g").arg("n").arg("v");
            }
            // A cluster cannot pipeline across slots: one tenant at a time.
            let rows: Vec<(Option<String>, Option<String>, Option<String>)> = if matches!(conn, Handle::Cluster(_)) {
                {
                    let mut rows = Vec::with_capacity(chunk.len());
                    for t in chunk {
                        rows.push(
                            redis::cmd("HMGET")
                                .arg(self.keys(t).fence())
                                .arg("g")
                                .arg("n")
                                .arg("v")
                                .query_async(&mut conn)
                                .await?,
                        );
                    }
                    rows
                }
            } else {
                pipe.query_async(&mut conn).await?
            };
            for (g, n, v) in rows {
                out.push(FenceView {
                    generation: g.unwrap_or_default(),
                    position: n.as_deref().unwrap_or("0").parse().unwrap_or(0),
                    verified_by: v.unwrap_or_default(),
                });
            }
        }
        Ok((out, conn.identity().to_string()))
    }

    /// First step of a rebuild: marks the fence unloaded (every script then
    /// refuses to decide for the tenant) and removes every other key of the
    /// tenant: holds, idempotency records and counters of a state that was
    /// behind. When neither the fence nor a legacy `epoch` key nor any
    /// hold is there, the tenant has no key that matters (a new or emptied
    /// Redis: the fence is the first key a tenant gets and the last it
    /// loses), and the scan, which walks the whole keyspace, is skipped.
    /// Returns whether it scanned.
    pub async fn unload_tenant(&self, tenant: &str) -> HotResult<bool> {
        let keys = self.keys(tenant);
        let reply = self.fence_call(tenant, &["unload"]).await?;
        let r = Reply::new(&reply);
        let existed = match r.head()? {
            "ok" => r.text(1)? == "1",
            other => return Err(r.failure(other)),
        };
        let mut conn = self.conn().await?;
        if !existed {
            // No fence: the tenant has no key at all, unless a version
            // before fences wrote its state (an `epoch` key) or holds of a
            // state whose fence was lost are left: those would return
            // credits the rebuilt state never held. (One slot: the keys
            // share the tenant's hash tag.)
            let left: u64 = redis::cmd("EXISTS")
                .arg(format!("{}epoch", keys.prefix()))
                .arg(keys.holds())
                .arg(keys.committing())
                .query_async(&mut conn)
                .await?;
            if left == 0 {
                return Ok(false);
            }
        }
        let fence_key = keys.fence();
        // Drop whatever the tenant had (holds of a lost state, stale keys).
        let mut cursor: u64 = 0;
        loop {
            let mut scan = redis::cmd("SCAN");
            scan.arg(cursor).arg("MATCH").arg(keys.pattern()).arg("COUNT").arg(1000);
            let (next, batch): (u64, Vec<String>) = match &mut conn {
                Handle::Link(link, _) => scan.query_async(&mut link.conn).await?,
                // The tenant's keys all live on the node of its hash slot.
                Handle::Cluster(c) => {
                    use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
                    let route = Route::new(keys.slot(), SlotAddr::Master);
                    let value = c
                        .route_command(scan, RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route)))
                        .await?;
                    redis::from_redis_value(value).map_err(|e| HotError::Protocol(format!("SCAN reply: {e}")))?
                }
            };
            // One key per UNLINK: a cluster refuses a multi-key command
            // unless it can prove one slot, and a pipeline keeps it one trip.
            let batch: Vec<&String> = batch.iter().filter(|k| **k != fence_key).collect();
            if !batch.is_empty() {
                let mut pipe = redis::pipe();
                for key in batch {
                    pipe.cmd("UNLINK").arg(key).ignore();
                }
                let _: () = pipe.query_async(&mut conn).await?;
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
        Ok(true)
    }

    /// Last step of a rebuild: writes `accounts` (from a PostgreSQL
    /// snapshot taken after `unload_tenant`), marks the ledger rows in
    /// `markers` applied, and sets the fence (`generation`, position 0,
    /// verified by this process) last, so scripts see either no state or
    /// the whole of it. Returns the identity of the process written to;
    /// `process` is the one PostgreSQL's fence names: should another
    /// process answer now, the fence is not set and the rebuild fails.
    pub async fn load_tenant(
        &self,
        tenant: &str,
        generation: &str,
        process: &str,
        accounts: &[(String, AccountSettings, AccountCounters)],
        markers: &[i64],
    ) -> HotResult<()> {
        let keys = self.keys(tenant);
        let mut conn = self.conn().await?;
        for chunk in accounts.chunks(500) {
            let mut pipe = redis::pipe();
            for (id, settings, counters) in chunk {
                pipe.hset_multiple(
                    keys.account(id),
                    &[
                        ("p", settings.parent_id.clone().unwrap_or_default()),
                        ("pa", if settings.pool_access { "1" } else { "0" }.to_string()),
                        ("cap", settings.cap.map(|c| c.micros().to_string()).unwrap_or_default()),
                        ("s", if settings.suspended { "1" } else { "0" }.to_string()),
                        ("pe", ms_or_zero(settings.period_end).to_string()),
                        ("ra", ms_or_zero(settings.renews_at).to_string()),
                        ("th", settings.alert_thresholds.clone()),
                        ("rt", if settings.rearm_on_topup { "1" } else { "0" }.to_string()),
                        ("pc", counters.period_credits.micros().to_string()),
                        ("af", counters.fired.clone()),
                        ("b", counters.balance.micros().to_string()),
                        ("h", "0".to_string()),
                        ("u", counters.used.micros().to_string()),
                        ("uh", "0".to_string()),
                    ],
                )
                .ignore();
            }
            let _: () = pipe.query_async(&mut conn).await?;
        }
        let marker_ttl = millis(self.timings.idempotency_ttl.max(Duration::from_secs(7 * 86_400)));
        for chunk in markers.chunks(500) {
            let mut pipe = redis::pipe();
            for entry in chunk {
                pipe.cmd("SET").arg(keys.marker(*entry)).arg("1").arg("PX").arg(marker_ttl).ignore();
            }
            let _: () = pipe.query_async(&mut conn).await?;
        }
        let reply = self.fence_call(tenant, &["load", generation, process]).await?;
        let r = Reply::new(&reply);
        match r.head()? {
            "ok" => Ok(()),
            "moved" => Err(HotError::Unverified),
            other => Err(r.failure(other)),
        }
    }
}

pub enum CommitTarget<'a> {
    Hold(&'a str),
    Charge { subject: &'a str, labels_json: &'a str },
}

pub struct CommitCall<'a> {
    pub target: CommitTarget<'a>,
    pub cost: Credits,
    pub idempotency_key: &'a str,
    pub payload_hash: &'a str,
    pub event_id: &'a str,
    /// The tenant's bound on the cost (checked after the idempotency
    /// record, before any change).
    pub limit: CommitLimit,
}

pub struct ExtendCall<'a> {
    pub hold_id: &'a str,
    pub more: Credits,
    pub ttl: Duration,
    pub idempotency_key: &'a str,
    pub payload_hash: &'a str,
}

fn ms_or_zero(t: Option<DateTime<Utc>>) -> i64 {
    t.map_or(0, |t| t.timestamp_millis())
}

/// Takes whatever holds are queued, groups them by tenant and finalizes
/// each group with one script call (a call's keys all live in the tenant's
/// slot). Stops when every `HotStore` clone is gone.
async fn run_finalizer(store: HotStore, mut queue: tokio::sync::mpsc::UnboundedReceiver<(String, String)>) {
    const MAX_BATCH: usize = 256;
    let mut batch: Vec<(String, String)> = Vec::with_capacity(MAX_BATCH);
    loop {
        if queue.recv_many(&mut batch, MAX_BATCH).await == 0 {
            return;
        }
        batch.sort_unstable();
        for group in batch.chunk_by(|a, b| a.0 == b.0) {
            let holds: Vec<&str> = group.iter().map(|(_, h)| h.as_str()).collect();
            if let Err(e) = store.finalize_many(&group[0].0, &holds).await {
                tracing::debug!(error = %e, holds = holds.len(), "finalize deferred to the reaper");
            }
        }
        batch.clear();
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn split_csv(s: &str) -> Vec<&str> {
    s.split(',').filter(|p| !p.is_empty()).collect()
}

fn parse_micros(s: &str) -> HotResult<Credits> {
    s.parse::<i64>().map(Credits::from_micros).map_err(|_| HotError::Protocol(format!("not an integer amount: {s:?}")))
}

fn parse_labels(s: &str) -> HotResult<BTreeMap<String, String>> {
    if s.is_empty() {
        return Ok(BTreeMap::new());
    }
    serde_json::from_str(s).map_err(|e| HotError::Protocol(format!("labels: {e}")))
}

/// A script reply: a status word, then fields as strings.
struct Reply<'a>(&'a [String]);

impl<'a> Reply<'a> {
    fn new(v: &'a [String]) -> Self {
        Reply(v)
    }

    fn head(&self) -> HotResult<&'a str> {
        self.text(0)
    }

    fn text(&self, i: usize) -> HotResult<&'a str> {
        self.0.get(i).map(String::as_str).ok_or_else(|| HotError::Protocol(format!("reply too short: {:?}", self.0)))
    }

    fn flag(&self, i: usize) -> HotResult<bool> {
        Ok(self.text(i)? == "1")
    }

    fn credits(&self, i: usize) -> HotResult<Credits> {
        parse_micros(self.text(i)?)
    }

    fn time(&self, i: usize) -> HotResult<DateTime<Utc>> {
        let ms = self.text(i)?.parse::<i64>().map_err(|_| HotError::Protocol("time".into()))?;
        Utc.timestamp_millis_opt(ms).single().ok_or_else(|| HotError::Protocol("time out of range".into()))
    }

    /// reason, account, available, retry_after ms (0 = none) from index i.
    fn denial(&self, i: usize) -> HotResult<Denial> {
        let reason = DenialReason::parse(self.text(i)?)
            .ok_or_else(|| HotError::Protocol(format!("denial reason {:?}", self.0.get(i))))?;
        let retry_ms = self.text(i + 3)?.parse::<i64>().map_err(|_| HotError::Protocol("retry".into()))?;
        Ok(Denial {
            reason,
            account_id: self.text(i + 1)?.to_string(),
            available: self.credits(i + 2)?.max(Credits::ZERO),
            retry_after: if retry_ms > 0 { Utc.timestamp_millis_opt(retry_ms).single() } else { None },
        })
    }

    /// generation, position, process from index i.
    fn fenced(&self, i: usize) -> HotResult<Fenced> {
        Ok(Fenced {
            generation: self.text(i)?.to_string(),
            position: self.text(i + 1)?.parse().map_err(|_| HotError::Protocol("fence position".into()))?,
            process: self.text(i + 2)?.to_string(),
        })
    }

    fn failure(&self, head: &str) -> HotError {
        match head {
            "not_loaded" => HotError::NotLoaded,
            "unverified" => HotError::Unverified,
            "not_found" => HotError::AccountNotFound,
            "too_deep" => HotError::TooDeep,
            "broken" => HotError::Broken,
            "mismatch" => HotError::KeyReused,
            "no_hold" => HotError::NoHold,
            "over_limit" => match self.credits(1) {
                Ok(bound) => HotError::OverLimit(bound),
                Err(e) => e,
            },
            "state" => match self.0.get(1).and_then(|s| HoldState::parse(s)) {
                Some(state) => HotError::HoldState(state),
                None => HotError::Protocol(format!("hold state {:?}", self.0.get(1))),
            },
            other => HotError::Protocol(format!("status {other:?}")),
        }
    }
}
