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
    pub alerts: AlertsConfig,
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
    /// How long a replica remembers that a key prefix does not exist.
    #[serde(deserialize_with = "duration")]
    pub unknown_key_ttl: Duration,
    /// The most unknown prefixes remembered (oldest forgotten first).
    pub unknown_key_cache: usize,
    /// PostgreSQL lookups of keys this replica has not seen, per second,
    /// sustained; past it such calls are RESOURCE_EXHAUSTED (RATE_LIMITED).
    pub lookups_per_second: u32,
    /// Lookups allowed at once above the sustained rate.
    pub lookup_burst: u32,
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
    /// Label per-tenant gauges with tenant ids (off: totals only, so a
    /// scrape reveals no tenant).
    pub tenant_labels: bool,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsConfig {
    /// WatchAlerts streams one API key may hold open on a replica.
    pub watch_streams_per_key: usize,
    /// WatchAlerts streams one tenant may hold open on a replica.
    pub watch_streams_per_tenant: usize,
    /// How often a replica reads a watched tenant's new alerts (once per
    /// tenant, whatever the number of streams).
    #[serde(deserialize_with = "duration")]
    pub watch_poll: Duration,
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
    /// Level of the per-call access log line, or "off".
    pub access: String,
}

impl LogConfig {
    /// The access log's level; `None`: off (validated at load).
    pub fn access_level(&self) -> Option<tracing::Level> {
        match self.access.as_str() {
            "off" => None,
            level => level.parse().ok(),
        }
    }
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
    #[error("{origin}: unknown configuration key{hint}")]
    Unknown { origin: String, hint: String },
}

/// The config sections; a `CREDITD_<SECTION>_…` variable without the
/// double underscore is a mistake, not someone else's variable.
fn sections(known: &[String]) -> Vec<&str> {
    let mut out: Vec<&str> = known.iter().filter_map(|k| k.split_once('.').map(|(s, _)| s)).collect();
    out.dedup();
    out
}

/// Every `section.key` of the defaults.
fn known_keys(defaults: &toml::Table) -> Vec<String> {
    let mut keys = Vec::new();
    for (section, value) in defaults {
        if let Some(t) = value.as_table() {
            keys.extend(t.keys().map(|k| format!("{section}.{k}")));
        }
    }
    keys
}

/// Every configuration environment variable with its key, for `--help`.
pub fn env_variables() -> Vec<(String, String)> {
    let table: toml::Table = toml::from_str(DEFAULTS).expect("embedded defaults parse");
    known_keys(&table).into_iter().map(|k| (env_name(&k), k)).collect()
}

/// The environment variable of a `section.key`.
fn env_name(key: &str) -> String {
    format!("CREDITD_{}", key.replacen('.', "__", 1).to_ascii_uppercase())
}

/// The config key an environment variable sets: `None` for variables that
/// are not configuration (not `CREDITD_*`, or `CREDITD_<NAME>` whose first
/// word is no section, like `CREDITD_CONFIG`), an error for a `CREDITD_*`
/// variable that looks like configuration but names no key (the message
/// names the closest one).
fn env_key(name: &str, known: &[String]) -> Result<Option<String>, ConfigError> {
    match name {
        "DATABASE_URL" => return Ok(Some("postgres.url".into())),
        "REDIS_URL" => return Ok(Some("redis.url".into())),
        _ => {}
    }
    let Some(rest) = name.strip_prefix("CREDITD_") else { return Ok(None) };
    let lower = rest.to_ascii_lowercase();
    let candidate = if lower.contains("__") {
        lower.replacen("__", ".", 1)
    } else {
        let looks_like_config = sections(known).iter().any(|s| lower.starts_with(&format!("{s}_")));
        if !looks_like_config {
            return Ok(None);
        }
        lower.clone()
    };
    if known.contains(&candidate) {
        return Ok(Some(candidate));
    }
    let names: Vec<String> = known.iter().map(|k| env_name(k)).collect();
    Err(ConfigError::Unknown { origin: format!("environment variable {name}"), hint: closest_hint(name, &names) })
}

