//! `App`: the assembled service. `build` connects the stores, starts the
//! group committer and background jobs, and binds the listener (port 0
//! works: tests read `local_addr`). `serve` runs until the shutdown future
//! resolves, then drains in-flight calls for up to the grace period.

use std::{future::Future, net::SocketAddr, time::Duration};

use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
use tokio_stream::{StreamExt, wrappers::TcpListenerStream};
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

use crate::{
    auth::{KeyStore, LookupLimits},
    config::{Config, redact_url},
    domain::pricing::BookContent,
    grpc::reports::ReportApi,
    grpc::{admin::AdminApi, credit::CreditApi, observe::ObserveLayer},
    grpc::{alerts::AlertApi, pricing::PricingApi},
    pb::{
        admin_service_server::AdminServiceServer, alert_service_server::AlertServiceServer,
        credit_service_server::CreditServiceServer, pricing_service_server::PricingServiceServer,
        report_service_server::ReportServiceServer,
    },
    service::{
        Committer, Engine, Limits, Tenants,
        jobs::{self, JobTimings, Serving},
        pricing::Pricing,
        watch::{AlertWatch, WatchLimits},
    },
    store::{
        hot::{HotStore, HotTimings},
        pg::PgStore,
    },
};

/// Why the app could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot connect to postgres at {url}: {source}")]
    Postgres { url: String, source: crate::store::pg::PgError },
    #[error("cannot connect to redis at {url}: {source}")]
    Redis { url: String, source: crate::store::hot::HotError },
    #[error("cannot apply migrations: {0}")]
    Migrate(crate::store::pg::PgError),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("grpc server: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("cannot read TLS file {path}: {source}")]
    TlsFile { path: String, source: std::io::Error },
    #[error("price catalog {origin}: {message}")]
    CatalogFile { origin: String, message: String },
    #[error("webhooks: {0}")]
    Webhooks(String),
    #[error("cannot load the default price catalog: {0}")]
    Catalog(crate::error::Error),
}

/// What must happen in PostgreSQL before the jobs start.
struct Startup {
    migrate: bool,
    catalog: Option<BookContent>,
    /// Where PostgreSQL is (no password), for the log.
    postgres: String,
}

/// Waits for PostgreSQL with backoff (0.25 s doubling to 10 s), applies
/// the migrations and loads the default catalog, then runs the background
/// jobs until shutdown. Until then the health job is not running, so every
/// service but `creditd.liveness` reports NOT_SERVING.
async fn startup(
    engine: Engine,
    start: Startup,
    timings: JobTimings,
    status: watch::Sender<Serving>,
    mut stop: watch::Receiver<bool>,
) {
    let mut wait = Duration::from_millis(250);
    loop {
        let step = async {
            engine.pg.ping().await.map_err(|e| format!("postgres at {} unreachable: {e}", start.postgres))?;
            if start.migrate {
                engine.pg.migrate().await.map_err(|e| format!("cannot apply migrations: {e}"))?;
            }
            if let Some(catalog) = &start.catalog
                && let Some(book) = engine
                    .load_default_catalog(catalog)
                    .await
                    .map_err(|e| format!("cannot load the default price catalog: {e}"))?
            {
                tracing::info!(book, "default price catalog loaded");
            }
            Ok::<_, String>(())
        };
        match step.await {
            Ok(()) => break,
            Err(e) => tracing::warn!(error = %e, retry_in = ?wait, "not ready: waiting for postgres"),
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.changed() => return,
        }
        wait = (wait * 2).min(Duration::from_secs(10));
    }
    tracing::info!(postgres = %start.postgres, "postgres ready: starting the background jobs");
    for job in jobs::spawn(engine, timings, status, stop) {
        let _ = job.await;
    }
}

/// The price catalog shipped in the binary (`catalog/default.toml`).
pub const EMBEDDED_CATALOG: &str = include_str!("../catalog/default.toml");

/// The default catalog: the configured file, or the embedded one.
fn default_catalog(config: &Config) -> Result<BookContent, StartError> {
    let (origin, text) = if config.pricing.default_catalog_file.is_empty() {
        ("catalog/default.toml (embedded)".to_string(), EMBEDDED_CATALOG.to_string())
    } else {
        let path = config.pricing.default_catalog_file.clone();
        let text = std::fs::read_to_string(&path)
            .map_err(|e| StartError::CatalogFile { origin: path.clone(), message: e.to_string() })?;
        (path, text)
    };
    let content: BookContent = toml::from_str(&text)
        .map_err(|e| StartError::CatalogFile { origin: origin.clone(), message: e.to_string() })?;
    content.entries("").map_err(|e| StartError::CatalogFile { origin, message: e.to_string() })?;
    Ok(content)
}

