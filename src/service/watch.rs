//! WatchAlerts streams: bounded per API key and per tenant, fed by one
//! poller per watched tenant.
//!
//! A stream must miss nothing and repeat nothing from its cursor, so each
//! reads the outbox itself (`alerts_after`), but only when there is
//! something to read: one task per watched tenant asks PostgreSQL for the
//! tenant's newest alert every `alerts.watch_poll` and wakes the tenant's
//! streams when it moves. Idle streams cost no query, so PostgreSQL load
//! grows with watched tenants and alerts, not with open streams. The
//! poller stops when the tenant's last stream closes.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::watch;
use uuid::Uuid;

use crate::{
    error::{Error, Reason, Result},
    metrics::metrics,
    store::pg::PgStore,
};

/// The stream limits and poll interval (`[alerts]`).
#[derive(Clone, Copy, Debug)]
pub struct WatchLimits {
    pub per_key: usize,
    pub per_tenant: usize,
    pub poll: Duration,
}

#[derive(Default)]
struct Open {
    /// Per tenant: streams open, and the newest alert its poller saw.
    tenants: HashMap<String, (usize, watch::Receiver<i64>)>,
    keys: HashMap<Uuid, usize>,
}

/// The replica's WatchAlerts streams; cheap to clone.
#[derive(Clone)]
pub struct AlertWatch {
    pg: PgStore,
    limits: WatchLimits,
    open: Arc<Mutex<Open>>,
}

/// One open stream's slot: while it lives, the stream counts against its
/// key's and tenant's limits; `newest` changes when the tenant has new
/// alerts (`i64::MIN` until the poller's first read).
pub struct Subscription {
    pub newest: watch::Receiver<i64>,
    watch: AlertWatch,
    tenant: String,
    key: Uuid,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut open = self.watch.open.lock().expect("watch lock");
        if let Some(n) = open.keys.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                open.keys.remove(&self.key);
            }
        }
        if let Some((n, _)) = open.tenants.get_mut(&self.tenant) {
            *n -= 1;
            if *n == 0 {
                // The poller ends once no receiver is left.
                open.tenants.remove(&self.tenant);
            }
        }
        metrics().watch_streams.dec();
    }
}

impl AlertWatch {
    pub fn new(pg: PgStore, limits: WatchLimits) -> Self {
        AlertWatch { pg, limits, open: Arc::new(Mutex::new(Open::default())) }
    }

    pub fn poll(&self) -> Duration {
        self.limits.poll
    }

    /// Opens a stream slot for `key` of `tenant`, or RESOURCE_EXHAUSTED
    /// (TOO_MANY_STREAMS) when either limit is reached; nothing changes
    /// then.
    pub fn subscribe(&self, tenant: &str, key: Uuid) -> Result<Subscription> {
        let mut open = self.open.lock().expect("watch lock");
        let by_key = open.keys.get(&key).copied().unwrap_or(0);
        if by_key >= self.limits.per_key {
            return Err(Error::ResourceExhausted(
                Reason::TooManyStreams,
                format!(
                    "this API key already holds {by_key} WatchAlerts streams on this replica, the most \
                     alerts.watch_streams_per_key allows; close one first"
                ),
            ));
        }
        let by_tenant = open.tenants.get(tenant).map_or(0, |(n, _)| *n);
        if by_tenant >= self.limits.per_tenant {
            return Err(Error::ResourceExhausted(
                Reason::TooManyStreams,
                format!(
                    "the tenant already holds {by_tenant} WatchAlerts streams on this replica, the most \
                     alerts.watch_streams_per_tenant allows; close one first"
                ),
            ));
        }
        let newest = match open.tenants.get_mut(tenant) {
            Some((n, newest)) => {
                *n += 1;
                newest.clone()
            }
            None => {
                let (tx, rx) = watch::channel(i64::MIN);
                tokio::spawn(poll_tenant(self.pg.clone(), tenant.to_string(), self.limits.poll, tx));
                open.tenants.insert(tenant.to_string(), (1, rx.clone()));
                rx
            }
        };
        *open.keys.entry(key).or_insert(0) += 1;
        metrics().watch_streams.inc();
        Ok(Subscription { newest, watch: self.clone(), tenant: tenant.to_string(), key })
    }

    /// Streams open on this replica for a tenant.
    pub fn open_streams(&self, tenant: &str) -> usize {
        self.open.lock().expect("watch lock").tenants.get(tenant).map_or(0, |(n, _)| *n)
    }
}

/// Publishes the tenant's newest alert until its last stream closes.
async fn poll_tenant(pg: PgStore, tenant: String, poll: Duration, newest: watch::Sender<i64>) {
    loop {
        let wait = match pg.last_alert(&tenant).await {
            Ok(seq) => {
                newest.send_if_modified(|current| {
                    let moved = seq > *current;
                    if moved {
                        *current = seq;
                    }
                    moved
                });
                poll
            }
            Err(e) => {
                tracing::warn!(error = %e, tenant, "alert watch: cannot read the outbox; retrying");
                poll * 4
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = newest.closed() => return,
        }
    }
}
