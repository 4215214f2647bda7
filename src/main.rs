//! The `creditd` binary: `serve`, `migrate`, `keys`, `check`, `health`,
//! `default-config`.

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use creditd::{
    app::App,
    auth::{KeyStore, Role},
    config::{Config, Sources},
    demo,
    store::pg::PgStore,
};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(name = "creditd", version, about = "Prepaid-credit gate for AI usage (gRPC)")]
struct Cli {
    /// Configuration file (TOML) layered over the embedded defaults.
    #[arg(long, global = true, env = "CREDITD_CONFIG")]
    config: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve gRPC until SIGINT or SIGTERM.
    Serve {
        /// Listen address (overrides server.listen).
        #[arg(long)]
        listen: Option<String>,
        /// Apply database migrations before serving.
        #[arg(long)]
        migrate: bool,
        /// Seed the demo tenant and print an admin API key for it.
        #[arg(long)]
        demo: bool,
        /// With --demo: also write the demo key to this file.
        #[arg(long, requires = "demo")]
        demo_key_file: Option<String>,
    },
    /// Apply database migrations and exit.
    Migrate,
    /// Manage API keys directly in PostgreSQL (bootstrap the first
    /// operator key with `keys create --role operator`).
    Keys {
        #[command(subcommand)]
        action: KeysAction,
    },
    /// Compare every account's hot balance (Redis) with its ledger
    /// (PostgreSQL) for a tenant; exit 1 if any differ.
    Check {
        #[arg(long)]
        tenant: String,
    },
    /// Ask a running creditd's grpc.health.v1 service; exit 0 when it
    /// answers SERVING, 1 otherwise. For exec probes, which run inside the
    /// pod and so reach a loopback listener (sidecar mode). Plaintext only.
    Health {
        /// The gRPC address to ask.
        #[arg(long, default_value = "127.0.0.1:50051")]
        addr: String,
        /// The health service name: "" (ready: Redis answers and startup is
        /// done) or "creditd.liveness" (the process answers).
        #[arg(long, default_value = "")]
        service: String,
        /// Give up after this many milliseconds.
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
    },
    /// Smoke-test a running creditd (what `helm test` runs): Health must
    /// be SERVING; with an API key (CREDITD_API_KEY) and --account, a
    /// Reserve of --amount must be granted and is then released. Exit 0
    /// when all passed. Plaintext only.
    Smoke {
        #[arg(long, default_value = "127.0.0.1:50051")]
        addr: String,
        /// An account of the key's tenant; empty: Health only.
        #[arg(long, default_value = "")]
        account: String,
        /// Credits to reserve (and release at once).
        #[arg(long, default_value = "0.000001")]
        amount: String,
        /// A runtime (or admin) API key.
        #[arg(long, env = "CREDITD_API_KEY", hide_env_values = true, default_value = "")]
        api_key: String,
    },
    /// Print the effective configuration's defaults file and exit.
    DefaultConfig,
}

#[derive(Clone, Copy, ValueEnum)]
enum RoleArg {
    /// The hot path (Reserve, Commit, …) of one tenant.
    Runtime,
    /// Everything of one tenant.
    Admin,
    /// Tenants and API keys of every tenant.
    Operator,
}

impl From<RoleArg> for Role {
    fn from(r: RoleArg) -> Role {
        match r {
            RoleArg::Runtime => Role::Runtime,
            RoleArg::Admin => Role::Admin,
            RoleArg::Operator => Role::Operator,
        }
    }
}

/// The environment variables, for `--help`.
fn env_help() -> String {
    let mut text = String::from(
        "Environment (each overrides the same key of the config file; \
         `creditd default-config` documents them):\n  \
         CREDITD_CONFIG            the config file (as --config)\n  \
         DATABASE_URL              postgres.url\n  \
         REDIS_URL                 redis.url\n",
    );
    for (name, key) in creditd::config::env_variables() {
        text.push_str(&format!("  {name:<40} {key}\n"));
    }
    text.push_str("A CREDITD_<SECTION>_… variable that names no key is an error.");
    text
}

