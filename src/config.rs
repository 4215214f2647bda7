//! Configuration: embedded defaults (`src/default.toml`, documented there),
//! an optional file, `CREDITD_*` environment, then CLI flags. Validated
//! once, at startup, with messages that name the offending key.

use std::{net::SocketAddr, time::Duration};

use serde::{Deserialize, Deserializer};

const DEFAULTS: &str = include_str!("default.toml");

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub tls: TlsConfig,
    pub auth: AuthConfig,
    pub postgres: PostgresConfig,
    pub redis: RedisConfig,
    pub hot: HotConfig,
    pub pricing: PricingConfig,
    pub commit: CommitConfig,
    pub jobs: JobsConfig,
    pub reconcile: ReconcileConfig,
    pub metrics: MetricsConfig,
    pub webhooks: WebhooksConfig,
    pub log: LogConfig,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhooksConfig {
    /// Comma-separated CIDRs webhooks may reach although they are
    /// loopback, private, link-local or otherwise internal; "" = none.
    pub allow_destinations: String,
    /// Extra PEM roots for https webhooks, beside the built-in Mozilla
    /// roots; "" = none.
    pub ca_file: String,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// Drain time for in-flight calls on shutdown.
    #[serde(deserialize_with = "duration")]
    pub shutdown_grace: Duration,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Server certificate chain (PEM); with `key_file`, turns TLS on.
    pub cert_file: String,
    /// Server private key (PEM).
    pub key_file: String,
    /// CA whose certificates clients must present (mTLS); empty: none asked.
    pub client_ca_file: String,
}

