//! Tooling of the fault tests (`faults.rs`): a loopback TCP proxy whose
//! behaviour a test switches while traffic flows, a private redis-server
//! that is killed when dropped, a watch on the replicas' gRPC health, a
//! client that retries with its idempotency keys, and the final audit.
//!
//! Everything here owns what it starts: the proxy's tasks end when it is
//! dropped, and the redis-server process is killed (SIGKILL) when its guard
//! is dropped, panics included. The process is also started with a parent
//! death signal (`setpriv --pdeathsig`, when available), so it does not
//! outlive a test binary that is itself killed.

#![allow(dead_code)]

use std::{
    net::{SocketAddr, TcpListener as StdListener},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use creditd::pb::{self, credit_service_client::CreditServiceClient};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        TcpListener, TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
    sync::watch,
    task::{JoinHandle, JoinSet},
};
use tonic::{Code, Status, transport::Channel};
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};
use tonic_types::StatusExt;

use crate::harness::{Intercepted, TENANT, TestApp, req};

/// A free loopback port (bound then released).
pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The `host:port` a URL points at.
pub fn url_addr(url: &str) -> SocketAddr {
    let u = url::Url::parse(url).expect("a URL");
    let host = u.host_str().expect("a host");
    let port = u.port_or_known_default().or(match u.scheme() {
        "postgres" | "postgresql" => Some(5432),
        "redis" => Some(6379),
        _ => None,
    });
    format!("{host}:{}", port.expect("a port")).parse().expect("a loopback socket address")
}

/// The same URL pointing at `127.0.0.1:port` instead.
pub fn url_via(url: &str, port: u16) -> String {
    let mut u = url::Url::parse(url).expect("a URL");
    u.set_host(Some("127.0.0.1")).unwrap();
    u.set_port(Some(port)).unwrap();
    u.to_string()
}

/// A connection for the test's own Redis reads, patient enough for a
/// loaded machine (the client's default gives up after 500 ms).
pub async fn redis_conn(url: &str) -> redis::aio::MultiplexedConnection {
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(10)))
        .set_response_timeout(Some(Duration::from_secs(10)));
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .expect("connect to redis")
}

// ---- fault proxy ---------------------------------------------------------

/// What the proxy does to traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Forwards everything as it comes.
    Pass,
    /// Holds each chunk, in both directions, this long before forwarding it.
    DelayChunks(Duration),
    /// Holds each new connection this long before connecting it upstream.
    DelayConnect(Duration),
    /// Accepts connections but forwards nothing, in either direction, until
    /// the fault changes (like a network partition: what was sent is held,
    /// and flows again if the proxy passes before the peers give up).
    Blackhole,
    /// Closes every open connection, and closes each new one as soon as it
    /// is accepted.
    Refuse,
}

/// A TCP proxy on a loopback port in front of `upstream` (a test's Redis
/// or PostgreSQL). Apps reach the upstream through it by using
/// [`FaultProxy::port`] in their URL.
pub struct FaultProxy {
    addr: SocketAddr,
    upstream: Arc<Mutex<SocketAddr>>,
    fault: watch::Sender<Fault>,
    accept: JoinHandle<()>,
    stats: Arc<ProxyStats>,
}

#[derive(Default, Debug)]
pub struct ProxyStats {
    /// Connections accepted.
    pub accepted: AtomicU64,
    /// Connections closed at once (Refuse).
    pub refused: AtomicU64,
    /// Connections cut while open (switch to Refuse).
    pub cut: AtomicU64,
    /// Connections open now (accepted, not yet closed).
    pub open: AtomicU64,
}