#[derive(Subcommand)]
enum KeysAction {
    /// Create a key and print it (shown once).
    Create {
        /// What the key may call.
        #[arg(long, value_enum)]
        role: RoleArg,
        /// The tenant (runtime and admin keys).
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long, default_value = "")]
        name: String,
    },
    /// Revoke a key by its id.
    Revoke { key_id: String },
    /// List the keys of a tenant (or operator keys without --tenant).
    List {
        #[arg(long)]
        tenant: Option<String>,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let matches = Cli::command().after_long_help(env_help()).get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let mut overrides = Vec::new();
    if let Command::Serve { listen, migrate, .. } = &cli.command {
        if let Some(listen) = listen {
            overrides.push(("server.listen".to_string(), listen.clone()));
        }
        if *migrate {
            overrides.push(("postgres.migrate_on_start".to_string(), "true".to_string()));
        }
    }
    if let Command::DefaultConfig = cli.command {
        print!("{}", include_str!("default.toml"));
        return ExitCode::SUCCESS;
    }
    if let Command::Health { addr, service, timeout_ms } = &cli.command {
        return health(addr, service, std::time::Duration::from_millis(*timeout_ms)).await;
    }
    if let Command::Smoke { addr, account, amount, api_key } = &cli.command {
        return match smoke(addr, account, amount, api_key).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("creditd smoke: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let sources = Sources { file: cli.config.clone(), env: std::env::vars().collect(), overrides };
    let config = match Config::load(&sources) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("creditd: {e}");
            return ExitCode::from(2);
        }
    };
    let _telemetry = match init_tracing(&config) {
        Ok(telemetry) => telemetry,
        Err(e) => {
            eprintln!("creditd: cannot set up tracing: {e}");
            return ExitCode::FAILURE;
        }
    };
    match run(cli.command, config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "creditd stopped with an error");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command, config: Config) -> Result<(), Box<dyn std::error::Error>> {
    match command {
        Command::Migrate => {
            let pg = PgStore::connect(&config.postgres.url, 2, config.postgres.statement_timeout).await?;
            pg.migrate().await?;
            tracing::info!("migrations applied");
            Ok(())
        }
        Command::Keys { action } => keys(action, &config).await,
        Command::Check { tenant } => {
            let mut config = config;
            // A private listener: the check serves nothing.
            config.server.listen = "127.0.0.1:0".parse()?;
            config.pricing.load_default_catalog = false;
            // Read-only: no reconciler repairing behind the report.
            config.reconcile.interval = std::time::Duration::ZERO;
            let app = App::build(config).await?;
            // The stores must answer (and migrations be applied) first.
            tokio::time::timeout(std::time::Duration::from_secs(30), app.ready())
                .await
                .map_err(|_| "postgres or redis not ready within 30 s (see the log)")?;
            app.engine().require_tenant(&tenant).await?;
            let measured = app.engine().check_balances(&tenant).await?;
            println!(
                "{} accounts checked, {} differ, {} kept moving (not judged)",
                measured.accounts,
                measured.drifts.len(),
                measured.busy.len()
            );
            for d in &measured.drifts {
                println!("{}\thot {}\tledger {}\tdrift {}", d.account_id, d.hot, d.ledger, d.amount());
            }
            if measured.drifts.is_empty() { Ok(()) } else { Err("hot balances drift from the ledger".into()) }
        }
        Command::Serve { demo: seed_demo, demo_key_file, .. } => {
            let max_depth = config.hot.max_depth;
            let app = App::build(config).await?;
            if seed_demo {
                // Seeded once the stores answer; serving starts at once.
                let mut ready = app.readiness();
                let engine = app.engine().clone();
                tokio::spawn(async move {
                    if ready.wait_for(|s| *s == creditd::service::jobs::Serving::Yes).await.is_err() {
                        return;
                    }
                    match demo::seed(&engine, max_depth).await {
                        Ok(key) => {
                            tracing::info!(tenant = demo::TENANT, "demo tenant seeded (accounts acme, alice, bob)");
                            println!("demo admin key for tenant {}: {key}", demo::TENANT);
                            if let Some(path) = demo_key_file
                                && let Err(e) = write_secret(&path, &key)
                            {
                                tracing::error!(error = %e, path = %path, "cannot write the demo key");
                            }
                        }
                        Err(e) => tracing::error!(error = %e, "cannot seed the demo tenant"),
                    }
                });
            }
            tracing::info!(addr = %app.local_addr(), "listening");
            app.serve(shutdown_signal()).await?;
            Ok(())
        }
        Command::DefaultConfig | Command::Health { .. } | Command::Smoke { .. } => Ok(()),
    }
}