/// The server's TLS settings, or `None` for plaintext.
fn tls_config(config: &Config) -> Result<Option<ServerTlsConfig>, StartError> {
    if !config.tls.enabled() {
        return Ok(None);
    }
    let read =
        |path: &str| std::fs::read(path).map_err(|source| StartError::TlsFile { path: path.to_string(), source });
    let identity = Identity::from_pem(read(&config.tls.cert_file)?, read(&config.tls.key_file)?);
    let mut tls = ServerTlsConfig::new().identity(identity);
    if !config.tls.client_ca_file.is_empty() {
        tls = tls.client_ca_root(Certificate::from_pem(read(&config.tls.client_ca_file)?));
    }
    Ok(Some(tls))
}

pub struct App {
    config: Config,
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    engine: Engine,
    status: watch::Receiver<Serving>,
    stop_jobs: watch::Sender<bool>,
    jobs: Vec<JoinHandle<()>>,
}

impl App {
    pub async fn build(config: Config) -> Result<App, StartError> {
        // Neither store is contacted here: creditd starts (and answers
        // liveness) while they are unreachable; `startup` below waits for
        // PostgreSQL, and the health job for Redis.
        let pg =
            PgStore::lazy(&config.postgres.url, config.postgres.max_connections, config.postgres.statement_timeout)
                .map_err(|source| StartError::Postgres { url: redact_url(&config.postgres.url), source })?;
        let hot = HotStore::connect(
            &config.redis.url,
            config.redis.cluster,
            &config.redis.sentinel_master,
            config.redis.key_prefix.clone(),
            config.hot.max_depth,
            HotTimings {
                idempotency_ttl: config.hot.idempotency_ttl,
                tombstone_ttl: config.hot.tombstone_ttl,
                commit_deadline: config.hot.commit_deadline,
            },
            config.redis.timeout,
        )
        .await
        .map_err(|source| StartError::Redis { url: redact_url(&config.redis.url), source })?;
        let committer = Committer::start(pg.clone(), config.commit.max_batch, config.commit.writers);
        let keys = KeyStore::new(
            pg.clone(),
            config.auth.key_recheck,
            LookupLimits {
                unknown_ttl: config.auth.unknown_key_ttl,
                unknown_capacity: config.auth.unknown_key_cache,
                per_second: config.auth.lookups_per_second,
                burst: config.auth.lookup_burst,
            },
        );
        let pricing = Pricing::new(pg.clone(), config.pricing.refresh);
        let engine = Engine {
            hot,
            pg,
            committer,
            keys,
            pricing,
            clock: Default::default(),
            limits: Limits {
                default_ttl: config.hot.default_ttl,
                min_ttl: config.hot.min_ttl,
                max_ttl: config.hot.max_ttl,
            },
            tenants: Tenants::default(),
            recovery: Default::default(),
            webhooks: std::sync::Arc::new(
                crate::service::webhooks::WebhookPolicy::new(
                    &config.webhooks.allow_destinations,
                    &config.webhooks.ca_file,
                )
                .map_err(StartError::Webhooks)?,
            ),
        };
        let catalog = if config.pricing.load_default_catalog { Some(default_catalog(&config)?) } else { None };
        tls_config(&config)?;
        let listener = TcpListener::bind(config.server.listen)
            .await
            .map_err(|source| StartError::Bind { addr: config.server.listen, source })?;
        if !config.tls.enabled() && !config.server.listen.ip().is_loopback() {
            tracing::warn!(
                listen = %config.server.listen,
                "serving plaintext gRPC on a non-loopback address: API keys travel unencrypted; configure [tls]"
            );
        }
        let metrics_listener = match config.metrics.address() {
            Some(addr) => Some(TcpListener::bind(addr).await.map_err(|source| StartError::Bind { addr, source })?),
            None => None,
        };
        let (status_tx, status) = watch::channel(Serving::No);
        let (stop_jobs, stop_rx) = watch::channel(false);
        let timings = JobTimings {
            reap: config.jobs.reap_interval,
            ledger: config.jobs.ledger_interval,
            health: config.jobs.health_interval,
            reconcile: config.reconcile.interval,
            repair: config.reconcile.repair,
        };
        let jobs = vec![tokio::spawn(startup(
            engine.clone(),
            Startup { migrate: config.postgres.migrate_on_start, catalog, postgres: redact_url(&config.postgres.url) },
            timings,
            status_tx,
            stop_rx,
        ))];
        Ok(App { config, listener, metrics_listener, engine, status, stop_jobs, jobs })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("a bound listener has an address")
    }

