//! Connections to Redis that know which Redis process they reached.
//!
//! The fence (`src/lua/fence.lua`) needs every script to know the identity
//! of the process it runs in, so that a Redis that restarted, was restored
//! from a backup or took over after a failover is checked against
//! PostgreSQL before it decides anything. A connection that reconnects by
//! itself could land on a new process without its user knowing; these
//! never do. Each [`Link`] is one TCP connection, opened with a handshake
//! that reads the process's `run_id` and `master_replid` (its identity)
//! and its role; any error that may mean the process went away or stepped
//! down (I/O, timeout, READONLY, MASTERDOWN) drops the link, and the next
//! call opens a new one with a new handshake. The call that saw the error
//! fails (UNAVAILABLE, retryable): it is never re-sent on another process.
//!
//! With a Sentinel, each new link first asks the sentinels for the
//! current primary. On a Redis Cluster the client library routes and
//! reconnects per node, so identities are not known here; scripts then
//! read their own process's identity (`own_identity` in prelude.lua).

use std::{
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use redis::{
    AsyncConnectionConfig, Client, ErrorKind, RedisError, RedisResult, ServerErrorKind, aio::MultiplexedConnection,
};

/// Where the primary is.
#[derive(Clone)]
pub enum Target {
    /// One endpoint.
    Direct(Client),
    /// The primary a set of sentinels names `master` (the same user,
    /// password and database as the sentinel URLs carry).
    Sentinel { sentinels: Vec<Client>, master: String, template: redis::ConnectionInfo },
}

/// One open connection and the identity of the process at its other end.
#[derive(Clone)]
pub struct Link {
    pub conn: MultiplexedConnection,
    pub identity: Arc<str>,
    serial: u64,
}

/// The primary of one Redis (direct or through Sentinel).
pub struct Single {
    target: Target,
    config: AsyncConnectionConfig,
    timeout: Duration,
    link: RwLock<Option<Link>>,
    connecting: tokio::sync::Mutex<()>,
    serial: AtomicU64,
}

impl Single {
    pub fn new(target: Target, timeout: Duration) -> Self {
        let config =
            AsyncConnectionConfig::new().set_connection_timeout(Some(timeout)).set_response_timeout(Some(timeout));
        Single {
            target,
            config,
            timeout,
            link: RwLock::new(None),
            connecting: tokio::sync::Mutex::new(()),
            serial: AtomicU64::new(0),
        }
    }

    fn current(&self) -> Option<Link> {
        self.link.read().expect("redis link lock").clone()
    }

    /// The open link, or a new one (one handshake at a time). Waiting for
    /// another caller's handshake counts against the same bound: getting a
    /// link never takes longer than the configured timeout.
    pub async fn link(&self) -> RedisResult<Link> {
        if let Some(link) = self.current() {
            return Ok(link);
        }
        tokio::time::timeout(self.timeout, async {
            let _guard = self.connecting.lock().await;
            if let Some(link) = self.current() {
                return Ok(link);
            }
            let (conn, identity) = self.open().await?;
            let link =
                Link { conn, identity: identity.into(), serial: self.serial.fetch_add(1, Ordering::Relaxed) + 1 };
            tracing::debug!(identity = %link.identity, "redis link opened");
            *self.link.write().expect("redis link lock") = Some(link.clone());
            Ok(link)
        })
        .await
        .map_err(|_| RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut)))?
    }

    /// Forgets `serial`'s link (if it is still the current one).
    pub fn drop_link(&self, serial: u64) {
        let mut current = self.link.write().expect("redis link lock");
        if current.as_ref().is_some_and(|l| l.serial == serial) {
            tracing::debug!("redis link dropped");
            *current = None;
        }
    }

    /// Forgets the current link whatever it is (the health job found the
    /// process behind it changed).
    pub fn reset(&self) {
        *self.link.write().expect("redis link lock") = None;
    }

    async fn open(&self) -> RedisResult<(MultiplexedConnection, String)> {
        let client = match &self.target {
            Target::Direct(client) => client.clone(),
            Target::Sentinel { sentinels, master, template } => {
                self.primary_from_sentinels(sentinels, master, template).await?
            }
        };
        let mut conn = client.get_multiplexed_async_connection_with_config(&self.config).await?;
        let identity = handshake(&mut conn).await?;
        Ok((conn, identity))
    }

    async fn primary_from_sentinels(
        &self,
        sentinels: &[Client],
        master: &str,
        template: &redis::ConnectionInfo,
    ) -> RedisResult<Client> {
        let mut last: Option<RedisError> = None;
        for sentinel in sentinels {
            let asked = async {
                let mut conn = sentinel.get_multiplexed_async_connection_with_config(&self.config).await?;
                let addr: Option<(String, u16)> =
                    redis::cmd("SENTINEL").arg("get-master-addr-by-name").arg(master).query_async(&mut conn).await?;
                addr.ok_or_else(|| {
                    RedisError::from((ErrorKind::Server(ServerErrorKind::MasterDown), "sentinel knows no such master"))
                })
            };
            match asked.await {
                Ok((host, port)) => {
                    let info = template.clone().set_addr(redis::ConnectionAddr::Tcp(host, port));
                    return Client::open(info);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| RedisError::from((ErrorKind::InvalidClientConfig, "no sentinel configured"))))
    }
}