/// The `health` command (needs no configuration).
async fn health(addr: &str, service: &str, timeout: std::time::Duration) -> ExitCode {
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};
    let ask = async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?.connect().await?;
        let reply = HealthClient::new(channel).check(HealthCheckRequest { service: service.to_string() }).await?;
        Ok::<_, Box<dyn std::error::Error>>(reply.into_inner().status)
    };
    match tokio::time::timeout(timeout, ask).await {
        Ok(Ok(status)) if status == ServingStatus::Serving as i32 => ExitCode::SUCCESS,
        Ok(Ok(status)) => {
            let name = ServingStatus::try_from(status).map(|s| s.as_str_name()).unwrap_or("UNKNOWN");
            eprintln!("creditd health: {addr} service {service:?}: {name}");
            ExitCode::FAILURE
        }
        Ok(Err(e)) => {
            eprintln!("creditd health: {addr}: {e}");
            ExitCode::FAILURE
        }
        Err(_) => {
            eprintln!("creditd health: {addr}: no answer within {timeout:?}");
            ExitCode::FAILURE
        }
    }
}

/// The `smoke` command: Health, then Reserve and Release when a key and
/// an account are given.
async fn smoke(addr: &str, account: &str, amount: &str, api_key: &str) -> Result<(), Box<dyn std::error::Error>> {
    use creditd::pb::{self, credit_service_client::CreditServiceClient};
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(std::time::Duration::from_secs(5))
        .timeout(std::time::Duration::from_secs(10))
        .connect()
        .await?;
    let status = HealthClient::new(channel.clone()).check(HealthCheckRequest { service: String::new() }).await?;
    if status.get_ref().status != ServingStatus::Serving as i32 {
        return Err(format!("{addr}: health is not SERVING").into());
    }
    println!("health: SERVING");
    if account.is_empty() || api_key.is_empty() {
        println!("no --account or CREDITD_API_KEY: Reserve/Release skipped");
        return Ok(());
    }
    let bearer: tonic::metadata::MetadataValue<_> = format!("Bearer {api_key}").parse()?;
    let mut credit = CreditServiceClient::new(channel);
    let with_key = |message| {
        let mut request = tonic::Request::new(message);
        request.metadata_mut().insert("authorization", bearer.clone());
        request
    };
    let key = format!("smoke-{}", uuid::Uuid::new_v4());
    let reserved = credit
        .reserve(with_key(pb::ReserveRequest {
            account_id: account.to_string(),
            cost: Some(pb::reserve_request::Cost::Amount(amount.to_string())),
            ttl: Some(prost_types::Duration { seconds: 10, nanos: 0 }),
            idempotency_key: key.clone(),
            ..Default::default()
        }))
        .await?
        .into_inner();
    if !reserved.granted {
        return Err(format!("Reserve of {amount} on {account} was denied: {:?}", reserved.denial).into());
    }
    println!("reserve: granted {} (hold {})", reserved.amount, reserved.reservation_id);
    let mut release = tonic::Request::new(pb::ReleaseRequest {
        reservation_id: reserved.reservation_id.clone(),
        idempotency_key: format!("{key}-release"),
    });
    release.metadata_mut().insert("authorization", bearer.clone());
    credit.release(release).await?;
    println!("release: done");
    Ok(())
}

