//! API keys: who a caller is, which tenant it acts for, what it may do.
//!
//! A key reads `cdk_<prefix>_<secret>`: a 12-hex-digit public prefix (shown
//! in listings and logs) and a 64-hex-digit secret shown once, at creation.
//! PostgreSQL stores the prefix and the SHA-256 of the secret, never the
//! secret. Each replica caches the keys it has seen; a background task
//! re-reads all of them from PostgreSQL every `auth.key_recheck` in one
//! query, so a revocation takes effect everywhere within about that time,
//! and a call never waits for PostgreSQL unless its key was never seen by
//! this replica. If PostgreSQL is unreachable, cached verdicts stand (Reserve
//! must survive a PostgreSQL outage); a key never seen before is then
//! UNAVAILABLE.
//!
//! Made-up keys cannot turn into PostgreSQL load: a prefix PostgreSQL does
//! not know is remembered as unknown for `auth.unknown_key_ttl` (at most
//! `auth.unknown_key_cache` of them, oldest forgotten first), and lookups of
//! prefixes not cached pass a token bucket (`auth.lookups_per_second`,
//! `auth.lookup_burst`); past it such a call is RESOURCE_EXHAUSTED
//! (RATE_LIMITED) without a lookup. Keys already cached are never limited,
//! so a flood of unknown keys cannot lock out the keys in use.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::store::pg::{PgError, PgStore};

/// What a key may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// The hot path of its tenant: Authorize, Reserve, Commit, Release,
    /// Extend, Charge, GetBalance (and Quote).
    Runtime,
    /// Everything of its tenant: accounts, grants, prices, reports, alerts,
    /// and the runtime calls.
    Admin,
    /// Tenants and API keys; no tenant's credits.
    Operator,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Runtime => "runtime",
            Role::Admin => "admin",
            Role::Operator => "operator",
        }
    }

    pub fn parse(name: &str) -> Option<Role> {
        match name {
            "runtime" => Some(Role::Runtime),
            "admin" => Some(Role::Admin),
            "operator" => Some(Role::Operator),
            _ => None,
        }
    }
}

/// An authenticated caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub key_id: Uuid,
    pub prefix: String,
    /// `None` for operators.
    pub tenant: Option<String>,
    pub role: Role,
}

/// A stored key, without its secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyRecord {
    pub key_id: Uuid,
    pub prefix: String,
    pub secret_hash: String,
    pub tenant: Option<String>,
    pub role: Role,
    pub name: String,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no API key: send `authorization: Bearer <key>`")]
    Missing,
    /// Malformed, unknown, wrong secret or revoked: one answer for all, so
    /// a caller learns nothing about which keys exist.
    #[error("invalid API key")]
    Invalid,
    #[error("key store unavailable")]
    Unavailable(#[source] PgError),
    /// Too many lookups of keys this replica has not seen.
    #[error("too many calls with API keys this replica has not seen; retry later")]
    RateLimited,
}

/// The limits on keys this replica has not seen (`[auth]`).
#[derive(Clone, Copy, Debug)]
pub struct LookupLimits {
    pub unknown_ttl: Duration,
    pub unknown_capacity: usize,
    pub per_second: u32,
    pub burst: u32,
}

impl Default for LookupLimits {
    fn default() -> Self {
        LookupLimits { unknown_ttl: Duration::from_secs(5), unknown_capacity: 10_000, per_second: 100, burst: 200 }
    }
}

/// Prefixes PostgreSQL did not know, each until a deadline; bounded, the
/// oldest forgotten first.
struct Unknown {
    until: HashMap<String, Instant>,
    order: VecDeque<(String, Instant)>,
}

impl Unknown {
    fn contains(&mut self, prefix: &str, now: Instant) -> bool {
        match self.until.get(prefix) {
            Some(deadline) if *deadline > now => true,
            Some(_) => {
                self.until.remove(prefix);
                false
            }
            None => false,
        }
    }