/// Counts a connection open for as long as it lives.
struct OpenGuard(Arc<ProxyStats>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl FaultProxy {
    pub async fn start(upstream: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the fault proxy");
        let addr = listener.local_addr().unwrap();
        let (fault, rx) = watch::channel(Fault::Pass);
        let stats = Arc::new(ProxyStats::default());
        let upstream = Arc::new(Mutex::new(upstream));
        let accept = tokio::spawn(accept_loop(listener, upstream.clone(), rx, stats.clone()));
        FaultProxy { addr, upstream, fault, accept, stats }
    }

    /// Connections accepted from now on go to `upstream` (open ones stay
    /// where they are: `cut_all` closes them).
    pub fn set_upstream(&self, upstream: SocketAddr) {
        *self.upstream.lock().unwrap() = upstream;
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn set(&self, fault: Fault) {
        self.fault.send_replace(fault);
    }

    pub fn stats(&self) -> &ProxyStats {
        &self.stats
    }

    /// Switches to Refuse and returns once every open connection is
    /// closed: from then on nothing reaches the upstream. (`set` alone
    /// takes effect when the connection tasks next run, which a loaded
    /// machine may delay.)
    pub async fn cut_all(&self) {
        self.set(Fault::Refuse);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.stats.open.load(Ordering::Relaxed) > 0 {
            assert!(Instant::now() < deadline, "the proxy's connections did not close");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        // Aborting the accept task drops its JoinSet, which aborts every
        // connection task (and so closes both sockets of each).
        self.accept.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: Arc<Mutex<SocketAddr>>,
    fault: watch::Receiver<Fault>,
    stats: Arc<ProxyStats>,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((client, _)) = accepted else { continue };
                stats.accepted.fetch_add(1, Ordering::Relaxed);
                if *fault.borrow() == Fault::Refuse {
                    stats.refused.fetch_add(1, Ordering::Relaxed);
                    drop(client);
                    continue;
                }
                stats.open.fetch_add(1, Ordering::Relaxed);
                let to = *upstream.lock().unwrap();
                connections.spawn(connection(client, to, fault.clone(), stats.clone()));
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// Waits while the proxy is a blackhole; false when the connection must
/// be closed (Refuse, or the proxy is gone).
async fn pass_blackhole(fault: &mut watch::Receiver<Fault>) -> bool {
    loop {
        let current = *fault.borrow_and_update();
        match current {
            Fault::Refuse => return false,
            Fault::Blackhole => {
                if fault.changed().await.is_err() {
                    return false;
                }
            }
            _ => return true,
        }
    }
}

async fn connection(
    client: TcpStream,
    upstream: SocketAddr,
    mut fault: watch::Receiver<Fault>,
    stats: Arc<ProxyStats>,
) {
    let _open = OpenGuard(stats.clone());
    if !pass_blackhole(&mut fault).await {
        return;
    }
    let current = *fault.borrow();
    if let Fault::DelayConnect(d) = current {
        tokio::time::sleep(d).await;
    }
    if !pass_blackhole(&mut fault).await {
        return;
    }
    let Ok(server) = TcpStream::connect(upstream).await else { return };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let mut cut = fault.clone();
    tokio::select! {
        _ = pump(client_read, server_write, fault.clone()) => {}
        _ = pump(server_read, client_write, fault) => {}
        _ = async {
            while *cut.borrow_and_update() != Fault::Refuse {
                if cut.changed().await.is_err() {
                    break;
                }
            }
        } => {
            stats.cut.fetch_add(1, Ordering::Relaxed);
        }
    }
    // Returning drops both halves of both sockets: the peers see the close.
}

/// Forwards one direction. Each chunk read is due at its arrival plus the
/// delay in force (a constant latency: chunks do not queue behind each
/// other's delay), is held while the proxy is a blackhole, and is still
/// delivered after the sender closed, as TCP would.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, mut fault: watch::Receiver<Fault>) {
    let (queue, mut due) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let delay_of = |f: Fault| match f {
        Fault::DelayChunks(d) => d,
        _ => Duration::ZERO,
    };
    let reader_fault = fault.clone();
    let read = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let at = tokio::time::Instant::now() + delay_of(*reader_fault.borrow());
                    if queue.send((at, buf[..n].to_vec())).is_err() {
                        return;
                    }
                }
            }
        }
    };
    let write = async move {
        while let Some((at, chunk)) = due.recv().await {
            tokio::time::sleep_until(at).await;
            if !pass_blackhole(&mut fault).await || to.write_all(&chunk).await.is_err() {
                return;
            }
        }
    };
    // The reader ends at the sender's close; the writer then delivers what
    // is queued and ends. A writer that cannot write ends the pump.
    tokio::pin!(write);
    tokio::select! {
        _ = read => (&mut write).await,
        _ = &mut write => {}
    }
}