async fn keys(action: KeysAction, config: &Config) -> Result<(), Box<dyn std::error::Error>> {
    let pg = PgStore::connect(&config.postgres.url, 2, config.postgres.statement_timeout).await?;
    let store = KeyStore::new(pg.clone(), config.auth.key_recheck, Default::default());
    match action {
        KeysAction::Create { role, tenant, name } => {
            let role = Role::from(role);
            if (role == Role::Operator) != tenant.is_none() {
                return Err("operator keys take no --tenant; runtime and admin keys need one".into());
            }
            if let Some(t) = &tenant
                && pg.tenant(t).await?.is_none()
            {
                return Err(format!("tenant {t} does not exist").into());
            }
            let (record, key) = store.create(tenant.as_deref(), role, &name, None).await?;
            println!("{}", key.ok_or("the key was not created")?);
            eprintln!("key id {} (prefix {}): store it now, it is not shown again", record.key_id, record.prefix);
        }
        KeysAction::Revoke { key_id } => {
            let key_id = key_id.parse().map_err(|_| "not a key id")?;
            match store.revoke(key_id).await? {
                Some(record) => eprintln!("revoked key {} (prefix {})", record.key_id, record.prefix),
                None => return Err("no such key".into()),
            }
        }
        KeysAction::List { tenant } => {
            for k in pg.list_api_keys(tenant.as_deref()).await? {
                let state = if k.revoked_at.is_some() { "revoked" } else { "active" };
                println!("{}\tcdk_{}_…\t{}\t{}\t{}", k.key_id, k.prefix, k.role.as_str(), state, k.name);
            }
        }
    }
    Ok(())
}

/// Writes a secret readable by its owner only.
fn write_secret(path: &str, secret: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    writeln!(file, "{secret}")
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = terminate => {}
    }
}

/// Logs to stderr (text or JSON), plus spans to an OTLP collector when
/// `log.otlp_endpoint` is set (builds with the `otlp` feature). The guard
/// flushes the exporter when dropped.
fn init_tracing(config: &Config) -> Result<Telemetry, Box<dyn std::error::Error>> {
    use tracing_subscriber::{Layer, layer::SubscriberExt, util::SubscriberInitExt};
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.log.filter));
    // Colour only for a person at a terminal (and never with NO_COLOR):
    // a file, a pipe or a log collector gets plain text.
    use std::io::IsTerminal;
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(ansi);
    let fmt = if config.log.format == "json" { fmt.json().boxed() } else { fmt.boxed() };
    let registry = tracing_subscriber::registry().with(filter).with(fmt);
    #[cfg(feature = "otlp")]
    if !config.log.otlp_endpoint.is_empty() {
        let (layer, provider) = otlp::layer(&config.log.otlp_endpoint)?;
        registry.with(layer).init();
        return Ok(Telemetry { provider: Some(provider) });
    }
    registry.init();
    Ok(Telemetry::default())
}

#[derive(Default)]
struct Telemetry {
    #[cfg(feature = "otlp")]
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        #[cfg(feature = "otlp")]
        if let Some(provider) = self.provider.take()
            && let Err(e) = provider.shutdown()
        {
            eprintln!("creditd: flushing spans to the OTLP collector failed: {e}");
        }
    }
}

#[cfg(feature = "otlp")]
mod otlp {
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_otlp::WithExportConfig;
    use opentelemetry_sdk::{Resource, trace::SdkTracerProvider};
    use tracing_subscriber::registry::LookupSpan;

    /// A tracing layer exporting spans in batches over OTLP/gRPC.
    pub fn layer<S>(
        endpoint: &str,
    ) -> Result<(impl tracing_subscriber::Layer<S>, SdkTracerProvider), Box<dyn std::error::Error>>
    where
        S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    {
        let exporter = opentelemetry_otlp::SpanExporter::builder().with_tonic().with_endpoint(endpoint).build()?;
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(Resource::builder().with_service_name("creditd").build())
            .build();
        let tracer = provider.tracer("creditd");
        Ok((tracing_opentelemetry::layer().with_tracer(tracer), provider))
    }
}