    fn insert(&mut self, prefix: &str, deadline: Instant, capacity: usize) {
        while self.until.len() >= capacity {
            let Some((oldest, at)) = self.order.pop_front() else { break };
            // Only the entry this queue slot was pushed for.
            if self.until.get(&oldest) == Some(&at) {
                self.until.remove(&oldest);
            }
        }
        // Bound the queue by what it can refer to (stale slots included).
        while self.order.len() >= capacity * 2 {
            let Some((oldest, at)) = self.order.pop_front() else { break };
            if self.until.get(&oldest) == Some(&at) {
                self.until.remove(&oldest);
            }
        }
        self.until.insert(prefix.to_string(), deadline);
        self.order.push_back((prefix.to_string(), deadline));
    }
}

/// A token bucket: `per_second` sustained, `burst` at once.
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn take(&mut self, limits: &LookupLimits, now: Instant) -> bool {
        let refill = now.saturating_duration_since(self.at).as_secs_f64() * f64::from(limits.per_second);
        self.tokens = (self.tokens + refill).min(f64::from(limits.burst));
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Verifies keys against PostgreSQL, through a per-replica cache: prefix →
/// the live record, or `None` for a revoked key (prefixes of keys that
/// exist, so bounded by the keys there are), beside a bounded, expiring
/// memory of prefixes that do not exist.
#[derive(Clone)]
pub struct KeyStore {
    pg: PgStore,
    recheck: Duration,
    limits: LookupLimits,
    cache: Arc<RwLock<HashMap<String, Option<KeyRecord>>>>,
    unknown: Arc<Mutex<Unknown>>,
    bucket: Arc<Mutex<Bucket>>,
    lookups: Arc<AtomicU64>,
}

impl KeyStore {
    pub fn new(pg: PgStore, recheck: Duration, limits: LookupLimits) -> Self {
        KeyStore {
            pg,
            recheck,
            limits,
            cache: Arc::new(RwLock::new(HashMap::new())),
            unknown: Arc::new(Mutex::new(Unknown { until: HashMap::new(), order: VecDeque::new() })),
            bucket: Arc::new(Mutex::new(Bucket { tokens: f64::from(limits.burst), at: Instant::now() })),
            lookups: Arc::new(AtomicU64::new(0)),
        }
    }

    /// PostgreSQL lookups of single keys this store has made (the
    /// periodic re-read of cached keys not counted).
    pub fn lookups(&self) -> u64 {
        self.lookups.load(Ordering::Relaxed)
    }

    /// Authenticates the value of an `authorization` header.
    pub async fn authenticate(&self, header: Option<&str>) -> Result<Caller, AuthError> {
        let header = header.ok_or(AuthError::Missing)?;
        let token = header.strip_prefix("Bearer ").ok_or(AuthError::Invalid)?.trim();
        let (prefix, secret) = split_token(token).ok_or(AuthError::Invalid)?;
        let record = self.record(prefix).await?.ok_or(AuthError::Invalid)?;
        if !constant_time_eq(hash_secret(secret).as_bytes(), record.secret_hash.as_bytes()) {
            return Err(AuthError::Invalid);
        }
        Ok(Caller { key_id: record.key_id, prefix: record.prefix, tenant: record.tenant, role: record.role })
    }

    /// The live record of a prefix: cached, or read once from PostgreSQL
    /// (within the lookup limits).
    async fn record(&self, prefix: &str) -> Result<Option<KeyRecord>, AuthError> {
        use crate::metrics::{KeyLookup, metrics};
        if let Some(record) = self.cache.read().expect("key cache lock").get(prefix) {
            return Ok(record.clone());
        }
        let now = Instant::now();
        if self.unknown.lock().expect("unknown keys lock").contains(prefix, now) {
            return Ok(None);
        }
        if !self.bucket.lock().expect("lookup bucket lock").take(&self.limits, now) {
            metrics().key_lookup(KeyLookup::rate_limited);
            return Err(AuthError::RateLimited);
        }
        self.lookups.fetch_add(1, Ordering::Relaxed);
        let record = match self.pg.api_key_by_prefix(prefix).await {
            Ok(record) => record,
            Err(e) => {
                metrics().key_lookup(KeyLookup::error);
                return Err(AuthError::Unavailable(e));
            }
        };
        let Some(record) = record else {
            metrics().key_lookup(KeyLookup::unknown);
            let deadline = Instant::now() + self.limits.unknown_ttl;
            self.unknown.lock().expect("unknown keys lock").insert(prefix, deadline, self.limits.unknown_capacity);
            return Ok(None);
        };
        metrics().key_lookup(KeyLookup::found);
        let live = (record.revoked_at.is_none()).then_some(record);
        self.cache.write().expect("key cache lock").insert(prefix.to_string(), live.clone());
        Ok(live)
    }

    /// Re-reads every cached key, every `auth.key_recheck`, until `stop`.
    pub async fn refresh_forever(&self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut ticker = tokio::time::interval(self.recheck);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = stop.changed() => return,
            }
            let prefixes: Vec<String> = self.cache.read().expect("key cache lock").keys().cloned().collect();
            if prefixes.is_empty() {
                continue;
            }
            match self.pg.api_keys_by_prefixes(&prefixes).await {
                Ok(records) => {
                    let mut fresh: HashMap<String, Option<KeyRecord>> =
                        prefixes.into_iter().map(|p| (p, None)).collect();
                    for r in records.into_iter().filter(|r| r.revoked_at.is_none()) {
                        fresh.insert(r.prefix.clone(), Some(r));
                    }
                    let mut cache = self.cache.write().expect("key cache lock");
                    for (prefix, record) in fresh {
                        // Entries added meanwhile were read after this query.
                        if let Some(slot) = cache.get_mut(&prefix) {
                            *slot = record;
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot re-read api keys: cached verdicts stand"),
            }
        }
    }

    /// Creates a key; returns its record and the full key, shown once.
    pub async fn create(
        &self,
        tenant: Option<&str>,
        role: Role,
        name: &str,
        idempotency_key: Option<&str>,
    ) -> Result<(KeyRecord, Option<String>), PgError> {
        let prefix = random_hex(6);
        let secret = random_hex(32);
        let record = KeyRecord {
            key_id: Uuid::now_v7(),
            prefix: prefix.clone(),
            secret_hash: hash_secret(&secret),
            tenant: tenant.map(str::to_string),
            role,
            name: name.to_string(),
            created_at: Utc::now(),
            revoked_at: None,
        };
        let (stored, created) = self.pg.insert_api_key(&record, idempotency_key).await?;
        Ok((stored, created.then(|| format!("cdk_{prefix}_{secret}"))))
    }

    /// Revokes a key (and forgets it here at once).
    pub async fn revoke(&self, key_id: Uuid) -> Result<Option<KeyRecord>, PgError> {
        let record = self.pg.revoke_api_key(key_id).await?;
        if let Some(r) = &record {
            self.cache.write().expect("key cache lock").insert(r.prefix.clone(), None);
        }
        Ok(record)
    }
}

/// `cdk_<12 hex>_<64 hex>` → (prefix, secret).
fn split_token(token: &str) -> Option<(&str, &str)> {
    let rest = token.strip_prefix("cdk_")?;
    let (prefix, secret) = rest.split_once('_')?;
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    (hex(prefix, 12) && hex(secret, 64)).then_some((prefix, secret))
}

pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `bytes` random bytes from the operating system, as hex.
fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).expect("the operating system provides randomness");
    hex::encode(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_parse_only_in_their_exact_shape() {
        let prefix = "0123456789ab";
        let secret = "f".repeat(64);
        let token = format!("cdk_{prefix}_{secret}");
        assert_eq!(split_token(&token), Some((prefix, secret.as_str())));
        assert_eq!(split_token(&token.to_uppercase()), None);
        assert_eq!(split_token(&format!("cdk_{prefix}_{}", &secret[1..])), None);
        assert_eq!(split_token("cdk__"), None);
        assert_eq!(split_token(&format!("xyz_{prefix}_{secret}")), None);
    }

    #[test]
    fn constant_time_eq_compares() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