/// Reads the identity of the process behind `conn` and checks it is a
/// primary.
pub async fn handshake(conn: &mut MultiplexedConnection) -> RedisResult<String> {
    let (server, replication, memory): (String, String, String) = redis::pipe()
        .cmd("INFO")
        .arg("server")
        .cmd("INFO")
        .arg("replication")
        .cmd("INFO")
        .arg("memory")
        .query_async(conn)
        .await?;
    let field = |text: &str, name: &str| -> Option<String> {
        text.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(':'))).map(|v| v.trim().to_string())
    };
    let role = field(&replication, "role").unwrap_or_default();
    if role != "master" {
        return Err(RedisError::from((
            ErrorKind::Server(ServerErrorKind::ReadOnly),
            "the Redis reached is not a primary",
            role,
        )));
    }
    // An allkeys-* policy may evict a tenant's balances or holds, keys
    // without a TTL that the fence cannot see go: refuse to decide on it.
    // (volatile-* evicts only keys with a TTL: idempotency records and
    // tombstones, whose loss the service answers from PostgreSQL.)
    let policy = field(&memory, "maxmemory_policy").unwrap_or_default();
    if policy.starts_with("allkeys") {
        return Err(RedisError::from((
            ErrorKind::InvalidClientConfig,
            "Redis maxmemory-policy may evict creditd's balances and holds; set noeviction (or volatile-*)",
            policy,
        )));
    }
    match (field(&server, "run_id"), field(&replication, "master_replid")) {
        (Some(run), Some(replid)) if !run.is_empty() && !replid.is_empty() => Ok(format!("{run}:{replid}")),
        _ => Err(RedisError::from((ErrorKind::UnexpectedReturnType, "INFO without run_id or master_replid"))),
    }
}

/// Whether `e` may mean the link's process went away or is no longer the
/// primary: the link is then dropped.
pub fn breaks_link(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || matches!(e.kind(), ErrorKind::Server(ServerErrorKind::ReadOnly | ServerErrorKind::MasterDown))
}

/// Whether retrying `e` later may succeed: the failures above, and the
/// replies that mean "not now" (LOADING, TRYAGAIN, CLUSTERDOWN, BUSY).
pub fn is_transient(e: &RedisError) -> bool {
    breaks_link(e)
        || matches!(
            e.kind(),
            ErrorKind::Server(ServerErrorKind::BusyLoading | ServerErrorKind::TryAgain | ServerErrorKind::ClusterDown)
        )
        || e.code() == Some("BUSY")
}

/// A connection for one call (or a pipeline of them): a link, or the
/// cluster connection. Errors that break a link drop it.
#[derive(Clone)]
pub enum Handle {
    Link(Link, Arc<Single>),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl Handle {
    /// The identity scripts receive: the link's, or '' (scripts ask INFO).
    pub fn identity(&self) -> &str {
        match self {
            Handle::Link(link, _) => &link.identity,
            Handle::Cluster(_) => "",
        }
    }

    fn observe<T>(&self, result: RedisResult<T>) -> RedisResult<T> {
        if let (Err(e), Handle::Link(link, single)) = (&result, self)
            && breaks_link(e)
        {
            single.drop_link(link.serial);
        }
        result
    }
}

impl redis::aio::ConnectionLike for Handle {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, redis::Value> {
        Box::pin(async move {
            let result = match self {
                Handle::Link(link, _) => link.conn.req_packed_command(cmd).await,
                Handle::Cluster(c) => c.req_packed_command(cmd).await,
            };
            self.observe(result)
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        Box::pin(async move {
            let result = match self {
                Handle::Link(link, _) => link.conn.req_packed_commands(pipeline, offset, count).await,
                Handle::Cluster(c) => c.req_packed_commands(pipeline, offset, count).await,
            };
            self.observe(result)
        })
    }

    fn get_db(&self) -> i64 {
        match self {
            Handle::Link(link, _) => link.conn.get_db(),
            Handle::Cluster(c) => c.get_db(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(kind: ServerErrorKind) -> RedisError {
        RedisError::from((ErrorKind::Server(kind), "reply"))
    }

    #[test]
    fn replies_that_mean_not_now_are_transient() {
        for kind in [
            ServerErrorKind::BusyLoading,
            ServerErrorKind::TryAgain,
            ServerErrorKind::ClusterDown,
            ServerErrorKind::MasterDown,
            ServerErrorKind::ReadOnly,
        ] {
            assert!(is_transient(&server(kind)), "{kind:?}");
        }
        assert!(is_transient(&RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset))));
        assert!(!is_transient(&server(ServerErrorKind::NoScript)));
        assert!(!is_transient(&RedisError::from((ErrorKind::InvalidClientConfig, "eviction policy"))));
    }

    #[test]
    fn a_failover_or_a_reset_drops_the_link() {
        assert!(breaks_link(&server(ServerErrorKind::ReadOnly)));
        assert!(breaks_link(&server(ServerErrorKind::MasterDown)));
        assert!(breaks_link(&RedisError::from(std::io::Error::from(std::io::ErrorKind::BrokenPipe))));
        // LOADING is the same process, not yet ready: the link stays.
        assert!(!breaks_link(&server(ServerErrorKind::BusyLoading)));
    }
}