// ---- a private redis-server ------------------------------------------------

/// A redis-server of the test's own, on a loopback port. `start` runs it
/// with no persistence (restarting it empties it); `start_with` gives it a
/// data directory of its own and the extra settings a test names
/// (persistence, `replicaof`). Killed (SIGKILL) on drop.
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    /// The data directory (with `start_with`), removed on drop.
    dir: Option<std::path::PathBuf>,
    extra: Vec<String>,
}

impl RedisServer {
    pub async fn start() -> RedisServer {
        let mut server = RedisServer { child: None, port: free_port(), dir: None, extra: Vec::new() };
        server.spawn().await;
        server
    }

    /// A redis-server with its own data directory and `extra` settings
    /// (pairs such as `["--appendonly", "yes"]`).
    pub async fn start_with(extra: &[&str]) -> RedisServer {
        let dir = std::env::temp_dir().join(format!("creditd-redis-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("create the redis data directory");
        let mut server = RedisServer {
            child: None,
            port: free_port(),
            dir: Some(dir),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        server.spawn().await;
        server
    }

    /// The data directory (`start_with` only).
    pub fn dir(&self) -> &std::path::Path {
        self.dir.as_deref().expect("a redis-server started with a data directory")
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    async fn spawn(&mut self) {
        self.spawn_process();
        self.wait_answering().await;
    }

    /// Starts the process without waiting for it to answer (a test that
    /// watches it load its dataset).
    pub fn spawn_process(&mut self) {
        let port = self.port.to_string();
        let mut args: Vec<String> =
            ["redis-server", "--port", port.as_str(), "--bind", "127.0.0.1", "--protected-mode", "yes"]
                .iter()
                .map(|s| s.to_string())
                .collect();
        match &self.dir {
            None => args.extend(["--save", "", "--appendonly", "no"].iter().map(|s| s.to_string())),
            Some(dir) => {
                args.extend(["--dir".to_string(), dir.display().to_string(), "--save".into(), "".into()]);
                args.extend(self.extra.iter().cloned());
            }
        }
        // setpriv makes the kernel kill redis-server if the test process
        // dies without running destructors.
        let mut command = if std::path::Path::new("/usr/bin/setpriv").exists() {
            let mut c = Command::new("/usr/bin/setpriv");
            c.args(["--pdeathsig", "KILL", "--"]).args(&args);
            c
        } else {
            let mut c = Command::new(&args[0]);
            c.args(&args[1..]);
            c
        };
        let child = command
            .current_dir(std::env::temp_dir())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server (is it installed?)");
        self.child = Some(child);
    }

    /// Waits until the server answers PING (a server loading its dataset
    /// answers LOADING, which is not an answer).
    pub async fn wait_answering(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(client) = redis::Client::open(self.url())
                && let Ok(Ok(mut conn)) =
                    tokio::time::timeout(Duration::from_secs(1), client.get_multiplexed_async_connection()).await
                && let Ok(Ok(pong)) =
                    tokio::time::timeout(Duration::from_secs(1), redis::cmd("PING").query_async::<String>(&mut conn))
                        .await
                && pong == "PONG"
            {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!("redis-server on port {} exited at start: {status}", self.port);
            }
            assert!(Instant::now() < deadline, "redis-server on port {} never answered", self.port);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL, then the same server again on the same port and data
    /// directory: it comes back with whatever its files hold.
    pub async fn crash_and_restart(&mut self) {
        self.kill();
        self.spawn().await;
    }

    /// SIGKILL: the data is gone with the process.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// A new, empty redis-server on the same port.
    pub async fn restart_empty(&mut self) {
        self.kill();
        self.spawn().await;
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Copies a directory tree (a Redis data directory) as it is now.
pub fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// Whether a process with this pid still exists (and is not a zombie).
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat.rsplit(')').next().unwrap_or_default().trim_start().starts_with('Z'),
        Err(_) => false,
    }
}

// ---- health ------------------------------------------------------------------

pub const SERVING: i32 = ServingStatus::Serving as i32;
pub const NOT_SERVING: i32 = ServingStatus::NotServing as i32;
/// Health changes of one replica: (when seen, status).
type Changes = Vec<(Instant, i32)>;

/// Polls the gRPC health of each replica every 20 ms and keeps every
/// change, timestamped. Stops when dropped.
pub struct HealthWatch {
    log: Arc<Mutex<Vec<Changes>>>,
    tasks: Vec<JoinHandle<()>>,
}

impl HealthWatch {
    pub fn start(channels: Vec<Channel>) -> HealthWatch {
        let log = Arc::new(Mutex::new(vec![Vec::new(); channels.len()]));
        // One poller per replica, so a slow answer from one does not hide
        // the other's changes. A call that fails says nothing about the
        // status and is not recorded.
        let tasks = channels
            .into_iter()
            .enumerate()
            .map(|(i, channel)| {
                let log = log.clone();
                tokio::spawn(async move {
                    let mut client = HealthClient::new(channel);
                    loop {
                        let mut request = tonic::Request::new(HealthCheckRequest { service: String::new() });
                        request.set_timeout(Duration::from_secs(5));
                        if let Ok(r) = client.check(request).await {
                            let status = r.into_inner().status;
                            let mut log = log.lock().unwrap();
                            if log[i].last().map(|(_, s)| *s) != Some(status) {
                                log[i].push((Instant::now(), status));
                            }
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                })
            })
            .collect();
        HealthWatch { log, tasks }
    }

    /// The changes seen on replica `i`.
    pub fn changes(&self, i: usize) -> Vec<(Instant, i32)> {
        self.log.lock().unwrap()[i].clone()
    }

    /// When replica `i` was first seen in `status` at or after `since`
    /// (a status already current at `since` counts from `since`).
    pub fn seen(&self, i: usize, status: i32, since: Instant) -> Option<Instant> {
        let changes = self.changes(i);
        let mut current = None;
        for (at, s) in &changes {
            if *at <= since {
                current = Some(*s);
            } else if *s == status {
                return Some(if current == Some(status) { since } else { *at });
            } else if current == Some(status) {
                return Some(since);
            } else {
                current = Some(*s);
            }
        }
        (current == Some(status)).then_some(since)
    }

    /// Waits until replica `i` is seen in `status` at or after `since`.
    pub async fn wait_for(&self, i: usize, status: i32, since: Instant, limit: Duration) -> Instant {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(at) = self.seen(i, status, since) {
                return at;
            }
            assert!(
                Instant::now() < deadline,
                "replica {i} not seen with health status {status} within {limit:?}: {:?}",
                self.changes(i).iter().map(|(at, s)| (at.saturating_duration_since(since), *s)).collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Every status replica `i` showed during [from, to].
    pub fn statuses_between(&self, i: usize, from: Instant, to: Instant) -> Vec<i32> {
        let changes = self.changes(i);
        let mut out = Vec::new();
        let mut current = None;
        for (at, s) in changes {
            if at <= from {
                current = Some(s);
            } else if at <= to {
                out.push(s);
            }
        }
        if let Some(s) = current {
            out.insert(0, s);
        }
        out
    }
}

impl Drop for HealthWatch {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

// ---- clients -----------------------------------------------------------------

/// Failures a client retries with the same idempotency key: the service
/// said a backend is unavailable, or the call ran out of time.
pub fn retryable(status: &Status) -> bool {
    matches!(status.code(), Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled)
}

/// The ErrorInfo reason of a status ("" if none).
pub fn reason(status: &Status) -> String {
    status.get_error_details().error_info().map(|i| i.reason.clone()).unwrap_or_default()
}

/// A Commit or Charge acknowledged to a client.
#[derive(Clone, Debug)]
pub struct Acked {
    pub event_id: String,
    /// Empty for a Charge.
    pub reservation_id: String,
    /// When the acknowledged attempt was sent, and answered.
    pub sent: Instant,
    pub answered: Instant,
}

impl Acked {
    pub fn new(event_id: String, reservation_id: String, sent: Instant) -> Acked {
        Acked { event_id, reservation_id, sent, answered: Instant::now() }
    }
}

/// What a client saw, shared by the clients of one test.
#[derive(Default, Debug)]
pub struct Tally {
    /// Every Commit and Charge acknowledged.
    pub acked: Mutex<Vec<Acked>>,
    /// Failed attempts that were retried, by RPC.
    pub reserve_retries: AtomicU64,
    pub commit_retries: AtomicU64,
    /// Commits answered RESERVATION_NOT_FOUND: the hold was lost with Redis.
    pub holds_lost: AtomicU64,
    /// (start, end, granted) of every Reserve answered.
    pub reserves: Mutex<Vec<(Instant, Instant, bool)>>,
}

impl Tally {
    pub fn acked_count(&self) -> usize {
        self.acked.lock().unwrap().len()
    }
}

/// A credit client on one of several replicas.
#[derive(Clone)]
pub struct Client {
    replicas: Vec<CreditServiceClient<Intercepted>>,
    /// Per-call deadline; past it the call is retried.
    pub call_timeout: Duration,
}

impl Client {
    pub fn new(apps: &[&TestApp]) -> Client {
        Client { replicas: apps.iter().map(|a| a.credit.clone()).collect(), call_timeout: Duration::from_secs(5) }
    }

    fn replica(&self, attempt: usize) -> CreditServiceClient<Intercepted> {
        self.replicas[attempt % self.replicas.len()].clone()
    }

    /// Reserve, retried with the same key (on the next replica each time)
    /// until answered; any other failure fails the test.
    pub async fn reserve(
        &self,
        account: &str,
        amount: &str,
        key: &str,
        ttl: Duration,
        tally: &Tally,
        attempt: &mut usize,
    ) -> pb::ReserveResponse {
        loop {
            *attempt += 1;
            let mut request = req(
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
            );
            request.set_timeout(self.call_timeout);
            let start = Instant::now();
            match self.replica(*attempt).reserve(request).await {
                Ok(r) => {
                    let r = r.into_inner();
                    tally.reserves.lock().unwrap().push((start, Instant::now(), r.granted));
                    return r;
                }
                Err(s) if retryable(&s) => {
                    tally.reserve_retries.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(s) => panic!("reserve {key}: unexpected failure {s:?}"),
            }
        }
    }

    /// One Commit attempt.
    pub async fn commit_once(
        &self,
        reservation: &str,
        amount: &str,
        key: &str,
        attempt: &mut usize,
    ) -> Result<pb::CommitResponse, Status> {
        *attempt += 1;
        let mut request = req(
            TENANT,
            pb::CommitRequest {
                reservation_id: reservation.into(),
                cost: Some(pb::commit_request::Cost::Amount(amount.into())),
                idempotency_key: key.into(),
                ..Default::default()
            },
        );
        request.set_timeout(self.call_timeout);
        self.replica(*attempt).commit(request).await.map(|r| r.into_inner())
    }

    /// Release, retried with the same key until answered.
    pub async fn release(&self, reservation: &str, key: &str, attempt: &mut usize) -> pb::ReleaseResponse {
        loop {
            *attempt += 1;
            let mut request =
                req(TENANT, pb::ReleaseRequest { reservation_id: reservation.into(), idempotency_key: key.into() });
            request.set_timeout(self.call_timeout);
            match self.replica(*attempt).release(request).await {
                Ok(r) => return r.into_inner(),
                Err(s) if retryable(&s) => tokio::time::sleep(Duration::from_millis(20)).await,
                Err(s) => panic!("release {key}: unexpected failure {s:?}"),
            }
        }
    }
}

// ---- audit -------------------------------------------------------------------

/// What the audit found.
#[derive(Debug)]
pub struct Audit {
    pub events: i64,
    /// Σ usage_events.amount.
    pub used: rust_decimal::Decimal,
}

/// After the traffic stopped: every acknowledged commit is durable exactly
/// once, nothing was recorded that no client saw acknowledged, no
/// reservation was recorded twice, every hold is resolved (none active,
/// none committing) and Redis balances equal the ledger's (CheckBalances).
pub async fn audit(app: &TestApp, acked: &[Acked]) -> Audit {
    audit_at(app, acked, &app.backends.redis_url).await
}

/// `audit`, reading Redis at `redis_url` (the primary a Sentinel names).
pub async fn audit_at(app: &TestApp, acked: &[Acked], redis_url: &str) -> Audit {
    let pg = app.backends.pg().await;
    let (events, with_hold, distinct, used): (i64, i64, i64, Option<rust_decimal::Decimal>) = sqlx::query_as(
        "SELECT COUNT(*), COUNT(reservation_id), COUNT(DISTINCT reservation_id), SUM(amount) FROM usage_events",
    )
    .fetch_one(&pg)
    .await
    .unwrap();
    assert_eq!(with_hold, distinct, "a reservation was recorded twice");
    let mut ids: Vec<uuid::Uuid> = acked.iter().map(|a| a.event_id.parse().expect("event id")).collect();
    ids.sort();
    let before = ids.len();
    ids.dedup();
    assert_eq!(ids.len(), before, "two commits were acknowledged with the same event");
    let stored: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM usage_events WHERE event_id = ANY($1)")
        .bind(&ids)
        .fetch_one(&pg)
        .await
        .unwrap();
    assert_eq!(stored as usize, ids.len(), "an acknowledged commit is missing from usage_events");
    assert_eq!(events as usize, ids.len(), "usage was recorded that no client saw acknowledged");
    let mut rids: Vec<&str> = acked.iter().map(|a| a.reservation_id.as_str()).filter(|r| !r.is_empty()).collect();
    let with_reservation = rids.len();
    rids.sort();
    rids.dedup();
    assert_eq!(rids.len(), with_reservation, "one reservation acknowledged as two commits");
    pg.close().await;

    // Finalizing is not awaited by Commit: wait for it (or the reaper).
    let mut redis = redis_conn(redis_url).await;
    let prefix = format!("{}{{t:{TENANT}}}:", app.backends.key_prefix);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let committing: u64 =
            redis::cmd("ZCARD").arg(format!("{prefix}committing")).query_async(&mut redis).await.unwrap();
        let active: u64 = redis::cmd("ZCARD").arg(format!("{prefix}holds")).query_async(&mut redis).await.unwrap();
        if committing == 0 && active == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "holds left unresolved: {active} active, {committing} committing");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let report = app
        .admin
        .clone()
        .check_balances(req(TENANT, pb::CheckBalancesRequest {}))
        .await
        .expect("check balances")
        .into_inner();
    assert!(report.accounts_checked > 0);
    assert!(report.drifts.is_empty(), "Redis differs from PostgreSQL: {:?}", report.drifts);
    assert!(report.busy_accounts.is_empty(), "accounts not judged after the load: {:?}", report.busy_accounts);
    Audit { events, used: used.unwrap_or_default() }
}

/// The balance and held credits of an account, as Redis has them.
pub async fn own_level(app: &TestApp, account: &str) -> (String, String) {
    let b = app.balance(account).await;
    let level = &b.levels[0];
    (level.balance.clone(), level.held.clone())
}