    /// The metrics endpoint's address, when one is configured.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The serving status the health job publishes.
    pub fn readiness(&self) -> watch::Receiver<Serving> {
        self.status.clone()
    }

    /// Resolves once the health job has reported SERVING.
    pub async fn ready(&self) {
        let mut status = self.status.clone();
        let _ = status.wait_for(|s| *s == Serving::Yes).await;
    }

    /// Serves until `shutdown` resolves, then drains for the grace period.
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), StartError> {
        let App { config, listener, metrics_listener, engine, status, stop_jobs, jobs } = self;
        let (reporter, health_service) = tonic_health::server::health_reporter();
        tokio::spawn(report_health(reporter, status));

        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
            .build_v1()?;
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()?;
        let max_quantity = rust_decimal::Decimal::from(config.pricing.max_quantity);
        let credit = CreditApi { engine: engine.clone(), max_quantity };
        let pricing = PricingApi { engine: engine.clone(), max_quantity };
        let alerts = AlertApi {
            engine: engine.clone(),
            watch: AlertWatch::new(
                engine.pg.clone(),
                WatchLimits {
                    per_key: config.alerts.watch_streams_per_key,
                    per_tenant: config.alerts.watch_streams_per_tenant,
                    poll: config.alerts.watch_poll,
                },
            ),
        };
        let admin = AdminApi { engine: engine.clone(), max_depth: config.hot.max_depth };

        let mut builder = Server::builder().tcp_nodelay(true);
        if let Some(tls) = tls_config(&config)? {
            builder = builder.tls_config(tls)?;
        }
        if let Some(listener) = metrics_listener {
            tokio::spawn(crate::metrics::serve(listener, config.metrics.tenant_labels, stop_jobs.subscribe()));
        }
        let (drain_tx, drain_rx) = tokio::sync::oneshot::channel::<()>();
        let server = builder
            .layer(ObserveLayer { access: config.log.access_level() })
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(CreditServiceServer::new(credit))
            .add_service(AdminServiceServer::new(admin))
            .add_service(PricingServiceServer::new(pricing))
            .add_service(AlertServiceServer::new(alerts))
            .add_service(ReportServiceServer::new(ReportApi { engine: engine.clone() }))
            .serve_with_incoming_shutdown(incoming(listener), async {
                let _ = drain_rx.await;
            });
        let mut server = tokio::spawn(server);
        tokio::select! {
            result = &mut server => {
                let _ = stop_jobs.send(true);
                return result.unwrap_or(Ok(())).map_err(StartError::from);
            }
            _ = shutdown => {}
        }
        tracing::info!(grace = ?config.server.shutdown_grace, "shutting down: draining in-flight calls");
        let _ = drain_tx.send(());
        match tokio::time::timeout(config.server.shutdown_grace, &mut server).await {
            Ok(result) => result.unwrap_or(Ok(()))?,
            Err(_) => {
                tracing::warn!("grace period over: aborting the calls still in flight");
                server.abort();
            }
        }
        let _ = stop_jobs.send(true);
        for job in jobs {
            let _ = tokio::time::timeout(Duration::from_secs(2), job).await;
        }
        tracing::info!("stopped");
        Ok(())
    }
}

/// Accepted connections, with Nagle's algorithm off: tonic applies its own
/// `tcp_nodelay` only to listeners it binds itself, and a response written
/// in several segments would otherwise wait for the client's delayed ACK
/// (about 40 ms) before its last one.
fn incoming(listener: TcpListener) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    TcpListenerStream::new(listener).map(|conn| {
        if let Ok(stream) = &conn
            && let Err(e) = stream.set_nodelay(true)
        {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        conn
    })
}

/// The name of the health service that answers SERVING for as long as the
/// process answers at all: what a liveness probe should ask, so that an
/// outage of Redis (which turns every other name NOT_SERVING) never
/// restarts the replicas.
pub const LIVENESS_SERVICE: &str = "creditd.liveness";

async fn report_health(reporter: tonic_health::server::HealthReporter, mut status: watch::Receiver<Serving>) {
    reporter.set_service_status(LIVENESS_SERVICE, tonic_health::ServingStatus::Serving).await;
    loop {
        let serving = *status.borrow_and_update();
        let state = match serving {
            Serving::Yes => tonic_health::ServingStatus::Serving,
            Serving::No => tonic_health::ServingStatus::NotServing,
        };
        for name in [
            "",
            "creditd.v1.CreditService",
            "creditd.v1.AdminService",
            "creditd.v1.PricingService",
            "creditd.v1.AlertService",
            "creditd.v1.ReportService",
        ] {
            reporter.set_service_status(name, state).await;
        }
        tracing::info!(serving = ?serving, "health");
        if status.changed().await.is_err() {
            return;
        }
    }
}