impl TlsConfig {
    pub fn enabled(&self) -> bool {
        !self.cert_file.is_empty()
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Upper bound on how long a revoked key keeps working on a replica.
    #[serde(deserialize_with = "duration")]
    pub key_recheck: Duration,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// Connection URL (secret: logged redacted).
    pub url: String,
    pub max_connections: u32,
    /// Bounds every statement, and so how long a commit can be in doubt.
    #[serde(deserialize_with = "duration")]
    pub statement_timeout: Duration,
    /// Apply migrations when serving starts.
    pub migrate_on_start: bool,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// Connection URL, or cluster seed URLs (secret: logged redacted).
    pub url: String,
    /// Redis Cluster mode.
    pub cluster: bool,
    /// With a name: `url` lists Redis Sentinels (comma-separated) and the
    /// primary is the one they name so, followed across failovers.
    #[serde(default)]
    pub sentinel_master: String,
    /// Namespace of every key.
    pub key_prefix: String,
    /// Per-call timeout: past it the hot path fails closed.
    #[serde(deserialize_with = "duration")]
    pub timeout: Duration,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HotConfig {
    #[serde(deserialize_with = "duration")]
    pub default_ttl: Duration,
    #[serde(deserialize_with = "duration")]
    pub min_ttl: Duration,
    #[serde(deserialize_with = "duration")]
    pub max_ttl: Duration,
    /// How long Redis answers replays of an idempotency key.
    #[serde(deserialize_with = "duration")]
    pub idempotency_ttl: Duration,
    /// How long a settled hold is remembered.
    #[serde(deserialize_with = "duration")]
    pub tombstone_ttl: Duration,
    /// After this, an undurable commit is resolved by the reaper.
    #[serde(deserialize_with = "duration")]
    pub commit_deadline: Duration,
    /// Deepest account tree.
    pub max_depth: u32,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PricingConfig {
    /// A catalog file replacing the embedded one; empty: embedded.
    pub default_catalog_file: String,
    /// Load the default catalog at startup.
    pub load_default_catalog: bool,
    /// Delay before a price change reaches a replica.
    #[serde(deserialize_with = "duration")]
    pub refresh: Duration,
    /// Largest quantity of one usage item.
    pub max_quantity: i64,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommitConfig {
    /// Most events per group-commit transaction.
    pub max_batch: usize,
    /// Concurrent group-commit writers.
    pub writers: usize,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobsConfig {
    #[serde(deserialize_with = "duration")]
    pub reap_interval: Duration,
    #[serde(deserialize_with = "duration")]
    pub ledger_interval: Duration,
    #[serde(deserialize_with = "duration")]
    pub health_interval: Duration,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReconcileConfig {
    /// How often each tenant is reconciled (by one replica); 0 turns the
    /// reconciler off.
    #[serde(deserialize_with = "duration")]
    pub interval: Duration,
    /// Repair confirmed drift (the Redis balance is set to the ledger's);
    /// false only measures, logs and exports it.
    pub repair: bool,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address of the Prometheus endpoint (`GET /metrics`); empty: none.
    pub listen: String,
}

impl MetricsConfig {
    /// The endpoint's address, if one is configured (validated at load).
    pub fn address(&self) -> Option<SocketAddr> {
        self.listen.parse().ok()
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// "text" or "json".
    pub format: String,
    /// tracing filter directives.
    pub filter: String,
    /// OTLP/gRPC collector for the tracing spans ("http://collector:4317");
    /// empty: none. Needs a build with the `otlp` feature.
    pub otlp_endpoint: String,
}

/// Why the configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("config {origin}: {message}")]
    Parse { origin: String, message: String },
    #[error("config key {key}: {message}")]
    Invalid { key: &'static str, message: String },
}

/// Where values come from, beyond the embedded defaults.
#[derive(Clone, Debug, Default)]
pub struct Sources {
    pub file: Option<String>,
    /// Environment variables (name, value); pass `std::env::vars()`.
    pub env: Vec<(String, String)>,
    /// Dotted keys set on the command line, e.g. ("server.listen", "…").
    pub overrides: Vec<(String, String)>,
}

impl Config {
    /// The embedded defaults alone.
    pub fn defaults() -> Config {
        Config::load(&Sources::default()).expect("embedded defaults are valid")
    }

    pub fn load(sources: &Sources) -> Result<Config, ConfigError> {
        let mut table: toml::Table = toml::from_str(DEFAULTS)
            .map_err(|e| ConfigError::Parse { origin: "defaults".into(), message: e.to_string() })?;
        if let Some(path) = &sources.file {
            let text =
                std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.clone(), source })?;
            let file: toml::Table = toml::from_str(&text)
                .map_err(|e| ConfigError::Parse { origin: path.clone(), message: e.to_string() })?;
            merge(&mut table, file);
        }
        for (name, value) in &sources.env {
            let key = match name.as_str() {
                "DATABASE_URL" => "postgres.url".to_string(),
                "REDIS_URL" => "redis.url".to_string(),
                other => match other.strip_prefix("CREDITD_") {
                    Some(rest) if rest.contains("__") => rest.to_ascii_lowercase().replacen("__", ".", 1),
                    _ => continue,
                },
            };
            set(&mut table, &key, value, name)?;
        }
        for (key, value) in &sources.overrides {
            set(&mut table, key, value, &format!("--{key}"))?;
        }
        let config: Config = toml::Value::Table(table).try_into().map_err(|e: toml::de::Error| ConfigError::Parse {
            origin: "merged configuration".into(),
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, message: &str| Err(ConfigError::Invalid { key, message: message.to_string() });
        if !self.log.otlp_endpoint.is_empty() {
            if !cfg!(feature = "otlp") {
                return invalid(
                    "log.otlp_endpoint",
                    "needs a creditd built with the otlp feature (cargo build --features otlp)",
                );
            }
            if !(self.log.otlp_endpoint.starts_with("http://") || self.log.otlp_endpoint.starts_with("https://")) {
                return invalid("log.otlp_endpoint", "must be empty or an http:// or https:// URL");
            }
        }
        if self.hot.tombstone_ttl < self.hot.idempotency_ttl {
            // Commit and Charge replays are answered from the settled hold.
            return invalid("hot.tombstone_ttl", "must be at least hot.idempotency_ttl");
        }
        if !self.metrics.listen.is_empty() && self.metrics.listen.parse::<SocketAddr>().is_err() {
            return invalid("metrics.listen", "must be empty or an address like 0.0.0.0:9090");
        }
        if self.hot.min_ttl.is_zero() || self.hot.min_ttl > self.hot.max_ttl {
            return invalid("hot.min_ttl", "must be positive and at most hot.max_ttl");
        }
        if self.hot.default_ttl < self.hot.min_ttl || self.hot.default_ttl > self.hot.max_ttl {
            return invalid("hot.default_ttl", "must lie within [hot.min_ttl, hot.max_ttl]");
        }
        if self.hot.commit_deadline < self.postgres.statement_timeout * 3 {
            return invalid("hot.commit_deadline", "must be at least 3 × postgres.statement_timeout");
        }
        if !(1..=8).contains(&self.hot.max_depth) {
            return invalid("hot.max_depth", "must be between 1 and 8");
        }
        if self.commit.max_batch == 0 || self.commit.writers == 0 {
            return invalid("commit.max_batch", "commit.max_batch and commit.writers must be positive");
        }
        if self.postgres.max_connections < self.commit.writers as u32 + 2 {
            return invalid("postgres.max_connections", "must exceed commit.writers by at least 2");
        }
        if self.tls.cert_file.is_empty() != self.tls.key_file.is_empty() {
            return invalid("tls.cert_file", "tls.cert_file and tls.key_file go together");
        }
        if !self.tls.client_ca_file.is_empty() && !self.tls.enabled() {
            return invalid("tls.client_ca_file", "needs tls.cert_file and tls.key_file");
        }
        if self.pricing.max_quantity <= 0 {
            return invalid("pricing.max_quantity", "must be positive");
        }
        if !matches!(self.log.format.as_str(), "text" | "json") {
            return invalid("log.format", "must be \"text\" or \"json\"");
        }
        let redis_urls: Vec<&str> = if self.redis.cluster {
            self.redis.url.split(',').map(str::trim).filter(|u| !u.is_empty()).collect()
        } else {
            vec![self.redis.url.as_str()]
        };
        let mut urls = vec![("postgres.url", self.postgres.url.as_str(), &["postgres", "postgresql"][..])];
        urls.extend(redis_urls.into_iter().map(|u| ("redis.url", u, &["redis", "rediss"][..])));
        for (key, url, schemes) in urls {
            match url::Url::parse(url) {
                Ok(u) if schemes.contains(&u.scheme()) => {}
                Ok(u) => return invalid(key, &format!("scheme {:?} is not one of {schemes:?}", u.scheme())),
                Err(e) => return invalid(key, &format!("is not a URL ({e})")),
            }
        }
        if let Err(e) = crate::service::webhooks::parse_cidrs(&self.webhooks.allow_destinations) {
            return invalid("webhooks.allow_destinations", &e);
        }
        if self.redis.key_prefix.contains(['{', '}', ' ']) {
            return invalid("redis.key_prefix", "must not contain braces or spaces");
        }
        Ok(())
    }
}

/// A URL (or comma-separated URLs) with passwords replaced, for logs.
pub fn redact_url(raw: &str) -> String {
    raw.split(',')
        .map(|one| match url::Url::parse(one.trim()) {
            Ok(mut u) => {
                if u.password().is_some() {
                    let _ = u.set_password(Some("***"));
                }
                u.to_string()
            }
            Err(_) => "<unparsable url>".to_string(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn merge(base: &mut toml::Table, over: toml::Table) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// Sets `section.key` from a string, typed like the default it replaces.
fn set(table: &mut toml::Table, dotted: &str, raw: &str, origin: &str) -> Result<(), ConfigError> {
    let parse_err = |message: String| ConfigError::Parse { origin: origin.to_string(), message };
    let (section, key) = dotted.split_once('.').ok_or_else(|| parse_err(format!("{dotted:?} is not section.key")))?;
    let section_table = table
        .get_mut(section)
        .and_then(toml::Value::as_table_mut)
        .ok_or_else(|| parse_err(format!("unknown section {section:?}")))?;
    let value = match section_table.get(key) {
        Some(toml::Value::Integer(_)) => {
            toml::Value::Integer(raw.parse().map_err(|_| parse_err(format!("{dotted} must be an integer")))?)
        }
        Some(toml::Value::Boolean(_)) => {
            toml::Value::Boolean(raw.parse().map_err(|_| parse_err(format!("{dotted} must be true or false")))?)
        }
        Some(_) => toml::Value::String(raw.to_string()),
        None => return Err(parse_err(format!("unknown key {dotted:?}"))),
    };
    section_table.insert(key.to_string(), value);
    Ok(())
}

/// Parses "250ms", "5s", "10m", "24h".
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = text.split_at(split);
    let n: u64 = number.parse().ok()?;
    match unit {
        "ms" => Some(Duration::from_millis(n)),
        "s" => Some(Duration::from_secs(n)),
        "m" => n.checked_mul(60).map(Duration::from_secs),
        "h" => n.checked_mul(3600).map(Duration::from_secs),
        _ => None,
    }
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    parse_duration(&text).ok_or_else(|| {
        serde::de::Error::custom(format!("{text:?} is not a duration like \"250ms\", \"5s\", \"10m\" or \"24h\""))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let c = Config::defaults();
        assert_eq!(c.hot.default_ttl, Duration::from_secs(60));
        assert_eq!(c.jobs.reap_interval, Duration::from_millis(250));
    }

    #[test]
    fn env_and_overrides_win_in_order() {
        let sources = Sources {
            file: None,
            env: vec![
                ("DATABASE_URL".into(), "postgres://u:secret@db/x".into()),
                ("CREDITD_HOT__MAX_DEPTH".into(), "4".into()),
                ("UNRELATED".into(), "1".into()),
            ],
            overrides: vec![("server.listen".into(), "127.0.0.1:0".into())],
        };
        let c = Config::load(&sources).unwrap();
        assert_eq!(c.postgres.url, "postgres://u:secret@db/x");
        assert_eq!(c.hot.max_depth, 4);
        assert_eq!(c.server.listen.port(), 0);
        assert_eq!(redact_url(&c.postgres.url), "postgres://u:***@db/x");
    }

    #[test]
    fn bad_values_name_the_key() {
        let bad = |k: &str, v: &str| {
            Config::load(&Sources { overrides: vec![(k.into(), v.into())], ..Default::default() })
                .unwrap_err()
                .to_string()
        };
        assert!(bad("hot.min_ttl", "0s").contains("hot.min_ttl"));
        assert!(bad("hot.max_depth", "x").contains("hot.max_depth"));
        assert!(bad("hot.nope", "1").contains("unknown key"));
        assert!(bad("redis.url", "http://x").contains("redis.url"));
        assert!(bad("server.shutdown_grace", "ten").contains("duration"));
    }
}