/// Refuses keys of a config file the defaults do not have.
fn check_file_keys(file: &toml::Table, known: &[String], path: &str) -> Result<(), ConfigError> {
    for (section, value) in file {
        let Some(t) = value.as_table() else {
            return Err(ConfigError::Unknown {
                origin: format!("config file {path}: {section:?} (a top-level key; every key is in a [section])"),
                hint: closest_hint(section, known),
            });
        };
        for key in t.keys() {
            let dotted = format!("{section}.{key}");
            if !known.contains(&dotted) {
                return Err(ConfigError::Unknown {
                    origin: format!("config file {path}: {dotted}"),
                    hint: closest_hint(&dotted, known),
                });
            }
        }
    }
    Ok(())
}

/// ": did you mean X?" for the nearest candidate, when one is near.
fn closest_hint(wrong: &str, candidates: &[String]) -> String {
    let wrong_l = wrong.to_ascii_lowercase();
    let best = candidates.iter().map(|c| (edit_distance(&wrong_l, &c.to_ascii_lowercase()), c)).min_by_key(|(d, _)| *d);
    match best {
        Some((d, c)) if d <= wrong.len().max(4) / 2 => format!(" (did you mean {c}?)"),
        _ => String::new(),
    }
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = if ca == *cb { prev } else { 1 + prev.min(row[j]).min(cur) };
            prev = cur;
        }
    }
    row[b.len()]
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
            check_file_keys(&file, &known_keys(&table), path)?;
            merge(&mut table, file);
        }
        let known = known_keys(&table);
        for (name, value) in &sources.env {
            let Some(key) = env_key(name, &known)? else { continue };
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
        if self.auth.unknown_key_cache == 0 {
            return invalid("auth.unknown_key_cache", "must be positive");
        }
        if self.auth.lookups_per_second == 0 {
            return invalid("auth.lookups_per_second", "must be positive");
        }
        if self.auth.lookup_burst == 0 {
            return invalid("auth.lookup_burst", "must be positive");
        }
        if self.alerts.watch_streams_per_key == 0
            || self.alerts.watch_streams_per_key > self.alerts.watch_streams_per_tenant
        {
            return invalid(
                "alerts.watch_streams_per_key",
                "must be positive and at most alerts.watch_streams_per_tenant",
            );
        }
        if self.alerts.watch_poll < Duration::from_millis(10) {
            return invalid("alerts.watch_poll", "must be at least 10ms");
        }
        if self.pricing.max_quantity <= 0 {
            return invalid("pricing.max_quantity", "must be positive");
        }
        if !matches!(self.log.access.as_str(), "off" | "error" | "warn" | "info" | "debug" | "trace") {
            return invalid("log.access", "must be \"off\", \"error\", \"warn\", \"info\", \"debug\" or \"trace\"");
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
    let existing = section_table.get(key).cloned();
    let value = match existing.as_ref() {
        Some(toml::Value::Integer(_)) => {
            toml::Value::Integer(raw.parse().map_err(|_| parse_err(format!("{dotted} must be an integer")))?)
        }
        Some(toml::Value::Boolean(_)) => {
            toml::Value::Boolean(raw.parse().map_err(|_| parse_err(format!("{dotted} must be true or false")))?)
        }
        Some(_) => toml::Value::String(raw.to_string()),
        None => {
            let known = known_keys(table);
            return Err(ConfigError::Unknown {
                origin: format!("{origin}: {dotted}"),
                hint: closest_hint(dotted, &known),
            });
        }
    };
    section_table.insert(key.to_string(), value);
    Ok(())
}

/// Parses a duration: one or more `<whole number><unit>` with units ms, s,
/// m, h and d, largest first ("250ms", "5s", "10m", "24h", "7d", "1h30m",
/// "1m30s").
pub fn parse_duration(text: &str) -> Option<Duration> {
    let mut rest = text.trim();
    if rest.is_empty() {
        return None;
    }
    let mut total = Duration::ZERO;
    let mut last_unit = u64::MAX;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit())?;
        if digits == 0 {
            return None;
        }
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
        let millis_per: u64 = match &rest[..unit_len] {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return None,
        };
        // Each unit once, largest first: "1h30m", never "30m1h" or "1m1m".
        if millis_per >= last_unit {
            return None;
        }
        last_unit = millis_per;
        total = total.checked_add(Duration::from_millis(n.checked_mul(millis_per)?))?;
        rest = &rest[unit_len..];
    }
    Some(total)
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    parse_duration(&text).ok_or_else(|| {
        serde::de::Error::custom(format!(
            "{text:?} is not a duration like \"250ms\", \"5s\", \"10m\", \"24h\", \"7d\" or \"1h30m\""
        ))
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
    fn a_mistyped_variable_is_an_error_naming_the_closest_one() {
        let load = |name: &str| {
            Config::load(&Sources { env: vec![(name.into(), "90s".into())], ..Default::default() }).map(|c| c.hot)
        };
        let e = load("CREDITD_HOT_DEFAULT_TTL").unwrap_err().to_string();
        assert!(e.contains("CREDITD_HOT_DEFAULT_TTL") && e.contains("did you mean CREDITD_HOT__DEFAULT_TTL?"), "{e}");
        let e = load("CREDITD_HOT__DEFAULT_TLL").unwrap_err().to_string();
        assert!(e.contains("did you mean CREDITD_HOT__DEFAULT_TTL?"), "{e}");
        assert!(load("CREDITD_NOPE__X").is_err());
        assert_eq!(load("CREDITD_HOT__DEFAULT_TTL").unwrap().default_ttl, Duration::from_secs(90));
        // Not configuration: other tools' variables and the config file's.
        for other in ["CREDITD_CONFIG", "CREDITD_API_KEY", "CREDITD_TEST_DATABASE_URL", "CREDITD_BIN", "PATH"] {
            assert!(load(other).is_ok(), "{other}");
        }
    }

    #[test]
    fn a_file_key_the_defaults_lack_is_an_error() {
        let dir = std::env::temp_dir().join(format!("creditd-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.toml");
        std::fs::write(&path, "[hot]\ndefault_tll = \"5s\"\n").unwrap();
        let e = Config::load(&Sources { file: Some(path.display().to_string()), ..Default::default() })
            .unwrap_err()
            .to_string();
        assert!(e.contains("hot.default_tll") && e.contains("did you mean hot.default_ttl?"), "{e}");
        std::fs::write(&path, "[hot]\ndefault_ttl = \"1m30s\"\n").unwrap();
        let c = Config::load(&Sources { file: Some(path.display().to_string()), ..Default::default() }).unwrap();
        assert_eq!(c.hot.default_ttl, Duration::from_secs(90));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn durations_take_common_units_and_combinations() {
        let d = |s: &str| parse_duration(s);
        assert_eq!(d("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(d("7d"), Some(Duration::from_secs(7 * 86_400)));
        assert_eq!(d("1h30m"), Some(Duration::from_secs(5_400)));
        assert_eq!(d("1m30s500ms"), Some(Duration::from_millis(90_500)));
        assert_eq!(d("0s"), Some(Duration::ZERO));
        for bad in ["", "5", "s", "1.5s", "30m1h", "1m1m", "5 s", "-1s", "1w", "99999999999999999999d"] {
            assert_eq!(d(bad), None, "{bad:?}");
        }
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
        assert!(bad("hot.nope", "1").contains("unknown configuration key"));
        assert!(bad("hot.default_tl", "1s").contains("did you mean hot.default_ttl?"));
        assert!(bad("redis.url", "http://x").contains("redis.url"));
        assert!(bad("server.shutdown_grace", "ten").contains("duration"));
    }
}
